"""The execution model: tasks, and the one API through which every task blocks.

Kernel analogue: `kernel/sched/core.c` seen from a driver.  A *task* is a
thread of an emulated process (it has a tid and a tgid); every memory access,
syscall and ioctl vmemu emulates is made by the current task.  A task blocks
only through a wait queue (`vmemu.sched.waitqueue`), `sleep` or `join`, which
all come down to three primitives every runtime implements:

* `prepare_sleep(task)`  - `set_current_state(TASK_UNINTERRUPTIBLE)`: from
  here a wake-up is remembered, so a wake that races with the condition check
  is never lost;
* `schedule(reason, deadline_ns)` - `schedule_timeout()`: sleep until woken
  or until the deadline passes (returns at once if woken since
  `prepare_sleep`);
* `wake_up_process(task)` - `try_to_wake_up()`.

Three runtimes implement them (DESIGN.md decision 5): `ThreadRuntime` (real
Python threads), `InlineRuntime` (everything on the calling thread, handlers
run by the faulting task) and `SimRuntime` (a deterministic multi-CPU
scheduler with a virtual clock).  Code written against `Runtime` runs
unchanged on all three.

Nothing a task raises is lost (as in unicorn): `join` re-raises it, and
`run` re-raises the first exception that no `join` observed.
"""

from __future__ import annotations

import enum
import itertools
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from vmemu.sched.clock import COST_NAMES, NSEC_PER_SEC, CostModel, VirtualClock
from vmemu.sched.trace import Stamp, Tracer

if TYPE_CHECKING:
    from vmemu.sched.waitqueue import WaitQueue


class TaskState(enum.Enum):
    """Where a task is in its life (kernel `TASK_*` states, simplified)."""

    NEW = "new"  # spawned, never run
    RUNNABLE = "runnable"  # ready, waiting for a CPU (sim) or to be started (inline)
    RUNNING = "running"
    BLOCKED = "blocked"  # asleep in schedule(), `wait_reason` says on what
    DONE = "done"


@attrs.frozen
class BlockedTask:
    """One entry of a `Deadlock` report: who is blocked, and on what."""

    tid: int
    name: str
    reason: str

    def __str__(self) -> str:
        return f"tid {self.tid} ({self.name}) waits on {self.reason}"


class Deadlock(RuntimeError):
    """Every task is blocked and nothing (no timer, no runnable task) can wake one."""

    def __init__(self, blocked: Iterable[BlockedTask], detail: str = "") -> None:
        self.blocked = tuple(blocked)
        lines = [detail or "deadlock: every task is blocked and no timer is pending"]
        lines += [f"  {b}" for b in self.blocked]
        super().__init__("\n".join(lines))


class ReentrantFault(Deadlock):
    """An inline resolver needed itself: a handler waited on the queue it resolves.

    Typically an inline fault handler touched memory registered with the very
    userfaultfd it serves.  Reported instead of deadlocking.
    """


class TaskKilled(BaseException):
    """Raised inside a task that is torn down after its run ended (e.g. a deadlock).

    A BaseException so that ordinary `except Exception` blocks let it unwind.
    """


@attrs.frozen
class ChargeStatistics:
    """What a runtime has charged: counts and nanoseconds per cost name."""

    counts: dict[str, int | float]
    ns: dict[str, int]
    total_ns: int


class TaskHandle:
    """A task (an emulated thread): `tid`, `name`, `tgid`, and a `join` for its result.

    Kernel analogue: `struct task_struct`.  `wait_reason` says what a blocked
    task sleeps on; `local` is per-task storage for the layers above (the mm
    a task runs in, its current fault, ...).
    """

    def __init__(
        self, runtime: Runtime, tid: int, name: str, tgid: int,
        fn: Callable[..., Any] | None, args: tuple[Any, ...],
    ) -> None:
        self.runtime = runtime
        self.tid = tid
        self.name = name
        self.tgid = tgid
        self.fn = fn
        self.args = args
        self.state = TaskState.NEW
        self.wait_reason: str | None = None
        self.result: Any = None
        self.exception: BaseException | None = None
        self.observed = False
        self.local: dict[str, Any] = {}
        #: wait queues whose inline resolver is running on this task right now
        self.resolving: list[WaitQueue] = []
        self.woken = False  # a wake-up arrived since prepare_sleep
        self._exit_wq: WaitQueue | None = None

    @property
    def done(self) -> bool:
        """Whether the task has finished (returned or raised)."""
        return self.state is TaskState.DONE

    @property
    def exit_queue(self) -> WaitQueue:
        """The wait queue `join` sleeps on (woken when the task exits)."""
        if self._exit_wq is None:
            from vmemu.sched.waitqueue import WaitQueue

            self._exit_wq = WaitQueue(self.runtime, f"exit:{self.tid}")
            self.runtime._setup_exit_queue(self, self._exit_wq)
        return self._exit_wq

    def join(self, timeout: float | None = None) -> Any:
        """Wait for the task to finish; return its result or re-raise its exception.

        Raises `TimeoutError` if it is still running after `timeout` seconds
        (virtual seconds under the simulation).
        """
        return self.runtime._join(self, timeout)

    def __repr__(self) -> str:
        return f"<task {self.tid} {self.name!r} {self.state.value}>"


class Runtime(ABC):
    """What every runtime provides: tasks, blocking, time, costs and tracing.

    Subclasses implement the scheduling primitives; the rest (charging,
    joining, exception bookkeeping) is shared here.
    """

    #: a short name for the runtime kind ("threads", "inline", "sim")
    kind: str = "abstract"
    #: whether charges move the clock (`_account`): False where real time passes by itself,
    #: so the order of charges within a task cannot be observed
    charges_move_clock: bool = True

    def __init__(
        self, *, cost: CostModel | None = None, tracer: Tracer | None = None,
        clock: VirtualClock | None = None,
    ) -> None:
        self.cost = cost if cost is not None else CostModel()
        self.tracer = tracer if tracer is not None else Tracer()
        self.tracer.bind(self._stamp)
        self.clock = clock if clock is not None else VirtualClock()
        self._tids = itertools.count(1)
        self._tasks: dict[int, TaskHandle] = {}
        self._failed: list[TaskHandle] = []
        self._charge_counts: Counter[str] = Counter()
        self._charge_ns: Counter[str] = Counter()
        self._priced: CostModel | None = None
        self._prices: dict[str, int | float] = {}
        self._unit: dict[str, int] = {}  # the price of one unit, for the common charge(name)

    # ---- tasks ---------------------------------------------------------------

    @abstractmethod
    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> TaskHandle:
        """Create a task running `fn(*args)` (kernel `kernel_clone` of a thread)."""

    @abstractmethod
    def current(self) -> TaskHandle:
        """The task making the current call (kernel `current`)."""

    @abstractmethod
    def run(self, main: Callable[..., Any], *args: Any) -> Any:
        """Run `main(*args)` as the first task and drive the program to its end.

        Returns `main`'s result; re-raises the first exception of any task
        that nobody joined; raises `Deadlock` if tasks are left blocked for
        good (where the runtime can tell).
        """

    def tasks(self) -> list[TaskHandle]:
        """Every task ever spawned, by tid."""
        return list(self._tasks.values())

    def _new_task(
        self, cls: type[TaskHandle], fn: Callable[..., Any] | None, args: tuple[Any, ...],
        name: str | None, parent: TaskHandle | None,
    ) -> TaskHandle:
        tid = next(self._tids)
        label = name if name is not None else getattr(fn, "__name__", f"task{tid}")
        tgid = parent.tgid if parent is not None and parent.tid != 0 else tid
        task = cls(self, tid, label, tgid, fn, args)
        self._tasks[tid] = task
        return task

    def _run_body(self, task: TaskHandle) -> None:
        """Run a task's function to its end and record how it ended (`do_exit`)."""
        task.state = TaskState.RUNNING
        if task.fn is None:
            raise RuntimeError(f"task {task.tid} has no function to run")
        try:
            task.result = task.fn(*task.args)
        except TaskKilled:
            task.exception = None
        except BaseException as exc:  # recorded, re-raised by join() or run()
            task.exception = exc
            self._failed.append(task)
        self._exit(task)

    def _exit(self, task: TaskHandle) -> None:
        task.state = TaskState.DONE
        if task.exception is None:
            self.tracer.emit("exit")
        else:
            self.tracer.emit("exit", error=type(task.exception).__name__)
        if task._exit_wq is not None:
            task._exit_wq.wake_up_all()

    def _setup_exit_queue(self, task: TaskHandle, wq: WaitQueue) -> None:  # noqa: B027
        """Hook for runtimes that join by running the task (inline)."""

    def _join(self, task: TaskHandle, timeout: float | None) -> Any:
        if not task.done:
            if task.state is not TaskState.NEW and self._current_or_none() is task:
                raise Deadlock(
                    [BlockedTask(task.tid, task.name, f"join of itself (tid {task.tid})")]
                )
            ok = task.exit_queue.wait_event(
                lambda: task.done, reason=f"join tid {task.tid}", timeout=timeout
            )
            if not ok:
                raise TimeoutError(f"task {task.tid} ({task.name}) still running after {timeout}s")
        task.observed = True
        if task.exception is not None:
            raise task.exception
        return task.result

    def _raise_unobserved(self, extra: Exception | None = None) -> None:
        """Re-raise the first exception nobody joined (with `extra` as a note)."""
        for task in self._failed:
            if not task.observed and task.exception is not None:
                task.observed = True
                exc = task.exception
                exc.add_note(f"raised in task {task.tid} ({task.name})")
                if extra is not None:
                    exc.add_note(str(extra))
                raise exc
        if extra is not None:
            raise extra

    @abstractmethod
    def _current_or_none(self) -> TaskHandle | None:
        """The current task, or None outside any task."""

    # ---- blocking primitives (used by WaitQueue) -----------------------------

    @abstractmethod
    def prepare_sleep(self, task: TaskHandle) -> None:
        """Arm `task` for sleeping: remember wake-ups from now on (`set_current_state`)."""

    @abstractmethod
    def schedule(
        self, reason: str, deadline_ns: int | None = None, queues: tuple[WaitQueue, ...] = ()
    ) -> None:
        """Sleep the current task until woken or `deadline_ns` (`schedule_timeout`).

        Returns at once if a wake-up arrived since `prepare_sleep`.  `queues`
        are the wait queues it sleeps on (the inline runtime uses them).
        """

    @abstractmethod
    def wake_up_process(self, task: TaskHandle, reason: str = "") -> bool:
        """Wake `task` (kernel `try_to_wake_up`); True if it was asleep or arming."""

    @abstractmethod
    def make_lock(self) -> Any:
        """A lock protecting a wait queue's list (`wait_queue_head.lock`).

        A real lock with real threads, a no-op where tasks take turns.
        """

    def cond_resched(self) -> None:  # noqa: B027
        """A voluntary preemption point (kernel `cond_resched`); no-op by default.

        Call it where no emulated structure is half-updated (syscall entry or
        exit): under the simulation another task may run here.
        """

    # ---- time ----------------------------------------------------------------

    def now_ns(self) -> int:
        """The current task's time, in nanoseconds."""
        return self.clock.now_ns()

    def now(self) -> float:
        """The current task's time, in seconds (virtual seconds in the simulation)."""
        return self.now_ns() / NSEC_PER_SEC

    @abstractmethod
    def sleep(self, seconds: float) -> None:
        """Sleep for `seconds` (kernel `schedule_timeout` with nobody to wake it)."""

    def deadline_after(self, timeout: float | None) -> int | None:
        """The deadline, in ns of this runtime's clock, `timeout` seconds from now."""
        if timeout is None:
            return None
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0, not {timeout}")
        return self.now_ns() + round(timeout * NSEC_PER_SEC)

    # ---- the cost model ------------------------------------------------------

    def charge(self, cost_name: str, n: int | float = 1) -> int:
        """Charge `n` units of `cost_name` to the current task's CPU; return the ns charged.

        `cost_name` is one of `COST_NAMES` (`syscall`, `fault`, `context_switch`,
        `wakeup`, `spin`, `copy_byte`, `page_alloc`, `tlb_flush`,
        `tlb_shootdown_per_cpu`).  Never a scheduling point.
        """
        if n == 1 and self.cost is self._priced:  # one unit at a cached price: the hot case
            ns = self._unit.get(cost_name)
            if ns is not None:
                self._charge_counts[cost_name] += 1
                self._charge_ns[cost_name] += ns
                if self.charges_move_clock:
                    self._account(ns)
                return ns
        cost = self.cost
        if cost is not self._priced:
            self._price(cost)
        per = self._prices.get(cost_name)
        if per is None or n < 0:  # an unknown name, a negative count, or a custom `of`
            ns = cost.of(cost_name, n)
        else:
            ns = round(per * n)
        self._charge_counts[cost_name] += n  # type: ignore[assignment]
        self._charge_ns[cost_name] += ns
        if self.charges_move_clock:
            self._account(ns)
        return ns

    def _price(self, cost: CostModel) -> None:
        """Cache ``cost``'s per-unit figures (``charge`` runs several times per fault).

        Only for a model that prices with `CostModel.of` itself; a subclass
        with its own ``of`` is asked every time.
        """
        self._priced = cost
        if type(cost).of is CostModel.of:
            self._prices = {name: getattr(cost, name) for name in COST_NAMES}
        else:
            self._prices = {}
        self._unit = {name: round(per) for name, per in self._prices.items()}  # n == 1

    def charge_ns(self, ns: int, what: str) -> None:
        """Charge `ns` nanoseconds of CPU work named `what` (backend latency models)."""
        if ns < 0:
            raise ValueError(f"cannot charge negative time ({ns} ns) for {what!r}")
        self._charge_counts[what] += 1
        self._charge_ns[what] += int(ns)
        self._account(int(ns))

    def charges(self) -> ChargeStatistics:
        """Everything charged so far, per cost name."""
        return ChargeStatistics(
            dict(self._charge_counts), dict(self._charge_ns), sum(self._charge_ns.values())
        )

    def _account(self, ns: int) -> None:
        """Advance the current task's clock by `ns` (virtual runtimes)."""
        self.clock.advance(ns)

    @abstractmethod
    def _stamp(self) -> Stamp:
        """(time ns, cpu, tid, task name) for a trace event."""
