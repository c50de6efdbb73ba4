"""UFFDIO_MOVE of swapped-out pages: the swap entry moves without a swap-in (``move_swap_pte``).

A page out on swap moves as its swap entry; if its folio is still in the
swap cache (read back by MADV_WILLNEED but not mapped), the folio is
re-rooted at the destination so the later swap-in there finds it. Either
way the data reads back at the destination, the source is empty and
``mm.check()`` holds (swap counts, rmap, refcounts).
"""

from __future__ import annotations

import pytest

import vmemu
from vmemu.constants import (
    MADV_PAGEOUT,
    MADV_WILLNEED,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.mmu.pgtable import _PAGE_PRESENT, is_real_swap_pte, swp_entry_clean
from vmemu.uffd import uapi

N = 4


@pytest.mark.parametrize("cached", [False, True], ids=["swapped", "in-swap-cache"])
def test_move_swapped_out_pages(cached: bool) -> None:
    p = vmemu.Process()
    p.kernel.swapon(pages=64)
    rw = PROT_READ | PROT_WRITE
    src = int(p.mmap(0, N * PAGE_SIZE, rw, MAP_PRIVATE | MAP_ANONYMOUS))
    dst = int(p.mmap(0, N * PAGE_SIZE, rw, MAP_PRIVATE | MAP_ANONYMOUS))
    for i in range(N):
        p.write(src + i * PAGE_SIZE, bytes([0x61 + i]) * 16)
    p.madvise(src, N * PAGE_SIZE, MADV_PAGEOUT)
    if cached:
        p.madvise(src, N * PAGE_SIZE, MADV_WILLNEED)
    ptes = [p.mm.pgtables.get_pte(src + i * PAGE_SIZE) for i in range(N)]
    assert all(is_real_swap_pte(e) for e in ptes)
    space = p.kernel.phys.swap
    in_cache = [swp_entry_clean(e) in space.cache for e in ptes]
    assert all(in_cache) if cached else not any(in_cache)
    u = p.userfaultfd(uapi.O_CLOEXEC)
    u.api(uapi.UFFD_FEATURE_MOVE)
    u.register(dst, N * PAGE_SIZE, uapi.UFFDIO_REGISTER_MODE_MISSING)
    assert u.move(dst, src, N * PAGE_SIZE) == N * PAGE_SIZE
    assert [p.mm.pgtables.get_pte(dst + i * PAGE_SIZE) for i in range(N)] == ptes  # no swap-in
    assert all(p.mm.pgtables.get_pte(src + i * PAGE_SIZE) == 0 for i in range(N))
    dst_vma = p.mm.vmas.vma_lookup(dst)
    for i, e in enumerate(ptes):  # a cached folio now belongs where its entry is
        folio = space.cache.get(swp_entry_clean(e))
        if folio is not None:
            assert folio.mapping is dst_vma.anon_vma
            assert folio.index == dst_vma.linear_page_index(dst + i * PAGE_SIZE)
    p.check()
    for i in range(N):
        assert p.read(dst + i * PAGE_SIZE, 16) == bytes([0x61 + i]) * 16
        assert p.mm.pgtables.get_pte(dst + i * PAGE_SIZE) & _PAGE_PRESENT
    assert p.read(src, 16) == bytes(16)  # the source is a hole now: a fresh zero page
    p.check()
