"""/proc views of an address space: maps, smaps, pagemap (``fs/proc/task_mmu.c``).

The text is byte-for-byte in the kernel's format so that tools and eyes
used to /proc read it unchanged. ``pagemap`` entries carry the kernel's
bits: PFN (bits 0..54, or swap type and offset), soft-dirty (55),
exclusively mapped (56), uffd-wp (57), file/shared-anon (61), swapped
(62), present (63).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmemu.constants import PAGE_SHIFT, PAGE_SIZE
from vmemu.mmu.folio import PG, Folio
from vmemu.mmu.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_SOFT_DIRTY,
    _PAGE_SPECIAL,
    _PAGE_UFFD_WP,
    MAX_SWAPFILES_SHIFT,
    PTE_PFN_MASK,
    SWP_HWPOISON,
    is_real_swap_pte,
    is_uffd_wp_marker,
    pte_swp_uffd_wp,
    swp_offset,
    swp_type,
)
from vmemu.mmu.vma import (
    VM_ACCOUNT,
    VM_ARCH_1,
    VM_DONTCOPY,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_DROPPABLE,
    VM_EXEC,
    VM_GROWSDOWN,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_IO,
    VM_LOCKED,
    VM_LOCKONFAULT,
    VM_MAYEXEC,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_MERGEABLE,
    VM_MIXEDMAP,
    VM_NOHUGEPAGE,
    VM_NORESERVE,
    VM_PFNMAP,
    VM_RAND_READ,
    VM_READ,
    VM_SEQ_READ,
    VM_SHARED,
    VM_SOFTDIRTY,
    VM_SYNC,
    VM_UFFD_MINOR,
    VM_UFFD_MISSING,
    VM_UFFD_WP,
    VM_WIPEONFORK,
    VM_WRITE,
    Vma,
)

if TYPE_CHECKING:
    from vmemu.mmu.mm import MmStruct

PM_PFRAME_BITS = 55
PM_PFRAME_MASK = (1 << PM_PFRAME_BITS) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD_REGION = 1 << 58
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# show_smap_vma_flags mnemonics, in bit order
_MNEMONICS = [
    (VM_READ, "rd"), (VM_WRITE, "wr"), (VM_EXEC, "ex"), (VM_SHARED, "sh"),
    (VM_MAYREAD, "mr"), (VM_MAYWRITE, "mw"), (VM_MAYEXEC, "me"), (VM_MAYSHARE, "ms"),
    (VM_GROWSDOWN, "gd"), (VM_UFFD_MISSING, "um"), (VM_PFNMAP, "pf"), (VM_UFFD_WP, "uw"),
    (VM_LOCKED, "lo"), (VM_IO, "io"), (VM_SEQ_READ, "sr"), (VM_RAND_READ, "rr"),
    (VM_DONTCOPY, "dc"), (VM_DONTEXPAND, "de"), (VM_LOCKONFAULT, "lf"), (VM_ACCOUNT, "ac"),
    (VM_NORESERVE, "nr"), (VM_HUGETLB, "ht"), (VM_SYNC, "sf"), (VM_ARCH_1, "ar"),
    (VM_WIPEONFORK, "wf"), (VM_DONTDUMP, "dd"), (VM_SOFTDIRTY, "sd"), (VM_MIXEDMAP, "mm"),
    (VM_HUGEPAGE, "hg"), (VM_NOHUGEPAGE, "nh"), (VM_MERGEABLE, "mg"), (VM_DROPPABLE, "dp"),
    (VM_UFFD_MINOR, "ui"),
]


def vma_name(vma: Vma) -> str:
    """The name column of /proc/<pid>/maps for ``vma``."""
    f = vma.vm_file
    if f is None:
        return f"[anon:{vma.anon_name}]" if vma.anon_name else ""
    return str(f.proc_name()) if hasattr(f, "proc_name") else "/dev/zero (deleted)"


def show_map_vma(vma: Vma) -> str:
    """One line of /proc/<pid>/maps (``show_map_vma``), without the newline."""
    f = vma.vm_file
    if f is not None:
        pgoff = vma.vm_pgoff << PAGE_SHIFT
        dev, ino = getattr(f, "dev", "00:01"), f.ino
    else:
        pgoff, dev, ino = 0, "00:00", 0
    head = f"{vma.vm_start:08x}-{vma.vm_end:08x} {vma.flags_str()} {pgoff:08x} {dev} {ino} "
    name = vma_name(vma)
    if name:
        head = head.ljust(25 + 8 * 6 - 1) + " " + name  # seq_pad(m, ' '): pad, then a space
    return head


def maps(mm: MmStruct) -> str:
    """The text of /proc/<pid>/maps."""
    return "".join(show_map_vma(v) + "\n" for v in mm.vmas)


def page_mapcount(folio: Folio, level: str) -> int:
    """Mappings of one page of ``folio``, as smaps and pagemap count them.

    ``folio.mapcount`` counts every mapping, PMD ones included; a PMD
    leaf's share is the entire mapcount; a PTE-mapped page of a large folio
    gets the entire mapcount plus its share of the page mappings (vmemu
    keeps no per-page counts, so this is the average).
    """
    if not folio.order:
        return folio.mapcount
    if level == "pmd":
        return folio.entire_mapcount
    pages = folio.mapcount - folio.entire_mapcount
    return folio.entire_mapcount + -(-pages // folio.nr_pages)


def _kb(n_bytes: int | float) -> str:
    return f"{int(n_bytes) >> 10:8d} kB"


def smaps_vma(mm: MmStruct, vma: Vma) -> str:
    """The /proc/<pid>/smaps block for one VMA (``show_smap``)."""
    rss = pss = pss_dirty = 0.0
    shared_clean = shared_dirty = private_clean = private_dirty = 0
    referenced = anonymous = lazyfree = swap = anon_huge = locked = 0
    swap_pss = 0.0
    shared_hugetlb = private_hugetlb = 0
    mem_map = mm.phys.mem_map
    for _addr, e, level in _entries(mm, vma):
        size = PAGE_SIZE if level == "pte" else PAGE_SIZE * 512
        if vma.vm_flags & VM_HUGETLB:  # smaps_hugetlb_range: not in Rss
            if e & _PAGE_PRESENT:
                folio = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
                if folio.mapcount > folio.nr_pages >> 9:  # folio_likely_mapped_shared
                    shared_hugetlb += size
                else:
                    private_hugetlb += size
            continue
        if not e & (_PAGE_PRESENT | _PAGE_PROTNONE):
            if is_real_swap_pte(e):
                swap += size
                swap_pss += size / max(mm.swap_count(e), 1)
            continue
        if e & _PAGE_SPECIAL:
            continue
        pfn = (e & PTE_PFN_MASK) >> PAGE_SHIFT
        folio = mem_map[pfn]
        if not isinstance(folio, Folio):
            continue
        mapcount = max(page_mapcount(folio, level), 1)
        dirty = bool(e & _PAGE_DIRTY) or folio.test(PG.dirty)
        rss += size
        share = size / mapcount
        pss += share
        if dirty:
            pss_dirty += share
        if mapcount >= 2:
            if dirty:
                shared_dirty += size
            else:
                shared_clean += size
        elif dirty:
            private_dirty += size
        else:
            private_clean += size
        if e & _PAGE_ACCESSED or folio.test(PG.referenced):
            referenced += size
        if folio.test(PG.anon):
            anonymous += size
            if not folio.test(PG.swapbacked) and not dirty:
                lazyfree += size
            if level == "pmd":
                anon_huge += size
        if vma.vm_flags & VM_LOCKED:
            locked += size
    if vma.vm_file is not None:
        from vmemu.mmu.swap_state import shmem_swap_usage

        swap += PAGE_SIZE * shmem_swap_usage(mm, vma)  # pages out on swap from the page cache
    flags = "".join(m + " " for bit, m in _MNEMONICS if vma.vm_flags & bit)
    kps = vma.vm_file.hstate.size if vma.vm_flags & VM_HUGETLB else PAGE_SIZE
    lines = [
        show_map_vma(vma),
        f"Size:           {_kb(vma.size)}",
        f"KernelPageSize: {_kb(kps)}",
        f"MMUPageSize:    {_kb(kps)}",
        f"Rss:            {_kb(rss)}",
        f"Pss:            {_kb(pss)}",
        f"Pss_Dirty:      {_kb(pss_dirty)}",
        f"Shared_Clean:   {_kb(shared_clean)}",
        f"Shared_Dirty:   {_kb(shared_dirty)}",
        f"Private_Clean:  {_kb(private_clean)}",
        f"Private_Dirty:  {_kb(private_dirty)}",
        f"Referenced:     {_kb(referenced)}",
        f"Anonymous:      {_kb(anonymous)}",
        f"KSM:            {_kb(0)}",
        f"LazyFree:       {_kb(lazyfree)}",
        f"AnonHugePages:  {_kb(anon_huge)}",
        f"ShmemPmdMapped: {_kb(0)}",
        f"FilePmdMapped:  {_kb(0)}",
        f"Shared_Hugetlb: {_kb(shared_hugetlb)}",
        f"Private_Hugetlb:{_kb(private_hugetlb)}",
        f"Swap:           {_kb(swap)}",
        f"SwapPss:        {_kb(swap_pss)}",
        f"Locked:         {_kb(locked)}",
        f"THPeligible:    {mm.thp_eligible(vma):8d}",
        f"VmFlags: {flags}",
    ]
    return "\n".join(lines) + "\n"


def smaps(mm: MmStruct) -> str:
    """The text of /proc/<pid>/smaps."""
    return "".join(smaps_vma(mm, v) for v in mm.vmas)


def _entries(mm: MmStruct, vma: Vma) -> list[tuple[int, int, str]]:
    out = []
    addr = vma.vm_start
    while addr < vma.vm_end:
        pmd = mm.pgtables.pmd_table(addr, False)
        if pmd is None:
            addr = (addr + (1 << 30)) & ~((1 << 30) - 1)
            continue
        me = pmd[(addr >> 21) & 511]
        nxt = min((addr + (1 << 21)) & ~((1 << 21) - 1), vma.vm_end)
        if me & _PAGE_PSE or (me and not me & _PAGE_PRESENT):  # huge leaf, or hugetlb marker
            out.append((addr, me, "pmd"))
        elif me:
            table = mm.phys.mem_map[(me & PTE_PFN_MASK) >> PAGE_SHIFT]
            for a in range(addr, nxt, PAGE_SIZE):
                e = table[(a >> PAGE_SHIFT) & 511]
                if e:
                    out.append((a, e, "pte"))
        addr = nxt
    return out


def pagemap_entry(mm: MmStruct, addr: int) -> int:
    """The 64-bit /proc/<pid>/pagemap entry for the page at ``addr`` (``pte_to_pagemap_entry``)."""
    pmd = mm.pgtables.pmd_table(addr, False)
    if pmd is None:
        return 0
    me = pmd[(addr >> 21) & 511]
    huge = bool(me & _PAGE_PSE or not me & _PAGE_PRESENT)
    if huge:  # a huge leaf, or a non-present huge entry
        e = me
        pfn = ((me & PTE_PFN_MASK) >> PAGE_SHIFT) + ((addr >> PAGE_SHIFT) & 511)
    else:
        e = mm.pgtables.get_pte(addr)
        pfn = (e & PTE_PFN_MASK) >> PAGE_SHIFT
    if not e:
        return 0
    flags = 0
    frame = 0
    if e & (_PAGE_PRESENT | _PAGE_PROTNONE):
        flags |= PM_PRESENT
        frame = pfn
        if e & _PAGE_SOFT_DIRTY:
            flags |= PM_SOFT_DIRTY
        if e & _PAGE_UFFD_WP:
            flags |= PM_UFFD_WP
        if not e & _PAGE_SPECIAL:
            folio = mm.phys.mem_map[pfn]
            if isinstance(folio, Folio):
                if not folio.test(PG.anon):
                    flags |= PM_FILE
                if page_mapcount(folio, "pmd" if me & _PAGE_PSE else "pte") == 1:
                    flags |= PM_MMAP_EXCLUSIVE
        elif me & _PAGE_PSE:
            flags |= PM_FILE  # the huge zero page: pmd_page() is no anon page (observed on 6.18)
    elif huge:
        # a non-present hugetlb entry: pagemap_hugetlb_range shows its uffd-wp bit only
        if is_uffd_wp_marker(e) or pte_swp_uffd_wp(e):
            flags |= PM_UFFD_WP
    else:
        # every swap-format PTE is "swapped" (pte_to_pagemap_entry): a swap slot, a
        # hwpoison entry, a pte marker (uffd-wp, poison); the frame is type | offset << 5
        flags |= PM_SWAP
        frame = swp_type(e) | (swp_offset(e) << MAX_SWAPFILES_SHIFT)
        if pte_swp_uffd_wp(e) or is_uffd_wp_marker(e):
            flags |= PM_UFFD_WP
        if swp_type(e) == SWP_HWPOISON:  # a pfn swap entry names its page
            folio = mm.phys.mem_map[swp_offset(e)]
            if isinstance(folio, Folio) and not folio.test(PG.anon):
                flags |= PM_FILE
    return (frame & PM_PFRAME_MASK) | flags
