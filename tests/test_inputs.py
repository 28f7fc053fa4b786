"""compiled(...) validates every input before any launch: each failure is a
ValueError naming the argument, what was expected and what came."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import nsa_dsl
from nsa_dsl.ir import Branch
from nsa_dsl.validate import validate_inputs
from strategies import random_inputs

PATTERN = nsa_dsl.parse("""
pattern p {
    heads q=4 kv=2
    dims qk=32 v=16
    compress block=8 stride=4 pool=mlp
    select block=16 top=3 initial=1 local=1
    window size=8
    dtype fp32 fp16
}
""")


@pytest.fixture(scope="module")
def compiled():
    return nsa_dsl.compile(PATTERN)


@pytest.fixture
def args():
    return random_inputs(PATTERN, 1, 20, torch.float32, seed=1)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(q=a["q"][0]), r"q: expected a 4-d tensor \[B, T, HQ=4, Dqk=32\]"),
    (lambda a: a.update(q=a["q"][:, :, :3]), r"q: expected shape \[B, T, HQ, Dqk\] = \[1, 20, 4, 32\], got \[1, 20, 3, 32\]"),
    (lambda a: a.update(k=a["k"][:, :, :1]), r"k: expected shape \[B, T, HKV, Dqk\] = \[1, 20, 2, 32\]"),
    (lambda a: a.update(v=a["v"][..., :8]), r"v: expected shape \[B, T, HKV, Dv\] = \[1, 20, 2, 16\], got \[1, 20, 2, 8\]"),
    (lambda a: a.update(k=a["k"].half()), r"k: expected dtype torch.float32 \(the dtype of q\), got torch.float16"),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), r"q: pattern 'p' allows dtype fp16 \| fp32, got torch.float64"),
    (lambda a: a.update(g_slc=a["g_slc"][:, :5]), r"g_slc: expected shape \[B, T, HQ\] = \[1, 20, 4\]"),
    (lambda a: a.pop("k_cmp"), r"k_cmp: pattern 'p' pools by mlp, so k_cmp must be passed: shape \[B, Tc, HKV, Dqk\] = \[1, 4, 2, 32\]"),
    (lambda a: a.update(v_cmp=a["v_cmp"][:, :2]), r"v_cmp: expected shape \[B, Tc, HKV, Dv\] = \[1, 4, 2, 16\]"),
    (lambda a: a.update(k_swa=a["k"]), r"k_swa, v_swa: pass both or neither"),
    (lambda a: a.update(indices=torch.zeros(1, 20, 2, 3)), r"indices: expected int32 or int64"),
    (lambda a: a.update(indices=torch.full((1, 20, 2, 3), 2, dtype=torch.int32)), r"indices: block ids must lie in \[-1, 2\)"),
    (lambda a: a.update(scale=-1.0), r"scale: expected a positive finite number"),
])
def test_bad_inputs_are_named(compiled, args, change, match):
    change(args)
    with pytest.raises(ValueError, match=match):
        compiled(**args)


def test_branch_arguments_the_pattern_cannot_use():
    window_only = nsa_dsl.compile(nsa_dsl.parse("pattern w { heads q=2 kv=1 dims qk=16 window size=4 }"))
    a = random_inputs(window_only.pattern, 1, 8, torch.float32, seed=2)
    with pytest.raises(ValueError, match="g_slc: pattern 'w' does not combine the slc branch"):
        window_only(**a, g_slc=a["g_swa"])
    with pytest.raises(ValueError, match="indices: pattern 'w' has no select branch"):
        window_only(**a, indices=torch.zeros(1, 8, 1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_cmp: pattern 'w' has no compress branch"):
        window_only(**a, k_cmp=a["k"])
    with pytest.raises(ValueError, match="return_indices: pattern 'w' has no select branch"):
        window_only(**a, return_indices=True)


def test_mean_pooling_refuses_k_cmp():
    p = nsa_dsl.compile(nsa_dsl.parse(
        "pattern m { heads q=2 kv=1 dims qk=16 compress block=4 stride=4 select block=16 top=3 }"))
    a = random_inputs(p.pattern, 1, 8, torch.float32, seed=3)
    with pytest.raises(ValueError, match="pools by mean, so k_cmp is computed from k and v"):
        p(**a, k_cmp=torch.zeros(1, 2, 1, 16))


def test_non_contiguous_inputs_are_handled(compiled, args):
    # A transposed-then-transposed-back copy has the same values but other strides.
    q_t = args["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_t.is_contiguous()
    expected = compiled(**args)
    got = compiled(**{**args, "q": q_t})
    assert torch.allclose(got, expected, atol=1e-6)


def test_cpu_tensors_without_interpreter_get_a_clear_error(monkeypatch, compiled, args):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: CPU tensors are a different path")
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before triton is imported"):
        compiled(**args)


# ---------------------------------------------------------------------------
# validate_inputs directly: the checks run before any launch (no compile)
# ---------------------------------------------------------------------------
def validate(**args):
    """validate_inputs with compiled(...)'s keyword names."""
    args = dict(args)
    gates = {b: args.pop(f"g_{b.value}", None) for b in Branch}
    return validate_inputs(PATTERN, args.pop("q"), args.pop("k"), args.pop("v"), gates, **args)


def sdpa(t):
    """[B, T, H, D] -> [B, H, T, D], as torch's scaled_dot_product_attention takes it."""
    return t.transpose(1, 2)


HINT = "looks like [B, H, T, D] (the SDPA layout); nsa_dsl takes [B, T, H, D]: pass "


@pytest.mark.parametrize("swapped, named, expected", [
    (("q", "k", "v"), "q", "[B, T, HQ, Dqk] = [1, 20, 4, 32], got [1, 4, 20, 32]"),
    (("q",), "q", "[B, T, HQ, Dqk] = [1, 20, 4, 32], got [1, 4, 20, 32]"),
    (("k", "v"), "k", "[B, T, HKV, Dqk] = [1, 20, 2, 32], got [1, 2, 20, 32]"),
    (("v",), "v", "[B, T, HKV, Dv] = [1, 20, 2, 16], got [1, 2, 20, 16]"),
])
def test_sdpa_layout_gets_a_transpose_hint(args, swapped, named, expected):
    """[B, H, T, D] inputs used to be read with T = H ("expected [1, 4, 4,
    32]"); now the error gives the real T and says which to transpose."""
    bad = {**args, **{n: sdpa(args[n]) for n in swapped}}
    with pytest.raises(ValueError) as exc:
        validate(**bad)
    message = str(exc.value)
    assert message == f"{named}: expected shape {expected}: {HINT}" + ", ".join(f"{n}.transpose(1, 2)" for n in swapped)
    # following the hint makes them valid
    fixed = {**bad, **{n: bad[n].transpose(1, 2) for n in swapped}}
    assert validate(**fixed).length == 20


def test_sdpa_hint_names_a_tensor_whose_length_equals_its_heads(args):
    """At T = HQ = 4, q reads as valid either way; k and v do not, and the
    three are almost always laid out alike: q is named with them."""
    short = random_inputs(PATTERN, 1, 4, torch.float32, seed=4)
    with pytest.raises(ValueError, match=re.escape("k: expected shape [B, T, HKV, Dqk] = [1, 4, 2, 32], got"
                                                   " [1, 2, 4, 32]: " + HINT + "q.transpose(1, 2), k.transpose(1,"
                                                   " 2), v.transpose(1, 2)")):
        validate(**{**short, "q": sdpa(short["q"]), "k": sdpa(short["k"]), "v": sdpa(short["v"])})


@pytest.mark.parametrize("change", [
    lambda a: {**a, "q": sdpa(a["q"])[..., :16]},  # swapped, but the head dim is wrong too
    lambda a: {**a, "q": sdpa(a["q"]), "k": sdpa(a["k"])[:, :, :19]},  # two lengths
    lambda a: {**a, "q": sdpa(a["q"])[:, :, :19], "k": a["k"][:, :19]},  # swapped q, but k says T = 19 and v 20
])
def test_no_sdpa_hint_where_the_shapes_do_not_say_so(args, change):
    with pytest.raises(ValueError) as exc:
        validate(**change(args))
    assert "SDPA" not in str(exc.value)


def test_repeated_kv_heads_are_named(args):
    with pytest.raises(ValueError, match=re.escape(
            "v: expected shape [B, T, HKV, Dv] = [1, 20, 2, 16], got [1, 20, 4, 16]: 4 heads, one per query head;"
            " nsa_dsl takes the 2 KV heads, each shared by G=2 query heads")):
        validate(**{**args, "v": args["v"].repeat_interleave(2, dim=2)})


# Every tensor argument with a wrong size: the error names it, the expected
# shape with its sizes, and the shape that came.
@pytest.mark.parametrize("name, cut, expected", [
    ("q", lambda t: t[..., :8], "[B, T, HQ, Dqk] = [1, 20, 4, 32], got [1, 20, 4, 8]"),
    ("k", lambda t: t[:, :19], "[B, T, HKV, Dqk] = [1, 20, 2, 32] (B and T from q), got [1, 19, 2, 32]"),
    ("v", lambda t: t[:, :, :1], "[B, T, HKV, Dv] = [1, 20, 2, 16], got [1, 20, 1, 16]"),
    ("g_cmp", lambda t: t[:, :, :2], "[B, T, HQ] = [1, 20, 4], got [1, 20, 2]"),
    ("g_slc", lambda t: t[:, :5], "[B, T, HQ] = [1, 20, 4] (B and T from q), got [1, 5, 4]"),
    ("g_swa", lambda t: t.unsqueeze(-1), "a 3-d tensor [B, T, HQ] = [1, 20, 4], got a 4-d tensor of shape"
                                         " [1, 20, 4, 1]"),
    ("k_cmp", lambda t: t[:, :3], "[B, Tc, HKV, Dqk] = [1, 4, 2, 32] (B from q; Tc = (T - block) // stride + 1"
                                  " = (20 - 8) // 4 + 1 = 4), got [1, 3, 2, 32]"),
    ("v_cmp", lambda t: t[..., :8], "[B, Tc, HKV, Dv] = [1, 4, 2, 16], got [1, 4, 2, 8]"),
    ("k_swa", lambda t: t[:, :, :1], "[B, T, HKV, Dqk] = [1, 20, 2, 32], got [1, 20, 1, 32]"),
    ("v_swa", lambda t: t[:, :10], "[B, T, HKV, Dv] = [1, 20, 2, 16] (B and T from q), got [1, 10, 2, 16]"),
    ("indices", lambda t: t[..., :2], "[B, T, HKV, top] = [1, 20, 2, 3], got [1, 20, 2, 2]"),
])
def test_every_tensor_error_names_argument_expected_and_got(args, name, cut, expected):
    full = dict(args, k_swa=args["k"], v_swa=args["v"], indices=torch.zeros(1, 20, 2, 3, dtype=torch.int32))
    assert validate(**full).length == 20  # valid as a whole
    with pytest.raises(ValueError) as exc:
        validate(**{**full, name: cut(full[name])})
    message = str(exc.value)
    assert message.startswith(f"{name}: expected ") and expected in message, message


def test_mlp_pooling_without_k_cmp_says_how_many_compressed_tokens(args):
    short = random_inputs(PATTERN, 1, 6, torch.float32, seed=5)  # shorter than one compress block of 8
    short.pop("k_cmp")
    with pytest.raises(ValueError, match=re.escape("k_cmp: pattern 'p' pools by mlp, so k_cmp must be passed: shape"
                                                   " [B, Tc, HKV, Dqk] = [1, 0, 2, 32] (B from q; Tc = 0: T=6 is"
                                                   " shorter than one compress block of 8)")):
        validate(**short)


def test_window_keys_say_which_one_came(args):
    with pytest.raises(ValueError, match="k_swa, v_swa: pass both or neither .*; got v_swa only"):
        validate(**args, v_swa=args["v"])


@pytest.mark.parametrize("scale", [True, float("inf"), float("nan"), 0.0, -0.5, "0.1", torch.tensor(0.125)])
def test_bad_scales_are_refused(args, scale):
    with pytest.raises(ValueError, match=r"scale: expected a positive finite number \(a float\), got "):
        validate(**args, scale=scale)


@pytest.mark.parametrize("scale", [0.125, 1, np.float32(0.125), np.float64(0.2)])
def test_scales_of_any_real_type_are_taken(args, scale):
    assert validate(**args, scale=scale).length == 20


@pytest.mark.parametrize("scale", [True, float("inf"), float("nan"), 0.0, -0.5, "0.1", torch.tensor(0.125)])
def test_the_layer_and_the_reference_refuse_the_scales_the_compiled_call_refuses(args, scale):
    """NSAttention(scale=inf) and reference(scale=inf) returned all-nan
    outputs, and NSAttention(scale=True) took a bool as 1.0, where the
    compiled call refuses all of them: one rule now (validate.check_scale)."""
    with pytest.raises(ValueError, match=r"scale: expected a positive finite number \(a float\), got "):
        nsa_dsl.NSAttention(PATTERN, 32, backend="reference", scale=scale)
    with pytest.raises(ValueError, match=r"scale: expected a positive finite number \(a float\), got "):
        nsa_dsl.reference(PATTERN, **args, scale=scale)


def _packed(args: dict) -> dict:
    """args ([1, 20, ...]) as a packed call's [total, ...] tensors."""
    return {name: t[0] for name, t in args.items()}


def test_packed_block_ids_past_their_own_sequence_are_refused(compiled, args):
    """A packed row's block ids are bounded by its own sequence's blocks:
    sequence 2 of [5, 0, 15] positions has one select block of 16, so id 1
    (a block of the 20 packed positions, but none of that sequence's) and
    id -2 are the caller's bug, as they are in a fixed-length call; they
    were ignored silently."""
    cu = torch.tensor([0, 5, 5, 20], dtype=torch.int32)
    good = torch.full((20, 2, 3), -1, dtype=torch.int32)
    good[:, :, 0] = 0
    compiled(**_packed(args), cu_seqlens=cu, indices=good)  # in range: taken
    for bad_value, row in ((1, 7), (-2, 3)):
        bad = good.clone()
        bad[row, 1, 2] = bad_value
        for max_seqlen in (None, 15):
            with pytest.raises(ValueError, match=re.escape(
                    f"indices: block ids must lie in [-1, 1) for the {15 if row >= 5 else 5} keys of sequence"
                    f" {2 if row >= 5 else 0} and select block 16 (-1 means none); its packed row {row} holds")):
                compiled(**_packed(args), cu_seqlens=cu, max_seqlen=max_seqlen, indices=bad)


def test_block_ids_of_queries_at_the_last_positions_are_checked(compiled, args):
    """q at the last 8 of 20 positions (k, v at all 20): ids are bounded by
    the 20 keys' 2 blocks, as in a call of all 20 queries; 2 was ignored."""
    tail = {name: (t[:, 12:] if name in ("q", "g_cmp", "g_slc", "g_swa") else t) for name, t in args.items()}
    indices = torch.full((1, 8, 2, 3), -1, dtype=torch.int32)
    indices[..., 0] = 1
    compiled(**tail, indices=indices)
    indices[0, 5, 0, 1] = 2
    with pytest.raises(ValueError, match=re.escape("indices: block ids must lie in [-1, 2) for the 20 keys of"
                                                   " sequence 0 and select block 16 (-1 means none); its packed"
                                                   " row 5 holds")):
        compiled(**tail, indices=indices)
