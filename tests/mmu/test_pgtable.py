"""x86-64 entry encodings: indices, PTE bits, swap entries and pte markers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmemu.mmu import pgtable as pg
from vmemu.mmu.pgtable import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_PROTNONE,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_SPECIAL,
    _PAGE_UFFD_WP,
    _PAGE_USER,
    MAX_SWAPFILES,
    POISON_MARKER,
    PTE_MARKER_POISONED,
    PTE_MARKER_UFFD_WP,
    SWP_HWPOISON,
    SWP_OFFSET_MASK,
    SWP_PTE_MARKER,
    UFFD_WP_MARKER,
)


def test_bit_positions_are_the_hardware_ones():
    assert (_PAGE_PRESENT, _PAGE_RW, _PAGE_USER) == (1, 2, 4)
    assert (_PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PSE) == (0x20, 0x40, 0x80)
    assert _PAGE_PROTNONE == 0x100 and _PAGE_SPECIAL == 0x200 and _PAGE_UFFD_WP == 0x400
    assert _PAGE_NX == 1 << 63
    assert pg.PTE_PFN_MASK == 0x000F_FFFF_FFFF_F000
    assert pg._PAGE_TABLE == 0x67


def test_indices_of_each_level():
    addr = (5 << 39) | (6 << 30) | (7 << 21) | (8 << 12) | 0x123
    assert (pg.pgd_index(addr), pg.pud_index(addr), pg.pmd_index(addr), pg.pte_index(addr)) == (
        5, 6, 7, 8)
    assert pg.pte_index(0x7FFF_FFFF_F000) == 511 and pg.pgd_index(0x7FFF_FFFF_F000) == 255


def test_canonical_addresses():
    assert pg.is_canonical(0) and pg.is_canonical((1 << 47) - 1)
    assert not pg.is_canonical(1 << 47)
    assert pg.is_canonical((1 << 64) - 1) and pg.is_canonical(0xFFFF_8000_0000_0000)
    assert not pg.is_canonical(0xFFFF_7FFF_FFFF_FFFF)


def test_pte_build_and_predicates():
    pte = pg.pfn_pte(0x1234, _PAGE_PRESENT | _PAGE_USER | _PAGE_NX)
    assert pte == 0x8000_0000_0123_4005
    assert pg.pte_pfn(pte) == 0x1234
    assert pg.pte_present(pte) and not pg.pte_write(pte) and not pg.pte_none(pte)
    w = pg.pte_mkdirty(pg.pte_mkwrite(pte))
    assert pg.pte_write(w) and pg.pte_dirty(w)
    assert not pg.pte_dirty(pg.pte_mkclean(w)) and not pg.pte_write(pg.pte_wrprotect(w))
    assert not pg.pte_young(pg.pte_mkold(w | _PAGE_ACCESSED))
    wp = pg.pte_mkuffd_wp(w)
    assert pg.pte_uffd_wp(wp) and not pg.pte_write(wp)
    assert not pg.pte_uffd_wp(pg.pte_clear_uffd_wp(wp))
    assert pg.pte_none(0) and not pg.pte_present(0)
    assert pg.pte_special(pte | _PAGE_SPECIAL)


def test_protnone_is_present_to_the_kernel_only():
    pte = pg.pfn_pte(0x200, _PAGE_PROTNONE | _PAGE_ACCESSED)
    assert pg.pte_protnone(pte) and pg.pte_present(pte)
    assert not pg.is_swap_pte(pte)


def test_huge_pmd_entries():
    pmd = pg.pfn_pmd(0x200, _PAGE_PRESENT | _PAGE_RW)
    assert pmd & _PAGE_PSE and pg.pte_huge(pmd)
    assert pg.pmd_pfn(pmd) == 0x200
    assert not pg.pte_huge(pg._PAGE_TABLE | (5 << 12))


@settings(max_examples=max(200, 2 * settings().max_examples), deadline=None)
@given(type_=st.integers(0, 31), offset=st.integers(0, SWP_OFFSET_MASK))
def test_swap_entry_roundtrip(type_, offset):
    e = pg.swp_entry(type_, offset)
    assert pg.swp_type(e) == type_ and pg.swp_offset(e) == offset
    assert not e & (_PAGE_PRESENT | _PAGE_PROTNONE)
    assert e < 1 << 64
    for set_, test, clear in ((pg.pte_swp_mkuffd_wp, pg.pte_swp_uffd_wp, pg.pte_swp_clear_uffd_wp),
                              (pg.pte_swp_mkexclusive, pg.pte_swp_exclusive,
                               pg.pte_swp_clear_exclusive)):
        marked = set_(e)
        assert test(marked) and not test(clear(marked))
        assert pg.swp_type(marked) == type_ and pg.swp_offset(marked) == offset
        assert pg.swp_entry_clean(marked) == pg.swp_entry_clean(e)


def test_swap_offset_is_stored_inverted():
    e = pg.swp_entry(1, 0)
    # offset 0 inverted: every offset bit (9+5 .. 63-5) set
    assert e >> 14 & ((1 << 45) - 1) == (1 << 45) - 1
    assert pg.swp_type(e) == 1 and e >> 59 == 1
    assert pg.is_real_swap_pte(e) and pg.is_swap_pte(e) and not pg.is_pte_marker(e)


def test_swap_entry_rejects_out_of_range():
    with pytest.raises(ValueError):
        pg.swp_entry(32, 0)
    with pytest.raises(ValueError):
        pg.swp_entry(0, SWP_OFFSET_MASK + 1)
    with pytest.raises(ValueError):
        pg.make_pte_marker(0)
    with pytest.raises(ValueError):
        pg.make_pte_marker(1 << 5)


def test_special_swap_types():
    assert MAX_SWAPFILES == 27 and SWP_HWPOISON == 27 and SWP_PTE_MARKER == 31
    hw = pg.swp_entry(SWP_HWPOISON, 0x55)
    assert not pg.is_real_swap_pte(hw) and not pg.is_pte_marker(hw)


def test_pte_markers():
    assert pg.is_pte_marker(UFFD_WP_MARKER) and pg.is_uffd_wp_marker(UFFD_WP_MARKER)
    assert not pg.is_poisoned_marker(UFFD_WP_MARKER)
    assert pg.is_poisoned_marker(POISON_MARKER) and not pg.is_uffd_wp_marker(POISON_MARKER)
    assert pg.pte_marker_get(UFFD_WP_MARKER) == PTE_MARKER_UFFD_WP
    assert pg.pte_marker_get(POISON_MARKER) == PTE_MARKER_POISONED
    both = pg.make_pte_marker(PTE_MARKER_UFFD_WP | PTE_MARKER_POISONED)
    assert pg.is_uffd_wp_marker(both) and pg.is_poisoned_marker(both)
    assert not pg.is_real_swap_pte(UFFD_WP_MARKER) and not pg.pte_present(UFFD_WP_MARKER)


def test_describe_entry():
    assert pg.describe_entry(0) == "none"
    assert pg.describe_entry(UFFD_WP_MARKER) == "marker(uffd-wp)"
    assert pg.describe_entry(POISON_MARKER) == "marker(poisoned)"
    s = pg.describe_entry(pg.pte_swp_mkexclusive(pg.swp_entry(2, 0x10)))
    assert s == "swap(type=2, offset=0x10 exclusive)"
    assert pg.describe_entry(0x8000_0000_0012_3067) == "pfn=0x123 P|RW|US|A|D|NX"
    assert "PROTNONE" in pg.describe_entry(pg.pfn_pte(3, _PAGE_PROTNONE))
