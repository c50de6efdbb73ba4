"""Benchmarks of the userfaultfd (issue 5): vmemu's uffd against the real kernel's.

Run from the repository root::

    python benchmarks/bench_uffd.py              # full: 20,000 pages per round trip, 7 reps
    python benchmarks/bench_uffd.py --quick      # 200 pages, 7 reps: a few seconds
    python benchmarks/bench_uffd.py --cpu-time   # process CPU time instead of wall time
    python benchmarks/bench_uffd.py --markdown   # the table as Markdown

Every figure is a ratio to a reference measured in the same repetition of
the same invocation; the scenarios run round-robin (see ``_harness.py``)
and the table gives the median with [min-max] over the repetitions. The
kernel references run the *same* handler code on the real kernel through
:mod:`vmemu.native` (``NativeProcess`` / ``NativeUserfaultfd``), with the
handler on its own thread blocking in ``read()``, the two threads pinned
with ``os.sched_setaffinity`` either to one CPU ("same CPU") or to two
("split"). Without a usable userfaultfd (not Linux x86-64, no privilege,
no feature) the kernel references are skipped with the reason printed.

Round trips (one fault per page, ``--pages`` pages touched one by one from
a Python loop; time per fault):

* ``COPY``: MISSING fault on private anonymous memory, resolved by
  UFFDIO_COPY of a 4 KiB page;
* ``ZEROPAGE``: the same fault resolved by UFFDIO_ZEROPAGE;
* ``CONTINUE``: MINOR fault on a shared memfd mapping whose page cache is
  full, resolved by UFFDIO_CONTINUE;
* ``MOVE``: MISSING fault resolved by UFFDIO_MOVE of a page from a
  populated source area;
* ``WP``: write to a uffd-wp protected page, resolved by
  UFFDIO_WRITEPROTECT(mode=0) of that page.

Each is timed three ways on vmemu - handler inline
(``uffd.set_inline_handler``: the faulting task runs it before sleeping),
on a handler thread with both threads on one CPU, and split - and two ways
on the kernel (same CPU, split). Ratios: inline / kernel same-CPU (target
1.0x, stretch 0.6x); thread same-CPU / kernel same-CPU (2.0x); thread split
/ kernel split (1.25x).

Within a repetition the ways ("arms") are set up side by side and timed in
ten interleaved slices of the pages, each arm taking its next slice in turn
(the order rotating): this VM's host has fast and slow spells of a few
seconds, and an arm timed whole, seconds after its reference, could land in
another spell than the reference did.

Single ioctls without faults (nobody waits, no wake-up to do): COPY,
ZEROPAGE, CONTINUE, MOVE and WRITEPROTECT (protect, then unprotect) over
fresh ranges, 4 KiB per call (target 1.5x the kernel) and 2 MiB per call,
timed per 4 KiB page (target 5x).

Mapped accesses: 8-byte reads and writes (TLB hits) to pages of a
registered range whose faults were all resolved, against the same accesses
to an unregistered range (target 1.0x).

Nothing asserts on time: this file prints, and pytest does not collect it.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # run from a checkout without installing

import _harness  # noqa: E402
from _harness import Metric, Scenario, run_round_robin, use_cpu_time  # noqa: E402

import vmemu  # noqa: E402
from vmemu.constants import (  # noqa: E402
    MADV_NOHUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.uffd import uapi  # noqa: E402

RW = PROT_READ | PROT_WRITE
KINDS = ("COPY", "ZEROPAGE", "CONTINUE", "MOVE", "WP")

# what each kind needs from UFFDIO_API and UFFDIO_REGISTER
_FEATURES = {
    "COPY": 0,
    "ZEROPAGE": 0,
    "CONTINUE": uapi.UFFD_FEATURE_MINOR_SHMEM,
    "MOVE": uapi.UFFD_FEATURE_MOVE,
    "WP": uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP,
}
_MODE = {
    "COPY": uapi.UFFDIO_REGISTER_MODE_MISSING,
    "ZEROPAGE": uapi.UFFDIO_REGISTER_MODE_MISSING,
    "CONTINUE": uapi.UFFDIO_REGISTER_MODE_MINOR,
    "MOVE": uapi.UFFDIO_REGISTER_MODE_MISSING,
    "WP": uapi.UFFDIO_REGISTER_MODE_WP,
}


# -- the two worlds ------------------------------------------------------------------

def emu_process(spin_ns: int | None = None) -> Any:
    """A fresh emulated process (its own kernel, threads runtime); ``spin_ns`` sets how long
    its parking threads may spin (None: the runtime's default, 0: the pipe parker)."""
    if spin_ns is None:
        return vmemu.Process()
    from vmemu.sched import ThreadRuntime, Tracer

    return vmemu.Kernel(runtime=ThreadRuntime(tracer=Tracer(enabled=False), spin_ns=spin_ns)).spawn()


def native_process() -> Any:
    """This process, through the native binding."""
    from vmemu.native import NativeProcess

    return NativeProcess()


def kernel_unavailable() -> dict[str, str]:
    """Why each kind cannot run on the real kernel here ({} when all can)."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return dict.fromkeys(KINDS, "not Linux x86-64")
    try:
        from vmemu.native import NativeUserfaultfd

        with NativeUserfaultfd.open(uapi.O_CLOEXEC) as u:
            supported = u.api(0).features
    except OSError as e:
        return dict.fromkeys(KINDS, f"userfaultfd(2) failed: {os.strerror(e.errno or 0)}")
    except Exception as e:  # noqa: BLE001 - any reason to skip is printed
        return dict.fromkeys(KINDS, f"native binding unavailable: {e}")
    out = {}
    for kind, need in _FEATURES.items():
        if need & ~supported:
            out[kind] = f"the kernel lacks feature {need:#x}"
    if len(os.sched_getaffinity(0)) < 2:
        out["split"] = "fewer than two CPUs to split the threads over"
    return out


class Setup:
    """A registered range of ``n`` pages ready for ``kind``'s faults or ioctls, in ``proc``.

    ``resolve(addr)`` is the handler's one ioctl for the page at ``addr``;
    ``access(addr)`` is the faulting access; ``close()`` unmaps everything.
    """

    def __init__(self, proc: Any, kind: str, n: int, *, faults: bool = True) -> None:
        self.proc, self.kind, self.n = proc, kind, n
        size = n * PAGE_SIZE
        self.size = size
        self.maps: list[tuple[int, int]] = []
        self.fd = -1
        self.src = self._map(PMD_SIZE if kind == "COPY" else PAGE_SIZE)
        proc.write(self.src, b"\x5a" * PAGE_SIZE)
        if kind == "CONTINUE":
            self.fd = proc.memfd_create("bench_uffd")
            proc.ftruncate(self.fd, size)
            chunk = b"\xc3" * (256 * PAGE_SIZE)
            for off in range(0, size, len(chunk)):
                proc.pwrite(self.fd, chunk[: min(len(chunk), size - off)], off)
            self.area = self._map(size, MAP_SHARED, self.fd)
        else:
            self.area = self._map(size)
        if kind == "MOVE":  # a populated source, one page per destination page
            self.move_src = self._map(size)
            for a in range(self.move_src, self.move_src + size, PAGE_SIZE):
                proc.write(a, b"\x3c")
        if kind == "WP":  # populated first, then protected as a whole
            for a in range(self.area, self.area + size, PAGE_SIZE):
                proc.write(a, b"\x01")
        self.uffd = proc.userfaultfd(uapi.O_CLOEXEC)
        self.uffd.api(_FEATURES[kind])
        self.uffd.register(self.area, size, _MODE[kind])
        if kind == "WP" and faults:
            self.uffd.writeprotect(self.area, size, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
        u = self.uffd
        area, src = self.area, self.src
        if kind == "COPY":
            self.resolve: Callable[[int], Any] = lambda a: u.copy(a, src, PAGE_SIZE)
        elif kind == "ZEROPAGE":
            self.resolve = lambda a: u.zeropage(a, PAGE_SIZE)
        elif kind == "CONTINUE":
            self.resolve = lambda a: u.continue_(a, PAGE_SIZE)
        elif kind == "MOVE":
            delta = self.move_src - area
            self.resolve = lambda a: u.move(a, a + delta, PAGE_SIZE)
        else:
            self.resolve = lambda a: u.writeprotect(a, PAGE_SIZE, 0)

    def _map(self, length: int, flags: int = MAP_PRIVATE | MAP_ANONYMOUS, fd: int = -1) -> int:
        a = int(self.proc.mmap(0, length, RW, flags, fd, 0))
        if fd == -1:
            self.proc.madvise(a, length, MADV_NOHUGEPAGE)  # 4 KiB pages on both sides
        self.maps.append((a, length))
        return a

    def pages(self) -> range:
        """The address of every page of the registered range."""
        return range(self.area, self.area + self.size, PAGE_SIZE)

    def close(self) -> None:
        """Close the uffd and unmap everything."""
        self.uffd.close()
        for a, length in self.maps:
            self.proc.munmap(a, length)
        if self.fd >= 0:
            self.proc.close(self.fd)


def _touch(s: Setup, task: Any) -> Callable[[range], None]:
    """A loop touching each page of a range once: a read, or a write for WP."""
    read, write = task.read, task.write
    if not isinstance(s.proc, vmemu.Process):
        # The kernel reference touches memory with a bare ctypes.memmove, as before
        # NativeTask made its accesses signal-safe (~1 us more per access).
        from vmemu.native.process import raw_read as read
        from vmemu.native.process import raw_write as write
    if s.kind == "WP":

        def run(pages: range) -> None:
            for a in pages:
                write(a, b"\x02")
    else:

        def run(pages: range) -> None:
            for a in pages:
                read(a, 1)
    return run


def handler_loop(s: Setup, count: int) -> None:
    """The handler: block in read(), resolve the page the message names; ``count`` faults."""
    read, resolve = s.uffd.read, s.resolve
    for _ in range(count):
        for msg in read(32):
            resolve(msg.address & ~(PAGE_SIZE - 1))


def inline_handler(s: Setup) -> Callable[[Any], None]:
    """The same handler body, for ``set_inline_handler`` (called with the uffd)."""
    resolve = s.resolve

    def handler(uffd: Any) -> None:
        for msg in uffd.read_msgs(32):
            resolve(msg.address & ~(PAGE_SIZE - 1))
    return handler


# -- timing ------------------------------------------------------------------------

class Arm:
    """One way of taking ``kind`` round trips, set up once and timed chunk by chunk.

    ``how``: "inline" (the handler runs on the faulting task), "same" (a
    handler thread on the faulting thread's CPU) or "split" (on another CPU).
    """

    def __init__(self, proc: Any, kind: str, n: int, how: str) -> None:
        self.s = s = Setup(proc, kind, n)
        self.pages = s.pages()
        self.touch = _touch(s, proc.main)
        self.handler: Any = None
        cpus = sorted(os.sched_getaffinity(0))
        self.all_cpus = set(cpus)
        self.fault_cpus = self.all_cpus
        if how == "inline":
            s.uffd.set_inline_handler(inline_handler(s))
            return
        fault_cpu, handler_cpu = cpus[0], cpus[0] if how == "same" else cpus[-1]
        self.fault_cpus = {fault_cpu}
        ready = threading.Event()

        def handler(_task: Any) -> None:
            os.sched_setaffinity(0, {handler_cpu})  # this thread only (Linux)
            ready.set()
            handler_loop(s, n)

        self.handler = proc.spawn(handler, name="handler")
        ready.wait()

    def run(self, lo: int, hi: int) -> float:
        """Seconds to touch pages ``lo`` to ``hi`` (one round trip each)."""
        os.sched_setaffinity(0, self.fault_cpus)
        try:
            t0 = _harness.clock()
            self.touch(self.pages[lo:hi])
            return _harness.clock() - t0
        finally:
            os.sched_setaffinity(0, self.all_cpus)

    def close(self) -> None:
        """Wait for the handler (it has read every message), unmap everything."""
        try:
            if self.handler is not None:
                self.handler.join()
        finally:
            self.s.close()


def time_round_trips(arms: dict[str, tuple[Any, str]], kind: str, n: int,
                     chunks: int = 10) -> dict[str, float]:
    """Seconds per fault for each arm (``name: (process, how)``), timed in ``chunks``
    interleaved slices of the ``n`` pages: every arm takes its next slice in turn (the
    order rotating), so all of them are measured through the same moments of the host."""
    import gc

    live: dict[str, Arm] = {}
    try:
        for name, (proc, how) in arms.items():
            live[name] = Arm(proc, kind, n, how)
        total = dict.fromkeys(live, 0.0)
        order = list(live)
        bounds = [n * i // chunks for i in range(chunks + 1)]
        for c in range(chunks):
            gc.collect()
            for name in order[c % len(order):] + order[:c % len(order)]:
                total[name] += live[name].run(bounds[c], bounds[c + 1])
        return {name: t / n for name, t in total.items()}
    finally:
        for arm in live.values():
            arm.close()


def time_ioctls(proc: Any, kind: str, n: int, chunk: int) -> float:
    """Seconds per 4 KiB page of ``kind`` ioctls of ``chunk`` bytes over ``n`` fresh pages.

    WP protects the range chunk by chunk, then unprotects it: per page, the
    mean of the two.
    """
    import gc

    s = Setup(proc, kind, n, faults=False)
    u = s.uffd
    starts = range(s.area, s.area + s.size, chunk)
    try:
        if kind == "COPY":
            src = s.src

            def run() -> None:
                for a in starts:
                    u.copy(a, src, chunk)
            if chunk > PAGE_SIZE:  # a 2 MiB source, so each call copies 2 MiB of data
                proc.write(s.src, b"\x5a" * chunk)
        elif kind == "ZEROPAGE":
            def run() -> None:
                for a in starts:
                    u.zeropage(a, chunk)
        elif kind == "CONTINUE":
            def run() -> None:
                for a in starts:
                    u.continue_(a, chunk)
        elif kind == "MOVE":
            delta = s.move_src - s.area

            def run() -> None:
                for a in starts:
                    u.move(a, a + delta, chunk)
        else:
            wp = uapi.UFFDIO_WRITEPROTECT_MODE_WP

            def run() -> None:
                for a in starts:
                    u.writeprotect(a, chunk, wp)
                for a in starts:
                    u.writeprotect(a, chunk, 0)
        gc.collect()
        t0 = _harness.clock()
        run()
        t = _harness.clock() - t0
        return t / n / (2 if kind == "WP" else 1)
    finally:
        s.close()


# -- scenarios ---------------------------------------------------------------------

def _ratio_metric(sc: Scenario, key: str, name: str, target: float | None) -> Metric:
    return sc.metric(key, name, "x", target=target, fmt="{:.2f}")


class RoundTrip(Scenario):
    """Fault + resolve round trips of one kind: vmemu inline/threads vs the kernel."""

    def __init__(self, kind: str, n: int, skip: dict[str, str]) -> None:
        super().__init__()
        self.name = f"round trip {kind}"
        self.kind, self.n = kind, n
        self.kernel = kind not in skip
        self.split = "split" not in skip
        self.metric("inline_us", f"{kind} round trip, vmemu inline", "us", fmt="{:.1f}")
        self.metric("same_us", f"{kind} round trip, vmemu thread, same CPU", "us", fmt="{:.1f}")
        if self.split:
            self.metric("split_us", f"{kind} round trip, vmemu thread, split", "us", fmt="{:.1f}")
            self.metric("pipe_us", f"{kind} round trip, vmemu thread, split, no spinning", "us",
                        fmt="{:.1f}")
            _ratio_metric(self, "spin", f"{kind}: split, spinning / pipe parker", None)
        if self.kernel:
            self.metric("k_same_us", f"{kind} round trip, kernel, same CPU", "us", fmt="{:.1f}")
            if self.split:
                self.metric("k_split_us", f"{kind} round trip, kernel, split", "us",
                            fmt="{:.1f}")
            _ratio_metric(self, "inline", f"{kind}: vmemu inline / kernel same CPU", 1.0)
            _ratio_metric(self, "same", f"{kind}: vmemu thread / kernel, same CPU", 2.0)
            if self.split:
                _ratio_metric(self, "split", f"{kind}: vmemu thread / kernel, split", 1.25)

    def run_once(self) -> None:
        hows = ["inline", "same"] + (["split"] if self.split else [])
        arms = {how: (emu_process(), how) for how in hows}
        if self.split:
            arms["pipe"] = (emu_process(spin_ns=0), "split")
        if self.kernel:
            for how in hows[1:]:
                arms[f"k_{how}"] = (native_process(), how)
        t = time_round_trips(arms, self.kind, self.n)
        for name, per_fault in t.items():
            self.record(f"{name}_us", per_fault * 1e6)
        if self.split:
            self.record("spin", t["split"] / t["pipe"])
        if not self.kernel:
            return
        self.record("inline", t["inline"] / t["k_same"])
        self.record("same", t["same"] / t["k_same"])
        if self.split:
            self.record("split", t["split"] / t["k_split"])


class Ioctls(Scenario):
    """Single ioctls without faults, 4 KiB and 2 MiB per call, against the kernel."""

    name = "ioctls"

    def __init__(self, n: int, skip: dict[str, str]) -> None:
        super().__init__()
        self.n = n
        self.kinds = [k for k in KINDS if k not in skip]
        for kind in self.kinds:
            label = "WRITEPROTECT" if kind == "WP" else kind
            self.metric(f"{kind}_4k_us", f"{label} 4 KiB, vmemu, per call", "us", fmt="{:.2f}")
            _ratio_metric(self, f"{kind}_4k", f"{label} 4 KiB: vmemu / kernel", 1.5)
            self.metric(f"{kind}_2m_us", f"{label} 2 MiB, vmemu, per 4 KiB", "us", fmt="{:.2f}")
            _ratio_metric(self, f"{kind}_2m", f"{label} 2 MiB per 4 KiB: vmemu / kernel", 5.0)

    def run_once(self) -> None:
        for kind in self.kinds:
            for chunk, tag in ((PAGE_SIZE, "4k"), (PMD_SIZE, "2m")):
                emu = time_ioctls(emu_process(), kind, self.n, chunk)
                ker = time_ioctls(native_process(), kind, self.n, chunk)
                self.record(f"{kind}_{tag}_us", emu * 1e6)
                self.record(f"{kind}_{tag}", emu / ker)


class MappedAccess(Scenario):
    """TLB-hit accesses in a registered, resolved range vs an unregistered one (vmemu)."""

    name = "mapped access"

    def __init__(self, n: int, loops: int) -> None:
        super().__init__()
        self.n, self.loops = n, loops
        # "the same cost": within 5 %, the noise of a best-of-3 micro loop here
        _ratio_metric(self, "read", "read 8 B, registered+resolved / unregistered", 1.05)
        _ratio_metric(self, "write", "write 8 B, registered+resolved / unregistered", 1.05)

    def _time(self, registered: bool, write: bool) -> float:
        p = emu_process()
        s = Setup(p, "COPY", self.n, faults=False)
        if registered:
            for a in s.pages():
                s.resolve(a)
        else:
            s.uffd.unregister(s.area, s.size)
            for a in s.pages():
                p.write(a, b"\x01")
        pages = list(s.pages())
        for a in pages:  # fill the TLB (read and write sides)
            p.write(a, p.read(a, 1))
        task = p.main
        loops = range(self.loops)
        if write:
            wr, data = task.write, b"\x07" * 8

            def run() -> None:
                for _ in loops:
                    for a in pages:
                        wr(a, data)
        else:
            rd = task.read

            def run() -> None:
                for _ in loops:
                    for a in pages:
                        rd(a, 8)
        t = _harness.best_of(run)
        s.close()
        return t

    def run_once(self) -> None:
        for write, key in ((False, "read"), (True, "write")):
            reg = self._time(True, write)
            unreg = self._time(False, write)
            self.record(key, reg / unreg)


# -- output ------------------------------------------------------------------------

def format_rows(scenarios: list[Scenario], markdown: bool) -> str:
    """metric | median [min-max] | target | verdict."""
    rows = [("metric", "median [min-max]", "target", "")]
    for sc in scenarios:
        for m in sc.metrics.values():
            if not m.samples:
                continue
            fig = f"{m.fmt.format(m.median)} [{m.fmt.format(min(m.samples))}" \
                  f"\u2013{m.fmt.format(max(m.samples))}] {m.unit}"
            rows.append((m.name, fig, m.target_str(), m.verdict()))
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|---|---|---|---|"]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(out)
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(f"{c:<{w[i]}}" if i != 1 else f"{c:>{w[i]}}"
                     for i, c in enumerate(r)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 pages per run, 7 repetitions")
    ap.add_argument("--pages", type=int, default=None, help="pages per round-trip run")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (at least 7)")
    ap.add_argument("--only", default="", help="comma-separated: round,ioctls,access")
    ap.add_argument("--kinds", default=",".join(KINDS), help="round-trip kinds to run")
    ap.add_argument("--cpu-time", action="store_true", help="time with process CPU time")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    if args.cpu_time:
        use_cpu_time()
    n = args.pages or (200 if args.quick else 20_000)
    n_ioctl = 1024 if args.quick else 8192  # a multiple of 512: whole 2 MiB calls
    reps = max(7, args.reps or 7)
    only = set(args.only.split(",")) if args.only else {"round", "ioctls", "access"}
    skip = kernel_unavailable()
    for what, why in sorted(skip.items()):
        print(f"kernel reference skipped for {what}: {why}")
    scenarios: list[Scenario] = []
    if "round" in only:
        scenarios += [RoundTrip(k, n, skip) for k in args.kinds.split(",") if k]
    if "ioctls" in only:
        scenarios.append(Ioctls(n_ioctl, skip))
    if "access" in only:
        scenarios.append(MappedAccess(1024, 10 if args.quick else 100))
    run_round_robin(scenarios, reps,
                    progress=(lambda s: print(s, file=sys.stderr)) if os.environ.get(
                        "BENCH_PROGRESS") else None)
    print(f"vmemu userfaultfd benchmarks: {n} pages per round trip, {n_ioctl} pages per "
          f"ioctl run, {reps} repetitions, Python {sys.version.split()[0]}, "
          f"{'CPU' if args.cpu_time else 'wall'} time; median [min\u2013max] over repetitions")
    print(format_rows(scenarios, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
