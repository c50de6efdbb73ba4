"""Conformance suite setup: make the runner modules and vmemu importable."""

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
