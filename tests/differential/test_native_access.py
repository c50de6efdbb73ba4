"""Task.read / Task.write end in the same signal on vmemu and on Linux.

``vmemu.native.NativeTask`` accesses go through the C helper of
:mod:`vmemu.native.access`, so a SIGSEGV or SIGBUS raises
``Sigsegv`` / ``Sigbus`` with ``done`` (bytes accessed before the faulting
page) exactly where vmemu's ``Task`` does, instead of ending the interpreter.
The last scenario is the one that used to: a thread still blocked in a
userfault when its area is unmapped and the uffd closed.
"""

from __future__ import annotations

import select
import threading
from typing import Any

import pytest
from _kernel import native_access_or_skip, native_process_or_skip

import vmemu
from vmemu import PAGE_SIZE, PROT_READ, Signal
from vmemu.uffd import uapi

pytestmark = pytest.mark.differential


def _outcome(p: Any, fn: Any, base: int) -> tuple[Any, ...]:
    try:
        got = fn()
    except Signal as e:
        return (e.signal_name, e.code_name, e.si_addr - base, e.done)
    return ("ok", got)


def protection_and_holes(p: Any) -> list[tuple[Any, ...]]:
    """Accesses that cross into a read-only page and into a hole, and what they left."""
    a = p.mmap(0, 3 * PAGE_SIZE)
    try:
        p.write(a, bytes(range(256)) * 48)
        p.mprotect(a + PAGE_SIZE, PAGE_SIZE, PROT_READ)
        out = [_outcome(p, lambda: p.write(a + PAGE_SIZE - 96, b"x" * 200), a)]
        out.append(_outcome(p, lambda: p.read(a + PAGE_SIZE - 100, 100)[:4], a))
        p.munmap(a + 2 * PAGE_SIZE, PAGE_SIZE)
        out.append(_outcome(p, lambda: len(p.read(a + 5000, 2 * PAGE_SIZE)), a))
        out.append(_outcome(p, lambda: p.read(a + PAGE_SIZE - 100, 100)[-4:], a))
        return out
    finally:
        p.munmap(a, 2 * PAGE_SIZE)


def sigbus_feature(p: Any) -> tuple[Any, ...]:
    """UFFD_FEATURE_SIGBUS: a read from a present page into a missing one of a registered
    range stops with SIGBUS (BUS_ADRERR) at the missing page."""
    a = p.mmap(0, 2 * PAGE_SIZE)
    u = p.userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
    try:
        u.api(uapi.UFFD_FEATURE_SIGBUS)
        p.write(a, b"\x11" * 10)
        u.register(a, 2 * PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MISSING)
        return _outcome(p, lambda: p.read(a + 8, PAGE_SIZE), a)
    finally:
        u.close()
        p.munmap(a, 2 * PAGE_SIZE)


def unmapped_under_a_blocked_fault(p: Any) -> tuple[Any, ...]:
    """A thread blocked in a MISSING fault; the area is unmapped, then the uffd closed.

    Release wakes the faulting thread, its retry finds no VMA: SIGSEGV
    (SEGV_MAPERR) in that thread, raised as ``Sigsegv``.
    """
    a = p.mmap(0, PAGE_SIZE)
    u = p.userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
    box: list[tuple[Any, ...]] = []
    try:
        u.api(0)
        u.register(a, PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MISSING)
        t = p.thread("T")
        th = threading.Thread(target=lambda: box.append(_outcome(p, lambda: t.read(a, 8), a)),
                              daemon=True)
        th.start()
        assert select.select([u.fileno()], [], [], 10)[0], "no fault message"
        msg = u.read_msgs(32)[0]
        p.munmap(a, PAGE_SIZE)
    finally:
        u.close()
    th.join(10)
    assert not th.is_alive()
    return (msg.address - a, *box[0])


@pytest.fixture(params=["vmemu", "kernel"])
def proc(request: pytest.FixtureRequest) -> Any:
    if request.param == "vmemu":
        return vmemu.Process()
    p = native_process_or_skip()
    native_access_or_skip()  # without it NativeTask's accesses end the run at a signal
    return p


def test_signals_report_where_the_access_stopped(proc: Any) -> None:
    assert protection_and_holes(proc) == [
        ("SIGSEGV", "SEGV_ACCERR", PAGE_SIZE, 96),
        ("ok", bytes([156, 157, 158, 159])),
        ("SIGSEGV", "SEGV_MAPERR", 2 * PAGE_SIZE, 2 * PAGE_SIZE - 5000),
        ("ok", b"xxxx"),
    ]


def test_uffd_sigbus_feature_raises_sigbus(proc: Any) -> None:
    assert sigbus_feature(proc) == ("SIGBUS", "BUS_ADRERR", PAGE_SIZE, PAGE_SIZE - 8)


def test_thread_blocked_in_a_userfault_survives_the_unmap(proc: Any) -> None:
    assert unmapped_under_a_blocked_fault(proc) == (0, "SIGSEGV", "SEGV_MAPERR", 0, 0)
