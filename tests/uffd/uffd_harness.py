"""Shared pieces of the userfaultfd tests: memory types and a fault-handling thread.

Modelled on ``tools/testing/selftests/mm/uffd-common.c``: each memory type
knows how to map the area under test (and, for shmem/hugetlb, an *alias*
mapping of the same file that is never registered), and
:class:`FaultHandler` is ``uffd_poll_thread``: it reads messages, resolves
missing faults with COPY (EEXIST then WAKE), write-protect faults by
unprotecting, minor faults by editing the page through the alias and
CONTINUE, and follows FORK / REMAP / REMOVE events.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

import attrs

import vmemu
from vmemu.constants import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.memfd import MFD_HUGETLB
from vmemu.uffd import uapi

HPAGE = 2 << 20
MEM_TYPES = ["anon", "shmem", "shmem-private", "hugetlb", "hugetlb-private"]


@attrs.define
class Area:
    """The memory under test: ``dst`` (registered) and ``alias`` (same file, unregistered)."""

    proc: vmemu.Process
    kind: str
    page_size: int
    npages: int
    dst: int
    alias: int | None
    fd: int | None

    @property
    def size(self) -> int:
        """Bytes in the area."""
        return self.page_size * self.npages

    @property
    def file_backed(self) -> bool:
        """True for shmem and hugetlb kinds."""
        return self.kind != "anon"

    @property
    def hugetlb(self) -> bool:
        """True for the hugetlb kinds."""
        return self.kind.startswith("hugetlb")


def make_kernel(kind: str, **kw: Any) -> vmemu.Kernel:
    """A kernel with a hugetlb pool big enough for the hugetlb kinds."""
    k = vmemu.Kernel(**kw)
    if kind.startswith("hugetlb"):
        k.set_nr_hugepages(64)
    return k


def make_area(proc: vmemu.Process, kind: str, npages: int = 4) -> Area:
    """Map ``npages`` pages of memory type ``kind`` (``uffd_test_ops->allocate_area``)."""
    rw = PROT_READ | PROT_WRITE
    if kind == "anon":
        dst = proc.mmap(0, npages * PAGE_SIZE, rw, MAP_PRIVATE | MAP_ANONYMOUS)
        return Area(proc, kind, PAGE_SIZE, npages, dst, None, None)
    huge = kind.startswith("hugetlb")
    psize = HPAGE if huge else PAGE_SIZE
    fd = proc.memfd_create(f"uffd-{kind}", MFD_HUGETLB if huge else 0)
    proc.ftruncate(fd, npages * psize)
    flags = MAP_PRIVATE if kind.endswith("private") else MAP_SHARED
    dst = proc.mmap(0, npages * psize, rw, flags, fd, 0)
    alias = proc.mmap(0, npages * psize, rw, MAP_SHARED, fd, 0)
    return Area(proc, kind, psize, npages, dst, alias, fd)


def native_process_or_skip() -> Any:
    """A ``vmemu.native.NativeProcess`` for the kernel side of a paired test, or a skip
    with the reason (not Linux x86-64, or userfaultfd not permitted here). The
    differential tests' ``_kernel.native_process_or_skip`` is its twin: ``tests/uffd``
    runs on its own, without ``tests/differential`` on the import path."""
    import platform
    import sys

    import pytest

    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the native binding needs Linux x86-64")
    from vmemu.native import NativeProcess

    p = NativeProcess()
    try:
        p.userfaultfd(0).close()
    except OSError as e:
        pytest.skip(f"userfaultfd not permitted here: {e}")
    return p


def open_uffd(proc: vmemu.Process, features: int = 0, flags: int = uapi.O_NONBLOCK) -> Any:
    """userfaultfd() + UFFDIO_API with ``features`` (``userfaultfd_open``)."""
    uffd = proc.userfaultfd(flags | uapi.O_CLOEXEC)
    uffd.api(features)
    return uffd


@attrs.define
class Counters:
    """What the handler saw (``struct uffd_args``)."""

    missing: int = 0
    wp: int = 0
    minor: int = 0
    events: list[Any] = attrs.Factory(list)
    errors: list[BaseException] = attrs.Factory(list)


class FaultHandler:
    """A thread resolving faults on one uffd (``uffd_poll_thread``)."""

    def __init__(self, area: Area, uffd: Any, *, resolve: str = "copy",
                 fill: Callable[[int], bytes] | None = None, wp_copy: bool = False) -> None:
        self.area = area
        self.uffd = uffd
        self.resolve = resolve
        self.fill = fill or (lambda i: bytes([i & 0xFF]) * area.page_size)
        self.wp_copy = wp_copy
        self.counters = Counters()
        self._stop = threading.Event()
        self.proc = area.proc
        # mapped now, before any fork: after a FORK event the handler copies through the
        # child's uffd, and COPY reads ``src`` in the child's mm (area_src in uffd-common.c
        # is likewise mapped before the test forks)
        self.src = self.proc.mmap(0, area.page_size, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS)
        self.thread = threading.Thread(target=self._run, name="uffd-handler", daemon=True)
        # ranges unregistered on a REMOVE event: a fault read in the same read() as the
        # event (it came in after the event was dequeued) is woken by the unregister and
        # retries unregistered, so its COPY finds no registered VMA (ENOENT), as on Linux
        self.removed: list[tuple[int, int]] = []

    def __enter__(self) -> FaultHandler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "handler thread stuck"
        if self.counters.errors:
            raise self.counters.errors[0]

    def _run(self) -> None:
        import select

        try:
            while not self._stop.is_set():
                r, _, _ = select.select([self.uffd.fileno()], [], [], 0.01)
                if not r:
                    continue
                try:
                    # one message per read(), as uffd_read_msg does: a batch read could
                    # take a fault queued by a task that the read itself released from an
                    # event (REMOVE), before this thread has acted on the event (unregister)
                    msgs = self.uffd.read_msgs(32)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        continue
                    raise
                for msg in msgs:
                    self.handle(msg)
        except BaseException as e:  # noqa: BLE001 - re-raised by __exit__
            self.counters.errors.append(e)

    def handle(self, msg: Any) -> None:
        """Resolve one message (``uffd_handle_page_fault``)."""
        area, c = self.area, self.counters
        if not isinstance(msg, uapi.PagefaultMsg):
            c.events.append(msg)
            if isinstance(msg, uapi.ForkMsg):
                self.uffd = self.proc.uffd_from_fd(msg.ufd)
            elif isinstance(msg, uapi.RemapMsg):
                area.dst = msg.to
            elif isinstance(msg, uapi.RemoveMsg):
                self.uffd.unregister(msg.start, msg.end - msg.start)
                self.removed.append((msg.start, msg.end))
            return
        page = msg.address & ~(area.page_size - 1)
        if msg.flags & uapi.UFFD_PAGEFAULT_FLAG_WP:
            c.wp += 1
            self.uffd.writeprotect(page, area.page_size, 0)
        elif msg.flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR:
            c.minor += 1
            assert area.alias is not None
            off = page - area.dst
            data = self.proc.read(area.alias + off, area.page_size)
            self.proc.write(area.alias + off, bytes(b ^ 0xFF for b in data[:64]) + data[64:])
            self.uffd.continue_(page, area.page_size)
        else:
            c.missing += 1
            if msg.flags & uapi.UFFD_PAGEFAULT_FLAG_WRITE and self.resolve == "copy-read-only":
                raise AssertionError("unexpected write fault")
            self.copy_page(page)

    def copy_page(self, page: int) -> None:
        """COPY one page; EEXIST means someone else filled it: WAKE (``__copy_page``)."""
        area = self.area
        idx = (page - area.dst) // area.page_size
        if area.hugetlb:
            src = self.huge_src(idx)
        else:
            self.proc.write(self.src, self.fill(idx))
            src = self.src
        mode = uapi.UFFDIO_COPY_MODE_WP if self.wp_copy else 0
        try:
            self.uffd.copy(page, src, area.page_size, mode)
        except OSError as e:
            if e.errno == errno.ENOENT and any(s <= page < e_ for s, e_ in self.removed):
                self.counters.missing -= 1  # not resolved here: it retries unregistered
                return
            if e.errno != errno.EEXIST:
                raise
            self.uffd.wake(page, area.page_size)

    def huge_src(self, idx: int) -> int:
        """The 2 MiB source page for hugetlb COPY (``src`` is a huge page there), filled."""
        self.proc.write(self.src, self.fill(idx))
        return int(self.src)
