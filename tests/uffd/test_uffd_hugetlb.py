"""hugetlb details of userfaultfd that the unit table does not reach."""

from __future__ import annotations

import select
import threading

import vmemu
from vmemu.constants import (
    MAP_ANONYMOUS,
    MAP_HUGE_1GB,
    MAP_HUGETLB,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.uffd import uapi

G = 1 << 30


def test_fault_address_is_masked_to_the_1g_huge_page() -> None:
    """Without EXACT_ADDRESS the message carries the start of the huge page
    (``vma_kernel_pagesize``), 1 GiB here, not of its 2 MiB leaf."""
    k = vmemu.Kernel()
    k.hugetlb.set_nr_hugepages(1, G)
    p = k.spawn()
    a = p.mmap(0, G, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_1GB)
    u = p.userfaultfd(uapi.O_NONBLOCK)
    u.api(0)
    u.register(a, G, uapi.UFFDIO_REGISTER_MODE_MISSING)
    t = threading.Thread(target=lambda: p.thread("T").read(a + (3 << 20) + 5, 1), daemon=True)
    t.start()
    assert select.select([u.fileno()], [], [], 5)[0]
    msg = u.read_msgs(32)[0]
    assert isinstance(msg, uapi.PagefaultMsg) and msg.address == a
    u.unregister(a, G)  # wakes the fault, which then allocates from the pool
    t.join(5)
    assert not t.is_alive()
    p.check()
