"""CPU tests of the pure parts of benchmarks/bench.py: FLOP and byte counts
against brute-force enumeration, the FlexAttention masks and block layouts
against dense masks, rows, the table and the plot."""
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

import nsa_dsl

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("nsa_bench", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


def _pattern(q=4, kv=2, qk=32, v=None, cblock=8, cstride=4, pool="mean", sblock=8, top=3, initial=1, local=2,
             window=16, combine=None):
    text = f"pattern p {{ heads q={q} kv={kv} dims qk={qk}{'' if v is None else f' v={v}'}"
    if cblock:
        text += f" compress block={cblock} stride={cstride} pool={pool}"
    if sblock:
        text += f" select block={sblock} top={top} initial={initial} local={local}"
    if window:
        text += f" window size={window}"
    if combine:
        text += f" combine {combine}"
    return nsa_dsl.parse(text + " }")


# --------------------------------------------------------------- brute force
def brute_cmp_visible(t, block, stride, T):
    tc = max(0, (T - block) // stride + 1)
    return sum(1 for i in range(tc) if i * stride + block - 1 <= t)


def brute_selected(t, block, top, initial, local, rng):
    """One valid selection for query t (random scores for the free choices)."""
    qb = t // block
    visible = list(range(qb + 1))
    forced = {j for j in visible if j < initial or j > qb - local}
    rest = [j for j in visible if j not in forced]
    rng.shuffle(rest)
    return sorted(forced | set(rest[:max(0, top - len(forced))])) if len(visible) > top else visible


def brute_keys(blocks, block, t):
    return sum(len(set(range(j * block, (j + 1) * block)) & set(range(t + 1))) for j in blocks)


@pytest.mark.parametrize("block,top,initial,local", [(8, 3, 1, 2), (4, 5, 0, 1), (16, 2, 1, 1), (8, 4, 2, 2),
                                                     (8, 3, 0, 0), (8, 1, 0, 1)])
def test_slc_keys_match_simulated_selection(block, top, initial, local):
    rng = random.Random(block * 100 + top)
    for t in range(150):
        n, exact = bench.slc_keys(t, block, top, local)
        for _ in range(3):
            got = brute_keys(brute_selected(t, block, top, initial, local, rng), block, t)
            if exact:
                assert n == got, (t, n, got)
            else:
                assert got <= n
        if local >= 1:
            assert exact


def test_nsa_flops_match_brute_force_sums():
    rng = random.Random(0)
    for kw in ({}, {"qk": 48, "v": 16, "pool": "mlp"}, {"top": 3, "initial": 1, "local": 2},
               {"window": None}, {"combine": "slc", "window": None, "local": 1, "top": 2}):
        p = _pattern(**kw)
        T = 123
        hq, dqk, dv = p.heads.q, p.dims.qk, p.dims.v
        c, s = p.compress, p.select
        cmp_keys = sum(brute_cmp_visible(t, c.block, c.stride, T) for t in range(T))
        slc = sum(brute_keys(brute_selected(t, s.block, s.top, s.initial, s.local, rng), s.block, t)
                  for t in range(T))
        swa = sum(len(range(max(0, t - p.window.size + 1), t + 1)) for t in range(T)) if p.window else 0
        combined = {b.value for b in p.combined_branches}
        cmp_per = 2 * dqk + (2 * dv if "cmp" in combined else 0)
        want = {
            "cmp": hq * cmp_keys * cmp_per,
            "score": 0 if s.is_static else hq * cmp_keys * 2 * dqk,
            "slc": hq * slc * (2 * dqk + 2 * dv),
            "swa": hq * swa * (2 * dqk + 2 * dv),
        }
        got = bench.nsa_flops(p, T)
        for key, value in want.items():
            assert got[key] == value, (kw, key)
        assert got["fwd"] == sum(want.values())
        bwd = sum(want[b] for b in ("cmp", "slc", "swa") if b in combined)
        assert got["bwd"] == pytest.approx(2.5 * bwd)
        assert got["fwd+bwd"] == pytest.approx(got["fwd"] + 2.5 * bwd)


def test_static_selection_has_no_scoring():
    p = _pattern(top=3, initial=1, local=2)
    assert p.select.is_static
    assert bench.nsa_flops(p, 64)["score"] == 0


def test_dense_flops_is_causal_enumeration():
    p = _pattern(qk=48, v=16)
    T = 50
    pairs = sum(1 for t in range(T) for j in range(T) if j <= t)
    assert bench.dense_flops(p, T) == 2 * (48 + 16) * p.heads.q * pairs
    assert bench.pass_flops(10.0, "fwd") == 10.0
    assert bench.pass_flops(10.0, "fwd+bwd") == 35.0
    assert bench.pass_flops(10.0, "fwd+bwd", bwd=5.0) == 15.0


def _dense(mask_mod, H, T):
    h = torch.arange(H)[:, None, None]
    q = torch.arange(T)[None, :, None]
    k = torch.arange(T)[None, None, :]
    return mask_mod(0, h, q, k).expand(H, T, T)


def test_static_mask_keys_match_mask_mod_and_sets():
    for block, initial, local, window in ((8, 1, 2, 20), (16, 0, 1, 8), (8, 2, 0, None), (4, 1, 3, 7)):
        T = 96
        dense = _dense(bench.static_mask_mod(block, initial, local, window), 1, T)[0]
        for t in range(T):
            keys = {j for j in range(t + 1)
                    if j // block < initial or j // block > t // block - local
                    or (window and t - j < window)}
            assert bench.static_mask_keys(t, block, initial, local, window) == len(keys)
            assert int(dense[t].sum()) == len(keys)
        p = _pattern(sblock=block, initial=initial, local=local, window=window, top=initial + local + 1,
                     cblock=block, cstride=block // 2 or 1)
        assert bench.static_mask_flops(p, T) == p.heads.q * int(dense.sum()) * (2 * p.dims.qk + 2 * p.dims.v)


def test_union_length():
    assert bench.union_length([]) == 0
    assert bench.union_length([(0, 3), (2, 5), (7, 7), (9, 8)]) == 7
    assert bench.union_length([(0, 0), (1, 1)]) == 2


def _random_indices(T, H, block, top, initial, local, seed=0):
    rng = random.Random(seed)
    idx = torch.full((1, T, H, top), -1, dtype=torch.int32)
    for t in range(T):
        for h in range(H):
            chosen = brute_selected(t, block, top, initial, local, rng)
            rng.shuffle(chosen)
            idx[0, t, h, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return idx


def test_selection_table_and_oracle_keys():
    T, H, block, top, window = 200, 3, 8, 4, 24
    idx = _random_indices(T, H, block, top, 1, 2)
    table = bench.selection_table(idx, T, block)
    assert table.shape == (H, T, -(-T // block))
    for t in (0, 7, 8, 63, 199):
        for h in range(H):
            want = {int(j) for j in idx[0, t, h] if j >= 0}
            assert set(torch.nonzero(table[h, t]).flatten().tolist()) == want
    for w in (window, None):
        dense = _dense(bench.oracle_mask_mod(table, 1, block, w), H, T)
        assert bench.oracle_keys(idx, block, w) == int(dense.sum())
    with pytest.raises(ValueError):
        bench.selection_table(idx[:, :10], T, block)


def _check_layout(tables, dense, fblock):
    """Block layout vs the dense mask: every tile with a kept entry is listed
    exactly once (partial or full), full tiles are wholly kept, nothing else."""
    kv_num, kv_idx, full_num, full_idx = tables
    H, T, _ = dense.shape
    n = T // fblock
    tiles = dense.view(H, n, fblock, n, fblock)
    any_t = tiles.any(-1).any(2)
    all_t = tiles.all(-1).all(2)
    for h in range(H):
        for r in range(n):
            part = kv_idx[0, h, r, :kv_num[0, h, r]].tolist()
            full = full_idx[0, h, r, :full_num[0, h, r]].tolist()
            assert part == sorted(part) and full == sorted(full)
            assert not set(part) & set(full)
            assert set(part) | set(full) == set(torch.nonzero(any_t[h, r]).flatten().tolist())
            assert all(bool(all_t[h, r, c]) for c in full)
    return any_t, all_t


@pytest.mark.parametrize("sel_block,fblock", [(8, 32), (32, 32), (64, 16)])
def test_flex_block_tables_oracle(sel_block, fblock):
    T, H, top, window = 256, 2, 4, 40
    idx = _random_indices(T, H, sel_block, top, 1, 2, seed=sel_block)
    table = bench.selection_table(idx, T, sel_block)
    dense = _dense(bench.oracle_mask_mod(table, 1, sel_block, window), H, T)
    tables = bench.flex_block_tables(table, sel_block, window, fblock=fblock)
    _check_layout(tables, dense, fblock)
    # expansion to query heads: head h uses KV head h // G
    G = 3
    wide = bench.expand_heads(tables, G)
    assert wide[0].shape == (1, H * G, T // fblock)
    for h in range(H * G):
        assert torch.equal(wide[1][0, h], tables[1][0, h // G])


def test_flex_block_tables_static_finds_full_tiles():
    T, block, fblock = 512, 16, 32
    for initial, local, window in ((1, 2, 100), (2, 1, None), (0, 1, 64)):
        table = bench.static_table(T, block, initial, local)
        dense = _dense(bench.static_mask_mod(block, initial, local, window), 1, T)
        tables = bench.flex_block_tables(table, block, window, fblock=fblock)
        any_t, all_t = _check_layout(tables, dense, fblock)
        if window and window >= 2 * fblock:
            assert int(tables[2].sum()) > 0  # tiles wholly inside the window are full
        # the static table is the mask without its window
        no_win = _dense(bench.static_mask_mod(block, initial, local, None), 1, T)[0]
        expanded = table[0].repeat_interleave(block, dim=1)[:, :T] & torch.tril(torch.ones(T, T, dtype=torch.bool))
        assert torch.equal(expanded, no_win)


def test_tile_density():
    T, fblock = 256, 32
    causal = bench.static_table(T, 8, T, 0)  # initial covers everything: dense causal
    tables = bench.flex_block_tables(causal, 8, None, fblock=fblock)
    assert bench.tile_density(tables) == pytest.approx(1.0)
    window_only = bench.flex_block_tables(bench.static_table(T, 8, 0, 0), 8, 32, fblock=fblock)
    n = T // fblock
    assert bench.tile_density(window_only) == pytest.approx((2 * n - 1) / (n * (n + 1) / 2))


def test_flex_block_tables_rejects_bad_tiles():
    with pytest.raises(ValueError):
        bench.flex_block_tables(torch.zeros(1, 100, 13, dtype=torch.bool), 8, None, fblock=32)
    with pytest.raises(ValueError):
        bench.flex_block_tables(torch.zeros(1, 96, 4, dtype=torch.bool), 24, None, fblock=32)


def test_oracle_block_mask_runs_in_eager_flex_on_cpu():
    """The BlockMask built from the tables is accepted by FlexAttention, and
    its mask_mod gives the dense masked attention (eager flex is the unfused
    reference: it checks the mask semantics, the layout is checked above)."""
    flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
    T, HKV, G, block, top, window = 256, 2, 2, 32, 3, 48
    idx = _random_indices(T, HKV, block, top, 1, 1, seed=5)
    table = bench.selection_table(idx, T, block)
    mm = bench.oracle_mask_mod(table, G, block, window)
    tables = bench.expand_heads(bench.flex_block_tables(table, block, window), G)
    bm = bench.make_block_mask(tables, mm, T)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HKV * G, T, 32, generator=g)
    k = torch.randn(1, HKV, T, 32, generator=g)
    v = torch.randn(1, HKV, T, 16, generator=g)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            o = flex_mod.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
        except Exception as e:  # pragma: no cover - depends on the torch build
            pytest.skip(f"eager flex_attention unavailable on CPU: {e}")
    dense = _dense(mm, HKV * G, T)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=dense[None])
    assert torch.allclose(o, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------- bytes, floor, rows
def test_io_bytes():
    p = _pattern(q=4, kv=2, qk=32, v=16, pool="mlp", cblock=8, cstride=4)
    T = 40
    qkvo = T * 4 * 32 + T * 2 * 32 + T * 2 * 16 + T * 4 * 16
    assert bench.io_bytes(p, T, "dense", "fwd") == 2 * qkvo
    assert bench.io_bytes(p, T, "dense", "fwd+bwd") == 4 * qkvo
    tc = (T - 8) // 4 + 1
    nsa = qkvo + 3 * T * 4 + tc * 2 * (32 + 16)
    assert bench.io_bytes(p, T, "nsa_dsl", "fwd") == 2 * nsa


def test_floor_and_make_row():
    ceil = {"matmul_flops_per_s": 1e15, "copy_bytes_per_s": 4e12}
    assert bench.floor_ms(1e12, 4e9, 1e15, 4e12) == pytest.approx(1.0)  # both terms 1 ms
    assert bench.floor_ms(2e12, 4e9, 1e15, 4e12) == pytest.approx(2.0)  # compute-bound
    assert bench.floor_ms(1e12, 8e9, 1e15, 4e12) == pytest.approx(2.0)  # memory-bound
    assert bench.floor_ms(None, None, 1e15, 4e12) is None
    row = bench.make_row("p", 8192, "nsa_dsl", "fwd", 4.0, flops=2e12, nbytes=4e9, peak_gb=1.23456, ceilings=ceil)
    assert set(bench.ROW_KEYS) <= set(row)
    assert row["tflops"] == pytest.approx(500.0)
    assert row["floor_ms"] == pytest.approx(2.0)
    assert row["floor_frac"] == pytest.approx(0.5)
    assert row["peak_mem_gb"] == pytest.approx(1.2346)
    assert "error" not in row and "note" not in row
    bad = bench.make_row("p", 8192, "flex", "fwd+bwd", None, flops=1e12, ceilings=ceil, error="OOM", note="n")
    assert bad["ms"] is None and bad["tflops"] is None and bad["floor_frac"] is None
    assert bad["error"] == "OOM" and bad["note"] == "n"
    json.dumps(row), json.dumps(bad)


def _rows():
    mk = bench.make_row
    return [
        mk("a", 8192, "sdpa_flash", "fwd", 10.0),
        mk("a", 8192, "nsa_dsl", "fwd", 2.0, peak_gb=1.5),
        mk("a", 8192, "flex", "fwd", 5.0),
        mk("a", 8192, "nsa_dsl", "fwd", 0.5, stage="slc_fwd"),
        mk("a", 8192, "nsa_dsl", "fwd+bwd", None, error="NotImplementedError: backward"),
        mk("a", 8192, "sdpa_flash", "fwd+bwd", 30.0),
        mk("a", 16384, "nsa_dsl", "fwd", 4.0),
        mk("a", 16384, "sdpa_flash", "fwd", 40.0),
        mk("b", 8192, "sdpa_flash", "fwd", None, error="RuntimeError: no kernel"),
        mk("b", 8192, "sdpa_flash_padv", "fwd", 12.0),
        mk("b", 8192, "nsa_dsl", "fwd", 3.0),
        mk("b", 8192, "flex_oracle_blocks", "fwd", None, error="skipped: time budget (3 s left)"),
        mk("a", 8192, "cold_start_nsa_cold", "fwd", 1500.0),
    ]


def test_attach_speedups_prefers_flash_then_padded():
    rows = bench.attach_speedups(_rows())
    by = {(r["pattern"], r["T"], r["impl"], r["pass"], r["stage"]): r for r in rows}
    assert by[("a", 8192, "nsa_dsl", "fwd", None)]["speedup_vs_sdpa"] == pytest.approx(5.0)
    assert by[("a", 8192, "flex", "fwd", None)]["speedup_vs_sdpa"] == pytest.approx(2.0)
    assert by[("a", 8192, "sdpa_flash", "fwd", None)]["speedup_vs_sdpa"] == pytest.approx(1.0)
    assert by[("a", 8192, "nsa_dsl", "fwd", "slc_fwd")]["speedup_vs_sdpa"] is None
    assert by[("a", 8192, "nsa_dsl", "fwd+bwd", None)]["speedup_vs_sdpa"] is None
    assert by[("a", 16384, "nsa_dsl", "fwd", None)]["speedup_vs_sdpa"] == pytest.approx(10.0)
    assert by[("b", 8192, "nsa_dsl", "fwd", None)]["speedup_vs_sdpa"] == pytest.approx(4.0)
    assert by[("a", 8192, "cold_start_nsa_cold", "fwd", None)]["speedup_vs_sdpa"] is None


def test_format_table():
    text = bench.format_table(bench.attach_speedups(_rows()))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["pattern", "T", "pass"]
    body = [ln for ln in lines[2:] if ln and ln.split()[0] in ("a", "b")]
    assert len(body) == 4  # (a, 8192, fwd), (a, 8192, fwd+bwd), (a, 16384, fwd), (b, 8192, fwd)
    a_fwd = body[0].split()
    assert a_fwd[:6] == ["a", "8192", "fwd", "2.000", "10.000", "5.000"]
    assert a_fwd[6] == "-" and a_fwd[7] == "5.00" and a_fwd[-1] == "1.50"
    assert body[1].split()[3] == "ERR"
    b_fwd = body[3].split()
    assert b_fwd[4] == "12.000*" and b_fwd[6] == "skip"
    assert "sdpa_flash_padv" in text
    stages = bench.format_stages(_rows() + [bench.make_row("a", 8192, "flash_nsa_nowindow", "fwd+bwd", 0.25,
                                                           stage="bwd_kernel")])
    # ours and the peer's kernels on separate lines, each named by its implementation
    assert stages.splitlines() == ["a flash_nsa_nowindow T=8192 ms/call: bwd_kernel=0.250",
                                   "a nsa_dsl T=8192 ms/call: slc_fwd=0.500"]
    assert "1.50 s" in bench.format_cold(_rows())


def test_kernel_stage_grouping():
    names = ("cmp_pool", "cmp_fwd", "slc_topk", "slc_fwd", "combine", "cmp_bwd", "cmp_pool_bwd", "slc_bwd")
    assert bench.kernel_stage("cmp_fwd", names) == "cmp_fwd"
    assert bench.kernel_stage("cmp_bwd_dq", names) == "cmp_bwd"
    assert bench.kernel_stage("cmp_pool_bwd", names) == "cmp_pool_bwd"
    assert bench.kernel_stage("slc_bwd_dkdv", names) == "slc_bwd"
    assert bench.kernel_stage("void at::native::vectorized_elementwise_kernel", names) is None
    # the compressed and window dQ in one kernel, rendered with swa_bwd: its
    # own row, not lost among the unnamed kernels (bench and stage_times
    # counted its 16 ms at 64k as "other" until session 27)
    assert bench.kernel_stage("cmp_swa_bwd_dq", names + ("swa_bwd",)) == "swa_bwd"
    events = [("cmp_fwd", 300.0), ("cmp_fwd", 300.0), ("cmp_bwd_dq", 600.0), ("cmp_bwd_dkdv", 900.0),
              ("elementwise_kernel", 30.0), ("memset", 60.0)]
    stages, other_ms, others = bench.group_kernel_times(events, names, n_calls=3)
    assert stages["cmp_fwd"] == ("cmp_fwd", pytest.approx(0.2))
    assert stages["cmp_bwd_dq"] == ("cmp_bwd", pytest.approx(0.2))
    assert stages["cmp_bwd_dkdv"] == ("cmp_bwd", pytest.approx(0.3))
    assert other_ms == pytest.approx(0.03)
    assert set(others) == {"elementwise_kernel", "memset"}


def test_write_json_roundtrip(tmp_path):
    path = tmp_path / "h200.json"
    header = {"device": "X", "matmul_tflops": 800.0, "copy_tbps": 4.3}
    rows = bench.attach_speedups(_rows())
    bench.write_json(path, header, rows)
    doc = json.loads(path.read_text())
    assert doc["device"] == "X" and len(doc["rows"]) == len(rows)
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_rows(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "h200.png"
    assert bench.plot_rows(bench.attach_speedups(_rows()), path, title="t")
    assert path.stat().st_size > 1000
    assert not bench.plot_rows([], tmp_path / "empty.png")


def test_config_and_lengths():
    assert bench.parse_lengths("8192, 16k,32K") == (8192, 16384, 32768)
    cfg = bench.resolve_config(bench.build_parser().parse_args(["--quick"]))
    assert cfg.lengths == (8192, 16384) and cfg.patterns == ("examples/bench_paper128.nsa",)
    assert cfg.rep < 100 and cfg.flex and cfg.flex_dynamic is None
    cfg = bench.resolve_config(bench.build_parser().parse_args(["--lengths", "1024", "--no-flex"]))
    assert cfg.lengths == (1024,) and len(cfg.patterns) == 3 and not cfg.flex
    for path in bench.DEFAULT_PATTERNS:
        p = nsa_dsl.load(ROOT / path)
        assert p.select is not None and p.window is not None


def test_bench_patterns():
    paper = nsa_dsl.load(ROOT / "examples" / "bench_paper128.nsa")
    small = nsa_dsl.load(ROOT / "examples" / "bench_small_group.nsa")
    assert (paper.heads.q, paper.heads.kv, paper.dims.qk, paper.dims.v) == (64, 4, 128, 128)
    assert (small.heads.q, small.heads.kv) == (16, 8)
    for p in (paper, small):
        assert (p.compress.block, p.compress.stride, p.compress.pool.value) == (32, 16, "mean")
        assert (p.select.block, p.select.top, p.select.initial, p.select.local) == (64, 16, 1, 2)
        assert p.window.size == 512


def test_format_loop_orders():
    rows = [bench.make_row("s", 8192, "nsa_dsl", "fwd", 3.0),
            bench.make_row("s", 8192, "nsa_dsl_group-centric", "fwd", 12.5, note="selection forward group-centric;"
                           " the plan runs block-centric"),
            bench.make_row("s", 8192, "nsa_dsl", "fwd+bwd", 9.0)]
    text = bench.format_loop_orders(rows)
    assert text.splitlines() == ["s T=8192 fwd: plan's order 3.000 ms, group-centric 12.500 ms (selection forward"
                                 " group-centric; the plan runs block-centric)"]
    assert bench.format_loop_orders(rows[:1]) == ""


def test_run_config_reports_tuned_overrides():
    class Tuned:
        def overrides_for(self, length):
            return {"SLC_TOKENS": 8} if length > 4096 else {}

    assert bench.run_config(Tuned(), 8192) == {"SLC_TOKENS": 8}
    assert bench.run_config(Tuned(), 1024) == {}
    assert bench.run_config(object(), 8192) == {}


def test_other_loop_order_row_runs_the_other_kernel(monkeypatch):
    # bench.py imports nsa_dsl only inside its functions; the other-loop-order
    # row once compiled through an unimported name and every such row on the
    # H200 was a NameError. Drive the real path on CPU (interpreter, fp32).
    p = _pattern(q=4, kv=2, qk=16, cblock=16, cstride=16, sblock=16, top=2, initial=1, local=1, window=16)
    compiled = nsa_dsl.compile(p)
    assert compiled.slc_fwd_at(48) == "group-centric"
    gpu_inputs = bench.nsa_inputs
    cpu_inputs = lambda pattern, T: gpu_inputs(pattern, T, device="cpu", dtype=torch.float32)  # noqa: E731
    monkeypatch.setattr(bench, "nsa_inputs", cpu_inputs)
    calls = []

    def fake_bench_ms(fn, warmup, rep, grad_to_none=None):
        calls.append(fn())  # the timed call must run
        return 1.25

    monkeypatch.setattr(bench, "bench_ms", fake_bench_ms)
    rows = []
    cfg = bench.resolve_config(bench.build_parser().parse_args(["--quick"]))
    bench.run_other_loop_order(compiled, p, 48, cfg, {}, rows.append, {"fwd": 1.0}, None)
    assert len(rows) == 1
    row = rows[0]
    assert "error" not in row, row.get("error")
    assert row["impl"] == "nsa_dsl_block-centric" and row["loop_order"] == "block-centric"
    assert row["ms"] == 1.25 and len(calls) == 1
    x = cpu_inputs(p, 48)
    torch.testing.assert_close(calls[0], bench.nsa_call(compiled, x), rtol=1e-4, atol=1e-5)


def test_other_loop_order_row_runs_the_tuned_record_with_only_the_order_changed(monkeypatch):
    # A tuned call's other-order row once ran the plan's default tiles, so
    # it compared tunings, not orders.
    p = _pattern(q=4, kv=2, qk=16, cblock=16, cstride=16, sblock=16, top=2, initial=1, local=1, window=16)
    tuned = {"SLC_FWD_ORDER": 1, "BC_REDUCE_ROWS": 16, "SLC_TOKENS": 2}

    class Tuned:  # what run_other_loop_order reads of a TunedPattern
        def slc_fwd_at(self, T):
            return "block-centric"

        def overrides_for(self, T):
            return tuned

    compiled_with = []
    monkeypatch.setattr(nsa_dsl, "compile", lambda pattern, **kw: compiled_with.append(kw) or nsa_dsl.check(pattern))
    monkeypatch.setattr(bench, "nsa_inputs", lambda pattern, T: {})
    monkeypatch.setattr(bench, "nsa_call", lambda compiled, x: None)
    monkeypatch.setattr(bench, "bench_ms", lambda fn, warmup, rep, grad_to_none=None: 2.5)
    rows = []
    cfg = bench.resolve_config(bench.build_parser().parse_args(["--quick"]))
    bench.run_other_loop_order(Tuned(), p, 48, cfg, {}, rows.append, {"fwd": 1.0}, None)
    assert compiled_with == [{"slc_fwd": "group-centric", "overrides": {"BC_REDUCE_ROWS": 16, "SLC_TOKENS": 2}}]
    assert rows[0]["impl"] == "nsa_dsl_group-centric" and rows[0]["ms"] == 2.5
    assert rows[0]["config"] == {"BC_REDUCE_ROWS": 16, "SLC_TOKENS": 2}


def _unresolved_names(path: Path) -> set:
    """Names a function of the file reads as globals that neither the module
    (its top-level assignments, definitions and imports) nor builtins
    define: each is a NameError waiting for the path that runs it."""
    import builtins
    import symtable

    top = symtable.symtable(path.read_text(), str(path), "exec")
    defined = {sym.get_name() for sym in top.get_symbols() if sym.is_assigned() or sym.is_imported()}
    unresolved = set()

    def visit(table):
        if table.get_type() == "function":
            for sym in table.get_symbols():
                if sym.is_global() and sym.is_referenced() and not sym.is_assigned():
                    name = sym.get_name()
                    if name not in defined and not hasattr(builtins, name) and name != "__file__":
                        unresolved.add(f"{path.name}:{table.get_name()}: {name}")
        for child in table.get_children():
            visit(child)

    visit(top)
    return unresolved


def test_every_name_resolves(tmp_path):
    # Most of bench.py runs only on the GPU; two NameErrors reached the H200
    # this way (nsa_dsl used where it was not imported; device/dtype pasted
    # into run_sdpa and run_flex). A static check catches the whole class,
    # in every script and module.
    files = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py"), *ROOT.glob("nsa_dsl/*.py")])
    assert ROOT / "benchmarks" / "bench.py" in files
    assert set().union(*(_unresolved_names(f) for f in files)) == set()
    # and it does catch one
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f(x):\n    return os.sep + x + undefined_thing\n")
    assert _unresolved_names(probe) == {"probe.py:f: undefined_thing"}


def test_fla_comparison_only_where_fla_computes_the_pattern():
    assert bench.fla_expressible(nsa_dsl.load(ROOT / "examples" / "bench_fla_like_nowindow.nsa")) is None
    # fla's window branch calls flash_attn_func (None on the H200 without
    # the flash-attn package: a TypeError there)
    with_window = bench.fla_expressible(nsa_dsl.load(ROOT / "examples" / "bench_fla_like.nsa"))
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash-attn" in with_window
    else:
        assert with_window is None
    assert "non-overlapping" in bench.fla_expressible(nsa_dsl.load(ROOT / "examples" / "bench_paper128.nsa"))
    assert "G=2" in bench.fla_expressible(_pattern(q=4, kv=2, cblock=16, cstride=16, sblock=16, top=3))
    assert "G=8" in bench.fla_expressible(_pattern(q=8, kv=1, cblock=16, cstride=16, sblock=16, top=3))
    assert "mean" in bench.fla_expressible(_pattern(q=16, kv=1, cblock=16, cstride=16, pool="mlp", sblock=16, top=3))
    assert bench.fla_expressible(_pattern(q=16, kv=1, cblock=16, cstride=16, sblock=16, top=3)) == with_window


def test_fla_rows_say_why_they_did_not_run(monkeypatch):
    rows = []
    cfg = bench.resolve_config(bench.build_parser().parse_args(["--quick", "--fla"]))
    assert cfg.fla
    bench.run_fla(nsa_dsl.load(ROOT / "examples" / "bench_paper128.nsa"), 1024, cfg, {}, rows.append)
    assert rows[-1]["impl"] == "fla_parallel_nsa" and rows[-1]["error"].startswith("skipped: fla compresses")
    import builtins
    real_import = builtins.__import__

    def no_fla(name, *args, **kwargs):
        if name.startswith("fla"):
            raise ImportError("No module named 'fla'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fla)
    bench.run_fla(nsa_dsl.load(ROOT / "examples" / "bench_fla_like_nowindow.nsa"), 1024, cfg, {}, rows.append)
    assert rows[-1]["error"].startswith("skipped: fla-core not importable"), rows[-1]


def test_stage_flops_follow_the_plan_kernel():
    fl = {"cmp": 1.0, "score": 2.0, "slc": 3.0, "swa": 4.0}
    assert bench.stage_flop_count("slc_topk", "slc_topk", fl) == 2.0
    assert bench.stage_flop_count("slc_topk_static", "slc_topk", fl) == 2.0  # another entry point
    assert bench.stage_flop_count("slc_fwd_bc", "slc_fwd_bc", fl) == 3.0  # the other loop order
    assert bench.stage_flop_count("slc_fwd_bc_reduce", "slc_fwd_bc", fl) is None  # not the branch's FLOPs again
    assert bench.stage_flop_count("slc_fwd_bc_merge_window", "slc_fwd_bc", fl) == fl["swa"]  # BC_FOLD_WINDOW
    assert bench.stage_flop_count("slc_fwd", "slc_fwd", fl) == 3.0
    assert bench.stage_flop_count("slc_fwd", "slc_fwd", fl, window_in_slc=True) == 7.0  # SLC_FWD_WINDOW
    assert bench.stage_flop_count("slc_fwd_bc", "slc_fwd_bc", fl, window_in_slc=True) == 3.0  # swa_fwd ran
    assert bench.stage_flop_count("cmp_bwd_dq", "cmp_bwd", fl) is None
    names = ("cmp_fwd", "slc_topk", "slc_fwd", "slc_fwd_bc", "swa_fwd")
    assert bench.kernel_stage("slc_topk_static", names) == "slc_topk"


def test_stage_times_needs_a_gpu(capsys):
    spec = importlib.util.spec_from_file_location("stage_times", ROOT / "benchmarks" / "stage_times.py")
    stage_times = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage_times)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the profiler path runs in the device session instead")
    assert stage_times.main([str(ROOT / "examples" / "bench_paper128.nsa")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_fused_output_says_which_forward_a_call_without_gradients_runs():
    p = _pattern(q=4, kv=2, qk=16, cblock=16, cstride=16, sblock=16, top=2, initial=1, local=1, window=16)
    assert not bench.fused_output(nsa_dsl.compile(p), 48)  # the window runs in swa_fwd: combine sums
    assert bench.fused_output(nsa_dsl.compile(p, overrides={"SLC_FWD_WINDOW": 1}), 48)
    # the block-centric slot reduction writes it (swa_fwd runs before it)
    assert bench.fused_output(nsa_dsl.compile(p, slc_fwd="block-centric"), 48)

    class Tuned:  # compile(tuned=True): the variant of the call's length decides
        def variant(self, length):
            return nsa_dsl.compile(p, overrides={"SLC_FWD_WINDOW": 1} if length > 32 else None)

    assert bench.fused_output(Tuned(), 48) and not bench.fused_output(Tuned(), 16)
    assert not bench.fused_output(object(), 48)


def test_bench_ms_takes_the_median_of_several_timed_runs_of_a_long_pass(monkeypatch):
    # "median of many timed runs": do_bench alone timed one call of a pass
    # longer than its rep window (SDPA's 64k forward+backward, 750 ms).
    import triton.testing

    calls = []

    def fake_do_bench(fn, warmup, rep, return_mode, grad_to_none=None):
        calls.append((rep, grad_to_none))
        return 150.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    leaves = [torch.zeros(1)]
    assert bench.bench_ms(lambda: None, 25, 100, grad_to_none=leaves) == 150.0
    assert calls == [(100, leaves), (150.0 * bench.MIN_TIMED_RUNS, leaves)] and bench.MIN_TIMED_RUNS >= 5


def test_flex_rows_static_before_oracle():
    # the time budget skips rows from the end of the flex loop: every static
    # block-mask row (the FlexAttention baseline) runs before any
    # oracle row; a pattern without selection has one error row, not two
    source = (ROOT / "benchmarks" / "bench.py").read_text()
    loop = source.index("for oracle in (False, True):")
    assert loop < source.index("run_flex(compiled, pattern, T, cfg, ceil, emit, budget, oracle=oracle)")
    rows = []
    no_select = nsa_dsl.parse("pattern w { heads q=2 kv=1 dims qk=16 window size=16 }")
    for oracle in (False, True):
        bench.run_flex(None, no_select, 64, None, {}, rows.append, None, oracle=oracle)
    assert [(r["impl"], r["error"]) for r in rows] == [("flex", "pattern has no select branch")]


def _load_bench_varlen():
    spec = importlib.util.spec_from_file_location("nsa_bench_varlen", ROOT / "benchmarks" / "bench_varlen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("lo, hi", [(1024, 4096), (4096, 16384), (16384, 65536), (768, 1280)])
def test_varlen_bench_documents_fill_the_total(lo, hi):
    bench_varlen = _load_bench_varlen()
    lengths = bench_varlen.document_lengths(65536, lo, hi, seed=1)
    assert sum(lengths) == 65536
    assert all(n >= lo for n in lengths)
    assert all(n <= hi for n in lengths[:-1]) and lengths[-1] < hi + lo  # the last may take a short remainder
    assert bench_varlen.document_lengths(65536, lo, hi, seed=1) == lengths  # reproducible


@pytest.mark.parametrize("pool", ["mean", "mlp"])
def test_varlen_bench_packed_and_per_document_calls_compute_the_same(pool):
    # The benchmark's packed call and its per-document loop (the rows it
    # compares) attend the same documents: the same output; the work it
    # divides by is each document's FLOPs.
    bench_varlen = _load_bench_varlen()
    p = _pattern(pool=pool, sblock=16)
    lengths = [5, 17, 0, 9]
    x, cu = bench_varlen.packed_tensors(p, [n for n in lengths if n], device="cpu", dtype=torch.float32)
    calls = bench_varlen._nsa_calls(nsa_dsl.compile(p), p, x, cu, [n for n in lengths if n])
    with torch.no_grad():
        packed, per_doc = calls["nsa_dsl_packed"][0](), calls["nsa_dsl_per_doc"][0]()
        fixed, whole = calls["nsa_dsl_fixed"][0](), calls["nsa_dsl_whole"][0]()
    assert packed.shape == (31, 4, 32) and torch.equal(packed, per_doc)
    # the fixed-length rows: a [B, L] batch of the mean document length
    # (at least 64) and one sequence of the total, their own leaves
    assert bench_varlen.fixed_batch_shape([5, 17, 9]) == (1, 64)
    assert bench_varlen.fixed_batch_shape([1000, 3000, 2500, 1700]) == (4, 2048)
    assert fixed.shape == (1, 64, 4, 32) and whole.shape == (1, 31, 4, 32)
    assert all(t.requires_grad and t.shape[0] == 1 for t in calls["nsa_dsl_fixed"][1])
    assert bench_varlen.nsa_work(p, [5, 17, 9, 17], "fwd") == sum(
        bench.nsa_flops(p, T)["fwd"] for T in (5, 17, 9, 17))


@pytest.mark.parametrize("pool", ["mean", "mlp"])
def test_varlen_gpu_comparison_finds_packed_equal_to_each_document(pool):
    # benchmarks/varlen_gpu.py's check, run here on the CPU: every document
    # of the pack alone gives the same output and gradients (pool=mlp's
    # compressed keys sliced by the compressed bounds, not the positions).
    spec = importlib.util.spec_from_file_location("nsa_varlen_gpu", ROOT / "benchmarks" / "varlen_gpu.py")
    varlen_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(varlen_gpu)
    p = _pattern(pool=pool, sblock=16)
    worst, x, cu, _ = varlen_gpu.compare(nsa_dsl.compile(p), [5, 0, 21, 9], device="cpu", dtype=torch.float32)
    expected = {"o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"} | ({"dk_cmp", "dv_cmp"} if pool == "mlp" else set())
    assert set(worst) == expected and all(v == 0.0 for v in worst.values()), worst
    assert cu.tolist() == [0, 5, 5, 26, 35]


def test_varlen_bench_plot_draws_where_matplotlib_is(tmp_path):
    bench_varlen = _load_bench_varlen()
    rows = [{"pattern": "p", "pass": ps, "impl": impl, "mix": mix, "T": 65536, "ms": ms}
            for ps in ("fwd", "fwd+bwd") for impl, ms in (("nsa_dsl_packed", 2.0), ("flex_doc_causal", 3.0))
            for mix in ("1k-4k", "4k-16k")] + [{"pattern": "p", "pass": "fwd", "impl": "nsa_dsl_fixed",
                                                 "mix": "1k-4k", "T": 65536, "ms": None}]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert bench_varlen.plot(rows, tmp_path / "a.png", "title") == has_matplotlib
    assert (tmp_path / "a.png").exists() == has_matplotlib
    assert bench_varlen.plot(rows[-1:], tmp_path / "b.png") is False  # no timed row: nothing drawn
    assert not (tmp_path / "b.png").exists()


def _load_bench_decode():
    spec = importlib.util.spec_from_file_location("nsa_bench_decode", ROOT / "benchmarks" / "bench_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decode_bench_sizes_and_bytes():
    # issue 22's setting: paper128 (64 q / 4 kv heads, d=128) at 64k holds
    # 29 sequences in 4 GB, and an NSA step reads 4095 compressed tokens,
    # 16 blocks of 64 and a 512 window per KV head (~0.11 ms at 3 TB/s)
    bench_decode = _load_bench_decode()
    paper = nsa_dsl.load(str(ROOT / "examples" / "bench_paper128.nsa"))
    assert bench_decode.cache_batch(paper, 65536, 4.0) == 29
    assert bench_decode.cache_batch(paper, 1 << 30, 4.0) == 1
    per_head = (4095 + 16 * 64 + 512) * 256 * 2 + 16 * 256 * 2
    assert bench_decode.nsa_step_bytes(paper, 65536, 29) == 29 * 4 * per_head
    short = bench_decode.nsa_step_bytes(paper, 100, 1)  # the selection and window capped at the context
    assert short == 4 * (((100 - 32) // 16 + 1 + 100 + 100) * 256 * 2 + 16 * 256 * 2)
    assert bench_decode.dense_step_bytes(paper, 65536, 1) == 4 * (65536 + 16) * 256 * 2


def test_decode_bench_cache_and_step_run_on_the_cpu():
    bench_decode = _load_bench_decode()
    p = _pattern(pool="mean", sblock=16)
    compiled = nsa_dsl.compile(p)
    cache = bench_decode.filled_cache(compiled, 2, 40, device="cpu", dtype=torch.float32)
    assert cache.host_lengths == [40, 40] and cache.lengths.tolist() == [40, 40]
    x = bench_decode.step_inputs(p, 2, device="cpu", dtype=torch.float32)
    step = bench_decode._rewinding(cache, lambda: compiled.decode(**x, cache=cache))
    first, again = step(), step()
    assert torch.equal(first, again) and cache.host_lengths == [40, 40]  # every repeat decodes position 40
    paged = bench_decode.filled_cache(compiled, 2, 40, device="cpu", dtype=torch.float32, page_size=16)
    assert paged.paged and sorted(paged.block_table.flatten().tolist()) == list(range(2 * 7))  # 104 positions
    assert torch.isfinite(compiled.decode(**x, cache=paged)).all() and paged.host_lengths == [41, 41]


@pytest.mark.parametrize("pool", ["mean", "mlp"])
def test_the_prefill_rows_run_a_piece_after_the_context_and_the_whole_forward(pool, monkeypatch):
    """bench_decode --prefill-chunk: both rows run (no error row) and say
    how many positions each computed; the piece leaves the cache as it
    found it (timed repeats prefill the same positions)."""
    bench_decode = _load_bench_decode()
    calls = []
    monkeypatch.setattr(bench_decode.bench, "bench_ms", lambda fn, warmup, rep: calls.append(fn()) or 2.0)
    rows = bench_decode.run_prefill(_pattern(pool=pool, sblock=16), 40, 16, {}, 1, 1, device="cpu")
    assert [r["impl"] for r in rows] == ["nsa_dsl_prefill_chunk", "nsa_dsl_forward_whole"]
    assert [r.get("error") for r in rows] == [None, None]
    assert [r["note"] for r in rows] == ["16 positions, 8 per ms", "56 positions, 28 per ms"]
    assert [tuple(o.shape[:2]) for o in calls] == [(1, 16), (1, 56)]


def test_the_flex_decode_row_is_dense_attention(monkeypatch):
    """bench_decode's FlexAttention row: one query per sequence against the
    whole cache, grouped heads, equal to SDPA's (on the CPU flex_attention
    runs uncompiled: compiling it for the CPU took 38 s)."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    bench_decode = _load_bench_decode()
    monkeypatch.setattr(bench_decode.bench, "flex_compiled", lambda dynamic: flex_attention)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((4, 1), (2, 40), (2, 40)))
    got = bench_decode.flex_decode(q, k, v, gqa=True)()
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert float((got - want).norm() / want.norm()) < 1e-5
    rows = [{"pattern": "p", "T": 40, "batch": 2, "impl": i, "ms": ms, "floor_frac": 0.5}
            for i, ms in (("nsa_dsl_eager", 1.0), ("sdpa_eager", 3.0), ("nsa_dsl_graph", 0.5), ("sdpa_graph", 1.0),
                          ("flash_nsa_graph", 0.4))]
    assert bench_decode.summary(rows).splitlines()[1].endswith("| 3.00x | 2.00x | 0.80x | 0.50")
    rows[-1] = dict(rows[-1], ms=None, error="ImportError: flash_nsa")  # a row that could not run says why
    assert "flash_nsa_graph: ImportError: flash_nsa" in bench_decode.summary(rows)


def test_flash_nsa_comparison_only_where_flash_nsa_computes_the_pattern():
    assert bench.flash_nsa_expressible(nsa_dsl.load(ROOT / "examples" / "bench_paper128.nsa")) is None
    assert "mean" in bench.flash_nsa_expressible(nsa_dsl.load(ROOT / "examples" / "deepseek_nsa.nsa"))  # pool=mlp
    assert "all three" in bench.flash_nsa_expressible(nsa_dsl.load(ROOT / "examples" / "window_only.nsa"))
    assert "all three" in bench.flash_nsa_expressible(nsa_dsl.load(ROOT / "examples" / "bench_fla_like_nowindow.nsa"))
