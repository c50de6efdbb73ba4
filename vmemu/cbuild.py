"""Build and load vmemu's small optional C helpers with the system C compiler.

Two pieces of vmemu need a few lines of C that Python cannot express:
:mod:`vmemu.native.access` (user-mode accesses of real memory that survive
SIGSEGV/SIGBUS) and :mod:`vmemu.sched.park` (a thread hand-off that spins
without the GIL). Neither is needed for the emulation itself: without a
compiler, the native accesses skip and threads park on pipes.

Each helper is one C file next to its module, built on first use into a
per-user cache directory (``VMEMU_NATIVE_CACHE``, or
``$TMPDIR/vmemu-native-<uid>``) under a name that carries the hash of its
source, so an edited source is rebuilt and a cached library is never stale.
Depends on nothing else in vmemu.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()


class HelperUnavailable(RuntimeError):
    """A C helper could not be built (no compiler, no source, a failed build)."""


def _cache_dir() -> Path:
    return Path(
        os.environ.get("VMEMU_NATIVE_CACHE")
        or Path(tempfile.gettempdir()) / f"vmemu-native-{os.getuid()}"
    )


def build(source: Path) -> Path:
    """The shared library built from ``source`` (compiled unless cached); HelperUnavailable if not."""
    if not source.exists():
        raise HelperUnavailable(f"{source} is missing")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cache = _cache_dir()
    out = cache / f"lib{source.stem.lstrip('_')}-{digest}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise HelperUnavailable(f"no C compiler (gcc/cc) to build {source.name}")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(source), "-lpthread"]
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
