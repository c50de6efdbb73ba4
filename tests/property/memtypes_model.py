"""The reference model shared by the memory-type stateful machines.

A process is a dict from virtual page number to :class:`PageModel`; a file
(a memfd, the shmem object behind a MAP_SHARED|MAP_ANONYMOUS mmap, a
hugetlbfs file) is a :class:`FileModel`: an ``i_size`` and the bytes of its
page cache, by 4 KiB page index. What a byte reads back as follows from
three kinds of page:

``anon``
    private anonymous memory: its own bytes, or zeros (``data is None``).
``shared``
    MAP_SHARED of a file: whatever the file holds at ``index``; every
    mapping of the same file offset, in every process, is an alias.
``private``
    MAP_PRIVATE of a file: the file's bytes until the first write (or a
    populate that writes) makes a private copy (``data``); from then on a
    write through another mapping or ``pwrite`` is no longer seen.

A file page at or beyond ``i_size`` (rounded up to the page, or to the huge
page for hugetlb) is SIGBUS (BUS_ADRERR), COW copy or not: truncation zaps
private copies beyond the new end (``unmap_mapping_range(even_cows)``).

Two outcomes the kernel leaves open are modelled as candidates, not
guesses: a page under MADV_FREE (``lazy``) reads back as its bytes or as
zeros (reclaim may discard it at any moment, until it is written again),
and a poisoned page (``poisoned``, MADV_HWPOISON) is SIGBUS BUS_MCEERR_AR
for every access. The model knows nothing of VMAs, folios, page tables,
swap or TLBs.
"""

from __future__ import annotations

import errno
import re

import attrs

from vmemu import (
    BUS_ADRERR,
    BUS_MCEERR_AR,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    SEGV_ACCERR,
    SEGV_MAPERR,
    Sigbus,
    Sigsegv,
)
from vmemu.mmu.memfd import F_SEAL_FUTURE_WRITE, F_SEAL_GROW, F_SEAL_WRITE

ZERO_PAGE = bytes(PAGE_SIZE)
_OFF = PAGE_SIZE - 1
HPAGE_PAGES = 512


@attrs.define(eq=False)
class FileModel:
    """A file's size and page cache (4 KiB page index -> bytes)."""

    name: str
    size: int
    huge: bool = False
    fd: int | None = None  # the root process's fd; None for MAP_SHARED|MAP_ANONYMOUS objects
    pages: dict[int, bytearray] = attrs.field(factory=dict)
    # MADV_HWPOISON of a page cache page: the indexes whose cached page is poisoned, and
    # what the model knows of PG_dirty (memory_failure signals the caller for a dirty page):
    # written since the page entered the cache, or perhaps (fallocated, partly zeroed)
    poisoned: set[int] = attrs.field(factory=set)
    raw_poisoned: set[int] = attrs.field(factory=set)  # where pread stops (a hugetlb page's raw page)
    dirty: set[int] = attrs.field(factory=set)
    maybe_dirty: set[int] = attrs.field(factory=set)
    # hugetlb: the huge page indexes in the page cache (a shared fault or fallocate put
    # them there; a private fault of a hole allocates an anonymous page instead)
    cached: set[int] = attrs.field(factory=set)
    seals: int = 0  # F_GET_SEALS

    def write_sealed(self) -> bool:
        """F_SEAL_WRITE or F_SEAL_FUTURE_WRITE: no pwrite, no hole punch, no new shared writer."""
        return bool(self.seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))

    def __repr__(self) -> str:
        return f"FileModel({self.name!r}, size={self.size:#x})"

    @property
    def granule(self) -> int:
        """Bytes per page of this file: 4 KiB, or 2 MiB for hugetlb."""
        return PAGE_SIZE * (HPAGE_PAGES if self.huge else 1)

    def beyond_eof(self, index: int) -> bool:
        """True when page ``index`` is past the last (huge) page of the file."""
        g = self.granule
        return index * PAGE_SIZE >= (self.size + g - 1) // g * g

    def page(self, index: int) -> bytes:
        """The bytes at page ``index`` (zeros for a hole)."""
        buf = self.pages.get(index)
        return ZERO_PAGE if buf is None else bytes(buf)

    def store(self, index: int, off: int, data: bytes) -> None:
        """Write ``data`` at ``off`` of page ``index``."""
        buf = self.pages.setdefault(index, bytearray(PAGE_SIZE))
        buf[off:off + len(data)] = data
        self.dirty.add(index)

    def drop(self, index: int) -> None:
        """The cached page at ``index`` leaves the page cache (truncated or punched)."""
        self.poisoned.discard(index)
        self.raw_poisoned.discard(index)
        self.dirty.discard(index)
        self.maybe_dirty.discard(index)

    def pread(self, offset: int, n: int) -> bytes | int:
        """pread: the bytes, up to the first poisoned page (EIO if that is the first)."""
        end = min(offset + n, self.size)
        stop = end
        for index in range(offset >> PAGE_SHIFT, (end + _OFF) >> PAGE_SHIFT):
            if index in self.raw_poisoned:
                stop = max(offset, index << PAGE_SHIFT)
                break
        if stop == offset and offset < end:
            return errno.EIO
        return self.read(offset, stop - offset)

    def pwrite(self, offset: int, data: bytes) -> int:
        """pwrite, page-sized step by step (``generic_perform_write``); bytes done or -errno.

        A write seal refuses it (EPERM); F_SEAL_GROW stops at the step that
        would grow the file, a poisoned page at itself (EPERM / EIO when
        nothing was written).
        """
        if self.write_sealed():
            return -errno.EPERM
        end = offset + len(data)
        pos, err = offset, 0
        while pos < end:
            stop = min(end, (pos | _OFF) + 1)
            if self.seals & F_SEAL_GROW and stop > self.size:
                err = errno.EPERM
                break
            if pos >> PAGE_SHIFT in self.raw_poisoned:
                err = errno.EIO
                break
            pos = stop
        n = pos - offset
        if n == 0:
            return -err
        self.write(offset, data[:n])
        return n

    def read(self, offset: int, n: int) -> bytes:
        """pread: up to the end of the file."""
        end = min(offset + n, self.size)
        out = bytearray()
        pos = offset
        while pos < end:
            stop = min(end, (pos | _OFF) + 1)
            out += self.page(pos >> PAGE_SHIFT)[pos & _OFF:(pos & _OFF) + stop - pos]
            pos = stop
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """pwrite: may extend the file."""
        pos, done = offset, 0
        while done < len(data):
            chunk = min(len(data) - done, PAGE_SIZE - (pos & _OFF))
            self.store(pos >> PAGE_SHIFT, pos & _OFF, data[done:done + chunk])
            pos += chunk
            done += chunk
        self.size = max(self.size, offset + len(data))

    def zero(self, start: int, end: int) -> None:
        """Zero the bytes ``[start, end)`` (a punched hole; holes read as zeros).

        Whole pages leave the page cache; a page zeroed in part stays, and
        may be dirty now. (A hugetlb file drops whole huge pages only: its
        machine does that.)
        """
        pos = start
        while pos < end:
            stop = min(end, (pos | _OFF) + 1)
            buf = self.pages.get(pos >> PAGE_SHIFT)
            if buf is not None:
                buf[pos & _OFF:(pos & _OFF) + stop - pos] = bytes(stop - pos)
            if self.huge:
                pass
            elif stop - pos == PAGE_SIZE:
                self.drop(pos >> PAGE_SHIFT)
            else:
                self.maybe_dirty.add(pos >> PAGE_SHIFT)
            pos = stop

    def truncate(self, size: int) -> None:
        """ftruncate: a shrink drops the pages beyond the end and zeroes the last one's tail.

        A mapping may write the tail of the last page, beyond ``i_size``; a
        grow does not zero it, so those bytes show up in ``pread``, while
        ftruncate to the same size does zero it (both checked on 6.18 for
        shmem; tests/differential/test_kernel_memfd.py).
        """
        if size <= self.size:  # the same size too: shmem_truncate_range(newsize, -1) runs
            first = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
            for index in [i for i in self.pages if i >= first]:
                del self.pages[index]
            for index in [i for i in self.poisoned | self.raw_poisoned | self.dirty |
                          self.maybe_dirty if i >= first]:
                self.drop(index)
            self.zero(size, first << PAGE_SHIFT)
            self.cached = {h for h in self.cached if h * HPAGE_PAGES < first}
        self.size = size


@attrs.define
class PageModel:
    """What one process sees at one virtual page."""

    prot: int
    kind: str  # "anon", "shared" or "private"
    file: FileModel | None = None
    index: int = 0  # page index in ``file``
    data: bytes | None = None  # anon contents / private COW copy; None: zeros / the file's
    lazy: bool = False  # MADV_FREE: ``data`` or zeros until written
    poisoned: bool = False
    dontfork: bool = False
    wipeonfork: bool = False
    locked: bool = False
    huge: bool = False  # hugetlb
    thp: int = 0  # the last of MADV_HUGEPAGE / MADV_NOHUGEPAGE, if any
    maywrite: bool = True  # VM_MAYWRITE: a shared mapping made after a write seal has none

    def sigbus(self) -> int | None:
        """The BUS_* code an access gets, or None.

        ``poisoned`` is a hwpoison entry in this page table; a page that
        would fault in a poisoned page cache page (shared, or private and
        not yet copied) is VM_FAULT_HWPOISON too.
        """
        if self.poisoned:
            return BUS_MCEERR_AR
        if self.file is not None and self.file.beyond_eof(self.index):
            return BUS_ADRERR
        if self.file is not None and self.index in self.file.poisoned and \
                (self.kind == "shared" or self.data is None):
            return BUS_MCEERR_AR
        return None

    def content(self) -> bytes:
        """The page's bytes (for a lazy page: the bytes if it was not discarded)."""
        if self.data is not None:
            return self.data
        if self.kind == "anon":
            return ZERO_PAGE
        assert self.file is not None
        return self.file.page(self.index)

    def candidates(self) -> list[bytes]:
        """Every content the page may read back as."""
        return [self.content(), ZERO_PAGE] if self.lazy else [self.content()]

    def __repr__(self) -> str:
        data = "None" if self.data is None else f"<{len(self.data)} bytes {self.data[:8]!r}...>"
        file = None if self.file is None else self.file.name
        return (f"PageModel(prot={self.prot}, kind={self.kind!r}, file={file!r}, "
                f"index={self.index}, data={data}, lazy={self.lazy}, poisoned={self.poisoned}, "
                f"locked={self.locked}, huge={self.huge})")

    def cow(self) -> None:
        """A write fault (or a write populate) on a private page: it gets a frame of its own.

        A private file page copies the page cache; a private page shared
        since fork is copied too (a new object, so :meth:`hwpoison
        <test_mm_memtypes_stateful.MemTypesMachine.hwpoison>` no longer sees
        the two as one frame).
        """
        if self.kind == "private" and self.data is None:
            # its own object: content() of a hole is the one ZERO_PAGE, and hwpoison
            # takes pages whose data is the same object for one frame
            self.data = bytes(bytearray(self.content()))
        elif self.kind != "shared" and self.data is not None:
            self.data = bytes(bytearray(self.data))

    def store(self, off: int, data: bytes, base: bytes | None = None) -> None:
        """Write ``data`` at ``off`` (over ``base`` if given: a resolved lazy page)."""
        if self.kind == "shared":
            assert self.file is not None
            self.file.store(self.index, off, data)
            return
        buf = bytearray(self.content() if base is None else base)
        buf[off:off + len(data)] = data
        self.data = bytes(buf)
        self.lazy = False

    def readable(self) -> bool:
        """x86 lets any of r, w, x read (``access_error``)."""
        return bool(self.prot & (PROT_READ | PROT_WRITE | PROT_EXEC))

    def writable(self) -> bool:
        """Writes need PROT_WRITE."""
        return bool(self.prot & PROT_WRITE)

    def vm_shared(self) -> bool:
        """VM_SHARED: a MAP_SHARED mapping."""
        return self.kind == "shared"

    def perms(self) -> str:
        """The ``rwxp`` column of /proc/<pid>/maps."""
        p = self.prot
        return ("r" if p & PROT_READ else "-") + ("w" if p & PROT_WRITE else "-") + \
            ("x" if p & PROT_EXEC else "-") + ("s" if self.vm_shared() else "p")


Pages = dict[int, PageModel]


def fork_pages(pages: Pages) -> Pages:
    """The child's view after fork.

    DONTFORK pages are not copied; WIPEONFORK (private anonymous only) pages
    are zero; locks are not inherited (``dup_mmap`` clears VM_LOCKED).
    """
    child: Pages = {}
    for vpn, pg in pages.items():
        if pg.dontfork:
            continue
        c = attrs.evolve(pg, locked=False)
        if pg.kind == "shared":
            c.poisoned = False  # a shared VMA has no anon_vma: no PTEs are copied
        if pg.wipeonfork:
            c.data, c.lazy, c.poisoned = None, False, False
        child[vpn] = c
    return child


@attrs.define
class Segment:
    """One page's part of an access: where, and what it may read back as."""

    vpn: int
    off: int
    n: int


Expected = tuple[type, int, int, int]  # signal class, si_code, si_addr, done


def plan_access(pages: Pages, addr: int, n: int, write: bool
                ) -> tuple[list[Segment], Expected | None]:
    """The page segments an access covers, and the signal it ends in (or None)."""
    segs: list[Segment] = []
    done = 0
    while done < n:
        a = addr + done
        off = a & _OFF
        chunk = min(n - done, PAGE_SIZE - off)
        pg = pages.get(a >> PAGE_SHIFT)
        if pg is None:
            return segs, (Sigsegv, SEGV_MAPERR, a, done)
        if not (pg.writable() if write else pg.readable()):
            return segs, (Sigsegv, SEGV_ACCERR, a, done)
        bus = pg.sigbus()
        if bus is not None:
            return segs, (Sigbus, bus, a, done)
        segs.append(Segment(a >> PAGE_SHIFT, off, chunk))
        done += chunk
    return segs, None


# -- parsing /proc views -------------------------------------------------------

_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ")


def parse_vmas(text: str) -> list[tuple[int, int, str]]:
    """``(start_vpn, end_vpn, perms)`` of every line of /proc/<pid>/maps."""
    out = []
    for line in text.splitlines():
        m = _HEAD.match(line)
        assert m, f"bad maps line {line!r}"
        out.append((int(m[1], 16) >> PAGE_SHIFT, int(m[2], 16) >> PAGE_SHIFT, m[3]))
    return out


def parse_smaps_flags(text: str) -> list[tuple[int, int, frozenset[str]]]:
    """``(start_vpn, end_vpn, VmFlags)`` of every VMA of /proc/<pid>/smaps."""
    out = []
    rng = (0, 0)
    for line in text.splitlines():
        m = _HEAD.match(line)
        if m:
            rng = (int(m[1], 16) >> PAGE_SHIFT, int(m[2], 16) >> PAGE_SHIFT)
        elif line.startswith("VmFlags:"):
            out.append((*rng, frozenset(line.split()[1:])))
    return out


Run = tuple[int, int, object]


def runs(pages: Pages) -> tuple[list[Run], list[Run]]:
    """Maximal runs ``(start_vpn, end_vpn, key)`` of consecutive model pages, for two keys.

    The keys are what /proc shows: the ``rwxp`` perms of maps, and the
    ``(dc, wf, lo)`` VmFlags of smaps.
    """
    perms: list[Run] = []
    flags: list[Run] = []
    for vpn in sorted(pages):
        pg = pages[vpn]
        for out, k in ((perms, pg.perms()), (flags, (pg.dontfork, pg.wipeonfork, pg.locked))):
            if out and out[-1][1] == vpn and out[-1][2] == k:
                out[-1] = (out[-1][0], vpn + 1, k)
            else:
                out.append((vpn, vpn + 1, k))
    return perms, flags


def merged(vmas: list[tuple[int, int, object]]) -> list[tuple[int, int, object]]:
    """Adjacent ranges with equal keys joined (VMA boundaries are not the model's business)."""
    out: list[tuple[int, int, object]] = []
    for s, e, k in vmas:
        if out and out[-1][1] == s and out[-1][2] == k:
            out[-1] = (out[-1][0], e, k)
        else:
            out.append((s, e, k))
    return out
