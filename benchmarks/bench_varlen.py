"""Packed documents on the GPU (issue 21's benchmark), bf16, one run.

For each pattern and each mix of document lengths (random, summing to
--total), forward and forward+backward:
  nsa_dsl_packed      one call with cu_seqlens (max_seqlen given: no sync)
  nsa_dsl_per_doc     the loop a user writes without packing: one call per document
  nsa_dsl_fixed       the fixed-length path on a [B, L] batch of documents of
                      one length, L the mix's mean document length (a
                      multiple of 64), B = total // L: the time per unit of
                      attention work that packing the same sizes should keep
  nsa_dsl_whole       one sequence of the whole total (attends across the
                      documents: far more work per position, and per-position
                      costs spread over it; for reference)
  flex_doc_causal     FlexAttention, dense causal within each document
                      (a document-causal block mask: what a user picks instead)
  sdpa_flash_per_doc  SDPA's flash backend, one call per document
Rows carry `mix`, `documents` and the FLOPs of the work done (nsa_flops
summed over the documents, dense causal per document for the dense rows), so
ms per unit of work compares packed with fixed. Every nsa_dsl row runs
compile(pattern, tuned=True): the shipped configuration of each call's
length bucket (a packed call's is its longest document's). Writes
$OUT/varlen_bench.json and prints the table.

    python benchmarks/bench_varlen.py [--patterns examples/bench_paper128.nsa,...] [--total 65536] --out DIR
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402
import nsa_dsl  # noqa: E402
from nsa_dsl import varlen  # noqa: E402

MIXES = {"1k-4k": (1024, 4096), "4k-16k": (4096, 16384), "16k-64k": (16384, 65536)}
DEFAULT_PATTERNS = ("examples/bench_paper128.nsa", "examples/deepseek_nsa.nsa")


def document_lengths(total: int, lo: int, hi: int, seed: int) -> list:
    """Lengths drawn uniformly from [lo, hi] until they fill `total`; the
    last one is cut to fit (and joins the one before if the cut leaves less
    than lo, so no document is shorter than lo unless total is)."""
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(lo, hi), total - sum(lengths)))
    if len(lengths) > 1 and lengths[-1] < lo:
        last = lengths.pop()
        lengths[-1] += last
    return lengths


@functools.lru_cache(maxsize=None)
def _nsa_flops(pattern, T: int) -> dict:
    return bench.nsa_flops(pattern, T)  # a Python loop over T: once per length


def nsa_work(pattern, lengths, pass_: str) -> float:
    """FLOPs of the attention each document does alone (bench.nsa_flops)."""
    return float(sum(_nsa_flops(pattern, T)[pass_] for T in lengths))


def dense_work(pattern, lengths, pass_: str) -> float:
    return float(sum(bench.pass_flops(bench.dense_flops(pattern, T), pass_) for T in lengths))


def packed_tensors(pattern, lengths, seed: int = 0, device: str = "cuda", dtype=torch.bfloat16) -> tuple:
    """Packed [total, ...] inputs that require grad (gates of the combined
    branches, k_cmp/v_cmp in sequence order for pool=mlp) and cu_seqlens."""
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total = int(cu[-1])
    g = torch.Generator(device=device).manual_seed(seed)
    hq, hkv, dqk, dv = pattern.heads.q, pattern.heads.kv, pattern.dims.qk, pattern.dims.v

    def rnd(*shape, uniform=False):
        x = (torch.rand if uniform else torch.randn)(*shape, generator=g, device=device, dtype=dtype)
        return x.requires_grad_(True)

    x = {"q": rnd(total, hq, dqk), "k": rnd(total, hkv, dqk), "v": rnd(total, hkv, dv)}
    for b in pattern.combined_branches:
        x[f"g_{b.value}"] = rnd(total, hq, uniform=True)
    if pattern.compress is not None and pattern.compress.pool.value == "mlp":
        total_c = int(varlen.compressed_seqlens(pattern, cu)[-1])
        x["k_cmp"], x["v_cmp"] = rnd(total_c, hkv, dqk), rnd(total_c, hkv, dv)
    return x, cu


def document_rows(pattern, x: dict, cu) -> list:
    """Per non-empty document, (its position rows, {input: its rows of
    that input}): positions for q, k, v and the gates, the document's
    compressed tokens (varlen.compressed_seqlens) for pool=mlp's k_cmp and
    v_cmp."""
    bounds = cu.tolist()
    cmp_bounds = varlen.compressed_seqlens(pattern, cu).tolist() if "k_cmp" in x else None
    docs = []
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if a < b:
            rows = {n: slice(a, b) if n not in ("k_cmp", "v_cmp") else slice(cmp_bounds[s], cmp_bounds[s + 1])
                    for n in x}
            docs.append((slice(a, b), rows))
    return docs


def fixed_batch_shape(lengths) -> tuple:
    """(B, L) of the fixed-length batch that stands for a mix: L the mean
    document length rounded down to a multiple of 64 (at least 64), B as
    many as fit in the total."""
    total = sum(lengths)
    L = max(64, total // len(lengths) // 64 * 64)
    return max(1, total // L), L


def _fixed_inputs(pattern, x: dict, batch: int, length: int) -> dict:
    """Random inputs of the fixed-length path, [batch, length, ...], of the
    packed inputs' kinds (k_cmp, v_cmp of that length for pool=mlp)."""
    out = {}
    for n, t in x.items():
        rows = length
        if n in ("k_cmp", "v_cmp"):
            rows = (length - pattern.compress.block) // pattern.compress.stride + 1
        make = torch.rand if n.startswith("g_") else torch.randn
        out[n] = make(batch, rows, *t.shape[1:], device=t.device, dtype=t.dtype).requires_grad_(True)
    return out


def _nsa_calls(compiled, pattern, x: dict, cu, lengths) -> dict:
    """{impl: (forward function returning an output of [.., HQ, Dv], the
    leaves its backward reaches)}."""
    docs = document_rows(pattern, x, cu)
    longest = max(lengths)
    leaves = list(x.values())

    def packed():
        return compiled(**x, cu_seqlens=cu, max_seqlen=longest)

    def per_doc():
        return torch.cat([compiled(**{n: t[rows[n]][None] for n, t in x.items()})[0] for _, rows in docs])

    fixed = _fixed_inputs(pattern, x, *fixed_batch_shape(lengths))
    whole = _fixed_inputs(pattern, x, 1, sum(lengths))
    return {"nsa_dsl_packed": (packed, leaves), "nsa_dsl_per_doc": (per_doc, leaves),
            "nsa_dsl_fixed": (lambda: compiled(**fixed), list(fixed.values())),
            "nsa_dsl_whole": (lambda: compiled(**whole), list(whole.values()))}


def _dense_calls(pattern, x: dict, cu, lengths) -> dict:
    """FlexAttention with a document-causal mask and SDPA flash per document,
    on [1, H, total, D] views of the same q, k, v."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    dqk, dv = pattern.dims.qk, pattern.dims.v
    q, k, v = (x[n].transpose(0, 1)[None] for n in ("q", "k", "v"))
    total = q.shape[2]
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                  torch.tensor(lengths, device=q.device))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    mask = create_block_mask(document_causal, None, None, total, total, device=q.device)
    flex = bench.flex_compiled(None)
    bounds = cu.tolist()
    pad = dqk - dv  # flash wants equal head dims: v zero-padded, o sliced

    def sdpa_per_doc():
        outs = []
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for a, b in zip(bounds, bounds[1:]):
                vs = v[:, :, a:b]
                if pad:
                    vs = torch.cat([vs, vs.new_zeros(*vs.shape[:3], pad)], -1)
                o = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], vs, is_causal=True, enable_gqa=True)
                outs.append(o[..., :dv])
        return torch.cat(outs, 2)

    return {"flex_doc_causal": lambda: flex(q, k, v, block_mask=mask, enable_gqa=True),
            "sdpa_flash_per_doc": sdpa_per_doc}


def run(pattern, mix: str, total: int, ceil: dict, warmup: float, rep: float, seed: int) -> list:
    lengths = document_lengths(total, *MIXES[mix], seed=seed)
    compiled = nsa_dsl.compile(pattern, tuned=True)
    x, cu = packed_tensors(pattern, lengths, seed=seed)
    calls = _nsa_calls(compiled, pattern, x, cu, lengths)
    try:
        calls.update({n: (f, list(x.values())) for n, f in _dense_calls(pattern, x, cu, lengths).items()})
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is a row with its error
        calls["flex_doc_causal"] = calls["sdpa_flash_per_doc"] = (bench._short(e), [])
    work_lengths = {"nsa_dsl_fixed": [fixed_batch_shape(lengths)[1]] * fixed_batch_shape(lengths)[0],
                    "nsa_dsl_whole": [total]}
    rows = []
    for impl, (fn, leaves) in calls.items():
        for pass_ in bench.PASSES:
            dense_impl = not impl.startswith("nsa_dsl")
            work = (dense_work(pattern, lengths, pass_) if dense_impl
                    else nsa_work(pattern, work_lengths.get(impl, lengths), pass_))
            common = dict(flops=work, ceilings=ceil)
            if isinstance(fn, str):
                rows.append(bench.make_row(pattern.name, total, impl, pass_, error=fn, **common))
                continue
            try:
                if pass_ == "fwd":
                    with torch.no_grad():
                        fn()
                        ms = bench.bench_ms(fn, warmup, rep)
                        peak = bench.peak_gb(fn)
                else:
                    out = fn()
                    do = torch.randn_like(out)
                    step = lambda: fn().backward(do)  # noqa: E731
                    ms = bench.bench_ms(step, warmup, rep, grad_to_none=leaves)
                    peak = bench.peak_gb(step)
                rows.append(bench.make_row(pattern.name, total, impl, pass_, ms, peak_gb=peak, **common))
            except Exception as e:  # noqa: BLE001
                rows.append(bench.make_row(pattern.name, total, impl, pass_, error=bench._short(e), **common))
            for t in leaves:
                t.grad = None
            bench._cleanup()
    for row in rows:
        row.update(mix=mix, documents=len(lengths), fixed_batch=list(fixed_batch_shape(lengths)))
    return rows


IMPLS = ("nsa_dsl_packed", "nsa_dsl_per_doc", "nsa_dsl_fixed", "nsa_dsl_whole", "flex_doc_causal",
         "sdpa_flash_per_doc")


def summary(rows: list) -> str:
    """Per pattern, mix and pass: ms of each impl, the per-document loop
    against packed, and packed's ms per unit of work against the fixed
    batch's and the whole sequence's."""
    lines = ["pattern | mix | docs | pass | nsa packed | nsa per doc | nsa fixed [B, L] | nsa whole | flex doc"
             " | sdpa per doc | loop/packed | packed/fixed per work | packed/whole per work"]
    keys = sorted({(r["pattern"], r["mix"], r["documents"], r["pass"]) for r in rows}, key=lambda k: (k[0], k[1], k[3]))
    for p, mix, docs, pass_ in keys:
        by = {r["impl"]: r for r in rows if (r["pattern"], r["mix"], r["pass"]) == (p, mix, pass_)}
        ms = {i: by.get(i, {}).get("ms") for i in IMPLS}
        cells = [f"{m:.3f}" if m else "-" for m in ms.values()]
        packed, loop = ms["nsa_dsl_packed"], ms["nsa_dsl_per_doc"]
        ratio = f"{loop / packed:.2f}x" if packed and loop else "-"

        def per_work(other):
            if not (packed and ms[other]):
                return "-"
            return f"{(packed / by['nsa_dsl_packed']['flops']) / (ms[other] / by[other]['flops']):.2f}"
        lines.append(f"{p} | {mix} | {docs} | {pass_} | " + " | ".join(cells)
                     + f" | {ratio} | {per_work('nsa_dsl_fixed')} | {per_work('nsa_dsl_whole')}")
    return "\n".join(lines)


def plot(rows: list, path, title: str = "") -> bool:
    """Bars of ms per impl for each mix, one panel per (pattern, pass), log
    scale. False (no file) where matplotlib is missing or no row has a
    time."""
    plt = bench.pyplot()
    if plt is None:
        return False
    timed = [r for r in rows if r.get("ms")]
    panels = sorted({(r["pattern"], r["pass"]) for r in timed})
    if not panels:
        return False
    mixes = [m for m in MIXES if any(r["mix"] == m for r in timed)]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in timed)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    width = 0.8 / len(impls)
    for ax, (pattern, pass_) in zip(axes[0], panels):
        for n, impl in enumerate(impls):
            ms = {r["mix"]: r["ms"] for r in timed if (r["pattern"], r["pass"], r["impl"]) == (pattern, pass_, impl)}
            xs = [x + (n - (len(impls) - 1) / 2) * width for x in range(len(mixes))]
            ax.bar(xs, [ms.get(m, 0.0) for m in mixes], width, label=impl.replace("nsa_dsl_", "nsa "), color=f"C{n}")
        ax.set_xticks(range(len(mixes)), [f"{m} docs" for m in mixes])
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{pattern} {pass_}, documents summing to {timed[0]['T']}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def stages(pattern, mix: str, total: int, seed: int, calls: int = 5) -> None:
    """Per-kernel device times (profiler) of the packed call in both
    selection loop orders and of the per-document loop, forward and
    forward+backward, plus the slowest kernels outside the plan (index
    building): where packed time goes."""
    from bench import group_kernel_times
    from nsa_dsl.profiling import kernel_events

    lengths = document_lengths(total, *MIXES[mix], seed=seed)
    x, cu = packed_tensors(pattern, lengths, seed=seed)
    for order in ("group-centric", "block-centric"):
        compiled = nsa_dsl.compile(pattern, slc_fwd=order)
        for impl, (fn, leaves) in _nsa_calls(compiled, pattern, x, cu, lengths).items():
            if impl == "nsa_dsl_whole" or (order == "block-centric" and impl != "nsa_dsl_packed"):
                continue
            for pass_ in bench.PASSES:
                do = torch.randn_like(fn())

                def step():
                    if pass_ == "fwd":
                        with torch.no_grad():
                            fn()
                    else:
                        fn().backward(do)
                        for t in leaves:
                            t.grad = None
                events = kernel_events(step, calls, warmup=2)
                staged, other_ms, others = group_kernel_times(events, compiled.plan.kernel_names, calls)
                parts = " ".join(f"{n.split('_kernel')[0][:24]}={ms:.2f}"
                                 for n, (_, ms) in sorted(staged.items(), key=lambda kv: -kv[1][1]))
                total_ms = sum(ms for _, ms in staged.values()) + other_ms
                print(f"{pattern.name} {mix} {order[:5]} {impl[8:]} {pass_}: kernels {total_ms:.2f} ms | {parts}"
                      f" | other {other_ms:.2f}: " + ", ".join(f"{n[:40]}={ms:.2f}" for n, ms in
                                                            sorted(others.items(), key=lambda kv: -kv[1])[:4]),
                      flush=True)
                bench._cleanup()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS))
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--total", type=int, default=65536)
    ap.add_argument("--out", default="/tmp/varlen_bench")
    ap.add_argument("--warmup", type=float, default=25)
    ap.add_argument("--rep", type=float, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", action="store_true", help="per-kernel times instead of the benchmark")
    ap.add_argument("--plot-from", metavar="JSON", help="only draw the PNG of a varlen_bench.json beside it")
    args = ap.parse_args(argv)
    if args.plot_from:
        src = Path(args.plot_from)
        doc = json.loads(src.read_text())
        drawn = plot(doc["rows"], src.with_suffix(".png"), f"packed documents, {doc.get('device', '')}, bf16")
        print(f"wrote {src.with_suffix('.png')}" if drawn else "no plot (matplotlib missing, or no timed row)")
        return 0 if drawn else 1
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.stages:
        for path in args.patterns.split(","):
            for mix in args.mixes.split(","):
                stages(nsa_dsl.load(path), mix, args.total, args.seed)
        return 0
    ceil = bench.measure_ceilings(args.warmup, args.rep)
    rows = []
    for path in args.patterns.split(","):
        pattern = nsa_dsl.load(path)
        for mix in args.mixes.split(","):
            rows += run(pattern, mix, args.total, ceil, args.warmup, args.rep, args.seed)
            print("\n".join(summary([r for r in rows if r["pattern"] == pattern.name and r["mix"] == mix])
                            .splitlines()[1:]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench.write_json(out / "varlen_bench.json", {"device": torch.cuda.get_device_name(), "ceilings": ceil,
                                                  "total": args.total, "mixes": MIXES}, rows)
    plot(rows, out / "varlen_bench.png", f"packed documents, {torch.cuda.get_device_name()}, bf16")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
