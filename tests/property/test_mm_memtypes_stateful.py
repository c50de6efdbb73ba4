"""Stateful property test: every memory type through the issue-3 syscalls, against a model.

What it models
--------------
:class:`MemTypesMachine` drives a root process and the children it forks
over a window of :data:`NPAGES` pages holding, side by side, the four
small-page memory types of the kernel's selftests:

* ``anon``: MAP_PRIVATE|MAP_ANONYMOUS;
* ``shmem``: MAP_SHARED of a memfd, and MAP_SHARED|MAP_ANONYMOUS (a shmem
  object of its own, sized at mmap time);
* ``shmem-private``: MAP_PRIVATE of a memfd, copy-on-write over the page cache.

Two memfds exist from the start (sizes not page multiples on purpose) and
every process inherits them. The rules: mmap (with file offsets,
MAP_FIXED / MAP_FIXED_NOREPLACE / hint, MAP_POPULATE), munmap, mprotect,
madvise (DONTNEED, REMOVE, FREE, WILLNEED, COLD, PAGEOUT, POPULATE_READ,
POPULATE_WRITE, HUGEPAGE, NOHUGEPAGE, COLLAPSE, DONTFORK, DOFORK,
WIPEONFORK, KEEPONFORK, HWPOISON), mremap (grow, shrink, MAYMOVE, FIXED,
DONTUNMAP), mlock / mlock2(MLOCK_ONFAULT) / munlock, ftruncate, fallocate
(allocate, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE), pread, pwrite, F_ADD_SEALS
(the memfds allow sealing; every file rule, mmap and mprotect obey the
seals), fork, exit, direct reclaim, and reads and writes from two tasks. The kernel is one of
three configurations: no swap; swap; swap and a memory limit small enough
that accesses reclaim and swap back in all the time.

The model (:mod:`memtypes_model`) predicts the bytes of every access in
every process (aliasing through the page cache, private COW, zero-fill
versus refault from the page cache after DONTNEED, SIGBUS beyond EOF,
SIGSEGV), the errno of every call, and after every step:
``kernel.check()``; every present page equals the model (``follow_page``,
which faults nothing in); every file reads back (``pread``) as the model;
/proc/<pid>/maps and the smaps VmFlags ``dc``/``wf``/``lo`` agree with it;
the software TLB holds no translation the model forbids.

Where the model needed a decision it was settled on the real 6.18 kernel
of this machine (see the comments at each rule); MADV_HWPOISON follows
``mm/memory-failure.c``, ``mm/shmem.c`` and ``mm/madvise.c`` (that kernel is
built without CONFIG_MEMORY_FAILURE): any page, anonymous or a shmem page
cache page, which stays cached and poisoned (faults SIGBUS BUS_MCEERR_AR,
pread/pwrite EIO) until truncated or punched, while hwpoison entries
survive a punched hole but not ftruncate, MADV_DONTNEED or MADV_FREE. vmemu bugs it
found, fixed with regression tests in tests/mmu: mlock / MAP_POPULATE of a
shared PROT_WRITE- or PROT_EXEC-only mapping was ENOMEM (no FOLL_FORCE);
mlock over a poisoned page was EHWPOISON instead of ENOMEM; a populate
that failed did not go on at the next VMA; pread/pwrite read and wrote a
poisoned shmem page (EIO on Linux); pagemap showed a hwpoison entry as
nothing (PM_SWAP on Linux); MADV_POPULATE_WRITE / mlock over a lazily
freed page did not dirty it (FOLL_TOUCH); MADV_FREE kept hwpoison entries.

Budget: ``scaled(0.3)`` of the profile's examples (about 6-9 s in the
default profile on the project VM); ``VMEMU_HYPOTHESIS_PROFILE=campaign``
runs 600 examples of 100 steps.

:mod:`test_mm_huge_stateful` does the same for hugetlb and THP.
"""

from __future__ import annotations

import errno

import attrs
from hypothesis import event, given, settings
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
from memtypes_model import (
    HPAGE_PAGES,
    ZERO_PAGE,
    FileModel,
    PageModel,
    Pages,
    fork_pages,
    merged,
    parse_smaps_flags,
    parse_vmas,
    plan_access,
    runs,
)
from test_mm_stateful import PROTS, Addr, Named, named, pattern, scaled

from vmemu import (
    BUS_MCEERR_AR,
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DOFORK,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_HWPOISON,
    MADV_KEEPONFORK,
    MADV_NOHUGEPAGE,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MMAP_MIN_ADDR,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
    Kernel,
    Process,
    Sigbus,
    Signal,
)
from vmemu.mmu.gup import EHWPOISON, follow_page
from vmemu.mmu.memfd import (
    F_ADD_SEALS,
    F_ALL_SEALS,
    F_GET_SEALS,
    F_SEAL_EXEC,
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    MFD_ALLOW_SEALING,
    MFD_CLOEXEC,
    MFD_EXEC,
    MFD_HUGE_MASK,
    MFD_HUGE_SHIFT,
    MFD_HUGETLB,
    MFD_NOEXEC_SEAL,
)
from vmemu.mmu.mlock import MLOCK_ONFAULT
from vmemu.mmu.pgtable import SWP_HWPOISON, is_swap_pte_raw, swp_type
from vmemu.mmu.vmscan import try_to_free_pages
from vmemu.process import F_GETFD, FD_CLOEXEC

BASE = 0x1000_0000
NPAGES = 32
MAX_PROCS = 4
MAX_LOCKED = 12  # model pages locked at once, so a memory limit can always reclaim
MEM_LIMIT = 40
_OFF = PAGE_SIZE - 1
RW = PROT_READ | PROT_WRITE

# (name, needs a memfd, MAP_SHARED)
KINDS = ["anon", "shmem-anon", "memfd-shared", "memfd-private"]
ADVICE = [named(n) for n in (
    "MADV_DONTNEED", "MADV_REMOVE", "MADV_FREE", "MADV_WILLNEED", "MADV_COLD", "MADV_PAGEOUT",
    "MADV_POPULATE_READ", "MADV_POPULATE_WRITE", "MADV_HUGEPAGE", "MADV_NOHUGEPAGE",
    "MADV_COLLAPSE", "MADV_DONTFORK", "MADV_DOFORK", "MADV_WIPEONFORK", "MADV_KEEPONFORK")]
REMAP_FLAGS = [named(*n) if n else Named(0, "0") for n in (
    (), ("MREMAP_MAYMOVE",), ("MREMAP_MAYMOVE", "MREMAP_FIXED"),
    ("MREMAP_MAYMOVE", "MREMAP_DONTUNMAP"), ("MREMAP_MAYMOVE", "MREMAP_FIXED", "MREMAP_DONTUNMAP"),
    ("MREMAP_FIXED",))]
FALLOC_MODES = [Named(0, "0"), Named(FALLOC_FL_KEEP_SIZE, "FALLOC_FL_KEEP_SIZE"),
                Named(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      "FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE"),
                Named(FALLOC_FL_PUNCH_HOLE, "FALLOC_FL_PUNCH_HOLE")]

MFD_FLAGS = [Named(MFD_CLOEXEC, "MFD_CLOEXEC"), Named(MFD_ALLOW_SEALING, "MFD_ALLOW_SEALING"),
             Named(MFD_HUGETLB, "MFD_HUGETLB"), Named(21 << MFD_HUGE_SHIFT, "MFD_HUGE_2MB"),
             Named(22 << MFD_HUGE_SHIFT, "22 << MFD_HUGE_SHIFT"), Named(MFD_EXEC, "MFD_EXEC"),
             Named(MFD_NOEXEC_SEAL, "MFD_NOEXEC_SEAL"), Named(0x100, "0x100")]
SEALS = [Named(F_SEAL_SHRINK, "F_SEAL_SHRINK"), Named(F_SEAL_GROW, "F_SEAL_GROW"),
         Named(F_SEAL_WRITE, "F_SEAL_WRITE"), Named(F_SEAL_FUTURE_WRITE, "F_SEAL_FUTURE_WRITE"),
         Named(F_SEAL_SEAL, "F_SEAL_SEAL"), Named(0x1000, "0x1000")]

pages_st = st.integers(0, NPAGES - 1)
access_pages_st = st.one_of(st.integers(0, 3), pages_st)
npages_st = st.integers(1, 8)
offsets_st = st.one_of(st.sampled_from([0, 1, PAGE_SIZE - 8, PAGE_SIZE - 1]),
                       st.integers(0, PAGE_SIZE - 1))
file_offsets_st = st.one_of(st.integers(0, 12 * PAGE_SIZE),
                            st.integers(0, 12).map(lambda i: i * PAGE_SIZE))
sizes_st = st.one_of(st.integers(0, 12).map(lambda i: i * PAGE_SIZE), st.integers(0, 12 * PAGE_SIZE))
tasks_st = st.sampled_from(["main", "worker"])


def hwpoison_entry_at(p: Process, vpn: int) -> bool:
    """Does a page table of ``p`` hold a hwpoison entry for page ``vpn`` (PTE or huge PMD)?"""
    for level in p.walk(vpn << PAGE_SHIFT):
        e = level.entry
        if e and not e & 1 and is_swap_pte_raw(e) and swp_type(e) == SWP_HWPOISON:
            return True
    return False


def window_addr(page: int, off: int = 0) -> Addr:
    """The address ``off`` bytes into page ``page`` of the window."""
    return Addr(BASE + page * PAGE_SIZE + off)


def split_inside_huge(pages: Pages, vpn: int) -> bool:
    """True when ``vpn`` falls strictly inside a hugetlb page (a VMA split there is EINVAL)."""
    pg = pages.get(vpn)
    return vpn % HPAGE_PAGES != 0 and pg is not None and pg.huge


def fault_model(pages: Pages, vpn: int) -> None:
    """What a successful fault of a hugetlb file page does to the model (``hugetlb_no_page``).

    A shared fault puts the huge page in the page cache. A private fault
    maps the cached page if there is one; over a hole it allocates an
    anonymous huge page of zeros, which later writes to the file never
    reach. Other memory types need nothing here.
    """
    pg = pages[vpn]
    if not pg.huge or pg.file is None:
        return
    hidx = pg.index // HPAGE_PAGES
    if pg.kind == "shared":
        pg.file.cached.add(hidx)
    elif pg.kind == "private" and pg.data is None and hidx not in pg.file.cached:
        cow(pages, vpn)


def cow(pages: Pages, vpn: int) -> None:
    """A write fault on a private file page copies it; hugetlb copies the whole huge page."""
    pg = pages[vpn]
    if pg.kind == "shared":
        return
    if not pg.huge or pg.kind == "anon":
        pg.cow()
        return
    base = vpn - vpn % HPAGE_PAGES
    for v in range(base, base + HPAGE_PAGES):
        other = pages.get(v)
        if other is not None and other.file is pg.file:
            other.cow()


class MemTypesMachine(RuleBasedStateMachine):
    """Processes over anon, shmem and shmem-private memory, against :mod:`memtypes_model`."""

    procs = Bundle("procs")
    max_locked = MAX_LOCKED

    def __init__(self) -> None:
        super().__init__()
        self.kernel: Kernel
        self.model: dict[Process, Pages] = {}
        self.root: Process
        self.files: list[FileModel] = []
        self.next_obj = 0
        self.swap = False

    # -- helpers ---------------------------------------------------------------

    def expect_errno(self, want: int | None, fn: object, *args: object) -> object:
        """Call ``fn(*args)``; it must fail with ``want`` (or succeed when None)."""
        name = getattr(fn, "__name__", "call")
        event(f"{name}: {errno.errorcode.get(want, want) if want else 'ok'}")
        try:
            got = fn(*args)  # type: ignore[operator]
        except OSError as e:
            assert e.errno == want, f"{name}{args}: errno {e.errno} ({e}), model expects {want}"
            return None
        assert want is None, f"{name}{args} succeeded, model expects errno {want}"
        return got

    def check_signal(self, sig: Signal | None, want: tuple[type, int, int, int] | None) -> None:
        """A signal the model predicted, or none when it did not."""
        event(f"access: {want[0].__name__ if want else 'ok'}")
        if want is None:
            assert sig is None, f"unexpected {sig!r} (si_addr {sig.si_addr:#x})"
            return
        assert sig is not None, f"model expects {want}, access succeeded"
        got = (type(sig), sig.si_code, sig.si_addr, sig.done)
        assert got == want, f"signal {got} != model {want}"

    def vmas(self, p: Process) -> list[tuple[int, int, str]]:
        """The emulator's VMAs of ``p`` (start_vpn, end_vpn, perms)."""
        return parse_vmas(p.maps())

    def new_object(self, npages: int) -> FileModel:
        """The shmem object of a MAP_SHARED|MAP_ANONYMOUS mmap."""
        self.next_obj += 1
        return FileModel(f"shm{self.next_obj}", npages * PAGE_SIZE)

    def populate_model(self, p: Process, start: int, end: int) -> None:
        """What ``mm_populate(ignore_errors)`` does to the model: COW of private writable file pages.

        MAP_POPULATE, mlock and a locked mremap fault the range in, with a
        write fault where ``(VM_WRITE | VM_SHARED) == VM_WRITE``
        (``populate_vma_page_range``). A fault that fails (SIGBUS beyond
        EOF, a poisoned page) ends that VMA's part and the walk goes on at
        the next VMA (``__mm_populate``).
        """
        pages = self.model[p]
        for s, e, perms in self.vmas(p):
            s, e = max(s, start), min(e, end)
            if s >= e or perms.startswith("---"):
                continue
            for vpn in range(s, e):
                pg = pages[vpn]
                if pg.sigbus() is not None:
                    break
                fault_model(pages, vpn)
                if pg.writable() and not pg.vm_shared():
                    cow(pages, vpn)

    def touch_lazy(self, p: Process, vpns: list[int]) -> None:
        """A write populate (FOLL_TOUCH|FOLL_WRITE) reached these pages: lazy ones are dirty now.

        Reclaim may have discarded a lazily freed page before (the populate
        then faulted in a zero page); either way it is an ordinary page from
        now on. Which of the two happened, the page says.
        """
        pages = self.model[p]
        for v in vpns:
            pg = pages[v]
            if not pg.lazy:
                continue
            buf = follow_page(p.mm, v << PAGE_SHIFT)
            assert buf is not None, f"{p!r}: {v << PAGE_SHIFT:#x} not present after a populate"
            now = bytes(buf)
            assert now in pg.candidates(), f"{p!r}: lazy page {v << PAGE_SHIFT:#x} is neither"
            pg.data = None if now == ZERO_PAGE else now
            pg.lazy = False

    def checked(self, pages: Pages) -> list[tuple[int, PageModel]]:
        """The pages whose memory the invariants compare (all of them here)."""
        return list(pages.items())

    def locked_pages(self) -> int:
        return sum(pg.locked for pages in self.model.values() for pg in pages.values())

    # -- processes -------------------------------------------------------------

    @initialize(target=procs, config=st.sampled_from(["noswap", "swap", "pressure"]),
                sizes=st.tuples(sizes_st, sizes_st),
                layout=st.lists(st.sampled_from(KINDS), min_size=4, max_size=4))
    def start(self, config: str, sizes: tuple[int, int], layout: list[str]) -> Process:
        """The root: two memfds, its window in four 8-page parts of drawn kinds, partly written."""
        event(f"config {config}")
        self.kernel = Kernel(mem_limit_pages=MEM_LIMIT if config == "pressure" else None)
        if config != "noswap":
            self.kernel.swapon(pages=1024)
            self.swap = True
        p = self.kernel.spawn("p0")
        self.root = p
        self.model[p] = {}
        for i, size in enumerate(sizes):
            fd = p.memfd_create(f"f{i}", MFD_ALLOW_SEALING)
            p.ftruncate(fd, size)
            self.files.append(FileModel(f"f{i}", size, fd=fd))
        for part, kind in enumerate(layout):
            self.do_mmap(p, kind, 0, part * 8, 8, RW, "MAP_FIXED", False, 0)
        for page in [0, 1, 2, 3, *range(4, NPAGES, 3)]:
            data = pattern(page, PAGE_SIZE)
            segs, sig = plan_access(self.model[p], window_addr(page), PAGE_SIZE, True)
            try:
                p.write(window_addr(page), data)
            except Signal as e:  # beyond a memfd's end
                self.check_signal(e, sig)
                continue
            self.check_signal(None, sig)
            self.model[p][page + (BASE >> PAGE_SHIFT)].store(0, data)
        return p

    @precondition(lambda self: len(self.model) < MAX_PROCS)
    @rule(target=procs, p=procs)
    def fork(self, p: Process) -> Process:
        event("fork")
        child = p.fork(f"p{len(self.model)}")
        self.model[child] = fork_pages(self.model[p])
        for vpn, pg in self.model[child].items():
            if pg.poisoned and pg.kind == "private" and pg.data is None:
                # a hwpoison entry over a page cache page: copy_page_range copies it only
                # if the VMA has an anon_vma (vma_needs_copy), which the model does not
                # track; the child's page table says
                pg.poisoned = hwpoison_entry_at(child, vpn)
        return child

    @precondition(lambda self: len(self.model) > 1)
    @rule(target=procs, p=consumes(procs))
    def exit(self, p: Process) -> object:
        if p is self.root:
            return p
        event("exit")
        p.exit()
        del self.model[p]
        return multiple()

    # -- mmap, munmap, mprotect ----------------------------------------------------

    def do_mmap(self, p: Process, kind: str, file_no: int, page: int, npages: int, prot: int,
                how: str, populate: bool, pgoff: int, addr_slop: int = 0, len_slop: int = 0,
                off_slop: int = 0) -> None:
        pages = self.model[p]
        addr = 0 if how == "none" else window_addr(page, addr_slop)
        length = npages * PAGE_SIZE - len_slop
        file = self.files[file_no] if kind.startswith("memfd") else None
        flags = MAP_SHARED if kind in ("shmem-anon", "memfd-shared") else MAP_PRIVATE
        if file is None:
            flags |= MAP_ANONYMOUS
        flags |= {"MAP_FIXED": MAP_FIXED, "MAP_FIXED_NOREPLACE": MAP_FIXED_NOREPLACE}.get(how, 0)
        if populate:
            flags |= MAP_POPULATE
        offset = pgoff * PAGE_SIZE + off_slop if file is not None else 0
        aligned = addr & ~_OFF
        vpn0 = aligned >> PAGE_SHIFT
        overlap = any(v in pages for v in range(vpn0, vpn0 + npages))
        want = None
        if how.startswith("MAP_FIXED") and addr_slop or off_slop:
            want = errno.EINVAL
        elif how == "MAP_FIXED_NOREPLACE" and overlap:
            want = errno.EEXIST
        elif kind == "memfd-shared" and file is not None and file.write_sealed() \
                and prot & PROT_WRITE:
            want = errno.EPERM  # memfd_check_seals_mmap: no new shared writer
        got = self.expect_errno(want, p.mmap, addr, length, prot, flags,
                                -1 if file is None else file.fd, offset)
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
        if kind == "shmem-anon":
            file = self.new_object(npages)
        model_kind = {"anon": "anon", "shmem-anon": "shared", "memfd-shared": "shared",
                      "memfd-private": "private"}[kind]
        first = got >> PAGE_SHIFT
        # a shared mapping of a write-sealed memfd gets no VM_MAYWRITE (mprotect cannot add it)
        maywrite = not (kind == "memfd-shared" and file is not None and file.write_sealed())
        for i in range(npages):
            pages[first + i] = PageModel(prot, model_kind, file, pgoff + i, maywrite=maywrite)
        if populate:
            self.populate_model(p, first, first + npages)

    @rule(p=procs, kind=st.sampled_from(KINDS), file_no=st.integers(0, 1), page=pages_st,
          npages=npages_st, prot=st.sampled_from(PROTS),
          how=st.sampled_from(["hint", "MAP_FIXED", "MAP_FIXED_NOREPLACE", "none"]),
          populate=st.booleans(), pgoff=st.integers(0, 8),
          slop=st.sampled_from(["", "", "", "addr", "len", "off"]))
    def mmap(self, p: Process, kind: str, file_no: int, page: int, npages: int, prot: int,
             how: str, populate: bool, pgoff: int, slop: str) -> None:
        file_backed = kind.startswith("memfd")
        self.do_mmap(p, kind, file_no, page, npages, prot, how, populate,
                     pgoff if file_backed else 0,
                     addr_slop=1 if slop == "addr" and how != "none" else 0,
                     len_slop=_OFF if slop == "len" else 0,
                     off_slop=1 if slop == "off" and file_backed else 0)

    @rule(p=procs, page=pages_st, npages=st.integers(1, 10), addr_slop=st.sampled_from([0, 0, 0, 1]))
    def munmap(self, p: Process, page: int, npages: int, addr_slop: int) -> None:
        pages = self.model[p]
        addr = window_addr(page, addr_slop)
        want = errno.EINVAL if addr_slop else None
        self.expect_errno(want, p.munmap, addr, npages * PAGE_SIZE)
        if want is None:
            for v in range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + npages):
                pages.pop(v, None)

    @rule(p=procs, page=pages_st, npages=npages_st, prot=st.sampled_from(PROTS))
    def mprotect(self, p: Process, page: int, npages: int, prot: int) -> None:
        pages = self.model[p]
        addr = window_addr(page)
        want = None
        for v in range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + npages):
            pg = pages.get(v)
            if pg is None:  # a hole: ENOMEM, keeping what was done before it
                want = errno.ENOMEM
                break
            if prot & PROT_WRITE and pg.kind == "shared" and not pg.maywrite:
                want = errno.EACCES  # VM_WRITE without VM_MAYWRITE, at this VMA
                break
            pg.prot = prot
        self.expect_errno(want, p.mprotect, addr, npages * PAGE_SIZE, prot)

    # -- madvise -----------------------------------------------------------------

    def free_model(self, p: Process, pg: PageModel, vpn: int) -> None:
        """MADV_FREE on one private anonymous page (``madvise_free_pte_range``).

        A present page mapped once becomes lazily freeable (its bytes, or
        zeros once reclaim discards it); a page mapped by several processes
        is left alone; a swapped-out page is dropped with its swap entry.
        Which of these holds is the emulator's swap state, read from pagemap.
        """
        entry = p.pagemap(vpn << PAGE_SHIFT)
        present, swapped, exclusive = entry >> 63 & 1, entry >> 62 & 1, entry >> 56 & 1
        if swapped:  # a swap entry, or a hwpoison entry: cleared (madvise_free_pte_range)
            pg.data, pg.lazy, pg.poisoned = None, False, False
        elif present and exclusive and pg.data is not None:
            pg.lazy = True

    @rule(p=procs, page=pages_st, npages=npages_st, advice=st.sampled_from(ADVICE))
    def madvise(self, p: Process, page: int, npages: int, advice: int) -> None:
        pages = self.model[p]
        addr = window_addr(page)
        vpns = range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + npages)
        if advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
            self.madvise_populate(p, addr, npages, advice == MADV_POPULATE_WRITE)
            return
        want = None
        unmapped = False
        for v in vpns:
            pg = pages.get(v)
            if pg is None:
                unmapped = True  # holes are skipped, ENOMEM at the end
                continue
            if advice == MADV_COLLAPSE:
                want = errno.EINVAL  # no 2 MiB-aligned range fits in a 32-page window
                break
            if advice in (MADV_DONTNEED, MADV_FREE, MADV_COLD, MADV_PAGEOUT, MADV_REMOVE) \
                    and pg.locked:
                want = errno.EINVAL
                break
            if advice == MADV_DONTNEED:
                pg.data, pg.lazy, pg.poisoned = None, False, False
            elif advice == MADV_FREE:
                if pg.kind != "anon":
                    want = errno.EINVAL
                    break
                self.free_model(p, pg, v)
            elif advice == MADV_REMOVE:
                if pg.kind == "anon":
                    want = errno.EINVAL
                    break
                if pg.kind == "private" or not pg.maywrite:
                    want = errno.EACCES  # vma_is_shared_maywrite
                    break
                assert pg.file is not None  # a hole punched over the whole page
                if pg.file.write_sealed():
                    want = errno.EPERM  # shmem_fallocate
                    break
                pg.file.zero(pg.index * PAGE_SIZE, (pg.index + 1) * PAGE_SIZE)
            elif advice == MADV_DONTFORK:
                pg.dontfork = True
            elif advice == MADV_DOFORK:
                pg.dontfork = False
            elif advice == MADV_WIPEONFORK:
                if pg.kind != "anon":
                    want = errno.EINVAL
                    break
                pg.wipeonfork = True
            elif advice == MADV_KEEPONFORK:
                pg.wipeonfork = False
            elif advice in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
                pg.thp = int(advice)
        if want is None and unmapped:
            want = errno.ENOMEM
        event(f"madvise {advice!r}: {errno.errorcode.get(want, want) if want else 'ok'}")
        self.expect_errno(want, p.madvise, addr, npages * PAGE_SIZE, advice)

    def madvise_populate(self, p: Process, addr: int, npages: int, write: bool) -> None:
        """MADV_POPULATE_READ/WRITE (``madvise_populate``), page by page.

        A hole is ENOMEM; a VMA without the access (``check_vma_flags``) is
        EINVAL; a fault that would SIGBUS is EFAULT, a poisoned page
        EHWPOISON; the pages before the failure were populated (a write
        populate of a private file page COWs it).
        """
        pages = self.model[p]
        want = None
        touched = []
        for v in range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + npages):
            pg = pages.get(v)
            if pg is None:
                want = errno.ENOMEM
                break
            if not (pg.prot & (PROT_WRITE if write else PROT_READ)):
                want = errno.EINVAL
                break
            bus = pg.sigbus()
            if bus == BUS_MCEERR_AR:
                want = EHWPOISON
                break
            if bus is not None:
                want = errno.EFAULT
                break
            fault_model(pages, v)
            if write:
                touched.append(v)
                if not pg.lazy:
                    cow(pages, v)
                if pg.kind == "shared":
                    assert pg.file is not None
                    pg.file.dirty.add(pg.index)  # a write fault dirties the PTE
        self.expect_errno(want, p.madvise, addr, npages * PAGE_SIZE,
                          MADV_POPULATE_WRITE if write else MADV_POPULATE_READ)
        self.touch_lazy(p, touched)

    @precondition(lambda self: not self.swap)
    @rule(p=procs, page=access_pages_st)
    def hwpoison(self, p: Process, page: int) -> None:
        self.do_hwpoison(p, window_addr(page))

    def do_hwpoison(self, p: Process, addr: int) -> None:
        """MADV_HWPOISON of one page (``madvise_inject_error``, ``memory_failure``).

        A read GUP takes the page; its frame is unmapped from every page
        table mapping it, each PTE becoming a hwpoison entry. A private
        frame (anonymous, or a COW copy) may be shared since fork: the
        model finds those as the pages whose bytes are the same object. A
        page cache frame (shmem, or a private mapping not yet copied) stays
        in the page cache, poisoned (``shmem_error_remove_folio``): every
        later fault on that file offset is VM_FAULT_HWPOISON, pread is EIO;
        which other page tables had it mapped (and get an entry that
        outlives a punched hole) is read from their pagemap first. The
        caller gets SIGBUS BUS_MCEERR_AR at the page if the frame was dirty
        (``kill_procs`` with ``forcekill``); any later access is SIGBUS too.
        Only without swap: reclaim in the middle would move frames the
        model cannot follow.
        """
        vpn = addr >> PAGE_SHIFT
        pg = self.model[p].get(vpn)
        if pg is None or not pg.prot & PROT_READ or pg.lazy or pg.sigbus() is not None:
            return  # no GUP (EFAULT), or a page the model cannot follow
        kills = {addr}
        if pg.kind == "anon" or pg.kind == "private" and pg.data is not None:
            if pg.data is None:
                return  # the shared zero page: EBUSY (tests/mmu/test_hwpoison.py)
            frame = pg.data
            for pages in self.model.values():
                for other in pages.values():
                    if other.data is frame and other.kind != "shared":
                        other.poisoned = True
            dirty: bool | None = True
        else:
            f, index = pg.file, pg.index
            assert f is not None
            for q, pages in self.model.items():
                for v, other in pages.items():
                    if other.file is not f or other.index != index or \
                            other.kind == "private" and other.data is not None:
                        continue
                    if q is p and v == vpn or q.pagemap(v << PAGE_SHIFT) >> 63 & 1:
                        other.poisoned = True
                        if q is p:
                            kills.add(v << PAGE_SHIFT)  # the caller maps the frame here too
            f.poisoned.add(index)
            f.raw_poisoned.add(index)
            dirty = True if index in f.dirty else (None if index in f.maybe_dirty else False)
        event(f"hwpoison {pg.kind} dirty={dirty}")
        try:
            p.madvise(addr, PAGE_SIZE, MADV_HWPOISON)
            sig = None
        except Signal as e:
            sig = e
        if dirty is None and sig is None:
            return
        if dirty is False:
            self.check_signal(sig, None)
            return
        assert isinstance(sig, Sigbus) and sig.si_code == BUS_MCEERR_AR and sig.si_addr in kills, \
            f"MADV_HWPOISON: {sig!r}, model expects SIGBUS BUS_MCEERR_AR at one of {kills}"

    # -- mremap --------------------------------------------------------------------

    @rule(p=procs, page=pages_st, old_n=st.integers(0, 6), new_n=st.integers(1, 8),
          flags=st.sampled_from(REMAP_FLAGS), dest=pages_st)
    def mremap(self, p: Process, page: int, old_n: int, new_n: int, flags: int, dest: int) -> None:
        if flags & MREMAP_DONTUNMAP and not flags & MREMAP_FIXED and old_n:
            new_n = old_n  # DONTUNMAP moves without resizing
        self.do_mremap(p, window_addr(page), old_n, new_n, flags,
                       window_addr(dest) if flags & MREMAP_FIXED else 0)

    def do_mremap(self, p: Process, addr: int, old_n: int, new_n: int, flags: int,
                  new_addr: int) -> None:
        pages = self.model[p]
        old_len, new_len = old_n * PAGE_SIZE, new_n * PAGE_SIZE
        pg0 = pages.get(addr >> PAGE_SHIFT)
        if pg0 is not None and pg0.huge:  # hugetlb lengths round up to the huge page
            old_n, new_n = -(-old_n // HPAGE_PAGES) * HPAGE_PAGES, -(-new_n // HPAGE_PAGES) * HPAGE_PAGES
        want = self.mremap_errno(p, addr, old_len, new_len, flags, new_addr)
        if want is None and flags & MREMAP_FIXED and old_n == new_n:
            self.pure_move(p, addr, old_n, flags, new_addr)
            return
        if want == "skip":
            event("mremap: not modelled (old_len 0 of a shared mapping, hugetlb pure move)")
            return
        src_vma = next(((s, e) for s, e, _ in self.vmas(p) if s <= addr >> PAGE_SHIFT < e), (0, 0))
        if isinstance(want, str):
            self.expect_errno(errno.EINVAL, p.mremap, addr, old_len, new_len, flags, new_addr)
            for v in range(new_addr >> PAGE_SHIFT, (new_addr >> PAGE_SHIFT) + new_n):
                pages.pop(v, None)
            return
        got = self.expect_errno(want, p.mremap, addr, old_len, new_len, flags, new_addr)
        if want is not None:
            return
        assert isinstance(got, int)
        old, new = addr >> PAGE_SHIFT, got >> PAGE_SHIFT
        if new == old:
            if new_n < old_n:  # shrink in place
                for v in range(old + new_n, old + old_n):
                    pages.pop(v, None)
            elif new_n > old_n:  # grew in place
                self.grow(pages, old, old_n, new_n, p)
            return
        event(f"mremap moved {'DONTUNMAP' if flags & MREMAP_DONTUNMAP else ''}")
        if not flags & MREMAP_FIXED:
            assert not any(v in pages for v in range(new, new + new_n)), \
                f"mremap moved to {got:#x} over a mapping"
        self.move_model(pages, old, old_n, new, new_n, flags, src_vma)
        if new_n > old_n:
            self.grow(pages, new, old_n, new_n, p)

    @staticmethod
    def move_model(pages: Pages, old: int, old_n: int, new: int, new_n: int, flags: int,
                   src_vma: tuple[int, int], dest: tuple[int, int] | None = None) -> None:
        """``move_vma``: the destination is cleared (FIXED), the pages move.

        With DONTUNMAP the source stays mapped, empty (anonymous memory reads
        zero, a file refaults from its page cache), and VM_LOCKED is cleared
        on the whole old VMA, not only on the moved part (checked on 6.18).
        """
        if flags & MREMAP_FIXED:
            for v in range(new, new + new_n):
                pages.pop(v, None)
        moved = {v: pages[v] for v in range(old, old + min(old_n, new_n)) if v in pages}
        for v in range(old, old + old_n):
            if flags & MREMAP_DONTUNMAP and v in moved:
                src = attrs.evolve(moved[v], poisoned=False)  # the entries moved away
                if src.kind != "shared":
                    src.data, src.lazy = None, False
                pages[v] = src
            else:
                pages.pop(v, None)
        if flags & MREMAP_DONTUNMAP:
            lo, hi = src_vma  # the old VMA, as split by unmapping the destination
            d0, d1 = dest if dest is not None else (new, new + new_n)
            if d0 >= old + old_n:
                hi = min(hi, d0)
            elif d1 <= old:
                lo = max(lo, d1)
            for v in range(lo, hi):
                if v in pages:
                    pages[v] = attrs.evolve(pages[v], locked=False)
        for v, pg in moved.items():
            pages[new + v - old] = pg

    def pure_move(self, p: Process, addr: int, n: int, flags: int, new_addr: int) -> None:
        """A FIXED move without resize: every VMA of the range moves, gaps kept (``remap_move``).

        Each VMA piece is its own move (its own checks, its own part of the
        destination unmapped: the destination parts facing gaps stay as
        they were); an error stops the walk after the pieces before it
        moved. Checked on 6.18.
        """
        pages = self.model[p]
        old, new = addr >> PAGE_SHIFT, new_addr >> PAGE_SHIFT
        vmas = [(s, e) for s, e, _ in self.vmas(p) if s < old + n and e > old]
        want = None
        if not vmas or vmas[0][0] > old:
            want = errno.EFAULT
        pieces = []
        for s, e in vmas:
            a, b = max(s, old), min(e, old + n)
            pg = pages[a]
            dest = new + a - old
            if pg.huge and (dest % HPAGE_PAGES or flags & MREMAP_DONTUNMAP):
                want = errno.EINVAL  # check_prep_vma: aligned, and hugetlb is VM_DONTEXPAND
                break
            if split_inside_huge(pages, dest) or split_inside_huge(pages, dest + b - a):
                want = errno.EINVAL  # unmapping this piece's destination splits a hugetlb page
                break
            pieces.append((a, b, s, e))
            if want is not None:
                break
        got = self.expect_errno(want, p.mremap, addr, n * PAGE_SIZE, n * PAGE_SIZE, flags,
                                new_addr)
        if got is not None:
            assert got == new_addr, f"mremap moved to {got:#x}, model expects {new_addr:#x}"
        if want == errno.EFAULT:
            return
        for a, b, s, e in pieces:
            self.move_model(pages, a, b - a, new + a - old, b - a, flags, (s, e), (new, new + n))

    def grow(self, pages: Pages, start: int, old_n: int, new_n: int, p: Process) -> None:
        """Pages added by growing a mapping: the VMA's kind, next file indexes, zero data."""
        last = pages[start + old_n - 1]
        for i in range(old_n, new_n):
            pages[start + i] = PageModel(last.prot, last.kind, last.file, last.index + i - old_n + 1,
                                         dontfork=last.dontfork, wipeonfork=last.wipeonfork,
                                         locked=last.locked, huge=last.huge, thp=last.thp,
                                         maywrite=last.maywrite)
        if last.locked:
            self.populate_model(p, start + old_n, start + new_n)

    def mremap_errno(self, p: Process, addr: int, old_len: int, new_len: int, flags: int,
                     new_addr: int) -> int | None | str:
        """The errno of an mremap, in ``check_mremap_params`` / ``check_prep_vma`` order.

        VMA boundaries come from the emulator's own maps: whether two
        adjacent compatible ranges merged is the VMA tests' business, not
        this model's.
        """
        if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
            if not flags & MREMAP_MAYMOVE:
                return errno.EINVAL
            if flags & MREMAP_DONTUNMAP and old_len != new_len:
                return errno.EINVAL
            if addr + old_len > new_addr and new_addr + new_len > addr:
                return errno.EINVAL
        vmas = self.vmas(p)
        vpn = addr >> PAGE_SHIFT
        vma = next(((s, e) for s, e, _ in vmas if s <= vpn < e), None)
        pages = self.model[p]
        nvpn = new_addr >> PAGE_SHIFT
        if flags & MREMAP_FIXED and old_len == new_len:  # a pure move may span VMAs
            if vma is None:
                return errno.EFAULT
            n = old_len >> PAGE_SHIFT
            if old_len == 0 or any(split_inside_huge(pages, v) for v in (vpn, vpn + n, nvpn,
                                                                          nvpn + n)):
                return "skip"  # not modelled
            return None
        if vma is None:
            return errno.EFAULT
        pg = pages[vpn]
        if pg.huge:  # check_prep_vma: aligned addresses, no growth
            hp = HPAGE_PAGES * PAGE_SIZE
            old_len, new_len = -(-old_len // hp) * hp, -(-new_len // hp) * hp
            if addr % hp or new_addr % hp or new_len > old_len:
                return errno.EINVAL
        moves = bool(flags & (MREMAP_FIXED | MREMAP_DONTUNMAP))
        tail = (vpn + (new_len >> PAGE_SHIFT), vpn + (old_len >> PAGE_SHIFT))
        # munmap of the shrunk tail splits there: inside a hugetlb page, EINVAL
        tail_bad = new_len < old_len and any(split_inside_huge(pages, v) for v in tail)
        if new_len <= old_len and not moves:
            return errno.EINVAL if tail_bad else None
        if old_len == 0:
            if pg.kind == "shared":
                return "skip"  # the duplicate-a-shared-mapping trick: not modelled
            return errno.EINVAL
        if flags & MREMAP_DONTUNMAP and pg.huge:
            return errno.EINVAL  # hugetlb is VM_DONTEXPAND (checked on 6.18)
        if min(old_len, new_len) > (vma[1] - vpn) * PAGE_SIZE:
            return errno.EFAULT
        if flags & MREMAP_FIXED:  # mremap_to unmaps the destination, then shrinks the source
            if any(split_inside_huge(pages, v) for v in (nvpn, nvpn + (new_len >> PAGE_SHIFT))):
                return errno.EINVAL
            if tail_bad:
                return "EINVAL after unmapping the destination"
        if new_len <= old_len or moves:
            return None
        if (vma[1] - vpn) * PAGE_SIZE == old_len:
            end = vma[1] + (new_len - old_len) // PAGE_SIZE
            if not any(s < end and e > vma[1] for s, e, _ in vmas):
                return None  # grows in place
        return None if flags & MREMAP_MAYMOVE else errno.ENOMEM

    # -- mlock ---------------------------------------------------------------------

    @staticmethod
    def write_populated(pages: Pages, vpns: range | list[int]) -> list[int]:
        """The pages an mm_populate with FOLL_WRITE reached: private writable, before a failure."""
        out = []
        for v in vpns:
            pg = pages.get(v)
            if pg is None or not pg.readable() or pg.sigbus() is not None:
                break
            if pg.writable() and not pg.vm_shared():
                out.append(v)
        return out

    @staticmethod
    def mlock_populate_model(pages: Pages, vpns: range | list[int]) -> int | None:
        """mlock's ``__mm_populate(ignore_errors=0)``: stop at the first failure, ENOMEM.

        Checked on 6.18: a PROT_NONE page (no FOLL_FORCE for an inaccessible
        VMA) or a page beyond EOF fails; the private writable file pages
        before it were COWed; EFAULT becomes ENOMEM
        (``__mlock_posix_error_return``).
        """
        for v in vpns:
            pg = pages[v]
            if not pg.readable() or pg.sigbus() is not None:
                return errno.ENOMEM
            fault_model(pages, v)
            if pg.writable() and not pg.vm_shared() and not pg.lazy:
                cow(pages, v)
        return None

    @rule(p=procs, page=pages_st, npages=npages_st, onfault=st.booleans(), lock=st.booleans())
    def mlock(self, p: Process, page: int, npages: int, onfault: bool, lock: bool) -> None:
        pages = self.model[p]
        addr = window_addr(page)
        vpns = range(addr >> PAGE_SHIFT, (addr >> PAGE_SHIFT) + npages)
        if lock and self.locked_pages() + npages > self.max_locked:
            lock = False
        want = None
        for v in vpns:  # apply_vma_lock_flags: up to the first hole, then ENOMEM
            if v not in pages:
                want = errno.ENOMEM
                break
            pages[v].locked = lock
        if lock:
            populates = want is None and not onfault  # a hole fails before __mm_populate
            if populates:
                want = self.mlock_populate_model(pages, vpns)
            self.expect_errno(want, p.mlock, addr, npages * PAGE_SIZE,
                              MLOCK_ONFAULT if onfault else 0)
            if populates:
                self.touch_lazy(p, self.write_populated(pages, vpns))
        else:
            self.expect_errno(want, p.munlock, addr, npages * PAGE_SIZE)

    # -- the memfds ----------------------------------------------------------------

    def file_mappings(self, file: FileModel) -> list[PageModel]:
        return [pg for pages in self.model.values() for pg in pages.values() if pg.file is file]

    @rule(file_no=st.integers(0, 1), size=sizes_st)
    def ftruncate(self, file_no: int, size: int) -> None:
        f = self.files[file_no]
        want = None  # shmem_setattr
        if size < f.size and f.seals & F_SEAL_SHRINK or size > f.size and f.seals & F_SEAL_GROW:
            want = errno.EPERM
        self.expect_errno(want, self.root.ftruncate, f.fd, size)
        if want is not None:
            return
        f.truncate(size)
        for pg in self.file_mappings(f):
            if f.beyond_eof(pg.index):  # private COW copies beyond the end are zapped
                pg.data, pg.lazy, pg.poisoned = None, False, False

    @rule(file_no=st.integers(0, 1), mode=st.sampled_from(FALLOC_MODES), offset=file_offsets_st,
          length=st.integers(0, 6 * PAGE_SIZE))
    def fallocate(self, file_no: int, mode: int, offset: int, length: int) -> None:
        f = self.files[file_no]
        want = None
        if length <= 0:
            want = errno.EINVAL
        elif mode == FALLOC_FL_PUNCH_HOLE:
            want = errno.EOPNOTSUPP
        elif mode & FALLOC_FL_PUNCH_HOLE and f.write_sealed():
            want = errno.EPERM  # shmem_fallocate
        elif not mode & FALLOC_FL_PUNCH_HOLE and f.seals & F_SEAL_GROW and offset + length > f.size:
            want = errno.EPERM  # even with FALLOC_FL_KEEP_SIZE
        self.expect_errno(want, self.root.fallocate, f.fd, mode, offset, length)
        if want is not None:
            return
        if mode & FALLOC_FL_PUNCH_HOLE:
            f.zero(offset, offset + length)
            return
        # shmem_fallocate allocates (and may dirty) the pages of the range
        f.maybe_dirty.update(range(offset >> PAGE_SHIFT, (offset + length + _OFF) >> PAGE_SHIFT))
        if not mode & FALLOC_FL_KEEP_SIZE:
            f.size = max(f.size, offset + length)

    def check_pread(self, f: FileModel, offset: int, n: int) -> None:
        """pread against the model: the bytes, or EIO at a poisoned page."""
        want = f.pread(offset, n)
        got = self.expect_errno(want if isinstance(want, int) else None, self.root.pread,
                                f.fd, n, offset)
        if not isinstance(want, int):
            assert got == want, f"pread({f}, {n}, {offset:#x}) differs from the model"

    @rule(file_no=st.integers(0, 1), offset=file_offsets_st, n=st.integers(0, 3 * PAGE_SIZE))
    def pread(self, file_no: int, offset: int, n: int) -> None:
        self.check_pread(self.files[file_no], offset, n)

    @rule(file_no=st.integers(0, 1), offset=file_offsets_st, n=st.integers(1, 2 * PAGE_SIZE),
          fill=st.integers(0, 254))
    def pwrite(self, file_no: int, offset: int, n: int, fill: int) -> None:
        f = self.files[file_no]
        data = pattern(fill, n)
        done = f.pwrite(offset, data)
        got = self.expect_errno(-done if done < 0 else None, self.root.pwrite, f.fd, data, offset)
        if done >= 0:
            assert got == done, f"pwrite wrote {got}, model {done}"

    @rule(flags=st.sets(st.sampled_from(MFD_FLAGS)).map(lambda s: sum(s)))
    def memfd_create(self, flags: int) -> None:
        """memfd_create(2) with drawn flags: the errno, or an fd whose flags and seals fit.

        Checked on 6.18 by tests/differential/test_kernel_memfd.py: unknown
        bits, or huge size bits without MFD_HUGETLB, are EINVAL; MFD_EXEC with
        MFD_NOEXEC_SEAL is EINVAL; a size with no hstate is ENODEV; the fd has
        FD_CLOEXEC from MFD_CLOEXEC; seals start as F_SEAL_SEAL unless
        MFD_ALLOW_SEALING (or MFD_NOEXEC_SEAL, which seals F_SEAL_EXEC).
        """
        known = MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB | MFD_NOEXEC_SEAL | MFD_EXEC
        if flags & MFD_HUGETLB:
            known |= MFD_HUGE_MASK << MFD_HUGE_SHIFT
        want = None
        if flags & ~known or flags & MFD_EXEC and flags & MFD_NOEXEC_SEAL:
            want = errno.EINVAL
        elif flags & MFD_HUGETLB and (flags >> MFD_HUGE_SHIFT) & MFD_HUGE_MASK not in (0, 21, 30):
            want = errno.ENODEV  # no such hstate
        fd = self.expect_errno(want, self.root.memfd_create, "rule", flags)
        if want is not None:
            return
        assert isinstance(fd, int)
        seals = F_SEAL_SEAL if not flags & (MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL) else 0
        if flags & MFD_NOEXEC_SEAL:
            seals |= F_SEAL_EXEC
        assert self.root.fcntl(fd, F_GET_SEALS) == seals, f"memfd_create({flags:#x}) seals"
        assert self.root.fcntl(fd, F_GETFD) == (FD_CLOEXEC if flags & MFD_CLOEXEC else 0)
        self.root.close(fd)

    @rule(file_no=st.integers(0, 1), seals=st.sampled_from(SEALS))
    def add_seals(self, file_no: int, seals: int) -> None:
        """F_ADD_SEALS (``memfd_add_seals``), then every file rule and mmap/mprotect obey them.

        Unknown bits are EINVAL; after F_SEAL_SEAL anything is EPERM; a new
        F_SEAL_WRITE is EBUSY while a shared mapping may write (VM_SHARED
        with VM_MAYWRITE, even read-only: checked on 6.18 by
        tests/differential/test_kernel_memfd.py, which covers each seal's
        effect too).
        """
        f = self.files[file_no]
        want = None
        if seals & ~F_ALL_SEALS:
            want = errno.EINVAL
        elif f.seals & F_SEAL_SEAL:
            want = errno.EPERM
        elif seals & F_SEAL_WRITE and not f.seals & F_SEAL_WRITE and any(
                pg.kind == "shared" and pg.maywrite for pg in self.file_mappings(f)):
            want = errno.EBUSY
        self.expect_errno(want, self.root.fcntl, f.fd, F_ADD_SEALS, seals)
        if want is None:
            f.seals |= seals

    @precondition(lambda self: self.swap)
    @rule(nr=st.integers(1, 16))
    def reclaim(self, nr: int) -> None:
        """Direct reclaim (``try_to_free_pages``): contents must not change."""
        event("reclaim")
        try_to_free_pages(self.kernel.phys, nr)

    # -- accesses ------------------------------------------------------------------

    def access(self, p: Process, task: str, addr: int, n: int, data: bytes | None) -> None:
        """One read (``data`` None) or write, checked against the model."""
        pages = self.model[p]
        segs, want_sig = plan_access(pages, addr, n, data is not None)
        lazy = [s for s in segs if pages[s.vpn].lazy]
        try:
            if data is None:
                got = p.thread(task).read(addr, n)
            else:
                p.thread(task).write(addr, data)
            sig = None
        except Signal as e:
            sig = e
        self.check_signal(sig, want_sig)
        if data is None and sig is not None:
            return  # the bytes read before the fault are not returned
        done = 0
        for s in segs:
            fault_model(pages, s.vpn)
            pg = pages[s.vpn]
            if data is None:
                part = got[done:done + s.n]
                ok = [c for c in pg.candidates() if c[s.off:s.off + s.n] == part]
                assert ok, f"{p!r}: read at {(s.vpn << PAGE_SHIFT) + s.off:#x} differs from the model"
                if pg.lazy and ok == [ZERO_PAGE]:
                    pg.data, pg.lazy = None, False  # reclaim discarded it
            elif s in lazy:  # which base did the write land on? the page says
                now = p.kernel_read(s.vpn << PAGE_SHIFT, PAGE_SIZE)
                bases = [c for c in pg.candidates()
                         if c[:s.off] == now[:s.off] and c[s.off + s.n:] == now[s.off + s.n:]]
                assert bases, f"{p!r}: write to a lazily freed page left {now[:16]!r}..."
                pg.store(s.off, data[done:done + s.n], bases[0])
            else:
                cow(pages, s.vpn)
                pg.store(s.off, data[done:done + s.n])
            done += s.n

    @rule(p=procs, task=tasks_st, page=access_pages_st, off=offsets_st,
          n=st.one_of(st.integers(1, 16), st.integers(1, 2 * PAGE_SIZE)))
    def read(self, p: Process, task: str, page: int, off: int, n: int) -> None:
        self.access(p, task, window_addr(page, off), n, None)

    @rule(p=procs, task=tasks_st, page=access_pages_st, off=offsets_st,
          n=st.one_of(st.integers(1, 16), st.integers(1, 2 * PAGE_SIZE)),
          fill=st.integers(0, 254))
    def write(self, p: Process, task: str, page: int, off: int, n: int, fill: int) -> None:
        self.access(p, task, window_addr(page, off), n, pattern(fill, n))

    @rule(p=procs)
    def read_window(self, p: Process) -> None:
        for page in range(NPAGES):
            self.access(p, "main", window_addr(page), PAGE_SIZE, None)

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def kernel_check(self) -> None:
        if self.model:
            self.kernel.check()

    @invariant()
    def views_match_model(self) -> None:
        """maps perms and smaps VmFlags dc/wf/lo, range by range."""
        for p, pages in self.model.items():
            want_perms, want_flags = runs(pages)
            shown = merged([(s, e, perms) for s, e, perms in self.vmas(p)])
            assert shown == want_perms, f"{p!r} maps {shown} != model {want_perms}"
            flags = merged([(s, e, ("dc" in f, "wf" in f, "lo" in f))
                            for s, e, f in parse_smaps_flags(p.smaps())])
            assert flags == want_flags, f"{p!r} smaps dc/wf/lo {flags} != model {want_flags}"

    @invariant()
    def memory_matches_model(self) -> None:
        """Every present page holds what the model says (``follow_page`` faults nothing in)."""
        for p, pages in self.model.items():
            for vpn, pg in self.checked(pages):
                buf = follow_page(p.mm, vpn << PAGE_SHIFT)
                if buf is None:
                    continue
                assert pg.sigbus() is None, f"{p!r}: {vpn << PAGE_SHIFT:#x} is mapped, model: SIGBUS"
                assert bytes(buf) in pg.candidates(), \
                    f"{p!r}: memory at {vpn << PAGE_SHIFT:#x} differs from the model ({pg})"

    @invariant()
    def files_match_model(self) -> None:
        if not self.model:
            return
        for f in self.files:
            assert self.root.fstat_size(f.fd) == f.size, f"{f}: size {self.root.fstat_size(f.fd)}"
            assert self.root.fcntl(f.fd, F_GET_SEALS) == f.seals, f"{f}: seals"
            for start, n in self.file_ranges(f):
                pos = start
                while pos < start + n:  # pread stops at each poisoned page: read around them
                    want = f.pread(pos, start + n - pos)
                    if isinstance(want, int):
                        self.check_pread(f, pos, start + n - pos)
                        pos = (pos | _OFF) + 1
                        continue
                    got = self.root.pread(f.fd, start + n - pos, pos)
                    assert got == want, f"{f}: contents at {pos:#x} differ"
                    pos += len(want)
                    if pos >= f.size:
                        break

    def file_ranges(self, f: FileModel) -> list[tuple[int, int]]:
        """The byte ranges of ``f`` the invariant compares: all of it here."""
        return [(0, f.size)]

    @invariant()
    def tlb_never_exceeds_model(self) -> None:
        for p, pages in self.model.items():
            for vpn in p.mm.tlb.r:
                pg = pages.get(vpn)
                assert pg is not None and pg.readable() and pg.sigbus() is None, \
                    f"{p!r}: TLB maps {vpn << PAGE_SHIFT:#x} readable, model says {pg}"
            for vpn in p.mm.tlb.w:
                pg = pages.get(vpn)
                assert pg is not None and pg.writable() and pg.sigbus() is None, \
                    f"{p!r}: TLB maps {vpn << PAGE_SHIFT:#x} writable, model says {pg}"

    def teardown(self) -> None:
        if not self.model:
            return
        for p in list(self.model):
            p.exit()
        self.kernel.check()


MemTypesMachine.TestCase.settings = scaled(0.3)
TestMemTypesStateful = MemTypesMachine.TestCase


def test_constants_are_distinct() -> None:
    """Advice and flag values the model switches on must not collide."""
    assert len({int(a) for a in ADVICE}) == len(ADVICE)
    assert MADV_HUGEPAGE != MADV_NOHUGEPAGE and MADV_WILLNEED not in (MADV_COLD, MADV_PAGEOUT)
    assert PROT_NONE == 0 and 0 not in pattern(0, 600)


@settings(max_examples=1, database=None, deadline=None)
@given(st.just(None))
def test_hwpoison_of_a_cow_page_spares_its_zero_neighbours(_: None) -> None:
    """Found by a full run: MAP_POPULATE of a writable private memfd mapping COWs every
    page; the model gave the copies of its holes one shared zero object, so poisoning
    one "poisoned" them all. A replay of the shrunk example."""
    state = MemTypesMachine()
    p0 = state.start(config="noswap", sizes=(0, 0), layout=["anon", "anon", "anon", "anon"])
    state.memfd_create(flags=0)
    state.write(fill=204, n=7, off=0, p=p0, page=0, task="main")
    p1 = state.fork(p=p0)
    state.ftruncate(file_no=0, size=40960)
    state.mmap(file_no=0, how="MAP_FIXED", kind="memfd-private", npages=5, p=p1, page=22,
               pgoff=0, populate=True, prot=PROT_READ | PROT_WRITE | PROT_EXEC, slop="")
    state.hwpoison(p=p1, page=22)
    state.memory_matches_model()
    state.views_match_model()
    state.kernel_check()
    state.teardown()
