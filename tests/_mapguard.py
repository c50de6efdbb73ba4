"""A guard that stops a test from unmapping or mapping over memory it does not own.

Tests that drive the real kernel (``vmemu.native.libc``) share one address
space with the interpreter. A test that moves part of its mapping away
(mremap) or unmaps part of it leaves a hole, and the kernel may give that hole
to the interpreter's next ``mmap(NULL)`` - a pymalloc arena, a big string. A
later ``munmap`` or ``MAP_FIXED`` of the test's old range then destroys
Python's own memory, and the interpreter dies seconds later in unrelated code
("Fatal Python error: Segmentation fault" in a hypothesis test, far from the
culprit). The guard turns that into an immediate, attributable failure.

It wraps ``libc.mmap`` / ``munmap`` / ``mremap`` / ``mprotect`` / ``madvise``
(and the stores by address, see :meth:`Guard.check_write`) for the whole
session and keeps the set of byte ranges the tests own: what their ``mmap``
and ``mremap`` calls returned, less what they unmapped or moved away. Before
a call that changes existing mappings it reads ``/proc/self/maps`` and
refuses (``UnownedMapping``, before the syscall runs)

* any mapped byte of the target range that the tests do not own, and
* for munmap, MAP_FIXED and mremap: any *unmapped*, unowned byte at or above
  :data:`ALLOCATOR_FLOOR` - a hole the interpreter's allocator may fill at
  any moment, so the call is a race even when it happens to find it empty.

Holes below the floor (the windows of ``_kernel.reserve_low`` at 64 GiB, the
16 TiB reservation of the uffd replay) are safe: the allocator places its
mappings top-down from under the stack and never gets there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from sortedcontainers import SortedDict

PAGE = 4096
#: The kernel's top-down mmap search starts near the stack (~128 TiB) and the
#: executable and brk heap lie at ~94 TiB; nothing the interpreter maps goes
#: below 32 TiB unless 96 TiB of address space were used up.
ALLOCATOR_FLOOR = 1 << 45
MAP_FIXED = 0x10
MAP_FIXED_NOREPLACE = 0x100000
MAP_HUGETLB = 0x40000
MAP_HUGE_SHIFT = 26
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4


class UnownedMapping(AssertionError):
    """A test's munmap/MAP_FIXED/mremap/mprotect/madvise would touch memory it does not own."""


class Ranges:
    """A set of byte ranges ``[start, end)``, kept merged (starts -> ends)."""

    def __init__(self) -> None:
        self._d: SortedDict = SortedDict()

    def add(self, s: int, e: int) -> None:
        if s >= e:
            return
        i = self._d.bisect_right(s) - 1
        if i >= 0 and self._d.peekitem(i)[1] >= s:
            s = self._d.peekitem(i)[0]
        else:
            i += 1
        while i < len(self._d) and self._d.peekitem(i)[0] <= e:
            k, v = self._d.peekitem(i)
            e = max(e, v)
            del self._d[k]
        self._d[s] = e

    def remove(self, s: int, e: int) -> None:
        for k, v in self.overlaps(s, e):
            del self._d[k]
            if k < s:
                self._d[k] = s
            if v > e:
                self._d[e] = v

    def overlaps(self, s: int, e: int) -> list[tuple[int, int]]:
        """The stored ranges meeting ``[s, e)``, whole."""
        i = max(self._d.bisect_right(s) - 1, 0)
        out = []
        while i < len(self._d):
            k, v = self._d.peekitem(i)
            if k >= e:
                break
            if v > s:
                out.append((k, v))
            i += 1
        return out

    def minus(self, s: int, e: int) -> list[tuple[int, int]]:
        """The parts of ``[s, e)`` not in the set."""
        out, at = [], s
        for k, v in self.overlaps(s, e):
            if k > at:
                out.append((at, k))
            at = max(at, v)
        if at < e:
            out.append((at, e))
        return out


def _pages(length: int, page: int = PAGE) -> int:
    """``length`` rounded up to whole pages, as the kernel does."""
    return -(-length // page) * page


def _page_size(flags: int, fd: int) -> int:
    """The page size of a new mapping: a hugetlb one is a whole number of huge pages."""
    if flags & MAP_HUGETLB:
        return 1 << ((flags >> MAP_HUGE_SHIFT) & 0x3F or 21)
    if fd >= 0:
        try:
            return max(PAGE, os.fstat(fd).st_blksize)  # hugetlbfs: the huge page size
        except OSError:
            pass
    return PAGE


def _mapped(s: int, e: int) -> list[tuple[int, int, str]]:
    """The parts of ``[s, e)`` mapped now, clipped, with their /proc/self/maps line."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if hi > s and lo < e:
                out.append((max(lo, s), min(hi, e), line.rstrip()))
    return out


class Guard:
    """The owned ranges and the checks (see the module docstring)."""

    def __init__(self) -> None:
        self.owned = Ranges()
        self.lock = threading.RLock()
        self.refused: list[str] = []
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self.lock = threading.RLock()  # another thread may have held it at the fork

    def check(self, what: str, s: int, length: int, *, holes: bool) -> None:
        if s % PAGE or length <= 0 or s + length > 1 << 47:
            return  # the kernel refuses it (EINVAL/ENOMEM) without touching anything
        e = s + _pages(length)
        with self.lock:
            bad = self._trespass(s, e, holes)
        if bad:
            msg = f"{what} of {s:#x}-{e:#x} would touch memory the tests do not own:\n"
            msg += "\n".join(bad)
            self.refused.append(msg)
            raise UnownedMapping(msg)

    def check_write(self, what: str, s: int, length: int) -> None:
        """Refuse a store to bytes above the floor that the tests do not own: if unmapped
        now, the allocator may map them before the store lands (no /proc read: stores
        are many, and a mapped foreign byte is unowned too)."""
        with self.lock:
            bad = [(a, b) for a, b in self.owned.minus(s, s + length) if b > ALLOCATOR_FLOOR]
        if bad:
            msg = (f"{what} of {s:#x}-{s + length:#x} would store to memory the tests do not "
                   "own: " + ", ".join(f"{max(a, ALLOCATOR_FLOOR):#x}-{b:#x}" for a, b in bad))
            self.refused.append(msg)
            raise UnownedMapping(msg)

    def _trespass(self, s: int, e: int, holes: bool) -> list[str]:
        bad = []
        mapped = _mapped(s, e)
        for lo, hi, line in mapped:
            for a, b in self.owned.minus(lo, hi):
                bad.append(f"  {a:#x}-{b:#x} belongs to someone else: {line}")
        if holes:
            at = s
            for lo, hi, _ in mapped + [(e, e, "")]:
                for a, b in self.owned.minus(at, lo):
                    if b > ALLOCATOR_FLOOR:
                        bad.append(f"  {max(a, ALLOCATOR_FLOOR):#x}-{b:#x} is an unowned hole "
                                   "the interpreter's allocator may fill")
                at = max(at, hi)
        return bad

    def wrap(self, libc: Any) -> None:
        """Replace libc's memory calls by checked ones."""
        mmap, munmap, mremap = libc.mmap, libc.munmap, libc.mremap
        mprotect, madvise = libc.mprotect, libc.madvise

        def g_mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1,
                   offset: int = 0) -> int:
            page = _page_size(flags, fd)
            if flags & MAP_FIXED and not flags & MAP_FIXED_NOREPLACE and not addr % page:
                self.check("mmap(MAP_FIXED)", addr, _pages(length, page), holes=True)
            ret = mmap(addr, length, prot, flags, fd, offset)
            with self.lock:
                self.owned.add(ret, ret + _pages(length, page))
            return ret

        def g_munmap(addr: int, length: int) -> None:
            self.check("munmap", addr, length, holes=True)
            munmap(addr, length)
            with self.lock:
                self.owned.remove(addr, addr + _pages(length))

        def g_mremap(old: int, old_len: int, new_len: int, flags: int = 0,
                     new_addr: int = 0) -> int:
            if old_len:
                self.check("mremap (source)", old, old_len, holes=False)
            if flags & MREMAP_FIXED:
                self.check("mremap (MREMAP_FIXED target)", new_addr, new_len, holes=True)
            ret = mremap(old, old_len, new_len, flags, new_addr)
            with self.lock:
                if ret != old and not flags & MREMAP_DONTUNMAP:  # moved: the old range is gone
                    self.owned.remove(old, old + _pages(old_len))
                elif ret == old and new_len < old_len:  # shrunk in place: its tail is gone
                    self.owned.remove(old + _pages(new_len), old + _pages(old_len))
                self.owned.add(ret, ret + _pages(new_len))
            return ret

        def checked(name: str, call: Callable[..., None]) -> Callable[..., None]:
            def g(addr: int, length: int, arg: int) -> None:
                self.check(name, addr, length, holes=False)
                call(addr, length, arg)
            g.__doc__ = call.__doc__
            return g

        for f, orig in ((g_mmap, mmap), (g_munmap, munmap), (g_mremap, mremap)):
            f.__doc__ = orig.__doc__
        libc.mmap, libc.munmap, libc.mremap = g_mmap, g_munmap, g_mremap
        libc.mprotect, libc.madvise = checked("mprotect", mprotect), checked("madvise", madvise)
        libc._mapguard = self

    def wrap_stores(self, libc: Any, access: Any, process: Any) -> None:
        """Check the stores to real memory by address: ``libc.poke_memory``, the access
        helper's writes and the bare-memmove fallback of ``NativeTask.write``."""
        poke, user_write, user_access = libc.poke_memory, access.user_write, access.user_access
        raw_write = process.raw_write

        def g_poke(addr: int, data: bytes) -> None:
            self.check_write("poke_memory", addr, len(data))
            poke(addr, data)

        def g_user_write(addr: int, data: Any) -> None:
            self.check_write("user_write", addr, len(data))
            user_write(addr, data)

        def g_raw_write(addr: int, data: Any) -> None:
            self.check_write("raw_write", addr, len(data))
            raw_write(addr, data)

        def g_user_access(addr: int, length: int, write: bytes | None = None,
                          want_data: bool = False) -> Any:
            if write is not None:
                self.check_write("user_access", addr, length)
            return user_access(addr, length, write, want_data)

        for f, orig in ((g_poke, poke), (g_user_write, user_write), (g_raw_write, raw_write),
                        (g_user_access, user_access)):
            f.__doc__ = orig.__doc__
        libc.poke_memory, access.user_write, access.user_access = g_poke, g_user_write, \
            g_user_access
        process.raw_write = g_raw_write


GUARD = Guard()


def install() -> Guard | None:
    """Guard ``vmemu.native.libc`` for this process; None where it does not exist."""
    try:
        from vmemu.native import access, libc, process
    except (ImportError, OSError):  # not Linux: no native binding, nothing to guard
        return None
    if getattr(libc, "_mapguard", None) is None:
        GUARD.wrap(libc)
        GUARD.wrap_stores(libc, access, process)
    return GUARD
