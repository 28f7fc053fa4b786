"""The checker: every violated rule reported at once, exact wording where a
user reads it, warnings only where the hardware really wastes work.

Patterns are built directly from nsa_dsl.ir (with hand-made spans where the
rendering is under test), so these tests do not depend on the parser; only
the last section, a whole file's syntax and rule errors together, parses."""
from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import example, given, settings, strategies as st

from nsa_dsl import ir
from nsa_dsl.check import (READS, RULES, WARNINGS, Finding, check_parsed, errors_of, raise_if_invalid, validate,
                           warnings_of)
from nsa_dsl.errors import Diagnostic, SpecError
from nsa_dsl.ir import Branch, Combine, Compress, Dims, DType, DTypes, Heads, Pattern, Pool, Select, Window
from nsa_dsl.parse import STATEMENTS, parse_source
from nsa_dsl.pipeline import check

FILE = "spec.nsa"


def spanned(cls, line: int, text: str, **values):
    """A statement whose keyword and `key=value` pairs point into `text`
    (line `line` of FILE), the way the parser would place them."""
    keyword = text.split()[0]
    key_spans = []
    for key, value in values.items():
        needle = f"{key}={value.value if isinstance(value, Pool) else value}"
        col = text.index(needle) + 1
        key_spans.append((key, ir.Span(FILE, line, col, col + len(needle), text)))
    col = text.index(keyword) + 1
    span = ir.Span(FILE, line, col, col + len(keyword), text)
    return cls(**values, span=span, key_spans=tuple(key_spans))


def spanned_combine(line: int, text: str, *names: str) -> Combine:
    spans = []
    for name in names:
        col = text.index(" " + name) + 2
        spans.append((name, ir.Span(FILE, line, col, col + len(name), text)))
    return Combine(branches=tuple(Branch(n) for n in names), span=ir.Span(FILE, line, 1, 8, text),
                   key_spans=tuple(spans))


def pattern(heads=None, dims=None, **branches) -> Pattern:
    return Pattern(name="p", heads=heads or Heads(q=64, kv=4), dims=dims or Dims(qk=128, v=128), **branches,
                   span=ir.Span(FILE, 1, 1, 8, "pattern p {"))


PAPER = dict(compress=Compress(block=32, stride=16), select=Select(block=64, top=16, initial=1, local=2),
             window=Window(size=512))


def rules(diags) -> Counter:
    return Counter(d.rule for d in diags)


# ---------------------------------------------------------------------------
# Golden renderings (hand-written)
# ---------------------------------------------------------------------------
def test_golden_select_block_two_rules_at_once():
    p = pattern(compress=spanned(Compress, 4, "compress block=32 stride=16", block=32, stride=16),
                select=spanned(Select, 5, "select block=40 top=16", block=40, top=16))
    with pytest.raises(SpecError) as info:
        raise_if_invalid(p)
    assert str(info.value) == (
        "spec.nsa:5:8: error: select.block must be a power of two between 16 and 256; got 40\n"
        "    select block=40 top=16\n"
        "           ^^^^^^^^\n"
        "  hint: did you mean 32 or 64? (the block is a tile dimension of the selection kernel)\n"
        "spec.nsa:5:8: error: select.block must be a multiple of compress.stride (16); got 40\n"
        "    select block=40 top=16\n"
        "           ^^^^^^^^\n"
        "  hint: did you mean 32 or 64?"
    )
    assert [d.rule for d in info.value.diagnostics] == ["select.block.range", "select.block.stride"]


def test_golden_heads_not_divisible():
    p = pattern(heads=spanned(Heads, 2, "heads q=64 kv=5", q=64, kv=5), window=Window(size=8))
    (d,) = validate(p)
    assert d.render() == (
        "spec.nsa:2:12: error: heads.q must be a multiple of heads.kv (each key/value head serves q/kv query"
        " heads); got q=64, kv=5\n"
        "    heads q=64 kv=5\n"
        "               ^^^^\n"
        "  hint: did you mean kv=4 or kv=8 (divisors of 64), or q=60 or q=65 (multiples of 5)?"
    )


def test_golden_head_dim():
    p = pattern(dims=spanned(Dims, 3, "dims qk=40 v=128", qk=40, v=128), window=Window(size=8))
    (d,) = validate(p)
    assert d.render() == (
        "spec.nsa:3:6: error: dims.qk must be a multiple of 16 between 16 and 256; got 40\n"
        "    dims qk=40 v=128\n"
        "         ^^^^^\n"
        "  hint: did you mean 32 or 48? (a tensor-core dot needs multiples of 16; larger heads do not fit the"
        " kernels' tiles)"
    )


def test_golden_compress_stride_must_divide_block():
    p = pattern(compress=spanned(Compress, 4, "compress block=32 stride=12", block=32, stride=12))
    (d,) = validate(p)
    assert d.render() == (
        "spec.nsa:4:19: error: compress.stride must divide compress.block (32); got 12\n"
        "    compress block=32 stride=12\n"
        "                      ^^^^^^^^^\n"
        "  hint: did you mean stride=8 or stride=16 (divisors of 32), or block=24 or block=36 (multiples of 12)?"
    )


def test_golden_select_without_compress_must_be_static():
    p = pattern(select=spanned(Select, 5, "select block=64 top=16 initial=1 local=2", block=64, top=16,
                               initial=1, local=2), heads=Heads(q=64, kv=4))
    (d,) = errors_of(validate(p))
    assert d.render() == (
        "spec.nsa:5:17: error: select.top = 16 exceeds initial + local = 3, but the pattern has no compress"
        " branch: nothing else ranks blocks to choose the other 13\n"
        "    select block=64 top=16 initial=1 local=2\n"
        "                    ^^^^^^\n"
        "  hint: add a compress statement (e.g. `compress block=32 stride=16`; its attention scores rank the"
        " blocks), or set top=3 for a static pattern of only the forced blocks"
    )


def test_golden_scored_group_of_more_than_256_heads():
    # The block scoring holds a group's heads as rows of one tile of at most
    # 256: a larger group is refused where blocks are scored, not for a
    # static selection (nothing scored) or without a select branch.
    p = pattern(heads=spanned(Heads, 2, "heads q=1024 kv=2", q=1024, kv=2), **PAPER)
    (d,) = errors_of(validate(p))
    assert d.render() == (
        "spec.nsa:2:14: error: GQA group G = q/kv = 1024/2 = 512 exceeds 256: the block scoring sums a group's"
        " query heads as rows of one tile of at most 256\n"
        "    heads q=1024 kv=2\n"
        "                 ^^^^\n"
        "  hint: did you mean kv=4? (G=256; kv must divide q)"
    )
    with pytest.raises(SpecError, match="exceeds 256"):
        check(p)
    assert check(pattern(heads=Heads(q=1024, kv=4), **PAPER)).kernel("slc_topk").const("GROUP_ROWS") == 256
    static = pattern(heads=Heads(q=1024, kv=2), compress=Compress(block=32, stride=16),
                     select=Select(block=64, top=3, initial=1, local=2))
    assert not errors_of(validate(static))
    assert not errors_of(validate(pattern(heads=Heads(q=1000, kv=1), window=Window(size=8))))
    assert validate(pattern(heads=Heads(q=1000, kv=2), **PAPER))[0].hint == "did you mean kv=4? (G=250; kv must divide q)"


def test_golden_combine_points_at_the_undeclared_name():
    p = pattern(window=Window(size=8), combine=spanned_combine(6, "combine swa slc", "swa", "slc"))
    (d,) = validate(p)
    assert d.render() == (
        "spec.nsa:6:13: error: combine names slc, but the pattern declares no select branch\n"
        "    combine swa slc\n"
        "                ^^^\n"
        "  hint: declared: swa; remove slc from combine or add a select statement"
    )


def test_golden_forced_blocks_and_window():
    p = pattern(compress=Compress(block=32, stride=16),
                select=spanned(Select, 5, "select block=64 top=2 initial=1 local=2", block=64, top=2, initial=1,
                               local=2),
                window=spanned(Window, 6, "window size=0", size=0))
    assert "\n".join(d.render() for d in validate(p)) == (
        "spec.nsa:5:17: error: select.top must be at least initial + local = 1 + 2 = 3 (the forced blocks are"
        " always selected); got 2\n"
        "    select block=64 top=2 initial=1 local=2\n"
        "                    ^^^^^\n"
        "  hint: did you mean top=3? or force fewer blocks (initial + local <= 2)\n"
        "spec.nsa:6:8: error: window.size must be between 1 and 2147483647 (positions each query attends to,"
        " itself included); got 0\n"
        "    window size=0\n"
        "           ^^^^^^\n"
        "  hint: did you mean size=1? (the paper uses size=512)"
    )


def test_golden_warning_head_dim_192():
    p = pattern(dims=spanned(Dims, 3, "dims qk=192 v=128", qk=192, v=128), heads=Heads(q=64, kv=4), **PAPER)
    (d,) = validate(p)
    assert d.severity == "warning" and d.rule == "dims.qk.pad"
    assert d.render() == (
        "spec.nsa:3:6: warning: dims.qk = 192 is not a power of two: kernels pad it to 256 in registers, so 25%"
        " of the QK^T multiply-adds are on zero padding\n"
        "    dims qk=192 v=128\n"
        "         ^^^^^^\n"
        "  hint: memory traffic stays at 192; 128 or 256 would waste nothing"
    )


def test_golden_warning_small_group():
    p = pattern(heads=spanned(Heads, 2, "heads q=32 kv=8", q=32, kv=8), **PAPER)
    (d,) = validate(p)
    assert d.severity == "warning" and d.rule == "heads.group.small"
    assert d.render() == (
        "spec.nsa:2:12: warning: GQA group G = q/kv = 32/8 = 4 is below 16: the selection kernel loads each"
        " selected key block for the 4 query head(s) of a group, but a tensor-core tile has 16 rows, so only"
        " 4/16 of them are sure to use the block (the rest are padding or neighbouring positions that may not"
        " have selected it); the planner then weighs a block-centric loop order, which gathers the positions"
        " that chose each block (see check --explain)\n"
        "    heads q=32 kv=8\n"
        "               ^^^^\n"
        "  hint: kv=2 gives G=16"
    )


def test_render_without_spans_does_not_crash():
    p = Pattern(name="p", heads=Heads(q=0, kv=1), dims=Dims(qk=64, v=64), window=Window(size=4))
    (d,) = validate(p)
    assert d.span is None
    assert d.render() == ("error: heads.q must be between 1 and 1024 (the number of query heads); got 0\n"
                          "  hint: did you mean q=1?")
    with pytest.raises(SpecError, match="heads.q must be between 1 and 1024"):
        raise_if_invalid(p)


def test_unknown_span_renders_the_file_only():
    p = Pattern(name="p", heads=Heads(q=8, kv=2), dims=Dims(qk=64, v=64),
                window=Window(size=0, span=ir.Span.unknown("x.nsa")))
    (d,) = validate(p)
    assert d.render().startswith("x.nsa: error: window.size must be between 1 and 2147483647")


def test_no_branch_points_at_the_pattern():
    p = pattern()
    (d,) = validate(p)
    assert d.rule == "pattern.branches"
    assert d.render() == (
        "spec.nsa:1:1: error: pattern 'p' declares no attention branch: it needs at least one of compress, select,"
        " window\n"
        "    pattern p {\n"
        "    ^^^^^^^\n"
        "  hint: e.g. `window size=512` for sliding-window attention"
    )


# ---------------------------------------------------------------------------
# Warnings
# ---------------------------------------------------------------------------
def test_paper_configuration_with_power_of_two_dims_is_clean():
    assert validate(pattern(**PAPER)) == ()


def test_group_warning_only_with_a_select_branch():
    small = Heads(q=8, kv=2)
    assert validate(pattern(heads=small, window=Window(size=64))) == ()
    assert rules(validate(pattern(heads=small, **PAPER))) == Counter({"heads.group.small": 1})
    hint = validate(pattern(heads=small, **PAPER))[0].hint
    assert hint == "q=8 query heads cannot form a group of 16; kv=1 gives the largest, G=8"


def test_group_not_a_power_of_two():
    (d,) = validate(pattern(heads=Heads(q=48, kv=2), **PAPER))
    assert d.rule == "heads.group.pow2"
    assert "G = q/kv = 48/2 = 24 is not a power of two" in d.message and "pads it to 32 rows, 25% of them" in d.message
    assert d.hint == "kv=3 gives G=16"


def test_head_dim_warnings_name_the_padding():
    found = validate(pattern(dims=Dims(qk=192, v=80), window=Window(size=8)))
    assert rules(found) == Counter({"dims.qk.pad": 1, "dims.v.pad": 1})
    assert "pad it to 256" in found[0].message and "25%" in found[0].message
    assert "pad it to 128" in found[1].message and "37.5%" in found[1].message and "PV" in found[1].message


def test_unused_branches():
    # moba-like: compress only ranks the blocks; no warning.
    moba = pattern(heads=Heads(q=64, kv=4), compress=Compress(block=64, stride=64),
                   select=Select(block=64, top=8, initial=0, local=1), combine=Combine(branches=(Branch.SLC,)))
    assert validate(moba) == ()
    # a static selection does not need compress; combining only slc leaves it idle.
    static = pattern(compress=Compress(block=32, stride=16), select=Select(block=64, top=3),
                     combine=Combine(branches=(Branch.SLC,)))
    (d,) = validate(static)
    assert d.rule == "branch.unused" and d.message.startswith("compress is declared but neither combined nor used")
    # window declared, not combined.
    idle = pattern(**PAPER, combine=Combine(branches=(Branch.CMP, Branch.SLC)))
    (d,) = validate(idle)
    assert d.message == "window is declared but not combined: its kernels run and their output is discarded"
    assert d.hint == "add swa to combine, or remove the window statement"
    # selection not combined: both it and the compress branch it needs are idle.
    assert rules(validate(pattern(**PAPER, combine=Combine(branches=(Branch.SWA,))))) == \
        Counter({"branch.unused": 2})


# ---------------------------------------------------------------------------
# Structure, types, API
# ---------------------------------------------------------------------------
def test_every_violation_at_once():
    p = Pattern(name="p", heads=Heads(q=0, kv=0), dims=Dims(qk=0, v=999),
                compress=Compress(block=0, stride=0), select=Select(block=3, top=0, initial=1, local=2),
                window=Window(size=0), combine=Combine(branches=()), dtype=DTypes(dtypes=()))
    found = validate(p)
    assert all(d.severity == "error" for d in found)
    assert rules(found) == Counter(["heads.q.range", "heads.kv.range", "dims.qk.range", "dims.v.range",
                                    "compress.block.range", "compress.stride.range", "select.block.range",
                                    "select.top.range", "select.top.forced", "window.size.range",
                                    "combine.empty", "dtype.empty"])


def test_wrong_types_are_reported_not_raised():
    p = Pattern(name="p", heads=Heads(q="8", kv=2), dims=Dims(qk=64.0, v=True), window=Window(size=None),
                select=Select(block=16, top=1, initial=0, local=1),
                compress=Compress(block=4, stride=2, pool="avg"), combine=Combine(branches=("slc", Branch.SWA)))
    found = validate(p)
    assert errors_of(found) and all(d.rule == "type" for d in found)
    assert {d.message for d in found} >= {"heads.q must be an integer; got '8'", "dims.v must be an integer; got True",
                                          "window.size must be an integer; got None"}
    odd = Pattern(name="p", heads=Heads(q=8, kv=2), dims=Dims(qk=64, v=64), window=Window(size=8),
                  combine=[Branch.SWA], dtype=DTypes(dtypes=["bf16"]))
    assert rules(validate(odd)) == Counter({"type": 2})
    missing = Pattern(name="p", heads=None, dims=None, window=Window(size=8))
    assert rules(validate(missing)) == Counter({"pattern.heads": 1, "pattern.dims": 1})


def test_huge_numbers_are_fast_errors():
    big = 123456789012345678901234567890
    p = pattern(heads=Heads(q=big, kv=4), dims=Dims(qk=big, v=big), compress=Compress(block=big + 1, stride=big),
                select=Select(block=big, top=big, initial=big, local=big), window=Window(size=big))
    start = time.perf_counter()
    found = validate(p)
    assert time.perf_counter() - start < 1.0
    assert rules(found) == expected_errors(p)
    assert "select.top.range" in rules(found) and "heads.divisible" in rules(found)
    assert all(d.severity == "error" and d.hint for d in found)


def test_numbers_too_long_to_print_are_type_errors_not_value_errors():
    # A pattern built in code is not bounded by the parser. Python refuses to
    # print an int of more than 4300 digits, and every message prints values.
    huge = 10**5000
    p = pattern(heads=Heads(q=huge, kv=4), select=Select(block=16, top=1, initial=huge - 1, local=1),
                window=Window(size=-huge))
    found = validate(p)
    assert Counter(d.rule for d in found) == Counter({"type": 3})
    assert all("5001-digit" in d.message or "5000-digit" in d.message for d in found)
    with pytest.raises(SpecError):
        check(p)


def test_api_helpers():
    p = pattern(heads=Heads(q=8, kv=2), **PAPER)
    found = validate(p)
    assert errors_of(found) == () and len(warnings_of(found)) == 1
    assert raise_if_invalid(p) == warnings_of(found)
    assert all(isinstance(d, Finding) and isinstance(d, Diagnostic) for d in found)
    assert set(RULES).isdisjoint(WARNINGS)
    plan = check(p)
    assert plan.pattern == p and plan.warnings == warnings_of(found)
    with pytest.raises(TypeError):
        validate("pattern p {}")


def test_validate_is_pure():
    p = pattern(heads=Heads(q=64, kv=5), dims=Dims(qk=40, v=128), **PAPER)
    assert validate(p) == validate(p)


# ---------------------------------------------------------------------------
# Property: an error iff an independent predicate says invalid, every rule
# ---------------------------------------------------------------------------
SPECIAL = [0, 1, 2, 3, 4, 5, 8, 12, 15, 16, 17, 24, 31, 32, 33, 48, 64, 80, 96, 100, 128, 192, 255, 256, 257,
           512, 1000, 1023, 1024, 1025, 4095, 4096, 4097, 2**31 - 1, 2**31, 10**30]


def mostly(good, bad, per_ten: int = 8):
    """`good` about per_ten times in ten, else `bad`: enough valid patterns
    are drawn that "no error iff valid" is tested both ways."""
    return st.integers(0, 9).flatmap(lambda roll: good if roll < per_ten else bad)


def number(plausible):
    """Any integer the parser can produce (and a few negatives from code),
    with the plausible values (some still invalid in combination) most often."""
    return mostly(st.sampled_from(plausible),
                  st.one_of(st.integers(0, 5000), st.sampled_from(SPECIAL), st.integers(-3, -1)))


def some(items):
    return mostly(st.lists(st.sampled_from(items), min_size=1, max_size=3, unique=True),
                  st.lists(st.sampled_from(items), max_size=3, unique=True), per_ten=9)


@st.composite
def arbitrary_patterns(draw):
    heads = Heads(q=draw(number([1, 2, 4, 8, 16, 32, 64, 128])), kv=draw(number([1, 2, 4, 8])))
    dims = Dims(qk=draw(number([16, 64, 128, 192, 256])), v=draw(number([16, 64, 128])))
    compress = select = window = combine = dtype = None
    if draw(st.booleans()):
        compress = Compress(block=draw(number([16, 32, 64])), stride=draw(number([8, 16, 32])),
                            pool=draw(st.sampled_from(list(Pool))))
    if draw(st.booleans()):
        select = Select(block=draw(number([16, 32, 64, 128])), top=draw(number([1, 2, 3, 4, 8, 16])),
                        initial=draw(number([0, 1, 2])), local=draw(number([0, 1, 2])))
    if draw(st.booleans()):
        window = Window(size=draw(number([1, 64, 512])))
    if draw(st.booleans()):
        combine = Combine(branches=tuple(draw(some(list(Branch)))))
    if draw(st.booleans()):
        dtype = DTypes(dtypes=tuple(draw(some(list(DType)))))
    return Pattern(name="drawn", heads=heads, dims=dims, compress=compress, select=select, window=window,
                   combine=combine, dtype=dtype)


def expected_errors(p: Pattern) -> Counter:
    """The rules of the brief, written again in plain Python."""
    out = []
    h, d, c, s, w = p.heads, p.dims, p.compress, p.select, p.window
    if not 1 <= h.q <= 1024:
        out.append("heads.q.range")
    if not 1 <= h.kv <= 1024:
        out.append("heads.kv.range")
    if h.q >= 1 and h.kv >= 1 and h.q % h.kv != 0:
        out.append("heads.divisible")
    heads_ok = 1 <= h.q <= 1024 and 1 <= h.kv <= 1024 and h.q % h.kv == 0
    if heads_ok and s is not None and s.top > s.initial + s.local and h.q // h.kv > 256:
        out.append("heads.group.range")
    for key, value in (("qk", d.qk), ("v", d.v)):
        if value not in range(16, 257, 16):
            out.append(f"dims.{key}.range")
    if c is not None:
        if not 1 <= c.block <= 1024:
            out.append("compress.block.range")
        if c.stride < 1:
            out.append("compress.stride.range")
        if c.block >= 1 and c.stride >= 1 and c.block % c.stride != 0:
            out.append("compress.divisible")
    if s is not None:
        if s.block not in (16, 32, 64, 128, 256):
            out.append("select.block.range")
        if c is not None and c.stride >= 1 and s.block % c.stride != 0:
            out.append("select.block.stride")
        if not 1 <= s.top <= 4096:
            out.append("select.top.range")
        if s.initial < 0:
            out.append("select.initial.range")
        if s.local < 0:
            out.append("select.local.range")
        if s.top < s.initial + s.local:
            out.append("select.top.forced")
        if c is None and s.top > s.initial + s.local:
            out.append("select.top.unranked")
    if w is not None and not 1 <= w.size <= 2**31 - 1:
        out.append("window.size.range")
    declared = {b for b, stmt in ((Branch.CMP, c), (Branch.SLC, s), (Branch.SWA, w)) if stmt is not None}
    if p.combine is not None:
        if not p.combine.branches:
            out.append("combine.empty")
        out.extend("combine.undeclared" for b in p.combine.branches if b not in declared)
    if not declared:
        out.append("pattern.branches")
    if p.dtype is not None and not p.dtype.dtypes:
        out.append("dtype.empty")
    return Counter(out)


def expected_warnings(p: Pattern, errors: Counter) -> Counter:
    out = []
    h, d, c, s, w = p.heads, p.dims, p.compress, p.select, p.window
    heads_ok = 1 <= h.q <= 1024 and 1 <= h.kv <= 1024 and h.q % h.kv == 0
    if heads_ok and s is not None:
        g = h.q // h.kv
        if g < 16:
            out.append("heads.group.small")
        elif g & (g - 1):
            out.append("heads.group.pow2")
    for key, value in (("qk", d.qk), ("v", d.v)):
        if value in range(16, 257, 16) and value not in (16, 32, 64, 128, 256):
            out.append(f"dims.{key}.pad")
    if "combine.empty" not in errors:
        declared = [b for b, stmt in ((Branch.CMP, c), (Branch.SLC, s), (Branch.SWA, w)) if stmt is not None]
        used = {b for b in declared if p.combine is None or b in p.combine.branches}
        if used:
            if Branch.SLC in used and s.top > s.initial + s.local:
                used.add(Branch.CMP)
            out.extend("branch.unused" for b in declared if b not in used)
    return Counter(out)


@settings(max_examples=400)
@given(arbitrary_patterns())
@example(pattern(**PAPER))
@example(pattern(heads=Heads(q=64, kv=5), dims=Dims(qk=40, v=300), compress=Compress(block=32, stride=12),
                 select=Select(block=40, top=16), window=Window(size=0)))
@example(pattern(select=Select(block=16, top=0, initial=0, local=0)))
def test_checker_rejects_exactly_the_invalid_patterns(p):
    found = validate(p)
    errors, warnings = errors_of(found), warnings_of(found)
    expected = expected_errors(p)
    assert Counter(d.rule for d in errors) == expected
    assert bool(errors) == bool(expected)
    assert Counter(d.rule for d in warnings) == expected_warnings(p, expected)
    assert set(d.rule for d in errors) <= set(RULES) and set(d.rule for d in warnings) <= set(WARNINGS)
    for d in found:
        assert d.message and d.hint
        d.render()
    if expected:
        with pytest.raises(SpecError) as info:
            raise_if_invalid(p)
        assert info.value.diagnostics == errors
    else:
        assert raise_if_invalid(p) == warnings


def test_shared_valid_patterns_strategy_is_accepted():
    """tests/strategies.py draws valid patterns by construction for the kernel
    tests; the checker must agree with it."""
    strategies = pytest.importorskip("strategies")

    @settings(max_examples=100)
    @given(strategies.valid_patterns(small=False))
    def accepted(p):
        assert errors_of(validate(p)) == ()

    accepted()


# ---------------------------------------------------------------------------
# A whole file: syntax and rule errors together, none caused by the recovery
# ---------------------------------------------------------------------------
from test_parse import SEVEN, SEVEN_SYNTAX  # noqa: E402  (one copy of the seven-mistake file)

SEVEN_RULES = [
    (6, 20, "select.block.stride"),   # first: block=16, stride=32
    (14, 19, "window.size.range"),    # second: size=0
    (17, 21, "heads.divisible"),      # third: q=8, kv=3
]


def test_seven_mistakes_in_three_patterns_all_reported_in_file_order():
    report = check_parsed(parse_source(SEVEN, "spec.nsa"))
    assert [(d.span.line, d.span.column) for d in report.diagnostics] == sorted(
        [(line, col) for line, col, _ in SEVEN_SYNTAX] + [(line, col) for line, col, _ in SEVEN_RULES])
    assert report.diagnostics == report.errors  # no warning for these patterns
    found = [(d.span.line, d.span.column, getattr(d, "rule", None) or d.message) for d in report.diagnostics]
    assert found == sorted(SEVEN_SYNTAX + SEVEN_RULES)
    # Each pattern had text skipped: none is called complete.
    assert [(p.name, len(errors_of(f)), complete) for p, f, complete in report.checked] == [
        ("first", 1, False), ("second", 1, False), ("third", 1, False)]


def test_reads_names_every_rule_and_only_statements():
    assert set(READS) == set(RULES) | set(WARNINGS)
    assert all(reads and set(reads) <= set(STATEMENTS) for reads in READS.values())


def report_of(text):
    report = check_parsed(parse_source(text, "spec.nsa"))
    return [(d.span.line, d.span.column, getattr(d, "rule", None) or d.message) for d in report.diagnostics]


@pytest.mark.parametrize("text, expected", [
    # compress broken: without it select.top > forced would be "unranked", and
    # block=64 "not a multiple" of a stride nobody knows: neither is reported.
    ("pattern p { heads q=16 kv=1 dims qk=64 compress block=32 strid=12 select block=64 top=8 }",
     [(1, 58, "unknown key 'strid' in compress")]),
    # window misspelt: combine swa names it; no "undeclared", no "no branch".
    ("pattern p { heads q=16 kv=1 dims qk=64 windw size=8 combine swa }",
     [(1, 40, "unknown statement 'windw'")]),
    # heads broken: no "no heads statement", no group warning; dims still judged.
    ("pattern p { heads q=@ kv=1 dims qk=40 v=64 select block=16 top=1 initial=0 local=1 }",
     [(1, 21, "unexpected character '@'"), (1, 36, "dims.qk.range")]),
    # A child of a pattern with a broken heads inherits the doubt, and its own window is judged.
    ("pattern a { heads q=8 kv=@ dims qk=64 window size=8 }\npattern b extends a { window size=0 }",
     [(1, 26, "unexpected character '@'"), (2, 35, "window.size.range")]),
    # Patterns without mistakes in a broken file are checked as usual, warnings included.
    ("pattern a { heads q=1 kv=1 @ dims qk=16 window size=1 }\n"
     "pattern b { heads q=4 kv=4 dims qk=48 v=64 select block=16 top=1 initial=0 local=1 }",
     [(1, 28, "unexpected character '@'"), (2, 26, "heads.group.small"), (2, 36, "dims.qk.pad")]),
])
def test_no_rule_error_is_a_consequence_of_the_recovery(text, expected):
    assert report_of(text) == expected


def test_a_childs_error_inherited_from_its_parent_is_reported_once():
    text = "pattern a { heads q=8 kv=2 dims qk=64 window size=0 }\npattern b extends a { dtype fp16 }"
    assert report_of(text) == [(1, 51, "window.size.range")]
    report = check_parsed(parse_source(text, "spec.nsa"))
    assert [len(errors_of(f)) for _, f, _ in report.checked] == [1, 1]


def test_cli_check_prints_syntax_and_rule_errors_together(tmp_path, capsys):
    from nsa_dsl.cli import main

    spec = tmp_path / "seven.nsa"
    spec.write_text(SEVEN)
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    rule_messages = {
        "select.block.stride": "select.block must be a multiple of compress.stride (32); got 16",
        "window.size.range": "window.size must be between 1 and 2147483647 (positions each query attends to,"
                             " itself included); got 0",
        "heads.divisible": "heads.q must be a multiple of heads.kv (each key/value head serves q/kv query heads);"
                           " got q=8, kv=3",
    }
    expected = sorted(SEVEN_SYNTAX + [(line, col, rule_messages[rule]) for line, col, rule in SEVEN_RULES])
    assert [line for line in err.splitlines() if ": error: " in line] == \
        [f"{spec}:{line}:{col}: error: {message}" for line, col, message in expected]
    # Each with its line, a caret and a hint.
    assert (f"{spec}:12:23: error: unknown key 'strid' in compress\n"
            "        compress block=32 strid=16\n"
            "                          ^^^^^\n"
            "  hint: did you mean 'stride'?") in err
    assert (f"{spec}:6:20: error: {rule_messages['select.block.stride']}\n"
            "        select   block=16 top=4\n"
            "                       ^^\n"
            "  hint: did you mean 32?") in err
    assert f"{spec}: pattern first: 1 error(s); checked in part" in err
    assert f"{spec}: 4 syntax or structure error(s)" in err


def test_cli_check_of_standard_input_reports_every_error_too(capsys, monkeypatch):
    import io
    import sys

    from nsa_dsl.cli import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(SEVEN.encode()), encoding="utf-8"))
    assert main(["check", "-"]) == 1
    err = capsys.readouterr().err
    assert [line.split(": error: ")[0] for line in err.splitlines() if ": error: " in line] == \
        [f"<stdin>:{line}:{col}" for line, col, _ in sorted(SEVEN_SYNTAX + SEVEN_RULES)]


def test_cli_check_name_keeps_the_files_syntax_errors(tmp_path, capsys):
    from nsa_dsl.cli import main

    spec = tmp_path / "seven.nsa"
    spec.write_text(SEVEN)
    assert main(["check", "--name", "third", str(spec)]) == 1
    err = capsys.readouterr().err
    assert f"{spec}:17:21: error: heads.q must be a multiple of heads.kv" in err
    assert f"{spec}:14:19" not in err  # second's rule error: not asked for
    assert f"{spec}:12:23: error: unknown key 'strid'" in err  # the file does not parse: said anyway
    assert main(["check", "--name", "thrid", str(spec)]) == 1
    assert "no pattern named 'thrid'" in capsys.readouterr().err

