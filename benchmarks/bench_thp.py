"""Benchmark (issue 3): one THP fault versus 512 small faults over the same 2 MiB.

Run from the repository root::

    python benchmarks/bench_thp.py           # 9 repetitions, 16 regions each
    python benchmarks/bench_thp.py --quick   # 7 repetitions, 4 regions

Scenarios, interleaved round-robin (see ``_harness.py``); every figure is a
median over the repetitions, and the ratios compare runs made in the same
repetition. Nothing asserts on time.

* ``THP fill``: write one byte to each 4 KiB page of a MADV_HUGEPAGE,
  2 MiB-aligned region: the first write takes one huge fault
  (``do_huge_pmd_anonymous_page``), the other 511 hit the PMD leaf.
* ``4K fill``: the same writes with THP disabled: 512 anonymous faults.
* ``THP first fault``: the single huge fault alone, against one 4 KiB fault.
* ``split + collapse``: ``mprotect`` of one page (``__split_huge_pmd``)
  then MADV_COLLAPSE back, per region.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # run from a checkout without installing

from _harness import Scenario, bench_args, run_and_report, timed  # noqa: E402

from vmemu import Kernel  # noqa: E402
from vmemu.constants import (  # noqa: E402
    MADV_COLLAPSE,
    MADV_HUGEPAGE,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)

ONE = b"\x01"


def _region(policy: str, n: int) -> tuple[Kernel, object, int]:
    k = Kernel()
    k.thp_enabled = policy
    p = k.spawn()
    a = p.mmap(0, n * PMD_SIZE)
    p.madvise(a, n * PMD_SIZE, MADV_HUGEPAGE)
    return k, p, a


class Fill(Scenario):
    """Touch every page of ``n`` 2 MiB regions, with and without THP."""

    name = "fill"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.metric("thp", "THP fill, per 2 MiB", "ms", fmt="{:.2f}")
        self.metric("small", "4K fill, per 2 MiB", "ms", fmt="{:.2f}")
        self.metric("ratio", "4K fill / THP fill", "x", fmt="{:.1f}")

    def _fill(self, policy: str) -> float:
        _k, p, a = _region(policy, self.n)
        write = p.write  # type: ignore[attr-defined]

        def run() -> None:
            for addr in range(a, a + self.n * PMD_SIZE, PAGE_SIZE):
                write(addr, ONE)
        t = timed(run)
        p.exit()  # type: ignore[attr-defined]
        return t / self.n * 1e3

    def run_once(self) -> None:
        thp = self._fill("madvise")
        small = self._fill("never")
        self.metrics["thp"].samples.append(thp)
        self.metrics["small"].samples.append(small)
        self.metrics["ratio"].samples.append(small / thp)


class FirstFault(Scenario):
    """One huge fault against one 4 KiB fault."""

    name = "first fault"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.metric("thp", "THP first fault", "us", fmt="{:.1f}")
        self.metric("small", "4K first fault", "us", fmt="{:.1f}")
        self.metric("ratio", "THP fault / 4K fault", "x", fmt="{:.1f}")
        self.metric("per_byte", "512 x 4K faults / THP fault", "x", fmt="{:.1f}")

    def _one(self, policy: str) -> float:
        _k, p, a = _region(policy, self.n)
        write = p.write  # type: ignore[attr-defined]

        def run() -> None:
            for r in range(self.n):
                write(a + r * PMD_SIZE, ONE)
        t = timed(run)
        p.exit()  # type: ignore[attr-defined]
        return t / self.n * 1e6

    def run_once(self) -> None:
        thp = self._one("madvise")
        small = self._one("never")
        self.metrics["thp"].samples.append(thp)
        self.metrics["small"].samples.append(small)
        self.metrics["ratio"].samples.append(thp / small)
        self.metrics["per_byte"].samples.append(512 * small / thp)


class SplitCollapse(Scenario):
    """Split a PMD by mprotect of one page, restore, then MADV_COLLAPSE."""

    name = "split + collapse"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.metric("split", "split_huge_pmd (mprotect 4K)", "us", fmt="{:.0f}")
        self.metric("collapse", "MADV_COLLAPSE 2 MiB", "us", fmt="{:.0f}")

    def run_once(self) -> None:
        _k, p, a = _region("madvise", self.n)
        for r in range(self.n):
            p.write(a + r * PMD_SIZE, ONE)  # type: ignore[attr-defined]

        def split() -> None:
            for r in range(self.n):
                p.mprotect(a + r * PMD_SIZE, PAGE_SIZE, PROT_READ)  # type: ignore[attr-defined]
                p.mprotect(a + r * PMD_SIZE, PAGE_SIZE,  # type: ignore[attr-defined]
                           PROT_READ | PROT_WRITE)

        def collapse() -> None:
            p.madvise(a, self.n * PMD_SIZE, MADV_COLLAPSE)  # type: ignore[attr-defined]
        self.metrics["split"].samples.append(timed(split) / self.n * 1e6)
        self.metrics["collapse"].samples.append(timed(collapse) / self.n * 1e6)
        p.exit()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print the table."""
    args = bench_args(__doc__.splitlines()[0], "4 regions, 7 repetitions", argv)
    n = 4 if args.quick else 16
    scenarios: list[Scenario] = [Fill(n), FirstFault(4 * n), SplitCollapse(n)]
    run_and_report(scenarios, args, f"vmemu THP benchmarks: {n} x 2 MiB regions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
