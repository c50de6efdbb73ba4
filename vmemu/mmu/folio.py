"""Physical memory: page frames, folios, the zero page and a memory limit.

Mirrors the parts of ``include/linux/mm_types.h`` (``struct folio``) and
``mm/page_alloc.c`` that user-visible behaviour depends on. Physical memory
is lazy: a frame exists only once something allocates it, so an emulated
terabyte mapping costs nothing until touched. ``mem_map`` is indexed by
page frame number like the kernel's; page-table pages live there too.

A folio of order *n* covers ``2**n`` consecutive frames and owns one
``bytearray`` holding its data. Counting follows the kernel:

* ``refcount`` - every reference: each mapping PTE/PMD, the page cache,
  the swap cache, pins (``folio_ref_count``).
* ``mapcount`` - how many page-table entries map the folio
  (``folio_mapcount``); ``entire_mapcount`` counts PMD mappings of a
  large folio.

The shared zero page is special: mapped read-only by anonymous read
faults, never counted (``vm_normal_page`` returns NULL for it). The *huge*
zero page is its 2 MiB twin, made on first use (``get_huge_zero_folio``)
and mapped by special PMD leaves on read faults in THP-eligible ranges.
"""

from __future__ import annotations

import enum
import sys
from collections import Counter
from typing import Any

import attrs

from vmemu.constants import PAGE_SIZE

FIRST_PFN = 0x100  # frames below are "firmware"; pfn 0 never maps anything


class PG(enum.IntFlag):
    """Folio flags (``enum pageflags`` in ``include/linux/page-flags.h``)."""

    NONE = 0
    locked = 1 << 0
    referenced = 1 << 1
    uptodate = 1 << 2
    dirty = 1 << 3
    lru = 1 << 4
    active = 1 << 5
    swapbacked = 1 << 6
    swapcache = 1 << 7
    hwpoison = 1 << 8
    anon = 1 << 9
    anon_exclusive = 1 << 10
    mlocked = 1 << 11
    zero = 1 << 12
    large = 1 << 13
    hugetlb = 1 << 14


#: The 4 KiB buffers of freed order-0 frames, for ``alloc_folio`` to reuse, as the buddy
#: allocator's free lists hand back pages that are already there. A fresh ``bytearray`` is
#: heap memory the host kernel backs page by page on first touch - about 2.5 us for each
#: 4 KiB on this project's VM, a large part of a COPY or of an anonymous write fault, and
#: glibc gives freed heap memory back to the host often enough that it is paid again and
#: again - where a reused buffer costs a 4 KiB memset or copy. Shared by every machine in
#: the interpreter, capped at ``_FRAME_CACHE_MAX`` buffers; a buffer is reused only once
#: nothing else references it (a TLB entry not flushed yet, a memoryview, a freed folio
#: someone kept), so nobody can see old contents change.
_FRAME_CACHE: list[bytearray] = []
_FRAME_CACHE_MAX = 8192  # 32 MiB
_ZERO_PAGE = bytes(PAGE_SIZE)


@attrs.define(eq=False, slots=True, repr=False)
class Folio:
    """A power-of-two group of physically contiguous frames (``struct folio``)."""

    pfn: int
    order: int
    data: bytearray
    flags: int = 0
    refcount: int = 0
    mapcount: int = 0
    entire_mapcount: int = 0
    mapping: Any = None
    index: int = 0
    private: Any = None
    subpages: list[memoryview] | None = None  # cached 4 KiB views of a large folio
    pincount: int = 0  # FOLL_PIN references (each also one refcount), ``folio_maybe_dma_pinned``

    @property
    def nr_pages(self) -> int:
        """Frames in the folio (``folio_nr_pages``)."""
        return 1 << self.order

    def test(self, flag: PG) -> bool:
        """True when ``flag`` is set (``folio_test_*``)."""
        return bool(self.flags & flag)

    def set(self, flag: PG) -> None:
        """Set ``flag`` (``folio_set_*``)."""
        self.flags |= flag

    def clear(self, flag: PG) -> None:
        """Clear ``flag`` (``folio_clear_*``)."""
        self.flags &= ~flag

    def page_buffer(self, pfn: int) -> memoryview | bytearray:
        """The 4 KiB of data for frame ``pfn`` of this folio."""
        if self.order == 0:
            return self.data
        views = self.subpages
        if views is None:  # made once, so the TLB and check() see the same objects
            mv = memoryview(self.data)
            views = self.subpages = [mv[i:i + PAGE_SIZE]
                                     for i in range(0, self.nr_pages * PAGE_SIZE, PAGE_SIZE)]
        return views[pfn - self.pfn]

    def __repr__(self) -> str:
        names = [f.name for f in PG if f and self.flags & f]
        return (f"Folio(pfn={self.pfn:#x}, order={self.order}, ref={self.refcount}, "
                f"map={self.mapcount}, flags={'|'.join(n for n in names if n)})")


def folio_maybe_dma_pinned(folio: Folio) -> bool:
    """True while a FOLL_PIN reference holds the folio (``folio_maybe_dma_pinned``)."""
    return folio.pincount > 0


def folio_maybe_mapped_shared(folio: Folio) -> bool:
    """True when some page of ``folio`` may be mapped twice (``folio_maybe_mapped_shared``).

    A PMD mapping maps every page once; vmemu splits partly mapped THPs at
    once, so a large folio is mapped by whole copies and is shared exactly
    when it maps more page-mappings than it has pages.
    """
    if not folio.order:
        return folio.mapcount > 1
    entire = folio.entire_mapcount
    return entire * folio.nr_pages + folio.mapcount - entire > folio.nr_pages


@attrs.frozen
class PhysMemStats:
    """A snapshot of physical memory use."""

    folios: int
    pages_in_use: int
    page_tables: int
    limit_pages: int | None
    oom_failures: int


class PhysMem:
    """The machine's physical memory: a lazily grown ``mem_map`` of frames.

    ``alloc_folio`` mirrors ``folio_alloc``: it returns ``None`` when the
    configured limit is reached (after asking the reclaim hook to free
    something), and the fault path turns that into ``VM_FAULT_OOM``. It
    never raises ``MemoryError``.
    """

    def __init__(self, limit_pages: int | None = None) -> None:
        self.mem_map: list[Any] = [None] * FIRST_PFN
        self._free: dict[int, list[int]] = {}
        self.limit_pages = limit_pages
        self.pages_in_use = 0
        self.page_tables = 0
        self.nr_folios = 0
        self.oom_failures = 0
        # called with the number of frames wanted when an allocation would pass
        # the limit (try_to_free_pages in vmemu.mmu.vmscan); None disables reclaim
        self.reclaim_hook: Any = self._try_to_free_pages
        self.swap: Any = None  # the machine's SwapSpace (vmemu.mmu.swapfile), made on first use
        self.mms: list[Any] = []  # live address spaces, for check() and rmap
        self.runtime: Any = None  # the kernel's runtime: costs are charged to it
        self.hugetlb: Any = None  # the hugetlb pool (vmemu.mmu.hugetlb), made on first use
        self.thp_enabled = "madvise"  # /sys/kernel/mm/transparent_hugepage/enabled
        self.thp_use_zero_page = True  # /sys/kernel/mm/transparent_hugepage/use_zero_page
        self.vmstat: Counter[str] = Counter()  # /proc/vmstat events (thp_fault_alloc, ...)
        zero = Folio(pfn=self._take_pfns(0), order=0, data=bytearray(PAGE_SIZE),
                     flags=PG.zero | PG.uptodate | PG.locked)
        self.mem_map[zero.pfn] = zero
        self.zero_folio = zero
        self.zero_pfn = zero.pfn
        self.zero_data = bytes(PAGE_SIZE)
        self.huge_zero_folio: Folio | None = None
        self.huge_zero_pfn = -1  # no frame until the huge zero page exists

    def get_huge_zero_folio(self) -> Folio:
        """The huge zero page, allocated on first use (``mm_get_huge_zero_folio``).

        Like the 4 KiB zero page it is never counted against the memory
        limit nor freed; vmstat ``thp_zero_page_alloc`` counts its creation.
        """
        folio = self.huge_zero_folio
        if folio is None:
            order = 9  # HPAGE_PMD_ORDER
            n = 1 << order
            pfn = self._take_pfns(order)
            folio = Folio(pfn=pfn, order=order, data=bytearray(n * PAGE_SIZE),
                          flags=PG.zero | PG.large | PG.uptodate | PG.locked)
            self.mem_map[pfn:pfn + n] = [folio] * n
            self.huge_zero_folio = folio
            self.huge_zero_pfn = pfn
            self.vmstat["thp_zero_page_alloc"] += 1
        return folio

    def _take_pfns(self, order: int) -> int:
        free = self._free.get(order)
        if free:
            return free.pop()
        if not order:  # the common case: one frame at the end, no alignment to pad
            self.mem_map.append(None)
            return len(self.mem_map) - 1
        n = 1 << order
        start = len(self.mem_map)
        start = (start + n - 1) & ~(n - 1)  # natural alignment, as the buddy allocator gives
        pad = start - len(self.mem_map)
        if pad:
            self.mem_map.extend([None] * pad)
        self.mem_map.extend([None] * n)
        return start

    def alloc_folio(self, order: int = 0, zero: bool = True) -> Folio | None:
        """Allocate a folio of ``2**order`` frames with refcount 1, or None at the limit.

        Zero-filled; ``zero=False`` is for a caller that overwrites all of it at once (a
        COPY): a reused order-0 buffer then keeps its old bytes until the caller does.
        """
        n = 1 << order
        if self.limit_pages is not None and self.pages_in_use + n > self.limit_pages:
            if self.reclaim_hook is not None:
                self.reclaim_hook(self.pages_in_use + n - self.limit_pages)
            if self.pages_in_use + n > self.limit_pages:
                self.oom_failures += 1
                return None
        free = self._free.get(order)
        if free:
            pfn = free.pop()
        elif order:
            pfn = self._take_pfns(order)
        else:  # _take_pfns(0) without its free list: one frame at the end
            pfn = len(self.mem_map)
            self.mem_map.append(None)
        data = None
        while not order and _FRAME_CACHE:
            try:
                data = _FRAME_CACHE.pop()
            except IndexError:  # another thread took the last one
                data = None
                break
            if sys.getrefcount(data) == 2:  # this frame's variable and the call's argument
                if zero:
                    data[:] = _ZERO_PAGE
                break
            data = None  # still referenced elsewhere: leave it to its holder
        if data is None:
            data = bytearray(n * PAGE_SIZE)
        folio = Folio(pfn, order, data, 0, 1)
        if order:
            folio.flags = PG.large
            self.mem_map[pfn:pfn + n] = [folio] * n
        else:
            self.mem_map[pfn] = folio
        self.pages_in_use += n
        self.nr_folios += 1
        if self.runtime is not None:
            self.runtime.charge("page_alloc", n)
        return folio

    def alloc_folios_bulk(self, datas: list[bytearray], flags: int, mapping: Any, index: int,
                          mapcount: int) -> list[Folio]:
        """Order-0 folios holding ``datas``, at consecutive ``index`` values (``alloc_pages_bulk``).

        Each folio gets refcount 1 and the given ``flags``, ``mapping`` and
        ``mapcount`` (the caller maps them at once). The frames come from
        the free list first, in the order single allocations would take
        them. The caller checks the memory limit beforehand: this never
        reclaims and never fails.
        """
        n = len(datas)
        mem_map = self.mem_map
        pfns: list[int] = []
        free = self._free.get(0)
        if free:
            pfns = free[-n:]
            del free[-n:]
            pfns.reverse()  # what n successive pops would give
        need = n - len(pfns)
        if need:
            base = len(mem_map)
            mem_map.extend([None] * need)
            pfns.extend(range(base, base + need))
        folios = [Folio(pfn, 0, data, flags, 1, mapcount, 0, mapping, index + i)
                  for i, (pfn, data) in enumerate(zip(pfns, datas, strict=True))]
        for f in folios:
            mem_map[f.pfn] = f
        self.pages_in_use += n
        self.nr_folios += n
        if self.runtime is not None:
            self.runtime.charge("page_alloc", n)
        return folios

    def _try_to_free_pages(self, nr_pages: int) -> None:
        """The default reclaim hook: swap out or discard ``nr_pages`` frames if possible."""
        from vmemu.mmu.vmscan import try_to_free_pages

        try_to_free_pages(self, nr_pages)

    def free_folio(self, folio: Folio) -> None:
        """Return a folio's frames to the allocator (``free_unref_folios``)."""
        n = folio.nr_pages
        if folio.refcount != 0 or folio.mapcount != 0:
            raise AssertionError(f"freeing a referenced folio: {folio!r}")
        self.mem_map[folio.pfn:folio.pfn + n] = [None] * n
        self._free.setdefault(folio.order, []).append(folio.pfn)
        if not folio.order and len(_FRAME_CACHE) < _FRAME_CACHE_MAX and \
                type(folio.data) is bytearray:
            _FRAME_CACHE.append(folio.data)  # reused once nothing else holds it
        self.pages_in_use -= n
        self.nr_folios -= 1
        if folio.flags & PG.hugetlb:
            self.hugetlb.free_huge_folio(folio)  # back to the pool (free_huge_folio)

    def folio_put(self, folio: Folio, nr: int = 1) -> None:
        """Drop ``nr`` references; free the folio at zero (``folio_put_refs``)."""
        folio.refcount -= nr
        if folio.refcount == 0:
            self.free_folio(folio)
        elif folio.refcount < 0:
            raise AssertionError(f"refcount underflow: {folio!r}")

    def alloc_table(self) -> tuple[int, list[int]]:
        """Allocate a zeroed page-table page (``pte_alloc_one``); returns (pfn, entries)."""
        pfn = self._take_pfns(0)
        table = [0] * 512
        self.mem_map[pfn] = table
        self.page_tables += 1
        return pfn, table

    def free_table(self, pfn: int) -> None:
        """Free a page-table page (``pte_free``)."""
        self.mem_map[pfn] = None
        self._free.setdefault(0, []).append(pfn)
        self.page_tables -= 1

    def pfn_to_folio(self, pfn: int) -> Folio:
        """The folio containing frame ``pfn`` (``pfn_folio``)."""
        obj = self.mem_map[pfn]
        if not isinstance(obj, Folio):
            raise AssertionError(f"pfn {pfn:#x} is not a folio frame")
        return obj

    def extra_refs(self, folio: Folio) -> int:
        """References besides page-table mappings: page cache, swap cache (for ``check()``)."""
        n = 0
        mapping = folio.mapping
        if mapping is not None and getattr(mapping, "pages", None) is not None and \
                mapping.pages.get(folio.index) is folio:
            n += 1
        huge = getattr(mapping, "huge", None)
        if huge is not None and folio.order and huge.get(folio.index >> folio.order) is folio:
            n += 1  # a hugetlbfs page cache, keyed by huge-page index
        if folio.flags & PG.swapcache:
            n += 1
        if folio.flags & PG.hwpoison:
            n += 1  # memory_failure keeps the frame out of service
        return n + folio.pincount

    def statistics(self) -> PhysMemStats:
        """A frozen snapshot of frame usage."""
        return PhysMemStats(self.nr_folios, self.pages_in_use, self.page_tables,
                            self.limit_pages, self.oom_failures)

    def live_folios(self) -> list[Folio]:
        """Every allocated folio except the zero pages, for ``mm.check()``."""
        seen: list[Folio] = []
        last = None
        for obj in self.mem_map:
            if isinstance(obj, Folio) and obj is not last and obj is not self.zero_folio and \
                    obj is not self.huge_zero_folio:
                seen.append(obj)
                last = obj
        return seen
