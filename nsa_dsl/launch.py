"""What every launcher shares: the kernels' argument conventions (strides,
gates, the scoring's int32 keys, tensor descriptors where the copy engine
can read the tensors), a launch that lowers its pipeline stages until the
kernel fits in shared memory, and the inverted index's sort keys from one
kernel (index_keys, for the selection forward and backward alike)."""
from __future__ import annotations

from contextvars import ContextVar
from typing import Optional

import torch

from .ir import Branch
from .varlen import KEY_ONLY_KERNELS, PACKED_KERNELS, SHIFTED_KERNELS

LOG2E = 1.4426950408889634
# True while a CompiledPattern runs its Python without launching anything
# (CompiledPattern.layout_only: the custom ops' fake implementations): the
# tensors stand in for descriptors, whose making reads their addresses
LAYOUT_ONLY: ContextVar = ContextVar("nsa_dsl_layout_only", default=False)


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


def _int32_keys(dtype: torch.dtype, n_blocks: int) -> bool:
    """Whether the scoring's sorted merge runs on int32 keys (TOPK_KEY32):
    16-bit inputs and at most 2^KEY32_MAX_BLOCK_BITS blocks."""
    return dtype != torch.float32 and (n_blocks - 1).bit_length() <= KEY32_MAX_BLOCK_BITS


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
    if LAYOUT_ONLY.get() or not (plan_flag and _tma_fits(*tensors)):
        return (*tensors, False)
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (*(TensorDescriptor.from_tensor(t, list(box)) for t, box in tensors_and_boxes), True)


def _kv_operands(plan_flag: bool, k: torch.Tensor, v: torch.Tensor, block_n: int, d_qk_pad: int,
                 d_v_pad: int) -> tuple:
    """(k, v, the kernel's *_TMA argument) as a forward kernel with a
    descriptor path takes them: [1, block_n, 1, D padded] boxes of [B, T,
    HKV, D] (_descriptor_operands)."""
    return _descriptor_operands(plan_flag, (k, (1, block_n, 1, d_qk_pad)), (v, (1, block_n, 1, d_v_pad)))


def _launch_fitting(compiled, name: str, grid, args: tuple, *, dtype, num_warps: int, num_stages: int,
                    **constexprs) -> None:
    """Launch a flash-style kernel of compiled.module (the forwards, the
    backward's dq), with fewer
    pipeline stages if the compiled kernel needs more shared memory than the
    device has (float32 inputs, or a tuned record made for 16-bit ones: the
    plan sizes its tiles for 16-bit inputs). Each stage holds one K and one V
    tile, so fewer stages compute the same thing, less overlapped. The
    stages that fit are remembered per kernel and dtype (in
    compiled.fitted_stages); a kernel that does not fit on one stage is a
    ValueError naming the tiles to lower."""
    from triton.runtime.errors import OutOfResources

    key = (name, dtype)
    stages = compiled.fitted_stages.get(key, num_stages)
    while True:
        try:
            getattr(compiled.module, name)[grid](*args, **constexprs, num_warps=num_warps, num_stages=stages)
            return
        except OutOfResources as exc:
            if stages <= 1:
                raise ValueError(f"{name} does not fit in this device's shared memory with {dtype} inputs even on"
                                 f" one pipeline stage ({exc}); lower its BLOCK_M / BLOCK_N with"
                                 f" compile(..., overrides={{...}})") from exc
            stages -= 1
            compiled.fitted_stages[key] = stages


def index_keys(compiled, indices: torch.Tensor, slice_len: int, n_blocks: int, n_segments: int,
               skip_forced: Optional[tuple], distinct: bool) -> torch.Tensor:
    """block_to_positions' sort keys from slc_index_keys (int32, one
    pass over the indices): its keys_fn, as partial(index_keys, compiled)."""
    kp = compiled.plan.kernel("slc_fwd_bc")
    B, T, HKV, top = indices.shape
    if skip_forced is not None and tuple(skip_forced) != (kp.const("INITIAL"), kp.const("LOCAL")):
        raise ValueError(f"forced blocks {skip_forced}: the plan's are"
                         f" {(kp.const('INITIAL'), kp.const('LOCAL'))}")  # pragma: no cover - callers pass the plan's
    keys = torch.empty((B, T, HKV, top), dtype=torch.int32, device=indices.device)
    n_rows = B * T * HKV
    if n_rows:
        compiled.module.slc_index_keys[(_cdiv(n_rows, kp.const("INDEX_ROWS")),)](
            indices, keys, T, slice_len, n_blocks, n_segments, n_rows, B, *_strides(indices),
            SKIP_FORCED=skip_forced is not None, DISTINCT=distinct, num_warps=4, num_stages=1)
    return keys


_UNUSED_OFFSETS = {}


def packed_operands(shapes, device, kernel: str) -> dict:
    """The packed-sequence arguments of plan kernel `kernel` by name: VARLEN,
    and the int32 offsets of each sequence's positions (cu_seqlens) and
    compressed tokens (cu_compressed); for a fixed-length call VARLEN=False
    and one placeholder the kernel never reads. NotImplementedError for a
    packed call of a kernel that does not take one yet."""
    packing = shapes.packing
    if packing is None:
        unused = _UNUSED_OFFSETS.get(device)
        if LAYOUT_ONLY.get():  # (a fake tensor kept here would reach a real launch)
            unused = torch.zeros(1, dtype=torch.int32, device=device)
        elif unused is None:  # one per device: a fixed-length call allocates nothing for it
            unused = _UNUSED_OFFSETS.setdefault(device, torch.zeros(1, dtype=torch.int32, device=device))
        operands = {"cu_seqlens": unused, "cu_compressed": unused, "VARLEN": False}
        if kernel in SHIFTED_KERNELS:
            operands["cu_queries"] = unused
        return operands
    if kernel not in PACKED_KERNELS:
        raise NotImplementedError(f"cu_seqlens: the {kernel} kernel does not take packed sequences yet")
    if packing.shifted and kernel not in SHIFTED_KERNELS | KEY_ONLY_KERNELS:
        raise NotImplementedError(f"queries of the last positions only (cu_seqlens_q, or q shorter than k): the"
                                  f" {kernel} kernel does not take them yet")
    cu_c = packing.cu_compressed if packing.cu_compressed is not None else packing.cu_seqlens
    operands = {"cu_seqlens": packing.cu_seqlens, "cu_compressed": cu_c, "VARLEN": True}
    if kernel in SHIFTED_KERNELS:
        operands["cu_queries"] = packing.cu_queries if packing.shifted else packing.cu_seqlens
    return operands
