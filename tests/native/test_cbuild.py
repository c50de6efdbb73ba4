"""vmemu.cbuild: helpers built once per source, and a clear HelperUnavailable otherwise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmemu import cbuild

OK_SOURCE = "int vmemu_answer(void) { return 42; }\n"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("VMEMU_NATIVE_CACHE", str(d))
    return d


def _compiler_or_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)  # the compiler on PATH, as cbuild finds it
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler on this machine")


def test_built_once_per_source_hash(tmp_path: Path, cache: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _compiler_or_skip(monkeypatch)
    src = tmp_path / "_answer.c"
    src.write_text(OK_SOURCE)
    first = cbuild.build(src)
    assert first.parent == cache and first.name.startswith("libanswer-")
    assert cbuild.load(src).vmemu_answer() == 42
    assert cbuild.build(src) == first  # cached: not rebuilt
    src.write_text(OK_SOURCE.replace("42", "43"))
    second = cbuild.build(src)
    assert second != first
    assert cbuild.load(src).vmemu_answer() == 43


def test_a_missing_compiler_is_helper_unavailable(tmp_path: Path, cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "_answer.c"
    src.write_text(OK_SOURCE)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(cbuild.HelperUnavailable, match="no-such-cc"):
        cbuild.build(src)
    assert not any(cache.iterdir())  # no half-written library left behind


def test_a_failed_build_reports_the_compiler_error(tmp_path: Path, cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _compiler_or_skip(monkeypatch)
    src = tmp_path / "_broken.c"
    src.write_text("int broken( { }\n")
    with pytest.raises(cbuild.HelperUnavailable, match="building _broken.c failed: .*error"):
        cbuild.build(src)
    assert not any(cache.iterdir())


def test_a_missing_source_is_helper_unavailable(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(cbuild.HelperUnavailable, match="missing"):
        cbuild.build(tmp_path / "_nothing.c")
