"""The real kernel's userfaultfd, bound through ctypes and ``fcntl.ioctl``.

:class:`NativeUserfaultfd` is a thin object over one uffd file descriptor,
with the same two call styles as vmemu's emulated uffd:

* the raw style, ``uffd.ioctl(UFFDIO_COPY, uffdio_copy(...))``, takes the
  uABI struct of :mod:`vmemu.uffd.uapi`, hands its packed bytes to the
  kernel in a mutable buffer and copies back into the struct whatever the
  kernel wrote (``copy``, ``ioctls``, ...), field by field, even when the
  ioctl fails;
* the Pythonic style, ``uffd.copy(dst, src, len, mode=0)``, builds the
  struct, calls the raw style and returns the output field.

Errors. Every failure raises ``OSError`` with the kernel's errno. The
exception carries the argument struct as the kernel left it in the
attribute ``struct`` (``e.struct``), so partial progress is visible the way
the uABI shows it: a COPY that stopped after 8192 bytes raises
``OSError(EAGAIN)`` with ``e.struct.copy == 8192``; one that failed on its
first page has ``e.struct.copy == -errno``; a validation error leaves the
field as the caller set it. The emulator raises the same way.

The kernel side is ``fs/userfaultfd.c`` (``userfaultfd_ioctl``,
``userfaultfd_read_iter``, ``userfaultfd_poll``, ``userfaultfd_release``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
from typing import Literal, Self

from vmemu.native import libc
from vmemu.uffd import uapi
from vmemu.uffd.uapi import (
    UFFD_API,
    UFFDIO_API,
    UFFDIO_CONTINUE,
    UFFDIO_COPY,
    UFFDIO_MOVE,
    UFFDIO_POISON,
    UFFDIO_REGISTER,
    UFFDIO_UNREGISTER,
    UFFDIO_WAKE,
    UFFDIO_WRITEPROTECT,
    UFFDIO_ZEROPAGE,
    USERFAULTFD_IOC_NEW,
    UffdioStruct,
    UffdMsg,
)

DEV_USERFAULTFD = "/dev/userfaultfd"


class NativeUserfaultfd:
    """One real userfaultfd file descriptor (``struct userfaultfd_ctx`` in the kernel)."""

    def __init__(self, fd: int) -> None:
        """Wrap an existing uffd ``fd`` (e.g. ``fork.ufd`` of a FORK message).

        The object owns the descriptor and closes it in :meth:`close`.
        """
        self._fd = fd

    # -- creation -----------------------------------------------------------

    @classmethod
    def open(
        cls,
        flags: int = uapi.O_CLOEXEC | uapi.O_NONBLOCK,
        via: Literal["syscall", "dev"] = "syscall",
    ) -> Self:
        """Create a uffd: ``userfaultfd(flags)`` (syscall 323) or, with ``via="dev"``,
        ``ioctl(open("/dev/userfaultfd"), USERFAULTFD_IOC_NEW, flags)``.

        ``flags`` is O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY; any other bit
        is EINVAL (``new_userfaultfd``). The syscall path needs CAP_SYS_PTRACE
        or ``vm.unprivileged_userfaultfd=1`` unless USER_MODE_ONLY (else EPERM);
        the device path needs permission on the device node.
        """
        if via == "syscall":
            return cls(libc.syscall(uapi.NR_userfaultfd, flags))
        if via == "dev":
            dev = os.open(DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
            try:
                fd = fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
            finally:
                os.close(dev)
            return cls(fd)
        raise ValueError(f"via must be 'syscall' or 'dev', not {via!r}")

    # -- file ---------------------------------------------------------------

    def fileno(self) -> int:
        """The file descriptor (select/poll on it; readable when messages are pending)."""
        if self._fd < 0:
            raise ValueError("userfaultfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._fd < 0

    def close(self) -> None:
        """``close(2)``. When this is the last reference the kernel's
        ``userfaultfd_release`` unregisters every range and wakes every waiter."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NativeUserfaultfd(fd={self._fd})"

    # -- raw ioctl ----------------------------------------------------------

    def ioctl(self, cmd: int, arg: UffdioStruct) -> UffdioStruct:
        """``ioctl(fd, cmd, &arg)``: pass the packed struct, copy the kernel's
        write-back into ``arg`` (also on failure) and return ``arg``.

        Raises ``OSError(errno)`` with ``e.struct = arg`` on failure.
        """
        buf = bytearray(arg.pack())
        try:
            fcntl.ioctl(self.fileno(), cmd, buf, True)
        except OSError as e:
            arg.assign(buf)
            err = OSError(e.errno, os.strerror(e.errno or 0))
            err.struct = arg  # type: ignore[attr-defined]
            raise err from None
        arg.assign(buf)
        return arg

    # -- Pythonic ioctls ----------------------------------------------------

    def api(self, features: int = 0, api: int = UFFD_API) -> uapi.uffdio_api:
        """UFFDIO_API handshake; returns the struct (``features`` = all supported,
        ``ioctls`` = UFFD_API_IOCTLS). Only once per uffd; the struct is zeroed
        on failure (``userfaultfd_api``)."""
        arg = uapi.uffdio_api(api=api, features=features)
        self.ioctl(UFFDIO_API, arg)
        return arg

    def register(self, start: int, len: int, mode: int) -> int:
        """UFFDIO_REGISTER ``[start, start+len)`` in ``mode`` (MISSING|WP|MINOR);
        returns the ``ioctls`` bitmask valid on the range (``userfaultfd_register``)."""
        arg = uapi.uffdio_register(uapi.uffdio_range(start, len), mode)
        self.ioctl(UFFDIO_REGISTER, arg)
        return arg.ioctls

    def unregister(self, start: int, len: int) -> None:
        """UFFDIO_UNREGISTER ``[start, start+len)`` (``userfaultfd_unregister``)."""
        self.ioctl(UFFDIO_UNREGISTER, uapi.uffdio_range(start, len))

    def wake(self, start: int, len: int) -> None:
        """UFFDIO_WAKE: wake threads whose fault address is in the range (``userfaultfd_wake``)."""
        self.ioctl(UFFDIO_WAKE, uapi.uffdio_range(start, len))

    def copy(self, dst: int, src: int, len: int, mode: int = 0) -> int:
        """UFFDIO_COPY: fill ``[dst, dst+len)`` from ``src``; returns bytes copied
        (``mfill_atomic_copy``). Partial progress raises EAGAIN, ``e.struct.copy`` > 0."""
        arg = uapi.uffdio_copy(dst, src, len, mode)
        self.ioctl(UFFDIO_COPY, arg)
        return arg.copy

    def zeropage(self, start: int, len: int, mode: int = 0) -> int:
        """UFFDIO_ZEROPAGE: map zero pages; returns bytes done (``mfill_atomic_zeropage``)."""
        arg = uapi.uffdio_zeropage(uapi.uffdio_range(start, len), mode)
        self.ioctl(UFFDIO_ZEROPAGE, arg)
        return arg.zeropage

    def writeprotect(self, start: int, len: int, mode: int) -> None:
        """UFFDIO_WRITEPROTECT: set (MODE_WP) or clear (0) uffd-wp on the range
        (``mwriteprotect_range``); clearing wakes writers unless MODE_DONTWAKE."""
        arg = uapi.uffdio_writeprotect(uapi.uffdio_range(start, len), mode)
        self.ioctl(UFFDIO_WRITEPROTECT, arg)

    def continue_(self, start: int, len: int, mode: int = 0) -> int:
        """UFFDIO_CONTINUE: map page-cache pages for minor faults; returns bytes
        mapped (``mfill_atomic_continue``)."""
        arg = uapi.uffdio_continue(uapi.uffdio_range(start, len), mode)
        self.ioctl(UFFDIO_CONTINUE, arg)
        return arg.mapped

    def poison(self, start: int, len: int, mode: int = 0) -> int:
        """UFFDIO_POISON: install poison markers (later access: SIGBUS); returns
        bytes done (``mfill_atomic_poison``)."""
        arg = uapi.uffdio_poison(uapi.uffdio_range(start, len), mode)
        self.ioctl(UFFDIO_POISON, arg)
        return arg.updated

    def move(self, dst: int, src: int, len: int, mode: int = 0) -> int:
        """UFFDIO_MOVE: move anonymous pages from ``src`` to ``dst``; returns bytes
        moved (``move_pages``)."""
        arg = uapi.uffdio_move(dst, src, len, mode)
        self.ioctl(UFFDIO_MOVE, arg)
        return arg.move

    # -- messages -----------------------------------------------------------

    def read_raw(self, nbytes: int = uapi.UFFD_MSG_SIZE) -> bytes:
        """``read(2)`` up to ``nbytes``: whole 32-byte ``uffd_msg``s
        (``userfaultfd_read_iter``). Blocks for the first message unless
        O_NONBLOCK (then EAGAIN); EINVAL before UFFDIO_API or if ``nbytes`` < 32."""
        return os.read(self.fileno(), nbytes)

    def read(self, nbytes: int = uapi.UFFD_MSG_SIZE) -> list[UffdMsg]:
        """Read and decode messages (see :meth:`read_raw`)."""
        return uapi.decode_msgs(self.read_raw(nbytes))

    def read_msgs(self, nbytes: int = uapi.UFFD_MSG_SIZE) -> list[UffdMsg]:
        """Read and decode messages: the name the emulator's Userfaultfd uses too."""
        return self.read(nbytes)

    def poll(self, events: int = select.POLLIN, timeout_ms: int = 0) -> int:
        """``poll(2)`` on the uffd alone; returns ``revents`` (``userfaultfd_poll``:
        POLLERR before API or on a blocking fd, POLLIN while messages are pending)."""
        p = select.poll()
        p.register(self.fileno(), events)
        while True:
            try:
                ready = p.poll(timeout_ms)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            return ready[0][1] if ready else 0

    def fdinfo(self) -> str:
        """The userfaultfd lines of ``/proc/self/fdinfo/<fd>`` (``userfaultfd_show_fdinfo``):
        ``pending``, ``total`` and ``API``, the text vmemu's ``fdinfo()`` gives (the generic
        pos/flags/mnt_id/ino lines left out)."""
        with open(f"/proc/self/fdinfo/{self.fileno()}") as f:
            lines = [ln for ln in f.read().splitlines()
                     if ln.split(":")[0] in ("pending", "total", "API")]
        return "".join(ln + "\n" for ln in lines)

    def drain(self) -> tuple[list[UffdMsg], int]:
        """Read messages until read(2) fails; returns ``(messages, errno)``.

        Meant for non-blocking uffds (a blocking one blocks when empty).
        """
        msgs: list[UffdMsg] = []
        while True:
            try:
                msgs += self.read()
            except OSError as e:
                return msgs, e.errno or errno.EIO
