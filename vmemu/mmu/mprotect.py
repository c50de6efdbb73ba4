"""mprotect: changing the permissions of a range (``mm/mprotect.c``).

Like the kernel, mprotect works VMA by VMA: if it meets a hole after
changing some VMAs, it stops with ENOMEM and keeps the changes already made
(the kernel's partial-progress behaviour). Present PTEs are rewritten with
the new protection bits keeping their frame, accessed/dirty, soft-dirty
and uffd-wp bits; the TLB is flushed for the range.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vmemu.constants import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.errors import raise_errno
from vmemu.mmu.folio import PG
from vmemu.mmu.memory import vm_get_page_prot
from vmemu.mmu.mmap import calc_vm_prot_bits, page_align
from vmemu.mmu.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
)
from vmemu.mmu.vma import (
    VM_ACCESS_FLAGS,
    VM_ACCOUNT,
    VM_GROWSDOWN,
    VM_HUGETLB,
    VM_NORESERVE,
    VM_SHARED,
    VM_WRITE,
    Vma,
)
from vmemu.mmu.vmaops import vma_modify

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

PROT_SEM = 0x8
_ULONG_MASK = (1 << 64) - 1
_KEEP = PTE_PFN_MASK | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_SPECIAL | _PAGE_UFFD_WP


def change_protection(mm: MmStruct, vma: Vma, start: int, end: int) -> None:
    """Rewrite present PTEs of ``[start, end)`` for ``vma``'s new flags (``change_pte_range``).

    A private writable VMA may map an anon-exclusive page writable at once
    (``can_change_pte_writable``); everything else waits for a write fault.
    """
    from vmemu.mmu.huge_memory import change_huge_pmds

    change_huge_pmds(mm, vma, start, end)  # change_huge_pmd / hugetlb_change_protection
    prot = vm_get_page_prot(vma.vm_flags)
    try_writable = vma.vm_flags & VM_WRITE and not vma.vm_flags & VM_SHARED
    mem_map = mm.phys.mem_map
    for _addr, table, lo, hi in mm.pgtables.iter_pte_tables(start, end):
        for idx in range(lo, hi):
            pte = table[idx]
            if not pte & (_PAGE_PRESENT | _PAGE_PROTNONE):
                continue
            new = (pte & _KEEP) | prot
            if try_writable and not new & (_PAGE_SPECIAL | _PAGE_UFFD_WP | _PAGE_RW):
                folio = mem_map[(pte & PTE_PFN_MASK) >> PAGE_SHIFT]
                if folio.flags & PG.anon_exclusive:
                    new |= _PAGE_RW
            if new & _PAGE_UFFD_WP:
                new &= ~_PAGE_RW
            table[idx] = new
    mm.tlb.flush_range(start, end)


def mprotect_fixup(mm: MmStruct, vma: Vma, start: int, end: int, newflags: int) -> Vma:
    """Give ``[start, end)`` of ``vma`` the flags ``newflags`` (``mprotect_fixup``)."""
    oldflags = vma.vm_flags
    if newflags == oldflags:
        return vma
    if newflags & VM_WRITE and not oldflags & (VM_ACCOUNT | VM_WRITE | VM_HUGETLB | VM_SHARED
                                                | VM_NORESERVE):
        newflags |= VM_ACCOUNT
    elif not newflags & VM_WRITE and oldflags & VM_ACCOUNT and vma.vm_file is None \
            and vma.anon_vma is None:
        newflags &= ~VM_ACCOUNT  # nothing was ever written: unaccount it
    if newflags == oldflags:
        return vma

    def change(v: Vma) -> None:
        v.vm_flags = newflags

    vma = vma_modify(mm, vma, start, end, change)
    change_protection(mm, vma, max(start, vma.vm_start), min(end, vma.vm_end))
    return vma


def do_mprotect(mm: MmStruct, start: int, length: int, prot: int) -> None:
    """The mprotect(2) syscall (``do_mprotect_pkey``)."""
    grows = prot & (PROT_GROWSDOWN | PROT_GROWSUP)
    prot &= ~grows
    if grows == PROT_GROWSDOWN | PROT_GROWSUP:
        raise_errno(errno.EINVAL)
    start &= _ULONG_MASK  # start and len are unsigned long in the syscall
    length &= _ULONG_MASK
    if start & (PAGE_SIZE - 1):
        raise_errno(errno.EINVAL)
    if not length:
        return
    length = page_align(length) & _ULONG_MASK
    end = (start + length) & _ULONG_MASK
    if end <= start:
        raise_errno(errno.ENOMEM)
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM):
        raise_errno(errno.EINVAL)
    with mm.lock:
        vma = mm.vmas.find_vma(start)
        if grows & PROT_GROWSDOWN:
            if vma is None or vma.vm_start >= end:
                raise_errno(errno.ENOMEM)
            if not vma.vm_flags & VM_GROWSDOWN:
                raise_errno(errno.EINVAL)
            start = vma.vm_start
        elif vma is None or vma.vm_start > start:
            raise_errno(errno.ENOMEM)
        elif grows & PROT_GROWSUP:
            raise_errno(errno.EINVAL)  # x86-64 has no VM_GROWSUP
        nstart = start
        want = calc_vm_prot_bits(prot)
        while True:
            newflags = want | (vma.vm_flags & ~VM_ACCESS_FLAGS)
            if (newflags & ~(newflags >> 4)) & VM_ACCESS_FLAGS:
                raise_errno(errno.EACCES)
            tmp = min(vma.vm_end, end)
            vma = mprotect_fixup(mm, vma, nstart, tmp, newflags)
            # continue after the VMA as it is now: it may have merged with the next
            # one (tmp = vma_iter_end(&vmi) in do_mprotect_pkey)
            nstart = max(tmp, vma.vm_end)
            if nstart >= end:
                return
            nxt = mm.vmas.find_vma(nstart)
            if nxt is None or nxt.vm_start != nstart:
                raise_errno(errno.ENOMEM)
            vma = nxt
