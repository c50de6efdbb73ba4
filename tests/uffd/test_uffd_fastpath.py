"""The fault round trip's short cuts behave exactly like the general paths.

* A 4 KiB COPY / ZEROPAGE / CONTINUE goes through ``mfill_atomic_page``;
  the same call through the range path (``mfill_atomic``) must give the same
  errno or byte count, the same PTE (pagemap) and the same contents.
* The readiness fd is opened lazily: asked for after a fault was queued it
  is readable at once, and stops being readable when the message is read.
* ``vma_lookup`` remembers the last VMAs it found; unmapping, splitting and
  remapping must never let it return a stale one.
"""

from __future__ import annotations

import errno
import select
import time
from collections.abc import Callable
from typing import Any

import pytest

import vmemu
from vmemu.constants import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.uffd import uapi
from vmemu.uffd.mfill import MfillError, MfillMode, mfill_atomic, mfill_atomic_page

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def _world(scenario: str) -> tuple[Any, Any, int, int]:
    """A process, its uffd, a 4-page destination and a 4-page source, set up per ``scenario``."""
    p = vmemu.Process()
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_MINOR_SHMEM | uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP
          | uapi.UFFD_FEATURE_WP_UNPOPULATED)
    src = p.mmap(0, 4 * PAGE_SIZE, RW, ANON)
    p.write(src, bytes(range(256)) * 16)
    if scenario.startswith("shmem"):
        fd = p.memfd_create("fast")
        p.ftruncate(fd, 4 * PAGE_SIZE)
        p.pwrite(fd, b"\xc3" * PAGE_SIZE, 0)  # page 0 cached, the others not
        dst = p.mmap(0, 4 * PAGE_SIZE, RW, MAP_SHARED, fd, 0)
        mode = uapi.UFFDIO_REGISTER_MODE_MINOR if "minor" in scenario \
            else uapi.UFFDIO_REGISTER_MODE_MISSING
    else:
        dst = p.mmap(0, 4 * PAGE_SIZE, RW, ANON)
        mode = uapi.UFFDIO_REGISTER_MODE_MISSING
    if scenario == "unregistered":
        return p, u, dst, src
    if scenario == "wp-marker":
        mode |= uapi.UFFDIO_REGISTER_MODE_WP
    u.register(dst, 4 * PAGE_SIZE, mode)
    if scenario == "populated":
        u.copy(dst + PAGE_SIZE, src, PAGE_SIZE)  # page 1
    if scenario == "wp-marker":
        u.writeprotect(dst, 4 * PAGE_SIZE, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    if scenario == "src-hole":
        p.munmap(src, 4 * PAGE_SIZE)
    return p, u, dst, src


CASES: list[tuple[str, MfillMode, int, bool]] = [
    # scenario, mode, destination page, wp
    ("anon", MfillMode.COPY, 0, False),
    ("anon", MfillMode.ZEROPAGE, 0, False),
    ("anon", MfillMode.CONTINUE, 0, False),  # EINVAL: no file
    ("anon", MfillMode.COPY, 0, True),  # EINVAL: not registered for WP
    ("populated", MfillMode.COPY, 1, False),  # EEXIST
    ("populated", MfillMode.ZEROPAGE, 1, False),  # EEXIST
    ("unregistered", MfillMode.COPY, 0, False),  # ENOENT
    ("src-hole", MfillMode.COPY, 0, False),  # EFAULT
    ("wp-marker", MfillMode.COPY, 0, False),  # a uffd-wp marker counts as empty
    ("wp-marker", MfillMode.ZEROPAGE, 0, False),  # ... but not for ZEROPAGE
    ("wp-marker", MfillMode.COPY, 2, True),
    ("shmem-minor", MfillMode.CONTINUE, 0, False),
    ("shmem-minor", MfillMode.CONTINUE, 0, True),
    ("shmem-minor", MfillMode.CONTINUE, 2, False),  # EFAULT: not in the page cache
    ("shmem-missing", MfillMode.COPY, 2, False),
    ("shmem-missing", MfillMode.COPY, 0, False),  # EEXIST: in the page cache
]


def _outcome(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except MfillError as e:
        return -e.errno


@pytest.mark.parametrize(("scenario", "mode", "page", "wp"), CASES,
                         ids=[f"{c[0]}-{c[1].value}-p{c[2]}{'-wp' if c[3] else ''}" for c in CASES])
def test_single_page_path_matches_the_range_path(scenario: str, mode: MfillMode, page: int,
                                                 wp: bool) -> None:
    results = []
    for fill in (mfill_atomic_page, None):
        p, u, dst, src = _world(scenario)
        addr = dst + page * PAGE_SIZE
        if fill is None:
            got = _outcome(lambda: mfill_atomic(u, addr, src, PAGE_SIZE, mode, wp))  # noqa: B023
        else:
            got = _outcome(lambda: mfill_atomic_page(u, addr, src, mode, wp))  # noqa: B023
        entries = [p.pagemap(dst + i * PAGE_SIZE) for i in range(4)]
        present = entries[page] >> 63  # read only what will not fault (and block)
        data = p.read(addr, PAGE_SIZE) if present else None
        p.check()
        results.append((got, entries, data))
    assert results[0] == results[1]
    assert results[0][0] in (PAGE_SIZE, -errno.EEXIST, -errno.ENOENT, -errno.EINVAL,
                             -errno.EFAULT)


def test_single_page_ioctls_write_the_kernel_output_fields() -> None:
    p, u, dst, src = _world("anon")
    assert u.copy(dst, src, PAGE_SIZE) == PAGE_SIZE
    assert p.read(dst, 4) == bytes(range(4))
    with pytest.raises(OSError) as e:
        u.copy(dst, src, PAGE_SIZE)
    assert e.value.errno == errno.EEXIST and e.value.struct.copy == -errno.EEXIST
    with pytest.raises(OSError) as e:
        u.zeropage(dst, PAGE_SIZE)
    assert e.value.errno == errno.EEXIST and e.value.struct.zeropage == -errno.EEXIST
    assert u.zeropage(dst + PAGE_SIZE, PAGE_SIZE) == PAGE_SIZE
    assert p.read(dst + PAGE_SIZE, 8) == bytes(8)
    # an unaligned source is allowed: it is read with faults enabled, across two pages
    assert u.copy(dst + 2 * PAGE_SIZE, src + 1, PAGE_SIZE) == PAGE_SIZE
    assert p.read(dst + 2 * PAGE_SIZE, 4) == bytes(range(1, 5))
    assert p.read(dst + 3 * PAGE_SIZE - 1, 1) == b"\x00"  # the source's next page, byte 0
    p.check()


def test_readiness_fd_opened_after_a_fault_is_queued() -> None:
    p = vmemu.Process()
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api()
    area = p.mmap(0, PAGE_SIZE, RW, ANON)
    src = p.mmap(0, PAGE_SIZE, RW, ANON)
    p.write(src, b"\x77" * PAGE_SIZE)
    u.register(area, PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MISSING)
    h = p.spawn(lambda task: task.read(area, 1), name="faulter")
    deadline = time.monotonic() + 10
    while u.statistics().pending == 0:
        assert time.monotonic() < deadline, "the fault never arrived"
        time.sleep(0.001)
    fd = u.fileno()  # opened now: it must already say readable
    assert select.select([fd], [], [], 0)[0] == [fd]
    (msg,) = u.read()
    assert msg.address == area
    assert select.select([fd], [], [], 0)[0] == []
    u.copy(area, src, PAGE_SIZE)
    assert h.join(timeout=10) == b"\x77"
    assert select.select([fd], [], [], 0)[0] == []
    u.close()


def test_vma_lookup_never_returns_a_stale_vma() -> None:
    p = vmemu.Process()
    mm = p.mm
    a = p.mmap(0, 8 * PAGE_SIZE, RW, ANON)
    b = p.mmap(0, 4 * PAGE_SIZE, PROT_READ, ANON)  # just below ``a``, not merged (other prot)
    pages = range(b - PAGE_SIZE, a + 9 * PAGE_SIZE, PAGE_SIZE)

    def agree() -> None:
        """Every lookup (each one refreshing the cache) equals a search of the tree."""
        lst = mm.vmas._list
        for addr in list(pages) + list(reversed(pages)):
            i = lst.bisect_key_right(addr) - 1
            want = lst[i] if i >= 0 and lst[i].vm_end > addr else None
            assert mm.vmas.vma_lookup(addr) is want, hex(addr)

    agree()
    steps: list[Callable[[], object]] = [
        lambda: p.mprotect(a + 2 * PAGE_SIZE, 2 * PAGE_SIZE, PROT_READ),  # split in three
        lambda: p.munmap(a, 2 * PAGE_SIZE),  # the cached low part goes
        lambda: p.mmap(a, PAGE_SIZE, PROT_READ, ANON | MAP_FIXED),  # and comes back, merged
        lambda: p.mprotect(a + 2 * PAGE_SIZE, 2 * PAGE_SIZE, RW),  # merges with the top
        lambda: p.mremap(a + 4 * PAGE_SIZE, 4 * PAGE_SIZE, 2 * PAGE_SIZE),  # shrinks in place
        lambda: p.munmap(b, 4 * PAGE_SIZE),
    ]
    for step in steps:
        for addr in pages:  # warm both cache entries with VMAs the step may change
            mm.vmas.vma_lookup(addr)
        step()
        agree()
    p.check()


def _inline_round_trips(tracing: bool) -> tuple[Any, Any, Any, int]:
    """Inline-handled faults (COPY, a WAKE-only retry, ZEROPAGE) on the threads runtime."""
    from vmemu.sched import ThreadRuntime, Tracer

    kernel = vmemu.Kernel(runtime=ThreadRuntime(tracer=Tracer(enabled=tracing)))
    p = vmemu.Process(kernel)
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api()
    area = p.mmap(0, 8 * PAGE_SIZE, RW, ANON)
    src = p.mmap(0, PAGE_SIZE, RW, ANON)
    p.write(src, b"\x42" * PAGE_SIZE)
    u.register(area, 8 * PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MISSING)
    woken_only: set[int] = set()

    def handler(uffd: Any) -> None:
        for msg in uffd.read_msgs(4 * 32):
            page = msg.address
            if page == area + 3 * PAGE_SIZE and page not in woken_only:
                woken_only.add(page)
                uffd.wake(page, PAGE_SIZE)  # wakes without resolving: the fault comes back
            elif (page - area) // PAGE_SIZE % 2:
                uffd.zeropage(page, PAGE_SIZE)
            else:
                uffd.copy(page, src, PAGE_SIZE)

    u.set_inline_handler(handler)
    data = b"".join(p.read(a, 1) for a in range(area, area + 8 * PAGE_SIZE, PAGE_SIZE))
    return (u.fault_wq.statistics(), kernel.runtime.charges().counts, data,
            u.statistics().faults_seen)


def test_inline_fast_path_keeps_the_statistics_of_the_queued_path() -> None:
    fast = _inline_round_trips(tracing=False)  # runs the handler without queueing
    slow = _inline_round_trips(tracing=True)  # tracing: the full wait-queue protocol
    assert fast == slow
    stats, counts, data, seen = fast
    assert data == b"\x42\x00" * 4
    assert seen == 9  # eight pages, one of them twice (woken without being resolved)
    assert stats.woken_total == 9 and stats.resolver_calls == 9 and stats.waiting == 0
    assert counts["wakeup"] == 9 and counts["fault"] == 1 + 9  # the source page, then these


# -- the fused userfault entry (MmStruct._userfault_fast) against the general fault path ---

_FUSED_CASES = [
    # (memory, register mode, access, extra)
    ("anon", "missing", "read", ""),
    ("anon", "missing", "write", ""),
    ("anon", "missing", "read", "sigbus"),
    ("anon", "missing", "write", "readonly"),  # the VMA refuses: SIGSEGV either way
    ("anon", "missing", "read", "hugepage"),  # a THP candidate: never the fused path
    ("anon", "missing", "read", "released"),
    ("anon", "missing+wp", "write", "wp-marker"),  # a uffd-wp marker: the general path
    ("anon", "wp", "write", "protected"),
    ("anon", "wp", "write", "wp-async"),
    ("anon", "wp", "read", "protected"),  # a read of a protected page does not fault
    ("shmem", "minor", "read", ""),
    ("shmem", "minor", "write", ""),
    ("shmem", "minor", "read", "uncached"),
    ("shmem", "missing+minor", "read", "uncached"),
    ("shmem", "missing", "read", "uncached"),  # fault-around territory: the general path
    ("shmem", "minor", "read", "beyond-eof"),
]


def _fused_world(memory: str, mode: str, access: str, extra: str,
                 tracing: bool) -> tuple[Any, ...]:
    """One fault on page 1 of a 4-page registered range, resolved inline; what can be seen."""
    from vmemu.constants import MADV_HUGEPAGE
    from vmemu.errors import Signal
    from vmemu.sched import ThreadRuntime, Tracer

    kernel = vmemu.Kernel(runtime=ThreadRuntime(tracer=Tracer(enabled=tracing)))
    p = vmemu.Process(kernel)
    u = p.userfaultfd(uapi.O_NONBLOCK)
    features = uapi.UFFD_FEATURE_MINOR_SHMEM | uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    if extra == "sigbus":
        features |= uapi.UFFD_FEATURE_SIGBUS
    if extra == "wp-async":
        features |= uapi.UFFD_FEATURE_WP_ASYNC
    if extra == "wp-marker":
        features |= uapi.UFFD_FEATURE_WP_UNPOPULATED
    u.api(features)
    size = 4 * PAGE_SIZE
    prot = PROT_READ if extra == "readonly" else RW
    if memory == "shmem":
        fd = p.memfd_create("fused")
        p.ftruncate(fd, 2 * PAGE_SIZE if extra == "beyond-eof" else size)
        if extra not in ("uncached", "beyond-eof"):
            p.pwrite(fd, b"\xc3" * size, 0)
        area = p.mmap(0, size, prot, MAP_SHARED, fd, 0)
        if extra == "beyond-eof":
            p.ftruncate(fd, PAGE_SIZE)  # page 1 now lies beyond EOF
    else:
        area = p.mmap(0, size, prot, ANON)
        if extra == "hugepage":
            p.madvise(area, size, MADV_HUGEPAGE)
        if "wp" in mode and extra != "wp-marker":
            p.write(area, b"\x01" * size)  # present pages to protect
    bits = {"missing": uapi.UFFDIO_REGISTER_MODE_MISSING, "wp": uapi.UFFDIO_REGISTER_MODE_WP,
            "minor": uapi.UFFDIO_REGISTER_MODE_MINOR}
    u.register(area, size, sum(bits[m] for m in mode.split("+")))
    if "wp" in mode:
        u.writeprotect(area, size, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    src = p.mmap(0, PAGE_SIZE, RW, ANON)
    p.write(src, b"\x42" * PAGE_SIZE)
    seen: list[tuple[int, int]] = []

    def handler(uffd: Any) -> None:
        for msg in uffd.read_msgs(4 * 32):
            seen.append((msg.flags, msg.address))
            page = msg.address
            if msg.flags & uapi.UFFD_PAGEFAULT_FLAG_WP:
                uffd.writeprotect(page, PAGE_SIZE, 0)
            elif msg.flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR:
                uffd.continue_(page, PAGE_SIZE)
            elif memory == "shmem":
                uffd.copy(page, src, PAGE_SIZE)
            else:
                uffd.copy(page, src, PAGE_SIZE)

    u.set_inline_handler(handler)
    if extra == "released":
        u.close()
    if tracing:
        kernel.runtime.tracer.clear()
    addr = area + PAGE_SIZE + 0x123
    try:
        if access == "write":
            p.write(addr, b"\x77")
        got: Any = p.read(addr, 2)
    except Signal as sig:
        got = (type(sig).__name__, sig.si_code, sig.si_addr)
    events = [(e.kind, e.fields) for e in kernel.runtime.tracer.events()] if tracing else []
    p.check()
    pagemap = [p.pagemap(a) for a in range(area, area + size, PAGE_SIZE)]
    return (got, seen, events, p.statistics(), kernel.runtime.charges().counts, pagemap,
            None if extra == "released" else u.statistics(), u.fault_wq.statistics())


@pytest.mark.parametrize("tracing", [False, True], ids=["fast", "traced"])
@pytest.mark.parametrize(("memory", "mode", "access", "extra"), _FUSED_CASES,
                         ids=["-".join(filter(None, c)) for c in _FUSED_CASES])
def test_fused_userfault_entry_matches_the_general_fault_path(
        memory: str, mode: str, access: str, extra: str, tracing: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vmemu.mmu.mm import MmStruct

    fused = _fused_world(memory, mode, access, extra, tracing)
    monkeypatch.setattr(MmStruct, "_userfault_fast", lambda self, *args: None)
    general = _fused_world(memory, mode, access, extra, tracing)
    assert fused == general


@pytest.mark.parametrize(("memory", "mode", "access", "extra"), _FUSED_CASES,
                         ids=["-".join(filter(None, c)) for c in _FUSED_CASES])
def test_must_wait_on_the_faulting_entry_matches_the_walk(
        memory: str, mode: str, access: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """handle_userfault tests the entry the fault read (vmf.table) instead of walking again:
    at every fault, the walk from the top (``userfaultfd_must_wait``) must agree."""
    from vmemu.mmu.mm import MmStruct
    from vmemu.uffd import ctx as ctx_module
    from vmemu.uffd import fault

    checked: list[bool] = []
    real = fault.handle_userfault

    def checking(ctx: Any, vmf: Any, reason: int) -> Any:
        pte = vmf.table[vmf.idx]
        on_entry = not pte or fault.entry_must_wait(pte, reason)
        checked.append(on_entry == fault.userfaultfd_must_wait(ctx.mm, vmf.address, reason))
        return real(ctx, vmf, reason)

    monkeypatch.setattr(ctx_module, "handle_userfault", checking)
    _fused_world(memory, mode, access, extra, False)
    monkeypatch.setattr(MmStruct, "_userfault_fast", lambda self, *args: None)
    _fused_world(memory, mode, access, extra, False)  # the general fault path's vmf too
    assert all(checked)
    delivered = extra in ("", "hugepage", "wp-marker", "protected", "uncached", "sigbus") and \
        (mode, access) != ("wp", "read") and (mode, extra) != ("minor", "uncached")
    assert bool(checked) == delivered  # the hook was called in both runs, or in neither


def test_pagefault_msg_is_the_attrs_message() -> None:
    """The fault path's ``pagefault_msg`` builds exactly what ``PagefaultMsg(...)`` does."""
    for args in ((0, 0, 0), (uapi.UFFD_PAGEFAULT_FLAG_WRITE | uapi.UFFD_PAGEFAULT_FLAG_WP,
                             0x7FFF_FFFF_F000, 4242)):
        fast, slow = uapi.pagefault_msg(*args), uapi.PagefaultMsg(*args)
        assert type(fast) is uapi.PagefaultMsg
        assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
        assert fast.pack() == slow.pack() and uapi.decode_msg(fast.pack()) == slow
        with pytest.raises(AttributeError):  # still frozen
            fast.address = 0  # type: ignore[misc]
