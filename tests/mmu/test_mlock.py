"""mlock / munlock / mlock2 / mlockall: flags, populate, errnos as on Linux 6.18."""

from __future__ import annotations

import errno

import pytest

from vmemu import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    Kernel,
    Process,
)
from vmemu.constants import (
    MADV_DONTNEED,
    MADV_POPULATE_READ,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.mlock import MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT, MLOCK_ONFAULT
from vmemu.mmu.vma import VM_LOCKED, VM_LOCKONFAULT

P = PAGE_SIZE
PA = MAP_PRIVATE | MAP_ANONYMOUS
RW = PROT_READ | PROT_WRITE
BASE = 0x400000000


@pytest.fixture
def p():
    proc = Process()
    yield proc
    proc.check()
    proc.exit()


def layout(p: Process) -> list[tuple[int, int, bool]]:
    return [((v.vm_start - BASE) // P, (v.vm_end - BASE) // P, bool(v.vm_flags & VM_LOCKED))
            for v in p.mm.vmas]


def smaps_field(p: Process, field: str) -> list[int]:
    return [int(line.split()[1]) for line in p.smaps().splitlines() if line.startswith(field)]


def test_unaligned_start_rounds_down_and_populates(p):
    p.mmap(BASE, 4 * P, RW, PA | MAP_FIXED)
    p.mlock(BASE + 5, P)  # [BASE, BASE + 2P)
    assert layout(p) == [(0, 2, True), (2, 4, False)]
    assert smaps_field(p, "Locked:") == [8, 0]
    assert smaps_field(p, "Rss:") == [8, 0]


def test_zero_length_unaligned_still_locks_one_page(p):
    p.mmap(BASE, 2 * P, RW, PA | MAP_FIXED)
    p.mlock(BASE, 0)
    assert layout(p) == [(0, 2, False)]
    p.mlock(BASE + 1, 0)
    assert layout(p) == [(0, 1, True), (1, 2, False)]


def test_holes(p):
    p.mmap(BASE, 2 * P, RW, PA | MAP_FIXED)
    p.mmap(BASE + 3 * P, 2 * P, RW, PA | MAP_FIXED)
    with pytest.raises(OSError) as e:
        p.mlock(BASE - P, 2 * P)  # hole at the start: nothing changes
    assert e.value.errno == errno.ENOMEM and layout(p) == [(0, 2, False), (3, 5, False)]
    with pytest.raises(OSError) as e:
        p.mlock(BASE, 5 * P)  # hole later: the part before it is locked, nothing populated
    assert e.value.errno == errno.ENOMEM and layout(p) == [(0, 2, True), (3, 5, False)]
    assert smaps_field(p, "Rss:") == [0, 0]
    with pytest.raises(OSError) as e:
        p.munlock(BASE, 5 * P)
    assert e.value.errno == errno.ENOMEM and layout(p) == [(0, 2, False), (3, 5, False)]


def test_bad_arguments(p):
    p.mmap(BASE, 2 * P, RW, PA | MAP_FIXED)
    with pytest.raises(OSError) as e:
        p.mlock(BASE, (1 << 64) - P)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        p.mlock(BASE, P, 2)
    assert e.value.errno == errno.EINVAL


def test_prot_none_is_locked_but_enomem(p):
    p.mmap(BASE, 2 * P, PROT_NONE, PA | MAP_FIXED)
    with pytest.raises(OSError) as e:
        p.mlock(BASE, 2 * P)
    assert e.value.errno == errno.ENOMEM
    assert layout(p) == [(0, 2, True)]


def test_read_only_maps_zero_page_write_only_allocates(p):
    p.mmap(BASE, 2 * P, PROT_READ, PA | MAP_FIXED)
    p.mmap(BASE + 4 * P, 2 * P, PROT_WRITE, PA | MAP_FIXED)
    p.mlock(BASE, 2 * P)
    p.mlock(BASE + 4 * P, 2 * P)
    assert smaps_field(p, "Rss:") == [0, 8]
    assert p.walk(BASE)[-1].entry != 0


def test_onfault_does_not_populate(p):
    p.mmap(BASE, 2 * P, RW, PA | MAP_FIXED)
    p.mlock(BASE, 2 * P, MLOCK_ONFAULT)
    v = p.mm.vmas.vma_lookup(BASE)
    assert v.vm_flags & VM_LOCKONFAULT and smaps_field(p, "Rss:") == [0]
    p.write(BASE, b"x")
    assert smaps_field(p, "Locked:") == [4]


def test_locked_pages_refuse_dontneed_and_fork_drops_the_lock(p):
    p.mmap(BASE, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED)
    p.mlock(BASE, 2 * P)
    with pytest.raises(OSError) as e:
        p.madvise(BASE, P, MADV_DONTNEED)
    assert e.value.errno == errno.EINVAL
    child = p.fork()
    assert not child.mm.vmas.vma_lookup(BASE).vm_flags & VM_LOCKED
    child.exit()


def test_munlock_merges_back(p):
    p.mmap(BASE, 4 * P, RW, PA | MAP_FIXED)
    p.mlock(BASE + P, P)
    assert layout(p) == [(0, 1, False), (1, 2, True), (2, 4, False)]
    p.munlock(BASE, 4 * P)
    assert layout(p) == [(0, 4, False)]


def test_mlockall(p):
    p.mmap(BASE, 2 * P, RW, PA | MAP_FIXED)
    for bad in (0, MCL_ONFAULT, 8):
        with pytest.raises(OSError) as e:
            p.mlockall(bad)
        assert e.value.errno == errno.EINVAL
    p.mlockall(MCL_CURRENT | MCL_FUTURE)
    assert smaps_field(p, "Locked:") == [8]
    p.mmap(BASE + 4 * P, P, RW, PA | MAP_FIXED)  # MCL_FUTURE: locked and populated
    assert layout(p) == [(0, 2, True), (4, 5, True)]
    assert smaps_field(p, "Rss:") == [8, 4]
    p.munlockall()
    p.mmap(BASE + 8 * P, P, RW, PA | MAP_FIXED)
    assert not any(locked for *_, locked in layout(p))


def test_mremap_grow_of_locked_populates(p):
    p.mmap(BASE, 2 * P, RW, PA | MAP_FIXED)
    p.mlock(BASE, 2 * P)
    assert p.mremap(BASE, 2 * P, 4 * P) == BASE
    assert smaps_field(p, "Locked:") == [16]


@pytest.mark.parametrize("prot", [PROT_WRITE, PROT_EXEC])
def test_mlock_populates_shared_mappings_without_prot_read(prot: int) -> None:
    """mlock and MAP_POPULATE fault in with FOLL_FORCE: PROT_WRITE or PROT_EXEC alone is enough.

    6.18 succeeds for a shared memfd and a shared anonymous mapping (a read
    fault with FOLL_FORCE, ``populate_vma_page_range``); vmemu returned
    ENOMEM (found by the memtypes stateful machine). MADV_POPULATE_READ has
    no FOLL_FORCE and stays EINVAL there.
    """
    k = Kernel()
    p = k.spawn()
    fd = p.memfd_create("m")
    p.ftruncate(fd, 4 * PAGE_SIZE)
    a = p.mmap(0, 4 * PAGE_SIZE, prot, MAP_SHARED, fd, 0)
    p.mlock(a, 4 * PAGE_SIZE)
    b = p.mmap(0, 4 * PAGE_SIZE, prot, MAP_SHARED | MAP_ANONYMOUS)
    p.mlock(b, 4 * PAGE_SIZE)
    c = p.mmap(0, 4 * PAGE_SIZE, prot, MAP_SHARED | MAP_POPULATE, fd, 0)
    for addr in (a, b, c):
        assert all(p.pagemap(addr + i * PAGE_SIZE) >> 63 for i in range(4)), hex(addr)
    with pytest.raises(OSError) as e:
        p.madvise(c, PAGE_SIZE, MADV_POPULATE_READ)
    assert e.value.errno == errno.EINVAL
    k.check()
