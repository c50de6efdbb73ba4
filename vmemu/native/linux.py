"""Linux x86-64 constants the native binding needs.

The mmap/madvise/mremap/signal values are those of :mod:`vmemu.constants`
(one source of truth for the emulator and the native binding); this module
re-exports them and adds what only a binding to the real kernel needs:
syscall numbers, memfd and fallocate flags, and the ``/proc/pid/pagemap``
entry bits (``Documentation/admin-guide/mm/pagemap.rst``).
"""

from __future__ import annotations

from vmemu.constants import (
    BUS_ADRALN,
    BUS_ADRERR,
    BUS_MCEERR_AO,
    BUS_MCEERR_AR,
    BUS_OBJERR,
    MADV_COLD,
    MADV_DODUMP,
    MADV_DOFORK,
    MADV_DONTDUMP,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_DONTNEED_LOCKED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_RANDOM,
    MADV_REMOVE,
    MADV_SEQUENTIAL,
    MADV_WILLNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGETLB,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    SEGV_ACCERR,
    SEGV_MAPERR,
    SIGBUS,
    SIGKILL,
    SIGSEGV,
)

__all__ = [
    "BUS_ADRALN",
    "BUS_ADRERR",
    "BUS_MCEERR_AO",
    "BUS_MCEERR_AR",
    "BUS_OBJERR",
    "MADV_COLD",
    "MADV_DODUMP",
    "MADV_DOFORK",
    "MADV_DONTDUMP",
    "MADV_DONTFORK",
    "MADV_DONTNEED",
    "MADV_DONTNEED_LOCKED",
    "MADV_FREE",
    "MADV_HUGEPAGE",
    "MADV_NOHUGEPAGE",
    "MADV_NORMAL",
    "MADV_PAGEOUT",
    "MADV_POPULATE_READ",
    "MADV_POPULATE_WRITE",
    "MADV_RANDOM",
    "MADV_REMOVE",
    "MADV_SEQUENTIAL",
    "MADV_WILLNEED",
    "MAP_ANONYMOUS",
    "MAP_FIXED",
    "MAP_FIXED_NOREPLACE",
    "MAP_HUGETLB",
    "MAP_NORESERVE",
    "MAP_POPULATE",
    "MAP_PRIVATE",
    "MAP_SHARED",
    "MREMAP_DONTUNMAP",
    "MREMAP_FIXED",
    "MREMAP_MAYMOVE",
    "PAGE_SIZE",
    "PMD_SIZE",
    "PROT_EXEC",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "SEGV_ACCERR",
    "SEGV_MAPERR",
    "SIGBUS",
    "SIGKILL",
    "SIGSEGV",
    "HPAGE_SIZE_2M",
    "MFD_CLOEXEC",
    "MFD_ALLOW_SEALING",
    "MFD_HUGETLB",
    "MFD_HUGE_2MB",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "PM_PRESENT",
    "PM_SWAP",
    "PM_FILE",
    "PM_UFFD_WP",
    "PM_MMAP_EXCLUSIVE",
    "PM_SOFT_DIRTY",
    "PM_PFRAME_MASK",
    "SYS_read",
    "SYS_write",
    "SYS_mmap",
    "SYS_mprotect",
    "SYS_munmap",
    "SYS_mremap",
    "SYS_madvise",
    "SYS_clone",
    "SYS_fallocate",
    "SYS_memfd_create",
    "SYS_userfaultfd",
    "SYS_close_range",
]

HPAGE_SIZE_2M = PMD_SIZE

# memfd_create(2) flags (include/uapi/linux/memfd.h)
MFD_CLOEXEC = 0x0001
MFD_ALLOW_SEALING = 0x0002
MFD_HUGETLB = 0x0004
MFD_HUGE_SHIFT = 26
MFD_HUGE_2MB = 21 << MFD_HUGE_SHIFT

# fallocate(2) modes (include/uapi/linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# /proc/<pid>/pagemap entry bits (fs/proc/task_mmu.c: PM_*)
PM_PFRAME_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)
SYS_read = 0
SYS_write = 1
SYS_mmap = 9
SYS_mprotect = 10
SYS_munmap = 11
SYS_mremap = 25
SYS_madvise = 28
SYS_clone = 56
SYS_fallocate = 285
SYS_memfd_create = 319
SYS_userfaultfd = 323
SYS_close_range = 436
