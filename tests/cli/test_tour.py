"""The tour and ``vmemu trace`` are executable documentation: their output is pinned."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from vmemu.cli import main
from vmemu.tour import run_tour, userfault_demo

EXPECTED = pathlib.Path(__file__).with_name("tour_expected.txt")


def test_tour_output_is_as_documented() -> None:
    out: list[str] = []
    run_tour(out.append)
    assert "\n".join(out) + "\n" == EXPECTED.read_text()


def test_trace_is_deterministic_per_seed() -> None:
    a = userfault_demo(seed=1)
    b = userfault_demo(seed=1)
    assert a == b
    assert "UFFDIO_COPY" in a[1] and "userfault" in a[1]
    assert a[0][-1] == "worker read b'fetched from far memory'"


def test_cli_trace(capsys: object) -> None:
    assert main(["trace", "--seed", "2"]) == 0
    text = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "uffd.fault_wqh" in text


def test_python_dash_m_runs_the_tour() -> None:
    r = subprocess.run([sys.executable, "-m", "vmemu", "tour"], capture_output=True, text=True,
                       timeout=60, check=True)
    assert r.stdout == EXPECTED.read_text()
