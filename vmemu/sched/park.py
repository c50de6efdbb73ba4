"""Parking a real thread until another wakes it: the binary permit under `ThreadRuntime`.

A task of the threads runtime sleeps by *parking* and is woken by an
*unpark* (Java's ``LockSupport.park``/``unpark``; in the kernel the task
state plus ``try_to_wake_up``). The permit is binary: unparks that arrive
while one is pending merge, and a park with a pending permit returns at
once. Every sleep in vmemu is a ``wait_event`` loop that checks its
condition again, so a spurious return is harmless; a lost unpark is not.

Two implementations with the same four calls (``clear``, ``unpark``,
``park``, ``release``):

* `PipeParker` - pure Python. The task sleeps in ``os.read`` on a pipe of
  its own and the waker writes one byte. A pipe rather than a
  ``threading.Lock`` because of how the hand-off meets the GIL:
  ``os.write`` lets go of the GIL *before* it wakes the sleeper, and a pipe
  wake-up is a synchronous one (``WF_SYNC``: the scheduler is told the
  waker is about to sleep), where releasing a lock wakes the sleeper while
  the waker still holds the GIL - the sleeper runs, finds the GIL taken and
  sleeps again. On one CPU that is 2 context switches per round trip
  against 5.
* `SpinParker` - the same pipe, plus a spin in C (``_park.c``, a CPython
  extension module built by :mod:`vmemu.cbuild`) with the GIL released, for as long as ``spin_ns``,
  while the task that was woken last (the one that will run next) is on
  another CPU: the kernel's mutex optimistic spinning, or KVM's halt
  polling. Across two CPUs of a VM a pipe hand-off costs an IPI and a
  host reschedule of the sleeping vCPU, ~25-35 us each way here; spinning
  makes it a store and a load, at the price of up to ``spin_ns`` of CPU per
  park. On one CPU it never spins, and it is what `PipeParker` is, for a
  tenth of the Python work: its three calls are built-ins (~0.15 us for an
  unpark and a park that finds the permit, against ~1.5 us in Python).

`make_parker` gives a `SpinParker` when the C helper builds (a compiler and
the Python headers) and ``spin_ns`` is positive, else a `PipeParker`.
"""

from __future__ import annotations

import math
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vmemu.cbuild as cbuild  # imports nothing else of vmemu

#: How long a parking thread spins before it sleeps (``ThreadRuntime(spin_ns=...)``).
DEFAULT_SPIN_NS = 50_000

# Pipes of parkers that were released, for new ones to reuse: a runtime keeps every task
# it ever spawned, so a pipe per task for its whole life would run a long-lived runtime out
# of file descriptors. A pipe is never closed while a task may still name it; a waker that
# still holds a finished task's parker can at worst leave a byte in a pooled pipe, which
# makes its next owner's park return once early (a spurious wake-up).
_PIPE_POOL: list[tuple[int, int]] = []
_PIPE_POOL_LOCK = threading.Lock()


def _take_pipe() -> tuple[int, int]:
    with _PIPE_POOL_LOCK:
        if _PIPE_POOL:
            return _PIPE_POOL.pop()
    return os.pipe()


def _give_pipe(rfd: int, wfd: int) -> None:
    """Drain a pipe and put it in the pool."""
    poller = select.poll()
    poller.register(rfd, select.POLLIN)
    while poller.poll(0):  # a wake-up nobody parked for: never blocks
        os.read(rfd, 64)
    with _PIPE_POOL_LOCK:
        _PIPE_POOL.append((rfd, wfd))


class PipeParker:
    """A permit kept in Python and a pipe byte that carries it to a sleeping thread."""

    kind = "pipe"

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.permit = False  # a byte is in the pipe, or on its way
        self.woken = False  # unparked since the last clear() (a park does not reset it)
        self.rfd, self.wfd = _take_pipe()

    def clear(self) -> None:
        """Forget a pending unpark and the woken flag (``set_current_state``: only
        wake-ups from now on count)."""
        with self.guard:
            stale = self.permit
            self.permit = self.woken = False
        if stale:
            os.read(self.rfd, 1)  # written, or about to be: the waker set permit first

    def unpark(self) -> bool:
        """Give the permit; wakes the thread if it is parked. True if it is the first
        unpark since :meth:`clear` (``try_to_wake_up``'s answer); False after
        :meth:`release`."""
        with self.guard:
            if self.wfd < 0:
                return False
            fresh = not self.woken
            self.woken = True
            if self.permit:  # one is pending already: the two merge
                return False
            self.permit = True
            wfd = self.wfd
        os.write(wfd, b"\0")  # lets go of the GIL first, then wakes the sleeper
        return fresh

    def park(self, timeout_s: float | None = None) -> bool:
        """Wait for the permit and take it; False when ``timeout_s`` passed first."""
        if timeout_s is None:
            os.read(self.rfd, 1)
        else:
            poller = select.poll()  # (select.select stops at fd 1023)
            poller.register(self.rfd, select.POLLIN)
            if not poller.poll(math.ceil(max(0.0, timeout_s) * 1000)):
                return False
            os.read(self.rfd, 1)
        with self.guard:
            self.permit = False
        return True

    def release(self) -> None:
        """The thread ended: later unparks do nothing; the pipe goes back to the pool."""
        with self.guard:
            rfd, wfd, self.wfd = self.rfd, self.wfd, -1
        if wfd >= 0:
            _give_pipe(rfd, wfd)


_SOURCE = Path(__file__).with_name("_park.c")
_helper: Any = None  # the built extension module
_helper_error: str | None = None


def _load() -> Any:
    """The C helper, a CPython extension module, or None (and why, in ``_helper_error``)."""
    global _helper, _helper_error
    if _helper is None and _helper_error is None:
        try:
            _helper = cbuild.load_module(_SOURCE)
        except (cbuild.HelperUnavailable, OSError) as e:  # OSError: the library would not load
            _helper_error = str(e)
    return _helper


class SpinParker:
    """The permit in C, taken by spinning while the next task runs elsewhere, else by sleeping.

    ``clear``, ``unpark`` and ``park`` are the C object's own methods, bound
    to the instance: a call is a built-in call, with no Python frame.
    """

    kind = "spin"
    #: Forget a pending unpark and the woken flag (no byte is ever left behind: see
    #: ``_park.c``).
    clear: Callable[[], None]
    #: Give the permit; write the pipe (GIL let go of first) only if the thread sleeps on it.
    #: True if it is the first unpark since :meth:`clear`; False after :meth:`release`.
    unpark: Callable[[], bool]
    #: ``park(timeout_s=None)``: wait for the permit and take it; False when ``timeout_s``
    #: passed first. A signal's Python handler runs while parked; an untimed park then parks
    #: again, a timed one returns False (its caller recomputes what is left of the deadline).
    park: Callable[..., bool]

    def __init__(self, spin_ns: int) -> None:
        helper = _load()
        if helper is None:
            raise cbuild.HelperUnavailable(_helper_error or "no park helper")
        rfd, wfd = _take_pipe()
        self.c = c = helper.Parker(rfd, wfd, spin_ns)
        self.clear, self.unpark, self.park = c.clear, c.unpark, c.park

    @property
    def rfd(self) -> int:
        """The pipe's read end (where the thread sleeps)."""
        return int(self.c.rfd)

    @property
    def woken(self) -> bool:
        """Unparked since the last :meth:`clear` (a park does not reset it)."""
        return bool(self.c.woken)

    @property
    def spun(self) -> int:
        """Parks that ended while spinning."""
        return int(self.c.spun)

    @property
    def slept(self) -> int:
        """Parks that ended asleep on the pipe."""
        return int(self.c.slept)

    def release(self) -> None:
        """The thread ended: later unparks do nothing; the pipe goes back to the pool."""
        c = self.c
        if not c.released:
            c.released = 1
            _give_pipe(c.rfd, c.wfd)


Parker = PipeParker | SpinParker


def make_parker(spin_ns: int = DEFAULT_SPIN_NS) -> Parker:
    """A `SpinParker` when ``spin_ns`` > 0 and the C helper is available, else a `PipeParker`."""
    if spin_ns > 0 and _load() is not None:
        return SpinParker(spin_ns)
    return PipeParker()


def spin_unavailable_reason() -> str | None:
    """Why `make_parker` cannot spin here (None when it can)."""
    _load()
    return _helper_error
