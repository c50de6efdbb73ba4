"""Long-term pins (``pin_user_pages(FOLL_LONGTERM)``): early COW at fork, unsharing.

A pinned page must stay the page the process maps: fork copies a pinned
exclusive anonymous page for the child at once instead of sharing it
(``copy_present_page``), and a read-only pin of a page COW could replace
first gives the mapping its own copy (``FAULT_FLAG_UNSHARE``). Every test
ends with ``check()``, which counts pins as references.
"""

from __future__ import annotations

import errno

import pytest

import vmemu
from vmemu.constants import (
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_PRIVATE,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.proc import PM_MMAP_EXCLUSIVE, PM_PFRAME_MASK

RW = PROT_READ | PROT_WRITE
PRIV = MAP_PRIVATE | MAP_ANONYMOUS


def _pfn(p: vmemu.Process, addr: int) -> int:
    return p.pagemap(addr) & PM_PFRAME_MASK


def test_fork_copies_a_pinned_page_for_the_child() -> None:
    k = vmemu.Kernel()
    p = k.spawn()
    a = p.mmap(0, 2 * PAGE_SIZE, RW, PRIV)
    p.write(a, b"pinned")
    p.write(a + PAGE_SIZE, b"shared")
    pin = p.pin_user_pages(a, PAGE_SIZE)
    child = p.fork()
    assert _pfn(child, a) != _pfn(p, a) and child.read(a, 6) == b"pinned"
    assert _pfn(child, a + PAGE_SIZE) == _pfn(p, a + PAGE_SIZE)  # unpinned: shared COW
    assert p.pagemap(a) & PM_MMAP_EXCLUSIVE and child.pagemap(a) & PM_MMAP_EXCLUSIVE
    before = _pfn(p, a)
    p.write(a, b"P")  # the parent's page was never write-protected: no COW away from the pin
    assert _pfn(p, a) == before and child.read(a, 1) == b"p"
    k.check()
    child.exit()
    p.munmap(a, 2 * PAGE_SIZE)
    k.check()  # the pinned page outlives the unmap
    pin.unpin()
    k.check()


def test_read_only_pin_unshares_a_cow_page() -> None:
    k = vmemu.Kernel()
    p = k.spawn()
    a = p.mmap(0, PAGE_SIZE, RW, PRIV)
    p.write(a, b"x")
    child = p.fork()
    shared = _pfn(p, a)
    pin = child.pin_user_pages(a, PAGE_SIZE)
    assert _pfn(child, a) != shared and _pfn(p, a) == shared
    mine = _pfn(child, a)
    child.write(a, b"y")  # exclusive now: the write reuses it
    assert _pfn(child, a) == mine and p.read(a, 1) == b"x"
    pin.unpin()
    child.exit()
    k.check()


def test_read_only_pin_of_the_zero_page_allocates() -> None:
    k = vmemu.Kernel()
    p = k.spawn()
    a = p.mmap(0, PAGE_SIZE, RW, PRIV)
    p.read(a, 1)
    zero = _pfn(p, a)
    pin = p.pin_user_pages(a, PAGE_SIZE)
    assert _pfn(p, a) != zero and p.pagemap(a) & PM_MMAP_EXCLUSIVE
    pin.unpin()
    k.check()


def test_pin_errors() -> None:
    p = vmemu.Process()
    a = p.mmap(0, PAGE_SIZE, PROT_READ, PRIV)
    with pytest.raises(OSError) as e:
        p.pin_user_pages(a, 2 * PAGE_SIZE)  # the second page is unmapped
    assert e.value.errno == errno.EFAULT
    with pytest.raises(OSError) as e:
        p.pin_user_pages(a, PAGE_SIZE, write=True)
    assert e.value.errno == errno.EFAULT
    p.check()  # the first page's pin was released again


def test_fork_splits_a_pinned_thp_and_copies_it() -> None:
    k = vmemu.Kernel()
    p = k.spawn()
    raw = p.mmap(0, 2 * PMD_SIZE, RW, PRIV)
    a = (raw + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(a, PMD_SIZE, MADV_HUGEPAGE)
    p.write(a, b"t" * PMD_SIZE)
    pin = p.pin_user_pages(a + 5 * PAGE_SIZE, PAGE_SIZE)
    child = p.fork()
    assert k.phys.vmstat["thp_split_pmd"] == 1
    assert _pfn(child, a) != _pfn(p, a) and child.read(a + PMD_SIZE - 1, 1) == b"t"
    pin.unpin()
    child.exit()
    k.check()


def test_fork_copies_a_pinned_private_hugetlb_page() -> None:
    k = vmemu.Kernel()
    k.set_nr_hugepages(4)
    p = k.spawn()
    a = p.mmap(0, PMD_SIZE, RW, PRIV | MAP_HUGETLB)
    p.write(a, b"h")
    pin = p.pin_user_pages(a, PAGE_SIZE)
    free = k.hugetlb.free_huge_pages
    child = p.fork()
    assert k.hugetlb.free_huge_pages == free - 1
    assert _pfn(child, a) != _pfn(p, a) and child.read(a, 1) == b"h"
    child.exit()
    pin.unpin()
    k.check()
