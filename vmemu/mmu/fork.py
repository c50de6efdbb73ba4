"""fork: duplicating an address space (``dup_mmap`` in ``mm/mmap.c``, ``kernel/fork.c``).

Each VMA is copied unless it is VM_DONTCOPY (MADV_DONTFORK). A
VM_WIPEONFORK VMA arrives empty in the child. Private anonymous memory
becomes copy-on-write: ``copy_pte_range`` write-protects both sides and
shares the folios. Shared memory (shmem underneath) is not copied at all:
the child's VMA maps the same page cache and faults it in on access, which
is why the two processes keep seeing each other's writes. The child does
not inherit mlock, and without UFFD_FEATURE_EVENT_FORK it does not inherit
userfaultfd registration or uffd-wp bits (``dup_userfaultfd``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmemu.mmu.memory import copy_pte_range
from vmemu.mmu.vma import (
    VM_DONTCOPY,
    VM_LOCKED,
    VM_LOCKONFAULT,
    VM_UFFD_FLAGS,
    VM_UFFD_WP,
    VM_WIPEONFORK,
    AnonVma,
    Vma,
    anon_vma_clone,
    anon_vma_link,
)

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct


def anon_vma_fork(vma: Vma, pvma: Vma) -> None:
    """Link the child's VMA to its parent's anon_vmas plus a new one of its own (``anon_vma_fork``)."""
    if pvma.anon_vma is None:
        return
    anon_vma_clone(vma, pvma)
    av = AnonVma(parent=pvma.anon_vma)
    vma.anon_vma = av
    anon_vma_link(vma, av)


def dup_mmap(parent: MmStruct, child: MmStruct) -> None:
    """Copy ``parent``'s VMAs and page tables into the empty ``child`` (``dup_mmap``)."""
    with parent.lock:
        for pvma in parent.vmas:
            if pvma.vm_flags & VM_DONTCOPY:
                continue
            vma = Vma(pvma.vm_start, pvma.vm_end, pvma.vm_flags & ~(VM_LOCKED | VM_LOCKONFAULT),
                      pvma.vm_pgoff, pvma.vm_file, None, [], None, pvma.anon_name)
            keep_uffd = parent.dup_userfaultfd(pvma, vma, child)
            if not keep_uffd:
                vma.vm_flags &= ~VM_UFFD_FLAGS
            if vma.vm_file is not None:
                vma.vm_file.i_mmap.append(vma)
            child.vmas.insert(vma)
            if pvma.vm_flags & VM_WIPEONFORK:
                continue
            anon_vma_fork(vma, pvma)
            if pvma.anon_vma is not None or (keep_uffd and pvma.vm_flags & VM_UFFD_WP):
                copy_pte_range(parent, child, pvma, vma, keep_uffd)
        parent.tlb.flush_all()
