"""Grammar fuzzing: whatever the text, parse_all returns patterns or raises
SpecError (never a lark exception, KeyError, IndexError, ...), quickly, and
every diagnostic points inside the text it complains about."""
import re
import time
from pathlib import Path

from hypothesis import example, given, settings, strategies as st

from nsa_dsl.errors import SpecError
from nsa_dsl.ir import Pattern
from nsa_dsl.parse import parse_all

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VALID = [(EXAMPLES / f"{name}.nsa").read_text() for name in ("deepseek_nsa", "window_only", "moba_like")] + [
    "pattern a { heads q=8 kv=2 dims qk=64 window size=16 }\n"
    "pattern b extends a { window off select block=16 top=2 combine slc dtype fp16 bf16 }\n",
]
VOCABULARY = [
    "pattern", "extends", "off", "heads", "dims", "compress", "select", "window", "combine",
    "dtype", "q", "kv", "qk", "v", "block", "stride", "pool", "top", "initial", "local", "size",
    "mean", "mlp", "max", "cmp", "slc", "swa", "bf16", "fp16", "fp32", "{", "}", "=", "==",
    "#", "\n", " ", "\t", "\r", "0", "7", "-1", "1.5", "9" * 30, "x", "_p1", "ü", "\x00", "@",
]
# Each example draws more cases than a profile's default: parsing is cheap.
MORE = settings(max_examples=settings.default.max_examples * 4)


def check(text: str) -> None:
    start = time.perf_counter()
    try:
        patterns = parse_all(text, "fuzz.nsa")
    except SpecError as err:
        assert err.diagnostics
        lines = text.split("\n")
        for diag in err.diagnostics:
            span = diag.span
            assert span is not None and span.file == "fuzz.nsa"
            assert str(err).startswith("fuzz.nsa")
            if span.line > 0:  # the caret sits on a real line, at most one past its end
                line = lines[span.line - 1].rstrip("\r")
                assert span.line_text == line
                assert 1 <= span.column <= len(line) + 1
                assert span.end_column >= span.column
    else:
        assert patterns and all(isinstance(p, Pattern) for p in patterns)
    assert time.perf_counter() - start < 5, "parsing took too long"


@MORE
@given(st.text(max_size=300))
@example("pattern")
@example("pattern p {")
@example("}")
@example("pattern p extends p { heads q=1 kv=1 dims qk=1 }")
def test_random_text(text):
    check(text)


@MORE
@given(st.lists(st.sampled_from(VOCABULARY), max_size=40).map(" ".join))
def test_random_words(text):
    check(text)


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


@MORE
@given(st.sampled_from(VALID), st.lists(mutations, min_size=1, max_size=4))
def test_character_mutations_of_valid_files(text, ops):
    for op in ops:
        text = mutate(text, op)
    check(text)


TOKEN = re.compile(r"#[^\n]*|\s+|[{}=]|[^\s{}=#]+")


@MORE
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
