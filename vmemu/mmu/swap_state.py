"""The swap cache and swap-in: ``mm/swap_state.c`` plus ``do_swap_page``.

The swap cache maps a swap entry to the folio holding that slot's data
while both exist: a folio being written out, a folio read back in, a
folio read ahead by ``MADV_WILLNEED``. It holds one reference on each
folio and sets ``PG.swapcache`` with the entry in ``folio.private`` (the
kernel's ``folio->swap``).

Swap-in (:func:`do_swap_page`) follows ``mm/memory.c``: find the folio in
the swap cache or read it from the device's page store; drop the PTE's
reference on the slot; free the slot at once when the fault writes to a
folio nobody else holds (``should_try_to_free_swap``); map the page,
writable at once when the swap PTE said it was exclusive
(``_PAGE_SWP_EXCLUSIVE``), keeping uffd-wp (``_PAGE_SWP_UFFD_WP`` becomes
``_PAGE_UFFD_WP``); a write to a page still shared goes on to
``do_wp_page``.

shmem keeps a swapped-out page's entry in its inode (``inode.swapped``,
index -> entry; the kernel keeps it in the page-cache xarray as a value
entry). :func:`shmem_swapin_folio` brings it back into the page cache and
frees the slot, as ``shmem_swapin_folio`` does.

Simplified: no swap-in readahead on faults (only ``MADV_WILLNEED`` reads
ahead), no large folios in the swap cache.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from vmemu.constants import PAGE_SHIFT
from vmemu.errors import VmFault, raise_errno
from vmemu.mmu.folio import Folio
from vmemu.mmu.memory import (
    FAULT_FLAG_WRITE,
    VmFaultInfo,
    anon_vma_prepare,
    do_wp_page,
    vm_get_page_prot,
)
from vmemu.mmu.pgtable import (
    _PAGE_DIRTY,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_UFFD_WP,
    is_real_swap_pte,
    pte_swp_exclusive,
    pte_swp_uffd_wp,
    swp_entry_clean,
    swp_offset,
    swp_type,
)
from vmemu.mmu.swapfile import (
    PG_ANON,
    PG_ANON_EXCLUSIVE,
    PG_DIRTY,
    PG_MLOCKED,
    PG_REFERENCED,
    PG_SWAPBACKED,
    PG_SWAPCACHE,
    PG_UPTODATE,
    SwapInfo,
    SwapSpace,
    get_swap_space,
)
from vmemu.mmu.vma import VM_LOCKED, VM_SHARED, VM_UFFD_WP, VM_WRITE, Vma

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct


# -- the swap cache -------------------------------------------------------------


def add_to_swap_cache(space: SwapSpace, folio: Folio, entry: int) -> None:
    """Put ``folio`` in the swap cache for ``entry``, taking a reference (``add_to_swap_cache``)."""
    assert entry not in space.cache, f"swap cache already holds {entry:#x}"
    folio.flags = int(folio.flags)
    folio.flags |= PG_SWAPCACHE
    folio.private = entry
    folio.refcount += 1
    space.cache[entry] = folio


def _unlink_from_swap_cache(space: SwapSpace, folio: Folio) -> int:
    """Take ``folio`` out of the swap cache without dropping its reference; returns the entry."""
    entry: int = folio.private
    del space.cache[entry]
    folio.flags = int(folio.flags)
    folio.flags &= ~PG_SWAPCACHE
    folio.private = None
    return entry


def delete_from_swap_cache(space: SwapSpace, folio: Folio) -> None:
    """Drop ``folio`` from the swap cache and its reference (``delete_from_swap_cache``).

    The slot is freed too when no swap PTE or shmem entry names it.
    """
    entry = _unlink_from_swap_cache(space, folio)
    space.swapcache_clear(entry)
    space.phys.folio_put(folio)


def folio_free_swap(space: SwapSpace, folio: Folio) -> bool:
    """Free the swap slot of a cached folio no swap entry needs any more (``folio_free_swap``).

    The folio becomes dirty: its only copy is in memory again.
    """
    folio.flags = int(folio.flags)
    if not folio.flags & PG_SWAPCACHE or space.swap_count(folio.private):
        return False
    delete_from_swap_cache(space, folio)
    folio.flags |= PG_DIRTY
    return True


def free_swap_cache(space: SwapSpace, folio: Folio) -> None:
    """After unmapping: free the swap cache of a folio no PTE maps now (``free_swap_cache``)."""
    if int(folio.flags) & PG_SWAPCACHE and not folio.mapcount:
        folio_free_swap(space, folio)


def swapin_folio(space: SwapSpace, entry: int) -> tuple[Folio | None, bool]:
    """The folio for ``entry`` with a reference for the caller (``read_swap_cache_async``).

    Looks in the swap cache first; otherwise allocates a folio, reads the
    slot from the device's store and adds it to the cache. Returns
    ``(folio, read)`` where ``read`` says I/O happened, or ``(None, False)``
    when memory is exhausted.
    """
    folio = space.cache.get(entry)
    if folio is not None:
        folio.refcount += 1
        folio.flags = int(folio.flags)
        return folio, False
    si = space.swap_info_get(entry)
    assert si is not None, f"swap-in of bad entry {entry:#x}"
    folio = space.phys.alloc_folio(0)
    if folio is None:
        return None, False
    # Reclaim inside the allocation cannot have cached this entry: it only
    # ever allocates new slots. The data is the store's, byte for byte.
    folio.data[:] = si.store.load(si.key(swp_offset(entry)))
    folio.flags = PG_SWAPBACKED | PG_UPTODATE
    add_to_swap_cache(space, folio, entry)
    space.pswpin += 1
    return folio, True


# -- anonymous swap-in --------------------------------------------------------------


def _anon_rmap_fits(folio: Folio, vma: Vma, addr: int) -> bool:
    """True when rmap would find ``folio`` at ``addr`` in ``vma`` (its anon_vma and index agree)."""
    return folio.mapping in vma.anon_vma_chain and folio.index == vma.linear_page_index(addr)


def should_try_to_free_swap(space: SwapSpace, folio: Folio, vma: Vma, flags: int) -> bool:
    """Free the slot right after swap-in? (``should_try_to_free_swap``).

    Yes when swap is more than half full, the VMA is locked, or a write
    fault finds nobody else holding the folio (our reference + the cache's).
    """
    if not folio.flags & PG_SWAPCACHE:
        return False
    if space.vm_swap_full() or vma.vm_flags & VM_LOCKED or folio.flags & PG_MLOCKED:
        return True
    return bool(flags & FAULT_FLAG_WRITE) and folio.refcount == 2


def do_swap_page(mm: MmStruct, vmf: VmFaultInfo) -> VmFault:
    """Bring a swapped-out anonymous page back and map it (``do_swap_page``)."""
    space = get_swap_space(mm.phys)
    with space.lock:
        return _do_swap_page(mm, space, vmf)


def _do_swap_page(mm: MmStruct, space: SwapSpace, vmf: VmFaultInfo) -> VmFault:
    orig = vmf.orig_pte
    entry = swp_entry_clean(orig)
    vma = vmf.vma
    if space.swap_info_get(entry) is None or not space.swap_count(entry):
        return VmFault.SIGBUS  # "Bad swap entry": the kernel's print_bad_pte + SIGBUS
    folio, read = swapin_folio(space, entry)
    if folio is None:
        return VmFault.OOM
    ret = VmFault.MAJOR if read else VmFault.NONE
    # The cached folio may belong to another anon_vma or index (mremap moved
    # the PTE, or another process mapped it first): rmap must still find it.
    if folio.flags & PG_ANON and not _anon_rmap_fits(folio, vma, vmf.address):
        if folio.mapcount == 0:
            folio.flags &= ~(PG_ANON | PG_ANON_EXCLUSIVE)
            folio.mapping = None
        else:
            copy = mm.phys.alloc_folio(0)  # ksm_might_need_to_copy
            if copy is None:
                mm.phys.folio_put(folio)
                return VmFault.OOM
            copy.data[:] = folio.data
            copy.flags = PG_SWAPBACKED | PG_UPTODATE | PG_DIRTY
            mm.phys.folio_put(folio)
            folio = copy
    exclusive = pte_swp_exclusive(orig) or not folio.flags & PG_SWAPCACHE
    space.swap_free(entry)
    if should_try_to_free_swap(space, folio, vma, vmf.flags):
        folio_free_swap(space, folio)
    pte = (folio.pfn << PAGE_SHIFT) | vm_get_page_prot(vma.vm_flags)
    if pte_swp_uffd_wp(orig):
        pte = (pte | _PAGE_UFFD_WP) & ~_PAGE_RW
    write = bool(vmf.flags & FAULT_FLAG_WRITE)
    if exclusive or folio.refcount == 1:
        if vma.vm_flags & VM_WRITE and not (vma.vm_flags & VM_UFFD_WP and pte & _PAGE_UFFD_WP):
            pte |= _PAGE_RW
            if write:
                pte |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY
                write = False
        exclusive = True
    else:
        exclusive = False
    if not folio.flags & PG_ANON:
        av = anon_vma_prepare(vma)  # folio_add_new_anon_rmap: the oldest anon_vma if shared
        folio.mapping = av if exclusive else av.root
        folio.index = vma.linear_page_index(vmf.address)
        folio.flags |= PG_ANON | PG_SWAPBACKED
    if exclusive:
        folio.flags |= PG_ANON_EXCLUSIVE
    folio.mapcount += 1  # the reference swapin_folio took is the mapping's
    vmf.table[vmf.idx] = pte
    mm.tlb.flush_page(vmf.address)
    if write:
        vmf.orig_pte = pte
        ret |= do_wp_page(mm, vmf)
        if ret & VmFault.error_mask():
            return ret & VmFault.error_mask()
    return ret


# -- shmem ------------------------------------------------------------------------


def shmem_swapin_folio(inode: Any, index: int) -> Folio | None:
    """Bring swapped-out page ``index`` of a shmem inode back into its page cache.

    Returns the folio (held by the page cache only) or None when memory is
    exhausted (``shmem_swapin_folio``).
    """
    space = get_swap_space(inode.phys)
    with space.lock:
        folio = inode.pages.get(index)
        if folio is not None:
            return folio  # swapped in while we waited for the lock
        entry = inode.swapped.get(index)
        if entry is None:
            return None  # truncated while we waited
        folio, _read = swapin_folio(space, entry)
        if folio is None:
            return None
        if folio.flags & PG_ANON or folio.mapcount:
            raise AssertionError(f"shmem swap entry {entry:#x} cached as {folio!r}")
        # the swap cache's reference becomes the page cache's; ours is dropped below
        _unlink_from_swap_cache(space, folio)
        folio.mapping = inode
        folio.index = index
        folio.flags |= PG_DIRTY | PG_SWAPBACKED | PG_UPTODATE
        inode.pages[index] = folio
        _forget_swapped(space, inode, index)
        space.swap_free(entry)
        space.phys.folio_put(folio)
        return folio


def _forget_swapped(space: SwapSpace, inode: Any, index: int) -> int:
    entry: int = inode.swapped.pop(index)
    if not inode.swapped:
        space.shmem_swaplist.pop(inode.ino, None)
    return entry


def shmem_free_swap(inode: Any, index: int) -> None:
    """Drop the swap entry of page ``index`` of a shmem inode (``shmem_free_swap``)."""
    space = get_swap_space(inode.phys)
    with space.lock:
        if index in inode.swapped:
            space.free_swap_and_cache(_forget_swapped(space, inode, index))


def shmem_swap_usage(mm: MmStruct, vma: Vma) -> int:
    """Swapped-out shmem pages under ``vma``, as smaps counts them (``shmem_swap_usage``).

    For a shared or read-only mapping every swapped page of the range
    counts; a private writable one counts only those it has no PTE for
    (the others are its own COW copies).
    """
    swapped = getattr(vma.vm_file, "swapped", None)
    if not swapped:
        return 0
    first, n = vma.vm_pgoff, vma.size >> PAGE_SHIFT
    if vma.vm_flags & VM_SHARED or not vma.vm_flags & VM_WRITE:
        if len(swapped) < n:
            return sum(1 for i in swapped if first <= i < first + n)
        return sum(1 for i in range(first, first + n) if i in swapped)
    return sum(1 for i in swapped if first <= i < first + n and
               not mm.pgtables.get_pte(vma.vm_start + ((i - first) << PAGE_SHIFT)))


# -- MADV_WILLNEED, swapoff -----------------------------------------------------------


def madvise_willneed(mm: MmStruct, vma: Vma, start: int, end: int, advice: int) -> None:
    """Read swapped pages of the range into the swap cache (``madvise_willneed``).

    Anonymous memory: every swap PTE (``swapin_walk_ops``); shmem: every
    swapped page of the file range (``shmem_swapin_range``). Nothing is
    mapped; a later fault finds the page in the cache. Stops quietly when
    memory runs out, as readahead does.
    """
    space = mm.phys.swap
    if space is None:
        return
    entries: list[int] = []
    if vma.vm_file is None:
        for _addr, table, lo, hi in mm.pgtables.iter_pte_tables(start, end):
            entries += [swp_entry_clean(table[i]) for i in range(lo, hi)
                        if is_real_swap_pte(table[i])]
    else:
        swapped = getattr(vma.vm_file, "swapped", None)
        if not swapped:
            return
        first = vma.linear_page_index(start)
        last = vma.linear_page_index(end)
        entries = [swapped[i] for i in range(first, last) if i in swapped]
    with space.lock:
        for entry in entries:
            if space.swap_info_get(entry) is None:
                continue
            folio, _read = swapin_folio(space, entry)
            if folio is None:
                return
            folio.flags |= PG_REFERENCED
            space.phys.folio_put(folio)


def try_to_unuse(space: SwapSpace, si: SwapInfo) -> None:
    """Swap every page on ``si`` back in before swapoff (``try_to_unuse``).

    Swap PTEs become present PTEs (``unuse_pte``), shmem entries return to
    their page caches, cached folios leave the swap cache. ENOMEM when
    memory runs out.
    """
    for mm in list(space.phys.mms):
        with mm.lock:
            for vma in mm.vmas:
                for addr, table, lo, hi in mm.pgtables.iter_pte_tables(vma.vm_start, vma.vm_end):
                    for idx in range(lo, hi):
                        pte = table[idx]
                        if not is_real_swap_pte(pte) or swp_type(pte) != si.type:
                            continue
                        a = (addr & ~((1 << 21) - 1)) | (idx << PAGE_SHIFT)
                        vmf = VmFaultInfo(vma, a, a, 0, vma.linear_page_index(a), table, idx, pte)
                        if do_swap_page(mm, vmf) & VmFault.error_mask():
                            raise_errno(errno.ENOMEM, "swapoff: out of memory")
    with space.lock:
        for inode in list(space.shmem_swaplist.values()):
            for index, entry in list(inode.swapped.items()):
                if swp_type(entry) == si.type and shmem_swapin_folio(inode, index) is None:
                    raise_errno(errno.ENOMEM, "swapoff: out of memory")
        for entry, folio in list(space.cache.items()):
            if swp_type(entry) == si.type:
                delete_from_swap_cache(space, folio)
                folio.flags |= PG_DIRTY
