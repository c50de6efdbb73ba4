"""mremap: growing, shrinking and moving a mapping (``mm/mremap.c``, Linux 6.18).

A move never copies data. A new VMA is made at the destination with the
source's flags, file and ``vm_pgoff`` (``copy_vma``), and the page-table
entries are carried over as they are (``move_page_tables``): present PTEs,
swap entries, hwpoison entries and pte markers alike. Because the moved VMA
keeps its ``vm_pgoff`` and its anon_vma links, every anonymous folio keeps
its ``index`` and rmap still finds it; shmem VMAs keep their file offset.
Where both addresses are aligned, whole tables move with one entry: a PTE
table by re-pointing the PMD entry (``move_normal_pmd``), a PMD table by
re-pointing the PUD entry (``move_normal_pud``), and a huge PMD leaf
(``_PAGE_PSE``, a THP) moves whole (``move_huge_pmd``). A huge PMD only
partly covered, or whose destination is not PMD-aligned, is split first
(``split_huge_pmd`` of ``huge_memory``).

The order of the checks is the kernel's (``check_mremap_params``,
``check_prep_vma``), so a call with several problems fails with the same
errno:

* flags other than MAYMOVE|FIXED|DONTUNMAP, an unaligned ``old_addr``, a
  zero or huge ``new_len`` -> EINVAL;
* with FIXED or DONTUNMAP: an unaligned or out-of-range ``new_addr``, no
  MAYMOVE, DONTUNMAP with a size change, source and destination
  overlapping -> EINVAL;
* no VMA at ``old_addr``, or a range that runs past the VMA's end when the
  mapping must grow or move -> EFAULT (a shrink may cross VMAs);
* ``old_len == 0`` (the "duplicate a shared mapping" trick) on a private
  mapping -> EINVAL;
* growth in place blocked and no MAYMOVE -> ENOMEM.

Since 6.17 a pure move (FIXED with ``old_len == new_len``) may span several
VMAs, gaps between them included (``remap_move``); a gap at the start is
EFAULT, and a VMA registered with userfaultfd may only be moved alone.

userfaultfd sees a successful move as one UFFD_EVENT_REMAP, delivered after
the address space is consistent again and the mmap lock is released
(``mremap_userfaultfd_prep`` / ``_complete``); see
:meth:`vmemu.mmu.mm.MmStruct.mremap_uffd_prepare`. Unmapping the destination
(FIXED), a shrunk tail, or the source goes through ``do_munmap`` and its
UNMAP events.

Simplified: no commit accounting (VM_ACCOUNT is kept but never charged),
no RLIMIT_AS / RLIMIT_MEMLOCK (the emulated caller is root), no mseal, and
a move never fails half-way (page-table allocation cannot fail here), so
the kernel's "move the entries back" error path does not exist.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import attrs

from vmemu.constants import (
    MAP_FIXED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SIZE,
    PUD_SIZE,
    TASK_SIZE,
)
from vmemu.errors import raise_errno
from vmemu.mmu.mmap import do_munmap, get_unmapped_area
from vmemu.mmu.pgtable import (
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_SWP_UFFD_WP,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
    is_uffd_wp_marker,
)
from vmemu.mmu.vma import (
    VM_DONTEXPAND,
    VM_HUGETLB,
    VM_LOCKED,
    VM_LOCKONFAULT,
    VM_MAYSHARE,
    VM_PFNMAP,
    VM_SHARED,
    VM_UFFD_FLAGS,
    Vma,
    anon_vma_unlink,
)
from vmemu.mmu.vmaops import vma_dup, vma_merge_neighbours

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

_U64 = (1 << 64) - 1
HPAGE_SIZE = PMD_SIZE  # the default hugetlb page size on x86-64
MREMAP_FLAGS = MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP


@attrs.define
class RemapRequest:
    """One mremap in flight (``struct vma_remap_struct``)."""

    addr: int
    old_len: int
    new_len: int
    flags: int
    new_addr: int
    vma: Vma | None = None
    populate_expand: bool = False
    # userfaultfd bookkeeping: (token, from, to, len) of REMAP events to send, and the UNMAP
    # events of MREMAP_FIXED's unmap of the destination (``uf_unmap_early``): ``notify_uffd``
    # delivers those first, then REMAP, then the other UNMAPs (``mm.uf_unmap``)
    remaps: list[tuple[Any, int, int, int]] = attrs.field(factory=list)
    unmap_early: list[Any] = attrs.field(factory=list)

    @property
    def implies_new_addr(self) -> bool:
        """FIXED or DONTUNMAP: ``new_addr`` means something (``vrm_implies_new_addr``)."""
        return bool(self.flags & (MREMAP_FIXED | MREMAP_DONTUNMAP))

    @property
    def delta(self) -> int:
        """``|new_len - old_len|`` (``vrm_set_delta``)."""
        return abs(self.new_len - self.old_len)


def _page_align(n: int) -> int:
    """``PAGE_ALIGN`` on an unsigned long: wraps to 0 near 2**64."""
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1) & _U64


def check_mremap_params(req: RemapRequest) -> None:
    """The checks made before the mmap lock is taken (``check_mremap_params``)."""
    if req.flags & ~MREMAP_FLAGS:
        raise_errno(errno.EINVAL, "unknown mremap flags")
    if req.addr & (PAGE_SIZE - 1):
        raise_errno(errno.EINVAL, "old_address not page aligned")
    if not req.new_len:
        raise_errno(errno.EINVAL, "new_size is zero")
    if req.new_len > TASK_SIZE:
        raise_errno(errno.EINVAL, "new_size too large")
    if not req.implies_new_addr:
        return
    if req.new_addr > TASK_SIZE - req.new_len:
        raise_errno(errno.EINVAL, "new_address out of range")
    if req.new_addr & (PAGE_SIZE - 1):
        raise_errno(errno.EINVAL, "new_address not page aligned")
    if not req.flags & MREMAP_MAYMOVE:
        raise_errno(errno.EINVAL, "FIXED/DONTUNMAP without MAYMOVE")
    if req.flags & MREMAP_DONTUNMAP and req.old_len != req.new_len:
        raise_errno(errno.EINVAL, "DONTUNMAP cannot resize")
    if req.addr + req.old_len > req.new_addr and req.new_addr + req.new_len > req.addr:
        raise_errno(errno.EINVAL, "source and destination overlap")  # vrm_overlaps


def check_prep_vma(mm: MmStruct, req: RemapRequest) -> None:
    """Validate the request against the VMA at ``addr`` (``check_prep_vma``)."""
    vma = req.vma
    if vma is None:
        raise_errno(errno.EFAULT, "no mapping at old_address")
    if vma.vm_flags & VM_HUGETLB:
        req.old_len = (req.old_len + HPAGE_SIZE - 1) & ~(HPAGE_SIZE - 1)
        req.new_len = (req.new_len + HPAGE_SIZE - 1) & ~(HPAGE_SIZE - 1)
        if req.addr & (HPAGE_SIZE - 1) or req.new_addr & (HPAGE_SIZE - 1) or \
                req.new_len > req.old_len:
            raise_errno(errno.EINVAL, "hugetlb mremap must be aligned and not grow")
    if not req.implies_new_addr:
        req.new_addr = req.addr
    if req.new_len <= req.old_len and not req.implies_new_addr:
        return  # shrink or no-op in place: nothing new gets mapped (vrm_will_map_new)
    old_len, new_len = req.old_len, req.new_len
    if not old_len and not vma.vm_flags & (VM_SHARED | VM_MAYSHARE):
        raise_errno(errno.EINVAL, "old_size 0 duplicates only shared mappings")
    if req.flags & MREMAP_DONTUNMAP and vma.vm_flags & (VM_DONTEXPAND | VM_PFNMAP):
        raise_errno(errno.EINVAL)
    if new_len < old_len:
        old_len = new_len  # the shrunk tail may cross VMAs; the kept part may not
    if old_len > vma.vm_end - req.addr:
        raise_errno(errno.EFAULT, "range crosses the end of the mapping")
    if new_len == old_len:
        return
    if vma.vm_flags & VM_LOCKED:
        req.populate_expand = True
    pgoff = vma.linear_page_index(req.addr)
    if pgoff + (new_len >> PAGE_SHIFT) >= 1 << 64:
        raise_errno(errno.EINVAL)
    if vma.vm_flags & (VM_DONTEXPAND | VM_PFNMAP):
        raise_errno(errno.EFAULT)


# -- moving page-table entries ----------------------------------------------------


def _pud_slot(mm: MmStruct, addr: int, alloc: bool) -> tuple[list[int], int] | None:
    """The PUD table and index covering ``addr`` (``pud_offset`` after ``p4d_alloc``)."""
    pgt = mm.pgtables
    gi = (addr >> 39) & 511
    ge = pgt.pgd[gi]
    if ge:
        pud = mm.phys.mem_map[(ge & PTE_PFN_MASK) >> PAGE_SHIFT]
    elif alloc:
        pud = pgt._alloc_into(pgt.pgd, gi)
    else:
        return None
    return pud, (addr >> 30) & 511


def _next_boundary(addr: int, size: int) -> int:
    return (addr + size) & ~(size - 1)


def _clear_wp(pte: int) -> int:
    """Drop uffd-wp from a moved entry (``move_ptes`` with ``need_clear_uffd_wp``)."""
    if pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
        return pte & ~_PAGE_UFFD_WP
    return pte & ~_PAGE_SWP_UFFD_WP


def move_ptes(mm: MmStruct, old: int, new: int, extent: int, clear_wp: bool) -> None:
    """Move the PTEs of ``[old, old+extent)`` to ``new`` one by one (``move_ptes``).

    ``extent`` stays inside one PTE table on each side.
    """
    src = mm.pgtables.pte_table(old, False)
    if src is None:
        return
    dst: list[int] | None = None
    lo = (old >> PAGE_SHIFT) & 511
    dlo = (new >> PAGE_SHIFT) & 511
    for i in range(extent >> PAGE_SHIFT):
        pte = src[lo + i]
        if not pte:
            continue
        src[lo + i] = 0
        if clear_wp:
            if is_uffd_wp_marker(pte):
                continue
            pte = _clear_wp(pte)
        if dst is None:
            dst = mm.pgtables.pte_table(new, True)
            if dst is None:
                raise AssertionError(f"huge PMD at mremap destination {new:#x}")
        dst[dlo + i] = pte


def move_page_tables(mm: MmStruct, vma: Vma, old_addr: int, new_addr: int, length: int,
                     clear_wp: bool = False) -> None:
    """Move every entry of ``[old_addr, +length)`` to ``new_addr`` (``move_page_tables``).

    Whole tables move when both sides are aligned and the destination slot
    is empty; huge PMDs move whole or are split; the rest moves PTE by PTE.
    """
    old, new, end = old_addr, new_addr, old_addr + length
    while old < end:
        # a PMD table at once (move_normal_pud)
        if not clear_wp and not (old | new) & (PUD_SIZE - 1) and end - old >= PUD_SIZE:
            s = _pud_slot(mm, old, False)
            if s is not None and s[0][s[1]]:
                d = _pud_slot(mm, new, True)
                assert d is not None
                if not d[0][d[1]]:
                    d[0][d[1]] = s[0][s[1]]
                    s[0][s[1]] = 0
                    old += PUD_SIZE
                    new += PUD_SIZE
                    continue
        pmd = mm.pgtables.pmd_table(old, False)
        if pmd is None:  # nothing mapped up to the next PUD boundary
            step = min(_next_boundary(old, PUD_SIZE), end) - old
            old += step
            new += step
            continue
        extent = min(_next_boundary(old, PMD_SIZE) - old, _next_boundary(new, PMD_SIZE) - new,
                     end - old)
        i = (old >> 21) & 511
        e = pmd[i]
        if not e:
            old += extent
            new += extent
            continue
        leaf = bool(e & _PAGE_PSE) or not e & _PAGE_PRESENT
        if leaf and extent != PMD_SIZE:
            from vmemu.mmu.huge_memory import split_huge_pmd

            split_huge_pmd(mm, vma, old)  # unconditionally, unlike split_huge_pmd_at
            e = pmd[i]
            leaf = bool(e & _PAGE_PSE) or not e & _PAGE_PRESENT
            if leaf and e:
                raise AssertionError(f"huge PMD at {old:#x} was not split")
        if e and extent == PMD_SIZE and (leaf or not clear_wp):
            # move_huge_pmd / move_normal_pmd: one PMD entry carries it all
            dpmd = mm.pgtables.pmd_table(new, True)
            assert dpmd is not None
            j = (new >> 21) & 511
            if not dpmd[j]:
                if leaf and clear_wp:
                    e = _clear_wp(e)
                dpmd[j] = e
                pmd[i] = 0
                old += extent
                new += extent
                continue
            if leaf:
                raise AssertionError(f"mremap destination PMD at {new:#x} is not empty")
        if e:
            move_ptes(mm, old, new, extent, clear_wp)
        old += extent
        new += extent
    mm.tlb.flush_range(old_addr, old_addr + length)
    mm.tlb.flush_range(new_addr, new_addr + length)


# -- the VMA side ----------------------------------------------------------------


def copy_vma(mm: MmStruct, vma: Vma, addr: int, new_addr: int, new_len: int) -> Vma:
    """Make the destination VMA for moving ``addr`` of ``vma`` (``copy_vma``).

    The copy keeps the source's page offset (so folio indexes stay valid),
    except for an anonymous VMA that never had an anon_vma: its offset
    follows the new address, as a fresh mmap there would have, so it can
    merge with its new neighbours. May merge with a neighbour, even with the
    source itself; returns the VMA now covering the destination.
    """
    pgoff = vma.linear_page_index(addr)
    if vma.vm_file is None and vma.anon_vma is None:
        pgoff = new_addr >> PAGE_SHIFT
    new = vma_dup(vma)
    new.vm_start = new_addr
    new.vm_end = new_addr + new_len
    new.vm_pgoff = pgoff
    mm.vmas.insert(new)
    return vma_merge_neighbours(mm, new)


def move_vma(mm: MmStruct, req: RemapRequest) -> int:
    """Move ``[addr, +old_len)`` to ``new_addr``, sized ``new_len`` (``move_vma``)."""
    vma = req.vma
    assert vma is not None
    if len(mm.vmas) >= mm.max_map_count - 3:
        raise_errno(errno.ENOMEM, "max_map_count")  # prep_move_vma
    old_ctx = vma.vm_userfaultfd_ctx
    addr, old_len, new_addr = req.addr, req.old_len, req.new_addr
    new_vma = copy_vma(mm, vma, addr, new_addr, req.new_len)
    src = mm.vmas.vma_lookup(addr) if old_len else vma
    assert src is not None
    token = mm.mremap_uffd_prepare(src, new_vma)
    clear_wp = old_ctx is not None and token is None
    move_page_tables(mm, src, addr, new_addr, old_len, clear_wp)
    if token is not None:
        req.remaps.append((token, addr, new_addr, old_len))
    if req.flags & MREMAP_DONTUNMAP:
        # dontunmap_complete: the old range stays mapped, empty and unlocked
        src.vm_flags &= ~(VM_LOCKED | VM_LOCKONFAULT)
        if new_vma is not src and src.vm_start == addr and src.vm_end == addr + old_len:
            anon_vma_unlink(src)
    else:
        do_munmap(mm, addr, old_len)
    return new_addr


def vrm_set_new_addr(mm: MmStruct, req: RemapRequest) -> None:
    """Choose the destination (``vrm_set_new_addr`` -> ``get_unmapped_area``)."""
    vma = req.vma
    assert vma is not None
    hint = req.new_addr if req.implies_new_addr else 0
    flags = MAP_FIXED if req.flags & MREMAP_FIXED else 0
    thp_align = vma.vm_file is None and not vma.vm_flags & VM_MAYSHARE and not hint
    req.new_addr = get_unmapped_area(mm, hint, req.new_len, flags, thp_align)


def _shrink(mm: MmStruct, req: RemapRequest) -> None:
    """Unmap the tail beyond ``new_len`` (``shrink_vma``)."""
    do_munmap(mm, req.addr + req.new_len, req.old_len - req.new_len)
    req.vma = mm.vmas.vma_lookup(req.addr)


def mremap_to(mm: MmStruct, req: RemapRequest) -> int:
    """Move to the given ``new_addr`` (``mremap_to``)."""
    if req.flags & MREMAP_FIXED:
        before = len(mm.uf_unmap)
        do_munmap(mm, req.new_addr, req.new_len)
        req.unmap_early.extend(mm.uf_unmap[before:])
        del mm.uf_unmap[before:]
        req.vma = mm.vmas.vma_lookup(req.addr)
        if req.vma is None:
            raise_errno(errno.EFAULT)
    if req.new_len < req.old_len:
        _shrink(mm, req)
        if req.vma is None:
            raise_errno(errno.EFAULT)
        req.old_len = req.new_len
    vrm_set_new_addr(mm, req)
    return move_vma(mm, req)


def vma_expandable(mm: MmStruct, vma: Vma, delta: int) -> bool:
    """True when ``vma`` can grow by ``delta`` in place (``vma_expandable``)."""
    end = vma.vm_end + delta
    if mm.vmas.overlapping(vma.vm_end, end):
        return False
    return end <= TASK_SIZE


def expand_vma(mm: MmStruct, req: RemapRequest) -> int:
    """Grow in place if the range ends the VMA and room follows; else move (``expand_vma``)."""
    vma = req.vma
    assert vma is not None
    if vma.vm_end - req.addr == req.old_len and vma_expandable(mm, vma, req.delta):
        vma.vm_end += req.delta  # vma_merge_extend
        vma_merge_neighbours(mm, vma)
        return req.addr
    if not req.flags & MREMAP_MAYMOVE:
        raise_errno(errno.ENOMEM, "cannot grow in place and MREMAP_MAYMOVE not given")
    vrm_set_new_addr(mm, req)
    return move_vma(mm, req)


def mremap_at(mm: MmStruct, req: RemapRequest) -> int:
    """Resize without a requested address (``mremap_at``)."""
    if req.new_len == req.old_len:
        return req.addr
    if req.new_len < req.old_len:
        do_munmap(mm, req.addr + req.new_len, req.old_len - req.new_len)
        return req.addr
    return expand_vma(mm, req)


def remap_move(mm: MmStruct, req: RemapRequest) -> int:
    """A pure move (FIXED, same size) of every VMA in the range, gaps kept (``remap_move``)."""
    start, end = req.addr, req.addr + req.old_len
    target = req.new_addr
    res = -1
    seen = False
    last_end = start
    cursor = start
    while cursor < end:
        vma = mm.vmas.find_vma(cursor)
        if vma is None or vma.vm_start >= end:
            break
        if not seen and start < vma.vm_start:
            raise_errno(errno.EFAULT, "no mapping at old_address")
        addr = max(vma.vm_start, start)
        length = min(end, vma.vm_end) - addr
        offset = vma.vm_start - last_end if seen else 0
        last_end = vma.vm_end
        sub = RemapRequest(addr, length, length, req.flags, target + offset, vma,
                           remaps=req.remaps, unmap_early=req.unmap_early)
        if vma.vm_flags & VM_UFFD_FLAGS:  # vma_multi_allowed
            if seen or vma.vm_end < end:
                raise_errno(errno.EFAULT, "a userfaultfd-registered VMA moves only alone")
        check_prep_vma(mm, sub)
        got = mremap_to(mm, sub)
        if not seen:
            res = got
        seen = True
        target = got + length
        cursor = addr + length
    if not seen:
        raise_errno(errno.EFAULT, "no mapping at old_address")
    return res


def do_mremap(mm: MmStruct, addr: int, old_len: int, new_len: int, flags: int,
              new_addr: int) -> int:
    """The mremap(2) syscall; returns the mapping's (new) address (``do_mremap``)."""
    req = RemapRequest(addr & _U64, _page_align(old_len & _U64), _page_align(new_len & _U64),
                       flags & _U64, new_addr & _U64)
    check_mremap_params(req)
    failed = True
    try:
        with mm.lock:
            if req.flags & MREMAP_FIXED and req.old_len == req.new_len:
                res = remap_move(mm, req)
            else:
                req.vma = mm.vmas.vma_lookup(req.addr)
                check_prep_vma(mm, req)
                res = mremap_to(mm, req) if req.implies_new_addr else mremap_at(mm, req)
        failed = False
    finally:
        # notify_uffd: the destination's UNMAPs, then REMAP (or its failure); the caller
        # (MmStruct.mremap) then delivers the rest of mm.uf_unmap
        for ctx, start, end in req.unmap_early:
            ctx.event_unmap(start, end)
        for token, frm, to, length in req.remaps:
            if failed:
                mm.mremap_uffd_fail(token)
            else:
                mm.mremap_uffd_complete(token, frm, to, length)
    if req.populate_expand and req.new_len > req.old_len:
        mm.populate(res + req.old_len, res + req.new_len, ignore_errors=True)
    return res
