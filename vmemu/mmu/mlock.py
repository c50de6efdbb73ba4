"""mlock, munlock, mlockall: keeping pages resident (``mm/mlock.c``).

Locking sets VM_LOCKED (and VM_LOCKONFAULT for MLOCK_ONFAULT / MCL_ONFAULT)
on the VMAs of the range, splitting and merging them like any flag change,
then faults the range in (``__mm_populate``) unless the lock is on-fault.
The swap layer never reclaims a page mapped by a VM_LOCKED VMA, MADV_DONTNEED
refuses such VMAs (EINVAL), fork does not copy the lock, and
/proc/<pid>/smaps reports their resident pages as ``Locked:``.

Argument rules as in Linux 6.18: an unaligned start is rounded *down* and the
length grows by the same amount (no EINVAL); a range whose end wraps is
EINVAL; a hole at the start fails with ENOMEM before anything changes, a
hole further on fails with ENOMEM after the VMAs before it were changed (and
then nothing is populated). A populate failure is reported the POSIX way
(``__mlock_posix_error_return``): EFAULT becomes ENOMEM (a PROT_NONE VMA),
ENOMEM becomes EAGAIN. The emulated caller has CAP_IPC_LOCK, so
RLIMIT_MEMLOCK never applies.

``mlockall(MCL_FUTURE)`` sets ``mm.def_flags``, which ``do_mmap`` adds to
every new mapping.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vmemu.constants import PAGE_SIZE, TASK_SIZE
from vmemu.errors import raise_errno
from vmemu.mmu.gup import populate
from vmemu.mmu.vma import (
    VM_DROPPABLE,
    VM_HUGETLB,
    VM_IO,
    VM_LOCKED,
    VM_LOCKONFAULT,
    VM_PFNMAP,
    VM_SPECIAL,
    Vma,
)
from vmemu.mmu.vmaops import vma_modify

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

# mlock2 flags (include/uapi/asm-generic/mman-common.h)
MLOCK_ONFAULT = 0x01
# mlockall flags (include/uapi/asm-generic/mman.h)
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4

VM_LOCKED_MASK = VM_LOCKED | VM_LOCKONFAULT
_U64 = (1 << 64) - 1


def mlock_fixup(mm: MmStruct, vma: Vma, start: int, end: int, newflags: int) -> Vma:
    """Give ``[start, end)`` of ``vma`` the lock flags in ``newflags`` (``mlock_fixup``).

    VM_SPECIAL, hugetlb and droppable VMAs are left alone, as in the kernel.
    """
    old = vma.vm_flags
    if newflags == old or old & (VM_SPECIAL | VM_DROPPABLE) or old & VM_HUGETLB:
        return vma

    def change(v: Vma) -> None:
        v.vm_flags = newflags

    return vma_modify(mm, vma, start, end, change)


def apply_vma_lock_flags(mm: MmStruct, start: int, length: int, flags: int) -> None:
    """Set the lock bits of every VMA in the range to ``flags`` (``apply_vma_lock_flags``)."""
    end = start + length
    if end > _U64:
        raise_errno(errno.EINVAL, "range wraps")
    if end == start:
        return
    with mm.lock:
        vma = mm.vmas.vma_lookup(start)
        if vma is None:
            raise_errno(errno.ENOMEM, "range not mapped")
        nstart = start
        while True:
            tmp = min(vma.vm_end, end)
            newflags = (vma.vm_flags & ~VM_LOCKED_MASK) | flags
            mlock_fixup(mm, vma, nstart, tmp, newflags)
            nstart = tmp
            if nstart >= end:
                return
            nxt = mm.vmas.find_vma(nstart)
            if nxt is None or nxt.vm_start > nstart:  # a merge may have moved vm_start down
                raise_errno(errno.ENOMEM, "range not fully mapped")
            vma = nxt


def mm_populate_locked(mm: MmStruct, start: int, end: int, ignore_errors: bool) -> None:
    """Fault in the locked VMAs of ``[start, end)`` (``__mm_populate``).

    Holes, VM_IO/VM_PFNMAP and on-fault VMAs are skipped
    (``populate_vma_page_range``); a failure raises unless ``ignore_errors``.
    """
    addr = start
    while addr < end:
        with mm.lock:
            vma = mm.vmas.find_vma(addr)
            if vma is None or vma.vm_start >= end:
                return
            lo, hi = max(addr, vma.vm_start), min(end, vma.vm_end)
            skip = vma.vm_flags & (VM_IO | VM_PFNMAP | VM_LOCKONFAULT)
        if not skip:
            try:
                populate(mm, lo, hi)
            except OSError:
                if not ignore_errors:
                    raise
        addr = hi


def _align_range(start: int, length: int) -> tuple[int, int]:
    """Round ``start`` down and grow ``length`` to match (the head of ``do_mlock``)."""
    start &= _U64
    length = (length & _U64) + (start & (PAGE_SIZE - 1))
    length = ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)) & _U64
    return start & ~(PAGE_SIZE - 1), length


def do_mlock(mm: MmStruct, start: int, length: int, flags: int = 0) -> None:
    """mlock(2) / mlock2(2) (``do_mlock``)."""
    if flags & ~MLOCK_ONFAULT:
        raise_errno(errno.EINVAL, "unknown mlock2 flags")
    vm_flags = VM_LOCKED | (VM_LOCKONFAULT if flags & MLOCK_ONFAULT else 0)
    start, length = _align_range(start, length)
    apply_vma_lock_flags(mm, start, length, vm_flags)
    try:
        mm_populate_locked(mm, start, start + length, ignore_errors=False)
    except OSError as e:  # __mlock_posix_error_return
        if e.errno == errno.EFAULT:
            raise_errno(errno.ENOMEM, "cannot fault in a locked page")
        if e.errno == errno.ENOMEM:
            raise_errno(errno.EAGAIN, "out of memory populating locked range")
        raise


def do_munlock(mm: MmStruct, start: int, length: int) -> None:
    """munlock(2)."""
    start, length = _align_range(start, length)
    apply_vma_lock_flags(mm, start, length, 0)


def do_mlockall(mm: MmStruct, flags: int) -> None:
    """mlockall(2) (``apply_mlockall_flags`` + ``mm_populate``)."""
    if not flags or flags & ~(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) or flags == MCL_ONFAULT:
        raise_errno(errno.EINVAL, "bad mlockall flags")
    _apply_mlockall_flags(mm, flags)
    if flags & MCL_CURRENT:
        mm_populate_locked(mm, 0, TASK_SIZE, ignore_errors=True)


def do_munlockall(mm: MmStruct) -> None:
    """munlockall(2): unlock every VMA and stop locking future mappings."""
    _apply_mlockall_flags(mm, 0)


def _apply_mlockall_flags(mm: MmStruct, flags: int) -> None:
    with mm.lock:
        mm.def_flags &= ~VM_LOCKED_MASK
        if flags & MCL_FUTURE:
            mm.def_flags |= VM_LOCKED | (VM_LOCKONFAULT if flags & MCL_ONFAULT else 0)
            if not flags & MCL_CURRENT:
                return
        to_add = 0
        if flags & MCL_CURRENT:
            to_add = VM_LOCKED | (VM_LOCKONFAULT if flags & MCL_ONFAULT else 0)
        for vma in list(mm.vmas):
            if vma not in mm.vmas.overlapping(vma.vm_start, vma.vm_end):
                continue  # merged away by an earlier fixup
            mlock_fixup(mm, vma, vma.vm_start, vma.vm_end,
                        (vma.vm_flags & ~VM_LOCKED_MASK) | to_add)
