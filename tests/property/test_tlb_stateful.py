"""No access ever sees a stale translation.

vmemu's fast path trusts the software TLB: a hit reads or writes the cached
page buffer without looking at the page tables. So every change that
narrows what a translation allows (munmap, mprotect to read-only or none,
MADV_DONTNEED, fork write-protecting private memory for COW, a MAP_FIXED
mapping replacing another) must flush it, as ``flush_tlb_range`` /
``flush_tlb_mm`` do in the kernel.

Two tests. :class:`TlbMachine` is :class:`MmMachine` with a rule that fills
the TLB of a process over the whole window (a read of every readable page,
a write of every writable one), so that each later change meets cached
entries; the base machine already checks contents and signals of every
access, that no TLB entry allows more than the model, and that the flush
counter moves on every narrowing change. ``test_change_after_full_tlb``
does the same for one change at a time, spelled out: fill, change, then
access every page and compare.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import rule
from test_mm_stateful import (
    BASE,
    MmMachine,
    PageModel,
    expect_access,
    fork_pages,
    pattern,
    scaled,
    window_addr,
)

from vmemu import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    SEGV_ACCERR,
    Kernel,
    Process,
    Signal,
)

PAGES = 8


class TlbMachine(MmMachine):
    """:class:`MmMachine` plus filling the TLB before changes come."""

    @rule(p=MmMachine.procs, task=st.sampled_from(["main", "worker"]))
    def fill_tlb(self, p: Process, task: str) -> None:
        """Touch every accessible page of the window: each gets a TLB entry."""
        t = p.thread(task)
        for vpn, pg in sorted(self.model[p].items()):
            addr = vpn << PAGE_SHIFT
            if pg.writable():
                t.touch(addr, write=True)  # writes back the byte it read
                assert vpn in p.mm.tlb.w, f"a write at {addr:#x} left no writable TLB entry"
            elif pg.readable():
                t.touch(addr)
                assert vpn in p.mm.tlb.r, f"a read at {addr:#x} left no TLB entry"


TlbMachine.TestCase.settings = scaled(0.5)
TestTlbStateful = TlbMachine.TestCase


CHANGES = ["munmap", "mprotect_ro", "mprotect_none", "dontneed", "fork_parent_writes",
           "fork_child_writes", "map_fixed", "map_fixed_ro"]


def read_all(p: Process, pages: dict[int, PageModel]) -> None:
    """Read every page of the window, checking contents and signals against ``pages``."""
    for i in range(PAGES):
        addr = window_addr(i)
        want, want_sig = expect_access(pages, addr, PAGE_SIZE, None)
        try:
            got = p.read(addr, PAGE_SIZE)
        except Signal as sig:
            assert want_sig is not None, f"unexpected {sig!r}"
            assert (sig.si_code, sig.si_addr, sig.done) == want_sig
        else:
            assert want_sig is None, f"read at {addr:#x} succeeded, model expects {want_sig}"
            assert got == want, f"stale data at {addr:#x}"


def write_all(p: Process, pages: dict[int, PageModel], fill: int) -> None:
    """Write a byte into every page of the window, checking signals against ``pages``."""
    for i in range(PAGES):
        addr = window_addr(i, 17)
        data = pattern(fill + i, 3)
        _, want_sig = expect_access(pages, addr, 3, data)
        try:
            p.write(addr, data)
        except Signal as sig:
            assert want_sig is not None, f"unexpected {sig!r}"
            assert (sig.si_code, sig.si_addr, sig.done) == want_sig
            if want_sig[0] == SEGV_ACCERR:
                assert p.mm.tlb.w.get(addr >> PAGE_SHIFT) is None
        else:
            assert want_sig is None, f"write at {addr:#x} succeeded, model expects {want_sig}"


@given(change=st.sampled_from(CHANGES), first=st.integers(0, PAGES - 1),
       npages=st.integers(1, PAGES), fill=st.integers(0, 200))
def test_change_after_full_tlb(change: str, first: int, npages: int, fill: int) -> None:
    """Fill the TLB over the window, make one change, then every access agrees with the model."""
    p = Kernel().spawn()
    rw = PROT_READ | PROT_WRITE
    p.mmap(BASE, PAGES * PAGE_SIZE, rw, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    pages = {(BASE >> PAGE_SHIFT) + i: PageModel(rw) for i in range(PAGES)}
    for i in range(PAGES):
        data = pattern(fill + 7 * i, PAGE_SIZE)
        p.write(window_addr(i), data)
        pages[(BASE >> PAGE_SHIFT) + i].store(0, data)
    read_all(p, pages)  # every page now has a writable, dirty TLB entry
    assert len(p.mm.tlb.w) == PAGES

    addr = window_addr(first)
    length = min(npages, PAGES - first) * PAGE_SIZE
    hit = range(addr >> PAGE_SHIFT, (addr + length) >> PAGE_SHIFT)
    before = p.statistics().tlb_flushes
    other: Process | None = None
    if change == "munmap":
        p.munmap(addr, length)
        for v in hit:
            del pages[v]
    elif change in ("mprotect_ro", "mprotect_none"):
        prot = PROT_READ if change == "mprotect_ro" else PROT_NONE
        p.mprotect(addr, length, prot)
        for v in hit:
            pages[v].prot = prot
    elif change == "dontneed":
        p.madvise(addr, length, MADV_DONTNEED)
        for v in hit:
            pages[v].data = None
    elif change.startswith("fork"):
        other = p.fork()
        other_pages = fork_pages(pages)
        if change == "fork_child_writes":  # the child writes, the parent must not see it
            p, other = other, p
            pages, other_pages = other_pages, pages
    else:  # MAP_FIXED over the range: fresh zero pages
        prot = rw if change == "map_fixed" else PROT_READ
        p.mmap(addr, length, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        for v in hit:
            pages[v] = PageModel(prot)
    if other is None:
        assert p.statistics().tlb_flushes > before, f"{change} did not flush the TLB"
    else:
        parent = other if change == "fork_child_writes" else p
        assert parent.statistics().tlb_flushes > before, "fork did not flush the parent's TLB"
        assert not parent.mm.tlb.w, "the parent kept writable TLB entries over COW pages"

    write_all(p, pages, fill + 1)
    read_all(p, pages)
    if other is not None:
        read_all(other, other_pages)  # the other side of the COW still sees the old data
    p.kernel.check()
