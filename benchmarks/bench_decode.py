"""One decode step of one attention layer on the GPU (issue 22's
benchmark), bf16, one run: for each pattern, context and batch,

  nsa_dsl_eager        compiled.decode on the cache (the decode kernels)
  nsa_dsl_graph        that step captured in a CUDA graph, replayed
  sdpa_eager           SDPA (flash where it takes the call) of the one new
                       query against a contiguous dense [B, HKV, L, D] cache
  sdpa_graph           the same captured in a CUDA graph
  flash_nsa_eager      flash_nsa's nsa_decode (mdy666) on its paged cache,
  flash_nsa_graph      eager and graphed, where its fixed pattern is ours
                       (mean pooling, 32/16, 64 x top-16, window 512) and
                       its source is on the path (--flash-nsa DIR, made by
                       benchmarks/fetch_flash_nsa.sh)

  flex_eager           FlexAttention (compiled), dense, on SDPA's cache
  flex_graph
  nsa_dsl_variant_*    --variant NAME=VALUE: nsa_dsl with plan overrides
  nsa_dsl_paged_*      --paged PAGE_SIZE: nsa_dsl on a paged cache
  nsa_dsl_prefill_chunk, nsa_dsl_forward_whole
                       --prefill-chunk N: a piece of N positions after the
                       context through prefill, against the training
                       forward of context + N positions (batch 1)

at contexts --contexts (8k..128k) for batch 1 and for the batch whose KV
cache totals --cache-gb (flash_nsa's setting: 4 GB). Rows carry the bytes
an NSA step must read (nsa_step_bytes: compressed keys and values, the
selected blocks, the window) or a dense step reads (every cached key and
value), so floor_frac is the fraction of the memory roofline at the measured
copy bandwidth. The step's time covers what one decode call does: append
the new key and value, the compressed token it completes, and the
attention. Writes $OUT/decode_bench.json and prints the table.

    python benchmarks/bench_decode.py [--patterns examples/bench_paper128.nsa,...] [--flash-nsa DIR] --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402
import nsa_dsl  # noqa: E402
from nsa_dsl.geometry import num_compressed  # noqa: E402

DEFAULT_PATTERNS = ("examples/bench_paper128.nsa", "examples/deepseek_nsa.nsa")
DEFAULT_CONTEXTS = (8192, 16384, 32768, 65536, 131072)


def cache_batch(pattern, context: int, cache_gb: float) -> int:
    """The batch whose cached keys and values of `context` positions fill
    cache_gb (bf16), at least 1."""
    per_sequence = context * pattern.heads.kv * (pattern.dims.qk + pattern.dims.v) * 2
    return max(1, int(cache_gb * 1e9 // per_sequence))


def nsa_step_bytes(pattern, context: int, batch: int, element: int = 2) -> int:
    """What an NSA decode step must read per batch element and KV head, times
    both: the compressed keys and values seen, the selected blocks' keys and
    values (top-n of l' positions, at most the context) and the window's
    (w positions), plus the G queries read and outputs written. The floor:
    each byte read once."""
    p = pattern
    hkv, dqk, dv, g = p.heads.kv, p.dims.qk, p.dims.v, p.heads.q // p.heads.kv
    keys = 0
    if p.compress is not None:
        keys += num_compressed(context, p.compress.block, p.compress.stride)
    if p.select is not None:
        keys += min(p.select.top * p.select.block, context)
    if p.window is not None:
        keys += min(p.window.size, context)
    per_head = keys * (dqk + dv) * element + g * (dqk + dv) * element
    return batch * hkv * per_head


def dense_step_bytes(pattern, context: int, batch: int, element: int = 2) -> int:
    p = pattern
    g = p.heads.q // p.heads.kv
    return batch * p.heads.kv * (context * (p.dims.qk + p.dims.v) + g * (p.dims.qk + p.dims.v)) * element


def filled_cache(compiled, batch: int, context: int, *, device="cuda", dtype=torch.bfloat16, seed: int = 0,
                 page_size: Optional[int] = None, room: int = 64):
    """A cache of `batch` slots holding `context` random positions each (and
    random compressed tokens), room for `room` more; written directly, as a
    long prefill would leave it. page_size: paged, each slot's pages
    shuffled through the pool (as a serving engine's would lie)."""
    p = compiled.pattern
    layout = {}
    if page_size is not None:
        per_slot = -(-(context + room) // page_size)
        order = torch.randperm(batch * per_slot, generator=torch.Generator().manual_seed(seed))
        layout = {"page_size": page_size, "pages": batch * per_slot,
                  "block_table": order.view(batch, per_slot).to(device=device, dtype=torch.int32)}
    cache = compiled.new_cache(batch, context + room, device=device, dtype=dtype, **layout)
    g = torch.Generator(device=device).manual_seed(seed)
    cache.k.normal_(generator=g)  # (every row: positions past the context are never read)
    cache.v.normal_(generator=g)
    if cache.k_cmp is not None:
        n_c = num_compressed(context, p.compress.block, p.compress.stride)
        cache.k_cmp[:, :n_c].normal_(generator=g)
        cache.v_cmp[:, :n_c].normal_(generator=g)
    cache.lengths.fill_(context)
    cache.host_lengths = [context] * batch
    return cache


def step_inputs(pattern, batch: int, *, device="cuda", dtype=torch.bfloat16, seed: int = 1, positions: int = 1,
                candidates: bool = True) -> dict:
    """`positions` new positions per sequence: q, k, v and the gates
    (pool=mlp: one candidate token per position, unless candidates=False)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hq, hkv, dqk, dv = pattern.heads.q, pattern.heads.kv, pattern.dims.qk, pattern.dims.v
    m = positions
    x = {"q": torch.randn(batch, m, hq, dqk, generator=g, device=device, dtype=dtype),
         "k": torch.randn(batch, m, hkv, dqk, generator=g, device=device, dtype=dtype),
         "v": torch.randn(batch, m, hkv, dv, generator=g, device=device, dtype=dtype)}
    for b in pattern.combined_branches:
        x[f"g_{b.value}"] = torch.rand(batch, m, hq, generator=g, device=device, dtype=dtype)
    if candidates and pattern.compress is not None and pattern.compress.pool.value == "mlp":
        # the token each new position may complete (the module's phi makes it; not timed here)
        x["k_cmp"] = torch.randn(batch, m, hkv, dqk, generator=g, device=device, dtype=dtype)
        x["v_cmp"] = torch.randn(batch, m, hkv, dv, generator=g, device=device, dtype=dtype)
    return x


def run_prefill(pattern, context: int, chunk: int, ceil: dict, warmup: float, rep: float, *,
                device="cuda") -> list:
    """Chunked prefill against the training forward (batch 1): one piece of
    `chunk` positions after `context` cached ones through compiled.prefill
    (impl nsa_dsl_prefill_chunk, T = context), and the training forward
    without gradients of the whole context + chunk positions
    (nsa_dsl_forward_whole); the note gives each as positions per ms."""
    compiled = nsa_dsl.compile(pattern)
    rows = []
    cache = filled_cache(compiled, 1, context, device=device, room=chunk)
    piece = step_inputs(pattern, 1, device=device, positions=chunk, seed=3)
    whole = step_inputs(pattern, 1, device=device, positions=context + chunk, seed=4, candidates=False)
    if "k_cmp" in piece:  # the training forward takes pool=mlp's tokens whole: [1, Tc, HKV, D]
        c = pattern.compress
        n_c = num_compressed(context + chunk, c.block, c.stride)
        whole["k_cmp"], whole["v_cmp"] = whole["k"][:, :n_c].clone(), whole["v"][:, :n_c].clone()
    for impl, fn, positions in (
            ("nsa_dsl_prefill_chunk", _rewinding(cache, lambda: compiled.prefill(**piece, cache=cache)), chunk),
            ("nsa_dsl_forward_whole", lambda: compiled(**whole), context + chunk)):
        try:
            with torch.no_grad():
                ms = bench.bench_ms(fn, warmup, rep)
            rows.append(bench.make_row(pattern.name, context, impl, "prefill", ms, ceilings=ceil,
                                       note=f"{positions} positions, {positions / ms:.0f} per ms"))
        except Exception as e:  # noqa: BLE001 - a path that cannot run is a row with its error
            rows.append(bench.make_row(pattern.name, context, impl, "prefill", error=bench._short(e)))
    for row in rows:
        row["batch"], row["chunk"] = 1, chunk
    return rows


def flex_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, gqa: bool):
    """A dense decode step through FlexAttention (compiled once for the
    run, bench.flex_compiled): q [B, HQ, 1, D] against every cached key
    of k, v [B, HKV, L, D] (no mask: the new query sees the whole cache)."""
    flex = bench.flex_compiled(False)

    def step():
        return flex(q, k, v, enable_gqa=gqa)
    return step


def _rewinding(cache, fn):
    """fn, with the cache's lengths put back after each call, so timed
    repeats decode the same position (and never run out of room)."""
    lengths, host = cache.lengths.clone(), list(cache.host_lengths)

    def step():
        out = fn()
        cache.lengths.copy_(lengths)
        cache.host_lengths = list(host)
        return out
    return step


def _graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream): the
    replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


FLASH_NSA_PAGE = 128  # its decode asserts pages of a multiple of 128 positions


def flash_nsa_computes(pattern) -> bool:
    """flash_nsa's decode has one pattern built in: mean pooling of 32 every
    16, top-16 blocks of 64 with 1 initial and 2 local, a 512 window, equal
    head dims."""
    p = pattern
    return (p.compress is not None and p.select is not None and p.window is not None
            and p.compress.pool.value == "mean" and (p.compress.block, p.compress.stride) == (32, 16)
            and (p.select.block, p.select.top, p.select.initial, p.select.local) == (64, 16, 1, 2)
            and p.window.size == 512 and p.dims.qk == p.dims.v)


def flash_nsa_step(pattern, context: int, batch: int, *, device="cuda", dtype=torch.bfloat16):
    """flash_nsa's nsa_decode for `batch` sequences of `context` cached
    positions: one page pool holding each sequence's keys/values and then its
    compressed tokens (its layout), random contents; no compressed token is
    written in the timed step (slot -1: 15 of 16 steps at stride 16). The
    new position's key and value are taken as already cached (it appends
    outside this call), so its step does less than ours."""
    from flash_nsa.inference import nsa_decode

    hq, hkv, d = pattern.heads.q, pattern.heads.kv, pattern.dims.qk
    pages = -(-context // FLASH_NSA_PAGE)
    cmp_pages = -(-num_compressed(context, 32, 16) // FLASH_NSA_PAGE)
    pool = batch * (pages + cmp_pages)
    g = torch.Generator(device=device).manual_seed(2)
    k_pool = torch.randn(pool, FLASH_NSA_PAGE, hkv, d, generator=g, device=device, dtype=dtype)
    v_pool = torch.randn(pool, FLASH_NSA_PAGE, hkv, d, generator=g, device=device, dtype=dtype)
    first = torch.arange(batch, device=device, dtype=torch.int32)[:, None] * (pages + cmp_pages)
    tables = first + torch.arange(pages, device=device, dtype=torch.int32)
    cmp_tables = first + pages + torch.arange(cmp_pages, device=device, dtype=torch.int32)
    lengths = torch.full((batch,), context, device=device, dtype=torch.int32)
    no_new_token = torch.full((batch,), -1, device=device, dtype=torch.int32)
    q = torch.randn(batch, hq, d, generator=g, device=device, dtype=dtype)
    w = torch.randn(batch, hq, 3, generator=g, device=device, dtype=dtype)

    def step():
        return nsa_decode(q, k_pool, v_pool, w, context_lens=lengths, block_tables=tables,
                          cmp_slot_mapping=no_new_token, cmp_block_tables=cmp_tables,
                          fixed_y_maxlen=context // 16, fixed_num_slc_blocks=-(-context // 64),
                          kernel_size=32, stride=16, block_size=64, top_n=16, num_init_blocks=1,
                          num_local_blocks=2, window_size=512)
    return step, (k_pool, v_pool)


def run(pattern, context: int, batch: int, ceil: dict, warmup: float, rep: float, flash_nsa: bool = False,
        variant: Optional[dict] = None, page_size: Optional[int] = None) -> list:
    """The rows of one pattern, context and batch; with `variant` (plan
    overrides) nsa_dsl's steps once more compiled with it (impl
    nsa_dsl_variant_*): a variant awaiting its measurement, in the same run;
    with page_size once more on a paged cache (nsa_dsl_paged_*)."""
    x = step_inputs(pattern, batch)
    rows = []
    nsa_bytes, dense_bytes = nsa_step_bytes(pattern, context, batch), dense_step_bytes(pattern, context, batch)

    def timed(impl, fn, nbytes, note=None):
        try:
            with torch.no_grad():
                ms = bench.bench_ms(fn, warmup, rep)
            rows.append(bench.make_row(pattern.name, context, impl, "decode", ms, nbytes=nbytes, ceilings=ceil,
                                       note=note))
        except Exception as e:  # noqa: BLE001 - a path that cannot run is a row with its error
            rows.append(bench.make_row(pattern.name, context, impl, "decode", error=bench._short(e), nbytes=nbytes,
                                       ceilings=ceil))

    with torch.no_grad():
        setups = [("nsa_dsl", None, None)] + ([("nsa_dsl_variant", variant, None)] if variant else []) \
            + ([("nsa_dsl_paged", None, page_size)] if page_size else [])
        for name, overrides, paged in setups:
            compiled = nsa_dsl.compile(pattern, overrides=overrides)
            cache = filled_cache(compiled, batch, context, page_size=paged)
            note = (json.dumps(overrides) if overrides is not None
                    else f"pages of {paged} positions, shuffled" if paged else None)
            timed(f"{name}_eager", _rewinding(cache, lambda: compiled.decode(**x, cache=cache)), nsa_bytes, note)
            try:
                replay = _graphed(lambda: compiled.decode(**x, cache=cache))
                cache.host_lengths = [context] * batch  # capture counted the steps it recorded on the host
                timed(f"{name}_graph", _rewinding(cache, replay), nsa_bytes, note)
            except Exception as e:  # noqa: BLE001
                rows.append(bench.make_row(pattern.name, context, f"{name}_graph", "decode", error=bench._short(e)))
            del cache
            bench._cleanup()
        import torch.nn.functional as F

        hq, hkv = pattern.heads.q, pattern.heads.kv
        dv_pad = max(pattern.dims.qk, pattern.dims.v)  # flash wants equal head dims: values zero-padded
        k = torch.randn(batch, hkv, context, pattern.dims.qk, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, hkv, context, dv_pad, device="cuda", dtype=torch.bfloat16)
        q = x["q"].transpose(1, 2)  # [B, HQ, 1, D]

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
        timed("sdpa_eager", sdpa, dense_bytes, note="dense decode on a contiguous [B, HKV, L, D] cache")
        try:
            timed("sdpa_graph", _graphed(sdpa), dense_bytes)
        except Exception as e:  # noqa: BLE001
            rows.append(bench.make_row(pattern.name, context, "sdpa_graph", "decode", error=bench._short(e)))
        flex = flex_decode(q, k, v, gqa=hq != hkv)
        note = "FlexAttention (torch.compile'd, its decoding path for one query), dense, on the same cache"
        timed("flex_eager", flex, dense_bytes, note=note)
        try:
            timed("flex_graph", _graphed(flex), dense_bytes, note=note)
        except Exception as e:  # noqa: BLE001
            rows.append(bench.make_row(pattern.name, context, "flex_graph", "decode", error=bench._short(e)))
        del k, v
        bench._cleanup()
        if flash_nsa and flash_nsa_computes(pattern):
            try:
                step, pools = flash_nsa_step(pattern, context, batch)
                note = "its nsa_decode on its paged cache; the new key/value taken as cached, no compressed write"
                timed("flash_nsa_eager", step, nsa_bytes, note=note)
                timed("flash_nsa_graph", _graphed(step), nsa_bytes, note=note)
                del pools
            except Exception as e:  # noqa: BLE001
                rows.append(bench.make_row(pattern.name, context, "flash_nsa_eager", "decode", error=bench._short(e)))
            bench._cleanup()
    for row in rows:
        row["batch"] = batch
    return rows


def plot_decode(rows: list, path, title: str = "") -> bool:
    """ms per step against the context, log-log: one panel per (pattern,
    batch kind: one sequence, or the cache-sized batch), one line per
    implementation's decode rows. False where matplotlib is missing or there
    is nothing to plot."""
    plt = bench.pyplot()
    usable = [r for r in rows if r.get("pass") == "decode" and r.get("ms")]
    if plt is None or not usable:
        return False
    panels = sorted({(r["pattern"], r["batch"] == 1) for r in usable}, key=lambda k: (k[0], not k[1]))
    impls = sorted({r["impl"] for r in usable})
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (pattern, single) in zip(axes[0], panels):
        for impl in impls:
            pts = sorted((r["T"], r["ms"]) for r in usable
                         if r["impl"] == impl and r["pattern"] == pattern and (r["batch"] == 1) == single)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=colors[impl],
                        linestyle="--" if impl.endswith("_eager") else "-", label=impl)
        bench.finish_log_axes(ax, "context (positions)", "ms per step (median)",
                              f"{pattern}, " + ("one sequence" if single else "a batch of a 4 GB cache"))
    bench.save_figure(plt, fig, path, title)
    return True


def summary(rows: list) -> str:
    impls = ("nsa_dsl_eager", "nsa_dsl_graph", "sdpa_eager", "sdpa_graph", "flash_nsa_eager", "flash_nsa_graph",
             "nsa_dsl_variant_graph", "nsa_dsl_paged_graph", "flex_graph")
    lines = ["pattern | context | batch | " + " | ".join(impls) + " | sdpa/nsa eager | sdpa/nsa graph"
             " | flash_nsa/nsa graph | nsa graph floor frac"]
    errors = []
    for key in sorted({(r["pattern"], r["T"], r["batch"]) for r in rows}):
        by = {r["impl"]: r for r in rows if (r["pattern"], r["T"], r["batch"]) == key}
        ms = {i: by.get(i, {}).get("ms") for i in impls}
        cells = [f"{m:.4f}" if m else "-" for m in ms.values()]

        def ratio(a, b):
            return f"{ms[a] / ms[b]:.2f}x" if ms[a] and ms[b] else "-"
        frac = by.get("nsa_dsl_graph", {}).get("floor_frac")
        lines.append(f"{key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells)
                     + f" | {ratio('sdpa_eager', 'nsa_dsl_eager')} | {ratio('sdpa_graph', 'nsa_dsl_graph')}"
                     + f" | {ratio('flash_nsa_graph', 'nsa_dsl_graph')}"
                     + (f" | {frac:.2f}" if frac else " | -"))
        errors += [f"  {key} {r['impl']}: {r['error']}" for r in by.values() if r.get("error")]
    return "\n".join(lines + errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS))
    ap.add_argument("--contexts", default=",".join(str(c) for c in DEFAULT_CONTEXTS))
    ap.add_argument("--cache-gb", type=float, default=4.0)
    ap.add_argument("--flash-nsa", default="", help="a folder holding flash_nsa's package (its rows run if given)")
    ap.add_argument("--out", default="/tmp/decode_bench")
    ap.add_argument("--warmup", type=float, default=25)
    ap.add_argument("--rep", type=float, default=100)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE",
                    help="plan overrides for nsa_dsl_variant rows beside the default's")
    ap.add_argument("--paged", type=int, default=None, metavar="PAGE_SIZE",
                    help="nsa_dsl_paged rows: the default's steps on a paged cache of pages this large")
    ap.add_argument("--prefill-chunk", type=int, default=None, metavar="POSITIONS",
                    help="prefill rows too: a piece this long after each context, against the training forward")
    ap.add_argument("--plot", default="", metavar="JSON",
                    help="only draw JSON's rows (an earlier run's decode_bench.json) to the .png beside it")
    args = ap.parse_args(argv)
    if args.plot:
        data = json.loads(Path(args.plot).read_text())
        png = Path(args.plot).with_suffix(".png")
        drawn = plot_decode(data["rows"], png, f"{data.get('device', '')} bf16, one decode step")
        print(f"wrote {png}" if drawn else "no plot: matplotlib missing or no decode rows")
        return 0
    variant = {n: int(v) for n, v in (item.split("=", 1) for item in args.variant)} or None
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.flash_nsa:
        bench.import_flash_nsa(args.flash_nsa)
    ceil = bench.measure_ceilings(args.warmup, args.rep)
    rows = []
    for path in args.patterns.split(","):
        pattern = nsa_dsl.load(path)
        for context in (int(c) for c in args.contexts.split(",")):
            for batch in sorted({1, cache_batch(pattern, context, args.cache_gb)}):
                rows += run(pattern, context, batch, ceil, args.warmup, args.rep, flash_nsa=bool(args.flash_nsa),
                            variant=variant, page_size=args.paged)
                print(summary([r for r in rows if (r["pattern"], r["T"], r["batch"]) == (pattern.name, context,
                                                                                          batch)]).splitlines()[1],
                      flush=True)
            if args.prefill_chunk:
                prefill = run_prefill(pattern, context, args.prefill_chunk, ceil, args.warmup, args.rep)
                for r in prefill:
                    print(f"{pattern.name} {context} {r['impl']}: {r.get('ms')} ms, {r.get('note', r.get('error'))}",
                          flush=True)
                rows += prefill
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench.write_json(out / "decode_bench.json", {"device": torch.cuda.get_device_name(), "ceilings": ceil,
                                                  "cache_gb": args.cache_gb}, rows)
    drawn = plot_decode(rows, out / "decode_bench.png", f"{torch.cuda.get_device_name()} bf16, one decode step")
    print(summary(rows) + ("\nwrote decode_bench.png" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
