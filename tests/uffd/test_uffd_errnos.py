"""Every errno path of the userfaultfd uABI, one test each (fs/ and mm/userfaultfd.c).

Each test names the kernel check it pins. Output-field rules are asserted
too: ``-errno`` after the operation ran, ``-EAGAIN`` while an event is
unread, untouched after a validation failure.
"""

from __future__ import annotations

import errno
import threading

import pytest

import vmemu
from vmemu.constants import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.uffd import uapi

RW = PROT_READ | PROT_WRITE
MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
WP = uapi.UFFDIO_REGISTER_MODE_WP
UNTOUCHED = 0x5A5A5A5A5A5A5A5A - (1 << 64)


def errno_of(fn, *args):  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def ready(features: int = 0, flags: int = uapi.O_NONBLOCK, pages: int = 4):  # type: ignore[no-untyped-def]
    p = vmemu.Process()
    u = p.userfaultfd(flags)
    u.api(features)
    a = p.mmap(0, pages * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    src = p.mmap(0, pages * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(src, b"s" * pages * PAGE_SIZE)
    return p, u, a, src


# -- creation ---------------------------------------------------------------------------


def test_userfaultfd_eperm_without_cap_sys_ptrace() -> None:
    p = vmemu.Process()
    p.capable_sys_ptrace = False
    assert errno_of(p.userfaultfd, 0) == errno.EPERM
    p.userfaultfd(uapi.UFFD_USER_MODE_ONLY).close()  # always allowed
    p.kernel.sysctl["vm.unprivileged_userfaultfd"] = 1
    p.userfaultfd(0).close()


def test_userfaultfd_einval_unknown_flags() -> None:
    assert errno_of(vmemu.Process().userfaultfd, 0x4) == errno.EINVAL


def test_dev_userfaultfd_unknown_ioctl() -> None:
    dev = vmemu.Process().open_dev_userfaultfd()
    assert errno_of(dev.ioctl, 0xAA01, 0) == errno.EINVAL
    assert errno_of(dev.new, 0x4) == errno.EINVAL


def test_dev_userfaultfd_needs_no_cap_sys_ptrace() -> None:
    """``/dev/userfaultfd`` is guarded by the node's permissions only: USERFAULTFD_IOC_NEW
    skips ``userfaultfd_syscall_allowed``, so kernel faults are handled without
    CAP_SYS_PTRACE or the sysctl; EVENT_FORK still needs the capability (EPERM)."""
    p = vmemu.Process()
    p.capable_sys_ptrace = False
    assert not p.kernel.sysctl.get("vm.unprivileged_userfaultfd")
    u = p.open_dev_userfaultfd().new(uapi.O_NONBLOCK)
    assert errno_of(u.api, uapi.UFFD_FEATURE_EVENT_FORK) == errno.EPERM
    u.api(0)


# -- UFFDIO_API ---------------------------------------------------------------------------


def test_api_event_fork_needs_cap_sys_ptrace() -> None:
    p = vmemu.Process()
    u = p.userfaultfd(uapi.UFFD_USER_MODE_ONLY)
    p.capable_sys_ptrace = False
    with pytest.raises(OSError) as e:
        u.api(uapi.UFFD_FEATURE_EVENT_FORK)
    assert e.value.errno == errno.EPERM
    assert (e.value.struct.api, e.value.struct.features) == (0, 0)
    u.api(0)  # the failed call left it uninitialised


def test_api_wp_async_implies_wp_unpopulated() -> None:
    u = vmemu.Process().userfaultfd(0)
    u.api(uapi.UFFD_FEATURE_WP_ASYNC)
    assert u.features & uapi.UFFD_FEATURE_WP_UNPOPULATED


def test_ioctls_before_api_and_unknown_cmd() -> None:
    p = vmemu.Process()
    u = p.userfaultfd(0)
    a = p.mmap(0, PAGE_SIZE)
    assert errno_of(u.register, a, PAGE_SIZE, MISSING) == errno.EINVAL
    assert errno_of(u.read) == errno.EINVAL
    u.api(0)
    assert errno_of(u.ioctl, 0xC018AA3E, uapi.uffdio_api()) == errno.EINVAL


def test_older_kernel_profile_rejects_newer_features() -> None:
    from vmemu.uffd.profile import KernelProfile

    k = vmemu.Kernel(uffd_profile=KernelProfile.linux(5, 10))
    u = k.spawn().userfaultfd(0)
    with pytest.raises(OSError) as e:
        u.api(uapi.UFFD_FEATURE_MOVE)
    assert e.value.errno == errno.EINVAL
    assert u.api(0).features == KernelProfile.linux(5, 10).features


# -- read ---------------------------------------------------------------------------------


def test_read_short_buffer_and_nonblocking_empty() -> None:
    _, u, _, _ = ready()
    assert errno_of(u.read, 31) == errno.EINVAL
    assert errno_of(u.read) == errno.EAGAIN


# -- REGISTER / UNREGISTER ----------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 8, MISSING | 16])
def test_register_bad_mode(mode: int) -> None:
    _, u, a, _ = ready()
    assert errno_of(u.register, a, PAGE_SIZE, mode) == errno.EINVAL


@pytest.mark.parametrize("start_off,length", [(1, PAGE_SIZE), (0, 0), (0, 100)])
def test_register_bad_range(start_off: int, length: int) -> None:
    _, u, a, _ = ready()
    assert errno_of(u.register, a + start_off, length, MISSING) == errno.EINVAL


def test_register_hole_only_is_einval_but_partial_hole_ok() -> None:
    p, u, a, _ = ready()
    assert errno_of(u.register, a - 16 * PAGE_SIZE, PAGE_SIZE, MISSING) == errno.EINVAL
    u.register(a - PAGE_SIZE, 2 * PAGE_SIZE, MISSING)
    p.check()


def test_register_minor_on_anon() -> None:
    _, u, a, _ = ready()
    assert errno_of(u.register, a, PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MINOR) == errno.EINVAL


def test_register_eperm_without_maywrite() -> None:
    from vmemu.mmu.memfd import F_ADD_SEALS, F_SEAL_FUTURE_WRITE, MFD_ALLOW_SEALING

    p = vmemu.Process()
    u = p.userfaultfd(0)
    u.api(0)
    fd = p.memfd_create("ro", MFD_ALLOW_SEALING)
    p.ftruncate(fd, PAGE_SIZE)
    p.fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
    a = p.mmap(0, PAGE_SIZE, PROT_READ, MAP_SHARED, fd, 0)
    assert errno_of(u.register, a, PAGE_SIZE, MISSING) == errno.EPERM


def test_register_ebusy_for_another_context() -> None:
    p, u, a, _ = ready()
    u.register(a, PAGE_SIZE, MISSING)
    other = p.userfaultfd(0)
    other.api(0)
    assert errno_of(other.register, a, PAGE_SIZE, MISSING) == errno.EBUSY
    assert errno_of(other.unregister, a, PAGE_SIZE) == errno.EINVAL


def test_register_after_exit_is_enomem_and_ioctls_esrch() -> None:
    p, u, a, src = ready()
    u.register(a, PAGE_SIZE, MISSING)
    monitor = vmemu.Process(p.kernel)
    monitor.receive_fd(u)  # the uffd outlives the process it serves
    p.exit()
    assert errno_of(u.register, a, PAGE_SIZE, MISSING) == errno.ENOMEM
    assert errno_of(u.unregister, a, PAGE_SIZE) == errno.ENOMEM
    with pytest.raises(OSError) as e:
        u.copy(a, src, PAGE_SIZE)
    assert e.value.errno == errno.ESRCH


# -- COPY ---------------------------------------------------------------------------------


def test_copy_validation_leaves_field_untouched() -> None:
    _, u, a, src = ready()
    u.register(a, 4 * PAGE_SIZE, MISSING)
    for dst, length, mode in [(a + 1, PAGE_SIZE, 0), (a, 0, 0), (a, PAGE_SIZE, 4)]:
        arg = uapi.uffdio_copy(dst, src, length, mode, UNTOUCHED)
        with pytest.raises(OSError) as e:
            u.ioctl(uapi.UFFDIO_COPY, arg)
        assert e.value.errno == errno.EINVAL and arg.copy == UNTOUCHED


def test_copy_enoent_unregistered_or_spanning() -> None:
    _, u, a, src = ready()
    u.register(a, 2 * PAGE_SIZE, MISSING)
    with pytest.raises(OSError) as e:
        u.copy(a + 2 * PAGE_SIZE, src, PAGE_SIZE)
    assert e.value.errno == errno.ENOENT and e.value.struct.copy == -errno.ENOENT
    assert errno_of(u.copy, a + PAGE_SIZE, src, 2 * PAGE_SIZE) == errno.ENOENT


def test_copy_eexist_and_partial_eagain() -> None:
    p, u, a, src = ready()
    u.register(a, 4 * PAGE_SIZE, MISSING)
    u.copy(a + PAGE_SIZE, src, PAGE_SIZE)
    with pytest.raises(OSError) as e:
        u.copy(a + PAGE_SIZE, src, PAGE_SIZE)
    assert e.value.errno == errno.EEXIST and e.value.struct.copy == -errno.EEXIST
    with pytest.raises(OSError) as e:
        u.copy(a, src, 2 * PAGE_SIZE)
    assert e.value.errno == errno.EAGAIN and e.value.struct.copy == PAGE_SIZE
    p.check()


def test_copy_efault_source_hole() -> None:
    _, u, a, _ = ready()
    u.register(a, PAGE_SIZE, MISSING)
    with pytest.raises(OSError) as e:
        u.copy(a, 0x10000, PAGE_SIZE)
    assert e.value.errno == errno.EFAULT and e.value.struct.copy == -errno.EFAULT


def test_copy_mode_wp_needs_wp_registration() -> None:
    _, u, a, src = ready()
    u.register(a, PAGE_SIZE, MISSING)
    assert errno_of(u.copy, a, src, PAGE_SIZE, uapi.UFFDIO_COPY_MODE_WP) == errno.EINVAL


def test_copy_eagain_while_event_unread() -> None:
    p, u, a, src = ready(uapi.UFFD_FEATURE_EVENT_REMOVE)
    u.register(a, 4 * PAGE_SIZE, MISSING)
    t = threading.Thread(target=p.madvise, args=(a, PAGE_SIZE, MADV_DONTNEED))
    t.start()
    import select

    assert select.select([u.fileno()], [], [], 5)[0]
    arg = uapi.uffdio_copy(a + 1, src, PAGE_SIZE, 0, UNTOUCHED)  # invalid *and* changing
    with pytest.raises(OSError) as e:
        u.ioctl(uapi.UFFDIO_COPY, arg)
    assert e.value.errno == errno.EAGAIN and arg.copy == -errno.EAGAIN
    assert errno_of(u.writeprotect, a, PAGE_SIZE, 0) == errno.EAGAIN
    assert isinstance(u.read()[0], uapi.RemoveMsg)
    t.join(5)
    assert not t.is_alive()


# -- ZEROPAGE / CONTINUE / POISON -----------------------------------------------------------


def test_zeropage_eexist_on_wp_marker_and_bad_mode() -> None:
    p, u, a, _ = ready(uapi.UFFD_FEATURE_WP_UNPOPULATED)
    u.register(a, PAGE_SIZE, MISSING | WP)
    u.writeprotect(a, PAGE_SIZE, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    assert errno_of(u.zeropage, a, PAGE_SIZE) == errno.EEXIST
    assert errno_of(u.zeropage, a, PAGE_SIZE, 2) == errno.EINVAL
    p.check()


def test_copy_overwrites_a_wp_marker() -> None:
    p, u, a, src = ready(uapi.UFFD_FEATURE_WP_UNPOPULATED)
    u.register(a, PAGE_SIZE, MISSING | WP)
    u.writeprotect(a, PAGE_SIZE, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    assert u.copy(a, src, PAGE_SIZE) == PAGE_SIZE
    assert p.read(a, 1) == b"s"
    p.check()


def test_continue_einval_on_anon_efault_not_cached_eexist_mapped() -> None:
    _, u, a, _ = ready()
    u.register(a, PAGE_SIZE, MISSING)
    with pytest.raises(OSError) as e:
        u.continue_(a, PAGE_SIZE)
    assert e.value.errno == errno.EINVAL and e.value.struct.mapped == -errno.EINVAL
    p = vmemu.Process()
    u2 = p.userfaultfd(0)
    u2.api(0)
    fd = p.memfd_create("m")
    p.ftruncate(fd, 2 * PAGE_SIZE)
    m = p.mmap(0, 2 * PAGE_SIZE, RW, MAP_SHARED, fd, 0)
    u2.register(m, 2 * PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MINOR)
    assert errno_of(u2.continue_, m, PAGE_SIZE) == errno.EFAULT
    p.pwrite(fd, b"cached", 0)
    assert u2.continue_(m, PAGE_SIZE) == PAGE_SIZE
    assert errno_of(u2.continue_, m, PAGE_SIZE) == errno.EEXIST
    assert p.read(m, 6) == b"cached"
    p.check()


def test_poison_refuses_markers_and_pages() -> None:
    p, u, a, src = ready(uapi.UFFD_FEATURE_WP_UNPOPULATED)
    u.register(a, 2 * PAGE_SIZE, MISSING | WP)
    u.writeprotect(a, PAGE_SIZE, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    assert errno_of(u.poison, a, PAGE_SIZE) == errno.EEXIST
    u.copy(a + PAGE_SIZE, src, PAGE_SIZE)
    assert errno_of(u.poison, a + PAGE_SIZE, PAGE_SIZE) == errno.EEXIST
    p.check()


# -- WRITEPROTECT -----------------------------------------------------------------------------


def test_writeprotect_errors() -> None:
    _, u, a, _ = ready()
    u.register(a, PAGE_SIZE, MISSING)
    wp_dw = uapi.UFFDIO_WRITEPROTECT_MODE_WP | uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    assert errno_of(u.writeprotect, a, PAGE_SIZE, wp_dw) == errno.EINVAL
    assert errno_of(u.writeprotect, a, PAGE_SIZE, 4) == errno.EINVAL
    assert errno_of(u.writeprotect, a, PAGE_SIZE, uapi.UFFDIO_WRITEPROTECT_MODE_WP) == \
        errno.ENOENT


# -- MOVE ---------------------------------------------------------------------------------------


def test_move_errors() -> None:
    p, u, a, src = ready()
    assert errno_of(u.move, a, src, PAGE_SIZE) == errno.EINVAL  # dst not registered
    u.register(a, 4 * PAGE_SIZE, MISSING)
    assert errno_of(u.move, a, 0x10000, PAGE_SIZE) == errno.ENOENT  # src in no VMA
    assert errno_of(u.move, a, src, PAGE_SIZE, 4) == errno.EINVAL
    u.copy(a, src, PAGE_SIZE)
    assert errno_of(u.move, a, src, PAGE_SIZE) == errno.EEXIST
    hole = p.mmap(0, PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    assert errno_of(u.move, a + PAGE_SIZE, hole, PAGE_SIZE) == errno.ENOENT
    assert u.move(a + PAGE_SIZE, hole, PAGE_SIZE, uapi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES) == \
        PAGE_SIZE
    child = p.fork()
    assert errno_of(u.move, a + 2 * PAGE_SIZE, src, PAGE_SIZE) == errno.EBUSY
    child.exit()
    assert errno_of(u.move, a + 2 * PAGE_SIZE, src, PAGE_SIZE) == errno.EBUSY
    p.write(src, b"w")  # COW reuse makes it exclusive again
    assert u.move(a + 2 * PAGE_SIZE, src, PAGE_SIZE) == PAGE_SIZE
    shared = p.mmap(0, PAGE_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS)
    assert errno_of(u.move, a + 3 * PAGE_SIZE, shared, PAGE_SIZE) == errno.EINVAL
    ro = p.mmap(0, PAGE_SIZE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS)
    assert errno_of(u.move, a + 3 * PAGE_SIZE, ro, PAGE_SIZE) == errno.EINVAL
    p.check()


def test_move_cross_mm_is_einval() -> None:
    p, u, a, src = ready()
    u.register(a, PAGE_SIZE, MISSING)
    other = p.fork()
    arg = uapi.uffdio_move(a, src, PAGE_SIZE, 0, UNTOUCHED)
    with pytest.raises(OSError) as e:
        u.ioctl(uapi.UFFDIO_MOVE, arg, caller=other)
    assert e.value.errno == errno.EINVAL and arg.move == UNTOUCHED


def test_wake_validates_range_only() -> None:
    _, u, a, _ = ready()
    u.wake(a, PAGE_SIZE)  # nothing registered, nobody waiting: still fine
    assert errno_of(u.wake, a + 1, PAGE_SIZE) == errno.EINVAL


def test_user_mode_only_kernel_access_efault() -> None:
    p = vmemu.Process()
    u = p.userfaultfd(uapi.UFFD_USER_MODE_ONLY | uapi.O_NONBLOCK)
    u.api(0)
    a = p.mmap(0, PAGE_SIZE)
    u.register(a, PAGE_SIZE, MISSING)
    assert errno_of(p.kernel_write, a, b"x") == errno.EFAULT
    assert errno_of(p.kernel_read, a, 1) == errno.EFAULT
    assert errno_of(u.read) == errno.EAGAIN  # and no message
