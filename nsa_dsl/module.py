"""NSAttention: a drop-in attention layer built around one NSA pattern.

    layer = NSAttention("examples/deepseek_nsa.nsa", hidden_size=2048)
    y = layer(x)                      # x, y: [B, T, hidden_size]

The layer owns everything around the attention call that NSA_MATH.md treats
as given: the query and key/value projections, the learned compression phi
(for ``pool=mlp``), the sigmoid gates and the output projection. The
attention itself is either the compiled kernels (``nsa_dsl.compile``) or the
dense reference (``nsa_dsl.reference``); both take the same arguments, so the
layer's parameters and outputs do not depend on the backend.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Dict, Optional, Union

import torch
from torch import nn

from . import custom_ops
from .kv_cache import NSACache
from .phi import CompressionMLP
from .varlen import compressed_bound, compressed_seqlens
from .ir import Branch, Pattern, Pool
from .parse import load_all
from .pipeline import compile as compile_pattern
from .reference import reference
from .validate import check_scale

__all__ = ["NSAttention", "CompressionMLP"]

_BACKENDS = ("auto", "kernels", "reference", "gather")
# torch dtypes the generated kernels accept, by the pattern's dtype names.
_KERNEL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _resolve_pattern(pattern) -> Pattern:
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, (str, os.PathLike)):
        found = load_all(pattern)
        if len(found) != 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(
                f"pattern: {os.fspath(pattern)} holds {len(found)} patterns ({names}); pass the one to use as a "
                f"Pattern, e.g. NSAttention(nsa_dsl.load({os.fspath(pattern)!r}, name={found[0].name!r}), ...)"
            )
        return found[0]
    raise TypeError(f"pattern: expected a Pattern or the path of a .nsa file, got {type(pattern).__name__}")


def _check_pattern(p: Pattern) -> None:
    """The structural facts the layer relies on (the kernels' checker judges
    the rest, e.g. head dims that are multiples of 16)."""
    if p.heads.q <= 0 or p.heads.kv <= 0 or p.heads.q % p.heads.kv:
        raise ValueError(f"pattern {p.name!r}: heads q={p.heads.q} must be a positive multiple of kv={p.heads.kv}")
    if p.dims.qk <= 0 or p.dims.v <= 0:
        raise ValueError(f"pattern {p.name!r}: dims qk={p.dims.qk} and v={p.dims.v} must be positive")
    if not p.combined_branches:
        raise ValueError(f"pattern {p.name!r} combines no branch, so the layer would output nothing")
    if p.compress is not None and (p.compress.block <= 0 or p.compress.stride <= 0):
        raise ValueError(f"pattern {p.name!r}: compress block={p.compress.block}, stride={p.compress.stride}"
                         " must be positive")


class NSAttention(nn.Module):
    """Native Sparse Attention layer for one pattern: x [B, T, hidden] -> [B, T, hidden].

    Arguments
    ---------
    pattern      a Pattern, or the path of a .nsa file holding exactly one
                 pattern (for a file with several, pass nsa_dsl.load(path, name=...)).
    hidden_size  width of x and of the output.
    bias         bias on the q, k, v and output projections (the gate and the
                 compression MLP always have biases).
    separate_kv  True: each branch gets its own key/value projection, as in the
                 paper; False: one k, v projection serves every branch.
    backend      "kernels": the generated Triton kernels (nsa_dsl.compile; CUDA,
                 or CPU under TRITON_INTERPRET=1); "reference": the dense
                 PyTorch reference (any device, any float dtype incl. float64;
                 memory O(T^2)); "gather": the same reference computing
                 the selection and window branches from only the keys each
                 query may see (O(T x (top*l' + w)); the way to train on a
                 CPU); "auto": kernels when x is on CUDA and its
                 (autocast) dtype is one the pattern allows, else reference.
                 The kernels are compiled lazily on first use and kept.
    scale        softmax scale; default 1/sqrt(Dqk).
    phi_hidden   hidden width of the compression MLP (pool=mlp); default Dqk
                 for the key MLP and Dv for the value MLP.
    query_chunk  reference and gather backends: queries per chunk (bounds the
                 forward's peak memory; see nsa_dsl.reference).
    device, dtype  where and in what dtype to create the parameters.

    Parameters (HQ, HKV, Dqk, Dv from the pattern; l, d the compression block and stride)
    ----------
    q_proj                 Linear(hidden -> HQ*Dqk)
    k_proj, v_proj         Linear(hidden -> HKV*Dqk), Linear(hidden -> HKV*Dv):
                           the kernels' ``k``, ``v`` (the selection branch's keys
                           and values; see "Which keys each branch reads")
    cmp_k_proj, cmp_v_proj the compression branch's own keys/values, fed to phi
                           (only with separate_kv, pool=mlp and k_proj in use
                           by another branch)
    swa_k_proj, swa_v_proj the window branch's own keys/values (``k_swa``,
                           ``v_swa``; only with separate_kv and k_proj in use
                           by another branch)
    phi_k, phi_v           CompressionMLP (pool=mlp only): k_cmp [B,Tc,HKV,Dqk]
                           and v_cmp [B,Tc,HKV,Dv] from the compression keys
    gate_proj              Linear(hidden -> n*HQ), n = number of combined
                           branches, in the order cmp, slc, swa; the gates are
                           its sigmoid, one per combined branch and query head
    o_proj                 Linear(HQ*Dv -> hidden)

    Which keys each branch reads (``kv_source``)
    ------------------------------
    The kernel API has one mandatory pair ``k``, ``v`` (from k_proj, v_proj).
    The selection branch always reads it. With ``pool=mean`` the kernels (and
    the reference) compute the compressed tokens by mean-pooling that same
    ``k``, ``v`` -- so with separate_kv=True and pool=mean the compression
    branch *shares* the selection branch's keys and values: the pooled tokens
    are, by definition of the math, means of the selection keys, and no
    separate compression projection would ever be read. With ``pool=mlp`` the
    layer computes k_cmp, v_cmp itself and the compression branch gets its own
    projection. The window branch gets its own pair (passed as k_swa, v_swa).
    A branch that is the only reader of ``k``, ``v`` (a window-only pattern,
    or window + mlp-compression without selection) simply uses k_proj, v_proj.
    With separate_kv=False every branch reads k_proj, v_proj.
    ``layer.kv_source`` maps each declared Branch to the name of the
    projection pair it reads ("kv", "cmp_kv" or "swa_kv").

    Initialisation
    --------------
    * q/k/v/output projections and the compression MLP's two Linears: PyTorch's
      nn.Linear default (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))).
    * intra-block position encodings ``phi_*.pos``: N(0, 0.02^2), small next to
      the keys they are added to.
    * gate_proj: weight N(0, (0.1/sqrt(hidden))^2), bias 0, so every gate starts
      at sigmoid(~0) ~= 0.5 (logit standard deviation ~0.1 for unit-variance
      inputs) and each branch starts with an equal share.

    Dtypes
    ------
    Under torch.autocast the projections run in the autocast dtype; q, k, v,
    k_cmp, v_cmp, k_swa, v_swa and the gates are then cast to q's dtype and the
    attention runs with autocast disabled (the reference does its own float32
    softmax; the kernels need one input dtype that the pattern allows). The
    kernels backend raises a ValueError for a dtype the pattern does not allow.
    """

    def __init__(
        self,
        pattern: Union[Pattern, str, os.PathLike],
        hidden_size: int,
        *,
        bias: bool = False,
        separate_kv: bool = True,
        backend: str = "auto",
        scale: Optional[float] = None,
        phi_hidden: Optional[int] = None,
        query_chunk: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        p = _resolve_pattern(pattern)
        _check_pattern(p)
        if backend not in _BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size: expected a positive int, got {hidden_size!r}")
        check_scale(scale)
        self.pattern = p
        self.hidden_size = hidden_size
        self.separate_kv = bool(separate_kv)
        self.backend = backend
        self.scale = None if scale is None else float(scale)
        self.query_chunk = query_chunk
        self._compiled = None  # CompiledPattern, built on first kernels call

        HQ, HKV, Dqk, Dv = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v
        kw = {"device": device, "dtype": dtype}

        def linear(n_in, n_out, with_bias=bias):
            return nn.Linear(n_in, n_out, bias=with_bias, **kw)

        self.q_proj = linear(hidden_size, HQ * Dqk)
        self.k_proj = linear(hidden_size, HKV * Dqk)
        self.v_proj = linear(hidden_size, HKV * Dv)

        declared = p.declared_branches
        mlp = p.compress is not None and p.compress.pool == Pool.MLP
        # Who must read the mandatory k, v: selection, and compression when it pools them.
        kv_readers = [b for b in declared if b == Branch.SLC or (b == Branch.CMP and not mlp)]
        if not kv_readers:
            # No branch is tied to k, v: the window (else the mlp compression) takes them.
            kv_readers = [Branch.SWA if Branch.SWA in declared else Branch.CMP]
        self.kv_source: Dict[Branch, str] = {}
        for b in declared:
            if b in kv_readers or not self.separate_kv:
                self.kv_source[b] = "kv"
            else:
                self.kv_source[b] = f"{b.value}_kv"
        if self.kv_source.get(Branch.CMP) == "cmp_kv":
            self.cmp_k_proj = linear(hidden_size, HKV * Dqk)
            self.cmp_v_proj = linear(hidden_size, HKV * Dv)
        if self.kv_source.get(Branch.SWA) == "swa_kv":
            self.swa_k_proj = linear(hidden_size, HKV * Dqk)
            self.swa_v_proj = linear(hidden_size, HKV * Dv)

        if mlp:
            c = p.compress
            self.phi_k = CompressionMLP(c.block, c.stride, Dqk, phi_hidden, **kw)
            self.phi_v = CompressionMLP(c.block, c.stride, Dv, phi_hidden, **kw)

        self.gated_branches = tuple(p.combined_branches)
        self.gate_proj = nn.Linear(hidden_size, len(self.gated_branches) * HQ, bias=True, **kw)
        self.o_proj = linear(HQ * Dv, hidden_size)
        self._reset_gate()

    # ------------------------------------------------------------------ init
    def _reset_gate(self) -> None:
        nn.init.normal_(self.gate_proj.weight, mean=0.0, std=0.1 / math.sqrt(self.hidden_size))
        nn.init.zeros_(self.gate_proj.bias)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter as the class docstring describes."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self._reset_gate()

    # ------------------------------------------------------------ pieces
    def _heads(self, t: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
        return t.view(*t.shape[:2], heads, dim)

    def _pair(self, source: str, x: torch.Tensor):
        p = self.pattern
        if source == "kv":
            kp, vp = self.k_proj, self.v_proj
        else:
            kp, vp = getattr(self, f"{source[:3]}_k_proj"), getattr(self, f"{source[:3]}_v_proj")
        return self._heads(kp(x), p.heads.kv, p.dims.qk), self._heads(vp(x), p.heads.kv, p.dims.v)

    def gates(self, x: torch.Tensor) -> Dict[Branch, torch.Tensor]:
        """{Branch: gate [B, T, HQ] in (0, 1)} for every combined branch."""
        g = torch.sigmoid(self.gate_proj(x))
        g = g.view(*x.shape[:2], len(self.gated_branches), self.pattern.heads.q)
        return {b: g[:, :, i] for i, b in enumerate(self.gated_branches)}

    def _qkv(self, x: torch.Tensor, qkv) -> tuple:
        """q [B, T, HQ, Dqk], k [B, T, HKV, Dqk], v [B, T, HKV, Dv]: the
        projections of x, or the caller's `qkv` (checked against x)."""
        p = self.pattern
        if qkv is None:
            q = self._heads(self.q_proj(x), p.heads.q, p.dims.qk)
            return (q, *self._pair("kv", x))
        own = sorted(s for s in set(self.kv_source.values()) if s != "kv")
        if own:
            raise ValueError(f"qkv: this layer's branches read their own key projections too ({', '.join(own)});"
                             " given q, k, v need a layer with separate_kv=False")
        if not isinstance(qkv, (tuple, list)) or len(qkv) != 3:
            raise ValueError(f"qkv: expected a tuple (q, k, v), got {type(qkv).__name__}")
        B, T = x.shape[:2]
        shapes = {"q": (B, T, p.heads.q, p.dims.qk), "k": (B, T, p.heads.kv, p.dims.qk),
                  "v": (B, T, p.heads.kv, p.dims.v)}
        for (name, shape), t in zip(shapes.items(), qkv):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"qkv: {name} expected shape {list(shape)} (x is {list(x.shape)}), got {got}")
        return tuple(qkv)

    def attention_inputs(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                         compressed_rows: Optional[int] = None, qkv=None) -> dict:
        """Everything the attention call gets, as keyword arguments of
        nsa_dsl.reference / a compiled pattern (q, k, v, gates and, where the
        pattern uses them, k_cmp, v_cmp, k_swa, v_swa), all in one dtype.
        Packed sequences (x [1, total, hidden], cu_seqlens): phi pools each
        sequence alone into compressed_rows rows (at least the sequences'
        compressed tokens; default exactly them, one host sync). qkv: see
        forward."""
        self._check_input(x)
        p = self.pattern
        q, k, v = self._qkv(x, qkv)
        args = {"q": q, "k": k, "v": v}
        if hasattr(self, "phi_k"):
            kc, vc = (k, v) if self.kv_source[Branch.CMP] == "kv" else self._pair("cmp_kv", x)
            if cu_seqlens is None:
                args["k_cmp"], args["v_cmp"] = self.phi_k(kc), self.phi_v(vc)
            else:
                cu_c = compressed_seqlens(p, cu_seqlens)
                rows = int(cu_c[-1]) if compressed_rows is None else compressed_rows
                args["k_cmp"] = self.phi_k(kc, cu_seqlens, cu_c, rows)
                args["v_cmp"] = self.phi_v(vc, cu_seqlens, cu_c, rows)
        if self.kv_source.get(Branch.SWA) == "swa_kv":
            args["k_swa"], args["v_swa"] = self._pair("swa_kv", x)
        for b, g in self.gates(x).items():
            args[f"g_{b.value}"] = g
        dt = q.dtype
        return {name: t.to(dt) for name, t in args.items()}

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor [B, T, hidden={self.hidden_size}], got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x: expected a 3-d tensor [B, T, hidden={self.hidden_size}], "
                             f"got a {x.dim()}-d tensor of shape {list(x.shape)}")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape [B, T, hidden={self.hidden_size}], got {list(x.shape)} "
                             f"(last dim {x.shape[-1]} != hidden_size {self.hidden_size})")
        if x.shape[1] < 1:
            raise ValueError(f"x: expected at least one position, got shape {list(x.shape)}")

    # ------------------------------------------------------------ backends
    def resolve_backend(self, dtype: torch.dtype, device: torch.device) -> str:
        """The backend a call with attention inputs of this dtype/device uses."""
        if self.backend != "auto":
            return self.backend
        allowed = [_KERNEL_DTYPES[d.value] for d in self.pattern.allowed_dtypes]
        if device.type == "cuda" and dtype in allowed:
            return "kernels"
        if device.type == "cuda":
            warnings.warn(
                f"NSAttention(backend='auto'): dtype {dtype} is not one the kernels of pattern "
                f"{self.pattern.name!r} allow ({', '.join(d.value for d in self.pattern.allowed_dtypes)}); "
                "using the dense reference (O(T^2) memory)", RuntimeWarning, stacklevel=3)
        return "reference"

    @property
    def compiled(self):
        """The CompiledPattern (compiled on first access, then kept)."""
        if self._compiled is None:
            self._compiled = compile_pattern(self.pattern)
        return self._compiled

    def attend(self, args: dict, backend: Optional[str] = None, **packed) -> torch.Tensor:
        """The attention call on attention_inputs(): o [B, T, HQ, Dv];
        `packed`: cu_seqlens and max_seqlen of packed sequences."""
        q = args["q"]
        backend = backend or self.resolve_backend(q.dtype, q.device)
        with torch.autocast(device_type=q.device.type, enabled=False):
            if backend == "kernels":
                allowed = [_KERNEL_DTYPES[d.value] for d in self.pattern.allowed_dtypes]
                if q.dtype not in allowed:
                    raise ValueError(
                        f"x: the kernels of pattern {self.pattern.name!r} run in "
                        f"{' | '.join(d.value for d in self.pattern.allowed_dtypes)}, but the projections gave "
                        f"{q.dtype}; convert the layer (.to(dtype)), use torch.autocast, or backend='reference'")
                return self.compiled(**args, scale=self.scale, **packed)
            return reference(self.pattern, **args, scale=self.scale, query_chunk=self.query_chunk,
                             gather=backend == "gather", **packed)

    def new_cache(self, batch: int, max_len: int, *, device=None, dtype=None, page_size=None, pages=None,
                  block_table=None) -> NSACache:
        """An empty inference cache for forward(x, cache=...): `batch`
        sequence slots of up to max_len positions (device and dtype: the
        layer's parameters' unless given; page_size, pages, block_table: a
        paged layout, CompiledPattern.new_cache)."""
        ref = self.q_proj.weight
        return NSACache(self.pattern, batch, max_len, device=device if device is not None else ref.device,
                        dtype=dtype if dtype is not None else ref.dtype,
                        k_swa=self.kv_source.get(Branch.SWA) == "swa_kv",
                        pool_source=hasattr(self, "phi_k") and self.kv_source[Branch.CMP] != "kv",
                        page_size=page_size, pages=pages, block_table=block_table)

    def _forward_cached(self, x: torch.Tensor, cache: NSACache, slots, qkv=None) -> torch.Tensor:
        """forward with a cache: x [b, m, hidden] are the next m positions of
        each slot's sequence (all slots, or `slots`); their keys are
        appended and their queries attend everything cached (prefill or
        decode: one path, by m). phi pools each compressed block the new
        positions complete, from the cached and the new keys. Nothing here
        reads the cache's host lengths (the step's op does): torch.compile
        traces it without recompiling as the sequences grow."""
        self._check_input(x)
        p = self.pattern
        b, m = x.shape[:2]
        q, k, v = self._qkv(x, qkv)
        args = {"q": q, "k": k, "v": v}
        if self.kv_source.get(Branch.SWA) == "swa_kv":
            args["k_swa"], args["v_swa"] = self._pair("swa_kv", x)
        for br, g in self.gates(x).items():
            args[f"g_{br.value}"] = g
        dt = q.dtype
        args = {name: t.to(dt) for name, t in args.items()}
        source = None
        if hasattr(self, "phi_k"):
            own = self.kv_source[Branch.CMP] != "kv"
            kc, vc = (self._pair("cmp_kv", x) if own else (k, v))
            kc, vc = kc.to(dt), vc.to(dt)
            chosen = cache.check_slots(slots, b)
            rows = cache.rows(chosen)
            lengths = cache.lengths[rows]
            for name, phi, cached, new in (("k_cmp", self.phi_k, cache.k_src if own else cache.k, kc),
                                           ("v_cmp", self.phi_v, cache.v_src if own else cache.v, vc)):
                args[name] = self._pool_candidates(phi, cache, cached, rows, lengths, new)
            source = (chosen, kc, vc) if own else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            compiled = self.compiled if self.resolve_backend(dt, x.device) == "kernels" else None
            gates = {br: args.pop(f"g_{br.value}", None) for br in p.combined_branches}
            o = custom_ops.cache_step(compiled, cache, args.pop("q"), args.pop("k"), args.pop("v"), gates,
                                      k_swa=args.pop("k_swa", None), v_swa=args.pop("v_swa", None),
                                      k_cmp=args.pop("k_cmp", None), v_cmp=args.pop("v_cmp", None), scale=self.scale,
                                      slots=slots, return_indices=False)
        if source is not None:
            cache.append_source(*source)
        return self.o_proj(o.reshape(b, m, p.heads.q * p.dims.v))

    @staticmethod
    def _pool_candidates(phi, cache: NSACache, cached: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor,
                         new: torch.Tensor) -> torch.Tensor:
        """phi of each block that ends at one of the m new positions new [b,
        m, H, D] of each sequence (its cached positions end at lengths, on
        the device), as the candidates [b, m, H, D'] a cached step takes:
        zeros where no block ends (never stored). A block's keys come from
        the cache before the sequence's length and from the new ones after
        it. At most (m - 1) // d + 1 blocks end in m positions: phi runs on
        those only. No host read: a step stays capturable and traceable."""
        b, m = new.shape[:2]
        block, stride, dev = phi.block, phi.stride, new.device
        start = lengths.to(torch.int64)[:, None]  # [b, 1]
        # the first block end at or after start: position block - 1 + t * stride
        first = (start - (block - 1)).clamp(min=0).add(stride - 1).div(stride, rounding_mode="floor")
        ends = block - 1 + (first + torch.arange((m - 1) // stride + 1, device=dev)) * stride  # [b, n]
        pos = (ends - (block - 1))[:, :, None] + torch.arange(block, device=dev)  # [b, n, block], all >= 0
        batch = torch.arange(b, device=dev)[:, None, None]
        past = cache.read(cached, rows[:, None, None], pos.clamp(max=cache.max_len - 1)).to(new.dtype)
        fresh = new[batch, (pos - start[:, :, None]).clamp(0, m - 1)]
        keys = torch.where((pos < start[:, :, None])[..., None, None], past, fresh)  # [b, n, block, H, D]
        tokens = phi.pool(keys.transpose(2, 3))  # [b, n, H, D']
        at = ends - start  # the new position each block ends at; m: past the piece (dropped)
        out = tokens.new_zeros(b, m + 1, *tokens.shape[2:])
        out[batch[:, :, 0], torch.where(at < m, at, m)] = tokens
        return out[:, :m]

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, *, cache: Optional[NSACache] = None, slots=None,
                qkv=None) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]. Packed sequences: x [1,
        total, hidden] with cu_seqlens (int32 [N+1]) and optionally
        max_seqlen (the kernels then need no host sync); each sequence
        attends only within itself. With a cache (new_cache): x holds the
        next positions of each slot's sequence (all slots, or `slots`),
        appended to the cache and attending everything in it.
        qkv: (q [B, T, HQ, Dqk], k [B, T, HKV, Dqk], v [B, T, HKV, Dv]) to
        attend instead of the projections of x, e.g. after a rotary position
        embedding (the HuggingFace conversion, nsa_dsl.integrations); x
        still gives the gates, and k, v feed phi (pool=mlp). Only for a
        layer whose branches all read k_proj, v_proj (separate_kv=False)."""
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("cache: a cached call takes x [batch, new positions, hidden], not cu_seqlens")
            return self._forward_cached(x, cache, slots, qkv)
        packed = {}
        rows = None
        if cu_seqlens is not None:
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 1:
                raise ValueError(f"x: with cu_seqlens expected [1, total, hidden={self.hidden_size}], got"
                                 f" {list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            packed = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
            # phi fills a buffer of the bound, not the exact count: no host
            # sync; its padding rows are ignored by every backend
            rows = compressed_bound(self.pattern, x.shape[1])
        args = self.attention_inputs(x, packed.get("cu_seqlens"), rows, qkv)
        o = self.attend(args, **packed)
        B, T = x.shape[:2]
        return self.o_proj(o.reshape(B, T, self.pattern.heads.q * self.pattern.dims.v))

    # ------------------------------------------------------------ misc
    def __getstate__(self):
        # The compiled kernels hold an imported module: rebuild them after a
        # copy or pickle instead of carrying them along.
        state = self.__dict__.copy()
        state["_compiled"] = None
        return state

    def extra_repr(self) -> str:
        p = self.pattern
        kv = ", ".join(f"{b.value}<-{s}" for b, s in self.kv_source.items())
        return (f"pattern={p.name!r}, hidden_size={self.hidden_size}, heads=(q={p.heads.q}, kv={p.heads.kv}), "
                f"dims=(qk={p.dims.qk}, v={p.dims.v}), branches=[{kv}], gated={[b.value for b in self.gated_branches]}, "
                f"backend={self.backend!r}")
