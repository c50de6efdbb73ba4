"""Reclaim under the memory limit: swap out and back transparently, victims, what never goes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from swap_helpers import page, pressured, pte, swapped

from vmemu import (
    MADV_COLD,
    MADV_FREE,
    MAP_ANONYMOUS,
    MAP_LOCKED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
    OomKill,
)
from vmemu.mmu.pgtable import is_real_swap_pte, pte_pfn, pte_present, pte_swp_exclusive
from vmemu.mmu.vmscan import reclaim_folio, try_to_free_pages

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE


def test_pressure_swaps_out_and_back_with_contents_intact():
    k = Kernel(mem_limit_pages=8)
    k.swapon(pages=64)
    p = k.spawn()
    a = p.mmap(0, 32 * P)
    for i in range(32):
        p.write(a + i * P, page(i))
        assert k.memory_statistics().pages_in_use <= 8
        p.check()
    for _ in range(2):
        for i in range(32):
            assert p.read(a + i * P, P) == page(i)
            p.check()
    stats = k.swap_statistics()
    assert stats.pswpout >= 24 and stats.pswpin >= 24
    assert k.memory_statistics().oom_failures == 0


def test_pressure_across_fork_shares_swap_entries():
    k, p, a = pressured(limit=6, swap_pages=64, npages=4)
    c = p.fork()
    b = c.mmap(0, 6 * P)
    for i in range(6):
        c.write(b + i * P, page(100 + i))  # pushes the shared COW pages out of both
        k.check()
    shared = swapped(p, a, 4)
    assert shared
    for i in shared:
        e = pte(p, a + i * P)
        assert e == pte(c, a + i * P) and not pte_swp_exclusive(e)
        assert p.mm.swap_count(e) == 2
    c.write(a, b"child")
    assert p.read(a, P) == page(0) and c.read(a, 5) == b"child"
    assert [c.read(b + i * P, P) for i in range(6)] == [page(100 + i) for i in range(6)]
    k.check()
    c.exit()
    p.exit()
    k.check()
    assert k.swap_statistics().used_slots == 0


def test_shmem_under_pressure():
    k = Kernel(mem_limit_pages=4)
    k.swapon(pages=32)
    p = k.spawn()
    s = p.mmap(0, 10 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    for i in range(10):
        p.write(s + i * P, page(i))
        k.check()
    c = p.fork()
    for i in range(10):
        assert c.read(s + i * P, P) == page(i)
        k.check()
    assert k.swap_statistics().shmem_swapped > 0


def test_without_swap_only_lazyfree_pages_go():
    _, p, a = pressured(limit=4, swap_pages=0, npages=4)
    p.madvise(a, 2 * P, MADV_FREE)
    b = p.mmap(0, 2 * P)
    p.write(b, b"x")
    p.write(b + P, b"y")  # fits: the two MADV_FREE pages were discarded
    assert p.read(a, P) == bytes(P) and p.read(a + 2 * P, P) == page(2)
    p.check()
    with pytest.raises(OomKill):
        p.write(p.mmap(0, P), b"z")  # nothing left to reclaim
    p.check()


def test_locked_pages_are_never_reclaimed():
    k = Kernel(mem_limit_pages=4)
    k.swapon(pages=32)
    p = k.spawn()
    locked = p.mmap(0, 3 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED)
    a = p.mmap(0, 4 * P)
    for i in range(4):
        p.write(a + i * P, page(i))
        p.check()
    assert all(pte_present(pte(p, locked + i * P)) for i in range(3))
    assert [p.read(a + i * P, P) for i in range(4)] == [page(i) for i in range(4)]


def test_cold_pages_are_the_first_victims():
    _, p, a = pressured(limit=6, swap_pages=32, npages=6)
    p.madvise(a + 4 * P, 2 * P, MADV_COLD)
    b = p.mmap(0, 2 * P)
    p.write(b, b"1")
    p.write(b + P, b"2")
    assert swapped(p, a, 6) == [4, 5]
    p.check()


def test_clock_spares_recently_used_pages_once():
    _, p, a = pressured(limit=4, swap_pages=32, npages=4)
    # every page was just touched (accessed bit set): the clock clears them all on its
    # first sweep and takes the first one on the second
    b = p.mmap(0, P)
    p.write(b, b"new")
    assert len(swapped(p, a, 4)) == 1
    p.check()


def test_reclaim_is_deterministic():
    def run() -> list[int]:
        k = Kernel(mem_limit_pages=5)
        k.swapon(pages=64)
        p = k.spawn()
        a = p.mmap(0, 16 * P)
        for i in (3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3):
            p.write(a + i * P, page(i))
        return [pte(p, a + i * P) for i in range(16)]

    assert run() == run()


def test_direct_reclaim_api():
    k = Kernel()
    k.swapon(pages=8)
    p = k.spawn()
    a = p.mmap(0, 2 * P)
    p.write(a, page(1))
    p.write(a + P, page(2))
    folio = k.phys.pfn_to_folio(pte_pfn(pte(p, a)))
    assert reclaim_folio(k.phys, folio)
    assert is_real_swap_pte(pte(p, a))
    assert try_to_free_pages(k.phys, 1) == 1
    assert k.memory_statistics().pages_in_use == 0
    assert p.read(a, P) == page(1) and p.read(a + P, P) == page(2)
    p.check()


@settings(max_examples=max(40, settings().max_examples * 2 // 5))
@given(st.lists(st.tuples(st.sampled_from(["write", "read", "fork", "exit", "cold", "free"]),
                          st.integers(0, 11), st.integers(0, 255)), max_size=40),
       st.integers(3, 8))
def test_random_pressure_matches_a_byte_model(ops, limit):
    k = Kernel(mem_limit_pages=limit)
    k.swapon(pages=64)
    procs = [k.spawn()]
    a = procs[0].mmap(0, 12 * P)
    models = [bytearray(12 * P)]
    for op, i, v in ops:
        n = v % len(procs)
        p, model = procs[n], models[n]
        if op == "write":
            p.write(a + i * P + v, bytes([v]) * 16)
            model[i * P + v:i * P + v + 16] = bytes([v]) * 16
        elif op == "read":
            assert p.read(a + i * P, P) == bytes(model[i * P:(i + 1) * P])
        elif op == "fork" and len(procs) < 3:
            procs.append(p.fork())
            models.append(bytearray(model))
        elif op == "exit" and n:
            p.exit()
            del procs[n], models[n]
        elif op == "cold":
            p.madvise(a + i * P, P, MADV_COLD)
        elif op == "free":
            p.madvise(a + i * P, P, MADV_FREE)
            # contents are unspecified until written again: re-zero both
            p.write(a + i * P, bytes(P))
            model[i * P:(i + 1) * P] = bytes(P)
        k.check()
    for p, model in zip(procs, models, strict=True):
        assert p.read(a, 12 * P) == bytes(model)
    k.check()
