"""Benchmarks of the mm core (issue 2): access fast path, first-touch faults, heap per page, fork.

Run from the repository root::

    python benchmarks/bench_mm.py            # full run (64 MiB, 9 repetitions), ~1 minute
    python benchmarks/bench_mm.py --quick    # a smaller run in a few seconds
    python benchmarks/bench_mm.py --markdown # the table as Markdown

Every timing is a ratio to a reference measured in the same repetition of
the same run (see ``_harness.py``), and the scenarios run round-robin; the
table shows the median with min and max over repetitions. The targets
printed beside the figures are the ones from issue 2; a missed target is
reported, never raised: this file is not a test (pytest collects
``tests/`` only) and must not fail CI.

Scenarios:

* ``read 8 B`` / ``write 8 B`` / ``read 4 KiB``: ``Process.read`` /
  ``Process.write`` on a page already in the TLB, against the same slice
  of a ``bytearray`` done by a Python function taking the same arguments.
* ``first-touch write``: one byte written (``Process.write``) to each page
  of a fresh private anonymous mapping, so every write takes an anonymous
  write fault (``do_anonymous_page``); reference: a dict-insert loop of
  the same count. The "floor" row is what the host alone charges for
  the page data: allocating and keeping one ``bytearray(4096)`` (malloc
  plus the host kernel's first-touch fault), part of every emulated fault.
* ``heap per page``: ``tracemalloc`` over touching pages, divided by the
  number of pages, minus the 4096 data bytes: with the software TLB's
  entries included, and without them (the TLB holds at most 4096
  translations, so its size does not grow with resident memory).
* ``fork``: ``Process.fork`` of a process with the mapping resident,
  against copying a ``bytearray`` of the same size.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # run from a checkout without installing

from _harness import Scenario, bench_args, best_of, run_and_report, timed  # noqa: E402

from vmemu import Kernel, Process  # noqa: E402
from vmemu.constants import PAGE_SIZE  # noqa: E402
from vmemu.mmu.tlb import DEFAULT_TLB_ENTRIES  # noqa: E402

MiB = 1 << 20
ONE = b"\x01"


def fresh_process() -> Process:
    """A process on its own machine, so runs do not share physical memory."""
    return Process(Kernel())


def populate(p: Process, nbytes: int) -> int:
    """Map ``nbytes`` of private anonymous memory and write-fault every page in."""
    base = p.mmap(0, nbytes)
    write = p.write
    for a in range(base, base + nbytes, PAGE_SIZE):
        write(a, ONE)
    return base


class AccessHit(Scenario):
    """8-byte read/write and 4 KiB read on a mapped page whose translation is in the TLB."""

    name = "access (TLB hit)"

    def __init__(self, loops: int) -> None:
        super().__init__()
        self.loops = loops
        self.p = fresh_process()
        self.addr = populate(self.p, PAGE_SIZE) + 64  # same offset in both
        self.p.read(self.addr, 8)  # make sure both TLB dicts hold the page
        self.buf = bytearray(PAGE_SIZE)
        for key, label in (("read8", "read 8 B"), ("write8", "write 8 B"),
                           ("read4k", "read 4 KiB")):
            self.metric(key, f"{label} / bytearray", "x", target=5.0)
        self.metric("read8_ns", "read 8 B, time per call", "ns", fmt="{:.0f}")
        self.metric("write8_ns", "write 8 B, time per call", "ns", fmt="{:.0f}")

    def run_once(self) -> None:
        buf, loops = self.buf, self.loops
        rng = range(loops)

        def ref_read(off: int, n: int) -> bytes:
            return bytes(buf[off:off + n])

        def ref_write(off: int, data: bytes) -> None:
            buf[off:off + len(data)] = data

        def loop2(f, a, b):  # type: ignore[no-untyped-def]
            def run() -> None:
                for _ in rng:
                    f(a, b)
            return run

        data8 = b"ABCDEFGH"
        p, addr = self.p, self.addr
        pairs = {
            "read8": (loop2(p.read, addr, 8), loop2(ref_read, 64, 8)),
            "write8": (loop2(p.write, addr, data8), loop2(ref_write, 64, data8)),
            "read4k": (loop2(p.read, addr - 64, PAGE_SIZE), loop2(ref_read, 0, PAGE_SIZE)),
        }
        for key, (op, ref) in pairs.items():
            t_ref = best_of(ref)
            t_op = best_of(op)
            self.record(key, t_op / t_ref)
            if key + "_ns" in self.metrics:
                self.record(key + "_ns", t_op / loops * 1e9)


class FirstTouch(Scenario):
    """Anonymous write faults: one byte written to each page of a fresh mapping."""

    name = "first-touch faults"

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = nbytes
        self.metric("rate", f"first-touch write faults ({nbytes // MiB} MiB)", "pages/s",
                    target=100_000, higher_is_better=True, fmt="{:,.0f}")
        self.metric("us", "  time per fault", "us", fmt="{:.2f}")
        self.metric("ratio", "  fault / dict insert", "x", fmt="{:.0f}")
        self.metric("floor", "  floor: keeping a new bytearray(4096)", "us", fmt="{:.2f}")

    def run_once(self) -> None:
        p = fresh_process()
        base = p.mmap(0, self.nbytes)
        addrs = range(base, base + self.nbytes, PAGE_SIZE)
        write = p.write

        def touch() -> None:
            for a in addrs:
                write(a, ONE)

        def ref() -> None:
            d = {}
            for a in addrs:
                d[a] = ONE

        kept: list[bytearray] = []

        def floor() -> None:  # the host's cost of fresh page data (malloc + first touch)
            append = kept.append
            for _ in addrs:
                append(bytearray(PAGE_SIZE))

        t_ref = timed(ref)
        t_op = timed(touch)
        n = len(addrs)
        self.record("rate", n / t_op)
        self.record("us", t_op / n * 1e6)
        self.record("ratio", t_op / t_ref)
        p.exit()
        del p
        self.record("floor", timed(floor) / n * 1e6)


class Fork(Scenario):
    """fork of a process with ``nbytes`` resident."""

    name = "fork"

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = nbytes
        mib = nbytes // MiB
        self.metric("ms", f"fork, {mib} MiB resident", "ms", fmt="{:.1f}")
        self.metric("us", "  per resident page", "us", fmt="{:.2f}")
        self.metric("ratio", f"  fork / copying {mib} MiB between bytearrays", "x", fmt="{:.1f}")
        self.src = bytearray(nbytes)
        self.dst = bytearray(nbytes)  # preallocated: the reference is the copy, not mmap

    def run_once(self) -> None:
        p = fresh_process()
        populate(p, self.nbytes)
        src, dst = self.src, self.dst
        child: list[Process] = []

        def copy() -> None:
            dst[:] = src

        t_ref = timed(copy)
        t_op = timed(lambda: child.append(p.fork()))
        self.record("ms", t_op * 1e3)
        self.record("us", t_op / (self.nbytes // PAGE_SIZE) * 1e6)
        self.record("ratio", t_op / t_ref)
        child[0].exit()
        p.exit()


class HeapPerPage(Scenario):
    """Python heap per resident anonymous page beyond its 4096 data bytes (tracemalloc).

    Not a timing, so it is deterministic and runs once (``run_once`` does
    nothing after the first call).
    """

    name = "heap per page"

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        # enough pages to spread the TLB's bounded size (4096 entries) thinly
        self.npages = max(2 * nbytes // PAGE_SIZE, 4 * DEFAULT_TLB_ENTRIES)
        self.metric("total", f"heap per page beyond 4096 B ({self.npages} pages)", "B",
                    target=410, fmt="{:.0f}")
        self.metric("no_tlb", "  excluding the TLB (bounded, 4096 entries)", "B",
                    target=410, fmt="{:.0f}")

    def run_once(self) -> None:
        if self.metrics["total"].samples:
            return
        n = self.npages
        p = fresh_process()
        populate(p, PAGE_SIZE)  # warm the code paths and the upper-level tables
        base = p.mmap(0, n * PAGE_SIZE)
        write = p.write
        gc.collect()
        tracemalloc.start()
        try:
            m0 = tracemalloc.get_traced_memory()[0]
            for a in range(base, base + n * PAGE_SIZE, PAGE_SIZE):
                write(a, ONE)
            m1 = tracemalloc.get_traced_memory()[0]
            # the TLB is bounded whatever the resident size: measure without it too
            p.mm.tlb.flush_all()
            m2 = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        self.record("total", (m1 - m0) / n - PAGE_SIZE)
        self.record("no_tlb", (m2 - m0) / n - PAGE_SIZE)
        p.exit()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print the table."""
    args = bench_args(__doc__.splitlines()[0], "8 MiB and fewer loops: a few seconds", argv)
    size = 8 * MiB if args.quick else 64 * MiB
    loops = 20_000 if args.quick else 100_000
    scenarios: list[Scenario] = [AccessHit(loops), FirstTouch(size), Fork(size),
                                 HeapPerPage(size)]
    run_and_report(scenarios, args, f"vmemu mm benchmarks: {size // MiB} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
