"""The two call styles of a range ioctl give the same result, errno, struct and memory.

``uffd.copy(dst, src, len)`` runs the operation on plain integers and builds
the uABI struct only to go with an error; ``uffd.ioctl(UFFDIO_COPY,
uffdio_copy(...))`` fills the struct in. Every outcome - bytes done, an errno
with the output field the kernel writes (or leaves untouched), a partial
EAGAIN - and the address space afterwards must be the same either way.
"""

from __future__ import annotations

import errno
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

import vmemu
from vmemu.constants import MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE
from vmemu.uffd import uapi

RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
PAGES = 4


def _world(shmem: bool, populate: int, api: bool) -> tuple[Any, Any, int, int]:
    """A process, its uffd, a registered 4-page destination (page ``populate`` filled, if
    in range) and a populated 4-page source."""
    p = vmemu.Process()
    u = p.userfaultfd(uapi.O_NONBLOCK)
    if api:
        u.api(uapi.UFFD_FEATURE_MINOR_SHMEM | uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP
              | uapi.UFFD_FEATURE_WP_UNPOPULATED)
    src = p.mmap(0, PAGES * PAGE_SIZE, RW, ANON)
    p.write(src, bytes(range(256)) * 16 * PAGES)
    if shmem:
        fd = p.memfd_create("styles")
        p.ftruncate(fd, PAGES * PAGE_SIZE)
        p.pwrite(fd, b"\xc3" * PAGE_SIZE, 0)  # page 0 cached
        dst = p.mmap(0, PAGES * PAGE_SIZE, RW, MAP_SHARED, fd, 0)
        mode = uapi.UFFDIO_REGISTER_MODE_MINOR | uapi.UFFDIO_REGISTER_MODE_WP
    else:
        dst = p.mmap(0, PAGES * PAGE_SIZE, RW, ANON)
        mode = uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_WP
    if 0 <= populate < PAGES:
        p.write(dst + populate * PAGE_SIZE, b"\x77")  # before registering: no fault to serve
    if api:
        u.register(dst, PAGES * PAGE_SIZE, mode)
    return p, u, dst, src


def _struct(op: str, dst: int, src: int, length: int, mode: int) -> Any:
    r = uapi.uffdio_range(dst, length)
    return {
        "copy": lambda: uapi.uffdio_copy(dst, src, length, mode),
        "zeropage": lambda: uapi.uffdio_zeropage(r, mode),
        "continue_": lambda: uapi.uffdio_continue(r, mode),
        "move": lambda: uapi.uffdio_move(dst, src, length, mode),
        "writeprotect": lambda: uapi.uffdio_writeprotect(r, mode),
        "poison": lambda: uapi.uffdio_poison(r, mode),
    }[op]()


_CMD = {"copy": uapi.UFFDIO_COPY, "zeropage": uapi.UFFDIO_ZEROPAGE,
        "continue_": uapi.UFFDIO_CONTINUE, "move": uapi.UFFDIO_MOVE,
        "writeprotect": uapi.UFFDIO_WRITEPROTECT, "poison": uapi.UFFDIO_POISON}
_FIELD = {"copy": "copy", "zeropage": "zeropage", "continue_": "mapped", "move": "move",
          "writeprotect": None, "poison": "updated"}


def _call(style: str, u: Any, op: str, dst: int, src: int, length: int, mode: int) -> Any:
    """The call's outcome: ("ok", value) or ("err", errno, the struct's output field)."""
    try:
        if style == "ioctl":
            arg = _struct(op, dst, src, length, mode)
            u.ioctl(_CMD[op], arg)
            field = _FIELD[op]
            return ("ok", None if field is None else getattr(arg, field))
        if op in ("copy", "move"):
            return ("ok", getattr(u, op)(dst, src, length, mode))
        return ("ok", getattr(u, op)(dst, length, mode))
    except OSError as e:
        field = _FIELD[op]
        assert type(e.struct) is type(_struct(op, dst, src, length, mode))
        return ("err", e.errno, None if field is None else getattr(e.struct, field))


def _state(p: Any, dst: int) -> list[Any]:
    """Each destination page's pagemap entry, and its bytes where present."""
    out = []
    for i in range(PAGES):
        entry = p.pagemap(dst + i * PAGE_SIZE)
        out.append((entry, p.read(dst + i * PAGE_SIZE, PAGE_SIZE) if entry >> 63 else None))
    return out


def _mostly(common: list[Any], rare: list[Any]) -> st.SearchStrategy[Any]:
    """One of ``common`` four times in five, else one of ``rare``."""
    return st.sampled_from(common * 4 * len(rare) + rare * len(common))


_OPS = st.sampled_from(sorted(_CMD))
_MODES = _mostly([0, 1, 2], [3, 4, 8])  # DONTWAKE, WP / ALLOW_SRC_HOLES; bad combinations
_OFFSETS = _mostly([0, PAGE_SIZE, 3 * PAGE_SIZE], [1, -PAGE_SIZE, 1 << 47])
_LENGTHS = _mostly([PAGE_SIZE, 2 * PAGE_SIZE, PAGES * PAGE_SIZE],
                   [8 * PAGE_SIZE, 0, 100, 1 << 48])


@settings(max_examples=200, deadline=None)
@given(op=_OPS, shmem=st.booleans(), populate=st.integers(-1, PAGES - 1),
       api=_mostly([True], [False]), changing=_mostly([False], [True]),
       traced=st.booleans(), dst_off=_OFFSETS,
       src_off=_mostly([0, PAGE_SIZE], [1, 1 << 47]), length=_LENGTHS, mode=_MODES)
def test_method_and_ioctl_agree(op: str, shmem: bool, populate: int, api: bool, changing: bool,
                                traced: bool, dst_off: int, src_off: int, length: int,
                                mode: int) -> None:
    results = []
    for style in ("method", "ioctl"):
        p, u, dst, src = _world(shmem, populate, api)
        if changing:
            u.mmap_changing += 1  # as while a non-cooperative event is unread
        u.tracer.enabled = traced
        got = _call(style, u, op, dst + dst_off, src + src_off, length, mode)
        u.tracer.enabled = False
        u.mmap_changing = 0
        p.check()
        results.append((got, _state(p, dst)))
    assert results[0] == results[1]
    event(f"{op}: {'ok' if got[0] == 'ok' else errno.errorcode[got[1]]}")


def test_method_errors_carry_the_struct_the_kernel_left() -> None:
    p, u, dst, src = _world(False, 1, True)
    # EEXIST on the populated page: the output field gets -EEXIST
    for op, field in (("copy", "copy"), ("move", "move")):
        try:
            getattr(u, op)(dst + PAGE_SIZE, src, PAGE_SIZE)
        except OSError as e:
            assert e.errno == errno.EEXIST
            assert getattr(e.struct, field) == -errno.EEXIST
            assert (e.struct.dst, e.struct.src, e.struct.len) == (dst + PAGE_SIZE, src, PAGE_SIZE)
        else:
            raise AssertionError(f"{op} onto a populated page succeeded")
    # partial progress: two pages asked, the second populated - EAGAIN, 4096 in the field
    try:
        u.zeropage(dst, 2 * PAGE_SIZE)
    except OSError as e:
        assert e.errno == errno.EAGAIN and e.struct.zeropage == PAGE_SIZE
    else:
        raise AssertionError("a zeropage over a populated page succeeded")
    # a validation failure leaves the field as the caller set it (0)
    try:
        u.copy(dst + 1, src, PAGE_SIZE)
    except OSError as e:
        assert e.errno == errno.EINVAL and e.struct.copy == 0
    else:
        raise AssertionError("an unaligned destination was accepted")
    # WRITEPROTECT has no output field; WP|DONTWAKE is EINVAL
    try:
        u.writeprotect(dst, PAGE_SIZE, uapi.UFFDIO_WRITEPROTECT_MODE_WP
                       | uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
    except OSError as e:
        assert e.errno == errno.EINVAL and isinstance(e.struct, uapi.uffdio_writeprotect)
    else:
        raise AssertionError("WP|DONTWAKE was accepted")
    p.check()
