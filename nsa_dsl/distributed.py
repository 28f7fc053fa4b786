"""Context parallelism: one long sequence split across the ranks of a
torch.distributed group, each rank computing the attention of its own
positions (NCCL on GPUs, gloo on CPUs; no communication layer of our own).

    cp = nsa_dsl.distributed.context_parallel(compiled, group)   # layout="zigzag"
    q_r, k_r, v_r = (cp.shard(t) for t in (q, k, v))             # this rank's positions
    o_r = cp(q_r, k_r, v_r, g_cmp_r, g_slc_r, g_swa_r)            # this rank's output
    o_r.backward(do_r)                                            # dq_r, dk_r, dv_r, ...

A rank holds q, k, v (and the gates, k_swa, v_swa) at its positions only.
NSA's selection reads any block of the past, which a ring of key tiles
does not give, so the forward all-gathers k and v (flash_nsa's scheme) and
each rank attends its queries against the gathered prefix that ends at
its last position: a call with the queries at the last positions (q
shorter than k), so no query sees a key past its own. The backward's
gradients of the gathered keys and values are summed over the ranks and
scattered back to their owners (reduce-scatter on NCCL; gloo has none:
all-reduce, then the rank's part).

The compressed tokens (pool=mean) are pooled on each rank from the
gathered keys: gathering them instead would move Tc = T/stride more rows
per head and still need k and v gathered for the selection and the
window, so recomputing moves no byte more. pool=mlp's tokens come from the
caller whole (each rank computes phi over the gathered keys itself, or
broadcasts it): every rank passes the same [B, Tc] k_cmp, v_cmp, and their
gradients are summed over the ranks.

Layouts of the T positions over W ranks:
- "contiguous": rank r holds positions r*T/W .. (r+1)*T/W - 1. With a causal
  mask the last rank does W times the work of the first.
- "zigzag" (default): T in 2W chunks, rank r holds chunks r and 2W-1-r
  (one early, one late), so every rank's queries see about as many keys.
  Each chunk is its own call (its own end position).

Overlap (zigzag): the ranks' early chunks make the first half of the
sequence, their late chunks the second, and a rank's early chunk sees
keys of the first half only. So the forward starts both halves'
all-gathers at once (asynchronous collectives), computes the early chunk
as soon as the first half has arrived, and waits for the second half only
before the late chunk: the second half's transfer runs behind the early
chunk's kernels (on NCCL, waiting only orders the compute stream after
the collective; gloo runs it on its own thread). The backward mirrors it:
the second half's keys are read by the late chunk only, so their gradient
is complete once autograd has run the late chunk's backward (which it
does first: it was recorded last); its sum over the ranks starts then and
is waited for only after the early chunk's backward (_AwaitGradient, made
before any chunk's call so that autograd reaches it after them). The first
half's sum has nothing left to hide behind.

Packed sequences: cu_seqlens of the whole packed row (global, every rank
the same, on the host or readable there): each rank's queries in a
document are that document's last positions up to the end of the rank's
chunk, so a chunk is one packed call with cu_seqlens_q.

Checks before any kernel: every rank's shard lengths, pattern and layout
are compared through one small all-gather; a mismatch is a ValueError on
every rank (none waits for the others). Every collective waits at most
`timeout`: a rank that never calls makes the others raise TimeoutError
instead of hanging. A group of one rank is the plain call.
"""
from __future__ import annotations

import datetime
import hashlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .geometry import num_compressed

LAYOUTS = ("zigzag", "contiguous")


def context_parallel(compiled, group=None, *, layout: str = "zigzag",
                     timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> "ContextParallel":
    """A callable like `compiled` taking this rank's shard of one long
    sequence (module docstring). group: a torch.distributed process group
    (None: the default group, which must be initialised)."""
    return ContextParallel(compiled, group, layout=layout, timeout=timeout)


class ContextParallel:
    """compiled over the ranks of `group` (context_parallel)."""

    def __init__(self, compiled, group=None, *, layout: str = "zigzag",
                 timeout: datetime.timedelta = datetime.timedelta(minutes=10)):
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised (dist.init_process_group first)")
        if not isinstance(timeout, datetime.timedelta) or timeout.total_seconds() <= 0:
            raise ValueError(f"timeout: expected a positive datetime.timedelta, got {timeout!r}")
        self.compiled, self.group, self.layout, self.timeout = compiled, group, layout, timeout
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.nccl = dist.get_backend(group) == "nccl"

    # ----------------------------------------------------------- geometry
    @property
    def pieces(self) -> int:
        """How many equal pieces the positions are cut into."""
        return 2 * self.world if self.layout == "zigzag" else self.world

    def owned_pieces(self, rank: Optional[int] = None) -> Tuple[int, ...]:
        """The pieces rank `rank` (this one by default) holds, in its order."""
        r = self.rank if rank is None else rank
        return (r, self.pieces - 1 - r) if self.layout == "zigzag" else (r,)

    def piece_length(self, T: int) -> int:
        if T % self.pieces:
            raise ValueError(f"T={T} positions do not split into {self.pieces} equal pieces ({self.layout} layout"
                             f" over {self.world} ranks): pad the sequence to a multiple of {self.pieces}")
        return T // self.pieces

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's positions of a whole-sequence tensor (positions on
        dimension `dim`: 1 for [B, T, ...], 0 for packed [T, ...])."""
        C = self.piece_length(x.shape[dim])
        return torch.cat([x.narrow(dim, p * C, C) for p in self.owned_pieces()], dim)

    def _in_position_order(self, parts: List[torch.Tensor], C: int) -> torch.Tensor:
        """The ranks' shards (in rank order, positions on dimension 1) as
        the whole sequence."""
        by_piece = {}
        for r, part in enumerate(parts):
            for i, p in enumerate(self.owned_pieces(r)):
                by_piece[p] = part[:, i * C:(i + 1) * C]
        return torch.cat([by_piece[p] for p in range(self.pieces)], 1)

    # -------------------------------------------------------- collectives
    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(timeout=self.timeout)
        except RuntimeError as exc:  # gloo reports its timeout so
            raise TimeoutError(f"context parallelism: {what} did not complete within {self.timeout} on rank"
                               f" {self.rank} of {self.world} (does every rank make the same calls?): {exc}") from exc
        if ok is False:
            raise TimeoutError(f"context parallelism: {what} did not complete within {self.timeout} on rank"
                               f" {self.rank} of {self.world} (does every rank make the same calls?)")

    def all_gather(self, x: torch.Tensor, what: str) -> List[torch.Tensor]:
        return self.start_gather(x, what).wait()

    def start_gather(self, x: torch.Tensor, what: str) -> "_Pending":
        """Every rank's x [B, C, ...] gathered into a list in rank order, the
        collective started and not waited for (_Pending)."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        work = dist.all_gather(parts, x.contiguous(), group=self.group, async_op=True)
        return _Pending(self, work, lambda: parts, what)

    def gather_positions(self, x: torch.Tensor, what: str = "all-gather") -> torch.Tensor:
        """The whole sequence from every rank's shard [B, S, ...] (no gradient)."""
        parts = self.all_gather(x, what)
        return self._in_position_order(parts, x.shape[1] // len(self.owned_pieces()))

    def sum_and_shard(self, g: torch.Tensor, half: Optional[int] = None) -> torch.Tensor:
        """Each rank's shard of the sum over the ranks of g [B, T, ...]; with
        `half` (zigzag), g covers that half of the sequence only ([B, T/2,
        ...]) and each rank's share is its one chunk there."""
        return self.start_sum_and_shard(g, half).wait()

    def start_sum_and_shard(self, g: torch.Tensor, half: Optional[int] = None) -> "_Pending":
        """sum_and_shard with the collective started and not waited for."""
        if half is None:
            C = self.piece_length(g.shape[1])
            chunks = [[p * C for p in self.owned_pieces(r)] for r in range(self.world)]
        else:  # the half's chunks in position order: rank r's is r (first) or W-1-r (second)
            C = g.shape[1] // self.world
            chunks = [[(r if half == 0 else self.world - 1 - r) * C] for r in range(self.world)]
        if self.nccl:  # reduce-scatter over the ranks' shares laid out rank-major
            owned = [torch.cat([g[:, a:a + C] for a in starts], 1) for starts in chunks]
            stacked = torch.cat(owned, 0).contiguous()
            out = torch.empty_like(owned[0])
            work = dist.reduce_scatter_tensor(out, stacked, group=self.group, async_op=True)
            return _Pending(self, work, lambda: out, self._sum_name(half))
        total = g.contiguous().clone()
        work = dist.all_reduce(total, group=self.group, async_op=True)
        return _Pending(self, work, lambda: torch.cat([total[:, a:a + C] for a in chunks[self.rank]], 1),
                        self._sum_name(half))

    @staticmethod
    def _sum_name(half: Optional[int]) -> str:
        return "the sum of the gradients" + ("" if half is None else f" of the {('first', 'second')[half]} half")

    def sum_over_ranks(self, g: torch.Tensor) -> torch.Tensor:
        total = g.contiguous().clone()
        self._wait(dist.all_reduce(total, group=self.group, async_op=True), "all-reduce")
        return total

    # --------------------------------------------------------------- call
    def _check_ranks(self, header: List[int], names: Sequence[str], device) -> None:
        """ValueError on every rank unless every rank brought the same
        header (one all-gather of a few integers, on `device`: NCCL moves
        only GPU tensors)."""
        mine = torch.tensor(header, dtype=torch.int64, device=device if self.nccl else "cpu")
        parts = self.all_gather(mine, "the shape check")
        for r, other in enumerate(parts):
            if not torch.equal(other, mine):
                diff = [f"{n}: rank {self.rank} has {a}, rank {r} has {b}"
                        for n, a, b in zip(names, mine.tolist(), other.tolist()) if a != b]
                raise ValueError("context parallelism: the ranks' calls differ (" + "; ".join(diff) + ")")

    def __call__(self, q, k, v, g_cmp=None, g_slc=None, g_swa=None, *, k_cmp=None, v_cmp=None, k_swa=None,
                 v_swa=None, scale=None, cu_seqlens=None):
        """This rank's output [B, S, HQ, Dv] from its shard of q [B, S, HQ,
        Dqk], k, v [B, S, HKV, D] and the gates [B, S, HQ] (S = T / W);
        pool=mlp: k_cmp, v_cmp of the whole sequence [B, Tc, HKV, D], the
        same on every rank. cu_seqlens: the whole packed row's (B = 1)."""
        compiled = self.compiled
        if self.world == 1:
            return compiled(q, k, v, g_cmp, g_slc, g_swa, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa,
                            scale=scale, cu_seqlens=cu_seqlens)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name}: expected this rank's shard [B, S, H, D], got "
                                 f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        S = q.shape[1]
        T = S * self.world
        key = int(hashlib.sha256(compiled.cache_key.encode()).hexdigest()[:15], 16)
        header = [S, k.shape[1], v.shape[1], q.shape[0], key, LAYOUTS.index(self.layout),
                  -1 if cu_seqlens is None else int(cu_seqlens.numel()),
                  -1 if k_cmp is None else int(k_cmp.shape[1])]
        self._check_ranks(header, ["q's positions", "k's positions", "v's positions", "batch", "pattern",
                                   "layout", "cu_seqlens entries", "k_cmp's tokens"], q.device)
        if k.shape[1] != S or v.shape[1] != S:
            raise ValueError(f"k, v: this rank's shard must hold q's {S} positions, got k {list(k.shape)} and"
                             f" v {list(v.shape)}")
        C = self.piece_length(T)
        gathered = {"k": k, "v": v}
        if k_swa is not None or v_swa is not None:
            gathered.update(k_swa=k_swa, v_swa=v_swa)
        stages = self._start_gathers(gathered)
        mlp = {}
        if k_cmp is not None or v_cmp is not None:
            mlp = {"k_cmp": _SumGradients.apply(k_cmp, self), "v_cmp": _SumGradients.apply(v_cmp, self)}
        cu = None
        if cu_seqlens is not None:
            cu = [int(x) for x in cu_seqlens.tolist()]
            if q.shape[0] != 1 or cu[0] != 0 or cu[-1] != T:
                raise ValueError(f"cu_seqlens: the whole packed row's offsets, from 0 to T = {T} (B = 1), got"
                                 f" {cu[0]} .. {cu[-1]} with B = {q.shape[0]}")
        outs = []
        for i, piece in enumerate(self.owned_pieces()):
            # the gathered keys up to this piece's end at least (zigzag: its
            # early piece waits for the first half only)
            have = stages(i)
            keys, values = have["k"], have["v"]
            window = {n: have[n] for n in ("k_swa", "v_swa") if n in have}
            rows = slice(i * C, (i + 1) * C)
            end = (piece + 1) * C  # the chunk's last position + 1: its queries' keys end there

            def local(t):
                return t[:, rows] if t is not None else None
            gates = (local(g_cmp), local(g_slc), local(g_swa))
            if cu is None:
                extra = {n: t[:, :end] for n, t in window.items()}
                c = compiled.pattern.compress
                if mlp and c is not None:
                    n_c = num_compressed(end, c.block, c.stride)
                    extra.update({n: t[:, :n_c] for n, t in mlp.items()})
                outs.append(compiled(local(q), keys[:, :end], values[:, :end], *gates, scale=scale, **extra))
            else:
                outs.append(self._packed_piece(local(q), keys, values, gates, window, mlp, cu, end - C, end, scale))
        return torch.cat(outs, 1)

    def _start_gathers(self, tensors: dict):
        """Start the all-gathers of the named shards [B, S, ...]; returns
        stages(i): {name: the gathered positions, with autograd} covering
        every key that this rank's piece i sees, waiting only for the
        collectives it needs. Contiguous: one gather of the whole sequence.
        Zigzag: the first half (every rank's early chunk) and the second
        (the late chunks) gathered apart, both started now; piece 0 gets
        the first half, piece 1 both."""
        if self.layout != "zigzag":
            whole = {n: _GatherPositions.apply(t, self) for n, t in tensors.items()}
            return lambda i: whole
        C = next(iter(tensors.values())).shape[1] // 2
        pending = [{}, {}]
        for h in (0, 1):
            for n, t in tensors.items():
                chunk = t[:, h * C:(h + 1) * C]
                gather = self.start_gather(chunk.detach(), f"the all-gather of {n}'s {('first', 'second')[h]} half")
                summed = _InFlight()  # the backward's sum over the ranks, started by _GatherHalf
                pending[h][n] = (_AwaitGradient.apply(chunk, summed), gather, summed)
        halves = [{}, {}]

        def stage(i):
            for h in range(i + 1):
                if not halves[h]:
                    halves[h].update({n: _GatherHalf.apply(t, self, h, gather, summed)
                                      for n, (t, gather, summed) in pending[h].items()})
            if i == 0:
                return halves[0]
            return {n: torch.cat([halves[0][n], halves[1][n]], 1) for n in tensors}
        return stage

    def _packed_piece(self, q, keys, values, gates, window, mlp, cu, a: int, b: int, scale):
        """A chunk's call on a packed row: positions [a, b) of the row; the
        documents it meets, keys from the first one's start, each with
        queries at its last positions up to b (cu_seqlens_q)."""
        compiled = self.compiled
        docs = [s for s in range(len(cu) - 1) if cu[s] < b and cu[s + 1] > a]
        if not docs:  # (only empty documents here: impossible, the row is covered) pragma: no cover
            raise ValueError("cu_seqlens: no document covers this rank's positions")
        first = cu[docs[0]]
        key_lengths = [min(cu[s + 1], b) - cu[s] for s in docs]
        query_lengths = [min(cu[s + 1], b) - max(cu[s], a) for s in docs]
        device = q.device
        cu_k = torch.tensor([0] + _cumsum(key_lengths), dtype=torch.int32, device=device)
        cu_q = torch.tensor([0] + _cumsum(query_lengths), dtype=torch.int32, device=device)
        extra = {n: t[:, first:b] for n, t in window.items()}
        if mlp:
            c = compiled.pattern.compress
            counts = [num_compressed(cu[s + 1] - cu[s], c.block, c.stride) for s in range(len(cu) - 1)]
            start_c = sum(counts[:docs[0]])
            n_c = sum(num_compressed(n, c.block, c.stride) for n in key_lengths)
            extra.update({n: t[:, start_c:start_c + n_c] for n, t in mlp.items()})
        return compiled(q, keys[:, first:b], values[:, first:b], *gates, scale=scale, cu_seqlens=cu_k,
                        max_seqlen=max(key_lengths), cu_seqlens_q=cu_q, max_seqlen_q=max(query_lengths), **extra)


def _cumsum(values: List[int]) -> List[int]:
    out, total = [], 0
    for x in values:
        total += x
        out.append(total)
    return out


class _GatherPositions(torch.autograd.Function):
    """Every rank's shard [B, S, ...] -> the whole sequence [B, T, ...];
    backward: the whole sequence's gradient summed over the ranks, this
    rank's shard of it."""

    @staticmethod
    def forward(ctx, x, cp):
        ctx.cp = cp
        return cp.gather_positions(x, "the all-gather of k and v")

    @staticmethod
    def backward(ctx, g):
        return ctx.cp.sum_and_shard(g), None


class _Pending:
    """A collective in flight: finish() (the gathered parts, the summed
    shard) once wait() returns."""

    def __init__(self, cp, work, finish, what):
        self.cp, self.work, self.finish, self.what = cp, work, finish, what

    def wait(self):
        self.cp._wait(self.work, self.what)
        return self.finish()


class _InFlight:
    """Where _GatherHalf's backward leaves its started sum (_Pending) for
    _AwaitGradient."""
    pending: Optional[_Pending] = None


class _GatherHalf(torch.autograd.Function):
    """Zigzag: this rank's chunk x [B, C, ...] of half `half` -> that half
    of the whole sequence [B, W*C, ...] in position order, from the
    all-gather `gather` already started on x; backward: the sum over the
    ranks of the half's gradient started, left in `summed` for x's
    _AwaitGradient to wait for (x's gradient here is a placeholder)."""

    @staticmethod
    def forward(ctx, x, cp, half, gather, summed):
        ctx.cp, ctx.half, ctx.summed = cp, half, summed
        parts = gather.wait()
        W = cp.world
        order = range(W) if half == 0 else range(W - 1, -1, -1)  # rank r's chunk sits at r or W-1-r
        return torch.cat([parts[r] for r in order], 1)

    @staticmethod
    def backward(ctx, g):
        ctx.summed.pending = ctx.cp.start_sum_and_shard(g, half=ctx.half)
        B, C = g.shape[0], g.shape[1] // ctx.cp.world
        return g.new_empty((B, C) + tuple(g.shape[2:])), None, None, None, None


class _AwaitGradient(torch.autograd.Function):
    """The identity forward; backward: the gradient is the sum that
    _GatherHalf's backward started (`summed`), waited for here. Made
    before any chunk's call, so autograd (which runs the nodes made last
    first) reaches it after every chunk's backward, and the sum's transfer
    runs behind the chunks' kernels in between."""

    @staticmethod
    def forward(ctx, x, summed):
        ctx.summed = summed
        return x.view_as(x)

    @staticmethod
    def backward(ctx, placeholder):
        pending, ctx.summed.pending = ctx.summed.pending, None
        if pending is None:  # (autograd calls this only after _GatherHalf's backward) pragma: no cover
            raise RuntimeError("context parallelism: a gradient was awaited before its sum was started")
        return pending.wait(), None


class _SumGradients(torch.autograd.Function):
    """The same tensor on every rank (pool=mlp's compressed tokens): the
    identity forward, its gradient summed over the ranks."""

    @staticmethod
    def forward(ctx, x, cp):
        ctx.cp = cp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.cp.sum_over_ranks(g), None
