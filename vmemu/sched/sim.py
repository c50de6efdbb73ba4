"""Deterministic simulation: N emulated CPUs, a virtual clock, a seeded scheduler.

What it models.  Every task is a host thread, but only one holds the *baton*
at any moment, so user code is ordinary blocking Python and runs one task at
a time.  Each of the `ncpus` emulated CPUs owns a `VirtualClock`; a task's
"now" is its CPU's clock, which advances only by `charge()` (the cost model),
by context switches, and by idling until a task is ready.

How the next task is chosen (`_pick`, called at every scheduling point: a
task blocks, sleeps, exits, or calls `cond_resched`).  The candidates are

* each CPU's current task, which continues at that CPU's clock, and
* each ready task - woken, spawned, or sleeping with a deadline - placed on
  the idle CPU where it can start soonest (preferring the CPU it last ran
  on, then the lowest CPU number), starting at max(CPU clock, ready time).

The candidate with the earliest start time runs next, as in a discrete-event
simulation; candidates that tie are ordered by (kind, tid) and one is drawn
with `random.Random(seed)`.  Nothing from the host (thread ids, hashes,
timing) enters a decision, so one seed gives one trace, byte for byte, and
different seeds explore different interleavings wherever the model allows a
tie.  Between two scheduling points a task's work is atomic: `charge` never
switches tasks, so the layers above may update their structures freely.

Preemption happens at `cond_resched`, the scheduling point a running task
offers: a task that has run for longer than `CostModel.timeslice` while
another task is waiting gives the CPU up (EEVDF's slice, enforced by the
tick).  A task *waits* once its ready time has passed: a woken or spawned
task since its wake-up, a sleeper since its deadline (the hrtimer fired and
woke it, `hrtimer_wakeup`), so an expired timer is honoured within one slice
even when every CPU is busy.  The preempted task queues behind the waiting
ones: in a tie it gives way to every task that was already waiting when it
was preempted (`_queue_behind`), so a task whose timer expired waits a
bounded number of slices, never for ever.  A dispatch onto a CPU whose
previous task differs costs `context_switch`.

Deadlock: no CPU has a task and no task is ready or sleeping with a
deadline, yet some task is blocked.  `run` then raises `Deadlock` naming
each blocked task and its wait reason, after unwinding the blocked tasks
with `TaskKilled`.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any, cast

import attrs

from vmemu.sched.clock import NSEC_PER_SEC, CostModel, VirtualClock
from vmemu.sched.inline import NO_LOCK
from vmemu.sched.runtime import (
    BlockedTask,
    Deadlock,
    Runtime,
    TaskHandle,
    TaskKilled,
    TaskState,
)
from vmemu.sched.trace import Stamp, Tracer
from vmemu.sched.waitqueue import WaitQueue


class Cpu:
    """One emulated CPU (kernel `struct rq`): its clock and its current task."""

    __slots__ = ("id", "clock", "curr", "last", "switches", "idle_ns")

    def __init__(self, cpu_id: int) -> None:
        self.id = cpu_id
        self.clock = VirtualClock()
        self.curr: SimTask | None = None
        self.last: SimTask | None = None
        self.switches = 0
        self.idle_ns = 0


@attrs.frozen
class CpuStatistics:
    """Per-CPU figures of a simulation."""

    cpu: int
    clock_ns: int
    idle_ns: int
    context_switches: int


class SimTask(TaskHandle):
    """A task of the simulation: a host thread that runs only while holding its baton."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.baton = threading.Lock()
        self.baton.acquire()
        self.ready_at = 0
        self.deadline: int | None = None
        self.cpu: Cpu | None = None
        self.last_cpu = -1
        self.slice_start = 0
        self.preempted_at: int | None = None  # when cond_resched last took its CPU
        self.killed = False


def _waiting_since(task: SimTask) -> int:
    """When a ready task became able to run: its wake-up, or its timer's expiry."""
    return task.ready_at if task.deadline is None else task.deadline


def _queue_behind(
    tie: list[tuple[int, int, SimTask, Cpu]],
) -> list[tuple[int, int, SimTask, Cpu]]:
    """Drop from a tie the preempted tasks that queue behind another candidate.

    A task preempted at time p goes to the back of the run queue (round
    robin on slice expiry, as EEVDF gives the waiting tasks the earlier
    deadlines): while a ready task that was already waiting at p can start
    as early, the preempted one does not run.  Tasks that became ready later
    compete with it by the seeded draw, so nothing starves.
    """
    ready = [c[2] for c in tie if c[0] == 1]
    behind = {
        p.tid for p in ready if p.preempted_at is not None
        and any(x is not p and _waiting_since(x) <= p.preempted_at for x in ready)
    }
    if not behind or len(behind) == len(tie):
        return tie
    return [c for c in tie if c[1] not in behind]


class SimRuntime(Runtime):
    """A deterministic scheduler over `ncpus` emulated CPUs, seeded by `seed`."""

    kind = "sim"

    def __init__(
        self, seed: int = 0, ncpus: int = 1, cost: CostModel | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        if ncpus < 1:
            raise ValueError(f"ncpus must be >= 1, not {ncpus}")
        self.seed = seed
        self.cpus = [Cpu(i) for i in range(ncpus)]
        super().__init__(cost=cost, tracer=tracer, clock=self.cpus[0].clock)
        self._rng = random.Random(seed)
        self._ready: dict[int, SimTask] = {}  # runnable, or asleep with a deadline
        self._holder: SimTask | None = None
        self._driver = threading.Lock()
        self._running = False
        self._tearing_down = False
        self._deadlock: Deadlock | None = None

    # ---- tasks ---------------------------------------------------------------

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> TaskHandle:
        task = cast(SimTask, self._new_task(SimTask, fn, args, name, self._holder))
        task.state = TaskState.RUNNABLE
        task.ready_at = self.now_ns()
        self._ready[task.tid] = task
        self.tracer.emit("spawn", child=task.tid, name=task.name)
        threading.Thread(
            target=self._bootstrap, args=(task,), name=f"vmemu-sim-{task.tid}", daemon=True
        ).start()
        return task

    def _bootstrap(self, task: SimTask) -> None:
        task.baton.acquire()
        if not task.killed:
            self._run_body(task)
        else:
            task.state = TaskState.DONE
        if task.cpu is not None:
            task.cpu.curr = None
            task.cpu = None
        self._switch(None)

    def current(self) -> TaskHandle:
        if self._holder is None:
            raise RuntimeError("SimRuntime.current() outside run(): no task is running")
        return self._holder

    def _current_or_none(self) -> TaskHandle | None:
        return self._holder

    def run(self, main: Callable[..., Any], *args: Any) -> Any:
        if self._running:
            raise RuntimeError("SimRuntime.run() is already running")
        first = self.spawn(main, *args, name=getattr(main, "__name__", "main"))
        self._running = True
        self._deadlock = None
        self._driver.acquire()
        try:
            self._switch(None)
            self._driver.acquire()  # released when the run ends
            deadlock = self._deadlock
            if deadlock is not None:
                self._teardown()
        finally:
            self._driver.release()
            self._running = False
        self._raise_unobserved(deadlock)
        return self._join(first, None)

    def _teardown(self) -> None:
        """Unwind every task left blocked, one at a time, with `TaskKilled`."""
        self._tearing_down = True
        try:
            for task in self.tasks():
                sim_task = cast(SimTask, task)
                if task.done or task.fn is None:
                    continue
                sim_task.killed = True
                self._holder = sim_task
                sim_task.baton.release()
                self._driver.acquire()
        finally:
            self._tearing_down = False
            self._holder = None
            self._ready.clear()
            for cpu in self.cpus:
                cpu.curr = None

    # ---- the scheduler -------------------------------------------------------

    def _pick(self) -> tuple[SimTask, Cpu, int] | None:
        """The next (task, cpu, start time) to run, or None if nothing can run."""
        best: list[tuple[int, int, SimTask, Cpu]] = []  # (kind, tid, task, cpu), all at best_t
        best_t = 0
        idle = []
        for cpu in self.cpus:
            curr = cpu.curr
            if curr is None:
                idle.append(cpu)
                continue
            t = cpu.clock.now_ns()
            if not best or t < best_t:
                best, best_t = [(0, curr.tid, curr, cpu)], t
            elif t == best_t:
                best.append((0, curr.tid, curr, cpu))
        if idle:
            for task in self._ready.values():
                ready = task.ready_at if task.deadline is None else task.deadline
                if len(idle) == 1:
                    where = idle[0]
                else:
                    last = task.last_cpu
                    where = min(
                        idle, key=lambda c: (max(c.clock.now_ns(), ready), c.id != last, c.id)
                    )
                t = max(where.clock.now_ns(), ready)
                if not best or t < best_t:
                    best, best_t = [(1, task.tid, task, where)], t
                elif t == best_t:
                    best.append((1, task.tid, task, where))
        if not best:
            return None
        if len(best) == 1:
            choice = best[0]
        else:
            if any(c[2].preempted_at is not None for c in best):
                best = _queue_behind(best)
            best.sort(key=lambda c: (c[0], c[1]))
            choice = best[self._rng.randrange(len(best))]
        return choice[2], choice[3], best_t

    def _dispatch(self, task: SimTask, cpu: Cpu, start: int) -> None:
        """Make `task` the baton holder, placing it on `cpu` if it was not there."""
        self._holder = task
        if cpu.curr is task:
            return
        del self._ready[task.tid]
        cpu.idle_ns += max(0, start - cpu.clock.now_ns())
        cpu.clock.advance_to(start)
        cpu.curr = task
        task.cpu = cpu
        task.deadline = None
        task.preempted_at = None
        task.state = TaskState.RUNNING
        task.wait_reason = None
        if cpu.last is not task:
            prev = cpu.last
            cpu.last = task
            cpu.switches += 1
            self.charge("context_switch")
            self.tracer.emit("switch", prev=0 if prev is None else prev.tid, next=task.tid)
        task.last_cpu = cpu.id
        task.slice_start = cpu.clock.now_ns()

    def _switch(self, prev: SimTask | None) -> None:
        """Hand the baton to the next task; `prev` (if any) sleeps until picked again."""
        if self._tearing_down:
            self._driver.release()
            if prev is not None:
                prev.baton.acquire()
            return
        choice = self._pick()
        if choice is None:
            self._end_of_run()
            if prev is not None:
                prev.baton.acquire()
            return
        task, cpu, start = choice
        self._dispatch(task, cpu, start)
        if task is prev:
            return
        task.baton.release()
        if prev is not None:
            prev.baton.acquire()

    def _end_of_run(self) -> None:
        blocked = [
            BlockedTask(t.tid, t.name, t.wait_reason or "?")
            for t in self.tasks() if not t.done and t.fn is not None
        ]
        if blocked:
            self._deadlock = Deadlock(
                blocked, f"deadlock (sim seed={self.seed}): every task is blocked, no timer pending"
            )
            self.tracer.emit("deadlock", blocked=len(blocked))
        self._holder = None
        self._driver.release()

    # ---- blocking primitives -------------------------------------------------

    def prepare_sleep(self, task: TaskHandle) -> None:
        task.woken = False

    def schedule(
        self, reason: str, deadline_ns: int | None = None, queues: tuple[WaitQueue, ...] = ()
    ) -> None:
        task = cast(SimTask, self.current())
        if task.killed:
            raise TaskKilled()
        if task.woken:
            return
        task.state = TaskState.BLOCKED
        task.wait_reason = reason
        self.tracer.emit("block", reason=reason)
        cpu = task.cpu
        if cpu is not None:
            cpu.curr = None
        task.cpu = None
        if deadline_ns is not None:
            task.deadline = deadline_ns
            self._ready[task.tid] = task
        self._switch(task)
        if task.killed:
            raise TaskKilled()

    def wake_up_process(self, task: TaskHandle, reason: str = "") -> bool:
        sim_task = cast(SimTask, task)
        if task.state is TaskState.BLOCKED:
            task.woken = True
            task.state = TaskState.RUNNABLE
            sim_task.deadline = None
            sim_task.ready_at = self.now_ns()
            self._ready[task.tid] = sim_task
            return True
        was_armed = not task.woken
        task.woken = True
        return was_armed

    def make_lock(self) -> Any:
        return NO_LOCK

    def cond_resched(self) -> None:
        task = self._holder
        if task is None or task.cpu is None:
            return
        cpu = task.cpu
        now = cpu.clock.now_ns()
        if now - task.slice_start >= self.cost.timeslice and any(
            (t.ready_at if t.deadline is None else t.deadline) <= now
            for t in self._ready.values()
        ):
            cpu.curr = None
            task.cpu = None
            task.state = TaskState.RUNNABLE
            task.ready_at = task.preempted_at = now
            self._ready[task.tid] = task
        self._switch(task)

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"sleep length must be >= 0, not {seconds}")
        task = self.current()
        self.tracer.emit("sleep", seconds=seconds)
        self.prepare_sleep(task)
        self.schedule(f"sleep {seconds}s", self.now_ns() + round(seconds * NSEC_PER_SEC))

    # ---- time ----------------------------------------------------------------

    def now_ns(self) -> int:
        holder = self._holder
        if holder is not None and holder.cpu is not None:
            return holder.cpu.clock.now_ns()
        return max(cpu.clock.now_ns() for cpu in self.cpus)

    def _account(self, ns: int) -> None:
        holder = self._holder
        cpu = holder.cpu if holder is not None and holder.cpu is not None else self.cpus[0]
        cpu.clock.advance(ns)

    def _stamp(self) -> Stamp:
        holder = self._holder
        if holder is None:
            return (self.now_ns(), -1, 0, "-")
        cpu = holder.cpu
        if cpu is None:
            return (self.now_ns(), -1, holder.tid, holder.name)
        return (cpu.clock.now_ns(), cpu.id, holder.tid, holder.name)

    def cpu_statistics(self) -> list[CpuStatistics]:
        """Clock, idle time and context switches of each CPU."""
        return [CpuStatistics(c.id, c.clock.now_ns(), c.idle_ns, c.switches) for c in self.cpus]

    def _check(self) -> None:
        """Verify the scheduler's invariants (O(tasks)); raises AssertionError if broken."""
        for cpu in self.cpus:
            if cpu.curr is not None:
                assert cpu.curr.cpu is cpu and cpu.curr.tid not in self._ready
        for task in self._ready.values():
            assert task.cpu is None and not task.done
            assert task.state is TaskState.RUNNABLE or task.deadline is not None
