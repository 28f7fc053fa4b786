"""Launch of the decode step's kernels (dec_attend, dec_reduce: the plan's
_decode_kernels): one new query per sequence, read against the cache of
its slot, the selected blocks given (scored before), the compressed
branch's output given in float32. No host synchronisation, fixed shapes:
a step can be captured in a CUDA graph."""
from __future__ import annotations

from typing import Optional

import torch

from .geometry import num_blocks
from .ir import Branch
from .launch import _strides
from .plan import next_pow2


def decode_attend(compiled, cache, rows: torch.Tensor, q: torch.Tensor, indices: Optional[torch.Tensor],
                  gates: dict, o_cmp: Optional[torch.Tensor], scale_log2: float) -> torch.Tensor:
    """o [b, 1, HQ, Dv] in q's dtype: the gated sum of the selected and
    window attention of q [b, 1, HQ, Dqk] (the queries at each slot's last
    cached position, rows the slots as int64) and g_cmp * o_cmp (o_cmp
    [b, 1, HQ, Dv] float32, or None without a combined compress branch);
    indices [b, 1, HKV, top] ascending, -1 padded."""
    p, kp = compiled.pattern, compiled.plan.kernel("dec_attend")
    b = q.shape[0]
    HQ, HKV, DV = p.heads.q, p.heads.kv, p.dims.v
    dev = q.device
    items, rows_pad = kp.const("DEC_ITEMS"), kp.const("DEC_ROWS")
    part_m = torch.empty(b * HKV * items * rows_pad, device=dev, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(b * HKV * items * rows_pad, compiled.plan.v_pad, device=dev, dtype=torch.float32)
    q3 = q[:, 0]
    idx = indices[:, 0] if indices is not None else rows.new_zeros(1, 1, 1, dtype=torch.int32)
    kw = cache.k_swa if cache.k_swa is not None else cache.k
    vw = cache.v_swa if cache.v_swa is not None else cache.v
    slots = rows.to(torch.int32)
    compiled.module.dec_attend[(b * HKV, items)](
        q3, cache.k, cache.v, kw, vw, idx, slots, cache.lengths, part_m, part_l, part_acc, scale_log2,
        *_strides(q3), *_strides(cache.k), *_strides(cache.v), *_strides(kw), *_strides(vw), *_strides(idx),
        num_warps=kp.num_warps, num_stages=kp.num_stages)
    o = torch.empty(b, HQ, DV, device=dev, dtype=q.dtype)
    cmp = o_cmp.reshape(b, HQ, DV).contiguous() if o_cmp is not None else part_m
    gate = {br: gates.get(br) for br in (Branch.CMP, Branch.SLC, Branch.SWA)}
    ptrs = [g.reshape(b, HQ).contiguous() if g is not None else part_m for g in gate.values()]
    compiled.module.dec_reduce[(b * HKV,)](
        part_m, part_l, part_acc, cmp, *ptrs, o,
        HAS_G_CMP=gate[Branch.CMP] is not None, HAS_G_SLC=gate[Branch.SLC] is not None,
        HAS_G_SWA=gate[Branch.SWA] is not None, num_warps=kp.num_warps, num_stages=1)
    return o[:, None]


def decode_scores(compiled, cache, rows: torch.Tensor, q: torch.Tensor, scale_log2: float) -> tuple:
    """(o_cmp [b, 1, HQ, Dv] float32, indices [b, 1, HKV, top] int32 or
    None without a ranked selection) of one decode step: dec_cmp over
    splits of the compressed tokens, then dec_cmp_select (the branch's
    output, the block scores and the top-n). Shapes from the cache's
    allocation: no host synchronisation."""
    p, kp = compiled.pattern, compiled.plan.kernel("dec_attend")
    b = q.shape[0]
    HQ, HKV, DV = p.heads.q, p.heads.kv, p.dims.v
    dev = q.device
    rows_pad, split = kp.const("DEC_ROWS"), kp.const("DEC_CMP_TOKENS")
    max_c = cache.max_compressed
    n_splits = max(1, -(-max_c // split))
    scores = torch.empty(max(1, b * HKV * rows_pad * max_c), device=dev, dtype=torch.float32)
    part_m = torch.empty(b * HKV * n_splits * rows_pad, device=dev, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(b * HKV * n_splits * rows_pad, compiled.plan.v_pad, device=dev, dtype=torch.float32)
    q3 = q[:, 0]
    slots = rows.to(torch.int32)
    kc, vc = cache.k_cmp, cache.v_cmp
    compiled.module.dec_cmp[(b * HKV, n_splits)](
        q3, kc, vc, slots, cache.lengths, scores, part_m, part_l, part_acc, scale_log2, max_c,
        *_strides(q3), *_strides(kc), *_strides(vc), num_warps=kp.num_warps, num_stages=kp.num_stages)
    o_cmp = torch.empty(b, HQ, DV, device=dev, dtype=torch.float32)
    ranked = kp.const("DEC_SCORES")
    idx = torch.empty(b, HKV, p.select.top if ranked else 1, device=dev, dtype=torch.int32)
    nb_pad = next_pow2(num_blocks(cache.max_len, p.select.block)) if ranked else 1
    compiled.module.dec_cmp_select[(b * HKV,)](
        scores, part_m, part_l, part_acc, slots, cache.lengths, o_cmp, idx, max_c, n_splits, *_strides(idx),
        NB_PAD=nb_pad, num_warps=kp.num_warps, num_stages=1)
    return o_cmp[:, None], (idx[:, None] if ranked else None)
