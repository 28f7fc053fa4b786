"""The parser: spec text -> Pattern, its errors, and printing back."""
import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

import nsa_dsl
from nsa_dsl import ir
from nsa_dsl.errors import SpecError
from nsa_dsl.ir import MAX_NUMBER, Branch, DType, Pool
from nsa_dsl.parse import (RESERVED, REMOVABLE, STATEMENTS, format_all, format_pattern, load,
                           load_all, parse, parse_all, parse_source)
from nsa_dsl.resources import grammar_path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

THREE = """\
pattern deepseek_nsa {
    heads    q=64 kv=4
    dims     qk=192 v=128
    compress block=32 stride=16 pool=mlp
    select   block=64 top=16 initial=1 local=2
    window   size=512
}

pattern moba_like {
    heads    q=32 kv=8
    dims     qk=128
    compress block=64 stride=64 pool=mean
    select   block=64 top=8 initial=0 local=1
    combine  slc
}

pattern long_window extends deepseek_nsa {
    window size=1024
}
"""

DEEPSEEK = ir.Pattern(
    name="deepseek_nsa",
    heads=ir.Heads(q=64, kv=4),
    dims=ir.Dims(qk=192, v=128),
    compress=ir.Compress(block=32, stride=16, pool=Pool.MLP),
    select=ir.Select(block=64, top=16, initial=1, local=2),
    window=ir.Window(size=512),
)
MOBA = ir.Pattern(
    name="moba_like",
    heads=ir.Heads(q=32, kv=8),
    dims=ir.Dims(qk=128, v=128),
    compress=ir.Compress(block=64, stride=64, pool=Pool.MEAN),
    select=ir.Select(block=64, top=8, initial=0, local=1),
    combine=ir.Combine(branches=(Branch.SLC,)),
)
LONG = dataclasses.replace(DEEPSEEK, name="long_window", window=ir.Window(size=1024),
                           extends="deepseek_nsa")

BASE = "pattern base {\n    heads q=8 kv=2\n    dims qk=64\n"


def body(*lines):
    """A pattern `p` with heads and dims plus the given statement lines."""
    return BASE.replace("base", "p") + "".join(f"    {line}\n" for line in lines) + "}\n"


def error_of(text, filename="spec.nsa", **kw):
    with pytest.raises(SpecError) as info:
        parse(text, filename, **kw)
    return info.value


# ---------------------------------------------------------------------------
# The three patterns of the language description
# ---------------------------------------------------------------------------
def test_three_patterns_resolve_to_the_expected_ir():
    assert parse_all(THREE) == [DEEPSEEK, MOBA, LONG]


def test_extends_takes_everything_else_from_the_parent():
    long = parse(THREE, name="long_window")
    assert long.extends == "deepseek_nsa"
    assert (long.heads, long.dims, long.compress, long.select) == \
        (DEEPSEEK.heads, DEEPSEEK.dims, DEEPSEEK.compress, DEEPSEEK.select)
    assert long.window.size == 1024
    assert long.canonical() == DEEPSEEK.canonical().replace(
        "deepseek_nsa", "long_window").replace("size=512", "size=1024")


def test_defaults_are_filled_in():
    p = parse(body("compress block=32 stride=16", "select block=64 top=16"))
    assert p.dims.v == 64  # v defaults to qk
    assert p.compress.pool is Pool.MEAN
    assert (p.select.initial, p.select.local) == (1, 2)
    assert p.combine is None and p.dtype is None and p.extends is None


def test_moba_like_defaults_v_and_combines_slc_only():
    moba = parse(THREE, name="moba_like")
    assert moba.dims.v == 128
    assert moba.combine.branches == (Branch.SLC,)
    assert moba.combined_branches == (Branch.SLC,)


@pytest.mark.parametrize("name, expected", [
    ("deepseek_nsa", DEEPSEEK),
    ("moba_like", MOBA),
    ("window_only", ir.Pattern(name="window_only", heads=ir.Heads(q=8, kv=2),
                               dims=ir.Dims(qk=64, v=64), window=ir.Window(size=256))),
])
def test_example_files_load(name, expected):
    path = EXAMPLES / f"{name}.nsa"
    p = load(path)
    assert p == expected
    assert p.source == str(path)
    assert load_all(path) == [expected]
    assert parse(format_pattern(p)) == p


# ---------------------------------------------------------------------------
# Statements, layout, extends and off
# ---------------------------------------------------------------------------
def test_combine_and_dtype_keep_the_written_order():
    p = parse(body("combine swa cmp", "dtype fp32 bf16"))
    assert p.combine.branches == (Branch.SWA, Branch.CMP)
    assert p.dtype.dtypes == (DType.FP32, DType.BF16)


def test_layout_is_free_form_and_comments_are_ignored():
    one_line = "pattern p { heads kv=2 q=8 dims v=32 qk=64 window size=16 }"
    spread = """# a header comment
    pattern   p   # after the name
    {
        dims v = 32    # spaces around '=' are fine
             qk=64
        window size=16 heads
        kv=2 q=8
    }
    # trailing comment"""
    expected = ir.Pattern(name="p", heads=ir.Heads(q=8, kv=2), dims=ir.Dims(qk=64, v=32),
                          window=ir.Window(size=16))
    assert parse(one_line) == parse(spread) == parse(spread.replace("\n", "\r\n")) == expected


def test_keys_in_any_order():
    a = parse(body("select local=0 top=4 initial=3 block=16"))
    b = parse(body("select block=16 top=4 initial=3 local=0"))
    assert a == b and a.select == ir.Select(block=16, top=4, initial=3, local=0)


def test_zero_and_large_numbers_up_to_int32_are_the_checkers_business():
    p = parse(body("window size=0", "select block=00064 top=2147483647 initial=0002147483647"))
    assert p.window.size == 0 and p.select.block == 64
    assert p.select.top == p.select.initial == MAX_NUMBER == 2**31 - 1


@pytest.mark.parametrize("digits", ["2147483648", "99999999999", "0" * 20 + "4294967296", "9" * 4300,
                                    "9" * 5000])
def test_numbers_past_int32_are_a_spec_error_at_the_number(digits):
    text = body("window size=" + digits)
    err = error_of(text)
    (diag,) = err.diagnostics
    assert (diag.span.line, diag.span.column) == (4, 17)
    assert diag.span.end_column == 17 + len(digits)
    assert "size" in diag.message and "at most 2147483647" in diag.message
    assert "int32" in diag.hint
    assert len(diag.message) < 120  # a huge number is not spelled out in the message


def test_issue_26_a_4300_digit_number_is_a_spec_error_not_a_value_error():
    # Before: parse accepted it and the checker failed formatting initial + local
    # with Python's "Exceeds the limit (4300 digits) for integer string conversion".
    text = ("pattern p { heads q=1 kv=1 dims qk=16 select block=16 top=1 initial=" + "9" * 4300
            + " local=1 }")
    with pytest.raises(SpecError, match="initial"):
        nsa_dsl.check(parse(text))


def test_off_removes_an_inherited_branch():
    text = THREE + "pattern lean extends long_window {\n    compress off\n    window off\n}\n"
    lean = parse(text, name="lean")
    assert lean.compress is None and lean.window is None
    assert lean.select == DEEPSEEK.select and lean.extends == "long_window"
    assert lean.declared_branches == (Branch.SLC,)


def test_a_child_may_replace_heads_and_dims_and_add_branches():
    text = BASE + "}\npattern child extends base {\n    heads q=16 kv=16\n    dtype fp16\n    window size=8\n}\n"
    child = parse(text, name="child")
    assert child.heads == ir.Heads(q=16, kv=16) and child.dims == ir.Dims(qk=64, v=64)
    assert child.dtype.dtypes == (DType.FP16,) and child.window.size == 8


def test_spans_point_at_keywords_values_and_the_name():
    text = THREE
    p = parse(text, "three.nsa", name="deepseek_nsa")
    assert p.source == "three.nsa"
    assert (p.span.line, p.span.column, p.span.end_column) == (1, 9, 21)
    assert p.compress.span.line == 4 and p.compress.span.column == 5
    stride = p.compress.at("stride")
    assert (stride.line, stride.column, stride.end_column) == (4, 30, 32)
    assert stride.line_text[stride.column - 1:stride.end_column - 1] == "16"
    assert p.compress.at("pool").line_text[p.compress.at("pool").column - 1:][:3] == "mlp"
    # A defaulted key points at its statement.
    moba = parse(text, name="moba_like")
    assert moba.dims.at("v") == moba.dims.span
    assert [k for k, _ in moba.combine.key_spans] == ["slc"]
    # Inherited statements keep the spans of the parent's lines.
    long = parse(text, name="long_window")
    assert long.heads.span.line == 2 and long.window.span.line == 18
    assert long.span.line == 17


def test_grammar_and_ir_agree_on_the_words():
    grammar = grammar_path().read_text()
    for stmt, cls in [("heads", ir.Heads), ("dims", ir.Dims), ("compress", ir.Compress),
                      ("select", ir.Select), ("window", ir.Window)]:
        rule = re.search(rf"^!{stmt}_arg:(.*?)(?=^\S|\Z)", grammar, re.M | re.S).group(1)
        written = set(re.findall(r'"(\w+)"\s*\)?\s*"="', rule)) | \
            {w for group in re.findall(r'\(([^()]*)\)\s*"="', rule) for w in re.findall(r'"(\w+)"', group)}
        fields = {f.name for f in dataclasses.fields(cls) if not f.kw_only}
        assert written == fields, stmt
    for enum in (Pool, Branch, DType):
        for member in enum:
            assert f'"{member.value}"' in grammar
    assert set(STATEMENTS) <= RESERVED and set(REMOVABLE) <= set(STATEMENTS)


# ---------------------------------------------------------------------------
# parse / parse_all / load / load_all
# ---------------------------------------------------------------------------
def test_several_patterns_without_a_name_lists_them():
    err = error_of(THREE)
    assert "3 patterns" in str(err)
    assert "deepseek_nsa, moba_like, long_window" in str(err)
    assert isinstance(err, ValueError)


def test_unknown_name_lists_the_names_and_suggests():
    err = error_of(THREE, name="moba_lik")
    assert "no pattern named 'moba_lik'" in str(err)
    assert "did you mean 'moba_like'?" in str(err)
    assert "deepseek_nsa, moba_like, long_window" in str(err)


def test_load_and_load_all(tmp_path):
    path = tmp_path / "three.nsa"
    path.write_text(THREE)
    assert load_all(path) == [DEEPSEEK, MOBA, LONG]
    assert load(str(path), name="moba_like") == MOBA
    assert all(p.source == str(path) for p in load_all(path))


def test_an_unreadable_file_is_a_spec_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope.nsa"
    for path in (missing, tmp_path):  # absent; a directory
        with pytest.raises(SpecError, match=re.escape(str(path))):
            load(path)
    binary = tmp_path / "binary.nsa"
    binary.write_bytes(b"\xff\xfe\x00pattern")
    with pytest.raises(SpecError, match="not UTF-8") as info:
        load_all(binary)
    (diag,) = info.value.diagnostics
    assert (diag.span.file, diag.span.line, diag.span.column) == (str(binary), 1, 1)


# ---------------------------------------------------------------------------
# Arguments of the API: types, bytes, a byte-order mark (issues 19 and 26)
# ---------------------------------------------------------------------------
ONE = "pattern p { heads q=1 kv=1 dims qk=16 window size=1 }"


@pytest.mark.parametrize("call, argument, expected", [
    (lambda: parse(None), "text", "str or UTF-8 bytes"),
    (lambda: parse(123), "text", "str or UTF-8 bytes"),
    (lambda: parse(["pattern"]), "text", "str or UTF-8 bytes"),
    (lambda: parse(ONE, name=123), "name", "str or None"),
    (lambda: parse(ONE, filename=None), "filename", "str or os.PathLike"),
    (lambda: parse(ONE, filename=b"spec.nsa"), "filename", "str or os.PathLike"),
    (lambda: parse_all(None), "text", "str or UTF-8 bytes"),
    (lambda: parse_all(ONE, filename=1.5), "filename", "str or os.PathLike"),
    (lambda: load(None), "path", "str or os.PathLike"),
    (lambda: load(7), "path", "str or os.PathLike"),
    (lambda: load(b"spec.nsa"), "path", "str or os.PathLike"),
    (lambda: load(EXAMPLES / "window_only.nsa", name=b"window_only"), "name", "str or None"),
    (lambda: load_all(None), "path", "str or os.PathLike"),
], ids=["parse-None", "parse-int", "parse-list", "parse-name", "parse-filename-None", "parse-filename-bytes",
        "parse_all-None", "parse_all-filename", "load-None", "load-int", "load-bytes", "load-name",
        "load_all-None"])
def test_arguments_of_the_wrong_type_are_type_errors_naming_them(call, argument, expected):
    with pytest.raises(TypeError) as info:
        call()
    assert type(info.value) is TypeError  # not an AttributeError, not a SpecError
    message = str(info.value)
    assert f"{argument} must be {expected}" in message
    assert re.search(r"got (NoneType|int|list|bytes|float)$", message), message


def test_bytes_are_decoded_as_utf8():
    assert parse(ONE.encode()) == parse(bytearray(ONE.encode())) == parse(ONE)
    assert parse_all(ONE.encode(), "b.nsa")[0].source == "b.nsa"
    # A filename may be a path object; it is kept as a str.
    assert parse(ONE, filename=Path("dir") / "p.nsa").source == str(Path("dir") / "p.nsa")


def test_bytes_that_are_not_utf8_are_a_spec_error_at_the_bad_byte():
    data = "# über\npattern p { heads q=1 \xff kv=1 }".encode().replace(b"\xc3\xbf", b"\xff")
    with pytest.raises(SpecError, match="not UTF-8") as info:
        parse(data, "latin.nsa")
    (diag,) = info.value.diagnostics
    assert (diag.span.file, diag.span.line, diag.span.column) == ("latin.nsa", 2, 23)
    assert diag.span.line_text == "pattern p { heads q=1 \ufffd kv=1 }"
    assert "0xff" in diag.message and "UTF-8" in diag.hint


@pytest.mark.parametrize("bom", ["\ufeff", "\ufeff".encode()], ids=["str", "bytes"])
def test_a_byte_order_mark_at_the_start_is_skipped(bom):
    text = bom + (ONE if isinstance(bom, str) else ONE.encode())
    p = parse(text)
    assert p == parse(ONE)
    # Columns count from the first character after the mark, as an editor shows them.
    assert (p.span.line, p.span.column) == (1, 9) and p.span.line_text == ONE
    err = error_of(bom + (b"pattern p {" if isinstance(bom, bytes) else "pattern p {"))
    assert (err.diagnostics[0].span.column, err.diagnostics[0].span.line_text) == (11, "pattern p {")


def test_a_byte_order_mark_elsewhere_is_an_error():
    err = error_of(ONE + "\n\ufeff")
    assert err.diagnostics[0].span.line == 2 and "\\ufeff" in err.diagnostics[0].message


def test_load_skips_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.nsa"
    path.write_bytes(b"\xef\xbb\xbf" + THREE.encode())
    assert load_all(path) == [DEEPSEEK, MOBA, LONG]
    assert load(path, name="moba_like").span.line_text == "pattern moba_like {"


# ---------------------------------------------------------------------------
# Error messages: exact text of the common ones, and where carets sit
# ---------------------------------------------------------------------------
GOLDEN = [
    (  # unknown key, with did-you-mean
        body("compress block=32 strid=16 pool=mlp"),
        "spec.nsa:4:23: error: unknown key 'strid' in compress\n"
        "        compress block=32 strid=16 pool=mlp\n"
        "                          ^^^^^\n"
        "  hint: did you mean 'stride'? compress takes block, stride and pool",
    ),
    (  # duplicate statement: the second one, and the first's line
        body("select block=64 top=16", "window size=512", "select top=1"),
        "spec.nsa:6:5: error: select is given twice in pattern 'p'\n"
        "        select top=1\n"
        "        ^^^^^^\n"
        "  hint: the first is on line 4; give each statement once",
    ),
    (  # duplicate key: `key=value` of the second one; a tab before the caret stays a tab
        body("select block=64\ttop=16 block=32"),
        "spec.nsa:4:28: error: duplicate key 'block' in select\n"
        "        select block=64\ttop=16 block=32\n"
        + " " * 23 + "\t" + " " * 7 + "^" * 8 + "\n"
        + "  hint: block was first given on line 4, column 12; give each key once",
    ),
    (  # missing heads: at the pattern's name
        "# no heads\npattern lonely {\n    dims qk=64\n}\n",
        "spec.nsa:2:9: error: pattern 'lonely' has no heads statement\n"
        "    pattern lonely {\n"
        "            ^^^^^^\n"
        "  hint: every pattern needs heads and dims, e.g. `heads q=N kv=N`,"
        " or extends a pattern that has them",
    ),
    (  # unexpected end of input: caret just past the last token
        "pattern p {\n    heads q=",
        "spec.nsa:2:13: error: unexpected end of file\n"
        "        heads q=\n"
        "                ^\n"
        "  hint: expected a number",
    ),
    (  # unterminated pattern: at its open brace
        BASE + "}\npattern p extends base {\n    heads q=1 kv=1\n",
        "spec.nsa:5:24: error: pattern 'p' is never closed: the file ends before its '}'\n"
        "    pattern p extends base {\n"
        "                           ^\n"
        "  hint: add '}' after its last statement",
    ),
    (  # bad enum value
        body("compress block=32 stride=16 pool=max"),
        "spec.nsa:4:38: error: 'max' is not a valid pool\n"
        "        compress block=32 stride=16 pool=max\n"
        "                                         ^^^\n"
        "  hint: pool is one of: mean, mlp",
    ),
    (  # unknown statement
        body("windw size=512"),
        "spec.nsa:4:5: error: unknown statement 'windw'\n"
        "        windw size=512\n"
        "        ^^^^^\n"
        "  hint: did you mean 'window'? expected a key of dims (qk or v), a statement"
        " (heads, dims, compress, select, window, combine or dtype) or '}'",
    ),
]


@pytest.mark.parametrize("text, expected", GOLDEN, ids=[
    "unknown-key", "duplicate-statement", "duplicate-key", "missing-heads", "end-of-input",
    "unclosed", "bad-pool", "unknown-statement"])
def test_golden_error_messages(text, expected):
    err = error_of(text)
    assert str(err) == expected
    # The caret sits under the spot the span names.
    (diag,) = err.diagnostics
    lines = text.split("\n")
    assert diag.span.line_text == lines[diag.span.line - 1]


@pytest.mark.parametrize("text, message, hint", [
    (body("heads off"), "unexpected 'off'", "can be turned off"),
    (body("window off"), "'window off' in a pattern that extends nothing", "extends PARENT"),
    (BASE + "}\npattern c extends base { window off }", "'base' has no window to remove",
     "'base' has heads and dims"),
    (BASE + "}\npattern c extends bsae { }", "extends unknown pattern 'bsae'",
     "did you mean 'base'? patterns defined above: base"),
    ("pattern c extends base { }\n" + BASE + "}", "'base', which is defined further down",
     "'base' starts on line 2"),
    ("pattern c extends c { }", "extends itself", None),
    (BASE + "}\n" + BASE + "}", "pattern 'base' is defined twice", "first defined on line 1"),
    (body("combine cmp slc cmp"), "branch 'cmp' is listed twice in combine", "line 4, column 13"),
    (body("dtype bf16 bf16"), "dtype 'bf16' is listed twice", None),
    (body("dtype bf17"), "'bf17' is not a valid dtype", "did you mean 'bf16'?"),
    (body("combine cmp sla"), "'sla' is neither a branch nor a statement", "expected a branch"),
    (body("combine"), "unexpected '}'", "expected a branch: cmp, slc or swa"),
    (body("compress block=32"), "compress is missing stride", "compress block=N stride=N [pool=mean|mlp]"),
    (body("heads q=1 size=2"), "'size' is not a key of heads", "heads takes q and kv"),
    ("pattern window { }", "'window' is a reserved word", None),
    (body("window size=-1"), "unexpected character '-'", "non-negative integers"),
    (body("window size=1.5"), "unexpected character '.'", None),
    (body("window size=12ab"), "'12ab' is not a number", None),
    (body("window size==1"), "unexpected '='", "expected a number"),
    (body("window size 1"), "unexpected number 1", "expected '='"),
    (body("windowsize=1"), "unknown key 'windowsize' in dims", None),
    (BASE + "}\n}", "unexpected '}'", "expected 'pattern' or the end of the file"),
    ("", "no pattern in this file", None),
    ("# only a comment\n", "no pattern in this file", None),
    (body("window size=" + "9" * 5000), "at most 2147483647", "int32"),
])
def test_error_messages(text, message, hint):
    err = error_of(text)
    # Other, real, errors may come too (`body("heads off")` also gives heads twice).
    (diag,) = [d for d in err.diagnostics if message in d.message]
    if hint is not None:
        assert hint in diag.hint
    assert all(d.span is not None and d.span.file == "spec.nsa" and d.span.line >= 1
               for d in err.diagnostics)


def test_all_structural_problems_are_reported_at_once():
    text = body("select block=1 block=2 top=1", "window size=1", "window size=2", "compress off")
    err = error_of(text)
    assert [d.message.split(" ")[0] for d in err.diagnostics] == ["duplicate", "window", "'compress"]
    # A broken statement does not also count as missing.
    err = error_of("pattern p { heads q=1 dims qk=1 }")
    assert [d.message for d in err.diagnostics] == ["heads is missing kv"]


def test_a_child_of_a_broken_parent_reports_only_the_parent():
    err = error_of("pattern a { heads q=1 dims qk=1 }\npattern b extends a { window size=1 }")
    assert [d.span.line for d in err.diagnostics] == [1]


# ---------------------------------------------------------------------------
# Recovery: every syntax error of a file in one run (issue 19)
# ---------------------------------------------------------------------------
# Seven mistakes in three patterns: four syntax errors (a bad character, an
# unknown key, a missing '}', a bad value) and three rule violations, which
# the checker finds (tests/test_check.py runs the same file).
SEVEN = """\
# Seven mistakes in three patterns.
pattern first {
    heads    q=16 kv=1
    dims     qk=64 v=@64
    compress block=64 stride=32
    select   block=16 top=4
}

pattern second {
    heads    q=16 kv=1
    dims     qk=64
    compress block=32 strid=16
    select   block=16 top=2 initial=1 local=1
    window   size=0

pattern third extends first {
    heads    q=8 kv=3
    compress block=32 stride=16 pool=max
    select   block=32 top=4
    dtype    bf16 fp16
}
"""
SEVEN_SYNTAX = [
    (4, 22, "unexpected character '@'"),
    (12, 23, "unknown key 'strid' in compress"),
    (16, 1, "'}' missing before this pattern: pattern 'second' (line 9) is never closed"),
    (18, 38, "'max' is not a valid pool"),
]


def located(diagnostics):
    return [(d.span.line, d.span.column, d.message) for d in diagnostics]


def test_every_syntax_error_of_a_file_is_reported_in_one_run():
    err = error_of(SEVEN)
    assert located(err.diagnostics) == SEVEN_SYNTAX
    # Each one renders with the file, the line and a caret.
    assert "spec.nsa:12:23: error: unknown key 'strid' in compress\n" \
           "        compress block=32 strid=16\n" \
           "                          ^^^^^\n" in str(err)
    assert "spec.nsa:16:1: error: '}' missing before this pattern" in str(err)
    with pytest.raises(SpecError) as info:
        parse_all(SEVEN, "spec.nsa")
    assert info.value.diagnostics == err.diagnostics


def test_load_reports_every_syntax_error_too(tmp_path):
    path = tmp_path / "seven.nsa"
    path.write_text(SEVEN)
    for call in (load, load_all):
        with pytest.raises(SpecError) as info:
            call(path)
        assert located(info.value.diagnostics) == SEVEN_SYNTAX
        assert all(d.span.file == str(path) for d in info.value.diagnostics)


def test_what_recovery_skipped_is_recorded_per_pattern():
    parsed = parse_source(SEVEN, "spec.nsa")
    assert located(parsed.diagnostics) == SEVEN_SYNTAX
    first, second, third = parsed.patterns
    # The broken dims line was dropped; the rest of `first` is as written.
    assert first.dims is None and first.select == ir.Select(block=16, top=4)
    assert second.window == ir.Window(size=0) and second.compress is None
    assert third.heads == ir.Heads(q=8, kv=3) and third.compress is None and third.select.block == 32
    assert dict(parsed.unsure) == {"first": {"dims"}, "second": {"compress"},
                                   "third": {"dims", "compress"}}  # third inherits first's dims
    assert parsed.names == ("first", "second", "third")


R = "pattern r { heads q=16 kv=1 dims qk=64 window size=8 }\n"


@pytest.mark.parametrize("text, expected, unsure", [
    # A statement cut short is dropped, and not reported again as missing.
    ("pattern p { heads q=1 kv= dims qk=16 window size=4 }", [(1, 27, "unexpected 'dims'")], {"heads"}),
    # A misspelt statement: the statement before it stays whole.
    ("pattern p { heads q=1 kv=1 windw size=512 dims qk=16 }",
     [(1, 28, "unknown statement 'windw'")], {"window"}),
    # Junk inside a statement: its keys after the junk were skipped, so no "missing kv".
    ("pattern p { heads q=64 xyz kv=4 dims qk=16 window size=4 }",
     [(1, 24, "unknown statement 'xyz'")], {"heads", "*"}),
    ("pattern p { heads q=64 foo=2 kv=4 dims qk=16 window size=4 }",
     [(1, 24, "unknown key 'foo' in heads")], {"heads"}),
    # One error per statement, however many statements are broken.
    ("pattern p {\n heads q=1 kv=1 @\n dims qk=@\n window size=-1\n combine cmp foo\n}",
     [(2, 17, "unexpected character '@'"), (3, 10, "unexpected character '@'"),
      (4, 14, "unexpected character '-'"), (5, 14, "'foo' is neither a branch nor a statement")],
     {"heads", "dims", "window", "combine", "*"}),
    # Stray braces and text between patterns.
    (R.replace("}", "}}}"), [(1, 55, "unexpected '}'")], None),
    (R + "@@ 12 }\n" + R.replace(" r ", " s "), [(2, 1, "unexpected character '@'")], None),
    # Text after a pattern's '}' may belong to it: its rules on heads and dims are not trusted.
    ("pattern p { heads q=1 } kv=1 dims qk=16 }", [(1, 25, "unexpected 'kv'")], {"heads", "dims"}),
    # A header that does not parse loses its pattern, and no pattern extending it complains.
    ("pattern 123 { heads q=1 kv=1 }\n" + R + "pattern b extends a { window size=1 }",
     [(1, 9, "unexpected number 123")], None),
    ("pattern a extnds r { heads q=1 kv=1 }\n" + R + "pattern b extends a { window size=1 }",
     [(1, 11, "unexpected 'extnds'")], None),
    ("pattern pattern { heads q=1 kv=1 }\n" + R, [(1, 9, "'pattern' is a reserved word and cannot name a pattern")],
     None),
    # A body open at the end of the file: the file is cut short, anything may be missing.
    ("pattern p {\n heads q=@", [(2, 10, "unexpected character '@'"),
                                 (1, 11, "pattern 'p' is never closed: the file ends before its '}'")],
     {"heads", "*"}),
])
def test_recovery_reports_each_mistake_once_and_nothing_it_caused(text, expected, unsure):
    parsed = parse_source(text, "spec.nsa")
    assert located(parsed.diagnostics) == sorted(expected)
    if unsure is not None:
        assert set(parsed.unsure[parsed.patterns[0].name]) == unsure
    # The pattern(s) without mistakes come through untouched.
    if "pattern r " in text:
        assert parse(R) in parsed.patterns


def test_a_missing_brace_is_supplied_and_both_patterns_are_built():
    text = "pattern a {\n heads q=1 kv=1 dims qk=16 window size=1\npattern b extends a {\n window size=2\n}\n"
    parsed = parse_source(text, "spec.nsa")
    (diag,) = parsed.diagnostics
    assert diag.render() == (
        "spec.nsa:3:1: error: '}' missing before this pattern: pattern 'a' (line 1) is never closed\n"
        "    pattern b extends a {\n"
        "    ^^^^^^^\n"
        "  hint: add '}' after the last statement of 'a'")
    a, b = parsed.patterns
    assert b == dataclasses.replace(a, name="b", extends="a", window=ir.Window(size=2))
    assert not parsed.unsure


def test_a_stray_pattern_word_makes_the_pattern_it_closed_unsure():
    # `pattern` inside a body looks like a missing '}'; when no header follows,
    # the rest may well belong to the body: no "heads is missing kv".
    parsed = parse_source("pattern a { heads q=1 pattern kv=1 dims qk=16 window size=1 }", "spec.nsa")
    assert [m for _, _, m in located(parsed.diagnostics)] == [
        "'}' missing before this pattern: pattern 'a' (line 1) is never closed",
        "'kv' is a reserved word and cannot name a pattern"]
    assert parsed.unsure == {"a": {"*"}}


def test_structure_errors_come_with_syntax_errors_in_file_order():
    text = "pattern a {\n heads q=1 kv=1 q=2\n dims qk=16 @\n window size=1 window size=2\n}"
    err = error_of(text)
    assert located(err.diagnostics) == [
        (2, 17, "duplicate key 'q' in heads"), (3, 13, "unexpected character '@'"),
        (4, 16, "window is given twice in pattern 'a'")]


def test_off_against_a_parent_left_empty_by_recovery_is_an_error_not_a_crash():
    # Found by the fuzzer: the parent's only statement was broken, so it was
    # built with no statement at all, and the hint listing what it has failed.
    text = "pattern c { heads v=0 }\npattern a extends c { compress off }"
    parsed = parse_source(text, "spec.nsa")
    assert [(line, m) for line, _, m in located(parsed.diagnostics)] == [
        (1, "'v' is not a key of heads"), (2, "'compress off' but 'c' has no compress to remove")]
    assert parsed.diagnostics[1].hint == "drop this line; 'c' has no statement that parsed"


def test_parsed_only_keeps_one_pattern_and_the_files_errors():
    parsed = parse_source(SEVEN, "spec.nsa")
    second = parsed.only("second")
    assert [p.name for p in second.patterns] == ["second"] and second.diagnostics == parsed.diagnostics
    missing = parsed.only("sceond")
    assert missing.patterns == () and "no pattern named 'sceond'" in missing.diagnostics[0].message
    assert "did you mean 'second'?" in missing.diagnostics[0].hint


# ---------------------------------------------------------------------------
# Property tests: patterns drawn by construction, printed, parsed back
# ---------------------------------------------------------------------------
numbers = st.integers(min_value=0, max_value=MAX_NUMBER)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(
    lambda n: n not in RESERVED)
gaps = st.lists(st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\n\n    ", "  # note {=}\n", "#\n"]),
                min_size=1, max_size=3).map("".join)
tight = st.sampled_from(["", " ", "\n", " # c\n"])  # may be empty: around '=' and braces


@st.composite
def keyed(draw, stmt, values):
    """`stmt` with the given key values, in a random order and layout."""
    keys = draw(st.permutations(list(values)))
    parts = [stmt]
    for key in keys:
        value = values[key].value if isinstance(values[key], Pool) else values[key]
        parts.append(f"{key}{draw(tight)}={draw(tight)}{value}")
    return "".join(part + draw(gaps) for part in parts)


@st.composite
def statements(draw):
    """{statement: (its source text, its IR node)}: heads and dims always,
    the others when drawn."""
    drawn = {}
    q, kv, qk, v = draw(numbers), draw(numbers), draw(numbers), draw(st.none() | numbers)
    drawn["heads"] = (draw(keyed("heads", {"q": q, "kv": kv})), ir.Heads(q=q, kv=kv))
    drawn["dims"] = (draw(keyed("dims", {"qk": qk} if v is None else {"qk": qk, "v": v})),
                     ir.Dims(qk=qk, v=qk if v is None else v))
    if draw(st.booleans()):
        written = {"block": draw(numbers), "stride": draw(numbers)}
        if draw(st.booleans()):
            written["pool"] = draw(st.sampled_from(Pool))
        drawn["compress"] = (draw(keyed("compress", written)), ir.Compress(**written))
    if draw(st.booleans()):
        written = {"block": draw(numbers), "top": draw(numbers)}
        for key in ("initial", "local"):
            if draw(st.booleans()):
                written[key] = draw(numbers)
        drawn["select"] = (draw(keyed("select", written)), ir.Select(**written))
    if draw(st.booleans()):
        size = draw(numbers)
        drawn["window"] = (draw(keyed("window", {"size": size})), ir.Window(size=size))
    for stmt, cls, enum in (("combine", ir.Combine, Branch), ("dtype", ir.DTypes, DType)):
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(enum), min_size=1, max_size=3, unique=True))
            text = stmt + draw(gaps) + "".join(e.value + draw(gaps) for e in chosen)
            drawn[stmt] = (text, cls(tuple(chosen)))
    return drawn


@st.composite
def block(draw, name, parent, drawn):
    """`pattern name [extends parent] { ... }` holding the drawn statements
    (texts, or `NAME off`) in a random order."""
    texts = [text for text, _ in drawn.values()]
    texts = [texts[i] for i in draw(st.permutations(range(len(texts))))]
    header = f"pattern{draw(gaps)}{name}" + (f"{draw(gaps)}extends{draw(gaps)}{parent}" if parent else "")
    return f"{header}{draw(tight)}{{{draw(gaps)}{''.join(texts)}}}"


@st.composite
def drawn_patterns(draw):
    name = draw(names)
    drawn = draw(statements())
    expected = ir.Pattern(name=name, **{k: node for k, (_, node) in drawn.items()})
    return draw(block(name, None, drawn)), expected


@given(drawn_patterns())
def test_drawn_patterns_parse_to_the_drawn_values(drawn):
    text, expected = drawn
    assert parse(text) == expected
    assert parse(text).canonical() == expected.canonical()


@given(drawn_patterns())
def test_format_pattern_round_trips(drawn):
    _, p = drawn
    assert parse(format_pattern(p)) == p
    assert format_pattern(parse(format_pattern(p))) == format_pattern(p)


@st.composite
def drawn_files(draw):
    """A file whose later patterns extend earlier ones, replacing some
    statements and turning off some inherited branches."""
    first_text, first = draw(drawn_patterns())
    texts, patterns = [first_text], [first]
    for _ in range(draw(st.integers(1, 3))):
        parent = draw(st.sampled_from(patterns))
        name = draw(names.filter(lambda n: n not in {p.name for p in patterns}))
        fresh = draw(statements())
        kept = draw(st.sets(st.sampled_from(sorted(fresh))))
        own = {k: fresh[k] for k in kept}
        for kind in REMOVABLE:
            if kind not in own and getattr(parent, kind) is not None and draw(st.booleans()):
                own[kind] = (f"{kind} off ", None)
        texts.append(draw(block(name, parent.name, own)))
        patterns.append(dataclasses.replace(parent, name=name, extends=parent.name,
                                            **{k: node for k, (_, node) in own.items()}))
    return "\n".join(texts), patterns


@given(drawn_files())
def test_extends_files_resolve_and_round_trip(drawn):
    text, expected = drawn
    assert parse_all(text) == expected
    assert parse_all(format_all(expected)) == expected
