"""Divergences from Linux 6.18 that the uffd stateful machine found, one focused test each.

``tests/property/test_uffd_stateful.py`` runs long random sequences; each
vmemu bug it found (and the real kernel confirmed, through
``vmemu.native``) is pinned here as the shortest sequence that shows it,
with the kernel function the fix mirrors.
"""

from __future__ import annotations

import pytest

import vmemu
from vmemu.constants import MADV_FREE, MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PROT_READ, PROT_WRITE
from vmemu.errors import Sigbus
from vmemu.mmu.proc import PM_UFFD_WP
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
