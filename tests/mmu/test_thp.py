"""Transparent huge pages: faults, splits, mapcounts, fork, MADV_COLLAPSE, /proc views.

Every scenario ends with ``check()`` so mapcounts of PMD- and PTE-mapped
parts are verified against the page tables and rmap.
"""

from __future__ import annotations

import errno

import pytest

from vmemu.constants import (
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.kernel import Kernel
from vmemu.mmu import proc
from vmemu.mmu.huge_memory import khugepaged_scan_mm
from vmemu.mmu.pgtable import _PAGE_PSE, _PAGE_RW, _PAGE_SPECIAL
from vmemu.mmu.proc import PM_FILE, PM_MMAP_EXCLUSIVE, PM_PFRAME_MASK, PM_PRESENT

MIB2 = PMD_SIZE


def _setup(policy: str = "madvise", advise: int | None = MADV_HUGEPAGE, size: int = 2 * MIB2):
    k = Kernel()
    k.thp_enabled = policy
    p = k.spawn()
    a = p.mmap(0, size)
    assert a % MIB2 == 0
    if advise is not None:
        p.madvise(a, size, advise)
    return k, p, a


def _pmd(p, addr: int) -> int:
    return p.mm.pgtables.walk(addr)[2].entry


def _is_huge(p, addr: int) -> bool:
    return bool(_pmd(p, addr) & _PAGE_PSE)


def _smaps_field(p, name: str) -> int:
    return sum(int(line.split()[1]) for line in proc.smaps(p.mm).splitlines()
               if line.startswith(name + ":"))


def test_write_fault_installs_pmd_leaf() -> None:
    k, p, a = _setup()
    p.write(a + 123, b"abc")
    assert _is_huge(p, a)
    folio = k.phys.mem_map[(_pmd(p, a) >> 12) & ((1 << 40) - 1)]
    assert folio.order == 9 and folio.entire_mapcount == 1 and folio.mapcount == 1
    assert p.read(a + 123, 3) == b"abc" and p.read(a + MIB2 - 1, 1) == b"\0"
    assert _smaps_field(p, "AnonHugePages") == 2048
    assert k.phys.vmstat["thp_fault_alloc"] == 1
    k.check()


@pytest.mark.parametrize("policy,advise", [("madvise", None), ("never", MADV_HUGEPAGE),
                                           ("always", MADV_NOHUGEPAGE)])
def test_no_thp_without_policy(policy: str, advise: int | None) -> None:
    k, p, a = _setup(policy, advise)
    p.write(a, b"x")
    assert not _is_huge(p, a)
    assert _smaps_field(p, "AnonHugePages") == 0
    k.check()


def test_always_policy_and_thpeligible() -> None:
    k, p, a = _setup("always", None)
    assert "THPeligible:           1" in proc.smaps(p.mm)
    p.write(a, b"x")
    assert _is_huge(p, a)
    k.thp_enabled = "never"
    assert "THPeligible:           0" in proc.smaps(p.mm)
    with pytest.raises(OSError) as e:
        k.thp_enabled = "sometimes"
    assert e.value.errno == errno.EINVAL


def test_read_fault_maps_huge_zero_page_then_write_allocates_thp() -> None:
    """As observed on 6.18: a read maps the huge zero page (present, PM_FILE, not
    exclusive, consecutive PFNs, in no smaps counter); a write then maps a THP
    (``do_huge_zero_wp_pmd``) without any split."""
    k, p, a = _setup()
    assert p.read(a + 5, 4) == b"\0" * 4
    assert _is_huge(p, a) and _pmd(p, a) & _PAGE_SPECIAL and not _pmd(p, a) & _PAGE_RW
    e0, e1 = p.pagemap(a), p.pagemap(a + PAGE_SIZE)
    assert e0 & PM_PRESENT and e0 & PM_FILE and not e0 & PM_MMAP_EXCLUSIVE
    assert (e1 & PM_PFRAME_MASK) == (e0 & PM_PFRAME_MASK) + 1
    assert _smaps_field(p, "Rss") == 0 and _smaps_field(p, "AnonHugePages") == 0
    assert k.phys.vmstat["thp_fault_alloc"] == 0
    k.check()
    p.write(a + 3 * PAGE_SIZE, b"x")
    assert _is_huge(p, a) and not _pmd(p, a) & _PAGE_SPECIAL
    assert p.read(a + 3 * PAGE_SIZE, 2) == b"x\0" and p.read(a, 1) == b"\0"
    assert _smaps_field(p, "AnonHugePages") == 2048
    assert p.pagemap(a) & PM_MMAP_EXCLUSIVE and not p.pagemap(a) & PM_FILE
    assert k.phys.vmstat["thp_fault_alloc"] == 1 and k.phys.vmstat["thp_split_pmd"] == 0
    k.check()


def test_huge_zero_page_off_read_allocates_thp() -> None:
    k, p, a = _setup()
    k.phys.thp_use_zero_page = False
    p.read(a, 1)
    assert _is_huge(p, a) and not _pmd(p, a) & _PAGE_SPECIAL
    assert _smaps_field(p, "AnonHugePages") == 2048
    k.check()


def test_huge_zero_page_write_without_thp_splits_to_zero_ptes() -> None:
    """No free huge page: the write falls back to a split into 4 KiB zero-page PTEs."""
    k, p, a = _setup()
    p.read(a, 1)
    k.phys.limit_pages = k.phys.pages_in_use + 8
    p.write(a + PAGE_SIZE, b"y")
    assert not _is_huge(p, a)
    assert p.pagemap(a) & PM_PRESENT and not p.pagemap(a) & PM_FILE  # the 4 KiB zero page
    assert p.read(a + PAGE_SIZE, 1) == b"y"
    assert k.phys.vmstat["thp_split_pmd"] == 1 and k.phys.vmstat["thp_fault_fallback"] == 1
    k.check()


@pytest.mark.parametrize("op", ["dontneed", "mprotect", "munmap"])
def test_partial_change_splits_huge_zero_page(op: str) -> None:
    """Part of a huge zero PMD changing splits it into 4 KiB zero-page PTEs (6.18: the
    untouched pages then show the 4 KiB zero page's PFN)."""
    k, p, a = _setup()
    p.madvise(a + MIB2, MIB2, MADV_NOHUGEPAGE)
    p.read(a + MIB2, 1)  # an ordinary 4 KiB zero page to compare PFNs with
    zero_pfn = p.pagemap(a + MIB2) & PM_PFRAME_MASK
    p.read(a, 1)
    if op == "dontneed":
        p.madvise(a, PAGE_SIZE, MADV_DONTNEED)
    elif op == "mprotect":
        p.mprotect(a, PAGE_SIZE, PROT_READ)
    else:
        p.munmap(a, PAGE_SIZE)
    assert not _is_huge(p, a + PAGE_SIZE)
    assert p.pagemap(a + PAGE_SIZE) & PM_PFRAME_MASK == zero_pfn
    assert k.phys.vmstat["thp_split_pmd"] == 1 and _smaps_field(p, "Rss") == 0
    k.check()


def test_fork_shares_huge_zero_page() -> None:
    k, p, a = _setup()
    p.read(a, 1)
    child = p.fork()
    assert _is_huge(child, a) and _pmd(child, a) & _PAGE_SPECIAL
    child.write(a, b"c")
    assert p.read(a, 1) == b"\0" and child.read(a, 1) == b"c"
    assert _is_huge(p, a) and _pmd(p, a) & _PAGE_SPECIAL
    k.check()
    child.exit()
    p.munmap(a, MIB2)
    k.check()


def test_unaligned_range_falls_back() -> None:
    k = Kernel()
    p = k.spawn()
    a = p.mmap(0, MIB2 + PAGE_SIZE)  # not a multiple of 2 MiB: not aligned
    p.madvise(a, MIB2 + PAGE_SIZE, MADV_HUGEPAGE)
    p.write(a, b"x")
    covers = (a + MIB2 - 1) & ~(MIB2 - 1)
    assert _is_huge(p, a) == (covers + MIB2 <= a + MIB2 + PAGE_SIZE and covers == a)
    k.check()


def test_partial_munmap_splits_pmd_and_folio() -> None:
    k, p, a = _setup()
    p.write(a, b"A" * PAGE_SIZE)
    p.write(a + 5 * PAGE_SIZE, b"B")
    in_use = k.memory_statistics().pages_in_use
    p.munmap(a + PAGE_SIZE, PAGE_SIZE)
    assert not _is_huge(p, a)
    assert k.phys.vmstat["thp_split_pmd"] == 1 and k.phys.vmstat["thp_split_page"] == 1
    # the folio is now 511 order-0 pages: the unmapped one is freed
    assert k.memory_statistics().pages_in_use == in_use - 1
    assert p.read(a, 1) == b"A" and p.read(a + 5 * PAGE_SIZE, 1) == b"B"
    k.check()


def test_mprotect_part_splits_pmd_keeps_folio() -> None:
    k, p, a = _setup()
    p.write(a, b"x")
    p.mprotect(a + 4 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    assert not _is_huge(p, a)
    pte = p.mm.pgtables.get_pte(a + 7 * PAGE_SIZE)
    folio = k.phys.mem_map[(pte >> 12) & ((1 << 40) - 1)]
    assert folio.order == 9 and folio.mapcount == 512 and folio.entire_mapcount == 0
    k.check()
    p.mprotect(a + 4 * PAGE_SIZE, PAGE_SIZE, PROT_READ | PROT_WRITE)
    p.write(a + 4 * PAGE_SIZE, b"y")
    k.check()


def test_mprotect_whole_pmd_keeps_it_huge() -> None:
    k, p, a = _setup()
    p.write(a, b"x")
    p.mprotect(a, MIB2, PROT_READ)
    assert _is_huge(p, a) and not _pmd(p, a) & 2
    p.mprotect(a, MIB2, PROT_READ | PROT_WRITE)
    p.write(a + 1, b"y")  # exclusive: writable again at once or after one reuse fault
    assert _is_huge(p, a)
    k.check()


def test_dontneed_whole_and_partial() -> None:
    k, p, a = _setup()
    p.write(a, b"x")
    p.write(a + MIB2, b"y")
    p.madvise(a, MIB2, MADV_DONTNEED)
    assert p.read(a, 1) == b"\0"
    p.madvise(a + MIB2 + PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED)
    assert p.read(a + MIB2, 1) == b"y"
    k.check()
    p.exit()
    assert k.memory_statistics().pages_in_use == 0


def test_fork_cow_splits_and_copies() -> None:
    k, p, a = _setup()
    p.write(a, b"parent")
    c = p.fork()
    k.check()
    folio = k.phys.mem_map[(_pmd(p, a) >> 12) & ((1 << 40) - 1)]
    assert folio.entire_mapcount == 2 and folio.refcount == 2
    c.write(a, b"child!")
    assert not _is_huge(c, a) and _is_huge(p, a)
    assert p.read(a, 6) == b"parent" and c.read(a, 6) == b"child!"
    k.check()
    c.exit()
    p.write(a + 10, b"z")  # the child is gone: the parent reuses its THP
    assert _is_huge(p, a)
    k.check()


def test_madv_collapse() -> None:
    k, p, a = _setup("never", None)
    for i in range(0, 512, 3):
        p.write(a + i * PAGE_SIZE, bytes([i % 251 + 1]))
    assert not _is_huge(p, a)
    p.madvise(a, MIB2, MADV_COLLAPSE)  # independent of the sysfs policy
    assert _is_huge(p, a)
    assert all(p.read(a + i * PAGE_SIZE, 1) == bytes([i % 251 + 1]) for i in range(0, 512, 3))
    assert p.read(a + PAGE_SIZE, 1) == b"\0"
    k.check()


def test_madv_collapse_errors() -> None:
    k, p, a = _setup("madvise", MADV_NOHUGEPAGE)
    p.write(a, b"x")
    with pytest.raises(OSError) as e:
        p.madvise(a, MIB2, MADV_COLLAPSE)
    assert e.value.errno == errno.EINVAL
    k2, p2, b = _setup("never", None)
    with pytest.raises(OSError) as e:  # nothing mapped: no PTE table (SCAN_PMD_NULL)
        p2.madvise(b, MIB2, MADV_COLLAPSE)
    assert e.value.errno == errno.EINVAL
    p2.write(b, b"x")
    k2.phys.limit_pages = k2.memory_statistics().pages_in_use + 10
    with pytest.raises(OSError) as e:
        p2.madvise(b, MIB2, MADV_COLLAPSE)
    assert e.value.errno == errno.ENOMEM
    k2.check()


def test_oom_falls_back_to_small_pages() -> None:
    k = Kernel(mem_limit_pages=100)
    p = k.spawn()
    a = p.mmap(0, MIB2)
    p.madvise(a, MIB2, MADV_HUGEPAGE)
    p.write(a, b"x")
    assert not _is_huge(p, a) and k.phys.vmstat["thp_fault_fallback"] == 1
    k.check()


def test_khugepaged_scan() -> None:
    k, p, a = _setup("never", MADV_HUGEPAGE)
    p.write(a, b"x")
    k.thp_enabled = "madvise"
    assert khugepaged_scan_mm(p.mm) == 1
    assert _is_huge(p, a) and p.read(a, 1) == b"x"
    k.check()


def test_pagemap_reports_subpages() -> None:
    k, p, a = _setup()
    p.write(a, b"x")
    base = (_pmd(p, a) >> 12) & ((1 << 40) - 1)
    for i in (0, 1, 511):
        e = proc.pagemap_entry(p.mm, a + i * PAGE_SIZE)
        assert e & proc.PM_PRESENT and e & proc.PM_PFRAME_MASK == base + i
        assert e & proc.PM_MMAP_EXCLUSIVE


def test_tlb_views_are_stable() -> None:
    k, p, a = _setup()
    p.write(a, b"x")
    f = k.phys.mem_map[(_pmd(p, a) >> 12) & ((1 << 40) - 1)]
    assert f.page_buffer(f.pfn + 3) is f.page_buffer(f.pfn + 3)
    for i in range(8):
        p.read(a + i * PAGE_SIZE, 1)
    k.check()


def test_dontneed_frees_emptied_pte_tables_so_a_thp_can_come_back() -> None:
    """CONFIG_PT_RECLAIM (x86-64, 6.14+): MADV_DONTNEED of a whole 2 MiB frees its empty PTE
    table, so the next write faults a THP again (tests/differential/test_kernel_thp_sequences)."""
    k, p, a = _setup()
    p.write(a, b"x")
    p.madvise(a, PAGE_SIZE, MADV_DONTNEED)  # splits the PMD: a PTE table now
    assert not _is_huge(p, a)
    tables = p.mm.pgtables.nr_tables
    p.madvise(a + PAGE_SIZE, MIB2 - PAGE_SIZE, MADV_DONTNEED)  # not the whole 2 MiB: kept
    assert p.mm.pgtables.nr_tables == tables
    p.madvise(a, MIB2, MADV_DONTNEED)
    assert p.mm.pgtables.nr_tables == tables - 1 and _pmd(p, a) == 0
    p.write(a + 5, b"y")
    assert _is_huge(p, a) and _smaps_field(p, "AnonHugePages") == 2048
    k.check()


def test_collapse_needs_an_anon_vma_and_an_aligned_start() -> None:
    """MADV_COLLAPSE as measured on 6.18: EINVAL in a VMA never faulted, even for 4 KiB at a
    PMD boundary (which is 0 once the VMA has an anon_vma: no PMD to collapse); a range
    inside one PMD that does not start at its boundary is EINVAL."""
    k, p, a = _setup(size=3 * MIB2)
    with pytest.raises(OSError) as e:
        p.madvise(a, PAGE_SIZE, MADV_COLLAPSE)
    assert e.value.errno == errno.EINVAL
    p.write(a + 2 * MIB2 + 5, b"x")
    p.madvise(a, PAGE_SIZE, MADV_COLLAPSE)
    with pytest.raises(OSError) as e:
        p.madvise(a + PAGE_SIZE, PAGE_SIZE, MADV_COLLAPSE)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        p.madvise(a, MIB2, MADV_COLLAPSE)  # nothing there to collapse
    assert e.value.errno == errno.EINVAL
    k.check()
