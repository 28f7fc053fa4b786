"""The main job: compile a pattern file and run it, forward and backward,
checked against the dense reference.

    python examples/run_example.py [examples/deepseek_nsa.nsa] [--length T]

On a machine with a CUDA GPU the kernels are compiled and run in bf16,
checked at T = 2048 and timed at T = 8192. Without one they run through
Triton's interpreter on the CPU, in float32, at a small size (T = 64 and, for speed, the pattern's heads
and head dims as written: pick a small pattern, e.g. examples/window_only.nsa,
for a quick look).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must be set before triton is imported (nsa_dsl imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nsa_dsl  # noqa: E402
from nsa_dsl.verify import gradient_floors, random_case, rel_error  # noqa: E402


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", default=os.path.join(here, "deepseek_nsa.nsa"))
    parser.add_argument("--name", help="pattern name when the file holds several")
    parser.add_argument("--length", type=int, default=8192 if ON_GPU else 64, help="the length timed (GPU)")
    parser.add_argument("--check-length", type=int, default=2048,
                        help="the length checked against the float64 reference, forward and backward (at most --length)")
    args = parser.parse_args()

    pattern = nsa_dsl.load(args.file, name=args.name)
    plan = nsa_dsl.check(pattern)
    print(plan.explain())
    start = time.time()
    compiled = nsa_dsl.compile(pattern)
    print(f"\ncompiled {pattern.name} in {time.time() - start:.2f} s -> {compiled.source_path}")

    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    # The float64 reference's autograd graph grows as T^2 x heads (the paper's
    # 64 heads at 8k: 72 GB), so correctness is checked at a length that fits
    # any GPU, and the speed is measured at --length.
    check_length = min(args.length, args.check_length)
    inputs = random_case(pattern, 1, check_length, dtype, seed=0, device=device)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    start = time.time()
    out = compiled(**leaves, return_indices=pattern.select is not None)
    o, indices = out if isinstance(out, tuple) else (out, None)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    o.backward(do)
    if ON_GPU:
        torch.cuda.synchronize()
    print(f"first forward+backward at T={check_length} ({str(dtype)[6:]}, {device}): {time.time() - start:.2f} s")

    ref_in = {n: t.detach().double().requires_grad_(True) for n, t in inputs.items()}
    extra = {"indices": indices} if indices is not None else {}
    ref = nsa_dsl.reference(pattern, **ref_in, **extra, query_chunk=1024)
    ref.backward(do.double())
    err = rel_error(o, ref)
    floors = gradient_floors(pattern, inputs, do, extra)  # gradients that are 0 by cancellation: NSA_MATH.md
    grad_err = max(rel_error(leaves[n].grad, ref_in[n].grad, floors[n]) for n in leaves if ref_in[n].grad is not None)
    tol = {torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    print(f"relative error vs float64 reference at T={check_length}: output {err:.2e}, worst gradient {grad_err:.2e}"
          f" (tolerance {tol:.0e})")
    if ON_GPU:
        import triton.testing

        timed = random_case(pattern, 1, args.length, dtype, seed=2, device=device)
        ms = triton.testing.do_bench(lambda: compiled(**timed), warmup=25, rep=100, return_mode="median")
        print(f"forward median {ms:.3f} ms at T={args.length}")
    ok = err < tol and grad_err < tol
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
