"""ReadinessFd: a real fd that select/poll/epoll/selectors see readable exactly when ready."""

from __future__ import annotations

import os
import select
import selectors
import threading

import pytest

from vmemu.sched import ReadinessFd, ThreadRuntime, WaitQueue

KINDS = [pytest.param(True, id="eventfd"), pytest.param(False, id="pipe")]
if not hasattr(os, "eventfd"):
    KINDS[0] = pytest.param(True, id="eventfd", marks=pytest.mark.skip("no os.eventfd"))


def readable(fd: ReadinessFd) -> dict[str, bool]:
    r, _, _ = select.select([fd], [], [], 0)
    p = select.poll()
    p.register(fd, select.POLLIN)
    ep = select.epoll()
    ep.register(fd.fileno(), select.EPOLLIN)
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        via_selectors = bool(sel.select(0))
    result = {
        "select": bool(r),
        "poll": bool(p.poll(0)),
        "epoll": bool(ep.poll(0)),
        "selectors": via_selectors,
    }
    ep.close()
    return result


@pytest.mark.parametrize("prefer_eventfd", KINDS)
def test_readable_exactly_while_ready(prefer_eventfd: bool) -> None:
    with ReadinessFd(prefer_eventfd=prefer_eventfd) as fd:
        assert not any(readable(fd).values())
        fd.set_ready(True)
        fd.set_ready(True)  # idempotent
        assert all(readable(fd).values())
        fd.set_ready(False)
        assert not any(readable(fd).values())
        fd.set_ready(False)
        assert not any(readable(fd).values())


@pytest.mark.parametrize("prefer_eventfd", KINDS)
def test_ready_before_fileno_is_applied_on_open(prefer_eventfd: bool) -> None:
    with ReadinessFd(prefer_eventfd=prefer_eventfd) as fd:
        fd.set_ready(True)
        assert all(readable(fd).values())


def test_closed_fd_refuses_fileno() -> None:
    fd = ReadinessFd()
    fd.fileno()
    fd.close()
    fd.close()
    fd.set_ready(True)  # recorded only
    with pytest.raises(ValueError):
        fd.fileno()


def test_a_real_thread_handler_polls_the_fd() -> None:
    """The DESIGN.md 5(a) shape: a handler thread in poll(), a faulting task in a wait."""
    rt = ThreadRuntime()
    msgs: list[int] = []
    resolved: set[int] = set()
    lock = threading.Lock()
    fd = ReadinessFd()
    fault_wqh = WaitQueue(rt, "fault_wqh")

    def handler() -> int:
        handled = 0
        p = select.poll()
        p.register(fd, select.POLLIN)
        while handled < 3:
            p.poll()  # real poll(2), no timeout: readiness must be exact
            with lock:
                todo = list(msgs)
                msgs.clear()
                fd.set_ready(False)
            for addr in todo:
                resolved.add(addr)
                fault_wqh.wake_up(key=addr)
                handled += 1
        return handled

    def fault(addr: int) -> None:
        with lock:
            msgs.append(addr)
            fd.set_ready(True)
        fault_wqh.wait_event(lambda: addr in resolved, key=addr, reason=f"fault {addr:#x}")

    def main() -> int:
        h = rt.spawn(handler, name="handler")
        faults = [rt.spawn(fault, a, name=f"f{a:x}") for a in (0x1000, 0x2000, 0x3000)]
        for f in faults:
            f.join(timeout=10)
        result: int = h.join(timeout=10)
        return result

    assert rt.run(main) == 3
    fd.close()
