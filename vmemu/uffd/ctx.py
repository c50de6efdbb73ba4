"""The userfaultfd file object: ``struct userfaultfd_ctx`` and its fops (``fs/userfaultfd.c``).

A :class:`Userfaultfd` is what ``userfaultfd(2)`` returns: an object with
the uABI's ioctls as methods (and a raw :meth:`Userfaultfd.ioctl` taking the
C structs), ``read()`` of 32-byte ``uffd_msg``s, ``poll()``, a real file
descriptor for ``select``/``epoll`` (readable exactly while a message is
queued) and ``close()``. Its life is an explicit state machine:
``WAIT_API`` until the UFFDIO_API handshake, ``RUNNING``, ``RELEASED``
after the last close.

Three queues hold what userland has not seen yet or is waiting on:
pending faults (unread), read faults (the task still sleeps) and events
(fork, remap, remove, unmap), whose raising task sleeps until the event is
read. Reads return all pending faults before any event, each in FIFO order.
"""

from __future__ import annotations

import enum
import errno
import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs

from vmemu.errors import raise_errno
from vmemu.mmu.memory import VmFaultInfo
from vmemu.sched.waitqueue import WaitQueue
from vmemu.uffd import uapi
from vmemu.uffd.fault import UserfaultWait, handle_userfault, mm_lock_dropped
from vmemu.uffd.uapi import (
    O_NONBLOCK,
    UFFD_API,
    UFFD_API_FEATURES,
    UFFD_API_IOCTLS,
    UFFD_FEATURE_EVENT_FORK,
    UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_UNPOPULATED,
    UFFD_MSG_SIZE,
    ForkMsg,
    UffdMsg,
)

if TYPE_CHECKING:
    from vmemu.process import Process

POLLIN = 0x001
POLLERR = 0x008
POLLHUP = 0x010
POLLRDNORM = 0x040


class UffdState(enum.Enum):
    """Where a userfaultfd is in its life."""

    WAIT_API = "wait_api"
    RUNNING = "running"
    RELEASED = "released"


@attrs.define(eq=False, slots=True)
class EventWait:
    """A task waiting for its non-cooperative event to be read (``userfaultfd_wait_queue``)."""

    msg: UffdMsg
    waken: bool = False
    fork_ctx: Any = None


@attrs.frozen
class UffdStatistics:
    """``/proc/<pid>/fdinfo`` of a userfaultfd, plus totals."""

    pending: int
    total: int
    events: int
    faults_seen: int
    api: str


def _ioctl_dispatch() -> Any:
    """``vmemu.uffd.ioctl.dispatch``, imported on first use (ioctl.py imports this module)."""
    global _dispatch, _handlers, _ops
    if _dispatch is None:
        import vmemu.uffd.ioctl as ops

        _dispatch, _handlers, _ops = ops.dispatch, ops._HANDLERS, ops
    return _dispatch


def _ioctl_ops() -> Any:
    """The module :mod:`vmemu.uffd.ioctl`, whose operations take plain integers."""
    _ioctl_dispatch()
    return _ops


_dispatch: Any = None
_ops: Any = None  # vmemu.uffd.ioctl
_handlers: dict[int, tuple[type, Any]] = {}  # ioctl._HANDLERS: cmd -> (struct class, handler)
_RUNNING = UffdState.RUNNING


def _range_match(entry_key: Any, wake_key: Any) -> bool:
    """Waiters keyed by fault address; a wake key ``(start, len)`` with len 0 wakes all."""
    if wake_key is None:
        return True
    start, length = wake_key
    return length == 0 or (entry_key is not None and start <= entry_key < start + length)


class Userfaultfd:
    """An in-process userfaultfd (``struct userfaultfd_ctx`` + its file)."""

    def __init__(self, process: Process, flags: int, *, features: int = 0,
                 state: UffdState = UffdState.WAIT_API) -> None:
        self.process = process
        self.mm = process.mm
        self.kernel = process.kernel
        self.flags = flags
        self.features = features
        self.state = state
        #: True after the last close (``ctx->released``): ``state is RELEASED``, kept as a
        #: plain attribute because every fault and every wait condition reads it
        self.released = state is UffdState.RELEASED
        self.fd = -1
        self.refs = 1  # open file references (fork and dup share the file)
        runtime = self.kernel.runtime
        self.runtime = runtime
        self.tracer = runtime.tracer
        self.lock = threading.RLock()
        self.fault_pending: list[UserfaultWait] = []
        self.fault_read: list[UserfaultWait] = []
        self.events: list[EventWait] = []
        self.fault_wq = WaitQueue(runtime, "uffd.fault_wqh", match=_range_match)
        self.fd_wq = WaitQueue(runtime, "uffd.fd_wqh")
        self.event_wq = WaitQueue(runtime, "uffd.event_wqh")
        self.mmap_changing = 0
        self.stat_faults = 0
        self.exclusive_read = False  # vmemu option (Peter Xu's wake-one read/poll)
        from vmemu.sched.pollfd import ReadinessFd

        self._ready = ReadinessFd(prefer_eventfd=False)
        # readiness of the fd, under self.lock: what the queues say (_is_ready), told to
        # the ReadinessFd only once someone has asked for fileno() (set_ready takes a lock)
        self._is_ready = False
        self._fd_open = False
        #: the mm's hook, ``handle_userfault(vmf, reason)``: deliver a fault to this
        #: context (see :mod:`vmemu.uffd.fault`); bound here, one Python frame fewer per fault
        self.handle_userfault: Callable[[VmFaultInfo, int], Any] = partial(handle_userfault, self)
        self._hup = False

    def __repr__(self) -> str:
        return f"Userfaultfd(fd={self.fd}, state={self.state.value}, features={self.features:#x})"

    # -- state ------------------------------------------------------------------

    @property
    def wp_async(self) -> bool:
        """UFFD_FEATURE_WP_ASYNC is on (``userfaultfd_wp_async``)."""
        return bool(self.features & UFFD_FEATURE_WP_ASYNC)

    @property
    def wp_unpopulated(self) -> bool:
        """UFFD_FEATURE_WP_UNPOPULATED is on (``userfaultfd_wp_unpopulated``)."""
        return bool(self.features & UFFD_FEATURE_WP_UNPOPULATED)

    def _check_running(self) -> None:
        if self.state is not UffdState.RUNNING:
            raise_errno(errno.EINVAL, "UFFDIO_API handshake not done")

    def trace(self, kind: str, **fields: Any) -> None:
        """Emit a tracepoint on the kernel's tracer."""
        tracer = self.tracer
        if tracer.enabled:
            tracer.emit(kind, **fields)

    # -- the handshake ------------------------------------------------------------

    def api(self, features: int = 0, api: int = UFFD_API) -> uapi.uffdio_api:
        """UFFDIO_API: agree on the protocol and enable features (``userfaultfd_api``).

        Returns the struct as the kernel writes it back: ``features`` = every
        supported feature (not just the enabled ones) and ``ioctls`` =
        UFFD_API_IOCTLS. On failure the struct is zeroed and ``OSError``
        carries it as ``e.struct``.
        """
        arg = uapi.uffdio_api(api=api, features=features)
        self.ioctl(uapi.UFFDIO_API, arg)
        return arg

    def _do_api(self, arg: uapi.uffdio_api) -> None:
        err = 0
        features = arg.features
        supported = self.kernel.uffd_profile.features
        if arg.api != UFFD_API:
            err = errno.EINVAL
        elif features & UFFD_FEATURE_EVENT_FORK and not self.process.capable_sys_ptrace:
            err = errno.EPERM
        elif features & ~supported:
            err = errno.EINVAL
        elif self.state is not UffdState.WAIT_API:
            err = errno.EINVAL
        if err:
            arg.api = arg.features = arg.ioctls = 0
            raise_errno(err)
        if features & UFFD_FEATURE_WP_ASYNC:
            features |= UFFD_FEATURE_WP_UNPOPULATED
        self.features = features & UFFD_API_FEATURES
        self.state = UffdState.RUNNING
        arg.features = supported
        arg.ioctls = UFFD_API_IOCTLS

    # -- ioctls: the raw form and the Pythonic one ------------------------------------

    def ioctl(self, cmd: int, arg: Any, caller: Process | None = None) -> Any:
        """``ioctl(fd, cmd, &arg)`` with the uABI struct; returns ``arg`` as the kernel left it.

        Raises ``OSError(errno)`` with ``e.struct = arg`` on failure, exactly
        like :class:`vmemu.native.NativeUserfaultfd`.
        """
        caller_mm = (caller or self.process).mm
        if self.tracer.enabled:
            self.tracer.emit("uffd_ioctl", cmd=uapi.IOCTL_NAMES.get(cmd, hex(cmd)))
        self.runtime.charge("syscall")
        handler = _handlers.get(cmd) if self.state is _RUNNING else None
        if handler is not None and type(arg) is handler[0]:  # dispatch's common case, inlined
            handler[1](self, arg, caller_mm)
            return arg
        return (_dispatch or _ioctl_dispatch())(self, cmd, arg, caller_mm)

    def register(self, start: int, len: int, mode: int) -> int:  # noqa: A002 - uABI field name
        """UFFDIO_REGISTER ``[start, start+len)`` in ``mode``; returns the ``ioctls`` mask."""
        arg = uapi.uffdio_register(uapi.uffdio_range(start, len), mode)
        self.ioctl(uapi.UFFDIO_REGISTER, arg)
        return arg.ioctls

    def unregister(self, start: int, len: int) -> None:  # noqa: A002
        """UFFDIO_UNREGISTER ``[start, start+len)``."""
        self.ioctl(uapi.UFFDIO_UNREGISTER, uapi.uffdio_range(start, len))

    def wake(self, start: int, len: int) -> None:  # noqa: A002
        """UFFDIO_WAKE: wake tasks whose fault address is in the range."""
        self.ioctl(uapi.UFFDIO_WAKE, uapi.uffdio_range(start, len))

    # The range ioctls a fault handler calls, as methods (copy, zeropage, writeprotect,
    # continue_, move): the operation itself, with the uABI struct built only to go with
    # an error (``e.struct``) - unless the call is traced or comes before the handshake,
    # when it takes the ioctl path above, struct and all. The others (wake, poison, ...)
    # always take that path.

    def copy(self, dst: int, src: int, len: int, mode: int = 0) -> int:  # noqa: A002
        """UFFDIO_COPY; returns bytes copied (partial progress: EAGAIN, ``e.struct.copy``)."""
        if self.state is not _RUNNING or self.tracer.enabled:
            arg = uapi.uffdio_copy(dst, src, len, mode)
            self.ioctl(uapi.UFFDIO_COPY, arg)
            return int(arg.copy)
        self.runtime.charge("syscall")
        ops = _ops or _ioctl_ops()
        try:
            return int(ops.copy(self, dst, src, len, mode))
        except ops.IoctlFailure as f:
            raise ops.struct_error(f, uapi.uffdio_copy(dst, src, len, mode), "copy") from None

    def zeropage(self, start: int, len: int, mode: int = 0) -> int:  # noqa: A002
        """UFFDIO_ZEROPAGE; returns bytes zeroed."""
        if self.state is not _RUNNING or self.tracer.enabled:
            arg = uapi.uffdio_zeropage(uapi.uffdio_range(start, len), mode)
            self.ioctl(uapi.UFFDIO_ZEROPAGE, arg)
            return int(arg.zeropage)
        self.runtime.charge("syscall")
        ops = _ops or _ioctl_ops()
        try:
            return int(ops.zeropage(self, start, len, mode))
        except ops.IoctlFailure as f:
            arg = uapi.uffdio_zeropage(uapi.uffdio_range(start, len), mode)
            raise ops.struct_error(f, arg, "zeropage") from None

    def writeprotect(self, start: int, len: int, mode: int) -> None:  # noqa: A002
        """UFFDIO_WRITEPROTECT: MODE_WP protects, 0 unprotects (and wakes unless DONTWAKE)."""
        if self.state is not _RUNNING or self.tracer.enabled:
            self.ioctl(uapi.UFFDIO_WRITEPROTECT,
                       uapi.uffdio_writeprotect(uapi.uffdio_range(start, len), mode))
            return
        self.runtime.charge("syscall")
        ops = _ops or _ioctl_ops()
        try:
            ops.writeprotect(self, start, len, mode)
        except ops.IoctlFailure as f:
            arg = uapi.uffdio_writeprotect(uapi.uffdio_range(start, len), mode)
            raise ops.struct_error(f, arg, None) from None

    def continue_(self, start: int, len: int, mode: int = 0) -> int:  # noqa: A002
        """UFFDIO_CONTINUE; returns bytes mapped."""
        if self.state is not _RUNNING or self.tracer.enabled:
            arg = uapi.uffdio_continue(uapi.uffdio_range(start, len), mode)
            self.ioctl(uapi.UFFDIO_CONTINUE, arg)
            return int(arg.mapped)
        self.runtime.charge("syscall")
        ops = _ops or _ioctl_ops()
        try:
            return int(ops.continue_(self, start, len, mode))
        except ops.IoctlFailure as f:
            arg = uapi.uffdio_continue(uapi.uffdio_range(start, len), mode)
            raise ops.struct_error(f, arg, "mapped") from None

    def poison(self, start: int, len: int, mode: int = 0) -> int:  # noqa: A002
        """UFFDIO_POISON; returns bytes poisoned."""
        arg = uapi.uffdio_poison(uapi.uffdio_range(start, len), mode)
        self.ioctl(uapi.UFFDIO_POISON, arg)
        return int(arg.updated)

    def move(self, dst: int, src: int, len: int, mode: int = 0) -> int:  # noqa: A002
        """UFFDIO_MOVE; returns bytes moved."""
        if self.state is not _RUNNING or self.tracer.enabled:
            arg = uapi.uffdio_move(dst, src, len, mode)
            self.ioctl(uapi.UFFDIO_MOVE, arg)
            return int(arg.move)
        self.runtime.charge("syscall")
        ops = _ops or _ioctl_ops()
        try:
            return int(ops.move(self, dst, src, len, mode, self.process.mm))
        except ops.IoctlFailure as f:
            raise ops.struct_error(f, uapi.uffdio_move(dst, src, len, mode), "move") from None

    def pagemap_scan(self, start: int, end: int, flags: int = 0) -> list[Any]:
        """PAGEMAP_SCAN over a WP_ASYNC range: which pages were written (and re-protect)."""
        from vmemu.uffd.wp import pagemap_scan

        return pagemap_scan(self, start, end, flags)

    def set_inline_handler(self, handler: Any) -> None:
        """Handle faults on the faulting task itself: ``handler(uffd)`` runs before it sleeps.

        The asynchronous-read idea of the polling-mode proposal, done the
        simplest way: instead of waking a handler thread, the task that
        faulted (or raised an event) calls ``handler``, which reads the queued
        messages with :meth:`read_msgs` and resolves them with the usual
        ioctls. A handler that touches memory registered with this uffd and
        unresolved faults again inside itself: that is reported as
        ``vmemu.sched.ReentrantFault``, never a hang. ``None`` switches it off.
        """
        resolver = None if handler is None else (lambda _key: handler(self))
        self.fault_wq.set_resolver(resolver)
        self.event_wq.set_resolver(resolver)

    # -- reading messages ---------------------------------------------------------

    def _dequeue_one(self) -> UffdMsg | None:
        """Take the oldest pending fault, else the oldest event (``userfaultfd_ctx_read``)."""
        with self.lock:
            if self.fault_pending:
                uwq = self.fault_pending.pop(0)
                uwq.where = "read"
                self.fault_read.append(uwq)
                msg: UffdMsg = uwq.msg
            elif self.events:
                ewq = self.events.pop(0)
                msg = ewq.msg
                if ewq.fork_ctx is not None:
                    ewq.fork_ctx.fd = self.process.install_file(ewq.fork_ctx)
                    msg = ForkMsg(ewq.fork_ctx.fd)
                    ewq.msg = msg
                ewq.waken = True
                self.event_wq.wake_up_all()
            else:
                return None
            if self._is_ready is not bool(self.fault_pending or self.events):
                self._update_ready()
        if self.tracer.enabled:
            self.tracer.emit("uffd_read", event=msg.event)
        return msg

    def read_msgs(self, nbytes: int = UFFD_MSG_SIZE) -> list[UffdMsg]:
        """read(2): as many whole messages as fit in ``nbytes`` (``userfaultfd_read_iter``).

        Blocks for the first message unless the fd is O_NONBLOCK (EAGAIN);
        never blocks for the following ones. EINVAL before UFFDIO_API or
        when ``nbytes`` < 32.
        """
        if self.state is not _RUNNING:
            self._check_running()
        if nbytes < UFFD_MSG_SIZE:
            raise_errno(errno.EINVAL)
        out: list[UffdMsg] = []
        room = nbytes // UFFD_MSG_SIZE
        while True:
            pending = self.fault_pending
            if pending and not self.tracer.enabled:  # faults first: _dequeue_one's fault branch
                with self.lock:
                    while pending and len(out) < room:
                        uwq = pending.pop(0)
                        uwq.where = "read"
                        self.fault_read.append(uwq)
                        out.append(uwq.msg)
                    if not (pending or self.events):  # _update_ready, inlined
                        self._is_ready = False
                        if self._fd_open:
                            self._ready.set_ready(False)
            while len(out) < room and (self.fault_pending or self.events):
                msg = self._dequeue_one()
                if msg is None:
                    break
                out.append(msg)
            if out:
                return out
            if self.flags & O_NONBLOCK:
                raise_errno(errno.EAGAIN)
            if self.released:
                return out
            self.fd_wq.wait_event(self._has_msgs, exclusive=self.exclusive_read,
                                  reason="read()")

    #: read(2), decoded: the same as :meth:`read_msgs` (and as the native binding's ``read``)
    read = read_msgs

    def read_raw(self, nbytes: int = UFFD_MSG_SIZE) -> bytes:
        """read(2) returning the raw 32-byte ``uffd_msg``s, exactly as the kernel lays them out."""
        return b"".join(m.pack() for m in self.read_msgs(nbytes))

    def read_msg(self) -> UffdMsg:
        """Read one decoded message (blocking unless O_NONBLOCK)."""
        return self.read_msgs(UFFD_MSG_SIZE)[0]

    def _has_msgs(self) -> bool:
        return bool(self.fault_pending or self.events or self.released)

    def poll(self, events: int = POLLIN, timeout_ms: int = 0) -> int:
        """poll(2) on this fd alone: ``revents`` (``userfaultfd_poll``), as the native binding.

        POLLERR before the handshake and on a blocking fd; POLLIN while a
        message is queued; POLLHUP after release. POLLERR and POLLHUP are
        reported whatever ``events`` asks for. With nothing to report the
        task sleeps on the file's wait queue (``fd_wqh``) for up to
        ``timeout_ms`` (forever if negative; 0 returns at once), a
        scheduling point under every runtime.
        """
        mask = events | POLLERR | POLLHUP
        revents = self._revents() & mask
        if revents or timeout_ms == 0:
            return revents
        self.fd_wq.wait_event(lambda: bool(self._revents() & mask), reason="poll()",
                              timeout=None if timeout_ms < 0 else timeout_ms / 1000)
        return self._revents() & mask

    def _revents(self) -> int:
        if self.released:
            return POLLHUP
        if self.state is UffdState.WAIT_API or not self.flags & O_NONBLOCK:
            return POLLERR
        return POLLIN if (self.fault_pending or self.events) else 0

    def fileno(self) -> int:
        """A real fd, readable exactly while a message is queued; hung up after release."""
        with self.lock:
            fd = self._ready.fileno()
            if not self._fd_open:  # from now on every readiness change goes to the fd
                self._fd_open = True
                self._ready.set_ready(self._is_ready)
            return fd

    def notify_readers(self) -> None:
        """A message was queued: wake readers and pollers (``wake_up_poll(fd_wqh, EPOLLIN)``).

        Only when someone waits (``if (waitqueue_active(&ctx->fd_wqh))``, as
        ``handle_userfault`` does): a reader that queues itself later sees the
        message when it re-checks before sleeping.
        """
        if not self._is_ready:
            with self.lock:
                self._update_ready()
        if not self.fd_wq.waitqueue_active():
            return
        self.fd_wq.wake_up(None, 1 if self.exclusive_read else 0)  # wake-one, or wake_up_all

    def _update_ready(self) -> None:
        """Make the fd readable exactly while a message is queued (call with ``self.lock``)."""
        ready = bool(self.fault_pending or self.events)
        if ready is not self._is_ready:  # set_ready takes a lock: only on a change
            self._is_ready = ready
            if self._fd_open:
                self._ready.set_ready(ready)

    def dequeue(self, uwq: UserfaultWait) -> None:
        """Take a fault off whichever queue holds it (the end of ``handle_userfault``)."""
        with self.lock:
            if uwq.where == "pending":
                self.fault_pending.remove(uwq)
            elif uwq.where == "read":
                self.fault_read.remove(uwq)
            uwq.where = ""
            self._update_ready()

    # -- waking faults ------------------------------------------------------------

    def wake_range(self, start: int, length: int) -> int:
        """Wake tasks whose fault address is in ``[start, start+len)`` (``wake_userfault``).

        ``length == 0`` wakes everyone (used by release). Returns how many.
        """
        end = start + length
        n = 0
        with self.lock:
            for q in (self.fault_pending, self.fault_read):
                if not q:
                    continue
                if len(q) == 1:  # the usual queue: one fault, read or not
                    uwq = q[0]
                    if length == 0 or start <= uwq.address < end:  # _range_match
                        uwq.waken = True
                        uwq.where = ""
                        n += 1
                        q.clear()
                    continue
                keep = []
                for uwq in q:
                    if length == 0 or start <= uwq.address < end:  # _range_match
                        uwq.waken = True
                        uwq.where = ""
                        n += 1
                    else:
                        keep.append(uwq)
                if len(keep) != len(q):
                    q[:] = keep
            if n and self._is_ready is not bool(self.fault_pending or self.events):
                self._update_ready()
        if n:
            self.fault_wq.wake_up((start, length), 0)  # wake_up_all, one call fewer
        return n

    # -- events --------------------------------------------------------------------

    def queue_event(self, msg: UffdMsg, fork_ctx: Any = None) -> None:
        """Queue a non-cooperative event and sleep until it is read.

        Mirrors ``userfaultfd_event_wait_completion``: the raiser holds no mm
        lock while it waits; ``mmap_changing`` (raised by the caller when the
        event was prepared) drops when the wait ends. If the uffd is released
        first, the event is dropped and a FORK's new context released.
        """
        ewq = EventWait(msg, fork_ctx=fork_ctx)
        with self.lock:
            if self.released:
                self.mmap_changing = max(0, self.mmap_changing - 1)
                return
            self.events.append(ewq)
        self.trace("uffd_event", event=msg.event)
        self.notify_readers()
        with mm_lock_dropped(self.mm):
            self.event_wq.wait_event(lambda: ewq.waken or self.released,
                                     reason=f"event {type(msg).__name__} to be read")
        with self.lock:
            if not ewq.waken and ewq in self.events:
                self.events.remove(ewq)
                if fork_ctx is not None:
                    fork_ctx._release()
            self.mmap_changing = max(0, self.mmap_changing - 1)
            self._update_ready()

    # -- the mm's event hooks (see vmemu.uffd.events) ------------------------------

    def event_remove(self, start: int, end: int) -> bool:
        """MADV_DONTNEED/FREE/REMOVE is about to drop ``[start, end)``."""
        from vmemu.uffd.events import event_remove

        return event_remove(self, start, end)

    def dup_vma(self, child_vma: Any, child_mm: Any, fork_ctxs: dict[int, Any]) -> bool:
        """fork copies a VMA registered here; True if the child keeps registration."""
        from vmemu.uffd.events import dup_vma

        return dup_vma(self, child_vma, child_mm, fork_ctxs)

    def event_fork(self, child_ctx: Userfaultfd) -> None:
        """Deliver FORK for ``child_ctx`` and wait until it is read."""
        self.queue_event(ForkMsg(-1), fork_ctx=child_ctx)

    def unmap_prep(self, pending: list[Any], start: int, end: int) -> None:
        """An unmap of ``[start, end)`` covers a VMA registered here."""
        from vmemu.uffd.events import unmap_prep

        unmap_prep(self, pending, start, end)

    def event_unmap(self, start: int, end: int) -> None:
        """Deliver UNMAP and wait until it is read."""
        from vmemu.uffd.uapi import UnmapMsg

        self.queue_event(UnmapMsg(start, end))

    def mremap_prep(self, new_vma: Any) -> bool:
        """mremap moves a VMA registered here; True if it keeps registration (EVENT_REMAP)."""
        from vmemu.uffd.events import remap_prep

        return remap_prep(self, new_vma)

    def event_remap(self, from_: int, to: int, length: int) -> None:
        """Deliver REMAP and wait until it is read."""
        from vmemu.uffd.uapi import RemapMsg

        self.queue_event(RemapMsg(from_, to, length))

    def mremap_fail(self) -> None:
        """The mremap announced by :meth:`mremap_prep` failed: no event will come."""
        with self.lock:
            self.mmap_changing = max(0, self.mmap_changing - 1)

    # -- release ------------------------------------------------------------------

    def close(self) -> None:
        """close(2) of this fd; the last close releases the context."""
        if self.fd >= 0 and self.process.fds.get(self.fd) is self:
            self.process.close(self.fd)
        else:
            self.release()

    def release(self) -> None:
        """Drop one file reference; the last one releases the context (``fput``)."""
        self.refs -= 1
        if self.refs <= 0:
            self._release()

    def _release(self) -> None:
        """Release the context (``userfaultfd_release``).

        Every VMA registered with it is unregistered (uffd-wp state cleared),
        every sleeping fault and event raiser is woken, unread messages are
        dropped, and poll reports POLLHUP. Faults then proceed as if the
        range had never been registered.
        """
        if self.released:
            return
        from vmemu.uffd.register import release_all_vmas

        with self.mm.lock:
            release_all_vmas(self)
        with self.lock:
            self.state = UffdState.RELEASED
            self.released = True
            for q in (self.fault_pending, self.fault_read):
                for uwq in q:
                    uwq.waken = True
                    uwq.where = ""
                q.clear()
            events = list(self.events)
            self.events.clear()
        for ewq in events:
            if ewq.fork_ctx is not None:
                ewq.fork_ctx._release()
        self.fault_wq.wake_up_all()
        self.event_wq.wake_up_all()
        self.fd_wq.wake_up_all()
        self._ready.hang_up()
        self._is_ready = True
        self.trace("uffd_release")

    # -- fdinfo -----------------------------------------------------------------------

    def fdinfo(self) -> str:
        """``/proc/<pid>/fdinfo/<fd>`` text (``userfaultfd_show_fdinfo``)."""
        from vmemu.uffd.uapi import UFFD_API_RANGE_IOCTLS, UFFD_FEATURE_INITIALIZED

        with self.lock:
            pending = len(self.fault_pending)
            total = pending + len(self.fault_read)
        feats = self.features | (UFFD_FEATURE_INITIALIZED if self.state is not UffdState.WAIT_API
                                 else 0)
        return (f"pending:\t{pending}\ntotal:\t{total}\n"
                f"API:\t{UFFD_API:x}:{feats:x}:{UFFD_API_IOCTLS | UFFD_API_RANGE_IOCTLS:x}\n")

    def statistics(self) -> UffdStatistics:
        """Counters of this context."""
        with self.lock:
            return UffdStatistics(len(self.fault_pending),
                                  len(self.fault_pending) + len(self.fault_read),
                                  len(self.events), self.stat_faults, self.fdinfo().split("\n")[2])
