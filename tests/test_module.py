"""NSAttention (nsa_dsl/module.py): shapes, parameter sets, the compression
MLP, gates, equality with a hand-assembled computation, gradcheck, and the
kernels backend against the reference backend (CPU: Triton's interpreter)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nsa_dsl.ir import Branch
from nsa_dsl.module import NSAttention
from nsa_dsl.phi import CompressionMLP
from nsa_dsl.parse import load, parse
from nsa_dsl.reference import reference

from conftest import HAS_CUDA


def make_pattern(pool="mlp", *, select=True, window=True, compress=True, combine=None, heads="q=4 kv=2",
                 dims="qk=16 v=16", cmp="block=16 stride=8", slc="block=16 top=3 initial=1 local=1", win=16,
                 name="t"):
    lines = [f"heads {heads}", f"dims {dims}"]
    if compress:
        lines.append(f"compress {cmp} pool={pool}")
    if select:
        lines.append(f"select {slc}")
    if window:
        lines.append(f"window size={win}")
    if combine:
        lines.append(f"combine {combine}")
    return parse(f"pattern {name} {{\n" + "\n".join(lines) + "\n}\n")


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- construction, shapes


@pytest.mark.parametrize("pool", ["mlp", "mean"])
@pytest.mark.parametrize("separate_kv", [True, False])
def test_output_shape_and_dtype(pool, separate_kv):
    torch.manual_seed(0)
    m = NSAttention(make_pattern(pool), 24, separate_kv=separate_kv, backend="reference")
    for T in (1, 15, 40):  # before, at and after the first compressed token
        x = torch.randn(2, T, 24)
        y = m(x)
        assert y.shape == (2, T, 24) and y.dtype == torch.float32
        assert torch.isfinite(y).all()


def test_pattern_from_path_and_errors(tmp_path):
    m = NSAttention("examples/window_only.nsa", 32, backend="reference")
    assert m.pattern == load("examples/window_only.nsa")
    two = tmp_path / "two.nsa"
    two.write_text("pattern a { heads q=2 kv=1\n dims qk=16\n window size=8 }\n"
                   "pattern b extends a { window size=16 }\n")
    with pytest.raises(ValueError, match="holds 2 patterns"):
        NSAttention(two, 32)
    NSAttention(load(two, name="b"), 32)  # a chosen Pattern is fine
    with pytest.raises(TypeError, match="Pattern or the path"):
        NSAttention(3, 32)
    with pytest.raises(ValueError, match="backend"):
        NSAttention(make_pattern(), 32, backend="cuda")
    with pytest.raises(ValueError, match="hidden_size"):
        NSAttention(make_pattern(), 0)

    m = NSAttention(make_pattern(), 32, backend="reference")
    with pytest.raises(ValueError, match=r"3-d tensor \[B, T, hidden=32\].*\[4, 32\]"):
        m(torch.randn(4, 32))
    with pytest.raises(ValueError, match=r"last dim 31 != hidden_size 32"):
        m(torch.randn(2, 8, 31))
    with pytest.raises(ValueError, match="at least one position"):
        m(torch.randn(2, 0, 32))


# --------------------------------------------------------------------------- parameter sets


def _names(m):
    return {n.split(".")[0] for n, _ in m.named_parameters()}


@pytest.mark.parametrize("pool", ["mlp", "mean"])
def test_parameter_sets(pool):
    p = make_pattern(pool)
    sep = NSAttention(p, 32, separate_kv=True)
    shared = NSAttention(p, 32, separate_kv=False)
    base = {"q_proj", "k_proj", "v_proj", "gate_proj", "o_proj"}
    phi = {"phi_k", "phi_v"} if pool == "mlp" else set()
    # pool=mean: the kernels pool the selection keys, so compression shares them.
    own_cmp = {"cmp_k_proj", "cmp_v_proj"} if pool == "mlp" else set()
    assert _names(sep) == base | phi | own_cmp | {"swa_k_proj", "swa_v_proj"}
    assert _names(shared) == base | phi
    assert sep.kv_source == {Branch.CMP: "cmp_kv" if pool == "mlp" else "kv", Branch.SLC: "kv", Branch.SWA: "swa_kv"}
    assert set(shared.kv_source.values()) == {"kv"}
    assert sep.gate_proj.out_features == 3 * 4
    assert sep.q_proj.weight.shape == (4 * 16, 32) and sep.k_proj.weight.shape == (2 * 16, 32)
    assert sep.o_proj.weight.shape == (32, 4 * 16)
    assert sep.q_proj.bias is None and NSAttention(p, 32, bias=True).q_proj.bias is not None


def test_parameter_sets_partial_patterns():
    # Window only: the window reads the mandatory k, v; nothing else exists.
    w = NSAttention(make_pattern(compress=False, select=False), 32)
    assert _names(w) == {"q_proj", "k_proj", "v_proj", "gate_proj", "o_proj"}
    assert w.kv_source == {Branch.SWA: "kv"}
    # mlp compression + window, no selection: the window takes k, v, compression its own pair.
    cw = NSAttention(make_pattern("mlp", select=False), 32)
    assert cw.kv_source == {Branch.CMP: "cmp_kv", Branch.SWA: "kv"}
    assert "cmp_k_proj" in _names(cw) and "swa_k_proj" not in _names(cw)
    # Only the combined branches are gated.
    moba = NSAttention(make_pattern("mean", window=False, combine="slc"), 32)
    assert moba.gated_branches == (Branch.SLC,) and moba.gate_proj.out_features == 4
    y = moba(torch.randn(1, 40, 32))
    assert y.shape == (1, 40, 32)


# --------------------------------------------------------------------------- phi


def phi_by_loop(phi: CompressionMLP, x):
    """The compression MLP written block by block (independent of unfold)."""
    B, T, H, D = x.shape
    out = []
    for i in range(phi.num_compressed(T)):
        blk = x[:, i * phi.stride: i * phi.stride + phi.block] + phi.pos[:, None, :]  # [B, l, H, D]
        flat = blk.permute(0, 2, 1, 3).reshape(B, H, phi.block * D)
        out.append(blk.mean(dim=1) + phi.fc2(F.gelu(phi.fc1(flat))))
    return torch.stack(out, dim=1) if out else x.new_zeros(B, 0, H, D)


def test_phi_shapes_and_values():
    torch.manual_seed(1)
    phi = CompressionMLP(8, 4, 16, hidden=12).double()
    phi.fc2.reset_parameters()  # a trained-looking MLP path, not the zero start
    for T, Tc in ((7, 0), (8, 1), (11, 1), (12, 2), (45, 10)):
        x = torch.randn(3, T, 2, 16, dtype=torch.float64)
        y = phi(x)
        assert y.shape == (3, Tc, 2, 16)
        torch.testing.assert_close(y, phi_by_loop(phi, x), rtol=1e-12, atol=1e-12)


def test_phi_shapes_in_module_and_gradients():
    torch.manual_seed(2)
    m = NSAttention(make_pattern("mlp"), 32, backend="reference")
    x = torch.randn(2, 48, 32, requires_grad=True)
    args = m.attention_inputs(x)
    Tc = (48 - 16) // 8 + 1
    assert args["k_cmp"].shape == (2, Tc, 2, 16) and args["v_cmp"].shape == (2, Tc, 2, 16)
    assert args["k_swa"].shape == (2, 48, 2, 16)
    m(x).square().sum().backward()
    for name, prm in m.named_parameters():
        if name.endswith("fc1.weight") or name.endswith("fc1.bias"):
            # phi's last layer starts at zero (phi = mean pooling), so the first
            # layer's gradient is zero until the last layer has moved.
            assert prm.grad is not None and prm.grad.abs().sum() == 0, name
            continue
        assert prm.grad is not None and prm.grad.abs().sum() > 0, f"{name} got no gradient"
    assert x.grad.abs().sum() > 0
    for phi in (m.phi_k, m.phi_v):
        with torch.no_grad():
            phi.fc2.weight.normal_(0, 0.1)
    m.zero_grad()
    m(x).square().sum().backward()
    assert m.phi_k.fc1.weight.grad.abs().sum() > 0 and m.phi_v.fc1.weight.grad.abs().sum() > 0


def test_phi_starts_as_mean_pooling():
    torch.manual_seed(5)
    phi = CompressionMLP(8, 4, 16).double()
    x = torch.randn(2, 30, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        phi.pos.zero_()
    expected = torch.stack([x[:, i * 4: i * 4 + 8].mean(1) for i in range(phi.num_compressed(30))], dim=1)
    torch.testing.assert_close(phi(x), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- gates


def test_gates_in_unit_interval_and_start_near_half():
    torch.manual_seed(3)
    m = NSAttention(make_pattern("mlp"), 32)
    x = torch.randn(2, 20, 32)
    g = m.gates(x)
    assert set(g) == {Branch.CMP, Branch.SLC, Branch.SWA}
    for t in g.values():
        assert t.shape == (2, 20, 4)
        assert ((t > 0) & (t < 1)).all()
        assert (t - 0.5).abs().max() < 0.1  # initialised near 0.5
    with torch.no_grad():
        m.gate_proj.weight.normal_(0, 10.0)
    for t in m.gates(100 * x).values():
        assert ((t >= 0) & (t <= 1)).all()


# --------------------------------------------------------------------------- exact math


def _lin(mod, x):
    return F.linear(x, mod.weight, mod.bias)


def hand_assembled(m: NSAttention, x):
    """Projections, phi, gates and the dense reference, written out by hand."""
    p = m.pattern
    B, T, _ = x.shape
    HQ, HKV, Dqk, Dv = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v
    q = _lin(m.q_proj, x).view(B, T, HQ, Dqk)
    k = _lin(m.k_proj, x).view(B, T, HKV, Dqk)
    v = _lin(m.v_proj, x).view(B, T, HKV, Dv)
    kc = _lin(m.cmp_k_proj, x).view(B, T, HKV, Dqk)
    vc = _lin(m.cmp_v_proj, x).view(B, T, HKV, Dv)
    ks = _lin(m.swa_k_proj, x).view(B, T, HKV, Dqk)
    vs = _lin(m.swa_v_proj, x).view(B, T, HKV, Dv)
    g = torch.sigmoid(_lin(m.gate_proj, x)).view(B, T, 3, HQ)
    o = reference(p, q, k, v, g_cmp=g[:, :, 0], g_slc=g[:, :, 1], g_swa=g[:, :, 2],
                  k_cmp=phi_by_loop(m.phi_k, kc), v_cmp=phi_by_loop(m.phi_v, vc), k_swa=ks, v_swa=vs)
    return _lin(m.o_proj, o.reshape(B, T, HQ * Dv))


def test_reference_backend_equals_hand_assembled_float64():
    torch.manual_seed(4)
    m = NSAttention(make_pattern("mlp"), 32, bias=True, backend="reference", dtype=torch.float64)
    for phi in (m.phi_k, m.phi_v):
        phi.fc2.reset_parameters()  # exercise the MLP path too, not only its zero start
    x = torch.randn(2, 56, 32, dtype=torch.float64)
    y = m(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, hand_assembled(m, x), rtol=1e-12, atol=1e-12)


def test_gradcheck_all_branches_pool_mlp():
    # Tiny sizes (the reference takes any dims): T=16 gives 4 selection blocks,
    # one of them chosen by score, and 7 compressed tokens.
    p = make_pattern("mlp", heads="q=2 kv=1", dims="qk=4 v=3", cmp="block=4 stride=2",
                     slc="block=4 top=3 initial=1 local=1", win=5)
    torch.manual_seed(5)
    m = NSAttention(p, 6, bias=True, phi_hidden=5, backend="reference", dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    params = [prm.detach().clone().requires_grad_(True) for prm in m.parameters()]
    x = torch.randn(1, 16, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_autocast_bf16_reference_cpu():
    torch.manual_seed(6)
    m = NSAttention(make_pattern("mlp"), 32, backend="reference")
    x = torch.randn(2, 40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        args = m.attention_inputs(x)
        y = m(x)
    assert {t.dtype for t in args.values()} == {torch.bfloat16}
    assert y.shape == (2, 40, 32) and torch.isfinite(y).all()
    assert rel_err(y.float(), m(x)) < 0.05


# --------------------------------------------------------------------------- kernels backend


def _pair(pool, seed, **kw):
    torch.manual_seed(seed)
    p = make_pattern(pool)
    ref = NSAttention(p, 32, backend="reference", **kw)
    ker = NSAttention(p, 32, backend="kernels", **kw)
    ker.load_state_dict(ref.state_dict())
    return ref, ker


@pytest.mark.parametrize("pool,separate_kv", [("mlp", True), ("mean", True), ("mean", False)])
def test_kernels_match_reference_fp32(pool, separate_kv):
    device = "cuda" if HAS_CUDA else "cpu"
    ref, ker = _pair(pool, 7, separate_kv=separate_kv, device=device)
    x = torch.randn(2, 64, 32, device=device)
    x_ref, x_ker = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, y_ker = ref(x_ref), ker(x_ker)
    assert y_ker.dtype == torch.float32
    assert rel_err(y_ker, y_ref) < 1e-5

    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_ker.backward(dy)
    assert rel_err(x_ker.grad, x_ref.grad) < 1e-4
    for (name, a), (_, b) in zip(ker.named_parameters(), ref.named_parameters()):
        if b.grad.norm() < 1e-6:
            # e.g. phi_k.fc2.bias: a shift shared by all compressed keys leaves
            # every softmax unchanged, so its true gradient is 0 (both sides
            # hold rounding noise); relative error means nothing there.
            assert a.grad.norm() < 1e-6, name
            continue
        assert rel_err(a.grad, b.grad) < 1e-4, name


def test_kernels_compiled_once_and_copyable():
    _, ker = _pair("mean", 8)
    x = torch.randn(1, 32, 32, device="cuda" if HAS_CUDA else "cpu")
    ker = ker.to(x.device)
    with torch.no_grad():
        y = ker(x)
        first = ker.compiled
        ker(x)
        assert ker.compiled is first
        clone = copy.deepcopy(ker)  # the compiled kernels are rebuilt, not copied
        assert clone._compiled is None
        torch.testing.assert_close(clone(x), y)


def test_kernels_reject_a_dtype_the_pattern_forbids():
    p = parse("pattern t { heads q=2 kv=1\n dims qk=16\n window size=16\n dtype bf16 }")
    m = NSAttention(p, 16, backend="kernels")
    with pytest.raises(ValueError, match="run in bf16"):
        m(torch.randn(1, 8, 16))


def test_auto_backend_uses_reference_on_cpu():
    m = NSAttention(make_pattern("mean"), 16)
    assert m.resolve_backend(torch.float32, torch.device("cpu")) == "reference"
    assert m.resolve_backend(torch.bfloat16, torch.device("cuda")) == "kernels"
    with pytest.warns(RuntimeWarning, match="dense reference"):
        assert m.resolve_backend(torch.float64, torch.device("cuda")) == "reference"


@pytest.mark.gpu
def test_kernels_autocast_bf16_cuda():
    torch.manual_seed(9)
    p = make_pattern("mlp")
    m = NSAttention(p, 32, device="cuda")  # auto -> kernels
    x = torch.randn(2, 256, 32, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    ref = NSAttention(p, 32, backend="reference", device="cuda", dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    assert rel_err(y, ref(x.double())) < 3e-2
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("pool", ["mlp", "mean"])
def test_gather_backend_equals_reference_backend_with_gradients(pool):
    torch.manual_seed(1)
    m = NSAttention(make_pattern(pool), 24, backend="reference", dtype=torch.float64, query_chunk=13)
    x = torch.randn(2, 50, 24, dtype=torch.float64, requires_grad=True)
    y_ref = m(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *m.parameters()])
    m.backend = "gather"
    assert m.resolve_backend(torch.float64, x.device) == "gather"
    y = m(x)
    g = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ref, g):
        assert torch.allclose(b, a, rtol=1e-9, atol=1e-11)
