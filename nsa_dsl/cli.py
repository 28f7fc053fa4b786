"""`nsa-dsl`: check, explain, emit, verify, and manage the kernel cache.

Exit codes: 0 success, 1 an invalid pattern (or a failed verify), 2 a usage
error (bad arguments, unreadable file, unusable cache folder). The CLI uses
only the public API.

Every FILE argument may also be `-`, the spec read from standard input
(diagnostics then name `<stdin>`), or a folder, meaning the *.nsa files
directly inside it in sorted order: not its subfolders (as the shell reads
DIR/*.nsa; name each subfolder you want) and not hidden files (editors'
backups).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import nsa_dsl
import nsa_dsl.verify
from nsa_dsl import __version__, cache
from nsa_dsl.check import check_parsed, errors_of, warnings_of
from nsa_dsl.cost import explain as explain_cost
from nsa_dsl.ir import Span
from nsa_dsl.parse import load_source, parse_source
from nsa_dsl.pipeline import device_kind
from nsa_dsl.records import bucket_of, config_path
from nsa_dsl.tune import OBJECTIVES, gpu_timer, tune

USAGE_ERROR = 2
STDIN = "-"
STDIN_NAME = "<stdin>"
FOLDER_HELP = "a .nsa file, - for standard input, or a folder: its *.nsa files (sorted; not its subfolders)"


class UsageError(Exception):
    """A problem with the command line itself: printed, exit status 2."""


def _spec_files(arg: str) -> list:
    """The spec files one FILE argument names: `-` and files as they are
    (a missing file is reported when it is read), a folder as its *.nsa
    files, sorted, non-recursively."""
    if arg == STDIN or not os.path.isdir(arg):
        return [arg]
    try:
        found = sorted(str(path) for path in Path(arg).iterdir()
                       if path.suffix == ".nsa" and not path.name.startswith(".") and path.is_file())
    except OSError as exc:
        raise UsageError(f"cannot read folder {arg}: {exc.strerror}") from exc
    if not found:
        raise UsageError(f"no .nsa files in folder {arg}")
    return found


def _read_stdin() -> str:
    """Standard input as UTF-8, whatever the locale: the same text a spec
    file would give (and the same error when it is not UTF-8)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text-only stand-in (tests, embedding)
        return sys.stdin.read()
    try:
        return stream.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise nsa_dsl.SpecError.at(Span.unknown(STDIN_NAME), f"cannot read spec: {exc}",
                                   "give the spec as UTF-8 text") from None


def _load_patterns(path: str, name=None):
    if path == STDIN:
        text = _read_stdin()
        return [nsa_dsl.parse(text, STDIN_NAME, name)] if name is not None else nsa_dsl.parse_all(text, STDIN_NAME)
    # exists(), not is_file(): a named pipe such as bash's <(...) is readable too.
    if not Path(path).exists():
        raise FileNotFoundError(path)
    if name is not None:
        return [nsa_dsl.load(path, name=name)]
    return nsa_dsl.load_all(path)


def _read_specs(files: list, name=None) -> tuple:
    """(patterns, errors): the patterns of `files` (with `name`, those so
    named) and the SpecError of each file that does not parse, so that every
    bad spec of a folder is named at once."""
    patterns, errors = [], []
    for path in files:
        try:
            # One file must hold `name` (load says which names it has); of a
            # folder's files, any may.
            found = _load_patterns(path, name if len(files) == 1 else None)
        except nsa_dsl.SpecError as exc:
            errors.append(exc)
            continue
        patterns += [p for p in found if name is None or p.name == name]
    return patterns, errors


def _load_or_report(command: str, path: str, name=None):
    """(patterns, None) or (None, exit code) with the problem printed."""
    try:
        patterns, errors = _read_specs(_spec_files(path), name)
    except FileNotFoundError as exc:
        print(f"nsa-dsl {command}: no such file: {exc}", file=sys.stderr)
        return None, USAGE_ERROR
    except UsageError as exc:
        print(f"nsa-dsl {command}: {exc}", file=sys.stderr)
        return None, USAGE_ERROR
    for exc in errors:
        print(exc, file=sys.stderr)
    if errors:
        return None, 1
    if not patterns:  # only a folder's files can all lack `name`: one file's load says so itself
        print(f"nsa-dsl {command}: no pattern named {name} in folder {path}", file=sys.stderr)
        return None, USAGE_ERROR
    return patterns, None


def _check_files(args_files: list, name) -> list:
    """The files `check` reads: each folder's .nsa files, and with --name
    only those of a folder that define that pattern (or do not parse, so
    the check reports them); a file named on its own is kept as it is."""
    files = []
    for arg in args_files:
        found = _spec_files(arg)
        if name is not None and arg != STDIN and os.path.isdir(arg):
            found = [path for path in found if _defines_or_fails(path, name)]
            if not found:
                raise UsageError(f"no pattern named {name} in folder {arg}")
        files += found
    return files


def _defines_or_fails(path: str, name: str) -> bool:
    try:
        return any(p.name == name for p in _load_patterns(path))
    except nsa_dsl.SpecError:
        return True


def cmd_check(args) -> int:
    status = 0
    for path in args.files:
        # exists(), not is_file(): a named pipe such as bash's <(...) is readable too.
        if path != STDIN and not Path(path).exists():
            print(f"nsa-dsl check: no such file: {path}", file=sys.stderr)
            return USAGE_ERROR
        try:
            # Every syntax error of the file, and the patterns that still parsed.
            parsed = parse_source(_read_stdin(), STDIN_NAME) if path == STDIN else load_source(path)
            if path == STDIN:
                path = STDIN_NAME  # what the report calls it
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


# A longer stem is cut: names are unbounded in the grammar, file names are
# not (255 bytes on most file systems).
_MAX_STEM = 80


def output_name(pattern_name: str) -> str:
    """The file `emit` writes a pattern to: `<name>_nsa.py`. The suffix keeps
    a pattern called `triton`, `tl` or `__init__` from emitting a file that
    shadows a real module should that folder ever be on sys.path. A long name
    is cut and ends in a short hash of the whole name, so two long names
    that share a beginning still get two files."""
    stem = pattern_name
    if len(stem) > _MAX_STEM:
        digest = hashlib.sha256(pattern_name.encode()).hexdigest()[:8]
        stem = f"{stem[:_MAX_STEM - len(digest) - 1]}_{digest}"
    return f"{stem}_nsa.py"


def _output_folder(path: str) -> Path:
    """The -o folder, created if need be; UsageError when it cannot be."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {path} is a file; give a folder to write the sources into")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {path}: {exc.strerror}") from exc
    return out


def _targets(out: Path, patterns: list) -> list:
    """The file of each pattern in `out`; UsageError when two patterns (of
    a folder's files) would overwrite each other."""
    targets, seen = [], {}
    for pattern in patterns:
        target = out / output_name(pattern.name)
        if target in seen:
            raise UsageError(f"patterns {seen[target].name} of {seen[target].source} and {pattern.name} of"
                             f" {pattern.source} would both be written to {target}; pass --name")
        seen[target] = pattern
        targets.append(target)
    return targets


def cmd_emit(args) -> int:
    patterns, code = _load_or_report("emit", args.file, args.name)
    if patterns is None:
        return code
    # Render every pattern before writing any: an invalid one among many
    # leaves no half-written output, and every invalid one is reported.
    emitted, status = [], 0
    for pattern in patterns:
        try:
            emitted.append(nsa_dsl.emit(pattern))
        except nsa_dsl.SpecError as exc:
            print(exc, file=sys.stderr)
            status = 1
    if status:
        return status
    try:
        targets = _targets(Path(args.output), patterns)
        _output_folder(args.output)
        for target, (key, source) in zip(targets, emitted):
            try:
                target.write_text(source, encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"cannot write {target}: {exc.strerror}") from exc
            print(f"{target}  (cache key {key[:16]}…)")
    except UsageError as exc:
        print(f"nsa-dsl emit: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _describe_entry(entry) -> str:
    """Two lines: key, pattern, state, size and path; then its kernels and
    the spec it came from (an entry without a header says so)."""
    header = entry.header
    first = (f"{entry.key[:16]}  {header.get('pattern', '?'):20s}  {'ok' if entry.valid else 'CORRUPT':7s}"
             f"  {entry.size:8d} B  {entry.path}")
    if "pattern" not in header:
        return first + "\n    (no header: not written by nsa_dsl, or damaged)"
    return first + f"\n    kernels: {header.get('kernels', '?')}; source: {header.get('source', '?')}"


def cmd_cache(args) -> int:
    """Each action does what it can and reports a folder that cannot take
    new entries (why, and how to fix it) with exit status 2: `path` still
    prints the path, `list` lists what it can read (a read-only cache still
    serves its entries), `clear` removes nothing."""
    problem = cache.problem()
    try:
        if args.action == "path":
            print(cache.cache_dir())
        elif args.action == "list":
            entries = cache.entries()
            for entry in entries:
                print(_describe_entry(entry))
            print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in {cache.cache_dir()}")
        elif args.action == "clear" and problem is None:
            print(f"removed {cache.clear()} entr(ies) from {cache.cache_dir()}")
    except cache.CacheError as exc:
        print(f"nsa-dsl cache {args.action}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    if problem is not None:
        print(f"nsa-dsl cache {args.action}: the cache folder {cache.cache_dir()} cannot take new entries:"
              f" {problem}; set {cache.ENV_VAR} to a writable folder", file=sys.stderr)
        return USAGE_ERROR
    return 0


class Progress:
    """One status line on stderr, rewritten in place while a long command
    runs; nothing at all when stderr is not a terminal (a log or a pipe would
    only collect carriage returns)."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = False

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        # Cut to the terminal's width: a wrapped line could not be rewritten.
        width = shutil.get_terminal_size().columns - 1
        self.stream.write("\r\x1b[K" + text[:width])
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        """Erase the line, before other output or at the end."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _verify_progress(progress: Progress, pattern_name: str):
    """verify's progress(n, examples) hook: which case runs, how long so far."""
    start = time.monotonic()

    def on_case(number: int, examples: int) -> None:
        what = f"case {number}/{examples}" if number <= examples else f"shrinking a failure (case {number})"
        progress.show(f"nsa-dsl verify: {pattern_name}: {what}, {time.monotonic() - start:.0f} s")
    return on_case


def cmd_verify(args) -> int:
    # The interpreter must be chosen before triton is imported.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    patterns, code = _load_or_report("verify", args.file, args.name)
    if patterns is None:
        return code
    progress = Progress()

    def report(*lines) -> None:  # verify's own output: clear the status line first
        progress.clear()
        print(*lines)

    ok = True
    for pattern in patterns:
        try:
            nsa_dsl.check(pattern)
        except nsa_dsl.SpecError as exc:
            print(exc, file=sys.stderr)
            return 1
        try:
            # nsa_dsl.verify.verify, looked up at the call: tests stand in for it
            ok &= nsa_dsl.verify.verify(pattern, examples=args.examples, seed=args.seed, grad=args.grad,
                                        max_length=args.max_length, out=report,
                                        progress=_verify_progress(progress, pattern.name))
        finally:
            progress.clear()
    return 0 if ok else 1


def cmd_tune(args) -> int:
    import torch

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
    parser = argparse.ArgumentParser(
        prog="nsa-dsl", description="Compile NSA sparse-attention patterns to Triton kernels.",
        epilog="FILE is a .nsa file, - for standard input, or a folder: the *.nsa files directly inside it,"
               " in sorted order (not its subfolders).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate pattern files (every violation at once)")
    check.add_argument("files", nargs="+", metavar="FILE", help=FOLDER_HELP)
    check.add_argument("--name", help="only the pattern of this name")
    check.add_argument("--explain", action="store_true", help="print the plan: kernels, tiles, loop order, cost model")
    check.set_defaults(func=cmd_check)

    emit = sub.add_parser("emit", help="write the generated Triton source of each pattern to DIR/<name>_nsa.py")
    emit.add_argument("file", metavar="FILE", help=FOLDER_HELP)
    emit.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write into (created if need be)")
    emit.add_argument("--name", help="only the pattern of this name")
    emit.set_defaults(func=cmd_emit)

    cache_cmd = sub.add_parser("cache", help="the on-disk kernel cache ($NSA_DSL_CACHE_DIR)")
    cache_cmd.add_argument("action", choices=["path", "list", "clear"],
                           help="path: where it is; list: each entry's pattern, kernels and source; clear: remove all")
    cache_cmd.set_defaults(func=cmd_cache)

    verify = sub.add_parser("verify", help="property-test the kernels of a pattern against the dense reference")
    verify.add_argument("file", metavar="FILE", help=FOLDER_HELP)
    verify.add_argument("--name", help="only the pattern of this name")
    verify.add_argument("--examples", type=int, default=20)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--grad", action="store_true", help="check gradients too")
    verify.add_argument("--max-length", type=int, default=None,
                        help="longest sequence drawn (default 96 on CPU, 2048 on a GPU)")
    verify.set_defaults(func=cmd_verify)

    tune_cmd = sub.add_parser("tune", help="autotune tiles/warps/stages per length bucket on this GPU (kept on disk)")
    tune_cmd.add_argument("file", metavar="FILE", help=FOLDER_HELP)
    tune_cmd.add_argument("--name")
    tune_cmd.add_argument("--lengths", default="8192,65536", help="comma-separated sequence lengths to tune at")
    tune_cmd.add_argument("--forward-only", action="store_true", help="time the forward pass only")
    tune_cmd.add_argument("--objective", choices=OBJECTIVES, default="wall",
                          help="wall: do_bench median of the whole pass; kernels: the sum of its kernels' device time"
                               " (profiler; no host time, less noise at short lengths)")
    tune_cmd.add_argument("-v", "--verbose", action="store_true")
    tune_cmd.add_argument("--kernels", help="comma-separated plan kernels to tune, in this order (default: all)")
    tune_cmd.add_argument("--from-tuned", action="store_true",
                          help="start from the recorded or shipped configuration of each length, not the defaults")
    tune_cmd.add_argument("--budget-s", type=float, default=None,
                          help="start no candidate after this many seconds (what was tuned is kept)")
    tune_cmd.add_argument("--export", metavar="DIR",
                          help="also copy the recorded configuration to DIR (e.g. nsa_dsl/tuned, to ship it)")
    tune_cmd.set_defaults(func=cmd_tune)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on a usage error
    if getattr(args, "examples", 1) < 1:
        parser.error("--examples must be at least 1")
    if args.command == "check":  # cmd_check reads file by file: hand it the files of each folder
        try:
            args.files = _check_files(args.files, args.name)
        except UsageError as exc:
            print(f"nsa-dsl check: {exc}", file=sys.stderr)
            return USAGE_ERROR
    try:
        return args.func(args)
    except cache.CacheError as exc:  # verify and tune compile: an unusable cache folder is the user's to fix
        print(f"nsa-dsl {args.command}: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
