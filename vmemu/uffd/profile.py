"""Kernel profiles: what a given Linux version's userfaultfd offers (DESIGN decision 11).

A handler that must run on several kernels can be tested against each: the
profile decides which feature bits UFFDIO_API reports and accepts. The
default is Linux 6.18. Versions are those in which each feature arrived
(man-pages ``UFFDIO_API(2const)``).
"""

from __future__ import annotations

import attrs

from vmemu.uffd import uapi

_SINCE: list[tuple[tuple[int, int], int]] = [
    ((4, 11), uapi.UFFD_FEATURE_EVENT_FORK | uapi.UFFD_FEATURE_EVENT_REMAP
     | uapi.UFFD_FEATURE_EVENT_REMOVE | uapi.UFFD_FEATURE_MISSING_HUGETLBFS
     | uapi.UFFD_FEATURE_MISSING_SHMEM | uapi.UFFD_FEATURE_EVENT_UNMAP),
    ((4, 14), uapi.UFFD_FEATURE_SIGBUS | uapi.UFFD_FEATURE_THREAD_ID),
    ((5, 10), uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP),
    ((5, 13), uapi.UFFD_FEATURE_MINOR_HUGETLBFS),
    ((5, 14), uapi.UFFD_FEATURE_MINOR_SHMEM),
    ((5, 18), uapi.UFFD_FEATURE_EXACT_ADDRESS),
    ((5, 19), uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM),
    ((6, 4), uapi.UFFD_FEATURE_WP_UNPOPULATED),
    ((6, 6), uapi.UFFD_FEATURE_POISON),
    ((6, 7), uapi.UFFD_FEATURE_WP_ASYNC),
    ((6, 8), uapi.UFFD_FEATURE_MOVE),
]


@attrs.frozen
class KernelProfile:
    """The userfaultfd capabilities of one kernel version."""

    name: str
    version: tuple[int, int]
    features: int

    @classmethod
    def linux(cls, major: int, minor: int) -> KernelProfile:
        """The profile of mainline Linux ``major.minor``."""
        feats = 0
        for since, bits in _SINCE:
            if (major, minor) >= since:
                feats |= bits
        return cls(f"linux-{major}.{minor}", (major, minor), feats)


LINUX_6_18 = KernelProfile.linux(6, 18)
