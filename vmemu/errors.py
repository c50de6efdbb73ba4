"""The two error channels: ``OSError`` at syscall boundaries and signals on access.

A syscall or ioctl that fails raises ``OSError(errno, strerror)`` through
:func:`raise_errno`, as pyfakefs does, so callers test ``e.errno``. A memory
access the kernel would answer with a signal raises a :class:`Signal`
subclass carrying ``si_signo``, ``si_code`` and ``si_addr`` (the fields of
``siginfo_t``). Inside the fault path the kernel's ``vm_fault_t`` bits travel
as :class:`VmFault` flags and are turned into a signal at the edge
(``mm_fault_error`` in ``arch/x86/mm/fault.c``).
"""

from __future__ import annotations

import enum
import os
from typing import NoReturn

from vmemu.constants import (
    BUS_ADRERR,
    SI_CODE_NAMES,
    SIGBUS,
    SIGKILL,
    SIGNAL_NAMES,
    SIGSEGV,
)


def errno_error(err: int, detail: str = "") -> OSError:
    """Build the ``OSError`` a failing syscall raises (``-errno`` in the kernel)."""
    msg = os.strerror(err)
    if detail:
        msg = f"{msg} ({detail})"
    return OSError(err, msg)


def raise_errno(err: int, detail: str = "") -> NoReturn:
    """Raise ``OSError(err)``: the one way a syscall reports failure."""
    raise errno_error(err, detail)


class VmFault(enum.IntFlag):
    """Result bits of the fault path: the kernel's ``vm_fault_t`` (``include/linux/mm_types.h``)."""

    NONE = 0
    OOM = 0x000001
    SIGBUS = 0x000002
    MAJOR = 0x000004
    HWPOISON = 0x000010
    SIGSEGV = 0x000040
    NOPAGE = 0x000100
    LOCKED = 0x000200
    RETRY = 0x000400
    FALLBACK = 0x000800
    DONE_COW = 0x001000
    COMPLETED = 0x004000

    @classmethod
    def error_mask(cls) -> VmFault:
        """``VM_FAULT_ERROR``: the bits that end the fault in a signal."""
        return cls.OOM | cls.SIGBUS | cls.SIGSEGV | cls.HWPOISON


# A UFFDIO_POISON marker: the kernel returns VM_FAULT_HWPOISON, so GUP (MADV_POPULATE_*)
# fails with EHWPOISON, while the user's access gets SIGBUS with BUS_ADRERR - what do_sigbus
# sends on this 6.18 build, made without CONFIG_MEMORY_FAILURE (both observed).
POISON_MARKER_FAULT = VmFault.HWPOISON | VmFault.SIGBUS


class Signal(Exception):  # noqa: N818 - a signal is what the kernel delivers, not an "Error"
    """A synchronous signal delivered to the accessing task (``force_sig_fault``).

    ``done`` counts the bytes of the access that completed before the fault,
    so a caller can tell where a multi-page access stopped.
    """

    si_signo: int = 0

    def __init__(self, si_code: int, si_addr: int, done: int = 0, reason: str = "") -> None:
        self.si_code = si_code
        self.si_addr = si_addr
        self.done = done
        self.reason = reason
        name = SIGNAL_NAMES.get(self.si_signo, str(self.si_signo))
        code = SI_CODE_NAMES.get(self.si_signo, {}).get(si_code, str(si_code))
        text = f"{name} ({code}) at {si_addr:#x}"
        if reason:
            text += f": {reason}"
        super().__init__(text)

    @property
    def signal_name(self) -> str:
        """The signal's name, e.g. ``"SIGSEGV"``."""
        return SIGNAL_NAMES.get(self.si_signo, str(self.si_signo))

    @property
    def code_name(self) -> str:
        """The si_code's name, e.g. ``"SEGV_MAPERR"``."""
        return SI_CODE_NAMES.get(self.si_signo, {}).get(self.si_code, str(self.si_code))


class Sigsegv(Signal):
    """SIGSEGV: no mapping (SEGV_MAPERR) or a mapping that forbids the access (SEGV_ACCERR)."""

    si_signo = SIGSEGV


class Sigbus(Signal):
    """SIGBUS: beyond EOF, empty hugetlb pool, poison, or UFFD_FEATURE_SIGBUS."""

    si_signo = SIGBUS


class OomKill(Signal):
    """SIGKILL from the OOM killer: a fault needed memory beyond the configured limit.

    On Linux ``VM_FAULT_OOM`` from a user fault runs ``pagefault_out_of_memory``
    and the OOM killer picks a victim; vmemu kills the faulting task (raises
    this) and leaves the address space as it was. Syscalls that populate
    memory (MAP_POPULATE, MADV_POPULATE_*) report ``ENOMEM`` instead.
    """

    si_signo = SIGKILL


def fault_to_signal(fault: VmFault, addr: int, done: int = 0) -> Signal:
    """Turn a failed fault's bits into the signal the task gets (``mm_fault_error``)."""
    from vmemu.constants import BUS_MCEERR_AR, SEGV_ACCERR

    if fault & VmFault.OOM:
        return OomKill(0, addr, done, "out of memory")
    if fault & VmFault.HWPOISON and not fault & VmFault.SIGBUS:
        return Sigbus(BUS_MCEERR_AR, addr, done, "memory failure")
    if fault & (VmFault.SIGBUS | VmFault.HWPOISON):
        return Sigbus(BUS_ADRERR, addr, done)
    return Sigsegv(SEGV_ACCERR, addr, done)


__all__ = [
    "POISON_MARKER_FAULT",
    "OomKill",
    "Signal",
    "Sigbus",
    "Sigsegv",
    "VmFault",
    "errno_error",
    "fault_to_signal",
    "raise_errno",
    "SIGKILL",
    "SIGBUS",
]
