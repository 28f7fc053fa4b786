"""Where a decode step's time goes (GPU): for each pattern:context:batch,
the device time of every kernel one step launches (torch.profiler, per
step) and the host functions of the eager step by own time (cProfile).

    python benchmarks/profile_decode.py --specs examples/bench_paper128.nsa:65536:1,... [--top 20]
        [--variant NAME=VALUE[,NAME=VALUE] ...]

--plain N runs N eager steps of each spec with no profiler of its own,
for a profiler outside the process (ncu: its --launch-skip past the
first steps' compilation).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_decode  # noqa: E402
import nsa_dsl  # noqa: E402


def profile(path: str, context: int, batch: int, steps: int, top: int, overrides=None, plain: int = 0) -> None:
    pattern = nsa_dsl.load(path)
    compiled = nsa_dsl.compile(pattern, overrides=overrides)
    cache = bench_decode.filled_cache(compiled, batch, context)
    x = bench_decode.step_inputs(pattern, batch)
    step = bench_decode._rewinding(cache, lambda: compiled.decode(**x, cache=cache))
    with torch.no_grad():
        if plain:
            for _ in range(plain):
                step()
            torch.cuda.synchronize()
            return
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                t, n = kernels.get(e.name, (0.0, 0))
                kernels[e.name] = (t + e.device_time, n + 1)
        print(f"== {pattern.name} context {context} batch {batch}{' ' + str(overrides) if overrides else ''}:"
              " device us per step by kernel")
        for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0]):
            print(f"  {t / steps:9.2f} us  x{n / steps:4.1f}  {name[:90]}")
        print(f"  {sum(t for t, _ in kernels.values()) / steps:9.2f} us  all kernels")
        prof_host = cProfile.Profile()
        torch.cuda.synchronize()
        prof_host.enable()
        for _ in range(steps):
            step()
        prof_host.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof_host, stream=s).sort_stats("tottime").print_stats(top)
        lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
        print(f"-- host, {steps} eager steps (own time):")
        print("\n".join(lines[:top + 8]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="examples/bench_paper128.nsa:65536:1,examples/bench_paper128.nsa:65536:29,"
                                       "examples/bench_paper128.nsa:131072:1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE...]",
                    help="each spec profiled again with these plan overrides (same run); repeat the option"
                         " for several variants, each profiled on its own")
    ap.add_argument("--plain", type=int, default=0, metavar="N",
                    help="only N eager steps per spec, for a profiler outside the process (ncu)")
    args = ap.parse_args(argv)
    variants = [{n: int(v) for n, v in (item.split("=", 1) for item in arg.split(","))} for arg in args.variant]
    for spec in args.specs.split(","):
        path, context, batch = spec.rsplit(":", 2)
        for overrides in [None] + variants:
            profile(path, int(context), int(batch), args.steps, args.top, overrides, args.plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
