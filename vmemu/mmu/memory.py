"""The page-fault path, zapping and fork-time copying: ``mm/memory.c``.

``handle_mm_fault`` is entered after the access check has found a VMA that
allows the access. It walks (and allocates) the tables down to the PTE and
dispatches on what it finds, as ``handle_pte_fault`` does:

* none PTE, anonymous VMA -> ``do_anonymous_page`` (zero page on read,
  a fresh zeroed exclusive folio on write);
* none PTE, shmem VMA -> ``do_fault`` (find or allocate the page-cache
  folio; a write to a private mapping copies it);
* present PTE, write, not writable -> ``do_wp_page`` (reuse an exclusive
  anonymous folio, otherwise copy: copy-on-write);
* pte marker -> poison gives SIGBUS, a uffd-wp marker is an empty PTE that
  remembers write protection.

A VMA registered with userfaultfd diverts the missing / write-protect
paths into ``handle_userfault`` (``vma.vm_userfaultfd_ctx``) which either
resolves, blocks and returns ``VM_FAULT_RETRY``, or fails with SIGBUS.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import attrs

from vmemu.constants import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from vmemu.errors import POISON_MARKER_FAULT, VmFault, raise_errno
from vmemu.mmu.folio import PG, Folio
from vmemu.mmu.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_UFFD_WP,
    _PAGE_USER,
    PTE_MARKER_UFFD_WP,
    PTE_PFN_MASK,
    SWP_HWPOISON,
    is_poisoned_marker,
    is_pte_marker,
    is_uffd_wp_marker,
    pte_marker_get,
    swp_type,
)
from vmemu.mmu.vma import (
    VM_EXEC,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_MAYWRITE,
    VM_READ,
    VM_SHARED,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    AnonVma,
    Vma,
    anon_vma_link,
)

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

# fault flags (enum fault_flag in include/linux/mm_types.h)
FAULT_FLAG_WRITE = 1 << 0
FAULT_FLAG_MKWRITE = 1 << 1
FAULT_FLAG_ALLOW_RETRY = 1 << 2
FAULT_FLAG_RETRY_NOWAIT = 1 << 3
FAULT_FLAG_KILLABLE = 1 << 4
FAULT_FLAG_TRIED = 1 << 5
FAULT_FLAG_USER = 1 << 6
FAULT_FLAG_REMOTE = 1 << 7
FAULT_FLAG_INSTRUCTION = 1 << 8
FAULT_FLAG_INTERRUPTIBLE = 1 << 9

# VMAs whose faults may take the huge path (besides every private anon VMA under "always")
_VM_HUGE_CANDIDATE = VM_HUGETLB | VM_HUGEPAGE

_KEEP_ON_REPROTECT = _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_SPECIAL | _PAGE_UFFD_WP


def vm_get_page_prot(vm_flags: int) -> int:
    """The PTE protection bits for a VMA's flags (x86 ``protection_map``).

    Private writable mappings get no RW bit: the first write takes a
    write-protect fault that breaks COW or reuses the page. PROT_NONE is
    ``_PAGE_PROTNONE``: not present to the hardware, present to the kernel.
    """
    if not vm_flags & (VM_READ | VM_WRITE | VM_EXEC):
        return _PAGE_PROTNONE | _PAGE_ACCESSED
    prot = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
    if not vm_flags & VM_EXEC:
        prot |= _PAGE_NX
    if vm_flags & VM_WRITE and vm_flags & VM_SHARED:
        prot |= _PAGE_RW
    return prot


@attrs.define(slots=True, eq=False)
class VmFaultInfo:
    """Everything the fault path knows about one fault (``struct vm_fault``)."""

    vma: Vma
    address: int  # page-aligned
    real_address: int
    flags: int
    pgoff: int
    table: list[int]
    idx: int
    orig_pte: int
    task: Any = None

    @property
    def is_write(self) -> bool:
        """True for a write fault (``FAULT_FLAG_WRITE``)."""
        return bool(self.flags & FAULT_FLAG_WRITE)


def anon_vma_prepare(vma: Vma) -> AnonVma:
    """Give ``vma`` an anon_vma before its first anonymous page (``anon_vma_prepare``)."""
    av = vma.anon_vma
    if av is None:
        av = AnonVma()
        vma.anon_vma = av
        anon_vma_link(vma, av)
    return av


def maybe_mkwrite(pte: int, vma: Vma) -> int:
    """Set RW when the VMA allows writing (``maybe_mkwrite``)."""
    if vma.vm_flags & VM_WRITE:
        return pte | _PAGE_RW
    return pte


def handle_mm_fault(mm: MmStruct, vma: Vma, address: int, flags: int, task: Any = None) -> VmFault:
    """Resolve a fault at ``address`` in ``vma`` (``handle_mm_fault`` -> ``handle_pte_fault``)."""
    mm.stats_faults += 1
    if vma.vm_flags & _VM_HUGE_CANDIDATE or mm.phys.thp_enabled == "always":
        # hugetlb, or an empty PMD that may take a THP (__handle_mm_fault -> create_huge_pmd)
        fault = mm.create_huge_pmd(vma, address, flags, task)
        if fault is not VmFault.FALLBACK:
            return fault
    table = mm.pgtables.pte_table(address, True)
    if table is None:
        return mm.huge_fault(vma, address, flags, task)
    idx = (address >> PAGE_SHIFT) & 511
    pte = table[idx]
    pgoff = vma.vm_pgoff + ((address - vma.vm_start) >> PAGE_SHIFT)  # linear_page_index
    vmf = VmFaultInfo(vma, address & PAGE_MASK, address, flags, pgoff, table, idx, pte, task)
    if pte == 0:
        if vma.vm_file is None:
            return do_anonymous_page(mm, vmf)
        return do_fault(mm, vmf)
    if not pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
        if is_pte_marker(pte):
            return handle_pte_marker(mm, vmf)
        if swp_type(pte) == SWP_HWPOISON:
            return VmFault.HWPOISON
        return mm.do_swap_page(vmf)
    if flags & FAULT_FLAG_WRITE:
        if not pte & _PAGE_RW:
            return do_wp_page(mm, vmf)
        table[idx] = pte | _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY
    else:
        table[idx] = pte | _PAGE_ACCESSED
    return VmFault.NONE


def handle_pte_marker(mm: MmStruct, vmf: VmFaultInfo) -> VmFault:
    """A fault on a pte marker (``handle_pte_marker``).

    A UFFDIO_POISON marker gives SIGBUS (BUS_ADRERR on 6.18, as observed)
    and EHWPOISON to MADV_POPULATE_* (``POISON_MARKER_FAULT``).
    A uffd-wp marker is an empty PTE that remembers write protection: the
    fault proceeds as for a none PTE and the page it installs keeps the
    uffd-wp bit (``pte_marker_handle_uffd_wp``); a marker left behind after
    unregister is dropped and the fault retried.
    """
    pte = vmf.orig_pte
    if is_poisoned_marker(pte):
        return POISON_MARKER_FAULT  # SIGBUS to the user, EHWPOISON to GUP
    if is_uffd_wp_marker(pte):
        vma = vmf.vma
        if not vma.vm_flags & VM_UFFD_WP:
            vmf.table[vmf.idx] = 0
            return VmFault.NONE
        if vma.vm_file is None:
            return do_anonymous_page(mm, vmf, wp_marker=True)
        return do_fault(mm, vmf, wp_marker=True)
    raise AssertionError(f"unknown pte marker {pte_marker_get(pte):#x}")


def handle_userfault(vmf: VmFaultInfo, reason: int) -> VmFault:
    """Hand a fault to the VMA's userfaultfd context (``handle_userfault``).

    With no context attached (the uffd was released mid-fault), the fault
    fails with SIGBUS as in the kernel.
    """
    ctx = vmf.vma.vm_userfaultfd_ctx
    if ctx is None:
        return VmFault.SIGBUS
    result: VmFault = ctx.handle_userfault(vmf, reason)
    return result


def do_anonymous_page(mm: MmStruct, vmf: VmFaultInfo, wp_marker: bool = False) -> VmFault:
    """Fill an empty PTE of private anonymous memory (``do_anonymous_page``).

    A read maps the shared zero page (no allocation); a write allocates a
    zeroed folio that belongs to this VMA alone (anon-exclusive). A VMA
    registered for MISSING faults hands both to userfaultfd instead. Over a
    uffd-wp marker the new PTE keeps the uffd-wp bit, so a write then takes
    a write-protect fault on retry.
    """
    vma = vmf.vma
    if vma.vm_flags & VM_UFFD_MISSING:  # handle_userfault(vmf, VM_UFFD_MISSING), inlined
        ctx = vma.vm_userfaultfd_ctx
        return VmFault.SIGBUS if ctx is None else ctx.handle_userfault(vmf, VM_UFFD_MISSING)
    prot = vm_get_page_prot(vma.vm_flags)
    if not vmf.flags & FAULT_FLAG_WRITE:
        pte = (mm.phys.zero_pfn << PAGE_SHIFT) | prot | _PAGE_SPECIAL
        if wp_marker:
            pte |= _PAGE_UFFD_WP
        vmf.table[vmf.idx] = pte
        mm.stats_zero_maps += 1
        return VmFault.NONE
    folio = mm.alloc_anon_folio(vma, vmf.address)
    if folio is None:
        return VmFault.OOM
    pte = maybe_mkwrite((folio.pfn << PAGE_SHIFT) | prot | _PAGE_DIRTY | _PAGE_SOFT_DIRTY, vma)
    if wp_marker:
        pte = (pte | _PAGE_UFFD_WP) & ~_PAGE_RW
    vmf.table[vmf.idx] = pte
    return VmFault.NONE


def do_fault(mm: MmStruct, vmf: VmFaultInfo, wp_marker: bool = False) -> VmFault:
    """Fault in a page of a file (shmem) mapping (``do_fault``).

    Dispatches like the kernel to ``do_read_fault`` (map the cached page),
    ``do_cow_fault`` (write to a private mapping: copy it into a new
    anonymous folio) or ``do_shared_fault`` (map the cached page writable).
    A page missing from the cache is a MISSING userfault, a cached page with
    no PTE a MINOR one, when the VMA is registered for them (``shmem_fault``).
    """
    vma = vmf.vma
    inode = vma.vm_file
    index = vmf.pgoff
    if not vmf.flags & FAULT_FLAG_WRITE:  # do_read_fault
        from vmemu.mmu.filemap import do_fault_around, should_fault_around

        if should_fault_around(vma):
            do_fault_around(mm, vmf, vm_get_page_prot(vma.vm_flags))
            if vmf.table[vmf.idx]:
                return VmFault.NONE
    if index >= inode.nr_pages_size:
        return VmFault.SIGBUS
    folio = inode.find_folio(index)
    if folio is None:
        if vma.vm_flags & VM_UFFD_MISSING:
            return handle_userfault(vmf, VM_UFFD_MISSING)
        folio = inode.get_folio(index)
        if folio is None:
            return VmFault.OOM
    elif vma.vm_flags & VM_UFFD_MINOR:  # handle_userfault(vmf, VM_UFFD_MINOR), inlined
        ctx = vma.vm_userfaultfd_ctx
        return VmFault.SIGBUS if ctx is None else ctx.handle_userfault(vmf, VM_UFFD_MINOR)
    if folio.test(PG.hwpoison):
        return VmFault.HWPOISON
    prot = vm_get_page_prot(vma.vm_flags)
    wp = _PAGE_UFFD_WP if wp_marker else 0
    write = vmf.flags & FAULT_FLAG_WRITE
    if write and not vma.vm_flags & VM_SHARED:
        folio.refcount += 1  # held across the allocation, whose reclaim must not take it
        new = mm.alloc_anon_folio(vma, vmf.address)
        folio.refcount -= 1
        if new is None:
            return VmFault.OOM
        new.data[:] = folio.data
        pte = maybe_mkwrite((new.pfn << PAGE_SHIFT) | prot | _PAGE_DIRTY | _PAGE_SOFT_DIRTY, vma)
        if wp:
            pte = (pte | wp) & ~_PAGE_RW
        vmf.table[vmf.idx] = pte
        mm.stats_cow += 1
        return VmFault.NONE
    folio.refcount += 1
    folio.mapcount += 1
    pte = (folio.pfn << PAGE_SHIFT) | prot
    if write:
        pte |= _PAGE_DIRTY | _PAGE_SOFT_DIRTY
        folio.set(PG.dirty)
    if wp:
        pte = (pte | wp) & ~_PAGE_RW
    vmf.table[vmf.idx] = pte
    return VmFault.NONE


def do_wp_page(mm: MmStruct, vmf: VmFaultInfo) -> VmFault:
    """A write to a present, read-only PTE (``do_wp_page``).

    uffd-wp protected -> userfault, or with UFFD_FEATURE_WP_ASYNC the bit is
    silently dropped and the write proceeds; shared mapping -> make writable
    (``wp_page_shared``); exclusive anonymous folio -> reuse in place
    (``wp_page_reuse``); anything else -> copy (``wp_page_copy``).
    """
    vma = vmf.vma
    pte = vmf.orig_pte
    if pte & _PAGE_UFFD_WP and vma.vm_flags & VM_UFFD_WP:  # userfaultfd_pte_wp
        ctx = vma.vm_userfaultfd_ctx
        if not (ctx is not None and ctx.wp_async):
            if ctx is None:  # handle_userfault(vmf, VM_UFFD_WP), inlined
                return VmFault.SIGBUS
            return ctx.handle_userfault(vmf, VM_UFFD_WP)
        pte &= ~_PAGE_UFFD_WP  # WP_ASYNC resolves the fault by dropping the bit
        vmf.table[vmf.idx] = pte
        vmf.orig_pte = pte
    # A stale bit (the VMA lost VM_UFFD_WP by a re-register) stays: reuse keeps the PTE's
    # bits, so a later COW write-protect (fork) makes it a uffd-wp fault again.
    if not vma.vm_flags & VM_WRITE:
        return VmFault.SIGSEGV
    pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
    if vma.vm_flags & VM_SHARED and not pte & _PAGE_SPECIAL:
        folio = mm.phys.mem_map[pfn]
        folio.set(PG.dirty)
        vmf.table[vmf.idx] = pte | _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY
        mm.tlb.flush_page(vmf.address)
        return VmFault.NONE
    if not pte & _PAGE_SPECIAL:
        folio = mm.phys.mem_map[pfn]
        if folio.flags & PG.anon and (folio.flags & PG.anon_exclusive or _can_reuse(folio)):
            folio.flags |= PG.anon_exclusive
            vmf.table[vmf.idx] = pte | _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY
            mm.tlb.flush_page(vmf.address)
            mm.stats_wp_reuse += 1
            return VmFault.NONE
    return wp_page_copy(mm, vmf, pfn)


def _can_reuse(folio: Folio) -> bool:
    """True when nobody else holds the anon folio (``wp_can_reuse_anon_folio``)."""
    return folio.refcount == 1 and folio.mapcount == 1 and not folio.flags & PG.swapcache


def wp_page_copy(mm: MmStruct, vmf: VmFaultInfo, old_pfn: int) -> VmFault:
    """Break COW: copy the page into a new exclusive folio (``wp_page_copy``)."""
    vma = vmf.vma
    old_pte = vmf.orig_pte
    held = None if old_pte & _PAGE_SPECIAL else mm.phys.mem_map[old_pfn]
    if held is not None:
        held.refcount += 1  # get_page: reclaim in the allocation must not take the old page
    new = mm.alloc_anon_folio(vma, vmf.address)
    if held is not None:
        held.refcount -= 1
    if new is None:
        return VmFault.OOM
    if old_pte & _PAGE_SPECIAL:
        pass  # zero page: the new folio is already zeroed
    else:
        old = mm.phys.mem_map[old_pfn]
        new.data[:] = old.page_buffer(old_pfn)
    prot = vm_get_page_prot(vma.vm_flags)
    pte = (new.pfn << PAGE_SHIFT) | prot | _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    vmf.table[vmf.idx] = maybe_mkwrite(pte, vma)
    if not old_pte & _PAGE_SPECIAL:
        old = mm.phys.mem_map[old_pfn]
        old.mapcount -= 1
        mm.free_swap_cache(old)
        mm.phys.folio_put(old)
    mm.tlb.flush_page(vmf.address)
    mm.stats_cow += 1
    return VmFault.NONE


def zap_pte(mm: MmStruct, vma: Vma, table: list[int], idx: int, keep_wp_marker: bool,
            drop_markers: bool = True) -> None:
    """Clear one PTE and drop what it held (the body of ``zap_pte_range``).

    ``keep_wp_marker``: a uffd-wp page leaves a marker (``zap_install_uffd_wp_if_needed``).
    ``drop_markers=False`` (MADV_DONTNEED of a file VMA: no ZAP_FLAG_DROP_MARKER) keeps an
    existing uffd-wp marker whatever the VMA's registration (``zap_nonpresent_ptes``).
    """
    pte = table[idx]
    if pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
        wp = pte & _PAGE_UFFD_WP
        if not pte & _PAGE_SPECIAL:
            pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
            folio = mm.phys.mem_map[pfn]
            if pte & _PAGE_DIRTY:
                folio.flags |= PG.dirty
            folio.mapcount -= 1
            mm.free_swap_cache(folio)
            mm.phys.folio_put(folio)
        table[idx] = mm.uffd_wp_marker_value if (wp and keep_wp_marker) else 0
        return
    if is_pte_marker(pte):
        keep = (keep_wp_marker or not drop_markers) and pte_marker_get(pte) & PTE_MARKER_UFFD_WP
        table[idx] = mm.uffd_wp_marker_value if keep else 0
        return
    mm.free_swap_pte(pte)
    table[idx] = 0


def zap_page_range(mm: MmStruct, vma: Vma, start: int, end: int, keep_wp_marker: bool,
                   drop_markers: bool = True) -> None:
    """Unmap every page of ``[start, end)`` in ``vma`` (``zap_page_range_single``).

    ``keep_wp_marker`` mirrors ``zap_install_uffd_wp_if_needed``: file-backed
    zaps of a uffd-wp VMA leave a marker so the protection survives.
    """
    mm.split_huge_range(vma, start, end)
    mm.zap_huge_pmds(vma, start, end, keep_wp_marker)
    for _addr, table, lo, hi in mm.pgtables.iter_pte_tables(start, end):
        for idx in range(lo, hi):
            if table[idx]:
                zap_pte(mm, vma, table, idx, keep_wp_marker, drop_markers)
    mm.tlb.flush_range(start, end)


def copy_pte_range(mm: MmStruct, child: MmStruct, src_vma: Vma, dst_vma: Vma,
                   keep_uffd_wp: bool) -> None:
    """Copy the PTEs of a VMA into the child at fork (``copy_pte_range``).

    Anonymous folios become shared between parent and child: both PTEs are
    write-protected, the folio loses anon-exclusive, and its counts go up,
    so the first write on either side breaks COW. Swap entries gain a
    swap count.
    """
    cow = (src_vma.vm_flags & (VM_SHARED | VM_MAYWRITE)) == VM_MAYWRITE  # is_cow_mapping
    mem_map = mm.phys.mem_map
    start, end = src_vma.vm_start, src_vma.vm_end
    mm.copy_huge_pmds(child, src_vma, dst_vma, keep_uffd_wp)  # copy_huge_pmd / hugetlb
    for addr, table, lo, hi in mm.pgtables.iter_pte_tables(start, end):
        dst = None
        for idx in range(lo, hi):
            pte = table[idx]
            if not pte:
                continue
            if dst is None:
                dst = child.pgtables.pte_table(addr, True)
                assert dst is not None
            if pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
                if not pte & _PAGE_SPECIAL:
                    folio = mem_map[(pte & PTE_PFN_MASK) >> PAGE_SHIFT]
                    if folio.pincount and folio.flags & PG.anon_exclusive:
                        at = (addr & ~((1 << 21) - 1)) | (idx << PAGE_SHIFT)
                        dst[idx] = copy_present_page(mm, child, dst_vma, at, pte, keep_uffd_wp)
                        continue
                    folio.flags &= ~PG.anon_exclusive
                    folio.mapcount += 1
                    folio.refcount += 1
                if cow and pte & _PAGE_RW:
                    pte &= ~_PAGE_RW
                    table[idx] = pte
                child_pte = pte & ~_PAGE_ACCESSED
                if src_vma.vm_flags & VM_SHARED:
                    child_pte &= ~_PAGE_DIRTY
                if not keep_uffd_wp:
                    child_pte &= ~_PAGE_UFFD_WP
                dst[idx] = child_pte
            elif is_pte_marker(pte):
                if keep_uffd_wp or not is_uffd_wp_marker(pte):
                    dst[idx] = pte
            else:
                dst[idx] = mm.dup_swap_pte(pte, keep_uffd_wp)
                table[idx] = mm.dup_swap_pte_parent(pte)


def copy_present_page(mm: MmStruct, child: MmStruct, dst_vma: Vma, addr: int, pte: int,
                      keep_uffd_wp: bool) -> int:
    """Fork of a pinned, exclusive anonymous page: the child gets a copy (``copy_present_page``).

    Sharing it would let a later COW in the parent move the parent away from
    the page a pin (DMA) still writes to, so the copy is made now; the parent
    keeps its page and PTE unchanged. The child's PTE is writable unless the
    uffd-wp bit survives the fork (UFFD_FEATURE_EVENT_FORK). Returns it.
    """
    pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
    new = child.alloc_anon_folio(dst_vma, addr)
    if new is None:
        raise_errno(errno.ENOMEM)
    new.data[:] = mm.phys.mem_map[pfn].page_buffer(pfn)
    child_pte = maybe_mkwrite((new.pfn << PAGE_SHIFT) | vm_get_page_prot(dst_vma.vm_flags) |
                              _PAGE_DIRTY | _PAGE_SOFT_DIRTY, dst_vma)
    if keep_uffd_wp and pte & _PAGE_UFFD_WP:
        child_pte = (child_pte | _PAGE_UFFD_WP) & ~_PAGE_RW
    return child_pte


def page_buffer_at(mm: MmStruct, pte: int) -> Any:
    """The 4 KiB data a present PTE maps (zero page included)."""
    pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
    obj = mm.phys.mem_map[pfn]
    return obj.page_buffer(pfn)


PAGE_BYTES = PAGE_SIZE
