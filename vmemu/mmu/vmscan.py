"""Reclaim: choosing folios and freeing them (``mm/vmscan.c``, ``try_to_unmap`` of ``mm/rmap.c``).

:func:`shrink_folio` frees one folio the way ``shrink_folio_list`` does:

* a lazily freed anonymous folio (``MADV_FREE``: anon, not swapbacked)
  that nobody wrote to since is *discarded*: its PTEs are cleared and it
  reads back as zeros; one written to again is kept (swapbacked again);
* any other anonymous folio gets a swap slot and enters the swap cache
  (``add_to_swap``); every PTE mapping it, found through rmap, becomes a
  swap PTE naming the slot, keeping the uffd-wp bit
  (``_PAGE_SWP_UFFD_WP``) and anon-exclusivity (``_PAGE_SWP_EXCLUSIVE``)
  (``try_to_unmap_one``); the data goes to the device's page store
  (``pageout``) and the folio leaves the cache and is freed
  (``__remove_mapping``);
* a shmem page-cache folio is unmapped (PTEs cleared, or a uffd-wp marker
  left in a uffd-wp VMA); then, if clean, dropped from the page cache; if
  dirty, its page-cache entry becomes a swap entry in the inode
  (``shmem_writeout``) and it is written and freed the same way - or,
  without a free slot, it stays in the page cache, unmapped;
* a folio only the swap cache holds is dropped (written first if dirty).

A large anonymous folio (a THP, PMD- or PTE-mapped) goes the way Linux
6.18 sends it when ``folio_alloc_swap`` cannot find a free cluster for it:

* lazily freed: ``try_to_unmap`` splits each PMD mapping
  (``TTU_SPLIT_HUGE_PMD``; vmstat ``thp_split_pmd``) and then discards the
  whole folio if no PTE was written since, or keeps it - PTE-mapped from
  now on - and makes it swapbacked again if one was;
* otherwise ``split_folio_to_list`` splits it into order-0 folios
  (``thp_split_page``, ``thp_swpout_fallback``) which are then reclaimed
  one by one - even without swap, where they simply stay, exactly as the
  kernel of the reference machine does for ``MADV_PAGEOUT`` of a THP.

vmemu's swap devices hand out single slots (no swap clusters), so a THP
is never swapped out whole (``THP_SWAP``; vmstat ``thp_swpout`` stays 0).

It keeps a folio that is mapped by a ``VM_LOCKED`` VMA (mlock), hugetlb,
poisoned, or held by anyone besides its mappings and caches (a fault in
progress, a pin). Without a swap device only lazily freed and
swap-cache-only folios can go.

Victims: :func:`try_to_free_pages`, the memory limit's reclaim hook, takes
``MADV_COLD`` folios first, then runs a clock over ``mem_map`` (second
chance: a folio whose accessed bits were set is spared once, its bits
cleared) - deterministic, LRU-ish. ``MADV_PAGEOUT`` reclaims the folios it
names directly, ignoring references (``reclaim_pages``). Both skip folios
mapped by more than one process and split a THP the range covers only
partly (``madvise_cold_or_pageout_pte_range``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from vmemu.constants import PAGE_SHIFT
from vmemu.errors import raise_errno
from vmemu.mmu.folio import Folio, PhysMem, folio_maybe_mapped_shared
from vmemu.mmu.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_SPECIAL,
    _PAGE_SWP_EXCLUSIVE,
    _PAGE_SWP_UFFD_WP,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
    swp_offset,
)
from vmemu.mmu.rmap import RmapHit, rmap_walk
from vmemu.mmu.swap_state import add_to_swap_cache, delete_from_swap_cache
from vmemu.mmu.swapfile import (
    PG_ACTIVE,
    PG_ANON,
    PG_ANON_EXCLUSIVE,
    PG_DIRTY,
    PG_HUGETLB,
    PG_REFERENCED,
    PG_SWAPBACKED,
    PG_SWAPCACHE,
    PG_UNEVICTABLE,
    SwapSpace,
    get_swap_space,
)
from vmemu.mmu.vma import VM_HUGETLB, VM_LOCKED, VM_PFNMAP, VM_UFFD_WP, Vma

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

SWAP_CLUSTER_MAX = 32
_UNEVICTABLE = PG_UNEVICTABLE
_PMD_SIZE = 1 << 21


def owner_map(phys: PhysMem) -> dict[int, Any]:
    """``id(vma) -> mm`` for every live mm (the kernel's ``vma->vm_mm``), for rmap walks."""
    return {id(v): mm for mm in phys.mms if not mm.dead for v in mm.vmas}


def _pte_slot(hit: RmapHit) -> tuple[list[int], int]:
    table = hit.mm.pgtables.pte_table(hit.address, False)
    assert table is not None
    return table, (hit.address >> PAGE_SHIFT) & 511


def _entry_slot(hit: RmapHit) -> tuple[list[int], int]:
    """The table and index of the PTE or PMD entry an rmap hit names."""
    if hit.level == "pmd":
        table = hit.mm.pgtables.pmd_table(hit.address, False)
        assert table is not None
        return table, (hit.address >> 21) & 511
    return _pte_slot(hit)


def folio_referenced(folio: Folio, hits: list[RmapHit]) -> bool:
    """Test and clear every mapping's accessed bit and PG.referenced (``folio_referenced``)."""
    referenced = bool(folio.flags & PG_REFERENCED)
    folio.flags &= ~PG_REFERENCED
    for hit in hits:
        table, idx = _entry_slot(hit)
        pte = table[idx]
        if pte & _PAGE_ACCESSED:
            table[idx] = pte & ~_PAGE_ACCESSED
            if hit.level == "pmd":
                hit.mm.tlb.flush_range(hit.address, hit.address + _PMD_SIZE)
            else:
                hit.mm.tlb.flush_page(hit.address)  # so the next access sets A again
            referenced = True
    return referenced


class _MmLocks:
    """Try-lock every mm of an rmap walk: reclaim never blocks on an mm (rmap trylock)."""

    def __init__(self, hits: list[RmapHit]) -> None:
        self.held: list[Any] = []
        for mm in {id(h.mm): h.mm for h in hits}.values():
            if not mm.lock.acquire(blocking=False):
                self.release()
                self.held = []
                self.ok = False
                return
            self.held.append(mm)
        self.ok = True

    def release(self) -> None:
        for mm in self.held:
            mm.lock.release()


def _rmap_hits(folio: Folio, owner_of: dict[int, Any]) -> list[RmapHit] | None:
    """The PTE mappings of ``folio``, or None if rmap cannot account for all of them."""
    if not folio.mapcount:
        return []
    hits = list(rmap_walk(folio, owner_of))
    if len(hits) != folio.mapcount or any(h.level != "pte" for h in hits):
        return None
    return hits


def shrink_folio(space: SwapSpace, folio: Folio, owner_of: dict[int, Any],
                 ignore_references: bool = True, hits: list[RmapHit] | None = None) -> bool:
    """Try to free one folio; True when it was freed (``shrink_folio_list`` for one folio)."""
    space.pgscan += 1
    phys = space.phys
    folio.flags = int(folio.flags)
    if folio.flags & _UNEVICTABLE or phys.mem_map[folio.pfn] is not folio:
        return False
    if folio.refcount != folio.mapcount + phys.extra_refs(folio):
        return False  # someone holds it: a fault in progress, a pin
    if folio.order:
        return _shrink_large(space, folio, owner_of, ignore_references)
    if hits is None:
        hits = _rmap_hits(folio, owner_of)
    if hits is None:
        return False
    if any(h.vma.vm_flags & VM_LOCKED for h in hits):
        return False  # mlocked: unevictable (try_to_unmap_one -> mlock_vma_folio)
    if not ignore_references and folio_referenced(folio, hits):
        return False
    locks = _MmLocks(hits)
    if not locks.ok:
        return False
    try:
        if folio.flags & PG_ANON:
            if not folio.flags & PG_SWAPBACKED:
                return _discard_lazyfree(space, folio, hits)
            return _pageout_anon(space, folio, hits)
        if folio.mapping is not None and hasattr(folio.mapping, "swapped") and \
                folio.mapping.pages.get(folio.index) is folio:
            return _pageout_shmem(space, folio, hits)
        if folio.flags & PG_SWAPCACHE and not folio.mapcount:
            return _drop_swapcache(space, folio)
        return False
    finally:
        locks.release()


def _shrink_large(space: SwapSpace, folio: Folio, owner_of: dict[int, Any],
                  ignore_references: bool) -> bool:
    """Reclaim a large anonymous folio (the ``folio_test_large`` paths of ``shrink_folio_list``).

    Lazily freed: split its PMD mappings and discard it whole if clean.
    Otherwise split it (``split_folio_to_list``: vmemu's swap has no
    clusters for a THP) and reclaim the order-0 pieces; True when every
    piece was freed.
    """
    from vmemu.mmu.huge_memory import count_vm_event, split_folio, split_huge_pmd

    if not folio.flags & PG_ANON:
        return False  # no large page-cache folios in vmemu (shmem_enabled=never)
    hits = list(rmap_walk(folio, owner_of))
    if len(hits) != folio.mapcount:
        return False  # mapped where rmap cannot see: leave it alone
    if any(h.vma.vm_flags & VM_LOCKED for h in hits):
        return False
    if not ignore_references and folio_referenced(folio, hits):
        return False
    locks = _MmLocks(hits)
    if not locks.ok:
        return False
    phys = space.phys
    try:
        if not folio.flags & PG_SWAPBACKED:
            for hit in hits:  # try_to_unmap_one(TTU_SPLIT_HUGE_PMD): split_huge_pmd_locked
                if hit.level == "pmd":
                    split_huge_pmd(hit.mm, hit.vma, hit.address)
            hits = list(rmap_walk(folio, owner_of))
            return _discard_lazyfree(space, folio, hits)
        if folio.flags & PG_SWAPCACHE or not split_folio(phys, folio):
            return False
        count_vm_event(phys, "thp_swpout_fallback")
    finally:
        locks.release()
    mem_map = phys.mem_map
    pieces = [mem_map[pfn] for pfn in range(folio.pfn, folio.pfn + folio.nr_pages)
              if isinstance(mem_map[pfn], Folio)]
    freed = [shrink_folio(space, piece, owner_of, ignore_references) for piece in pieces]
    return all(freed)


def _discard_lazyfree(space: SwapSpace, folio: Folio, hits: list[RmapHit]) -> bool:
    """A clean MADV_FREE folio: clear its PTEs and free it; a redirtied one stays."""
    slots = [_pte_slot(h) for h in hits]
    if folio.flags & PG_DIRTY or any(t[i] & _PAGE_DIRTY for t, i in slots):
        folio.flags |= PG_SWAPBACKED  # written since MADV_FREE: keep it, swap it next time
        return False
    if folio.flags & PG_SWAPCACHE:
        return False
    for hit, (table, idx) in zip(hits, slots, strict=True):
        table[idx] = 0
        hit.mm.tlb.flush_page(hit.address)
        folio.mapcount -= 1
        space.phys.folio_put(folio)
    space.pglazyfreed += folio.nr_pages
    space.pgsteal += folio.nr_pages
    return True


def _writeout(space: SwapSpace, folio: Folio) -> None:
    """Write a dirty swap-cache folio to its slot (``pageout`` -> ``swap_writepage``)."""
    entry = folio.private
    si = space.swap_info_get(entry)
    assert si is not None
    si.store.store(si.key(swp_offset(entry)), bytes(folio.data))
    folio.flags &= ~PG_DIRTY
    space.pswpout += 1


def _pageout_anon(space: SwapSpace, folio: Folio, hits: list[RmapHit]) -> bool:
    """add_to_swap + try_to_unmap + pageout + __remove_mapping for an anonymous folio."""
    if not folio.flags & PG_SWAPCACHE:
        entry = space.get_swap_page()
        if entry is None:
            return False  # no swap, or swap full: anon memory stays
        add_to_swap_cache(space, folio, entry)
        folio.flags |= PG_DIRTY  # the slot holds nothing yet
    entry = folio.private
    exclusive = bool(folio.flags & PG_ANON_EXCLUSIVE)
    for hit in hits:
        table, idx = _pte_slot(hit)
        pte = table[idx]
        if pte & _PAGE_DIRTY:
            folio.flags |= PG_DIRTY
        swp = entry
        if exclusive:
            swp |= _PAGE_SWP_EXCLUSIVE
        if pte & _PAGE_UFFD_WP:
            swp |= _PAGE_SWP_UFFD_WP
        space.swap_duplicate(entry)
        table[idx] = swp
        hit.mm.tlb.flush_page(hit.address)
        folio.mapcount -= 1
        space.phys.folio_put(folio)
    folio.flags &= ~PG_ANON_EXCLUSIVE
    return _drop_swapcache(space, folio)


def _drop_swapcache(space: SwapSpace, folio: Folio) -> bool:
    """Write an unmapped swap-cache folio if dirty, then free it (``__remove_mapping``)."""
    if folio.flags & PG_DIRTY and space.swap_count(folio.private):
        _writeout(space, folio)
    delete_from_swap_cache(space, folio)
    space.pgsteal += 1
    return True


def _pageout_shmem(space: SwapSpace, folio: Folio, hits: list[RmapHit]) -> bool:
    """try_to_unmap, then ``pageout`` -> ``shmem_writeout`` for a shmem page-cache folio.

    The folio is unmapped from every mapping first, whatever follows (as
    ``shrink_folio_list`` does). A clean one - never written, so all zeros -
    then simply leaves the page cache (``__remove_mapping``); a dirty one
    goes to a swap slot, or, with no swap or swap full, stays in the page
    cache unmapped (``AOP_WRITEPAGE_ACTIVATE``): observed on 6.18.
    """
    for hit in hits:
        table, idx = _pte_slot(hit)
        pte = table[idx]
        if pte & _PAGE_DIRTY:
            folio.flags |= PG_DIRTY
        wp = pte & _PAGE_UFFD_WP and hit.vma.vm_flags & VM_UFFD_WP
        table[idx] = hit.mm.uffd_wp_marker_value if wp else 0  # pte_install_uffd_wp_if_needed
        hit.mm.tlb.flush_page(hit.address)
        folio.mapcount -= 1
        space.phys.folio_put(folio)
    inode = folio.mapping
    if not folio.flags & PG_DIRTY and folio.data == space.phys.zero_data:
        del inode.pages[folio.index]  # clean: dropped, a later read faults in zeros
        folio.mapping = None
        space.phys.folio_put(folio)
        space.pgsteal += 1
        return True
    entry = space.get_swap_page()
    if entry is None:
        return False  # kept in the page cache, unmapped
    add_to_swap_cache(space, folio, entry)
    del inode.pages[folio.index]
    inode.swapped[folio.index] = entry
    space.shmem_swaplist[inode.ino] = inode
    space.swap_duplicate(entry)  # the inode's reference on the slot
    folio.mapping = None
    space.phys.folio_put(folio)  # the page cache's reference
    _writeout(space, folio)
    delete_from_swap_cache(space, folio)
    space.pgsteal += 1
    return True


def reclaim_folio(phys: PhysMem, folio: Folio) -> bool:
    """Reclaim one folio now if it can go, ignoring its accessed bits; True when freed."""
    space = get_swap_space(phys)
    with space.lock:
        return shrink_folio(space, folio, owner_map(phys))


def reclaim_pages(phys: PhysMem, folios: list[Folio]) -> int:
    """Reclaim the given folios, ignoring references (``reclaim_pages``); returns pages freed."""
    space = get_swap_space(phys)
    before = phys.pages_in_use
    with space.lock:
        owner_of = owner_map(phys)
        for folio in folios:
            shrink_folio(space, folio, owner_of)
    return before - phys.pages_in_use


def _candidate(folio: Any, have_swap: bool) -> bool:
    """Cheap filter before rmap work: could reclaim free this folio at all?"""
    if not isinstance(folio, Folio):
        return False
    folio.flags = int(folio.flags)
    if folio.flags & _UNEVICTABLE:
        return False
    if have_swap or folio.flags & PG_SWAPCACHE:
        return True
    return bool(folio.flags & PG_ANON) and not folio.flags & PG_SWAPBACKED


def try_to_free_pages(phys: PhysMem, nr_pages: int) -> int:
    """Free at least ``nr_pages`` frames if possible; returns frames freed (``try_to_free_pages``).

    ``MADV_COLD`` folios go first, oldest first; then a clock sweeps
    ``mem_map`` from where it stopped last time, sparing a referenced folio
    once (its accessed bits are cleared on the way).
    """
    space = get_swap_space(phys)
    before = phys.pages_in_use
    with space.lock:
        have_swap = space.nr_swap_pages() > 0
        owner_of = owner_map(phys)
        mem_map = phys.mem_map
        for pfn in list(space.cold):
            if before - phys.pages_in_use >= nr_pages:
                return before - phys.pages_in_use
            del space.cold[pfn]
            folio: Any = mem_map[pfn] if pfn < len(mem_map) else None
            if _candidate(folio, have_swap) and folio.pfn == pfn:
                shrink_folio(space, folio, owner_of)
        n = len(mem_map)
        hand = space.lru_hand % n if n else 0
        for _ in range(2 * n):
            if before - phys.pages_in_use >= nr_pages:
                break
            pos = hand
            folio = mem_map[pos]
            hand = pos + 1 if pos + 1 < n else 0
            if not _candidate(folio, have_swap) or folio.pfn != pos:
                continue
            if folio.order:  # a THP: references are checked on all its mappings, PMD or PTE
                shrink_folio(space, folio, owner_of, ignore_references=False)
                continue
            hits = _rmap_hits(folio, owner_of)
            if hits is None or folio_referenced(folio, hits):
                continue
            shrink_folio(space, folio, owner_of, hits=hits)
        space.lru_hand = hand
    return before - phys.pages_in_use


# -- madvise: MADV_COLD, MADV_PAGEOUT -----------------------------------------------


def can_madv_lru_vma(vma: Vma) -> bool:
    """COLD and PAGEOUT refuse locked, PFN-mapped and hugetlb VMAs (``can_madv_lru_vma``)."""
    return not vma.vm_flags & (VM_LOCKED | VM_PFNMAP | VM_HUGETLB)


def _huge_pmd_folios(mm: MmStruct, start: int, end: int, out: list[Folio]) -> None:
    """The PMD branch of ``madvise_cold_or_pageout_pte_range``.

    A THP mapped only here and covered whole is made old and taken as it
    is; one covered partly is split (``split_folio``) so the PTE walk sees
    its pages; one mapped by another process too is left alone.
    """
    from vmemu.mmu.huge_memory import split_folio

    mem_map = mm.phys.mem_map
    addr = start & ~(_PMD_SIZE - 1)
    while addr < end:
        lo, hi = max(addr, start), min(addr + _PMD_SIZE, end)
        pmd = mm.pgtables.pmd_table(addr, False)
        e = pmd[(addr >> 21) & 511] if pmd is not None else 0
        if e & _PAGE_PSE and e & (_PAGE_PRESENT | _PAGE_PROTNONE) and not e & _PAGE_SPECIAL:
            folio = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]  # a THP (not the huge zero page)
            if isinstance(folio, Folio) and not folio.flags & PG_HUGETLB and \
                    not folio_maybe_mapped_shared(folio):
                if hi - lo != _PMD_SIZE:
                    split_folio(mm.phys, folio)
                else:
                    assert pmd is not None
                    if e & _PAGE_ACCESSED:
                        pmd[(addr >> 21) & 511] = e & ~_PAGE_ACCESSED
                        mm.tlb.flush_range(addr, addr + _PMD_SIZE)
                    folio.flags = int(folio.flags) & ~(PG_REFERENCED | PG_ACTIVE)
                    out.append(folio)
        addr += _PMD_SIZE


def _fully_mapped_here(mm: MmStruct, folio: Folio, addr: int, pfn: int, start: int,
                       end: int) -> bool:
    """Do consecutive PTEs inside ``[start, end)`` map all of ``folio`` (``folio_pte_batch``)?"""
    first = addr - ((pfn - folio.pfn) << PAGE_SHIFT)
    if first < start or first + (folio.nr_pages << PAGE_SHIFT) > end:
        return False
    get_pte = mm.pgtables.get_pte
    return all((get_pte(first + (i << PAGE_SHIFT)) & PTE_PFN_MASK) >> PAGE_SHIFT == folio.pfn + i
               for i in range(folio.nr_pages))


def _exclusive_folios(mm: MmStruct, start: int, end: int) -> list[Folio]:
    """Folios mapped once in the range, PTEs made old (``madvise_cold_or_pageout_pte_range``).

    A PTE-mapped large folio the range covers whole is taken whole when no
    other process maps it; one covered partly is split first, unless it is
    shared, when it is skipped.
    """
    from vmemu.mmu.huge_memory import split_folio

    out: list[Folio] = []
    _huge_pmd_folios(mm, start, end, out)
    taken: set[int] = set()
    mem_map = mm.phys.mem_map
    for addr, table, lo, hi in mm.pgtables.iter_pte_tables(start, end):
        base = addr & ~(_PMD_SIZE - 1)
        for idx in range(lo, hi):
            pte = table[idx]
            if not pte & (_PAGE_PRESENT | _PAGE_PROTNONE) or pte & _PAGE_SPECIAL:
                continue
            pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
            folio = mem_map[pfn]
            if not isinstance(folio, Folio):
                continue
            folio.flags = int(folio.flags)
            if folio.order:
                if folio.flags & PG_HUGETLB:
                    continue
                if id(folio) in taken:
                    pass
                elif not _fully_mapped_here(mm, folio, base | (idx << PAGE_SHIFT), pfn,
                                            start, end):
                    if folio_maybe_mapped_shared(folio) or not split_folio(mm.phys, folio):
                        continue
                    # now an order-0 piece, or the shared zero page if it was all zeros
                    # (the kernel reads the PTE again and skips a zero page)
                    pte = table[idx]
                    folio = mem_map[pfn]
                    if pte & _PAGE_SPECIAL or not isinstance(folio, Folio):
                        continue
                elif folio.mapcount != folio.nr_pages:
                    continue  # fully mapped here but shared
                else:
                    taken.add(id(folio))
                    out.append(folio)
                    folio.flags &= ~(PG_REFERENCED | PG_ACTIVE)
            if not folio.order and folio.mapcount != 1:
                continue
            if pte & _PAGE_ACCESSED:
                table[idx] = pte & ~_PAGE_ACCESSED
                mm.tlb.flush_page(base | (idx << PAGE_SHIFT))
            if not folio.order:
                folio.flags &= ~(PG_REFERENCED | PG_ACTIVE)
                out.append(folio)
    return out


def madvise_cold(mm: MmStruct, vma: Vma, start: int, end: int, advice: int) -> None:
    """MADV_COLD: make the range's private folios the first reclaim victims (``madvise_cold``)."""
    if not can_madv_lru_vma(vma):
        raise_errno(errno.EINVAL)
    space = get_swap_space(mm.phys)
    with space.lock:
        for folio in _exclusive_folios(mm, start, end):
            space.cold.pop(folio.pfn, None)
            space.cold[folio.pfn] = None  # folio_deactivate: to the tail of the inactive list


def madvise_pageout(mm: MmStruct, vma: Vma, start: int, end: int, advice: int) -> None:
    """MADV_PAGEOUT: reclaim the range's private folios now (``madvise_pageout``).

    Anonymous pages need a swap device (without one they stay, except
    lazily freed ones, which are discarded); shmem pages go to swap from
    the page cache. Folios mapped more than once are left alone.
    """
    if not can_madv_lru_vma(vma):
        raise_errno(errno.EINVAL)
    reclaim_pages(mm.phys, _exclusive_folios(mm, start, end))
