"""UFFDIO_MOVE: moving anonymous pages between addresses (``move_pages`` in ``mm/userfaultfd.c``).

The heir of Arcangeli's ``remap_anon_pages``: instead of copying a page
into the faulting range, the page table entry itself moves, and the folio's
reverse map is re-rooted to the destination VMA. The rules are strict so a
mistake cannot go unnoticed: the destination must be empty (EEXIST), the
source must be present (ENOENT, unless UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES, where
holes count as moved), and the source page must belong to this process
alone (EBUSY for a page still shared with a fork child, or pinned). Swap
entries move without swap-in; the zero page moves as the zero page; a whole
huge PMD moves in one step when both sides are 2 MiB aligned, otherwise it
is split first.

Runs of ordinary pages - present, small, exclusive, moving into empty
entries - move a PTE table's worth at a time (``_move_run``), with one TLB
flush per side; anything else, and every page that would fail, takes the
page-by-page path, so errors and partial progress are those of the page
loop.
"""

from __future__ import annotations

import errno
from functools import reduce
from operator import and_, attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

from vmemu.constants import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE
from vmemu.mmu.folio import PG
from vmemu.mmu.huge_memory import split_huge_range
from vmemu.mmu.memory import anon_vma_prepare, vm_get_page_prot
from vmemu.mmu.pgtable import (
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
    is_real_swap_pte,
    pte_swp_exclusive,
    swp_entry_clean,
)
from vmemu.mmu.vma import (
    VM_ACCESS_FLAGS,
    VM_HUGETLB,
    VM_IO,
    VM_LOCKED,
    VM_MIXEDMAP,
    VM_PFNMAP,
    VM_SHARED,
    VM_WRITE,
    Vma,
)
from vmemu.uffd.mfill import MfillError

if TYPE_CHECKING:
    from vmemu.uffd.ctx import Userfaultfd

UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1
_ADD: dict[int, int] = {}  # vm_flags -> the protection bits move_pte gives a moved entry


def validate_move_areas(ctx: Userfaultfd, src_vma: Vma, dst_vma: Vma) -> None:
    """EINVAL unless both VMAs may take part in a move (``validate_move_areas``)."""
    sf, df = src_vma.vm_flags, dst_vma.vm_flags
    # the protections can only differ when the access flags or VM_SHARED do
    if (sf & VM_ACCESS_FLAGS) != (df & VM_ACCESS_FLAGS) or \
            (sf ^ df) & VM_SHARED and vm_get_page_prot(sf) != vm_get_page_prot(df):
        raise MfillError(errno.EINVAL)
    if (src_vma.vm_flags & VM_LOCKED) != (dst_vma.vm_flags & VM_LOCKED):
        raise MfillError(errno.EINVAL)
    if not src_vma.vm_flags & VM_WRITE:
        raise MfillError(errno.EINVAL)
    bad = VM_PFNMAP | VM_IO | VM_HUGETLB | VM_MIXEDMAP
    if src_vma.vm_flags & bad or dst_vma.vm_flags & bad:
        raise MfillError(errno.EINVAL)
    if dst_vma.vm_userfaultfd_ctx is not ctx:
        raise MfillError(errno.EINVAL)
    if src_vma.vm_file is not None or dst_vma.vm_file is not None:
        raise MfillError(errno.EINVAL)


def _pmd(mm: Any, addr: int, alloc: bool) -> tuple[list[int] | None, int]:
    pmd = mm.pgtables.pmd_table(addr, alloc)
    return pmd, (addr >> 21) & 511


def _move_huge_pmd(mm: Any, src_vma: Vma, dst_vma: Vma, src_pmd: list[int], si: int,
                   dst_pmd: list[int], di: int, dst: int, src: int) -> None:
    """Move a whole PMD-mapped THP (``move_pages_huge_pmd``).

    The huge zero page moves as it is: no folio to re-root.
    """
    e = src_pmd[si]
    if e & _PAGE_SPECIAL:
        src_pmd[si] = 0
        dst_pmd[di] = (e | _PAGE_SOFT_DIRTY) & ~_PAGE_UFFD_WP
        mm.tlb.flush_range(src, src + PMD_SIZE)  # pmdp_huge_clear_flush
        mm.tlb.flush_range(dst, dst + PMD_SIZE)
        return
    folio = mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
    if folio.pincount or not folio.flags & PG.anon_exclusive:  # folio_maybe_dma_pinned
        raise MfillError(errno.EBUSY)
    src_pmd[si] = 0
    folio.mapping = anon_vma_prepare(dst_vma)
    folio.index = dst_vma.linear_page_index(dst)
    dst_pmd[di] = (e | _PAGE_SOFT_DIRTY) & ~_PAGE_UFFD_WP & ~_PAGE_RW | \
        (_PAGE_RW if dst_vma.vm_flags & VM_WRITE else 0)  # maybe_pmd_mkwrite
    mm.tlb.flush_range(src, src + PMD_SIZE)  # pmdp_huge_clear_flush
    mm.tlb.flush_range(dst, dst + PMD_SIZE)


def move_pte(mm: Any, src_vma: Vma, dst_vma: Vma, src: int, dst: int, mode: int) -> None:
    """Move one PTE from ``src`` to ``dst`` (``move_pages_pte``)."""
    src_tab = mm.pgtables.pte_table(src, True)
    dst_tab = mm.pgtables.pte_table(dst, True)
    if src_tab is None or dst_tab is None:
        raise MfillError(errno.EEXIST)
    si, di = (src >> PAGE_SHIFT) & 511, (dst >> PAGE_SHIFT) & 511
    spte, dpte = src_tab[si], dst_tab[di]
    if dpte:
        raise MfillError(errno.EEXIST)
    if not spte:
        if not mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES:
            raise MfillError(errno.ENOENT)
        return
    prot = vm_get_page_prot(dst_vma.vm_flags)
    if spte & (_PAGE_PRESENT | _PAGE_PROTNONE):
        pfn = (spte & PTE_PFN_MASK) >> PAGE_SHIFT
        if spte & _PAGE_SPECIAL:
            src_tab[si] = 0
            dst_tab[di] = (pfn << PAGE_SHIFT) | prot | _PAGE_SPECIAL
        else:
            folio = mm.phys.mem_map[pfn]
            if folio.order:
                split_huge_range(mm, src_vma, src, src + PAGE_SIZE, zero_unused=True)
                folio = mm.phys.mem_map[pfn]
                if folio.order:
                    raise MfillError(errno.EBUSY)
            if folio.pincount or not folio.flags & PG.anon_exclusive:  # move_present_pte
                raise MfillError(errno.EBUSY)
            src_tab[si] = 0
            folio.mapping = anon_vma_prepare(dst_vma)
            folio.index = dst_vma.linear_page_index(dst)
            new = (pfn << PAGE_SHIFT) | prot | _PAGE_SOFT_DIRTY | (spte & _PAGE_DIRTY)
            if dst_vma.vm_flags & VM_WRITE:
                new |= _PAGE_RW
            dst_tab[di] = new
        mm.tlb.flush_page(src)
        mm.tlb.flush_page(dst)
        return
    if not is_real_swap_pte(spte):
        raise MfillError(errno.EFAULT)
    if not pte_swp_exclusive(spte):
        raise MfillError(errno.EBUSY)
    move_swap_pte(mm, dst_vma, dst, spte)
    src_tab[si] = 0
    dst_tab[di] = spte


def move_swap_pte(mm: Any, dst_vma: Vma, dst: int, spte: int) -> None:
    """Before a swap entry moves: re-root its swap-cache folio, if any (``move_swap_pte``).

    The entry itself moves as it is (no swap-in); a folio still in the
    swap cache (mapped before, or read ahead by MADV_WILLNEED) gets the
    destination's anon_vma and index, so a later swap-in at the
    destination finds it where rmap expects it. A large
    folio there is EBUSY, as in the kernel.
    """
    space = mm.phys.swap
    if space is None:
        return
    with space.lock:
        folio = space.cache.get(swp_entry_clean(spte))
        if folio is None:
            return
        if folio.order:
            raise MfillError(errno.EBUSY)
        # folio_move_anon_rmap: the mapping names the anon_vma, which makes the folio anon
        # even when it was read ahead (never mapped yet)
        folio.flags = int(folio.flags) | _PG_ANON
        folio.mapping = anon_vma_prepare(dst_vma)
        folio.index = dst_vma.linear_page_index(dst)


# folio.flags may be a PG (an IntFlag, whose ``&`` is a Python call): test the bit by shifting
_ANON_EXCLUSIVE_SHIFT = PG.anon_exclusive.bit_length() - 1
_PG_ANON = int(PG.anon)
_order = attrgetter("order")
_flags = attrgetter("flags")
_pincount = attrgetter("pincount")


def _move_whole_run(src_tab: list[int], si: int, dst_tab: list[int], di: int, n: int,
                    mem_map: list[Any], add: int, av: Any, index: int) -> bool:
    """Move ``n`` entries at once if every one qualifies (else False, nothing changed).

    The tests of the page loop, done over the whole slice with C-level
    helpers: the AND of the source entries has the present bit only if all
    are present; the destination slice must be all empty, the folios all
    small, unpinned and exclusive - which also rules out the zero page (a
    special entry), whose folio is never anon-exclusive.
    """
    seg = src_tab[si:si + n]
    if not reduce(and_, seg) & _PAGE_PRESENT or any(dst_tab[di:di + n]):
        return False
    folios = itemgetter(*[(e & PTE_PFN_MASK) >> PAGE_SHIFT for e in seg])(mem_map)
    # int.__and__ called directly: PG's own & (a Python method) is never used
    if any(map(_order, folios)) or any(map(_pincount, folios)) or \
            not reduce(int.__and__, map(_flags, folios)) >> _ANON_EXCLUSIVE_SHIFT & 1:
        return False
    for i, folio in enumerate(folios, index):
        folio.mapping = av
        folio.index = i
    keep = PTE_PFN_MASK | _PAGE_DIRTY
    dst_tab[di:di + n] = [(e & keep) | add for e in seg]
    src_tab[si:si + n] = [0] * n
    return True


def _move_run(mm: Any, s: int, d: int, npages: int, add: int, av: Any, index: int) -> int:
    """Move ordinary pages from ``s`` to ``d`` within one PTE table each; pages moved (maybe 0).

    ``move_pages_pte`` for each page in turn, without the calls: the run
    stops before the first page that is not a present, small, unpinned,
    exclusive anonymous page, or whose destination is not empty. Each moved folio is
    re-rooted in the destination's anon_vma ``av`` at its new index (the
    destination's page index of ``d`` is ``index``); the new entry is the
    destination VMA's protection ``add`` plus the old entry's dirty bit.
    """
    pgtables = mm.pgtables
    mem_map = mm.phys.mem_map
    # pmd_table(s, False), walked inline (as translate does)
    e = pgtables.pgd[(s >> 39) & 511]
    if e:
        e = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT][(s >> 30) & 511]
    if not e:
        return 0
    se = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT][(s >> 21) & 511]
    if not se & _PAGE_PRESENT or se & _PAGE_PSE:
        return 0
    # pmd_table(d, True): inline when the upper levels exist, else the allocating walk
    e = pgtables.pgd[(d >> 39) & 511]
    if e:
        e = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT][(d >> 30) & 511]
    dst_pmd = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT] if e else pgtables.pmd_table(d, True)
    de = dst_pmd[(d >> 21) & 511]
    if de and (de & _PAGE_PSE or not de & _PAGE_PRESENT):
        return 0
    src_tab = mem_map[(se & PTE_PFN_MASK) >> PAGE_SHIFT]
    dst_tab = mem_map[(de & PTE_PFN_MASK) >> PAGE_SHIFT] if de else pgtables.pte_table(d, True)
    si, di = (s >> PAGE_SHIFT) & 511, (d >> PAGE_SHIFT) & 511
    n = min(npages, 512 - si, 512 - di)
    shift = _ANON_EXCLUSIVE_SHIFT
    if n >= 8 and _move_whole_run(src_tab, si, dst_tab, di, n, mem_map, add, av, index):
        # only the source side: the TLB holds nothing for the empty destination entries
        mm.tlb.flush_range(s, s + (n << PAGE_SHIFT))
        return n
    k = 0
    while k < n:
        spte = src_tab[si + k]
        if not spte & _PAGE_PRESENT or spte & _PAGE_SPECIAL or dst_tab[di + k]:
            break
        pfn = (spte & PTE_PFN_MASK) >> PAGE_SHIFT
        folio = mem_map[pfn]
        if folio.order or folio.pincount or not folio.flags >> shift & 1:
            break
        src_tab[si + k] = 0
        folio.mapping = av
        folio.index = index + k
        dst_tab[di + k] = (pfn << PAGE_SHIFT) | add | (spte & _PAGE_DIRTY)
        k += 1
    if k == 1:
        mm.tlb.flush_page(s)
        mm.tlb.flush_page(d)
    elif k:  # the TLB holds nothing for the empty destination entries
        mm.tlb.flush_range(s, s + (k << PAGE_SHIFT))
    return k


def move_pages(ctx: Userfaultfd, dst: int, src: int, length: int, mode: int) -> int:
    """Move ``len`` bytes of pages from ``src`` to ``dst``; bytes moved (``move_pages``)."""
    mm = ctx.mm
    with mm.lock:
        dst_vma = mm.vmas.vma_lookup(dst)
        if dst_vma is not None and dst_vma.anon_vma is None and not dst_vma.vm_flags & VM_SHARED:
            anon_vma_prepare(dst_vma)  # uffd_move_lock -> find_vma_and_prepare_anon, first
        src_vma = mm.vmas.vma_lookup(src)
        if dst_vma is None or src_vma is None:
            raise MfillError(errno.ENOENT)
        if ctx.mmap_changing:
            raise MfillError(errno.EAGAIN)
        if src_vma.vm_flags & VM_SHARED or src + length > src_vma.vm_end or \
                dst_vma.vm_flags & VM_SHARED or dst + length > dst_vma.vm_end:
            raise MfillError(errno.EINVAL)
        validate_move_areas(ctx, src_vma, dst_vma)
        av = dst_vma.anon_vma or anon_vma_prepare(dst_vma)
        vm_flags = dst_vma.vm_flags
        add = _ADD.get(vm_flags)
        if add is None:  # what move_pte gives
            add = _ADD[vm_flags] = vm_get_page_prot(vm_flags) | _PAGE_SOFT_DIRTY | \
                (_PAGE_RW if vm_flags & VM_WRITE else 0)
        index = dst_vma.vm_pgoff + ((dst - dst_vma.vm_start) >> PAGE_SHIFT)  # linear_page_index
        moved = 0
        while moved < length:
            s, d = src + moved, dst + moved
            n = _move_run(mm, s, d, (length - moved) >> PAGE_SHIFT, add, av,
                          index + (moved >> PAGE_SHIFT))
            if n:
                moved += n << PAGE_SHIFT
                continue
            try:
                step = _move_one(mm, src_vma, dst_vma, s, d, src + length, mode)
            except MfillError:
                if moved:
                    return moved
                raise
            moved += step
        return moved


def _move_one(mm: Any, src_vma: Vma, dst_vma: Vma, s: int, d: int, src_end: int,
              mode: int) -> int:
    """One step of the ``move_pages`` loop: a PMD or a page; returns the bytes it covered."""
    src_pmd, si = _pmd(mm, s, False)
    holes = bool(mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES)
    if src_pmd is None and not holes:  # mm_find_pmd: no PMD table at all
        raise MfillError(errno.ENOENT)
    dst_pmd, di = _pmd(mm, d, True)
    assert dst_pmd is not None
    if dst_pmd[di] & _PAGE_PSE:  # a THP at dst is EEXIST before an empty src PMD is ENOENT
        raise MfillError(errno.EEXIST)
    if (src_pmd is None or not src_pmd[si]) and not holes:
        raise MfillError(errno.ENOENT)
    if src_pmd is not None and src_pmd[si] & _PAGE_PSE:
        whole = not (s & (PMD_SIZE - 1)) and not (d & (PMD_SIZE - 1)) and s + PMD_SIZE <= src_end
        if whole and not dst_pmd[di]:
            _move_huge_pmd(mm, src_vma, dst_vma, src_pmd, si, dst_pmd, di, d, s)
            return PMD_SIZE
        folio = mm.phys.mem_map[(src_pmd[si] & PTE_PFN_MASK) >> PAGE_SHIFT]
        if not folio.flags & (PG.anon_exclusive | PG.zero):
            raise MfillError(errno.EBUSY)
        split_huge_range(mm, src_vma, s, s + PAGE_SIZE, zero_unused=True)
    move_pte(mm, src_vma, dst_vma, s, d, mode)
    return PAGE_SIZE
