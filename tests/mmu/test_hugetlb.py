"""hugetlb: the pool, reservations, alignment errnos, faults, SIGBUS, private COW, /proc.

The pool here is the emulated one (``kernel.set_nr_hugepages``); the host's
is never touched.
"""

from __future__ import annotations

import errno

import pytest

from vmemu.constants import (
    BUS_ADRERR,
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_HUGE_1GB,
    MAP_HUGETLB,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.errors import Sigbus, Sigsegv
from vmemu.kernel import Kernel
from vmemu.mmu import proc
from vmemu.mmu.hugetlb import hugetlb_file_setup
from vmemu.mmu.pgtable import _PAGE_PSE

H = PMD_SIZE
PRIV = MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB
SHARED = MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB


def _kernel(n: int = 4):
    k = Kernel()
    assert k.set_nr_hugepages(n) == n
    return k, k.spawn()


def _counts(k: Kernel) -> tuple[int, int, int]:
    s = k.hugetlb.statistics()
    return s.nr_hugepages, s.free_huge_pages, s.resv_huge_pages


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


def test_empty_pool_mmap_is_enomem_unless_noreserve() -> None:
    k = Kernel()
    p = k.spawn()
    assert _errno(p.mmap, 0, H, PROT_READ | PROT_WRITE, PRIV) == errno.ENOMEM
    a = p.mmap(0, H, PROT_READ | PROT_WRITE, PRIV | MAP_NORESERVE)
    with pytest.raises(Sigbus) as e:
        p.write(a, b"x")
    assert e.value.si_code == BUS_ADRERR and e.value.si_addr == a
    k.check()


def test_length_rounded_up_and_reserved() -> None:
    k, p = _kernel()
    a = p.mmap(0, PAGE_SIZE, PROT_READ | PROT_WRITE, PRIV)
    assert a % H == 0
    line = p.maps().splitlines()[0]
    assert line.endswith("/anon_hugepage (deleted)") and int(line.split("-")[1][:12], 16) - a == H
    assert _counts(k) == (4, 4, 1)
    p.write(a + 100, b"hi")
    assert _counts(k) == (4, 3, 0)
    assert p.read(a + 100, 2) == b"hi"
    k.check()
    p.munmap(a, H)
    assert _counts(k) == (4, 4, 0)
    k.check()


def test_reservation_exhaustion() -> None:
    k, p = _kernel(2)
    p.mmap(0, 2 * H, PROT_READ | PROT_WRITE, PRIV)
    assert _errno(p.mmap, 0, H, PROT_READ | PROT_WRITE, SHARED) == errno.ENOMEM
    b = p.mmap(0, H, PROT_READ | PROT_WRITE, PRIV | MAP_NORESERVE)
    with pytest.raises(Sigbus):  # free pages are all promised to the first mapping
        p.write(b, b"x")


def test_alignment_errnos() -> None:
    k, p = _kernel()
    a = p.mmap(0, 2 * H, PROT_READ | PROT_WRITE, PRIV)
    rw = PROT_READ | PROT_WRITE
    assert _errno(p.mmap, a + PAGE_SIZE, H, rw, PRIV | MAP_FIXED) == errno.EINVAL
    assert _errno(p.mmap, 0, H, rw, PRIV, -1, PAGE_SIZE) == errno.EINVAL
    assert _errno(p.munmap, a, PAGE_SIZE) == errno.EINVAL
    assert _errno(p.munmap, a + PAGE_SIZE, H) == errno.EINVAL
    assert _errno(p.mprotect, a, PAGE_SIZE, PROT_READ) == errno.EINVAL
    assert _errno(p.madvise, a + PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED) == errno.EINVAL
    p.madvise(a, PAGE_SIZE, MADV_DONTNEED)  # end rounds down to nothing: fine
    assert _errno(p.mmap, 0, H, rw, PRIV | (16 << 26)) == errno.EINVAL
    assert _errno(p.mmap, 0, H, rw, PRIV | MAP_HUGE_1GB) == errno.ENOMEM  # no 1 GiB pages
    assert len(p.maps().splitlines()) == 1
    k.check()


def test_mprotect_whole_page_and_dontneed() -> None:
    k, p = _kernel()
    a = p.mmap(0, 2 * H, PROT_READ | PROT_WRITE, PRIV)
    p.write(a, b"x")
    p.write(a + H, b"y")
    p.mprotect(a, H, PROT_READ)
    assert p.read(a, 1) == b"x"
    with pytest.raises(Sigsegv):  # read-only now
        p.write(a, b"z")
    p.madvise(a + H, H, MADV_DONTNEED)
    assert p.read(a + H, 1) == b"\0"
    k.check()


def test_smaps_hugetlb_fields() -> None:
    k, p = _kernel()
    a = p.mmap(0, H, PROT_READ | PROT_WRITE, PRIV)
    p.write(a, b"x")
    s = proc.smaps(p.mm)
    assert "KernelPageSize:     2048 kB" in s and "Private_Hugetlb:    2048 kB" in s
    assert "Rss:                   0 kB" in s and "AnonHugePages:         0 kB" in s
    assert s.rstrip().endswith("ht")
    e = proc.pagemap_entry(p.mm, a + 3 * PAGE_SIZE)
    assert e & proc.PM_PRESENT and p.mm.pgtables.walk(a)[2].entry & _PAGE_PSE


def test_shared_mapping_survives_fork() -> None:
    k, p = _kernel()
    a = p.mmap(0, H, PROT_READ | PROT_WRITE, SHARED)
    p.write(a, b"one")
    c = p.fork()
    assert c.read(a, 3) == b"one"
    c.write(a, b"two")
    assert p.read(a, 3) == b"two"
    assert "Shared_Hugetlb:     2048 kB" in proc.smaps(p.mm)
    k.check()
    c.exit()
    p.exit()
    assert _counts(k) == (4, 4, 0)
    k.check()


def test_private_cow_after_fork() -> None:
    k, p = _kernel(3)
    a = p.mmap(0, H, PROT_READ | PROT_WRITE, PRIV)
    p.write(a, b"parent")
    c = p.fork()
    k.check()
    c.write(a, b"child!")
    assert p.read(a, 6) == b"parent" and c.read(a, 6) == b"child!"
    assert _counts(k) == (3, 1, 0)
    k.check()
    c.exit()
    k.check()
    assert _counts(k) == (3, 2, 0)


def test_child_cow_sigbus_when_pool_empty() -> None:
    k, p = _kernel(1)
    a = p.mmap(0, H, PROT_READ | PROT_WRITE, PRIV)
    p.write(a, b"x")
    c = p.fork()
    with pytest.raises(Sigbus):
        c.write(a, b"y")
    assert c.read(a, 1) == b"x"
    k.check()


def test_owner_steals_page_back_from_child() -> None:
    k, p = _kernel(1)
    a = p.mmap(0, H, PROT_READ | PROT_WRITE, PRIV)
    p.write(a, b"x")
    c = p.fork()
    p.write(a, b"P")  # no free page: unmap_ref_private takes it from the child
    assert p.read(a, 1) == b"P"
    with pytest.raises(Sigbus):
        c.read(a, 1)
    k.check()


def test_pool_shrink_makes_surplus() -> None:
    k, p = _kernel(2)
    a = p.mmap(0, H, PROT_READ | PROT_WRITE, PRIV)
    p.write(a, b"x")
    assert k.set_nr_hugepages(0) == 0
    s = k.hugetlb.statistics()
    assert (s.nr_hugepages, s.free_huge_pages, s.surplus_huge_pages) == (1, 0, 1)
    p.munmap(a, H)
    s = k.hugetlb.statistics()
    assert (s.nr_hugepages, s.free_huge_pages, s.surplus_huge_pages) == (0, 0, 0)
    assert k.memory_statistics().pages_in_use == 0


def test_hugetlbfs_file_shared_and_private() -> None:
    k, p = _kernel()
    inode = hugetlb_file_setup(k, 0, "memfd:big")
    inode.file_refs += 1
    a = p.mm.mmap(0, H, PROT_READ | PROT_WRITE, MAP_SHARED, inode, 0)
    assert inode.i_size == H  # a writable shared mapping grows i_size
    p.write(a, b"data")
    b = p.mm.mmap(0, H, PROT_READ | PROT_WRITE, MAP_PRIVATE, inode, 0)
    assert p.read(b, 4) == b"data"
    p.write(b, b"priv")
    assert p.read(a, 4) == b"data" and p.read(b, 4) == b"priv"
    assert "/memfd:big (deleted)" in p.maps()
    with pytest.raises(OSError) as e:
        inode.set_size(PAGE_SIZE)
    assert e.value.errno == errno.EINVAL
    k.check()
    inode.set_size(0)
    with pytest.raises(Sigbus):
        p.read(a, 1)
    k.check()


def test_gigantic_pages() -> None:
    k = Kernel()
    k.set_nr_hugepages(1, size=1 << 30)
    p = k.spawn()
    a = p.mmap(0, PAGE_SIZE, PROT_READ | PROT_WRITE, PRIV | MAP_HUGE_1GB)
    assert a % (1 << 30) == 0
    p.write(a + (1 << 29), b"g")
    assert p.read(a + (1 << 29), 1) == b"g" and "KernelPageSize:  1048576 kB" in proc.smaps(p.mm)
    p.munmap(a, 1 << 30)
    assert k.hugetlb.statistics(1 << 30).free_huge_pages == 1


def test_punch_hole_drops_whole_huge_pages() -> None:
    k, p = _kernel()
    inode = hugetlb_file_setup(k, 0, "memfd:hole")
    inode.file_refs += 1
    a = p.mm.mmap(0, 2 * H, PROT_READ | PROT_WRITE, MAP_SHARED, inode, 0)
    p.write(a, b"A")
    p.write(a + H, b"B")
    inode.drop_range(1, 2 * (H // PAGE_SIZE))  # covers only the second huge page whole
    assert p.read(a, 1) == b"A" and p.read(a + H, 1) == b"\0"
    assert len(inode.huge) == 2  # the read refaulted a fresh zeroed page
    k.check()


def test_merge_never_removes_a_whole_hugetlb_vma() -> None:
    """A VMA with a vm_ops->close hook is not deleted by a merge (can_merge_remove_vma):
    mprotect of a whole hugetlb VMA back to its neighbour's protection leaves two VMAs;
    changing only part of one lets the neighbour grow (as 6.18 does, see
    tests/differential/test_kernel_hugetlb_sequences.py)."""
    k, p = _kernel(8)
    rw = PROT_READ | PROT_WRITE
    a = p.mmap(0, 2 * H, rw, SHARED)
    p.mprotect(a, H, PROT_READ)
    p.mprotect(a, H, rw)
    assert [(v.vm_start - a, v.vm_end - a) for v in p.mm.vmas] == [(0, H), (H, 2 * H)]
    b = p.mmap(0, 3 * H, rw, SHARED)
    p.mprotect(b, 2 * H, PROT_READ)
    p.mprotect(b + H, H, rw)  # part of the first VMA: it shrinks, the next one grows
    assert [(v.vm_start - b, v.vm_end - b) for v in p.mm.vmas if b <= v.vm_start < b + 3 * H] == \
        [(0, H), (H, 3 * H)]
    k.check()
