"""madvise: advice that changes flags or contents of a range (``mm/madvise.c``).

The range is checked first (alignment, length, known advice: EINVAL); then
each VMA in it gets the advice. Holes do not stop the walk: they make the
call return ENOMEM at the end (``madvise_walk_vmas``), after the mapped
parts were advised, exactly as the kernel does.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from vmemu.constants import (
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DODUMP,
    MADV_DOFORK,
    MADV_DONTDUMP,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_DONTNEED_LOCKED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_HWPOISON,
    MADV_KEEPONFORK,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_RANDOM,
    MADV_REMOVE,
    MADV_SEQUENTIAL,
    MADV_UNMERGEABLE,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SIZE,
)
from vmemu.errors import raise_errno
from vmemu.mmu.gup import populate
from vmemu.mmu.memory import zap_page_range
from vmemu.mmu.mmap import page_align
from vmemu.mmu.pgtable import _PAGE_PRESENT, _PAGE_PSE, PTE_PFN_MASK
from vmemu.mmu.swap_state import madvise_willneed
from vmemu.mmu.vma import (
    VM_DONTCOPY,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_DROPPABLE,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_IO,
    VM_LOCKED,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_MERGEABLE,
    VM_MIXEDMAP,
    VM_NOHUGEPAGE,
    VM_PFNMAP,
    VM_RAND_READ,
    VM_READ,
    VM_SEQ_READ,
    VM_SHARED,
    VM_SPECIAL,
    VM_UFFD_WP,
    VM_WIPEONFORK,
    VM_WRITE,
    Vma,
)
from vmemu.mmu.vmaops import vma_modify
from vmemu.mmu.vmscan import madvise_cold, madvise_pageout

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

# advice whose handling is a vm_flags change (madvise_update_vma)
_FLAG_ADVICE: dict[int, tuple[int, int]] = {
    # advice: (set, clear)
    MADV_NORMAL: (0, VM_RAND_READ | VM_SEQ_READ),
    MADV_RANDOM: (VM_RAND_READ, VM_SEQ_READ),
    MADV_SEQUENTIAL: (VM_SEQ_READ, VM_RAND_READ),
    MADV_DONTFORK: (VM_DONTCOPY, 0),
    MADV_DOFORK: (0, VM_DONTCOPY),
    MADV_WIPEONFORK: (VM_WIPEONFORK, 0),
    MADV_KEEPONFORK: (0, VM_WIPEONFORK),
    MADV_DONTDUMP: (VM_DONTDUMP, 0),
    MADV_DODUMP: (0, VM_DONTDUMP),
    MADV_HUGEPAGE: (VM_HUGEPAGE, VM_NOHUGEPAGE),
    MADV_NOHUGEPAGE: (VM_NOHUGEPAGE, VM_HUGEPAGE),
}


def _flag_advice(mm: MmStruct, vma: Vma, start: int, end: int, advice: int) -> None:
    """Apply a flag-changing advice to one VMA (``madvise_vma_behavior``)."""
    set_, clear = _FLAG_ADVICE[advice]
    if advice in (MADV_DONTFORK, MADV_DOFORK) and vma.vm_flags & VM_IO:
        raise_errno(errno.EINVAL)
    if advice == MADV_WIPEONFORK and (vma.vm_file is not None or vma.vm_flags & VM_SHARED):
        raise_errno(errno.EINVAL)
    if advice == MADV_DODUMP and vma.vm_flags & VM_SPECIAL and not vma.vm_flags & VM_HUGETLB:
        raise_errno(errno.EINVAL)
    new = (vma.vm_flags | set_) & ~clear
    if new == vma.vm_flags:
        return

    def change(v: Vma) -> None:
        v.vm_flags = new

    vma_modify(mm, vma, start, end, change)


_KSM_INCOMPATIBLE = VM_SHARED | VM_MAYSHARE | VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_HUGETLB | \
    VM_MIXEDMAP | VM_DROPPABLE


def _ksm_advice(mm: MmStruct, vma: Vma, start: int, end: int, advice: int) -> None:
    """MADV_MERGEABLE / MADV_UNMERGEABLE: set or clear VM_MERGEABLE (``ksm_madvise``).

    A VMA KSM cannot work on (shared, special, hugetlb: ``vma_ksm_compatible``)
    ignores MADV_MERGEABLE without an error. vmemu has no ksmd, so no page is
    ever merged (as with ``/sys/kernel/mm/ksm/run`` at its default 0) and
    unmerging has nothing to break.
    """
    if advice == MADV_MERGEABLE:
        if vma.vm_flags & (VM_MERGEABLE | _KSM_INCOMPATIBLE):
            return
        new = vma.vm_flags | VM_MERGEABLE
    else:
        if not vma.vm_flags & VM_MERGEABLE:
            return
        new = vma.vm_flags & ~VM_MERGEABLE

    def change(v: Vma) -> None:
        v.vm_flags = new

    vma_modify(mm, vma, start, end, change)


def _check_dontneed_free(vma: Vma, advice: int) -> None:
    """EINVAL for VMAs whose pages may not be dropped (``madvise_dontneed_free_valid_vma``)."""
    forbidden = VM_PFNMAP | (0 if advice == MADV_DONTNEED_LOCKED else VM_LOCKED)
    if not vma.vm_flags & VM_HUGETLB and vma.vm_flags & forbidden:
        raise_errno(errno.EINVAL)


def _relookup(mm: MmStruct, start: int, end: int) -> tuple[Vma, int]:
    """Find the VMA again after a userfaultfd event dropped the mm lock; ENOMEM if gone."""
    vma = mm.vmas.vma_lookup(start)
    if vma is None:
        raise_errno(errno.ENOMEM)
    return vma, min(end, vma.vm_end)


def _dontneed(mm: MmStruct, vma: Vma, start: int, end: int, advice: int) -> None:
    """Drop the pages of the range (``madvise_dontneed_single_vma``).

    Private anonymous memory reads back as zeros afterwards; shmem and
    private file mappings refault from the page cache.
    """
    _check_dontneed_free(vma, advice)
    if vma.vm_flags & VM_HUGETLB:
        from vmemu.mmu.hugetlb import hugetlb_dontneed_range

        start, end = hugetlb_dontneed_range(vma, start, end)
        if start >= end:
            return
    if mm.userfaultfd_remove(vma, start, end):
        vma, end = _relookup(mm, start, end)
    # shmem arms a marker only in a uffd-wp VMA (pte_install_uffd_wp_if_needed); hugetlb's
    # __unmap_hugepage_range keeps any uffd-wp state as a marker, whatever the registration
    keep_wp = vma.vm_file is not None and bool(vma.vm_flags & (VM_UFFD_WP | VM_HUGETLB))
    zap_page_range(mm, vma, start, end, keep_wp, drop_markers=vma.vm_file is None)
    _reclaim_pt(mm, start, end)


def _reclaim_pt(mm: MmStruct, start: int, end: int) -> None:
    """Free the PTE tables MADV_DONTNEED emptied whole (``try_to_free_pte``, CONFIG_PT_RECLAIM).

    Only tables whose whole 2 MiB lies in the range and that hold nothing
    any more (a uffd-wp marker keeps one) go; the PMD entry becomes none, so
    the next fault there may install a THP again, as on x86-64 since 6.14.
    """
    mem_map = mm.phys.mem_map
    addr = (start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    while addr + PMD_SIZE <= end:
        pmd = mm.pgtables.pmd_table(addr, False)
        if pmd is not None:
            idx = (addr >> 21) & 511
            e = pmd[idx]
            if e & _PAGE_PRESENT and not e & _PAGE_PSE:
                pfn = (e & PTE_PFN_MASK) >> PAGE_SHIFT
                if not any(mem_map[pfn]):
                    pmd[idx] = 0
                    mm.phys.free_table(pfn)
                    mm.pgtables.nr_tables -= 1
        addr += PMD_SIZE


def _free(mm: MmStruct, vma: Vma, start: int, end: int, advice: int) -> None:
    """Mark private anonymous pages lazily freeable (``madvise_free_single_vma``).

    ``madvise_dontneed_free`` raises UFFD_EVENT_REMOVE before it looks at the
    kind of memory: a registered shmem range gets the event, then EINVAL
    (hugetlb is refused before, by ``madvise_dontneed_free_valid_vma``).
    """
    _check_dontneed_free(vma, advice)
    if vma.vm_flags & VM_HUGETLB:
        raise_errno(errno.EINVAL)
    if mm.userfaultfd_remove(vma, start, end):
        vma, end = _relookup(mm, start, end)
        _check_dontneed_free(vma, advice)
        if vma.vm_flags & VM_HUGETLB:
            raise_errno(errno.EINVAL)
    if vma.vm_file is not None or vma.vm_flags & VM_SHARED:
        raise_errno(errno.EINVAL)
    mm.lazyfree_range(vma, start, end)


_ULONG_MASK = (1 << 64) - 1


def _remove(mm: MmStruct, vma: Vma, start: int, end: int, advice: int) -> None:
    """Punch a hole in the shmem file behind the range (``madvise_remove``)."""
    from vmemu.mmu.memfd import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

    if vma.vm_flags & VM_LOCKED:
        raise_errno(errno.EINVAL)
    if vma.vm_file is None:
        raise_errno(errno.EINVAL)
    if not (vma.vm_flags & VM_SHARED and vma.vm_flags & VM_MAYWRITE):
        raise_errno(errno.EACCES)
    offset = (start - vma.vm_start) + (vma.vm_pgoff << PAGE_SHIFT)
    mm.userfaultfd_remove(vma, start, end)
    fallocate(vma.vm_file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, end - start)


_POPULATE = {MADV_POPULATE_READ: False, MADV_POPULATE_WRITE: True}


def _populate(mm: MmStruct, start: int, end: int, write: bool) -> None:
    """MADV_POPULATE_READ/WRITE (``madvise_populate``).

    Faults the range in VMA by VMA; a VMA whose flags forbid the access
    (``check_vma_flags`` under FOLL_MADV_POPULATE) ends the call with EINVAL
    after the VMAs before it were populated; a hole is ENOMEM and a fault
    that would signal is EFAULT (from :func:`populate`).
    """
    need = VM_WRITE if write else VM_READ
    bad = None
    with mm.lock:  # not held across populate(): a userfault may sleep in it
        addr = start
        while addr < end:
            vma = mm.vmas.vma_lookup(addr)
            if vma is None:
                break  # populate() stops here with ENOMEM
            if not vma.vm_flags & need or vma.vm_flags & (VM_IO | VM_PFNMAP):
                bad = addr
                break
            addr = vma.vm_end
    populate(mm, start, end if bad is None else bad, write=write)
    if bad is not None:
        raise_errno(errno.EINVAL, "VMA does not allow the access")


def _collapse(mm: MmStruct, vma: Vma, start: int, end: int, advice: int) -> None:
    """MADV_COLLAPSE: see :func:`vmemu.mmu.huge_memory.madvise_collapse`."""
    from vmemu.mmu.huge_memory import madvise_collapse

    if vma.vm_file is not None and not vma.vm_flags & VM_HUGETLB and \
            getattr(vma.vm_file, "i_mmap", None) is not None:
        # Linux 6.18 collapses shmem too (collapse_file: a PMD-mapped shmem THP,
        # smaps ShmemPmdMapped) even with shmem_enabled=never; vmemu's page cache
        # holds only 4 KiB folios
        raise_errno(errno.EINVAL, "MADV_COLLAPSE of shmem is not emulated (no shmem THPs)")
    madvise_collapse(mm, vma, start, end)


def do_madvise(mm: MmStruct, start: int, len_in: int, advice: int) -> None:
    """The madvise(2) syscall (``do_madvise``)."""
    handlers: dict[int, Callable[[MmStruct, Vma, int, int, int], None]] = {
        **{a: _flag_advice for a in _FLAG_ADVICE},
        MADV_DONTNEED: _dontneed,
        MADV_DONTNEED_LOCKED: _dontneed,
        MADV_FREE: _free,
        MADV_REMOVE: _remove,
        MADV_COLD: madvise_cold,
        MADV_PAGEOUT: madvise_pageout,
        MADV_WILLNEED: madvise_willneed,
        MADV_COLLAPSE: _collapse,
        MADV_MERGEABLE: _ksm_advice,
        MADV_UNMERGEABLE: _ksm_advice,
    }
    handlers.update(mm.extra_madvise)
    if advice not in handlers and advice not in _POPULATE and advice != MADV_HWPOISON:
        raise_errno(errno.EINVAL, f"unknown advice {advice}")
    start &= _ULONG_MASK  # start and len_in are unsigned long / size_t in the syscall
    len_in &= _ULONG_MASK
    if start & (PAGE_SIZE - 1):
        raise_errno(errno.EINVAL)
    length = page_align(len_in) & _ULONG_MASK
    if len_in and not length:
        raise_errno(errno.EINVAL)
    end = (start + length) & _ULONG_MASK
    if end < start:
        raise_errno(errno.EINVAL)
    if end == start:
        return
    if advice in _POPULATE:
        _populate(mm, start, end, _POPULATE[advice])
        return
    if advice == MADV_HWPOISON:  # is_memory_failure: no VMA walk
        from vmemu.mmu.memory_failure import madvise_inject_error

        madvise_inject_error(mm, start, end, advice)
        return
    handler = handlers.get(advice)
    with mm.lock:
        unmapped = False
        addr = start
        while addr < end:
            vma = mm.vmas.find_vma(addr)
            if vma is None or vma.vm_start >= end:
                unmapped = True
                break
            if vma.vm_start > addr:
                unmapped = True
                addr = vma.vm_start
            stop = min(end, vma.vm_end)
            if handler is not None:
                handler(mm, vma, addr, stop, advice)
            addr = stop
        if unmapped:
            raise_errno(errno.ENOMEM)
