"""Transparent huge pages: PMD-mapped anonymous folios, splitting and collapsing.

Mirrors ``mm/huge_memory.c`` and ``mm/khugepaged.c`` for private anonymous
memory.

* **Policy**: ``kernel.thp_enabled`` is
  ``/sys/kernel/mm/transparent_hugepage/enabled`` (``always``, ``madvise``
  - the default here, as on most distributions - or ``never``).
  MADV_HUGEPAGE / MADV_NOHUGEPAGE set VM_HUGEPAGE / VM_NOHUGEPAGE. A VMA is
  eligible (:func:`thp_vma_allowable`, smaps ``THPeligible``) when it is
  private anonymous, not VM_NOHUGEPAGE, covers a 2 MiB-aligned 2 MiB range,
  and the policy is ``always`` or ``madvise`` with VM_HUGEPAGE.
* **Faults** (:func:`do_huge_pmd_anonymous_page`): a *write* fault on an
  empty PMD of an eligible range allocates an order-9 folio and maps it with
  one PMD leaf; allocation failure falls back to 4 KiB pages, as Linux does.
  A *read* fault maps the huge zero page with one special, read-only PMD
  leaf (``transparent_hugepage/use_zero_page``, on by default; off, a read
  allocates like a write). A later write replaces it with a fresh THP
  (``do_huge_zero_wp_pmd``, Linux 6.13+), or splits it into 4 KiB zero-page
  PTEs when no huge page can be had. smaps counts the huge zero page
  nowhere; pagemap shows it present, with PM_FILE, as 6.18 does.
* **userfaultfd**: in a VMA registered for MISSING, both read and write
  faults on an empty PMD reach ``handle_userfault`` from here, before
  anything is allocated: the PMD stays none, so a later UFFDIO_MOVE of a
  whole aligned 2 MiB moves a PMD instead of splitting. UFFDIO_WRITEPROTECT
  of a whole PMD sets uffd-wp in the PMD leaf (THP or huge zero page), and
  a write to it is a WP userfault from here (``wp_huge_pmd``); WP_ASYNC
  splits and resolves at PTE level; protecting part of it splits it.
* **COW**: fork shares the PMD write-protected; a write to it reuses the
  folio if nobody else maps it, otherwise splits the PMD and lets the 4 KiB
  path copy (``do_huge_pmd_wp_page``).
* **Splitting**: ``__split_huge_pmd`` turns a PMD leaf into a PTE table of
  512 entries (entire_mapcount -> 512 page mappings) when part of the range
  changes (mprotect, split_vma, partial munmap / MADV_DONTNEED); a folio
  only partly mapped afterwards is split into 512 order-0 folios on the
  spot (Linux queues it for the deferred-split shrinker). Subpages keep
  their PFNs.
* **Collapse**: MADV_COLLAPSE (and :func:`khugepaged_scan_mm`) copy an
  aligned 2 MiB of 4 KiB pages into a new huge folio and map it by PMD, with
  the errnos of ``madvise_collapse``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from vmemu.constants import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE
from vmemu.errors import VmFault, raise_errno
from vmemu.mmu.folio import PG, Folio, PhysMem
from vmemu.mmu.memory import (
    FAULT_FLAG_WRITE,
    VmFaultInfo,
    anon_vma_prepare,
    handle_userfault,
    vm_get_page_prot,
)
from vmemu.mmu.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_TABLE,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
)
from vmemu.mmu.rmap import rmap_walk
from vmemu.mmu.vma import (
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_LOCKED,
    VM_MAYWRITE,
    VM_NOHUGEPAGE,
    VM_SHARED,
    VM_SPECIAL,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    Vma,
)

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

HPAGE_PMD_ORDER = 9
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER
HPAGE_PMD_MASK = ~(PMD_SIZE - 1)
THP_POLICIES = ("always", "madvise", "never")
_ANON_THP_FLAGS = PG.large | PG.anon | PG.anon_exclusive | PG.swapbacked | PG.uptodate | PG.dirty


def count_vm_event(phys: PhysMem, name: str, n: int = 1) -> None:
    """Bump a /proc/vmstat counter (``count_vm_event``): thp_fault_alloc, thp_split_pmd, ..."""
    phys.vmstat[name] += n


def set_thp_enabled(phys: PhysMem, policy: str) -> None:
    """Write /sys/kernel/mm/transparent_hugepage/enabled; EINVAL for another word."""
    if policy not in THP_POLICIES:
        raise_errno(errno.EINVAL, f"THP policy must be one of {THP_POLICIES}")
    phys.thp_enabled = policy


def thp_vma_suitable(vma: Vma, haddr: int) -> bool:
    """The VMA covers the aligned 2 MiB at ``haddr`` (``thp_vma_suitable_order``)."""
    return vma.vm_start <= haddr and haddr + PMD_SIZE <= vma.vm_end


def thp_vma_allowable(phys: PhysMem, vma: Vma, enforce_sysfs: bool = True) -> bool:
    """May ``vma`` hold PMD-mapped THPs (``thp_vma_allowable_order``)?

    ``enforce_sysfs=False`` is MADV_COLLAPSE, which ignores the policy.
    Shared anonymous memory is shmem, whose own policy (``shmem_enabled``,
    ``never`` by default) vmemu does not emulate: it is never eligible.
    """
    flags = vma.vm_flags
    if flags & (VM_HUGETLB | VM_NOHUGEPAGE | VM_SPECIAL) or vma.vm_file is not None:
        return False
    haddr = (vma.vm_start + PMD_SIZE - 1) & HPAGE_PMD_MASK
    if haddr + PMD_SIZE > vma.vm_end:
        return False
    if not enforce_sysfs:
        return True
    policy = phys.thp_enabled
    return policy == "always" or (policy == "madvise" and bool(flags & VM_HUGEPAGE))


def thp_eligible(mm: MmStruct, vma: Vma) -> int:
    """smaps ``THPeligible``."""
    return int(thp_vma_allowable(mm.phys, vma))


# -- the fault path ------------------------------------------------------------------


def create_huge_pmd(mm: MmStruct, vma: Vma, address: int, flags: int, task: Any) -> VmFault:
    """Try a huge mapping for a fault on an empty PMD (``create_huge_pmd``).

    Returns ``VmFault.FALLBACK`` when the 4 KiB path should handle it.
    Hugetlb VMAs go to :func:`vmemu.mmu.hugetlb.hugetlb_fault`.
    """
    if vma.vm_flags & VM_HUGETLB:
        from vmemu.mmu.hugetlb import hugetlb_fault

        return hugetlb_fault(mm, vma, address, flags, task)
    haddr = address & HPAGE_PMD_MASK
    if not thp_vma_suitable(vma, haddr) or not thp_vma_allowable(mm.phys, vma):
        return VmFault.FALLBACK
    pmd = mm.pgtables.pmd_table(haddr, True)
    assert pmd is not None
    idx = (haddr >> 21) & 511
    if pmd[idx]:
        return VmFault.FALLBACK
    return do_huge_pmd_anonymous_page(mm, vma, address, flags, task, pmd, idx)


def is_huge_zero_pmd(entry: int) -> bool:
    """True for a PMD leaf of the huge zero page (``is_huge_zero_pmd``): the only special one."""
    return bool(entry & _PAGE_SPECIAL)


def mk_huge_zero_pmd(mm: MmStruct, vma: Vma) -> int:
    """A read-only, special PMD leaf of the huge zero page (``set_huge_zero_folio``)."""
    zero = mm.phys.get_huge_zero_folio()
    return ((zero.pfn << PAGE_SHIFT) | vm_get_page_prot(vma.vm_flags) | _PAGE_PSE |
            _PAGE_SPECIAL) & ~_PAGE_RW


def do_huge_pmd_anonymous_page(mm: MmStruct, vma: Vma, address: int, flags: int, task: Any,
                               pmd: list[int], idx: int) -> VmFault:
    """Fill an empty PMD of an eligible range (``do_huge_pmd_anonymous_page``).

    A read maps the huge zero page; a write maps a fresh zeroed order-9
    folio. A MISSING-registered VMA hands either to ``handle_userfault``
    with the PMD still none.
    """
    haddr = address & HPAGE_PMD_MASK
    av = anon_vma_prepare(vma)
    if vma.vm_flags & VM_UFFD_MISSING:
        vmf = VmFaultInfo(vma, address & PAGE_MASK, address, flags,
                          vma.linear_page_index(address), pmd, idx, 0, task)
        return handle_userfault(vmf, VM_UFFD_MISSING)
    if not flags & FAULT_FLAG_WRITE and mm.phys.thp_use_zero_page:
        pmd[idx] = mk_huge_zero_pmd(mm, vma)
        return VmFault.NONE
    folio = mm.phys.alloc_folio(HPAGE_PMD_ORDER)
    if folio is None:
        count_vm_event(mm.phys, "thp_fault_fallback")
        return VmFault.FALLBACK
    _map_anon_folio_pmd(mm, vma, haddr, folio, av, pmd, idx)
    count_vm_event(mm.phys, "thp_fault_alloc")
    return VmFault.NONE


def _map_anon_folio_pmd(mm: MmStruct, vma: Vma, haddr: int, folio: Folio, av: Any,
                        pmd: list[int], idx: int) -> None:
    """Map a new anonymous THP writable by one PMD leaf (``map_anon_folio_pmd``)."""
    folio.flags = _ANON_THP_FLAGS
    folio.mapping = av
    folio.index = vma.linear_page_index(haddr)
    folio.mapcount = 1
    folio.entire_mapcount = 1
    entry = (folio.pfn << PAGE_SHIFT) | vm_get_page_prot(vma.vm_flags) | _PAGE_PSE | \
        _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    if vma.vm_flags & VM_WRITE:
        entry |= _PAGE_RW
    pmd[idx] = entry


def huge_pmd_fault(mm: MmStruct, vma: Vma, address: int, flags: int, task: Any) -> VmFault:
    """A fault that found a huge PMD leaf (the PMD branch of ``__handle_mm_fault``)."""
    if vma.vm_flags & VM_HUGETLB:
        from vmemu.mmu.hugetlb import hugetlb_fault

        return hugetlb_fault(mm, vma, address, flags, task)
    pmd = mm.pgtables.pmd_table(address, False)
    assert pmd is not None
    idx = (address >> 21) & 511
    e = pmd[idx]
    if flags & FAULT_FLAG_WRITE:
        if not e & _PAGE_RW:
            return wp_huge_pmd(mm, vma, address, flags, task, pmd, idx)
        pmd[idx] = e | _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY
    else:
        pmd[idx] = e | _PAGE_ACCESSED  # huge_pmd_set_accessed
    return VmFault.NONE


def wp_huge_pmd(mm: MmStruct, vma: Vma, address: int, flags: int, task: Any, pmd: list[int],
                idx: int) -> VmFault:
    """A write to a read-only PMD leaf (``wp_huge_pmd``): a uffd-wp protected one is a
    WP userfault (or, with WP_ASYNC, split to be resolved per page); else COW/reuse."""
    e = pmd[idx]
    if e & _PAGE_UFFD_WP:
        if vma.vm_flags & VM_UFFD_WP:
            ctx = vma.vm_userfaultfd_ctx
            if ctx is not None and ctx.wp_async:
                split_huge_pmd(mm, vma, address)
                return VmFault.NONE  # retried on the PTEs, where WP_ASYNC drops the bit
            vmf = VmFaultInfo(vma, address & PAGE_MASK, address, flags,
                              vma.linear_page_index(address), pmd, idx, e, task)
            return handle_userfault(vmf, VM_UFFD_WP)
        pmd[idx] = e & ~_PAGE_UFFD_WP  # a stale bit after unregister
    return do_huge_pmd_wp_page(mm, vma, address, pmd, idx)


def do_huge_pmd_wp_page(mm: MmStruct, vma: Vma, address: int, pmd: list[int],
                        idx: int) -> VmFault:
    """A write to a read-only PMD leaf: reuse the folio or split (``do_huge_pmd_wp_page``).

    After a split the access is retried and the 4 KiB ``do_wp_page`` copies
    one page, as the kernel's VM_FAULT_FALLBACK does.
    """
    if not vma.vm_flags & VM_WRITE:
        return VmFault.SIGSEGV
    e = pmd[idx]
    haddr = address & HPAGE_PMD_MASK
    if is_huge_zero_pmd(e):
        return do_huge_zero_wp_pmd(mm, vma, haddr, pmd, idx)
    folio = mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
    if folio.flags & PG.anon and (folio.flags & PG.anon_exclusive or
                                  folio.refcount == folio.mapcount == 1):
        folio.flags |= PG.anon_exclusive
        pmd[idx] = e | _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY
        mm.tlb.flush_range(haddr, haddr + PMD_SIZE)
        mm.stats_wp_reuse += 1
        return VmFault.NONE
    split_huge_pmd(mm, vma, haddr)
    return VmFault.NONE


def do_huge_zero_wp_pmd(mm: MmStruct, vma: Vma, haddr: int, pmd: list[int],
                        idx: int) -> VmFault:
    """A write to the huge zero page: map a fresh THP instead (``do_huge_zero_wp_pmd``).

    Without a free huge page the PMD is split into 4 KiB zero-page PTEs and
    the retried access copies one page (the fallback of ``do_huge_pmd_wp_page``).
    """
    folio = mm.phys.alloc_folio(HPAGE_PMD_ORDER)
    if folio is None:
        count_vm_event(mm.phys, "thp_fault_fallback")
        split_huge_pmd(mm, vma, haddr)
        return VmFault.NONE
    _map_anon_folio_pmd(mm, vma, haddr, folio, anon_vma_prepare(vma), pmd, idx)
    mm.tlb.flush_range(haddr, haddr + PMD_SIZE)
    count_vm_event(mm.phys, "thp_fault_alloc")
    return VmFault.NONE


# -- splitting ---------------------------------------------------------------------------


def _huge_leaf(mm: MmStruct, addr: int) -> tuple[list[int] | None, int, int]:
    """``(pmd_table, index, entry)`` when ``addr`` is under a THP PMD leaf, else entry 0."""
    pmd = mm.pgtables.pmd_table(addr, False)
    if pmd is None:
        return None, 0, 0
    idx = (addr >> 21) & 511
    e = pmd[idx]
    if e & _PAGE_PSE and e & (_PAGE_PRESENT | _PAGE_PROTNONE):
        return pmd, idx, e
    return pmd, idx, 0


def split_huge_pmd(mm: MmStruct, vma: Vma, addr: int) -> bool:
    """Replace the PMD leaf over ``addr`` by a table of 512 PTEs (``__split_huge_pmd``).

    The folio's entire mapping becomes 512 page mappings: entire_mapcount
    drops by one, mapcount and refcount grow by 511. Returns False if there
    was no huge PMD.
    """
    pmd, idx, e = _huge_leaf(mm, addr)
    if not e or pmd is None:
        return False
    haddr = addr & HPAGE_PMD_MASK
    if is_huge_zero_pmd(e):  # __split_huge_zero_page_pmd: 512 PTEs of the 4 KiB zero page
        table_pfn, table = mm.phys.alloc_table()
        mm.pgtables.nr_tables += 1
        zpte = (mm.phys.zero_pfn << PAGE_SHIFT) | (e & ~PTE_PFN_MASK & ~_PAGE_PSE)
        table[:] = [zpte] * HPAGE_PMD_NR
        pmd[idx] = (table_pfn << PAGE_SHIFT) | _PAGE_TABLE
        mm.tlb.flush_range(haddr, haddr + PMD_SIZE)
        count_vm_event(mm.phys, "thp_split_pmd")
        return True
    folio = mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
    flags = e & ~PTE_PFN_MASK & ~_PAGE_PSE
    base = folio.pfn
    table_pfn, table = mm.phys.alloc_table()
    mm.pgtables.nr_tables += 1
    for j in range(HPAGE_PMD_NR):
        table[j] = ((base + j) << PAGE_SHIFT) | flags
    pmd[idx] = (table_pfn << PAGE_SHIFT) | _PAGE_TABLE
    folio.entire_mapcount -= 1
    folio.mapcount += HPAGE_PMD_NR - 1
    folio.refcount += HPAGE_PMD_NR - 1
    if e & _PAGE_DIRTY:
        folio.flags |= PG.dirty
    mm.tlb.flush_range(haddr, haddr + PMD_SIZE)
    count_vm_event(mm.phys, "thp_split_pmd")
    return True


def split_huge_pmd_address(mm: MmStruct, vma: Vma, addr: int) -> None:
    """Before ``vma`` splits at ``addr`` (``split_huge_pmd_address``, ``hugetlb_vm_op_split``)."""
    if vma.vm_flags & VM_HUGETLB:
        from vmemu.mmu.hugetlb import hugetlb_split_check

        hugetlb_split_check(vma, addr)
        return
    if addr & ~HPAGE_PMD_MASK:
        split_huge_pmd(mm, vma, addr)


def _owner_map(phys: PhysMem) -> dict[int, Any]:
    return {id(v): mm for mm in phys.mms for v in mm.vmas}


def split_folio(phys: PhysMem, folio: Folio, zero_unused: bool = True) -> bool:
    """Split a large anonymous folio into order-0 folios (``split_huge_page``).

    Every PMD mapping is split first; PTEs keep their PFNs, unmapped
    subpages are freed. With ``zero_unused`` (what ``__folio_split`` does for
    anon folios since 6.12, observed on 6.18) a mapped subpage that holds only
    zeros is remapped to the shared zero page and freed
    (``try_to_map_unused_to_zeropage``), unless the VMA is locked; its PTE keeps
    uffd-wp and soft-dirty. Returns False (nothing changed) when the folio has
    references besides its mappings (a pin, the swap cache) or is not anon.
    """
    if folio.order != HPAGE_PMD_ORDER or not folio.flags & PG.anon or \
            folio.flags & (PG.hugetlb | PG.swapcache) or folio.refcount != folio.mapcount:
        return False
    owner_of = _owner_map(phys)
    for hit in list(rmap_walk(folio, owner_of)):
        if hit.level == "pmd":
            split_huge_pmd(hit.mm, hit.vma, hit.address)
    counts = [0] * folio.nr_pages
    hits = list(rmap_walk(folio, owner_of))
    where: list[int] = []
    for hit in hits:
        pte = hit.mm.pgtables.get_pte(hit.address)
        j = ((pte & PTE_PFN_MASK) >> PAGE_SHIFT) - folio.pfn
        counts[j] += 1
        where.append(j)
    if sum(counts) != folio.mapcount:
        return False  # mapped where rmap cannot see (e.g. moved): leave it whole
    data = folio.data
    if zero_unused and not folio.flags & PG.mlocked:
        zero = bytes(PAGE_SIZE)
        for hit, j in zip(hits, where, strict=True):
            if hit.vma.vm_flags & VM_LOCKED or data[j * PAGE_SIZE:(j + 1) * PAGE_SIZE] != zero:
                continue
            table = hit.mm.pgtables.pte_table(hit.address, False)
            i = (hit.address >> PAGE_SHIFT) & 511
            table[i] = (phys.zero_pfn << PAGE_SHIFT) | vm_get_page_prot(hit.vma.vm_flags) | \
                _PAGE_SPECIAL | (table[i] & (_PAGE_UFFD_WP | _PAGE_SOFT_DIRTY))
            counts[j] -= 1
            folio.mapcount -= 1
            folio.refcount -= 1
    mem_map = phys.mem_map
    flags = folio.flags & ~PG.large
    kept = 0
    for j, n in enumerate(counts):
        pfn = folio.pfn + j
        if n:
            mem_map[pfn] = Folio(pfn=pfn, order=0,
                                 data=bytearray(data[j * PAGE_SIZE:(j + 1) * PAGE_SIZE]),
                                 flags=flags if n == 1 else flags & ~PG.anon_exclusive,
                                 refcount=n, mapcount=n, mapping=folio.mapping,
                                 index=folio.index + j)
            kept += 1
        else:
            mem_map[pfn] = None
            phys._free.setdefault(0, []).append(pfn)
            phys.pages_in_use -= 1
    phys.nr_folios += kept - 1
    folio.refcount = folio.mapcount = 0
    for hit in hits:
        hit.mm.tlb.flush_page(hit.address)
    count_vm_event(phys, "thp_split_page")
    return True


def _split_straddling(mm: MmStruct, addr: int, start: int, end: int,
                      zero_unused: bool = False) -> None:
    """Split the PMD leaf and the large folio at ``addr`` if they reach outside ``[start, end)``.

    Where Linux only splits the PMD and queues the folio for a deferred
    split (zap, mprotect), vmemu splits the folio now but keeps every page
    (``zero_unused=False``); UFFDIO_MOVE splits at once, as the kernel does.
    """
    haddr = addr & HPAGE_PMD_MASK
    _pmd, _idx, e = _huge_leaf(mm, addr)
    if e:
        if start <= haddr and haddr + PMD_SIZE <= end:
            return
        vma = mm.vmas.vma_lookup(addr)
        assert vma is not None
        split_huge_pmd(mm, vma, addr)
    pte = mm.pgtables.get_pte(addr)
    if not pte & (_PAGE_PRESENT | _PAGE_PROTNONE) or pte & _PAGE_SPECIAL:
        return
    pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
    folio = mm.phys.mem_map[pfn]
    if not isinstance(folio, Folio) or not folio.order or folio.flags & PG.hugetlb:
        return
    first = addr - ((pfn - folio.pfn) << PAGE_SHIFT)
    if first < start or first + (folio.nr_pages << PAGE_SHIFT) > end:
        split_folio(mm.phys, folio, zero_unused)


def split_huge_range(mm: MmStruct, vma: Vma, start: int, end: int,
                     zero_unused: bool = False) -> None:
    """Before zapping ``[start, end)``: split huge PMDs and folios it covers only partly."""
    if vma.vm_flags & VM_HUGETLB or start >= end:
        return
    _split_straddling(mm, start, start, end, zero_unused)
    _split_straddling(mm, end - PAGE_SIZE, start, end, zero_unused)


def madvise_free_huge_pmd(mm: MmStruct, vma: Vma, start: int, end: int) -> None:
    """MADV_FREE over the THP PMD leaves of ``[start, end)`` (``madvise_free_huge_pmd``).

    A leaf the range covers whole is made clean and old and its folio
    lazily freeable (``folio_mark_lazyfree``) without a split; a leaf
    covered partly has its folio split, so the PTE walk that follows frees
    just those pages. A folio another process maps too is left alone.
    """
    from vmemu.mmu.folio import folio_maybe_mapped_shared

    addr = start & HPAGE_PMD_MASK
    while addr < end:
        lo, hi = max(addr, start), min(addr + PMD_SIZE, end)
        pmd, idx, e = _huge_leaf(mm, addr)
        if e and pmd is not None and not is_huge_zero_pmd(e):
            folio = mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
            if folio.flags & PG.hugetlb or folio_maybe_mapped_shared(folio):
                pass
            elif hi - lo != PMD_SIZE:
                split_folio(mm.phys, folio)
            else:
                folio.flags &= ~PG.dirty
                if e & (_PAGE_ACCESSED | _PAGE_DIRTY):
                    pmd[idx] = e & ~(_PAGE_ACCESSED | _PAGE_DIRTY)
                    mm.tlb.flush_range(addr, addr + PMD_SIZE)
                folio_mark_lazyfree(mm.phys, folio)
        addr += PMD_SIZE


def folio_mark_lazyfree(phys: PhysMem, folio: Folio) -> None:
    """Make an anonymous folio lazily freeable: not swapbacked (``folio_mark_lazyfree``)."""
    if folio.flags & PG.anon and folio.flags & PG.swapbacked and \
            not folio.flags & (PG.swapcache | PG.mlocked):
        folio.flags &= ~PG.swapbacked
        count_vm_event(phys, "pglazyfree", folio.nr_pages)


# -- zap, fork, mprotect -------------------------------------------------------------------


def zap_huge_pmds(mm: MmStruct, vma: Vma, start: int, end: int,
                  keep_wp_marker: bool = False) -> None:
    """Unmap the huge PMD leaves ``[start, end)`` covers whole (``zap_huge_pmd``).

    ``keep_wp_marker`` only matters for hugetlb, where a zapped uffd-wp entry
    becomes a huge uffd-wp marker; a THP leaf is anonymous (no marker) or a
    file THP, which uffd-wp splits before protecting.
    """
    if vma.vm_flags & VM_HUGETLB:
        from vmemu.mmu.hugetlb import unmap_hugepage_range

        unmap_hugepage_range(mm, vma, start, end, keep_wp_marker)
        return
    addr = (start + PMD_SIZE - 1) & HPAGE_PMD_MASK
    while addr + PMD_SIZE <= end:
        pmd, idx, e = _huge_leaf(mm, addr)
        if e and pmd is not None and is_huge_zero_pmd(e):
            pmd[idx] = 0  # nothing to put: the huge zero page is never counted
            mm.tlb.flush_range(addr, addr + PMD_SIZE)
        elif e and pmd is not None:
            folio = mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
            pmd[idx] = 0
            if e & _PAGE_DIRTY:
                folio.flags |= PG.dirty
            folio.entire_mapcount -= 1
            folio.mapcount -= 1
            mm.phys.folio_put(folio)
            mm.tlb.flush_range(addr, addr + PMD_SIZE)
        addr += PMD_SIZE


def copy_huge_pmds(src: MmStruct, dst: MmStruct, src_vma: Vma, dst_vma: Vma,
                   keep_uffd_wp: bool) -> None:
    """Share the huge PMDs of ``src_vma`` with the child (``copy_huge_pmd``)."""
    if src_vma.vm_flags & VM_HUGETLB:
        from vmemu.mmu.hugetlb import copy_hugetlb_page_range

        copy_hugetlb_page_range(src, dst, src_vma, dst_vma, keep_uffd_wp)
        return
    cow = (src_vma.vm_flags & (VM_SHARED | VM_MAYWRITE)) == VM_MAYWRITE
    addr = (src_vma.vm_start + PMD_SIZE - 1) & HPAGE_PMD_MASK
    while addr + PMD_SIZE <= src_vma.vm_end:
        pmd, idx, e = _huge_leaf(src, addr)
        if e and pmd is not None:
            if not is_huge_zero_pmd(e):
                folio = src.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
                if folio.pincount and folio.flags & PG.anon_exclusive:
                    # maybe pinned: split, and the PTE copy gives the child its own pages
                    split_huge_pmd(src, src_vma, addr)
                    addr += PMD_SIZE
                    continue
                folio.flags &= ~PG.anon_exclusive
                folio.mapcount += 1
                folio.entire_mapcount += 1
                folio.refcount += 1
            if cow and e & _PAGE_RW:
                e &= ~_PAGE_RW
                pmd[idx] = e
            child = e & ~_PAGE_ACCESSED
            if not keep_uffd_wp:
                child &= ~_PAGE_UFFD_WP
            cpmd = dst.pgtables.pmd_table(addr, True)
            assert cpmd is not None
            cpmd[idx] = child
        addr += PMD_SIZE


def change_huge_pmds(mm: MmStruct, vma: Vma, start: int, end: int) -> None:
    """New protection for the huge leaves of ``[start, end)`` (``change_huge_pmd``)."""
    if vma.vm_flags & VM_HUGETLB:
        from vmemu.mmu.hugetlb import hugetlb_change_protection

        hugetlb_change_protection(mm, vma, start, end)
        return
    prot = vm_get_page_prot(vma.vm_flags)
    keep = PTE_PFN_MASK | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_UFFD_WP | \
        _PAGE_PSE
    addr = start & HPAGE_PMD_MASK
    while addr < end:
        pmd, idx, e = _huge_leaf(mm, addr)
        if e and pmd is not None and is_huge_zero_pmd(e):
            pmd[idx] = ((e & keep) | prot | _PAGE_SPECIAL) & ~_PAGE_RW  # never writable
        elif e and pmd is not None:
            new = (e & keep) | prot
            folio = mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
            if vma.vm_flags & VM_WRITE and not vma.vm_flags & VM_SHARED and \
                    folio.flags & PG.anon_exclusive and not new & _PAGE_UFFD_WP:
                new |= _PAGE_RW
            pmd[idx] = new
        addr += PMD_SIZE
    mm.tlb.flush_range(start, end)


# -- collapse ------------------------------------------------------------------------------

SCAN_SUCCEED = "succeed"
_COLLAPSE_ERRNO = {
    "alloc_huge_page_fail": errno.ENOMEM,
    "exceed_none_pte": errno.EBUSY,
    "page_count": errno.EAGAIN,
}


def collapse_huge_page(mm: MmStruct, vma: Vma, haddr: int, max_ptes_none: int = 511) -> str:
    """Copy the 512 pages at ``haddr`` into a new huge folio mapped by PMD (``collapse_huge_page``).

    Returns ``"succeed"``, ``"pmd_mapped"`` or the reason it did not
    (``hpage_collapse_scan_pmd`` result names, lower-cased).
    """
    pmd = mm.pgtables.pmd_table(haddr, False)
    if pmd is None:
        return "pmd_null"
    idx = (haddr >> 21) & 511
    me = pmd[idx]
    if me & _PAGE_PSE:
        return "pmd_mapped"
    if not me:
        return "pmd_null"
    table = mm.phys.mem_map[(me & PTE_PFN_MASK) >> PAGE_SHIFT]
    mem_map = mm.phys.mem_map
    armed = vma.vm_flags & (VM_UFFD_MISSING | VM_UFFD_WP)
    none = 0
    writable = False
    for pte in table:
        if not pte or pte & _PAGE_SPECIAL:
            none += 1
            if armed or none > max_ptes_none:
                return "exceed_none_pte"
            continue
        if not pte & _PAGE_PRESENT:
            return "pte_uffd_wp" if pte & _PAGE_UFFD_WP else "pte_non_present"
        if pte & _PAGE_UFFD_WP:
            return "pte_uffd_wp"
        folio = mem_map[(pte & PTE_PFN_MASK) >> PAGE_SHIFT]
        if not folio.flags & PG.anon:
            return "page_anon"
        if folio.refcount != folio.mapcount:
            return "page_count"
        if pte & _PAGE_RW:
            writable = True
    if not writable:
        return "page_ro"
    new = mm.phys.alloc_folio(HPAGE_PMD_ORDER)
    if new is None:
        return "alloc_huge_page_fail"
    for j, pte in enumerate(table):
        if pte and not pte & _PAGE_SPECIAL:
            pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
            old = mem_map[pfn]
            new.data[j * PAGE_SIZE:(j + 1) * PAGE_SIZE] = old.page_buffer(pfn)
            old.mapcount -= 1
            mm.phys.folio_put(old)
    av = anon_vma_prepare(vma)
    new.flags = _ANON_THP_FLAGS
    new.mapping = av
    new.index = vma.linear_page_index(haddr)
    new.mapcount = 1
    new.entire_mapcount = 1
    entry = (new.pfn << PAGE_SHIFT) | vm_get_page_prot(vma.vm_flags) | _PAGE_PSE | \
        _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY
    if vma.vm_flags & VM_WRITE:
        entry |= _PAGE_RW
    pmd[idx] = entry
    mm.phys.free_table((me & PTE_PFN_MASK) >> PAGE_SHIFT)
    mm.pgtables.nr_tables -= 1
    mm.tlb.flush_range(haddr, haddr + PMD_SIZE)
    count_vm_event(mm.phys, "thp_collapse_alloc")
    return SCAN_SUCCEED


def madvise_collapse(mm: MmStruct, vma: Vma, start: int, end: int, advice: int = 0) -> None:
    """MADV_COLLAPSE on the part of one VMA (``madvise_collapse``).

    EINVAL for a VMA that may not hold THPs (hugetlb, VM_NOHUGEPAGE, shared,
    file); otherwise every aligned 2 MiB in the range is collapsed, and the
    call fails with the errno of the last failure (ENOMEM: no huge page;
    EAGAIN: a page is pinned; EBUSY: an empty PTE in a uffd-armed VMA;
    EINVAL: anything else, e.g. no writable page or a swapped-out one).
    """
    if not thp_vma_allowable(mm.phys, vma, enforce_sysfs=False):
        raise_errno(errno.EINVAL)
    if vma.anon_vma is None:
        raise_errno(errno.EINVAL)  # never faulted: EINVAL even for a range within one PMD (6.18)
    hstart = (start + PMD_SIZE - 1) & HPAGE_PMD_MASK
    hend = end & HPAGE_PMD_MASK
    thps = 0
    last_fail = ""
    for haddr in range(hstart, hend, PMD_SIZE):
        if not thp_vma_suitable(vma, haddr):
            last_fail = "vma_check"
            break
        result = collapse_huge_page(mm, vma, haddr)
        if result in (SCAN_SUCCEED, "pmd_mapped"):
            thps += 1
        else:
            last_fail = result
    if thps != (hend - hstart) // PMD_SIZE:  # a range inside one PMD, unaligned: EINVAL (6.18)
        raise_errno(_COLLAPSE_ERRNO.get(last_fail, errno.EINVAL), f"collapse: {last_fail}")


def khugepaged_scan_mm(mm: MmStruct, max_ptes_none: int = 511) -> int:
    """One khugepaged pass over ``mm`` (``khugepaged_scan_mm_slot``); returns THPs made.

    Only VMAs the policy allows are scanned, with khugepaged's
    ``max_ptes_none`` limit (default 511, as in sysfs).
    """
    made = 0
    with mm.lock:
        for vma in list(mm.vmas):
            if not thp_vma_allowable(mm.phys, vma):
                continue
            haddr = (vma.vm_start + PMD_SIZE - 1) & HPAGE_PMD_MASK
            while haddr + PMD_SIZE <= vma.vm_end:
                if collapse_huge_page(mm, vma, haddr, max_ptes_none) == SCAN_SUCCEED:
                    made += 1
                haddr += PMD_SIZE
    return made
