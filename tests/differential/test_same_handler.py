"""One handler, two kernels: the postcopy example on the emulator and on Linux.

The same function drives ``vmemu.Process`` and ``vmemu.native.NativeProcess``;
the faults it sees (page, flags) and what the guest reads must be identical.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from _kernel import native_process_or_skip

import vmemu

pytestmark = pytest.mark.differential

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "postcopy.py"


def _load() -> object:
    spec = importlib.util.spec_from_file_location("postcopy_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2]])
def test_postcopy_same_on_both(order: list[int]) -> None:
    mod = _load()
    native = mod.postcopy(native_process_or_skip(), 4, order)  # type: ignore[attr-defined]
    emulated = mod.postcopy(vmemu.Process(), 4, order)  # type: ignore[attr-defined]
    assert emulated == native
    assert [p for p, _ in emulated["faults"]] == order
