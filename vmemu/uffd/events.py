"""Non-cooperative events: FORK, REMAP, REMOVE, UNMAP (``fs/userfaultfd.c``).

When the monitored process changes its own address space, a monitor that
asked for it (UFFD_FEATURE_EVENT_*) gets a message, and the task that made
the change sleeps until the message is read, so the monitor never races
with a layout it has not seen. While such an event is queued,
``mmap_changing`` makes COPY/ZEROPAGE/CONTINUE/POISON/MOVE/WRITEPROTECT
fail with EAGAIN.

* FORK (``dup_userfaultfd``): the child's registered VMAs get a new
  context with the same features; the parent's monitor reads its fd.
  Without the feature the child simply loses registration and uffd-wp.
* REMAP (``mremap_userfaultfd_prep``/``_complete``): the moved VMA keeps
  its registration; without the feature it is unregistered.
* REMOVE (``userfaultfd_remove``): MADV_DONTNEED/FREE/REMOVE, raised before
  the pages go, with the mm lock dropped.
* UNMAP (``userfaultfd_unmap_prep``/``_complete``): munmap, mmap(MAP_FIXED)
  over, mremap shrink or FIXED over; every context in the range gets the
  whole range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmemu.mmu.vma import VM_UFFD_FLAGS, Vma
from vmemu.uffd.uapi import (
    UFFD_FEATURE_EVENT_FORK,
    UFFD_FEATURE_EVENT_REMAP,
    UFFD_FEATURE_EVENT_REMOVE,
    UFFD_FEATURE_EVENT_UNMAP,
    RemoveMsg,
)

if TYPE_CHECKING:
    from vmemu.uffd.ctx import Userfaultfd


def event_remove(ctx: Userfaultfd, start: int, end: int) -> bool:
    """Raise REMOVE and wait until it is read; True if the event was raised."""
    if not ctx.features & UFFD_FEATURE_EVENT_REMOVE or ctx.released:
        return False
    with ctx.lock:
        ctx.mmap_changing += 1
    ctx.queue_event(RemoveMsg(start, end))
    return True


def dup_vma(ctx: Userfaultfd, child_vma: Vma, child_mm: Any, fork_ctxs: dict[int, Any]) -> bool:
    """Give the child's VMA a context of its own, or drop registration (``dup_userfaultfd``)."""
    if not ctx.features & UFFD_FEATURE_EVENT_FORK or ctx.released:
        child_vma.vm_userfaultfd_ctx = None
        child_vma.vm_flags &= ~VM_UFFD_FLAGS
        return False
    pair = fork_ctxs.get(id(ctx))
    if pair is None:
        from vmemu.uffd.ctx import UffdState, Userfaultfd

        new = Userfaultfd(child_mm.owner, ctx.flags, features=ctx.features,
                          state=UffdState.RUNNING)
        pair = fork_ctxs[id(ctx)] = (ctx, new)
        with ctx.lock:
            ctx.mmap_changing += 1
    child_vma.vm_userfaultfd_ctx = pair[1]
    return True


def remap_prep(ctx: Userfaultfd, new_vma: Vma) -> bool:
    """Keep the moved VMA registered if REMAP is wanted (``mremap_userfaultfd_prep``)."""
    if ctx.features & UFFD_FEATURE_EVENT_REMAP and not ctx.released:
        with ctx.lock:
            ctx.mmap_changing += 1
        return True
    new_vma.vm_userfaultfd_ctx = None
    new_vma.vm_flags &= ~VM_UFFD_FLAGS
    return False


def unmap_prep(ctx: Userfaultfd, pending: list[Any], start: int, end: int) -> None:
    """Note a context that must hear of an unmap (``userfaultfd_unmap_prep``)."""
    if not ctx.features & UFFD_FEATURE_EVENT_UNMAP or ctx.released:
        return
    if any(c is ctx and s == start and e == end for c, s, e in pending):
        return
    with ctx.lock:
        ctx.mmap_changing += 1
    pending.append((ctx, start, end))


