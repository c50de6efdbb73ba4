"""Stateful property test: the address-space syscalls against a plain model.

What it models
--------------
A :class:`MmMachine` drives several emulated processes (a root process and
the children it forks) through mmap (private or shared anonymous; address
hint, MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_POPULATE), munmap, mprotect
(PROT_NONE included), madvise (DONTNEED, DONTFORK/DOFORK,
WIPEONFORK/KEEPONFORK), fork, exit, and reads and writes of every size
(page-crossing, typed u8..u64, from two tasks sharing one mm).

Every operation lands in a window of :data:`NPAGES` pages at :data:`BASE`
so that operations collide: a MAP_FIXED over half a shared mapping, an
mprotect straddling a hole, a write crossing into a PROT_NONE page.

The reference model is deliberately dumb: per process, a dict from virtual
page number to :class:`PageModel` (protection, fork flags, and either the
private contents or a reference to a :class:`SharedObj` page, shared by
reference across fork as shmem is). It knows nothing of VMAs, folios, page
tables or TLBs, so whatever the emulator does with those must be
invisible: every access compares contents, or the signal (class, si_code,
si_addr, bytes done before the fault); every syscall compares the errno;
after every step ``kernel.check()`` runs, every present page is compared
with the model (``follow_page``, which faults nothing in), ``/proc/<pid>/maps`` is compared
page by page with the model (mapped-ness and ``rwxp``), ``smaps`` VmFlags
with the fork flags (``dc``, ``wf``), and the software TLB may not hold a
translation the model forbids (the no-stale-TLB property).

The machine is imported by ``test_tlb_stateful.py`` (more TLB filling) and
``test_quality.py`` (it must catch injected COW bugs).
"""

from __future__ import annotations

import errno
import re

import attrs
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from vmemu import (
    MADV_DOFORK,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_KEEPONFORK,
    MADV_WIPEONFORK,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MMAP_MIN_ADDR,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    SEGV_ACCERR,
    SEGV_MAPERR,
    TASK_SIZE,
    Kernel,
    Process,
    Signal,
    Sigsegv,
)
from vmemu.mmu.gup import follow_page

BASE = 0x1000_0000
NPAGES = 32
MAX_PROCS = 4
ZERO_PAGE = bytes(PAGE_SIZE)
_OFF = PAGE_SIZE - 1


# -- values whose repr pastes back as Python -----------------------------------


class Named(int):
    """An int that prints as the expression naming it, e.g. ``PROT_READ | PROT_WRITE``."""

    text: str

    def __new__(cls, value: int, text: str) -> Named:
        obj = int.__new__(cls, value)
        obj.text = text
        return obj

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, p: object, cycle: bool) -> None:
        p.text(self.text)  # type: ignore[attr-defined]


class Addr(int):
    """An address that prints in hex."""

    def __repr__(self) -> str:
        return hex(self)

    def _repr_pretty_(self, p: object, cycle: bool) -> None:
        p.text(hex(self))  # type: ignore[attr-defined]


def named(*names: str) -> Named:
    """``named("PROT_READ", "PROT_WRITE")`` -> 3 printed as ``PROT_READ | PROT_WRITE``."""
    import vmemu

    return Named(sum(getattr(vmemu, n) for n in names), " | ".join(names))


PROTS = [
    named("PROT_NONE"),
    named("PROT_READ"),
    named("PROT_WRITE"),
    named("PROT_READ", "PROT_WRITE"),
    named("PROT_READ", "PROT_EXEC"),
    named("PROT_READ", "PROT_WRITE", "PROT_EXEC"),
]
ADVICE = [named(n) for n in ("MADV_DONTNEED", "MADV_DONTFORK", "MADV_DOFORK",
                             "MADV_WIPEONFORK", "MADV_KEEPONFORK")]
pages_st = st.integers(0, NPAGES - 1)
# accesses favour a few hot pages so that write, fork, write, read chains meet
access_pages_st = st.one_of(st.integers(0, 3), pages_st)
npages_st = st.integers(1, 8)
# offsets inside a page that make accesses cross, or just fit, page ends
offsets_st = st.one_of(st.sampled_from([0, 1, PAGE_SIZE - 8, PAGE_SIZE - 1]),
                       st.integers(0, PAGE_SIZE - 1))
tasks_st = st.sampled_from(["main", "worker"])


def window_addr(page: int, off: int = 0) -> Addr:
    """The address ``off`` bytes into page ``page`` of the window."""
    return Addr(BASE + page * PAGE_SIZE + off)


def pattern(fill: int, n: int) -> bytes:
    """``n`` bytes that differ from zero and from their neighbours."""
    return bytes(((fill + i) % 255) + 1 for i in range(n))


# -- the model -----------------------------------------------------------------


@attrs.define(eq=False)
class SharedObj:
    """The shmem object behind one MAP_SHARED|MAP_ANONYMOUS mmap call."""

    name: int
    pages: dict[int, bytearray] = attrs.field(factory=dict)


@attrs.define
class PageModel:
    """What a process sees at one virtual page."""

    prot: int
    shared: SharedObj | None = None
    index: int = 0  # page index in ``shared``
    data: bytes | None = None  # private contents; None reads as zeros
    dontfork: bool = False
    wipeonfork: bool = False

    def content(self) -> bytes:
        """The page's current bytes."""
        if self.shared is not None:
            buf = self.shared.pages.get(self.index)
            return ZERO_PAGE if buf is None else bytes(buf)
        return ZERO_PAGE if self.data is None else self.data

    def store(self, off: int, data: bytes) -> None:
        """Write ``data`` at ``off`` in the page."""
        if self.shared is not None:
            buf = self.shared.pages.setdefault(self.index, bytearray(PAGE_SIZE))
            buf[off:off + len(data)] = data
        else:
            buf = bytearray(self.content())
            buf[off:off + len(data)] = data
            self.data = bytes(buf)

    def readable(self) -> bool:
        """x86 lets any of r, w, x read (``access_error``)."""
        return bool(self.prot & (PROT_READ | PROT_WRITE | PROT_EXEC))

    def writable(self) -> bool:
        """Writes need PROT_WRITE."""
        return bool(self.prot & PROT_WRITE)

    def perms(self) -> str:
        """The ``rwxp`` column of /proc/<pid>/maps."""
        p = self.prot
        return ("r" if p & PROT_READ else "-") + ("w" if p & PROT_WRITE else "-") + \
            ("x" if p & PROT_EXEC else "-") + ("s" if self.shared is not None else "p")


Pages = dict[int, PageModel]


def fork_pages(pages: Pages) -> Pages:
    """The child's view after fork: DONTFORK pages gone, WIPEONFORK private pages zeroed."""
    child: Pages = {}
    for vpn, pg in pages.items():
        if pg.dontfork:
            continue
        c = attrs.evolve(pg)
        if pg.wipeonfork and pg.shared is None:
            c.data = None
        child[vpn] = c
    return child


def expect_access(pages: Pages, addr: int, n: int, data: bytes | None
                  ) -> tuple[bytes, tuple[int, int, int] | None]:
    """Apply a read (``data`` None) or write to the model, page by page.

    Returns the bytes read and, if the access faults, ``(si_code, si_addr,
    done)``. Pages before the faulting one are written, as the emulator and
    a real ``memcpy`` do.
    """
    out = bytearray()
    done = 0
    while done < n:
        a = addr + done
        off = a & _OFF
        chunk = min(n - done, PAGE_SIZE - off)
        pg = pages.get(a >> PAGE_SHIFT)
        if pg is None:
            return bytes(out), (SEGV_MAPERR, a, done)
        if not (pg.readable() if data is None else pg.writable()):
            return bytes(out), (SEGV_ACCERR, a, done)
        if data is None:
            out += pg.content()[off:off + chunk]
        else:
            pg.store(off, data[done:done + chunk])
        done += chunk
    return bytes(out), None


# -- parsing /proc views -------------------------------------------------------

_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ")


def parse_maps(text: str) -> dict[int, str]:
    """vpn -> ``rwxp`` for every page /proc/<pid>/maps shows."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        m = _HEAD.match(line)
        assert m, f"bad maps line {line!r}"
        start, end = int(m[1], 16), int(m[2], 16)
        for vpn in range(start >> PAGE_SHIFT, end >> PAGE_SHIFT):
            assert vpn not in out, f"maps shows {vpn << PAGE_SHIFT:#x} twice"
            out[vpn] = m[3]
    return out


def parse_smaps_forkflags(text: str) -> dict[int, tuple[bool, bool]]:
    """vpn -> (dc, wf) from the VmFlags lines of /proc/<pid>/smaps."""
    out: dict[int, tuple[bool, bool]] = {}
    rng = range(0)
    for line in text.splitlines():
        m = _HEAD.match(line)
        if m:
            rng = range(int(m[1], 16) >> PAGE_SHIFT, int(m[2], 16) >> PAGE_SHIFT)
        elif line.startswith("VmFlags:"):
            flags = line.split()[1:]
            for vpn in rng:
                out[vpn] = ("dc" in flags, "wf" in flags)
    return out


# -- the machine -----------------------------------------------------------------


class MmMachine(RuleBasedStateMachine):
    """Processes on one emulated kernel, compared against :class:`PageModel` dicts."""

    procs = Bundle("procs")

    def __init__(self) -> None:
        super().__init__()
        self.kernel = Kernel()
        self.model: dict[Process, Pages] = {}
        self.root: Process | None = None
        self.next_obj = 0

    # -- helpers ---------------------------------------------------------------

    def flushes(self, p: Process) -> int:
        """TLB flushes so far in ``p``'s mm."""
        return p.statistics().tlb_flushes

    def expect_errno(self, want: int | None, fn: object, *args: int) -> object:
        """Call ``fn(*args)``; it must fail with ``want`` (or succeed when None)."""
        name = getattr(fn, "__name__", "call")
        event(f"{name}: {errno.errorcode[want] if want else 'ok'}")
        try:
            got = fn(*args)  # type: ignore[operator]
        except OSError as e:
            assert e.errno == want, f"{name}: errno {e.errno} ({e}), model expects {want}"
            return None
        assert want is None, f"{name} succeeded, model expects errno {want}"
        return got

    def check_signal(self, sig: Signal | None, want: tuple[int, int, int] | None) -> None:
        """A fault the model predicted, or no fault when it did not."""
        event(f"access: {('SEGV_MAPERR', 'SEGV_ACCERR')[want[0] - 1] if want else 'ok'}")
        if want is None:
            assert sig is None, f"unexpected {sig!r} (si_addr {sig.si_addr:#x})"
            return
        assert sig is not None, f"model expects SIGSEGV {want}, access succeeded"
        assert type(sig) is Sigsegv, f"{sig!r}"
        got = (sig.si_code, sig.si_addr, sig.done)
        assert got == want, f"signal (si_code, si_addr, done) {got} != model {want}"

    def new_pages(self, addr: int, npages: int, prot: int, shared: bool) -> Pages:
        """Model pages of a fresh mapping."""
        obj = None
        if shared:
            self.next_obj += 1
            obj = SharedObj(self.next_obj)
        return {(addr >> PAGE_SHIFT) + i: PageModel(prot, obj, i) for i in range(npages)}

    # -- processes -------------------------------------------------------------

    @initialize(target=procs, shared_at=st.integers(0, NPAGES), shared_len=st.integers(0, 8))
    def start(self, shared_at: int, shared_len: int) -> Process:
        """The root process: its window mapped private rw with a shared piece, partly written."""
        p = self.kernel.spawn("p0")
        self.root = p
        self.model[p] = {}
        rw = PROT_READ | PROT_WRITE
        p.mmap(BASE, NPAGES * PAGE_SIZE, rw, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
        self.model[p].update(self.new_pages(BASE, NPAGES, rw, False))
        shared_len = min(shared_len, NPAGES - shared_at)
        if shared_len:
            addr = window_addr(shared_at)
            p.mmap(addr, shared_len * PAGE_SIZE, rw, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED)
            self.model[p].update(self.new_pages(addr, shared_len, rw, True))
        for page in [0, 1, 2, 3, *range(4, NPAGES, 3)]:  # some pages start with data
            addr = window_addr(page)
            data = pattern(page, PAGE_SIZE)
            p.write(addr, data)
            self.model[p][addr >> PAGE_SHIFT].store(0, data)
        return p

    @precondition(lambda self: len(self.model) < MAX_PROCS)
    @rule(target=procs, p=procs)
    def fork(self, p: Process) -> Process:
        before = self.flushes(p)
        parent_tlb = bool(p.mm.tlb.r)
        event("fork")
        child = p.fork(f"p{len(self.model)}")
        self.model[child] = fork_pages(self.model[p])
        if parent_tlb:
            assert self.flushes(p) > before, "fork write-protected without a TLB flush"
        return child

    @precondition(lambda self: len(self.model) > 1)
    @rule(target=procs, p=consumes(procs))
    def exit(self, p: Process) -> object:
        if p is self.root:
            return p  # the root stays; put it back
        event("exit")
        p.exit()
        del self.model[p]
        return multiple()

    # -- syscalls ----------------------------------------------------------------

    @rule(p=procs, page=pages_st, npages=npages_st, prot=st.sampled_from(PROTS),
          shared=st.booleans(),
          how=st.sampled_from(["hint", "MAP_FIXED", "MAP_FIXED_NOREPLACE", "none"]),
          populate=st.booleans(), addr_slop=st.sampled_from([0, 0, 0, 1, _OFF]),
          len_slop=st.sampled_from([0, 0, 1, _OFF]))
    def mmap(self, p: Process, page: int, npages: int, prot: int, shared: bool, how: str,
             populate: bool, addr_slop: int, len_slop: int) -> None:
        pages = self.model[p]
        addr = 0 if how == "none" else window_addr(page, addr_slop)
        length = npages * PAGE_SIZE - len_slop
        flags = MAP_ANONYMOUS | (MAP_SHARED if shared else MAP_PRIVATE)
        flags |= {"MAP_FIXED": MAP_FIXED, "MAP_FIXED_NOREPLACE": MAP_FIXED_NOREPLACE}.get(how, 0)
        if populate:
            flags |= MAP_POPULATE
        aligned = addr & ~_OFF
        overlap = any(v in pages for v in range(aligned >> PAGE_SHIFT,
                                                 (aligned >> PAGE_SHIFT) + npages))
        want = None
        if how.startswith("MAP_FIXED") and addr_slop:
            want = errno.EINVAL
        elif how == "MAP_FIXED_NOREPLACE" and overlap:
            want = errno.EEXIST
        before = self.flushes(p)
        got = self.expect_errno(want, p.mmap, addr, length, prot, flags)
        if want is not None:
            return
        assert isinstance(got, int) and got & _OFF == 0, f"mmap returned {got!r}"
        if how.startswith("MAP_FIXED") or how == "hint" and not overlap:
            assert got == aligned, f"mmap at {got:#x}, model expects {aligned:#x}"
        else:
            assert MMAP_MIN_ADDR <= got <= TASK_SIZE - npages * PAGE_SIZE
            assert not any(v in pages for v in range(got >> PAGE_SHIFT,
                                                     (got >> PAGE_SHIFT) + npages)), \
                f"mmap placed {got:#x} over an existing mapping"
        if how == "MAP_FIXED" and overlap:
            assert self.flushes(p) > before, "MAP_FIXED replaced pages without a TLB flush"
        pages.update(self.new_pages(got, npages, prot, shared))

    @rule(p=procs, page=pages_st, npages=st.integers(1, 10),
          addr_slop=st.sampled_from([0, 0, 0, 1]), len_slop=st.sampled_from([0, 0, 1, _OFF]))
    def munmap(self, p: Process, page: int, npages: int, addr_slop: int, len_slop: int) -> None:
        pages = self.model[p]
        addr = window_addr(page, addr_slop)
        vpns = range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + npages)
        want = errno.EINVAL if addr_slop else None
        before = self.flushes(p)
        self.expect_errno(want, p.munmap, addr, npages * PAGE_SIZE - len_slop)
        if want is not None:
            return
        hit = [v for v in vpns if v in pages]
        for v in hit:
            del pages[v]
        if hit:
            assert self.flushes(p) > before, "munmap without a TLB flush"

    @rule(p=procs, page=pages_st, npages=npages_st, prot=st.sampled_from(PROTS))
    def mprotect(self, p: Process, page: int, npages: int, prot: int) -> None:
        pages = self.model[p]
        addr = window_addr(page)
        want = None
        changed = False
        for v in range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + npages):
            pg = pages.get(v)
            if pg is None:  # a hole: ENOMEM, keeping what was done before it
                want = errno.ENOMEM
                break
            changed |= pg.prot != prot
            pg.prot = prot
        before = self.flushes(p)
        self.expect_errno(want, p.mprotect, addr, npages * PAGE_SIZE, prot)
        if changed:
            assert self.flushes(p) > before, "mprotect changed protection without a TLB flush"

    @rule(p=procs, page=pages_st, npages=npages_st, advice=st.sampled_from(ADVICE))
    def madvise(self, p: Process, page: int, npages: int, advice: int) -> None:
        pages = self.model[p]
        addr = window_addr(page)
        want = None
        unmapped = zapped = False
        for v in range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + npages):
            pg = pages.get(v)
            if pg is None:
                unmapped = True  # holes are skipped, ENOMEM at the end
                continue
            if advice == MADV_DONTNEED:
                zapped = True
                if pg.shared is None:
                    pg.data = None
            elif advice == MADV_DONTFORK:
                pg.dontfork = True
            elif advice == MADV_DOFORK:
                pg.dontfork = False
            elif advice == MADV_WIPEONFORK:
                if pg.shared is not None:
                    want = errno.EINVAL  # shared memory cannot be wiped; stop here
                    break
                pg.wipeonfork = True
            elif advice == MADV_KEEPONFORK:
                pg.wipeonfork = False
        if want is None and unmapped:
            want = errno.ENOMEM
        before = self.flushes(p)
        self.expect_errno(want, p.madvise, addr, npages * PAGE_SIZE, advice)
        if zapped:
            assert self.flushes(p) > before, "MADV_DONTNEED without a TLB flush"

    # -- accesses ----------------------------------------------------------------

    @rule(p=procs, task=tasks_st, page=access_pages_st, off=offsets_st,
          n=st.one_of(st.integers(1, 16), st.integers(1, 2 * PAGE_SIZE)))
    def read(self, p: Process, task: str, page: int, off: int, n: int) -> None:
        addr = window_addr(page, off)
        want_data, want_sig = expect_access(self.model[p], addr, n, None)
        try:
            got = p.thread(task).read(addr, n)
            sig = None
        except Signal as e:
            sig = e
        self.check_signal(sig, want_sig)
        if sig is None:
            assert got == want_data, f"read at {addr:#x} differs from the model"

    @rule(p=procs, task=tasks_st, page=access_pages_st, off=offsets_st,
          n=st.one_of(st.integers(1, 16), st.integers(1, 2 * PAGE_SIZE)),
          fill=st.integers(0, 254))
    def write(self, p: Process, task: str, page: int, off: int, n: int, fill: int) -> None:
        addr = window_addr(page, off)
        data = pattern(fill, n)
        _, want_sig = expect_access(self.model[p], addr, n, data)
        try:
            p.thread(task).write(addr, data)
            sig = None
        except Signal as e:
            sig = e
        self.check_signal(sig, want_sig)

    @rule(p=procs, task=tasks_st, page=access_pages_st, off=offsets_st,
          width=st.sampled_from([1, 2, 4, 8]), value=st.integers(0, 2**64 - 1),
          write=st.booleans())
    def typed(self, p: Process, task: str, page: int, off: int, width: int, value: int,
              write: bool) -> None:
        addr = window_addr(page, off)
        value &= (1 << (8 * width)) - 1
        t = p.thread(task)
        data = value.to_bytes(width, "little") if write else None
        want_data, want_sig = expect_access(self.model[p], addr, width, data)
        got = None
        try:
            if write:
                getattr(t, f"write_u{8 * width}")(addr, value)
            else:
                got = getattr(t, f"read_u{8 * width}")(addr)
            sig = None
        except Signal as e:
            sig = e
        self.check_signal(sig, want_sig)
        if sig is None and not write:
            assert got == int.from_bytes(want_data, "little"), f"read_u{8 * width} at {addr:#x}"

    @rule(p=procs)
    def read_window(self, p: Process) -> None:
        """Read every page of the window and compare it with the model."""
        pages = self.model[p]
        for page in range(NPAGES):
            addr = window_addr(page)
            want_data, want_sig = expect_access(pages, addr, PAGE_SIZE, None)
            try:
                got = p.read(addr, PAGE_SIZE)
                sig = None
            except Signal as e:
                sig = e
            self.check_signal(sig, want_sig)
            if sig is None:
                assert got == want_data, f"{p!r}: page {addr:#x} differs from the model"

    # -- invariants --------------------------------------------------------------

    @invariant()
    def kernel_check(self) -> None:
        self.kernel.check()

    @invariant()
    def maps_match_model(self) -> None:
        for p, pages in self.model.items():
            shown = parse_maps(p.maps())
            want = {v: pg.perms() for v, pg in pages.items()}
            if shown != want:
                diff = sorted(v for v in shown.keys() | want.keys() if shown.get(v) != want.get(v))
                raise AssertionError(f"{p!r} maps differ at " + ", ".join(
                    f"{v << PAGE_SHIFT:#x}: {shown.get(v)} != model {want.get(v)}"
                    for v in diff[:4]))
            flags = parse_smaps_forkflags(p.smaps())
            want_flags = {v: (pg.dontfork, pg.wipeonfork) for v, pg in pages.items()}
            assert flags == want_flags, f"{p!r} smaps VmFlags dc/wf differ from the model"

    @invariant()
    def mapped_memory_matches_model(self) -> None:
        """Every present page holds what the model says, without faulting anything in.

        ``follow_page`` walks the tables the way GUP does, so this catches a
        page that changed behind a process's back (a COW that leaked a write)
        at the step it happened, not only when a later read stumbles on it.
        """
        for p, pages in self.model.items():
            for vpn, pg in pages.items():
                buf = follow_page(p.mm, vpn << PAGE_SHIFT)
                if buf is not None and bytes(buf) != pg.content():
                    raise AssertionError(f"{p!r}: memory at {vpn << PAGE_SHIFT:#x} differs "
                                         "from the model")

    @invariant()
    def tlb_never_exceeds_model(self) -> None:
        """A cached translation is never more than the model allows (no stale TLB entry)."""
        for p, pages in self.model.items():
            tlb = p.mm.tlb
            for vpn in tlb.r:
                pg = pages.get(vpn)
                assert pg is not None and pg.readable(), \
                    f"{p!r}: TLB maps {vpn << PAGE_SHIFT:#x} readable, model says {pg}"
            for vpn in tlb.w:
                pg = pages.get(vpn)
                assert pg is not None and pg.writable(), \
                    f"{p!r}: TLB maps {vpn << PAGE_SHIFT:#x} writable, model says {pg}"

    def teardown(self) -> None:
        for p in list(self.model):
            p.exit()
        self.kernel.check()


def scaled(fraction: float, **kw: object) -> settings:
    """The active profile's settings with ``max_examples`` scaled by ``fraction``."""
    base = settings()
    return settings(base, max_examples=max(5, int(base.max_examples * fraction)), **kw)


MmMachine.TestCase.settings = scaled(1.0)
TestMmStateful = MmMachine.TestCase


def test_model_pattern_is_never_zero() -> None:
    """The write pattern must differ from zero-fill, or lost writes would go unseen."""
    assert 0 not in pattern(0, 600) and PROT_NONE == 0
