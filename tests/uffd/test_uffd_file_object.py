"""File-object behaviours of the checklist that had no test: fdinfo, USER_MODE_ONLY, POLLHUP.

Each scenario takes a process (``vmemu.Process`` or ``vmemu.native.NativeProcess``)
and returns plain values; the vmemu test asserts them, the differential test
asserts the same values on Linux through ``vmemu.native``.

* fdinfo (``userfaultfd_show_fdinfo``): ``pending`` counts faults not yet read,
  ``total`` those plus the read ones still waiting for a wake; the API line is
  ``UFFD_API:features:ioctls`` with the features the handshake enabled plus
  UFFD_FEATURE_INITIALIZED (bit 31), 0 before it.
* UFFD_USER_MODE_ONLY: a kernel-mode access of a registered missing page, the
  kernel writing into it for ``read(2)`` or reading it for ``process_vm_readv(2)``,
  fails EFAULT at once and queues no message (``handle_userfault`` refuses a
  fault without FAULT_FLAG_USER).
* Release wakes pollers with POLLHUP (``wake_up_poll(&ctx->fd_wqh, EPOLLHUP)``). On
  Linux a poller holds a reference to the file, so release waits for it; vmemu's
  ``fileno()`` is a readiness fd of its own, and a handler blocked in poll/select
  on it must not sleep on after the uffd is gone: it sees POLLHUP (vmemu only).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import threading
from typing import Any

import pytest
from uffd_harness import native_process_or_skip

import vmemu
from vmemu.constants import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from vmemu.uffd import uapi

RW = PROT_READ | PROT_WRITE
MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
SYS_process_vm_readv = 310  # x86-64


def fdinfo_scenario(p: Any) -> list[str]:
    """fdinfo before the handshake, after it, with a fault pending, read, and woken."""
    out = []
    u = p.userfaultfd(uapi.O_NONBLOCK | uapi.O_CLOEXEC)
    out.append(u.fdinfo())
    u.api(uapi.UFFD_FEATURE_THREAD_ID | uapi.UFFD_FEATURE_EVENT_REMOVE)
    out.append(u.fdinfo())
    a = p.mmap(0, 2 * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    src = p.mmap(0, PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    u.register(a, 2 * PAGE_SIZE, MISSING)
    h = p.spawn(lambda t: t.read_u64(a), name="toucher")
    assert u.poll(select.POLLIN, 5000) & select.POLLIN
    out.append(u.fdinfo())  # pending 1, total 1
    msgs = u.read_msgs(uapi.UFFD_MSG_SIZE)
    assert len(msgs) == 1
    out.append(u.fdinfo())  # read: pending 0, still waiting: total 1
    u.copy(a, src, PAGE_SIZE, uapi.UFFDIO_COPY_MODE_DONTWAKE)
    out.append(u.fdinfo())  # resolved but not woken: still waiting
    u.wake(a, PAGE_SIZE)
    assert h.join(5) == 0
    out.append(u.fdinfo())
    u.close()
    p.munmap(a, 2 * PAGE_SIZE)
    p.munmap(src, PAGE_SIZE)
    return out


def _api_line(features: int) -> str:
    return f"API:\t{uapi.UFFD_API:x}:{features:x}:{_ioctls():x}"


def _ioctls() -> int:
    return uapi.UFFD_API_IOCTLS | uapi.UFFD_API_RANGE_IOCTLS


def fdinfo_expected() -> list[str]:
    feats = uapi.UFFD_FEATURE_THREAD_ID | uapi.UFFD_FEATURE_EVENT_REMOVE | (1 << 31)

    def info(pending: int, total: int, features: int) -> str:
        return f"pending:\t{pending}\ntotal:\t{total}\n{_api_line(features)}\n"

    return [info(0, 0, 0), info(0, 0, feats), info(1, 1, feats), info(0, 1, feats),
            info(0, 1, feats), info(0, 0, feats)]


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _native_kernel_accesses(a: int) -> list[int]:
    """read(2) from a pipe into ``a`` and process_vm_readv of ``a``: their errnos."""
    from vmemu.native import libc

    out = []
    r, w = os.pipe()
    try:
        os.write(w, b"12345678")
        try:
            libc.read_into(r, a, 8)
            out.append(0)
        except OSError as e:
            out.append(e.errno or 0)
    finally:
        os.close(r)
        os.close(w)
    buf = ctypes.create_string_buffer(8)
    local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), 8)
    remote = _Iovec(a, 8)
    try:
        libc.syscall(SYS_process_vm_readv, os.getpid(), ctypes.addressof(local), 1,
                     ctypes.addressof(remote), 1, 0)
        out.append(0)
    except OSError as e:
        out.append(e.errno or 0)
    return out


def _vmemu_kernel_accesses(p: vmemu.Process, a: int) -> list[int]:
    out = []
    for call in (lambda: p.kernel_write(a, b"12345678"), lambda: p.process_vm_readv(p, a, 8)):
        try:
            call()
            out.append(0)
        except OSError as e:
            out.append(e.errno or 0)
    return out


def user_mode_only_scenario(p: Any) -> list[Any]:
    u = p.userfaultfd(uapi.UFFD_USER_MODE_ONLY | uapi.O_NONBLOCK | uapi.O_CLOEXEC)
    u.api(0)
    a = p.mmap(0, PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    u.register(a, PAGE_SIZE, MISSING)
    native = not isinstance(p, vmemu.Process)
    errs = _native_kernel_accesses(a) if native else _vmemu_kernel_accesses(p, a)
    try:
        u.read_msgs(uapi.UFFD_MSG_SIZE)
        queued: Any = "message"
    except OSError as e:
        queued = errno.errorcode[e.errno or 0]
    u.close()
    p.munmap(a, PAGE_SIZE)
    return [*errs, queued]


SCENARIOS = {
    "fdinfo": (fdinfo_scenario, fdinfo_expected),
    "user_mode_only": (user_mode_only_scenario, lambda: [errno.EFAULT, errno.EFAULT, "EAGAIN"]),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_on_vmemu(name: str) -> None:
    fn, want = SCENARIOS[name]
    p = vmemu.Process()
    assert fn(p) == want()
    p.check()


@pytest.mark.differential
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_on_the_kernel(name: str) -> None:
    p = native_process_or_skip()
    fn, want = SCENARIOS[name]
    assert fn(p) == want()


def test_release_wakes_a_poller_with_pollhup() -> None:
    p = vmemu.Process()
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(0)
    fd = u.fileno()
    got: list[Any] = []
    polling = threading.Event()

    def poller() -> None:
        po = select.poll()
        po.register(fd, select.POLLIN)
        polling.set()
        got.append(po.poll(5000))

    t = threading.Thread(target=poller, daemon=True)
    t.start()
    polling.wait(5)
    assert u.poll() == 0  # nothing queued: the poller sleeps
    u.close()
    t.join(5)
    assert got and got[0] and got[0][0][1] & select.POLLHUP
