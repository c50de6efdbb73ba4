"""UFFDIO_MOVE refuses pinned pages: EBUSY (``folio_maybe_dma_pinned`` in ``move_present_pte``).

A page pinned long-term (``pin_user_pages``, as a driver pins for DMA)
must stay where the device expects it, so MOVE stops at it: EBUSY when it
is the first page, else partial progress (EAGAIN, the bytes moved in
``move``) - whether the pages around it go one by one or as a run of a
whole PTE table. The same holds for a whole-PMD THP move
(``move_pages_huge_pmd``). Once unpinned, the page moves.
"""

from __future__ import annotations

import errno

import pytest

import vmemu
from vmemu.constants import (
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.pgtable import _PAGE_PSE
from vmemu.uffd import uapi

RW = PROT_READ | PROT_WRITE


def _setup(p: vmemu.Process, size: int, huge: bool = False) -> tuple[int, int, object]:
    """A populated source and a registered empty destination, both PMD aligned."""
    def aligned_map() -> int:
        a = int(p.mmap(0, size + PMD_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS))
        return (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    src, dst = aligned_map(), aligned_map()
    if huge:
        p.madvise(src, size, MADV_HUGEPAGE)
    for i in range(size // PAGE_SIZE):
        p.write(src + i * PAGE_SIZE, bytes([i & 0xFF or 1]) * 8)
    u = p.userfaultfd(uapi.O_CLOEXEC)
    u.api(uapi.UFFD_FEATURE_MOVE)
    u.register(dst, size, uapi.UFFDIO_REGISTER_MODE_MISSING)
    return src, dst, u


@pytest.mark.parametrize("npages,pinned", [(1, 0), (4, 2), (64, 40)],
                         ids=["single", "page-by-page", "table-run"])
def test_move_stops_at_a_pinned_page(npages: int, pinned: int) -> None:
    p = vmemu.Process()
    size = npages * PAGE_SIZE
    src, dst, u = _setup(p, size)
    pin = p.pin_user_pages(src + pinned * PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(OSError) as e:
        u.move(dst, src, size)  # type: ignore[attr-defined]
    if pinned:
        assert e.value.errno == errno.EAGAIN
        assert e.value.struct.move == pinned * PAGE_SIZE  # type: ignore[attr-defined]
    else:
        assert e.value.errno == errno.EBUSY
        assert e.value.struct.move == -errno.EBUSY  # type: ignore[attr-defined]
    p.check()
    for i in range(pinned):
        assert p.read(dst + i * PAGE_SIZE, 8) == bytes([i & 0xFF or 1]) * 8
    left = size - pinned * PAGE_SIZE
    with pytest.raises(OSError) as e:  # still pinned: still EBUSY
        u.move(dst + pinned * PAGE_SIZE, src + pinned * PAGE_SIZE, left)  # type: ignore[attr-defined]
    assert e.value.errno == errno.EBUSY
    pin.unpin()
    assert u.move(dst + pinned * PAGE_SIZE, src + pinned * PAGE_SIZE, left) == left  # type: ignore[attr-defined]
    for i in range(npages):
        assert p.read(dst + i * PAGE_SIZE, 8) == bytes([i & 0xFF or 1]) * 8
    p.check()


def test_move_of_a_pinned_thp_is_ebusy() -> None:
    p = vmemu.Process()
    src, dst, u = _setup(p, PMD_SIZE, huge=True)
    pmd = p.mm.pgtables.pmd_table(src, False)
    assert pmd is not None and pmd[(src >> 21) & 511] & _PAGE_PSE, "the source is one THP"
    pin = p.pin_user_pages(src, PAGE_SIZE)
    with pytest.raises(OSError) as e:
        u.move(dst, src, PMD_SIZE)  # type: ignore[attr-defined]
    assert e.value.errno == errno.EBUSY
    p.check()
    pin.unpin()
    assert u.move(dst, src, PMD_SIZE) == PMD_SIZE  # type: ignore[attr-defined]
    assert p.read(dst + 5 * PAGE_SIZE, 8) == bytes([5]) * 8
    p.check()
