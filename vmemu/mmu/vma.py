"""Virtual memory areas and the per-mm tree that holds them.

Mirrors ``struct vm_area_struct`` (``include/linux/mm_types.h``) and the
split/merge rules of ``mm/vma.c``. The kernel keeps VMAs in a maple tree;
vmemu keeps them in a ``SortedKeyList`` keyed by ``vm_start``, which gives
the same ``find_vma`` (first VMA with ``vm_end > addr``) in O(log n).

Two neighbouring VMAs merge when nothing observable distinguishes them:
same flags, same file (and contiguous ``vm_pgoff``), same userfaultfd
context, and compatible ``anon_vma`` (``is_mergeable_anon_vma``). Anonymous
private mappings get ``vm_pgoff = addr >> PAGE_SHIFT`` at mmap time, which
is why two adjacent fresh anonymous mappings merge but one moved by mremap
usually does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
from sortedcontainers import SortedKeyList

from vmemu.constants import PAGE_SHIFT

# vm_flags (include/linux/mm.h)
VM_NONE = 0x00000000
VM_READ = 0x00000001
VM_WRITE = 0x00000002
VM_EXEC = 0x00000004
VM_SHARED = 0x00000008
VM_MAYREAD = 0x00000010
VM_MAYWRITE = 0x00000020
VM_MAYEXEC = 0x00000040
VM_MAYSHARE = 0x00000080
VM_GROWSDOWN = 0x00000100
VM_UFFD_MISSING = 0x00000200
VM_PFNMAP = 0x00000400
VM_UFFD_WP = 0x00001000
VM_LOCKED = 0x00002000
VM_IO = 0x00004000
VM_SEQ_READ = 0x00008000
VM_RAND_READ = 0x00010000
VM_DONTCOPY = 0x00020000
VM_DONTEXPAND = 0x00040000
VM_LOCKONFAULT = 0x00080000
VM_ACCOUNT = 0x00100000
VM_NORESERVE = 0x00200000
VM_HUGETLB = 0x00400000
VM_SYNC = 0x00800000
VM_ARCH_1 = 0x01000000
VM_WIPEONFORK = 0x02000000
VM_DONTDUMP = 0x04000000
VM_SOFTDIRTY = 0x08000000
VM_MIXEDMAP = 0x10000000
VM_HUGEPAGE = 0x20000000
VM_NOHUGEPAGE = 0x40000000
VM_MERGEABLE = 0x80000000
VM_UFFD_MINOR = 1 << 41  # VM_HIGH_ARCH_5 on x86-64 with CONFIG_HAVE_ARCH_USERFAULTFD_MINOR
VM_DROPPABLE = 1 << 40

VM_DONTFORK = VM_DONTCOPY
VM_SPECIAL = VM_IO | VM_DONTEXPAND | VM_PFNMAP | VM_MIXEDMAP
VM_ACCESS_FLAGS = VM_READ | VM_WRITE | VM_EXEC
VM_UFFD_FLAGS = VM_UFFD_MISSING | VM_UFFD_WP | VM_UFFD_MINOR
# Flags that do not stop two VMAs from merging (VM_IGNORE_MERGE).
VM_IGNORE_MERGE = VM_SOFTDIRTY


class AnonVma:
    """The reverse-map root of anonymous pages (``struct anon_vma``).

    Every VMA that may map a page of this anon_vma is linked to it through an
    ``anon_vma_chain``; a forked child's VMA links to its own new anon_vma and
    to each of its parent's, so rmap can find COW-shared pages in both.
    """

    __slots__ = ("root", "parent", "vmas", "name", "__weakref__")
    _next = 0

    def __init__(self, parent: AnonVma | None = None) -> None:
        self.parent = parent
        self.root: AnonVma = parent.root if parent is not None else self
        self.vmas: list[Vma] = []
        AnonVma._next += 1
        self.name = AnonVma._next

    def __repr__(self) -> str:
        return f"AnonVma#{self.name}"


@attrs.define(eq=False, slots=True, repr=False)
class Vma:
    """A contiguous range of virtual memory with one set of properties (``vm_area_struct``)."""

    vm_start: int
    vm_end: int
    vm_flags: int
    vm_pgoff: int = 0
    vm_file: Any = None
    anon_vma: AnonVma | None = None
    anon_vma_chain: list[AnonVma] = attrs.field(factory=list)
    vm_userfaultfd_ctx: Any = None
    anon_name: str | None = None
    vm_private_data: Any = None  # hugetlb: the private reservation map (HPAGE_RESV_OWNER)

    @property
    def size(self) -> int:
        """Bytes covered."""
        return self.vm_end - self.vm_start

    def is_anonymous(self) -> bool:
        """True for private or shared anonymous memory without a backing file (``vma_is_anonymous``)."""
        return self.vm_file is None

    def is_shared(self) -> bool:
        """True for MAP_SHARED (``VM_SHARED``)."""
        return bool(self.vm_flags & VM_SHARED)

    def linear_page_index(self, addr: int) -> int:
        """The page index of ``addr`` in the VMA's object (``linear_page_index``)."""
        return self.vm_pgoff + ((addr - self.vm_start) >> PAGE_SHIFT)

    def flags_str(self) -> str:
        """``rwxp`` / ``rwxs`` as in /proc/<pid>/maps."""
        f = self.vm_flags
        return ("r" if f & VM_READ else "-") + ("w" if f & VM_WRITE else "-") + \
            ("x" if f & VM_EXEC else "-") + ("s" if f & VM_MAYSHARE else "p")

    def __repr__(self) -> str:
        return (f"Vma({self.vm_start:#x}-{self.vm_end:#x} {self.flags_str()} "
                f"flags={self.vm_flags:#x} pgoff={self.vm_pgoff:#x})")


def anon_vma_link(vma: Vma, anon_vma: AnonVma) -> None:
    """Link ``vma`` to ``anon_vma`` (``anon_vma_chain_link``)."""
    vma.anon_vma_chain.append(anon_vma)
    anon_vma.vmas.append(vma)


def anon_vma_unlink(vma: Vma) -> None:
    """Unlink ``vma`` from every anon_vma it is chained to (``unlink_anon_vmas``)."""
    for av in vma.anon_vma_chain:
        av.vmas = [v for v in av.vmas if v is not vma]
    vma.anon_vma_chain = []
    vma.anon_vma = None


def anon_vma_clone(dst: Vma, src: Vma) -> None:
    """Give ``dst`` the same anon_vma links as ``src`` (``anon_vma_clone``), as split does."""
    dst.anon_vma = src.anon_vma
    dst.anon_vma_chain = []
    for av in src.anon_vma_chain:
        anon_vma_link(dst, av)


def is_mergeable_anon_vma(a: AnonVma | None, b: AnonVma | None, vma: Vma | None) -> bool:
    """The anon_vma side of the merge test (``is_mergeable_anon_vma``).

    One side without an anon_vma may merge unless that VMA was cloned from a
    parent (its chain has more than one link); otherwise both must be equal.
    """
    if (a is None or b is None) and (vma is None or len(vma.anon_vma_chain) <= 1):
        return True
    return a is b


def can_merge(prev: Vma, nxt: Vma) -> bool:
    """True when ``prev`` (ending where ``nxt`` starts) and ``nxt`` could be one VMA."""
    if prev.vm_end != nxt.vm_start:
        return False
    if (prev.vm_flags ^ nxt.vm_flags) & ~VM_IGNORE_MERGE:
        return False
    if prev.vm_file is not nxt.vm_file:
        return False
    if prev.vm_userfaultfd_ctx is not nxt.vm_userfaultfd_ctx:
        return False
    if prev.anon_name != nxt.anon_name:
        return False
    if prev.vm_pgoff + (prev.size >> PAGE_SHIFT) != nxt.vm_pgoff:
        return False
    if prev.anon_vma is None and nxt.anon_vma is None:
        return True
    # merging would leave the merged VMA with one anon_vma: both must agree.
    if prev.anon_vma is not None and nxt.anon_vma is not None:
        return prev.anon_vma is nxt.anon_vma
    lone = nxt if prev.anon_vma is not None else prev
    return len(lone.anon_vma_chain) <= 1


class VmaTree:
    """The set of VMAs of one mm, sorted by start (the kernel's ``mm->mm_mt``)."""

    def __init__(self) -> None:
        self._list: SortedKeyList = SortedKeyList(key=lambda v: v.vm_start)
        # the VMA the last vma_lookup found (the old ``mm->vmacache``): faults and the
        # ioctls that resolve them look up the same VMA again and again. Dropped by
        # every insert and remove; a VMA's bounds only change while it is in the tree
        # when nothing else covers the addresses it gains, so its own bounds suffice.
        self._last: Vma | None = None
        self._last2: Vma | None = None

    def __len__(self) -> int:
        return len(self._list)

    def __iter__(self) -> Iterator[Vma]:
        return iter(list(self._list))

    def insert(self, vma: Vma) -> None:
        """Add a VMA (``vma_iter_store``); the caller guarantees no overlap."""
        self._last = self._last2 = None
        self._list.add(vma)

    def remove(self, vma: Vma) -> None:
        """Remove a VMA from the tree (``vma_iter_clear``)."""
        self._last = self._last2 = None
        self._list.remove(vma)

    def find_vma(self, addr: int) -> Vma | None:
        """The first VMA with ``vm_end > addr`` (``find_vma``)."""
        lst = self._list
        i = lst.bisect_key_right(addr) - 1
        if i >= 0:
            v = lst[i]
            if v.vm_end > addr:
                return v
        i += 1
        return lst[i] if i < len(lst) else None

    def vma_lookup(self, addr: int) -> Vma | None:
        """The VMA containing ``addr``, or None (``vma_lookup``)."""
        v = self._last
        if v is not None and v.vm_start <= addr < v.vm_end:
            return v
        w = self._last2  # a second entry: MOVE alternates between two VMAs
        if w is not None and w.vm_start <= addr < w.vm_end:
            self._last, self._last2 = w, v
            return w
        lst = self._list
        i = lst.bisect_key_right(addr) - 1
        if i >= 0:
            w = lst[i]
            if w.vm_end > addr:
                self._last, self._last2 = w, v
                return w
        return None

    def overlapping(self, start: int, end: int) -> list[Vma]:
        """VMAs intersecting ``[start, end)`` in address order."""
        lst = self._list
        i = max(lst.bisect_key_right(start) - 1, 0)
        out = []
        n = len(lst)
        while i < n:
            v = lst[i]
            if v.vm_start >= end:
                break
            if v.vm_end > start:
                out.append(v)
            i += 1
        return out

    def prev_of(self, vma: Vma) -> Vma | None:
        """The VMA just below ``vma`` (``vma_prev``)."""
        i = self._list.index(vma)
        return self._list[i - 1] if i > 0 else None

    def next_of(self, vma: Vma) -> Vma | None:
        """The VMA just above ``vma`` (``vma_next``)."""
        i = self._list.index(vma)
        return self._list[i + 1] if i + 1 < len(self._list) else None

    def gaps(self, low: int, high: int) -> Iterator[tuple[int, int]]:
        """Unmapped ``[start, end)`` ranges within ``[low, high)``, top down."""
        end = high
        for v in reversed(list(self._list)):
            if v.vm_start >= high:
                continue
            if v.vm_end < end:
                yield (max(v.vm_end, low), end)
            end = min(end, v.vm_start)
            if end <= low:
                return
        if end > low:
            yield (low, end)

    def _check(self) -> None:
        """Assert the tree's invariants: sorted, non-overlapping, page-aligned, non-empty."""
        prev = None
        for v in self._list:
            assert v.vm_start < v.vm_end, f"empty VMA {v!r}"
            assert v.vm_start % 4096 == 0 and v.vm_end % 4096 == 0, f"unaligned VMA {v!r}"
            if prev is not None:
                assert prev.vm_end <= v.vm_start, f"overlap {prev!r} {v!r}"
            if v.anon_vma is not None:
                assert v.anon_vma in v.anon_vma_chain, f"anon_vma not chained {v!r}"
                for av in v.anon_vma_chain:
                    assert v in av.vmas, f"chain not mirrored {v!r}"
            prev = v
