"""UFFDIO_COPY on hugetlb: EEXIST before the source is read, on vmemu and on Linux 6.18.

``mfill_atomic_hugetlb`` refuses a populated huge PTE (EEXIST), then
``hugetlb_mfill_atomic_pte`` a page already in a shared mapping's page cache
(EEXIST), and only then copies the source, first under the locks with page
faults disabled and, when that fails, again with faults (EFAULT for a hole).
So a bad source never hides EEXIST, and an EEXIST leaves the source
untouched (no page faulted in there). Found by the uffd stateful machine.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

import pytest

import vmemu
from vmemu.constants import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.memfd import MFD_HUGETLB
from vmemu.mmu.proc import PM_PRESENT
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


def test_on_vmemu() -> None:
    k = vmemu.Kernel()
    k.set_nr_hugepages(4)
    p = k.spawn()
    assert scenario(p) == WANT
    p.check()


@pytest.mark.differential
def test_on_the_kernel() -> None:
    if sys.platform != "linux":
        pytest.skip("the native binding needs Linux")
    from vmemu.native import NativeProcess

    with open("/proc/meminfo") as f:
        info = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith("HugePages_")}
    if info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0) < 4:
        pytest.skip("host hugetlb pool has fewer than 4 free 2 MiB pages")
    p = NativeProcess()
    try:
        p.userfaultfd(0).close()
    except OSError as e:
        pytest.skip(f"userfaultfd not permitted here: {e}")
    assert scenario(p) == WANT
