"""Fuzzing the public API with hostile arguments.

Whatever the arguments (negative, huge, unaligned, beyond 2**64, unknown
flag bits), a call on :class:`vmemu.Process` may only succeed, raise
``OSError`` carrying an errno, or raise a :class:`vmemu.Signal`; never an
IndexError, KeyError, AssertionError, ValueError, OverflowError or
``struct.error`` from the emulator's insides (the one exception by design:
a negative length to ``read`` is a ValueError, as for a Python buffer). A failed syscall leaves
``/proc/<pid>/maps`` as it was, except where the kernel itself keeps partial
progress: mprotect stopping at a hole (ENOMEM) and madvise applying its
advice around holes (ENOMEM) or up to the VMA that refuses it (EINVAL).
A syscall raises a signal only where Linux sends one to its caller:
MADV_HWPOISON on a mapped page is SIGBUS BUS_MCEERR_AR (``memory_failure``
with MF_ACTION_REQUIRED), and the mappings stay. After every call
``kernel.check()`` passes.
"""

from __future__ import annotations

import errno

from hypothesis import example, given, settings
from hypothesis import strategies as st

from vmemu import (
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DOFORK,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_KEEPONFORK,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_GROWSDOWN,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
    Kernel,
    Process,
    Signal,
)
from vmemu.constants import BUS_MCEERR_AR, MADV_HWPOISON

BASE = 0x1000_0000
WINDOW = 16 * PAGE_SIZE

# Integers a careless or hostile caller passes: edges of every range the
# kernel checks, plus anything at all.
EDGES = [0, 1, -1, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, -PAGE_SIZE, 2**31, 2**32,
         2**47, TASK_SIZE, TASK_SIZE - PAGE_SIZE, TASK_SIZE + PAGE_SIZE, 2**63 - 1, 2**63,
         2**64 - PAGE_SIZE, 2**64 - 1, 2**64, 2**64 + PAGE_SIZE, 2**100, -(2**64)]
hostile = st.one_of(
    st.sampled_from(EDGES),
    st.integers(-(2**70), 2**70),
    st.integers(0, 3 * WINDOW).map(lambda n: BASE + n - WINDOW),  # in and around the window
    st.integers(0, 20).map(lambda n: n * PAGE_SIZE),
)
addrs = st.one_of(hostile, st.integers(0, WINDOW // PAGE_SIZE).map(lambda i: BASE + i * PAGE_SIZE))
lengths = st.one_of(hostile, st.integers(0, 8).map(lambda i: i * PAGE_SIZE))
KNOWN_FLAGS = [MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE, MAP_ANONYMOUS, MAP_FIXED,
               MAP_FIXED_NOREPLACE, MAP_POPULATE, MAP_GROWSDOWN, MAP_HUGETLB, MAP_LOCKED,
               MAP_NORESERVE]
map_flags = st.one_of(
    st.lists(st.sampled_from(KNOWN_FLAGS), max_size=4).map(lambda fs: sum(set(fs))),
    st.integers(-(2**33), 2**33),
)
prots = st.one_of(st.integers(0, 7), st.integers(-(2**33), 2**33),
                  st.sampled_from([PROT_GROWSDOWN | PROT_READ, 0x08, 0x10]))
advices = st.one_of(
    st.sampled_from([MADV_DONTNEED, MADV_FREE, MADV_DONTFORK, MADV_DOFORK, MADV_WIPEONFORK,
                     MADV_KEEPONFORK, MADV_POPULATE_READ, MADV_POPULATE_WRITE]),
    st.integers(-5, 130), st.integers(-(2**40), 2**40),
)

# Calls that touch every page of their range are kept below this size:
# populating a 2**46-byte mapping is as hopeless here as on Linux.
BIG = 256 * PAGE_SIZE
PER_PAGE_ADVICE = {MADV_POPULATE_READ, MADV_POPULATE_WRITE, MADV_WILLNEED, MADV_COLD,
                   MADV_PAGEOUT, MADV_COLLAPSE}

calls = st.one_of(
    st.tuples(st.just("mmap"), addrs, lengths, prots, map_flags),
    st.tuples(st.just("munmap"), addrs, lengths),
    st.tuples(st.just("mprotect"), addrs, lengths, prots),
    st.tuples(st.just("madvise"), addrs, lengths, advices),
    st.tuples(st.just("read"), addrs,
              st.one_of(st.integers(-5, 3 * PAGE_SIZE), st.integers(-(2**70), BIG))),
    st.tuples(st.just("write"), addrs, st.integers(0, 3 * PAGE_SIZE)),
    st.tuples(st.sampled_from(["read_u8", "read_u16", "read_u32", "read_u64"]), addrs),
    st.tuples(st.sampled_from(["write_u8", "write_u16", "write_u32", "write_u64"]), addrs,
              hostile),
)

# errors whose partial progress the kernel keeps
PARTIAL_OK = {("mprotect", errno.ENOMEM), ("madvise", errno.ENOMEM), ("madvise", errno.EINVAL)}


def make_process() -> Process:
    """A process with a private, a shared and a read-only mapping in the window, and a hole."""
    p = Kernel().spawn()
    rw = PROT_READ | PROT_WRITE
    p.mmap(BASE, 4 * PAGE_SIZE, rw, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    p.mmap(BASE + 4 * PAGE_SIZE, 4 * PAGE_SIZE, rw, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED)
    p.mmap(BASE + 10 * PAGE_SIZE, 4 * PAGE_SIZE, PROT_READ | PROT_EXEC,
           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    p.write(BASE, b"x" * (6 * PAGE_SIZE))
    return p


def do_call(p: Process, call: tuple[object, ...]) -> None:
    """Perform one fuzzed call."""
    name, *args = call
    if name == "mmap" and args[1] > BIG:  # type: ignore[operator]
        args[3] &= ~(MAP_POPULATE | MAP_LOCKED)  # type: ignore[operator]
    if name == "madvise" and args[2] in PER_PAGE_ADVICE and args[1] > BIG:  # type: ignore[operator]
        args[1] = BIG
    if name == "write":
        addr, n = args
        p.write(addr, b"\x5a" * n)  # type: ignore[arg-type]
    elif name in ("mmap", "munmap", "mprotect", "madvise"):
        getattr(p, name)(*args)
    else:
        getattr(p.main, name)(*args)


@settings(max_examples=max(20, 2 * settings().max_examples))
@given(st.lists(calls, min_size=1, max_size=12))
@example([("madvise", BASE, 1, MADV_HWPOISON)])  # SIGBUS to the caller, maps unchanged
def test_hostile_arguments(seq: list[tuple[object, ...]]) -> None:
    p = make_process()
    for call in seq:
        before = p.maps()
        try:
            do_call(p, call)
        except OSError as e:
            assert isinstance(e.errno, int) and e.errno in errno.errorcode, f"{call}: {e!r}"
            if (call[0], e.errno) not in PARTIAL_OK:
                assert p.maps() == before, f"{call} failed with {e!r} but changed maps"
        except ValueError:
            # the one documented ValueError: a negative length to read()
            # (tests/mmu/test_access.py::test_negative_read_length_is_rejected)
            assert call[0] == "read" and call[2] < 0, f"{call} raised ValueError"  # type: ignore[operator]
            assert p.maps() == before
        except Signal as sig:
            assert isinstance(sig.si_code, int) and isinstance(sig.si_addr, int)
            assert call[0] not in ("mmap", "munmap", "mprotect", "madvise") or (
                call[0] == "madvise" and call[3] == MADV_HWPOISON
                and sig.si_code == BUS_MCEERR_AR), f"a syscall raised {sig!r}"
            assert p.maps() == before, f"{call} faulted but changed maps"
        p.kernel.check()
    p.exit()
    p.kernel.check()


@settings(max_examples=max(20, settings().max_examples // 2))
@given(addr=hostile, n=st.integers(0, 16))
def test_access_outside_user_space_is_maperr(addr: int, n: int) -> None:
    """Every address outside [0, TASK_SIZE) or unmapped faults with SEGV_MAPERR there."""
    from vmemu import SEGV_MAPERR

    p = Kernel().spawn()
    for op in ("read", "write"):
        try:
            if op == "read":
                p.read(addr, max(n, 1))
            else:
                p.write(addr, b"\1" * max(n, 1))
        except Signal as sig:
            assert sig.si_code == SEGV_MAPERR and sig.si_addr == addr and sig.done == 0
        else:
            raise AssertionError(f"{op} at {addr:#x} in an empty address space succeeded")
