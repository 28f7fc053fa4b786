"""The two selection forward loop orders (group-centric union walk and
block-centric over the inverted index): both compute NSA_MATH.md's selected
attention, leave the same statistics for the backward, and the plan picks
between them by the cost model."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import given, settings, strategies as st

import nsa_dsl
from nsa_dsl.inverted_index import block_to_positions, chunk_table, first_in_row
from nsa_dsl.ir import Branch, Compress, Dims, Heads, Pattern, Select, Window
from nsa_dsl.launch import index_keys
from nsa_dsl.loop_order import BLOCK_CENTRIC_BYTE_WEIGHT, block_centric_from, selection_loop_bytes
from nsa_dsl.pipeline import check
from nsa_dsl.plan import SLC_LIST_MAX
from nsa_dsl.reference import first_occurrence
from nsa_dsl.tune import candidates, launched
from nsa_dsl.validate import validate_inputs
from strategies import (TOLERANCE, LaunchSpy, assert_gradients_match_reference, derived_overrides, random_inputs,
                        rel_error, upcast, valid_patterns)

from conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
ORDERS = ("group-centric", "block-centric")


def _selection_only(pattern: Pattern, args: dict, order: str, indices) -> dict:
    """The forward's intermediate tensors (o_slc, lse_slc, ...) of one loop
    order, every buffer poisoned first."""
    compiled = nsa_dsl.compile(pattern, slc_fwd=order)
    assert compiled.slc_fwd_at(args["q"].shape[1]) == order
    return _intermediates(compiled, args, indices)


def _intermediates(compiled, args: dict, indices, final: bool = False) -> dict:
    """Every intermediate tensor of a compiled forward, buffers poisoned
    (final: as a call that needs no gradient runs it)."""
    pattern = compiled.pattern
    compiled.poison = True
    gates = {b: args.get(f"g_{b.value}") for b in Branch}
    shapes = validate_inputs(pattern, args["q"], args["k"], args["v"], gates, k_cmp=args.get("k_cmp"),
                             v_cmp=args.get("v_cmp"), k_swa=args.get("k_swa"), v_swa=args.get("v_swa"),
                             indices=indices, scale=None)
    return compiled.forward(args["q"], args["k"], args["v"], gates, k_cmp=args.get("k_cmp"), v_cmp=args.get("v_cmp"),
                            k_swa=args.get("k_swa"), v_swa=args.get("v_swa"), indices=indices,
                            scale=pattern.dims.qk ** -0.5, shapes=shapes, final=final)


@settings(max_examples=7)
@given(pattern=valid_patterns().filter(lambda p: p.select is not None), length=st.integers(1, 80),
       batch=st.integers(1, 2), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_both_loop_orders_match_reference_and_each_other(pattern, length, batch, seed, dtype):
    args = random_inputs(pattern, batch, length, dtype, seed, device=DEVICE)
    results = {}
    indices = None
    for order in ORDERS:
        compiled = nsa_dsl.compile(pattern, slc_fwd=order)
        compiled.poison = True
        o, idx = compiled(**args, indices=indices, return_indices=True)
        indices = idx if indices is None else indices  # the second order gets the first one's blocks
        assert torch.isfinite(o).all(), f"{order}: output left unwritten or broken"
        expected = nsa_dsl.reference(pattern, **upcast(args), indices=indices.to(DEVICE))
        err = rel_error(o, expected)
        assert err < TOLERANCE[dtype], f"{order}: relative error {err:.3e} for {pattern.canonical()}"
        results[order] = _selection_only(pattern, args, order, indices)
    g, b = results["group-centric"], results["block-centric"]
    # The statistics the backward reads: equal up to float rounding, +inf at the same rows.
    assert torch.equal(torch.isinf(g["lse_slc"]), torch.isinf(b["lse_slc"]))
    finite = torch.isfinite(g["lse_slc"])
    assert torch.allclose(g["lse_slc"][finite], b["lse_slc"][finite], rtol=1e-5, atol=1e-4 if dtype == torch.float32
                          else 2e-2)
    assert rel_error(b["o_slc"], g["o_slc"]) < TOLERANCE[dtype]


@settings(max_examples=15)
@given(pattern=valid_patterns(max_group=8).filter(lambda p: p.select is not None), length=st.integers(1, 64),
       seed=st.integers(0, 2**31 - 1))
def test_block_centric_gradients_match_float64_autograd(pattern, length, seed):
    """The backward recomputes from the block-centric forward's statistics."""
    args = random_inputs(pattern, 1, length, torch.float32, seed, device=DEVICE)
    assert_gradients_match_reference(pattern, nsa_dsl.compile(pattern, slc_fwd="block-centric"), args, seed)


SMALL_GROUP = Pattern(name="small_group", heads=Heads(q=4, kv=2), dims=Dims(qk=32, v=16),
                      compress=Compress(block=16, stride=8), select=Select(block=16, top=4, initial=1, local=1),
                      window=Window(size=24))


def test_repeated_and_absent_blocks_in_given_indices():
    """A block listed twice in a row counts once, -1 and future blocks count
    not at all: the same set semantics as the reference, in both orders."""
    p = SMALL_GROUP
    T = 70
    args = random_inputs(p, 1, T, torch.float32, seed=5, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, T // 16 + 2, (1, T, 2, 4), generator=gen, dtype=torch.int32)
    idx[0, :, 0, 1] = idx[0, :, 0, 0]  # repeats
    idx = idx.clamp(max=(T - 1) // 16)  # in range (future blocks stay: block > t // 16 for early t)
    expected = nsa_dsl.reference(p, **upcast(args), indices=idx.to(DEVICE))
    for order in ORDERS:
        c = nsa_dsl.compile(p, slc_fwd=order)
        c.poison = True
        o = c(**args, indices=idx.to(DEVICE))
        assert rel_error(o, expected) < TOLERANCE[torch.float32], order
    # the union list (group-centric) counts a repeated block once too
    listed = nsa_dsl.compile(p, slc_fwd="group-centric", overrides={"SLC_FWD_LIST": 1, "SLC_TOKENS": 4})
    listed.poison = True
    assert rel_error(listed(**args, indices=idx.to(DEVICE)), expected) < TOLERANCE[torch.float32]


def test_inverted_index_slots_and_deduplication():
    idx = torch.tensor([[[[2, 0, 2, -1]], [[1, 1, 0, 3]]]], dtype=torch.int32)  # B=1, T=2, HKV=1, top=4
    # block size 1: position t sees blocks 0..t
    offsets, positions, slots = block_to_positions(idx, 1, 4, with_slots=True)
    entries = []
    for seg in range(4):
        for e in range(int(offsets[seg]), int(offsets[seg + 1])):
            entries.append((seg, int(positions[e]), int(slots[e])))
    # t=0: only block 0 is visible (slot 1); t=1: block 1 first at slot 0, block 0 at slot 2.
    assert entries == [(0, 0, 1), (0, 1, 2), (1, 1, 0)]
    off2, pos2 = block_to_positions(idx, 1, 4)
    assert torch.equal(off2, offsets) and torch.equal(pos2, positions)


def test_plan_chooses_loop_order_by_length():
    paper = nsa_dsl.load("examples/bench_paper128.nsa")
    small = nsa_dsl.load("examples/bench_small_group.nsa")
    # G=16 fills the MMA tile with one position's heads: group-centric while
    # few blocks are visible, block-centric from 32k (on the H200 the
    # block-centric forward was 1.24x slower at 8k, NOTES v11; on the H100
    # at 64k 1.29x faster without the window, NOTES v17).
    plan = check(paper)
    assert plan.block_centric_from == 32768
    assert [plan.loop_order_at(T) for T in (1, 8192, 16384, 32768, 1 << 20)] == (
        ["group-centric"] * 3 + ["block-centric"] * 2)
    # G=2: group-centric while the visible blocks cap the union walk,
    # block-centric from 8k (measured 1.28x faster there, 2.01x at 64k).
    plan = check(small)
    assert plan.block_centric_from == 8192
    assert plan.loop_order_at(4096) == "group-centric"
    assert plan.loop_order_at(plan.block_centric_from - 1) == "group-centric"
    assert plan.loop_order_at(plan.block_centric_from) == "block-centric"
    assert plan.loop_order_at(65536) == "block-centric"
    assert any(f"block-centric from it" in n and "cost model" in n for n in plan.notes)
    assert f"below T={plan.block_centric_from}" in plan.explain()
    for T in (4096, 65536):
        assert launched(plan, "slc_fwd", T) != launched(plan, "slc_fwd_bc", T)
    assert launched(plan, "slc_fwd", 4096) and launched(plan, "slc_fwd_bc", 65536)
    no_select = nsa_dsl.parse("pattern w { heads q=2 kv=1 dims qk=16 window size=16 }")
    assert check(no_select).loop_order_at(100) is None


def test_block_centric_from_is_the_start_of_the_winning_lengths():
    small = nsa_dsl.load("examples/bench_small_group.nsa")
    lengths = (1024, 4096, 16384, 65536, 262144)
    orders = {T: selection_loop_bytes(small, 2, 32, 512, T) for T in lengths}
    start = block_centric_from(orders)
    choices = [orders[T].choice for T in lengths]
    assert start in lengths
    i = lengths.index(start)
    assert set(choices[i:]) == {"block-centric"} and choices[i - 1] == "group-centric"
    assert block_centric_from({T: orders[T] for T in (1024, 4096)}) is None


def test_loop_order_bytes_by_hand():
    # small_group: G=2, top 16 (3 forced), 64-token blocks, d=128, 32 positions per program.
    small = nsa_dsl.load("examples/bench_small_group.nsa")
    block_bytes = 64 * 256 * 2
    # T=128: two blocks, every position selects all it sees (1 then 2 blocks),
    # so the union of a program's positions is the visible blocks.
    got = selection_loop_bytes(small, 2, 32, 512, 128)
    assert got.group_centric == pytest.approx((64 * 1 + 64 * 2) / 128 / 32 * block_bytes + 2 * 256 * 2)
    # block-centric: q once, the partial output written and read (bf16), its
    # lse written and read, the index entry; the block shared by 512 positions
    per_block = 2 * 128 * 2 + 2 * 2 * 128 * 2 + 2 * 2 * 4 + 2 * 4 + block_bytes / 512
    # per position: the -inf fill of 16 slots x 2 heads, the output and lse
    per_position = 16 * 2 * 4 + 2 * (128 * 2 + 4)
    w = BLOCK_CENTRIC_BYTE_WEIGHT
    assert got.block_centric == pytest.approx(w * (1.5 * per_block + per_position))
    # T=64*20: block j (0-based) is seen by 64 positions; from j=16 on they
    # choose 13 of the j-2 unforced visible blocks independently.
    T = 64 * 20
    union = sum(64 * (j + 1) for j in range(16))
    for j in range(16, 20):
        other = j + 1 - 3
        union += 64 * (3 + other * (1 - (1 - 13 / other) ** 32))
    got = selection_loop_bytes(small, 2, 32, 512, T)
    assert got.group_centric == pytest.approx(union / 32 / T * block_bytes + 2 * 256 * 2)
    chosen = (sum(64 * (j + 1) for j in range(16)) + 4 * 64 * 16) / T
    assert got.block_centric == pytest.approx(w * (chosen * per_block + per_position))


def test_deterministic_keeps_the_plans_order_and_bad_orders_are_refused():
    # the block-centric forward reduces without atomics, so
    # deterministic=True no longer forces the group-centric order
    p = nsa_dsl.load("examples/bench_small_group.nsa")
    for T in (1024, 1 << 20):
        assert nsa_dsl.compile(p, slc_fwd="block-centric").slc_fwd_at(T) == "block-centric"
        assert nsa_dsl.compile(p, slc_fwd="group-centric").slc_fwd_at(T) == "group-centric"
        assert nsa_dsl.compile(p, deterministic=True).slc_fwd_at(T) == check(p).loop_order_at(T)
    assert nsa_dsl.compile(p).slc_fwd_at(1 << 20) == "block-centric"
    assert nsa_dsl.compile(p, deterministic=True, slc_fwd="block-centric").slc_fwd_at(1024) == "block-centric"
    with pytest.raises(ValueError, match="slc_fwd: expected"):
        nsa_dsl.compile(p, slc_fwd="blocky")


def test_block_centric_forward_reduces_without_atomics():
    # the block-centric order: per-slot partials and a reduction
    # over the slots, no atomic add anywhere in its kernels
    source = nsa_dsl.compile(nsa_dsl.load("examples/bench_small_group.nsa")).source
    bc = source[source.index("def slc_fwd_bc("):]
    bc = bc[:bc.index("# ---- ")] if "# ---- " in bc else bc
    assert "def slc_fwd_bc_reduce(" in bc
    assert "atomic" not in bc.replace("without atomics", "").replace("No atomics", "")


@settings(max_examples=7)
@given(pattern=valid_patterns().filter(lambda p: p.select is not None), length=st.integers(2, 80),
       batch=st.integers(1, 2), slice_len=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_block_centric_in_slices_equals_one_pass(pattern, length, batch, slice_len, seed):
    """BC_SLICE bounds the partials' memory: the positions run in slices (the
    last one shorter) through one inverted index. Each row's partials and
    their reduction are the same arithmetic whatever the slicing, so the
    branch output and statistics are bit-identical."""
    args = random_inputs(pattern, batch, length, torch.float32, seed, device=DEVICE)
    whole = nsa_dsl.compile(pattern, slc_fwd="block-centric")
    with derived_overrides():
        sliced = nsa_dsl.compile(pattern, slc_fwd="block-centric", overrides={"BC_SLICE": slice_len * batch})
    assert whole.plan.kernel("slc_fwd_bc").const("BC_SLICE") >= 80 * 2
    _, indices = whole(**args, return_indices=True)
    a, b = _intermediates(whole, args, indices), _intermediates(sliced, args, indices)
    assert torch.equal(a["o_slc"], b["o_slc"]) and torch.equal(a["lse_slc"], b["lse_slc"])
    expected = nsa_dsl.reference(pattern, **upcast(args), indices=indices.to(DEVICE))
    assert rel_error(sliced(**args, indices=indices), expected) < TOLERANCE[torch.float32]


@settings(max_examples=4, deadline=None)
@given(pattern=valid_patterns().filter(lambda p: p.select is not None and p.window is not None),
       length=st.integers(1, 70), batch=st.integers(1, 2), slice_len=st.integers(1, 40),
       tokens=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**31 - 1))
def test_block_centric_with_the_window_folded_into_its_reduction(pattern, length, batch, slice_len, tokens, seed):
    """BC_FOLD_WINDOW: slc_fwd_bc_merge_window sums the slots as
    slc_fwd_bc_reduce does (the same o_slc and lse bits) and computes the
    window branch in place of swa_fwd (its o_swa, lse_swa within float32
    tolerance of swa_fwd's), in slices whose tiles of BC_WINDOW_TOKENS
    positions may end past T; the gated output of a call without gradients
    (written by the merge) and the gradients match float64."""
    args = random_inputs(pattern, batch, length, torch.float32, seed, device=DEVICE)
    base = {"BC_SLICE": slice_len * batch}
    with derived_overrides():
        apart = nsa_dsl.compile(pattern, slc_fwd="block-centric", overrides=base)
        group_rows = apart.plan.kernel("slc_fwd_bc").const("GROUP_ROWS")
        tokens = max(tokens, -(-16 // group_rows))  # the tile's dots need 16 rows
        folded = nsa_dsl.compile(pattern, slc_fwd="block-centric",
                                 overrides={**base, "BC_FOLD_WINDOW": 1, "BC_WINDOW_TOKENS": tokens})
    assert folded.plan.window_in_block_centric and not apart.plan.window_in_block_centric
    _, indices = apart(**args, return_indices=True)
    a, b = _intermediates(apart, args, indices), _intermediates(folded, args, indices)
    assert torch.equal(a["o_slc"], b["o_slc"]) and torch.equal(a["lse_slc"], b["lse_slc"])
    assert rel_error(b["o_swa"], a["o_swa"]) < TOLERANCE[torch.float32]
    finite = torch.isfinite(a["lse_swa"])
    assert torch.equal(finite, torch.isfinite(b["lse_swa"]))
    assert torch.allclose(b["lse_swa"][finite], a["lse_swa"][finite], rtol=1e-5, atol=1e-5)
    final = _intermediates(folded, args, indices, final=True)
    if folded.writes_final_output(length):  # the merge wrote o: no branch output kept
        assert "o_swa" not in final and final["o_slc"] is None
    expected = nsa_dsl.reference(pattern, **upcast(args), indices=indices.to(DEVICE))
    assert rel_error(final["o"], expected) < TOLERANCE[torch.float32]
    assert_gradients_match_reference(pattern, folded, args, seed)


@settings(max_examples=3, deadline=None)
@given(pattern=valid_patterns().filter(lambda p: p.select is not None and p.window is not None
                                       and p.select.initial + p.select.local > 0),
       length=st.integers(1, 70), batch=st.integers(1, 2), slice_len=st.integers(1, 40),
       tokens=st.sampled_from([1, 2, 4, 8, 32]), seed=st.integers(0, 2**31 - 1))
def test_block_centric_merge_attends_the_forced_blocks(pattern, length, batch, slice_len, tokens, seed):
    """BC_MERGE_FORCED: with indices from the plan's own scoring the merge
    attends the forced blocks (a tile's positions may span two blocks) and
    slc_fwd_bc the rest: o_slc and lse_slc within float32 tolerance of the
    merge that sums every slot, the window untouched, the gated output of
    a call without gradients against float64. Given indices need not hold
    the forced blocks: there the merge sums every slot, bit for bit."""
    args = random_inputs(pattern, batch, length, torch.float32, seed, device=DEVICE)
    probe = nsa_dsl.compile(pattern, slc_fwd="block-centric")
    tokens = max(tokens, -(-16 // probe.plan.kernel("slc_fwd_bc").const("GROUP_ROWS")))  # 16 rows a dot
    base = {"BC_SLICE": slice_len * batch, "BC_FOLD_WINDOW": 1, "BC_WINDOW_TOKENS": tokens}
    with derived_overrides():
        every_slot = nsa_dsl.compile(pattern, slc_fwd="block-centric", overrides=base)
        forced = nsa_dsl.compile(pattern, slc_fwd="block-centric", overrides={**base, "BC_MERGE_FORCED": 1})
    assert forced.plan.forced_in_merge and not every_slot.plan.forced_in_merge
    a, b = _intermediates(every_slot, args, None), _intermediates(forced, args, None)
    assert torch.equal(a["indices"], b["indices"])
    assert rel_error(b["o_slc"], a["o_slc"]) < TOLERANCE[torch.float32]
    finite = torch.isfinite(a["lse_slc"])
    assert torch.equal(finite, torch.isfinite(b["lse_slc"]))
    assert torch.allclose(b["lse_slc"][finite], a["lse_slc"][finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(a["o_swa"], b["o_swa"]) and torch.equal(a["lse_swa"], b["lse_swa"])
    final = _intermediates(forced, args, None, final=True)
    expected = nsa_dsl.reference(pattern, **upcast(args), indices=b["indices"].to(DEVICE))
    assert rel_error(final["o"], expected) < TOLERANCE[torch.float32]
    given_a, given_b = _intermediates(every_slot, args, a["indices"]), _intermediates(forced, args, a["indices"])
    assert torch.equal(given_a["o_slc"], given_b["o_slc"]) and torch.equal(given_a["lse_slc"], given_b["lse_slc"])


def test_forced_blocks_in_the_merge_train():
    """The backward reads the merge's o_slc and lse_slc: with the forced
    blocks attended there, every gradient still matches float64 (initial
    and local blocks overlapping at the first positions)."""
    pattern = nsa_dsl.parse("pattern f { heads q=4 kv=1 dims qk=16 compress block=16 stride=8"
                            " select block=16 top=4 initial=1 local=2 window size=24 }")
    args = random_inputs(pattern, 1, 75, torch.float32, 5, device=DEVICE)
    with derived_overrides():
        compiled = nsa_dsl.compile(pattern, slc_fwd="block-centric",
                                   overrides={"BC_FOLD_WINDOW": 1, "BC_WINDOW_TOKENS": 4, "BC_MERGE_FORCED": 1})
    assert compiled.plan.forced_in_merge
    assert_gradients_match_reference(pattern, compiled, args, 5)


@st.composite
def _local_in_window_patterns(draw):
    """Patterns whose window covers the local blocks (BC_LOCAL_IN_WINDOW's
    condition), drawn valid and then given such a window: from exactly
    LOCAL blocks long to a little past."""
    from dataclasses import replace

    p = draw(valid_patterns().filter(lambda p: p.select is not None and p.window is not None
                                     and p.select.local > 0))
    least = p.select.local * p.select.block
    return replace(p, window=Window(size=draw(st.integers(least, least + 40))))


def _merge_launches(compiled, record: list):
    """Record the BC_LOCAL_IN_WINDOW of every merge launch of compiled."""
    compiled.module.slc_fwd_bc_merge_window = LaunchSpy(compiled.module.slc_fwd_bc_merge_window,
                                                        "BC_LOCAL_IN_WINDOW", record)


@settings(max_examples=2, deadline=None)  # (three took 117 s of the CPU suite)
@given(pattern=_local_in_window_patterns(), length=st.integers(1, 110), batch=st.integers(1, 2),
       slice_len=st.integers(1, 48), seed=st.integers(0, 2**31 - 1))
def test_merge_scores_the_local_blocks_once_for_window_and_selection(pattern, length, batch, slice_len, seed):
    """BC_LOCAL_IN_WINDOW: the merge's window reads the same keys as the
    forced local blocks, so their key tiles are scored once for both (the
    window's tiles below them aligned to end there). Every branch output
    and statistic within float32 tolerance of the merge that attends the
    forced blocks apart, the gated output of a call without gradients
    against float64; with the window on its own keys (k_swa, v_swa) the
    merge takes the separate path, and agrees again."""
    args = random_inputs(pattern, batch, length, torch.float32, seed, device=DEVICE)
    block = pattern.select.block
    probe = nsa_dsl.compile(pattern, slc_fwd="block-centric")
    tokens = max(-(-16 // probe.plan.kernel("slc_fwd_bc").const("GROUP_ROWS")), 1)  # 16 rows a dot
    base = {"BC_SLICE": slice_len * batch, "BC_FOLD_WINDOW": 1, "BC_WINDOW_TOKENS": tokens, "BC_MERGE_FORCED": 1,
            "SWA_BLOCK_N": 16}
    with derived_overrides():
        apart = nsa_dsl.compile(pattern, slc_fwd="block-centric", overrides=base)
        shared = nsa_dsl.compile(pattern, slc_fwd="block-centric", overrides={**base, "BC_LOCAL_IN_WINDOW": 1})
    assert shared.plan.local_in_window and not apart.plan.local_in_window and block % tokens == 0
    launches = []
    _merge_launches(shared, launches)
    a, b = _intermediates(apart, args, None), _intermediates(shared, args, None)
    assert launches and all(launches)  # the shared path ran, every slice
    assert torch.equal(a["indices"], b["indices"])
    for name in ("o_slc", "o_swa"):
        assert rel_error(b[name], a[name]) < TOLERANCE[torch.float32], name
    for name in ("lse_slc", "lse_swa"):
        finite = torch.isfinite(a[name])
        assert torch.equal(finite, torch.isfinite(b[name])), name
        assert torch.allclose(b[name][finite], a[name][finite], rtol=1e-5, atol=1e-5), name
    final = _intermediates(shared, args, None, final=True)
    expected = nsa_dsl.reference(pattern, **upcast(args), indices=b["indices"].to(DEVICE))
    assert rel_error(final["o"], expected) < TOLERANCE[torch.float32]

    launches.clear()
    own_keys = random_inputs(pattern, batch, length, torch.float32, seed, separate_window_kv=True, device=DEVICE)
    out_shared, out_apart = shared(**own_keys), apart(**own_keys)
    assert launches and not any(launches)
    assert rel_error(out_shared, out_apart) < TOLERANCE[torch.float32]


def test_local_blocks_scored_once_train():
    """The backward reads the shared pass's o_swa, lse_swa, o_slc and
    lse_slc: every gradient matches float64, with the initial block inside
    the local ones at the first positions and the window exactly LOCAL
    blocks long."""
    pattern = nsa_dsl.parse("pattern f { heads q=4 kv=1 dims qk=16 compress block=16 stride=8"
                            " select block=16 top=4 initial=1 local=2 window size=32 }")
    args = random_inputs(pattern, 1, 75, torch.float32, 6, device=DEVICE)
    with derived_overrides():
        compiled = nsa_dsl.compile(pattern, slc_fwd="block-centric",
                                   overrides={"BC_FOLD_WINDOW": 1, "BC_WINDOW_TOKENS": 4, "BC_MERGE_FORCED": 1,
                                              "SWA_BLOCK_N": 16, "BC_LOCAL_IN_WINDOW": 1})
    launches = []
    _merge_launches(compiled, launches)
    assert_gradients_match_reference(pattern, compiled, args, 6)
    assert launches and all(launches)


def test_local_blocks_in_the_window_needs_a_window_that_covers_them():
    from nsa_dsl.plan import apply_overrides

    def plan(window: int, local: int = 2, heads: int = 4):
        return nsa_dsl.check(nsa_dsl.parse(f"pattern f {{ heads q={heads} kv=1 dims qk=16 compress block=16 stride=8"
                                           f" select block=32 top=4 initial=1 local={local} window size={window} }}"))

    flags = {"BC_FOLD_WINDOW": 1, "BC_MERGE_FORCED": 1, "SWA_BLOCK_N": 16}
    assert plan(64).kernel("slc_fwd_bc").const("BC_WINDOW_TOKENS") == 16  # 4 heads: 16 positions a tile
    with pytest.raises(ValueError, match="BC_LOCAL_IN_WINDOW: needs the window \\(63\\) at least LOCAL"):
        apply_overrides(plan(63), {**flags, "BC_LOCAL_IN_WINDOW": 1})
    with pytest.raises(ValueError, match="SWA_BLOCK_N \\(64\\) dividing the block"):
        apply_overrides(plan(64), {**flags, "SWA_BLOCK_N": 64, "BC_LOCAL_IN_WINDOW": 1})
    # one head: tiles of 64 positions, past a block of 32
    with pytest.raises(ValueError, match="BC_WINDOW_TOKENS \\(64\\)"):
        apply_overrides(plan(64, heads=1), {**flags, "BC_LOCAL_IN_WINDOW": 1})
    with pytest.raises(ValueError, match="BC_LOCAL_IN_WINDOW: the pattern forces no local blocks"):
        apply_overrides(plan(64, local=0), {**flags, "BC_LOCAL_IN_WINDOW": 1})
    assert apply_overrides(plan(64), {**flags, "BC_LOCAL_IN_WINDOW": 1}).local_in_window
    # set first, then a tile that breaks it: still refused
    with pytest.raises(ValueError, match="SWA_BLOCK_N \\(64\\) dividing the block"):
        apply_overrides(apply_overrides(plan(64), {**flags, "BC_LOCAL_IN_WINDOW": 1}), {"SWA_BLOCK_N": 64})


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 17)), n_blocks=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_pairwise_first_occurrence_equals_the_sorted_one(shape, n_blocks, seed):
    # the inverted index's duplicate test (pairs of slots) against the
    # reference's (a sort per row), on rows full of repeats and -1
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, n_blocks, shape, generator=gen, dtype=torch.int32)
    assert torch.equal(first_in_row(idx), first_occurrence(idx.long()))


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 60), B=st.integers(1, 2), HKV=st.integers(1, 2), top=st.integers(1, 6),
       block=st.sampled_from([1, 4, 16]), slice_len=st.sampled_from([None, 7, 32]), seed=st.integers(0, 2**31 - 1))
def test_distinct_rows_skip_the_duplicate_test_and_change_nothing(T, B, HKV, top, block, slice_len, seed):
    # rows as the scoring writes them (distinct blocks, -1 padded): the
    # index built without the duplicate test is the same index
    n_blocks = -(-T // block)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, T, HKV, n_blocks, generator=gen)
    take = min(top, n_blocks)
    idx = torch.full((B, T, HKV, top), -1, dtype=torch.int32)
    idx[..., :take] = scores.topk(take, dim=-1).indices.to(torch.int32)
    checked = block_to_positions(idx, block, n_blocks, with_slots=True, slice_len=slice_len)
    trusted = block_to_positions(idx, block, n_blocks, with_slots=True, slice_len=slice_len, distinct=True)
    for a, b in zip(checked, trusted):
        assert torch.equal(a, b)


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 50), B=st.integers(1, 2), kv=st.sampled_from([1, 2]), top=st.integers(3, 6),
       slice_len=st.sampled_from([None, 5, 16]), skip=st.booleans(), distinct=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_index_keys_kernel_builds_the_same_index(T, B, kv, top, slice_len, skip, distinct, seed):
    # slc_index_keys (one kernel) against the torch steps, on rows with
    # repeats, -1 and blocks past the position (distinct: rows as the
    # scoring writes them), slices, and the forced blocks dropped or kept
    pattern = nsa_dsl.parse(f"pattern ix {{ heads q={2 * kv} kv={kv} dims qk=16 compress block=16 stride=8"
                            f" select block=16 top={top} initial=1 local=2 window size=16 }}")
    compiled = nsa_dsl.compile(pattern, slc_fwd="block-centric")
    n_blocks = -(-T // 16)
    gen = torch.Generator().manual_seed(seed)
    if distinct:
        take = min(top, n_blocks)
        idx = torch.full((B, T, kv, top), -1, dtype=torch.int32)
        idx[..., :take] = torch.rand(B, T, kv, n_blocks, generator=gen).topk(take, dim=-1).indices.to(torch.int32)
    else:
        idx = torch.randint(-1, n_blocks + 1, (B, T, kv, top), generator=gen, dtype=torch.int32)
    idx = idx.to(DEVICE)
    kwargs = dict(with_slots=True, slice_len=slice_len, skip_forced=(1, 2) if skip else None, distinct=distinct)
    by_torch = block_to_positions(idx, 16, n_blocks, **kwargs)
    by_kernel = block_to_positions(idx, 16, n_blocks, keys_fn=partial(index_keys, compiled), **kwargs)
    for a, b in zip(by_torch, by_kernel):
        assert torch.equal(a, b)


def test_sliced_inverted_index_numbers_segments_slice_major():
    idx = torch.tensor([[[[0, 1]], [[1, 0]], [[0, 2]], [[2, 1]]]], dtype=torch.int32)  # B=1, T=4, HKV=1, top=2
    # block size 1, slices of 2 positions: slice 0 holds t=0,1, slice 1 t=2,3
    offsets, positions, slots = block_to_positions(idx, 1, 4, with_slots=True, slice_len=2)
    assert offsets.numel() == 2 * 4 + 1
    entries = []
    for seg in range(8):
        for e in range(int(offsets[seg]), int(offsets[seg + 1])):
            entries.append((seg // 4, seg % 4, int(positions[e]), int(slots[e])))
    # t=0 sees block 0 only; t=1 blocks 1 (slot 0) and 0 (slot 1); t=2 blocks
    # 0 and 2; t=3 blocks 2 (slot 0) and 1 (slot 1). Positions stay absolute.
    assert entries == [(0, 0, 0, 0), (0, 0, 1, 1), (0, 1, 1, 0),
                       (1, 0, 2, 0), (1, 1, 3, 1), (1, 2, 2, 1), (1, 2, 3, 0)]


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 90), B=st.integers(1, 2), HKV=st.integers(1, 3), top=st.integers(1, 5),
       block=st.sampled_from([1, 4, 16]), slice_len=st.integers(1, 40), chunk=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1))
def test_chunk_table_covers_each_slices_entries_once(T, B, HKV, top, block, slice_len, chunk, seed):
    # the forward's sync-free chunking: the chunks a slice's launch finds
    # (slice_first[i] + program < slice_first[i + 1], program < grid) cover
    # every entry of that slice's segments exactly once, each chunk inside
    # one segment and at most `chunk` long
    n_blocks = -(-T // block)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, n_blocks, (B, T, HKV, top), generator=gen, dtype=torch.int32)
    n_slices = -(-T // slice_len)
    offsets, positions, slots = block_to_positions(idx, block, n_blocks, with_slots=True, slice_len=slice_len)
    assert positions.numel() == B * T * HKV * top  # dropped entries sorted past offsets[-1]
    table = chunk_table(offsets, chunk, n_slices, B * slice_len * HKV * top)
    per_slice = B * HKV * n_blocks
    seen = torch.zeros(int(offsets[-1]), dtype=torch.int64)
    for i in range(n_slices):
        first, last = int(table["slice_first"][i]), int(table["slice_first"][i + 1])
        assert last - first <= table["grid"]
        for c in range(first, last):
            seg, start, end = int(table["segment"][c]), int(table["start"][c]), int(table["end"][c])
            assert i * per_slice <= seg < (i + 1) * per_slice
            assert int(offsets[seg]) <= start < end <= int(offsets[seg + 1]) and end - start <= chunk
            seen[start:end] += 1
            for e in range(start, end):
                assert int(positions[e]) // slice_len == i
    assert torch.equal(seen, torch.ones_like(seen))


def test_block_centric_reduction_settings_are_checked():
    p = nsa_dsl.load("examples/bench_small_group.nsa")  # G=2
    with pytest.raises(ValueError, match="BC_REDUCE_STAGES: must be in 1..8"):
        nsa_dsl.compile(p, overrides={"BC_REDUCE_STAGES": 0})
    # the tuner tries the reduction's tile and stages
    tried = candidates(check(p), "slc_fwd_bc")
    assert {"BC_REDUCE_STAGES": 3} in tried and {"BC_REDUCE_ROWS": 16} in tried


def _list_fits(p: Pattern) -> bool:
    plan = check(p)
    k = plan.kernel("slc_fwd")
    return k.const("SLC_TOKENS") * k.const("TOP_PAD") <= SLC_LIST_MAX


@settings(max_examples=12)
@given(pattern=valid_patterns().filter(lambda p: p.select is not None and _list_fits(p)),
       length=st.integers(1, 96), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_union_list_equals_the_union_walk(pattern, length, seed, dtype):
    # SLC_FWD_LIST visits the same blocks in the same order as the while-walk,
    # so outputs and log-sum-exps are bit-identical, and right.
    args = random_inputs(pattern, 1, length, dtype, seed, device=DEVICE)
    walk = nsa_dsl.compile(pattern)
    listed = nsa_dsl.compile(pattern, overrides={"SLC_FWD_LIST": 1})
    assert listed.plan.kernel("slc_fwd").const("SLC_FWD_LIST") == 1
    for c in (walk, listed):
        c.poison = True
    o_walk, indices = walk(**args, return_indices=True)
    o_list = listed(**args, indices=indices)
    assert torch.equal(o_walk, o_list)
    expected = nsa_dsl.reference(pattern, **upcast(args), indices=indices.to(DEVICE))
    assert rel_error(o_list, expected) < TOLERANCE[dtype]
    gates = {b: args.get(f"g_{b.value}") for b in Branch}
    stats = []
    for c in (walk, listed):
        shapes = validate_inputs(pattern, args["q"], args["k"], args["v"], gates, k_cmp=args.get("k_cmp"),
                                 v_cmp=args.get("v_cmp"), k_swa=args.get("k_swa"), v_swa=args.get("v_swa"),
                                 indices=indices, scale=None)
        out = c.forward(args["q"], args["k"], args["v"], gates, k_cmp=args.get("k_cmp"), v_cmp=args.get("v_cmp"),
                        k_swa=args.get("k_swa"), v_swa=args.get("v_swa"), indices=indices,
                        scale=pattern.dims.qk ** -0.5, shapes=shapes)
        stats.append(out["lse_slc"])
    assert torch.equal(stats[0], stats[1])


def _dq_list_fits(p: Pattern) -> bool:
    if Branch.SLC not in p.combined_branches:  # selection only ranks: no selection backward
        return False
    k = check(p).kernel("slc_bwd")
    return k.const("SLC_BWD_DQ_TOKENS") * k.const("TOP_PAD") <= SLC_LIST_MAX


@settings(max_examples=6)
@given(pattern=valid_patterns(max_group=8).filter(lambda p: p.select is not None and _dq_list_fits(p)),
       length=st.integers(1, 64), seed=st.integers(0, 2**31 - 1),
       strategy=st.sampled_from(["inverted-index", "atomic"]))
def test_backward_union_list_gives_the_same_gradients(pattern, length, seed, strategy):
    # SLC_BWD_DQ_LIST walks the same blocks in the same order as the
    # while-walk: bit-identical gradients, with either dK/dV strategy (the
    # atomic one adds dK/dV inside the same loop).
    args = random_inputs(pattern, 1, length, torch.float32, seed, device=DEVICE)
    grads = []
    indices = None
    for flag in (0, 1):
        compiled = nsa_dsl.compile(pattern, slc_dkdv=strategy, overrides={"SLC_BWD_DQ_LIST": flag})
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items() if isinstance(t, torch.Tensor)}
        out, idx = compiled(**leaves, indices=indices, return_indices=True)
        indices = idx if indices is None else indices
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype))
        grads.append({n: t.grad for n, t in leaves.items()})
    assert grads[0]["q"] is not None
    for name, g in grads[0].items():
        # an input that reaches the output only through the top-n choice
        # (k_cmp, v_cmp of pool=mlp when the compressed branch is not
        # combined) has no gradient in either run
        if g is None:
            assert grads[1][name] is None, name
            continue
        assert torch.equal(g, grads[1][name]), name


@settings(max_examples=4)
@given(pattern=valid_patterns(max_group=8).filter(lambda p: p.select is not None
                                                 and Branch.SLC in p.combined_branches),
       length=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
def test_one_position_selection_dq_on_its_own_warps_matches_float64_autograd(pattern, length, seed):
    # slc_bwd_dq with one position a program (its own blocks, no union to
    # mask), its list loop prefetched and launched on its own warp count
    # (SLC_BWD_DQ_WARPS, SLC_BWD_DQ_STAGES): the float64 gradients.
    overrides = {"SLC_BWD_DQ_TOKENS": 1, "SLC_BWD_DQ_LIST": 1, "SLC_BWD_DQ_WARPS": 2, "SLC_BWD_DQ_STAGES": 3}
    compiled = nsa_dsl.compile(pattern, overrides=overrides)
    assert compiled.plan.kernel("slc_bwd").warps_for("slc_bwd_dq") == 2
    assert_gradients_match_reference(pattern, compiled, random_inputs(pattern, 2, length, torch.float32, seed,
                                                                      device=DEVICE), seed)


def test_a_group_of_16_heads_takes_the_one_position_selection_dq_by_default():
    """The plan's slc_bwd_dq for a group of 16+ heads at d <= 128 (NOTES v25):
    one position a program on 2 warps, a list loop 3 stages deep (the walk
    where TOP_PAD passes SLC_LIST_MAX), k and v through descriptors; the
    float64 gradients with those defaults. Smaller groups and wider heads
    keep the 64-row union walk on 4 warps (the hypothesis tests' patterns,
    G <= 8, run it)."""
    def slc_bwd(text: str):
        return check(nsa_dsl.parse(text)).kernel("slc_bwd")
    names = ("SLC_BWD_DQ_TOKENS", "SLC_BWD_DQ_LIST", "SLC_BWD_DQ_WARPS", "SLC_BWD_DQ_STAGES", "SLC_BWD_DQ_TMA")
    text = """pattern g16 { heads q=16 kv=1
                            dims qk=16
                            compress block=8 stride=4
                            select block=16 top=3 initial=1 local=1
                            window size=24 }"""
    assert tuple(slc_bwd(text).const(n) for n in names) == (1, 1, 2, 3, 1)
    assert slc_bwd(text.replace("top=3", "top=300")).const("SLC_BWD_DQ_LIST") == 0
    assert tuple(slc_bwd(text.replace("q=16", "q=8")).const(n) for n in names) == (8, 0, 4, 1, 0)
    assert slc_bwd(text.replace("qk=16", "qk=192")).const("SLC_BWD_DQ_TOKENS") == 1  # 16 rows, the walk
    assert slc_bwd(text.replace("qk=16", "qk=192")).const("SLC_BWD_DQ_WARPS") == 4
    pattern = nsa_dsl.parse(text)
    compiled = nsa_dsl.compile(pattern)
    assert_gradients_match_reference(pattern, compiled, random_inputs(pattern, 2, 70, torch.float32, 3,
                                                                      device=DEVICE), 3)


@settings(max_examples=8)
@given(pattern=valid_patterns(max_group=8).filter(lambda p: p.select is not None
                                                 and Branch.SLC in p.combined_branches),
       length=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
def test_keys_major_selection_dkdv_matches_float64_autograd(pattern, length, seed):
    # SLC_BWD_KEYS_MAJOR: the block-centric dK/dV kernel computes S^T, P^T
    # and dS^T ([keys, rows]) instead of transposing P and dS. Every
    # gradient must match.
    compiled = nsa_dsl.compile(pattern, slc_dkdv="inverted-index", overrides={"SLC_BWD_KEYS_MAJOR": 1})
    assert compiled.plan.kernel("slc_bwd").const("SLC_BWD_KEYS_MAJOR") == 1
    args = random_inputs(pattern, 1 + seed % 2, length, torch.float32, seed, device=DEVICE)
    assert_gradients_match_reference(pattern, compiled, args, seed)


@settings(max_examples=7)
@given(pattern=valid_patterns(need_window=True).filter(lambda p: p.select is not None),
       length=st.integers(1, 80), batch=st.integers(1, 2), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_window_folded_into_the_selection_forward(pattern, length, batch, seed, dtype):
    # SLC_FWD_WINDOW: slc_fwd computes the window branch for its own rows
    # and swa_fwd is not launched. It must leave o_swa and lse_swa as
    # swa_fwd does (the backward reads both), and the output right.
    args = random_inputs(pattern, batch, length, dtype, seed, device=DEVICE)
    separate = nsa_dsl.compile(pattern, slc_fwd="group-centric")
    folded = nsa_dsl.compile(pattern, slc_fwd="group-centric", overrides={"SLC_FWD_WINDOW": 1})
    assert folded.plan.kernel("slc_fwd").const("SLC_FWD_WINDOW") == 1
    o_separate, indices = separate(**args, return_indices=True)
    folded.poison = True
    o_folded = folded(**args, indices=indices)
    assert torch.isfinite(o_folded).all(), "output left unwritten"
    expected = nsa_dsl.reference(pattern, **upcast(args), indices=indices.to(DEVICE))
    assert rel_error(o_folded, expected) < TOLERANCE[dtype]
    mine, theirs = _intermediates(folded, args, indices), _intermediates(separate, args, indices)
    assert rel_error(mine["o_swa"], theirs["o_swa"]) < TOLERANCE[dtype]
    # log2-sum-exp2 of the same scores summed in another key order
    torch.testing.assert_close(mine["lse_swa"], theirs["lse_swa"], rtol=1e-5, atol=1e-5)
    # the block-centric order has no group tile to fold into: swa_fwd runs
    block_centric = nsa_dsl.compile(pattern, slc_fwd="block-centric", overrides={"SLC_FWD_WINDOW": 1})
    assert torch.equal(_intermediates(block_centric, args, indices)["o_swa"], theirs["o_swa"])


@settings(max_examples=5)
@given(pattern=valid_patterns(need_window=True, max_group=8).filter(lambda p: p.select is not None),
       length=st.integers(1, 48), seed=st.integers(0, 2**31 - 1))
def test_window_folded_into_the_selection_forward_trains(pattern, length, seed):
    # the backward reads o_swa and lse_swa from the folded kernel
    compiled = nsa_dsl.compile(pattern, slc_fwd="group-centric", overrides={"SLC_FWD_WINDOW": 1})
    args = random_inputs(pattern, 1, length, torch.float32, seed, device=DEVICE)
    assert_gradients_match_reference(pattern, compiled, args, seed)


def test_window_fold_needs_a_window():
    no_window = Pattern("no_window", Heads(q=4, kv=2), Dims(qk=32, v=32), compress=Compress(block=8, stride=4),
                        select=Select(block=16, top=2, initial=1, local=1))
    with pytest.raises(ValueError, match="SLC_FWD_WINDOW: no kernel of pattern 'no_window' uses it"):
        nsa_dsl.compile(no_window, overrides={"SLC_FWD_WINDOW": 1})


@settings(max_examples=9)
@given(pattern=valid_patterns().filter(lambda p: p.select is not None), length=st.integers(1, 80),
       batch=st.integers(1, 2), seed=st.integers(0, 2**31 - 1), fold=st.booleans(), order=st.sampled_from(ORDERS),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_a_call_without_gradients_has_the_selection_kernel_write_the_output(pattern, length, batch, seed, fold,
                                                                            order, dtype):
    # WRITE_FINAL: with nothing to differentiate, the selection writes the
    # gated sum itself (reading o_cmp back) where it is combined: slc_fwd
    # where a combined window is folded into it, the block-centric slot
    # reduction always (swa_fwd runs first); no selection output is kept.
    # The output must equal the training call's and the reference.
    fold = fold and pattern.window is not None
    compiled = nsa_dsl.compile(pattern, slc_fwd=order, overrides={"SLC_FWD_WINDOW": 1} if fold else None)
    combined = pattern.combined_branches
    expect_fused = Branch.SLC in combined and (order == "block-centric" or fold or Branch.SWA not in combined)
    assert compiled.writes_final_output(length) == expect_fused
    args = random_inputs(pattern, batch, length, dtype, seed, device=DEVICE)
    compiled.poison = True
    o, indices = compiled(**args, return_indices=True)  # no input requires a gradient
    assert torch.isfinite(o).all(), "output left unwritten"
    expected = nsa_dsl.reference(pattern, **upcast(args), indices=indices.to(DEVICE))
    assert rel_error(o, expected) < TOLERANCE[dtype]
    leaves = {n: t.clone().requires_grad_(True) for n, t in args.items() if isinstance(t, torch.Tensor)}
    assert rel_error(o, compiled(**leaves, indices=indices)) < TOLERANCE[dtype]  # the autograd path's combine
    out = _intermediates(compiled, args, indices, final=True)
    assert (out["o_slc"] is None) == expect_fused and torch.equal(out["o"], o)
