"""The kernel-side windows of the differential tests stay out of the interpreter's way.

A test that unmaps part of its window leaves a hole; if the interpreter's own
allocator (malloc, pymalloc arenas) is handed that hole, a later write the test
expects to fault, or a MAP_FIXED into the hole, corrupts Python's heap.
`reserve_low` puts windows where the allocator does not look first.
"""

from __future__ import annotations

import ctypes

import pytest

from tests.differential._kernel import ON_LINUX_X86_64, SKIP_REASON, reserve_low

pytestmark = [pytest.mark.differential, pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

MIB = 1 << 20


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
