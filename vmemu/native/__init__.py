"""A binding of the real Linux kernel's memory syscalls and userfaultfd.

``vmemu.native`` offers the same calls as vmemu's emulated address space and
uffd, so a handler or a scenario runs on the emulator and on Linux:

* :mod:`vmemu.native.libc` - mmap/munmap/mremap/madvise/mprotect/memfd through
  ctypes, raising ``OSError(errno)``;
* :class:`NativeProcess` - this process with :class:`vmemu.Process`'s method
  names (mmap, read/write, thread, spawn, userfaultfd, memfd...), so a
  handler written for the emulator runs unchanged on the kernel;
* :mod:`vmemu.native.userfaultfd` - :class:`NativeUserfaultfd`, the real uffd
  with raw ``ioctl(cmd, struct)`` and Pythonic methods;
* :mod:`vmemu.native.access` - user-mode accesses that survive SIGBUS/SIGSEGV
  and forked children, through a small C helper built on first use;
* :mod:`vmemu.native.linux` - the Linux x86-64 constants they use.

Linux x86-64 only; the uffd needs root, CAP_SYS_PTRACE or
``vm.unprivileged_userfaultfd=1`` (or UFFD_USER_MODE_ONLY).
"""

from __future__ import annotations

from vmemu.native.process import NativeHandle, NativeProcess, NativeTask
from vmemu.native.userfaultfd import NativeUserfaultfd

__all__ = ["NativeHandle", "NativeProcess", "NativeTask", "NativeUserfaultfd"]
