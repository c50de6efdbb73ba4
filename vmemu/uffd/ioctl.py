"""The ioctl dispatcher of a userfaultfd (``userfaultfd_ioctl`` in ``fs/userfaultfd.c``).

Each handler takes the uABI struct, validates it in the kernel's order and
writes output fields back exactly when the kernel does: the
``copy``/``zeropage``/``mapped``/``updated``/``move`` field gets ``-EAGAIN``
when a non-cooperative event is unread (before any validation), bytes done
or ``-errno`` after the operation ran, and is left untouched by a
validation failure. Partial progress is EAGAIN with the bytes done in the
field; a successful call wakes the done range unless asked not to.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmemu.constants import PAGE_SIZE, TASK_SIZE
from vmemu.errors import errno_error
from vmemu.uffd import uapi
from vmemu.uffd.ctx import UffdState
from vmemu.uffd.mfill import MfillError, MfillMode, mfill_atomic, mfill_atomic_page
from vmemu.uffd.move import move_pages
from vmemu.uffd.register import (
    register,
    unregister,
    validate_range,
    validate_unaligned_range,
)
from vmemu.uffd.wp import mwriteprotect_range

if TYPE_CHECKING:
    from vmemu.uffd.ctx import Userfaultfd


_RUNNING = UffdState.RUNNING
_PAGE_LOW = PAGE_SIZE - 1
_COPY, _ZEROPAGE, _CONTINUE = MfillMode.COPY, MfillMode.ZEROPAGE, MfillMode.CONTINUE


def _fail(err: int, arg: Any) -> None:
    e = errno_error(err)
    e.struct = arg  # type: ignore[attr-defined]
    raise e


def _finish(ctx: Userfaultfd, arg: Any, field: str, start: int, length: int, dontwake: bool,
            run: Any) -> None:
    """Run an mfill-style operation and apply the output-field and wake rules."""
    if ctx.mm.dead:
        _fail(errno.ESRCH, arg)
    try:
        done = run()
    except MfillError as e:
        setattr(arg, field, -e.errno)
        _fail(e.errno, arg)
    setattr(arg, field, done)
    if not dontwake:
        wake_userfault(ctx, start, done)
    if done != length:
        _fail(errno.EAGAIN, arg)


def _finish_page(ctx: Userfaultfd, arg: Any, field: str, start: int, dontwake: bool, src: int,
                 mode: MfillMode, wp: bool) -> None:
    """``_finish`` of ``mfill_atomic_page`` (one 4 KiB page): the same rules, without the
    closure - ESRCH on a dead mm, ``-errno`` or the bytes done in ``field``, the wake of
    the done range unless ``dontwake`` (``wake_userfault``, inlined), EAGAIN if short."""
    if ctx.mm.dead:
        _fail(errno.ESRCH, arg)
    try:
        done = mfill_atomic_page(ctx, start, src, mode, wp)
    except MfillError as e:
        setattr(arg, field, -e.errno)
        _fail(e.errno, arg)
    setattr(arg, field, done)
    if not dontwake and (ctx.fault_pending or ctx.fault_read):
        ctx.wake_range(start, done)
    if done != PAGE_SIZE:
        _fail(errno.EAGAIN, arg)


def wake_userfault(ctx: Userfaultfd, start: int, length: int) -> None:
    """Wake faults in the range, if any task waits at all (``wake_userfault``).

    As the kernel tests ``waitqueue_active`` on both fault queues before
    taking the lock: a fault queued after this test re-checks its page
    table entry before sleeping (``userfaultfd_must_wait``), and the entry
    the ioctl just installed is already there.
    """
    if ctx.fault_pending or ctx.fault_read:
        ctx.wake_range(start, length)


def _changing(ctx: Userfaultfd, arg: Any, field: str) -> bool:
    if ctx.mmap_changing:
        setattr(arg, field, -errno.EAGAIN)
        _fail(errno.EAGAIN, arg)
    return False


def _mfill(ctx: Userfaultfd, dst: int, src: int, length: int, mode: MfillMode,
           wp: bool) -> Callable[[], int]:
    """The operation: ``mfill_atomic`` (which routes a hugetlb destination itself)."""
    return lambda: mfill_atomic(ctx, dst, src, length, mode, wp)


def _validate(arg: Any, start: int, length: int) -> None:
    try:
        validate_range(start, length)
    except OSError as e:
        _fail(e.errno or errno.EINVAL, arg)


def _sane(start: int, length: int) -> bool:
    """The common case of ``validate_range``: a page-aligned, non-empty user range."""
    return 0 < length and not (length | start) & _PAGE_LOW and 0 <= start < TASK_SIZE \
        and length <= TASK_SIZE - start


def uffdio_copy(ctx: Userfaultfd, arg: uapi.uffdio_copy, _mm: Any = None) -> None:
    """UFFDIO_COPY (``userfaultfd_copy``)."""
    if ctx.mmap_changing:
        _changing(ctx, arg, "copy")
    dst, src, length = arg.dst, arg.src, arg.len
    if not (0 < length and not (length | dst | src) & _PAGE_LOW and 0 <= dst < TASK_SIZE
            and 0 <= src < TASK_SIZE and length <= TASK_SIZE - dst
            and length <= TASK_SIZE - src):  # not the common case: validate in the kernel's order
        try:  # the source may be unaligned, but must be a user range
            validate_unaligned_range(arg.src, arg.len)
        except OSError as e:
            _fail(e.errno or errno.EINVAL, arg)
        _validate(arg, arg.dst, arg.len)
    if arg.mode & ~(uapi.UFFDIO_COPY_MODE_DONTWAKE | uapi.UFFDIO_COPY_MODE_WP):
        _fail(errno.EINVAL, arg)
    wp = bool(arg.mode & uapi.UFFDIO_COPY_MODE_WP)
    if length == PAGE_SIZE:
        _finish_page(ctx, arg, "copy", dst, bool(arg.mode & uapi.UFFDIO_COPY_MODE_DONTWAKE),
                     src, _COPY, wp)
        return
    _finish(ctx, arg, "copy", dst, length, bool(arg.mode & uapi.UFFDIO_COPY_MODE_DONTWAKE),
            _mfill(ctx, dst, src, length, MfillMode.COPY, wp))


def uffdio_zeropage(ctx: Userfaultfd, arg: uapi.uffdio_zeropage, _mm: Any = None) -> None:
    """UFFDIO_ZEROPAGE (``userfaultfd_zeropage``): EINVAL on hugetlb."""
    if ctx.mmap_changing:
        _changing(ctx, arg, "zeropage")
    r = arg.range
    if not _sane(r.start, r.len):
        _validate(arg, r.start, r.len)
    if arg.mode & ~uapi.UFFDIO_ZEROPAGE_MODE_DONTWAKE:
        _fail(errno.EINVAL, arg)
    start = r.start
    if r.len == PAGE_SIZE:
        _finish_page(ctx, arg, "zeropage", start,
                     bool(arg.mode & uapi.UFFDIO_ZEROPAGE_MODE_DONTWAKE), 0, _ZEROPAGE, False)
        return
    _finish(ctx, arg, "zeropage", start, r.len,
            bool(arg.mode & uapi.UFFDIO_ZEROPAGE_MODE_DONTWAKE),
            _mfill(ctx, start, 0, r.len, MfillMode.ZEROPAGE, False))


def uffdio_continue(ctx: Userfaultfd, arg: uapi.uffdio_continue, _mm: Any = None) -> None:
    """UFFDIO_CONTINUE (``userfaultfd_continue``): map what the page cache already holds."""
    if ctx.mmap_changing:
        _changing(ctx, arg, "mapped")
    r = arg.range
    if not _sane(r.start, r.len):
        _validate(arg, r.start, r.len)
    if arg.mode & ~(uapi.UFFDIO_CONTINUE_MODE_DONTWAKE | uapi.UFFDIO_CONTINUE_MODE_WP):
        _fail(errno.EINVAL, arg)
    wp = bool(arg.mode & uapi.UFFDIO_CONTINUE_MODE_WP)
    start = r.start
    if r.len == PAGE_SIZE:
        _finish_page(ctx, arg, "mapped", start,
                     bool(arg.mode & uapi.UFFDIO_CONTINUE_MODE_DONTWAKE), 0, _CONTINUE, wp)
        return
    _finish(ctx, arg, "mapped", start, r.len,
            bool(arg.mode & uapi.UFFDIO_CONTINUE_MODE_DONTWAKE),
            _mfill(ctx, start, 0, r.len, MfillMode.CONTINUE, wp))


def uffdio_poison(ctx: Userfaultfd, arg: uapi.uffdio_poison, _mm: Any = None) -> None:
    """UFFDIO_POISON (``userfaultfd_poison``): later accesses raise SIGBUS."""
    _changing(ctx, arg, "updated")
    r = arg.range
    _validate(arg, r.start, r.len)
    if arg.mode & ~uapi.UFFDIO_POISON_MODE_DONTWAKE:
        _fail(errno.EINVAL, arg)
    _finish(ctx, arg, "updated", r.start, r.len,
            bool(arg.mode & uapi.UFFDIO_POISON_MODE_DONTWAKE),
            _mfill(ctx, r.start, 0, r.len, MfillMode.POISON, False))


def uffdio_move(ctx: Userfaultfd, arg: uapi.uffdio_move, caller_mm: Any) -> None:
    """UFFDIO_MOVE (``userfaultfd_move``): same-mm only."""
    if ctx.mmap_changing:
        _changing(ctx, arg, "move")
    if caller_mm is not ctx.mm:
        _fail(errno.EINVAL, arg)
    dst, src, length, mode = arg.dst, arg.src, arg.len, arg.mode
    if not (0 < length and not (length | dst | src) & _PAGE_LOW and 0 <= dst < TASK_SIZE
            and 0 <= src < TASK_SIZE and length <= TASK_SIZE - dst
            and length <= TASK_SIZE - src):  # not _sane(dst) and _sane(src): in order
        for start in (dst, src):
            _validate(arg, start, length)
    if mode & ~(uapi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES | uapi.UFFDIO_MOVE_MODE_DONTWAKE):
        _fail(errno.EINVAL, arg)
    # _finish, written out: move_pages called directly rather than through a closure
    if ctx.mm.dead:
        _fail(errno.ESRCH, arg)
    try:
        done = move_pages(ctx, dst, src, length, mode)
    except MfillError as e:
        arg.move = -e.errno
        _fail(e.errno, arg)
    arg.move = done
    if not mode & uapi.UFFDIO_MOVE_MODE_DONTWAKE and (ctx.fault_pending or ctx.fault_read):
        ctx.wake_range(dst, done)  # wake_userfault
    if done != length:
        _fail(errno.EAGAIN, arg)


def uffdio_writeprotect(ctx: Userfaultfd, arg: uapi.uffdio_writeprotect, _mm: Any = None) -> None:
    """UFFDIO_WRITEPROTECT (``userfaultfd_writeprotect``)."""
    if ctx.mmap_changing:
        _fail(errno.EAGAIN, arg)
    r = arg.range
    start, length = r.start, r.len
    if not (0 < length and not (length | start) & _PAGE_LOW and 0 <= start < TASK_SIZE
            and length <= TASK_SIZE - start):  # not _sane(start, length)
        _validate(arg, start, length)
    mode = arg.mode
    if mode & ~(uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE | uapi.UFFDIO_WRITEPROTECT_MODE_WP):
        _fail(errno.EINVAL, arg)
    wp = mode & uapi.UFFDIO_WRITEPROTECT_MODE_WP != 0
    dontwake = mode & uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    if wp and dontwake:
        _fail(errno.EINVAL, arg)
    if ctx.mm.dead:
        _fail(errno.ESRCH, arg)
    try:
        mwriteprotect_range(ctx, start, length, wp)
    except OSError as e:
        _fail(e.errno or errno.EINVAL, arg)
    if not wp and not dontwake and (ctx.fault_pending or ctx.fault_read):  # wake_userfault
        ctx.wake_range(start, length)


def dispatch(ctx: Userfaultfd, cmd: int, arg: Any, caller_mm: Any) -> Any:
    """Route an ioctl by its full command number; unknown ones are EINVAL."""
    if cmd == uapi.UFFDIO_API:
        _expect(arg, uapi.uffdio_api)
        try:
            ctx._do_api(arg)
        except OSError as e:
            e.struct = arg  # type: ignore[attr-defined]
            raise
        return arg
    if ctx.state is not _RUNNING:
        _fail(errno.EINVAL, arg)
    handler = _HANDLERS.get(cmd)
    if handler is None:
        _fail(errno.EINVAL, arg)
    assert handler is not None
    cls, run = handler
    if type(arg) is not cls:
        _expect(arg, cls)
    run(ctx, arg, caller_mm)
    return arg


def _expect(arg: Any, cls: type) -> None:
    if not isinstance(arg, cls):
        raise TypeError(f"this ioctl takes a {cls.__name__}, not {type(arg).__name__}")


def _register(ctx: Userfaultfd, arg: uapi.uffdio_register, _mm: Any) -> None:
    try:
        arg.ioctls = register(ctx, arg.range.start, arg.range.len, arg.mode)
    except OSError as e:
        _fail(e.errno or errno.EINVAL, arg)


def _unregister(ctx: Userfaultfd, arg: uapi.uffdio_range, _mm: Any) -> None:
    try:
        unregister(ctx, arg.start, arg.len)
    except OSError as e:
        _fail(e.errno or errno.EINVAL, arg)


def _wake(ctx: Userfaultfd, arg: uapi.uffdio_range, _mm: Any) -> None:
    _validate(arg, arg.start, arg.len)
    ctx.wake_range(arg.start, arg.len)


_HANDLERS: dict[int, tuple[type, Any]] = {
    uapi.UFFDIO_REGISTER: (uapi.uffdio_register, _register),
    uapi.UFFDIO_UNREGISTER: (uapi.uffdio_range, _unregister),
    uapi.UFFDIO_WAKE: (uapi.uffdio_range, _wake),
    uapi.UFFDIO_COPY: (uapi.uffdio_copy, uffdio_copy),
    uapi.UFFDIO_ZEROPAGE: (uapi.uffdio_zeropage, uffdio_zeropage),
    uapi.UFFDIO_MOVE: (uapi.uffdio_move, uffdio_move),
    uapi.UFFDIO_WRITEPROTECT: (uapi.uffdio_writeprotect, uffdio_writeprotect),
    uapi.UFFDIO_CONTINUE: (uapi.uffdio_continue, uffdio_continue),
    uapi.UFFDIO_POISON: (uapi.uffdio_poison, uffdio_poison),
}

