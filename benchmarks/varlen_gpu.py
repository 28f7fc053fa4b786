"""Packed sequences on the GPU in bf16 (issue 21): a row of documents of
uneven lengths through compiled(..., cu_seqlens=...) against each document
alone through the fixed-length path (output and every gradient, relative
difference), and the packed forward+backward time against one fixed-length
sequence of the same total (do_bench median).

    python benchmarks/varlen_gpu.py [--pattern examples/bench_paper128.nsa] [--lengths 5000,0,1,3000,8383]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nsa_dsl  # noqa: E402
from nsa_dsl.verify import random_case  # noqa: E402


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pattern", default="examples/bench_paper128.nsa")
    ap.add_argument("--lengths", default="5000,0,1,3000,8383")
    args = ap.parse_args(argv)
    pattern = nsa_dsl.load(args.pattern)
    lengths = [int(x) for x in args.lengths.split(",")]
    total = sum(lengths)
    compiled = nsa_dsl.compile(pattern)
    case = random_case(pattern, 1, total, torch.bfloat16, seed=0, device="cuda")
    flat = {n: t[0] for n, t in case.items()}
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    leaves = {n: t.clone().requires_grad_(True) for n, t in flat.items()}
    o = compiled(**leaves, cu_seqlens=cu, max_seqlen=max(lengths))
    do = torch.randn_like(o)
    o.backward(do)
    worst = {}
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        alone = {n: t[a:b].unsqueeze(0).clone().requires_grad_(True) for n, t in flat.items()}
        o1 = compiled(**alone)
        o1.backward(do[a:b].unsqueeze(0))
        worst["o"] = max(worst.get("o", 0.0), rel(o[a:b], o1[0]))
        for n, t in alone.items():
            worst["d" + n] = max(worst.get("d" + n, 0.0), rel(leaves[n].grad[a:b], t.grad[0]))
    print(f"{pattern.name} packed {lengths} bf16 vs each alone, relative difference: "
          + " ".join(f"{k}={v:.2e}" for k, v in worst.items()), flush=True)

    def packed_step():
        out = compiled(**leaves, cu_seqlens=cu, max_seqlen=max(lengths))
        out.backward(do)

    fixed_leaves = {n: t.unsqueeze(0).clone().requires_grad_(True) for n, t in flat.items()}

    def fixed_step():
        out = compiled(**fixed_leaves)
        out.backward(do.unsqueeze(0))

    for name, fn in (("packed", packed_step), ("one sequence of the total", fixed_step)):
        ms = triton.testing.do_bench(fn, warmup=25, rep=200)
        print(f"  fwd+bwd {name}: {ms:.3f} ms (T total {total})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
