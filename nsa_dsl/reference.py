"""The dense reference: NSA attention in plain PyTorch with explicit masks.

This module is the oracle every kernel is tested against, so it follows
shared/NSA_MATH.md literally and favours clarity over speed. It imports only
the IR, the sequence geometry (geometry.py: Tc, NB, which compressed tokens a
position sees) and torch, never kernel code.

Layouts (batch first, as flash-attn):
    q            [B, T, HQ, Dqk]          HQ = G * HKV, query head h uses KV head h // G
    k, v         [B, T, HKV, Dqk / Dv]
    k_swa, v_swa as k, v (window branch only; default k, v)
    k_cmp, v_cmp [B, Tc, HKV, Dqk / Dv]   Tc = max(0, (T - l) // d + 1)
    g_*          [B, T, HQ]               gates (default 1)
    indices      [B, T, HKV, top]         selected block ids, int, -1 padded

Public functions
----------------
reference(pattern, q, k, v, g_cmp, g_slc, g_swa, *, k_cmp, v_cmp, k_swa, v_swa,
          indices, scale, return_indices, query_chunk)
    o [B, T, HQ, Dv] = sum over pattern.combined_branches of gate * branch output;
    with return_indices=True, (o, indices).
reference_branches(pattern, q, k, v, *, k_cmp, v_cmp, k_swa, v_swa, indices,
                   scale, query_chunk, return_indices=False)
    {Branch: ungated output [B, T, HQ, Dv]} for every *declared* branch.
compress_mean(x, block, stride) -> [B, Tc, H, D] mean pooling.
overlap_weights(block, stride, select_block, Tc, NB) -> W [Tc, NB]
    W[i, j] = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d.
compressed_attention(pattern, q, k_cmp, v_cmp=None, scale=None)
    -> (o_cmp [B,T,HQ,Dv] or None, p_cmp [B,T,HQ,Tc]).
block_scores(pattern, q, k_cmp, scale=None) -> S [B, T, HKV, NB]
    group-summed block importance, -inf on invisible blocks (j > t // l').
select_blocks(pattern, S, T=None, *, query_offset=0) -> indices [B, Tq, HKV, top]
selection_attention(pattern, q, k, v, indices, scale=None) -> o_slc
window_attention(pattern, q, k, v, scale=None) -> o_swa

Conventions decided here
------------------------
* Index order: every row of indices this module returns is int32, the selected
  block ids sorted ascending, followed by -1 padding up to `top` (a row has
  min(top, t // l' + 1) valid entries).
* Given indices (the `indices=` argument): any integer dtype, values in
  [-1, NB). A row is read as a *set*: -1 entries are ignored and duplicates
  count once (a block is either attended or not). The forced-block rule is
  not re-applied; ids of future blocks (j > t // l') are allowed and add
  nothing, since positions > t are always masked. A row with no usable block
  gives o_slc = 0. Given indices are returned unchanged (as int32) when
  return_indices=True.
* Selection needs a ranking: with a compress branch the scores come from it;
  without one, only a static select (top == initial + local, so the forced
  blocks are the whole set) works, unless indices are given. initial + local
  > top is rejected (the rule "forced plus the best of the rest, top in all"
  is then undefined).
* A query that sees no key of a branch (no compressed token yet, or an empty
  given index row) gets 0 from that branch and probability 0: never NaN.
* Dtypes: float16/bfloat16 inputs are computed in float32 and the output cast
  back; float32/float64 are computed in their own dtype. k, v, k_cmp, v_cmp,
  k_swa, v_swa must have q's dtype and device; gates may be any float dtype.
  Probabilities and scores returned by the diagnostic functions are in the
  computation dtype.
* Autograd flows to q, k, v, gates, k_cmp, v_cmp, k_swa, v_swa; the block
  scores and the top-n choice are computed on detached tensors.
* query_chunk=N processes queries N at a time (keys are cut at the chunk's
  last position), so peak memory is O(B * N * HQ * T); results do not depend
  on N.
* Arguments that a pattern cannot use are rejected: k_cmp / v_cmp unless the
  pattern pools by mlp (with mean pooling they are computed from k, v),
  k_swa / v_swa without a window, a gate of an undeclared branch. The gate of
  a declared branch that is not combined is accepted and ignored.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional, Sequence

import torch

from . import varlen
from .geometry import compressed_end, num_blocks, num_compressed
from .ir import Branch, Pattern, Pool
from .validate import check_scale

__all__ = [
    "reference",
    "reference_branches",
    "compress_mean",
    "overlap_weights",
    "compressed_attention",
    "block_scores",
    "select_blocks",
    "selection_attention",
    "window_attention",
]


# --------------------------------------------------------------------------- sizes


# --------------------------------------------------------------------------- validation helpers


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _check_shape(name: str, x, names: Sequence[str], expected: Sequence[int]) -> None:
    """ValueError naming the argument, the expected shape and what came."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    want = f"[{', '.join(names)}] = {_shape_str(expected)}"
    if x.dim() != len(expected) or tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {want}, got {_shape_str(x.shape)}")


def _check_like(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    if x.dtype != q.dtype:
        raise ValueError(f"{name}: expected dtype {q.dtype} (that of q), got {x.dtype}")
    if x.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {x.device}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype in (torch.float32, torch.float64):
        return dtype
    raise ValueError(f"q: expected a floating dtype (float16, bfloat16, float32, float64), got {dtype}")


def _check_pattern(pattern: Pattern) -> None:
    h = pattern.heads
    if h.kv <= 0 or h.q <= 0 or h.q % h.kv:
        raise ValueError(f"pattern heads: q={h.q} must be a positive multiple of kv={h.kv}")
    if pattern.compress is not None:
        c = pattern.compress
        if c.block <= 0 or c.stride <= 0:
            raise ValueError(f"pattern compress: block={c.block} and stride={c.stride} must be positive")
    if pattern.select is not None:
        s = pattern.select
        if s.block <= 0 or s.top <= 0 or s.initial < 0 or s.local < 0:
            raise ValueError(
                f"pattern select: block={s.block}, top={s.top} must be positive and "
                f"initial={s.initial}, local={s.local} non-negative"
            )
        if s.initial + s.local > s.top:
            raise ValueError(
                f"pattern select: initial + local = {s.initial + s.local} forced blocks exceed top={s.top}"
            )
    if pattern.window is not None and pattern.window.size <= 0:
        raise ValueError(f"pattern window: size={pattern.window.size} must be positive")


def _default_scale(pattern: Pattern, scale: Optional[float]) -> float:
    check_scale(scale)
    return 1.0 / math.sqrt(pattern.dims.qk) if scale is None else float(scale)


# --------------------------------------------------------------------------- building blocks


def compress_mean(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Mean pooling: out[:, i] = mean(x[:, i*stride : i*stride + block]).

    x [B, T, H, D] -> [B, Tc, H, D] with Tc = num_compressed(T, block, stride);
    an empty [B, 0, H, D] when T < block. Differentiable.
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected shape [B, T, H, D], got {_shape_str(x.shape)}")
    B, T, H, D = x.shape
    Tc = num_compressed(T, block, stride)
    if Tc == 0:
        return x[:, :0]
    # unfold: [B, Tc, H, D, block] (windows of `block` rows taken every `stride`)
    return x.unfold(1, block, stride).mean(dim=-1)


def overlap_weights(
    block: int,
    stride: int,
    select_block: int,
    Tc: int,
    NB: int,
    *,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> torch.Tensor:
    """W [Tc, NB]: W[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d.

    Compressed token i gives its probability to selection block j with weight
    W[i, j] (the overlap measured in units of the stride d).
    """
    i = torch.arange(Tc, device=device, dtype=torch.int64).unsqueeze(1)
    j = torch.arange(NB, device=device, dtype=torch.int64).unsqueeze(0)
    lo = torch.maximum(i * stride, j * select_block)
    hi = torch.minimum(i * stride + block, (j + 1) * select_block)
    return (hi - lo).clamp(min=0).to(dtype) / stride


def _softmax_masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `mask`; a row with nothing
    visible (or an empty last dim) gives all zeros, never NaN."""
    if logits.shape[-1] == 0:
        return logits
    masked = logits.masked_fill(~mask, float("-inf"))
    m = masked.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(masked - m)
    den = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    if _term_sizes_on:
        return _TermSizeSoftmax.apply(logits, p.detach())
    return p


_term_sizes_on = False


class _TermSizeSoftmax(torch.autograd.Function):
    """The softmax's value with a backward that adds the sizes of its terms:
    d logits = p * (|g| + |sum(p * g)|) instead of p * (g - sum(p * g)).

    The true backward subtracts each row's mean, so a gradient reached through
    it can be exactly 0 (dq and dk at length 1, where one key is visible)
    while a kernel in fp16 leaves rounding noise the size of the terms that
    cancelled. Gradients computed with this backward are those terms' size:
    the scale an absolute error floor needs (see term_sizes)."""

    @staticmethod
    def forward(ctx, logits, p):
        ctx.save_for_backward(p)
        return p.clone()

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return p * (g.abs() + (p * g).sum(dim=-1, keepdim=True).abs()), None


@contextlib.contextmanager
def term_sizes():
    """Within this block, reference()'s gradients are the sizes of the terms
    the true gradients sum (softmax backward without its cancellation; the
    outputs are unchanged). Used for error floors, never for training."""
    global _term_sizes_on
    previous, _term_sizes_on = _term_sizes_on, True
    try:
        yield
    finally:
        _term_sizes_on = previous


def _attend(q5: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """q5 [B, N, HKV, G, D] against k [B, S, HKV, D], v [B, S, HKV, Dv].

    mask is boolean, broadcastable to [B, N, HKV, G, S]. Returns
    (o [B, N, HKV, G, Dv], p [B, N, HKV, G, S]).
    """
    logits = torch.einsum("bnkgd,bskd->bnkgs", q5, k) * scale
    p = _softmax_masked(logits, mask)
    o = torch.einsum("bnkgs,bskd->bnkgd", p, v)
    return o, p


def _positions(t0: int, t1: int, device) -> torch.Tensor:
    return torch.arange(t0, t1, device=device, dtype=torch.int64)


# --------------------------------------------------------------------------- per-chunk branch math
# Each helper handles the queries at positions t0 .. t1-1 (q5 holds exactly
# those rows) against the full key tensors; nothing here validates.


def _cmp_chunk(pattern, q5, k_cmp, v_cmp, t0, t1, scale):
    """(o [B,N,HKV,G,Dv] or None, p [B,N,HKV,G,Tc]) for queries t0..t1-1."""
    return compressed_at_positions(pattern, q5, k_cmp, v_cmp, _positions(t0, t1, q5.device)[None], scale)


def compressed_at_positions(pattern, q5, k_cmp, v_cmp, t, scale):
    """The compressed branch for rows at positions t [B or 1, N] (int64;
    each row its own, as a cached step's queries have): (o [B,N,HKV,G,Dv],
    or None without v_cmp, and p [B,N,HKV,G,Tc]). A row sees compressed
    token i iff its block ends at or before it (a row with none: zeros)."""
    c = pattern.compress
    i = torch.arange(k_cmp.shape[1], device=q5.device, dtype=torch.int64)
    visible = compressed_end(i, c.block, c.stride)[None, None, :] <= t[:, :, None]  # [B or 1, N, Tc]
    mask = visible[:, :, None, None, :]
    if v_cmp is None:
        logits = torch.einsum("bnkgd,bskd->bnkgs", q5, k_cmp) * scale
        return None, _softmax_masked(logits, mask)
    return _attend(q5, k_cmp, v_cmp, mask, scale)


def _scores_chunk(pattern, p_cmp, W, t0, t1):
    """S [B, N, HKV, NB] from p_cmp [B, N, HKV, G, Tc] (detached)."""
    s = torch.einsum("bnkgs,sj->bnkj", p_cmp.detach(), W.to(p_cmp.dtype))
    return _mask_invisible_blocks(pattern, s, t0, t1)


def _mask_invisible_blocks(pattern, s, t0, t1):
    NB = s.shape[-1]
    t = _positions(t0, t1, s.device).unsqueeze(1)
    j = torch.arange(NB, device=s.device, dtype=torch.int64).unsqueeze(0)
    invisible = j > t // pattern.select.block  # [N, NB]
    return s.masked_fill(invisible[None, :, None, :], float("-inf"))


def _select_chunk(pattern, S, t0):
    """Indices [B, N, HKV, top] (int32, ascending, -1 padded) from S for the
    queries at positions t0 .. t0 + N - 1."""
    return select_at_positions(pattern, S, _positions(t0, t0 + S.shape[1], S.device)[None])


def select_at_positions(pattern, S, t):
    """The selection rule (select_blocks) for rows at positions t [B or 1,
    N] (int64; each row its own position, as a cached prefill or decode
    step's queries have): indices [B, N, HKV, top] from S [B, N, HKV, NB]."""
    sel = pattern.select
    B, N, HKV, NB = S.shape
    device = S.device
    cur = (t // sel.block).unsqueeze(-1)  # [B or 1, N, 1]: block holding t
    j = torch.arange(NB, device=device, dtype=torch.int64).view(1, 1, NB)
    visible = j <= cur
    forced = visible & ((j < sel.initial) | (j > cur - sel.local))
    key = S.detach().to(torch.float64)
    key = key.masked_fill(forced[:, :, None, :], float("inf"))
    key = key.masked_fill(~visible[:, :, None, :], float("-inf"))
    # Stable descending sort: among equal keys the lower block index comes first.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    top = sel.top
    if NB < top:
        pad = torch.full((B, N, HKV, top - NB), NB, dtype=order.dtype, device=device)
        order = torch.cat([order, pad], dim=-1)
    order = order[..., :top]
    count = torch.clamp(cur + 1, max=top)  # [B or 1, N, 1] valid entries per row
    rank = torch.arange(top, device=device, dtype=torch.int64).view(1, 1, top)
    valid = (rank < count)[:, :, None, :]
    order = torch.where(valid, order, torch.full_like(order, NB))  # NB sorts last
    order = torch.sort(order, dim=-1).values
    order = torch.where(order == NB, torch.full_like(order, -1), order)
    return order.to(torch.int32)


def _static_scores(pattern, B, HKV, NB, t0, t1, dtype, device):
    """Scores for a select without compress (only legal when the forced
    blocks are the whole set): zero on visible blocks."""
    s = torch.zeros(B, t1 - t0, HKV, NB, dtype=dtype, device=device)
    return _mask_invisible_blocks(pattern, s, t0, t1)


def _block_mask(idx: torch.Tensor, NB: int) -> torch.Tensor:
    """[..., top] int (-1 padded, duplicates allowed) -> [..., NB] bool."""
    m = torch.zeros(*idx.shape[:-1], NB + 1, dtype=torch.bool, device=idx.device)
    slot = torch.where(idx < 0, torch.full_like(idx, NB), idx).to(torch.int64)
    m.scatter_(-1, slot, True)
    return m[..., :NB]


def _slc_chunk(pattern, q5, k, v, idx, t0, t1, scale):
    """o_slc [B, N, HKV, G, Dv]; idx [B, N, HKV, top]; keys cut at t1."""
    lb = pattern.select.block
    NB = num_blocks(t1, lb)
    idx = torch.where(idx >= NB, torch.full_like(idx, -1), idx)  # beyond t1: never visible
    blocks = _block_mask(idx, NB)  # [B, N, HKV, NB]
    pos_sel = blocks.repeat_interleave(lb, dim=-1)[..., :t1]  # [B, N, HKV, t1]
    t = _positions(t0, t1, q5.device).unsqueeze(1)
    p = torch.arange(t1, device=q5.device, dtype=torch.int64).unsqueeze(0)
    causal = (p <= t)[None, :, None, :]
    mask = (pos_sel & causal).unsqueeze(3)  # [B, N, HKV, 1, t1]
    o, _ = _attend(q5, k[:, :t1], v[:, :t1], mask, scale)
    return o


def _swa_chunk(pattern, q5, k, v, t0, t1, scale):
    """o_swa [B, N, HKV, G, Dv]; keys max(0, t0-w+1) .. t1-1."""
    w = pattern.window.size
    s0 = max(0, t0 - w + 1)
    t = _positions(t0, t1, q5.device).unsqueeze(1)
    p = _positions(s0, t1, q5.device).unsqueeze(0)
    mask = ((p <= t) & (p > t - w))[None, :, None, None, :]
    o, _ = _attend(q5, k[:, s0:t1], v[:, s0:t1], mask, scale)
    return o


# The same two branches by gathering only the keys a query may see: O(N x
# (top*l' + w)) work and memory instead of O(N x T). Exactly the same sets
# of keys and the same softmax; only the order of float additions differs.
# For training on machines without the kernels (reference(..., gather=True)).


def _gather_keys(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, T, HKV, D] at positions pos [B or 1, N, HKV, S] (clamped in
    range) -> [B, N, HKV, S, D]."""
    B, T, HKV, _ = x.shape
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    h = torch.arange(HKV, device=x.device).view(1, 1, HKV, 1)
    return x[b, pos.clamp(0, max(T - 1, 0)), h]


def _attend_gathered(q5, k_g, v_g, mask, scale):
    """q5 [B, N, HKV, G, D] against gathered k_g [B, N, HKV, S, D]; mask
    [B or 1, N, HKV, S] bool -> o [B, N, HKV, G, Dv]."""
    logits = torch.einsum("bnkgd,bnksd->bnkgs", q5, k_g) * scale
    p = _softmax_masked(logits, mask.unsqueeze(3))
    return torch.einsum("bnkgs,bnksd->bnkgd", p, v_g)


def first_occurrence(idx: torch.Tensor) -> torch.Tensor:
    """[..., top] -> bool, False for a block id already listed earlier in
    its row (selection is a set: a repeated block counts once)."""
    ordered, order = idx.sort(dim=-1, stable=True)
    repeat = torch.zeros_like(idx, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    return ~torch.zeros_like(repeat).scatter(-1, order, repeat)


def _slc_chunk_gather(pattern, q5, k, v, idx, t0, t1, scale):
    """_slc_chunk's result from the selected blocks' keys only."""
    lb = pattern.select.block
    B, N, HKV, top = idx.shape
    offs = torch.arange(lb, device=q5.device, dtype=torch.int64)
    pos = (idx.unsqueeze(-1) * lb + offs).reshape(B, N, HKV, top * lb)  # [B, N, HKV, S]
    t = _positions(t0, t1, q5.device).view(1, N, 1, 1)
    ok = ((idx >= 0) & first_occurrence(idx)).repeat_interleave(lb, dim=-1)
    mask = ok & (pos <= t) & (pos < t1)
    return _attend_gathered(q5, _gather_keys(k, pos), _gather_keys(v, pos), mask, scale)


def _swa_chunk_gather(pattern, q5, k, v, t0, t1, scale):
    """_swa_chunk's result from the last w positions' keys only."""
    w = pattern.window.size
    B, N, HKV = q5.shape[:3]
    t = _positions(t0, t1, q5.device).view(1, N, 1, 1)
    pos = (t - w + 1 + torch.arange(w, device=q5.device, dtype=torch.int64)).expand(1, N, HKV, w)
    mask = pos >= 0
    return _attend_gathered(q5, _gather_keys(k, pos), _gather_keys(v, pos), mask, scale)


# --------------------------------------------------------------------------- public pieces


def _as_q5(pattern, q):
    B, T, HQ, D = q.shape
    return q.reshape(B, T, pattern.heads.kv, HQ // pattern.heads.kv, D)


def _from5(x5):
    B, N, HKV, G, D = x5.shape
    return x5.reshape(B, N, HKV * G, D)


def _check_qkv(pattern, q, k=None, v=None, kname="k", vname="v"):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        got = _shape_str(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(
            f"q: expected shape [B, T, HQ, Dqk] with HQ={pattern.heads.q}, Dqk={pattern.dims.qk}, got {got}"
        )
    B, T = q.shape[:2]
    HQ, HKV, Dqk, Dv = pattern.heads.q, pattern.heads.kv, pattern.dims.qk, pattern.dims.v
    _check_shape("q", q, ("B", "T", "HQ", "Dqk"), (B, T, HQ, Dqk))
    _compute_dtype(q.dtype)
    if k is not None:
        _check_shape(kname, k, ("B", "T", "HKV", "Dqk"), (B, T, HKV, Dqk))
        _check_like(kname, k, q)
    if v is not None:
        _check_shape(vname, v, ("B", "T", "HKV", "Dv"), (B, T, HKV, Dv))
        _check_like(vname, v, q)
    return B, T


def _check_cmp_tensors(pattern, q, k_cmp, v_cmp, T):
    B = q.shape[0]
    HKV, Dqk, Dv = pattern.heads.kv, pattern.dims.qk, pattern.dims.v
    Tc = num_compressed(T, pattern.compress.block, pattern.compress.stride)
    if k_cmp is not None:
        _check_shape("k_cmp", k_cmp, ("B", "Tc", "HKV", "Dqk"), (B, Tc, HKV, Dqk))
        _check_like("k_cmp", k_cmp, q)
    if v_cmp is not None:
        _check_shape("v_cmp", v_cmp, ("B", "Tc", "HKV", "Dv"), (B, Tc, HKV, Dv))
        _check_like("v_cmp", v_cmp, q)


def _check_indices(pattern, indices, B, T):
    HKV, top = pattern.heads.kv, pattern.select.top
    _check_shape("indices", indices, ("B", "T", "HKV", "top"), (B, T, HKV, top))
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        raise ValueError(f"indices: expected an integer dtype, got {indices.dtype}")
    NB = num_blocks(T, pattern.select.block)
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= NB:
            raise ValueError(
                f"indices: expected block ids in [-1, {NB - 1}] (NB = ceil(T/{pattern.select.block}) = {NB},"
                f" -1 = padding), got values in [{lo}, {hi}]"
            )


def compressed_attention(pattern: Pattern, q, k_cmp, v_cmp=None, scale=None):
    """The compressed branch. q [B,T,HQ,Dqk], k_cmp [B,Tc,HKV,Dqk],
    v_cmp [B,Tc,HKV,Dv] or None.

    Returns (o_cmp [B,T,HQ,Dv] in q's dtype, or None without v_cmp;
    p_cmp [B,T,HQ,Tc] in the computation dtype). Query t sees token i iff
    i*d + l - 1 <= t; queries that see none get o_cmp = 0 and p_cmp = 0.
    """
    _check_pattern(pattern)
    if pattern.compress is None:
        raise ValueError("compressed_attention: the pattern has no compress branch")
    B, T = _check_qkv(pattern, q)
    _check_cmp_tensors(pattern, q, k_cmp, v_cmp, T)
    cd = _compute_dtype(q.dtype)
    scale = _default_scale(pattern, scale)
    o5, p5 = _cmp_chunk(
        pattern, _as_q5(pattern, q.to(cd)), k_cmp.to(cd), None if v_cmp is None else v_cmp.to(cd), 0, T, scale
    )
    o = None if o5 is None else _from5(o5).to(q.dtype)
    return o, _from5(p5)


def block_scores(pattern: Pattern, q, k_cmp, scale=None) -> torch.Tensor:
    """Block importance S [B, T, HKV, NB] (computation dtype, no gradient).

    S[t, kv, j] = sum over the G heads h of group kv of
    sum_i p_cmp[t,h,i] * W[i,j] (see overlap_weights); blocks j > t // l'
    are -inf. NB = ceil(T / l').
    """
    _check_pattern(pattern)
    if pattern.compress is None or pattern.select is None:
        raise ValueError("block_scores: the pattern needs both a compress and a select branch")
    B, T = _check_qkv(pattern, q)
    _check_cmp_tensors(pattern, q, k_cmp, None, T)
    cd = _compute_dtype(q.dtype)
    scale = _default_scale(pattern, scale)
    c, s = pattern.compress, pattern.select
    with torch.no_grad():
        W = overlap_weights(c.block, c.stride, s.block, k_cmp.shape[1], num_blocks(T, s.block), dtype=cd, device=q.device)
        _, p5 = _cmp_chunk(pattern, _as_q5(pattern, q.detach().to(cd)), k_cmp.detach().to(cd), None, 0, T, scale)
        return _scores_chunk(pattern, p5, W, 0, T)


def select_blocks(pattern: Pattern, S: torch.Tensor, T: Optional[int] = None, *, query_offset: int = 0) -> torch.Tensor:
    """The selection rule applied to scores S [B, Tq, HKV, NB], whose rows are
    the queries at positions query_offset .. query_offset + Tq - 1 of a
    length-T sequence (T defaults to query_offset + Tq; NB must be ceil(T/l')).

    Row (t, kv) holds the forced blocks (0..initial-1 and the `local` blocks
    ending at the one holding t, only those <= t // l') plus the visible
    blocks of highest S, min(top, t // l' + 1) in all; among equal scores the
    lower block index wins. Returns int32 [B, Tq, HKV, top], each row sorted
    ascending with -1 padding at the end. S values of invisible blocks are
    ignored; no gradient.
    """
    _check_pattern(pattern)
    if pattern.select is None:
        raise ValueError("select_blocks: the pattern has no select branch")
    if not isinstance(S, torch.Tensor) or S.dim() != 4:
        got = _shape_str(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__
        raise ValueError(f"S: expected shape [B, Tq, HKV, NB], got {got}")
    B, Tq, HKV, NB = S.shape
    if T is None:
        T = query_offset + Tq
    if query_offset < 0 or query_offset + Tq > T:
        raise ValueError(f"select_blocks: rows {query_offset}..{query_offset + Tq - 1} do not fit in T={T}")
    _check_shape("S", S, ("B", "Tq", "HKV", "NB"), (B, Tq, pattern.heads.kv, num_blocks(T, pattern.select.block)))
    with torch.no_grad():
        return _select_chunk(pattern, S, query_offset)


def selection_attention(pattern: Pattern, q, k, v, indices, scale=None) -> torch.Tensor:
    """The selection branch given block ids: o_slc [B, T, HQ, Dv], the softmax
    of q[t, h] over positions p <= t inside the blocks of indices[t, h // G]
    (a set: -1 ignored, duplicates once). Empty rows give 0."""
    _check_pattern(pattern)
    if pattern.select is None:
        raise ValueError("selection_attention: the pattern has no select branch")
    B, T = _check_qkv(pattern, q, k, v)
    _check_indices(pattern, indices, B, T)
    cd = _compute_dtype(q.dtype)
    o5 = _slc_chunk(
        pattern, _as_q5(pattern, q.to(cd)), k.to(cd), v.to(cd), indices.to(torch.int64), 0, T, _default_scale(pattern, scale)
    )
    return _from5(o5).to(q.dtype)


def window_attention(pattern: Pattern, q, k, v, scale=None) -> torch.Tensor:
    """The window branch: o_swa [B, T, HQ, Dv], softmax of q[t, h] over
    positions max(0, t - w + 1) .. t (keys of head h // G)."""
    _check_pattern(pattern)
    if pattern.window is None:
        raise ValueError("window_attention: the pattern has no window branch")
    B, T = _check_qkv(pattern, q, k, v)
    cd = _compute_dtype(q.dtype)
    o5 = _swa_chunk(pattern, _as_q5(pattern, q.to(cd)), k.to(cd), v.to(cd), 0, T, _default_scale(pattern, scale))
    return _from5(o5).to(q.dtype)


# --------------------------------------------------------------------------- the whole thing


_GATES = (("g_cmp", Branch.CMP), ("g_slc", Branch.SLC), ("g_swa", Branch.SWA))


def _prepare(pattern, q, k, v, k_cmp, v_cmp, k_swa, v_swa, indices, query_chunk):
    """Validate everything; return the computation-dtype tensors."""
    _check_pattern(pattern)
    B, T = _check_qkv(pattern, q, k, v)
    if not pattern.combined_branches:
        raise ValueError(f"pattern {pattern.name!r} combines no branch")

    if pattern.compress is None:
        for name, x in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
            if x is not None:
                raise ValueError(f"{name}: given, but the pattern has no compress branch")
    elif pattern.compress.pool == Pool.MEAN:
        for name, x in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
            if x is not None:
                raise ValueError(
                    f"{name}: must not be given when the pattern pools by mean: compressed tokens are "
                    f"computed from k, v (pass them only with pool=mlp)"
                )
    else:  # mlp
        c = pattern.compress
        Tc = num_compressed(T, c.block, c.stride)
        for name, x, dim, dn in (("k_cmp", k_cmp, pattern.dims.qk, "Dqk"), ("v_cmp", v_cmp, pattern.dims.v, "Dv")):
            if x is None:
                raise ValueError(
                    f"{name}: required when the pattern pools by mlp; expected shape [B, Tc, HKV, {dn}] = "
                    f"{_shape_str((B, Tc, pattern.heads.kv, dim))} with Tc = max(0, (T - {c.block}) // {c.stride} + 1)"
                )
        _check_cmp_tensors(pattern, q, k_cmp, v_cmp, T)

    if pattern.window is None:
        for name, x in (("k_swa", k_swa), ("v_swa", v_swa)):
            if x is not None:
                raise ValueError(f"{name}: given, but the pattern has no window branch")
    else:
        _check_qkv(pattern, q, k_swa, v_swa, kname="k_swa", vname="v_swa")

    if indices is not None:
        if pattern.select is None:
            raise ValueError("indices: given, but the pattern has no select branch")
        _check_indices(pattern, indices, B, T)
    elif pattern.select is not None and pattern.compress is None and not pattern.select.is_static:
        raise ValueError(
            "pattern: select ranks blocks by the compress branch, which the pattern lacks "
            "(give indices, or make top == initial + local)"
        )

    if query_chunk is not None and (isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk <= 0):
        raise ValueError(f"query_chunk: expected a positive int or None, got {query_chunk!r}")

    cd = _compute_dtype(q.dtype)
    t = {"q": q.to(cd), "k": k.to(cd), "v": v.to(cd)}
    if pattern.compress is not None:
        if pattern.compress.pool == Pool.MEAN:
            t["k_cmp"] = compress_mean(t["k"], pattern.compress.block, pattern.compress.stride)
            t["v_cmp"] = compress_mean(t["v"], pattern.compress.block, pattern.compress.stride)
        else:
            t["k_cmp"], t["v_cmp"] = k_cmp.to(cd), v_cmp.to(cd)
    if pattern.window is not None:
        t["k_swa"] = t["k"] if k_swa is None else k_swa.to(cd)
        t["v_swa"] = t["v"] if v_swa is None else v_swa.to(cd)
    return B, T, cd, t


def _run(pattern, t, B, T, cd, indices, scale, query_chunk, branches, want_indices, gather=False):
    """Per-branch ungated outputs [B, T, HQ, Dv] (computation dtype) for
    `branches`, and the indices used (or None), computed chunk by chunk."""
    need_idx = Branch.SLC in branches or want_indices
    N = T if query_chunk is None else query_chunk
    outs: Dict[Branch, list] = {b: [] for b in branches}
    idx_chunks = []
    W = None
    if need_idx and indices is None and pattern.compress is not None:
        c, s = pattern.compress, pattern.select
        W = overlap_weights(c.block, c.stride, s.block, t["k_cmp"].shape[1], num_blocks(T, s.block), dtype=cd, device=t["q"].device)
    q5_all = _as_q5(pattern, t["q"])
    for t0 in range(0, T, max(N, 1)):
        t1 = min(T, t0 + N)
        q5 = q5_all[:, t0:t1]
        p_cmp = None
        if Branch.CMP in branches:
            o5, p_cmp = _cmp_chunk(pattern, q5, t["k_cmp"], t["v_cmp"], t0, t1, scale)
            outs[Branch.CMP].append(o5)
        if need_idx:
            if indices is not None:
                idx = indices[:, t0:t1].to(torch.int64)
            else:
                with torch.no_grad():
                    if pattern.compress is not None:
                        if p_cmp is None:
                            _, p_cmp = _cmp_chunk(pattern, q5.detach(), t["k_cmp"].detach(), None, t0, t1, scale)
                        S = _scores_chunk(pattern, p_cmp, W, t0, t1)
                    else:
                        S = _static_scores(pattern, B, pattern.heads.kv, num_blocks(T, pattern.select.block), t0, t1, cd, q5.device)
                    idx = _select_chunk(pattern, S, t0).to(torch.int64)
            idx_chunks.append(idx)
            if Branch.SLC in branches:
                slc = _slc_chunk_gather if gather else _slc_chunk
                outs[Branch.SLC].append(slc(pattern, q5, t["k"], t["v"], idx, t0, t1, scale))
        if Branch.SWA in branches:
            swa = _swa_chunk_gather if gather else _swa_chunk
            outs[Branch.SWA].append(swa(pattern, q5, t["k_swa"], t["v_swa"], t0, t1, scale))

    result = {}
    for b in branches:
        if T == 0:
            result[b] = t["q"].new_zeros(B, 0, pattern.heads.q, pattern.dims.v)
        else:
            result[b] = _from5(torch.cat(outs[b], dim=1))
    idx_out = None
    if want_indices:
        if indices is not None:
            idx_out = indices.to(torch.int32)
        elif T == 0:
            idx_out = torch.empty(B, 0, pattern.heads.kv, pattern.select.top, dtype=torch.int32, device=t["q"].device)
        else:
            idx_out = torch.cat(idx_chunks, dim=1).to(torch.int32)
    return result, idx_out


def reference_branches(
    pattern: Pattern,
    q,
    k,
    v,
    *,
    k_cmp=None,
    v_cmp=None,
    k_swa=None,
    v_swa=None,
    indices=None,
    scale=None,
    query_chunk=None,
    return_indices=False,
    gather=False,
):
    """Ungated per-branch outputs {Branch.CMP: o_cmp, Branch.SLC: o_slc,
    Branch.SWA: o_swa} for every branch the pattern declares (combined or
    not), each [B, T, HQ, Dv] in q's dtype. With return_indices=True,
    (dict, indices) (None when the pattern has no select branch)."""
    B, T, cd, t = _prepare(pattern, q, k, v, k_cmp, v_cmp, k_swa, v_swa, indices, query_chunk)
    scale = _default_scale(pattern, scale)
    want = return_indices and pattern.select is not None
    outs, idx = _run(pattern, t, B, T, cd, indices, scale, query_chunk, pattern.declared_branches, want, gather)
    outs = {b: o.to(q.dtype) for b, o in outs.items()}
    return (outs, idx) if return_indices else outs


def reference(
    pattern: Pattern,
    q,
    k,
    v,
    g_cmp=None,
    g_slc=None,
    g_swa=None,
    *,
    k_cmp=None,
    v_cmp=None,
    k_swa=None,
    v_swa=None,
    indices=None,
    scale=None,
    return_indices=False,
    query_chunk=None,
    gather=False,
    cu_seqlens=None,
    max_seqlen=None,
):
    """NSA attention, densely: o [B, T, HQ, Dv] in q's dtype,
    o = sum over pattern.combined_branches of g_b * o_b (a missing gate is 1).

    gather=True computes the selection and window branches from only the
    keys each query may see (gathered), not masked T x T products: the same
    function, far less work and memory at long T (for training without the
    kernels; the dense form stays the oracle the tests trust).

    With return_indices=True returns (o, indices): int32 [B, T, HKV, top],
    rows ascending with -1 padding at the end (given indices come back
    unchanged). Raises ValueError for return_indices without a select branch.
    With cu_seqlens (packed sequences, varlen.py's convention) q, k, v,
    the gates, k_swa/v_swa and indices are [total, ...] or [1, total, ...],
    k_cmp/v_cmp [total_c, ...] packed by varlen.compressed_seqlens (rows
    past total_c are ignored); each
    sequence is computed alone, as its own [1, T_s] batch; max_seqlen is
    accepted for the compiled call's signature and not needed here.

    See the module docstring for every convention.
    """
    if cu_seqlens is not None:
        return _packed_reference(pattern, q, k, v, (g_cmp, g_slc, g_swa), cu_seqlens, max_seqlen,
                                 dict(k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa, indices=indices,
                                      scale=scale, return_indices=return_indices, query_chunk=query_chunk,
                                      gather=gather))
    B, T, cd, t = _prepare(pattern, q, k, v, k_cmp, v_cmp, k_swa, v_swa, indices, query_chunk)
    gates = {"g_cmp": g_cmp, "g_slc": g_slc, "g_swa": g_swa}
    combined = pattern.combined_branches
    for name, branch in _GATES:
        g = gates[name]
        if g is None:
            continue
        if branch not in combined:  # the same refusal as the compiled call's (validate.py)
            raise ValueError(f"{name}: pattern {pattern.name!r} does not combine the {branch.value} branch"
                             f" (combined: {', '.join(b.value for b in combined)}); pass no {name}")
        _check_shape(name, g, ("B", "T", "HQ"), (B, T, pattern.heads.q))
        if not g.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating dtype, got {g.dtype}")
    if return_indices and pattern.select is None:
        raise ValueError("return_indices: the pattern has no select branch, so there are no indices")
    scale = _default_scale(pattern, scale)
    outs, idx = _run(pattern, t, B, T, cd, indices, scale, query_chunk, combined, return_indices, bool(gather))
    o = None
    for name, branch in _GATES:
        if branch not in combined:
            continue
        ob = outs[branch]
        g = gates[name]
        if g is not None:
            ob = ob * g.to(cd).unsqueeze(-1)
        o = ob if o is None else o + ob
    o = o.to(q.dtype)
    return (o, idx) if return_indices else o


def _packed_reference(pattern, q, k, v, gates, cu_seqlens, max_seqlen, kwargs):
    """reference() of packed sequences: each sequence alone through the
    fixed-length reference, the results packed back in q's layout."""
    q3, leading = varlen.unpack_layout("q", q, 3)
    varlen.check_cu_seqlens(cu_seqlens, q3.shape[0], q3.device)
    varlen.max_length(cu_seqlens, max_seqlen)  # type-checks max_seqlen
    token_args = {"k": k, "v": v, "g_cmp": gates[0], "g_slc": gates[1], "g_swa": gates[2],
                  "k_swa": kwargs.pop("k_swa"), "v_swa": kwargs.pop("v_swa"), "indices": kwargs.pop("indices")}
    ranks = {"g_cmp": 2, "g_slc": 2, "g_swa": 2}
    packed = {}
    for name, x in token_args.items():
        x, _ = varlen.unpack_layout(name, x, ranks.get(name, 3))
        if x is not None and x.shape[0] != q3.shape[0]:
            raise ValueError(f"{name}: {x.shape[0]} packed positions, q has {q3.shape[0]}")
        packed[name] = x
    cmp_args = {name: varlen.unpack_layout(name, kwargs.pop(name), 3)[0] for name in ("k_cmp", "v_cmp")}
    cmp_bounds = None
    if any(x is not None for x in cmp_args.values()):
        cu_c = varlen.compressed_seqlens(pattern, cu_seqlens)
        for name, x in cmp_args.items():
            # rows past the sequences' tokens are padding (a buffer of
            # varlen.compressed_bound rows), as the compiled call takes them
            if x is not None and x.shape[0] < int(cu_c[-1]):
                raise ValueError(f"{name}: {x.shape[0]} packed compressed tokens; the sequences of cu_seqlens have"
                                 f" {int(cu_c[-1])} (nsa_dsl.compressed_seqlens)")
        cmp_bounds = varlen.sequence_bounds(cu_c)
    want_indices = kwargs["return_indices"]
    if want_indices and pattern.select is None:
        raise ValueError("return_indices: the pattern has no select branch, so there are no indices")
    outs, idx = [], []
    for s, (a, b) in enumerate(varlen.sequence_bounds(cu_seqlens)):
        if a == b:
            continue  # an empty sequence: nothing to compute
        one = {name: None if x is None else x[a:b].unsqueeze(0) for name, x in packed.items()}
        if cmp_bounds is not None:
            ca, cb = cmp_bounds[s]
            one.update({name: None if x is None else x[ca:cb].unsqueeze(0) for name, x in cmp_args.items()})
        r = reference(pattern, q3[a:b].unsqueeze(0), one.pop("k"), one.pop("v"), one.pop("g_cmp"),
                      one.pop("g_slc"), one.pop("g_swa"), **one, **kwargs)
        o, i = r if want_indices else (r, None)
        outs.append(o[0])
        if i is not None:
            idx.append(i[0])
    o = torch.cat(outs) if outs else q3.new_empty(0, pattern.heads.q, pattern.dims.v)
    if leading:
        o = o.unsqueeze(0)
    if not want_indices:
        return o
    i = (torch.cat(idx) if idx else
         torch.empty(0, pattern.heads.kv, pattern.select.top, dtype=torch.int32, device=q3.device))
    return o, (i.unsqueeze(0) if leading else i)
