"""Context parallelism (nsa_dsl.distributed) on the CPU: 2 and 4 gloo
processes, each running the kernels through Triton's interpreter on its
shard of one sequence, against the single-process call on the whole
sequence: every rank's output and the gradients of its q, k, v, gates
(and k_swa, v_swa; pool=mlp's k_cmp, v_cmp summed over the ranks), in
float32 within NSA_MATH.md's tolerance.

The lengths put the shard boundaries inside a compression block, a
selection block and the window (T = 136: pieces of 68, 34 or 17
positions for blocks of 8/4, 16 and windows of 24 and 9). Then the bad input:
ranks with different shard lengths or patterns get a ValueError, a rank
that never calls makes the others time out instead of hanging, and a
group of one rank is the plain call."""
from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nsa_dsl
from nsa_dsl import distributed

import interpreter_speed
from strategies import SMALL_PATTERNS, TOLERANCE, cu_seqlens_of, random_inputs, rel_error

PATTERNS = SMALL_PATTERNS
T = 136
QUERY_SIDE = ("q", "g_cmp", "g_slc", "g_swa")


def _run_ranks(world: int, fn, *args) -> None:
    """fn(rank, world, *args) in `world` gloo processes; a failure in any
    is raised here with its traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "rendezvous"), fn, args), nprocs=world, join=True)


def _rank_main(rank, world, rendezvous, fn, args):
    interpreter_speed.install()  # (a spawned process: the conftest's install is the parent's)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    except BaseException:
        raise RuntimeError(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _whole_sequence(name, seed, **kwargs):
    """The oracle, in the parent process once (not on every rank): the
    inputs, the upstream gradient, and the single-process call's output and
    gradients on the whole sequence (kwargs: cu_seqlens)."""
    pattern = nsa_dsl.parse(PATTERNS[name])
    compiled = nsa_dsl.compile(pattern)
    args = random_inputs(pattern, 1, T, torch.float32, seed=seed, separate_window_kv=kwargs.pop("own_window_kv", False))
    do = torch.randn(1, T, pattern.heads.q, pattern.dims.v, generator=torch.Generator().manual_seed(seed + 1))
    whole = {n: t.clone().requires_grad_(True) for n, t in args.items()}
    o_whole = compiled(**whole, **kwargs)
    o_whole.backward(do)
    return args, do, o_whole.detach(), {n: t.grad for n, t in whole.items()}


def _check_shards(rank, world, name, layout, whole):
    args, do, o_whole, grads = whole
    compiled = nsa_dsl.compile(nsa_dsl.parse(PATTERNS[name]))
    cp = distributed.context_parallel(compiled, layout=layout)
    local = {n: (t.clone() if n in ("k_cmp", "v_cmp") else cp.shard(t)).requires_grad_(True) for n, t in args.items()}
    o = cp(**local)
    o.backward(cp.shard(do))
    tol = TOLERANCE[torch.float32]
    assert rel_error(o.detach(), cp.shard(o_whole)) < tol, "o"
    for n, t in local.items():
        want = grads[n] if n in ("k_cmp", "v_cmp") else cp.shard(grads[n])
        err = rel_error(t.grad, want)
        assert err < tol, f"d{n}: relative error {err:.3g}"


@pytest.mark.parametrize("world, name, layout, own_window_kv", [
    (2, "paper", "zigzag", False),
    (2, "mlp", "contiguous", True),
    (4, "paper", "zigzag", True),
    (4, "mlp", "zigzag", False),
])
def test_every_rank_matches_the_whole_sequence(world, name, layout, own_window_kv):
    _run_ranks(world, _check_shards, name, layout, _whole_sequence(name, 5, own_window_kv=own_window_kv))


def _check_packed(rank, world, cu, whole):
    args, do, o_whole, grads = whole
    compiled = nsa_dsl.compile(nsa_dsl.parse(PATTERNS["paper"]))
    cp = distributed.context_parallel(compiled)
    local = {n: cp.shard(t).requires_grad_(True) for n, t in args.items()}
    o = cp(**local, cu_seqlens=cu)
    o.backward(cp.shard(do))
    tol = TOLERANCE[torch.float32]
    assert rel_error(o.detach(), cp.shard(o_whole)) < tol, "o"
    for n, t in local.items():
        err = rel_error(t.grad, cp.shard(grads[n]))
        assert err < tol, f"d{n}: relative error {err:.3g}"


def test_packed_documents_across_ranks():
    """Documents that start and end inside the ranks' chunks (zigzag over
    2 ranks: chunks of 34), one empty, against the packed call."""
    cu = cu_seqlens_of([20, 0, 51, 7, 58])
    _run_ranks(2, _check_packed, cu, _whole_sequence("paper", 8, cu_seqlens=cu))


def _paper_zigzag():
    """The paper pattern, compiled, over this process's group in the zigzag layout."""
    pattern = nsa_dsl.parse(PATTERNS["paper"])
    compiled = nsa_dsl.compile(pattern)
    return pattern, compiled, distributed.context_parallel(compiled)


def _overlap_order(rank, world):
    pattern, compiled, cp = _paper_zigzag()
    events = []
    start = cp.start_gather
    cp.start_gather = lambda x, what: (events.append(("start", what)), start(x, what))[1]
    wait = distributed._Pending.wait
    distributed._Pending.wait = lambda self: (events.append(("wait", self.what)), wait(self))[1]

    class Recorded:  # the compiled call, recording each piece's keys
        def __getattr__(self, name):
            return getattr(compiled, name)

        def __call__(self, q, k, *args, **kwargs):
            events.append(("compute", k.shape[1]))
            return compiled(q, k, *args, **kwargs)
    cp.compiled = Recorded()
    C = 16  # 64 positions in 4 chunks; rank r's are r and 3 - r
    cp(**random_inputs(pattern, 1, 2 * C, torch.float32, seed=rank))
    half = [(f"the all-gather of {n}'s {h} half") for h in ("first", "second") for n in ("k", "v")]
    events = [e for e in events if e[0] == "compute" or e[1] in half]  # (not the shape check's)
    assert events == [("start", w) for w in half] + [("wait", w) for w in half[:2]] + [("compute", (rank + 1) * C)] \
        + [("wait", w) for w in half[2:]] + [("compute", (2 * world - rank) * C)]


def test_the_second_half_is_gathered_behind_the_early_chunk():
    """Zigzag overlap: both halves' all-gathers start before any kernel;
    the early chunk (keys of the first half only) runs after the first
    half arrives and before anything waits for the second."""
    _run_ranks(2, _overlap_order)


class _Traced(torch.autograd.Function):
    """The identity; its backward (which autograd runs once the call that
    read x has run its own) appends (label, "done") to events."""

    @staticmethod
    def forward(ctx, x, events, label):
        ctx.events, ctx.label = events, label
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.events.append((ctx.label, "done"))
        return g, None, None


def _backward_overlap_order(rank, world):
    pattern, compiled, cp = _paper_zigzag()
    events = []
    start = cp.start_sum_and_shard
    cp.start_sum_and_shard = lambda g, half=None: (events.append(("start", half)), start(g, half))[1]
    wait = distributed._Pending.wait

    def traced_wait(self):
        if self.what.startswith("the sum"):
            events.append(("wait", 0 if self.what.endswith("first half") else 1))
        return wait(self)
    distributed._Pending.wait = traced_wait

    class Traced:  # the compiled call, its backward's end traced through q
        def __getattr__(self, name):
            return getattr(compiled, name)

        def __call__(self, q, k, *args, **kwargs):
            label = "early" if k.shape[1] <= world * C else "late"  # the early chunk's keys: the first half
            return compiled(_Traced.apply(q, events, label), k, *args, **kwargs)
    cp.compiled = Traced()
    C = 16  # 64 positions in 4 chunks; rank r's are r and 3 - r
    args = random_inputs(pattern, 1, 2 * C, torch.float32, seed=rank)
    local = {n: t.requires_grad_(True) for n, t in args.items()}
    cp(**local).backward(torch.randn(1, 2 * C, pattern.heads.q, pattern.dims.v))
    # k's and v's halves: each sum starts once its keys' last reader has run its backward; the second
    # half's is waited for only after the early chunk's backward
    assert events == [("late", "done"), ("start", 1), ("start", 1), ("early", "done"), ("start", 0), ("start", 0),
                      ("wait", 1), ("wait", 1), ("wait", 0), ("wait", 0)], events


def test_the_second_halfs_gradient_is_summed_behind_the_early_chunks_backward():
    """Zigzag backward overlap: the sums over the ranks of k's and v's
    second-half gradients start when the late chunk's backward is done and
    are waited for after the early chunk's; the first half's start after
    the early chunk. (The gradients themselves: test_every_rank_...)"""
    _run_ranks(2, _backward_overlap_order)


def _unequal(rank, world):
    pattern = nsa_dsl.parse(PATTERNS["paper"])
    cp = distributed.context_parallel(nsa_dsl.compile(pattern), layout="contiguous")
    S = 64 if rank == 0 else 48
    args = random_inputs(pattern, 1, S, torch.float32, seed=rank)
    with pytest.raises(ValueError, match="q's positions: rank 0 has 64, rank 1 has 48|q's positions: rank 1 has 48,"
                                         " rank 0 has 64"):
        cp(**args)


def _other_pattern(rank, world):
    text = PATTERNS["paper"] if rank == 0 else PATTERNS["paper"].replace("top=3", "top=4")
    pattern = nsa_dsl.parse(text)
    cp = distributed.context_parallel(nsa_dsl.compile(pattern), layout="contiguous")
    args = random_inputs(pattern, 1, 32, torch.float32, seed=rank)
    with pytest.raises(ValueError, match="pattern: rank"):
        cp(**args)


def _absent_rank(rank, world):
    pattern = nsa_dsl.parse(PATTERNS["paper"])
    cp = distributed.context_parallel(nsa_dsl.compile(pattern), timeout=datetime.timedelta(seconds=3))
    if rank == 0:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="did not complete within 0:00:03"):
            cp(**random_inputs(pattern, 1, 32, torch.float32, seed=0))
        assert time.monotonic() - started < 30
    else:  # never calls; stays up past rank 0's timeout (no collective after one timed out: gloo is broken then)
        time.sleep(8)


@pytest.mark.parametrize("case", [_unequal, _other_pattern, _absent_rank],
                         ids=["unequal shards", "another pattern", "a rank that never calls"])
def test_bad_calls_fail_on_every_rank_without_hanging(case):
    _run_ranks(2, case)


def _one_rank(rank, world):
    pattern = nsa_dsl.parse(PATTERNS["paper"])
    compiled = nsa_dsl.compile(pattern)
    args = random_inputs(pattern, 1, 40, torch.float32, seed=3)
    assert torch.equal(distributed.context_parallel(compiled)(**args), compiled(**args))


def test_a_group_of_one_is_the_plain_call():
    _run_ranks(1, _one_rank)


def test_a_length_that_does_not_split_is_a_value_error():
    class _Fake(distributed.ContextParallel):
        def __init__(self):  # no process group needed for the geometry
            self.world, self.rank, self.layout = 4, 1, "zigzag"
    with pytest.raises(ValueError, match="T=100 positions do not split into 8 equal pieces"):
        _Fake().shard(torch.zeros(1, 100, 2, 16))
