"""Interpreter of userfaultfd conformance scenarios (data/FORMAT.md).

A scenario is a list of steps on named regions, memfds, uffds, threads and
children. :class:`Runner` keeps every name and the region table, performs
each step through a :class:`~driver.Driver`, and turns what happened into the
result document of FORMAT.md, which contains no raw address, fd, pid or
timing: addresses are mapped back to ``[region, offset]``, thread ids to
thread names, errnos to their names. The same runner drives the real kernel
and vmemu, and the two documents must be equal.

Threads: every step except join/wait_child/release_child/pagemap runs on a
driver worker. After each step the runner asks the driver to *settle* all
live workers, so any wake-up a step caused has played out before the next
step. A step whose worker is still asleep records ``{"state": "blocked"}``.

Placement: regions are placed by the runner, 2 MiB aligned and at least
2 MiB apart, inside an area the driver reports free, with
MAP_FIXED_NOREPLACE (``after``: right after a region; ``at``: MAP_FIXED).
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
import os
import select
from collections.abc import Sequence
from typing import Any

import attrs
from driver import AccessResult, ChildOp, Driver, Worker

from vmemu.native import linux
from vmemu.uffd import uapi

PAGE_SIZE = 4096
HPAGE_SIZE = 2 << 20
REGION_GAP = 2 << 20
ARENA_SIZE = 1 << 36  # 64 GiB of address space to place regions in
#: A value the kernel never writes into an output field (it writes bytes
#: done <= len, or -errno): seeing it after the ioctl means "untouched".
UNTOUCHED = 0x5A5A5A5A5A5A5A5A

PROT_NAMES = {
    "NONE": linux.PROT_NONE,
    "READ": linux.PROT_READ,
    "WRITE": linux.PROT_WRITE,
    "EXEC": linux.PROT_EXEC,
}
MREMAP_NAMES = {
    "MAYMOVE": linux.MREMAP_MAYMOVE,
    "FIXED": linux.MREMAP_FIXED,
    "DONTUNMAP": linux.MREMAP_DONTUNMAP,
}
POLL_NAMES = {
    "POLLIN": select.POLLIN,
    "POLLPRI": select.POLLPRI,
    "POLLOUT": select.POLLOUT,
    "POLLERR": select.POLLERR,
    "POLLHUP": select.POLLHUP,
    "POLLNVAL": select.POLLNVAL,
    "POLLRDNORM": select.POLLRDNORM,
    "POLLRDBAND": select.POLLRDBAND,
    "POLLWRNORM": select.POLLWRNORM,
    "POLLWRBAND": select.POLLWRBAND,
    "POLLMSG": select.POLLMSG,
    "POLLRDHUP": select.POLLRDHUP,
}
SIGNAL_NAMES = {linux.SIGBUS: "SIGBUS", linux.SIGSEGV: "SIGSEGV", linux.SIGKILL: "SIGKILL"}
SI_CODE_NAMES = {
    linux.SIGBUS: {
        linux.BUS_ADRALN: "BUS_ADRALN",
        linux.BUS_ADRERR: "BUS_ADRERR",
        linux.BUS_OBJERR: "BUS_OBJERR",
        linux.BUS_MCEERR_AR: "BUS_MCEERR_AR",
        linux.BUS_MCEERR_AO: "BUS_MCEERR_AO",
    },
    linux.SIGSEGV: {linux.SEGV_MAPERR: "SEGV_MAPERR", linux.SEGV_ACCERR: "SEGV_ACCERR"},
}

#: Steps that run on the runner itself, never on a worker.
INLINE_OPS = frozenset({"join", "wait_child", "release_child", "pagemap"})


class ScenarioError(Exception):
    """The scenario is malformed (unknown op, unknown name, ...): a runner or
    data bug, never a kernel behaviour."""


def errname(e: int) -> str:
    """``EINVAL`` for 22."""
    return errno_mod.errorcode.get(e, str(e))


def advice_value(name: str | int) -> int:
    """MADV_* value of an advice name (``"DONTNEED"``) or a raw int."""
    if isinstance(name, int):
        return name
    try:
        return int(getattr(linux, "MADV_" + name))
    except AttributeError:
        raise ScenarioError(f"unknown madvise advice {name!r}") from None


def flag_value(names: Sequence[str | int], table: dict[str, int]) -> int:
    """OR of names (from ``table``) and raw ints."""
    try:
        return uapi.names_to_flags(list(names), table)
    except KeyError as e:
        raise ScenarioError(f"unknown flag name {e}") from None


def encode_data(data: bytes) -> dict[str, Any]:
    """FORMAT.md byte data: run-length if at most 16 runs, else len/sha256/head."""
    runs: list[list[int]] = []
    for b in data:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    if len(runs) <= 16:
        return {"rle": runs}
    return {
        "len": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "head": data[:16].hex(),
    }


@attrs.define
class Region:
    """A named range of the address space, as bound by mmap/mremap/reserve."""

    name: str
    start: int
    length: int
    seq: int

    @property
    def end(self) -> int:
        return self.start + self.length


@attrs.define
class IntervalSet:
    """Sorted disjoint half-open intervals: the bytes the runner believes mapped."""

    spans: list[tuple[int, int]] = attrs.Factory(list)

    def add(self, start: int, end: int) -> None:
        self.remove(start, end)
        self.spans.append((start, end))
        self.spans.sort()
        merged: list[tuple[int, int]] = []
        for s, e in self.spans:
            if merged and merged[-1][1] >= s:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.spans = merged

    def remove(self, start: int, end: int) -> None:
        out: list[tuple[int, int]] = []
        for s, e in self.spans:
            if e <= start or s >= end:
                out.append((s, e))
                continue
            if s < start:
                out.append((s, start))
            if e > end:
                out.append((end, e))
        self.spans = out

    def __contains__(self, addr: int) -> bool:
        return any(s <= addr < e for s, e in self.spans)

    def copy(self) -> IntervalSet:
        return IntervalSet(list(self.spans))


@attrs.frozen
class RegionTable:
    """A snapshot of the regions and of what is mapped, to name addresses."""

    regions: tuple[Region, ...]
    mapped: IntervalSet

    def name(self, addr: int) -> list[Any]:
        """``[region, offset]`` for ``addr``, else ``["abs", addr]``.

        Candidates are the regions whose ``[start, end]`` holds ``addr``. A region
        that contains it (``start <= addr < end``) beats one that merely ends
        there; then a still-mapped one wins; then the newest.
        """
        best: tuple[tuple[bool, bool, int], Region] | None = None
        for r in self.regions:
            if not r.start <= addr <= r.end:
                continue
            inside = addr < r.end
            probe = addr if inside or r.length == 0 else addr - 1
            key = (inside, probe in self.mapped, r.seq)
            if best is None or key > best[0]:
                best = (key, r)
        if best is None:
            return ["abs", addr]
        return [best[1].name, addr - best[1].start]


class Runner:
    """Replays one scenario through a driver and builds its result document."""

    def __init__(self, driver: Driver, scenario: dict[str, Any]) -> None:
        self.d = driver
        self.scenario = scenario
        self.regions: dict[str, Region] = {}
        self.region_seq = 0
        self.mapped = IntervalSet()
        self.memfds: dict[str, tuple[int, int]] = {}  # name -> (fd, page size)
        self.uffds: dict[str, Any] = {}
        self.closed_uffds: set[str] = set()
        self.workers: dict[str, Worker] = {}
        self.children: dict[str, Any] = {}
        self.task_names: dict[int, str] = {}
        self.cursor = 0
        self.steps: list[dict[str, Any]] = []
        self.auto_names = 0

    # -- entry point ------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run every step, then clean up; return ``{"name", "steps"[, "cleanup"]}``."""
        self.task_names[self.d.main_tid()] = "main"
        base = self.d.find_free_area(ARENA_SIZE)
        self.cursor = _align_up(base, REGION_GAP) + REGION_GAP
        doc: dict[str, Any] = {"name": self.scenario["name"], "steps": self.steps}
        try:
            for i, step in enumerate(self.scenario["steps"]):
                self.steps.append(self.step(i, step))
        finally:
            stuck = self.cleanup()
        if stuck:
            doc["cleanup"] = {"stuck_threads": stuck}
        return doc

    def step(self, i: int, s: dict[str, Any]) -> dict[str, Any]:
        """Perform step ``i`` and return its result entry."""
        op = s["op"]
        entry: dict[str, Any] = {"i": i, "op": op}
        if "as" in s:
            entry["as"] = s["as"]
        if "thread" in s:
            entry["thread"] = s["thread"]
        handler = getattr(self, "op_" + op, None)
        if handler is None:
            raise ScenarioError(f"step {i}: unknown op {op!r}")
        if op in INLINE_OPS:
            entry["r"] = handler(s)
            self.settle()
            return entry
        name = s.get("thread") or f"step{i}"
        old = self.workers.get(name)
        if old is not None and not old.finished:
            raise ScenarioError(f"step {i}: thread {name!r} is still running")

        def body(s: dict[str, Any] = s, i: int = i) -> Any:
            return handler(s, i) if op in ("read", "drain", "fork") else handler(s)

        w = self.d.start_worker(name, body)
        self.workers[name] = w
        self.task_names[w.tid] = name
        self.settle()
        if w.finished:
            entry["r"] = w.outcome()
        elif "thread" in s:
            entry["r"] = {"state": "blocked"}
        else:
            entry["r"] = {"state": "blocked", "thread": name}
        return entry

    def settle(self) -> None:
        self.d.settle([w for w in self.workers.values() if not w.finished])

    # -- names --------------------------------------------------------------

    def addr(self, spec: Sequence[Any]) -> int:
        """Resolve ``[region, offset]`` or ``["abs", N]``."""
        name, off = spec[0], spec[1]
        if name == "abs":
            return int(off)
        try:
            return self.regions[name].start + int(off)
        except KeyError:
            raise ScenarioError(f"unknown region {name!r}") from None

    def range(self, spec: Sequence[Any]) -> tuple[int, int]:
        """Resolve ``[region]`` (whole) or ``[region, offset, len]``."""
        if len(spec) == 1:
            r = self.regions[spec[0]]
            return r.start, r.length
        return self.addr(spec[:2]), int(spec[2])

    def table(self) -> RegionTable:
        return RegionTable(tuple(self.regions.values()), self.mapped.copy())

    def bind_region(self, name: str, start: int, length: int) -> None:
        self.region_seq += 1
        self.regions.pop(name, None)
        self.regions[name] = Region(name, start, length, self.region_seq)

    def uffd(self, name: str) -> Any:
        try:
            return self.uffds[name]
        except KeyError:
            raise ScenarioError(f"unknown uffd {name!r}") from None

    def task_name(self, ptid: int) -> str | int:
        if ptid == 0:
            return 0
        return self.task_names.get(ptid, ptid)

    def next_slot(self, length: int) -> int:
        addr = self.cursor
        self.cursor = _align_up(addr + length, REGION_GAP) + REGION_GAP
        return addr

    # -- memory ---------------------------------------------------------------

    def op_memfd(self, s: dict[str, Any]) -> dict[str, Any]:
        hugetlb = bool(s.get("hugetlb", False))
        psize = HPAGE_SIZE if hugetlb else PAGE_SIZE
        length = int(s["len"]) if "len" in s else int(s["pages"]) * psize
        try:
            fd = self.d.memfd_create(s["as"], hugetlb)
            self.d.ftruncate(fd, length)
        except OSError as e:
            return {"ret": errname(e.errno or 0)}
        self.memfds[s["as"]] = (fd, psize)
        fill = s.get("fill")
        if fill is not None:
            if isinstance(fill, int):
                fill = {"byte": fill}
            pages = fill.get("pages", range(length // psize))
            for p in pages:
                byte = (fill["byte"] + (p if fill.get("per_page") else 0)) & 0xFF
                self.d.memfd_write(fd, p * psize, bytes([byte]) * psize)
        return {"ret": "ok"}

    def op_mmap(self, s: dict[str, Any]) -> dict[str, Any]:
        kind = s.get("kind", "anon")
        psize = HPAGE_SIZE if kind == "hugetlb" else PAGE_SIZE
        if kind == "memfd":
            psize = self.memfds[s["memfd"]][1]  # 2 MiB for a hugetlb memfd
        length = int(s["len"]) if "len" in s else int(s["pages"]) * psize
        prot = flag_value(s.get("prot", ["READ", "WRITE"]), PROT_NAMES)
        shared = bool(s.get("shared", kind in ("shmem", "memfd")))
        flags = linux.MAP_SHARED if shared else linux.MAP_PRIVATE
        fd, offset = -1, 0
        if kind == "anon":
            flags |= linux.MAP_ANONYMOUS
        elif kind == "shmem":
            if shared:
                flags |= linux.MAP_ANONYMOUS
            else:  # private shmem: a private mapping of a fresh memfd
                fd = self.d.memfd_create(s["as"], False)
                self.d.ftruncate(fd, length)
                self.memfds[f".{s['as']}"] = (fd, PAGE_SIZE)
        elif kind == "hugetlb":
            flags |= linux.MAP_ANONYMOUS | linux.MAP_HUGETLB
        elif kind == "memfd":
            fd = self.memfds[s["memfd"]][0]
            offset = int(s.get("offset", 0))
        else:
            raise ScenarioError(f"unknown mmap kind {kind!r}")
        if s.get("populate"):
            flags |= linux.MAP_POPULATE
        if "at" in s:
            addr = self.addr(s["at"])
            flags |= linux.MAP_FIXED
        elif "after" in s:
            addr = self.regions[s["after"]].end
            flags |= linux.MAP_FIXED_NOREPLACE
        else:
            addr = self.next_slot(length)
            flags |= linux.MAP_FIXED_NOREPLACE
        for _ in range(64):
            try:
                got = self.d.mmap(addr, length, prot, flags, fd, offset)
            except OSError as e:
                if e.errno == errno_mod.EEXIST and "after" not in s and "at" not in s:
                    addr = self.next_slot(length)  # someone else took the slot
                    continue
                return {"ret": errname(e.errno or 0)}
            self.bind_region(s["as"], got, length)
            self.mapped.add(got, got + length)
            return {"ret": "ok"}
        raise RuntimeError("could not place a region")

    def op_reserve(self, s: dict[str, Any]) -> dict[str, Any]:
        length = int(s["pages"]) * PAGE_SIZE
        addr = self.next_slot(length)
        got = self.d.mmap(
            addr,
            length,
            linux.PROT_NONE,
            linux.MAP_PRIVATE | linux.MAP_ANONYMOUS | linux.MAP_FIXED_NOREPLACE,
        )
        self.d.munmap(got, length)
        self.bind_region(s["as"], got, length)
        return {"ret": "ok"}

    def op_munmap(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        try:
            self.d.munmap(start, length)
        except OSError as e:
            return {"ret": errname(e.errno or 0)}
        self.mapped.remove(start, start + _align_up(length, PAGE_SIZE))
        return {"ret": "ok"}

    def op_mremap(self, s: dict[str, Any]) -> dict[str, Any]:
        old, old_len = self.range(s["range"])
        new_len = int(s.get("new_len", old_len))
        flags = flag_value(s.get("flags", ["MAYMOVE"]), MREMAP_NAMES)
        new_addr = 0
        if "to" in s:
            new_addr = self.addr(s["to"])
            if "as" in s:
                self.bind_region(s["as"], new_addr, new_len)
        try:
            got = self.d.mremap(old, old_len, new_len, flags, new_addr)
        except OSError as e:
            return {"ret": errname(e.errno or 0)}
        moved = got != old
        if moved:
            if not flags & linux.MREMAP_DONTUNMAP:
                self.mapped.remove(old, old + old_len)
            self.mapped.add(got, got + new_len)
        elif new_len < old_len:
            self.mapped.remove(old + new_len, old + old_len)
        else:
            self.mapped.add(old, old + new_len)
        if "as" in s and "to" not in s:
            self.bind_region(s["as"], got, new_len)
        return {"ret": "ok", "moved": moved}

    def op_madvise(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        try:
            self.d.madvise(start, length, advice_value(s["advice"]))
        except OSError as e:
            return {"ret": errname(e.errno or 0)}
        return {"ret": "ok"}

    def op_mprotect(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        try:
            self.d.mprotect(start, length, flag_value(s["prot"], PROT_NAMES))
        except OSError as e:
            return {"ret": errname(e.errno or 0)}
        return {"ret": "ok"}

    # -- accesses -------------------------------------------------------------

    def access_result(self, r: AccessResult, with_data: bool) -> dict[str, Any]:
        if r.signo:
            return {
                "signal": SIGNAL_NAMES.get(r.signo, str(r.signo)),
                "si_code": SI_CODE_NAMES.get(r.signo, {}).get(r.si_code, r.si_code),
                "si_addr": self.table().name(r.si_addr),
                "done": r.done,
            }
        out: dict[str, Any] = {"result": "ok"}
        if with_data:
            out["data"] = encode_data(r.data or b"")
        return out

    def op_fill(self, s: dict[str, Any]) -> dict[str, Any]:
        addr = self.addr(s["addr"])
        length = int(s.get("len", 1))
        byte = int(s.get("byte", 0))
        if s.get("per_page"):
            first = addr // PAGE_SIZE
            data = bytes((byte + (addr + k) // PAGE_SIZE - first) & 0xFF for k in range(length))
        else:
            data = bytes([byte & 0xFF]) * length
        return self.access_result(self.d.user_access(addr, length, data, False), False)

    def op_touch(self, s: dict[str, Any]) -> dict[str, Any]:
        addr = self.addr(s["addr"])
        length = int(s.get("len", 1))
        data = bytes([int(s.get("value", 0)) & 0xFF]) * length if s.get("write") else None
        return self.access_result(self.d.user_access(addr, length, data, False), False)

    def op_peek(self, s: dict[str, Any]) -> dict[str, Any]:
        addr = self.addr(s["addr"])
        length = int(s.get("len", 1))
        return self.access_result(self.d.user_access(addr, length, None, True), True)

    def op_kernel_write(self, s: dict[str, Any]) -> dict[str, Any]:
        addr = self.addr(s["addr"])
        data = bytes([int(s.get("byte", 0)) & 0xFF]) * int(s.get("len", 1))
        try:
            return {"ret": self.d.kernel_write(addr, data)}
        except OSError as e:
            return {"ret": errname(e.errno or 0)}

    def op_kernel_read(self, s: dict[str, Any]) -> dict[str, Any]:
        addr = self.addr(s["addr"])
        try:
            data = self.d.kernel_read(addr, int(s.get("len", 1)))
        except OSError as e:
            return {"ret": errname(e.errno or 0)}
        return {"ret": len(data), "data": encode_data(data)}

    def op_pagemap(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        entries = self.d.pagemap(start, _align_up(length, PAGE_SIZE) // PAGE_SIZE)
        pages = [
            ("P" if e & linux.PM_PRESENT else "-") + ("W" if e & linux.PM_UFFD_WP else "-")
            for e in entries
        ]
        return {"pages": pages}

    # -- userfaultfd ------------------------------------------------------------

    def op_uffd_open(self, s: dict[str, Any]) -> dict[str, Any]:
        flags = flag_value(s.get("flags", ["CLOEXEC", "NONBLOCK"]), uapi.OPEN_FLAG_NAMES)
        try:
            self.uffds[s["as"]] = self.d.uffd_open(flags, s.get("via", "syscall"))
        except OSError as e:
            return {"ret": errname(e.errno or 0)}
        self.closed_uffds.discard(s["as"])
        return {"ret": "ok"}

    def ioctl(self, s: dict[str, Any], cmd: int, arg: uapi.UffdioStruct) -> str:
        """Issue the ioctl; return ``"ok"`` or the errno name."""
        try:
            self.d.uffd_ioctl(self.uffd(s["uffd"]), cmd, arg)
        except OSError as e:
            return errname(e.errno or 0)
        return "ok"

    @staticmethod
    def out_field(value: int) -> int | str:
        if value == UNTOUCHED:
            return "untouched"
        if value < 0:
            return "-" + errname(-value)
        return value

    def op_api(self, s: dict[str, Any]) -> dict[str, Any]:
        arg = uapi.uffdio_api(
            api=int(s.get("api", uapi.UFFD_API)),
            features=flag_value(s.get("features", []), uapi.FEATURE_NAMES),
        )
        ret = self.ioctl(s, uapi.UFFDIO_API, arg)
        return {
            "ret": ret,
            "features": uapi.flags_to_names(arg.features, uapi.FEATURE_NAMES),
            "ioctls": uapi.flags_to_names(arg.ioctls, uapi.IOCTL_BIT_NAMES),
        }

    def op_register(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        mode = flag_value(s.get("mode", ["MISSING"]), uapi.REGISTER_MODE_NAMES)
        arg = uapi.uffdio_register(uapi.uffdio_range(start, length), mode)
        ret = self.ioctl(s, uapi.UFFDIO_REGISTER, arg)
        if ret != "ok":
            return {"ret": ret}
        return {"ret": ret, "ioctls": uapi.flags_to_names(arg.ioctls, uapi.IOCTL_BIT_NAMES)}

    def op_unregister(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        return {"ret": self.ioctl(s, uapi.UFFDIO_UNREGISTER, uapi.uffdio_range(start, length))}

    def op_wake(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        return {"ret": self.ioctl(s, uapi.UFFDIO_WAKE, uapi.uffdio_range(start, length))}

    def op_copy(self, s: dict[str, Any]) -> dict[str, Any]:
        mode = flag_value(s.get("mode", []), uapi.COPY_MODE_NAMES)
        arg = uapi.uffdio_copy(
            self.addr(s["dst"]), self.addr(s["src"]), int(s["len"]), mode, UNTOUCHED
        )
        ret = self.ioctl(s, uapi.UFFDIO_COPY, arg)
        return {"ret": ret, "copy": self.out_field(arg.copy)}

    def op_move(self, s: dict[str, Any]) -> dict[str, Any]:
        mode = flag_value(s.get("mode", []), uapi.MOVE_MODE_NAMES)
        arg = uapi.uffdio_move(
            self.addr(s["dst"]), self.addr(s["src"]), int(s["len"]), mode, UNTOUCHED
        )
        ret = self.ioctl(s, uapi.UFFDIO_MOVE, arg)
        return {"ret": ret, "move": self.out_field(arg.move)}

    def op_zeropage(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        mode = flag_value(s.get("mode", []), uapi.ZEROPAGE_MODE_NAMES)
        arg = uapi.uffdio_zeropage(uapi.uffdio_range(start, length), mode, UNTOUCHED)
        ret = self.ioctl(s, uapi.UFFDIO_ZEROPAGE, arg)
        return {"ret": ret, "zeropage": self.out_field(arg.zeropage)}

    def op_continue(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        mode = flag_value(s.get("mode", []), uapi.CONTINUE_MODE_NAMES)
        arg = uapi.uffdio_continue(uapi.uffdio_range(start, length), mode, UNTOUCHED)
        ret = self.ioctl(s, uapi.UFFDIO_CONTINUE, arg)
        return {"ret": ret, "mapped": self.out_field(arg.mapped)}

    def op_poison(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        mode = flag_value(s.get("mode", []), uapi.POISON_MODE_NAMES)
        arg = uapi.uffdio_poison(uapi.uffdio_range(start, length), mode, UNTOUCHED)
        ret = self.ioctl(s, uapi.UFFDIO_POISON, arg)
        return {"ret": ret, "updated": self.out_field(arg.updated)}

    def op_writeprotect(self, s: dict[str, Any]) -> dict[str, Any]:
        start, length = self.range(s["range"])
        mode = flag_value(s.get("mode", ["WP"]), uapi.WRITEPROTECT_MODE_NAMES)
        arg = uapi.uffdio_writeprotect(uapi.uffdio_range(start, length), mode)
        return {"ret": self.ioctl(s, uapi.UFFDIO_WRITEPROTECT, arg)}

    def format_msg(self, m: uapi.UffdMsg, table: RegionTable, fork_as: str | None) -> Any:
        if isinstance(m, uapi.PagefaultMsg):
            return {
                "event": "PAGEFAULT",
                "flags": uapi.flags_to_names(m.flags, uapi.PAGEFAULT_FLAG_NAMES),
                "address": table.name(m.address),
                "ptid": self.task_name(m.ptid),
            }
        if isinstance(m, uapi.ForkMsg):
            if fork_as is None:
                self.auto_names += 1
                fork_as = f"fork{self.auto_names}"
            self.uffds[fork_as] = self.d.uffd_adopt(m.ufd)
            return {"event": "FORK", "ufd": fork_as}
        if isinstance(m, uapi.RemapMsg):
            return {
                "event": "REMAP",
                "from": table.name(m.from_),
                "to": table.name(m.to),
                "len": m.len,
            }
        name = "REMOVE" if isinstance(m, uapi.RemoveMsg) else "UNMAP"
        return {"event": name, "start": table.name(m.start), "end": table.name(m.end)}

    def op_read(self, s: dict[str, Any], i: int) -> dict[str, Any]:
        size = int(s.get("size", uapi.UFFD_MSG_SIZE))
        table = self.table()
        try:
            raw = self.d.uffd_read(self.uffd(s["uffd"]), size)
        except OSError as e:
            return {"ret": errname(e.errno or 0)}
        msgs = [self.format_msg(m, table, s.get("fork_as")) for m in uapi.decode_msgs(raw)]
        if size <= uapi.UFFD_MSG_SIZE and len(msgs) == 1:
            return {"ret": "ok", "msg": msgs[0]}
        return {"ret": "ok", "msgs": msgs}

    def op_drain(self, s: dict[str, Any], i: int) -> dict[str, Any]:
        msgs: list[Any] = []
        while True:
            table = self.table()
            try:
                raw = self.d.uffd_read(self.uffd(s["uffd"]), uapi.UFFD_MSG_SIZE)
            except OSError as e:
                return {"msgs": msgs, "then": errname(e.errno or 0)}
            msgs += [self.format_msg(m, table, None) for m in uapi.decode_msgs(raw)]

    def op_poll(self, s: dict[str, Any]) -> dict[str, Any]:
        events = flag_value(s.get("events", ["POLLIN"]), POLL_NAMES)
        revents = self.d.uffd_poll(self.uffd(s["uffd"]), events, int(s.get("timeout_ms", 0)))
        return {"revents": uapi.flags_to_names(revents, POLL_NAMES)}

    def op_close(self, s: dict[str, Any]) -> dict[str, Any]:
        name = s["uffd"]
        try:
            self.d.uffd_close(self.uffd(name))
        except OSError as e:
            return {"ret": errname(e.errno or 0)}
        self.closed_uffds.add(name)
        return {"ret": "ok"}

    # -- threads and processes ----------------------------------------------------

    def op_join(self, s: dict[str, Any]) -> dict[str, Any]:
        w = self.workers.get(s["thread"])
        if w is None:
            raise ScenarioError(f"unknown thread {s['thread']!r}")
        if not w.wait(int(s.get("timeout_ms", 300)) / 1000):
            return {"state": "blocked"}
        r: dict[str, Any] = w.outcome()
        return r

    def op_fork(self, s: dict[str, Any], i: int) -> dict[str, Any]:
        ops: list[ChildOp] = []
        for c in s.get("child", []):
            kind = c["op"]
            if kind == "wait":
                ops.append(ChildOp("wait"))
            elif kind in ("peek", "touch"):
                ops.append(
                    ChildOp(
                        kind,
                        self.addr(c["addr"]),
                        int(c.get("len", 1)),
                        bool(c.get("write", False)),
                        int(c.get("value", 0)),
                    )
                )
            else:
                raise ScenarioError(f"unknown child op {kind!r}")
        self.children[s["as"]] = (None, ops)
        try:
            child = self.d.fork(ops)
        except OSError as e:
            return {"ret": errname(e.errno or 0)}
        self.children[s["as"]] = (child, ops)
        self.task_names[child.pid] = s["as"]
        return {"ret": "ok"}

    def child(self, name: str) -> tuple[Any, list[ChildOp]]:
        c = self.children.get(name)
        if c is None or c[0] is None:
            raise ScenarioError(f"unknown child {name!r}")
        return c

    def op_release_child(self, s: dict[str, Any]) -> dict[str, Any]:
        self.child(s["child"])[0].release()
        return {"ret": "ok"}

    def op_wait_child(self, s: dict[str, Any]) -> dict[str, Any]:
        child, ops = self.child(s["child"])
        state = child.wait(int(s.get("timeout_ms", 1000)) / 1000)
        results = [
            self.access_result(r, ops[k].kind == "peek") for k, r in enumerate(child.results())
        ]
        return {"state": state, "results": results}

    # -- cleanup --------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Close every uffd, kill children, wait for workers, unmap regions.
        Returns the names of workers still stuck afterwards."""
        for name, h in list(self.uffds.items()):
            if name not in self.closed_uffds:
                try:
                    self.d.uffd_close(h)
                except OSError:
                    pass  # already closed by the scenario through another name
                self.closed_uffds.add(name)
        for child, _ops in self.children.values():
            if child is not None:
                child.kill()
        stuck = []
        for name, w in self.workers.items():
            if not w.wait(2.0):
                stuck.append(name)
        # Unmap only what the runner mapped and still believes mapped: an old
        # region's range may hold someone else's mapping by now.
        for start, end in self.mapped.spans:
            try:
                self.d.munmap(start, end - start)
            except OSError:
                pass  # best effort: cleanup must reach close()
        for fd, _psize in self.memfds.values():
            self.d.close_fd(fd)
        self.d.close()
        return stuck


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def run_scenario(driver: Driver, scenario: dict[str, Any]) -> dict[str, Any]:
    """Replay ``scenario`` through ``driver``; return its result document."""
    return Runner(driver, scenario).run()


def load_json(path: str | os.PathLike[str]) -> Any:
    """Read one scenario or golden file."""
    import json

    with open(path) as f:
        return json.load(f)


__all__ = ["Runner", "ScenarioError", "run_scenario", "encode_data", "RegionTable"]
