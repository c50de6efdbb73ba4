"""Divergences from Linux 6.18 that the uffd stateful machine found, one focused test each.

``tests/property/test_uffd_stateful.py`` runs long random sequences; each
vmemu bug it found (and the real kernel confirmed, through
``vmemu.native``) is pinned here as the shortest sequence that shows it,
with the kernel function the fix mirrors.
"""

from __future__ import annotations

import errno

import pytest

import vmemu
from vmemu.constants import (
    MADV_DONTNEED,
    MADV_FREE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.errors import Sigbus
from vmemu.mmu.mremap import MREMAP_FIXED, MREMAP_MAYMOVE
from vmemu.mmu.proc import PM_PRESENT, PM_UFFD_WP
from vmemu.uffd import uapi

RW = PROT_READ | PROT_WRITE
MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
WP = uapi.UFFDIO_REGISTER_MODE_WP


def test_poison_marker_in_a_never_faulted_vma_survives_fork() -> None:
    """``mfill_atomic`` gives a private destination VMA its anon_vma before any op, POISON too,
    so ``vma_needs_copy`` copies its page tables at fork and the child inherits the poison
    marker (``copy_pte_marker`` always copies PTE_MARKER_POISONED). Kernel: the child SIGBUSes."""
    p = vmemu.Process()
    a = p.mmap(0, 2 * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_POISON)
    u.register(a, 2 * PAGE_SIZE, MISSING)
    assert u.poison(a, PAGE_SIZE) == PAGE_SIZE
    u.unregister(a, 2 * PAGE_SIZE)  # the marker outlives the registration
    child = p.fork()
    with pytest.raises(Sigbus):
        child.read_u64(a)
    assert child.read_u64(a + PAGE_SIZE) == 0
    p.kernel.check()
    child.exit()
    with pytest.raises(Sigbus):
        p.read_u64(a)


def test_madv_free_clears_a_poison_marker() -> None:
    """``madvise_free_pte_range`` clears a poisoned swap entry (UFFDIO_POISON marker) like
    MADV_DONTNEED does, and leaves other non-swap entries alone. Kernel: the page reads 0."""
    p = vmemu.Process()
    a = p.mmap(0, 2 * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_POISON)
    u.register(a, 2 * PAGE_SIZE, MISSING)
    assert u.poison(a, 2 * PAGE_SIZE) == 2 * PAGE_SIZE
    u.unregister(a, 2 * PAGE_SIZE)
    p.madvise(a, PAGE_SIZE, MADV_FREE)
    assert p.read_u64(a) == 0
    with pytest.raises(Sigbus):
        p.read_u64(a + PAGE_SIZE)
    p.kernel.check()


def test_stale_uffd_wp_bit_survives_a_write_and_arms_again_after_fork() -> None:
    """``do_wp_page`` drops the uffd-wp bit only for ``userfaultfd_pte_wp`` with WP_ASYNC; a
    stale bit (the VMA lost VM_UFFD_WP by a re-register with another mode set) stays through
    ``wp_page_reuse``. Re-registered for WP, the write-protect of fork's COW makes the next
    write a uffd-wp fault. Kernel: pagemap bit 57 set after the write, SIGBUS after fork."""
    p = vmemu.Process()
    a = p.mmap(0, PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
    p.write_u64(a, 1)
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_SIGBUS)
    u.register(a, PAGE_SIZE, WP)
    u.writeprotect(a, PAGE_SIZE, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    u.register(a, PAGE_SIZE, MISSING)  # not a superset: the mode set is replaced, WP goes
    p.write_u64(a, 5)
    assert p.pagemap(a) & PM_UFFD_WP
    u.register(a, PAGE_SIZE, WP)
    p.write_u64(a, 6)  # the PTE is writable: no fault
    p.fork().exit()
    with pytest.raises(Sigbus):
        p.write_u64(a, 7)
    assert p.read_u64(a) == 6
    p.kernel.check()


def test_a_failed_mfill_or_move_still_gives_the_vma_its_anon_vma() -> None:
    """``uffd_lock_vma`` -> ``find_vma_and_prepare_anon`` prepares a private VMA's anon_vma at
    the lookup, before the ENOENT (not registered) check. Visible in the layout: a page that
    mremap moves out of such a VMA keeps its pgoff and no longer merges back next to it.
    Kernel (maps, pages from the base): [0,1) [1,2) [3,4) after the failed ZEROPAGE, [0,2)
    [3,4) without it."""
    for op in ("zeropage", "move", None):
        p = vmemu.Process()
        u = p.userfaultfd(uapi.O_NONBLOCK)
        u.api(uapi.UFFD_FEATURE_MOVE)
        res = p.mmap(0, 8 << 20, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        p.munmap(res, 8 << 20)
        a = (res + (2 << 20) - 1) & ~((2 << 20) - 1)
        p.mmap(a, 4 * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        src = p.mmap(0, PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        if op == "zeropage":
            with pytest.raises(OSError) as e:
                u.zeropage(a, PAGE_SIZE)
        elif op == "move":
            with pytest.raises(OSError) as e:
                u.move(a, src, PAGE_SIZE)
        if op is not None:
            assert e.value.errno in (errno.ENOENT, errno.EINVAL)
        p.mremap(a + 2 * PAGE_SIZE, PAGE_SIZE, PAGE_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED,
                 a + PAGE_SIZE)
        vmas = [(v.vm_start - a) // PAGE_SIZE for v in p.mm.vmas
                if a <= v.vm_start < a + 4 * PAGE_SIZE]
        assert vmas == ([0, 3] if op is None else [0, 1, 3]), op
        p.kernel.check()


def test_a_read_fault_maps_the_cached_pages_around_it() -> None:
    """``do_read_fault`` -> ``do_fault_around`` maps the cached pages of the 16-page window
    with empty PTEs, unless the VMA is registered for WP or MINOR
    (``uffd_disable_fault_around``). So a page cached through an alias is mapped by a
    neighbour's read fault, and a later MINOR registration sees no minor fault for it; with
    MINOR registered first, it does. Kernel: pagemap present for the neighbour."""
    p = vmemu.Process()
    fd = p.memfd_create("fault-around")
    p.ftruncate(fd, 4 * PAGE_SIZE)
    s = p.mmap(0, 4 * PAGE_SIZE, RW, MAP_SHARED, fd, 0)
    alias = p.mmap(0, 4 * PAGE_SIZE, RW, MAP_SHARED, fd, 0)
    p.write_u64(alias + 2 * PAGE_SIZE, 7)
    assert p.read_u64(s) == 0
    assert p.pagemap(s + 2 * PAGE_SIZE) & PM_PRESENT  # mapped by fault-around
    assert not p.pagemap(s + 3 * PAGE_SIZE) & PM_PRESENT  # not cached: left alone
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_MINOR_SHMEM | uapi.UFFD_FEATURE_SIGBUS)
    u.register(s, 4 * PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MINOR)
    assert p.read_u64(s + 2 * PAGE_SIZE) == 7  # already mapped: no minor fault
    p.write_u64(alias + PAGE_SIZE, 8)
    p.madvise(s, PAGE_SIZE, MADV_DONTNEED)
    with pytest.raises(Sigbus):  # a MINOR VMA does not fault around
        p.read_u64(s + PAGE_SIZE)
    assert not p.pagemap(s) & PM_PRESENT
    p.kernel.check()


def test_madv_dontneed_keeps_a_stale_uffd_wp_marker_on_shmem() -> None:
    """``zap_nonpresent_ptes`` drops a uffd-wp marker of a file VMA only with
    ZAP_FLAG_DROP_MARKER (munmap, truncate), never for MADV_DONTNEED, whatever the VMA's
    registration now is; anon drops it. Kernel: pagemap bit 57 stays after the re-register
    with MINOR only and DONTNEED."""
    p = vmemu.Process()
    fd = p.memfd_create("stale-marker")
    p.ftruncate(fd, 2 * PAGE_SIZE)
    s = p.mmap(0, 2 * PAGE_SIZE, RW, MAP_SHARED, fd, 0)
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(uapi.UFFD_FEATURE_MINOR_SHMEM)
    u.register(s, 2 * PAGE_SIZE, MISSING | WP)
    u.writeprotect(s, 2 * PAGE_SIZE, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    u.register(s, 2 * PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MINOR)  # WP goes, markers stay
    p.madvise(s, PAGE_SIZE, MADV_DONTNEED)
    assert p.pagemap(s) & PM_UFFD_WP
    p.kernel.check()
