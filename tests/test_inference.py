"""The inference cache: prefill in pieces and decode steps on a ragged batch
give the outputs and the selection a full forward gives at the same
positions (NSA_MATH.md, "Cache, prefill and decode"), the cache holds what
a full pass computes, and bad input is refused before anything is written."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import nsa_dsl
from nsa_dsl.geometry import num_compressed
from nsa_dsl.ir import Pool
from nsa_dsl.reference import compress_mean, reference
from strategies import TOLERANCE, assert_selection_rule, random_inputs, rel_error, upcast, valid_patterns

PATTERN = nsa_dsl.parse("""
pattern cached {
    heads    q=4 kv=2
    dims     qk=16
    compress block=8 stride=4
    select   block=16 top=3 initial=1 local=1
    window   size=12
}
""")


def _slice(args: dict, pattern, a: int, b: int) -> dict:
    """Positions a..b-1 of one sequence's inputs (batch 1), k_cmp/v_cmp as
    the list of the compressed tokens those positions complete."""
    out = {n: t[:, a:b] for n, t in args.items() if n not in ("k_cmp", "v_cmp")}
    c = pattern.compress
    if c is not None and c.pool is Pool.MLP:
        lo, hi = num_compressed(a, c.block, c.stride), num_compressed(b, c.block, c.stride)
        out["k_cmp"], out["v_cmp"] = [args["k_cmp"][0, lo:hi]], [args["v_cmp"][0, lo:hi]]
    return out


def _stack(parts: list) -> dict:
    """Per-sequence step inputs (each batch 1) as one batch."""
    out = {}
    for n in parts[0]:
        out[n] = [p[n][0] for p in parts] if n in ("k_cmp", "v_cmp") else torch.cat([p[n] for p in parts])
    return out


def _store_prompt(cache, piece: dict, slots=None) -> None:
    """What a prefill of empty slots leaves in the cache, without the full
    forward that computes the prompt's outputs (incremental.step runs that
    forward, then incremental.store: this store): for the tests of the
    decode steps after a prompt, which read the cache only (the prefill's
    outputs are the prefill tests' to check)."""
    from nsa_dsl import incremental

    slots = list(range(cache.batch)) if slots is None else slots
    incremental.store(cache, slots, piece["k"], piece["v"], piece.get("k_swa"), piece.get("v_swa"),
                      piece.get("k_cmp"), piece.get("v_cmp"))


def _full(pattern, args: dict):
    """(o, indices) of the full forward of one sequence, float64 reference."""
    want = pattern.select is not None
    result = reference(pattern, **upcast(args), return_indices=want)
    return result if want else (result, None)


def _check_against_full(pattern, args: dict, o, idx, dtype) -> None:
    """o and the selection of one sequence's steps against its full forward:
    the output against the reference given the steps' own blocks (a
    near-tie may flip a block), the blocks by the selection rule."""
    ref_o, _ = _full(pattern, args)
    if idx is not None:
        ref_o = reference(pattern, **upcast(args), indices=idx.long())
        assert_selection_rule(pattern, args, idx, eps_rel=1e-5, eps_abs=1e-6)
    err = rel_error(o, ref_o)
    assert err < TOLERANCE[dtype], f"output vs the full forward: relative error {err:.3g}"


@settings(max_examples=12, deadline=None)
@given(pattern=valid_patterns(), data=st.data(), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_pieces_and_decode_steps_equal_the_full_forward(pattern, data, dtype, seed):
    """A ragged batch: each slot's prompt arrives in random pieces (alone,
    slots=[s]), then every slot decodes the same number of tokens together,
    each at its own length. The cache contiguous or paged (pages of one or
    two selection blocks, shuffled in a larger pool)."""
    batch = data.draw(st.integers(1, 3), label="batch")
    prompts = data.draw(st.lists(st.integers(1, 70), min_size=batch, max_size=batch), label="prompts")
    steps = data.draw(st.integers(0, 6), label="decode steps")
    compiled = nsa_dsl.compile(pattern)
    want = pattern.select is not None
    seqs = [random_inputs(pattern, 1, n + steps, dtype, seed + s) for s, n in enumerate(prompts)]
    max_len = max(prompts) + steps + data.draw(st.integers(0, 5))
    page = data.draw(st.sampled_from([None, 1, 2]), label="page size in selection blocks")
    layout = {} if page is None else shuffled_pages(pattern, batch, max_len, page, seed)
    cache = compiled.new_cache(batch, max_len, dtype=dtype, **layout)
    outs = [[] for _ in range(batch)]
    idxs = [[] for _ in range(batch)]
    for s, n in enumerate(prompts):
        cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=3), label="cuts") if n > 1 else []))
        for a, b in zip([0] + cuts, cuts + [n]):
            result = compiled.prefill(**_slice(seqs[s], pattern, a, b), cache=cache, slots=[s], return_indices=want)
            o, idx = result if want else (result, None)
            outs[s].append(o[0])
            idxs[s].append(idx[0] if want else None)
    for t in range(steps):
        parts = [_slice(seqs[s], pattern, n + t, n + t + 1) for s, n in enumerate(prompts)]
        result = compiled.decode(**_stack(parts), cache=cache, return_indices=want)
        o, idx = result if want else (result, None)
        for s in range(batch):
            outs[s].append(o[s])
            idxs[s].append(idx[s] if want else None)
    assert cache.host_lengths == [n + steps for n in prompts]
    assert cache.lengths.tolist() == cache.host_lengths
    for s in range(batch):
        o = torch.cat(outs[s])[None]
        idx = torch.cat(idxs[s])[None] if want else None
        _check_against_full(pattern, seqs[s], o, idx, dtype)
        c = pattern.compress
        if c is not None:  # the cache holds the compressed tokens a full pass computes
            T = prompts[s] + steps
            n_c = num_compressed(T, c.block, c.stride)
            want_k = (seqs[s]["k_cmp"][0] if c.pool is Pool.MLP
                      else compress_mean(seqs[s]["k"].double(), c.block, c.stride)[0])
            assert rel_error(cache.k_cmp[s, :n_c], want_k) < TOLERANCE[dtype]
        assert torch.equal(cache.positions("k", s), seqs[s]["k"][0])
        assert torch.equal(cache.positions("v", s), seqs[s]["v"][0])


def shuffled_pages(pattern, batch: int, max_len: int, blocks: int, seed: int, spare: int = 3) -> dict:
    """A paged layout as a serving engine may hand it: pages of `blocks`
    selection blocks (16 positions without a selection), each slot's
    pages drawn at random from a pool with `spare` pages more than needed."""
    size = blocks * (pattern.select.block if pattern.select is not None else 16)
    per_slot = -(-max_len // size)
    pages = batch * per_slot + spare
    order = torch.randperm(pages, generator=torch.Generator().manual_seed(seed))[:batch * per_slot]
    return {"page_size": size, "pages": pages, "block_table": order.view(batch, per_slot).to(torch.int32)}


@pytest.mark.parametrize("cuts", [
    [7, 8],          # a piece ending one short of the first compressed token, then the step completing it
    [15, 16, 17],    # a step ending a selection block, then one opening the next
    [1, 2, 3],       # decode from length 1, shorter than one compression block
    [20, 33, 41],    # pieces starting mid compression window and mid selection block
])
def test_boundaries(cuts):
    T = cuts[-1] + 3
    args = random_inputs(PATTERN, 1, T, torch.float32, seed=sum(cuts))
    compiled = nsa_dsl.compile(PATTERN)
    cache = compiled.new_cache(1, T, dtype=torch.float32)
    outs, idxs = [], []
    for a, b in zip([0] + cuts, cuts + [T]):
        step = compiled.decode if b - a == 1 else compiled.prefill
        o, idx = step(**_slice(args, PATTERN, a, b), cache=cache, return_indices=True)
        outs.append(o)
        idxs.append(idx)
    ref_o, ref_idx = _full(PATTERN, args)
    assert torch.equal(torch.cat(idxs, 1), ref_idx.to(torch.int32))
    assert rel_error(torch.cat(outs, 1), ref_o) < TOLERANCE[torch.float32]


MLP_PATTERN = nsa_dsl.parse("""
pattern cached_mlp {
    heads    q=4 kv=2
    dims     qk=16 v=32
    compress block=8 stride=4 pool=mlp
    select   block=16 top=3 initial=1 local=1
    window   size=20
}""")


@pytest.mark.parametrize("pattern", [PATTERN, MLP_PATTERN], ids=["mean", "mlp"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_pieces_of_a_ragged_batch_run_the_training_kernels(pattern, paged, monkeypatch):
    """Three slots at different lengths take pieces of 9, then 12, then 5
    positions together (chunked prefill of a serving batch): the training
    forward's kernels compute them (PyTorch's gathering path is not
    taken), and each slot's outputs and blocks equal its full forward."""
    from nsa_dsl import incremental

    def no_gathering(*args, **kwargs):
        raise AssertionError("a piece after cached positions went through attend_cached")
    monkeypatch.setattr(incremental, "attend_cached", no_gathering)
    compiled = nsa_dsl.compile(pattern)
    prompts, pieces = [13, 40, 1], [9, 12, 5]
    total = [n + sum(pieces) for n in prompts]
    seqs = [random_inputs(pattern, 1, n, torch.float32, seed=40 + s) for s, n in enumerate(total)]
    layout = shuffled_pages(pattern, 3, max(total), 1, seed=5) if paged else {}
    cache = compiled.new_cache(3, max(total), dtype=torch.float32, **layout)
    outs, idxs = [[] for _ in prompts], [[] for _ in prompts]
    for s, n in enumerate(prompts):  # each prompt alone first: the slots' lengths differ
        o, idx = compiled.prefill(**_slice(seqs[s], pattern, 0, n), cache=cache, slots=[s], return_indices=True)
        outs[s].append(o[0])
        idxs[s].append(idx[0])
    done = list(prompts)
    for m in pieces:
        parts = [_slice(seqs[s], pattern, done[s], done[s] + m) for s in range(3)]
        o, idx = compiled.prefill(**_stack(parts), cache=cache, return_indices=True)
        assert o.shape == (3, m, pattern.heads.q, pattern.dims.v) and idx.shape[:2] == (3, m)
        for s in range(3):
            outs[s].append(o[s])
            idxs[s].append(idx[s])
            done[s] += m
    for s in range(3):
        _check_against_full(pattern, seqs[s], torch.cat(outs[s])[None], torch.cat(idxs[s])[None],
                            torch.float32)
        full_idx = _full(pattern, seqs[s])[1]
        assert torch.equal(torch.cat(idxs[s]).long(), full_idx[0].long())


def test_a_reset_slot_starts_a_new_sequence():
    compiled = nsa_dsl.compile(PATTERN)
    cache = compiled.new_cache(2, 64, dtype=torch.float32)
    old = random_inputs(PATTERN, 2, 30, torch.float32, seed=1)
    compiled.prefill(**old, cache=cache)
    cache.reset(1)
    assert cache.host_lengths == [30, 0] and cache.lengths.tolist() == [30, 0]
    new = random_inputs(PATTERN, 1, 20, torch.float32, seed=2)
    o = compiled.prefill(**new, cache=cache, slots=[1])
    assert rel_error(o, _full(PATTERN, new)[0]) < TOLERANCE[torch.float32]


def test_a_paged_cache_serves_an_engines_pages_as_a_contiguous_cache_would():
    """Serving-engine style: a pool of 6 pages of 16 positions where two
    slots of max_len 64 would need 8, pages written into the block table
    as the sequences grow (in place, between steps), a finished sequence's
    pages handed to the next one after reset (their old contents stale).
    Every prefill piece (the full forward's first piece, the PyTorch
    schedule after it) and decode step (the decode kernels) gives the
    outputs and blocks a contiguous cache gives, bitwise; so do the cache's
    keys and values read by position."""
    compiled = nsa_dsl.compile(PATTERN)
    table = torch.zeros(2, 4, dtype=torch.int32)
    paged = compiled.new_cache(2, 64, dtype=torch.float32, page_size=16, pages=6, block_table=table)
    contiguous = compiled.new_cache(2, 64, dtype=torch.float32)
    free, assigned = [5, 2, 0, 4, 1, 3], [0, 0]
    seqs = [random_inputs(PATTERN, 1, 48, torch.float32, seed=s) for s in range(3)]
    held = {0: 0, 1: 1}  # slot -> the sequence it holds
    # (slots, new positions each): slot 0's sequence ends at 28 positions (2 pages), slot 1 reaches 31
    # (2 pages); the next sequence takes slot 0 and its pages and grows to 33, slot 1 to 34 (3 pages each:
    # both cross into their third page on a decode step, slot 1 on the second, slot 0 on the third)
    steps = [((0,), 20), ((1,), 12), ((1,), 14), ((0,), 2)] + [((0, 1), 1)] * 5 + [((0,), 1)]
    later = [((0,), 30)] + [((0, 1), 1)] * 3
    for step_list in (steps, later):
        for slots, m in step_list:
            parts = []
            for s in slots:
                n = paged.host_lengths[s]
                while assigned[s] * 16 < n + m:  # the engine gives the slot the pages it will write
                    table[s, assigned[s]] = free.pop(0)
                    assigned[s] += 1
                parts.append(_slice(seqs[held[s]], PATTERN, n, n + m))
            step = compiled.decode if m == 1 else compiled.prefill
            got, want = (step(**_stack(parts), cache=c, slots=list(slots), return_indices=True)
                         for c in (paged, contiguous))
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (slots, m)
        if step_list is steps:  # sequence 0 ends: its pages go back, slot 0 takes sequence 2
            free += table[0, :assigned[0]].tolist()
            assigned[0] = 0
            held[0] = 2
            paged.reset(0)
            contiguous.reset(0)
    assert paged.host_lengths == contiguous.host_lengths == [33, 34] and not free  # every page in use
    for s in (0, 1):
        for name in ("k", "v"):
            assert torch.equal(paged.positions(name, s), getattr(contiguous, name)[s, :contiguous.host_lengths[s]])


def test_a_paged_layout_is_checked():
    compiled = nsa_dsl.compile(PATTERN)
    f32 = {"dtype": torch.float32}
    with pytest.raises(ValueError, match="page_size: expected a positive multiple of the selection block \\(16\\)"):
        compiled.new_cache(2, 64, page_size=24, **f32)
    with pytest.raises(ValueError, match="block_table: expected int32 \\[batch=2, ceil\\(max_len / page_size\\)=4\\]"):
        compiled.new_cache(2, 64, page_size=16, pages=8, block_table=torch.zeros(2, 3, dtype=torch.int32), **f32)
    with pytest.raises(ValueError, match="page numbers must lie in \\[0, pages=8\\), got values in \\[0, 8\\]"):
        compiled.new_cache(2, 64, page_size=16, pages=8, block_table=torch.arange(1, 9, dtype=torch.int32).view(2, 4)
                           - torch.tensor([[1], [0]], dtype=torch.int32), **f32)
    with pytest.raises(ValueError, match="pages: 6 pages in the pool need a block_table"):
        compiled.new_cache(2, 64, page_size=16, pages=6, **f32)
    with pytest.raises(ValueError, match="only for a paged cache"):
        compiled.new_cache(2, 64, pages=6, **f32)
    cache = compiled.new_cache(2, 64, page_size=16, pages=8, block_table=torch.zeros(2, 4, dtype=torch.int32), **f32)
    with pytest.raises(ValueError, match="grow: this paged cache's pages are the block_table's owner's"):
        cache.grow(128)


def test_a_paged_cache_of_its_own_pages_grows():
    """Without an engine's table the cache owns its pages: grow renumbers
    them into a larger pool and the sequences go on (equal to a contiguous
    cache that grew)."""
    compiled = nsa_dsl.compile(PATTERN)
    args = random_inputs(PATTERN, 2, 28, torch.float32, seed=7)
    outs = []
    for layout in ({}, {"page_size": 16}):
        cache = compiled.new_cache(2, 24, dtype=torch.float32, **layout)
        compiled.prefill(**{n: t[:, :20] for n, t in args.items()}, cache=cache)
        cache.grow(48)
        outs.append(torch.cat([compiled.decode(**{n: t[:, i:i + 1] for n, t in args.items()}, cache=cache)
                               for i in range(20, 28)], 1))
        assert torch.equal(cache.positions("k", 1), args["k"][1])
    assert torch.equal(outs[0], outs[1])


def _decode_inputs(pattern, batch, dtype=torch.float32, seed=0):
    return {n: t for n, t in random_inputs(pattern, batch, 1, dtype, seed).items()}


@pytest.mark.parametrize("change, message", [
    (lambda a, c: a.update(q=a["q"][:1], k=a["k"][:1], v=a["v"][:1]), "q: batch 1, the cache holds 2"),
    (lambda a, c: a.update(k=a["k"][..., :8]), "k: expected shape"),
    (lambda a, c: a.update(q=a["q"].double()), "cache: holds torch.float32, q is torch.float64"),
    (lambda a, c: a.update(g_slc=a["g_slc"][:, :, :2]), "g_slc: expected shape"),
    (lambda a, c: [c.append([0], torch.zeros(1, 9, 2, 16), torch.zeros(1, 9, 2, 16))], "slot 0 holds 9 positions"),
])
def test_bad_input_is_refused_before_anything_is_written(change, message):
    compiled = nsa_dsl.compile(PATTERN)
    cache = compiled.new_cache(2, 9, dtype=torch.float32)
    args = _decode_inputs(PATTERN, 2)
    change(args, cache)
    before = (cache.k.clone(), cache.lengths.clone(), list(cache.host_lengths))
    with pytest.raises(ValueError, match=message):
        compiled.decode(**args, cache=cache)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.lengths, before[1])
    assert cache.host_lengths == before[2]


def test_a_cache_of_another_pattern_or_a_wrong_call_is_refused():
    compiled = nsa_dsl.compile(PATTERN)
    other = nsa_dsl.parse("pattern o { heads q=4 kv=2 dims qk=16 window size=5 }")
    cache = nsa_dsl.compile(other).new_cache(1, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="made for pattern 'o'"):
        compiled.decode(**_decode_inputs(PATTERN, 1), cache=cache)
    cache = compiled.new_cache(1, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="decode takes one new position"):
        compiled.decode(**random_inputs(PATTERN, 1, 2, torch.float32, 0), cache=cache)
    with pytest.raises(ValueError, match="slots: \\[0, 0\\] names a slot twice"):
        compiled.prefill(**_decode_inputs(PATTERN, 2), cache=compiled.new_cache(2, 8, dtype=torch.float32),
                         slots=[0, 0])
    with pytest.raises(ValueError, match="max_len"):
        compiled.new_cache(1, 0)
    with pytest.raises(ValueError, match="slot: expected an int in \\[0, 1\\)"):
        cache.reset(1)


@pytest.mark.parametrize("pool, separate_kv", [("mean", False), ("mlp", False), ("mlp", True)])
@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_the_layer_with_a_cache_equals_the_layer_without(pool, separate_kv, backend):
    """NSAttention.forward(x, cache=...): pieces and decode steps, one slot
    prefilled alone, give the full forward's output; phi (pool=mlp) pools
    blocks that straddle a piece boundary from the cached keys (its own
    projection's with separate_kv)."""
    pattern = nsa_dsl.parse(f"""pattern layer {{ heads q=4 kv=2 dims qk=16 compress block=8 stride=4 pool={pool}
        select block=16 top=3 initial=1 local=1 window size=12 }}""")
    torch.manual_seed(3)
    layer = nsa_dsl.NSAttention(pattern, hidden_size=32, backend=backend, separate_kv=separate_kv)
    x = torch.randn(2, 34, 32)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, 48)
        assert (cache.k_swa is not None) == separate_kv and (cache.k_src is not None) == (separate_kv and pool == "mlp")
        first = layer(x[1:, :10], cache=cache, slots=[1])  # slot 1 ahead of slot 0
        outs = [layer(x[:1, :10], cache=cache, slots=[0])]
        outs += [layer(x[:, 10:22], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(22, 34)]
    o = torch.cat([torch.cat([outs[0], first]), *outs[1:]], 1)
    assert rel_error(o, full) < TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="not cu_seqlens"):
        layer(x[:1], cu_seqlens=torch.tensor([0, 34], dtype=torch.int32), cache=cache)


def test_a_backward_through_a_cached_step_says_the_cache_is_for_inference():
    """A cached call with gradients enabled computes, but a backward through
    it raises nsa_dsl's own error (the steps have no gradient): before,
    the decode kernels' output silently carried none, and then PyTorch's
    'no autograd formula' for the op."""
    layer = nsa_dsl.NSAttention(PATTERN, hidden_size=32, backend="kernels")
    x = torch.randn(1, 21, 32, requires_grad=True)
    cache = layer.new_cache(1, 24)
    outs = [layer(x[:, :20], cache=cache), layer(x[:, 20:], cache=cache)]  # a prefill, then a decode step
    for o in outs:
        with pytest.raises(RuntimeError, match="a cached step .* has no gradient: the cache is for inference"):
            o.sum().backward(retain_graph=True)
    with torch.no_grad():
        assert not layer(x[:, :1], cache=layer.new_cache(1, 4)).requires_grad


def test_the_layer_with_a_paged_cache_equals_it_with_a_contiguous_one():
    """NSAttention's cached path (phi pooling blocks from its own cached
    source keys, k_src) reads through the paged layout too: pieces and
    decode steps give the contiguous cache's outputs, bitwise."""
    pattern = nsa_dsl.parse("""pattern layer { heads q=4 kv=2 dims qk=16 compress block=8 stride=4 pool=mlp
        select block=16 top=3 initial=1 local=1 window size=12 }""")
    torch.manual_seed(3)
    layer = nsa_dsl.NSAttention(pattern, hidden_size=32, backend="kernels", separate_kv=True)
    x = torch.randn(2, 34, 32)
    outs = []
    with torch.no_grad():
        for layout in ({}, shuffled_pages(pattern, 2, 48, 1, seed=5)):
            cache = layer.new_cache(2, 48, **layout)
            assert cache.paged == bool(layout) and cache.k_src is not None
            outs.append(torch.cat([layer(x[:, :21], cache=cache)]
                                  + [layer(x[:, t:t + 1], cache=cache) for t in range(21, 34)], 1))
    assert torch.equal(outs[0], outs[1])


def test_generate_example_gives_the_recomputed_tokens(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("nsa_generate_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--new-tokens", "6", "--chunk", "40", "--backend", "gather", "--device", "cpu"]) == 0
    assert "same tokens" in capsys.readouterr().out


def test_a_decode_step_reads_its_positions_from_the_device():
    """The decode kernels take each sequence's position from the cache's
    device lengths, never the host's count (which replays of a captured
    step leave behind): with the host count stale, the steps give the same
    output, blocks and cache on a ragged batch, and sync_host_lengths
    brings the count back."""
    compiled = nsa_dsl.compile(PATTERN)
    caches = [compiled.new_cache(3, 80, dtype=torch.float32) for _ in range(2)]
    prompts = {0: 37, 1: 5, 2: 64}
    for cache in caches:
        for s, n in prompts.items():
            compiled.prefill(**random_inputs(PATTERN, 1, n, torch.float32, seed=s), cache=cache, slots=[s])
    caches[1].host_lengths = [30, 2, 60]  # as after replays the host did not see
    for t in range(9):  # slot 1 completes compressed tokens and opens a selection block on the way
        args = random_inputs(PATTERN, 3, 1, torch.float32, seed=100 + t)
        fresh, idx_fresh = compiled.decode(**args, cache=caches[0], return_indices=True)
        stale, idx_stale = compiled.decode(**args, cache=caches[1], return_indices=True)
        assert torch.equal(idx_fresh, idx_stale)
        assert torch.equal(stale, fresh)
    assert torch.equal(caches[0].lengths, caches[1].lengths)
    assert torch.equal(caches[0].k_cmp[:, :-1], caches[1].k_cmp[:, :-1])
    caches[1].sync_host_lengths()
    assert caches[1].host_lengths == caches[0].host_lengths == [46, 14, 73]


@pytest.mark.parametrize("block, stride, select_block", [(32, 16, 64), (8, 4, 16), (16, 16, 16), (48, 16, 16),
                                                         (16, 8, 32), (4, 1, 16)])
@pytest.mark.parametrize("tc", [0, 1, 7, 37])
def test_banded_block_scores_equal_the_dense_overlap_product(block, stride, select_block, tc):
    from nsa_dsl.incremental import banded_block_scores
    from nsa_dsl.reference import overlap_weights

    p = nsa_dsl.parse(f"pattern b {{ heads q=2 kv=1 dims qk=16 compress block={block} stride={stride}"
                      f" select block={select_block} top=2 }}")
    for nb in (1, 3, (tc * stride + block) // select_block + 2):
        ps = torch.rand(2, 3, tc, dtype=torch.float64)
        dense = ps @ overlap_weights(block, stride, select_block, tc, nb)
        assert torch.allclose(banded_block_scores(p, ps, nb), dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prompts, max_len, processors, network, zero_keys, sums", [
    ([150, 197], 210, None, None, False, False),
    ([90, 530], 600, 64, False, False, False), ([90, 530], 600, 64, False, True, False),
    ([90, 530], 600, 64, True, False, False), ([90, 530], 600, 64, True, True, False),
    ([90, 530], 600, 64, False, True, True), ([90, 530], 600, 64, True, False, True)],
    ids=["one chunk and split", "many chunks and splits, rounds", "many chunks and splits, rounds, all scores tied",
         "many chunks and splits, network", "many chunks and splits, network, all scores tied",
         "block sums, rounds, all scores tied", "block sums, network"])
def test_decode_steps_rank_blocks_as_the_full_forward(network, zero_keys, sums, prompts, max_len, processors,
                                                      monkeypatch):
    """Contexts of many more blocks than the top-n, so the decode step's
    own scoring (dec_topk) decides: its blocks obey the selection rule
    against float64 scores, and with every key zero (all scores tied) they
    are exactly the full forward's (ties to the lower block). With a long
    cache the blocks fall in several of dec_topk's chunks, and with many
    processors (patched) dec_cmp splits the compressed tokens and dec_attend
    takes one item per program (on two, several): the merged candidates
    and partials must give the same, by both of dec_topk's ways to its
    top-n (network: forced one way or the other; None: as topk_network
    chooses); sums: from dec_cmp's block sums (DEC_BLOCK_SUMS)."""
    from nsa_dsl import launch_decode

    if processors is not None:
        monkeypatch.setattr(launch_decode, "_processors", lambda device: processors)
    if network is not None:
        monkeypatch.setattr(launch_decode, "topk_network", lambda *args: network)
    compiled = nsa_dsl.compile(PATTERN, overrides={"DEC_BLOCK_SUMS": int(sums)})
    steps = 4
    cache = compiled.new_cache(2, max_len, dtype=torch.float32)
    if processors is not None:
        assert launch_decode.topk_chunks(compiled, max_len)[1] >= 3
        assert launch_decode.cmp_splits(compiled, cache.device, 2, cache.max_compressed)[0] >= 3
    # dec_attend: one item per program on many processors, several on the interpreter's two
    span = launch_decode.attend_span(compiled, cache.device, 2)[0]
    assert span == 1 if processors is not None else span > 1
    seqs = [random_inputs(PATTERN, 1, n + steps, torch.float32, seed=40 + n) for n in prompts]
    if zero_keys:
        for s in seqs:
            s["k"].zero_()
    for i, (args, n) in enumerate(zip(seqs, prompts)):
        _store_prompt(cache, _slice(args, PATTERN, 0, n), slots=[i])
    outs, idxs = [[], []], [[], []]
    for t in range(steps):
        o, idx = compiled.decode(**_stack([_slice(a, PATTERN, n + t, n + t + 1) for a, n in zip(seqs, prompts)]),
                                 cache=cache, return_indices=True)
        for i in range(2):
            outs[i].append(o[i])
            idxs[i].append(idx[i])
    for i, (args, n) in enumerate(zip(seqs, prompts)):
        idx = torch.cat(idxs[i])[None]
        full_o, full_idx = _full(PATTERN, args)
        if zero_keys:
            assert torch.equal(idx, full_idx[:, n:].to(torch.int32))
        positions = torch.arange(n, n + steps)
        assert_selection_rule(PATTERN, {k: t[:, :n + steps] for k, t in args.items()},
                              torch.cat([full_idx[:, :n].to(torch.int32), idx], 1), eps_rel=1e-5, eps_abs=1e-6)
        ref = reference(PATTERN, **upcast(args), indices=torch.cat([full_idx[:, :n], idx.long()], 1))
        assert rel_error(torch.cat(outs[i])[None], ref[:, positions]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("sums", [False, True], ids=["raw scores", "block sums"])
@pytest.mark.parametrize("block, stride, select_block, top, prompt, zero_keys", [
    (64, 16, 32, 3, 300, False),   # a token weighs in its own block and the next two: three planes of sums
    (64, 16, 32, 3, 300, True),    # the same, every score tied: the full forward's blocks exactly
    (8, 8, 16, 3, 200, False),     # no overlap: one plane
    (16, 1, 128, 2, 700, False),   # 128 tokens a block: dec_cmp's tile widened to hold one (block sums)
], ids=["three planes", "three planes, tied", "one plane", "a block wider than the tile"])
def test_decode_scoring_of_every_geometry_ranks_as_the_full_forward(block, stride, select_block, top, prompt,
                                                                     zero_keys, sums):
    """dec_topk's block scores from dec_cmp's raw scores, or from its block
    sums (DEC_BLOCK_SUMS: a plane per block a token weighs in, tiles of
    whole blocks) at geometries unlike the paper's: decode steps over more
    blocks than the top-n pick blocks by the selection rule, and tied
    scores give the full forward's blocks."""
    pattern = nsa_dsl.parse(f"""
    pattern sums {{
        heads    q=2 kv=1
        dims     qk=16
        compress block={block} stride={stride}
        select   block={select_block} top={top} initial=1 local=1
    }}
    """)
    steps = 3
    overrides = ({"DEC_BLOCK_SUMS": 1, "DEC_CMP_N": max(64, select_block // stride)} if sums
                 else {"DEC_BLOCK_SUMS": 0})
    compiled = nsa_dsl.compile(pattern, overrides=overrides)
    args = random_inputs(pattern, 1, prompt + steps, torch.float32, seed=block + stride + select_block)
    if zero_keys:
        args["k"].zero_()
    cache = compiled.new_cache(1, prompt + steps, dtype=torch.float32)
    _store_prompt(cache, _slice(args, pattern, 0, prompt))
    outs, idxs = [], []
    for t in range(prompt, prompt + steps):
        o, idx = compiled.decode(**_slice(args, pattern, t, t + 1), cache=cache, return_indices=True)
        outs.append(o)
        idxs.append(idx)
    idx = torch.cat(idxs, 1)
    full_o, full_idx = _full(pattern, args)
    if zero_keys:
        assert torch.equal(idx, full_idx[:, prompt:].to(torch.int32))
    assert_selection_rule(pattern, args, torch.cat([full_idx[:, :prompt].to(torch.int32), idx], 1),
                          eps_rel=1e-5, eps_abs=1e-6)
    ref = reference(pattern, **upcast(args), indices=torch.cat([full_idx[:, :prompt], idx.long()], 1))
    assert rel_error(torch.cat(outs, 1), ref[:, prompt:]) < TOLERANCE[torch.float32]


def test_block_sums_need_a_tile_of_whole_blocks():
    """DEC_BLOCK_SUMS sums each selection block's tokens within one of
    dec_cmp's tiles: an override leaving a block wider than the tile is
    refused, naming the fix. The plan takes block sums wherever the
    tile holds a block, raw scores elsewhere."""
    pattern = nsa_dsl.parse("""
    pattern wide { heads q=2 kv=1  dims qk=16  compress block=16 stride=1  select block=128 top=4 }
    """)
    assert not nsa_dsl.check(pattern).kernel("dec_attend").const("DEC_BLOCK_SUMS")
    assert nsa_dsl.check(PATTERN).kernel("dec_attend").const("DEC_BLOCK_SUMS")
    with pytest.raises(ValueError, match="DEC_CMP_N to 128"):
        nsa_dsl.compile(pattern, overrides={"DEC_BLOCK_SUMS": 1})
    assert nsa_dsl.compile(pattern, overrides={"DEC_BLOCK_SUMS": 1, "DEC_CMP_N": 128}).plan.kernel(
        "dec_attend").const("DEC_BLOCK_SUMS")


def test_pool_mlp_tokens_as_per_position_candidates():
    """pool=mlp's compressed tokens as a tensor [b, m, HKV, D], one
    candidate per new position (the token whose block ends there): the
    same outputs and cache as the per-sequence lists, whole prompts and
    decode steps."""
    pattern = nsa_dsl.parse("pattern m { heads q=4 kv=2 dims qk=16 compress block=8 stride=4 pool=mlp"
                            " select block=16 top=3 initial=1 local=1 window size=12 }")
    compiled = nsa_dsl.compile(pattern)
    T, prompt = 48, 37
    args = random_inputs(pattern, 2, T, torch.float32, seed=5)
    c = pattern.compress
    cand = {n: torch.randn(2, T, 2, 16) for n in ("k_cmp", "v_cmp")}
    for n in cand:  # the candidates at positions i*d + l - 1 are the tokens themselves
        cand[n][:, c.block - 1::c.stride] = args[n]
    plain = {n: t for n, t in args.items() if n not in ("k_cmp", "v_cmp")}
    caches = [compiled.new_cache(2, T, dtype=torch.float32) for _ in range(2)]
    outs = [[], []]
    outs[0].append(compiled.prefill(**_stack([_slice({n: t[s:s + 1] for n, t in args.items()}, pattern, 0, prompt)
                                              for s in range(2)]), cache=caches[0]))
    for i in (1,):
        outs[i].append(compiled.prefill(**{n: t[:, :prompt] for n, t in plain.items()},
                                        **{n: t[:, :prompt] for n, t in cand.items()}, cache=caches[i]))
    for t in range(prompt, T):
        step = {n: x[:, t:t + 1] for n, x in plain.items()}
        lists = _stack([_slice({n: x[s:s + 1] for n, x in args.items()}, pattern, t, t + 1) for s in range(2)])
        outs[0].append(compiled.decode(**lists, cache=caches[0]))
        outs[1].append(compiled.decode(**step, **{n: x[:, t:t + 1] for n, x in cand.items()}, cache=caches[1]))
    full = torch.cat(outs[0], 1)
    assert rel_error(full, reference(pattern, **upcast(args))) < TOLERANCE[torch.float32]
    assert rel_error(torch.cat(outs[1], 1), full) < 1e-6
    assert torch.equal(caches[1].k_cmp[:, :-1], caches[0].k_cmp[:, :-1])
    with pytest.raises(ValueError, match="k_cmp: pool=mlp as a tensor: expected"):
        compiled.decode(**{n: x[:, :1] for n, x in plain.items()}, k_cmp=cand["k_cmp"][:, :2],
                        v_cmp=cand["v_cmp"][:, :1], cache=compiled.new_cache(2, 4, dtype=torch.float32))


def test_dependent_launch_only_for_steps_of_few_sequences(monkeypatch):
    """launch_decode.pdl_launch: programmatic dependent launch for a step of
    at most DEC_PDL_MAX_BATCH sequences (the plan's 1: it won at batch 1 and
    lost at the 4 GB batches, NOTES v25) on a device that has it, and never
    on one without (here the CPU; the GPU test runs both bitwise)."""
    from nsa_dsl import launch_decode

    pattern = nsa_dsl.load("examples/bench_paper128.nsa")
    default = nsa_dsl.compile(pattern)
    three = nsa_dsl.compile(pattern, overrides={"DEC_PDL_MAX_BATCH": 3})
    cpu = torch.device("cpu")
    assert launch_decode.pdl_launch(default, cpu, 1) == {"PDL": False}
    monkeypatch.setattr(launch_decode, "_hopper", lambda device: True)
    on = {"PDL": True, "launch_pdl": True}
    assert launch_decode.pdl_launch(default, cpu, 1) == on
    assert launch_decode.pdl_launch(default, cpu, 2) == {"PDL": False}
    assert launch_decode.pdl_launch(three, cpu, 3) == on and launch_decode.pdl_launch(three, cpu, 4) == {"PDL": False}
    with pytest.raises(ValueError, match="DEC_PDL_MAX_BATCH"):
        nsa_dsl.compile(pattern, overrides={"DEC_PDL_MAX_BATCH": -1})


def test_two_compilations_of_one_pattern_with_other_decode_tiles_share_a_cache():
    """A cache is the pattern's, not one compilation's: steps taken in turn
    by two compilations whose decode tiles differ (DEC_CMP_N 16 and 64,
    more compressed programs) give the full forward's outputs and blocks.
    The step buffers were keyed by batch alone, so the second compilation
    ran on splits and tiles sized for the first's: wrong outputs and other
    blocks, silently."""
    small_tiles = nsa_dsl.compile(PATTERN, overrides={"DEC_CMP_N": 16, "DEC_CMP_PROGRAMS_PER_SM": 16})
    plain = nsa_dsl.compile(PATTERN)
    T, prompt = 80, 76  # 19 compressed tokens: two tiles of 16, one of 64
    args = random_inputs(PATTERN, 2, T, torch.float32, seed=11)
    full, full_idx = plain(**args, return_indices=True)
    cache = plain.new_cache(2, T, dtype=torch.float32)
    with torch.no_grad():
        plain.prefill(**{n: t[:, :prompt] for n, t in args.items()}, cache=cache)
        outs, idxs = [], []
        for step, t in enumerate(range(prompt, T)):
            step_args = {n: x[:, t:t + 1] for n, x in args.items()}
            o, idx = (small_tiles, plain)[step % 2].decode(**step_args, cache=cache, return_indices=True)
            outs.append(o)
            idxs.append(idx)
    assert torch.equal(torch.cat(idxs, 1), full_idx[:, prompt:])
    assert rel_error(torch.cat(outs, 1), full[:, prompt:]) < TOLERANCE[torch.float32]
