"""A software TLB: cached translations from virtual page to page data.

Real x86 TLBs cache (virtual page -> frame, permissions) and are filled by
the hardware page walker; the kernel must flush them after every change
that narrows what an entry allows (``flush_tlb_range``, ``flush_tlb_mm``,
``flush_tlb_page`` in ``arch/x86/mm/tlb.c``). vmemu keeps two dicts per mm,
keyed by virtual page number: ``r`` for pages that may be read and ``w``
for pages that may be written *and* whose PTE is already dirty (so a TLB
write hit never needs to touch the PTE, as on hardware). A miss walks the
page tables, setting the accessed (and dirty) bit as the hardware walker
does, and fills the entry.

Capacity is bounded like a second-level TLB; the oldest entry is evicted
first. Flushes are counted so tests and benchmarks can see them.

``r`` is an ``OrderedDict`` so that finding the oldest entry is O(1): in a
plain dict, ``next(iter(d))`` after many deletions from the front skips
every deleted slot left behind, which made each eviction cost microseconds
once a process touched more pages than the TLB holds.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import attrs

from vmemu.constants import PAGE_SHIFT

DEFAULT_TLB_ENTRIES = 4096
#: A range flush of more pages than this flushes the whole TLB instead, as
#: ``flush_tlb_mm_range`` does on x86 (``tlb_single_page_flush_ceiling``): one
#: full flush is cheaper than a long run of single-page ones, and the entries it
#: drops beyond the range are only refilled by the next walk.
TLB_SINGLE_PAGE_FLUSH_CEILING = 33


@attrs.frozen
class TlbStats:
    """Counters of a TLB (``/proc/vmstat`` nr_tlb_* in spirit)."""

    entries: int
    hits_filled: int
    flush_all: int
    flush_range: int
    flush_page: int
    evictions: int


class Tlb:
    """Per-mm translation cache with explicit flushes."""

    __slots__ = ("r", "w", "capacity", "fills", "n_flush_all", "n_flush_range",
                 "n_flush_page", "evictions", "__weakref__")

    def __init__(self, capacity: int = DEFAULT_TLB_ENTRIES) -> None:
        self.r: OrderedDict[int, Any] = OrderedDict()
        self.w: dict[int, Any] = {}
        self.capacity = capacity
        self.fills = 0
        self.n_flush_all = 0
        self.n_flush_range = 0
        self.n_flush_page = 0
        self.evictions = 0

    def fill(self, vpn: int, buf: Any, writable: bool | int) -> None:
        """Install a translation after a successful walk (``writable``: any true value)."""
        r = self.r
        if vpn not in r and len(r) >= self.capacity:
            old, _ = r.popitem(last=False)  # the oldest
            self.w.pop(old, None)
            self.evictions += 1
        r[vpn] = buf
        if writable:
            self.w[vpn] = buf
        else:
            self.w.pop(vpn, None)
        self.fills += 1

    def flush_page(self, addr: int) -> None:
        """Drop the translation of one page (``flush_tlb_page``)."""
        vpn = addr >> PAGE_SHIFT
        self.r.pop(vpn, None)
        self.w.pop(vpn, None)
        self.n_flush_page += 1

    def flush_range(self, start: int, end: int) -> None:
        """Drop translations of ``[start, end)``, or of everything past the ceiling
        (``flush_tlb_range``)."""
        lo, hi = start >> PAGE_SHIFT, (end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        r, w = self.r, self.w
        if hi - lo > TLB_SINGLE_PAGE_FLUSH_CEILING:
            r.clear()
            w.clear()
        elif hi - lo > len(r):
            for vpn in [v for v in r if lo <= v < hi]:
                del r[vpn]
                w.pop(vpn, None)
        else:
            for vpn in range(lo, hi):
                if r.pop(vpn, None) is not None:
                    w.pop(vpn, None)
        self.n_flush_range += 1

    def flush_writable(self, start: int, end: int) -> None:
        """Drop only write permission for ``[start, end)`` (everywhere past the ceiling),
        e.g. after write-protecting."""
        lo, hi = start >> PAGE_SHIFT, (end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        w = self.w
        if hi - lo > TLB_SINGLE_PAGE_FLUSH_CEILING:
            w.clear()
        elif hi - lo > len(w):
            for vpn in [v for v in w if lo <= v < hi]:
                del w[vpn]
        else:
            for vpn in range(lo, hi):
                w.pop(vpn, None)
        self.n_flush_range += 1

    def flush_all(self) -> None:
        """Drop every translation (``flush_tlb_mm``)."""
        self.r.clear()
        self.w.clear()
        self.n_flush_all += 1

    def statistics(self) -> TlbStats:
        """A frozen snapshot of the counters."""
        return TlbStats(len(self.r), self.fills, self.n_flush_all, self.n_flush_range,
                        self.n_flush_page, self.evictions)
