"""Page stores: where pages live when they are not in emulated RAM.

A store holds whole pages by key. The swap device writes to one
(:mod:`vmemu.mmu.swapfile`), and a userfaultfd handler reads from one to
resolve faults; neither ever touches page tables through a store.
"""

from vmemu.backends.pagestore import MemoryPageStore, PageStore, PageStoreStats

__all__ = ["MemoryPageStore", "PageStore", "PageStoreStats"]
