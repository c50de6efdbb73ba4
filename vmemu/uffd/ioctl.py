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
from typing import TYPE_CHECKING, Any, NoReturn

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


def _fail(err: int, arg: Any) -> NoReturn:
    e = errno_error(err)
    e.struct = arg  # type: ignore[attr-defined]
    raise e


class IoctlFailure(Exception):
    """A range ioctl failed: its errno, and the output field's value if the kernel wrote one.

    The operations below take plain integers, so that the Pythonic methods
    (``uffd.copy(dst, src, len)``) need no uABI struct unless they fail;
    :func:`struct_error` turns this into the ``OSError`` both call styles
    raise, with the struct as the kernel left it in ``e.struct``.
    """

    def __init__(self, err: int, out: int | None = None) -> None:
        super().__init__(err, out)
        self.errno = err
        self.out = out  # copy / zeropage / mapped / updated / move; None: left untouched


def struct_error(f: IoctlFailure, arg: Any, field: str | None) -> OSError:
    """The ``OSError`` for ``f``: the output field written into ``arg`` if the kernel wrote
    it, and ``arg`` as ``e.struct``."""
    if field is not None and f.out is not None:
        setattr(arg, field, f.out)
    e = errno_error(f.errno)
    e.struct = arg  # type: ignore[attr-defined]
    return e


def fail_with(f: IoctlFailure, arg: Any, field: str | None) -> NoReturn:
    """Raise :func:`struct_error`."""
    raise struct_error(f, arg, field) from None


def _finish(ctx: Userfaultfd, start: int, length: int, dontwake: int, run: Any) -> int:
    """Run an mfill-style operation and apply the output-field and wake rules: ESRCH on a
    dead mm, ``-errno`` or the bytes done in the field, the wake of the done range unless
    ``dontwake``, EAGAIN if short. Returns the bytes done."""
    if ctx.mm.dead:
        raise IoctlFailure(errno.ESRCH)
    try:
        done: int = run()
    except MfillError as e:
        raise IoctlFailure(e.errno, -e.errno) from None
    if not dontwake:
        wake_userfault(ctx, start, done)
    if done != length:
        raise IoctlFailure(errno.EAGAIN, done)
    return done


def _finish_page(ctx: Userfaultfd, start: int, dontwake: int, src: int, mode: MfillMode,
                 wp: bool) -> int:
    """``_finish`` of ``mfill_atomic_page`` (one 4 KiB page): the same rules, without the
    closure, and the wake of ``wake_userfault`` inlined."""
    if ctx.mm.dead:
        raise IoctlFailure(errno.ESRCH)
    try:
        done = mfill_atomic_page(ctx, start, src, mode, wp)
    except MfillError as e:
        raise IoctlFailure(e.errno, -e.errno) from None
    if not dontwake and (ctx.fault_pending or ctx.fault_read):
        ctx.wake_range(start, done)
    if done != PAGE_SIZE:
        raise IoctlFailure(errno.EAGAIN, done)
    return done


def wake_userfault(ctx: Userfaultfd, start: int, length: int) -> None:
    """Wake faults in the range, if any task waits at all (``wake_userfault``).

    As the kernel tests ``waitqueue_active`` on both fault queues before
    taking the lock: a fault queued after this test re-checks its page
    table entry before sleeping (``userfaultfd_must_wait``), and the entry
    the ioctl just installed is already there.
    """
    if ctx.fault_pending or ctx.fault_read:
        ctx.wake_range(start, length)


def _mfill(ctx: Userfaultfd, dst: int, src: int, length: int, mode: MfillMode,
           wp: bool) -> Callable[[], int]:
    """The operation: ``mfill_atomic`` (which routes a hugetlb destination itself)."""
    return lambda: mfill_atomic(ctx, dst, src, length, mode, wp)


def _validate(start: int, length: int) -> None:
    try:
        validate_range(start, length)
    except OSError as e:
        raise IoctlFailure(e.errno or errno.EINVAL) from None


def _sane(start: int, length: int) -> bool:
    """The common case of ``validate_range``: a page-aligned, non-empty user range."""
    return 0 < length and not (length | start) & _PAGE_LOW and 0 <= start < TASK_SIZE \
        and length <= TASK_SIZE - start


def copy(ctx: Userfaultfd, dst: int, src: int, length: int, mode: int) -> int:
    """UFFDIO_COPY (``userfaultfd_copy``); returns the bytes copied."""
    if ctx.mmap_changing:
        raise IoctlFailure(errno.EAGAIN, -errno.EAGAIN)
    if not (0 < length and not (length | dst | src) & _PAGE_LOW and 0 <= dst < TASK_SIZE
            and 0 <= src < TASK_SIZE and length <= TASK_SIZE - dst
            and length <= TASK_SIZE - src):  # not the common case: validate in the kernel's order
        try:  # the source may be unaligned, but must be a user range
            validate_unaligned_range(src, length)
        except OSError as e:
            raise IoctlFailure(e.errno or errno.EINVAL) from None
        _validate(dst, length)
    if mode & ~(uapi.UFFDIO_COPY_MODE_DONTWAKE | uapi.UFFDIO_COPY_MODE_WP):
        raise IoctlFailure(errno.EINVAL)
    wp = bool(mode & uapi.UFFDIO_COPY_MODE_WP)
    dontwake = mode & uapi.UFFDIO_COPY_MODE_DONTWAKE
    if length == PAGE_SIZE:
        return _finish_page(ctx, dst, dontwake, src, _COPY, wp)
    return _finish(ctx, dst, length, dontwake, _mfill(ctx, dst, src, length, _COPY, wp))


def zeropage(ctx: Userfaultfd, start: int, length: int, mode: int) -> int:
    """UFFDIO_ZEROPAGE (``userfaultfd_zeropage``): EINVAL on hugetlb; returns bytes zeroed."""
    if ctx.mmap_changing:
        raise IoctlFailure(errno.EAGAIN, -errno.EAGAIN)
    if not _sane(start, length):
        _validate(start, length)
    if mode & ~uapi.UFFDIO_ZEROPAGE_MODE_DONTWAKE:
        raise IoctlFailure(errno.EINVAL)
    dontwake = mode & uapi.UFFDIO_ZEROPAGE_MODE_DONTWAKE
    if length == PAGE_SIZE:
        return _finish_page(ctx, start, dontwake, 0, _ZEROPAGE, False)
    return _finish(ctx, start, length, dontwake, _mfill(ctx, start, 0, length, _ZEROPAGE, False))


def continue_(ctx: Userfaultfd, start: int, length: int, mode: int) -> int:
    """UFFDIO_CONTINUE (``userfaultfd_continue``): map what the page cache already holds."""
    if ctx.mmap_changing:
        raise IoctlFailure(errno.EAGAIN, -errno.EAGAIN)
    if not _sane(start, length):
        _validate(start, length)
    if mode & ~(uapi.UFFDIO_CONTINUE_MODE_DONTWAKE | uapi.UFFDIO_CONTINUE_MODE_WP):
        raise IoctlFailure(errno.EINVAL)
    wp = bool(mode & uapi.UFFDIO_CONTINUE_MODE_WP)
    dontwake = mode & uapi.UFFDIO_CONTINUE_MODE_DONTWAKE
    if length == PAGE_SIZE:
        return _finish_page(ctx, start, dontwake, 0, _CONTINUE, wp)
    return _finish(ctx, start, length, dontwake, _mfill(ctx, start, 0, length, _CONTINUE, wp))


def poison(ctx: Userfaultfd, start: int, length: int, mode: int) -> int:
    """UFFDIO_POISON (``userfaultfd_poison``): later accesses raise SIGBUS."""
    if ctx.mmap_changing:
        raise IoctlFailure(errno.EAGAIN, -errno.EAGAIN)
    _validate(start, length)
    if mode & ~uapi.UFFDIO_POISON_MODE_DONTWAKE:
        raise IoctlFailure(errno.EINVAL)
    return _finish(ctx, start, length, mode & uapi.UFFDIO_POISON_MODE_DONTWAKE,
                   _mfill(ctx, start, 0, length, MfillMode.POISON, False))


def move(ctx: Userfaultfd, dst: int, src: int, length: int, mode: int, caller_mm: Any) -> int:
    """UFFDIO_MOVE (``userfaultfd_move``): same-mm only; returns the bytes moved."""
    if ctx.mmap_changing:
        raise IoctlFailure(errno.EAGAIN, -errno.EAGAIN)
    if caller_mm is not ctx.mm:
        raise IoctlFailure(errno.EINVAL)
    if not (0 < length and not (length | dst | src) & _PAGE_LOW and 0 <= dst < TASK_SIZE
            and 0 <= src < TASK_SIZE and length <= TASK_SIZE - dst
            and length <= TASK_SIZE - src):  # not _sane(dst) and _sane(src): in order
        for start in (dst, src):
            _validate(start, length)
    if mode & ~(uapi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES | uapi.UFFDIO_MOVE_MODE_DONTWAKE):
        raise IoctlFailure(errno.EINVAL)
    # _finish, written out: move_pages called directly rather than through a closure
    if ctx.mm.dead:
        raise IoctlFailure(errno.ESRCH)
    try:
        done = move_pages(ctx, dst, src, length, mode)
    except MfillError as e:
        raise IoctlFailure(e.errno, -e.errno) from None
    if not mode & uapi.UFFDIO_MOVE_MODE_DONTWAKE and (ctx.fault_pending or ctx.fault_read):
        ctx.wake_range(dst, done)  # wake_userfault
    if done != length:
        raise IoctlFailure(errno.EAGAIN, done)
    return done


def writeprotect(ctx: Userfaultfd, start: int, length: int, mode: int) -> None:
    """UFFDIO_WRITEPROTECT (``userfaultfd_writeprotect``): no output field."""
    if ctx.mmap_changing:
        raise IoctlFailure(errno.EAGAIN)
    if not (0 < length and not (length | start) & _PAGE_LOW and 0 <= start < TASK_SIZE
            and length <= TASK_SIZE - start):  # not _sane(start, length)
        _validate(start, length)
    if mode & ~(uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE | uapi.UFFDIO_WRITEPROTECT_MODE_WP):
        raise IoctlFailure(errno.EINVAL)
    wp = mode & uapi.UFFDIO_WRITEPROTECT_MODE_WP != 0
    dontwake = mode & uapi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    if wp and dontwake:
        raise IoctlFailure(errno.EINVAL)
    if ctx.mm.dead:
        raise IoctlFailure(errno.ESRCH)
    try:
        mwriteprotect_range(ctx, start, length, wp)
    except OSError as e:
        raise IoctlFailure(e.errno or errno.EINVAL) from None
    if not wp and not dontwake and (ctx.fault_pending or ctx.fault_read):  # wake_userfault
        ctx.wake_range(start, length)


# -- the uABI structs' side: field in, field out ------------------------------------

def uffdio_copy(ctx: Userfaultfd, arg: uapi.uffdio_copy, _mm: Any = None) -> None:
    """UFFDIO_COPY on its struct: ``copy`` gets the bytes copied or ``-errno``."""
    try:
        arg.copy = copy(ctx, arg.dst, arg.src, arg.len, arg.mode)
    except IoctlFailure as f:
        fail_with(f, arg, "copy")


def uffdio_zeropage(ctx: Userfaultfd, arg: uapi.uffdio_zeropage, _mm: Any = None) -> None:
    """UFFDIO_ZEROPAGE on its struct: ``zeropage`` gets the bytes zeroed or ``-errno``."""
    try:
        arg.zeropage = zeropage(ctx, arg.range.start, arg.range.len, arg.mode)
    except IoctlFailure as f:
        fail_with(f, arg, "zeropage")


def uffdio_continue(ctx: Userfaultfd, arg: uapi.uffdio_continue, _mm: Any = None) -> None:
    """UFFDIO_CONTINUE on its struct: ``mapped`` gets the bytes mapped or ``-errno``."""
    try:
        arg.mapped = continue_(ctx, arg.range.start, arg.range.len, arg.mode)
    except IoctlFailure as f:
        fail_with(f, arg, "mapped")


def uffdio_poison(ctx: Userfaultfd, arg: uapi.uffdio_poison, _mm: Any = None) -> None:
    """UFFDIO_POISON on its struct: ``updated`` gets the bytes poisoned or ``-errno``."""
    try:
        arg.updated = poison(ctx, arg.range.start, arg.range.len, arg.mode)
    except IoctlFailure as f:
        fail_with(f, arg, "updated")


def uffdio_move(ctx: Userfaultfd, arg: uapi.uffdio_move, caller_mm: Any) -> None:
    """UFFDIO_MOVE on its struct: ``move`` gets the bytes moved or ``-errno``."""
    try:
        arg.move = move(ctx, arg.dst, arg.src, arg.len, arg.mode, caller_mm)
    except IoctlFailure as f:
        fail_with(f, arg, "move")


def uffdio_writeprotect(ctx: Userfaultfd, arg: uapi.uffdio_writeprotect, _mm: Any = None) -> None:
    """UFFDIO_WRITEPROTECT on its struct (which has no output field)."""
    try:
        writeprotect(ctx, arg.range.start, arg.range.len, arg.mode)
    except IoctlFailure as f:
        fail_with(f, arg, None)


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
    try:
        _validate(arg.start, arg.len)
    except IoctlFailure as f:
        fail_with(f, arg, None)
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

