"""Sequence geometry: how many compressed tokens and selection blocks a
sequence of T positions has, and which compressed tokens a position sees
(shared/NSA_MATH.md). The one place these formulas are written; every
Python caller uses them (the cost model's sympy forms are checked against
them in tests/test_cost.py).

Compressed token i pools positions i*d .. i*d + l - 1 (block l, stride d);
position t sees it once its last position is <= t. Selection block j holds
positions j*l' .. (j+1)*l' - 1, the last one cut at T.
"""
from __future__ import annotations

from .ir import Pattern


def num_compressed(T: int, block: int, stride: int) -> int:
    """Tc = max(0, floor((T - l) / d) + 1): compressed tokens of a length-T
    sequence (the tokens whose every position is < T)."""
    if T < block:
        return 0
    return (T - block) // stride + 1


def num_blocks(T: int, select_block: int) -> int:
    """NB = ceil(T / l'): selection blocks of a length-T sequence."""
    return -(-T // select_block)


def compressed_end(i, block: int, stride: int):
    """The last position compressed token i pools, i*d + l - 1: position t
    sees token i iff compressed_end(i) <= t. `i` may be an int or a tensor
    of token ids (a visibility mask is compressed_end(ids) <= t)."""
    return i * stride + block - 1


def visible_compressed(t: int, block: int, stride: int) -> int:
    """Compressed tokens position t sees: those with compressed_end(i) <= t,
    i.e. num_compressed(t + 1, ...)."""
    return num_compressed(t + 1, block, stride)


def compressed_length(pattern: Pattern, T: int) -> int:
    """Tc of the pattern's compress branch at length T (0 without one)."""
    c = pattern.compress
    return 0 if c is None else num_compressed(T, c.block, c.stride)
