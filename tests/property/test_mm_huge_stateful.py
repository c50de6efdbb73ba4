"""Stateful property test: hugetlb and THP through the issue-3 syscalls, against a model.

What it models
--------------
:class:`HugeMachine` is :class:`~test_mm_memtypes_stateful.MemTypesMachine`
over a window of :data:`NUNITS` 2 MiB units holding the huge memory types:

* ``thp``: private anonymous memory, 2 MiB aligned, under a THP policy of
  ``always`` or ``madvise`` (MADV_HUGEPAGE / NOHUGEPAGE are rules), so
  faults install PMD-mapped folios that munmap, mprotect, DONTNEED, mremap
  and fork split, and MADV_COLLAPSE rebuilds;
* ``hugetlb``: MAP_SHARED of an MFD_HUGETLB memfd, and
  MAP_SHARED|MAP_ANONYMOUS|MAP_HUGETLB;
* ``hugetlb-private``: MAP_PRIVATE of that memfd (COW of whole 2 MiB pages
  over its page cache), and MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB.

The emulated pool has :data:`POOL` pages (the host's pool is not touched).
Operations start at a few "hot" 4 KiB pages of each unit (its first two,
its middle and its last) and span a page, half a unit or whole units, so
they split huge PMDs and hit the hugetlb alignment rules; the invariants
compare the hot pages only (the model still tracks every page).

Rules as on the 6.18 kernel of this machine (checked by hand, see the
comments): a hugetlb split point inside a huge page is EINVAL for munmap,
MAP_FIXED, an mremap shrink, and for mprotect / flag advice when the flags
change; MADV_DONTNEED on hugetlb needs an aligned start and rounds its end
down; a writable hugetlbfs mmap grows ``i_size``; hugetlbfs has no
``pwrite`` (EINVAL); mremap of hugetlb rounds lengths up, needs aligned
addresses, cannot grow and refuses DONTUNMAP (VM_DONTEXPAND); a private
fault over a hole of the file gets an anonymous page, not the page cache's
(``hugetlb_no_page``); the memfd (no MFD_ALLOW_SEALING) refuses seals; mlock sets
no VM_LOCKED on hugetlb but populates it even with MLOCK_ONFAULT; an
unaligned ``ftruncate`` of a hugetlb file is EINVAL; a hole punch (fallocate
or MADV_REMOVE) zeroes the partial huge pages at its ends in place and zaps
the whole ones from every mapping, private COW copies included; MADV_FREE
on THP lazily frees (a partly covered PMD is split first).

An empty pool (a rule lowers ``nr_hugepages`` and restores it): an mmap that
must reserve is ENOMEM, fallocate ENOSPC, a MAP_NORESERVE fault SIGBUS
BUS_ADRERR. MADV_HWPOISON of a THP page splits it and poisons the 4 KiB page.

vmemu bugs it found, fixed with regression tests: hugetlb pages could not
be poisoned (EBUSY); COLD / PAGEOUT / MADV_FREE of part of a THP crashed
when the split mapped a zero-filled piece to the zero page; ftruncate of a
hugetlb file to its own size kept pages fallocated beyond EOF.

Excluded (see the comments at each rule): MADV_HWPOISON of a hugetlb page
that is not present (its PG_dirty after a GUP fault is not modelled);
MADV_COLLAPSE's errno where it
depends on page-table state the model does not keep (then only "success
means PMD leaves" is checked).

Budget: ``scaled(0.08)`` of the profile's examples (about 6-8 s in the
default profile); the campaign profile runs 160 examples of 100 steps.
"""

from __future__ import annotations

import errno

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule
from memtypes_model import HPAGE_PAGES, FileModel, PageModel, Pages, plan_access
from test_mm_memtypes_stateful import (
    ADVICE,
    FALLOC_MODES,
    REMAP_FLAGS,
    MemTypesMachine,
    cow,
    split_inside_huge,
)
from test_mm_stateful import PROTS, Addr, pattern, scaled

from vmemu import (
    BUS_ADRERR,
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
    MADV_WIPEONFORK,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGETLB,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
    Process,
    Sigbus,
    Signal,
)
from vmemu.mmu.memfd import (
    F_ADD_SEALS,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_WRITE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    MFD_HUGETLB,
)
from vmemu.mmu.pgtable import _PAGE_PSE

HBASE = 0x4000_0000
NUNITS = 4
HP = HPAGE_PAGES
HSIZE = HP * PAGE_SIZE
POOL = 128
HOT = (0, 1, HP // 2 - 1, HP - 1)
PM_PFN = (1 << 55) - 1  # the frame field of a pagemap entry
RW = PROT_READ | PROT_WRITE

KINDS = ["thp", "hugetlb-anon-shared", "hugetlb-anon-private", "hugetlb-shared",
         "hugetlb-private"]
pos_st = st.tuples(st.integers(0, NUNITS - 1), st.sampled_from(HOT)).map(lambda t: t[0] * HP + t[1])
unit_pos_st = st.integers(0, NUNITS - 1).map(lambda u: u * HP)
len_st = st.sampled_from([1, HP // 2, HP - 1, HP, 2 * HP, 3 * HP])


def haddr(pos: int, off: int = 0) -> Addr:
    """The address of window page ``pos`` (in 4 KiB pages from :data:`HBASE`)."""
    return Addr(HBASE + pos * PAGE_SIZE + off)


def hvpn(pos: int) -> int:
    return (HBASE >> PAGE_SHIFT) + pos


def flag_changes(pg: PageModel, advice: int) -> bool:
    """True when ``advice`` changes the VMA flags of the page (so the VMA must split)."""
    return {MADV_DONTFORK: not pg.dontfork, MADV_DOFORK: pg.dontfork,
            MADV_KEEPONFORK: pg.wipeonfork,
            MADV_HUGEPAGE: pg.thp != MADV_HUGEPAGE,
            MADV_NOHUGEPAGE: pg.thp != MADV_NOHUGEPAGE}.get(advice, False)


class HugeMachine(MemTypesMachine):
    """Processes over THP and hugetlb memory, against :mod:`memtypes_model`."""

    max_locked = 1 << 30  # no memory limit here

    def checked(self, pages: Pages) -> list[tuple[int, PageModel]]:
        """The hot pages of every mapped unit, and of the mappings placed elsewhere."""
        out = []
        for vpn, pg in pages.items():
            if vpn % HP in HOT:
                out.append((vpn, pg))
        return out

    def file_ranges(self, f: FileModel) -> list[tuple[int, int]]:
        """The hot pages of the file (an 8 MiB pread every step would dominate the run)."""
        return [(i * PAGE_SIZE, PAGE_SIZE) for i in range(0, -(-f.size // PAGE_SIZE))
                if i % HP in HOT]

    def punch(self, f: FileModel, start: int, end: int) -> None:
        """A hole punched in a hugetlb file (``hugetlbfs_punch_hole``).

        The bytes of the hole read zero through the page cache (a partial
        huge page at either end is zeroed in place,
        ``hugetlbfs_zero_partial_page``). Unlike shmem, the whole huge pages
        inside the hole are zapped from every VMA of the file
        (``hugetlb_vmdelete_list``), so private COW copies of those go too
        and refault from the (now empty) page cache, while a COW copy of a
        partly punched huge page keeps its bytes (checked on 6.18).
        """
        f.zero(start, end)
        hole_start, hole_end = -(-start // HSIZE) * HSIZE, end // HSIZE * HSIZE
        for index in range(hole_start >> PAGE_SHIFT, hole_end >> PAGE_SHIFT):
            f.drop(index)  # the huge page leaves the page cache, poisoned or not
        f.cached -= set(range(hole_start // HSIZE, hole_end // HSIZE))
        for pg in self.file_mappings(f):
            if hole_start <= pg.index * PAGE_SIZE < hole_end:
                pg.data = None
                pg.poisoned = False  # __unmap_hugepage_range clears hwpoison entries too

    # -- set-up ----------------------------------------------------------------------

    @initialize(target=MemTypesMachine.procs, config=st.sampled_from(["noswap", "swap"]),
                policy=st.sampled_from(["always", "madvise"]),
                size=st.integers(0, 4).map(lambda u: u * HSIZE),
                layout=st.lists(st.sampled_from(KINDS), min_size=NUNITS, max_size=NUNITS))
    def start(self, config: str, policy: str, size: int, layout: list[str]) -> Process:
        """The root: a hugetlb memfd, one window unit per kind drawn, hot pages written."""
        event(f"config {config} thp {policy}")
        self.kernel = Kernel()
        self.kernel.set_nr_hugepages(POOL)
        self.kernel.thp_enabled = policy
        self.policy = policy
        if config == "swap":
            self.kernel.swapon(pages=4096)
            self.swap = True
        p = self.kernel.spawn("p0")
        self.root = p
        self.model[p] = {}
        fd = p.memfd_create("huge", MFD_HUGETLB)
        p.ftruncate(fd, size)
        # without MFD_ALLOW_SEALING a memfd starts sealed with F_SEAL_SEAL
        self.files.append(FileModel("huge", size, huge=True, fd=fd, seals=F_SEAL_SEAL))
        for unit, kind in enumerate(layout):
            self.do_hmmap(p, kind, unit * HP, HP, RW, "MAP_FIXED", False, unit)
        for unit in range(NUNITS):
            for sub in HOT[:3]:
                self.access(p, "main", haddr(unit * HP + sub), 64, pattern(unit + sub, 64))
        return p

    # -- mmap, munmap, mprotect -------------------------------------------------------------

    def do_hmmap(self, p: Process, kind: str, pos: int, npages: int, prot: int, how: str,
                 populate: bool, pgoff_units: int, addr_slop: int = 0, off_slop: int = 0) -> None:
        pages = self.model[p]
        huge = kind != "thp"
        file = self.files[0] if kind in ("hugetlb-shared", "hugetlb-private") else None
        shared = kind in ("hugetlb-shared", "hugetlb-anon-shared")
        flags = (MAP_SHARED if shared else MAP_PRIVATE) | (MAP_ANONYMOUS if file is None else 0)
        if huge and file is None:
            flags |= MAP_HUGETLB
        flags |= {"MAP_FIXED": MAP_FIXED, "MAP_FIXED_NOREPLACE": MAP_FIXED_NOREPLACE}.get(how, 0)
        if populate:
            flags |= MAP_POPULATE
        addr = 0 if how == "none" else haddr(pos, addr_slop * PAGE_SIZE)
        offset = pgoff_units * HSIZE + off_slop * PAGE_SIZE if file is not None else 0
        n = -(-npages // HP) * HP if huge else npages  # ksys_mmap_pgoff aligns hugetlb lengths
        vpn0 = addr >> PAGE_SHIFT
        want = None
        # hugetlb_get_unmapped_area, then MAP_FIXED_NOREPLACE, then the munmap of
        # MAP_FIXED, then hugetlbfs_file_mmap's offset check (do_mmap order)
        if huge and how.startswith("MAP_FIXED") and (addr // PAGE_SIZE) % HP:
            want = errno.EINVAL
        elif how == "MAP_FIXED_NOREPLACE" and any(v in pages for v in range(vpn0, vpn0 + n)):
            want = errno.EEXIST
        elif off_slop:
            want = errno.EINVAL
        elif how == "MAP_FIXED" and (split_inside_huge(pages, vpn0)
                                     or split_inside_huge(pages, vpn0 + n)):
            want = errno.EINVAL  # unmapping part of a hugetlb page first fails
        got = self.expect_errno(want, p.mmap, addr, npages * PAGE_SIZE, prot, flags,
                                -1 if file is None else file.fd, offset)
        if want is not None:
            return
        assert isinstance(got, int) and got % (HSIZE if huge else PAGE_SIZE) == 0, \
            f"mmap returned {got!r}"
        if how.startswith("MAP_FIXED"):
            assert got == addr, f"mmap at {got:#x}, model expects {addr:#x}"
        else:
            assert not any(v in pages for v in range(got >> PAGE_SHIFT, (got >> PAGE_SHIFT) + n)), \
                f"mmap placed {got:#x} over an existing mapping"
        if huge and file is None:
            file = FileModel(f"anon_hugepage{self.next_obj}", n * PAGE_SIZE, huge=True)
            self.next_obj += 1
        if file is not None and prot & PROT_WRITE and file.size < offset + n * PAGE_SIZE:
            file.size = offset + n * PAGE_SIZE  # hugetlbfs_file_mmap grows a writable file
        model_kind = "shared" if shared else ("anon" if file is None or kind.endswith("anon-private")
                                              else "private")
        first = got >> PAGE_SHIFT
        index0 = offset >> PAGE_SHIFT
        for i in range(n):
            pages[first + i] = PageModel(prot, model_kind, None if model_kind == "anon" else file,
                                         index0 + i, huge=huge)
        if populate:
            self.populate_model(p, first, first + n)

    @rule(p=MemTypesMachine.procs, kind=st.sampled_from(KINDS), pos=pos_st, npages=len_st,
          prot=st.sampled_from(PROTS),
          how=st.sampled_from(["MAP_FIXED", "MAP_FIXED", "MAP_FIXED_NOREPLACE", "none"]),
          populate=st.booleans(), pgoff=st.integers(0, 3),
          slop=st.sampled_from(["", "", "", "addr", "off"]))
    def mmap(self, p: Process, kind: str, pos: int, npages: int, prot: int, how: str,
             populate: bool, pgoff: int, slop: str) -> None:
        if kind != "thp" and slop != "addr":
            pos -= pos % HP  # hugetlb goes at unit starts unless misaligned on purpose
        self.do_hmmap(p, kind, pos, npages, prot, how, populate, pgoff,
                      addr_slop=1 if slop == "addr" and pos % HP == 0 else 0,
                      off_slop=1 if slop == "off" and kind in ("hugetlb-shared",
                                                                "hugetlb-private") else 0)

    @rule(p=MemTypesMachine.procs, pos=pos_st, npages=len_st)
    def munmap(self, p: Process, pos: int, npages: int) -> None:
        pages = self.model[p]
        s, e = hvpn(pos), hvpn(pos) + npages
        # __split_vma at either end fails inside a hugetlb page (hugetlb_vm_op_split)
        want = errno.EINVAL if split_inside_huge(pages, s) or split_inside_huge(pages, e) \
            else None
        self.expect_errno(want, p.munmap, haddr(pos), npages * PAGE_SIZE)
        if want is None:
            for v in range(s, e):
                pages.pop(v, None)

    @rule(p=MemTypesMachine.procs, pos=pos_st, npages=len_st, prot=st.sampled_from(PROTS))
    def mprotect(self, p: Process, pos: int, npages: int, prot: int) -> None:
        pages = self.model[p]
        s, e = hvpn(pos), hvpn(pos) + npages
        want = None
        # mprotect_fixup splits only a VMA whose flags change (same flags: nothing to do)
        if split_inside_huge(pages, s) and pages[s].prot != prot:
            want = errno.EINVAL  # the split at the start fails before anything changes
        else:
            # VMA by VMA: a hole stops with ENOMEM, the split at the end of the last VMA
            # with EINVAL, leaving that VMA as it was; the VMAs before keep the change
            last = self.vma_start(p, e - 1) \
                if split_inside_huge(pages, e) and pages[e - 1].prot != prot else None
            for v in range(s, e):
                pg = pages.get(v)
                if pg is None:
                    want = errno.ENOMEM
                    break
                if last is not None and v >= last:
                    want = errno.EINVAL
                    break
                pg.prot = prot
        self.expect_errno(want, p.mprotect, haddr(pos), npages * PAGE_SIZE, prot)

    def vma_start(self, p: Process, vpn: int) -> int:
        """The first page of the emulator's VMA holding ``vpn``."""
        return next(s for s, e, _ in self.vmas(p) if s <= vpn < e)

    # -- madvise --------------------------------------------------------------------

    @rule(p=MemTypesMachine.procs, pos=pos_st, npages=len_st, advice=st.sampled_from(ADVICE))
    def madvise(self, p: Process, pos: int, npages: int, advice: int) -> None:
        pages = self.model[p]
        addr = haddr(pos)
        s, e = hvpn(pos), hvpn(pos) + npages
        if advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
            self.madvise_populate(p, addr, npages, advice == MADV_POPULATE_WRITE)
            return
        if advice == MADV_COLLAPSE:
            self.collapse(p, addr, s, e)
            return
        want = None
        unmapped = False
        holes: list[tuple[FileModel, int, int]] = []  # MADV_REMOVE: file byte ranges, in order
        # a flag change splits the VMAs at the ends of the range: inside a hugetlb page
        # that is EINVAL (at the start before anything, at the end when the walk gets there)
        last = self.vma_start(p, e - 1) if split_inside_huge(pages, e) else None
        for v in range(s, e):
            pg = pages.get(v)
            if pg is None:
                unmapped = True
                continue
            if pg.huge and flag_changes(pg, advice) and (v == s and s % HP or
                                                         last is not None and v >= last):
                want = errno.EINVAL
                break
            if pg.locked and advice in (MADV_DONTNEED, MADV_FREE, MADV_COLD, MADV_PAGEOUT,
                                        MADV_REMOVE):
                want = errno.EINVAL  # VM_LOCKED pages may not be dropped or reclaimed
                break
            if pg.huge and advice in (MADV_COLD, MADV_PAGEOUT, MADV_FREE, MADV_WIPEONFORK):
                want = errno.EINVAL  # can_madv_lru_vma; a hugetlb VMA has a file
                break
            if advice == MADV_DONTNEED:
                if pg.huge:
                    if v == s and s % HP:
                        want = errno.EINVAL  # madvise_dontneed_free_valid_vma
                        break
                    if v - v % HP + HP > e:
                        continue  # the end rounds down to the huge page
                pg.data, pg.lazy, pg.poisoned = None, False, False
            elif advice == MADV_FREE:
                if pg.huge:
                    want = errno.EINVAL
                    break
                self.free_model(p, pg, v)  # THP: madvise_free_huge_pmd, or split and per PTE
            elif advice == MADV_REMOVE:
                if pg.kind == "anon" and not pg.huge:
                    want = errno.EINVAL
                    break
                if pg.kind != "shared":
                    want = errno.EACCES
                    break
                assert pg.file is not None
                lo = pg.index * PAGE_SIZE
                if holes and holes[-1][0] is pg.file and holes[-1][2] == lo:
                    holes[-1] = (pg.file, holes[-1][1], lo + PAGE_SIZE)
                else:
                    holes.append((pg.file, lo, lo + PAGE_SIZE))
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
        # madvise_remove punches one hole per VMA (vfs_fallocate of the VMA's part of the
        # range); hugetlb VMAs split only at huge page boundaries, so runs of consecutive
        # file pages punch what the VMAs punch
        for file, lo, hi in holes:
            self.punch(file, lo, hi)
        if want is None and unmapped:
            want = errno.ENOMEM
        event(f"madvise {advice!r}: {errno.errorcode.get(want, want) if want else 'ok'}")
        self.expect_errno(want, p.madvise, addr, npages * PAGE_SIZE, advice)

    def collapse(self, p: Process, addr: int, s: int, e: int) -> None:
        """MADV_COLLAPSE: a weak oracle, the contents are the strong one.

        Settled on 6.18: a hugetlb VMA, a VMA with VM_NOHUGEPAGE and a
        range holding no whole aligned 2 MiB (``hstart > hend``) are EINVAL;
        so is a range the scan finds read-only or never written (no
        anon_vma, only none or zero-page PTEs: SCAN_PAGE_RO / SCAN_PAGE_ANON)
        - which depends on page-table state the model does not keep, so
        success, EINVAL and EAGAIN are all accepted for the others.
        """
        pages = self.model[p]
        sure = None
        for v in range(s, e):
            pg = pages.get(v)
            if pg is None:
                continue
            if pg.huge or pg.kind != "anon" or pg.thp == MADV_NOHUGEPAGE:
                sure = errno.EINVAL
            break
        try:
            p.madvise(addr, (e - s) * PAGE_SIZE, MADV_COLLAPSE)
            got = None
        except OSError as err:
            got = err.errno
        event(f"madvise MADV_COLLAPSE: {errno.errorcode.get(got, got) if got else 'ok'}")
        if sure is not None:
            assert got == sure, f"MADV_COLLAPSE: errno {got}, model expects {sure}"
            return
        assert got in (None, errno.EINVAL, errno.EAGAIN, errno.ENOMEM), \
            f"MADV_COLLAPSE: errno {got}"
        if got is None:  # success means every aligned 2 MiB of the range is a PMD leaf now
            for v in range(-(-s // HP) * HP, e - e % HP, HP):
                entry = p.walk(v << PAGE_SHIFT)[2].entry
                assert entry & _PAGE_PSE, f"MADV_COLLAPSE succeeded, {v << PAGE_SHIFT:#x} not huge"

    # -- mremap ------------------------------------------------------------------------

    @rule(p=MemTypesMachine.procs, pos=pos_st, old_n=len_st, new_n=len_st,
          flags=st.sampled_from(REMAP_FLAGS), dest=unit_pos_st)
    def mremap(self, p: Process, pos: int, old_n: int, new_n: int, flags: int, dest: int) -> None:
        if flags & MREMAP_DONTUNMAP and not flags & MREMAP_FIXED:
            new_n = old_n
        self.do_mremap(p, haddr(pos), old_n, new_n, flags,
                       haddr(dest) if flags & MREMAP_FIXED else 0)

    # -- mlock -----------------------------------------------------------------------------

    @rule(p=MemTypesMachine.procs, pos=pos_st, npages=len_st, onfault=st.booleans(),
          lock=st.booleans())
    def mlock(self, p: Process, pos: int, npages: int, onfault: bool, lock: bool) -> None:
        """mlock sets no VM_LOCKED on hugetlb (``mlock_fixup``) but still populates it.

        Even under MLOCK_ONFAULT (checked on 6.18: ENOMEM beyond EOF).
        """
        from vmemu.mmu.mlock import MLOCK_ONFAULT

        pages = self.model[p]
        addr = haddr(pos)
        vpns = range(hvpn(pos), hvpn(pos) + npages)
        want = None
        for v in vpns:
            if v not in pages:
                want = errno.ENOMEM
                break
            if not pages[v].huge:
                pages[v].locked = lock
        if lock:
            populates = want is None  # a hole fails before __mm_populate
            if populates:  # hugetlb gets no VM_LOCKONFAULT, so it is populated anyway
                want = self.mlock_populate_model(
                    pages, [v for v in vpns if not onfault or pages[v].huge])
            self.expect_errno(want, p.mlock, addr, npages * PAGE_SIZE,
                              MLOCK_ONFAULT if onfault else 0)
            if populates and not onfault:
                self.touch_lazy(p, self.write_populated(pages, vpns))
        else:
            self.expect_errno(want, p.munlock, addr, npages * PAGE_SIZE)

    # -- the hugetlb memfd ---------------------------------------------------------------

    @rule(units=st.integers(0, 4), slop=st.sampled_from([0, 0, 0, 1, PAGE_SIZE, HSIZE // 2]))
    def ftruncate(self, units: int, slop: int) -> None:  # type: ignore[override]
        """hugetlbfs_setattr: a size that is not a multiple of 2 MiB is EINVAL (checked on 6.18)."""
        f = self.files[0]
        size = units * HSIZE + slop
        if slop:
            self.expect_errno(errno.EINVAL, self.root.ftruncate, f.fd, size)
            return
        self.expect_errno(None, self.root.ftruncate, f.fd, size)
        f.truncate(size)
        for pg in self.file_mappings(f):
            if f.beyond_eof(pg.index):
                pg.data, pg.lazy, pg.poisoned = None, False, False

    @rule(mode=st.sampled_from(FALLOC_MODES), units=st.integers(0, 4),
          off_pages=st.sampled_from([0, 0, 1, HP // 2]), length=len_st)
    def fallocate(self, mode: int, units: int, off_pages: int, length: int) -> None:  # type: ignore[override]
        f = self.files[0]
        offset = units * HSIZE + off_pages * PAGE_SIZE
        nbytes = length * PAGE_SIZE
        want = errno.EOPNOTSUPP if mode == FALLOC_FL_PUNCH_HOLE else None
        self.expect_errno(want, self.root.fallocate, f.fd, mode, offset, nbytes)
        if want is not None:
            return
        if mode & FALLOC_FL_PUNCH_HOLE:
            self.punch(f, offset, offset + nbytes)
            return
        f.cached.update(range(offset // HSIZE, -(-(offset + nbytes) // HSIZE)))
        if not mode & FALLOC_FL_KEEP_SIZE:
            f.size = max(f.size, offset + nbytes)  # may leave i_size unaligned (checked on 6.18)

    @rule(units=st.integers(0, 4), off=st.sampled_from([0, 1, PAGE_SIZE * HOT[2]]),
          n=st.integers(0, 2 * PAGE_SIZE))
    def pread(self, units: int, off: int, n: int) -> None:  # type: ignore[override]
        self.check_pread(self.files[0], units * HSIZE + off, n)  # EIO at a raw poisoned page

    @rule(seals=st.sampled_from([F_SEAL_GROW, F_SEAL_WRITE]))
    def add_seals(self, seals: int) -> None:  # type: ignore[override]
        """The hugetlb memfd was made without MFD_ALLOW_SEALING: F_ADD_SEALS is EPERM."""
        self.expect_errno(errno.EPERM, self.root.fcntl, self.files[0].fd, F_ADD_SEALS, seals)

    @rule(units=st.integers(0, 4))
    def pwrite(self, units: int) -> None:  # type: ignore[override]
        """hugetlbfs has no write_iter: pwrite is EINVAL (checked on 6.18)."""
        f = self.files[0]
        self.expect_errno(errno.EINVAL, self.root.pwrite, f.fd, b"x", units * HSIZE)

    @precondition(lambda self: not self.swap)
    @rule(p=MemTypesMachine.procs, pos=pos_st)
    def hwpoison(self, p: Process, pos: int) -> None:  # type: ignore[override]
        """MADV_HWPOISON of one page of a THP or of a hugetlb page.

        A THP is split first (``try_to_split_thp_page``), then only the
        4 KiB page is poisoned, as in the small-page machine. A hugetlb page
        is poisoned whole (``try_memory_failure_hugetlb``): every page table
        mapping it (found by its frame in pagemap) gets a hwpoison entry for
        all of it; a hugetlbfs page stays cached and poisoned, so every
        fault of it is SIGBUS BUS_MCEERR_AR while pread stops at the raw
        page only (``adjust_range_hwpoison``). The caller is signalled at
        the raw page when the page was dirty: surely when one of its bytes
        was written; a page only read may be either (PG_dirty of a fresh
        hugetlb page is not modelled). Only a present page is poisoned here
        (a GUP fault would allocate one whose dirtiness is not modelled).
        """
        vpn = hvpn(pos)
        pg = self.model[p].get(vpn)
        if pg is None or not pg.huge:
            self.do_hwpoison(p, haddr(pos))
            return
        if not pg.prot & PROT_READ or pg.sigbus() is not None:
            return
        entry = p.pagemap(vpn << PAGE_SHIFT)
        if not entry >> 63 & 1:
            event("hwpoison: hugetlb page not present, skipped")
            return
        head = (entry & PM_PFN) - vpn % HP
        base = vpn - vpn % HP
        kills = set()
        written = False
        for q, pages in self.model.items():
            for b in {v - v % HP for v, o in pages.items() if o.huge}:
                e = q.pagemap(b << PAGE_SHIFT)
                if not e >> 63 & 1 or (e & PM_PFN) != head:
                    continue
                for v in range(b, b + HP):
                    if v in pages:
                        pages[v].poisoned = True
                        written |= pages[v].kind == "anon" and pages[v].data is not None
                if q is p:
                    kills.add((b + vpn % HP) << PAGE_SHIFT)
        if pg.kind == "shared" or pg.kind == "private" and pg.data is None:
            f = pg.file
            assert f is not None
            first = pg.index - pg.index % HP
            f.poisoned.update(range(first, first + HP))
            f.raw_poisoned.add(pg.index)
            written = bool(f.dirty & set(range(first, first + HP)))
        event(f"hwpoison hugetlb {pg.kind} written={written}")
        assert base << PAGE_SHIFT <= haddr(pos) < (base + HP) << PAGE_SHIFT
        try:
            p.madvise(haddr(pos), PAGE_SIZE, MADV_HWPOISON)
            sig = None
        except Signal as e:
            sig = e
        if sig is None and not written:
            return
        assert isinstance(sig, Sigbus) and sig.si_code == BUS_MCEERR_AR and sig.si_addr in kills, \
            f"MADV_HWPOISON: {sig!r}, model expects SIGBUS BUS_MCEERR_AR at one of {kills}"

    # -- accesses ---------------------------------------------------------------------

    @rule(p=MemTypesMachine.procs, task=st.sampled_from(["main", "worker"]), pos=pos_st,
          off=st.sampled_from([0, 1, PAGE_SIZE - 8, PAGE_SIZE - 1]),
          n=st.one_of(st.integers(1, 16), st.integers(1, 2 * PAGE_SIZE)))
    def read(self, p: Process, task: str, pos: int, off: int, n: int) -> None:  # type: ignore[override]
        self.access(p, task, haddr(pos, off), n, None)

    @rule(p=MemTypesMachine.procs, task=st.sampled_from(["main", "worker"]), pos=pos_st,
          off=st.sampled_from([0, 1, PAGE_SIZE - 8, PAGE_SIZE - 1]),
          n=st.one_of(st.integers(1, 16), st.integers(1, 2 * PAGE_SIZE)),
          fill=st.integers(0, 254))
    def write(self, p: Process, task: str, pos: int, off: int, n: int, fill: int) -> None:  # type: ignore[override]
        self.access(p, task, haddr(pos, off), n, pattern(fill, n))

    @rule(p=MemTypesMachine.procs)
    def read_window(self, p: Process) -> None:
        for unit in range(NUNITS):
            for sub in HOT:
                self.access(p, "main", haddr(unit * HP + sub), PAGE_SIZE, None)

    @precondition(lambda self: self.swap)
    @rule(nr=st.integers(1, 16))
    def reclaim(self, nr: int) -> None:
        super().reclaim(nr)

    # -- an empty pool -----------------------------------------------------------------

    @rule(p=MemTypesMachine.procs, shared=st.booleans(), write=st.booleans(),
          sub=st.sampled_from(HOT))
    def pool_exhausted(self, p: Process, shared: bool, write: bool, sub: int) -> None:
        """With no unreserved free page left, new reservations and unreserved faults fail.

        ``nr_hugepages`` is lowered to 0, which keeps the pages in use or
        reserved (``set_max_huge_pages``: they become surplus), so free
        equals reserved. Then (``mm/hugetlb.c``): an mmap that must reserve
        is ENOMEM (``hugetlb_reserve_pages`` -> ``hugetlb_acct_memory``),
        anonymous or of the memfd at an offset nobody reserved; fallocate
        there is ENOSPC (``alloc_hugetlb_folio``); a MAP_NORESERVE mapping
        maps, and its first fault, read or write, is SIGBUS BUS_ADRERR
        (``hugetlb_no_page``). Everything is undone and the pool restored
        before the rule ends, so faults of the window, whose reservations
        are intact, are not affected. Semantics from the kernel source and
        tests/mmu/test_hugetlb.py: emptying the host's pool to check them
        natively would disturb everyone else using it.
        """
        pool = self.kernel.hugetlb
        before = pool.statistics()
        self.kernel.set_nr_hugepages(0)
        empty = pool.statistics()
        assert empty.free_huge_pages == empty.resv_huge_pages, empty
        flags = (MAP_SHARED if shared else MAP_PRIVATE) | MAP_ANONYMOUS | MAP_HUGETLB
        self.expect_errno(errno.ENOMEM, p.mmap, 0, HSIZE, RW, flags, -1, 0)
        f = self.files[0]
        far = 8 * HSIZE  # beyond every offset the other rules map or fallocate
        self.expect_errno(errno.ENOMEM, p.mmap, 0, HSIZE, PROT_READ, MAP_SHARED, f.fd, far)
        self.expect_errno(errno.ENOSPC, self.root.fallocate, f.fd, FALLOC_FL_KEEP_SIZE, far,
                          HSIZE)
        a = self.expect_errno(None, p.mmap, 0, HSIZE, RW, flags | MAP_NORESERVE, -1, 0)
        assert isinstance(a, int)
        addr = a + sub * PAGE_SIZE
        try:
            if write:
                p.write(addr, b"w")
            else:
                p.read(addr, 1)
            sig = None
        except Signal as e:
            sig = e
        self.check_signal(sig, (Sigbus, BUS_ADRERR, addr, 0))
        p.munmap(a, HSIZE)
        self.kernel.set_nr_hugepages(before.nr_hugepages - before.surplus_huge_pages)
        assert pool.statistics() == before, f"pool {pool.statistics()} != {before}"


HugeMachine.TestCase.settings = scaled(0.08)
TestHugeStateful = HugeMachine.TestCase


def test_hot_pages_cover_unit_edges() -> None:
    """The hot pages reach both ends of a unit, so splits at either end are seen."""
    assert HOT[0] == 0 and HOT[-1] == HP - 1 and plan_access({}, haddr(0), 1, False)[1]
    assert cow is not None and MADV_HUGEPAGE != MADV_NOHUGEPAGE
