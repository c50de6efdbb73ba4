"""Hypothesis profiles for the whole test suite.

Pick one with the environment variable ``VMEMU_HYPOTHESIS_PROFILE``:

``default``
    Fast enough for every local run: the property tests of the suite
    together take well under a minute on two cores. Random seeds, so
    repeated runs explore different cases; failures are saved in the
    local example database and replayed first next time.
``ci``
    The same budget as ``default`` but derandomized (the same examples on
    every run, so a CI failure reproduces locally with
    ``VMEMU_HYPOTHESIS_PROFILE=ci``), no example database, and the
    ``@reproduce_failure`` blob printed on failure.
``campaign``
    A long bug hunt: many examples and long stateful runs. Run it on its
    own, e.g. ``VMEMU_HYPOTHESIS_PROFILE=campaign python -m pytest
    tests/property``; expect about half an hour on two cores.

Property tests take their example counts from the active profile (a test
that needs fewer scales ``settings().max_examples`` down) so a profile
change scales the whole suite.

Besides the profiles, only the session-wide guard of :mod:`_mapguard` lives
here (tests in four directories drive the real kernel's memory calls); other
fixtures belong to the directory that uses them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from _mapguard import install
from hypothesis import HealthCheck, settings

_GUARD = install()


@pytest.fixture(autouse=True)
def _no_trespass() -> Iterator[None]:
    """Fail a test whose real-memory calls the guard refused, even on another thread."""
    before = len(_GUARD.refused) if _GUARD else 0
    yield
    if _GUARD and len(_GUARD.refused) > before:
        pytest.fail("\n\n".join(_GUARD.refused[before:]), pytrace=False)

settings.register_profile(
    "default",
    max_examples=100,  # Hypothesis' own defaults, without the deadline that
    stateful_step_count=50,  # flakes on a loaded two-core machine
    deadline=None,
)
settings.register_profile(
    "ci",
    settings.get_profile("default"),
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "campaign",
    max_examples=2000,
    stateful_step_count=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.load_profile(os.environ.get("VMEMU_HYPOTHESIS_PROFILE", "default"))
