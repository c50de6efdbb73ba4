"""The kernel-side windows of the differential tests stay out of the interpreter's way.

A test that unmaps part of its window leaves a hole; if the interpreter's own
allocator (malloc, pymalloc arenas) is handed that hole, a later write the test
expects to fault, or a MAP_FIXED into the hole, corrupts Python's heap.
`reserve_low` puts windows where the allocator does not look first, and
tests/_mapguard.py refuses, for every test, a munmap or MAP_FIXED of memory
the tests do not own.
"""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.differential._kernel import ON_LINUX_X86_64, SKIP_REASON, reserve_low
from vmemu.constants import MAP_FIXED_NOREPLACE

pytestmark = [pytest.mark.differential, pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

MIB = 1 << 20
P = 4096


def test_a_hole_in_a_low_window_is_not_handed_to_the_allocator() -> None:
    from vmemu.native import libc

    raw = reserve_low(8 * MIB)
    try:
        assert raw >= 64 << 30
        hole = raw + 2 * MIB
        libc.munmap(hole, 2 * MIB)
        # each is above glibc's mmap threshold: a fresh mapping the kernel places
        keep = [bytearray(300 * 1024) for _ in range(40)]
        addrs = [ctypes.addressof((ctypes.c_char * 1).from_buffer(b)) for b in keep]
        assert not [a for a in addrs if hole <= a < hole + 2 * MIB]
    finally:
        libc.munmap(raw, 8 * MIB)


def test_low_windows_do_not_overlap() -> None:
    from vmemu.native import libc

    a, b = reserve_low(3 * MIB), reserve_low(3 * MIB)
    try:
        assert a + 3 * MIB <= b or b + 3 * MIB <= a
    finally:
        libc.munmap(a, 3 * MIB)
        libc.munmap(b, 3 * MIB)


def test_the_guard_refuses_to_unmap_a_hole_someone_else_filled() -> None:
    """The pattern behind the session-5 CI crash: move part of a mapping away, then unmap
    the whole old range after the interpreter was given the hole."""
    from _mapguard import GUARD, UnownedMapping

    from vmemu.native import libc, linux

    rw = linux.PROT_READ | linux.PROT_WRITE
    anon = linux.MAP_PRIVATE | linux.MAP_ANONYMOUS
    a = libc.mmap(0, 2 * P, rw, anon)
    b = libc.mremap(a, P, P, linux.MREMAP_MAYMOVE | linux.MREMAP_FIXED,
                    libc.mmap(0, P, rw, anon))
    before = len(GUARD.refused)
    try:
        with pytest.raises(UnownedMapping, match="unowned hole"):
            libc.munmap(a, 2 * P)  # refused even while the hole is still empty
        # the allocator's mmap: a raw syscall the guard does not see
        other = libc.syscall(linux.SYS_mmap, a, P, rw, anon | MAP_FIXED_NOREPLACE, -1, 0)
        assert other == a
        ctypes.memmove(a, b"python's", 8)  # as the interpreter would (unguarded)
        with pytest.raises(UnownedMapping, match="would store"):
            libc.poke_memory(a, b"test's")
        with pytest.raises(UnownedMapping, match="belongs to someone else"):
            libc.munmap(a, 2 * P)
        with pytest.raises(UnownedMapping, match="belongs to someone else"):
            libc.mmap(a, P, rw, anon | linux.MAP_FIXED)
        with pytest.raises(UnownedMapping, match="belongs to someone else"):
            libc.madvise(a, P, linux.MADV_DONTNEED)
        assert libc.peek_memory(a, 8) == b"python's"  # nothing was done
        assert len(GUARD.refused) == before + 5
    finally:
        del GUARD.refused[before:]
        libc.syscall(linux.SYS_munmap, a, P)
        libc.munmap(a + P, P)
        libc.munmap(b, P)


def test_the_guard_allows_holes_below_the_allocator_floor() -> None:
    from _mapguard import ALLOCATOR_FLOOR, GUARD

    from vmemu.native import libc, linux

    before = len(GUARD.refused)
    raw = reserve_low(4 * P)
    assert raw < ALLOCATOR_FLOOR
    libc.munmap(raw + P, P)
    libc.mmap(raw + P, P, linux.PROT_READ, linux.MAP_PRIVATE | linux.MAP_ANONYMOUS
              | linux.MAP_FIXED)
    libc.munmap(raw + 2 * P, P)
    libc.munmap(raw, 4 * P)  # over the hole: nobody else can be there
    assert len(GUARD.refused) == before


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(1, 12)), max_size=30),
       st.integers(0, 48), st.integers(0, 12))
def test_guard_ranges_match_a_set_of_pages(ops: list[tuple[bool, int, int]], s: int,
                                           n: int) -> None:
    from _mapguard import Ranges

    r, model = Ranges(), set()
    for add, lo, k in ops:
        (r.add if add else r.remove)(lo, lo + k)
        model = model | set(range(lo, lo + k)) if add else model - set(range(lo, lo + k))
    assert {i for a, b in r.overlaps(0, 100) for i in range(a, b)} == model
    assert {i for a, b in r.minus(s, s + n) for i in range(a, b)} == set(range(s, s + n)) - model
    starts = [a for a, _ in r.overlaps(0, 100)]
    ends = [b for _, b in r.overlaps(0, 100)]
    assert all(e < s2 for e, s2 in zip(ends[:-1], starts[1:], strict=True))  # merged


def test_the_guard_follows_mremap() -> None:
    """Shrinking in place gives the tail up; growing in place takes the new tail; a move
    gives the old range up (DONTUNMAP keeps it)."""
    from _mapguard import GUARD

    from vmemu.native import libc, linux

    rw = linux.PROT_READ | linux.PROT_WRITE
    anon = linux.MAP_PRIVATE | linux.MAP_ANONYMOUS
    a = libc.mmap(0, 4 * P, rw, anon)
    try:
        assert libc.mremap(a, 4 * P, 2 * P) == a
        assert GUARD.owned.minus(a, a + 4 * P) == [(a + 2 * P, a + 4 * P)]
        try:
            libc.mremap(a, 2 * P, 3 * P)  # in place (no MAYMOVE), when the page after is free
        except OSError:  # ENOMEM: someone mapped it meanwhile
            assert GUARD.owned.minus(a, a + 3 * P) == [(a + 2 * P, a + 3 * P)]
        else:
            assert GUARD.owned.minus(a, a + 3 * P) == []
        b = libc.mremap(a, P, P, linux.MREMAP_MAYMOVE | linux.MREMAP_DONTUNMAP)
        assert GUARD.owned.minus(a, a + P) == [] and GUARD.owned.minus(b, b + P) == []
        libc.munmap(b, P)
    finally:
        got = [(s, e) for s, e in GUARD.owned.overlaps(a, a + 4 * P)]
        for s, e in got:
            libc.munmap(max(s, a), min(e, a + 4 * P) - max(s, a))
    assert GUARD.owned.minus(a, a + 4 * P) == [(a, a + 4 * P)]
