"""The forward launchers, one per kernel family: compression (cmp_pool,
cmp_fwd), block scoring (slc_topk), the selection in either loop order
(slc_fwd group-centric; slc_fwd_bc and its slot reduction block-centric),
the sliding window (swa_fwd) and the gated combine.

Each takes the CompiledPattern as `compiled` (its plan, kernel module,
allocator and fitted stages) and the call's tensors as named arguments;
CompiledPattern.forward decides which run, in which order. Outputs go into
the forward's `out` dict by name (o_cmp, lse_cmp, o_swa, ...) or are
returned."""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from .geometry import num_blocks
from .inverted_index import block_to_positions, chunk_table, packed_block_to_positions
from .launch import (_GATED, _cdiv, _descriptor_operands, _gate_args, _int32_keys, _kv_operands, _launch_fitting,
                     _strides, index_keys, packed_operands)


def compress(compiled, *, q, k, v, k_cmp, v_cmp, out: dict, shapes, qk_scale_log2: float) -> None:
    """cmp_pool (where the plan pools k and v itself, else k_cmp and v_cmp
    are the caller's) and cmp_fwd: k_cmp, v_cmp, o_cmp (None where the plan
    needs no compressed output: CMP_WRITE_O) and lse_cmp into out.
    Packed sequences (shapes.packing): the grids run over the sequences,
    each program in its own (the kernels' VARLEN); k_cmp, v_cmp pooled here
    are [1, Tc, ...] with Tc = varlen.compressed_bound, the rows from
    cu_compressed[-1] on unused (never written, never read: cmp_fwd's
    descriptor path masks and zeroes them as keys past a sequence's end)."""
    plan, m, p = compiled.plan, compiled.module, compiled.pattern
    B, T, Tc = shapes.batch, shapes.length, shapes.compressed
    HQ, HKV, DV = p.heads.q, p.heads.kv, p.dims.v
    dev = q.device
    if plan.has("cmp_pool"):
        k_cmp = compiled.alloc((B, Tc, HKV, p.dims.qk), q.dtype, dev)
        v_cmp = compiled.alloc((B, Tc, HKV, DV), q.dtype, dev)
        if shapes.grid_compressed > 0:
            kp = plan.kernel("cmp_pool")
            grid = (_cdiv(shapes.grid_compressed, kp.const("POOL_BLOCK_C")), shapes.grid_batch * HKV)
            packed = packed_operands(shapes, dev, "cmp_pool")
            for src, dst, d in ((k, k_cmp, p.dims.qk), (v, v_cmp, DV)):
                m.cmp_pool[grid](src, dst, Tc, *_strides(src), *_strides(dst), D=d,
                                 D_PAD=1 << (d - 1).bit_length(), **packed,
                                 num_warps=kp.num_warps, num_stages=kp.num_stages)
    out["k_cmp"], out["v_cmp"] = k_cmp, v_cmp
    kp = plan.kernel("cmp_fwd")
    write_o = kp.const("CMP_WRITE_O")
    o_cmp = compiled.alloc((B, T, HQ, DV), q.dtype, dev) if write_o else None
    lse_cmp = compiled.alloc((B, HQ, T), torch.float32, dev)
    o_arg = o_cmp if write_o else lse_cmp  # unused pointer when the output is not needed
    o_strides = _strides(o_cmp) if write_o else (0, 0, 0, 0)
    grid = (shapes.query_tiles(kp.const("CMP_BLOCK_M")), shapes.grid_batch * HQ)
    k_arg, v_arg, cmp_tma = _kv_operands(kp.const("CMP_TMA"), k_cmp, v_cmp, kp.const("CMP_BLOCK_N"),
                                         plan.qk_pad, plan.v_pad)
    _launch_fitting(compiled, "cmp_fwd", grid, (q, k_arg, v_arg, o_arg, lse_cmp, T, Tc, qk_scale_log2,
                                                *_strides(q), *_strides(k_cmp), *_strides(v_cmp), *o_strides),
                    CMP_TMA=cmp_tma, **packed_operands(shapes, dev, "cmp_fwd"), dtype=q.dtype,
                    num_warps=kp.num_warps, num_stages=kp.num_stages)
    out["o_cmp"], out["lse_cmp"] = o_cmp, lse_cmp


def score_blocks(compiled, *, q, out: dict, shapes, qk_scale_log2: float) -> torch.Tensor:
    """slc_topk (slc_topk_static for a static selection): the selection's block indices, [B, T,
    HKV, top] int32, from the compressed keys and statistics in out (a
    static selection reads neither). Packed sequences (shapes.packing): the
    grids run over the sequences and the positions of the longest one, each
    program in its own sequence (the kernels' VARLEN), its indices that
    sequence's block numbers."""
    plan, m, p = compiled.plan, compiled.module, compiled.pattern
    B, T, Tc = shapes.batch, shapes.length, shapes.compressed
    HKV = p.heads.kv
    dev = q.device
    top = p.select.top
    kp = plan.kernel("slc_topk")
    indices = compiled.alloc((B, T, HKV, top), torch.int32, dev)
    packed = packed_operands(shapes, dev, "slc_topk")
    tile = kp.const("TOPK_BLOCK_M") if plan.static_selection else kp.const("TOPK_TOKENS")
    grid = (shapes.query_tiles(tile), shapes.grid_batch * HKV)
    if grid[0] == 0 or grid[1] == 0:  # no position (an empty packing, or only empty sequences)
        return indices
    if plan.static_selection:
        m.slc_topk_static[grid](indices, T, *_strides(indices), **packed, num_warps=kp.num_warps,
                                num_stages=kp.num_stages)
    else:  # tiles of TOPK_TOKENS positions x the group's heads
        k_arg, topk_tma = _descriptor_operands(kp.const("TOPK_TMA"), (
            out["k_cmp"], (1, kp.const("TOPK_CHUNK_TOKENS"), 1, plan.qk_pad)))
        # the int32 keys must hold the block numbers of the longest sequence
        m.slc_topk[grid](q, k_arg, out["lse_cmp"], indices, T, Tc, qk_scale_log2,
                         *_strides(q), *_strides(out["k_cmp"]), *_strides(indices), packed["cu_seqlens"],
                         packed["cu_compressed"], packed["cu_queries"], TOPK_TMA=topk_tma,
                         TOPK_KEY32=_int32_keys(q.dtype, num_blocks(shapes.grid_length, p.select.block)),
                         VARLEN=packed["VARLEN"], num_warps=kp.num_warps, num_stages=kp.num_stages)
    return indices


def select_group_centric(compiled, *, q, k, v, k_swa, v_swa, indices, gates: dict, out: dict, shapes,
                         qk_scale_log2: float, write_final: bool) -> tuple:
    """slc_fwd: (o_slc, lse_slc, None), or with write_final (None, None, o)
    where it writes the gated output itself (its branch output and
    statistics pointers are then never written: o_slc points at the final
    output). With the window folded into it (plan.window_in_selection) it
    computes the window branch too, into out["o_swa"], ["lse_swa"] unless
    write_final; o_cmp comes from out."""
    plan, m, p = compiled.plan, compiled.module, compiled.pattern
    B, T = shapes.batch, shapes.length
    HQ, HKV, DV = p.heads.q, p.heads.kv, p.dims.v
    dev = q.device
    kp = plan.kernel("slc_fwd")
    packed = packed_operands(shapes, dev, "slc_fwd")
    o_slc = compiled.alloc((B, T, HQ, DV), q.dtype, dev)
    lse_slc = compiled.alloc((B, HQ, T), torch.float32, dev) if not write_final else None
    window_args, window_tma = (), False
    if kp.has_const("SLC_FWD_WINDOW"):  # the pattern has a window: slc_fwd takes its tensors
        if plan.window_in_selection:  # ... and computes it, reading k and v as swa_fwd would
            kw, vw = (k_swa, v_swa) if k_swa is not None else (k, v)
            # packed: pointers only (a descriptor's box would read past the
            # sequence's end into the next one; the pointer path masks there)
            kw_arg, vw_arg, window_tma = (window_operands(compiled, kw, vw) if shapes.packing is None
                                          else (kw, vw, False))
            o_swa = compiled.alloc((B, T, HQ, DV), q.dtype, dev) if not write_final else o_slc
            lse_swa = compiled.alloc((B, HQ, T), torch.float32, dev) if not write_final else o_slc
            if not write_final:
                out["o_swa"], out["lse_swa"] = o_swa, lse_swa
            window_args = (kw_arg, vw_arg, o_swa, lse_swa, *_strides(kw), *_strides(vw),
                           *_strides(o_swa))
        else:  # unused pointers
            window_args = (k, v, o_slc, o_slc, *_strides(k), *_strides(v), *_strides(o_slc))
    o_cmp = out.get("o_cmp")
    gate_ptrs, has_gates = _gate_args(gates, o_slc)
    # packed: pointers only (a block's box reaches into the next sequence)
    k_arg, v_arg, slc_tma = _kv_operands(kp.const("SLC_TMA") and shapes.packing is None, k, v, p.select.block,
                                         plan.qk_pad, plan.v_pad)
    grid = (shapes.query_tiles(kp.const("SLC_TOKENS")), shapes.grid_batch * HKV)
    m.slc_fwd[grid](
        q, k_arg, v_arg, indices, o_slc, lse_slc if lse_slc is not None else o_slc, T, qk_scale_log2,
        *_strides(q), *_strides(k), *_strides(v), *_strides(indices), *_strides(o_slc), *window_args,
        o_slc, o_cmp if o_cmp is not None else o_slc, *gate_ptrs, WRITE_FINAL=write_final, **has_gates,
        SLC_TMA=slc_tma, SWA_TMA=window_tma, **packed, num_warps=kp.num_warps, num_stages=kp.num_stages)
    return (None, None, o_slc) if write_final else (o_slc, lse_slc, None)


def select_block_centric(compiled, *, q, k, v, indices, qk_scale_log2: float, shapes, final_from: Optional[dict],
                         gates: dict, window: Optional[tuple] = None, window_out: Optional[dict] = None,
                         forced: bool = False, distinct: bool = False) -> tuple:
    """slc_fwd_bc and its slot reduction around the inverted index, slice
    by slice of BC_SLICE positions: (o_slc, lse_slc, None) exactly as
    the group-centric kernel leaves them (lse in log2 units, +inf and a
    zero output for a position that sees no selected key). final_from
    (the forward's outputs so far: o_cmp, o_swa): the reduction writes
    the gated output instead, (None, None, o). window (the window
    branch's keys and values, BC_FOLD_WINDOW): the reduction is
    slc_fwd_bc_merge_window, which computes the window branch too, into
    window_out["o_swa"], ["lse_swa"] (with final_from, only into o).
    forced (with window; indices that hold every visible forced block):
    the merge attends the forced blocks, slc_fwd_bc only the others.
    distinct: no index row repeats a block (the plan's own scoring)."""
    p, m = compiled.pattern, compiled.module
    kp = compiled.plan.kernel("slc_fwd_bc")
    B, T = shapes.batch, shapes.length
    HQ, HKV, G, DV, top = p.heads.q, p.heads.kv, p.group, p.dims.v, p.select.top
    dev = q.device
    packed = packed_operands(shapes, dev, "slc_fwd_bc")
    if shapes.packing is not None:
        # Packed sequences: the index over global block ids (Packing.selection_blocks),
        # the slots reduced by slc_fwd_bc_reduce over the packed rows as one
        # batch. The merge's tiles (window, forced blocks) would straddle
        # sequences: CompiledPattern.forward passes neither for packed calls.
        if window is not None or forced:
            raise NotImplementedError("cu_seqlens: the block-centric merge (window or forced blocks folded into"
                                      " the reduction) does not take packed sequences")
        blocks = shapes.packing.selection_blocks(p.select.block, T, shapes.keys)
        n_blocks, spans = blocks["n_blocks"], blocks["spans"]
    else:
        n_blocks = num_blocks(T, p.select.block)
        spans = packed["cu_seqlens"]  # unused
    write_final = final_from is not None
    o = compiled.alloc((B, T, HQ, DV), q.dtype, dev)
    lse = compiled.alloc((B, HQ, T), torch.float32, dev) if not write_final else o  # o: an unused pointer
    if T == 0:
        return (None, None, o) if write_final else (o, lse, None)
    # the gated sum's other branches and gates (unused pointers are o)
    others = [final_from.get(n) if write_final and final_from.get(n) is not None else o for n in ("o_cmp", "o_swa")]
    gate_ptrs, has_gates = _gate_args(gates, o)
    TS = min(T, max(1, kp.const("BC_SLICE") // B))  # BC_SLICE (batch element, position) pairs a slice
    if window is not None and TS < T:
        # the merge's tiles of BC_WINDOW_TOKENS positions never straddle slices
        tokens = kp.const("BC_WINDOW_TOKENS")
        TS = max(tokens, TS - TS % tokens)
    n_slices = _cdiv(T, TS)
    if forced and window is None:
        raise ValueError("forced blocks in the merge need the window folded into it (BC_FOLD_WINDOW)")
    if shapes.packing is None:
        offsets, positions, slots = block_to_positions(
            indices, p.select.block, n_blocks, with_slots=True, slice_len=TS,
            skip_forced=(p.select.initial, p.select.local) if forced else None, distinct=distinct,
            keys_fn=partial(index_keys, compiled))
    else:
        offsets, positions, slots = packed_block_to_positions(indices, p.select.block, blocks, with_slots=True,
                                                              slice_len=TS, distinct=distinct)
    chunks = chunk_table(offsets, kp.const("BC_CHUNK"), n_slices, B * TS * HKV * top)
    # packed: pointers only (a block's box reaches into the next sequence)
    k_sel, v_sel, slc_tma = _kv_operands(kp.const("SLC_TMA") and shapes.packing is None, k, v, p.select.block,
                                         compiled.plan.qk_pad, compiled.plan.v_pad)
    # Per-slot partials of one slice, reused by the next: the outputs in
    # the input dtype (normalised over one block, so bounded by |v|), the
    # log2-sum-exp in float32, -inf for a slot a position did not use.
    part_o = compiled.alloc((B, TS, HKV, top, G, DV), q.dtype, dev)
    part_lse = torch.empty((B, TS, HKV, top, G), dtype=torch.float32, device=dev)
    reduce_rows = kp.const("BC_REDUCE_ROWS")
    if window is not None:
        kw, vw = window
        if write_final:
            o_swa = lse_swa = o  # unused pointers
        else:
            o_swa = compiled.alloc((B, T, HQ, DV), q.dtype, dev)
            lse_swa = compiled.alloc((B, HQ, T), torch.float32, dev)
            window_out["o_swa"], window_out["lse_swa"] = o_swa, lse_swa
        tokens = kp.const("BC_WINDOW_TOKENS")
        o_cmp = final_from.get("o_cmp") if write_final else None
        kw_arg, vw_arg, window_tma = window_operands(compiled, kw, vw)
        k_forced, v_forced, forced_tma = _kv_operands(forced and kp.const("BC_FORCED_TMA"), k, v, p.select.block,
                                                      compiled.plan.qk_pad, compiled.plan.v_pad)
        # the local blocks' keys scored once for the window and the
        # forced blocks: only where the window reads these very k and v
        # and the merge computes it (not for a combined output without it)
        local_in_window = (forced and compiled.plan.local_in_window and kw is k and vw is v
                           and (not write_final or compiled.plan.kernel("combine").const("COMBINE_SWA")))
    for i, t0 in enumerate(range(0, T, TS)):
        part_lse.fill_(float("-inf"))
        m.slc_fwd_bc[(chunks["grid"],)](q, k_sel, v_sel, chunks["slice_first"], chunks["segment"],
                                       chunks["start"], chunks["end"], positions, slots, part_o, part_lse,
                                       T, t0, TS, i, i * B * HKV * n_blocks, n_blocks, qk_scale_log2,
                                       *_strides(q), *_strides(k), *_strides(v), SLC_TMA=slc_tma,
                                       block_spans=spans, **packed, num_warps=kp.num_warps,
                                       num_stages=kp.num_stages)
        if window is not None:
            m.slc_fwd_bc_merge_window[(_cdiv(min(TS, T - t0), tokens), B * HKV)](
                q, k_forced, v_forced, kw_arg, vw_arg, part_o, part_lse, o, lse, o_swa, lse_swa, T, t0, TS,
                qk_scale_log2,
                *_strides(q), *_strides(k), *_strides(v), *_strides(kw), *_strides(vw), *_strides(o),
                *_strides(o_swa), o, o_cmp if o_cmp is not None else o, *gate_ptrs,
                WRITE_FINAL=write_final, BC_MERGE_FORCED=forced, **has_gates, SWA_TMA=window_tma,
                BC_FORCED_TMA=forced_tma, BC_LOCAL_IN_WINDOW=local_in_window,
                num_warps=kp.warps_for("slc_fwd_bc_merge_window"), num_stages=kp.const("BC_REDUCE_STAGES"))
            continue
        n_rows = B * TS * HQ
        m.slc_fwd_bc_reduce[(_cdiv(n_rows, reduce_rows),)](
            part_o, part_lse, o, lse, T, t0, TS, min(TS, T - t0), n_rows, *_strides(o), o, *others, *gate_ptrs,
            WRITE_FINAL=write_final, **has_gates, num_warps=4, num_stages=kp.const("BC_REDUCE_STAGES"))
    return (None, None, o) if write_final else (o, lse, None)


def window(compiled, *, q, k, v, k_swa, v_swa, out: dict, shapes, qk_scale_log2: float) -> None:
    """swa_fwd: the window branch's o_swa and lse_swa into out (packed
    sequences: each program in its own sequence, the kernel's VARLEN)."""
    p = compiled.pattern
    B, T = shapes.batch, shapes.length
    kw, vw = (k_swa, v_swa) if k_swa is not None else (k, v)
    kp = compiled.plan.kernel("swa_fwd")
    o_swa = compiled.alloc((B, T, p.heads.q, p.dims.v), q.dtype, q.device)
    lse_swa = compiled.alloc((B, p.heads.q, T), torch.float32, q.device)
    grid = (shapes.query_tiles(kp.const("SWA_BLOCK_M")), shapes.grid_batch * p.heads.q)
    k_arg, v_arg, swa_tma = window_operands(compiled, kw, vw)
    _launch_fitting(compiled, "swa_fwd", grid, (q, k_arg, v_arg, o_swa, lse_swa, T, T, qk_scale_log2,
                                                *_strides(q), *_strides(kw), *_strides(vw), *_strides(o_swa)),
                    SWA_TMA=swa_tma, **packed_operands(shapes, q.device, "swa_fwd"), dtype=q.dtype,
                    num_warps=kp.num_warps, num_stages=kp.num_stages)
    out["o_swa"], out["lse_swa"] = o_swa, lse_swa


def window_operands(compiled, kw: torch.Tensor, vw: torch.Tensor) -> tuple:
    """(k, v, SWA_TMA) of the window branch wherever it is computed
    (swa_fwd, or folded into a selection kernel): swa_fwd's key tile and
    the plan's SWA_TMA decide (_kv_operands)."""
    swa = compiled.plan.kernel("swa_fwd")
    return _kv_operands(swa.const("SWA_TMA"), kw, vw, swa.const("SWA_BLOCK_N"), compiled.plan.qk_pad,
                        compiled.plan.v_pad)


def combine(compiled, *, out: dict, gates: dict, n_rows: int, like: torch.Tensor) -> torch.Tensor:
    """combine: the gated sum of the branch outputs in out, shaped like
    `like` ([B, T, HQ, ...]) with the value head dimension."""
    kp = compiled.plan.kernel("combine")
    o = compiled.alloc((*like.shape[:3], compiled.pattern.dims.v), like.dtype, like.device)
    branch_out = {b: out.get(f"o_{b.value}") for b in _GATED}
    # Unused pointers are never read (their COMBINE_* constant is False);
    # pass o so every pointer argument is a real tensor. Gates arrive
    # contiguous (forward's contract).
    ptrs = [branch_out[b] if branch_out[b] is not None else o for b in _GATED]
    gate_ptrs, has_gates = _gate_args(gates, o)
    for t in ptrs:
        if t is not o and not t.is_contiguous():  # pragma: no cover - branch outputs are allocated contiguous
            raise AssertionError("branch outputs must be contiguous")
    grid = (_cdiv(n_rows, kp.const("COMBINE_ROWS")),)
    compiled.module.combine[grid](o, *ptrs, *gate_ptrs, n_rows, **has_gates,
                                  num_warps=kp.num_warps, num_stages=kp.num_stages)
    return o
