"""A stateful model of userfaultfd: every ioctl, touch and mm change against a plain model.

The address space under test (all inside one 2 MiB-aligned PMD, so every
page table the model talks about exists)::

    base + 0 ..  W    A: the anon window, MAP_PRIVATE|MAP_ANONYMOUS, W pages
                         (munmap / mremap(FIXED) move pages around inside it)
    base + 16         srcbuf: the UFFDIO_COPY source (never registered)
    base + 17 .. 19   M: two anon pages, the UFFDIO_MOVE sources (never registered)
    elsewhere         S: a shmem memfd of W pages mapped MAP_SHARED (registrable)
                      S2: the same memfd mapped again (the alias, never registered)

Two userfaultfds (a Bundle): ``sigbus`` has UFFD_FEATURE_SIGBUS, so a touch
that would fault into it raises Sigbus at once and no thread is needed;
``block`` has not, and a touch of its ranges runs on a task that the test
serves as a monitor would: poll, read (the message is checked: address and
WRITE/WP/MINOR flags), resolve (COPY, unprotect, CONTINUE), join.

The model keeps, per page: whether it is mapped, its registration (uffd and
modes), its PTE (none, uffd-wp marker, poison marker, zero page, page with a
value and the uffd-wp bit, anon-exclusive or not), and for the memfd the page
cache. It predicts every result and errno (ENOENT, EINVAL, EEXIST, EBUSY,
EFAULT, partial EAGAIN with bytes done in the output field). When the model
and vmemu disagreed, the real kernel (``vmemu.native``) decided.
``kernel.check()`` runs after every step.
"""

from __future__ import annotations

import errno
import select
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
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.errors import Sigbus, Sigsegv
from vmemu.mmu.mremap import MREMAP_FIXED, MREMAP_MAYMOVE
from vmemu.uffd import uapi

W = 4
RW = PROT_READ | PROT_WRITE
MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
WP = uapi.UFFDIO_REGISTER_MODE_WP
MINOR = uapi.UFFDIO_REGISTER_MODE_MINOR
FEATURES = (uapi.UFFD_FEATURE_WP_UNPOPULATED | uapi.UFFD_FEATURE_POISON
            | uapi.UFFD_FEATURE_MOVE | uapi.UFFD_FEATURE_MINOR_SHMEM)

NONE, WPMARK, POISON, ZERO, PAGE = "none", "wp-marker", "poison", "zero", "page"


@attrs.define
class Pte:
    """What the model knows of one PTE."""

    kind: str = NONE
    wp: bool = False
    val: int = 0  # anon PAGE only (shmem values live in the page cache)
    excl: bool = True  # anon PAGE: PageAnonExclusive


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

    def __repr__(self) -> str:
        return f"<uffd {self.name}>"


class Fault(Exception):  # noqa: N818 - a predicted userfault, not an error
    """The model predicts a userfault with these message flags."""

    def __init__(self, flags: int) -> None:
        super().__init__(flags)
        self.flags = flags


def _expect_oserror(fn: Any, err: int, field: str | None = None, value: int | None = None) -> None:
    event(f"{getattr(fn, '__qualname__', '?').split('.')[1]}: {errno.errorcode[err]}")
    try:
        fn()
    except OSError as e:
        assert e.errno == err, f"errno {e.errno} ({errno.errorcode.get(e.errno or 0)}), " \
            f"model says {errno.errorcode[err]}"
        if field is not None:
            got = getattr(e.struct, field)  # type: ignore[attr-defined]
            assert got == value, f"{field} = {got}, model says {value}"
        return
    raise AssertionError(f"succeeded, model says {errno.errorcode[err]}")


class UffdMachine(RuleBasedStateMachine):
    """register/unregister/copy/zeropage/move/writeprotect/continue/poison/touch/read/
    madvise/mremap/munmap/fork against the model."""

    uffds = Bundle("uffds")

    def __init__(self) -> None:
        super().__init__()
        self.kernel = vmemu.Kernel()
        p = self.p = self.kernel.spawn("uffd-model")
        fd = self.fd = p.memfd_create("uffd-model")
        p.ftruncate(fd, W * PAGE_SIZE)
        self.S = p.mmap(0, W * PAGE_SIZE, RW, MAP_SHARED, fd, 0)
        self.S2 = p.mmap(0, W * PAGE_SIZE, RW, MAP_SHARED, fd, 0)
        res = p.mmap(0, 8 << 20, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        p.munmap(res, 8 << 20)
        base = self.base = (res + (2 << 20) - 1) & ~((2 << 20) - 1)
        self.A = base
        p.mmap(self.A, W * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        self.srcbuf = base + 16 * PAGE_SIZE
        self.M = self.srcbuf + PAGE_SIZE
        p.mmap(self.srcbuf, 3 * PAGE_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        p.write_u64(self.srcbuf, 0)
        self.a = [Slot() for _ in range(W)]
        self.s = [Slot() for _ in range(W)]
        self.cache: list[int | None] = [None] * W
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
        return (self.A, self.a) if which == "A" else (self.S, self.s)

    def same_vma(self, which: str, start: int, n: int) -> bool:
        """Whether ``[start, start+n)`` is in one VMA (vmemu's layout, checked by the model)."""
        base, slots = self.area(which)
        addr = base + start * PAGE_SIZE
        vma = self.p.mm.vmas.vma_lookup(addr)
        if vma is None:
            assert not slots[start].mapped
            return False
        assert slots[start].mapped
        one = addr + n * PAGE_SIZE <= vma.vm_end
        if one:  # the model must agree the pages can share a VMA
            for i in range(start + 1, start + n):
                assert slots[i].mapped and slots[i].ctx is slots[start].ctx \
                    and slots[i].mode == slots[start].mode, f"{which}{i} differs in one VMA"
        return one

    def read_value(self, which: str, i: int) -> int:
        """What a present page reads as, per the model."""
        slot = self.area(which)[1][i]
        if which == "S":
            c = self.cache[i]
            assert c is not None
            return c
        return slot.pte.val if slot.pte.kind == PAGE else 0

    # -- the touch model: returns the value read, raises Fault/Sigbus/Sigsegv kinds ----

    def model_touch(self, which: str, i: int, write: bool, v: int) -> str | int:
        """Advance the model by one access attempt; returns "SIGSEGV", "SIGBUS", a Fault
        flags int wrapped as ("fault", flags) via exception, or the value read."""
        slot = self.area(which)[1][i]
        pte = slot.pte
        wflag = uapi.UFFD_PAGEFAULT_FLAG_WRITE if write else 0
        if not slot.mapped:
            return "SIGSEGV"
        if pte.kind == POISON:
            return "SIGBUS"
        wp_reg = bool(slot.mode & WP)
        if pte.kind == WPMARK and not wp_reg:
            pte.kind = NONE  # a leftover marker is cleared (pte_marker_clear)
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
            if pte.wp and wp_reg:
                raise Fault(wflag | uapi.UFFD_PAGEFAULT_FLAG_WP)
            slot.pte = Pte(PAGE, val=v)
            return v
        # shmem
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
        if pte.wp and wp_reg:
            raise Fault(wflag | uapi.UFFD_PAGEFAULT_FLAG_WP)
        self.cache[i] = v
        return v

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
        u = self._open(True)
        for half, mode in enumerate(modes):
            if mode:
                self.register(u, "A", 2 * half, 2, mode)
        return u

    @initialize(target=uffds, mode=st.sampled_from([0, MISSING, MINOR, MINOR | WP, MISSING | WP]))
    def open_blocking(self, mode: int) -> Uffd:
        """The blocking uffd, with S registered in ``mode``."""
        u = self._open(False)
        if mode:
            self.register(u, "S", 0, W, mode)
        return u

    def _open(self, sigbus: bool) -> Uffd:
        obj = self.p.userfaultfd(uapi.O_NONBLOCK | uapi.O_CLOEXEC)
        obj.api(FEATURES | (uapi.UFFD_FEATURE_SIGBUS if sigbus else 0))
        self.n_uffds += 1
        return Uffd(f"u{self.n_uffds}{'-sigbus' if sigbus else ''}", obj, sigbus)

    pages = st.integers(0, W - 1)
    npages = st.integers(1, 2)
    areas = st.sampled_from(["A", "S"])

    @rule(u=uffds, which=areas, start=pages, n=npages,
          mode=st.sampled_from([MISSING, WP, MISSING | WP, MINOR, MINOR | WP, MISSING | MINOR]))
    def register(self, u: Uffd, which: str, start: int, n: int, mode: int) -> None:
        n = min(n, W - start) if n <= 2 else n
        base, slots = self.area(which)
        rng = slots[start:start + n]
        call = lambda: u.obj.register(base + start * PAGE_SIZE, n * PAGE_SIZE, mode)  # noqa: E731
        if not any(s.mapped for s in rng):
            return _expect_oserror(call, errno.EINVAL)
        for s in rng:  # per VMA in address order: type, then owner
            if not s.mapped:
                continue
            if mode & MINOR and which == "A":
                return _expect_oserror(call, errno.EINVAL)
            if s.ctx is not None and s.ctx is not u:
                return _expect_oserror(call, errno.EBUSY)
        ioctls = call()
        event("register: ok")
        assert ioctls & (1 << uapi._UFFDIO_WAKE)
        assert bool(ioctls & (1 << uapi._UFFDIO_WRITEPROTECT)) == bool(mode & WP)
        assert bool(ioctls & (1 << uapi._UFFDIO_CONTINUE)) == bool(mode & MINOR)
        for s in rng:
            if not s.mapped:
                continue
            if s.ctx is u and s.mode & mode == mode:
                continue  # already registered with a superset: left alone
            s.ctx, s.mode = u, mode

    @rule(u=uffds, which=areas, start=pages, n=npages)
    def unregister(self, u: Uffd, which: str, start: int, n: int) -> None:
        n = min(n, W - start)
        base, slots = self.area(which)
        rng = slots[start:start + n]
        call = lambda: u.obj.unregister(base + start * PAGE_SIZE, n * PAGE_SIZE)  # noqa: E731
        if not any(s.mapped for s in rng):
            return _expect_oserror(call, errno.EINVAL)
        if any(s.mapped and s.ctx is not None and s.ctx is not u for s in rng):
            return _expect_oserror(call, errno.EINVAL)
        call()
        for s in rng:
            if s.mapped and s.ctx is not None:
                if s.mode & WP:
                    s.pte.wp = False
                    if s.pte.kind == WPMARK:
                        s.pte.kind = NONE
                s.ctx, s.mode = None, 0

    # -- rules: the filling ioctls -------------------------------------------------

    def _mfill(self, u: Uffd, op: str, which: str, start: int, n: int, wp: bool, v: int) -> None:
        n = min(n, W - start)
        base, slots = self.area(which)
        dst = base + start * PAGE_SIZE
        length = n * PAGE_SIZE
        field = {"copy": "copy", "zeropage": "zeropage", "continue": "mapped",
                 "poison": "updated"}[op]
        self.p.write_u64(self.srcbuf, v)

        def call() -> int:
            if op == "copy":
                return int(u.obj.copy(dst, self.srcbuf, length,
                                      uapi.UFFDIO_COPY_MODE_WP if wp else 0))
            if op == "zeropage":
                return int(u.obj.zeropage(dst, length))
            if op == "continue":
                return int(u.obj.continue_(dst, length,
                                           uapi.UFFDIO_CONTINUE_MODE_WP if wp else 0))
            return int(u.obj.poison(dst, length))

        if not self.same_vma(which, start, n) or slots[start].ctx is None:
            return _expect_oserror(call, errno.ENOENT)
        if wp and not slots[start].mode & WP:
            return _expect_oserror(call, errno.EINVAL)
        if op == "continue" and which == "A":
            return _expect_oserror(call, errno.EINVAL)
        done, err = 0, 0
        for i in range(start, start + n):
            err = self._mfill_page(op, which, i, wp, v)
            if err:
                break
            done += 1
        if err and not done:
            return _expect_oserror(call, err, field, -err)
        if err:
            return _expect_oserror(call, errno.EAGAIN, field, done * PAGE_SIZE)
        assert call() == length
        event(f"{op}: ok")

    def _mfill_page(self, op: str, which: str, i: int, wp: bool, v: int) -> int:
        slot = self.area(which)[1][i]
        pte = slot.pte
        none_mostly = pte.kind in (NONE, WPMARK, POISON)
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
            if self.cache[i] is None:
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

    @rule(u=uffds, which=areas, start=pages, n=npages, wp=st.booleans())
    def copy(self, u: Uffd, which: str, start: int, n: int, wp: bool) -> None:
        self._mfill(u, "copy", which, start, n, wp, self.value())

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
        n = min(n, W - start)
        base, slots = self.area(which)
        rng = slots[start:start + n]
        call = lambda: u.obj.writeprotect(  # noqa: E731
            base + start * PAGE_SIZE, n * PAGE_SIZE,
            uapi.UFFDIO_WRITEPROTECT_MODE_WP if enable else 0)
        mapped = [s for s in rng if s.mapped]
        todo, err = [], errno.ENOENT if not mapped else 0
        for s in mapped:  # VMA by VMA; the ones before a failure keep their new state
            if not s.mode & WP:
                err = errno.ENOENT
                break
            todo.append(s)
        if err:
            _expect_oserror(call, err)
        else:
            call()
            event("writeprotect: ok")
        for s in todo:
            pte = s.pte
            if enable:
                if pte.kind in (ZERO, PAGE):
                    pte.wp = True
                elif pte.kind == NONE:
                    pte.kind = WPMARK
            else:
                pte.wp = False
                if pte.kind == WPMARK:
                    pte.kind = NONE

    @rule(u=uffds, src=st.integers(0, 1), dst=pages)
    def move(self, u: Uffd, src: int, dst: int) -> None:
        slot, m = self.a[dst], self.m[src]
        call = lambda: u.obj.move(self.A + dst * PAGE_SIZE,  # noqa: E731
                                  self.M + src * PAGE_SIZE, PAGE_SIZE)
        if not slot.mapped:
            return _expect_oserror(call, errno.ENOENT, "move", -errno.ENOENT)
        if slot.ctx is not u:
            return _expect_oserror(call, errno.EINVAL, "move", -errno.EINVAL)
        if slot.pte.kind != NONE:
            return _expect_oserror(call, errno.EEXIST, "move", -errno.EEXIST)
        if m.kind == NONE:
            return _expect_oserror(call, errno.ENOENT, "move", -errno.ENOENT)
        if not m.excl:
            return _expect_oserror(call, errno.EBUSY, "move", -errno.EBUSY)
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
        base = self.area(which)[0]
        v = self.value()
        try:
            want: Any = self.model_touch(which, i, write, v)
        except Fault:
            want = "SIGBUS"
        try:
            got: Any = self.do_access(self.p.main, base + i * PAGE_SIZE, write, v)
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
        base = self.area(which)[0]
        addr = base + i * PAGE_SIZE
        v = self.value()
        handle = self.p.spawn(lambda t: self.do_access(t, addr, write, v), name="toucher")
        for _ in range(4):
            try:
                want = self.model_touch(which, i, write, v)
                break
            except Fault as f:
                assert u.obj.poll(select.POLLIN, 5000) == select.POLLIN, "no fault message"
                msgs = u.obj.read_msgs(uapi.UFFD_MSG_SIZE * 4)
                assert len(msgs) == 1, msgs
                msg = msgs[0]
                assert isinstance(msg, uapi.PagefaultMsg)
                assert msg.address == addr and msg.flags == f.flags, \
                    f"message {msg}, model says flags {f.flags:#x} at {addr:#x}"
                self._resolve(u, which, i, f.flags, wp_copy)
        else:
            raise AssertionError("the model faults for ever")
        event(f"touch_blocking: {_ + 1} faults")
        try:
            got: Any = handle.join(5)
        except Sigbus:
            got = "SIGBUS"
        assert got == want, f"blocked touch {which}{i} read {got:#x}, model {want:#x}"

    def _resolve(self, u: Uffd, which: str, i: int, flags: int, wp_copy: bool) -> None:
        base, slots = self.area(which)
        addr = base + i * PAGE_SIZE
        if flags & uapi.UFFD_PAGEFAULT_FLAG_WP:
            u.obj.writeprotect(addr, PAGE_SIZE, 0)
            slots[i].pte.wp = False
            if slots[i].pte.kind == WPMARK:
                slots[i].pte.kind = NONE
        elif flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR:
            wp = wp_copy and bool(slots[i].mode & WP)
            u.obj.continue_(addr, PAGE_SIZE, uapi.UFFDIO_CONTINUE_MODE_WP if wp else 0)
            slots[i].pte = Pte(PAGE, wp=wp)
        else:
            v = self.value()
            wp = wp_copy and bool(slots[i].mode & WP)
            self.p.write_u64(self.srcbuf, v)
            u.obj.copy(addr, self.srcbuf, PAGE_SIZE, uapi.UFFDIO_COPY_MODE_WP if wp else 0)
            if which == "S":
                self.cache[i] = v
                slots[i].pte = Pte(PAGE, wp=wp)
            else:
                slots[i].pte = Pte(PAGE, wp=wp, val=v)

    @rule(i=pages, write=st.booleans())
    def touch_alias(self, i: int, write: bool) -> None:
        """Read or write the memfd page through the never-registered alias."""
        addr = self.S2 + i * PAGE_SIZE
        if write:
            v = self.value()
            self.p.write_u64(addr, v)
            self.cache[i] = v
        else:
            got = self.p.read_u64(addr)
            if self.cache[i] is None:
                self.cache[i] = 0
            assert got == self.cache[i]

    @rule(u=uffds)
    def read(self, u: Uffd) -> None:
        """No message is ever left behind: read() of the O_NONBLOCK fd is EAGAIN."""
        assert u.obj.poll() == 0
        _expect_oserror(lambda: u.obj.read_msgs(uapi.UFFD_MSG_SIZE * 4), errno.EAGAIN)

    # -- rules: mm changes -----------------------------------------------------------

    @rule(which=areas, start=pages, n=npages)
    def dontneed(self, which: str, start: int, n: int) -> None:
        n = min(n, W - start)
        base, slots = self.area(which)
        rng = slots[start:start + n]
        call = lambda: self.p.madvise(base + start * PAGE_SIZE, n * PAGE_SIZE,  # noqa: E731
                                      MADV_DONTNEED)
        if not all(s.mapped for s in rng):  # the mapped parts are still zapped
            _expect_oserror(call, errno.ENOMEM)
        else:
            call()
        for s in rng:
            if not s.mapped:
                continue
            if which == "A":
                s.pte = Pte()
            elif s.pte.kind == PAGE:  # file-backed zap keeps uffd-wp as a marker
                s.pte = Pte(WPMARK) if s.pte.wp else Pte()

    @rule(i=pages)
    def munmap(self, i: int) -> None:
        self.p.munmap(self.A + i * PAGE_SIZE, PAGE_SIZE)
        self.a[i] = Slot(mapped=False)

    @rule(i=pages)
    def mmap_fixed(self, i: int) -> None:
        if self.a[i].mapped:
            return
        self.p.mmap(self.A + i * PAGE_SIZE, PAGE_SIZE, RW,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        self.a[i] = Slot()

    @rule(i=pages, j=pages)
    def mremap(self, i: int, j: int) -> None:
        """Move page i to the unmapped page j (no EVENT_REMAP: registration and uffd-wp go)."""
        src, dst = self.a[i], self.a[j]
        if i == j or not src.mapped or dst.mapped:
            return
        self.p.mremap(self.A + i * PAGE_SIZE, PAGE_SIZE, PAGE_SIZE,
                      MREMAP_MAYMOVE | MREMAP_FIXED, self.A + j * PAGE_SIZE)
        pte = src.pte
        if src.ctx is not None:
            pte.wp = False
            if pte.kind == WPMARK:
                pte.kind = NONE
        self.a[j] = Slot(pte=pte)
        self.a[i] = Slot(mapped=False)

    @rule()
    def fork(self) -> None:
        """fork() without EVENT_FORK: the child sees the contents, no registration."""
        child = self.p.fork()
        try:
            for i, s in enumerate(self.a):
                if not s.mapped:
                    continue
                addr = self.A + i * PAGE_SIZE
                if s.pte.kind == POISON:
                    try:
                        child.read_u64(addr)
                    except Sigbus:
                        continue
                    raise AssertionError(f"child read A{i} past a poison marker")
                want = s.pte.val if s.pte.kind == PAGE else 0
                assert child.read_u64(addr) == want, f"child A{i}"
            for i, s in enumerate(self.s):
                if s.pte.kind == PAGE:
                    assert child.read_u64(self.S + i * PAGE_SIZE) == self.cache[i]
            self.kernel.check()
        finally:
            child.exit()
        for pte in [s.pte for s in self.a] + self.m:
            if pte.kind == PAGE:
                pte.excl = False  # shared with the child for a while: no longer exclusive

    @invariant()
    def check(self) -> None:
        self.kernel.check()

    @invariant()
    def present_pages_read_right(self) -> None:
        """Every page the model says is present reads its value, without faulting."""
        for which in ("A", "S"):
            base, slots = self.area(which)
            for i, s in enumerate(slots):
                if s.mapped and s.pte.kind in (ZERO, PAGE):
                    got = self.p.mm.pgtables.get_pte(base + i * PAGE_SIZE)
                    assert got, f"{which}{i}: model has a {s.pte.kind}, the PTE is empty"


UffdMachine.TestCase.settings = settings(settings())
TestUffdStateful = UffdMachine.TestCase
