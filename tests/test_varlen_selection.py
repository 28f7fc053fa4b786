"""Packed sequences (cu_seqlens) through the selection branch's kernels:
slc_fwd (group-centric), slc_fwd_bc (block-centric, over the inverted index
of global block ids) and slc_bwd (dQ; dK/dV by the inverted index or by
atomics). A packed call equals each sequence computed alone through the
fixed-length path, and the dense reference's packed mode."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import nsa_dsl
from nsa_dsl import varlen
from strategies import TOLERANCE, rel_error

from conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
ORDERS = ("group-centric", "block-centric")
# selection only (static: top = initial + local), so given indices decide
# every block and no scoring kernel runs
SEL = nsa_dsl.parse("pattern sel { heads q=4 kv=2 dims qk=16 select block=16 top=3 initial=1 local=2 }")
L = SEL.select.block


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def _indices(pattern, lengths, gen) -> torch.Tensor:
    """Random valid per-sequence indices [total, HKV, top]: each row's
    blocks ascending, below its visible blocks (t // l' + 1), -1 padded."""
    top, hkv, block = pattern.select.top, pattern.heads.kv, pattern.select.block
    rows = []
    for n in lengths:
        for t in range(n):
            visible = t // block + 1
            for _ in range(hkv):
                count = int(torch.randint(1, min(top, visible) + 1, (1,), generator=gen))
                chosen = sorted(torch.randperm(visible, generator=gen)[:count].tolist())
                rows.append(chosen + [-1] * (top - count))
    return torch.tensor(rows, dtype=torch.int32).view(-1, hkv, top)


def _inputs(pattern, lengths, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    hq, hkv, dqk, dv = pattern.heads.q, pattern.heads.kv, pattern.dims.qk, pattern.dims.v
    args = {"q": torch.randn(total, hq, dqk, generator=gen), "k": torch.randn(total, hkv, dqk, generator=gen),
            "v": torch.randn(total, hkv, dv, generator=gen), "g_slc": torch.rand(total, hq, generator=gen)}
    args = {n: t.to(dtype=dtype, device=DEVICE) for n, t in args.items()}
    indices = _indices(pattern, lengths, gen).to(DEVICE)
    do = torch.randn(total, hq, dv, generator=gen).to(dtype=dtype, device=DEVICE)
    return args, indices, do


def _run(compiled, args, indices, do, *, cu=None, leading=False, grads=True):
    """(o, {name: grad}) of one call; leading: the [1, total, ...] layout."""
    leaves = {n: (t[None] if leading else t).detach().clone().requires_grad_(grads) for n, t in args.items()}
    idx = indices[None] if leading else indices
    extra = {"cu_seqlens": cu} if cu is not None else {}
    o = compiled(leaves["q"], leaves["k"], leaves["v"], g_slc=leaves["g_slc"], indices=idx, **extra)
    if not grads:
        return (o[0] if leading else o), {}
    o.backward(do[None] if leading else do)
    return (o[0] if leading else o).detach(), {n: (t.grad[0] if leading else t.grad) for n, t in leaves.items()}


def _alone(compiled, args, indices, do, lengths, grads=True):
    """Each sequence through the fixed-length path ([1, T, ...]), packed back."""
    outs, gs = [], {n: [] for n in args}
    start = 0
    for n in lengths:
        part = {name: t[start:start + n] for name, t in args.items()}
        if n > 0:
            o, g = _run(compiled, part, indices[start:start + n], do[start:start + n], leading=True, grads=grads)
            outs.append(o)
            for name in g:
                gs[name].append(g[name])
        start += n
    return torch.cat(outs) if outs else None, {n: torch.cat(v) for n, v in gs.items() if v}


def _reference(pattern, args, indices, do, cu):
    leaves = {n: t.detach().double().requires_grad_(True) for n, t in args.items()}
    o = nsa_dsl.reference(pattern, leaves["q"], leaves["k"], leaves["v"], g_slc=leaves["g_slc"],
                          indices=indices.cpu() if DEVICE == "cpu" else indices, cu_seqlens=cu)
    o.backward(do.double())
    return o.detach(), {n: t.grad for n, t in leaves.items()}


def _close(a, b, dtype, what):
    err = rel_error(a, b)
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.3g}"


def _check(pattern, lengths, dtype, order, seed, slc_dkdv=None, leading=False, reference=True):
    args, indices, do = _inputs(pattern, lengths, dtype, seed)
    cu = _cu(lengths).to(DEVICE)
    compiled = nsa_dsl.compile(pattern, slc_fwd=order, slc_dkdv=slc_dkdv)
    compiled.poison = True
    o, g = _run(compiled, args, indices, do, cu=cu, leading=leading)
    assert not torch.isnan(o).any(), "output left unwritten"
    o_alone, g_alone = _alone(compiled, args, indices, do, lengths)
    if o_alone is not None:
        _close(o, o_alone, dtype, "output vs each sequence alone")
        for n in g_alone:
            _close(g[n], g_alone[n], dtype, f"d{n} vs each sequence alone")
    if reference and sum(lengths) > 0:
        o_ref, g_ref = _reference(pattern, args, indices, do, cu)
        _close(o, o_ref, dtype, "output vs reference")
        for n in g_ref:
            _close(g[n], g_ref[n], dtype, f"d{n} vs reference")
    return o, g


# lengths that matter: empty, one position, around and at multiples of l'
_LENGTH = st.one_of(st.sampled_from([0, 1, L - 1, L, L + 1, 2 * L, 3 * L - 1, 5 * L]), st.integers(0, 150))


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(_LENGTH, min_size=1, max_size=5).filter(lambda x: 0 < sum(x) <= 300),
       dtype=st.sampled_from([torch.float32, torch.float16]), order=st.sampled_from(ORDERS),
       leading=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_packed_selection_equals_each_sequence_alone_and_the_reference(lengths, dtype, order, leading, seed):
    _check(SEL, lengths, dtype, order, seed, leading=leading)
