"""The real process, through the same calls as :class:`vmemu.Process`.

A handler written against vmemu's ``Process`` / ``Task`` / ``Userfaultfd``
surface runs unchanged here: ``mmap`` is the real mmap, ``read``/``write``
touch real memory (a registered missing page really blocks the calling
thread in the kernel until a handler resolves it; ctypes releases the GIL
meanwhile, so a Python handler thread can run), and ``userfaultfd()``
returns a :class:`~vmemu.native.userfaultfd.NativeUserfaultfd` with the same
method names. Only the introspection of the emulator (``walk``, ``check``,
tables) has no native counterpart: the kernel does not expose it.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

from vmemu.constants import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from vmemu.native import access, libc
from vmemu.native.userfaultfd import NativeUserfaultfd

_U64 = struct.Struct("<Q")


def raw_read(addr: int, n: int) -> bytes:
    """Read with a bare ``ctypes.memmove``: a SIGSEGV or SIGBUS ends the interpreter."""
    buf = ctypes.create_string_buffer(n)
    ctypes.memmove(buf, addr, n)
    return buf.raw


def raw_write(addr: int, data: bytes | bytearray | memoryview) -> None:
    """Write with a bare ``ctypes.memmove`` (signals as :func:`raw_read`)."""
    b = bytes(data)
    ctypes.memmove(addr, b, len(b))


_Read = Callable[[int, int], bytes]
_Write = Callable[[int, "bytes | bytearray | memoryview"], None]
_chosen: tuple[_Read, _Write] | None = None


def _accessors() -> tuple[_Read, _Write]:
    """The user-mode read and write of :class:`NativeTask`.

    Those of :mod:`vmemu.native.access`, which turn a SIGSEGV or SIGBUS into
    an exception. Without a C compiler to build its helper, a bare
    ``ctypes.memmove``: then a signal (a poisoned page, UFFD_FEATURE_SIGBUS,
    an area unmapped under a thread still blocked in a userfault) ends the
    interpreter, so tests that expect one use ``access.user_access``, which
    skips without the helper.
    """
    global _chosen
    if _chosen is None:
        try:
            access.load()
            _chosen = (access.user_read, access.user_write)
        except access.HelperUnavailable:
            _chosen = (raw_read, raw_write)
    return _chosen


class NativeTask:
    """A named thread of the real process, making real accesses."""

    def __init__(self, process: NativeProcess, name: str) -> None:
        self.process = process
        self.name = name
        self.tid = 0  # the real tid of the thread that last used this task

    def read(self, addr: int, n: int) -> bytes:
        """Read ``n`` bytes of real memory (blocks in the kernel on a userfault).

        SIGSEGV / SIGBUS raise :class:`~vmemu.errors.Sigsegv` /
        :class:`~vmemu.errors.Sigbus`, as on vmemu (see :func:`_accessors`).
        """
        self.tid = threading.get_native_id()
        return _accessors()[0](addr, n)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write real memory (blocks in the kernel on a userfault; signals as :meth:`read`)."""
        self.tid = threading.get_native_id()
        _accessors()[1](addr, data)

    def read_u64(self, addr: int) -> int:
        """Read a little-endian u64."""
        return int(_U64.unpack(self.read(addr, 8))[0])

    def write_u64(self, addr: int, value: int) -> None:
        """Write a little-endian u64."""
        self.write(addr, _U64.pack(value))


class NativeHandle:
    """A spawned thread, joinable like a vmemu runtime task (result or re-raised error)."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        self.name = name
        self._result: Any = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to join()
            self._error = e

    def join(self, timeout: float | None = None) -> Any:
        """Wait for the thread; its result, or its exception re-raised."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"task {self.name} still running")
        if self._error is not None:
            raise self._error
        return self._result


class NativeProcess:
    """This process, with :class:`vmemu.Process`'s method names."""

    def __init__(self) -> None:
        self.main = NativeTask(self, "main")
        self.tasks: dict[str, NativeTask] = {"main": self.main}
        self._maps: list[tuple[int, int]] = []

    def thread(self, name: str) -> NativeTask:
        """The task called ``name``."""
        t = self.tasks.get(name)
        if t is None:
            t = self.tasks[name] = NativeTask(self, name)
        return t

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str) -> NativeHandle:
        """Run ``fn(task, *args)`` on a new real thread."""
        return NativeHandle(fn, (self.thread(name), *args), name)

    # -- syscalls -----------------------------------------------------------------

    def mmap(self, addr: int = 0, length: int = PAGE_SIZE, prot: int = PROT_READ | PROT_WRITE,
             flags: int = MAP_PRIVATE | MAP_ANONYMOUS, fd: int = -1, offset: int = 0) -> int:
        """mmap(2)."""
        a = libc.mmap(addr, length, prot, flags, fd, offset)
        self._maps.append((a, length))
        return a

    def munmap(self, addr: int, length: int) -> None:
        """munmap(2)."""
        libc.munmap(addr, length)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """mprotect(2)."""
        libc.mprotect(addr, length, prot)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise(2)."""
        libc.madvise(addr, length, advice)

    def mremap(self, old_addr: int, old_len: int, new_len: int, flags: int = 0,
               new_addr: int = 0) -> int:
        """mremap(2)."""
        return libc.mremap(old_addr, old_len, new_len, flags, new_addr)

    def memfd_create(self, name: str, flags: int = 0) -> int:
        """memfd_create(2)."""
        return libc.memfd_create(name, flags)

    def ftruncate(self, fd: int, length: int) -> None:
        """ftruncate(2)."""
        libc.ftruncate(fd, length)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2)."""
        libc.fallocate(fd, mode, offset, length)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        """pwrite(2)."""
        return os.pwrite(fd, data, offset)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        """pread(2)."""
        return os.pread(fd, n, offset)

    def close(self, fd: int) -> None:
        """close(2)."""
        os.close(fd)

    def userfaultfd(self, flags: int = 0) -> NativeUserfaultfd:
        """userfaultfd(2) (syscall 323)."""
        return NativeUserfaultfd.open(flags, via="syscall")

    def open_dev_userfaultfd(self) -> _NativeDev:
        """open("/dev/userfaultfd")."""
        return _NativeDev()

    def fork(self, name: str | None = None) -> NativeProcess:
        """Not offered: forking a threaded Python process is unsafe (see vmemu.native.access)."""
        raise NotImplementedError("fork of the real process: use vmemu.native.access.fork_child")

    # -- accesses through the main task ---------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        """Read as the main task."""
        return self.main.read(addr, n)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write as the main task."""
        self.main.write(addr, data)

    def read_u64(self, addr: int) -> int:
        """Read a u64 as the main task."""
        return self.main.read_u64(addr)

    def write_u64(self, addr: int, value: int) -> None:
        """Write a u64 as the main task."""
        self.main.write_u64(addr, value)

    def pagemap(self, addr: int) -> int:
        """The /proc/self/pagemap entry of the page at ``addr``."""
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((addr // PAGE_SIZE) * 8)
            return int(_U64.unpack(f.read(8))[0])

    def maps(self) -> str:
        """/proc/self/maps."""
        with open("/proc/self/maps") as f:
            return f.read()


class _NativeDev:
    """An open /dev/userfaultfd."""

    def new(self, flags: int = 0) -> NativeUserfaultfd:
        """USERFAULTFD_IOC_NEW."""
        return NativeUserfaultfd.open(flags, via="dev")

    def close(self) -> None:
        """Nothing to release: each ``new`` opens and closes the device itself."""


