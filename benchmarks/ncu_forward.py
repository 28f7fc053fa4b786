"""One pattern's pass on random bf16 inputs, for Nsight Compute: warms up
(compiles every kernel), then marks one call as the profiled range, so

    ncu --profile-from-start off --section SpeedOfLight ... \
        python benchmarks/ncu_forward.py examples/bench_paper128.nsa --length 65536 --tuned-base

reports the kernels of that call alone (the device library's METHOD.md:
where a stage's time goes, not only how much). --config adds overrides
(JSON) on top; --backward profiles a training call.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    import torch

    import nsa_dsl
    from stage_times import pass_inputs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pattern")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--config", default="{}", help="JSON overrides")
    ap.add_argument("--tuned-base", action="store_true")
    ap.add_argument("--backward", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_forward: needs a CUDA GPU", file=sys.stderr)
        return 2
    pattern, base, inputs, do = pass_inputs(args.pattern, args.length, args.tuned_base)
    config = json.loads(args.config)
    order = config.pop("slc_fwd", None)
    compiled = nsa_dsl.compile(pattern, overrides={**base, **config} or None, slc_fwd=order)
    leaves = {n: t.detach().requires_grad_(args.backward) for n, t in inputs.items()}

    def step():
        out = compiled(**leaves)
        if args.backward:
            out.backward(do)

    step()  # compiles
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
