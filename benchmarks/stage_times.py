"""Per-kernel device time of a pattern's forward (optionally + backward)
under several configurations, in one process on one set of inputs: the
profiler's kernel times, so a change to one kernel is not lost in the noise
of the whole pass (the tuner's objective; ~4% at 8k on the H200).

    python benchmarks/stage_times.py examples/bench_paper128.nsa --length 8192 \
        --config '{}' --config '{"TOPK_TOKENS": 16}' [--tuned-base] [--backward] [--wall]

A config's "slc_fwd" entry ("group-centric" / "block-centric") is the
compile(slc_fwd=...) loop order, not an override. --wall also times the
whole pass (the median of at least 10 calls through triton.testing.do_bench:
host work, index building and launch gaps included).

--tuned-base: each --config is applied on top of the shipped tuned
configuration of that length's bucket (what `compile(tuned=True)` runs).
Prints one line per configuration: total and the per-kernel milliseconds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def pass_inputs(pattern_path: str, length: int, tuned_base: bool) -> tuple:
    """(pattern, the base overrides, random bf16 inputs on the GPU, an
    output gradient) for timing or profiling one pattern's pass at
    `length`: the base is the shipped tuned configuration of that length's
    bucket when tuned_base, else none. Shared with ncu_forward.py."""
    import torch

    import nsa_dsl
    from nsa_dsl.pipeline import device_kind
    from nsa_dsl.records import TunedPattern
    from nsa_dsl.verify import random_case

    pattern = nsa_dsl.load(pattern_path)
    base = TunedPattern(pattern, device_kind(), nsa_dsl.compile).overrides_for(length) if tuned_base else {}
    inputs = random_case(pattern, 1, length, torch.bfloat16, seed=length, device="cuda")
    do = torch.randn(*inputs["q"].shape[:3], pattern.dims.v, device="cuda", dtype=torch.bfloat16)
    return pattern, base, inputs, do


def main(argv=None) -> int:
    import torch

    import nsa_dsl
    from bench import group_kernel_times
    from nsa_dsl.profiling import kernel_events
    from nsa_dsl.tune import wall_ms

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pattern")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--config", action="append", default=[], help="JSON overrides (repeatable)")
    ap.add_argument("--tuned-base", action="store_true")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--wall", action="store_true")
    ap.add_argument("--others", type=int, default=0, metavar="N",
                    help="also list the N slowest kernels outside the plan (torch's index building, fills)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("stage_times: needs a CUDA GPU (profiler kernel times)", file=sys.stderr)
        return 2

    pattern, base, inputs, do = pass_inputs(args.pattern, args.length, args.tuned_base)
    for text in args.config or ["{}"]:
        config = json.loads(text)
        order = config.pop("slc_fwd", None)
        overrides = {**base, **config}
        compiled = nsa_dsl.compile(pattern, overrides=overrides or None, slc_fwd=order)
        leaves = {n: t.detach().requires_grad_(args.backward) for n, t in inputs.items()}

        def step():
            out = compiled(**leaves)
            if args.backward:
                for t in leaves.values():  # as a training step (and bench.py): no gradient accumulated
                    t.grad = None          # onto the last call's (a q-sized add, 1.2 ms at 64k)
                out.backward(do)

        events = kernel_events(step, args.calls, warmup=3)
        stages, other_ms, others = group_kernel_times(events, compiled.plan.kernel_names, args.calls)
        total = sum(ms for _, ms in stages.values()) + other_ms
        parts = " ".join(f"{name}={ms:.3f}" for name, (_, ms) in sorted(stages.items(), key=lambda kv: -kv[1][1]))
        wall = ""
        if args.wall:  # the median of at least 10 calls (do_bench alone times one call at 64k)
            wall = f" wall {wall_ms(step, warmup_ms=25, rep_ms=100, min_reps=10):.3f} ms"
        print(f"T={args.length} {text}: total {total:.3f} ms{wall} | {parts} other={other_ms:.3f}", flush=True)
        for name, ms in sorted(others.items(), key=lambda kv: -kv[1])[:args.others]:
            print(f"    other {ms:.3f} ms  {name[:150]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
