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

Independent of the rest of vmemu: stdlib, attrs and nothing else.
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
