"""The inference cache of one NSA layer: keys, values and compressed tokens
of a batch of sequences of different lengths (a serving batch), appended to
by prefill and decode (NSA_MATH.md, "Cache, prefill and decode").

    cache = compiled.new_cache(batch, max_len, device="cuda", dtype=torch.bfloat16)

Layout, preallocated (contiguous): k [B, max_len, HKV, Dqk], v [B, max_len, HKV, Dv],
k_cmp [B, max_c, HKV, Dqk], v_cmp [B, max_c, HKV, Dv] (max_c the compressed
tokens of max_len positions), lengths [B] int32 on the device. Sequence b
holds positions 0 .. lengths[b] - 1 and the compressed tokens complete by
then (token i once position i*d + l - 1 is cached).

Paged (page_size=P): the keys and values live in a pool of pages [pages,
P, HKV, D] and a block table [B, ceil(max_len / P)] int32 on the device
says which page holds each slot's positions j*P .. j*P + P - 1, so a
serving engine can own the memory (hand in its block_table, assign pages
as sequences grow, write the table in place between steps; reads and
writes go through it). P is a multiple of the selection block (a selected
block lies in one page). The contiguous layout is the case P = max_len
with slot b in page b; every read and write addresses a position through
locate(), one place for both.

The cache also keeps the lengths on the host (`host_lengths`): every append
adds a known count, so the bounds checks (a sequence past max_len) and the
planning of a call need no host synchronisation; the device copy is what a
captured CUDA graph reads and advances.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch

from . import registry
from .geometry import num_compressed
from .ir import Pattern, Pool


class NSACache:
    """Keys, values and compressed tokens of `batch` sequence slots of up to
    `max_len` positions each, for one pattern (see the module docstring).
    Made by CompiledPattern.new_cache / NSAttention.new_cache."""

    def __init__(self, pattern: Pattern, batch: int, max_len: int, *, device=None, dtype=torch.bfloat16,
                 k_swa: bool = False, pool_source: bool = False, page_size: Optional[int] = None,
                 pages: Optional[int] = None, block_table: Optional[torch.Tensor] = None):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected a positive int, got {batch!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.pattern = pattern
        self.batch, self.max_len = batch, max_len
        # resolved through an allocation: "cuda" names the current card, and the
        # tensors a call brings say which one ("cuda:0"), so compare like with like
        self.device = torch.empty(0, device=device if device is not None else "cpu").device
        self.dtype = dtype
        self.paged = page_size is not None
        if not self.paged and (pages is not None or block_table is not None):
            raise ValueError("pages, block_table: only for a paged cache (page_size=...)")
        self.page_size, self.pages, self.block_table = self._layout(page_size, pages, block_table)
        self._own_table = block_table is None
        hkv, dqk, dv = pattern.heads.kv, pattern.dims.qk, pattern.dims.v

        def pool(d: int, wanted: bool = True) -> Optional[torch.Tensor]:
            return torch.zeros(self.pages, self.page_size, hkv, d, device=self.device, dtype=dtype) if wanted else None

        self.k, self.v = pool(dqk), pool(dv)
        # the window branch's own keys and values (the paper's separate K/V per branch)
        self.k_swa, self.v_swa = pool(dqk, k_swa), pool(dv, k_swa)
        # the keys and values a learned phi pools (pool=mlp), where they are
        # not k and v (NSAttention's own compression projection): a block a
        # step completes may start in an earlier step's positions
        self.k_src, self.v_src = pool(dqk, pool_source), pool(dv, pool_source)
        kw = {"device": self.device, "dtype": dtype}
        c = pattern.compress
        self.max_compressed = 0 if c is None else num_compressed(max_len, c.block, c.stride)
        # one spare row past max_c: where a position that completes no
        # compressed token writes (_pool_completed); never read
        self.k_cmp = torch.zeros(batch, self.max_compressed + 1, hkv, dqk, **kw) if c is not None else None
        self.v_cmp = torch.zeros(batch, self.max_compressed + 1, hkv, dv, **kw) if c is not None else None
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self._all_rows = torch.arange(batch, device=self.device)
        self.host_lengths: List[int] = [0] * batch
        # buffers a decode step reuses, by step shape and decode plan (launch_decode._scratch)
        self.scratch: dict = {}
        self.op_key = registry.register(self, "cache")  # what nsa_dsl::cache_step finds it by

    def _layout(self, page_size, pages, block_table) -> tuple:
        """(page size, pages in the pool, block table [batch, pages per
        slot] int32 on the device), checked."""
        if not self.paged:  # slot b is page b, of max_len positions
            return self.max_len, self.batch, torch.arange(self.batch, device=self.device, dtype=torch.int32)[:, None]
        sel = self.pattern.select
        unit = sel.block if sel is not None else 1
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1 or page_size % unit:
            raise ValueError(f"page_size: expected a positive multiple of the selection block ({unit}), got"
                             f" {page_size!r} (a selected block must lie in one page)")
        per_slot = -(-self.max_len // page_size)
        if block_table is None:
            if pages is not None and pages != self.batch * per_slot:
                raise ValueError(f"pages: {pages} pages in the pool need a block_table saying which slot holds"
                                 f" which (without one each slot gets its own {per_slot})")
            table = torch.arange(self.batch * per_slot, device=self.device, dtype=torch.int32)
            return page_size, self.batch * per_slot, table.view(self.batch, per_slot)
        if isinstance(pages, bool) or not isinstance(pages, int) or pages < 1:
            raise ValueError(f"pages: with a block_table, expected the pool's page count (a positive int), got"
                             f" {pages!r}")
        if (not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32
                or tuple(block_table.shape) != (self.batch, per_slot)):
            got = (f"{block_table.dtype} {list(block_table.shape)}" if isinstance(block_table, torch.Tensor)
                   else type(block_table).__name__)
            raise ValueError(f"block_table: expected int32 [batch={self.batch}, ceil(max_len / page_size)="
                             f"{per_slot}], got {got}")
        if block_table.device != self.device:
            raise ValueError(f"block_table: on {block_table.device}, the cache on {self.device}")
        low, high = int(block_table.min()), int(block_table.max())
        if low < 0 or high >= pages:
            raise ValueError(f"block_table: page numbers must lie in [0, pages={pages}), got values in"
                             f" [{low}, {high}]")
        return page_size, pages, block_table

    def locate(self, rows: torch.Tensor, pos: torch.Tensor) -> tuple:
        """(page, offset) int64 of positions pos of slots rows (broadcast
        together), the index of a cache tensor's row: tensor[page, offset].
        Positions must lie in [0, max_len)."""
        page = self.block_table[rows, pos // self.page_size].to(torch.int64)
        return page, pos % self.page_size

    def read(self, tensor: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tensor's rows at positions pos of slots rows: [*pos.shape, HKV, D]."""
        return tensor[self.locate(rows, pos)]

    def positions(self, name: str, slot: int, length: Optional[int] = None) -> torch.Tensor:
        """Slot's first `length` positions (all its cached ones by default)
        of the cache tensor `name` ("k", "v", ...) as one tensor [length,
        HKV, D], whatever the layout."""
        n = self.host_lengths[slot] if length is None else length
        pos = torch.arange(n, device=self.device)
        return self.read(getattr(self, name), torch.full_like(pos, slot), pos)

    # ------------------------------------------------------------ geometry
    def compressed_count(self, length: int) -> int:
        c = self.pattern.compress
        return 0 if c is None else num_compressed(length, c.block, c.stride)

    def grow(self, max_len: int) -> None:
        """Make room for up to max_len positions per slot (at least the
        current max_len): every buffer reallocated and its contents copied,
        so the sequences go on where they were. Tensors taken from the cache
        before (e.g. by a captured CUDA graph) no longer belong to it."""
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < self.max_len:
            raise ValueError(f"max_len: expected an int >= the current max_len {self.max_len}, got {max_len!r}")
        if max_len == self.max_len:
            return
        if self.paged and not self._own_table:
            raise ValueError("grow: this paged cache's pages are the block_table's owner's to assign; make a"
                             " cache of a larger max_len with a larger block_table")
        old_len, old_c = self.max_len, self.max_compressed

        def regrown(t: Optional[torch.Tensor], rows: int, keep: int) -> Optional[torch.Tensor]:
            if t is None:
                return None
            new = torch.zeros(t.shape[0], rows, *t.shape[2:], device=t.device, dtype=t.dtype)
            new[:, :keep] = t[:, :keep]
            return new

        self.max_len = max_len
        if self.paged:  # each slot's pages renumbered into a larger pool, in its table's order
            old_table = self.block_table
            per_slot = old_table.shape[1]
            self.page_size, self.pages, self.block_table = self._layout(self.page_size, None, None)
            # the new table numbers slot b's pages b * new_per_slot + j: move page old[b, j] there
            to = self.block_table[:, :per_slot].flatten().to(torch.int64)
            for name in ("k", "v", "k_swa", "v_swa", "k_src", "v_src"):
                t = getattr(self, name)
                if t is not None:
                    new = t.new_zeros(self.pages, *t.shape[1:])
                    new[to] = t[old_table.flatten().to(torch.int64)]
                    setattr(self, name, new)
        else:
            self.page_size = max_len
            for name in ("k", "v", "k_swa", "v_swa", "k_src", "v_src"):
                setattr(self, name, regrown(getattr(self, name), max_len, old_len))
        c = self.pattern.compress
        self.max_compressed = 0 if c is None else num_compressed(max_len, c.block, c.stride)
        # the spare row moves to the new end; the old one held nothing to keep
        self.k_cmp = regrown(self.k_cmp, self.max_compressed + 1, old_c)
        self.v_cmp = regrown(self.v_cmp, self.max_compressed + 1, old_c)
        self.scratch = {}

    @contextlib.contextmanager
    def holding(self, tensors: dict):
        """The cache's tensors (by attribute name) replaced by `tensors` for
        the body, then put back: the nsa_dsl::cache_step op writes the
        tensors it is handed, which torch.compile's functionalization may
        make copies of (and writes back after). The host lengths and the
        decode scratch stay the cache's own."""
        own = {name: getattr(self, name) for name in tensors}
        for name, t in tensors.items():
            setattr(self, name, t)
        try:
            yield
        finally:
            for name, t in own.items():
                setattr(self, name, t)

    def reset(self, slot: int) -> None:
        """Free slot `slot` for a new sequence (its length back to 0; the old
        contents are never read again: every read is bounded by the length)."""
        self._check_slot(slot)
        self.lengths[slot] = 0
        self.host_lengths[slot] = 0

    def _check_slot(self, slot) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.batch:
            raise ValueError(f"slot: expected an int in [0, {self.batch}), got {slot!r}")

    # -------------------------------------------------------------- checks
    def check_compatible(self, pattern: Pattern, like: torch.Tensor, name: str = "q") -> None:
        """ValueError unless this cache was made for `pattern` and holds
        `like`'s dtype on `like`'s device."""
        if pattern is not self.pattern and pattern.canonical() != self.pattern.canonical():
            raise ValueError(f"cache: made for pattern {self.pattern.name!r}, this call's pattern is {pattern.name!r}"
                             " (a cache holds one pattern's heads, dims and compressed tokens)")
        if like.dtype != self.dtype:
            raise ValueError(f"cache: holds {self.dtype}, {name} is {like.dtype}")
        if like.device != self.device:
            raise ValueError(f"cache: on {self.device}, {name} is on {like.device}")

    def check_slots(self, slots: Optional[Sequence[int]], batch: int) -> List[int]:
        """The slots a call of `batch` sequences appends to: all of them in
        order where slots is None (batch must then be the cache's)."""
        if slots is None:
            if batch != self.batch:
                raise ValueError(f"q: batch {batch}, the cache holds {self.batch} sequences"
                                 " (pass slots=[...] to append to some of them)")
            return list(range(self.batch))
        slots = list(slots)
        for s in slots:
            self._check_slot(s)
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots: {slots} names a slot twice")
        if len(slots) != batch:
            raise ValueError(f"slots: {len(slots)} slots for a batch of {batch}")
        return slots

    def check_room(self, slots: Sequence[int], count: int) -> None:
        for s in slots:
            if self.host_lengths[s] + count > self.max_len:
                raise ValueError(f"cache: slot {s} holds {self.host_lengths[s]} positions; {count} more pass"
                                 f" max_len={self.max_len}")

    # ------------------------------------------------------------- writing
    def rows(self, slots: Sequence[int]) -> torch.Tensor:
        """The slots as an int64 index on the cache's device (all of them: a
        tensor made once, so a step over every slot copies nothing from the
        host and can be captured in a CUDA graph)."""
        if list(slots) == list(range(self.batch)):
            return self._all_rows
        return torch.tensor(list(slots), device=self.device, dtype=torch.int64)

    def append(self, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor, k_swa=None, v_swa=None) -> None:
        """Write k, v ([len(slots), m, HKV, D]) after each slot's sequence
        (its length read on the device) and advance its length by m
        (checked before: check_room). With pool=mean the compressed tokens
        the new positions complete are pooled and stored here, on the
        device too; pool=mlp's come from the caller (write_compressed)."""
        m = k.shape[1]
        rows = self.rows(slots)
        pos = self.lengths[rows].to(torch.int64)[:, None] + torch.arange(m, device=self.device)
        r = rows[:, None].expand(-1, m)
        at = self.locate(r, pos)
        self.k[at] = k
        self.v[at] = v
        if self.k_swa is not None:
            self.k_swa[at] = k_swa
            self.v_swa[at] = v_swa
        if self.pools_itself:
            self._pool_completed(r, pos)
        self.lengths.index_add_(0, rows, torch.full_like(rows, m, dtype=torch.int32))
        for s in slots:
            self.host_lengths[s] += m

    def _pool_completed(self, r: torch.Tensor, pos: torch.Tensor) -> None:
        """pool=mean: the compressed token that each new position completes
        (the one whose block ends there, if any) is the mean of its block's
        cached keys and values, written to its row; a position that
        completes none writes to the spare row past max_c (no branch on the
        host)."""
        c = self.pattern.compress
        start = pos - (c.block - 1)  # first position of the block that would end at pos
        window = start.clamp(min=0)[:, :, None] + torch.arange(c.block, device=self.device)  # [b, m, block]
        window = window.clamp(max=self.max_len - 1)  # (only a position completing nothing reaches past)
        at = self.locate(r[:, :, None], window)
        self._write_completed(r, pos, self.k[at].float().mean(2), self.v[at].float().mean(2))

    def write_candidates(self, slots: Sequence[int], k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> None:
        """pool=mlp given per new position ([len(slots), m, HKV, D]: the
        token whose block ends at that position, if one does): written to
        that token's row where the position completes one, to the spare row
        otherwise; positions from the device lengths (append advanced them
        already), so a step over every slot can be captured."""
        m = k_cmp.shape[1]
        rows = self.rows(slots)
        pos = self.lengths[rows].to(torch.int64)[:, None] - m + torch.arange(m, device=self.device)
        self._write_completed(rows[:, None].expand(-1, m), pos, k_cmp, v_cmp)

    def _write_completed(self, r: torch.Tensor, pos: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> None:
        c = self.pattern.compress
        start = pos - (c.block - 1)  # first position of the block that would end at pos
        done = (start >= 0) & (start % c.stride == 0)
        token = torch.where(done, start.div(c.stride, rounding_mode="floor"), self.max_compressed)
        self.k_cmp[r, token] = k_cmp.to(self.dtype)
        self.v_cmp[r, token] = v_cmp.to(self.dtype)

    def append_source(self, slots: Sequence[int], k_src: torch.Tensor, v_src: torch.Tensor) -> None:
        """Write phi's source keys and values ([len(slots), m, HKV, D]) at
        the m positions the step just appended (append advanced the
        lengths already)."""
        m = k_src.shape[1]
        rows = self.rows(slots)
        pos = self.lengths[rows].to(torch.int64)[:, None] - m + torch.arange(m, device=self.device)
        at = self.locate(rows[:, None], pos)
        self.k_src[at] = k_src
        self.v_src[at] = v_src

    def sync_host_lengths(self) -> None:
        """Read the lengths back from the device (one host sync): after
        replays of a captured step, which advance only the device's."""
        self.host_lengths = [int(n) for n in self.lengths.tolist()]

    def completed_tokens(self, slot: int, before: int, after: int) -> range:
        """The compressed tokens that become complete when slot's sequence
        grows from `before` to `after` positions."""
        return range(self.compressed_count(before), self.compressed_count(after))

    def write_compressed(self, slot: int, first: int, k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> None:
        """Store compressed tokens first .. first + n - 1 of slot ([n, HKV, D])."""
        n = k_cmp.shape[0]
        self.k_cmp[slot, first:first + n] = k_cmp
        self.v_cmp[slot, first:first + n] = v_cmp

    @property
    def pools_itself(self) -> bool:
        """Whether the call pools the compressed tokens (mean) or the caller
        passes them (mlp)."""
        c = self.pattern.compress
        return c is not None and c.pool == Pool.MEAN

    def __repr__(self) -> str:
        return (f"NSACache({self.pattern.name!r}, batch={self.batch}, max_len={self.max_len}, dtype={self.dtype},"
                f" device={self.device}, lengths={self.host_lengths})")
