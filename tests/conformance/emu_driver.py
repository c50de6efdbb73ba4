"""The conformance driver for vmemu: the same scenarios, replayed on the emulator.

One :class:`vmemu.Kernel` and one :class:`vmemu.Process` per scenario. The
runner's workers are tasks of the kernel's runtime (``ThreadRuntime``: real
Python threads), each making its calls as the emulated task
``process.thread(name)``, so a THREAD_ID ``ptid`` is that task's tid and the
runner maps it back to the thread name, as it maps real tids on the kernel.

How "settled" is detected, without sampling or sleeps: every place a task
can sleep in vmemu goes through a :class:`~vmemu.sched.WaitQueue`, which
parks the runtime task in ``TaskState.BLOCKED`` and sets ``task.woken`` when
a wake-up reaches it. A worker is settled when its task is done, or is
``BLOCKED`` with no wake-up pending. A woken task stays unsettled until it
has run and either finished or gone back to sleep, so the wake-ups a step
caused have played out before the next step. A blocked task can only be
woken by another task, so once every task of the scenario is settled,
nothing changes any more: :meth:`EmuWorker.wait` and :meth:`EmuChild.wait`
then answer at once instead of running out a timeout.

Forked children run their op list on a runtime task making its accesses as
the child's main task (tid == pid, as in a single-threaded child); a signal
ends the child as ``killed:SIG...``. hugetlb scenarios reserve huge pages in
the *emulated* pool (``HugetlbPool.set_nr_hugepages``); no host setting is
touched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from driver import AccessResult, Child, ChildOp, Driver, Worker

import vmemu
from vmemu.errors import Signal
from vmemu.mmu import proc
from vmemu.mmu.gup import access_user
from vmemu.sched.runtime import TaskHandle, TaskState
from vmemu.sched.waitqueue import WaitQueue
from vmemu.uffd import uapi

#: Where the runner places its regions: plenty of room below TASK_SIZE (128 TiB).
ARENA_BASE = 1 << 40
MFD_HUGETLB = 0x0004
MFD_CLOEXEC = 0x0001
_POLL_ALWAYS = 0x008 | 0x010 | 0x020  # POLLERR | POLLHUP | POLLNVAL: reported unasked
_SPIN_S = 0.0002


def _settled(h: TaskHandle) -> bool:
    """Done, or asleep in the emulator with no wake-up pending."""
    return h.state is TaskState.DONE or (h.state is TaskState.BLOCKED and not h.woken)


class EmuWorker(Worker):
    """A runtime task running one runner operation as an emulated task."""

    def __init__(self, driver: EmuDriver, name: str, task: vmemu.Task,
                 fn: Callable[[], Any]) -> None:
        self.name = name
        self.tid = task.tid
        self._driver = driver

        def body() -> Any:
            driver._tls.task = task
            return fn()

        self.handle = driver.kernel.runtime.spawn(body, name=name)

    @property
    def finished(self) -> bool:
        return self.handle.done

    def wait(self, timeout_s: float) -> bool:
        return self._driver._wait_until(lambda: self.handle.done, timeout_s)

    def outcome(self) -> Any:
        if not self.finished:
            raise RuntimeError(f"worker {self.name} has not finished")
        self.handle.observed = True
        if self.handle.exception is not None:
            raise self.handle.exception
        return self.handle.result


class EmuChild(Child):
    """A forked emulated process running a list of :class:`ChildOp` on its main task."""

    def __init__(self, driver: EmuDriver, process: vmemu.Process, ops: Sequence[ChildOp]) -> None:
        self._driver = driver
        self.process = process
        self.pid = process.pid
        self._ops = list(ops)
        self._results: list[AccessResult] = []
        self._released = False
        self._killed = False
        self._status: str | None = None
        self._release_wq = WaitQueue(driver.kernel.runtime, f"child:{self.pid}")
        self.handle = driver.kernel.runtime.spawn(self._run, name=f"child-{self.pid}")

    def _run(self) -> None:
        task = self.process.main
        self._driver._tls.task = task
        status = "exited:0"
        try:
            for op in self._ops:
                if self._killed:
                    status = "killed:SIGKILL"
                    break
                if op.kind == "wait":
                    self._release_wq.wait_event(lambda: self._released or self._killed,
                                                reason="release_child")
                    self._results.append(AccessResult(0))
                    continue
                data = bytes([op.value & 0xFF]) * op.len if op.kind == "touch" and op.write \
                    else None
                r = _access(task, op.addr, op.len, data, op.kind == "peek")
                if r.signo:
                    status = f"killed:{_signame(r.signo)}"
                    break
                self._results.append(r)
        finally:
            self.process.exit()
            self._status = status

    def release(self) -> None:
        self._released = True
        self._release_wq.wake_up_all()

    def wait(self, timeout_s: float) -> str:
        self._driver._wait_until(lambda: self.handle.done, timeout_s)
        return self._status if self.handle.done and self._status else "blocked"

    def results(self) -> list[AccessResult]:
        return list(self._results)

    def kill(self) -> None:
        self._killed = True
        self._release_wq.wake_up_all()
        self._driver._wait_until(lambda: self.handle.done, 1.0)


def _signame(signo: int) -> str:
    return {vmemu.SIGBUS: "SIGBUS", vmemu.SIGSEGV: "SIGSEGV", vmemu.SIGKILL: "SIGKILL"}.get(
        signo, str(signo))


def _access(task: vmemu.Task, addr: int, length: int, write: bytes | None,
            want_data: bool) -> AccessResult:
    """A user-mode access by ``task``; a signal ends it and is returned."""
    try:
        if write is not None:
            task.write(addr, write)
            return AccessResult(length)
        data = task.read(addr, length)
    except Signal as sig:
        return AccessResult(sig.done, None, sig.si_signo, sig.si_code, sig.si_addr)
    return AccessResult(length, data if want_data else None)


class EmuDriver(Driver):
    """Drives one emulated process on a fresh emulated kernel."""

    #: hugetlb scenarios get this many 2 MiB pages in the emulated pool.
    HUGETLB_PAGES = 8

    def __init__(self) -> None:
        self.kernel = vmemu.Kernel()
        self.process = self.kernel.spawn("conformance")
        self._tls = threading.local()
        self._workers: list[EmuWorker] = []
        self._children: list[EmuChild] = []

    # -- environment --------------------------------------------------------

    def skip_reason(self, requires: Sequence[str]) -> str | None:
        if "hugetlb" in requires:
            try:
                from vmemu.mmu.hugetlb import hugetlb_pool
            except ImportError as e:
                return f"vmemu has no hugetlb pool yet ({e})"
            hugetlb_pool(self.kernel.phys).set_nr_hugepages(self.HUGETLB_PAGES)
        return None

    def close(self) -> None:
        for c in self._children:
            if not c.handle.done:
                c.kill()

    # -- tasks ----------------------------------------------------------------

    def _task(self) -> vmemu.Task:
        """The emulated task making the current call (the main task on the runner)."""
        task: vmemu.Task | None = getattr(self._tls, "task", None)
        return task if task is not None else self.process.main

    def _handles(self) -> list[TaskHandle]:
        return [w.handle for w in self._workers] + [c.handle for c in self._children]

    def _quiescent(self) -> bool:
        """Every task settled: nothing can change until the runner acts again."""
        return all(_settled(h) for h in self._handles())

    def _wait_until(self, cond: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if self._quiescent() or time.monotonic() >= deadline:
                return cond()
            time.sleep(_SPIN_S)
        return True

    def main_tid(self) -> int:
        return self.process.main.tid

    def start_worker(self, name: str, fn: Callable[[], Any]) -> Worker:
        w = EmuWorker(self, name, self.process.thread(name), fn)
        self._workers = [x for x in self._workers if not x.handle.done] + [w]
        return w

    def settle(self, workers: Sequence[Worker], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._quiescent():
            if time.monotonic() > deadline:
                names = [h.name for h in self._handles() if not _settled(h)]
                raise TimeoutError(f"workers never settled: {', '.join(names)}")
            time.sleep(_SPIN_S)

    def fork(self, ops: Sequence[ChildOp]) -> Child:
        child = self.process.fork()
        c = EmuChild(self, child, ops)
        self._children.append(c)
        return c

    # -- address space --------------------------------------------------------

    def find_free_area(self, length: int) -> int:
        return ARENA_BASE

    def mmap(
        self, addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0
    ) -> int:
        return self.process.mmap(addr, length, prot, flags, fd, offset)

    def munmap(self, addr: int, length: int) -> None:
        self.process.munmap(addr, length)

    def mremap(
        self, old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int = 0
    ) -> int:
        return self.process.mremap(old_addr, old_len, new_len, flags, new_addr)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self.process.madvise(addr, length, advice)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        self.process.mprotect(addr, length, prot)

    def memfd_create(self, name: str, hugetlb: bool) -> int:
        return self.process.memfd_create(name, MFD_CLOEXEC | (MFD_HUGETLB if hugetlb else 0))

    def ftruncate(self, fd: int, length: int) -> None:
        self.process.ftruncate(fd, length)

    def memfd_write(self, fd: int, offset: int, data: bytes) -> None:
        try:
            if self.process.pwrite(fd, data, offset) == len(data):
                return
        except OSError:
            pass  # hugetlbfs has no write(2): go through a temporary mapping
        size = len(data)
        addr = self.process.mmap(0, size, vmemu.PROT_READ | vmemu.PROT_WRITE, vmemu.MAP_SHARED,
                                 fd, offset)
        try:
            self.process.main.write(addr, data)
        finally:
            self.process.munmap(addr, size)

    def close_fd(self, fd: int) -> None:
        self.process.close(fd)

    # -- accesses -------------------------------------------------------------

    def user_access(
        self, addr: int, length: int, write: bytes | None, want_data: bool
    ) -> AccessResult:
        return _access(self._task(), addr, length, write, want_data)

    def kernel_write(self, addr: int, data: bytes) -> int:
        access_user(self.process.mm, addr, len(data), True, bytes(data), task=self._task())
        return len(data)

    def kernel_read(self, addr: int, length: int) -> bytes:
        return access_user(self.process.mm, addr, length, False, task=self._task())

    def pagemap(self, addr: int, npages: int) -> list[int]:
        return [proc.pagemap_entry(self.process.mm, addr + i * vmemu.PAGE_SIZE)
                for i in range(npages)]

    # -- userfaultfd ----------------------------------------------------------

    def uffd_open(self, flags: int, via: str) -> Any:
        if via == "syscall":
            return self.process.userfaultfd(flags)
        if via == "dev":
            return self.process.open_dev_userfaultfd().new(flags)
        raise ValueError(f"unknown via {via!r}")

    def uffd_adopt(self, fd: int) -> Any:
        return self.process.uffd_from_fd(fd)

    def uffd_ioctl(self, uffd: Any, cmd: int, arg: uapi.UffdioStruct) -> None:
        uffd.ioctl(cmd, arg)

    def uffd_read(self, uffd: Any, nbytes: int) -> bytes:
        data: bytes = uffd.read_raw(nbytes)
        return data

    def uffd_poll(self, uffd: Any, events: int, timeout_ms: int) -> int:
        mask = events | _POLL_ALWAYS
        revents = int(uffd.poll()) & mask
        if revents or timeout_ms == 0:
            return revents
        # nothing ready: sleep on the uffd's wait queue until something is, or the timeout
        uffd.fd_wq.wait_event(lambda: bool(int(uffd.poll()) & mask), reason="poll()",
                              timeout=None if timeout_ms < 0 else timeout_ms / 1000)
        return int(uffd.poll()) & mask

    def uffd_close(self, uffd: Any) -> None:
        uffd.close()
