"""x86-64 page-table entries as ints, with the kernel's bit layout.

Mirrors ``arch/x86/include/asm/pgtable_types.h`` and ``pgtable_64_types.h``:
four levels (PGD -> PUD -> PMD -> PTE; the P4D level is folded into the PGD
as on a 4-level kernel), 512 eight-byte entries per table, 48-bit virtual
addresses. An entry is a plain ``int``; print it in hex and the bits read
as in the Intel SDM:

    bit  0 P (present)     1 RW        2 US (user)     3 PWT      4 PCD
    bit  5 A (accessed)    6 D (dirty) 7 PSE (leaf at PMD/PUD level)
    bit  8 G (global; PROTNONE when P is clear)
    bit  9 SOFTW1 = _PAGE_SPECIAL   10 SOFTW2 = _PAGE_UFFD_WP
    bit 11 SOFTW3 = _PAGE_SOFT_DIRTY   bits 12..51 PFN   bit 63 NX

Non-present entries that are not zero hold swap entries (``swp_entry_t``):
type in bits 59..63, offset stored *inverted* in bits 9..58 (the L1TF
mitigation of ``__swp_entry``), and the software bits ``_PAGE_SWP_UFFD_WP``
(bit 2), ``_PAGE_SWP_SOFT_DIRTY`` (bit 1) and ``_PAGE_SWP_EXCLUSIVE`` (bit 7).
The top swap types are not swap files: ``SWP_HWPOISON`` and
``SWP_PTE_MARKER`` (``include/linux/swapops.h``), whose offset carries the
marker bits ``PTE_MARKER_UFFD_WP`` and ``PTE_MARKER_POISONED``.
"""

from __future__ import annotations

from vmemu.constants import PAGE_SHIFT, PMD_SHIFT, PUD_SHIFT

PTRS_PER_TABLE = 512
PGDIR_SHIFT = 39
TABLE_INDEX_BITS = 9
TABLE_INDEX_MASK = PTRS_PER_TABLE - 1
VA_BITS = 48

_PAGE_BIT_PRESENT = 0
_PAGE_BIT_RW = 1
_PAGE_BIT_USER = 2
_PAGE_BIT_PWT = 3
_PAGE_BIT_PCD = 4
_PAGE_BIT_ACCESSED = 5
_PAGE_BIT_DIRTY = 6
_PAGE_BIT_PSE = 7
_PAGE_BIT_GLOBAL = 8
_PAGE_BIT_SOFTW1 = 9
_PAGE_BIT_SOFTW2 = 10
_PAGE_BIT_SOFTW3 = 11
_PAGE_BIT_NX = 63

_PAGE_PRESENT = 1 << _PAGE_BIT_PRESENT
_PAGE_RW = 1 << _PAGE_BIT_RW
_PAGE_USER = 1 << _PAGE_BIT_USER
_PAGE_PWT = 1 << _PAGE_BIT_PWT
_PAGE_PCD = 1 << _PAGE_BIT_PCD
_PAGE_ACCESSED = 1 << _PAGE_BIT_ACCESSED
_PAGE_DIRTY = 1 << _PAGE_BIT_DIRTY
_PAGE_PSE = 1 << _PAGE_BIT_PSE
_PAGE_GLOBAL = 1 << _PAGE_BIT_GLOBAL
_PAGE_PROTNONE = _PAGE_GLOBAL  # meaningful only when _PAGE_PRESENT is clear
_PAGE_SPECIAL = 1 << _PAGE_BIT_SOFTW1
_PAGE_UFFD_WP = 1 << _PAGE_BIT_SOFTW2
# CONFIG_MEM_SOFT_DIRTY is off in the reference 6.18 kernel, so the bit is 0 (never set).
_PAGE_BIT_SOFT_DIRTY = _PAGE_BIT_SOFTW3
CONFIG_MEM_SOFT_DIRTY = False
_PAGE_SOFT_DIRTY = (1 << _PAGE_BIT_SOFT_DIRTY) if CONFIG_MEM_SOFT_DIRTY else 0
_PAGE_NX = 1 << _PAGE_BIT_NX

PHYSICAL_MASK_SHIFT = 52
PTE_PFN_MASK = ((1 << PHYSICAL_MASK_SHIFT) - 1) & ~((1 << PAGE_SHIFT) - 1)
# The PFN of a huge (PSE) entry starts at bit 21; bit 12 is PAT there.
PMD_PFN_MASK = ((1 << PHYSICAL_MASK_SHIFT) - 1) & ~((1 << PMD_SHIFT) - 1)
PTE_FLAGS_MASK = ~PTE_PFN_MASK & ((1 << 64) - 1)

# What an upper-level entry pointing at a table carries (_PAGE_TABLE).
_PAGE_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY

# -- swap entries -----------------------------------------------------------

SWP_TYPE_BITS = 5
SWP_OFFSET_FIRST_BIT = _PAGE_BIT_GLOBAL + 1  # _PAGE_BIT_PROTNONE + 1
SWP_OFFSET_SHIFT = SWP_OFFSET_FIRST_BIT + SWP_TYPE_BITS
SWP_OFFSET_BITS = 64 - SWP_OFFSET_SHIFT
SWP_OFFSET_MASK = (1 << SWP_OFFSET_BITS) - 1
_U64 = (1 << 64) - 1

_PAGE_SWP_SOFT_DIRTY = _PAGE_RW if CONFIG_MEM_SOFT_DIRTY else 0
_PAGE_SWP_UFFD_WP = _PAGE_USER
_PAGE_SWP_EXCLUSIVE = _PAGE_PSE
_PAGE_SWP_SOFTBITS = _PAGE_SWP_SOFT_DIRTY | _PAGE_SWP_UFFD_WP | _PAGE_SWP_EXCLUSIVE

# Special swap types (include/linux/swap.h with CONFIG_DEVICE_PRIVATE=n,
# CONFIG_MIGRATION=y, CONFIG_MEMORY_FAILURE=y, CONFIG_PTE_MARKER=y).
MAX_SWAPFILES_SHIFT = 5
SWP_PTE_MARKER_NUM = 1
SWP_MIGRATION_NUM = 3
SWP_HWPOISON_NUM = 1
MAX_SWAPFILES = (1 << MAX_SWAPFILES_SHIFT) - SWP_MIGRATION_NUM - SWP_HWPOISON_NUM - SWP_PTE_MARKER_NUM
SWP_HWPOISON = MAX_SWAPFILES
SWP_MIGRATION_READ = MAX_SWAPFILES + SWP_HWPOISON_NUM
SWP_PTE_MARKER = MAX_SWAPFILES + SWP_HWPOISON_NUM + SWP_MIGRATION_NUM

# pte marker bits (include/linux/swapops.h)
PTE_MARKER_UFFD_WP = 1 << 0
PTE_MARKER_POISONED = 1 << 1
PTE_MARKER_GUARD = 1 << 2
PTE_MARKER_MASK = (1 << 3) - 1


def pgd_index(addr: int) -> int:
    """Index of ``addr`` in the PGD (bits 39..47)."""
    return (addr >> PGDIR_SHIFT) & TABLE_INDEX_MASK


def pud_index(addr: int) -> int:
    """Index of ``addr`` in a PUD table (bits 30..38)."""
    return (addr >> PUD_SHIFT) & TABLE_INDEX_MASK


def pmd_index(addr: int) -> int:
    """Index of ``addr`` in a PMD table (bits 21..29)."""
    return (addr >> PMD_SHIFT) & TABLE_INDEX_MASK


def pte_index(addr: int) -> int:
    """Index of ``addr`` in a PTE table (bits 12..20)."""
    return (addr >> PAGE_SHIFT) & TABLE_INDEX_MASK


def is_canonical(addr: int) -> bool:
    """True when bits 47..63 of ``addr`` are all equal (a 48-bit canonical address)."""
    top = addr >> (VA_BITS - 1)
    return top == 0 or top == (1 << (64 - VA_BITS + 1)) - 1


# -- entries -----------------------------------------------------------------


def pfn_pte(pfn: int, prot: int) -> int:
    """Build a PTE mapping ``pfn`` with protection bits ``prot`` (``pfn_pte``)."""
    return (pfn << PAGE_SHIFT) | prot


def pte_pfn(pte: int) -> int:
    """The page frame number a PTE maps (``pte_pfn``)."""
    return (pte & PTE_PFN_MASK) >> PAGE_SHIFT


def pfn_pmd(pfn: int, prot: int) -> int:
    """Build a huge PMD leaf mapping ``pfn`` (2 MiB aligned) (``pfn_pmd``)."""
    return (pfn << PAGE_SHIFT) | prot | _PAGE_PSE


def pmd_pfn(pmd: int) -> int:
    """The first page frame number of a huge PMD leaf (``pmd_pfn``)."""
    return (pmd & PMD_PFN_MASK) >> PAGE_SHIFT


def pte_none(pte: int) -> bool:
    """True for an empty entry (``pte_none``)."""
    return pte == 0


def pte_present(pte: int) -> bool:
    """True for a mapped page, including PROT_NONE ones (``pte_present``)."""
    return bool(pte & (_PAGE_PRESENT | _PAGE_PROTNONE))


def is_swap_pte_raw(pte: int) -> bool:
    """True for a non-zero entry with neither P nor PROTNONE: a swap-format entry."""
    return pte != 0 and not (pte & (_PAGE_PRESENT | _PAGE_PROTNONE))


def is_swap_pte(pte: int) -> bool:
    """True when ``pte`` holds a swp_entry_t (swap, migration, hwpoison or marker)."""
    return is_swap_pte_raw(pte)


def pte_write(pte: int) -> bool:
    """True when the RW bit is set (``pte_write``)."""
    return bool(pte & _PAGE_RW)


def pte_dirty(pte: int) -> bool:
    """True when the D bit is set (``pte_dirty``)."""
    return bool(pte & _PAGE_DIRTY)


def pte_young(pte: int) -> bool:
    """True when the A bit is set (``pte_young``)."""
    return bool(pte & _PAGE_ACCESSED)


def pte_special(pte: int) -> bool:
    """True for a special mapping such as the zero page (``pte_special``)."""
    return bool(pte & _PAGE_SPECIAL)


def pte_uffd_wp(pte: int) -> bool:
    """True when a present PTE is userfaultfd write-protected (``pte_uffd_wp``)."""
    return bool(pte & _PAGE_UFFD_WP)


def pte_protnone(pte: int) -> bool:
    """True for a PROT_NONE mapping: PROTNONE set, P clear (``pte_protnone``)."""
    return (pte & (_PAGE_PRESENT | _PAGE_PROTNONE)) == _PAGE_PROTNONE


def pte_huge(entry: int) -> bool:
    """True for a PSE leaf at PMD or PUD level (``pmd_leaf``)."""
    return bool(entry & _PAGE_PSE) and bool(entry & (_PAGE_PRESENT | _PAGE_PROTNONE))


def pte_wrprotect(pte: int) -> int:
    """Clear RW (``pte_wrprotect``)."""
    return pte & ~_PAGE_RW


def pte_mkwrite(pte: int) -> int:
    """Set RW (``pte_mkwrite``)."""
    return pte | _PAGE_RW


def pte_mkdirty(pte: int) -> int:
    """Set D and soft-dirty (``pte_mkdirty``)."""
    return pte | _PAGE_DIRTY | _PAGE_SOFT_DIRTY


def pte_mkclean(pte: int) -> int:
    """Clear D (``pte_mkclean``)."""
    return pte & ~_PAGE_DIRTY


def pte_mkold(pte: int) -> int:
    """Clear A (``pte_mkold``)."""
    return pte & ~_PAGE_ACCESSED


def pte_mkuffd_wp(pte: int) -> int:
    """Set the uffd-wp bit and drop RW (``pte_mkuffd_wp``)."""
    return (pte | _PAGE_UFFD_WP) & ~_PAGE_RW


def pte_clear_uffd_wp(pte: int) -> int:
    """Clear the uffd-wp bit (``pte_clear_uffd_wp``)."""
    return pte & ~_PAGE_UFFD_WP


# -- swap entries ------------------------------------------------------------


def swp_entry(type_: int, offset: int) -> int:
    """Encode a swap entry as a non-present PTE (``__swp_entry`` + ``swp_entry_to_pte``).

    The offset is stored inverted so that a stale entry never names a
    usable physical frame (the L1TF mitigation).
    """
    if not 0 <= type_ < (1 << SWP_TYPE_BITS):
        raise ValueError(f"swap type {type_} out of range")
    if not 0 <= offset <= SWP_OFFSET_MASK:
        raise ValueError(f"swap offset {offset} out of range")
    inverted = ((~offset) << SWP_OFFSET_SHIFT) & _U64
    return (inverted >> SWP_TYPE_BITS) | (type_ << (64 - SWP_TYPE_BITS))


def swp_type(pte: int) -> int:
    """The swap type (device index or special type) of a swap PTE (``__swp_type``)."""
    return (pte >> (64 - SWP_TYPE_BITS)) & ((1 << SWP_TYPE_BITS) - 1)


def swp_offset(pte: int) -> int:
    """The swap offset (slot, or marker bits) of a swap PTE (``__swp_offset``)."""
    return ((((~pte) & _U64) << SWP_TYPE_BITS) & _U64) >> SWP_OFFSET_SHIFT


def swp_entry_clean(pte: int) -> int:
    """A swap PTE without its software bits, for comparing entries."""
    return pte & ~_PAGE_SWP_SOFTBITS


def pte_swp_uffd_wp(pte: int) -> bool:
    """True when a swap PTE carries the uffd-wp bit (``pte_swp_uffd_wp``)."""
    return bool(pte & _PAGE_SWP_UFFD_WP)


def pte_swp_mkuffd_wp(pte: int) -> int:
    """Set uffd-wp on a swap PTE (``pte_swp_mkuffd_wp``)."""
    return pte | _PAGE_SWP_UFFD_WP


def pte_swp_clear_uffd_wp(pte: int) -> int:
    """Clear uffd-wp on a swap PTE (``pte_swp_clear_uffd_wp``)."""
    return pte & ~_PAGE_SWP_UFFD_WP


def pte_swp_exclusive(pte: int) -> bool:
    """True when a swapped-out anon page was exclusive (``pte_swp_exclusive``)."""
    return bool(pte & _PAGE_SWP_EXCLUSIVE)


def pte_swp_mkexclusive(pte: int) -> int:
    """Mark a swap PTE exclusive (``pte_swp_mkexclusive``)."""
    return pte | _PAGE_SWP_EXCLUSIVE


def pte_swp_clear_exclusive(pte: int) -> int:
    """Clear the exclusive bit of a swap PTE (``pte_swp_clear_exclusive``)."""
    return pte & ~_PAGE_SWP_EXCLUSIVE


def is_real_swap_pte(pte: int) -> bool:
    """True for an entry naming a slot on a swap device (``non_swap_entry`` is false)."""
    return is_swap_pte_raw(pte) and swp_type(pte) < MAX_SWAPFILES


# -- pte markers -------------------------------------------------------------


def make_pte_marker(marker: int) -> int:
    """A non-present entry carrying marker bits (``make_pte_marker``)."""
    if marker & ~PTE_MARKER_MASK or marker == 0:
        raise ValueError(f"bad pte marker {marker:#x}")
    return swp_entry(SWP_PTE_MARKER, marker)


def is_pte_marker(pte: int) -> bool:
    """True when ``pte`` is a pte marker (``is_pte_marker``)."""
    return is_swap_pte_raw(pte) and swp_type(pte) == SWP_PTE_MARKER


def pte_marker_get(pte: int) -> int:
    """The marker bits of a marker PTE (``pte_marker_get``)."""
    return swp_offset(pte) & PTE_MARKER_MASK


def is_uffd_wp_marker(pte: int) -> bool:
    """True for the uffd-wp marker on an empty PTE (``is_pte_marker_uffd_wp``)."""
    return is_pte_marker(pte) and bool(pte_marker_get(pte) & PTE_MARKER_UFFD_WP)


def is_poisoned_marker(pte: int) -> bool:
    """True for a UFFDIO_POISON marker (``is_poisoned_swp_entry``)."""
    return is_pte_marker(pte) and bool(pte_marker_get(pte) & PTE_MARKER_POISONED)


UFFD_WP_MARKER = make_pte_marker(PTE_MARKER_UFFD_WP)
POISON_MARKER = make_pte_marker(PTE_MARKER_POISONED)


def describe_entry(entry: int, level: str = "pte") -> str:
    """Name the set bits of an entry, for the tour and for teaching."""
    if entry == 0:
        return "none"
    if is_swap_pte_raw(entry):
        t = swp_type(entry)
        if t == SWP_PTE_MARKER:
            bits = pte_marker_get(entry)
            names = [n for b, n in ((PTE_MARKER_UFFD_WP, "uffd-wp"),
                                    (PTE_MARKER_POISONED, "poisoned"),
                                    (PTE_MARKER_GUARD, "guard")) if bits & b]
            return "marker(" + ",".join(names) + ")"
        extra = "".join(f" {n}" for b, n in ((_PAGE_SWP_UFFD_WP, "uffd-wp"),
                                             (_PAGE_SWP_EXCLUSIVE, "exclusive")) if entry & b)
        return f"swap(type={t}, offset={swp_offset(entry):#x}{extra})"
    names = []
    for bit, name in ((_PAGE_PRESENT, "P"), (_PAGE_RW, "RW"), (_PAGE_USER, "US"),
                      (_PAGE_PWT, "PWT"), (_PAGE_PCD, "PCD"), (_PAGE_ACCESSED, "A"),
                      (_PAGE_DIRTY, "D"), (_PAGE_PSE, "PSE"), (_PAGE_SPECIAL, "SPECIAL"),
                      (_PAGE_UFFD_WP, "UFFD_WP"), (1 << _PAGE_BIT_SOFT_DIRTY, "SOFT_DIRTY"),
                      (_PAGE_NX, "NX")):
        if entry & bit:
            names.append(name)
    if pte_protnone(entry):
        names.append("PROTNONE")
    pfn = pmd_pfn(entry) if (entry & _PAGE_PSE and level != "pte") else pte_pfn(entry)
    return f"pfn={pfn:#x} " + "|".join(names)
