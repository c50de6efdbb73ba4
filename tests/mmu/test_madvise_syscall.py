"""madvise(2): DONTNEED, fork-related advice, holes and errnos."""

from __future__ import annotations

import errno

import pytest

from vmemu import (
    MADV_DOFORK,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_KEEPONFORK,
    MADV_MERGEABLE,
    MADV_NORMAL,
    MADV_RANDOM,
    MADV_SEQUENTIAL,
    MADV_UNMERGEABLE,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    MAP_ANONYMOUS,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Process,
)
from vmemu.mmu.vma import VM_DONTCOPY, VM_MERGEABLE, VM_RAND_READ, VM_SEQ_READ, VM_WIPEONFORK

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE


@pytest.fixture
def p():
    proc = Process()
    yield proc
    proc.check()


def errno_of(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


def test_dontneed_private_reads_back_zeros_and_frees(p):
    a = p.mmap(0, 3 * P)
    for i in range(3):
        p.write(a + i * P, b"abc")
    p.madvise(a, 2 * P, MADV_DONTNEED)
    assert p.read(a, 3) == bytes(3) and p.read(a + 2 * P, 3) == b"abc"
    assert p.statistics().anon_pages == 1
    assert p.kernel.memory_statistics().pages_in_use == 1
    assert p.pagemap(a + P) == 0


def test_dontneed_shared_keeps_the_page_cache(p):
    a = p.mmap(0, P, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.write(a, b"shared")
    p.madvise(a, P, MADV_DONTNEED)
    assert p.pagemap(a) == 0
    assert p.read(a, 6) == b"shared"


def test_dontneed_frees_page_of_cow_only_on_this_side(p):
    a = p.mmap(0, P)
    p.write(a, b"both")
    c = p.fork()
    c.madvise(a, P, MADV_DONTNEED)
    assert c.read(a, 4) == bytes(4) and p.read(a, 4) == b"both"
    folio = p.mm.phys.mem_map[p.pagemap(a) & ((1 << 55) - 1)]
    assert folio.mapcount == 1 and folio.refcount == 1
    c.check()


@pytest.mark.parametrize("advice,flag", [(MADV_DONTFORK, VM_DONTCOPY),
                                         (MADV_WIPEONFORK, VM_WIPEONFORK),
                                         (MADV_RANDOM, VM_RAND_READ),
                                         (MADV_SEQUENTIAL, VM_SEQ_READ)])
def test_flag_advice_sets_vm_flags_on_the_range(p, advice, flag):
    a = p.mmap(0, 3 * P)
    p.madvise(a + P, P, advice)
    assert [bool(v.vm_flags & flag) for v in p.mm.vmas] == [False, True, False]


def test_dofork_keeponfork_normal_undo(p):
    a = p.mmap(0, 2 * P)
    p.madvise(a, 2 * P, MADV_DONTFORK)
    p.madvise(a, 2 * P, MADV_WIPEONFORK)
    p.madvise(a, 2 * P, MADV_RANDOM)
    assert "dc" in p.smaps() and "wf" in p.smaps() and " rr " in p.smaps()
    p.madvise(a, 2 * P, MADV_DOFORK)
    p.madvise(a, 2 * P, MADV_KEEPONFORK)
    p.madvise(a, 2 * P, MADV_NORMAL)
    flags = p.mm.vmas.vma_lookup(a).vm_flags
    assert not flags & (VM_DONTCOPY | VM_WIPEONFORK | VM_RAND_READ)


def test_wipeonfork_on_shared_is_einval(p):
    a = p.mmap(0, P, RW, MAP_SHARED | MAP_ANONYMOUS)
    assert errno_of(p.madvise, a, P, MADV_WIPEONFORK) == errno.EINVAL


def test_hole_is_enomem_after_advising_the_mapped_parts(p):
    a = p.mmap(0, 3 * P)
    p.write(a, b"x")
    p.write(a + 2 * P, b"y")
    p.munmap(a + P, P)
    assert errno_of(p.madvise, a, 3 * P, MADV_DONTNEED) == errno.ENOMEM
    assert p.read(a, 1) == b"\0" and p.read(a + 2 * P, 1) == b"\0"
    assert errno_of(p.madvise, a - 4 * P, P, MADV_WILLNEED) == errno.ENOMEM


@pytest.mark.parametrize("advice", [-1, 5, 99, 1000])
def test_unknown_advice_is_einval(p, advice):
    a = p.mmap(0, P)
    assert errno_of(p.madvise, a, P, advice) == errno.EINVAL
    assert errno_of(p.madvise, a, 0, advice) == errno.EINVAL


def test_unaligned_and_wrapping_are_einval(p):
    a = p.mmap(0, P)
    assert errno_of(p.madvise, a + 1, P, MADV_DONTNEED) == errno.EINVAL
    assert errno_of(p.madvise, a, -1, MADV_DONTNEED) == errno.EINVAL
    assert errno_of(p.madvise, a, (1 << 64) - P, MADV_DONTNEED) == errno.EINVAL


def test_zero_length_is_a_no_op(p):
    p.madvise(0x1000_0000, 0, MADV_DONTNEED)


def test_ksm_advice_sets_mergeable_on_private_vmas_only(p):
    """As on 6.18 (tests/differential/test_kernel_madvise_matrix.py): never an error."""
    a = p.mmap(0, 3 * P)
    s = p.mmap(0, P, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.madvise(a + P, P, MADV_MERGEABLE)
    assert [bool(v.vm_flags & VM_MERGEABLE) for v in p.mm.vmas if v.vm_start < a + 3 * P
            and v.vm_end > a] == [False, True, False]
    assert " mg " in p.smaps()
    p.madvise(s, P, MADV_MERGEABLE)  # shared: ignored
    assert not p.mm.vmas.vma_lookup(s).vm_flags & VM_MERGEABLE
    p.madvise(a, 3 * P, MADV_UNMERGEABLE)
    assert not any(v.vm_flags & VM_MERGEABLE for v in p.mm.vmas)
