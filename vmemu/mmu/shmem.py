"""shmem/tmpfs inodes: a page cache that several mappings share.

Mirrors the part of ``mm/shmem.c`` that mappings observe: an inode with a
size and a page cache (index -> folio). ``MAP_SHARED|MAP_ANONYMOUS``
memory is a shmem inode underneath (``shmem_zero_setup``), which is why it
stays shared across fork: the child maps the same page cache. The page
cache holds one reference on each folio; each PTE mapping it holds another.
"""

from __future__ import annotations

from typing import Any

from vmemu.constants import PAGE_SHIFT
from vmemu.mmu.folio import PG, Folio, PhysMem


class ShmemInode:
    """A tmpfs inode: ``i_size`` plus a page cache (``struct address_space``)."""

    _next_ino = 1

    def __init__(self, phys: PhysMem, size: int, name: str = "dev/zero") -> None:
        self.phys = phys
        self.i_size = size
        self.name = name
        self.pages: dict[int, Folio] = {}
        # index -> swap entry of a page out on swap (a value entry in the kernel's
        # xarray); find_folio / get_folio swap it back in (vmemu.mmu.swap_state)
        self.swapped: dict[int, int] = {}
        self.i_mmap: list[Any] = []  # VMAs mapping this inode (the i_mmap interval tree)
        self.file_refs = 0  # open files (memfd) besides the mappings
        self.seals = 0
        self.dev = "00:01"
        self.ino = ShmemInode._next_ino
        ShmemInode._next_ino += 1

    @property
    def nr_pages_size(self) -> int:
        """Pages covered by ``i_size``, rounded up."""
        return (self.i_size + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT

    def find_folio(self, index: int) -> Folio | None:
        """The cached folio at ``index`` or None (``filemap_get_folio``).

        A page out on swap is read back first, as ``shmem_get_folio`` does
        (None if memory runs out doing so).
        """
        folio = self.pages.get(index)
        if folio is None and index in self.swapped:
            from vmemu.mmu.swap_state import shmem_swapin_folio

            folio = shmem_swapin_folio(self, index)
        return folio

    def get_folio(self, index: int) -> Folio | None:
        """Find or allocate the folio at ``index`` (``shmem_get_folio(SGP_CACHE)``).

        Returns None when memory is exhausted.
        """
        folio = self.pages.get(index)
        if folio is not None:
            return folio
        if index in self.swapped:
            return self.find_folio(index)  # swap in; never a fresh page over a swapped one
        folio = self.phys.alloc_folio(0)
        if folio is None:
            return None
        folio.flags |= PG.swapbacked | PG.uptodate
        folio.mapping = self
        folio.index = index
        self.pages[index] = folio  # the page cache's reference is the initial one
        return folio

    def remove_folio(self, index: int) -> None:
        """Drop a cached page (``shmem_undo_range`` for one page); mappings must be gone."""
        folio = self.pages.pop(index, None)
        if folio is not None:
            folio.mapping = None
            self.phys.folio_put(folio)
        if index in self.swapped:
            from vmemu.mmu.swap_state import shmem_free_swap

            shmem_free_swap(self, index)

    def drop_range(self, first: int, last: int) -> None:
        """Remove cached pages with index in ``[first, last)`` (``shmem_undo_range``)."""
        for index in [i for i in [*self.pages, *self.swapped] if first <= i < last]:
            self.remove_folio(index)

    def proc_name(self) -> str:
        """The name /proc/<pid>/maps shows for mappings of this inode."""
        return self.name if self.name.startswith("/") else "/dev/zero (deleted)"

    def truncate(self) -> None:
        """Drop the whole page cache, as the last reference to the inode goes."""
        for index in [*self.pages, *self.swapped]:
            self.remove_folio(index)

    def __repr__(self) -> str:
        return f"ShmemInode(ino={self.ino}, size={self.i_size:#x}, cached={len(self.pages)})"
