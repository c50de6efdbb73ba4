"""The uffd stateful machine's operations, replayed on vmemu and on the real kernel.

``tests/property/test_uffd_stateful.py`` checks vmemu against a model; this
file checks the model's ground truth itself: a few fixed, seeded random
sequences of the same operations (register, unregister, copy, zeropage,
continue, poison, writeprotect, move, touch, madvise, munmap, mmap, mremap,
fork) run on a ``vmemu.Process`` and on this process through
``vmemu.native``, and every outcome must be equal: return values, errnos
and output fields, values read or the signal taken, and after every step
the uffd-wp and present bits of each page (pagemap) and the VMA layout of
the window (maps). Both uffds have UFFD_FEATURE_SIGBUS, so no access ever
blocks and no handler thread is needed; a fork's child reads every page in
turn and stops at its first signal (``vmemu.native.access.fork_child``).

The second uffd also has UFFD_FEATURE_EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP:
munmap, mmap(MAP_FIXED), mremap and madvise run on a thread of their own
while the test is the monitor: for each message it first probes
``mmap_changing`` (a ZEROPAGE that must fail EAGAIN with -EAGAIN in the
field), then reads the message (kind and payload, relative to the window)
and goes on until the thread has returned, so the events raised, their
order, their payloads and the syscall's result are all compared.

The layout is the stateful machine's, inside a window of a PROT_NONE
reservation (see tests/differential/_kernel.py for why)::

    window + 0 .. 3     A: anon pages (munmap / mmap(MAP_FIXED) / mremap move them)
    window + 16 .. 17   the COPY source; + 18 a hole; + 20 .. 21 the MOVE sources
    window + 32 .. 35   S: a shmem memfd of 4 pages, MAP_SHARED; + 48 .. 51 S2: its alias
    base + 2 MiB        H: a hugetlb memfd of 2 huge pages, MAP_SHARED; + 6 MiB H2: its alias
    base + 10 MiB       the hugetlb COPY source, 2 huge pages; + 14 MiB: PROT_NONE (EFAULT)

H needs 4 free pages in the host's hugetlb pool (the test skips otherwise). A
write to a hugetlb page that is uffd-wp while its VMA is not registered for WP
never ends on 6.18 (``hugetlb_wp`` returns at once for a uffd-wp entry and the
fault repeats); both sides skip such a write, judged from their own pagemap and
smaps (``VmFlags: uw``), and record that they did.
"""

from __future__ import annotations

import errno
import os
import random
import select
import struct
import threading
from typing import Any

import pytest
from _kernel import (
    ON_LINUX_X86_64,
    SKIP_REASON,
    host_free_hugepages,
    native_access_or_skip,
    parse_maps,
)

import vmemu
from vmemu.constants import (
    MADV_DONTNEED,
    MADV_FREE,
    MADV_REMOVE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.errors import Sigbus, Sigsegv
from vmemu.mmu.memfd import MFD_HUGETLB
from vmemu.mmu.mremap import MREMAP_FIXED, MREMAP_MAYMOVE
from vmemu.uffd import uapi

pytestmark = pytest.mark.differential

W = 4
RW = PROT_READ | PROT_WRITE
RESERVE = 16 << 20
HPAGE = 2 << 20
HW = 2  # huge pages in H
HINT = 0x100000000000  # 16 TiB, far below mmap_base
WINDOW = 64
FEATURES = (uapi.UFFD_FEATURE_SIGBUS | uapi.UFFD_FEATURE_WP_UNPOPULATED | uapi.UFFD_FEATURE_POISON
            | uapi.UFFD_FEATURE_MOVE | uapi.UFFD_FEATURE_MINOR_SHMEM)
EVENTS = (uapi.UFFD_FEATURE_EVENT_REMAP | uapi.UFFD_FEATURE_EVENT_REMOVE
          | uapi.UFFD_FEATURE_EVENT_UNMAP)  # the second uffd's
JOIN_S = 5.0
PM_UFFD_WP, PM_PRESENT = 1 << 57, 1 << 63
# six sequences by default; a campaign (VMEMU_HYPOTHESIS_PROFILE=campaign) replays 200
SEEDS = list(range(1, 201 if os.environ.get("VMEMU_HYPOTHESIS_PROFILE") == "campaign" else 7))
STEPS = 80
_U64 = struct.Struct("<Q")


class Side:
    """The window, the memfd, two SIGBUS uffds, on one kernel."""

    native = False

    def __init__(self) -> None:
        p = self.p = self._process()
        # low in the address space: the top-down allocator then never puts the process's own
        # small mappings (libffi, glibc) into the holes munmap and mremap leave in the window
        self.reserve = p.mmap(HINT, RESERVE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
        base = self.base = (self.reserve + (2 << 20) - 1) & ~((2 << 20) - 1)
        p.munmap(base, WINDOW * PAGE_SIZE)
        self.A = base
        self.srcbuf, self.hole, self.M = (base + k * PAGE_SIZE for k in (16, 18, 20))
        for addr, n in ((self.A, W), (self.srcbuf, 2), (self.M, 2)):
            p.mmap(addr, n * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        self.fd = p.memfd_create("uffd-replay")
        p.ftruncate(self.fd, W * PAGE_SIZE)
        # at the same 16-page alignment on both sides: fault-around windows are aligned
        self.S = p.mmap(base + 32 * PAGE_SIZE, W * PAGE_SIZE, RW, MAP_SHARED | MAP_FIXED,
                        self.fd, 0)
        self.S2 = p.mmap(base + 48 * PAGE_SIZE, W * PAGE_SIZE, RW, MAP_SHARED | MAP_FIXED,
                         self.fd, 0)
        self.hfd = p.memfd_create("uffd-replay-h", MFD_HUGETLB)
        p.ftruncate(self.hfd, HW * HPAGE)
        self.H = p.mmap(base + HPAGE, HW * HPAGE, RW, MAP_SHARED | MAP_FIXED, self.hfd, 0)
        self.H2 = p.mmap(base + 3 * HPAGE, HW * HPAGE, RW, MAP_SHARED | MAP_FIXED, self.hfd, 0)
        self.hsrc = base + 5 * HPAGE
        self.hhole = base + 7 * HPAGE  # still PROT_NONE
        p.mmap(self.hsrc, 2 * HPAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        self.uffds = []
        for k in range(2):
            u = p.userfaultfd(uapi.O_NONBLOCK | uapi.O_CLOEXEC)
            u.api(FEATURES | (EVENTS if k else 0))
            self.uffds.append(u)

    def _process(self) -> Any:
        k = vmemu.Kernel()
        k.set_nr_hugepages(4)
        return k.spawn()

    def close(self) -> None:
        for u in self.uffds:
            u.close()
        self.p.munmap(self.reserve, RESERVE)
        self.p.close(self.fd)
        self.p.close(self.hfd)

    def area(self, which: str) -> int:
        return {"A": self.A, "S": self.S, "H": self.H}[which]

    def smaps(self) -> str:
        return str(self.p.smaps())

    def stale_uffd_wp(self, addr: int) -> bool:
        """A uffd-wp entry or marker at ``addr`` in a VMA not registered for WP (smaps)."""
        if not self.p.pagemap(addr) & PM_UFFD_WP:
            return False
        flags, inside = "", False
        for line in self.smaps().splitlines():
            head = line.split()[0] if line.strip() else ""
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif line.startswith("VmFlags:") and inside:
                flags = line
        return " uw" not in flags

    # accesses that survive the signal they may end in
    def peek(self, addr: int) -> int | str:
        try:
            return int(self.p.read_u64(addr))
        except Sigbus:
            return "SIGBUS"
        except Sigsegv:
            return "SIGSEGV"

    def poke(self, addr: int, v: int) -> int | str:
        try:
            self.p.write_u64(addr, v)
        except Sigbus:
            return "SIGBUS"
        except Sigsegv:
            return "SIGSEGV"
        return v

    def fork_reads(self, addrs: list[int]) -> list[int | str]:
        """A child reads each address in turn; the values, then the signal that stopped it."""
        child = self.p.fork()
        out: list[int | str] = []
        try:
            for a in addrs:
                try:
                    out.append(int(child.read_u64(a)))
                except Sigbus:
                    return out + ["SIGBUS"]
                except Sigsegv:
                    return out + ["SIGSEGV"]
        finally:
            child.exit()
        return out

    def snapshot(self) -> tuple[Any, ...]:
        """pagemap uffd-wp / present bits of every page, and the window's VMA layout."""
        bits = []
        for base, n, ps in ((self.A, W, PAGE_SIZE), (self.S, W, PAGE_SIZE), (self.H, HW, HPAGE)):
            for i in range(n):
                pm = self.p.pagemap(base + i * ps)
                bits.append((bool(pm & PM_UFFD_WP), bool(pm & PM_PRESENT)))
        layout = parse_maps(self.p.maps(), self.base, self.base + WINDOW * PAGE_SIZE, self.base)
        return tuple(bits), tuple(layout)


class NativeSide(Side):
    """The same on Linux: this process's memory, accesses through the C helper."""

    native = True

    def _process(self) -> Any:
        from vmemu.native import NativeProcess

        return NativeProcess()

    def smaps(self) -> str:
        with open("/proc/self/smaps") as f:
            return f.read()

    def peek(self, addr: int) -> int | str:
        from vmemu.native import access

        res = access.user_access(addr, 8, want_data=True)
        if not res.ok:
            return {7: "SIGBUS", 11: "SIGSEGV"}[res.signo]
        assert res.data is not None
        return int(_U64.unpack(res.data)[0])

    def poke(self, addr: int, v: int) -> int | str:
        from vmemu.native import access

        res = access.user_access(addr, 8, write=_U64.pack(v))
        if not res.ok:
            return {7: "SIGBUS", 11: "SIGSEGV"}[res.signo]
        return v

    def fork_reads(self, addrs: list[int]) -> list[int | str]:
        from vmemu.native import access

        ops = [access.ChildOp(access.CHILD_PEEK, a, 8) for a in addrs]
        res_r, res_w = os.pipe()
        rel_r, rel_w = os.pipe()
        try:
            pid = access.fork_child(ops, res_w, rel_r)
            os.close(res_w)
            buf = b""
            while chunk := os.read(res_r, 65536):
                buf += chunk
            _, status = os.waitpid(pid, 0)
        finally:
            for fd in (res_r, rel_r, rel_w):
                os.close(fd)
        recs, _ = access.parse_child_records(buf)
        out: list[int | str] = [int(_U64.unpack(data)[0]) for _, _, data in recs]
        if os.WIFSIGNALED(status):
            out.append({7: "SIGBUS", 11: "SIGSEGV"}[os.WTERMSIG(status)])
        return out


def _call(fn: Any) -> Any:
    """The result of a syscall or ioctl: its value, or the errno name and the output fields."""
    try:
        return ("ok", fn())
    except OSError as e:
        s = getattr(e, "struct", None)
        fields = {f: getattr(s, f) for f in ("copy", "zeropage", "mapped", "updated", "move")
                  if s is not None and hasattr(s, f)}
        return (errno.errorcode.get(e.errno or 0, e.errno), fields)


def _event(side: Side, msg: Any) -> tuple[Any, ...]:
    """A non-cooperative message, addresses in bytes from the window base."""
    b = side.base
    if isinstance(msg, uapi.RemapMsg):
        return ("REMAP", msg.from_ - b, msg.to - b, msg.len)
    if isinstance(msg, uapi.RemoveMsg):
        return ("REMOVE", msg.start - b, msg.end - b)
    if isinstance(msg, uapi.UnmapMsg):
        return ("UNMAP", msg.start - b, msg.end - b)
    return (type(msg).__name__,)


def monitored(side: Side, fn: Any) -> Any:
    """Run an mm syscall on a thread while the test monitors the events uffd.

    Each message is preceded by an ``mmap_changing`` probe; the thread cannot
    return before the last event it raised is read, so once it is seen dead
    with nothing queued every event has been collected.
    """
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(_call(fn)), name="mm-op", daemon=True)
    t.start()
    u = side.uffds[1]
    events: list[Any] = []
    while True:
        alive = t.is_alive()
        if u.poll(select.POLLIN, 20) & select.POLLIN:
            probe = _call(lambda: u.zeropage(side.A, PAGE_SIZE))
            msgs = u.read_msgs(uapi.UFFD_MSG_SIZE)
            events.append((probe, [_event(side, m) for m in msgs]))
            continue
        if not alive:
            break
        assert len(events) < 16, f"the syscall does not return: {events}"
    t.join(JOIN_S)
    assert box, "the syscall did not return"
    return box[0], events


def gen_ops(seed: int) -> list[tuple[Any, ...]]:
    """A deterministic random sequence of the machine's operations."""
    r = random.Random(seed)
    ops: list[tuple[Any, ...]] = []
    for _ in range(STEPS):
        which, i, n, u = r.choice("ASH"), r.randrange(W), r.choice((1, 2)), r.choice((0, 1, 1))
        if which == "H":
            i %= HW
        n = min(n, (HW if which == "H" else W) - i)
        kind = r.choice(["register", "register", "unregister", "copy", "copy", "zeropage",
                         "continue", "poison", "writeprotect", "writeprotect", "move", "fill",
                         "touch", "touch", "alias", "madvise", "munmap", "mmap", "mremap", "fork"])
        if kind == "register":
            ops.append((kind, u, which, i, n, r.choice([1, 2, 3, 4, 5, 6])))
        elif kind in ("unregister", "zeropage", "poison"):
            ops.append((kind, u, which, i, n))
        elif kind == "copy":
            ops.append((kind, u, which, i, n, r.random() < 0.3, r.choice(["buf", "half", "hole"])))
        elif kind == "continue":
            ops.append((kind, u, which, i, n, r.random() < 0.3))
        elif kind == "writeprotect":
            ops.append((kind, u, which, i, n, r.random() < 0.6))
        elif kind == "move":
            ops.append((kind, u, r.randrange(2), i))
        elif kind == "fill":
            ops.append((kind, r.randrange(2)))
        elif kind == "touch":
            ops.append((kind, which, i, r.random() < 0.5))
        elif kind == "alias":
            ops.append((kind, "S" if which == "A" else which, i, r.random() < 0.5))
        elif kind == "madvise":
            ops.append((kind, which, i, n, r.choice([MADV_DONTNEED, MADV_REMOVE, MADV_FREE])))
        elif kind in ("munmap", "mmap"):
            ops.append((kind, i))
        elif kind == "mremap":
            ops.append((kind, i, r.randrange(W)))
        else:
            ops.append((kind,))
    return ops


def apply(side: Side, op: tuple[Any, ...], v: int) -> Any:
    """Run one operation; its outcome as a comparable value."""
    kind, *args = op
    p = side.p
    if kind in ("register", "unregister", "copy", "zeropage", "continue", "poison",
                "writeprotect"):
        u, which, i, n, *rest = args
        obj = side.uffds[u]
        ps = HPAGE if which == "H" else PAGE_SIZE
        dst, length = side.area(which) + i * ps, n * ps
        if kind == "register":
            return _call(lambda: obj.register(dst, length, rest[0]))
        if kind == "unregister":
            return _call(lambda: obj.unregister(dst, length))
        if kind == "copy":
            wp, src = rest
            srcbuf, hole = (side.hsrc, side.hhole) if which == "H" else (side.srcbuf, side.hole)
            for k in range(2):
                p.write_u64(srcbuf + k * ps, v + k)
            src_addr = {"buf": srcbuf, "half": srcbuf + ps, "hole": hole}[src]
            return _call(lambda: obj.copy(dst, src_addr, length, uapi.UFFDIO_COPY_MODE_WP * wp))
        if kind == "zeropage":
            return _call(lambda: obj.zeropage(dst, length))
        if kind == "continue":
            return _call(lambda: obj.continue_(dst, length, uapi.UFFDIO_CONTINUE_MODE_WP * rest[0]))
        if kind == "poison":
            return _call(lambda: obj.poison(dst, length))
        return _call(lambda: obj.writeprotect(dst, length, uapi.UFFDIO_WRITEPROTECT_MODE_WP
                                              * rest[0]))
    if kind == "move":
        u, src, i = args
        return _call(lambda: side.uffds[u].move(side.A + i * PAGE_SIZE, side.M + src * PAGE_SIZE,
                                                PAGE_SIZE))
    if kind == "fill":
        return side.poke(side.M + args[0] * PAGE_SIZE, v)
    if kind == "touch":
        which, i, write = args
        addr = side.area(which) + i * (HPAGE if which == "H" else PAGE_SIZE)
        if write and which == "H" and side.stale_uffd_wp(addr):
            return "skipped: livelocks on 6.18"
        return side.poke(addr, v) if write else side.peek(addr)
    if kind == "alias":
        which, i, write = args
        addr = side.S2 + i * PAGE_SIZE if which == "S" else side.H2 + i * HPAGE
        return side.poke(addr, v) if write else side.peek(addr)
    if kind == "madvise":
        which, i, n, advice = args
        ps = HPAGE if which == "H" else PAGE_SIZE
        return monitored(side, lambda: p.madvise(side.area(which) + i * ps, n * ps, advice))
    if kind == "munmap":
        return monitored(side, lambda: p.munmap(side.A + args[0] * PAGE_SIZE, PAGE_SIZE))
    if kind == "mmap":
        return monitored(side, lambda: p.mmap(side.A + args[0] * PAGE_SIZE, PAGE_SIZE, RW,
                                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
                         - side.base)
    if kind == "mremap":
        i, j = args
        return monitored(side, lambda: p.mremap(side.A + i * PAGE_SIZE, PAGE_SIZE, PAGE_SIZE,
                                                MREMAP_MAYMOVE | MREMAP_FIXED,
                                                side.A + j * PAGE_SIZE) - side.base)
    assert kind == "fork"
    return side.fork_reads([base + i * PAGE_SIZE for base in (side.A, side.S) for i in range(W)]
                           + [side.H + i * HPAGE for i in range(HW)])


def run(side: Side, ops: list[tuple[Any, ...]]) -> list[Any]:
    """Every operation's outcome and the state after it."""
    out = []
    try:
        for k, op in enumerate(ops):
            out.append((op, apply(side, op, 0x1000 + 2 * k), side.snapshot()))
    finally:
        side.close()
    return out


def _native_side() -> NativeSide:
    if not ON_LINUX_X86_64:
        pytest.skip(SKIP_REASON)
    native_access_or_skip()
    if host_free_hugepages() < 4:
        pytest.skip("host hugetlb pool has fewer than 4 free 2 MiB pages")
    try:
        return NativeSide()
    except OSError as e:
        pytest.skip(f"userfaultfd not permitted here: {e}")


@pytest.mark.parametrize("seed", SEEDS)
def test_replay_on_the_kernel(seed: int) -> None:
    ops = gen_ops(seed)
    native = run(_native_side(), ops)
    emulated = run(Side(), ops)
    for k, (n, e) in enumerate(zip(native, emulated, strict=True)):
        assert e == n, f"step {k} {n[0]}: vmemu {e[1:]}, Linux {n[1:]}; steps before: {ops[:k]}"
