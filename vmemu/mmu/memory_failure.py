"""Emulated memory failure: MADV_HWPOISON (``mm/memory-failure.c``, ``mm/madvise.c``).

``madvise(MADV_HWPOISON)`` is the kernel's software injector
(``madvise_inject_error``): it needs CAP_SYS_ADMIN (here
``Process.capable_sys_admin``, True by default; otherwise EPERM), takes
each page of the range with a read GUP (faulting it in like
``get_user_pages_fast``; a hole or PROT_NONE is EFAULT, an already poisoned
page EHWPOISON) and calls ``memory_failure`` on its frame, which

* marks the folio ``PG_hwpoison`` and keeps a reference on it forever
  (the frame is taken out of service; ``check()`` counts that reference);
* unmaps it from every mapping, found through rmap, replacing each PTE with
  a hwpoison swap entry ``swp_entry(SWP_HWPOISON, pfn)``
  (``try_to_unmap`` with ``TTU_HWPOISON``); a later access to any of them
  faults with ``VM_FAULT_HWPOISON`` and the task gets SIGBUS with si_code
  BUS_MCEERR_AR; the entry survives fork and mremap and is dropped by
  munmap/MADV_DONTNEED like any non-present entry;
* leaves a shmem folio in its page cache, poisoned, so a later fault on the
  same file offset (from any mapping) is VM_FAULT_HWPOISON too
  (``shmem_error_remove_folio``);
* sends the calling task SIGBUS (BUS_MCEERR_AR, at the first poisoned
  address it maps) when the page was dirty, as ``kill_procs`` does for
  MF_ACTION_REQUIRED: :func:`madvise_inject_error` finishes the whole
  range, then raises :class:`~vmemu.errors.Sigbus`. Other processes are
  not signalled (no early kill); they get SIGBUS when they touch the page.

A hugetlb page is poisoned whole (:func:`memory_failure_hugetlb`): its
mappings become hwpoison entries at the huge level, a hugetlbfs page stays
cached and poisoned, a private one is dissolved out of the pool. The
injector steps by the size of the folio it found (``madvise_inject_error``),
so a range over a THP or a huge page poisons its first page only.

Simplified: a THP is split first (``split_folio``) and EBUSY is returned
when it cannot be; 1 GiB pages are EBUSY; the shared zero page (a read GUP of an
unpopulated private page finds it) gives EBUSY without poisoning it (the
kernel poisons the zero page and returns EBUSY, ``me_kernel``); swap-cache
pages keep their swap cache. MADV_SOFT_OFFLINE and unpoison are not
emulated. The reference 6.18 kernel of this machine has
CONFIG_MEMORY_FAILURE=n (MADV_HWPOISON is EINVAL there); vmemu emulates a
kernel built with it.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from vmemu.constants import BUS_MCEERR_AR, PAGE_SHIFT, PAGE_SIZE
from vmemu.errors import Sigbus, raise_errno
from vmemu.mmu.folio import PG, Folio, PhysMem
from vmemu.mmu.gup import EHWPOISON, faultin_page
from vmemu.mmu.pgtable import (
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_SPECIAL,
    PTE_PFN_MASK,
    SWP_HWPOISON,
    swp_entry,
)
from vmemu.mmu.rmap import rmap_walk
from vmemu.mmu.vma import VM_READ

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct


def make_hwpoison_entry(pfn: int) -> int:
    """The non-present PTE that replaces a poisoned page's mapping (``make_hwpoison_entry``)."""
    return swp_entry(SWP_HWPOISON, pfn)


def _owner_map(phys: PhysMem) -> dict[int, Any]:
    return {id(v): mm for mm in phys.mms for v in mm.vmas}


def memory_failure(phys: PhysMem, pfn: int, current: MmStruct | None) -> int | None:
    """Take frame ``pfn`` out of service (``memory_failure``).

    Returns the address, in ``current``, at which the caller must get
    SIGBUS (BUS_MCEERR_AR), or None. Raises EHWPOISON if the frame is
    already poisoned and EBUSY for a frame it cannot handle.
    """
    folio = phys.mem_map[pfn]
    if not isinstance(folio, Folio) or folio.flags & PG.zero:
        raise_errno(errno.EBUSY, "not a user page (me_kernel)")
    if folio.test(PG.hwpoison):
        raise_errno(EHWPOISON, "page already poisoned")
    if folio.flags & PG.hugetlb:
        return memory_failure_hugetlb(phys, folio, pfn, current)
    if folio.order:
        from vmemu.mmu.huge_memory import split_folio

        if not split_folio(phys, folio, zero_unused=False):
            raise_errno(errno.EBUSY, "cannot split the large folio")
        folio = phys.mem_map[pfn]
        assert isinstance(folio, Folio) and folio.order == 0
    folio.set(PG.hwpoison)
    dirty = folio.test(PG.dirty)
    kill: int | None = None
    for hit in list(rmap_walk(folio, _owner_map(phys))):
        table = hit.mm.pgtables.pte_table(hit.address, False)
        assert table is not None, "a split folio is mapped by PTEs"
        idx = (hit.address >> PAGE_SHIFT) & 511
        if table[idx] & _PAGE_DIRTY:
            dirty = True
        table[idx] = make_hwpoison_entry(pfn)  # try_to_unmap_one, TTU_HWPOISON
        folio.mapcount -= 1
        folio.refcount -= 1
        hit.mm.tlb.flush_page(hit.address)
        if hit.mm is current and (kill is None or hit.address < kill):
            kill = hit.address
    # the reference GUP took (MF_COUNT_INCREASED) is never dropped: the frame is gone
    folio.refcount += 1
    return kill if dirty else None


def memory_failure_hugetlb(phys: PhysMem, folio: Folio, pfn: int,
                           current: MmStruct | None) -> int | None:
    """A raw page of a hugetlb page fails (``try_memory_failure_hugetlb``).

    The whole huge page is poisoned (``folio_set_hugetlb_hwpoison``; the
    raw page is remembered, ``raw_hwp_list``) and every mapping of it
    becomes a hwpoison entry at the huge level (``hwpoison_user_mappings``).
    A hugetlbfs page stays in its page cache, poisoned
    (``hugetlbfs_error_remove_folio``): faults of it are
    VM_FAULT_HWPOISON_LARGE, ``pread`` stops at the raw page. A private
    (anonymous) huge page is dissolved (``me_huge_page`` ->
    ``__page_handle_poison``): it leaves the pool, ``nr_hugepages`` drops by
    one. The caller is signalled at the raw page's address when the page was
    dirty. Simplified: 1 GiB pages are EBUSY.
    """
    from vmemu.mmu.hugetlb import (
        _entry_at,
        _set_huge_entry,
        _unmap_folio,
        hstate_vma,
        hugetlb_pool,
    )

    if folio.order != 9:
        raise_errno(errno.EBUSY, "memory failure of a 1 GiB page is not emulated")
    pool = hugetlb_pool(phys)
    folio.set(PG.hwpoison)
    pool.raw_hwpoison.add(pfn)
    folio.refcount += 1  # the GUP reference (MF_COUNT_INCREASED): kept, the page is gone
    dirty = folio.test(PG.dirty)
    kill: int | None = None
    for hit in list(rmap_walk(folio, _owner_map(phys))):
        _pmd, e = _entry_at(hit.mm, hit.address)
        if e & _PAGE_DIRTY:
            dirty = True
        _unmap_folio(hit.mm, hit.vma, hit.address, folio)
        h = hstate_vma(hit.vma)
        _set_huge_entry(hit.mm, hit.address, h, lambda i: make_hwpoison_entry(folio.pfn))
        if hit.mm is current:
            addr = hit.address + ((pfn - folio.pfn) << PAGE_SHIFT)
            kill = addr if kill is None else min(kill, addr)
    if folio.test(PG.anon):  # dissolve_free_hugetlb_folio: out of the pool for good
        h = pool._hstate_of(folio)
        h.nr_huge_pages -= 1
        folio.flags &= ~PG.dirty
    return kill if dirty else None


def _gup_one(mm: MmStruct, addr: int) -> int:
    """The pfn at ``addr`` after a read GUP (``get_user_pages_fast(addr, 1, 0)``)."""
    vma = mm.vmas.vma_lookup(addr)
    if vma is None or not vma.vm_flags & VM_READ:
        raise_errno(errno.EFAULT)
    try:
        faultin_page(mm, addr, False)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOMEM):
            raise_errno(errno.EFAULT)
        raise
    pmd = mm.pgtables.pmd_table(addr, False)
    assert pmd is not None
    me = pmd[(addr >> 21) & 511]
    if me & _PAGE_PSE:
        if me & _PAGE_SPECIAL:
            raise_errno(errno.EBUSY, "the huge zero page (me_kernel)")
        return ((me & PTE_PFN_MASK) >> PAGE_SHIFT) + ((addr >> PAGE_SHIFT) & 511)
    pte = mm.pgtables.get_pte(addr)
    assert pte & (_PAGE_PRESENT | _PAGE_PROTNONE)
    if pte & _PAGE_SPECIAL:
        raise_errno(errno.EBUSY, "the shared zero page (me_kernel)")
    return (pte & PTE_PFN_MASK) >> PAGE_SHIFT


def madvise_inject_error(mm: MmStruct, start: int, end: int, advice: int) -> None:
    """MADV_HWPOISON over ``[start, end)`` (``madvise_inject_error``)."""
    owner = mm.owner
    if owner is not None and not getattr(owner, "capable_sys_admin", True):
        raise_errno(errno.EPERM, "MADV_HWPOISON needs CAP_SYS_ADMIN")
    kill: int | None = None
    try:
        with mm.lock:
            addr = start
            while addr < end:
                pfn = _gup_one(mm, addr)
                head = mm.phys.mem_map[pfn]
                # the next address is a folio size on: the rest of a THP or huge page is skipped
                size = head.nr_pages * PAGE_SIZE if isinstance(head, Folio) else PAGE_SIZE
                got = memory_failure(mm.phys, pfn, mm)
                if kill is None:
                    kill = got
                addr += size
    finally:
        if kill is not None:
            raise Sigbus(BUS_MCEERR_AR, kill, reason="memory failure injected (MADV_HWPOISON)")
