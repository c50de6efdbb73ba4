"""A stateful model of userfaultfd: every ioctl, touch and mm change against a plain model.

The address space under test (all inside one 2 MiB-aligned PMD,
so every page table the model talks about exists)::

    base + 0 ..  W    A: the anon window, MAP_PRIVATE|MAP_ANONYMOUS, W pages
                         (munmap / mmap(MAP_FIXED) / mremap(FIXED) move pages around in it)
    base + 16 .. 17   srcbuf: the UFFDIO_COPY source, 2 pages (never registered)
    base + 18         hole: never mapped (a COPY source there is EFAULT)
    base + 20 .. 21   M: two anon pages, the UFFDIO_MOVE sources (never registered)
    base + 32 ..      S: a shmem memfd of W pages mapped MAP_SHARED (registrable)
    base + 48 ..      S2: the same memfd mapped again (the alias, never registered)
    base + 2 MiB ..   H: a hugetlb memfd of W 2 MiB pages mapped MAP_SHARED (registrable)
    base + 10 MiB ..  H2: its alias; + 18 MiB: hsrc, 2 huge pages of anon memory (the
                         hugetlb COPY source), then a 2 MiB hole (a COPY source there is EFAULT)

Two userfaultfds (a Bundle): ``sigbus`` has UFFD_FEATURE_SIGBUS, so a touch
that would fault into it raises Sigbus at once and no thread is needed;
``block`` has not, and a touch of its ranges runs on a task that the test
serves as a monitor would: poll, read (the message is checked: address and
WRITE/WP/MINOR flags), resolve (COPY, unprotect, CONTINUE), join. ``block``
may have UFFD_FEATURE_EVENT_FORK: a fork then blocks until the monitor reads
the FORK message, ioctls on ``block`` meanwhile fail EAGAIN (mmap_changing),
and the child keeps ``block``'s registrations and uffd-wp bits. ``block`` may
also have any of UFFD_FEATURE_EVENT_REMAP / EVENT_REMOVE / EVENT_UNMAP: a
munmap, mmap(MAP_FIXED), mremap or madvise that meets its registrations then
runs on a task of its own, and the test, as the monitor, expects every event
the model predicts in order (kind and payload: UNMAP of the syscall's range,
REMOVE per VMA clipped to it, mremap's destination UNMAP before REMAP before
the source's UNMAP; MADV_FREE of shmem raises REMOVE and then fails EINVAL),
probes ``mmap_changing`` (a range ioctl fails EAGAIN) before reading each, and
joins the task; with EVENT_REMAP the moved page keeps its registration and
its uffd-wp state.

The model keeps, per page: whether it is mapped, its registration (uffd and
modes), its PTE (none, uffd-wp marker, poison marker, zero page, page with a
value and the uffd-wp bit, anon-exclusive or not, writable despite a stale
uffd-wp bit), and for the memfd the page cache. It predicts every result and
errno (ENOENT, EINVAL, EEXIST, EBUSY, EFAULT, EAGAIN: partial progress with
the bytes done in the output field, or mmap_changing with -EAGAIN there),
the uffd-wp bit of every page (pagemap bit 57), the child's registrations
after fork. Where the model and vmemu disagreed, Linux 6.18 decided
(``vmemu.native``; the cases are in tests/uffd/test_uffd_stateful_regressions.py
when vmemu was wrong). ``kernel.check()`` runs after every step.

H follows S with hugetlb's rules (``mfill_atomic_hugetlb``, ``hugetlb_no_page``,
``__unmap_hugepage_range``): no ZEROPAGE (EINVAL) and no ZEROPAGE bit in the
register ``ioctls``; COPY checks the PTE and the page cache (EEXIST) before it
reads the source (EFAULT); no fault-around; a uffd-wp marker left by an old
registration still maps the page uffd-wp; a zap (DONTNEED, and the first
unmap of a hole punch) turns any uffd-wp page into a marker whatever the
registration and drops poison; MADV_FREE is EINVAL before any event.

``tests/differential/test_uffd_replay.py`` replays a few fixed sequences of the
same operations on vmemu and on the real kernel and compares every result.
"""

from __future__ import annotations

import errno
import select
import time
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import vmemu
from vmemu.constants import (
    MADV_DONTNEED,
    MADV_FREE,
    MADV_REMOVE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.errors import Sigbus, Sigsegv
from vmemu.mmu.memfd import MFD_HUGETLB
from vmemu.mmu.mremap import MREMAP_FIXED, MREMAP_MAYMOVE
from vmemu.mmu.proc import PM_PRESENT, PM_UFFD_WP
from vmemu.mmu.vma import VM_UFFD_MINOR, VM_UFFD_MISSING, VM_UFFD_WP
from vmemu.uffd import uapi

W = 4
HPAGE = 2 << 20
RW = PROT_READ | PROT_WRITE
MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
WP = uapi.UFFDIO_REGISTER_MODE_WP
MINOR = uapi.UFFDIO_REGISTER_MODE_MINOR
FEATURES = (uapi.UFFD_FEATURE_WP_UNPOPULATED | uapi.UFFD_FEATURE_POISON
            | uapi.UFFD_FEATURE_MOVE | uapi.UFFD_FEATURE_MINOR_SHMEM
            | uapi.UFFD_FEATURE_MINOR_HUGETLBFS | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
REMAP_EV, REMOVE_EV, UNMAP_EV = (uapi.UFFD_FEATURE_EVENT_REMAP, uapi.UFFD_FEATURE_EVENT_REMOVE,
                                 uapi.UFFD_FEATURE_EVENT_UNMAP)
JOIN_S = 3.0  # a touch the model says ends must end well within this

NONE, WPMARK, POISON, ZERO, PAGE = "none", "wp-marker", "poison", "zero", "page"


def vm_modes(vm_flags: int) -> int:
    """The UFFDIO_REGISTER modes a VMA's VM_UFFD_* flags stand for."""
    return ((MISSING if vm_flags & VM_UFFD_MISSING else 0) | (WP if vm_flags & VM_UFFD_WP else 0)
            | (MINOR if vm_flags & VM_UFFD_MINOR else 0))


@attrs.define
class Pte:
    """What the model knows of one PTE."""

    kind: str = NONE
    wp: bool = False  # the uffd-wp bit of a ZERO / PAGE entry
    val: int = 0  # anon PAGE only (shmem values live in the page cache)
    excl: bool = True  # anon PAGE: PageAnonExclusive
    writable: bool = False  # a stale uffd-wp bit on a PTE made writable by a write

    def wp_bit(self) -> bool:
        """pagemap's PM_UFFD_WP for this entry."""
        return self.kind == WPMARK or (self.kind in (ZERO, PAGE) and self.wp)


@attrs.define
class Slot:
    """One page of A or S: mapping, registration, PTE."""

    mapped: bool = True
    ctx: Any = None  # the model uffd (an Uffd) or None
    mode: int = 0
    pte: Pte = attrs.Factory(Pte)


@attrs.define(eq=False)
class Uffd:
    """A userfaultfd of the machine and what the model knows of it."""

    name: str
    obj: Any
    sigbus: bool
    event_fork: bool = False
    events: int = 0  # UFFD_FEATURE_EVENT_REMAP / _REMOVE / _UNMAP it asked for

    def wants(self, feature: int) -> bool:
        """Whether this uffd asked for the non-cooperative event ``feature``."""
        return bool(self.events & feature)

    def __repr__(self) -> str:
        return f"<uffd {self.name}>"


class Fault(Exception):  # noqa: N818 - a predicted userfault, not an error
    """The model predicts a userfault with these message flags."""

    def __init__(self, flags: int) -> None:
        super().__init__(flags)
        self.flags = flags


def _expect_oserror(what: str, fn: Callable[[], Any], err: int, field: str | None = None,
                    value: int | None = None) -> None:
    event(f"{what}: {errno.errorcode[err]}")
    try:
        fn()
    except OSError as e:
        assert e.errno == err, f"{what}: errno {e.errno} ({errno.errorcode.get(e.errno or 0)}), " \
            f"model says {errno.errorcode[err]}"
        if field is not None:
            got = getattr(e.struct, field)  # type: ignore[attr-defined]
            assert got == value, f"{what}: {field} = {got}, model says {value}"
        return
    raise AssertionError(f"{what} succeeded, model says {errno.errorcode[err]}")


class UffdMachine(RuleBasedStateMachine):
    """register/unregister/copy/zeropage/move/writeprotect/continue/poison/touch/read/
    madvise/mremap/munmap/fork against the model."""

    uffds = Bundle("uffds")

    def __init__(self) -> None:
        super().__init__()
        self.kernel = vmemu.Kernel()
        self.kernel.set_nr_hugepages(2 * W)
        p = self.p = self.kernel.spawn("uffd-model")
        fd = self.fd = p.memfd_create("uffd-model")
        p.ftruncate(fd, W * PAGE_SIZE)
        res = p.mmap(0, 32 << 20, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        p.munmap(res, 32 << 20)
        base = self.base = (res + (2 << 20) - 1) & ~((2 << 20) - 1)
        # S in one 16-page fault-around window
        self.S = p.mmap(base + 32 * PAGE_SIZE, W * PAGE_SIZE, RW, MAP_SHARED | MAP_FIXED, fd, 0)
        self.S2 = p.mmap(base + 48 * PAGE_SIZE, W * PAGE_SIZE, RW, MAP_SHARED | MAP_FIXED, fd, 0)
        self.A = base
        p.mmap(self.A, W * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        self.srcbuf = base + 16 * PAGE_SIZE
        self.hole = base + 18 * PAGE_SIZE
        self.M = base + 20 * PAGE_SIZE
        p.mmap(self.srcbuf, 2 * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        p.mmap(self.M, 2 * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        hfd = self.hfd = p.memfd_create("uffd-model-huge", MFD_HUGETLB)
        p.ftruncate(hfd, W * HPAGE)
        self.H = p.mmap(base + HPAGE, W * HPAGE, RW, MAP_SHARED | MAP_FIXED, hfd, 0)
        self.H2 = p.mmap(base + 5 * HPAGE, W * HPAGE, RW, MAP_SHARED | MAP_FIXED, hfd, 0)
        self.hsrc = base + 9 * HPAGE
        self.hhole = base + 11 * HPAGE
        p.mmap(self.hsrc, 2 * HPAGE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        self.a = [Slot() for _ in range(W)]
        self.s = [Slot() for _ in range(W)]
        self.h = [Slot() for _ in range(W)]
        self.cache: list[int | None] = [None] * W  # S's page cache
        self.caches: dict[str, list[int | None]] = {"S": self.cache, "H": [None] * W}
        self.m: list[Pte] = [Pte() for _ in range(2)]
        self.n_uffds = 0
        self.tick = 0

    def teardown(self) -> None:
        self.p.exit()

    def value(self) -> int:
        self.tick += 1
        return 0x1000 + self.tick

    # -- helpers -------------------------------------------------------------------

    def area(self, which: str) -> tuple[int, list[Slot]]:
        return {"A": (self.A, self.a), "S": (self.S, self.s), "H": (self.H, self.h)}[which]

    @staticmethod
    def psz(which: str) -> int:
        """The page size of an area."""
        return HPAGE if which == "H" else PAGE_SIZE

    def same_vma(self, which: str, start: int, n: int) -> bool:
        """Whether ``[start, start+n)`` is in one VMA (vmemu's layout, checked by the model)."""
        base, slots = self.area(which)
        ps = self.psz(which)
        addr = base + start * ps
        vma = self.p.mm.vmas.vma_lookup(addr)
        if vma is None:
            assert not slots[start].mapped
            return False
        assert slots[start].mapped
        one = addr + n * ps <= vma.vm_end
        if one:  # the model must agree the pages can share a VMA
            for i in range(start + 1, start + n):
                assert slots[i].mapped and slots[i].ctx is slots[start].ctx \
                    and slots[i].mode == slots[start].mode, f"{which}{i} differs in one VMA"
        return one

    # -- the touch model -----------------------------------------------------------

    def model_touch(self, which: str, i: int, write: bool, v: int) -> str | int:
        """Advance the model by one access attempt: the value read (or written),
        "SIGSEGV" / "SIGBUS", or raise Fault with the message flags of a userfault."""
        slot = self.area(which)[1][i]
        pte = slot.pte
        wflag = uapi.UFFD_PAGEFAULT_FLAG_WRITE if write else 0
        if not slot.mapped:
            return "SIGSEGV"
        if pte.kind == POISON:
            return "SIGBUS"  # handle_pte_marker: PTE_MARKER_POISONED -> VM_FAULT_HWPOISON
        wp_reg = bool(slot.mode & WP)
        if pte.kind == WPMARK and not wp_reg and which != "H":
            pte.kind = NONE  # a leftover marker is cleared (pte_marker_clear), then refaults
        if which == "H":
            return self.model_touch_hugetlb(slot, i, write, v, wp_reg, wflag)
        if which == "A":
            if pte.kind in (NONE, WPMARK):
                if slot.mode & MISSING:
                    raise Fault(wflag)
                marker = pte.kind == WPMARK
                if not write:
                    slot.pte = Pte(ZERO, wp=marker)
                    return 0
                if marker:  # the page comes in uffd-wp protected, then the write faults
                    slot.pte = Pte(PAGE, wp=True, val=0)
                    raise Fault(wflag | uapi.UFFD_PAGEFAULT_FLAG_WP)
                slot.pte = Pte(PAGE, val=v)
                return v
            if not write:
                return pte.val if pte.kind == PAGE else 0
            if pte.wp and wp_reg and not pte.writable:
                raise Fault(wflag | uapi.UFFD_PAGEFAULT_FLAG_WP)
            if pte.kind == PAGE:  # do_wp_page reuses the page: a stale uffd-wp bit stays
                slot.pte = Pte(PAGE, wp=pte.wp, val=v, writable=pte.wp)
            else:  # the zero page is copied: a fresh PTE
                slot.pte = Pte(PAGE, val=v)
            return v
        # shmem
        if pte.kind == NONE and not write and not slot.mode & (WP | MINOR):
            self.fault_around(i)  # do_read_fault maps the cached pages first, this one too
            if slot.pte.kind == PAGE:
                return self.cache[i]  # type: ignore[return-value]
        if pte.kind in (NONE, WPMARK):
            if self.cache[i] is None:
                if slot.mode & MISSING:
                    raise Fault(wflag)
            elif slot.mode & MINOR:
                raise Fault(wflag | uapi.UFFD_PAGEFAULT_FLAG_MINOR)
            if self.cache[i] is None:
                self.cache[i] = 0
            marker = pte.kind == WPMARK
            slot.pte = Pte(PAGE, wp=marker)
            if not write:
                return self.cache[i]  # type: ignore[return-value]
            if marker:
                raise Fault(wflag | uapi.UFFD_PAGEFAULT_FLAG_WP)
            self.cache[i] = v
            return v
        if not write:
            return self.cache[i]  # type: ignore[return-value]
        if pte.wp and wp_reg and not pte.writable:
            raise Fault(wflag | uapi.UFFD_PAGEFAULT_FLAG_WP)
        pte.writable = pte.writable or pte.wp  # wp_page_shared keeps a stale bit too
        self.cache[i] = v
        return v

    def model_touch_hugetlb(self, slot: Slot, i: int, write: bool, v: int, wp_reg: bool,
                            wflag: int) -> int:
        """``hugetlb_fault``: no fault-around, and ``hugetlb_no_page`` maps the page uffd-wp
        over any uffd-wp marker, registered for WP or not; a write to a uffd-wp entry faults
        into a WP registration (without one 6.18 retries for ever: the rules never do it)."""
        pte, cache = slot.pte, self.caches["H"]
        if pte.kind in (NONE, WPMARK):
            if cache[i] is None:
                if slot.mode & MISSING:
                    raise Fault(wflag)
            elif slot.mode & MINOR:
                raise Fault(wflag | uapi.UFFD_PAGEFAULT_FLAG_MINOR)
            if cache[i] is None:
                cache[i] = 0
            marker = pte.kind == WPMARK
            slot.pte = Pte(PAGE, wp=marker)
            if not write:
                return cache[i]  # type: ignore[return-value]
            if marker:
                assert wp_reg, "a write that livelocks on 6.18"
                raise Fault(wflag | uapi.UFFD_PAGEFAULT_FLAG_WP)
            cache[i] = v
            return v
        if not write:
            return cache[i]  # type: ignore[return-value]
        if pte.wp and not pte.writable:
            assert wp_reg, "a write that livelocks on 6.18"
            raise Fault(wflag | uapi.UFFD_PAGEFAULT_FLAG_WP)
        cache[i] = v
        return v

    def h_write_livelocks(self, which: str, i: int, write: bool) -> bool:
        """A write to a hugetlb page whose entry (or marker) is uffd-wp while the VMA is not
        registered for WP: ``hugetlb_wp`` returns at once for a uffd-wp entry, so on 6.18
        the fault repeats for ever (vmemu makes it writable instead); the rules skip it."""
        if which != "H" or not write:
            return False
        s = self.h[i]
        return s.mapped and s.pte.wp_bit() and not s.pte.writable and not s.mode & WP \
            and s.pte.kind != POISON

    def fault_around(self, i: int) -> None:
        """``do_fault_around``: a read fault on S maps every cached page of its VMA (all in
        the 16-page window) whose PTE is none; markers and present pages stay."""
        vma = self.p.mm.vmas.vma_lookup(self.S + i * PAGE_SIZE)
        lo = (vma.vm_start - self.S) // PAGE_SIZE
        hi = (vma.vm_end - self.S) // PAGE_SIZE
        for j in range(max(lo, 0), min(hi, W)):
            if self.s[j].pte.kind == NONE and self.cache[j] is not None:
                self.s[j].pte = Pte(PAGE)

    def do_access(self, task: Any, addr: int, write: bool, v: int) -> int:
        if write:
            task.write_u64(addr, v)
            return v
        return int(task.read_u64(addr))

    # -- rules: uffds ----------------------------------------------------------------

    @initialize(target=uffds, modes=st.tuples(*[st.sampled_from([0, MISSING, MISSING | WP, WP])
                                                  for _ in range(2)]))
    def open_sigbus(self, modes: tuple[int, int]) -> Uffd:
        """The SIGBUS uffd, with A's first half registered in one mode and the rest in another."""
        u = self._open(True, False)
        for half, mode in enumerate(modes):
            if mode:
                self.register(u, "A", 2 * half, 2, mode)
        return u

    @initialize(target=uffds, mode=st.sampled_from([0, MISSING, MINOR, MINOR | WP, MISSING | WP]),
                event_fork=st.booleans(),
                events=st.sets(st.sampled_from([REMAP_EV, REMOVE_EV, UNMAP_EV])).map(sum),
                a_mode=st.sampled_from([0, MISSING, WP, MISSING | WP]),
                h_mode=st.sampled_from([0, MISSING, MISSING | WP, MINOR, WP]))
    def open_blocking(self, mode: int, event_fork: bool, events: int, a_mode: int,
                      h_mode: int) -> Uffd:
        """The blocking uffd, with S registered in ``mode``, H in ``h_mode`` and the pages
        of A the SIGBUS uffd left free in ``a_mode`` (so that mm changes meet its events)."""
        u = self._open(False, event_fork, events)
        if mode:
            self.register(u, "S", 0, W, mode)
        if h_mode:
            self.register(u, "H", 0, W, h_mode)
        if a_mode:
            for i in range(W):
                self.register(u, "A", i, 1, a_mode)
        return u

    def _open(self, sigbus: bool, event_fork: bool, events: int = 0) -> Uffd:
        obj = self.p.userfaultfd(uapi.O_NONBLOCK | uapi.O_CLOEXEC)
        obj.api(FEATURES | (uapi.UFFD_FEATURE_SIGBUS if sigbus else 0)
                | (uapi.UFFD_FEATURE_EVENT_FORK if event_fork else 0) | events)
        self.n_uffds += 1
        name = f"u{self.n_uffds}{'-sigbus' if sigbus else ''}{'-fork' if event_fork else ''}" \
            + (f"-ev{events:#x}" if events else "")
        return Uffd(name, obj, sigbus, event_fork, events)

    pages = st.integers(0, W - 1)
    npages = st.integers(1, 2)
    areas = st.sampled_from(["A", "S", "H"])

    @rule(u=uffds, which=areas, start=pages, n=npages,
          mode=st.sampled_from([MISSING, WP, MISSING | WP, MINOR, MINOR | WP, MISSING | MINOR]))
    def register(self, u: Uffd, which: str, start: int, n: int, mode: int) -> None:
        """UFFDIO_REGISTER: per VMA in address order, the type (EINVAL) then the owner (EBUSY)."""
        n = min(n, W - start)
        base, slots = self.area(which)
        ps = self.psz(which)
        rng = slots[start:start + n]
        call = lambda: u.obj.register(base + start * ps, n * ps, mode)  # noqa: E731
        if not any(s.mapped for s in rng):
            return _expect_oserror("register", call, errno.EINVAL)
        for s in rng:
            if not s.mapped:
                continue
            if mode & MINOR and which == "A":
                return _expect_oserror("register", call, errno.EINVAL)
            if s.ctx is not None and s.ctx is not u:
                return _expect_oserror("register", call, errno.EBUSY)
        ioctls = call()
        event(f"register {which}: ok")
        assert ioctls & (1 << uapi._UFFDIO_WAKE)
        assert bool(ioctls & (1 << uapi._UFFDIO_WRITEPROTECT)) == bool(mode & WP)
        assert bool(ioctls & (1 << uapi._UFFDIO_CONTINUE)) == bool(mode & MINOR)
        assert bool(ioctls & (1 << uapi._UFFDIO_ZEROPAGE)) == (which != "H")  # BASIC on hugetlb
        for s in rng:
            if not s.mapped:
                continue
            if s.ctx is u and s.mode & mode == mode:
                continue  # already registered with a superset: left alone
            s.ctx, s.mode = u, mode  # the mode set is replaced; uffd-wp bits stay

    @rule(u=uffds, which=areas, start=pages, n=npages)
    def unregister(self, u: Uffd, which: str, start: int, n: int) -> None:
        """UFFDIO_UNREGISTER: EINVAL without a VMA or with another uffd's VMA; clears uffd-wp."""
        n = min(n, W - start)
        base, slots = self.area(which)
        rng = slots[start:start + n]
        ps = self.psz(which)
        call = lambda: u.obj.unregister(base + start * ps, n * ps)  # noqa: E731
        if not any(s.mapped for s in rng):
            return _expect_oserror("unregister", call, errno.EINVAL)
        if any(s.mapped and s.ctx is not None and s.ctx is not u for s in rng):
            return _expect_oserror("unregister", call, errno.EINVAL)
        call()
        for s in rng:
            if s.mapped and s.ctx is not None:
                if s.mode & WP:  # userfaultfd_clear_vma -> uffd_wp_range(..., false)
                    s.pte.wp = s.pte.writable = False
                    if s.pte.kind == WPMARK:
                        s.pte.kind = NONE
                s.ctx, s.mode = None, 0

    # -- rules: the filling ioctls -------------------------------------------------

    def _mfill(self, u: Uffd, op: str, which: str, start: int, n: int, wp: bool, v: int,
               src: str = "buf") -> None:
        n = min(n, W - start)
        base, slots = self.area(which)
        ps = self.psz(which)
        dst = base + start * ps
        length = n * ps
        field = {"copy": "copy", "zeropage": "zeropage", "continue": "mapped",
                 "poison": "updated"}[op]
        srcbuf, hole = (self.hsrc, self.hhole) if which == "H" else (self.srcbuf, self.hole)
        for k in range(2):  # page k of the source fills page start+k
            self.p.write_u64(srcbuf + k * ps, v + k)
        src_addr = {"buf": srcbuf, "half": srcbuf + ps, "hole": hole}[src]

        tag = op if which != "H" else f"{op} H"

        def call() -> int:
            if op == "copy":
                return int(u.obj.copy(dst, src_addr, length,
                                      uapi.UFFDIO_COPY_MODE_WP if wp else 0))
            if op == "zeropage":
                return int(u.obj.zeropage(dst, length))
            if op == "continue":
                return int(u.obj.continue_(dst, length,
                                           uapi.UFFDIO_CONTINUE_MODE_WP if wp else 0))
            return int(u.obj.poison(dst, length))

        # mfill_atomic: one VMA registered with any uffd of this mm (ENOENT), then the mode
        if not self.same_vma(which, start, n) or slots[start].ctx is None:
            return _expect_oserror(tag, call, errno.ENOENT)
        if wp and not slots[start].mode & WP:
            return _expect_oserror(tag, call, errno.EINVAL)
        if op == "continue" and which == "A":
            return _expect_oserror(tag, call, errno.EINVAL)
        if op == "zeropage" and which == "H":
            return _expect_oserror(tag, call, errno.EINVAL)  # no huge zero page for hugetlb
        done, err = 0, 0
        for k in range(n):
            src_ok = src == "buf" or (src == "half" and k == 0)
            err = self._mfill_page(op, which, start + k, wp, v + (k + (src == "half")), src_ok)
            if err:
                break
            done += 1
        if err and not done:
            return _expect_oserror(tag, call, err, field, -err)
        if err:
            return _expect_oserror(tag, call, errno.EAGAIN, field, done * ps)
        assert call() == length
        event(f"{tag}: ok")

    def _mfill_page(self, op: str, which: str, i: int, wp: bool, v: int, src_ok: bool) -> int:
        """One page of mfill_atomic: 0 or the errno it fails with; the model advances on 0."""
        slot = self.area(which)[1][i]
        pte = slot.pte
        none_mostly = pte.kind in (NONE, WPMARK, POISON)
        if op == "copy" and which == "H":
            # mfill_atomic_hugetlb checks the PTE, hugetlb_mfill_atomic_pte the page cache,
            # and only then copy_folio_from_user reads the source
            if not none_mostly or self.caches["H"][i] is not None:
                return errno.EEXIST
            if not src_ok:
                return errno.EFAULT
            self.caches["H"][i] = v
            slot.pte = Pte(PAGE, wp=wp)
            return 0
        if op == "copy" and not src_ok:
            return errno.EFAULT  # copy_from_user of the source comes before the PTE checks
        if op == "poison":
            if pte.kind != NONE:
                return errno.EEXIST
            slot.pte = Pte(POISON)
            return 0
        if which == "A":
            if op == "zeropage":
                if pte.kind != NONE:
                    return errno.EEXIST
                slot.pte = Pte(ZERO)
                return 0
            if not none_mostly:
                return errno.EEXIST
            slot.pte = Pte(PAGE, wp=wp, val=v)
            return 0
        if op == "continue":
            if self.caches[which][i] is None:
                return errno.EFAULT
            if not none_mostly:
                return errno.EEXIST
            slot.pte = Pte(PAGE, wp=wp)
            return 0
        if self.cache[i] is not None or not none_mostly:
            return errno.EEXIST
        self.cache[i] = v if op == "copy" else 0
        slot.pte = Pte(PAGE, wp=wp and op == "copy")
        return 0

    @rule(u=uffds, which=areas, start=pages, n=npages, wp=st.booleans(),
          src=st.sampled_from(["buf", "buf", "buf", "half", "hole"]))
    def copy(self, u: Uffd, which: str, start: int, n: int, wp: bool, src: str) -> None:
        self._mfill(u, "copy", which, start, n, wp, self.value(), src)
        self.tick += 1  # v + 1 went to the second page

    @rule(u=uffds, which=areas, start=pages, n=npages)
    def zeropage(self, u: Uffd, which: str, start: int, n: int) -> None:
        self._mfill(u, "zeropage", which, start, n, False, 0)

    @rule(u=uffds, which=areas, start=pages, n=npages, wp=st.booleans())
    def continue_(self, u: Uffd, which: str, start: int, n: int, wp: bool) -> None:
        self._mfill(u, "continue", which, start, n, wp, 0)

    @rule(u=uffds, which=areas, start=pages, n=npages)
    def poison(self, u: Uffd, which: str, start: int, n: int) -> None:
        self._mfill(u, "poison", which, start, n, False, 0)

    @rule(u=uffds, which=areas, start=pages, n=npages, enable=st.booleans())
    def writeprotect(self, u: Uffd, which: str, start: int, n: int, enable: bool) -> None:
        """UFFDIO_WRITEPROTECT (``mwriteprotect_range``): VMA by VMA, ENOENT at the first one
        not registered for WP (those before it keep their new state) or when there is none."""
        n = min(n, W - start)
        base, slots = self.area(which)
        rng = slots[start:start + n]
        ps = self.psz(which)
        call = lambda: u.obj.writeprotect(  # noqa: E731
            base + start * ps, n * ps,
            uapi.UFFDIO_WRITEPROTECT_MODE_WP if enable else 0)
        mapped = [s for s in rng if s.mapped]
        todo, err = [], errno.ENOENT if not mapped else 0
        for s in mapped:
            if not s.mode & WP:
                err = errno.ENOENT
                break
            todo.append(s)
        if err:
            _expect_oserror("writeprotect", call, err)
        else:
            call()
            event("writeprotect: ok")
        for s in todo:
            pte = s.pte
            pte.writable = False
            if enable:
                if pte.kind in (ZERO, PAGE):
                    pte.wp = True
                elif pte.kind == NONE:
                    pte.kind = WPMARK  # WP_UNPOPULATED (anon); always for shmem
            else:
                pte.wp = False
                if pte.kind == WPMARK:
                    pte.kind = NONE

    @rule(u=uffds, src=st.integers(0, 1), dst=pages)
    def move(self, u: Uffd, src: int, dst: int) -> None:
        """UFFDIO_MOVE of one M page into A (``move_pages``): ENOENT no dst VMA, EINVAL dst not
        registered with this uffd, EEXIST dst PTE not none, ENOENT src hole, EBUSY src shared."""
        slot, m = self.a[dst], self.m[src]
        call = lambda: u.obj.move(self.A + dst * PAGE_SIZE,  # noqa: E731
                                  self.M + src * PAGE_SIZE, PAGE_SIZE)
        if not slot.mapped:
            return _expect_oserror("move", call, errno.ENOENT, "move", -errno.ENOENT)
        if slot.ctx is not u:
            return _expect_oserror("move", call, errno.EINVAL, "move", -errno.EINVAL)
        if slot.pte.kind != NONE:
            return _expect_oserror("move", call, errno.EEXIST, "move", -errno.EEXIST)
        if m.kind == NONE:
            return _expect_oserror("move", call, errno.ENOENT, "move", -errno.ENOENT)
        if not m.excl:
            return _expect_oserror("move", call, errno.EBUSY, "move", -errno.EBUSY)
        assert call() == PAGE_SIZE
        event("move: ok")
        slot.pte = Pte(PAGE, val=m.val)
        self.m[src] = Pte()

    @rule(src=st.integers(0, 1))
    def fill_move_source(self, src: int) -> None:
        v = self.value()
        self.p.write_u64(self.M + src * PAGE_SIZE, v)
        self.m[src] = Pte(PAGE, val=v)

    # -- rules: touches ------------------------------------------------------------

    @rule(which=areas, i=pages, write=st.booleans())
    def touch(self, which: str, i: int, write: bool) -> None:
        """A touch that cannot block: unregistered, SIGBUS-feature or resolved ranges."""
        slot = self.area(which)[1][i]
        if slot.ctx is not None and not slot.ctx.sigbus:
            return  # would block: the threaded rule does those
        if self.h_write_livelocks(which, i, write):
            return event("touch: skipped, a 6.18 livelock")
        base = self.area(which)[0]
        v = self.value()
        try:
            want: Any = self.model_touch(which, i, write, v)
        except Fault:
            want = "SIGBUS"
        try:
            got: Any = self.do_access(self.p.main, base + i * self.psz(which), write, v)
        except Sigsegv:
            got = "SIGSEGV"
        except Sigbus:
            got = "SIGBUS"
        event(f"touch: {want if isinstance(want, str) else 'ok'}")
        assert got == want, f"touch {which}{i} write={write}: got {got!r}, model {want!r}"

    @rule(which=areas, i=pages, write=st.booleans(), wp_copy=st.booleans())
    def touch_blocking(self, which: str, i: int, write: bool, wp_copy: bool) -> None:
        """A task touches a page of the blocking uffd; the test is its monitor."""
        slot = self.area(which)[1][i]
        u = slot.ctx
        if u is None or u.sigbus or not slot.mapped:
            return
        if self.h_write_livelocks(which, i, write):
            return event("touch_blocking: skipped, a 6.18 livelock")
        base = self.area(which)[0]
        addr = base + i * self.psz(which)
        v = self.value()
        handle = self.p.spawn(lambda t: self.do_access(t, addr, write, v), name="toucher")
        faults = 0
        for _ in range(4):
            try:
                want = self.model_touch(which, i, write, v)
                break
            except Fault as f:
                faults += 1
                assert u.obj.poll(select.POLLIN, int(JOIN_S * 1000)) == select.POLLIN, \
                    "no fault message"
                msgs = u.obj.read_msgs(uapi.UFFD_MSG_SIZE * 4)
                assert len(msgs) == 1, msgs
                msg = msgs[0]
                assert isinstance(msg, uapi.PagefaultMsg)
                assert msg.address == addr and msg.flags == f.flags, \
                    f"message {msg}, model says flags {f.flags:#x} at {addr:#x}"
                self._resolve(u, which, i, f.flags, wp_copy)
        else:
            raise AssertionError("the model faults for ever")
        event(f"touch_blocking: {faults} faults")
        try:
            got: Any = handle.join(JOIN_S)
        except Sigbus:
            got = "SIGBUS"
        assert got == want, f"blocked touch {which}{i} got {got!r}, model {want!r}"

    def _resolve(self, u: Uffd, which: str, i: int, flags: int, wp_copy: bool) -> None:
        base, slots = self.area(which)
        ps = self.psz(which)
        addr = base + i * ps
        if flags & uapi.UFFD_PAGEFAULT_FLAG_WP:
            u.obj.writeprotect(addr, ps, 0)
            slots[i].pte.wp = False
            if slots[i].pte.kind == WPMARK:
                slots[i].pte.kind = NONE
        elif flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR:
            wp = wp_copy and bool(slots[i].mode & WP)
            u.obj.continue_(addr, ps, uapi.UFFDIO_CONTINUE_MODE_WP if wp else 0)
            slots[i].pte = Pte(PAGE, wp=wp)
        else:
            v = self.value()
            wp = wp_copy and bool(slots[i].mode & WP)
            srcbuf = self.hsrc if which == "H" else self.srcbuf
            self.p.write_u64(srcbuf, v)
            u.obj.copy(addr, srcbuf, ps, uapi.UFFDIO_COPY_MODE_WP if wp else 0)
            if which != "A":
                self.caches[which][i] = v
                slots[i].pte = Pte(PAGE, wp=wp)
            else:
                slots[i].pte = Pte(PAGE, wp=wp, val=v)

    @rule(which=st.sampled_from(["S", "H"]), i=pages, write=st.booleans())
    def touch_alias(self, which: str, i: int, write: bool) -> None:
        """Read or write the memfd page through the never-registered alias."""
        addr = (self.S2 if which == "S" else self.H2) + i * self.psz(which)
        cache = self.caches[which]
        if write:
            v = self.value()
            self.p.write_u64(addr, v)
            cache[i] = v
        else:
            got = self.p.read_u64(addr)
            if cache[i] is None:
                cache[i] = 0
            assert got == cache[i]

    @rule(u=uffds)
    def read(self, u: Uffd) -> None:
        """No message is ever left behind: read() of the O_NONBLOCK fd is EAGAIN."""
        assert u.obj.poll() == 0
        _expect_oserror("read", lambda: u.obj.read_msgs(uapi.UFFD_MSG_SIZE * 4), errno.EAGAIN)

    # -- rules: mm changes -----------------------------------------------------------

    @rule(which=areas, start=pages, n=npages,
          advice=st.sampled_from([MADV_DONTNEED, MADV_DONTNEED, MADV_REMOVE, MADV_FREE]))
    def madvise(self, which: str, start: int, n: int, advice: int) -> None:
        """MADV_DONTNEED zaps (anon: everything; file: a uffd-wp page leaves a marker, markers
        stay, poison goes); MADV_REMOVE punches the shmem hole (zap without dropping poison);
        MADV_FREE on anon only drops poison here (no reclaim). Holes: ENOMEM after the rest.
        hugetlb: MADV_FREE is EINVAL at once; a zap leaves a marker for any uffd-wp page and
        drops poison, MADV_REMOVE's included."""
        n = min(n, W - start)
        base, slots = self.area(which)
        ps = self.psz(which)
        rng = slots[start:start + n]
        name = {MADV_DONTNEED: "dontneed", MADV_REMOVE: "remove", MADV_FREE: "free"}[advice]
        call = lambda: self.p.madvise(base + start * ps, n * ps, advice)  # noqa: E731
        file = which != "A"
        runs = self._vma_runs(which, start, n)
        removes = [(u, "REMOVE", base + lo * ps, base + hi * ps)
                   for u, lo, hi in runs if u is not None and u.wants(REMOVE_EV)]
        if advice == MADV_REMOVE and not file and runs:
            return _expect_oserror(name, call, errno.EINVAL)  # madvise_remove wants a file
        if advice == MADV_FREE and which == "H":
            return _expect_oserror(name, call, errno.EINVAL)  # ..._valid_vma: DONTNEED only
        if advice == MADV_FREE and file and runs:
            # madvise_dontneed_free raises REMOVE for the first VMA, then
            # madvise_free_single_vma refuses a VMA that is not anonymous
            u0, lo, hi = runs[0]
            first = [(u0, "REMOVE", base + lo * ps, base + hi * ps)] \
                if u0 is not None and u0.wants(REMOVE_EV) else []
            return self._syscall(name, call, first, errno.EINVAL)
        # one REMOVE per VMA (clipped to the range) before its pages go; holes: ENOMEM after
        err = 0 if all(s.mapped for s in rng) else errno.ENOMEM
        self._syscall(name, call, removes, err)
        for k, s in enumerate(rng):
            if not s.mapped:
                continue
            pte = s.pte
            if advice == MADV_FREE:
                if pte.kind == POISON:
                    s.pte = Pte()
            elif not file:
                s.pte = Pte()
            elif which == "H":  # __unmap_hugepage_range without ZAP_FLAG_DROP_MARKER
                if pte.kind == PAGE:
                    s.pte = Pte(WPMARK) if pte.wp else Pte()
                elif pte.kind == POISON:
                    s.pte = Pte()
            elif pte.kind == PAGE:  # zap_install_uffd_wp_if_needed (the VMA is WP: wp set)
                s.pte = Pte(WPMARK) if pte.wp and s.mode & WP else Pte()
            elif pte.kind == POISON and advice == MADV_DONTNEED:
                s.pte = Pte()
            if advice == MADV_REMOVE:
                self.caches[which][start + k] = None

    def _unmaps(self, i: int) -> list[tuple[Any, ...]]:
        """The UNMAP event unmapping A[i] raises (``userfaultfd_unmap_prep``), if any."""
        s = self.a[i]
        if s.mapped and s.ctx is not None and s.ctx.wants(UNMAP_EV):
            return [(s.ctx, "UNMAP", self.A + i * PAGE_SIZE, self.A + (i + 1) * PAGE_SIZE)]
        return []

    @rule(i=pages)
    def munmap(self, i: int) -> None:
        self._syscall("munmap", lambda: self.p.munmap(self.A + i * PAGE_SIZE, PAGE_SIZE),
                      self._unmaps(i))
        self.a[i] = Slot(mapped=False)

    @rule(i=pages)
    def mmap_fixed(self, i: int) -> None:
        """A fresh anon page at A[i], over whatever was there (MAP_FIXED unmaps it first)."""
        got = self._syscall("mmap", lambda: self.p.mmap(self.A + i * PAGE_SIZE, PAGE_SIZE, RW,
                                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED),
                            self._unmaps(i))
        assert got == self.A + i * PAGE_SIZE
        self.a[i] = Slot()

    @rule(i=pages, j=pages)
    def mremap(self, i: int, j: int) -> None:
        """Move page i onto page j (MREMAP_FIXED unmaps j first). Without EVENT_REMAP the new
        VMA is not registered and ``move_ptes`` drops uffd-wp bits and markers."""
        src = self.a[i]
        call = lambda: self.p.mremap(self.A + i * PAGE_SIZE, PAGE_SIZE, PAGE_SIZE,  # noqa: E731
                                     MREMAP_MAYMOVE | MREMAP_FIXED, self.A + j * PAGE_SIZE)
        if i == j:
            return _expect_oserror("mremap", call, errno.EINVAL)  # the ranges overlap
        if not src.mapped:
            return _expect_oserror("mremap", call, errno.EFAULT)  # no VMA at old_addr
        # notify_uffd: the destination's UNMAP (uf_unmap_early), REMAP, the source's UNMAP
        events = self._unmaps(j)
        remap = src.ctx is not None and src.ctx.wants(REMAP_EV)
        if remap:
            events.append((src.ctx, "REMAP", self.A + i * PAGE_SIZE, self.A + j * PAGE_SIZE,
                           PAGE_SIZE))
        # the source's UNMAP comes only if its VMA is still registered when the old range
        # goes: without REMAP, copy_vma may have merged the new VMA into it, and the reset
        # of mremap_userfaultfd_prep then unregistered both (which, only vmemu's VMAs say)
        if remap:
            events += self._unmaps(i)
            maybe = None
        else:
            maybe = (self._unmaps(i) or [None])[0]
        assert self._syscall("mremap", call, events, maybe=maybe) == self.A + j * PAGE_SIZE
        event("mremap: ok")
        pte = src.pte
        self.a[i] = Slot(mapped=False)
        if remap:  # mremap_userfaultfd_prep keeps the registration, move_ptes the uffd-wp state
            self.a[j] = Slot(ctx=src.ctx, mode=src.mode, pte=pte)
            return
        if src.ctx is not None:
            pte.wp = pte.writable = False
            if pte.kind == WPMARK:
                pte.kind = NONE
        self.a[j] = Slot(pte=pte)
        if src.ctx is not None:
            # copy_vma merges the new VMA with a neighbour of the same registration when the
            # pgoffs fit (always when the source never had an anon_vma) - the source VMA
            # itself included, before its old range is unmapped - and the reset of
            # mremap_userfaultfd_prep then drops the registration of the whole merged VMA
            # (uffd-wp bits stay: userfaultfd_reset_ctx only clears the VMA). Linux 6.18 does
            # (tests/differential/test_uffd_replay.py). Which neighbours merged depends on
            # anon_vmas and pgoffs the model does not keep: vmemu's VMAs say, and may only
            # have dropped registrations of src's kind.
            for k, s in enumerate(self.a):
                if s.mapped and s.ctx is src.ctx and s.mode == src.mode:
                    vma = self.p.mm.vmas.vma_lookup(self.A + k * PAGE_SIZE)
                    if vma.vm_userfaultfd_ctx is None:
                        event("mremap: a merged neighbour lost its registration")
                        s.ctx, s.mode = None, 0

    # -- non-cooperative events ------------------------------------------------------

    def _vma_runs(self, which: str, start: int, n: int) -> list[tuple[Any, int, int]]:
        """The mapped pages of ``[start, start+n)`` grouped by VMA (vmemu's layout, as
        ``same_vma``): (uffd, first, end) for each, in address order."""
        base, slots = self.area(which)
        runs: list[tuple[Any, int, int]] = []
        last = None
        for k in range(start, start + n):
            if not slots[k].mapped:
                last = None
                continue
            vma = self.p.mm.vmas.vma_lookup(base + k * self.psz(which))
            if vma is last:
                u, lo, _ = runs[-1]
                runs[-1] = (u, lo, k + 1)
            else:
                runs.append((slots[k].ctx, k, k + 1))
            last = vma
        return runs

    @staticmethod
    def _msg(u: Uffd, msg: Any) -> tuple[Any, ...]:
        if isinstance(msg, uapi.RemapMsg):
            return (u, "REMAP", msg.from_, msg.to, msg.len)
        if isinstance(msg, uapi.RemoveMsg):
            return (u, "REMOVE", msg.start, msg.end)
        if isinstance(msg, uapi.UnmapMsg):
            return (u, "UNMAP", msg.start, msg.end)
        return (u, type(msg).__name__)

    def _syscall(self, what: str, call: Callable[[], Any], events: list[tuple[Any, ...]],
                 err: int = 0, maybe: tuple[Any, ...] | None = None) -> Any:
        """Run an mm syscall the model says raises ``events`` ((uffd, kind, payload...), in
        order), then perhaps ``maybe``, and ends in ``err`` (0: success, its value returned).
        With events it runs on a task that blocks on each until the test, its monitor, has
        probed mmap_changing and read it."""
        if not events and maybe is None:
            if err:
                return _expect_oserror(what, call, err)
            return call()
        handle = self.p.spawn(lambda t: call(), name=what)
        for k, want in enumerate(events):
            u = want[0]
            assert u.obj.poll(select.POLLIN, int(JOIN_S * 1000)) == select.POLLIN, \
                f"{what}: no {want[1]} event (#{k})"
            self._read_event(u, what, want, k)
        seen = [e[1] for e in events]
        if maybe is not None:  # either its message comes, or the syscall returns without it
            deadline = time.monotonic() + JOIN_S
            while not maybe[0].obj.poll(select.POLLIN, 10):
                try:
                    handle.join(0.01)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, f"{what}: neither {maybe} nor a return"
                except OSError:
                    break
            else:
                self._read_event(maybe[0], what, maybe, len(events))
                seen.append(maybe[1])
        event(f"{what}: events {'+'.join(seen) or 'none (merged)'}")
        if err:
            return _expect_oserror(what, lambda: handle.join(JOIN_S), err)
        return handle.join(JOIN_S)

    def _read_event(self, u: Uffd, what: str, want: tuple[Any, ...], k: int) -> None:
        self._mmap_changing(u, ("copy", "zeropage", "writeprotect")[k % 3])
        msgs = [self._msg(u, m) for m in u.obj.read_msgs(uapi.UFFD_MSG_SIZE * 4)]
        assert msgs == [want], f"{what}: messages {msgs}, model says {want}"

    # -- fork ------------------------------------------------------------------------

    def _fork_event_ctx(self) -> Uffd | None:
        """The uffd whose registrations raise UFFD_EVENT_FORK at fork, if any."""
        for s in self.a + self.s + self.h:
            if s.mapped and s.ctx is not None and s.ctx.event_fork:
                return s.ctx  # type: ignore[no-any-return]
        return None

    @rule(probe=st.sampled_from(["copy", "zeropage", "writeprotect"]))
    def fork(self, probe: str) -> None:
        """fork(): without EVENT_FORK the child has no registration and no uffd-wp state; with
        it (``dup_userfaultfd``) the child's VMAs are registered with a new uffd, in the FORK
        message, keeping the modes and the uffd-wp bits, and fork waits for the monitor."""
        ev = self._fork_event_ctx()
        if ev is None:
            child = self.p.fork()
            child_uffd = None
            event("fork: no event")
        else:
            handle = self.p.spawn(lambda t: self.p.fork(), name="forker")
            assert ev.obj.poll(select.POLLIN, int(JOIN_S * 1000)) == select.POLLIN, "no FORK"
            self._mmap_changing(ev, probe)
            msgs = ev.obj.read_msgs(uapi.UFFD_MSG_SIZE * 4)
            assert len(msgs) == 1 and isinstance(msgs[0], uapi.ForkMsg), msgs
            child = handle.join(JOIN_S)
            child_uffd = self.p.uffd_from_fd(msgs[0].ufd)
            event("fork: EVENT_FORK")
        try:
            self._check_child(child, ev, child_uffd)
            if child_uffd is not None:
                self.p.close(msgs[0].ufd)  # the child's registrations go, its waiters wake
            self._child_reads(child, ev)
            self.kernel.check()
        finally:
            child.exit()
        for pte in [s.pte for s in self.a] + self.m:
            if pte.kind == PAGE:
                pte.excl = False  # shared with the child for a while: no longer exclusive
            pte.writable = False  # copy_present_pte write-protects both sides of a COW page

    def _mmap_changing(self, ev: Uffd, probe: str) -> None:
        """While the FORK event is unread, range ioctls on its uffd fail EAGAIN (mmap_changing);
        the resolving ones write -EAGAIN in their output field."""
        dst = self.A
        if probe == "copy":
            self.p.write_u64(self.srcbuf, 0)
            _expect_oserror("copy", lambda: ev.obj.copy(dst, self.srcbuf, PAGE_SIZE), errno.EAGAIN,
                            "copy", -errno.EAGAIN)
        elif probe == "zeropage":
            _expect_oserror("zeropage", lambda: ev.obj.zeropage(dst, PAGE_SIZE), errno.EAGAIN,
                            "zeropage", -errno.EAGAIN)
        else:
            _expect_oserror("writeprotect", lambda: ev.obj.writeprotect(dst, PAGE_SIZE, 0),
                            errno.EAGAIN)

    def _child_keeps(self, s: Slot, ev: Uffd | None) -> bool:
        return ev is not None and s.ctx is ev

    def _check_child(self, child: Any, ev: Uffd | None, child_uffd: Any) -> None:
        """The child's registrations and uffd-wp bits (pagemap bit 57)."""
        for which in ("A", "S", "H"):
            base, slots = self.area(which)
            for i, s in enumerate(slots):
                if not s.mapped:
                    continue
                addr = base + i * self.psz(which)
                vma = child.mm.vmas.vma_lookup(addr)
                assert vma is not None
                keep = self._child_keeps(s, ev)
                want_ctx = child_uffd if keep else None
                assert vma.vm_userfaultfd_ctx is want_ctx, f"child {which}{i} registration"
                assert vm_modes(vma.vm_flags) == (s.mode if keep else 0), f"child {which}{i} modes"
                want_wp = keep and bool(s.mode & WP) and s.pte.wp_bit()
                assert bool(child.pagemap(addr) & PM_UFFD_WP) == want_wp, f"child {which}{i} wp"

    def _child_reads(self, child: Any, ev: Uffd | None) -> None:
        """What the child reads once it has no registration left."""
        for which in ("A", "S", "H"):
            base, slots = self.area(which)
            for i, s in enumerate(slots):
                if not s.mapped:
                    continue
                addr = base + i * self.psz(which)
                # anon: the VMA's page tables are copied (it has an anon_vma: mfill gave it one);
                # shmem: only when the child VMA is uffd-wp registered (vma_needs_copy)
                copied = which == "A" or (self._child_keeps(s, ev) and bool(s.mode & WP))
                if copied and s.pte.kind == POISON:
                    want: Any = "SIGBUS"
                elif which == "A":
                    want = s.pte.val if s.pte.kind == PAGE else 0
                else:
                    cache = self.caches[which]
                    if cache[i] is None:
                        cache[i] = 0
                    want = cache[i]
                try:
                    got: Any = child.read_u64(addr)
                except Sigbus:
                    got = "SIGBUS"
                assert got == want, f"child {which}{i}: {got!r}, model {want!r}"

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def check(self) -> None:
        self.kernel.check()

    @invariant()
    def ptes_match(self) -> None:
        """Every page the model says is present has a PTE; pagemap's uffd-wp bit is the model's."""
        for which in ("A", "S", "H"):
            base, slots = self.area(which)
            for i, s in enumerate(slots):
                if not s.mapped:
                    continue
                addr = base + i * self.psz(which)
                if s.pte.kind in (ZERO, PAGE):
                    assert (self.p.pagemap(addr) & PM_PRESENT if which == "H"
                            else self.p.mm.pgtables.get_pte(addr)), \
                        f"{which}{i}: model has a {s.pte.kind}, the PTE is empty"
                assert bool(self.p.pagemap(addr) & PM_UFFD_WP) == s.pte.wp_bit(), \
                    f"{which}{i}: pagemap uffd-wp differs from the model's {s.pte}"


# Longer runs than the profile's default: most bugs need a page to go through several states.
UffdMachine.TestCase.settings = settings(
    settings(), stateful_step_count=2 * settings().stateful_step_count)
TestUffdStateful = UffdMachine.TestCase
