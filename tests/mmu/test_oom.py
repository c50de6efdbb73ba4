"""The memory limit: faults beyond it are VM_FAULT_OOM, never a Python MemoryError."""

from __future__ import annotations

import errno

import pytest

from vmemu import (
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    SIGKILL,
    Kernel,
    OomKill,
)

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE


@pytest.fixture
def p():
    proc = Kernel(mem_limit_pages=4).spawn()
    yield proc
    proc.check()


def test_write_fault_beyond_limit_is_oom_kill_and_changes_nothing(p):
    a = p.mmap(0, 8 * P)
    for i in range(4):
        p.write(a + i * P, b"x")
    before = (p.maps(), p.statistics().anon_pages)
    with pytest.raises(OomKill) as ei:
        p.write(a + 4 * P + 7, b"y")
    s = ei.value
    assert (s.si_signo, s.si_addr) == (SIGKILL, a + 4 * P + 7)
    assert (p.maps(), p.statistics().anon_pages) == before
    assert p.pagemap(a + 4 * P) == 0
    assert p.kernel.memory_statistics().oom_failures == 1


def test_reads_need_no_memory(p):
    a = p.mmap(0, 64 * P)
    assert p.read(a, 64 * P) == bytes(64 * P)


def test_cow_break_beyond_limit_is_oom(p):
    a = p.mmap(0, 4 * P)
    for i in range(4):
        p.write(a + i * P, b"x")  # at the limit
    c = p.fork()
    with pytest.raises(OomKill):
        c.write(a, b"1")
    assert c.read(a, 1) == b"x" and c.pagemap(a) == p.pagemap(a)
    c.check()
    c.exit()
    p.write(a, b"z")  # the last mapper reuses the page: no allocation


def test_shared_memory_fault_beyond_limit(p):
    a = p.mmap(0, 8 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    with pytest.raises(OomKill):
        for i in range(8):
            p.write(a + i * P, b"s")
    assert i == 4


def test_map_populate_stops_silently(p):
    a = p.mmap(0, 8 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE)
    assert p.statistics().anon_pages == 4
    assert p.read(a + 7 * P, 1) == b"\0"


def test_madv_populate_write_is_enomem(p):
    a = p.mmap(0, 8 * P)
    with pytest.raises(OSError) as ei:
        p.madvise(a, 8 * P, MADV_POPULATE_WRITE)
    assert ei.value.errno == errno.ENOMEM
    p.madvise(a, 8 * P, MADV_POPULATE_READ)  # zero page: fine


def test_freeing_memory_makes_room_again(p):
    a = p.mmap(0, 8 * P)
    for i in range(4):
        p.write(a + i * P, b"x")
    p.munmap(a, 2 * P)
    p.write(a + 4 * P, b"y")
    p.write(a + 5 * P, b"z")
