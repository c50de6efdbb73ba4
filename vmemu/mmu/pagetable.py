"""The four-level page-table tree of one mm: walk, allocate on demand, free.

Mirrors ``pgd_offset`` / ``pud_alloc`` / ``pmd_alloc`` / ``pte_alloc`` and
``free_pgtables`` (``mm/memory.c``). Each table is a page of physical memory
(it has a pfn in ``mem_map``) holding 512 entry ints; an upper-level entry
is ``pfn << 12 | _PAGE_TABLE`` naming the next table's frame, exactly what
the hardware walker follows. A PMD entry with PSE set is a 2 MiB leaf.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs

from vmemu.constants import PAGE_SHIFT, PAGE_SIZE, PMD_SIZE, PUD_SIZE
from vmemu.mmu.folio import PhysMem
from vmemu.mmu.pgtable import (
    _PAGE_PSE,
    _PAGE_TABLE,
    PGDIR_SHIFT,
    PTE_PFN_MASK,
    describe_entry,
    pgd_index,
    pmd_index,
    pte_index,
    pud_index,
)

PGDIR_SIZE = 1 << PGDIR_SHIFT


@attrs.frozen
class WalkLevel:
    """One step of a page walk: the level's name, index, entry and the table's pfn."""

    level: str
    index: int
    entry: int
    table_pfn: int

    def __str__(self) -> str:
        return (f"{self.level:<3} [{self.index:3d}] @pfn {self.table_pfn:#x}: "
                f"{self.entry:#018x}  {describe_entry(self.entry, self.level)}")


class PageTables:
    """The page-table tree rooted at one PGD page (``mm->pgd``)."""

    __slots__ = ("phys", "pgd_pfn", "pgd", "nr_tables")

    def __init__(self, phys: PhysMem) -> None:
        self.phys = phys
        self.pgd_pfn, self.pgd = phys.alloc_table()
        self.nr_tables = 1

    def _next(self, entry: int) -> list[int]:
        return self.phys.mem_map[(entry & PTE_PFN_MASK) >> PAGE_SHIFT]

    def _alloc_into(self, table: list[int], idx: int) -> list[int]:
        pfn, new = self.phys.alloc_table()
        table[idx] = (pfn << PAGE_SHIFT) | _PAGE_TABLE
        self.nr_tables += 1
        return new

    def pmd_table(self, addr: int, alloc: bool) -> list[int] | None:
        """The PMD table covering ``addr`` (``pmd_offset`` after ``pud_alloc``)."""
        # a hot path (page walks of faults and range operations): _next() inlined
        mem_map = self.phys.mem_map
        pgd = self.pgd
        i = (addr >> 39) & 511
        e = pgd[i]
        if e:
            pud = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
        elif alloc:
            pud = self._alloc_into(pgd, i)
        else:
            return None
        i = (addr >> 30) & 511
        e = pud[i]
        if e:
            return mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
        if alloc:
            return self._alloc_into(pud, i)
        return None

    def pte_table(self, addr: int, alloc: bool) -> list[int] | None:
        """The PTE table covering ``addr`` (``pte_offset_map`` after ``pte_alloc``).

        Returns None when a table is missing and ``alloc`` is false, or when
        the PMD holds a huge leaf (the caller inspects the PMD instead).
        """
        # every fault walks here: when the upper levels exist, walk them inline
        # (the pmd_table(addr, alloc) below is the general case)
        mem_map = self.phys.mem_map
        e = self.pgd[(addr >> 39) & 511]
        if e:
            e = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT][(addr >> 30) & 511]
        if e:
            pmd = mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
        else:
            pmd = self.pmd_table(addr, alloc)
            if pmd is None:
                return None
        i = (addr >> 21) & 511
        e = pmd[i]
        if e:
            if e & _PAGE_PSE or not e & 1:  # a huge leaf, or a non-present one (hugetlb marker)
                return None
            return mem_map[(e & PTE_PFN_MASK) >> PAGE_SHIFT]
        if alloc:
            return self._alloc_into(pmd, i)
        return None

    def get_pte(self, addr: int) -> int:
        """The PTE for ``addr``, or 0 if no table maps it."""
        t = self.pte_table(addr, False)
        return t[(addr >> PAGE_SHIFT) & 511] if t is not None else 0

    def walk(self, addr: int) -> list[WalkLevel]:
        """Each level's index and entry for ``addr``, stopping at a none or leaf entry."""
        out = []
        table, pfn = self.pgd, self.pgd_pfn
        for level, index in (("pgd", pgd_index(addr)), ("pud", pud_index(addr)),
                             ("pmd", pmd_index(addr)), ("pte", pte_index(addr))):
            entry = table[index]
            out.append(WalkLevel(level, index, entry, pfn))
            if level == "pte" or not entry & 1 or (entry & _PAGE_PSE):
                break
            pfn = (entry & PTE_PFN_MASK) >> PAGE_SHIFT
            table = self.phys.mem_map[pfn]
        return out

    def iter_pte_tables(self, start: int, end: int) -> Iterator[tuple[int, list[int], int, int]]:
        """Yield ``(addr, pte_table, first_index, last_index_exclusive)`` for existing tables.

        Addresses without a table (or with a huge PMD) are skipped; callers
        that care about huge PMDs use :meth:`iter_pmds`.
        """
        addr = start
        while addr < end:
            nxt = min((addr + PMD_SIZE) & ~(PMD_SIZE - 1), end)
            pmd = self.pmd_table(addr, False)
            if pmd is None:
                addr = min((addr + PUD_SIZE) & ~(PUD_SIZE - 1), end)
                continue
            e = pmd[(addr >> 21) & 511]
            if e & 1 and not (e & _PAGE_PSE):  # a table (not a huge leaf or marker)
                t = self._next(e)
                yield addr, t, (addr >> PAGE_SHIFT) & 511, ((nxt - 1) >> PAGE_SHIFT & 511) + 1
            addr = nxt

    def free_pgtables(self, start: int, end: int) -> int:
        """Free PTE/PMD/PUD tables left empty in ``[start, end)`` (``free_pgtables``).

        Returns the number of table pages freed.
        """
        freed = 0
        mem_map = self.phys.mem_map
        addr = start & ~(PGDIR_SIZE - 1)
        while addr < end:
            gi = (addr >> 39) & 511
            ge = self.pgd[gi]
            gnext = addr + PGDIR_SIZE
            if ge:
                pud = mem_map[(ge & PTE_PFN_MASK) >> PAGE_SHIFT]
                a = max(addr, start & ~(PUD_SIZE - 1))
                while a < min(gnext, end):
                    ui = (a >> 30) & 511
                    ue = pud[ui]
                    if ue:
                        pmd = mem_map[(ue & PTE_PFN_MASK) >> PAGE_SHIFT]
                        b = max(a, start & ~(PMD_SIZE - 1))
                        while b < min(a + PUD_SIZE, end):
                            mi = (b >> 21) & 511
                            me = pmd[mi]
                            if me & 1 and not (me & _PAGE_PSE):
                                pfn = (me & PTE_PFN_MASK) >> PAGE_SHIFT
                                if not any(mem_map[pfn]):
                                    pmd[mi] = 0
                                    self.phys.free_table(pfn)
                                    freed += 1
                            b += PMD_SIZE
                        if not any(pmd):
                            pud[ui] = 0
                            self.phys.free_table((ue & PTE_PFN_MASK) >> PAGE_SHIFT)
                            freed += 1
                    a += PUD_SIZE
                if not any(pud):
                    self.pgd[gi] = 0
                    self.phys.free_table((ge & PTE_PFN_MASK) >> PAGE_SHIFT)
                    freed += 1
            addr = gnext
        self.nr_tables -= freed
        return freed

    def free_all(self) -> None:
        """Free every table including the PGD (``free_pgd_range`` + ``pgd_free`` at exit)."""
        self.free_pgtables(0, 1 << 48)
        self.phys.free_table(self.pgd_pfn)
        self.nr_tables -= 1

    def table_pfns(self) -> set[int]:
        """Every frame used by this tree, for ``check()``."""
        out = {self.pgd_pfn}
        mem_map = self.phys.mem_map
        for ge in self.pgd:
            if not ge:
                continue
            pfn = (ge & PTE_PFN_MASK) >> PAGE_SHIFT
            out.add(pfn)
            for ue in mem_map[pfn]:
                if not ue or ue & _PAGE_PSE:
                    continue
                pfn2 = (ue & PTE_PFN_MASK) >> PAGE_SHIFT
                out.add(pfn2)
                for me in mem_map[pfn2]:
                    if me & 1 and not (me & _PAGE_PSE):
                        out.add((me & PTE_PFN_MASK) >> PAGE_SHIFT)
        return out

    def iter_present(self) -> Iterator[tuple[int, int, str]]:
        """Yield ``(addr, entry, level)`` for every non-none leaf entry in the tree."""
        mem_map = self.phys.mem_map
        for gi, ge in enumerate(self.pgd):
            if not ge:
                continue
            pud = mem_map[(ge & PTE_PFN_MASK) >> PAGE_SHIFT]
            for ui, ue in enumerate(pud):
                if not ue:
                    continue
                pmd = mem_map[(ue & PTE_PFN_MASK) >> PAGE_SHIFT]
                for mi, me in enumerate(pmd):
                    if not me:
                        continue
                    base = (gi << 39) | (ui << 30) | (mi << 21)
                    if me & _PAGE_PSE or not (me & 1):
                        yield base, me, "pmd"
                        continue
                    pte = mem_map[(me & PTE_PFN_MASK) >> PAGE_SHIFT]
                    for pi, pe in enumerate(pte):
                        if pe:
                            yield base | (pi << PAGE_SHIFT), pe, "pte"

    @staticmethod
    def page_range(start: int, end: int) -> range:
        """Page-aligned addresses in ``[start, end)``."""
        return range(start, end, PAGE_SIZE)
