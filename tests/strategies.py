"""Hypothesis strategies shared by the test files: valid patterns drawn by
construction (every rule of the checker satisfied by how the numbers are
chosen, not by filtering) and random inputs for them."""
from __future__ import annotations

import contextlib
from unittest import mock

import torch
from hypothesis import strategies as st

from nsa_dsl.geometry import compressed_length
from nsa_dsl.ir import Branch, Combine, Compress, Dims, Heads, Pattern, Pool, Select, Window
from nsa_dsl.reference import block_scores, compress_mean


# Two small patterns that reach every kernel, shared by the files that test
# one call against another (context parallelism, queries of the last positions):
# "paper" has compression, selection with forced blocks and a window; "mlp" has
# caller-pooled tokens, a group of 4 and v wider than qk.
SMALL_PATTERNS = {
    "paper": """
pattern small_paper {
    heads    q=4 kv=2
    dims     qk=16
    compress block=8 stride=4 pool=mean
    select   block=16 top=3 initial=1 local=1
    window   size=24
}""",
    "mlp": """
pattern small_mlp {
    heads    q=4 kv=1
    dims     qk=16 v=32
    compress block=8 stride=8 pool=mlp
    select   block=16 top=3
    window   size=9
}""",
}


@st.composite
def valid_patterns(draw, *, max_group: int = 16, need_window: bool = False, pools=(Pool.MEAN, Pool.MLP),
                   small: bool = True) -> Pattern:
    """Small valid patterns covering every branch subset, G from 1 to
    max_group, l != d != l', static and ranked selection (top up to 20),
    window sizes that are multiples of nothing in particular."""
    g = draw(st.sampled_from([x for x in (1, 2, 3, 4, 8, 16) if x <= max_group]))
    kv = draw(st.sampled_from([1, 2])) if g <= 4 else 1
    qk = draw(st.sampled_from([16, 32, 48] if small else [16, 32, 48, 64, 128, 192]))
    v = draw(st.sampled_from([16, 32] if small else [16, 32, 64, 128]))
    has_window = need_window or draw(st.booleans())
    has_select = draw(st.booleans())
    has_compress = draw(st.booleans())
    if not (has_window or has_select or has_compress):
        has_window = True

    compress = select = window = None
    if has_compress:
        stride = draw(st.sampled_from([1, 2, 4, 8, 16]))
        block = stride * draw(st.integers(1, 3))
        compress = Compress(block=block, stride=stride, pool=draw(st.sampled_from(pools)))
    if has_select:
        # A multiple of the compression stride (at most 16, so 16 and 32 both are).
        slc_block = draw(st.sampled_from([16, 32]))
        initial = draw(st.integers(0, 2))
        local = draw(st.integers(0, 2))
        forced = initial + local
        if compress is None:
            top = max(1, forced)
            if top != forced:  # top must equal the forced count without a compress branch
                local += 1
        elif draw(st.integers(0, 5)) == 5:  # a top set wider than a 16-block scoring chunk: its keys widened
            top = draw(st.integers(17, 20))
        else:
            top = draw(st.integers(max(1, forced), forced + 3))
        select = Select(block=slc_block, top=top, initial=initial, local=local)
    if has_window:
        window = Window(size=draw(st.integers(1, 70)))

    declared = [b for b, present in ((Branch.CMP, compress), (Branch.SLC, select), (Branch.SWA, window)) if present]
    combine = None
    if draw(st.booleans()):
        chosen = draw(st.lists(st.sampled_from(declared), min_size=1, max_size=len(declared), unique=True))
        combine = Combine(branches=tuple(chosen))
    return Pattern(name="drawn", heads=Heads(q=g * kv, kv=kv), dims=Dims(qk=qk, v=v), compress=compress,
                   select=select, window=window, combine=combine)


def random_inputs(pattern: Pattern, batch: int, length: int, dtype: torch.dtype, seed: int, *,
                  gates: bool = True, separate_window_kv: bool = False, device="cpu") -> dict:
    """Fresh random q, k, v (and gates in [0, 1], k_cmp/v_cmp for pool=mlp,
    k_swa/v_swa on request) as keyword arguments of compiled(...) and
    nsa_dsl.reference(...)."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, dqk, dv = pattern.heads.q, pattern.heads.kv, pattern.dims.qk, pattern.dims.v

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    args = {"q": rnd(batch, length, hq, dqk), "k": rnd(batch, length, hkv, dqk), "v": rnd(batch, length, hkv, dv)}
    if gates:
        for b in pattern.combined_branches:
            args[f"g_{b.value}"] = torch.rand(batch, length, hq, generator=gen).to(dtype=dtype, device=device)
    c = pattern.compress
    if c is not None and c.pool is Pool.MLP:
        tc = compressed_length(pattern, length)
        args["k_cmp"] = rnd(batch, tc, hkv, dqk)
        args["v_cmp"] = rnd(batch, tc, hkv, dv)
    if separate_window_kv and pattern.window is not None:
        args["k_swa"] = rnd(batch, length, hkv, dqk)
        args["v_swa"] = rnd(batch, length, hkv, dv)
    return args


def cu_seqlens_of(lengths) -> torch.Tensor:
    """cu_seqlens (int32 [N+1], on the CPU) of sequences of these lengths."""
    return torch.tensor([0] + torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def packed_inputs(pattern: Pattern, lengths, dtype: torch.dtype, seed: int, *, gates: bool = True) -> tuple:
    """Packed [total, ...] q, k, v, the gates of the combined branches
    (unless gates=False) and, for pool=mlp, k_cmp and v_cmp [total_c, ...]
    in sequence order; with cu_seqlens."""
    from nsa_dsl import varlen

    cu = cu_seqlens_of(lengths)
    total = int(cu[-1])
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, dqk, dv = pattern.heads.q, pattern.heads.kv, pattern.dims.qk, pattern.dims.v

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    args = {"q": rnd(total, hq, dqk), "k": rnd(total, hkv, dqk), "v": rnd(total, hkv, dv)}
    for b in pattern.combined_branches if gates else ():
        args[f"g_{b.value}"] = torch.rand(total, hq, generator=gen).to(dtype)
    if pattern.compress is not None and pattern.compress.pool is Pool.MLP:
        total_c = int(varlen.compressed_seqlens(pattern, cu)[-1])
        args["k_cmp"], args["v_cmp"] = rnd(total_c, hkv, dqk), rnd(total_c, hkv, dv)
    return args, cu


def upcast(args: dict, dtype=torch.float64) -> dict:
    return {name: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for name, t in args.items()}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


# NSA_MATH.md's tolerances for ||out - ref|| / ||ref|| against float64.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_gradients_match_reference(pattern: Pattern, compiled, args: dict, seed: int) -> None:
    """Gradients of every input of `compiled` (run on its own block
    indices) against float64 autograd through nsa_dsl.reference, within the
    inputs' dtype's tolerance."""
    import nsa_dsl

    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
    if pattern.select is None:  # no selection: no block indices
        o, indices = compiled(**leaves), None
    else:
        o, indices = compiled(**leaves, return_indices=True)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.device, o.dtype)
    o.backward(do)
    up = {n: t.detach().double().requires_grad_(True) for n, t in args.items()}
    nsa_dsl.reference(pattern, **up, indices=indices).backward(do.double())
    tolerance = TOLERANCE[args["q"].dtype]
    for name in args:
        if up[name].grad is None:  # an input the reference does not read
            continue
        assert leaves[name].grad.dtype == leaves[name].dtype, name
        err = rel_error(leaves[name].grad, up[name].grad)
        assert err < tolerance, f"grad of {name}: {err:.3e} for {pattern.canonical()}"


class LaunchSpy:
    """Stands in for a generated kernel: launches it as given and records
    one keyword argument of each launch (a constexpr the launchers chose)."""

    def __init__(self, kernel, name: str, record: list, tag=()):
        self.kernel, self.name, self.record, self.tag = kernel, name, record, tuple(tag)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.record.append((*self.tag, kwargs[self.name]) if self.tag else kwargs[self.name])
            return self.kernel[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def derived_overrides():
    """Inside it, compile(overrides=) and apply_overrides also take the
    constants of nsa_dsl.plan.DERIVED (the plan derives them from the
    pattern; no user or tuned record sets them), under the checks tunable
    ones get: for tests that run a kernel at a value the plan derives for
    another shape (a scoring chunk, a slice, the merge's tile)."""
    from nsa_dsl import plan

    with mock.patch.dict(plan.TUNABLE, plan.DERIVED):
        yield


def _k_cmp_for_scores(pattern, args):
    if pattern.compress.pool is Pool.MLP:
        return args["k_cmp"]
    c = pattern.compress
    return compress_mean(args["k"], c.block, c.stride)


def assert_selection_rule(pattern, args, indices, eps_rel, eps_abs):
    """The kernel's indices obey NSA_MATH.md's rule against the reference's
    block scores (computed in float64 from the same inputs)."""
    s = pattern.select
    B, T = args["q"].shape[:2]
    idx = indices.long().cpu()
    assert idx.shape == (B, T, pattern.heads.kv, s.top)
    positions = torch.arange(T)
    current = positions // s.block
    if pattern.select.is_static:
        scores = None
    else:
        up = upcast(args)
        scores = block_scores(pattern, up["q"], _k_cmp_for_scores(pattern, up)).cpu()
    for b in range(B):
        for t in range(T):
            cur = int(current[t])
            visible = set(range(cur + 1))
            forced = {j for j in visible if j < s.initial or j > cur - s.local}
            for h in range(pattern.heads.kv):
                row = idx[b, t, h].tolist()
                chosen = [j for j in row if j >= 0]
                assert row[len(chosen):] == [-1] * (len(row) - len(chosen)), f"-1 padding not at the end: {row}"
                assert chosen == sorted(set(chosen)), f"indices not ascending and distinct: {row}"
                assert set(chosen) <= visible, f"t={t}: future block in {row}"
                assert len(chosen) == min(s.top, cur + 1), f"t={t}: {len(chosen)} blocks, expected {min(s.top, cur + 1)}"
                assert forced <= set(chosen), f"t={t}: forced blocks {sorted(forced)} missing from {row}"
                if scores is None:
                    continue
                free_chosen = [j for j in chosen if j not in forced]
                unchosen = [j for j in visible if j not in chosen]
                if free_chosen and unchosen:
                    worst_taken = min(float(scores[b, t, h, j]) for j in free_chosen)
                    best_left = max(float(scores[b, t, h, j]) for j in unchosen)
                    assert worst_taken >= best_left - (eps_abs + eps_rel * abs(best_left)), (
                        f"t={t} kv={h}: chose {free_chosen} (worst {worst_taken}) over a block scoring {best_left}")
