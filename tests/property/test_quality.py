"""Quality tests: the stateful machine must catch bugs injected into the kernel paths.

STYLE habit 9: a property test is only as good as the bugs it finds. Each
test here breaks one thing the kernel does (write-protecting both sides of
a COW mapping at fork, copying instead of reusing a page still shared,
flushing the TLB after mprotect) and runs :class:`MmMachine` with
derandomized, bounded settings; the run must fail. A machine that lets one
of these bugs through has lost its teeth.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test
from test_mm_stateful import MmMachine

import vmemu.mmu.fork
import vmemu.mmu.memory
import vmemu.mmu.mprotect
from vmemu.mmu.pgtable import _PAGE_RW

QUALITY_SETTINGS = settings(
    max_examples=300,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: we only need it to fail
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)


def machine_fails() -> BaseException | None:
    """Run the machine; return what it raised, or None if it passed."""
    try:
        run_state_machine_as_test(MmMachine, settings=QUALITY_SETTINGS)
    except AssertionError as e:  # the model or kernel.check() disagreed
        return e
    return None


def test_catches_fork_that_forgets_to_write_protect(monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_pte_range leaves the parent's private PTEs writable: parent writes leak to the child."""
    real: Callable[..., None] = vmemu.mmu.fork.copy_pte_range

    def no_wrprotect(mm, child, src_vma, dst_vma, keep_uffd_wp):  # type: ignore[no-untyped-def]
        writable = [(table, idx)
                    for _addr, table, lo, hi in mm.pgtables.iter_pte_tables(src_vma.vm_start,
                                                                            src_vma.vm_end)
                    for idx in range(lo, hi) if table[idx] & _PAGE_RW]
        real(mm, child, src_vma, dst_vma, keep_uffd_wp)
        for table, idx in writable:
            table[idx] |= _PAGE_RW

    monkeypatch.setattr(vmemu.mmu.fork, "copy_pte_range", no_wrprotect)
    assert machine_fails() is not None, "the machine missed a fork without COW write-protection"


def test_catches_wp_fault_reusing_a_shared_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """do_wp_page reuses an anonymous page that another process still maps."""
    monkeypatch.setattr(vmemu.mmu.memory, "_can_reuse", lambda folio: True)
    assert machine_fails() is not None, "the machine missed a COW fault that reuses a shared page"


def test_catches_mprotect_without_tlb_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """change_protection forgets its TLB flush: a cached writable entry outlives PROT_READ."""

    class NoFlush:
        def __init__(self, tlb: object) -> None:
            self.tlb = tlb

        def flush_range(self, start: int, end: int) -> None:
            pass

        def __getattr__(self, name: str) -> object:
            return getattr(self.tlb, name)

    real = vmemu.mmu.mprotect.change_protection

    def change_protection_noflush(mm, vma, start, end):  # type: ignore[no-untyped-def]
        tlb = mm.tlb
        mm.tlb = NoFlush(tlb)
        try:
            real(mm, vma, start, end)
        finally:
            mm.tlb = tlb

    monkeypatch.setattr(vmemu.mmu.mprotect, "change_protection", change_protection_noflush)
    assert machine_fails() is not None, "the machine missed a stale TLB entry after mprotect"
