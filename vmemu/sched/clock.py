"""Virtual time: the clock every runtime reads, and the cost model that advances it.

vmemu has one clock (STYLE habit 6).  `VirtualClock` counts integer
nanoseconds that only move when something charges them; `MonotonicClock` is
the subclass the real-threads runtime uses, and the only place in vmemu where
wall-clock time is read.  Integer nanoseconds keep simulated timings exact, so
a seed gives the same figures on any machine.

`CostModel` says what an operation costs in emulated time.  The layers above
never hard-code a latency: they call `runtime.charge("fault")`,
`runtime.charge("copy_byte", n=4096)`, ... and the runtime looks the figure up
here.  Replace figures with `attrs.evolve(CostModel(), wakeup=3_000)` or a
subclass to model another machine.
"""

from __future__ import annotations

import time
from typing import Final

import attrs

NSEC_PER_SEC: Final = 1_000_000_000


class VirtualClock:
    """A clock that moves only when told to: emulated time in integer nanoseconds.

    Mirrors the role of the kernel's per-CPU `rq->clock`: every CPU of the
    simulation owns one, and a task's notion of "now" is its CPU's clock.
    """

    __slots__ = ("_ns",)

    def __init__(self, start_ns: int = 0) -> None:
        self._ns = int(start_ns)

    def now_ns(self) -> int:
        """Current time in nanoseconds."""
        return self._ns

    def now(self) -> float:
        """Current time in seconds."""
        return self.now_ns() / NSEC_PER_SEC

    def advance(self, ns: int) -> int:
        """Move forward by `ns` nanoseconds (never backwards); return the new time."""
        if ns < 0:
            raise ValueError(f"a clock cannot run backwards (advance by {ns} ns)")
        self._ns += int(ns)
        return self._ns

    def advance_to(self, ns: int) -> int:
        """Move forward to at least `ns`; a time already passed is left as is."""
        if ns > self._ns:
            self._ns = int(ns)
        return self._ns

    def __repr__(self) -> str:
        return f"{type(self).__name__}(start_ns={self.now_ns()})"


class MonotonicClock(VirtualClock):
    """Wall time as a `VirtualClock`: `time.monotonic_ns()` since construction.

    The one place vmemu reads the host's clock (used by the real-threads
    runtime).  `advance` is accepted and ignored beyond bookkeeping: real time
    passes by itself.
    """

    __slots__ = ("_origin",)

    def __init__(self) -> None:
        super().__init__(0)
        self._origin = time.monotonic_ns()

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._origin

    def advance(self, ns: int) -> int:
        if ns < 0:
            raise ValueError(f"a clock cannot run backwards (advance by {ns} ns)")
        return self.now_ns()

    def advance_to(self, ns: int) -> int:
        return self.now_ns()


#: The names `Runtime.charge` accepts, in the order the cost model lists them.
COST_NAMES: Final = (
    "syscall",
    "fault",
    "context_switch",
    "wakeup",
    "spin",
    "copy_byte",
    "page_alloc",
    "tlb_flush",
    "tlb_shootdown_per_cpu",
)


@attrs.frozen
class CostModel:
    """What each emulated operation costs, in nanoseconds of virtual CPU time.

    The defaults describe a recent x86-64 server running Linux with the usual
    Spectre/Meltdown mitigations.  They are order-of-magnitude figures for
    comparing policies (wake-all versus wake-one, polling versus sleeping,
    MOVE versus COPY), not predictions for a particular machine; the source of
    each is given next to it.
    """

    # Entry plus exit of a cheap system call (getpid, close(-1)): 70-250 ns on
    # 2015-2020 Intel hosts with mitigations; median ~100 ns.
    # Source: G. Sauthoff, "On the Costs of Syscalls", https://gms.tf/on-the-costs-of-syscalls.html
    syscall: int = 100
    # Exception entry and exit of a page fault, excluding the work of resolving
    # it (allocation, zeroing, copying are charged separately): a minor
    # anonymous fault measures ~0.6 us minimum / ~1 us median with allocation.
    # Source: "Page fault latency measurement", rdtsc around a first touch on
    # Linux 6.6, https://ddumbying.vercel.app/experiments/pagefault-latency
    fault: int = 500
    # A voluntary thread-to-thread context switch (same address space):
    # ~1.1 us per switch from a pthread pipe ping-pong on Linux 6.6 (2.1 us
    # round trip); B. Sigoure's futex ping-pong gives the same order.
    # Sources: https://ddumbying.vercel.app/experiments/ctx-switch-overhead and
    # https://blog.tsunanet.net/2010/11/how-long-does-it-take-to-make-context.html
    context_switch: int = 1_100
    # try_to_wake_up() of one sleeping task, charged to the waker, per task
    # woken: the waker's share of the same ping-pong, a fraction of a switch
    # (an estimate: ~1/4 of the measured per-switch cost).
    # Source: derived from context_switch's sources.
    wakeup: int = 300
    # One iteration of a busy-wait loop (one PAUSE plus a load): PAUSE takes
    # ~140 cycles on Skylake-SP and later, ~40 ns at 3.5 GHz.
    # Source: Intel 64 and IA-32 Architectures Optimization Reference Manual,
    # "Pause Latency in Skylake Microarchitecture".
    spin: int = 40
    # Copying one byte between pages (copy_from_user / memcpy), about 10 GB/s
    # for a single core streaming 4 KiB pages: 0.1 ns per byte.
    # Source: STREAM "Copy" single-thread figures for DDR4 servers,
    # https://www.cs.virginia.edu/stream/
    copy_byte: float = 0.1
    # Allocating one 4 KiB page from the per-CPU free lists and zeroing it
    # (clear_page at ~10 GB/s is ~0.4 us alone).
    # Source: as copy_byte for clear_page; allocator fast path from the same
    # first-touch fault measurement as `fault`.
    page_alloc: int = 500
    # Flushing one translation on the local CPU (INVLPG plus refill cost).
    # Source: N. Amit et al., "Optimizing the TLB Shootdown Algorithm with
    # Page-Table Access Tracking", USENIX ATC 2020 (local flush ~100s of ns).
    tlb_flush: int = 200
    # Each remote CPU that receives a TLB shootdown IPI: several microseconds
    # end to end, ~2 us added per target CPU.
    # Source: N. Amit et al., USENIX ATC 2020 (as tlb_flush).
    tlb_shootdown_per_cpu: int = 2_000
    # The slice a task runs before a waiting task on its CPU may preempt it:
    # EEVDF's base slice, sysctl_sched_base_slice = 750000ULL (0.75 ms).
    # Source: kernel/sched/fair.c, Linux 6.6 and later.
    timeslice: int = 750_000

    def of(self, name: str, n: int | float = 1) -> int:
        """The cost of `n` units of the operation `name`, in whole nanoseconds."""
        if name not in COST_NAMES:
            raise ValueError(f"unknown cost {name!r}; expected one of {', '.join(COST_NAMES)}")
        if n < 0:
            raise ValueError(f"cannot charge a negative count ({n}) of {name!r}")
        per: int | float = getattr(self, name)
        return round(per * n)
