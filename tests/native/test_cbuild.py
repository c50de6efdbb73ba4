"""vmemu.cbuild: helpers built once per source, and a clear HelperUnavailable otherwise."""

from __future__ import annotations

import shutil
import sysconfig
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


MODULE_SOURCE = """#define PY_SSIZE_T_CLEAN
#include <Python.h>
static PyObject *answer(PyObject *m, PyObject *unused) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_answermod", NULL, -1, methods};
PyMODINIT_FUNC PyInit__answermod(void) { return PyModule_Create(&mod); }
"""


def test_an_extension_module_is_built_for_this_interpreter(tmp_path: Path, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _compiler_or_skip(monkeypatch)
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        pytest.skip("no Python headers on this machine")
    src = tmp_path / "_answermod.c"
    src.write_text(MODULE_SOURCE)
    mod = cbuild.load_module(src)
    assert mod.answer() == 42
    built = cbuild.build(src, python=True)
    assert built.name.endswith(str(sysconfig.get_config_var("EXT_SUFFIX")))  # this ABI only
    assert cbuild.load_module(src) is mod  # imported once per build
    src.write_text(MODULE_SOURCE.replace("42", "43"))
    assert cbuild.load_module(src).answer() == 43  # an edited source is a new build


def test_missing_python_headers_are_helper_unavailable(tmp_path: Path, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "_answermod.c"
    src.write_text(MODULE_SOURCE)
    real = sysconfig.get_paths
    monkeypatch.setattr(sysconfig, "get_paths",
                        lambda *a, **k: {**real(*a, **k), "include": str(tmp_path / "no-include")})
    with pytest.raises(cbuild.HelperUnavailable, match="no Python headers"):
        cbuild.load_module(src)
    assert not cache.exists() or not any(cache.iterdir())
