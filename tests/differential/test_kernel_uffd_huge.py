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
import platform
import sys
from typing import Any

import pytest

import vmemu
from vmemu.constants import MADV_DONTNEED, MAP_PRIVATE, MAP_SHARED, PROT_READ, PROT_WRITE
from vmemu.mmu.memfd import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, MFD_HUGETLB
from vmemu.mmu.proc import PM_PRESENT, PM_UFFD_WP
from vmemu.uffd import uapi

pytestmark = pytest.mark.differential

H = 2 << 20
NPAGES = 4


def _host_free_hugepages() -> int:
    free = rsvd = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    free = int(line.split()[1])
                elif line.startswith("HugePages_Rsvd:"):
                    rsvd = int(line.split()[1])
    except OSError:
        return 0
    return free - rsvd


def native_process(hugepages: int) -> Any:
    """A NativeProcess, or a skip with the reason the kernel side cannot run."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the native binding needs Linux x86-64")
    from vmemu.native import NativeProcess

    p = NativeProcess()
    try:
        p.userfaultfd(0).close()
    except OSError as e:
        pytest.skip(f"userfaultfd not permitted here: {e}")
    if _host_free_hugepages() < hugepages:
        pytest.skip(f"host hugetlb pool has fewer than {hugepages} free 2 MiB pages")
    return p


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
    p = emulated_process() if side == "vmemu" else native_process(2 * NPAGES)
    got = hugetlb_wp_zap(p, shared)
    assert got == (EXPECTED_SHARED if shared else EXPECTED_PRIVATE)
    if side == "vmemu":
        p.check()
