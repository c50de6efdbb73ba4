"""Tracepoints: an event log of what the tasks did, when, and on which CPU.

Mirrors the kernel's tracepoints (`sched:sched_switch`, `sched:sched_wakeup`,
`exceptions:page_fault_user`, ...) read through `trace_pipe`.  The runtime
stamps every event with the virtual time, the CPU and the task that emitted
it; the layers above add their own kinds (`fault`, `uffd_msg`, `ioctl`, ...)
through `Tracer.emit`.  Events are frozen values that tests compare, and
`format_timeline` prints them for people.

Under the simulation the stamps come from virtual clocks and deterministic
tids, so the same seed gives the same timeline byte for byte.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable
from typing import Any

import attrs

#: (virtual time in ns, cpu, tid, task name) of the emitting context.
Stamp = tuple[int, int, int, str]
TraceHook = Callable[["TraceEvent"], None]

#: Event kinds the scheduler itself emits.
SCHED_KINDS = ("spawn", "exit", "switch", "block", "wake", "timeout", "sleep", "deadlock")


def _no_stamp() -> Stamp:
    return (0, 0, 0, "?")


@attrs.frozen
class TraceEvent:
    """One tracepoint hit: `kind` plus its fields, stamped with time, CPU and task."""

    seq: int
    time_ns: int
    cpu: int
    tid: int
    task: str
    kind: str
    fields: tuple[tuple[str, Any], ...] = ()

    def __getitem__(self, name: str) -> Any:
        for key, value in self.fields:
            if key == name:
                return value
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:
        """The field `name`, or `default` when the event has no such field."""
        for key, value in self.fields:
            if key == name:
                return value
        return default

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (in emission order)."""
        return dict(self.fields)

    def format(self) -> str:
        """One timeline line: `   12.345us cpu0   3 consumer     block reason='...'`."""
        args = " ".join(f"{k}={_format_value(k, v)}" for k, v in self.fields)
        head = f"{self.time_ns / 1000:>12.3f}us cpu{self.cpu} {self.tid:>4} {self.task:<12.12}"
        return f"{head} {self.kind:<10} {args}".rstrip()


def _format_value(key: str, value: Any) -> str:
    """Addresses print in hex, as a kernel trace does; everything else as repr."""
    if isinstance(value, int) and not isinstance(value, bool) and "addr" in key:
        return hex(value)
    return repr(value)


class Tracer:
    """The event log: `emit` records, `events` reads back, `format_timeline` prints.

    Kernel analogue: the ftrace ring buffer with tracepoints enabled.  The
    owning runtime binds a stamp function that says the current virtual
    time, CPU and task.  `enabled=False` turns every `emit` into a no-op
    (for benchmarks); hooks see each event as it is recorded.
    """

    def __init__(self, *, enabled: bool = True, stamp: Callable[[], Stamp] | None = None) -> None:
        self.enabled = enabled
        self._stamp: Callable[[], Stamp] = stamp or _no_stamp
        self._events: list[TraceEvent] = []
        self._seq = itertools.count()
        self._hooks: list[TraceHook] = []
        self._lock = threading.Lock()

    def bind(self, stamp: Callable[[], Stamp]) -> None:
        """Take stamps from `stamp` (the runtime calls this once)."""
        self._stamp = stamp

    def emit(self, kind: str, **fields: Any) -> None:
        """Record one event of `kind` with `fields`, stamped now (kernel `trace_<event>`)."""
        if not self.enabled:
            return
        time_ns, cpu, tid, task = self._stamp()
        with self._lock:
            seq = next(self._seq)
            event = TraceEvent(seq, time_ns, cpu, tid, task, kind, tuple(fields.items()))
            self._events.append(event)
        for hook in self._hooks:
            hook(event)

    def add_hook(self, hook: TraceHook) -> None:
        """Call `hook(event)` for every event recorded from now on."""
        self._hooks.append(hook)

    def remove_hook(self, hook: TraceHook) -> None:
        """Stop calling `hook`."""
        self._hooks.remove(hook)

    def events(self, kind: str | Iterable[str] | None = None) -> list[TraceEvent]:
        """The events recorded so far, oldest first, optionally only of `kind`(s)."""
        with self._lock:
            events = list(self._events)
        if kind is None:
            return events
        kinds = {kind} if isinstance(kind, str) else set(kind)
        return [e for e in events if e.kind in kinds]

    def clear(self) -> None:
        """Forget every event recorded so far."""
        with self._lock:
            self._events.clear()

    def format_timeline(self, kind: str | Iterable[str] | None = None) -> str:
        """The events as a text timeline, one line per event (what `vmemu trace` prints)."""
        header = f"{'time':>14} cpu  tid {'task':<12} {'event':<10} fields"
        lines = [header] + [e.format() for e in self.events(kind)]
        return "\n".join(lines) + "\n"

    def __len__(self) -> int:
        return len(self._events)
