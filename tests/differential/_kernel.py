"""Two address-space windows driven the same way: one on the real kernel, one emulated.

Each side reserves 64 MiB with ``mmap(PROT_NONE)`` and unmaps a small window
in its middle; every MAP_FIXED operation of a test happens inside that
window, addressed in *pages relative to the window's base*. The rest of the
reservation stays mapped PROT_NONE as a guard the window's mappings can
merge with, on both sides alike. On the kernel side it lies at 64 GiB and up
(`reserve_low`), where no mapping of the interpreter's own - an arena, a
library, a thread stack - is placed in a hole the test leaves in its window.

The kernel side uses :mod:`vmemu.native.libc` (ctypes ``syscall(2)``
wrappers that raise ``OSError(errno)``); reads use ``peek_memory`` and are
only made where the kernel's own /proc/self/maps says the page is
readable, so a test cannot crash the interpreter. Accesses meant to fault
go through :mod:`vmemu.native.access`, which survives the signal.

A layout is a list of ``(start, end, perms)`` in pages relative to the
window base, clipped to the reservation: exactly what /proc/self/maps
shows, merges and splits included.
"""

from __future__ import annotations

import os
import pickle
import platform
import sys
from collections.abc import Callable
from typing import Any

from vmemu import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_NONE, Process, Signal

RESERVE = 64 << 20
WINDOW_PAGES = 16
Layout = list[tuple[int, int, str]]

ON_LINUX_X86_64 = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
SKIP_REASON = "differential tests need the real Linux x86-64 kernel"

if ON_LINUX_X86_64:
    from vmemu.native import libc
else:  # pragma: no cover - imported for type checkers only
    libc = None  # type: ignore[assignment]


#: Where the next low reservation is tried (see `reserve_low`).
_LOW_HINT = [64 << 30]


def reserve_low(length: int) -> int:
    """A PROT_NONE reservation of ``length`` bytes far below this process's other mappings.

    A test that unmaps part of its window (munmap, an mremap away) leaves a hole
    that the kernel may hand to the next ``mmap(NULL)`` of the interpreter
    itself - a pymalloc arena, a big bytearray: those are placed top-down from
    just under the stack, in the highest gap that fits, and a hole of a few MiB
    next to them is such a gap. A write the test then makes there expecting
    SIGSEGV, or a MAP_FIXED into the hole, lands in Python's heap (the "Fatal
    Python error: Segmentation fault" seen now and then in full runs). A window
    at 64 GiB and up is below every gap the allocator will ever try first.
    """
    from vmemu.constants import MAP_FIXED_NOREPLACE

    step = (length + (1 << 30) - 1) & ~((1 << 30) - 1)
    for _ in range(256):
        hint = _LOW_HINT[0]
        _LOW_HINT[0] += step
        try:
            return libc.mmap(hint, length, PROT_NONE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)
        except OSError:  # EEXIST: something is there already; try the next slot
            continue
    raise OSError("no free low address range for a test window")


def host_free_hugepages() -> int:
    """Free and unreserved 2 MiB pages of the host's hugetlb pool (0 if unknown)."""
    free = rsvd = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    free = int(line.split()[1])
                elif line.startswith("HugePages_Rsvd:"):
                    rsvd = int(line.split()[1])
    except OSError:
        return 0
    return free - rsvd


def native_process_or_skip(hugepages: int = 0) -> Any:
    """A ``vmemu.native.NativeProcess``, or a skip with the reason the kernel side cannot
    run: not Linux x86-64, userfaultfd not permitted, fewer than ``hugepages`` free."""
    import pytest

    if not ON_LINUX_X86_64:
        pytest.skip("the native binding needs Linux x86-64")
    from vmemu.native import NativeProcess

    p = NativeProcess()
    try:
        p.userfaultfd(0).close()
    except OSError as e:
        pytest.skip(f"userfaultfd not permitted here: {e}")
    if hugepages and host_free_hugepages() < hugepages:
        pytest.skip(f"host hugetlb pool has fewer than {hugepages} free 2 MiB pages")
    return p


def native_access_or_skip() -> Any:
    """``vmemu.native.access`` with its C helper built, or a skip with the reason it cannot be
    (no C compiler): without it a user-mode access that ends in a signal ends the test run."""
    import pytest

    from vmemu.native import access

    try:
        access.load()
    except access.HelperUnavailable as e:
        pytest.skip(f"the native access helper is unavailable: {e}")
    return access


def parse_maps(text: str, lo: int, hi: int, base: int) -> Layout:
    """The VMAs of a maps text intersecting ``[lo, hi)``, clipped, in pages from ``base``."""
    out: Layout = []
    for line in text.splitlines():
        rng, perms = line.split()[:2]
        s, e = (int(x, 16) for x in rng.split("-"))
        if e <= lo or s >= hi:
            continue
        s, e = max(s, lo), min(e, hi)
        out.append(((s - base) // PAGE_SIZE, (e - base) // PAGE_SIZE, perms))
    return out


class Side:
    """Operations on one window, in pages relative to its base."""

    name = "?"
    reserve: int
    base: int

    def addr(self, page: int) -> int:
        return self.base + page * PAGE_SIZE

    # syscalls; raise OSError like the kernel
    def mmap(self, page: int, npages: int, prot: int, flags: int) -> int:
        a = self._mmap(self.addr(page), npages * PAGE_SIZE, prot, flags)
        return (a - self.base) // PAGE_SIZE

    def munmap(self, page: int, npages: int) -> None:
        self._call("munmap", self.addr(page), npages * PAGE_SIZE)

    def mprotect(self, page: int, npages: int, prot: int) -> None:
        self._call("mprotect", self.addr(page), npages * PAGE_SIZE, prot)

    def madvise(self, page: int, npages: int, advice: int) -> None:
        self._call("madvise", self.addr(page), npages * PAGE_SIZE, advice)

    def layout(self) -> Layout:
        return parse_maps(self.maps_text(), self.reserve, self.reserve + RESERVE, self.base)

    def perms_at(self, page: int) -> str | None:
        for s, e, perms in self.layout():
            if s <= page < e:
                return perms
        return None

    def contents(self, npages: int = WINDOW_PAGES) -> dict[int, bytes]:
        """Bytes of each readable window page (by the side's own layout)."""
        lay = self.layout()
        out = {}
        for page in range(npages):
            perms = next((p for s, e, p in lay if s <= page < e), None)
            if perms is not None and perms[0] == "r":
                out[page] = self.read(page * PAGE_SIZE, PAGE_SIZE)
        return out

    def fork_snapshot(self, child_writes: list[tuple[int, bytes]] = ()) -> tuple[Layout, dict]:
        """Fork; the child makes ``child_writes`` (offset, bytes) then reports layout+contents."""
        raise NotImplementedError

    # to implement
    def _mmap(self, addr: int, length: int, prot: int, flags: int) -> int:
        raise NotImplementedError

    def _call(self, name: str, *args: int) -> None:
        raise NotImplementedError

    def maps_text(self) -> str:
        raise NotImplementedError

    def read(self, off: int, n: int) -> bytes:
        raise NotImplementedError

    def write(self, off: int, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class KernelSide(Side):
    """The window in this very process, on the real kernel."""

    name = "kernel"

    def __init__(self) -> None:
        self.reserve = reserve_low(RESERVE)
        self.base = self.reserve + RESERVE // 2
        libc.munmap(self.base, WINDOW_PAGES * PAGE_SIZE)

    def _mmap(self, addr: int, length: int, prot: int, flags: int) -> int:
        return libc.mmap(addr, length, prot, flags)

    def _call(self, name: str, *args: int) -> None:
        getattr(libc, name)(*args)

    def maps_text(self) -> str:
        with open("/proc/self/maps") as f:
            return f.read()

    def read(self, off: int, n: int) -> bytes:
        return libc.peek_memory(self.base + off, n)

    def write(self, off: int, data: bytes) -> None:
        libc.poke_memory(self.base + off, data)

    def fork_snapshot(self, child_writes: list[tuple[int, bytes]] = ()) -> tuple[Layout, dict]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 0
            try:
                os.close(r)
                for off, data in child_writes:
                    self.write(off, data)
                blob = pickle.dumps((self.layout(), self.contents()))
                with os.fdopen(w, "wb") as f:
                    f.write(blob)
            except BaseException:  # noqa: BLE001 - report through the exit status
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            blob = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "kernel-side child failed"
        return pickle.loads(blob)  # type: ignore[no-any-return]

    def close(self) -> None:
        libc.munmap(self.reserve, RESERVE)


class EmuSide(Side):
    """The same window in an emulated process."""

    name = "vmemu"

    def __init__(self, process: Process | None = None) -> None:
        self.p = process if process is not None else Process()
        self.reserve = self.p.mmap(0, RESERVE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
        self.base = self.reserve + RESERVE // 2
        self.p.munmap(self.base, WINDOW_PAGES * PAGE_SIZE)

    def _mmap(self, addr: int, length: int, prot: int, flags: int) -> int:
        return self.p.mmap(addr, length, prot, flags)

    def _call(self, name: str, *args: int) -> None:
        getattr(self.p, name)(*args)

    def maps_text(self) -> str:
        return self.p.maps()

    def read(self, off: int, n: int) -> bytes:
        return self.p.read(self.base + off, n)

    def write(self, off: int, data: bytes) -> None:
        self.p.write(self.base + off, data)

    def fork_snapshot(self, child_writes: list[tuple[int, bytes]] = ()) -> tuple[Layout, dict]:
        child = self.p.fork()
        view = EmuSide.__new__(EmuSide)
        view.p, view.reserve, view.base = child, self.reserve, self.base
        for off, data in child_writes:
            view.write(off, data)
        snap = (view.layout(), view.contents())
        self.p.check()
        child.exit()
        self.p.check()
        return snap

    def close(self) -> None:
        self.p.check()
        self.p.exit()


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """``("ok", result)`` or ``("errno", e.errno)`` or ``("signal", (signo, code))``."""
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("errno", e.errno)
    except Signal as s:
        return ("signal", (s.si_signo, s.si_code))
