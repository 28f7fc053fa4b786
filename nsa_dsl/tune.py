"""Autotuning: the search for tile sizes, work splits, warps and stages per
pattern, per device and per sequence-length bucket (records.py keeps what
it finds and runs calls with it).

Tuning is a coordinate descent over the plan's kernels in launch order: for
each kernel, try its candidate settings with the others fixed, keep the
fastest whole pass (forward, or forward + backward). Every candidate
computes the same function (only plan.TUNABLE constants and launch settings
change), so tuning can never change results.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Optional

import torch

from . import pipeline
from .ir import Pattern
from .plan import Plan, apply_overrides
from .profiling import kernel_events
from .records import bucket_of, load_records, save_configs, without_plan_decisions
from .verify import TOLERANCE, random_case, rel_error


def _scaled(value: int, factors=(0.5, 1, 2), lo: int = 1, hi: int = 256) -> list:
    out = []
    for f in factors:
        v = int(value * f)
        if lo <= v <= hi and v not in out:
            out.append(v)
    return out


def launched(plan: Plan, kernel: str, T: int) -> bool:
    """Whether a default call of length T runs this kernel: of the two
    selection forward kernels only the plan's loop order at T is launched
    (tuning the other would time nothing)."""
    if plan.kernel(kernel).direction == "decode":  # a training pass never runs it
        return False
    if kernel == "slc_fwd":
        return plan.loop_order_at(T) != "block-centric"
    if kernel == "slc_fwd_bc":
        return plan.loop_order_at(T) == "block-centric"
    return True


def candidates(plan: Plan, kernel: str) -> list:
    """Override dicts worth trying for one kernel (the plan's own choice is
    always among them: {})."""
    k = plan.kernel(kernel)
    names = dict(k.constants)
    options = [{}]
    for warps in (4, 8):
        if warps != k.num_warps:
            options.append({f"{kernel}.num_warps": warps})
    tile_pairs = [("SWA_BLOCK_M", "SWA_BLOCK_N"), ("CMP_BLOCK_M", "CMP_BLOCK_N"),
                  ("SWA_BWD_BLOCK_M", "SWA_BWD_BLOCK_N"), ("CMP_BWD_BLOCK_M", "CMP_BWD_BLOCK_N")]
    for m_name, n_name in tile_pairs:
        if m_name in names:
            for m in _scaled(names[m_name], lo=16, hi=128):
                for n in _scaled(names[n_name], lo=16, hi=128):
                    if (m, n) != (names[m_name], names[n_name]):
                        options.append({m_name: m, n_name: n})
    # The forward flash loops: 128 query rows need two warpgroups (8 warps)
    # to hold their accumulator, so the tile and the warps move together
    # (coordinate descent tries each alone). paper128's cmp_fwd fits 128 x 64
    # on 8 warps for sm_90 without spilling (NOTES, "Moved from code comments
    # (issue 20)"; its 64 x 64 rate on 4 warps: NOTES v9).
    for m_name, n_name, fwd in (("CMP_BLOCK_M", "CMP_BLOCK_N", "cmp_fwd"), ("SWA_BLOCK_M", "SWA_BLOCK_N", "swa_fwd")):
        if kernel == fwd and m_name in names and names[m_name] < 128:
            for n in sorted({names[n_name], 64}):
                options.append({m_name: 128, n_name: n, f"{kernel}.num_warps": 8})
                options.append({m_name: 128, n_name: n, f"{kernel}.num_warps": 8, f"{kernel}.num_stages": 3})
    # The dK/dV kernel's key tile and warps move together: two warpgroups
    # hold twice the keys' dK, dV without spilling (paper128 on sm_90: 128
    # keys on 8 warps). Tried from any tuned configuration.
    for prefix in ("CMP", "SWA"):
        tile, warps_name = f"{prefix}_BWD_DKDV_BLOCK_N", f"{prefix}_BWD_DKDV_WARPS"
        if tile in names:
            for n in _scaled(names[tile], lo=16, hi=128):  # 0.5x, 1x, 2x
                for warps in (4, 8):
                    if (n, warps) != (names[tile], names[warps_name]):
                        options.append({tile: n, warps_name: warps})
        # the dq kernel's own pipelining: 1 or 2 stages
        stages = f"{prefix}_BWD_DQ_STAGES"
        if stages in names:
            options.append({stages: 2 if names[stages] == 1 else 1})
    for single, lo, hi in (("SLC_TOKENS", 1, 64), ("SLC_BWD_TOKENS", 1, 64), ("SLC_BWD_DQ_TOKENS", 1, 64), ("TOPK_BLOCK_M", 16, 64),
                           ("SLC_BWD_CHUNK", 256, 4096), ("BC_REDUCE_ROWS", 8, 128)):
        # (TOPK_BLOCK_M tiles the static selection only; a scoring's tile is TOPK_TOKENS)
        if single in names and not (single == "TOPK_BLOCK_M" and "TOPK_TOKENS" in names):
            for v in _scaled(names[single], factors=(0.25, 0.5, 2, 4), lo=lo, hi=hi):
                options.append({single: v})
    if "SLC_BWD_KEYS_MAJOR" in names:
        options.append({"SLC_BWD_KEYS_MAJOR": 1 - names["SLC_BWD_KEYS_MAJOR"]})
    if "SLC_FWD_WINDOW" in names:  # the window branch inside slc_fwd, or its own kernel
        options.append({"SLC_FWD_WINDOW": 1 - names["SLC_FWD_WINDOW"]})
        if not names["SLC_FWD_WINDOW"]:
            # folded, the window walks SWA_BLOCK_N keys a step for the tile's
            # rows: its best step need not be swa_fwd's (tried together).
            # Half only: larger steps run out of registers (paper128's tuned
            # slc_fwd with the fold spills at 128 keys on sm_90; NOTES,
            # "Moved from code comments (issue 20)").
            swa_n = plan.kernel("swa_fwd").const("SWA_BLOCK_N")
            for n in _scaled(swa_n, factors=(0.5,), lo=16, hi=128):
                options.append({"SLC_FWD_WINDOW": 1, "SWA_BLOCK_N": n})
    # (slc_bwd_dq's list loop prefetches by its own SLC_BWD_DQ_STAGES)
    for flag, stages in (("SLC_FWD_LIST", f"{kernel}.num_stages"), ("SLC_BWD_DQ_LIST", "SLC_BWD_DQ_STAGES")):
        if flag in names:
            options.append({flag: 1 - names[flag]})
            if names.get(stages, k.num_stages) == 1 and not names[flag]:
                # the list's point is a pipelined loop, which needs >= 2
                # stages: coordinate descent would not try both together
                options.append({flag: 1, stages: 2})
    if "TOPK_TOKENS" in names:
        # More positions per tile read each chunk of compressed keys for more
        # of them, but only 8 warps hold 128-256 rows of scores without
        # spilling: the two move together (coordinate descent would try
        # each alone). The scoring's paths follow the tile (the plan's).
        for tokens in _scaled(names["TOPK_TOKENS"], factors=(0.5, 2, 4), lo=1, hi=64):
            for warps in (4, 8):
                options.append({"TOPK_TOKENS": tokens, f"{kernel}.num_warps": warps})
    if "BC_FOLD_WINDOW" in names and kernel == "slc_fwd_bc":
        # the window in the slot reduction's programs, or swa_fwd apart
        options.append({"BC_FOLD_WINDOW": 1 - names["BC_FOLD_WINDOW"]})
        if names["BC_FOLD_WINDOW"]:
            # the forced blocks in the merge (fewer partials, a tile loop
            # more a program)
            options.append({"BC_MERGE_FORCED": 1 - names["BC_MERGE_FORCED"]})
        else:
            options.append({"BC_FOLD_WINDOW": 1, "BC_MERGE_FORCED": 1})
    if "BC_REDUCE_STAGES" in names:
        # the slot reduction's loop loads one slot's partials an iteration:
        # more stages keep more of them in flight (the reduction is bound by
        # latency, not bytes: NOTES v9)
        for stages in (1, 2, 3, 4):
            if stages != names["BC_REDUCE_STAGES"]:
                options.append({"BC_REDUCE_STAGES": stages})
    # Every kernel, backward included: with 2-3 stages Triton software-
    # pipelines the key/query tile loads of a counted loop (cp.async; the
    # sm90 report's "async" column), which a 1-stage kernel never gets.
    for stages in (1, 2, 3):
        if stages != k.num_stages:
            options.append({f"{kernel}.num_stages": stages})
    if kernel in ("slc_fwd", "slc_fwd_bc"):
        # the other loop order, measured instead of predicted (last: the
        # kernel's own settings are tuned first); once taken, the other
        # kernel is the launched one and is tuned in its turn
        current = plan.kernel("slc_fwd").const("SLC_FWD_ORDER")
        for order in (0, 1):
            if order != current:
                options.append({"SLC_FWD_ORDER": order})
    # The plan's rules decide what this pattern can take (e.g. the union
    # list's size limit, the scoring tile's bounds): not repeated here.
    return [o for o in options if _applies(plan, o)]


def _applies(plan: Plan, overrides: dict) -> bool:
    try:
        apply_overrides(plan, overrides)
    except ValueError:
        return False
    return True


def tune(pattern: Pattern, lengths, timer: Callable[[Plan, dict, int], float], *, device: str,
         backward: bool = True, log: Optional[Callable[[str], None]] = None,
         budget_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
         kernels: Optional[list] = None, from_tuned: bool = False, objective: Optional[str] = None) -> dict:
    """Coordinate descent per length bucket; returns {bucket: overrides} and
    records it with the timings after every length (so a run cut short keeps
    what it finished). `timer(plan, overrides, T)` returns the milliseconds
    of one pass of the pattern compiled with those overrides (inf for a
    candidate that fails to compile or run). With budget_s, no candidate
    starts after that many seconds: the length in progress keeps the best
    found so far, later lengths are not tuned. `kernels` (plan kernel names)
    tunes only those, in that order (the slowest stages first, say);
    default: every launched kernel in launch order. `from_tuned` starts each
    bucket from its recorded (or shipped) configuration instead of the
    plan's defaults, so a re-tune spends its time on what is new.
    `objective` says what the timer measures (recorded with each bucket
    timed here); buckets not re-tuned keep their records as they were."""
    plan = pipeline.check(pattern)
    order = list(plan.kernel_names) if kernels is None else list(kernels)
    unknown = [k for k in order if k not in plan.kernel_names]
    if unknown:
        raise ValueError(f"kernels: {', '.join(unknown)} not in the plan of {pattern.name!r}"
                         f" ({', '.join(plan.kernel_names)})")
    earlier = load_records(pattern, device)
    configs = {b: without_plan_decisions(plan, record["overrides"]) for b, record in earlier.items()}
    timings = {}
    start = clock()

    def out_of_time() -> bool:
        return budget_s is not None and clock() - start >= budget_s

    for length in lengths:
        if out_of_time():
            if log:
                log(f"T={length}: not tuned, time budget of {budget_s:.0f} s spent")
            continue
        bucket = bucket_of(length)
        best = dict(configs.get(bucket, {})) if from_tuned else {}
        try:
            apply_overrides(plan, best)
        except ValueError as exc:  # a record from an older plan
            if log:
                log(f"T={length}: recorded configuration no longer applies ({exc}); starting from the defaults")
            best = {}
        best_ms = timer(plan, best, length)
        for kernel in order:
            if plan.kernel(kernel).direction == "backward" and not backward:
                continue
            if not launched(apply_overrides(plan, best), kernel, length):  # best may set the loop order
                continue
            for option in candidates(plan, kernel)[1:]:
                if out_of_time():
                    break
                trial = {**best, **option}
                if trial == best:
                    continue  # already the configuration in hand
                try:
                    apply_overrides(plan, trial)
                except ValueError:
                    continue
                ms = timer(plan, trial, length)
                if log:
                    log(f"T={length} {kernel} {option}: {ms:.3f} ms (best {best_ms:.3f})")
                if ms < best_ms:
                    best, best_ms = trial, ms
        configs[bucket] = best
        timings[bucket] = best_ms
        save_configs(pattern, device, configs, timings, objective=objective, earlier=earlier)
    return configs


def config_result(compiled, args: dict, do=None) -> dict:
    """What one configuration computes on `args`: the output and, given the
    output gradient `do`, every input's gradient (float32 copies)."""
    if do is None:
        return {"out": compiled(**args).float()}
    leaves = {n: t.detach().requires_grad_(True) for n, t in args.items()}
    out = compiled(**leaves)
    out.backward(do)
    result = {"out": out.detach().float()}
    result.update({f"grad_{n}": t.grad.float() for n, t in leaves.items() if t.grad is not None})
    return result


def disagreement(reference: dict, got: dict, tolerance: float) -> Optional[str]:
    """None when every tensor of `got` is within relative error `tolerance`
    of `reference` (the plan's defaults) and finite; else which is not."""
    for name, ref in reference.items():
        if name not in got:
            return f"{name}: missing"
        if not bool(got[name].isfinite().all()):
            return f"{name}: not finite"
        err = rel_error(got[name], ref)
        if not err < tolerance:
            return f"{name}: relative error {err:.2e} against the defaults (tolerance {tolerance:.0e})"
    return None


def kernel_ms(step: Callable[[], None], calls: int = 10, warmup: int = 3) -> float:
    """Milliseconds of device kernel time per call of `step`: the sum of the
    CUDA kernels the profiler records over `calls` calls after `warmup`,
    host work and launch gaps left out. The tuner's other objective: a
    whole pass's run-to-run spread can hide one kernel's change (NOTES
    v8)."""
    device_us = [us for _, us in kernel_events(step, calls, warmup)]
    if not device_us:
        raise RuntimeError("kernel_ms: the profiler recorded no device kernel for the step")
    return sum(device_us) / 1e3 / calls


OBJECTIVES = ("wall", "kernels")


def wall_ms(step: Callable, warmup_ms: float = 10, rep_ms: float = 40, min_reps: int = 5, *, do_bench=None,
            **bench_kwargs) -> float:
    """Median wall milliseconds of step() through triton.testing.do_bench,
    over at least min_reps timed calls: do_bench times as many calls as fit
    in rep_ms, which for a call longer than rep_ms is one, and the tuner
    then chose between close candidates on one sample each (NOTES v10).
    bench_kwargs go to do_bench (grad_to_none, say)."""
    if do_bench is None:
        from triton.testing import do_bench
    first = float(do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median", **bench_kwargs))
    if first * min_reps <= rep_ms:
        return first
    return float(do_bench(step, warmup=0, rep=first * min_reps, return_mode="median", **bench_kwargs))


def gpu_timer(backward: bool = True, batch: int = 1, warmup_ms: float = 10, rep_ms: float = 40, *,
              device: str = "cuda", bench: Optional[Callable] = None, log: Optional[Callable[[str], None]] = None,
              objective: str = "wall"):
    """timer(plan, overrides, T) for tune(): median milliseconds of one
    forward (+ backward) pass on random bf16 inputs (never zeros), through
    triton.testing.do_bench. A candidate that fails to compile or run (too
    much shared memory, say) times as inf, and so does one whose output or
    gradients differ from the plan's defaults by more than the dtype's
    NSA_MATH.md tolerance: a fast wrong kernel (a miscompiled variant) is
    never recorded. objective "kernels" times the sum of the pass's kernels
    instead (kernel_ms: no host time, less noise). `device` and `bench`
    (step -> ms) let a CPU test drive it."""
    if objective not in OBJECTIVES:
        raise ValueError(f"gpu_timer: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if bench is None and objective == "kernels":
        bench = kernel_ms
    if bench is None:
        def bench(step):
            return wall_ms(step, warmup_ms, rep_ms)

    inputs, reference = {}, {}

    def timer(plan: Plan, overrides: dict, length: int) -> float:
        pattern = plan.pattern
        if length not in inputs:
            dtype = torch.bfloat16 if any(d.value == "bf16" for d in pattern.allowed_dtypes) else torch.float16
            if device != "cuda":
                dtype = torch.float32  # the interpreter's bf16 dot is wrong
            args = random_case(pattern, batch, length, dtype, seed=length, device=device)
            do = (torch.randn(*args["q"].shape[:3], pattern.dims.v, device=device, dtype=dtype,
                              generator=torch.Generator(device=device).manual_seed(length)) if backward else None)
            inputs[length] = (args, do)
        args, do = inputs[length]
        try:
            compiled = pipeline.compile(pattern, overrides=overrides or None)
            got = config_result(compiled, args, do)
            if length not in reference:
                reference[length] = got if not overrides else config_result(pipeline.compile(pattern), args, do)
            wrong = disagreement(reference[length], got, TOLERANCE[args["q"].dtype])
            if wrong is not None:
                # always said: a variant computing something else is a bug to report
                warnings.warn(f"nsa-dsl tune: {pattern.name} T={length} {overrides} rejected, {wrong}",
                              RuntimeWarning, stacklevel=2)
                return math.inf
            if backward:
                leaves = {n: t.detach().requires_grad_(True) for n, t in args.items()}

                def step():
                    for t in leaves.values():
                        t.grad = None
                    compiled(**leaves).backward(do)
            else:
                def step():
                    compiled(**args)
            return bench(step)
        except Exception as exc:  # noqa: BLE001 - any failing candidate is simply not chosen
            if log:
                log(f"T={length} {overrides}: failed, {type(exc).__name__}: {str(exc)[:200]}")
            return math.inf

    return timer
