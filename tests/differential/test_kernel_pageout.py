"""MADV_PAGEOUT / MADV_COLD / MADV_WILLNEED against the real kernel.

The reference machine has no swap, so the kernel keeps anonymous and shmem
pages on PAGEOUT; vmemu is run both without swap (the same situation) and
with a swap device (pages really leave memory). Either way the bytes read
back must be the kernel's, and so must errnos, layouts and - without swap
on the vmemu side - the pagemap present/swapped bits. Lazily freed
(MADV_FREE) clean pages are discarded by PAGEOUT on both, swap or not,
and read back as zeros.

The MADV_FREE cases pin the test to one CPU: the kernel marks a folio
lazyfree through a per-CPU batch that PAGEOUT's ``lru_add_drain`` only
drains on its own CPU.
"""

from __future__ import annotations

import errno
import os

import pytest

from tests.differential._kernel import ON_LINUX_X86_64, SKIP_REASON, EmuSide, KernelSide, outcome
from vmemu import (
    MADV_COLD,
    MADV_FREE,
    MADV_PAGEOUT,
    MADV_WILLNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_LOCKED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
)
from vmemu.mmu import PM_PRESENT, PM_SWAP

pytestmark = [
    pytest.mark.differential,
    pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON),
]

P = PAGE_SIZE
PA = MAP_PRIVATE | MAP_ANONYMOUS
SA = MAP_SHARED | MAP_ANONYMOUS
RW = PROT_READ | PROT_WRITE
N = 6


@pytest.fixture(params=["emu-noswap", "emu-swap"])
def sides(request):
    kernel = Kernel()
    if request.param == "emu-swap":
        kernel.swapon(pages=64)
    k, e = KernelSide(), EmuSide(kernel.spawn())
    e.swap = request.param == "emu-swap"
    yield k, e
    k.close()
    e.close()


@pytest.fixture
def one_cpu():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs sched_setaffinity")
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    yield
    os.sched_setaffinity(0, old)


def both(k, e, op: str, *args: int):
    ko = outcome(getattr(k, op), *args)
    eo = outcome(getattr(e, op), *args)
    assert eo == ko, f"{op}{args}: kernel {ko}, vmemu {eo}"
    assert e.layout() == k.layout(), f"after {op}{args}"
    kc, ec = k.contents(), e.contents()
    assert ec.keys() == kc.keys()
    for page in kc:
        assert ec[page] == kc[page], f"page {page} differs after {op}{args}"
    e.p.check()
    return ko


def fill(k, e, npages: int, tag: int) -> None:
    for i in range(npages):
        data = bytes([(tag + i) & 0xFF]) * 100 + f"page {i} tag {tag}".encode()
        k.write(i * P + 17, data)
        e.write(i * P + 17, data)


def _pagemap(addr: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // P * 8)
        return int.from_bytes(f.read(8), "little")


def present_bits(k, e, npages: int) -> tuple[list[int], list[int]]:
    mask = PM_PRESENT | PM_SWAP
    return ([_pagemap(k.addr(i)) & mask for i in range(npages)],
            [e.p.pagemap(e.addr(i)) & mask for i in range(npages)])


@pytest.mark.parametrize("flags", [PA, SA], ids=["private-anon", "shared-anon"])
def test_pageout_then_read_back(sides, flags):
    k, e = sides
    both(k, e, "mmap", 0, N, RW, flags | MAP_FIXED)
    fill(k, e, N - 1, 1)  # the last page is never touched
    both(k, e, "madvise", 0, N, MADV_PAGEOUT)
    both(k, e, "madvise", 0, N, MADV_WILLNEED)
    both(k, e, "madvise", 1, 2, MADV_PAGEOUT)
    fill(k, e, 2, 50)  # writes after the pageout (swap-in + COW on the vmemu side)
    both(k, e, "madvise", 0, N, MADV_COLD)
    both(k, e, "madvise", 0, N, MADV_PAGEOUT)
    if not e.swap:
        kb, eb = present_bits(k, e, N)
        assert eb == kb


def test_pageout_after_fork_read_back(sides):
    k, e = sides
    both(k, e, "mmap", 0, N, RW, PA | MAP_FIXED)
    fill(k, e, N, 3)
    both(k, e, "madvise", 0, 3, MADV_PAGEOUT)
    writes = [(0, b"child wrote"), (4 * P, b"child again")]
    assert e.fork_snapshot(writes) == k.fork_snapshot(writes)
    both(k, e, "madvise", 0, N, MADV_PAGEOUT)


def test_lazyfree_pages_are_discarded_by_pageout(sides, one_cpu):
    k, e = sides
    both(k, e, "mmap", 0, N, RW, PA | MAP_FIXED)
    fill(k, e, N, 7)
    both(k, e, "madvise", 0, 4, MADV_FREE)
    k.write(3 * P, b"redirtied")
    e.write(3 * P, b"redirtied")
    both(k, e, "madvise", 0, N, MADV_PAGEOUT)
    assert k.read(0, P) == bytes(P)  # the premise: the kernel discarded it
    if not e.swap:
        kb, eb = present_bits(k, e, N)
        assert eb == kb


def test_populate_write_keeps_a_lazyfree_page(sides, one_cpu):
    """MADV_POPULATE_WRITE (and mlock's populate) over a present lazily freed page dirty it.

    GUP's FOLL_TOUCH with FOLL_WRITE marks the folio dirty
    (``follow_page_pte``), so reclaim keeps it; a read populate does not.
    """
    from vmemu import MADV_POPULATE_READ, MADV_POPULATE_WRITE

    k, e = sides
    both(k, e, "mmap", 0, 4, RW, PA | MAP_FIXED)
    fill(k, e, 4, 5)
    both(k, e, "madvise", 0, 4, MADV_FREE)
    both(k, e, "madvise", 1, 1, MADV_POPULATE_WRITE)
    both(k, e, "madvise", 2, 1, MADV_POPULATE_READ)
    both(k, e, "madvise", 0, 4, MADV_PAGEOUT)
    assert k.read(0, P) == bytes(P) and k.read(P, P) != bytes(P)  # the premise
    for page in range(4):
        assert e.read(page * P, P) == k.read(page * P, P), f"page {page}"


def test_errnos(sides):
    k, e = sides
    both(k, e, "mmap", 0, 2, RW, PA | MAP_FIXED)
    both(k, e, "mmap", 3, 1, RW, PA | MAP_FIXED | MAP_LOCKED)
    fill(k, e, 2, 9)
    for advice in (MADV_PAGEOUT, MADV_COLD, MADV_WILLNEED):
        assert both(k, e, "madvise", 0, 3, advice) == ("errno", errno.ENOMEM)  # hole at 2
        both(k, e, "madvise", 3, 1, advice)  # locked: EINVAL for PAGEOUT/COLD
        both(k, e, "madvise", 1, 0, advice)
    assert outcome(e.madvise, 3, 1, MADV_PAGEOUT) == ("errno", errno.EINVAL)
