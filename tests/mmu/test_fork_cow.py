"""fork(): copy-on-write private memory, shared memory, DONTFORK/WIPEONFORK, counts."""

from __future__ import annotations

import pytest

from vmemu import (
    MADV_DONTFORK,
    MADV_WIPEONFORK,
    MAP_ANONYMOUS,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Process,
)
from vmemu.mmu import PG, PM_MMAP_EXCLUSIVE, PM_PFRAME_MASK
from vmemu.mmu.pgtable import _PAGE_RW

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE


def folio_at(p, addr):
    return p.mm.phys.mem_map[p.pagemap(addr) & PM_PFRAME_MASK]


def pte(p, addr):
    return p.walk(addr)[-1].entry


@pytest.fixture
def p():
    proc = Process()
    yield proc
    proc.kernel.check()


def test_private_memory_is_shared_copy_on_write(p):
    a = p.mmap(0, 2 * P)
    p.write(a, b"parent")
    f = folio_at(p, a)
    assert f.test(PG.anon_exclusive) and (f.refcount, f.mapcount) == (1, 1)
    c = p.fork()
    assert folio_at(c, a) is f
    assert not f.test(PG.anon_exclusive) and (f.refcount, f.mapcount) == (2, 2)
    assert not pte(p, a) & _PAGE_RW and not pte(c, a) & _PAGE_RW
    assert not p.pagemap(a) & PM_MMAP_EXCLUSIVE
    p.kernel.check()
    c.write(a, b"CHILD")
    assert c.read(a, 6) == b"CHILDt" and p.read(a, 6) == b"parent"
    g = folio_at(c, a)
    assert g is not f and g.test(PG.anon_exclusive) and (g.refcount, g.mapcount) == (1, 1)
    assert (f.refcount, f.mapcount) == (1, 1)
    assert c.statistics().cow == 1
    p.write(a, b"P")  # the last mapper reuses the page in place
    assert folio_at(p, a) is f and p.statistics().wp_reuse == 1 and p.statistics().cow == 0
    assert f.test(PG.anon_exclusive)
    p.kernel.check()


def test_zero_page_and_untouched_pages_fork_as_nothing(p):
    a = p.mmap(0, 2 * P)
    p.read(a, 1)
    c = p.fork()
    assert c.read(a, 2 * P) == bytes(2 * P)
    c.write(a + P, b"x")
    assert p.read(a + P, 1) == b"\0"
    assert p.kernel.memory_statistics().folios == 1


def test_shared_anonymous_memory_stays_shared(p):
    a = p.mmap(0, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    p.write(a, b"before")
    c = p.fork()
    c.write(a, b"child!")
    c.write(a + P, b"second")
    assert p.read(a, 6) == b"child!" and p.read(a + P, 6) == b"second"
    p.write(a, b"parent")
    assert c.read(a, 6) == b"parent"
    f = folio_at(p, a)
    assert f is folio_at(c, a) and f.mapcount == 2 and f.refcount == 3  # + page cache
    assert c.statistics().cow == 0


def test_dontfork_and_wipeonfork(p):
    a = p.mmap(0, 3 * P)
    for i in range(3):
        p.write(a + i * P, b"data")
    p.madvise(a + P, P, MADV_DONTFORK)
    p.madvise(a + 2 * P, P, MADV_WIPEONFORK)
    c = p.fork()
    assert c.mm.vmas.vma_lookup(a + P) is None
    assert c.read(a, 4) == b"data" and c.read(a + 2 * P, 4) == bytes(4)
    assert folio_at(p, a + 2 * P).mapcount == 1
    assert len(c.mm.vmas) == 2


def test_grandchildren_and_exit_release_everything(p):
    a = p.mmap(0, 4 * P)
    for i in range(4):
        p.write(a + i * P, bytes([i]))
    c = p.fork()
    g = c.fork()
    g.write(a, b"g")
    c.write(a + P, b"c")
    p.kernel.check()
    assert [g.read(a + i * P, 1) for i in range(4)] == [b"g", b"\1", b"\2", b"\3"]
    for q in (c, g):
        q.exit()
        p.kernel.check()
    assert all(folio_at(p, a + i * P).mapcount == 1 for i in range(4))
    p.exit()
    assert p.kernel.memory_statistics().folios == 0


def test_child_has_its_own_page_tables(p):
    a = p.mmap(0, P)
    p.write(a, b"x")
    c = p.fork()
    assert c.mm.pgtables.pgd_pfn != p.mm.pgtables.pgd_pfn
    assert c.walk(a)[-1].table_pfn != p.walk(a)[-1].table_pfn
    assert c.maps() == p.maps()
