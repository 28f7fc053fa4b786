"""Generated source -> loaded Python module, through an on-disk cache.

Entry layout: <cache dir>/<key[:2]>/<key>.py plus <key>.sha256 holding the
digest of the file's bytes. The key is computed by the caller (compile.py)
from everything that determines the generated text; the digest protects the
entry itself: a truncated, corrupted or edited file no longer matches its
digest and is rebuilt rather than trusted.

Writes go to a temporary file in the same folder followed by os.replace, so
a reader never sees half a file; a per-entry lock file (fcntl.flock) keeps
two processes from building the same entry at once. Modules are loaded by
import (importlib), never by exec of a string: Triton needs the source file to
exist for its JIT.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

ENV_VAR = "NSA_DSL_CACHE_DIR"
_MODULE_PREFIX = "nsa_dsl_generated_"


def cache_dir() -> Path:
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nsa_dsl"


def entry_path(key: str) -> Path:
    if not key or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"cache key must be lowercase hex, got {key!r}")
    return cache_dir() / key[:2] / f"{key}.py"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_suffix(".lock")
    with open(lock_path, "a+b") as lock:
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX: atomic replace still protects readers
            pass
        yield


def is_valid(key: str) -> bool:
    """True when the entry exists and its bytes match the recorded digest."""
    path = entry_path(key)
    sidecar = path.with_suffix(".sha256")
    try:
        data = path.read_bytes()
        recorded = sidecar.read_text().strip()
    except OSError:
        return False
    return _digest(data) == recorded


def store(key: str, source: str) -> Path:
    path = entry_path(key)
    data = source.encode()
    _atomic_write(path, data)
    _atomic_write(path.with_suffix(".sha256"), (_digest(data) + "\n").encode())
    return path


def get_or_build(key: str, build: Callable[[], str]) -> tuple:
    """Return (path, built) for the entry, building it when it is missing or
    does not match its digest."""
    path = entry_path(key)
    if is_valid(key):
        return path, False
    with _locked(path):
        if is_valid(key):  # another process built it while we waited
            return path, False
        store(key, build())
        return path, True


def load_module(key: str, path: Path):
    """Import the generated file as a module (once per process and key)."""
    name = _MODULE_PREFIX + key[:32]
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None) == str(path):
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - defensive
        raise ImportError(f"nsa_dsl: cannot import generated kernels from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def entries() -> list:
    """(key, path, size in bytes, valid) for every entry in the cache folder."""
    root = cache_dir()
    found = []
    if not root.is_dir():
        return found
    for path in sorted(root.glob("??/*.py")):
        key = path.stem
        found.append((key, path, path.stat().st_size, is_valid(key)))
    return found


def clear() -> int:
    """Remove every cache entry (and its digest and lock); return how many."""
    removed = 0
    root = cache_dir()
    if not root.is_dir():
        return 0
    for path in root.glob("??/*"):
        if path.suffix == ".py":
            removed += 1
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for sub in root.glob("??"):
        with contextlib.suppress(OSError):
            sub.rmdir()
    return removed
