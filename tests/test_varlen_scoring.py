"""Packed sequences (cu_seqlens, issue 21) through the block scoring:
slc_topk (ranked selections) and slc_topk_static (static ones), run by
select_blocks (compression and scoring only).

What is checked, for random packings that include empty sequences and
lengths at the edges of the compression and selection blocks:
- the packed indices, in both layouts ([total, ...] and [1, total, ...]),
  are bitwise those of each sequence run alone through the fixed-length
  path: each program of a packed call scores the very tiles of the
  fixed-length call, rebased onto its sequence, with per-sequence block
  numbers and forced blocks;
- with the compressed keys through a tensor descriptor (TOPK_TMA, which
  Triton's interpreter reads too) and through pointers: a descriptor read
  past a sequence's compressed tokens sees the next sequence's (or the
  pooled buffer's unused, NaN-poisoned rows), which must not leak in;
  NaN and inf in the next sequence's keys change no index of the others.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nsa_dsl
from nsa_dsl import launch, varlen
from nsa_dsl.ir import Compress, Dims, Heads, Pattern, Pool, Select
from strategies import cu_seqlens_of, packed_inputs


@functools.lru_cache(maxsize=None)
def _compiled(pattern: Pattern):
    compiled = nsa_dsl.compile(pattern)
    compiled.poison = True  # every buffer a kernel fills starts as NaN (indices as -7)
    return compiled


@contextlib.contextmanager
def _descriptors(tma: bool):
    """TOPK_TMA (and CMP_TMA) as the plan has them, or the pointer path
    (the run-time fallback, forced)."""
    real = launch._tma_fits
    if not tma:
        launch._tma_fits = lambda *tensors: False
    try:
        yield
    finally:
        launch._tma_fits = real


def _packed(compiled, args: dict, cu, leading: bool) -> torch.Tensor:
    lead = {n: t[None] for n, t in args.items()} if leading else args
    lengths = (cu[1:] - cu[:-1]).tolist()
    idx = compiled.select_blocks(**lead, cu_seqlens=cu, max_seqlen=max(lengths, default=0))
    total, hkv, top = args["q"].shape[0], compiled.pattern.heads.kv, compiled.pattern.select.top
    assert idx.shape == ((1, total, hkv, top) if leading else (total, hkv, top))
    return idx[0] if leading else idx


def _alone(compiled, args: dict, cu, s: int) -> torch.Tensor:
    """Sequence s's indices from the fixed-length path, [T_s, HKV, top]."""
    a, b = int(cu[s]), int(cu[s + 1])
    one = {n: args[n][a:b][None] for n in ("q", "k", "v")}
    if "k_cmp" in args:
        cu_c = varlen.compressed_seqlens(compiled.pattern, cu)
        ca, cb = int(cu_c[s]), int(cu_c[s + 1])
        one["k_cmp"], one["v_cmp"] = args["k_cmp"][ca:cb][None], args["v_cmp"][ca:cb][None]
    return compiled.select_blocks(**one)[0]


def _check_packing(pattern: Pattern, lengths, dtype, seed: int, tma: bool, leading: bool) -> None:
    compiled = _compiled(pattern)
    args, cu = packed_inputs(pattern, lengths, dtype, seed, gates=False)
    with _descriptors(tma):
        idx = _packed(compiled, args, cu, leading)
        assert (idx >= -1).all(), "indices left unwritten (poison value)"
        for s, n in enumerate(lengths):
            if n:
                alone = _alone(compiled, args, cu, s)
                a = int(cu[s])
                assert torch.equal(idx[a:a + n], alone), f"sequence {s} (length {n}) of {list(lengths)}"


def _pattern(*, g: int, kv: int, qk: int, stride: int, block_mult: int, slc_block: int, top: int, initial: int,
             local: int, pool: Pool = Pool.MEAN) -> Pattern:
    return Pattern(name="packed_scoring", heads=Heads(q=g * kv, kv=kv), dims=Dims(qk=qk, v=16),
                   compress=Compress(block=stride * block_mult, stride=stride, pool=pool),
                   select=Select(block=slc_block, top=top, initial=initial, local=local))


@st.composite
def ranked_patterns(draw) -> Pattern:
    """Small patterns with a ranked selection: groups of 1, 2 or 4 heads,
    l = d, 2d or 3d (no strided overlap where a token reaches two blocks on,
    l = 3d = 48 > l' + d, or a chunk's tokens are padded, d = 2), top up to 3
    past the forced blocks or wider than a 16-block scoring chunk (its keys
    widened to the set's slots)."""
    g = draw(st.sampled_from([1, 2, 4]))
    stride = draw(st.sampled_from([2, 4, 8, 16]))
    slc_block = draw(st.sampled_from([b for b in (16, 32) if b % stride == 0]))
    initial, local = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    forced = initial + local
    top = draw(st.integers(17, 20)) if draw(st.integers(0, 3)) == 3 else draw(st.integers(forced + 1, forced + 3))
    return _pattern(g=g, kv=draw(st.sampled_from([1, 2])), qk=draw(st.sampled_from([16, 32])), stride=stride,
                    block_mult=draw(st.integers(1, 3)), slc_block=slc_block, top=top, initial=initial, local=local,
                    pool=draw(st.sampled_from([Pool.MEAN, Pool.MLP])))


@st.composite
def packings(draw, pattern: Pattern) -> tuple:
    """1 to 5 sequence lengths, from the edges (0, 1, l - 1, l, l', multiples
    of l' and past them) or anywhere up to 130."""
    c, s = pattern.compress, pattern.select
    edges = sorted({0, 1, c.block - 1, c.block, c.block + 1, s.block - 1, s.block, s.block + 1, 2 * s.block,
                    3 * s.block + 5})
    one = st.one_of(st.sampled_from(edges), st.integers(0, 130))
    # (at least one position in all: an empty call is refused before any kernel)
    return tuple(draw(st.lists(one, min_size=1, max_size=5).filter(lambda lengths: sum(lengths) > 0)))


@settings(max_examples=5, deadline=None)
@given(data=st.data(), pattern=ranked_patterns(), dtype=st.sampled_from([torch.float32, torch.float16]),
       tma=st.booleans(), leading=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_packings_score_each_sequence_alone(data, pattern, dtype, tma, leading, seed):
    lengths = data.draw(packings(pattern), label="lengths")
    _check_packing(pattern, lengths, dtype, seed, tma, leading)


# Each of the plan's scoring decisions both ways, whatever the draws above:
# strided overlap 1 and 0 (d = 2: a chunk's tokens padded), a top set wider
# than a chunk (its keys widened to the set's slots), one head a group
# and four (heads in thread), and the edge-forced shortcut (hidden tokens
# scored unmasked: keys past a sequence's end multiplied in).
FIXED = {
    "strided-sorted-g4": _pattern(g=4, kv=2, qk=16, stride=8, block_mult=2, slc_block=16, top=3, initial=1, local=1),
    "products-g1": _pattern(g=1, kv=1, qk=32, stride=2, block_mult=3, slc_block=16, top=4, initial=1, local=1),
    "wide-top-g2": _pattern(g=2, kv=1, qk=16, stride=4, block_mult=2, slc_block=16, top=18, initial=1, local=2),
    "edge-forced-g2": _pattern(g=2, kv=2, qk=16, stride=4, block_mult=1, slc_block=16, top=3, initial=0, local=2),
    # 8 heads a group: tiles of 8 positions, whose chunks wholly in the
    # past skip the causal mask (the open chunks) and whose overlap is
    # broadcast products, not a dot
    "open-chunks-g8": _pattern(g=8, kv=1, qk=16, stride=4, block_mult=2, slc_block=16, top=3, initial=1, local=1),
}
LENGTHS = (0, 1, 7, 8, 15, 16, 17, 40, 0, 93)


def _consts(pattern: Pattern) -> dict:
    k = nsa_dsl.check(pattern).kernel("slc_topk")
    return {**{n: k.const(n) for n in ("TOPK_STRIDED_OVERLAP", "TOPK_HEADS_IN_THREAD", "TOPK_EDGE_FORCED")},
            "chunk narrower than the set": int(k.const("TOPK_CHUNK_BLOCKS_PAD") < k.const("TOP_PAD"))}


def test_fixed_patterns_take_both_ways_of_each_scoring_decision():
    seen = {}
    for pattern in FIXED.values():
        for name, value in _consts(pattern).items():
            seen.setdefault(name, set()).add(value)
    assert seen == {name: {0, 1} for name in seen}, seen


# every decision's both ways through descriptors; the pointer path (the
# run-time fallback) on one of them, the property test draws it too
@pytest.mark.parametrize("name, tma", [(name, True) for name in sorted(FIXED)] + [("strided-sorted-g4", False)],
                         ids=[f"tma-{name}" for name in sorted(FIXED)] + ["pointers-strided-sorted-g4"])
def test_edge_lengths_score_each_sequence_alone(name, tma):
    pattern = FIXED[name]
    lengths = tuple(n for n in LENGTHS)
    _check_packing(pattern, lengths, torch.float16 if tma else torch.float32, seed=len(name), tma=tma,
                   leading=tma)


STATIC = Pattern(name="packed_static", heads=Heads(q=4, kv=2), dims=Dims(qk=16, v=16),
                 select=Select(block=16, top=3, initial=1, local=2))
STATIC_WITH_COMPRESS = _pattern(g=2, kv=1, qk=16, stride=4, block_mult=2, slc_block=16, top=2, initial=1, local=1)


@pytest.mark.parametrize("pattern", [STATIC, STATIC_WITH_COMPRESS], ids=["select-only", "with-compress"])
@pytest.mark.parametrize("leading", [True, False], ids=["1-total", "total"])
def test_static_selection_packed_equals_each_sequence_alone(pattern, leading):
    assert nsa_dsl.check(pattern).static_selection
    lengths = (16, 0, 1, 47, 33, 15)
    _check_packing(pattern, lengths, torch.float32, seed=3, tma=True, leading=leading)
    # and the forced blocks themselves, counted from each sequence's start
    compiled = _compiled(pattern)
    args, cu = packed_inputs(pattern, lengths, torch.float32, seed=4, gates=False)
    idx = _packed(compiled, args, cu, leading)
    s = pattern.select
    for a, n in zip(cu.tolist(), lengths):
        for t in range(n):
            last = t // s.block
            want = sorted({j for j in range(last + 1) if j < s.initial or j > last - s.local})
            want += [-1] * (s.top - len(want))
            assert idx[a + t, 0].tolist() == want, (a, t)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the poisoned sequence's own products
@pytest.mark.parametrize("name", ["edge-forced-g2", "products-g1"])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_next_sequence_keys_do_not_leak(name, tma, poison):
    """NaN or inf in one sequence's keys (and so in its compressed keys,
    which a descriptor read past the previous sequence's end reaches)
    changes no index of any other sequence."""
    pattern = FIXED[name]
    compiled = _compiled(pattern)
    lengths = (37, 29, 50, 20)
    args, cu = packed_inputs(pattern, lengths, torch.float32, seed=11, gates=False)
    with _descriptors(tma):
        clean = _packed(compiled, args, cu, leading=False)
        for s in (1, 3):
            a, b = int(cu[s]), int(cu[s + 1])
            bad = dict(args)
            bad["k"] = args["k"].clone()
            bad["k"][a:b] = poison
            idx = _packed(compiled, bad, cu, leading=False)
            assert torch.equal(idx[:a], clean[:a]) and torch.equal(idx[b:], clean[b:]), f"sequence {s} leaked"
