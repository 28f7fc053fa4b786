"""A compiled pattern: validates inputs, launches the generated kernels in
the order the Plan lists them, and returns what NSA_MATH.md defines."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch

from .geometry import num_blocks
from .ir import Branch
from .plan import Plan
from .validate import device_problem, validate_inputs

LOG2E = 1.4426950408889634


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def _contiguous_gates(gates: dict) -> dict:
    """The gates as the kernels index them: contiguous [B, T, HQ] (or None)."""
    return {b: (g.contiguous() if g is not None else None) for b, g in gates.items()}


_GATED = (Branch.CMP, Branch.SLC, Branch.SWA)
# TOPK_KEY32's int32 sort keys give the block index the low bits and the
# score the rest: up to 2^12 blocks the score keeps 11 mantissa bits, as
# fine as fp16 resolves; longer sequences take the int64 keys.
KEY32_MAX_BLOCK_BITS = 12


def _int32_keys(plan_flag: bool, dtype: torch.dtype, n_blocks: int) -> bool:
    """Whether the scoring's sorted merge runs on int32 keys (TOPK_KEY32):
    16-bit inputs and at most 2^KEY32_MAX_BLOCK_BITS blocks."""
    return bool(plan_flag) and dtype != torch.float32 and (n_blocks - 1).bit_length() <= KEY32_MAX_BLOCK_BITS


def _gate_args(gates: dict, unused: torch.Tensor) -> tuple:
    """The three gates as kernel arguments: pointers (`unused`, never read,
    where a gate is absent: Triton needs a tensor) and the HAS_G_CMP /
    HAS_G_SLC / HAS_G_SWA constexprs."""
    pointers = [gates[b] if gates[b] is not None else unused for b in _GATED]
    return pointers, {f"HAS_G_{b.value.upper()}": gates[b] is not None for b in _GATED}


def _tma_fits(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors (TMA on Hopper) can read these [B, T, H, D]
    tensors: the innermost stride 1, the others and the base address
    multiples of 16 bytes (the copy engine's rule; Triton's interpreter
    reads them too). On CUDA, compute capability 9.0 or later. An empty
    tensor (no compressed token yet: T < the compression block) has no
    descriptor: a box needs every dimension positive."""
    for t in tensors:
        if t.numel() == 0:
            return False
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]):
            return False
        if t.is_cuda and torch.cuda.get_device_capability(t.device)[0] < 9:
            return False
    return True


def _descriptor_operands(plan_flag: bool, *tensors_and_boxes) -> tuple:
    """(*operands, used) for a kernel with a descriptor path: for each
    (tensor, box shape) a tensor descriptor of such boxes where the plan
    asks for them (a *_TMA flag) and every tensor allows them, else the
    tensors themselves (the kernel's pointer path: the same values)."""
    tensors = [t for t, _ in tensors_and_boxes]
    if not (plan_flag and _tma_fits(*tensors)):
        return (*tensors, False)
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (*(TensorDescriptor.from_tensor(t, list(box)) for t, box in tensors_and_boxes), True)


def _kv_operands(plan_flag: bool, k: torch.Tensor, v: torch.Tensor, block_n: int, d_qk_pad: int,
                 d_v_pad: int) -> tuple:
    """(k, v, the kernel's *_TMA argument) as a forward kernel with a
    descriptor path takes them: [1, block_n, 1, D padded] boxes of [B, T,
    HKV, D] (_descriptor_operands)."""
    return _descriptor_operands(plan_flag, (k, (1, block_n, 1, d_qk_pad)), (v, (1, block_n, 1, d_v_pad)))


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
        # (kernel, input dtype) -> the pipeline stages that fit in shared
        # memory where the plan's did not (see _launch_fitting)
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
                 v_swa=None, indices=None, scale=None, return_indices=False):
        p = self.pattern
        gates = {Branch.CMP: g_cmp, Branch.SLC: g_slc, Branch.SWA: g_swa}
        shapes, scale = self._checked(q, k, v, gates, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa,
                                      indices=indices, scale=scale)
        if return_indices and p.select is None:
            raise ValueError(f"return_indices: pattern {p.name!r} has no select branch, so there are no indices")
        if indices is not None:
            _check_index_range(indices, p.select.block, shapes.length)
        tensors = (q, k, v, g_cmp, g_slc, g_swa, k_cmp, v_cmp, k_swa, v_swa)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            o, idx = _NSAFunction.apply(self, shapes, scale, indices, *tensors)
        else:  # nothing to differentiate: no autograd record, and the output may be written fused
            out = self.forward(q, k, v, _contiguous_gates(gates),
                               k_cmp=k_cmp, v_cmp=v_cmp, k_swa=k_swa, v_swa=v_swa, indices=indices, scale=scale,
                               shapes=shapes, final=True)
            o, idx = out["o"], out.get("indices")
        if return_indices:
            return o, idx
        return o

    def _checked(self, q, k, v, gates: dict, *, scale, **tensors) -> tuple:
        """(shapes, scale) of a call's inputs once they are valid for the
        pattern (validate_inputs) and the device can run the kernels; the
        scale defaults to 1/sqrt(Dqk)."""
        shapes = validate_inputs(self.pattern, q, k, v, gates, scale=scale, **tensors)
        problem = device_problem(q)
        if problem is not None:
            raise RuntimeError(f"nsa_dsl: {problem}")
        return shapes, float(scale) if scale is not None else 1.0 / math.sqrt(self.pattern.dims.qk)

    def select_blocks(self, q, k, v, *, k_cmp=None, v_cmp=None, scale=None) -> torch.Tensor:
        """The selection branch's block indices for q, k and v, [B, T, HKV,
        top] int32 (ascending, -1 padded): the blocks a call on the same
        inputs attends, without computing any attention output. Only the
        compression, its statistics and the top-n scoring run. For looking
        at what the scoring chooses, or for handing the same indices to
        later calls (indices=...). No gradient flows through them."""
        p = self.pattern
        if p.select is None:
            raise ValueError(f"select_blocks: pattern {p.name!r} has no select branch, so there are no indices")
        shapes, scale = self._checked(q, k, v, {}, k_cmp=k_cmp, v_cmp=v_cmp, scale=scale)
        with torch.no_grad():
            out = self.forward(q, k, v, {}, k_cmp=k_cmp, v_cmp=v_cmp, k_swa=None, v_swa=None, indices=None,
                               scale=scale, shapes=shapes, indices_only=True)
        return out["indices"]

    def _launch_fitting(self, name: str, grid, args: tuple, *, dtype, num_warps: int, num_stages: int,
                        **constexprs) -> None:
        """Launch a flash-style forward kernel, with fewer pipeline stages if
        the compiled kernel needs more shared memory than the device has
        (float32 inputs, or a tuned record made for 16-bit ones: the plan
        sizes its tiles for 16-bit inputs). Each stage holds one K and one V
        tile, so fewer stages compute the same thing, less overlapped. The
        stages that fit are remembered per kernel and dtype; a kernel that
        does not fit on one stage is a ValueError naming the tiles to lower."""
        from triton.runtime.errors import OutOfResources

        key = (name, dtype)
        stages = self.fitted_stages.get(key, num_stages)
        while True:
            try:
                getattr(self.module, name)[grid](*args, **constexprs, num_warps=num_warps, num_stages=stages)
                return
            except OutOfResources as exc:
                if stages <= 1:
                    raise ValueError(f"{name} does not fit in this device's shared memory with {dtype} inputs even on"
                                     f" one pipeline stage ({exc}); lower its BLOCK_M / BLOCK_N with"
                                     f" compile(..., overrides={{...}})") from exc
                stages -= 1
                self.fitted_stages[key] = stages

    def _alloc(self, shape, dtype, device) -> torch.Tensor:
        if not self.poison:
            return torch.empty(shape, dtype=dtype, device=device)
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)

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
        plan, m = self.plan, self.module
        p = self.pattern
        B, T, Tc = shapes.batch, shapes.length, shapes.compressed
        HQ, HKV, DV = p.heads.q, p.heads.kv, p.dims.v
        dev = q.device
        qk_scale_log2 = scale * LOG2E
        out = {}

        if p.compress is not None:
            if plan.has("cmp_pool"):
                k_cmp = self._alloc((B, Tc, HKV, p.dims.qk), q.dtype, dev)
                v_cmp = self._alloc((B, Tc, HKV, DV), q.dtype, dev)
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
            o_cmp = self._alloc((B, T, HQ, DV), q.dtype, dev) if write_o else None
            lse_cmp = self._alloc((B, HQ, T), torch.float32, dev)
            o_arg = o_cmp if write_o else lse_cmp  # unused pointer when the output is not needed
            o_strides = _strides(o_cmp) if write_o else (0, 0, 0, 0)
            grid = (_cdiv(T, kp.const("CMP_BLOCK_M")), B * HQ)
            k_arg, v_arg, cmp_tma = _kv_operands(kp.const("CMP_TMA"), k_cmp, v_cmp, kp.const("CMP_BLOCK_N"),
                                                 plan.qk_pad, plan.v_pad)
            self._launch_fitting("cmp_fwd", grid, (q, k_arg, v_arg, o_arg, lse_cmp, T, Tc, qk_scale_log2,
                                                   *_strides(q), *_strides(k_cmp), *_strides(v_cmp), *o_strides),
                                 CMP_TMA=cmp_tma, dtype=q.dtype, num_warps=kp.num_warps, num_stages=kp.num_stages)
            out["o_cmp"], out["lse_cmp"] = o_cmp, lse_cmp

        if p.select is not None:
            top = p.select.top
            own_indices = indices is None  # scored here: every visible forced block is in them
            if indices is None:
                kp = plan.kernel("slc_topk")
                indices = self._alloc((B, T, HKV, top), torch.int32, dev)
                if plan.static_selection:
                    grid = (_cdiv(T, kp.const("TOPK_BLOCK_M")), B * HKV)
                    m.slc_topk_static[grid](indices, T, *_strides(indices), num_warps=kp.num_warps,
                                            num_stages=kp.num_stages)
                else:  # tiles of TOPK_TOKENS positions x the group's heads
                    grid = (_cdiv(T, kp.const("TOPK_TOKENS")), B * HKV)
                    k_arg, topk_tma = _descriptor_operands(kp.const("TOPK_TMA"), (
                        out["k_cmp"], (1, kp.const("TOPK_CHUNK_TOKENS"), 1, plan.qk_pad)))
                    m.slc_topk[grid](q, k_arg, out["lse_cmp"], indices, T, Tc, qk_scale_log2,
                                     *_strides(q), *_strides(out["k_cmp"]), *_strides(indices),
                                     TOPK_TMA=topk_tma,
                                     TOPK_KEY32=_int32_keys(kp.const("TOPK_KEY32"), q.dtype,
                                                            num_blocks(T, p.select.block)),
                                     num_warps=kp.num_warps, num_stages=kp.num_stages)
            out["indices"] = indices
            if indices_only:
                return out
            write_final = final and self.writes_final_output(T)
            if self.slc_fwd_at(T) == "block-centric":
                fold = plan.window_in_block_centric
                if write_final and p.window is not None and not fold:  # the reduction reads o_swa
                    self._window_forward(q, k, v, k_swa, v_swa, out, qk_scale_log2, shapes)
                window = None
                if fold:  # the reduction computes the window (into out unless write_final)
                    window = (k_swa, v_swa) if k_swa is not None else (k, v)
                o_slc, lse_slc, o = self._selection_block_centric(q, k, v, indices, qk_scale_log2, shapes,
                                                                  out if write_final else None, gates,
                                                                  window=window, window_out=out,
                                                                  forced=own_indices and plan.forced_in_merge,
                                                                  distinct=own_indices)
                if write_final:
                    out["o"] = o
            else:
                kp = plan.kernel("slc_fwd")
                # With write_final the branch output and statistics pointers
                # are never written: o_slc then points at the final output.
                o_slc = self._alloc((B, T, HQ, DV), q.dtype, dev)
                lse_slc = self._alloc((B, HQ, T), torch.float32, dev) if not write_final else None
                window_args, window_tma = (), False
                if kp.has_const("SLC_FWD_WINDOW"):  # the pattern has a window: slc_fwd takes its tensors
                    if plan.window_in_selection:  # ... and computes it, reading k and v as swa_fwd would
                        kw, vw = (k_swa, v_swa) if k_swa is not None else (k, v)
                        kw_arg, vw_arg, window_tma = self._window_operands(kw, vw)
                        o_swa = self._alloc((B, T, HQ, DV), q.dtype, dev) if not write_final else o_slc
                        lse_swa = self._alloc((B, HQ, T), torch.float32, dev) if not write_final else o_slc
                        if not write_final:
                            out["o_swa"], out["lse_swa"] = o_swa, lse_swa
                        window_args = (kw_arg, vw_arg, o_swa, lse_swa, *_strides(kw), *_strides(vw),
                                       *_strides(o_swa))
                    else:  # unused pointers
                        window_args = (k, v, o_slc, o_slc, *_strides(k), *_strides(v), *_strides(o_slc))
                o_cmp = out.get("o_cmp")
                gate_ptrs, has_gates = _gate_args(gates, o_slc)
                k_arg, v_arg, slc_tma = _kv_operands(kp.const("SLC_TMA"), k, v, p.select.block, plan.qk_pad,
                                                     plan.v_pad)
                m.slc_fwd[(_cdiv(T, kp.const("SLC_TOKENS")), B * HKV)](
                    q, k_arg, v_arg, indices, o_slc, lse_slc if lse_slc is not None else o_slc, T, qk_scale_log2,
                    *_strides(q), *_strides(k), *_strides(v), *_strides(indices), *_strides(o_slc), *window_args,
                    o_slc, o_cmp if o_cmp is not None else o_slc, *gate_ptrs, WRITE_FINAL=write_final, **has_gates,
                    SLC_TMA=slc_tma, SWA_TMA=window_tma, num_warps=kp.num_warps, num_stages=kp.num_stages)
                if write_final:
                    out["o"] = o_slc
                    o_slc = None
            out["o_slc"], out["lse_slc"] = o_slc, lse_slc

        if p.window is not None and "o_swa" not in out and "o" not in out:  # not folded into slc_fwd
            self._window_forward(q, k, v, k_swa, v_swa, out, qk_scale_log2, shapes)

        if "o" not in out:  # the selection did not write it (WRITE_FINAL)
            out["o"] = self._combine(out, gates, B * T * HQ, q)
        return out

    def _window_forward(self, q, k, v, k_swa, v_swa, out: dict, qk_scale_log2: float, shapes) -> None:
        """swa_fwd: the window branch's o_swa and lse_swa into out."""
        p = self.pattern
        B, T = shapes.batch, shapes.length
        kw, vw = (k_swa, v_swa) if k_swa is not None else (k, v)
        kp = self.plan.kernel("swa_fwd")
        o_swa = self._alloc((B, T, p.heads.q, p.dims.v), q.dtype, q.device)
        lse_swa = self._alloc((B, p.heads.q, T), torch.float32, q.device)
        grid = (_cdiv(T, kp.const("SWA_BLOCK_M")), B * p.heads.q)
        k_arg, v_arg, swa_tma = self._window_operands(kw, vw)
        self._launch_fitting("swa_fwd", grid, (q, k_arg, v_arg, o_swa, lse_swa, T, T, qk_scale_log2,
                                               *_strides(q), *_strides(kw), *_strides(vw), *_strides(o_swa)),
                             SWA_TMA=swa_tma, dtype=q.dtype, num_warps=kp.num_warps, num_stages=kp.num_stages)
        out["o_swa"], out["lse_swa"] = o_swa, lse_swa

    def _window_operands(self, kw: torch.Tensor, vw: torch.Tensor) -> tuple:
        """(k, v, SWA_TMA) of the window branch wherever it is computed
        (swa_fwd, or folded into a selection kernel): swa_fwd's key tile and
        the plan's SWA_TMA decide (_kv_operands)."""
        swa = self.plan.kernel("swa_fwd")
        return _kv_operands(swa.const("SWA_TMA"), kw, vw, swa.const("SWA_BLOCK_N"), self.plan.qk_pad,
                            self.plan.v_pad)

    def _selection_block_centric(self, q, k, v, indices, qk_scale_log2: float, shapes, final_from: Optional[dict],
                                 gates: dict, window: Optional[tuple] = None, window_out: Optional[dict] = None,
                                 forced: bool = False, distinct: bool = False) -> tuple:
        """slc_fwd_bc and its slot reduction around the inverted index, slice
        by slice of BC_SLICE positions: (o_slc, lse_slc, None) exactly as
        the group-centric kernel leaves them (lse in log2 units, +inf and a
        zero output for a position that sees no selected key). final_from
        (the forward's outputs so far: o_cmp, o_swa): the reduction writes
        the gated output instead, (None, None, o). window (the window
        branch's keys and values, BC_FOLD_WINDOW): the reduction is
        slc_fwd_bc_merge_window, which computes the window branch too, into
        window_out["o_swa"], ["lse_swa"] (with final_from, only into o).
        forced (with window; indices that hold every visible forced block):
        the merge attends the forced blocks, slc_fwd_bc only the others.
        distinct: no index row repeats a block (the plan's own scoring)."""
        p, m = self.pattern, self.module
        kp = self.plan.kernel("slc_fwd_bc")
        B, T = shapes.batch, shapes.length
        HQ, HKV, G, DV, top = p.heads.q, p.heads.kv, p.group, p.dims.v, p.select.top
        dev = q.device
        n_blocks = num_blocks(T, p.select.block)
        write_final = final_from is not None
        o = self._alloc((B, T, HQ, DV), q.dtype, dev)
        lse = self._alloc((B, HQ, T), torch.float32, dev) if not write_final else o  # o: an unused pointer
        if T == 0:
            return (None, None, o) if write_final else (o, lse, None)
        # the gated sum's other branches and gates (unused pointers are o)
        others = [final_from.get(n) if write_final and final_from.get(n) is not None else o for n in ("o_cmp", "o_swa")]
        gate_ptrs, has_gates = _gate_args(gates, o)
        TS = min(T, max(1, kp.const("BC_SLICE") // B))  # BC_SLICE (batch element, position) pairs a slice
        if window is not None and TS < T:
            # the merge's tiles of BC_WINDOW_TOKENS positions never straddle slices
            tokens = kp.const("BC_WINDOW_TOKENS")
            TS = max(tokens, TS - TS % tokens)
        n_slices = _cdiv(T, TS)
        if forced and window is None:
            raise ValueError("forced blocks in the merge need the window folded into it (BC_FOLD_WINDOW)")
        offsets, positions, slots = block_to_positions(
            indices, p.select.block, n_blocks, with_slots=True, slice_len=TS,
            skip_forced=(p.select.initial, p.select.local) if forced else None, distinct=distinct,
            keys_fn=self._index_keys)
        chunks = chunk_table(offsets, kp.const("BC_CHUNK"), n_slices, B * TS * HKV * top)
        k_sel, v_sel, slc_tma = _kv_operands(kp.const("SLC_TMA"), k, v, p.select.block, self.plan.qk_pad,
                                             self.plan.v_pad)
        # Per-slot partials of one slice, reused by the next: the outputs in
        # the input dtype (normalised over one block, so bounded by |v|), the
        # log2-sum-exp in float32, -inf for a slot a position did not use.
        part_o = self._alloc((B, TS, HKV, top, G, DV), q.dtype, dev)
        part_lse = torch.empty((B, TS, HKV, top, G), dtype=torch.float32, device=dev)
        reduce_rows = kp.const("BC_REDUCE_ROWS")
        if window is not None:
            kw, vw = window
            if write_final:
                o_swa = lse_swa = o  # unused pointers
            else:
                o_swa = self._alloc((B, T, HQ, DV), q.dtype, dev)
                lse_swa = self._alloc((B, HQ, T), torch.float32, dev)
                window_out["o_swa"], window_out["lse_swa"] = o_swa, lse_swa
            tokens = kp.const("BC_WINDOW_TOKENS")
            o_cmp = final_from.get("o_cmp") if write_final else None
            kw_arg, vw_arg, window_tma = self._window_operands(kw, vw)
            k_forced, v_forced, forced_tma = _kv_operands(forced and kp.const("BC_FORCED_TMA"), k, v, p.select.block,
                                                          self.plan.qk_pad, self.plan.v_pad)
            # the local blocks' keys scored once for the window and the
            # forced blocks: only where the window reads these very k and v
            # and the merge computes it (not for a combined output without it)
            local_in_window = (forced and self.plan.local_in_window and kw is k and vw is v
                               and (not write_final or self.plan.kernel("combine").const("COMBINE_SWA")))
        for i, t0 in enumerate(range(0, T, TS)):
            part_lse.fill_(float("-inf"))
            m.slc_fwd_bc[(chunks["grid"],)](q, k_sel, v_sel, chunks["slice_first"], chunks["segment"],
                                           chunks["start"], chunks["end"], positions, slots, part_o, part_lse,
                                           T, t0, TS, i, i * B * HKV * n_blocks, n_blocks, qk_scale_log2,
                                           *_strides(q), *_strides(k), *_strides(v), SLC_TMA=slc_tma,
                                           num_warps=kp.num_warps, num_stages=kp.num_stages)
            if window is not None:
                m.slc_fwd_bc_merge_window[(_cdiv(min(TS, T - t0), tokens), B * HKV)](
                    q, k_forced, v_forced, kw_arg, vw_arg, part_o, part_lse, o, lse, o_swa, lse_swa, T, t0, TS,
                    qk_scale_log2,
                    *_strides(q), *_strides(k), *_strides(v), *_strides(kw), *_strides(vw), *_strides(o),
                    *_strides(o_swa), o, o_cmp if o_cmp is not None else o, *gate_ptrs,
                    WRITE_FINAL=write_final, BC_MERGE_FORCED=forced, **has_gates, SWA_TMA=window_tma,
                    BC_FORCED_TMA=forced_tma, BC_LOCAL_IN_WINDOW=local_in_window,
                    num_warps=kp.warps_for("slc_fwd_bc_merge_window"), num_stages=kp.const("BC_REDUCE_STAGES"))
                continue
            n_rows = B * TS * HQ
            m.slc_fwd_bc_reduce[(_cdiv(n_rows, reduce_rows),)](
                part_o, part_lse, o, lse, T, t0, TS, min(TS, T - t0), n_rows, *_strides(o), o, *others, *gate_ptrs,
                WRITE_FINAL=write_final, **has_gates, num_warps=4, num_stages=kp.const("BC_REDUCE_STAGES"))
        return (None, None, o) if write_final else (o, lse, None)

    def _index_keys(self, indices: torch.Tensor, slice_len: int, n_blocks: int, n_segments: int,
                    skip_forced: Optional[tuple], distinct: bool) -> torch.Tensor:
        """block_to_positions' sort keys from slc_index_keys (int32, one
        pass over the indices)."""
        kp = self.plan.kernel("slc_fwd_bc")
        B, T, HKV, top = indices.shape
        if skip_forced is not None and tuple(skip_forced) != (kp.const("INITIAL"), kp.const("LOCAL")):
            raise ValueError(f"forced blocks {skip_forced}: the plan's are"
                             f" {(kp.const('INITIAL'), kp.const('LOCAL'))}")  # pragma: no cover - ops passes its own
        keys = torch.empty((B, T, HKV, top), dtype=torch.int32, device=indices.device)
        n_rows = B * T * HKV
        if n_rows:
            self.module.slc_index_keys[(_cdiv(n_rows, kp.const("INDEX_ROWS")),)](
                indices, keys, T, slice_len, n_blocks, n_segments, n_rows, B, *_strides(indices),
                SKIP_FORCED=skip_forced is not None, DISTINCT=distinct, num_warps=4, num_stages=1)
        return keys

    def _combine(self, out: dict, gates: dict, n_rows: int, like: torch.Tensor) -> torch.Tensor:
        kp = self.plan.kernel("combine")
        o = self._alloc((*like.shape[:3], self.pattern.dims.v), like.dtype, like.device)
        branch_out = {b: out.get(f"o_{b.value}") for b in _GATED}
        # Unused pointers are never read (their COMBINE_* constant is False);
        # pass o so every pointer argument is a real tensor. Gates arrive
        # contiguous (forward's contract).
        ptrs = [branch_out[b] if branch_out[b] is not None else o for b in _GATED]
        gate_ptrs, has_gates = _gate_args(gates, o)
        for t in ptrs:
            if t is not o and not t.is_contiguous():  # pragma: no cover - branch outputs are allocated contiguous
                raise AssertionError("branch outputs must be contiguous")
        grid = (_cdiv(n_rows, kp.const("COMBINE_ROWS")),)
        self.module.combine[grid](o, *ptrs, *gate_ptrs, n_rows, **has_gates,
                                  num_warps=kp.num_warps, num_stages=kp.num_stages)
        return o

    # ------------------------------------------------------------ backward
    def backward(self, saved: dict, do: torch.Tensor, shapes, scale: float, needs: dict,
                 indices_distinct: bool = False) -> dict:
        """Gradients of every differentiable input from dO, recomputing the
        attention probabilities from the saved statistics. Returns a dict of
        float32 or input-dtype gradients by argument name (None where not
        needed). indices_distinct: the saved indices came from the plan's own
        scoring (no row repeats a block)."""
        plan, m, p = self.plan, self.module, self.pattern
        B, T, Tc = shapes.batch, shapes.length, shapes.compressed
        HQ, HKV, DQK, DV = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v
        q, k, v = saved["q"], saved["k"], saved["v"]
        dev = q.device
        qk_scale_log2 = scale * LOG2E
        combined = p.combined_branches
        do = do.contiguous()
        n_rows = B * T * HQ
        f32 = torch.float32
        dq = torch.zeros((B, T, HQ, DQK), dtype=f32, device=dev)
        dk = torch.zeros((B, T, HKV, DQK), dtype=f32, device=dev)
        dv = torch.zeros((B, T, HKV, DV), dtype=f32, device=dev)
        separate_swa = saved.get("k_swa") is not None
        if separate_swa:
            dk_swa = torch.zeros_like(dk)
            dv_swa = torch.zeros_like(dv)

        gates = {b: saved.get(f"g_{b.value}") for b in _GATED}
        dg = torch.zeros((3, n_rows), dtype=f32, device=dev)
        delta = torch.zeros((3, B, HQ, T), dtype=f32, device=dev)
        kp = plan.kernel("bwd_prep")
        outs = [saved.get(f"o_{b.value}") if b in combined else None for b in _GATED]
        gate_ptrs, has_gates = _gate_args(gates, do)
        m.bwd_prep[(_cdiv(n_rows, kp.const("COMBINE_ROWS")),)](
            do, *[o if o is not None else do for o in outs], *gate_ptrs,
            dg, delta, n_rows, T, **has_gates, num_warps=kp.num_warps, num_stages=kp.num_stages)

        def flash(branch: str, keys, values, dk_out, dv_out, n_keys, stat_lse, branch_delta, gate):
            kp = plan.kernel(f"{branch}_bwd")
            prefix = branch.upper()
            bm = kp.const(f"{prefix}_BWD_BLOCK_M")
            split = kp.const(f"{prefix}_BWD_SPLIT_HEADS")
            common = (T, n_keys, qk_scale_log2, scale, *_strides(q), *_strides(keys), *_strides(values),
                      *_strides(do))
            g_arg = gate if gate is not None else do
            getattr(m, f"{branch}_bwd_dq")[(_cdiv(T, bm), B * HQ)](
                q, keys, values, do, g_arg, stat_lse, branch_delta, dq, *common,
                HAS_GATE=gate is not None, num_warps=kp.num_warps, num_stages=kp.num_stages)
            if n_keys == 0:
                return
            if split:  # per-query-head shares, summed over each group here
                dk_part = torch.zeros((B, n_keys, HQ, DQK), dtype=f32, device=dev)
                dv_part = torch.zeros((B, n_keys, HQ, DV), dtype=f32, device=dev)
            else:
                dk_part, dv_part = dk_out, dv_out
            dkdv_bn = kp.const(f"{prefix}_BWD_DKDV_BLOCK_N")
            getattr(m, f"{branch}_bwd_dkdv")[(_cdiv(n_keys, dkdv_bn), B * (HQ if split else HKV))](
                q, keys, values, do, g_arg, stat_lse, branch_delta, dk_part, dv_part, *common,
                HAS_GATE=gate is not None, num_warps=kp.warps_for(f"{branch}_bwd_dkdv"), num_stages=kp.num_stages)
            if split:
                G = p.group
                dk_out += dk_part.view(B, n_keys, HKV, G, DQK).sum(3)
                dv_out += dv_part.view(B, n_keys, HKV, G, DV).sum(3)

        grads = {}
        if Branch.CMP in combined:
            k_cmp, v_cmp = saved["k_cmp"], saved["v_cmp"]
            dk_cmp = torch.zeros((B, Tc, HKV, DQK), dtype=f32, device=dev)
            dv_cmp = torch.zeros((B, Tc, HKV, DV), dtype=f32, device=dev)
            flash("cmp", k_cmp, v_cmp, dk_cmp, dv_cmp, Tc, saved["lse_cmp"], delta[0], gates[Branch.CMP])
            if plan.has("cmp_pool_bwd"):
                if Tc > 0:
                    kp = plan.kernel("cmp_pool_bwd")
                    grid = (_cdiv(T, kp.const("POOL_BWD_BLOCK_P")), B * HKV)
                    for src, dst, d in ((dk_cmp, dk, DQK), (dv_cmp, dv, DV)):
                        m.cmp_pool_bwd[grid](src, dst, T, Tc, D=d, D_PAD=1 << (d - 1).bit_length(),
                                             num_warps=kp.num_warps, num_stages=kp.num_stages)
            else:
                grads["k_cmp"], grads["v_cmp"] = dk_cmp, dv_cmp

        if Branch.SLC in combined:
            kp = plan.kernel("slc_bwd")
            indices = saved["indices"]
            atomic = self.slc_dkdv == "atomic"
            gate = gates[Branch.SLC]
            g_arg = gate if gate is not None else do
            m.slc_bwd_dq[(_cdiv(T, kp.const("SLC_BWD_DQ_TOKENS")), B * HKV)](
                q, k, v, do, g_arg, saved["lse_slc"], delta[1], indices, dq, dk, dv,
                T, qk_scale_log2, scale, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
                *_strides(indices), HAS_GATE=gate is not None, ATOMIC_DKV=atomic,
                num_warps=kp.num_warps, num_stages=kp.num_stages)
            if not atomic:
                n_blocks = num_blocks(T, p.select.block)
                offsets, positions = block_to_positions(indices, p.select.block, n_blocks,
                                                        distinct=indices_distinct, keys_fn=self._index_keys)
                # Sized for the most chunks the index can have, so nothing
                # is read back to the host (the exact count, read back to
                # size these, was the backward's one synchronisation);
                # programs past the index's last chunk return at once.
                chunks = chunk_table(offsets, kp.const("SLC_BWD_CHUNK"), 1, indices.numel())
                if T > 0:
                    part_k = torch.empty((chunks["grid"], p.select.block, DQK), dtype=f32, device=dev)
                    part_v = torch.empty((chunks["grid"], p.select.block, DV), dtype=f32, device=dev)
                    m.slc_bwd_dkdv[(chunks["grid"],)](
                        q, k, v, do, g_arg, saved["lse_slc"], delta[1], chunks["slice_first"], chunks["segment"],
                        chunks["start"], chunks["end"], positions, part_k, part_v,
                        T, n_blocks, qk_scale_log2, scale, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
                        HAS_GATE=gate is not None, num_warps=kp.num_warps, num_stages=kp.num_stages)
                    m.slc_bwd_reduce[(B * HKV * n_blocks,)](part_k, part_v, chunks["per_segment"], dk, dv,
                                                            T, n_blocks, num_warps=4, num_stages=1)

        if Branch.SWA in combined:
            if separate_swa:
                keys, values, dk_out, dv_out = saved["k_swa"], saved["v_swa"], dk_swa, dv_swa
            else:
                keys, values, dk_out, dv_out = k, v, dk, dv
            flash("swa", keys, values, dk_out, dv_out, T, saved["lse_swa"], delta[2], gates[Branch.SWA])

        grads["q"], grads["k"], grads["v"] = dq, dk, dv
        if separate_swa:
            grads["k_swa"], grads["v_swa"] = dk_swa, dv_swa
        for i, b in enumerate((Branch.CMP, Branch.SLC, Branch.SWA)):
            if gates[b] is not None:
                grads[f"g_{b.value}"] = dg[i].view(B, T, HQ)
        return grads


def block_to_positions(indices: torch.Tensor, block: int, n_blocks: int, *, with_slots: bool = False,
                       slice_len: Optional[int] = None, skip_forced: Optional[tuple] = None,
                       distinct: bool = False, keys_fn: Optional[Callable] = None) -> tuple:
    """The inverted selection index: for every (batch, KV head, block) the
    ascending positions whose selection holds that block, as CSR arrays
    (offsets [B*HKV*n_blocks + 1] int32, positions int32), and with
    with_slots=True the slot of the index row each entry came from (int32).
    Blocks past a position (which it cannot attend) are dropped, and a block
    repeated in a row counts once (its first slot). skip_forced = (initial,
    local): a position's forced blocks are dropped too (the block-centric
    merge attends them, BC_MERGE_FORCED). distinct=True: no row repeats a
    block (the plan's scoring writes each at most once), so the duplicate
    test is skipped (0.56 ms of paper128's 64k forward on the H200).
    keys_fn(indices, slice_len, n_blocks, n_segments, skip_forced, distinct)
    -> int32 keys: the sort keys from one kernel (slc_index_keys) instead
    of the torch steps below (where 32-bit keys fit).
    slice_len: the positions are cut into slices of that many, and every
    slice has its own segments, slice-major (offsets then has
    cdiv(T, slice_len) * B*HKV*n_blocks + 1 entries), so one index serves a
    kernel launched slice by slice.
    No host synchronisation: every index entry is sorted, the dropped ones
    under a key past the last segment, so positions and slots always hold
    B*T*HKV*top entries and those past offsets[-1] belong to no segment.
    Never T x blocks."""
    B, T, HKV, top = indices.shape
    dev = indices.device
    n_slices = 1 if slice_len is None else max(1, -(-T // slice_len))
    n_segments = n_slices * B * HKV * n_blocks
    # 32-bit keys where they fit: the global radix sort then makes half the
    # passes (and every elementwise step moves half the bytes)
    key_type = torch.int32 if n_segments < 2**31 - 1 else torch.int64
    if keys_fn is not None and key_type == torch.int32:
        segment = keys_fn(indices, slice_len or max(T, 1), n_blocks, n_segments, skip_forced, distinct)
    else:
        idx = indices.to(key_type)
        t = torch.arange(T, device=dev, dtype=key_type).view(1, T, 1, 1)
        usable = (idx >= 0) & (idx <= t // block)
        if not distinct:
            usable &= first_in_row(idx)
        if skip_forced is not None:
            initial, local = skip_forced
            usable &= (idx >= initial) & (idx <= t // block - local)
        slice_t = t // slice_len if slice_len is not None else 0
        b = torch.arange(B, device=dev, dtype=key_type).view(B, 1, 1, 1)
        h = torch.arange(HKV, device=dev, dtype=key_type).view(1, 1, HKV, 1)
        segment = torch.where(usable, ((slice_t * B + b) * HKV + h) * n_blocks + idx, n_segments)
    # stable: within a segment the entries keep their (position, slot) order
    ordered, order = torch.sort(segment.flatten(), stable=True)
    # each segment's first entry in the sorted keys (bincount would read the
    # largest key back to the host to size its output)
    offsets = torch.searchsorted(ordered, torch.arange(n_segments + 1, device=dev, dtype=key_type))
    positions = ((order // (HKV * top)) % T).to(torch.int32)
    if with_slots:
        return offsets.to(torch.int32), positions, (order % top).to(torch.int32)
    return offsets.to(torch.int32), positions


def first_in_row(idx: torch.Tensor) -> torch.Tensor:
    """[..., top] -> bool, False where an earlier slot of the row holds the
    same block (a repeated block counts once, at its first slot): the same
    as reference.first_occurrence, by comparing every pair of slots. Its
    per-row sort took 1.48 ms of paper128's 64k forward on the H200 (torch's
    segmented radix sort over 4.2M int64), the pairwise test a few kernels
    over top x top booleans a row."""
    top = idx.shape[-1]
    earlier = torch.ones(top, top, dtype=torch.bool, device=idx.device).tril(-1)  # [slot, other]: other < slot
    return ~((idx.unsqueeze(-1) == idx.unsqueeze(-2)) & earlier).any(-1)


def chunk_table(offsets: torch.Tensor, chunk: int, n_slices: int, max_entries_per_slice: int) -> dict:
    """Every segment of the inverted index cut into chunks of at most
    `chunk` positions, without a host synchronisation, for a launch per
    slice of a slice-major index (n_slices 1: one launch): chunk c of the
    whole index is (segment, start, end) of arrays sized for the most
    chunks the index can have, and
    slice_first [n_slices + 1] says which chunks belong to slice i. A
    slice's launch takes `grid` programs (its most possible chunks); a
    program past slice_first[i + 1] has nothing to do. per_segment
    [n_segments + 1]: the chunks of segment s are per_segment[s] ..
    per_segment[s + 1] - 1 (CSR)."""
    n_segments = offsets.numel() - 1
    per_slice = n_segments // n_slices
    counts = (offsets[1:] - offsets[:-1]).long()
    per = (counts + chunk - 1) // chunk
    first = torch.zeros(n_segments + 1, dtype=torch.int64, device=offsets.device)
    first[1:] = torch.cumsum(per, 0)  # chunks before each segment
    grid = -(-max_entries_per_slice // chunk) + per_slice  # ceil per segment adds at most one each
    n_max = n_slices * grid
    c = torch.arange(n_max, device=offsets.device)
    segment = (torch.searchsorted(first[1:], c, right=True)).clamp(max=n_segments - 1)
    start = offsets[segment].long() + (c - first[segment]) * chunk
    end = torch.minimum(start + chunk, offsets[segment + 1].long())
    return {"segment": segment.to(torch.int32), "start": start.to(torch.int32), "end": end.to(torch.int32),
            "slice_first": first[::per_slice].to(torch.int32), "per_segment": first.to(torch.int32), "grid": grid}


_GRAD_ORDER = ("q", "k", "v", "g_cmp", "g_slc", "g_swa", "k_cmp", "v_cmp", "k_swa", "v_swa")


class _NSAFunction(torch.autograd.Function):
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
