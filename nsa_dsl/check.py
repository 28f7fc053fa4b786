"""The checker: a Pattern in, every problem with it out, all at once.

`validate(pattern)` is a pure function. It never raises for a bad pattern; it
returns one Diagnostic per violated rule (errors) and per legal-but-wasteful
choice (warnings), each pointing at the `key=value` that causes it and saying
what would be valid. `raise_if_invalid` turns the errors into one SpecError.
The compiler's entry point, `check` (validate, then plan), is pipeline.py's:
the checker knows nothing of plans.

Every diagnostic is a `Finding`, a Diagnostic that also carries the id of the
rule it reports (e.g. "select.block.stride"), so tools and tests can tell the
rules apart without parsing English. The ids, the rules and the limits are
listed in RULES and WARNINGS below.

Limits (errors). Most follow from the kernels; the upper bounds are caps that
keep absurd values (typos, fuzzers) away from the kernels and their int32
position arithmetic, far above anything an NSA-style pattern uses:

  heads.q, heads.kv     1 .. 1024       the largest published models use 128
  q / kv                <= 256 where blocks are scored (top > initial + local):
                        the scoring's tile holds a group's heads as rows
  dims.qk, dims.v       16 .. 256, multiples of 16: a tensor-core dot needs
                        K >= 16 and one K/V tile must fit in shared memory
  compress.block        1 .. 1024       the paper uses 32
  compress.stride       >= 1 and divides compress.block (NSA_MATH.md)
  select.block          a power of two in 16 .. 256: it is a tile dimension
                        of the selection kernel; a multiple of compress.stride
                        so compressed tokens map onto whole selection blocks
  select.top            1 .. 4096, and >= initial + local (the forced blocks
                        are always selected)
  select.initial/local  >= 0
  window.size           1 .. 2**31 - 1  positions are int32 in the kernels
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import sympy

from .errors import Diagnostic, SpecError
from .ir import (BRANCH_ORDER, MAX_NUMBER, Branch, Compress, Combine, Dims, DType, DTypes, Heads, Pattern, Pool,
                 Select, Window)

MAX_HEADS = 1024
HEAD_DIM_MIN, HEAD_DIM_MAX, HEAD_DIM_STEP = 16, 256, 16
MAX_COMPRESS_BLOCK = 1024
SELECT_BLOCK_MIN, SELECT_BLOCK_MAX = 16, 256
MAX_TOP = 4096
MAX_WINDOW = MAX_NUMBER  # the parser's bound on every number: positions are int32
# Patterns built in code are not bounded by the parser. An int this long is
# no count of anything, and messages print values (Python refuses to print
# more than 4300 digits), so it is a type error, reported before any rule
# computes with it.
MAX_DIGITS = 100
# Rows of the smallest tensor-core tile (M of an MMA); the selection kernel
# stacks the G query heads of a group as rows of one tile.
MMA_ROWS = 16
# The most query heads per KV head where blocks are scored: the block
# scoring's tile holds positions x the group's heads (padded to a power of
# two) as at most 256 rows (plan.py's TOPK_ROWS_MAX).
MAX_SCORED_GROUP = 256

# The paper's settings, used in hints as an example of what works.
PAPER_COMPRESS = "compress block=32 stride=16"

RULES = {
    "pattern.heads": "the pattern has a heads statement",
    "pattern.dims": "the pattern has a dims statement",
    "pattern.branches": "at least one of compress, select, window is declared",
    "type": f"every numeric value is an integer of at most {MAX_DIGITS} digits and every enum value a member"
            " of its enum",
    "heads.q.range": f"1 <= heads.q <= {MAX_HEADS}",
    "heads.kv.range": f"1 <= heads.kv <= {MAX_HEADS}",
    "heads.divisible": "heads.q is a multiple of heads.kv",
    "heads.group.range": f"with a select branch that ranks blocks (top > initial + local), G = q/kv <="
                         f" {MAX_SCORED_GROUP}",
    "dims.qk.range": f"dims.qk is a multiple of {HEAD_DIM_STEP} in {HEAD_DIM_MIN}..{HEAD_DIM_MAX}",
    "dims.v.range": f"dims.v is a multiple of {HEAD_DIM_STEP} in {HEAD_DIM_MIN}..{HEAD_DIM_MAX}",
    "compress.block.range": f"1 <= compress.block <= {MAX_COMPRESS_BLOCK}",
    "compress.stride.range": "compress.stride >= 1",
    "compress.divisible": "compress.stride divides compress.block",
    "select.block.range": f"select.block is a power of two in {SELECT_BLOCK_MIN}..{SELECT_BLOCK_MAX}",
    "select.block.stride": "select.block is a multiple of compress.stride (when compress is declared)",
    "select.top.range": f"1 <= select.top <= {MAX_TOP}",
    "select.initial.range": "select.initial >= 0",
    "select.local.range": "select.local >= 0",
    "select.top.forced": "select.top >= initial + local",
    "select.top.unranked": "select.top > initial + local needs a compress branch to rank blocks",
    "window.size.range": f"1 <= window.size <= {MAX_WINDOW}",
    "combine.empty": "combine names at least one branch",
    "combine.undeclared": "combine names only declared branches",
    "dtype.empty": "dtype lists at least one element type",
}

WARNINGS = {
    "heads.group.small": f"with a select branch, G = q/kv below {MMA_ROWS} underfills the selection kernel's tile",
    "heads.group.pow2": "with a select branch, G = q/kv not a power of two is padded up in the selection kernel",
    "dims.qk.pad": "dims.qk not a power of two is padded up to one in registers",
    "dims.v.pad": "dims.v not a power of two is padded up to one in registers",
    "branch.unused": "a declared branch whose result nothing uses still runs its kernels",
}


# The statements each rule reads to decide. After a syntax error the parser
# skips text and says, per pattern, which statements that text may have
# belonged to (Parsed.unsure, "*" for any); a finding that reads one of them
# may exist only because of the skip ("no heads statement" after a typo in the
# heads line, "top > initial + local needs a compress branch" after a broken
# compress line), so check_parsed does not report it.
_BRANCH_STATEMENTS = frozenset({"compress", "select", "window"})
READS = {
    "pattern.heads": {"heads"},
    "pattern.dims": {"dims"},
    "pattern.branches": _BRANCH_STATEMENTS,
    "type": {"heads", "dims", "compress", "select", "window", "combine", "dtype"},
    "heads.q.range": {"heads"},
    "heads.kv.range": {"heads"},
    "heads.divisible": {"heads"},
    "heads.group.range": {"heads", "select"},
    "dims.qk.range": {"dims"},
    "dims.v.range": {"dims"},
    "compress.block.range": {"compress"},
    "compress.stride.range": {"compress"},
    "compress.divisible": {"compress"},
    "select.block.range": {"select"},
    "select.block.stride": {"select", "compress"},
    "select.top.range": {"select"},
    "select.initial.range": {"select"},
    "select.local.range": {"select"},
    "select.top.forced": {"select"},
    "select.top.unranked": {"select", "compress"},
    "window.size.range": {"window"},
    "combine.empty": {"combine"},
    "combine.undeclared": {"combine", *_BRANCH_STATEMENTS},
    "dtype.empty": {"dtype"},
    "heads.group.small": {"heads", "select"},
    "heads.group.pow2": {"heads", "select"},
    "dims.qk.pad": {"dims"},
    "dims.v.pad": {"dims"},
    "branch.unused": {"combine", *_BRANCH_STATEMENTS},
}


@dataclass(frozen=True)
class Finding(Diagnostic):
    """A Diagnostic that also names the rule (a key of RULES or WARNINGS)."""

    rule: str = ""


def _error(rule: str, message: str, span, hint: Optional[str] = None) -> Finding:
    return Finding("error", message, span, hint, rule=rule)


def _warning(rule: str, message: str, span, hint: Optional[str] = None) -> Finding:
    return Finding("warning", message, span, hint, rule=rule)


# ---------------------------------------------------------------------------
# Small arithmetic helpers for the hints
# ---------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _too_long(value: int) -> bool:
    """More than MAX_DIGITS decimal digits (decided without printing it)."""
    return abs(value) >= 10**MAX_DIGITS


def _digits(value: int) -> int:
    """Decimal digits of a huge |value|, from its bit length: printing it may fail."""
    n = abs(value)
    guess = max(1, int(n.bit_length() * 0.30102999566398120))  # log10(2)
    while n >= 10**guess:
        guess += 1
    while guess > 1 and n < 10**(guess - 1):
        guess -= 1
    return guess


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _nearest(value: int, candidates: Iterable[int]) -> list:
    """The closest candidate below `value` and the closest above it (either
    may be missing), ascending; [value] itself never appears."""
    below = [c for c in candidates if c < value]
    above = [c for c in candidates if c > value]
    return ([max(below)] if below else []) + ([min(above)] if above else [])


def _or(values: Iterable, prefix: str = "") -> str:
    """"32 or 48", "kv=4 or kv=8"."""
    return " or ".join(f"{prefix}{v}" for v in values)


def _divisors(n: int) -> list:
    """Divisors of n (sympy), for hints; n is bounded by the caller."""
    return [int(x) for x in sympy.divisors(n)]


def _multiples_near(value: int, step: int, lo: int, hi: int) -> list:
    """Multiples of `step` within lo..hi nearest to `value`: the largest one
    below it and the smallest one above it, where they exist."""
    below = (min(value - 1, hi) // step) * step
    above = (value // step + 1) * step
    return [m for m in (below, above) if lo <= m <= hi]


def _head_dims() -> range:
    return range(HEAD_DIM_MIN, HEAD_DIM_MAX + 1, HEAD_DIM_STEP)


def _select_blocks(stride: Optional[int] = None) -> list:
    """Valid select.block values, also multiples of `stride` when given."""
    blocks = [1 << k for k in range(SELECT_BLOCK_MIN.bit_length() - 1, SELECT_BLOCK_MAX.bit_length())]
    if stride is not None and stride >= 1:
        blocks = [b for b in blocks if b % stride == 0]
    return blocks


def _percent(fraction: float) -> str:
    return f"{fraction:.0%}" if abs(fraction * 100 - round(fraction * 100)) < 1e-9 else f"{fraction:.1%}"


# ---------------------------------------------------------------------------
# Types: patterns built in code may hold anything; the parser only produces
# non-negative ints and enum members.
# ---------------------------------------------------------------------------
_INT_FIELDS = {
    "heads": (Heads, ("q", "kv")),
    "dims": (Dims, ("qk", "v")),
    "compress": (Compress, ("block", "stride")),
    "select": (Select, ("block", "top", "initial", "local")),
    "window": (Window, ("size",)),
}


def _type_findings(pattern: Pattern) -> tuple:
    """(findings, set of 'stmt.key' whose value is not an int). A statement
    of the wrong class counts as having every key wrong."""
    found, bad = [], set()
    for stmt_name, (cls, keys) in _INT_FIELDS.items():
        stmt = getattr(pattern, stmt_name, None)
        if stmt is None:
            continue
        if not isinstance(stmt, cls):
            found.append(_error("type", f"pattern.{stmt_name} must be an ir.{cls.__name__}; got"
                                        f" {type(stmt).__name__}", getattr(stmt, "span", None) or pattern.span))
            bad.update(f"{stmt_name}.{k}" for k in keys)
            continue
        for key in keys:
            value = getattr(stmt, key, None)
            if not _is_int(value):
                found.append(_error("type", f"{stmt_name}.{key} must be an integer; got {value!r}", stmt.at(key),
                                    f"write {stmt_name} {key}=<a whole number>"))
                bad.add(f"{stmt_name}.{key}")
            elif _too_long(value):
                found.append(_error("type", f"{stmt_name}.{key} must be an integer of at most {MAX_DIGITS} digits;"
                                            f" got a {_digits(value)}-digit number", stmt.at(key),
                                    f"a pattern's numbers are at most {MAX_NUMBER} (the kernels index with int32)"))
                bad.add(f"{stmt_name}.{key}")
    c = pattern.compress
    if isinstance(c, Compress) and not isinstance(c.pool, Pool):
        found.append(_error("type", f"compress.pool must be one of mean, mlp; got {c.pool!r}", c.at("pool")))
    for name, cls, attr, enum, noun in (("combine", Combine, "branches", Branch, "branch"),
                                        ("dtype", DTypes, "dtypes", DType, "dtype")):
        stmt = getattr(pattern, name)
        if stmt is None:
            continue
        if not isinstance(stmt, cls) or not isinstance(getattr(stmt, attr), tuple):
            found.append(_error("type", f"pattern.{name} must be an ir.{cls.__name__} holding a tuple; got"
                                        f" {stmt!r}", getattr(stmt, "span", None) or pattern.span))
            continue
        for item in getattr(stmt, attr):
            if not isinstance(item, enum):
                choices = ", ".join(e.value for e in enum)
                found.append(_error("type", f"{noun} {item!r} is not one of {choices}", stmt.span))
    return found, bad


# ---------------------------------------------------------------------------
# Rules, one function per statement
# ---------------------------------------------------------------------------
def _range_error(rule: str, stmt, key: str, value: int, lo: int, hi: int, what: str,
                 low_note: str = "", high_note: str = "") -> Optional[Finding]:
    """The error for `value` outside lo..hi, else None. Below the range the
    hint suggests the lowest valid value; above it, it states the cap."""
    if lo <= value <= hi:
        return None
    name = rule.rsplit(".", 1)[0]
    hint = f"did you mean {key}={lo}?{low_note}" if value < lo else f"the largest accepted is {hi}{high_note}"
    return _error(rule, f"{name} must be between {lo} and {hi} ({what}); got {value}", stmt.at(key), hint)


def _check_heads(h: Heads, bad: set) -> Iterator[Finding]:
    q_ok, kv_ok = "heads.q" not in bad, "heads.kv" not in bad
    if q_ok:
        f = _range_error("heads.q.range", h, "q", h.q, 1, MAX_HEADS, "the number of query heads",
                         high_note=" (a cap of this checker; the largest published models use 128)")
        if f:
            yield f
    if kv_ok:
        f = _range_error("heads.kv.range", h, "kv", h.kv, 1, MAX_HEADS, "the number of key/value heads",
                         high_note=" (a cap of this checker)")
        if f:
            yield f
    if q_ok and kv_ok and h.q >= 1 and h.kv >= 1 and h.q % h.kv != 0:
        options = []
        if h.q <= MAX_HEADS:
            kvs = _nearest(h.kv, _divisors(h.q))
            options.append(f"{_or(kvs, 'kv=')} (divisors of {h.q})")
        qs = _multiples_near(h.q, h.kv, 1, MAX_HEADS)
        if qs:
            options.append(f"{_or(qs, 'q=')} (multiples of {h.kv})")
        yield _error("heads.divisible",
                     f"heads.q must be a multiple of heads.kv (each key/value head serves q/kv query heads);"
                     f" got q={h.q}, kv={h.kv}", h.at("kv"),
                     f"did you mean {', or '.join(options)}?" if options else "kv must divide q (kv=1 always does)")


def _check_group(h: Heads, s: Select) -> Iterator[Finding]:
    """Heads already valid; the select statement's counts integers."""
    g = h.q // h.kv
    if s.top <= s.initial + s.local or g <= MAX_SCORED_GROUP:
        return
    least = -(-h.q // MAX_SCORED_GROUP)
    kvs = [kv for kv in _divisors(h.q) if kv >= least]
    yield _error("heads.group.range",
                 f"GQA group G = q/kv = {h.q}/{h.kv} = {g} exceeds {MAX_SCORED_GROUP}: the block scoring sums a"
                 f" group's query heads as rows of one tile of at most {MAX_SCORED_GROUP}", h.at("kv"),
                 f"did you mean kv={min(kvs)}? (G={h.q // min(kvs)}; kv must divide q)")


def _check_dims(d: Dims, bad: set) -> Iterator[Finding]:
    for key in ("qk", "v"):
        if f"dims.{key}" in bad:
            continue
        value = getattr(d, key)
        if HEAD_DIM_MIN <= value <= HEAD_DIM_MAX and value % HEAD_DIM_STEP == 0:
            continue
        yield _error(f"dims.{key}.range",
                     f"dims.{key} must be a multiple of {HEAD_DIM_STEP} between {HEAD_DIM_MIN} and {HEAD_DIM_MAX};"
                     f" got {value}", d.at(key),
                     f"did you mean {_or(_nearest(value, _head_dims()))}? (a tensor-core dot needs multiples of"
                     f" {HEAD_DIM_STEP}; larger heads do not fit the kernels' tiles)")


def _check_compress(c: Compress, bad: set) -> Iterator[Finding]:
    block_ok, stride_ok = "compress.block" not in bad, "compress.stride" not in bad
    if block_ok:
        f = _range_error("compress.block.range", c, "block", c.block, 1, MAX_COMPRESS_BLOCK,
                         "tokens per compressed token", low_note=f" (the paper uses {PAPER_COMPRESS})",
                         high_note=f" (a cap of this checker; the paper uses {PAPER_COMPRESS})")
        if f:
            yield f
    block_valid = block_ok and 1 <= c.block <= MAX_COMPRESS_BLOCK
    if stride_ok and c.stride < 1:
        if block_valid:
            proper = [x for x in _divisors(c.block) if x < c.block]
            guess = max(proper) if proper else c.block
            hint = (f"did you mean stride={guess}? (a divisor of block={c.block}; stride=block gives"
                    " non-overlapping blocks)")
        else:
            hint = "did you mean stride=1?"
        yield _error("compress.stride.range", f"compress.stride must be at least 1; got {c.stride}",
                     c.at("stride"), hint)
    if block_ok and stride_ok and c.block >= 1 and c.stride >= 1 and c.block % c.stride != 0:
        options = []
        if block_valid:
            options.append(f"{_or(_nearest(c.stride, _divisors(c.block)), 'stride=')} (divisors of {c.block})")
        blocks = _multiples_near(c.block, c.stride, 1, MAX_COMPRESS_BLOCK)
        if blocks:
            options.append(f"{_or(blocks, 'block=')} (multiples of {c.stride})")
        yield _error("compress.divisible",
                     f"compress.stride must divide compress.block ({c.block}); got {c.stride}", c.at("stride"),
                     f"did you mean {', or '.join(options)}?" if options
                     else "stride must divide block (stride=block, non-overlapping blocks, always does)")


def _check_select(s: Select, compress: Optional[Compress], bad: set) -> Iterator[Finding]:
    block_ok = "select.block" not in bad
    top_ok = "select.top" not in bad
    init_ok, local_ok = "select.initial" not in bad, "select.local" not in bad
    stride = None
    if isinstance(compress, Compress) and _is_int(compress.stride) and compress.stride >= 1:
        stride = compress.stride

    if block_ok and not (SELECT_BLOCK_MIN <= s.block <= SELECT_BLOCK_MAX and _is_pow2(s.block)):
        choices = _select_blocks(stride) or _select_blocks()
        yield _error("select.block.range",
                     f"select.block must be a power of two between {SELECT_BLOCK_MIN} and {SELECT_BLOCK_MAX};"
                     f" got {s.block}", s.at("block"),
                     f"did you mean {_or(_nearest(s.block, choices))}? (the block is a tile dimension of the"
                     " selection kernel)")
    if block_ok and stride is not None and s.block % stride != 0:
        choices = _select_blocks(stride)
        if choices:
            hint = f"did you mean {_or(_nearest(s.block, choices))}?"
        else:
            hint = (f"no power of two from {SELECT_BLOCK_MIN} to {SELECT_BLOCK_MAX} is a multiple of {stride};"
                    f" make compress.stride a power of two that divides compress.block (e.g. {PAPER_COMPRESS})")
        yield _error("select.block.stride",
                     f"select.block must be a multiple of compress.stride ({stride}); got {s.block}",
                     s.at("block"), hint)

    if top_ok:
        f = _range_error("select.top.range", s, "top", s.top, 1, MAX_TOP, "the number of selected blocks",
                         high_note=f" (a cap of this checker: {MAX_TOP} blocks of {SELECT_BLOCK_MIN} tokens already"
                                   f" cover {MAX_TOP * SELECT_BLOCK_MIN} positions)")
        if f:
            yield f
    for key, ok in (("initial", init_ok), ("local", local_ok)):
        value = getattr(s, key)
        if ok and value < 0:
            yield _error(f"select.{key}.range", f"select.{key} must be at least 0; got {value}", s.at(key),
                         f"did you mean {key}=0?")
    if not (top_ok and init_ok and local_ok):
        return
    forced = s.initial + s.local
    if s.top < forced:
        yield _error("select.top.forced",
                     f"select.top must be at least initial + local = {s.initial} + {s.local} = {forced}"
                     f" (the forced blocks are always selected); got {s.top}", s.at("top"),
                     f"did you mean top={forced}? or force fewer blocks (initial + local <= {s.top})")
    if compress is None and s.top > forced:
        yield _error("select.top.unranked",
                     f"select.top = {s.top} exceeds initial + local = {forced}, but the pattern has no compress"
                     f" branch: nothing else ranks blocks to choose the other {s.top - forced}", s.at("top"),
                     f"add a compress statement (e.g. `{PAPER_COMPRESS}`; its attention scores rank the blocks),"
                     f" or set top={forced} for a static pattern of only the forced blocks")


def _check_window(w: Window, bad: set) -> Iterator[Finding]:
    if "window.size" in bad:
        return
    f = _range_error("window.size.range", w, "size", w.size, 1, MAX_WINDOW,
                     "positions each query attends to, itself included",
                     low_note=" (the paper uses size=512)", high_note=" (positions are int32 in the kernels)")
    if f:
        yield f


def _check_combine(pattern: Pattern) -> Iterator[Finding]:
    c = pattern.combine
    if not isinstance(c, Combine) or not isinstance(c.branches, tuple):
        return  # a type error
    declared = pattern.declared_branches
    listed = ", ".join(b.value for b in declared) or "none"
    if not c.branches:
        yield _error("combine.empty", "combine names no branch", c.span,
                     f"name some of the declared branches ({listed}), or drop combine to combine them all")
        return
    statement = {Branch.CMP: "compress", Branch.SLC: "select", Branch.SWA: "window"}
    for b in c.branches:
        if isinstance(b, Branch) and b not in declared:
            yield _error("combine.undeclared",
                         f"combine names {b.value}, but the pattern declares no {statement[b]} branch",
                         c.at(b.value),
                         f"declared: {listed}; remove {b.value} from combine or add a {statement[b]} statement")


def _check_pattern(pattern: Pattern) -> Iterator[Finding]:
    if pattern.heads is None:
        yield _error("pattern.heads", f"pattern {pattern.name!r} has no heads statement", pattern.span,
                     "add e.g. `heads q=64 kv=4`")
    if pattern.dims is None:
        yield _error("pattern.dims", f"pattern {pattern.name!r} has no dims statement", pattern.span,
                     "add e.g. `dims qk=128 v=128`")
    if not pattern.declared_branches:
        yield _error("pattern.branches",
                     f"pattern {pattern.name!r} declares no attention branch: it needs at least one of"
                     " compress, select, window", pattern.span,
                     "e.g. `window size=512` for sliding-window attention")


def _check_dtype(pattern: Pattern) -> Iterator[Finding]:
    d = pattern.dtype
    if isinstance(d, DTypes) and d.dtypes == ():
        yield _error("dtype.empty", "dtype lists no element type", d.span,
                     "list some of bf16, fp16, fp32, or drop the dtype line to allow all three")


# ---------------------------------------------------------------------------
# Warnings: legal, but wasteful on the hardware
# ---------------------------------------------------------------------------
def _warn_group(h: Heads) -> Iterator[Finding]:
    g = h.q // h.kv
    bigger = [kv for kv in _divisors(h.q) if h.q // kv >= MMA_ROWS]
    if g < MMA_ROWS:
        if bigger:
            best = max(bigger, key=lambda kv: (_is_pow2(h.q // kv), kv))
            hint = f"kv={best} gives G={h.q // best}"
        else:
            hint = f"q={h.q} query heads cannot form a group of {MMA_ROWS}; kv=1 gives the largest, G={h.q}"
        yield _warning("heads.group.small",
                       f"GQA group G = q/kv = {h.q}/{h.kv} = {g} is below {MMA_ROWS}: the selection kernel loads"
                       f" each selected key block for the {g} query head(s) of a group, but a tensor-core tile has"
                       f" {MMA_ROWS} rows, so only {g}/{MMA_ROWS} of them are sure to use the block (the rest are"
                       f" padding or neighbouring positions that may not have selected it); the planner then"
                       f" weighs a block-centric loop order, which gathers the positions that chose each block"
                       f" (see check --explain)",
                       h.at("kv"), hint)
    elif not _is_pow2(g):
        rows = _next_pow2(g)
        pow2 = [kv for kv in bigger if _is_pow2(h.q // kv)]
        hint = (f"kv={max(pow2)} gives G={h.q // max(pow2)}" if pow2
                else "choose q and kv so that q/kv is a power of two")
        yield _warning("heads.group.pow2",
                       f"GQA group G = q/kv = {h.q}/{h.kv} = {g} is not a power of two: the selection kernel"
                       f" pads it to {rows} rows, {_percent((rows - g) / rows)} of them padding", h.at("kv"), hint)


def _warn_dims(d: Dims, skip: set) -> Iterator[Finding]:
    for key, product in (("qk", "QK^T"), ("v", "PV")):
        value = getattr(d, key)
        if key in skip or _is_pow2(value):
            continue
        padded = _next_pow2(value)
        yield _warning(f"dims.{key}.pad",
                       f"dims.{key} = {value} is not a power of two: kernels pad it to {padded} in registers, so"
                       f" {_percent((padded - value) / padded)} of the {product} multiply-adds are on zero padding",
                       d.at(key),
                       f"memory traffic stays at {value}; {_or(_nearest(value, [1 << k for k in range(4, 9)]))}"
                       " would waste nothing")


def _warn_unused(pattern: Pattern) -> Iterator[Finding]:
    declared = pattern.declared_branches
    combined = set(pattern.combined_branches) & set(declared)
    if not combined:
        return  # an empty or wholly wrong combine is already an error
    used = set(combined)
    s = pattern.select
    if Branch.SLC in used and isinstance(s, Select) and s.top > s.initial + s.local:
        used.add(Branch.CMP)  # the compressed scores rank the selection blocks
    stmt = {Branch.CMP: pattern.compress, Branch.SLC: pattern.select, Branch.SWA: pattern.window}
    word = {Branch.CMP: "compress", Branch.SLC: "select", Branch.SWA: "window"}
    for b in BRANCH_ORDER:
        if b not in declared or b in used:
            continue
        why = "neither combined nor used to rank selection blocks" if b is Branch.CMP else "not combined"
        yield _warning("branch.unused",
                       f"{word[b]} is declared but {why}: its kernels run and their output is discarded",
                       stmt[b].span, f"add {b.value} to combine, or remove the {word[b]} statement")


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------
def _heads_valid(h, bad: set, errors: list) -> bool:
    rules = {f.rule for f in errors}
    return isinstance(h, Heads) and not bad & {"heads.q", "heads.kv"} \
        and not rules & {"heads.q.range", "heads.kv.range", "heads.divisible"}


def validate(pattern: Pattern) -> tuple:
    """Every error and warning for `pattern`, errors first, each group in
    statement order. Pure: never raises for a bad pattern (a non-Pattern is
    a programming error and raises TypeError)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"validate expects an nsa_dsl.ir.Pattern, got {type(pattern).__name__}")
    errors, bad = _type_findings(pattern)
    errors.extend(_check_pattern(pattern))
    h, d, c, s, w = pattern.heads, pattern.dims, pattern.compress, pattern.select, pattern.window
    if isinstance(h, Heads):
        errors.extend(_check_heads(h, bad))
    if _heads_valid(h, bad, errors) and isinstance(s, Select) and not bad & {"select.top", "select.initial",
                                                                             "select.local"}:
        errors.extend(_check_group(h, s))
    if isinstance(d, Dims):
        errors.extend(_check_dims(d, bad))
    if isinstance(c, Compress):
        errors.extend(_check_compress(c, bad))
    if isinstance(s, Select):
        errors.extend(_check_select(s, c, bad))
    if isinstance(w, Window):
        errors.extend(_check_window(w, bad))
    errors.extend(_check_combine(pattern))
    errors.extend(_check_dtype(pattern))

    warnings = []
    rules = {f.rule for f in errors}
    if _heads_valid(h, bad, errors) and isinstance(s, Select):
        warnings.extend(_warn_group(h))
    if isinstance(d, Dims):
        invalid = {k for k in ("qk", "v") if f"dims.{k}" in bad or f"dims.{k}.range" in rules}
        warnings.extend(_warn_dims(d, invalid))
    if not bad and not rules & {"type", "combine.empty"}:
        warnings.extend(_warn_unused(pattern))
    return tuple(errors) + tuple(warnings)


def errors_of(diagnostics: Iterable[Diagnostic]) -> tuple:
    return tuple(d for d in diagnostics if d.severity == "error")


def warnings_of(diagnostics: Iterable[Diagnostic]) -> tuple:
    return tuple(d for d in diagnostics if d.severity == "warning")


def raise_if_invalid(pattern: Pattern) -> tuple:
    """Raise SpecError holding every error of `pattern`; otherwise return its
    warnings (possibly empty)."""
    found = validate(pattern)
    errors = errors_of(found)
    if errors:
        raise SpecError(errors)
    return warnings_of(found)


# ---------------------------------------------------------------------------
# A whole file: the parser's errors and every pattern's findings together
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Report:
    """What `nsa-dsl check` says about one file.

    diagnostics: every syntax, structure and rule error and every warning,
      in file order, each once (a pattern inherits its parent's statements,
      and with them the same finding at the same spot).
    checked: (pattern, its findings, complete) per pattern built; complete is
      False when text the pattern may own was skipped after a syntax error,
      so that only the findings that cannot come from the skip are kept.
    """

    diagnostics: tuple
    checked: tuple

    @property
    def errors(self) -> tuple:
        return errors_of(self.diagnostics)


def trusted(finding: Finding, unsure) -> bool:
    """Whether `finding` stands whatever the skipped text held: its rule
    reads none of the `unsure` statements."""
    if not unsure:
        return True
    return "*" not in unsure and not READS[finding.rule] & set(unsure)


def check_parsed(parsed) -> Report:
    """Validate every pattern of a file read by nsa_dsl.parse.parse_source
    or load_source (a Parsed; read by its fields, as this module imports no
    parser), keeping the findings that the parser's recovery cannot have
    caused, next to the parser's own diagnostics."""
    found = list(parsed.diagnostics)
    checked = []
    for pattern in parsed.patterns:
        unsure = parsed.unsure.get(pattern.name, frozenset())
        findings = tuple(f for f in validate(pattern) if trusted(f, unsure))
        checked.append((pattern, findings, not unsure))
        found.extend(findings)
    return Report(_in_file_order(found), tuple(checked))


def _in_file_order(diagnostics: Iterable[Diagnostic]) -> tuple:
    seen, unique = set(), []
    for d in diagnostics:
        key = (d.severity, d.message, d.span, d.hint)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    # Stable: the findings at one spot keep the checker's order.
    return tuple(sorted(unique, key=lambda d: (d.span.line, d.span.column) if d.span is not None else (0, 0)))
