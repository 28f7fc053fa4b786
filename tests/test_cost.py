"""The cost model against brute force: the closed forms in T must equal sums
over every position t, counted here straight from NSA_MATH.md (the selection
is even simulated block by block), never from the model's own formulas."""
from __future__ import annotations

import random
from fractions import Fraction

import pytest
import sympy
from hypothesis import given, settings, strategies as st

import nsa_dsl.cost as cost_module
from nsa_dsl.cost import (CostRow, by_length, compressed_keys, compressed_tokens, cost_model, explain, format_expr,
                          format_range)
from nsa_dsl.errors import SpecError
from nsa_dsl.geometry import num_compressed, visible_compressed
from nsa_dsl.ir import Branch, Combine, Compress, Dims, Heads, Pattern, Pool, Select, Window


def make(heads=(64, 4), dims=(128, 128), compress=None, select=None, window=None, combine=None, pool=Pool.MEAN):
    return Pattern(
        name="p", heads=Heads(q=heads[0], kv=heads[1]), dims=Dims(qk=dims[0], v=dims[1]),
        compress=Compress(block=compress[0], stride=compress[1], pool=pool) if compress else None,
        select=Select(block=select[0], top=select[1], initial=select[2], local=select[3]) if select else None,
        window=Window(size=window) if window else None,
        combine=Combine(branches=tuple(Branch(b) for b in combine)) if combine else None)


SANITY = make(compress=(32, 16), select=(64, 16, 1, 2), window=512)


# ---------------------------------------------------------------------------
# Brute force, position by position
# ---------------------------------------------------------------------------
def visible_compressed(t, block, stride):
    """Compressed token i covers [i*d, i*d + l); visible iff i*d + l - 1 <= t."""
    count, i = 0, 0
    while i * stride + block - 1 <= t:
        count, i = count + 1, i + 1
    return count


def selected_key_count(t, block, top, initial, local, rank):
    """Simulate the selection of query t: forced blocks, then the others in
    the order `rank` gives, top in all; count the keys <= t they hold."""
    current = t // block
    visible = list(range(current + 1))
    if len(visible) <= top:
        chosen = set(visible)
    else:
        chosen = {j for j in range(initial)} | {j for j in range(current - local + 1, current + 1)}
        chosen &= set(visible)
        for j in rank([j for j in visible if j not in chosen]):
            if len(chosen) == top:
                break
            chosen.add(j)
    assert len(chosen) == min(top, len(visible))
    return sum(min((j + 1) * block, t + 1) - j * block for j in chosen)


def lowest_first(blocks):
    return sorted(blocks)


def brute_force(p: Pattern, length: int, rank=lowest_first) -> dict:
    """FLOPs per token of each branch (Fractions), counted query by query."""
    hq, dqk, dv = p.heads.q, p.dims.qk, p.dims.v
    combined = p.combine.branches if p.combine else (Branch.CMP, Branch.SLC, Branch.SWA)
    out = {}
    c, s, w = p.compress, p.select, p.window
    if c is not None:
        per_key = 2 * dqk + (2 * dv if Branch.CMP in combined else 0)
        out["cmp"] = sum(per_key * visible_compressed(t, c.block, c.stride) for t in range(length))
    if s is not None:
        if s.top > s.initial + s.local:
            out["scoring"] = sum(2 * dqk * visible_compressed(t, c.block, c.stride) for t in range(length))
        out["slc"] = sum(2 * (dqk + dv) * selected_key_count(t, s.block, s.top, s.initial, s.local, rank)
                         for t in range(length))
    if w is not None:
        out["swa"] = sum(2 * (dqk + dv) * len(range(max(0, t - w.size + 1), t + 1)) for t in range(length))
    out = {k: Fraction(hq * v, length) for k, v in out.items()}
    out["total"] = sum(out.values())
    out["dense"] = Fraction(hq * sum(2 * (dqk + dv) * (t + 1) for t in range(length)), length)
    return out


def model_values(p: Pattern, length: int) -> dict:
    cost = cost_model(p)
    got = {t.name: cost.at(t.flops, length) for t in cost.terms}
    got["total"] = cost.at(cost.total, length)
    got["dense"] = cost.at(cost.dense, length)
    return {k: Fraction(int(v.p), int(v.q)) for k, v in got.items()}


SMALL = [
    make(heads=(4, 2), dims=(16, 32), compress=(4, 2), select=(4, 3, 1, 1), window=5),
    make(heads=(2, 1), dims=(32, 16), compress=(6, 3), select=(6, 2, 0, 1), window=1),
    make(heads=(3, 3), dims=(16, 16), compress=(4, 4), select=(8, 4, 2, 0)),  # local = 0: upper bound
    make(heads=(8, 1), dims=(16, 16), compress=(8, 2), select=(4, 5, 1, 2), combine=("slc",)),  # cmp ranks only
    make(heads=(1, 1), dims=(16, 16), select=(4, 3, 1, 2), window=7),  # static selection, no compress
    make(heads=(2, 2), dims=(48, 16), compress=(5, 1), pool=Pool.MLP),
]


@pytest.fixture
def unchecked(monkeypatch):
    """The tiny patterns above break the checker's minimum sizes (4-token
    blocks); the model itself is plain arithmetic, so skip the check."""
    monkeypatch.setattr(cost_module, "raise_if_invalid", lambda pattern: ())


@pytest.mark.parametrize("index", range(len(SMALL)))
def test_closed_forms_equal_brute_force_sums(index, unchecked):
    p = SMALL[index]
    for length in list(range(1, 41)) + [63, 64, 65, 97]:
        assert model_values(p, length) == brute_force(p, length), length


def test_local_zero_counts_the_upper_bound(unchecked):
    """With local = 0, whether the block holding t is picked depends on the
    scores; the model counts full blocks, the most any ranking can give."""
    p = SMALL[2]
    model = model_values(p, 70)["slc"]
    assert model == brute_force(p, 70, rank=lowest_first)["slc"]
    rng = random.Random(5)
    for _ in range(5):
        shuffled = brute_force(p, 70, rank=lambda blocks: rng.sample(blocks, len(blocks)))["slc"]
        assert shuffled <= model
    newest_first = brute_force(p, 70, rank=lambda blocks: sorted(blocks, reverse=True))["slc"]
    assert newest_first < model


@st.composite
def checked_patterns(draw):
    """Small patterns the checker accepts."""
    kv = draw(st.sampled_from([1, 2]))
    stride = draw(st.sampled_from([1, 2, 4, 8, 16]))
    compress = (stride * draw(st.integers(1, 4)), stride) if draw(st.booleans()) else None
    select = window = None
    if draw(st.booleans()):
        initial, local = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        top = max(1, initial + local) if compress is None else draw(st.integers(max(1, initial + local), 6))
        if compress is None and top > initial + local:
            local += 1
        select = (draw(st.sampled_from([16, 32])), top, initial, local)
    if draw(st.booleans()) or not (compress or select):
        window = draw(st.integers(1, 90))
    return make(heads=(kv * draw(st.sampled_from([1, 2, 16])), kv), dims=(16, draw(st.sampled_from([16, 32]))),
                compress=compress, select=select, window=window,
                pool=draw(st.sampled_from(list(Pool))))


@settings(max_examples=40)
@given(checked_patterns(), st.integers(1, 400))
def test_closed_forms_equal_brute_force_for_drawn_patterns(p, length):
    assert model_values(p, length) == brute_force(p, length)


# ---------------------------------------------------------------------------
# The sanity configuration of the brief
# ---------------------------------------------------------------------------
def per_position_totals(length):
    """FLOPs of the whole sequence for SANITY, per-position formulas (no
    simulation: fast enough for T = 65536). q=64 heads, Dqk = Dv = 128."""
    hq, d, l, stride, lb, top, w = 64, 128, 32, 16, 64, 16, 512
    nsa = dense = 0
    for t in range(length):
        n_cmp = (t - l + 1) // stride + 1 if t >= l - 1 else 0
        # local >= 1: the block holding t is always selected, partly visible
        n_slc = t + 1 if t // lb + 1 <= top else (top - 1) * lb + t % lb + 1
        n_swa = min(w, t + 1)
        nsa += hq * (4 * d * n_cmp + 2 * d * n_cmp + 4 * d * n_slc + 4 * d * n_swa)
        dense += hq * 4 * d * (t + 1)
    return nsa, dense


def test_per_position_formulas_match_the_simulation():
    for length in (1, 31, 32, 33, 1024, 1025, 1500):
        nsa, dense = per_position_totals(length)
        brute = brute_force(SANITY, length)
        assert Fraction(nsa, length) == brute["total"] and Fraction(dense, length) == brute["dense"]


def test_sanity_magnitudes_at_64k():
    length = 65536
    nsa, dense = per_position_totals(length)
    cost = cost_model(SANITY)
    assert cost.at(cost.total, length) * length == nsa
    assert cost.at(cost.dense, length) * length == dense
    assert dense == pytest.approx(4 * length**2 / 2 * 128 * 64, rel=1e-4)  # ~7.04e13
    assert 9e12 < nsa < 1.1e13
    assert cost.ratio_to_dense(length) == pytest.approx(dense / nsa, rel=1e-12)
    assert 6.5 < cost.ratio_to_dense(length) < 7.5


def test_smooth_forms_are_close_for_long_sequences():
    cost = cost_model(SANITY)
    for length in (8192, 65536):
        exact = float(cost.at(cost.total, length))
        smooth = float(cost.smooth_total.subs(cost.T, length))
        assert smooth == pytest.approx(exact, rel=1e-4)
    for term in cost.terms:
        assert not term.smooth.has(sympy.Piecewise, sympy.Mod, sympy.floor)


# ---------------------------------------------------------------------------
# Shape of the model
# ---------------------------------------------------------------------------
def test_monotonic_in_length_and_parameters():
    cost = cost_model(SANITY)
    totals = [cost.at(cost.total, n) for n in list(range(1, 80)) + list(range(80, 3000, 37))]
    assert all(a <= b for a, b in zip(totals, totals[1:]))
    ratios = [cost.ratio_to_dense(n) for n in (2048, 4096, 8192, 16384, 32768, 65536, 131072)]
    assert all(a < b for a, b in zip(ratios, ratios[1:]))
    at = 32768

    def total(**changes):
        base = dict(compress=(32, 16), select=(64, 16, 1, 2), window=512)
        base.update(changes)
        c = cost_model(make(**base))
        return c.at(c.total, at)

    assert total(select=(64, 8, 1, 2)) < total() < total(select=(64, 32, 1, 2))
    assert total(window=256) < total() < total(window=1024)
    assert total(compress=(32, 32)) < total()  # a coarser stride: fewer compressed tokens
    # a static selection skips the scoring recompute
    static = cost_model(make(compress=(32, 16), select=(64, 3, 1, 2), window=512))
    assert static.term("scoring") is None and cost.term("scoring") is not None


def test_dense_per_token_is_the_textbook_formula():
    cost = cost_model(SANITY)
    assert sympy.simplify(cost.dense - (128 + 128) * 64 * (cost.T + 1)) == 0


def test_bytes_count_inputs_and_outputs_once():
    window_only = cost_model(make(heads=(8, 2), dims=(64, 64), window=256))
    # q 8*64, k 2*64, v 2*64, one gate 8, o 8*64; two bytes each
    assert window_only.bytes == 2 * (512 + 128 + 128 + 8 + 512)
    assert cost_model(make(heads=(8, 2), dims=(64, 64), window=256), element_bytes=4).bytes == 4 * 1288
    mlp = cost_model(make(heads=(8, 2), dims=(64, 32), compress=(32, 16), pool=Pool.MLP))
    plain = 2 * (8 * 64 + 2 * 64 + 2 * 32 + 8 + 8 * 32)
    tc = (100 - 32) // 16 + 1  # compressed tokens at T = 100: passed in for mlp pooling
    assert mlp.at(mlp.bytes, 100) == sympy.Rational(plain * 100 + 2 * tc * 2 * (64 + 32), 100)
    assert compressed_tokens(32, 16).subs(sympy.Symbol("T", positive=True, integer=True), 31) == 0


@pytest.mark.parametrize("block,stride", [(32, 16), (8, 4), (4, 1), (16, 16), (5, 5), (1, 1)])
def test_sympy_token_counts_are_the_geometrys(block, stride):
    # The cost model's sympy Tc and its sum of visible tokens over t are
    # the sequence geometry's (nsa_dsl.geometry, the one owner) at every T.
    T = sympy.Symbol("T", positive=True, integer=True)
    tokens, (keys, _) = compressed_tokens(block, stride), compressed_keys(block, stride)
    seen = 0
    for length in range(1, 3 * block + 4 * stride + 2):
        seen += visible_compressed(length - 1, block, stride)
        assert tokens.subs(T, length) == num_compressed(length, block, stride), length
        assert keys.subs(T, length) == seen, length


def test_uncombined_compress_counts_scores_only():
    ranked = make(compress=(64, 64), select=(64, 8, 0, 1), combine=("slc",))
    full = make(compress=(64, 64), select=(64, 8, 0, 1))
    a, b = cost_model(ranked), cost_model(full)
    assert a.at(a.term("cmp").flops, 4096) * 2 == b.at(b.term("cmp").flops, 4096)  # Dqk = Dv


def test_table_and_explain():
    cost = cost_model(SANITY)
    rows = cost.table()
    assert [r.T for r in rows] == [8192, 16384, 32768, 65536] and all(isinstance(r, CostRow) for r in rows)
    assert rows[-1].ratio == pytest.approx(cost.ratio_to_dense(65536))
    assert rows[-1].flops * rows[-1].ratio == pytest.approx(rows[-1].dense_flops)
    text = explain(SANITY)
    for start in ("  cmp ", "  scoring ", "  slc ", "  swa ", "  total ", "  dense causal attention",
                  "minimum bytes", f"{'T':>8}  NSA FLOP/token"):
        assert f"\n{start}" in text
    for length in (8192, 16384, 32768, 65536):
        assert f"\n{length:>8}  " in text
    assert f"{cost.ratio_to_dense(65536):.2f}" in text.splitlines()[-1]


def test_rejected_patterns_have_no_cost():
    with pytest.raises(SpecError):
        cost_model(make(select=(64, 16, 1, 2)))  # top > forced without compress
    with pytest.raises(ValueError):
        cost_model(SANITY).ratio_to_dense(0)


# ---------------------------------------------------------------------------
# The readable forms explain prints
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(len(SMALL)))
def test_ranges_below_the_last_bound_are_exact(index, unchecked):
    """Each branch's formulas by range of T (Term.pieces through by_length):
    every range with an upper end equals the brute-force sum at each of
    its lengths; the open last range is the smooth form."""
    p = SMALL[index]
    cost = cost_model(p)
    for term in cost.terms:
        ranges = by_length(term.pieces)
        assert ranges[-1][0][1] is None and ranges[-1][1] == term.smooth
        for (lo, hi), expr in ranges[:-1]:
            for length in range(lo, hi + 1):
                assert expr.subs(cost.T, length) == brute_force(p, length)[term.name], (term.name, length)
    # the total's ranges add the branches' formulas that hold in each range

    def formula_at(ranges, length):
        return next(expr for (lo, hi), expr in ranges if lo <= length and (hi is None or length <= hi))

    for (lo, hi), expr in cost.total_by_length():
        for length in (lo, hi if hi is not None else lo + 1000):
            assert expr.subs(cost.T, length) == sum(formula_at(by_length(t.pieces), length).subs(cost.T, length)
                                                    for t in cost.terms)


def test_smooth_ranges_are_exact_on_average_over_a_period():
    """The last range averages T mod a block: over a whole period of T (the
    blocks' and strides' least common multiple) the sequence totals T*f(T)
    match the exact ones."""
    cost = cost_model(SANITY)
    (_, smooth), = cost.total_by_length()[-1:]
    start = 4096
    lengths = range(start, start + 64)  # lcm of stride 16 and select block 64
    assert sum(length * smooth.subs(cost.T, length) for length in lengths) == \
        sum(length * cost.at(cost.total, length) for length in lengths)
    (_, smooth_bytes), = by_length(cost_model(make(compress=(32, 16), pool=Pool.MLP)).bytes_pieces)[-1:]
    mlp = cost_model(make(compress=(32, 16), pool=Pool.MLP))
    assert sum(n * smooth_bytes.subs(mlp.T, n) for n in range(100, 116)) == \
        sum(n * mlp.at(mlp.bytes, n) for n in range(100, 116))


def test_format_expr_reads_back_to_four_digits():
    t = sympy.Symbol("T", positive=True, integer=True)
    assert format_expr(2048 * t + 61530112 - sympy.Integer(25503820800) / t) == "2048*T + 6.153e7 - 2.55e10/T"
    assert format_expr(20480 * t + 20480) == "20480*T + 20480"
    assert format_expr(sympy.Rational(1, 3) * t**2 - 5 - 7 / t**2) == "0.3333*T**2 - 5 - 7/T**2"
    assert format_expr(-t + sympy.Integer(3)) == "-T + 3"
    assert format_expr(sympy.Integer(0)) == "0"
    expr = sympy.Rational(123456789, 7) * t - sympy.Rational(5, 3) + sympy.Integer(10) ** 9 / t
    back = sympy.sympify(format_expr(expr), locals={"T": t})
    for length in (1, 100, 10**6):
        assert float(back.subs(t, length)) == pytest.approx(float(expr.subs(t, length)), rel=1e-3)
    with pytest.raises(ValueError):
        format_expr(sympy.sqrt(t))
    assert [format_range(1, 31), format_range(32, 512), format_range(513, None), format_range(1, None)] == \
        ["T <= 31", "32 <= T <= 512", "T >= 513", "any T"]
