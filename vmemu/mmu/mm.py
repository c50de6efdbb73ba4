"""The address space of a process: ``struct mm_struct`` and the access path.

An :class:`MmStruct` owns the VMA tree, the page tables, the software TLB
and the counters. Memory accesses arrive through :meth:`MmStruct.translate`,
which does what the MMU and ``exc_page_fault`` do together: walk the
tables; if the walk fails, find the VMA, check the access
(``access_error``) and call ``handle_mm_fault``; retry after
``VM_FAULT_RETRY``; turn a failed fault into a signal.

The syscalls that change the address space live in their own modules
(``mmap.py``, ``mprotect.py``, ``madvise.py``, ``fork.py``) and take the mm
as their first argument; :class:`MmStruct` exposes them as methods.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

import attrs

from vmemu.constants import PAGE_SHIFT, SEGV_ACCERR, SEGV_MAPERR, TASK_SIZE
from vmemu.errors import Sigsegv, VmFault, fault_to_signal
from vmemu.mmu.folio import PG, Folio, PhysMem, folio_maybe_mapped_shared
from vmemu.mmu.memory import (
    _VM_HUGE_CANDIDATE,
    FAULT_FLAG_USER,
    FAULT_FLAG_WRITE,
    VmFaultInfo,
    anon_vma_prepare,
    handle_mm_fault,
)
from vmemu.mmu.pagetable import PageTables
from vmemu.mmu.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SPECIAL,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
    SWP_HWPOISON,
    UFFD_WP_MARKER,
    is_poisoned_marker,
    is_real_swap_pte,
    pte_swp_clear_exclusive,
    pte_swp_clear_uffd_wp,
    swp_entry_clean,
    swp_type,
)
from vmemu.mmu.tlb import Tlb
from vmemu.mmu.vma import (
    VM_EXEC,
    VM_MAYWRITE,
    VM_READ,
    VM_UFFD_FLAGS,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    Vma,
    VmaTree,
)
from vmemu.mmu.vmaops import DEFAULT_MAX_MAP_COUNT

# Flags of a freshly faulted anonymous folio, computed once: IntFlag's ``|``
# is a Python-level call, too slow for the fault path.
_NEW_ANON_FOLIO_FLAGS = PG.anon | PG.anon_exclusive | PG.swapbacked | PG.uptodate | PG.dirty
_VM_FAULT_NONE = VmFault.NONE
_VM_FAULT_RETRY = VmFault.RETRY
_VM_FAULT_ERROR = int(VmFault.error_mask())
_FLAGS_READ = FAULT_FLAG_USER
_FLAGS_WRITE = FAULT_FLAG_USER | FAULT_FLAG_WRITE
_PAGE_MASK = ~((1 << PAGE_SHIFT) - 1)

# Where top-down mmap placement starts (mm->mmap_base), without ASLR.
DEFAULT_MMAP_BASE = 0x7F0000000000
MAX_FAULT_RETRIES = 64


@attrs.frozen
class MmStats:
    """Counters of one address space."""

    faults: int
    cow: int
    wp_reuse: int
    zero_page_maps: int
    anon_pages: int
    page_tables: int
    map_count: int
    tlb_fills: int
    tlb_flushes: int


class MmStruct:
    """One address space (``struct mm_struct``)."""

    def __init__(self, phys: PhysMem, mmap_base: int = DEFAULT_MMAP_BASE) -> None:
        self.phys = phys
        self.pgtables = PageTables(phys)
        self.tlb = Tlb()
        self.vmas = VmaTree()
        self.lock = threading.RLock()  # mmap_lock; the fault path holds it too
        self.mmap_base = mmap_base
        self.max_map_count = DEFAULT_MAX_MAP_COUNT
        self.uffd_wp_marker_value = UFFD_WP_MARKER
        self.stats_faults = 0
        self.stats_cow = 0
        self.stats_wp_reuse = 0
        self.stats_zero_maps = 0
        self.anon_rss = 0
        self.dead = False
        self.owner: Any = None
        self.extra_madvise: dict[int, Any] = {}
        self.uf_unmap: list[Any] = []  # (ctx, start, end) awaiting UNMAP events
        self.fork_ctxs: dict[int, Any] = {}  # parent ctx id -> (parent, child) during fork
        self.def_flags = 0  # VM_LOCKED[ONFAULT] after mlockall(MCL_FUTURE) (mm->def_flags)
        phys.mms.append(self)

    # -- physical pages --------------------------------------------------------

    def alloc_anon_folio(self, vma: Vma, addr: int) -> Folio | None:
        """Allocate a zeroed folio and add it to ``vma``'s anon rmap (``folio_add_new_anon_rmap``)."""
        folio = self.phys.alloc_folio(0)
        if folio is None:
            return None
        av = vma.anon_vma
        if av is None:
            av = anon_vma_prepare(vma)
        folio.flags = _NEW_ANON_FOLIO_FLAGS
        folio.mapping = av
        folio.index = vma.vm_pgoff + ((addr - vma.vm_start) >> PAGE_SHIFT)  # linear_page_index
        folio.mapcount = 1
        return folio

    # -- hooks filled in by the huge-page and swap layers ----------------------

    def huge_fault(self, vma: Vma, address: int, flags: int, task: Any) -> VmFault:
        """A fault under a huge PMD (``__handle_mm_fault`` PMD path); see :mod:`.huge_memory`."""
        from vmemu.mmu.huge_memory import huge_pmd_fault

        return huge_pmd_fault(self, vma, address, flags, task)

    def create_huge_pmd(self, vma: Vma, address: int, flags: int, task: Any) -> VmFault:
        """A fault on an empty PMD of a hugetlb or THP-advised VMA; FALLBACK means 4 KiB."""
        from vmemu.mmu.huge_memory import create_huge_pmd

        return create_huge_pmd(self, vma, address, flags, task)

    def split_huge_pmd_at(self, vma: Vma, addr: int) -> None:
        """Split a huge PMD straddling ``addr`` (``split_huge_pmd_address``).

        For hugetlb this is ``hugetlb_vm_op_split``: EINVAL unless aligned.
        """
        from vmemu.mmu.huge_memory import split_huge_pmd_address

        split_huge_pmd_address(self, vma, addr)

    def split_huge_range(self, vma: Vma, start: int, end: int) -> None:
        """Split huge PMDs and THP folios that ``[start, end)`` covers only partly."""
        from vmemu.mmu.huge_memory import split_huge_range

        split_huge_range(self, vma, start, end)

    def zap_huge_pmds(self, vma: Vma, start: int, end: int, keep_wp_marker: bool = False) -> None:
        """Unmap huge PMD leaves inside ``[start, end)`` (``zap_huge_pmd``, hugetlb unmap)."""
        from vmemu.mmu.huge_memory import zap_huge_pmds

        zap_huge_pmds(self, vma, start, end, keep_wp_marker)

    def copy_huge_pmds(self, child: MmStruct, src_vma: Vma, dst_vma: Vma,
                       keep_uffd_wp: bool) -> None:
        """Share huge PMD leaves with a forked child (``copy_huge_pmd``)."""
        from vmemu.mmu.huge_memory import copy_huge_pmds

        copy_huge_pmds(self, child, src_vma, dst_vma, keep_uffd_wp)

    def do_swap_page(self, vmf: Any) -> VmFault:
        """Swap a page back in; see :func:`vmemu.mmu.swap_state.do_swap_page`."""
        from vmemu.mmu.swap_state import do_swap_page

        return do_swap_page(self, vmf)

    def free_swap_pte(self, pte: int) -> None:
        """Drop the swap slot a zapped swap PTE held (``free_swap_and_cache``)."""
        if is_real_swap_pte(pte) and self.phys.swap is not None:
            with self.phys.swap.lock:
                self.phys.swap.free_swap_and_cache(swp_entry_clean(pte))

    def dup_swap_pte(self, pte: int, keep_uffd_wp: bool) -> int:
        """The child's copy of a swap PTE at fork, one more swap count (``copy_nonpresent_pte``)."""
        if is_real_swap_pte(pte) and self.phys.swap is not None:
            with self.phys.swap.lock:
                self.phys.swap.swap_duplicate(swp_entry_clean(pte))
            pte = pte_swp_clear_exclusive(pte)
        return pte if keep_uffd_wp else pte_swp_clear_uffd_wp(pte)

    def dup_swap_pte_parent(self, pte: int) -> int:
        """The parent's swap PTE after fork: shared now, so not exclusive."""
        return pte_swp_clear_exclusive(pte) if is_real_swap_pte(pte) else pte

    def free_swap_cache(self, folio: Folio) -> None:
        """After a zap or COW unmapped ``folio``: drop its unused swap cache (``free_swap_cache``)."""
        if folio.flags & PG.swapcache and not folio.mapcount:
            from vmemu.mmu.swap_state import free_swap_cache

            with self.phys.swap.lock:
                free_swap_cache(self.phys.swap, folio)

    def mmap_hugetlb(self, addr: int, length: int, prot: int, flags: int, file: Any,
                     offset: int) -> int:
        """MAP_HUGETLB or a hugetlbfs file; see :func:`vmemu.mmu.hugetlb.mmap_hugetlb`."""
        from vmemu.mmu.hugetlb import mmap_hugetlb

        return mmap_hugetlb(self, addr, length, prot, flags, file, offset)

    def file_vm_flags(self, file: Any, vm_flags: int, shared: bool) -> int:
        """Apply a sealed file's rules to a new mapping's flags (``memfd_check_seals_mmap``).

        F_SEAL_WRITE forbids shared writable mappings (EPERM); F_SEAL_FUTURE_WRITE
        forbids them too and takes VM_MAYWRITE away from shared read-only ones.
        """
        from vmemu.errors import raise_errno
        from vmemu.mmu.memfd import F_SEAL_FUTURE_WRITE, F_SEAL_WRITE

        seals = getattr(file, "seals", 0)
        if shared and seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
            if vm_flags & VM_WRITE:
                raise_errno(errno.EPERM, "file is sealed against writing")
            vm_flags &= ~VM_MAYWRITE
        return vm_flags

    # -- userfaultfd hooks (the uffd layer attaches contexts to VMAs) ----------

    def userfaultfd_remove(self, vma: Vma, start: int, end: int) -> bool:
        """Tell ``vma``'s userfaultfd that pages are being dropped (``userfaultfd_remove``).

        Returns True when an event was raised: the mm lock was dropped while
        the monitor read it, so the caller must look the VMA up again.
        """
        ctx = vma.vm_userfaultfd_ctx
        if ctx is None:
            return False
        return bool(ctx.event_remove(start, end))

    def dup_userfaultfd(self, pvma: Vma, vma: Vma, child: MmStruct) -> bool:
        """Decide whether the child's ``vma`` keeps registration (``dup_userfaultfd``)."""
        ctx = pvma.vm_userfaultfd_ctx
        if ctx is None:
            return False
        return bool(ctx.dup_vma(vma, child, child.fork_ctxs))

    def dup_userfaultfd_complete(self, child: MmStruct) -> None:
        """Raise the FORK events of a finished fork and wait for them (``dup_userfaultfd_complete``)."""
        pending, child.fork_ctxs = child.fork_ctxs, {}
        for parent_ctx, child_ctx in pending.values():
            parent_ctx.event_fork(child_ctx)

    def userfaultfd_unmap_prep(self, start: int, end: int) -> None:
        """Note the contexts that must hear of an unmap of ``[start, end)`` (``userfaultfd_unmap_prep``)."""
        for vma in self.vmas.overlapping(start, end):
            ctx = vma.vm_userfaultfd_ctx
            if ctx is not None:
                ctx.unmap_prep(self.uf_unmap, start, end)

    def userfaultfd_unmap_complete(self) -> None:
        """Deliver the UNMAP events a syscall collected, lock dropped (``userfaultfd_unmap_complete``)."""
        pending, self.uf_unmap = self.uf_unmap, []
        for ctx, start, end in pending:
            ctx.event_unmap(start, end)

    def mremap_uffd_prepare(self, vma: Vma, new_vma: Vma) -> Any:
        """mremap moved ``vma``'s pages to ``new_vma`` (``mremap_userfaultfd_prep``).

        Called with the mmap lock held, once per moved VMA, before its page
        tables move. Does nothing and returns None when ``new_vma`` has no
        ``vm_userfaultfd_ctx``. Otherwise asks ``ctx.mremap_prep(new_vma)``
        (optional; assumed True when the context lacks it): True means the
        context wants UFFD_EVENT_REMAP (it should bump ``mmap_changing`` now),
        and the context is returned as the token that
        :meth:`mremap_uffd_complete` or :meth:`mremap_uffd_fail` later gets.
        False means EVENT_REMAP is off: the moved VMA loses its registration
        (``userfaultfd_reset_ctx``), the move drops uffd-wp bits and markers,
        and None is returned.
        """
        ctx = new_vma.vm_userfaultfd_ctx
        if ctx is None:
            return None
        if ctx.mremap_prep(new_vma):
            return ctx
        new_vma.vm_userfaultfd_ctx = None
        new_vma.vm_flags &= ~VM_UFFD_FLAGS
        return None

    def mremap_uffd_complete(self, token: Any, from_: int, to: int, length: int) -> None:
        """Deliver UFFD_EVENT_REMAP(from, to, len) (``mremap_userfaultfd_complete``).

        Called after the mmap lock is released, with a token returned by
        :meth:`mremap_uffd_prepare`; calls ``token.event_remap(from_, to, length)``.
        """
        if token is not None:
            token.event_remap(from_, to, length)

    def mremap_uffd_fail(self, token: Any) -> None:
        """The mremap failed after prepare (``mremap_userfaultfd_fail``): ``token.mremap_fail()``."""
        if token is not None:
            token.mremap_fail()

    # -- lazily freed anonymous memory -------------------------------------------

    def lazyfree_range(self, vma: Vma, start: int, end: int) -> None:
        """MADV_FREE: mark exclusive anon pages clean and freeable (``madvise_free_pte_range``).

        Their contents stay until reclaim discards them; a write in between
        dirties the PTE again and keeps the page. THPs go through
        :func:`~vmemu.mmu.huge_memory.madvise_free_huge_pmd` first; a
        PTE-mapped large folio the range covers whole is freed whole, one
        covered partly is split unless another process maps it.
        """
        from vmemu.mmu.huge_memory import folio_mark_lazyfree, madvise_free_huge_pmd, split_folio

        madvise_free_huge_pmd(self, vma, start, end)
        mem_map = self.phys.mem_map
        for addr, table, lo, hi in self.pgtables.iter_pte_tables(start, end):
            base = addr & ~((1 << 21) - 1)
            for idx in range(lo, hi):
                pte = table[idx]
                if not pte:
                    continue
                if not pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
                    if is_real_swap_pte(pte):
                        self.free_swap_pte(pte)
                        table[idx] = 0
                    elif is_poisoned_marker(pte) or swp_type(pte) == SWP_HWPOISON:
                        table[idx] = 0  # poison markers and hwpoison entries go; uffd-wp stays
                    continue
                if pte & _PAGE_SPECIAL:
                    continue
                pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
                folio = mem_map[pfn]
                if folio.order and not folio.flags & PG.hugetlb:
                    first = (base | (idx << PAGE_SHIFT)) - ((pfn - folio.pfn) << PAGE_SHIFT)
                    if start <= first and first + (folio.nr_pages << PAGE_SHIFT) <= end:
                        if folio.mapcount == folio.nr_pages:  # mapped here only, whole
                            table[idx] = pte & ~(_PAGE_DIRTY | _PAGE_ACCESSED)
                            folio.flags &= ~PG.dirty
                            folio_mark_lazyfree(self.phys, folio)
                        continue
                    if folio_maybe_mapped_shared(folio) or not split_folio(self.phys, folio):
                        continue
                    pte = table[idx]  # a zero-filled piece is the shared zero page now
                    folio = mem_map[pfn]
                    if pte & _PAGE_SPECIAL or not isinstance(folio, Folio):
                        continue
                if folio.mapcount != 1:
                    continue
                if folio.flags & PG.swapcache:
                    from vmemu.mmu.swap_state import folio_free_swap

                    with self.phys.swap.lock:
                        if not folio_free_swap(self.phys.swap, folio):
                            continue
                table[idx] = pte & ~(_PAGE_DIRTY | _PAGE_ACCESSED)
                folio.flags &= ~PG.dirty
                folio_mark_lazyfree(self.phys, folio)
        self.tlb.flush_range(start, end)

    # -- the syscalls ----------------------------------------------------------

    def mmap(self, addr: int, length: int, prot: int, flags: int, file: Any = None,
             offset: int = 0) -> int:
        """mmap(2); see :func:`vmemu.mmu.mmap.do_mmap`."""
        from vmemu.mmu.mmap import do_mmap

        try:
            return do_mmap(self, addr, length, prot, flags, file, offset)
        finally:
            self.userfaultfd_unmap_complete()

    def munmap(self, addr: int, length: int) -> None:
        """munmap(2); see :func:`vmemu.mmu.mmap.do_munmap`."""
        from vmemu.mmu.mmap import check_munmap_args, do_munmap

        try:
            do_munmap(self, addr, check_munmap_args(addr, length))
        finally:
            self.userfaultfd_unmap_complete()

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """mprotect(2); see :func:`vmemu.mmu.mprotect.do_mprotect`."""
        from vmemu.mmu.mprotect import do_mprotect

        do_mprotect(self, addr, length, prot)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise(2); see :func:`vmemu.mmu.madvise.do_madvise`."""
        from vmemu.mmu.madvise import do_madvise

        do_madvise(self, addr, length, advice)

    def mremap(self, old_addr: int, old_len: int, new_len: int, flags: int = 0,
               new_addr: int = 0) -> int:
        """mremap(2); see :func:`vmemu.mmu.mremap.do_mremap`."""
        from vmemu.mmu.mremap import do_mremap

        try:
            return do_mremap(self, old_addr, old_len, new_len, flags, new_addr)
        finally:
            self.userfaultfd_unmap_complete()

    def mlock(self, addr: int, length: int, flags: int = 0) -> None:
        """mlock2(2) (mlock(2) with ``flags=0``); see :func:`vmemu.mmu.mlock.do_mlock`."""
        from vmemu.mmu.mlock import do_mlock

        do_mlock(self, addr, length, flags)

    def munlock(self, addr: int, length: int) -> None:
        """munlock(2); see :func:`vmemu.mmu.mlock.do_munlock`."""
        from vmemu.mmu.mlock import do_munlock

        do_munlock(self, addr, length)

    def populate(self, start: int, end: int, write: bool | None = None,
                 ignore_errors: bool = False) -> None:
        """Fault in a range on the kernel's behalf (``mm_populate``)."""
        from vmemu.mmu.gup import populate

        populate(self, start, end, write, ignore_errors)

    def fork(self, child: MmStruct | None = None) -> MmStruct:
        """Fill ``child`` (or a new mm) with a copy-on-write duplicate of this one (``dup_mm``).

        FORK events are raised separately, once the child exists, by
        :meth:`dup_userfaultfd_complete`.
        """
        from vmemu.mmu.fork import dup_mmap

        if child is None:
            child = MmStruct(self.phys, self.mmap_base)
        child.max_map_count = self.max_map_count
        child.extra_madvise = dict(self.extra_madvise)
        dup_mmap(self, child)
        return child

    def exit_mmap(self) -> None:
        """Tear the address space down at exit (``exit_mmap``)."""
        from vmemu.mmu.memory import zap_page_range
        from vmemu.mmu.vmaops import remove_vma

        with self.lock:
            if self.dead:
                return
            for vma in list(self.vmas):
                zap_page_range(self, vma, vma.vm_start, vma.vm_end, keep_wp_marker=False)
                remove_vma(self, vma)
            self.pgtables.free_all()
            self.tlb.flush_all()
            self.dead = True
            self.phys.mms.remove(self)

    def check(self) -> None:
        """Verify every invariant of this mm and of the mms sharing its memory.

        See :mod:`vmemu.mmu.check`; raises ``AssertionError`` on a violation.
        """
        from vmemu.mmu.check import check_phys

        with self.lock:
            check_phys(self.phys, list(self.phys.mms))

    def swap_count(self, pte: int) -> int:
        """Mappings sharing a swap slot (``swp_swapcount``)."""
        swap = self.phys.swap
        return 0 if swap is None else int(swap.swap_count(swp_entry_clean(pte)))

    def thp_eligible(self, vma: Vma) -> int:
        """smaps THPeligible; see :func:`vmemu.mmu.huge_memory.thp_vma_allowable`."""
        from vmemu.mmu.huge_memory import thp_eligible

        return thp_eligible(self, vma)

    def check_swap_pte(self, addr: int, pte: int) -> None:
        """Check a swap PTE against the swap device (``check()`` helper)."""
        from vmemu.mmu.vma import VM_SHARED

        swap = self.phys.swap
        assert swap is not None, f"swap PTE {pte:#x} at {addr:#x} but no swap was ever on"
        entry = swp_entry_clean(pte)
        assert swap.swap_info_get(entry) is not None, f"swap PTE {pte:#x} at {addr:#x}: bad entry"
        assert swap.swap_count(entry) > 0, f"swap PTE {pte:#x} at {addr:#x} names a free slot"
        vma = self.vmas.vma_lookup(addr)
        assert vma is not None and not vma.vm_flags & VM_SHARED, \
            f"swap PTE {pte:#x} at {addr:#x} in a shared mapping"

    # -- the access path -------------------------------------------------------

    def translate(self, addr: int, write: bool, task: Any = None) -> Any:
        """Return the page buffer for ``addr``, faulting as needed (MMU walk + ``exc_page_fault``).

        Raises :class:`~vmemu.errors.Signal` on a bad access; the address
        space is left unchanged in that case.
        """
        if not 0 <= addr < TASK_SIZE:
            raise Sigsegv(SEGV_MAPERR, addr)
        mem_map = self.phys.mem_map
        pgd = self.pgtables.pgd
        with self.lock:
            for _ in range(MAX_FAULT_RETRIES):
                # the hardware walk down to the PMD (pmd_table(addr, False), inlined:
                # this runs twice on every fault and once on every TLB miss)
                table = None
                e = pgd[(addr >> 39) & 511]
                if e:
                    e = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT][(addr >> 30) & 511]
                if e:
                    pmd = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
                    e = pmd[(addr >> 21) & 511]
                    if e & _PAGE_PRESENT:
                        if e & _PAGE_PSE:
                            table, idx = pmd, (addr >> 21) & 511
                            pfn = ((e & PTE_PFN_MASK) >> PAGE_SHIFT & ~511) | ((addr >> PAGE_SHIFT) & 511)
                            pte = e
                        else:
                            table = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
                            idx = (addr >> PAGE_SHIFT) & 511
                            pte = table[idx]
                            pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
                        if pte & _PAGE_PRESENT and (not write or pte & _PAGE_RW):
                            # the hardware walker sets A, and D on a write
                            if write:
                                pte |= _PAGE_ACCESSED | _PAGE_DIRTY
                            else:
                                pte |= _PAGE_ACCESSED
                            table[idx] = pte
                            folio = mem_map[pfn]
                            buf = folio.data if folio.order == 0 else folio.page_buffer(pfn)
                            self.tlb.fill(addr >> PAGE_SHIFT, buf,
                                          pte & _PAGE_RW and pte & _PAGE_DIRTY)
                            return buf
                if table is not None and (pte == 0 or write and pte & _PAGE_UFFD_WP):
                    fault = self._userfault_fast(addr, write, task, table, idx, pte)
                    if fault is None:
                        fault = self._do_user_addr_fault(addr, write, task)
                else:
                    fault = self._do_user_addr_fault(addr, write, task)
                # (IntFlag's & is a Python call: the common results are tested by identity)
                if fault is not _VM_FAULT_NONE and fault is not _VM_FAULT_RETRY \
                        and int(fault) & _VM_FAULT_ERROR:
                    raise fault_to_signal(fault, addr)
            raise AssertionError(f"fault at {addr:#x} retried {MAX_FAULT_RETRIES} times")

    def _userfault_fast(self, addr: int, write: bool, task: Any, table: list[int], idx: int,
                        pte: int) -> VmFault | None:
        """A registered VMA's common userfault, or None for the general path.

        ``do_user_addr_fault`` -> ``handle_mm_fault`` -> ``do_anonymous_page`` /
        ``do_fault`` / ``do_wp_page`` -> ``handle_userfault`` in one frame, for
        the faults a handler exists to serve: an empty PTE of a private
        anonymous VMA registered for MISSING, an empty PTE of a shmem VMA
        registered for MINOR whose page is cached, and a write to a present
        uffd-wp PTE of a VMA registered for WP (not WP_ASYNC) - each in a 4 KiB
        VMA, with the PTE table already there (the walk found it). The checks,
        the charge, the tracepoint and the counters are those of the general
        path, in its order; anything else (an access the VMA refuses, a huge
        page candidate, fault-around, a page to swap in) returns None before
        any of them, and the general path takes the fault from the top.
        """
        vma = self.vmas.vma_lookup(addr)
        if vma is None:
            return None
        ctx = vma.vm_userfaultfd_ctx
        vm_flags = vma.vm_flags
        if ctx is None or vm_flags & _VM_HUGE_CANDIDATE or self.phys.thp_enabled == "always":
            return None
        if write:
            if not vm_flags & VM_WRITE:
                return None
        elif not vm_flags & (VM_READ | VM_WRITE | VM_EXEC):
            return None
        pgoff = vma.vm_pgoff + ((addr - vma.vm_start) >> PAGE_SHIFT)  # linear_page_index
        if pte:  # do_wp_page: userfaultfd_pte_wp, and no WP_ASYNC to resolve it silently
            if not (write and pte & _PAGE_PRESENT and not pte & _PAGE_RW and pte & _PAGE_UFFD_WP
                    and vm_flags & VM_UFFD_WP) or ctx.wp_async:
                return None
            reason = VM_UFFD_WP
        elif vma.vm_file is None:  # do_anonymous_page
            if not vm_flags & VM_UFFD_MISSING:
                return None
            reason = VM_UFFD_MISSING
        else:  # do_fault on a page in the cache: MINOR (no fault-around under MINOR)
            inode = vma.vm_file
            pages = getattr(inode, "pages", None)
            if not vm_flags & VM_UFFD_MINOR or pages is None or pgoff >= inode.nr_pages_size:
                return None
            folio = pages.get(pgoff)  # find_folio, for a page that is not on swap
            if folio is None:
                return None
            reason = VM_UFFD_MINOR
        rt = self.phys.runtime
        if rt is not None:  # as _do_user_addr_fault
            rt.charge("fault")
            if rt.tracer.enabled:
                rt.tracer.emit("fault", addr=addr, write=write)
        self.stats_faults += 1  # as handle_mm_fault
        vmf = VmFaultInfo(vma, addr & _PAGE_MASK, addr, _FLAGS_WRITE if write else _FLAGS_READ,
                          pgoff, table, idx, pte, task)
        fault: VmFault = ctx.handle_userfault(vmf, reason)
        return fault

    def _do_user_addr_fault(self, addr: int, write: bool, task: Any) -> VmFault:
        """Find the VMA, check the access, handle the fault (``do_user_addr_fault``)."""
        vma = self.vmas.vma_lookup(addr)
        if vma is None:
            raise Sigsegv(SEGV_MAPERR, addr)
        if write:
            if not vma.vm_flags & VM_WRITE:
                raise Sigsegv(SEGV_ACCERR, addr)
        elif not vma.vm_flags & (VM_READ | VM_WRITE | VM_EXEC):
            raise Sigsegv(SEGV_ACCERR, addr)
        flags = FAULT_FLAG_USER | (FAULT_FLAG_WRITE if write else 0)
        rt = self.phys.runtime
        if rt is not None:  # page-fault entry/exit on the virtual clock, and a tracepoint
            rt.charge("fault")
            if rt.tracer.enabled:
                rt.tracer.emit("fault", addr=addr, write=write)
        return handle_mm_fault(self, vma, addr, flags, task)

    # -- introspection ---------------------------------------------------------

    def statistics(self) -> MmStats:
        """A frozen snapshot of this mm's counters."""
        t = self.tlb
        return MmStats(self.stats_faults, self.stats_cow, self.stats_wp_reuse,
                       self.stats_zero_maps, self.count_anon_pages(),
                       self.pgtables.nr_tables, len(self.vmas), t.fills,
                       t.n_flush_all + t.n_flush_range + t.n_flush_page)

    def count_anon_pages(self) -> int:
        """Present PTEs mapping anonymous folios (RssAnon in pages)."""
        n = 0
        mem_map = self.phys.mem_map
        for _addr, e, _lvl in self.pgtables.iter_present():
            if e & (_PAGE_PRESENT | _PAGE_PROTNONE) and not e & _PAGE_SPECIAL:
                obj = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
                if isinstance(obj, Folio) and obj.flags & PG.anon:
                    n += 1
        return n
