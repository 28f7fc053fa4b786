"""Generated source -> loaded Python module, through an on-disk cache.

Entry layout: <cache dir>/<key[:2]>/<key>.py plus <key>.sha256 holding the
digest of the file's bytes. The key is computed by the caller (pipeline.py)
from everything that determines the generated text; the digest protects the
entry itself: a truncated, corrupted or edited file no longer matches its
digest and is rebuilt rather than trusted.

Writes go to a temporary file in the same folder followed by os.replace, so
a reader never sees half a file; a per-entry lock file (fcntl.flock) keeps
two processes from writing the same entry at once. Modules are loaded by
import (importlib), never by exec of a string: Triton needs the source file to
exist for its JIT.

An unusable cache folder (NSA_DSL_CACHE_DIR naming a file, a folder under a
file, a read-only folder, a full disk) is one error, CacheError (an
OSError), naming the folder, where its path came from and the fix. There is
deliberately no fallback to a temporary cache: a folder the user chose and
that silently goes unused would rebuild every entry in every process and
hide the misconfiguration until someone wonders why. A read-only folder
still serves the entries it already holds: only a missing or corrupted
entry needs a write. `problem()` finds the same conditions up front without
writing (`nsa-dsl cache` reports them and exits 2).

Each entry's leading comment lines of the form `# name  value` (the
generated module's header: pattern, source, cache key, kernels) are its
description; `entries()` reads them without importing the module, so every
entry describes itself, however old.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

ENV_VAR = "NSA_DSL_CACHE_DIR"
_MODULE_PREFIX = "nsa_dsl_generated_"


class CacheError(OSError):
    """The cache folder cannot be used; the message says which folder, where
    its path came from and what to do."""


def cache_dir() -> Path:
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nsa_dsl"


def _unusable(reason: str) -> CacheError:
    origin = f"from ${ENV_VAR}" if os.environ.get(ENV_VAR) else f"the default; ${ENV_VAR} overrides it"
    return CacheError(f"cannot use the nsa_dsl kernel cache folder {cache_dir()} ({origin}): {reason};"
                      f" set {ENV_VAR} to a writable folder")


def _reason(exc: OSError) -> str:
    """An OSError as `strerror: path`, without the errno prefix."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _nearest_existing(path: Path) -> Path:
    """`path` itself, or the nearest folder above it that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _not_a_folder(path: Path) -> str:
    return f"{path} is a file, not a folder"


def problem() -> Optional[str]:
    """Why the cache folder cannot take new entries, or None when it can.
    Nothing is written: the folder (or the nearest part of its path that
    exists, when it is yet to be created) is inspected."""
    root = cache_dir()
    existing = _nearest_existing(root)
    if not existing.is_dir():
        return _not_a_folder(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == root:
            return f"{root} is not writable"
        return f"{existing} is not writable, so {root} cannot be created"
    return None


def _folder_or_nothing() -> Optional[Path]:
    """The cache folder when it exists, None when it does not yet; a path
    that cannot be a folder (a file on it) is a CacheError, not an empty
    cache."""
    root = cache_dir()
    if root.is_dir():
        return root
    existing = _nearest_existing(root)
    if not existing.is_dir():
        raise _unusable(_not_a_folder(existing))
    return None


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
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX: atomic replace still protects readers
            pass
        yield
    finally:
        os.close(fd)  # closing releases the flock


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
    does not match its digest. A folder that cannot take the entry raises
    CacheError."""
    path = entry_path(key)
    if is_valid(key):
        return path, False
    # Rendering is pure and cheap, so it runs before the lock (two processes
    # may both render; only one writes): every OSError below is then the
    # cache folder's, not the renderer's.
    source = build()
    try:
        with _locked(path):
            if is_valid(key):  # another process built it while we waited
                return path, False
            store(key, source)
            return path, True
    except OSError as exc:
        raise _unusable(_reason(exc)) from exc


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


class Entry(NamedTuple):
    key: str
    path: Path
    size: int  # bytes
    valid: bool  # the bytes match the recorded digest
    header: dict  # the entry's `# name  value` lines: pattern, source, cache key, kernels


# "# cache key  3f2a..." -> ("cache key", "3f2a..."): words, two or more
# spaces, the value. Prose comments have single spaces and do not match.
_HEADER_LINE = re.compile(r"# (\w+(?: \w+)*) {2,}(\S.*)")


def read_header(path: Path, limit: int = 4096) -> dict:
    """The `# name  value` lines of the file's leading comment block, read
    from its first `limit` bytes (no import: a corrupted entry is described
    too, as far as its text goes). {} when it has none or cannot be read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(limit).decode("utf-8", "replace")
    except OSError:
        return {}
    found = {}
    for line in head.splitlines():
        if not line.startswith("#"):
            break
        match = _HEADER_LINE.fullmatch(line.rstrip())
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found


def entries() -> list:
    """An Entry for every entry in the cache folder, sorted by key. Raises
    CacheError when the folder's path cannot be a folder."""
    root = _folder_or_nothing()
    if root is None:
        return []
    found = []
    for path in sorted(root.glob("??/*.py")):
        key = path.stem
        found.append(Entry(key, path, path.stat().st_size, is_valid(key), read_header(path)))
    return found


def clear() -> int:
    """Remove every cache entry (and its digest and lock); return how many.
    Raises CacheError when they cannot be removed."""
    removed = 0
    root = _folder_or_nothing()
    if root is None:
        return 0
    try:
        for path in root.glob("??/*"):
            if path.suffix == ".py":
                removed += 1
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    except OSError as exc:
        raise _unusable(_reason(exc)) from exc
    for sub in root.glob("??"):
        with contextlib.suppress(OSError):
            sub.rmdir()
    return removed
