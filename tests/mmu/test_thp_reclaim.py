"""Reclaim and MADV_FREE of transparent huge pages (``shrink_folio_list``, ``madvise_free_huge_pmd``).

What Linux 6.18 does, measured on the reference machine (no swap there; see
tests/differential/test_kernel_thp_reclaim.py), and what vmemu mirrors:

* MADV_PAGEOUT of a whole THP: the folio cannot get a swap cluster, so it
  is split (``thp_split_pmd``, ``thp_split_page``, ``thp_swpout_fallback``)
  and its 512 pages are swapped out one by one - or stay, without swap;
* MADV_PAGEOUT / MADV_COLD of part of a THP splits it first;
* MADV_FREE of a whole THP keeps it PMD-mapped, clean and lazily freeable
  (``pglazyfree`` 512); reclaim then splits the PMD and discards the folio
  (reads back zero) - unless a page was written since, when it stays,
  PTE-mapped; MADV_FREE of part of a THP splits it;
* a THP mapped by two processes is left alone by all three.

Every scenario ends with ``check()``: mapcounts of PMD- and PTE-mapped parts,
rmap and swap counts agree with the page tables.
"""

from __future__ import annotations

import pytest

from vmemu import (
    MADV_COLD,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_PAGEOUT,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
)
from vmemu.constants import PMD_SIZE
from vmemu.mmu.folio import PG
from vmemu.mmu.pgtable import _PAGE_PSE, is_real_swap_pte, pte_present

P = PAGE_SIZE
H = PMD_SIZE


def page(i: int) -> bytes:
    return bytes([(i * 5 + 3) & 0xFF]) * 32 + i.to_bytes(4, "little") * 8


def setup(swap: bool = True, thps: int = 1, limit: int | None = None):
    k = Kernel(mem_limit_pages=limit)
    if swap:
        k.swapon(pages=2048)
    p = k.spawn()
    a = p.mmap(0, thps * H)
    assert a % H == 0
    p.madvise(a, thps * H, MADV_HUGEPAGE)
    for i in range(512 * thps):
        p.write(a + i * P, page(i))
    for t in range(thps):
        assert huge(p, a + t * H)
    return k, p, a


def pmd(p, addr: int) -> int:
    return p.mm.pgtables.walk(addr)[2].entry


def huge(p, addr: int) -> bool:
    return bool(pmd(p, addr) & _PAGE_PSE)


def folio_at(p, addr: int):
    e = pmd(p, addr) if huge(p, addr) else p.mm.pgtables.get_pte(addr)
    return p.mm.phys.mem_map[(e >> 12) & ((1 << 40) - 1)]


def smaps_kb(p, addr: int, field: str) -> int:
    block = p.smaps()[p.smaps().index(f"{addr:08x}-"):]
    return int(next(ln for ln in block.splitlines() if ln.startswith(field + ":")).split()[1])


def vmstat(k, *names: str) -> dict[str, int]:
    return {n: k.phys.vmstat[n] for n in names}


SPLIT = ("thp_split_pmd", "thp_split_page", "thp_swpout_fallback", "thp_swpout")


def contents_ok(p, a: int, n: int = 512) -> bool:
    return all(p.read(a + i * P, len(page(i))) == page(i) for i in range(n))


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
def test_pageout_whole_thp_splits_then_swaps_each_page(swap: bool) -> None:
    k, p, a = setup(swap)
    before = vmstat(k, *SPLIT)
    p.madvise(a, H, MADV_PAGEOUT)
    p.check()
    assert not huge(p, a) and smaps_kb(p, a, "AnonHugePages") == 0
    delta = {n: v - before[n] for n, v in vmstat(k, *SPLIT).items()}
    assert delta == {"thp_split_pmd": 1, "thp_split_page": 1, "thp_swpout_fallback": 1,
                     "thp_swpout": 0}
    ptes = [p.mm.pgtables.get_pte(a + i * P) for i in range(512)]
    if swap:
        assert all(is_real_swap_pte(e) for e in ptes)
        assert k.swap_statistics().pswpout == 512 and k.memory_statistics().pages_in_use == 0
        assert smaps_kb(p, a, "Swap") == 2048
    else:
        assert all(pte_present(e) for e in ptes)
        assert folio_at(p, a).order == 0
    assert contents_ok(p, a)
    p.check()


def test_pageout_part_of_a_thp_splits_it_first() -> None:
    k, p, a = setup()
    p.madvise(a + 3 * P, 2 * P, MADV_PAGEOUT)
    p.check()
    assert vmstat(k, *SPLIT) == {"thp_split_pmd": 1, "thp_split_page": 1,
                                 "thp_swpout_fallback": 0, "thp_swpout": 0}
    swapped = [i for i in range(512) if is_real_swap_pte(p.mm.pgtables.get_pte(a + i * P))]
    assert swapped == [3, 4]
    assert contents_ok(p, a)
    p.check()


def test_cold_whole_thp_keeps_it_and_part_splits() -> None:
    k, p, a = setup(thps=2)
    p.madvise(a, H, MADV_COLD)
    assert huge(p, a) and k.phys.vmstat["thp_split_page"] == 0
    p.madvise(a + H + P, P, MADV_COLD)
    assert not huge(p, a + H) and k.phys.vmstat["thp_split_page"] == 1
    p.check()


def test_shared_thp_after_fork_is_left_alone() -> None:
    k, p, a = setup()
    c = p.fork()
    for advice in (MADV_PAGEOUT, MADV_COLD, MADV_FREE):
        p.madvise(a, H, advice)
        p.madvise(a + P, P, advice)
    assert huge(p, a) and huge(c, a)
    f = folio_at(p, a)
    assert f.order == 9 and f.flags & PG.swapbacked and f.entire_mapcount == 2
    assert k.swap_statistics().pswpout == 0
    k.check()
    c.exit()
    p.madvise(a, H, MADV_PAGEOUT)  # now exclusive again
    assert not huge(p, a) and k.swap_statistics().pswpout == 512
    assert contents_ok(p, a)
    k.check()


def test_madv_free_whole_thp_keeps_it_and_reclaim_discards_it() -> None:
    k, p, a = setup(swap=False)
    p.madvise(a, H, MADV_FREE)
    assert huge(p, a) and k.phys.vmstat["thp_split_page"] == 0
    assert k.phys.vmstat["pglazyfree"] == 512
    assert smaps_kb(p, a, "LazyFree") == 2048 and smaps_kb(p, a, "AnonHugePages") == 2048
    assert contents_ok(p, a, 4)  # contents stay until reclaim
    p.madvise(a, H, MADV_FREE)  # reading kept it clean: free again (reads set A, not D)
    p.check()
    p.madvise(a, H, MADV_PAGEOUT)
    assert k.swap_statistics().pglazyfreed == 512 and k.memory_statistics().pages_in_use == 0
    assert k.phys.vmstat["thp_split_pmd"] == 1 and k.phys.vmstat["thp_split_page"] == 0
    assert p.read(a, P) == bytes(P) and p.read(a + H - P, P) == bytes(P)
    p.check()


def test_write_after_madv_free_cancels_it_for_the_whole_thp() -> None:
    k, p, a = setup(swap=False)
    p.madvise(a, H, MADV_FREE)
    p.write(a + P, b"again")
    p.madvise(a, H, MADV_PAGEOUT)
    f = folio_at(p, a)
    assert f.order == 9 and f.flags & PG.swapbacked and not huge(p, a)  # PTE-mapped now
    assert k.phys.vmstat["thp_split_pmd"] == 1 and k.swap_statistics().pglazyfreed == 0
    assert p.read(a + P, 5) == b"again" and p.read(a, 32) == page(0)[:32]
    p.check()
    # PTE-mapped and covered whole: FREE frees it whole again, reclaim discards it
    p.madvise(a, H, MADV_FREE)
    assert folio_at(p, a).order == 9 and not folio_at(p, a).flags & PG.swapbacked
    p.madvise(a, H, MADV_PAGEOUT)
    assert p.read(a + P, 5) == bytes(5) and k.swap_statistics().pglazyfreed == 512
    p.check()


def test_madv_free_part_of_a_thp_splits_it() -> None:
    k, p, a = setup(swap=False)
    p.madvise(a + 8 * P, 4 * P, MADV_FREE)
    assert not huge(p, a) and k.phys.vmstat["thp_split_page"] == 1
    assert k.phys.vmstat["pglazyfree"] == 4
    p.write(a + 9 * P, b"kept")
    p.madvise(a, H, MADV_PAGEOUT)  # no swap: only the clean lazyfree pages go
    assert [p.read(a + i * P, 4) for i in (8, 9, 10, 11)] == \
        [bytes(4), b"kept", bytes(4), bytes(4)]
    assert p.read(a + 7 * P, 64) == page(7) and p.read(a + 12 * P, 64) == page(12)
    assert k.swap_statistics().pglazyfreed == 3
    p.check()


def test_pte_mapped_thp_covered_whole_is_paged_out_whole() -> None:
    k, p, a = setup()
    p.mprotect(a, P, PROT_READ)
    p.mprotect(a, P, PROT_READ | PROT_WRITE)  # splits the PMD, the folio stays whole
    assert not huge(p, a) and folio_at(p, a).order == 9
    p.madvise(a, H, MADV_PAGEOUT)
    assert k.swap_statistics().pswpout == 512 and k.phys.vmstat["thp_swpout_fallback"] == 1
    assert contents_ok(p, a)
    p.check()


def test_memory_pressure_splits_and_swaps_thps() -> None:
    k, p, a = setup(thps=1, limit=700)
    b = p.mmap(0, H)
    p.madvise(b, H, MADV_HUGEPAGE)
    p.write(b, b"second")  # needs 512 frames: the first THP is split and swapped
    p.check()
    assert huge(p, b) and not huge(p, a)
    assert k.phys.vmstat["thp_swpout_fallback"] == 1 and k.swap_statistics().pswpout >= 300
    assert k.memory_statistics().oom_failures == 0
    assert contents_ok(p, a)
    p.check()


def test_memory_pressure_discards_a_lazyfree_thp_without_swap() -> None:
    k, p, a = setup(swap=False, limit=700)
    p.madvise(a, H, MADV_FREE)
    b = p.mmap(0, H)
    p.madvise(b, H, MADV_HUGEPAGE)
    p.write(b, b"second")
    assert huge(p, b) and p.read(a, P) == bytes(P)
    assert k.swap_statistics().pglazyfreed == 512
    p.check()


def test_memory_pressure_never_takes_a_locked_thp() -> None:
    k, p, a = setup(thps=1, limit=700)
    p.mlock(a, H)
    b = p.mmap(0, H)
    p.madvise(b, H, MADV_HUGEPAGE)
    p.write(b, b"second")  # no room for a THP: falls back to a 4 KiB page
    assert huge(p, a) and not huge(p, b) and k.phys.vmstat["thp_fault_fallback"] == 1
    assert k.swap_statistics().pswpout == 0 and k.phys.vmstat["thp_split_page"] == 0
    assert p.read(b, 6) == b"second" and contents_ok(p, a, 8)
    p.check()


@pytest.mark.parametrize("advice", ["MADV_COLD", "MADV_PAGEOUT", "MADV_FREE"])
def test_partial_advice_splitting_a_thp_onto_the_zero_page(advice):
    """A split maps all-zero subpages to the zero page; the walk must go on from there.

    COLD/PAGEOUT/FREE of part of a PTE-mapped THP split the folio
    (``split_folio``), and the PTE being looked at may then be the shared
    zero page (``try_to_map_unused_to_zeropage``): the kernel re-reads it and
    skips it, vmemu raised AttributeError.
    """
    import vmemu

    k = Kernel()
    k.swapon(pages=1024)
    p = k.spawn()
    raw = p.mmap(0, 4 * PMD_SIZE)
    a = (raw + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    p.madvise(a, PMD_SIZE, MADV_HUGEPAGE)
    p.write(a + P, b"one")  # page 0 stays all zero
    p.mprotect(a + PMD_SIZE - P, P, PROT_READ)  # PTE-mapped from now on, still one folio
    p.madvise(a, 2 * P, getattr(vmemu, advice))
    assert p.read(a, 1) == b"\0" and p.read(a + P, 3) == b"one"
    k.check()
