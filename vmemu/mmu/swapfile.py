"""Swap devices: slots, swap counts and the machine's swap space (``mm/swapfile.c``).

A swap device (:class:`SwapInfo`, the kernel's ``swap_info_struct``) is an
array of page-sized *slots* numbered by offset; slot 0 holds the swap
header on Linux and is never handed out, so a device of ``pages`` slots
offers offsets ``1..pages``. ``swap_map[offset]`` counts the references to
a slot: one per swap PTE naming it, one per shmem page-cache entry that
was swapped out. Whether the slot also has a folio in the swap cache is
the kernel's ``SWAP_HAS_CACHE`` bit; here it is the presence of the entry
in the swap cache dict (:mod:`vmemu.mmu.swap_state`), so the two can never
disagree. A slot is free when its count is 0 and it is not cached.

Slot contents live in a pluggable :class:`~vmemu.backends.PageStore`
under the key ``(type, offset)``.

A swap entry travels as the int of its non-present PTE without software
bits (``swp_entry(type, offset)`` in :mod:`vmemu.mmu.pgtable`), so
``hex(entry)`` reads as in the kernel and ``describe_entry`` names it.

Simplified: counts are unbounded ints (no ``SWAP_MAP_MAX`` continuation
pages), allocation is one slot at a time (no clusters, no large-folio
swap), and devices of equal priority are used in type order instead of
round-robin.
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, Any

import attrs

from vmemu.backends.pagestore import MemoryPageStore, PageStore
from vmemu.errors import raise_errno
from vmemu.mmu.folio import PG
from vmemu.mmu.pgtable import (
    MAX_SWAPFILES,
    is_real_swap_pte,
    swp_entry,
    swp_entry_clean,
    swp_offset,
    swp_type,
)

if TYPE_CHECKING:
    from vmemu.mmu.folio import Folio, PhysMem

# PG bits as plain ints: IntFlag operators are Python-level calls, too slow on
# the reclaim and swap-in paths (folio.flags is made a plain int on entry)
PG_DIRTY = int(PG.dirty)
PG_ANON = int(PG.anon)
PG_ANON_EXCLUSIVE = int(PG.anon_exclusive)
PG_SWAPBACKED = int(PG.swapbacked)
PG_SWAPCACHE = int(PG.swapcache)
PG_UPTODATE = int(PG.uptodate)
PG_REFERENCED = int(PG.referenced)
PG_ACTIVE = int(PG.active)
PG_MLOCKED = int(PG.mlocked)
PG_LARGE = int(PG.large)
PG_HUGETLB = int(PG.hugetlb)
PG_UNEVICTABLE = int(PG.hugetlb | PG.hwpoison | PG.zero | PG.mlocked)  # never reclaimed

SWP_USED = 1 << 0  # swap_info_struct.flags
SWP_WRITEOK = 1 << 1
DEFAULT_SWAP_PAGES = 1024


@attrs.frozen
class SwapStats:
    """A snapshot of the machine's swap and reclaim counters (``/proc/vmstat`` names)."""

    total_slots: int  # usable slots over all devices (SwapTotal / 4 KiB)
    used_slots: int  # slots in use (SwapTotal - SwapFree)
    swap_cache: int  # folios in the swap cache
    pswpin: int  # pages read from swap
    pswpout: int  # pages written to swap
    pgscan: int  # folios looked at by reclaim
    pgsteal: int  # folios reclaimed (freed)
    pglazyfreed: int  # MADV_FREE pages discarded by reclaim
    shmem_swapped: int  # shmem pages whose page-cache entry is a swap entry


class SwapInfo:
    """One swap device (``struct swap_info_struct``)."""

    def __init__(self, type_: int, pages: int, store: PageStore, prio: int) -> None:
        self.type = type_
        self.flags = SWP_USED | SWP_WRITEOK
        self.prio = prio
        self.max = pages + 1  # offsets 0..max-1; 0 is the header
        self.pages = pages
        self.inuse_pages = 0
        self.swap_map: list[int] = [0] * self.max
        self.store = store
        self.cluster_next = 1  # where the next slot search starts (si->cluster_next)

    def key(self, offset: int) -> tuple[int, int]:
        """The page-store key of slot ``offset``."""
        return (self.type, offset)

    def __repr__(self) -> str:
        return (f"SwapInfo(type={self.type}, prio={self.prio}, pages={self.pages}, "
                f"inuse={self.inuse_pages})")


class SwapSpace:
    """All swap state of one machine: devices by type, swap cache, reclaim state.

    Lives at ``phys.swap``; made on first use by :func:`get_swap_space`.
    ``lock`` serialises swap operations between threads (the kernel's
    ``si->lock`` and swap-cache xarray lock rolled into one); it is never
    held while blocking on an mm's lock.
    """

    def __init__(self, phys: PhysMem) -> None:
        self.phys = phys
        self.swap_info: list[SwapInfo | None] = []
        self.cache: dict[int, Folio] = {}  # swap entry -> folio (the swap address_space)
        self.shmem_swaplist: dict[int, Any] = {}  # ino -> inode with swapped pages
        self.lock = threading.RLock()
        self.least_priority = -1
        self.lru_hand = 0  # reclaim's clock hand: a pfn in mem_map
        self.cold: dict[int, None] = {}  # pfns of MADV_COLD folios, oldest first
        self.pswpin = 0
        self.pswpout = 0
        self.pgscan = 0
        self.pgsteal = 0
        self.pglazyfreed = 0

    # -- devices ----------------------------------------------------------------

    def active(self) -> list[SwapInfo]:
        """Writable devices, highest priority first (``swap_avail_heads``)."""
        devs = [si for si in self.swap_info if si is not None and si.flags & SWP_WRITEOK]
        devs.sort(key=lambda si: (-si.prio, si.type))
        return devs

    def swap_info_get(self, entry: int) -> SwapInfo | None:
        """The device an entry names, or None for a bad entry (``_swap_info_get``)."""
        t = swp_type(entry)
        if t >= len(self.swap_info):
            return None
        si = self.swap_info[t]
        if si is None or not 0 < swp_offset(entry) < si.max:
            return None
        return si

    def nr_swap_pages(self) -> int:
        """Free slots over all writable devices (``get_nr_swap_pages``)."""
        return sum(si.pages - si.inuse_pages for si in self.swap_info
                   if si is not None and si.flags & SWP_WRITEOK)

    def total_swap_pages(self) -> int:
        """Usable slots over all writable devices (``total_swap_pages``)."""
        return sum(si.pages for si in self.swap_info if si is not None and si.flags & SWP_WRITEOK)

    def vm_swap_full(self) -> bool:
        """True when more than half of swap is in use (``vm_swap_full``)."""
        return self.nr_swap_pages() * 2 < self.total_swap_pages()

    # -- slots --------------------------------------------------------------------

    def get_swap_page(self) -> int | None:
        """Allocate a free slot; returns its swap entry, or None when swap is full or absent.

        The slot starts with count 0; the caller puts a folio in the swap
        cache at once (``folio_alloc_swap`` + ``add_to_swap_cache``).
        """
        for si in self.active():
            if si.inuse_pages >= si.pages:
                continue
            off = si.cluster_next
            for _ in range(si.pages):
                if off >= si.max:
                    off = 1
                if si.swap_map[off] == 0 and swp_entry(si.type, off) not in self.cache:
                    si.inuse_pages += 1
                    si.cluster_next = off + 1
                    return swp_entry(si.type, off)
                off += 1
        return None

    def swap_duplicate(self, entry: int) -> None:
        """Add a reference to a slot: fork copied a swap PTE (``swap_duplicate``)."""
        si = self.swap_info_get(entry)
        assert si is not None, f"swap_duplicate of bad entry {entry:#x}"
        si.swap_map[swp_offset(entry)] += 1

    def swap_count(self, entry: int) -> int:
        """References to a slot, the cache excluded (``swp_swapcount``)."""
        si = self.swap_info_get(entry)
        return 0 if si is None else si.swap_map[swp_offset(entry)]

    def swap_free(self, entry: int) -> None:
        """Drop one reference; free the slot when nothing else holds it (``swap_free``)."""
        si = self.swap_info_get(entry)
        assert si is not None, f"swap_free of bad entry {entry:#x}"
        off = swp_offset(entry)
        assert si.swap_map[off] > 0, f"swap_free of unused entry {entry:#x}"
        si.swap_map[off] -= 1
        if si.swap_map[off] == 0 and entry not in self.cache:
            self._release_slot(si, off)

    def swapcache_clear(self, entry: int) -> None:
        """The swap cache let go of ``entry``: free the slot if no count remains."""
        si = self.swap_info_get(entry)
        assert si is not None
        off = swp_offset(entry)
        if si.swap_map[off] == 0:
            self._release_slot(si, off)

    def _release_slot(self, si: SwapInfo, off: int) -> None:
        si.inuse_pages -= 1
        si.store.erase(si.key(off))

    def free_swap_and_cache(self, entry: int) -> None:
        """A swap PTE was zapped (``free_swap_and_cache``).

        Drops the reference; when that was the last one and the swap cache
        holds an unmapped folio for the slot, that folio goes too
        (``__try_to_reclaim_swap`` with ``TTRS_UNMAPPED``).
        """
        from vmemu.mmu.swap_state import delete_from_swap_cache

        self.swap_free(entry)
        if self.swap_count(entry) == 0:
            folio = self.cache.get(entry)
            if folio is not None and folio.mapcount == 0 and \
                    folio.refcount == 1:
                delete_from_swap_cache(self, folio)

    # -- statistics and checks --------------------------------------------------------

    def statistics(self) -> SwapStats:
        """A frozen snapshot of the swap and reclaim counters."""
        total = self.total_swap_pages()
        return SwapStats(total, total - self.nr_swap_pages(), len(self.cache), self.pswpin,
                         self.pswpout, self.pgscan, self.pgsteal, self.pglazyfreed,
                         sum(len(i.swapped) for i in self.shmem_swaplist.values()))

    def _check(self, mms: list[Any]) -> None:
        """Every slot's count equals its references; no slot, cache entry or stored page leaks."""
        refs: dict[int, int] = {}
        for mm in mms:
            for _addr, e, level in mm.pgtables.iter_present():
                if level == "pte" and is_real_swap_pte(e):
                    k = swp_entry_clean(e)
                    refs[k] = refs.get(k, 0) + 1
        for ino, inode in self.shmem_swaplist.items():
            assert inode.ino == ino and inode.swapped, f"stale shmem_swaplist entry {inode!r}"
            for index, k in inode.swapped.items():
                assert index not in inode.pages, f"{inode!r} index {index} cached and swapped"
                refs[k] = refs.get(k, 0) + 1
        for k, folio in self.cache.items():
            assert folio.flags & PG_SWAPCACHE and folio.private == k, \
                f"swap cache entry {k:#x} maps {folio!r} (private={folio.private!r})"
            assert self.phys.mem_map[folio.pfn] is folio, f"swap cache holds freed {folio!r}"
            assert self.swap_info_get(k) is not None, f"swap cache entry {k:#x} on no device"
        for folio in self.phys.live_folios():
            if folio.flags & PG_SWAPCACHE:
                assert self.cache.get(folio.private) is folio, f"{folio!r} not in swap cache"
        for si in self.swap_info:
            if si is None:
                continue
            assert si.swap_map[0] == 0, f"{si!r}: header slot in use"
            inuse = 0
            for off in range(1, si.max):
                k = swp_entry(si.type, off)
                count = si.swap_map[off]
                assert count == refs.pop(k, 0), \
                    f"{si!r} offset {off:#x}: swap count {count} but {refs.get(k, 0)} references"
                if count or k in self.cache:
                    inuse += 1
            assert inuse == si.inuse_pages, f"{si!r}: {inuse} slots used, inuse_pages wrong"
            keys = getattr(si.store, "keys", None)
            if keys is not None:
                for key in keys():
                    if isinstance(key, tuple) and key[0] == si.type:
                        off = key[1]
                        assert si.swap_map[off] or swp_entry(si.type, off) in self.cache, \
                            f"{si!r}: store keeps data of free slot {off:#x}"
        assert not refs, f"swap PTEs name no device: {[hex(k) for k in refs]}"


def get_swap_space(phys: PhysMem) -> SwapSpace:
    """The machine's :class:`SwapSpace`, made on first use."""
    space: SwapSpace | None = phys.swap
    if space is None:
        space = SwapSpace(phys)
        phys.swap = space
    return space


def swapon(phys: PhysMem, store: PageStore | None = None, pages: int = DEFAULT_SWAP_PAGES,
           priority: int | None = None) -> int:
    """Add a swap device of ``pages`` slots backed by ``store``; returns its type (``swapon``).

    ``store`` defaults to a fresh :class:`~vmemu.backends.MemoryPageStore`.
    Without ``priority`` the device gets the next lower negative priority
    (-2, -3, ...) as ``swapon(8)`` without ``-p`` does. Raises EINVAL for a
    size below one page and EPERM when all ``MAX_SWAPFILES`` types are in use.
    """
    if pages < 1:
        raise_errno(errno.EINVAL, "swap area needs at least one page")
    if priority is not None and not -1 <= priority <= 32767:
        raise_errno(errno.EINVAL, "bad swap priority")
    space = get_swap_space(phys)
    with space.lock:
        try:
            type_ = space.swap_info.index(None)
        except ValueError:
            type_ = len(space.swap_info)
            if type_ >= MAX_SWAPFILES:
                raise_errno(errno.EPERM, "MAX_SWAPFILES reached")
            space.swap_info.append(None)
        if priority is None:
            space.least_priority -= 1  # the first device without -p gets -2
            priority = space.least_priority
        si = SwapInfo(type_, pages, store if store is not None else MemoryPageStore(), priority)
        space.swap_info[type_] = si
        return type_


def swapoff(phys: PhysMem, type_: int) -> None:
    """Remove swap device ``type_`` after reading every page on it back (``swapoff``).

    Raises EINVAL for an unknown device and ENOMEM (leaving the device in
    place) when memory runs out while swapping in.
    """
    from vmemu.mmu.swap_state import try_to_unuse

    space = phys.swap
    if space is None or not 0 <= type_ < len(space.swap_info) or space.swap_info[type_] is None:
        raise_errno(errno.EINVAL, f"no swap device {type_}")
    si = space.swap_info[type_]
    assert si is not None
    si.flags &= ~SWP_WRITEOK  # no new slots from here on
    try:
        try_to_unuse(space, si)  # takes each mm's lock, then the swap lock: never the reverse
    except OSError:
        si.flags |= SWP_WRITEOK
        raise
    with space.lock:
        space.swap_info[type_] = None
