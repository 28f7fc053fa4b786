"""The cost model: attention FLOPs and minimum bytes per token, in sympy.

Everything is a sympy expression in the sequence length T (a positive integer
symbol) for one causal sequence (batch 1), all query heads together, averaged
over the positions t = 0 .. T-1 (so "per token" means: the sum over the
sequence divided by T). The selection loop-order model, plain floats at a
given T, is loop_order.py's.

What is counted (NSA_MATH.md defines the branches):

* FLOPs: the two matmuls of attention, QK^T and PV, a multiply-add counting
  2 FLOPs, over the keys a query actually attends to. A query head attending
  to n keys costs 2*Dqk*n (QK^T) + 2*Dv*n (PV).
    - cmp: query t sees n_cmp(t) = max(0, floor((t - l + 1)/d) + 1) compressed
      tokens (token i is visible iff i*d + l - 1 <= t). QK^T always (its
      log-sum-exp ranks blocks); PV only when cmp is combined into the output.
    - scoring: when top > initial + local the block ranking recomputes the
      compressed scores QK^T, n_cmp(t) keys per head again (the kernel streams
      them rather than storing probabilities). A static selection has none.
    - slc: the keys of the selected blocks at positions <= t. With
      nb = floor(t/l') + 1 visible blocks: nb <= top selects them all, t + 1
      keys. Otherwise top blocks: with local >= 1 the block holding t is one of
      them and is only partly visible, so top*l' - (l' - 1 - t mod l') keys,
      exactly; with local = 0 whether that block is picked depends on the data
      and the model counts top*l' (an upper bound, off by < l' per query).
    - swa: min(w, t + 1) keys.
    - dense: causal attention over t + 1 keys, i.e. (Dqk + Dv)*HQ*(T + 1) per
      token.
  Not counted: mean pooling, softmax, the overlap-weighted block scores and
  the top-n, the gated combine, padding of head dims to powers of two. They
  are O(T) elementwise work or waste the checker warns about separately.

* Bytes (minimum traffic): every input read once and every output written
  once, in `element_bytes` per element (2: bf16/fp16): q, k, v, one gate per
  combined branch, k_cmp and v_cmp when the pattern pools by `mlp` (they are
  inputs then; Tc of them), and o. Intermediates (mean-pooled k/v, log-sum-exp,
  block indices, per-branch outputs) and separate window keys (k_swa, v_swa)
  are not counted: a kernel that keeps them on chip would not move them.

The per-branch sums have exact closed forms (Piecewise in T for the short
sequences, Mod for the remainders), so `ratio_to_dense` and `table` are exact:
they substitute an integer T. `smooth` forms drop the Piecewise (T beyond every
block and window size) and replace each remainder by its mean over the
residues; they are for reading, exact on average and within O(l'/T) per token.
`pieces` keep the short-sequence cases too: one formula per range of T (the
ranges below a block or window are exact, the last one is the smooth form),
which `by_length` adds up across branches and `format_expr` prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import sympy

from .check import raise_if_invalid
from .ir import Branch, Pattern, Pool

T = sympy.Symbol("T", positive=True, integer=True)

DEFAULT_TS = (8192, 16384, 32768, 65536)


# ---------------------------------------------------------------------------
# Key counts summed over t = 0 .. T-1: (exact, smooth) per head
# ---------------------------------------------------------------------------
def compressed_keys(block: int, stride: int, length=T) -> tuple:
    """sum over t of n_cmp(t) = max(0, floor((t - l + 1)/d) + 1).

    With N = T - l + 1 queries that see any token and r = N mod d, the sum of
    floor(u/d) + 1 over u < N is (N^2 + d*N + r*(d - r)) / (2d)."""
    l, d = sympy.Integer(block), sympy.Integer(stride)
    n = length - l + 1
    r = sympy.Mod(n, d)
    exact = sympy.Piecewise((0, length < l), ((n**2 + d * n + r * (d - r)) / (2 * d), True))
    smooth = (n**2 + d * n + (d**2 - 1) / 6) / (2 * d)
    return exact, smooth


def selected_keys(block: int, top: int, local: int, length=T) -> tuple:
    """sum over t of the keys of the selected blocks at positions <= t.

    K = top*l' keys fit in the selection: while T <= K every query sees all of
    its past, T(T+1)/2. Beyond, each query has K keys, less (when local >= 1)
    the unseen tail l' - 1 - (t mod l') of its own block; that tail sums to
    ((l' - 1)*M + r*(l' - r))/2 over the M = T - K later queries, r = M mod l'."""
    lb, k = sympy.Integer(block), sympy.Integer(top * block)
    partial = 1 if local >= 1 else 0
    m = length - k
    r = sympy.Mod(length, lb)  # = M mod l', since K is a multiple of l'
    head = k * (k + 1) / 2 + m * k
    exact = sympy.Piecewise((length * (length + 1) / 2, length <= k),
                            (head - partial * ((lb - 1) * m + r * (lb - r)) / 2, True))
    smooth = head - partial * ((lb - 1) * m + (lb**2 - 1) / 6) / 2
    return exact, smooth


def window_keys(size: int, length=T) -> tuple:
    """sum over t of min(w, t + 1)."""
    w = sympy.Integer(size)
    far = w * (w + 1) / 2 + (length - w) * w
    return sympy.Piecewise((length * (length + 1) / 2, length <= w), (far, True)), far


def dense_keys(length=T):
    """sum over t of t + 1."""
    return length * (length + 1) / 2


def compressed_tokens(block: int, stride: int, length=T):
    """Tc = max(0, floor((T - l)/d) + 1)."""
    return sympy.Piecewise((0, length < block), (sympy.floor((length - block) / sympy.Integer(stride)) + 1, True))


def compressed_tokens_smooth(block: int, stride: int, length=T):
    """Tc for T >= l with the floor's remainder averaged: (T - l)/d + 1 -
    (d - 1)/(2d)."""
    d = sympy.Integer(stride)
    return (length - block) / d + (d + 1) / (2 * d)


# ---------------------------------------------------------------------------
# Formulas by range of T, for reading
# ---------------------------------------------------------------------------
def _upper_bound(condition) -> int:
    """The largest integer T a piece's condition (T < a or T <= b) allows."""
    if isinstance(condition, sympy.StrictLessThan) and condition.lhs == T and condition.rhs.is_Integer:
        return int(condition.rhs) - 1
    if isinstance(condition, sympy.LessThan) and condition.lhs == T and condition.rhs.is_Integer:
        return int(condition.rhs)
    raise ValueError(f"not a bound on T: {condition}")


def pieces_of(exact, smooth) -> tuple:
    """((upper, expr), ..., (None, smooth)): the exact Piecewise's short-
    sequence cases (each holds for T <= upper, after the previous one),
    then the smooth form for every longer T. The short cases carry no
    remainder (Mod or floor), so they are exact."""
    if not isinstance(exact, sympy.Piecewise):
        return ((None, smooth),)
    short = tuple((_upper_bound(cond), expr) for expr, cond in exact.args[:-1])
    return tuple((upper, expr) for upper, expr in short if upper >= 1) + ((None, smooth),)


def _piece_at(pieces: tuple, length: int):
    for upper, expr in pieces:
        if upper is None or length <= upper:
            return expr
    raise AssertionError("the last piece has no upper bound")


def by_length(*piece_lists) -> tuple:
    """The sum of several pieces_of() lists, one formula per range of T:
    (((lo, hi), expr), ...) with hi None for the last range (T >= lo)."""
    bounds = sorted({upper for pieces in piece_lists for upper, _ in pieces if upper is not None})
    ranges, lo = [], 1
    for hi in bounds + [None]:
        if hi is not None and hi < lo:
            continue
        at = lo if hi is None else hi
        ranges.append(((lo, hi), sympy.expand(sympy.Add(*(_piece_at(p, at) for p in piece_lists)))))
        lo = None if hi is None else hi + 1
    return tuple(ranges)


def format_range(lo: int, hi: Optional[int]) -> str:
    if hi is None:
        return f"T >= {lo}" if lo > 1 else "any T"
    return f"T <= {hi}" if lo <= 1 else (f"T = {lo}" if lo == hi else f"{lo} <= T <= {hi}")


def _format_number(value) -> str:
    """Integers up to six digits exactly, anything else to four significant
    digits (the model's own inputs are rounder than that)."""
    if value.is_Integer and abs(value) < 10**6:
        return str(int(value))
    text = f"{float(value):.4g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def format_expr(expr) -> str:
    """A sum of c*T^k (k an integer, possibly negative) written the way a
    person reads it, highest power of T first: `2048*T + 6.153e7 - 2.55e10/T`.
    sympy.sympify of the result gives the expression back to four
    significant digits per coefficient."""
    expr = sympy.expand(expr)
    if expr.free_symbols - {T}:
        raise ValueError(f"{expr} is not an expression in T alone")
    terms = sympy.collect(expr, T, evaluate=False)
    by_power = []
    for monomial, coeff in terms.items():
        base, power = (T, sympy.Integer(0)) if monomial == 1 else monomial.as_base_exp()
        if base != T or not power.is_Integer or not coeff.is_Rational:
            raise ValueError(f"{expr} is not a sum of rational multiples of powers of T")
        by_power.append((int(power), coeff))
    parts = []
    for power, coeff in sorted(by_power, reverse=True):
        if coeff == 0:
            continue
        sign = "-" if coeff < 0 else "+"
        magnitude = abs(coeff)
        number = _format_number(magnitude)
        if power == 0:
            body = number
        else:
            var = "T" if abs(power) == 1 else f"T**{abs(power)}"
            if power > 0:
                body = var if magnitude == 1 else f"{number}*{var}"
            else:
                body = f"{number}/{var}"
        parts.append((sign, body))
    if not parts:
        return "0"
    text = ("-" if parts[0][0] == "-" else "") + parts[0][1]
    for sign, body in parts[1:]:
        text += f" {sign} {body}"
    return text


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    """One branch's attention FLOPs per token (all heads)."""

    name: str  # "cmp", "scoring", "slc" or "swa"
    what: str  # what is counted, in words
    flops: sympy.Expr  # exact, Piecewise/Mod in T
    smooth: sympy.Expr  # for T beyond every block and window size, remainders averaged
    pieces: tuple = ()  # ((upper, expr), ..., (None, smooth)): by range of T (pieces_of)
    short: str = ""  # `what` in a few words, for explain's one line per branch


class CostRow(NamedTuple):
    T: int
    flops: float  # NSA FLOPs per token, every declared branch
    dense_flops: float  # dense causal attention FLOPs per token
    ratio: float  # dense / NSA
    bytes: float  # minimum bytes per token
    intensity: float  # NSA FLOPs per minimum byte


@dataclass(frozen=True)
class Cost:
    pattern: Pattern
    T: sympy.Symbol
    terms: tuple  # of Term, one per branch that does attention work, in the order cmp, scoring, slc, swa
    total: sympy.Expr  # sum of the terms' flops
    smooth_total: sympy.Expr
    dense: sympy.Expr  # dense causal attention FLOPs per token, (Dqk + Dv)*HQ*(T + 1)
    bytes: sympy.Expr  # minimum bytes per token (see the module docstring)
    element_bytes: int = 2
    bytes_pieces: tuple = ()  # the bytes by range of T (pieces_of)

    def term(self, name: str) -> Optional[Term]:
        for t in self.terms:
            if t.name == name:
                return t
        return None

    def at(self, expr: sympy.Expr, length: int) -> sympy.Rational:
        """The exact value of one of this model's expressions at T = length."""
        if length < 1:
            raise ValueError(f"sequence length must be at least 1, got {length}")
        value = expr.subs(self.T, sympy.Integer(length))
        if not value.is_Rational:
            raise ValueError(f"{expr} did not evaluate to a number at T={length}: {value}")
        return value

    def total_by_length(self) -> tuple:
        """Total attention FLOPs per token, one formula per range of T
        (((lo, hi), expr), ...): exact below the last block or window size,
        the smooth form from there on."""
        return by_length(*(t.pieces for t in self.terms))

    def ratio_to_dense(self, length: int) -> float:
        """Predicted dense / NSA attention FLOPs at sequence length `length`
        (exact sums, not the smooth approximation)."""
        return float(self.at(self.dense, length) / self.at(self.total, length))

    def table(self, Ts=DEFAULT_TS) -> tuple:  # noqa: N803 - T is the model's name for the length
        rows = []
        for length in Ts:
            flops, dense, nbytes = (self.at(e, length) for e in (self.total, self.dense, self.bytes))
            rows.append(CostRow(int(length), float(flops), float(dense), float(dense / flops), float(nbytes),
                                float(flops / nbytes)))
        return tuple(rows)


def cost_model(pattern: Pattern, element_bytes: int = 2) -> Cost:
    """The cost of `pattern` per token as sympy expressions in T. Raises
    SpecError for a pattern the checker rejects (the formulas assume its rules)."""
    raise_if_invalid(pattern)
    p = pattern
    hq, hkv = p.heads.q, p.heads.kv
    dqk, dv = p.dims.qk, p.dims.v
    combined = p.combined_branches
    terms = []

    def add(name, what, short, flops_per_key, keys):
        exact, smooth = keys
        per_token = hq * flops_per_key / T
        pieces = tuple((upper, sympy.expand(per_token * e)) for upper, e in pieces_of(exact, smooth))
        terms.append(Term(name, what, per_token * exact, sympy.expand(per_token * smooth), pieces, short))

    c, s, w = p.compress, p.select, p.window
    if c is not None:
        keys = compressed_keys(c.block, c.stride)
        if Branch.CMP in combined:
            add("cmp", "compressed attention, QK^T and PV over the visible compressed tokens",
                "QK^T+PV over the compressed tokens", 2 * (dqk + dv), keys)
        else:
            add("cmp", "compressed attention, QK^T only (its log-sum-exp ranks blocks; cmp is not combined)",
                "QK^T only (ranks blocks; not combined)", 2 * dqk, keys)
    if s is not None:
        if not s.is_static:
            add("scoring", "block scoring: QK^T over the visible compressed tokens recomputed to rank blocks",
                "QK^T again, to rank blocks", 2 * dqk, compressed_keys(c.block, c.stride))
        add("slc", f"selection, QK^T and PV over the keys <= t of the {s.top} selected blocks of {s.block}",
            f"QK^T+PV over {s.top} blocks of {s.block}", 2 * (dqk + dv), selected_keys(s.block, s.top, s.local))
    if w is not None:
        add("swa", f"sliding window, QK^T and PV over the last {w.size} positions",
            f"QK^T+PV over the last {w.size}", 2 * (dqk + dv), window_keys(w.size))

    total = sympy.Add(*(t.flops for t in terms))
    smooth_total = sympy.expand(sympy.Add(*(t.smooth for t in terms)))
    dense = sympy.expand(2 * (dqk + dv) * hq * dense_keys() / T)

    per_token = hq * dqk + hkv * dqk + hkv * dv + hq * len(combined) + hq * dv  # q, k, v, gates, o
    nbytes = sympy.Integer(element_bytes * per_token)
    bytes_pieces = ((None, nbytes),)
    if c is not None and c.pool is Pool.MLP:
        per_compressed = element_bytes * hkv * (dqk + dv) / T
        tc = compressed_tokens(c.block, c.stride)
        bytes_pieces = tuple((upper, sympy.expand(nbytes + per_compressed * e))
                             for upper, e in pieces_of(tc, compressed_tokens_smooth(c.block, c.stride)))
        nbytes += per_compressed * tc
    return Cost(p, T, tuple(terms), total, smooth_total, dense, nbytes, element_bytes, bytes_pieces)


def _num(x: float) -> str:
    return f"{x:.3e}"


def format_pieces(ranges) -> str:
    """by_length() output as `T <= 31: 0;  T >= 32: 1280*T - ...`."""
    return ";  ".join(f"{format_range(*span)}: {format_expr(expr)}" for span, expr in ranges)


def _long_run_ratio(cost: Cost) -> str:
    """Where dense/NSA heads as T grows: the ratio of the leading terms."""
    (_, last), = cost.total_by_length()[-1:]
    limit = sympy.limit(cost.dense / last, T, sympy.oo)
    if limit is sympy.oo:
        return ("dense/NSA grows without bound with T (NSA FLOPs per token stop growing past the last block or"
                " window)")
    return f"dense/NSA tends to {float(limit):.2f} as T grows (the ratio of the T terms)"


def explain(pattern: Pattern, Ts=DEFAULT_TS, element_bytes: int = 2) -> str:  # noqa: N803
    """The cost model in words, one line per branch: attention FLOPs per
    token as formulas in T by range of T (format_expr: no Piecewise), their
    total past the last block or window size, dense attention, minimum
    bytes, and the dense/NSA table at the lengths Ts. Cost's expressions
    keep the exact forms for code."""
    cost = cost_model(pattern, element_bytes)
    p = pattern
    lines = [f"cost per token of a causal sequence of T positions (batch 1, all {p.heads.q} query heads)",
             "attention FLOPs (a multiply-add is 2), exact up to each block or window size, then with T mod a"
             " block averaged:"]
    width = max((len(t.short) for t in cost.terms), default=0)
    for t in cost.terms:
        lines.append(f"  {t.name:<8} {t.short:<{width}}  {format_pieces(by_length(t.pieces))}")
    ranges = cost.total_by_length()
    if len(cost.terms) > 1:
        shorter = "; shorter T: add the lines above" if len(ranges) > 1 else ""
        lines.append(f"  {'total':<8} {format_pieces(ranges[-1:])}{shorter}")
    lines.append(f"  dense causal attention: {format_expr(cost.dense)};  {_long_run_ratio(cost)}")
    lines.append(f"minimum bytes per token ({element_bytes}-byte elements, inputs read and output written once):"
                 f" {format_pieces(by_length(cost.bytes_pieces))}")
    header = f"{'T':>8}  {'NSA FLOP/token':>14}  {'dense FLOP/token':>16}  {'dense/NSA':>9}  {'bytes/token':>11}" \
             f"  {'FLOP/byte':>9}"
    lines.append(header)
    for row in cost.table(Ts):
        lines.append(f"{row.T:>8}  {_num(row.flops):>14}  {_num(row.dense_flops):>16}  {row.ratio:>9.2f}"
                     f"  {row.bytes:>11.0f}  {row.intensity:>9.1f}")
    return "\n".join(lines)
