"""Unmapping file pages from every mapping: ``unmap_mapping_range`` (``mm/memory.c``).

When a file shrinks or a hole is punched, every PTE that maps the dropped
page-cache pages must go, in every process. The inode's ``i_mmap`` lists the
VMAs; each VMA knows its mm. ``even_cows`` also zaps private COW copies of
those pages in MAP_PRIVATE mappings (truncate does, hole punching does not).
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
from vmemu.mmu.vma import VM_UFFD_WP


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
