"""Attention of new positions against a cache (prefill of a prompt piece,
decode of one token), in PyTorch: each query reads only the compressed
tokens, its selected blocks and its window (gathered), at its own position
in its own sequence, the rows of a batch at different lengths.

This is the incremental schedule of NSA_MATH.md ("Cache, prefill and
decode") and the oracle of any decode kernel: the same branch math as the
reference (its masked softmax, overlap weights and selection rule), for
rows whose positions differ per sequence. Softmax statistics in float32;
the output in q's dtype.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, Optional, Sequence

import torch

from .geometry import num_blocks
from .ir import Branch
from .kv_cache import NSACache
from .launch import LOG2E
from .launch_decode import decode_step
from .reference import (_attend_gathered, compressed_at_positions, first_occurrence, overlap_weights,
                        select_at_positions)


class _Slots:
    """A cache tensor seen through the slots of a call (rows): gathers read
    it in place, through the cache's layout (NSACache.locate)."""

    def __init__(self, cache: NSACache, tensor: torch.Tensor, rows: torch.Tensor):
        self.cache, self.tensor, self.rows = cache, tensor, rows


def _gather_rows(x: _Slots, pos: torch.Tensor) -> torch.Tensor:
    """The call's slots of a cache tensor at positions pos [b, N, HKV, S]
    (clamped into range; the caller masks what lies outside) -> [b, N,
    HKV, S, D]."""
    HKV = x.tensor.shape[2]
    page, offset = x.cache.locate(x.rows.view(-1, 1, 1, 1), pos.clamp(0, max(x.cache.max_len - 1, 0)))
    h = torch.arange(HKV, device=pos.device).view(1, 1, HKV, 1)
    return x.tensor[page, offset, h]


def attend_cached(cache: NSACache, slots: Sequence[int], q: torch.Tensor, gates: Dict[Branch, torch.Tensor],
                  scale: float, *, query_chunk: int = 128, want_indices: bool = False):
    """o [b, m, HQ, Dv] of the queries q [b, m, HQ, Dqk] that sit at the last
    m positions of each slot's sequence (the cache already holds them and
    the compressed tokens they complete), gated by gates {Branch: [b, m,
    HQ]}; with want_indices also the selection's blocks [b, m, HKV, top].
    The spans end at the longest sequence (host lengths). PyTorch: a
    piece after cached positions, or a decode step where no decode kernels
    run (step)."""
    p = cache.pattern
    b, m, HQ, _ = q.shape
    HKV, G = p.heads.kv, p.heads.q // p.heads.kv
    rows = cache.rows(slots)
    lengths = [cache.host_lengths[s] for s in slots]
    longest = max(lengths)
    first = torch.tensor([n - m for n in lengths], device=q.device, dtype=torch.int64)
    # the cache's own tensors, read at (slot, position): no copy of a span
    k, v = _Slots(cache, cache.k, rows), _Slots(cache, cache.v, rows)
    k_swa = _Slots(cache, cache.k_swa, rows) if cache.k_swa is not None else k
    v_swa = _Slots(cache, cache.v_swa, rows) if cache.v_swa is not None else v
    n_cmp = cache.compressed_count(longest)
    k_cmp = cache.k_cmp[rows, :n_cmp] if p.compress is not None else None
    v_cmp = cache.v_cmp[rows, :n_cmp] if p.compress is not None else None
    outs, idx_out = [], []
    for c0 in range(0, m, query_chunk):
        c1 = min(m, c0 + query_chunk)
        t = first[:, None] + torch.arange(c0, c1, device=q.device)  # [b, N] positions
        q5 = q[:, c0:c1].float().reshape(b, c1 - c0, HKV, G, -1)
        o = torch.zeros(b, c1 - c0, HKV, G, p.dims.v, device=q.device, dtype=torch.float32)
        branch = {}
        p_cmp = None
        if p.compress is not None:
            branch[Branch.CMP], p_cmp = compressed_at_positions(p, q5, k_cmp.float(), v_cmp.float(), t, scale)
        if p.select is not None:
            idx = _selection_indices(p, p_cmp, t, longest)
            branch[Branch.SLC] = _selected(p, q5, k, v, idx, t, scale)
            if want_indices:
                idx_out.append(idx)
        if p.window is not None:
            branch[Branch.SWA] = _window(p, q5, k_swa, v_swa, t, scale)
        for br in p.combined_branches:
            g = gates.get(br)
            g5 = 1.0 if g is None else g[:, c0:c1].float().reshape(b, c1 - c0, HKV, G, 1)
            o = o + g5 * branch[br]
        outs.append(o.reshape(b, c1 - c0, HQ, p.dims.v))
    o = torch.cat(outs, 1).to(q.dtype)
    return (o, torch.cat(idx_out, 1)) if want_indices else o


def _selection_indices(p, p_cmp, t, longest):
    """Blocks [b, N, HKV, top] of rows at positions t: the compressed
    probabilities spread over the blocks they overlap, summed over the
    group, then the selection rule (forced blocks, top-n, ties to the lower
    block). A static selection (no compress) has only forced blocks."""
    sel = p.select
    NB = num_blocks(longest, sel.block)
    b, N = t.shape
    if p_cmp is None:
        S = torch.zeros(b, N, p.heads.kv, NB, device=t.device, dtype=torch.float64)
    else:
        S = banded_block_scores(p, p_cmp.sum(3), NB)
    return select_at_positions(p, S, t)


def banded_block_scores(p, ps: torch.Tensor, NB: int) -> torch.Tensor:
    """S [..., NB] = ps [..., Tc] @ overlap_weights: block j takes the
    compressed tokens that overlap it, j*r - (l/d - 1) .. j*r + r - 1 with
    r = l'/d, and a token's weight depends only on its offset in that span
    (shift by one block moves both by l'), so S is a strided window sum of
    ps with one weight vector: O(Tc * (r + l/d)) work, where the dense
    [Tc, NB] weight matrix (built every step) was O(Tc * NB)."""
    c, sel = p.compress, p.select
    r, back = sel.block // c.stride, c.block // c.stride - 1
    span = r + back
    offsets = torch.arange(span, device=ps.device, dtype=torch.int64) - back  # token - j*r
    j0 = back // r + 1  # a block far enough from 0 that all its tokens have ids >= 0
    weights = overlap_weights(c.block, c.stride, sel.block, (j0 + 1) * r, j0 + 1, dtype=ps.dtype,
                              device=ps.device)[j0 * r + offsets, j0]
    Tc = ps.shape[-1]
    need = NB * r + back  # padded length: every block's window inside it
    padded = torch.nn.functional.pad(ps, (back, max(0, need - Tc - back)))[..., :need]
    windows = padded.unfold(-1, span, r)[..., :NB, :]  # [..., NB, span]
    return windows @ weights


def _selected(p, q5, k, v, idx, t, scale):
    """o_slc of rows at positions t over the keys of their blocks idx (each
    block once, keys at or before the row)."""
    lb = p.select.block
    b, N, HKV, top = idx.shape
    offs = torch.arange(lb, device=q5.device, dtype=torch.int64)
    pos = (idx.to(torch.int64).unsqueeze(-1) * lb + offs).reshape(b, N, HKV, top * lb)
    ok = ((idx >= 0) & first_occurrence(idx)).repeat_interleave(lb, dim=-1)
    mask = ok & (pos <= t[:, :, None, None])
    return _attend_gathered(q5, _gather_rows(k, pos).float(), _gather_rows(v, pos).float(), mask, scale)


def _window(p, q5, k, v, t, scale):
    """o_swa of rows at positions t over positions t - w + 1 .. t."""
    w = p.window.size
    b, N = t.shape
    HKV = q5.shape[2]
    pos = (t[:, :, None] - w + 1 + torch.arange(w, device=q5.device)).unsqueeze(2).expand(b, N, HKV, w)
    return _attend_gathered(q5, _gather_rows(k, pos).float(), _gather_rows(v, pos).float(), pos >= 0, scale)


def check_cache(cache) -> None:
    if not isinstance(cache, NSACache):
        raise ValueError(f"cache: expected an NSACache (compiled.new_cache), got {type(cache).__name__}")


def validate_step(cache: NSACache, pattern, q, k, v, gates: dict, slots: Optional[Sequence[int]],
                  k_swa=None, v_swa=None, k_cmp=None, v_cmp=None, *, host_lengths: bool = True) -> list:
    """The checks of a prefill or decode call, before anything is written:
    the cache's pattern, dtype and device, the batch against the slots, the
    room left, and every tensor's shape. Returns the slots. host_lengths=
    False leaves out what reads the cache's host lengths (the room, and
    the count of pool=mlp's listed tokens): a traced call checks the rest
    before its op, the op all of it (custom_ops.nsa_cache_step)."""
    check_cache(cache)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected [batch, Tq, HQ={pattern.heads.q}, Dqk={pattern.dims.qk}], got "
                         f"{list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    cache.check_compatible(pattern, q)
    b, m = q.shape[:2]
    if m < 1:
        raise ValueError(f"q: expected at least one new position, got shape {list(q.shape)}")
    slots = cache.check_slots(slots, b)  # the batch first: a wrong one would show as every other shape
    hq, hkv, dqk, dv = pattern.heads.q, pattern.heads.kv, pattern.dims.qk, pattern.dims.v
    expect = {"q": (q, (b, m, hq, dqk)), "k": (k, (b, m, hkv, dqk)), "v": (v, (b, m, hkv, dv))}
    if cache.k_swa is not None or k_swa is not None or v_swa is not None:
        if cache.k_swa is None:
            raise ValueError("k_swa: this cache keeps no separate window keys (new_cache(..., k_swa=True))")
        expect["k_swa"], expect["v_swa"] = (k_swa, (b, m, hkv, dqk)), (v_swa, (b, m, hkv, dv))
    for br in pattern.combined_branches:
        expect[f"g_{br.value}"] = (gates.get(br), (b, m, hq))
    for name, (t, shape) in expect.items():
        if t is None:
            if name.startswith("g_"):
                continue  # an absent gate counts as 1
            raise ValueError(f"{name}: required by this cache, got None")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape {list(shape)}, got {got}")
        cache.check_compatible(pattern, t, name)
    if host_lengths:
        cache.check_room(slots, m)
    if not cache.pools_itself and pattern.compress is not None:
        counts = [len(cache.completed_tokens(s, cache.host_lengths[s], cache.host_lengths[s] + m)) if host_lengths
                  else None for s in slots]
        for name, t, d in (("k_cmp", k_cmp, dqk), ("v_cmp", v_cmp, dv)):
            if isinstance(t, torch.Tensor):  # one candidate per new position (capturable)
                if tuple(t.shape) != (b, m, hkv, d):
                    raise ValueError(f"{name}: pool=mlp as a tensor: expected [b, m, HKV, D] = {[b, m, hkv, d]} (the"
                                     f" token whose block ends at each new position), got {list(t.shape)}")
                cache.check_compatible(pattern, t, name)
                continue
            if not isinstance(t, (list, tuple)) or len(t) != b:
                which = f": {counts}" if host_lengths else ""
                raise ValueError(f"{name}: pool=mlp: expected one tensor per sequence [n_s, HKV, D] (the"
                                 f" compressed tokens this call completes{which}), got {type(t).__name__}")
            for s, (x, n) in enumerate(zip(t, counts)):
                if not isinstance(x, torch.Tensor) or tuple(x.shape) != (n if n is not None else x.shape[0], hkv, d):
                    got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ValueError(f"{name}[{s}]: expected shape {[n if n is not None else 'n', hkv, d]} (the"
                                     f" compressed tokens this call completes), got {got}")
                cache.check_compatible(pattern, x, f"{name}[{s}]")
    elif k_cmp is not None or v_cmp is not None:
        raise ValueError("k_cmp: this pattern pools its compressed tokens itself (pool=mean); pass none")
    return slots


def step(cache: NSACache, pattern, q, k, v, gates: dict, *, scale=None, slots=None, k_swa=None, v_swa=None,
         k_cmp=None, v_cmp=None, return_indices: bool = False, compiled=None):
    """A prefill or decode step (CompiledPattern.prefill's contract): bad
    input a ValueError before anything is written; then the new keys and
    compressed tokens stored and the new queries attended. `compiled`: a
    CompiledPattern whose kernels can run here. Where every slot of the
    call is empty, the piece is a whole prompt: its full forward computes
    it; a decode step runs the decode kernels where the plan has them; any
    other piece runs the training kernels on the cached sequences
    (attend_through_kernels), or without `compiled` attend_cached."""
    if return_indices and pattern.select is None:
        raise ValueError(f"return_indices: pattern {pattern.name!r} has no select branch, so there are no indices")
    slots = validate_step(cache, pattern, q, k, v, gates, slots, k_swa, v_swa, k_cmp, v_cmp)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(pattern.dims.qk)
    if compiled is not None and all(cache.host_lengths[s] == 0 for s in slots):
        mlp = {} if cache.pools_itself or pattern.compress is None else {
            "k_cmp": _completed(cache, k_cmp), "v_cmp": _completed(cache, v_cmp)}
        out = compiled(q, k, v, gates.get(Branch.CMP), gates.get(Branch.SLC), gates.get(Branch.SWA),
                           k_swa=k_swa, v_swa=v_swa, scale=scale, return_indices=return_indices, **mlp)
        store(cache, slots, k, v, k_swa, v_swa, k_cmp, v_cmp)
        return out
    if q.shape[1] == 1 and compiled is not None and compiled.plan.has("dec_attend"):
        # a decode step: appended and attended in the plan's decode kernels
        if not cache.pools_itself and pattern.compress is not None and not isinstance(k_cmp, torch.Tensor):
            k_cmp, v_cmp = _candidates(cache, slots, k_cmp, k), _candidates(cache, slots, v_cmp, v)
        o, idx = decode_step(compiled, cache, cache.rows(slots), q, k, v, gates, scale * LOG2E, k_swa=k_swa,
                             v_swa=v_swa, k_cmp=k_cmp, v_cmp=v_cmp, want_indices=return_indices)
        for s in slots:
            cache.host_lengths[s] += 1
        return (o, idx) if return_indices else o
    store(cache, slots, k, v, k_swa, v_swa, k_cmp, v_cmp)
    if compiled is not None and q.shape[1] > 1:
        out = attend_through_kernels(compiled, cache, slots, q, gates, scale, want_indices=return_indices)
    else:
        out = attend_cached(cache, slots, q, {b: g for b, g in gates.items() if g is not None}, scale,
                            want_indices=return_indices)
    return out


def attend_through_kernels(compiled, cache: NSACache, slots: Sequence[int], q: torch.Tensor, gates: dict,
                           scale: float, *, want_indices: bool = False):
    """attend_cached's result from the training forward's kernels (a piece
    of a prompt after cached positions: chunked prefill): the slots'
    cached sequences as packed sequences, each with queries at its last m
    positions (cu_seqlens_q). The keys and values are read out of the
    cache into one packed tensor (a view where one slot of a contiguous
    cache holds them all); pool=mlp's compressed tokens likewise, pool=mean
    pools them again in the call."""
    p = cache.pattern
    b, m = q.shape[:2]
    lengths = [cache.host_lengths[s] for s in slots]
    contiguous_slot = b == 1 and not cache.paged

    def packed(name: str) -> Optional[torch.Tensor]:
        if getattr(cache, name) is None:
            return None
        if contiguous_slot:
            return getattr(cache, name)[slots[0], :lengths[0]][None]
        return torch.cat([cache.positions(name, s) for s in slots])[None]
    k, v = packed("k"), packed("v")
    k_swa, v_swa = packed("k_swa"), packed("v_swa")
    mlp = {}
    if p.compress is not None and not cache.pools_itself:
        counts = [cache.compressed_count(n) for n in lengths]
        mlp = {name: torch.cat([getattr(cache, name)[s, :n] for s, n in zip(slots, counts)])[None]
               for name in ("k_cmp", "v_cmp")}
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=q.device)
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device) * m
    flat = {br.value: (g.reshape(1, b * m, -1) if g is not None else None) for br, g in gates.items()}
    out = compiled(q.reshape(1, b * m, *q.shape[2:]), k, v, flat.get("cmp"), flat.get("slc"), flat.get("swa"),
                   k_swa=k_swa, v_swa=v_swa, scale=scale, return_indices=want_indices, cu_seqlens=cu,
                   max_seqlen=max(lengths), cu_seqlens_q=cu_q, max_seqlen_q=m, **mlp)
    if want_indices:
        o, idx = out
        return o.view(b, m, *o.shape[2:]), idx.view(b, m, *idx.shape[2:])
    return out.view(b, m, *out.shape[2:])


def _candidates(cache: NSACache, slots, tokens, like: torch.Tensor) -> torch.Tensor:
    """pool=mlp's per-sequence lists of a decode step (each the 0 or 1 token
    the new position completes) as the candidates [b, 1, HKV, D] the decode
    kernels take: zeros where the position completes none (never written)."""
    out = torch.zeros(len(slots), 1, *tokens[0].shape[1:], device=like.device, dtype=like.dtype)
    for i, t in enumerate(tokens):
        if len(t):
            out[i, 0] = t[0]
    return out


def _completed(cache: NSACache, tokens) -> torch.Tensor:
    """A whole prompt's compressed tokens [b, Tc, HKV, D] (the full
    forward's k_cmp) from per-sequence lists, or from per-position
    candidates (those at the positions i*d + l - 1)."""
    if not isinstance(tokens, torch.Tensor):
        return torch.stack(list(tokens))
    c = cache.pattern.compress
    return tokens[:, c.block - 1::c.stride]


def store(cache: NSACache, slots, k, v, k_swa=None, v_swa=None, k_cmp=None, v_cmp=None) -> None:
    """Append k, v (and k_swa, v_swa) after each slot's sequence and store
    the compressed tokens the new positions complete: pooled from the cache
    (pool=mean, inside append) or the caller's k_cmp/v_cmp lists
    (pool=mlp). The inputs are validated (validate_step)."""
    m = k.shape[1]
    before = [cache.host_lengths[s] for s in slots]
    cache.append(slots, k, v, k_swa, v_swa)
    if cache.pattern.compress is None:
        return
    if cache.pools_itself:  # append pooled them
        return
    if isinstance(k_cmp, torch.Tensor):  # candidates: written where their position completes a token
        cache.write_candidates(slots, k_cmp, v_cmp)
        return
    for i, s in enumerate(slots):
        tokens = cache.completed_tokens(s, before[i], before[i] + m)
        if len(tokens):
            cache.write_compressed(s, tokens.start, k_cmp[i], v_cmp[i])
