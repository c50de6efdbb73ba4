"""The conformance driver for the real kernel, through :mod:`vmemu.native`.

Workers are Python threads. Every blocking call they make goes through
ctypes or ``fcntl.ioctl``/``os.read``, which release the GIL, so a worker
asleep in the kernel never stops the runner.

How "settled" is detected. A worker is settled when it has finished, or
when its task is asleep inside its operation. The runner's process is
inspected through ``/proc/self/task/<tid>/``:

* ``stat`` state must be ``S`` or ``D`` (asleep);
* ``syscall`` must not be futex (202): a Python thread waiting for the GIL,
  e.g. right after the kernel woke it, sleeps in futex, and that is not a
  block inside the operation (a thread blocked on a userfault shows ``-1``,
  one blocked in read/ioctl/munmap/clone shows that syscall);
* the two context-switch counters in ``status`` must stay unchanged over
  several samples (``_STABLE_SAMPLES`` x ``_SAMPLE_S``), so a task that was
  woken and went back to sleep in between is seen as having moved.

The kernel's wake-up sets the woken task running before the waking syscall
returns, so after any step a woken worker is seen running (or already back
asleep with new switch counts) by the first sample.

User-mode accesses that may end in SIGBUS/SIGSEGV, and forked children,
use the C helper of :mod:`vmemu.native.access`.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from driver import AccessResult, Child, ChildOp, Driver, Worker

from vmemu.native import access, libc, linux
from vmemu.native.userfaultfd import NativeUserfaultfd
from vmemu.uffd import uapi

_FUTEX = "202"
_SAMPLE_S = 0.002
_STABLE_SAMPLES = 3
F_SETPIPE_SZ = 1031
#: Where scenarios are placed (see ``find_free_area``).
_LOW_ZONE = 8 << 40


def _task_sample(tid: int) -> tuple[str, str, int, int] | None:
    """(state, syscall, voluntary, nonvoluntary switches) of a task, None if gone."""
    base = f"/proc/self/task/{tid}/"
    try:
        with open(base + "stat") as f:
            stat = f.read()
        with open(base + "syscall") as f:
            sc = (f.read().split(maxsplit=1) or [""])[0]
        with open(base + "status") as f:
            status = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state = stat[stat.rindex(")") + 2]
    vol = nonvol = 0
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            vol = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            nonvol = int(line.split()[1])
    return state, sc, vol, nonvol


def _asleep(sample: tuple[str, str, int, int] | None) -> bool:
    return sample is not None and sample[0] in "SD" and sample[1] != _FUTEX


class NativeWorker(Worker):
    """A Python thread running one operation."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        self.name = name
        self.tid = 0
        self._fn = fn
        self._result: Any = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        started = threading.Event()

        def run() -> None:
            self.tid = threading.get_native_id()
            started.set()
            try:
                self._result = self._fn()
            except BaseException as e:  # re-raised by outcome(): nothing is lost
                self._error = e
            finally:
                self._done.set()

        self.thread = threading.Thread(target=run, name=f"vmemu-{name}", daemon=True)
        self.thread.start()
        started.wait()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(timeout_s)

    def outcome(self) -> Any:
        if not self.finished:
            raise RuntimeError(f"worker {self.name} has not finished")
        if self._error is not None:
            raise self._error
        return self._result


class NativeChild(Child):
    """A child forked by the C helper; results arrive over a pipe."""

    def __init__(self, ops: Sequence[ChildOp]) -> None:
        self._ops = list(ops)
        self._res_r, res_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        rel_r, self._rel_w = os.pipe2(os.O_CLOEXEC)
        kinds = {
            "peek": access.CHILD_PEEK,
            "wait": access.CHILD_WAIT,
        }
        cops = []
        for op in self._ops:
            if op.kind == "touch":
                kind = access.CHILD_TOUCH_WRITE if op.write else access.CHILD_TOUCH_READ
            else:
                kind = kinds[op.kind]
            cops.append(access.ChildOp(kind, op.addr, op.len, op.value))
        try:
            self.pid = access.fork_child(cops, res_w, rel_r)
        finally:
            os.close(res_w)
            os.close(rel_r)
        self._buf = b""
        self._records: list[tuple[int, int, bytes]] = []
        self._status: int | None = None

    def _collect(self) -> None:
        while True:
            try:
                chunk = os.read(self._res_r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buf += chunk
        recs, used = access.parse_child_records(self._buf)
        self._records += recs
        self._buf = self._buf[used:]

    def release(self) -> None:
        os.write(self._rel_w, b"x")

    def _reap(self, block: bool) -> bool:
        if self._status is not None:
            return True
        pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self._status = status
        return True

    def wait(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while not self._reap(False):
            if time.monotonic() >= deadline:
                self._collect()
                return "blocked"
            time.sleep(0.002)
        self._collect()
        assert self._status is not None
        if os.WIFSIGNALED(self._status):
            return f"killed:{signal.Signals(os.WTERMSIG(self._status)).name}"
        return f"exited:{os.WEXITSTATUS(self._status)}"

    def results(self) -> list[AccessResult]:
        self._collect()
        return [
            AccessResult(len(data), data if kind == access.CHILD_PEEK else None)
            for _index, kind, data in self._records
        ]

    def kill(self) -> None:
        if self._status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already exited; reaped below
            self._reap(True)
        for fd in (self._res_r, self._rel_w):
            try:
                os.close(fd)
            except OSError:
                pass  # closed by an earlier kill()
        self._res_r = self._rel_w = -1


def hugetlb_free_pages() -> int:
    """HugePages_Free of the default (2 MiB) pool."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


def userfaultfd_unavailable() -> str | None:
    """Why userfaultfd(2) cannot be used here, or None."""
    if not os.uname().sysname == "Linux" or os.uname().machine != "x86_64":
        return "the native driver needs Linux x86-64"
    try:
        NativeUserfaultfd.open().close()
    except OSError as e:
        return f"userfaultfd(2) not permitted: {os.strerror(e.errno or 0)}"
    try:
        access.load()
    except access.HelperUnavailable as e:
        return str(e)
    return None


class NativeDriver(Driver):
    """Drives this very process on the real kernel."""

    #: hugetlb scenarios need this many free 2 MiB pages.
    HUGETLB_PAGES_NEEDED = 4

    def __init__(self) -> None:
        self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)

    def skip_reason(self, requires: Sequence[str]) -> str | None:
        reason = userfaultfd_unavailable()
        if reason:
            return reason
        if "hugetlb" in requires and hugetlb_free_pages() < self.HUGETLB_PAGES_NEEDED:
            return (
                f"needs {self.HUGETLB_PAGES_NEEDED} free 2 MiB huge pages "
                f"(HugePages_Free={hugetlb_free_pages()}; tests never change nr_hugepages)"
            )
        return None

    def close(self) -> None:
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1

    # -- address space --------------------------------------------------------

    def find_free_area(self, length: int) -> int:
        """A free area in the low zone (8 TiB and up), not where ``mmap(NULL)`` would put it.

        The runner maps its regions there with MAP_FIXED after this returns; an area
        the kernel's top-down search picks is where the interpreter's own allocator
        maps next, and a MAP_FIXED over it would destroy Python's memory. Nothing of
        the interpreter's is ever placed this far below the stack.
        """
        flags = (linux.MAP_PRIVATE | linux.MAP_ANONYMOUS | linux.MAP_NORESERVE
                 | linux.MAP_FIXED_NOREPLACE)
        step = max(length, 1 << 30)
        for hint in range(_LOW_ZONE, _LOW_ZONE + 64 * step, step):
            try:
                addr = libc.mmap(hint, length, linux.PROT_NONE, flags)
            except OSError:  # EEXIST: a leftover of an earlier scenario; try the next
                continue
            libc.munmap(addr, length)
            return addr
        raise OSError("no free area for a scenario in the low zone")

    def mmap(
        self, addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0
    ) -> int:
        return libc.mmap(addr, length, prot, flags, fd, offset)

    def munmap(self, addr: int, length: int) -> None:
        libc.munmap(addr, length)

    def mremap(
        self, old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int = 0
    ) -> int:
        return libc.mremap(old_addr, old_len, new_len, flags, new_addr)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        libc.madvise(addr, length, advice)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        libc.mprotect(addr, length, prot)

    def memfd_create(self, name: str, hugetlb: bool) -> int:
        flags = linux.MFD_CLOEXEC | (linux.MFD_HUGETLB if hugetlb else 0)
        return libc.memfd_create(name, flags)

    def ftruncate(self, fd: int, length: int) -> None:
        libc.ftruncate(fd, length)

    def memfd_write(self, fd: int, offset: int, data: bytes) -> None:
        try:
            n = os.pwrite(fd, data, offset)
            if n == len(data):
                return
        except OSError:
            pass  # hugetlbfs has no write(2): go through a temporary mapping
        size = len(data)
        addr = libc.mmap(0, size, linux.PROT_READ | linux.PROT_WRITE, linux.MAP_SHARED, fd, offset)
        try:
            libc.poke_memory(addr, data)
        finally:
            libc.munmap(addr, size)

    def close_fd(self, fd: int) -> None:
        os.close(fd)

    # -- accesses -------------------------------------------------------------

    def user_access(
        self, addr: int, length: int, write: bytes | None, want_data: bool
    ) -> AccessResult:
        r = access.user_access(addr, length, write, want_data)
        return AccessResult(r.done, r.data, r.signo, r.si_code, r.si_addr)

    @staticmethod
    def _pipe(length: int) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        if length > 65536:
            fcntl.fcntl(w, F_SETPIPE_SZ, length)
        return r, w

    def kernel_write(self, addr: int, data: bytes) -> int:
        r, w = self._pipe(len(data))
        try:
            os.write(w, data)
            return libc.read_into(r, addr, len(data))
        finally:
            os.close(r)
            os.close(w)

    def kernel_read(self, addr: int, length: int) -> bytes:
        r, w = self._pipe(length)
        try:
            n = libc.write_from(w, addr, length)
            return os.read(r, n) if n else b""
        finally:
            os.close(r)
            os.close(w)

    def pagemap(self, addr: int, npages: int) -> list[int]:
        raw = os.pread(self._pagemap, 8 * npages, (addr // linux.PAGE_SIZE) * 8)
        return [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]

    # -- userfaultfd ----------------------------------------------------------

    def uffd_open(self, flags: int, via: str) -> NativeUserfaultfd:
        if via not in ("syscall", "dev"):
            raise ValueError(f"unknown via {via!r}")
        return NativeUserfaultfd.open(flags, via)  # type: ignore[arg-type]

    def uffd_adopt(self, fd: int) -> NativeUserfaultfd:
        return NativeUserfaultfd(fd)

    def uffd_ioctl(self, uffd: Any, cmd: int, arg: uapi.UffdioStruct) -> None:
        uffd.ioctl(cmd, arg)

    def uffd_read(self, uffd: Any, nbytes: int) -> bytes:
        data: bytes = uffd.read_raw(nbytes)
        return data

    def uffd_poll(self, uffd: Any, events: int, timeout_ms: int) -> int:
        revents: int = uffd.poll(events, timeout_ms)
        return revents

    def uffd_close(self, uffd: Any) -> None:
        uffd.close()

    # -- tasks ----------------------------------------------------------------

    def main_tid(self) -> int:
        return threading.get_native_id()

    def start_worker(self, name: str, fn: Callable[[], Any]) -> Worker:
        return NativeWorker(name, fn)

    def settle(self, workers: Sequence[Worker], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = [w for w in workers if not w.finished]
        history: dict[int, list[tuple[str, str, int, int] | None]] = {}
        while pending:
            still = []
            for w in pending:
                if w.finished:
                    continue
                s = _task_sample(w.tid)
                h = history.setdefault(w.tid, [])
                if not _asleep(s) or (h and h[-1] != s):
                    h.clear()
                if _asleep(s):
                    h.append(s)
                if len(h) < _STABLE_SAMPLES:
                    still.append(w)
            pending = still
            if not pending:
                break
            if time.monotonic() > deadline:
                names = ", ".join(w.name for w in pending)
                raise TimeoutError(f"workers never settled: {names}")
            time.sleep(_SAMPLE_S)

    def fork(self, ops: Sequence[ChildOp]) -> Child:
        return NativeChild(ops)
