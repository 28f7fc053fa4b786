"""Compiled kernels on a CUDA GPU (marked gpu; skipped on CPU-only
machines): the paper's pattern and a small-group pattern in bf16 and fp16 at
long lengths against the float64 reference, gradients, determinism, and a
64k run that must stay finite and within memory.

Set NSA_DSL_GPU_LOG=path to append one JSON line of measurements per check
(the committed record under benchmarks/results/ comes from that)."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import nsa_dsl
from nsa_dsl.geometry import num_blocks, visible_compressed
from nsa_dsl.ir import Branch, Pool
from nsa_dsl.launch_forward import select_block_centric
from nsa_dsl.validate import validate_inputs
from nsa_dsl.reference import compress_mean, overlap_weights
from strategies import TOLERANCE, derived_overrides, random_inputs, rel_error, upcast

pytestmark = pytest.mark.gpu

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
PAPER = os.path.join(EXAMPLES, "deepseek_nsa.nsa")
SMALL_GROUP_TEXT = """
pattern small_group {
    heads    q=16 kv=8
    dims     qk=128
    compress block=32 stride=16 pool=mean
    select   block=64 top=16 initial=1 local=2
    window   size=512
}
"""


def _log(record: dict) -> None:
    path = os.environ.get("NSA_DSL_GPU_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _patterns():
    return {"deepseek_nsa": nsa_dsl.load(PAPER), "small_group": nsa_dsl.parse(SMALL_GROUP_TEXT),
            "small_group_wide": nsa_dsl.parse(SMALL_GROUP_TEXT.replace("top=16", "top=20").replace(
                "block=32 stride=16", "block=96 stride=16")),
            "bench_paper128": nsa_dsl.load(os.path.join(EXAMPLES, "bench_paper128.nsa"))}


def _chunked_reference(pattern, args, indices, chunk):
    up = upcast(args)
    up["indices"] = indices
    with torch.no_grad():
        return nsa_dsl.reference(pattern, **up, query_chunk=chunk)


def _sampled_selection_check(pattern, args, indices, rows=64, eps=0.05):
    """The selection rule on a sample of positions (scores in float64 from
    the same inputs): forced blocks present, count right, and no unchosen
    visible block scoring above a chosen free one by more than eps (bf16
    inputs move near-ties)."""
    s = pattern.select
    T = args["q"].shape[1]
    up = upcast(args)
    k_cmp = up["k_cmp"] if pattern.compress.pool is Pool.MLP else compress_mean(up["k"], pattern.compress.block,
                                                                                 pattern.compress.stride)
    positions = torch.linspace(0, T - 1, rows).long().unique()
    c = pattern.compress
    G = pattern.group
    scale = pattern.dims.qk ** -0.5
    n_blocks = num_blocks(T, s.block)
    W = overlap_weights(c.block, c.stride, s.block, k_cmp.shape[1], n_blocks, dtype=torch.float64,
                        device=k_cmp.device)
    worst_violation = 0.0
    for t in positions.tolist():
        n_vis = visible_compressed(t, c.block, c.stride)
        cur = t // s.block
        forced = {j for j in range(cur + 1) if j < s.initial or j > cur - s.local}
        for h in range(pattern.heads.kv):
            # Block scores of row (t, kv head h), straight from NSA_MATH.md.
            q_rows = up["q"][0, t, h * G:(h + 1) * G]  # [G, Dqk]
            if n_vis:
                p = torch.softmax(scale * q_rows @ k_cmp[0, :n_vis, h].T, dim=-1)  # [G, n_vis]
                S = (p.sum(0) @ W[:n_vis]).tolist()
            else:
                S = [0.0] * n_blocks
            chosen = [j for j in indices[0, t, h].tolist() if j >= 0]
            assert len(chosen) == min(s.top, cur + 1)
            assert forced <= set(chosen)
            free = [j for j in chosen if j not in forced]
            left = [j for j in range(cur + 1) if j not in chosen]
            if free and left:
                gap = max(S[j] for j in left) - min(S[j] for j in free)
                worst_violation = max(worst_violation, gap)
    assert worst_violation <= eps, f"an unchosen block outscored a chosen one by {worst_violation}"
    return worst_violation


@pytest.mark.parametrize("name", ["deepseek_nsa", "small_group"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("length", [1024, 8192, 32768])
def test_forward_matches_reference(name, dtype, length):
    pattern = _patterns()[name]
    args = random_inputs(pattern, 1, length, dtype, seed=length, device="cuda")
    compiled = nsa_dsl.compile(pattern)
    compiled.poison = True
    torch.cuda.synchronize()
    start = time.time()
    o, indices = compiled(**args, return_indices=True)
    torch.cuda.synchronize()
    elapsed = time.time() - start
    assert torch.isfinite(o).all()
    expected = _chunked_reference(pattern, args, indices, chunk=1024 if length <= 8192 else 512)
    err = rel_error(o, expected)
    violation = _sampled_selection_check(pattern, args, indices, rows=16 if length > 8192 else 48)
    _log({"test": "forward", "pattern": name, "dtype": str(dtype), "T": length, "rel_err": err,
          "tolerance": TOLERANCE[dtype], "max_score_gap": violation, "first_call_s": elapsed})
    assert err < TOLERANCE[dtype], f"{name} {dtype} T={length}: relative error {err:.3e}"


@pytest.mark.parametrize("name", ["deepseek_nsa", "small_group"])
@pytest.mark.parametrize("order", ["group-centric", "block-centric"])
def test_both_selection_loop_orders_match_reference_bf16(name, order):
    """Whichever order the plan picks, the other one is also right compiled
    (given the same blocks)."""
    pattern = _patterns()[name]
    args = random_inputs(pattern, 1, 8192, torch.bfloat16, seed=77, device="cuda")
    compiled = nsa_dsl.compile(pattern, slc_fwd=order)
    compiled.poison = True
    o, indices = compiled(**args, return_indices=True)
    assert torch.isfinite(o).all()
    err = rel_error(o, _chunked_reference(pattern, args, indices, chunk=1024))
    _log({"test": "forward_loop_order", "pattern": name, "order": order, "plan_order": compiled.plan.loop_order_at(8192),
          "dtype": "bf16", "T": 8192, "rel_err": err, "tolerance": TOLERANCE[torch.bfloat16]})
    assert err < TOLERANCE[torch.bfloat16], f"{name} {order}: relative error {err:.3e}"


def test_block_centric_forward_is_bit_identical_and_slices_agree():
    """The block-centric forward reduces per-slot partials in slot order (no
    atomics): two runs give the same bits, and so does a run in slices of
    1024 positions (BC_SLICE, the plan's: ~32k positions here), which
    shares one inverted index."""
    pattern = _patterns()["small_group"]
    args = random_inputs(pattern, 1, 8192, torch.bfloat16, seed=81, device="cuda")
    compiled = nsa_dsl.compile(pattern, slc_fwd="block-centric")
    with derived_overrides():
        sliced = nsa_dsl.compile(pattern, slc_fwd="block-centric", overrides={"BC_SLICE": 1024})
    o, indices = compiled(**args, return_indices=True)
    again = compiled(**args, indices=indices)
    in_slices = sliced(**args, indices=indices)
    err = rel_error(o, _chunked_reference(pattern, args, indices, chunk=1024))
    _log({"test": "block_centric_bits", "pattern": "small_group", "T": 8192, "rel_err": err,
          "bit_identical": bool(torch.equal(o, again)), "slices_equal": bool(torch.equal(o, in_slices))})
    assert torch.equal(o, again) and torch.equal(o, in_slices)
    assert err < TOLERANCE[torch.bfloat16]


def test_block_centric_selection_never_waits_for_the_device():
    """The block-centric forward's index, chunking and launches are queued
    without reading anything back to the host (torch's sync debug mode
    raises on any device-to-host synchronisation)."""
    pattern = _patterns()["small_group"]
    args = random_inputs(pattern, 1, 8192, torch.bfloat16, seed=82, device="cuda")
    with derived_overrides():  # four slices
        compiled = nsa_dsl.compile(pattern, slc_fwd="block-centric", overrides={"BC_SLICE": 2048})
    _, indices = compiled(**args, return_indices=True)  # compiles the kernels, makes the blocks
    no_gates = {b: None for b in Branch}
    shapes = validate_inputs(pattern, args["q"], args["k"], args["v"], no_gates, indices=indices)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o_slc, lse_slc, _ = select_block_centric(compiled, q=args["q"], k=args["k"], v=args["v"], indices=indices,
                                                 qk_scale_log2=0.1, shapes=shapes, final_from=None, gates=no_gates)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(o_slc).all() and lse_slc.shape == (1, pattern.heads.q, 8192)


def test_selection_backward_never_waits_for_the_device():
    """The selection's dK/dV pass (inverted index, chunking, launches) is
    queued without reading anything back to the host: the chunk buffers are
    sized for the most chunks the index can have (torch's sync debug mode
    raises on any device-to-host synchronisation)."""
    pattern = _patterns()["small_group"]
    args = random_inputs(pattern, 1, 4096, torch.bfloat16, seed=83, device="cuda")
    compiled = nsa_dsl.compile(pattern)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
    o, _ = compiled(**leaves, return_indices=True)
    do = torch.randn_like(o)
    o.backward(do)  # compiles the backward kernels
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
    o, _ = compiled(**leaves, return_indices=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o.backward(do)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(t.grad).all() for t in leaves.values())


def test_selection_union_list_matches_reference_bf16():
    """SLC_FWD_LIST=1 (the union as a list, a pipelined counted loop) on the
    paper's pattern: right in bf16 and equal to the while-walk's output."""
    pattern = _patterns()["deepseek_nsa"]
    args = random_inputs(pattern, 1, 8192, torch.bfloat16, seed=78, device="cuda")
    walk = nsa_dsl.compile(pattern)
    listed = nsa_dsl.compile(pattern, overrides={"SLC_FWD_LIST": 1})
    listed.poison = True
    o_walk, indices = walk(**args, return_indices=True)
    o_list = listed(**args, indices=indices)
    assert torch.isfinite(o_list).all()
    err = rel_error(o_list, _chunked_reference(pattern, args, indices, chunk=1024))
    diff = rel_error(o_list, o_walk)
    _log({"test": "forward_union_list", "pattern": "deepseek_nsa", "dtype": "bf16", "T": 8192, "rel_err": err,
          "rel_diff_to_walk": diff, "tolerance": TOLERANCE[torch.bfloat16]})
    assert err < TOLERANCE[torch.bfloat16]
    assert diff < 4e-3, "same blocks in the same order: the outputs should agree to bf16 rounding"
    # SLC_BWD_DQ_LIST: the selection dq over the same list; gradients as the
    # walk's; and with two positions a program on 2 warps, its loop prefetched
    grads = []
    for overrides in ({}, {"SLC_FWD_LIST": 1, "SLC_BWD_DQ_LIST": 1, "slc_bwd.num_stages": 2},
                      {"SLC_BWD_DQ_TOKENS": 2, "SLC_BWD_DQ_LIST": 1, "SLC_BWD_DQ_WARPS": 2, "SLC_BWD_DQ_STAGES": 3}):
        c = nsa_dsl.compile(pattern, overrides=overrides)
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items() if isinstance(t, torch.Tensor)}
        out = c(**leaves, indices=indices)
        out.backward(torch.ones_like(out))
        grads.append({n: t.grad.float() for n, t in leaves.items()})
    for variant in grads[1:]:
        diffs = {n: rel_error(variant[n], g) for n, g in grads[0].items()}
        _log({"test": "backward_union_list", "pattern": "deepseek_nsa", "dtype": "bf16", "T": 8192, "rel_diff": diffs})
        assert max(diffs.values()) < 4e-3, diffs


@pytest.mark.parametrize("name, overrides", [
    # the plan's scoring: 16 positions x 16 heads (deepseek_nsa, paper128:
    # the heads summed in-thread, the strided overlap, the sorted merge on
    # int32 keys, the causal mask skipped with two local blocks), 32
    # positions x 2 heads (small_group)
    ("deepseek_nsa", {}), ("small_group", {}), ("bench_paper128", {}),
    # tiles the tuner may pick: 16 x 16 rows on 8 warps, 8 or 2 positions
    # (the broadcast path; 2: the heads summed across lanes)
    ("deepseek_nsa", {"slc_topk.num_warps": 8}),
    ("deepseek_nsa", {"TOPK_TOKENS": 8}),
    ("deepseek_nsa", {"TOPK_TOKENS": 2}),
    # a top set wider than the 16-block chunks (their keys widened), compressed
    # tokens reaching two blocks on (the overlap by products)
    ("small_group_wide", {}),
])
def test_block_scoring_bf16(name, overrides):
    """The scoring's paths, as the plan decides them for these patterns and
    the tiles the tuner may pick, compiled: their blocks obey the selection
    rule and the forward with them matches the reference."""
    pattern = _patterns()[name]
    args = random_inputs(pattern, 1, 8192, torch.bfloat16, seed=79, device="cuda")
    compiled = nsa_dsl.compile(pattern, overrides=overrides)
    compiled.poison = True
    o, indices = compiled(**args, return_indices=True)
    assert torch.isfinite(o).all() and (indices >= -1).all()
    err = rel_error(o, _chunked_reference(pattern, args, indices, chunk=1024))
    violation = _sampled_selection_check(pattern, args, indices, rows=48)
    _log({"test": "block_scoring", "pattern": name, "overrides": overrides, "dtype": "bf16", "T": 8192, "rel_err": err,
          "max_score_gap": violation, "tolerance": TOLERANCE[torch.bfloat16]})
    assert err < TOLERANCE[torch.bfloat16]


def _bf16_gradient_errors(pattern, length, seed, overrides=None):
    """Relative error of every input's gradient (bf16 kernels) against
    float64 autograd of the reference given the kernel's own blocks."""
    args = random_inputs(pattern, 1, length, torch.bfloat16, seed=seed, device="cuda")
    for t in args.values():
        t.requires_grad_(True)
    compiled = nsa_dsl.compile(pattern, overrides=overrides)
    o, indices = compiled(**args, return_indices=True)
    do = torch.randn_like(o)
    o.backward(do)
    # From 8k the reference's float64 autograd graph outgrows an H100 (64
    # heads: 72 GB and out of memory on 80; it fit the H200's 141), so there
    # it runs in float32 (tf32 off): its error, ~1e-6, is four orders under
    # bf16's tolerance, and it needs half the memory.
    ref_dtype = torch.float64 if length < 8192 else torch.float32
    assert not torch.backends.cuda.matmul.allow_tf32
    up = {n: t.detach().to(ref_dtype).requires_grad_(True) for n, t in args.items()}
    ref = nsa_dsl.reference(pattern, **up, indices=indices, query_chunk=1024)
    ref.backward(do.to(ref_dtype))
    return {n: rel_error(args[n].grad, up[n].grad) for n in args}


@pytest.mark.parametrize("name", ["deepseek_nsa", "small_group"])
@pytest.mark.parametrize("length", [1024, 8192])
def test_gradients_match_reference_bf16(name, length):
    errors = _bf16_gradient_errors(_patterns()[name], length, seed=length + 1)
    _log({"test": "gradients", "pattern": name, "dtype": "bf16", "T": length, "rel_err": errors})
    for n, err in errors.items():
        assert err < TOLERANCE[torch.bfloat16], f"grad of {n}: relative error {err:.3e}"


@pytest.mark.parametrize("order", ["group-centric", "block-centric"])
@pytest.mark.parametrize("name", ["bench_paper128", "small_group"])
def test_queries_of_the_last_positions_bf16(name, order):
    """q of the last 3001 of 8192 positions (a prompt piece after cached
    keys, a context-parallel shard; starting inside every tile) against k,
    v of all of them, in both selection loop orders: the output and every
    gradient against the float32 reference on the whole sequence with dO
    zero before the queries, the kernels' blocks those of the whole call's
    scoring."""
    pattern, T, Tq = _patterns()[name], 8192, 3001
    args = random_inputs(pattern, 1, T, torch.bfloat16, seed=11, device="cuda")
    compiled = nsa_dsl.compile(pattern, slc_fwd=order)
    query_side = {"q"} | {f"g_{b.value}" for b in pattern.combined_branches}
    leaves = {n: t.clone().requires_grad_(True) for n, t in args.items()}
    o, idx = compiled(**{n: (t[:, T - Tq:] if n in query_side else t) for n, t in leaves.items()},
                      return_indices=True)
    whole = compiled.select_blocks(args["q"], args["k"], args["v"])
    assert torch.equal(idx, whole[:, T - Tq:])
    do = torch.randn_like(o)
    o.backward(do)
    up = {n: t.detach().float().requires_grad_(True) for n, t in args.items()}
    ref = nsa_dsl.reference(pattern, **up, indices=whole, query_chunk=1024)
    do_full = torch.zeros_like(ref)
    do_full[:, T - Tq:] = do.float()
    ref.backward(do_full)
    errors = {"o": rel_error(o.detach(), ref.detach()[:, T - Tq:])}
    for n, t in leaves.items():
        errors[f"d{n}"] = (rel_error(t.grad[:, T - Tq:], up[n].grad[:, T - Tq:]) if n in query_side
                           else rel_error(t.grad, up[n].grad))
    _log({"test": "query offset", "pattern": name, "order": order, "dtype": "bf16", "T": T, "Tq": Tq,
          "rel_err": errors})
    for n, err in errors.items():
        assert err < TOLERANCE[torch.bfloat16], f"{n}: relative error {err:.3e}"


@pytest.mark.parametrize("overrides", [
    {},
    {"CMP_BWD_DKDV_BLOCK_N": 128, "CMP_BWD_DKDV_WARPS": 8, "SWA_BWD_DKDV_BLOCK_N": 128, "SWA_BWD_DKDV_WARPS": 8},
    {"CMP_BWD_DKDV_BLOCK_N": 64, "CMP_BWD_DKDV_WARPS": 8, "SWA_BWD_DKDV_BLOCK_N": 32, "SWA_BWD_DKDV_WARPS": 4},
    {"SLC_BWD_KEYS_MAJOR": 1},
    {"CMP_BWD_DQ_STAGES": 1},
], ids=["plan", "dkdv128w8", "dkdv64w8", "slc_keys_major", "dq_apart"])
def test_paper128_gradients_with_dkdv_tiles_bf16(overrides):
    """The keys-major dK/dV kernels compiled for Hopper with the key tiles
    and warps the tuner may pick (two warpgroups on 128 keys among them),
    the selection's keys-major dK/dV (SLC_BWD_KEYS_MAJOR), and the
    compressed and window dQ by two kernels (the plan's one,
    cmp_swa_bwd_dq, where their dq stages differ)."""
    pattern = nsa_dsl.load(os.path.join(EXAMPLES, "bench_paper128.nsa"))
    errors = _bf16_gradient_errors(pattern, 4096, seed=11, overrides=overrides)
    _log({"test": "gradients_dkdv_tiles", "pattern": "bench_paper128", "overrides": overrides, "dtype": "bf16",
          "T": 4096, "rel_err": errors})
    for n, err in errors.items():
        assert err < TOLERANCE[torch.bfloat16], f"grad of {n}: relative error {err:.3e}"


@pytest.mark.parametrize("name, overrides", [
    ("bench_paper128", {"SLC_FWD_WINDOW": 1}),
    # the tuned paper128 selection forward (list, 3 stages) with the fold
    ("bench_paper128", {"SLC_FWD_WINDOW": 1, "SLC_FWD_LIST": 1, "slc_fwd.num_stages": 3}),
    ("deepseek_nsa", {"SLC_FWD_WINDOW": 1}),
    # block-centric: the window in the slot reduction's programs
    ("bench_paper128", {"SLC_FWD_ORDER": 1, "BC_FOLD_WINDOW": 1}),
    ("deepseek_nsa", {"SLC_FWD_ORDER": 1, "BC_FOLD_WINDOW": 1}),
    # ... and the forced blocks attended there (indices from the scoring)
    ("bench_paper128", {"SLC_FWD_ORDER": 1, "BC_FOLD_WINDOW": 1, "BC_MERGE_FORCED": 1}),
    ("deepseek_nsa", {"SLC_FWD_ORDER": 1, "BC_FOLD_WINDOW": 1, "BC_MERGE_FORCED": 1}),
    # ... with the local blocks' key tiles scored once for both (descriptors
    # for the forced blocks' keys, as paper128's record)
    ("bench_paper128", {"SLC_FWD_ORDER": 1, "BC_FOLD_WINDOW": 1, "BC_MERGE_FORCED": 1, "BC_LOCAL_IN_WINDOW": 1,
                        "BC_FORCED_TMA": 1}),
    ("deepseek_nsa", {"SLC_FWD_ORDER": 1, "BC_FOLD_WINDOW": 1, "BC_MERGE_FORCED": 1, "BC_LOCAL_IN_WINDOW": 1}),
], ids=["paper128", "paper128_list", "deepseek_nsa", "paper128_bc", "deepseek_nsa_bc", "paper128_bc_forced",
        "deepseek_nsa_bc_forced", "paper128_bc_local", "deepseek_nsa_bc_local"])
def test_window_folded_into_selection_bf16(name, overrides):
    """SLC_FWD_WINDOW (group-centric) and BC_FOLD_WINDOW (block-centric)
    compiled for Hopper: the window branch computed by the selection
    forward's programs, output and every gradient (the backward
    reads its o_swa and lse_swa) against float64. Without gradients the
    same kernel writes the gated output itself (WRITE_FINAL): it must match
    the training call's output (combine's sum of the stored branches)."""
    pattern = nsa_dsl.load(os.path.join(EXAMPLES, f"{name}.nsa"))
    args = random_inputs(pattern, 1, 8192, torch.bfloat16, seed=23, device="cuda")
    compiled = nsa_dsl.compile(pattern, overrides=overrides)
    compiled.poison = True
    assert compiled.writes_final_output(8192)
    o, indices = compiled(**args, return_indices=True)  # no gradient: WRITE_FINAL
    assert torch.isfinite(o).all()
    err = rel_error(o, _chunked_reference(pattern, args, indices, chunk=1024))
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
    diff = rel_error(o, compiled(**leaves, indices=indices).detach())
    errors = _bf16_gradient_errors(pattern, 2048, seed=12, overrides=overrides)
    _log({"test": "window_folded", "pattern": name, "overrides": overrides, "dtype": "bf16", "T": 8192,
          "rel_err": err, "rel_diff_to_combine": diff, "grad_T": 2048, "grad_rel_err": errors})
    assert err < TOLERANCE[torch.bfloat16], f"forward: relative error {err:.3e}"
    assert diff < 4e-3, "the same sum, the branches rounded to bf16 or not: within bf16 rounding"
    for n, e in errors.items():
        assert e < TOLERANCE[torch.bfloat16], f"grad of {n}: relative error {e:.3e}"


@pytest.mark.parametrize("name, order", [
    ("bench_paper128", {"SLC_FWD_ORDER": 0}), ("deepseek_nsa", {"SLC_FWD_ORDER": 0}),
    ("bench_small_group", {"SLC_FWD_ORDER": 0}),
    # the window in the group-centric selection's programs (SLC_FWD_WINDOW)
    ("bench_paper128", {"SLC_FWD_ORDER": 0, "SLC_FWD_WINDOW": 1}),
    # the window in the block-centric merge's programs (SWA_TMA there)
    ("bench_paper128", {"SLC_FWD_ORDER": 1, "BC_FOLD_WINDOW": 1, "BC_MERGE_FORCED": 1, "BC_FORCED_TMA": 1}),
], ids=["paper128", "deepseek_nsa", "small_group", "paper128_fold", "paper128_merge"])
def test_kv_through_tensor_descriptors_bf16(name, order, monkeypatch):
    """The descriptor paths compiled for Hopper (TMA copies into shared
    memory): CMP_TMA, SWA_TMA and TOPK_TMA as the plan has them, SLC_TMA and
    BC_FORCED_TMA asked for. The forward against float64 (and the blocks the
    scoring chose against the float64 block scores) and against the pointer
    path (the launchers' run-time fallback, here forced) on its own scoring, then
    every gradient (the backward reads the branches' o and lse)."""
    from nsa_dsl import launch

    pattern = nsa_dsl.load(os.path.join(EXAMPLES, f"{name}.nsa"))
    flags = {"SLC_TMA": 1, **order}
    args = random_inputs(pattern, 1, 8192, torch.bfloat16, seed=31, device="cuda")
    compiled = nsa_dsl.compile(pattern, overrides=flags)
    compiled.poison = True
    o, indices = compiled(**args, return_indices=True)
    assert torch.isfinite(o).all()
    err = rel_error(o, _chunked_reference(pattern, args, indices, chunk=1024))
    _sampled_selection_check(pattern, args, indices, rows=32)
    # scored by the pointer path too: with given indices the merge would
    # not attend the forced blocks itself (BC_MERGE_FORCED is for the
    # plan's own scoring) and would sum in another order (1.4e-3 apart on
    # the H200, session 10), not the comparison meant here
    with monkeypatch.context() as patch:
        patch.setattr(launch, "_tma_fits", lambda *tensors: False)
        o_pointers, indices_pointers = compiled(**args, return_indices=True)
    assert torch.equal(indices, indices_pointers), "the scoring chose other blocks through descriptors"
    diff = rel_error(o, o_pointers)
    errors = _bf16_gradient_errors(pattern, 2048, seed=32, overrides=flags)
    _log({"test": "kv_tensor_descriptors", "pattern": name, "order": order, "dtype": "bf16", "T": 8192, "rel_err": err,
          "rel_diff_to_pointers": diff, "grad_T": 2048, "grad_rel_err": errors})
    assert err < TOLERANCE[torch.bfloat16], f"forward: relative error {err:.3e}"
    assert diff < 1e-3, f"the same products as the pointer path: relative difference {diff:.3e}"
    for n, e in errors.items():
        assert e < TOLERANCE[torch.bfloat16], f"grad of {n}: relative error {e:.3e}"


@pytest.mark.parametrize("strategy", ["inverted-index", "atomic"])
def test_selection_key_gradients_strategies_agree(strategy):
    pattern = _patterns()["small_group"]
    args = random_inputs(pattern, 1, 4096, torch.bfloat16, seed=5, device="cuda")
    for t in args.values():
        t.requires_grad_(True)
    o, idx = nsa_dsl.compile(pattern, slc_dkdv=strategy)(**args, return_indices=True)
    do = torch.randn_like(o)
    o.backward(do)
    up = {n: t.detach().double().requires_grad_(True) for n, t in args.items()}
    ref = nsa_dsl.reference(pattern, **up, indices=idx, query_chunk=1024)
    ref.backward(do.double())
    for n in ("k", "v"):
        assert rel_error(args[n].grad, up[n].grad) < TOLERANCE[torch.bfloat16]


def test_deterministic_gradients_are_bit_identical():
    pattern = _patterns()["deepseek_nsa"]
    args = random_inputs(pattern, 1, 8192, torch.bfloat16, seed=11, device="cuda")
    compiled = nsa_dsl.compile(pattern, deterministic=True)
    do = None
    grads = []
    for _ in range(3):
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
        o = compiled(**leaves)
        if do is None:
            do = torch.randn_like(o)
        o.backward(do)
        grads.append({n: t.grad.clone() for n, t in leaves.items()})
    for n in grads[0]:
        for other in grads[1:]:
            assert torch.equal(grads[0][n], other[n]), f"grad of {n} differs between runs"


def test_64k_forward_is_finite_and_fits():
    pattern = _patterns()["deepseek_nsa"]
    length = 65536
    args = random_inputs(pattern, 1, length, torch.bfloat16, seed=64, device="cuda")
    compiled = nsa_dsl.compile(pattern)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o = compiled(**args)
    torch.cuda.synchronize()
    peak_extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    inputs_gb = sum(t.numel() * t.element_size() for t in args.values()) / 2**30
    _log({"test": "forward_64k", "pattern": "deepseek_nsa", "T": length, "finite": bool(torch.isfinite(o).all()),
          "peak_extra_gb": peak_extra, "inputs_gb": inputs_gb})
    assert torch.isfinite(o).all()
    # A [T, Tc] float matrix per head would be 64 * 65536 * 4095 * 4 bytes = 68 GB;
    # the kernels need only branch outputs, statistics and indices.
    assert peak_extra < 4 * inputs_gb


def test_a_decode_step_replays_in_a_cuda_graph():
    """A decode step captured in a CUDA graph: each replay (fresh
    inputs copied into the captured buffers) gives the eager step's output
    and advances the cache as the eager steps do (bf16, paper128 at a 4k
    context, a ragged batch of 3)."""
    pattern = nsa_dsl.load("examples/bench_paper128.nsa")
    compiled = nsa_dsl.compile(pattern)
    eager_cache, graph_cache = (compiled.new_cache(3, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for cache in (eager_cache, graph_cache):
        for s, n in enumerate((4096, 1000, 3333)):
            compiled.prefill(**random_inputs(pattern, 1, n, torch.bfloat16, seed=s, device="cuda"), cache=cache,
                             slots=[s])
    static_in = random_inputs(pattern, 3, 1, torch.bfloat16, seed=99, device="cuda")
    with torch.no_grad():
        warm = compiled.new_cache(3, 8192, device="cuda", dtype=torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, lazy init)
            compiled.decode(**static_in, cache=warm)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = compiled.decode(**static_in, cache=graph_cache)
        # capture records without running: the device lengths did not move,
        # the host's count (advanced by the call) goes back
        graph_cache.host_lengths = [n - 1 for n in graph_cache.host_lengths]
        for t in range(5):
            fresh = random_inputs(pattern, 3, 1, torch.bfloat16, seed=200 + t, device="cuda")
            for n, x in fresh.items():
                static_in[n].copy_(x)
            graph.replay()
            eager = compiled.decode(**fresh, cache=eager_cache)
            assert rel_error(static_out, eager) < TOLERANCE[torch.bfloat16]
    torch.cuda.synchronize()
    assert torch.equal(graph_cache.lengths, eager_cache.lengths)
    assert graph_cache.lengths.tolist() == [4101, 1005, 3338]


def test_decode_steps_with_dependent_launch_equal_those_without():
    """DEC_PDL_MAX_BATCH: each decode kernel launched to overlap the
    previous one's end, waiting for it inside, for steps of at most that
    many sequences (the plan's: 1). Its steps, eager and replayed from a
    CUDA graph, must be bitwise the plain launches' (bf16, paper128, a
    ragged batch of 3 at 4k contexts, 4 steps)."""
    from nsa_dsl import launch_decode

    pattern = nsa_dsl.load("examples/bench_paper128.nsa")
    plain = nsa_dsl.compile(pattern, overrides={"DEC_PDL_MAX_BATCH": 0})
    pdl = nsa_dsl.compile(pattern, overrides={"DEC_PDL_MAX_BATCH": 3})
    cuda = torch.device("cuda")
    assert launch_decode.pdl_launch(pdl, cuda, 3)["PDL"] and not launch_decode.pdl_launch(pdl, cuda, 4)["PDL"]
    assert launch_decode.pdl_launch(plain, cuda, 1) == {"PDL": False}
    default = nsa_dsl.compile(pattern)  # on for one sequence only
    assert launch_decode.pdl_launch(default, cuda, 1)["PDL"] and not launch_decode.pdl_launch(default, cuda, 2)["PDL"]
    caches = [c.new_cache(3, 8192, device="cuda", dtype=torch.bfloat16) for c in (plain, pdl, pdl)]
    with torch.no_grad():
        for compiled, cache in zip((plain, pdl, pdl), caches):
            for s, n in enumerate((4096, 1000, 3333)):
                compiled.prefill(**random_inputs(pattern, 1, n, torch.bfloat16, seed=s, device="cuda"),
                                 cache=cache, slots=[s])
        static_in = random_inputs(pattern, 3, 1, torch.bfloat16, seed=99, device="cuda")
        warm = pdl.new_cache(3, 8192, device="cuda", dtype=torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            pdl.decode(**static_in, cache=warm)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = pdl.decode(**static_in, cache=caches[2])
        caches[2].host_lengths = [n - 1 for n in caches[2].host_lengths]
        for t in range(4):
            fresh = random_inputs(pattern, 3, 1, torch.bfloat16, seed=300 + t, device="cuda")
            want = plain.decode(**fresh, cache=caches[0])
            assert torch.equal(pdl.decode(**fresh, cache=caches[1]), want)
            for n, x in fresh.items():
                static_in[n].copy_(x)
            graph.replay()
            assert torch.equal(static_out, want)
    torch.cuda.synchronize()
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == caches[2].lengths.tolist() == [4100, 1004, 3337]


@pytest.mark.parametrize("sums", [False, True], ids=["raw scores", "block sums"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("name", ["bench_paper128", "deepseek_nsa"])
def test_decode_kernels_give_the_full_forward_bf16(name, paged, sums):
    """A prompt of 8k through the cache, then decode steps through the
    decode kernels (launch_decode.decode_step) against the compiled full
    forward at those positions on the same blocks (a near-tie may flip a
    block between the two scorings). paged: pages of four selection
    blocks, shuffled in the pool. sums: dec_topk scoring from dec_cmp's
    block sums (DEC_BLOCK_SUMS)."""
    _decode_against_the_full_forward(name, 8192, paged, sums)


@pytest.mark.parametrize("name, prompt", [("bench_paper128", 32768), ("bench_paper128", 131072),
                                          ("deepseek_nsa", 131072)])
def test_decode_kernels_give_the_full_forward_at_long_contexts_bf16(name, prompt):
    """As above at 32k and 128k (the plan's scoring, a contiguous cache):
    the step's splits across the context and its top-n over thousands of
    blocks, against the full forward."""
    _decode_against_the_full_forward(name, prompt, paged=False, sums=None)


def _decode_against_the_full_forward(name, prompt, paged, sums):
    from nsa_dsl.geometry import num_compressed

    pattern = _patterns()[name]
    compiled = nsa_dsl.compile(pattern, overrides={} if sums is None else {"DEC_BLOCK_SUMS": int(sums)})
    steps = 4
    args = random_inputs(pattern, 2, prompt + steps, torch.bfloat16, seed=7, device="cuda")
    mlp = "k_cmp" in args

    def piece(a, b):
        out = {n: t[:, a:b] for n, t in args.items() if n not in ("k_cmp", "v_cmp")}
        if mlp:
            c = pattern.compress
            lo, hi = num_compressed(a, c.block, c.stride), num_compressed(b, c.block, c.stride)
            out["k_cmp"] = [args["k_cmp"][s, lo:hi] for s in range(2)]
            out["v_cmp"] = [args["v_cmp"][s, lo:hi] for s in range(2)]
        return out

    layout = {}
    if paged:
        size = 4 * pattern.select.block
        per_slot = -(-(prompt + steps) // size)
        order = torch.randperm(2 * per_slot, generator=torch.Generator().manual_seed(1))
        layout = {"page_size": size, "pages": 2 * per_slot,
                  "block_table": order.view(2, per_slot).to(device="cuda", dtype=torch.int32)}
    cache = compiled.new_cache(2, prompt + steps, device="cuda", dtype=torch.bfloat16, **layout)
    with torch.no_grad():
        compiled.prefill(**piece(0, prompt), cache=cache)
        outs, idxs = [], []
        for t in range(prompt, prompt + steps):
            o, idx = compiled.decode(**piece(t, t + 1), cache=cache, return_indices=True)
            outs.append(o)
            idxs.append(idx)
        _, full_idx = compiled(**args, return_indices=True)
        full_idx[:, prompt:] = torch.cat(idxs, 1)
        full = compiled(**args, indices=full_idx)
    err = rel_error(torch.cat(outs, 1), full[:, prompt:])
    _log({"test": "decode_kernels", "pattern": name, "paged": paged, "block_sums": sums, "context": prompt,
          "rel_error": err})
    assert err < TOLERANCE[torch.bfloat16]


def test_decode_steps_follow_their_inputs_alignment():
    """After its first step a decode step launches the compiled kernels
    straight through their launchers (launch_decode._launch) while the
    arguments specialise the same way: steps whose inputs sit at odd
    addresses (views one element into a buffer) alternate with aligned
    ones and give exactly the outputs of aligned inputs throughout."""
    pattern = _patterns()["bench_paper128"]
    compiled = nsa_dsl.compile(pattern)
    prompt = random_inputs(pattern, 2, 1000, torch.bfloat16, seed=3, device="cuda")
    caches = [compiled.new_cache(2, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            compiled.prefill(**prompt, cache=cache)
        for t in range(6):
            args = random_inputs(pattern, 2, 1, torch.bfloat16, seed=10 + t, device="cuda")
            moved = {}
            for n, x in args.items():
                if t % 2:
                    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
                    moved[n] = buf[1:].view_as(x).copy_(x)
                    assert moved[n].data_ptr() % 16 != 0
                else:
                    moved[n] = x
            aligned = compiled.decode(**args, cache=caches[0])
            assert torch.equal(compiled.decode(**moved, cache=caches[1]), aligned)


def test_a_compiled_layer_gives_eager_outputs_and_gradients_bf16():
    """torch.compile(fullgraph=True) with inductor on a bf16 layer of the
    paper's sparsity: one graph, no break, eager's output and gradients
    within the bf16 tolerance (issue 23)."""
    from nsa_dsl.module import NSAttention

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = NSAttention(_patterns()["bench_paper128"], 1024, backend="kernels", device="cuda",
                        dtype=torch.bfloat16)
    layer.compiled
    x = torch.randn(2, 4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    explained = torch._dynamo.explain(layer)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    results = []
    for run in (layer, torch.compile(layer, fullgraph=True)):
        x.grad = None
        layer.zero_grad()
        out = run(x)
        out.float().square().mean().backward()
        results.append([out, x.grad] + [p.grad for p in layer.parameters()])
    errors = [rel_error(g, w) for g, w in zip(*reversed(results))]
    _log({"check": "torch_compile_inductor_bf16", "errors": errors})
    assert max(errors) < TOLERANCE[torch.bfloat16], errors
    torch._dynamo.reset()


def test_a_compiled_layer_generates_with_its_cache_bf16():
    """The cached step (nsa_dsl::cache_step) under inductor with
    fullgraph=True on the GPU: a 4k prompt in two pieces (the second starts
    inside a compression window), then decode steps at growing lengths,
    equal the eager layer's within the bf16 tolerance, without a recompile
    per step, and leave the same lengths and compressed entries."""
    from torch._dynamo.utils import counters

    from nsa_dsl.geometry import num_compressed
    from nsa_dsl.module import NSAttention

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = NSAttention(_patterns()["bench_paper128"], 1024, backend="kernels", device="cuda",
                        dtype=torch.bfloat16)
    layer.compiled
    x = torch.randn(2, 4096 + 8, 1024, device="cuda", dtype=torch.bfloat16)
    run = torch.compile(layer, fullgraph=True)
    outs, caches = [], []
    with torch.no_grad():
        for step in (layer, run):
            cache = layer.new_cache(2, 4096 + 8, dtype=torch.bfloat16)
            pieces = [step(x[:, :3001], cache=cache), step(x[:, 3001:4096], cache=cache),
                      step(x[:, 4096:4097], cache=cache)]
            graphs = counters["stats"]["unique_graphs"]
            pieces += [step(x[:, t:t + 1], cache=cache) for t in range(4097, 4104)]
            if step is run:
                assert counters["stats"]["unique_graphs"] == graphs
            outs.append(torch.cat(pieces, 1))
            caches.append(cache)
    err = rel_error(outs[1], outs[0])
    _log({"check": "compiled_layer_generates_bf16", "rel_error": err})
    assert err < TOLERANCE[torch.bfloat16]
    assert caches[1].host_lengths == caches[0].host_lengths == [4104, 4104]
    assert torch.equal(caches[1].lengths, caches[0].lengths)
    # (the compressed entries written: past them the cache is uninitialised memory)
    written = num_compressed(4104, layer.pattern.compress.block, layer.pattern.compress.stride)
    assert torch.equal(caches[1].k_cmp[:, :written], caches[0].k_cmp[:, :written])
    torch._dynamo.reset()


def test_a_converted_hf_model_generates_on_the_gpu():
    """A transformers Llama converted to NSA (pool=mlp, the kernels, bf16 on
    the GPU): greedy generation with nsa_dsl's cache scores each new token
    as the full forward over the generated sequence does (the decode
    kernels against the training kernels), for a batch of two 1000-token
    prompts."""
    transformers = pytest.importorskip("transformers")
    from nsa_dsl.integrations import transformers as hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                                      max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(config).eval()
    pattern = nsa_dsl.parse("""pattern hf_gpu { heads q=4 kv=2 dims qk=64 compress block=32 stride=16 pool=mlp
        select block=64 top=4 initial=1 local=2 window size=128 }""")
    model = hf.convert(model, pattern, backend="kernels").to(device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(3, 512, (2, 1000), device="cuda")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        scores = torch.stack(out.scores, 1).float()
        full = model(out.sequences[:, :-1], use_cache=False).logits[:, 999:].float()
    err = rel_error(scores, full)
    _log({"check": "hf_generate_bf16", "rel_error": err})
    assert err < TOLERANCE[torch.bfloat16]
