"""Page-cache pages and mappings: ``unmap_mapping_range`` and fault-around.

When a file shrinks or a hole is punched, every PTE that maps the dropped
page-cache pages must go, in every process (``unmap_mapping_range`` of
``mm/memory.c``). The inode's ``i_mmap`` lists the VMAs; each VMA knows its
mm. ``even_cows`` also zaps private COW copies of those pages in
MAP_PRIVATE mappings (truncate does, hole punching does not).

The other way round, a read fault on a file mapping also maps the cached
pages around it (``do_fault_around`` -> ``filemap_map_pages`` of
``mm/filemap.c``): up to ``fault_around_bytes`` (64 KiB, 16 pages) in an
aligned window clipped to the VMA, the PTE table and the end of the file,
skipping pages not in the cache (or out on swap) and PTEs already set. A
VMA registered for uffd-wp or minor faults does not fault around
(``uffd_disable_fault_around``). This is visible in pagemap and in smaps
Rss: on Linux a read of one shmem page maps its cached neighbours too.
"""

from __future__ import annotations

from typing import Any

from vmemu.constants import PAGE_SHIFT
from vmemu.mmu.folio import PG
from vmemu.mmu.memory import zap_pte
from vmemu.mmu.pgtable import (
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_SPECIAL,
    PTE_PFN_MASK,
    is_pte_marker,
)
from vmemu.mmu.vma import VM_UFFD_MINOR, VM_UFFD_WP

FAULT_AROUND_PAGES = 16  # /sys/kernel/debug/fault_around_bytes = 65536


def unmap_mapping_range(inode: Any, first: int, last: int, even_cows: bool,
                        drop_markers: bool = False) -> None:
    """Zap PTEs of page-cache indices ``[first, last)`` of ``inode`` in all its mappings."""
    for vma in list(inode.i_mmap):
        mm = _mm_of(vma)
        if mm is None:
            continue
        lo = max(first, vma.vm_pgoff)
        hi = min(last, vma.vm_pgoff + (vma.size >> PAGE_SHIFT))
        if lo >= hi:
            continue
        start = vma.vm_start + ((lo - vma.vm_pgoff) << PAGE_SHIFT)
        end = vma.vm_start + ((hi - vma.vm_pgoff) << PAGE_SHIFT)
        keep_wp = bool(vma.vm_flags & VM_UFFD_WP) and not drop_markers
        mm.split_huge_range(vma, start, end)
        mem_map = mm.phys.mem_map
        for _addr, table, lo_i, hi_i in mm.pgtables.iter_pte_tables(start, end):
            for idx in range(lo_i, hi_i):
                pte = table[idx]
                if not pte:
                    continue
                if pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
                    if pte & _PAGE_SPECIAL:
                        zap_pte(mm, vma, table, idx, keep_wp)
                        continue
                    folio = mem_map[(pte & PTE_PFN_MASK) >> PAGE_SHIFT]
                    if folio.flags & PG.anon and not even_cows:
                        continue
                    zap_pte(mm, vma, table, idx, keep_wp)
                elif is_pte_marker(pte):
                    if drop_markers:
                        table[idx] = 0
                elif even_cows:
                    zap_pte(mm, vma, table, idx, keep_wp)
        mm.tlb.flush_range(start, end)


def _mm_of(vma: Any) -> Any:
    for proc_mm in _all_mms(vma):
        if proc_mm.vmas.vma_lookup(vma.vm_start) is vma:
            return proc_mm
    return None


def _all_mms(vma: Any) -> list[Any]:
    inode = vma.vm_file
    return list(inode.phys.mms) if inode is not None else []


def should_fault_around(vma: Any) -> bool:
    """May a read fault in ``vma`` map its neighbours (``should_fault_around``)?"""
    return not vma.vm_flags & (VM_UFFD_WP | VM_UFFD_MINOR) and \
        getattr(vma.vm_file, "pages", None) is not None


def do_fault_around(mm: Any, vmf: Any, prot: int) -> None:
    """Map the cached pages of the window around a read fault (``do_fault_around``).

    The window is ``FAULT_AROUND_PAGES`` PTEs aligned within the PTE table,
    clipped to the VMA; ``filemap_map_pages`` then maps every page of it
    that is in the page cache, below EOF, not poisoned, over a none PTE,
    with the VMA's protection, the faulting page included.
    """
    vma = vmf.vma
    inode = vma.vm_file
    nr = FAULT_AROUND_PAGES
    pte_off = vmf.idx
    vma_off = vmf.pgoff - vma.vm_pgoff
    from_pte = max(pte_off & ~(nr - 1), pte_off - min(pte_off, vma_off))
    to_pte = min(from_pte + nr, 512, pte_off + (vma.size >> PAGE_SHIFT) - vma_off)
    base = vmf.pgoff - pte_off
    end = min(base + to_pte, inode.nr_pages_size)
    table = vmf.table
    pages = inode.pages
    bad = PG.hwpoison | PG.locked
    for pgoff in range(base + from_pte, end):
        i = pgoff - base
        if table[i]:
            continue
        folio = pages.get(pgoff)
        if folio is None or folio.order or folio.flags & bad:
            continue
        folio.refcount += 1
        folio.mapcount += 1
        table[i] = (folio.pfn << PAGE_SHIFT) | prot
