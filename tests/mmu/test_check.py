"""mm.check() passes on healthy address spaces and catches injected corruption."""

from __future__ import annotations

import pytest

from vmemu import MAP_ANONYMOUS, MAP_SHARED, PAGE_SHIFT, PAGE_SIZE, PROT_READ, PROT_WRITE, Process
from vmemu.mmu import PG, PM_PFRAME_MASK
from vmemu.mmu.pgtable import _PAGE_RW, pte_index
from vmemu.mmu.vma import Vma

P = PAGE_SIZE


@pytest.fixture
def p():
    proc = Process()
    a = proc.mmap(0, 4 * P)
    for i in range(3):
        proc.write(a + i * P, b"x")
    proc.read(a + 3 * P, 1)
    proc.a = a  # type: ignore[attr-defined]
    proc.check()
    return proc


def folio_at(p, addr):
    return p.mm.phys.mem_map[p.pagemap(addr) & PM_PFRAME_MASK]


def test_healthy_after_many_operations(p):
    s = p.mmap(0, 2 * P, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS)
    p.write(s, b"s")
    c = p.fork()
    c.write(p.a, b"c")
    p.mprotect(p.a, P, PROT_READ)
    c.munmap(p.a + P, P)
    p.check()
    c.check()
    c.exit()
    p.check()


def test_bumped_mapcount(p):
    folio_at(p, p.a).mapcount += 1
    with pytest.raises(AssertionError, match="mapcount"):
        p.check()


def test_bumped_refcount(p):
    folio_at(p, p.a).refcount += 1
    with pytest.raises(AssertionError, match="refcount"):
        p.check()


def test_stale_tlb_entry_after_pte_cleared(p):
    p.read(p.a, 1)
    table = p.mm.pgtables.pte_table(p.a, False)
    f = folio_at(p, p.a)
    table[pte_index(p.a)] = 0  # forgot the flush
    f.mapcount -= 1
    f.refcount -= 1
    p.mm.phys.free_folio(f)
    with pytest.raises(AssertionError, match="TLB"):
        p.check()


def test_tlb_entry_for_an_unmapped_page(p):
    p.mm.tlb.fill((p.a >> PAGE_SHIFT) + 100, bytearray(P), False)
    with pytest.raises(AssertionError, match="TLB"):
        p.check()


def test_tlb_write_entry_for_a_readonly_pte(p):
    p.read(p.a, 1)
    table = p.mm.pgtables.pte_table(p.a, False)
    table[pte_index(p.a)] &= ~_PAGE_RW  # write-protected without flush_tlb
    with pytest.raises(AssertionError, match="read-only"):
        p.check()


def test_leaked_folio(p):
    p.mm.phys.alloc_folio(0)
    with pytest.raises(AssertionError):
        p.check()


def test_leaked_page_table(p):
    p.mm.phys.alloc_table()
    with pytest.raises(AssertionError, match="leaked"):
        p.check()


def test_pte_outside_any_vma(p):
    p.munmap(p.a + 3 * P, P)
    t = p.mm.pgtables.pte_table(p.a + 3 * P, True)
    t[pte_index(p.a + 3 * P)] = p.walk(p.a)[-1].entry
    with pytest.raises(AssertionError, match="outside any VMA"):
        p.check()


def test_writable_zero_page(p):
    t = p.mm.pgtables.pte_table(p.a + 3 * P, False)
    t[pte_index(p.a + 3 * P)] |= _PAGE_RW
    with pytest.raises(AssertionError, match="zero page"):
        p.check()


def test_overlapping_vmas(p):
    p.mm.vmas.insert(Vma(p.a + P, p.a + 2 * P, 0x3))
    with pytest.raises(AssertionError, match="overlap"):
        p.check()


def test_anon_exclusive_but_shared(p):
    c = p.fork()
    folio_at(p, p.a).flags |= PG.anon_exclusive
    with pytest.raises(AssertionError, match="anon-exclusive"):
        c.check()


def test_pte_pointing_at_a_freed_frame(p):
    f = folio_at(p, p.a + P)
    t = p.mm.pgtables.pte_table(p.a + P, False)
    saved = t[pte_index(p.a + P)]
    t[pte_index(p.a + P)] = 0
    p.mm.tlb.flush_all()
    f.mapcount = f.refcount = 0
    p.mm.phys.free_folio(f)
    t[pte_index(p.a + P)] = saved
    with pytest.raises(AssertionError, match="no folio"):
        p.check()


def test_no_leaks_after_munmap_and_exit(p):
    p.munmap(p.a, 4 * P)
    stats = p.kernel.memory_statistics()
    assert stats.folios == 0 and stats.page_tables == 1
    p.check()
    p.exit()
    assert p.kernel.memory_statistics().page_tables == 0
    p.kernel.check()
