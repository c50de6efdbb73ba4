"""PAGEMAP_SCAN over a WP_ASYNC range of 4 KiB pages, on vmemu and on Linux 6.18.

The kernel side calls the real ioctl on ``/proc/self/pagemap`` (``struct
pm_scan_arg``, no category filter, every category vmemu knows in
``return_mask``). What is compared: the regions and their categories before
write-protection (none entries count as written), after it (a uffd-wp marker
is a swap-format entry: SWAPPED, not WRITTEN), after writes, a read of the
zero page and an anon DONTNEED (the marker goes: written again), after a
``PM_SCAN_WP_MATCHING`` scan (which reports, then protects again), and after.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from uffd_harness import native_process_or_skip

import vmemu
from vmemu.constants import MADV_DONTNEED, MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from vmemu.uffd import uapi
from vmemu.uffd.wp import PM_SCAN_WP_MATCHING, PageRegion

P = PAGE_SIZE
RETURN_MASK = 0x7F  # WPALLOWED WRITTEN FILE PRESENT SWAPPED PFNZERO HUGE
PAGEMAP_SCAN = (3 << 30) | (96 << 16) | (ord("f") << 8) | 16  # _IOWR('f', 16, pm_scan_arg)


def native_scan(start: int, end: int, flags: int = 0) -> list[PageRegion]:
    """``ioctl(/proc/self/pagemap, PAGEMAP_SCAN)``: the regions it fills in."""
    vec = (ctypes.c_uint64 * (3 * 64))()
    arg = bytearray(struct.pack("<12Q", 96, flags, start, end, 0, ctypes.addressof(vec), 64,
                                0, 0, 0, 0, RETURN_MASK))
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        n = fcntl.ioctl(fd, PAGEMAP_SCAN, arg)
    finally:
        os.close(fd)
    return [PageRegion(vec[3 * i], vec[3 * i + 1], vec[3 * i + 2]) for i in range(n)]


def scenario(p: Any, scan_with: Callable[[Any], Callable[..., list[PageRegion]]]) -> list[Any]:
    a = p.mmap(0, 8 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_WP_ASYNC | uapi.UFFD_FEATURE_WP_UNPOPULATED)
    u.register(a, 8 * P, uapi.UFFDIO_REGISTER_MODE_WP)
    scan = scan_with(u)

    def regions(flags: int = 0) -> list[tuple[int, int, int]]:
        return [((r.start - a) // P, (r.end - a) // P, r.categories)
                for r in scan(a, a + 8 * P, flags)]

    p.write(a + 6 * P, b"q")
    out = [regions()]
    u.writeprotect(a, 8 * P, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    out.append(regions())
    p.write(a + P, b"x")
    p.write(a + 2 * P, b"y")
    p.read(a + 3 * P, 1)
    p.madvise(a + 5 * P, P, MADV_DONTNEED)
    out += [regions(), regions(PM_SCAN_WP_MATCHING), regions()]
    u.close()
    p.munmap(a, 8 * P)
    return out


WPALLOWED, WRITTEN, PRESENT, SWAPPED, PFNZERO = 0x1, 0x2, 0x8, 0x10, 0x20
MARKER, NONE, PAGE, PROTECTED = WPALLOWED | SWAPPED, WPALLOWED | WRITTEN, \
    WPALLOWED | WRITTEN | PRESENT, WPALLOWED | PRESENT
WRITTEN_STATE = [(0, 1, MARKER), (1, 3, PAGE), (3, 4, PROTECTED | PFNZERO), (4, 5, MARKER),
                 (5, 6, NONE), (6, 7, PROTECTED), (7, 8, MARKER)]
WANT = [
    [(0, 6, NONE), (6, 7, PAGE), (7, 8, NONE)],
    [(0, 6, MARKER), (6, 7, PROTECTED), (7, 8, MARKER)],
    WRITTEN_STATE,
    WRITTEN_STATE,
    [(0, 1, MARKER), (1, 3, PROTECTED), (3, 4, PROTECTED | PFNZERO), (4, 6, MARKER),
     (6, 7, PROTECTED), (7, 8, MARKER)],
]


def test_on_vmemu() -> None:
    p = vmemu.Process()
    assert scenario(p, lambda u: u.pagemap_scan) == WANT
    p.check()


@pytest.mark.differential
def test_on_the_kernel() -> None:
    p = native_process_or_skip()
    assert scenario(p, lambda u: native_scan) == WANT
