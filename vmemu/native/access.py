"""User-mode memory accesses on the real kernel that survive SIGBUS and SIGSEGV.

A fault handler test must make *user-mode* accesses in *this* process: a
page registered with a uffd blocks the accessing thread until resolved, or
(UFFD_FEATURE_SIGBUS, a poisoned page, PROT_NONE) ends in a signal. CPython
cannot survive a synchronous SIGBUS/SIGSEGV, and a kernel access such as
``process_vm_readv`` has other semantics (EFAULT, "kernel" faults). So the
access loop lives in a small C library, ``_access.c``, compiled on first use
by :mod:`vmemu.cbuild` and loaded with ctypes. It runs the loop under
``sigsetjmp`` and reports the signal. ctypes releases the GIL during the
call, so an access that blocks on a userfault blocks only its thread.

The same library forks children that run a fixed list of accesses
(:func:`fork_child`) without returning to Python (see the C file for why the
fork is a raw clone).

If no compiler is available, :func:`load` raises :class:`HelperUnavailable`;
tests skip with that reason.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import attrs

from vmemu import cbuild
from vmemu.cbuild import HelperUnavailable  # noqa: F401 - raised by load(), caught by callers
from vmemu.constants import SIGBUS
from vmemu.errors import Sigbus, Signal, Sigsegv

_SOURCE = Path(__file__).with_name("_access.c")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None

CHILD_PEEK = 0
CHILD_TOUCH_READ = 1
CHILD_TOUCH_WRITE = 2
CHILD_WAIT = 3


class _ChildOp(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("value", ctypes.c_int32),
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
    ]


class _Stop(ctypes.Structure):
    _fields_ = [
        ("done", ctypes.c_uint64),
        ("signo", ctypes.c_int32),
        ("code", ctypes.c_int32),
        ("addr", ctypes.c_uint64),
    ]


class _ChildRec(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("kind", ctypes.c_uint32), ("datalen", ctypes.c_uint64)]


def load() -> ctypes.CDLL:
    """Build (once, cached by source hash) and load the helper library."""
    global _lib
    with _lock:
        if _lib is None:
            lib = cbuild.load(_SOURCE)
            lib.vmemu_access.restype = ctypes.c_int
            lib.vmemu_access.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_size_t),
                ctypes.POINTER(ctypes.c_int),
                ctypes.POINTER(ctypes.c_int),
                ctypes.POINTER(ctypes.c_void_p),
            ]
            lib.vmemu_copy.restype = ctypes.c_int
            lib.vmemu_copy.argtypes = [
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.POINTER(_Stop),
            ]
            lib.vmemu_fork.restype = ctypes.c_long
            lib.vmemu_fork.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_int),
            ]
            _lib = lib
        return _lib


@attrs.frozen
class AccessResult:
    """Outcome of a user-mode access: bytes ``done`` and, if it ended in a
    signal, ``signo``/``si_code``/``si_addr`` (``force_sig_fault``); ``data`` for reads."""

    done: int
    data: bytes | None = None
    signo: int = 0
    si_code: int = 0
    si_addr: int = 0

    @property
    def ok(self) -> bool:
        """True when every byte was accessed."""
        return self.signo == 0


def user_access(
    addr: int, length: int, write: bytes | None = None, want_data: bool = False
) -> AccessResult:
    """Access ``[addr, addr+length)`` from user mode, one byte at a time upward.

    ``write``: bytes to store (its length must be ``length``); else read, and
    return the bytes read when ``want_data``. A userfault blocks the calling
    thread; a signal stops the access and is reported, not delivered.
    """
    lib = load()
    done = ctypes.c_size_t()
    signo = ctypes.c_int()
    code = ctypes.c_int()
    si_addr = ctypes.c_void_p()
    if write is not None:
        if len(write) != length:
            raise ValueError("write buffer length differs from length")
        buf = ctypes.create_string_buffer(bytes(write), length)
        ret = lib.vmemu_access(addr, length, 1, buf, done, signo, code, si_addr)
        data = None
    else:
        rbuf = ctypes.create_string_buffer(length) if want_data else None
        ret = lib.vmemu_access(addr, length, 0, rbuf, done, signo, code, si_addr)
        data = rbuf.raw[: done.value] if rbuf is not None else None
    if ret == 0:
        return AccessResult(done.value, data)
    return AccessResult(done.value, data, signo.value, code.value, si_addr.value or 0)


def _signal(stop: _Stop) -> Signal:
    cls = Sigbus if stop.signo == SIGBUS else Sigsegv
    return cls(stop.code, stop.addr, stop.done)


def user_read(addr: int, n: int) -> bytes:
    """Read ``n`` bytes of this process's memory as a user-mode access.

    A userfault blocks the calling thread (the GIL is released meanwhile);
    a SIGSEGV or SIGBUS raises :class:`~vmemu.errors.Sigsegv` /
    :class:`~vmemu.errors.Sigbus` with ``done`` the bytes read before the
    faulting page, as :meth:`vmemu.Task.read` does, instead of killing the
    interpreter.
    """
    buf = ctypes.create_string_buffer(n)
    stop = _Stop()
    if load().vmemu_copy(addr, buf, n, 0, stop):
        raise _signal(stop)
    return buf.raw


def user_write(addr: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` at ``addr`` as a user-mode access (signals as :func:`user_read`)."""
    b = bytes(data)
    stop = _Stop()
    if load().vmemu_copy(addr, b, len(b), 1, stop):
        raise _signal(stop)


@attrs.frozen
class ChildOp:
    """One access of a forked child's program: CHILD_PEEK/TOUCH_READ/TOUCH_WRITE/WAIT."""

    kind: int
    addr: int = 0
    len: int = 0
    value: int = 0


def fork_child(ops: list[ChildOp], result_fd: int, release_fd: int) -> int:
    """Fork; the child runs ``ops`` and exits 0 (or dies from a signal).

    After each completed op the child writes a record (index, kind, datalen)
    and, for a peek, the bytes to ``result_fd``; a WAIT op blocks on a read of
    ``release_fd``. Every other descriptor is closed in the child. Returns the
    child's pid. The call blocks while the kernel waits for a
    UFFD_EVENT_FORK to be read; it releases the GIL meanwhile.
    """
    lib = load()
    arr = (_ChildOp * max(1, len(ops)))()
    for i, op in enumerate(ops):
        arr[i] = _ChildOp(op.kind, op.value & 0xFF, op.addr, op.len)
    err = ctypes.c_int()
    pid = lib.vmemu_fork(arr, len(ops), result_fd, release_fd, ctypes.byref(err))
    if pid < 0:
        raise OSError(err.value, os.strerror(err.value))
    return int(pid)


def parse_child_records(buf: bytes) -> tuple[list[tuple[int, int, bytes]], int]:
    """Split a child's result stream into ``(index, kind, data)`` records.

    Returns the complete records and how many bytes they used (the rest is an
    incomplete record still being written).
    """
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    hsize = ctypes.sizeof(_ChildRec)
    while len(buf) - pos >= hsize:
        rec = _ChildRec.from_buffer_copy(buf[pos : pos + hsize])
        if len(buf) - pos - hsize < rec.datalen:
            break
        start = pos + hsize
        out.append((rec.index, rec.kind, bytes(buf[start : start + rec.datalen])))
        pos = start + rec.datalen
    return out, pos
