"""A compiled pattern: validates inputs, launches the generated kernels in
the order the Plan lists them, and returns what NSA_MATH.md defines."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .ir import Branch
from .plan import Plan
from .validate import device_problem, validate_inputs

LOG2E = 1.4426950408889634


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


class CompiledPattern:
    """Callable kernels for one pattern. Build it with nsa_dsl.compile()."""

    def __init__(self, plan: Plan, module, source_path: Path, cache_key: str):
        self.plan = plan
        self.pattern = plan.pattern
        self.module = module
        self.source_path = Path(source_path)
        self.cache_key = cache_key

    def __repr__(self) -> str:
        return f"CompiledPattern({self.pattern.name!r}, kernels={list(self.plan.kernel_names)}, source={str(self.source_path)!r})"

    @property
    def source(self) -> str:
        return self.source_path.read_text()

    # ------------------------------------------------------------------ API
    def __call__(self, q, k, v, g_cmp=None, g_slc=None, g_swa=None, *, k_cmp=None, v_cmp=None, k_swa=None,
                 v_swa=None, indices=None, scale=None, return_indices=False):
        p = self.pattern
        gates = {Branch.CMP: g_cmp, Branch.SLC: g_slc, Branch.SWA: g_swa}
        shapes = validate_inputs(p, q, k, v, gates, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa,
                                 indices=indices, scale=scale)
        problem = device_problem(q)
        if problem is not None:
            raise RuntimeError(f"nsa_dsl: {problem}")
        if return_indices and p.select is None:
            raise ValueError(f"return_indices: pattern {p.name!r} has no select branch, so there are no indices")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(p.dims.qk)
        outputs = self.forward(q, k, v, gates, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa,
                               indices=indices, scale=scale, shapes=shapes)
        if return_indices:
            return outputs["o"], outputs["indices"]
        return outputs["o"]

    # ------------------------------------------------------------- forward
    def forward(self, q, k, v, gates, *, k_cmp, v_cmp, k_swa, v_swa, indices, scale, shapes) -> dict:
        """Run every kernel of the plan; return all intermediate tensors
        (branch outputs, statistics, indices) by name."""
        plan, m = self.plan, self.module
        p = self.pattern
        B, T, Tc = shapes.batch, shapes.length, shapes.compressed
        HQ, HKV, DV = p.heads.q, p.heads.kv, p.dims.v
        dev = q.device
        qk_scale_log2 = scale * LOG2E
        out = {}

        if p.compress is not None:
            if plan.has("cmp_pool"):
                k_cmp = torch.empty((B, Tc, HKV, p.dims.qk), dtype=q.dtype, device=dev)
                v_cmp = torch.empty((B, Tc, HKV, DV), dtype=q.dtype, device=dev)
                if Tc > 0:
                    kp = plan.kernel("cmp_pool")
                    grid = (_cdiv(Tc, kp.const("POOL_BLOCK_C")), B * HKV)
                    for src, dst, d in ((k, k_cmp, p.dims.qk), (v, v_cmp, DV)):
                        m.cmp_pool[grid](src, dst, Tc, *_strides(src), *_strides(dst), D=d,
                                         D_PAD=1 << (d - 1).bit_length(),
                                         num_warps=kp.num_warps, num_stages=kp.num_stages)
            out["k_cmp"], out["v_cmp"] = k_cmp, v_cmp
            kp = plan.kernel("cmp_fwd")
            write_o = kp.const("CMP_WRITE_O")
            o_cmp = torch.empty((B, T, HQ, DV), dtype=q.dtype, device=dev) if write_o else None
            lse_cmp = torch.empty((B, HQ, T), dtype=torch.float32, device=dev)
            o_arg = o_cmp if write_o else lse_cmp  # unused pointer when the output is not needed
            o_strides = _strides(o_cmp) if write_o else (0, 0, 0, 0)
            grid = (_cdiv(T, kp.const("CMP_BLOCK_M")), B * HQ)
            m.cmp_fwd[grid](q, k_cmp, v_cmp, o_arg, lse_cmp, T, Tc, qk_scale_log2,
                            *_strides(q), *_strides(k_cmp), *_strides(v_cmp), *o_strides,
                            num_warps=kp.num_warps, num_stages=kp.num_stages)
            out["o_cmp"], out["lse_cmp"] = o_cmp, lse_cmp

        if p.select is not None:
            top = p.select.top
            if indices is None:
                kp = plan.kernel("slc_topk")
                indices = torch.empty((B, T, HKV, top), dtype=torch.int32, device=dev)
                grid = (_cdiv(T, kp.const("TOPK_BLOCK_M")), B * HKV)
                if plan.static_selection:
                    m.slc_topk[grid](q, q, q, indices, T, 0, qk_scale_log2, *_strides(q), 0, 0, 0, 0,
                                     *_strides(indices), num_warps=kp.num_warps, num_stages=kp.num_stages)
                else:
                    m.slc_topk[grid](q, out["k_cmp"], out["lse_cmp"], indices, T, Tc, qk_scale_log2,
                                     *_strides(q), *_strides(out["k_cmp"]), *_strides(indices),
                                     num_warps=kp.num_warps, num_stages=kp.num_stages)
            out["indices"] = indices
            kp = plan.kernel("slc_fwd")
            o_slc = torch.empty((B, T, HQ, DV), dtype=q.dtype, device=dev)
            lse_slc = torch.empty((B, HQ, T), dtype=torch.float32, device=dev)
            m.slc_fwd[(_cdiv(T, kp.const("SLC_TOKENS")), B * HKV)](q, k, v, indices, o_slc, lse_slc, T, qk_scale_log2,
                                    *_strides(q), *_strides(k), *_strides(v), *_strides(indices),
                                    *_strides(o_slc), num_warps=kp.num_warps, num_stages=kp.num_stages)
            out["o_slc"], out["lse_slc"] = o_slc, lse_slc

        if p.window is not None:
            kw, vw = (k_swa, v_swa) if k_swa is not None else (k, v)
            kp = plan.kernel("swa_fwd")
            o_swa = torch.empty((B, T, HQ, DV), dtype=q.dtype, device=dev)
            lse_swa = torch.empty((B, HQ, T), dtype=torch.float32, device=dev)
            grid = (_cdiv(T, kp.const("SWA_BLOCK_M")), B * HQ)
            m.swa_fwd[grid](q, kw, vw, o_swa, lse_swa, T, qk_scale_log2,
                            *_strides(q), *_strides(kw), *_strides(vw), *_strides(o_swa),
                            num_warps=kp.num_warps, num_stages=kp.num_stages)
            out["o_swa"], out["lse_swa"] = o_swa, lse_swa

        out["o"] = self._combine(out, gates, B * T * HQ, q)
        return out

    def _combine(self, out: dict, gates: dict, n_rows: int, like: torch.Tensor) -> torch.Tensor:
        kp = self.plan.kernel("combine")
        o = torch.empty((*like.shape[:3], self.pattern.dims.v), dtype=like.dtype, device=like.device)
        branch_out = {b: out.get(f"o_{b.value}") for b in (Branch.CMP, Branch.SLC, Branch.SWA)}
        # Unused pointers are never read (their COMBINE_* constant is False);
        # pass o so every pointer argument is a real tensor.
        ptrs = [branch_out[b] if branch_out[b] is not None else o for b in (Branch.CMP, Branch.SLC, Branch.SWA)]
        gate_ptrs = []
        for b in (Branch.CMP, Branch.SLC, Branch.SWA):
            g = gates[b]
            gate_ptrs.append(g.contiguous() if g is not None else o)
        for t in ptrs:
            if t is not o and not t.is_contiguous():  # pragma: no cover - branch outputs are allocated contiguous
                raise AssertionError("branch outputs must be contiguous")
        grid = (_cdiv(n_rows, kp.const("COMBINE_ROWS")),)
        self.module.combine[grid](o, *ptrs, *gate_ptrs, n_rows,
                                  HAS_G_CMP=gates[Branch.CMP] is not None,
                                  HAS_G_SLC=gates[Branch.SLC] is not None,
                                  HAS_G_SWA=gates[Branch.SWA] is not None,
                                  num_warps=kp.num_warps, num_stages=kp.num_stages)
        return o
