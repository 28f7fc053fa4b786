"""Input validation for compiled patterns: every check happens before any
kernel launch, and every failure is a ValueError that names the argument,
what was expected and what came."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .geometry import compressed_length
from .ir import Branch, DType, Pattern
from .varlen import Packing

TORCH_DTYPES = {DType.BF16: torch.bfloat16, DType.FP16: torch.float16, DType.FP32: torch.float32}
_DTYPE_NAMES = {v: k.value for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class Shapes:
    """A call's sizes. Packed sequences (cu_seqlens) are one batch of
    `length` = total positions and `compressed` = the packed compressed
    tokens' buffer; `packing` then says where each sequence is, and the
    grids run over grid_batch sequences of at most grid_length positions.
    A packing with cu_queries has fewer query rows (`length`, q's) than
    key rows (`key_length`, k's and v's)."""
    batch: int
    length: int
    compressed: int  # Tc, 0 without a compress branch
    packing: Optional[Packing] = None
    key_length: int = -1  # k's rows where they differ from q's (a shifted packing), else length

    @property
    def keys(self) -> int:
        """Rows of k and v (and of their gradients)."""
        return self.length if self.key_length < 0 else self.key_length

    @property
    def grid_batch(self) -> int:
        return self.batch if self.packing is None else self.packing.sequences

    @property
    def grid_length(self) -> int:
        return self.length if self.packing is None else self.packing.max_length

    @property
    def grid_compressed(self) -> int:
        return self.compressed if self.packing is None else self.packing.max_compressed

    def query_tiles(self, tile: int) -> int:
        """Programs along the positions of a grid over tiles of `tile`
        query positions (Packing.query_tiles)."""
        return -(-self.length // tile) if self.packing is None else self.packing.query_tiles(tile)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _expect_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _expect_shape(name: str, t: torch.Tensor, expected: tuple, meaning: str, why=None) -> None:
    """`why()`: how the expected sizes were derived, added where the first
    two (B and T, or Tc, all following from q) are what differs, so the
    caller sees which tensor set them. A function, called only for the
    message: formatting a size into text fixes it (torch.compile would
    specialise every call to that length)."""
    if t.dim() != len(expected):
        raise ValueError(f"{name}: expected a {len(expected)}-d tensor {meaning} = {list(expected)},"
                         f" got a {t.dim()}-d tensor of shape {_shape(t)}")
    if tuple(t.shape) != tuple(expected):
        note = f" ({why()})" if why is not None and tuple(t.shape[:2]) != tuple(expected[:2]) else ""
        raise ValueError(f"{name}: expected shape {meaning} = {list(expected)}{note}, got {_shape(t)}")


def _sdpa_layout(p: Pattern, tensors: dict) -> tuple:
    """(the first swapped name, the names to transpose, B, T) when q, k, v
    look like [B, H, T, D] (the layout of torch's scaled_dot_product_attention
    and FlexAttention): each is 4-d with its head dim last, and either dim 1
    is its head count while dim 2 is not (swapped) or dim 2 is (the
    [B, T, H, D] nsa_dsl takes), with one B and one T across the three, and
    at least one swapped. A tensor whose dims 1 and 2 both equal its head
    count (T = H) fits either; it is named too, since q, k and v are almost
    always built the same way. () when the shapes say nothing of the kind."""
    heads = {"q": (p.heads.q, p.dims.qk), "k": (p.heads.kv, p.dims.qk), "v": (p.heads.kv, p.dims.v)}
    # lists, not sets: under torch.compile the sizes may be symbolic (unhashable)
    swapped, either, batches, lengths = [], [], [], []
    for name, t in tensors.items():
        h, d = heads[name]
        if t.dim() != 4 or t.shape[3] != d:
            return ()
        if t.shape[1] == h and t.shape[2] == h:
            either.append(name)
            lengths.append(h)
        elif t.shape[1] == h:
            swapped.append(name)
            lengths.append(t.shape[2])
        elif t.shape[2] == h:
            lengths.append(t.shape[1])
        else:
            return ()
        batches.append(t.shape[0])
    if not swapped or any(b != batches[0] for b in batches) or any(n != lengths[0] for n in lengths):
        return ()
    names = tuple(n for n in tensors if n in swapped or n in either)
    return swapped[0], names, batches[0], lengths[0]


def validate_inputs(pattern: Pattern, q, k, v, gates: dict, *, k_cmp=None, v_cmp=None, k_swa=None,
                    v_swa=None, indices=None, scale=None, packing: Optional[Packing] = None,
                    compressed: Optional[int] = None) -> Shapes:
    """Shapes of valid inputs, else a ValueError naming the argument.
    Packed sequences come here as one batch of all positions with their
    `packing` and the packed compressed tokens' count `compressed`."""
    p = pattern
    q = _expect_tensor("q", q)
    k = _expect_tensor("k", k)
    v = _expect_tensor("v", v)
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-d tensor [B, T, HQ={p.heads.q}, Dqk={p.dims.qk}], got shape {_shape(q)}")
    hq, hkv, dqk, dv = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v
    sdpa = _sdpa_layout(p, {"q": q, "k": k, "v": v})
    if sdpa:
        # Read with T from dim 1, such inputs would be reported against a
        # length that is really the head count; say what they look like.
        name, names, batch, length = sdpa
        t, h, d, meaning = {"q": (q, hq, dqk, "[B, T, HQ, Dqk]"), "k": (k, hkv, dqk, "[B, T, HKV, Dqk]"),
                            "v": (v, hkv, dv, "[B, T, HKV, Dv]")}[name]
        raise ValueError(f"{name}: expected shape {meaning} = {[batch, length, h, d]}, got {_shape(t)}:"
                         " looks like [B, H, T, D] (the SDPA layout); nsa_dsl takes [B, T, H, D]: pass "
                         + ", ".join(f"{n}.transpose(1, 2)" for n in names))
    batch, length = q.shape[0], q.shape[1]
    _expect_shape("q", q, (batch, length, hq, dqk), "[B, T, HQ, Dqk]")

    # a shifted packing's queries are fewer than its positions: k and v
    # hold every position (cu_seqlens), q only the queries (cu_seqlens_q)
    shifted = packing is not None and packing.shifted
    keys = k.shape[1] if shifted and k.dim() == 4 else length

    def from_q() -> str:
        return "B from q, T from cu_seqlens" if shifted else "B and T from q"
    for name, t, d, meaning in (("k", k, dqk, "[B, T, HKV, Dqk]"), ("v", v, dv, "[B, T, HKV, Dv]")):
        if hq != hkv and t.dim() == 4 and tuple(t.shape) == (batch, keys, hq, d):
            # GQA keys and values repeated to the query heads (what SDPA
            # without enable_gqa needs) are HQ/HKV times the data
            raise ValueError(f"{name}: expected shape {meaning} = {[batch, keys, hkv, d]}, got {_shape(t)}:"
                             f" {hq} heads, one per query head; nsa_dsl takes the {hkv} KV heads, each shared by"
                             f" G={p.group} query heads (do not repeat_interleave them)")
        _expect_shape(name, t, (batch, keys, hkv, d), meaning, from_q)
    if length < 1 or batch < 1:
        raise ValueError(f"q: batch and sequence length must be at least 1, got shape {_shape(q)}")

    allowed = [TORCH_DTYPES[d] for d in p.allowed_dtypes]
    if q.dtype not in allowed:
        raise ValueError(f"q: pattern {p.name!r} allows dtype {' | '.join(d.value for d in p.allowed_dtypes)},"
                         f" got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
    device = q.device
    for name, t in (("k", k), ("v", v)):
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of q), got {t.device}")

    combined = p.combined_branches
    for branch, gate in gates.items():
        name = f"g_{branch.value}"
        if gate is None:
            continue
        gate = _expect_tensor(name, gate)
        if branch not in combined:
            raise ValueError(f"{name}: pattern {p.name!r} does not combine the {branch.value} branch"
                             f" (combined: {', '.join(b.value for b in combined)}); pass no {name}")
        _expect_shape(name, gate, (batch, length, hq), "[B, T, HQ]", from_q)
        if not gate.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {gate.dtype}")
        if gate.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of q), got {gate.device}")

    tc = compressed_length(p, keys) if compressed is None else compressed

    def tc_from() -> str:  # how Tc follows from T: a caller pooling k_cmp, v_cmp itself (pool=mlp) may count otherwise
        if packing is not None:
            return "the sequences of cu_seqlens: nsa_dsl.compressed_seqlens(pattern, cu_seqlens)[-1]"
        return (f"B from q; Tc = (T - block) // stride + 1 = ({length} - {p.compress.block}) //"
                f" {p.compress.stride} + 1 = {tc}" if length >= p.compress.block else
                f"B from q; Tc = 0: T={length} is shorter than one compress block of {p.compress.block}")
    for name, t, d, meaning in (("k_cmp", k_cmp, dqk, "[B, Tc, HKV, Dqk]"), ("v_cmp", v_cmp, dv, "[B, Tc, HKV, Dv]")):
        if p.compress is None:
            if t is not None:
                raise ValueError(f"{name}: pattern {p.name!r} has no compress branch; pass no {name}")
            continue
        if p.compress.pool.value == "mean":
            if t is not None:
                raise ValueError(f"{name}: pattern {p.name!r} pools by mean, so {name} is computed from k and v;"
                                 f" pass no {name} (or declare pool=mlp)")
            continue
        if t is None:
            raise ValueError(f"{name}: pattern {p.name!r} pools by mlp, so {name} must be passed:"
                             f" shape {meaning} = {[batch, tc, hkv, d]} ({tc_from()})")
        t = _expect_tensor(name, t)
        _expect_shape(name, t, (batch, tc, hkv, d), meaning, tc_from)
        if t.dtype != q.dtype or t.device != device:
            raise ValueError(f"{name}: expected dtype {q.dtype} on {device}, got {t.dtype} on {t.device}")

    for name, t, d, meaning in (("k_swa", k_swa, dqk, "[B, T, HKV, Dqk]"), ("v_swa", v_swa, dv, "[B, T, HKV, Dv]")):
        if t is None:
            continue
        if p.window is None:
            raise ValueError(f"{name}: pattern {p.name!r} has no window branch; pass no {name}")
        t = _expect_tensor(name, t)
        _expect_shape(name, t, (batch, keys, hkv, d), meaning, from_q)
        if t.dtype != q.dtype or t.device != device:
            raise ValueError(f"{name}: expected dtype {q.dtype} on {device}, got {t.dtype} on {t.device}")
    if (k_swa is None) != (v_swa is None):
        raise ValueError("k_swa, v_swa: pass both or neither (the window branch's own keys and values);"
                         f" got {'k_swa' if v_swa is None else 'v_swa'} only")

    if indices is not None:
        if p.select is None:
            raise ValueError(f"indices: pattern {p.name!r} has no select branch; pass no indices")
        indices = _expect_tensor("indices", indices)
        _expect_shape("indices", indices, (batch, length, hkv, p.select.top), "[B, T, HKV, top]", from_q)
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices: expected int32 or int64 block indices (-1 for none), got {indices.dtype}")
        if indices.device != device:
            raise ValueError(f"indices: expected device {device} (the device of q), got {indices.device}")
    check_scale(scale)
    return Shapes(batch, length, tc, packing, keys if shifted else -1)


def device_problem(t: torch.Tensor) -> Optional[str]:
    """Why generated kernels cannot run on this tensor's device, or None."""
    if t.device.type == "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 is set but the inputs are on a CUDA device; unset it to run compiled kernels"
        return None
    if t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("inputs are CPU tensors: generated kernels run on CPU only through Triton's interpreter; set"
                    " TRITON_INTERPRET=1 before triton is imported, or move the tensors to a CUDA device")
        return None
    return f"generated kernels do not run on device type {t.device.type!r}"


def check_scale(scale) -> None:
    """ValueError unless scale is None (1/sqrt(Dqk)) or a positive finite
    real number: the compiled call, the reference and NSAttention take the
    same. numbers.Real takes numpy scalars too (np.float32 is no float); a
    bool is an int to Python but never meant as a scale; inf or nan would
    turn every output into nan."""
    if scale is not None and not (isinstance(scale, numbers.Real) and not isinstance(scale, bool)
                                  and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite number (a float), got {scale!r}"
                         + (" (a tensor: pass float(scale))" if isinstance(scale, torch.Tensor) else ""))
