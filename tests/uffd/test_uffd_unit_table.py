"""The uffd-unit-tests checklist as a table: test x memory type x required features.

Mirrors ``tools/testing/selftests/mm/uffd-unit-tests.c``. Every test runs on
every memory type it applies to (anon, shmem, shmem-private, hugetlb,
hugetlb-private); a combination the kernel's own table excludes is a skip
with the reason it gives, never a silent pass.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

import pytest
from uffd_harness import (
    HPAGE,
    MEM_TYPES,
    Area,
    FaultHandler,
    make_area,
    make_kernel,
    native_process_or_skip,
    open_uffd,
)

import vmemu
from vmemu.constants import (
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.proc import PM_PRESENT, PM_UFFD_WP
from vmemu.uffd import uapi

MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
WP = uapi.UFFDIO_REGISTER_MODE_WP
MINOR = uapi.UFFDIO_REGISTER_MODE_MINOR


def _bit(n: int) -> int:
    return 1 << n


def setup(kind: str, npages: int = 4, **kw: object) -> tuple[vmemu.Process, Area]:
    k = make_kernel(kind, **kw)  # type: ignore[arg-type]
    p = k.spawn()
    return p, make_area(p, kind, npages)


def only(kinds: list[str], kind: str) -> None:
    """Skip a memory type the feature does not apply to on Linux 6.18."""
    if kind not in kinds:
        pytest.skip(f"does not apply on Linux 6.18: only {', '.join(kinds)}")


@pytest.mark.parametrize("via", ["syscall", "dev"])
def test_api(via: str) -> None:
    p = vmemu.Process()
    make = (lambda: p.userfaultfd(0)) if via == "syscall" else \
        (lambda: p.open_dev_userfaultfd().new(0))
    u = make()
    with pytest.raises(OSError) as e:
        u.api(0, api=0xAB)
    assert e.value.errno == errno.EINVAL
    assert (e.value.struct.api, e.value.struct.features, e.value.struct.ioctls) == (0, 0, 0)
    with pytest.raises(OSError) as e:
        u.api(1 << 63)
    assert e.value.errno == errno.EINVAL
    arg = u.api(0)
    assert arg.features == uapi.UFFD_API_FEATURES
    assert arg.ioctls == uapi.UFFD_API_IOCTLS
    with pytest.raises(OSError) as e:
        u.api(0)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("kind", MEM_TYPES)
@pytest.mark.parametrize("mode", range(8))
def test_register_ioctls(kind: str, mode: int) -> None:
    p, area = setup(kind)
    u = open_uffd(p)
    if mode == 0 or (mode & MINOR and kind == "anon"):
        with pytest.raises(OSError) as e:
            u.register(area.dst, area.size, mode)
        assert e.value.errno == errno.EINVAL
        return
    ioctls = u.register(area.dst, area.size, mode)
    assert ioctls & _bit(uapi._UFFDIO_WAKE)
    assert ioctls & _bit(uapi._UFFDIO_COPY)
    assert bool(ioctls & _bit(uapi._UFFDIO_WRITEPROTECT)) == bool(mode & WP)
    assert bool(ioctls & _bit(uapi._UFFDIO_CONTINUE)) == bool(mode & MINOR)
    assert bool(ioctls & _bit(uapi._UFFDIO_ZEROPAGE)) == (not area.hugetlb)
    p.check()


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_zeropage(kind: str) -> None:
    p, area = setup(kind)
    u = open_uffd(p)
    ioctls = u.register(area.dst, area.size, MISSING)
    if not ioctls & _bit(uapi._UFFDIO_ZEROPAGE):
        with pytest.raises(OSError) as e:
            u.zeropage(area.dst, area.page_size)
        assert e.value.errno == errno.EINVAL
        assert e.value.struct.zeropage == -errno.EINVAL
        return
    assert u.zeropage(area.dst, area.page_size) == area.page_size
    assert p.read(area.dst, 64) == bytes(64)
    with pytest.raises(OSError) as e:
        u.zeropage(area.dst, area.page_size)
    assert e.value.errno == errno.EEXIST and e.value.struct.zeropage == -errno.EEXIST
    p.check()


def _move_setup(npages: int, page: int, huge: bool) -> tuple[vmemu.Process, object, int, int]:
    p = vmemu.Process()
    size = npages * page
    dst = p.mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    src = p.mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    p.madvise(src, size, MADV_DONTFORK)
    advice = MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE
    p.madvise(src, size, advice)
    p.madvise(dst, size, advice)
    for i in range(npages):
        p.write(src + i * page, bytes([i + 1]) * 16)
    u = open_uffd(p, uapi.UFFD_FEATURE_MOVE)
    u.register(dst, size, MISSING)
    return p, u, dst, src


@pytest.mark.parametrize("kind", MEM_TYPES)
@pytest.mark.parametrize("variant", ["move", "move-pmd", "move-pmd-split"])
def test_move(kind: str, variant: str) -> None:
    only(["anon"], kind)
    huge = variant == "move-pmd"
    chunk = HPAGE if variant != "move" else PAGE_SIZE
    npages = 2
    p, u, dst, src = _move_setup(npages, chunk, huge)
    faults: list[bytes] = []
    for i in range(npages):
        t = threading.Thread(
            target=lambda i=i: faults.append(p.thread("T").read(dst + i * chunk, 16)))
        t.start()
        _wait_msgs(u, 1)
        msg = u.read_msgs(32)[0]
        assert isinstance(msg, uapi.PagefaultMsg)
        off = (msg.address - dst) & ~(chunk - 1)
        try:
            u.move(dst + off, src + off, chunk, uapi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES)
        except OSError as e:
            assert e.errno == errno.EEXIST
            u.wake(dst + off, chunk)
        t.join(5)
        assert not t.is_alive()
        p.check()
    for i in range(npages):
        assert p.read(dst + i * chunk, 16) == bytes([i + 1]) * 16
        assert p.read(src + i * chunk, 16) == bytes(16)
    assert len(faults) == npages
    p.check()


def _wait_msgs(u: object, n: int, timeout: float = 5.0) -> None:
    import select

    r, _, _ = select.select([u.fileno()], [], [], timeout)  # type: ignore[attr-defined]
    assert r, "no userfault message arrived"


def _wp_fork(kind: str, with_event: bool) -> None:
    """``uffd_wp_fork_test_common``: the child keeps uffd-wp only with EVENT_FORK, on a
    present page and, after a zap, on the uffd-wp marker the zap left (or a swap entry)."""
    feats = uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    if with_event:
        feats |= uapi.UFFD_FEATURE_EVENT_FORK
    p, area = setup(kind, 1)
    u = open_uffd(p, feats)
    u.register(area.dst, area.size, WP)
    p.write(area.dst, b"x")
    u.writeprotect(area.dst, area.size, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    assert p.pagemap(area.dst) & PM_UFFD_WP
    _fork_wp_bit(p, u, area, with_event)
    # a zap keeps the bit: shared -> DONTNEED, private -> PAGEOUT (which may fail) in the selftest
    if area.file_backed and not kind.endswith("private"):
        p.madvise(area.dst, area.size, MADV_DONTNEED)
    else:
        try:
            p.madvise(area.dst, area.size, MADV_PAGEOUT)
        except OSError:
            pass  # private hugetlb cannot be paged out
    assert p.pagemap(area.dst) & PM_UFFD_WP
    _fork_wp_bit(p, u, area, with_event)
    u.writeprotect(area.dst, area.size, 0)
    assert not p.pagemap(area.dst) & PM_UFFD_WP
    p.write(area.dst, b"y")
    assert not p.pagemap(area.dst) & PM_UFFD_WP
    p.check()


def _fork_wp_bit(p: vmemu.Process, u: object, area: Area, with_event: bool) -> None:
    """``pagemap_test_fork``: fork (consuming the FORK event) and check the child's bit."""
    child_box: list[vmemu.Process] = []
    t = threading.Thread(target=lambda: child_box.append(p.fork()))
    t.start()
    if with_event:
        _wait_msgs(u, 1)
        msg = u.read_msgs(32)[0]  # type: ignore[attr-defined]
        assert isinstance(msg, uapi.ForkMsg)
    t.join(5)
    assert not t.is_alive()
    child = child_box[0]
    assert bool(child.pagemap(area.dst) & PM_UFFD_WP) == with_event
    child.exit()
    p.check()


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_wp_fork(kind: str) -> None:
    _wp_fork(kind, False)


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_wp_fork_with_event(kind: str) -> None:
    _wp_fork(kind, True)


def _fork_check_wp(p: vmemu.Process, u: object, area: Area, with_event: bool,
                   pin_in_child: bool) -> None:
    """``pagemap_test_fork``: the child sees the uffd-wp bit exactly with EVENT_FORK."""
    child_box: list[vmemu.Process] = []
    t = threading.Thread(target=lambda: child_box.append(p.fork()))
    t.start()
    if with_event:
        _wait_msgs(u, 1)
        msg = u.read_msgs(32)[0]  # type: ignore[attr-defined]
        assert isinstance(msg, uapi.ForkMsg)
    t.join(5)
    assert not t.is_alive()
    child = child_box[0]
    pin = child.pin_user_pages(area.dst, area.page_size) if pin_in_child else None
    assert bool(child.pagemap(area.dst) & PM_UFFD_WP) == with_event
    assert child.read(area.dst, 1) == b"\x01"
    if pin is not None:
        pin.unpin()
    child.exit()


def _wp_fork_pin(kind: str, with_event: bool) -> None:
    """``uffd_wp_fork_pin_test_common``: a pinned page forks by early COW (the child's copy
    keeps uffd-wp only with EVENT_FORK); a read-only pin in the child unshares its page and
    keeps the bit. The selftest pins through CONFIG_GUP_TEST; vmemu has ``pin_user_pages``."""
    feats = uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    if with_event:
        feats |= uapi.UFFD_FEATURE_EVENT_FORK
    p, area = setup(kind, 1)
    u = open_uffd(p, feats)
    u.register(area.dst, area.page_size, WP)
    p.write(area.dst, b"\x01")
    u.writeprotect(area.dst, area.page_size, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    pin = p.pin_user_pages(area.dst, area.page_size)
    before = p.pagemap(area.dst)
    _fork_check_wp(p, u, area, with_event, pin_in_child=False)
    assert p.pagemap(area.dst) == before  # early COW: the parent keeps its page, still wp
    p.check()
    pin.unpin()
    _fork_check_wp(p, u, area, with_event, pin_in_child=True)
    assert p.pagemap(area.dst) & PM_UFFD_WP and p.read(area.dst, 1) == b"\x01"
    u.unregister(area.dst, area.page_size)
    p.check()


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_wp_fork_pin(kind: str) -> None:
    _wp_fork_pin(kind, False)


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_wp_fork_pin_with_event(kind: str) -> None:
    _wp_fork_pin(kind, True)


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_wp_unpopulated(kind: str) -> None:
    only(["anon"], kind)
    p, area = setup(kind, 1)
    u = open_uffd(p, uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uapi.UFFD_FEATURE_WP_UNPOPULATED)
    u.register(area.dst, area.size, WP)
    u.writeprotect(area.dst, area.size, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    assert p.pagemap(area.dst) & PM_UFFD_WP and not p.pagemap(area.dst) & PM_PRESENT
    u.writeprotect(area.dst, area.size, 0)
    assert not p.pagemap(area.dst) & PM_UFFD_WP
    u.writeprotect(area.dst, area.size, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    p.madvise(area.dst, area.size, MADV_DONTNEED)
    assert not p.pagemap(area.dst) & PM_UFFD_WP
    p.write(area.dst, b"ok")
    u.writeprotect(area.dst, area.size, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    p.madvise(area.dst, area.size, MADV_DONTNEED)
    u.writeprotect(area.dst, area.size, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    assert p.read(area.dst, 2) == b"\0\0"
    assert p.pagemap(area.dst) & PM_UFFD_WP and p.pagemap(area.dst) & PM_PRESENT
    p.check()


def _minor(kind: str, wp: bool) -> None:
    p, area = setup(kind)
    for i in range(area.npages):
        assert area.alias is not None
        p.write(area.alias + i * area.page_size, bytes([i + 1]) * 64)
    feats = uapi.UFFD_FEATURE_MINOR_SHMEM | uapi.UFFD_FEATURE_MINOR_HUGETLBFS
    mode = MINOR | (WP if wp else 0)
    u = open_uffd(p, feats | (uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP if wp else 0))
    u.register(area.dst, area.size, mode)
    with FaultHandler(area, u) as h:
        for i in range(area.npages):
            data = p.thread("T").read(area.dst + i * area.page_size, 64)
            assert data == bytes([(i + 1) ^ 0xFF]) * 64
    assert h.counters.minor == area.npages and h.counters.missing == 0
    with pytest.raises(OSError) as e:
        u.continue_(area.dst, area.page_size)
    assert e.value.errno == errno.EEXIST and e.value.struct.mapped == -errno.EEXIST
    p.check()


# The selftest runs minor/minor-wp on the shared kinds only, but MINOR registration and
# CONTINUE work on private shmem/hugetlb mappings as well on 6.18 (the page cache page is
# mapped read-only, observed); only anon has no minor faults (EINVAL at register).
FILE_TYPES = [k for k in MEM_TYPES if k != "anon"]


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_minor(kind: str) -> None:
    only(FILE_TYPES, kind)
    _minor(kind, False)


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_minor_wp(kind: str) -> None:
    only(FILE_TYPES, kind)
    _minor(kind, True)


def _sigbus(kind: str, wp: bool) -> None:
    feats = uapi.UFFD_FEATURE_SIGBUS | uapi.UFFD_FEATURE_EVENT_FORK
    if wp:
        feats |= uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    p, area = setup(kind)
    u = open_uffd(p, feats)
    u.register(area.dst, area.size, MISSING | (WP if wp else 0))
    h = FaultHandler(area, u, wp_copy=wp)
    signals = 0
    for i in range(area.npages):
        addr = area.dst + i * area.page_size + 3
        with pytest.raises(vmemu.Sigbus) as e:
            p.read(addr, 1)
        assert e.value.si_addr == addr and e.value.si_code == vmemu.BUS_ADRERR
        signals += 1
        h.copy_page(addr & ~(area.page_size - 1))
        p.read(addr, 1)
        if wp:
            with pytest.raises(vmemu.Sigbus):
                p.write(addr, b"w")
            signals += 1
            u.writeprotect(addr & ~(area.page_size - 1), area.page_size, 0)
            p.write(addr, b"w")
    assert signals == area.npages * (2 if wp else 1)
    with pytest.raises(OSError) as eagain:
        u.read_msgs(32)
    assert eagain.value.errno == errno.EAGAIN
    p.check()


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_sigbus(kind: str) -> None:
    _sigbus(kind, False)


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_sigbus_wp(kind: str) -> None:
    _sigbus(kind, True)


def _events(kind: str, wp: bool) -> None:
    feats = uapi.UFFD_FEATURE_EVENT_FORK | uapi.UFFD_FEATURE_EVENT_REMAP \
        | uapi.UFFD_FEATURE_EVENT_REMOVE
    if wp:
        feats |= uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    p, area = setup(kind, 4)
    u = open_uffd(p, feats)
    u.register(area.dst, area.size, MISSING | (WP if wp else 0))
    with FaultHandler(area, u) as h:
        child = p.fork()
        half = area.npages // 2
        for i in range(half):
            child.read(area.dst + i * area.page_size, 1)
        target = child.mmap(0, area.size + area.page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS)
        target = (target + area.page_size - 1) & ~(area.page_size - 1)
        child.munmap(target, area.size)
        moved = child.mremap(area.dst, area.size, area.size, MREMAP_MAYMOVE | MREMAP_FIXED, target)
        for i in range(half, area.npages):
            child.read(moved + i * area.page_size, 1)
        advice = MADV_REMOVE if area.file_backed and not kind.endswith("private") \
            else MADV_DONTNEED
        child.madvise(moved, area.size, advice)
        assert child.read(moved, 8) == bytes(8)
        child.exit()
    kinds = [type(m).__name__ for m in h.counters.events]
    assert kinds[:2] == ["ForkMsg", "RemapMsg"] and "RemoveMsg" in kinds
    assert h.counters.missing == area.npages
    p.check()


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_events(kind: str) -> None:
    _events(kind, False)


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_events_wp(kind: str) -> None:
    _events(kind, True)


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_poison(kind: str) -> None:
    p, area = setup(kind, 4)
    u = open_uffd(p, uapi.UFFD_FEATURE_POISON)
    ioctls = u.register(area.dst, area.size, MISSING)
    assert ioctls & _bit(uapi._UFFDIO_COPY) and ioctls & _bit(uapi._UFFDIO_POISON)
    h = FaultHandler(area, u, fill=lambda i: bytes(area.page_size))
    sigbus = 0
    for i in range(area.npages):
        page = area.dst + i * area.page_size
        if i % 2:
            h.copy_page(page)
        else:
            assert u.poison(page, area.page_size) == area.page_size
    for i in range(area.npages):
        try:
            p.read(area.dst + i * area.page_size, 1)
        except vmemu.Sigbus:
            sigbus += 1
    assert sigbus == area.npages // 2
    p.check()


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_poison_marker_errors(kind: str) -> None:
    """A UFFDIO_POISON page: SIGBUS BUS_ADRERR to the user, EHWPOISON to MADV_POPULATE_*,
    EFAULT to a kernel copy (observed on 6.18 for anon and hugetlb)."""
    from vmemu.mmu.gup import EHWPOISON

    p, area = setup(kind, 1)
    u = open_uffd(p, uapi.UFFD_FEATURE_POISON)
    u.register(area.dst, area.size, MISSING)
    u.poison(area.dst, area.size)
    with pytest.raises(vmemu.Sigbus) as sig:
        p.read(area.dst, 1)
    assert sig.value.si_code == vmemu.BUS_ADRERR
    for advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
        with pytest.raises(OSError) as e:
            p.madvise(area.dst, area.size, advice)
        assert e.value.errno == EHWPOISON
    with pytest.raises(OSError) as e:
        p.kernel_read(area.dst, 16)
    assert e.value.errno == errno.EFAULT
    p.check()


def _mmap_changing(p: object, area: Area) -> list[tuple[str, int, int]]:
    """``uffd_mmap_changing_test``: while a REMOVE event is unread every range ioctl fails
    EAGAIN with -EAGAIN in its output field, even where it would otherwise be EINVAL
    (ZEROPAGE on hugetlb, CONTINUE on anon): ``mmap_changing`` is checked first."""
    feats = uapi.UFFD_FEATURE_EVENT_REMOVE | uapi.UFFD_FEATURE_MOVE | uapi.UFFD_FEATURE_POISON
    mode = MISSING
    if area.file_backed:
        feats |= uapi.UFFD_FEATURE_MINOR_SHMEM | uapi.UFFD_FEATURE_MINOR_HUGETLBFS
        mode |= MINOR
    u = open_uffd(p, feats)  # type: ignore[arg-type]
    u.register(area.dst, area.size, mode)
    ps = area.page_size
    src = p.mmap(0, ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)  # type: ignore[attr-defined]
    advice = MADV_REMOVE if area.file_backed and not area.kind.endswith("private") else MADV_DONTNEED
    t = threading.Thread(target=lambda: p.madvise(area.dst, ps, advice))  # type: ignore[attr-defined]
    t.start()
    _wait_msgs(u, 1)
    page = area.dst + ps
    out = []
    for name, call, field in [
        ("copy", lambda: u.copy(page, src, ps), "copy"),
        ("zeropage", lambda: u.zeropage(page, ps), "zeropage"),
        ("move", lambda: u.move(page, src, ps), "move"),
        ("poison", lambda: u.poison(page, ps), "updated"),
        ("continue", lambda: u.continue_(page, ps), "mapped"),
    ]:
        try:
            call()
            out.append((name, 0, 0))
        except OSError as e:
            out.append((name, e.errno or 0, getattr(e.struct, field)))  # type: ignore[attr-defined]
    still_blocked = t.is_alive()
    msg = u.read_msgs(32)[0]
    t.join(5)
    out.append(("blocked until read", int(still_blocked), int(isinstance(msg, uapi.RemoveMsg))))
    try:
        out.append(("zeropage after", u.zeropage(page, ps), 0))
    except OSError as e:
        out.append(("zeropage after", -(e.errno or 0), 0))
    u.close()
    p.munmap(src, ps)  # type: ignore[attr-defined]
    return out


def _mmap_changing_expected(kind: str) -> list[tuple[str, int, int]]:
    ps = HPAGE if kind.startswith("hugetlb") else PAGE_SIZE
    out = [(n, errno.EAGAIN, -errno.EAGAIN) for n in ("copy", "zeropage", "move", "poison", "continue")]
    out.append(("blocked until read", 1, 1))
    out.append(("zeropage after", -errno.EINVAL if kind.startswith("hugetlb") else ps, 0))
    return out


def _move_not_anon(p: object, area: Area) -> list[tuple[str, int, int]]:
    """UFFDIO_MOVE wants private anonymous VMAs on both sides (``move_pages``: a shared,
    file or hugetlb VMA is EINVAL, -EINVAL in ``move``): the uffd-unit-tests table runs
    MOVE on anon only; what the other memory types give is asserted here instead."""
    u = open_uffd(p, uapi.UFFD_FEATURE_MOVE)  # type: ignore[arg-type]
    u.register(area.dst, area.size, MISSING)
    anon = p.mmap(0, 2 * HPAGE, PROT_READ | PROT_WRITE,  # type: ignore[attr-defined]
                  MAP_PRIVATE | MAP_ANONYMOUS)
    p.write(anon, b"a")  # type: ignore[attr-defined]
    out = []
    for name, dst, src in (("into", area.dst, anon), ("out of", anon, area.dst)):
        if name == "out of":
            u.register(anon, 2 * HPAGE, MISSING)
            p.madvise(anon, 2 * HPAGE, MADV_DONTNEED)  # type: ignore[attr-defined]
        try:
            u.move(dst, src, PAGE_SIZE)
            out.append((name, 0, 0))
        except OSError as e:
            out.append((name, e.errno or 0, e.struct.move))  # type: ignore[attr-defined]
    u.close()
    p.munmap(anon, 2 * HPAGE)  # type: ignore[attr-defined]
    return out


@pytest.mark.parametrize("kind", FILE_TYPES)
def test_move_not_anon(kind: str) -> None:
    p, area = setup(kind, 2)
    p.write(area.alias, b"f")  # type: ignore[arg-type]
    p.read(area.dst, 1)  # the file page mapped at dst: a MOVE source that is present
    assert _move_not_anon(p, area) == [(n, errno.EINVAL, -errno.EINVAL) for n in ("into", "out of")]
    p.check()


@pytest.mark.parametrize("kind", MEM_TYPES)
def test_mmap_changing(kind: str) -> None:
    """The selftest runs this on shmem only ("the same code paths"); vmemu's paths per
    memory type differ, and the behaviour applies to all of them on 6.18, so all run."""
    p, area = setup(kind, 4)
    assert _mmap_changing(p, area) == _mmap_changing_expected(kind)
    p.check()


def _native_or_skip(kind: str) -> object:
    """The real kernel through vmemu.native, or a skip with the reason it cannot run."""
    p = native_process_or_skip()
    if kind.startswith("hugetlb"):
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: ln.split()[1] for ln in f if ln.startswith("HugePages_")}
        if int(info.get("HugePages_Free", 0)) - int(info.get("HugePages_Rsvd", 0)) < 8:
            pytest.skip("host hugetlb pool has fewer than 8 free 2 MiB pages")
    return p


def _release(p: Any, area: Area) -> None:
    """Unmap a native area and its alias, and close its file (the kernel keeps them)."""
    p.munmap(area.dst, area.size)
    if area.alias is not None:
        p.munmap(area.alias, area.size)
    if area.fd is not None:
        p.close(area.fd)


@pytest.mark.differential
@pytest.mark.parametrize("kind", MEM_TYPES)
def test_mmap_changing_on_the_kernel(kind: str) -> None:
    """The same scenario and expectations on Linux through vmemu.native."""
    p = _native_or_skip(kind)
    area = make_area(p, kind, 4)  # type: ignore[arg-type]
    try:
        assert _mmap_changing(p, area) == _mmap_changing_expected(kind)
    finally:
        _release(p, area)


@pytest.mark.differential
@pytest.mark.parametrize("kind", FILE_TYPES)
def test_move_not_anon_on_the_kernel(kind: str) -> None:
    """The same on Linux through vmemu.native."""
    p = _native_or_skip(kind)
    area = make_area(p, kind, 2)  # type: ignore[arg-type]
    try:
        p.write(area.alias, b"f")  # type: ignore[attr-defined]
        p.read(area.dst, 1)  # type: ignore[attr-defined]
        assert _move_not_anon(p, area) == [(n, errno.EINVAL, -errno.EINVAL)
                                            for n in ("into", "out of")]
    finally:
        _release(p, area)
