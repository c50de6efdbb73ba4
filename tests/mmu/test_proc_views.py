"""/proc views: maps, smaps, pagemap bits, and the page-table walk."""

from __future__ import annotations

import re

import pytest

from vmemu import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Process,
)
from vmemu.mmu import (
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PFRAME_MASK,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PM_UFFD_WP,
)
from vmemu.mmu.pgtable import _PAGE_UFFD_WP, UFFD_WP_MARKER, pte_index

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
BASE = 0x7F12_3450_0000


@pytest.fixture
def p():
    proc = Process()
    yield proc
    proc.check()


def smaps_fields(text: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+):\s+(\d+) kB$", text, re.M)}


def test_maps_line_format(p):
    p.mmap(BASE, 2 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    p.mmap(BASE + 4 * P, P, PROT_READ, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED)
    lines = p.maps().splitlines()
    assert lines[0] == "7f1234500000-7f1234502000 rw-p 00000000 00:00 0 "
    assert re.fullmatch(r"7f1234504000-7f1234505000 r--s 00000000 00:01 \d+ +/dev/zero \(deleted\)",
                        lines[1])
    assert lines[1].index("/dev/zero") == 73


def test_smaps_counts_rss_pss_anonymous(p):
    a = p.mmap(BASE, 4 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    p.write(a, b"x")
    p.write(a + P, b"y")
    p.read(a + 2 * P, 1)  # zero page: not counted
    f = smaps_fields(p.smaps())
    assert f["Size"] == 16 and f["Rss"] == 8 and f["Pss"] == 8 and f["Anonymous"] == 8
    assert f["Private_Dirty"] == 8 and f["Swap"] == 0 and f["KernelPageSize"] == 4
    assert "VmFlags: rd wr mr mw me ac" in p.smaps()
    c = p.fork()
    f = smaps_fields(p.smaps())
    assert f["Rss"] == 8 and f["Pss"] == 4 and f["Shared_Dirty"] == 8 and f["Private_Dirty"] == 0
    c.exit()
    assert smaps_fields(p.smaps())["Pss"] == 8


def test_smaps_shared_anonymous_is_not_anonymous(p):
    a = p.mmap(0, P, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.write(a, b"s")
    f = smaps_fields(p.smaps())
    assert f["Rss"] == 4 and f["Anonymous"] == 0
    assert "VmFlags: rd wr sh mr mw me ms" in p.smaps()


def test_pagemap_bits(p):
    a = p.mmap(0, 3 * P)
    s = p.mmap(0, P, RW, MAP_SHARED | MAP_ANONYMOUS)
    assert p.pagemap(a) == 0
    p.write(a, b"x")
    e = p.pagemap(a)
    assert e & PM_PRESENT and e & PM_MMAP_EXCLUSIVE and not e & (PM_FILE | PM_SWAP | PM_UFFD_WP)
    assert e & PM_PFRAME_MASK == p.walk(a)[-1].entry >> 12 & ((1 << 40) - 1)
    assert not e & PM_SOFT_DIRTY  # CONFIG_MEM_SOFT_DIRTY is off
    p.read(a + P, 1)
    z = p.pagemap(a + P)
    assert z & PM_PRESENT and z & PM_PFRAME_MASK == p.mm.phys.zero_pfn
    assert not z & PM_MMAP_EXCLUSIVE
    p.write(s, b"s")
    assert p.pagemap(s) & PM_FILE and p.pagemap(s) & PM_PRESENT
    c = p.fork()
    assert not p.pagemap(a) & PM_MMAP_EXCLUSIVE
    c.exit()


def test_pagemap_uffd_wp_and_swap_bits(p):
    a = p.mmap(0, 2 * P)
    p.write(a, b"x")
    table = p.mm.pgtables.pte_table(a, False)
    table[pte_index(a)] |= _PAGE_UFFD_WP
    assert p.pagemap(a) & PM_UFFD_WP == PM_UFFD_WP == 1 << 57
    table[pte_index(a)] &= ~_PAGE_UFFD_WP
    table[pte_index(a + P)] = UFFD_WP_MARKER
    # a pte marker is a swap entry too: swapped, type SWP_PTE_MARKER (31), offset the marker
    # bits (PTE_MARKER_UFFD_WP = 1) - 0x840000000000003f on 6.18 (tests/differential)
    assert p.pagemap(a + P) == PM_UFFD_WP | PM_SWAP | 31 | 1 << 5
    from vmemu.mmu.pgtable import pte_swp_mkuffd_wp, swp_entry

    table[pte_index(a + P)] = pte_swp_mkuffd_wp(swp_entry(1, 0x42))
    e = p.pagemap(a + P)
    assert e & PM_SWAP and e & PM_UFFD_WP and not e & PM_PRESENT
    assert e & PM_PFRAME_MASK == 1 | (0x42 << 5)
    table[pte_index(a + P)] = 0


def test_walk_reports_each_level(p):
    a = p.mmap(BASE, P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    levels = p.walk(a)
    assert levels[0].level == "pgd" and levels[0].index == 254
    assert levels[0].entry == 0  # nothing touched yet: the walk stops at a none entry
    p.write(a, b"x")
    levels = p.walk(a)
    assert [w.level for w in levels] == ["pgd", "pud", "pmd", "pte"]
    assert [w.index for w in levels] == [(a >> 39) & 511, (a >> 30) & 511, (a >> 21) & 511,
                                         (a >> 12) & 511]
    for upper, lower in zip(levels, levels[1:], strict=False):
        assert upper.entry & 0xFFF == 0x067 and upper.entry >> 12 == lower.table_pfn
    assert levels[-1].entry & 0x3 == 0x3
    assert "P|RW|US" in str(levels[-1])
