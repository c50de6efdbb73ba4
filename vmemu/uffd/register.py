"""Registering ranges: UFFDIO_REGISTER / UNREGISTER and release (``fs/userfaultfd.c``).

A VMA belongs to at most one userfaultfd. Registering splits VMAs at the
range's edges and stores the modes in ``vm_flags`` (VM_UFFD_MISSING, _WP,
_MINOR) and the context in ``vm_userfaultfd_ctx``; neighbours with the same
flags and context merge again. Holes inside the range are allowed as long
as one VMA is there. The returned ``ioctls`` tell which range ioctls the
kernel implements for it.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from vmemu.constants import PAGE_SIZE, TASK_SIZE
from vmemu.errors import raise_errno
from vmemu.mmu.vma import (
    VM_DROPPABLE,
    VM_HUGETLB,
    VM_MAYWRITE,
    VM_UFFD_FLAGS,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    Vma,
)
from vmemu.mmu.vmaops import vma_modify
from vmemu.uffd.uapi import (
    _UFFDIO_CONTINUE,
    _UFFDIO_WRITEPROTECT,
    UFFD_API_RANGE_IOCTLS,
    UFFD_API_RANGE_IOCTLS_BASIC,
    UFFD_API_REGISTER_MODES,
    UFFDIO_REGISTER_MODE_MINOR,
    UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_REGISTER_MODE_WP,
)
from vmemu.uffd.wp import uffd_wp_range

if TYPE_CHECKING:
    from vmemu.uffd.ctx import Userfaultfd


def validate_unaligned_range(start: int, length: int) -> None:
    """EINVAL unless ``[start, start+len)`` is a sane user range (``validate_unaligned_range``).

    Only the length and the task size are checked: there is no
    ``mmap_min_addr`` floor (observed on 6.18: a COPY whose source is 0 is
    EFAULT and a destination at 4096 ENOENT, both past validation).
    """
    if length & (PAGE_SIZE - 1) or not length or length < 0:
        raise_errno(errno.EINVAL)
    if start < 0 or start >= TASK_SIZE or length > TASK_SIZE - start:
        raise_errno(errno.EINVAL)


def validate_range(start: int, length: int) -> None:
    """As :func:`validate_unaligned_range`, and ``start`` page-aligned (``validate_range``)."""
    if start & (PAGE_SIZE - 1):
        raise_errno(errno.EINVAL)
    validate_unaligned_range(start, length)


def vma_is_shmem(vma: Vma) -> bool:
    """True for tmpfs/shmem mappings, shared anonymous memory included (``vma_is_shmem``)."""
    return vma.vm_file is not None and not vma.vm_flags & VM_HUGETLB


def vma_huge_size(vma: Vma) -> int:
    """The page size a VMA maps with (``vma_kernel_pagesize``)."""
    if vma.vm_flags & VM_HUGETLB:
        return int(getattr(vma.vm_file, "huge_size", 1 << 21))
    return PAGE_SIZE


def vma_can_userfault(vma: Vma, vm_flags: int, wp_async: bool) -> bool:
    """Whether ``vma`` may be registered in the modes ``vm_flags`` (``vma_can_userfault``)."""
    vm_flags &= VM_UFFD_FLAGS
    if vma.vm_flags & VM_DROPPABLE:
        return False
    hugetlb = bool(vma.vm_flags & VM_HUGETLB)
    if vm_flags & VM_UFFD_MINOR and not (hugetlb or vma_is_shmem(vma)):
        return False
    if wp_async and vm_flags == VM_UFFD_WP:
        return True
    return vma.vm_file is None or hugetlb or vma_is_shmem(vma)


def _set_uffd(vma: Vma, ctx: Userfaultfd | None, flags: int) -> None:
    vma.vm_userfaultfd_ctx = ctx
    vma.vm_flags = (vma.vm_flags & ~VM_UFFD_FLAGS) | flags


def register(ctx: Userfaultfd, start: int, length: int, mode: int) -> int:
    """UFFDIO_REGISTER; returns the ``ioctls`` bitmask (``userfaultfd_register``)."""
    if mode & ~UFFD_API_REGISTER_MODES or not mode:
        raise_errno(errno.EINVAL, "bad register mode")
    vm_flags = 0
    if mode & UFFDIO_REGISTER_MODE_MISSING:
        vm_flags |= VM_UFFD_MISSING
    if mode & UFFDIO_REGISTER_MODE_WP:
        vm_flags |= VM_UFFD_WP
    if mode & UFFDIO_REGISTER_MODE_MINOR:
        vm_flags |= VM_UFFD_MINOR
    validate_range(start, length)
    mm = ctx.mm
    if mm.dead:
        raise_errno(errno.ENOMEM)
    end = start + length
    with mm.lock:
        vmas = mm.vmas.overlapping(start, end)
        if not vmas:
            raise_errno(errno.EINVAL, "no mapping in range")
        first = vmas[0]
        if first.vm_flags & VM_HUGETLB and start & (vma_huge_size(first) - 1):
            raise_errno(errno.EINVAL)
        basic = False
        for cur in vmas:
            if not vma_can_userfault(cur, vm_flags, ctx.wp_async):
                raise_errno(errno.EINVAL, "mapping type cannot be registered in this mode")
            if not cur.vm_flags & VM_MAYWRITE:
                raise_errno(errno.EPERM)
            if cur.vm_flags & VM_HUGETLB and cur.vm_start < end <= cur.vm_end and \
                    end & (vma_huge_size(cur) - 1):
                raise_errno(errno.EINVAL)
            if cur.vm_userfaultfd_ctx is not None and cur.vm_userfaultfd_ctx is not ctx:
                raise_errno(errno.EBUSY)
            if cur.vm_flags & VM_HUGETLB:
                basic = True
        for cur in vmas:
            if cur.vm_userfaultfd_ctx is ctx and cur.vm_flags & vm_flags == vm_flags:
                continue
            new_flags = (cur.vm_flags & ~VM_UFFD_FLAGS) | vm_flags
            def apply(v: Vma, f: int = new_flags) -> None:
                _set_uffd(v, ctx, f)

            vma = vma_modify(mm, cur, start, end, apply)
            _set_uffd(vma, ctx, (vma.vm_flags & ~VM_UFFD_FLAGS) | vm_flags)
    ioctls = UFFD_API_RANGE_IOCTLS_BASIC if basic else UFFD_API_RANGE_IOCTLS
    if not mode & UFFDIO_REGISTER_MODE_MINOR:
        ioctls &= ~(1 << _UFFDIO_CONTINUE)
    if not mode & UFFDIO_REGISTER_MODE_WP:
        ioctls &= ~(1 << _UFFDIO_WRITEPROTECT)
    return ioctls


def clear_vma(ctx: Userfaultfd | None, vma: Vma, start: int, end: int) -> Vma:
    """Unregister ``[start, end)`` of ``vma`` (``userfaultfd_clear_vma``): wp state goes too."""
    mm = vma_mm(vma, ctx)
    if vma.vm_flags & VM_UFFD_WP:
        uffd_wp_range(mm, vma, max(start, vma.vm_start), min(end, vma.vm_end), False,
                      use_markers=False)
    return vma_modify(mm, vma, start, end, lambda v: _set_uffd(v, None, 0))


def vma_mm(vma: Vma, ctx: Userfaultfd | None) -> Any:
    """The mm a registered VMA belongs to (``vma->vm_mm``)."""
    assert ctx is not None
    return ctx.mm


def unregister(ctx: Userfaultfd, start: int, length: int) -> None:
    """UFFDIO_UNREGISTER (``userfaultfd_unregister``).

    MISSING-registered parts first wake their sleeping faults (they would
    otherwise hang); a WP-only range is not woken (observed on 6.18).
    """
    validate_range(start, length)
    mm = ctx.mm
    if mm.dead:
        raise_errno(errno.ENOMEM)
    end = start + length
    with mm.lock:
        vmas = mm.vmas.overlapping(start, end)
        if not vmas:
            raise_errno(errno.EINVAL, "no mapping in range")
        first = vmas[0]
        if first.vm_flags & VM_HUGETLB and start & (vma_huge_size(first) - 1):
            raise_errno(errno.EINVAL)
        for cur in vmas:
            if cur.vm_userfaultfd_ctx is not None and cur.vm_userfaultfd_ctx is not ctx:
                raise_errno(errno.EINVAL, "registered to another userfaultfd")
            if not vma_can_userfault(cur, cur.vm_flags, ctx.wp_async):
                raise_errno(errno.EINVAL)
        for cur in mm.vmas.overlapping(start, end):
            if cur.vm_userfaultfd_ctx is None:
                continue
            s, e = max(start, cur.vm_start), min(end, cur.vm_end)
            if cur.vm_flags & VM_UFFD_MISSING:
                ctx.wake_range(s, e - s)
            clear_vma(ctx, cur, s, e)


def release_all_vmas(ctx: Userfaultfd) -> None:
    """Unregister every VMA of the context's mm that it owns (``userfaultfd_release_all``)."""
    mm = ctx.mm
    if mm.dead:
        return
    for vma in list(mm.vmas):
        if vma.vm_userfaultfd_ctx is ctx:
            clear_vma(ctx, vma, vma.vm_start, vma.vm_end)
