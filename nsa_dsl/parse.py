"""Spec text -> Pattern.

Three small steps, each in its own section below:

1. lark parses the text with grammar/nsa.lark (LALR, basic lexer), fed one
   token at a time by `_Reader`, which recovers after a syntax error so that
   one run reports every one of them. Each is translated into a Diagnostic
   that says, in words, what would have been valid at that spot
   (`_syntax_error`).
2. A walk over the tree turns each `pattern { ... }` block into a draft: its
   statements as IR nodes, each with spans. Problems the grammar leaves open
   on purpose (a key or statement given twice, missing keys, `off` where
   nothing can be turned off) are reported here, all of them at once.
3. `extends` is resolved in file order: a child starts from its parent's
   statements and replaces or (with `off`) removes them.

parse/parse_all/load/load_all raise one SpecError holding every syntax and
structure error. parse_source/load_source return them instead, with the
patterns that could still be built and what the recovery skipped in each
(`Parsed`), for `nsa-dsl check` to report syntax and rule errors together.

`format_pattern` prints a Pattern back as source that parses to an equal
Pattern; the tests hold both directions together.

Choices the language makes (grammar/nsa.lark has the grammar itself):
- layout is free-form: statements may share a line or span several, spaces
  around `=` are allowed; `#` comments run to the end of the line;
- the fixed words (statements, keys, values, `pattern`, `extends`, `off`) are
  reserved and cannot name a pattern;
- numbers are decimal digits, 0 included, leading zeros allowed, at most
  ir.MAX_NUMBER (2**31 - 1: the kernels index with int32); a larger one is
  an error here, before it is ever converted, so no later pass meets a
  number it cannot print. Within that bound the checker judges them;
- `NAME off` works for compress, select and window, only in a pattern that
  extends one which has that statement.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from . import ir
from .errors import Diagnostic, SpecError
from .ir import Pattern, Span
from .resources import grammar_path

__all__ = [
    "parse", "parse_all", "load", "load_all", "parse_source", "load_source", "Parsed",
    "format_pattern", "format_all",
    "STATEMENTS", "REMOVABLE", "RESERVED",
]

# ---------------------------------------------------------------------------
# The fixed words. Keys and their defaults come from the IR's dataclasses, so
# the IR stays the one place that says what a statement holds; a test checks
# that the grammar spells the same words.
# ---------------------------------------------------------------------------
_KEYED = {"heads": ir.Heads, "dims": ir.Dims, "compress": ir.Compress,
          "select": ir.Select, "window": ir.Window}
# statement -> (IR class, field holding the names, enum of the names, noun)
_LISTED = {"combine": (ir.Combine, "branches", ir.Branch, "branch"),
           "dtype": (ir.DTypes, "dtypes", ir.DType, "dtype")}
_ENUM_KEYS = {"pool": ir.Pool}  # keys whose value is a word, not a number
STATEMENTS = ("heads", "dims", "compress", "select", "window", "combine", "dtype")
REMOVABLE = ("compress", "select", "window")  # may be written `NAME off`


def _keys(stmt: str) -> tuple:
    """Keys of a keyed statement in canonical order (the IR field order)."""
    return tuple(f.name for f in dataclasses.fields(_KEYED[stmt]) if not f.kw_only)


def _required(stmt: str) -> tuple:
    # dims.v has no IR default because it defaults to another key (qk).
    return tuple(f.name for f in dataclasses.fields(_KEYED[stmt])
                 if not f.kw_only and f.default is dataclasses.MISSING
                 and (stmt, f.name) != ("dims", "v"))


def _usage(stmt: str) -> str:
    """`compress block=N stride=N [pool=mean|mlp]`: the shape of a statement."""
    if stmt in _LISTED:
        names = "|".join(e.value for e in _LISTED[stmt][2])
        return f"{stmt} {names} ..."
    parts = []
    for key in _keys(stmt):
        value = "|".join(e.value for e in _ENUM_KEYS[key]) if key in _ENUM_KEYS else "N"
        parts.append(f"{key}={value}" if key in _required(stmt) else f"[{key}={value}]")
    return " ".join([stmt, *parts])


_ENUM_GROUPS = (  # (noun, words) for every closed set of value words
    ("pool", tuple(p.value for p in ir.Pool)),
    ("branch", tuple(b.value for b in ir.Branch)),
    ("dtype", tuple(d.value for d in ir.DType)),
)
_ALL_KEYS = frozenset(k for s in _KEYED for k in _keys(s))
RESERVED = frozenset({"pattern", "extends", "off", *STATEMENTS, *_ALL_KEYS,
                      *(w for _, words in _ENUM_GROUPS for w in words)})


def _or_list(words: Iterable[str], last: str = "or") -> str:
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
Text = Union[str, bytes, bytearray]
PathArg = Union[str, "os.PathLike[str]"]


def parse_all(text: Text, filename: PathArg = "<string>") -> list:
    """Every pattern in `text`, in file order, with `extends` resolved.

    `text` is a str or UTF-8 bytes; a byte-order mark at its start is
    skipped. Raises SpecError holding every syntax and structure error of the
    text, TypeError for arguments of the wrong type."""
    filename = _path_arg("parse_all", "filename", filename)
    return _patterns(_read_source(_text_arg("parse_all", text, filename), filename))


def parse(text: Text, filename: PathArg = "<string>", name: Optional[str] = None) -> Pattern:
    """The only pattern in `text`, or the one called `name`."""
    filename = _path_arg("parse", "filename", filename)
    _name_arg("parse", name)
    return _pick(parse_all(text, filename), filename, name)


def load_all(path: PathArg) -> list:
    path = _path_arg("load_all", "path", path)
    return _patterns(_read_source(_read(path), path))


def load(path: PathArg, name: Optional[str] = None) -> Pattern:
    path = _path_arg("load", "path", path)
    _name_arg("load", name)
    return _pick(load_all(path), path, name)


@dataclass(frozen=True)
class Parsed:
    """What a tolerant read of one spec found: parse_source, load_source.

    patterns: the patterns that could be built, in file order. In a file with
      syntax errors a pattern may lack a statement that was dropped.
    diagnostics: every syntax and structure error, in file order.
    unsure: pattern name -> the statements that text skipped after a syntax
      error may have belonged to ("*": any of them). A later pass must not
      report what only the absence or the partial content of such a statement
      causes (nsa_dsl.check.check_parsed does this).
    names: every pattern name the file defines, broken patterns included.
    """

    filename: str
    patterns: tuple
    diagnostics: tuple
    unsure: Mapping[str, frozenset]
    names: tuple

    def only(self, name: str) -> "Parsed":
        """The same, keeping only the pattern called `name` (the file's
        diagnostics stay: they are problems of the file), or an error saying
        that no pattern has that name."""
        missing = ()
        if name not in self.names:
            missing = (_no_such_name(name, self.names, self.filename),)
        return dataclasses.replace(self, patterns=tuple(p for p in self.patterns if p.name == name),
                                   diagnostics=missing + self.diagnostics)


def parse_source(text: Text, filename: PathArg = "<string>") -> Parsed:
    """Read `text` as far as it goes: every syntax error, every structure
    error, and the patterns that could still be built. Raises only for
    arguments of the wrong type (TypeError) and bytes that are not UTF-8."""
    filename = _path_arg("parse_source", "filename", filename)
    return _read_source(_text_arg("parse_source", text, filename), filename)


def load_source(path: PathArg) -> Parsed:
    """parse_source of a file; SpecError when it cannot be read as UTF-8."""
    path = _path_arg("load_source", "path", path)
    return _read_source(_read(path), path)


def _read_source(text: str, filename: str) -> Parsed:
    src = _Source(text, filename)
    reader = _Reader(src)
    tree = reader.read()
    builder = _Builder(src, reader)
    patterns = builder.build(tree)
    # Syntax errors come in reading order, structure errors per pattern: sort
    # them into file order (stable: one spot's messages keep their order).
    diagnostics = sorted([*reader.problems, *builder.problems], key=_position)
    names = sorted([*builder.all_names.values(), *reader.lost], key=lambda tok: tok.start_pos)
    return Parsed(filename, tuple(patterns), tuple(diagnostics), builder.unsure_by_name(),
                  tuple(dict.fromkeys(str(tok) for tok in names)))


def _position(diag: Diagnostic) -> tuple:
    return (diag.span.line, diag.span.column) if diag.span is not None else (0, 0)


def _patterns(parsed: Parsed) -> list:
    if parsed.diagnostics:
        raise SpecError(parsed.diagnostics)
    return list(parsed.patterns)


# ---- the arguments: a wrong type is the caller's bug (TypeError), naming the
# argument; bad content is the spec's (SpecError) ----
def _type_error(func: str, argument: str, expected: str, value) -> TypeError:
    return TypeError(f"{func}: {argument} must be {expected}; got {type(value).__name__}")


def _text_arg(func: str, text, filename: str) -> str:
    if isinstance(text, (bytes, bytearray)):
        return _decode(bytes(text), filename)
    if not isinstance(text, str):
        raise _type_error(func, "text", "str or UTF-8 bytes", text)
    return _without_bom(text)


def _path_arg(func: str, argument: str, value) -> str:
    # os.fspath of a PathLike may give bytes; only str names a spec.
    name = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(name, str):
        raise _type_error(func, argument, "str or os.PathLike", value)
    return name


def _name_arg(func: str, name) -> None:
    if name is not None and not isinstance(name, str):
        raise _type_error(func, "name", "str or None", name)


def _without_bom(text: str) -> str:
    """Editors may save UTF-8 with a byte-order mark; it is not part of the
    spec, and columns count from the character after it, as editors show."""
    return text[1:] if text.startswith("\ufeff") else text


def _decode(data: bytes, filename: str) -> str:
    try:
        return _without_bom(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        # Everything before the bad byte decodes: place the caret from it.
        before = _without_bom(data[:err.start].decode("utf-8"))
        line = before.count("\n") + 1
        column = len(before) - before.rfind("\n")
        shown = _without_bom(data.decode("utf-8", "replace")).split("\n")[line - 1].rstrip("\r")
        raise SpecError.at(Span(filename, line, column, column + 1, shown),
                           f"the spec is not UTF-8 text: byte 0x{data[err.start]:02x} cannot be decoded",
                           "save the file as UTF-8 (specs are plain text)") from None


def _read(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SpecError.at(Span.unknown(path), f"cannot read spec file: {err.strerror or err}",
                           "give the path of a readable UTF-8 .nsa file") from None
    return _decode(data, path)


def _pick(patterns: list, filename: str, name: Optional[str]) -> Pattern:
    names = [p.name for p in patterns]
    if name is None:
        if len(patterns) == 1:
            return patterns[0]
        # Point at the second header: that is where "the only pattern" stops.
        raise SpecError.at(patterns[1].span,
                           f"this file holds {len(patterns)} patterns; say which one to use",
                           f"pass name= one of: {', '.join(names)}")
    for p in patterns:
        if p.name == name:
            return p
    raise SpecError(_no_such_name(name, names, filename))


def _no_such_name(name: str, names: Iterable[str], filename: str) -> Diagnostic:
    names = list(names)
    return Diagnostic("error", f"no pattern named '{name}' in this file", Span.unknown(filename),
                      f"{_did_you_mean(name, names)}patterns here: {', '.join(names) or 'none'}")


@lru_cache(maxsize=None)
def _parser() -> Lark:
    # The basic lexer (not the contextual one) makes every fixed word a NAME
    # that lark retypes to the keyword, so keywords end at a word boundary.
    return Lark(grammar_path().read_text(encoding="utf-8"), parser="lalr",
                lexer="basic", maybe_placeholders=True)


@lru_cache(maxsize=None)
def _terminal_words() -> dict:
    """Terminal name -> the fixed text it stands for (`STRIDE` -> `stride`)."""
    return {t.name: t.pattern.value for t in _parser().terminals if t.pattern.type == "str"}


# ---------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------
class _Source:
    """The text being parsed, able to make Spans from lark positions."""

    def __init__(self, text: str, filename: str):
        self.text, self.filename = text, filename
        self.lines = text.split("\n")  # lark counts lines by "\n" only, so do we

    def span(self, line: int, column: int, end_column: Optional[int] = None) -> Span:
        text = self.lines[line - 1].rstrip("\r") if 1 <= line <= len(self.lines) else ""
        return Span(self.filename, line, column, end_column or column + 1, text)

    def of(self, tok: Token, until: Optional[Token] = None) -> Span:
        """Span of a token, or from `tok` through `until` when on one line."""
        end = until if until is not None and until.line == tok.line else tok
        return self.span(tok.line, tok.column, end.end_column)


# ---------------------------------------------------------------------------
# Reading with recovery: every syntax error of a file in one pass
# ---------------------------------------------------------------------------
# lark's LALR parser is fed one token at a time. After a syntax error the
# reader reports it and skips tokens ("panic mode") up to one where parsing
# can go on: a statement keyword or '}' inside a pattern's body, or the next
# `pattern`. Nothing is reported while skipping, so one mistake gives one
# error however many tokens it spoils. A missing '}' is found while skipping
# too and is a mistake of its own: it is reported, and a '}' is supplied.
#
# What the skipping may have cost is written down, so that no later pass
# reports a consequence of the recovery as a mistake:
# - a statement that cannot be completed where parsing goes on is dropped
#   (its tokens are popped off the parser's stacks);
# - each pattern keeps the set of statements the skipped text may have
#   belonged to ("unsure"; "*" when a word could be part of any), so that
#   "no heads statement", "heads is missing kv" or a rule that reads heads
#   are not reported after a broken heads line;
# - a pattern whose header did not parse is dropped whole and its name kept
#   ("lost"), so that patterns extending it stay quiet.
_ANY = "*"


@lru_cache(maxsize=None)
def _word_types() -> dict:
    """Fixed word -> its terminal name (`stride` -> `STRIDE`)."""
    return {word: name for name, word in _terminal_words().items()}


@lru_cache(maxsize=None)
def _statement_types() -> frozenset:
    return frozenset(_word_types()[s] for s in STATEMENTS)


@lru_cache(maxsize=None)
def _owners() -> dict:
    """Every word of a statement -> the statements it can belong to."""
    owners: dict = {s: {s} for s in STATEMENTS}
    for stmt in _KEYED:
        for key in _keys(stmt):
            owners.setdefault(key, set()).add(stmt)
    for noun, stmt in (("pool", "compress"), ("branch", "combine"), ("dtype", "dtype")):
        for word in dict(_ENUM_GROUPS)[noun]:
            owners[word] = {stmt}
    owners["off"] = set(REMOVABLE)
    return {word: frozenset(stmts) for word, stmts in owners.items()}


def _meant(word: str, unknown=frozenset({_ANY})) -> frozenset:
    """The statements a skipped word may have been part of: its own, else
    those of the word it most resembles (a typo), else `unknown`."""
    owners = _owners()
    if word not in owners:
        close = difflib.get_close_matches(word, list(owners), n=1, cutoff=0.6)
        return owners[close[0]] if close else unknown
    return owners[word]


def _is_word(tok: Token) -> bool:
    return tok.type == "NAME" or str(tok) in _owners() or str(tok) == "extends"


class _Reader:
    """Feeds the tokens of one text to lark's LALR parser, recovering after
    each syntax error (see above). `read()` returns the tree of whatever
    parsed, or None when not one pattern did."""

    def __init__(self, src: _Source):
        self.src = src
        self.ip = _parser().parse_interactive(src.text)
        self.stacks = self.ip.parser_state  # state_stack and value_stack
        # The same parse tables without callbacks: a trial feed builds no tree.
        self.quiet = copy.copy(self.stacks.parse_conf)
        self.quiet.callbacks = {}
        self.problems: list = []
        self.unsure: dict = {}     # start of a pattern's name token -> statements
        self.dropped: dict = {}    # the same -> statements popped off the stacks
        self.lost: list = []       # name tokens of patterns whose header did not parse
        self.lost_unnamed = False  # a header broke before its name
        self.skipping = False
        # Where the parser is: the value-stack index of `pattern` while its
        # header is read; the pattern's name token (kept after its '}', for
        # junk that follows it); its '{' while its body is open; the keyword
        # and value-stack index of the statement in progress.
        self.head: Optional[int] = None
        self.name: Optional[Token] = None
        self.brace: Optional[Token] = None
        self.stmt: Optional[tuple] = None
        self.owner: Optional[Token] = None  # the pattern skipped words are charged to
        self.closed: Optional[Token] = None  # a pattern closed by a supplied '}', until the next header parses
        self.prev: Optional[Token] = None   # the token before this one
        self.last: Optional[Token] = None   # the last real token
        self.tree: Optional[Tree] = None

    def read(self) -> Optional[Tree]:
        for tok in self._tokens():
            self.step(tok)
        end = Token.new_borrow_pos("$END", "", self.last) if self.last else Token("$END", "", 0, 1, 1)
        self.step(end)
        return self.tree

    def _tokens(self):
        """lark's lexer, restarted one character further after a character
        it cannot lex (as lark's own on_error does); those come as errors."""
        thread = self.ip.lexer_thread
        while True:
            try:
                yield from thread.lex(self.stacks)
                return
            except UnexpectedCharacters as err:
                yield err
                thread.state.line_ctr.feed(self.src.text[err.pos_in_stream])

    # ---- one token ----
    def step(self, tok) -> None:
        if isinstance(tok, UnexpectedCharacters):
            if not self.skipping:
                self.error(tok, None)
            self.prev = None
            return
        reported = False
        if not self.skipping:
            try:
                self.feed(tok)
                return
            except UnexpectedToken as err:
                # A `pattern` inside a body: resume() says that '}' is missing.
                if not (tok.type == "PATTERN" and self.brace is not None):
                    self.error(err, tok)
                    reported = True
        # `pattern pattern {`: the second one was meant as a name, not a new pattern.
        as_name = tok.type == "PATTERN" and self.prev is not None and self.prev.type == "PATTERN"
        if not as_name and self.resume(tok, reported):
            return
        if not reported:
            self.skip(tok)
        elif tok.type != "$END":  # error() has charged what this token may have spoiled
            self.prev = self.last = tok

    def feed(self, tok: Token) -> None:
        result = self.ip.feed_token(tok)
        top = len(self.stacks.value_stack) - 1
        kind = tok.type
        if kind == "PATTERN":
            self.head, self.name = top, None
        elif kind == "NAME" and self.head is not None and self.name is None:
            self.name = tok
        elif kind == "LBRACE":
            self.head, self.brace, self.closed = None, tok, None
        elif kind in _statement_types():
            self.stmt = (tok, top)
        elif kind == "RBRACE":
            self.brace = self.stmt = None
        if kind == "$END":
            self.tree = result
        else:
            self.prev = self.last = tok
        self.skipping = False

    def can_feed(self, kind: str) -> bool:
        """Whether the parser takes a token of this kind now (tried on a copy
        without tree building, as lark's InteractiveParser.accepts does)."""
        trial = self.ip.copy(deepcopy_values=False)
        trial.parser_state.parse_conf = self.quiet
        try:
            trial.feed_token(Token(kind, ""))
        except UnexpectedToken:
            return False
        return True

    # ---- after a syntax error ----
    def error(self, err: UnexpectedInput, tok: Optional[Token]) -> None:
        accepts = set(self.ip.accepts())
        opened = (self.name, self.brace) if self.brace is not None else None
        self.problems.append(_syntax_error(err, self.src, accepts, opened, self.last))
        self.skipping = True
        if self.head is not None:  # in a header: the pattern cannot be built
            self.lose_pattern()
        elif self.brace is not None:
            self.owner = self.name
            self.mark(self.spoiled(tok, accepts))
        else:  # between patterns: perhaps the rest of the last one
            self.owner = self.name
            if tok is not None and _is_word(tok):
                self.mark(_meant(str(tok)))

    def spoiled(self, tok: Optional[Token], accepts: set) -> set:
        """The statements an error inside a body may have spoiled: the one in
        progress, and any the offending word may have been meant for."""
        current = {str(self.stmt[0])} if self.stmt else set()
        if tok is None or "RBRACE" not in accepts or not _is_word(tok) or self.glued(tok):
            return current  # a bad character, a statement cut short, a stray number or brace
        word = str(tok)
        if self.src.text[tok.end_pos:].lstrip().startswith("="):  # `word=`: a key of the current one
            return current | _meant(word, unknown=frozenset())
        if difflib.get_close_matches(word, STATEMENTS, n=1, cutoff=0.6):
            return set(_meant(word))  # a misspelt statement: the current one is complete
        return current | _meant(word)

    def glued(self, tok: Token) -> bool:
        return tok.start_pos > 0 and self.src.text[tok.start_pos - 1].isdigit()

    def skip(self, tok: Token) -> None:
        """Drop a token, charging the words it may have belonged to."""
        if self.owner is not None and _is_word(tok) and not (self.prev is not None and self.prev.type == "EQUAL"):
            self.mark(_meant(str(tok)))  # (a word after '=' is a value: its key was charged)
        if tok.type != "$END":
            self.prev = self.last = tok

    def mark(self, statements) -> None:
        if self.owner is not None and statements:
            self.unsure.setdefault(self.owner.start_pos, set()).update(statements)

    def resume(self, tok: Token, reported: bool) -> bool:
        """Go on at `tok` if parsing can go on there, supplying a missing '}'."""
        kind = tok.type
        if kind in ("PATTERN", "$END"):
            if self.brace is not None:
                if not reported:
                    self.problems.append(_unclosed(self.src, self.name, self.brace, tok))
                if kind == "$END":  # a truncated file: anything may be missing from this pattern
                    self.owner = self.name
                    self.mark({_ANY})
                closed = self.name
                self.close_body()
            else:
                closed = None
            if kind == "$END":
                if self.can_feed("$END"):
                    self.feed(tok)
                return True
            self.feed(tok)  # a `pattern` is always welcome between patterns
            self.closed = closed
            return True
        if self.brace is not None and (kind in _statement_types() or kind == "RBRACE"):
            if not self.can_feed(kind):
                self.drop_statement()
            if self.can_feed(kind):
                self.feed(tok)
                return True
        return False

    def close_body(self) -> None:
        if not self.can_feed("RBRACE"):
            self.drop_statement()
        self.feed(Token.new_borrow_pos("RBRACE", "}", self.last or self.brace))
        self.owner = None

    def drop_statement(self) -> None:
        """Pop the statement in progress off the parser's stacks, back to the
        state before its keyword: between two statements."""
        if self.stmt is None:
            return
        keyword, at = self.stmt
        values = self.stacks.value_stack
        if len(values) > at and values[at] is keyword:
            del values[at:]
            del self.stacks.state_stack[at + 1:]
        self.owner = self.name
        self.mark({str(keyword)})
        self.dropped.setdefault(self.name.start_pos, set()).add(str(keyword))
        self.stmt = None

    def lose_pattern(self) -> None:
        """Pop a pattern whose header broke off the stacks, keeping its name."""
        if self.closed is not None:
            # The `pattern` that closed the previous body starts no pattern:
            # it and what follows may well belong to that body.
            self.owner = self.closed
            self.mark({_ANY})
            self.closed = None
        del self.stacks.value_stack[self.head:]
        del self.stacks.state_stack[self.head + 1:]
        if self.name is not None:
            self.lost.append(self.name)
        else:
            self.lost_unnamed = True
        self.head = self.name = self.owner = None


# ---------------------------------------------------------------------------
# Syntax errors: lark's exception -> one Diagnostic in words
# ---------------------------------------------------------------------------
def _syntax_error(err: UnexpectedInput, src: _Source, accepts: set, opened: Optional[tuple],
                  last: Optional[Token]) -> Diagnostic:
    """`accepts`: the terminals the parser would have taken; `opened`: the
    name and '{' of the pattern whose body is open; `last`: the last token."""
    words = _terminal_words()
    accepted = {words[t] for t in accepts if t in words}  # the same, as fixed words
    expected = _expected(accepts, accepted)

    if isinstance(err, UnexpectedCharacters):
        char = src.text[err.pos_in_stream]
        shown = char if char.isprintable() else repr(char)[1:-1]
        if char == "-" and "INT" in accepts:
            expected = "values are non-negative integers; " + expected
        return _error(src.span(err.line, err.column), f"unexpected character '{shown}'", expected)
    tok = err.token
    if tok.type == "$END":
        return _end_of_file(src, accepts, expected, opened, last)
    if tok.type == "INT":
        return _error(src.of(tok), f"unexpected number {tok}", expected)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(tok)):  # punctuation: { } =
        return _error(src.of(tok), f"unexpected '{tok}'", expected)
    return _unexpected_word(tok, src, accepts, accepted, expected)


def _error(span: Span, message: str, hint: Optional[str] = None) -> Diagnostic:
    return Diagnostic("error", message, span, hint)


def _unexpected_word(tok: Token, src: _Source, accepts: set, accepted: set, expected: str) -> Diagnostic:
    """A name or fixed word where it does not belong: guess what was meant."""
    word, span = str(tok), src.of(tok)
    if tok.start_pos > 0 and src.text[tok.start_pos - 1].isdigit():
        # `q=12abc` lexes as 12 then abc; say what the user wrote.
        digits = re.search(r"[0-9]+$", src.text[:tok.start_pos]).group()
        return _error(src.span(tok.line, tok.column - len(digits), tok.end_column),
                      f"'{digits}{word}' is not a number",
                      "values are non-negative integers; separate words with spaces")
    statement = next((s for s in _KEYED if set(_keys(s)) <= accepted), None)
    followed_by_equal = src.text[tok.end_pos:].lstrip().startswith("=")
    if statement is not None and followed_by_equal:  # inside a statement, `word=...`
        own = _keys(statement)
        what = f"'{word}' is not a key of {statement}" if word in _ALL_KEYS else \
            f"unknown key '{word}' in {statement}"
        return _error(span, what, f"{_did_you_mean(word, own)}{statement} takes {_or_list(own, 'and')}")
    for noun, choices in _ENUM_GROUPS:
        if accepted and accepted <= set(choices):  # right after `pool=`, `combine`, `dtype`
            return _error(span, f"'{word}' is not a valid {noun}",
                          f"{_did_you_mean(word, choices)}{noun} is one of: {', '.join(choices)}")
    if "NAME" in accepts and word in RESERVED:
        return _error(span, f"'{word}' is a reserved word and cannot name a pattern",
                      "choose another name: the words of statements, keys and values are reserved")
    hint = _did_you_mean(word, accepted) + expected
    if word == "off":
        hint = f"only {_or_list(REMOVABLE)} can be turned off, by writing e.g. `window off`"
    if set(STATEMENTS) & accepted and not followed_by_equal and word not in RESERVED:
        # Inside `combine cmp ...` a word may continue the list or start a statement.
        noun = next((n for n, choices in _ENUM_GROUPS if set(choices) & accepted), None)
        what = f"'{word}' is neither a {noun} nor a statement" if noun else f"unknown statement '{word}'"
        return _error(span, what, hint)
    return _error(span, f"unexpected '{word}'", hint)


def _end_of_file(src: _Source, accepts: set, expected: str, opened: Optional[tuple],
                 last: Optional[Token]) -> Diagnostic:
    if last is None:
        return _error(src.span(1, 1), "no pattern in this file",
                      "a spec file holds one or more `pattern NAME { ... }` blocks")
    if "RBRACE" in accepts and opened is not None:
        return _unclosed(src, *opened, None)
    return _error(src.span(last.end_line, last.end_column), "unexpected end of file", expected)


def _unclosed(src: _Source, name: Token, brace: Token, at: Optional[Token]) -> Diagnostic:
    """A pattern's body still open at the end of the file (at the '{' that
    opened it) or at the next `pattern` (at that word: '}' belongs before it)."""
    if at is None or at.type == "$END":
        return _error(src.of(brace), f"pattern '{name}' is never closed: the file ends before its '}}'",
                      "add '}' after its last statement")
    return _error(src.of(at), f"'}}' missing before this pattern: pattern '{name}' (line {brace.line}) is never"
                              " closed", f"add '}}' after the last statement of '{name}'")


def _expected(accepts: set, accepted: set) -> str:
    """What the parser would have taken, in words, grouped by kind."""
    groups = []  # (phrase, words or None)
    if "INT" in accepts:
        groups.append(("a number", None))
    if "NAME" in accepts:
        groups.append(("a pattern name", None))
    for stmt in _KEYED:
        if set(_keys(stmt)) <= accepted:
            groups.append((f"a key of {stmt}", _keys(stmt)))
            break
    for noun, choices in _ENUM_GROUPS:
        if set(choices) & accepted:
            groups.append((f"a {noun}", [c for c in choices if c in accepted]))
    if "off" in accepted:
        groups.append(("'off'", None))
    if set(STATEMENTS) & accepted:
        groups.append(("a statement", [s for s in STATEMENTS if s in accepted]))
    for word in ("=", "{", "}", "extends", "pattern"):
        if word in accepted:
            groups.append((f"'{word}'", None))
    if "$END" in accepts:
        groups.append(("the end of the file", None))
    if not groups:
        return "nothing can follow here"
    if len(groups) == 1:
        phrase, words = groups[0]
        return f"expected {phrase}" + (f": {_or_list(words)}" if words else "")
    return "expected " + _or_list(f"{p} ({_or_list(w)})" if w else p for p, w in groups)


# ---------------------------------------------------------------------------
# Tree walk: statements -> IR nodes; then `extends`
# ---------------------------------------------------------------------------
def _is_off(value) -> bool:
    """A draft statement is either an IR node or the `off` token itself."""
    return isinstance(value, Token) and value.type == "OFF"


class _Builder:
    """Walks the parse tree once, collecting every problem.

    After syntax errors it also knows what the reader skipped (`unsure`
    statements per pattern, `lost` patterns) and reports nothing that only
    the skipping causes: a statement that is missing or lacks a key because
    its text was skipped, an `off` of a statement the parent lost, a parent
    that is unknown because its header did not parse."""

    def __init__(self, src: _Source, reader: _Reader):
        self.src = src
        self.reader = reader
        self.problems: list = []
        self.done: dict = {}     # name -> Pattern, in file order
        self.unsure: dict = {}   # name -> statements of the built pattern that may be wrong or missing
        self.broken: set = set()  # names whose block had errors
        self.headers: dict = {}  # name -> its first name token, for "first defined on line"
        self.all_names: dict = {}  # every name in the file -> its first name token
        self.here: set = set()   # unsure statements of the pattern being built

    def error(self, span: Span, message: str, hint: Optional[str] = None) -> None:
        self.problems.append(Diagnostic("error", message, span, hint))

    def sure(self, kind: str, unsure: Optional[set] = None) -> bool:
        """Whether statement `kind` is known to be as written (or absent)."""
        unsure = self.here if unsure is None else unsure
        return kind not in unsure and _ANY not in unsure

    def build(self, tree: Optional[Tree]) -> list:
        blocks = tree.children if tree is not None else []
        for block in reversed(blocks):
            self.all_names[str(block.children[0])] = block.children[0]
        for block in blocks:
            self.pattern(block)
        return list(self.done.values())

    def unsure_by_name(self) -> dict:
        return {name: frozenset(kinds) for name, kinds in self.unsure.items() if kinds}

    # ---- one `pattern NAME [extends NAME] { ... }` block ----
    def pattern(self, block: Tree) -> None:
        name_tok, parent_tok, *statements = block.children
        before = len(self.problems)
        name = str(name_tok)
        self.here = set(self.reader.unsure.get(name_tok.start_pos, ()))
        if name in self.headers:
            first = self.headers[name]
            self.error(self.src.of(name_tok), f"pattern '{name}' is defined twice",
                       f"first defined on line {first.line}; rename one of them")
        else:
            self.headers[name] = name_tok

        own: dict = {}  # statement -> (keyword token, IR node or `off` token)
        for node in statements:
            keyword = node.children[0]
            kind = str(keyword)
            if kind in own:
                self.error(self.src.of(keyword), f"{kind} is given twice in pattern '{name}'",
                           f"the first is on line {own[kind][0].line}; give each statement once")
                continue
            value = self.statement(kind, node.children)
            if value is not None:
                own[kind] = (keyword, value)

        merged = self.inherit(name, parent_tok, own)
        if merged is not None:
            written = {str(node.children[0]) for node in statements}
            dropped = self.reader.dropped.get(name_tok.start_pos, set())
            written |= dropped  # written, though cut short: not inherited
            for kind in written - set(own):  # written, unusable, and not reported: skipped text
                merged[kind] = None
            for kind in ("heads", "dims"):
                # A statement that is written but broken has its own error already.
                if merged.get(kind) is None and kind not in written and self.sure(kind):
                    self.error(self.src.of(name_tok), f"pattern '{name}' has no {kind} statement",
                               f"every pattern needs heads and dims, e.g. `{_usage(kind)}`"
                               ", or extends a pattern that has them")
        if merged is None or len(self.problems) > before:
            if name not in self.done:  # a valid first definition stays usable
                self.broken.add(name)
            return
        if name not in self.done:
            self.done[name] = Pattern(name=name, extends=str(parent_tok) if parent_tok else None,
                                      span=self.src.of(name_tok), source=self.src.filename,
                                      **{kind: merged.get(kind) for kind in STATEMENTS})
            self.unsure[name] = self.here

    def inherit(self, name: str, parent_tok: Optional[Token], own: dict) -> Optional[dict]:
        """The pattern's statements after `extends`; None when the parent is
        unusable (its own errors are reported already)."""
        if parent_tok is None:
            for kind, (keyword, value) in own.items():
                if _is_off(value):
                    self.error(self.src.of(keyword, value), f"'{kind} off' in a pattern that extends nothing",
                               f"`off` removes an inherited statement; write `pattern {name} extends PARENT`"
                               f" or drop the {kind} line")
            return {kind: (None if _is_off(value) else value) for kind, (_, value) in own.items()}
        parent = str(parent_tok)
        if parent in self.broken:
            return None
        if parent not in self.done:
            # A parent whose header did not parse is broken, not unknown.
            if parent not in {str(t) for t in self.reader.lost} and not self.reader.lost_unnamed:
                self.unknown_parent(name, parent_tok)
            return None
        inherited = {kind: getattr(self.done[parent], kind) for kind in STATEMENTS}
        merged = dict(inherited)
        # What is unsure in the parent stays unsure where the child inherits it.
        parent_unsure = self.unsure[parent]
        written = {str(keyword) for keyword, _ in own.values()}
        self.here |= {kind for kind in parent_unsure if kind not in written}
        for kind, (keyword, value) in own.items():
            if _is_off(value) and inherited[kind] is None and self.sure(kind, parent_unsure):
                present = [k for k in STATEMENTS if inherited[k] is not None]
                # (After a syntax error the parent may have no statement left.)
                has = _or_list(present, "and") if present else "no statement that parsed"
                self.error(self.src.of(keyword, value), f"'{kind} off' but '{parent}' has no {kind} to remove",
                           f"drop this line; '{parent}' has {has}")
            merged[kind] = None if _is_off(value) else value
        return merged

    def unknown_parent(self, name: str, parent_tok: Token) -> None:
        parent, known = str(parent_tok), list(self.done)
        if parent == name:
            message, hint = f"pattern '{name}' extends itself", "extend a pattern defined above it"
        elif parent in self.all_names and parent not in self.headers:
            message = f"pattern '{name}' extends '{parent}', which is defined further down"
            hint = (f"'{parent}' starts on line {self.all_names[parent].line}; move it above '{name}':"
                    " a pattern extends only patterns defined before it")
        else:
            message = f"pattern '{name}' extends unknown pattern '{parent}'"
            hint = _did_you_mean(parent, known)
            hint += f"patterns defined above: {', '.join(known)}" if known else \
                "no pattern is defined above this one"
        self.error(self.src.of(parent_tok), message, hint)

    # ---- statements ----
    def statement(self, kind: str, children: list):
        keyword, rest = children[0], children[1:]
        if len(rest) == 1 and _is_off(rest[0]):
            return rest[0]
        if kind in _LISTED:
            return self.listed(kind, keyword, rest)
        return self.keyed(kind, keyword, [arg.children for arg in rest])

    def keyed(self, kind: str, keyword: Token, args: list):
        values, spans, seen = {}, [], {}
        ok = True
        for key_tok, _equal, value_tok in args:
            key = str(key_tok)
            if key in seen:
                first = seen[key]
                self.error(self.src.of(key_tok, value_tok), f"duplicate key '{key}' in {kind}",
                           f"{key} was first given on line {first.line}, column {first.column};"
                           " give each key once")
                ok = False
                continue
            seen[key] = key_tok
            value = self.value(key, value_tok)
            if value is None:
                ok = False
                continue
            values[key] = value
            # The value's span, so a later complaint's caret sits under the number.
            spans.append((key, self.src.of(value_tok)))
        missing = [k for k in _required(kind) if k not in seen]
        if missing and not self.sure(kind):  # its other keys may be in the skipped text
            return None
        if missing:
            self.error(self.src.of(keyword), f"{kind} is missing {_or_list(missing, 'and')}",
                       f"write `{_usage(kind)}`")
            return None
        if not ok:
            return None
        if kind == "dims":
            values.setdefault("v", values["qk"])
        return _KEYED[kind](**values, span=self.src.of(keyword), key_spans=tuple(spans))

    def value(self, key: str, tok: Token):
        if key in _ENUM_KEYS:
            return _ENUM_KEYS[key](str(tok))
        digits = str(tok).lstrip("0") or "0"
        # Compare lengths first: int() of thousands of digits is slow, and past
        # 4300 digits Python refuses to convert at all.
        if len(digits) > len(str(ir.MAX_NUMBER)) or int(digits) > ir.MAX_NUMBER:
            shown = digits if len(digits) <= 24 else f"{digits[:8]}... ({len(digits)} digits)"
            self.error(self.src.of(tok), f"{key}={shown} is too large: a number in a pattern is at most"
                                         f" {ir.MAX_NUMBER}",
                       "the kernels index positions, blocks and heads with int32 (2**31 - 1 at most);"
                       f" `nsa-dsl check` then says the limit of {key} itself")
            return None
        return int(digits)

    def listed(self, kind: str, keyword: Token, names: list):
        cls, field, enum, noun = _LISTED[kind]
        seen, spans = {}, []
        for tok in names:
            word = str(tok)
            if word in seen:
                self.error(self.src.of(tok), f"{noun} '{word}' is listed twice in {kind}",
                           f"first listed at line {seen[word].line}, column {seen[word].column};"
                           " list each once")
                return None
            seen[word] = tok
            spans.append((word, self.src.of(tok)))
        return cls(**{field: tuple(enum(w) for w in seen)},
                   span=self.src.of(keyword), key_spans=tuple(spans))


# ---------------------------------------------------------------------------
# Printing back
# ---------------------------------------------------------------------------
def format_pattern(p: Pattern, parent: Optional[Pattern] = None) -> str:
    """Source text for `p`, with every key written out (defaults included).

    A pattern that extends another keeps its `extends` line only when that
    parent is given: the text then lists every statement of `p` and turns off
    the branches the parent has and `p` lacks, so it parses back to `p` after
    the parent's text. Without the parent the resolved pattern is printed
    standalone (and parses back to `p` with extends=None).
    """
    header = f"pattern {p.name}"
    lines = []
    if p.extends is not None and parent is not None:
        header += f" extends {p.extends}"
        lines += [f"    {kind} off" for kind in REMOVABLE
                  if getattr(p, kind) is None and getattr(parent, kind) is not None]
    for kind in STATEMENTS:
        node = getattr(p, kind)
        if node is None:
            continue
        if kind in _LISTED:
            words = [e.value for e in getattr(node, _LISTED[kind][1])]
        else:
            words = [f"{k}={_text(getattr(node, k))}" for k in _keys(kind)]
        lines.append(f"    {kind:<8} {' '.join(words)}".rstrip())
    return "\n".join([header + " {", *sorted(lines, key=_statement_order), "}"]) + "\n"


def _statement_order(line: str) -> int:
    return STATEMENTS.index(line.split()[0])


def _text(value) -> str:
    return value.value if isinstance(value, ir.Pool) else str(value)


def format_all(patterns: Iterable[Pattern]) -> str:
    """A whole file: every pattern, each extending its parent where it did."""
    seen: dict = {}
    blocks = []
    for p in patterns:
        blocks.append(format_pattern(p, seen.get(p.extends)))
        seen[p.name] = p
    return "\n".join(blocks)
