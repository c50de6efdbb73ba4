"""uffd-stress: faulting lockers, fault handlers and background copiers racing on every memory type.

A port of ``tools/testing/selftests/mm/uffd-stress.c``. Two areas of
``NPAGES`` pages, ``area_src`` and ``area_dst``; every page holds a lock
word, a counter and a non-zero placeholder::

    page:  | lock word (u64) | counter (u64) | 1 (u64) | ...
             0                 8               16

Per emulated CPU, three tasks run for one *bounce*:

* a **locking task** picks pages (seeded random, or sequential, or all
  CPUs racing on the same sequence), reads the page's lock word - the first
  access to a missing page, so it is a *read* fault and a WRITE-flagged
  missing fault is an error - takes the page's lock (a sched ``Mutex``; the
  lock word records the owner and must be free), checks the counter against
  a shadow array, increments both and releases;
* a **handler task** resolves faults: MISSING by UFFDIO_COPY of the same
  page of ``area_src`` (EEXIST then WAKE, ``__copy_page``), WP by
  unprotecting the page; it waits in a blocking ``read()`` or in ``poll()``
  / ``select()`` on an O_NONBLOCK fd, by the test's parameter;
* a **background task** COPYs its share of pages: the first half, then (WP
  tested) write-protects its range, then the second half; its first
  successful COPY is re-issued and must fail with EEXIST
  (``retry_copy_page``).

When the background tasks are done the source is zapped (a racing handler
must then get EEXIST, never copy zeroes), the lockers stop, and the
handlers are stopped the uABI way: the main task touches one registered
*doorbell* page per handler; the handler that resolves a doorbell fault
exits (the C test cancels its threads). Then the bounce is checked: WP
cleared, range unregistered, every counter equal to its shadow,
``kernel.check()``; and src and dst swap roles for the next bounce.

With WP the range is registered MISSING|WP (WP_UNPOPULATED and
WP_HUGETLBFS_SHMEM asked for) and every COPY is MODE_WP, so each first write
takes a WP fault; every memory type runs with and without it, as uffd-stress
does on 6.18 (it drops WP only where UFFD_FEATURE_WP_HUGETLBFS_SHMEM is missing).

Runs (a) under ``SimRuntime(seed, ncpus=2)`` for hypothesis-drawn seeds,
checking that a seed replays the same trace and result, and (b) on real
threads. ``VMEMU_STRESS_SEEDS=n`` (or the ``campaign`` profile, 80 seeds)
runs more seeds than the default 4; ``VMEMU_STRESS_BOUNCES`` more bounces.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import select
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from uffd_harness import MEM_TYPES, Area, make_area

import vmemu
from vmemu.constants import (
    MADV_DONTNEED,
    MADV_REMOVE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.memfd import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from vmemu.sched import Mutex, SimRuntime, ThreadRuntime, Tracer
from vmemu.uffd import uapi

POLLIN = select.POLLIN
NCPUS = 2
# Pacing. Lockers and background copiers sleep between steps (virtual time under the
# simulation): a task that only charges CPU time keeps its CPU until its 0.75 ms slice
# ends, so two spinning lockers would hold both CPUs and leave a background task whose
# sleep expired one turn per slice (tests/sched/test_sim_timers.py). Sleeping leaves the
# CPUs to whoever is ready, which is what makes faults, handlers and copies interleave.
LOCK_NS = 5_000
BACKGROUND_NS = 20_000
BOUNCE_RANDOM = 1
BOUNCE_RACINGFAULTS = 2
LOCK_OFF, COUNT_OFF, PLACEHOLDER_OFF = 0, 8, 16
MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
WP = uapi.UFFDIO_REGISTER_MODE_WP

# Seeds per variant follow the hypothesis profile (default 4, campaign 80); the four
# bounces cover every bounce mode (random/sequential x racing or not) once.
SIM_SEEDS = int(os.environ.get("VMEMU_STRESS_SEEDS", max(4, settings().max_examples // 25)))
BOUNCES = int(os.environ.get("VMEMU_STRESS_BOUNCES", "4"))


def npages_for(kind: str) -> int:
    """Pages per area: 16 small pages, or 4 huge pages (2 per CPU, so each half has one)."""
    return 4 if kind.startswith("hugetlb") else 16


@attrs.define
class Stats:
    """What one bounce saw (``struct uffd_args`` plus the lockers' work)."""

    missing: int = 0
    wp: int = 0
    doorbells: int = 0
    eexist: int = 0
    locks: int = 0


@attrs.define
class Stress:
    """One uffd-stress run: the areas, the uffd and the shared state of a bounce."""

    kernel: vmemu.Kernel
    proc: vmemu.Process
    kind: str
    style: str  # "read", "poll" or "select"
    wp: bool
    seed: int
    src: Area
    dst: Area
    doorbell: int
    uffd: Any
    shadow: list[int]
    mutexes: list[Mutex]
    finished: bool = False
    bounce_mode: int = 0
    stats: Stats = attrs.Factory(Stats)
    history: list[tuple[int, ...]] = attrs.Factory(list)

    @property
    def psize(self) -> int:
        return self.dst.page_size

    @property
    def npages(self) -> int:
        return self.dst.npages

    def yield_cpu(self) -> None:
        """A syscall exit: let another task run (``cond_resched``)."""
        self.kernel.runtime.charge("spin")
        self.kernel.runtime.cond_resched()


def release_pages(s: Stress, area: Area) -> None:
    """Zap an area so every page is missing again (``uffd_test_ops->release_pages``)."""
    p = s.proc
    if area.kind in ("shmem", "hugetlb"):
        p.madvise(area.dst, area.size, MADV_REMOVE)
    else:
        p.madvise(area.dst, area.size, MADV_DONTNEED)
        if area.fd is not None:  # a private file mapping: the page cache must go too
            p.fallocate(area.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, area.size)


def copy_page(s: Stress, t: Any, page_nr: int, retry: bool = False) -> bool:
    """UFFDIO_COPY one page from src to dst; EEXIST -> UFFDIO_WAKE (``__copy_page``)."""
    off = page_nr * s.psize
    mode = uapi.UFFDIO_COPY_MODE_WP if s.wp else 0
    try:
        done = s.uffd.copy(s.dst.dst + off, s.src.dst + off, s.psize, mode)
    except OSError as e:
        if e.errno != errno.EEXIST or e.struct.copy != -errno.EEXIST:  # type: ignore[attr-defined]
            raise
        s.stats.eexist += 1
        s.uffd.wake(s.dst.dst + off, s.psize)
        return False
    assert done == s.psize
    if retry:  # retry_copy_page: the same COPY again must be EEXIST in the field
        try:
            s.uffd.copy(s.dst.dst + off, s.src.dst + off, s.psize, mode)
        except OSError as e:
            assert e.errno == errno.EEXIST, e
            assert e.struct.copy == -errno.EEXIST  # type: ignore[attr-defined]
        else:
            raise AssertionError("a second UFFDIO_COPY of a filled page succeeded")
    return True


def locking_task(t: Any, s: Stress, cpu: int) -> None:
    """Take per-page locks inside the registered area, count in memory and in the shadow."""
    rng = random.Random(s.seed * 1009 + cpu * 7919 + s.bounce_mode)
    per = s.npages // NCPUS
    page_nr = -s.bounce_mode
    if not s.bounce_mode & BOUNCE_RACINGFAULTS:
        page_nr += cpu * per
    base = s.dst.dst
    while not s.finished:
        if s.bounce_mode & BOUNCE_RANDOM:
            page_nr = rng.randrange(s.npages)
        else:
            page_nr = (page_nr + 1) % s.npages
        addr = base + page_nr * s.psize
        t.read_u64(addr + LOCK_OFF)  # the first access: a read fault if missing
        m = s.mutexes[page_nr]
        m.lock()
        try:
            owner = t.read_u64(addr + LOCK_OFF)
            assert owner == 0, f"page {page_nr}: lock word {owner:#x} while the mutex is free"
            t.write_u64(addr + LOCK_OFF, t.tid)
            count = t.read_u64(addr + COUNT_OFF)
            assert count == s.shadow[page_nr], \
                f"page_nr {page_nr} memory corruption {count} {s.shadow[page_nr]}"
            count += 1
            t.write_u64(addr + COUNT_OFF, count)
            s.shadow[page_nr] = count
            assert t.read_u64(addr + PLACEHOLDER_OFF) == 1
            t.write_u64(addr + LOCK_OFF, 0)
            s.stats.locks += 1
        finally:
            m.unlock()
        s.kernel.runtime.sleep(LOCK_NS / 1e9)


def wait_readable(s: Stress) -> None:
    """Wait until the uffd is readable: ``poll()``/``select()`` on the O_NONBLOCK fd."""
    if s.style == "select":
        r, _, _ = select.select([s.uffd.fileno()], [], [])
        assert r
        return
    revents = s.uffd.poll(POLLIN, -1)
    assert revents == POLLIN, f"unexpected revents {revents:#x}"


def handler_task(t: Any, s: Stress) -> None:
    """Resolve faults until a doorbell fault says stop (``uffd_read_thread``, ``_poll_thread``)."""
    while True:
        if s.style == "read":
            msgs = s.uffd.read_msgs(uapi.UFFD_MSG_SIZE)  # blocking, one message
        else:
            wait_readable(s)
            try:
                msgs = s.uffd.read_msgs(uapi.UFFD_MSG_SIZE * 4)
            except OSError as e:  # another handler took it: poll never promises a message
                if e.errno != errno.EAGAIN:
                    raise
                s.yield_cpu()
                continue
        stop = False
        for msg in msgs:
            assert isinstance(msg, uapi.PagefaultMsg), f"unexpected event {msg}"
            addr = msg.address
            if s.doorbell <= addr < s.doorbell + NCPUS * PAGE_SIZE:
                try:
                    s.uffd.zeropage(addr & ~(PAGE_SIZE - 1), PAGE_SIZE)
                except OSError as e:
                    assert e.errno == errno.EEXIST
                    s.uffd.wake(addr & ~(PAGE_SIZE - 1), PAGE_SIZE)
                s.stats.doorbells += 1
                stop = True
                continue
            assert s.dst.dst <= addr < s.dst.dst + s.dst.size, f"fault at {addr:#x} outside dst"
            page_nr = (addr - s.dst.dst) // s.psize
            if msg.flags & uapi.UFFD_PAGEFAULT_FLAG_WP:
                assert s.wp
                s.stats.wp += 1
                s.uffd.writeprotect(s.dst.dst + page_nr * s.psize, s.psize, 0)
            else:
                assert not msg.flags & uapi.UFFD_PAGEFAULT_FLAG_WRITE, "unexpected write fault"
                if copy_page(s, t, page_nr):
                    s.stats.missing += 1
        s.yield_cpu()
        if stop:
            return


def background_task(t: Any, s: Stress, cpu: int) -> None:
    """COPY this CPU's share: first half, write-protect the share (WP), second half."""
    per = s.npages // NCPUS
    start_nr, end_nr = cpu * per, (cpu + 1) * per
    mid_nr = (start_nr + end_nr) // 2
    retry = cpu == 0
    for page_nr in range(start_nr, mid_nr):
        if copy_page(s, t, page_nr, retry):
            retry = False
        s.kernel.runtime.sleep(BACKGROUND_NS / 1e9)
    if s.wp:
        s.uffd.writeprotect(s.dst.dst + start_nr * s.psize, per * s.psize,
                            uapi.UFFDIO_WRITEPROTECT_MODE_WP)
        s.yield_cpu()
    for page_nr in range(mid_nr, end_nr):
        copy_page(s, t, page_nr)
        s.kernel.runtime.sleep(BACKGROUND_NS / 1e9)


def stress(s: Stress) -> None:
    """One bounce's tasks (``stress()``)."""
    p = s.proc
    s.finished = False
    lockers, handlers, background = [], [], []
    for cpu in range(NCPUS):
        lockers.append(p.spawn(locking_task, s, cpu, name=f"locking-{cpu}"))
        handlers.append(p.spawn(handler_task, s, name=f"uffd-{cpu}"))
        background.append(p.spawn(background_task, s, cpu, name=f"background-{cpu}"))
    for h in background:
        h.join()
    # the whole area is in place: zap the source; a racing COPY must now be EEXIST
    release_pages(s, s.src)
    s.finished = True
    for h in lockers:
        h.join()
    for i in range(NCPUS):  # one doorbell per handler: each one that rings it exits
        assert p.read_u64(s.doorbell + i * PAGE_SIZE) == 0
    for h in handlers:
        h.join()


def init_src(s: Stress) -> None:
    """Lock word 0, counter 1, placeholder 1 in every source page; shadow = 1."""
    p = s.proc
    for nr in range(s.npages):
        addr = s.src.dst + nr * s.psize
        p.write_u64(addr + LOCK_OFF, 0)
        p.write_u64(addr + COUNT_OFF, 1)
        p.write_u64(addr + PLACEHOLDER_OFF, 1)
        s.shadow[nr] = 1


def one_bounce(s: Stress, bounce: int) -> None:
    """Register, stress, unprotect, unregister, verify, check (one turn of the C loop)."""
    p, u = s.proc, s.uffd
    s.bounce_mode = bounce
    mode = MISSING | (WP if s.wp else 0)
    ioctls = u.register(s.dst.dst, s.dst.size, mode)
    assert ioctls & (1 << uapi._UFFDIO_COPY)
    u.register(s.doorbell, NCPUS * PAGE_SIZE, MISSING)
    # a racing COPY of the previous bounce may have faulted zeroes into this area
    release_pages(s, s.dst)
    p.madvise(s.doorbell, NCPUS * PAGE_SIZE, MADV_DONTNEED)
    s.stats = Stats()
    stress(s)
    if s.wp:
        u.writeprotect(s.dst.dst, s.dst.size, 0)
    u.unregister(s.dst.dst, s.dst.size)
    u.unregister(s.doorbell, NCPUS * PAGE_SIZE)
    for nr in range(s.npages):
        count = p.read_u64(s.dst.dst + nr * s.psize + COUNT_OFF)
        assert count == s.shadow[nr], f"error area_count page {nr}: {count} != {s.shadow[nr]}"
    assert s.stats.doorbells == NCPUS
    s.kernel.check()
    s.history.append((bounce, s.stats.missing, s.stats.wp, s.stats.eexist, s.stats.locks,
                      *s.shadow))
    s.src, s.dst = s.dst, s.src


def setup(kernel: vmemu.Kernel, kind: str, style: str, wp: bool, seed: int) -> Stress:
    """Map the two areas and the doorbells, open the uffd (``uffd_test_ctx_init``)."""
    npages = npages_for(kind)
    if kind.startswith("hugetlb"):
        kernel.set_nr_hugepages(6 * npages)
    p = kernel.spawn("uffd-stress")
    src, dst = make_area(p, kind, npages), make_area(p, kind, npages)
    doorbell = p.mmap(0, NCPUS * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    flags = uapi.O_CLOEXEC | (0 if style == "read" else uapi.O_NONBLOCK)
    uffd = p.userfaultfd(flags)
    uffd.api(uapi.UFFD_FEATURE_WP_UNPOPULATED | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM if wp else 0)
    s = Stress(kernel, p, kind, style, wp, seed, src, dst, doorbell, uffd, [0] * npages,
               [Mutex(kernel.runtime, f"page{i}") for i in range(npages)])
    init_src(s)
    return s


def run_stress(kernel: vmemu.Kernel, kind: str, style: str, wp: bool, seed: int,
               bounces: int = BOUNCES) -> list[tuple[int, ...]]:
    """The whole program (``userfaultfd_stress``), run on ``kernel``'s runtime."""
    def main() -> list[tuple[int, ...]]:
        s = setup(kernel, kind, style, wp, seed)
        for bounce in range(bounces - 1, -1, -1):
            one_bounce(s, bounce)
        s.uffd.close()
        kernel.check()
        return s.history

    return list(kernel.run(main))


def _variants() -> list[Any]:
    out = []
    for kind in MEM_TYPES:
        for wp in (False, True):
            out.append(pytest.param(kind, wp, id=f"{kind}{'-wp' if wp else ''}"))
    return out


VARIANTS = _variants()


def sim_run(kind: str, style: str, wp: bool, seed: int) -> tuple[list[Any], str]:
    """One simulated run; returns its result and a digest of its whole trace."""
    rt = SimRuntime(seed=seed, ncpus=NCPUS, tracer=Tracer())
    history = run_stress(vmemu.Kernel(runtime=rt), kind, style, wp, seed)
    digest = hashlib.sha256("\n".join(e.format() for e in rt.tracer.events()).encode()).hexdigest()
    return history, digest


@pytest.mark.parametrize("style", ["read", "poll"])
@pytest.mark.parametrize(("kind", "wp"), VARIANTS)
def test_uffd_stress_sim(kind: str, wp: bool, style: str) -> None:
    """Deterministic runtime, hypothesis-drawn seeds; a seed run again gives the same trace."""
    runs: dict[int, tuple[list[Any], str]] = {}

    @settings(max_examples=SIM_SEEDS, suppress_health_check=list(HealthCheck), database=None)
    @given(seed=st.integers(0, 2**32 - 1))
    def check(seed: int) -> None:
        runs[seed] = sim_run(kind, style, wp, seed)

    check()
    seed, first = next(iter(runs.items()))  # replay the first seed drawn
    assert sim_run(kind, style, wp, seed) == first, f"seed {seed} gave another trace"


@pytest.mark.parametrize("style", ["read", "poll", "select"])
@pytest.mark.parametrize(("kind", "wp"), VARIANTS)
def test_uffd_stress_threads(kind: str, wp: bool, style: str) -> None:
    """Real threads (the default runtime), blocking read() or poll()/select() on fileno()."""
    kernel = vmemu.Kernel(runtime=ThreadRuntime(tracer=Tracer(enabled=False)))
    history = run_stress(kernel, kind, style, wp, seed=1)
    assert len(history) == BOUNCES
