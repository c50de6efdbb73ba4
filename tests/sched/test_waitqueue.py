"""Wait-queue semantics: exclusive versus shared, wake_up_nr, keyed wake-ups, statistics.

Run under the simulation so every interleaving is fixed by the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from vmemu.sched import (
    InlineRuntime,
    SimRuntime,
    TaskHandle,
    WaitQueue,
    WaitQueueStatistics,
    default_key_match,
)


def run_sim(main: Callable[[SimRuntime], Any], seed: int = 0, ncpus: int = 1) -> Any:
    rt = SimRuntime(seed=seed, ncpus=ncpus)
    return rt.run(lambda: main(rt))


def woken_tids(rt: SimRuntime, queue: str) -> list[int]:
    return [e["target"] for e in rt.tracer.events("wake") if e["queue"] == queue]


class Waiters:
    """Waiters that count their wake-ups and stay asleep until `release()`."""

    def __init__(self, rt: SimRuntime, wq: WaitQueue) -> None:
        self.rt, self.wq = rt, wq
        self.released = False
        self.wakes: dict[str, int] = {}
        self.handles: list[TaskHandle] = []

    def add(self, name: str, *, exclusive: bool, key: Any = None) -> None:
        def body() -> None:
            self.wakes[name] = 0

            def cond() -> bool:
                return self.released

            while not self.wq.wait_event(cond, exclusive=exclusive, key=key, reason=name,
                                         timeout=None):
                pass

        self.handles.append(self.rt.spawn(body, name=name))

    def settle(self) -> None:
        """Let every woken waiter run, re-check, and go back to sleep."""
        self.rt.sleep(0.001)

    def release(self) -> None:
        self.released = True
        self.wq.wake_up_all()
        for h in self.handles:
            h.join()


def test_wake_up_wakes_all_shared_and_one_exclusive() -> None:
    def main(rt: SimRuntime) -> None:
        wq = WaitQueue(rt, "wq")
        w = Waiters(rt, wq)
        for name in ("x1", "x2", "x3"):
            w.add(name, exclusive=True)
        w.add("s1", exclusive=False)
        w.add("s2", exclusive=False)
        w.settle()
        assert wq.statistics().waiting == 5
        assert wq.statistics().waiting_exclusive == 3
        wq._check()
        # shared entries sit at the head, exclusive ones in arrival order at the tail
        order = [t.name for t in wq.waiters()]
        assert sorted(order[:2]) == ["s1", "s2"] and sorted(order[2:]) == ["x1", "x2", "x3"]
        assert wq.wake_up() == 3
        assert [t.name for t in wq.waiters()] == order[3:]
        w.settle()
        # the woken exclusive waiter found nothing to do and went back to the tail
        again = [t.name for t in wq.waiters()]
        assert sorted(again[:2]) == ["s1", "s2"] and again[2:] == order[3:] + [order[2]]
        stats = wq.statistics()
        assert (stats.woken_total, stats.woken_exclusive, stats.wasted_wakeups) == (3, 1, 3)
        w.release()

    run_sim(main)


def test_wake_up_nr_and_wake_up_all() -> None:
    def main(rt: SimRuntime) -> None:
        wq = WaitQueue(rt, "wq")
        w = Waiters(rt, wq)
        for i in range(4):
            w.add(f"x{i}", exclusive=True)
        w.add("s", exclusive=False)
        w.settle()
        assert wq.wake_up_nr(2) == 3
        w.settle()
        assert wq.wake_up_all() == 5
        w.settle()
        assert wq.wake_up(nr_exclusive=0) == 5
        w.settle()
        stats = wq.statistics()
        assert stats.wake_calls == 3
        assert stats.wasted_wakeups == 13
        with pytest.raises(ValueError):
            wq.wake_up_nr(0)
        w.release()

    run_sim(main)


def test_wake_up_with_no_waiters_wakes_nobody() -> None:
    def main(rt: SimRuntime) -> WaitQueueStatistics:
        wq = WaitQueue(rt, "empty")
        assert wq.wake_up() == 0 and not wq.waitqueue_active()
        return wq.statistics()

    stats = run_sim(main)
    assert stats == WaitQueueStatistics("empty", 0, 0, 1, 0, 0, 0, 0, 0)


def test_keyed_wake_up_only_reaches_matching_waiters() -> None:
    """userfaultfd wakes only the faults inside the range an ioctl resolved."""

    def main(rt: SimRuntime) -> None:
        wq = WaitQueue(rt, "fault_wqh")
        w = Waiters(rt, wq)
        for addr in (0x1000, 0x2000, 0x3000, 0x9000):
            w.add(f"f{addr:x}", exclusive=False, key=addr)
        w.add("any", exclusive=False, key=None)
        w.settle()
        assert wq.wake_up(key=range(0x1000, 0x3000)) == 3  # 0x1000, 0x2000 and the unkeyed
        assert sorted(t.name for t in wq.waiters()) == ["f3000", "f9000"]
        w.settle()
        assert wq.wake_up(key=0x9000) == 2  # equal key, and "any" again
        w.settle()
        assert wq.wake_up(key=range(0x4000, 0x5000)) == 1  # only "any"
        w.release()

    run_sim(main)


def test_keyed_exclusive_counts_only_matching_waiters() -> None:
    def main(rt: SimRuntime) -> None:
        wq = WaitQueue(rt, "wq")
        w = Waiters(rt, wq)
        for addr in (0x1000, 0x5000, 0x6000):
            w.add(f"x{addr:x}", exclusive=True, key=addr)
        w.settle()
        before = len(woken_tids(rt, "wq"))
        assert wq.wake_up(key=range(0x4000, 0x7000), nr_exclusive=1) == 1
        (tid,) = woken_tids(rt, "wq")[before:]
        assert rt._tasks[tid].name == "x5000"
        w.release()

    run_sim(main)


def test_waiter_predicate_key_and_custom_match() -> None:
    assert default_key_match(lambda k: k == "yes", "yes")
    assert not default_key_match(lambda k: k == "yes", "no")
    assert default_key_match(5, range(0, 10)) and not default_key_match(10, range(0, 10))
    assert default_key_match(None, 3) and default_key_match(3, None)

    def main(rt: SimRuntime) -> None:
        wq = WaitQueue(rt, "wq", match=lambda entry_key, wake_key: entry_key % wake_key == 0)
        w = Waiters(rt, wq)
        for n in (2, 3, 4, 9):
            w.add(f"n{n}", exclusive=False, key=n)
        w.settle()
        assert wq.wake_up(key=3) == 2
        w.release()

    run_sim(main)


def test_condition_true_before_sleeping_does_not_sleep() -> None:
    def main(rt: SimRuntime) -> int:
        wq = WaitQueue(rt, "wq")
        assert wq.wait_event(lambda: True, reason="already")
        return len(rt.tracer.events("block"))

    assert run_sim(main) == 0


def test_wake_between_check_and_sleep_is_not_lost() -> None:
    """The condition's own side effect wakes the queue (the prepare_to_wait race)."""

    def main(rt: SimRuntime) -> bool:
        wq = WaitQueue(rt, "wq")
        calls = []

        def cond() -> bool:
            calls.append(1)
            if len(calls) == 2:  # after prepare_to_wait, before schedule
                wq.wake_up()
            return len(calls) >= 3

        return wq.wait_event(cond, reason="race")

    assert run_sim(main) is True


def test_a_wake_up_during_before_sleep_is_neither_slept_on_nor_wasted() -> None:
    """``before_sleep`` wakes a task that runs at once and wakes this waiter back (a handler
    thread on the faulting thread's CPU): the waiter returns without scheduling, and the
    wake-up it got is not counted as a wasted one."""

    def main(rt: SimRuntime) -> tuple[bool, int, WaitQueueStatistics]:
        wq = WaitQueue(rt, "wq")
        done = []

        def before_sleep() -> None:  # what the woken handler does before this task goes on
            done.append(1)
            wq.wake_up()

        ok = wq.wait_event(lambda: bool(done), reason="handed off", before_sleep=before_sleep)
        return ok, len(rt.tracer.events("block")), wq.statistics()

    ok, blocks, stats = run_sim(main)
    assert ok is True and blocks == 0
    assert (stats.woken_total, stats.wasted_wakeups, stats.waiting) == (1, 0, 0)


def test_resolver_runs_on_the_waiting_task() -> None:
    rt = InlineRuntime()
    wq = WaitQueue(rt, "faults")
    state = {"resolved": False}
    ran_on = []

    def resolver(key: Any) -> None:
        ran_on.append((rt.current().name, key))
        state["resolved"] = True
        wq.wake_up(key=key)

    wq.set_resolver(resolver)

    def faulter() -> bool:
        return wq.wait_event(lambda: state["resolved"], key=0x1000, reason="fault")

    def main() -> bool:
        result: bool = rt.spawn(faulter, name="faulter").join()
        return result

    assert rt.run(main) is True
    assert ran_on == [("faulter", 0x1000)]
    assert wq.statistics().resolver_calls == 1
