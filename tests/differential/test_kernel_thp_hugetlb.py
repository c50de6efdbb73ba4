"""THP and hugetlb against the real kernel: AnonHugePages, hugetlb errnos and smaps.

THP tests need the host policy to allow MADV_HUGEPAGE (``madvise`` or
``always``); hugetlb tests need free 2 MiB pages in the host pool (CI's
``.ci/run`` reserves 64). Tests never change host settings: they skip.
"""

from __future__ import annotations

import errno
import os

import pytest

from tests.differential._kernel import ON_LINUX_X86_64, SKIP_REASON
from vmemu.constants import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_HUGETLB,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.kernel import Kernel
from vmemu.mmu import proc

pytestmark = [pytest.mark.differential,
              pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

H = PMD_SIZE
RW = PROT_READ | PROT_WRITE
PRIV = MAP_PRIVATE | MAP_ANONYMOUS
HPRIV = PRIV | MAP_HUGETLB


def _host_thp_policy() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text.split("[")[1].split("]")[0]


def _host_free_hugepages() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("HugePages_Free:"):
                free = int(line.split()[1])
            if line.startswith("HugePages_Rsvd:"):
                rsvd = int(line.split()[1])
        return free - rsvd
    except (OSError, UnboundLocalError):
        return 0


def _smaps_of(text: str, start: int, field: str) -> int:
    block = text[text.index(f"{start:x}-"):]
    for line in block.splitlines()[1:]:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _outcome(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno or -1
    return 0


@pytest.mark.skipif(_host_thp_policy() == "never", reason="host THP policy is 'never'")
def test_anon_huge_pages_after_touch() -> None:
    from vmemu.native import libc

    raw = libc.mmap(0, 2 * H, RW, PRIV)
    try:
        a = (raw + H - 1) & ~(H - 1)
        libc.madvise(a, H, MADV_HUGEPAGE)
        libc.poke_memory(a, b"x")
        host = _smaps_of(open("/proc/self/smaps").read(), a, "AnonHugePages")
    finally:
        libc.munmap(raw, 2 * H)
    if host == 0:
        pytest.skip("the host had no free huge page to give (fragmented memory)")
    k = Kernel()
    k.thp_enabled = _host_thp_policy()
    p = k.spawn()
    b = p.mmap(0, H, RW, PRIV)
    p.madvise(b, H, MADV_HUGEPAGE)
    p.write(b, b"x")
    assert _smaps_of(proc.smaps(p.mm), b, "AnonHugePages") == host == 2048


@pytest.mark.skipif(_host_free_hugepages() < 2, reason="host hugetlb pool has < 2 free pages")
def test_hugetlb_errnos_and_smaps() -> None:
    from vmemu.native import libc

    k = Kernel()
    k.set_nr_hugepages(2)
    p = k.spawn()

    a_host = libc.mmap(0, PAGE_SIZE, RW, HPRIV)
    a_emu = p.mmap(0, PAGE_SIZE, RW, HPRIV)
    try:
        ops = [
            ("munmap", (PAGE_SIZE, PAGE_SIZE)),  # split inside a huge page
            ("munmap", (0, PAGE_SIZE)),
            ("mprotect", (0, PAGE_SIZE, PROT_READ)),
            ("madvise", (PAGE_SIZE, PAGE_SIZE, MADV_DONTNEED)),
            ("madvise", (0, PAGE_SIZE, MADV_DONTNEED)),
        ]
        for name, (off, *rest) in ops:
            host = _outcome(getattr(libc, name), a_host + off, *rest)
            emu = _outcome(getattr(p, name), a_emu + off, *rest)
            assert host == emu, (name, off, errno.errorcode.get(host), errno.errorcode.get(emu))
        assert _outcome(libc.mmap, a_host + PAGE_SIZE, H, RW, HPRIV | MAP_FIXED) == \
            _outcome(p.mmap, a_emu + PAGE_SIZE, H, RW, HPRIV | MAP_FIXED) == errno.EINVAL
        assert _outcome(libc.mmap, 0, H, RW, HPRIV, -1, PAGE_SIZE) == \
            _outcome(p.mmap, 0, H, RW, HPRIV, -1, PAGE_SIZE) == errno.EINVAL
        libc.poke_memory(a_host, b"x")
        p.write(a_emu, b"x")
        host_smaps = open("/proc/self/smaps").read()
        emu_smaps = proc.smaps(p.mm)
        for field in ("Size", "KernelPageSize", "Rss", "Private_Hugetlb", "Shared_Hugetlb",
                      "AnonHugePages", "THPeligible"):
            assert _smaps_of(host_smaps, a_host, field) == _smaps_of(emu_smaps, a_emu, field), field
        host_flags = host_smaps[host_smaps.index(f"{a_host:x}-"):].split("VmFlags:")[1]
        emu_flags = emu_smaps[emu_smaps.index(f"{a_emu:x}-"):].split("VmFlags:")[1]
        assert host_flags.splitlines()[0].split() == emu_flags.splitlines()[0].split()
    finally:
        libc.munmap(a_host, H)


def test_skips_leave_host_settings_alone() -> None:
    before = open("/proc/sys/vm/nr_hugepages").read() if os.path.exists(
        "/proc/sys/vm/nr_hugepages") else ""
    Kernel().set_nr_hugepages(8)
    after = open("/proc/sys/vm/nr_hugepages").read() if before else ""
    assert before == after


def _host_fork_view(a: int, child_write: bytes) -> tuple[bytes, bytes]:
    """Fork; the child writes at ``a`` and sends back what it reads at ``a`` and ``a + H - 8``."""
    from vmemu.native import libc

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(r)
            libc.poke_memory(a, child_write)
            os.write(w, libc.peek_memory(a, 8) + libc.peek_memory(a + H - 8, 8))
        except BaseException:  # noqa: BLE001 - reported through the exit status
            code = 1
        os._exit(code)
    os.close(w)
    data = os.read(r, 16)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return data[:8], data[8:]


@pytest.mark.skipif(_host_free_hugepages() < 4, reason="host hugetlb pool has < 4 free pages")
@pytest.mark.parametrize("flags", [HPRIV, MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB],
                         ids=["private", "shared"])
def test_hugetlb_fork_cow_matches_the_kernel(flags: int) -> None:
    """Private hugetlb: the child's write copies the huge page (the parent keeps its bytes);
    shared hugetlb: the parent sees it."""
    from vmemu.native import libc

    k = Kernel()
    k.set_nr_hugepages(4)
    p = k.spawn()
    a_host = libc.mmap(0, H, RW, flags)
    a_emu = p.mmap(0, H, RW, flags)
    try:
        for poke, a in ((libc.poke_memory, a_host), (p.write, a_emu)):
            poke(a, b"parent!!")
            poke(a + H - 8, b"the end.")
        host_child = _host_fork_view(a_host, b"child!!!")
        c = p.fork()
        c.write(a_emu, b"child!!!")
        emu_child = (c.read(a_emu, 8), c.read(a_emu + H - 8, 8))
        k.check()
        c.exit()
        assert emu_child == host_child
        host_parent = (libc.peek_memory(a_host, 8), libc.peek_memory(a_host + H - 8, 8))
        emu_parent = (p.read(a_emu, 8), p.read(a_emu + H - 8, 8))
        assert emu_parent == host_parent
        assert host_parent[0] == (b"parent!!" if flags == HPRIV else b"child!!!")
        k.check()
    finally:
        libc.munmap(a_host, H)
