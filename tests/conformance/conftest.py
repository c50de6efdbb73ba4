"""Fixtures of the conformance suite: scenario discovery and the native driver."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The runner's modules (driver, runner, native_driver) live next to the tests;
# the vmemu package at the repository root may not be installed.
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

DATA = HERE / "data"
SCENARIOS = sorted((DATA / "scenarios").glob("*.json"))
