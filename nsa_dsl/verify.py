"""Property-test a user's pattern: the generated kernels against the dense
reference on shapes and inputs drawn by hypothesis (`nsa-dsl verify`).

Compiled on a GPU when there is one, through Triton's interpreter otherwise
(TRITON_INTERPRET=1 must then be set before triton is imported; the CLI does
that). The interpreter's bf16 dot multiplies bit patterns (triton issue
11584), so bf16 is only drawn on a GPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .geometry import compressed_end, compressed_length, num_blocks
from .ir import Branch, DType, Pattern, Pool
from .pipeline import compile as compile_pattern
from .reference import compress_mean, overlap_weights, reference, term_sizes

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
_TORCH = {DType.BF16: torch.bfloat16, DType.FP16: torch.float16, DType.FP32: torch.float32}


def rel_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, floor), in float64 (NSA_MATH.md's metric).

    The floor is for values whose terms cancel: at length 1 the exact dq is 0
    (one visible key) while a kernel in fp16 leaves rounding noise of the size
    of the terms that cancelled, so a relative error alone would be noise
    over zero. See gradient_floor for the floor verify uses."""
    out, ref = out.double(), ref.double()
    denom = max(ref.norm().item(), floor)
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


# The floor is this fraction of the norm a gradient's terms have (see
# gradient_floors): small enough that it never decides a case whose exact
# gradient is of ordinary size (there ||ref|| is of the terms' size, within a
# factor of about 3), large enough that rounding noise over an exact 0 passes.
FLOOR_FRACTION = 0.1


def gradient_floors(pattern: Pattern, inputs: dict, do: torch.Tensor, extra: dict) -> dict:
    """Per input, the absolute floor of its gradient's error metric:
    FLOOR_FRACTION times the norm of its gradient with the softmax's
    cancellation left out (reference.term_sizes): NSA_MATH.md's "scale of
    the inputs' contribution". Where the exact gradient is 0 by that
    cancellation (dq, dk at length 1), the kernel's rounding noise is judged
    against the size of the terms that cancelled."""
    leaves = {n: t.detach().double().requires_grad_(True) for n, t in inputs.items()}
    with term_sizes():
        reference(pattern, **leaves, **extra).backward(do.double())
    return {n: FLOOR_FRACTION * t.grad.norm().item() for n, t in leaves.items() if t.grad is not None}


def random_case(pattern: Pattern, batch: int, length: int, dtype: torch.dtype, seed: int, device) -> dict:
    """Fresh random inputs (never zeros) as keyword arguments of compiled()."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, dqk, dv = pattern.heads.q, pattern.heads.kv, pattern.dims.qk, pattern.dims.v

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    args = {"q": rnd(batch, length, hq, dqk), "k": rnd(batch, length, hkv, dqk), "v": rnd(batch, length, hkv, dv)}
    for b in pattern.combined_branches:
        args[f"g_{b.value}"] = torch.rand(batch, length, hq, generator=gen).to(dtype=dtype, device=device)
    c = pattern.compress
    if c is not None and c.pool is Pool.MLP:
        tc = compressed_length(pattern, length)
        args["k_cmp"] = rnd(batch, tc, hkv, dqk)
        args["v_cmp"] = rnd(batch, tc, hkv, dv)
    return args


def selection_problems(pattern: Pattern, args: dict, indices: torch.Tensor, eps: float) -> list:
    """Every way the kernel's block indices break NSA_MATH.md's selection
    rule (scores recomputed in float64 from the same inputs): wrong count,
    missing forced block, future block, duplicates, misplaced -1, or an
    unchosen visible block outscoring a chosen free one by more than eps."""
    s, c = pattern.select, pattern.compress
    problems = []
    q = args["q"].double()
    B, T = q.shape[:2]
    G = pattern.group
    idx = indices.long().cpu()
    scores = None
    if not s.is_static:
        k_cmp = args["k_cmp"].double() if c.pool is Pool.MLP else compress_mean(args["k"].double(), c.block, c.stride)
        n_blocks = num_blocks(T, s.block)
        W = overlap_weights(c.block, c.stride, s.block, k_cmp.shape[1], n_blocks, dtype=torch.float64,
                            device=q.device)
        scale = args.get("scale") or 1.0 / math.sqrt(pattern.dims.qk)
        t = torch.arange(T, device=q.device)
        logits = torch.einsum("bthd,bchd->bthc", q, k_cmp.repeat_interleave(G, dim=2)) * scale
        tokens = torch.arange(k_cmp.shape[1], device=q.device)
        visible = compressed_end(tokens[None, :], c.block, c.stride) <= t[:, None]
        logits = logits.masked_fill(~visible[None, :, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows that see nothing: 0
        scores = (p @ W).view(B, T, pattern.heads.kv, G, n_blocks).sum(3).cpu()
    for b in range(B):
        for t in range(T):
            cur = t // s.block
            forced = {j for j in range(cur + 1) if j < s.initial or j > cur - s.local}
            for h in range(pattern.heads.kv):
                row = idx[b, t, h].tolist()
                chosen = [j for j in row if j >= 0]
                where = f"batch {b}, position {t}, kv head {h}: {row}"
                if row[len(chosen):] != [-1] * (len(row) - len(chosen)):
                    problems.append(f"-1 padding not at the end at {where}")
                if len(set(chosen)) != len(chosen):
                    problems.append(f"repeated block at {where}")
                if any(j > cur for j in chosen):
                    problems.append(f"future block at {where}")
                if len(set(chosen)) != min(s.top, cur + 1):
                    problems.append(f"{len(set(chosen))} blocks instead of {min(s.top, cur + 1)} at {where}")
                if not forced <= set(chosen):
                    problems.append(f"forced blocks {sorted(forced - set(chosen))} missing at {where}")
                if scores is not None:
                    free = [j for j in chosen if j not in forced and j <= cur]
                    left = [j for j in range(cur + 1) if j not in chosen]
                    if free and left:
                        gap = max(float(scores[b, t, h, j]) for j in left) - min(float(scores[b, t, h, j]) for j in free)
                        if gap > eps:
                            problems.append(f"an unchosen block outscores a chosen one by {gap:.3g} at {where}")
                if len(problems) > 5:
                    return problems
    return problems


@dataclass
class Report:
    cases: int = 0  # cases that passed
    failed: int = 0  # cases that failed, the shrinking's included
    worst: dict = field(default_factory=dict)  # name -> worst relative error / tolerance seen
    seconds: float = 0.0

    def note(self, name: str, error: float, tolerance: float) -> None:
        self.worst[name] = max(self.worst.get(name, 0.0), error / tolerance)

    def render(self) -> str:
        failed = f", {self.failed} failed (while shrinking)" if self.failed else ""
        lines = [f"{self.cases} case(s) passed{failed} in {self.seconds:.1f} s;"
                 " worst error seen as a fraction of its tolerance:"]
        for name in sorted(self.worst):
            lines.append(f"  {name:10s} {self.worst[name]:.3f}")
        return "\n".join(lines)


def check_case(compiled, pattern: Pattern, batch: int, length: int, dtype: torch.dtype, seed: int, device,
               grad: bool, report: Report) -> None:
    """One drawn case; raises AssertionError describing the first mismatch."""
    args = random_case(pattern, batch, length, dtype, seed, device)
    tol = TOLERANCE[dtype]
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in args.items()}
    has_select = pattern.select is not None
    if has_select:
        o, indices = compiled(**leaves, return_indices=True)
        problems = selection_problems(pattern, args, indices, eps=1e-4 if dtype == torch.float32 else 5e-2)
        assert not problems, "selection rule broken:\n  " + "\n  ".join(problems)
    else:
        o, indices = compiled(**leaves), None
    assert torch.isfinite(o).all(), "non-finite output"
    up = {n: t.detach().double().requires_grad_(grad) for n, t in args.items()}
    extra = {"indices": indices} if indices is not None else {}
    expected = reference(pattern, **up, **extra)
    err = rel_error(o, expected)
    report.note("output", err, tol)
    assert err < tol, f"output: relative error {err:.3e} >= {tol:.0e}"
    # Each combined branch alone: its gate 1, the others 0.
    combined = pattern.combined_branches
    if len(combined) > 1:
        for b in combined:
            solo = {n: t.detach() for n, t in args.items()}
            for other in combined:
                solo[f"g_{other.value}"] = torch.full_like(args[f"g_{other.value}"], 1.0 if other is b else 0.0)
            with torch.no_grad():
                got = compiled(**solo, **extra)
                want = reference(pattern, **{n: t.double() for n, t in solo.items()}, **extra)
            err = rel_error(got, want)
            report.note(b.value, err, tol)
            assert err < tol, f"branch {b.value}: relative error {err:.3e} >= {tol:.0e}"
    if grad:
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 1)).to(o.dtype).to(o.device)
        o.backward(do)
        expected.backward(do.double())
        floors = gradient_floors(pattern, args, do, extra)
        for name in leaves:
            if up[name].grad is None and leaves[name].grad is None:
                continue
            got = leaves[name].grad if leaves[name].grad is not None else torch.zeros_like(leaves[name])
            want = up[name].grad if up[name].grad is not None else torch.zeros_like(up[name])
            err = rel_error(got, want, floors.get(name, 0.0))
            report.note("d" + name, err, tol)
            assert err < tol, f"gradient of {name}: relative error {err:.3e} >= {tol:.0e}"
    report.cases += 1


def verify(pattern: Pattern, *, examples: int = 20, seed: int = 0, grad: bool = False, max_length=None,
           device=None, out=print, progress=None) -> bool:
    """Run `examples` drawn cases; print a report; True when all agree.
    On a failure hypothesis shrinks the case, which is printed.
    progress(n, examples), when given, is called as the n-th case starts
    (n > examples while hypothesis shrinks a failure)."""
    try:
        from hypothesis import HealthCheck, Phase, given, seed as fix_seed, settings, strategies as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("nsa-dsl verify needs hypothesis: pip install 'nsa-dsl[verify]'") from exc

    on_gpu = torch.cuda.is_available() and device != "cpu"
    device = "cuda" if on_gpu else "cpu"
    dtypes = [_TORCH[d] for d in pattern.allowed_dtypes if on_gpu or d is not DType.BF16]
    if not dtypes:
        out("bf16 is the only dtype this pattern allows, and the CPU interpreter cannot run bf16 dots"
            " (triton issue 11584): run verify on a GPU")
        return False
    if max_length is None:
        max_length = 2048 if on_gpu else 96
    compiled = compile_pattern(pattern)
    report = Report()
    failure = {}
    started = 0

    @fix_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=False, report_multiple_bugs=False,
              # No explain phase: it re-runs the failing case many times to annotate it.
              phases=[Phase.generate, Phase.shrink])
    @given(batch=st.integers(1, 2), length=st.integers(1, max_length), dtype=st.sampled_from(dtypes),
           case_seed=st.integers(0, 9999))
    def run(batch, length, dtype, case_seed):
        nonlocal started
        started += 1
        if progress is not None:
            progress(started, examples)
        try:
            check_case(compiled, pattern, batch, length, dtype, case_seed, device, grad, report)
        except AssertionError as exc:
            report.failed += 1
            failure.update(batch=batch, length=length, dtype=str(dtype).replace("torch.", ""), seed=case_seed,
                           reason=str(exc))
            raise

    start = time.time()
    ok = True
    try:
        run()
    except AssertionError:
        ok = False
    report.seconds = time.time() - start
    out(f"pattern {pattern.name} on {'GPU (compiled)' if on_gpu else 'CPU (Triton interpreter)'},"
        f" dtypes {', '.join(str(d).replace('torch.', '') for d in dtypes)}, lengths 1..{max_length},"
        f" {'forward and gradients' if grad else 'forward'}")
    out(report.render())
    if not ok:
        out(f"FAILED (shrunk case): batch={failure.get('batch')} length={failure.get('length')}"
            f" dtype={failure.get('dtype')} seed={failure.get('seed')}\n  {failure.get('reason')}")
    else:
        out("OK: kernels agree with the reference on every case")
    return ok
