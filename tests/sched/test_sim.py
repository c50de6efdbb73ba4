"""The deterministic simulation: same seed, same trace; seeds explore interleavings."""

from __future__ import annotations

import threading

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from programs import producer_consumer

from vmemu.sched import CostModel, Deadlock, Mutex, SimRuntime, TaskKilled, WaitQueue


def scenario(seed: int, ncpus: int = 2) -> tuple[str, list[str]]:
    """Four tasks: two workers racing on a mutex, a ping-pong pair, sleeps and wakes."""
    rt = SimRuntime(seed=seed, ncpus=ncpus)
    order: list[str] = []
    m = Mutex(rt, "m")
    ping, pong = WaitQueue(rt, "ping"), WaitQueue(rt, "pong")
    turn = {"n": 0}

    def worker(name: str) -> None:
        for i in range(3):
            rt.charge("syscall")
            rt.cond_resched()
            with m:
                order.append(f"{name}{i}")
                rt.charge("page_alloc")
            rt.sleep(0)

    def pinger(me: int) -> None:
        mine, other = (ping, pong) if me == 0 else (pong, ping)
        for _ in range(4):
            mine.wait_event(lambda: turn["n"] % 2 == me, reason="turn")
            order.append(f"p{me}")
            turn["n"] += 1
            rt.charge("copy_byte", 4096)
            other.wake_up()

    def main() -> None:
        hs = [rt.spawn(worker, "a"), rt.spawn(worker, "b")]
        hs += [rt.spawn(pinger, 0, name="ping"), rt.spawn(pinger, 1, name="pong")]
        for h in hs:
            h.join()

    rt.run(main)
    rt._check()
    return rt.tracer.format_timeline(), order


def test_same_seed_same_trace_byte_for_byte() -> None:
    first, order1 = scenario(1234)
    second, order2 = scenario(1234)
    assert first == second and order1 == order2
    assert "switch" in first and "block" in first and "wake" in first


def test_different_seeds_explore_different_interleavings() -> None:
    orders = {tuple(scenario(seed)[1]) for seed in range(12)}
    assert len(orders) > 3


@settings(max_examples=max(15, settings().max_examples * 3 // 20), deadline=None)
@given(seed=st.integers(0, 2**64 - 1), ncpus=st.integers(1, 4))
def test_any_seed_is_deterministic_and_correct(seed: int, ncpus: int) -> None:
    trace, order = scenario(seed, ncpus)
    assert scenario(seed, ncpus)[0] == trace
    assert sorted(order) == sorted([f"{n}{i}" for n in "ab" for i in range(3)] + ["p0", "p1"] * 4)
    assert [o for o in order if o.startswith("p")] == ["p0", "p1"] * 4


@settings(max_examples=max(10, settings().max_examples // 10), deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_producer_consumer_under_any_seed(seed: int) -> None:
    assert producer_consumer(SimRuntime(seed=seed, ncpus=2), 12, 3) == list(range(12))


def test_deadlock_names_each_blocked_task_and_its_reason() -> None:
    rt = SimRuntime(seed=0, ncpus=2)
    a, b = WaitQueue(rt, "qa"), WaitQueue(rt, "qb")
    unwound: list[str] = []
    before = threading.active_count()

    def waiter(q: WaitQueue, what: str) -> None:
        try:
            q.wait_event(lambda: False, reason=what)
        except TaskKilled:
            unwound.append(what)
            raise

    def main() -> None:
        x = rt.spawn(waiter, a, "message from b", name="alice")
        y = rt.spawn(waiter, b, "message from a", name="bob")
        x.join()
        y.join()

    with pytest.raises(Deadlock) as info:
        rt.run(main)
    text = str(info.value)
    assert "tid 2 (alice) waits on qa: message from b" in text
    assert "tid 3 (bob) waits on qb: message from a" in text
    assert "tid 1 (main) waits on exit:2: join tid 2" in text
    assert {b.name for b in info.value.blocked} == {"main", "alice", "bob"}
    assert sorted(unwound) == ["message from a", "message from b"]
    assert threading.active_count() <= before  # every host thread was unwound
    assert rt.tracer.events("deadlock")


def test_timed_wait_is_not_a_deadlock_and_uses_virtual_time() -> None:
    rt = SimRuntime(seed=0)
    wq = WaitQueue(rt, "q")

    def main() -> tuple[bool, int]:
        t0 = rt.now_ns()
        ok = wq.wait_event(lambda: False, reason="never", timeout=3600.0)  # an hour, instantly
        return ok, rt.now_ns() - t0

    ok, waited = rt.run(main)
    assert ok is False and waited >= 3600 * 10**9


def test_sleep_orders_tasks_by_virtual_time() -> None:
    rt = SimRuntime(seed=5, ncpus=1)
    log: list[tuple[str, int]] = []

    def sleeper(name: str, seconds: float) -> None:
        rt.sleep(seconds)
        log.append((name, rt.now_ns()))

    def main() -> None:
        hs = [rt.spawn(sleeper, n, s) for n, s in (("c", 0.3), ("a", 0.1), ("b", 0.2))]
        for h in hs:
            h.join()

    rt.run(main)
    assert [name for name, _ in log] == ["a", "b", "c"]
    assert log[0][1] >= 100_000_000 and log[2][1] < 301_000_000


def test_costs_are_charged_to_the_running_cpu() -> None:
    cost = attrs.evolve(CostModel(), syscall=1_000, copy_byte=0.5, context_switch=7, wakeup=11)
    rt = SimRuntime(seed=0, ncpus=1, cost=cost)

    def main() -> int:
        t0 = rt.now_ns()
        rt.charge("syscall", 3)
        rt.charge("copy_byte", 4096)
        rt.charge_ns(123, "rdma_read")
        return rt.now_ns() - t0

    assert rt.run(main) == 3_000 + 2_048 + 123
    charges = rt.charges()
    assert charges.counts["syscall"] == 3 and charges.ns["copy_byte"] == 2_048
    assert charges.ns["context_switch"] == 7  # main was switched in once
    assert charges.ns["rdma_read"] == 123
    with pytest.raises(ValueError):
        rt.charge("teleport")


def test_context_switch_and_wakeup_costs_enter_the_clock() -> None:
    cost = attrs.evolve(CostModel(), context_switch=1_000, wakeup=100)
    rt = SimRuntime(seed=0, ncpus=1, cost=cost)
    wq = WaitQueue(rt, "q")
    flag = {"go": False}

    def waiter() -> int:
        wq.wait_event(lambda: flag["go"], reason="go")
        return rt.now_ns()

    def main() -> int:
        h = rt.spawn(waiter)
        rt.sleep(0)  # let the waiter block
        flag["go"] = True
        wq.wake_up()
        result: int = h.join()
        return result

    woke_at = rt.run(main)
    # switches: main in, waiter in, main in, waiter in  -> 4 x 1000; one wake-up -> 100
    assert woke_at == 4_000 + 100
    assert rt.cpu_statistics()[0].context_switches == 5  # ... and main again to exit


def test_two_cpus_run_in_parallel_virtual_time() -> None:
    rt = SimRuntime(seed=0, ncpus=2, cost=attrs.evolve(CostModel(), context_switch=0))

    def burn() -> int:
        for _ in range(10):
            rt.charge("syscall")
            rt.cond_resched()
        return rt.now_ns()

    def main() -> list[int]:
        hs = [rt.spawn(burn), rt.spawn(burn)]
        rt.sleep(1.0)
        return [h.join() for h in hs]

    ends = rt.run(main)
    assert ends == [1_000, 1_000]  # both finished at 1 us: they ran side by side
    assert sorted(c.cpu for c in rt.tracer.events("exit")[:2]) == [0, 1]


def hogs(timeslice: int) -> list[str]:
    """Two CPU-bound tasks on one CPU, each doing 40 x 100 ns with preemption points."""
    rt = SimRuntime(seed=0, ncpus=1, cost=attrs.evolve(CostModel(), timeslice=timeslice))
    log: list[str] = []

    def hog(name: str) -> None:
        for _ in range(40):
            rt.charge("syscall")
            log.append(name)
            rt.cond_resched()

    def main() -> None:
        hs = [rt.spawn(hog, "x"), rt.spawn(hog, "y")]
        for h in hs:
            h.join()

    rt.run(main)
    return log


def test_timeslice_preempts_at_cond_resched_on_one_cpu() -> None:
    def changes(log: list[str]) -> int:
        return sum(1 for p, q in zip(log, log[1:], strict=False) if p != q)

    assert changes(hogs(timeslice=10_000)) == 1  # 4 us of work each fits in a 10 us slice
    assert changes(hogs(timeslice=1_000)) >= 6  # 1 us slices: they take turns


def test_run_twice_and_current_outside_run() -> None:
    rt = SimRuntime(seed=0)
    with pytest.raises(RuntimeError):
        rt.current()
    assert rt.run(lambda: 1) == 1
    assert rt.run(lambda: 2) == 2


def test_killed_task_stays_killed_in_finally() -> None:
    rt = SimRuntime(seed=0)
    wq = WaitQueue(rt, "q")

    def stubborn() -> None:
        try:
            wq.wait_event(lambda: False, reason="first")
        finally:
            wq.wait_event(lambda: False, reason="cleanup")  # raises TaskKilled again

    with pytest.raises(Deadlock):
        rt.run(stubborn)
