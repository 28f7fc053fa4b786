"""The inverted selection index: for every selected block the positions
whose selection holds it, as CSR arrays (block_to_positions), and those
segments cut into fixed-size chunks for a launch (chunk_table). Plain torch
on the device, no host synchronisation; the block-centric selection forward
and the selection backward launch over them."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def block_to_positions(indices: torch.Tensor, block: int, n_blocks: int, *, with_slots: bool = False,
                       slice_len: Optional[int] = None, skip_forced: Optional[tuple] = None,
                       distinct: bool = False, keys_fn: Optional[Callable] = None) -> tuple:
    """The inverted selection index: for every (batch, KV head, block) the
    ascending positions whose selection holds that block, as CSR arrays
    (offsets [B*HKV*n_blocks + 1] int32, positions int32), and with
    with_slots=True the slot of the index row each entry came from (int32).
    Blocks past a position (which it cannot attend) are dropped, and a block
    repeated in a row counts once (its first slot). skip_forced = (initial,
    local): a position's forced blocks are dropped too (the block-centric
    merge attends them, BC_MERGE_FORCED). distinct=True: no row repeats a
    block (the plan's scoring writes each at most once), so the duplicate
    test is skipped (its cost: NOTES v11).
    keys_fn(indices, slice_len, n_blocks, n_segments, skip_forced, distinct)
    -> int32 keys: the sort keys from one kernel (slc_index_keys) instead
    of the torch steps below (where 32-bit keys fit).
    slice_len: the positions are cut into slices of that many, and every
    slice has its own segments, slice-major (offsets then has
    cdiv(T, slice_len) * B*HKV*n_blocks + 1 entries), so one index serves a
    kernel launched slice by slice.
    No host synchronisation: every index entry is sorted, the dropped ones
    under a key past the last segment, so positions and slots always hold
    B*T*HKV*top entries and those past offsets[-1] belong to no segment.
    Never T x blocks."""
    B, T, HKV, top = indices.shape
    dev = indices.device
    n_slices = 1 if slice_len is None else max(1, -(-T // slice_len))
    n_segments = n_slices * B * HKV * n_blocks
    # 32-bit keys where they fit: the global radix sort then makes half the
    # passes (and every elementwise step moves half the bytes)
    key_type = torch.int32 if n_segments < 2**31 - 1 else torch.int64
    if keys_fn is not None and key_type == torch.int32:
        segment = keys_fn(indices, slice_len or max(T, 1), n_blocks, n_segments, skip_forced, distinct)
    else:
        idx = indices.to(key_type)
        t = torch.arange(T, device=dev, dtype=key_type).view(1, T, 1, 1)
        usable = (idx >= 0) & (idx <= t // block)
        if not distinct:
            usable &= first_in_row(idx)
        if skip_forced is not None:
            initial, local = skip_forced
            usable &= (idx >= initial) & (idx <= t // block - local)
        slice_t = t // slice_len if slice_len is not None else 0
        b = torch.arange(B, device=dev, dtype=key_type).view(B, 1, 1, 1)
        h = torch.arange(HKV, device=dev, dtype=key_type).view(1, 1, HKV, 1)
        segment = torch.where(usable, ((slice_t * B + b) * HKV + h) * n_blocks + idx, n_segments)
    return _csr(segment, n_segments, T, HKV, top, key_type, with_slots)


def _csr(segment: torch.Tensor, n_segments: int, T: int, HKV: int, top: int, key_type, with_slots: bool) -> tuple:
    """block_to_positions' CSR arrays from each index entry's segment key
    (n_segments: dropped), entries in (batch, position, KV head, slot) order."""
    # stable: within a segment the entries keep their (position, slot) order
    ordered, order = torch.sort(segment.flatten(), stable=True)
    # each segment's first entry in the sorted keys (bincount would read the
    # largest key back to the host to size its output)
    offsets = torch.searchsorted(ordered, torch.arange(n_segments + 1, device=segment.device, dtype=key_type))
    positions = ((order // (HKV * top)) % T).to(torch.int32)
    if with_slots:
        return offsets.to(torch.int32), positions, (order % top).to(torch.int32)
    return offsets.to(torch.int32), positions


def packed_blocks(cu_seqlens: torch.Tensor, block: int, total: int,
                  cu_queries: Optional[torch.Tensor] = None, key_total: Optional[int] = None) -> dict:
    """The selection blocks of packed sequences under global ids: block j
    of sequence s is g = block_base[s] + j, block_base the exclusive cumsum
    of each sequence's cdiv(T_s, block) blocks. Computed on the device, no
    host sync: `n_blocks` = cdiv(key rows, block) + N bounds the global
    blocks (a sequence's blocks are at most its own cdiv), the ids past the
    last real block are empty. Returns n_blocks; spans int32 [n_blocks, 3]
    (the packed key rows [start, end) of each global block's keys: the
    sequence's rows j*block .. cut at its end; (0, 0) for an unused id;
    then the sequence's key row minus query row of one position, 0 unless
    cu_queries shifts its queries: causality is key row <= query row +
    that); row_base int64 [total] (the block_base of each packed query
    row's sequence) and row_local int64 [total] (the row's position in its
    sequence). cu_queries: the query rows' offsets where each sequence's
    queries are its last positions only (total of them), with key_total
    key rows."""
    dev = cu_seqlens.device
    n_seq = cu_seqlens.numel() - 1
    key_rows = total if key_total is None else key_total
    n_blocks = max(1, -(-key_rows // block) + n_seq)
    cu = cu_seqlens.to(torch.int64)
    counts = (cu[1:] - cu[:-1] + block - 1) // block
    ends = torch.cumsum(counts, 0)  # inclusive: blocks up to and including sequence s
    base = ends - counts
    g = torch.arange(n_blocks, device=dev, dtype=torch.int64)
    seq = torch.searchsorted(ends, g, right=True).clamp(max=max(n_seq - 1, 0))
    used = g < (ends[-1] if n_seq > 0 else 0)
    start = cu[seq] + (g - base[seq]) * block if n_seq > 0 else torch.zeros_like(g)
    end = torch.minimum(start + block, cu[seq + 1]) if n_seq > 0 else torch.zeros_like(g)
    cq = cu if cu_queries is None else cu_queries.to(torch.int64)
    # key row - query row of one position of each sequence (its first query
    # sits at position T_s - Tq_s)
    shift_of_seq = (cu[1:] - cq[1:]) if n_seq > 0 else torch.zeros(0, dtype=torch.int64, device=dev)
    shift = torch.where(used, shift_of_seq[seq], 0) if n_seq > 0 else torch.zeros_like(g)
    spans = torch.stack([torch.where(used, start, 0), torch.where(used, end, 0), shift], 1).to(torch.int32)
    rows = torch.arange(total, device=dev, dtype=torch.int64)
    row_seq = torch.searchsorted(cq[1:], rows, right=True).clamp(max=max(n_seq - 1, 0))
    row_base = base[row_seq] if n_seq > 0 else rows
    row_local = rows + shift_of_seq[row_seq] - cu[row_seq] if n_seq > 0 else rows
    return {"n_blocks": n_blocks, "spans": spans.contiguous(), "row_base": row_base, "row_local": row_local}


def packed_block_to_positions(indices: torch.Tensor, block: int, blocks: dict, *, with_slots: bool = False,
                              slice_len: Optional[int] = None, distinct: bool = False) -> tuple:
    """block_to_positions for packed sequences (indices [1, total, HKV,
    top] of per-sequence block numbers): segments are (slice, KV head,
    global block) with the global ids of packed_blocks(...) = `blocks`, and
    the positions are packed rows. A block past the row's own position in
    its sequence is dropped, as is a repeated one. Torch steps on the
    device, no host sync."""
    B, T, HKV, top = indices.shape
    if B != 1:
        raise ValueError(f"packed indices: expected one batch [1, total, HKV, top], got {tuple(indices.shape)}")
    n_blocks = blocks["n_blocks"]
    n_slices = 1 if slice_len is None else max(1, -(-T // slice_len))
    n_segments = n_slices * HKV * n_blocks
    key_type = torch.int32 if n_segments < 2**31 - 1 else torch.int64
    idx = indices.to(torch.int64)
    local = blocks["row_local"].view(1, T, 1, 1)
    usable = (idx >= 0) & (idx <= local // block)
    if not distinct:
        usable &= first_in_row(idx)
    t = torch.arange(T, device=indices.device, dtype=torch.int64).view(1, T, 1, 1)
    slice_t = t // slice_len if slice_len is not None else 0
    h = torch.arange(HKV, device=indices.device, dtype=torch.int64).view(1, 1, HKV, 1)
    glob = idx + blocks["row_base"].view(1, T, 1, 1)
    segment = torch.where(usable, (slice_t * HKV + h) * n_blocks + glob, n_segments).to(key_type)
    return _csr(segment, n_segments, T, HKV, top, key_type, with_slots)


def first_in_row(idx: torch.Tensor) -> torch.Tensor:
    """[..., top] -> bool, False where an earlier slot of the row holds the
    same block (a repeated block counts once, at its first slot): the same
    as reference.first_occurrence, by comparing every pair of slots: a few
    kernels over top x top booleans a row instead of its per-row sort
    (torch's segmented radix sort over every entry; NOTES v11)."""
    top = idx.shape[-1]
    earlier = torch.ones(top, top, dtype=torch.bool, device=idx.device).tril(-1)  # [slot, other]: other < slot
    return ~((idx.unsqueeze(-1) == idx.unsqueeze(-2)) & earlier).any(-1)


def chunk_table(offsets: torch.Tensor, chunk: int, n_slices: int, max_entries_per_slice: int) -> dict:
    """Every segment of the inverted index cut into chunks of at most
    `chunk` positions, without a host synchronisation, for a launch per
    slice of a slice-major index (n_slices 1: one launch): chunk c of the
    whole index is (segment, start, end) of arrays sized for the most
    chunks the index can have, and
    slice_first [n_slices + 1] says which chunks belong to slice i. A
    slice's launch takes `grid` programs (its most possible chunks); a
    program past slice_first[i + 1] has nothing to do. per_segment
    [n_segments + 1]: the chunks of segment s are per_segment[s] ..
    per_segment[s + 1] - 1 (CSR)."""
    n_segments = offsets.numel() - 1
    per_slice = n_segments // n_slices
    counts = (offsets[1:] - offsets[:-1]).long()
    per = (counts + chunk - 1) // chunk
    first = torch.zeros(n_segments + 1, dtype=torch.int64, device=offsets.device)
    first[1:] = torch.cumsum(per, 0)  # chunks before each segment
    grid = -(-max_entries_per_slice // chunk) + per_slice  # ceil per segment adds at most one each
    n_max = n_slices * grid
    c = torch.arange(n_max, device=offsets.device)
    segment = (torch.searchsorted(first[1:], c, right=True)).clamp(max=n_segments - 1)
    start = offsets[segment].long() + (c - first[segment]) * chunk
    end = torch.minimum(start + chunk, offsets[segment + 1].long())
    return {"segment": segment.to(torch.int32), "start": start.to(torch.int32), "end": end.to(torch.int32),
            "slice_first": first[::per_slice].to(torch.int32), "per_segment": first.to(torch.int32), "grid": grid}
