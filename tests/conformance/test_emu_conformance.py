"""Replay every conformance scenario on vmemu and compare with the kernel's golden results.

The golden files were recorded on Linux 6.18 x86-64 (data/README.md; data/local/
holds the project's own recordings of the same kind); vmemu
must produce the same result document, field for field. A mismatch is a
fidelity bug in vmemu. The failure message lists every differing step with
the kernel's and vmemu's result side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from emu_driver import EmuDriver
from runner import load_json, run_scenario

DATA = Path(__file__).resolve().parent / "data"
#: the shared kernel-recorded sample, then the project's own recordings (data/local/,
#: recorded on this machine's Linux 6.18 with NativeDriver, three identical runs each)
SCENARIOS = sorted((DATA / "scenarios").glob("*.json")) + sorted(
    (DATA / "local" / "scenarios").glob("*.json"))


def _dump(x: Any) -> str:
    return json.dumps(x, sort_keys=True)


def describe_diff(got: dict[str, Any], want: dict[str, Any]) -> str:
    """A readable step-by-step diff of two result documents (empty when equal)."""
    lines: list[str] = []
    g_steps, w_steps = got.get("steps", []), want.get("steps", [])
    for k in range(max(len(g_steps), len(w_steps))):
        g = g_steps[k] if k < len(g_steps) else None
        w = w_steps[k] if k < len(w_steps) else None
        if g == w:
            continue
        label = (w or g or {}).get("op", "?")
        lines.append(f"step {k} ({label}):")
        lines.append(f"  kernel: {_dump(w)}")
        lines.append(f"  vmemu:  {_dump(g)}")
    for key in sorted(set(got) | set(want) - {"steps"}):
        if key != "steps" and got.get(key) != want.get(key):
            lines.append(f"{key}: kernel {_dump(want.get(key))} vmemu {_dump(got.get(key))}")
    return "\n".join(lines)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_emu_scenario(path: Path) -> None:
    scenario = load_json(path)
    golden = load_json(path.parent.parent / "golden" / path.name)
    driver = EmuDriver()
    reason = driver.skip_reason(scenario.get("requires", []))
    if reason:
        driver.close()
        pytest.skip(reason)
    result = run_scenario(driver, scenario)
    diff = describe_diff(result, golden)
    assert not diff, f"{scenario['name']}: vmemu differs from Linux 6.18\n{diff}"
    assert result == golden
