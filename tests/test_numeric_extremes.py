"""Numeric extremes (issue 26): the compiled kernels against the float64
reference given the kernels' own block indices, where the inputs are at the
edges of what the arithmetic holds: length 1, |q|, |k| ~ 1e4 in fp16 (logits
near 1e7), keys of -inf, and keys all equal (every score a tie).

On the CPU the kernels run through Triton's interpreter in float32; on a GPU
compiled, in bf16 (the tolerance follows the dtype: NSA_MATH.md)."""
from __future__ import annotations

import pytest
import torch

import nsa_dsl
from nsa_dsl.verify import gradient_floors, rel_error, selection_problems
from strategies import TOLERANCE, random_inputs, upcast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32

FULL = nsa_dsl.parse("""
pattern extremes {
    heads    q=4 kv=2
    dims     qk=32 v=16
    compress block=8 stride=4 pool=mean
    select   block=16 top=3 initial=1 local=1
    window   size=12
}
""")
MLP = nsa_dsl.parse("""
pattern extremes_mlp {
    heads    q=4 kv=2
    dims     qk=16
    compress block=8 stride=8 pool=mlp
    select   block=16 top=2 initial=0 local=1
    window   size=5
}
""")


@pytest.fixture(scope="module")
def compiled():
    return {p.name: nsa_dsl.compile(p) for p in (FULL, MLP)}


def _against_reference(pattern, compiled, args, dtype):
    o, idx = compiled(**args, return_indices=True)
    assert torch.isfinite(o).all()
    want = nsa_dsl.reference(pattern, **upcast(args), indices=idx)
    assert torch.isfinite(want).all()
    err = rel_error(o, want)
    assert err < TOLERANCE[dtype], f"{pattern.name}: {err:.3e}"
    return idx


@pytest.mark.parametrize("name", ["extremes", "extremes_mlp"])
def test_length_one_forward_and_every_gradient(compiled, name):
    pattern = FULL if name == "extremes" else MLP
    args = random_inputs(pattern, 2, 1, DTYPE, seed=1, device=DEVICE)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
    o, idx = compiled[name](**leaves, return_indices=True)
    up = {n: t.detach().double().requires_grad_(True) for n, t in args.items()}
    want = nsa_dsl.reference(pattern, **up, indices=idx)
    assert rel_error(o, want) < TOLERANCE[DTYPE]
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    o.backward(do.to(o.dtype))
    want.backward(do.double())
    # One visible key: dq and dk are exactly 0, so their error is measured
    # against the size of the terms that cancel (verify's floor, NSA_MATH.md).
    floors = gradient_floors(pattern, args, do, {"indices": idx})
    for n in args:
        got, exact = leaves[n].grad, up[n].grad
        if exact is None:
            continue
        assert got is not None and torch.isfinite(got).all(), n
        assert rel_error(got, exact, floors[n]) < TOLERANCE[DTYPE], n


@pytest.mark.parametrize("name", ["extremes", "extremes_mlp"])
def test_huge_queries_and_keys_in_fp16(compiled, name):
    # |q|, |k| ~ 1e4: q.k reaches ~1e8 (far past fp16's 65504; the kernels
    # keep logits and softmax statistics in float32). The softmax is then one-hot-like.
    pattern = FULL if name == "extremes" else MLP
    args = random_inputs(pattern, 1, 45, torch.float16, seed=3, device=DEVICE)
    for n in ("q", "k", "k_cmp"):
        if n in args:
            args[n] = (args[n].float() * 1e4).half()
    idx = _against_reference(pattern, compiled[name], args, torch.float16)
    assert not selection_problems(pattern, upcast(args), idx, eps=1e-3)


def test_keys_of_minus_infinity_are_never_chosen_by_the_softmax(compiled):
    # Queries positive, some keys -inf in every dimension: their logits are
    # -inf (weight 0) wherever a finite key is visible too; position 0's key
    # stays finite so every row sees one.
    args = random_inputs(FULL, 1, 40, DTYPE, seed=4, device=DEVICE)
    args["q"] = args["q"].abs()
    args["k"][:, 5:40:3] = float("-inf")
    o, idx = compiled["extremes"](**args, return_indices=True)
    want = nsa_dsl.reference(FULL, **upcast(args), indices=idx)
    finite = torch.isfinite(want)
    assert finite.any()
    assert torch.isfinite(o[finite]).all(), "the kernels give a non-finite value where the reference is finite"
    assert rel_error(o[finite], want[finite]) < TOLERANCE[DTYPE]


@pytest.mark.parametrize("name", ["extremes", "extremes_mlp"])
def test_all_equal_keys_tie_every_score(compiled, name):
    pattern = FULL if name == "extremes" else MLP
    args = random_inputs(pattern, 1, 70, DTYPE, seed=5, device=DEVICE)
    for n in ("k", "k_cmp"):
        if n in args:
            args[n] = args[n][:, :1].expand_as(args[n]).contiguous()
    idx = _against_reference(pattern, compiled[name], args, DTYPE)
    assert not selection_problems(pattern, upcast(args), idx, eps=1e-5)
    # Every free score ties within rounding, so the lowest visible free blocks win (NSA_MATH.md's rule).
    _, want_idx = nsa_dsl.reference(pattern, **upcast(args), return_indices=True)
    assert torch.equal(idx.long(), want_idx.long())
