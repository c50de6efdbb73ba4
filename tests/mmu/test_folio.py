"""Physical memory: folio allocation, counting, the zero page and the memory limit."""

from __future__ import annotations

import pytest

from vmemu.constants import PAGE_SIZE
from vmemu.mmu.folio import FIRST_PFN, PG, Folio, PhysMem


def test_alloc_folio_order_zero():
    phys = PhysMem()
    f = phys.alloc_folio(0)
    assert isinstance(f, Folio) and f.order == 0 and f.nr_pages == 1
    assert f.refcount == 1 and f.mapcount == 0 and f.pfn >= FIRST_PFN
    assert f.data == bytearray(PAGE_SIZE)
    assert phys.mem_map[f.pfn] is f and phys.pfn_to_folio(f.pfn) is f
    assert phys.statistics().pages_in_use == 1 and phys.statistics().folios == 1


def test_large_folio_is_naturally_aligned_and_covers_its_frames():
    phys = PhysMem()
    phys.alloc_folio(0)
    f = phys.alloc_folio(9)
    assert f.pfn % 512 == 0 and f.nr_pages == 512 and f.test(PG.large)
    assert all(phys.mem_map[f.pfn + i] is f for i in range(512))
    buf = f.page_buffer(f.pfn + 3)
    buf[0] = 7
    assert f.data[3 * PAGE_SIZE] == 7 and len(buf) == PAGE_SIZE


def test_flags_helpers():
    f = PhysMem().alloc_folio()
    f.set(PG.dirty)
    assert f.test(PG.dirty)
    f.clear(PG.dirty)
    assert not f.test(PG.dirty)
    assert "order=0" in repr(f)


def test_folio_put_frees_at_zero_and_reuses_the_frame():
    phys = PhysMem()
    f = phys.alloc_folio()
    pfn = f.pfn
    f.refcount = 2
    phys.folio_put(f)
    assert phys.mem_map[pfn] is f
    phys.folio_put(f)
    assert phys.mem_map[pfn] is None and phys.statistics().pages_in_use == 0
    assert phys.alloc_folio().pfn == pfn


def test_folio_put_underflow_and_freeing_mapped_folio_are_assertions():
    phys = PhysMem()
    f = phys.alloc_folio()
    f.mapcount = 1
    f.refcount = 1
    with pytest.raises(AssertionError):
        phys.folio_put(f)
    g = phys.alloc_folio()
    g.refcount = 0
    with pytest.raises(AssertionError):
        phys.folio_put(g)


def test_zero_page():
    phys = PhysMem()
    z = phys.zero_folio
    assert z.test(PG.zero) and phys.mem_map[phys.zero_pfn] is z
    assert bytes(z.data) == bytes(PAGE_SIZE)
    assert z not in phys.live_folios()


def test_limit_returns_none_never_memoryerror():
    phys = PhysMem(limit_pages=2)
    assert phys.alloc_folio() is not None and phys.alloc_folio() is not None
    assert phys.alloc_folio() is None
    assert phys.alloc_folio(9) is None
    assert phys.statistics().oom_failures == 2 and phys.statistics().limit_pages == 2


def test_reclaim_hook_is_asked_first():
    phys = PhysMem(limit_pages=1)
    victim = phys.alloc_folio()
    asked = []

    def reclaim(n: int) -> None:
        asked.append(n)
        phys.folio_put(victim)

    phys.reclaim_hook = reclaim
    assert phys.alloc_folio() is not None and asked == [1]


def test_page_tables_are_frames():
    phys = PhysMem()
    pfn, table = phys.alloc_table()
    assert table == [0] * 512 and phys.mem_map[pfn] is table
    assert phys.statistics().page_tables == 1
    phys.free_table(pfn)
    assert phys.mem_map[pfn] is None and phys.statistics().page_tables == 0


def test_live_folios_lists_each_large_folio_once():
    phys = PhysMem()
    a, b = phys.alloc_folio(0), phys.alloc_folio(2)
    assert phys.live_folios() == [a, b]
