"""The frozen IR of an attention pattern.

A Pattern is plain data: every node is a frozen dataclass, every value a
validated int or enum that the grammar produced, and every node remembers
where in the source it came from (a Span) so that later passes (the checker,
the planner) can point at the exact spot when they complain.

Spans are excluded from equality and hashing: two patterns that mean the same
thing compare equal wherever they were written.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

# The largest number a pattern may hold, whatever the key: the kernels index
# positions, blocks and counts with int32. The parser rejects anything larger
# (so no later pass ever formats or multiplies a 4300-digit number), and the
# checker's own limits all lie at or below it.
MAX_NUMBER = 2**31 - 1


@dataclass(frozen=True)
class Span:
    """A place in a spec file: 1-based line and column, plus the line's text
    so a diagnostic can be printed without re-reading the file."""

    file: str
    line: int
    column: int
    end_column: int
    line_text: str

    @classmethod
    def unknown(cls, file: str = "<unknown>") -> "Span":
        return cls(file, 0, 0, 0, "")


def _span_field():
    return field(default=None, compare=False, hash=False, repr=False)


class Pool(str, enum.Enum):
    MEAN = "mean"
    MLP = "mlp"


class Branch(str, enum.Enum):
    CMP = "cmp"
    SLC = "slc"
    SWA = "swa"


class DType(str, enum.Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


# Order in which branches are listed everywhere (outputs, plans, reports).
BRANCH_ORDER = (Branch.CMP, Branch.SLC, Branch.SWA)
ALL_DTYPES = (DType.BF16, DType.FP16, DType.FP32)


@dataclass(frozen=True)
class Statement:
    """Base of every statement: the span of its keyword and of each key."""

    span: Optional[Span] = field(default=None, compare=False, hash=False, repr=False, kw_only=True)
    key_spans: tuple = field(default=(), compare=False, hash=False, repr=False, kw_only=True)

    def at(self, key: Optional[str] = None) -> Optional[Span]:
        """Span of `key=value` inside this statement, else of the statement."""
        for name, span in self.key_spans:
            if name == key:
                return span
        return self.span


@dataclass(frozen=True)
class Heads(Statement):
    q: int
    kv: int

    @property
    def group(self) -> int:
        """Query heads per KV head (G). Only meaningful once q % kv == 0."""
        return self.q // self.kv if self.kv else 0


@dataclass(frozen=True)
class Dims(Statement):
    qk: int
    v: int


@dataclass(frozen=True)
class Compress(Statement):
    block: int
    stride: int
    pool: Pool = Pool.MEAN


@dataclass(frozen=True)
class Select(Statement):
    block: int
    top: int
    initial: int = 1
    local: int = 2

    @property
    def forced(self) -> int:
        return self.initial + self.local

    @property
    def is_static(self) -> bool:
        """top == initial + local: the selected set is fixed, nothing is ranked."""
        return self.top == self.forced


@dataclass(frozen=True)
class Window(Statement):
    size: int


@dataclass(frozen=True)
class Combine(Statement):
    branches: tuple  # of Branch, in the order written


@dataclass(frozen=True)
class DTypes(Statement):
    dtypes: tuple  # of DType, in the order written


@dataclass(frozen=True)
class Pattern:
    name: str
    heads: Heads
    dims: Dims
    compress: Optional[Compress] = None
    select: Optional[Select] = None
    window: Optional[Window] = None
    combine: Optional[Combine] = None
    dtype: Optional[DTypes] = None
    extends: Optional[str] = field(default=None, compare=False, hash=False)
    span: Optional[Span] = _span_field()
    source: str = field(default="<string>", compare=False, hash=False)

    # ---- derived facts (pure functions of the fields above) ----
    @property
    def declared_branches(self) -> tuple:
        present = {Branch.CMP: self.compress, Branch.SLC: self.select, Branch.SWA: self.window}
        return tuple(b for b in BRANCH_ORDER if present[b] is not None)

    @property
    def combined_branches(self) -> tuple:
        """Branches whose gated outputs are summed into the result."""
        if self.combine is None:
            return self.declared_branches
        return tuple(b for b in BRANCH_ORDER if b in self.combine.branches)

    @property
    def allowed_dtypes(self) -> tuple:
        if self.dtype is None:
            return ALL_DTYPES
        return tuple(d for d in ALL_DTYPES if d in self.dtype.dtypes)

    @property
    def group(self) -> int:
        return self.heads.group

    def canonical(self) -> str:
        """A stable text form of what the pattern means (no spans, no
        formatting, `extends` already resolved, defaults made explicit).
        It is what the kernel cache hashes."""
        parts = [
            f"pattern {self.name}",
            f"heads q={self.heads.q} kv={self.heads.kv}",
            f"dims qk={self.dims.qk} v={self.dims.v}",
        ]
        if self.compress is not None:
            c = self.compress
            parts.append(f"compress block={c.block} stride={c.stride} pool={c.pool.value}")
        if self.select is not None:
            s = self.select
            parts.append(f"select block={s.block} top={s.top} initial={s.initial} local={s.local}")
        if self.window is not None:
            parts.append(f"window size={self.window.size}")
        parts.append("combine " + " ".join(b.value for b in self.combined_branches))
        parts.append("dtype " + " ".join(d.value for d in self.allowed_dtypes))
        return "\n".join(parts)
