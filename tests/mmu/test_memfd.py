"""memfd and shmem files: flags, sizes, pread/pwrite, fallocate, seals, aliases, hugetlbfs files.

The expected values are the ones the real kernel gave on the reference
machine (tests/differential/test_kernel_memfd.py replays the same calls on
both); these tests run anywhere.
"""

from __future__ import annotations

import errno

import pytest

from vmemu import (
    BUS_ADRERR,
    MADV_REMOVE,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Kernel,
    Sigbus,
)
from vmemu.constants import PMD_SIZE
from vmemu.mmu.memfd import (
    F_ADD_SEALS,
    F_GET_SEALS,
    F_SEAL_EXEC,
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    MFD_ALLOW_SEALING,
    MFD_EXEC,
    MFD_HUGETLB,
    MFD_NOEXEC_SEAL,
)

P = PAGE_SIZE
H = PMD_SIZE
RW = PROT_READ | PROT_WRITE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


@pytest.fixture
def p():
    k = Kernel()
    k.set_nr_hugepages(4)
    proc = k.spawn()
    yield proc
    proc.check()
    proc.exit()
    k.check()


def test_flags_and_default_seals(p) -> None:
    assert _errno(p.memfd_create, "x", 0x100) == errno.EINVAL
    assert _errno(p.memfd_create, "x", MFD_EXEC | MFD_NOEXEC_SEAL) == errno.EINVAL
    assert _errno(p.memfd_create, "x" * 250, 0) == errno.EINVAL
    assert _errno(p.memfd_create, "x", 21 << 26) == errno.EINVAL  # size bits need MFD_HUGETLB
    assert _errno(p.memfd_create, "x", MFD_HUGETLB | 22 << 26) == errno.ENODEV  # no 4 MiB hstate
    assert p.fcntl(p.memfd_create("x" * 249, 0), F_GET_SEALS) == F_SEAL_SEAL
    assert p.fcntl(p.memfd_create("s", MFD_ALLOW_SEALING), F_GET_SEALS) == 0
    assert p.fcntl(p.memfd_create("n", MFD_NOEXEC_SEAL), F_GET_SEALS) == F_SEAL_EXEC
    for flags in (MFD_HUGETLB, MFD_HUGETLB | 21 << 26, MFD_HUGETLB | 30 << 26):
        p.memfd_create("h", flags)
    assert _errno(p.fcntl, p.memfd_create("u", 0), F_ADD_SEALS, F_SEAL_SHRINK) == errno.EPERM


def test_pread_pwrite_and_sizes(p) -> None:
    fd = p.memfd_create("io")
    p.ftruncate(fd, 3 * P + 100)
    assert p.pwrite(fd, b"hello", 5000) == 5
    assert p.pread(fd, 10, 4998) == b"\0\0hello\0\0\0"
    assert p.pread(fd, 10, 3 * P + 95) == bytes(5)  # stops at EOF
    assert p.pread(fd, 10, 4 * P) == b""
    p.pwrite(fd, b"far", 6 * P + 1)
    assert p.fstat_size(fd) == 6 * P + 4
    assert _errno(p.ftruncate, fd, -1) == errno.EINVAL
    p.fallocate(fd, 0, 7 * P, 10)
    assert p.fstat_size(fd) == 7 * P + 10
    p.fallocate(fd, FALLOC_FL_KEEP_SIZE, 9 * P, P)
    assert p.fstat_size(fd) == 7 * P + 10
    assert _errno(p.fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, P) == errno.EOPNOTSUPP
    assert _errno(p.fallocate, fd, PUNCH, 0, 0) == errno.EINVAL
    p.fallocate(fd, PUNCH, 5001, 2)
    assert p.pread(fd, 6, 4999) == b"\0h\0\0lo"
    p.ftruncate(fd, 5002)
    p.ftruncate(fd, 2 * P)
    assert p.pread(fd, 5, 5000) == b"h\0\0\0\0"  # the tail beyond 5002 was zeroed


def test_aliases_private_cow_and_sigbus_beyond_eof(p) -> None:
    fd = p.memfd_create("alias")
    p.ftruncate(fd, 2 * P + 100)
    m1 = p.mmap(0, 4 * P, RW, MAP_SHARED, fd)
    m2 = p.mmap(0, 4 * P, RW, MAP_SHARED, fd)
    m3 = p.mmap(0, 3 * P, RW, MAP_PRIVATE, fd)
    m4 = p.mmap(0, 2 * P, RW, MAP_SHARED, fd, P)
    p.write(m1 + 100, b"abc")
    assert p.read(m2 + 100, 3) == p.read(m3 + 100, 3) == p.pread(fd, 3, 100) == b"abc"
    p.write(m4 + 7, b"via m4")
    assert p.read(m1 + P + 7, 6) == b"via m4"
    p.write(m3 + 50, b"private")
    assert p.read(m1 + 50, 7) == bytes(7) and p.pread(fd, 7, 50) == bytes(7)
    p.pwrite(fd, b"seen", P + 20)
    assert p.read(m3 + P + 20, 4) == b"seen"  # page 1 of m3 was never copied
    assert p.read(m1 + 2 * P + 200, 4) == bytes(4)  # past EOF inside the last page
    with pytest.raises(Sigbus) as ei:
        p.read(m1 + 3 * P + 5, 1)
    assert (ei.value.si_code, ei.value.si_addr) == (BUS_ADRERR, m1 + 3 * P + 5)
    p.ftruncate(fd, P + 10)
    assert p.read(m2 + P + 5, 10) == b"\0\0via\0\0\0\0\0"
    p.write(m2 + P + 30, b"past EOF")  # inside the last page: allowed, kept...
    assert p.read(m1 + P + 30, 8) == b"past EOF"
    p.ftruncate(fd, P + 10)  # ...until a truncate, even to the same size, zeroes it
    assert p.read(m1 + P + 30, 8) == bytes(8)
    for m in (m1, m3):
        with pytest.raises(Sigbus):
            p.read(m + 2 * P, 1)
    assert p.read(m3 + 50, 7) == b"private"
    p.ftruncate(fd, 3 * P)
    p.madvise(m1 + P, P, MADV_REMOVE)
    assert p.pread(fd, 8, P + 5) == bytes(8) and p.read(m4 + 5, 8) == bytes(8)
    assert _errno(p.madvise, m3, P, MADV_REMOVE) == errno.EACCES


def test_seals(p) -> None:
    fd = p.memfd_create("seals", MFD_ALLOW_SEALING)
    p.ftruncate(fd, 2 * P)
    assert _errno(p.fcntl, fd, F_ADD_SEALS, 0x1000) == errno.EINVAL
    p.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
    assert _errno(p.ftruncate, fd, P) == _errno(p.ftruncate, fd, 3 * P) == errno.EPERM
    assert _errno(p.pwrite, fd, b"x", 2 * P) == errno.EPERM
    assert _errno(p.fallocate, fd, FALLOC_FL_KEEP_SIZE, 2 * P, P) == errno.EPERM
    m = p.mmap(0, 2 * P, RW, MAP_SHARED, fd)
    assert _errno(p.fcntl, fd, F_ADD_SEALS, F_SEAL_WRITE) == errno.EBUSY
    p.munmap(m, 2 * P)
    ro = p.mmap(0, 2 * P, PROT_READ, MAP_SHARED, fd)
    assert _errno(p.fcntl, fd, F_ADD_SEALS, F_SEAL_WRITE) == errno.EBUSY  # VM_MAYWRITE
    p.munmap(ro, 2 * P)
    p.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)
    ro = p.mmap(0, 2 * P, PROT_READ, MAP_SHARED, fd)
    assert _errno(p.pwrite, fd, b"no", 0) == errno.EPERM
    assert _errno(p.fallocate, fd, PUNCH, 0, P) == errno.EPERM
    assert _errno(p.mmap, 0, P, RW, MAP_SHARED, fd) == errno.EPERM
    p.write(p.mmap(0, P, RW, MAP_PRIVATE, fd), b"private is fine")
    assert _errno(p.mprotect, ro, P, RW) == errno.EACCES
    p.fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL)
    assert _errno(p.fcntl, fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE) == errno.EPERM
    g = p.memfd_create("future", MFD_ALLOW_SEALING)
    p.ftruncate(g, P)
    w = p.mmap(0, P, RW, MAP_SHARED, g)
    p.fcntl(g, F_ADD_SEALS, F_SEAL_FUTURE_WRITE)  # allowed with a writable mapping
    p.write(w, b"old mapping")
    assert p.pread(g, 11, 0) == b"old mapping"
    assert _errno(p.pwrite, g, b"no", 0) == errno.EPERM
    assert _errno(p.mmap, 0, P, RW, MAP_SHARED, g) == errno.EPERM


def test_hugetlb_memfd_sizes_io_and_holes(p) -> None:
    fd = p.memfd_create("huge", MFD_HUGETLB)
    assert _errno(p.ftruncate, fd, P) == _errno(p.ftruncate, fd, H + P) == errno.EINVAL
    p.ftruncate(fd, 2 * H)
    assert _errno(p.pwrite, fd, b"xyz", 0) == errno.EINVAL  # hugetlbfs has no write_iter
    m = p.mmap(0, 2 * H, RW, MAP_SHARED, fd)
    p.write(m, b"a" * 16 * P)
    p.write(m + H - 8 * P, b"b" * 16 * P)
    assert p.pread(fd, 4, H - 2) == b"bbbb"
    assert p.pread(fd, 4, 2 * H - 2) == bytes(2)
    p.fallocate(fd, PUNCH, P, 2 * P)  # zeroes inside the first huge page only
    assert p.read(m + P - 1, 2 * P + 2) == b"a" + bytes(2 * P) + b"a"
    p.fallocate(fd, PUNCH, H - P, 2 * P)
    assert p.read(m + H - P - 1, 2 * P + 2) == b"b" + bytes(2 * P) + b"b"
    folio = p.kernel.phys.mem_map[p.mm.pgtables.walk(m)[2].entry >> 12 & ((1 << 40) - 1)]
    assert len(folio.data) == H  # partial zeroing never resizes the folio's bytes
    p.fallocate(fd, PUNCH, 0, H)  # the whole first huge page goes
    assert p.read(m, 4) == bytes(4) and p.read(m + H - 8 * P, 4) == bytes(4)
    p.fallocate(fd, 0, 2 * H, P)
    assert p.fstat_size(fd) == 2 * H + P  # not rounded, as hugetlbfs_fallocate does
    p.ftruncate(fd, H)
    with pytest.raises(Sigbus) as ei:
        p.read(m + H + 5, 1)
    assert ei.value.si_code == BUS_ADRERR
    assert _errno(p.mmap, 0, H, RW, MAP_SHARED, fd, P) == errno.EINVAL


def test_hugetlb_memfd_seals_checked_after_alignment(p) -> None:
    fd = p.memfd_create("huge", MFD_HUGETLB | MFD_ALLOW_SEALING)
    p.ftruncate(fd, 2 * H)
    p.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK)
    assert _errno(p.ftruncate, fd, P) == errno.EINVAL  # alignment first
    assert _errno(p.ftruncate, fd, H) == errno.EPERM
    p.ftruncate(fd, 3 * H)
    assert p.fstat_size(fd) == 3 * H


def _present(p, a: int, n: int) -> str:
    from vmemu.mmu import PM_PRESENT

    return "".join("1" if p.pagemap(a + i * P) & PM_PRESENT else "." for i in range(n))


def test_read_fault_maps_cached_neighbours(p) -> None:
    """do_fault_around: a 16-PTE aligned window, cached pages only, clipped to VMA and EOF."""
    fd = p.memfd_create("around")
    p.ftruncate(fd, 30 * P + 1)
    for i in range(31):
        if i != 5:
            p.pwrite(fd, b"c", i * P)
    raw = p.mmap(0, 2 * H + 40 * P, PROT_READ)
    a = ((raw + H - 1) & ~(H - 1)) + 2 * P  # PTE index 2
    p.mmap(a, 40 * P, RW, MAP_SHARED | MAP_FIXED, fd)
    p.read(a + 20 * P, 1)  # PTE 22: window 16..31 -> pages 14..29
    assert _present(p, a, 40) == "." * 14 + "1" * 16 + "." * 10
    p.read(a, 1)  # PTE 2: window clipped to the VMA start -> pages 0..13, 5 not cached
    assert _present(p, a, 40) == "11111.11111111" + "1" * 16 + "." * 10
    p.read(a + 30 * P, 1)  # the last page of the file; 31.. are beyond EOF
    assert _present(p, a, 40) == "11111.11111111" + "1" * 17 + "." * 9
    p.write(a + 5 * P, b"w")  # a write fault maps just its page
    assert _present(p, a, 40)[:6] == "111111"


def test_no_fault_around_for_writes_or_uffd_minor(p) -> None:
    from vmemu.uffd.uapi import UFFD_FEATURE_MINOR_SHMEM, UFFDIO_REGISTER_MODE_MINOR

    fd = p.memfd_create("minor")
    p.ftruncate(fd, 16 * P)
    for i in range(16):
        p.pwrite(fd, b"c", i * P)
    a = p.mmap(0, 16 * P, RW, MAP_SHARED, fd)
    p.write(a + 3 * P, b"w")
    assert _present(p, a, 16).count("1") == 1
    b = p.mmap(0, 16 * P, RW, MAP_SHARED, fd)
    uffd = p.userfaultfd()
    uffd.api(features=UFFD_FEATURE_MINOR_SHMEM)
    uffd.register(b, 16 * P, UFFDIO_REGISTER_MODE_MINOR)
    uffd.continue_(b + 4 * P, P)  # maps one page, faults nothing around
    assert _present(p, b, 16) == "....1..........."


def test_mfd_cloexec_is_a_flag_of_the_fd(p) -> None:
    """MFD_CLOEXEC sets FD_CLOEXEC (F_GETFD); dup'd fds have it clear; fork keeps each fd's flag."""
    from vmemu.mmu.memfd import MFD_CLOEXEC
    from vmemu.process import F_GETFD, F_SETFD, FD_CLOEXEC

    c = p.memfd_create("c", MFD_CLOEXEC)
    n = p.memfd_create("n", 0)
    assert p.fcntl(c, F_GETFD) == FD_CLOEXEC and p.fcntl(n, F_GETFD) == 0
    d = p.dup(c)
    assert p.fcntl(d, F_GETFD) == 0
    p.fcntl(n, F_SETFD, FD_CLOEXEC)
    child = p.fork()
    assert [child.fcntl(fd, F_GETFD) for fd in (c, n, d)] == [FD_CLOEXEC, FD_CLOEXEC, 0]
    child.exit()
    p.close(c)
    assert _errno(p.fcntl, c, F_GETFD) == errno.EBADF
    assert p.memfd_create("again", 0) == c and p.fcntl(c, F_GETFD) == 0
