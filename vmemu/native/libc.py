"""Raw Linux memory syscalls through ctypes.

Every call goes through ``syscall(2)`` of the C library, loaded with
``use_errno=True``; a failure raises ``OSError(errno, os.strerror(errno))``
from :func:`_check`, the one place errors are turned into exceptions. ctypes
releases the GIL for the duration of each call, so a syscall that blocks in
the kernel (an munmap waiting for its UNMAP event to be read, a read(2) into
a userfault-registered page) blocks only its own thread.

:func:`peek_memory` and :func:`poke_memory` touch memory by address with
``ctypes.string_at`` / ``ctypes.memmove``: a bad address kills the process
with SIGSEGV or SIGBUS. Accesses that may fault on purpose go through
:mod:`vmemu.native.access` instead, which survives the signal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from vmemu.native import linux

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# variadic: no argtypes; every argument is passed as an explicit c_long/c_ulong


def _check(ret: int) -> int:
    """Return ``ret``, or raise the OSError for errno if the call returned -1."""
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def syscall(nr: int, *args: int) -> int:
    """``syscall(nr, args...)``: raw system call; returns its result or raises OSError."""
    return _check(_syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)))


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """``mmap(2)``: map ``length`` bytes; returns the address (``do_mmap`` in mm/mmap.c)."""
    ret = _syscall(
        ctypes.c_long(linux.SYS_mmap),
        ctypes.c_ulong(addr),
        ctypes.c_ulong(length),
        ctypes.c_long(prot),
        ctypes.c_long(flags),
        ctypes.c_long(fd),
        ctypes.c_long(offset),
    )
    # The raw syscall returns -errno in [-4095, -1], which glibc's syscall()
    # turns into -1 (MAP_FAILED) and errno.
    _check(ret)
    return ctypes.c_ulong(ret).value


def munmap(addr: int, length: int) -> None:
    """``munmap(2)``: unmap ``[addr, addr+length)`` (``do_vmi_munmap``)."""
    syscall(linux.SYS_munmap, addr, length)


def mprotect(addr: int, length: int, prot: int) -> None:
    """``mprotect(2)``: change the protection of ``[addr, addr+length)``."""
    syscall(linux.SYS_mprotect, addr, length, prot)


def madvise(addr: int, length: int, advice: int) -> None:
    """``madvise(2)``: give ``advice`` (MADV_*) for ``[addr, addr+length)``."""
    syscall(linux.SYS_madvise, addr, length, advice)


def mremap(old_addr: int, old_len: int, new_len: int, flags: int = 0, new_addr: int = 0) -> int:
    """``mremap(2)``: resize and/or move a mapping; returns the new address."""
    ret = _syscall(
        ctypes.c_long(linux.SYS_mremap),
        ctypes.c_ulong(old_addr),
        ctypes.c_ulong(old_len),
        ctypes.c_ulong(new_len),
        ctypes.c_long(flags),
        ctypes.c_ulong(new_addr),
    )
    _check(ret)
    return ctypes.c_ulong(ret).value


def memfd_create(name: str, flags: int = 0) -> int:
    """``memfd_create(2)``: a new anonymous shmem (or hugetlbfs) file; returns the fd."""
    return os.memfd_create(name, flags)


def ftruncate(fd: int, length: int) -> None:
    """``ftruncate(2)``: set the file size (``i_size``)."""
    os.ftruncate(fd, length)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``: allocate, or with FALLOC_FL_PUNCH_HOLE free, file blocks."""
    syscall(linux.SYS_fallocate, fd, mode, offset, length)


def read_into(fd: int, addr: int, length: int) -> int:
    """``read(fd, addr, length)``: the *kernel* writes user memory at ``addr``.

    Returns the byte count. A fault the kernel cannot resolve is EFAULT.
    """
    return syscall(linux.SYS_read, fd, addr, length)


def write_from(fd: int, addr: int, length: int) -> int:
    """``write(fd, addr, length)``: the *kernel* reads user memory at ``addr``."""
    return syscall(linux.SYS_write, fd, addr, length)


def peek_memory(addr: int, length: int) -> bytes:
    """Read ``length`` bytes at ``addr`` in this process (no fault protection)."""
    return ctypes.string_at(addr, length)


def poke_memory(addr: int, data: bytes) -> None:
    """Write ``data`` at ``addr`` in this process (no fault protection)."""
    ctypes.memmove(addr, data, len(data))
