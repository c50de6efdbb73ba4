"""Pin every number and layout of vmemu.uffd.uapi against include/uapi/linux/userfaultfd.h.

The expected values are copied from the header (via the reference tables of
the project's uABI notes), not computed, so a wrong ``_IOC`` helper or a
renumbered constant fails here.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmemu.uffd import uapi

U64 = st.integers(0, 2**64 - 1)
S64 = st.integers(-(2**63), 2**63 - 1)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UFFDIO_REGISTER", 0xC020AA00),
        ("UFFDIO_UNREGISTER", 0x8010AA01),
        ("UFFDIO_WAKE", 0x8010AA02),
        ("UFFDIO_COPY", 0xC028AA03),
        ("UFFDIO_ZEROPAGE", 0xC020AA04),
        ("UFFDIO_MOVE", 0xC028AA05),
        ("UFFDIO_WRITEPROTECT", 0xC018AA06),
        ("UFFDIO_CONTINUE", 0xC020AA07),
        ("UFFDIO_POISON", 0xC020AA08),
        ("UFFDIO_API", 0xC018AA3F),
        ("USERFAULTFD_IOC_NEW", 0x0000AA00),
    ],
)
def test_ioctl_numbers(name: str, value: int) -> None:
    assert getattr(uapi, name) == value


def test_ioc_helpers() -> None:
    assert uapi._IOC(uapi._IOC_READ | uapi._IOC_WRITE, 0xAA, 0x3F, 24) == 0xC018AA3F
    assert uapi._IOWR(0xAA, 0, 32) == 0xC020AA00
    assert uapi._IOR(0xAA, 1, 16) == 0x8010AA01
    assert uapi._IOW(0xAA, 1, 16) == 0x4010AA01
    assert uapi._IO(0xAA, 0) == 0xAA00


def test_api_and_masks() -> None:
    assert uapi.UFFD_API == 0xAA
    assert uapi.UFFD_API_IOCTLS == 0x8000000000000003
    assert uapi.UFFD_API_RANGE_IOCTLS == 0x1FC
    assert uapi.UFFD_API_RANGE_IOCTLS_BASIC == 0x1CC
    assert uapi.UFFD_API_REGISTER_MODES == 0x7
    assert uapi.UFFD_API_FEATURES == 0x1FFFF
    assert uapi.UFFD_FEATURE_INITIALIZED == 0x80000000
    assert uapi.UFFD_USER_MODE_ONLY == 1
    assert uapi.O_CLOEXEC == 0o2000000 and uapi.O_NONBLOCK == 0o4000
    assert uapi.NR_userfaultfd == 323


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UFFDIO_REGISTER_MODE_MISSING", 1),
        ("UFFDIO_REGISTER_MODE_WP", 2),
        ("UFFDIO_REGISTER_MODE_MINOR", 4),
        ("UFFDIO_COPY_MODE_DONTWAKE", 1),
        ("UFFDIO_COPY_MODE_WP", 2),
        ("UFFDIO_ZEROPAGE_MODE_DONTWAKE", 1),
        ("UFFDIO_WRITEPROTECT_MODE_WP", 1),
        ("UFFDIO_WRITEPROTECT_MODE_DONTWAKE", 2),
        ("UFFDIO_CONTINUE_MODE_DONTWAKE", 1),
        ("UFFDIO_CONTINUE_MODE_WP", 2),
        ("UFFDIO_POISON_MODE_DONTWAKE", 1),
        ("UFFDIO_MOVE_MODE_DONTWAKE", 1),
        ("UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES", 2),
        ("UFFD_EVENT_PAGEFAULT", 0x12),
        ("UFFD_EVENT_FORK", 0x13),
        ("UFFD_EVENT_REMAP", 0x14),
        ("UFFD_EVENT_REMOVE", 0x15),
        ("UFFD_EVENT_UNMAP", 0x16),
        ("UFFD_PAGEFAULT_FLAG_WRITE", 1),
        ("UFFD_PAGEFAULT_FLAG_WP", 2),
        ("UFFD_PAGEFAULT_FLAG_MINOR", 4),
    ],
)
def test_modes_events_flags(name: str, value: int) -> None:
    assert getattr(uapi, name) == value


FEATURES = [
    "PAGEFAULT_FLAG_WP",
    "EVENT_FORK",
    "EVENT_REMAP",
    "EVENT_REMOVE",
    "MISSING_HUGETLBFS",
    "MISSING_SHMEM",
    "EVENT_UNMAP",
    "SIGBUS",
    "THREAD_ID",
    "MINOR_HUGETLBFS",
    "MINOR_SHMEM",
    "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM",
    "WP_UNPOPULATED",
    "POISON",
    "WP_ASYNC",
    "MOVE",
]


@pytest.mark.parametrize(("bit", "name"), list(enumerate(FEATURES)))
def test_feature_bits(bit: int, name: str) -> None:
    assert getattr(uapi, "UFFD_FEATURE_" + name) == 1 << bit
    assert uapi.FEATURE_NAMES[name] == 1 << bit


def test_name_tables_are_complete() -> None:
    assert list(uapi.FEATURE_NAMES) == FEATURES
    assert uapi.IOCTL_BIT_NAMES == {
        "REGISTER": 1 << 0,
        "UNREGISTER": 1 << 1,
        "WAKE": 1 << 2,
        "COPY": 1 << 3,
        "ZEROPAGE": 1 << 4,
        "MOVE": 1 << 5,
        "WRITEPROTECT": 1 << 6,
        "CONTINUE": 1 << 7,
        "POISON": 1 << 8,
        "API": 1 << 63,
    }
    assert uapi.EVENT_NAMES["UNMAP"] == 0x16
    assert uapi.OPEN_FLAG_NAMES["USER_MODE_ONLY"] == 1


@pytest.mark.parametrize(
    ("cls", "size", "layout"),
    [
        (uapi.uffdio_range, 16, "<QQ"),
        (uapi.uffdio_api, 24, "<QQQ"),
        (uapi.uffdio_register, 32, "<QQQQ"),
        (uapi.uffdio_copy, 40, "<QQQQq"),
        (uapi.uffdio_zeropage, 32, "<QQQq"),
        (uapi.uffdio_writeprotect, 24, "<QQQ"),
        (uapi.uffdio_continue, 32, "<QQQq"),
        (uapi.uffdio_poison, 32, "<QQQq"),
        (uapi.uffdio_move, 40, "<QQQQq"),
    ],
)
def test_struct_sizes(cls: type, size: int, layout: str) -> None:
    assert cls.sizeof() == size  # type: ignore[attr-defined]
    assert struct.calcsize(layout) == size
    assert len(cls().pack()) == size


def test_struct_field_order_and_offsets() -> None:
    c = uapi.uffdio_copy(dst=1, src=2, len=3, mode=4, copy=-5)
    assert struct.unpack("<QQQQq", c.pack()) == (1, 2, 3, 4, -5)
    r = uapi.uffdio_register(uapi.uffdio_range(0x1000, 0x2000), mode=1, ioctls=0x13C)
    assert struct.unpack("<QQQQ", r.pack()) == (0x1000, 0x2000, 1, 0x13C)
    z = uapi.uffdio_zeropage(uapi.uffdio_range(7, 8), 1, -17)
    assert struct.unpack("<QQQq", z.pack()) == (7, 8, 1, -17)
    a = uapi.uffdio_api(features=0x100)
    assert struct.unpack("<QQQ", a.pack()) == (0xAA, 0x100, 0)
    m = uapi.uffdio_move(dst=9, src=10, len=11, mode=2, move=4096)
    assert m.pack()[32:] == (4096).to_bytes(8, "little")


def test_assign_writes_back_every_field() -> None:
    c = uapi.uffdio_copy(1, 2, 3, 0, 0)
    c.assign(uapi.uffdio_copy(1, 2, 3, 0, 4096).pack())
    assert c.copy == 4096
    r = uapi.uffdio_register(uapi.uffdio_range(1, 2), 1)
    r.assign(uapi.uffdio_register(uapi.uffdio_range(1, 2), 1, 0x13C).pack())
    assert r.ioctls == 0x13C and r.range == uapi.uffdio_range(1, 2)


def test_unpack_rejects_wrong_size() -> None:
    with pytest.raises(ValueError):
        uapi.uffdio_copy.unpack(b"\0" * 32)


def test_ioctl_struct_table() -> None:
    for cmd, cls in uapi.IOCTL_STRUCTS.items():
        assert (cmd >> 16) & 0x3FFF == cls.sizeof()
    assert uapi.IOCTL_OUTPUT_FIELD[uapi.UFFDIO_CONTINUE] == "mapped"


@given(U64, U64, U64, U64, S64)
def test_copy_roundtrip(dst: int, src: int, len_: int, mode: int, copy: int) -> None:
    c = uapi.uffdio_copy(dst, src, len_, mode, copy)
    assert uapi.uffdio_copy.unpack(c.pack()) == c


@given(U64, U64, U64, U64)
def test_register_roundtrip(start: int, len_: int, mode: int, ioctls: int) -> None:
    r = uapi.uffdio_register(uapi.uffdio_range(start, len_), mode, ioctls)
    assert uapi.uffdio_register.unpack(r.pack()) == r


def test_msg_layouts() -> None:
    pf = uapi.PagefaultMsg(flags=3, address=0x7F0000001000, ptid=1234).pack()
    assert len(pf) == 32
    assert pf[0] == 0x12 and pf[1:8] == b"\0" * 7
    assert struct.unpack_from("<QQI", pf, 8) == (3, 0x7F0000001000, 1234)
    assert pf[28:] == b"\0" * 4
    fk = uapi.ForkMsg(ufd=7).pack()
    assert fk[0] == 0x13 and struct.unpack_from("<I", fk, 8) == (7,) and fk[12:] == b"\0" * 20
    rm = uapi.RemapMsg(from_=0x1000, to=0x2000, len=0x3000).pack()
    assert rm[0] == 0x14 and struct.unpack_from("<QQQ", rm, 8) == (0x1000, 0x2000, 0x3000)
    for cls, ev in ((uapi.RemoveMsg, 0x15), (uapi.UnmapMsg, 0x16)):
        b = cls(start=0x1000, end=0x5000).pack()
        assert b[0] == ev and struct.unpack_from("<QQ", b, 8) == (0x1000, 0x5000)
        assert b[24:] == b"\0" * 8


@given(
    st.one_of(
        st.builds(uapi.PagefaultMsg, st.integers(0, 7), U64, st.integers(0, 2**32 - 1)),
        st.builds(uapi.ForkMsg, st.integers(0, 2**32 - 1)),
        st.builds(uapi.RemapMsg, U64, U64, U64),
        st.builds(uapi.RemoveMsg, U64, U64),
        st.builds(uapi.UnmapMsg, U64, U64),
    )
)
def test_msg_roundtrip(msg: uapi.UffdMsg) -> None:
    b = msg.pack()
    assert len(b) == uapi.UFFD_MSG_SIZE
    assert uapi.decode_msg(b) == msg
    assert uapi.decode_msgs(b + b) == [msg, msg]


def test_decode_errors() -> None:
    with pytest.raises(ValueError):
        uapi.decode_msg(b"\x12" + b"\0" * 30)
    with pytest.raises(ValueError):
        uapi.decode_msg(b"\x11" + b"\0" * 31)
    with pytest.raises(ValueError):
        uapi.decode_msgs(b"\0" * 33)


@given(st.integers(0, 2**64 - 1))
def test_flag_names_roundtrip(value: int) -> None:
    names = uapi.flags_to_names(value, uapi.FEATURE_NAMES)
    assert uapi.names_to_flags(names, uapi.FEATURE_NAMES) == value
    ints = [n for n in names if isinstance(n, int)]
    assert all(n & uapi.UFFD_API_FEATURES == 0 for n in ints)


def test_flag_names_order() -> None:
    assert uapi.flags_to_names(uapi.UFFD_API_IOCTLS, uapi.IOCTL_BIT_NAMES) == [
        "REGISTER",
        "UNREGISTER",
        "API",
    ]
    assert uapi.flags_to_names(1 << 20 | 1, uapi.FEATURE_NAMES) == ["PAGEFAULT_FLAG_WP", 1 << 20]
