"""uffd-wp on hugetlb zaps, against the real kernel.

One scenario function drives ``vmemu.Process`` and ``vmemu.native.NativeProcess``
alike and returns what pagemap shows after each step; the emulator must give
exactly the kernel's list. The expected lists below were recorded on Linux
6.18 and are asserted on both sides, so the emulator half runs everywhere and
the kernel half re-checks them where it can (free 2 MiB pages in the host
pool, userfaultfd permitted; otherwise it skips with the reason).

What they pin down (``__unmap_hugepage_range`` without ZAP_FLAG_DROP_MARKER):
MADV_DONTNEED of a uffd-wp protected huge page, shared or private, and a
hole punch of a shared one leave a uffd-wp marker in the huge entry; a
marker survives a second zap; truncate drops it; a read fault over a marker
maps the page still protected; unprotect clears it.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from typing import Any

import pytest
from _kernel import native_process_or_skip

import vmemu
from vmemu.constants import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.memfd import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, MFD_HUGETLB
from vmemu.mmu.proc import PM_FILE, PM_MMAP_EXCLUSIVE, PM_PFRAME_MASK, PM_PRESENT, PM_UFFD_WP
from vmemu.uffd import uapi

pytestmark = pytest.mark.differential

H = 2 << 20
NPAGES = 4


def emulated_process() -> vmemu.Process:
    """An emulated process whose kernel has a 64-page hugetlb pool."""
    k = vmemu.Kernel()
    k.set_nr_hugepages(64)
    return k.spawn()


def _state(p: Any, addr: int) -> tuple[int, int]:
    e = p.pagemap(addr)
    return int(bool(e & PM_PRESENT)), int(bool(e & PM_UFFD_WP))


def hugetlb_wp_zap(p: Any, shared: bool) -> list[tuple[str, Any]]:
    """uffd-wp protect 4 huge pages (2 written, 2 empty), then zap, punch, fault, truncate."""
    fd = p.memfd_create("uffd-huge", MFD_HUGETLB)
    p.ftruncate(fd, NPAGES * H)
    a = p.mmap(0, NPAGES * H, PROT_READ | PROT_WRITE, MAP_SHARED if shared else MAP_PRIVATE, fd, 0)
    out: list[tuple[str, Any]] = []
    u = p.userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
    try:
        u.api(uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
        p.write(a, b"\x01")
        p.write(a + H, b"\x02")
        u.register(a, NPAGES * H, uapi.UFFDIO_REGISTER_MODE_WP)
        u.writeprotect(a, NPAGES * H, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
        out.append(("protected", [_state(p, a + i * H) for i in range(NPAGES)]))
        p.madvise(a, H, MADV_DONTNEED)
        out.append(("dontneed page", _state(p, a)))
        p.madvise(a + 2 * H, H, MADV_DONTNEED)
        out.append(("dontneed marker", _state(p, a + 2 * H)))
        if shared:
            p.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, H, H)
            out.append(("punch page", _state(p, a + H)))
            p.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * H, H)
            out.append(("punch marker", _state(p, a + 2 * H)))
        out.append(("read over marker", p.read(a, 1), _state(p, a)))
        u.writeprotect(a, H, 0)
        out.append(("unprotected", _state(p, a)))
        p.write(a, b"\x03")
        out.append(("written", p.read(a, 1), _state(p, a)))
        try:
            p.ftruncate(fd, H + 4096)
            out.append(("unaligned truncate", 0))
        except OSError as e:
            out.append(("unaligned truncate", errno.errorcode[e.errno or 0]))
        p.ftruncate(fd, 2 * H)
        out.append(("truncated", [_state(p, a + i * H) for i in range(NPAGES)]))
    finally:
        u.close()
        p.munmap(a, NPAGES * H)
        p.close(fd)
    return out


EXPECTED_SHARED = [
    ("protected", [(1, 1), (1, 1), (0, 1), (0, 1)]),
    ("dontneed page", (0, 1)),
    ("dontneed marker", (0, 1)),
    ("punch page", (0, 1)),
    ("punch marker", (0, 1)),
    ("read over marker", b"\x01", (1, 1)),
    ("unprotected", (1, 0)),
    ("written", b"\x03", (1, 0)),
    ("unaligned truncate", "EINVAL"),
    ("truncated", [(1, 0), (0, 1), (0, 0), (0, 0)]),
]

EXPECTED_PRIVATE = [
    ("protected", [(1, 1), (1, 1), (0, 1), (0, 1)]),
    ("dontneed page", (0, 1)),
    ("dontneed marker", (0, 1)),
    ("read over marker", b"\x00", (1, 1)),  # the private copy is gone; the file has a hole
    ("unprotected", (1, 0)),
    ("written", b"\x03", (1, 0)),
    ("unaligned truncate", "EINVAL"),
    ("truncated", [(1, 0), (1, 1), (0, 0), (0, 0)]),
]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "private"])
@pytest.mark.parametrize("side", ["vmemu", "kernel"])
def test_hugetlb_wp_zap_leaves_marker(side: str, shared: bool) -> None:
    p = emulated_process() if side == "vmemu" else native_process_or_skip(2 * NPAGES)
    got = hugetlb_wp_zap(p, shared)
    assert got == (EXPECTED_SHARED if shared else EXPECTED_PRIVATE)
    if side == "vmemu":
        p.check()


# -- THP: the huge zero page, and MISSING faults through the PMD path ---------------------------


def _host_thp_policy() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


def _host_use_zero_page() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/use_zero_page") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def native_thp_process() -> Any:
    """A NativeProcess where MADV_HUGEPAGE gives THPs and reads the huge zero page, or a skip."""
    if _host_thp_policy() == "never":
        pytest.skip("host THP policy is 'never'")
    if not _host_use_zero_page():
        pytest.skip("host transparent_hugepage/use_zero_page is off")
    if os.geteuid() != 0:
        pytest.skip("pagemap shows PFNs to root only")
    return native_process_or_skip()


def _smaps_kb(p: Any, addr: int, field: str) -> int:
    text = p.smaps() if hasattr(p, "smaps") else open("/proc/self/smaps").read()
    inside = False
    for line in text.splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {addr:#x}")


def _thp_area(p: Any, advice: int) -> tuple[int, int]:
    """A 2 MiB-aligned private anonymous 2 MiB with ``advice``; returns (aligned, raw)."""
    raw = p.mmap(0, 2 * H, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    a = (raw + H - 1) & ~(H - 1)
    p.madvise(a, H, advice)
    return a, raw


def _pm(p: Any, addr: int) -> tuple[int, int, int]:
    e = p.pagemap(addr)
    return int(bool(e & PM_PRESENT)), int(bool(e & PM_FILE)), int(bool(e & PM_MMAP_EXCLUSIVE))


def huge_zero_page(p: Any) -> list[tuple[str, Any]]:
    """Read, write and split the huge zero page; what pagemap and smaps show."""
    out: list[tuple[str, Any]] = []
    small, small_raw = _thp_area(p, MADV_NOHUGEPAGE)
    p.read(small, 1)
    zero_pfn = p.pagemap(small) & PM_PFRAME_MASK
    out.append(("4k zero page", _pm(p, small)))
    a, raw = _thp_area(p, MADV_HUGEPAGE)
    b, b_raw = _thp_area(p, MADV_HUGEPAGE)
    try:
        assert p.read(a + 5, 3) == bytes(3)
        pfn0, pfn1 = (p.pagemap(a + i * PAGE_SIZE) & PM_PFRAME_MASK for i in (0, 1))
        out.append(("read", _pm(p, a), pfn1 == pfn0 + 1, pfn0 == zero_pfn,
                    _smaps_kb(p, a, "Rss"), _smaps_kb(p, a, "AnonHugePages")))
        p.write(a + 3 * PAGE_SIZE, b"w")
        out.append(("write", _pm(p, a), p.read(a + 3 * PAGE_SIZE, 2),
                    _smaps_kb(p, a, "Rss"), _smaps_kb(p, a, "AnonHugePages")))
        p.read(b, 1)
        p.madvise(b, PAGE_SIZE, MADV_DONTNEED)
        out.append(("dontneed 4k", _pm(p, b), _pm(p, b + PAGE_SIZE),
                    p.pagemap(b + PAGE_SIZE) & PM_PFRAME_MASK == zero_pfn,
                    _smaps_kb(p, b, "Rss"), _smaps_kb(p, b, "AnonHugePages")))
    finally:
        for r in (small_raw, raw, b_raw):
            p.munmap(r, 2 * H)
    return out


EXPECTED_HUGE_ZERO = [
    ("4k zero page", (1, 0, 0)),
    ("read", (1, 1, 0), True, False, 0, 0),
    ("write", (1, 0, 1), b"w\0", 2048, 2048),
    ("dontneed 4k", (0, 0, 0), (1, 0, 0), True, 0, 0),
]


@pytest.mark.parametrize("side", ["vmemu", "kernel"])
def test_thp_read_fault_maps_the_huge_zero_page(side: str) -> None:
    p = vmemu.Process() if side == "vmemu" else native_thp_process()
    assert huge_zero_page(p) == EXPECTED_HUGE_ZERO
    if side == "vmemu":
        p.check()


def missing_then_move(p: Any, write: bool, advice: int) -> tuple[Any, ...]:
    """A MISSING fault in ``dst`` resolved by UFFDIO_MOVE of a whole 2 MiB THP from ``src``.

    In a THP-eligible ``dst`` the fault reached handle_userfault from the PMD
    path, so the PMD is still none and the THP moves whole (dst shows
    AnonHugePages); otherwise the fault allocated a PTE table and the move
    splits the THP.
    """
    src, src_raw = _thp_area(p, MADV_HUGEPAGE)
    # no zero-filled subpage: 6.18 remaps those to the shared zero page when the THP splits
    p.write(src, b"\x5a" * (H - PAGE_SIZE) + b"\x5b" * PAGE_SIZE)
    dst, dst_raw = _thp_area(p, advice)
    u = p.userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
    try:
        u.api(uapi.UFFD_FEATURE_MOVE)
        u.register(dst, H, uapi.UFFDIO_REGISTER_MODE_MISSING)
        src_huge = _smaps_kb(p, src, "AnonHugePages")
        box: list[bytes] = []

        def touch() -> None:
            t = p.thread("T")
            if write:
                t.write(dst + 5, b"\x07")
            box.append(t.read(dst + 5, 1))

        th = threading.Thread(target=touch, daemon=True)
        th.start()
        assert select.select([u.fileno()], [], [], 10)[0], "no fault message"
        msg = u.read_msgs(32)[0]
        moved = u.move(dst, src, H, 0)
        th.join(10)
        assert not th.is_alive()
        return (src_huge, msg.address - dst, msg.flags, moved, box[0],
                _smaps_kb(p, dst, "AnonHugePages"), _smaps_kb(p, dst, "Rss"),
                p.read(dst + H - PAGE_SIZE, 1), _pm(p, src)[0])
    finally:
        u.close()
        p.munmap(src_raw, 2 * H)
        p.munmap(dst_raw, 2 * H)


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("eligible", [True, False], ids=["hugepage", "nohugepage"])
@pytest.mark.parametrize("side", ["vmemu", "kernel"])
def test_missing_fault_leaves_pmd_none_for_a_whole_pmd_move(side: str, eligible: bool,
                                                            write: bool) -> None:
    p = vmemu.Process() if side == "vmemu" else native_thp_process()
    got = missing_then_move(p, write, MADV_HUGEPAGE if eligible else MADV_NOHUGEPAGE)
    flags = uapi.UFFD_PAGEFAULT_FLAG_WRITE if write else 0
    first = b"\x07" if write else b"\x5a"
    assert got == (2048, 0, flags, H, first, 2048 if eligible else 0, 2048, b"\x5b", 0)
    if side == "vmemu":
        p.check()


def uffd_wp_thp(p: Any) -> list[tuple[Any, ...]]:
    """uffd-wp in a THP-eligible range registered for WP only: the huge zero page and the
    THP are created as without uffd, protection of a whole PMD stays in the PMD (no split),
    a write is a WP fault, unprotecting restores the THP, protecting 4 KiB splits it."""
    a, raw = _thp_area(p, MADV_HUGEPAGE)
    u = p.userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
    out: list[tuple[Any, ...]] = []
    try:
        u.api(uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        u.register(a, H, uapi.UFFDIO_REGISTER_MODE_WP)
        p.read(a + 100, 1)
        out.append(("read", _pm(p, a), _smaps_kb(p, a, "AnonHugePages")))
        p.write(a + PAGE_SIZE, b"\x01")
        out.append(("write", _pm(p, a), _smaps_kb(p, a, "AnonHugePages")))
        u.writeprotect(a, H, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
        wp = [bool(p.pagemap(a + i) & PM_UFFD_WP) for i in (0, H - PAGE_SIZE)]
        out.append(("protect 2M", wp, _smaps_kb(p, a, "AnonHugePages")))
        th = threading.Thread(target=lambda: p.thread("T").write(a + 0x7003, b"\x02"), daemon=True)
        th.start()
        assert select.select([u.fileno()], [], [], 10)[0], "no fault message"
        msg = u.read_msgs(32)[0]
        out.append(("wp fault", msg.flags, msg.address - a, th.is_alive()))
        u.writeprotect(a, H, 0)
        th.join(10)
        out.append(("unprotect", bool(p.pagemap(a) & PM_UFFD_WP), _smaps_kb(p, a, "AnonHugePages"),
                    p.read(a + 0x7003, 1), th.is_alive()))
        u.writeprotect(a, PAGE_SIZE, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
        wp = [bool(p.pagemap(a + i) & PM_UFFD_WP) for i in (0, PAGE_SIZE)]
        out.append(("protect 4k", wp, _smaps_kb(p, a, "AnonHugePages")))
    finally:
        u.close()
        p.munmap(raw, 2 * H)
    return out


EXPECTED_WP_THP = [
    ("read", (1, 1, 0), 0),
    ("write", (1, 0, 1), 2048),
    ("protect 2M", [True, True], 2048),
    ("wp fault", uapi.UFFD_PAGEFAULT_FLAG_WRITE | uapi.UFFD_PAGEFAULT_FLAG_WP, 0x7000, True),
    ("unprotect", False, 2048, b"\x02", False),
    ("protect 4k", [True, False], 0),
]


@pytest.mark.parametrize("side", ["vmemu", "kernel"])
def test_uffd_wp_of_a_whole_thp_stays_in_the_pmd(side: str) -> None:
    p = vmemu.Process() if side == "vmemu" else native_thp_process()
    assert uffd_wp_thp(p) == EXPECTED_WP_THP
    if side == "vmemu":
        p.check()


def wp_async_thp(p: Any) -> list[tuple[Any, ...]]:
    """WP_ASYNC on a protected THP: a write splits the PMD and drops the bit on its page only."""
    a, raw = _thp_area(p, MADV_HUGEPAGE)
    p.write(a, b"\x01")
    u = p.userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
    try:
        u.api(uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uapi.UFFD_FEATURE_WP_ASYNC)
        u.register(a, H, uapi.UFFDIO_REGISTER_MODE_WP)
        u.writeprotect(a, H, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
        out: list[tuple[Any, ...]] = [("protected", _smaps_kb(p, a, "AnonHugePages"),
                                       bool(p.pagemap(a) & PM_UFFD_WP))]
        p.write(a + 3 * PAGE_SIZE, b"\x02")
        out.append(("written", _smaps_kb(p, a, "AnonHugePages"), bool(p.pagemap(a) & PM_UFFD_WP),
                    bool(p.pagemap(a + 3 * PAGE_SIZE) & PM_UFFD_WP)))
    finally:
        u.close()
        p.munmap(raw, 2 * H)
    return out


@pytest.mark.parametrize("side", ["vmemu", "kernel"])
def test_wp_async_write_to_a_protected_thp_splits_it(side: str) -> None:
    p = vmemu.Process() if side == "vmemu" else native_thp_process()
    assert wp_async_thp(p) == [("protected", 2048, True), ("written", 0, True, False)]
    if side == "vmemu":
        p.check()


def thp_split_zero_subpages(p: Any) -> list[tuple[Any, ...]]:
    """An immediate split of an anon THP maps its all-zero subpages to the shared zero page
    (6.12+); a partial DONTNEED only splits the PMD, the folio split is deferred."""
    from vmemu.constants import MADV_COLD

    small, small_raw = _thp_area(p, MADV_NOHUGEPAGE)
    p.read(small, 1)
    zero_pfn = p.pagemap(small) & PM_PFRAME_MASK
    a, a_raw = _thp_area(p, MADV_HUGEPAGE)
    b, b_raw = _thp_area(p, MADV_HUGEPAGE)
    out: list[tuple[Any, ...]] = []
    try:
        p.write(a, b"\x01")
        p.write(a + 9 * PAGE_SIZE, b"\x09")
        p.madvise(a + 5 * PAGE_SIZE, PAGE_SIZE, MADV_COLD)
        out.append(("cold 4k", _smaps_kb(p, a, "Rss"), _smaps_kb(p, a, "AnonHugePages"),
                    p.pagemap(a + 5 * PAGE_SIZE) & PM_PFRAME_MASK == zero_pfn, _pm(p, a),
                    p.read(a + 9 * PAGE_SIZE, 1)))
        p.write(b, b"\x01")
        p.madvise(b + 5 * PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED)
        out.append(("dontneed 4k", _smaps_kb(p, b, "Rss"), _smaps_kb(p, b, "AnonHugePages")))
    finally:
        for r in (small_raw, a_raw, b_raw):
            p.munmap(r, 2 * H)
    return out


@pytest.mark.parametrize("side", ["vmemu", "kernel"])
def test_thp_split_maps_zero_subpages_to_the_zero_page(side: str) -> None:
    p = vmemu.Process() if side == "vmemu" else native_thp_process()
    assert thp_split_zero_subpages(p) == [("cold 4k", 8, 0, True, (1, 0, 1), b"\x09"),
                                          ("dontneed 4k", 2044, 0)]
    if side == "vmemu":
        p.check()


def split_move(p: Any) -> tuple[Any, ...]:
    """UFFDIO_MOVE of a mostly-zero THP into a range that already has a PTE table: the
    THP is split at once and its zero subpages move as zero-page PTEs (no Rss at dst)."""
    src, src_raw = _thp_area(p, MADV_HUGEPAGE)
    p.write(src, b"\x5a")
    p.write(src + H - PAGE_SIZE, b"\x5b")
    dst, dst_raw = _thp_area(p, MADV_NOHUGEPAGE)
    u = p.userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
    try:
        u.api(uapi.UFFD_FEATURE_MOVE)
        u.register(dst, H, uapi.UFFDIO_REGISTER_MODE_MISSING)
        u.zeropage(dst + PAGE_SIZE, PAGE_SIZE)  # a PTE table exists at dst
        moved = []
        for off in (0, 2 * PAGE_SIZE):
            moved.append(u.move(dst + off, src + off, PAGE_SIZE if not off else H - off, 0))
        return (moved, _smaps_kb(p, dst, "Rss"), _smaps_kb(p, dst, "AnonHugePages"),
                p.read(dst, 1), p.read(dst + H - 1, 1), _smaps_kb(p, src, "Rss"))
    finally:
        u.close()
        p.munmap(src_raw, 2 * H)
        p.munmap(dst_raw, 2 * H)


@pytest.mark.parametrize("side", ["vmemu", "kernel"])
def test_split_move_moves_zero_subpages_as_zero_pages(side: str) -> None:
    p = vmemu.Process() if side == "vmemu" else native_thp_process()
    assert split_move(p) == ([PAGE_SIZE, H - 2 * PAGE_SIZE], 8, 0, b"\x5a", b"\x00", 0)
    if side == "vmemu":
        p.check()
