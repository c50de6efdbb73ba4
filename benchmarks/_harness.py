"""A small harness for same-run, interleaved, ratio-based benchmarks.

The machines vmemu is benchmarked on are small, shared VMs whose speed
drifts by tens of percent within a minute. An absolute figure ("12 us per
fault") measured at one moment says little; a *ratio* to a reference
measured a few milliseconds earlier in the same process says a lot more.
So every scenario here measures its own reference next to itself, and the
scenarios run round-robin (scenario A rep 1, B rep 1, ..., A rep 2, ...)
so that a slow spell of the machine spreads over all of them instead of
landing on one. Figures are reported as the median over the repetitions
with the min and max beside it.

Nothing here asserts on timing: a benchmark prints, it never fails.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs

# The clock every timing uses: wall time by default; ``use_cpu_time()`` switches
# to this process's CPU time, which other processes on a shared machine
# disturb less (it still counts the host kernel's work for us, e.g. page
# faults on fresh host memory).
clock = time.perf_counter


def use_cpu_time() -> None:
    """Time with ``time.process_time`` instead of the wall clock."""
    global clock
    clock = time.process_time


@attrs.define
class Metric:
    """One reported figure: its samples across repetitions and how to judge it."""

    name: str
    unit: str
    samples: list[float] = attrs.field(factory=list)
    target: float | None = None
    higher_is_better: bool = False
    fmt: str = "{:.2f}"

    @property
    def median(self) -> float:
        """Median of the samples."""
        return statistics.median(self.samples)

    def verdict(self) -> str:
        """'meets' / 'MISSES' the target on the median, or '' without a target."""
        if self.target is None or not self.samples:
            return ""
        ok = self.median >= self.target if self.higher_is_better else self.median <= self.target
        return "meets" if ok else "MISSES"

    def target_str(self) -> str:
        """The target as text: '<= 5' or '>= 100000'."""
        if self.target is None:
            return ""
        return ("\u2265 " if self.higher_is_better else "\u2264 ") + self.fmt.format(self.target)


class Scenario:
    """A benchmark: ``run_once()`` measures one repetition and records into its metrics."""

    name = "scenario"

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def metric(self, key: str, name: str, unit: str, **kw: Any) -> Metric:
        """Declare a metric (call from ``__init__``)."""
        m = Metric(name, unit, **kw)
        self.metrics[key] = m
        return m

    def record(self, key: str, value: float) -> None:
        """Add one sample to metric ``key``."""
        self.metrics[key].samples.append(value)

    def run_once(self) -> None:
        """Measure one repetition."""
        raise NotImplementedError


def timed(fn: Callable[[], Any]) -> float:
    """Seconds taken by ``fn()``, starting from a collected heap."""
    gc.collect()
    t0 = clock()
    fn()
    return clock() - t0


def best_of(fn: Callable[[], Any], inner: int = 3) -> float:
    """The fastest of ``inner`` runs of ``fn()``: the usual timeit estimator for micro loops."""
    return min(timed(fn) for _ in range(inner))


def run_round_robin(scenarios: list[Scenario], reps: int,
                    progress: Callable[[str], None] | None = None) -> None:
    """Run every scenario once per repetition, interleaved, ``reps`` times."""
    for rep in range(reps):
        for s in scenarios:
            if progress is not None:
                progress(f"rep {rep + 1}/{reps}: {s.name}")
            s.run_once()


def format_table(scenarios: list[Scenario], markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table)."""
    header = ("metric", "median", "min", "max", "unit", "target", "")
    rows: list[tuple[str, ...]] = []
    for s in scenarios:
        for m in s.metrics.values():
            if not m.samples:
                continue
            rows.append((m.name, m.fmt.format(m.median), m.fmt.format(min(m.samples)),
                         m.fmt.format(max(m.samples)), m.unit, m.target_str(), m.verdict()))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    aligns = ["<", ">", ">", ">", "<", "<", "<"]

    def fmt_row(r: tuple[str, ...]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, aligns, widths, strict=True)).rstrip()

    out = [fmt_row(header), fmt_row(tuple("-" * w for w in widths))]
    out += [fmt_row(r) for r in rows]
    return "\n".join(out)


def bench_args(description: str, quick_help: str,
               argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the options every benchmark takes, and switch the clock if asked.

    ``--quick`` (what it means is ``quick_help``), ``--reps`` (default 9,
    quick 7, never fewer than 7: a median needs a few samples),
    ``--markdown``, ``--cpu-time`` and ``-v`` (progress on stderr).
    """
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 9, quick 7, at least 7)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with this process's CPU time instead of the wall clock")
    ap.add_argument("-v", "--verbose", action="store_true", help="show progress on stderr")
    args = ap.parse_args(argv)
    args.reps = max(7, args.reps or (7 if args.quick else 9))
    if args.cpu_time:
        use_cpu_time()
    return args


def run_and_report(scenarios: list[Scenario], args: argparse.Namespace, what: str) -> None:
    """Run ``scenarios`` round robin as ``args`` says; print a header naming ``what`` and the table."""
    progress = (lambda s: print(s, file=sys.stderr)) if args.verbose else None
    run_round_robin(scenarios, args.reps, progress)
    print(f"{what}, {args.reps} interleaved repetitions, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, {'CPU' if args.cpu_time else 'wall'} time "
          "(median, min, max over repetitions)")
    print(format_table(scenarios, markdown=args.markdown))
