"""mmap(2) and munmap(2) on an emulated process: placement, flags, every errno."""

from __future__ import annotations

import errno

import pytest

from vmemu import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MMAP_MIN_ADDR,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
    Process,
)
from vmemu.mmu.vma import VM_ACCOUNT, VM_NORESERVE, VM_SHARED

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
PA = MAP_PRIVATE | MAP_ANONYMOUS


def errno_of(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


@pytest.fixture
def p():
    proc = Process()
    yield proc
    proc.check()


def test_anonymous_private_mapping(p):
    a = p.mmap(0, 3 * P, RW, PA)
    assert a % P == 0 and a + 3 * P <= TASK_SIZE
    (v,) = p.mm.vmas
    assert (v.vm_start, v.vm_end) == (a, a + 3 * P) and v.vm_pgoff == a // P
    assert v.vm_flags & VM_ACCOUNT and not v.vm_flags & VM_SHARED
    assert p.read(a, 3 * P) == bytes(3 * P)


def test_length_is_rounded_up(p):
    a = p.mmap(0, 1, RW, PA)
    assert p.mm.vmas.vma_lookup(a).vm_end == a + P


def test_mappings_go_top_down_and_2mib_multiples_are_pmd_aligned(p):
    a = p.mmap(0, P)
    b = p.mmap(0, P)
    assert b == a - P
    c = p.mmap(0, 2 * PMD_SIZE)
    assert c % PMD_SIZE == 0


def test_shared_anonymous_mapping(p):
    a = p.mmap(0, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    v = p.mm.vmas.vma_lookup(a)
    assert v.vm_flags & VM_SHARED and v.vm_file is not None and v.vm_pgoff == 0
    assert p.maps().split()[1] == "rw-s"


def test_hint_is_honoured_when_free(p):
    hint = 0x5000_0000
    assert p.mmap(hint, P) == hint
    other = p.mmap(hint, P)
    assert other != hint
    assert p.mmap(hint + P + 123, P) == hint + P  # rounded down, then free


def test_hint_below_mmap_min_addr_is_raised(p):
    assert p.mmap(P, P) >= MMAP_MIN_ADDR


def test_map_fixed_replaces(p):
    a = p.mmap(0, 4 * P)
    p.write(a + P, b"old")
    assert p.mmap(a + P, P, PROT_READ, PA | MAP_FIXED) == a + P
    assert p.read(a + P, 3) == bytes(3)
    assert len(p.mm.vmas) == 3


def test_map_fixed_noreplace(p):
    a = p.mmap(0, 2 * P)
    assert errno_of(p.mmap, a + P, 2 * P, RW, PA | MAP_FIXED_NOREPLACE) == errno.EEXIST
    assert len(p.mm.vmas) == 1
    assert p.mmap(a + 2 * P, P, RW, PA | MAP_FIXED_NOREPLACE) == a + 2 * P


def test_map_fixed_noreplace_below_min_addr_is_not_moved(p):
    assert errno_of(p.mmap, P, P, RW, PA | MAP_FIXED_NOREPLACE) == errno.EPERM


def test_map_populate_faults_in_writable_pages(p):
    a = p.mmap(0, 4 * P, RW, PA | MAP_POPULATE)
    assert p.statistics().anon_pages == 4
    b = p.mmap(0, 2 * P, PROT_READ, PA | MAP_POPULATE)
    assert p.statistics().anon_pages == 4  # read-only: zero page
    assert p.pagemap(b) >> 63 == 1
    c = p.mmap(0, 2 * P, PROT_NONE, PA | MAP_POPULATE)  # errors ignored
    assert p.pagemap(c) == 0 and a


def test_map_noreserve_is_not_accounted(p):
    a = p.mmap(0, P, RW, PA | MAP_NORESERVE)
    v = p.mm.vmas.vma_lookup(a)
    assert v.vm_flags & VM_NORESERVE and not v.vm_flags & VM_ACCOUNT
    assert " nr " in p.smaps() and " ac " not in p.smaps()


@pytest.mark.parametrize("length", [0, 1 << 64])
def test_zero_length_is_einval(p, length):
    assert errno_of(p.mmap, 0, length, RW, PA) == errno.EINVAL


@pytest.mark.parametrize("flags", [MAP_ANONYMOUS, MAP_ANONYMOUS | 0xF,
                                   MAP_SHARED_VALIDATE | MAP_ANONYMOUS,
                                   MAP_SHARED | MAP_ANONYMOUS | MAP_GROWSDOWN])
def test_bad_flags_are_einval(p, flags):
    assert errno_of(p.mmap, 0, P, RW, flags) == errno.EINVAL
    assert len(p.mm.vmas) == 0


def test_unaligned_fixed_address_and_offset_are_einval(p):
    assert errno_of(p.mmap, 0x5000_0001, P, RW, PA | MAP_FIXED) == errno.EINVAL
    assert errno_of(p.mmap, 0, P, RW, PA, -1, 1) == errno.EINVAL


def test_no_file_without_map_anonymous_is_ebadf(p):
    assert errno_of(p.mmap, 0, P, RW, MAP_PRIVATE) == errno.EBADF
    assert errno_of(p.mmap, 0, P, RW, MAP_PRIVATE, 99) == errno.EBADF


@pytest.mark.parametrize("length", [1 << 62, TASK_SIZE + P, -1, (1 << 64) - 10])
def test_huge_lengths_are_enomem(p, length):
    assert errno_of(p.mmap, 0, length, RW, PA) == errno.ENOMEM


def test_fixed_beyond_task_size_is_enomem(p):
    assert errno_of(p.mmap, TASK_SIZE, P, RW, PA | MAP_FIXED) == errno.ENOMEM
    assert errno_of(p.mmap, -P, P, RW, PA | MAP_FIXED) == errno.ENOMEM


def test_enomem_when_no_room(p):
    p.mm.mmap_base = MMAP_MIN_ADDR + 4 * P
    p.mmap(0, 3 * P)
    assert errno_of(p.mmap, 0, 2 * P, RW, PA) == errno.ENOMEM
    p.mmap(0, P)


def test_max_map_count(p):
    p.mm.max_map_count = 2
    a = p.mmap(0, P)
    p.mmap(a - 2 * P, P)
    p.mmap(a - 4 * P, P)
    assert errno_of(p.mmap, a - 6 * P, P, RW, PA) == errno.ENOMEM


def test_hugetlb_with_empty_pool_is_enomem(p):
    assert errno_of(p.mmap, 0, PMD_SIZE, RW, PA | MAP_HUGETLB) == errno.ENOMEM


def test_failed_mmap_changes_nothing(p):
    a = p.mmap(0, 2 * P)
    p.write(a, b"keep")
    before = p.maps()
    for args in [(a, P, RW, PA | MAP_FIXED_NOREPLACE), (a, 0, RW, PA | MAP_FIXED),
                 (a, P, RW, MAP_ANONYMOUS | MAP_FIXED)]:
        with pytest.raises(OSError):
            p.mmap(*args)
    assert p.maps() == before and p.read(a, 4) == b"keep"


# -- munmap -------------------------------------------------------------------------


def test_munmap_partial_splits_and_frees(p):
    a = p.mmap(0, 4 * P)
    for i in range(4):
        p.write(a + i * P, b"x")
    used = p.kernel.memory_statistics().pages_in_use
    p.munmap(a + P, 2 * P)
    assert [(v.vm_start - a) // P for v in p.mm.vmas] == [0, 3]
    assert p.kernel.memory_statistics().pages_in_use == used - 2
    p.check()


def test_munmap_holes_are_fine(p):
    a = p.mmap(0, P)
    p.munmap(a - 8 * P, 16 * P)
    p.munmap(a, P)
    assert len(p.mm.vmas) == 0


def test_munmap_frees_page_tables(p):
    a = p.mmap(0x4000_0000, 2 * P, RW, PA | MAP_FIXED)
    p.write(a, b"x")
    tables = p.statistics().page_tables
    assert tables == 4
    p.munmap(a, 2 * P)
    assert p.statistics().page_tables == 1  # only the PGD is left
    assert p.kernel.memory_statistics().page_tables == 1


@pytest.mark.parametrize("addr,length", [(0x5000_0001, P), (0x5000_0000, 0),
                                         (0x5000_0000, 1 << 62), (0x5000_0000, -1),
                                         (TASK_SIZE + P, P), (-P, P)])
def test_munmap_einval(p, addr, length):
    assert errno_of(p.munmap, addr, length) == errno.EINVAL


def test_exit_frees_everything(p):
    q = Process(p.kernel)
    a = q.mmap(0, 8 * P)
    b = q.mmap(0, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    for i in range(8):
        q.write(a + i * P, b"x")
    q.write(b, b"s")
    q.exit()
    stats = p.kernel.memory_statistics()
    assert stats.folios == 0 and stats.pages_in_use == 0
    assert stats.page_tables == 1  # p's PGD
