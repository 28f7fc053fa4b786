"""Rendering, the cache key and the on-disk cache."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

import nsa_dsl
from nsa_dsl import cache
from nsa_dsl.ir import Heads, Dims, Pattern, Window
from nsa_dsl.pipeline import cache_key, emit
from nsa_dsl.plan import make_plan

render_mod = importlib.import_module("nsa_dsl.render")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def window_pattern(size=8, name="w"):
    return Pattern(name=name, heads=Heads(q=2, kv=1), dims=Dims(qk=16, v=16), window=Window(size=size))


def test_generated_source_is_readable_python_with_header():
    key, source = emit(nsa_dsl.load(EXAMPLES / "deepseek_nsa.nsa"))
    assert source.splitlines()[2].startswith("# pattern    deepseek_nsa")
    assert f"# cache key  {key}" in source
    assert "#   select block=64 top=16 initial=1 local=2" in source
    assert "HQ: tl.constexpr = tl.constexpr(64)" in source
    assert "def slc_topk(" in source and "def swa_bwd_dkdv(" in source
    compile(source, "generated.py", "exec")


def test_window_only_pattern_generates_no_compression_or_selection_kernels():
    _, source = emit(window_pattern())
    assert "def swa_fwd(" in source
    for absent in ("def cmp_fwd(", "def slc_fwd(", "def slc_topk(", "def cmp_pool("):
        assert absent not in source


def test_static_selection_generates_no_scoring():
    p = nsa_dsl.parse("pattern s { heads q=4 kv=1 dims qk=32 select block=16 top=3 initial=1 local=2 }")
    plan = nsa_dsl.check(p)
    assert plan.static_selection
    _, source = emit(p)
    assert "STATIC_SELECTION: tl.constexpr = tl.constexpr(True)" in source
    assert "cmp_fwd" not in plan.kernel_names


def test_renderer_refuses_free_text():
    with pytest.raises(ValueError, match="refusing to render"):
        render_mod._literal("__import__('os')")
    with pytest.raises(ValueError, match="refusing to render"):
        render_mod._literal(1.5)
    bad_name = window_pattern(name="x; import os")
    with pytest.raises(ValueError, match="not an identifier"):
        render_mod.render(make_plan(bad_name))


def test_renderer_refuses_a_name_with_a_trailing_newline():
    # `^...$` would accept "abc\n" ($ matches before a final newline): the
    # whole name must be an identifier.
    with pytest.raises(ValueError, match="not an identifier"):
        render_mod.render(make_plan(window_pattern(name="abc\n")))


def test_source_file_name_cannot_escape_its_comment():
    p = Pattern(name="w", heads=Heads(q=2, kv=1), dims=Dims(qk=16, v=16), window=Window(size=8),
                source="evil\nimport os\n")
    source = render_mod.render(make_plan(p))
    assert "\nimport os\n" not in source
    assert "# source     evil?import os?" in source


def test_strict_undefined_fails_loudly(tmp_path, monkeypatch):
    import jinja2

    env = render_mod._environment()
    assert env.undefined is jinja2.StrictUndefined
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ missing_value }}").render()


def test_cache_key_depends_on_what_decides_the_code():
    base = cache_key(make_plan(window_pattern(8)))
    assert base == cache_key(make_plan(window_pattern(8)))
    assert base != cache_key(make_plan(window_pattern(9)))
    assert base != cache_key(make_plan(window_pattern(8)), device="cuda-sm90")
    moved = Pattern(name="w", heads=Heads(q=2, kv=1), dims=Dims(qk=16, v=16), window=Window(size=8), source="x.nsa")
    assert base != cache_key(make_plan(moved))


def test_cache_key_of_a_file_name_that_is_not_utf8():
    # os.fsdecode(b"bad\xff.nsa") carries a lone surrogate, which .encode()
    # refuses; the key hashes the name's original bytes instead, so two such
    # names still get two keys.
    def from_file(raw: bytes):
        return Pattern(name="w", heads=Heads(q=2, kv=1), dims=Dims(qk=16, v=16), window=Window(size=8),
                       source=os.fsdecode(raw))

    bad = cache_key(make_plan(from_file(b"bad\xff.nsa")))
    assert bad != cache_key(make_plan(from_file(b"bad\xfe.nsa")))
    assert bad == cache_key(make_plan(from_file(b"bad\xff.nsa")))


def test_cache_key_covers_templates(monkeypatch):
    plan = make_plan(window_pattern())
    before = cache_key(plan)
    real = render_mod.template_sources

    monkeypatch.setattr("nsa_dsl.pipeline.template_sources", lambda: real() + (("extra.jinja", "x"),))
    assert cache_key(plan) != before


def test_compile_writes_once_and_reuses(cache_dir):
    p = window_pattern()
    first = nsa_dsl.compile(p)
    assert first.source_path.is_file() and cache_dir in first.source_path.parents
    mtime = first.source_path.stat().st_mtime_ns
    second = nsa_dsl.compile(p)
    assert second.source_path == first.source_path
    assert second.source_path.stat().st_mtime_ns == mtime
    assert [e[3] for e in cache.entries()] == [True]


def test_corrupted_entry_is_detected_and_rebuilt(cache_dir):
    p = window_pattern(size=5)
    compiled = nsa_dsl.compile(p)
    path = compiled.source_path
    good = path.read_text()
    path.write_text(good.replace("WINDOW: tl.constexpr = tl.constexpr(5)", "WINDOW: tl.constexpr = tl.constexpr(6)"))
    key = compiled.cache_key
    assert not cache.is_valid(key)
    assert [e[3] for e in cache.entries()] == [False]
    rebuilt, built = cache.get_or_build(key, lambda: good)
    assert built and rebuilt.read_text() == good and cache.is_valid(key)


def test_truncated_entry_is_rebuilt_by_compile(cache_dir):
    p = window_pattern(size=6)
    path = nsa_dsl.compile(p).source_path
    path.write_bytes(path.read_bytes()[:100])
    compiled = nsa_dsl.compile(p)
    assert "def swa_fwd(" in compiled.source_path.read_text()


def test_writes_are_atomic_no_temp_files_left(cache_dir):
    nsa_dsl.compile(window_pattern(size=7))
    leftovers = [f for f in cache_dir.rglob("*") if f.name.endswith(".tmp")]
    assert leftovers == []


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("NSA_DSL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "nsa_dsl"
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"


def test_compiling_an_invalid_pattern_raises_spec_error(cache_dir):
    bad = Pattern(name="bad", heads=Heads(q=3, kv=2), dims=Dims(qk=16, v=16), window=Window(size=4))
    with pytest.raises(nsa_dsl.SpecError, match="multiple of heads.kv"):
        nsa_dsl.compile(bad)
    with pytest.raises(TypeError, match="expects a Pattern"):
        nsa_dsl.compile("pattern w {}")


def test_a_flash_forward_that_does_not_fit_in_shared_memory_runs_on_fewer_stages():
    # The plan sizes deepseek_nsa's flash tiles for 16-bit inputs (128 x 64
    # on 3 stages: 208 KB); float32 inputs take more than a block may have
    # (sm_90 compile: 352 KB on 3 stages, 193 KB on 1). The launch lowers the
    # stages until the kernel fits, remembers them, and names the tiles when
    # even one stage does not fit.
    from types import SimpleNamespace

    import torch
    from triton.runtime.errors import OutOfResources

    from nsa_dsl.launch import _launch_fitting

    launches = []

    class Kernel:
        def __init__(self, limit_stages):
            self.limit_stages = limit_stages

        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages):
                launches.append(num_stages)
                if num_stages > self.limit_stages:
                    raise OutOfResources(120000 * num_stages, 232448, "shared memory")
            return launch

    host = SimpleNamespace(module=SimpleNamespace(cmp_fwd=Kernel(1), swa_fwd=Kernel(0)), fitted_stages={})
    _launch_fitting(host, "cmp_fwd", (1,), (), dtype=torch.float32, num_warps=8, num_stages=3)
    assert launches == [3, 2, 1] and host.fitted_stages == {("cmp_fwd", torch.float32): 1}
    _launch_fitting(host, "cmp_fwd", (1,), (), dtype=torch.float32, num_warps=8, num_stages=3)
    assert launches[3:] == [1]  # remembered: no failing attempts again
    _launch_fitting(host, "cmp_fwd", (1,), (), dtype=torch.bfloat16, num_warps=8, num_stages=1)
    assert launches[4:] == [1]
    with pytest.raises(ValueError, match="swa_fwd does not fit .* even on one pipeline stage"):
        _launch_fitting(host, "swa_fwd", (1,), (), dtype=torch.float32, num_warps=8, num_stages=2)
