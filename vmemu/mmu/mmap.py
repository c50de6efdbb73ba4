"""mmap and munmap: creating and destroying mappings (``mm/mmap.c``, ``mm/vma.c``).

The checks run in the kernel's order so that a call with several problems
fails with the same errno as on Linux: length, alignment, flags, placement
(``__get_unmapped_area``), MAP_FIXED_NOREPLACE, then the mapping itself.
A failing call changes nothing.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from vmemu.constants import (
    LEGACY_MAP_MASK,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_TYPE,
    MMAP_MIN_ADDR,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
)
from vmemu.errors import raise_errno
from vmemu.mmu.memory import zap_page_range
from vmemu.mmu.shmem import ShmemInode
from vmemu.mmu.vma import (
    VM_ACCOUNT,
    VM_EXEC,
    VM_GROWSDOWN,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NORESERVE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
    Vma,
)
from vmemu.mmu.vmaops import remove_vma, split_vma, vma_merge_neighbours

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct


_ULONG_MASK = (1 << 64) - 1


def page_align(n: int) -> int:
    """Round ``n`` up to a page boundary (``PAGE_ALIGN``)."""
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def calc_vm_prot_bits(prot: int) -> int:
    """VM_READ/WRITE/EXEC from PROT_* (``calc_vm_prot_bits``)."""
    return ((VM_READ if prot & PROT_READ else 0) | (VM_WRITE if prot & PROT_WRITE else 0)
            | (VM_EXEC if prot & PROT_EXEC else 0))


def get_unmapped_area(mm: MmStruct, addr: int, length: int, flags: int,
                      thp_align: bool) -> int:
    """Choose where a new mapping goes (``__get_unmapped_area`` + the top-down allocator).

    MAP_FIXED takes ``addr`` as is; otherwise a free, page-aligned hint is
    honoured; otherwise the highest gap below ``mmap_base`` is used.
    Anonymous mappings whose length is a multiple of 2 MiB are placed on a
    2 MiB boundary (``thp_get_unmapped_area``) so they can use huge pages.
    """
    if length > TASK_SIZE:
        raise_errno(errno.ENOMEM)
    if flags & MAP_FIXED:
        if addr > TASK_SIZE - length:
            raise_errno(errno.ENOMEM)
        if addr & (PAGE_SIZE - 1):
            raise_errno(errno.EINVAL)
        return addr
    if addr:
        addr &= ~(PAGE_SIZE - 1)
        if TASK_SIZE - length >= addr and addr >= MMAP_MIN_ADDR and \
                not mm.vmas.overlapping(addr, addr + length):
            return addr
    want = length + (PMD_SIZE if thp_align and length % PMD_SIZE == 0 else 0)
    for lo, hi in mm.vmas.gaps(max(MMAP_MIN_ADDR, PAGE_SIZE), mm.mmap_base):
        if hi - lo >= want:
            start = hi - want
            if want != length:
                start = (start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
            return start
    raise_errno(errno.ENOMEM)


def do_mmap(mm: MmStruct, addr: int, length: int, prot: int, flags: int,
            file: Any = None, offset: int = 0) -> int:
    """Create a mapping; returns its address (``ksys_mmap_pgoff`` -> ``do_mmap``)."""
    if offset & (PAGE_SIZE - 1) or offset < 0:
        raise_errno(errno.EINVAL, "offset not page aligned")
    addr &= _ULONG_MASK  # addr and len are unsigned long in the syscall
    length &= _ULONG_MASK
    if not length:
        raise_errno(errno.EINVAL, "zero length")
    if flags & MAP_FIXED_NOREPLACE:
        flags |= MAP_FIXED
    if not flags & MAP_FIXED:
        addr &= ~(PAGE_SIZE - 1)  # round_hint_to_min: a hint is rounded down
        if addr and addr < MMAP_MIN_ADDR:
            addr = page_align(MMAP_MIN_ADDR)
    length = page_align(length)
    if length == 0 or length >= 1 << 64:
        raise_errno(errno.ENOMEM)
    pgoff = offset >> PAGE_SHIFT
    if pgoff + (length >> PAGE_SHIFT) >= 1 << 64:
        raise_errno(errno.EOVERFLOW)
    if len(mm.vmas) > mm.max_map_count:
        raise_errno(errno.ENOMEM, "max_map_count")
    map_type = flags & MAP_TYPE
    if file is None and not flags & MAP_ANONYMOUS:
        raise_errno(errno.EBADF, "no file and no MAP_ANONYMOUS")
    if flags & MAP_HUGETLB or getattr(file, "is_hugetlb", False):
        return mm.mmap_hugetlb(addr, length, prot, flags, file, offset)
    if flags & MAP_FIXED and addr < MMAP_MIN_ADDR and addr <= TASK_SIZE - length \
            and not addr & (PAGE_SIZE - 1):  # security_mmap_addr runs after those checks
        raise_errno(errno.EPERM, "below mmap_min_addr")
    # do_mmap places the mapping (ENOMEM/EINVAL) and checks MAP_FIXED_NOREPLACE
    # (EEXIST) before it looks at the mapping type (EINVAL/EOPNOTSUPP).
    shared = map_type in (MAP_SHARED, MAP_SHARED_VALIDATE)
    thp_align = file is None and not shared and not addr
    addr = get_unmapped_area(mm, addr, length, flags, thp_align)
    if flags & MAP_FIXED_NOREPLACE and mm.vmas.overlapping(addr, addr + length):
        raise_errno(errno.EEXIST)
    if map_type == MAP_SHARED_VALIDATE and file is not None:
        if flags & ~LEGACY_MAP_MASK & ~(MAP_FIXED_NOREPLACE | MAP_SHARED_VALIDATE):
            raise_errno(errno.EOPNOTSUPP)
        map_type = MAP_SHARED
    if map_type not in (MAP_SHARED, MAP_PRIVATE):  # MAP_SHARED_VALIDATE is for files only
        raise_errno(errno.EINVAL, "MAP_SHARED or MAP_PRIVATE required")
    if shared and flags & MAP_GROWSDOWN:
        raise_errno(errno.EINVAL)
    vm_flags = calc_vm_prot_bits(prot) | mm.def_flags | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
    if file is not None:
        vm_flags = mm.file_vm_flags(file, vm_flags, shared)
    if shared:
        vm_flags |= VM_SHARED | VM_MAYSHARE
    if flags & MAP_GROWSDOWN:
        vm_flags |= VM_GROWSDOWN
    if flags & MAP_LOCKED:
        vm_flags |= VM_LOCKED
    if flags & MAP_NORESERVE:
        vm_flags |= VM_NORESERVE
    with mm.lock:
        mmap_region(mm, addr, length, vm_flags, file, pgoff, shared)
    if flags & (MAP_POPULATE | MAP_NONBLOCK) == MAP_POPULATE or vm_flags & VM_LOCKED:
        mm.populate(addr, addr + length, ignore_errors=True)
    return addr


def mmap_region(mm: MmStruct, addr: int, length: int, vm_flags: int, file: Any,
                pgoff: int, shared: bool) -> Vma:
    """Unmap whatever is at ``[addr, addr+len)`` and map the new VMA there (``mmap_region``)."""
    end = addr + length
    if mm.vmas.overlapping(addr, end):
        do_munmap(mm, addr, length)
    if file is None:
        if shared:
            file = ShmemInode(mm.phys, length)
            pgoff = 0
        else:
            pgoff = addr >> PAGE_SHIFT
    if not shared and vm_flags & VM_WRITE and not vm_flags & VM_NORESERVE:
        vm_flags |= VM_ACCOUNT  # accountable_mapping
    vma = Vma(addr, end, vm_flags, pgoff, file)
    if file is not None:
        file.i_mmap.append(vma)
    mm.vmas.insert(vma)
    return vma_merge_neighbours(mm, vma)


def do_munmap(mm: MmStruct, start: int, length: int) -> None:
    """Remove every mapping in ``[start, start+len)`` (``do_vmi_munmap``).

    Holes in the range are fine. VMAs straddling an edge are split first;
    a split that would exceed ``max_map_count`` fails with ENOMEM before
    anything changes.
    """
    end = start + length
    with mm.lock:
        vmas = mm.vmas.overlapping(start, end)
        if not vmas:
            return
        first, last = vmas[0], vmas[-1]
        mm.userfaultfd_unmap_prep(start, end)
        if first.vm_start < start < end < first.vm_end and len(mm.vmas) >= mm.max_map_count:
            raise_errno(errno.ENOMEM, "max_map_count")  # vms_gather_munmap_vmas
        if first.vm_start < start:
            new = split_vma(mm, first, start, check_count=False)
            if first is last:
                last = new
        if last.vm_end > end:
            split_vma(mm, last, end, check_count=False)
        for vma in mm.vmas.overlapping(start, end):
            zap_page_range(mm, vma, vma.vm_start, vma.vm_end, keep_wp_marker=False)
            remove_vma(mm, vma)
        mm.pgtables.free_pgtables(start, end)
        mm.tlb.flush_range(start, end)


def check_munmap_args(start: int, length: int) -> int:
    """Validate munmap's arguments (``__vm_munmap``); returns the aligned length."""
    start &= _ULONG_MASK
    length &= _ULONG_MASK
    if start & (PAGE_SIZE - 1) or start > TASK_SIZE or length > TASK_SIZE - start or length < 0:
        raise_errno(errno.EINVAL)
    length = page_align(length)
    if length == 0:
        raise_errno(errno.EINVAL)
    return length


