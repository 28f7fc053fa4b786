"""Packed variable-length sequences (flash-attn's cu_seqlens convention).

Documents packed into one row: `cu_seqlens` int32 [N+1] holds each
sequence's first position, starting at 0 and ending at `total`; sequence s
is positions cu_seqlens[s] .. cu_seqlens[s+1] - 1 and is its own causal
attention from its own position 0 (shared/NSA_MATH.md, applied per
sequence). Tensors come as [total, H, D] (flash-attn) or [1, total, H, D]
(fla); results keep the layout they came in.

This module owns the packed geometry (the compressed tokens' cu_seqlens)
and the checks of cu_seqlens itself. The checks that read its values
(starts at 0, non-decreasing, ends at total) need the values on the host:
they run where the values already are there (a CPU tensor) or under
NSA_DSL_DEBUG=1; a CUDA tensor is otherwise trusted, so a training step
stays free of host synchronisation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .inverted_index import packed_blocks
from .ir import Pattern


@dataclass(frozen=True, eq=False)
class Packing:
    """A packed call's sequences, as the launchers need them: the kernels'
    grids run over (positions of the longest sequence, sequences x heads),
    each program finds its sequence's start and length in cu_seqlens (and
    cu_compressed for the compressed tokens) on the device, and a program
    past its sequence's end returns at once. No field needs a host sync
    when max_seqlen is given."""
    cu_seqlens: torch.Tensor  # int32 [N+1]
    cu_compressed: Optional[torch.Tensor]  # int32 [N+1] (compressed_seqlens), None without compression
    sequences: int  # N
    max_length: int  # max_seqlen
    max_compressed: int  # compressed tokens of the longest sequence
    # Queries of only each sequence's last positions (cu_seqlens_q: a
    # prefill piece after cached ones, a context-parallel shard): int32
    # [N+1] offsets of the query rows; sequence s's queries sit at its last
    # cu_queries[s+1] - cu_queries[s] positions. None: a query per position.
    cu_queries: Optional[torch.Tensor] = None
    max_queries: int = -1  # the most queries of one sequence (max_length unless cu_queries)
    _blocks: dict = field(default_factory=dict, repr=False)  # selection_blocks, by (block, total)

    @property
    def shifted(self) -> bool:
        """Whether some sequence's queries start after its first position."""
        return self.cu_queries is not None

    def query_tiles(self, tile: int) -> int:
        """Programs along the positions of a grid over query tiles of `tile`
        positions: a shifted sequence's tiles start at the one holding its
        first query (_packed_rows), so one more tile than its queries
        fill when they start inside a tile; never more than its positions."""
        if not self.shifted:
            return -(-self.max_length // tile)
        return min(-(-self.max_queries // tile) + 1, -(-self.max_length // tile))

    def selection_blocks(self, block: int, total: int, keys: Optional[int] = None) -> dict:
        """inverted_index.packed_blocks of these sequences (`total` query
        rows, `keys` key rows where they differ), computed once a call: the
        block-centric forward's index and the backward's share it (the
        call's Packing reaches the backward with its shapes)."""
        if (block, total) not in self._blocks:
            self._blocks[(block, total)] = packed_blocks(self.cu_seqlens, block, total, self.cu_queries, keys)
        return self._blocks[(block, total)]


# The plan's kernels that run packed sequences (VARLEN=True: each program
# finds its sequence in cu_seqlens). A packed call that would launch any
# other kernel is refused (NotImplementedError naming it: launch.
# packed_operands) rather than computed across the documents' boundaries.
# combine and bwd_prep work per position: the packed row is one batch to
# them.
# slc_topk names both scoring kernels (slc_topk, slc_topk_static).
PACKED_KERNELS = frozenset({"combine", "bwd_prep", "cmp_pool", "cmp_fwd", "swa_fwd", "cmp_bwd", "swa_bwd",
                            "cmp_pool_bwd", "slc_topk", "slc_fwd", "slc_fwd_bc", "slc_bwd"})


# The packed kernels that take cu_queries (shifted packings: queries of
# each sequence's last positions only); a shifted call that would launch
# another kernel that reads queries is refused (launch.packed_operands).
# cmp_pool and cmp_pool_bwd read and write keys only.
SHIFTED_KERNELS = frozenset({"cmp_fwd", "swa_fwd", "slc_topk", "slc_fwd", "slc_fwd_bc", "cmp_bwd", "swa_bwd",
                             "slc_bwd"})
KEY_ONLY_KERNELS = frozenset({"cmp_pool", "cmp_pool_bwd"})


def debug_checks() -> bool:
    """NSA_DSL_DEBUG=1: also check values that live on the GPU (a host sync)."""
    return os.environ.get("NSA_DSL_DEBUG", "") not in ("", "0")


def values_readable(t: torch.Tensor) -> bool:
    """Whether t's values may be read for a check: on the host (or under
    NSA_DSL_DEBUG=1), and not while torch.compile traces (a traced tensor
    has no values; the nsa_dsl ops check them again when they run)."""
    if torch.compiler.is_compiling() or isinstance(t, torch._subclasses.FakeTensor):
        return False
    return t.device.type == "cpu" or debug_checks()


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device, name: str = "cu_seqlens") -> None:
    """ValueError naming `name` unless it is an int32 [N+1] tensor on
    `device` that starts at 0, never decreases and ends at `total` (the
    value checks: see the module docstring)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{name}: expected an int32 tensor [N+1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D tensor [N+1] with N >= 0 sequences, got shape"
                         f" {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name}: on {cu_seqlens.device}, the tensors are on {device}")
    if not values_readable(cu_seqlens):
        return
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}: must start at 0, starts at {values[0]}")
    for s, (a, b) in enumerate(zip(values, values[1:])):
        if b < a:
            raise ValueError(f"{name}: decreases at entry {s + 1} ({a} -> {b}); lengths cannot be negative")
    if values[-1] != total:
        raise ValueError(f"{name}: ends at {values[-1]}, but the packed tensors hold {total} positions")


def compressed_seqlens(pattern: Pattern, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The cu_seqlens of the compressed tokens (k_cmp, v_cmp packed in
    sequence order): sequence s has Tc_s = max(0, (T_s - l) // d + 1)
    (geometry.num_compressed, per sequence). int32 on cu_seqlens' device,
    computed there (no host sync)."""
    c = pattern.compress
    if c is None:
        raise ValueError(f"pattern {pattern.name!r} has no compress branch: no compressed tokens")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = torch.where(lengths >= c.block, (lengths - c.block) // c.stride + 1, torch.zeros_like(lengths))
    out = torch.zeros(cu_seqlens.numel(), dtype=torch.int32, device=cu_seqlens.device)
    out[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return out


def unpack_layout(name: str, x, rank: int) -> tuple:
    """(x as [total, ...] of `rank` dims, had_leading_one) for a packed
    tensor given as [total, ...] or [1, total, ...]."""
    if x is None:
        return None, False
    if x.dim() == rank + 1 and x.shape[0] == 1:
        return x[0], True
    if x.dim() == rank:
        return x, False
    raise ValueError(f"{name}: with cu_seqlens expected [total, ...] ({rank} dims) or [1, total, ...]"
                     f" ({rank + 1} dims), got shape {tuple(x.shape)}")


def sequence_bounds(cu_seqlens: torch.Tensor) -> list:
    """[(start, end)] of every sequence, on the host (one sync for a GPU tensor)."""
    values = cu_seqlens.tolist()
    return list(zip(values, values[1:]))


def max_length(cu_seqlens: torch.Tensor, max_seqlen: Optional[int]) -> int:
    """max_seqlen when given (no sync; checked against the sequences where
    their values are on the host or under NSA_DSL_DEBUG=1), else the
    longest sequence (one .item())."""
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen: expected a non-negative int, got {max_seqlen!r}")
        if cu_seqlens.numel() >= 2 and values_readable(cu_seqlens):
            # a grid sized by a too-small max_seqlen would leave positions unwritten
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            if max_seqlen < longest:
                raise ValueError(f"max_seqlen: {max_seqlen}, but cu_seqlens holds a sequence of {longest}")
        return max_seqlen
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def packing(pattern: Pattern, cu_seqlens: torch.Tensor, max_seqlen: Optional[int],
            cu_seqlens_q: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None) -> Packing:
    """The Packing of a checked cu_seqlens (one .item() without max_seqlen),
    with a checked cu_seqlens_q (check_queries) where only each sequence's
    last positions have queries (one more .item() without max_seqlen_q)."""
    longest = max_length(cu_seqlens, max_seqlen)
    c = pattern.compress
    cu_c = compressed_seqlens(pattern, cu_seqlens) if c is not None else None
    max_c = 0 if c is None or longest < c.block else (longest - c.block) // c.stride + 1
    if cu_seqlens_q is None:
        return Packing(cu_seqlens, cu_c, cu_seqlens.numel() - 1, longest, max_c, max_queries=longest)
    most = max_length(cu_seqlens_q, max_seqlen_q)
    return Packing(cu_seqlens, cu_c, cu_seqlens.numel() - 1, longest, max_c, cu_queries=cu_seqlens_q,
                   max_queries=min(most, longest))


def check_queries(cu_seqlens_q, cu_seqlens: torch.Tensor, total_q: int) -> None:
    """ValueError unless cu_seqlens_q is a valid cu_seqlens of the `total_q`
    query rows (check_cu_seqlens) with as many sequences as cu_seqlens and
    no sequence with more queries than positions (the value checks where
    values_readable allows, as for cu_seqlens)."""
    check_cu_seqlens(cu_seqlens_q, total_q, cu_seqlens.device, "cu_seqlens_q")
    if cu_seqlens_q.numel() != cu_seqlens.numel():
        raise ValueError(f"cu_seqlens_q: {cu_seqlens_q.numel() - 1} sequences, cu_seqlens has"
                         f" {cu_seqlens.numel() - 1}")
    if not (values_readable(cu_seqlens_q) and values_readable(cu_seqlens)):
        return
    queries = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    positions = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    for s, (n_q, n) in enumerate(zip(queries, positions)):
        if n_q > n:
            raise ValueError(f"cu_seqlens_q: sequence {s} has {n_q} queries but {n} positions (cu_seqlens);"
                             " its queries are its last positions, so at most as many")


def compressed_bound(pattern: Pattern, total: int) -> int:
    """At least the compressed tokens of any packing of `total` positions
    (each sequence's (T_s - l) // d + 1 <= T_s // d, as l >= d): the
    length of the k_cmp, v_cmp the call pools itself, known without
    reading cu_seqlens."""
    c = pattern.compress
    return 0 if c is None else total // c.stride
