"""userfaultfd on THP-eligible ranges: PMD-level faults, uffd-wp in the PMD, PAGEMAP_SCAN.

The kernel-side checks of the same behaviour live in
``tests/differential/test_kernel_uffd_huge.py``.
"""

from __future__ import annotations

import vmemu
from vmemu.constants import MADV_HUGEPAGE, PAGE_SIZE, PMD_SIZE
from vmemu.uffd import uapi
from vmemu.uffd.wp import (
    PAGE_IS_HUGE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_WPALLOWED,
    PAGE_IS_WRITTEN,
    PM_SCAN_WP_MATCHING,
    PageRegion,
)

H = PMD_SIZE


def _area(p: vmemu.Process) -> int:
    raw = p.mmap(0, 2 * H)
    a = (raw + H - 1) & ~(H - 1)
    p.madvise(a, H, MADV_HUGEPAGE)
    return a


def _wp_async(p: vmemu.Process, a: int) -> object:
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uapi.UFFD_FEATURE_WP_ASYNC)
    u.register(a, H, uapi.UFFDIO_REGISTER_MODE_WP)
    return u


def test_pagemap_scan_reports_a_thp_as_one_huge_region() -> None:
    p = vmemu.Process()
    a = _area(p)
    p.write(a, b"x")
    u = _wp_async(p, a)
    base = PAGE_IS_WPALLOWED | PAGE_IS_PRESENT | PAGE_IS_HUGE
    assert u.pagemap_scan(a, a + H) == [PageRegion(a, a + H, base | PAGE_IS_WRITTEN)]
    # protecting what was written keeps the THP whole: the range covers the PMD
    u.pagemap_scan(a, a + H, PM_SCAN_WP_MATCHING)
    assert u.pagemap_scan(a, a + H) == [PageRegion(a, a + H, base)]
    assert "AnonHugePages:      2048 kB" in p.smaps()
    p.write(a + 3 * PAGE_SIZE, b"y")  # WP_ASYNC: split, only that page loses the bit
    small = PAGE_IS_WPALLOWED | PAGE_IS_PRESENT
    assert u.pagemap_scan(a, a + H) == [
        PageRegion(a, a + 3 * PAGE_SIZE, small),
        PageRegion(a + 3 * PAGE_SIZE, a + 4 * PAGE_SIZE, small | PAGE_IS_WRITTEN),
        PageRegion(a + 4 * PAGE_SIZE, a + H, small),
    ]
    p.check()


def test_pagemap_scan_of_the_huge_zero_page() -> None:
    p = vmemu.Process()
    a = _area(p)
    p.read(a, 1)
    u = _wp_async(p, a)
    cats = PAGE_IS_WPALLOWED | PAGE_IS_PRESENT | PAGE_IS_HUGE | PAGE_IS_PFNZERO | PAGE_IS_WRITTEN
    assert u.pagemap_scan(a + PAGE_SIZE, a + 3 * PAGE_SIZE) == [
        PageRegion(a + PAGE_SIZE, a + 3 * PAGE_SIZE, cats)]
    p.check()
