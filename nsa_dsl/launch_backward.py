"""The backward launchers, one per kernel family: bwd_prep (the gates'
gradients and each branch's delta), the flash-style branches (cmp_bwd,
swa_bwd: dQ, then dK/dV), the pooling's backward (cmp_pool_bwd) and the
selection's (slc_bwd: dQ, then dK/dV through the inverted index or float32
atomics).

Each takes the CompiledPattern as `compiled` (its plan and kernel module)
and the tensors as named arguments; dK and dV accumulate into the float32
buffers it is given, dQ as a DqSum says. CompiledPattern.backward allocates them and decides
which run, in which order."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .geometry import num_blocks
from .inverted_index import block_to_positions, chunk_table, packed_block_to_positions
from .launch import (LOG2E, _cdiv, _gate_args, _kv_operands, _launch_fitting, _strides, index_keys,
                     packed_operands)


@dataclass
class DqSum:
    """Where one branch's dq kernel puts its dQ share: `total`, the float32
    sum the branches' kernels build one after another (the first stores
    into it, the others add), and `out`, the gradient in q's dtype that the
    last stores the finished sum into (the same tensor as total for float32
    inputs or a single branch). The kernels' DQ_FIRST, DQ_LAST (_add_dq).
    The launcher lets go of both once its dq kernel is launched (release):
    the caller's own reference to this object lasts the whole call, and the
    last kernel's sum must not sit on top of the dK/dV buffers allocated
    after it (peak memory, NOTES v28)."""
    total: torch.Tensor
    out: torch.Tensor
    first: bool
    last: bool

    def args(self) -> tuple:
        return self.total, self.out

    def flags(self) -> dict:
        return {"DQ_FIRST": self.first, "DQ_LAST": self.last}

    def release(self) -> None:
        self.total = self.out = None


class DqChain:
    """The branches' dq kernels in the order they run, each handed its
    DqSum by `for_branch`: the first allocates the float32 sum (in q's
    dtype for float32 inputs or a single kernel), the last the gradient in
    q's dtype, allocated only then (the sum and the gradient side by side
    for as short a time as can be: peak memory, NOTES v28). `gradient` is
    that tensor once the last has been handed out. alloc(shape, dtype,
    device) makes the buffers (the pattern's, poisoned under test)."""

    def __init__(self, order: list, shape: tuple, dtype: torch.dtype, device, alloc):
        self.order, self.shape, self.dtype, self.device, self.alloc = order, shape, dtype, device, alloc
        self.total = self.gradient = None

    def for_branch(self, branch) -> "DqSum | None":
        if branch not in self.order:
            return None
        first, last = branch == self.order[0], branch == self.order[-1]
        if first:
            in_q_dtype = self.dtype == torch.float32 or last
            self.total = self.alloc(self.shape, self.dtype if in_q_dtype else torch.float32, self.device)
        if not last:
            return DqSum(self.total, self.total, first=first, last=False)
        total, self.total = self.total, None
        self.gradient = total if total.dtype == self.dtype else self.alloc(self.shape, self.dtype, self.device)
        return DqSum(total, self.gradient, first=first, last=True)


def prepare(compiled, *, do, outs: list, gates: dict, dg, delta, shapes) -> None:
    """bwd_prep: the gates' gradients into dg [3, rows] and each combined
    branch's delta (rowsum(dO_branch * O_branch)) into delta [3, B, HQ, T];
    outs: the saved cmp, slc and swa outputs (None where not combined)."""
    kp = compiled.plan.kernel("bwd_prep")
    T = shapes.length
    n_rows = shapes.batch * T * compiled.pattern.heads.q
    gate_ptrs, has_gates = _gate_args(gates, do)
    compiled.module.bwd_prep[(_cdiv(n_rows, kp.const("COMBINE_ROWS")),)](
        do, *[o if o is not None else do for o in outs], *gate_ptrs,
        dg, delta, n_rows, T, **has_gates, num_warps=kp.num_warps, num_stages=kp.num_stages)


def flash_backward(compiled, *, branch: str, q, keys, values, do, gate, lse, delta, dq, dk, dv, n_keys: int, shapes,
                   scale: float, dkdv: bool = True) -> None:
    """{branch}_bwd_dq, then {branch}_bwd_dkdv (branch "cmp" or "swa"):
    dQ as dq (a DqSum) says (None: another kernel computes this branch's,
    compressed_and_window_dq), dK and dV of keys and values (n_keys of them)
    stored into dk and dv, which no kernel may have written before (the
    other branches add theirs after; not dkdv: no dK/dV launch). With
    {CMP,SWA}_BWD_SPLIT_HEADS the dK/dV kernel stores each query head's
    share, summed over its group into dk, dv here. Packed sequences: the grids
    run over the sequences (rows up to the longest, keys up to its count),
    each program in its own (the kernels' VARLEN)."""
    plan, m, p = compiled.plan, compiled.module, compiled.pattern
    B, T = shapes.batch, shapes.length
    HQ, HKV, DQK, DV = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v
    dev = q.device
    f32 = torch.float32
    qk_scale_log2 = scale * LOG2E
    kp = plan.kernel(f"{branch}_bwd")
    prefix = branch.upper()
    bm = kp.const(f"{prefix}_BWD_BLOCK_M")
    split = kp.const(f"{prefix}_BWD_SPLIT_HEADS")
    common = (T, n_keys, qk_scale_log2, scale, *_strides(q), *_strides(keys), *_strides(values),
              *_strides(do))
    g_arg = gate if gate is not None else do
    packed = packed_operands(shapes, dev, f"{branch}_bwd")
    if dq is not None:  # pipelined on its own stages, fewer where they do not fit (float32)
        _launch_fitting(compiled, f"{branch}_bwd_dq", (shapes.query_tiles(bm), shapes.grid_batch * HQ),
                        (q, keys, values, do, g_arg, lse, delta, *dq.args(), *common), dtype=q.dtype,
                        num_warps=kp.num_warps, num_stages=kp.const(f"{prefix}_BWD_DQ_STAGES"),
                        HAS_GATE=gate is not None, **packed, **dq.flags())
        dq.release()
    if n_keys == 0 or not dkdv:
        return
    if split:  # per-query-head shares, each stored by its program, summed over each group here
        # (packed: keys past the sequences' own, as k_cmp sized by a bound has, are no program's: zero)
        dk_part = compiled.alloc((B, n_keys, HQ, DQK), f32, dev, zeroed=shapes.packing is not None)
        dv_part = compiled.alloc((B, n_keys, HQ, DV), f32, dev, zeroed=shapes.packing is not None)
    else:
        dk_part, dv_part = dk, dv
    dkdv_bn = kp.const(f"{prefix}_BWD_DKDV_BLOCK_N")
    grid_keys = (n_keys if shapes.packing is None
                 else shapes.grid_compressed if branch == "cmp" else shapes.grid_length)
    if grid_keys == 0:
        return
    getattr(m, f"{branch}_bwd_dkdv")[(_cdiv(grid_keys, dkdv_bn), shapes.grid_batch * (HQ if split else HKV))](
        q, keys, values, do, g_arg, lse, delta, dk_part, dv_part, *common,
        HAS_GATE=gate is not None, **packed, num_warps=kp.warps_for(f"{branch}_bwd_dkdv"),
        num_stages=kp.num_stages)
    if split:
        G = p.group
        torch.sum(dk_part.view(B, n_keys, HKV, G, DQK), 3, out=dk)
        torch.sum(dv_part.view(B, n_keys, HKV, G, DV), 3, out=dv)


def compressed_and_window_dq(compiled, *, q, k_cmp, v_cmp, k_swa, v_swa, do, g_cmp, g_swa, lse_cmp, lse_swa,
                             delta_cmp, delta_swa, dq: DqSum, shapes, scale: float) -> None:
    """cmp_swa_bwd_dq (the plan's dq_with_compressed): both branches' dQ in
    one launch, on the window's row tile, warps and dq stages; their dK/dV
    kernels run as flash_backward launches them (with dq=None)."""
    kp = compiled.plan.kernel("swa_bwd")
    g_arg = {"cmp": g_cmp if g_cmp is not None else do, "swa": g_swa if g_swa is not None else do}
    packed = packed_operands(shapes, q.device, "swa_bwd")
    _launch_fitting(compiled, "cmp_swa_bwd_dq",
                    (shapes.query_tiles(kp.const("SWA_BWD_BLOCK_M")), shapes.grid_batch * compiled.pattern.heads.q),
                    (q, k_cmp, v_cmp, k_swa, v_swa, do, g_arg["cmp"], g_arg["swa"], lse_cmp, lse_swa, delta_cmp,
                     delta_swa, *dq.args(), shapes.length, shapes.compressed, shapes.keys, scale * LOG2E, scale,
                     *_strides(q), *_strides(k_cmp), *_strides(v_cmp), *_strides(k_swa), *_strides(v_swa),
                     *_strides(do)),
                    dtype=q.dtype, num_warps=kp.num_warps, num_stages=kp.const("SWA_BWD_DQ_STAGES"),
                    HAS_G_CMP=g_cmp is not None, HAS_G_SWA=g_swa is not None, **packed, **dq.flags())
    dq.release()


def pool_backward(compiled, *, dk_cmp, dv_cmp, dk, dv, shapes) -> None:
    """cmp_pool_bwd: the compressed keys' and values' gradients spread back
    over the positions each pooled, into dk and dv (packed sequences: each
    program in its own sequence, the kernel's VARLEN)."""
    p = compiled.pattern
    T, Tc = shapes.keys, shapes.compressed
    DQK, DV = p.dims.qk, p.dims.v
    if shapes.grid_compressed > 0:
        kp = compiled.plan.kernel("cmp_pool_bwd")
        grid = (_cdiv(shapes.grid_length, kp.const("POOL_BWD_BLOCK_P")), shapes.grid_batch * p.heads.kv)
        packed = packed_operands(shapes, dk.device, "cmp_pool_bwd")
        for src, dst, d in ((dk_cmp, dk, DQK), (dv_cmp, dv, DV)):
            compiled.module.cmp_pool_bwd[grid](src, dst, T, Tc, D=d, D_PAD=1 << (d - 1).bit_length(), **packed,
                                               num_warps=kp.num_warps, num_stages=kp.num_stages)


def selection_backward(compiled, *, q, k, v, do, gate, lse, delta, indices, dq, dk, dv, shapes, scale: float,
                       atomic: bool, distinct: bool) -> None:
    """slc_bwd_dq (dQ, and with atomic dK/dV by float32 atomics), else
    slc_bwd_dkdv over the inverted index in chunks of SLC_BWD_CHUNK
    positions and slc_bwd_reduce summing each block's chunks: dQ as dq (a
    DqSum) says, dK and dV into dk and dv. distinct: no index row repeats a block (the plan's own
    scoring)."""
    plan, m, p = compiled.plan, compiled.module, compiled.pattern
    B, T = shapes.batch, shapes.length
    HKV, DQK, DV = p.heads.kv, p.dims.qk, p.dims.v
    dev = q.device
    f32 = torch.float32
    qk_scale_log2 = scale * LOG2E
    kp = plan.kernel("slc_bwd")
    packed = packed_operands(shapes, dev, "slc_bwd")
    g_arg = gate if gate is not None else do
    # packed: pointers only (a block's box reaches into the next sequence)
    k_arg, v_arg, slc_tma = _kv_operands(kp.const("SLC_BWD_DQ_TMA") and shapes.packing is None, k, v,
                                         p.select.block, plan.qk_pad, plan.v_pad)
    m.slc_bwd_dq[(shapes.query_tiles(kp.const("SLC_BWD_DQ_TOKENS")), shapes.grid_batch * HKV)](
        q, k_arg, v_arg, do, g_arg, lse, delta, indices, *dq.args(), dk, dv,
        T, qk_scale_log2, scale, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(indices), HAS_GATE=gate is not None, ATOMIC_DKV=atomic, SLC_TMA=slc_tma, **packed, **dq.flags(),
        num_warps=kp.warps_for("slc_bwd_dq"), num_stages=kp.num_stages)
    dq.release()
    if not atomic:
        if shapes.packing is None:
            n_blocks = num_blocks(T, p.select.block)
            offsets, positions = block_to_positions(indices, p.select.block, n_blocks,
                                                    distinct=distinct, keys_fn=partial(index_keys, compiled))
            spans = packed["cu_seqlens"]  # unused
        else:  # global block ids over the sequences (inverted_index.packed_blocks)
            blocks = shapes.packing.selection_blocks(p.select.block, T, shapes.keys)
            n_blocks, spans = blocks["n_blocks"], blocks["spans"]
            offsets, positions = packed_block_to_positions(indices, p.select.block, blocks, distinct=distinct)
        # Sized for the most chunks the index can have, so nothing
        # is read back to the host (the exact count, read back to
        # size these, was the backward's one synchronisation);
        # programs past the index's last chunk return at once.
        chunks = chunk_table(offsets, kp.const("SLC_BWD_CHUNK"), 1, indices.numel())
        if T > 0:
            part_k = torch.empty((chunks["grid"], p.select.block, DQK), dtype=f32, device=dev)
            part_v = torch.empty((chunks["grid"], p.select.block, DV), dtype=f32, device=dev)
            m.slc_bwd_dkdv[(chunks["grid"],)](
                q, k, v, do, g_arg, lse, delta, chunks["slice_first"], chunks["segment"],
                chunks["start"], chunks["end"], positions, part_k, part_v,
                T, n_blocks, qk_scale_log2, scale, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
                HAS_GATE=gate is not None, block_spans=spans, **packed, num_warps=kp.num_warps,
                num_stages=kp.num_stages)
            m.slc_bwd_reduce[(B * HKV * n_blocks,)](part_k, part_v, chunks["per_segment"], dk, dv,
                                                    T, n_blocks, block_spans=spans, **packed, num_warps=4,
                                                    num_stages=1)
