"""`nsa-dsl check --explain` for a newcomer: Plan.explain() and
cost.explain() of every example pattern fit in 40 lines, print formulas a
person reads (no sympy Piecewise), still name every kernel and the loop
order, and the printed formulas are the cost model's numbers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import sympy

import nsa_dsl
from nsa_dsl.cost import cost_model, explain as explain_cost
from nsa_dsl.plan import apply_overrides

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PATTERNS = [p for path in sorted(EXAMPLES.glob("*.nsa")) for p in nsa_dsl.parse_all(path.read_text())]
T = sympy.Symbol("T")


def full_explanation(pattern) -> str:
    """What cli.cmd_check prints for one pattern after its `ok` line."""
    return nsa_dsl.check(pattern).explain() + "\n" + explain_cost(pattern)


def test_every_example_is_covered():
    # the examples named in the issue, so the parametrized tests below are not vacuous
    assert {"deepseek_nsa", "bench_small_group", "moba_like", "window_only"} <= {p.name for p in PATTERNS}


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
def test_explanation_is_short_and_names_kernels_and_loop_order(pattern):
    plan = nsa_dsl.check(pattern)
    text = full_explanation(pattern)
    assert len(text.splitlines()) <= 40, text
    for dump in ("Piecewise", "Mod(", "floor("):
        assert dump not in text
    for name in plan.kernel_names:
        assert f"  - {name} (" in text
    if plan.has("slc_fwd"):
        assert f"selection loop order: {plan.loop_order_summary()}" in text
    assert "dense causal attention" in text and "dense/NSA" in text


def parse_pieces(text: str) -> list:
    """`T <= 31: 0;  32 <= T <= 512: ...;  T >= 513: ...` -> [((lo, hi), expr)]
    (hi None: no upper bound), read here without the model's helpers."""
    out = []
    for part in text.split(";  "):
        span, formula = part.split(": ", 1)
        if m := re.fullmatch(r"T <= (\d+)", span):
            bounds = (1, int(m[1]))
        elif m := re.fullmatch(r"(\d+) <= T <= (\d+)", span):
            bounds = (int(m[1]), int(m[2]))
        elif m := re.fullmatch(r"T >= (\d+)", span):
            bounds = (int(m[1]), None)
        elif m := re.fullmatch(r"T = (\d+)", span):
            bounds = (int(m[1]), int(m[1]))
        else:
            assert span == "any T", span
            bounds = (1, None)
        out.append((bounds, sympy.sympify(formula, locals={"T": T})))
    return out


def line_after(text: str, start: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(start)]
    assert len(lines) == 1, (start, text)
    return lines[0][len(start):]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
def test_printed_formulas_are_the_cost_models_values(pattern):
    cost = cost_model(pattern)
    text = explain_cost(pattern)

    def value(expr, length):
        return float(expr.subs(T, length))

    # Branch lines: each range's formula at both ends of the range. Ranges
    # with an upper end are exact (the model's own sum); the open last one
    # averages T mod a block, so it is compared where that is negligible.
    for term in cost.terms:
        rest = line_after(text, f"  {term.name:<8} {term.short}").strip()
        pieces = parse_pieces(rest)
        assert pieces[-1][0][1] is None
        for (lo, hi), formula in pieces:
            for length in ((lo, hi) if hi is not None else (64 * lo + 65536,)):
                assert value(formula, length) == pytest.approx(float(cost.at(term.flops, length)), rel=1e-3,
                                                               abs=1e-9), (term.name, length)
    # The total past the last block or window, at the table's lengths.
    if len(cost.terms) > 1:
        (lo, hi), total = parse_pieces(line_after(text, "  total    ").split("; shorter T")[0])[0]
        assert hi is None
        for length in (max(lo, 8192), 65536, 1 << 20):
            assert value(total, length) == pytest.approx(float(cost.at(cost.total, length)), rel=1e-3)
    dense = line_after(text, "  dense causal attention: ").split(";")[0]
    assert value(sympy.sympify(dense, locals={"T": T}), 12345) == float(cost.at(cost.dense, 12345))
    for (lo, hi), formula in parse_pieces(line_after(text, "minimum bytes per token").split("): ", 1)[1]):
        length = hi if hi is not None else 64 * lo + 65536
        assert value(formula, length) == pytest.approx(float(cost.at(cost.bytes, length)), rel=1e-3)
    # The table's ratio at 8k and 64k.
    for length in (8192, 65536):
        row = line_after(text, f"{length:>8}  ").split()
        assert float(row[2]) == pytest.approx(cost.ratio_to_dense(length), abs=0.006)


def test_loop_order_by_length_is_shown_on_the_two_selection_kernels():
    small = nsa_dsl.check(next(p for p in PATTERNS if p.name == "bench_small_group"))
    assert small.block_centric_from == 8192
    text = small.explain()
    assert re.search(r"- slc_fwd \(forward\): .* \[below T=8192\]", text)
    assert re.search(r"- slc_fwd_bc \(forward\): .* \[from T=8192\]", text)
    assert "why: at T=8192 predicted" in text  # the cost model's reason
    group_centric = apply_overrides(small, {"SLC_FWD_ORDER": 0})
    assert re.search(r"- slc_fwd_bc \(forward\): .* \[not launched by default\]", group_centric.explain())
    forced = apply_overrides(small, {"SLC_FWD_ORDER": 1})
    text = forced.explain()
    assert re.search(r"- slc_fwd \(forward\): .* \[not launched by default\]", text)
    assert "why:" not in text  # forced, not the model's choice


def test_short_form_keeps_tiles_and_switches_that_are_on():
    plan = nsa_dsl.check(next(p for p in PATTERNS if p.name == "deepseek_nsa"))
    text = plan.explain()
    for kernel, tile in (("cmp_fwd", "CMP_BLOCK_M"), ("cmp_fwd", "CMP_BLOCK_N"), ("swa_fwd", "SWA_BLOCK_M"),
                         ("slc_fwd", "SLC_TOKENS"), ("swa_bwd", "SWA_BWD_DKDV_BLOCK_N")):
        assert f"{tile}={plan.kernel(kernel).const(tile)}" in text
    assert "SLC_FWD_LIST" not in text  # an off switch
    on = apply_overrides(plan, {"SLC_FWD_LIST": 1, "slc_fwd.num_warps": 8}).explain()
    assert "SLC_FWD_LIST=1" in on and re.search(r"SLC_TOKENS=4 SLC_FWD_LIST=1; 8 warps", on)
    assert "qk 192 -> 256" in text  # the padding


def test_verbose_prints_every_constant_and_note():
    plan = nsa_dsl.check(next(p for p in PATTERNS if p.name == "deepseek_nsa"))
    text = plan.explain(verbose=True)
    for k in plan.kernels:
        assert f"  - {k.name} ({k.direction}): {k.role}" in text
        assert f"grid {k.grid}" in text
        for name, value in k.constants:
            assert f"{name}={value}" in text
    for note in plan.notes:
        assert f"note: {note}" in text
