"""Processes and tasks: who makes each memory access and syscall.

A :class:`Process` owns an address space (:class:`~vmemu.mmu.mm.MmStruct`)
and one or more :class:`Task` (threads, named so traces and userfaultfd
messages can say who faulted). Every access goes through a task: the main
task for the ``Process`` shortcuts, or a named one from
:meth:`Process.thread`.

The access fast path is the software TLB: a hit is one dict lookup and a
slice of the page's bytearray. A miss (or an access that crosses a page)
takes the slow path, :meth:`MmStruct.translate`, which walks the tables and
faults exactly like the hardware and ``exc_page_fault``.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

from vmemu.constants import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from vmemu.errors import Signal, raise_errno
from vmemu.kernel import Kernel
from vmemu.mmu import memfd, proc
from vmemu.mmu.memfd import OpenFile
from vmemu.mmu.mm import MmStats, MmStruct
from vmemu.mmu.pagetable import WalkLevel

if TYPE_CHECKING:
    from vmemu.uffd.ctx import Userfaultfd

# fcntl(2) commands and the fd flag (include/uapi/asm-generic/fcntl.h)
F_GETFD = 1
F_SETFD = 2
FD_CLOEXEC = 1

_OFF_MASK = PAGE_SIZE - 1
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_U64_MAX = (1 << 64) - 1


class Task:
    """A thread of a process (``struct task_struct``): it makes accesses and syscalls."""

    __slots__ = ("process", "tid", "name", "mm", "_r", "_w", "state", "__weakref__")

    def __init__(self, process: Process, tid: int, name: str) -> None:
        self.process = process
        self.tid = tid
        self.name = name
        self.mm = process.mm
        self._r = process.mm.tlb.r
        self._w = process.mm.tlb.w
        self.state = "running"

    def __repr__(self) -> str:
        return f"Task({self.name!r}, tid={self.tid})"

    # -- raw bytes -----------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        """Read ``n`` bytes at ``addr``, faulting pages in as needed."""
        off = addr & _OFF_MASK
        if 0 <= n <= PAGE_SIZE - off:
            buf = self._r.get(addr >> PAGE_SHIFT)
            if buf is None and n:  # a TLB miss within one page: _read_slow's first case
                try:
                    buf = self.mm.translate(addr, False, self)
                except Signal as sig:
                    sig.done = 0
                    raise
            if buf is not None:
                return bytes(buf[off:off + n])
        return self._read_slow(addr, n)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``addr``, faulting (and breaking COW) as needed."""
        off = addr & _OFF_MASK
        n = len(data)
        if off + n <= PAGE_SIZE:
            buf = self._w.get(addr >> PAGE_SHIFT)
            if buf is None and n and type(data) is bytes:  # a miss: _write_slow's first case
                try:
                    buf = self.mm.translate(addr, True, self)
                except Signal as sig:
                    sig.done = 0
                    raise
            if buf is not None:
                buf[off:off + n] = data
                return
        self._write_slow(addr, data)

    def _read_slow(self, addr: int, n: int) -> bytes:
        if n < 0:
            raise ValueError("negative length")
        off = addr & _OFF_MASK
        if n and off + n <= PAGE_SIZE:  # one page (a TLB miss): no splitting
            try:
                buf = self.mm.translate(addr, False, self)
            except Signal as sig:
                sig.done = 0
                raise
            return bytes(buf[off:off + n])
        out = bytearray()
        mm = self.mm
        done = 0
        while done < n:
            a = addr + done
            off = a & _OFF_MASK
            chunk = min(n - done, PAGE_SIZE - off)
            try:
                buf = mm.translate(a, False, self)
            except Signal as sig:
                sig.done = done
                raise
            out += buf[off:off + chunk]
            done += chunk
        return bytes(out)

    def _write_slow(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        off = addr & _OFF_MASK
        if isinstance(data, (bytes, bytearray)) and data and off + len(data) <= PAGE_SIZE:
            # one page (first touch, or a TLB miss): no memoryview, no splitting
            try:
                buf = self.mm.translate(addr, True, self)
            except Signal as sig:
                sig.done = 0
                raise
            buf[off:off + len(data)] = data
            return
        view = memoryview(data).cast("B")
        n = len(view)
        mm = self.mm
        done = 0
        while done < n:
            a = addr + done
            off = a & _OFF_MASK
            chunk = min(n - done, PAGE_SIZE - off)
            try:
                buf = mm.translate(a, True, self)
            except Signal as sig:
                sig.done = done
                raise
            buf[off:off + chunk] = view[done:done + chunk]
            done += chunk

    def touch(self, addr: int, write: bool = False) -> None:
        """Access one byte (read, or write of its current value) to fault the page in."""
        if write:
            self.write(addr, self.read(addr, 1))
        else:
            self.read(addr, 1)

    # -- typed accessors (little-endian, as on x86-64) -------------------------

    def read_u8(self, addr: int) -> int:
        """Read an unsigned byte."""
        return int(_U8.unpack(self.read(addr, 1))[0])

    def read_u16(self, addr: int) -> int:
        """Read a little-endian u16."""
        return int(_U16.unpack(self.read(addr, 2))[0])

    def read_u32(self, addr: int) -> int:
        """Read a little-endian u32."""
        return int(_U32.unpack(self.read(addr, 4))[0])

    def read_u64(self, addr: int) -> int:
        """Read a little-endian u64."""
        off = addr & _OFF_MASK
        if off <= PAGE_SIZE - 8:
            buf = self._r.get(addr >> PAGE_SHIFT)
            if buf is not None:
                return int(_U64.unpack_from(buf, off)[0])
        return int(_U64.unpack(self._read_slow(addr, 8))[0])

    def write_u8(self, addr: int, value: int) -> None:
        """Write an unsigned byte."""
        self.write(addr, _U8.pack(value & 0xFF))

    def write_u16(self, addr: int, value: int) -> None:
        """Write a little-endian u16."""
        self.write(addr, _U16.pack(value & 0xFFFF))

    def write_u32(self, addr: int, value: int) -> None:
        """Write a little-endian u32."""
        self.write(addr, _U32.pack(value & 0xFFFF_FFFF))

    def write_u64(self, addr: int, value: int) -> None:
        """Write a little-endian u64 (like a C store, only the low 64 bits)."""
        value &= _U64_MAX
        off = addr & _OFF_MASK
        if off <= PAGE_SIZE - 8:
            buf = self._w.get(addr >> PAGE_SHIFT)
            if buf is not None:
                _U64.pack_into(buf, off, value)
                return
        self._write_slow(addr, _U64.pack(value))


class DevUserfaultfd:
    """An open ``/dev/userfaultfd``: its one ioctl, USERFAULTFD_IOC_NEW, makes a userfaultfd.

    File permissions guard the device; ``vm.unprivileged_userfaultfd`` is not consulted.
    """

    def __init__(self, process: Process) -> None:
        self.process = process

    def ioctl(self, cmd: int, flags: int = 0) -> Userfaultfd:
        """``ioctl(fd, USERFAULTFD_IOC_NEW, flags)``; any other command is EINVAL."""
        from vmemu.uffd.uapi import USERFAULTFD_IOC_NEW

        if cmd != USERFAULTFD_IOC_NEW:
            raise_errno(errno.EINVAL)
        return self.process._new_userfaultfd(flags)

    def new(self, flags: int = 0) -> Userfaultfd:
        """USERFAULTFD_IOC_NEW."""
        from vmemu.uffd.uapi import USERFAULTFD_IOC_NEW

        return self.ioctl(USERFAULTFD_IOC_NEW, flags)

    def close(self) -> None:
        """close(2) of the device fd; userfaultfds it made live on."""


class Process:
    """An emulated process: an address space, its tasks and its syscalls."""

    def __init__(self, kernel: Kernel | None = None, name: str = "main",
                 mm: MmStruct | None = None) -> None:
        self.kernel = kernel if kernel is not None else Kernel()
        self.pid = self.kernel.alloc_pid()
        self.mm = mm if mm is not None else MmStruct(self.kernel.phys)
        self.mm.owner = self
        self.name = name
        self.main = Task(self, self.pid, "main")
        self.tasks: dict[str, Task] = {"main": self.main}
        self.exited = False
        self.fds: dict[int, Any] = {}  # OpenFile or Userfaultfd
        self.fd_cloexec: set[int] = set()  # fds with FD_CLOEXEC (a flag of the fd, not the file)
        # CAP_SYS_ADMIN (capable(CAP_SYS_ADMIN)): the emulated caller is root by default;
        # False makes privileged calls such as madvise(MADV_HWPOISON) fail with EPERM.
        self.capable_sys_admin = True
        # CAP_SYS_PTRACE: userfaultfd(2) without UFFD_USER_MODE_ONLY and UFFD_FEATURE_EVENT_FORK
        # need it unless vm.unprivileged_userfaultfd is 1; root by default.
        self.capable_sys_ptrace = True
        self.kernel.processes[self.pid] = self

    def __repr__(self) -> str:
        return f"Process({self.name!r}, pid={self.pid})"

    def spawn(self, fn: Any, *args: Any, name: str) -> Any:
        """Run ``fn(task, *args)`` as a new task of this process on the kernel's runtime.

        ``task`` is the process's :class:`Task` called ``name`` (its tid is the
        ``ptid`` of the userfaults it takes). Returns the runtime's task handle:
        ``join()`` gives ``fn``'s result or re-raises what it raised.
        """
        task = self.thread(name)
        return self.kernel.runtime.spawn(fn, task, *args, name=name)

    def thread(self, name: str) -> Task:
        """The task called ``name``, created on first use (``clone(CLONE_VM)``)."""
        t = self.tasks.get(name)
        if t is None:
            t = Task(self, self.kernel.alloc_pid(), name)
            self.tasks[name] = t
        return t

    # -- syscalls -------------------------------------------------------------

    def mmap(self, addr: int = 0, length: int = PAGE_SIZE, prot: int = PROT_READ | PROT_WRITE,
             flags: int = MAP_PRIVATE | MAP_ANONYMOUS, fd: Any = -1, offset: int = 0) -> int:
        """mmap(2): map memory and return its address; ``OSError`` on failure."""
        file = None if fd in (-1, None) else self.file_for_fd(fd)
        return self.mm.mmap(addr, length, prot, flags, file, offset)

    def file_for_fd(self, fd: Any) -> Any:
        """The inode behind ``fd`` (``fdget``); EBADF when ``fd`` is not open."""
        return self._file(fd).inode

    def _file(self, fd: Any) -> OpenFile:
        f = self.fds.get(fd) if isinstance(fd, int) else None
        if f is None:
            raise_errno(errno.EBADF, f"fd {fd!r} is not open")
        if not isinstance(f, OpenFile):
            raise_errno(errno.EINVAL, f"fd {fd} is not a regular file")
        return f

    def _install_fd(self, f: Any) -> int:
        fd = 3
        while fd in self.fds:
            fd += 1
        self.fds[fd] = f
        return fd

    def install_file(self, f: Any) -> int:
        """Install an open file (memfd, userfaultfd) at the lowest free fd (``fd_install``)."""
        return self._install_fd(f)

    def receive_fd(self, f: Any) -> int:
        """Take another reference to an open file and install it here (SCM_RIGHTS, ``receive_fd``).

        How a monitor process gets the uffd of the process it serves.
        """
        f.refs += 1
        return self._install_fd(f)

    # -- userfaultfd -------------------------------------------------------------

    def userfaultfd(self, flags: int = 0) -> Userfaultfd:
        """userfaultfd(2): a new userfaultfd for this process's address space.

        ``flags`` may hold O_CLOEXEC, O_NONBLOCK and UFFD_USER_MODE_ONLY (else
        EINVAL). Without UFFD_USER_MODE_ONLY the caller needs CAP_SYS_PTRACE or
        ``vm.unprivileged_userfaultfd = 1`` (else EPERM), as on Linux.
        """
        from vmemu.uffd.uapi import UFFD_USER_MODE_ONLY

        if not (flags & UFFD_USER_MODE_ONLY or self.capable_sys_ptrace
                or self.kernel.sysctl.get("vm.unprivileged_userfaultfd")):
            raise_errno(errno.EPERM)
        return self._new_userfaultfd(flags)

    def _new_userfaultfd(self, flags: int) -> Userfaultfd:
        """``new_userfaultfd``: validate flags, make the context, install its fd."""
        from vmemu.uffd.ctx import Userfaultfd
        from vmemu.uffd.uapi import UFFD_SHARED_FCNTL_FLAGS, UFFD_USER_MODE_ONLY

        if flags & ~(UFFD_SHARED_FCNTL_FLAGS | UFFD_USER_MODE_ONLY) or flags < 0:
            raise_errno(errno.EINVAL)
        ctx = Userfaultfd(self, flags)
        ctx.fd = self._install_fd(ctx)
        return ctx

    def open_dev_userfaultfd(self) -> DevUserfaultfd:
        """open("/dev/userfaultfd"): the misc device whose ioctl makes userfaultfds."""
        return DevUserfaultfd(self)

    def uffd_from_fd(self, fd: int) -> Userfaultfd:
        """The userfaultfd installed at ``fd`` (e.g. from a FORK message's ``ufd``)."""
        from vmemu.uffd.ctx import Userfaultfd

        f = self.fds.get(fd)
        if not isinstance(f, Userfaultfd):
            raise_errno(errno.EBADF)
        return f

    # -- syscalls that touch user memory from the kernel ------------------------------

    def kernel_read(self, addr: int, n: int) -> bytes:
        """What write(2) of ``[addr, addr+n)`` to a pipe copies: a kernel-mode read.

        Faults are kernel faults (no FAULT_FLAG_USER); a bad buffer is EFAULT.
        """
        from vmemu.mmu.gup import access_user

        return access_user(self.mm, addr, n, False)

    def kernel_write(self, addr: int, data: bytes) -> int:
        """What read(2) from a pipe into ``addr`` does: a kernel-mode write; returns bytes."""
        from vmemu.mmu.gup import access_user

        access_user(self.mm, addr, len(data), True, bytes(data))
        return len(data)

    def process_vm_readv(self, other: Process, addr: int, n: int) -> bytes:
        """process_vm_readv(2): read another process's memory through the kernel."""
        from vmemu.mmu.gup import access_user

        return access_user(other.mm, addr, n, False)

    def pin_user_pages(self, addr: int, length: int, write: bool = False) -> Any:
        """Pin pages long-term, as a driver would for DMA (``pin_user_pages(FOLL_LONGTERM)``).

        What CONFIG_GUP_TEST's ``PIN_LONGTERM_TEST_START`` does for the
        selftests; returns a :class:`vmemu.mmu.gup.PinnedPages` to ``unpin()``.
        """
        from vmemu.mmu.gup import pin_user_pages

        return pin_user_pages(self.mm, addr, length, write)

    # -- files: memfd and the syscalls on it -----------------------------------

    def memfd_create(self, name: str, flags: int = 0) -> int:
        """memfd_create(2): a new anonymous shmem (or hugetlb) file; returns its fd."""
        setup = getattr(self.kernel, "hugetlb_file_setup", None)
        fd = self._install_fd(memfd.memfd_create(self.kernel.phys, name, flags, setup))
        if flags & memfd.MFD_CLOEXEC:
            self.fd_cloexec.add(fd)
        return fd

    def close(self, fd: int) -> None:
        """close(2)."""
        f = self.fds.pop(fd, None) if isinstance(fd, int) else None
        if f is None:
            raise_errno(errno.EBADF, f"fd {fd!r} is not open")
        self.fd_cloexec.discard(fd)
        f.release()

    def dup(self, fd: int) -> int:
        """dup(2): a second fd for the same open file."""
        f = self._file(fd)
        f.refs += 1
        return self._install_fd(f)

    def ftruncate(self, fd: int, length: int) -> None:
        """ftruncate(2): set the file size; pages beyond it vanish from every mapping."""
        memfd.truncate_setsize(self._file(fd).inode, length)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2): allocate, or punch a hole with FALLOC_FL_PUNCH_HOLE|KEEP_SIZE."""
        memfd.fallocate(self._file(fd).inode, mode, offset, length)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        """pread(2) from the page cache (stops at end of file)."""
        return memfd.file_read(self._file(fd).inode, n, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        """pwrite(2) into the page cache; returns the bytes written."""
        return memfd.file_write(self._file(fd).inode, bytes(data), offset)

    def fstat_size(self, fd: int) -> int:
        """``st_size`` of the file behind ``fd``."""
        return int(self._file(fd).inode.i_size)

    def fcntl(self, fd: int, cmd: int, arg: int = 0) -> int:
        """fcntl(2): F_GETFD / F_SETFD (FD_CLOEXEC) and the sealing commands F_ADD_SEALS, F_GET_SEALS.

        A new fd from dup(2) has no FD_CLOEXEC; fork keeps each fd's flag.
        """
        if cmd in (F_GETFD, F_SETFD):
            if not isinstance(fd, int) or fd not in self.fds:
                raise_errno(errno.EBADF, f"fd {fd!r} is not open")
            if cmd == F_GETFD:
                return FD_CLOEXEC if fd in self.fd_cloexec else 0
            if arg & FD_CLOEXEC:
                self.fd_cloexec.add(fd)
            else:
                self.fd_cloexec.discard(fd)
            return 0
        inode = self._file(fd).inode
        if cmd == memfd.F_GET_SEALS:
            return int(inode.seals)
        if cmd == memfd.F_ADD_SEALS:
            memfd.add_seals(inode, arg)
            return 0
        raise_errno(errno.EINVAL, f"fcntl command {cmd} is not emulated")

    def munmap(self, addr: int, length: int) -> None:
        """munmap(2)."""
        self.mm.munmap(addr, length)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        """mprotect(2)."""
        self.mm.mprotect(addr, length, prot)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise(2)."""
        self.mm.madvise(addr, length, advice)

    def mremap(self, old_addr: int, old_len: int, new_len: int, flags: int = 0,
               new_addr: int = 0) -> int:
        """mremap(2): grow, shrink or move a mapping; returns its (new) address."""
        return self.mm.mremap(old_addr, old_len, new_len, flags, new_addr)

    def mlock(self, addr: int, length: int, flags: int = 0) -> None:
        """mlock(2), or mlock2(2) with ``flags`` (MLOCK_ONFAULT)."""
        self.mm.mlock(addr, length, flags)

    def munlock(self, addr: int, length: int) -> None:
        """munlock(2)."""
        self.mm.munlock(addr, length)

    def mlockall(self, flags: int) -> None:
        """mlockall(2): MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT."""
        from vmemu.mmu.mlock import do_mlockall

        do_mlockall(self.mm, flags)

    def munlockall(self) -> None:
        """munlockall(2)."""
        from vmemu.mmu.mlock import do_munlockall

        do_munlockall(self.mm)

    def fork(self, name: str | None = None) -> Process:
        """fork(2): a child with a copy-on-write copy of this address space."""
        child = Process(self.kernel, name or f"{self.name}-child",
                        mm=MmStruct(self.kernel.phys, self.mm.mmap_base))
        child.capable_sys_ptrace = self.capable_sys_ptrace
        try:
            self.mm.fork(child.mm)
        except OSError:
            child.mm.exit_mmap()  # ENOMEM copying a pinned page: the half-made child goes
            raise
        for fd, f in self.fds.items():
            f.refs += 1
            child.fds[fd] = f
        child.fd_cloexec = set(self.fd_cloexec)
        self.mm.dup_userfaultfd_complete(child.mm)
        return child

    def exit(self) -> None:
        """Exit: tear down the address space and free its memory (``exit_mmap``)."""
        if not self.exited:
            for fd in list(self.fds):
                self.close(fd)
            self.mm.exit_mmap()
            self.exited = True
            self.kernel.processes.pop(self.pid, None)

    # -- memory access through the main task ---------------------------------

    def read(self, addr: int, n: int) -> bytes:
        """Read ``n`` bytes as the main task."""
        return self.main.read(addr, n)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` as the main task."""
        self.main.write(addr, data)

    def read_u64(self, addr: int) -> int:
        """Read a u64 as the main task."""
        return self.main.read_u64(addr)

    def write_u64(self, addr: int, value: int) -> None:
        """Write a u64 as the main task."""
        self.main.write_u64(addr, value)

    def touch(self, addr: int, write: bool = False) -> None:
        """Touch one byte as the main task."""
        self.main.touch(addr, write)

    # -- introspection ----------------------------------------------------------

    def maps(self) -> str:
        """/proc/<pid>/maps."""
        return proc.maps(self.mm)

    def smaps(self) -> str:
        """/proc/<pid>/smaps."""
        return proc.smaps(self.mm)

    def pagemap(self, addr: int) -> int:
        """/proc/<pid>/pagemap entry for the page at ``addr``."""
        return proc.pagemap_entry(self.mm, addr)

    def walk(self, addr: int) -> list[WalkLevel]:
        """The page-table walk for ``addr``: each level's index and entry."""
        return self.mm.pgtables.walk(addr)

    def statistics(self) -> MmStats:
        """Counters of this address space."""
        return self.mm.statistics()

    def check(self) -> None:
        """``mm.check()``: verify all invariants (raises AssertionError)."""
        self.mm.check()
