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
