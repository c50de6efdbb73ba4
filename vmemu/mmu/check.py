"""Invariant checks over all address spaces sharing one physical memory.

What ``CONFIG_DEBUG_VM`` and friends check in the kernel, run on demand:
VMA trees sorted and non-overlapping; page tables owned by exactly one mm;
every present entry inside a VMA and pointing at a live folio; each folio's
mapcount equal to the entries that map it, its refcount equal to those
plus the page cache and swap cache references; rmap finding every mapping;
no folio left without an owner; each TLB entry agreeing with the tables;
each swap slot's count equal to the swap PTEs and shmem entries naming it.
A failure raises ``AssertionError`` naming what is wrong.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from vmemu.constants import PAGE_SHIFT
from vmemu.mmu.folio import PG, Folio, PhysMem
from vmemu.mmu.pgtable import (
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SPECIAL,
    PTE_PFN_MASK,
    SWP_HWPOISON,
    is_real_swap_pte,
    swp_offset,
    swp_type,
)
from vmemu.mmu.rmap import rmap_walk
from vmemu.mmu.vma import AnonVma

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct


def check_mm(mm: MmStruct, maps: Counter[int], entire: Counter[int],
             owner_of: dict[int, Any]) -> None:
    """Check one mm and add its folio mappings to ``maps`` / ``entire``."""
    mm.vmas._check()
    for vma in mm.vmas:
        owner_of[id(vma)] = mm
    mem_map = mm.phys.mem_map
    zero_pfn = mm.phys.zero_pfn
    for addr, e, level in mm.pgtables.iter_present():
        found = mm.vmas.vma_lookup(addr)
        assert found is not None, f"{level} entry {e:#x} at {addr:#x} outside any VMA"
        if not e & (_PAGE_PRESENT | _PAGE_PROTNONE):
            if is_real_swap_pte(e):
                mm.check_swap_pte(addr, e)
            elif swp_type(e) == SWP_HWPOISON:
                bad = mem_map[swp_offset(e)]
                assert isinstance(bad, Folio) and bad.flags & PG.hwpoison, \
                    f"hwpoison entry at {addr:#x} names a frame that is not poisoned"
            continue
        pfn = (e & PTE_PFN_MASK) >> PAGE_SHIFT
        if e & _PAGE_SPECIAL:
            want = zero_pfn if level == "pte" else mm.phys.huge_zero_pfn
            assert pfn == want, f"special {level} entry at {addr:#x} is not the zero page"
            assert not e & _PAGE_RW, f"writable zero page at {addr:#x}"
            continue
        folio = mem_map[pfn]
        assert isinstance(folio, Folio), f"entry at {addr:#x} maps pfn {pfn:#x} with no folio"
        if level == "pmd" and e & _PAGE_PSE:
            entire[folio.pfn] += 1
        else:
            maps[folio.pfn] += 1
    _check_tlb(mm)


def _check_tlb(mm: MmStruct) -> None:
    """Every TLB entry must be what a walk of the tables would give now."""
    tlb = mm.tlb
    mem_map = mm.phys.mem_map
    for vpn, buf in tlb.r.items():
        addr = vpn << PAGE_SHIFT
        pmd = mm.pgtables.pmd_table(addr, False)
        assert pmd is not None, f"TLB maps {addr:#x} but no tables do"
        me = pmd[(addr >> 21) & 511]
        if me & _PAGE_PSE:
            e = me
            pfn = ((e & PTE_PFN_MASK) >> PAGE_SHIFT) + ((addr >> PAGE_SHIFT) & 511)
        else:
            e = mm.pgtables.get_pte(addr)
            pfn = (e & PTE_PFN_MASK) >> PAGE_SHIFT
        assert e & _PAGE_PRESENT, f"stale TLB entry for non-present {addr:#x}"
        folio = mem_map[pfn]
        assert isinstance(folio, Folio), f"TLB entry for {addr:#x} names a freed frame"
        want = folio.page_buffer(pfn)
        assert buf is want or (isinstance(buf, memoryview) and buf == want and
                               buf.obj is folio.data), f"TLB entry for {addr:#x} names another page"
        if vpn in tlb.w:
            assert e & _PAGE_RW and e & _PAGE_DIRTY, f"TLB allows writing read-only {addr:#x}"
    for vpn in tlb.w:
        assert vpn in tlb.r, f"write-only TLB entry {vpn:#x}"


def check_phys(phys: PhysMem, mms: list[MmStruct]) -> None:
    """Check every mm on ``phys`` and the folio counts they imply."""
    maps: Counter[int] = Counter()
    entire: Counter[int] = Counter()
    owner_of: dict[int, Any] = {}
    table_pfns: set[int] = set()
    for mm in mms:
        check_mm(mm, maps, entire, owner_of)
        mine = mm.pgtables.table_pfns()
        assert not table_pfns & mine, "a page-table page is shared between mms"
        table_pfns |= mine
    for pfn, obj in enumerate(phys.mem_map):
        if isinstance(obj, list):
            assert pfn in table_pfns, f"page-table page {pfn:#x} leaked"
    for folio in phys.live_folios():
        mapped = sum(maps[p] for p in range(folio.pfn, folio.pfn + folio.nr_pages))
        mapcount = mapped + entire[folio.pfn]
        assert folio.mapcount == mapcount, \
            f"{folio!r}: mapcount {folio.mapcount} but {mapcount} entries map it"
        assert folio.entire_mapcount == entire[folio.pfn], f"{folio!r}: entire_mapcount wrong"
        extra = phys.extra_refs(folio)
        assert folio.refcount == mapcount + extra, \
            f"{folio!r}: refcount {folio.refcount} != {mapcount} mappings + {extra} other refs"
        assert folio.refcount > 0, f"{folio!r} has no references (leaked)"
        if mapcount:
            hits = list(rmap_walk(folio, owner_of))
            assert len(hits) == mapcount, \
                f"{folio!r}: rmap finds {len(hits)} mappings, tables have {mapcount}"
        if folio.flags & PG.anon:
            assert isinstance(folio.mapping, AnonVma), f"{folio!r}: anon folio without anon_vma"
            if folio.flags & PG.anon_exclusive and folio.flags & PG.large == 0:
                assert mapcount <= 1, f"{folio!r}: anon-exclusive but mapped {mapcount} times"
    if phys.swap is not None:
        phys.swap._check(mms)  # swap counts == swap PTEs + shmem entries; no slot leaks
