"""Fuzzing the front end: whatever the input, parsing and checking it end in
patterns, a Plan or a SpecError (never a lark exception, a KeyError, a
ValueError from printing a number, ...), within a time bound, and every
diagnostic points inside the text it complains about. And the recovery after
a syntax error never invents an error: what is reported about a broken file
was already true of the intact one.

Inputs: random text and bytes, words of the language in random order,
character and token mutations of every examples/*.nsa, files generated from
the grammar with random (often wrong) keys, values, huge numbers and
`extends`, and deep `extends` chains.

How many examples: NSA_DSL_FUZZ_COUNT per test when set (e.g. 10000 for a
long local run), else a multiple of the hypothesis profile's count (ci: a
few hundred per test, about 15 s for the file).
"""
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import example, given, settings, strategies as st

import nsa_dsl
from nsa_dsl.check import Finding, check_parsed, validate
from nsa_dsl.errors import SpecError
from nsa_dsl.ir import MAX_NUMBER, Pattern
from nsa_dsl.parse import REMOVABLE, STATEMENTS, format_pattern, parse, parse_all, parse_source

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = [path.read_text() for path in sorted(EXAMPLES.glob("*.nsa"))]
VALID = FILES + [
    "pattern a { heads q=8 kv=2 dims qk=64 window size=16 }\n"
    "pattern b extends a { window off select block=16 top=2 combine slc dtype fp16 bf16 }\n",
]
VOCABULARY = [
    "pattern", "extends", "off", "heads", "dims", "compress", "select", "window", "combine",
    "dtype", "q", "kv", "qk", "v", "block", "stride", "pool", "top", "initial", "local", "size",
    "mean", "mlp", "max", "cmp", "slc", "swa", "bf16", "fp16", "fp32", "{", "}", "=", "==",
    "#", "\n", " ", "\t", "\r", "0", "7", "-1", "1.5", "9" * 30, "x", "_p1", "ü", "\x00", "@",
    "\ufeff", "2147483648", "0002147483647", "9" * 4301,
]
# Per example: parsing a few hundred characters takes milliseconds; this
# bound is for a hang (or quadratic blow-up), on a busy machine.
TIME_LIMIT_S = 10.0


def fuzz(scale: int):
    count = os.environ.get("NSA_DSL_FUZZ_COUNT")
    return settings(max_examples=int(count) if count else settings.default.max_examples * scale)


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Turn a hang into a failure (SIGALRM where there is one), else time it."""
    start = time.perf_counter()
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        assert time.perf_counter() - start < seconds, "parse + check took too long"
        return

    def on_alarm(signum, frame):
        raise Hang(f"parse + check still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def as_text(data) -> str:
    """The text a diagnostic's line and column refer to."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    return data[1:] if data.startswith("\ufeff") else data


def assert_inside(diagnostics, data) -> None:
    lines = as_text(data).split("\n")
    assert diagnostics
    for diag in diagnostics:
        span = diag.span
        assert span is not None and span.file == "fuzz.nsa"
        assert 1 <= span.line <= len(lines), (diag, len(lines))
        line = lines[span.line - 1].rstrip("\r")
        assert span.line_text == line
        assert 1 <= span.column <= len(line) + 1, diag  # one past the end: the end of the file
        assert span.column <= span.end_column <= len(line) + 2, diag
        assert diag.message and diag.hint
        assert diag.render().startswith(f"fuzz.nsa:{span.line}:{span.column}: {diag.severity}: ")


def check(data, plan: bool = True) -> None:
    """parse_all, parse_source + check_parsed (what `nsa-dsl check` does) and
    nsa_dsl.check of every pattern built: SpecError or results, in time."""
    with time_limit(TIME_LIMIT_S):
        try:
            patterns = parse_all(data, "fuzz.nsa")
        except SpecError as err:
            assert_inside(err.diagnostics, data)
            patterns = None
        else:
            assert patterns and all(isinstance(p, Pattern) for p in patterns)
        try:
            parsed = parse_source(data, "fuzz.nsa")
        except SpecError as err:  # only bytes that are not UTF-8 are refused whole
            assert isinstance(data, bytes) and patterns is None
            assert_inside(err.diagnostics, data)
            return
        # parse_all raises exactly when the tolerant read finds an error.
        assert (patterns is None) == bool(parsed.diagnostics)
        if patterns is not None:
            assert list(parsed.patterns) == patterns and not parsed.unsure
        report = check_parsed(parsed)
        if report.diagnostics:
            assert_inside(report.diagnostics, data)
        for pattern, findings, complete in report.checked:
            if not plan:
                break
            try:
                nsa_dsl.check(pattern)
            except SpecError as err:
                assert_inside(err.diagnostics, data)


# ---------------------------------------------------------------------------
# Text with no structure, and the words of the language in random order
# ---------------------------------------------------------------------------
@fuzz(8)
@given(st.text(max_size=300))
@example("pattern")
@example("pattern p {")
@example("}")
@example("pattern p extends p { heads q=1 kv=1 dims qk=1 }")
@example("pattern pattern { heads q=1 kv=1 }")
@example("pattern a { heads q=1 pattern kv=1 dims qk=16 window size=1 }")
@example("\ufeffpattern p { heads q=1 kv=1 dims qk=16 window size=1 }")
@example("\ufeff")
@example("pattern p { heads q=1 kv=1 dims qk=16 select block=16 top=1 initial=" + "9" * 4300 + " local=1 }")
def test_random_text(text):
    check(text)


@fuzz(8)
@given(st.lists(st.sampled_from(VOCABULARY), max_size=40).map(" ".join))
def test_random_words(text):
    check(text)


@fuzz(6)
@given(st.binary(max_size=300))
@example(b"\xef\xbb\xbfpattern p {")
@example(b"pattern p { heads q=1 \xff kv=1 }")
@example(b"\xc3")
def test_random_bytes(data):
    check(data)


@fuzz(4)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10**4), st.binary(min_size=1, max_size=3)),
                                        min_size=1, max_size=4))
def test_byte_mutations_of_valid_files(text, edits):
    data = text.encode()
    for at, chunk in edits:
        at %= len(data) + 1
        data = data[:at] + chunk + data[at + len(chunk):]
    check(data)


# ---------------------------------------------------------------------------
# Mutations of the examples
# ---------------------------------------------------------------------------
mutations = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 10**4), st.integers(1, 8)),
    st.tuples(st.just("insert"), st.integers(0, 10**4), st.sampled_from(VOCABULARY) | st.text(max_size=4)),
    st.tuples(st.just("replace"), st.integers(0, 10**4), st.characters()),
    st.tuples(st.just("truncate"), st.integers(0, 10**4), st.none()),
)


def mutate(text: str, op) -> str:
    kind, at, arg = op
    at = at % (len(text) + 1)
    if kind == "delete":
        return text[:at] + text[at + arg:]
    if kind == "insert":
        return text[:at] + arg + text[at:]
    if kind == "replace":
        return text[:at] + arg + text[at + 1:]
    return text[:at]


@fuzz(8)
@given(st.sampled_from(VALID), st.lists(mutations, min_size=1, max_size=4))
def test_character_mutations_of_valid_files(text, ops):
    for op in ops:
        text = mutate(text, op)
    check(text)


TOKEN = re.compile(r"#[^\n]*|\s+|[{}=]|[^\s{}=#]+")


@fuzz(8)
@given(st.sampled_from(VALID), st.data())
def test_token_mutations_of_valid_files(text, data):
    tokens = [t for t in TOKEN.findall(text) if not t.isspace()]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(tokens) - 1))
        j = data.draw(st.integers(0, len(tokens) - 1))
        kind = data.draw(st.sampled_from(["drop", "swap", "duplicate", "insert"]))
        if kind == "drop" and len(tokens) > 1:
            del tokens[i]
        elif kind == "swap":
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif kind == "duplicate":
            tokens.insert(j, tokens[i])
        else:
            tokens.insert(i, data.draw(st.sampled_from(VOCABULARY)))
    check(data.draw(st.sampled_from([" ", "\n", "  "])).join(tokens))


def test_valid_files_stay_valid():
    for text in VALID:
        check(text)
        assert parse_all(text)


# ---------------------------------------------------------------------------
# Files generated from the grammar, mostly well formed, often wrong
# ---------------------------------------------------------------------------
KEYS = {"heads": ["q", "kv"], "dims": ["qk", "v"], "compress": ["block", "stride", "pool"],
        "select": ["block", "top", "initial", "local"], "window": ["size"]}
LISTS = {"combine": ["cmp", "slc", "swa"], "dtype": ["bf16", "fp16", "fp32"]}
ALL_KEYS = sorted({k for keys in KEYS.values() for k in keys})
NAMES = ["a", "b", "c", "base", "deepseek_nsa", "window"]  # `window` is reserved: an error
gap = st.sampled_from([" ", "  ", "\n", "\n    ", "\t", " # note {=}\n", "\r\n"])
numbers = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 48, 64, 128, 192, 256, 512, 1024, 4096]),
    st.integers(0, 5000),
    st.sampled_from([MAX_NUMBER, MAX_NUMBER + 1, 2**32, 10**30]),
    st.integers(0, 10**40),
).map(str) | st.sampled_from(["9" * 4300, "9" * 5000, "0" * 50 + "16", "00064"])
values = numbers | st.sampled_from(["mean", "mlp", "max", "cmp", "off", "x", "-1", "1.5", ""])


@st.composite
def statements(draw):
    kind = draw(st.sampled_from([*STATEMENTS, *STATEMENTS, "windw", "off", "12"]))
    if kind in REMOVABLE and draw(st.integers(0, 5)) == 0:
        return f"{kind} off"
    if kind in LISTS:
        words = draw(st.lists(st.sampled_from(LISTS[kind] + ["cmp", "bf16", "x"]), max_size=4))
        return " ".join([kind, *words])
    own = KEYS.get(kind, ALL_KEYS)
    args = draw(st.lists(st.tuples(st.sampled_from(own) | st.sampled_from(ALL_KEYS), values), max_size=5))
    return kind + "".join(f"{draw(gap)}{key}={value}" for key, value in args)


@st.composite
def grammar_files(draw):
    blocks = []
    for _ in range(draw(st.integers(1, 5))):
        name = draw(st.sampled_from(NAMES))
        header = f"pattern {name}"
        if draw(st.booleans()):
            header += f" extends {draw(st.sampled_from(NAMES))}"
        body = "".join(draw(gap) + s for s in draw(st.lists(statements(), max_size=8)))
        close = draw(st.sampled_from(["}", "}", "}", "", "}}"]))
        blocks.append(f"{header} {{{body}{draw(gap)}{close}")
    return "\n".join(blocks)


@fuzz(8)
@given(grammar_files())
@example("pattern a { heads q=9 kv=3 dims qk=00064 select block=" + "9" * 5000 + " top=1 }")
@example("pattern a { }\npattern a { }\npattern c { heads v=0 }\npattern a { }\npattern a extends c { compress off }")
def test_files_generated_from_the_grammar(text):
    check(text)


# ---------------------------------------------------------------------------
# Deep `extends` chains
# ---------------------------------------------------------------------------
CHANGES = ["", "window size=7", "window off", "select block=16 top=1 initial=0 local=1", "select off",
           "heads q=16 kv=2", "compress block=16 stride=16", "compress off", "dtype fp16", "combine swa",
           "@", "windw size=2", "heads q= kv=1", "}", "window size=0", "dims qk=" + str(MAX_NUMBER + 1)]


@fuzz(1)
@given(st.lists(st.tuples(st.sampled_from(CHANGES), st.integers(-3, 1)), min_size=1, max_size=300))
def test_deep_extends_chains(steps):
    lines = ["pattern p0 { heads q=8 kv=2 dims qk=64 window size=16 }"]
    for i, (change, back) in enumerate(steps, start=1):
        parent = i - 1 if back >= 0 else max(0, i + back)  # mostly the previous one
        parent_name = f"p{parent}" if back != 1 else f"p{i + 1}"  # sometimes one defined further down
        lines.append(f"pattern p{i} extends {parent_name} {{ {change} }}")
    check("\n".join(lines), plan=False)


def test_a_chain_of_thousands_resolves_quickly_and_a_broken_root_stays_one_error():
    text = "pattern p0 { heads q=8 kv=2 dims qk=64 window size=16 }\n" + "".join(
        f"pattern p{i} extends p{i - 1} {{ window size={i + 16} }}\n" for i in range(1, 3000))
    with time_limit(TIME_LIMIT_S):
        patterns = parse_all(text)
        assert patterns[-1].window.size == 3015 and patterns[-1].heads == patterns[0].heads
        report = check_parsed(parse_source(text.replace("kv=2", "kv=@", 1), "fuzz.nsa"))
    # The root's heads is broken: one syntax error, and no child says "no heads".
    assert [(d.span.line, d.message) for d in report.diagnostics] == [(1, "unexpected character '@'")]
    assert len(report.checked) == 3000 and not any(complete for _, _, complete in report.checked)


# ---------------------------------------------------------------------------
# Recovery invents nothing: a broken file's rule findings and structure
# errors were already true of the intact file
# ---------------------------------------------------------------------------
plausible = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 12, 16, 24, 32, 40, 48, 64, 128, 192, 256, 300, 4096]),
                      st.integers(0, 5000), st.sampled_from([MAX_NUMBER - 1, MAX_NUMBER]))


@st.composite
def intact_patterns(draw):
    """Any pattern the language can write (valid or not), as formatted text:
    one statement per line."""
    from nsa_dsl.ir import Branch, Combine, Compress, Dims, DType, DTypes, Heads, Pool, Select, Window

    p = Pattern(name="p", heads=Heads(q=draw(plausible), kv=draw(plausible)),
                dims=Dims(qk=draw(plausible), v=draw(plausible)),
                compress=draw(st.none() | st.builds(Compress, plausible, plausible, st.sampled_from(Pool))),
                select=draw(st.none() | st.builds(Select, plausible, plausible, plausible, plausible)),
                window=draw(st.none() | st.builds(Window, plausible)),
                combine=draw(st.none() | st.lists(st.sampled_from(Branch), min_size=1, max_size=3, unique=True)
                             .map(lambda b: Combine(tuple(b)))),
                dtype=draw(st.none() | st.lists(st.sampled_from(DType), min_size=1, max_size=3, unique=True)
                           .map(lambda d: DTypes(tuple(d)))))
    return format_pattern(p)


JUNK = ["@", "=", "{", "}", "12ab", "foo", "off", "7", "pattern", "extends", "-", "mean", "fp16", "cmp", "windw",
        "q", "slc"]
# The structure errors that only the absence of text can cause.
ABSENCE = re.compile(r"is missing|has no \w+ statement|extends unknown|has no \w+ to remove|no pattern in")


@fuzz(8)
@given(intact_patterns(), st.data())
@example("pattern p {\n    heads    q=8 kv=2\n    dims     qk=64 v=64\n    compress block=32 stride=16 pool=mean\n"
         "    select   block=16 top=8 initial=1 local=2\n}\n", None)
def test_recovery_reports_nothing_the_intact_file_does_not_have(text, data):
    lines = text.split("\n")
    if data is None:  # the explicit example: `strid` for `stride`
        broken = text.replace("stride=", "strid=")
    else:
        row = data.draw(st.integers(0, len(lines) - 2))
        spots = [m.span() for m in TOKEN.finditer(lines[row]) if not m.group().isspace()]
        start, end = data.draw(st.sampled_from(spots))
        line = lines[row]
        if data.draw(st.booleans()):  # drop one token
            line = line[:start] + " " + line[end:]
        else:  # put junk before it
            line = f"{line[:start]} {data.draw(st.sampled_from(JUNK))} {line[start:]}"
        broken = "\n".join(lines[:row] + [line] + lines[row + 1:])
    parsed = parse_source(broken, "fuzz.nsa")
    if not parsed.diagnostics:
        return  # the edit was legal (e.g. one dtype fewer): a different pattern, nothing to compare
    assert not [d.message for d in parsed.diagnostics if ABSENCE.search(d.message)]
    intact = {(f.rule, f.span.line, f.message) for f in validate(parse(text, "fuzz.nsa"))}
    for diag in check_parsed(parsed).diagnostics:
        if isinstance(diag, Finding):
            assert (diag.rule, diag.span.line, diag.message) in intact, (broken, diag)


def test_without_the_filter_recovery_would_report_a_false_error():
    """Without check_parsed's filter, the broken compress line of the
    explicit example gives an error the intact file does not have."""
    broken = ("pattern p {\n    heads q=16 kv=1\n    dims qk=64\n    compress block=32 strid=16\n"
              "    select block=64 top=8\n}\n")
    (pattern,) = parse_source(broken, "fuzz.nsa").patterns
    assert "select.top.unranked" in {f.rule for f in validate(pattern)}
    assert not [d for d in check_parsed(parse_source(broken, "fuzz.nsa")).diagnostics if isinstance(d, Finding)]


@pytest.mark.parametrize("text", FILES)
def test_the_examples_mutated_above_reach_a_plan(text):
    """The shipped examples pass the checker, so check() above plans them."""
    for pattern in parse_all(text):
        assert nsa_dsl.check(pattern).pattern == pattern
