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
* `SpinParker` - the same pipe, plus a spin in C (``_park.c``, built by
  :mod:`vmemu.cbuild`) with the GIL released, for as long as ``spin_ns``,
  while the task that was woken last (the one that will run next) is on
  another CPU: the kernel's mutex optimistic spinning, or KVM's halt
  polling. Across two CPUs of a VM a pipe hand-off costs an IPI and a
  host reschedule of the sleeping vCPU, ~25-35 us each way here; spinning
  makes it a store and a load, at the price of up to ``spin_ns`` of CPU per
  park. On one CPU it never spins, and it is what `PipeParker` is.

`make_parker` gives a `SpinParker` when the C helper builds and ``spin_ns``
is positive, else a `PipeParker`.
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import threading
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
        self.rfd, self.wfd = _take_pipe()

    def clear(self) -> None:
        """Forget a pending unpark (``set_current_state``: only wake-ups from now on count)."""
        with self.guard:
            stale = self.permit
            self.permit = False
        if stale:
            os.read(self.rfd, 1)  # written, or about to be: the waker set permit first

    def unpark(self) -> None:
        """Give the permit; wakes the thread if it is parked."""
        with self.guard:
            if self.permit or self.wfd < 0:  # one is pending already, or released
                return
            self.permit = True
            wfd = self.wfd
        os.write(wfd, b"\0")  # lets go of the GIL first, then wakes the sleeper

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


class _ParkStruct(ctypes.Structure):
    _fields_ = [
        ("permit", ctypes.c_int),
        ("state", ctypes.c_int),
        ("rfd", ctypes.c_int),
        ("wfd", ctypes.c_int),
        ("cpu", ctypes.c_int),
        ("pad", ctypes.c_int),
        ("spun", ctypes.c_long),
        ("slept", ctypes.c_long),
        ("wake_gen", ctypes.c_long),
    ]


_SOURCE = Path(__file__).with_name("_park.c")
_helper: tuple[Any, Any] | None = None
_helper_error: str | None = None


def _load() -> tuple[Any, Any] | None:
    """``(park, unpark)`` from the C helper, or None (and why, in ``_helper_error``)."""
    global _helper, _helper_error
    if _helper is None and _helper_error is None:
        try:
            park = cbuild.load(_SOURCE).vmemu_park  # CDLL: lets go of the GIL
            unpark = cbuild.load(_SOURCE, py=True).vmemu_unpark  # PyDLL: keeps it
        except (cbuild.HelperUnavailable, OSError) as e:  # OSError: the library would not load
            _helper_error = str(e)
            return None
        park.argtypes = [ctypes.POINTER(_ParkStruct), ctypes.c_long, ctypes.c_int]
        park.restype = ctypes.c_int
        unpark.argtypes = [ctypes.POINTER(_ParkStruct)]
        unpark.restype = ctypes.c_int
        _helper = (park, unpark)
    return _helper


class SpinParker:
    """The permit in C, taken by spinning while the next task runs elsewhere, else by sleeping."""

    kind = "spin"

    def __init__(self, spin_ns: int) -> None:
        helper = _load()
        if helper is None:
            raise cbuild.HelperUnavailable(_helper_error or "no park helper")
        self._park, self._unpark = helper
        rfd, wfd = _take_pipe()
        self.spin_ns = spin_ns
        self.s = _ParkStruct(0, 0, rfd, wfd, -1)
        self.ref = ctypes.byref(self.s)
        self.released = False

    @property
    def spun(self) -> int:
        """Parks that ended while spinning."""
        return int(self.s.spun)

    @property
    def slept(self) -> int:
        """Parks that ended asleep on the pipe."""
        return int(self.s.slept)

    def clear(self) -> None:
        """Forget a pending unpark (no byte is ever left behind: see ``_park.c``)."""
        self.s.permit = 0

    def unpark(self) -> None:
        """Give the permit; write the pipe only if the thread is asleep on it."""
        if not self.released and self._unpark(self.ref):
            os.write(self.s.wfd, b"\0")  # lets go of the GIL first, then wakes the sleeper

    def park(self, timeout_s: float | None = None) -> bool:
        """Wait for the permit and take it; False when ``timeout_s`` passed first."""
        if timeout_s is None:
            spin, timeout_ms = self.spin_ns, -1
        else:
            timeout_s = max(0.0, timeout_s)
            spin, timeout_ms = min(self.spin_ns, int(timeout_s * 1e9)), math.ceil(timeout_s * 1000)
        while True:
            r = self._park(self.ref, spin, timeout_ms)
            if r == 0:
                return True
            if r < 0:
                raise OSError(-r, os.strerror(-r))
            if r == 1 or timeout_s is not None:  # timed out; or a signal: the caller's
                return False  # wait_event loop recomputes what is left of its deadline
            # a signal: its Python handler runs here, between two bytecodes; park again

    def release(self) -> None:
        """The thread ended: later unparks do nothing; the pipe goes back to the pool."""
        if not self.released:
            self.released = True
            _give_pipe(self.s.rfd, self.s.wfd)


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
