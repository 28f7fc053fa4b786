"""A compiled pattern: validates inputs, launches the generated kernels in
the order the Plan lists them, and returns what NSA_MATH.md defines.

CompiledPattern handles a call's inputs and decides which kernels run in
which order; the launches themselves are in launch_forward.py and
launch_backward.py (their shared conventions in launch.py), the inverted
selection index in inverted_index.py and the call as custom ops (with
its autograd) in custom_ops.py."""
from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Optional

import torch

from . import launch_backward as bwd
from . import varlen
from .kv_cache import NSACache
from . import launch_forward as fwd
from . import custom_ops, registry
from .geometry import num_blocks
from .ir import Branch
from .launch import _GATED, LAYOUT_ONLY, LOG2E, _contiguous_gates
from .plan import Plan
from .validate import device_problem, validate_inputs


def _check_index_range(indices: torch.Tensor, block: int, length: int) -> None:
    """Given block indices must lie in [-1, number of blocks): anything else
    is a caller's bug that would otherwise be silently ignored."""
    n_blocks = num_blocks(length, block)
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < -1 or high >= n_blocks:
        raise ValueError(f"indices: block ids must lie in [-1, {n_blocks}) for T={length} and select block"
                         f" {block} (-1 means none); got values in [{low}, {high}]")


def _check_packed_index_range(indices: torch.Tensor, block: int, cu_seqlens: torch.Tensor,
                              cu_seqlens_q: Optional[torch.Tensor]) -> None:
    """_check_index_range for packed rows (indices [1, total, HKV, top]):
    a row's block ids must lie in [-1, its own sequence's number of
    blocks), the sequence's keys being cu_seqlens' (its queries
    cu_seqlens_q's where given). One host read, as the fixed-length check;
    skipped while torch.compile traces (a traced call cannot raise on
    values)."""
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    cu_k = cu_seqlens.to(device=indices.device, dtype=torch.int64)
    cu_q = cu_k if cu_seqlens_q is None else cu_seqlens_q.to(device=indices.device, dtype=torch.int64)
    rows = torch.arange(indices.shape[1], device=indices.device)
    seq = torch.searchsorted(cu_q[1:], rows, right=True).clamp(max=cu_k.numel() - 2)
    blocks = (cu_k[seq + 1] - cu_k[seq] + block - 1) // block
    idx = indices[0].to(torch.int64)
    bad = ((idx < -1) | (idx >= blocks.view(-1, 1, 1))).flatten(1).any(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        s = int(seq[row])
        values = idx[row].flatten().tolist()
        raise ValueError(f"indices: block ids must lie in [-1, {int(blocks[row])}) for the {int(cu_k[s + 1] - cu_k[s])}"
                         f" keys of sequence {s} and select block {block} (-1 means none); its packed row {row}"
                         f" holds {values}")


def _as_one_batch(*tensors) -> tuple:
    """Packed inputs ([total, ...] or [1, total, ...], varlen.unpack_layout)
    as one batch [1, total, ...], and whether they came with the leading 1
    (the output keeps the caller's layout; every tensor must share q's).
    Gates are [total, HQ] or [1, total, HQ]."""
    names = ("q", "k", "v", "g_cmp", "g_slc", "g_swa", "k_cmp", "v_cmp", "k_swa", "v_swa", "indices")
    q = tensors[0]
    if not isinstance(q, torch.Tensor) or q.dim() not in (3, 4):
        raise ValueError(f"q: with cu_seqlens expected [total, HQ, Dqk] or [1, total, HQ, Dqk], got"
                         f" {tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    leading = q.dim() == 4
    out = []
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        flat, had_leading = varlen.unpack_layout(name, t, 2 if name.startswith("g_") else 3)
        if had_leading != leading:
            raise ValueError(f"{name}: q is packed as {'[1, total, ...]' if leading else '[total, ...]'}; {name}"
                             f" must be too, got shape {tuple(t.shape)}")
        out.append(flat.unsqueeze(0))
    return (*out, leading)


def _queries_of_last_positions(q, k) -> bool:
    """Whether a fixed-length call has fewer queries than positions: q
    [B, Tq, ...] and k [B, T, ...] with 1 <= Tq < T (anything else is
    left to validate_inputs' errors)."""
    return (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4
            and q.shape[0] == k.shape[0] and 1 <= q.shape[1] < k.shape[1])


def _as_shifted_packing(q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices) -> tuple:
    """A fixed-length call with queries at the last Tq of T positions as
    the packed call of its B sequences: the tensors as one batch [1, B *
    rows, ...] (a view where they are contiguous), then cu_seqlens,
    max_seqlen, cu_seqlens_q, max_seqlen_q (made on q's device, no host
    synchronisation). k_cmp, v_cmp (pool=mlp) hold each sequence's Tc
    tokens, the packed layout of equal sequences."""
    B, Tq = q.shape[:2]
    T = k.shape[1]

    def one_batch(t):
        return t.reshape(1, -1, *t.shape[2:]) if isinstance(t, torch.Tensor) and t.dim() >= 3 else t
    steps = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    return (*(one_batch(t) for t in (q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices)),
            steps * T, T, steps * Tq, Tq)


class _NoLaunch:
    """A kernel module whose every kernel[grid](...) launches nothing."""

    def __getattr__(self, name):
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


_NO_LAUNCH = _NoLaunch()


def outside_compiled_graphs(method):
    """A kernel entry that torch.compile runs as it is, between the graphs it
    compiles (a graph break), instead of tracing into Triton's launch
    (which fails; through the interpreter it errors): the entries that are
    not custom ops yet (custom_ops has the call's)."""
    return functools.wraps(method)(torch.compiler.disable(method))


class CompiledPattern:
    """Callable kernels for one pattern. Build it with nsa_dsl.compile()."""

    def __init__(self, plan: Plan, module, source_path: Path, cache_key: str, *, deterministic: bool = False,
                 slc_dkdv: Optional[str] = None, slc_fwd: Optional[str] = None):
        # When True, every buffer a kernel is meant to fill starts as NaN (or
        # -7 for indices), so a test sees any element left unwritten.
        self.poison = False
        # Selection dK/dV strategy: the plan's choice unless overridden;
        # deterministic=True insists on the bit-reproducible one.
        choice = slc_dkdv or plan.slc_dkdv
        if choice not in (None, "inverted-index", "atomic"):
            raise ValueError(f"slc_dkdv: expected 'inverted-index' or 'atomic', got {slc_dkdv!r}")
        if deterministic and choice == "atomic":
            raise ValueError("slc_dkdv='atomic' is not deterministic; use deterministic=False or 'inverted-index'")
        self.deterministic = deterministic
        self.slc_dkdv = choice
        # Selection forward loop order: the plan's (cost-model) choice unless
        # overridden. Both orders are deterministic (the block-centric one
        # reduces per-slot partials in slot order, without atomics).
        if slc_fwd not in (None, "group-centric", "block-centric"):
            raise ValueError(f"slc_fwd: expected 'group-centric' or 'block-centric', got {slc_fwd!r}")
        # None: the plan's order at each call's length (Plan.loop_order_at)
        self.slc_fwd_override = slc_fwd
        self.plan = plan
        self.pattern = plan.pattern
        self.module = module
        self.source_path = Path(source_path)
        self.cache_key = cache_key
        self.op_key = registry.register(self, cache_key)  # what the custom ops find it by
        # (kernel, input dtype) -> the pipeline stages that fit in shared
        # memory where the plan's did not (see launch._launch_fitting)
        self.fitted_stages = {}

    def __repr__(self) -> str:
        return f"CompiledPattern({self.pattern.name!r}, kernels={list(self.plan.kernel_names)}, source={str(self.source_path)!r})"

    @property
    def source(self) -> str:
        return self.source_path.read_text()

    def slc_fwd_at(self, T: int) -> Optional[str]:
        """The selection forward loop order a call of length T runs: the
        compile(slc_fwd=...) override, else the plan's order for T; None
        without a selection branch."""
        order = self.plan.loop_order_at(T)
        return order if order is None or self.slc_fwd_override is None else self.slc_fwd_override

    # ------------------------------------------------------------------ API
    def __call__(self, q, k, v, g_cmp=None, g_slc=None, g_swa=None, *, k_cmp=None, v_cmp=None, k_swa=None,
                 v_swa=None, indices=None, scale=None, return_indices=False, cu_seqlens=None, max_seqlen=None,
                 cu_seqlens_q=None, max_seqlen_q=None):
        """o [B, Tq, HQ, Dv] of q [B, Tq, HQ, Dqk] against k, v [B, T, HKV, D]
        (and indices with return_indices). Tq < T: the queries are the last
        Tq positions (a piece of a prompt after cached keys, a context-
        parallel shard); k, v hold every position. Packed sequences:
        cu_seqlens (and cu_seqlens_q where each sequence's queries are its
        last positions only), as flash-attn's varlen calls."""
        # packed sequences with max_seqlen: shapes known without reading
        # cu_seqlens, so traced as the op; without it one .item() finds the
        # longest sequence, which a traced call cannot
        known = cu_seqlens is None or (max_seqlen is not None and (cu_seqlens_q is None or max_seqlen_q is not None))
        call = self._call if known else self._call_packed
        return call(q, k, v, g_cmp, g_slc, g_swa, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa, indices=indices,
                    scale=scale, return_indices=return_indices, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                    cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q)

    def _call(self, q, k, v, g_cmp, g_slc, g_swa, *, k_cmp, v_cmp, k_swa, v_swa, indices, scale, return_indices,
              cu_seqlens, max_seqlen, cu_seqlens_q=None, max_seqlen_q=None):
        """__call__: checked here (torch.compile traces it), computed by the
        nsa_dsl::forward op (custom_ops), differentiated by nsa_dsl::backward."""
        p = self.pattern
        leading = True
        batch_shape = None
        if cu_seqlens is None and cu_seqlens_q is None and _queries_of_last_positions(q, k):
            # q [B, Tq] < k [B, T]: B sequences of T positions, packed, each
            # with queries at its last Tq (the kernels' shifted packing)
            batch_shape = q.shape[:2]
            (q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices, cu_seqlens, max_seqlen,
             cu_seqlens_q, max_seqlen_q) = _as_shifted_packing(q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa,
                                                               v_swa, indices)
        elif cu_seqlens is not None:  # packed sequences: computed as one batch of all positions
            q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices, leading = _as_one_batch(
                q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices)
        gates = {Branch.CMP: g_cmp, Branch.SLC: g_slc, Branch.SWA: g_swa}
        shapes, scale = self._checked(q, k, v, gates, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa,
                                      indices=indices, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                      cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q)
        if return_indices and p.select is None:
            raise ValueError(f"return_indices: pattern {p.name!r} has no select branch, so there are no indices")
        if indices is not None and shapes.packing is None:
            _check_index_range(indices, p.select.block, shapes.length)
        elif indices is not None:  # packed rows, or queries of the last positions (packed above)
            _check_packed_index_range(indices, p.select.block, cu_seqlens, cu_seqlens_q)
        tensors = (q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa)
        # keep what the backward needs only where something is differentiated
        # (else the output may be written fused and nothing is kept)
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        o, idx, *_ = custom_ops.nsa_forward(self.op_key, q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa,
                                            indices, scale, keep, cu_seqlens, max_seqlen, cu_seqlens_q, max_seqlen_q)
        idx = indices if indices is not None else (idx if p.select is not None else None)
        if batch_shape is not None:  # back to [B, Tq, ...]
            o = o.view(*batch_shape, *o.shape[2:])
            idx = idx.view(*batch_shape, *idx.shape[2:]) if idx is not None and idx.dim() == 4 else idx
        elif not leading:  # packed [total, ...] in, packed [total, ...] out
            o, idx = o[0], (idx[0] if idx is not None and idx.dim() == 4 else idx)
        if return_indices:
            return o, idx
        return o

    # packed sequences without max_seqlen: the longest sequence is read on
    # the host, which a traced call cannot, so torch.compile runs it as it is
    _call_packed = outside_compiled_graphs(_call)

    # ------------------------------------------------------------ inference
    def new_cache(self, batch: int, max_len: int, *, device=None, dtype=torch.bfloat16, k_swa: bool = False,
                  page_size=None, pages=None, block_table=None):
        """An empty NSACache of `batch` sequence slots of up to max_len
        positions for this pattern (k_swa=True: the window branch keeps its
        own keys and values). page_size: the keys and values in pages of
        that many positions, a pool of `pages` of them assigned by
        block_table [batch, ceil(max_len / page_size)] int32 (kv_cache)."""
        return NSACache(self.pattern, batch, max_len, device=device, dtype=dtype, k_swa=k_swa, page_size=page_size,
                        pages=pages, block_table=block_table)

    def prefill(self, q, k, v, g_cmp=None, g_slc=None, g_swa=None, *, cache, slots=None, k_swa=None, v_swa=None,
                k_cmp=None, v_cmp=None, scale=None, return_indices=False):
        """Append k, v ([b, m, HKV, D], any m >= 1) after each slot's
        sequence (all slots in order, or `slots`) and attend the queries at
        those positions against everything cached: o [b, m, HQ, Dv]. A piece
        may start anywhere (chunked prefill). The compressed tokens the new
        positions complete are stored: mean-pooled from the cache
        (pool=mean), or given (pool=mlp: k_cmp, v_cmp lists of [n_s, HKV,
        D], one per sequence, the tokens this call completes; or tensors
        [b, m, HKV, D], one candidate per new position, the token whose
        block ends there, kept only where one does). Bad input is a
        ValueError before anything is written.

        Slots that are all empty run the training forward's kernels on the
        piece; a piece of one position per sequence after cached ones runs
        the decode kernels (launch_decode.decode_step); a longer piece after
        cached positions runs the training forward's kernels too, on the
        cached sequences with queries at their last positions
        (incremental.attend_through_kernels). A step is one op, nsa_dsl::cache_step
        (custom_ops): torch.compile traces it without reading the cache's
        host lengths, so a compiled generation loop does not recompile per
        length."""
        return self._step(q, k, v, g_cmp, g_slc, g_swa, cache=cache, slots=slots, k_swa=k_swa, v_swa=v_swa,
                          k_cmp=k_cmp, v_cmp=v_cmp, scale=scale, return_indices=return_indices)

    def decode(self, q, k, v, g_cmp=None, g_slc=None, g_swa=None, *, cache, slots=None, k_swa=None, v_swa=None,
               k_cmp=None, v_cmp=None, scale=None, return_indices=False):
        """prefill of one new position per sequence (q [b, 1, HQ, Dqk]).
        With the decode kernels a step over every slot has fixed shapes
        and reads positions from the cache's device lengths: no host
        synchronisation or host-to-device copy, so it can be captured in a
        CUDA graph and replayed (pool=mlp: k_cmp, v_cmp as per-position
        candidate tensors; replays advance the device lengths only:
        cache.sync_host_lengths())."""
        if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[1] != 1:
            raise ValueError(f"q: decode takes one new position per sequence, got shape {list(q.shape)}"
                             " (prefill takes any number)")
        return self._step(q, k, v, g_cmp, g_slc, g_swa, cache=cache, slots=slots, k_swa=k_swa, v_swa=v_swa,
                          k_cmp=k_cmp, v_cmp=v_cmp, scale=scale, return_indices=return_indices)

    def _step(self, q, k, v, g_cmp, g_slc, g_swa, *, cache, slots, k_swa, v_swa, k_cmp, v_cmp, scale,
              return_indices):
        gates = {Branch.CMP: g_cmp, Branch.SLC: g_slc, Branch.SWA: g_swa}
        return custom_ops.cache_step(self, cache, q, k, v, gates, scale=scale, slots=slots, k_swa=k_swa, v_swa=v_swa,
                                     k_cmp=k_cmp, v_cmp=v_cmp, return_indices=return_indices)

    def _checked(self, q, k, v, gates: dict, *, scale, cu_seqlens=None, max_seqlen=None, cu_seqlens_q=None,
                 max_seqlen_q=None, **tensors) -> tuple:
        """(shapes, scale) of a call's inputs once they are valid for the
        pattern (validate_inputs) and the device can run the kernels; the
        scale defaults to 1/sqrt(Dqk). Packed inputs arrive as one batch;
        cu_seqlens_q: the queries are each sequence's last positions only
        (q has those rows, k and v every position)."""
        packing, compressed = None, None
        if cu_seqlens is not None:
            for name, t in (("q", q), ("k", k)):
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
            positions = k.shape[1] if cu_seqlens_q is not None and k.dim() == 4 else q.shape[1]
            varlen.check_cu_seqlens(cu_seqlens, positions, q.device)
            if cu_seqlens_q is not None:
                varlen.check_queries(cu_seqlens_q, cu_seqlens, q.shape[1])
            packing = varlen.packing(self.pattern, cu_seqlens, max_seqlen, cu_seqlens_q, max_seqlen_q)
            k_cmp = tensors.get("k_cmp")
            compressed = (k_cmp.shape[1] if isinstance(k_cmp, torch.Tensor) and k_cmp.dim() == 4
                          else varlen.compressed_bound(self.pattern, positions))
        elif max_seqlen is not None or cu_seqlens_q is not None:
            raise ValueError(f"{'max_seqlen' if max_seqlen is not None else 'cu_seqlens_q'}: only with cu_seqlens"
                             " (packed sequences)")
        shapes = validate_inputs(self.pattern, q, k, v, gates, scale=scale, packing=packing, compressed=compressed,
                                 **tensors)
        problem = device_problem(q)
        if problem is not None:
            raise RuntimeError(f"nsa_dsl: {problem}")
        return shapes, float(scale) if scale is not None else 1.0 / math.sqrt(self.pattern.dims.qk)

    def select_blocks(self, q, k, v, *, k_cmp=None, v_cmp=None, scale=None, cu_seqlens=None,
                      max_seqlen=None) -> torch.Tensor:
        """The selection branch's block indices for q, k and v, [B, T, HKV,
        top] int32 (ascending, -1 padded): the blocks a call on the same
        inputs attends, without computing any attention output. Only the
        compression, its statistics and the top-n scoring run. For looking
        at what the scoring chooses, or for handing the same indices to
        later calls (indices=...). No gradient flows through them. Packed
        sequences (cu_seqlens) give [total, HKV, top] (or with q's leading
        1) of per-sequence block numbers."""
        p = self.pattern
        if p.select is None:
            raise ValueError(f"select_blocks: pattern {p.name!r} has no select branch, so there are no indices")
        leading = True
        if cu_seqlens is not None:
            q, k, v, *_, k_cmp, v_cmp, _, _, _, leading = _as_one_batch(q, k, v, None, None, None, k_cmp, v_cmp,
                                                                         None, None, None)
        shapes, scale = self._checked(q, k, v, {}, k_cmp=k_cmp, v_cmp=v_cmp, scale=scale, cu_seqlens=cu_seqlens,
                                      max_seqlen=max_seqlen)
        if cu_seqlens is not None and max_seqlen is None:
            return self._select_packed(q, k, v, k_cmp, v_cmp, scale, shapes, leading)
        # the nsa_dsl::select_blocks op (torch.compile traces it)
        idx = custom_ops.nsa_select_blocks(self.op_key, q.detach(), k.detach(), v.detach(),
                                           None if k_cmp is None else k_cmp.detach(),
                                           None if v_cmp is None else v_cmp.detach(), scale, cu_seqlens, max_seqlen)
        return idx if leading else idx[0]

    @outside_compiled_graphs  # without max_seqlen the longest sequence is read on the host
    def _select_packed(self, q, k, v, k_cmp, v_cmp, scale, shapes, leading) -> torch.Tensor:
        with torch.no_grad():
            out = self.forward(q, k, v, {}, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=None, v_swa=None, indices=None,
                               scale=scale, shapes=shapes, indices_only=True)
        return out["indices"] if leading else out["indices"][0]

    def alloc(self, shape, dtype, device, zeroed: bool = False) -> torch.Tensor:
        """A buffer a kernel is meant to fill: uninitialised, or with poison
        NaN (-7 for integers) so a test sees any element left unwritten.
        zeroed: some elements are no kernel's (or kernels add onto it): zeros."""
        if zeroed:
            return torch.zeros(shape, dtype=dtype, device=device)
        if not self.poison:
            return torch.empty(shape, dtype=dtype, device=device)
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)

    @contextlib.contextmanager
    def layout_only(self):
        """Run this pattern's Python without launching a kernel: the outputs
        are allocated as a call would (their shapes, which of them exist),
        their contents never written. The custom ops' fake implementations
        (custom_ops) run the forward so."""
        module, token = self.module, LAYOUT_ONLY.set(True)
        self.module = _NO_LAUNCH
        try:
            yield
        finally:
            self.module = module
            LAYOUT_ONLY.reset(token)

    # ------------------------------------------------------------- forward
    def writes_final_output(self, T: int) -> bool:
        """Whether a call of length T that needs no gradient has the
        selection write the gated output itself (WRITE_FINAL: no combine
        launch, no selection output stored): the selection is a combined
        branch and either runs block-centric (its slot reduction writes it,
        the window computed first) or group-centric with a combined window
        folded into it."""
        plan = self.plan
        if not plan.has("slc_fwd"):
            return False
        combine = plan.kernel("combine")
        if not combine.const("COMBINE_SLC"):
            return False
        if self.slc_fwd_at(T) == "block-centric":
            return True
        return plan.window_in_selection or not combine.const("COMBINE_SWA")

    def forward(self, q, k, v, gates, *, k_cmp, v_cmp, k_swa, v_swa, indices, scale, shapes,
                final: bool = False, indices_only: bool = False) -> dict:
        """Run every kernel of the plan; return all intermediate tensors
        (branch outputs, statistics, indices) by name. final=True (nothing
        will be differentiated): where writes_final_output allows, slc_fwd
        writes "o" itself and the selection's and window's outputs and
        statistics are not kept. Gates must be contiguous. indices_only:
        stop once the selection's indices exist (select_blocks)."""
        plan, p = self.plan, self.pattern
        T = shapes.length
        qk_scale_log2 = scale * LOG2E
        out = {}

        if p.compress is not None:
            fwd.compress(self, q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, out=out, shapes=shapes,
                         qk_scale_log2=qk_scale_log2)

        if p.select is not None:
            own_indices = indices is None  # scored here: every visible forced block is in them
            if indices is None:
                indices = fwd.score_blocks(self, q=q, out=out, shapes=shapes, qk_scale_log2=qk_scale_log2)
            out["indices"] = indices
            if indices_only:
                return out
            # The loop order follows the longest sequence (a packed call's
            # blocks are shared only by the queries of their own sequence):
            # by the packed total, documents of 1k-4k ran block-centric, 14%
            # slower for paper128, 58% for deepseek_nsa (H200, NOTES v18).
            order_length = shapes.grid_length
            write_final = final and self.writes_final_output(order_length)
            if self.slc_fwd_at(order_length) == "block-centric":
                # packed calls: no merge (its tiles would straddle sequences), so
                # the window runs on its own and the index holds the forced blocks
                fold = plan.window_in_block_centric and shapes.packing is None
                if write_final and p.window is not None and not fold:  # the reduction reads o_swa
                    fwd.window(self, q=q, k=k, v=v, k_swa=k_swa, v_swa=v_swa, out=out, shapes=shapes,
                               qk_scale_log2=qk_scale_log2)
                window = None
                if fold:  # the reduction computes the window (into out unless write_final)
                    window = (k_swa, v_swa) if k_swa is not None else (k, v)
                o_slc, lse_slc, o = fwd.select_block_centric(self, q=q, k=k, v=v, indices=indices,
                                                             qk_scale_log2=qk_scale_log2, shapes=shapes,
                                                             final_from=out if write_final else None, gates=gates,
                                                             window=window, window_out=out,
                                                             forced=(own_indices and plan.forced_in_merge
                                                                     and fold),
                                                             distinct=own_indices)
            else:
                o_slc, lse_slc, o = fwd.select_group_centric(self, q=q, k=k, v=v, k_swa=k_swa, v_swa=v_swa,
                                                             indices=indices, gates=gates, out=out, shapes=shapes,
                                                             qk_scale_log2=qk_scale_log2, write_final=write_final)
            if write_final:
                out["o"] = o
            out["o_slc"], out["lse_slc"] = o_slc, lse_slc

        if p.window is not None and "o_swa" not in out and "o" not in out:  # not folded into slc_fwd
            fwd.window(self, q=q, k=k, v=v, k_swa=k_swa, v_swa=v_swa, out=out, shapes=shapes,
                       qk_scale_log2=qk_scale_log2)

        if "o" not in out:  # the selection did not write it (WRITE_FINAL)
            out["o"] = fwd.combine(self, out=out, gates=gates, n_rows=shapes.batch * T * p.heads.q, like=q)
        return out

    # ------------------------------------------------------------ backward
    def backward(self, saved: dict, do: torch.Tensor, shapes, scale: float, needs: dict,
                 indices_distinct: bool = False) -> dict:
        """Gradients of every differentiable input from dO, recomputing the
        attention probabilities from the saved statistics. Returns a dict of
        float32 or input-dtype gradients by argument name (None where not
        needed). indices_distinct: the saved indices came from the plan's own
        scoring (no row repeats a block)."""
        p = self.pattern
        B, T, Tc = shapes.batch, shapes.length, shapes.compressed
        HQ, HKV, DQK, DV = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v
        q, k, v = saved["q"], saved["k"], saved["v"]
        dev = q.device
        combined = p.combined_branches
        do = do.contiguous()
        n_rows = B * T * HQ
        f32 = torch.float32
        # dQ: the dq kernels of the branches run one after another, the first
        # storing into the float32 sum, the last adding and storing the total
        # in q's dtype (launch_backward.DqChain): no zeroed sum, no cast after.
        # The gradient in q's dtype is allocated for the last and the sum let
        # go with it, as the cast after did (peak memory). With the plan's
        # dq_with_compressed one kernel computes the compressed branch's and
        # the window's dQ, first (as the sum's first writer it stores without
        # reading: its gated dO tiles then fit the registers, NOTES v28).
        paired_dq = self.plan.dq_with_compressed
        dq_order = (Branch.SWA, Branch.SLC) if paired_dq else (Branch.CMP, Branch.SLC, Branch.SWA)
        dq_chain = bwd.DqChain([b for b in dq_order if b in combined], (B, T, HQ, DQK), q.dtype, dev, self.alloc)
        dq = dq_chain.for_branch
        # dK/dV: the flash-style branches' dK/dV kernels store (never add)
        # into buffers no kernel wrote before (flash_backward): the compressed
        # keys' own (pooled into dk, dv after), and the window's: its own
        # keys' (k_swa), or else dk and dv themselves, the window launched
        # first and the pooling and the selection adding theirs after.
        # Without a window's dK/dV they start at zero.
        separate_swa = saved.get("k_swa") is not None
        window_dkdv = Branch.SWA in combined

        dk, dv = (self.alloc((B, shapes.keys, HKV, d), f32, dev, zeroed=separate_swa or not window_dkdv)
                  for d in (DQK, DV))
        if separate_swa:
            dk_swa, dv_swa = (self.alloc((B, shapes.keys, HKV, d), f32, dev, zeroed=not window_dkdv)
                              for d in (DQK, DV))

        gates = {b: saved.get(f"g_{b.value}") for b in _GATED}
        dg = torch.zeros((3, n_rows), dtype=f32, device=dev)
        delta = torch.zeros((3, B, HQ, T), dtype=f32, device=dev)
        outs = [saved.get(f"o_{b.value}") if b in combined else None for b in _GATED]
        bwd.prepare(self, do=do, outs=outs, gates=gates, dg=dg, delta=delta, shapes=shapes)

        grads = {}
        if window_dkdv:
            swa_args = dict(branch="swa", q=q, keys=saved["k_swa"] if separate_swa else k,
                            values=saved["v_swa"] if separate_swa else v, do=do, gate=gates[Branch.SWA],
                            lse=saved["lse_swa"], delta=delta[2], dk=dk_swa if separate_swa else dk,
                            dv=dv_swa if separate_swa else dv, n_keys=shapes.keys, shapes=shapes, scale=scale)
            bwd.flash_backward(self, dq=None, **swa_args)

        if Branch.CMP in combined:
            # packed: k_cmp may be sized by varlen.compressed_bound, and its
            # rows past the sequences' compressed tokens are no program's
            # (their gradient is zero)
            dk_cmp = self.alloc((B, Tc, HKV, DQK), f32, dev, zeroed=shapes.packing is not None)
            dv_cmp = self.alloc((B, Tc, HKV, DV), f32, dev, zeroed=shapes.packing is not None)
            bwd.flash_backward(self, branch="cmp", q=q, keys=saved["k_cmp"], values=saved["v_cmp"], do=do,
                               gate=gates[Branch.CMP], lse=saved["lse_cmp"], delta=delta[0], dq=dq(Branch.CMP),
                               dk=dk_cmp, dv=dv_cmp, n_keys=Tc, shapes=shapes, scale=scale)
            if paired_dq:
                window_k, window_v = (saved["k_swa"], saved["v_swa"]) if separate_swa else (k, v)
                bwd.compressed_and_window_dq(self, q=q, k_cmp=saved["k_cmp"], v_cmp=saved["v_cmp"], k_swa=window_k,
                                             v_swa=window_v, do=do, g_cmp=gates[Branch.CMP], g_swa=gates[Branch.SWA],
                                             lse_cmp=saved["lse_cmp"], lse_swa=saved["lse_swa"], delta_cmp=delta[0],
                                             delta_swa=delta[2], dq=dq(Branch.SWA), shapes=shapes, scale=scale)
            if self.plan.has("cmp_pool_bwd"):
                bwd.pool_backward(self, dk_cmp=dk_cmp, dv_cmp=dv_cmp, dk=dk, dv=dv, shapes=shapes)
            else:
                grads["k_cmp"], grads["v_cmp"] = dk_cmp, dv_cmp

        if Branch.SLC in combined:
            bwd.selection_backward(self, q=q, k=k, v=v, do=do, gate=gates[Branch.SLC], lse=saved["lse_slc"],
                                   delta=delta[1], indices=saved["indices"], dq=dq(Branch.SLC), dk=dk, dv=dv,
                                   shapes=shapes, scale=scale, atomic=self.slc_dkdv == "atomic",
                                   distinct=indices_distinct)

        if window_dkdv and not paired_dq:
            bwd.flash_backward(self, dq=dq(Branch.SWA), dkdv=False, **swa_args)

        grads["q"], grads["k"], grads["v"] = dq_chain.gradient, dk, dv
        if separate_swa:
            grads["k_swa"], grads["v_swa"] = dk_swa, dv_swa
        for i, b in enumerate((Branch.CMP, Branch.SLC, Branch.SWA)):
            if gates[b] is not None:
                grads[f"g_{b.value}"] = dg[i].view(B, T, HQ)
        return grads
