"""Packed sequences (cu_seqlens, issue 21) through the flash-style branches:
cmp_pool, cmp_fwd and swa_fwd forward, cmp_bwd, swa_bwd and cmp_pool_bwd
backward (their VARLEN programs), on patterns with only these branches.

What is checked, for random packings that include empty sequences and
lengths at the edges of the compression block and of the window:
- the packed call, in both layouts ([total, ...] and [1, total, ...]),
  gives the same bits as each sequence run alone through the fixed-length
  path (outputs, and the gradients of q, k, v, the gates and, for
  pool=mlp, k_cmp and v_cmp): each program of a packed call runs the very
  tiles of the fixed-length call, rebased onto its sequence;
- the output is right against the float64 reference's packed mode within
  NSA_MATH.md's tolerance (fp32 1e-5, fp16 2e-3 relative);
- with tensor descriptors (CMP_TMA / SWA_TMA, which Triton's interpreter
  reads too) and with the pointer path: a descriptor read past a
  sequence's end sees the next sequence's keys (or the unused, NaN-poisoned
  rows of the pooled buffer), which must not leak in.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nsa_dsl
from nsa_dsl import launch
from nsa_dsl import varlen

from strategies import TOLERANCE, cu_seqlens_of, packed_inputs, rel_error

BLOCK, STRIDE, WINDOW = 8, 4, 9
PATTERNS = {
    "window": f"""
pattern packed_window {{
    heads  q=4 kv=2
    dims   qk=16 v=32
    window size={WINDOW}
}}""",
    "cmp_mean": f"""
pattern packed_cmp_mean {{
    heads    q=4 kv=2
    dims     qk=16
    compress block={BLOCK} stride={STRIDE} pool=mean
    combine  cmp
}}""",
    "cmp_mlp": f"""
pattern packed_cmp_mlp {{
    heads    q=4 kv=1
    dims     qk=16 v=32
    compress block={BLOCK} stride={STRIDE} pool=mlp
}}""",
    "cmp_window": f"""
pattern packed_cmp_window {{
    heads    q=2 kv=2
    dims     qk=16
    compress block={BLOCK} stride={STRIDE} pool=mean
    window   size={WINDOW}
}}""",
}
# Tiles of 16 so that ~100 positions span several tiles (open and masked
# ones, partial last tiles) in both directions.
TILES = {"CMP_BLOCK_M": 16, "CMP_BLOCK_N": 16, "SWA_BLOCK_M": 16, "SWA_BLOCK_N": 16,
         "CMP_BWD_BLOCK_M": 16, "CMP_BWD_BLOCK_N": 16, "CMP_BWD_DKDV_BLOCK_N": 16,
         "SWA_BWD_BLOCK_M": 16, "SWA_BWD_BLOCK_N": 16, "SWA_BWD_DKDV_BLOCK_N": 16}
# Lengths at the edges: empty, one position, one short of / exactly /
# one past a compression block (its first compressed token) and the window.
EDGE_LENGTHS = (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, WINDOW - 1, WINDOW, WINDOW + 1, 16, 17)


class _Pointers:
    """A compiled pattern whose forward reads k and v by addressed loads:
    the launchers' run-time fallback where descriptors cannot read the
    tensors (CMP_TMA / SWA_TMA are the plan's, on wherever legal)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __getattr__(self, name):
        return getattr(self.compiled, name)

    def __call__(self, *args, **kwargs):
        real = launch._tma_fits
        launch._tma_fits = lambda *tensors: False
        try:
            return self.compiled(*args, **kwargs)
        finally:
            launch._tma_fits = real


@functools.lru_cache(maxsize=None)
def _compiled(name: str, tma: bool, dq_apart: bool = False):
    """dq_apart: the compressed and window dQ by two kernels (their own dq
    stages), not by the plan's one (cmp_swa_bwd_dq)."""
    pattern = nsa_dsl.parse(PATTERNS[name])
    overrides = {k: v for k, v in TILES.items() if _has_const(pattern, k)}
    if dq_apart:
        overrides["CMP_BWD_DQ_STAGES"] = 1
    compiled = nsa_dsl.compile(pattern, overrides=overrides)
    compiled.poison = True  # every buffer a kernel fills starts as NaN
    return compiled if tma else _Pointers(compiled)


def _has_const(pattern, name: str) -> bool:
    return any(k.has_const(name) for k in nsa_dsl.check(pattern).kernels)


def _run(compiled, args: dict, do, **kwargs) -> tuple:
    """(output, {name: gradient}) of one call from fresh leaves."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in args.items()}
    o = compiled(**leaves, **kwargs)
    o.backward(do)
    return o.detach(), {n: t.grad for n, t in leaves.items()}


def _sequence_args(args: dict, cu: torch.Tensor, cu_c, s: int) -> dict:
    a, b = int(cu[s]), int(cu[s + 1])
    out = {}
    for n, t in args.items():
        if n in ("k_cmp", "v_cmp"):
            out[n] = t[int(cu_c[s]):int(cu_c[s + 1])][None]
        else:
            out[n] = t[a:b][None]
    return out


def _check_packing(name: str, lengths, dtype, seed: int, tma: bool, leading: bool, dq_apart: bool = False) -> None:
    compiled = _compiled(name, tma, dq_apart)
    pattern = compiled.pattern
    args, cu = packed_inputs(pattern, lengths, dtype, seed)
    total = int(cu[-1])
    cu_c = varlen.compressed_seqlens(pattern, cu) if pattern.compress is not None else None
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(total, pattern.heads.q, pattern.dims.v, generator=gen).to(dtype)

    # the packed call in the drawn layout, with gradients
    lay = (lambda t: t[None]) if leading else (lambda t: t)
    o, grads = _run(compiled, {n: lay(t) for n, t in args.items()}, lay(do), cu_seqlens=cu,
                    max_seqlen=max(lengths))
    o = o[0] if leading else o
    grads = {n: (g[0] if leading else g) for n, g in grads.items()}
    assert o.shape == (total, pattern.heads.q, pattern.dims.v) and o.dtype == dtype
    # ... and in the other layout, without (no max_seqlen: read from cu_seqlens)
    with torch.no_grad():
        other = compiled(**{n: (t if leading else t[None]) for n, t in args.items()}, cu_seqlens=cu)
    assert torch.equal(other if leading else other[0], o)

    # bitwise each sequence alone through the fixed-length path
    for s in range(len(lengths)):
        a, b = int(cu[s]), int(cu[s + 1])
        if a == b:
            continue
        o_s, grads_s = _run(compiled, _sequence_args(args, cu, cu_c, s), do[a:b][None])
        assert torch.equal(o[a:b], o_s[0]), f"output of sequence {s} ({lengths})"
        for n, g in grads_s.items():
            packed = (grads[n][int(cu_c[s]):int(cu_c[s + 1])] if n in ("k_cmp", "v_cmp") else grads[n][a:b])
            assert torch.equal(packed, g[0]), f"grad of {n}, sequence {s} ({lengths})"
    for n, g in grads.items():  # every row written, also of empty sequences' neighbours
        assert torch.isfinite(g).all(), f"grad of {n}"

    # right against the float64 reference's packed mode
    expected = nsa_dsl.reference(pattern, **{n: t.double() for n, t in args.items()}, cu_seqlens=cu)
    assert rel_error(o, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("name, tma", [(name, True) for name in sorted(PATTERNS)] + [("cmp_window", False)],
                         ids=lambda x: {True: "descriptors", False: "pointers"}.get(x, x))
def test_edge_lengths_packed_equal_each_sequence_alone(name, tma):
    """Every edge length once, an empty sequence first and last, fp32 (the
    random packings below draw the pointer path for every pattern too)."""
    lengths = (0,) + EDGE_LENGTHS[1:] + (0, 23)
    _check_packing(name, lengths, torch.float32, seed=len(name), tma=tma, leading=not tma)


def test_edge_lengths_packed_with_the_dq_kernels_apart():
    """As above with the compressed and window dQ by two kernels (the
    plan's one, cmp_swa_bwd_dq, above), fp16: each sequence bitwise alone,
    every row written."""
    lengths = (0,) + EDGE_LENGTHS[1:] + (0, 23)
    _check_packing("cmp_window", lengths, torch.float16, seed=7, tma=True, leading=False, dq_apart=True)


_length = st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 80))


@settings(max_examples=6, deadline=None)
@given(name=st.sampled_from(sorted(PATTERNS)),
       lengths=st.lists(_length, min_size=1, max_size=5).filter(lambda ls: sum(ls) > 0),
       dtype=st.sampled_from([torch.float32, torch.float16]), tma=st.booleans(), leading=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_packings_equal_each_sequence_alone_and_the_reference(name, lengths, dtype, tma, leading, seed):
    _check_packing(name, tuple(lengths), dtype, seed, tma, leading)


@pytest.mark.parametrize("dq_apart", [False, True], ids=["dq_paired", "dq_apart"])
def test_gradients_of_a_packed_call_match_the_reference(dq_apart):
    """fp32 gradients of a packed call of the compressed and window branches
    against float64 autograd through the reference's packed mode (their dQ
    by the plan's cmp_swa_bwd_dq, and by two kernels)."""
    compiled = _compiled("cmp_window", True, dq_apart)
    pattern = compiled.pattern
    args, cu = packed_inputs(pattern, (11, 0, 30, 1, 17), torch.float32, seed=5)
    do = torch.randn(int(cu[-1]), pattern.heads.q, pattern.dims.v, generator=torch.Generator().manual_seed(6))
    _, grads = _run(compiled, args, do, cu_seqlens=cu)
    up = {n: t.double().requires_grad_(True) for n, t in args.items()}
    nsa_dsl.reference(pattern, **up, cu_seqlens=cu).backward(do.double())
    for n, g in grads.items():
        assert rel_error(g, up[n].grad) < TOLERANCE[torch.float32], n


def test_descriptor_reads_past_a_sequence_see_nothing_of_the_next():
    """With tensor descriptors a sequence's last key tile reads on into the
    next sequence's keys: they must be masked. Poisoning the next
    sequence's keys and values with NaN (and inf) changes nothing in the
    sequence before it."""
    compiled = _compiled("cmp_window", True)
    pattern = compiled.pattern
    args, cu = packed_inputs(pattern, (21, 40), torch.float32, seed=9)
    with torch.no_grad():
        o = compiled(**args, cu_seqlens=cu)
        bad = dict(args)
        bad["k"], bad["v"] = args["k"].clone(), args["v"].clone()
        bad["k"][21:] = float("nan")
        bad["v"][21:] = float("inf")
        o_bad = compiled(**bad, cu_seqlens=cu)
    assert torch.equal(o[:21], o_bad[:21])
