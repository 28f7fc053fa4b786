"""A compiled pattern's calls as torch.library custom ops with fake
implementations: the training call (nsa_dsl::forward, nsa_dsl::backward,
with registered autograd), the selection alone (nsa_dsl::select_blocks)
and a cached step (nsa_dsl::cache_step: prefill and decode). torch.compile
traces a model through them in one graph and torch.export keeps them as ops.

A CompiledPattern or an NSACache is a Python object an op schema cannot
carry: the ops take its key and find it in the registry (registry.py).
The training ops' fake implementations run the same Python as the real
ones with the kernel launches left out (CompiledPattern.layout_only): the
outputs' shapes and which outputs exist come from the code that makes
them, not from a copy of its rules. A cached step's outputs are always
[b, m, HQ, Dv] and its indices [b, m, HKV, top]."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch

from . import incremental, registry
from .ir import Branch
from .launch import LAYOUT_ONLY, _contiguous_gates
from .validate import device_problem

# the differentiable inputs, in the ops' order
INPUTS = ("q", "k", "v", "g_cmp", "g_slc", "g_swa", "k_cmp", "v_cmp", "k_swa", "v_swa")
# what the forward keeps for the backward, in the op's output order after o and the indices
KEPT = ("o_cmp", "lse_cmp", "o_slc", "lse_slc", "o_swa", "lse_swa", "k_cmp", "v_cmp")



def _unaliased(results: list, inputs) -> list:
    """results with a copy of each that shares memory with an input or an
    earlier result (an op's outputs alias nothing)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    out = []
    for t in results:
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out.append(t)
    return out


def _none(like: torch.Tensor) -> torch.Tensor:
    """An absent output (an op returns a fixed list of tensors): empty and
    one-dimensional, where every real one has three or four dimensions
    (and may be empty: no compressed token in a short sequence)."""
    return like.new_empty(0)


def _absent(t: Optional[torch.Tensor]) -> bool:
    return t is None or (t.dim() == 1 and t.numel() == 0)


def _run_forward(key, q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices, scale, keep,
                 cu_seqlens, max_seqlen, cu_seqlens_q, max_seqlen_q) -> list:
    compiled = registry.lookup(key)
    gates = _contiguous_gates({Branch.CMP: g_cmp, Branch.SLC: g_slc, Branch.SWA: g_swa})
    shapes, _ = compiled._checked(q, k, v, gates, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa,
                                  indices=indices, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                  cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q)
    out = compiled.forward(q, k, v, gates, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa, indices=indices,
                           scale=scale, shapes=shapes, final=not keep)
    inputs = (q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices)
    result = []
    for name in ("o", "indices") + (KEPT if keep else ()):
        t = out.get(name)
        # the caller's own indices or compressed tokens come back as absent
        if t is None or any(t is x for x in inputs if x is not None):
            t = _none(q)
        result.append(t)
    return result if LAYOUT_ONLY.get() else _unaliased(result, inputs)


@torch.library.custom_op("nsa_dsl::forward", mutates_args=())
def nsa_forward(key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cmp: Optional[torch.Tensor],
                g_slc: Optional[torch.Tensor], g_swa: Optional[torch.Tensor], k_cmp: Optional[torch.Tensor],
                v_cmp: Optional[torch.Tensor], k_swa: Optional[torch.Tensor], v_swa: Optional[torch.Tensor],
                indices: Optional[torch.Tensor], scale: float, keep: bool, cu_seqlens: Optional[torch.Tensor],
                max_seqlen: Optional[int], cu_seqlens_q: Optional[torch.Tensor],
                max_seqlen_q: Optional[int]) -> List[torch.Tensor]:
    """[o, indices, *KEPT if keep]; an absent one is an empty tensor. keep:
    what the backward needs is kept (else the call may write o fused).
    Packed sequences: one batch of all positions and cu_seqlens (and
    cu_seqlens_q where the queries are each sequence's last positions)."""
    return _run_forward(key, q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices, scale, keep,
                        cu_seqlens, max_seqlen, cu_seqlens_q, max_seqlen_q)


@nsa_forward.register_fake
def _(key, q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices, scale, keep, cu_seqlens, max_seqlen,
      cu_seqlens_q, max_seqlen_q):
    with registry.lookup(key).layout_only():
        return _run_forward(key, q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices, scale, keep,
                            cu_seqlens, max_seqlen, cu_seqlens_q, max_seqlen_q)


def _run_backward(key, tensors, do, scale, needs, distinct, cu_seqlens, max_seqlen, cu_seqlens_q,
                  max_seqlen_q) -> list:
    compiled = registry.lookup(key)
    inputs = dict(zip(INPUTS, tensors[:10]))
    kept = dict(zip(KEPT, tensors[11:]))

    def given(t):
        return None if _absent(t) else t
    # the kernels index the gates as contiguous [B, T, HQ] (the forward made them so too)
    gates = _contiguous_gates({b: given(inputs[f"g_{b.value}"]) for b in (Branch.CMP, Branch.SLC, Branch.SWA)})
    shapes, _ = compiled._checked(inputs["q"], inputs["k"], inputs["v"], gates, k_cmp=given(inputs["k_cmp"]),
                                  v_cmp=given(inputs["v_cmp"]), k_swa=given(inputs["k_swa"]),
                                  v_swa=given(inputs["v_swa"]), scale=scale, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q)
    saved = {n: given(inputs[n]) for n in ("q", "k", "v", "k_swa", "v_swa")}
    saved["indices"] = given(tensors[10])
    saved["k_cmp"], saved["v_cmp"] = given(kept["k_cmp"]), given(kept["v_cmp"])
    for b in (Branch.CMP, Branch.SLC, Branch.SWA):
        saved[f"g_{b.value}"] = gates[b]
        saved[f"o_{b.value}"], saved[f"lse_{b.value}"] = given(kept[f"o_{b.value}"]), given(kept[f"lse_{b.value}"])
    saved = {n: t for n, t in saved.items() if t is not None}
    need = dict(zip(INPUTS, needs))
    grads = compiled.backward(saved, do, shapes, scale, need, distinct)
    result = []
    for name in INPUTS:
        x, g = given(inputs[name]), grads.get(name)
        if not need[name] or x is None:
            result.append(_none(do))
        elif g is None:
            result.append(torch.zeros_like(x))
        else:
            result.append(g.to(x.dtype))
    return _unaliased(result, [*tensors, do])


@torch.library.custom_op("nsa_dsl::backward", mutates_args=())
def nsa_backward(key: str, tensors: List[Optional[torch.Tensor]], do: torch.Tensor, scale: float, needs: List[bool],
                 distinct: bool, cu_seqlens: Optional[torch.Tensor], max_seqlen: Optional[int],
                 cu_seqlens_q: Optional[torch.Tensor], max_seqlen_q: Optional[int]) -> List[torch.Tensor]:
    """The gradient of each of INPUTS (empty where not needed or absent)
    from dO and what nsa_dsl::forward kept: tensors are INPUTS, the indices
    and KEPT (k_cmp/v_cmp: the pooled tokens the forward made, or the
    caller's)."""
    return _run_backward(key, tensors, do, scale, needs, distinct, cu_seqlens, max_seqlen, cu_seqlens_q,
                         max_seqlen_q)


@nsa_backward.register_fake
def _(key, tensors, do, scale, needs, distinct, cu_seqlens, max_seqlen, cu_seqlens_q, max_seqlen_q):
    named = dict(zip(INPUTS, tensors))
    return [torch.empty_like(named[n]) if need and not _absent(named[n]) else _none(do)
            for n, need in zip(INPUTS, needs)]


def _setup_context(ctx, inputs, output):
    (key, q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, indices, scale, keep, cu_seqlens,
     max_seqlen, cu_seqlens_q, max_seqlen_q) = inputs
    o, idx, *kept = output
    kept = dict(zip(KEPT, kept))
    own = indices is None  # scored here: no row repeats a block
    # the compressed tokens the backward reads: pooled here, or the caller's
    kept["k_cmp"] = k_cmp if _absent(kept["k_cmp"]) and k_cmp is not None else kept["k_cmp"]
    kept["v_cmp"] = v_cmp if _absent(kept["v_cmp"]) and v_cmp is not None else kept["v_cmp"]
    ctx.key, ctx.scale, ctx.distinct, ctx.max_seqlen, ctx.max_seqlen_q = key, scale, own, max_seqlen, max_seqlen_q
    ctx.arguments = len(inputs)  # the backward returns a gradient (or None) for each
    # the backward needs the compiled pattern even if the caller dropped it
    # (`nsa_dsl.compile(p)(...)`): the registry only holds it weakly
    ctx.compiled = registry.lookup(key)
    # only o carries a gradient: the indices and what is kept for the
    # backward get none, and autograd must not fill them with zeros (three
    # [B, T, HQ, Dv] zero tensors: +3.3 GB at 64k on the H100, NOTES v20)
    ctx.set_materialize_grads(False)
    tensors = [q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa, idx if own else indices,
               *(kept[n] for n in KEPT), cu_seqlens, cu_seqlens_q]
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])


def _backward(ctx, grads):
    if grads[0] is None:  # nothing flowed back into o
        return (None,) * ctx.arguments
    stored = iter(ctx.saved_tensors)
    tensors = [next(stored) if present else None for present in ctx.present]
    cu_seqlens_q = tensors.pop()
    cu_seqlens = tensors.pop()
    needs = list(ctx.needs_input_grad[1:11])
    g = nsa_backward(ctx.key, tensors, grads[0].contiguous(), ctx.scale, needs, ctx.distinct, cu_seqlens,
                     ctx.max_seqlen, cu_seqlens_q, ctx.max_seqlen_q)
    grads_in = (None, *[None if _absent(t) else t for t in g])  # key, then INPUTS
    return grads_in + (None,) * (ctx.arguments - len(grads_in))


torch.library.register_autograd("nsa_dsl::forward", _backward, setup_context=_setup_context)


def _run_select(key, q, k, v, k_cmp, v_cmp, scale, cu_seqlens, max_seqlen) -> torch.Tensor:
    compiled = registry.lookup(key)
    shapes, _ = compiled._checked(q, k, v, {}, k_cmp=k_cmp, v_cmp=v_cmp, scale=scale, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen)
    out = compiled.forward(q, k, v, {}, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=None, v_swa=None, indices=None,
                           scale=scale, shapes=shapes, indices_only=True)
    return out["indices"]


@torch.library.custom_op("nsa_dsl::select_blocks", mutates_args=())
def nsa_select_blocks(key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: Optional[torch.Tensor],
                      v_cmp: Optional[torch.Tensor], scale: float, cu_seqlens: Optional[torch.Tensor],
                      max_seqlen: Optional[int]) -> torch.Tensor:
    """CompiledPattern.select_blocks of one batch: the indices [B, T, HKV,
    top] (no gradient flows through them); packed sequences as one batch
    of all positions with cu_seqlens and max_seqlen."""
    return _run_select(key, q, k, v, k_cmp, v_cmp, scale, cu_seqlens, max_seqlen)


@nsa_select_blocks.register_fake
def _(key, q, k, v, k_cmp, v_cmp, scale, cu_seqlens, max_seqlen):
    with registry.lookup(key).layout_only():
        return _run_select(key, q, k, v, k_cmp, v_cmp, scale, cu_seqlens, max_seqlen)


# the cache's tensors a step writes, in the op's argument order
CACHE_TENSORS = ("k", "v", "k_cmp", "v_cmp", "k_swa", "v_swa", "lengths")


def cache_step(compiled, cache, q, k, v, gates: dict, *, slots, k_swa, v_swa, k_cmp, v_cmp, scale,
               return_indices: bool):
    """A prefill or decode step (CompiledPattern.prefill's contract) as the
    nsa_dsl::cache_step op; compiled None: the PyTorch schedule
    (incremental.attend_cached), as NSAttention's reference backends run
    it. What needs no host lengths is checked here, where a traced call
    sees it; the room left and pool=mlp's token counts inside the op, at
    run time (a traced call reading the host lengths would recompile at
    every step)."""
    p = compiled.pattern if compiled is not None else getattr(cache, "pattern", None)
    if return_indices and p is not None and p.select is None:
        raise ValueError(f"return_indices: pattern {p.name!r} has no select branch, so there are no indices")
    # Traced (torch.compile, export): the checks that need no host lengths
    # here, the step as the op. Eager: the op's body called straight (it
    # checks everything itself): the op's dispatch cost more host time
    # than the rest of a decode step together (NOTES v22).
    step = nsa_cache_step if torch.compiler.is_compiling() else _cache_step_eager
    if step is nsa_cache_step:
        incremental.validate_step(cache, p, q, k, v, gates, slots, k_swa, v_swa, k_cmp, v_cmp, host_lengths=False)
    else:
        incremental.check_cache(cache)
    listed = k_cmp is not None and not isinstance(k_cmp, torch.Tensor)
    tokens = [*k_cmp, *v_cmp] if listed else [k_cmp, v_cmp]
    inputs = [t for t in (q, k, v, *gates.values(), k_swa, v_swa, *tokens) if isinstance(t, torch.Tensor)]
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    with torch.set_grad_enabled(False) if tracked else contextlib.nullcontext():
        o, idx = step(
            cache.op_key, "" if compiled is None else compiled.op_key, q, k, v, gates.get(Branch.CMP),
            gates.get(Branch.SLC), gates.get(Branch.SWA), k_swa, v_swa, None if listed else k_cmp,
            None if listed else v_cmp, list(k_cmp) if listed else [], list(v_cmp) if listed else [],
            None if slots is None else list(slots), scale, return_indices,
            *(getattr(cache, n) for n in CACHE_TENSORS))
    if tracked:  # a backward through the step is an error that says why, not a gradient silently missing
        o = _InferenceOnly.apply(o, *[t for t in inputs if t.requires_grad])
    return (o, idx) if return_indices else o


class _InferenceOnly(torch.autograd.Function):
    """o unchanged, tied to the step's inputs that require a gradient, so a
    backward through a cached step raises (the steps have no gradient:
    the cache is for inference) instead of leaving them without one."""

    @staticmethod
    def forward(ctx, o, *inputs):
        return o.view_as(o)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("nsa_dsl: a cached step (prefill, decode, or a layer called with cache=) has no"
                           " gradient: the cache is for inference. Train without a cache, or run the cached"
                           " steps under torch.no_grad()")


def _cache_step_eager(*args) -> tuple:
    """nsa_cache_step's body without the op (its arguments, the cache's
    tensors last)."""
    return _run_cache_step(*args[:-len(CACHE_TENSORS)], args[-len(CACHE_TENSORS):])


def _run_cache_step(cache_key, compiled_key, q, k, v, g_cmp, g_slc, g_swa, k_swa, v_swa, k_cmp, v_cmp,
                    k_cmp_tokens, v_cmp_tokens, slots, scale, want_indices, tensors) -> tuple:
    cache = registry.lookup(cache_key)
    compiled = registry.lookup(compiled_key) if compiled_key else None
    # (the step checks the cache against the call's pattern, not its own)
    pattern = compiled.pattern if compiled is not None else cache.pattern
    if compiled is not None and device_problem(q) is not None:
        compiled = None  # the kernels cannot run here: the PyTorch schedule
    if k_cmp_tokens:
        k_cmp, v_cmp = k_cmp_tokens, v_cmp_tokens
    gates = {Branch.CMP: g_cmp, Branch.SLC: g_slc, Branch.SWA: g_swa}
    # the op writes the tensors it is handed (under torch.compile's
    # functionalization: copies, written back after)
    with cache.holding(dict(zip(CACHE_TENSORS, tensors))):
        out = incremental.step(cache, pattern, q, k, v, gates, scale=scale, slots=slots, k_swa=k_swa,
                               v_swa=v_swa, k_cmp=k_cmp, v_cmp=v_cmp, return_indices=want_indices,
                               compiled=compiled)
    o, idx = out if want_indices else (out, None)
    return o, _none(q) if idx is None else idx


@torch.library.custom_op("nsa_dsl::cache_step", mutates_args=tuple(f"cache_{n}" for n in CACHE_TENSORS))
def nsa_cache_step(cache_key: str, compiled_key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   g_cmp: Optional[torch.Tensor], g_slc: Optional[torch.Tensor], g_swa: Optional[torch.Tensor],
                   k_swa: Optional[torch.Tensor], v_swa: Optional[torch.Tensor], k_cmp: Optional[torch.Tensor],
                   v_cmp: Optional[torch.Tensor], k_cmp_tokens: List[torch.Tensor], v_cmp_tokens: List[torch.Tensor],
                   slots: Optional[List[int]], scale: Optional[float], want_indices: bool, cache_k: torch.Tensor,
                   cache_v: torch.Tensor, cache_k_cmp: Optional[torch.Tensor], cache_v_cmp: Optional[torch.Tensor],
                   cache_k_swa: Optional[torch.Tensor], cache_v_swa: Optional[torch.Tensor],
                   cache_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o [b, m, HQ, Dv], indices [b, m, HKV, top] or empty unless
    want_indices) of a step of the cache `cache_key` (incremental.step),
    appending to the cache's tensors (the cache_* arguments) and
    advancing its lengths; compiled_key empty: the PyTorch schedule.
    pool=mlp's compressed tokens as per-position candidates (k_cmp,
    v_cmp) or per-sequence lists (k_cmp_tokens, v_cmp_tokens)."""
    tensors = (cache_k, cache_v, cache_k_cmp, cache_v_cmp, cache_k_swa, cache_v_swa, cache_lengths)
    result = _run_cache_step(cache_key, compiled_key, q, k, v, g_cmp, g_slc, g_swa, k_swa, v_swa, k_cmp, v_cmp,
                             k_cmp_tokens, v_cmp_tokens, slots, scale, want_indices, tensors)
    # (an op's outputs alias none of its inputs; the eager path needs no copy)
    return tuple(_unaliased(list(result), (q, k, v, g_cmp, g_slc, g_swa, k_swa, v_swa, k_cmp, v_cmp, *tensors)))


@nsa_cache_step.register_fake
def _(cache_key, compiled_key, q, k, v, g_cmp, g_slc, g_swa, k_swa, v_swa, k_cmp, v_cmp, k_cmp_tokens, v_cmp_tokens,
      slots, scale, want_indices, *tensors):
    p = registry.lookup(cache_key).pattern
    b, m = q.shape[:2]
    o = q.new_empty(b, m, p.heads.q, p.dims.v)
    idx = q.new_empty(b, m, p.heads.kv, p.select.top, dtype=torch.int32) if want_indices else _none(q)
    return o, idx
