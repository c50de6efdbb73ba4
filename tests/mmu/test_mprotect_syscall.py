"""mprotect(2): splits, merges, PTE rewrites, PROT_NONE, partial progress, errnos."""

from __future__ import annotations

import errno

import pytest

from vmemu import (
    MAP_ANONYMOUS,
    MAP_GROWSDOWN,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    SEGV_ACCERR,
    Process,
    Sigsegv,
)
from vmemu.mmu.pgtable import _PAGE_NX, _PAGE_PRESENT, _PAGE_PROTNONE, _PAGE_RW

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE


@pytest.fixture
def p():
    proc = Process()
    yield proc
    proc.check()


def errno_of(fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


def pte(p, addr):
    return p.walk(addr)[-1].entry


def test_readonly_then_writable_again_rewrites_ptes(p):
    a = p.mmap(0, 2 * P)
    p.write(a, b"data")
    assert pte(p, a) & _PAGE_RW
    p.mprotect(a, 2 * P, PROT_READ)
    assert not pte(p, a) & _PAGE_RW and pte(p, a) & _PAGE_PRESENT
    with pytest.raises(Sigsegv) as ei:
        p.write(a, b"x")
    assert ei.value.si_code == SEGV_ACCERR and ei.value.si_addr == a
    assert p.read(a, 4) == b"data"
    p.mprotect(a, 2 * P, RW)
    assert pte(p, a) & _PAGE_RW  # exclusive anon page made writable at once
    p.write(a, b"DATA")
    assert p.statistics().cow == 0


def test_prot_none_keeps_the_frame_but_not_the_access(p):
    a = p.mmap(0, P)
    p.write(a, b"secret")
    p.mprotect(a, P, PROT_NONE)
    e = pte(p, a)
    assert e & _PAGE_PROTNONE and not e & _PAGE_PRESENT
    for op in (lambda: p.read(a, 1), lambda: p.write(a, b"x")):
        with pytest.raises(Sigsegv) as ei:
            op()
        assert ei.value.si_code == SEGV_ACCERR
    assert p.maps().split()[1] == "---p"
    p.check()
    p.mprotect(a, P, PROT_READ)
    assert p.read(a, 6) == b"secret"


def test_exec_clears_nx(p):
    a = p.mmap(0, P)
    p.read(a, 1)
    assert pte(p, a) & _PAGE_NX
    p.mprotect(a, P, PROT_READ | PROT_EXEC)
    assert not pte(p, a) & _PAGE_NX and p.maps().split()[1] == "r-xp"


def test_shared_writable_pages_stay_writable(p):
    a = p.mmap(0, P, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.write(a, b"s")
    p.mprotect(a, P, PROT_READ)
    p.mprotect(a, P, RW)
    p.write(a, b"t")
    assert p.read(a, 1) == b"t"


def test_split_then_merge(p):
    a = p.mmap(0, 6 * P)
    p.mprotect(a + 2 * P, 2 * P, PROT_READ)
    assert len(p.mm.vmas) == 3
    p.mprotect(a, 6 * P, PROT_READ)
    assert len(p.mm.vmas) == 1


def test_across_vmas_that_merge_midway(p):
    a = p.mmap(0, 4 * P)
    p.mprotect(a + P, P, PROT_READ)
    p.mprotect(a + 2 * P, P, PROT_NONE)
    p.mprotect(a, 4 * P, RW)
    assert len(p.mm.vmas) == 1


def test_hole_stops_with_enomem_after_changing_the_first_part(p):
    a = p.mmap(0, 4 * P)
    p.munmap(a + 2 * P, P)
    assert errno_of(p.mprotect, a, 4 * P, PROT_READ) == errno.ENOMEM
    v0, v1 = p.mm.vmas
    assert v0.flags_str() == "r--p" and v1.flags_str() == "rw-p"


def test_start_in_a_hole_is_enomem(p):
    a = p.mmap(0, P)
    assert errno_of(p.mprotect, a - P, 2 * P, PROT_READ) == errno.ENOMEM
    assert p.mm.vmas.vma_lookup(a).flags_str() == "rw-p"


@pytest.mark.parametrize("prot", [0x10, 0x100, PROT_GROWSDOWN | PROT_GROWSUP])
def test_bad_prot_is_einval(p, prot):
    a = p.mmap(0, P)
    assert errno_of(p.mprotect, a, P, prot) == errno.EINVAL


def test_unaligned_start_is_einval(p):
    a = p.mmap(0, P)
    assert errno_of(p.mprotect, a + 1, P, PROT_READ) == errno.EINVAL


def test_zero_length_is_a_no_op(p):
    p.mprotect(0x1234000, 0, PROT_READ)


@pytest.mark.parametrize("length", [-1, (1 << 64) - P])
def test_wrapping_length_is_enomem(p, length):
    a = p.mmap(0, P)
    assert errno_of(p.mprotect, a, length, PROT_READ) == errno.ENOMEM


def test_growsdown_and_growsup(p):
    a = p.mmap(0, P)
    assert errno_of(p.mprotect, a, P, PROT_READ | PROT_GROWSDOWN) == errno.EINVAL
    assert errno_of(p.mprotect, a, P, PROT_READ | PROT_GROWSUP) == errno.EINVAL
    assert errno_of(p.mprotect, a - 4 * P, P, PROT_READ | PROT_GROWSDOWN) == errno.ENOMEM
    g = p.mmap(0, 2 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN)
    p.mprotect(g + P, P, PROT_READ | PROT_GROWSDOWN)  # down to the VMA's start
    assert p.mm.vmas.vma_lookup(g).vm_end == g + 2 * P
    assert p.mm.vmas.vma_lookup(g).flags_str() == "r--p"
