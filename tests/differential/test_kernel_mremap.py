"""mremap on vmemu against mremap on the real kernel: errnos, layouts, contents.

Both sides use the windows of :mod:`_kernel` (a 16-page hole in a 64 MiB
PROT_NONE reservation); addresses are pages relative to the window base. A
MAYMOVE move that the kernel places by itself lands outside the
reservation on both sides: the result is compared as "elsewhere", the
moved contents are compared at the returned addresses, and the mapping is
then unmapped on both sides so the windows stay comparable.
"""

from __future__ import annotations

import pytest
from _kernel import (
    ON_LINUX_X86_64,
    RESERVE,
    SKIP_REASON,
    WINDOW_PAGES,
    EmuSide,
    KernelSide,
    Side,
    libc,
    outcome,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmemu import MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE
from vmemu.constants import (
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)

pytestmark = [
    pytest.mark.differential,
    pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON),
]

P = PAGE_SIZE
PA = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED
SA = MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED
RW = PROT_READ | PROT_WRITE
MAY, FIX, DU = MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP


def mremap(side: Side, page: int, old: int, new: int, flags: int, new_page: int,
           byte_off: int = 0) -> object:
    """mremap in pages; the result is a window page, or ("elsewhere", npages, data)."""
    new_addr = side.addr(new_page) if flags & (FIX | DU) else 0
    call = libc.mremap if isinstance(side, KernelSide) else side.p.mremap  # type: ignore[attr-defined]
    got = call(side.addr(page) + byte_off, old * P, new * P, flags, new_addr)
    if side.reserve <= got < side.reserve + RESERVE:
        return (got - side.base) // P
    # placed by the kernel (or vmemu) outside the reservation: read, then drop it
    data = side.read(got - side.base, new * P) if new else b""
    if isinstance(side, KernelSide):
        libc.munmap(got, new * P)
    else:
        side.p.munmap(got, new * P)  # type: ignore[attr-defined]
    return ("elsewhere", new, data)


def same(k: KernelSide, e: EmuSide, *args: int) -> object:
    ko = outcome(mremap, k, *args)
    eo = outcome(mremap, e, *args)
    assert eo == ko, f"mremap{args}: kernel {ko}, vmemu {eo}"
    check_state(k, e, f"after mremap{args}")
    return ko


def check_state(k: KernelSide, e: EmuSide, when: str) -> None:
    assert e.layout() == k.layout(), when
    kc, ec = k.contents(), e.contents()
    assert ec == kc, when
    e.p.check()


def both(k: KernelSide, e: EmuSide, op: str, *args: int) -> None:
    for s in (k, e):
        getattr(s, op)(*args)


def fill(k: KernelSide, e: EmuSide, page: int, npages: int) -> None:
    for i in range(npages):
        data = bytes([page + i + 1]) * 16
        k.write((page + i) * P + 8, data)
        e.write((page + i) * P + 8, data)


@pytest.fixture
def sides():
    k, e = KernelSide(), EmuSide()
    yield k, e
    k.close()
    e.close()


# (name, setup [(page, npages, prot, flags, filled)], mremap args
#  (page, old, new, flags, new_page[, byte_off]))
CASES = [
    ("bad flags", [(0, 2, RW, PA, True)], (0, 2, 2, 8, 0)),
    ("unaligned old", [(0, 2, RW, PA, True)], (0, 1, 1, 0, 0, 1)),
    ("new_len 0", [(0, 2, RW, PA, True)], (0, 2, 0, 0, 0)),
    ("FIXED without MAYMOVE", [(0, 2, RW, PA, True)], (0, 2, 2, FIX, 8)),
    ("DONTUNMAP without MAYMOVE", [(0, 2, RW, PA, True)], (0, 2, 2, DU, 8)),
    ("DONTUNMAP resize", [(0, 2, RW, PA, True)], (0, 2, 3, DU | MAY, 8)),
    ("overlap", [(0, 4, RW, PA, True)], (0, 4, 4, FIX | MAY, 2)),
    ("hole at old", [(2, 2, RW, PA, True)], (0, 1, 2, MAY, 0)),
    ("grow blocked, no MAYMOVE", [(0, 2, RW, PA, True), (2, 2, PROT_READ, PA, False)],
     (0, 2, 3, 0, 0)),
    ("grow middle, no MAYMOVE", [(0, 4, RW, PA, True)], (0, 2, 3, 0, 0)),
    ("grow across end", [(0, 2, RW, PA, True), (2, 2, PROT_READ, PA, False)],
     (0, 3, 5, MAY, 0)),
    ("grow in place", [(0, 2, RW, PA, True)], (0, 2, 4, 0, 0)),
    ("grow moves", [(0, 2, RW, PA, True), (2, 1, PROT_READ, PA, False)], (0, 2, 4, MAY, 0)),
    ("shrink", [(0, 4, RW, PA, True)], (0, 4, 1, 0, 0)),
    ("shrink across VMAs", [(0, 2, RW, PA, True), (2, 2, PROT_READ, PA, True)],
     (0, 4, 1, 0, 0)),
    ("same size no-op", [(0, 2, RW, PA, True)], (0, 2, 2, 0, 0)),
    ("fixed move", [(0, 3, RW, PA, True)], (0, 3, 3, FIX | MAY, 8)),
    ("fixed move middle", [(0, 4, RW, PA, True)], (1, 2, 2, FIX | MAY, 8)),
    ("fixed move over a mapping", [(0, 2, RW, PA, True), (8, 4, PROT_READ, PA, True)],
     (0, 2, 2, FIX | MAY, 9)),
    ("fixed grow", [(0, 2, RW, PA, True)], (0, 2, 4, FIX | MAY, 8)),
    ("fixed shrink", [(0, 4, RW, PA, True)], (0, 4, 2, FIX | MAY, 8)),
    ("fixed move, multiple VMAs", [(0, 2, RW, PA, True), (2, 2, PROT_READ, PA, True)],
     (0, 4, 4, FIX | MAY, 8)),
    ("fixed move, gap inside", [(0, 2, RW, PA, True), (3, 2, RW, SA, True)],
     (0, 5, 5, FIX | MAY, 8)),
    ("fixed move, gap at start", [(1, 2, RW, PA, True)], (0, 3, 3, FIX | MAY, 8)),
    ("fixed move, gap at end", [(0, 2, RW, PA, True)], (0, 3, 3, FIX | MAY, 8)),
    ("fixed grow, gap at end", [(0, 2, RW, PA, True)], (0, 3, 4, FIX | MAY, 8)),
    ("unfaulted move merges", [(0, 2, RW, PA, False), (10, 2, RW, PA, False)],
     (0, 2, 2, FIX | MAY, 8)),
    ("faulted move does not merge", [(0, 2, RW, PA, True), (10, 2, RW, PA, False)],
     (0, 2, 2, FIX | MAY, 8)),
    ("move next to itself", [(0, 4, RW, PA, True)], (2, 2, 2, FIX | MAY, 4)),
    ("dontunmap private", [(0, 3, RW, PA, True)], (0, 3, 3, DU | MAY | FIX, 8)),
    ("dontunmap part", [(0, 4, RW, PA, True)], (1, 2, 2, DU | MAY | FIX, 8)),
    ("dontunmap shared", [(0, 3, RW, SA, True)], (0, 3, 3, DU | MAY | FIX, 8)),
    ("dontunmap hinted", [(0, 2, RW, PA, True)], (0, 2, 2, DU | MAY, 8)),
    ("shared move", [(0, 3, RW, SA, True)], (0, 3, 3, FIX | MAY, 8)),
    ("shared shrink+move", [(0, 3, RW, SA, True)], (0, 3, 1, FIX | MAY, 8)),
    ("old_len 0 private", [(0, 2, RW, PA, True)], (0, 0, 2, FIX | MAY, 8)),
    ("old_len 0 shared", [(0, 2, RW, SA, True)], (0, 0, 2, FIX | MAY, 8)),
    ("prot none move", [(0, 2, PROT_NONE, PA, False)], (0, 2, 2, FIX | MAY, 8)),
    ("read-only zero pages move", [(0, 2, PROT_READ, PA, False)], (0, 2, 2, FIX | MAY, 8)),
]


@pytest.mark.parametrize("name,setup,args", CASES, ids=[c[0] for c in CASES])
def test_mremap_cases(sides, name, setup, args):
    k, e = sides
    for page, npages, prot, flags, filled in setup:
        both(k, e, "mmap", page, npages, prot | (PROT_WRITE if filled else 0), flags)
        if filled:
            fill(k, e, page, npages)
            if not prot & PROT_WRITE:
                both(k, e, "mprotect", page, npages, prot)
        elif prot & PROT_READ:
            for i in range(npages):
                assert k.read((page + i) * P, 1) == e.read((page + i) * P, 1)
    check_state(k, e, "after setup")
    same(k, e, *args)


def test_grow_shared_beyond_its_size_is_sigbus(sides):
    from vmemu.native import access

    k, e = sides
    both(k, e, "mmap", 0, 2, RW, SA)
    fill(k, e, 0, 2)
    assert outcome(mremap, k, 0, 2, 4, 0, 0) == outcome(mremap, e, 0, 2, 4, 0, 0) == ("ok", 0)
    assert e.layout() == k.layout()
    assert k.read(0, 2 * P) == e.read(0, 2 * P)  # pages 2-3 lie beyond the shmem size
    try:
        kr = access.user_access(k.addr(3), 1)
    except access.HelperUnavailable as why:
        pytest.skip(str(why))
    eo = outcome(e.read, 3 * P, 1)
    assert eo == ("signal", (kr.signo, kr.si_code))


def test_locked_grow_populates(sides):
    k, e = sides
    both(k, e, "mmap", 0, 2, RW, PA)
    libc.syscall(149, k.addr(0), 2 * P)  # mlock
    e.p.mlock(e.addr(0), 2 * P)
    same(k, e, 0, 2, 4, 0, 0)
    ks = _smaps_block(open("/proc/self/smaps").read(), k.addr(0))
    es = _smaps_block(e.p.smaps(), e.addr(0))
    assert ks["Rss:"] == es["Rss:"] == ks["Locked:"] == es["Locked:"] == "16"
    assert "lo" in ks["VmFlags:"] and "lo" in es["VmFlags:"]


def _smaps_block(text: str, addr: int) -> dict[str, str]:
    """The fields of the smaps block of the VMA starting at ``addr``."""
    out: dict[str, str] = {}
    inside = False
    for line in text.splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            inside = int(head.split("-")[0], 16) == addr
        elif inside:
            key, _, rest = line.partition(" ")
            out[key] = rest.split()[0] if key != "VmFlags:" else rest
    return out


# -- bounded random sequences ---------------------------------------------------------

PG = st.integers(0, WINDOW_PAGES - 1)
N = st.integers(1, 4)
FLAGS = st.sampled_from([0, MAY, MAY | FIX, MAY | FIX | DU, FIX, DU | MAY, 8])
OPS = st.one_of(
    # private only: a shared mapping grown past its shmem size would SIGBUS the reader
    st.tuples(st.just("mmap"), PG, N, st.sampled_from([RW, PROT_READ]), st.just(PA)),
    st.tuples(st.just("munmap"), PG, N),
    st.tuples(st.just("fill"), PG, N),
    st.tuples(st.just("mremap"), PG, st.integers(0, 4), N, FLAGS, PG),
)


@settings(max_examples=max(40, settings().max_examples * 2 // 5), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=10))
def test_random_mremap_sequences_match_the_kernel(ops):
    k, e = KernelSide(), EmuSide()
    try:
        for op in ops:
            if op[0] == "mremap":
                same(k, e, *op[1:])
            elif op[0] == "fill":
                _, page, n = op
                for i in range(page, min(page + n, WINDOW_PAGES)):
                    perms = k.perms_at(i)
                    if perms is not None and perms[1] == "w":
                        fill(k, e, i, 1)
                check_state(k, e, f"after {op}")
            else:
                ko = outcome(getattr(k, op[0]), *op[1:])
                eo = outcome(getattr(e, op[0]), *op[1:])
                assert eo == ko, op
                check_state(k, e, f"after {op}")
    finally:
        k.close()
        e.close()
