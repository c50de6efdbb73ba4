"""Userfaultfd write-protection: UFFDIO_WRITEPROTECT and the uffd-wp bit (``mm/userfaultfd.c``).

Protecting sets the uffd-wp software bit on present PTEs (and clears RW),
on swap entries (``_PAGE_SWP_UFFD_WP``), and puts a uffd-wp *marker* in
empty PTEs of shmem/hugetlb mappings, and of anonymous ones when
UFFD_FEATURE_WP_UNPOPULATED is on, so a later first touch still faults.
Unprotecting clears all that, recomputes write permission as mprotect
does, and wakes writers sleeping on the range unless asked not to.
"""

from __future__ import annotations

import errno
from functools import reduce
from operator import and_, attrgetter, itemgetter, or_
from typing import TYPE_CHECKING, Any

import attrs

from vmemu.constants import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE
from vmemu.errors import raise_errno
from vmemu.mmu.folio import PG, Folio
from vmemu.mmu.memory import vm_get_page_prot
from vmemu.mmu.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_SWP_UFFD_WP,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
    UFFD_WP_MARKER,
    is_pte_marker,
    is_uffd_wp_marker,
)
from vmemu.mmu.vma import VM_HUGETLB, VM_SHARED, VM_UFFD_WP, VM_WRITE, Vma

if TYPE_CHECKING:
    from vmemu.uffd.ctx import Userfaultfd

_KEEP = PTE_PFN_MASK | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_SPECIAL


def hugetlb_uffd_wp_range(mm: Any, vma: Vma, start: int, end: int, enable: bool) -> None:
    """uffd-wp on the huge entries of a hugetlb VMA (``hugetlb_change_protection`` with
    MM_CP_UFFD_WP / MM_CP_UFFD_WP_RESOLVE).

    hugetlb is file-backed, so protecting an empty entry always installs a
    marker (``userfaultfd_wp_use_markers``); un-protecting clears markers and
    gives write permission back as mprotect would (shared and dirty, or an
    exclusive anon page). Each 2 MiB leaf of a bigger page is handled alike.
    """
    size = PMD_SIZE
    shared_w = bool(vma.vm_flags & VM_SHARED and vma.vm_flags & VM_WRITE)
    mem_map = mm.phys.mem_map
    for addr in range(start & ~(size - 1), end, size):
        pmd = mm.pgtables.pmd_table(addr, enable)
        if pmd is None:
            continue
        idx = (addr >> 21) & 511
        e = pmd[idx]
        if e & (_PAGE_PRESENT | _PAGE_PROTNONE):
            if enable:
                pmd[idx] = (e | _PAGE_UFFD_WP) & ~_PAGE_RW
            elif e & _PAGE_UFFD_WP:
                new = e & ~_PAGE_UFFD_WP
                folio = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
                if shared_w and e & _PAGE_DIRTY or vma.vm_flags & VM_WRITE and \
                        folio.flags & PG.anon_exclusive:
                    new |= _PAGE_RW
                pmd[idx] = new
        elif not e:
            if enable:
                pmd[idx] = UFFD_WP_MARKER
        elif not enable and is_uffd_wp_marker(e):
            pmd[idx] = 0
    mm.tlb.flush_range(start, end)


# folio.flags may be a PG (an IntFlag, whose ``&`` is a Python call): test bits by shifting
_ANON_EXCLUSIVE_SHIFT = PG.anon_exclusive.bit_length() - 1
_PRESENT_OR_PROTNONE = _PAGE_PRESENT | _PAGE_PROTNONE
_flags = attrgetter("flags")
_PROT: dict[int, int] = {}  # vm_flags -> vm_get_page_prot(vm_flags)


def _wp_entries(table: list[int], lo: int, hi: int, enable: bool, markers: bool, prot: int,
                try_writable: bool, mem_map: list[Any]) -> None:
    """Set or clear uffd-wp on ``table[lo:hi]`` (``change_pte_range`` with MM_CP_UFFD_WP[_RESOLVE]).

    Protecting: present entries get the uffd-wp bit and lose RW, swap
    entries get ``_PAGE_SWP_UFFD_WP``, empty ones a marker when ``markers``.
    Un-protecting: protected present entries get the VMA's protection back,
    writable again when the VMA is private and writable and the page is an
    exclusive anonymous one (``can_change_pte_writable``); swap entries lose
    the bit, uffd-wp markers are cleared. The protect side is one list
    comprehension over the slice: most entries are present.
    """
    if enable:
        nrw = ~_PAGE_RW
        marker = UFFD_WP_MARKER if markers else 0
        table[lo:hi] = [((p | _PAGE_UFFD_WP) & nrw) if p & _PRESENT_OR_PROTNONE else
                        (p if is_pte_marker(p) else p | _PAGE_SWP_UFFD_WP) if p else marker
                        for p in table[lo:hi]]
        return
    shift = _ANON_EXCLUSIVE_SHIFT
    if hi - lo >= 8 and _unprotect_whole(table, lo, hi, prot, try_writable, mem_map):
        return
    for idx in range(lo, hi):
        pte = table[idx]
        if not pte:
            continue
        if pte & _PRESENT_OR_PROTNONE:
            if pte & _PAGE_UFFD_WP:
                new = (pte & _KEEP) | prot
                if try_writable and not new & (_PAGE_SPECIAL | _PAGE_RW) and \
                        mem_map[(pte & PTE_PFN_MASK) >> PAGE_SHIFT].flags >> shift & 1:
                    new |= _PAGE_RW
                table[idx] = new
        elif is_pte_marker(pte):
            if is_uffd_wp_marker(pte):
                table[idx] = 0
        else:
            table[idx] = pte & ~_PAGE_SWP_UFFD_WP


def _unprotect_whole(table: list[int], lo: int, hi: int, prot: int, try_writable: bool,
                     mem_map: list[Any]) -> bool:
    """Un-protect ``table[lo:hi]`` at once if every entry is a protected present page.

    The page loop's tests over the whole slice with C-level helpers (the AND
    of the entries has the present and uffd-wp bits only if all do, their
    OR has the special bit if any is the zero page; the folios' flags are
    ANDed with ``int.__and__``); False, with nothing changed, when any
    entry needs the loop.
    """
    seg = table[lo:hi]
    want = _PAGE_PRESENT | _PAGE_UFFD_WP
    if reduce(and_, seg) & want != want or reduce(or_, seg) & _PAGE_SPECIAL:
        return False
    if try_writable and not prot & _PAGE_RW:  # writable again only if exclusive anon
        folios = itemgetter(*[(e & PTE_PFN_MASK) >> PAGE_SHIFT for e in seg])(mem_map)
        if not reduce(int.__and__, map(_flags, folios)) >> _ANON_EXCLUSIVE_SHIFT & 1:
            return False
        prot |= _PAGE_RW
    table[lo:hi] = [(e & _KEEP) | prot for e in seg]
    return True


def _wp_one_table(mm: Any, vma: Vma, start: int, end: int, enable: bool,
                  use_markers: bool) -> bool:
    """``uffd_wp_range`` inside one PMD, when no huge page is involved; False to take the long way.

    The long way splits huge PMDs and large folios the range covers only
    partly: here the PMD entry must be a PTE table (or nothing) and the
    pages at both ends must be small.
    """
    pgtables = mm.pgtables
    markers = enable and use_markers
    mem_map = mm.phys.mem_map
    e = pgtables.pgd[(start >> 39) & 511]  # pmd_table(start, markers), inline when it exists
    if e:
        e = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT][(start >> 30) & 511]
    pmd = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT] if e else pgtables.pmd_table(start, markers)
    if pmd is None:
        mm.tlb.flush_range(start, end)
        return True
    me = pmd[(start >> 21) & 511]
    if me and (me & _PAGE_PSE or not me & _PAGE_PRESENT):
        return False
    lo = (start >> PAGE_SHIFT) & 511
    hi = ((end - 1) >> PAGE_SHIFT & 511) + 1
    if me:
        table = mem_map[(me & PTE_PFN_MASK) >> PAGE_SHIFT]
        for i in (lo, hi - 1) if hi - lo > 1 else (lo,):  # what split_huge_range looks at
            pte = table[i]
            if pte & _PRESENT_OR_PROTNONE and not pte & _PAGE_SPECIAL:
                folio = mem_map[(pte & PTE_PFN_MASK) >> PAGE_SHIFT]
                if not isinstance(folio, Folio) or folio.order:
                    return False
    elif markers:
        table = pgtables.pte_table(start, True)
    else:
        mm.tlb.flush_range(start, end)
        return True
    vm_flags = vma.vm_flags
    prot = _PROT.get(vm_flags)
    if prot is None:
        prot = _PROT[vm_flags] = vm_get_page_prot(vm_flags)
    _wp_entries(table, lo, hi, enable, markers, prot,
                bool(vm_flags & VM_WRITE) and not vm_flags & VM_SHARED, mem_map)
    if hi - lo == 1:
        mm.tlb.flush_page(start)
    else:
        mm.tlb.flush_range(start, end)
    return True


def uffd_wp_range(mm: Any, vma: Vma, start: int, end: int, enable: bool,
                  use_markers: bool) -> None:
    """Set or clear uffd-wp on ``[start, end)`` of ``vma`` (``uffd_wp_range``)."""
    if vma.vm_flags & VM_HUGETLB:
        hugetlb_uffd_wp_range(mm, vma, start, end, enable)
        return
    if (start ^ (end - 1)) < PMD_SIZE and _wp_one_table(mm, vma, start, end, enable, use_markers):
        return
    mm.split_huge_range(vma, start, end)
    _wp_huge_pmds(mm, vma, start, end, enable)
    markers = enable and use_markers
    if markers:
        addr = start
        while addr < end:  # markers need tables to exist where nothing was ever mapped
            mm.pgtables.pte_table(addr, True)
            addr = (addr | (PMD_SIZE - 1)) + 1
    prot = vm_get_page_prot(vma.vm_flags)
    try_writable = bool(vma.vm_flags & VM_WRITE) and not vma.vm_flags & VM_SHARED
    mem_map = mm.phys.mem_map
    for _addr, table, lo, hi in mm.pgtables.iter_pte_tables(start, end):
        _wp_entries(table, lo, hi, enable, markers, prot, try_writable, mem_map)
    mm.tlb.flush_range(start, end)


def _wp_huge_pmds(mm: Any, vma: Vma, start: int, end: int, enable: bool) -> None:
    """uffd-wp on the THP and huge-zero PMD leaves ``[start, end)`` covers whole
    (``change_huge_pmd`` with MM_CP_UFFD_WP[_RESOLVE]): no split, the bit lives in the PMD.

    Un-protecting gives write permission back to an exclusive anonymous THP of a
    private writable VMA (``can_change_pmd_writable``), never to the huge zero page.
    """
    addr = (start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    prot = vm_get_page_prot(vma.vm_flags)
    try_writable = bool(vma.vm_flags & VM_WRITE) and not vma.vm_flags & VM_SHARED
    while addr + PMD_SIZE <= end:
        pmd = mm.pgtables.pmd_table(addr, False)
        if pmd is None:
            addr = (addr | ((1 << 30) - 1)) + 1
            continue
        idx = (addr >> 21) & 511
        e = pmd[idx]
        if e & _PAGE_PSE and e & _PRESENT_OR_PROTNONE:
            if enable:
                pmd[idx] = (e | _PAGE_UFFD_WP) & ~_PAGE_RW
            elif e & _PAGE_UFFD_WP:
                new = (e & (_KEEP | _PAGE_PSE)) | prot
                if e & _PAGE_SPECIAL:
                    new &= ~_PAGE_RW
                elif try_writable and \
                        mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT].flags & PG.anon_exclusive:
                    new |= _PAGE_RW
                pmd[idx] = new
        addr += PMD_SIZE


def use_markers(ctx: Userfaultfd, vma: Vma) -> bool:
    """Whether empty PTEs get uffd-wp markers (``userfaultfd_wp_use_markers``)."""
    if vma.vm_file is None:
        return ctx.wp_unpopulated
    return True


def mwriteprotect_range(ctx: Userfaultfd, start: int, length: int, enable: bool) -> None:
    """Protect or unprotect every VMA of the range (``mwriteprotect_range``).

    Stops with ENOENT at the first VMA not registered for WP (earlier VMAs
    keep their new state, as in the kernel); EINVAL for a hugetlb VMA whose
    page size the range does not respect.
    """
    mm = ctx.mm
    end = start + length
    with mm.lock:
        if ctx.mmap_changing:
            raise_errno(errno.EAGAIN)
        vma = mm.vmas.vma_lookup(start)  # the common case: one VMA covers the range
        if vma is not None and end <= vma.vm_end and vma.vm_flags & VM_UFFD_WP and \
                not vma.vm_flags & VM_HUGETLB:  # the loop below for that one VMA
            # (markers matter only to protecting: uffd_wp_range ANDs them with enable)
            uffd_wp_range(mm, vma, start, end, enable, enable and use_markers(ctx, vma))
            return
        vmas = [vma] if vma is not None and end <= vma.vm_end else mm.vmas.overlapping(start, end)
        if not vmas:
            raise_errno(errno.ENOENT)
        for vma in vmas:
            if not vma.vm_flags & VM_UFFD_WP:
                raise_errno(errno.ENOENT)
            if vma.vm_flags & VM_HUGETLB:
                mask = vma.vm_file.hstate.size - 1  # 2 MiB or 1 GiB pages
                if start & mask or length & mask:
                    raise_errno(errno.EINVAL)
            s, e = max(vma.vm_start, start), min(vma.vm_end, end)
            uffd_wp_range(mm, vma, s, e, enable, use_markers(ctx, vma))


@attrs.frozen
class PageRegion:
    """One run of pages reported by :func:`pagemap_scan` (``struct page_region``)."""

    start: int
    end: int
    categories: int


PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1


def _scan_entry(mm: Any, addr: int) -> tuple[int, bool]:
    """The entry mapping ``addr`` and whether it is a huge (PMD-level) one."""
    pmd = mm.pgtables.pmd_table(addr, False)
    if pmd is None:
        return 0, False
    me = pmd[(addr >> 21) & 511]
    if me & _PAGE_PSE or (me and not me & _PAGE_PRESENT):  # a huge leaf, or a hugetlb marker
        return me, True
    return mm.pgtables.get_pte(addr), False


def pagemap_scan(ctx: Userfaultfd, start: int, end: int, flags: int = 0) -> list[PageRegion]:
    """The PAGEMAP_SCAN ioctl over a WP_ASYNC range (``do_pagemap_scan``).

    Reports runs of pages with their categories; a page is WRITTEN when its
    uffd-wp protection was dropped by a write. With ``PM_SCAN_WP_MATCHING``
    the written pages are protected again, so the next scan sees only new
    writes: the soft-dirty replacement WP_ASYNC was made for.
    """
    if flags & ~(PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC):
        raise_errno(errno.EINVAL)
    if start & (PAGE_SIZE - 1) or end < start:
        raise_errno(errno.EINVAL)
    mm = ctx.mm
    out: list[PageRegion] = []
    with mm.lock:
        addr = start
        while addr < end:
            vma = mm.vmas.vma_lookup(addr)
            if vma is None:
                addr += PAGE_SIZE
                continue
            if flags & PM_SCAN_CHECK_WPASYNC and not (vma.vm_flags & VM_UFFD_WP and ctx.wp_async):
                raise_errno(errno.EPERM)
            pte, huge = _scan_entry(mm, addr)
            # a huge leaf is one chunk: its pages share one entry (pagemap_scan_thp_entry)
            stop = min((addr | (PMD_SIZE - 1)) + 1, end, vma.vm_end) if huge else addr + PAGE_SIZE
            cats = PAGE_IS_WPALLOWED if vma.vm_flags & VM_UFFD_WP else 0
            if huge:
                cats |= PAGE_IS_HUGE
            if pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
                cats |= PAGE_IS_PRESENT
                if pte & _PAGE_SPECIAL:
                    cats |= PAGE_IS_PFNZERO
                if not pte & _PAGE_UFFD_WP:
                    cats |= PAGE_IS_WRITTEN
            elif is_uffd_wp_marker(pte):
                cats |= PAGE_IS_SWAPPED  # a pte marker is a swap-format entry (is_swap_pte)
            elif pte:
                cats |= PAGE_IS_SWAPPED
                if not pte & _PAGE_SWP_UFFD_WP:
                    cats |= PAGE_IS_WRITTEN
            else:
                cats |= PAGE_IS_WRITTEN
            if vma.vm_file is not None:
                cats |= PAGE_IS_FILE
            if out and out[-1].end == addr and out[-1].categories == cats:
                out[-1] = PageRegion(out[-1].start, stop, cats)
            else:
                out.append(PageRegion(addr, stop, cats))
            if flags & PM_SCAN_WP_MATCHING and cats & PAGE_IS_WRITTEN and \
                    vma.vm_flags & VM_UFFD_WP:
                # a whole THP is protected in its PMD; part of one splits it first
                uffd_wp_range(mm, vma, addr, stop, True, use_markers(ctx, vma))
            addr = stop
    return out
