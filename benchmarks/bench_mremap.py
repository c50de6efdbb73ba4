"""mremap moves page tables, not bytes: time a 1 GiB move against what it holds.

A 1 GiB private anonymous mapping is populated (every page, or a fraction of
them) with zeros or with random bytes, then moved back and forth with
MREMAP_FIXED between two addresses. Three placements:

* ``pud``: both addresses 1 GiB-aligned: one PUD entry moves (``move_normal_pud``);
* ``pmd``: 2 MiB-aligned: 512 PMD entries move (``move_normal_pmd``);
* ``pte``: the destination is one page off: every PTE moves on its own.

What should hold: zero-filled and random-filled memory move in the same
time (data is never touched), and the ``pud``/``pmd`` times do not grow with
the number of populated pages, while ``pte`` grows with it (entries, not
bytes). The figures are ratios to the same placement over an empty
(never-touched) 1 GiB mapping measured in the same run. Nothing is asserted.

Populating 262144 pages takes a few seconds of Python per fill; ``--quick``
populates 1/16 of the pages instead (still a 1 GiB mapping) and says so.

Run: ``python benchmarks/bench_mremap.py [--reps N] [--quick] [--cpu-time]``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402

from vmemu import MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, PAGE_SIZE, Process  # noqa: E402
from vmemu.constants import MREMAP_FIXED, MREMAP_MAYMOVE, PROT_READ, PROT_WRITE  # noqa: E402

GIB = 1 << 30
NPAGES = GIB // PAGE_SIZE
A = 0x100000000000  # 1 GiB aligned
B = {"pud": 0x140000000000, "pmd": 0x140000200000, "pte": 0x140000201000}


def populated(kind: str, every: int) -> Process:
    """A process with 1 GiB at ``A``, one page in ``every`` written (zeros or random)."""
    p = Process()
    p.mmap(A, GIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    chunk = os.urandom(PAGE_SIZE) if kind == "random" else bytes(PAGE_SIZE)
    write = p.write
    if every:
        for i in range(0, NPAGES, every):
            write(A + i * PAGE_SIZE, chunk)  # a whole page: the data is there
    return p


def move_time(p: Process, placement: str) -> float:
    """Seconds for one move A -> B (then moved back untimed)."""
    dst = B[placement]
    t = h.timed(lambda: p.mremap(A, GIB, GIB, MREMAP_MAYMOVE | MREMAP_FIXED, dst))
    p.mremap(dst, GIB, GIB, MREMAP_MAYMOVE | MREMAP_FIXED, A)
    return t


class MoveScenario(h.Scenario):
    """Moves of one populated 1 GiB mapping, as a ratio to an empty one."""

    def __init__(self, kind: str, every: int, empty: Process, label: str) -> None:
        super().__init__()
        self.name = f"{kind} 1/{every}" if every else "empty"
        self.p = populated(kind, every) if every else empty
        self.empty = empty
        self.pages = NPAGES // every if every else 0
        for pl in B:
            self.metric(f"{pl}_ms", f"{pl} move, {label}", "ms")
            self.metric(f"{pl}_x", f"{pl} move, {label} / empty", "x")

    def run_once(self) -> None:
        for pl in B:
            ref = move_time(self.empty, pl)
            t = move_time(self.p, pl)
            self.record(f"{pl}_ms", t * 1e3)
            self.record(f"{pl}_x", t / ref if ref else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="populate 1/16 of the pages at most")
    ap.add_argument("--cpu-time", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.cpu_time:
        h.use_cpu_time()
    full = 16 if args.quick else 1
    empty = populated("zeros", 0)
    scenarios: list[h.Scenario] = []
    for kind in ("zeros", "random"):
        pages = NPAGES // full
        print(f"populating 1 GiB with {kind}: {pages} pages ...", file=sys.stderr)
        scenarios.append(MoveScenario(kind, full, empty, f"{pages} {kind} pages"))
    for every in (256, 16):
        if every > full:
            pages = NPAGES // every
            print(f"populating {pages} random pages ...", file=sys.stderr)
            scenarios.append(MoveScenario("random", every, empty, f"{pages} random pages"))
    h.run_round_robin(scenarios, args.reps)
    print(h.format_table(scenarios, args.markdown))
    z, r = scenarios[0], scenarios[1]
    print()
    for pl in B:
        ratio = r.metrics[f"{pl}_ms"].median / z.metrics[f"{pl}_ms"].median
        print(f"{pl}: random / zeros = {ratio:.2f} (1.00 means contents do not matter)")
    if args.quick:
        print("(--quick: at most 1/16 of the 1 GiB mapping was populated)")
    for s in scenarios:
        if isinstance(s, MoveScenario) and s.p is not empty:
            s.p.check()


if __name__ == "__main__":
    main()
