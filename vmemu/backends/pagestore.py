"""The page-store protocol: where swapped-out (or far, or compressed) pages live.

A page store is a key -> 4 KiB-page map with four operations, the shape of
the kernel's ``swap_ops`` / ``frontswap_ops`` (``store``, ``load``,
``invalidate_page``) plus a statistics snapshot. The swap layer
(:mod:`vmemu.mmu.swapfile`) writes a page out with :meth:`PageStore.store`
under the key ``(swap type, swap offset)``, reads it back with
:meth:`PageStore.load` and drops it with :meth:`PageStore.erase` when the
slot is freed. Any object with these methods plugs in: the in-memory
:class:`MemoryPageStore` here, a compressed store in the style of zswap,
or a remote one with a latency model.

Rules a store must keep (the swap layer relies on them):

* ``load(key)`` returns exactly the bytes last stored under ``key``;
* ``store`` on an existing key replaces it (a dirty page written again);
* ``erase`` of a missing key is a no-op;
* ``statistics()`` returns a frozen value, never a live view.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol, runtime_checkable

import attrs


@attrs.frozen
class PageStoreStats:
    """A snapshot of a page store's use."""

    pages: int  # keys held now
    stored_bytes: int  # bytes the store keeps for them (after compression, if any)
    stores: int  # store() calls so far
    loads: int  # load() calls so far
    erases: int  # erase() calls that removed a key


@runtime_checkable
class PageStore(Protocol):
    """What the swap device needs from its backing store."""

    def store(self, key: Hashable, data: bytes) -> None:
        """Keep ``data`` (one page) under ``key``, replacing what was there."""

    def load(self, key: Hashable) -> bytes:
        """The bytes stored under ``key``; ``KeyError`` if there are none."""
        ...

    def erase(self, key: Hashable) -> None:
        """Forget ``key`` (no-op when absent)."""

    def statistics(self) -> PageStoreStats:
        """A frozen snapshot of the store's counters."""
        ...


class MemoryPageStore:
    """The simplest store: a dict of immutable ``bytes`` in this process."""

    def __init__(self) -> None:
        self._pages: dict[Hashable, bytes] = {}
        self._bytes = 0
        self._stores = 0
        self._loads = 0
        self._erases = 0

    def store(self, key: Hashable, data: bytes) -> None:
        """Keep a copy of ``data`` under ``key``."""
        data = bytes(data)
        old = self._pages.get(key)
        if old is not None:
            self._bytes -= len(old)
        self._pages[key] = data
        self._bytes += len(data)
        self._stores += 1

    def load(self, key: Hashable) -> bytes:
        """The bytes under ``key``."""
        self._loads += 1
        return self._pages[key]

    def erase(self, key: Hashable) -> None:
        """Drop ``key`` if present."""
        old = self._pages.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
            self._erases += 1

    def __contains__(self, key: Hashable) -> bool:
        return key in self._pages

    def keys(self) -> list[Hashable]:
        """The keys held, for invariant checks."""
        return list(self._pages)

    def statistics(self) -> PageStoreStats:
        """A frozen snapshot of the counters."""
        return PageStoreStats(len(self._pages), self._bytes, self._stores, self._loads,
                              self._erases)

    def __repr__(self) -> str:
        return f"MemoryPageStore(pages={len(self._pages)})"
