"""vmemu's execution model: tasks, wait queues, three runtimes, a virtual clock, tracing.

Every emulated memory access, syscall and ioctl is made by a task, and a
task blocks only through this package (DESIGN.md decision 5):

* `WaitQueue` - kernel-style wait queues (exclusive or not, keyed wakes,
  `wake_up_nr`, statistics) and `Mutex`, a sleeping lock built on one;
* three runtimes behind one `Runtime` API - `ThreadRuntime` (real threads),
  `InlineRuntime` (handlers run by the waiting task) and `SimRuntime`
  (deterministic multi-CPU simulation with a virtual clock);
* `CostModel` / `VirtualClock` - what operations cost in emulated time;
* `Tracer` - the tracepoint log and its timeline;
* `ReadinessFd` - a real fd that is readable exactly while something is.

Independent of the rest of vmemu: stdlib, attrs and nothing else (bar
`vmemu.cbuild`, which builds the optional C helper of `vmemu.sched.park`
and imports nothing of vmemu).

How the layers above use it:

* Every operation runs on `runtime.current()`; the mm and uffd layers never
  create threads or block on `threading` objects themselves.  Under the
  simulation and inline runtimes a host lock held across a blocking point
  would hang the host: hold no `threading` lock while waiting (drop the mm
  lock as `handle_userfault` drops `mmap_lock`), and use `runtime.make_lock()`
  (a real lock only with real threads) or `Mutex` for shared state.
* Charge what the kernel would spend: `charge("syscall")` at each syscall
  or ioctl entry, `charge("fault")` per page fault, `charge("page_alloc")`
  per frame, `charge("copy_byte", n)` per byte copied (UFFDIO_COPY, COW),
  `charge("tlb_flush")` / `charge("tlb_shootdown_per_cpu", ncpus - 1)` per
  flush, `charge("spin")` per polling-loop iteration, `charge_ns(ns, what)`
  for backend latency.  Call `cond_resched()` only where no structure is
  half-updated (syscall entry/exit).
* A faulting task waits on the uffd's fault queue:
  `fault_wqh.wait_event(lambda: resolved, key=address, reason=...)`; a
  resolving ioctl calls `fault_wqh.wake_up_all(key=<range>)`.  An inline
  handler is `fault_wqh.set_resolver(handler)`.  The file's readiness is a
  `ReadinessFd` kept in step with the message queue (`set_ready`), plus a
  `WaitQueue` that `read()`/`poll()` sleep on.
* Tracepoints: `runtime.tracer.emit("fault", addr=..., ...)`; the stamp
  (virtual time, CPU, task) is added for you.
"""

from vmemu.sched.clock import COST_NAMES, CostModel, MonotonicClock, VirtualClock
from vmemu.sched.inline import InlineRuntime
from vmemu.sched.pollfd import ReadinessFd
from vmemu.sched.runtime import (
    BlockedTask,
    ChargeStatistics,
    Deadlock,
    ReentrantFault,
    Runtime,
    TaskHandle,
    TaskKilled,
    TaskState,
)
from vmemu.sched.sim import CpuStatistics, SimRuntime
from vmemu.sched.threads import ThreadRuntime
from vmemu.sched.trace import TraceEvent, Tracer
from vmemu.sched.waitqueue import (
    Mutex,
    WaitQueue,
    WaitQueueEntry,
    WaitQueueStatistics,
    default_key_match,
)

__all__ = [
    "COST_NAMES",
    "BlockedTask",
    "ChargeStatistics",
    "CostModel",
    "CpuStatistics",
    "Deadlock",
    "InlineRuntime",
    "MonotonicClock",
    "Mutex",
    "ReadinessFd",
    "ReentrantFault",
    "Runtime",
    "SimRuntime",
    "TaskHandle",
    "TaskKilled",
    "TaskState",
    "ThreadRuntime",
    "TraceEvent",
    "Tracer",
    "VirtualClock",
    "WaitQueue",
    "WaitQueueEntry",
    "WaitQueueStatistics",
    "default_key_match",
]
