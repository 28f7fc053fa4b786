"""Packed sequences on the GPU in bf16 (issue 21): a row of documents of
uneven lengths through compiled(..., cu_seqlens=...) against each document
alone through the fixed-length path (output and every gradient, relative
difference; pool=mlp's compressed keys packed in sequence order), and the
packed forward+backward time against one fixed-length sequence of the same
total (do_bench median).

    python benchmarks/varlen_gpu.py [--pattern examples/bench_paper128.nsa] [--lengths 5000,0,1,3000,8383]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nsa_dsl  # noqa: E402
from bench_varlen import document_rows, packed_tensors  # noqa: E402


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def compare(compiled, lengths, device="cuda", dtype=torch.bfloat16, seed: int = 0) -> tuple:
    """The packed call against each document alone: ({"o" or "d<input>":
    worst relative difference over the documents}, the packed inputs, cu,
    dO). An input whose gradient exists in one call only is an error."""
    pattern = compiled.pattern
    x, cu = packed_tensors(pattern, lengths, seed=seed, device=device, dtype=dtype)
    o = compiled(**x, cu_seqlens=cu, max_seqlen=max(lengths))
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    o.backward(do)
    worst = {}
    for s, (positions, rows) in enumerate(document_rows(pattern, x, cu)):
        alone = {n: t.detach()[rows[n]][None].clone().requires_grad_(True) for n, t in x.items()}
        o1 = compiled(**alone)
        o1.backward(do[positions][None])
        worst["o"] = max(worst.get("o", 0.0), rel(o.detach()[positions], o1.detach()[0]))
        for n, t in alone.items():
            if (x[n].grad is None) != (t.grad is None):
                raise AssertionError(f"d{n} exists in one call only (document {s})")
            if t.grad is not None:
                worst["d" + n] = max(worst.get("d" + n, 0.0), rel(x[n].grad[rows[n]], t.grad[0]))
    return worst, x, cu, do


def main(argv=None) -> int:
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--pattern", default="examples/bench_paper128.nsa")
    ap.add_argument("--lengths", default="5000,0,1,3000,8383")
    args = ap.parse_args(argv)
    pattern = nsa_dsl.load(args.pattern)
    lengths = [int(n) for n in args.lengths.split(",")]
    total = sum(lengths)
    compiled = nsa_dsl.compile(pattern)
    worst, x, cu, do = compare(compiled, lengths)
    shown = args.lengths if len(lengths) <= 8 else f"{len(lengths)} documents, {min(lengths)}..{max(lengths)}"
    print(f"{pattern.name} packed [{shown}] bf16 vs each alone, relative difference: "
          + " ".join(f"{k}={v:.2e}" for k, v in worst.items()), flush=True)

    def packed_step():
        compiled(**x, cu_seqlens=cu, max_seqlen=max(lengths)).backward(do)

    steps = [("packed", packed_step)]
    if "k_cmp" not in x:  # pool=mlp: the one sequence would need its own compressed keys
        fixed = {n: t.detach()[None].clone().requires_grad_(True) for n, t in x.items()}
        steps.append(("one sequence of the total", lambda: compiled(**fixed).backward(do[None])))
    for name, fn in steps:
        ms = triton.testing.do_bench(fn, warmup=25, rep=200)
        print(f"  fwd+bwd {name}: {ms:.3f} ms (T total {total})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
