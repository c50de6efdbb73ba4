"""Replay every conformance scenario on the real kernel and compare with golden.

The golden files were recorded on Linux 6.18 x86-64, so on such a machine a
mismatch is a runner bug. Elsewhere the scenarios skip with a reason
(no userfaultfd permission, no C compiler, empty hugetlb pool).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from native_driver import NativeDriver
from runner import load_json, run_scenario

pytestmark = pytest.mark.differential

DATA = Path(__file__).resolve().parent / "data"
SCENARIOS = sorted((DATA / "scenarios").glob("*.json"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_native_scenario(path: Path) -> None:
    scenario = load_json(path)
    golden = load_json(DATA / "golden" / path.name)
    driver = NativeDriver()
    reason = driver.skip_reason(scenario.get("requires", []))
    if reason:
        driver.close()
        pytest.skip(reason)
    result = run_scenario(driver, scenario)
    assert result.get("cleanup") is None, f"stuck workers: {result['cleanup']}"
    for got, want in zip(result["steps"], golden["steps"], strict=True):
        assert got == want, f"step {want['i']} ({want['op']})"
    assert result == golden
