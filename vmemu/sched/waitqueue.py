"""Wait queues: where tasks sleep until a condition holds, and how they are woken.

Mirrors `kernel/sched/wait.c` and `include/linux/wait.h`.  A waiter adds an
entry to the queue, arms itself for sleeping, re-checks its condition and
only then sleeps (`prepare_to_wait_event` + `schedule`), so a wake-up that
races with the check is never lost.  A waker walks the queue
(`__wake_up_common`): every non-exclusive entry is woken, and exclusive
entries are woken until `nr_exclusive` of them have been.  Entries are
removed when woken (`autoremove_wake_function`); a woken waiter that finds
its condition still false puts itself back and counts a *wasted* wake-up,
which is what the exclusive-wake-up proposals for userfaultfd set out to
reduce.  Non-exclusive entries go to the head of the list and exclusive ones
to the tail (`add_wait_queue` / `add_wait_queue_exclusive`), as in Linux.

Keys: a waker may pass a key, and only entries whose key matches are woken
(userfaultfd wakes only the faults inside the range a UFFDIO_COPY filled:
`userfaultfd_wake_function`).  By default an entry's key matches a wake key
that is equal to it, a `range` containing it, or a wake key of None; an
entry whose key is callable is used as its own predicate.

Resolvers (vmemu's, for inline handling): a queue may carry a resolver, a
callback that can make waiters' conditions true.  A waiter whose condition is
false runs the resolver itself, on its own task, before it sleeps - this is
how an inline userfaultfd handler runs on the faulting thread.  A resolver
that ends up waiting on its own queue would wait forever; that is reported
as `ReentrantFault` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from vmemu.sched.runtime import ReentrantFault, Runtime, TaskHandle

KeyMatch = Callable[[Any, Any], bool]
Resolver = Callable[[Any], None]


def _reason(reason: str | Callable[[], str]) -> str:
    """A wait reason given as text, or as a function that formats it on demand."""
    return reason if isinstance(reason, str) else reason()


def default_key_match(entry_key: Any, wake_key: Any) -> bool:
    """Whether a waiter registered with `entry_key` is woken by a wake with `wake_key`."""
    if wake_key is None or entry_key is None:
        return True
    if callable(entry_key):
        return bool(entry_key(wake_key))
    if isinstance(wake_key, range):
        return entry_key in wake_key
    return bool(entry_key == wake_key)


@attrs.frozen
class WaitQueueStatistics:
    """A snapshot of a wait queue's counters (trio-style `statistics()`)."""

    name: str
    waiting: int  # entries on the queue now
    waiting_exclusive: int  # of which exclusive
    wake_calls: int  # wake_up* calls
    woken_total: int  # tasks woken
    woken_exclusive: int  # of which exclusive
    wasted_wakeups: int  # woken, but the condition was still false
    timeouts: int  # waits that ended by timeout
    resolver_calls: int  # inline resolver runs


class WaitQueueEntry:
    """One sleeping task on one queue (kernel `struct wait_queue_entry`)."""

    __slots__ = ("task", "exclusive", "key", "queued", "woken", "resolver_tried")

    def __init__(self, task: TaskHandle, exclusive: bool, key: Any) -> None:
        self.task = task
        self.exclusive = exclusive
        self.key = key
        self.queued = False
        self.woken = False
        self.resolver_tried = False

    def __repr__(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return f"<wait entry tid={self.task.tid} {kind} key={self.key!r}>"


class WaitQueue:
    """A queue of sleeping tasks (kernel `struct wait_queue_head`).

    `runtime` supplies the sleeping primitives and the queue's lock; `match`
    decides which waiters a keyed wake-up reaches; `resolver`, if set, runs on
    a waiting task before it sleeps (inline handling).
    """

    def __init__(
        self, runtime: Runtime, name: str, *, match: KeyMatch | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.match: KeyMatch = match if match is not None else default_key_match
        self.resolver = resolver
        self._lock = runtime.make_lock()
        self._entries: list[WaitQueueEntry] = []
        self._wake_calls = 0
        self._woken = 0
        self._woken_exclusive = 0
        self._wasted = 0
        self._timeouts = 0
        self._resolver_calls = 0

    def set_resolver(self, resolver: Resolver | None) -> None:
        """Install (or remove, with None) the inline resolver `resolver(key)`."""
        self.resolver = resolver

    # ---- the waiting side ----------------------------------------------------

    def prepare_to_wait(self, entry: WaitQueueEntry) -> None:
        """Queue `entry` if it is not queued, and arm its task (`prepare_to_wait_event`)."""
        with self._lock:
            if not entry.queued:
                if entry.exclusive:
                    self._entries.append(entry)
                else:
                    self._entries.insert(0, entry)
                entry.queued = True
            self.runtime.prepare_sleep(entry.task)

    def finish_wait(self, entry: WaitQueueEntry) -> None:
        """Take `entry` off the queue if still there (kernel `finish_wait`)."""
        with self._lock:
            if entry.queued:
                self._entries.remove(entry)
                entry.queued = False

    def wait_event(
        self, condition: Callable[[], bool], *, exclusive: bool = False, key: Any = None,
        reason: str | Callable[[], str], timeout: float | None = None,
        before_sleep: Callable[[], None] | None = None, resolver_tried: bool = False,
    ) -> bool:
        """Sleep until `condition()` is true; False if `timeout` seconds passed first.

        Kernel `wait_event_timeout` / `wait_event_interruptible_exclusive`:
        the condition is checked before sleeping and after every wake-up;
        `exclusive` waiters are woken one at a time; `key` is matched against
        a waker's key; `reason` names what is awaited in traces and deadlock
        reports (a callable is called only if the task really sleeps, so a
        hot path need not format it). `before_sleep`, if given, runs once,
        when the task is queued, armed and has found the condition false,
        just before it runs the resolver or sleeps: what `handle_userfault`
        does with `wake_up_poll(&ctx->fd_wqh)` right before `schedule()`, so
        that the woken reader does not wait for the waker to go to sleep.
        `resolver_tried` says the caller already ran the resolver for this
        round (`run_resolver`): the task sleeps before running it again.

        The body is `prepare_to_wait_event` + `schedule` + `finish_wait`
        written out in one frame (this runs on every userfault).
        """
        if condition():
            return True
        runtime = self.runtime
        task = runtime.current()
        entry = WaitQueueEntry(task, exclusive, key)
        entry.resolver_tried = resolver_tried
        deadline = None if timeout is None else runtime.deadline_after(timeout)
        lock = self._lock
        prepare_sleep = runtime.prepare_sleep
        what = ""
        try:
            while True:
                with lock:  # prepare_to_wait_event
                    if not entry.queued:
                        if exclusive:
                            self._entries.append(entry)
                        else:
                            self._entries.insert(0, entry)
                        entry.queued = True
                    prepare_sleep(task)
                if condition():
                    return True
                if before_sleep is not None:
                    if self.resolver is None:  # about to sleep: format the reason first, so
                        what = f"{self.name}: {_reason(reason)}"  # the wake-up comes last
                    before_sleep()
                    before_sleep = None
                    # the task it woke may have run at once (on one CPU it usually does)
                    # and woken this one in turn: then schedule() would return at once
                    if entry.woken and condition():
                        return True
                if entry.woken:
                    with lock:
                        self._wasted += 1
                    entry.woken = False
                if deadline is not None and runtime.now_ns() >= deadline:
                    with lock:
                        self._timeouts += 1
                    runtime.tracer.emit("timeout", queue=self.name, reason=_reason(reason))
                    return False
                if self.resolver is not None and not entry.resolver_tried:
                    entry.resolver_tried = True
                    self.run_resolver(task, key, reason)
                    if condition():  # resolved: no need to queue again to find out
                        return True
                    continue
                runtime.schedule(what or f"{self.name}: {_reason(reason)}", deadline, (self,))
                entry.resolver_tried = False
                if entry.woken and condition():  # woken, and the condition holds: done
                    return True  # (re-queueing first, as the loop would, changes nothing)
        finally:
            if entry.queued:  # finish_wait
                with lock:
                    if entry.queued:
                        self._entries.remove(entry)
                        entry.queued = False

    def run_resolver(self, task: TaskHandle, key: Any, reason: str | Callable[[], str]) -> None:
        """Run the inline resolver on `task`, refusing to re-enter it (`ReentrantFault`).

        `wait_event` calls it before sleeping; a caller that knows its wait
        is usually resolved at once may call it first and wait only if it
        was not (then with ``resolver_tried=True``).
        """
        resolving = task.resolving
        if self in resolving:
            what = f"{self.name}: {_reason(reason)}"
            raise ReentrantFault(
                [],
                f"re-entrant wait: task {task.tid} ({task.name}) waits on {what!r} while "
                f"running that queue's inline resolver (a handler touched memory it serves?)",
            )
        resolver = self.resolver
        assert resolver is not None
        with self._lock:
            self._resolver_calls += 1
        resolving.append(self)
        try:
            resolver(key)
        finally:
            resolving.remove(self)

    # ---- the waking side -----------------------------------------------------

    def wake_up(self, key: Any = None, nr_exclusive: int = 1) -> int:
        """Wake every matching non-exclusive waiter and up to `nr_exclusive` exclusive ones.

        Kernel `__wake_up` / `__wake_up_common`; `nr_exclusive <= 0` wakes all.
        A `key` of None reaches every waiter; any other key only the waiters
        the queue's `match` accepts.
        Charges `wakeup` per task woken to the caller.  Returns how many were woken.
        """
        runtime = self.runtime
        woken: list[WaitQueueEntry] = []
        with self._lock:
            self._wake_calls += 1
            entries = self._entries
            if not entries:
                return 0
            if len(entries) == 1:  # one sleeper, the usual case: the loop below, unrolled
                one: WaitQueueEntry | None = entries[0]
                assert one is not None
                if key is not None and not self.match(one.key, key):
                    return 0
                entries.clear()
                one.queued = False
                one.woken = True
                if one.exclusive:
                    self._woken_exclusive += 1
                self._woken += 1
            else:
                one = None
                left = nr_exclusive
                match = self.match
                for entry in list(entries):
                    if key is not None and not match(entry.key, key):
                        continue
                    entries.remove(entry)
                    entry.queued = False
                    entry.woken = True
                    woken.append(entry)
                    if entry.exclusive:
                        self._woken_exclusive += 1
                        left -= 1
                        if left == 0:
                            break
                self._woken += len(woken)
        # try_to_wake_up once the queue's lock is dropped: a woken thread that runs at
        # once (it may preempt the waker) must not find the lock still held
        if one is not None:
            runtime.wake_up_process(one.task)
            if runtime.tracer.enabled:
                runtime.tracer.emit("wake", queue=self.name, target=one.task.tid)
            runtime.charge("wakeup")
            return 1
        if not woken:
            return 0
        wake_up_process = runtime.wake_up_process
        for entry in woken:
            wake_up_process(entry.task)
        tracer = runtime.tracer
        if tracer.enabled:
            for entry in woken:
                tracer.emit("wake", queue=self.name, target=entry.task.tid)
        runtime.charge("wakeup", len(woken))
        return len(woken)

    def account_woken(self, n: int = 1) -> None:
        """Count `n` waiters woken, as `wake_up` does, for waits that never queued.

        For a caller that ran the resolver itself (`run_resolver`) and found
        its condition made true by a wake-up aimed at it: the statistics and
        the `wakeup` charge are what the queued entry's wake-up would have
        given (the wake-up call itself is counted by `wake_up` as usual).
        """
        with self._lock:
            self._woken += n
        self.runtime.charge("wakeup", n)

    def wake_up_all(self, key: Any = None) -> int:
        """Wake every matching waiter, exclusive or not (kernel `wake_up_all`)."""
        return self.wake_up(key, nr_exclusive=0)

    def wake_up_nr(self, nr: int, key: Any = None) -> int:
        """Wake all non-exclusive and up to `nr` exclusive waiters (kernel `wake_up_nr`)."""
        if nr < 1:
            raise ValueError(f"wake_up_nr needs nr >= 1, not {nr}; use wake_up_all")
        return self.wake_up(key, nr_exclusive=nr)

    # ---- observation ---------------------------------------------------------

    def waitqueue_active(self) -> bool:
        """Whether anyone is waiting (kernel `waitqueue_active`)."""
        return bool(self._entries)

    def waiters(self) -> list[TaskHandle]:
        """The tasks waiting now, in wake-up order."""
        with self._lock:
            return [e.task for e in self._entries]

    def statistics(self) -> WaitQueueStatistics:
        """A frozen snapshot of the queue's counters."""
        with self._lock:
            return WaitQueueStatistics(
                name=self.name,
                waiting=len(self._entries),
                waiting_exclusive=sum(e.exclusive for e in self._entries),
                wake_calls=self._wake_calls,
                woken_total=self._woken,
                woken_exclusive=self._woken_exclusive,
                wasted_wakeups=self._wasted,
                timeouts=self._timeouts,
                resolver_calls=self._resolver_calls,
            )

    def _check(self) -> None:
        """Verify the queue's invariants (O(n)); raises AssertionError if broken."""
        with self._lock:
            seen_exclusive = False
            for entry in self._entries:
                assert entry.queued, entry
                if entry.exclusive:
                    seen_exclusive = True
                else:
                    assert not seen_exclusive, "non-exclusive entry after an exclusive one"
            assert len({id(e) for e in self._entries}) == len(self._entries)

    def __repr__(self) -> str:
        return f"<WaitQueue {self.name!r} waiting={len(self._entries)}>"


class Mutex:
    """A sleeping lock whose waiters queue exclusively (kernel `struct mutex`).

    For the layers above that must hold a lock across a blocking point under
    real threads (an `mmap_lock` stand-in); under the other runtimes it
    still serializes tasks, through the same wait queue.
    """

    def __init__(self, runtime: Runtime, name: str) -> None:
        self.runtime = runtime
        self.owner: TaskHandle | None = None
        self._guard = runtime.make_lock()
        self._wq = WaitQueue(runtime, f"mutex:{name}")

    def _try_lock(self, task: TaskHandle) -> bool:
        with self._guard:
            if self.owner is None:
                self.owner = task
            return self.owner is task

    def lock(self) -> None:
        """Acquire, sleeping while another task holds it (kernel `mutex_lock`)."""
        task = self.runtime.current()
        if self.owner is task:
            raise RuntimeError(f"mutex {self._wq.name} is already held by tid {task.tid}")
        self._wq.wait_event(lambda: self._try_lock(task), exclusive=True, reason="mutex_lock")

    def unlock(self) -> None:
        """Release and wake one waiter (kernel `mutex_unlock`)."""
        with self._guard:
            if self.owner is not self.runtime.current():
                raise RuntimeError(f"mutex {self._wq.name} unlocked by a non-owner")
            self.owner = None
        self._wq.wake_up(nr_exclusive=1)

    def __enter__(self) -> Mutex:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()
