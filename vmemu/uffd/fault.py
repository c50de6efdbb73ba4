"""Delivering page faults to userland: ``handle_userfault`` (``fs/userfaultfd.c``).

A fault in a registered range becomes a ``uffd_msg`` on the context's
*pending* queue; ``read()`` moves it to the *read* queue. The faulting task
sleeps (with the mm lock dropped, as the kernel drops ``mmap_lock``) until
an ioctl wakes the range that contains its fault address, or the uffd is
released; then the fault returns ``VM_FAULT_RETRY`` and the access is
retried from the top, so a wake without a resolution simply faults again
and queues a new message. A message still unread when its task wakes is
withdrawn, as the kernel does when it takes the waiter off the queue.

Before sleeping the task re-checks the page table (``userfaultfd_must_wait``):
if the fault was resolved between the walk and the queueing, it does not
sleep at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from vmemu.constants import PAGE_SHIFT
from vmemu.errors import VmFault
from vmemu.mmu.memory import FAULT_FLAG_USER, FAULT_FLAG_WRITE, VmFaultInfo
from vmemu.mmu.pgtable import (
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
    is_uffd_wp_marker,
)
from vmemu.mmu.vma import VM_HUGETLB, VM_UFFD_MINOR, VM_UFFD_WP
from vmemu.uffd.uapi import (
    UFFD_FEATURE_EXACT_ADDRESS,
    UFFD_FEATURE_SIGBUS,
    UFFD_FEATURE_THREAD_ID,
    UFFD_PAGEFAULT_FLAG_MINOR,
    UFFD_PAGEFAULT_FLAG_WP,
    UFFD_PAGEFAULT_FLAG_WRITE,
    UFFD_USER_MODE_ONLY,
    PagefaultMsg,
    pagefault_msg,
)

if TYPE_CHECKING:
    from vmemu.uffd.ctx import Userfaultfd

_PAGE_MASK = ~((1 << PAGE_SHIFT) - 1)


@attrs.define(eq=False, slots=True)
class UserfaultWait:
    """A task waiting for its fault to be resolved (``struct userfaultfd_wait_queue``)."""

    msg: PagefaultMsg
    task: Any
    address: int = 0  # msg.address, which wake_range matches against its range
    waken: bool = False
    where: str = "pending"  # "pending" -> "read" -> "" (off both queues)


def userfault_msg(vmf: VmFaultInfo, reason: int, features: int, huge_mask: int) -> PagefaultMsg:
    """Build the message for a fault (``userfault_msg``)."""
    flags = 0
    if vmf.flags & FAULT_FLAG_WRITE:
        flags |= UFFD_PAGEFAULT_FLAG_WRITE
    if reason & VM_UFFD_WP:
        flags |= UFFD_PAGEFAULT_FLAG_WP
    if reason & VM_UFFD_MINOR:
        flags |= UFFD_PAGEFAULT_FLAG_MINOR
    if features & UFFD_FEATURE_EXACT_ADDRESS:
        address = vmf.real_address
    else:
        address = vmf.real_address & ~huge_mask
    ptid = 0
    if features & UFFD_FEATURE_THREAD_ID and vmf.task is not None:
        ptid = int(getattr(vmf.task, "tid", 0))
    return PagefaultMsg(flags, address, ptid)


def userfaultfd_must_wait(mm: Any, address: int, reason: int) -> bool:
    """True while the fault is still unresolved in the page table (``userfaultfd_must_wait``)."""
    mem_map = mm.phys.mem_map  # the walk of pmd_table(address, False), inlined as translate's
    e = mm.pgtables.pgd[(address >> 39) & 511]
    if e:
        e = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT][(address >> 30) & 511]
    if not e:
        return True
    me = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT][(address >> 21) & 511]
    if not me:
        return True
    if me & _PAGE_PSE:
        pte = me
    else:  # the PTE table under this PMD entry (get_pte without walking from the top again)
        pte = mem_map[(me & PTE_PFN_MASK) >> PAGE_SHIFT][(address >> PAGE_SHIFT) & 511]
    return entry_must_wait(pte, reason)


def entry_must_wait(pte: int, reason: int) -> bool:
    """``userfaultfd_must_wait``'s test of the entry it walked to: none or a uffd-wp marker,
    or, for a WP fault, a present read-only entry that still has the uffd-wp bit."""
    if pte == 0 or (not pte & (_PAGE_PRESENT | _PAGE_PROTNONE) and is_uffd_wp_marker(pte)):
        return True
    if reason & VM_UFFD_WP and pte & (_PAGE_PRESENT | _PAGE_PROTNONE) and not pte & _PAGE_RW:
        return bool(pte & _PAGE_UFFD_WP)
    return False


def handle_userfault(ctx: Userfaultfd, vmf: VmFaultInfo, reason: int) -> VmFault:
    """Queue a fault message and sleep until the range is woken (``handle_userfault``).

    Written out in one frame - ``userfault_msg``, the queueing, the
    ``waitqueue_active`` wake of readers and the mm lock drop around the
    sleep are inlined - because it runs once per fault; the steps and their
    order are the kernel's.
    """
    if ctx.released:
        return VmFault.NOPAGE
    features = ctx.features
    if features & UFFD_FEATURE_SIGBUS:
        return VmFault.SIGBUS
    fflags = vmf.flags
    if not fflags & FAULT_FLAG_USER and ctx.flags & UFFD_USER_MODE_ONLY:
        return VmFault.SIGBUS
    # userfault_msg
    flags = UFFD_PAGEFAULT_FLAG_WRITE if fflags & FAULT_FLAG_WRITE else 0
    if reason & VM_UFFD_WP:
        flags |= UFFD_PAGEFAULT_FLAG_WP
    if reason & VM_UFFD_MINOR:
        flags |= UFFD_PAGEFAULT_FLAG_MINOR
    address = vmf.real_address
    if not features & UFFD_FEATURE_EXACT_ADDRESS:
        vma = vmf.vma
        if vma.vm_flags & VM_HUGETLB:
            address &= ~(vma.vm_file.hstate.size - 1)  # vma_kernel_pagesize: 2 MiB or 1 GiB
        else:
            address &= _PAGE_MASK
    task = vmf.task
    ptid = 0
    if features & UFFD_FEATURE_THREAD_ID and task is not None:
        ptid = int(getattr(task, "tid", 0))
    uwq = UserfaultWait(pagefault_msg(flags, address, ptid), task, address)
    mm = ctx.mm
    if ctx.tracer.enabled:
        ctx.trace("userfault", addr=address, flags=flags)
    with ctx.lock:
        ctx.fault_pending.append(uwq)
        ctx.stat_faults += 1
        if not ctx._is_ready:  # the readiness half of notify_readers (_update_ready, inlined)
            ctx._is_ready = True
            if ctx._fd_open:
                ctx._ready.set_ready(True)
    # userfaultfd_must_wait, asked of the entry the fault path read: the mm lock has been
    # held since its walk, so vmf.table is still the live table there and walking from the
    # top again gives the same entry (tests/uffd/test_uffd_fastpath.py checks it does)
    pte = vmf.table[vmf.idx]
    if pte and not entry_must_wait(pte, reason):
        ctx.dequeue(uwq)
        return VmFault.RETRY
    # the wake half, only when a reader waits (waitqueue_active: a reader that queues
    # itself later finds the message when it re-checks), done right before sleeping
    wake_readers = ctx.notify_readers if ctx.fd_wq.waitqueue_active() else None
    # mmap_read_unlock: sleep with the mm lock released completely, then take it back
    lock: Any = mm.lock
    saved = None
    release = getattr(lock, "_release_save", None)
    if release is not None:
        try:
            saved = release()
        except RuntimeError:  # not held by this thread
            saved = None
    try:
        wq = ctx.fault_wq
        runtime = ctx.runtime
        tried = False
        if wq.resolver is not None and not runtime.charges_move_clock \
                and not ctx.tracer.enabled and not (uwq.waken or ctx.released):
            # An inline handler, and nothing that shows when charges happen or what
            # the queue did step by step (no virtual clock, no trace): run it first,
            # without queueing, and queue only if it did not resolve the fault. That is
            # wait_event's first round less the queue entry (only a concurrent look at
            # fault_wq.waiters() could tell): every wake-up aimed at this fault sets
            # uwq.waken, from which the entry's wake-up is accounted, so statistics()
            # and charges() come out as if it had been queued.
            task = runtime.current()
            if wq not in task.resolving:  # else wait_event reports the ReentrantFault
                if wake_readers is not None:
                    wake_readers()
                    wake_readers = None
                wq.run_resolver(task, address, "")
                tried = True
                if uwq.waken:
                    wq.account_woken(1)
        if not (uwq.waken or ctx.released):
            wq.wait_event(lambda: uwq.waken or ctx.released, key=address,
                          reason=lambda: f"userfault at {address:#x}",
                          before_sleep=wake_readers, resolver_tried=tried)
    finally:
        if saved is not None:
            lock._acquire_restore(saved)
    if uwq.where:  # still queued: woken by release or a timeout, not by wake_range
        ctx.dequeue(uwq)
    return VmFault.RETRY


class mm_lock_dropped:  # noqa: N801 - reads as the kernel's mmap_read_unlock ... lock pair
    """Release the mm lock completely while sleeping, then take it back (``mmap_read_unlock``)."""

    def __init__(self, mm: Any) -> None:
        self.lock = mm.lock
        self.saved: Any = None

    def __enter__(self) -> None:
        release = getattr(self.lock, "_release_save", None)
        if release is not None:
            try:
                self.saved = release()
            except RuntimeError:  # not held by this thread
                self.saved = None

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            self.lock._acquire_restore(self.saved)
