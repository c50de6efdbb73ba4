"""The emulated machine: physical memory, processes and system settings.

A :class:`Kernel` is what several processes share: one physical memory
(so fork can share frames), the pid allocator and the sysctls that change
behaviour (``vm.unprivileged_userfaultfd``, ``vm.max_map_count``,
``vm.mmap_min_addr``...). Most users never make one explicitly:
``Process()`` creates a private kernel.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from vmemu.mmu.folio import PhysMem, PhysMemStats

if TYPE_CHECKING:
    from vmemu.process import Process


class Kernel:
    """One emulated machine."""

    def __init__(self, mem_limit_pages: int | None = None, *, runtime: Any = None,
                 uffd_profile: Any = None) -> None:
        from vmemu.sched.threads import ThreadRuntime
        from vmemu.sched.trace import Tracer
        from vmemu.uffd.profile import LINUX_6_18

        self.phys = PhysMem(limit_pages=mem_limit_pages)
        # how tasks block: real threads unless a simulation or inline runtime is given;
        # the default runtime does not trace (a long run would keep every event)
        if runtime is None:
            runtime = ThreadRuntime(tracer=Tracer(enabled=False))
        self.runtime = runtime
        self.phys.runtime = runtime
        self.uffd_profile = uffd_profile if uffd_profile is not None else LINUX_6_18
        self._pids = itertools.count(1000)
        self.processes: dict[int, Process] = {}
        self.sysctl: dict[str, Any] = {
            "vm.unprivileged_userfaultfd": 0,
            "vm.max_map_count": 65530,
        }

    def alloc_pid(self) -> int:
        """A fresh pid (``alloc_pid``); tids share the same space, as on Linux."""
        return next(self._pids)

    def spawn(self, name: str = "main") -> Process:
        """Create a new process with an empty address space (``execve`` of a blank image)."""
        from vmemu.process import Process

        return Process(kernel=self, name=name)

    def mfill_atomic_hugetlb(self, ctx: Any, vma: Any, dst: int, src: int, length: int,
                             mode: Any, wp: bool) -> int:
        """UFFDIO_COPY/CONTINUE/POISON into a hugetlb VMA (``mfill_atomic_hugetlb``)."""
        from vmemu.mmu import hugetlb

        return int(hugetlb.mfill_atomic_hugetlb(ctx, vma, dst, src, length, mode, wp))

    def swapon(self, store: Any = None, pages: int = 1024, priority: int | None = None) -> int:
        """Add a swap device of ``pages`` 4 KiB slots; returns its swap type (``swapon(2)``).

        ``store`` is any :class:`~vmemu.backends.PageStore` (default: a new
        :class:`~vmemu.backends.MemoryPageStore`). Once swap is on, reclaim
        (``MADV_PAGEOUT``, or an allocation beyond ``mem_limit_pages``) moves
        anonymous and shmem pages there; a fault brings them back. Several
        devices may be on at once; the higher ``priority`` fills first.
        """
        from vmemu.mmu.swapfile import swapon

        return swapon(self.phys, store, pages, priority)

    def swapoff(self, swap_type: int) -> None:
        """Read every page of device ``swap_type`` back and remove it (``swapoff(2)``)."""
        from vmemu.mmu.swapfile import swapoff

        swapoff(self.phys, swap_type)

    def swap_statistics(self) -> Any:
        """A :class:`~vmemu.mmu.swapfile.SwapStats` snapshot of swap and reclaim counters."""
        from vmemu.mmu.swapfile import get_swap_space

        return get_swap_space(self.phys).statistics()

    # -- huge pages: /proc/sys/vm/nr_hugepages, /sys/kernel/mm/transparent_hugepage ----

    @property
    def hugetlb(self) -> Any:
        """The hugetlb pool (:class:`vmemu.mmu.hugetlb.HugetlbPool`)."""
        from vmemu.mmu.hugetlb import hugetlb_pool

        return hugetlb_pool(self.phys)

    def set_nr_hugepages(self, count: int, size: int = 2 << 20) -> int:
        """Write ``nr_hugepages`` for the ``size`` pool (2 MiB or 1 GiB); returns the new count."""
        return int(self.hugetlb.set_nr_hugepages(count, size))

    def hugetlb_file_setup(self, name: str, flags: int) -> Any:
        """The hugetlbfs inode of ``memfd_create(name, MFD_HUGETLB | flags)``."""
        from vmemu.mmu.hugetlb import memfd_hugetlb_setup

        return memfd_hugetlb_setup(self.phys, name, flags)

    @property
    def thp_enabled(self) -> str:
        """/sys/kernel/mm/transparent_hugepage/enabled: "always", "madvise" or "never"."""
        return str(self.phys.thp_enabled)

    @thp_enabled.setter
    def thp_enabled(self, policy: str) -> None:
        from vmemu.mmu.huge_memory import set_thp_enabled

        set_thp_enabled(self.phys, policy)

    def run(self, main: Any, *args: Any) -> Any:
        """Run ``main(*args)`` as the first task and wait for every task (``runtime.run``).

        Under a :class:`~vmemu.sched.SimRuntime` this is the whole simulation:
        deterministic for a given seed, raising ``Deadlock`` if every task blocks.
        """
        return self.runtime.run(main, *args)

    def memory_statistics(self) -> PhysMemStats:
        """Frame usage of the whole machine."""
        return self.phys.statistics()

    def check(self) -> None:
        """Check the invariants of every address space on this machine."""
        from vmemu.mmu.check import check_phys

        check_phys(self.phys, list(self.phys.mms))
