"""Real threads: every task is a Python thread, sleeping is a real wait.

The runtime for handlers that block in `read()` or wait in `select`/`poll`
on a real file descriptor (`vmemu.sched.pollfd`).  Time is the host's
monotonic clock (`MonotonicClock`, the one wall-clock reader in vmemu);
charges are counted but do not move it.  A host thread that vmemu did not
spawn (the main thread, a user's own `threading.Thread`) becomes a task the
first time it asks for `current()`, as a kernel thread gets a task_struct.
"""

from __future__ import annotations

import math
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

from vmemu.sched.clock import NSEC_PER_SEC, CostModel, MonotonicClock
from vmemu.sched.runtime import Runtime, TaskHandle, TaskState
from vmemu.sched.trace import Stamp, Tracer
from vmemu.sched.waitqueue import WaitQueue


class ThreadTask(TaskHandle):
    """A task backed by a real Python thread.

    The task sleeps in ``os.read`` on a pipe of its own and a waker writes
    one byte to it: a binary permit (Java's ``LockSupport.park``/``unpark``,
    the kernel's task state plus ``try_to_wake_up``). ``permit`` says a
    wake-up byte is in the pipe (or on its way), so there is never more than
    one; ``guard`` orders its changes. A pipe rather than a ``threading.Lock``
    because of how the hand-off meets the GIL: ``os.write`` lets go of the GIL
    *before* it wakes the sleeper, and a pipe wake-up is a synchronous one
    (``WF_SYNC``: the scheduler is told the waker is about to sleep), where
    releasing a lock wakes the sleeper while the waker still holds the GIL -
    the sleeper runs, finds the GIL taken and sleeps again. A ping-pong of
    two threads on one CPU makes 2 context switches per round trip this way
    against 5, and costs half the CPU time (6-8 against 13-16 us here).
    The pipes come from a pool and go back to it when the thread ends.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.guard = threading.Lock()
        self.permit = False
        self.rfd, self.wfd = _take_pipe()
        #: gives the pipe back to the pool: when the thread ends, or when the task is collected
        self.release_pipe = weakref.finalize(self, _give_pipe, self.rfd, self.wfd)
        self.thread: threading.Thread | None = None


# Parking pipes of tasks that ended, for new tasks to reuse: the runtime keeps every task
# it ever spawned, so a pipe per task for its whole life would run a long-lived runtime out
# of file descriptors. A pipe is never closed while a task may still name it - a waker
# that still holds a finished task's descriptor (it took the task off a queue just before
# the task timed out and ended) can at worst leave a byte in a pooled pipe, which makes
# its next owner's sleep return once early: every sleep is a `wait_event` loop, which
# checks its condition again and goes back to sleep.
_PIPE_POOL: list[tuple[int, int]] = []
_PIPE_POOL_LOCK = threading.Lock()


def _take_pipe() -> tuple[int, int]:
    with _PIPE_POOL_LOCK:
        if _PIPE_POOL:
            return _PIPE_POOL.pop()
    return os.pipe()


def _give_pipe(rfd: int, wfd: int) -> None:
    """Drain a task's pipe and put it in the pool (when its thread ends or it is collected)."""
    poller = select.poll()
    poller.register(rfd, select.POLLIN)
    while poller.poll(0):  # a wake-up nobody slept for: never blocks
        os.read(rfd, 64)
    with _PIPE_POOL_LOCK:
        _PIPE_POOL.append((rfd, wfd))


class ThreadRuntime(Runtime):
    """Tasks are Python threads; blocking uses threading primitives.

    `run(main)` starts `main` as a task and returns once every spawned task
    has finished.  No deadlock detection: a real thread may be woken by
    something vmemu cannot see.
    """

    kind = "threads"
    charges_move_clock = False  # charges are only counted

    def __init__(self, *, cost: CostModel | None = None, tracer: Tracer | None = None) -> None:
        super().__init__(cost=cost, tracer=tracer, clock=MonotonicClock())
        self._local = threading.local()
        self._registry_lock = threading.Lock()

    # ---- tasks ---------------------------------------------------------------

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> TaskHandle:
        with self._registry_lock:
            parent = self._current_or_none()
            task = cast(ThreadTask, self._new_task(ThreadTask, fn, args, name, parent))
        task.state = TaskState.RUNNABLE
        task.exit_queue  # created before the thread can exit  # noqa: B018
        thread = threading.Thread(
            target=self._bootstrap, args=(task,), name=f"vmemu-{task.tid}-{task.name}", daemon=True
        )
        task.thread = thread
        self.tracer.emit("spawn", child=task.tid, name=task.name)
        thread.start()
        return task

    def _bootstrap(self, task: ThreadTask) -> None:
        self._local.task = task
        try:
            self._run_body(task)
        finally:
            with task.guard:  # a later wake-up of this task writes nothing
                task.wfd = -1
            task.release_pipe()

    def current(self) -> TaskHandle:
        task: TaskHandle | None = getattr(self._local, "task", None)
        if task is None:
            with self._registry_lock:
                task = self._new_task(ThreadTask, None, (), threading.current_thread().name, None)
            task.state = TaskState.RUNNING
            self._local.task = task
        return task

    def _current_or_none(self) -> TaskHandle | None:
        return cast(TaskHandle | None, getattr(self._local, "task", None))

    def run(self, main: Callable[..., Any], *args: Any) -> Any:
        first = self.spawn(main, *args, name=getattr(main, "__name__", "main"))
        while True:
            pending = [t for t in self.tasks() if t.fn is not None and not t.done]
            if not pending:
                break
            for task in pending:
                thread = cast(ThreadTask, task).thread
                if thread is not None:
                    thread.join()
        self._raise_unobserved()
        return self._join(first, None)

    # ---- blocking primitives -------------------------------------------------

    def prepare_sleep(self, task: TaskHandle) -> None:
        t: Any = task
        with t.guard:  # forget an earlier wake-up: take its byte out of the pipe
            task.woken = False
            stale = t.permit
            t.permit = False
        if stale:
            os.read(t.rfd, 1)  # written, or about to be: the waker set permit first

    def schedule(
        self, reason: str, deadline_ns: int | None = None, queues: tuple[WaitQueue, ...] = ()
    ) -> None:
        task: Any = getattr(self._local, "task", None)  # current(), without typing.cast calls
        if task is None:
            task = self.current()
        task.state = TaskState.BLOCKED
        task.wait_reason = reason
        if self.tracer.enabled:
            self.tracer.emit("block", reason=reason)
        try:
            if deadline_ns is None:
                os.read(task.rfd, 1)
            else:
                remaining = (deadline_ns - self.now_ns()) / NSEC_PER_SEC
                if remaining <= 0:
                    return
                poller = select.poll()  # (select.select stops at fd 1023)
                poller.register(task.rfd, select.POLLIN)
                if not poller.poll(math.ceil(remaining * 1000)):
                    return
                os.read(task.rfd, 1)
            with task.guard:
                task.permit = False
        finally:
            task.state = TaskState.RUNNING
            task.wait_reason = None

    def wake_up_process(self, task: TaskHandle, reason: str = "") -> bool:
        t: Any = task
        with t.guard:
            was_asleep = not task.woken
            task.woken = True
            if t.permit or t.wfd < 0:  # a wake-up is pending (the permit is binary), or
                return was_asleep  # the task has ended
            t.permit = True
            wfd = t.wfd
        os.write(wfd, b"\0")  # lets go of the GIL first, then wakes the sleeper
        return was_asleep

    def make_lock(self) -> Any:
        return threading.Lock()

    def cond_resched(self) -> None:
        os.sched_yield()

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"sleep length must be >= 0, not {seconds}")
        task = cast(ThreadTask, self.current())
        self.tracer.emit("sleep", seconds=seconds)
        deadline = self.now_ns() + round(seconds * NSEC_PER_SEC)
        task.state = TaskState.BLOCKED
        task.wait_reason = f"sleep {seconds}s"
        try:
            while (remaining := deadline - self.now_ns()) > 0:
                time.sleep(remaining / NSEC_PER_SEC)
        finally:
            task.state = TaskState.RUNNING
            task.wait_reason = None

    # ---- time ----------------------------------------------------------------

    def _account(self, ns: int) -> None:
        """Real time passes by itself: charges are only counted."""

    def _stamp(self) -> Stamp:
        task = self._current_or_none()
        if task is None:
            return (self.clock.now_ns(), 0, 0, threading.current_thread().name)
        return (self.clock.now_ns(), 0, task.tid, task.name)
