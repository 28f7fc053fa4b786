"""Tests of the dense reference (nsa_dsl/reference.py) against shared/NSA_MATH.md.

Everything the reference is compared with here is computed independently:
plain causal attention through torch's scaled_dot_product_attention, or
explicit per-query loops over the allowed key positions, or numbers worked
out by hand in the test.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from nsa_dsl.ir import (
    Branch,
    Combine,
    Compress,
    Dims,
    Heads,
    Pattern,
    Pool,
    Select,
    Window,
)
from nsa_dsl.geometry import num_blocks, num_compressed
from nsa_dsl.reference import (
    block_scores,
    compress_mean,
    compressed_attention,
    overlap_weights,
    reference,
    reference_branches,
    select_blocks,
    selection_attention,
    window_attention,
)
from strategies import random_inputs, valid_patterns

F64 = torch.float64


# --------------------------------------------------------------------------- helpers


def make_pattern(hq=4, hkv=2, dqk=16, dv=8, compress=None, select=None, window=None, combine=None):
    return Pattern(
        name="p",
        heads=Heads(q=hq, kv=hkv),
        dims=Dims(qk=dqk, v=dv),
        compress=compress,
        select=select,
        window=window,
        combine=None if combine is None else Combine(branches=tuple(combine)),
    )


def rand_inputs(p, B, T, seed=0, dtype=F64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, p.heads.q, p.dims.qk, generator=g, dtype=F64) * scale
    k = torch.randn(B, T, p.heads.kv, p.dims.qk, generator=g, dtype=F64) * scale
    v = torch.randn(B, T, p.heads.kv, p.dims.v, generator=g, dtype=F64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def rand_like_shape(shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def causal_attention(q, k, v, scale):
    """Plain causal attention via torch SDPA, GQA expanded."""
    G = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(G, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(G, dim=2).transpose(1, 2)
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale).transpose(1, 2)


def loop_attention(q, k, v, allowed, scale):
    """o[b,t,h] = softmax over positions allowed(b, t, h) (a list); 0 if none."""
    B, T, HQ, _ = q.shape
    G = HQ // k.shape[2]
    o = torch.zeros(B, T, HQ, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for t in range(T):
            for h in range(HQ):
                pos = allowed(b, t, h)
                if not pos:
                    continue
                pos = torch.tensor(sorted(pos))
                logits = (k[b, pos, h // G] @ q[b, t, h]) * scale
                o[b, t, h] = torch.softmax(logits, 0) @ v[b, pos, h // G]
    return o


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------- sizes and pooling


def test_compress_mean_by_hand():
    x = torch.arange(2 * 11 * 3 * 2, dtype=F64).reshape(2, 11, 3, 2) ** 1.5
    out = compress_mean(x, 4, 2)
    assert out.shape == (2, 4, 3, 2)  # (11 - 4) // 2 + 1 = 4
    for i in range(4):
        want = (x[:, 2 * i] + x[:, 2 * i + 1] + x[:, 2 * i + 2] + x[:, 2 * i + 3]) / 4
        torch.testing.assert_close(out[:, i], want)
    # one concrete number: positions 2..5 of a ramp
    ramp = torch.arange(11, dtype=F64).reshape(1, 11, 1, 1)
    assert compress_mean(ramp, 4, 2)[0, 1, 0, 0].item() == pytest.approx(3.5)
    assert compress_mean(x[:, :3], 4, 2).shape == (2, 0, 3, 2)
    assert compress_mean(x, 1, 1).equal(x)


# --------------------------------------------------------------------------- overlap weights


def test_overlap_weights_paper_sizes():
    # l=32, d=16, l'=64: block j gets tokens 4j-1 .. 4j+3 with weights 1,2,2,2,1.
    T = 64 * 5
    Tc, NB = num_compressed(T, 32, 16), num_blocks(T, 64)
    W = overlap_weights(32, 16, 64, Tc, NB)
    assert W.shape == (Tc, NB)
    for j in range(1, NB - 1):
        col = W[:, j]
        assert col[4 * j - 1 : 4 * j + 4].tolist() == [1, 2, 2, 2, 1]
        assert col.sum().item() == 8
        assert (col[: 4 * j - 1] == 0).all() and (col[4 * j + 4 :] == 0).all()
    assert W[:4, 0].tolist() == [2, 2, 2, 1]  # block 0 has no token before it
    # every compressed token spreads l/d = 2 units
    assert (W.sum(1) == 2).all()


def test_overlap_weights_other_sizes_by_hand():
    # l=4, d=2, l'=4, T=8: tokens [0,4) [2,6) [4,8); blocks [0,4) [4,8).
    W = overlap_weights(4, 2, 4, 3, 2)
    assert W.tolist() == [[2, 0], [1, 1], [0, 2]]
    # l=8, d=4, l'=4, T=16: tokens [0,8) [4,12) [8,16); blocks of 4.
    W = overlap_weights(8, 4, 4, 3, 4)
    assert W.tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    # l=3, d=1, l'=2, T=6: token i = [i, i+3); blocks [0,2) [2,4) [4,6).
    W = overlap_weights(3, 1, 2, 4, 3)
    assert W.tolist() == [[2, 1, 0], [1, 2, 0], [0, 2, 1], [0, 1, 2]]
    # l = l' = d: the identity (s = p_cmp)
    assert overlap_weights(4, 4, 4, 5, 5).equal(torch.eye(5, dtype=F64))


# --------------------------------------------------------------------------- degenerate cases == causal attention


@pytest.mark.parametrize("w", [37, 40, 1000])
def test_window_covering_everything_is_causal(w):
    p = make_pattern(window=Window(size=w))
    q, k, v = rand_inputs(p, 2, 37, seed=1)
    scale = 1 / math.sqrt(16)
    torch.testing.assert_close(reference(p, q, k, v), causal_attention(q, k, v, scale))


def test_compress_unit_blocks_is_causal():
    p = make_pattern(compress=Compress(block=1, stride=1))
    q, k, v = rand_inputs(p, 2, 29, seed=2)
    torch.testing.assert_close(reference(p, q, k, v, scale=0.3), causal_attention(q, k, v, 0.3))


@pytest.mark.parametrize("initial,local", [(1, 2), (0, 0), (2, 1)])
def test_select_covering_every_block_is_causal(initial, local):
    T = 30
    p = make_pattern(
        compress=Compress(block=4, stride=2),
        select=Select(block=4, top=num_blocks(T, 4) + 1, initial=initial, local=local),
        combine=[Branch.SLC],  # compress only ranks
    )
    q, k, v = rand_inputs(p, 2, T, seed=3)
    o, idx = reference(p, q, k, v, return_indices=True)
    torch.testing.assert_close(o, causal_attention(q, k, v, 1 / 4))
    for t in range(T):
        row = idx[0, t, 0].tolist()
        nvis = t // 4 + 1
        assert row == list(range(nvis)) + [-1] * (len(row) - nvis)


def test_window_by_loop():
    p = make_pattern(hq=6, hkv=2, window=Window(size=5))
    q, k, v = rand_inputs(p, 2, 19, seed=4)
    want = loop_attention(q, k, v, lambda b, t, h: list(range(max(0, t - 4), t + 1)), 0.25)
    torch.testing.assert_close(reference(p, q, k, v), want)
    torch.testing.assert_close(window_attention(p, q, k, v), want)


# --------------------------------------------------------------------------- compressed branch


def test_mean_pooled_compressed_branch_by_hand():
    l, d = 4, 2
    p = make_pattern(compress=Compress(block=l, stride=d))
    B, T = 2, 17
    q, k, v = rand_inputs(p, B, T, seed=5)
    Tc = (T - l) // d + 1
    kc = torch.stack([k[:, i * d : i * d + l].mean(1) for i in range(Tc)], 1)
    vc = torch.stack([v[:, i * d : i * d + l].mean(1) for i in range(Tc)], 1)
    want = loop_attention(q, kc, vc, lambda b, t, h: [i for i in range(Tc) if i * d + l - 1 <= t], 0.25)
    got = reference(p, q, k, v)
    torch.testing.assert_close(got, want)
    assert (got[:, : l - 1] == 0).all()  # t < l - 1 sees no token
    o, pc = compressed_attention(p, q, kc, vc)
    torch.testing.assert_close(o, want)
    assert pc.shape == (B, T, 4, Tc)
    assert (pc[:, : l - 1] == 0).all()
    torch.testing.assert_close(pc[:, l - 1 :].sum(-1), torch.ones(B, T - l + 1, 4, dtype=F64))


def test_mlp_pool_uses_given_tokens():
    l, d = 4, 4
    p = make_pattern(compress=Compress(block=l, stride=d, pool=Pool.MLP))
    B, T = 1, 21
    q, k, v = rand_inputs(p, B, T, seed=6)
    Tc = num_compressed(T, l, d)
    kc = rand_like_shape((B, Tc, 2, 16), 7)
    vc = rand_like_shape((B, Tc, 2, 8), 8)
    want = loop_attention(q, kc, vc, lambda b, t, h: [i for i in range(Tc) if i * d + l - 1 <= t], 0.25)
    torch.testing.assert_close(reference(p, q, k, v, k_cmp=kc, v_cmp=vc), want)


def test_no_compressed_token_gives_zero_not_nan():
    # T < l: Tc = 0; also select ranks on all-zero scores (ties: lowest blocks).
    p = make_pattern(
        compress=Compress(block=8, stride=4),
        select=Select(block=2, top=2, initial=0, local=0),
        window=Window(size=3),
    )
    q, k, v = rand_inputs(p, 2, 7, seed=9)
    outs, idx = reference_branches(p, q, k, v, return_indices=True)
    assert torch.isfinite(outs[Branch.CMP]).all() and (outs[Branch.CMP] == 0).all()
    assert outs[Branch.CMP].shape == (2, 7, 4, 8)
    for t in range(7):
        want = [0] if t < 2 else [0, 1]
        assert idx[0, t, 0].tolist() == want + [-1] * (2 - len(want))
    o = reference(p, q, k, v)
    assert torch.isfinite(o).all()
    _, pc = compressed_attention(p, q, compress_mean(k, 8, 4))
    assert pc.shape == (2, 7, 4, 0)
    S = block_scores(p, q, compress_mean(k, 8, 4))
    assert S.shape == (2, 7, 2, 4)
    # gradient still flows (zeros) through an empty compressed branch
    q.requires_grad_(True)
    reference(p, q, k, v).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_T_equals_one():
    p = make_pattern(
        compress=Compress(block=2, stride=1),
        select=Select(block=2, top=2, initial=1, local=1),
        window=Window(size=4),
    )
    q, k, v = rand_inputs(p, 2, 1, seed=10)
    gs = rand_like_shape((2, 1, 4), 11).sigmoid()
    gw = rand_like_shape((2, 1, 4), 12).sigmoid()
    o, idx = reference(p, q, k, v, g_slc=gs, g_swa=gw, return_indices=True)
    vexp = v.repeat_interleave(2, dim=2)  # the only key is position 0
    torch.testing.assert_close(o, (gs + gw).unsqueeze(-1) * vexp)
    assert idx.tolist() == [[[[0, -1], [0, -1]]]] * 2
    assert idx.dtype == torch.int32


# --------------------------------------------------------------------------- selection rule on hand-made scores


def _scores(rows, T, l_sel, hkv=1):
    """S [1, len(rows), hkv, NB] from python rows (the same for every kv)."""
    S = torch.tensor(rows, dtype=F64).reshape(1, len(rows), 1, -1)
    assert S.shape[-1] == num_blocks(T, l_sel)
    return S.expand(1, len(rows), hkv, S.shape[-1]).clone()


def test_forced_blocks_present_despite_low_scores_and_ties_to_lower_index():
    p = make_pattern(hq=2, hkv=1, select=Select(block=4, top=4, initial=1, local=2))
    T = 40  # NB = 10
    # query t=30 sits in block 7: visible 0..7, forced {0, 6, 7}.
    # Scores: forced blocks lowest, blocks 2 and 4 tie at the top, invisible
    # blocks 8, 9 carry huge values that must be ignored.
    row = [0.0, 0.5, 0.9, 0.1, 0.9, 0.3, 0.0, 0.0, 100.0, 100.0]
    idx = select_blocks(p, _scores([row], T, 4), T, query_offset=30)
    assert idx[0, 0, 0].tolist() == [0, 2, 6, 7]
    # all equal: the lowest free block wins (t=39, block 9, forced {0, 8, 9})
    idx = select_blocks(p, _scores([[0.25] * 10], T, 4), T, query_offset=39)
    assert idx[0, 0, 0].tolist() == [0, 1, 8, 9]
    # fewer visible blocks than top: all visible, -1 padded at the end
    idx = select_blocks(p, _scores([[0.1, 0.2] + [7.0] * 8], T, 4), T, query_offset=5)
    assert idx[0, 0, 0].tolist() == [0, 1, -1, -1]
    idx = select_blocks(p, _scores([[0.1, 0.2, 0.3] + [7.0] * 7], T, 4), T, query_offset=11)
    assert idx[0, 0, 0].tolist() == [0, 1, 2, -1]
    # t in block 3: forced {0, 2, 3}; one free pick between 1 only -> [0,1,2,3]
    idx = select_blocks(p, _scores([[0.0, 0.0, 0.0, 0.0] + [7.0] * 6], T, 4), T, query_offset=12)
    assert idx[0, 0, 0].tolist() == [0, 1, 2, 3]


def test_pure_ranking_without_forced_blocks():
    p = make_pattern(hq=2, hkv=1, select=Select(block=2, top=2, initial=0, local=0))
    T = 12  # NB = 6
    rows = [
        [0.0, 0.0, 9.0, 9.0, 9.0, 9.0],  # t=0: only block 0 visible
        [0.3, 0.7, 0.2, 0.9, 0.1, 0.5],  # t=11 (block 5): best two are 3 and 1
        [0.3, 0.7, 0.7, 0.7, 0.1, 0.5],  # three-way tie: 1 and 2 win
    ]
    S = torch.stack([_scores([r], T, 2) for r in rows])  # [3, 1, 1, 1, NB]
    assert select_blocks(p, S[0], T, query_offset=0)[0, 0, 0].tolist() == [0, -1]
    assert select_blocks(p, S[1], T, query_offset=11)[0, 0, 0].tolist() == [1, 3]
    assert select_blocks(p, S[2], T, query_offset=11)[0, 0, 0].tolist() == [1, 2]


def test_initial_and_local_overlap_count():
    # initial=2, local=2, top=4; in block 2 the forced set {0,1,2} plus one
    # more = all visible, so the row is full with 3 ids.
    p = make_pattern(hq=2, hkv=1, select=Select(block=4, top=4, initial=2, local=2))
    T = 24
    idx = select_blocks(p, _scores([[0.0] * 6], T, 4), T, query_offset=9)
    assert idx[0, 0, 0].tolist() == [0, 1, 2, -1]
    idx = select_blocks(p, _scores([[0, 0, 0.1, 0.9, 0.2, 0]], T, 4), T, query_offset=23)
    assert idx[0, 0, 0].tolist() == [0, 1, 4, 5]


# --------------------------------------------------------------------------- GQA: the group decides


def test_group_sum_decides_selection():
    # l = d = l' = 4: W is the identity, so S[kv] = p_cmp[h0] + p_cmp[h1].
    Dqk = 8
    p = make_pattern(
        hq=4,
        hkv=2,
        dqk=Dqk,
        dv=4,
        compress=Compress(block=4, stride=4, pool=Pool.MLP),
        select=Select(block=4, top=3, initial=1, local=1),
    )
    B, T = 1, 32
    Tc = NB = 8
    eye = torch.eye(Dqk, dtype=F64)
    kc = torch.stack([eye, eye.roll(1, 0)], dim=1).unsqueeze(0)  # [1, 8, 2, 8]: token i of kv0 = e_i
    vc = rand_like_shape((B, Tc, 2, 4), 1)
    q, k, v = rand_inputs(p, B, T, seed=13)
    q = q.clone()
    # last query (t=31, block 7): forced {0, 7}; one free pick among 1..6.
    # head 0 alone prefers block 2 (p ~ .6 vs .4 on block 4), head 1 alone
    # prefers block 6 (~.6 vs .4 on block 4): only the sum picks block 4.
    lo = 20.0 - math.log(1.5)
    q[0, 31, 0] = 20.0 * eye[2] + lo * eye[4]
    q[0, 31, 1] = 20.0 * eye[6] + lo * eye[4]
    S = block_scores(p, q, kc, scale=1.0)
    assert S.shape == (B, T, 2, NB)
    # independent: per-head softmax over the 8 visible tokens, summed over the group
    p0 = torch.softmax(kc[0, :, 0] @ q[0, 31, 0], 0)
    p1 = torch.softmax(kc[0, :, 0] @ q[0, 31, 1], 0)
    torch.testing.assert_close(S[0, 31, 0], p0 + p1)
    assert p0[1:7].argmax().item() + 1 == 2 and p1[1:7].argmax().item() + 1 == 6
    o, idx = reference(p, q, k, v, k_cmp=kc, v_cmp=vc, scale=1.0, return_indices=True)
    assert idx[0, 31, 0].tolist() == [0, 4, 7]
    # head 0 alone (head 1 uninformative): block 2
    q[0, 31, 1] = 0.0
    _, idx = reference(p, q, k, v, k_cmp=kc, v_cmp=vc, scale=1.0, return_indices=True)
    assert idx[0, 31, 0].tolist() == [0, 2, 7]
    # the second kv group is unaffected by kv0's heads
    q2 = q.clone()
    q2[0, 31, 0] = -q2[0, 31, 0]
    _, idx2 = reference(p, q2, k, v, k_cmp=kc, v_cmp=vc, scale=1.0, return_indices=True)
    assert idx2[0, 31, 1].tolist() == idx[0, 31, 1].tolist()


def test_block_scores_against_loop():
    l, d, ls = 4, 2, 8
    p = make_pattern(
        hq=6, hkv=2, compress=Compress(block=l, stride=d), select=Select(block=ls, top=2, initial=1, local=1)
    )
    B, T = 2, 27
    q, k, v = rand_inputs(p, B, T, seed=14)
    kc = compress_mean(k, l, d)
    Tc, NB = kc.shape[1], num_blocks(T, ls)
    S = block_scores(p, q, kc)
    for b in range(B):
        for t in range(T):
            vis = [i for i in range(Tc) if i * d + l - 1 <= t]
            for kv in range(2):
                want = torch.zeros(NB, dtype=F64)
                for h in range(kv * 3, kv * 3 + 3):
                    if vis:
                        pr = torch.softmax(kc[b, vis, kv] @ q[b, t, h] / 4, 0)
                        for pi, i in zip(pr, vis):
                            for j in range(NB):
                                ov = max(0, min(i * d + l, (j + 1) * ls) - max(i * d, j * ls))
                                want[j] += pi * ov / d
                for j in range(NB):
                    if j > t // ls:
                        assert S[b, t, kv, j] == float("-inf")
                    else:
                        assert S[b, t, kv, j].item() == pytest.approx(want[j].item(), abs=1e-12)


# --------------------------------------------------------------------------- given indices


def _slc_pattern(top=3):
    return make_pattern(
        hq=4,
        hkv=2,
        compress=Compress(block=4, stride=2),
        select=Select(block=4, top=top, initial=1, local=1),
        combine=[Branch.SLC],  # compress only ranks
    )


def test_indices_override_by_loop():
    p = _slc_pattern(top=3)
    B, T = 2, 22  # NB = 6
    q, k, v = rand_inputs(p, B, T, seed=15)
    g = torch.Generator().manual_seed(16)
    idx = torch.randint(-1, 6, (B, T, 2, 3), generator=g)
    idx[0, 5, 0] = torch.tensor([-1, -1, -1])  # empty row -> 0
    idx[0, 21, 0] = torch.tensor([3, -1, 3])  # duplicate counts once
    idx[0, 21, 1] = torch.tensor([2, 5, 4])  # no forced block re-added
    idx[1, 9, 1] = torch.tensor([5, 4, 3])  # only future blocks -> 0

    def allowed(b, t, h):
        blocks = {j for j in idx[b, t, h // 2].tolist() if j >= 0}
        return [pos for pos in range(t + 1) if pos // 4 in blocks]

    want = loop_attention(q, k, v, allowed, 0.25)
    o, ret = reference(p, q, k, v, indices=idx, return_indices=True)
    torch.testing.assert_close(o, want)
    assert ret.dtype == torch.int32 and ret.equal(idx.to(torch.int32))
    assert (o[0, 5, :2] == 0).all() and (o[1, 9, 2:] == 0).all()
    torch.testing.assert_close(selection_attention(p, q, k, v, idx), want)
    # duplicates == the same set without them
    idx2 = idx.clone()
    idx2[0, 21, 0] = torch.tensor([3, -1, -1])
    torch.testing.assert_close(reference(p, q, k, v, indices=idx2), o)
    # order within a row does not matter
    torch.testing.assert_close(reference(p, q, k, v, indices=idx.flip(-1)), o)


def test_selection_by_loop_with_own_indices():
    p = _slc_pattern(top=2)
    B, T = 2, 25
    q, k, v = rand_inputs(p, B, T, seed=17)
    o, idx = reference(p, q, k, v, return_indices=True)

    def allowed(b, t, h):
        blocks = {j for j in idx[b, t, h // 2].tolist() if j >= 0}
        return [pos for pos in range(t + 1) if pos // 4 in blocks]

    torch.testing.assert_close(o, loop_attention(q, k, v, allowed, 0.25))
    torch.testing.assert_close(reference(p, q, k, v, indices=idx), o)
    # the indices are the rule applied to block_scores
    S = block_scores(p, q, compress_mean(k, 4, 2))
    assert select_blocks(p, S, T).equal(idx)


def test_static_select_without_compress():
    p = make_pattern(select=Select(block=4, top=3, initial=1, local=2))
    q, k, v = rand_inputs(p, 1, 26, seed=18)
    o, idx = reference(p, q, k, v, return_indices=True)
    for t in range(26):
        c = t // 4
        want = sorted({0} | {j for j in (c - 1, c) if j >= 0})
        assert idx[0, t, 0].tolist() == want + [-1] * (3 - len(want))

    def allowed(b, t, h):
        c = t // 4
        return [pos for pos in range(t + 1) if pos // 4 in (0, c - 1, c)]

    torch.testing.assert_close(o, loop_attention(q, k, v, allowed, 0.25))


# --------------------------------------------------------------------------- gates, combine, per-branch K/V


def _full_pattern(combine=None, pool=Pool.MEAN):
    return make_pattern(
        compress=Compress(block=4, stride=2, pool=pool),
        select=Select(block=4, top=2, initial=1, local=1),
        window=Window(size=5),
        combine=combine,
    )


def _gates(B, T, HQ, seed):
    return [rand_like_shape((B, T, HQ), seed + i).sigmoid() for i in range(3)]


def test_gates_weight_the_branches():
    p = _full_pattern()
    B, T = 2, 21
    q, k, v = rand_inputs(p, B, T, seed=19)
    gc, gs, gw = _gates(B, T, 4, 20)
    br = reference_branches(p, q, k, v)
    assert set(br) == {Branch.CMP, Branch.SLC, Branch.SWA}
    want = gc[..., None] * br[Branch.CMP] + gs[..., None] * br[Branch.SLC] + gw[..., None] * br[Branch.SWA]
    torch.testing.assert_close(reference(p, q, k, v, g_cmp=gc, g_slc=gs, g_swa=gw), want)
    torch.testing.assert_close(reference(p, q, k, v, gc, gs, gw), want)  # gates positional, as the compiled call's
    # missing gates are 1
    torch.testing.assert_close(
        reference(p, q, k, v, g_cmp=gc), gc[..., None] * br[Branch.CMP] + br[Branch.SLC] + br[Branch.SWA]
    )
    torch.testing.assert_close(br[Branch.SWA], window_attention(p, q, k, v))


def test_combine_subset():
    B, T = 2, 21
    full = _full_pattern()
    q, k, v = rand_inputs(full, B, T, seed=21)
    gc, gs, gw = _gates(B, T, 4, 22)
    br = reference_branches(full, q, k, v)
    # compress declared for ranking only: only the selection is summed
    p = _full_pattern(combine=[Branch.SLC])
    assert p.combined_branches == (Branch.SLC,)
    with pytest.raises(ValueError, match=r"g_cmp: pattern .* does not combine the cmp branch \(combined: slc\)"):
        reference(p, q, k, v, g_slc=gs, g_cmp=gc)  # refused, as by the compiled call: it would be ignored
    o, idx = reference(p, q, k, v, g_slc=gs, return_indices=True)
    torch.testing.assert_close(o, gs[..., None] * br[Branch.SLC])
    _, idx_full = reference(full, q, k, v, return_indices=True)
    assert idx.equal(idx_full)
    p = _full_pattern(combine=[Branch.SWA, Branch.CMP])
    torch.testing.assert_close(
        reference(p, q, k, v, g_cmp=gc, g_swa=gw),
        gc[..., None] * br[Branch.CMP] + gw[..., None] * br[Branch.SWA],
    )
    assert set(reference_branches(p, q, k, v)) == {Branch.CMP, Branch.SLC, Branch.SWA}


def test_swa_kv_used_by_window_only():
    p = _full_pattern()
    B, T = 2, 21
    q, k, v = rand_inputs(p, B, T, seed=23)
    ks = rand_like_shape(k.shape, 24)
    vs = rand_like_shape(v.shape, 25)
    a = reference_branches(p, q, k, v)
    b = reference_branches(p, q, k, v, k_swa=ks, v_swa=vs)
    torch.testing.assert_close(a[Branch.CMP], b[Branch.CMP])
    torch.testing.assert_close(a[Branch.SLC], b[Branch.SLC])
    assert not torch.allclose(a[Branch.SWA], b[Branch.SWA])
    want = loop_attention(q, ks, vs, lambda bb, t, h: list(range(max(0, t - 4), t + 1)), 0.25)
    torch.testing.assert_close(b[Branch.SWA], want)
    # only k_swa given: v_swa defaults to v
    c = reference_branches(p, q, k, v, k_swa=ks)
    torch.testing.assert_close(c[Branch.SWA], window_attention(p, q, ks, v))


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("pool", [Pool.MEAN, Pool.MLP])
def test_query_chunk_matches_unchunked(pool):
    p = _full_pattern(pool=pool)
    B, T = 2, 33
    q, k, v = rand_inputs(p, B, T, seed=26)
    kw = {}
    if pool == Pool.MLP:
        Tc = num_compressed(T, 4, 2)
        kw = dict(k_cmp=rand_like_shape((B, Tc, 2, 16), 27), v_cmp=rand_like_shape((B, Tc, 2, 8), 28))
    gc, gs, gw = _gates(B, T, 4, 29)
    o, idx = reference(p, q, k, v, g_cmp=gc, g_slc=gs, g_swa=gw, return_indices=True, **kw)
    for n in (1, 3, 4, 7, 32, 33, 100):
        oc, ic = reference(p, q, k, v, g_cmp=gc, g_slc=gs, g_swa=gw, return_indices=True, query_chunk=n, **kw)
        assert ic.equal(idx), n
        torch.testing.assert_close(oc, o, rtol=0, atol=1e-12)
    bc = reference_branches(p, q, k, v, query_chunk=5, **kw)
    bu = reference_branches(p, q, k, v, **kw)
    for br in bu:
        torch.testing.assert_close(bc[br], bu[br], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- dtypes and gradients


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_low_precision_inputs(dtype, tol):
    p = _full_pattern()
    B, T = 2, 30
    q, k, v = rand_inputs(p, B, T, seed=30, dtype=dtype)
    gc, gs, gw = [g.to(dtype) for g in _gates(B, T, 4, 31)]
    o64, idx = reference(p, q.double(), k.double(), v.double(), g_cmp=gc.double(), g_slc=gs.double(), g_swa=gw.double(), return_indices=True)
    o = reference(p, q, k, v, g_cmp=gc, g_slc=gs, g_swa=gw, indices=idx)
    assert o.dtype == dtype
    assert torch.isfinite(o).all()
    # float32 computation: error well below the storage precision of dtype
    assert rel(o.double(), o64) < tol


def _tiny(p, T=7, B=1, seed=40):
    q, k, v = rand_inputs(p, B, T, seed=seed)
    return [x.requires_grad_(True) for x in (q, k, v)]


def _gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_compressed_mean():
    p = make_pattern(hq=2, hkv=1, dqk=4, dv=3, compress=Compress(block=2, stride=1))
    q, k, v = _tiny(p)
    g = rand_like_shape((1, 7, 2), 41).sigmoid().requires_grad_(True)
    _gradcheck(lambda q, k, v, g: reference(p, q, k, v, g_cmp=g), (q, k, v, g))


def test_gradcheck_compressed_mlp():
    p = make_pattern(hq=2, hkv=1, dqk=4, dv=3, compress=Compress(block=2, stride=2, pool=Pool.MLP))
    q, k, v = _tiny(p)
    kc = rand_like_shape((1, 3, 1, 4), 42).requires_grad_(True)
    vc = rand_like_shape((1, 3, 1, 3), 43).requires_grad_(True)
    kd, vd = k.detach(), v.detach()
    _gradcheck(lambda q, kc, vc: reference(p, q, kd, vd, k_cmp=kc, v_cmp=vc), (q, kc, vc))


def test_gradcheck_selection():
    p = make_pattern(
        hq=2, hkv=1, dqk=4, dv=3, compress=Compress(block=2, stride=1), select=Select(block=2, top=2, initial=1, local=1)
    )
    q, k, v = _tiny(p)
    g = rand_like_shape((1, 7, 2), 44).sigmoid().requires_grad_(True)
    _, idx = reference(p, q, k, v, return_indices=True)  # fixed: top-n has no gradient
    _gradcheck(lambda q, k, v, g: reference(p, q, k, v, g_slc=g, indices=idx), (q, k, v, g))
    # without given indices the gradient flows too (through o_slc only)
    reference(p, q, k, v, g_slc=g).sum().backward()
    for x in (q, k, v, g):
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert q.grad.abs().sum() > 0


def test_gradcheck_window_with_own_kv():
    p = make_pattern(hq=2, hkv=1, dqk=4, dv=3, window=Window(size=3))
    q, k, v = _tiny(p)
    ks = rand_like_shape(k.shape, 45).requires_grad_(True)
    vs = rand_like_shape(v.shape, 46).requires_grad_(True)
    g = rand_like_shape((1, 7, 2), 47).sigmoid().requires_grad_(True)
    kd, vd = k.detach(), v.detach()
    _gradcheck(lambda q, ks, vs, g: reference(p, q, kd, vd, k_swa=ks, v_swa=vs, g_swa=g), (q, ks, vs, g))


def test_gradcheck_all_branches_chunked():
    p = make_pattern(
        hq=2,
        hkv=1,
        dqk=4,
        dv=3,
        compress=Compress(block=2, stride=1),
        select=Select(block=2, top=2, initial=1, local=1),
        window=Window(size=2),
    )
    q, k, v = _tiny(p, T=6)
    _, idx = reference(p, q, k, v, return_indices=True)
    _gradcheck(lambda q, k, v: reference(p, q, k, v, indices=idx, query_chunk=4), (q, k, v))


# --------------------------------------------------------------------------- validation


def test_validation_errors():
    p = _full_pattern()
    B, T = 1, 12
    q, k, v = rand_inputs(p, B, T, seed=50)
    with pytest.raises(ValueError, match=r"q: expected shape \[B, T, HQ, Dqk\]"):
        reference(p, q[..., :8], k, v)
    with pytest.raises(ValueError, match=r"k: expected shape \[B, T, HKV, Dqk\] = \[1, 12, 2, 16\], got \[1, 11, 2, 16\]"):
        reference(p, q, k[:, :11], v)
    with pytest.raises(ValueError, match=r"v: expected shape .*Dv.*got \[1, 12, 2, 16\]"):
        reference(p, q, k, k)
    with pytest.raises(ValueError, match=r"k_cmp: .*computed from k, v"):
        reference(p, q, k, v, k_cmp=k[:, :5])
    with pytest.raises(ValueError, match=r"g_swa: expected shape \[B, T, HQ\] = \[1, 12, 4\], got \[1, 12, 2\]"):
        reference(p, q, k, v, g_swa=torch.ones(1, 12, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"k: expected dtype torch.float64"):
        reference(p, q, k.float(), v)
    with pytest.raises(ValueError, match=r"query_chunk"):
        reference(p, q, k, v, query_chunk=0)
    with pytest.raises(ValueError, match=r"k_swa: expected shape"):
        reference(p, q, k, v, k_swa=k[:, :, :1])
    # indices
    with pytest.raises(ValueError, match=r"indices: expected shape \[B, T, HKV, top\] = \[1, 12, 2, 2\], got \[1, 12, 2, 3\]"):
        reference(p, q, k, v, indices=torch.zeros(1, 12, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"indices: expected block ids in \[-1, 2\]"):
        reference(p, q, k, v, indices=torch.full((1, 12, 2, 2), 3))
    with pytest.raises(ValueError, match=r"indices: expected block ids"):
        reference(p, q, k, v, indices=torch.full((1, 12, 2, 2), -2))
    with pytest.raises(ValueError, match=r"indices: expected an integer dtype"):
        reference(p, q, k, v, indices=torch.zeros(1, 12, 2, 2))
    # mlp pooling: both compressed tensors required, Tc rows
    pm = _full_pattern(pool=Pool.MLP)
    Tc = num_compressed(T, 4, 2)  # 5
    kc, vc = rand_like_shape((1, Tc, 2, 16), 1), rand_like_shape((1, Tc, 2, 8), 2)
    with pytest.raises(ValueError, match=r"k_cmp: required .*mlp.*\[1, 5, 2, 16\]"):
        reference(pm, q, k, v, v_cmp=vc)
    with pytest.raises(ValueError, match=r"v_cmp: required .*mlp.*\[1, 5, 2, 8\]"):
        reference(pm, q, k, v, k_cmp=kc)
    with pytest.raises(ValueError, match=r"k_cmp: expected shape \[B, Tc, HKV, Dqk\] = \[1, 5, 2, 16\], got \[1, 6, 2, 16\]"):
        reference(pm, q, k, v, k_cmp=rand_like_shape((1, 6, 2, 16), 3), v_cmp=vc)
    reference(pm, q, k, v, k_cmp=kc, v_cmp=vc)  # fine
    # arguments a pattern cannot use
    pw = make_pattern(window=Window(size=3))
    with pytest.raises(ValueError, match=r"k_cmp: given, but the pattern has no compress"):
        reference(pw, q, k, v, k_cmp=kc)
    with pytest.raises(ValueError, match=r"g_slc: pattern .* does not combine the slc branch"):
        reference(pw, q, k, v, g_slc=torch.ones(1, 12, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"return_indices"):
        reference(pw, q, k, v, return_indices=True)
    pc = make_pattern(compress=Compress(block=4, stride=2))
    with pytest.raises(ValueError, match=r"k_swa: given, but the pattern has no window"):
        reference(pc, q, k, v, k_swa=k)
    with pytest.raises(ValueError, match=r"indices: given, but the pattern has no select"):
        reference(pc, q, k, v, indices=torch.zeros(1, 12, 2, 2, dtype=torch.int64))
    # selection that cannot be ranked, forced blocks beyond top
    with pytest.raises(ValueError, match=r"compress branch, which the pattern lacks"):
        reference(make_pattern(select=Select(block=4, top=3, initial=1, local=1)), q, k, v)
    with pytest.raises(ValueError, match=r"exceed top"):
        reference(make_pattern(compress=Compress(block=4, stride=2), select=Select(block=4, top=2, initial=2, local=1)), q, k, v)
    with pytest.raises(ValueError, match=r"S: expected shape"):
        select_blocks(p, torch.zeros(1, 12, 2, 5), 12)
    with pytest.raises(ValueError, match=r"q: expected a floating dtype"):
        reference(p, q.long(), k.long(), v.long())


# --------------------------------------------------------------------------- property: the selection rule


@st.composite
def selection_cases(draw):
    d = draw(st.sampled_from([1, 2, 4]))
    l = d * draw(st.integers(1, 3))
    ls = d * draw(st.integers(1, 4))
    top = draw(st.integers(1, 5))
    initial = draw(st.integers(0, top))
    local = draw(st.integers(0, top - initial))
    hkv = draw(st.integers(1, 2))
    g = draw(st.integers(1, 3))
    pool = draw(st.sampled_from([Pool.MEAN, Pool.MLP]))
    p = make_pattern(
        hq=hkv * g,
        hkv=hkv,
        dqk=8,
        dv=8,
        compress=Compress(block=l, stride=d, pool=pool),
        select=Select(block=ls, top=top, initial=initial, local=local),
    )
    T = draw(st.integers(1, 70))
    B = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    mag = draw(st.sampled_from([0.1, 1.0, 4.0]))
    chunk = draw(st.integers(1, 70))
    return p, T, B, seed, mag, chunk


@given(selection_cases())
def test_property_indices_obey_rule(case):
    p, T, B, seed, mag, chunk = case
    c, s = p.compress, p.select
    q, k, v = rand_inputs(p, B, T, seed=seed, scale=mag)
    kw = {}
    if c.pool == Pool.MLP:
        Tc = num_compressed(T, c.block, c.stride)
        kw = dict(
            k_cmp=rand_like_shape((B, Tc, p.heads.kv, 8), seed + 1) * mag,
            v_cmp=rand_like_shape((B, Tc, p.heads.kv, 8), seed + 2),
        )
        kc = kw["k_cmp"]
    else:
        kc = compress_mean(k, c.block, c.stride)
    o, idx = reference(p, q, k, v, return_indices=True, **kw)
    assert torch.isfinite(o).all()
    assert idx.shape == (B, T, p.heads.kv, s.top) and idx.dtype == torch.int32
    S = block_scores(p, q, kc)
    NB = num_blocks(T, s.block)
    assert S.shape == (B, T, p.heads.kv, NB)
    for b in range(B):
        for t in range(T):
            cur = t // s.block
            forced = {j for j in range(cur + 1) if j < s.initial or j > cur - s.local}
            for kv in range(p.heads.kv):
                row = idx[b, t, kv].tolist()
                n = min(s.top, cur + 1)
                sel, pad = row[:n], row[n:]
                assert pad == [-1] * (s.top - n)
                assert sel == sorted(set(sel)) and all(0 <= j <= cur for j in sel)
                assert forced <= set(sel)
                scores = S[b, t, kv]
                assert torch.isinf(scores[cur + 1 :]).all() and torch.isfinite(scores[: cur + 1]).all()
                free = [j for j in sel if j not in forced]
                rest = [j for j in range(cur + 1) if j not in sel]
                if free and rest:
                    assert min(scores[j].item() for j in free) >= max(scores[j].item() for j in rest) - 1e-12
                    # ties: an unselected block scoring equal to a chosen one must have a higher index
                    for j in rest:
                        for i in free:
                            if scores[j].item() == scores[i].item():
                                assert j > i
    assert select_blocks(p, S, T).equal(idx)
    oc, ic = reference(p, q, k, v, return_indices=True, query_chunk=chunk, **kw)
    assert ic.equal(idx)
    torch.testing.assert_close(oc, o, rtol=0, atol=1e-12)
    torch.testing.assert_close(reference(p, q, k, v, indices=idx, **kw), o, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- gather=True


@settings(max_examples=40, deadline=None)
@given(pattern=valid_patterns(), length=st.integers(1, 90), seed=st.integers(0, 2**31 - 1),
       chunk=st.sampled_from([None, 1, 7, 32]), given_indices=st.booleans())
def test_gathered_branches_equal_the_dense_reference(pattern, length, seed, chunk, given_indices):
    """reference(..., gather=True) sees exactly the same keys as the dense
    masks: equal outputs and gradients (float64), including given indices
    with repeats, -1 and blocks past the position."""
    args = random_inputs(pattern, 1, length, torch.float64, seed)
    extra = {}
    if given_indices and pattern.select is not None:
        gen = torch.Generator().manual_seed(seed)
        n_blocks = num_blocks(length, pattern.select.block)
        idx = torch.randint(-1, n_blocks, (1, length, pattern.heads.kv, pattern.select.top), generator=gen)
        if pattern.select.top > 1:
            idx[..., 1] = idx[..., 0]  # a repeated block counts once
        extra["indices"] = idx.to(torch.int32)
    leaves = {n: t.clone().requires_grad_(True) for n, t in args.items()}
    dense = reference(pattern, **leaves, **extra)
    dense_grads = torch.autograd.grad(dense.sum(), list(leaves.values()), allow_unused=True)
    leaves2 = {n: t.clone().requires_grad_(True) for n, t in args.items()}
    gathered = reference(pattern, **leaves2, **extra, gather=True, query_chunk=chunk)
    gathered_grads = torch.autograd.grad(gathered.sum(), list(leaves2.values()), allow_unused=True)
    assert torch.allclose(gathered, dense, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(leaves, dense_grads, gathered_grads):
        if a is None:
            assert b is None or torch.count_nonzero(b) == 0, name
        else:
            assert torch.allclose(b, a, rtol=1e-9, atol=1e-11), name


def test_gathered_selection_counts_a_repeated_block_once():
    p = Pattern(name="rep", heads=Heads(q=2, kv=1), dims=Dims(qk=8, v=8),
                compress=Compress(block=8, stride=4), select=Select(block=8, top=3, initial=0, local=1))
    T = 40
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, h, 8, generator=gen, dtype=F64) for h in (2, 1, 1))
    idx = torch.full((1, T, 1, 3), -1, dtype=torch.int32)
    idx[0, :, 0, 0] = torch.arange(T) // 8          # the current block
    idx[0, :, 0, 1] = torch.arange(T) // 8          # ... listed twice
    idx[0, 16:, 0, 2] = 0                            # and block 0 from t=16 on
    dense = reference_branches(p, q, k, v, indices=idx)[Branch.SLC]
    gathered = reference_branches(p, q, k, v, indices=idx, gather=True)[Branch.SLC]
    assert torch.allclose(gathered, dense, rtol=1e-12, atol=1e-12)
    # The set semantics, by hand at t=20: blocks {2, 0} -> keys 0..7 and 16..20.
    keys = list(range(8)) + list(range(16, 21))
    s = (q[0, 20] @ k[0, keys, 0].T) / math.sqrt(8)
    by_hand = torch.softmax(s, dim=-1) @ v[0, keys, 0]
    assert torch.allclose(gathered[0, 20], by_hand, rtol=1e-12, atol=1e-12)
