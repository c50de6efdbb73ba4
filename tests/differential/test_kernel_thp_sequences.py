"""Random operation sequences on two THPs, against the real kernel.

Each example maps 4 MiB (two 2 MiB-aligned THPs, MADV_HUGEPAGE, every page
written), then applies a short random sequence of writes, madvise advice
(DONTNEED, FREE, PAGEOUT, COLD, COLLAPSE, HUGEPAGE, NOHUGEPAGE, WILLNEED,
POPULATE_WRITE), mprotect, munmap and mremap moves inside the region, over
ranges chosen around the THP boundaries. After every step both sides must agree on the errno, the VMA
layout, the AnonHugePages total, the pagemap present bit of each page and
the first bytes of each readable page. Some examples then fork: the child
writes a few pages (COW of a shared THP splits its PMD and copies one page)
and both processes' views are compared too.

The kernel side runs first and fast (only snapshots), so khugepaged - which
wakes every 10 s and may collapse PTE-mapped ranges behind our back - has
little chance to interfere; an example during which its ``pages_collapsed``
counter moved is discarded. The host has no swap; vmemu runs without one.
The test pins itself to one CPU for the per-CPU lazyfree batch (see
test_kernel_pageout.py).
"""

from __future__ import annotations

import os
import pickle

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.differential._kernel import (
    ON_LINUX_X86_64,
    SKIP_REASON,
    native_access_or_skip,
    reserve_low,
)
from vmemu import (
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MADV_PAGEOUT,
    MADV_POPULATE_WRITE,
    MADV_WILLNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
)
from vmemu.constants import MREMAP_FIXED, MREMAP_MAYMOVE, PMD_SIZE
from vmemu.mmu import PM_PRESENT

pytestmark = [pytest.mark.differential,
              pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

P = PAGE_SIZE
H = PMD_SIZE
N = 1024  # pages: two THPs
RW = PROT_READ | PROT_WRITE
PRIV = MAP_PRIVATE | MAP_ANONYMOUS
KHUGEPAGED = "/sys/kernel/mm/transparent_hugepage/khugepaged/pages_collapsed"


def _host_thp_policy() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text.split("[")[1].split("]")[0]


def _host_has_swap() -> bool:
    try:
        return len(open("/proc/swaps").read().splitlines()) > 1
    except OSError:
        return True


def _khugepaged_collapsed() -> int:
    try:
        return int(open(KHUGEPAGED).read())
    except OSError:
        return 0


def stamp(i: int) -> bytes:
    return bytes([i & 0xFF or 1, (i >> 8) + 1]) * 4


def _layout(maps_text: str, base: int) -> list[tuple[int, int, str]]:
    out = []
    for line in maps_text.splitlines():
        rng, perms = line.split()[:2]
        s, e = (int(x, 16) for x in rng.split("-"))
        if e <= base or s >= base + N * P:
            continue
        out.append(((max(s, base) - base) // P, (min(e, base + N * P) - base) // P, perms))
    return out


def _anon_huge(smaps: str, base: int) -> int:
    total, inside = 0, False
    for line in smaps.splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            s, e = (int(x, 16) for x in head.split("-"))
            inside = s < base + N * P and e > base
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


class Host:
    def __init__(self) -> None:
        from vmemu.native import libc

        self.libc, self.access = libc, native_access_or_skip()
        self.raw = reserve_low(N * P + 2 * H)
        self.base = (self.raw + H - 1) & ~(H - 1)
        libc.mmap(self.base, N * P, RW, PRIV | MAP_FIXED)
        libc.madvise(self.base, N * P, MADV_HUGEPAGE)
        for i in range(N):
            libc.poke_memory(self.base + i * P, stamp(i))

    def op(self, name: str, *args: int) -> int:
        try:
            if name == "write":
                r = self.access.user_access(self.base + args[0] * P, 4, write=b"W%03d" % args[1])
                return 0 if r.ok else -r.signo
            if name == "mremap":
                self.libc.mremap(self.base + args[0] * P, args[1] * P, args[1] * P,
                                 MREMAP_MAYMOVE | MREMAP_FIXED, self.base + args[2] * P)
                return 0
            fn = getattr(self.libc, name)
            fn(self.base + args[0] * P, args[1] * P, *args[2:])
            return 0
        except OSError as e:
            return e.errno or -1

    def view(self) -> tuple:
        maps = open("/proc/self/maps").read()
        lay = _layout(maps, self.base)
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(self.base // P * 8)
            raw = f.read(8 * N)
        present = [bool(int.from_bytes(raw[i * 8:i * 8 + 8], "little") & PM_PRESENT)
                   for i in range(N)]
        readable = {p for s, e, perms in lay if perms[0] == "r" for p in range(s, e)}
        data = [self.libc.peek_memory(self.base + i * P, 8) if i in readable else None
                for i in range(N)]
        return lay, _anon_huge(open("/proc/self/smaps").read(), self.base), present, data

    def fork_view(self, writes: list[int]) -> tuple:
        """Fork; the child writes at ``writes`` and reports its view; then the parent's view."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 0
            try:
                os.close(r)
                errs = [self.op("write", pg, 777) for pg in writes]
                with os.fdopen(w, "wb") as f:
                    f.write(pickle.dumps((errs, self.view())))
            except BaseException:  # noqa: BLE001 - reported through the exit status
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            child = pickle.loads(f.read())
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "kernel-side child failed"
        return child, self.view()

    def close(self) -> None:
        self.libc.munmap(self.raw, N * P + 2 * H)


class Emu:
    def __init__(self) -> None:
        self.k = Kernel()
        self.k.thp_enabled = _host_thp_policy()
        self.p = self.k.spawn()
        self.raw = self.p.mmap(0, N * P + 2 * H, PROT_NONE, PRIV)
        self.base = (self.raw + H - 1) & ~(H - 1)
        self.p.mmap(self.base, N * P, RW, PRIV | MAP_FIXED)
        self.p.madvise(self.base, N * P, MADV_HUGEPAGE)
        for i in range(N):
            self.p.write(self.base + i * P, stamp(i))

    def op(self, name: str, *args: int) -> int:
        from vmemu import Signal

        try:
            if name == "write":
                self.p.write(self.base + args[0] * P, b"W%03d" % args[1])
                return 0
            if name == "mremap":
                self.p.mremap(self.base + args[0] * P, args[1] * P, args[1] * P,
                              MREMAP_MAYMOVE | MREMAP_FIXED, self.base + args[2] * P)
                return 0
            getattr(self.p, name)(self.base + args[0] * P, args[1] * P, *args[2:])
            return 0
        except OSError as e:
            return e.errno or -1
        except Signal as s:
            return -s.si_signo

    def fork_view(self, writes: list[int]) -> tuple:
        parent = self.p
        child = self.p.fork()
        try:
            self.p = child
            errs = [self.op("write", pg, 777) for pg in writes]
            mine = (errs, self.view())
            self.k.check()
        finally:
            self.p = parent
        child.exit()
        return mine, self.view()

    def view(self) -> tuple:
        lay = _layout(self.p.maps(), self.base)
        present = [bool(self.p.pagemap(self.base + i * P) & PM_PRESENT) for i in range(N)]
        readable = {p for s, e, perms in lay if perms[0] == "r" for p in range(s, e)}
        data = [self.p.read(self.base + i * P, 8) if i in readable else None for i in range(N)]
        return lay, _anon_huge(self.p.smaps(), self.base), present, data


POINTS = [0, 1, 255, 256, 510, 511, 512, 513, 767, 1022, 1023]
LENGTHS = [1, 2, 256, 511, 512, 513, 1024]
ADVICE = [MADV_DONTNEED, MADV_FREE, MADV_PAGEOUT, MADV_COLD, MADV_COLLAPSE, MADV_HUGEPAGE,
          MADV_NOHUGEPAGE, MADV_WILLNEED, MADV_POPULATE_WRITE]


@st.composite
def operation(draw) -> tuple:
    start = draw(st.sampled_from(POINTS))
    n = min(draw(st.sampled_from(LENGTHS)), N - start)
    kind = draw(st.sampled_from(["write", "madvise", "madvise", "madvise", "mprotect", "munmap",
                                 "mremap"]))
    if kind == "write":
        return ("write", start, draw(st.integers(0, 999)))
    if kind == "madvise":
        return ("madvise", start, n, draw(st.sampled_from(ADVICE)))
    if kind == "mprotect":
        return ("mprotect", start, n, draw(st.sampled_from([PROT_READ, RW])))
    if kind == "mremap":  # move inside the region (overlap is EINVAL on both)
        return ("mremap", start, n, draw(st.sampled_from(POINTS)))
    return ("munmap", start, n)


@pytest.mark.skipif(_host_thp_policy() == "never", reason="host THP policy is 'never'")
@pytest.mark.skipif(_host_has_swap(), reason="the sequences assume the host has no swap")
@settings(max_examples=max(5, settings().max_examples // 8),
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operation(), min_size=1, max_size=6),
       fork_writes=st.none() | st.lists(st.sampled_from(POINTS), max_size=3))
def test_thp_sequences_match_the_kernel(ops, fork_writes) -> None:
    old_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old_cpus)})
    host = Host()
    try:
        before = _khugepaged_collapsed()
        start = host.view()
        host_steps = [(host.op(*op), host.view()) for op in ops]
        host_fork = host.fork_view(fork_writes) if fork_writes is not None else None
        assume(_khugepaged_collapsed() == before)
    finally:
        host.close()
        os.sched_setaffinity(0, old_cpus)
    assume(start[1] == 2 * 2048)  # the host gave us two THPs (not fragmented)
    emu = Emu()
    assert emu.view() == start
    for n, (op, (herr, hview)) in enumerate(zip(ops, host_steps, strict=True)):
        eerr = emu.op(*op)
        eview = emu.view()
        where = f"step {n} {op}"
        if op[0] == "madvise" and op[3] == MADV_COLLAPSE and herr != eerr:
            assume(False)  # the host could not find a free huge page: not a semantic difference
        assert eerr == herr, f"{where}: errno kernel {herr}, vmemu {eerr}"
        assert eview[0] == hview[0], f"{where}: layout"
        assert eview[1] == hview[1], f"{where}: AnonHugePages kernel {hview[1]}, vmemu {eview[1]}"
        assert eview[2] == hview[2], f"{where}: pagemap present bits"
        assert eview[3] == hview[3], f"{where}: contents"
        emu.p.check()
    if host_fork is not None:  # fork, the child writes (COW splits a shared THP), both look
        (herrs, hchild), hparent = host_fork
        (eerrs, echild), eparent = emu.fork_view(fork_writes)
        assert eerrs == herrs, "child writes"
        for what, e, h in (("child", echild, hchild), ("parent", eparent, hparent)):
            assert e[0] == h[0], f"after fork: {what} layout"
            assert e[1] == h[1], f"after fork: {what} AnonHugePages kernel {h[1]}, vmemu {e[1]}"
            assert e[2] == h[2], f"after fork: {what} pagemap present bits"
            assert e[3] == h[3], f"after fork: {what} contents"
        emu.p.check()
