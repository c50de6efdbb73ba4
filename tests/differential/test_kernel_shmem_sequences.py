"""Random operation sequences on one memfd mapped three times, against the real kernel.

A memfd of 8 pages is mapped MAP_SHARED twice (``s0``, ``s1``, the second at
file offset one page) and MAP_PRIVATE once (``pv``), each 8 pages long.
Random steps write through a mapping, pwrite, ftruncate, punch holes,
advise (DONTNEED, REMOVE, PAGEOUT, COLD, WILLNEED, POPULATE_READ/WRITE),
mprotect or munmap part of a mapping, or fork a child that writes through
one mapping and exits (seen through the shared ones, not the private one). After every step both sides must
agree on the errno and, for every page of every mapping, on what a read
gives: the first bytes, or the signal and its si_code (SIGBUS BUS_ADRERR
beyond EOF, SIGSEGV where unmapped or protected), plus the file's size and
contents through pread - and, taken before those reads, the pagemap present
bit of every page (the mappings sit at the same offset from a 2 MiB
boundary on both sides, so read faults fault around the same windows).

The host has no swap (PAGEOUT keeps shmem pages); vmemu runs without swap.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.differential._kernel import (
    ON_LINUX_X86_64,
    SKIP_REASON,
    native_access_or_skip,
    reserve_low,
)
from vmemu import (
    MADV_COLD,
    MADV_DONTNEED,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    MADV_WILLNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
    Signal,
)
from vmemu.constants import PMD_SIZE
from vmemu.mmu import PM_PRESENT
from vmemu.mmu.memfd import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

pytestmark = [pytest.mark.differential,
              pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

P = PAGE_SIZE
N = 8
RW = PROT_READ | PROT_WRITE
MAPS = [("s0", MAP_SHARED, 0), ("s1", MAP_SHARED, 1), ("pv", MAP_PRIVATE, 0)]
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
H = PMD_SIZE
SPAN = 5 * H


def _slot(raw: int, j: int) -> int:
    """Mapping ``j`` sits 3 pages past the (j+1)-th 2 MiB boundary: same fault-around windows."""
    return ((raw + H - 1) & ~(H - 1)) + j * H + 3 * P


def _host_has_swap() -> bool:
    try:
        return len(open("/proc/swaps").read().splitlines()) > 1
    except OSError:
        return True


class Host:
    def __init__(self) -> None:
        from vmemu.native import libc

        self.libc, self.access = libc, native_access_or_skip()
        self.fd = os.memfd_create("seq")
        os.ftruncate(self.fd, N * P)
        self.raw = reserve_low(SPAN)
        self.maps = [libc.mmap(_slot(self.raw, j), N * P, RW, flags | MAP_FIXED, self.fd, pg * P)
                     for j, (_n, flags, pg) in enumerate(MAPS)]
        for i in range(N):
            os.pwrite(self.fd, b"file%03d" % i, i * P)

    def op(self, name: str, *a: int) -> int:
        try:
            if name == "touch":
                r = self.access.user_access(self.maps[a[0]] + a[1] * P + 8, 4, write=b"T%03d" % a[2])
                return 0 if r.ok else -r.signo
            if name == "fork":  # a child writes through one mapping and exits
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        r = self.access.user_access(self.maps[a[0]] + a[1] * P + 8, 4,
                                                    write=b"C%03d" % a[2])
                        code = 0 if r.ok else 2
                    except BaseException:  # noqa: BLE001 - reported through the exit status
                        code = 1
                    os._exit(code)
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                assert code != 1, "kernel-side child failed"
                return -code
            if name == "pwrite":
                os.pwrite(self.fd, b"P%03d" % a[1], a[0] * P + 12)
            elif name == "ftruncate":
                os.ftruncate(self.fd, a[0])
            elif name == "punch":
                self.libc.fallocate(self.fd, PUNCH, a[0], a[1])
            elif name == "madvise":
                self.libc.madvise(self.maps[a[0]] + a[1] * P, a[2] * P, a[3])
            elif name == "mprotect":
                self.libc.mprotect(self.maps[a[0]] + a[1] * P, a[2] * P, a[3])
            elif name == "munmap":
                self.libc.munmap(self.maps[a[0]] + a[1] * P, a[2] * P)
            return 0
        except OSError as e:
            return e.errno or -1

    def view(self) -> tuple:
        pages = []
        for base in self.maps:
            for i in range(N):
                r = self.access.user_access(base + i * P, 16, want_data=True)
                pages.append(r.data if r.ok else (r.signo, r.si_code, r.si_addr - base - i * P))
        size = os.fstat(self.fd).st_size
        return size, os.pread(self.fd, size, 0), pages

    def present(self) -> list[bool]:
        out = []
        with open("/proc/self/pagemap", "rb") as f:
            for base in self.maps:
                f.seek(base // P * 8)
                raw = f.read(8 * N)
                out += [bool(int.from_bytes(raw[i * 8:i * 8 + 8], "little") & PM_PRESENT)
                        for i in range(N)]
        return out

    def close(self) -> None:
        self.libc.munmap(self.raw, SPAN)
        os.close(self.fd)


class Emu:
    def __init__(self) -> None:
        self.k = Kernel()
        self.p = self.k.spawn()
        self.fd = self.p.memfd_create("seq")
        self.p.ftruncate(self.fd, N * P)
        raw = self.p.mmap(0, SPAN, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
        self.maps = [self.p.mmap(_slot(raw, j), N * P, RW, flags | MAP_FIXED, self.fd, pg * P)
                     for j, (_n, flags, pg) in enumerate(MAPS)]
        for i in range(N):
            self.p.pwrite(self.fd, b"file%03d" % i, i * P)

    def op(self, name: str, *a: int) -> int:
        p = self.p
        try:
            if name == "touch":
                p.write(self.maps[a[0]] + a[1] * P + 8, b"T%03d" % a[2])
            elif name == "fork":
                child = p.fork()
                try:
                    child.write(self.maps[a[0]] + a[1] * P + 8, b"C%03d" % a[2])
                except Signal:
                    return -2
                finally:
                    self.k.check()
                    child.exit()
            elif name == "pwrite":
                p.pwrite(self.fd, b"P%03d" % a[1], a[0] * P + 12)
            elif name == "ftruncate":
                p.ftruncate(self.fd, a[0])
            elif name == "punch":
                p.fallocate(self.fd, PUNCH, a[0], a[1])
            elif name == "madvise":
                p.madvise(self.maps[a[0]] + a[1] * P, a[2] * P, a[3])
            elif name == "mprotect":
                p.mprotect(self.maps[a[0]] + a[1] * P, a[2] * P, a[3])
            elif name == "munmap":
                p.munmap(self.maps[a[0]] + a[1] * P, a[2] * P)
            return 0
        except OSError as e:
            return e.errno or -1
        except Signal as s:
            return -s.si_signo

    def view(self) -> tuple:
        pages = []
        for base in self.maps:
            for i in range(N):
                try:
                    pages.append(self.p.read(base + i * P, 16))
                except Signal as s:
                    pages.append((s.si_signo, s.si_code, s.si_addr - base - i * P))
        size = self.p.fstat_size(self.fd)
        return size, self.p.pread(self.fd, size, 0), pages

    def present(self) -> list[bool]:
        return [bool(self.p.pagemap(base + i * P) & PM_PRESENT) for base in self.maps
                for i in range(N)]


ADVICE = [MADV_DONTNEED, MADV_REMOVE, MADV_PAGEOUT, MADV_COLD, MADV_WILLNEED,
          MADV_POPULATE_READ, MADV_POPULATE_WRITE]
SIZES = [0, 100, P, 3 * P + 5, 5 * P, N * P, N * P + 7, 10 * P]


@st.composite
def operation(draw) -> tuple:
    m = draw(st.integers(0, len(MAPS) - 1))
    page = draw(st.integers(0, N - 1))
    n = draw(st.integers(1, N - page))
    kind = draw(st.sampled_from(["touch", "touch", "pwrite", "ftruncate", "punch", "madvise",
                                 "madvise", "mprotect", "munmap", "fork"]))
    if kind in ("touch", "fork"):
        return (kind, m, page, draw(st.integers(0, 999)))
    if kind == "pwrite":
        return ("pwrite", page, draw(st.integers(0, 999)))
    if kind == "ftruncate":
        return ("ftruncate", draw(st.sampled_from(SIZES)))
    if kind == "punch":
        return ("punch", draw(st.sampled_from([0, 10, P, 2 * P + 100])),
                draw(st.sampled_from([1, 50, P, 2 * P, 3 * P - 30])))
    if kind == "madvise":
        return ("madvise", m, page, n, draw(st.sampled_from(ADVICE)))
    if kind == "mprotect":
        return ("mprotect", m, page, n, draw(st.sampled_from([PROT_READ, RW])))
    return ("munmap", m, page, n)


@pytest.mark.skipif(_host_has_swap(), reason="the sequences assume the host has no swap")
@settings(max_examples=max(10, settings().max_examples // 4),
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operation(), min_size=1, max_size=8))
def test_shmem_sequences_match_the_kernel(ops) -> None:
    host = Host()
    try:
        start = host.view()
        host_steps = []
        for op in ops:
            err = host.op(*op)
            bits = host.present()
            host_steps.append((err, bits, host.view()))
    finally:
        host.close()
    emu = Emu()
    assert emu.view() == start
    for n, (op, (herr, hbits, hview)) in enumerate(zip(ops, host_steps, strict=True)):
        eerr = emu.op(*op)
        ebits = emu.present()
        eview = emu.view()
        where = f"step {n} {op}"
        assert eerr == herr, f"{where}: errno kernel {herr}, vmemu {eerr}"
        assert ebits == hbits, f"{where}: pagemap present bits (before the reads of the view)"
        assert eview[:2] == hview[:2], f"{where}: file size or contents"
        for i, (h, e) in enumerate(zip(hview[2], eview[2], strict=True)):
            assert e == h, f"{where}: {MAPS[i // N][0]} page {i % N}: kernel {h!r}, vmemu {e!r}"
        emu.p.check()
