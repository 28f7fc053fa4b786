"""torch.compile on the GPU (issue 23): a small transformer stack whose
attention is NSAttention, eager against torch.compile(fullgraph=True,
inductor), bf16, one training step (forward, loss, backward) per timing.

Reports per pattern and length: graphs and graph breaks (dynamo explain),
the compile time of the first step, eager and compiled step milliseconds
(median, bench.bench_ms) and their ratio, and the compiled step's output and
gradient errors against eager's (relative Frobenius, as the tests measure).

    python benchmarks/bench_compile.py --out DIR [--lengths 8k,32k] [--pattern examples/X.nsa]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import nsa_dsl  # noqa: E402
from nsa_dsl.module import NSAttention  # noqa: E402
from bench import bench_ms, parse_lengths  # noqa: E402
from strategies import rel_error  # noqa: E402


class Block(nn.Module):
    """Pre-norm attention and MLP with residuals: what a compiler fuses
    around the attention ops (norms, activations, residual adds)."""

    def __init__(self, pattern, hidden: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(hidden)
        self.attn = NSAttention(pattern, hidden, backend="kernels")
        self.norm2 = nn.RMSNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden, bias=False)
        self.down = nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


def make_model(pattern, hidden: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(pattern, hidden) for _ in range(layers)]).cuda().to(torch.bfloat16)


def step_of(model, x):
    def step():
        out = model(x)
        out.float().square().mean().backward()
        return out
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pattern", default=os.path.join(os.path.dirname(__file__), "..", "examples",
                                                      "bench_paper128.nsa"))
    ap.add_argument("--lengths", default="8k,32k")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=25)
    ap.add_argument("--rep", type=float, default=200)
    args = ap.parse_args(argv)
    pattern = nsa_dsl.load(args.pattern)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for T in parse_lengths(args.lengths):
        torch._dynamo.reset()
        model = make_model(pattern, args.hidden, args.layers)
        for block in model:
            block.attn.compiled  # compiling the pattern is not part of the graph
        x = torch.randn(1, T, args.hidden, device="cuda", dtype=torch.bfloat16)
        explained = torch._dynamo.explain(model)(x)
        torch._dynamo.reset()
        names, params = zip(*model.named_parameters())
        params = list(params)

        def grads():
            return [p.grad.clone() for p in params]

        want = step_of(model, x)()
        want_grads = grads()
        model.zero_grad()
        compiled = torch.compile(model, fullgraph=True)
        start = time.perf_counter()
        got = step_of(compiled, x)()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        got_grads = grads()
        row = {"pattern": pattern.name, "T": T, "hidden": args.hidden, "layers": args.layers,
               "graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
               "break_reasons": [str(r.reason)[:200] for r in explained.break_reasons],
               "compile_s": round(compile_s, 1), "out_err": rel_error(got, want),
               "max_grad_err": max(rel_error(g, w) for g, w in zip(got_grads, want_grads)),
               "grad_errs": {n: rel_error(g, w) for n, g, w in zip(names, got_grads, want_grads)}}
        # the eager step, then the compiled one, alternated twice: the ratio
        # of medians from one warm machine (the second pair is reported)
        for _ in range(2):
            row["eager_ms"] = bench_ms(step_of(model, x), args.warmup, args.rep, grad_to_none=params)
            row["compiled_ms"] = bench_ms(step_of(compiled, x), args.warmup, args.rep, grad_to_none=params)
        row["compiled_over_eager"] = row["compiled_ms"] / row["eager_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model, compiled, x, want, got, want_grads, got_grads
        torch.cuda.empty_cache()
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__}
    (args.out / "compile_bench.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
