"""Running the kernels on a CPU-only machine: the interpreter is chosen
without the user knowing the variable, and mended where an older Triton
breaks with the newest numpy."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import triton
import triton.language as tl

from nsa_dsl import interpreter

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: no CUDA device")


def test_prepare_chooses_the_interpreter_without_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(interpreter, "_warned", False)
    with pytest.warns(UserWarning, match="interpreter"):
        interpreter.prepare()
    assert os.environ["TRITON_INTERPRET"] == "1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        monkeypatch.delenv("TRITON_INTERPRET")
        interpreter.prepare()


def test_prepare_leaves_an_explicit_choice(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    interpreter.prepare()
    assert os.environ["TRITON_INTERPRET"] == "0"


@triton.jit
def _sum_first(src, dst, bounds):
    # A loop bound loaded at run time: Triton 3.6's interpreter turned it into
    # an int with int() of a one-element array, which numpy 2.4 refuses.
    n = tl.load(bounds)
    acc = tl.zeros([4], dtype=tl.float32)
    for i in range(0, n):
        acc += tl.load(src + i * 4 + tl.arange(0, 4))
    tl.store(dst + tl.arange(0, 4), acc)


def test_a_loaded_loop_bound_runs_in_the_interpreter():
    interpreter.prepare()
    src = torch.randn(5, 4)
    dst = torch.full((4,), float("nan"))
    _sum_first[(1,)](src, dst, torch.tensor([3], dtype=torch.int32))
    torch.testing.assert_close(dst, src[:3].sum(0))


@triton.jit
def _scaled(x, factor):
    return x * factor


@triton.jit
def _twice_through_a_helper(src, dst):
    x = tl.load(src + tl.arange(0, 8))
    tl.store(dst + tl.arange(0, 8), _scaled(_scaled(x, 2.0), 3.0))


def test_the_suites_interpreter_speedups_are_in_place_and_change_no_result():
    """tests/interpreter_speed.py (installed by the conftest) relies on
    Triton's interpreter internals; a Triton whose internals moved would
    leave the CPU suite 2.4x slower (NOTES v27) without failing anything,
    so this says so. A kernel calling helpers computes what it should, and
    the launch restores triton.language afterwards."""
    import interpreter_speed
    from triton.runtime import interpreter as triton_interpreter

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert interpreter_speed.install(), "Triton's interpreter no longer has the shape interpreter_speed patches"
    assert getattr(triton_interpreter._patch_lang, "nsa_dsl_once", False)
    builtin_load = tl.load
    src = torch.randn(8)
    dst = torch.full((8,), float("nan"))
    for _ in range(2):
        _twice_through_a_helper[(1,)](src, dst)
        torch.testing.assert_close(dst, src * 6.0)
        assert tl.load is builtin_load
