#!/usr/bin/env python3
"""GPU benchmark of nsa_dsl against dense and FlexAttention baselines.

    python benchmarks/bench.py [--quick] [--out benchmarks/results]
                               [--lengths 8192,16384] [--patterns a.nsa,b.nsa]

One run measures the device's two ceilings (bf16 matrix rate, copy bandwidth),
then for every pattern and length times nsa_dsl (forward, forward+backward,
per-kernel breakdown), SDPA's flash backend (dense causal), FlexAttention with
a static block mask and with nsa_dsl's own selected blocks, and the cold-start
cost of the first call. It writes <out>/<name>.json and <out>/<name>.png and
prints a table last. benchmarks/README.md documents the JSON schema.

The file is split in two: the pure part (FLOP and byte counting, masks as
plain tensors, rows, table, plot) runs anywhere and is tested on the CPU by
tests/test_bench_helpers.py; the GPU part is thin and only runs from main().
Importing this file makes no CUDA call.
"""
from __future__ import annotations

import argparse
import importlib.util
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nsa_dsl.geometry import compressed_length, num_blocks, visible_compressed  # noqa: E402

DEFAULT_PATTERNS = ("examples/bench_paper128.nsa", "examples/deepseek_nsa.nsa", "examples/bench_small_group.nsa")
DEFAULT_LENGTHS = (8192, 16384, 32768, 65536)
QUICK_LENGTHS = (8192, 16384)
BWD_FACTOR = 2.5  # backward FLOPs = 2.5 x forward attention FLOPs (flash-attention convention)
ELEM_BYTES = 2  # bf16
FLEX_BLOCK = 128  # FlexAttention's sparse block size (rows and columns)
COLD_MARK = "BENCH_CHILD_JSON "
PASSES = ("fwd", "fwd+bwd")
SDPA_IMPLS = ("sdpa_flash", "sdpa_flash_padv")  # speedup reference, in order of preference

CONVENTIONS = {
    "flops": "useful FLOPs: QK^T and PV count 2 per multiply-add over the keys a query attends to (causal, "
             "masked keys not counted); nsa_dsl forward adds the scoring recompute of QK^T over the visible "
             "compressed tokens when top > initial + local; backward = 2.5 x the forward FLOPs of the branches "
             "whose output is combined (no gradient through the scores); dense causal attention = "
             "2*(Dqk+Dv)*HQ*T*(T+1)/2 forward",
    "bytes": "minimum traffic in bf16: every input read once and every output written once; fwd: q, k, v "
             "(+ one gate per combined branch, + k_cmp, v_cmp for pool=mlp, for nsa_dsl) and o; fwd+bwd: "
             "twice that (do read, a gradient written for every input)",
    "floor_ms": "max(flops / matmul rate, bytes / copy bandwidth), both measured at the start of the run",
    "floor_frac": "floor_ms / ms (1.0 = at the roofline)",
    "tflops": "flops / time, 1e12 FLOP/s",
    "peak_mem_gb": "torch.cuda.max_memory_allocated() over one untimed call after reset_peak_memory_stats(); "
                   "absolute, inputs included; 1e9 bytes",
    "speedup_vs_sdpa": "ms of sdpa_flash (or sdpa_flash_padv where flash rejects the head dims) for the same "
                       "pattern, T and pass, divided by this row's ms",
    "ms": "median of triton.testing.do_bench; stage rows: device time per call from torch.profiler",
    "fused_output": "nsa_dsl rows: whether a forward without gradients (the fwd row) has the selection (slc_fwd or "
                    "the block-centric slot reduction) write the gated output itself (WRITE_FINAL: no combine "
                    "pass); the stage rows profile the training pass",
}


# ====================================================================== FLOPs
def slc_keys(t: int, block: int, top: int, local: int) -> tuple:
    """(keys query t attends to in the selection branch, exact?).

    With nb = t//block + 1 visible blocks, nb <= top selects them all (t + 1
    keys). Otherwise `top` blocks: with local >= 1 the block holding t is one
    of them and only t % block + 1 of its keys are visible, the others are
    whole, so the count is exact. With local = 0 whether that block is picked
    depends on the data: min(top*block, t + 1) is an upper bound."""
    nb = t // block + 1
    if nb <= top:
        return t + 1, True
    if local >= 1:
        return top * block - (block - 1 - t % block), True
    return min(top * block, t + 1), False


def swa_keys(t: int, size: int) -> int:
    return min(size, t + 1)


def union_length(intervals) -> int:
    """Number of integers covered by closed intervals [lo, hi] (empty when hi < lo)."""
    spans = sorted((lo, hi) for lo, hi in intervals if hi >= lo)
    total, cur_lo, cur_hi = 0, None, None
    for lo, hi in spans:
        if cur_hi is None or lo > cur_hi + 1:
            if cur_hi is not None:
                total += cur_hi - cur_lo + 1
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    if cur_hi is not None:
        total += cur_hi - cur_lo + 1
    return total


def static_mask_keys(t: int, sel_block: int, initial: int, local: int, window: Optional[int]) -> int:
    """Keys of the static FlexAttention mask for query t: causal AND (window OR
    the first `initial` selection blocks OR the `local` blocks ending at t's)."""
    qb = t // sel_block
    intervals = [(0, min(initial * sel_block, t + 1) - 1)]
    if local > 0:
        intervals.append((max(0, qb - local + 1) * sel_block, t))
    if window:
        intervals.append((max(0, t - window + 1), t))
    return union_length(intervals)


def _per_key(pattern) -> int:
    return 2 * pattern.dims.qk + 2 * pattern.dims.v


def nsa_flops(pattern, T: int) -> dict:
    """Forward FLOPs per branch for batch 1, all query heads, and the backward
    FLOPs by the 2.5x convention. Keys: cmp, score, slc, swa, fwd, bwd,
    fwd+bwd, exact (False where the selection count is an upper bound)."""
    p = pattern
    hq, dqk, dv = p.heads.q, p.dims.qk, p.dims.v
    combined = {b.value for b in p.combined_branches}
    out = {"cmp": 0, "score": 0, "slc": 0, "swa": 0, "exact": True}
    bwd_base = 0
    if p.compress is not None:
        c = p.compress
        keys = sum(visible_compressed(t, c.block, c.stride) for t in range(T))
        per = 2 * dqk + (2 * dv if "cmp" in combined else 0)
        out["cmp"] = hq * keys * per
        if "cmp" in combined:
            bwd_base += out["cmp"]
        if p.select is not None and not p.select.is_static:
            out["score"] = hq * keys * 2 * dqk
    if p.select is not None:
        s = p.select
        total = 0
        for t in range(T):
            n, exact = slc_keys(t, s.block, s.top, s.local)
            total += n
            out["exact"] = out["exact"] and exact
        out["slc"] = hq * total * _per_key(p)
        if "slc" in combined:
            bwd_base += out["slc"]
    if p.window is not None:
        keys = sum(swa_keys(t, p.window.size) for t in range(T))
        out["swa"] = hq * keys * _per_key(p)
        if "swa" in combined:
            bwd_base += out["swa"]
    out["fwd"] = out["cmp"] + out["score"] + out["slc"] + out["swa"]
    out["bwd"] = BWD_FACTOR * bwd_base
    out["fwd+bwd"] = out["fwd"] + out["bwd"]
    return out


def dense_flops(pattern, T: int) -> float:
    """Causal dense attention forward: 2*(Dqk+Dv)*HQ*T*(T+1)/2."""
    p = pattern
    return 2 * (p.dims.qk + p.dims.v) * p.heads.q * T * (T + 1) / 2


def static_mask_flops(pattern, T: int) -> float:
    """Forward FLOPs of the static FlexAttention approximation."""
    p = pattern
    s, w = p.select, (p.window.size if p.window is not None else None)
    if s is None:
        keys = sum(swa_keys(t, w) for t in range(T)) if w else T * (T + 1) // 2
    else:
        keys = sum(static_mask_keys(t, s.block, s.initial, s.local, w) for t in range(T))
    return p.heads.q * keys * _per_key(p)


def pass_flops(fwd: float, pass_: str, bwd: Optional[float] = None) -> float:
    """FLOPs of a pass; bwd defaults to 2.5x fwd (attention with every FLOP differentiated)."""
    if pass_ == "fwd":
        return fwd
    return fwd + (BWD_FACTOR * fwd if bwd is None else bwd)


def io_bytes(pattern, T: int, impl: str, pass_: str, elem: int = ELEM_BYTES) -> int:
    """Minimum bytes: inputs read once, outputs written once (see CONVENTIONS)."""
    p = pattern
    hq, hkv, dqk, dv = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v
    inputs = T * hq * dqk + T * hkv * dqk + T * hkv * dv
    if impl == "nsa_dsl":
        inputs += T * hq * len(p.combined_branches)
        if p.compress is not None and p.compress.pool.value == "mlp":
            inputs += compressed_length(p, T) * hkv * (dqk + dv)
    outputs = T * hq * dv
    total = inputs + outputs
    return elem * (total if pass_ == "fwd" else 2 * total)


def floor_ms(flops: Optional[float], nbytes: Optional[float], matmul_flops_per_s: Optional[float],
             copy_bytes_per_s: Optional[float]) -> Optional[float]:
    """The roofline floor in ms: the larger of compute time and memory time."""
    terms = []
    if flops and matmul_flops_per_s:
        terms.append(flops / matmul_flops_per_s)
    if nbytes and copy_bytes_per_s:
        terms.append(nbytes / copy_bytes_per_s)
    return 1e3 * max(terms) if terms else None


# ============================================================ masks as tensors
def selection_table(indices: torch.Tensor, T: int, block: int) -> torch.Tensor:
    """nsa_dsl's block indices [1, T, HKV, top] (-1 = none) -> bool [HKV, T, NB]:
    table[h, t, j] is True when query t of KV head h selected block j."""
    if indices.dim() != 4 or indices.shape[0] != 1 or indices.shape[1] != T:
        raise ValueError(f"indices: expected [1, {T}, HKV, top], got {tuple(indices.shape)}")
    nb = num_blocks(T, block)
    idx = indices[0].permute(1, 0, 2).long()  # [HKV, T, top]
    idx = torch.where(idx < 0, torch.full_like(idx, nb), idx)
    table = torch.zeros(idx.shape[0], T, nb + 1, dtype=torch.bool, device=indices.device)
    table.scatter_(2, idx, True)
    return table[..., :nb].contiguous()


def static_table(T: int, block: int, initial: int, local: int, device=None) -> torch.Tensor:
    """The forced blocks as a [1, T, NB] table: the first `initial` blocks
    and the `local` blocks ending at the query's, causal."""
    nb = num_blocks(T, block)
    t = torch.arange(T, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    qb = t // block
    keep = ((j < initial) | (j > qb - local)) & (j <= qb)
    return keep[None]


def table_bytes(heads: int, T: int, block: int) -> int:
    return heads * T * num_blocks(T, block)


def flex_block_tables(table: torch.Tensor, sel_block: int, window: Optional[int], fblock: int = FLEX_BLOCK) -> tuple:
    """Block-sparse layout of the token mask
        keep(h, q, kv) = kv <= q AND (table[h, q, kv // sel_block] OR q - kv < window)
    for FlexAttention tiles of fblock x fblock.

    Returns (kv_num_blocks, kv_indices, full_num_blocks, full_indices) shaped
    [1, H, NQB] and [1, H, NQB, NKB] (int32): the partial tiles (some but not
    all entries kept: the mask_mod decides) and the full tiles (every entry
    kept: no mask_mod), each list ascending. A tile is marked full only when
    every query row of it keeps the whole tile through one branch alone (all
    its selection blocks chosen, or wholly inside the window); anything else
    that keeps some entry is partial, which is always correct."""
    H, T, NB = table.shape
    if T % fblock or (fblock % sel_block and sel_block % fblock):
        raise ValueError(f"T={T} must be a multiple of {fblock}, and {fblock} and select block {sel_block} must divide"
                         " one another")
    nkb = T // fblock
    dev = table.device
    if sel_block <= fblock:
        per = fblock // sel_block
        padded = torch.zeros(H, T, nkb * per, dtype=torch.bool, device=dev)
        padded[..., :NB] = table
        grouped = padded.view(H, T, nkb, per)
        sel_any, sel_all = grouped.any(-1), grouped.all(-1)
    else:
        rep = sel_block // fblock
        sel_any = table.repeat_interleave(rep, dim=-1)[..., :nkb]
        sel_all = sel_any
    t = torch.arange(T, device=dev)[:, None]
    c_lo = torch.arange(nkb, device=dev)[None, :] * fblock
    c_hi = c_lo + fblock - 1
    causal_any = c_lo <= t
    causal_all = c_hi <= t
    if window:
        win_any = causal_any & (c_hi >= t - window + 1)
        win_all = causal_all & (t - c_lo <= window - 1)
    else:
        win_any = win_all = torch.zeros(T, nkb, dtype=torch.bool, device=dev)
    any_q = (sel_any & causal_any) | win_any  # [H, T, NKB]
    all_q = (sel_all & causal_all) | win_all
    nqb = T // fblock
    any_b = any_q.view(H, nqb, fblock, nkb).any(2)
    full_b = all_q.view(H, nqb, fblock, nkb).all(2)
    part_b = any_b & ~full_b

    def layout(mask):
        num = mask.sum(-1, dtype=torch.int32)
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num[None].contiguous(), order[None].contiguous()

    kv_num, kv_idx = layout(part_b)
    full_num, full_idx = layout(full_b)
    return kv_num, kv_idx, full_num, full_idx


def tile_density(tables: tuple) -> float:
    """Fraction of the causal tiles (r >= c) a block layout visits, partial
    and full together: 1.0 is as many tiles as dense causal attention."""
    kv_num, _, full_num, _ = tables
    heads, nqb = kv_num.shape[1], kv_num.shape[2]
    visited = int(kv_num.sum()) + int(full_num.sum())
    return visited / (heads * nqb * (nqb + 1) / 2)


def expand_heads(tables: tuple, group: int) -> tuple:
    """Per-KV-head block layouts -> per-query-head (head h uses KV head h // group)."""
    return tuple(t.repeat_interleave(group, dim=1) for t in tables)


def oracle_mask_mod(table: torch.Tensor, group: int, sel_block: int, window: Optional[int]) -> Callable:
    """mask_mod for FlexAttention: causal AND (block selected by nsa_dsl for
    this query and KV head OR inside the window)."""

    def mask_mod(b, h, q_idx, kv_idx):
        keep = table[h // group, q_idx, kv_idx // sel_block]
        if window:
            keep = keep | (q_idx - kv_idx < window)
        return (kv_idx <= q_idx) & keep

    return mask_mod


def static_mask_mod(sel_block: int, initial: int, local: int, window: Optional[int]) -> Callable:
    """mask_mod of the static approximation: causal AND (window OR the first
    `initial` blocks OR the `local` blocks ending at the query's)."""

    def mask_mod(b, h, q_idx, kv_idx):
        kb = kv_idx // sel_block
        keep = (kb < initial) | (kb > q_idx // sel_block - local)
        if window:
            keep = keep | (q_idx - kv_idx < window)
        return (kv_idx <= q_idx) & keep

    return mask_mod


def oracle_keys(indices: torch.Tensor, block: int, window: Optional[int]) -> int:
    """Keys kept by the oracle mask, summed over positions and KV heads:
    per (t, h) |selected keys <= t  UNION  window| (indices distinct per row)."""
    B, T, H, top = indices.shape
    idx = indices.long()
    t = torch.arange(T, device=indices.device).view(1, T, 1, 1)
    valid = idx >= 0
    start = idx * block
    end = torch.minimum(start + block - 1, t)
    sel = ((end - start + 1).clamp(min=0) * valid).sum(-1)
    if not window:
        return int(sel.sum())
    tt = t[..., 0]
    wlo = (tt - window + 1).clamp(min=0)
    over = ((end - torch.maximum(start, wlo[..., None]) + 1).clamp(min=0) * valid).sum(-1)
    return int((sel + (tt - wlo + 1) - over).sum())


# ====================================================================== rows
ROW_KEYS = ("pattern", "T", "impl", "pass", "stage", "ms", "peak_mem_gb", "tflops", "floor_frac",
            "speedup_vs_sdpa", "flops", "bytes", "floor_ms")


def make_row(pattern: str, T: Optional[int], impl: str, pass_: str, ms: Optional[float] = None, *,
             flops: Optional[float] = None, nbytes: Optional[float] = None, peak_gb: Optional[float] = None,
             ceilings: Optional[dict] = None, stage: Optional[str] = None, error: Optional[str] = None,
             note: Optional[str] = None) -> dict:
    """One JSON row; tflops, floor_ms and floor_frac follow from ms, flops,
    bytes and the measured ceilings (None where any is missing)."""
    ceilings = ceilings or {}
    fl = floor_ms(flops, nbytes, ceilings.get("matmul_flops_per_s"), ceilings.get("copy_bytes_per_s"))
    ok = ms is not None and ms > 0 and math.isfinite(ms)
    row = {
        "pattern": pattern, "T": T, "impl": impl, "pass": pass_, "stage": stage,
        "ms": float(ms) if ok else None,
        "peak_mem_gb": None if peak_gb is None else round(float(peak_gb), 4),
        "tflops": (flops / (ms * 1e-3) / 1e12) if ok and flops else None,
        "floor_frac": (fl / ms) if ok and fl else None,
        "speedup_vs_sdpa": None,
        "flops": flops, "bytes": nbytes, "floor_ms": fl,
    }
    if error is not None:
        row["error"] = str(error)
    if note is not None:
        row["note"] = note
    return row


def sdpa_reference(rows: list, pattern: str, T: int, pass_: str) -> Optional[dict]:
    for impl in SDPA_IMPLS:
        for r in rows:
            if (r["impl"] == impl and r["pattern"] == pattern and r["T"] == T and r["pass"] == pass_
                    and r["stage"] is None and r["ms"]):
                return r
    return None


def attach_speedups(rows: list) -> list:
    """Fill speedup_vs_sdpa of every whole-pass row that has a time."""
    for r in rows:
        r["speedup_vs_sdpa"] = None
        if r["stage"] is not None or not r["ms"] or r["pass"] not in PASSES or r["impl"].startswith("cold_start"):
            continue
        ref = sdpa_reference(rows, r["pattern"], r["T"], r["pass"])
        if ref is not None:
            r["speedup_vs_sdpa"] = ref["ms"] / r["ms"]
    return rows


# Entry points whose names do not start with their plan kernel's: the
# compressed and window dQ in one kernel is rendered with swa_bwd.
ENTRY_STAGES = {"cmp_swa_bwd_dq": "swa_bwd"}


def kernel_stage(name: str, kernel_names) -> Optional[str]:
    """The plan kernel a profiler kernel name belongs to: exact name, else
    ENTRY_STAGES', else the longest plan name it starts with (cmp_bwd_dq ->
    cmp_bwd); None if none."""
    if name in kernel_names:
        return name
    if ENTRY_STAGES.get(name) in kernel_names:
        return ENTRY_STAGES[name]
    best = None
    for k in kernel_names:
        if name.startswith(k) and (best is None or len(k) > len(best)):
            best = k
    return best


def stage_flop_count(name: str, plan_kernel: str, fl: dict, window_in_slc: bool = False) -> Optional[float]:
    """FLOPs of a forward stage row (None for the others): by the profiler's
    kernel name, else by its plan kernel, so an alternative entry point
    (slc_topk_static of slc_topk) or loop order (slc_fwd_bc) counts the same
    work as the default one. window_in_slc: slc_fwd also computed the
    window branch (SLC_FWD_WINDOW), so its row counts both."""
    counts = {"cmp_fwd": fl["cmp"], "slc_topk": fl["score"], "slc_fwd": fl["slc"] + (fl["swa"] if window_in_slc else 0),
              "slc_fwd_bc": fl["slc"], "swa_fwd": fl["swa"],
              "slc_fwd_bc_reduce": 0,  # its slot reduction: no matrix work (no FLOPs counted twice)
              "slc_fwd_bc_merge_window": fl["swa"]}  # the slot reduction with the window (BC_FOLD_WINDOW)
    return counts.get(name, counts.get(plan_kernel)) or None


def group_kernel_times(events, kernel_names, n_calls: int) -> tuple:
    """events: (kernel name, device microseconds) pairs from the profiler over
    n_calls calls. Returns ({name: (plan kernel, ms per call)}, other_ms,
    {other name: ms}) with names kept as the profiler reports them."""
    staged, other = {}, {}
    for name, us in events:
        bucket = staged if kernel_stage(name, kernel_names) is not None else other
        bucket[name] = bucket.get(name, 0.0) + us
    stages = {n: (kernel_stage(n, kernel_names), us / 1e3 / n_calls) for n, us in staged.items()}
    others = {n: us / 1e3 / n_calls for n, us in other.items()}
    return stages, sum(others.values()), others


def _fmt(x, spec: str) -> str:
    if x is None:
        return "-"
    return format(x, spec)


def _cell(rows_by_key: dict, key: tuple) -> str:
    r = rows_by_key.get(key)
    if r is None:
        return "-"
    if r["ms"] is None:
        return "skip" if str(r.get("error", "")).startswith("skipped") else "ERR"
    return f"{r['ms']:.3f}"


def format_table(rows: list) -> str:
    """The summary printed last: one line per (pattern, T, pass)."""
    by_key = {}
    for r in rows:
        if r["stage"] is None and r["pass"] in PASSES and r["T"] is not None:
            by_key.setdefault((r["pattern"], r["T"], r["pass"], r["impl"]), r)
    keys = sorted({(p, t, ps) for p, t, ps, _ in by_key}, key=lambda k: (k[0], k[1], PASSES.index(k[2])))
    head = (f"{'pattern':<18} {'T':>6} {'pass':<7} {'nsa ms':>9} {'sdpa ms':>9} {'flex ms':>9} {'oracle ms':>9}"
            f" {'vs sdpa':>8} {'floor':>6} {'peak GB':>8}")
    lines = [head, "-" * len(head)]
    for p, t, ps in keys:
        nsa = by_key.get((p, t, ps, "nsa_dsl"))
        sdpa = by_key.get((p, t, ps, "sdpa_flash"))
        if sdpa is None or sdpa["ms"] is None:
            sdpa = by_key.get((p, t, ps, "sdpa_flash_padv"), sdpa)
        sdpa_cell = "-" if sdpa is None else ("ERR" if sdpa["ms"] is None else f"{sdpa['ms']:.3f}")
        if sdpa is not None and sdpa["impl"] == "sdpa_flash_padv" and sdpa["ms"] is not None:
            sdpa_cell += "*"
        lines.append(
            f"{p[:18]:<18} {t:>6} {ps:<7} {_cell(by_key, (p, t, ps, 'nsa_dsl')):>9} {sdpa_cell:>9}"
            f" {_cell(by_key, (p, t, ps, 'flex')):>9} {_cell(by_key, (p, t, ps, 'flex_oracle_blocks')):>9}"
            f" {_fmt(nsa and nsa['speedup_vs_sdpa'], '.2f'):>8} {_fmt(nsa and nsa['floor_frac'], '.3f'):>6}"
            f" {_fmt(nsa and nsa['peak_mem_gb'], '.2f'):>8}")
    if any(k[3] == "sdpa_flash_padv" for k in by_key):
        lines.append("* sdpa_flash_padv: flash rejected Dqk != Dv, so v was zero-padded to Dqk")
    lines.append("vs sdpa, floor (floor_ms/ms) and peak GB are nsa_dsl's")
    return "\n".join(lines)


def format_stages(rows: list) -> str:
    """Per-kernel breakdown at the largest T of each pattern and
    implementation (ours; a peer's where profiled), one line each."""
    out = []
    stage_rows = [r for r in rows if r["stage"] is not None and r["ms"] is not None]
    for p, impl in sorted({(r["pattern"], r["impl"]) for r in stage_rows}):
        mine = [r for r in stage_rows if r["pattern"] == p and r["impl"] == impl]
        t = max(r["T"] for r in mine)
        parts = [f"{r['stage']}={r['ms']:.3f}" for r in mine if r["T"] == t]
        out.append(f"{p} {impl} T={t} ms/call: " + " ".join(parts))
    return "\n".join(out)


def format_cold(rows: list) -> str:
    out = []
    for r in rows:
        if r["impl"].startswith("cold_start"):
            val = f"{r['ms'] / 1e3:.2f} s" if r["ms"] is not None else f"ERR {str(r.get('error'))[:80]}"
            out.append(f"{r['impl']:<22} {r['pattern']} T={r['T']}: {val}")
    return "\n".join(out)


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None where matplotlib is
    missing (the plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def plot_rows(rows: list, path, title: str = "") -> bool:
    """Time vs T, log-log, one line per (impl, pass), one subplot per pattern.
    Returns False when matplotlib is missing or there is nothing to plot."""
    plt = pyplot()
    if plt is None:
        return False
    usable = [r for r in rows if r["stage"] is None and r["ms"] and r["pass"] in PASSES
              and not r["impl"].startswith("cold_start") and r["T"]]
    patterns = sorted({r["pattern"] for r in usable})
    if not patterns:
        return False
    impls = sorted({r["impl"] for r in usable})
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(1, len(patterns), figsize=(5.5 * len(patterns), 4.5), squeeze=False)
    for ax, p in zip(axes[0], patterns):
        series = {}
        for r in usable:
            if r["pattern"] == p:
                series.setdefault((r["impl"], r["pass"]), []).append((r["T"], r["ms"]))
        for (impl, ps), pts in sorted(series.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o" if ps == "fwd" else "s",
                    color=colors[impl], linestyle="-" if ps == "fwd" else "--", label=f"{impl} {ps}")
        finish_log_axes(ax, "sequence length T", "ms (median)", p)
    save_figure(plt, fig, path, title)
    return True


def finish_log_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """One panel of the benchmark plots: log2 x, log y, labels, grid, legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(plt, fig, path, title: str = "") -> None:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, header: dict, rows: list) -> None:
    """Atomic write of {header..., "rows": rows}."""
    doc = dict(header)
    doc["rows"] = rows
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def parse_lengths(text: str) -> tuple:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        out.append(int(part.rstrip("k")) * mult)
    return tuple(out)


# ================================================================== GPU part
class Budget:
    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) < 600 else text[:600] + " ..."


def bench_ms(fn, warmup: float, rep: float, grad_to_none=None) -> float:
    """Median milliseconds of fn over at least MIN_TIMED_RUNS timed calls
    after warm-up (do_bench alone times as many as fit in rep ms: one for a
    64k training pass or SDPA's 750 ms)."""
    from nsa_dsl.tune import wall_ms

    return wall_ms(fn, warmup, rep, MIN_TIMED_RUNS, grad_to_none=grad_to_none)


MIN_TIMED_RUNS = 5


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def measure_ceilings(warmup: float, rep: float) -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench_ms(lambda: torch.matmul(a, b), warmup, rep)
    a = b = None
    _cleanup()
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    cp_ms = bench_ms(lambda: dst.copy_(src), warmup, rep)
    moved = 2 * src.numel() * src.element_size()
    src = dst = None
    _cleanup()
    return {"matmul_flops_per_s": 2 * n ** 3 / (mm_ms * 1e-3), "copy_bytes_per_s": moved / (cp_ms * 1e-3),
            "matmul_ms": mm_ms, "copy_ms": cp_ms}


def nsa_inputs(pattern, T: int, requires_grad: bool = False, seed: int = 0, device: str = "cuda",
               dtype=torch.bfloat16) -> dict:
    """Random inputs (bf16 on the GPU unless told) in nsa_dsl's layout
    [B, T, H, D]; gates in [0, 1]. device/dtype let CPU tests drive the
    benchmark's own paths through the interpreter."""
    p = pattern
    g = torch.Generator(device=device).manual_seed(seed)
    hq, hkv, dqk, dv = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v

    def rnd(*shape, uniform=False):
        x = (torch.rand if uniform else torch.randn)(*shape, generator=g, device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    x = {"q": rnd(1, T, hq, dqk), "k": rnd(1, T, hkv, dqk), "v": rnd(1, T, hkv, dv)}
    combined = {b.value for b in p.combined_branches}
    for b in ("cmp", "slc", "swa"):
        x[f"g_{b}"] = rnd(1, T, hq, uniform=True) if b in combined else None
    if p.compress is not None and p.compress.pool.value == "mlp":
        tc = compressed_length(p, T)
        x["k_cmp"], x["v_cmp"] = rnd(1, tc, hkv, dqk), rnd(1, tc, hkv, dv)
    return x


def nsa_call(compiled, x: dict, **kw):
    return compiled(x["q"], x["k"], x["v"], x["g_cmp"], x["g_slc"], x["g_swa"],
                    k_cmp=x.get("k_cmp"), v_cmp=x.get("v_cmp"), **kw)


def _leaves(x: dict) -> list:
    return [t for t in x.values() if isinstance(t, torch.Tensor) and t.requires_grad]


_OTHER_ORDER: dict = {}  # (pattern, loop order) -> CompiledPattern


def run_other_loop_order(compiled, pattern, T: int, cfg, ceil: dict, emit, fl: dict, note) -> None:
    """The forward with the selection loop order the plan did not choose, as
    impl "nsa_dsl_<order>", so both orders and the choice are on record.
    A tuned call's other order runs the same tuned record (its settings for
    that order's kernel included, where the tuner measured them) with only
    the order changed: an untuned row beside a tuned one compared tiles,
    not orders (paper128 at 64k: 59.9 ms group-centric untuned, 41.2 tuned)."""
    import nsa_dsl  # imported where used, as in the other GPU paths: main() imports it only locally

    runs = compiled.slc_fwd_at(T)
    if runs is None:
        return
    other = "block-centric" if runs == "group-centric" else "group-centric"
    impl = "nsa_dsl_" + other
    why = f"selection forward {other}; the plan runs {runs} at T={T}"
    config = {k: v for k, v in run_config(compiled, T).items() if k != "SLC_FWD_ORDER"}
    try:
        key = (pattern, other, tuple(sorted(config.items())))
        if key not in _OTHER_ORDER:  # compiled once per pattern and configuration, not per length
            _OTHER_ORDER[key] = nsa_dsl.compile(pattern, slc_fwd=other, overrides=config or None)
        alt = _OTHER_ORDER[key]
        x = nsa_inputs(pattern, T)
        fn = lambda: nsa_call(alt, x)  # noqa: E731
        fn()
        ms = bench_ms(fn, cfg.warmup, cfg.rep)
        row = make_row(pattern.name, T, impl, "fwd", ms, flops=fl["fwd"],
                       nbytes=io_bytes(pattern, T, "nsa_dsl", "fwd"), ceilings=ceil,
                       note=why + (f"; {note}" if note else ""))
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        row = make_row(pattern.name, T, impl, "fwd", ceilings=ceil, error=_short(e), note=why)
    row["loop_order"], row["config"] = other, config
    emit(row)
    x = fn = alt = None
    _cleanup()


def format_loop_orders(rows: list) -> str:
    """One line per (pattern, T): the forward with each selection loop order."""
    chosen = {(r["pattern"], r["T"]): r for r in rows
              if r["impl"] == "nsa_dsl" and r["pass"] == "fwd" and r["stage"] is None}
    lines = []
    for r in rows:
        if r["impl"].startswith("nsa_dsl_") and r["pass"] == "fwd" and r["stage"] is None:
            base = chosen.get((r["pattern"], r["T"]))
            lines.append(f"{r['pattern']} T={r['T']} fwd: plan's order {_fmt(base and base['ms'], '.3f')} ms,"
                         f" {r['impl'][len('nsa_dsl_'):]} {_fmt(r['ms'], '.3f')} ms ({r.get('note') or ''})")
    return "\n".join(lines)


def run_config(compiled, T: int) -> dict:
    """The tunable settings a call at length T runs with: the tuned record
    for T's bucket (compile(tuned=True)), {} for the plan's defaults."""
    return dict(compiled.overrides_for(T)) if hasattr(compiled, "overrides_for") else {}


def fused_output(compiled, T: int) -> bool:
    """Whether a forward without gradients at length T has the selection
    (slc_fwd, or the block-centric slot reduction) write the gated output
    itself (WRITE_FINAL), for a compiled or a tuned pattern."""
    target = compiled.variant(T) if hasattr(compiled, "variant") else compiled
    return bool(target.writes_final_output(T)) if hasattr(target, "writes_final_output") else False


def run_nsa(compiled, pattern, T: int, cfg, ceil: dict, emit) -> None:
    name = pattern.name
    config = run_config(compiled, T)
    loop_order = compiled.slc_fwd_at(T)
    fused = fused_output(compiled, T)
    base_emit = emit

    def emit(row):  # every nsa_dsl row records the configuration that ran
        row["config"] = config
        row["loop_order"] = loop_order
        row["fused_output"] = fused
        base_emit(row)

    fl = nsa_flops(pattern, T)
    note = None if fl["exact"] else "selection FLOPs are an upper bound (local=0)"
    # forward
    try:
        x = nsa_inputs(pattern, T)
        fn = lambda: nsa_call(compiled, x)  # noqa: E731
        fn()
        pk = peak_gb(fn)
        ms = bench_ms(fn, cfg.warmup, cfg.rep)
        emit(make_row(name, T, "nsa_dsl", "fwd", ms, flops=fl["fwd"], nbytes=io_bytes(pattern, T, "nsa_dsl", "fwd"),
                      peak_gb=pk, ceilings=ceil, note=note))
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        emit(make_row(name, T, "nsa_dsl", "fwd", ceilings=ceil, error=_short(e)))
    x = fn = None
    _cleanup()
    run_other_loop_order(compiled, pattern, T, cfg, ceil, base_emit, fl, note)
    # forward + backward: all inputs with gradients, else q, k, v only
    bwd_ok, bwd_fn, first_err = False, None, None
    for scope in ("all", "qkv"):
        try:
            x = nsa_inputs(pattern, T, requires_grad=(scope == "all"))
            if scope == "qkv":
                for key in ("q", "k", "v"):
                    x[key].requires_grad_(True)
            do = torch.randn(1, T, pattern.heads.q, pattern.dims.v, device="cuda", dtype=torch.bfloat16)
            leaves = _leaves(x)

            def fb(x=x, do=do, leaves=leaves):
                for t in leaves:  # no gradient accumulation kernels in the timing
                    t.grad = None
                nsa_call(compiled, x).backward(do)

            fb()
            pk = peak_gb(fb)
            ms = bench_ms(fb, cfg.warmup, cfg.rep, grad_to_none=leaves)
            nt = note if scope == "all" else ((note + "; ") if note else "") + \
                f"only q, k, v require grad (all inputs failed: {first_err})"
            emit(make_row(name, T, "nsa_dsl", "fwd+bwd", ms, flops=fl["fwd+bwd"],
                          nbytes=io_bytes(pattern, T, "nsa_dsl", "fwd+bwd"), peak_gb=pk, ceilings=ceil, note=nt))
            bwd_ok, bwd_fn = True, fb
            break
        except Exception as e:  # noqa: BLE001 - NotImplementedError, RuntimeError, OOM, compile errors
            if scope == "all":
                first_err = _short(e)[:200]
                print(f"  nsa_dsl fwd+bwd with all grads failed at T={T}: {first_err}", flush=True)
                x = do = None
                _cleanup()
                continue
            emit(make_row(name, T, "nsa_dsl", "fwd+bwd", ceilings=ceil, error=f"{first_err} | q,k,v only: {_short(e)}"))
    # per-kernel breakdown
    try:
        if bwd_fn is None:
            x = nsa_inputs(pattern, T)
            prof_fn = lambda: nsa_call(compiled, x)  # noqa: E731
        else:
            prof_fn = bwd_fn
        profile_stages(compiled, pattern, T, prof_fn, bwd_ok, fl, ceil, emit)
    except Exception as e:  # noqa: BLE001
        emit(make_row(name, T, "nsa_dsl", "fwd+bwd" if bwd_ok else "fwd", stage="profile", ceilings=ceil,
                      error=_short(e)))
    x = do = bwd_fn = prof_fn = None
    _cleanup()


def profile_stages(compiled, pattern, T: int, fn, with_bwd: bool, fl: dict, ceil: dict, emit, n_calls: int = 3) -> None:
    from nsa_dsl.profiling import kernel_events

    events = kernel_events(fn, n_calls)
    plan = compiled.plan
    stages, other_ms, others = group_kernel_times(events, plan.kernel_names, n_calls)
    if not stages:
        raise RuntimeError(f"profiler saw no kernel named after the plan {plan.kernel_names}; it saw "
                           f"{sorted(others)[:8]}")
    for kname, (pk, ms) in sorted(stages.items(), key=lambda kv: plan.kernel_names.index(kv[1][0])):
        direction = plan.kernel(pk).direction
        emit(make_row(pattern.name, T, "nsa_dsl", "bwd" if direction == "backward" else "fwd", ms,
                      flops=stage_flop_count(kname, pk, fl, plan.window_in_selection), ceilings=ceil, stage=kname))
    top = sorted(others.items(), key=lambda kv: -kv[1])[:4]
    emit(make_row(pattern.name, T, "nsa_dsl", "fwd+bwd" if with_bwd else "fwd", other_ms, ceilings=ceil,
                  stage="other", note="kernels outside the plan: " + ", ".join(f"{n[:60]}={m:.3f}" for n, m in top)))


def _sdpa_once(q, k, v, gqa: bool):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def run_sdpa(pattern, T: int, cfg, ceil: dict, emit) -> None:
    """Dense causal attention through SDPA's flash backend, [B, H, T, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p = pattern
    hq, hkv, dqk, dv = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v
    fl = dense_flops(p, T)
    variants = [("sdpa_flash", dv)]
    if dv != dqk:
        variants.append(("sdpa_flash_padv", dqk))
    for impl, dv_run in variants:
        note = None if impl == "sdpa_flash" else f"v zero-padded {dv}->{dqk} (flash needs equal head dims); o sliced"
        for pass_ in PASSES:
            try:
                g = torch.Generator(device="cuda").manual_seed(1)
                mk = lambda h, d: torch.randn(1, h, T, d, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa
                q, k, v = mk(hq, dqk), mk(hkv, dqk), mk(hkv, dv)
                if dv_run != dv:
                    v = torch.cat([v, torch.zeros(1, hkv, T, dv_run - dv, device="cuda", dtype=v.dtype)], -1)
                gqa, extra = True, None
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        _sdpa_once(q, k, v, True)
                    except RuntimeError as e:
                        reason = _short(e) + " | " + " | ".join(str(w.message)[:200] for w in caught)
                        if dv_run != dqk:
                            raise RuntimeError(reason) from None
                        # flash may accept GQA only with k, v expanded to HQ heads
                        k = k.repeat_interleave(hq // hkv, dim=1)
                        v = v.repeat_interleave(hq // hkv, dim=1)
                        _sdpa_once(q, k, v, False)
                        gqa, extra = False, f"k, v expanded to {hq} heads outside the timing ({reason[:150]})"
                leaves = []
                if pass_ == "fwd+bwd":
                    for t in (q, k, v):
                        t.requires_grad_(True)
                    leaves = [q, k, v]
                    do = torch.randn(1, hq, T, dv, device="cuda", dtype=torch.bfloat16)

                    def fn():
                        for t in leaves:
                            t.grad = None
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            o = _sdpa_once(q, k, v, gqa)
                        o[..., :dv].backward(do)
                else:
                    def fn():
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            return _sdpa_once(q, k, v, gqa)
                fn()
                pk = peak_gb(fn)
                ms = bench_ms(fn, cfg.warmup, cfg.rep, grad_to_none=leaves or None)
                nt = "; ".join(s for s in (note, extra) if s) or None
                emit(make_row(p.name, T, impl, pass_, ms, flops=pass_flops(fl, pass_),
                              nbytes=io_bytes(p, T, "dense", pass_), peak_gb=pk, ceilings=ceil, note=nt))
            except Exception as e:  # noqa: BLE001
                emit(make_row(p.name, T, impl, pass_, ceilings=ceil, error=_short(e), note=note))
            q = k = v = do = fn = leaves = None
            _cleanup()


def fla_expressible(pattern) -> Optional[str]:
    """None when fla-core's parallel_nsa computes this pattern's shape of
    NSA: compression by mean over non-overlapping blocks the size of the
    selection blocks, a group of 16+ query heads (a power of two), gates on
    every branch; else why not. (Its forced blocks are its own choice.)"""
    p = pattern
    if p.compress is None or p.select is None:
        return "fla's parallel_nsa needs both compression and selection"
    if not (p.compress.block == p.compress.stride == p.select.block):
        return (f"fla compresses non-overlapping blocks of the selection block size; the pattern has compress"
                f" block={p.compress.block} stride={p.compress.stride}, select block={p.select.block}")
    if p.compress.pool.value != "mean":
        return "fla's compression is a mean"
    g = p.group
    if g < 16 or g & (g - 1):
        return f"fla needs a power-of-two group of at least 16 query heads; G={g}"
    if p.window is not None and importlib.util.find_spec("flash_attn") is None:
        # measured on the H200: parallel_nsa calls flash_attn_func for its
        # window branch, None without the package
        return "fla's window branch needs the flash-attn package, not installed (bench_fla_like_nowindow.nsa has no window)"
    return None


def import_flash_nsa(folder: str) -> None:
    """Put flash_nsa (mdy666's Scalable-Flash-Native-Sparse-Attention,
    carried as source: benchmarks/fetch_flash_nsa.sh) on the path. Its
    utils import pkg_resources (setuptools) for one version comparison;
    where setuptools is absent a stand-in module gives that one function."""
    sys.path.insert(0, str(Path(folder).resolve()))
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import types

        def parse_version(text: str) -> tuple:
            return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())
        sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse_version)
    import flash_nsa  # noqa: F401  - fail here, not in every row


def flash_nsa_expressible(pattern) -> Optional[str]:
    """None when flash_nsa's training function computes this pattern's
    shape (all three branches, mean pooling, power-of-two head dims),
    else why not."""
    p = pattern
    if p.compress is None or p.select is None or p.window is None:
        return "flash_nsa computes all three branches"
    if p.compress.pool.value != "mean":
        return "flash_nsa's row pools by mean"
    if any(d & (d - 1) for d in (p.dims.qk, p.dims.v)):
        return "flash_nsa's combine needs power-of-two head dims"
    return None


def run_flash_nsa(pattern, T: int, cfg, ceil: dict, emit) -> None:
    """flash_nsa's training function (NSAFunction: its compression, scoring,
    selection and combine kernels) on the same shapes, forward and
    forward+backward, as impl "flash_nsa_nowindow". Its window branch
    calls flash-attn, which the GPU machine lacks: it is stubbed at zero
    cost (an empty output and statistics, zero gradients), which favours
    flash_nsa; its gate weights go through its own sigmoid."""
    impl = "flash_nsa_nowindow"
    why_not = flash_nsa_expressible(pattern)
    if why_not is not None:
        emit(make_row(pattern.name, T, impl, "fwd", error=f"skipped: {why_not}"))
        return
    p = pattern
    try:
        from flash_nsa import NSAHelper
        from flash_nsa.modules import megatron_level_nsa as fnsa
    except Exception as e:  # noqa: BLE001 - optional, carried source
        emit(make_row(p.name, T, impl, "fwd", error=f"skipped: flash_nsa not importable ({_short(e)})"))
        return
    NSAHelper.set_hyperparameters(kernel_size=p.compress.block, stride=p.compress.stride,
                                  block_size=p.select.block, window_size=p.window.size, top_n=p.select.top,
                                  num_init_blocks=p.select.initial, num_local_blocks=p.select.local)
    NSAHelper.set_cmp_kv_method("mean", "mean")

    def no_window(q, k, v, sm_scale=None, out=None, helper=None):
        o = out if out is not None else torch.empty(*q.shape[:2], v.shape[-1], device=q.device, dtype=q.dtype)
        return o.zero_(), torch.zeros(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)

    def no_window_grad(q, k, v, o, lse, do, sm_scale=None, helper=None):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    fnsa.swa_fwd, fnsa.swa_bwd = no_window, no_window_grad
    NSAHelper.init_cu_seqlens(torch.tensor([0, T], device="cuda", dtype=torch.int32))

    def setup(backward: bool):
        x = nsa_inputs(p, T, requires_grad=backward, seed=5)
        q, k, v = (x[n][0].detach().requires_grad_(backward) for n in ("q", "k", "v"))
        weight = torch.randn(T, p.heads.q, 3, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        do = torch.randn(T, p.heads.q, p.dims.v, device="cuda", dtype=torch.bfloat16) if backward else None
        return (lambda: fnsa.flash_nsa_varlen_func(q, k, v, weight, None, None)), [q, k, v, weight], do
    _time_peer_passes(p.name, T, impl, cfg, ceil, emit, setup, flops=nsa_flops(p, T),
                      note="flash_nsa NSAFunction (mdy666), window stubbed at zero cost (needs flash-attn)",
                      profile=True)


def _time_peer_passes(name: str, T: int, impl: str, cfg, ceil: dict, emit, setup, *, flops: dict, note: str,
                      profile: bool = False) -> None:
    """A peer's NSA function, timed forward and forward+backward like ours:
    setup(backward) returns (forward, leaves, do) on fresh inputs; each pass
    becomes a row, and so does a failure; profile: the training pass's
    kernels as stage rows too."""
    for pass_ in PASSES:
        forward = leaves = do = fn = None
        try:
            backward = pass_ == "fwd+bwd"
            forward, leaves, do = setup(backward)
            if backward:
                def fn():
                    for t in leaves:
                        t.grad = None
                    forward().backward(do)
            else:
                fn = forward
            fn()
            pk = peak_gb(fn)
            ms = bench_ms(fn, cfg.warmup, cfg.rep, grad_to_none=leaves if backward else None)
            emit(make_row(name, T, impl, pass_, ms, flops=flops[pass_], peak_gb=pk, ceilings=ceil, note=note))
            if profile and backward:
                _profile_peer(name, T, impl, fn, ceil, emit)
        except Exception as e:  # noqa: BLE001 - every failure becomes a row
            emit(make_row(name, T, impl, pass_, ceilings=ceil, error=_short(e)))
        forward = leaves = do = fn = None
        _cleanup()


def _profile_peer(name: str, T: int, impl: str, fn, ceil: dict, emit, n_calls: int = 3) -> None:
    """A peer's training pass kernel by kernel (device ms per call, as the
    profiler names them), beside our stage rows: which of its kernels does
    the work ours does, and in how long."""
    from nsa_dsl.profiling import kernel_events

    per_kernel: dict = {}
    for kernel, us in kernel_events(fn, n_calls):
        per_kernel[kernel] = per_kernel.get(kernel, 0.0) + us / 1e3 / n_calls
    for kernel, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
        emit(make_row(name, T, impl, "fwd+bwd", ms, ceilings=ceil, stage=kernel[:80]))


def run_fla(pattern, T: int, cfg, ceil: dict, emit) -> None:
    """fla-core's parallel_nsa (Triton; the 'best public NSA kernels') on the
    same shapes, forward and forward+backward, as impl "fla_parallel_nsa"."""
    why_not = fla_expressible(pattern)
    if why_not is not None:
        emit(make_row(pattern.name, T, "fla_parallel_nsa", "fwd", error=f"skipped: {why_not}"))
        return
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as e:  # noqa: BLE001 - optional dependency
        emit(make_row(pattern.name, T, "fla_parallel_nsa", "fwd", error=f"skipped: fla-core not importable ({_short(e)})"))
        return
    p = pattern
    window = p.window.size if p.window is not None else 0

    def setup(backward: bool):
        x = nsa_inputs(p, T, requires_grad=backward, seed=5)
        do = torch.randn(1, T, p.heads.q, p.dims.v, device="cuda", dtype=torch.bfloat16) if backward else None
        return (lambda: parallel_nsa(x["q"], x["k"], x["v"], x.get("g_cmp"), x.get("g_slc"), x.get("g_swa"),
                                     block_counts=p.select.top, block_size=p.select.block, window_size=window),
                _leaves(x), do)
    _time_peer_passes(p.name, T, "fla_parallel_nsa", cfg, ceil, emit, setup, flops=nsa_flops(p, T),
                      note="fla-core parallel_nsa: its own forced blocks and block scoring")


_FLEX = {}


def flex_compiled(dynamic):
    """One torch.compile'd flex_attention for the whole run."""
    key = repr(dynamic)
    if key not in _FLEX:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 512))
        _FLEX[key] = torch.compile(flex_attention, dynamic=dynamic)
    return _FLEX[key]


def make_block_mask(tables: tuple, mask_mod, T: int):
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx, full_num, full_idx = tables
    try:
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                        mask_mod=mask_mod, seq_lengths=(T, T))
    except TypeError:  # older torch: no seq_lengths (inferred from the tables)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                        mask_mod=mask_mod)


def static_block_mask(pattern, T: int, device="cuda") -> tuple:
    """(BlockMask, tile density) of the static approximation."""
    s, w = pattern.select, (pattern.window.size if pattern.window is not None else None)
    table = static_table(T, s.block, s.initial, s.local, device=device)
    tables = flex_block_tables(table, s.block, w)
    return make_block_mask(tables, static_mask_mod(s.block, s.initial, s.local, w), T), tile_density(tables)


def oracle_block_mask(pattern, T: int, indices: torch.Tensor) -> tuple:
    """(BlockMask, tile density) of nsa_dsl's selected blocks OR the window."""
    s, w = pattern.select, (pattern.window.size if pattern.window is not None else None)
    table = selection_table(indices, T, s.block)
    tables = flex_block_tables(table, s.block, w)
    density = tile_density(tables)
    tables = expand_heads(tables, pattern.group)
    return make_block_mask(tables, oracle_mask_mod(table, pattern.group, s.block, w), T), density


def run_flex(compiled, pattern, T: int, cfg, ceil: dict, emit, budget: Budget, oracle: bool = False) -> None:
    """FlexAttention rows of one pattern and length: the static block-mask
    approximation (the issue's baseline), or with oracle=True the block mask
    of nsa_dsl's own selections (larger tables, slower: the main loop runs
    every static row first, so the time budget never skips one for these)."""
    p = pattern
    s, w = p.select, (p.window.size if p.window is not None else None)
    hq, hkv, dqk, dv = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v
    static_note = "static approximation: window + initial + local blocks, no top-n"
    oracle_note = ("nsa_dsl's own selected blocks (one forward, return_indices=True) OR window, causal; "
                   "no compressed branch, no gates")
    variants = []
    if s is None:
        if not oracle:
            emit(make_row(p.name, T, "flex", "fwd", ceilings=ceil, error="pattern has no select branch"))
        return
    if not oracle:
        try:
            bm, density = static_block_mask(p, T)
            variants.append(("flex", bm, static_mask_flops(p, T),
                             f"{static_note}; visits {100 * density:.1f}% of the causal {FLEX_BLOCK}x{FLEX_BLOCK}"
                             " tiles"))
        except Exception as e:  # noqa: BLE001
            for ps in PASSES:
                emit(make_row(p.name, T, "flex", ps, ceilings=ceil, error=_short(e), note=static_note))
    elif (need := table_bytes(hkv, T, s.block) * 4 + 2 * 4 * hq * (T // FLEX_BLOCK) ** 2 * 4) > cfg.oracle_max_gb * 1e9:
        for ps in PASSES:
            emit(make_row(p.name, T, "flex_oracle_blocks", ps, ceilings=ceil,
                          note=f"skipped: mask tables need ~{need / 1e9:.1f} GB > --oracle-max-gb {cfg.oracle_max_gb}"))
    else:
        try:
            x = nsa_inputs(p, T, seed=2)
            with torch.no_grad():
                _, idx = nsa_call(compiled, x, return_indices=True)
            keys = oracle_keys(idx, s.block, w)
            bm, density = oracle_block_mask(p, T, idx)
            variants.append(("flex_oracle_blocks", bm, float(keys * p.group * _per_key(p)),
                             f"{oracle_note}; visits {100 * density:.1f}% of the causal {FLEX_BLOCK}x{FLEX_BLOCK}"
                             " tiles (the union of per-token selections over a tile's rows; random inputs)"))
            x = idx = None
        except Exception as e:  # noqa: BLE001
            for ps in PASSES:
                emit(make_row(p.name, T, "flex_oracle_blocks", ps, ceilings=ceil, error=_short(e), note=oracle_note))
        _cleanup()
    flex = flex_compiled(cfg.flex_dynamic)
    for impl, bm, fl, note in variants:
        for pass_ in PASSES:
            if budget.left() < cfg.flex_reserve_s:
                emit(make_row(p.name, T, impl, pass_, ceilings=ceil, note=note,
                              error=f"skipped: time budget ({budget.left():.0f} s left)"))
                continue
            try:
                g = torch.Generator(device="cuda").manual_seed(3)
                mk = lambda h, d: torch.randn(1, h, T, d, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa
                q, k, v = mk(hq, dqk), mk(hkv, dqk), mk(hkv, dv)
                leaves = []
                if pass_ == "fwd+bwd":
                    for t in (q, k, v):
                        t.requires_grad_(True)
                    leaves = [q, k, v]
                    do = torch.randn(1, hq, T, dv, device="cuda", dtype=torch.bfloat16)

                    def fn():
                        for t in leaves:
                            t.grad = None
                        flex(q, k, v, block_mask=bm, enable_gqa=True).backward(do)
                else:
                    def fn():
                        return flex(q, k, v, block_mask=bm, enable_gqa=True)
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                pk = peak_gb(fn)
                ms = bench_ms(fn, cfg.warmup, cfg.rep, grad_to_none=leaves or None)
                emit(make_row(p.name, T, impl, pass_, ms, flops=pass_flops(fl, pass_),
                              nbytes=io_bytes(p, T, "dense", pass_), peak_gb=pk, ceilings=ceil,
                              note=f"{note}; first call {first_s:.1f} s"))
            except Exception as e:  # noqa: BLE001
                emit(make_row(p.name, T, impl, pass_, ceilings=ceil, error=_short(e), note=note))
            q = k = v = do = fn = leaves = None
            _cleanup()


# ------------------------------------------------------------ cold start
def child_main(args) -> None:
    """Runs in a fresh process: time the first call with whatever caches the
    environment points at, and print one JSON line."""
    import nsa_dsl

    pattern = nsa_dsl.load(args.child_pattern)
    T = args.child_T
    torch.cuda.init()
    torch.ones(1, device="cuda").sum().item()
    result = {}
    if args.child == "nsa":
        x = nsa_inputs(pattern, T)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        compiled = nsa_dsl.compile(pattern)
        nsa_call(compiled, x)
        torch.cuda.synchronize()
        result["s"] = time.perf_counter() - t0
    else:
        hq, hkv, dqk, dv = pattern.heads.q, pattern.heads.kv, pattern.dims.qk, pattern.dims.v
        q = torch.randn(1, hq, T, dqk, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, T, dqk, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hkv, T, dv, device="cuda", dtype=torch.bfloat16)
        t0 = time.perf_counter()
        bm, _ = static_block_mask(pattern, T)
        torch.cuda.synchronize()
        result["mask_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        flex = flex_compiled(None)
        flex(q, k, v, block_mask=bm, enable_gqa=True)
        torch.cuda.synchronize()
        result["s"] = time.perf_counter() - t0
    print(COLD_MARK + json.dumps(result), flush=True)


def run_child(kind: str, pattern_path: str, T: int, env_dirs: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env.update(env_dirs)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-pattern", pattern_path,
           "--child-T", str(T)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(COLD_MARK):
            out = json.loads(line[len(COLD_MARK):])
            out["process_s"] = wall
            return out
    raise RuntimeError(f"child {kind} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")


def run_cold_start(pattern_path: str, pattern, T: int, cfg, emit) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nsa_bench_cold_"))
    nsa_env = {"NSA_DSL_CACHE_DIR": str(tmp / "nsa"), "TRITON_CACHE_DIR": str(tmp / "triton_nsa")}
    for impl, env in (("cold_start_nsa_cold", nsa_env), ("cold_start_nsa_warm", nsa_env),
                      ("cold_start_flex", {"TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
                                           "TRITON_CACHE_DIR": str(tmp / "triton_flex")})):
        kind = "flex" if impl == "cold_start_flex" else "nsa"
        if kind == "flex" and (not cfg.flex or pattern.select is None):
            continue
        try:
            res = run_child(kind, pattern_path, T, env, cfg.child_timeout_s)
            note = f"fresh process; whole process {res['process_s']:.1f} s"
            if kind == "nsa":
                note = ("nsa_dsl.compile(pattern) to the first finished forward, "
                        + ("empty" if impl.endswith("cold") else "warm") + " kernel caches; " + note)
            else:
                note = (f"first call of torch.compile(flex_attention) with the static block mask, empty inductor/"
                        f"triton caches (building the block mask took {res['mask_s']:.2f} s more); " + note)
            emit(make_row(pattern.name, T, impl, "fwd", res["s"] * 1e3, note=note))
        except Exception as e:  # noqa: BLE001
            emit(make_row(pattern.name, T, impl, "fwd", error=_short(e)))


# ------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="T=8192,16384, bench_paper128 only, fewer repeats")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--name", default="h200", help="output file stem: <out>/<name>.json and .png")
    ap.add_argument("--lengths", default=None, help="comma-separated T values (8192,16k,...)")
    ap.add_argument("--patterns", default=None, help="comma-separated .nsa files")
    ap.add_argument("--warmup", type=float, default=None, help="do_bench warmup in ms (default 25; quick 10)")
    ap.add_argument("--rep", type=float, default=None, help="do_bench rep in ms (default 100; quick 30)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="seconds after which remaining flex rows are skipped (nsa_dsl and sdpa rows always run)")
    ap.add_argument("--flex-reserve-s", type=float, default=45.0,
                    help="do not start a flex row with less than this many seconds of budget left")
    ap.add_argument("--oracle-max-gb", type=float, default=4.0,
                    help="skip flex_oracle_blocks when its mask tables would exceed this")
    ap.add_argument("--flex-dynamic", choices=("auto", "true", "false"), default="auto",
                    help="torch.compile(dynamic=...) for flex_attention (auto: None)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--fla", action="store_true",
                    help="also time fla-core's parallel_nsa where it can express the pattern (e.g."
                         " examples/bench_fla_like.nsa); a row says why when it cannot or is not installed")
    ap.add_argument("--flash-nsa", default="", metavar="FOLDER",
                    help="also time flash_nsa's training function from this folder of its source"
                         " (benchmarks/fetch_flash_nsa.sh: .flash_nsa), its window stubbed (it needs flash-attn)")
    ap.add_argument("--tuned", action="store_true",
                    help="run nsa_dsl with the configurations `nsa-dsl tune` recorded (rows list them)")
    ap.add_argument("--no-cold-start", action="store_true")
    ap.add_argument("--child-timeout-s", type=float, default=240.0)
    ap.add_argument("--child", choices=("nsa", "flex"), help=argparse.SUPPRESS)
    ap.add_argument("--child-pattern", help=argparse.SUPPRESS)
    ap.add_argument("--child-T", type=int, help=argparse.SUPPRESS)
    return ap


def resolve_config(args) -> argparse.Namespace:
    cfg = argparse.Namespace(**vars(args))
    cfg.lengths = parse_lengths(args.lengths) if args.lengths else (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    if args.patterns:
        cfg.patterns = tuple(s.strip() for s in args.patterns.split(",") if s.strip())
    else:
        cfg.patterns = DEFAULT_PATTERNS[:1] if args.quick else DEFAULT_PATTERNS
    cfg.warmup = args.warmup if args.warmup is not None else (10.0 if args.quick else 25.0)
    cfg.rep = args.rep if args.rep is not None else (30.0 if args.quick else 100.0)
    cfg.flex = not args.no_flex
    cfg.flex_dynamic = {"auto": None, "true": True, "false": False}[args.flex_dynamic]
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    cfg = resolve_config(args)
    if not torch.cuda.is_available():
        print("bench.py needs a CUDA GPU (the helpers are tested on CPU by tests/test_bench_helpers.py)")
        return 2
    import triton

    import nsa_dsl

    if cfg.flash_nsa:
        try:
            import_flash_nsa(cfg.flash_nsa)
        except Exception as e:  # noqa: BLE001 - its rows then say why
            print(f"flash_nsa: not importable from {cfg.flash_nsa}: {_short(e)}")
    budget = Budget(cfg.budget_s)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{cfg.name}.json", out_dir / f"{cfg.name}.png"
    rows: list = []
    header = {
        "schema": "nsa_dsl-bench/1",
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "nsa_dsl": getattr(nsa_dsl, "__version__", None),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {"quick": cfg.quick, "lengths": list(cfg.lengths), "patterns": list(cfg.patterns),
                 "warmup_ms": cfg.warmup, "rep_ms": cfg.rep, "budget_s": cfg.budget_s, "dtype": "bf16",
                 "batch": 1, "causal": True, "flex_dynamic": cfg.flex_dynamic},
        "conventions": CONVENTIONS,
    }

    def emit(row: dict) -> None:
        rows.append(row)
        ms = "-" if row["ms"] is None else f"{row['ms']:.3f} ms"
        err = f"  ERROR {row['error'][:160]}" if "error" in row else ""
        print(f"[{budget.elapsed():6.1f}s] {row['pattern']} T={row['T']} {row['impl']} {row['pass']}"
              f"{' ' + row['stage'] if row['stage'] else ''}: {ms}{err}", flush=True)
        attach_speedups(rows)
        write_json(json_path, header, rows)

    print(f"device {header['device']}, torch {header['torch']}, triton {header['triton']}", flush=True)
    ceil = measure_ceilings(cfg.warmup, cfg.rep)
    header.update(matmul_tflops=ceil["matmul_flops_per_s"] / 1e12, copy_tbps=ceil["copy_bytes_per_s"] / 1e12)
    print(f"ceilings: bf16 matmul {header['matmul_tflops']:.0f} TFLOP/s, copy {header['copy_tbps']:.2f} TB/s",
          flush=True)
    write_json(json_path, header, rows)

    patterns = []
    for path in cfg.patterns:
        try:
            pattern = nsa_dsl.load(REPO / path if not Path(path).is_absolute() else path)
            patterns.append((path, pattern))
        except Exception as e:  # noqa: BLE001
            emit(make_row(Path(path).stem, None, "load", "-", error=_short(e)))

    if not cfg.no_cold_start and patterns:
        path, pattern = patterns[0]
        run_cold_start(str(REPO / path) if not Path(path).is_absolute() else path, pattern, cfg.lengths[0], cfg, emit)

    compiled_by_name = {}
    for path, pattern in patterns:
        try:
            compiled = nsa_dsl.compile(pattern, tuned=cfg.tuned)
            compiled_by_name[pattern.name] = compiled
        except Exception as e:  # noqa: BLE001
            emit(make_row(pattern.name, None, "nsa_dsl", "fwd", error="compile: " + _short(e)))
            compiled = None
        for T in cfg.lengths:
            if compiled is not None:
                run_nsa(compiled, pattern, T, cfg, ceil, emit)
            run_sdpa(pattern, T, cfg, ceil, emit)
            if cfg.fla:
                run_fla(pattern, T, cfg, ceil, emit)
            if cfg.flash_nsa:
                run_flash_nsa(pattern, T, cfg, ceil, emit)

    if cfg.flex:
        for oracle in (False, True):  # every static row (the baseline) before any oracle row
            for path, pattern in patterns:
                compiled = compiled_by_name.get(pattern.name)
                for T in cfg.lengths:
                    try:
                        run_flex(compiled, pattern, T, cfg, ceil, emit, budget, oracle=oracle)
                    except Exception as e:  # noqa: BLE001
                        emit(make_row(pattern.name, T, "flex_oracle_blocks" if oracle else "flex", "fwd",
                                      error=_short(e)))
                    _cleanup()

    header["wall_s"] = budget.elapsed()
    attach_speedups(rows)
    write_json(json_path, header, rows)
    plotted = plot_rows(rows, png_path, title=f"{header['device']} bf16, batch 1, causal")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if plotted else " (no plot: matplotlib missing)"))
    errors = [r for r in rows if "error" in r and not str(r["error"]).startswith("skipped")]
    if errors:
        print(f"\n{len(errors)} error row(s):")
        for r in errors[:12]:
            print(f"  {r['pattern']} T={r['T']} {r['impl']} {r['pass']}: {str(r['error'])[:150]}")
    for block in (format_stages(rows), format_loop_orders(rows), format_cold(rows)):
        if block:
            print("\n" + block)
    print(f"\nceilings: {header['matmul_tflops']:.0f} TFLOP/s bf16 matmul, {header['copy_tbps']:.2f} TB/s copy;"
          f" run {header['wall_s']:.0f} s")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
