"""The native binding against the real kernel: NativeUserfaultfd, libc, access helper.

Skips with a reason where userfaultfd(2) is not permitted or no C compiler
exists. Nothing here changes host settings.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from vmemu.native import access, libc, linux
from vmemu.native.userfaultfd import NativeUserfaultfd
from vmemu.uffd import uapi

P = linux.PAGE_SIZE


def _uffd_reason() -> str | None:
    if os.uname().sysname != "Linux" or os.uname().machine != "x86_64":
        return "needs Linux x86-64"
    try:
        NativeUserfaultfd.open().close()
    except OSError as e:
        return f"userfaultfd(2) not permitted: {os.strerror(e.errno or 0)}"
    return None


def _helper_reason() -> str | None:
    try:
        access.load()
    except access.HelperUnavailable as e:
        return str(e)
    return None


needs_uffd = pytest.mark.skipif(_uffd_reason() is not None, reason=str(_uffd_reason()))
needs_helper = pytest.mark.skipif(_helper_reason() is not None, reason=str(_helper_reason()))


@pytest.fixture
def anon() -> Iterator[Callable[[int], int]]:
    """Make private anonymous mappings of n pages; unmapped after the test."""
    maps: list[tuple[int, int]] = []

    def make(pages: int) -> int:
        a = libc.mmap(
            0,
            pages * P,
            linux.PROT_READ | linux.PROT_WRITE,
            linux.MAP_PRIVATE | linux.MAP_ANONYMOUS,
        )
        maps.append((a, pages * P))
        return a

    yield make
    for a, n in maps:
        libc.munmap(a, n)


def test_libc_errors_carry_errno() -> None:
    with pytest.raises(OSError) as e:
        libc.munmap(1, P)  # unaligned
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        libc.madvise(0, P, 12345)
    assert e.value.errno == errno.EINVAL


def test_libc_mmap_mremap_roundtrip() -> None:
    a = libc.mmap(0, 2 * P, linux.PROT_READ | linux.PROT_WRITE,
                  linux.MAP_PRIVATE | linux.MAP_ANONYMOUS)
    try:
        libc.poke_memory(a, b"hello")
        assert libc.peek_memory(a, 5) == b"hello"
        libc.mprotect(a + P, P, linux.PROT_READ)
        with pytest.raises(OSError) as e:  # two VMAs now: mremap refuses the span
            libc.mremap(a, 2 * P, 4 * P, linux.MREMAP_MAYMOVE)
        assert e.value.errno == errno.EFAULT
        b = libc.mremap(a, P, 4 * P, linux.MREMAP_MAYMOVE)
    except BaseException:
        libc.munmap(a, 2 * P)
        raise
    # The first page has moved: its old place is no longer ours to unmap.
    libc.munmap(a + P, P)
    assert libc.peek_memory(b, 5) == b"hello"
    libc.munmap(b, 4 * P)


def test_memfd_and_kernel_copies() -> None:
    fd = libc.memfd_create("t", linux.MFD_CLOEXEC)
    try:
        libc.ftruncate(fd, P)
        os.pwrite(fd, b"abc", 0)
        a = libc.mmap(0, P, linux.PROT_READ | linux.PROT_WRITE, linux.MAP_SHARED, fd)
        assert libc.peek_memory(a, 3) == b"abc"
        r, w = os.pipe()
        os.write(w, b"XYZ")
        assert libc.read_into(r, a, 3) == 3
        assert libc.write_from(w, a, 3) == 3
        assert os.read(r, 3) == b"XYZ"
        os.close(r)
        os.close(w)
        libc.fallocate(fd, linux.FALLOC_FL_PUNCH_HOLE | linux.FALLOC_FL_KEEP_SIZE, 0, P)
        assert libc.peek_memory(a, 3) == b"\0\0\0"
        libc.munmap(a, P)
    finally:
        os.close(fd)


@needs_uffd
def test_open_flags_and_api() -> None:
    with pytest.raises(OSError) as e:
        NativeUserfaultfd.open(flags=2)
    assert e.value.errno == errno.EINVAL
    with NativeUserfaultfd.open() as u:
        assert u.poll() == select.POLLERR  # before UFFDIO_API
        with pytest.raises(OSError) as e:
            u.read()
        assert e.value.errno == errno.EINVAL
        a = u.api(uapi.UFFD_FEATURE_THREAD_ID)
        assert a.ioctls == uapi.UFFD_API_IOCTLS
        assert a.features & uapi.UFFD_FEATURE_THREAD_ID
        with pytest.raises(OSError) as e:
            u.api(0)
        assert e.value.errno == errno.EINVAL
        assert e.value.struct == uapi.uffdio_api(0, 0, 0)  # type: ignore[attr-defined]
        assert u.poll() == 0
    assert u.closed


@needs_uffd
def test_dev_userfaultfd() -> None:
    if not os.access("/dev/userfaultfd", os.R_OK | os.W_OK):
        pytest.skip("/dev/userfaultfd not accessible")
    with NativeUserfaultfd.open(via="dev") as u:
        assert u.api().api == uapi.UFFD_API


@needs_uffd
@needs_helper
def test_fault_read_copy_and_partial_errors(anon: Callable[[int], int]) -> None:
    a, s = anon(4), anon(4)
    assert access.user_access(s, 4 * P, write=b"A" * 4 * P).ok
    with NativeUserfaultfd.open() as u:
        u.api(uapi.UFFD_FEATURE_THREAD_ID)
        ioctls = u.register(a, 4 * P, uapi.UFFDIO_REGISTER_MODE_MISSING)
        assert ioctls == 0x13C
        got: dict[str, access.AccessResult] = {}
        t = threading.Thread(target=lambda: got.update(r=access.user_access(a + 5, 1, None, True)))
        t.start()
        deadline = time.monotonic() + 5
        while not u.poll() & select.POLLIN:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        (msg,) = u.read()
        assert msg == uapi.PagefaultMsg(0, a, t.native_id or -1)
        assert u.copy(a, s, P) == P
        t.join(5)
        assert got["r"].data == b"A"
        # EEXIST on the first page: the field is -EEXIST.
        with pytest.raises(OSError) as e:
            u.copy(a, s, P)
        assert e.value.errno == errno.EEXIST
        assert e.value.struct.copy == -errno.EEXIST  # type: ignore[attr-defined]
    # After close the range is unregistered: a read maps the zero page.
    assert access.user_access(a + P, 1, None, True).data == b"\0"


@needs_uffd
def test_partial_copy_reports_bytes_done(anon: Callable[[int], int]) -> None:
    a, s = anon(4), anon(4)
    with NativeUserfaultfd.open() as u:
        u.api()
        u.register(a, 4 * P, uapi.UFFDIO_REGISTER_MODE_MISSING)
        assert u.zeropage(a + 2 * P, P) == P
        with pytest.raises(OSError) as e:
            u.copy(a, s, 4 * P)
        assert e.value.errno == errno.EAGAIN
        assert e.value.struct.copy == 2 * P  # type: ignore[attr-defined]
        with pytest.raises(OSError) as e:
            u.copy(a + 1, s, P)  # validation error: field untouched
        assert e.value.errno == errno.EINVAL
        assert e.value.struct.copy == 0  # type: ignore[attr-defined]


@needs_uffd
@needs_helper
def test_sigbus_feature_is_reported_not_delivered(anon: Callable[[int], int]) -> None:
    a = anon(2)
    with NativeUserfaultfd.open() as u:
        u.api(uapi.UFFD_FEATURE_SIGBUS)
        u.register(a, 2 * P, uapi.UFFDIO_REGISTER_MODE_MISSING)
        r = access.user_access(a + 77, 3, None, True)
        assert (r.signo, r.si_code, r.si_addr, r.done) == (
            linux.SIGBUS,
            linux.BUS_ADRERR,
            a + 77,
            0,
        )
        with pytest.raises(OSError) as e:
            u.read()
        assert e.value.errno == errno.EAGAIN


@needs_helper
def test_segv_is_reported(anon: Callable[[int], int]) -> None:
    a = anon(2)
    access.user_access(a, 2 * P, write=b"\1" * 2 * P)
    libc.mprotect(a + P, P, linux.PROT_NONE)
    r = access.user_access(a + P - 2, 4, write=b"\2" * 4)
    assert (r.signo, r.si_code, r.si_addr, r.done) == (
        linux.SIGSEGV,
        linux.SEGV_ACCERR,
        a + P,
        2,
    )
    assert libc.peek_memory(a + P - 2, 2) == b"\2\2"


@needs_helper
def test_fork_child_runs_ops_and_reports(anon: Callable[[int], int]) -> None:
    a = anon(1)
    access.user_access(a, 4, write=b"wxyz")
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    rel_r, rel_w = os.pipe2(os.O_CLOEXEC)
    ops = [
        access.ChildOp(access.CHILD_PEEK, a, 4),
        access.ChildOp(access.CHILD_WAIT),
        access.ChildOp(access.CHILD_TOUCH_WRITE, a, 1, 0x41),
        access.ChildOp(access.CHILD_PEEK, a, 2),
    ]
    pid = access.fork_child(ops, res_w, rel_r)
    os.close(res_w)
    os.close(rel_r)
    os.write(rel_w, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    buf = b""
    while chunk := os.read(res_r, 4096):
        buf += chunk
    recs, used = access.parse_child_records(buf)
    assert used == len(buf)
    assert [(i, d) for i, _k, d in recs] == [(0, b"wxyz"), (1, b""), (2, b""), (3, b"Ax")]
    assert libc.peek_memory(a, 1) == b"w"  # the child's write was private (COW)
    os.close(res_r)
    os.close(rel_w)
