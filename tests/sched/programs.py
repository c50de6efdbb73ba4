"""Small programs written once against the `Runtime` API and run on every runtime."""

from __future__ import annotations

from collections import deque
from typing import Any

from vmemu.sched import Runtime, WaitQueue


def producer_consumer(rt: Runtime, n_items: int = 20, n_consumers: int = 2) -> list[int]:
    """A producer hands `n_items` to `n_consumers` exclusive waiters; returns all consumed."""
    items: deque[int | None] = deque()
    lock = rt.make_lock()
    wq = WaitQueue(rt, "items")

    def take(slot: list[Any]) -> bool:
        with lock:
            if not items:
                return False
            slot.append(items.popleft())
            return True

    def producer() -> None:
        for i in range(n_items):
            with lock:
                items.append(i)
            rt.charge("syscall")
            wq.wake_up()
        for _ in range(n_consumers):
            with lock:
                items.append(None)
            wq.wake_up()

    def consumer() -> list[int]:
        got: list[int] = []
        while True:
            slot: list[Any] = []
            wq.wait_event(lambda slot=slot: take(slot), exclusive=True, reason="item")
            if slot[0] is None:
                return got
            got.append(slot[0])
            rt.charge("copy_byte", 64)

    def main() -> list[int]:
        consumers = [rt.spawn(consumer, name=f"consumer{i}") for i in range(n_consumers)]
        rt.spawn(producer, name="producer").join()
        return sorted(x for c in consumers for x in c.join())

    result: list[int] = rt.run(main)
    return result


def spinners_and_sleeper(
    rt: Runtime, n_spinners: int, sleep_s: float = 0.001, timed_wait: bool = False,
    syscalls_per_spin: int = 20, max_spins: int = 100_000,
) -> tuple[int, int]:
    """`n_spinners` tasks only charge CPU and `cond_resched` until a sleeper wakes.

    The sleeper sleeps `sleep_s` (or, with `timed_wait`, waits that long on a
    wait queue nobody wakes, as a poll() with a timeout does) and then stops
    the spinners.  Returns (how late the sleeper ran after its deadline, in
    the runtime's ns; total spins).  Each spin charges `syscalls_per_spin`
    syscalls: the spacing of the spinners' preemption points.  A spinner
    raises after `max_spins` rounds, so a scheduler that never honours the
    timer fails, not hangs.
    """
    state = {"done": False, "spins": 0}
    wq = WaitQueue(rt, "never")

    def spinner() -> None:
        while not state["done"]:
            rt.charge("syscall", syscalls_per_spin)
            rt.cond_resched()
            state["spins"] += 1
            if state["spins"] > max_spins:
                raise RuntimeError(f"the sleeper never ran: {state['spins']} spins")

    def sleeper() -> int:
        deadline = rt.now_ns() + round(sleep_s * 1e9)
        if timed_wait:
            assert not wq.wait_event(lambda: False, reason="timed", timeout=sleep_s)
        else:
            rt.sleep(sleep_s)
        state["done"] = True
        return rt.now_ns() - deadline

    def main() -> tuple[int, int]:
        spinners = [rt.spawn(spinner, name=f"spin{i}") for i in range(n_spinners)]
        late: int = rt.spawn(sleeper, name="sleeper").join()
        for h in spinners:
            h.join()
        return late, state["spins"]

    result: tuple[int, int] = rt.run(main)
    return result
