"""The parkers of the threads runtime: a binary permit, never lost, with or without spinning."""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

import pytest

from vmemu.sched import ThreadRuntime, park
from vmemu.sched.park import PipeParker, SpinParker, make_parker, spin_unavailable_reason

SPIN_NS = 200_000


def _spin() -> SpinParker:
    why = spin_unavailable_reason()
    if why is not None:
        pytest.skip(f"the C park helper is unavailable: {why}")
    return SpinParker(SPIN_NS)


KINDS: dict[str, Callable[[], PipeParker | SpinParker]] = {"pipe": PipeParker, "spin": _spin}


@pytest.fixture(params=sorted(KINDS))
def new_parker(request: pytest.FixtureRequest) -> Callable[[], PipeParker | SpinParker]:
    made: list[PipeParker | SpinParker] = []

    def make() -> PipeParker | SpinParker:
        made.append(KINDS[request.param]())
        return made[-1]
    yield make
    for p in made:
        p.release()


def test_a_pending_unpark_is_taken_at_once(new_parker: Callable[[], PipeParker | SpinParker]) -> None:
    p = new_parker()
    p.unpark()
    p.unpark()  # binary: merges with the pending one
    assert p.park(5.0) is True
    assert p.park(0.02) is False  # nothing left


def test_clear_forgets_a_pending_unpark(new_parker: Callable[[], PipeParker | SpinParker]) -> None:
    p = new_parker()
    p.unpark()
    p.clear()
    t0 = time.monotonic()
    assert p.park(0.05) is False
    assert time.monotonic() - t0 >= 0.045


def test_another_thread_wakes_a_parked_one(new_parker: Callable[[], PipeParker | SpinParker]) -> None:
    p = new_parker()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(p.park()))
    t.start()
    time.sleep(0.05)  # parked and asleep by now (spinning ends after SPIN_NS)
    assert not got
    p.unpark()
    t.join(5)
    assert got == [True]


def test_released_parker_ignores_unparks(new_parker: Callable[[], PipeParker | SpinParker]) -> None:
    """A waker that still holds a finished task's parker writes nothing into the pipe,
    which is back in the pool for the next task."""
    p = new_parker()
    rfd = p.rfd
    p.release()
    assert any(r == rfd for r, _ in park._PIPE_POOL)
    p.unpark()
    poller = select.poll()
    poller.register(rfd, select.POLLIN)
    assert poller.poll(0) == []


def _ping_pong(a: PipeParker | SpinParker, b: PipeParker | SpinParker, n: int,
               cpus: tuple[int, int] | None) -> list[int]:
    """n round trips; each side checks the other's counter, so a lost or doubled
    unpark shows as a wrong count or a hang (bounded by park timeouts)."""
    count = [0, 0]

    def side(me: int, mine: PipeParker | SpinParker, other: PipeParker | SpinParker) -> None:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[me]})  # this thread only
        for i in range(n):
            if me == 0:
                count[0] += 1
                other.unpark()
            while count[1 - me] < i + 1:
                assert mine.park(10.0), f"side {me} lost a wake-up at round {i}"
            if me == 1:
                count[1] += 1
                other.unpark()

    t = threading.Thread(target=side, args=(1, b, a))
    t.start()
    side(0, a, b)
    t.join(30)
    assert not t.is_alive()
    return count


@pytest.mark.parametrize("placement", ["same-cpu", "split", "unpinned"])
def test_ping_pong_loses_no_wake_up(new_parker: Callable[[], PipeParker | SpinParker],
                                    placement: str) -> None:
    cpus = sorted(os.sched_getaffinity(0)) if sys.platform.startswith("linux") else []
    if placement != "unpinned" and not cpus:
        pytest.skip("thread affinity needs Linux")
    if placement == "split" and len(cpus) < 2:
        pytest.skip("fewer than two CPUs")
    pin = None if placement == "unpinned" else (cpus[0], cpus[0] if placement == "same-cpu" else cpus[-1])
    old = os.sched_getaffinity(0) if cpus else None
    try:
        assert _ping_pong(new_parker(), new_parker(), 3000, pin) == [3000, 3000]
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)


def test_spinning_only_across_cpus() -> None:
    """Across two CPUs the wake-ups are taken spinning; on one CPU never (it would
    keep the waker from running)."""
    cpus = sorted(os.sched_getaffinity(0)) if sys.platform.startswith("linux") else []
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    a, b, a2, b2 = _spin(), _spin(), _spin(), _spin()
    old = os.sched_getaffinity(0)
    try:
        # "the task woken last" is one guess for the whole process: a park that comes
        # before this pair's first wake-up may go by an earlier test's hand-off to the
        # other CPU and spin once; so a first round, then the count
        _ping_pong(a, b, 50, (cpus[0], cpus[0]))
        spun = a.spun + b.spun
        _ping_pong(a, b, 2000, (cpus[0], cpus[0]))
        assert a.spun + b.spun == spun
        assert a.slept + b.slept > 0
        _ping_pong(a2, b2, 2000, (cpus[0], cpus[-1]))
        assert a2.spun + b2.spun > a2.slept + b2.slept
    finally:
        os.sched_setaffinity(0, old)
        for p in (a, b, a2, b2):
            p.release()


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_a_signal_runs_its_handler_while_parked(new_parker: Callable[[], PipeParker | SpinParker]) -> None:
    """SIGALRM arrives while the main thread is parked: its Python handler runs (here it
    unparks), and the park then returns."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled on the main thread")
    p = new_parker()
    ran: list[bool] = []

    def handler(signum: int, frame: object) -> None:
        ran.append(True)
        p.unpark()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert p.park() is True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert ran == [True]


def test_runtime_spin_setting_picks_the_parker() -> None:
    assert isinstance(ThreadRuntime(spin_ns=0).current().parker, PipeParker)  # type: ignore[attr-defined]
    expected = PipeParker if spin_unavailable_reason() else SpinParker
    assert isinstance(ThreadRuntime().current().parker, expected)  # type: ignore[attr-defined]
    assert isinstance(make_parker(0), PipeParker)


def test_the_c_parker_reports_a_broken_pipe_and_bad_arguments() -> None:
    """A park whose pipe cannot be read raises the read's errno (nothing to wait for);
    a timed park on it times out (poll skips a negative fd); a second argument is refused."""
    _spin()  # skips without the C helper
    helper = park._load()
    p = helper.Parker(-1, -1, 0)
    with pytest.raises(OSError) as e:
        p.park()
    assert e.value.errno == errno.EBADF
    assert p.park(0.01) is False
    with pytest.raises(TypeError, match="at most one argument"):
        p.park(1.0, 2.0)
    with pytest.raises(TypeError):
        p.park("soon")
