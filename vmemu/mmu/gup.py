"""Faulting pages in on the kernel's behalf: MAP_POPULATE and MADV_POPULATE_*.

Mirrors ``populate_vma_page_range`` / ``faultin_page_range`` in
``mm/gup.c``: each page is faulted exactly as a user access would be, but
the access check returns an errno instead of a signal, and the fault is a
kernel fault (no ``FAULT_FLAG_USER``), which matters to userfaultfd's
``UFFD_USER_MODE_ONLY``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import attrs

from vmemu.constants import PAGE_SHIFT, PAGE_SIZE
from vmemu.errors import VmFault, raise_errno
from vmemu.mmu.folio import PG, Folio
from vmemu.mmu.memory import FAULT_FLAG_WRITE, handle_mm_fault, vm_get_page_prot
from vmemu.mmu.pgtable import (
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
)
from vmemu.mmu.vma import (
    VM_ACCESS_FLAGS,
    VM_HUGETLB,
    VM_MAYREAD,
    VM_MAYWRITE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    Vma,
)

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

# Linux's errno for a poisoned page (include/uapi/asm-generic/errno.h); Python's errno lacks it.
EHWPOISON = 133

MAX_RETRIES = 64


def _page_ready(mm: MmStruct, addr: int, write: bool) -> bool:
    table = mm.pgtables.pte_table(addr, False)
    if table is None:
        pmd = mm.pgtables.pmd_table(addr, False)  # a huge PMD leaf (THP, hugetlb)?
        e = pmd[(addr >> 21) & 511] if pmd is not None else 0
        return bool(e & _PAGE_PSE and e & _PAGE_PRESENT) and (not write or bool(e & _PAGE_RW))
    pte = table[(addr >> PAGE_SHIFT) & 511]
    return bool(pte & _PAGE_PRESENT) and (not write or bool(pte & _PAGE_RW))


def _touch_write(mm: MmStruct, addr: int) -> None:
    """FOLL_TOUCH|FOLL_WRITE on a present page: mark its folio dirty (``follow_page_pte``).

    A lazily freed (MADV_FREE) page becomes dirty, so reclaim keeps it.
    """
    pmd = mm.pgtables.pmd_table(addr, False)
    me = pmd[(addr >> 21) & 511] if pmd is not None else 0
    entry = me if me & _PAGE_PSE else mm.pgtables.get_pte(addr)
    if entry & _PAGE_DIRTY or entry & _PAGE_SPECIAL:
        return
    folio = mm.phys.mem_map[(entry & PTE_PFN_MASK) >> PAGE_SHIFT]
    if isinstance(folio, Folio):
        folio.flags |= PG.dirty


def faultin_page(mm: MmStruct, addr: int, write: bool, task: Any = None,
                 force: bool = False, hwpoison: bool = True, touch: bool = True) -> None:
    """Make one page present (and writable) or raise the errno GUP reports.

    ``force`` is FOLL_FORCE: a read may then fault in a page of a VMA
    without VM_READ (PROT_WRITE or PROT_EXEC alone) as long as it has
    VM_MAYREAD (``check_vma_flags``). ``hwpoison`` is FOLL_HWPOISON: a
    poisoned page is EHWPOISON with it, EFAULT without
    (``vm_fault_to_errno``). ``touch`` is FOLL_TOUCH (populate,
    get_user_pages; not pin_user_pages): a write that finds the page
    present marks its folio dirty.
    """
    for _ in range(MAX_RETRIES):
        if _page_ready(mm, addr, write):
            if write and touch:
                _touch_write(mm, addr)
            return
        vma = mm.vmas.vma_lookup(addr)
        if vma is None:
            raise_errno(errno.ENOMEM)
        if write and not vma.vm_flags & VM_WRITE or not write and not vma.vm_flags & VM_READ \
                and not (force and vma.vm_flags & VM_MAYREAD):
            raise_errno(errno.EFAULT)  # check_vma_flags
        fault = handle_mm_fault(mm, vma, addr, FAULT_FLAG_WRITE if write else 0, task)
        if fault & VmFault.OOM:
            raise_errno(errno.ENOMEM)
        if fault & VmFault.HWPOISON:
            raise_errno(EHWPOISON if hwpoison else errno.EFAULT)
        if fault & (VmFault.SIGBUS | VmFault.SIGSEGV):
            raise_errno(errno.EFAULT)
    raise AssertionError(f"populate of {addr:#x} did not converge")


def populate(mm: MmStruct, start: int, end: int, write: bool | None = None,
             ignore_errors: bool = False, task: Any = None) -> None:
    """Fault in ``[start, end)``; ``write=None`` picks per VMA as ``mm_populate`` does."""
    with mm.lock:
        addr = start
        while addr < end:
            vma = mm.vmas.vma_lookup(addr)
            if vma is None:
                if ignore_errors:
                    nxt = mm.vmas.find_vma(addr)
                    if nxt is None:
                        return
                    addr = nxt.vm_start
                    continue
                raise_errno(errno.ENOMEM)
            stop = min(end, vma.vm_end)
            if ignore_errors and not vma.vm_flags & VM_ACCESS_FLAGS:
                addr = stop
                continue
            w = write
            force = False
            if w is None:  # mm_populate: populate_vma_page_range's gup flags
                w = (vma.vm_flags & (VM_WRITE | VM_SHARED)) == VM_WRITE
                # "we want mlock to succeed for regions that have any permissions
                # other than PROT_NONE": FOLL_FORCE for an accessible VMA
                force = bool(vma.vm_flags & VM_ACCESS_FLAGS)
            try:
                while addr < stop:
                    # only MADV_POPULATE_* (an explicit ``write``) asks for FOLL_HWPOISON
                    faultin_page(mm, addr, w, task, force, hwpoison=write is not None)
                    addr += PAGE_SIZE
            except OSError:
                if not ignore_errors:
                    raise
                addr = stop  # __mm_populate goes on at the next VMA


def follow_page(mm: MmStruct, addr: int) -> Any:
    """The data buffer of the page mapped at ``addr``, or None (``follow_page``)."""
    pmd = mm.pgtables.pmd_table(addr, False)
    if pmd is None:
        return None
    me = pmd[(addr >> 21) & 511]
    if me & _PAGE_PSE and me & _PAGE_PRESENT:
        pfn = ((me & PTE_PFN_MASK) >> PAGE_SHIFT) + ((addr >> PAGE_SHIFT) & 511)
    else:
        pte = mm.pgtables.get_pte(addr)
        if not pte & _PAGE_PRESENT:
            return None
        pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
    return mm.phys.mem_map[pfn].page_buffer(pfn)


def access_user(mm: MmStruct, addr: int, n: int, write: bool, data: bytes = b"",
                task: Any = None) -> bytes:
    """Kernel-mode access to user memory: ``copy_from_user`` / ``copy_to_user``.

    Faults are taken as kernel faults (no FAULT_FLAG_USER); anything that
    would be a signal for a user access is EFAULT here, as a syscall that
    touches a bad buffer reports. Writes ``data`` when ``write``; returns the
    bytes read otherwise.
    """
    out = bytearray()
    done = 0
    with mm.lock:
        while done < n:
            a = addr + done
            off = a & (PAGE_SIZE - 1)
            chunk = min(n - done, PAGE_SIZE - off)
            try:
                faultin_page(mm, a, write, task)
            except OSError as e:
                raise_errno(errno.EFAULT if e.errno != errno.ENOMEM or
                            mm.vmas.vma_lookup(a) is None else errno.ENOMEM)
            buf = follow_page(mm, a)
            if buf is None:  # raced with an unmap while a userfault slept
                continue
            if write:
                buf[off:off + chunk] = data[done:done + chunk]
            else:
                out += buf[off:off + chunk]
            done += chunk
    return bytes(out)


# -- long-term pins: pin_user_pages(FOLL_PIN | FOLL_LONGTERM) ------------------------------


@attrs.define(eq=False)
class PinnedPages:
    """Folios held by ``pin_user_pages``; :meth:`unpin` lets them go (``unpin_user_pages``).

    A pin is one reference and one ``pincount`` per pinned page, so the
    folio outlives an munmap or an exit until it is unpinned, and
    ``folio_maybe_dma_pinned`` sees it: fork copies a pinned exclusive
    anonymous page for the child at once (``copy_present_page``) instead of
    sharing it.
    """

    phys: Any
    folios: list[Folio]

    def unpin(self) -> None:
        """Drop every pin (``unpin_user_pages``); a second call does nothing."""
        folios, self.folios = self.folios, []
        for folio in folios:
            folio.pincount -= 1
            self.phys.folio_put(folio)


def _entry_of(mm: MmStruct, addr: int) -> tuple[list[int], int, int, bool]:
    """``(table, index, entry, huge)`` of the present page at ``addr`` (after a fault-in)."""
    pmd = mm.pgtables.pmd_table(addr, False)
    assert pmd is not None
    me = pmd[(addr >> 21) & 511]
    if me & _PAGE_PSE:
        return pmd, (addr >> 21) & 511, me, True
    table = mm.pgtables.pte_table(addr, False)
    assert table is not None
    idx = (addr >> PAGE_SHIFT) & 511
    return table, idx, table[idx], False


def gup_must_unshare(mm: MmStruct, vma: Vma, addr: int) -> bool:
    """A read-only long-term pin must not pin a page COW could replace (``gup_must_unshare``).

    True for an anonymous page that is not exclusive to this mapping, and
    for any other page (page cache, the zero page) of a private writable
    (COW) mapping: pinning it would let the process and the pin see
    different pages after the next write.
    """
    _t, _i, e, huge = _entry_of(mm, addr)
    if e & _PAGE_SPECIAL:
        return is_cow_mapping(vma.vm_flags)
    pfn = (e & PTE_PFN_MASK) >> PAGE_SHIFT
    folio = mm.phys.mem_map[pfn]
    if not folio.flags & PG.anon:
        return is_cow_mapping(vma.vm_flags)
    return not folio.flags & PG.anon_exclusive


def is_cow_mapping(vm_flags: int) -> bool:
    """Private and possibly writable: writes copy (``is_cow_mapping``)."""
    return (vm_flags & (VM_SHARED | VM_MAYWRITE)) == VM_MAYWRITE


def gup_unshare(mm: MmStruct, vma: Vma, addr: int) -> None:
    """Give this mapping its own exclusive copy, still read-only (``FAULT_FLAG_UNSHARE``).

    The write-fault path without the write: an anonymous page nobody else
    holds is just marked exclusive (``wp_can_reuse_anon_folio``), anything
    else is copied into a new anonymous page mapped read-only, keeping the
    uffd-wp and soft-dirty bits (``wp_page_copy`` with ``unshare``). No
    userfault: unsharing is not a write. A THP is split first; a hugetlb page
    is copied whole (``hugetlb_wp`` with ``unshare``).
    """
    if vma.vm_flags & VM_HUGETLB:
        from vmemu.mmu.hugetlb import hugetlb_unshare

        hugetlb_unshare(mm, vma, addr)
        return
    table, idx, e, huge = _entry_of(mm, addr)
    if huge:
        from vmemu.mmu.huge_memory import split_huge_pmd

        split_huge_pmd(mm, vma, addr)
        table, idx, e, huge = _entry_of(mm, addr)
    special = bool(e & _PAGE_SPECIAL)
    pfn = (e & PTE_PFN_MASK) >> PAGE_SHIFT
    old = None if special else mm.phys.mem_map[pfn]
    if old is not None and old.flags & PG.anon and old.order == 0 and \
            old.refcount == old.mapcount == 1 and not old.flags & PG.swapcache:
        old.flags |= PG.anon_exclusive
        return
    if old is not None:
        old.refcount += 1  # held across the allocation
    new = mm.alloc_anon_folio(vma, addr)
    if old is not None:
        old.refcount -= 1
    if new is None:
        raise_errno(errno.ENOMEM)
    if old is not None:
        new.data[:] = old.page_buffer(pfn)
    pte = (new.pfn << PAGE_SHIFT) | (vm_get_page_prot(vma.vm_flags) & ~_PAGE_RW) | \
        (e & (_PAGE_UFFD_WP | _PAGE_SOFT_DIRTY))
    table[idx] = pte
    if old is not None:
        old.mapcount -= 1
        mm.free_swap_cache(old)
        mm.phys.folio_put(old)
    mm.tlb.flush_page(addr & ~(PAGE_SIZE - 1))
    mm.stats_cow += 1


def pin_user_pages(mm: MmStruct, start: int, length: int, write: bool = False,
                   task: Any = None) -> PinnedPages:
    """Pin the pages of ``[start, start+length)`` long-term (``pin_user_pages(FOLL_LONGTERM)``).

    Each page is faulted in as GUP does (a write pin breaks COW like a write;
    a read-only pin unshares, see :func:`gup_must_unshare`) and then held.
    EFAULT for an unmapped page, a VMA without the access, or a fault that
    cannot complete; pages pinned before a failure are released again.
    """
    if start & (PAGE_SIZE - 1) or length <= 0:
        raise_errno(errno.EINVAL)
    pinned = PinnedPages(mm.phys, [])
    try:
        with mm.lock:
            for addr in range(start, start + length, PAGE_SIZE):
                vma = mm.vmas.vma_lookup(addr)
                if vma is None:
                    raise_errno(errno.EFAULT)
                for _ in range(MAX_RETRIES):
                    try:
                        faultin_page(mm, addr, write, task, touch=False)
                    except OSError as err:
                        raise_errno(errno.EFAULT if err.errno != errno.ENOMEM else errno.ENOMEM)
                    if write or not gup_must_unshare(mm, vma, addr):
                        break
                    gup_unshare(mm, vma, addr)
                _t, _i, entry, huge = _entry_of(mm, addr)
                pfn = (entry & PTE_PFN_MASK) >> PAGE_SHIFT
                if huge:
                    pfn += (addr >> PAGE_SHIFT) & 511
                folio = mm.phys.mem_map[pfn]
                folio.pincount += 1
                folio.refcount += 1
                pinned.folios.append(folio)
    except OSError:
        pinned.unpin()
        raise
    return pinned
