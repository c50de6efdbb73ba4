"""Swap: devices and counts, MADV_PAGEOUT and read-back, fork, shmem, uffd-wp, /proc views.

Every scenario ends (and most steps end) with ``check()``, which verifies
that each slot's swap count equals the swap PTEs plus shmem entries naming
it and that no slot, swap-cache folio or stored page leaks.
"""

from __future__ import annotations

import errno

import pytest
from swap_helpers import fill, page, pte

from vmemu import (
    MADV_COLD,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_PAGEOUT,
    MADV_WILLNEED,
    MAP_ANONYMOUS,
    MAP_LOCKED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
)
from vmemu.backends import MemoryPageStore, PageStore
from vmemu.mmu.folio import PhysMem
from vmemu.mmu.pgtable import (
    _PAGE_RW,
    _PAGE_UFFD_WP,
    MAX_SWAPFILES,
    is_real_swap_pte,
    is_uffd_wp_marker,
    pte_mkuffd_wp,
    pte_present,
    pte_swp_exclusive,
    pte_swp_uffd_wp,
    swp_entry,
    swp_offset,
    swp_type,
)
from vmemu.mmu.proc import PM_FILE, PM_PFRAME_MASK, PM_PRESENT, PM_SWAP, PM_UFFD_WP
from vmemu.mmu.swapfile import get_swap_space, swapon
from vmemu.mmu.vma import VM_HUGETLB, VM_UFFD_WP

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
SHARED_ANON = MAP_SHARED | MAP_ANONYMOUS


def smaps_kb(p, addr: int, field: str) -> int:
    text = p.smaps()
    head = f"{addr:08x}-"
    block = text[text.index(head):]
    line = next(ln for ln in block.splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1])


@pytest.fixture
def k():
    kernel = Kernel()
    kernel.swapon(pages=64)
    yield kernel
    kernel.check()


# -- the device: slots and counts ------------------------------------------------


def test_slots_counts_and_free_release_the_store():
    phys = PhysMem()
    store = MemoryPageStore()
    t = swapon(phys, store, pages=3)
    space = phys.swap
    entries = [space.get_swap_page() for _ in range(3)]
    assert [swp_offset(e) for e in entries] == [1, 2, 3]  # slot 0 is the header
    assert all(swp_type(e) == t for e in entries)
    assert space.get_swap_page() is None  # full
    for e in entries:
        space.swap_duplicate(e)
    space.swap_duplicate(entries[0])
    assert space.swap_count(entries[0]) == 2
    store.store((t, 1), b"a" * P)
    space.swap_free(entries[0])
    assert space.swap_count(entries[0]) == 1 and (t, 1) in store
    space.swap_free(entries[0])
    assert (t, 1) not in store
    assert space.nr_swap_pages() == 1
    assert space.get_swap_page() == entries[0]  # the freed slot comes back

def test_check_catches_a_leaked_slot():
    phys = PhysMem()
    swapon(phys, pages=2)
    e = phys.swap.get_swap_page()
    phys.swap.swap_duplicate(e)
    with pytest.raises(AssertionError, match="swap count 1 but 0 references"):
        phys.swap._check([])


def test_swapon_types_priorities_and_errors():
    k = Kernel()
    assert k.swapon(pages=1) == 0
    assert k.swapon(pages=1) == 1
    assert k.swapon(pages=1, priority=5) == 2
    space = get_swap_space(k.phys)
    assert [si.prio for si in space.swap_info] == [-2, -3, 5]
    assert [si.type for si in space.active()] == [2, 0, 1]  # highest priority first
    with pytest.raises(OSError) as ei:
        k.swapon(pages=0)
    assert ei.value.errno == errno.EINVAL
    for _ in range(MAX_SWAPFILES - 3):
        k.swapon(pages=1)
    with pytest.raises(OSError) as ei:
        k.swapon(pages=1)
    assert ei.value.errno == errno.EPERM
    k.swapoff(1)
    assert k.swapon(pages=1) == 1  # the freed type is reused
    with pytest.raises(OSError) as ei:
        k.swapoff(99)
    assert ei.value.errno == errno.EINVAL


def test_memory_page_store_is_a_page_store():
    s = MemoryPageStore()
    assert isinstance(s, PageStore)
    s.store("k", b"x" * 10)
    s.store("k", b"y" * 20)
    assert s.load("k") == b"y" * 20
    s.erase("k")
    s.erase("k")
    st = s.statistics()
    assert (st.pages, st.stored_bytes, st.stores, st.loads, st.erases) == (0, 0, 2, 1, 1)


# -- private anonymous memory --------------------------------------------------------


def test_pageout_then_read_back_anon(k):
    p = k.spawn()
    a = p.mmap(0, 4 * P)
    fill(p, a, 4)
    p.madvise(a, 4 * P, MADV_PAGEOUT)
    p.check()
    for i in range(4):
        e = pte(p, a + i * P)
        assert is_real_swap_pte(e) and pte_swp_exclusive(e) and not pte_swp_uffd_wp(e)
    assert k.memory_statistics().pages_in_use == 0
    st = k.swap_statistics()
    assert (st.used_slots, st.pswpout, st.swap_cache) == (4, 4, 0)
    for i in range(4):
        assert p.read(a + i * P, P) == page(i)
        p.check()
    assert k.swap_statistics().pswpin == 4


def test_exclusive_swap_in_is_mapped_writable_and_keeps_the_slot_until_written(k):
    p = k.spawn()
    a = p.mmap(0, P)
    p.write(a, page(1))
    p.madvise(a, P, MADV_PAGEOUT)
    assert p.read(a, 8) == page(1)[:8]
    e = pte(p, a)
    assert pte_present(e) and e & _PAGE_RW  # exclusive: no COW fault needed for the write
    assert k.swap_statistics().swap_cache == 1  # read fault: the clean copy stays in swap
    p.check()
    faults = p.statistics().faults
    p.write(a, b"new")
    assert p.statistics().faults == faults
    p.madvise(a, P, MADV_PAGEOUT)  # dirty again: written to the same slot
    p.check()
    assert p.read(a, 3) == b"new"
    assert k.swap_statistics().pswpout == 2


def test_write_fault_on_swap_frees_the_slot(k):
    p = k.spawn()
    a = p.mmap(0, P)
    p.write(a, page(3))
    p.madvise(a, P, MADV_PAGEOUT)
    p.write(a + 8, b"w")
    st = k.swap_statistics()
    assert (st.used_slots, st.swap_cache) == (0, 0)  # should_try_to_free_swap
    assert p.read(a, 9) == page(3)[:8] + b"w"
    p.check()


def test_pageout_without_swap_keeps_anon_pages():
    p = Kernel().spawn()
    a = p.mmap(0, 2 * P)
    fill(p, a, 2)
    p.madvise(a, 2 * P, MADV_PAGEOUT)
    assert all(pte_present(pte(p, a + i * P)) for i in range(2))
    assert p.read(a, P) == page(0)
    p.check()


def test_pageout_skips_shared_cow_pages_and_the_zero_page(k):
    p = k.spawn()
    a = p.mmap(0, 2 * P)
    p.write(a, page(0))
    p.read(a + P, 1)  # zero page
    c = p.fork()
    p.madvise(a, 2 * P, MADV_PAGEOUT)  # mapcount 2: not this process's alone
    assert pte_present(pte(p, a)) and pte_present(pte(p, a + P))
    k.check()
    c.exit()


def test_swap_full_leaves_the_rest_present():
    k = Kernel()
    k.swapon(pages=2)
    p = k.spawn()
    a = p.mmap(0, 4 * P)
    fill(p, a, 4)
    p.madvise(a, 4 * P, MADV_PAGEOUT)
    kinds = [is_real_swap_pte(pte(p, a + i * P)) for i in range(4)]
    assert kinds == [True, True, False, False]
    assert [p.read(a + i * P, P) for i in range(4)] == [page(i) for i in range(4)]
    k.check()


def test_two_devices_fill_by_priority():
    k = Kernel()
    low = k.swapon(pages=8)
    high = k.swapon(pages=1, priority=10)
    p = k.spawn()
    a = p.mmap(0, 2 * P)
    fill(p, a, 2)
    p.madvise(a, 2 * P, MADV_PAGEOUT)
    assert [swp_type(pte(p, a + i * P)) for i in range(2)] == [high, low]
    k.check()
    assert p.read(a, 2 * P) == page(0) + page(1)


# -- fork ------------------------------------------------------------------------


def test_swap_entries_survive_fork_with_count_two_then_cow(k):
    p = k.spawn()
    a = p.mmap(0, 2 * P)
    fill(p, a, 2)
    p.madvise(a, 2 * P, MADV_PAGEOUT)
    c = p.fork()
    k.check()
    for proc in (p, c):
        e = pte(proc, a)
        assert is_real_swap_pte(e) and not pte_swp_exclusive(e)
        assert proc.mm.swap_count(e) == 2
    assert pte(p, a) == pte(c, a)
    assert smaps_kb(p, a, "Swap") == 8 and smaps_kb(p, a, "SwapPss") == 4
    # the parent reads: shared, so read-only; the child writes: a private copy
    assert p.read(a, P) == page(0)
    assert not pte(p, a) & _PAGE_RW
    k.check()
    c.write(a, b"child")
    k.check()
    assert c.read(a, 5) == b"child" and p.read(a, P) == page(0)
    # the child writes the second page straight from swap: COW on the fault
    c.write(a + P, b"kid")
    p.write(a + P + 8, b"parent")
    k.check()
    assert c.read(a + P, 3) == b"kid" and c.read(a + P + 8, 6) == page(1)[8:14]
    assert p.read(a + P, 8) == page(1)[:8] and p.read(a + P + 8, 6) == b"parent"
    c.exit()
    p.exit()
    k.check()
    assert k.swap_statistics().used_slots == 0
    assert k.memory_statistics().pages_in_use == 0


def test_exit_and_munmap_and_dontneed_free_slots(k):
    p = k.spawn()
    a = p.mmap(0, 6 * P)
    fill(p, a, 6)
    p.madvise(a, 6 * P, MADV_PAGEOUT)
    p.madvise(a, 2 * P, MADV_DONTNEED)
    assert k.swap_statistics().used_slots == 4
    assert p.read(a, 8) == bytes(8)
    p.munmap(a + 2 * P, 2 * P)
    assert k.swap_statistics().used_slots == 2
    p.check()
    p.exit()
    assert k.swap_statistics().used_slots == 0


def test_mprotect_keeps_swap_entries(k):
    p = k.spawn()
    a = p.mmap(0, P)
    p.write(a, page(5))
    p.madvise(a, P, MADV_PAGEOUT)
    p.mprotect(a, P, PROT_READ)
    assert is_real_swap_pte(pte(p, a))
    assert p.read(a, P) == page(5)
    assert not pte(p, a) & _PAGE_RW
    p.check()


# -- shmem ---------------------------------------------------------------------------


def test_shared_anon_pageout_goes_from_the_page_cache(k):
    p = k.spawn()
    s = p.mmap(0, 3 * P, RW, SHARED_ANON)
    fill(p, s, 2)
    p.madvise(s, 3 * P, MADV_PAGEOUT)
    p.check()
    inode = p.mm.vmas.vma_lookup(s).vm_file
    assert sorted(inode.swapped) == [0, 1] and not inode.pages
    assert pte(p, s) == 0  # file pages leave no swap PTE
    assert smaps_kb(p, s, "Swap") == 8 and smaps_kb(p, s, "SwapPss") == 0
    c = p.fork()
    assert c.read(s + P, P) == page(1)  # the child's fault swaps it into the page cache
    k.check()
    c.write(s, b"from child")
    assert p.read(s, 10) == b"from child"
    assert smaps_kb(p, s, "Swap") == 0
    k.check()
    c.exit()


def test_shmem_mapped_twice_is_not_paged_out(k):
    p = k.spawn()
    s = p.mmap(0, P, RW, SHARED_ANON)
    p.write(s, b"x")
    c = p.fork()
    c.read(s, 1)
    p.madvise(s, P, MADV_PAGEOUT)
    assert pte_present(pte(p, s))
    k.check()


def test_shmem_without_swap_is_unmapped_and_stays_cached_if_dirty():
    """As on 6.18 (tests/differential/test_kernel_shmem_sequences.py): reclaim unmaps the
    page first; a written one then stays in the page cache, a never-written one is dropped."""
    p = Kernel().spawn()
    s = p.mmap(0, 2 * P, RW, SHARED_ANON)
    p.write(s, b"x")
    p.read(s + P, 1)  # a clean zero page in the cache
    inode = p.mm.vmas.vma_lookup(s).vm_file
    assert sorted(inode.pages) == [0, 1]
    p.madvise(s, 2 * P, MADV_PAGEOUT)
    assert not pte_present(pte(p, s)) and not pte_present(pte(p, s + P))
    assert sorted(inode.pages) == [0]
    assert p.read(s, 1) == b"x" and p.read(s + P, 1) == b"\0"
    p.check()


def test_private_shmem_mapping_cow_copy_is_anon_swap(k):
    p = k.spawn()
    s = p.mmap(0, 2 * P, RW, SHARED_ANON)
    fill(p, s, 2)
    inode = p.mm.vmas.vma_lookup(s).vm_file
    q = k.spawn()
    # a private mapping of the same inode, as a file mapping would give
    addr = q.mm.mmap(0, 2 * P, RW, MAP_PRIVATE, inode, 0)
    q.write(addr, b"cow")
    q.madvise(addr, 2 * P, MADV_PAGEOUT)
    k.check()
    assert is_real_swap_pte(pte(q, addr))
    assert not q.pagemap(addr) & PM_FILE
    assert q.read(addr, 3) == b"cow" and q.read(addr + P, P) == page(1)
    k.check()


def test_truncate_frees_shmem_swap(k):
    p = k.spawn()
    s = p.mmap(0, 2 * P, RW, SHARED_ANON)
    fill(p, s, 2)
    p.madvise(s, 2 * P, MADV_PAGEOUT)
    assert k.swap_statistics().shmem_swapped == 2
    p.munmap(s, 2 * P)  # last mapping of /dev/zero: the inode goes
    st = k.swap_statistics()
    assert (st.used_slots, st.shmem_swapped) == (0, 0)
    p.check()


# -- uffd-wp and exclusivity bits ------------------------------------------------------


def test_uffd_wp_bit_survives_swap_out_and_in(k):
    p = k.spawn()
    a = p.mmap(0, P)
    p.write(a, page(2))
    vma = p.mm.vmas.vma_lookup(a)
    vma.vm_flags |= VM_UFFD_WP  # registered by hand: the uffd layer is not involved here
    table = p.mm.pgtables.pte_table(a, False)
    idx = (a // P) % 512
    table[idx] = pte_mkuffd_wp(table[idx])
    p.mm.tlb.flush_page(a)
    p.madvise(a, P, MADV_PAGEOUT)
    e = pte(p, a)
    assert pte_swp_uffd_wp(e) and pte_swp_exclusive(e)
    pm = p.pagemap(a)
    assert pm & PM_SWAP and pm & PM_UFFD_WP and not pm & PM_PRESENT
    p.check()
    assert p.read(a, P) == page(2)
    e = pte(p, a)
    assert e & _PAGE_UFFD_WP and not e & _PAGE_RW  # still write-protected
    assert p.pagemap(a) & PM_UFFD_WP
    p.check()
    vma.vm_flags &= ~VM_UFFD_WP  # unregistered: the write is no userfault, and do_wp_page
    p.write(a, b"z")  # reuses the page keeping the stale bit (Linux 6.18 does: pagemap shows it)
    e = pte(p, a)
    assert e & _PAGE_RW and e & _PAGE_UFFD_WP
    p.check()


def test_uffd_wp_bit_survives_fork_only_with_the_registration(k):
    p = k.spawn()
    a = p.mmap(0, P)
    p.write(a, b"a")
    table = p.mm.pgtables.pte_table(a, False)
    idx = (a // P) % 512
    table[idx] = pte_mkuffd_wp(table[idx])
    p.madvise(a, P, MADV_PAGEOUT)
    c = p.fork()  # no uffd context: the child loses uffd-wp (dup_userfaultfd)
    assert pte_swp_uffd_wp(pte(p, a)) and not pte_swp_uffd_wp(pte(c, a))
    k.check()
    c.exit()


def test_shmem_uffd_wp_leaves_a_marker(k):
    p = k.spawn()
    s = p.mmap(0, P, RW, SHARED_ANON)
    p.write(s, b"m")
    vma = p.mm.vmas.vma_lookup(s)
    vma.vm_flags |= VM_UFFD_WP
    table = p.mm.pgtables.pte_table(s, False)
    idx = (s // P) % 512
    table[idx] = pte_mkuffd_wp(table[idx])
    p.madvise(s, P, MADV_PAGEOUT)
    assert is_uffd_wp_marker(pte(p, s))
    p.check()
    vma.vm_flags &= ~VM_UFFD_WP
    assert p.read(s, 1) == b"m"
    p.check()


# -- /proc views ---------------------------------------------------------------------


def test_pagemap_swapped_bit_type_and_offset():
    k = Kernel()
    k.swapon(pages=1)
    t = k.swapon(pages=8)
    p = k.spawn()
    a = p.mmap(0, 3 * P)
    fill(p, a, 3)
    p.madvise(a, 3 * P, MADV_PAGEOUT)
    got = []
    for i in range(3):
        pm = p.pagemap(a + i * P)
        assert pm & PM_SWAP and not pm & (PM_PRESENT | PM_FILE)
        frame = pm & PM_PFRAME_MASK
        got.append((frame & 31, frame >> 5))
        e = pte(p, a + i * P)
        assert (swp_type(e), swp_offset(e)) == got[-1]
    assert got == [(0, 1), (t, 1), (t, 2)]
    k.check()


def test_smaps_swap_and_swap_pss(k):
    p = k.spawn()
    a = p.mmap(0, 4 * P)
    fill(p, a, 4)
    p.madvise(a, 3 * P, MADV_PAGEOUT)
    assert smaps_kb(p, a, "Swap") == 12 and smaps_kb(p, a, "SwapPss") == 12
    assert smaps_kb(p, a, "Rss") == 4
    c = p.fork()
    assert smaps_kb(c, a, "Swap") == 12 and smaps_kb(c, a, "SwapPss") == 6
    c.read(a, 1)  # one page back in the child: its slot still counts for the parent
    assert smaps_kb(c, a, "Swap") == 8
    assert smaps_kb(c, a, "SwapPss") == 4
    assert smaps_kb(p, a, "SwapPss") == 4 + 2 + 2  # one slot now the parent's alone
    k.check()
    c.exit()


# -- advice: errors, MADV_WILLNEED, MADV_COLD, MADV_FREE ---------------------------------


def test_cold_and_pageout_refuse_locked_and_hugetlb_vmas(k):
    p = k.spawn()
    a = p.mmap(0, P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED)
    for advice in (MADV_PAGEOUT, MADV_COLD):
        with pytest.raises(OSError) as ei:
            p.madvise(a, P, advice)
        assert ei.value.errno == errno.EINVAL
    b = p.mmap(0, P)
    p.mm.vmas.vma_lookup(b).vm_flags |= VM_HUGETLB
    with pytest.raises(OSError) as ei:
        p.madvise(b, P, MADV_PAGEOUT)
    assert ei.value.errno == errno.EINVAL
    p.mm.vmas.vma_lookup(b).vm_flags &= ~VM_HUGETLB
    p.madvise(a, P, MADV_WILLNEED)  # WILLNEED has no such rule


def test_pageout_reports_enomem_for_holes_after_advising(k):
    p = k.spawn()
    a = p.mmap(0, 3 * P)
    fill(p, a, 3)
    p.munmap(a + P, P)
    with pytest.raises(OSError) as ei:
        p.madvise(a, 3 * P, MADV_PAGEOUT)
    assert ei.value.errno == errno.ENOMEM
    assert is_real_swap_pte(pte(p, a)) and is_real_swap_pte(pte(p, a + 2 * P))
    p.check()


def test_willneed_reads_ahead_into_the_swap_cache(k):
    p = k.spawn()
    a = p.mmap(0, 3 * P)
    fill(p, a, 3)
    s = p.mmap(0, 2 * P, RW, SHARED_ANON)
    fill(p, s, 2, base=10)
    p.madvise(a, 3 * P, MADV_PAGEOUT)
    p.madvise(s, 2 * P, MADV_PAGEOUT)
    p.madvise(a, 2 * P, MADV_WILLNEED)
    p.madvise(s, P, MADV_WILLNEED)
    st = k.swap_statistics()
    assert (st.swap_cache, st.pswpin) == (3, 3)
    assert is_real_swap_pte(pte(p, a))  # read ahead, not mapped
    p.check()
    assert p.read(a, P) == page(0) and p.read(a + P, P) == page(1)
    assert p.read(s, P) == page(10)
    assert k.swap_statistics().pswpin == 3  # served from the cache
    assert p.read(a + 2 * P, P) == page(2)
    assert k.swap_statistics().pswpin == 4
    p.check()


def test_willneed_cache_is_dropped_when_the_entry_goes(k):
    p = k.spawn()
    a = p.mmap(0, P)
    p.write(a, b"q")
    p.madvise(a, P, MADV_PAGEOUT)
    p.madvise(a, P, MADV_WILLNEED)
    p.madvise(a, P, MADV_DONTNEED)
    st = k.swap_statistics()
    assert (st.swap_cache, st.used_slots) == (0, 0)
    assert k.memory_statistics().pages_in_use == 0
    p.check()


def test_lazyfree_pages_are_discarded_even_without_swap():
    for with_swap in (False, True):
        k = Kernel()
        if with_swap:
            k.swapon(pages=8)
        p = k.spawn()
        a = p.mmap(0, 3 * P)
        fill(p, a, 3)
        p.madvise(a, 3 * P, MADV_FREE)
        p.write(a + 2 * P, b"again")  # redirtied: kept
        p.madvise(a, 3 * P, MADV_PAGEOUT)
        assert pte(p, a) == 0 and pte(p, a + P) == 0
        assert p.read(a, P) == bytes(P)
        assert p.read(a + 2 * P, 5) == b"again"
        st = k.swap_statistics()
        assert st.pglazyfreed == 2 and st.pswpout == 0
        assert pte_present(pte(p, a + 2 * P))  # redirtied: swapbacked again, kept this time
        p.madvise(a + 2 * P, P, MADV_PAGEOUT)  # ... and an ordinary anon page from now on
        assert is_real_swap_pte(pte(p, a + 2 * P)) == with_swap
        assert p.read(a + 2 * P, 5) == b"again"
        k.check()


def test_write_populate_and_mlock_redirty_lazyfree_pages():
    """GUP's FOLL_TOUCH|FOLL_WRITE marks a present folio dirty: reclaim keeps it (6.18)."""
    from vmemu import MADV_POPULATE_READ, MADV_POPULATE_WRITE

    k = Kernel()
    p = k.spawn()
    a = p.mmap(0, 4 * P)
    fill(p, a, 4)
    want = [p.read(a + i * P, P) for i in range(4)]
    p.madvise(a, 4 * P, MADV_FREE)
    p.madvise(a + P, P, MADV_POPULATE_WRITE)
    p.madvise(a + 2 * P, P, MADV_POPULATE_READ)  # a read populate does not
    p.mlock(a + 3 * P, P)  # populate_vma_page_range: FOLL_TOUCH|FOLL_WRITE on a private VMA
    p.munlock(a + 3 * P, P)
    p.madvise(a, 4 * P, MADV_PAGEOUT)
    got = [p.read(a + i * P, P) for i in range(4)]
    assert got == [bytes(P), want[1], bytes(P), want[3]]
    k.check()


def test_cold_clears_accessed_bits(k):
    p = k.spawn()
    a = p.mmap(0, 2 * P)
    fill(p, a, 2)
    assert smaps_kb(p, a, "Referenced") == 8
    p.madvise(a, 2 * P, MADV_COLD)
    assert smaps_kb(p, a, "Referenced") == 0
    assert list(get_swap_space(k.phys).cold)  # first in line for reclaim
    p.read(a, 1)
    assert smaps_kb(p, a, "Referenced") == 4
    p.check()


def test_swapoff_brings_everything_back(k):
    t2 = k.swapon(pages=16, priority=100)
    p = k.spawn()
    a = p.mmap(0, 3 * P)
    fill(p, a, 3)
    s = p.mmap(0, P, RW, SHARED_ANON)
    p.write(s, b"shm")
    p.madvise(a, 3 * P, MADV_PAGEOUT)
    p.madvise(s, P, MADV_PAGEOUT)
    c = p.fork()
    p.madvise(a, P, MADV_WILLNEED)
    assert all(swp_type(pte(p, a + i * P)) == t2 for i in range(3))
    k.swapoff(t2)
    k.check()
    assert all(pte_present(pte(proc, a + i * P)) for proc in (p, c) for i in range(3))
    assert k.swap_statistics().used_slots == 0
    assert [c.read(a + i * P, P) for i in range(3)] == [page(i) for i in range(3)]
    assert p.read(s, 3) == b"shm"
    k.check()


def test_bad_swap_entry_is_sigbus(k):
    from vmemu import Sigbus

    p = k.spawn()
    a = p.mmap(0, P)
    p.write(a, b"x")
    p.madvise(a, P, MADV_DONTNEED)
    table = p.mm.pgtables.pte_table(a, False)
    table[(a // P) % 512] = swp_entry(7, 3)  # a device that does not exist
    with pytest.raises(Sigbus):
        p.read(a, 1)
    table[(a // P) % 512] = 0
