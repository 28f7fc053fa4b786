"""Diagnostics: one error format for every pass.

Every message a user sees about a spec names the file, line and column,
shows the offending line with a caret under the spot, and says what would be
valid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from .ir import Span


@dataclass(frozen=True)
class Diagnostic:
    severity: str  # "error" or "warning"
    message: str
    span: Optional[Span] = None
    hint: Optional[str] = None

    def render(self) -> str:
        span = self.span
        if span is None or span.line <= 0:
            where = f"{span.file}: " if span is not None else ""
            head = f"{where}{self.severity}: {self.message}"
            body = []
        else:
            head = f"{span.file}:{span.line}:{span.column}: {self.severity}: {self.message}"
            text = span.line_text.rstrip("\n")
            width = max(1, span.end_column - span.column) if span.end_column > span.column else 1
            # Tabs before the caret keep their width so the caret lines up.
            lead = "".join("\t" if ch == "\t" else " " for ch in text[: span.column - 1])
            body = [f"    {text}", f"    {lead}{'^' * width}"]
        if self.hint:
            body.append(f"  hint: {self.hint}")
        return "\n".join([head, *body])


class SpecError(ValueError):
    """Any problem with a pattern spec: syntax, structure or rules.

    `diagnostics` holds every problem found (the checker reports all at once);
    str() renders them all.
    """

    def __init__(self, diagnostics: Iterable[Diagnostic] | Diagnostic):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(d.render() for d in self.diagnostics))

    @classmethod
    def at(cls, span: Optional[Span], message: str, hint: Optional[str] = None) -> "SpecError":
        return cls(Diagnostic("error", message, span, hint))
