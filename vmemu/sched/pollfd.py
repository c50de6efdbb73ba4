"""A real file descriptor that is readable exactly while an object has something to read.

userfaultfd handlers wait in `select`/`poll`/`epoll` on `uffd.fileno()`,
which the kernel makes readable while fault messages are pending
(`userfaultfd_poll` returning EPOLLIN).  vmemu's uffd is not a kernel file,
so it keeps a `ReadinessFd` in step with its message queue: an eventfd whose
counter is 1 while ready and 0 otherwise (a pipe holding one byte where
`os.eventfd` is missing).  The descriptor is created on the first `fileno()`
call, so runs that never poll never open one.

Only readiness is signalled here; data is read through the owning object
(`uffd.read()`), never from this descriptor.
"""

from __future__ import annotations

import os
import threading
from typing import Any


class ReadinessFd:
    """An fd that polls readable exactly while `set_ready(True)` is in force."""

    def __init__(self, *, prefer_eventfd: bool = True) -> None:
        self._prefer_eventfd = prefer_eventfd and hasattr(os, "eventfd")
        self._lock = threading.Lock()
        self._ready = False
        self._rfd = -1
        self._wfd = -1
        self._closed = False
        self._closed_write = False

    @property
    def kind(self) -> str:
        """"eventfd" or "pipe": how readiness is signalled."""
        return "eventfd" if self._prefer_eventfd else "pipe"

    @property
    def ready(self) -> bool:
        """Whether the fd is (to be) readable."""
        return self._ready

    def fileno(self) -> int:
        """The descriptor to hand to select/poll/epoll/selectors (opened on first use)."""
        with self._lock:
            if self._closed:
                raise ValueError("fileno() on a closed ReadinessFd")
            if self._rfd < 0:
                self._open()
                if self._ready:
                    self._signal()
            return self._rfd

    def set_ready(self, ready: bool) -> None:
        """Make the fd readable (`True`) or not (`False`); idempotent."""
        with self._lock:
            if ready == self._ready:
                return
            self._ready = ready
            if self._rfd < 0 or self._closed or self._closed_write:
                return
            if ready:
                self._signal()
            else:
                self._drain()

    def hang_up(self) -> None:
        """Report end of file: poll gives POLLHUP from now on (pipe mode closes its write end).

        An eventfd cannot hang up, so in eventfd mode the fd just stays readable.
        """
        with self._lock:
            if self._closed:
                return
            if self._rfd < 0:
                self._open()
            if self._prefer_eventfd:
                if not self._ready:
                    self._signal()
            elif self._wfd >= 0:
                os.close(self._wfd)
                self._wfd = -1
            self._ready = True
            self._closed_write = True

    def close(self) -> None:
        """Close the descriptor(s); later `set_ready` calls are only recorded."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in {self._rfd, self._wfd}:
                if fd >= 0:
                    os.close(fd)
            self._rfd = self._wfd = -1

    def __enter__(self) -> ReadinessFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def __repr__(self) -> str:
        return f"<ReadinessFd {self.kind} fd={self._rfd} ready={self._ready}>"

    # ---- the two mechanisms --------------------------------------------------

    def _open(self) -> None:
        if self._prefer_eventfd:
            flags: Any = os.EFD_NONBLOCK | os.EFD_CLOEXEC
            self._rfd = self._wfd = os.eventfd(0, flags)
        else:
            self._rfd, self._wfd = os.pipe()
            os.set_blocking(self._rfd, False)
            os.set_blocking(self._wfd, False)

    def _signal(self) -> None:
        if self._prefer_eventfd:
            os.eventfd_write(self._wfd, 1)
        else:
            os.write(self._wfd, b"\x01")

    def _drain(self) -> None:
        try:
            if self._prefer_eventfd:
                os.eventfd_read(self._rfd)
            else:
                while os.read(self._rfd, 4096):
                    pass
        except BlockingIOError:
            pass
