"""Build and load vmemu's small optional C helpers with the system C compiler.

Two pieces of vmemu need a few lines of C that Python cannot express:
:mod:`vmemu.native.access` (user-mode accesses of real memory that survive
SIGSEGV/SIGBUS), loaded with ``ctypes`` (:func:`load`), and
:mod:`vmemu.sched.park` (a thread hand-off that spins without the GIL), a
CPython extension module (:func:`load_module`) because it runs on every
hand-off between two threads. Neither is needed for the emulation itself:
without a compiler (or, for the extension, the Python headers), the native
accesses skip and threads park on pipes.

Each helper is one C file next to its module, built on first use into a
per-user cache directory (``VMEMU_NATIVE_CACHE``, or
``$TMPDIR/vmemu-native-<uid>``) under a name that carries the hash of its
source, so an edited source is rebuilt and a cached library is never stale.
Depends on nothing else in vmemu.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

_lock = threading.Lock()
_modules: dict[Path, ModuleType] = {}  # load_module's imports, by built file


class HelperUnavailable(RuntimeError):
    """A C helper could not be built (no compiler, no source, a failed build)."""


def _cache_dir() -> Path:
    return Path(
        os.environ.get("VMEMU_NATIVE_CACHE")
        or Path(tempfile.gettempdir()) / f"vmemu-native-{os.getuid()}"
    )


def build(source: Path, *, python: bool = False) -> Path:
    """The shared library built from ``source`` (compiled unless cached); HelperUnavailable if not.

    With ``python`` the source is a CPython extension module: it is compiled
    against this interpreter's headers, and its name carries the
    interpreter's ABI tag, so two Pythons sharing the cache never load each
    other's build.
    """
    if not source.exists():
        raise HelperUnavailable(f"{source} is missing")
    flags = ["-O2", "-shared", "-fPIC"]
    suffix = ".so"
    if python:
        include = sysconfig.get_paths()["include"]
        if not (Path(include) / "Python.h").exists():
            raise HelperUnavailable(f"no Python headers (Python.h in {include}) to build {source.name}")
        flags.append(f"-I{include}")
        suffix = str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    cache = _cache_dir()
    out = cache / f"lib{source.stem.lstrip('_')}-{digest}{suffix}"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise HelperUnavailable(f"no C compiler (gcc/cc) to build {source.name}")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [cc, *flags, "-o", tmp, str(source), "-lpthread"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # $CC names no program
        os.unlink(tmp)
        raise HelperUnavailable(f"running {cc} to build {source.name} failed: {e}") from e
    if res.returncode != 0:
        os.unlink(tmp)
        raise HelperUnavailable(f"building {source.name} failed: {res.stderr.strip()}")
    os.replace(tmp, out)
    return out


def load(source: Path, *, py: bool = False) -> ctypes.CDLL:
    """Build ``source`` if needed and load it: a ``CDLL`` (calls release the GIL), or
    with ``py`` a ``PyDLL`` (calls keep it: for short calls that must not let another
    thread in)."""
    with _lock:
        path = str(build(source))
    return ctypes.PyDLL(path) if py else ctypes.CDLL(path, use_errno=True)


def load_module(source: Path) -> ModuleType:
    """Build the CPython extension ``source`` if needed and import it.

    The module's name is the source's stem (``_park.c`` defines
    ``PyInit__park``); each build is imported once, and an edited source is
    a new build. A call into such a module costs what any built-in costs
    (tens of nanoseconds), where a ``ctypes`` call costs hundreds: for
    helpers on a hot path.
    """
    with _lock:
        path = build(source, python=True)
        mod = _modules.get(path)
        if mod is None:
            loader = importlib.machinery.ExtensionFileLoader(source.stem, str(path))
            spec = importlib.util.spec_from_file_location(source.stem, str(path), loader=loader)
            if spec is None:
                raise HelperUnavailable(f"cannot load {path}")
            try:
                mod = importlib.util.module_from_spec(spec)
                loader.exec_module(mod)
            except ImportError as e:
                raise HelperUnavailable(f"loading {path} failed: {e}") from e
            _modules[path] = mod
        return mod
