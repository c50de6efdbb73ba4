"""Scheduler micro-benchmark (issue 4): a block/wake round trip between two tasks.

Run from the repository root::

    python benchmarks/bench_sched.py            # 9 repetitions of 2000 round trips
    python benchmarks/bench_sched.py --quick    # 7 repetitions of 500
    python benchmarks/bench_sched.py --markdown # the table as Markdown

Two tasks play ping-pong through two `WaitQueue`s: each waits for its turn
(`wait_event`), flips it, and wakes the other (`wake_up`), so one round trip
is two blocks, two wake-ups and two task switches.  The same program runs on

* `SimRuntime` (one emulated CPU and two; with the tracer on, as tests run
  it, and off), where a switch is a baton hand-off between host threads, and
* `ThreadRuntime`, where a switch is a real thread wake-up,

and each is reported as a ratio to a `threading.Condition` ping-pong between
two plain threads measured in the same repetition (see `_harness.py`).  The
issue's target: a simulated round trip at most 3x a Condition round trip.
Host thread start-up is inside every measurement, amortized over the round
trips.  Nothing here asserts on timing.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # run from a checkout without installing

from _harness import Scenario, bench_args, run_and_report, timed  # noqa: E402

from vmemu.sched import Runtime, SimRuntime, ThreadRuntime, Tracer, WaitQueue  # noqa: E402

TARGET_SIM_RATIO = 3.0


def condition_pingpong(n: int) -> None:
    """The reference: n round trips between two threads through one Condition."""
    cv = threading.Condition()
    turn = [0]

    def player(me: int) -> None:
        for _ in range(n):
            with cv:
                while turn[0] != me:
                    cv.wait()
                turn[0] = 1 - me
                cv.notify()

    threads = [threading.Thread(target=player, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def runtime_pingpong(rt: Runtime, n: int) -> None:
    """n round trips between two tasks of `rt` through two wait queues."""
    turn = [0]
    queues = (WaitQueue(rt, "ping"), WaitQueue(rt, "pong"))

    def player(me: int) -> None:
        mine, other = queues[me], queues[1 - me]
        for _ in range(n):
            mine.wait_event(lambda: turn[0] == me, reason="turn")
            turn[0] = 1 - me
            other.wake_up()

    def main() -> None:
        a = rt.spawn(player, 0, name="ping")
        b = rt.spawn(player, 1, name="pong")
        a.join()
        b.join()

    rt.run(main)


VARIANTS: dict[str, Callable[[], Runtime]] = {
    "sim, 1 CPU, traced": lambda: SimRuntime(seed=1, ncpus=1),
    "sim, 2 CPUs, traced": lambda: SimRuntime(seed=1, ncpus=2),
    "sim, 1 CPU, untraced": lambda: SimRuntime(seed=1, ncpus=1, tracer=Tracer(enabled=False)),
    "threads, untraced": lambda: ThreadRuntime(tracer=Tracer(enabled=False)),
}


class RoundTrip(Scenario):
    """Every variant and the Condition reference, measured back to back."""

    name = "block/wake round trip"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.metric("cond", "Condition round trip", "us", fmt="{:.1f}")
        for label in VARIANTS:
            target = TARGET_SIM_RATIO if label.startswith("sim") else None
            self.metric(label, f"{label} / Condition", "x", target=target)
        self.metric("sim_us", "sim, 1 CPU, traced round trip", "us", fmt="{:.1f}")

    def _pingpong(self, rt: Runtime) -> Callable[[], None]:
        return lambda: runtime_pingpong(rt, self.n)

    def run_once(self) -> None:
        ref = timed(lambda: condition_pingpong(self.n)) / self.n
        self.record("cond", ref * 1e6)
        for label, make in VARIANTS.items():
            t = timed(self._pingpong(make())) / self.n
            self.record(label, t / ref)
            if label == "sim, 1 CPU, traced":
                self.record("sim_us", t * 1e6)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    args = bench_args(__doc__.split("\n")[0], "7 repetitions of 500 round trips", argv)
    n = 500 if args.quick else 2000
    run_and_report([RoundTrip(n)], args, f"vmemu sched benchmarks: {n} round trips per measurement")
    return 0


if __name__ == "__main__":
    sys.exit(main())
