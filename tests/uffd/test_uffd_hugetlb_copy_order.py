"""hugetlb details the uffd stateful machine found, on vmemu and on Linux 6.18.

UFFDIO_COPY: EEXIST before the source is read, an empty pool included.

``mfill_atomic_hugetlb`` refuses a populated huge PTE (EEXIST), then
``hugetlb_mfill_atomic_pte`` a page already in a shared mapping's page cache
(EEXIST), and only then copies the source, first under the locks with page
faults disabled and, when that fails, again with faults (EFAULT for a hole).
So a bad source never hides EEXIST, and an EEXIST leaves the source
untouched (no page faulted in there).

A stale uffd-wp marker: registered WP, write-protected (a marker on the empty
entry), then registered MISSING instead (the mode set is replaced, markers
stay). A read fault maps the cached page *with* the uffd-wp bit:
``hugetlb_no_page`` looks only at ``pte_marker_uffd_wp(orig_pte)``, not at the
VMA (shmem clears such a marker instead). A write after that never completes on
6.18 (``hugetlb_wp`` returns at once for a uffd-wp entry and the fault repeats
for ever); vmemu makes the entry writable, keeping the bit - the one divergence
left, and the stateful machine does not write there.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from uffd_harness import native_process_or_skip

import vmemu
from vmemu.constants import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.memfd import MFD_HUGETLB
from vmemu.mmu.proc import PM_PRESENT, PM_UFFD_WP
from vmemu.uffd import uapi

H = 2 << 20
RW = PROT_READ | PROT_WRITE


def scenario(p: Any) -> list[Any]:
    fd = p.memfd_create("copy-order", MFD_HUGETLB)
    p.ftruncate(fd, 2 * H)
    dst = p.mmap(0, 2 * H, RW, MAP_SHARED, fd, 0)
    alias = p.mmap(0, 2 * H, RW, MAP_SHARED, fd, 0)
    src = p.mmap(0, 3 * H, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    p.munmap(src + H, H)  # src: a page, a hole, an untouched page
    fresh = src + 2 * H
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_POISON)
    u.register(dst, 2 * H, uapi.UFFDIO_REGISTER_MODE_MISSING)
    out: list[Any] = []

    def copy(d: int, s: int) -> Any:
        try:
            return u.copy(d, s, H)
        except OSError as e:
            return errno.errorcode[e.errno or 0], e.struct.copy  # type: ignore[attr-defined]

    out.append(copy(dst, src))  # H
    out.append(copy(dst, src + H))  # mapped, hole as source: EEXIST
    out.append(copy(dst, fresh))  # mapped, untouched source: EEXIST ...
    out.append(bool(p.pagemap(fresh) & PM_PRESENT))  # ... and the source is not faulted in
    p.write(alias + H, b"x")  # page 1 in the page cache, not mapped at dst
    out.append(copy(dst + H, src + H))  # EEXIST
    p.madvise(dst, H, MADV_DONTNEED)
    u.poison(dst, H)  # a poison marker over a cached page
    out.append(copy(dst, src + H))  # EEXIST (the page cache)
    u.close()
    for a, n in ((dst, 2 * H), (alias, 2 * H), (src, H), (fresh, H)):
        p.munmap(a, n)
    p.close(fd)
    return out


WANT = [H, ("EEXIST", -errno.EEXIST), ("EEXIST", -errno.EEXIST), False,
        ("EEXIST", -errno.EEXIST), ("EEXIST", -errno.EEXIST)]


def stale_marker(p: Any) -> list[Any]:
    fd = p.memfd_create("stale-marker", MFD_HUGETLB)
    p.ftruncate(fd, H)
    dst = p.mmap(0, H, RW, MAP_SHARED, fd, 0)
    alias = p.mmap(0, H, RW, MAP_SHARED, fd, 0)
    p.write(alias, b"cached!!")
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_SIGBUS | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    u.register(dst, H, uapi.UFFDIO_REGISTER_MODE_WP)
    u.writeprotect(dst, H, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    u.register(dst, H, uapi.UFFDIO_REGISTER_MODE_MISSING)
    out = [p.pagemap(dst) & (PM_PRESENT | PM_UFFD_WP)]  # the marker
    out.append(p.read(dst, 8))
    out.append(p.pagemap(dst) & (PM_PRESENT | PM_UFFD_WP))  # mapped, uffd-wp
    u.close()
    p.munmap(dst, H)
    p.munmap(alias, H)
    p.close(fd)
    return out


def zap_keeps_markers(p: Any) -> list[Any]:
    """MADV_DONTNEED of a hugetlb VMA no longer registered for WP: the uffd-wp page and the
    marker both stay uffd-wp markers (``__unmap_hugepage_range`` without
    ZAP_FLAG_DROP_MARKER checks no registration; shmem's present pages would lose it)."""
    fd = p.memfd_create("zap-markers", MFD_HUGETLB)
    p.ftruncate(fd, 2 * H)
    dst = p.mmap(0, 2 * H, RW, MAP_SHARED, fd, 0)
    alias = p.mmap(0, 2 * H, RW, MAP_SHARED, fd, 0)
    p.write(alias, b"x")
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_SIGBUS | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    u.register(dst, 2 * H, uapi.UFFDIO_REGISTER_MODE_WP)
    p.read(dst, 1)
    u.writeprotect(dst, 2 * H, uapi.UFFDIO_WRITEPROTECT_MODE_WP)  # a page, a marker
    u.register(dst, 2 * H, uapi.UFFDIO_REGISTER_MODE_MINOR)
    p.madvise(dst, 2 * H, MADV_DONTNEED)
    out = [p.pagemap(dst + k * H) & (PM_PRESENT | PM_UFFD_WP) for k in range(2)]
    u.close()
    p.munmap(dst, 2 * H)
    p.munmap(alias, 2 * H)
    p.close(fd)
    return out


def copy_empty_pool(p: Any, free: int) -> list[Any]:
    """An empty pool makes a COPY EEXIST on 6.18 (not ENOMEM), private or shared, before a
    bad source is EFAULT: ``hugetlb_mfill_atomic_pte`` allocates the page before it copies
    the source, and an allocation failure where the huge PTE slot exists (it always does:
    ``mfill_atomic_hugetlb`` allocated it) is taken for a racing fill."""
    resv = p.mmap(0, free * H, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB)  # every free page
    out: list[Any] = []
    for share in (MAP_PRIVATE, MAP_SHARED):
        dst = p.mmap(0, H, RW, share | MAP_ANONYMOUS | MAP_HUGETLB | MAP_NORESERVE)
        src = p.mmap(0, 2 * H, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        p.munmap(src + H, H)  # a page, then a hole
        u = p.userfaultfd(uapi.O_NONBLOCK)
        u.api(0)
        u.register(dst, H, uapi.UFFDIO_REGISTER_MODE_MISSING)
        for s in (src, src + H):
            try:
                out.append(u.copy(dst, s, H))
            except OSError as e:
                out.append((errno.errorcode[e.errno or 0], e.struct.copy))  # type: ignore[attr-defined]
        u.close()
        p.munmap(dst, H)
        p.munmap(src, H)
    p.munmap(resv, free * H)
    return out


SCENARIOS = {
    "copy_empty_pool": (copy_empty_pool, [("EEXIST", -errno.EEXIST)] * 4),
    "zap_keeps_markers": (zap_keeps_markers, [PM_UFFD_WP, PM_UFFD_WP]),
    "copy_eexist_before_source": (scenario, WANT),
    "stale_marker_read": (stale_marker, [PM_UFFD_WP, b"cached!!", PM_PRESENT | PM_UFFD_WP]),
}
#: scenarios that take the pool's free (unreserved) page count, to reserve them all
NEEDS_FREE = {"copy_empty_pool"}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_on_vmemu(name: str) -> None:
    k = vmemu.Kernel()
    k.set_nr_hugepages(4)
    p = k.spawn()
    fn, want = SCENARIOS[name]
    assert (fn(p, 4) if name in NEEDS_FREE else fn(p)) == want
    p.check()


@pytest.mark.differential
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_on_the_kernel(name: str) -> None:
    p = native_process_or_skip()
    with open("/proc/meminfo") as f:
        info = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith("HugePages_")}
    if info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0) < 4:
        pytest.skip("host hugetlb pool has fewer than 4 free 2 MiB pages")
    fn, want = SCENARIOS[name]
    free = info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0)
    assert (fn(p, free) if name in NEEDS_FREE else fn(p)) == want
