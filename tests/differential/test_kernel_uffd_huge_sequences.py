"""Random userfaultfd operation sequences on hugetlb memory, against the real kernel.

A two-huge-page hugetlbfs memfd is mapped shared or private (``dst``) and
shared once more (``alias``, never registered). ``dst`` is registered for
MISSING, WP and MINOR with UFFD_FEATURE_SIGBUS, so every userfault is a
SIGBUS at once and a sequence never blocks. Random steps: user reads and
writes of ``dst``, writes through the alias, UFFDIO_COPY / CONTINUE (with
or without MODE_WP) / POISON / ZEROPAGE / WRITEPROTECT, MADV_DONTNEED and
hole punches. After every step both sides must agree on the step's
outcome (bytes done or errno, bytes read or the signal) and on what
pagemap shows for each huge page (present, uffd-wp, exclusive) and what a
present page holds. Needs 8 free pages in the host pool; skips otherwise.
"""

from __future__ import annotations

import errno
import os
import platform
import sys
from typing import Any

import pytest
from _kernel import host_free_hugepages
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmemu
from vmemu.constants import (
    MADV_COLD,
    MADV_DONTNEED,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    MADV_WILLNEED,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.memfd import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, MFD_HUGETLB
from vmemu.mmu.proc import PM_MMAP_EXCLUSIVE, PM_PRESENT, PM_UFFD_WP
from vmemu.uffd import uapi

pytestmark = pytest.mark.differential

H = PMD_SIZE
RW = PROT_READ | PROT_WRITE
FEATURES = (uapi.UFFD_FEATURE_SIGBUS | uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP
            | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM | uapi.UFFD_FEATURE_MINOR_HUGETLBFS
            | uapi.UFFD_FEATURE_POISON)
MODES = (uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_WP
         | uapi.UFFDIO_REGISTER_MODE_MINOR)


def _reason() -> str | None:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return "needs Linux x86-64"
    try:
        from vmemu.native import NativeUserfaultfd, access

        NativeUserfaultfd.open().close()
        access.load()
    except OSError as e:
        return f"userfaultfd not permitted: {os.strerror(e.errno or 0)}"
    except Exception as e:  # noqa: BLE001 - the access helper could not be built
        return str(e)
    if host_free_hugepages() < 8:
        return "host 2 MiB hugetlb pool has fewer than 8 free pages"
    return None


REASON = _reason()


class Side:
    """One kernel: the memfd, ``dst``, ``alias``, a COPY source and the uffd."""

    p: Any
    u: Any

    def setup(self, shared: bool) -> None:
        p = self.p
        self.fd = p.memfd_create("uffd-seq", MFD_HUGETLB)
        p.ftruncate(self.fd, 2 * H)
        self.dst = p.mmap(0, 2 * H, RW, MAP_SHARED if shared else MAP_PRIVATE, self.fd, 0)
        self.alias = p.mmap(0, 2 * H, RW, MAP_SHARED, self.fd, 0)
        self.src = p.mmap(0, H, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        self.u = p.userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
        self.u.api(FEATURES)
        self.u.register(self.dst, 2 * H, MODES)

    def access(self, addr: int, data: bytes | None) -> object:
        raise NotImplementedError

    def step(self, op: tuple) -> object:
        name, page = op[0], op[1]
        d = self.dst + page * H
        u = self.u
        try:
            if name == "read":
                return self.access(d + op[2], None)
            if name == "write":
                return self.access(d + op[2], bytes([op[3]]))
            if name == "alias":
                return self.access(self.alias + page * H + op[2], bytes([op[3]]))
            if name == "copy":
                self.access(self.src, bytes([op[2]]))
                return u.copy(d, self.src, H, uapi.UFFDIO_COPY_MODE_WP if op[3] else 0)
            if name == "continue":
                return u.continue_(d, H, uapi.UFFDIO_CONTINUE_MODE_WP if op[2] else 0)
            if name == "poison":
                return u.poison(d, H)
            if name == "zeropage":
                return u.zeropage(d, H)
            if name == "wp":
                u.writeprotect(d, H, uapi.UFFDIO_WRITEPROTECT_MODE_WP if op[2] else 0)
                return 0
            if name == "dontneed":
                self.p.madvise(d, H, MADV_DONTNEED)
                return 0
            if name == "punch":
                self.p.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, page * H, H)
                return 0
            if name == "madvise":
                self.p.madvise(d, H, op[2])
                return 0
            if name == "mprotect":
                self.p.mprotect(d, H, op[2])
                return 0
            if name == "unregister":
                u.unregister(self.dst, 2 * H)
                return 0
            if name == "register":
                return u.register(self.dst, 2 * H, op[2])
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, e.errno)
        raise AssertionError(op)

    def view(self) -> list[tuple]:
        out = []
        for i in range(2):
            a = self.dst + i * H
            e = self.p.pagemap(a)
            seen: object = None
            if e & PM_PRESENT:
                seen = self.access(a + 7, None)
            out.append((bool(e & PM_PRESENT), bool(e & PM_UFFD_WP), bool(e & PM_MMAP_EXCLUSIVE),
                        seen))
        return out

    def close(self) -> None:
        self.u.close()
        for a, n in ((self.dst, 2 * H), (self.alias, 2 * H), (self.src, H)):
            self.p.munmap(a, n)
        self.p.close(self.fd)


class Host(Side):
    def __init__(self, shared: bool) -> None:
        from vmemu.native import NativeProcess, access

        self.p = NativeProcess()
        self.acc = access
        self.setup(shared)

    def access(self, addr: int, data: bytes | None) -> object:
        if data is None:
            r = self.acc.user_access(addr, 1, want_data=True)
        else:
            r = self.acc.user_access(addr, 1, write=data)
        if not r.ok:
            return ("signal", r.signo, r.si_code)
        return r.data if data is None else "ok"


class Emu(Side):
    def __init__(self, shared: bool) -> None:
        k = vmemu.Kernel()
        k.set_nr_hugepages(16)
        self.p = k.spawn()
        self.setup(shared)

    def access(self, addr: int, data: bytes | None) -> object:
        try:
            if data is None:
                return self.p.read(addr, 1)
            self.p.write(addr, data)
            return "ok"
        except vmemu.Signal as s:
            return ("signal", s.si_signo, s.si_code)


OFFSETS = [0, 5, PAGE_SIZE, H - 1]
ADVICE = [MADV_REMOVE, MADV_POPULATE_READ, MADV_POPULATE_WRITE, MADV_WILLNEED]


@st.composite
def operation(draw: Any) -> tuple:
    page = draw(st.integers(0, 1))
    name = draw(st.sampled_from(["read", "write", "alias", "alias", "copy", "continue",
                                 "continue", "poison", "zeropage", "wp", "wp", "dontneed",
                                 "punch", "madvise", "mprotect", "unregister", "register"]))
    if name == "madvise":
        return (name, page, draw(st.sampled_from(ADVICE)))
    if name == "mprotect":
        return (name, page, draw(st.sampled_from([PROT_READ, RW])))
    if name == "register":
        return (name, 0, draw(st.integers(1, 7)))
    if name == "read":
        return (name, page, draw(st.sampled_from(OFFSETS)))
    if name in ("write", "alias"):
        return (name, page, draw(st.sampled_from(OFFSETS)), draw(st.integers(1, 255)))
    if name == "copy":
        return (name, page, draw(st.integers(1, 255)), draw(st.booleans()))
    if name in ("continue", "wp"):
        return (name, page, draw(st.booleans()))
    if name == "unregister":
        return (name, 0)
    return (name, page)


@pytest.mark.skipif(REASON is not None, reason=str(REASON))
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "private"])
@settings(max_examples=max(5, settings().max_examples // 5), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation(), min_size=1, max_size=8))
def test_uffd_hugetlb_sequences_match_the_kernel(shared: bool, ops: list[tuple]) -> None:
    host = Host(shared)
    try:
        start = host.view()
        host_steps = [(host.step(op), host.view()) for op in ops]
    finally:
        host.close()
    emu = Emu(shared)
    assert emu.view() == start
    for n, (op, (hres, hview)) in enumerate(zip(ops, host_steps, strict=True)):
        eres = emu.step(op)
        eview = emu.view()
        where = f"step {n} {op}"
        assert eres == hres, f"{where}: kernel {hres!r}, vmemu {eres!r}"
        assert eview == hview, f"{where}: view kernel {hview}, vmemu {eview}"
        emu.p.check()
    emu.close()
    emu.p.check()


# -- anonymous THP ranges --------------------------------------------------------------------

THP_FEATURES = (uapi.UFFD_FEATURE_SIGBUS | uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP
                | uapi.UFFD_FEATURE_MOVE)
SAMPLE_PAGES = [0, 1, 511, 512, 513, 1023]


def _thp_reason() -> str | None:
    if REASON is not None and "hugetlb" not in REASON:
        return REASON
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            policy = f.read().split("[")[1].split("]")[0]
        with open("/sys/kernel/mm/transparent_hugepage/use_zero_page") as f:
            zero = f.read().strip()
    except (OSError, IndexError):
        return "no THP sysfs"
    if policy == "never" or zero != "1":
        return "host THP policy 'never' or use_zero_page off"
    return None


THP_REASON = _thp_reason()


class ThpSide:
    """Two 2 MiB-aligned THP-eligible ranges: ``dst`` (registered) and ``src`` (for MOVE)."""

    p: Any

    def setup(self, unpopulated: bool) -> None:
        p = self.p
        self.raw = p.mmap(0, 7 * H, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        base = (self.raw + PAGE_SIZE + H - 1) & ~(H - 1)
        # a PROT_NONE guard keeps dst and src in VMAs that can never merge (the kernel merges
        # after an unregister depending on anon_vma sharing, not deterministic here); a hole
        # would not do: the interpreter could map something there before the final munmap
        self.dst, self.src = base, base + 3 * H
        from vmemu.constants import MADV_HUGEPAGE, MADV_NOHUGEPAGE, PROT_NONE

        p.mprotect(base + 2 * H, H, PROT_NONE)
        p.mprotect(self.raw, base - self.raw, PROT_NONE)  # nothing outside can merge either
        p.mprotect(base + 5 * H, self.raw + 7 * H - (base + 5 * H), PROT_NONE)
        p.madvise(self.dst, 2 * H, MADV_HUGEPAGE)
        p.madvise(self.src, 2 * H, MADV_HUGEPAGE)
        self.buf = p.mmap(0, H, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        p.madvise(self.buf, H, MADV_NOHUGEPAGE)
        self.u = p.userfaultfd(uapi.O_CLOEXEC | uapi.O_NONBLOCK)
        self.u.api(THP_FEATURES | (uapi.UFFD_FEATURE_WP_UNPOPULATED if unpopulated else 0))
        self.u.register(self.dst, 2 * H, uapi.UFFDIO_REGISTER_MODE_MISSING
                        | uapi.UFFDIO_REGISTER_MODE_WP)

    def access(self, addr: int, data: bytes | None) -> object:
        raise NotImplementedError

    def step(self, op: tuple) -> object:
        name = op[0]
        u = self.u
        try:
            if name == "read":
                return self.access(self.dst + op[1], None)
            if name == "write":
                return self.access(self.dst + op[1], bytes([op[2]]))
            if name == "fill_src":
                return self.access(self.src + op[1], bytes([op[2]]))
            if name == "copy":
                self.access(self.buf, bytes([op[3]]))
                return u.copy(self.dst + op[1], self.buf, op[2],
                              uapi.UFFDIO_COPY_MODE_WP if op[4] else 0)
            if name == "zeropage":
                return u.zeropage(self.dst + op[1], op[2])
            if name == "move":
                return u.move(self.dst + op[1], self.src + op[1], op[2],
                              uapi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if op[3] else 0)
            if name == "wp":
                u.writeprotect(self.dst + op[1], op[2],
                               uapi.UFFDIO_WRITEPROTECT_MODE_WP if op[3] else 0)
                return 0
            if name == "dontneed":
                self.p.madvise(self.dst + op[1], op[2], MADV_DONTNEED)
                return 0
            if name == "madvise":
                self.p.madvise(self.dst + op[1], op[2], op[3])
                return 0
            if name == "mprotect":
                self.p.mprotect(self.dst + op[1], op[2], op[3])
                return 0
            if name == "unregister":
                u.unregister(self.dst, 2 * H)
                return 0
            if name == "register":
                return u.register(self.dst, 2 * H, op[1])
        except OSError as e:
            done = None
            st_ = getattr(e, "struct", None)
            for field in ("copy", "zeropage", "move"):
                if st_ is not None and hasattr(st_, field):
                    done = getattr(st_, field)
            return (errno.errorcode.get(e.errno or 0, e.errno), done)
        raise AssertionError(op)

    def view(self) -> tuple:
        pages = []
        for i in SAMPLE_PAGES:
            a = self.dst + i * PAGE_SIZE
            e = self.p.pagemap(a)
            seen = self.access(a + 3, None) if e & PM_PRESENT else None
            pages.append((bool(e & PM_PRESENT), bool(e & PM_UFFD_WP), bool(e & PM_MMAP_EXCLUSIVE),
                          seen))
        return tuple(pages), self.huge_kb(self.dst), self.huge_kb(self.src)

    def huge_kb(self, addr: int) -> int:
        """AnonHugePages of the VMAs meeting ``[addr, addr + 2 MiB * 2)``."""
        text = self.smaps_text()
        inside = False
        total = 0
        for line in text.splitlines():
            head = line.split()[0] if line else ""
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < addr + 2 * H and addr < hi
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
        return total

    def smaps_text(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        self.u.close()
        self.p.munmap(self.raw, 7 * H)
        self.p.munmap(self.buf, H)


class ThpHost(ThpSide):
    def __init__(self, unpopulated: bool) -> None:
        from vmemu.native import NativeProcess, access

        self.p = NativeProcess()
        self.acc = access
        self.setup(unpopulated)

    access = Host.access

    def smaps_text(self) -> str:
        with open("/proc/self/smaps") as f:
            return f.read()


class ThpEmu(ThpSide):
    def __init__(self, unpopulated: bool) -> None:
        self.p = vmemu.Process()
        self.setup(unpopulated)

    access = Emu.access

    def smaps_text(self) -> str:
        return str(self.p.smaps())


THP_OFFS = [0, PAGE_SIZE, H - PAGE_SIZE, H]
THP_LENS = [PAGE_SIZE, H]


@st.composite
def thp_operation(draw: Any) -> tuple:
    name = draw(st.sampled_from(["read", "read", "write", "write", "fill_src", "copy", "zeropage",
                                 "move", "move", "wp", "wp", "dontneed", "madvise", "mprotect"]))
    # no unregister: an unarmed MADV_HUGEPAGE range may be collapsed by the host's khugepaged
    # at any moment, which makes the kernel side nondeterministic
    if name == "register":
        return (name, draw(st.sampled_from([1, 2, 3])))
    if name == "unregister":
        return (name,)
    if name in ("madvise", "mprotect"):
        # no MADV_COLLAPSE: on the kernel it depends on whether the new VMA merged with an
        # older one that has an anon_vma, which differs from run to run in this process
        arg = draw(st.sampled_from([MADV_COLD, MADV_POPULATE_READ, MADV_POPULATE_WRITE]
                                   if name == "madvise" else [PROT_READ, RW]))
        return (name, draw(st.sampled_from(THP_OFFS)), draw(st.sampled_from(THP_LENS)), arg)
    if name in ("read",):
        return (name, draw(st.sampled_from(THP_OFFS)) + draw(st.sampled_from([0, 5])))
    if name in ("write", "fill_src"):
        return (name, draw(st.sampled_from(THP_OFFS)), draw(st.integers(1, 255)))
    off = draw(st.sampled_from(THP_OFFS))
    length = draw(st.sampled_from(THP_LENS))
    if name == "copy":
        return (name, off, length, draw(st.integers(1, 255)), draw(st.booleans()))
    if name in ("move", "wp"):
        return (name, off, length, draw(st.booleans()))
    return (name, off, length)


@pytest.mark.skipif(THP_REASON is not None, reason=str(THP_REASON))
@pytest.mark.parametrize("unpopulated", [False, True], ids=["wp", "wp-unpopulated"])
@settings(max_examples=max(5, settings().max_examples // 5), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(thp_operation(), min_size=1, max_size=8))
def test_uffd_thp_sequences_match_the_kernel(unpopulated: bool, ops: list[tuple]) -> None:
    host = ThpHost(unpopulated)
    try:
        start = host.view()
        host_steps = [(host.step(op), host.view()) for op in ops]
    finally:
        host.close()
    emu = ThpEmu(unpopulated)
    assert emu.view() == start
    for n, (op, (hres, hview)) in enumerate(zip(ops, host_steps, strict=True)):
        eres = emu.step(op)
        eview = emu.view()
        where = f"step {n} {op}"
        assert eres == hres, f"{where}: kernel {hres!r}, vmemu {eres!r}"
        assert eview == hview, f"{where}: view kernel {hview}, vmemu {eview}"
        emu.p.check()
    emu.close()
    emu.p.check()
