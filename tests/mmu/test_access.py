"""The memory access API: bytes and typed accessors, threads, faults and signals."""

from __future__ import annotations

import pytest

from vmemu import (
    BUS_ADRERR,
    BUS_MCEERR_AR,
    MAP_ANONYMOUS,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    SEGV_ACCERR,
    SEGV_MAPERR,
    SIGBUS,
    SIGSEGV,
    TASK_SIZE,
    Process,
    Sigbus,
    Sigsegv,
)
from vmemu.mmu.pgtable import POISON_MARKER, SWP_HWPOISON, swp_entry

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE


@pytest.fixture
def p():
    proc = Process()
    yield proc
    proc.check()


def test_read_never_written_returns_zeros_without_allocating(p):
    a = p.mmap(0, 8 * P)
    assert p.read(a, 8 * P) == bytes(8 * P)
    assert p.kernel.memory_statistics().folios == 0
    assert p.statistics().zero_page_maps == 8


def test_write_then_read(p):
    a = p.mmap(0, P)
    p.write(a + 10, b"hello")
    assert p.read(a + 8, 9) == b"\0\0hello\0\0"
    p.write(a + 10, memoryview(b"HE"))
    assert p.read(a + 10, 5) == b"HEllo"


def test_access_spanning_pages_faults_page_by_page(p):
    a = p.mmap(0, 3 * P)
    faults = p.statistics().faults
    data = (bytes(range(256)) * 20)[:5000]
    p.write(a + P - 100, data)
    assert p.statistics().faults == faults + 3
    assert p.read(a + P - 100, len(data)) == data
    assert p.statistics().anon_pages == 3


def test_typed_accessors_are_little_endian(p):
    a = p.mmap(0, 2 * P)
    t = p.main
    t.write_u8(a, 0xAB)
    t.write_u16(a + 2, 0x1234)
    t.write_u32(a + 4, 0xDEADBEEF)
    t.write_u64(a + 8, 0x0102030405060708)
    assert p.read(a, 16) == bytes.fromhex("ab003412efbeadde0807060504030201")
    assert (t.read_u8(a), t.read_u16(a + 2), t.read_u32(a + 4), t.read_u64(a + 8)) == (
        0xAB, 0x1234, 0xDEADBEEF, 0x0102030405060708)
    p.write_u64(a + P - 4, 0x1122334455667788)  # spans two pages
    assert p.read_u64(a + P - 4) == 0x1122334455667788


def test_named_threads_share_the_address_space(p):
    a = p.mmap(0, P)
    w = p.thread("writer")
    assert p.thread("writer") is w and w.name == "writer" and w.tid != p.pid
    w.write(a, b"from writer")
    assert p.thread("reader").read(a, 11) == b"from writer"
    w.touch(a + 100, write=True)


def test_unmapped_access_is_segv_maperr_and_changes_nothing(p):
    a = p.mmap(0, P)
    before = (p.maps(), p.statistics().anon_pages, p.kernel.memory_statistics())
    for op in (lambda: p.read(a + P + 5, 1), lambda: p.write(a + P + 5, b"x")):
        with pytest.raises(Sigsegv) as ei:
            op()
        s = ei.value
        assert (s.si_signo, s.si_code, s.si_addr) == (SIGSEGV, SEGV_MAPERR, a + P + 5)
        assert s.signal_name == "SIGSEGV" and s.code_name == "SEGV_MAPERR"
    assert (p.maps(), p.statistics().anon_pages, p.kernel.memory_statistics()) == before


def test_access_beyond_the_user_half_is_maperr(p):
    for addr in (TASK_SIZE, 1 << 47, (1 << 64) - 8):
        with pytest.raises(Sigsegv) as ei:
            p.read(addr, 1)
        assert ei.value.si_code == SEGV_MAPERR


def test_protection_faults_are_accerr(p):
    ro = p.mmap(0, P, PROT_READ)
    none = p.mmap(0, P, PROT_NONE)
    for op, addr in ((lambda: p.write(ro + 3, b"x"), ro + 3), (lambda: p.read(none, 1), none)):
        with pytest.raises(Sigsegv) as ei:
            op()
        assert (ei.value.si_code, ei.value.si_addr) == (SEGV_ACCERR, addr)
    assert p.read(ro, 1) == b"\0"


def test_spanning_access_reports_bytes_done(p):
    a = p.mmap(0, P)
    with pytest.raises(Sigsegv) as ei:
        p.write(a + P - 3, b"abcdef")
    assert ei.value.done == 3 and ei.value.si_addr == a + P
    assert p.read(a + P - 3, 3) == b"abc"
    with pytest.raises(Sigsegv) as ei:
        p.read(a + P - 3, 6)
    assert ei.value.done == 3


def test_shared_mapping_beyond_eof_is_sigbus_adrerr(p):
    fd = p.memfd_create("small")
    p.ftruncate(fd, P)
    a = p.mmap(0, 2 * P, RW, MAP_SHARED, fd)
    p.write(a, b"in file")
    with pytest.raises(Sigbus) as ei:
        p.read(a + P + 1, 1)
    assert (ei.value.si_signo, ei.value.si_code, ei.value.si_addr) == (
        SIGBUS, BUS_ADRERR, a + P + 1)


def _set_pte(p, addr, value):
    t = p.mm.pgtables.pte_table(addr, True)
    t[(addr // P) & 511] = value


def test_hwpoison_entry_is_sigbus_mceerr_ar(p):
    a = p.mmap(0, P)
    _set_pte(p, a, swp_entry(SWP_HWPOISON, 0x77))
    with pytest.raises(Sigbus) as ei:
        p.read(a + 8, 1)
    assert (ei.value.si_code, ei.value.si_addr) == (BUS_MCEERR_AR, a + 8)
    _set_pte(p, a, 0)


def test_poison_marker_is_sigbus(p):
    a = p.mmap(0, P)
    _set_pte(p, a, POISON_MARKER)
    with pytest.raises(Sigbus) as ei:
        p.write(a, b"x")
    assert ei.value.si_addr == a
    p.check()
    _set_pte(p, a, 0)
    assert p.read(a, 1) == b"\0"


def test_shared_anonymous_write_is_seen_by_every_thread(p):
    a = p.mmap(0, P, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.thread("t1").write_u32(a, 7)
    assert p.thread("t2").read_u32(a) == 7


def test_negative_read_length_is_rejected(p):
    a = p.mmap(0, P)
    with pytest.raises(ValueError):
        p.read(a, -1)
