"""VMAs: the sorted tree, and split/merge in the style of Linux tools/testing/vma.

Layouts are drawn in pages from a base ``B``: ``0123456789`` over letters,
one letter per VMA, ``*`` for the range an operation touches.
"""

from __future__ import annotations

import pytest

from vmemu import (
    MADV_DOFORK,
    MADV_DONTFORK,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    Process,
)
from vmemu.mmu.vma import VM_READ, VM_WRITE, AnonVma, Vma, VmaTree, can_merge

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
PA = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED


def _tree(*ranges: tuple[int, int]) -> VmaTree:
    t = VmaTree()
    for s, e in ranges:
        t.insert(Vma(s * P, e * P, VM_READ))
    return t


def test_tree_lookups():
    t = _tree((2, 4), (6, 8), (8, 9))
    assert t.find_vma(0).vm_start == 2 * P
    assert t.find_vma(4 * P).vm_start == 6 * P
    assert t.find_vma(9 * P) is None
    assert t.vma_lookup(4 * P) is None and t.vma_lookup(3 * P + 5).vm_start == 2 * P
    assert [v.vm_start // P for v in t.overlapping(3 * P, 8 * P + 1)] == [2, 6, 8]
    assert list(t.gaps(0, 12 * P)) == [(9 * P, 12 * P), (4 * P, 6 * P), (0, 2 * P)]
    v = t.vma_lookup(6 * P)
    assert t.prev_of(v).vm_start == 2 * P and t.next_of(v).vm_start == 8 * P
    assert t.prev_of(t.vma_lookup(2 * P)) is None and t.next_of(t.vma_lookup(8 * P)) is None
    t._check()
    t.remove(v)
    assert len(t) == 2


@pytest.mark.parametrize("bad", [((2, 2),), ((2, 4), (3, 5))])
def test_tree_check_catches_empty_and_overlapping(bad):
    t = _tree(*bad)
    with pytest.raises(AssertionError):
        t._check()


def test_tree_check_catches_unaligned():
    t = VmaTree()
    t.insert(Vma(P + 1, 2 * P, VM_READ))
    with pytest.raises(AssertionError):
        t._check()


def test_can_merge_rules():
    a = Vma(0, P, VM_READ, 0)
    b = Vma(P, 2 * P, VM_READ, 1)
    assert can_merge(a, b)
    assert not can_merge(a, Vma(P, 2 * P, VM_READ | VM_WRITE, 1))   # flags
    assert not can_merge(a, Vma(P, 2 * P, VM_READ, 5))              # pgoff
    assert not can_merge(a, Vma(2 * P, 3 * P, VM_READ, 2))          # not adjacent
    a.anon_vma, b.anon_vma = AnonVma(), AnonVma()
    assert not can_merge(a, b)                                      # two anon_vmas


# -- split/merge through the syscalls --------------------------------------------


@pytest.fixture
def proc():
    p = Process()
    base = p.mmap(0, 64 * P, PROT_NONE)
    p.munmap(base, 64 * P)
    p.B = base  # type: ignore[attr-defined]
    yield p
    p.check()


def vmas(p):
    """(start, end, pgoff-relative-to-B) in pages for each VMA."""
    b = p.B
    return [((v.vm_start - b) // P, (v.vm_end - b) // P, v.vm_pgoff - (b >> PAGE_SHIFT))
            for v in p.mm.vmas]


def test_merge_new_vma_with_prev_and_next(proc):
    """
    0123456
    AA*BB      map * between A and B: one VMA
    """
    p, b = proc, proc.B
    p.mmap(b, 2 * P, RW, PA)
    p.mmap(b + 3 * P, 2 * P, RW, PA)
    assert len(p.mm.vmas) == 2
    p.mmap(b + 2 * P, P, RW, PA)
    assert vmas(p) == [(0, 5, 0)]


def test_no_merge_with_different_prot(proc):
    """
    0123
    AAB        B is read-only: two VMAs
    """
    p, b = proc, proc.B
    p.mmap(b, 2 * P, RW, PA)
    p.mmap(b + 2 * P, P, PROT_READ, PA)
    assert vmas(p) == [(0, 2, 0), (2, 3, 2)]


def test_mprotect_middle_splits_in_three_and_merges_back(proc):
    """
    0123456789
    AAAAAAAAAA
      ***        mprotect READ: A B A'  (pgoffs 0, 2, 5)
    """
    p, b = proc, proc.B
    p.mmap(b, 10 * P, RW, PA)
    p.write(b, b"x")
    p.mprotect(b + 2 * P, 3 * P, PROT_READ)
    assert vmas(p) == [(0, 2, 0), (2, 5, 2), (5, 10, 5)]
    p.check()
    p.mprotect(b + 2 * P, 3 * P, RW)
    assert vmas(p) == [(0, 10, 0)]


def test_mprotect_prefix_merges_into_prev(proc):
    """
    0123456
    AAABBB
       *       mprotect(3, 1) to A's prot: A grows, B shrinks
    """
    p, b = proc, proc.B
    p.mmap(b, 3 * P, RW, PA)
    p.mmap(b + 3 * P, 3 * P, PROT_READ, PA)
    p.mprotect(b + 3 * P, P, RW)
    assert vmas(p) == [(0, 4, 0), (4, 6, 4)]


def test_mprotect_suffix_merges_into_next(proc):
    """
    0123456
    AAABBB
      *        mprotect(2, 1) to B's prot: A shrinks, B grows down
    """
    p, b = proc, proc.B
    p.mmap(b, 3 * P, RW, PA)
    p.mmap(b + 3 * P, 3 * P, PROT_READ, PA)
    p.mprotect(b + 2 * P, P, PROT_READ)
    assert vmas(p) == [(0, 2, 0), (2, 6, 2)]


def test_munmap_middle_split_keeps_pgoff(proc):
    """
    0123456789
    AAAAAAAAAA
       ***      munmap: A (0..3) and A' (6..10, pgoff 6)
    """
    p, b = proc, proc.B
    p.mmap(b, 10 * P, RW, PA)
    p.munmap(b + 3 * P, 3 * P)
    assert vmas(p) == [(0, 3, 0), (6, 10, 6)]


def test_munmap_over_several_vmas_and_holes(proc):
    """
    0123456789
    AA B  CC D
     ********   munmap 1..9: A (0..1) and D remain
    """
    p, b = proc, proc.B
    p.mmap(b, 2 * P, RW, PA)
    p.mmap(b + 3 * P, P, PROT_READ, PA)
    p.mmap(b + 6 * P, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED)
    p.mmap(b + 9 * P, P, PROT_READ, PA)
    p.munmap(b + P, 8 * P)
    assert vmas(p) == [(0, 1, 0), (9, 10, 9)]


def test_different_anon_vmas_do_not_merge(proc):
    """
    0123
    A*B     A and B each written (own anon_vma); * merges with one of them only
    """
    p, b = proc, proc.B
    p.mmap(b, P, RW, PA)
    p.write(b, b"a")
    p.mmap(b + 2 * P, P, RW, PA)
    p.write(b + 2 * P, b"b")
    p.mmap(b + P, P, RW, PA)
    assert vmas(p) == [(0, 2, 0), (2, 3, 2)]
    assert p.mm.vmas.vma_lookup(b + P).anon_vma is p.mm.vmas.vma_lookup(b).anon_vma


def test_flag_advice_splits_and_merges(proc):
    """
    012345
    AAAAAA
     **       DONTFORK: A B A'; DOFORK: A
    """
    p, b = proc, proc.B
    p.mmap(b, 6 * P, RW, PA)
    p.madvise(b + P, 2 * P, MADV_DONTFORK)
    assert vmas(p) == [(0, 1, 0), (1, 3, 1), (3, 6, 3)]
    p.madvise(b + P, 2 * P, MADV_DOFORK)
    assert vmas(p) == [(0, 6, 0)]


def test_split_respects_max_map_count(proc):
    p, b = proc, proc.B
    p.mmap(b, 6 * P, RW, PA)
    p.mm.max_map_count = 1
    with pytest.raises(OSError) as ei:
        p.mprotect(b + P, P, PROT_READ)
    assert ei.value.errno == 12
    with pytest.raises(OSError) as ei:
        p.munmap(b + P, P)
    assert ei.value.errno == 12
    assert vmas(p) == [(0, 6, 0)]
    p.munmap(b, P)  # an unmap at the edge needs no split
    assert vmas(p) == [(1, 6, 1)]
