"""Compile every generated kernel of a pattern for Hopper (sm_90) on a
machine without a GPU, and report what ptxas made of it: registers, spills
(local-memory stack), shared memory, and whether the tensor cores are used
(HGMMA/HMMA in the SASS). Costs no device time.

    python benchmarks/sm90_report.py examples/bench_paper128.nsa [more.nsa ...] [--json out.json]

Triton's bundled LLVM and ptxas do the whole pipeline (TTIR -> TTGIR -> LLVM
-> PTX -> cubin); cuobjdump (also bundled) reads the resources back. The
pointer types follow the launchers (nsa_dsl/launch_forward.py, launch_backward.py)
for bf16 inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not interpret

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import nsa_dsl  # noqa: E402
from nsa_dsl import cache  # noqa: E402
from nsa_dsl.pipeline import cache_key  # noqa: E402
from nsa_dsl.render import render  # noqa: E402

BF16_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "g_ptr", "kc_ptr", "vc_ptr", "x_ptr", "out_ptr",
                 "dq_out_ptr",
                 "kw_ptr", "vw_ptr", "o_final_ptr", "part_o_ptr",
                 "o_cmp_ptr", "o_slc_ptr", "o_swa_ptr", "g_cmp_ptr", "g_slc_ptr", "g_swa_ptr",
                 "k_new_ptr", "v_new_ptr", "kw_new_ptr", "vw_new_ptr", "kc_new_ptr", "vc_new_ptr"}
INT64_POINTERS = {"slot_ptr"}  # the decode step's slots: the cache's int64 row index
INT_POINTERS = {"idx_ptr", "cand_idx_ptr", "len_ptr", "key_ptr", "chunk_count_ptr", "chunk_segment_ptr", "chunk_start_ptr", "chunk_end_ptr", "positions_ptr",
                "segment_chunks_ptr", "offsets_ptr", "slots_ptr", "slice_first_ptr", "table_ptr"}
FLOATS = {"qk_scale_log2", "sm_scale"}
INPUT_POINTER = "*bf16"  # the inputs' element type (--dtype)
# Kernel-argument constexprs as the launchers pass them (gates present, the
# deterministic selection backward, the forward of a training call); the
# descriptor switches (named as the plan's) and the scoring's int32 keys
# where the plan sets them, unless --arg NAME=0 asks for ops.py's run-time
# fallback (the pointer path, int64 keys).
CONSTEXPR_ARGS = {"HAS_GATE": True, "ATOMIC_DKV": False, "DQ_FIRST": False, "DQ_LAST": False, "HAS_G_CMP": True, "HAS_G_SLC": True,
                  "HAS_G_SWA": True, "WRITE_FINAL": False, "CMP_TMA": False, "SWA_TMA": False, "SLC_TMA": False,
                  "BC_FORCED_TMA": False, "TOPK_TMA": False, "TOPK_KEY32": False, "VARLEN": False,
                  # the decode step as a 64k cache of 64-token blocks launches it
                  # (launch_decode: 9 chunks of 128 blocks)
                  "CHUNK": 128, "NC_PAD": 16, "HAS_KW": False, "CANDIDATES": False,
                  "SPAN": 4, "PARTS_PAD": 4, "SPLITS_PAD": 16, "PAGED": False,
                  "NETWORK": False, "PDL": False}
# int32 pointers named without _ptr: the packed sequences' offsets and the
# selection's global block spans (launch.packed_operands, packed_blocks)
PACKED_POINTERS = {"cu_seqlens", "cu_compressed", "cu_queries", "block_spans"}
ENTRY_POINTS = {
    "cmp_pool": ["cmp_pool"], "cmp_fwd": ["cmp_fwd"], "slc_topk": ["slc_topk", "slc_topk_static"], "slc_fwd": ["slc_fwd"],
    "slc_fwd_bc": ["slc_index_keys", "slc_fwd_bc", "slc_fwd_bc_reduce", "slc_fwd_bc_merge_window"],
    "swa_fwd": ["swa_fwd"], "combine": ["combine"], "bwd_prep": ["bwd_prep"],
    "cmp_bwd": ["cmp_bwd_dq", "cmp_bwd_dkdv"], "cmp_pool_bwd": ["cmp_pool_bwd"],
    "slc_bwd": ["slc_bwd_dq", "slc_bwd_dkdv", "slc_bwd_reduce"], "swa_bwd": ["swa_bwd_dq", "swa_bwd_dkdv", "cmp_swa_bwd_dq"],
    "dec_attend": ["dec_append", "dec_cmp", "dec_topk", "dec_select", "dec_attend", "dec_reduce"],
}


def signature(fn, dims: dict, top: int = 16, constexpr_args: dict = None, descriptors: dict = None) -> tuple:
    """(signature, constexprs, attrs) as Triton's JIT specializes a launch
    from the launchers with contiguous tensors: the innermost strides (stride_*d,
    stride_ik) are 1 and become constants; the other strides of [B, T, H, D]
    tensors are multiples of 16 (head dims are) and so are the pointers
    (torch allocates 256-byte aligned), which Triton marks tt.divisibility=16;
    the index tensor's outer strides are multiples of TOP. Without this the
    compile assumed unknown strides: no vectorized or pipelined loads.
    descriptors: {argument: Triton type} of the arguments passed as tensor
    descriptors (the TMA path of cmp_fwd / swa_fwd)."""
    sig, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    arg_values = CONSTEXPR_ARGS if constexpr_args is None else constexpr_args
    for i, name in enumerate(fn.arg_names):
        if name in arg_values:
            sig[name], constexprs[name] = "constexpr", arg_values[name]
        elif descriptors and name in descriptors:
            sig[name] = descriptors[name]
        elif name in ("D", "D_PAD"):
            sig[name], constexprs[name] = "constexpr", dims[name]
        elif name in PACKED_POINTERS:
            sig[name] = "*i32"
            attrs[(i,)] = divisible
        elif name.endswith("_ptr"):
            sig[name] = (INPUT_POINTER if name in BF16_POINTERS else "*i32" if name in INT_POINTERS
                         else "*i64" if name in INT64_POINTERS else "*fp32")
            attrs[(i,)] = divisible
        elif name in FLOATS:
            sig[name] = "fp32"
        elif re.fullmatch(r"stride_[a-z]w?d|stride_ik", name):
            sig[name], constexprs[name] = "constexpr", 1
        elif name.startswith("stride_"):
            sig[name] = "i32"
            if not name.startswith("stride_i") or top % 16 == 0 or name == "stride_ib":
                attrs[(i,)] = divisible
        else:
            sig[name] = "i32"
    return sig, constexprs, attrs


def resources(cubin: bytes, tool_dir: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([str(tool_dir / "cuobjdump"), "--dump-resource-usage", handle.name],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool_dir / "cuobjdump"), "--dump-sass", handle.name],
                              capture_output=True, text=True).stdout
    found = {}
    for key, pattern in (("registers", r"REG:(\d+)"), ("stack_bytes", r"STACK:(\d+)"), ("shared_bytes", r"SHARED:(\d+)"),
                         ("local_bytes", r"LOCAL:(\d+)")):
        match = re.search(pattern, usage)
        found[key] = int(match.group(1)) if match else None
    found["hgmma"] = sass.count("HGMMA")
    found["hmma"] = sass.count("HMMA")
    found["shfl"] = sass.count("SHFL")  # warp shuffles (the scoring's head sum and sort network)
    found["local_loads_stores"] = len(re.findall(r"\b(LDL|STL)\b", sass))
    found["sass"] = sass
    return found


def _planned(kernel, flag: str, constexprs: dict) -> bool:
    """A plan's run-time switch (CMP_TMA, SWA_TMA, TOPK_TMA) as
    ops.py passes it where the tensors allow it; --arg FLAG=0 compiles the
    fallback."""
    return bool(kernel.const(flag)) and (constexprs or {}).get(flag, True)


def report(path: str, overrides: dict = None, only: tuple = (), constexprs: dict = None, sass_dir: str = None) -> list:
    from nsa_dsl.plan import apply_overrides

    rows = []
    for pattern in nsa_dsl.load_all(path):
        plan = nsa_dsl.check(pattern)
        if overrides:
            plan = apply_overrides(plan, overrides)
        # the merge attends the forced blocks where the plan has it do so
        # (for indices from its own scoring, as the benchmark runs it), and
        # scores the local blocks once for the window where the plan asks
        arg_values = {**CONSTEXPR_ARGS, "BC_MERGE_FORCED": plan.forced_in_merge, "SKIP_FORCED": plan.forced_in_merge,
                      "DISTINCT": True, "BC_LOCAL_IN_WINDOW": plan.local_in_window, **(constexprs or {})}
        key = cache_key(plan, device="cuda-sm90")
        module = cache.load_module(key, cache.store(key, render(plan, key)))
        target = GPUTarget("cuda", 90, 32)
        tool_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        for kernel in plan.kernels:
            for entry in ENTRY_POINTS[kernel.name]:
                if only and entry not in only:
                    continue
                if kernel.name == "slc_topk" and (entry == "slc_topk_static") != kernel.const("STATIC_SELECTION"):
                    continue  # the scoring, or the static selection's forced blocks
                if entry == "slc_fwd_bc_merge_window" and not kernel.has_const("BC_FOLD_WINDOW"):
                    continue  # patterns with a window only
                if entry == "cmp_swa_bwd_dq" and not plan.dq_with_compressed:
                    continue  # where the plan runs it (dq_with_compressed)
                if entry == "dec_cmp" and not kernel.const("DEC_HAS_CMP_KERNELS"):
                    continue  # patterns with a compress branch only
                if entry == "dec_topk" and not kernel.const("DEC_SCORES"):
                    continue  # a ranked selection only
                if entry == "dec_select" and (not kernel.const("DEC_SLC_ITEMS") or kernel.const("DEC_SCORES")):
                    continue  # a static selection only (a ranked one merges in dec_topk)
                dims_list = [{}]
                if entry in ("cmp_pool", "cmp_pool_bwd"):
                    dims_list = [{"D": d, "D_PAD": 1 << (d - 1).bit_length()} for d in sorted({pattern.dims.qk, pattern.dims.v})]
                for dims in dims_list:
                    fn = getattr(module, entry)
                    # the flash-style forwards' TMA path (CMP_TMA / SWA_TMA):
                    # k and v arrive as descriptors of [1, BLOCK_N, 1, D] boxes
                    tma_flag = {"cmp_fwd": "CMP", "swa_fwd": "SWA"}.get(entry)
                    descriptors, entry_args = None, arg_values
                    if tma_flag and _planned(kernel, f"{tma_flag}_TMA", constexprs):
                        bn, elem = kernel.const(f"{tma_flag}_BLOCK_N"), INPUT_POINTER[1:]
                        descriptors = {"k_ptr": f"tensordesc<{elem}[1, {bn}, 1, {plan.qk_pad}]>",
                                       "v_ptr": f"tensordesc<{elem}[1, {bn}, 1, {plan.v_pad}]>"}
                        entry_args = {**arg_values, f"{tma_flag}_TMA": True}
                    window_entry = (entry == "slc_fwd_bc_merge_window"
                                    or entry == "slc_fwd" and kernel.has_const("SLC_FWD_WINDOW")
                                    and kernel.const("SLC_FWD_WINDOW"))
                    if window_entry and _planned(plan.kernel("swa_fwd"), "SWA_TMA", constexprs):  # the folded window
                        bn, elem = plan.kernel("swa_fwd").const("SWA_BLOCK_N"), INPUT_POINTER[1:]
                        descriptors = {"kw_ptr": f"tensordesc<{elem}[1, {bn}, 1, {plan.qk_pad}]>",
                                       "vw_ptr": f"tensordesc<{elem}[1, {bn}, 1, {plan.v_pad}]>"}
                        entry_args = {**arg_values, "SWA_TMA": True}
                    flag = {"slc_fwd": "SLC_TMA", "slc_fwd_bc": "SLC_TMA",
                            "slc_fwd_bc_merge_window": "BC_FORCED_TMA", "slc_bwd_dq": "SLC_BWD_DQ_TMA"}.get(entry)
                    if flag and kernel.has_const(flag) and kernel.const(flag):  # the selection's blocks
                        elem = INPUT_POINTER[1:]
                        descriptors = {**(descriptors or {}),
                                       "k_ptr": f"tensordesc<{elem}[1, {kernel.const('SLC_BLOCK')}, 1, {plan.qk_pad}]>",
                                       "v_ptr": f"tensordesc<{elem}[1, {kernel.const('SLC_BLOCK')}, 1, {plan.v_pad}]>"}
                        entry_args = {**entry_args, "SLC_TMA" if entry == "slc_bwd_dq" else flag: True}
                    if entry == "slc_topk":  # int32 keys for 16-bit inputs (as launched up to 4096 blocks)
                        entry_args = {**entry_args,
                                      "TOPK_KEY32": (constexprs or {}).get("TOPK_KEY32", True) and INPUT_POINTER != "*fp32"}
                    if entry == "slc_topk" and _planned(kernel, "TOPK_TMA", constexprs):  # the compressed keys likewise
                        descriptors = {"kc_ptr": f"tensordesc<{INPUT_POINTER[1:]}[1, {kernel.const('TOPK_CHUNK_TOKENS')},"
                                                 f" 1, {plan.qk_pad}]>"}
                        entry_args = {**entry_args, "TOPK_TMA": True}
                    sig, consts, attrs = signature(fn, dims, pattern.select.top if pattern.select else 16, entry_args,
                                                   descriptors)
                    if entry == "dec_topk" and entry_args.get("NETWORK"):
                        sig["cand_key_ptr"] = "*i64"  # the candidates as slc_topk's keys
                    warps = kernel.warps_for(entry)
                    # the slot reductions launch with their own stages
                    stages = (kernel.const("BC_REDUCE_STAGES") if entry in ("slc_fwd_bc_reduce", "slc_fwd_bc_merge_window")
                              else kernel.num_stages)
                    row = {"pattern": pattern.name, "kernel": entry, "num_warps": warps,
                           "num_stages": stages, **({"D": dims["D"]} if "D" in dims else {})}
                    try:
                        compiled = triton.compile(ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                                                  options={"num_warps": warps, "num_stages": stages})
                        row.update(resources(compiled.asm["cubin"], tool_dir))
                        sass = row.pop("sass")
                        if sass_dir:  # the whole SASS, to read an instruction mix
                            Path(sass_dir).mkdir(parents=True, exist_ok=True)
                            Path(sass_dir, f"{pattern.name}.{entry}{dims.get('D', '')}.sass").write_text(sass)
                        # loads Triton's software pipeliner turned into cp.async
                        # (0: every load waits for its data in the loop)
                        row["async_copies"] = compiled.asm["ttgir"].count("async_copy_global_to_local")
                        row["shared_bytes"] = compiled.metadata.shared  # dynamic + static
                        row["ok"] = True
                    except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
                        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
                    rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--override", action="append", default=[], metavar="NAME=VALUE",
                    help="a tunable constant or <kernel>.num_warps/num_stages (repeatable)")
    ap.add_argument("--kernel", action="append", default=[], metavar="ENTRY",
                    help="compile only this entry point, e.g. slc_bwd_dkdv (repeatable; default: all)")
    ap.add_argument("--arg", action="append", default=[], metavar="NAME=0|1",
                    help="a kernel-argument constexpr other than the launchers' training-call value, e.g. WRITE_FINAL=1"
                         " (slc_fwd as a call without gradients runs it; repeatable)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                    help="the inputs' dtype (q, k, v, gates, outputs); default bf16")
    ap.add_argument("--sass-dir", help="write each kernel's SASS to DIR/<pattern>.<kernel>.sass")
    args = ap.parse_args(argv)
    global INPUT_POINTER
    INPUT_POINTER = "*" + args.dtype
    overrides = {k: int(v) for k, v in (o.split("=", 1) for o in args.override)}
    constexprs = {}
    for item in args.arg:
        name, value = item.split("=", 1)
        if name not in CONSTEXPR_ARGS and name not in ("BC_MERGE_FORCED", "SKIP_FORCED", "DISTINCT",
                                                       "BC_LOCAL_IN_WINDOW"):
            ap.error(f"--arg {name}: not a kernel-argument constexpr ({', '.join(sorted(CONSTEXPR_ARGS))})")
        constexprs[name] = bool(int(value))
    rows = [row for path in args.files for row in report(path, overrides, tuple(args.kernel), constexprs, args.sass_dir)]
    print(f"{'pattern':16s} {'kernel':16s} {'warps':>5s} {'regs':>5s} {'stack':>6s} {'smem':>7s} {'HGMMA':>6s} {'HMMA':>5s} {'LDL/STL':>7s} {'async':>5s}")
    for r in rows:
        if not r["ok"]:
            print(f"{r['pattern']:16s} {r['kernel']:16s} FAILED: {r['error']}")
            continue
        print(f"{r['pattern']:16s} {r['kernel'] + (('/D' + str(r['D'])) if 'D' in r else '') + (('/p' + str(r['pass'])) if 'pass' in r else ''):16s} {r['num_warps']:5d}"
              f" {r['registers']!s:>5s} {r['stack_bytes']!s:>6s} {r['shared_bytes']!s:>7s} {r['hgmma']:6d} {r['hmma']:5d}"
              f" {r['local_loads_stores']:7d} {r['async_copies']:5d}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
