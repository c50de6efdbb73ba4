"""Range ioctls done a PTE table at a time behave exactly as the page-by-page loop.

``mfill_atomic``, ``move_pages`` and ``uffd_wp_range`` handle runs of
ordinary pages in one go (``_mfill_run``, ``_move_run``, ``_wp_one_table``
and the slice-based ``_wp_entries``) and leave everything else to the page
path. Hypothesis draws a mixed address space - present pages, zero pages,
holes, uffd-wp markers and protected pages, on both sides of a PMD
boundary, sometimes under a memory limit that makes reclaim swap pages
out - and a sequence of COPY / ZEROPAGE / CONTINUE / MOVE /
WRITEPROTECT / MADV_DONTNEED / fork calls over ranges that start and end
anywhere; it runs them twice, once as shipped and once with the runs
switched off (the page path alone, and the write-protect loop as it was
written page by page), and requires the same result or errno and output
field for every call, and after every call the same page-table entries
(pfns aside), page contents, folio indexes and memory use, and
``mm.check()`` passing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st

import vmemu
from vmemu.constants import (
    MADV_DONTNEED,
    MADV_NOHUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.folio import PG, Folio
from vmemu.mmu.pgtable import (
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SPECIAL,
    _PAGE_SWP_UFFD_WP,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
    UFFD_WP_MARKER,
    is_pte_marker,
    is_uffd_wp_marker,
)
from vmemu.uffd import mfill, move, uapi, wp

RW = PROT_READ | PROT_WRITE
NPAGES = 24  # the window: 12 pages below a PMD boundary, 12 above
STATES = ("none", "data", "zero")


def _wp_entries_pagewise(table: list[int], lo: int, hi: int, enable: bool, markers: bool,
                         prot: int, try_writable: bool, mem_map: list[Any]) -> None:
    """The write-protect loop as first written, one entry and one ``PG`` test at a time."""
    for idx in range(lo, hi):
        pte = table[idx]
        if not pte:
            if markers:
                table[idx] = UFFD_WP_MARKER
            continue
        if pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
            if enable:
                table[idx] = (pte | _PAGE_UFFD_WP) & ~_PAGE_RW
            elif pte & _PAGE_UFFD_WP:
                new = (pte & wp._KEEP) | prot
                if try_writable and not new & (_PAGE_SPECIAL | _PAGE_RW):
                    folio = mem_map[(pte & PTE_PFN_MASK) >> PAGE_SHIFT]
                    if folio.flags & PG.anon_exclusive:
                        new |= _PAGE_RW
                table[idx] = new
        elif is_pte_marker(pte):
            if not enable and is_uffd_wp_marker(pte):
                table[idx] = 0
        elif enable:
            table[idx] = pte | _PAGE_SWP_UFFD_WP
        else:
            table[idx] = pte & ~_PAGE_SWP_UFFD_WP


@contextlib.contextmanager
def page_by_page() -> Iterator[None]:
    """Switch the runs off: every page goes through the page path."""
    with mock.patch.object(mfill, "_mfill_run", lambda *a: 0), \
            mock.patch.object(move, "_move_run", lambda *a: 0), \
            mock.patch.object(wp, "_wp_one_table", lambda *a: False), \
            mock.patch.object(wp, "_wp_entries", _wp_entries_pagewise):
        yield


class World:
    """One process: a registered anon window, a MOVE source, a COPY source, a shmem window."""

    def __init__(self, dst_states: list[str], src_states: list[str], wp_pages: list[int],
                 cache: list[bool], mapped: list[bool], limit: int | None = None) -> None:
        p = self.p = vmemu.Process(vmemu.Kernel(mem_limit_pages=limit))
        self.children: list[Any] = []
        if limit is not None:  # reclaim swaps pages out: swap entries in the windows too
            p.kernel.swapon(pages=512)
        self.dst = self._window(p)
        self.msrc = self._window(p)
        self.csrc = self._window(p)
        for base, states in ((self.dst, dst_states), (self.msrc, src_states)):
            for i, s in enumerate(states):
                if s == "data":
                    p.write(base + i * PAGE_SIZE, bytes([i + 1]) * 64)
                elif s == "zero":
                    p.read(base + i * PAGE_SIZE, 1)
        for i in [*range(16), *range(18, NPAGES, 3)]:  # then holes, read as zero pages
            p.write(self.csrc + i * PAGE_SIZE, bytes([0x80 + i]) * 32)
        self.fd = p.memfd_create("runs")
        p.ftruncate(self.fd, NPAGES * PAGE_SIZE)
        for i, c in enumerate(cache):
            if c:
                p.pwrite(self.fd, bytes([0x40 + i]) * 16, i * PAGE_SIZE)
        self.shm = int(p.mmap(0, NPAGES * PAGE_SIZE, RW, MAP_SHARED, self.fd, 0))
        for i, m in enumerate(mapped):
            if m and cache[i]:
                p.read(self.shm + i * PAGE_SIZE, 1)
        u = self.u = p.userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
        u.api(uapi.UFFD_FEATURE_MOVE | uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP
              | uapi.UFFD_FEATURE_WP_UNPOPULATED | uapi.UFFD_FEATURE_MINOR_SHMEM)
        u.register(self.dst & ~(PMD_SIZE - 1), 2 * PMD_SIZE,
                   uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_WP)
        u.register(self.shm, NPAGES * PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MINOR)
        for i in wp_pages:  # protected pages and, where nothing is mapped, markers
            u.writeprotect(self.dst + i * PAGE_SIZE, PAGE_SIZE, uapi.UFFDIO_WRITEPROTECT_MODE_WP)

    @staticmethod
    def _window(p: Any) -> int:
        """NPAGES pages straddling a PMD boundary, in a 4 MiB mapping without THPs."""
        base = int(p.mmap(0, 3 * PMD_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS))
        p.madvise(base, 3 * PMD_SIZE, MADV_NOHUGEPAGE)
        aligned = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
        return aligned + PMD_SIZE - (NPAGES // 2) * PAGE_SIZE

    def run(self, op: tuple[Any, ...]) -> tuple[Any, ...]:
        """Do one call; its result, or its errno and output field."""
        kind, start, n, flag = op
        u, dst = self.u, self.dst + start * PAGE_SIZE
        length = n * PAGE_SIZE
        try:
            if kind == "copy":
                mode = uapi.UFFDIO_COPY_MODE_WP if flag else 0
                return ("ok", u.copy(dst, self.csrc + (flag % 3) * PAGE_SIZE, length, mode))
            if kind == "zeropage":
                return ("ok", u.zeropage(dst, length))
            if kind == "move":
                mode = uapi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if flag else 0
                return ("ok", u.move(dst, self.msrc + start * PAGE_SIZE, length, mode))
            if kind == "wp":
                u.writeprotect(dst, length, uapi.UFFDIO_WRITEPROTECT_MODE_WP if flag else 0)
                return ("ok",)
            if kind == "continue":
                return ("ok", u.continue_(self.shm + start * PAGE_SIZE, length))
            if kind == "fork":  # every anon page shared with a child: no longer exclusive
                self.children.append(self.p.fork())
                return ("ok",)
            self.p.madvise(dst, length, MADV_DONTNEED)
            return ("ok",)
        except OSError as e:
            st_ = getattr(e, "struct", None)
            fields = [getattr(st_, f, None) for f in ("copy", "zeropage", "move", "mapped")]
            return ("err", e.errno, fields)

    def state(self) -> list[tuple[Any, ...]]:
        """Every window page: its entry without the pfn, its data, its folio's index."""
        mm = self.p.mm
        out = []
        for base in (self.dst, self.msrc, self.shm):
            for i in range(NPAGES):
                addr = base + i * PAGE_SIZE
                pte = mm.pgtables.get_pte(addr)
                if pte & _PAGE_PRESENT:
                    pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
                    folio = mm.phys.mem_map[pfn]
                    assert isinstance(folio, Folio)
                    out.append((pte & ~PTE_PFN_MASK, bytes(folio.page_buffer(pfn)[:64]),
                                folio.index, folio.mapcount, folio.refcount))
                else:
                    out.append((pte,))
        stats = self.p.kernel.memory_statistics()
        out.append((stats.pages_in_use, stats.folios))
        return out


pages = st.integers(0, NPAGES - 1)
ops = st.lists(st.tuples(st.sampled_from(["copy", "zeropage", "move", "wp", "continue",
                                          "dontneed", "fork"]),
                         pages, st.integers(1, NPAGES), st.integers(0, 3))
               .map(lambda t: (t[0], t[1], min(t[2], NPAGES - t[1]), t[3])),
               min_size=1, max_size=8)


@settings(max_examples=settings().max_examples)  # about 10 ms an example
@given(dst=st.lists(st.sampled_from(STATES), min_size=NPAGES, max_size=NPAGES),
       src=st.lists(st.sampled_from(STATES), min_size=NPAGES, max_size=NPAGES),
       wp_pages=st.lists(pages, max_size=8),
       cache=st.lists(st.booleans(), min_size=NPAGES, max_size=NPAGES),
       mapped=st.lists(st.booleans(), min_size=NPAGES, max_size=NPAGES),
       calls=ops, limit=st.one_of(st.none(), st.integers(40, 100)))
# runs with nothing in the way (the examples drawn at random rarely have 8 in a row)
@example(dst=["none"] * NPAGES, src=["data"] * NPAGES, wp_pages=[], cache=[True] * NPAGES,
         mapped=[False] * NPAGES,
         calls=[("move", 0, NPAGES, 0), ("wp", 0, NPAGES, 1), ("wp", 3, 17, 0),
                ("continue", 1, 22, 0), ("dontneed", 0, 20, 0), ("copy", 2, 21, 1),
                ("zeropage", 0, NPAGES, 0), ("move", 0, NPAGES, 1)], limit=None)
@example(dst=["data"] * 6 + ["none"] * 18, src=["data"] * 14 + ["zero"] + ["data"] * 9,
         wp_pages=[20], cache=[True] * NPAGES, mapped=[True, False] * 12,
         calls=[("move", 6, 18, 0), ("zeropage", 0, NPAGES, 0), ("wp", 0, NPAGES, 1),
                ("wp", 0, NPAGES, 0), ("continue", 0, NPAGES, 0)], limit=None)
@example(dst=["none"] * NPAGES, src=["data"] * NPAGES, wp_pages=[], cache=[True] * NPAGES,
         mapped=[False] * NPAGES, calls=[("copy", 0, NPAGES, 0), ("copy", 0, NPAGES, 2)],
         limit=60)
@example(dst=["data"] * NPAGES, src=["data"] * NPAGES, wp_pages=[], cache=[True] * NPAGES,
         mapped=[False] * NPAGES,
         calls=[("wp", 0, NPAGES, 1), ("fork", 0, 1, 0), ("wp", 0, NPAGES, 0),
                ("dontneed", 0, NPAGES, 0), ("move", 0, NPAGES, 0)], limit=None)
def test_runs_match_the_page_loop(dst: list[str], src: list[str], wp_pages: list[int],
                                  cache: list[bool], mapped: list[bool],
                                  calls: list[tuple[Any, ...]], limit: int | None) -> None:
    fast = World(dst, src, wp_pages, cache, mapped, limit)
    with page_by_page():
        slow = World(dst, src, wp_pages, cache, mapped, limit)
    for op in calls:
        got = fast.run(op)
        with page_by_page():
            want = slow.run(op)
        assert got == want, op
        assert fast.state() == slow.state(), op
        fast.p.check()


def test_page_by_page_switch_reaches_the_runs() -> None:
    """The switch above really takes the runs out (else the comparison proves nothing)."""
    calls = []
    real = mfill._mfill_run

    def spy(*a: Any) -> int:
        calls.append(a)
        return int(real(*a))

    w = World(["none"] * NPAGES, ["data"] * NPAGES, [], [True] * NPAGES, [False] * NPAGES)
    with mock.patch.object(mfill, "_mfill_run", spy):
        assert w.run(("zeropage", 0, NPAGES, 0)) == ("ok", NPAGES * PAGE_SIZE)
    assert len(calls) == 2  # one run per PTE table, none page by page
    with page_by_page():
        assert mfill._mfill_run(*calls[0]) == 0
        assert w.run(("move", 0, 4, 0)) == ("err", 17, [None, None, -17, None])  # EEXIST
