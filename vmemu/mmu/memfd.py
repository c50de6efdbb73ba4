"""memfd and the file syscalls on it: an anonymous shmem file you can map twice.

Mirrors ``mm/memfd.c`` and the shmem file operations (``mm/shmem.c``):
``memfd_create`` makes a tmpfs inode with no name on disk; ``ftruncate``
sets its size; ``fallocate`` allocates pages or punches holes;
``pread``/``pwrite`` go through the page cache; seals (``F_ADD_SEALS``)
forbid shrinking, growing or writing. Mapping one memfd twice gives two
aliases of the same page cache, which is what userfaultfd minor faults
(``UFFDIO_CONTINUE``) are built on.
"""

from __future__ import annotations

import errno
from typing import Any

import attrs

from vmemu.constants import PAGE_SHIFT, PAGE_SIZE
from vmemu.errors import raise_errno
from vmemu.mmu.filemap import unmap_mapping_range
from vmemu.mmu.folio import PG, PhysMem
from vmemu.mmu.shmem import ShmemInode
from vmemu.mmu.vma import VM_MAYWRITE, VM_SHARED

MFD_CLOEXEC = 0x0001
MFD_ALLOW_SEALING = 0x0002
MFD_HUGETLB = 0x0004
MFD_NOEXEC_SEAL = 0x0008
MFD_EXEC = 0x0010
MFD_HUGE_SHIFT = 26
MFD_HUGE_MASK = 0x3F
MFD_NAME_MAX_LEN = 255 - len("memfd:")

F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
F_SEAL_EXEC = 0x0020
F_ALL_SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE \
    | F_SEAL_EXEC

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MAX_LFS_FILESIZE = (1 << 63) - 1


@attrs.define(eq=False)
class OpenFile:
    """An open file description (``struct file``) shared by dup'ed and inherited fds."""

    inode: Any
    name: str
    cloexec: bool = False
    refs: int = 1

    def release(self) -> None:
        """Drop one reference; the last one releases the inode's file reference (``fput``)."""
        self.refs -= 1
        if self.refs == 0:
            self.inode.file_refs -= 1
            if self.inode.file_refs == 0 and not self.inode.i_mmap:
                self.inode.truncate()


def memfd_create(phys: PhysMem, name: str, flags: int, hugetlb_setup: Any = None) -> OpenFile:
    """Create an anonymous tmpfs file (``memfd_create``)."""
    known = MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB | MFD_NOEXEC_SEAL | MFD_EXEC
    if flags & MFD_HUGETLB:
        known |= MFD_HUGE_MASK << MFD_HUGE_SHIFT
    if flags & ~known or flags < 0:
        raise_errno(errno.EINVAL, "unknown memfd flags")
    if flags & MFD_NOEXEC_SEAL and flags & MFD_EXEC:
        raise_errno(errno.EINVAL, "MFD_NOEXEC_SEAL with MFD_EXEC")
    if len(name.encode()) > MFD_NAME_MAX_LEN:
        raise_errno(errno.EINVAL, "name too long")
    if flags & MFD_HUGETLB:
        if hugetlb_setup is None:
            raise_errno(errno.EINVAL, "hugetlb is not available")
        inode = hugetlb_setup(name, flags)
    else:
        inode = ShmemInode(phys, 0, name=f"/memfd:{name} (deleted)")
    inode.seals = 0 if flags & (MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL) else F_SEAL_SEAL
    if flags & MFD_NOEXEC_SEAL:
        inode.seals |= F_SEAL_EXEC
    inode.file_refs += 1
    return OpenFile(inode, f"memfd:{name}", cloexec=bool(flags & MFD_CLOEXEC))


def writably_mapped(inode: Any) -> bool:
    """True while a shared mapping may write the file (``mapping_writably_mapped``)."""
    return any(v.vm_flags & VM_SHARED and v.vm_flags & VM_MAYWRITE for v in inode.i_mmap)


def add_seals(inode: Any, seals: int) -> None:
    """F_ADD_SEALS (``memfd_add_seals``)."""
    if seals & ~F_ALL_SEALS or seals < 0:
        raise_errno(errno.EINVAL)
    if inode.seals & F_SEAL_SEAL:
        raise_errno(errno.EPERM)
    if seals & F_SEAL_WRITE and not inode.seals & F_SEAL_WRITE and writably_mapped(inode):
        raise_errno(errno.EBUSY)
    inode.seals |= seals


def _is_hugetlb(inode: Any) -> bool:
    return bool(getattr(inode, "is_hugetlb", False))


def truncate_setsize(inode: Any, size: int) -> None:
    """Set ``i_size``, dropping cached pages and mappings beyond it (``shmem_setattr``).

    A hugetlbfs file takes only multiples of its huge page size, EINVAL
    otherwise, checked before the seals (``hugetlbfs_setattr``).
    """
    if size < 0 or size > MAX_LFS_FILESIZE:
        raise_errno(errno.EINVAL)
    if _is_hugetlb(inode) and size & (inode.hstate.size - 1):
        raise_errno(errno.EINVAL, "hugetlbfs size must be a multiple of the huge page size")
    old = inode.i_size
    if size < old and inode.seals & F_SEAL_SHRINK:
        raise_errno(errno.EPERM)
    if size > old and inode.seals & F_SEAL_GROW:
        raise_errno(errno.EPERM)
    if _is_hugetlb(inode):
        inode.set_size(size)  # hugetlb_vmtruncate: huge pages, reservations, markers
        return
    inode.i_size = size
    if size <= old:  # the same size too: shmem_truncate_range(newsize, -1) still runs
        first = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
        if old > first << PAGE_SHIFT:
            unmap_mapping_range(inode, first, 1 << 52, even_cows=True, drop_markers=True)
        inode.drop_range(first, 1 << 52)  # also pages fallocated beyond EOF (KEEP_SIZE)
        _zero_partial(inode, size, (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))


def fallocate(inode: Any, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on a shmem or hugetlbfs file (``shmem_fallocate``, ``hugetlbfs_fallocate``).

    A hole drops the whole pages (4 KiB, or huge pages on hugetlbfs) inside
    it and zeroes the parts of the pages at its ends; allocation fills the
    page cache and, without FALLOC_FL_KEEP_SIZE, grows ``i_size`` to
    ``offset + length`` exactly (unaligned, even on hugetlbfs).
    """
    if offset < 0 or length <= 0:
        raise_errno(errno.EINVAL)
    if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
        raise_errno(errno.EOPNOTSUPP)
    if offset + length > MAX_LFS_FILESIZE:
        raise_errno(errno.EFBIG)
    end = offset + length
    unit = inode.hstate.size if _is_hugetlb(inode) else PAGE_SIZE
    if mode & FALLOC_FL_PUNCH_HOLE:
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise_errno(errno.EOPNOTSUPP)
        if inode.seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
            raise_errno(errno.EPERM)
        hole_start = (offset + unit - 1) & ~(unit - 1)
        hole_end = end & ~(unit - 1)
        first, last = hole_start >> PAGE_SHIFT, hole_end >> PAGE_SHIFT
        if first < last:
            if not _is_hugetlb(inode):  # hugetlbfs drop_range unmaps by itself
                unmap_mapping_range(inode, first, last, even_cows=False)
            inode.drop_range(first, last)
        elif not _is_hugetlb(inode) and end < PAGE_SIZE:
            # shmem_fallocate compares round_down(end) - 1 == -1 with the hole start as
            # u64 and calls unmap_mapping_range with a zero or negative length, which
            # means "to the end of the file": a punch inside page 0 unmaps (not drops)
            # every page from the hole start on, in every mapping (observed on 6.18)
            unmap_mapping_range(inode, first, 1 << 52, even_cows=False)
        _zero_partial(inode, offset, min(end, hole_start))
        _zero_partial(inode, max(offset, hole_end), end)
        return
    if end > inode.i_size and inode.seals & F_SEAL_GROW:
        raise_errno(errno.EPERM)  # even with FALLOC_FL_KEEP_SIZE
    for u in range(offset // unit, (end + unit - 1) // unit):
        if inode.get_folio(u * (unit >> PAGE_SHIFT)) is None:
            raise_errno(errno.ENOSPC)
    if not mode & FALLOC_FL_KEEP_SIZE and end > inode.i_size:
        inode.i_size = end


def _folio_offset(folio: Any, pos: int) -> int:
    """Where file offset ``pos`` lies in ``folio.data`` (``offset_in_folio``)."""
    return pos - (folio.index << PAGE_SHIFT)


def _zero_partial(inode: Any, start: int, end: int) -> None:
    """Zero ``[start, end)`` in the cached folios (``shmem_truncate_range``'s partial pages)."""
    while start < end:
        folio = inode.find_folio(start >> PAGE_SHIFT)
        stop = min(end, (start | (PAGE_SIZE - 1)) + 1)
        if folio is not None:
            off = _folio_offset(folio, start)
            folio.data[off:off + stop - start] = bytes(stop - start)
        start = stop


def _raw_poisoned(inode: Any, folio: Any, pos: int) -> bool:
    """Is the 4 KiB page at ``pos`` of a poisoned folio itself bad?

    A hugetlbfs read stops only at the raw poisoned pages of a huge page
    (``adjust_range_hwpoison``); a shmem page is poisoned whole.
    """
    if not _is_hugetlb(inode):
        return True
    return folio.pfn + (_folio_offset(folio, pos) >> PAGE_SHIFT) in inode.pool.raw_hwpoison


def file_read(inode: Any, n: int, offset: int) -> bytes:
    """pread(2) through the page cache (``shmem_file_read_iter``); holes read as zeros.

    A poisoned page (MADV_HWPOISON) ends the read: EIO when it is the
    first page, else the bytes before it.
    """
    if n < 0 or offset < 0:
        raise_errno(errno.EINVAL)
    end = min(offset + n, inode.i_size)
    out = bytearray()
    pos = offset
    while pos < end:
        stop = min(end, (pos | (PAGE_SIZE - 1)) + 1)
        folio = inode.find_folio(pos >> PAGE_SHIFT)
        if folio is None:
            out += bytes(stop - pos)
        elif folio.flags & PG.hwpoison and _raw_poisoned(inode, folio, pos):
            if not out:
                raise_errno(errno.EIO, "pread of a poisoned page")
            break
        else:
            off = _folio_offset(folio, pos)
            out += folio.data[off:off + stop - pos]
        pos = stop
    return bytes(out)


def file_write(inode: Any, data: bytes, offset: int) -> int:
    """pwrite(2) through the page cache (``shmem_write_begin``/``generic_perform_write``).

    hugetlbfs has no ``write_iter``: EINVAL there (write through a mapping).
    """
    if offset < 0 or _is_hugetlb(inode):
        raise_errno(errno.EINVAL)
    if inode.seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        raise_errno(errno.EPERM)
    end = offset + len(data)
    if end > MAX_LFS_FILESIZE:
        raise_errno(errno.EFBIG)
    done = 0
    pos = offset
    while pos < end:
        stop = min(end, (pos | (PAGE_SIZE - 1)) + 1)
        if stop > inode.i_size and inode.seals & F_SEAL_GROW:
            # shmem_write_begin refuses the page-sized step that would grow the file;
            # generic_perform_write returns what the steps before it wrote (6.18)
            if done:
                break
            raise_errno(errno.EPERM)
        folio = inode.get_folio(pos >> PAGE_SHIFT)
        if folio is None or folio.flags & PG.hwpoison:  # shmem_write_begin
            if done:
                break
            raise_errno(errno.ENOSPC if folio is None else errno.EIO)
        off = _folio_offset(folio, pos)
        folio.data[off:off + stop - pos] = data[done:done + stop - pos]
        folio.flags |= PG.dirty
        done += stop - pos
        pos = stop
    if offset + done > inode.i_size:
        inode.i_size = offset + done
    return done
