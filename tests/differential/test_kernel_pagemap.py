"""pagemap of non-present entries against the real kernel.

``pte_to_pagemap_entry`` reports every swap-format PTE as swapped
(PM_SWAP, with ``type | offset << 5`` as the frame): swap slots, and pte
markers too. A shmem page zapped under uffd-wp protection leaves a uffd-wp
marker, which the kernel shows as ``PM_SWAP | PM_UFFD_WP`` with frame
``SWP_PTE_MARKER | PTE_MARKER_UFFD_WP << 5``. Needs userfaultfd (root or
``vm.unprivileged_userfaultfd``); skips otherwise.
"""

from __future__ import annotations

import pytest

from tests.differential._kernel import ON_LINUX_X86_64, SKIP_REASON
from vmemu import MADV_DONTNEED, MAP_ANONYMOUS, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE, Kernel
from vmemu.uffd import uapi

pytestmark = [pytest.mark.differential,
              pytest.mark.skipif(not ON_LINUX_X86_64, reason=SKIP_REASON)]

P = PAGE_SIZE
N = 4


def _scenario(mmap, write, madvise, uffd_open, pagemap) -> list[int]:
    a = mmap(0, N * P, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS)
    for i in range(2):
        write(a + i * P, b"x")
    u = uffd_open()
    u.api(uapi.UFFD_FEATURE_WP_UNPOPULATED)
    u.register(a, N * P, uapi.UFFDIO_REGISTER_MODE_WP)
    u.writeprotect(a, N * P, uapi.UFFDIO_WRITEPROTECT_MODE_WP)
    madvise(a, P, MADV_DONTNEED)  # shmem: the protection stays as a marker
    out = [pagemap(a + i * P) for i in range(N)]
    u.close()
    return out


def _kernel_side() -> list[int]:
    from vmemu.native import libc
    from vmemu.native.userfaultfd import NativeUserfaultfd

    def pagemap(addr: int) -> int:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(addr // P * 8)
            return int.from_bytes(f.read(8), "little")

    try:
        return _scenario(libc.mmap, libc.poke_memory, libc.madvise,
                         lambda: NativeUserfaultfd.open(0), pagemap)
    except OSError as e:
        pytest.skip(f"userfaultfd unavailable: {e}")


def test_uffd_wp_marker_is_a_swapped_entry() -> None:
    want = _kernel_side()
    p = Kernel().spawn()
    got = _scenario(p.mmap, p.write, p.madvise, lambda: p.userfaultfd(0), p.pagemap)
    p.check()
    mask = ~((1 << 55) - 1)  # flags only for present pages (their pfns differ)
    for i, (k, e) in enumerate(zip(want, got, strict=True)):
        if k >> 63:
            k, e = k & mask, e & mask
        assert e == k, f"page {i}: kernel {k:#x}, vmemu {e:#x}"
