"""One API, three runtimes: the same programs run unchanged on each."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from programs import producer_consumer

from vmemu.sched import (
    Deadlock,
    InlineRuntime,
    Runtime,
    SimRuntime,
    TaskState,
    ThreadRuntime,
    WaitQueue,
)

RUNTIMES: dict[str, Callable[[], Runtime]] = {
    "threads": ThreadRuntime,
    "inline": InlineRuntime,
    "sim": lambda: SimRuntime(seed=7, ncpus=2),
    "sim-1cpu": lambda: SimRuntime(seed=3, ncpus=1),
}


@pytest.fixture(params=list(RUNTIMES))
def rt(request: pytest.FixtureRequest) -> Runtime:
    return RUNTIMES[request.param]()


def test_producer_consumer_runs_unchanged(rt: Runtime) -> None:
    assert producer_consumer(rt, n_items=30, n_consumers=3) == list(range(30))
    assert rt.charges().counts["syscall"] == 30


def test_spawn_join_result_and_tids(rt: Runtime) -> None:
    def child(x: int) -> tuple[int, str, int]:
        me = rt.current()
        return x * 2, me.name, me.tid

    def main() -> list[tuple[int, str, int]]:
        handles = [rt.spawn(child, i, name=f"c{i}") for i in range(3)]
        assert len({h.tid for h in handles}) == 3
        return [h.join() for h in handles]

    results = rt.run(main)
    assert [(r[0], r[1]) for r in results] == [(0, "c0"), (2, "c1"), (4, "c2")]
    assert all(t.done for t in rt.tasks() if t.fn is not None)


def test_join_reraises_and_run_does_not_repeat_it(rt: Runtime) -> None:
    def boom() -> None:
        raise ValueError("from the task")

    def main() -> str:
        h = rt.spawn(boom)
        with pytest.raises(ValueError, match="from the task"):
            h.join()
        return "ok"

    assert rt.run(main) == "ok"


def test_unjoined_exception_is_raised_by_run(rt: Runtime) -> None:
    def boom() -> None:
        raise KeyError("lost?")

    def main() -> None:
        rt.spawn(boom, name="boomer")

    with pytest.raises(KeyError, match="lost"):
        rt.run(main)


def test_main_exception_is_raised_by_run(rt: Runtime) -> None:
    def main() -> None:
        raise OSError(22, "bad")

    with pytest.raises(OSError) as info:
        rt.run(main)
    assert info.value.errno == 22


def test_wait_timeout_returns_false(rt: Runtime) -> None:
    wq = WaitQueue(rt, "never")

    def main() -> tuple[bool, float]:
        start = rt.now()
        ok = wq.wait_event(lambda: False, reason="nothing", timeout=0.01)
        return ok, rt.now() - start

    ok, waited = rt.run(main)
    assert ok is False
    assert waited >= 0.01 - 1e-9
    assert wq.statistics().timeouts == 1


def test_sleep_advances_time(rt: Runtime) -> None:
    def main() -> float:
        start = rt.now()
        rt.sleep(0.005)
        return rt.now() - start

    assert rt.run(main) >= 0.005 - 1e-9


def test_mutex_serializes(rt: Runtime) -> None:
    from vmemu.sched import Mutex

    m = Mutex(rt, "m")
    inside = []
    log: list[tuple[str, int]] = []

    def worker(i: int) -> None:
        for _ in range(3):
            with m:
                inside.append(i)
                assert len(inside) == 1
                rt.sleep(0.0001)
                log.append(("in", i))
                inside.pop()

    def main() -> None:
        hs = [rt.spawn(worker, i) for i in range(3)]
        for h in hs:
            h.join()

    rt.run(main)
    assert len(log) == 9


def test_bounded_buffer_deadlocks_inline_but_not_elsewhere() -> None:
    """Inline runs spawned tasks nested, so a producer cannot wait for its consumer."""

    def program(rt: Runtime) -> int:
        buf: list[int] = []
        space, data = WaitQueue(rt, "space"), WaitQueue(rt, "data")
        lock = rt.make_lock()

        def producer() -> None:
            for i in range(6):
                space.wait_event(lambda: len(buf) < 2, reason="room")
                with lock:
                    buf.append(i)
                data.wake_up()

        def consumer() -> int:
            total = 0
            for _ in range(6):
                data.wait_event(lambda: bool(buf), reason="data")
                with lock:
                    total += buf.pop(0)
                space.wake_up()
            return total

        def main() -> int:
            p = rt.spawn(producer)
            c = rt.spawn(consumer)
            p.join()
            result: int = c.join()
            return result

        result: int = rt.run(main)
        return result

    assert program(SimRuntime(seed=1)) == 15
    assert program(ThreadRuntime()) == 15
    with pytest.raises(Deadlock) as info:
        program(InlineRuntime())
    assert "space: room" in str(info.value) or "data: data" in str(info.value)


def test_threads_current_adopts_foreign_threads() -> None:
    rt = ThreadRuntime()
    seen = []
    t = threading.Thread(target=lambda: seen.append(rt.current()), name="foreign")
    t.start()
    t.join()
    assert seen[0].name == "foreign" and seen[0].state is TaskState.RUNNING
    assert rt.current() is rt.current()
