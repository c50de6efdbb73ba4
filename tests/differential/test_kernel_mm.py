"""vmemu against the real kernel: errnos, /proc/self/maps layouts, memory contents.

Every test runs the same operation sequence on a window of the real
process (:class:`KernelSide`) and of an emulated one (:class:`EmuSide`)
and compares, after each step, the outcome (result or errno), the layout
(merges and splits as /proc/<pid>/maps shows them) and the bytes of every
readable page. When they disagree the kernel is right.

Arguments are in pages relative to the window base (see ``_kernel.py``).
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.differential._kernel import (
    ON_LINUX_X86_64,
    SKIP_REASON,
    WINDOW_PAGES,
    EmuSide,
    KernelSide,
    outcome,
)
from vmemu import (
    MADV_DOFORK,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_KEEPONFORK,
    MADV_NORMAL,
    MADV_RANDOM,
    MADV_WIPEONFORK,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_GROWSUP,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    SEGV_ACCERR,
    SEGV_MAPERR,
    SIGSEGV,
)
from vmemu.mmu import PM_FILE, PM_MMAP_EXCLUSIVE, PM_PRESENT, PM_SWAP

pytestmark = [
    pytest.mark.differential,
    pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON),
]

P = PAGE_SIZE
PA = MAP_PRIVATE | MAP_ANONYMOUS
SA = MAP_SHARED | MAP_ANONYMOUS
RW = PROT_READ | PROT_WRITE
U64 = (1 << 64) - 1


@pytest.fixture
def sides():
    k, e = KernelSide(), EmuSide()
    yield k, e
    k.close()
    e.close()


def same(k: KernelSide, e: EmuSide, op: str, *args: int) -> tuple[str, object]:
    """Run ``op`` on both sides; assert equal outcome, layout and contents."""
    ko = outcome(getattr(k, op), *args)
    eo = outcome(getattr(e, op), *args)
    assert eo == ko, f"{op}{args}: kernel {ko}, vmemu {eo}"
    assert_same_state(k, e, f"after {op}{args}")
    return ko


def assert_same_state(k: KernelSide, e: EmuSide, when: str = "") -> None:
    assert e.layout() == k.layout(), when
    kc, ec = k.contents(), e.contents()
    assert ec.keys() == kc.keys(), when
    for page in kc:
        assert ec[page] == kc[page], f"page {page} differs {when}"
    e.p.check()


def write_both(k: KernelSide, e: EmuSide, page: int, data: bytes, off: int = 0) -> None:
    k.write(page * P + off, data)
    e.write(page * P + off, data)


# -- errno edge cases ----------------------------------------------------------------------

# (name, setup [(page, npages, prot, flags)], op, args in pages where marked "pg")
ERRNO_CASES = [
    ("mmap zero length", "mmap_raw", (0, 0, RW, PA | MAP_FIXED)),
    ("mmap unaligned fixed addr", "mmap_raw", (1, P, RW, PA | MAP_FIXED)),
    ("mmap unaligned noreplace addr", "mmap_raw", (1, P, RW, PA | MAP_FIXED_NOREPLACE)),
    ("mmap no SHARED/PRIVATE", "mmap_raw", (0, P, RW, MAP_ANONYMOUS | MAP_FIXED)),
    ("mmap map type 0xf", "mmap_raw", (0, P, RW, MAP_ANONYMOUS | 0xF | MAP_FIXED)),
    ("mmap SHARED_VALIDATE anon", "mmap_raw", (0, P, RW, MAP_SHARED_VALIDATE | MAP_ANONYMOUS)),
    ("mmap no type, noreplace over a mapping", "mmap_raw",
     (-P, P, RW, MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)),
    ("mmap noreplace over guard", "mmap_raw", (-P, P, RW, PA | MAP_FIXED_NOREPLACE)),
    ("mmap noreplace partly over guard", "mmap_raw",
     ((WINDOW_PAGES - 1) * P, 2 * P, RW, PA | MAP_FIXED_NOREPLACE)),
    ("mmap noreplace in hole", "mmap_raw", (2 * P, P, RW, PA | MAP_FIXED_NOREPLACE)),
    ("mmap huge length", "mmap_raw", (0, 1 << 62, RW, PA)),
    ("mmap length wraps when aligned", "mmap_raw", (0, U64 - 10, RW, PA)),
    ("mmap unknown prot bits are ignored", "mmap_raw", (0, P, RW | 0x10, PA | MAP_FIXED)),
    ("mmap unknown flag bits are ignored", "mmap_raw", (0, P, RW, PA | MAP_FIXED | 0x800000)),
    ("mmap shared with growsdown", "mmap_raw", (0, P, RW, SA | MAP_FIXED | 0x100)),
    ("mmap without MAP_ANONYMOUS and fd -1", "mmap_raw", (0, P, RW, MAP_PRIVATE | MAP_FIXED)),
    ("munmap len 0", "munmap_raw", (0, 0)),
    ("munmap unaligned addr", "munmap_raw", (1, P)),
    ("munmap unaligned len rounds up", "munmap_raw", (0, 1)),
    ("munmap huge len", "munmap_raw", (0, 1 << 62)),
    ("munmap negative len", "munmap_raw", (0, -1)),
    ("munmap hole is fine", "munmap_raw", (0, P)),
    ("mprotect unaligned", "mprotect_raw", (1, P, PROT_READ)),
    ("mprotect bad prot bits", "mprotect_raw", (0, P, 0x10)),
    ("mprotect GROWSDOWN|GROWSUP", "mprotect_raw", (0, P, PROT_GROWSDOWN | PROT_GROWSUP)),
    ("mprotect GROWSDOWN on a plain VMA", "mprotect_raw", (-P, P, PROT_READ | PROT_GROWSDOWN)),
    ("mprotect GROWSUP on a plain VMA", "mprotect_raw", (-P, P, PROT_READ | PROT_GROWSUP)),
    ("mprotect len 0", "mprotect_raw", (0, 0, PROT_READ)),
    ("mprotect hole", "mprotect_raw", (0, P, PROT_READ)),
    ("mprotect wraps", "mprotect_raw", (0, U64 - P + 1, PROT_READ)),
    ("mprotect negative len", "mprotect_raw", (0, -1, PROT_READ)),
    ("madvise unknown advice", "madvise_raw", (0, P, 99)),
    ("madvise unknown advice, len 0", "madvise_raw", (0, 0, 999)),
    ("madvise unaligned", "madvise_raw", (1, P, MADV_DONTNEED)),
    ("madvise len 0", "madvise_raw", (0, 0, MADV_DONTNEED)),
    ("madvise hole", "madvise_raw", (0, P, MADV_DONTNEED)),
    ("madvise hole, flag advice", "madvise_raw", (0, P, MADV_DONTFORK)),
    ("madvise wraps", "madvise_raw", (0, U64 - P + 1, MADV_DONTNEED)),
    ("madvise negative len", "madvise_raw", (0, -1, MADV_DONTNEED)),
]


def _raw(side, op: str, args: tuple) -> tuple[str, object]:
    name = op.removesuffix("_raw")
    a = (side.base + args[0],) + tuple(args[1:])
    if name == "mmap":
        fn = side._mmap
        res = outcome(fn, *a)
        if res[0] == "ok":
            side.munmap((res[1] - side.base) // P, (args[1] + P - 1) // P)
            res = ("ok", res[1] - side.base)
        return res
    return outcome(side._call, name, *a)


@pytest.mark.parametrize("name,op,args", ERRNO_CASES, ids=[c[0] for c in ERRNO_CASES])
def test_errno_edge_cases(sides, name, op, args):
    k, e = sides
    assert _raw(e, op, args) == _raw(k, op, args)
    assert_same_state(k, e)


def test_mmap_fixed_above_task_size_is_enomem(sides):
    k, e = sides
    for side in (k, e):
        with pytest.raises(OSError) as ei:
            side._mmap(1 << 47, P, RW, PA | MAP_FIXED)
        assert ei.value.errno == errno.ENOMEM


def test_mprotect_over_hole_keeps_partial_progress(sides):
    k, e = sides
    # 0123456
    # AA BBB      mprotect(0, 6, R): A changes, the hole stops it with ENOMEM
    same(k, e, "mmap", 0, 2, RW, PA | MAP_FIXED)
    same(k, e, "mmap", 3, 3, RW, SA | MAP_FIXED)
    write_both(k, e, 0, b"A" * 10)
    assert same(k, e, "mprotect", 0, 6, PROT_READ) == ("errno", errno.ENOMEM)
    assert k.perms_at(0) == "r--p" and k.perms_at(3) == "rw-s"


def test_madvise_over_hole_advises_mapped_parts_then_enomem(sides):
    k, e = sides
    same(k, e, "mmap", 0, 2, RW, PA | MAP_FIXED)
    same(k, e, "mmap", 3, 2, RW, PA | MAP_FIXED)
    for page in (0, 1, 3, 4):
        write_both(k, e, page, bytes([page + 1]) * 64)
    assert same(k, e, "madvise", 0, 5, MADV_DONTNEED) == ("errno", errno.ENOMEM)
    assert k.read(3 * P, 64) == bytes(64)


def test_mprotect_exec_and_none(sides):
    k, e = sides
    same(k, e, "mmap", 0, 4, RW, PA | MAP_FIXED)
    same(k, e, "mprotect", 1, 1, PROT_READ | PROT_EXEC)
    same(k, e, "mprotect", 2, 1, PROT_NONE)
    same(k, e, "mprotect", 0, 4, RW)


def test_wipeonfork_on_shared_is_einval(sides):
    k, e = sides
    same(k, e, "mmap", 0, 2, RW, SA | MAP_FIXED)
    assert same(k, e, "madvise", 0, 2, MADV_WIPEONFORK) == ("errno", errno.EINVAL)
    same(k, e, "mmap", 2, 2, RW, PA | MAP_FIXED)
    # private part first: advised, then the shared VMA fails the call
    assert same(k, e, "madvise", 0, 4, MADV_WIPEONFORK) == ("errno", errno.EINVAL)
    assert same(k, e, "madvise", 2, 2, MADV_WIPEONFORK) == ("ok", None)


# -- layouts: merges and splits ---------------------------------------------------------


def test_adjacent_anonymous_mappings_merge(sides):
    k, e = sides
    same(k, e, "mmap", 0, 2, RW, PA | MAP_FIXED)
    same(k, e, "mmap", 2, 2, RW, PA | MAP_FIXED)
    write_both(k, e, 1, b"x")
    same(k, e, "mmap", 4, 2, RW, PA | MAP_FIXED)
    assert k.layout()[1] == (0, 6, "rw-p")


def test_prot_none_merges_with_the_guard_unless_accounted_and_written(sides):
    k, e = sides
    # guard[PROT_NONE] | 0 1 2 3 4 5
    same(k, e, "mmap", 0, 2, PROT_NONE, PA | MAP_FIXED)   # merges with the guard
    same(k, e, "mmap", 2, 2, RW, PA | MAP_FIXED)          # VM_ACCOUNT
    same(k, e, "mprotect", 2, 2, PROT_NONE)               # never written: unaccounted, merges
    assert k.layout()[0][1] == 4
    same(k, e, "mmap", 4, 2, RW, PA | MAP_FIXED)
    write_both(k, e, 4, b"w")                             # anon_vma: stays accounted
    same(k, e, "mprotect", 4, 2, PROT_NONE)
    assert k.layout()[1] == (4, 6, "---p")
    same(k, e, "mprotect", 2, 4, RW)


def test_mprotect_split_and_merge_back(sides):
    k, e = sides
    same(k, e, "mmap", 0, 6, RW, PA | MAP_FIXED)
    write_both(k, e, 0, b"a")
    same(k, e, "mprotect", 2, 2, PROT_READ)   # AABBAA
    assert len([v for v in k.layout() if 0 <= v[0] < 6]) == 3
    same(k, e, "mprotect", 2, 2, RW)          # merges back into one
    same(k, e, "mprotect", 0, 1, PROT_READ)
    same(k, e, "mprotect", 5, 1, PROT_READ)
    same(k, e, "mprotect", 0, 6, PROT_READ)


def test_munmap_middle_splits_and_fixed_replaces(sides):
    k, e = sides
    same(k, e, "mmap", 0, 8, RW, PA | MAP_FIXED)
    for page in range(8):
        write_both(k, e, page, bytes([0x40 + page]) * 100)
    same(k, e, "munmap", 3, 2)
    same(k, e, "mmap", 2, 4, PROT_READ, PA | MAP_FIXED)  # replaces 2 and 5, fills the hole
    same(k, e, "mmap", 0, 1, RW, SA | MAP_FIXED)
    same(k, e, "munmap", 0, 8)


def test_shared_mappings_never_merge_and_separately_written_private_ones_do_not(sides):
    k, e = sides
    same(k, e, "mmap", 0, 2, RW, SA | MAP_FIXED)
    same(k, e, "mmap", 2, 2, RW, SA | MAP_FIXED)
    same(k, e, "mmap", 4, 2, RW, PA | MAP_FIXED)
    write_both(k, e, 4, b"p")
    same(k, e, "mmap", 8, 2, RW, PA | MAP_FIXED)
    write_both(k, e, 8, b"q")  # its own anon_vma
    same(k, e, "mmap", 6, 2, RW, PA | MAP_FIXED)  # between two anon_vmas


def test_flag_advice_splits_vmas(sides):
    k, e = sides
    same(k, e, "mmap", 0, 6, RW, PA | MAP_FIXED)
    same(k, e, "madvise", 1, 2, MADV_DONTFORK)
    same(k, e, "madvise", 4, 1, MADV_RANDOM)
    same(k, e, "madvise", 1, 2, MADV_DOFORK)
    same(k, e, "madvise", 4, 1, MADV_NORMAL)
    assert [v for v in k.layout() if 0 <= v[0] < 6] == [(0, 6, "rw-p")]


def test_map_populate_and_noreserve(sides):
    k, e = sides
    same(k, e, "mmap", 0, 3, RW, PA | MAP_FIXED | MAP_POPULATE)
    same(k, e, "mmap", 3, 3, RW, PA | MAP_FIXED | 0x4000)  # MAP_NORESERVE: no VM_ACCOUNT
    same(k, e, "mmap", 6, 3, RW, PA | MAP_FIXED)


# -- contents ------------------------------------------------------------------------


def test_dontneed_zero_fills_private_and_keeps_shared(sides):
    k, e = sides
    same(k, e, "mmap", 0, 3, RW, PA | MAP_FIXED)
    same(k, e, "mmap", 4, 3, RW, SA | MAP_FIXED)
    for page in (0, 1, 2, 4, 5, 6):
        write_both(k, e, page, struct.pack("<Q", 0x1122334455667788 + page), off=100)
    same(k, e, "madvise", 1, 5, MADV_DONTNEED)
    assert k.read(P + 100, 8) == bytes(8)
    assert k.read(5 * P + 100, 8) != bytes(8)


def test_write_spanning_pages(sides):
    k, e = sides
    same(k, e, "mmap", 0, 3, RW, PA | MAP_FIXED)
    data = bytes(range(256)) * 20
    write_both(k, e, 0, data, off=P - 7)
    assert_same_state(k, e)


def _pagemap(addr: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // P * 8)
        return int.from_bytes(f.read(8), "little")


def test_pagemap_bits(sides):
    k, e = sides
    same(k, e, "mmap", 0, 2, RW, PA | MAP_FIXED)
    same(k, e, "mmap", 2, 2, RW, SA | MAP_FIXED)
    write_both(k, e, 0, b"w")
    k.read(P, 1)
    e.read(P, 1)
    write_both(k, e, 2, b"s")
    mask = PM_PRESENT | PM_SWAP | PM_FILE | PM_MMAP_EXCLUSIVE
    for page in range(5):
        kb = _pagemap(k.addr(page)) & mask
        eb = e.p.pagemap(e.addr(page)) & mask
        assert eb == kb, f"page {page}: kernel {kb:#x} vmemu {eb:#x}"


# -- signals ---------------------------------------------------------------------------


def _kernel_access(k: KernelSide, page: int, write: bool) -> tuple[str, object]:
    access = pytest.importorskip("vmemu.native.access")
    try:
        res = access.user_access(k.addr(page) + 8, 1, write=b"z" if write else None)
    except access.HelperUnavailable as exc:
        pytest.skip(str(exc))
    if res.ok:
        return ("ok", None)
    return ("signal", (res.signo, res.si_code, res.si_addr - k.base))


def _emu_access(e: EmuSide, page: int, write: bool) -> tuple[str, object]:
    try:
        if write:
            e.p.write(e.addr(page) + 8, b"z")
        else:
            e.p.read(e.addr(page) + 8, 1)
    except Exception as sig:  # noqa: BLE001 - a Signal, compared below
        return ("signal", (sig.si_signo, sig.si_code, sig.si_addr - e.base))
    return ("ok", None)


def test_signals_match(sides):
    k, e = sides
    same(k, e, "mmap", 0, 1, PROT_READ, PA | MAP_FIXED)
    same(k, e, "mmap", 1, 1, PROT_NONE, SA | MAP_FIXED)
    same(k, e, "mmap", 2, 1, RW, PA | MAP_FIXED)
    for page, write, want in [(0, True, SEGV_ACCERR), (1, False, SEGV_ACCERR),
                              (1, True, SEGV_ACCERR), (3, False, SEGV_MAPERR),
                              (0, False, None), (2, True, None)]:
        ko, eo = _kernel_access(k, page, write), _emu_access(e, page, write)
        assert eo == ko, (page, write)
        if want is not None:
            assert ko == ("signal", (SIGSEGV, want, page * P + 8))
    assert_same_state(k, e)


# -- fork ------------------------------------------------------------------------------


def _assert_same_fork(k, e, child_writes=()):
    ks = k.fork_snapshot(list(child_writes))
    es = e.fork_snapshot(list(child_writes))
    assert es[0] == ks[0], "child layouts differ"
    assert es[1].keys() == ks[1].keys()
    for page in ks[1]:
        assert es[1][page] == ks[1][page], f"child page {page} differs"
    assert_same_state(k, e, "in the parent after the child exited")


def test_fork_private_cow_and_shared(sides):
    k, e = sides
    same(k, e, "mmap", 0, 2, RW, PA | MAP_FIXED)
    same(k, e, "mmap", 2, 2, RW, SA | MAP_FIXED)
    write_both(k, e, 0, b"parent-private")
    write_both(k, e, 2, b"parent-shared")
    _assert_same_fork(k, e, [(0, b"child"), (1 * P, b"child1"), (2 * P, b"CHILD"),
                             (3 * P, b"child3")])
    assert k.read(0, 14) == b"parent-private"
    assert k.read(2 * P, 13) == b"CHILD-shared"[:5] + b"t-shared"


def test_fork_dontfork_and_wipeonfork(sides):
    k, e = sides
    same(k, e, "mmap", 0, 6, RW, PA | MAP_FIXED)
    for page in range(6):
        write_both(k, e, page, bytes([0x61 + page]) * 32)
    same(k, e, "madvise", 1, 1, MADV_DONTFORK)
    same(k, e, "madvise", 3, 2, MADV_WIPEONFORK)
    _assert_same_fork(k, e)
    same(k, e, "madvise", 1, 1, MADV_DOFORK)
    same(k, e, "madvise", 3, 1, MADV_KEEPONFORK)
    _assert_same_fork(k, e, [(0, b"!")])


# -- random sequences ------------------------------------------------------------------

PROTS = st.sampled_from([PROT_NONE, PROT_READ, RW])
PAGE = st.integers(0, WINDOW_PAGES - 1)
NPAGES = st.integers(1, 4)
OPS = st.one_of(
    st.tuples(st.just("mmap"), PAGE, NPAGES, PROTS,
              st.sampled_from([PA | MAP_FIXED, SA | MAP_FIXED, PA | MAP_FIXED_NOREPLACE])),
    st.tuples(st.just("munmap"), PAGE, NPAGES),
    st.tuples(st.just("mprotect"), PAGE, NPAGES, PROTS),
    st.tuples(st.just("madvise"), PAGE, NPAGES,
              st.sampled_from([MADV_DONTNEED, MADV_DONTFORK, MADV_DOFORK, MADV_WIPEONFORK,
                               MADV_KEEPONFORK, MADV_RANDOM, MADV_NORMAL])),
    st.tuples(st.just("write"), PAGE, st.integers(0, P - 8), st.integers(1, 255)),
)


@settings(max_examples=max(50, settings().max_examples // 2), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=12), fork_at_end=st.booleans())
def test_random_sequences_match_the_kernel(ops, fork_at_end):
    k, e = KernelSide(), EmuSide()
    try:
        for op in ops:
            if op[0] == "write":
                _, page, off, val = op
                perms = k.perms_at(page)
                data = bytes([val]) * 8
                if perms is not None and perms[1] == "w":
                    write_both(k, e, page, data, off)
                else:
                    code = SEGV_MAPERR if perms is None else SEGV_ACCERR
                    got = outcome(e.write, page * P + off, data)
                    assert got == ("signal", (SIGSEGV, code)), op
                assert_same_state(k, e, f"after {op}")
            else:
                same(k, e, *op)
        if fork_at_end:
            _assert_same_fork(k, e)
    finally:
        k.close()
        e.close()


def test_maps_lines_have_the_kernels_columns(sides):
    k, e = sides
    same(k, e, "mmap", 0, 1, RW, SA | MAP_FIXED)
    same(k, e, "mmap", 2, 1, PROT_READ, PA | MAP_FIXED)

    def lines(side):
        out = []
        for line in side.maps_text().splitlines():
            start = int(line.split("-")[0], 16)
            if start in (side.addr(0), side.addr(2)):
                f = line.split(maxsplit=5)
                # drop addresses and the inode number, keep columns and the name
                out.append((f[1], f[2], line.find("/"), line[73:]))
        return out

    assert lines(e) == lines(k)
