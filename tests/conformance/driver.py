"""The interface a conformance runner drives: one address space, its uffds, its tasks.

``runner.py`` interprets a scenario (FORMAT.md) and calls only the methods
below, so the same scenario replays on the real kernel (``NativeDriver`` in
``native_driver.py``) and on vmemu (an ``EmuDriver`` written against this
class). A driver does no bookkeeping of names, regions or results: the
runner owns all of that. A driver's job is to perform each call with the
semantics of the Linux syscall it is named after.

Conventions for every method:

* Addresses and lengths are plain ints (bytes); flags are the Linux x86-64
  values (``vmemu.native.linux`` / ``vmemu.constants``, ``vmemu.uffd.uapi``).
* A failing call raises ``OSError`` whose ``errno`` is the kernel's. No other
  exception type may escape for a call the kernel would fail.
* Any call may *block* the task that makes it (an access on a userfault, an
  munmap waiting for its UNMAP event to be read, a COPY whose source is a
  registered missing page, a fork waiting for its FORK event to be read).
  The runner therefore makes every such call from a worker started with
  :meth:`Driver.start_worker` and uses :meth:`Driver.settle` to learn whether
  it finished or is asleep.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from vmemu.uffd.uapi import UffdioStruct


@attrs.frozen
class AccessResult:
    """Outcome of a user-mode access.

    ``done``: bytes completed, in increasing address order, before the access
    stopped. ``data``: the bytes read (reads that asked for data only).
    ``signo``/``si_code``/``si_addr``: the synchronous signal that stopped the
    access (``force_sig_fault``), all 0 when the access completed.
    """

    done: int
    data: bytes | None = None
    signo: int = 0
    si_code: int = 0
    si_addr: int = 0


CHILD_PEEK = "peek"
CHILD_TOUCH = "touch"
CHILD_WAIT = "wait"


@attrs.frozen
class ChildOp:
    """One step of a forked child's program (FORMAT.md ``fork.child``).

    ``kind`` is ``"peek"`` (read ``len`` bytes at ``addr`` and report them),
    ``"touch"`` (read, or with ``write`` store ``value`` into, ``len`` bytes)
    or ``"wait"`` (block until :meth:`Child.release`). Addresses are resolved.
    """

    kind: str
    addr: int = 0
    len: int = 1
    write: bool = False
    value: int = 0


class Worker(abc.ABC):
    """A task of the driven process running one runner operation.

    ``name`` is the scenario's thread name; ``tid`` is the task id the kernel
    reports as ``ptid`` in a pagefault message (THREAD_ID) for faults taken
    by this worker.
    """

    name: str
    tid: int

    @property
    @abc.abstractmethod
    def finished(self) -> bool:
        """True once the operation returned (or raised)."""

    @abc.abstractmethod
    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the operation to finish; return :attr:`finished`."""

    @abc.abstractmethod
    def outcome(self) -> Any:
        """The operation's return value. Re-raises whatever it raised, so no
        runner bug is lost. Only valid once :attr:`finished`."""


class Child(abc.ABC):
    """A process forked by :meth:`Driver.fork`, running a list of :class:`ChildOp`."""

    pid: int

    @abc.abstractmethod
    def release(self) -> None:
        """Let a child blocked in a ``wait`` op continue."""

    @abc.abstractmethod
    def wait(self, timeout_s: float) -> str:
        """Wait up to ``timeout_s`` for the child to exit. Returns ``"exited:N"``,
        ``"killed:SIGNAME"`` (e.g. ``"killed:SIGBUS"``) or ``"blocked"``."""

    @abc.abstractmethod
    def results(self) -> list[AccessResult]:
        """Results of the ops the child has completed so far, in order (a
        ``wait`` op yields ``AccessResult(0)``; an op that killed the child yields
        nothing)."""

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL the child (if alive) and reap it."""


class Driver(abc.ABC):
    """One driven process: its address space, uffds, worker tasks and children."""

    # -- environment --------------------------------------------------------

    @abc.abstractmethod
    def skip_reason(self, requires: Sequence[str]) -> str | None:
        """Why a scenario with these ``requires`` cannot run here (e.g. an empty
        hugetlb pool, no userfaultfd permission), or None if it can."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the driver's own resources after a scenario's cleanup."""

    # -- address space --------------------------------------------------------

    @abc.abstractmethod
    def find_free_area(self, length: int) -> int:
        """An address where ``length`` bytes are currently unmapped (the runner
        places its regions inside, 2 MiB aligned and apart)."""

    @abc.abstractmethod
    def mmap(
        self, addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0
    ) -> int:
        """``mmap(2)``; returns the mapped address. The runner always passes an
        address with MAP_FIXED or MAP_FIXED_NOREPLACE."""

    @abc.abstractmethod
    def munmap(self, addr: int, length: int) -> None:
        """``munmap(2)``. Raises UFFD_EVENT_UNMAP where enabled (and then blocks
        until every such event is read)."""

    @abc.abstractmethod
    def mremap(
        self, old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int = 0
    ) -> int:
        """``mremap(2)``; returns the new address. May raise REMAP/UNMAP events."""

    @abc.abstractmethod
    def madvise(self, addr: int, length: int, advice: int) -> None:
        """``madvise(2)`` with a MADV_* value. DONTNEED/FREE/REMOVE may raise REMOVE."""

    @abc.abstractmethod
    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """``mprotect(2)``."""

    @abc.abstractmethod
    def memfd_create(self, name: str, hugetlb: bool) -> int:
        """``memfd_create(2)`` (MFD_CLOEXEC, plus MFD_HUGETLB); returns the fd."""

    @abc.abstractmethod
    def ftruncate(self, fd: int, length: int) -> None:
        """``ftruncate(2)``: set a memfd's size."""

    @abc.abstractmethod
    def memfd_write(self, fd: int, offset: int, data: bytes) -> None:
        """Put ``data`` into the page cache of memfd ``fd`` at ``offset``, not
        through any registered mapping (pwrite, or a temporary mapping for
        hugetlbfs)."""

    @abc.abstractmethod
    def close_fd(self, fd: int) -> None:
        """``close(2)`` of a non-uffd descriptor (memfds)."""

    # -- accesses -------------------------------------------------------------

    @abc.abstractmethod
    def user_access(
        self, addr: int, length: int, write: bytes | None, want_data: bool
    ) -> AccessResult:
        """A user-mode access of ``[addr, addr+length)``, one byte at a time in
        increasing address order: stores ``write`` (``length`` bytes) or reads.
        A userfault blocks the calling worker; a signal (SIGBUS, SIGSEGV) ends
        the access and is returned, never delivered to the runner."""

    @abc.abstractmethod
    def kernel_write(self, addr: int, data: bytes) -> int:
        """The kernel writes user memory: ``read(2)`` from a pipe holding ``data``
        into ``addr``. Returns the byte count; raises OSError (EFAULT...)."""

    @abc.abstractmethod
    def kernel_read(self, addr: int, length: int) -> bytes:
        """The kernel reads user memory: ``write(2)`` of ``[addr, addr+length)``
        to a pipe. Returns the bytes the pipe received; raises OSError."""

    @abc.abstractmethod
    def pagemap(self, addr: int, npages: int) -> list[int]:
        """The ``/proc/self/pagemap`` entries (u64) of ``npages`` 4 KiB pages from
        ``addr``: bit 63 present, bit 57 uffd-wp."""

    # -- userfaultfd ----------------------------------------------------------

    @abc.abstractmethod
    def uffd_open(self, flags: int, via: str) -> Any:
        """Create a uffd with ``userfaultfd(flags)`` (``via="syscall"``) or
        ``/dev/userfaultfd`` + USERFAULTFD_IOC_NEW (``via="dev"``); returns an
        opaque handle."""

    @abc.abstractmethod
    def uffd_adopt(self, fd: int) -> Any:
        """A handle for the uffd fd delivered in a FORK message's ``ufd``."""

    @abc.abstractmethod
    def uffd_ioctl(self, uffd: Any, cmd: int, arg: UffdioStruct) -> None:
        """``ioctl(uffd, cmd, &arg)``: every field the kernel writes back (output
        fields, or the zeroed uffdio_api) is written into ``arg``, also when the
        ioctl fails; fields the kernel does not write keep their value (the
        runner detects "untouched" that way). Raises OSError on failure."""

    @abc.abstractmethod
    def uffd_read(self, uffd: Any, nbytes: int) -> bytes:
        """``read(2)`` of up to ``nbytes``: whole 32-byte ``uffd_msg``s. Blocks on
        a blocking uffd with nothing pending; raises OSError (EAGAIN, EINVAL)."""

    @abc.abstractmethod
    def uffd_poll(self, uffd: Any, events: int, timeout_ms: int) -> int:
        """``poll(2)`` on the uffd alone; returns ``revents``."""

    @abc.abstractmethod
    def uffd_close(self, uffd: Any) -> None:
        """``close(2)`` of the uffd (``userfaultfd_release`` if last reference)."""

    # -- tasks ----------------------------------------------------------------

    @abc.abstractmethod
    def main_tid(self) -> int:
        """The tid of the runner's own task (``ptid`` shows it as ``"main"``)."""

    @abc.abstractmethod
    def start_worker(self, name: str, fn: Callable[[], Any]) -> Worker:
        """Run ``fn`` (which calls this driver) on a new task of the driven
        process. Returns once the worker's ``tid`` is known."""

    @abc.abstractmethod
    def settle(self, workers: Sequence[Worker], timeout_s: float = 10.0) -> None:
        """Wait until every worker has *settled*: it finished, or it is asleep
        inside its operation (blocked on a userfault, an event, a read) and no
        longer making progress. Wake-ups caused by earlier calls must have
        played out. Raises TimeoutError if a worker keeps running."""

    @abc.abstractmethod
    def fork(self, ops: Sequence[ChildOp]) -> Child:
        """``fork(2)`` the driven process; the child runs ``ops`` and exits 0. The
        call blocks (it is made from a worker) while a FORK event is unread."""
