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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmemu
from vmemu.constants import (
    MADV_DONTNEED,
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
    free = rsvd = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                free = int(line.split()[1])
            elif line.startswith("HugePages_Rsvd:"):
                rsvd = int(line.split()[1])
    if free - rsvd < 8:
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


@st.composite
def operation(draw: Any) -> tuple:
    page = draw(st.integers(0, 1))
    name = draw(st.sampled_from(["read", "write", "alias", "alias", "copy", "continue",
                                 "continue", "poison", "zeropage", "wp", "wp", "dontneed",
                                 "punch"]))
    if name == "read":
        return (name, page, draw(st.sampled_from(OFFSETS)))
    if name in ("write", "alias"):
        return (name, page, draw(st.sampled_from(OFFSETS)), draw(st.integers(1, 255)))
    if name == "copy":
        return (name, page, draw(st.integers(1, 255)), draw(st.booleans()))
    if name in ("continue", "wp"):
        return (name, page, draw(st.booleans()))
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
