"""memfd against the real kernel: flags, sizes, pread/pwrite, fallocate, seals, aliasing, SIGBUS.

Each scenario is one function that drives a *side* - the real kernel through
``os`` / :mod:`vmemu.native` calls, or an emulated process - and logs the
outcome of every call: the result, the errno, or the signal with its
``si_code`` and the fault address relative to the mapping. The two logs
must be equal. Mappings are named by their index, never by address.

The hugetlb scenario needs free pages in the host's 2 MiB pool (CI's
``.ci/run`` reserves 64) and skips otherwise; tests never change host
settings.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

import pytest

from tests.differential._kernel import (
    ON_LINUX_X86_64,
    SKIP_REASON,
    native_access_or_skip,
    reserve_low,
)
from vmemu import (
    MADV_COLD,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    MADV_WILLNEED,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
    Signal,
)
from vmemu.constants import MREMAP_FIXED, MREMAP_MAYMOVE, PMD_SIZE
from vmemu.mmu.memfd import (
    F_ADD_SEALS,
    F_GET_SEALS,
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    MFD_ALLOW_SEALING,
    MFD_CLOEXEC,
    MFD_EXEC,
    MFD_HUGETLB,
    MFD_NOEXEC_SEAL,
)

pytestmark = [pytest.mark.differential,
              pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

P = PAGE_SIZE
H = PMD_SIZE
RW = PROT_READ | PROT_WRITE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
FALLOC_FL_COLLAPSE_RANGE = 0x08


class Side:
    """Calls in one vocabulary; ``do`` logs each outcome."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.maps: list[tuple[int, int]] = []  # (addr, length) by index
        self.fds: list[int] = []
        self.reserved: list[tuple[int, int]] = []

    def do(self, name: str, *args: Any) -> Any:
        try:
            result = getattr(self, name)(*args)
            out: tuple[str, Any] = ("ok", result)
        except OSError as e:
            out, result = ("errno", e.errno), None
        self.log.append((name, out))
        return result

    def map(self, length: int, prot: int, flags: int, fd: int, offset: int = 0) -> int:
        self.maps.append((self._mmap(length, prot, flags, fd, offset), length))
        return len(self.maps) - 1

    def at(self, m: int, off: int) -> int:
        return self.maps[m][0] + off

    def unmap(self, m: int) -> None:
        addr, length = self.maps[m]
        self._munmap(addr, length)
        self.maps[m] = (addr, 0)  # gone: close() must not unmap whatever comes there next

    def move(self, m: int, span: int, shift: int) -> None:
        """mremap mapping ``m`` to ``shift`` past a 2 MiB boundary inside a fresh ``span``."""
        addr, length = self.maps[m]
        dst = self._reserve(span)
        to = ((dst + H - 1) & ~(H - 1)) + shift
        self.maps[m] = (self._mremap(addr, length, to), length)

    def get_seals(self, fd: int) -> int:
        return self._fcntl(fd, F_GET_SEALS, 0)

    def add_seals(self, fd: int, seals: int) -> int:
        return self._fcntl(fd, F_ADD_SEALS, seals)

    def getfd(self, fd: int) -> int:
        return self._fcntl(fd, fcntl.F_GETFD, 0)

    def setfd(self, fd: int, flags: int) -> int:
        return self._fcntl(fd, fcntl.F_SETFD, flags)


class Host(Side):
    def __init__(self) -> None:
        super().__init__()
        from vmemu.native import libc

        self.libc, self.access = libc, native_access_or_skip()

    def memfd(self, name: str, flags: int) -> int:
        fd = os.memfd_create(name, flags)
        self.fds.append(fd)
        return len(self.fds) - 1

    def fd(self, i: int) -> int:
        return self.fds[i]

    def ftruncate(self, i: int, n: int) -> None:
        os.ftruncate(self.fds[i], n)

    def fallocate(self, i: int, mode: int, off: int, n: int) -> None:
        self.libc.fallocate(self.fds[i], mode, off, n)

    def pread(self, i: int, n: int, off: int) -> bytes:
        return os.pread(self.fds[i], n, off)

    def pwrite(self, i: int, data: bytes, off: int) -> int:
        return os.pwrite(self.fds[i], data, off)

    def size(self, i: int) -> int:
        return os.fstat(self.fds[i]).st_size

    def _fcntl(self, i: int, cmd: int, arg: int) -> int:
        return fcntl.fcntl(self.fds[i], cmd, arg)

    def _mmap(self, length: int, prot: int, flags: int, i: int, offset: int) -> int:
        return self.libc.mmap(0, length, prot, flags, self.fds[i], offset)

    def _munmap(self, addr: int, length: int) -> None:
        self.libc.munmap(addr, length)

    def _reserve(self, span: int) -> int:
        a = reserve_low(span)
        self.reserved.append((a, span))
        return a

    def _mremap(self, addr: int, length: int, to: int) -> int:
        return self.libc.mremap(addr, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, to)

    def madvise(self, m: int, off: int, n: int, advice: int) -> None:
        self.libc.madvise(self.at(m, off), n, advice)

    def mprotect(self, m: int, off: int, n: int, prot: int) -> None:
        self.libc.mprotect(self.at(m, off), n, prot)

    def touch(self, m: int, off: int, data: bytes | int) -> Any:
        """Write ``data`` or read ``data`` bytes; a signal is logged as (signo, code, offset)."""
        addr = self.at(m, off)
        if isinstance(data, int):
            r = self.access.user_access(addr, data, want_data=True)
        else:
            r = self.access.user_access(addr, len(data), write=data)
        if not r.ok:
            return ("signal", r.signo, r.si_code, r.si_addr - self.maps[m][0])
        return r.data

    def close(self) -> None:
        for addr, length in self.maps + self.reserved:
            if not length:
                continue
            try:
                self.libc.munmap(addr, length)
            except OSError:
                pass
        for fd in self.fds:
            os.close(fd)


class Emu(Side):
    def __init__(self, nr_hugepages: int = 0) -> None:
        super().__init__()
        self.k = Kernel()
        if nr_hugepages:
            self.k.set_nr_hugepages(nr_hugepages)
        self.p = self.k.spawn()

    def memfd(self, name: str, flags: int) -> int:
        self.fds.append(self.p.memfd_create(name, flags))
        return len(self.fds) - 1

    def ftruncate(self, i: int, n: int) -> None:
        self.p.ftruncate(self.fds[i], n)

    def fallocate(self, i: int, mode: int, off: int, n: int) -> None:
        self.p.fallocate(self.fds[i], mode, off, n)

    def pread(self, i: int, n: int, off: int) -> bytes:
        return self.p.pread(self.fds[i], n, off)

    def pwrite(self, i: int, data: bytes, off: int) -> int:
        return self.p.pwrite(self.fds[i], data, off)

    def size(self, i: int) -> int:
        return self.p.fstat_size(self.fds[i])

    def _fcntl(self, i: int, cmd: int, arg: int) -> int:
        return self.p.fcntl(self.fds[i], cmd, arg)

    def _mmap(self, length: int, prot: int, flags: int, i: int, offset: int) -> int:
        return self.p.mmap(0, length, prot, flags, self.fds[i], offset)

    def _munmap(self, addr: int, length: int) -> None:
        self.p.munmap(addr, length)

    def _reserve(self, span: int) -> int:
        return self.p.mmap(0, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)

    def _mremap(self, addr: int, length: int, to: int) -> int:
        return self.p.mremap(addr, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, to)

    def madvise(self, m: int, off: int, n: int, advice: int) -> None:
        self.p.madvise(self.at(m, off), n, advice)

    def mprotect(self, m: int, off: int, n: int, prot: int) -> None:
        self.p.mprotect(self.at(m, off), n, prot)

    def touch(self, m: int, off: int, data: bytes | int) -> Any:
        addr = self.at(m, off)
        try:
            if isinstance(data, int):
                return self.p.read(addr, data)
            self.p.write(addr, data)
            return None
        except Signal as s:
            return ("signal", s.si_signo, s.si_code, s.si_addr - self.maps[m][0])

    def close(self) -> None:
        self.p.check()
        self.p.exit()
        self.k.check()


def run(scenario: Any, **emu_kw: Any) -> None:
    host, emu = Host(), Emu(**emu_kw)
    try:
        scenario(host)
        scenario(emu)
        for n, (h, e) in enumerate(zip(host.log, emu.log, strict=True)):
            assert h == e, f"step {n}: kernel {h}, vmemu {e}"
    finally:
        host.close()
        emu.close()


def flags_and_seal_defaults(s: Side) -> None:
    s.do("memfd", "plain", 0)
    s.do("memfd", "bad", 0x100)
    s.do("memfd", "both", MFD_EXEC | MFD_NOEXEC_SEAL)
    s.do("memfd", "x" * 250, 0)
    i = s.do("memfd", "x" * 249, 0)
    s.do("get_seals", i)
    s.do("add_seals", i, F_SEAL_GROW)
    s.do("memfd", "sizebits", 21 << 26)  # a huge size without MFD_HUGETLB
    for flags in (MFD_ALLOW_SEALING, MFD_NOEXEC_SEAL, MFD_EXEC | MFD_ALLOW_SEALING, MFD_EXEC):
        j = s.do("memfd", "f", flags)
        s.do("get_seals", j)
    c = s.do("memfd", "cloexec", MFD_CLOEXEC | MFD_ALLOW_SEALING)
    s.do("getfd", c)  # FD_CLOEXEC
    s.do("getfd", i)
    s.do("setfd", i, fcntl.FD_CLOEXEC)
    s.do("getfd", i)
    s.do("setfd", c, 0)
    s.do("getfd", c)
    s.do("memfd", "h", MFD_HUGETLB)
    s.do("memfd", "h2m", MFD_HUGETLB | 21 << 26)
    s.do("memfd", "h4m", MFD_HUGETLB | 22 << 26)  # no such hstate: ENODEV
    s.do("memfd", "h4k", MFD_HUGETLB | 12 << 26)
    if os.path.isdir("/sys/kernel/mm/hugepages/hugepages-1048576kB"):
        s.do("memfd", "h1g", MFD_HUGETLB | 30 << 26)


def file_io(s: Side) -> None:
    f = s.do("memfd", "io", 0)
    s.do("ftruncate", f, 3 * P + 100)
    s.do("pwrite", f, b"hello", 5000)
    s.do("pread", f, 10, 4998)
    s.do("pread", f, 10, 3 * P + 95)  # stops at EOF
    s.do("pread", f, 10, 4 * P)  # beyond EOF: nothing
    s.do("pwrite", f, b"far", 6 * P + 1)  # grows the file
    s.do("size", f)
    s.do("pread", f, 8, 5 * P)  # a hole reads zeros
    s.do("ftruncate", f, -1)
    s.do("fallocate", f, 0, 7 * P, 10)
    s.do("size", f)
    s.do("fallocate", f, FALLOC_FL_KEEP_SIZE, 9 * P, P)
    s.do("size", f)
    s.do("fallocate", f, FALLOC_FL_PUNCH_HOLE, 0, P)
    s.do("fallocate", f, FALLOC_FL_COLLAPSE_RANGE, 0, P)
    s.do("fallocate", f, PUNCH, 0, 0)
    s.do("fallocate", f, PUNCH, 5001, 2)  # zeroes "l" "l" inside the page
    s.do("pread", f, 6, 4999)
    s.do("ftruncate", f, 5002)  # the tail of the last page is zeroed
    s.do("ftruncate", f, 2 * P)
    s.do("pread", f, 5, 5000)


def aliasing_and_eof(s: Side) -> None:
    f = s.do("memfd", "alias", 0)
    s.do("ftruncate", f, 2 * P + 100)
    m1 = s.do("map", 4 * P, RW, MAP_SHARED, f)
    m2 = s.do("map", 4 * P, RW, MAP_SHARED, f)
    m3 = s.do("map", 3 * P, RW, MAP_PRIVATE, f)
    m4 = s.do("map", 2 * P, RW, MAP_SHARED, f, P)  # file offset one page in
    s.do("touch", m1, 100, b"abc")
    s.do("touch", m2, 100, 3)
    s.do("touch", m3, 100, 3)
    s.do("pread", f, 3, 100)
    s.do("touch", m4, 7, b"via m4")
    s.do("touch", m1, P + 7, 6)
    s.do("pwrite", f, b"by pwrite", 2 * P + 10)
    s.do("touch", m1, 2 * P + 10, 9)
    s.do("touch", m3, 2 * P + 10, 9)
    s.do("touch", m3, 50, b"private")  # COW: the file does not see it
    s.do("touch", m1, 50, 7)
    s.do("pwrite", f, b"later", 52)
    s.do("touch", m3, 50, 7)  # still the private copy
    s.do("pwrite", f, b"seen", P + 20)  # page 1 of m3 is not COWed yet
    s.do("touch", m3, P + 20, 4)
    s.do("touch", m1, 2 * P + 200, 4)  # inside the last page, past EOF: zeros
    s.do("touch", m1, 3 * P + 5, 1)  # a page wholly past EOF: SIGBUS
    s.do("touch", m2, 3 * P, b"w")
    s.do("touch", m3, 2 * P + 4000, 1)
    s.do("ftruncate", f, P + 10)
    s.do("touch", m2, P + 5, 10)  # the tail of the new last page reads zero
    s.do("touch", m2, P + 30, b"past EOF")  # beyond i_size inside the last page: allowed
    s.do("touch", m1, P + 30, 8)
    s.do("ftruncate", f, P + 10)  # the same size: the tail is zeroed again
    s.do("touch", m1, P + 30, 8)
    s.do("touch", m1, 2 * P, 1)
    s.do("touch", m3, 2 * P, 1)
    s.do("touch", m3, 50, 7)  # a private COW copy inside the new size stays
    s.do("ftruncate", f, 3 * P)
    s.do("touch", m1, 2 * P + 10, 9)
    s.do("madvise", m1, 0, P, MADV_DONTNEED)  # shmem: refault from the page cache
    s.do("touch", m1, 100, 3)
    s.do("touch", m3, 60, b"cow again")
    s.do("madvise", m3, 0, P, MADV_DONTNEED)  # the private copy goes, the file shows again
    s.do("touch", m3, 60, 9)
    s.do("madvise", m1, P, P, MADV_REMOVE)  # punches the file
    s.do("pread", f, 8, P + 5)
    s.do("touch", m4, 5, 8)
    s.do("madvise", m3, 0, P, MADV_REMOVE)  # private: EACCES
    s.do("madvise", m1, 0, P, MADV_FREE)  # shared: EINVAL
    s.do("fallocate", f, PUNCH, 90, 20)
    s.do("touch", m2, 88, 24)
    for advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE, MADV_WILLNEED, MADV_COLD,
                   MADV_PAGEOUT):
        s.do("madvise", m1, 0, 4 * P, advice)  # the 4th page is past EOF
        s.do("madvise", m3, 0, 3 * P, advice)
        s.do("touch", m1, 88, 24)
        s.do("touch", m3, 55, 10)
    s.do("pread", f, 3 * P, 0)


def mremap_shmem(s: Side) -> None:
    """A 4 MiB shared mapping moved to a 2 MiB-aligned place (whole PTE tables move) stays
    an alias of the file and of a second mapping."""
    f = s.do("memfd", "move", 0)
    s.do("ftruncate", f, 2 * H)
    m = s.do("map", 2 * H, RW, MAP_SHARED, f)
    other = s.do("map", 2 * H, RW, MAP_SHARED, f)
    for off in (0, H - 5, H + 3 * P, 2 * H - 16):
        s.do("touch", m, off, b"before move")
    s.do("move", m, 6 * H, 0)
    s.do("move", other, 6 * H, P)  # unaligned: table by table is impossible, PTEs move
    for off in (0, H - 5, H + 3 * P, 2 * H - 16):
        s.do("touch", m, off, 11)
        s.do("touch", other, off, 11)
    s.do("touch", m, H + 3 * P, b"after")
    s.do("touch", other, H + 3 * P, 11)
    s.do("pread", f, 11, H + 3 * P)


def seals(s: Side) -> None:
    f = s.do("memfd", "seals", MFD_ALLOW_SEALING)
    s.do("ftruncate", f, 2 * P)
    s.do("add_seals", f, 0x1000)  # unknown seal
    s.do("add_seals", f, F_SEAL_SHRINK)
    s.do("ftruncate", f, P)
    s.do("ftruncate", f, 3 * P)
    s.do("add_seals", f, F_SEAL_GROW)
    s.do("ftruncate", f, 4 * P)
    s.do("ftruncate", f, 3 * P)
    s.do("pwrite", f, b"x", 3 * P)  # would grow
    s.do("ftruncate", f, 3 * P - 10)
    s.do("pwrite", f, b"g" * 2 * P, P)  # writes the pages before the one that would grow
    s.do("pwrite", f, b"h" * P, P + 100)
    s.do("pread", f, 3 * P, 0)
    s.do("size", f)
    s.do("ftruncate", f, 3 * P)
    s.do("pwrite", f, b"inside", 10)
    s.do("fallocate", f, 0, 3 * P, P)
    s.do("fallocate", f, FALLOC_FL_KEEP_SIZE, 3 * P, P)
    m = s.do("map", 3 * P, RW, MAP_SHARED, f)
    s.do("add_seals", f, F_SEAL_WRITE)  # a writable shared mapping exists
    s.do("unmap", m)
    ro = s.do("map", 3 * P, PROT_READ, MAP_SHARED, f)
    s.do("add_seals", f, F_SEAL_WRITE)  # read-only, but VM_MAYWRITE: still EBUSY
    s.do("unmap", ro)
    s.do("add_seals", f, F_SEAL_WRITE)
    ro = s.do("map", 3 * P, PROT_READ, MAP_SHARED, f)
    s.do("get_seals", f)
    s.do("pwrite", f, b"no", 0)
    s.do("fallocate", f, PUNCH, 0, P)
    s.do("map", P, RW, MAP_SHARED, f)
    pm = s.do("map", P, RW, MAP_PRIVATE, f)
    s.do("touch", pm, 0, b"private is fine")
    s.do("mprotect", ro, 0, P, RW)  # VM_MAYWRITE was taken away
    s.do("touch", ro, 10, 6)
    s.do("add_seals", f, F_SEAL_SEAL)
    s.do("add_seals", f, F_SEAL_FUTURE_WRITE)
    s.do("get_seals", f)
    g = s.do("memfd", "future", MFD_ALLOW_SEALING)
    s.do("ftruncate", g, P)
    w = s.do("map", P, RW, MAP_SHARED, g)
    s.do("add_seals", g, F_SEAL_FUTURE_WRITE)  # allowed with a writable mapping
    s.do("touch", w, 0, b"old mapping still writes")
    s.do("pread", g, 24, 0)
    s.do("pwrite", g, b"no", 0)
    s.do("map", P, RW, MAP_SHARED, g)
    s.do("map", P, PROT_READ, MAP_SHARED, g)
    h = s.do("memfd", "unsealable", 0)
    s.do("add_seals", h, F_SEAL_SHRINK)
    s.do("add_seals", h, F_SEAL_SEAL)


@pytest.mark.parametrize("scenario", [flags_and_seal_defaults, file_io, aliasing_and_eof, seals,
                                      mremap_shmem],
                         ids=lambda f: f.__name__)
def test_memfd_matches_the_kernel(scenario) -> None:
    run(scenario)


def _host_free_hugepages() -> int:
    try:
        free = rsvd = 0
        for line in open("/proc/meminfo"):
            if line.startswith("HugePages_Free:"):
                free = int(line.split()[1])
            if line.startswith("HugePages_Rsvd:"):
                rsvd = int(line.split()[1])
        size = int(open("/proc/meminfo").read().split("Hugepagesize:")[1].split()[0])
        return free - rsvd if size == 2048 else 0
    except (OSError, IndexError, ValueError):
        return 0


def hugetlb_memfd(s: Side) -> None:
    f = s.do("memfd", "huge", MFD_HUGETLB)
    s.do("ftruncate", f, P)  # hugetlbfs sizes are whole huge pages
    s.do("ftruncate", f, H + P)
    s.do("ftruncate", f, 2 * H)
    s.do("size", f)
    s.do("pwrite", f, b"xyz", 0)  # hugetlbfs has no write_iter
    m = s.do("map", 2 * H, RW, MAP_SHARED, f)
    for off in (0, H - 8 * P, 2 * H - 4 * P):
        s.do("touch", m, off, b"a" * (4 * P if off == 2 * H - 4 * P else 16 * P))
    pm = s.do("map", 2 * H, RW, MAP_PRIVATE, f)
    s.do("touch", pm, H + 2 * P, b"cow")  # a private copy of the whole second huge page
    s.do("pread", f, 4, H - 2)
    s.do("pread", f, 4, 2 * H - 2)  # stops at EOF
    s.do("fallocate", f, PUNCH, P, 2 * P)  # zeroes inside the first huge page
    s.do("touch", m, P - 1, 2 * P + 2)
    s.do("fallocate", f, PUNCH, H - P, 2 * P)  # across the boundary: zeroes both sides
    s.do("touch", m, H - P - 1, 2 * P + 2)
    s.do("pread", f, 8, H - 4)
    s.do("touch", pm, H, 8)  # a partial punch leaves the private copy alone
    s.do("touch", pm, H + 2 * P, 3)
    s.do("fallocate", f, PUNCH, 0, H)  # the whole first huge page goes
    s.do("touch", m, 0, 4)
    s.do("touch", m, H - 8 * P, 4)
    s.do("fallocate", f, PUNCH, H - P, H + P)  # the whole second huge page: private copies go
    s.do("touch", pm, H + 2 * P, 3)
    s.do("touch", pm, 2 * H - 4 * P, 1)
    s.do("fallocate", f, 0, 2 * H, P)  # grows i_size to an unaligned size
    s.do("size", f)
    s.do("ftruncate", f, H)
    s.do("touch", m, H + 5, 1)  # past EOF: SIGBUS
    s.do("map", H, RW, MAP_SHARED, f, P)  # unaligned offset
    n = s.do("map", P, RW, MAP_SHARED, f)  # the length is rounded up to a huge page
    s.do("touch", n, H - 1, b"z")
    s.do("pread", f, 1, H - 1)
    s.do("unmap", n)


def hugetlb_same_size_truncate(s: Side) -> None:
    """ftruncate to the same size drops pages fallocated beyond EOF, on hugetlbfs too."""
    f = s.do("memfd", "huge", MFD_HUGETLB)
    s.do("ftruncate", f, H)
    s.do("fallocate", f, FALLOC_FL_KEEP_SIZE, 2 * H, H)
    s.do("ftruncate", f, H)
    s.do("ftruncate", f, 3 * H)
    pm = s.do("map", 3 * H, PROT_READ, MAP_PRIVATE, f)
    s.do("touch", pm, 2 * H, 4)  # a hole again: the private mapping gets a page of its own
    m = s.do("map", 3 * H, RW, MAP_SHARED, f)
    s.do("touch", m, 2 * H, b"s")
    s.do("touch", pm, 2 * H, 4)  # not the page cache's: the write is not seen


@pytest.mark.skipif(_host_free_hugepages() < 6, reason="host 2 MiB hugetlb pool has < 6 free pages")
def test_hugetlb_same_size_truncate_matches_the_kernel() -> None:
    run(hugetlb_same_size_truncate, nr_hugepages=6)


@pytest.mark.skipif(_host_free_hugepages() < 6, reason="host 2 MiB hugetlb pool has < 6 free pages")
def test_hugetlb_memfd_matches_the_kernel() -> None:
    run(hugetlb_memfd, nr_hugepages=6)  # the private mapping reserves two pages of its own
