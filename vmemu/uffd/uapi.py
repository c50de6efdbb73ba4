"""The userfaultfd uABI: ``include/uapi/linux/userfaultfd.h`` as Python.

Every constant keeps its C name and value, every struct its C field names,
order and size, so a handler ported from C reads line for line. Nothing
here depends on the emulator: the same structs are handed to the real
kernel by :mod:`vmemu.native.userfaultfd` and to vmemu's own uffd.

The ioctl numbers are computed with the asm-generic ``_IOC`` encoding used
by x86, arm, arm64 and riscv (direction in bits 30-31 with WRITE=1 and
READ=2, argument size in bits 16-29, type in bits 8-15, number in bits
0-7). ``UFFDIO_UNREGISTER`` and ``UFFDIO_WAKE`` are ``_IOR`` although the
kernel only reads their argument: the header keeps that mistake for ABI
compatibility, and so do we.

Structs are mutable (``attrs.define``) because the kernel writes output
fields back (``uffdio_copy.copy``, ``uffdio_register.ioctls``, ...).
``pack()`` gives the exact little-endian C layout; ``unpack()`` reads it.
``struct uffd_msg`` is decoded into frozen event classes by
:func:`decode_msg`; each one packs back to exactly 32 bytes with every
reserved byte zero, as the kernel's ``msg_init()`` leaves them.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Self, cast

import attrs

# ---------------------------------------------------------------------------
# ioctl number encoding (include/uapi/asm-generic/ioctl.h)
# ---------------------------------------------------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(dir: int, type: int, nr: int, size: int) -> int:  # noqa: N802 - C macro name
    """Encode an ioctl command number: the kernel's ``_IOC(dir, type, nr, size)``."""
    return (
        (dir << _IOC_DIRSHIFT)
        | (type << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type: int, nr: int) -> int:  # noqa: N802
    """An ioctl without an argument struct: ``_IO(type, nr)``."""
    return _IOC(_IOC_NONE, type, nr, 0)


def _IOR(type: int, nr: int, size: int) -> int:  # noqa: N802
    """An ioctl whose argument the kernel writes: ``_IOR(type, nr, type)``."""
    return _IOC(_IOC_READ, type, nr, size)


def _IOW(type: int, nr: int, size: int) -> int:  # noqa: N802
    """An ioctl whose argument the kernel reads: ``_IOW(type, nr, type)``."""
    return _IOC(_IOC_WRITE, type, nr, size)


def _IOWR(type: int, nr: int, size: int) -> int:  # noqa: N802
    """An ioctl whose argument goes both ways: ``_IOWR(type, nr, type)``."""
    return _IOC(_IOC_READ | _IOC_WRITE, type, nr, size)


# ---------------------------------------------------------------------------
# API version, ioctl numbers and masks
# ---------------------------------------------------------------------------

UFFD_API = 0xAA
UFFDIO = 0xAA

_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08
_UFFDIO_API = 0x3F

UFFD_API_IOCTLS = (1 << _UFFDIO_REGISTER) | (1 << _UFFDIO_UNREGISTER) | (1 << _UFFDIO_API)
UFFD_API_RANGE_IOCTLS = (
    (1 << _UFFDIO_WAKE)
    | (1 << _UFFDIO_COPY)
    | (1 << _UFFDIO_ZEROPAGE)
    | (1 << _UFFDIO_MOVE)
    | (1 << _UFFDIO_WRITEPROTECT)
    | (1 << _UFFDIO_CONTINUE)
    | (1 << _UFFDIO_POISON)
)
UFFD_API_RANGE_IOCTLS_BASIC = (
    (1 << _UFFDIO_WAKE)
    | (1 << _UFFDIO_COPY)
    | (1 << _UFFDIO_WRITEPROTECT)
    | (1 << _UFFDIO_CONTINUE)
    | (1 << _UFFDIO_POISON)
)

# Register modes (uffdio_register.mode).
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFD_API_REGISTER_MODES = (
    UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MINOR
)

# Mode flags of the resolving ioctls.
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1
UFFDIO_POISON_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1

# Events (uffd_msg.event); they start at 0x12 "to be more strict against bugs".
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

# uffd_msg.arg.pagefault.flags. Neither WP nor MINOR means a missing fault.
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

# Feature bits (uffdio_api.features).
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16
UFFD_API_FEATURES = (1 << 17) - 1
# Kernel-internal (fs/userfaultfd.c): marks a ctx whose UFFDIO_API succeeded;
# shows in /proc/<pid>/fdinfo, never accepted from userland.
UFFD_FEATURE_INITIALIZED = 1 << 31

# Flags of userfaultfd(2) and USERFAULTFD_IOC_NEW.
UFFD_USER_MODE_ONLY = 1
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000
UFFD_SHARED_FCNTL_FLAGS = O_CLOEXEC | O_NONBLOCK

# /dev/userfaultfd (misc device, Linux 6.1)
USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)

# userfaultfd(2) syscall number on x86-64.
NR_userfaultfd = 323


# ---------------------------------------------------------------------------
# Argument structs
# ---------------------------------------------------------------------------


def _fields(cls: type) -> tuple[attrs.Attribute[Any], ...]:
    """``attrs.fields`` for a struct class (typed loosely for the mixin)."""
    return tuple(attrs.fields(cast(Any, cls)))


class _Struct:
    """Common pack/unpack over a little-endian ``struct`` format of u64/s64 fields.

    A field named ``range`` holds a nested :class:`uffdio_range` and occupies
    two u64 slots, as ``struct uffdio_range range`` does in C.
    """

    _FMT: ClassVar[struct.Struct]

    def _flat(self) -> list[int]:
        vals: list[int] = []
        for a in _fields(type(self)):
            v = getattr(self, a.name)
            if a.name == "range":
                vals += [v.start, v.len]
            else:
                vals.append(v)
        return vals

    @classmethod
    def _unflat(cls, vals: tuple[int, ...]) -> list[Any]:
        it = iter(vals)
        out: list[Any] = []
        for a in _fields(cls):
            if a.name == "range":
                out.append(uffdio_range(next(it), next(it)))
            else:
                out.append(next(it))
        return out

    def pack(self) -> bytes:
        """The struct's bytes in the C layout."""
        return self._FMT.pack(*self._flat())

    @classmethod
    def unpack(cls, b: bytes | bytearray | memoryview) -> Self:
        """Parse the C layout; ``b`` must be exactly ``sizeof`` bytes."""
        if len(b) != cls._FMT.size:
            raise ValueError(f"{cls.__name__} is {cls._FMT.size} bytes, got {len(b)}")
        return cls(*cls._unflat(cls._FMT.unpack(bytes(b))))

    @classmethod
    def sizeof(cls) -> int:
        """``sizeof(struct ...)`` in C."""
        return cls._FMT.size

    def assign(self, b: bytes | bytearray | memoryview) -> None:
        """Overwrite every field from the C layout ``b`` (the kernel's write-back)."""
        vals = self._unflat(self._FMT.unpack(bytes(b)))
        for a, v in zip(_fields(type(self)), vals, strict=True):
            setattr(self, a.name, v)


@attrs.define
class uffdio_range(_Struct):  # noqa: N801 - C struct name
    """``struct uffdio_range`` (16 bytes): a half-open range ``[start, start+len)``."""

    _FMT: ClassVar[struct.Struct] = struct.Struct("<QQ")
    start: int = 0
    len: int = 0


@attrs.define
class uffdio_api(_Struct):  # noqa: N801
    """``struct uffdio_api`` (24 bytes): the UFFDIO_API handshake.

    In: ``api`` (must be UFFD_API) and ``features`` wanted. Out: ``features``
    supported and ``ioctls`` (UFFD_API_IOCTLS); all zero after a failure.
    """

    _FMT: ClassVar[struct.Struct] = struct.Struct("<QQQ")
    api: int = UFFD_API
    features: int = 0
    ioctls: int = 0


@attrs.define
class uffdio_register(_Struct):  # noqa: N801
    """``struct uffdio_register`` (32 bytes): range, mode in; ``ioctls`` out."""

    _FMT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")
    range: uffdio_range = attrs.Factory(uffdio_range)
    mode: int = 0
    ioctls: int = 0


@attrs.define
class uffdio_copy(_Struct):  # noqa: N801
    """``struct uffdio_copy`` (40 bytes): ``copy`` out = bytes copied or -errno."""

    _FMT: ClassVar[struct.Struct] = struct.Struct("<QQQQq")
    dst: int = 0
    src: int = 0
    len: int = 0
    mode: int = 0
    copy: int = 0


@attrs.define
class uffdio_zeropage(_Struct):  # noqa: N801
    """``struct uffdio_zeropage`` (32 bytes): ``zeropage`` out = bytes zeroed or -errno."""

    _FMT: ClassVar[struct.Struct] = struct.Struct("<QQQq")
    range: uffdio_range = attrs.Factory(uffdio_range)
    mode: int = 0
    zeropage: int = 0


@attrs.define
class uffdio_writeprotect(_Struct):  # noqa: N801
    """``struct uffdio_writeprotect`` (24 bytes): no output field."""

    _FMT: ClassVar[struct.Struct] = struct.Struct("<QQQ")
    range: uffdio_range = attrs.Factory(uffdio_range)
    mode: int = 0


@attrs.define
class uffdio_continue(_Struct):  # noqa: N801
    """``struct uffdio_continue`` (32 bytes): ``mapped`` out = bytes mapped or -errno."""

    _FMT: ClassVar[struct.Struct] = struct.Struct("<QQQq")
    range: uffdio_range = attrs.Factory(uffdio_range)
    mode: int = 0
    mapped: int = 0


@attrs.define
class uffdio_poison(_Struct):  # noqa: N801
    """``struct uffdio_poison`` (32 bytes): ``updated`` out = bytes poisoned or -errno."""

    _FMT: ClassVar[struct.Struct] = struct.Struct("<QQQq")
    range: uffdio_range = attrs.Factory(uffdio_range)
    mode: int = 0
    updated: int = 0


@attrs.define
class uffdio_move(_Struct):  # noqa: N801
    """``struct uffdio_move`` (40 bytes): ``move`` out = bytes moved or -errno."""

    _FMT: ClassVar[struct.Struct] = struct.Struct("<QQQQq")
    dst: int = 0
    src: int = 0
    len: int = 0
    mode: int = 0
    move: int = 0


UffdioStruct = (
    uffdio_range
    | uffdio_api
    | uffdio_register
    | uffdio_copy
    | uffdio_zeropage
    | uffdio_writeprotect
    | uffdio_continue
    | uffdio_poison
    | uffdio_move
)

UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, uffdio_register.sizeof())
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, uffdio_range.sizeof())
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, uffdio_range.sizeof())
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, uffdio_copy.sizeof())
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage.sizeof())
UFFDIO_MOVE = _IOWR(UFFDIO, _UFFDIO_MOVE, uffdio_move.sizeof())
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, uffdio_writeprotect.sizeof())
UFFDIO_CONTINUE = _IOWR(UFFDIO, _UFFDIO_CONTINUE, uffdio_continue.sizeof())
UFFDIO_POISON = _IOWR(UFFDIO, _UFFDIO_POISON, uffdio_poison.sizeof())
UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, uffdio_api.sizeof())

#: ioctl command -> the argument struct it takes.
IOCTL_STRUCTS: dict[int, type[UffdioStruct]] = {
    UFFDIO_REGISTER: uffdio_register,
    UFFDIO_UNREGISTER: uffdio_range,
    UFFDIO_WAKE: uffdio_range,
    UFFDIO_COPY: uffdio_copy,
    UFFDIO_ZEROPAGE: uffdio_zeropage,
    UFFDIO_MOVE: uffdio_move,
    UFFDIO_WRITEPROTECT: uffdio_writeprotect,
    UFFDIO_CONTINUE: uffdio_continue,
    UFFDIO_POISON: uffdio_poison,
    UFFDIO_API: uffdio_api,
}

#: ioctl command -> name of its output field (the "bytes done or -errno" ones).
IOCTL_OUTPUT_FIELD: dict[int, str] = {
    UFFDIO_COPY: "copy",
    UFFDIO_ZEROPAGE: "zeropage",
    UFFDIO_CONTINUE: "mapped",
    UFFDIO_POISON: "updated",
    UFFDIO_MOVE: "move",
}


# ---------------------------------------------------------------------------
# struct uffd_msg (32 bytes, __packed)
# ---------------------------------------------------------------------------

UFFD_MSG_SIZE = 32
# event(u8) reserved1(u8) reserved2(u16) reserved3(u32) arg(24 bytes)
_MSG_HEAD = struct.Struct("<BBHI")
_PAGEFAULT = struct.Struct("<BBHIQQI4x")
_FORK = struct.Struct("<BBHII20x")
_REMAP = struct.Struct("<BBHIQQQ")
_REMOVE = struct.Struct("<BBHIQQ8x")


class _Msg:
    """What the event classes share: one layout of ``struct uffd_msg`` for each.

    ``_LAYOUT`` is the whole 32-byte message: the event byte, the three
    reserved fields (always zero), then the event's ``arg`` fields in the
    order the class declares them.
    """

    __slots__ = ()
    event: ClassVar[int]
    _LAYOUT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        """The 32-byte ``struct uffd_msg``."""
        return self._LAYOUT.pack(self.event, 0, 0, 0, *attrs.astuple(cast(Any, self), recurse=False))


@attrs.frozen
class PagefaultMsg(_Msg):
    """UFFD_EVENT_PAGEFAULT: ``arg.pagefault`` = flags, address, feat.ptid."""

    flags: int
    address: int
    ptid: int = 0
    event: ClassVar[int] = UFFD_EVENT_PAGEFAULT
    _LAYOUT: ClassVar[struct.Struct] = _PAGEFAULT


_new_object = object.__new__
_set_pf_flags = PagefaultMsg.__dict__["flags"].__set__
_set_pf_address = PagefaultMsg.__dict__["address"].__set__
_set_pf_ptid = PagefaultMsg.__dict__["ptid"].__set__


def pagefault_msg(flags: int, address: int, ptid: int) -> PagefaultMsg:
    """``PagefaultMsg(flags, address, ptid)``, as the fault path builds it (``userfault_msg``).

    The same object, its slots filled directly: a frozen attrs class's
    ``__init__`` goes through ``object.__setattr__`` once per field, which
    takes about half as long again as filling the slots (0.39 us against
    0.26 here); this runs once per fault.
    """
    msg = _new_object(PagefaultMsg)
    _set_pf_flags(msg, flags)
    _set_pf_address(msg, address)
    _set_pf_ptid(msg, ptid)
    return msg


@attrs.frozen
class ForkMsg(_Msg):
    """UFFD_EVENT_FORK: ``arg.fork.ufd`` = the child's new uffd, in the reader's fd table."""

    ufd: int
    event: ClassVar[int] = UFFD_EVENT_FORK
    _LAYOUT: ClassVar[struct.Struct] = _FORK


@attrs.frozen
class RemapMsg(_Msg):
    """UFFD_EVENT_REMAP: ``arg.remap`` = from, to, len (the *old* length)."""

    from_: int
    to: int
    len: int
    event: ClassVar[int] = UFFD_EVENT_REMAP
    _LAYOUT: ClassVar[struct.Struct] = _REMAP


@attrs.frozen
class RemoveMsg(_Msg):
    """UFFD_EVENT_REMOVE: ``arg.remove`` = [start, end) zapped by madvise."""

    start: int
    end: int
    event: ClassVar[int] = UFFD_EVENT_REMOVE
    _LAYOUT: ClassVar[struct.Struct] = _REMOVE


@attrs.frozen
class UnmapMsg(_Msg):
    """UFFD_EVENT_UNMAP: ``arg.remove`` = [start, end) unmapped."""

    start: int
    end: int
    event: ClassVar[int] = UFFD_EVENT_UNMAP
    _LAYOUT: ClassVar[struct.Struct] = _REMOVE


UffdMsg = PagefaultMsg | ForkMsg | RemapMsg | RemoveMsg | UnmapMsg
_MSG_CLASSES: dict[int, type[UffdMsg]] = {
    cls.event: cls for cls in (PagefaultMsg, ForkMsg, RemapMsg, RemoveMsg, UnmapMsg)
}


def decode_msg(b: bytes | bytearray | memoryview) -> UffdMsg:
    """Parse one 32-byte ``struct uffd_msg`` (what read(2) on a uffd returns).

    Raises ValueError for a wrong length or an unknown event number.
    """
    if len(b) != UFFD_MSG_SIZE:
        raise ValueError(f"struct uffd_msg is {UFFD_MSG_SIZE} bytes, got {len(b)}")
    b = bytes(b)
    cls = _MSG_CLASSES.get(b[0])
    if cls is None:
        raise ValueError(f"unknown uffd_msg event {b[0]:#x}")
    return cls(*cls._LAYOUT.unpack(b)[4:])


def decode_msgs(b: bytes | bytearray | memoryview) -> list[UffdMsg]:
    """Parse the whole messages in a read(2) buffer (a multiple of 32 bytes)."""
    if len(b) % UFFD_MSG_SIZE:
        raise ValueError(f"{len(b)} bytes is not a whole number of uffd_msg")
    return [decode_msg(b[i : i + UFFD_MSG_SIZE]) for i in range(0, len(b), UFFD_MSG_SIZE)]


# ---------------------------------------------------------------------------
# Name tables (as used by the conformance scenarios: C names without prefix)
# ---------------------------------------------------------------------------

FEATURE_NAMES: dict[str, int] = {
    "PAGEFAULT_FLAG_WP": UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    "EVENT_FORK": UFFD_FEATURE_EVENT_FORK,
    "EVENT_REMAP": UFFD_FEATURE_EVENT_REMAP,
    "EVENT_REMOVE": UFFD_FEATURE_EVENT_REMOVE,
    "MISSING_HUGETLBFS": UFFD_FEATURE_MISSING_HUGETLBFS,
    "MISSING_SHMEM": UFFD_FEATURE_MISSING_SHMEM,
    "EVENT_UNMAP": UFFD_FEATURE_EVENT_UNMAP,
    "SIGBUS": UFFD_FEATURE_SIGBUS,
    "THREAD_ID": UFFD_FEATURE_THREAD_ID,
    "MINOR_HUGETLBFS": UFFD_FEATURE_MINOR_HUGETLBFS,
    "MINOR_SHMEM": UFFD_FEATURE_MINOR_SHMEM,
    "EXACT_ADDRESS": UFFD_FEATURE_EXACT_ADDRESS,
    "WP_HUGETLBFS_SHMEM": UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    "WP_UNPOPULATED": UFFD_FEATURE_WP_UNPOPULATED,
    "POISON": UFFD_FEATURE_POISON,
    "WP_ASYNC": UFFD_FEATURE_WP_ASYNC,
    "MOVE": UFFD_FEATURE_MOVE,
}

#: ioctl *bit* names, as in uffdio_api.ioctls / uffdio_register.ioctls.
IOCTL_BIT_NAMES: dict[str, int] = {
    "REGISTER": 1 << _UFFDIO_REGISTER,
    "UNREGISTER": 1 << _UFFDIO_UNREGISTER,
    "WAKE": 1 << _UFFDIO_WAKE,
    "COPY": 1 << _UFFDIO_COPY,
    "ZEROPAGE": 1 << _UFFDIO_ZEROPAGE,
    "MOVE": 1 << _UFFDIO_MOVE,
    "WRITEPROTECT": 1 << _UFFDIO_WRITEPROTECT,
    "CONTINUE": 1 << _UFFDIO_CONTINUE,
    "POISON": 1 << _UFFDIO_POISON,
    "API": 1 << _UFFDIO_API,
}

REGISTER_MODE_NAMES: dict[str, int] = {
    "MISSING": UFFDIO_REGISTER_MODE_MISSING,
    "WP": UFFDIO_REGISTER_MODE_WP,
    "MINOR": UFFDIO_REGISTER_MODE_MINOR,
}

COPY_MODE_NAMES: dict[str, int] = {
    "DONTWAKE": UFFDIO_COPY_MODE_DONTWAKE,
    "WP": UFFDIO_COPY_MODE_WP,
}
ZEROPAGE_MODE_NAMES: dict[str, int] = {"DONTWAKE": UFFDIO_ZEROPAGE_MODE_DONTWAKE}
WRITEPROTECT_MODE_NAMES: dict[str, int] = {
    "WP": UFFDIO_WRITEPROTECT_MODE_WP,
    "DONTWAKE": UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
}
CONTINUE_MODE_NAMES: dict[str, int] = {
    "DONTWAKE": UFFDIO_CONTINUE_MODE_DONTWAKE,
    "WP": UFFDIO_CONTINUE_MODE_WP,
}
POISON_MODE_NAMES: dict[str, int] = {"DONTWAKE": UFFDIO_POISON_MODE_DONTWAKE}
MOVE_MODE_NAMES: dict[str, int] = {
    "DONTWAKE": UFFDIO_MOVE_MODE_DONTWAKE,
    "ALLOW_SRC_HOLES": UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
}

EVENT_NAMES: dict[str, int] = {
    "PAGEFAULT": UFFD_EVENT_PAGEFAULT,
    "FORK": UFFD_EVENT_FORK,
    "REMAP": UFFD_EVENT_REMAP,
    "REMOVE": UFFD_EVENT_REMOVE,
    "UNMAP": UFFD_EVENT_UNMAP,
}

PAGEFAULT_FLAG_NAMES: dict[str, int] = {
    "WRITE": UFFD_PAGEFAULT_FLAG_WRITE,
    "WP": UFFD_PAGEFAULT_FLAG_WP,
    "MINOR": UFFD_PAGEFAULT_FLAG_MINOR,
}

OPEN_FLAG_NAMES: dict[str, int] = {
    "NONBLOCK": O_NONBLOCK,
    "CLOEXEC": O_CLOEXEC,
    "USER_MODE_ONLY": UFFD_USER_MODE_ONLY,
}


def flags_to_names(value: int, table: dict[str, int]) -> list[str | int]:
    """Split ``value`` into the names of ``table`` (in bit order) plus raw ints for
    bits without a name. The inverse of :func:`names_to_flags`."""
    out: list[str | int] = []
    named = sorted(table.items(), key=lambda kv: kv[1])
    for name, bit in named:
        if value & bit:
            out.append(name)
            value &= ~bit
    bit = 1
    while value:
        if value & bit:
            out.append(bit)
            value &= ~bit
        bit <<= 1
    return out


def names_to_flags(names: list[str | int] | tuple[str | int, ...], table: dict[str, int]) -> int:
    """OR together names from ``table`` and raw ints. Unknown names raise KeyError."""
    value = 0
    for n in names:
        value |= n if isinstance(n, int) else table[n]
    return value


# ioctl command number -> its C name, for traces and error messages
IOCTL_NAMES: dict[int, str] = {
    UFFDIO_API: "UFFDIO_API",
    UFFDIO_REGISTER: "UFFDIO_REGISTER",
    UFFDIO_UNREGISTER: "UFFDIO_UNREGISTER",
    UFFDIO_WAKE: "UFFDIO_WAKE",
    UFFDIO_COPY: "UFFDIO_COPY",
    UFFDIO_ZEROPAGE: "UFFDIO_ZEROPAGE",
    UFFDIO_MOVE: "UFFDIO_MOVE",
    UFFDIO_WRITEPROTECT: "UFFDIO_WRITEPROTECT",
    UFFDIO_CONTINUE: "UFFDIO_CONTINUE",
    UFFDIO_POISON: "UFFDIO_POISON",
}
