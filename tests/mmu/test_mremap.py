"""mremap: errnos, contents, entries moved (not copied), rmap, fork, DONTUNMAP, THP, uffd hooks."""

from __future__ import annotations

import errno

import pytest

from vmemu import MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, Process
from vmemu.constants import (
    MADV_DONTNEED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
)
from vmemu.errors import Sigbus
from vmemu.mmu.pgtable import _PAGE_PSE, _PAGE_UFFD_WP, UFFD_WP_MARKER, pte_pfn
from vmemu.mmu.vma import VM_LOCKED, VM_UFFD_WP

P = PAGE_SIZE
MAY, FIX, DU = MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP
PA = MAP_PRIVATE | MAP_ANONYMOUS
SA = MAP_SHARED | MAP_ANONYMOUS
RW = PROT_READ | PROT_WRITE
DST = 0x500000000


@pytest.fixture
def p():
    proc = Process()
    yield proc
    proc.check()
    proc.exit()


def filled(p: Process, n: int, flags: int = PA, addr: int = 0) -> int:
    a = p.mmap(addr, n * P, RW, flags | (MAP_FIXED if addr else 0))
    for i in range(n):
        p.write(a + i * P, bytes([i + 1]) * 8)
    return a


def pfns(p: Process, a: int, n: int) -> list[int]:
    return [pte_pfn(p.walk(a + i * P)[-1].entry) for i in range(n)]


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


# -- errnos, in the kernel's order --------------------------------------------------------

def test_errnos(p):
    a = filled(p, 4)
    r = p.mremap
    assert errno_of(r, a, P, P, 8) == errno.EINVAL
    assert errno_of(r, a + 1, P, P) == errno.EINVAL
    assert errno_of(r, a, P, 0) == errno.EINVAL
    assert errno_of(r, a, P, TASK_SIZE + P, MAY) == errno.EINVAL
    assert errno_of(r, a, P, P, FIX, DST) == errno.EINVAL
    assert errno_of(r, a, P, P, DU, DST) == errno.EINVAL
    assert errno_of(r, a, P, 2 * P, DU | MAY, DST) == errno.EINVAL
    assert errno_of(r, a, 2 * P, 2 * P, FIX | MAY, a + P) == errno.EINVAL  # overlap
    assert errno_of(r, a, P, P, FIX | MAY, DST + 1) == errno.EINVAL
    assert errno_of(r, a, P, P, FIX | MAY, TASK_SIZE) == errno.EINVAL
    assert errno_of(r, DST, P, 2 * P, MAY) == errno.EFAULT  # no VMA
    assert errno_of(r, a, 8 * P, 9 * P, MAY) == errno.EFAULT  # runs past the VMA
    assert errno_of(r, a, 2 * P, 3 * P) == errno.ENOMEM  # not at the end: cannot grow
    assert errno_of(r, a, 0, P, MAY) == errno.EINVAL  # old_len 0 on private
    p.mmap(a + 4 * P, P, PROT_READ, PA | MAP_FIXED)
    assert errno_of(r, a, 4 * P, 8 * P) == errno.ENOMEM  # blocked, no MAYMOVE
    # the no-new-address checks ignore new_addr entirely
    assert r(a, P, P, 0, 1 << 47) == a
    assert r(a, 8 * P, 8 * P, MAY) == a  # same size: a no-op even across VMAs


def test_failed_calls_change_nothing(p):
    a = filled(p, 4)
    before = p.maps(), pfns(p, a, 4)
    for args in [(a, 2 * P, 3 * P), (a, P, 2 * P, DU | MAY, DST), (a + P, 8 * P, 9 * P, MAY)]:
        with pytest.raises(OSError):
            p.mremap(*args)
        assert (p.maps(), pfns(p, a, 4)) == before
        p.check()


# -- moves move entries ---------------------------------------------------------------------

def test_move_keeps_pfns_and_frees_nothing(p):
    a = filled(p, 4)
    old = pfns(p, a, 4)
    used = p.kernel.memory_statistics().pages_in_use
    b = p.mremap(a, 4 * P, 4 * P, FIX | MAY, DST)
    assert b == DST
    assert pfns(p, b, 4) == old  # the same frames, now at the new address
    assert p.kernel.memory_statistics().pages_in_use == used  # nothing copied
    assert p.walk(a)[-1].entry == 0 or p.mm.vmas.vma_lookup(a) is None
    assert [p.read(b + i * P, 1)[0] for i in range(4)] == [1, 2, 3, 4]
    p.check()


def test_grow_in_place_then_move(p):
    a = filled(p, 2)
    assert p.mremap(a, 2 * P, 4 * P) == a
    assert p.read(a + 3 * P, 4) == bytes(4)
    p.mmap(a + 4 * P, P, PROT_READ, PA | MAP_FIXED)
    old = pfns(p, a, 2)
    b = p.mremap(a, 4 * P, 8 * P, MAY)
    assert b != a and pfns(p, b, 2) == old
    assert p.read(b, 1) == b"\x01" and p.read(b + P, 1) == b"\x02"
    p.write(b + 7 * P, b"end")
    p.check()


def test_shrink(p):
    a = filled(p, 4)
    assert p.mremap(a, 4 * P, P) == a
    assert p.mm.vmas.vma_lookup(a).vm_end == a + P
    p.check()


def test_cow_pages_survive_fork_then_mremap(p):
    a = filled(p, 4)
    child = p.fork()
    b = p.mremap(a, 4 * P, 4 * P, FIX | MAY, DST)
    p.check()
    p.write(b, b"parent")  # breaks COW at the new address
    assert child.read(a, 6) == bytes([1]) * 6
    assert p.read(b, 6) == b"parent"
    c = child.mremap(a, 4 * P, 8 * P, MAY)
    child.write(c + P, b"child")
    assert p.read(b + P, 5) == bytes([2]) * 5
    p.check()
    child.exit()


def test_moved_anon_folios_keep_their_index(p):
    a = filled(p, 2)
    folio = p.mm.phys.mem_map[pfns(p, a, 1)[0]]
    index = folio.index
    b = p.mremap(a, 2 * P, 2 * P, FIX | MAY, DST)
    vma = p.mm.vmas.vma_lookup(b)
    assert folio.index == index == vma.vm_pgoff  # rmap: vm_start + (index - pgoff)
    p.check()


def test_dontunmap_leaves_old_range_mapped_and_empty(p):
    a = filled(p, 3)
    old = pfns(p, a, 3)
    b = p.mremap(a, 3 * P, 3 * P, DU | FIX | MAY, DST)
    assert pfns(p, b, 3) == old
    assert all(p.walk(a + i * P)[-1].entry == 0 for i in range(3))
    assert p.read(a, 1) == b"\0"  # private anon refaults as zero
    p.check()
    vma = p.mm.vmas.vma_lookup(a)
    assert vma.anon_vma is None  # dontunmap_complete unlinked the whole moved VMA


def test_dontunmap_shared_refaults_from_the_page_cache(p):
    a = filled(p, 2, SA)
    b = p.mremap(a, 2 * P, 2 * P, DU | FIX | MAY, DST)
    assert p.read(a, 1) == p.read(b, 1) == b"\x01"
    p.write(b, b"Z")
    assert p.read(a, 1) == b"Z"


def test_dontunmap_unlocks_the_source(p):
    a = filled(p, 2)
    p.mlock(a, 2 * P)
    b = p.mremap(a, 2 * P, 2 * P, DU | FIX | MAY, DST)
    assert not p.mm.vmas.vma_lookup(a).vm_flags & VM_LOCKED
    assert p.mm.vmas.vma_lookup(b).vm_flags & VM_LOCKED


def test_shared_old_len_zero_duplicates(p):
    a = filled(p, 2, SA)
    b = p.mremap(a, 0, 2 * P, FIX | MAY, DST)
    assert p.read(b + P, 1) == b"\x02"
    p.write(b, b"dup")
    assert p.read(a, 3) == b"dup"
    assert p.mm.vmas.vma_lookup(a) is not None


def test_multi_vma_move_keeps_gaps(p):
    a = filled(p, 2, addr=0x400000000)
    filled(p, 2, SA, addr=0x400000000 + 3 * P)
    b = p.mremap(a, 5 * P, 5 * P, FIX | MAY, DST)
    assert b == DST
    lay = [(v.vm_start - DST, v.vm_end - DST) for v in p.mm.vmas if v.vm_start >= DST]
    assert lay == [(0, 2 * P), (3 * P, 5 * P)]
    assert p.read(DST + 4 * P, 1) == b"\x02"


def test_swap_like_entries_and_markers_move_as_they_are(p):
    a = filled(p, 3)
    table = p.mm.pgtables.pte_table(a, False)
    i = (a >> 12) & 511
    p.madvise(a + 2 * P, P, MADV_DONTNEED)
    table[i + 2] = UFFD_WP_MARKER  # a marker moves like any entry
    p.mm.vmas.vma_lookup(a).vm_flags |= VM_UFFD_WP
    b = p.mremap(a, 3 * P, 3 * P, FIX | MAY, DST)
    assert p.walk(b + 2 * P)[-1].entry == UFFD_WP_MARKER


def test_whole_pte_tables_move(p):
    a = p.mmap(0x600000000, 2 * PMD_SIZE, RW, PA | MAP_FIXED)
    for off in range(0, 2 * PMD_SIZE, 64 * P):
        p.write(a + off, b"x")
    table_pfn = p.walk(a)[-1].table_pfn
    b = p.mremap(a, 2 * PMD_SIZE, 2 * PMD_SIZE, FIX | MAY, 0x640000000)
    assert p.walk(b)[-1].table_pfn == table_pfn  # the PTE table itself moved
    assert p.read(b + 64 * P, 1) == b"x"


def test_thp_moves_whole_when_aligned_and_splits_otherwise(p):
    from vmemu.constants import MADV_HUGEPAGE

    a = p.mmap(0x600000000, 2 * PMD_SIZE, RW, PA | MAP_FIXED)
    p.madvise(a, 2 * PMD_SIZE, MADV_HUGEPAGE)
    p.write(a, b"huge")
    p.write(a + PMD_SIZE, b"huge2")
    leaf = p.walk(a)[-1]
    if not leaf.entry & _PAGE_PSE:
        pytest.skip("THP not enabled in this kernel model")
    b = p.mremap(a, 2 * PMD_SIZE, 2 * PMD_SIZE, FIX | MAY, 0x640000000)
    assert p.walk(b)[-1].entry == leaf.entry  # the huge PMD moved as one entry
    p.check()
    c = p.mremap(b + PMD_SIZE, PMD_SIZE, PMD_SIZE, FIX | MAY, 0x680000000 + P)
    assert not p.walk(c)[-1].entry & _PAGE_PSE  # unaligned destination: split, moved by PTE
    assert p.read(c, 5) == b"huge2" and p.read(b, 4) == b"huge"
    p.check()


def test_uffd_hooks(p):
    events = []

    class Ctx:
        def mremap_prep(self, vma):
            return True

        def event_remap(self, frm, to, length):
            events.append((frm, to, length))

        def mremap_fail(self):
            events.append("fail")

        def unmap_prep(self, *args):
            pass

    a = filled(p, 2)
    vma = p.mm.vmas.vma_lookup(a)
    vma.vm_userfaultfd_ctx = Ctx()
    b = p.mremap(a, 2 * P, 4 * P, MAY | FIX, DST)
    assert events == [(a, b, 2 * P)]


def test_uffd_without_event_remap_drops_registration_and_wp(p):
    class Ctx:
        def mremap_prep(self, vma):
            return False

        def unmap_prep(self, *args):
            pass

    a = filled(p, 2)
    vma = p.mm.vmas.vma_lookup(a)
    vma.vm_userfaultfd_ctx = Ctx()
    vma.vm_flags |= VM_UFFD_WP
    t = p.mm.pgtables.pte_table(a, False)
    t[(a >> 12) & 511] |= _PAGE_UFFD_WP
    b = p.mremap(a, 2 * P, 2 * P, MAY | FIX, DST)
    nv = p.mm.vmas.vma_lookup(b)
    assert nv.vm_userfaultfd_ctx is None and not nv.vm_flags & VM_UFFD_WP
    assert not p.walk(b)[-1].entry & _PAGE_UFFD_WP


def test_hwpoison_entry_moves(p):
    from vmemu.constants import MADV_HWPOISON

    a = filled(p, 2)
    with pytest.raises(Sigbus):
        p.madvise(a, P, MADV_HWPOISON)
    b = p.mremap(a, 2 * P, 2 * P, MAY | FIX, DST)
    with pytest.raises(Sigbus):
        p.read(b, 1)
    assert p.read(b + P, 1) == b"\x02"
