"""MADV_HWPOISON: memory_failure unmaps a page everywhere; accesses get SIGBUS BUS_MCEERR_AR."""

from __future__ import annotations

import errno

import pytest

from vmemu import MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, Process
from vmemu.constants import (
    BUS_MCEERR_AR,
    MADV_DONTNEED,
    MADV_HWPOISON,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.errors import Sigbus
from vmemu.mmu.folio import PG
from vmemu.mmu.pgtable import SWP_HWPOISON, pte_pfn, swp_offset, swp_type

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
BASE = 0x400000000


@pytest.fixture
def p():
    proc = Process()
    yield proc
    proc.check()
    proc.exit()


def poison(p: Process, addr: int, n: int = 1) -> Sigbus | None:
    try:
        p.madvise(addr, n * P, MADV_HWPOISON)
    except Sigbus as s:
        return s
    return None


def test_dirty_anon_page_signals_the_caller_and_every_access(p):
    a = p.mmap(BASE, 2 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    p.write(a, b"data")
    p.write(a + P, b"more")
    pfn = pte_pfn(p.walk(a)[-1].entry)
    sig = poison(p, a)
    assert sig is not None and sig.si_code == BUS_MCEERR_AR and sig.si_addr == a
    e = p.walk(a)[-1].entry
    assert swp_type(e) == SWP_HWPOISON and swp_offset(e) == pfn
    assert p.mm.phys.mem_map[pfn].flags & PG.hwpoison
    p.check()
    for write in (False, True):
        with pytest.raises(Sigbus) as s:
            p.touch(a + 8, write)
        assert s.value.si_code == BUS_MCEERR_AR and s.value.si_addr == a + 8
    assert p.read(a + P, 4) == b"more"
    with pytest.raises(OSError) as err:
        p.madvise(a, P, MADV_HWPOISON)  # GUP now meets the poison
    assert err.value.errno == 133  # EHWPOISON
    p.madvise(a, P, MADV_DONTNEED)  # the entry goes; the page reads as zero again
    assert p.read(a, 4) == bytes(4)


def test_cow_shared_page_is_unmapped_from_parent_and_child(p):
    a = p.mmap(BASE, P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    p.write(a, b"x")
    child = p.fork()
    assert poison(p, a) is not None
    p.check()
    with pytest.raises(Sigbus):
        child.read(a, 1)
    grandchild = child.fork()  # the hwpoison entry is copied at fork
    with pytest.raises(Sigbus):
        grandchild.read(a, 1)
    grandchild.exit()
    child.exit()


def test_shmem_page_stays_poisoned_in_the_page_cache(p):
    a = p.mmap(BASE, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED)
    p.write(a, b"s")
    child = p.fork()
    assert poison(p, a) is not None  # dirty
    with pytest.raises(Sigbus):
        child.read(a, 1)
    p.madvise(a, P, MADV_DONTNEED)
    with pytest.raises(Sigbus) as s:  # refault finds the poisoned cache page
        p.read(a, 1)
    assert s.value.si_code == BUS_MCEERR_AR
    child.exit()


def test_clean_shmem_page_does_not_signal_at_injection(p):
    a = p.mmap(BASE, P, PROT_READ, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED)
    assert poison(p, a) is None  # GUP read-faulted a clean page
    with pytest.raises(Sigbus):
        p.read(a, 1)


def test_errors(p):
    a = p.mmap(BASE, P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    b = p.mmap(BASE + 2 * P, P, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    for addr, want in ((BASE + P, errno.EFAULT), (b, errno.EFAULT), (a, errno.EBUSY)):
        with pytest.raises(OSError) as e:
            p.madvise(addr, P, MADV_HWPOISON)  # unpopulated private page: the zero page
        assert e.value.errno == want
    with pytest.raises(OSError) as e:
        p.madvise(a + 1, P, MADV_HWPOISON)
    assert e.value.errno == errno.EINVAL
    p.write(a, b"x")
    p.capable_sys_admin = False
    with pytest.raises(OSError) as e:
        p.madvise(a, P, MADV_HWPOISON)
    assert e.value.errno == errno.EPERM
    assert p.read(a, 1) == b"x"


def test_munmap_and_exit_after_poison(p):
    a = p.mmap(BASE, 4 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    for i in range(4):
        p.write(a + i * P, b"y")
    assert poison(p, a + P, 2) is not None
    p.check()
    p.munmap(a, 4 * P)
    p.check()


def test_populate_errno_over_a_poisoned_page(p):
    """MADV_POPULATE_* asks for FOLL_HWPOISON (EHWPOISON); mlock's populate does not (EFAULT -> ENOMEM).

    ``vm_fault_to_errno`` in mm/gup.c; vmemu gave mlock EHWPOISON (found by
    the memtypes stateful machine).
    """
    a = p.mmap(BASE, 2 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    p.write(a, b"data")
    assert poison(p, a) is not None
    for advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
        with pytest.raises(OSError) as err:
            p.madvise(a, 2 * P, advice)
        assert err.value.errno == 133  # EHWPOISON
    with pytest.raises(OSError) as err:
        p.mlock(a, 2 * P)
    assert err.value.errno == errno.ENOMEM
    p.check()


def test_memfd_io_over_a_poisoned_page(p):
    """pread/pwrite stop at a poisoned page cache page: EIO, or the bytes before it.

    ``shmem_file_read_iter`` checks PageHWPoison and ``shmem_write_begin``
    ``folio_contain_hwpoisoned_page``; ``generic_perform_write`` returns the
    bytes written before the failure, as the read loop does.
    """
    fd = p.memfd_create("f")
    p.ftruncate(fd, 3 * P)
    a = p.mmap(BASE, 3 * P, RW, MAP_SHARED | MAP_FIXED, fd, 0)
    p.write(a, b"a" * (3 * P))
    assert poison(p, a + P) is not None  # dirty
    assert p.pread(fd, 2 * P, 0) == b"a" * P  # stops before the poisoned page
    assert p.pread(fd, 8, 2 * P) == b"a" * 8  # the page after is fine
    for call in (lambda: p.pread(fd, 8, P + 5), lambda: p.pwrite(fd, b"x", P + 5)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EIO
    assert p.pwrite(fd, b"y" * (P + 2), P - 2) == 2  # the two bytes before the page
    assert p.pread(fd, 2, P - 2) == b"yy"


def test_a_punched_hole_keeps_hwpoison_entries(p):
    """A hole punch (``even_cows`` false) leaves hwpoison entries; the file page is a hole again.

    ``zap_nonpresent_ptes`` keeps a hwpoison entry unless
    ``should_zap_cows``: the mapping that had the page mapped still gets
    SIGBUS, a new mapping of the same offset reads zeros, ftruncate drops
    the entry.
    """
    from vmemu.mmu.memfd import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

    fd = p.memfd_create("f")
    p.ftruncate(fd, 2 * P)
    a = p.mmap(BASE, 2 * P, RW, MAP_SHARED | MAP_FIXED, fd, 0)
    p.write(a, b"z")
    assert poison(p, a) is not None
    p.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, P)
    assert p.pread(fd, 1, 0) == b"\0"
    b = p.mmap(BASE + 4 * P, P, RW, MAP_SHARED | MAP_FIXED, fd, 0)
    assert p.read(b, 1) == b"\0"
    with pytest.raises(Sigbus) as s:
        p.read(a, 1)
    assert s.value.si_code == BUS_MCEERR_AR
    p.ftruncate(fd, 0)
    p.ftruncate(fd, 2 * P)
    assert p.read(a, 1) == b"\0"


def test_pagemap_of_a_hwpoison_entry(p):
    """pagemap shows a hwpoison entry as swapped: PM_SWAP, type SWP_HWPOISON, offset the pfn.

    ``pte_to_pagemap_entry`` treats every non-present entry as a swap
    entry; a pfn swap entry names its page, so a page cache page is PM_FILE.
    """
    from vmemu.mmu.pgtable import MAX_SWAPFILES_SHIFT

    a = p.mmap(BASE, P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    fd = p.memfd_create("f")
    p.ftruncate(fd, P)
    b = p.mmap(BASE + 2 * P, P, RW, MAP_SHARED | MAP_FIXED, fd, 0)
    for addr in (a, b):
        p.write(addr, b"q")
        pfn = p.pagemap(addr) & ((1 << 55) - 1)
        poison(p, addr)
        entry = p.pagemap(addr)
        assert entry >> 63 & 1 == 0 and entry >> 62 & 1 == 1
        assert entry >> 61 & 1 == (addr == b)  # PM_FILE
        assert entry & ((1 << 55) - 1) == SWP_HWPOISON | pfn << MAX_SWAPFILES_SHIFT


# -- hugetlb and THP: memory_failure on a large folio ---------------------------------------

H = 2 << 20


@pytest.fixture
def hp():
    from vmemu import Kernel

    k = Kernel()
    k.set_nr_hugepages(8)
    proc = k.spawn()
    yield proc
    proc.check()
    proc.exit()


def test_hugetlb_anon_page_is_poisoned_whole_and_dissolved(hp):
    """The whole huge page goes (``try_memory_failure_hugetlb``): every mapping of it
    becomes a hwpoison entry; a private huge page is dissolved, leaving the pool."""
    from vmemu import MAP_HUGETLB

    a = hp.mmap(0, 2 * H, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB)
    hp.write(a + 5 * P, b"d")
    hp.write(a + H, b"e")
    child = hp.fork()
    before = hp.kernel.hugetlb.statistics()
    s = poison(hp, a + 5 * P)
    assert s is not None and s.si_addr == a + 5 * P  # dirty: the caller is signalled there
    for proc, addr in ((hp, a), (hp, a + H - 1), (child, a + 7 * P)):
        with pytest.raises(Sigbus) as e:
            proc.read(addr, 1)
        assert e.value.si_code == BUS_MCEERR_AR and e.value.si_addr == addr
    assert hp.read(a + H, 1) == b"e" and child.read(a + H, 1) == b"e"
    after = hp.kernel.hugetlb.statistics()
    assert after.nr_hugepages == before.nr_hugepages - 1  # dissolved
    assert after.free_huge_pages == before.free_huge_pages
    hp.madvise(a, H, MADV_DONTNEED)  # the entry goes; a new page refaults
    assert hp.read(a + 5 * P, 1) == b"\0"
    child.exit()


def test_hugetlb_file_page_stays_poisoned_in_the_page_cache(hp):
    """A hugetlbfs page stays cached, poisoned: any fault of it is SIGBUS; pread stops only at
    the raw poisoned 4 KiB page (``adjust_range_hwpoison``); a punched hole removes it."""
    from vmemu.mmu.memfd import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, MFD_HUGETLB

    fd = hp.memfd_create("h", MFD_HUGETLB)
    hp.ftruncate(fd, 2 * H)
    a = hp.mmap(0, 2 * H, RW, MAP_SHARED, fd, 0)
    hp.write(a, b"x" * (2 * H))
    assert poison(hp, a + 3 * P) is not None
    b = hp.mmap(0, H, PROT_READ, MAP_SHARED, fd, 0)  # never faulted: the page cache says
    with pytest.raises(Sigbus) as e:
        hp.read(b + 100 * P, 1)
    assert e.value.si_code == BUS_MCEERR_AR
    assert hp.pread(fd, 4 * P, 0) == b"x" * (3 * P)
    assert hp.pread(fd, 2, 4 * P) == b"xx"
    with pytest.raises(OSError) as err:
        hp.pread(fd, 1, 3 * P + 9)
    assert err.value.errno == errno.EIO
    hp.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, H)
    assert hp.read(a + 3 * P, 1) == b"\0" and hp.pread(fd, 1, 3 * P) == b"\0"


def test_inject_steps_over_the_rest_of_a_large_folio(hp):
    """madvise_inject_error advances by the folio's size: over a THP, only the first page
    of the range is poisoned (then the THP is split)."""
    from vmemu import MADV_HUGEPAGE

    a = hp.mmap(0, 2 * H, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    a = (a + H - 1) & ~(H - 1)
    hp.madvise(a, H, MADV_HUGEPAGE)
    hp.write(a, b"t" * (4 * P))
    assert hp.walk(a)[2].entry & 0x80  # a THP
    assert poison(hp, a + P, 3) is not None
    with pytest.raises(Sigbus):
        hp.read(a + P, 1)
    assert hp.read(a + 2 * P, 1) == b"t" and hp.read(a + 3 * P, 1) == b"t"


def test_madv_free_clears_a_hwpoison_entry(p):
    """madvise_free_pte_range clears hwpoison entries (and poison markers): the page reads zero."""
    from vmemu.constants import MADV_FREE

    a = p.mmap(BASE, 2 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    p.write(a, b"w" * (2 * P))
    assert poison(p, a) is not None
    p.madvise(a, 2 * P, MADV_FREE)
    assert p.read(a, 1) == b"\0" and p.read(a + P, 1) == b"w"
