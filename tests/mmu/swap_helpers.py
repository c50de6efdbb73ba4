"""Helpers shared by the swap and reclaim tests: page contents, filling, PTE reads."""

from __future__ import annotations

from vmemu import PAGE_SIZE, Kernel, Process
from vmemu.mmu.pgtable import is_real_swap_pte

P = PAGE_SIZE


def page(i: int) -> bytes:
    """Page `i`'s contents: distinct for each i, and never all zero (a zapped page reads zero)."""
    return bytes([(i * 7 + 1) & 0xFF]) * 64 + i.to_bytes(8, "little") * (P // 8 - 8)


def fill(p: Process, addr: int, n: int, base: int = 0) -> None:
    """Write page(base + i) to the i-th of `n` pages from `addr`."""
    for i in range(n):
        p.write(addr + i * P, page(base + i))


def pte(p: Process, addr: int) -> int:
    """The raw PTE that maps `addr` in `p` (0 where there is none)."""
    return p.mm.pgtables.get_pte(addr)


def swapped(p: Process, addr: int, n: int) -> list[int]:
    """Which of the `n` pages from `addr` are on swap (a real swap entry in the PTE)."""
    return [i for i in range(n) if is_real_swap_pte(pte(p, addr + i * P))]


def pressured(limit: int, swap_pages: int, npages: int) -> tuple[Kernel, Process, int]:
    """A kernel with a memory limit of `limit` pages and `swap_pages` of swap (none if
    0), a process, and an anonymous region of `npages` pages it filled with page(i)."""
    k = Kernel(mem_limit_pages=limit)
    if swap_pages:
        k.swapon(pages=swap_pages)
    p = k.spawn()
    a = p.mmap(0, npages * P)
    fill(p, a, npages)
    return k, p, a
