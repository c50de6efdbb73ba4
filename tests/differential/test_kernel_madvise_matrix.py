"""Every madvise advice on every memory type, against the real kernel: errno and contents.

For each (memory type, advice) a fresh 4-page mapping (one huge page for
hugetlb) gets a known first page, the advice over its whole length, and
then the test compares the errno, the first page's bytes as read back and
the VMA flags smaps shows (the "VmFlags" line). Memory types: private and
shared anonymous, private and shared memfd, locked, read-only, PROT_NONE,
and private/shared hugetlb when the host pool has free pages.

MADV_HWPOISON and MADV_SOFT_OFFLINE are never sent to the host (they take
real frames out of service); tests/mmu/test_hwpoison.py covers them.
"""

from __future__ import annotations

import os

import pytest

from tests.differential._kernel import ON_LINUX_X86_64, SKIP_REASON
from vmemu import (
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
)
from vmemu.constants import PMD_SIZE

pytestmark = [pytest.mark.differential,
              pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ADVICES = [*range(0, 26), 26, 27, 99]  # 0..25 known (some unused numbers), then unknown ones
DATA = b"first page data"


def _host_free_hugepages() -> int:
    try:
        free = rsvd = 0
        for line in open("/proc/meminfo"):
            if line.startswith("HugePages_Free:"):
                free = int(line.split()[1])
            if line.startswith("HugePages_Rsvd:"):
                rsvd = int(line.split()[1])
        return free - rsvd
    except OSError:
        return 0


# name: (length, prot, flags, memfd?)
TYPES: dict[str, tuple[int, int, int, bool]] = {
    "anon-private": (4 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS, False),
    "anon-shared": (4 * P, RW, MAP_SHARED | MAP_ANONYMOUS, False),
    "memfd-shared": (4 * P, RW, MAP_SHARED, True),
    "memfd-private": (4 * P, RW, MAP_PRIVATE, True),
    "anon-locked": (4 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, False),
    "anon-readonly": (4 * P, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, False),
    "anon-protnone": (4 * P, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, False),
}
if _host_free_hugepages() >= 4:
    TYPES["hugetlb-private"] = (PMD_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, False)
    TYPES["hugetlb-shared"] = (PMD_SIZE, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB, False)


def _vmflags(smaps: str, addr: int) -> list[str]:
    """The VmFlags of the VMA containing ``addr`` (it may have merged with a neighbour)."""
    inside = False
    for line in smaps.splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:
            s, e = (int(x, 16) for x in head.split("-"))
            inside = s <= addr < e
        elif inside and line.startswith("VmFlags:"):
            return sorted(line.split()[1:])
    raise AssertionError(f"no VMA at {addr:#x}")


def host_run(kind: str, advice: int) -> tuple:
    from vmemu.native import libc

    length, prot, flags, memfd = TYPES[kind]
    fd = -1
    if memfd:
        fd = os.memfd_create("matrix")
        os.ftruncate(fd, length)
    a = libc.mmap(0, length, prot, flags, fd)
    try:
        if prot & PROT_WRITE:
            libc.poke_memory(a, DATA)
        try:
            libc.madvise(a, length, advice)
            err = 0
        except OSError as e:
            err = e.errno
        data = libc.peek_memory(a, len(DATA)) if prot & PROT_READ else None
        return err, data, _vmflags(open("/proc/self/smaps").read(), a)
    finally:
        libc.munmap(a, length)
        if fd >= 0:
            os.close(fd)


def emu_run(kind: str, advice: int) -> tuple:
    length, prot, flags, memfd = TYPES[kind]
    k = Kernel()
    k.swapon(pages=64)
    k.set_nr_hugepages(4)
    p = k.spawn()
    fd = -1
    if memfd:
        fd = p.memfd_create("matrix")
        p.ftruncate(fd, length)
    a = p.mmap(0, length, prot, flags, fd)
    if prot & PROT_WRITE:
        p.write(a, DATA)
    try:
        p.madvise(a, length, advice)
        err = 0
    except OSError as e:
        err = e.errno or 0
    data = p.read(a, len(DATA)) if prot & PROT_READ else None
    out = (err, data, _vmflags(p.smaps(), a))
    p.check()
    p.exit()
    k.check()
    return out


@pytest.mark.parametrize("kind", list(TYPES))
def test_every_advice_matches_the_kernel(kind: str) -> None:
    wrong = []
    for advice in ADVICES:
        host, emu = host_run(kind, advice), emu_run(kind, advice)
        if host != emu:
            wrong.append(f"advice {advice}: kernel {host}, vmemu {emu}")
    assert not wrong, "\n".join(wrong)
