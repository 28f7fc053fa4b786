"""Queries of the last positions only: q [B, Tq] against k, v [B, T] with
Tq < T (a prompt piece after cached keys, a context-parallel shard), and
packed sequences with cu_seqlens_q (each sequence's queries its last
positions, flash-attn's bottom-right alignment).

The oracle is the float64 reference on the whole sequences: the output
at the query positions, and the gradients of a loss that weighs only
those positions (dO zero elsewhere), which are the call's dq (at its
rows), dk, dv (every position), the gates' (at its rows) and, for
pool=mlp, the compressed tokens'. Within NSA_MATH.md's float32
tolerance; the indices equal the reference's selection.

Shapes are drawn at the edges: one query, queries starting inside a
compression block, a selection block, a window and a kernel tile (tiles
of 16 here), and a sequence with no query at all in a packing."""
from __future__ import annotations

import functools

import pytest
import torch

import nsa_dsl
from nsa_dsl.reference import reference

from strategies import SMALL_PATTERNS, TOLERANCE, cu_seqlens_of, random_inputs, rel_error, upcast

PATTERNS = {
    **SMALL_PATTERNS,  # compression, selection, window; caller-pooled tokens
    "window": """
pattern offset_window {
    heads  q=2 kv=2
    dims   qk=16
    window size=9
}""",
}
TILES = {"CMP_BLOCK_M": 16, "CMP_BLOCK_N": 16, "SWA_BLOCK_M": 16, "SWA_BLOCK_N": 16,
         "CMP_BWD_BLOCK_M": 16, "CMP_BWD_BLOCK_N": 16, "CMP_BWD_DKDV_BLOCK_N": 16,
         "SWA_BWD_BLOCK_M": 16, "SWA_BWD_BLOCK_N": 16, "SWA_BWD_DKDV_BLOCK_N": 16}
DTYPE = torch.float32


@functools.lru_cache(maxsize=None)
def _compiled(name: str, dq_apart: bool = False):
    """dq_apart: the compressed and window dQ by two kernels (their own dq
    stages), not by the plan's one (cmp_swa_bwd_dq)."""
    pattern = nsa_dsl.parse(PATTERNS[name])
    kernels = nsa_dsl.check(pattern).kernels
    overrides = {k: v for k, v in TILES.items() if any(kp.has_const(k) for kp in kernels)}
    if dq_apart:
        overrides["CMP_BWD_DQ_STAGES"] = 1
    compiled = nsa_dsl.compile(pattern, overrides=overrides)
    compiled.poison = True  # every buffer a kernel fills starts as NaN
    return compiled


def _query_names(pattern) -> tuple:
    return ("q",) + tuple(f"g_{b.value}" for b in pattern.combined_branches)


def _expected(pattern, args: dict, do_full: torch.Tensor) -> tuple:
    """(o, indices, {name: gradient}) of the float64 reference on the whole
    sequences, dO = do_full (zero where there is no query)."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in upcast(args).items()}
    o, idx = reference(pattern, **leaves, return_indices=pattern.select is not None) if pattern.select else (
        reference(pattern, **leaves), None)
    o.backward(do_full.double())
    return o.detach(), idx, {n: t.grad for n, t in leaves.items()}


def _check(out, ref, what: str) -> None:
    err = rel_error(out, ref)
    assert err <= TOLERANCE[DTYPE], f"{what}: relative error {err:.3g} > {TOLERANCE[DTYPE]}"


@pytest.mark.parametrize("name, batch, T, Tq, own_window_kv", [
    ("paper", 2, 77, 1, False),     # one query (a decode step through the training kernels)
    ("paper", 1, 96, 45, False),    # from position 51: inside a compression block, a selection block, a tile
    ("paper", 2, 64, 48, True),     # from 16: on a tile and selection block boundary; k_swa, v_swa
    ("paper", 1, 40, 39, False),
    ("mlp", 2, 70, 23, False),
    ("mlp", 1, 33, 30, True),       # from 3: before the first compressed token
    ("window", 2, 50, 17, False),
])
def test_queries_of_the_last_positions_match_the_whole_sequence(name, batch, T, Tq, own_window_kv):
    compiled = _compiled(name)
    p = compiled.pattern
    args = random_inputs(p, batch, T, DTYPE, seed=T * 31 + Tq, separate_window_kv=own_window_kv)
    gen = torch.Generator().manual_seed(Tq)
    do = torch.randn(batch, Tq, p.heads.q, p.dims.v, generator=gen)
    do_full = torch.zeros(batch, T, p.heads.q, p.dims.v)
    do_full[:, T - Tq:] = do
    o_ref, idx_ref, grads_ref = _expected(p, args, do_full)

    leaves = {n: t.clone().requires_grad_(True) for n, t in args.items()}
    call = {n: (t[:, T - Tq:] if n in _query_names(p) else t) for n, t in leaves.items()}
    if p.select is not None:
        o, idx = compiled(**call, return_indices=True)
        assert idx.shape == (batch, Tq, p.heads.kv, p.select.top)
        assert torch.equal(idx.long(), idx_ref[:, T - Tq:].long())
    else:
        o = compiled(**call)
    assert o.shape == (batch, Tq, p.heads.q, p.dims.v) and o.dtype == DTYPE
    _check(o.detach(), o_ref[:, T - Tq:], "o")
    with torch.no_grad():  # nothing kept for a backward: the selection may write the gated output itself
        _check(compiled(**call), o_ref[:, T - Tq:], "o without gradients")
    o.backward(do)
    for n, t in leaves.items():
        assert t.grad is not None, n
        if n in _query_names(p):
            assert torch.equal(t.grad[:, :T - Tq], torch.zeros_like(t.grad[:, :T - Tq])), n
            _check(t.grad[:, T - Tq:], grads_ref[n][:, T - Tq:], f"d{n}")
        else:
            _check(t.grad, grads_ref[n], f"d{n}")


@pytest.mark.parametrize("name, lengths, queries, dq_apart", [
    ("paper", [50, 0, 37, 64, 20], [13, 0, 37, 1, 0], False),   # an empty sequence, one with all its queries, none
    ("paper", [50, 0, 37, 64, 20], [13, 0, 37, 1, 0], True),    # the same, cmp_bwd_dq and swa_bwd_dq apart
    ("window", [30, 41, 9], [29, 2, 9], False),
])
def test_packed_sequences_with_queries_of_their_last_positions(name, lengths, queries, dq_apart):
    """cu_seqlens_q: sequence s's queries are its last queries[s]
    positions; each equals the reference on that sequence alone."""
    compiled = _compiled(name, dq_apart)
    p = compiled.pattern
    cu, cu_q = cu_seqlens_of(lengths), cu_seqlens_of(queries)
    per_sequence = [random_inputs(p, 1, n, DTYPE, seed=7 + s) for s, n in enumerate(lengths)]
    packed = {}
    for n in per_sequence[0]:
        if n in _query_names(p):
            parts = [a[n][0, T - m:] for a, T, m in zip(per_sequence, lengths, queries)]
        else:
            parts = [a[n][0] for a in per_sequence]
        packed[n] = torch.cat(parts).requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(sum(queries), p.heads.q, p.dims.v, generator=gen)
    o = compiled(**packed, cu_seqlens=cu, cu_seqlens_q=cu_q)
    assert o.shape == (sum(queries), p.heads.q, p.dims.v)
    o.backward(do)
    for s, (a, T, m) in enumerate(zip(per_sequence, lengths, queries)):
        if T == 0:
            continue
        do_full = torch.zeros(1, T, p.heads.q, p.dims.v)
        do_full[0, T - m:] = do[cu_q[s]:cu_q[s + 1]]
        o_ref, _, grads_ref = _expected(p, a, do_full)
        if m:
            _check(o[cu_q[s]:cu_q[s + 1]].detach(), o_ref[0, T - m:], f"o of sequence {s}")
        for n, t in packed.items():
            rows = (cu_q[s], cu_q[s + 1]) if n in _query_names(p) else (cu[s], cu[s + 1])
            ref = grads_ref[n][0, T - m:] if n in _query_names(p) else grads_ref[n][0]
            if ref.numel():
                _check(t.grad[rows[0]:rows[1]], ref, f"d{n} of sequence {s}")


def test_more_queries_than_positions_is_a_value_error():
    compiled = _compiled("window")
    p = compiled.pattern
    args = random_inputs(p, 1, 30, DTYPE, seed=0)
    with pytest.raises(ValueError, match="cu_seqlens_q: sequence 1 has 12 queries but 10 positions"):
        compiled(args["q"][0, :17], args["k"][0], args["v"][0], cu_seqlens=cu_seqlens_of([20, 10]),
                 cu_seqlens_q=cu_seqlens_of([5, 12]))
    with pytest.raises(ValueError, match="cu_seqlens_q: only with cu_seqlens"):
        compiled(**args, cu_seqlens_q=cu_seqlens_of([30]))
    with pytest.raises(ValueError, match="cu_seqlens_q: 1 sequences, cu_seqlens has 2"):
        compiled(args["q"][0, :17], args["k"][0], args["v"][0], cu_seqlens=cu_seqlens_of([20, 10]),
                 cu_seqlens_q=cu_seqlens_of([17]))


@pytest.mark.parametrize("order", ["group-centric", "block-centric"])
def test_both_selection_loop_orders_deterministically(order):
    """The block-centric forward and the inverted-index dK/dV (the
    deterministic backward) take such queries too (their packed index
    carries each sequence's key row minus query row): against the
    reference, and bit-identical gradients from run to run."""
    pattern = nsa_dsl.parse(PATTERNS["paper"])
    compiled = nsa_dsl.compile(pattern, deterministic=True, slc_fwd=order)
    compiled.poison = True
    batch, T, Tq = 2, 90, 37
    args = random_inputs(pattern, batch, T, DTYPE, seed=4)
    do = torch.randn(batch, Tq, pattern.heads.q, pattern.dims.v, generator=torch.Generator().manual_seed(5))
    do_full = torch.zeros(batch, T, pattern.heads.q, pattern.dims.v)
    do_full[:, T - Tq:] = do
    o_ref, idx_ref, grads_ref = _expected(pattern, args, do_full)
    runs = []
    for _ in range(2):
        leaves = {n: t.clone().requires_grad_(True) for n, t in args.items()}
        call = {n: (t[:, T - Tq:] if n in _query_names(pattern) else t) for n, t in leaves.items()}
        o = compiled(**call)
        o.backward(do)
        runs.append((o.detach(), {n: t.grad for n, t in leaves.items()}))
    o, grads = runs[0]
    _check(o, o_ref[:, T - Tq:], "o")
    for n, g in grads.items():
        assert torch.equal(g, runs[1][1][n]), f"d{n} differs between two runs"
        _check(g[:, T - Tq:] if n in _query_names(pattern) else g,
               grads_ref[n][:, T - Tq:] if n in _query_names(pattern) else grads_ref[n], f"d{n}")
