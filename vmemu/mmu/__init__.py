"""The memory-management layer: address spaces, VMAs, page tables, folios.

Public names of ``vmemu.mmu``; everything else in the package is internal.
"""

from vmemu.mmu.folio import PG, Folio, PhysMem, PhysMemStats
from vmemu.mmu.mm import MmStats, MmStruct
from vmemu.mmu.pagetable import PageTables, WalkLevel
from vmemu.mmu.proc import (
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PFRAME_MASK,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PM_UFFD_WP,
)
from vmemu.mmu.tlb import Tlb, TlbStats
from vmemu.mmu.vma import AnonVma, Vma, VmaTree

__all__ = [
    "PG", "PM_FILE", "PM_MMAP_EXCLUSIVE", "PM_PFRAME_MASK", "PM_PRESENT", "PM_SOFT_DIRTY",
    "PM_SWAP", "PM_UFFD_WP", "AnonVma", "Folio", "MmStats", "MmStruct", "PageTables",
    "PhysMem", "PhysMemStats", "Tlb", "TlbStats", "Vma", "VmaTree", "WalkLevel",
]
