"""Reverse mapping: from a folio to every page-table entry that maps it (``mm/rmap.c``).

Anonymous folios point at the ``anon_vma`` of the VMA that first faulted
them; every VMA chained to that anon_vma (the VMA itself, its split pieces,
its forked children) may map the folio at ``vm_start + (index - vm_pgoff)
pages``. File and shmem folios point at their inode, whose ``i_mmap`` lists
the VMAs mapping it. ``rmap_walk`` visits each candidate and keeps the ones
whose entry really maps the folio.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs

from vmemu.constants import PAGE_SHIFT
from vmemu.mmu.folio import PG, Folio
from vmemu.mmu.pgtable import _PAGE_PRESENT, _PAGE_PROTNONE, _PAGE_PSE, _PAGE_SPECIAL, PTE_PFN_MASK
from vmemu.mmu.vma import AnonVma, Vma

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct


@attrs.frozen
class RmapHit:
    """One mapping of a folio found by :func:`rmap_walk`."""

    mm: Any
    vma: Vma
    address: int
    level: str


def _candidate_vmas(folio: Folio) -> list[Vma]:
    mapping = folio.mapping
    if isinstance(mapping, AnonVma):
        return list(mapping.vmas)
    if mapping is not None and hasattr(mapping, "i_mmap"):
        return list(mapping.i_mmap)
    return []


def rmap_walk(folio: Folio, owner_of: dict[int, MmStruct]) -> Iterator[RmapHit]:
    """Yield every PTE/PMD mapping ``folio`` (``rmap_walk_anon`` / ``rmap_walk_file``).

    ``owner_of`` maps ``id(vma)`` to its mm (the kernel's ``vma->vm_mm``).
    """
    for vma in _candidate_vmas(folio):
        mm = owner_of.get(id(vma))
        if mm is None:
            continue
        first = vma.vm_start + ((folio.index - vma.vm_pgoff) << PAGE_SHIFT)
        i = 0
        while i < folio.nr_pages:
            addr = first + (i << PAGE_SHIFT)
            i += 1
            if not vma.vm_start <= addr < vma.vm_end:
                continue
            pmd = mm.pgtables.pmd_table(addr, False)
            if pmd is None:
                continue
            e = pmd[(addr >> 21) & 511]
            if e & _PAGE_PSE:  # a 1 GiB hugetlb page is 512 such leaves in vmemu
                if not (i - 1) & 511:
                    if ((e & PTE_PFN_MASK) >> PAGE_SHIFT) == folio.pfn + i - 1:
                        yield RmapHit(mm, vma, addr, "pmd")
                    i += 511  # the rest of this leaf's pages
                continue
            pte = mm.pgtables.get_pte(addr)
            if pte & (_PAGE_PRESENT | _PAGE_PROTNONE) and not pte & _PAGE_SPECIAL and \
                    (pte & PTE_PFN_MASK) >> PAGE_SHIFT == folio.pfn + i - 1:
                yield RmapHit(mm, vma, addr, "pte")


def folio_is_anon(folio: Folio) -> bool:
    """True for an anonymous folio (``folio_test_anon``)."""
    return bool(folio.flags & PG.anon)
