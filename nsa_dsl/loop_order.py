"""The selection forward's loop order: predicted bytes moved per (position,
KV head) by the group-centric and the block-centric order, by length.

Plain floats at a given T, not sympy: the group-centric order's traffic
averages a union of blocks over the positions of a program, which has no
closed form worth carrying. The plan evaluates it at LOOP_ORDER_LENGTHS and
takes block-centric from the shortest length where it wins at every longer
one (block_centric_from).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .geometry import num_blocks
from .ir import Pattern


class LoopOrderBytes(NamedTuple):
    group_centric: float
    block_centric: float
    choice: str  # "group-centric" or "block-centric"
    why: str


# A block-centric byte counts this many group-centric ones: its partials and
# gathered queries stream through HBM, while the group-centric order's
# repeated block loads mostly hit L2 (a KV head's keys and values, 32 MB at
# 64k for d=128, fit in the H200's 50 MB L2). Fitted to the forward times of
# both orders (NOTES v11, v17): block-centric from 8k for small groups, from
# 32k for the G=16 patterns (as paper128's records take it).
BLOCK_CENTRIC_BYTE_WEIGHT = 1.5
# Block-centric must be predicted this much cheaper before the plan takes it:
# building its index (a sort of every selected entry) and the launches are
# not in the byte count.
BLOCK_CENTRIC_MARGIN = 1.25
# The lengths at which the plan compares the two orders (and picks the first
# from which block-centric wins at every longer one).
LOOP_ORDER_LENGTHS = tuple(2 ** e for e in range(10, 21))


def _blocks_seen(select, T: int) -> tuple:
    """Per selection block j of a length-T sequence (float64 tensors): the
    blocks its positions see (j + 1) and how many positions it has (the
    last block may be partial). Tensors, not a Python loop: the plan
    evaluates the loop-order model at lengths up to 2^20 on every
    compile, where a loop over their blocks was most of a warm start's CPU
    side (NOTES v12)."""
    j = torch.arange(num_blocks(T, select.block), dtype=torch.float64)
    return j + 1, torch.clamp(T - j * select.block, max=select.block)


def _group_centric_blocks_per_position(select, tokens_per_program: int, T: int) -> float:
    """Blocks a group-centric program loads per position, averaged over the
    positions of a length-T sequence: a program of S neighbouring positions
    walks the union of their choices. Each chooses the forced blocks and
    `free` more among the C other visible ones, uncorrelated between
    positions (random inputs; trained models share more, which only helps
    this order): expected union forced + C * (1 - (1 - free/C)^S). The union
    is capped by the visible blocks, which is why short sequences favour
    this order."""
    S = tokens_per_program
    forced = select.initial + select.local
    visible, positions = _blocks_seen(select, T)
    other = torch.clamp(visible - forced, min=1)  # only read where visible > top > forced
    union = torch.where(visible <= select.top, visible,
                        forced + other * (1 - (1 - (select.top - forced) / other) ** S))
    return float((positions * union).sum()) / S / T


def _selected_blocks_per_position(select, T: int) -> float:
    """Average number of selected blocks per position (min(top, visible))."""
    visible, positions = _blocks_seen(select, T)
    return float((positions * torch.clamp(visible, max=select.top)).sum()) / T


def selection_loop_bytes(pattern: Pattern, group_rows: int, tokens_per_program: int, chunk: int, T: int,
                         element_bytes: int = 2) -> LoopOrderBytes:
    """Predicted memory traffic of the two selection forward loop orders per
    (position, KV head), averaged over a causal sequence of length T.

    group-centric: the union of a program's S positions' blocks (see
      _group_centric_blocks_per_position), keys and values loaded once
      each; plus q and o.
    block-centric: per selected block, the G query rows read once, the
      per-slot partial output (element_bytes) and log-sum-exp (float32)
      written by slc_fwd_bc and read by the reduction, the index entry
      (position and slot, int32 each); block loads shared by the `chunk`
      positions of a program; per position, the partial statistics' -inf
      fill and the final output and lse."""
    s = pattern.select
    g, dqk, dv = pattern.group, pattern.dims.qk, pattern.dims.v
    eb = element_bytes
    block_bytes = s.block * (dqk + dv) * eb
    group = _group_centric_blocks_per_position(s, tokens_per_program, T) * block_bytes + g * (dqk + dv) * eb
    per_block = g * dqk * eb + 2 * g * dv * eb + 2 * g * 4 + 2 * 4 + block_bytes / chunk
    block = BLOCK_CENTRIC_BYTE_WEIGHT * (_selected_blocks_per_position(s, T) * per_block + s.top * g * 4
                                         + g * (dv * eb + 4))
    ratio = group / block
    if ratio >= BLOCK_CENTRIC_MARGIN:
        choice = "block-centric"
        why = f"at T={T} predicted {ratio:.2f}x fewer weighted bytes than group-centric"
    else:
        choice = "group-centric"
        why = (f"at T={T} block-centric predicted {ratio:.2f}x fewer weighted bytes"
               f" (< the {BLOCK_CENTRIC_MARGIN}x margin)")
        if ratio < 1:  # reads as "2.67x more", not "0.37x fewer"
            why = f"at T={T} block-centric predicted {1 / ratio:.2f}x more weighted bytes than group-centric"
    return LoopOrderBytes(group, block, choice, why)


def block_centric_from(orders: dict) -> Optional[int]:
    """orders: {T: LoopOrderBytes} (selection_loop_bytes at each length).
    The shortest T from which the model picks block-centric at that and
    every longer length; None when it never does."""
    start = None
    for T in sorted(orders):
        if orders[T].choice == "block-centric":
            start = T if start is None else start
        else:
            start = None
    return start
