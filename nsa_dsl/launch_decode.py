"""Launch of a decode step's kernels (the plan's _decode_kernels): one new
position per sequence, appended to the cache of its slot and attended
against it. No host synchronisation and shapes from the cache's
allocation: a step over a fixed set of slots can be captured in a CUDA
graph and replayed."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import triton
from triton.compiler.compiler import CompiledKernel

from .geometry import num_blocks
from .ir import Branch
from .plan import next_pow2

# dec_topk's programs per processor up to which it takes its top-n by the
# sorting network rather than rounds of reductions (topk_network)
TOPK_NETWORK_PROGRAMS_PER_SM = 2


@lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def cmp_splits(compiled, device: torch.device, batch: int, max_c: int) -> tuple:
    """(splits, tokens per split) of dec_cmp over max_c compressed tokens:
    enough (sequence, KV head, split) programs for DEC_CMP_PROGRAMS_PER_SM
    per processor, at most DEC_MAX_SPLITS (dec_reduce and dec_topk merge
    them in one tile), in whole tiles of DEC_CMP_N tokens."""
    kp = compiled.plan.kernel("dec_attend")
    tile = kp.const("DEC_CMP_N")
    tiles = max(1, -(-max_c // tile))
    per_row = batch * compiled.pattern.heads.kv
    wanted = kp.const("DEC_CMP_PROGRAMS_PER_SM") * _processors(device)
    splits = min(tiles, kp.const("DEC_MAX_SPLITS"), max(1, -(-wanted // per_row)))
    tokens = -(-tiles // splits) * tile
    return -(-max_c // tokens) if max_c else 1, tokens


def attend_span(compiled, device: torch.device, batch: int) -> tuple:
    """(span, programs per KV head) of dec_attend: the most items per
    program (a power of two) that still leaves DEC_ATTEND_PROGRAMS_PER_SM
    programs per processor: a batch of one spreads over every item, a large
    batch writes and merges fewer partials (their float32 accumulators
    were 30% of dec_attend's bytes at 64k x 29: NOTES v20)."""
    kp = compiled.plan.kernel("dec_attend")
    slc, win = kp.const("DEC_SLC_ITEMS"), kp.const("DEC_WIN_ITEMS")
    heads = batch * compiled.pattern.heads.kv
    least = kp.const("DEC_ATTEND_PROGRAMS_PER_SM") * _processors(device)
    span = 1
    while span < max(slc, win):
        wider = 2 * span
        if heads * (-(-slc // wider) + -(-win // wider)) < least:
            break
        span = wider
    return span, -(-slc // span) + -(-win // span)


def topk_chunks(compiled, max_len: int) -> tuple:
    """(chunk, chunks) of dec_topk: a power of two of selection blocks (at
    least 16, and at least top-n padded: a chunk's own top-n fills its
    candidates) so a cache of max_len holds about DEC_TOPK_CHUNKS of them
    (a chunk's own top-n a small part of the candidates the last merges)."""
    pattern = compiled.pattern
    blocks = num_blocks(max_len, pattern.select.block)
    per_head = compiled.plan.kernel("dec_attend").const("DEC_TOPK_CHUNKS")
    chunk = max(16, next_pow2(pattern.select.top), next_pow2(-(-blocks // per_head)))
    return chunk, -(-blocks // chunk)


def topk_network(compiled, device: torch.device, batch: int, chunks: int) -> bool:
    """Whether dec_topk takes its top-n by the sorting network (NETWORK):
    where its grid is small enough that each program's latency is the
    step's. Measured on an H100 (NOTES v22): the network cut dec_topk from
    13.8 to 9.8 us at 32k with one sequence (64 programs), the rounds were
    2 us faster at 64k with 29 (1856 programs)."""
    programs = batch * compiled.pattern.heads.kv * chunks
    return programs <= TOPK_NETWORK_PROGRAMS_PER_SM * _processors(device)


@lru_cache(maxsize=None)
def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_launch(compiled, device: torch.device, batch: int) -> dict:
    """The launch arguments of programmatic dependent launch (each decode
    kernel waits for the previous one inside: _dec_wait) for a step of
    `batch` sequences where the plan asks for it (batch <=
    DEC_PDL_MAX_BATCH: a small step's kernels are short and their launch
    gaps count; a large batch's longer kernels lost with it) and the device
    has it (sm_90 on); none elsewhere (the interpreter, older GPUs). PDL is
    always named: _launch's fast path replays a compiled kernel with every
    parameter after the positional ones taken from the keywords (a default
    left out was a KeyError there, on the GPU only)."""
    if batch <= compiled.plan.kernel("dec_attend").const("DEC_PDL_MAX_BATCH") and _hopper(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def _scratch(cache, b: int, compiled, device) -> dict:
    """The step's float32 partials and candidates for b sequences, made once
    per cache and batch (fixed shapes: eager steps and a captured one share
    them). Keyed by dec_attend's plan too: two compilations of one pattern
    with other decode constants (overrides) may share a cache, and their
    splits, spans and tiles size these buffers differently. By the plan's
    id, which the entry keeps alive (so no other plan takes it), since
    hashing the plan took 1.5 us of each eager step."""
    p, kp = compiled.pattern, compiled.plan.kernel("dec_attend")
    key = ("decode", b, id(kp))
    if key in cache.scratch:
        return cache.scratch[key]
    rows, hkv, vp = kp.const("DEC_ROWS"), p.heads.kv, compiled.plan.v_pad
    f32 = {"device": device, "dtype": torch.float32}
    s = {"span": attend_span(compiled, device, b), "plan": kp}
    span, items = s["span"]  # dec_attend's programs per KV head, one partial each
    s["splits_pad"] = 1  # the compressed merges' tile (set below where there are splits)
    # dec_reduce's merge tile: as large as the most partials of one branch, no larger
    s["parts_pad"] = next_pow2(max(-(-kp.const("DEC_SLC_ITEMS") // span), -(-kp.const("DEC_WIN_ITEMS") // span), 1))
    s["part_m"] = torch.empty(b * hkv * items * rows, **f32)
    s["part_l"] = torch.empty_like(s["part_m"])
    s["part_acc"] = torch.empty(b * hkv * items * rows, vp, **f32)
    if p.compress is not None:
        splits, tokens = cmp_splits(compiled, device, b, cache.max_compressed)
        s["splits"], s["tokens"] = splits, tokens
        s["splits_pad"] = next_pow2(splits)
        s["cmp_m"] = torch.empty(b * hkv * splits * rows, **f32)
        s["cmp_l"] = torch.empty_like(s["cmp_m"])
        s["cmp_acc"] = torch.empty(b * hkv * splits * rows, vp, **f32)
        if kp.const("DEC_SCORES") and kp.const("DEC_BLOCK_SUMS"):  # block sums and their tiles' maxima
            tiles = -(-cache.max_compressed // kp.const("DEC_CMP_N"))
            s["sum_blocks"], s["tiles"] = max(1, tiles * kp.const("DEC_CMP_N") // kp.const("R")), max(1, tiles)
            s["sums"] = torch.empty(b * hkv * kp.const("SUM_PLANES") * rows * s["sum_blocks"], **f32)
            s["sums_m"] = torch.empty(b * hkv * rows * s["tiles"], **f32)
        elif kp.const("DEC_SCORES"):  # each visible token's raw score, [b*HKV, DEC_ROWS, max_c]
            s["sum_blocks"], s["tiles"] = max(1, cache.max_compressed), 1
            s["sums"] = torch.empty(b * hkv * rows * s["sum_blocks"], **f32)
            s["sums_m"] = s["cmp_m"]
        else:
            s["sums"] = s["sums_m"] = s["cmp_m"]
            s["sum_blocks"] = s["tiles"] = 1
    if p.select is not None:  # dec_select's blocks, [b, HKV, TOP_PAD]
        s["idx"] = torch.empty(b, hkv, kp.const("TOP_PAD"), device=device, dtype=torch.int32)
    if kp.const("DEC_SCORES"):
        chunk, chunks = topk_chunks(compiled, cache.max_len)
        s["chunk"], s["chunks"] = chunk, chunks
        s["network"] = topk_network(compiled, device, b, chunks)
        # (the network's candidates: slc_topk's int64 keys, which carry the block)
        s["cand_key"] = torch.empty(b * hkv * chunks * kp.const("TOP_PAD"), device=device,
                                    dtype=torch.int64 if s["network"] else torch.float32)
        s["cand_idx"] = torch.empty(b * hkv * chunks * kp.const("TOP_PAD"), device=device, dtype=torch.int32)
        s["count"] = torch.zeros(b * hkv, device=device, dtype=torch.int32)  # dec_topk's chunks done, per head
    cache.scratch[key] = s
    return s


def _launch(s: dict, fn, grid: tuple, *args, **kwargs) -> None:
    """fn[grid](*args, **kwargs). The first time through Triton's JIT, which
    binds and specialises every argument and finds the compiled kernel (the
    larger part of a small step's host time: NOTES v19); after that straight
    through that compiled kernel's launcher, for as long as the arguments
    specialise the same way (the key: each tensor's dtype and 16-byte
    alignment, each int's value, the constexprs). Scratch s keeps them."""
    key = (fn, grid) + tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else
                             a if isinstance(a, (int, bool)) else None for a in args) + tuple(kwargs.items())
    known = s.setdefault("kernels", {}).get(key)
    if known is None:
        kernel = fn[grid](*args, **kwargs)
        if isinstance(kernel, CompiledKernel):  # (the interpreter compiles nothing)
            tail = [kwargs[p.name] for p in fn.params[len(args):]]
            s["kernels"][key] = (kernel, tail)
        return
    kernel, tail = known
    device = triton.runtime.driver.active.get_current_device()
    stream = triton.runtime.driver.active.get_current_stream(device)
    values = (*args, *tail)
    kernel.run(*grid, *(1,) * (3 - len(grid)), stream, kernel.function, kernel.packed_metadata,
               kernel.launch_metadata(grid, stream, *values), triton.knobs.runtime.launch_enter_hook,
               triton.knobs.runtime.launch_exit_hook, *values)


def decode_step(compiled, cache, rows: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                gates: dict, scale_log2: float, *, k_swa=None, v_swa=None, k_cmp=None, v_cmp=None,
                want_indices: bool = False) -> tuple:
    """One decode step in the plan's kernels: append k, v ([b, 1, HKV, D];
    k_swa, v_swa into the window's own cache; pool=mlp: k_cmp, v_cmp the
    candidate tokens [b, 1, HKV, D]) to the slots `rows` (int64 on the
    device) and attend q [b, 1, HQ, Dqk] there. Returns (o [b, 1, HQ, Dv],
    indices [b, 1, HKV, top] ascending and -1 padded, or None unless
    want_indices). The inputs are validated (incremental.validate_step)."""
    p, kp, mod = compiled.pattern, compiled.plan.kernel("dec_attend"), compiled.module
    b = q.shape[0]
    HQ, HKV, DV = p.heads.q, p.heads.kv, p.dims.v
    dev = q.device
    s = _scratch(cache, b, compiled, dev)
    pdl = pdl_launch(compiled, dev, b)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    has_kw = cache.k_swa is not None
    kw, vw = (cache.k_swa, cache.v_swa) if has_kw else (cache.k, cache.v)
    kc, vc = (cache.k_cmp, cache.v_cmp) if p.compress is not None else (cache.k, cache.v)
    candidates = p.compress is not None and not cache.pools_itself
    k_new_w = k_swa.contiguous() if has_kw else k
    v_new_w = v_swa.contiguous() if has_kw else v
    kc_new = k_cmp.contiguous() if candidates else k
    vc_new = v_cmp.contiguous() if candidates else v
    max_c = cache.max_compressed
    # the keys' and values' layout (kv_cache): block table, page size, pages per slot
    layout = (cache.block_table, cache.page_size, cache.block_table.shape[1])
    _launch(s, mod.dec_append, (b,),
            k, v, k_new_w, v_new_w, kc_new, vc_new, cache.k, cache.v, kw, vw, kc, vc, rows, cache.lengths, *layout,
            max_c, HAS_KW=has_kw, CANDIDATES=candidates, PAGED=cache.paged, num_warps=kp.num_warps, num_stages=1,
            **pdl)
    if p.compress is not None:
        _launch(s, mod.dec_cmp, (b * HKV, s["splits"]),
                q, kc, vc, rows, cache.lengths, s["sums"], s["sums_m"], s["cmp_m"], s["cmp_l"], s["cmp_acc"],
                scale_log2, max_c, s["tokens"], s["sum_blocks"], s["tiles"], num_warps=kp.num_warps,
                num_stages=kp.const("DEC_CMP_STAGES"), **pdl)
    ranked = kp.const("DEC_SCORES")
    if ranked:
        _launch(s, mod.dec_topk, (b * HKV, s["chunks"]),
                s["sums"], s["sums_m"], s["cmp_m"], s["cmp_l"], rows, cache.lengths, s["cand_key"], s["cand_idx"],
                s["count"], s["idx"], s["sum_blocks"], s["tiles"], s["tokens"], s["splits"], CHUNK=s["chunk"],
                NC_PAD=next_pow2(s["chunks"]),
                SPLITS_PAD=s["splits_pad"], NETWORK=s["network"], num_warps=kp.warps_for("dec_topk"), num_stages=1,
                **pdl)
    elif p.select is not None:  # the static selection's blocks
        _launch(s, mod.dec_select, (b * HKV,), s["part_m"], s["idx"], rows, cache.lengths, s["idx"], 1,
                NC_PAD=1, CHUNK=16, num_warps=1, num_stages=1, **pdl)
    span, programs = s["span"]
    _launch(s, mod.dec_attend, (b * HKV, programs),
            q, cache.k, cache.v, kw, vw, s.get("idx", s["part_m"]), rows, cache.lengths, s["part_m"], s["part_l"],
            s["part_acc"], scale_log2, *layout, SPAN=span, PAGED=cache.paged, num_warps=kp.num_warps,
            num_stages=kp.num_stages, **pdl)
    o = torch.empty(b, 1, HQ, DV, device=dev, dtype=q.dtype)
    gate = {br: gates.get(br) for br in (Branch.CMP, Branch.SLC, Branch.SWA)}
    ptrs = [g.contiguous() if g is not None else s["part_m"] for g in gate.values()]
    cmp_parts = (s["cmp_m"], s["cmp_l"], s["cmp_acc"]) if p.compress is not None else \
        (s["part_m"], s["part_l"], s["part_acc"])
    _launch(s, mod.dec_reduce, (b * HKV, compiled.plan.v_pad // kp.const("DEC_RED_D")),
            s["part_m"], s["part_l"], s["part_acc"], *cmp_parts, rows, cache.lengths, *ptrs, o,
            s.get("tokens", 1), s.get("splits", 1),
            HAS_G_CMP=gate[Branch.CMP] is not None, HAS_G_SLC=gate[Branch.SLC] is not None,
            HAS_G_SWA=gate[Branch.SWA] is not None, SPAN=span,
            PARTS_PAD=s["parts_pad"], SPLITS_PAD=s["splits_pad"], num_warps=kp.warps_for("dec_reduce"),
            num_stages=1, **pdl)
    want = want_indices and p.select is not None
    return o, (s["idx"][:, None, :, :p.select.top].clone() if want else None)
