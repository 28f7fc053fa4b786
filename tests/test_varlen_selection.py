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
from nsa_dsl.inverted_index import packed_block_to_positions, packed_blocks
from strategies import TOLERANCE, cu_seqlens_of, rel_error

from conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
ORDERS = ("group-centric", "block-centric")
# selection only (static: top = initial + local), so given indices decide
# every block and no scoring kernel runs
SEL = nsa_dsl.parse("pattern sel { heads q=4 kv=2 dims qk=16 select block=16 top=3 initial=1 local=2 }")
L = SEL.select.block


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
    cu = cu_seqlens_of(lengths).to(DEVICE)
    compiled = nsa_dsl.compile(pattern, slc_fwd=order, slc_dkdv=slc_dkdv)
    compiled.poison = True
    o, g = _run(compiled, args, indices, do, cu=cu, leading=leading)
    assert not torch.isnan(o).any(), "output left unwritten"
    o_alone, g_alone = _alone(compiled, args, indices, do, lengths)
    if o_alone is not None:
        _close(o, o_alone, dtype, "output vs each sequence alone")
        for n in g_alone:
            _close(g[n], g_alone[n], dtype, f"d{n} vs each sequence alone")
    with torch.no_grad():  # no gradient: the selection may write the gated output itself (WRITE_FINAL)
        o_final, _ = _run(compiled, args, indices, do, cu=cu, leading=not leading, grads=False)
    _close(o_final, o, dtype, "output without gradient vs with")
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


@settings(max_examples=3, deadline=None)
@given(lengths=st.lists(_LENGTH, min_size=1, max_size=4).filter(lambda x: 0 < sum(x) <= 200),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_packed_atomic_dkdv(lengths, dtype, seed):
    _check(SEL, lengths, dtype, "group-centric", seed, slc_dkdv="atomic", leading=True)


@pytest.mark.parametrize("order", ORDERS)
def test_packed_deterministic_gradients_are_identical_twice(order):
    lengths = [L + 3, 0, 1, 2 * L, L - 1]
    args, indices, do = _inputs(SEL, lengths, torch.float32, 11)
    compiled = nsa_dsl.compile(SEL, slc_fwd=order, deterministic=True)
    cu = cu_seqlens_of(lengths)
    o1, g1 = _run(compiled, args, indices, do, cu=cu)
    o2, g2 = _run(compiled, args, indices, do, cu=cu)
    assert torch.equal(o1, o2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


def test_packed_window_folded_into_the_group_centric_selection():
    """The window computed inside slc_fwd (SLC_FWD_WINDOW) for packed
    sequences, without gradient (the gated output written there): each
    sequence's window starts at its own position 0."""
    pattern = nsa_dsl.parse("pattern sw { heads q=4 kv=2 dims qk=16 select block=16 top=2 initial=1 local=1"
                            " window size=24 }")
    compiled = nsa_dsl.compile(pattern, slc_fwd="group-centric", overrides={"SLC_FWD_WINDOW": 1})
    assert compiled.plan.window_in_selection
    lengths = [L + 5, 0, 1, 3 * L - 1]
    args, indices, _ = _inputs(pattern, lengths, torch.float32, 5)
    gen = torch.Generator().manual_seed(6)
    g_swa = torch.rand(sum(lengths), pattern.heads.q, generator=gen)
    cu = cu_seqlens_of(lengths)
    with torch.no_grad():
        o = compiled(args["q"], args["k"], args["v"], g_slc=args["g_slc"], g_swa=g_swa, indices=indices,
                     cu_seqlens=cu)
    ref = nsa_dsl.reference(pattern, *(args[n].double() for n in "qkv"), g_slc=args["g_slc"].double(),
                            g_swa=g_swa.double(), indices=indices, cu_seqlens=cu)
    _close(o, ref, torch.float32, "output vs reference")


def test_global_block_ids_and_their_keys():
    """packed_blocks: sequence s's block j is block_base[s] + j, its keys
    the sequence's rows [j l', (j + 1) l') cut at its end; ids past the
    last block are empty; the index built on them holds packed rows."""
    lengths = [L + 3, 0, 1, 2 * L]
    cu = cu_seqlens_of(lengths)
    blocks = packed_blocks(cu, L, sum(lengths))
    assert blocks["n_blocks"] >= 2 + 0 + 1 + 2
    spans = blocks["spans"].tolist()
    # (start, end, key row - query row: 0 where every position has a query)
    assert spans[:5] == [[0, L, 0], [L, L + 3, 0], [L + 3, L + 4, 0], [L + 4, 2 * L + 4, 0],
                         [2 * L + 4, 3 * L + 4, 0]]
    assert all(s == [0, 0, 0] for s in spans[5:])
    assert blocks["row_base"].tolist() == [0] * (L + 3) + [2] + [3] * (2 * L)
    indices = torch.full((1, sum(lengths), 1, 2), -1, dtype=torch.int32)
    indices[0, :, 0, 0] = 0
    indices[0, L + 5, 0, 1] = 1  # the last sequence's second position: its block 1 is not visible yet
    indices[0, 3 * L + 3, 0, 1] = 1  # its last position: visible
    offsets, positions = packed_block_to_positions(indices, L, blocks)
    seg = lambda g: positions[offsets[g]:offsets[g + 1]].tolist()
    assert seg(0) == list(range(L + 3)) and seg(1) == [] and seg(2) == [L + 3]
    assert seg(3) == list(range(L + 4, 3 * L + 4)) and seg(4) == [3 * L + 3]


def test_a_packed_call_takes_the_loop_order_of_its_longest_sequence(monkeypatch):
    """The loop order follows the longest sequence, not the packed total:
    a block is shared only by its own sequence's queries (documents of
    1k-4k packed to 64k ran block-centric and 14-58% slower, NOTES v18)."""
    compiled = nsa_dsl.compile(SEL)
    threshold = 100  # block-centric from T = 100 (the shipped plans start at 8k or 32k)
    monkeypatch.setattr(type(compiled.plan), "loop_order_at",
                        lambda plan, T: "block-centric" if T >= threshold else "group-centric")
    launches = []
    for kernel in ("slc_fwd", "slc_fwd_bc"):
        real = getattr(compiled.module, kernel)
        monkeypatch.setattr(compiled.module, kernel, _Spy(real, kernel, launches))
    lengths = [60, 0, 70]  # 130 positions in all, none of its sequences 100 long
    args, indices, do = _inputs(SEL, lengths, torch.float32, seed=1)
    _run(compiled, args, indices, do, cu=cu_seqlens_of(lengths).to(DEVICE), grads=False)
    assert launches == ["slc_fwd"]
    launches.clear()
    args, indices, do = _inputs(SEL, [30, 100], torch.float32, seed=1)
    _run(compiled, args, indices, do, cu=cu_seqlens_of([30, 100]).to(DEVICE), grads=False)
    assert launches == ["slc_fwd_bc"]


class _Spy:
    """A generated kernel that records its name at each launch."""

    def __init__(self, kernel, name: str, record: list):
        self.kernel, self.name, self.record = kernel, name, record

    def __getitem__(self, grid):
        self.record.append(self.name)
        return self.kernel[grid]


def test_global_block_ids_of_queries_of_the_last_positions():
    """packed_blocks with cu_queries: the spans are still the key rows; each
    carries its sequence's key row minus query row, and a query row's
    position in its sequence counts from the sequence's first position,
    not its first query (sequences of 2L+3 and L positions with their last
    5 and 0 positions queried, and one of 3 with all 3)."""
    lengths, queries = [2 * L + 3, L, 3], [5, 0, 3]
    blocks = packed_blocks(cu_seqlens_of(lengths), L, sum(queries), cu_seqlens_of(queries), key_total=sum(lengths))
    spans = blocks["spans"].tolist()
    # cu_seqlens[s + 1] - cu_seqlens_q[s + 1]
    shifts = [2 * L + 3 - 5, 3 * L + 3 - 5, 3 * L + 6 - 8]
    assert spans[:5] == [[0, L, shifts[0]], [L, 2 * L, shifts[0]], [2 * L, 2 * L + 3, shifts[0]],
                         [2 * L + 3, 3 * L + 3, shifts[1]], [3 * L + 3, 3 * L + 6, shifts[2]]]
    assert blocks["row_local"].tolist() == [2 * L - 2, 2 * L - 1, 2 * L, 2 * L + 1, 2 * L + 2, 0, 1, 2]
    assert blocks["row_base"].tolist() == [0] * 5 + [4] * 3
