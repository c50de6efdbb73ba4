"""Timers under load: an expired sleep or timed wait runs even while every CPU is busy.

Regression for a livelock found by tests/uffd/test_uffd_stress.py: SimRuntime
put a sleeping task back on a CPU only when a CPU was idle, and `cond_resched`
did not count an expired sleeper as a task waiting for the CPU, so two tasks
that only charged time and called `cond_resched` on two CPUs (or one on one
CPU) kept them for ever.  In the kernel the hrtimer wakes the sleeper at its
deadline and the tick preempts the running task when its slice is used up.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from programs import spinners_and_sleeper

from vmemu.sched import CostModel, SimRuntime

COST = CostModel()
SPIN_NS = 20 * COST.syscall  # what one spin charges (programs.spinners_and_sleeper)
SHAPES = [(1, 1), (1, 2), (2, 2), (2, 3), (3, 3)]  # (ncpus, spinners)


def latency_bound(ncpus: int, n_spinners: int) -> int:
    """The latest a timer may be honoured: every CPU's current slice ends, then the
    spinners that were already queued when the timer expired run a slice each."""
    slices = 1 + max(0, n_spinners - ncpus)
    return slices * (COST.timeslice + COST.context_switch) + SPIN_NS


@pytest.mark.parametrize("timed_wait", [False, True], ids=["sleep", "wait-timeout"])
@pytest.mark.parametrize(("ncpus", "n_spinners"), SHAPES)
def test_expired_timer_runs_while_spinners_hold_every_cpu(
    ncpus: int, n_spinners: int, timed_wait: bool
) -> None:
    @settings(max_examples=max(3, settings().max_examples // 20), deadline=None, database=None)
    @given(seed=st.integers(0, 2**32 - 1))
    def check(seed: int) -> None:
        late, spins = spinners_and_sleeper(
            SimRuntime(seed=seed, ncpus=ncpus), n_spinners, timed_wait=timed_wait
        )
        assert 0 <= late <= latency_bound(ncpus, n_spinners), (seed, late)
        assert spins > 0

    check()


def test_one_spinner_gives_way_at_its_first_resched_after_the_deadline() -> None:
    # one CPU, one spinner whose slice is long used up: the timer is honoured at the
    # next cond_resched, after one context switch, for every seed
    for seed in range(8):
        late, _ = spinners_and_sleeper(SimRuntime(seed=seed, ncpus=1), 1)
        assert late <= COST.context_switch + SPIN_NS


def test_preempted_spinner_queues_behind_the_expired_sleeper() -> None:
    # a slice longer than the sleep: when the spinner's slice ends the sleeper's timer
    # has long expired, so the sleeper takes the CPU at that instant, not the spinner
    # just preempted (which was not waiting yet); on several CPUs the (2, 3) shape
    # above needs the same rule
    cost = attrs.evolve(COST, timeslice=3_000_000)
    for seed in range(10):
        late, _ = spinners_and_sleeper(SimRuntime(seed=seed, ncpus=1, cost=cost), 1)
        assert late <= cost.timeslice + cost.context_switch + SPIN_NS, (seed, late)


def timeline(seed: int) -> str:
    rt = SimRuntime(seed=seed, ncpus=2)
    spinners_and_sleeper(rt, 3, sleep_s=0.0005)
    return rt.tracer.format_timeline()


def test_same_seed_same_trace_with_timers_under_load() -> None:
    first = timeline(99)
    assert timeline(99) == first
    assert "sleep" in first and "switch" in first
