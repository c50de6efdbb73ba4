"""The software TLB: fills, eviction, flushes, and the mm flushing it on every change."""

from __future__ import annotations

from vmemu import MADV_DONTNEED, PAGE_SHIFT, PAGE_SIZE, PROT_READ, Process
from vmemu.mmu.tlb import Tlb


def test_fill_and_flushes_count():
    t = Tlb(capacity=2)
    t.fill(1, "a", True)
    t.fill(2, "b", False)
    assert t.r == {1: "a", 2: "b"} and t.w == {1: "a"}
    t.fill(3, "c", True)  # evicts the oldest
    assert 1 not in t.r and 1 not in t.w and t.evictions == 1
    t.flush_page(3 << PAGE_SHIFT)
    assert 3 not in t.r and 3 not in t.w
    t.fill(5, "x", True)
    t.flush_writable(5 << PAGE_SHIFT, 6 << PAGE_SHIFT)
    assert 5 in t.r and 5 not in t.w
    t.flush_range(0, 100 << PAGE_SHIFT)
    assert not t.r
    t.fill(7, "y", False)
    t.flush_all()
    s = t.statistics()
    assert (s.entries, s.flush_all, s.flush_range, s.flush_page, s.evictions) == (0, 1, 2, 1, 1)
    assert s.hits_filled == 5


def test_refill_as_readonly_drops_write_permission():
    t = Tlb()
    t.fill(1, "a", True)
    t.fill(1, "a", False)
    assert 1 in t.r and 1 not in t.w


def test_read_fills_readonly_write_fills_writable():
    p = Process()
    a = p.mmap(0, 2 * PAGE_SIZE)
    tlb = p.mm.tlb
    p.read(a, 1)
    assert a >> PAGE_SHIFT in tlb.r and a >> PAGE_SHIFT not in tlb.w
    p.write(a, b"x")
    assert a >> PAGE_SHIFT in tlb.w
    p.check()


def test_mprotect_munmap_and_dontneed_flush():
    p = Process()
    a = p.mmap(0, 3 * PAGE_SIZE)
    for i in range(3):
        p.write(a + i * PAGE_SIZE, b"x")
    before = p.statistics().tlb_flushes
    p.mprotect(a, PAGE_SIZE, PROT_READ)
    assert a >> PAGE_SHIFT not in p.mm.tlb.w
    p.check()
    p.madvise(a + PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED)
    assert (a + PAGE_SIZE) >> PAGE_SHIFT not in p.mm.tlb.r
    p.check()
    p.munmap(a + 2 * PAGE_SIZE, PAGE_SIZE)
    assert (a + 2 * PAGE_SIZE) >> PAGE_SHIFT not in p.mm.tlb.r
    assert p.statistics().tlb_flushes >= before + 3
    p.check()


def test_fork_flushes_the_parent_so_cow_is_noticed():
    p = Process()
    a = p.mmap(0, PAGE_SIZE)
    p.write(a, b"parent")
    n = p.mm.tlb.n_flush_all
    c = p.fork()
    assert p.mm.tlb.n_flush_all == n + 1 and not p.mm.tlb.w
    p.write(a, b"P")
    assert c.read(a, 6) == b"parent" and p.read(a, 6) == b"Parent"
    p.check()


def test_tlb_capacity_eviction_keeps_accesses_correct():
    p = Process()
    p.mm.tlb.capacity = 4
    a = p.mmap(0, 16 * PAGE_SIZE)
    for i in range(16):
        p.write(a + i * PAGE_SIZE, bytes([i]))
    assert len(p.mm.tlb.r) <= 4 and p.mm.tlb.evictions >= 12
    assert [p.read(a + i * PAGE_SIZE, 1)[0] for i in range(16)] == list(range(16))
    p.check()


def test_a_range_flush_past_the_ceiling_flushes_everything():
    """flush_tlb_mm_range: more than tlb_single_page_flush_ceiling (33) pages is a full flush."""
    from vmemu.mmu.tlb import TLB_SINGLE_PAGE_FLUSH_CEILING as CEILING

    t = Tlb()
    for vpn in (1000, 5, 6):
        t.fill(vpn, "x", True)
    t.flush_range(0, CEILING << PAGE_SHIFT)  # pages 0-32: one by one
    assert 1000 in t.r and 1000 in t.w and 5 not in t.r
    t.fill(5, "x", True)
    t.flush_writable(0, (CEILING + 1) << PAGE_SHIFT)  # 34 pages: every write permission
    assert 1000 in t.r and not t.w
    t.fill(1000, "x", True)
    t.flush_range(0, (CEILING + 1) << PAGE_SHIFT)
    assert not t.r and not t.w
    assert t.statistics().flush_range == 3


def test_big_flushes_keep_accesses_correct():
    p = Process()
    a = p.mmap(0, 64 * PAGE_SIZE)
    far = p.mmap(0, PAGE_SIZE)
    p.write(far, b"far")
    for i in range(64):
        p.write(a + i * PAGE_SIZE, bytes([i]))
    p.madvise(a, 40 * PAGE_SIZE, MADV_DONTNEED)  # a full flush: far's entry goes too
    assert far >> PAGE_SHIFT not in p.mm.tlb.r
    assert p.read(far, 3) == b"far"
    assert [p.read(a + i * PAGE_SIZE, 1)[0] for i in range(64)] == [0] * 40 + list(range(40, 64))
    p.check()
