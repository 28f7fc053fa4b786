"""compiled(...) as one torch.autograd.Function: the forward keeps what the
backward recomputes from (inputs, branch outputs, statistics, indices) and
the backward hands dO to CompiledPattern.backward."""
from __future__ import annotations

import torch

from .ir import Branch
from .launch import _contiguous_gates

_GRAD_ORDER = ("q", "k", "v", "g_cmp", "g_slc", "g_swa", "k_cmp", "v_cmp", "k_swa", "v_swa")


class NSAFunction(torch.autograd.Function):
    """compiled(...) as one differentiable operation. Block indices are an
    output without gradient (none flows through the scores or top-n)."""

    @staticmethod
    def forward(ctx, compiled, shapes, scale, indices, q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa):
        gates = {Branch.CMP: g_cmp, Branch.SLC: g_slc, Branch.SWA: g_swa}
        gates = _contiguous_gates(gates)
        out = compiled.forward(q, k, v, gates, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa,
                               indices=indices, scale=scale, shapes=shapes)
        inputs = dict(zip(_GRAD_ORDER, (q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa)))
        ctx.compiled, ctx.shapes, ctx.scale = compiled, shapes, scale
        ctx.indices_distinct = indices is None  # scored here: no row repeats a block
        ctx.input_dtypes = {n: (t.dtype if t is not None else None) for n, t in inputs.items()}
        saved = {"q": q, "k": k, "v": v, "k_swa": k_swa, "v_swa": v_swa, "indices": out.get("indices"),
                 "k_cmp": out.get("k_cmp"), "v_cmp": out.get("v_cmp")}
        for b in (Branch.CMP, Branch.SLC, Branch.SWA):
            saved[f"g_{b.value}"] = gates[b]
            saved[f"o_{b.value}"] = out.get(f"o_{b.value}")
            saved[f"lse_{b.value}"] = out.get(f"lse_{b.value}")
        ctx.saved_names = [n for n, t in saved.items() if t is not None]
        ctx.save_for_backward(*[saved[n] for n in ctx.saved_names])
        idx = out.get("indices")
        if idx is None:
            idx = torch.empty(0, dtype=torch.int32, device=q.device)
        ctx.mark_non_differentiable(idx)
        return out["o"], idx

    @staticmethod
    def backward(ctx, do, _d_indices):
        saved = dict(zip(ctx.saved_names, ctx.saved_tensors))
        needs = dict(zip(_GRAD_ORDER, ctx.needs_input_grad[4:]))
        grads = ctx.compiled.backward(saved, do, ctx.shapes, ctx.scale, needs, ctx.indices_distinct)
        result = []
        for name in _GRAD_ORDER:
            g = grads.get(name)
            if g is None or not needs[name]:
                result.append(None)
            else:
                result.append(g.to(ctx.input_dtypes[name]))
        return (None, None, None, None, *result)
