"""Random operation sequences on a 2-huge-page hugetlb mapping, against the real kernel.

A private or shared MAP_HUGETLB mapping of two 2 MiB pages gets random
writes, madvise advice, mprotect, munmap and mremap over ranges that are
huge-page aligned or not (the alignment errnos are part of the test).
After every step both sides must agree on the errno, the VMA layout and,
at pages around the huge-page boundaries, on what a read gives (bytes, or
the signal and si_code). Needs free pages in the host's 2 MiB pool (CI's
``.ci/run`` reserves 64); skips otherwise.
"""

from __future__ import annotations

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
    MADV_FREE,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    MADV_WILLNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_HUGETLB,
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

pytestmark = [pytest.mark.differential,
              pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

P = PAGE_SIZE
H = PMD_SIZE
RW = PROT_READ | PROT_WRITE
SPAN = 6 * H  # the reservation: the mapping sits at +H, moves may go up to +5H
SAMPLES = [0, 1, 511, 512, 513, 1023]  # 4 KiB pages of the two huge pages


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


def _layout(maps_text: str, lo: int) -> list[tuple[int, int, str]]:
    out = []
    for line in maps_text.splitlines():
        rng, perms = line.split()[:2]
        s, e = (int(x, 16) for x in rng.split("-"))
        if e <= lo or s >= lo + SPAN:
            continue
        out.append(((max(s, lo) - lo) // P, (min(e, lo + SPAN) - lo) // P, perms))
    return out


class Side:
    lo: int

    def at(self, off: int) -> int:
        return self.lo + H + off

    def view(self) -> tuple:
        lay = self._layout()
        data = []
        for pg in SAMPLES:
            data.append(self._read(self.at(pg * P)))
        return lay, data


class Host(Side):
    def __init__(self, flags: int) -> None:
        from vmemu.native import libc

        self.libc, self.access = libc, native_access_or_skip()
        raw = reserve_low(SPAN + H)
        self.raw = raw
        self.lo = (raw + H - 1) & ~(H - 1)
        libc.mmap(self.at(0), 2 * H, RW, flags | MAP_FIXED)
        libc.poke_memory(self.at(0), b"first")
        libc.poke_memory(self.at(H + 5 * P), b"second")

    def op(self, name: str, *a: int) -> int:
        try:
            if name == "touch":
                r = self.access.user_access(self.at(a[0]), 4, write=b"T%03d" % a[1])
                return 0 if r.ok else -r.signo
            if name == "mremap":
                self.libc.mremap(self.at(a[0]), a[1], a[2], MREMAP_MAYMOVE | MREMAP_FIXED,
                                 self.at(a[3]))
            else:
                getattr(self.libc, name)(self.at(a[0]), *a[1:])
            return 0
        except OSError as e:
            return e.errno or -1

    def _layout(self) -> list:
        return _layout(open("/proc/self/maps").read(), self.lo)

    def _read(self, addr: int) -> object:
        r = self.access.user_access(addr, 8, want_data=True)
        return r.data if r.ok else (r.signo, r.si_code)

    def close(self) -> None:
        self.libc.munmap(self.raw, SPAN + H)


class Emu(Side):
    def __init__(self, flags: int) -> None:
        self.k = Kernel()
        self.k.set_nr_hugepages(8)
        self.p = self.k.spawn()
        self.lo = (self.p.mmap(0, SPAN + H, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS) + H - 1) \
            & ~(H - 1)
        self.p.mmap(self.at(0), 2 * H, RW, flags | MAP_FIXED)
        self.p.write(self.at(0), b"first")
        self.p.write(self.at(H + 5 * P), b"second")

    def op(self, name: str, *a: int) -> int:
        try:
            if name == "touch":
                self.p.write(self.at(a[0]), b"T%03d" % a[1])
            elif name == "mremap":
                self.p.mremap(self.at(a[0]), a[1], a[2], MREMAP_MAYMOVE | MREMAP_FIXED,
                              self.at(a[3]))
            else:
                getattr(self.p, name)(self.at(a[0]), *a[1:])
            return 0
        except OSError as e:
            return e.errno or -1
        except Signal as s:
            return -s.si_signo

    def _layout(self) -> list:
        return _layout(self.p.maps(), self.lo)

    def _read(self, addr: int) -> object:
        try:
            return self.p.read(addr, 8)
        except Signal as s:
            return (s.si_signo, s.si_code)


OFFS = [0, P, H - P, H, H + P]
LENS = [P, H, H + P, 2 * H]
ADVICE = [MADV_DONTNEED, MADV_REMOVE, MADV_WILLNEED, MADV_POPULATE_READ, MADV_POPULATE_WRITE,
          MADV_COLD, MADV_PAGEOUT, MADV_FREE]


@st.composite
def operation(draw) -> tuple:
    off = draw(st.sampled_from(OFFS))
    length = draw(st.sampled_from(LENS))
    kind = draw(st.sampled_from(["touch", "touch", "madvise", "madvise", "mprotect", "munmap",
                                 "mremap"]))
    if kind == "touch":
        return ("touch", draw(st.sampled_from([0, 5, P + 3, H - 4, H, 2 * H - 4])),
                draw(st.integers(0, 999)))
    if kind == "madvise":
        return ("madvise", off, length, draw(st.sampled_from(ADVICE)))
    if kind == "mprotect":
        return ("mprotect", off, length, draw(st.sampled_from([PROT_READ, RW, PROT_NONE])))
    if kind == "mremap":
        return ("mremap", off, length, draw(st.sampled_from(LENS)),
                draw(st.sampled_from([2 * H, 3 * H, 2 * H + P])))
    return ("munmap", off, length)


@pytest.mark.skipif(_host_free_hugepages() < 8, reason="host 2 MiB hugetlb pool has < 8 free pages")
@pytest.mark.parametrize("flags", [MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB,
                                   MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB],
                         ids=["private", "shared"])
@settings(max_examples=max(5, settings().max_examples // 10),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation(), min_size=1, max_size=6))
def test_hugetlb_sequences_match_the_kernel(flags, ops) -> None:
    host = Host(flags)
    try:
        start = host.view()
        host_steps = [(host.op(*op), host.view()) for op in ops]
    finally:
        host.close()
    emu = Emu(flags)
    assert emu.view() == start
    for n, (op, (herr, hview)) in enumerate(zip(ops, host_steps, strict=True)):
        eerr = emu.op(*op)
        eview = emu.view()
        where = f"step {n} {op}"
        assert eerr == herr, f"{where}: errno kernel {herr}, vmemu {eerr}"
        assert eview[0] == hview[0], f"{where}: layout"
        assert eview[1] == hview[1], f"{where}: contents at pages {SAMPLES}"
        emu.p.check()
