"""The hand-off details the fault round trip relies on: parking, before_sleep, pricing.

`ThreadRuntime` parks a task on a pipe of its own holding at most one
byte (a binary permit); a wake-up that arrives between `prepare_sleep` and
`schedule` must not be lost, one from before `prepare_sleep` must be
forgotten, and a queue's waker wakes the tasks only once it has dropped
the queue's lock. `WaitQueue.wait_event`
runs `before_sleep` once, queued and armed, just before the task would run
the resolver or sleep. `Runtime.charge` prices from a cache but must follow
a replaced or customised cost model.
"""

from __future__ import annotations

import time

import attrs
import pytest

from vmemu.sched import CostModel, InlineRuntime, SimRuntime, ThreadRuntime, WaitQueue


def test_thread_wake_between_prepare_and_schedule_is_kept() -> None:
    rt = ThreadRuntime()
    me = rt.current()
    rt.prepare_sleep(me)
    assert rt.wake_up_process(me) is True  # armed: this wake-up counts
    assert rt.wake_up_process(me) is False  # a second one finds it already woken
    t0 = time.monotonic()
    rt.schedule("kept", rt.deadline_after(5.0))
    assert time.monotonic() - t0 < 1.0  # returned at once, not after the deadline


@pytest.mark.parametrize("spin_ns", [0, 50_000], ids=["pipe", "spin"])
def test_thread_woken_lasts_until_the_task_arms_again(spin_ns: int) -> None:
    """`woken` (what the conformance driver's "settled" test reads) is set by the wake-up
    and stays set while the task consumes it and runs, until its next `prepare_sleep`;
    and a wake-up after the park consumed the permit is not a first one."""
    rt = ThreadRuntime(spin_ns=spin_ns)
    me = rt.current()
    rt.prepare_sleep(me)
    assert me.woken is False
    assert rt.wake_up_process(me) is True and me.woken is True
    rt.schedule("consumes the permit", rt.deadline_after(5.0))
    assert me.woken is True
    assert rt.wake_up_process(me) is False  # woken already since the task armed
    rt.prepare_sleep(me)
    assert me.woken is False
    with pytest.raises(AttributeError, match="parker"):
        me.woken = True


def test_thread_wake_before_prepare_is_forgotten() -> None:
    rt = ThreadRuntime()
    me = rt.current()
    rt.wake_up_process(me)  # not armed yet: prepare_sleep forgets it
    rt.prepare_sleep(me)
    t0 = time.monotonic()
    rt.schedule("forgotten", rt.deadline_after(0.05))
    assert time.monotonic() - t0 >= 0.04


def test_thread_wake_from_another_thread_ends_the_sleep() -> None:
    rt = ThreadRuntime()
    wq = WaitQueue(rt, "wq")
    flag: list[bool] = []

    def waiter() -> bool:
        return wq.wait_event(lambda: bool(flag), reason="flag", timeout=5.0)

    h = rt.spawn(waiter)
    while not wq.waitqueue_active():
        time.sleep(0.001)
    flag.append(True)
    assert wq.wake_up_all() == 1
    assert h.join(timeout=5.0) is True
    assert wq.statistics().woken_total == 1


@pytest.mark.parametrize("make", [ThreadRuntime, InlineRuntime], ids=["threads", "inline"])
def test_before_sleep_runs_once_queued_and_not_when_already_true(make: type) -> None:
    rt = make()
    wq = WaitQueue(rt, "wq")
    calls: list[int] = []
    assert wq.wait_event(lambda: True, reason="x", before_sleep=lambda: calls.append(1))
    assert calls == []  # the condition held: nothing to announce
    done: list[bool] = []

    def resolver(_key: object) -> None:
        # the waiter is queued and has announced itself before the resolver runs
        assert calls == [len(wq.waiters())] == [1]
        done.append(True)

    wq.set_resolver(resolver)
    assert wq.wait_event(lambda: bool(done), reason="y",
                         before_sleep=lambda: calls.append(len(wq.waiters())))
    assert calls == [1] and not wq.waitqueue_active()
    assert wq.statistics().resolver_calls == 1


def test_before_sleep_runs_before_sleeping_in_the_simulation() -> None:
    rt = SimRuntime(seed=0)
    order: list[str] = []

    def main() -> None:
        wq = WaitQueue(rt, "wq")
        flag: list[bool] = []

        def waker() -> None:
            order.append("waker")
            flag.append(True)
            wq.wake_up_all()

        def announce() -> None:
            order.append("announce")
            rt.spawn(waker)

        assert wq.wait_event(lambda: bool(flag), reason="flag", before_sleep=announce)
        order.append("woken")

    rt.run(main)
    assert order == ["announce", "waker", "woken"]


def test_charge_follows_a_replaced_cost_model() -> None:
    rt = InlineRuntime()
    assert rt.charge("syscall") == CostModel().syscall
    rt.cost = attrs.evolve(CostModel(), syscall=7)
    assert rt.charge("syscall") == 7
    assert rt.charge("copy_byte", 4096) == round(rt.cost.copy_byte * 4096)
    assert rt.charges().counts["syscall"] == 2 and rt.charges().ns["syscall"] == 100 + 7
    assert rt.clock.now_ns() == 100 + 7 + round(rt.cost.copy_byte * 4096)
    with pytest.raises(ValueError):
        rt.charge("no_such_cost")
    with pytest.raises(ValueError):
        rt.charge("syscall", -1)


def test_charge_asks_a_custom_model() -> None:
    class Doubling(CostModel):
        def of(self, name: str, n: int | float = 1) -> int:
            return 2 * super().of(name, n)

    rt = InlineRuntime(cost=Doubling())
    assert rt.charge("fault") == 2 * CostModel().fault
    assert rt.clock.now_ns() == 2 * CostModel().fault


def test_thread_runtime_counts_charges_without_moving_its_clock() -> None:
    rt = ThreadRuntime()
    rt.charge("fault", 3)
    assert rt.charges().counts["fault"] == 3
    assert rt.charges().ns["fault"] == 3 * CostModel().fault


def test_park_survives_many_hand_offs() -> None:
    rt = ThreadRuntime()
    a, b = WaitQueue(rt, "a"), WaitQueue(rt, "b")
    turn = [0]
    n = 200

    def player(me: int, mine: WaitQueue, other: WaitQueue) -> None:
        for i in range(n):
            ok = mine.wait_event(lambda i=i: turn[0] == 2 * i + me, reason="turn", timeout=10.0)
            assert ok
            turn[0] += 1
            other.wake_up_all()

    h = [rt.spawn(player, 0, a, b), rt.spawn(player, 1, b, a)]
    for t in h:
        t.join(timeout=20.0)
    assert turn[0] == 2 * n
    # no wake-up was lost: every wait ended by its condition, none by the timeout
    assert a.statistics().timeouts == b.statistics().timeouts == 0


def test_thread_permit_is_binary() -> None:
    rt = ThreadRuntime()
    me = rt.current()
    rt.prepare_sleep(me)
    assert [rt.wake_up_process(me) for _ in range(3)] == [True, False, False]
    t0 = time.monotonic()
    rt.schedule("three wake-ups, one permit", rt.deadline_after(5.0))
    assert time.monotonic() - t0 < 1.0
    rt.prepare_sleep(me)  # nothing is left over from the three
    t0 = time.monotonic()
    rt.schedule("nothing pending", rt.deadline_after(0.05))
    assert time.monotonic() - t0 >= 0.04


def test_thread_permit_before_prepare_is_drained() -> None:
    rt = ThreadRuntime()
    me = rt.current()
    rt.prepare_sleep(me)
    rt.wake_up_process(me)
    rt.prepare_sleep(me)  # the unconsumed wake-up of the first round is forgotten
    t0 = time.monotonic()
    rt.schedule("forgotten", rt.deadline_after(0.05))
    assert time.monotonic() - t0 >= 0.04
    rt.wake_up_process(me)  # and the next one still works
    t0 = time.monotonic()
    rt.schedule("kept", rt.deadline_after(5.0))
    assert time.monotonic() - t0 < 1.0


def test_wake_up_wakes_tasks_after_dropping_the_queue_lock() -> None:
    held: list[bool] = []

    class Checking(ThreadRuntime):
        def wake_up_process(self, task: object, reason: str = "") -> bool:
            held.append(wq._lock.locked())
            return super().wake_up_process(task, reason)  # type: ignore[arg-type]

    rt = Checking()
    wq = WaitQueue(rt, "wq")
    flag: list[bool] = []
    h = rt.spawn(lambda: wq.wait_event(lambda: bool(flag), reason="flag", timeout=5.0))
    while not wq.waitqueue_active():
        time.sleep(0.001)
    flag.append(True)
    assert wq.wake_up_all() == 1
    assert h.join(timeout=5.0) is True
    assert held and not any(held)  # (the join adds the exit queue's wake-up)


def _fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def _one_wait(rt: ThreadRuntime) -> None:
    wq = WaitQueue(rt, "wq")
    flag: list[bool] = []
    h = rt.spawn(lambda: wq.wait_event(lambda: bool(flag), reason="f", timeout=5.0))
    while not wq.waitqueue_active():
        time.sleep(0.001)
    flag.append(True)
    wq.wake_up_all()
    assert h.join(timeout=5.0) is True


def test_thread_task_pipes_are_reused_not_accumulated() -> None:
    import gc
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd to count descriptors")
    rt = ThreadRuntime()  # one runtime keeps every task it spawned: 300 of them, one by one
    _one_wait(rt)
    before = _fds()
    for _ in range(300):
        _one_wait(rt)
    assert _fds() <= before + 4  # not 2 descriptors per task ever spawned
    for _ in range(20):  # runtimes that come and go: their tasks' pipes return when the
        _one_wait(ThreadRuntime())  # tasks are collected, and the next runtimes take them
    gc.collect()
    pooled = _fds()
    for _ in range(60):
        _one_wait(ThreadRuntime())
    gc.collect()
    # bounded by how many dead runtimes wait for the collector, not by how many there were
    # (60 here: 240 descriptors if each kept its two pipes)
    assert _fds() <= pooled + 40


@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("key", [None, 5, 7])
def test_wake_up_of_one_waiter_counts_as_the_general_loop(exclusive: bool, key: object) -> None:
    """One sleeper takes wake_up's unrolled path; two take the loop: the same bookkeeping."""
    def run(n: int) -> tuple[object, ...]:
        rt = ThreadRuntime()
        wq = WaitQueue(rt, "wq")
        flag: list[bool] = []
        hs = [rt.spawn(lambda: wq.wait_event(lambda: bool(flag), exclusive=exclusive, key=5,
                                             reason="f", timeout=5.0)) for _ in range(n)]
        while len(wq.waiters()) < n:
            time.sleep(0.001)
        flag.append(True)
        before = rt.charges().counts.get("wakeup", 0)
        woken = wq.wake_up(key, 1)
        charged = rt.charges().counts.get("wakeup", 0) - before
        st = wq.statistics()
        wq.wake_up_all()  # whoever is left
        for h in hs:
            h.join(timeout=5.0)
        return woken, st.woken_total, st.woken_exclusive, st.wake_calls, st.waiting, charged

    one, two = run(1), run(2)
    matched = key in (None, 5)
    assert one[0] == int(matched) and one[1] == int(matched)
    assert one[2] == int(matched and exclusive) and one[3] == 1
    # two waiters: a non-exclusive wake reaches both, an exclusive one only the first
    assert two[0] == (0 if not matched else 1 if exclusive else 2)
    assert two[2] == (1 if matched and exclusive else 0) and two[3] == 1
    assert one[4] == 1 - one[0] and two[4] == 2 - two[0]
    assert one[5] == one[0] and two[5] == two[0]  # one `wakeup` charge per task woken
