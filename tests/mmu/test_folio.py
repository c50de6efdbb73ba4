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


# -- freed frames' buffers are reused (folio._FRAME_CACHE) -----------------------------

def test_a_freed_frames_buffer_is_reused_zeroed() -> None:
    from vmemu.mmu import folio as folio_module

    folio_module._FRAME_CACHE.clear()
    phys = PhysMem()
    a = phys.alloc_folio(0)
    assert a is not None
    a.data[:] = b"\x5a" * PAGE_SIZE
    buf_id = id(a.data)
    a.refcount = 0
    phys.free_folio(a)
    del a  # nothing holds the old folio, nor its buffer, any more
    b = phys.alloc_folio(0)
    assert b is not None and id(b.data) == buf_id
    assert b.data == bytes(PAGE_SIZE)  # zero-filled, as a fresh frame
    b.data[:] = b"\x33" * PAGE_SIZE
    b.refcount = 0
    phys.free_folio(b)
    del b
    c = phys.alloc_folio(0, zero=False)  # the caller fills it (a COPY)
    assert c is not None and id(c.data) == buf_id and len(c.data) == PAGE_SIZE


def test_a_buffer_still_referenced_is_not_reused() -> None:
    from vmemu.mmu import folio as folio_module

    folio_module._FRAME_CACHE.clear()
    phys = PhysMem()
    a = phys.alloc_folio(0)
    assert a is not None
    a.data[:] = b"\x5a" * PAGE_SIZE
    kept = a.data  # a stale reference (a TLB entry, a view, a caller's variable)
    view = memoryview(a.data)
    a.refcount = 0
    phys.free_folio(a)
    del a
    b = phys.alloc_folio(0)
    assert b is not None and b.data is not kept
    assert kept == b"\x5a" * PAGE_SIZE and view[0] == 0x5A  # never changes under its holder
    assert b.data == bytes(PAGE_SIZE)
    view.release()


def test_copy_round_trips_reuse_frames_with_identical_results() -> None:
    """The same COPY workload with the cache full and empty: same contents, pagemap, check."""
    import vmemu
    from vmemu.constants import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
    from vmemu.mmu import folio as folio_module
    from vmemu.uffd import uapi

    def run() -> tuple[object, ...]:
        p = vmemu.Process()
        u = p.userfaultfd(uapi.O_NONBLOCK)
        u.api()
        n = 16
        area = p.mmap(0, n * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
        src = p.mmap(0, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
        u.register(area, n * PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MISSING)
        out = []
        for i in range(n):
            p.write(src, bytes([i + 1]) * PAGE_SIZE)
            u.copy(area + i * PAGE_SIZE, src, PAGE_SIZE)
            p.write(area + i * PAGE_SIZE + 8, b"w")  # an anonymous write in between
        data = p.read(area, n * PAGE_SIZE)
        out.append(data)
        out.append([p.pagemap(a) & ~((1 << 55) - 1) for a in range(area, area + n * PAGE_SIZE,
                                                                  PAGE_SIZE)])
        p.check()
        p.munmap(area, n * PAGE_SIZE)  # frees the frames into the cache
        p.check()
        return tuple(map(repr, out))

    folio_module._FRAME_CACHE.clear()
    first = run()
    assert folio_module._FRAME_CACHE  # the unmapped frames wait for reuse
    assert run() == first  # reusing them changes nothing
