"""Examples are executable documentation: each runs and prints what its ``.expected`` file says."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
CASES = sorted(p for p in EXAMPLES.glob("*.py") if p.with_suffix(".expected").exists())


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_example_output(path: pathlib.Path) -> None:
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120,
                       check=True)
    assert r.stdout == path.with_suffix(".expected").read_text()


def test_every_example_has_expected_output() -> None:
    missing = [p.name for p in EXAMPLES.glob("*.py") if not p.with_suffix(".expected").exists()]
    assert not missing, f"examples without .expected output: {missing}"
