"""torch.compile and torch.export (issue 23): a compiled pattern's call is
the custom ops nsa_dsl::forward / nsa_dsl::backward (custom_ops), so a
model using NSAttention compiles into one graph (fullgraph=True), with
eager's outputs and gradients, one graph for every sequence length
(dynamic), and exports with the op in its graph; a cached step is the op
nsa_dsl::cache_step. Before them, tracing reached Triton's launch and
failed (KeyError(torch.uint64) through the interpreter)."""
from __future__ import annotations

import pytest
import torch

import nsa_dsl
from nsa_dsl.module import NSAttention
from strategies import TOLERANCE, random_inputs, rel_error

PATTERN = nsa_dsl.parse("""
pattern compiled_around {
    heads    q=4 kv=2
    dims     qk=16
    compress block=8 stride=4
    select   block=16 top=2 initial=1 local=1
    window   size=16
}
""")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("compile_backend, fullgraph", [("eager", False), ("aot_eager", False), ("aot_eager", True)])
def test_a_compiled_layer_gives_eager_outputs_and_gradients(compile_backend, fullgraph):
    torch.manual_seed(0)
    layer = NSAttention(PATTERN, 32, backend="kernels")
    layer.compiled  # (compiling the pattern is not traced)
    x = torch.randn(2, 64, 32, requires_grad=True)
    want = layer(x)
    want.square().sum().backward()
    want_grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    got = torch.compile(layer, backend=compile_backend, fullgraph=fullgraph)(x)
    got.square().sum().backward()
    got_grads = [x.grad] + [p.grad for p in layer.parameters()]
    assert rel_error(got, want) < TOLERANCE[torch.float32]
    for g, w in zip(got_grads, want_grads):
        assert rel_error(g, w) < TOLERANCE[torch.float32]


def test_a_compiled_function_around_the_call_and_its_selection():
    """The functional call inside a compiled function with work on both
    sides of it, including return_indices and select_blocks (its own op,
    nsa_dsl::select_blocks): one graph."""
    compiled = nsa_dsl.compile(PATTERN)
    args = random_inputs(PATTERN, 2, 48, torch.float32, seed=4)

    def step(q, k, v, g_cmp, g_slc, g_swa):
        o, idx = compiled(q * 0.5, k, v, g_cmp, g_slc, g_swa, return_indices=True)
        return o.tanh(), idx, compiled.select_blocks(q * 0.5, k, v)

    want = step(**args)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(**args)
    assert rel_error(got[0], want[0]) < TOLERANCE[torch.float32]
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("pool, separate_kv", [("mean", False), ("mlp", True)])
def test_a_compiled_layer_generates_with_its_cache_in_one_graph_per_piece_size(pool, separate_kv):
    """Generation through a layer compiled with fullgraph=True: prefill
    pieces then decode steps equal the eager layer's, the caches end equal,
    and the decode steps at six lengths share one graph (the step's op
    reads the host lengths, the traced code does not: traced, they would
    recompile every step). pool=mlp's tokens are pooled on the device for
    any piece. Before nsa_dsl::cache_step the cached call was a graph
    break (fullgraph failed)."""
    from torch._dynamo.utils import counters

    pattern = nsa_dsl.parse(f"""pattern cached {{ heads q=4 kv=2 dims qk=16 compress block=8 stride=4 pool={pool}
        select block=16 top=2 initial=1 local=1 window size=16 }}""")
    torch.manual_seed(1)
    layer = NSAttention(pattern, 32, backend="kernels", separate_kv=separate_kv)
    layer.compiled
    x = torch.randn(2, 44, 32)
    run = torch.compile(layer, backend="aot_eager", fullgraph=True)
    outs, caches = [], []
    with torch.no_grad():
        for step in (layer, run):
            cache = layer.new_cache(2, 44, dtype=torch.float32)
            pieces = [step(x[:, :30], cache=cache), step(x[:, 30:37], cache=cache), step(x[:, 37:38], cache=cache)]
            graphs = counters["stats"]["unique_graphs"]
            pieces += [step(x[:, t:t + 1], cache=cache) for t in range(38, 44)]
            if step is run:
                assert counters["stats"]["unique_graphs"] == graphs  # no recompile as the lengths grow
            outs.append(torch.cat(pieces, 1))
            caches.append(cache)
    assert rel_error(outs[1], outs[0]) < TOLERANCE[torch.float32]
    assert caches[1].host_lengths == caches[0].host_lengths == [44, 44]
    assert torch.equal(caches[1].lengths, caches[0].lengths)
    for name in ("k", "v", "k_cmp", "v_cmp", "k_swa", "v_swa", "k_src", "v_src"):
        got, want = getattr(caches[1], name), getattr(caches[0], name)
        assert (got is None) == (want is None), name
        if want is not None:
            assert rel_error(got, want) < TOLERANCE[torch.float32], name


def test_a_cached_step_traces_without_a_break_and_checks_its_room_at_run_time():
    """explain: a decode step is one graph, the op nsa_dsl::cache_step in
    it; a compiled step past max_len is the eager ValueError, raised before
    anything is written (the room is checked inside the op, where the host
    lengths are read)."""
    layer = NSAttention(PATTERN, 32, backend="kernels")
    layer.compiled
    x = torch.randn(1, 12, 32)
    with torch.no_grad():
        cache = layer.new_cache(1, 12, dtype=torch.float32)
        layer(x[:, :10], cache=cache)
        explained = torch._dynamo.explain(layer)(x[:, 10:11], cache=cache)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        targets = {str(n.target) for g in explained.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
                   for n in m.graph.nodes}
        assert "nsa_dsl.cache_step.default" in targets, targets
        assert cache.host_lengths == [11]
        run = torch.compile(layer, backend="aot_eager", fullgraph=True)
        run(x[:, 11:12], cache=cache)
        before = (cache.k.clone(), cache.lengths.clone())
        with pytest.raises(ValueError, match="max_len=12"):
            run(x[:, 11:12], cache=cache)
    assert cache.host_lengths == [12] and torch.equal(cache.lengths, before[1]) and torch.equal(cache.k, before[0])


def test_the_layer_traces_into_one_graph_for_every_length():
    """No graph break (explain), and with dynamic lengths one graph serves
    three (the call's Python is traced with symbolic sizes; an error
    message built eagerly once fixed the length)."""
    from torch._dynamo.utils import counters

    layer = NSAttention(PATTERN, 32, backend="kernels")
    layer.compiled
    explained = torch._dynamo.explain(layer)(torch.randn(2, 64, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    counters.clear()
    run = torch.compile(layer, backend="aot_eager", dynamic=True)
    for T in (48, 80, 112):
        x = torch.randn(2, T, 32)
        assert rel_error(run(x), layer(x)) < TOLERANCE[torch.float32]
    assert counters["stats"]["unique_graphs"] == 1


def test_an_exported_model_holds_the_op():
    layer = NSAttention(PATTERN, 32, backend="kernels")
    layer.compiled
    x = torch.randn(2, 48, 32)
    exported = torch.export.export(layer, (x,))
    # (the layer's autocast-off region is a nested graph: every graph is searched)
    targets = {str(n.target) for m in exported.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes}
    assert "nsa_dsl.forward.default" in targets, targets
    assert rel_error(exported.module()(x), layer(x)) < TOLERANCE[torch.float32]


def test_the_backward_outlives_a_dropped_compiled_pattern():
    """`nsa_dsl.compile(p)(...)` with the compiled pattern dropped before
    the backward (the GPU suite's own idiom): the backward still finds it
    (the autograd context keeps it; the registry holds it weakly). It
    failed with 'no compiled pattern' once the calls became ops."""
    import gc

    args = random_inputs(PATTERN, 1, 64, torch.float32, seed=2)
    for t in args.values():
        t.requires_grad_(True)
    o = nsa_dsl.compile(PATTERN)(**args)
    gc.collect()
    o.square().sum().backward()
    want = {n: t.grad.clone() for n, t in args.items()}
    for t in args.values():
        t.grad = None
    compiled = nsa_dsl.compile(PATTERN)
    compiled(**args).square().sum().backward()
    for n, t in args.items():
        assert torch.equal(t.grad, want[n]), n


def test_the_backward_gets_no_zero_gradients_for_kept_outputs(monkeypatch):
    """Only o carries a gradient; the indices and the branch outputs kept
    for the backward must reach it as None, not as zero tensors autograd
    allocates (three [B, T, HQ, Dv] of them: +3.3 GB of peak memory at 64k
    on the H100 until set_materialize_grads(False))."""
    from nsa_dsl import custom_ops

    seen = []
    inner = custom_ops._backward

    def spy(ctx, grads):
        seen.append(grads)
        return inner(ctx, grads)

    monkeypatch.setattr(custom_ops, "_backward", spy)
    torch.library.register_autograd("nsa_dsl::forward", custom_ops._backward,
                                    setup_context=custom_ops._setup_context)
    try:
        args = random_inputs(PATTERN, 1, 64, torch.float32, seed=3)
        for t in args.values():
            t.requires_grad_(True)
        nsa_dsl.compile(PATTERN)(**args).sum().backward()
    finally:
        torch.library.register_autograd("nsa_dsl::forward", inner, setup_context=custom_ops._setup_context)
    (grads,) = seen
    assert grads[0] is not None and len(grads) > 3
    assert all(g is None for g in grads[1:]), [None if g is None else tuple(g.shape) for g in grads[1:]]
    assert all(t.grad is not None for t in args.values())


def _assert_one_graph_like_eager(step, args: dict):
    """step(**args) traces into one graph with no break (explain), and
    compiled fullgraph gives eager's outputs and gradients (the loss is the
    first output's sum). Returns eager's outputs, the compiled step and its
    outputs, for the caller's own checks."""
    def first(out):
        return out[0] if isinstance(out, tuple) else out
    want = step(**args)
    first(want).sum().backward()
    want_grads = {n: t.grad.clone() for n, t in args.items()}
    for t in args.values():
        t.grad = None
    explained = torch._dynamo.explain(step)(**args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    run = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = run(**args)
    first(got).sum().backward()
    assert rel_error(first(got), first(want)) < TOLERANCE[torch.float32]
    for n, t in args.items():
        assert rel_error(t.grad, want_grads[n]) < TOLERANCE[torch.float32], n
    return want, run, got


def test_packed_calls_with_max_seqlen_compile_into_one_graph():
    """Packed documents (cu_seqlens) with max_seqlen: nothing is read on
    the host, so the call traces as the op: one graph, no break, eager's
    outputs, indices and gradients; select_blocks and the layer's packed
    forward too. (Before, every packed call was a graph break, and
    select_blocks still was until it took cu_seqlens.) cu_seqlens' values
    are still checked, by the op when it runs."""
    compiled = nsa_dsl.compile(PATTERN)
    args = random_inputs(PATTERN, 1, 96, torch.float32, seed=4)
    for t in args.values():
        t.requires_grad_(True)
    cu = torch.tensor([0, 40, 40, 96], dtype=torch.int32)

    def step(q, k, v, g_cmp, g_slc, g_swa, cu_seqlens=cu):
        o, idx = compiled(q[0] * 0.5, k[0], v[0], g_cmp[0], g_slc[0], g_swa[0], cu_seqlens=cu_seqlens,
                          max_seqlen=56, return_indices=True)
        return o.tanh(), idx, compiled.select_blocks(q[0] * 0.5, k[0], v[0], cu_seqlens=cu_seqlens, max_seqlen=56)

    want, run, got = _assert_one_graph_like_eager(step, args)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]) and torch.equal(got[2], want[1])
    with pytest.raises(ValueError, match="cu_seqlens: ends at 90"):
        run(**args, cu_seqlens=torch.tensor([0, 40, 90], dtype=torch.int32))

    torch._dynamo.reset()
    layer = NSAttention(PATTERN, 32, backend="kernels")
    layer.compiled
    x = torch.randn(1, 96, 32)
    explained = torch._dynamo.explain(layer)(x, cu, 56)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x, cu, 56)
    assert rel_error(got, layer(x, cu, 56)) < TOLERANCE[torch.float32]


def test_queries_of_the_last_positions_compile_into_one_graph():
    """q shorter than k (the last positions' queries): the call builds its
    packing from the shapes alone (no host read), so it traces as the op:
    one graph, eager's outputs and gradients."""
    compiled = nsa_dsl.compile(PATTERN)
    args = random_inputs(PATTERN, 2, 80, torch.float32, seed=6)
    for t in args.values():
        t.requires_grad_(True)

    def step(q, k, v, g_cmp, g_slc, g_swa):
        return compiled(q[:, 50:], k, v, g_cmp[:, 50:], g_slc[:, 50:], g_swa[:, 50:]).tanh()

    _, _, got = _assert_one_graph_like_eager(step, args)
    assert got.shape == (2, 30, 4, 16)
