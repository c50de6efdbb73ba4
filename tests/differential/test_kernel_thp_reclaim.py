"""MADV_PAGEOUT / MADV_COLD / MADV_FREE of a THP against the real kernel.

One 2 MiB THP is faulted in on both sides (the host policy must allow
MADV_HUGEPAGE), then the same advice sequence runs on both. After every
step the test compares what user space can see: AnonHugePages and LazyFree
in smaps, the pagemap present/swapped bits of all 512 pages and their
contents. The reference machine has no swap, so vmemu runs without swap
too. /proc/vmstat is machine-wide (other processes may split THPs at the
same time), so the kernel's split counters must be *at least* vmemu's.

MADV_FREE cases pin the test to one CPU: the kernel marks a folio lazyfree
through a per-CPU batch that PAGEOUT's ``lru_add_drain`` only drains on
its own CPU.
"""

from __future__ import annotations

import os

import pytest

from tests.differential._kernel import ON_LINUX_X86_64, SKIP_REASON
from vmemu import (
    MADV_COLD,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
)
from vmemu.constants import PMD_SIZE
from vmemu.mmu import PM_PRESENT, PM_SWAP

pytestmark = [pytest.mark.differential,
              pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

P = PAGE_SIZE
H = PMD_SIZE
RW = PROT_READ | PROT_WRITE
PRIV = MAP_PRIVATE | MAP_ANONYMOUS
COUNTERS = ("thp_split_pmd", "thp_split_page", "thp_swpout_fallback", "pglazyfree",
            "pglazyfreed")


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


def page(i: int) -> bytes:
    return bytes([(i * 5 + 3) & 0xFF or 1]) * 48 + i.to_bytes(4, "little") * 4


def _host_vmstat() -> dict[str, int]:
    out = {}
    for line in open("/proc/vmstat"):
        name, value = line.split()
        if name in COUNTERS:
            out[name] = int(value)
    return out


def _smaps_kb(text: str, start: int, field: str) -> int:
    block = text[text.index(f"{start:x}-"):]
    for line in block.splitlines()[1:]:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _host_pagemap(addr: int, n: int) -> list[int]:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // P * 8)
        raw = f.read(8 * n)
    return [int.from_bytes(raw[i * 8:i * 8 + 8], "little") for i in range(n)]


class Host:
    def __init__(self) -> None:
        from vmemu.native import libc

        self.libc = libc
        self.raw = libc.mmap(0, 2 * H, RW, PRIV)
        self.a = self.home = (self.raw + H - 1) & ~(H - 1)
        libc.madvise(self.a, H, MADV_HUGEPAGE)
        for i in range(512):
            libc.poke_memory(self.a + i * P, page(i))

    def madvise(self, off: int, n: int, advice: int) -> None:
        self.libc.madvise(self.a + off * P, n * P, advice)

    def write(self, i: int, data: bytes) -> None:
        self.libc.poke_memory(self.a + i * P, data)

    def view(self) -> tuple:
        smaps = open("/proc/self/smaps").read()
        bits = [e & (PM_PRESENT | PM_SWAP) for e in _host_pagemap(self.a, 512)]
        data = [self.libc.peek_memory(self.a + i * P, 64) for i in range(512)]
        return (_smaps_kb(smaps, self.a, "AnonHugePages"), _smaps_kb(smaps, self.a, "LazyFree"),
                bits, data)

    def close(self) -> None:
        if self.a == self.home:
            self.libc.munmap(self.raw, 2 * H)
            return
        # The THP was moved away (its new place is the caller's to unmap): the hole it
        # left may hold the interpreter's memory by now, so unmap only what is still ours.
        if self.home > self.raw:
            self.libc.munmap(self.raw, self.home - self.raw)
        if self.raw + H > self.home:
            self.libc.munmap(self.home + H, self.raw + H - self.home)


class Emu:
    def __init__(self) -> None:
        self.k = Kernel()
        self.k.thp_enabled = _host_thp_policy()
        self.p = self.k.spawn()
        self.a = self.p.mmap(0, H, RW, PRIV)
        self.p.madvise(self.a, H, MADV_HUGEPAGE)
        for i in range(512):
            self.p.write(self.a + i * P, page(i))

    def madvise(self, off: int, n: int, advice: int) -> None:
        self.p.madvise(self.a + off * P, n * P, advice)

    def write(self, i: int, data: bytes) -> None:
        self.p.write(self.a + i * P, data)

    def view(self) -> tuple:
        smaps = self.p.smaps()
        bits = [self.p.pagemap(self.a + i * P) & (PM_PRESENT | PM_SWAP) for i in range(512)]
        data = [self.p.read(self.a + i * P, 64) for i in range(512)]
        return (_smaps_kb(smaps, self.a, "AnonHugePages"), _smaps_kb(smaps, self.a, "LazyFree"),
                bits, data)

    def vmstat(self) -> dict[str, int]:
        out = {n: self.k.phys.vmstat[n] for n in COUNTERS}
        out["pglazyfreed"] = self.k.swap_statistics().pglazyfreed
        return out


SCENARIOS = {
    "pageout-whole": [("madvise", 0, 512, MADV_PAGEOUT)],
    "pageout-part": [("madvise", 3, 2, MADV_PAGEOUT)],
    "cold-whole-then-part": [("madvise", 0, 512, MADV_COLD), ("madvise", 100, 1, MADV_COLD)],
    "free-whole-then-pageout": [("madvise", 0, 512, MADV_FREE), ("madvise", 0, 512, MADV_PAGEOUT)],
    "free-whole-write-pageout": [("madvise", 0, 512, MADV_FREE), ("write", 1, b"again"),
                                 ("madvise", 0, 512, MADV_PAGEOUT)],
    "free-part-write-pageout": [("madvise", 8, 4, MADV_FREE), ("write", 9, b"kept"),
                                ("madvise", 0, 512, MADV_PAGEOUT)],
}


@pytest.fixture
def one_cpu():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs sched_setaffinity")
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    yield
    os.sched_setaffinity(0, old)


@pytest.mark.skipif(_host_thp_policy() == "never", reason="host THP policy is 'never'")
@pytest.mark.skipif(_host_has_swap(), reason="the scenarios assume the host has no swap")
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_thp_advice_matches_the_kernel(name: str, one_cpu) -> None:
    host = Host()
    try:
        if host.view()[0] != 2048:
            pytest.skip("the host had no free huge page to give (fragmented memory)")
        emu = Emu()
        assert emu.view() == host.view()
        k0 = _host_vmstat()
        batched = False  # small folios wait in the kernel's per-CPU lazyfree batch
        for op, *args in SCENARIOS[name]:
            getattr(host, op)(*args)
            getattr(emu, op)(*args)
            hv, ev = host.view(), emu.view()
            assert ev[0] == hv[0], f"{name}: {op}{args}: AnonHugePages"
            if op == "madvise":
                # small folios sit in the per-CPU lazyfree batch (still swapbacked, so
                # not LazyFree in smaps) until reclaim drains it; a THP goes at once
                batched = args[2] == MADV_FREE and args[1] < 512
            if not batched:
                assert ev[1] == hv[1], f"{name}: {op}{args}: LazyFree"
            assert ev[2] == hv[2], f"{name}: {op}{args}: pagemap bits"
            assert ev[3] == hv[3], f"{name}: {op}{args}: contents"
            emu.p.check()
        kd = {n: v - k0[n] for n, v in _host_vmstat().items()}
        ed = emu.vmstat()
        for n in COUNTERS:
            assert kd[n] >= ed[n], f"{name}: vmstat {n}: kernel +{kd[n]}, vmemu +{ed[n]}"
            if n in ("thp_split_page", "thp_split_pmd"):  # we did split where the kernel did
                assert (ed[n] > 0) == (kd[n] > 0) or kd[n] > 1, (n, kd, ed)
    finally:
        host.close()


@pytest.mark.skipif(_host_thp_policy() == "never", reason="host THP policy is 'never'")
@pytest.mark.parametrize("shift", [0, P], ids=["aligned", "unaligned"])
def test_thp_mremap_then_pageout_matches_the_kernel(shift: int, one_cpu) -> None:
    """mremap moves a THP whole to an aligned place (move_huge_pmd) and splits the PMD
    otherwise; the moved folio stays reachable through rmap, so PAGEOUT still splits it."""
    from vmemu.constants import MREMAP_FIXED, MREMAP_MAYMOVE

    host = Host()
    try:
        if host.view()[0] != 2048:
            pytest.skip("the host had no free huge page to give (fragmented memory)")
        emu = Emu()
        dst_host = host.libc.mmap(0, 4 * H, RW, PRIV)
        dst_emu = emu.p.mmap(0, 4 * H, RW, PRIV)
        for side, dst in ((host, dst_host), (emu, dst_emu)):
            to = ((dst + H - 1) & ~(H - 1)) + shift
            if side is host:
                side.a = host.libc.mremap(side.a, H, H, MREMAP_MAYMOVE | MREMAP_FIXED, to)
            else:
                side.a = emu.p.mremap(side.a, H, H, MREMAP_MAYMOVE | MREMAP_FIXED, to)
        hv, ev = host.view(), emu.view()
        assert ev == hv
        assert hv[0] == (2048 if not shift else 0)
        emu.p.check()
        for op in (("madvise", 7, 3, MADV_PAGEOUT), ("madvise", 0, 512, MADV_PAGEOUT)):
            getattr(host, op[0])(*op[1:])
            getattr(emu, op[0])(*op[1:])
            assert emu.view() == host.view(), op
            emu.p.check()
        host.libc.munmap(dst_host, 4 * H)
    finally:
        host.close()
