"""Swap micro-benchmark (issue 3): a reclaim + swap-in round trip per page.

Run from the repository root::

    python benchmarks/bench_swap.py            # 9 repetitions of 512 pages
    python benchmarks/bench_swap.py --quick    # 7 repetitions of 128 pages
    python benchmarks/bench_swap.py --markdown # the table as Markdown

Each repetition measures, on a fresh machine with a swap device backed by a
``MemoryPageStore``:

* ``PAGEOUT + fault``: ``MADV_PAGEOUT`` over N written pages (rmap walk,
  swap slot, swap PTE, store write, free) and then a read of each page
  (``do_swap_page``: store read into a new folio via the swap cache);
* ``pressure``: a write sweep over 4x the memory limit, twice, so every
  page is reclaimed by the memory limit's hook and read back - the cost
  per page of the whole sweep (fault, reclaim, swap-in);
* ``THP PAGEOUT + fault``: ``MADV_PAGEOUT`` of one 2 MiB THP (split into
  512 pages, each swapped out) and a read of each page, per page;

each as a ratio to one plain copy of a 4 KiB ``bytes`` object measured in
the same repetition (the cheapest thing a page round trip must do twice).
Repetitions are interleaved; the table shows median, min and max. Nothing
here asserts on timing.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # run from a checkout without installing

from _harness import Scenario, bench_args, run_and_report, timed  # noqa: E402

from vmemu import MADV_HUGEPAGE, MADV_PAGEOUT, PAGE_SIZE, Kernel  # noqa: E402
from vmemu.constants import PMD_SIZE  # noqa: E402

COPIES = 20000


def copy_4k(n: int) -> None:
    """The reference: n copies of a 4 KiB page held in a bytearray."""
    buf = bytearray(b"\x5a" * PAGE_SIZE)
    for _ in range(n):
        bytes(buf)


class SwapRoundTrip(Scenario):
    """PAGEOUT + fault-in, and a pressure sweep, against a 4 KiB copy."""

    name = "swap round trip"

    def __init__(self, pages: int) -> None:
        super().__init__()
        self.pages = pages
        self.metric("copy", "4 KiB bytes copy", "us", fmt="{:.3f}")
        self.metric("pageout", "PAGEOUT + fault / page / copy", "x", fmt="{:.0f}")
        self.metric("pageout_us", "PAGEOUT + fault / page", "us", fmt="{:.1f}")
        self.metric("pressure", "pressure sweep / page / copy", "x", fmt="{:.0f}")
        self.metric("pressure_us", "pressure sweep / page", "us", fmt="{:.1f}")
        self.metric("thp", "THP PAGEOUT + fault / page / copy", "x", fmt="{:.0f}")
        self.metric("thp_us", "THP PAGEOUT + fault / page", "us", fmt="{:.1f}")

    def _pageout_round_trip(self) -> float:
        k = Kernel()
        k.swapon(pages=self.pages + 8)
        p = k.spawn()
        n = self.pages
        a = p.mmap(0, n * PAGE_SIZE)
        for i in range(n):
            p.write(a + i * PAGE_SIZE, i.to_bytes(8, "little"))

        def run() -> None:
            p.madvise(a, n * PAGE_SIZE, MADV_PAGEOUT)
            for i in range(n):
                p.read(a + i * PAGE_SIZE, 8)

        t = timed(run)
        assert k.swap_statistics().pswpin == n  # every page really went out and back
        return t / n

    def _pressure_sweep(self) -> float:
        limit = max(8, self.pages // 4)
        k = Kernel(mem_limit_pages=limit)
        k.swapon(pages=self.pages + 8)
        p = k.spawn()
        n = self.pages
        a = p.mmap(0, n * PAGE_SIZE)

        def run() -> None:
            for _ in range(2):
                for i in range(n):
                    p.write(a + i * PAGE_SIZE, i.to_bytes(8, "little"))

        t = timed(run)
        assert k.swap_statistics().pswpin >= n - limit
        return t / (2 * n)

    def _thp_round_trip(self) -> float:
        k = Kernel()
        k.swapon(pages=600)
        p = k.spawn()
        a = p.mmap(0, PMD_SIZE)
        p.madvise(a, PMD_SIZE, MADV_HUGEPAGE)
        for i in range(512):  # no all-zero page: a THP split maps those to the zero page
            p.write(a + i * PAGE_SIZE, (i + 1).to_bytes(8, "little"))

        def run() -> None:
            p.madvise(a, PMD_SIZE, MADV_PAGEOUT)
            for i in range(512):
                p.read(a + i * PAGE_SIZE, 8)

        t = timed(run)
        assert k.phys.vmstat["thp_swpout_fallback"] == 1 and k.swap_statistics().pswpin == 512
        return t / 512

    def run_once(self) -> None:
        ref = timed(lambda: copy_4k(COPIES)) / COPIES
        self.record("copy", ref * 1e6)
        t = self._pageout_round_trip()
        self.record("pageout", t / ref)
        self.record("pageout_us", t * 1e6)
        t = self._pressure_sweep()
        self.record("pressure", t / ref)
        self.record("pressure_us", t * 1e6)
        t = self._thp_round_trip()
        self.record("thp", t / ref)
        self.record("thp_us", t * 1e6)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print the table."""
    args = bench_args(__doc__.splitlines()[0], "7 repetitions of 128 pages", argv)
    pages = 128 if args.quick else 512
    run_and_report([SwapRoundTrip(pages)], args, f"vmemu swap benchmarks: {pages} pages per measurement")
    return 0


if __name__ == "__main__":
    sys.exit(main())
