"""hugetlb: a pool of preallocated huge pages, reservations and PMD-mapped faults.

Mirrors ``mm/hugetlb.c`` and ``fs/hugetlbfs/inode.c`` as far as user space
can observe them.

* **The pool** (``struct hstate``), one per huge page size (2 MiB by
  default, 1 GiB optional): ``nr_hugepages`` persistent pages, of which
  ``free_huge_pages`` are free and ``resv_huge_pages`` of the free ones are
  promised to mappings. ``/proc/sys/vm/nr_hugepages`` is
  :meth:`HugetlbPool.set_nr_hugepages`. Physical memory stays lazy: a free
  pool page is a counter, and its frames are allocated (an order-9 folio)
  when a fault takes it from the pool. vmemu's memory limit therefore
  charges a huge page only once it is in use.
* **Reservations** are taken at mmap time (``hugetlb_reserve_pages``):
  shared mappings reserve in the inode's region map, private ones in a
  map owned by the VMA (``HPAGE_RESV_OWNER``, kept in ``vm_private_data``
  and shared by the pieces of a split). mmap fails with ENOMEM when the
  free pages cannot cover the reservation, unless MAP_NORESERVE. A fault
  consumes the reservation of its index, or takes an unreserved free page,
  or fails with SIGBUS (BUS_ADRERR) when there is none.
* **Faults** (``hugetlb_fault``) install a PMD leaf (PSE) mapping the
  whole folio; the folio's ``entire_mapcount`` counts such mappings. A
  private mapping gets anonymous huge pages; after fork both sides are
  write-protected and a write copies into a new page from the pool
  (``hugetlb_wp``); when that fails the owner of the reservation steals
  the page back from the children (``unmap_ref_private``), whose later
  access then gets SIGBUS, as on Linux.
* **Alignment**: lengths are rounded up to the huge page size at mmap; an
  unaligned MAP_FIXED address or file offset is EINVAL; a VMA cannot be
  split at an unaligned address (``hugetlb_vm_op_split``), so munmap and
  mprotect of part of a huge page fail with EINVAL; MADV_DONTNEED needs an
  aligned start and rounds the end down.

Simplified: 1 GiB pages are mapped by 512 PMD leaves each (the kernel uses
one PUD leaf); there are no surplus (overcommit) pages, no subpools
(hugetlbfs mount limits), no PMD sharing and no NUMA nodes.
"""

from __future__ import annotations

import errno
import mmap as _host_mmap
from typing import TYPE_CHECKING, Any

import attrs

from vmemu.constants import (
    LEGACY_MAP_MASK,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGE_MASK,
    MAP_HUGE_SHIFT,
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_TYPE,
    MMAP_MIN_ADDR,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SIZE,
    TASK_SIZE,
)
from vmemu.errors import POISON_MARKER_FAULT, VmFault, raise_errno
from vmemu.mmu.folio import PG, Folio, PhysMem
from vmemu.mmu.memory import (
    FAULT_FLAG_WRITE,
    VmFaultInfo,
    anon_vma_prepare,
    handle_userfault,
    vm_get_page_prot,
)
from vmemu.mmu.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_UFFD_WP,
    PTE_PFN_MASK,
    SWP_HWPOISON,
    UFFD_WP_MARKER,
    is_poisoned_marker,
    is_swap_pte_raw,
    is_uffd_wp_marker,
    swp_type,
)
from vmemu.mmu.shmem import ShmemInode
from vmemu.mmu.vma import (
    VM_DONTEXPAND,
    VM_GROWSDOWN,
    VM_HUGETLB,
    VM_LOCKED,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NORESERVE,
    VM_SHARED,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WRITE,
    Vma,
)

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

HPAGE_SIZE_2M = PMD_SIZE
HPAGE_SIZE_1G = 1 << 30
DEFAULT_HPAGE_SIZE = HPAGE_SIZE_2M
HUGETLB_ANON_FILE = "anon_hugepage"
HUGETLBFS_DEV = "00:11"  # the internal hugetlbfs mount (varies by boot on Linux)
_PMD_PAGES = PMD_SIZE >> PAGE_SHIFT


@attrs.frozen
class HugetlbStats:
    """One pool's counters, as /proc/meminfo and /sys/kernel/mm/hugepages show them."""

    size: int
    nr_hugepages: int
    free_huge_pages: int
    resv_huge_pages: int
    surplus_huge_pages: int


@attrs.define(eq=False)
class HState:
    """The pool of one huge page size (``struct hstate``)."""

    order: int
    nr_huge_pages: int = 0
    free_huge_pages: int = 0
    resv_huge_pages: int = 0
    surplus_huge_pages: int = 0

    @property
    def size(self) -> int:
        """Bytes per huge page (``huge_page_size``)."""
        return PAGE_SIZE << self.order

    @property
    def mask(self) -> int:
        """``huge_page_mask``: clears the offset inside a huge page."""
        return ~(self.size - 1)

    @property
    def name(self) -> str:
        """The sysfs directory name, e.g. ``hugepages-2048kB``."""
        return f"hugepages-{self.size >> 10}kB"

    def _check(self) -> None:
        assert 0 <= self.resv_huge_pages <= self.free_huge_pages <= self.nr_huge_pages, self
        assert 0 <= self.surplus_huge_pages <= self.nr_huge_pages, self


class HugetlbPool:
    """All hstates of one machine (``hstates[]``); reached as ``kernel.hugetlb``."""

    def __init__(self, phys: PhysMem) -> None:
        self.phys = phys
        self.hstates: dict[int, HState] = {
            HPAGE_SIZE_2M: HState(PMD_SIZE.bit_length() - 1 - PAGE_SHIFT),
            HPAGE_SIZE_1G: HState(HPAGE_SIZE_1G.bit_length() - 1 - PAGE_SHIFT),
        }
        self.default = self.hstates[DEFAULT_HPAGE_SIZE]
        self.raw_hwpoison: set[int] = set()  # raw pfns of poisoned huge pages (raw_hwp_list)

    def hstate(self, size: int = DEFAULT_HPAGE_SIZE) -> HState:
        """The hstate of ``size`` bytes (``size_to_hstate``); EINVAL for an unknown size."""
        h = self.hstates.get(size)
        if h is None:
            raise_errno(errno.EINVAL, f"no {size >> 10} kB huge pages")
        return h

    def hstate_sizelog(self, log: int) -> HState | None:
        """The hstate for MAP_HUGE_* bits (``hstate_sizelog``): 0 means the default size."""
        if not log:
            return self.default
        return self.hstates.get(1 << log)

    # -- the sysctl ----------------------------------------------------------

    def set_nr_hugepages(self, count: int, size: int = DEFAULT_HPAGE_SIZE) -> int:
        """Write ``nr_hugepages`` (``set_max_huge_pages``); returns the persistent count.

        Growing adds free pages. Shrinking frees unreserved free pages; pages
        still in use or reserved become surplus and leave the pool when freed.
        """
        if count < 0:
            raise_errno(errno.EINVAL)
        h = self.hstate(size)
        while h.surplus_huge_pages and count > h.nr_huge_pages - h.surplus_huge_pages:
            h.surplus_huge_pages -= 1
        while count > h.nr_huge_pages - h.surplus_huge_pages:
            h.nr_huge_pages += 1
            h.free_huge_pages += 1
        min_count = h.resv_huge_pages + h.nr_huge_pages - h.free_huge_pages
        min_count = max(count, min_count)
        while min_count < h.nr_huge_pages - h.surplus_huge_pages and \
                h.free_huge_pages > h.resv_huge_pages:
            h.nr_huge_pages -= 1
            h.free_huge_pages -= 1
        while count < h.nr_huge_pages - h.surplus_huge_pages:
            h.surplus_huge_pages += 1
        return h.nr_huge_pages - h.surplus_huge_pages

    @property
    def nr_hugepages(self) -> int:
        """``/proc/sys/vm/nr_hugepages``: persistent pages of the default size."""
        return self.default.nr_huge_pages - self.default.surplus_huge_pages

    @property
    def free_huge_pages(self) -> int:
        """HugePages_Free of the default size."""
        return self.default.free_huge_pages

    @property
    def resv_huge_pages(self) -> int:
        """HugePages_Rsvd of the default size."""
        return self.default.resv_huge_pages

    def statistics(self, size: int = DEFAULT_HPAGE_SIZE) -> HugetlbStats:
        """A frozen snapshot of one pool."""
        h = self.hstate(size)
        return HugetlbStats(h.size, h.nr_huge_pages, h.free_huge_pages, h.resv_huge_pages,
                            h.surplus_huge_pages)

    def meminfo(self) -> str:
        """The hugetlb lines of /proc/meminfo (``hugetlb_report_meminfo``)."""
        h = self.default
        total = sum(x.nr_huge_pages * (x.size >> 10) for x in self.hstates.values())
        return (f"HugePages_Total:   {h.nr_huge_pages:5d}\n"
                f"HugePages_Free:    {h.free_huge_pages:5d}\n"
                f"HugePages_Rsvd:    {h.resv_huge_pages:5d}\n"
                f"HugePages_Surp:    {h.surplus_huge_pages:5d}\n"
                f"Hugepagesize:   {h.size >> 10:8d} kB\n"
                f"Hugetlb:        {total:8d} kB\n")

    # -- reservations and pages -------------------------------------------------

    def acct_memory(self, h: HState, delta: int) -> bool:
        """Take or return ``delta`` reservations (``hugetlb_acct_memory``); False if short."""
        if delta > 0 and h.resv_huge_pages + delta > h.free_huge_pages:
            return False  # gather_surplus_pages: no overcommit in vmemu
        h.resv_huge_pages += delta
        return True

    def can_dequeue(self, h: HState, use_reserve: bool) -> bool:
        """Whether ``dequeue`` would find a page (``dequeue_hugetlb_folio_vma``'s test)."""
        return use_reserve or h.free_huge_pages - h.resv_huge_pages > 0

    def dequeue(self, h: HState, use_reserve: bool) -> Folio | None:
        """Take a free page, zeroed, from the pool (``alloc_hugetlb_folio``); None if empty."""
        if not use_reserve and h.free_huge_pages - h.resv_huge_pages <= 0:
            return None
        folio = self.phys.alloc_folio(h.order, zero=True) if h.order <= 9 else \
            self._alloc_gigantic(h)
        if folio is None:
            return None
        h.free_huge_pages -= 1
        if use_reserve:
            h.resv_huge_pages -= 1
        folio.flags = PG.large | PG.hugetlb | PG.uptodate
        return folio

    def _alloc_gigantic(self, h: HState) -> Folio | None:
        # a 1 GiB bytearray would be zero-filled at once; a host mapping stays lazy
        phys = self.phys
        n = 1 << h.order
        if phys.limit_pages is not None and phys.pages_in_use + n > phys.limit_pages:
            return None
        pfn = phys._take_pfns(h.order)
        data: Any = _host_mmap.mmap(-1, n * PAGE_SIZE)
        folio = Folio(pfn=pfn, order=h.order, data=data, refcount=1)
        phys.mem_map[pfn:pfn + n] = [folio] * n
        phys.pages_in_use += n
        phys.nr_folios += 1
        return folio

    def free_huge_folio(self, folio: Folio) -> None:
        """A huge page's last reference is gone: back to the pool (``free_huge_folio``)."""
        h = self._hstate_of(folio)
        if h.surplus_huge_pages:
            h.surplus_huge_pages -= 1
            h.nr_huge_pages -= 1
        else:
            h.free_huge_pages += 1

    def _hstate_of(self, folio: Folio) -> HState:
        for h in self.hstates.values():
            if h.order == folio.order:
                return h
        raise AssertionError(f"{folio!r} is no huge page")

    def _check(self) -> None:
        for h in self.hstates.values():
            h._check()


def hugetlb_pool(phys: PhysMem) -> HugetlbPool:
    """The machine's pool, created on first use (``hugetlb_init``)."""
    pool: HugetlbPool | None = phys.hugetlb
    if pool is None:
        pool = HugetlbPool(phys)
        phys.hugetlb = pool
    return pool


# -- hugetlbfs inodes -------------------------------------------------------------


class HugetlbInode(ShmemInode):
    """A hugetlbfs inode: a page cache of huge folios keyed by huge-page index.

    ``huge[i]`` is the folio of bytes ``[i*size, (i+1)*size)``; its
    ``index`` is in 4 KiB pages (``i << order``), as rmap expects.
    ``resv_map`` holds the indices covered by a shared reservation or a
    page (the region map); ``resv_pending`` the ones still reserved.
    """

    is_hugetlb = True

    def __init__(self, pool: HugetlbPool, h: HState, size: int, name: str,
                 anon: bool) -> None:
        super().__init__(pool.phys, size, name)
        self.pool = pool
        self.hstate = h
        self.anon = anon
        self.dev = HUGETLBFS_DEV
        self.huge: dict[int, Folio] = {}
        self.resv_map: set[int] = set()
        self.resv_pending: set[int] = set()

    def proc_name(self) -> str:
        """The maps name: ``/anon_hugepage (deleted)`` or ``/memfd:<name> (deleted)``."""
        return f"/{self.name} (deleted)"

    @property
    def nr_huge_size(self) -> int:
        """Huge pages covered by ``i_size``."""
        return (self.i_size + self.hstate.size - 1) // self.hstate.size

    def find_folio(self, index: int) -> Folio | None:
        """The cached huge folio holding 4 KiB page ``index``."""
        return self.huge.get(index >> self.hstate.order)

    def get_folio(self, index: int) -> Folio | None:
        """Find or allocate the huge folio holding 4 KiB page ``index`` (page cache only)."""
        return self.get_huge_folio(index >> self.hstate.order)

    def get_huge_folio(self, hidx: int) -> Folio | None:
        """Find or allocate the folio at huge index ``hidx`` (``hugetlb_add_to_page_cache``)."""
        folio = self.huge.get(hidx)
        if folio is not None:
            return folio
        use_resv = hidx in self.resv_pending
        folio = self.pool.dequeue(self.hstate, use_resv)
        if folio is None:
            return None
        self.resv_pending.discard(hidx)
        self.resv_map.add(hidx)
        folio.mapping = self
        folio.index = hidx << self.hstate.order
        self.huge[hidx] = folio  # the page cache's reference is the initial one
        return folio

    def reserve(self, first: int, last: int) -> bool:
        """Reserve huge indices ``[first, last)`` for a shared mapping (``region_chg``)."""
        new = [i for i in range(first, last) if i not in self.resv_map]
        if not self.pool.acct_memory(self.hstate, len(new)):
            return False
        self.resv_map.update(new)
        self.resv_pending.update(new)
        return True

    def set_size(self, size: int) -> None:
        """ftruncate (``hugetlbfs_setattr``): EINVAL unless huge-aligned.

        Shrinking, or keeping the size, drops the pages from the new end on:
        those fallocated beyond EOF go even at the same size (6.18).
        """
        if size < 0 or size & (self.hstate.size - 1):
            raise_errno(errno.EINVAL)
        if size <= self.i_size:
            self.remove_from(size // self.hstate.size)
        self.i_size = size

    def remove_from(self, first: int) -> None:
        """Drop pages and reservations from huge index ``first`` on (``remove_inode_hugepages``)."""
        self.unmap_from(first)
        for hidx in [i for i in self.huge if i >= first]:
            folio = self.huge.pop(hidx)
            folio.mapping = None
            self.phys.folio_put(folio)
        gone = {i for i in self.resv_pending if i >= first}
        self.pool.acct_memory(self.hstate, -len(gone))
        self.resv_pending -= gone
        self.resv_map = {i for i in self.resv_map if i < first}

    def unmap_from(self, first: int, last: int = 1 << 62, even_cows: bool = True,
                   drop_markers: bool = True) -> None:
        """Unmap huge indices ``[first, last)`` from every mapping (``hugetlb_vmdelete_list``).

        Without ``even_cows`` only mappings of this file's own pages go;
        private COW copies stay (a hole punch). ``drop_markers`` is
        ``ZAP_FLAG_DROP_MARKER``: truncate passes it, a hole punch does not,
        so a punched uffd-wp page leaves a uffd-wp marker behind.
        """
        shift = PAGE_SHIFT + self.hstate.order
        for vma in list(self.i_mmap):
            lo, hi = vma_hugecache_range(vma)
            if hi <= first or lo >= last:
                continue
            start = vma.vm_start + ((max(lo, first) - lo) << shift)
            end = vma.vm_start + ((min(hi, last) - lo) << shift)
            for mm in list(self.phys.mms):
                if mm.vmas.vma_lookup(vma.vm_start) is not vma:
                    continue
                if even_cows:
                    unmap_hugepage_range(mm, vma, start, end, not drop_markers)
                    continue
                for addr in range(start, end, self.hstate.size):
                    _pmd, e = _entry_at(mm, addr)
                    if e & (_PAGE_PRESENT | _PAGE_PROTNONE) and \
                            mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT].mapping is self:
                        unmap_hugepage_range(mm, vma, addr, addr + self.hstate.size,
                                             not drop_markers)

    def drop_range(self, first: int, last: int) -> None:
        """Punch 4 KiB page indices ``[first, last)`` (``hugetlbfs_punch_hole``).

        Only whole huge pages go, with their reservations. Every mapping of
        the range is zapped first, private COW copies included (unlike shmem:
        ``hugetlb_vmdelete_list`` passes no ``ref_folio``, observed on 6.18);
        uffd-wp markers stay.
        """
        order = self.hstate.order
        hfirst = (first + (1 << order) - 1) >> order
        hlast = last >> order
        if hfirst >= hlast:
            return
        self.unmap_from(hfirst, hlast, even_cows=True, drop_markers=False)
        for hidx in range(hfirst, hlast):
            folio = self.huge.pop(hidx, None)
            if folio is not None:
                folio.mapping = None
                self.phys.folio_put(folio)
        gone = {i for i in self.resv_pending if hfirst <= i < hlast}
        self.pool.acct_memory(self.hstate, -len(gone))
        self.resv_pending -= gone
        self.resv_map = {i for i in self.resv_map if not hfirst <= i < hlast}

    def truncate(self) -> None:
        """The inode's last user is gone (``hugetlbfs_evict_inode``)."""
        for hidx in list(self.huge):
            folio = self.huge.pop(hidx)
            folio.mapping = None
            self.phys.folio_put(folio)
        self.pool.acct_memory(self.hstate, -len(self.resv_pending))
        self.resv_pending.clear()
        self.resv_map.clear()

    def vm_close(self, vma: Vma) -> None:
        """A VMA of this file goes away (``hugetlb_vm_op_close``): drop its private reservations."""
        resv = vma.vm_private_data
        if not isinstance(resv, ResvMap) or resv.inode is not self:
            return
        first, last = vma_hugecache_range(vma)
        gone = {i for i in resv.reserved if first <= i < last}
        resv.reserved -= gone
        self.pool.acct_memory(self.hstate, -len(gone))

    def __repr__(self) -> str:
        return (f"HugetlbInode(ino={self.ino}, size={self.i_size:#x}, "
                f"hpage={self.hstate.size >> 10}kB, cached={len(self.huge)})")


@attrs.define(eq=False)
class ResvMap:
    """The reservations of a private mapping, owned by its VMA (``HPAGE_RESV_OWNER``)."""

    inode: HugetlbInode
    reserved: set[int] = attrs.field(factory=set)  # huge indices still reserved
    unmapped: bool = False  # HPAGE_RESV_UNMAPPED: a child lost its pages to the owner


def hugetlb_file_setup(phys_or_kernel: Any, size: int, name: str = HUGETLB_ANON_FILE,
                       huge_size: int = DEFAULT_HPAGE_SIZE, anon: bool = False) -> HugetlbInode:
    """A hugetlbfs file with no reservation (``hugetlb_file_setup(..., VM_NORESERVE)``).

    memfd_create(MFD_HUGETLB) calls this with the memfd's name
    (``"memfd:" + name``) and size 0; EINVAL for an unknown huge page size.
    """
    phys = getattr(phys_or_kernel, "phys", phys_or_kernel)
    pool = hugetlb_pool(phys)
    h = pool.hstate(huge_size)
    return HugetlbInode(pool, h, size, name, anon)


def is_file_hugepages(file: Any) -> bool:
    """True for a hugetlbfs file (``is_file_hugepages``)."""
    return isinstance(file, HugetlbInode)


def hstate_vma(vma: Vma) -> HState:
    """The hstate of a hugetlb VMA (``hstate_vma``)."""
    h: HState = vma.vm_file.hstate
    return h


def vma_hugecache_range(vma: Vma) -> tuple[int, int]:
    """Huge indices ``[first, last)`` that ``vma`` maps (``vma_hugecache_offset``)."""
    order = hstate_vma(vma).order
    first = vma.vm_pgoff >> order
    return first, first + ((vma.vm_end - vma.vm_start) >> (PAGE_SHIFT + order))


# -- mmap --------------------------------------------------------------------------


def _get_unmapped_area(mm: MmStruct, h: HState, addr: int, length: int, flags: int) -> int:
    """Place a hugetlb mapping (``hugetlb_get_unmapped_area``): huge-aligned, top down."""
    if length & ~h.mask:
        raise_errno(errno.EINVAL)
    if length > TASK_SIZE:
        raise_errno(errno.ENOMEM)
    if flags & MAP_FIXED:
        if addr & ~h.mask:
            raise_errno(errno.EINVAL)
        if addr > TASK_SIZE - length:
            raise_errno(errno.ENOMEM)
        return addr
    if addr:
        addr = (addr + h.size - 1) & h.mask
        if TASK_SIZE - length >= addr and addr >= MMAP_MIN_ADDR and \
                not mm.vmas.overlapping(addr, addr + length):
            return addr
    for lo, hi in mm.vmas.gaps(max(MMAP_MIN_ADDR, PAGE_SIZE), mm.mmap_base):
        start = (hi - length) & h.mask
        if hi - lo >= length and start >= lo:
            return start
    raise_errno(errno.ENOMEM)


def mmap_hugetlb(mm: MmStruct, addr: int, length: int, prot: int, flags: int, file: Any,
                 offset: int) -> int:
    """mmap of hugetlb memory: MAP_HUGETLB or a hugetlbfs file (``ksys_mmap_pgoff`` + ``do_mmap``).

    ``length`` arrives page-aligned and ``offset`` page-aligned (do_mmap checked).
    """
    from vmemu.mmu.mmap import calc_vm_prot_bits, do_munmap

    pool = hugetlb_pool(mm.phys)
    if file is None:
        h = pool.hstate_sizelog((flags >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK)
        if h is None:
            raise_errno(errno.EINVAL, "unsupported MAP_HUGE_* size")
        length = (length + h.size - 1) & h.mask
        if not length:
            raise_errno(errno.ENOMEM)
        inode: HugetlbInode | None = None
    elif not is_file_hugepages(file):
        raise_errno(errno.EINVAL, "MAP_HUGETLB on a file outside hugetlbfs")
    else:
        inode = file
        h = inode.hstate
        length = (length + h.size - 1) & h.mask
    map_type = flags & MAP_TYPE
    if map_type == MAP_SHARED_VALIDATE:
        if flags & ~LEGACY_MAP_MASK & ~(MAP_FIXED_NOREPLACE | MAP_SHARED_VALIDATE):
            raise_errno(errno.EOPNOTSUPP)
        map_type = MAP_SHARED
    if map_type not in (MAP_SHARED, MAP_PRIVATE):
        raise_errno(errno.EINVAL, "MAP_SHARED or MAP_PRIVATE required")
    if flags & MAP_FIXED_NOREPLACE:
        flags |= MAP_FIXED
    shared = map_type == MAP_SHARED
    if shared and flags & MAP_GROWSDOWN:
        raise_errno(errno.EINVAL)
    if flags & MAP_FIXED and addr < MMAP_MIN_ADDR:
        raise_errno(errno.EPERM, "below mmap_min_addr")
    vm_flags = calc_vm_prot_bits(prot) | VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC
    if inode is not None:
        vm_flags = mm.file_vm_flags(inode, vm_flags, shared)
    if shared:
        vm_flags |= VM_SHARED | VM_MAYSHARE
    if flags & MAP_GROWSDOWN:
        vm_flags |= VM_GROWSDOWN
    if flags & MAP_LOCKED:
        vm_flags |= VM_LOCKED
    if flags & MAP_NORESERVE:
        vm_flags |= VM_NORESERVE  # hugetlb honours it whatever the overcommit policy
    addr = _get_unmapped_area(mm, h, addr, length, flags)
    pgoff = offset >> PAGE_SHIFT
    with mm.lock:
        if flags & MAP_FIXED_NOREPLACE and mm.vmas.overlapping(addr, addr + length):
            raise_errno(errno.EEXIST)
        # hugetlbfs_file_mmap: the offset must be huge-aligned
        if pgoff & ((1 << h.order) - 1):
            raise_errno(errno.EINVAL, "offset not huge-page aligned")
        if mm.vmas.overlapping(addr, addr + length):
            do_munmap(mm, addr, length)  # vms_clean_up_area: before ->mmap reserves
        if inode is None:
            inode = HugetlbInode(pool, h, length, HUGETLB_ANON_FILE, anon=True)
        vma = Vma(addr, addr + length, vm_flags | VM_HUGETLB | VM_DONTEXPAND, pgoff, inode)
        first, last = vma_hugecache_range(vma)
        if not vm_flags & VM_NORESERVE:
            if shared:
                if not inode.reserve(first, last):
                    raise_errno(errno.ENOMEM, "hugetlb pool cannot reserve")
            else:
                if not pool.acct_memory(h, last - first):
                    raise_errno(errno.ENOMEM, "hugetlb pool cannot reserve")
                vma.vm_private_data = ResvMap(inode, set(range(first, last)))
        if vm_flags & VM_WRITE and inode.i_size < last * h.size:
            inode.i_size = last * h.size
        inode.i_mmap.append(vma)
        mm.vmas.insert(vma)
    if flags & (MAP_POPULATE | MAP_NONBLOCK) == MAP_POPULATE or vm_flags & VM_LOCKED:
        mm.populate(addr, addr + length, ignore_errors=True)
    return addr


def hugetlb_split_check(vma: Vma, addr: int) -> None:
    """A hugetlb VMA splits only on a huge page boundary (``hugetlb_vm_op_split``)."""
    if addr & ~hstate_vma(vma).mask:
        raise_errno(errno.EINVAL, "split inside a huge page")


def hugetlb_dontneed_range(vma: Vma, start: int, end: int) -> tuple[int, int]:
    """MADV_DONTNEED on hugetlb (``madvise_dontneed_free_valid_vma``): aligned start, end down."""
    h = hstate_vma(vma)
    if start & ~h.mask:
        raise_errno(errno.EINVAL)
    return start, end & h.mask


# -- faults ------------------------------------------------------------------------


def _huge_pmds(h: HState) -> int:
    """PMD leaves per huge page: 1 for 2 MiB, 512 for 1 GiB (mapped PMD by PMD here)."""
    return max(1, 1 << (h.order - 9))


def _set_huge_entry(mm: MmStruct, haddr: int, h: HState, entry_of: Any) -> None:
    """Write the PMD leaves of the huge page at ``haddr``; ``entry_of(i)`` gives leaf ``i``."""
    for i in range(_huge_pmds(h)):
        a = haddr + i * PMD_SIZE
        pmd = mm.pgtables.pmd_table(a, True)
        assert pmd is not None
        pmd[(a >> 21) & 511] = entry_of(i)


def make_huge_pte(vma: Vma, folio: Folio, writable: bool, dirty: bool) -> int:
    """The PMD leaf for ``folio`` (``make_huge_pte``); PFN of its first frame.

    ``writable`` is the kernel's ``try_mkwrite``: writable and dirty when the
    VMA allows writing, otherwise write-protected even where ``vm_page_prot``
    grants RW (a shared writable mapping), as ``pte_wrprotect`` does.
    """
    e = (folio.pfn << PAGE_SHIFT) | vm_get_page_prot(vma.vm_flags) | _PAGE_PSE | _PAGE_ACCESSED
    if writable and vma.vm_flags & VM_WRITE:
        return e | _PAGE_RW | _PAGE_DIRTY
    e &= ~_PAGE_RW
    if dirty:
        e |= _PAGE_DIRTY
    return e


def _map_folio(mm: MmStruct, vma: Vma, haddr: int, folio: Folio, entry: int) -> None:
    """Map ``folio`` at ``haddr`` and count the mapping (``hugetlb_add_*_rmap``)."""
    h = hstate_vma(vma)
    n = _huge_pmds(h)
    folio.mapcount += n
    folio.entire_mapcount += n
    folio.refcount += n
    _set_huge_entry(mm, haddr, h, lambda i: entry + (i << (PAGE_SHIFT + 9)))
    mm.tlb.flush_range(haddr, haddr + h.size)


def _unmap_folio(mm: MmStruct, vma: Vma, haddr: int, folio: Folio) -> None:
    """Clear the leaves at ``haddr`` and drop their counts (``hugetlb_remove_rmap``)."""
    h = hstate_vma(vma)
    n = _huge_pmds(h)
    _set_huge_entry(mm, haddr, h, lambda i: 0)
    folio.mapcount -= n
    folio.entire_mapcount -= n
    mm.tlb.flush_range(haddr, haddr + h.size)
    mm.phys.folio_put(folio, n)


def is_hwpoison_entry(e: int) -> bool:
    """A hwpoison swap entry (``is_hugetlb_entry_hwpoisoned``)."""
    return is_swap_pte_raw(e) and swp_type(e) == SWP_HWPOISON


def _entry_at(mm: MmStruct, addr: int) -> tuple[list[int] | None, int]:
    pmd = mm.pgtables.pmd_table(addr, False)
    if pmd is None:
        return None, 0
    return pmd, pmd[(addr >> 21) & 511]


def hugetlb_fault(mm: MmStruct, vma: Vma, address: int, flags: int, task: Any = None) -> VmFault:
    """A fault in a hugetlb VMA (``hugetlb_fault``)."""
    h = hstate_vma(vma)
    haddr = address & h.mask
    pmd = mm.pgtables.pmd_table(haddr, True)
    assert pmd is not None
    idx = (haddr >> 21) & 511
    e = pmd[idx]
    hidx = (vma.vm_pgoff >> h.order) + ((haddr - vma.vm_start) >> (PAGE_SHIFT + h.order))
    vmf = VmFaultInfo(vma, haddr, address, flags, hidx << h.order, pmd, idx, e, task)
    if not e & (_PAGE_PRESENT | _PAGE_PROTNONE):
        if is_poisoned_marker(e):
            return POISON_MARKER_FAULT  # VM_FAULT_HWPOISON_LARGE: SIGBUS, or EHWPOISON to GUP
        if is_hwpoison_entry(e):
            return VmFault.HWPOISON  # VM_FAULT_HWPOISON_LARGE: SIGBUS BUS_MCEERR_AR
        return hugetlb_no_page(mm, vmf, h, hidx)
    if flags & FAULT_FLAG_WRITE:
        if not e & _PAGE_RW:
            return hugetlb_wp(mm, vmf, h, hidx)
        dirty = _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY
        _set_huge_entry(mm, haddr, h, lambda i: _entry_at(mm, haddr + i * PMD_SIZE)[1] | dirty)
    else:
        _set_huge_entry(mm, haddr, h,
                        lambda i: _entry_at(mm, haddr + i * PMD_SIZE)[1] | _PAGE_ACCESSED)
    return VmFault.NONE


def _alloc_for(vma: Vma, h: HState, hidx: int, allow_resv: bool) -> Folio | None:
    """Take a page for ``vma`` at ``hidx``, using its private reservation if it holds one."""
    pool = vma.vm_file.pool
    resv = vma.vm_private_data
    use = allow_resv and isinstance(resv, ResvMap) and hidx in resv.reserved
    folio: Folio | None = pool.dequeue(h, use)
    if folio is not None and use:
        resv.reserved.discard(hidx)
    return folio


def hugetlb_no_page(mm: MmStruct, vmf: VmFaultInfo, h: HState, hidx: int) -> VmFault:
    """Instantiate the huge page of an empty entry (``hugetlb_no_page``)."""
    vma = vmf.vma
    inode: HugetlbInode = vma.vm_file
    resv = vma.vm_private_data
    if isinstance(resv, ResvMap) and resv.unmapped:
        return VmFault.SIGBUS  # the owner took the page back (HPAGE_RESV_UNMAPPED)
    if hidx >= inode.nr_huge_size:
        return VmFault.SIGBUS
    write = bool(vmf.flags & FAULT_FLAG_WRITE)
    # any uffd-wp marker, the VMA registered for WP or not (a marker left by an earlier
    # registration): hugetlb_no_page checks only pte_marker_uffd_wp(vmf->orig_pte)
    uffd_wp = is_uffd_wp_marker(vmf.orig_pte)
    folio = inode.huge.get(hidx)
    if folio is None:
        if vma.vm_flags & VM_UFFD_MISSING:
            return handle_userfault(vmf, VM_UFFD_MISSING)
        if vma.vm_flags & VM_MAYSHARE:
            folio = inode.get_huge_folio(hidx)
            if folio is None:
                return VmFault.SIGBUS
        else:
            av = anon_vma_prepare(vma)
            folio = _alloc_for(vma, h, hidx, True)
            if folio is None:
                return VmFault.SIGBUS
            folio.flags |= PG.anon | PG.anon_exclusive | PG.swapbacked | PG.dirty
            folio.mapping = av
            folio.index = vma.vm_pgoff + ((vmf.address - vma.vm_start) >> PAGE_SHIFT)
            folio.refcount = 0  # the mapping below takes the only reference
            entry = make_huge_pte(vma, folio, writable=write and not uffd_wp, dirty=True)
            if uffd_wp:  # keep a wr-protected entry protected once populated
                entry = (entry | _PAGE_UFFD_WP) & ~_PAGE_RW
            _map_folio(mm, vma, vmf.address, folio, entry)
            if write and uffd_wp and vma.vm_flags & VM_UFFD_WP:
                return handle_userfault(vmf, VM_UFFD_WP)
            return VmFault.NONE
    elif folio.test(PG.hwpoison):  # poisoned while this mapping had no entry for it
        return VmFault.HWPOISON
    elif vma.vm_flags & VM_UFFD_MINOR:
        return handle_userfault(vmf, VM_UFFD_MINOR)
    if not vma.vm_flags & VM_MAYSHARE:
        anon_vma_prepare(vma)
    shared = bool(vma.vm_flags & VM_SHARED)
    # a shared mapping maps writable even on a read fault (no write-notify for hugetlbfs)
    entry = make_huge_pte(vma, folio, writable=shared and not uffd_wp, dirty=shared and write)
    if uffd_wp:  # pte_marker_uffd_wp(vmf->orig_pte): huge_pte_mkuffd_wp(new_pte)
        entry = (entry | _PAGE_UFFD_WP) & ~_PAGE_RW
    if write and shared:
        folio.set(PG.dirty)
    _map_folio(mm, vma, vmf.address, folio, entry)
    if write and not shared:
        vmf.orig_pte = vmf.table[vmf.idx]
        return hugetlb_wp(mm, vmf, h, hidx)
    return VmFault.NONE


def hugetlb_wp(mm: MmStruct, vmf: VmFaultInfo, h: HState, hidx: int) -> VmFault:
    """A write to a read-only huge entry: reuse or copy (``hugetlb_wp``)."""
    vma = vmf.vma
    e = vmf.orig_pte
    if e & _PAGE_UFFD_WP and vma.vm_flags & VM_UFFD_WP:
        return handle_userfault(vmf, VM_UFFD_WP)
    if not vma.vm_flags & VM_WRITE:
        return VmFault.SIGSEGV
    haddr = vmf.address
    old = mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
    mkwrite = _PAGE_RW | _PAGE_DIRTY | _PAGE_ACCESSED | _PAGE_SOFT_DIRTY
    if vma.vm_flags & VM_SHARED:
        old.set(PG.dirty)
        _set_huge_entry(mm, haddr, h, lambda i: (e + (i << (PAGE_SHIFT + 9))) | mkwrite)
        mm.tlb.flush_range(haddr, haddr + h.size)
        return VmFault.NONE
    if old.flags & PG.anon and (old.flags & PG.anon_exclusive or
                                old.mapcount == old.refcount == _huge_pmds(h)):
        old.flags |= PG.anon_exclusive
        _set_huge_entry(mm, haddr, h,
                        lambda i: (e + (i << (PAGE_SHIFT + 9))) & ~_PAGE_UFFD_WP | mkwrite)
        mm.tlb.flush_range(haddr, haddr + h.size)
        mm.stats_wp_reuse += 1
        return VmFault.NONE
    from_cache = not old.flags & PG.anon
    new = _alloc_for(vma, h, hidx, allow_resv=from_cache)
    if new is None and not from_cache and isinstance(vma.vm_private_data, ResvMap):
        # the owner of the reservation takes the page back from its children
        unmap_ref_private(mm, vma, old, haddr)
        if old.mapcount == old.refcount == _huge_pmds(h):
            old.flags |= PG.anon_exclusive
            _set_huge_entry(mm, haddr, h, lambda i: (e + (i << (PAGE_SHIFT + 9))) | mkwrite)
            mm.tlb.flush_range(haddr, haddr + h.size)
            return VmFault.NONE
    if new is None:
        return VmFault.SIGBUS
    new.data[:] = old.data
    av = anon_vma_prepare(vma)
    new.flags |= PG.anon | PG.anon_exclusive | PG.swapbacked | PG.dirty
    new.mapping = av
    new.index = vma.vm_pgoff + ((haddr - vma.vm_start) >> PAGE_SHIFT)
    new.refcount = 0
    _unmap_folio(mm, vma, haddr, old)
    _map_folio(mm, vma, haddr, new, make_huge_pte(vma, new, writable=True, dirty=True))
    mm.stats_cow += 1
    return VmFault.NONE


def hugetlb_unshare(mm: MmStruct, vma: Vma, address: int) -> None:
    """Unshare the private huge page at ``address`` for a read-only pin (``hugetlb_wp`` with
    FAULT_FLAG_UNSHARE): reuse it if nobody else maps it, else copy it into a new page from
    the pool mapped read-only, keeping the uffd-wp bit; ENOMEM when the pool is empty."""
    h = hstate_vma(vma)
    haddr = address & h.mask
    _pmd, e = _entry_at(mm, haddr)
    old = mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
    n = _huge_pmds(h)
    if old.flags & PG.anon and (old.flags & PG.anon_exclusive or
                                old.mapcount == old.refcount == n):
        old.flags |= PG.anon_exclusive
        return
    hidx = (vma.vm_pgoff >> h.order) + ((haddr - vma.vm_start) >> (PAGE_SHIFT + h.order))
    new = _alloc_for(vma, h, hidx, allow_resv=not old.flags & PG.anon)
    if new is None:
        raise_errno(errno.ENOMEM)
    new.data[:] = old.data
    new.flags |= PG.anon | PG.anon_exclusive | PG.swapbacked | PG.dirty
    new.mapping = anon_vma_prepare(vma)
    new.index = vma.vm_pgoff + ((haddr - vma.vm_start) >> PAGE_SHIFT)
    new.refcount = 0
    _unmap_folio(mm, vma, haddr, old)
    _map_folio(mm, vma, haddr, new,
               make_huge_pte(vma, new, writable=False, dirty=False) | (e & _PAGE_UFFD_WP))
    mm.stats_cow += 1


def _mms_of(phys: PhysMem) -> list[Any]:
    return list(phys.mms)


def unmap_ref_private(mm: MmStruct, vma: Vma, folio: Folio, haddr: int) -> None:
    """Unmap ``folio`` from every other private mapping of the file (``unmap_ref_private``).

    Those VMAs are marked so that their next fault there gets SIGBUS.
    """
    inode: HugetlbInode = vma.vm_file
    pgoff = vma.vm_pgoff + ((haddr - vma.vm_start) >> PAGE_SHIFT)
    for other in list(inode.i_mmap):
        if other is vma or other.vm_flags & VM_MAYSHARE:
            continue
        addr = other.vm_start + ((pgoff - other.vm_pgoff) << PAGE_SHIFT)
        if not other.vm_start <= addr < other.vm_end:
            continue
        for omm in _mms_of(mm.phys):
            if omm.vmas.vma_lookup(addr) is not other:
                continue
            _pmd, e = _entry_at(omm, addr)
            if e & _PAGE_PRESENT and (e & PTE_PFN_MASK) >> PAGE_SHIFT == folio.pfn:
                _unmap_folio(omm, other, addr, folio)
                if other.vm_private_data is None:
                    other.vm_private_data = ResvMap(inode, unmapped=True)


# -- zap, fork, mprotect -------------------------------------------------------------


def unmap_hugepage_range(mm: MmStruct, vma: Vma, start: int, end: int,
                         keep_wp_marker: bool) -> None:
    """Unmap the huge pages of ``[start, end)`` (``__unmap_hugepage_range``); start/end aligned.

    ``keep_wp_marker`` is the absence of ``ZAP_FLAG_DROP_MARKER``: a zap that
    leaves the mapping in place (MADV_DONTNEED, a hole punch) turns a uffd-wp
    protected entry, present or already a marker, into a uffd-wp pte marker
    at the huge entry, so the protection outlives the page; munmap, exit and
    truncate drop markers. A poison marker is always cleared. hugetlb has no
    anonymous exception here: private mappings keep their markers too.
    """
    h = hstate_vma(vma)
    addr = start & h.mask
    while addr < end:
        _pmd, e = _entry_at(mm, addr)
        if e & (_PAGE_PRESENT | _PAGE_PROTNONE):
            folio = mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
            if e & _PAGE_DIRTY:
                folio.set(PG.dirty)
            _unmap_folio(mm, vma, addr, folio)
            if e & _PAGE_UFFD_WP and keep_wp_marker:  # huge_pte_uffd_wp(pte)
                _set_huge_entry(mm, addr, h, lambda i: UFFD_WP_MARKER)
        elif e and not (keep_wp_marker and is_uffd_wp_marker(e)):  # pte_swp_uffd_wp_any
            _set_huge_entry(mm, addr, h, lambda i: 0)  # huge_pte_clear
        addr += h.size
    mm.tlb.flush_range(start, end)


def copy_hugetlb_page_range(src: MmStruct, dst: MmStruct, src_vma: Vma, dst_vma: Vma,
                            keep_uffd_wp: bool) -> None:
    """Share the huge pages with the child at fork (``copy_hugetlb_page_range``)."""
    h = hstate_vma(src_vma)
    cow = (src_vma.vm_flags & (VM_SHARED | VM_MAYWRITE)) == VM_MAYWRITE
    for addr in range(src_vma.vm_start, src_vma.vm_end, h.size):
        _pmd, e = _entry_at(src, addr)
        if not e & (_PAGE_PRESENT | _PAGE_PROTNONE):
            # hwpoison entries and poison markers always, uffd-wp only into a uffd-wp child VMA
            if is_poisoned_marker(e) or is_hwpoison_entry(e) or \
                    (keep_uffd_wp and is_uffd_wp_marker(e)):
                _set_huge_entry(dst, addr, h, lambda i, m=e: m)
            continue
        folio = src.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
        if folio.flags & PG.anon and folio.pincount and folio.flags & PG.anon_exclusive:
            _copy_pinned_huge_page(dst, dst_vma, h, addr, folio, e, keep_uffd_wp)
            continue
        folio.flags &= ~PG.anon_exclusive
        if cow and e & _PAGE_RW:
            e &= ~_PAGE_RW
            base = e
            _set_huge_entry(src, addr, h, lambda i, b=base: b + (i << (PAGE_SHIFT + 9)))
        child = e & ~_PAGE_ACCESSED
        if not keep_uffd_wp:
            child &= ~_PAGE_UFFD_WP
        _map_folio(dst, dst_vma, addr, folio, child)
    src.tlb.flush_range(src_vma.vm_start, src_vma.vm_end)


def _copy_pinned_huge_page(dst: MmStruct, dst_vma: Vma, h: HState, addr: int, folio: Folio,
                           e: int, keep_uffd_wp: bool) -> None:
    """A pinned exclusive huge page is copied for the child at fork, the parent keeping its
    own (``copy_hugetlb_page_range`` -> ``hugetlb_install_folio``); ENOMEM if the pool is empty."""
    hidx = (dst_vma.vm_pgoff >> h.order) + ((addr - dst_vma.vm_start) >> (PAGE_SHIFT + h.order))
    new = _alloc_for(dst_vma, h, hidx, allow_resv=False)
    if new is None:
        raise_errno(errno.ENOMEM)
    new.data[:] = folio.data
    new.flags |= PG.anon | PG.anon_exclusive | PG.swapbacked | PG.dirty
    new.mapping = anon_vma_prepare(dst_vma)
    new.index = dst_vma.vm_pgoff + ((addr - dst_vma.vm_start) >> PAGE_SHIFT)
    new.refcount = 0
    entry = make_huge_pte(dst_vma, new, writable=True, dirty=True)
    if keep_uffd_wp and e & _PAGE_UFFD_WP:
        entry = (entry | _PAGE_UFFD_WP) & ~_PAGE_RW
    _map_folio(dst, dst_vma, addr, new, entry)


def hugetlb_change_protection(mm: MmStruct, vma: Vma, start: int, end: int) -> None:
    """New protection for the huge entries of ``[start, end)`` (``hugetlb_change_protection``)."""
    h = hstate_vma(vma)
    prot = vm_get_page_prot(vma.vm_flags)
    keep = PTE_PFN_MASK | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_SOFT_DIRTY | _PAGE_UFFD_WP | \
        _PAGE_PSE
    shared_w = vma.vm_flags & VM_SHARED and vma.vm_flags & VM_WRITE
    for addr in range(start & h.mask, end, h.size):
        _pmd, e = _entry_at(mm, addr)
        if not e & (_PAGE_PRESENT | _PAGE_PROTNONE):
            continue
        new = (e & keep) | prot
        folio = mm.phys.mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
        if (shared_w and e & _PAGE_DIRTY or vma.vm_flags & VM_WRITE and
                folio.flags & PG.anon_exclusive) and not new & _PAGE_UFFD_WP:
            new |= _PAGE_RW
        _set_huge_entry(mm, addr, h, lambda i, b=new: b + (i << (PAGE_SHIFT + 9)))
    mm.tlb.flush_range(start, end)


def memfd_hugetlb_setup(phys: PhysMem, name: str, flags: int) -> HugetlbInode:
    """The inode behind ``memfd_create(name, MFD_HUGETLB | MFD_HUGE_*)`` (size 0)."""
    pool = hugetlb_pool(phys)
    h = pool.hstate_sizelog((flags >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK)  # MFD_HUGE_SHIFT == 26
    if h is None:  # hugetlb_file_setup finds no hstate
        raise_errno(errno.ENODEV, "unsupported MFD_HUGE_* size")
    return HugetlbInode(pool, h, 0, f"memfd:{name}", anon=False)


# -- userfaultfd: UFFDIO_COPY / CONTINUE / POISON into hugetlb ----------------------------


def mfill_atomic_hugetlb(ctx: Any, vma: Vma, dst: int, src: int, length: int, mode: Any,
                         wp: bool) -> int:
    """Fill whole huge pages of a hugetlb VMA (``mfill_atomic_hugetlb``); returns bytes done.

    ``dst`` and ``length`` must be huge-aligned (EINVAL). COPY takes a page
    from the pool and copies ``src``; CONTINUE maps the page cache's page
    (EFAULT if absent); POISON installs a poison marker. A populated entry is
    EEXIST, and so is an empty pool on 6.18 (``hugetlb_mfill_atomic_pte``: an
    allocation failure with the huge PTE slot present reads as a racing fill),
    before the source is read.
    """
    from vmemu.mmu.gup import access_user
    from vmemu.mmu.pgtable import POISON_MARKER
    from vmemu.uffd.mfill import MfillError, MfillMode

    h = hstate_vma(vma)
    if dst & ~h.mask or length & ~h.mask:
        raise MfillError(errno.EINVAL)
    mm = ctx.mm
    done = 0

    def locked_vma() -> Vma:
        vma2 = mm.vmas.vma_lookup(dst)
        if vma2 is None or not vma2.vm_flags & VM_HUGETLB or \
                dst + length > vma2.vm_end or vma2.vm_userfaultfd_ctx is None:
            raise MfillError(errno.ENOENT)
        if wp and not vma2.vm_flags & VM_UFFD_WP:
            raise MfillError(errno.EINVAL)
        return vma2

    while done < length:
        addr = dst + done
        try:
            data = None
            if mode is MfillMode.COPY:
                # the PTE (EEXIST) and page cache (EEXIST) checks come before the source is
                # read: the kernel copies under the locks with page faults disabled, and only
                # when that fails drops them, copies with faults (EFAULT) and tries again
                with mm.lock:
                    _mfill_one(mm, locked_vma(), h, addr, mode, wp, None, MfillError,
                               MfillMode, POISON_MARKER, check_only=True)
                try:
                    data = access_user(mm, src + done, h.size, False)
                except OSError as e:
                    raise MfillError(e.errno or errno.EFAULT) from None
            with mm.lock:
                _mfill_one(mm, locked_vma(), h, addr, mode, wp, data, MfillError, MfillMode,
                           POISON_MARKER)
        except MfillError:
            if done:
                return done
            raise
        done += h.size
    return done


def _mfill_one(mm: MmStruct, vma: Vma, h: HState, haddr: int, mode: Any, wp: bool,
               data: bytes | None, err: Any, modes: Any, poison: int,
               check_only: bool = False) -> None:
    inode: HugetlbInode = vma.vm_file
    hidx = (vma.vm_pgoff >> h.order) + ((haddr - vma.vm_start) >> (PAGE_SHIFT + h.order))
    _pmd, e = _entry_at(mm, haddr)
    # COPY and CONTINUE may overwrite a marker, uffd-wp or poison (huge_pte_none_mostly);
    # POISON wants a truly empty entry (huge_pte_none). CONTINUE looks the page cache up
    # first: no page there is EFAULT even over a present entry (a private COW page).
    if (e & (_PAGE_PRESENT | _PAGE_PROTNONE) and mode is not modes.CONTINUE) or \
            (e and mode is modes.POISON):
        raise err(errno.EEXIST)
    shared = bool(vma.vm_flags & VM_SHARED)
    if mode is modes.POISON:
        _set_huge_entry(mm, haddr, h, lambda i: poison)
        return
    if hidx >= inode.nr_huge_size and (shared or mode is modes.CONTINUE):
        raise err(errno.EFAULT)
    if mode is modes.CONTINUE:
        folio = inode.huge.get(hidx)
        if folio is None:
            raise err(errno.EFAULT)
        if e & (_PAGE_PRESENT | _PAGE_PROTNONE):
            raise err(errno.EEXIST)
        writable = shared and not wp
    elif shared:
        if hidx in inode.huge:
            raise err(errno.EEXIST)
        if check_only:
            if not inode.pool.can_dequeue(h, hidx in inode.resv_pending):
                raise err(errno.EEXIST)
            return
        folio = inode.get_huge_folio(hidx)
        if folio is None:
            raise err(errno.EEXIST)
        if data is not None:
            folio.data[:] = data
        folio.set(PG.dirty)
        writable = not wp
    else:
        if check_only:
            resv = vma.vm_private_data
            if not inode.pool.can_dequeue(
                    h, isinstance(resv, ResvMap) and hidx in resv.reserved):
                raise err(errno.EEXIST)
            return
        folio = _alloc_for(vma, h, hidx, True)
        if folio is None:
            raise err(errno.EEXIST)
        if data is not None:
            folio.data[:] = data
        folio.flags |= PG.anon | PG.anon_exclusive | PG.swapbacked | PG.dirty
        folio.mapping = anon_vma_prepare(vma)
        folio.index = vma.vm_pgoff + ((haddr - vma.vm_start) >> PAGE_SHIFT)
        folio.refcount = 0
        writable = not wp
    entry = make_huge_pte(vma, folio, writable=writable, dirty=True)
    if wp:
        entry |= _PAGE_UFFD_WP
    _map_folio(mm, vma, haddr, folio, entry)
