"""vmemu: an emulated Linux address space with a userfaultfd page-fault API.

The public API lives here; subpackages (``vmemu.mmu``, ``vmemu.uffd``,
``vmemu.backends``, ``vmemu.sched``, ``vmemu.native``) export their own.
"""

from vmemu import constants
from vmemu.constants import *  # noqa: F403 - the Linux constants are part of the API
from vmemu.errors import OomKill, Sigbus, Signal, Sigsegv, VmFault
from vmemu.kernel import Kernel
from vmemu.process import Process, Task

__version__ = "0.1.0"

__all__ = [
    "Kernel",
    "OomKill",
    "Process",
    "Signal",
    "Sigbus",
    "Sigsegv",
    "Task",
    "VmFault",
    "constants",
    *[n for n in dir(constants) if n.isupper()],
]
