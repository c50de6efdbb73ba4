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

from vmemu.constants import PAGE_SHIFT, PAGE_SIZE
from vmemu.errors import VmFault, raise_errno
from vmemu.mmu.memory import FAULT_FLAG_WRITE, handle_mm_fault
from vmemu.mmu.pgtable import _PAGE_PRESENT, _PAGE_PSE, _PAGE_RW, PTE_PFN_MASK
from vmemu.mmu.vma import VM_ACCESS_FLAGS, VM_READ, VM_SHARED, VM_WRITE

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


def faultin_page(mm: MmStruct, addr: int, write: bool, task: Any = None) -> None:
    """Make one page present (and writable) or raise the errno GUP reports."""
    for _ in range(MAX_RETRIES):
        if _page_ready(mm, addr, write):
            return
        vma = mm.vmas.vma_lookup(addr)
        if vma is None:
            raise_errno(errno.ENOMEM)
        if write and not vma.vm_flags & VM_WRITE or not write and not vma.vm_flags & VM_READ:
            raise_errno(errno.EFAULT)  # check_vma_flags
        fault = handle_mm_fault(mm, vma, addr, FAULT_FLAG_WRITE if write else 0, task)
        if fault & VmFault.OOM:
            raise_errno(errno.ENOMEM)
        if fault & VmFault.HWPOISON:
            raise_errno(EHWPOISON)
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
            if w is None:
                w = (vma.vm_flags & (VM_WRITE | VM_SHARED)) == VM_WRITE
            try:
                while addr < stop:
                    faultin_page(mm, addr, w, task)
                    addr += PAGE_SIZE
            except OSError:
                if not ignore_errors:
                    raise
                return


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
