"""Tracing, the clocks, the cost model's sources, and the package's public surface."""

from __future__ import annotations

import ast
import pathlib
import re

import attrs
import pytest

import vmemu.sched as sched
from vmemu.sched import (
    COST_NAMES,
    CostModel,
    MonotonicClock,
    SimRuntime,
    TraceEvent,
    Tracer,
    VirtualClock,
    WaitQueue,
)

SCHED_DIR = pathlib.Path(sched.__file__).parent


def test_events_carry_time_cpu_and_task_and_print_as_a_timeline() -> None:
    rt = SimRuntime(seed=0, ncpus=2)
    wq = WaitQueue(rt, "fault_wqh")
    ready = {"x": False}

    def faulter() -> None:
        rt.tracer.emit("fault", addr=0x7F0000001000, flags="WRITE")
        wq.wait_event(lambda: ready["x"], key=0x7F0000001000, reason="fault")

    def main() -> None:
        h = rt.spawn(faulter, name="faulter")
        rt.sleep(0.000_01)
        rt.tracer.emit("ioctl", cmd="UFFDIO_COPY", dst_addr=0x7F0000001000)
        ready["x"] = True
        wq.wake_up(key=range(0x7F0000001000, 0x7F0000002000))
        h.join()

    rt.run(main)
    (fault,) = rt.tracer.events("fault")
    assert (fault.tid, fault.task, fault["addr"], fault.get("missing", 1)) == (
        2, "faulter", 0x7F0000001000, 1,
    )
    assert fault.cpu in (0, 1) and fault.time_ns > 0
    kinds = [e.kind for e in rt.tracer.events()]
    for k in ("spawn", "switch", "block", "wake", "sleep", "fault", "ioctl", "exit"):
        assert k in kinds
    times = [e.time_ns for e in rt.tracer.events(["fault", "ioctl", "wake"])]
    assert times == sorted(times)
    text = rt.tracer.format_timeline()
    assert "addr=0x7f0000001000" in text and "cmd='UFFDIO_COPY'" in text
    line = next(x for x in text.splitlines() if " fault " in x)
    assert re.match(r"\s+\d+\.\d{3}us cpu\d\s+2 faulter\s+fault\s+addr=0x7f0000001000", line)


def test_tracer_hooks_filters_and_disable() -> None:
    seen: list[TraceEvent] = []
    tracer = Tracer()
    tracer.add_hook(seen.append)
    tracer.emit("a", x=1)
    tracer.emit("b")
    assert [e.kind for e in tracer.events()] == ["a", "b"] and len(seen) == 2
    assert tracer.events("a")[0].as_dict() == {"x": 1}
    tracer.remove_hook(seen.append)
    tracer.enabled = False
    tracer.emit("c")
    assert len(tracer) == 2 and len(seen) == 2
    tracer.clear()
    assert tracer.events() == []


def test_virtual_clock_only_moves_forward() -> None:
    c = VirtualClock()
    assert c.advance(10) == 10 and c.advance_to(5) == 10 and c.advance_to(20) == 20
    assert c.now() == 20e-9
    with pytest.raises(ValueError):
        c.advance(-1)
    m = MonotonicClock()
    assert isinstance(m, VirtualClock)
    a = m.now_ns()
    assert m.now_ns() >= a >= 0


def test_cost_model_is_overridable_and_named() -> None:
    cost = CostModel()
    assert cost.of("copy_byte", 4096) == round(cost.copy_byte * 4096)
    cheap = attrs.evolve(cost, fault=1)
    assert cheap.of("fault", 3) == 3
    with pytest.raises(ValueError):
        cost.of("nope")
    with pytest.raises(ValueError):
        cost.of("fault", -1)
    assert set(COST_NAMES) <= {f.name for f in attrs.fields(CostModel)}


def test_every_default_cost_cites_its_source() -> None:
    """Each CostModel field is preceded by a comment block that contains "Source"."""
    lines = (SCHED_DIR / "clock.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("class CostModel"))
    fields = [f.name for f in attrs.fields(CostModel)]
    for name in fields:
        idx = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(f"{name}:"))
        j = idx - 1
        block = []
        while lines[j].strip().startswith("#"):
            block.append(lines[j])
            j -= 1
        assert any("Source" in b for b in block), f"CostModel.{name} has no cited source"


def test_public_names_are_exported_once() -> None:
    assert len(sched.__all__) == len(set(sched.__all__))
    for name in sched.__all__:
        assert getattr(sched, name) is not None


def test_package_depends_only_on_stdlib_attrs_and_itself() -> None:
    # vmemu.cbuild builds the optional C parking helper and imports nothing of vmemu itself
    allowed_prefixes = ("vmemu.sched", "vmemu.cbuild", "attrs", "sortedcontainers", "__future__")
    for path in [*SCHED_DIR.glob("*.py"), SCHED_DIR.parent / "cbuild.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
            elif isinstance(node, ast.Import):
                mod = node.names[0].name
            else:
                continue
            if mod.startswith("vmemu"):
                assert mod.startswith(allowed_prefixes), f"{path.name} imports {mod}"


def test_wall_clock_is_read_only_by_monotonic_clock() -> None:
    for path in SCHED_DIR.glob("*.py"):
        text = path.read_text()
        reads = re.findall(r"time\.(?:time|monotonic|perf_counter)(?:_ns)?\(", text)
        if path.name == "clock.py":
            assert set(reads) == {"time.monotonic_ns("}  # inside MonotonicClock only
        else:
            assert reads == [], path.name
