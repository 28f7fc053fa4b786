"""`nsa-dsl`: check, explain, emit, verify, and manage the kernel cache.

Exit codes: 0 success, 1 an invalid pattern (or a failed verify), 2 a usage
error (bad arguments, unreadable file). The CLI uses only the public API.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

USAGE_ERROR = 2


def _load_patterns(path: str, name=None):
    import nsa_dsl

    if not Path(path).is_file():
        raise FileNotFoundError(path)
    if name is not None:
        return [nsa_dsl.load(path, name=name)]
    return nsa_dsl.load_all(path)


def _load_or_report(command: str, path: str, name=None):
    """(patterns, None) or (None, exit code) with the problem printed."""
    import nsa_dsl

    try:
        return _load_patterns(path, name), None
    except FileNotFoundError:
        print(f"nsa-dsl {command}: no such file: {path}", file=sys.stderr)
        return None, USAGE_ERROR
    except nsa_dsl.SpecError as exc:
        print(exc, file=sys.stderr)
        return None, 1


def cmd_check(args) -> int:
    import nsa_dsl
    from nsa_dsl.check import check_parsed, errors_of, warnings_of
    from nsa_dsl.cost import explain as explain_cost
    from nsa_dsl.parse import load_source

    status = 0
    for path in args.files:
        if not Path(path).is_file():
            print(f"nsa-dsl check: no such file: {path}", file=sys.stderr)
            return USAGE_ERROR
        try:
            parsed = load_source(path)  # every syntax error of the file, and what still parsed
        except nsa_dsl.SpecError as exc:  # not readable as UTF-8 text
            print(exc, file=sys.stderr)
            status = 1
            continue
        if args.name is not None:
            parsed = parsed.only(args.name)
        report = check_parsed(parsed)
        # Syntax, structure and rule errors and warnings together, in file order.
        for diag in report.diagnostics:
            print(diag.render(), file=sys.stderr)
        for pattern, findings, complete in report.checked:
            errors, warnings = errors_of(findings), warnings_of(findings)
            if errors or not complete:
                status = 1
                print(f"{path}: pattern {pattern.name}: {len(errors)} error(s)"
                      + ("" if complete else "; checked in part: a syntax error skipped some of its text"),
                      file=sys.stderr)
                continue
            print(f"{path}: pattern {pattern.name}: ok"
                  + (f" ({len(warnings)} warning(s))" if warnings else ""))
            if args.explain:
                plan = nsa_dsl.check(pattern)
                print(plan.explain())
                print(explain_cost(pattern))
                print()
        if parsed.diagnostics:
            status = 1
            print(f"{path}: {len(parsed.diagnostics)} syntax or structure error(s)", file=sys.stderr)
    return status


def cmd_emit(args) -> int:
    import nsa_dsl

    patterns, code = _load_or_report("emit", args.file, args.name)
    if patterns is None:
        return code
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in patterns:
        try:
            key, source = nsa_dsl.emit(pattern)
        except nsa_dsl.SpecError as exc:
            print(exc, file=sys.stderr)
            return 1
        target = out / f"{pattern.name}.py"
        target.write_text(source)
        print(f"{target}  (cache key {key[:16]}…)")
    return 0


def cmd_cache(args) -> int:
    from nsa_dsl import cache

    if args.action == "path":
        print(cache.cache_dir())
    elif args.action == "list":
        entries = cache.entries()
        for key, path, size, valid in entries:
            print(f"{key[:16]}  {size:8d} B  {'ok' if valid else 'CORRUPT'}  {path}")
        print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in {cache.cache_dir()}")
    elif args.action == "clear":
        print(f"removed {cache.clear()} entr(ies) from {cache.cache_dir()}")
    return 0


def cmd_verify(args) -> int:
    # The interpreter must be chosen before triton is imported.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import nsa_dsl
    from nsa_dsl.verify import verify

    patterns, code = _load_or_report("verify", args.file, args.name)
    if patterns is None:
        return code
    ok = True
    for pattern in patterns:
        try:
            nsa_dsl.check(pattern)
        except nsa_dsl.SpecError as exc:
            print(exc, file=sys.stderr)
            return 1
        ok &= verify(pattern, examples=args.examples, seed=args.seed, grad=args.grad, max_length=args.max_length)
    return 0 if ok else 1


def cmd_tune(args) -> int:
    import torch

    import nsa_dsl
    from nsa_dsl.pipeline import device_kind
    from nsa_dsl.tune import bucket_of, config_path, gpu_timer, tune

    if not torch.cuda.is_available():
        print("nsa-dsl tune: tuning times kernels on a CUDA GPU, and none is available", file=sys.stderr)
        return USAGE_ERROR
    patterns, code = _load_or_report("tune", args.file, args.name)
    if patterns is None:
        return code
    lengths = [int(x) for x in args.lengths.split(",")]
    start = time.monotonic()
    for pattern in patterns:
        nsa_dsl.check(pattern)
        left = None if args.budget_s is None else max(0.0, args.budget_s - (time.monotonic() - start))
        timer = gpu_timer(backward=not args.forward_only, log=print if args.verbose else None,
                          objective=args.objective)
        configs = tune(pattern, lengths, timer, device=device_kind(),
                       backward=not args.forward_only, log=print if args.verbose else None, budget_s=left,
                       kernels=args.kernels.split(",") if args.kernels else None, from_tuned=args.from_tuned,
                       objective=f"{args.objective}, {'forward' if args.forward_only else 'forward+backward'}")
        for length in lengths:
            found = configs.get(bucket_of(length))
            print(f"{pattern.name} T={length} (bucket {bucket_of(length)}): "
                  + ("not tuned" if found is None else (str(found) if found else "plan defaults")))
        if args.export:
            path = config_path(pattern, device_kind())
            if path.is_file():
                Path(args.export).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, Path(args.export) / path.name)
                print(f"exported {path.name} to {args.export}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsa-dsl", description="Compile NSA sparse-attention patterns to Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate pattern files (every violation at once)")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--name", help="only the pattern of this name")
    check.add_argument("--explain", action="store_true", help="print the plan: kernels, tiles, loop order, cost model")
    check.set_defaults(func=cmd_check)

    emit = sub.add_parser("emit", help="write the generated Triton source of each pattern")
    emit.add_argument("file", metavar="FILE")
    emit.add_argument("-o", "--output", required=True, metavar="DIR")
    emit.add_argument("--name")
    emit.set_defaults(func=cmd_emit)

    cache = sub.add_parser("cache", help="the on-disk kernel cache ($NSA_DSL_CACHE_DIR)")
    cache.add_argument("action", choices=["path", "list", "clear"])
    cache.set_defaults(func=cmd_cache)

    verify = sub.add_parser("verify", help="property-test the kernels of a pattern against the dense reference")
    verify.add_argument("file", metavar="FILE")
    verify.add_argument("--name")
    verify.add_argument("--examples", type=int, default=20)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--grad", action="store_true", help="check gradients too")
    verify.add_argument("--max-length", type=int, default=None,
                        help="longest sequence drawn (default 96 on CPU, 2048 on a GPU)")
    verify.set_defaults(func=cmd_verify)

    from nsa_dsl.tune import OBJECTIVES

    tune = sub.add_parser("tune", help="autotune tiles/warps/stages per length bucket on this GPU (kept on disk)")
    tune.add_argument("file", metavar="FILE")
    tune.add_argument("--name")
    tune.add_argument("--lengths", default="8192,65536", help="comma-separated sequence lengths to tune at")
    tune.add_argument("--forward-only", action="store_true", help="time the forward pass only")
    tune.add_argument("--objective", choices=OBJECTIVES, default="wall",
                      help="wall: do_bench median of the whole pass; kernels: the sum of its kernels' device time"
                           " (profiler; no host time, less noise at short lengths)")
    tune.add_argument("-v", "--verbose", action="store_true")
    tune.add_argument("--kernels", help="comma-separated plan kernels to tune, in this order (default: all)")
    tune.add_argument("--from-tuned", action="store_true",
                      help="start from the recorded or shipped configuration of each length, not the defaults")
    tune.add_argument("--budget-s", type=float, default=None,
                      help="start no candidate after this many seconds (what was tuned is kept)")
    tune.add_argument("--export", metavar="DIR",
                      help="also copy the recorded configuration to DIR (e.g. nsa_dsl/tuned, to ship it)")
    tune.set_defaults(func=cmd_tune)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on a usage error
    if getattr(args, "examples", 1) < 1:
        parser.error("--examples must be at least 1")
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
