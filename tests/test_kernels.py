"""Generated kernels against the dense reference (NSA_MATH.md), on valid
patterns drawn by construction. On CPU they run through Triton's
interpreter (fp32 and fp16; the interpreter's bf16 dot is wrong)."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import nsa_dsl
from nsa_dsl.ir import Branch, Compress, Dims, Heads, Pattern, Pool, Select, Window
from strategies import (TOLERANCE, LaunchSpy, assert_gradients_match_reference, assert_selection_rule,
                        derived_overrides, random_inputs, rel_error, upcast, valid_patterns)

from conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16]


def run_and_compare(pattern, args, dtype):
    compiled = nsa_dsl.compile(pattern)
    compiled.poison = True  # every output element must be written
    kwargs = dict(args)
    want_indices = pattern.select is not None
    result = compiled(**kwargs, return_indices=want_indices) if want_indices else compiled(**kwargs)
    o, indices = result if want_indices else (result, None)
    assert o.dtype == dtype and o.shape == (*args["q"].shape[:3], pattern.dims.v)
    assert torch.isfinite(o).all(), "output has NaN/inf: an element was left unwritten or a softmax broke"
    ref_args = upcast(args)
    if indices is not None:
        assert (indices >= -1).all(), "indices left unwritten (poison value)"
        ref_args["indices"] = indices.to(ref_args["q"].device)
    expected = nsa_dsl.reference(pattern, **ref_args)
    err = rel_error(o, expected)
    assert err < TOLERANCE[dtype], f"relative error {err:.3e} >= {TOLERANCE[dtype]:.0e} for {pattern.canonical()}"
    return compiled, o, indices


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@given(pattern=valid_patterns(), length=st.integers(1, 80), batch=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_every_valid_pattern_matches_reference(dtype, pattern, length, batch, seed):
    args = random_inputs(pattern, batch, length, dtype, seed, device=DEVICE,
                         separate_window_kv=bool(seed % 2))
    _, _, indices = run_and_compare(pattern, args, dtype)
    if indices is not None:
        eps_rel = 1e-5 if dtype == torch.float32 else 3e-3
        assert_selection_rule(pattern, args, indices, eps_rel=eps_rel, eps_abs=1e-6 if dtype == torch.float32 else 1e-4)


PAPER_LIKE = Pattern(name="paper_like", heads=Heads(q=16, kv=1), dims=Dims(qk=48, v=32),
                     compress=Compress(block=32, stride=16), select=Select(block=16, top=4, initial=1, local=2),
                     window=Window(size=20))


@pytest.mark.parametrize("length", [1, 15, 31, 32, 33, 47, 130])
def test_paper_like_pattern_at_awkward_lengths(length):
    args = random_inputs(PAPER_LIKE, 1, length, torch.float32, seed=length, device=DEVICE)
    _, _, indices = run_and_compare(PAPER_LIKE, args, torch.float32)
    assert_selection_rule(PAPER_LIKE, args, indices, eps_rel=1e-5, eps_abs=1e-6)


def test_indices_argument_bypasses_scoring():
    """indices= decides the blocks: attention over blocks the scores would
    never choose still matches the reference given the same blocks."""
    p = PAPER_LIKE
    T = 128  # 8 blocks of 16: more than top=4, so a different choice exists
    args = random_inputs(p, 1, T, torch.float32, seed=7, device=DEVICE)
    compiled = nsa_dsl.compile(p)
    _, own = compiled(**args, return_indices=True)
    # The most recent visible blocks instead (no initial block), -1 padded.
    forced_free = torch.full_like(own, -1)
    for t in range(T):
        cur = t // p.select.block
        for j, blk in enumerate(range(cur, -1, -1)):
            if j < p.select.top:
                forced_free[0, t, 0, j] = blk
    o = compiled(**args, indices=forced_free)
    expected = nsa_dsl.reference(p, **upcast(args), indices=forced_free)
    assert rel_error(o, expected) < TOLERANCE[torch.float32]
    o_own = compiled(**args, indices=own)
    assert rel_error(o, o_own) > 1e-3, "indices= had no effect"


@settings(max_examples=6, deadline=None)
@given(pattern=valid_patterns(max_group=4).filter(lambda p: p.select is not None), length=st.integers(1, 60),
       batch=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_select_blocks_returns_the_blocks_a_call_attends(pattern, length, batch, seed):
    """select_blocks runs only the compression and the scoring: the same
    indices as a whole call on the same inputs (the same kernels, so the
    same bits), without a gradient even where the inputs have one, and a
    call given them computes the same output."""
    args = random_inputs(pattern, batch, length, torch.float32, seed, device=DEVICE)
    compiled = nsa_dsl.compile(pattern)
    compiled.poison = True
    o, indices = compiled(**args, return_indices=True)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
    chosen = _blocks(compiled, leaves)
    assert chosen.dtype == torch.int32 and not chosen.requires_grad
    assert torch.equal(chosen, indices)
    assert torch.equal(compiled(**args, indices=chosen), o)


def test_select_blocks_refuses_what_it_cannot_answer():
    no_select = Pattern(name="window_only", heads=Heads(q=2, kv=1), dims=Dims(qk=16, v=16), window=Window(size=8))
    args = random_inputs(no_select, 1, 16, torch.float32, seed=1, device=DEVICE)
    with pytest.raises(ValueError, match="select_blocks: pattern 'window_only' has no select branch"):
        nsa_dsl.compile(no_select).select_blocks(args["q"], args["k"], args["v"])
    args = random_inputs(PAPER_LIKE, 1, 16, torch.float32, seed=1, device=DEVICE)
    with pytest.raises(ValueError, match="k: expected"):
        nsa_dsl.compile(PAPER_LIKE).select_blocks(args["q"], args["k"][:, :8], args["v"])


def test_window_only_equals_causal_attention_when_window_covers_everything():
    p = Pattern(name="wide", heads=Heads(q=4, kv=2), dims=Dims(qk=32, v=16), window=Window(size=1000))
    args = random_inputs(p, 2, 50, torch.float32, seed=3, gates=False, device=DEVICE)
    o = nsa_dsl.compile(p)(**args)
    q, k, v = (args[n].double().transpose(1, 2) for n in ("q", "k", "v"))
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert rel_error(o, causal) < 1e-5


def test_sequence_length_is_not_a_compile_time_constant():
    p = Pattern(name="lens", heads=Heads(q=2, kv=1), dims=Dims(qk=16, v=16), window=Window(size=8))
    compiled = nsa_dsl.compile(p)
    source = compiled.source
    # (a parameter named T, not one whose name ends in T, such as DQ_LAST)
    assert not re.search(r"\bT: tl\.constexpr", source) and "do_not_specialize=[\"T\"" in source
    for length in (5, 17, 33):
        args = random_inputs(p, 1, length, torch.float32, seed=length, device=DEVICE)
        assert rel_error(compiled(**args), nsa_dsl.reference(p, **upcast(args))) < 1e-5


@settings(max_examples=40)
@given(pattern=valid_patterns(max_group=8), length=st.integers(1, 64), seed=st.integers(0, 2**31 - 1),
       strategy=st.sampled_from(["inverted-index", "atomic"]))
def test_every_gradient_matches_float64_autograd_of_reference(pattern, length, seed, strategy):
    """fp32 kernels' gradients (given their own block indices) against
    float64 autograd through the reference, for every differentiable input."""
    args = random_inputs(pattern, 1, length, torch.float32, seed, device=DEVICE, separate_window_kv=bool(seed % 2))
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
    compiled = nsa_dsl.compile(pattern, slc_dkdv=strategy)
    if pattern.select is not None:
        o, indices = compiled(**leaves, return_indices=True)
        extra = {"indices": indices}
    else:
        o, extra = compiled(**leaves), {}
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.device)
    o.backward(do)
    up = {n: t.detach().double().requires_grad_(True) for n, t in args.items()}
    ref = nsa_dsl.reference(pattern, **up, **extra)
    ref.backward(do.double())
    for name in args:
        got = leaves[name].grad
        want = up[name].grad
        if want is None:  # the reference does not use this input (e.g. an uncombined branch's gate)
            assert got is None or torch.count_nonzero(got) == 0, name
            continue
        assert got is not None, f"no gradient for {name}"
        err = rel_error(got, want)
        assert err < TOLERANCE[torch.float32], f"grad of {name}: {err:.3e} for {pattern.canonical()}"


def test_selection_key_gradients_split_into_many_chunks_match_reference():
    """Hot blocks (every position selects the initial block) are cut into
    chunks of SLC_BWD_CHUNK positions and reduced in order; force tiny
    chunks so every path of the split and the reduction runs."""
    p = PAPER_LIKE
    args = random_inputs(p, 2, 48, torch.float32, seed=21, device=DEVICE)
    results = []
    for chunk in (1, 3):  # the default chunk (1024 here) runs in every other selection test
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
        compiled = nsa_dsl.compile(p, deterministic=True, overrides={"SLC_BWD_CHUNK": chunk})
        o, idx = compiled(**leaves, return_indices=True)
        o.backward(torch.ones_like(o))
        results.append({n: leaves[n].grad for n in ("k", "v")})
        up = {n: t.detach().double().requires_grad_(True) for n, t in args.items()}
        ref = nsa_dsl.reference(p, **up, indices=idx)
        ref.backward(torch.ones_like(ref))
        for n in ("k", "v"):
            assert rel_error(leaves[n].grad, up[n].grad) < TOLERANCE[torch.float32], (chunk, n)


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="not a tunable constant"):
        nsa_dsl.compile(PAPER_LIKE, overrides={"TOP": 2})
    with pytest.raises(ValueError, match="must be a power of two >= 16"):
        nsa_dsl.compile(PAPER_LIKE, overrides={"SWA_BLOCK_M": 24})
    with pytest.raises(ValueError, match="num_warps must be"):
        nsa_dsl.compile(PAPER_LIKE, overrides={"slc_fwd.num_warps": 3})
    window_only = Pattern(name="w", heads=Heads(q=2, kv=1), dims=Dims(qk=16, v=16), window=Window(size=4))
    with pytest.raises(ValueError, match="no kernel of pattern 'w' uses it"):
        nsa_dsl.compile(window_only, overrides={"SLC_TOKENS": 2})
    # G=2: 4 positions x 2 rows is too few for slc_bwd_dkdv's products (a
    # compile error on sm_90, found by the tuner on the H200); 8 x 2 is fine
    from nsa_dsl.plan import apply_overrides

    small_group = nsa_dsl.check(nsa_dsl.load(os.path.join(os.path.dirname(__file__), "..", "examples",
                                                          "bench_small_group.nsa")))
    with pytest.raises(ValueError, match="SLC_BWD_TOKENS x GROUP_ROWS = 8 rows"):
        apply_overrides(small_group, {"SLC_BWD_TOKENS": 4})
    assert apply_overrides(small_group, {"SLC_BWD_TOKENS": 8}).kernel("slc_bwd").const("SLC_BWD_TOKENS") == 8


@pytest.mark.parametrize("top, initial, local", [(5, 1, 1), (3, 0, 0), (6, 2, 2)])
def test_top_n_merges_across_many_scoring_chunks(top, initial, local):
    """Compression stride 1 makes 16 compressed tokens per 16-token block, so
    each scoring chunk holds only 4 blocks and a 260-token sequence (17
    blocks) is scored in up to 5 chunks: the running top set is merged with chunk after chunk
    (new members evicting old ones, stopping early once nothing beats the
    worst member)."""
    p = Pattern(name="many_chunks", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16),
                compress=Compress(block=4, stride=1), select=Select(block=16, top=top, initial=initial, local=local))
    kp = nsa_dsl.check(p).kernel("slc_topk")
    assert kp.const("TOPK_CHUNK_BLOCKS") == 4
    args = random_inputs(p, 1, 260, torch.float32, seed=top * 7 + local, device=DEVICE)
    assert -(-260 // 16) > 4 * kp.const("TOPK_CHUNK_BLOCKS")  # a fifth chunk
    compiled = nsa_dsl.compile(p)
    compiled.poison = True  # every index must be written
    assert_selection_rule(p, args, _blocks(compiled, args), eps_rel=1e-5, eps_abs=1e-6)


def _learned_selection(p: Pattern) -> bool:
    return p.select is not None and not p.select.is_static and p.compress is not None


@settings(max_examples=12)
@given(pattern=valid_patterns().filter(_learned_selection), length=st.integers(1, 96),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES))
def test_block_scoring_obeys_the_selection_rule(pattern, length, seed, dtype):
    # Patterns that score blocks (the broad property test draws few): the
    # chosen blocks obey NSA_MATH.md's rule, and the forward matches the
    # reference with them.
    args = random_inputs(pattern, 1, length, dtype, seed, device=DEVICE)
    compiled = nsa_dsl.compile(pattern)
    compiled.poison = True
    o, indices = compiled(**args, return_indices=True)
    assert (indices >= -1).all(), "indices left unwritten (poison value)"
    eps_rel = 1e-5 if dtype == torch.float32 else 3e-3
    assert_selection_rule(pattern, args, indices, eps_rel=eps_rel, eps_abs=1e-6 if dtype == torch.float32 else 1e-4)
    expected = nsa_dsl.reference(pattern, **upcast(args), indices=indices.to(DEVICE))
    assert rel_error(o, expected) < TOLERANCE[dtype]


def test_property_patterns_take_both_ways_of_each_scoring_decision():
    # The plan decides the scoring's paths from the pattern: the broad
    # property tests' pattern strategy must draw both ways of each, so the
    # kernels are tested on both branches.
    from hypothesis import HealthCheck

    seen = {name: set() for name in ("TOPK_HEADS_IN_THREAD", "TOPK_STRIDED_OVERLAP", "chunk narrower than the set")}

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(valid_patterns())
    def draw(pattern):
        if _learned_selection(pattern):
            k = nsa_dsl.check(pattern).kernel("slc_topk")
            for name in ("TOPK_HEADS_IN_THREAD", "TOPK_STRIDED_OVERLAP"):
                seen[name].add(k.const(name))
            seen["chunk narrower than the set"].add(int(k.const("TOPK_CHUNK_BLOCKS_PAD") < k.const("TOP_PAD")))

    draw()
    assert seen == {name: {0, 1} for name in seen}


def test_scoring_tile_refuses_what_a_product_cannot_take():
    from nsa_dsl.plan import apply_overrides

    with pytest.raises(ValueError, match="TOPK_TOKENS x GROUP_ROWS = 512 rows per tile; the product needs 16 to 256"):
        apply_overrides(nsa_dsl.check(PAPER_LIKE), {"TOPK_TOKENS": 32})
    one_head = nsa_dsl.parse("pattern g1 { heads q=1 kv=1 dims qk=16 compress block=16 stride=8"
                             " select block=16 top=2 initial=1 local=0 }")
    with pytest.raises(ValueError, match="TOPK_TOKENS x GROUP_ROWS = 8 rows"):
        apply_overrides(nsa_dsl.check(one_head), {"TOPK_TOKENS": 8})


@pytest.mark.parametrize("tile, cmp_block, cmp_stride, T", [(16, 8, 4, 167), (32, 8, 4, 327), (16, 8, 1, 169)])
def test_open_tiles_without_a_mask_match_reference(tile, cmp_block, cmp_stride, T):
    """The flash-style kernels (compressed and window, forward and both
    backward passes) skip the mask on tiles every row/key of which is
    visible (_open_span). Small tiles, a window several tiles wide and a few
    hundred positions put most tiles in the open middle, with masked tiles
    on both sides of the window's band: output and every gradient must match
    the reference (a tile wrongly taken as open would attend to keys it may
    not see).

    A boundary off by one changes which tiles are open only where it falls
    on a tile edge: a window of 4 tiles - 1 puts the window's far end and
    the causal edge there (rows 3-4 tiles in: keys from 1). The first open
    row of a dK/dV program sits (keys in its tile - 1) x stride rows past
    its first row, never one row past a tile edge for power-of-two tiles and
    strides, so a one-row slip there cannot change a result; stride 1 with
    a last key tile of 2 tokens (169 - 7 = 10 x 16 + 2) is the closest."""
    p = Pattern(name="open_tiles", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16),
                compress=Compress(block=cmp_block, stride=cmp_stride), window=Window(size=4 * tile - 1))
    sizes = {f"{b}_{m}": tile for b in ("CMP", "SWA", "CMP_BWD", "SWA_BWD") for m in ("BLOCK_M", "BLOCK_N")}
    # the premise: a tile of rows well inside the sequence sees whole key
    # tiles of the window (and of the compressed tokens) without a mask
    first_row, last_row = 5 * tile, 6 * tile - 1
    assert first_row + 1 - max(last_row - p.window.size + 1, 0) >= 2 * tile
    assert (T - p.compress.block) // p.compress.stride + 1 >= 2 * tile
    compiled = nsa_dsl.compile(p, overrides=sizes)
    args = random_inputs(p, 1, T, torch.float32, seed=tile, device=DEVICE)
    expected = nsa_dsl.reference(p, **upcast(args))
    assert rel_error(compiled(**args), expected) < TOLERANCE[torch.float32]
    assert_gradients_match_reference(p, compiled, args, seed=tile)


@pytest.mark.parametrize("dq_rows, dq_keys, dkdv_keys", [(16, 32, 16), (32, 16, 32)])
def test_dkdv_key_tile_of_its_own_matches_reference(dq_rows, dq_keys, dkdv_keys):
    """The dK/dV kernels of the compressed and window branches take their
    own key tile (*_BWD_DKDV_BLOCK_N), here half and twice dq's, and step
    over the rows by dq's tile: the launch grid must follow the key tile (a
    grid counted in dq's wider tiles leaves keys with no program, so no dK,
    dV), the masked edge steps and open middle ones the row step, and the
    keys-major tile must give every gradient."""
    p = Pattern(name="dkdv_tile", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16),
                compress=Compress(block=8, stride=4), select=Select(block=16, top=2, initial=1, local=1),
                window=Window(size=47))
    overrides = {"CMP_BWD_BLOCK_M": dq_rows, "SWA_BWD_BLOCK_M": dq_rows, "CMP_BWD_BLOCK_N": dq_keys,
                 "SWA_BWD_BLOCK_N": dq_keys, "CMP_BWD_DKDV_BLOCK_N": dkdv_keys, "SWA_BWD_DKDV_BLOCK_N": dkdv_keys,
                 "CMP_BWD_DKDV_WARPS": 8}
    compiled = nsa_dsl.compile(p, overrides=overrides)
    assert compiled.plan.kernel("cmp_bwd").const("CMP_BWD_DKDV_BLOCK_N") == dkdv_keys
    # 121 keys, 29 compressed tokens: 2 or 1 dK/dV tiles of compressed keys and 8 or 4 of window keys, the
    # last partial; the rows stepped by dq's tile, the window (47) wide enough for open middle steps
    args = random_inputs(p, 2, 121, torch.float32, seed=dkdv_keys, device=DEVICE)
    assert_gradients_match_reference(p, compiled, args, seed=dkdv_keys)
    from nsa_dsl.plan import apply_overrides
    with pytest.raises(ValueError, match="CMP_BWD_DKDV_WARPS: must be 4 or 8"):
        apply_overrides(nsa_dsl.check(p), {"CMP_BWD_DKDV_WARPS": 16})


def test_flash_style_dq_kernels_launch_on_their_own_stages(monkeypatch):
    """CMP_BWD_DQ_STAGES / SWA_BWD_DQ_STAGES pipeline the dq kernels
    (cmp_bwd_dq on 2 stages took 16.7 -> 12.4 ms at 64k, NOTES v25) while
    the dK/dV kernels keep the launch's num_stages: 2 stages there need
    twice the shared memory of their wider key tiles. The launches carry
    each its own, and the gradients stay right."""
    p = Pattern(name="dq_stages", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16),
                compress=Compress(block=8, stride=4), select=Select(block=16, top=2, initial=1, local=1),
                window=Window(size=47))
    overrides = {"CMP_BWD_DQ_STAGES": 2, "SWA_BWD_DQ_STAGES": 3, "cmp_bwd.num_stages": 1, "swa_bwd.num_stages": 1}
    compiled = nsa_dsl.compile(p, overrides=overrides)
    stages = []
    for kernel in ("cmp_bwd_dq", "cmp_bwd_dkdv", "swa_bwd_dq", "swa_bwd_dkdv"):
        real = getattr(compiled.module, kernel)
        monkeypatch.setattr(compiled.module, kernel, LaunchSpy(real, "num_stages", stages, tag=(kernel,)))
    args = random_inputs(p, 1, 97, torch.float32, seed=3, device=DEVICE)
    assert_gradients_match_reference(p, compiled, args, seed=3)
    assert sorted(stages) == [("cmp_bwd_dkdv", 1), ("cmp_bwd_dq", 2), ("swa_bwd_dkdv", 1), ("swa_bwd_dq", 3)]
    plan = nsa_dsl.check(p)  # without overrides: dq on 2 stages, dK/dV on 1
    assert plan.kernel("cmp_bwd").const("CMP_BWD_DQ_STAGES") == plan.kernel("swa_bwd").const("SWA_BWD_DQ_STAGES") == 2
    assert plan.kernel("cmp_bwd").num_stages == plan.kernel("swa_bwd").num_stages == 1


DQ_SUM_PATTERNS = {
    "three branches": Pattern(name="dq_three", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16),
                              compress=Compress(block=8, stride=4), select=Select(block=16, top=2, initial=1, local=1),
                              window=Window(size=23)),
    "no window": Pattern(name="dq_two", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16),
                         compress=Compress(block=8, stride=4), select=Select(block=16, top=2, initial=1, local=1)),
    "no selection": Pattern(name="dq_cmp_swa", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16),
                            compress=Compress(block=8, stride=4), window=Window(size=23)),
    "window alone": Pattern(name="dq_one", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16), window=Window(size=23)),
}
# (pattern, overrides): where the pattern has both flash-style branches the
# plan pairs their dq kernels; dq stages of their own keep them apart
DQ_SUM_CASES = [(name, {}) for name in DQ_SUM_PATTERNS] + [
    (name, {"CMP_BWD_DQ_STAGES": 1}) for name in ("three branches", "no selection")]


def test_compressed_and_window_dq_pair_up_to_head_dim_128():
    """The plan pairs the two flash-style dq kernels at paper128's head dim
    (128, where the pair was measured) and keeps deepseek_nsa's (192, where
    the one kernel spills on sm_90) apart."""
    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    assert nsa_dsl.check(nsa_dsl.load(os.path.join(examples, "bench_paper128.nsa"))).dq_with_compressed
    assert not nsa_dsl.check(nsa_dsl.load(os.path.join(examples, "deepseek_nsa.nsa"))).dq_with_compressed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("which, overrides", DQ_SUM_CASES, ids=lambda x: x if isinstance(x, str) else "apart" if x else "plan")
def test_dq_sum_is_written_in_full_by_its_first_kernel_and_finished_by_its_last(which, overrides, dtype,
                                                                                 monkeypatch):
    """dQ is summed by the branches' dq kernels in turn (cmp_swa_bwd_dq
    standing for both flash-style branches where the plan pairs them): the
    first stores (nothing zeroes the sum first), the last stores the total
    in q's dtype (no cast after; for float32 or one kernel into the same
    buffer). With every buffer a kernel fills poisoned (NaN), a row the
    first kernel did not write, or a total the last did not store, reaches
    the gradient; the launches show which kernels ran in which place."""
    p = DQ_SUM_PATTERNS[which]
    compiled = nsa_dsl.compile(p, overrides=overrides)
    compiled.poison = True
    paired = not overrides and which in ("three branches", "no selection")
    assert compiled.plan.dq_with_compressed == paired
    kernels = [k for k in ("cmp_bwd_dq", "slc_bwd_dq", "swa_bwd_dq", "cmp_swa_bwd_dq") if hasattr(compiled.module, k)]
    launches = []
    for kernel in kernels:
        for flag in ("DQ_FIRST", "DQ_LAST"):
            real = getattr(compiled.module, kernel)
            monkeypatch.setattr(compiled.module, kernel, LaunchSpy(real, flag, launches, tag=(kernel, flag)))
    for length in (1, 45):
        launches.clear()
        args = random_inputs(p, 2, length, dtype, seed=length, device=DEVICE)
        assert_gradients_match_reference(p, compiled, args, seed=length)
        order = [k for k, flag, _ in launches if flag == "DQ_FIRST"]
        flags = {(k, flag): value for k, flag, value in launches}
        expected = ([k for k in ("cmp_swa_bwd_dq", "slc_bwd_dq") if k in kernels] if paired else
                    [k for k in ("cmp_bwd_dq", "slc_bwd_dq", "swa_bwd_dq") if k in kernels])
        assert order == expected
        assert all(flags[(k, "DQ_FIRST")] == (k == order[0]) and flags[(k, "DQ_LAST")] == (k == order[-1])
                   for k in order)


@pytest.mark.parametrize("which, own_window_keys", [("three branches", False), ("three branches", True),
                                                      ("no window", False), ("window alone", False)],
                         ids=["shared keys", "window's own keys", "no window", "window alone"])
def test_dkdv_buffers_are_stored_by_their_first_kernel(which, own_window_keys):
    """The flash-style dK/dV kernels store, never add: the compressed keys'
    into buffers of their own, the window's into k's and v's gradients (or
    k_swa's), launched before the pooling and the selection add theirs.
    With the buffers a kernel fills poisoned (NaN), an element its first
    kernel did not store, or a kernel that adds onto a buffer nothing wrote
    yet, reaches a gradient. Without a window dk and dv start at zero."""
    p = DQ_SUM_PATTERNS[which]
    compiled = nsa_dsl.compile(p)
    compiled.poison = True
    assert p.compress is None or compiled.plan.kernel("cmp_bwd").const("CMP_BWD_SPLIT_HEADS")
    for length in (1, 45):
        args = random_inputs(p, 2, length, torch.float32, seed=length, separate_window_kv=own_window_keys,
                             device=DEVICE)
        assert ("k_swa" in args) == own_window_keys
        assert_gradients_match_reference(p, compiled, args, seed=length)


def test_dq_sum_is_let_go_before_the_selection_backward_allocates(monkeypatch):
    """The float32 dQ sum is freed once its last kernel (here the
    selection's, after cmp_swa_bwd_dq) is launched, before that branch's
    dK/dV buffers are allocated: held to the end of the selection's
    backward, its 4 bytes a query element sat on top of the inverted index
    and the chunk partials and raised the training pass's peak (H100, 64k:
    10.41 -> 10.74 GB, NOTES v28)."""
    import weakref

    from nsa_dsl import launch_backward

    p = DQ_SUM_PATTERNS["three branches"]
    compiled = nsa_dsl.compile(p)
    assert compiled.plan.dq_with_compressed
    sums, alive_at_index = [], []
    real_alloc, real_index = compiled.alloc, launch_backward.block_to_positions

    def alloc(shape, dtype, device, **kwargs):
        t = real_alloc(shape, dtype, device, **kwargs)
        if dtype == torch.float32 and tuple(shape) == (1, 45, p.heads.q, p.dims.qk):  # (not dK/dV's)
            sums.append(weakref.ref(t))
        return t

    def index(*args, **kwargs):
        alive_at_index.append([r() is not None for r in sums])
        return real_index(*args, **kwargs)

    monkeypatch.setattr(compiled, "alloc", alloc)
    monkeypatch.setattr(launch_backward, "block_to_positions", index)
    args = random_inputs(p, 1, 45, torch.float16, seed=3, device=DEVICE)
    assert_gradients_match_reference(p, compiled, args, seed=3)
    assert alive_at_index == [[False]]


MANY_CHUNKS = Pattern(name="many_chunks", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16),
                      compress=Compress(block=4, stride=1), select=Select(block=16, top=5, initial=1, local=1))


def _blocks(compiled, args: dict) -> torch.Tensor:
    """The blocks compiled's scoring chooses for random_inputs' args
    (select_blocks: no attention computed)."""
    return compiled.select_blocks(args["q"], args["k"], args["v"], k_cmp=args.get("k_cmp"), v_cmp=args.get("v_cmp"))


def _assert_same_blocks_as_the_plan(pattern, overrides, length, seed, args=None):
    """A scoring variant's blocks obey the selection rule and equal the
    plan's own kernel's (random fp32 inputs, or the given ones: no ties
    within rounding). The variant may score in chunks of another width
    (TOPK_CHUNK_BLOCKS, which the plan derives from the pattern)."""
    if args is None:
        args = random_inputs(pattern, 1, length, torch.float32, seed=seed, device=DEVICE)
    with derived_overrides():
        compiled = nsa_dsl.compile(pattern, overrides=overrides)
    compiled.poison = True
    indices = _blocks(compiled, args)
    assert_selection_rule(pattern, args, indices, eps_rel=1e-5, eps_abs=1e-6)
    assert torch.equal(indices, _blocks(nsa_dsl.compile(pattern), args))


@pytest.mark.parametrize("pattern, overrides", [
    (MANY_CHUNKS, {"TOPK_CHUNK_BLOCKS": 16}),  # 4 blocks by default: wider
    (PAPER_LIKE, {"TOPK_CHUNK_BLOCKS": 4}),  # 64 by default: narrower
    (PAPER_LIKE, {"TOPK_CHUNK_BLOCKS": 8, "TOPK_TOKENS": 2}),
], ids=["wider", "narrower", "narrower-2-positions"])
def test_topk_chunk_width_keeps_the_selection_rule(pattern, overrides):
    # The scoring chunk's width, which the plan derives from the pattern
    # (4 to 64 blocks): wider chunks merge fewer times, narrower ones hand
    # the next chunk more straddling tokens. Same blocks as the pattern's
    # own width (random inputs: no ties within float32).
    default_width = nsa_dsl.check(pattern).kernel("slc_topk").const("TOPK_CHUNK_BLOCKS")
    assert default_width != overrides["TOPK_CHUNK_BLOCKS"]
    # the overridden width splits the sequence into two or more chunks
    # (MANY_CHUNKS: 17 blocks, 2 chunks of 16; PAPER_LIKE: 9 blocks, 3 chunks
    # of 4 or 2 of 8)
    length = 261 if pattern is MANY_CHUNKS else 140
    assert length > overrides["TOPK_CHUNK_BLOCKS"] * pattern.select.block
    _assert_same_blocks_as_the_plan(pattern, overrides, length, seed=len(str(overrides)))


def test_topk_narrowest_chunk_a_compressed_token_can_straddle():
    # compressed blocks of 64 every 16 positions reach 48 positions past
    # the chunk they start in: with 4 blocks of 16 per chunk they spill into
    # the next chunk's blocks only, as the kernel's carry assumes
    p = Pattern(name="far", heads=Heads(q=4, kv=1), dims=Dims(qk=16, v=16), compress=Compress(block=64, stride=16),
                select=Select(block=16, top=4, initial=1, local=1))
    args = random_inputs(p, 1, 300, torch.float32, seed=3, device=DEVICE)
    with derived_overrides():
        compiled = nsa_dsl.compile(p, overrides={"TOPK_CHUNK_BLOCKS": 4})
    compiled.poison = True
    assert_selection_rule(p, args, _blocks(compiled, args), eps_rel=1e-5, eps_abs=1e-6)


# The paper's overlap shape at a small scale: 4 compressed tokens start in
# each selection block, each spans two strides (weights 1, 2, 2, 2, 1).
PAPER_SHAPED = Pattern(name="paper_shaped", heads=Heads(q=4, kv=1), dims=Dims(qk=16, v=16),
                       compress=Compress(block=8, stride=4), select=Select(block=16, top=3, initial=1, local=1))
# A token of select block + stride positions: the last one of a block ends
# exactly at the next block's end (the widest TOPK_STRIDED_OVERLAP takes).
REACH_EDGE = Pattern(name="reach_edge", heads=Heads(q=4, kv=1), dims=Dims(qk=16, v=16),
                     compress=Compress(block=20, stride=4), select=Select(block=16, top=3, initial=1, local=1))


# One compressed token starts in each selection block and reaches into the
# next (64-block chunks by default: 1024 positions each).
ONE_PER_BLOCK = Pattern(name="one_per_block", heads=Heads(q=4, kv=1), dims=Dims(qk=16, v=16),
                        compress=Compress(block=32, stride=16), select=Select(block=16, top=3, initial=1, local=1))
# A chunk narrower than the products' 16 lanes is padded: the plan then
# spreads the probabilities by the overlap products, not the strided pattern.
PRODUCTS = {"TOPK_CHUNK_BLOCKS": 8}


@pytest.mark.parametrize("pattern", [ONE_PER_BLOCK, PAPER_SHAPED, REACH_EDGE],
                         ids=["one_per_block", "paper_shaped", "reach_edge"])
def test_strided_overlap_scores_as_the_overlap_product(pattern):
    # TOPK_STRIDED_OVERLAP (the plan's path for these patterns) applies the
    # overlap weights as the per-block pattern (own block, next block) with
    # a carry between chunks, instead of the float32 products a padded chunk
    # takes: the same blocks (random inputs, no ties within float32), over
    # sequences of several chunks.
    # (ONE_PER_BLOCK's chunks narrowed to 16 blocks, still strided, so
    # that the carry crosses chunk edges.)
    from nsa_dsl.plan import apply_overrides

    plan = nsa_dsl.check(pattern)
    strided = {"TOPK_CHUNK_BLOCKS": 16} if plan.kernel("slc_topk").const("TOPK_CHUNK_BLOCKS") > 16 else {}
    with derived_overrides():
        for overrides, path in ((strided, 1), (PRODUCTS, 0)):
            assert apply_overrides(plan, overrides).kernel("slc_topk").const("TOPK_STRIDED_OVERLAP") == path
    length = 2 * 16 * pattern.select.block + 8  # the carry crosses two chunk edges
    args = random_inputs(pattern, 1, length, torch.float32, seed=pattern.select.block, device=DEVICE)
    with derived_overrides():
        chosen = [_blocks(nsa_dsl.compile(pattern, overrides=o), args) for o in (strided, PRODUCTS)]
    assert_selection_rule(pattern, args, chosen[0], eps_rel=1e-5, eps_abs=1e-6)
    assert torch.equal(chosen[0], chosen[1])


def test_strided_overlap_only_where_it_can_score():
    far = Pattern(name="far", heads=Heads(q=4, kv=1), dims=Dims(qk=16, v=16),
                  compress=Compress(block=24, stride=4), select=Select(block=16, top=3, initial=1, local=1))
    # a compressed token of 24 positions reaches two selection blocks of 16 past its own
    assert nsa_dsl.check(far).kernel("slc_topk").const("TOPK_STRIDED_OVERLAP") == 0
    # a chunk of 4 blocks padded to 16 for the products
    k = nsa_dsl.check(MANY_CHUNKS).kernel("slc_topk")
    assert (k.const("TOPK_CHUNK_BLOCKS"), k.const("TOPK_CHUNK_BLOCKS_PAD"), k.const("TOPK_STRIDED_OVERLAP")) == (4, 16, 0)
    assert nsa_dsl.check(REACH_EDGE).kernel("slc_topk").const("TOPK_STRIDED_OVERLAP") == 1


# PAPER_SHAPED with two local blocks: the first compressed token a
# position cannot see starts in its previous block, which it forces.
PAPER_SHAPED_LOCAL2 = Pattern(name="paper_shaped_local2", heads=Heads(q=4, kv=1), dims=Dims(qk=16, v=16),
                              compress=Compress(block=8, stride=4), select=Select(block=16, top=4, initial=1, local=2))


@pytest.mark.parametrize("block, stride, select, local", [
    (b, s, sel, loc) for b in (4, 8, 16, 20, 32) for s in (4, 8, 16) for sel in (8, 16, 32, 64) for loc in (0, 1, 2, 3)
    if s <= b and sel % s == 0 and b <= sel + s])
def test_edge_forced_holds_exactly_where_hidden_tokens_reach_forced_blocks_only(block, stride, select, local):
    # TOPK_EDGE_FORCED lets the scoring skip its causal mask. Brute force
    # over every position of a few hundred and every token it cannot see
    # yet (token i covers [i*stride, i*stride + block)): with the strided
    # overlap a token adds to its own block (i*stride // select) and the
    # next, and each such block must be forced (> the position's block -
    # local) or not yet visible.
    from nsa_dsl.plan import _causal_edge_forced

    def hidden_tokens_only_touch_forced(pos):
        hidden = [i for i in range(pos // stride + 2) if i * stride + block - 1 > pos]
        return all(i * stride // select + extra > pos // select - local for i in hidden for extra in (0, 1))

    truth = all(hidden_tokens_only_touch_forced(pos) for pos in range(4 * select * (local + 2) + 2 * block))
    assert _causal_edge_forced(block, stride, select, local) == truth


def test_scoring_unmasked_at_the_causal_edge_keeps_the_selection_rule():
    # Two local blocks hide the causal edge, so the plan's strided scoring
    # skips its mask. Keys that grow along the sequence make the tokens past
    # a position's edge score far above its log-sum-exp (probabilities of
    # inf, and NaN where a zero weight meets them): the blocks they land on
    # are forced or not yet visible, so the chosen blocks still obey the
    # rule, across a chunk edge, and equal those of the overlap products,
    # which keep the mask.
    from nsa_dsl.plan import apply_overrides

    k = nsa_dsl.check(PAPER_SHAPED_LOCAL2).kernel("slc_topk")
    assert (k.const("TOPK_EDGE_FORCED"), k.const("TOPK_STRIDED_OVERLAP"), k.const("TOPK_CHUNK_BLOCKS")) == (1, 1, 16)
    with derived_overrides():
        assert apply_overrides(nsa_dsl.check(PAPER_SHAPED_LOCAL2), PRODUCTS).kernel("slc_topk").const(
            "TOPK_STRIDED_OVERLAP") == 0
    assert not nsa_dsl.check(PAPER_SHAPED).kernel("slc_topk").const("TOPK_EDGE_FORCED")  # one local block
    length = 16 * PAPER_SHAPED_LOCAL2.select.block + 40  # past one chunk edge
    args = random_inputs(PAPER_SHAPED_LOCAL2, 1, length, torch.float32, seed=11, device=DEVICE)
    ramp = torch.linspace(1.0, 40.0, length, dtype=torch.float32, device=DEVICE)[None, :, None, None]
    args["k"] = args["k"] * ramp
    _assert_same_blocks_as_the_plan(PAPER_SHAPED_LOCAL2, PRODUCTS, length, seed=None, args=args)
    assert_selection_rule(PAPER_SHAPED_LOCAL2, args, _blocks(nsa_dsl.compile(PAPER_SHAPED_LOCAL2), args),
                          eps_rel=1e-5, eps_abs=1e-6)


SMALL_GROUP_LIKE = Pattern(name="small_group_like", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16),
                           compress=Compress(block=8, stride=4), select=Select(block=16, top=5, initial=1, local=2))


@pytest.mark.parametrize("pattern, overrides, in_thread", [
    (PAPER_LIKE, {"TOPK_TOKENS": 1}, 0),  # 16 heads, 1 position: the head sum across lanes
    (PAPER_LIKE, {"TOPK_TOKENS": 2, "TOPK_CHUNK_BLOCKS": 16}, 0),
    (PAPER_LIKE, {"TOPK_TOKENS": 4, "TOPK_CHUNK_BLOCKS": 16}, 1),  # 8 pairs of heads, 4 positions
    (SMALL_GROUP_LIKE, {"TOPK_TOKENS": 8}, 1),  # 2 heads: one pair, 2 KV heads, 8 positions
], ids=["one-position", "two-positions", "four-positions", "two-heads"])
def test_scoring_tiles_select_the_same_blocks(pattern, overrides, in_thread):
    # Tiles of fewer positions than the plan's (16 x 16 heads for PAPER_LIKE,
    # 32 x 2 for SMALL_GROUP_LIKE, both with the heads summed in-thread and
    # the overlap by products): broadcast products instead, and the heads
    # summed in-thread (TOPK_HEADS_IN_THREAD: the rows ordered so that a
    # thread holds whole pairs of heads) only where the tile has whole
    # groups of 4 positions. The same probabilities summed in another
    # order: the same blocks as the plan's scoring (random fp32 inputs, no
    # ties within rounding), across a chunk edge.
    from nsa_dsl.plan import apply_overrides

    assert nsa_dsl.check(pattern).kernel("slc_topk").const("TOPK_HEADS_IN_THREAD") == 1
    with derived_overrides():
        k = apply_overrides(nsa_dsl.check(pattern), overrides).kernel("slc_topk")
    assert k.const("TOPK_HEADS_IN_THREAD") == in_thread
    length = k.const("TOPK_CHUNK_BLOCKS") * pattern.select.block + 40 if k.const("TOPK_CHUNK_BLOCKS") <= 16 else 130
    _assert_same_blocks_as_the_plan(pattern, overrides, length, seed=len(pattern.name) + len(overrides))


def test_int32_keys_select_the_same_blocks_for_16_bit_inputs(monkeypatch):
    # TOPK_KEY32: the sorted merge on int32 keys (the score's top bits over
    # the tile's block-index bits) for fp16/bf16 inputs. Same blocks as the
    # int64 keys (the run-time fallback, here forced by a block limit of 0
    # bits) on random fp16 inputs over several chunks (18 blocks: 5 index
    # bits), and under exact ties (q = 0: the lower block wins in both);
    # float32 inputs keep the int64 keys.
    from nsa_dsl import launch

    pattern = PAPER_SHAPED_LOCAL2
    length = 16 * pattern.select.block + 40
    key32 = []
    bits = launch.KEY32_MAX_BLOCK_BITS
    compiled = nsa_dsl.compile(pattern)
    compiled.poison = True
    real = compiled.module.slc_topk

    def run(args, allowed):
        monkeypatch.setattr(launch, "KEY32_MAX_BLOCK_BITS", bits if allowed else 0)
        monkeypatch.setattr(compiled.module, "slc_topk", LaunchSpy(real, "TOPK_KEY32", key32,
                                                                   tag=(args["q"].dtype, allowed)))
        return _blocks(compiled, args)

    args = random_inputs(pattern, 1, length, torch.float16, seed=5, device=DEVICE)
    chosen = run(args, True)
    assert torch.equal(chosen, run(args, False))
    assert_selection_rule(pattern, args, chosen, eps_rel=3e-3, eps_abs=1e-4)
    args["q"] = torch.zeros_like(args["q"])
    assert torch.equal(run(args, True), run(args, False))
    run(random_inputs(pattern, 1, length, torch.float32, seed=5, device=DEVICE), True)
    assert key32 == [(torch.float16, True, True), (torch.float16, False, False)] * 2 + [(torch.float32, True, False)]


def test_int32_keys_only_while_the_block_index_leaves_the_score_enough_bits(monkeypatch):
    # Past 2^KEY32_MAX_BLOCK_BITS blocks the block index would take too many
    # of the int32 key's bits: those lengths run the int64 keys (here the
    # limit lowered to 4 bits: 16 blocks of 16 positions).
    from nsa_dsl import launch

    assert launch._int32_keys(torch.bfloat16, 4096) and not launch._int32_keys(torch.bfloat16, 4097)
    assert launch._int32_keys(torch.float16, 1) and not launch._int32_keys(torch.float32, 16)
    monkeypatch.setattr(launch, "KEY32_MAX_BLOCK_BITS", 4)
    compiled = nsa_dsl.compile(PAPER_SHAPED_LOCAL2)
    asked = []
    monkeypatch.setattr(compiled.module, "slc_topk", LaunchSpy(compiled.module.slc_topk, "TOPK_KEY32", asked))
    for length in (16 * 16, 16 * 16 + 1):  # 16 blocks, then 17
        compiled(**random_inputs(PAPER_SHAPED_LOCAL2, 1, length, torch.float16, seed=1, device=DEVICE))
    assert asked == [True, False]


def test_top_set_wider_than_a_scoring_chunk_keeps_every_block():
    # A top set of 19 (32 slots) over chunks of 16 blocks: each chunk's keys
    # are widened to the set's slots and merged sorted. This example lost
    # blocks once (t=88, KV head 1: 5 of 6 visible blocks): a group of 3
    # heads, whose padded row the scoring read (see the test below); the
    # merge by rounds that ran here then took the blame.
    p = Pattern(name="wide_top_regression", heads=Heads(q=6, kv=2), dims=Dims(qk=32, v=32),
                compress=Compress(block=12, stride=4), select=Select(block=16, top=19, initial=1, local=2),
                window=Window(size=61))
    k = nsa_dsl.check(p).kernel("slc_topk")
    assert (k.const("TOP_PAD"), k.const("TOPK_CHUNK_BLOCKS_PAD")) == (32, 16)
    args = random_inputs(p, 1, 89, torch.float32, seed=1976437182, device=DEVICE)
    compiled = nsa_dsl.compile(p)
    compiled.poison = True
    assert_selection_rule(p, args, _blocks(compiled, args), eps_rel=1e-5, eps_abs=1e-6)


def test_scoring_never_reads_a_padded_head():
    # Regression: with the heads in-thread row order, the scoring masked
    # its padded heads' rows (a group of 3 padded to 4) by the position-major
    # formula, so it summed a head past the group into the block scores (q
    # and lse read out of bounds: blocks chosen at random in a packed-call
    # property example). q here is a view whose next head holds large
    # values: reading it would decide the blocks.
    p = Pattern(name="group_of_three", heads=Heads(q=6, kv=2), dims=Dims(qk=16, v=16),
                compress=Compress(block=2, stride=2), select=Select(block=16, top=1, initial=0, local=0))
    k = nsa_dsl.check(p).kernel("slc_topk")
    assert (k.const("GROUP_ROWS"), k.const("TOPK_HEADS_IN_THREAD")) == (4, 1)
    args = random_inputs(p, 2, 63, torch.float32, seed=0, device=DEVICE)
    wide = torch.randn(2, 63, 7, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 40
    wide[:, :, :6] = args["q"]
    args["q"] = wide[:, :, :6]  # heads 0-5 of 7: head 6 sits where a padded row of KV head 1 would read
    compiled = nsa_dsl.compile(p)
    compiled.poison = True
    assert_selection_rule(p, args, _blocks(compiled, args), eps_rel=1e-5, eps_abs=1e-6)


# A top set wider than the plan's 16-block chunks: each chunk's keys are
# widened to the set's 32 slots before the merge.
WIDE_TOP = Pattern(name="wide_top", heads=Heads(q=2, kv=1), dims=Dims(qk=16, v=16),
                   compress=Compress(block=8, stride=4), select=Select(block=16, top=20, initial=1, local=1))
AS_WIDE_AS_THE_SET = {"TOPK_CHUNK_BLOCKS": 32}


def test_chunks_narrower_than_the_set_select_the_same_blocks():
    # The running set is sorted keys (score, then the lower block) merged by
    # a bitonic network with each chunk's best TOP_PAD keys; a chunk
    # narrower than the set has its keys padded with empty ones first. The
    # same blocks as chunks as wide as the set, over several chunks, and
    # under exact ties too (q = 0: every visible compressed token equally
    # likely, so whole blocks tie and only the lower-index rule decides).
    from nsa_dsl.plan import apply_overrides

    plan = nsa_dsl.check(WIDE_TOP)
    k = plan.kernel("slc_topk")
    assert (k.const("TOP_PAD"), k.const("TOPK_CHUNK_BLOCKS_PAD"), k.num_stages) == (32, 16, 3)
    with derived_overrides():
        k = apply_overrides(plan, AS_WIDE_AS_THE_SET).kernel("slc_topk")
    assert k.const("TOPK_CHUNK_BLOCKS_PAD") == 32
    length = 16 * WIDE_TOP.select.block + 5  # 17 blocks: 2 chunks of 16, 1 of 32
    _assert_same_blocks_as_the_plan(WIDE_TOP, AS_WIDE_AS_THE_SET, length, seed=7)
    args = random_inputs(WIDE_TOP, 1, length, torch.float32, seed=8, device=DEVICE)
    args["q"] = torch.zeros_like(args["q"])
    _assert_same_blocks_as_the_plan(WIDE_TOP, AS_WIDE_AS_THE_SET, length, seed=None, args=args)


def _spy_on_descriptors(monkeypatch, *also) -> tuple:
    """Record, per launch, whether launch._descriptor_operands (and the same
    function imported into the modules `also`) handed out descriptors.
    Returns (that list, the real launch._tma_fits)."""
    from nsa_dsl import launch

    used = []
    real, fits = launch._descriptor_operands, launch._tma_fits

    def spy(*a, **kw):
        result = real(*a, **kw)
        used.append(result[-1])
        return result
    for module in (launch, *also):
        monkeypatch.setattr(module, "_descriptor_operands", spy)
    return used, fits


@pytest.mark.parametrize("dtype, order", [
    (torch.float32, {"SLC_FWD_ORDER": 0}),
    (torch.float16, {"SLC_FWD_ORDER": 0, "SLC_FWD_WINDOW": 1}),
    (torch.float32, {"SLC_FWD_ORDER": 1, "BC_FOLD_WINDOW": 1, "BC_MERGE_FORCED": 1}),
    (torch.float16, {"SLC_FWD_ORDER": 1, "BC_FOLD_WINDOW": 1, "BC_MERGE_FORCED": 1}),
], ids=["swa_fwd-fp32", "window_in_slc_fwd-fp16", "window_in_merge-fp32", "window_in_merge-fp16"])
def test_kv_through_tensor_descriptors_gives_the_same_bits(dtype, order, monkeypatch):
    """CMP_TMA / SWA_TMA / TOPK_TMA / SLC_TMA / BC_FORCED_TMA: the compressed
    and window forwards read k and v, the scoring the compressed keys,
    either selection order the selected blocks and the merge the forced
    ones, through tensor descriptors (TMA on Hopper) instead of addressed
    loads. Same tiles, same order, same products: the same bits as the
    pointer path (the run-time fallback where descriptors cannot read the
    tensors, here forced), right against the reference, at a length that
    leaves a partial last key tile (zero-filled past the end by the
    descriptor), with batch and KV-head coordinates past 0, and the window
    in swa_fwd, in the group-centric selection's programs and in the
    block-centric merge's."""
    from nsa_dsl import launch, launch_forward

    p = Pattern(name="tma", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=32), compress=Compress(block=8, stride=4),
                select=Select(block=16, top=3, initial=1, local=1), window=Window(size=40))
    tiles = {"CMP_BLOCK_M": 16, "CMP_BLOCK_N": 16, "SWA_BLOCK_M": 16, "SWA_BLOCK_N": 16, **order,
             "TOPK_TOKENS": 8, "SLC_TMA": 1}
    if order["SLC_FWD_ORDER"]:
        tiles["BC_FORCED_TMA"] = 1
    plan = nsa_dsl.check(p)
    assert plan.kernel("cmp_fwd").const("CMP_TMA") and plan.kernel("swa_fwd").const("SWA_TMA")
    assert plan.kernel("slc_topk").const("TOPK_TMA")
    # launch._kv_operands calls it from launch, the scoring's launcher by its own name
    used, fits = _spy_on_descriptors(monkeypatch, launch_forward)
    for T in (99,):  # 23 compressed tokens, 99 keys: a partial last key tile for both branches
        args = random_inputs(p, 2, T, dtype, seed=T, device=DEVICE)
        outs = {}
        for tma in (0, 1):
            monkeypatch.setattr(launch, "_tma_fits", fits if tma else lambda *tensors: False)
            compiled = nsa_dsl.compile(p, overrides=tiles)
            compiled.poison = True
            used.clear()
            outs[tma] = compiled(**args, return_indices=True)
            # every kernel took the path asked for: cmp_fwd, the scoring, the
            # selection's blocks and the window's; block-centric also the
            # merge's forced blocks
            assert used == [bool(tma)] * (5 if order["SLC_FWD_ORDER"] else 4)
        (o0, i0), (o1, i1) = outs[0], outs[1]
        assert torch.equal(i0, i1) and torch.equal(o0, o1)
        expected = nsa_dsl.reference(p, **upcast(args), indices=i1.to(DEVICE))
        assert rel_error(o1, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("tokens", [1, 2])
def test_selection_dq_through_tensor_descriptors_gives_the_same_bits(tokens, monkeypatch):
    """SLC_BWD_DQ_TMA: slc_bwd_dq reads each selected block's k and v through
    tensor descriptors (TMA on Hopper): the same gradients, bit for bit, as
    its pointer path (forced here by the run-time fallback), at a length
    that leaves a partial last block (zero-filled past the end), with batch
    and KV-head coordinates past 0; right against float64."""
    from nsa_dsl import launch

    p = Pattern(name="tma_bwd", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=32),
                compress=Compress(block=8, stride=4), select=Select(block=16, top=3, initial=1, local=1),
                window=Window(size=40))
    overrides = {"SLC_BWD_DQ_TMA": 1, "SLC_BWD_DQ_TOKENS": tokens, "SLC_BWD_DQ_LIST": 1, "SLC_BWD_DQ_STAGES": 2}
    used, fits = _spy_on_descriptors(monkeypatch)
    args = random_inputs(p, 2, 59, torch.float32, seed=tokens, device=DEVICE)  # 4 blocks, the last of 11
    grads = {}
    for tma in (0, 1):
        monkeypatch.setattr(launch, "_tma_fits", fits if tma else lambda *tensors: False)
        compiled = nsa_dsl.compile(p, overrides={**overrides, "SLC_TMA": 0, "BC_FORCED_TMA": 0})
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
        out = compiled(**leaves)
        used.clear()
        out.backward(torch.ones_like(out))
        assert used == [bool(tma)]  # the backward's one descriptor site: slc_bwd_dq
        grads[tma] = {n: t.grad for n, t in leaves.items()}
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name
    assert_gradients_match_reference(p, nsa_dsl.compile(p, overrides=overrides), args, seed=tokens)


def test_tensor_descriptors_only_where_the_copy_engine_can_read():
    """launch._tma_fits: descriptors need the innermost stride 1 and the other
    strides and the base 16-byte aligned; anything else takes the pointer
    path (the kernel's *_TMA argument False), never a wrong read."""
    from nsa_dsl.launch import _kv_operands, _tma_fits

    k = torch.randn(2, 10, 4, 16)
    assert _tma_fits(k, k)
    assert not _tma_fits(k.transpose(2, 3))  # innermost stride 4
    assert not _tma_fits(torch.randn(2, 10, 4, 6)[..., :5])  # heads 6 floats (24 bytes) apart
    assert not _tma_fits(torch.randn(2 * 10 * 4 * 16 + 1)[1:].view(2, 10, 4, 16))  # base 4 bytes off
    assert _kv_operands(False, k, k, 16, 16, 16) == (k, k, False)
    k_arg, v_arg, tma = _kv_operands(True, k, k, 16, 16, 16)
    assert tma and k_arg.block_shape == [1, 16, 1, 16]
    assert _kv_operands(True, k.transpose(2, 3), k, 16, 16, 16)[2] is False
