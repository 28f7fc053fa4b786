"""The on-disk cache when its folder cannot be used, and what an entry says
about itself (its header). Rendering and reuse are in test_pipeline.py."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import nsa_dsl
from nsa_dsl import cache
from nsa_dsl.ir import Dims, Heads, Pattern, Window
from nsa_dsl.plan import make_plan
from nsa_dsl.render import render


def window_pattern(size=8, name="w"):
    return Pattern(name=name, heads=Heads(q=2, kv=1), dims=Dims(qk=16, v=16), window=Window(size=size),
                   source="specs/w.nsa")


def read_only(monkeypatch, folder: Path) -> None:
    """Make everything under `folder` refuse writes as a read-only mount
    does. Tests run as root, whom chmod does not stop, so the os functions
    the cache writes through are wrapped instead."""
    folder = os.path.abspath(folder)

    def inside(path) -> bool:
        return os.path.abspath(os.fsdecode(path)).startswith(folder)

    def refusing(real, writes=lambda *args: True):
        def wrapper(path, *args, **kwargs):
            if inside(path) and writes(*args):
                raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return wrapper

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    monkeypatch.setattr(os, "open", refusing(os.open, lambda flags, *rest: bool(flags & write_flags)))
    monkeypatch.setattr(os, "mkdir", refusing(os.mkdir))
    monkeypatch.setattr(os, "unlink", refusing(os.unlink))
    monkeypatch.setattr(os, "replace", refusing(os.replace))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if inside(path) and mode & os.W_OK
                        else real_access(path, mode, **kw))


def test_cache_dir_naming_a_file_is_one_clear_error(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.setenv(cache.ENV_VAR, str(afile))
    with pytest.raises(cache.CacheError) as exc:
        nsa_dsl.compile(window_pattern())
    message = str(exc.value)
    assert cache.ENV_VAR in message and str(afile) in message and "writable folder" in message
    assert isinstance(exc.value, OSError)  # callers catching OSError still do
    # Listing and clearing say so too instead of "0 entries".
    with pytest.raises(cache.CacheError, match="is a file, not a folder"):
        cache.entries()
    with pytest.raises(cache.CacheError, match="is a file, not a folder"):
        cache.clear()
    assert cache.problem() == f"{afile} is a file, not a folder"


def test_cache_dir_under_a_file(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "afile" / "cache"))
    assert cache.problem() == f"{tmp_path / 'afile'} is a file, not a folder"
    with pytest.raises(cache.CacheError, match=cache.ENV_VAR):
        nsa_dsl.compile(window_pattern())


def test_read_only_empty_cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv(cache.ENV_VAR, str(root))
    read_only(monkeypatch, root)
    with pytest.raises(cache.CacheError, match="Read-only file system") as exc:
        nsa_dsl.compile(window_pattern(size=3))
    assert str(root) in str(exc.value) and cache.ENV_VAR in str(exc.value)
    assert cache.problem() == f"{root} is not writable"


def test_read_only_cache_dir_with_a_corrupted_entry(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV_VAR, str(root))
    path = nsa_dsl.compile(window_pattern(size=4)).source_path
    path.write_text("# tampered\n")
    read_only(monkeypatch, root)
    # The rebuild cannot even take the lock: still the same clear error,
    # not a PermissionError about a .lock file.
    with pytest.raises(cache.CacheError, match="cannot use the nsa_dsl kernel cache folder"):
        nsa_dsl.compile(window_pattern(size=4))
    with pytest.raises(cache.CacheError, match="Read-only file system"):
        cache.clear()


def test_read_only_cache_dir_still_serves_its_valid_entries(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV_VAR, str(root))
    first = nsa_dsl.compile(window_pattern(size=5))
    read_only(monkeypatch, root)
    again = nsa_dsl.compile(window_pattern(size=5))
    assert again.source_path == first.source_path
    assert [e.valid for e in cache.entries()] == [True]


def test_a_missing_cache_dir_is_an_empty_cache_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "not" / "yet"))
    assert cache.problem() is None
    assert cache.entries() == [] and cache.clear() == 0


def test_the_default_cache_dir_error_names_the_variable_that_moves_it(tmp_path, monkeypatch):
    (tmp_path / "xdg").write_text("")
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(cache.CacheError, match=r"the default; \$NSA_DSL_CACHE_DIR overrides it"):
        nsa_dsl.compile(window_pattern(size=6))


def test_header_of_a_generated_module_names_pattern_source_and_kernels(tmp_path):
    plan = make_plan(window_pattern())
    path = tmp_path / "entry.py"
    path.write_text(render(plan, "ab" * 32))
    header = cache.read_header(path)
    assert header["pattern"] == "w"
    assert header["source"] == "specs/w.nsa"
    assert header["cache key"] == "ab" * 32
    assert header["kernels"] == ", ".join(plan.kernel_names)
    # Prose and the canonical form below the header are not mistaken for fields.
    assert set(header) == {"pattern", "source", "cache key", "kernels"}


def test_header_of_a_file_without_one_is_empty(tmp_path):
    (tmp_path / "plain.py").write_text("x = 1\n# pattern    late\n")
    assert cache.read_header(tmp_path / "plain.py") == {}
    assert cache.read_header(tmp_path / "missing.py") == {}


def test_entries_carry_their_header(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
    compiled = nsa_dsl.compile(window_pattern(size=7, name="seven"))
    [entry] = cache.entries()
    assert entry.key == compiled.cache_key and entry.valid
    assert entry.header["pattern"] == "seven" and entry.header["source"] == "specs/w.nsa"
