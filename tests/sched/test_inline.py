"""The inline runtime: handlers run on the faulting task; re-entry and deadlock are reported."""

from __future__ import annotations

from typing import Any

import pytest

from vmemu.sched import Deadlock, InlineRuntime, ReentrantFault, SimRuntime, WaitQueue


class FakeUffd:
    """A toy userfaultfd: faults on unpopulated pages wait until a resolver fills them."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.pages: dict[int, bytes] = {}
        self.fault_wqh = WaitQueue(rt, "fault_wqh")
        self.handled: list[tuple[str, int]] = []

    def access(self, addr: int) -> bytes:
        page = addr & ~0xFFF
        while page not in self.pages:
            self.rt.charge("fault")
            self.fault_wqh.wait_event(
                lambda: page in self.pages, key=page, reason=f"fault {page:#x}"
            )
        return self.pages[page]

    def inline_handler(self, key: Any) -> None:
        self.handled.append((self.rt.current().name, key))
        self.rt.charge("copy_byte", 4096)
        self.pages[key] = b"%x" % key
        self.fault_wqh.wake_up(key=range(key, key + 0x1000))


@pytest.mark.parametrize("make", [InlineRuntime, lambda: SimRuntime(seed=2, ncpus=2)])
def test_inline_handler_runs_on_the_faulting_task(make: Any) -> None:
    rt = make()
    uffd = FakeUffd(rt)
    uffd.fault_wqh.set_resolver(uffd.inline_handler)

    def app() -> list[bytes]:
        return [uffd.access(a) for a in (0x1010, 0x2020, 0x1fff)]

    def main() -> list[bytes]:
        result: list[bytes] = rt.spawn(app, name="app").join()
        return result

    assert rt.run(main) == [b"1000", b"2000", b"1000"]
    assert uffd.handled == [("app", 0x1000), ("app", 0x2000)]
    assert rt.charges().counts["fault"] == 2


def test_reentrant_fault_is_reported_not_deadlocked() -> None:
    rt = InlineRuntime()
    uffd = FakeUffd(rt)

    def bad_handler(key: Any) -> None:
        uffd.access(key + 0x10000)  # touches registered, unpopulated memory

    uffd.fault_wqh.set_resolver(bad_handler)
    with pytest.raises(ReentrantFault, match="re-entrant wait: task 1"):
        rt.run(lambda: uffd.access(0x1000))


def test_inline_deadlock_when_nothing_can_resolve() -> None:
    rt = InlineRuntime()
    wq = WaitQueue(rt, "nobody")

    def stuck() -> None:
        wq.wait_event(lambda: False, reason="a wake that never comes")

    with pytest.raises(Deadlock) as info:
        rt.run(stuck)
    assert "nobody: a wake that never comes" in str(info.value)
    assert not isinstance(info.value, ReentrantFault)


def test_waiting_runs_pending_tasks_nested() -> None:
    rt = InlineRuntime()
    wq = WaitQueue(rt, "q")
    box: list[int] = []

    def producer() -> None:
        box.append(42)
        wq.wake_up()

    def main() -> tuple[int, list[str]]:
        rt.spawn(producer, name="producer")
        wq.wait_event(lambda: bool(box), reason="box")
        names = [e.get("next_name") for e in rt.tracer.events("switch")]
        return box[0], [n for n in names if n]

    value, switches = rt.run(main)
    assert value == 42 and switches == ["main", "producer", "main"]


def test_inline_timeout_jumps_the_clock() -> None:
    rt = InlineRuntime()
    wq = WaitQueue(rt, "q")

    def main() -> tuple[bool, int]:
        ok = wq.wait_event(lambda: False, reason="x", timeout=2.5)
        return ok, rt.now_ns()

    assert rt.run(main) == (False, 2_500_000_000)


def test_join_outside_run_runs_the_task() -> None:
    rt = InlineRuntime()
    h = rt.spawn(lambda: "ran", name="t")
    assert h.join() == "ran"
