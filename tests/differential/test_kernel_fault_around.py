"""Fault-around on memfd mappings against the real kernel: which pages a read fault maps.

A read fault on a file mapping maps the cached pages of a 16-page window
around it too (``do_fault_around``). The window is aligned by PTE index, so
both sides place their mappings at the same offset from a 2 MiB boundary;
after each access the pagemap present bits of the whole mapping must agree.
"""

from __future__ import annotations

import os

import pytest

from tests.differential._kernel import ON_LINUX_X86_64, SKIP_REASON, reserve_low
from vmemu import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
)
from vmemu.constants import PMD_SIZE
from vmemu.mmu import PM_PRESENT

pytestmark = [pytest.mark.differential,
              pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

P = PAGE_SIZE
H = PMD_SIZE
RW = PROT_READ | PROT_WRITE
NPAGES = 40
CACHED = [i for i in range(NPAGES) if i % 7 != 3]  # some holes in the page cache


def _host_bits(addr: int, n: int) -> str:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // P * 8)
        raw = f.read(8 * n)
    return "".join("1" if int.from_bytes(raw[i * 8:i * 8 + 8], "little") & PM_PRESENT else "."
                   for i in range(n))


CASES = [
    # (mapping shift from a 2 MiB boundary in pages, file offset in pages, length, prot, flags,
    #  accesses: (page, write?))
    (0, 0, NPAGES, RW, MAP_SHARED, [(20, False), (3, False), (37, True), (38, False)]),
    (5, 0, NPAGES, PROT_READ, MAP_SHARED, [(0, False), (21, False)]),
    (13, 2, 30, RW, MAP_PRIVATE, [(1, False), (12, True), (14, False), (29, False)]),
    (509, 0, NPAGES, RW, MAP_SHARED, [(2, False), (4, False)]),  # the window meets a PTE table end
    (0, 0, NPAGES, RW, MAP_SHARED, [(36, False)]),  # the file ends at 38 pages (see below)
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_read_faults_map_the_same_neighbours(case: int) -> None:
    from vmemu.native import libc

    shift, pgoff, length, prot, flags, accesses = CASES[case]
    size = (NPAGES - 2) * P + 100 if case == 4 else NPAGES * P
    fd = os.memfd_create("fa")
    os.ftruncate(fd, size)
    k = Kernel()
    p = k.spawn()
    efd = p.memfd_create("fa")
    p.ftruncate(efd, size)
    for i in CACHED:
        if i * P < size:
            os.pwrite(fd, b"c%02d" % i, i * P)
            p.pwrite(efd, b"c%02d" % i, i * P)
    raw = reserve_low(2 * H + length * P)
    eraw = p.mmap(0, 2 * H + length * P, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
    try:
        a = ((raw + H - 1) & ~(H - 1)) + shift * P
        b = ((eraw + H - 1) & ~(H - 1)) + shift * P
        libc.mmap(a, length * P, prot, flags | MAP_FIXED, fd, pgoff * P)
        p.mmap(b, length * P, prot, flags | MAP_FIXED, efd, pgoff * P)
        for page, write in accesses:
            if write:
                libc.poke_memory(a + page * P, b"w")
                p.write(b + page * P, b"w")
            else:
                assert libc.peek_memory(a + page * P, 3) == p.read(b + page * P, 3)
            emu = "".join("1" if p.pagemap(b + i * P) & PM_PRESENT else "." for i in range(length))
            assert emu == _host_bits(a, length), f"{emu} after {'write' if write else 'read'} of {page}"
        p.check()
    finally:
        libc.munmap(raw, 2 * H + length * P)
        os.close(fd)
