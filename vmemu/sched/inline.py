"""Inline: one host thread, no scheduler; whoever waits makes the progress.

The runtime of the "asynchronous read/write" idea of the userfaultfd
polling-mode proposal: a fault handler registered for inline use (a wait
queue's resolver) runs on the faulting task itself.  There is no scheduler
and nothing runs in parallel, so a task that must wait does the work that
would end its wait, in this order:

1. the queue's resolver, once per wake-up round (see `WaitQueue.wait_event`);
2. a task spawned but not started yet: the oldest one runs to completion,
   nested on the waiter's stack (`join` runs the joined task first);
3. if the wait has a timeout, the virtual clock jumps to it;
4. otherwise nothing can ever end the wait: `Deadlock`.

A consequence of nesting: a task started by a waiter cannot itself wait for
that waiter (it is suspended below it on the stack).  Programs whose tasks
hand work back and forth through bounded buffers need the threads or
simulation runtime; producer/consumer with room for the whole output, and
every fault-then-resolve pattern, run inline.

Time is a `VirtualClock`: charges and `sleep` advance it, nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from vmemu.sched.clock import NSEC_PER_SEC, CostModel, VirtualClock
from vmemu.sched.runtime import BlockedTask, Deadlock, Runtime, TaskHandle, TaskState
from vmemu.sched.trace import Stamp, Tracer
from vmemu.sched.waitqueue import WaitQueue


class _NoLock:
    """The lock of a runtime where tasks never run in parallel."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


NO_LOCK = _NoLock()


class InlineRuntime(Runtime):
    """Everything runs on the calling thread; waits run resolvers or pending tasks."""

    kind = "inline"

    def __init__(
        self, *, cost: CostModel | None = None, tracer: Tracer | None = None,
        clock: VirtualClock | None = None,
    ) -> None:
        super().__init__(cost=cost, tracer=tracer, clock=clock)
        self._stack: list[TaskHandle] = []
        self._pending: list[TaskHandle] = []
        self._outside: TaskHandle | None = None

    # ---- tasks ---------------------------------------------------------------

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> TaskHandle:
        task = self._new_task(TaskHandle, fn, args, name, self._current_or_none())
        task.state = TaskState.RUNNABLE
        self._pending.append(task)
        self.tracer.emit("spawn", child=task.tid, name=task.name)
        return task

    def _run_task(self, task: TaskHandle) -> None:
        """Run a pending task to completion, nested on the current stack."""
        self._pending.remove(task)
        self._stack.append(task)
        try:
            self.tracer.emit("switch", next=task.tid, next_name=task.name)
            self._run_body(task)
        finally:
            self._stack.pop()
        if self._stack:
            top = self._stack[-1]
            self.tracer.emit("switch", next=top.tid, next_name=top.name)

    def _setup_exit_queue(self, task: TaskHandle, wq: WaitQueue) -> None:
        def run_if_pending(key: Any) -> None:
            if task in self._pending:
                self._run_task(task)

        wq.set_resolver(run_if_pending)

    def current(self) -> TaskHandle:
        task = self._current_or_none()
        if task is not None:
            return task
        if self._outside is None:
            self._outside = self._new_task(TaskHandle, None, (), "outside", None)
            self._outside.state = TaskState.RUNNING
        return self._outside

    def _current_or_none(self) -> TaskHandle | None:
        return self._stack[-1] if self._stack else self._outside

    def run(self, main: Callable[..., Any], *args: Any) -> Any:
        first = self.spawn(main, *args, name=getattr(main, "__name__", "main"))
        self._run_task(first)
        while self._pending:
            self._run_task(self._pending[0])
        self._raise_unobserved()
        return self._join(first, None)

    # ---- blocking primitives -------------------------------------------------

    def prepare_sleep(self, task: TaskHandle) -> None:
        task.woken = False

    def schedule(
        self, reason: str, deadline_ns: int | None = None, queues: tuple[WaitQueue, ...] = ()
    ) -> None:
        task = self.current()
        if task.woken:
            return
        if self._pending:
            with self._blocked(task, reason):
                self._run_task(self._pending[0])
            return
        if deadline_ns is not None:
            self.tracer.emit("block", reason=reason)
            self.clock.advance_to(deadline_ns)
            return
        blocked = [BlockedTask(task.tid, task.name, reason)]
        blocked += [
            BlockedTask(t.tid, t.name, t.wait_reason or "?")
            for t in reversed(self._stack[:-1]) if t.state is TaskState.BLOCKED
        ]
        self.tracer.emit("deadlock", reason=reason)
        raise Deadlock(
            blocked,
            "deadlock (inline runtime): no resolver, pending task or timeout can end this wait",
        )

    @contextlib.contextmanager
    def _blocked(self, task: TaskHandle, reason: str) -> Iterator[None]:
        task.state = TaskState.BLOCKED
        task.wait_reason = reason
        self.tracer.emit("block", reason=reason)
        try:
            yield
        finally:
            task.state = TaskState.RUNNING
            task.wait_reason = None

    def wake_up_process(self, task: TaskHandle, reason: str = "") -> bool:
        was_asleep = not task.woken
        task.woken = True
        return was_asleep

    def make_lock(self) -> Any:
        return NO_LOCK

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"sleep length must be >= 0, not {seconds}")
        self.tracer.emit("sleep", seconds=seconds)
        self.clock.advance(round(seconds * NSEC_PER_SEC))

    def _stamp(self) -> Stamp:
        task = self._current_or_none()
        if task is None:
            return (self.clock.now_ns(), 0, 0, "-")
        return (self.clock.now_ns(), 0, task.tid, task.name)
