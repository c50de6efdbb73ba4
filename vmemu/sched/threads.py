"""Real threads: every task is a Python thread, sleeping is a real wait.

The runtime for handlers that block in `read()` or wait in `select`/`poll`
on a real file descriptor (`vmemu.sched.pollfd`).  Time is the host's
monotonic clock (`MonotonicClock`, the one wall-clock reader in vmemu);
charges are counted but do not move it.  A host thread that vmemu did not
spawn (the main thread, a user's own `threading.Thread`) becomes a task the
first time it asks for `current()`, as a kernel thread gets a task_struct.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

from vmemu.sched.clock import NSEC_PER_SEC, CostModel, MonotonicClock
from vmemu.sched.park import DEFAULT_SPIN_NS, make_parker
from vmemu.sched.runtime import Runtime, TaskHandle, TaskState
from vmemu.sched.trace import Stamp, Tracer
from vmemu.sched.waitqueue import WaitQueue


class ThreadTask(TaskHandle):
    """A task backed by a real Python thread; it sleeps by parking (`vmemu.sched.park`)."""

    def __init__(self, runtime: ThreadRuntime, *args: Any) -> None:
        super().__init__(runtime, *args)
        #: the task's binary permit and its `woken` flag: cleared by prepare_sleep, given
        #: by wake_up_process
        self.parker = make_parker(runtime.spin_ns)
        #: gives the parker's pipe back to the pool: when the thread ends, or when the
        #: task is collected
        self.release_parker = weakref.finalize(self, self.parker.release)
        self.thread: threading.Thread | None = None

    @property
    def woken(self) -> bool:
        """A wake-up reached the task since it last armed itself: kept by its parker,
        set with the permit, so that waking takes no lock of its own."""
        parker = self.__dict__.get("parker")
        return parker is not None and bool(parker.woken)

    @woken.setter
    def woken(self, value: bool) -> None:
        if value or "parker" in self.__dict__:  # TaskHandle.__init__ sets False, before it
            raise AttributeError("a thread task's woken flag is its parker's: "
                                 "wake_up_process sets it, prepare_sleep clears it")


class ThreadRuntime(Runtime):
    """Tasks are Python threads; blocking uses threading primitives.

    `run(main)` starts `main` as a task and returns once every spawned task
    has finished.  No deadlock detection: a real thread may be woken by
    something vmemu cannot see.
    """

    kind = "threads"
    charges_move_clock = False  # charges are only counted

    def __init__(self, *, cost: CostModel | None = None, tracer: Tracer | None = None,
                 spin_ns: int = DEFAULT_SPIN_NS) -> None:
        super().__init__(cost=cost, tracer=tracer, clock=MonotonicClock())
        #: how long a parking thread may spin first (`vmemu.sched.park`); 0: never
        self.spin_ns = spin_ns
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
            task.release_parker()  # a later wake-up of this task does nothing

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
        task.parker.clear()  # type: ignore[attr-defined]  # forget an earlier wake-up

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
                task.parker.park()
            else:
                remaining = (deadline_ns - self.now_ns()) / NSEC_PER_SEC
                if remaining > 0:
                    task.parker.park(remaining)
        finally:
            task.state = TaskState.RUNNING
            task.wait_reason = None

    def wake_up_process(self, task: TaskHandle, reason: str = "") -> bool:
        return bool(task.parker.unpark())  # type: ignore[attr-defined]  # True: it was armed

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
