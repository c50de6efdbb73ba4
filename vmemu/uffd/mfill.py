"""Resolving faults by filling pages: COPY, ZEROPAGE, CONTINUE, POISON (``mm/userfaultfd.c``).

All four go through ``mfill_atomic``: find the destination VMA (the whole
range must sit in one registered VMA, else ENOENT), then page by page
prepare the page and install it with ``mfill_atomic_install_pte``, which
refuses (EEXIST) a PTE that is not empty - a pte marker (uffd-wp or
poison) counts as empty (``pte_none_mostly``) except for ZEROPAGE and
POISON, which want ``pte_none``. The call
returns the bytes done; the ioctl layer turns a short count into EAGAIN.

COPY reads its source *before* looking at the destination, like the
kernel's ``copy_from_user`` into a fresh folio: a source that is itself a
registered missing page takes a userfault (the ioctl sleeps), a source in a
hole is EFAULT.

Ranges are filled a PTE table at a time where nothing unusual happens
(``_mfill_run``): the entries of one table are checked with a slice, the
new folios come from one bulk allocation, and the PTEs go in with one slice
assignment and one TLB flush - what the kernel's loop does page by page,
with the same result. The first page the run cannot do (an occupied entry,
a source that is not mapped, a page not in the page cache, the memory
limit) goes through the page-by-page path, which raises the kernel's errno
for it, so partial progress and errors are exactly those of the page loop.
"""

from __future__ import annotations

import enum
import errno
from typing import TYPE_CHECKING, Any

from vmemu.constants import PAGE_SHIFT, PAGE_SIZE
from vmemu.mmu.folio import PG
from vmemu.mmu.gup import access_user
from vmemu.mmu.memory import anon_vma_prepare, vm_get_page_prot
from vmemu.mmu.pgtable import (
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_UFFD_WP,
    POISON_MARKER,
    PTE_PFN_MASK,
    is_pte_marker,
)
from vmemu.mmu.vma import VM_HUGETLB, VM_SHARED, VM_UFFD_WP, VM_WRITE, Vma

if TYPE_CHECKING:
    from vmemu.uffd.ctx import Userfaultfd

# Flags of a new anonymous folio, computed once: IntFlag's ``|`` is a Python-level call.
_NEW_ANON_FOLIO_FLAGS = PG.anon | PG.anon_exclusive | PG.swapbacked | PG.uptodate | PG.dirty
_ANON_FLAGS_INT = int(_NEW_ANON_FOLIO_FLAGS)  # the same flags as a plain int: & and | stay in C
# a folio's flags may be a PG, whose & is a Python call: test the bit by shifting
_HWPOISON_SHIFT = PG.hwpoison.bit_length() - 1
_PAGE_LOW = PAGE_SIZE - 1
_PG_HWPOISON = int(PG.hwpoison)
# vm_get_page_prot by vm_flags, filled on first use (a VMA's flags take few values)
_PROT: dict[int, int] = {}


class MfillMode(enum.Enum):
    """What ``mfill_atomic`` installs (``enum mfill_atomic_mode``)."""

    COPY = "copy"
    ZEROPAGE = "zeropage"
    CONTINUE = "continue"
    POISON = "poison"


class MfillError(Exception):
    """A per-page failure inside ``mfill_atomic``; carries the errno."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def _pte_slot(mm: Any, addr: int) -> tuple[list[int], int]:
    """The PTE table and index for ``addr``, allocating tables; EEXIST under a huge PMD."""
    pmd = mm.pgtables.pmd_table(addr, True)
    me = pmd[(addr >> 21) & 511]
    if me & _PAGE_PSE:
        raise MfillError(errno.EEXIST)
    table = mm.pgtables.pte_table(addr, True)
    if table is None:
        raise MfillError(errno.EEXIST)
    return table, (addr >> PAGE_SHIFT) & 511


def install_pte(mm: Any, vma: Vma, addr: int, folio: Any, in_cache: bool, wp: bool) -> None:
    """Map ``folio`` at ``addr`` if the PTE is empty (``mfill_atomic_install_pte``)."""
    table = mm.pgtables.pte_table(addr, True)  # _pte_slot, inlined: it runs for every page
    if table is None:
        raise MfillError(errno.EEXIST)
    idx = (addr >> PAGE_SHIFT) & 511
    cur = table[idx]
    if cur and not is_pte_marker(cur):  # pte_none_mostly: uffd-wp and poison markers
        raise MfillError(errno.EEXIST)
    vm_flags = vma.vm_flags
    prot = _PROT.get(vm_flags)
    if prot is None:
        prot = _PROT[vm_flags] = vm_get_page_prot(vm_flags)
    pte = (folio.pfn << PAGE_SHIFT) | prot | _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    writable = bool(vm_flags & VM_WRITE)
    if in_cache and not vm_flags & VM_SHARED:
        writable = False
    pte = pte | _PAGE_RW if writable else pte & ~_PAGE_RW
    if wp:
        pte = (pte | _PAGE_UFFD_WP) & ~_PAGE_RW
    folio.mapcount += 1
    if in_cache:
        folio.refcount += 1
    table[idx] = pte
    mm.tlb.flush_page(addr)


def _new_anon_folio(mm: Any, vma: Vma, addr: int, data: Any) -> Any:
    folio = mm.phys.alloc_folio(0, data is None)  # zero-filled unless the copy fills it
    if folio is None:
        raise MfillError(errno.ENOMEM)
    if data is not None:
        folio.data[:] = data
    folio.flags = _NEW_ANON_FOLIO_FLAGS
    folio.mapping = vma.anon_vma or anon_vma_prepare(vma)
    folio.index = vma.vm_pgoff + ((addr - vma.vm_start) >> PAGE_SHIFT)  # linear_page_index
    folio.mapcount = 0
    return folio


def _put_unmapped(mm: Any, folio: Any) -> None:
    folio.mapcount = 0
    mm.phys.folio_put(folio)


def mfill_pte(ctx: Userfaultfd, vma: Vma, addr: int, mode: MfillMode, wp: bool,
              data: Any) -> None:
    """Fill one page (``mfill_atomic_pte``)."""
    mm = ctx.mm
    shared = bool(vma.vm_flags & VM_SHARED)
    inode = vma.vm_file
    if mode is MfillMode.CONTINUE:
        index = vma.linear_page_index(addr)
        if index >= inode.nr_pages_size:
            raise MfillError(errno.EINVAL)
        folio = inode.find_folio(index)
        if folio is None:
            raise MfillError(errno.EFAULT)
        if int(folio.flags) & _PG_HWPOISON:  # (IntFlag's & is a Python call)
            raise MfillError(errno.EIO)
        install_pte(mm, vma, addr, folio, True, wp)
        return
    if mode is MfillMode.POISON:
        table, idx = _pte_slot(mm, addr)
        if inode is not None and vma.linear_page_index(addr) >= inode.nr_pages_size:
            raise MfillError(errno.EFAULT)
        if table[idx]:
            raise MfillError(errno.EEXIST)
        table[idx] = POISON_MARKER
        mm.tlb.flush_page(addr)
        return
    if inode is None or not shared:
        if mode is MfillMode.ZEROPAGE:
            table, idx = _pte_slot(mm, addr)
            if table[idx]:
                raise MfillError(errno.EEXIST)
            table[idx] = (mm.phys.zero_pfn << PAGE_SHIFT) | vm_get_page_prot(vma.vm_flags) \
                | _PAGE_SPECIAL
            return
        folio = _new_anon_folio(mm, vma, addr, data)
        try:
            install_pte(mm, vma, addr, folio, False, wp)
        except MfillError:
            _put_unmapped(mm, folio)
            raise
        return
    # shared shmem: the new page goes into the page cache (shmem_mfill_atomic_pte)
    index = vma.linear_page_index(addr)
    if index >= inode.nr_pages_size:
        raise MfillError(errno.EFAULT)
    if inode.find_folio(index) is not None:
        raise MfillError(errno.EEXIST)
    folio = inode.get_folio(index)
    if folio is None:
        raise MfillError(errno.ENOMEM)
    if data is not None:
        folio.data[:] = data
    folio.flags |= PG.dirty
    try:
        install_pte(mm, vma, addr, folio, True, wp)
    except MfillError:
        inode.remove_folio(index)
        raise


def copy_from_user_nofault(mm: Any, src: int) -> Any:
    """The data of the 4 KiB source page at ``src`` if it is mapped now, else None.

    ``copy_from_user`` with page faults disabled, as ``mfill_atomic_pte_copy``
    first tries under the mm lock: a TLB hit, or a present PTE found by a
    walk that allocates nothing, gives the page's buffer, which the caller
    copies before dropping the lock; anything else (no table, a huge leaf,
    a swap entry, an unaligned source) is left to the faulting path.
    """
    if src & (PAGE_SIZE - 1):
        return None
    buf = mm.tlb.r.get(src >> PAGE_SHIFT)
    if buf is None:
        table = mm.pgtables.pte_table(src, False)
        if table is None:
            return None
        pte = table[(src >> PAGE_SHIFT) & 511]
        if not pte & _PAGE_PRESENT:
            return None
        pfn = (pte & PTE_PFN_MASK) >> PAGE_SHIFT
        buf = mm.phys.mem_map[pfn].page_buffer(pfn)
    return buf


def _run_table(mm: Any, addr: int, npages: int) -> tuple[list[int] | None, int, int]:
    """The PTE table under ``addr`` and the index range ``[lo, hi)`` a run may fill.

    Allocates missing tables, as ``mm_alloc_pmd`` + ``pte_alloc`` do; gives
    ``(None, 0, 0)`` under a huge or non-present PMD leaf, which the page
    path turns into EEXIST.
    """
    pgtables = mm.pgtables
    pmd = pgtables.pmd_table(addr, True)
    me = pmd[(addr >> 21) & 511]
    if me and (me & _PAGE_PSE or not me & _PAGE_PRESENT):
        return None, 0, 0
    table = pgtables.pte_table(addr, True)
    if table is None:
        return None, 0, 0
    lo = (addr >> PAGE_SHIFT) & 511
    return table, lo, min(512, lo + npages)


def _none_prefix(table: list[int], lo: int, hi: int, markers_ok: bool) -> int:
    """How many entries from ``lo`` are empty: ``pte_none`` (or ``pte_none_mostly``)."""
    if not any(table[lo:hi]):
        return hi - lo
    for i in range(lo, hi):
        cur = table[i]
        if cur and not (markers_ok and is_pte_marker(cur)):
            return i - lo
    return hi - lo


def _install_prot(vma: Vma, in_cache: bool, wp: bool) -> int:
    """The PTE bits ``mfill_atomic_install_pte`` gives a new page, without its pfn."""
    pte = vm_get_page_prot(vma.vm_flags) | _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    writable = bool(vma.vm_flags & VM_WRITE)
    if in_cache and not vma.vm_flags & VM_SHARED:
        writable = False
    pte = pte | _PAGE_RW if writable else pte & ~_PAGE_RW
    if wp:
        pte = (pte | _PAGE_UFFD_WP) & ~_PAGE_RW
    return pte


def _zeropage_run(mm: Any, vma: Vma, table: list[int], lo: int, hi: int) -> int:
    """Map the zero page into the empty entries ``[lo, ...)`` (``mfill_atomic_pte_zeropage``)."""
    n = _none_prefix(table, lo, hi, False)
    if n:
        pte = (mm.phys.zero_pfn << PAGE_SHIFT) | vm_get_page_prot(vma.vm_flags) | _PAGE_SPECIAL
        table[lo:lo + n] = [pte] * n
    return n


def _continue_run(mm: Any, vma: Vma, addr: int, table: list[int], lo: int, hi: int,
                  wp: bool) -> int:
    """Map page-cache pages into ``[lo, ...)`` (``mfill_atomic_pte_continue``)."""
    inode = vma.vm_file
    pages = inode.pages
    index = vma.linear_page_index(addr)
    limit = inode.nr_pages_size
    prot = _install_prot(vma, True, wp)
    shift = _HWPOISON_SHIFT
    i = lo
    while i < hi:
        cur = table[i]
        if cur and not is_pte_marker(cur):
            break
        if index >= limit:
            break
        folio = pages.get(index)
        if folio is None or folio.flags >> shift & 1 or folio.order:
            break
        folio.mapcount += 1
        folio.refcount += 1
        table[i] = (folio.pfn << PAGE_SHIFT) | prot
        i += 1
        index += 1
    n = i - lo
    if n:
        mm.tlb.flush_range(addr, addr + (n << PAGE_SHIFT))
    return n


def _copy_run(mm: Any, vma: Vma, addr: int, src: int, table: list[int], lo: int,
              hi: int, wp: bool) -> int:
    """Copy mapped source pages into new anonymous folios at ``[lo, ...)`` (``mfill_atomic_pte_copy``).

    The sources are read first, each with faults disabled
    (:func:`copy_from_user_nofault`); the run stops before the first source
    that is not mapped, the first destination that is not empty, or where
    the memory limit would need reclaim to make room.
    """
    if src & (PAGE_SIZE - 1):
        return 0
    m = _none_prefix(table, lo, hi, True)  # no use reading sources past an occupied entry
    phys = mm.phys
    if phys.limit_pages is not None:  # only what fits: the page path reclaims or fails
        m = min(m, phys.limit_pages - phys.pages_in_use)
    bufs = []
    tlb_r = mm.tlb.r
    vpn = src >> PAGE_SHIFT
    for i in range(m):
        buf = tlb_r.get(vpn + i)
        if buf is None:
            buf = copy_from_user_nofault(mm, src + (i << PAGE_SHIFT))
            if buf is None:
                break
        bufs.append(buf)
    n = len(bufs)
    if not n:
        return 0
    folios = phys.alloc_folios_bulk([bytearray(b) for b in bufs], _ANON_FLAGS_INT,
                                    anon_vma_prepare(vma), vma.linear_page_index(addr), 1)
    prot = _install_prot(vma, False, wp)
    table[lo:lo + n] = [(f.pfn << PAGE_SHIFT) | prot for f in folios]
    mm.tlb.flush_range(addr, addr + (n << PAGE_SHIFT))
    return n


def _mfill_run(ctx: Userfaultfd, vma: Vma, dst: int, src: int, length: int,
               mode: MfillMode, wp: bool) -> int:
    """Fill as many pages as one PTE table allows in one go; returns the bytes done (maybe 0).

    Covers the common cases - COPY and ZEROPAGE into private memory,
    CONTINUE - and leaves the rest (shared shmem COPY/ZEROPAGE, POISON)
    and every page that would fail to :func:`mfill_pte`.
    """
    mm = ctx.mm
    inode = vma.vm_file
    if mode is MfillMode.POISON or (mode is not MfillMode.CONTINUE and inode is not None and
                                    vma.vm_flags & VM_SHARED):
        return 0
    table, lo, hi = _run_table(mm, dst, length >> PAGE_SHIFT)
    if table is None:
        return 0
    if mode is MfillMode.ZEROPAGE:
        n = _zeropage_run(mm, vma, table, lo, hi)
    elif mode is MfillMode.CONTINUE:
        n = _continue_run(mm, vma, dst, table, lo, hi, wp)
    else:
        n = _copy_run(mm, vma, dst, src, table, lo, hi, wp)
    return n << PAGE_SHIFT


def mfill_atomic(ctx: Userfaultfd, dst: int, src: int, length: int, mode: MfillMode,
                 wp: bool) -> int:
    """Fill ``[dst, dst+len)``; returns bytes done or raises ``MfillError`` (``mfill_atomic``).

    A hugetlb destination goes to ``mfill_atomic_hugetlb`` (ZEROPAGE there
    is EINVAL: there is no huge zero page). Otherwise the destination VMA
    is checked, and pages are filled a run at a time (:func:`_mfill_run`)
    with the mm lock held. A page the run cannot do goes alone: for COPY,
    the source page is read - copied with the lock held when it is mapped,
    else, as the kernel's ``-ENOENT`` retry does, with the lock dropped and
    faults enabled, after which the VMA is looked up again (it may have
    changed while a source userfault slept) - and the page installed or
    its error raised.
    """
    mm = ctx.mm
    copy = mode is MfillMode.COPY
    done = 0
    hugetlb = None
    while done < length:
        addr = dst + done
        data = None
        try:
            with mm.lock:
                vma = mm.vmas.vma_lookup(dst)
                if not done and vma is not None and vma.vm_flags & VM_HUGETLB:
                    _check_hugetlb_dst(ctx, vma, dst, length, wp)
                    hugetlb = vma
                    if vma.anon_vma is None and not vma.vm_flags & VM_SHARED:
                        anon_vma_prepare(vma)  # as in _check_dst_vma
                    break
                _check_dst_vma(ctx, vma, dst, length, mode, wp)
                assert vma is not None
                n = _mfill_run(ctx, vma, addr, src + done, length - done, mode, wp)
                if n:
                    done += n
                    continue
                if copy:
                    data = copy_from_user_nofault(mm, src + done)
                if not copy or data is not None:
                    mfill_pte(ctx, vma, addr, mode, wp, data)
                    done += PAGE_SIZE
                    continue
            try:
                data = access_user(mm, src + done, PAGE_SIZE, False)
            except OSError as e:
                raise MfillError(e.errno or errno.EFAULT) from None
            with mm.lock:
                vma = _dst_vma(ctx, dst, length, mode, wp)
                mfill_pte(ctx, vma, addr, mode, wp, data)
        except MfillError:
            if done:
                return done
            raise
        done += PAGE_SIZE
    if hugetlb is not None:
        if mode is MfillMode.ZEROPAGE:
            raise MfillError(errno.EINVAL)  # there is no huge zero page to map
        return int(ctx.kernel.mfill_atomic_hugetlb(ctx, hugetlb, dst, src, length, mode, wp))
    return done


def _dst_vma(ctx: Userfaultfd, dst: int, length: int, mode: MfillMode, wp: bool) -> Vma:
    """Find and check the destination VMA (``uffd_mfill_lock`` + the mfill_atomic checks)."""
    vma = ctx.mm.vmas.vma_lookup(dst)
    _check_dst_vma(ctx, vma, dst, length, mode, wp)
    assert vma is not None
    return vma


def _check_hugetlb_dst(ctx: Userfaultfd, vma: Vma, dst: int, length: int, wp: bool) -> None:
    """What ``mfill_atomic`` checks before handing a hugetlb VMA on: an unregistered or too
    short VMA is ENOENT, then EAGAIN, then EINVAL for MODE_WP without WP registration - all
    before ZEROPAGE's EINVAL and the huge-page alignment of ``mfill_atomic_hugetlb``."""
    if dst + length > vma.vm_end or vma.vm_userfaultfd_ctx is None:
        raise MfillError(errno.ENOENT)
    if ctx.mmap_changing:
        raise MfillError(errno.EAGAIN)
    if wp and not vma.vm_flags & VM_UFFD_WP:
        raise MfillError(errno.EINVAL)


def _check_dst_vma(ctx: Userfaultfd, vma: Vma | None, dst: int, length: int, mode: MfillMode,
                   wp: bool) -> None:
    """The mfill_atomic checks of the destination VMA: ENOENT, EAGAIN, EINVAL.

    The lookup (``uffd_lock_vma`` -> ``find_vma_and_prepare_anon``) gives a private VMA its
    anon_vma before any check, so even a failed call leaves it one (it then merges, and is
    copied at fork, as an anon VMA that had pages: a POISON marker survives fork).
    """
    if vma is not None and vma.anon_vma is None and not vma.vm_flags & VM_SHARED:
        anon_vma_prepare(vma)
    if vma is None or dst + length > vma.vm_end or vma.vm_userfaultfd_ctx is None:
        raise MfillError(errno.ENOENT)
    if ctx.mmap_changing:
        raise MfillError(errno.EAGAIN)
    if wp and not vma.vm_flags & VM_UFFD_WP:
        raise MfillError(errno.EINVAL)
    if vma.vm_flags & VM_HUGETLB:
        raise MfillError(errno.EINVAL)  # handled by mfill_atomic_hugetlb before we get here
    if mode is MfillMode.CONTINUE and vma.vm_file is None:
        raise MfillError(errno.EINVAL)


def mfill_atomic_page(ctx: Userfaultfd, dst: int, src: int, mode: MfillMode, wp: bool) -> int:
    """``mfill_atomic`` of exactly one 4 KiB page: what a fault handler's ioctl does.

    The same steps, checks and errors as the range path for ``len`` =
    4 KiB - a hugetlb destination goes to ``mfill_atomic_hugetlb``
    (ZEROPAGE there is EINVAL), the destination VMA is checked under the
    mm lock (``_dst_vma``, with the VMA already in hand), a COPY source is
    copied with the lock held when it is mapped and with faults enabled and
    the lock dropped otherwise - without the range loop around them.
    Returns the bytes done (4096) or raises ``MfillError``.
    """
    mm = ctx.mm
    with mm.lock:
        vma = mm.vmas.vma_lookup(dst)
        if vma is not None and vma.anon_vma is None and not vma.vm_flags & VM_SHARED:
            anon_vma_prepare(vma)  # as in _check_dst_vma
        hugetlb = vma is not None and vma.vm_flags & VM_HUGETLB
        if not hugetlb:
            if vma is None or dst + PAGE_SIZE > vma.vm_end or vma.vm_userfaultfd_ctx is None:
                raise MfillError(errno.ENOENT)
            if ctx.mmap_changing:
                raise MfillError(errno.EAGAIN)
            if wp and not vma.vm_flags & VM_UFFD_WP:
                raise MfillError(errno.EINVAL)
            if mode is MfillMode.COPY:
                data = None if src & _PAGE_LOW else mm.tlb.r.get(src >> PAGE_SHIFT)
                if data is None:  # not a TLB hit: walk the source's tables
                    data = copy_from_user_nofault(mm, src)
                if data is not None:
                    if vma.vm_file is None or not vma.vm_flags & VM_SHARED:
                        _copy_anon_page(mm, vma, dst, wp, data)
                    else:
                        mfill_pte(ctx, vma, dst, mode, wp, data)
                    return PAGE_SIZE
            else:
                if mode is MfillMode.CONTINUE and vma.vm_file is None:
                    raise MfillError(errno.EINVAL)
                mfill_pte(ctx, vma, dst, mode, wp, None)
                return PAGE_SIZE
    if hugetlb:
        assert vma is not None
        _check_hugetlb_dst(ctx, vma, dst, PAGE_SIZE, wp)
        if mode is MfillMode.ZEROPAGE:
            raise MfillError(errno.EINVAL)  # there is no huge zero page to map
        return int(ctx.kernel.mfill_atomic_hugetlb(ctx, vma, dst, src, PAGE_SIZE, mode, wp))
    try:  # the source is not mapped: copy it with faults enabled, the lock dropped
        data = access_user(mm, src, PAGE_SIZE, False)
    except OSError as e:
        raise MfillError(e.errno or errno.EFAULT) from None
    with mm.lock:
        vma = _dst_vma(ctx, dst, PAGE_SIZE, mode, wp)
        mfill_pte(ctx, vma, dst, mode, wp, data)
    return PAGE_SIZE


def _copy_anon_page(mm: Any, vma: Vma, addr: int, wp: bool, data: Any) -> None:
    """COPY of one page into private memory: ``mfill_pte`` -> ``_new_anon_folio`` ->
    ``install_pte`` written out in one frame (``mfill_atomic_pte_copy`` +
    ``mfill_atomic_install_pte``), in their order: the folio is allocated and
    filled first, then an occupied PTE gives it back and fails with EEXIST.
    """
    folio = mm.phys.alloc_folio(0, False)  # the copy fills it
    if folio is None:
        raise MfillError(errno.ENOMEM)
    folio.data[:] = data
    folio.flags = _NEW_ANON_FOLIO_FLAGS
    folio.mapping = vma.anon_vma or anon_vma_prepare(vma)
    folio.index = vma.vm_pgoff + ((addr - vma.vm_start) >> PAGE_SHIFT)  # linear_page_index
    # pte_table(addr, True), its common case inlined: the tables are there (a fault's walk
    # found them); a missing level or a huge PMD goes to the general walk
    pgt, mem_map, table = mm.pgtables, mm.phys.mem_map, None
    e = pgt.pgd[(addr >> 39) & 511]
    if e:
        e = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT][(addr >> 30) & 511]
        if e:
            e = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT][(addr >> 21) & 511]
            if e & _PAGE_PRESENT and not e & _PAGE_PSE:
                table = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
    if table is None:
        table = pgt.pte_table(addr, True)
    idx = (addr >> PAGE_SHIFT) & 511
    if table is None or (table[idx] and not is_pte_marker(table[idx])):  # pte_none_mostly
        _put_unmapped(mm, folio)
        raise MfillError(errno.EEXIST)
    vm_flags = vma.vm_flags
    prot = _PROT.get(vm_flags)
    if prot is None:
        prot = _PROT[vm_flags] = vm_get_page_prot(vm_flags)
    pte = (folio.pfn << PAGE_SHIFT) | prot | _PAGE_DIRTY | _PAGE_SOFT_DIRTY
    pte = pte | _PAGE_RW if vm_flags & VM_WRITE else pte & ~_PAGE_RW
    if wp:
        pte = (pte | _PAGE_UFFD_WP) & ~_PAGE_RW
    folio.mapcount = 1
    table[idx] = pte
    mm.tlb.flush_page(addr)
