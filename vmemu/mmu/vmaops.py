"""Splitting, merging and removing VMAs: the parts of ``mm/vma.c`` mappings observe.

Every operation that changes a property of part of a VMA goes through
:func:`vma_modify`: split at the range's edges (``split_vma``), change the
middle piece, then merge it with equal neighbours
(``vma_merge_existing_range``). The result is the same set of VMAs the
kernel would show in /proc/<pid>/maps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vmemu.constants import PAGE_SHIFT
from vmemu.errors import raise_errno
from vmemu.mmu.vma import Vma, anon_vma_clone, anon_vma_unlink, can_merge

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

import errno

# /proc/sys/vm/max_map_count default (DEFAULT_MAX_MAP_COUNT)
DEFAULT_MAX_MAP_COUNT = 65530


def _link_file(vma: Vma) -> None:
    if vma.vm_file is not None:
        vma.vm_file.i_mmap.append(vma)


def unlink_file_vma(vma: Vma) -> None:
    """Remove ``vma`` from its file's i_mmap; drop the file's pages with its last user."""
    f = vma.vm_file
    if f is None:
        return
    f.i_mmap = [v for v in f.i_mmap if v is not vma]
    if not f.i_mmap and f.file_refs == 0:
        f.truncate()


def vma_dup(vma: Vma) -> Vma:
    """A copy of ``vma`` sharing its file and anon_vma links (``vm_area_dup``)."""
    new = Vma(vma.vm_start, vma.vm_end, vma.vm_flags, vma.vm_pgoff, vma.vm_file,
              None, [], vma.vm_userfaultfd_ctx, vma.anon_name, vma.vm_private_data)
    anon_vma_clone(new, vma)
    _link_file(new)
    return new


def split_vma(mm: MmStruct, vma: Vma, addr: int, check_count: bool = True) -> Vma:
    """Split ``vma`` at ``addr``; returns the upper part (``split_vma``).

    Fails with ENOMEM when the mm already has ``max_map_count`` VMAs.
    """
    assert vma.vm_start < addr < vma.vm_end
    if check_count and len(mm.vmas) >= mm.max_map_count:
        raise_errno(errno.ENOMEM, "max_map_count")
    mm.split_huge_pmd_at(vma, addr)
    new = vma_dup(vma)
    new.vm_start = addr
    new.vm_pgoff = vma.vm_pgoff + ((addr - vma.vm_start) >> PAGE_SHIFT)
    mm.vmas.remove(vma)
    vma.vm_end = addr
    mm.vmas.insert(vma)
    mm.vmas.insert(new)
    return new


def split_range(mm: MmStruct, vma: Vma, start: int, end: int) -> Vma:
    """Split ``vma`` so that one VMA covers exactly ``[start, end)`` ∩ vma; return it."""
    if start > vma.vm_start:
        vma = split_vma(mm, vma, start)
    if end < vma.vm_end:
        split_vma(mm, vma, end)
    return vma


def remove_vma(mm: MmStruct, vma: Vma) -> None:
    """Take ``vma`` out of the mm and drop its links (``remove_vma``)."""
    mm.vmas.remove(vma)
    close = getattr(vma.vm_file, "vm_close", None)  # vm_ops->close (hugetlb reservations)
    if close is not None:
        close(vma)
    anon_vma_unlink(vma)
    unlink_file_vma(vma)


def _merge_into(mm: MmStruct, keep: Vma, gone: Vma) -> None:
    """Absorb the adjacent ``gone`` into ``keep`` (``commit_merge``)."""
    if keep.anon_vma is None and gone.anon_vma is not None:
        anon_vma_clone(keep, gone)
    mm.vmas.remove(gone)
    if gone.vm_start < keep.vm_start:
        mm.vmas.remove(keep)
        keep.vm_pgoff = gone.vm_pgoff
        keep.vm_start = gone.vm_start
        mm.vmas.insert(keep)
    else:
        keep.vm_end = gone.vm_end
    anon_vma_unlink(gone)
    unlink_file_vma(gone)


def vma_merge_neighbours(mm: MmStruct, vma: Vma) -> Vma:
    """Merge ``vma`` with its previous and next VMAs where allowed; return the survivor."""
    prev = mm.vmas.prev_of(vma)
    if prev is not None and can_merge(prev, vma):
        _merge_into(mm, prev, vma)
        vma = prev
    nxt = mm.vmas.next_of(vma)
    if nxt is not None and can_merge(vma, nxt):
        _merge_into(mm, vma, nxt)
    return vma


def vma_modify(mm: MmStruct, vma: Vma, start: int, end: int,
               change: Callable[[Vma], None]) -> Vma:
    """Apply ``change`` to the part of ``vma`` in ``[start, end)`` (``vma_modify``).

    Returns the VMA that now covers the range (possibly merged with a neighbour).
    """
    start, end = max(start, vma.vm_start), min(end, vma.vm_end)
    whole = start == vma.vm_start and end == vma.vm_end
    piece = split_range(mm, vma, start, end)
    change(piece)
    if whole and getattr(vma.vm_file, "vm_close", None) is not None:
        # merging would delete the VMA itself, and a VMA with a vm_ops->close hook
        # (hugetlb) cannot be removed by a merge (can_merge_remove_vma)
        return piece
    return vma_merge_neighbours(mm, piece)
