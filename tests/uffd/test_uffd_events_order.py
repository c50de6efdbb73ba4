"""Non-cooperative events the replay differential found wrong, on vmemu and on Linux 6.18.

Each scenario runs an mm syscall on a thread of its own while the test is the
monitor: it reads the events one by one (the syscall cannot return before the
last is read) and returns them with the syscall's result. The same scenario
runs on a ``vmemu.Process`` and, through ``vmemu.native``, on this process.
"""

from __future__ import annotations

import errno
import select
import threading
from collections.abc import Callable
from typing import Any

import pytest
from uffd_harness import native_process_or_skip

import vmemu
from vmemu.constants import (
    MADV_FREE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.mremap import MREMAP_FIXED, MREMAP_MAYMOVE
from vmemu.uffd import uapi

RW = PROT_READ | PROT_WRITE
MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING


#: Where the reservations go: the mremaps leave a hole in them, and one placed by
#: mmap(NULL) would lie among the interpreter's own mappings, which may take the hole
#: before the final munmap of the whole reservation (tests/_mapguard.py).
LOW_HINT = 12 << 40


def _monitor(u: Any, base: int, fn: Callable[[], Any]) -> tuple[Any, list[tuple[Any, ...]]]:
    """Run ``fn`` on a thread; every event it raises (relative to ``base``), then its result."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(("ok", fn()))
        except OSError as e:
            box.append((errno.errorcode[e.errno or 0], None))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    events: list[tuple[Any, ...]] = []
    while True:
        alive = t.is_alive()
        if u.poll(select.POLLIN, 20) & select.POLLIN:
            for m in u.read_msgs(uapi.UFFD_MSG_SIZE):
                if isinstance(m, uapi.RemapMsg):
                    events.append(("REMAP", m.from_ - base, m.to - base, m.len))
                elif isinstance(m, uapi.RemoveMsg):
                    events.append(("REMOVE", m.start - base, m.end - base))
                elif isinstance(m, uapi.UnmapMsg):
                    events.append(("UNMAP", m.start - base, m.end - base))
                else:
                    events.append((type(m).__name__,))
            continue
        if not alive:
            break
        assert len(events) < 8, events
    t.join(5)
    return box[0], events


def madv_free_on_shmem(p: Any) -> Any:
    """MADV_FREE of a registered shmem range: ``madvise_dontneed_free`` raises REMOVE
    (``userfaultfd_remove``) before ``madvise_free_single_vma`` finds the VMA is not
    anonymous and fails EINVAL."""
    fd = p.memfd_create("free-shmem")
    p.ftruncate(fd, 2 * PAGE_SIZE)
    s = p.mmap(0, 2 * PAGE_SIZE, RW, MAP_SHARED, fd, 0)
    u = p.userfaultfd(uapi.O_NONBLOCK | uapi.O_CLOEXEC)
    u.api(uapi.UFFD_FEATURE_EVENT_REMOVE)
    u.register(s, 2 * PAGE_SIZE, MISSING)
    try:
        return _monitor(u, s, lambda: p.madvise(s, 2 * PAGE_SIZE, MADV_FREE))
    finally:
        u.close()
        p.munmap(s, 2 * PAGE_SIZE)
        p.close(fd)


def mremap_fixed_over_registered(p: Any) -> Any:
    """mremap(MAYMOVE|FIXED) of a registered page onto another registered page:
    ``notify_uffd`` delivers the destination's UNMAP (``uf_unmap_early``) first,
    then REMAP, then the source's UNMAP (``uf_unmap``)."""
    res = p.mmap(LOW_HINT, 8 * PAGE_SIZE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
    a = p.mmap(res + 2 * PAGE_SIZE, 4 * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    u = p.userfaultfd(uapi.O_NONBLOCK | uapi.O_CLOEXEC)
    u.api(uapi.UFFD_FEATURE_EVENT_REMAP | uapi.UFFD_FEATURE_EVENT_UNMAP)
    u.register(a, 4 * PAGE_SIZE, MISSING)
    try:
        return _monitor(u, a, lambda: p.mremap(a + PAGE_SIZE, PAGE_SIZE, PAGE_SIZE,
                                               MREMAP_MAYMOVE | MREMAP_FIXED,
                                               a + 3 * PAGE_SIZE) - a)
    finally:
        u.close()
        p.munmap(res, 8 * PAGE_SIZE)


def mremap_merged_source(p: Any, with_anon_vma: bool) -> Any:
    """mremap(FIXED) of a registered page onto its registered neighbour, EVENT_UNMAP without
    EVENT_REMAP: the destination's UNMAP always; the source's only if its VMA is still
    registered when the old range goes. An untouched VMA has no anon_vma, so copy_vma merges
    the new VMA into it and ``mremap_userfaultfd_prep``'s reset unregisters both first."""
    res = p.mmap(LOW_HINT, 8 * PAGE_SIZE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS)
    a = p.mmap(res + 2 * PAGE_SIZE, 4 * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    src = p.mmap(0, PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    u = p.userfaultfd(uapi.O_NONBLOCK | uapi.O_CLOEXEC)
    u.api(uapi.UFFD_FEATURE_EVENT_UNMAP)
    for i in range(4):
        u.register(a + i * PAGE_SIZE, PAGE_SIZE, MISSING)
    if with_anon_vma:
        u.copy(a, src, PAGE_SIZE)
    try:
        return _monitor(u, a, lambda: p.mremap(a, PAGE_SIZE, PAGE_SIZE,
                                               MREMAP_MAYMOVE | MREMAP_FIXED, a + PAGE_SIZE) - a)
    finally:
        u.close()
        p.munmap(res, 8 * PAGE_SIZE)
        p.munmap(src, PAGE_SIZE)


SCENARIOS = {
    "mremap_merged_source": (lambda p: mremap_merged_source(p, False),
                             (("ok", PAGE_SIZE), [("UNMAP", PAGE_SIZE, 2 * PAGE_SIZE)])),
    "mremap_unmerged_source": (lambda p: mremap_merged_source(p, True),
                               (("ok", PAGE_SIZE), [("UNMAP", PAGE_SIZE, 2 * PAGE_SIZE),
                                                    ("UNMAP", 0, PAGE_SIZE)])),
    "madv_free_on_shmem": (madv_free_on_shmem,
                           (("EINVAL", None), [("REMOVE", 0, 2 * PAGE_SIZE)])),
    "mremap_fixed_over_registered": (mremap_fixed_over_registered,
                                     (("ok", 3 * PAGE_SIZE),
                                      [("UNMAP", 3 * PAGE_SIZE, 4 * PAGE_SIZE),
                                       ("REMAP", PAGE_SIZE, 3 * PAGE_SIZE, PAGE_SIZE),
                                       ("UNMAP", PAGE_SIZE, 2 * PAGE_SIZE)])),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_events_on_vmemu(name: str) -> None:
    fn, want = SCENARIOS[name]
    p = vmemu.Process()
    assert fn(p) == want
    p.check()


@pytest.mark.differential
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_events_on_the_kernel(name: str) -> None:
    p = native_process_or_skip()
    fn, want = SCENARIOS[name]
    assert fn(p) == want
