"""Autotuning: buckets, the search, the on-disk record and dispatch by length.
Timing itself needs a GPU; here a fake timer stands in for it."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import nsa_dsl
from nsa_dsl.pipeline import device_kind
from nsa_dsl.plan import TUNABLE, apply_overrides
from nsa_dsl.records import (TunedPattern, bucket_of, call_length, config_path, load_configs, tuned_bucket,
                             without_plan_decisions)
from nsa_dsl.tune import candidates, tune
from strategies import derived_overrides, random_inputs, rel_error

PATTERN = nsa_dsl.parse("""
pattern t {
    heads q=4 kv=2
    dims qk=32 v=16
    compress block=8 stride=4
    select block=16 top=3 initial=1 local=1
    window size=9
}
""")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_DSL_CACHE_DIR", str(tmp_path / "cache"))


def test_buckets():
    assert [bucket_of(t) for t in (1, 1024, 1025, 8000, 8192, 8193, 65536, 10**7)] == \
        [1024, 1024, 2048, 8192, 8192, 16384, 65536, 131072]


def test_candidates_include_the_default_and_are_valid():
    plan = nsa_dsl.check(PATTERN)
    for kernel in plan.kernel_names:
        options = candidates(plan, kernel)
        assert options[0] == {}
        for option in options:
            for name, value in option.items():
                assert isinstance(value, int)


def test_search_keeps_the_fastest_and_records_it():
    # A fake device on which more selection positions per program is faster,
    # and 8 warps hurt everywhere.
    def timer(plan, overrides, length):
        ms = 10.0 - 0.1 * overrides.get("SLC_TOKENS", 32)
        ms += sum(1.0 for k, v in overrides.items() if k.endswith("num_warps") and v == 8)
        return ms * length / 1024

    configs = tune(PATTERN, [1000, 9000], timer, device="fake-gpu")
    assert configs[1024]["SLC_TOKENS"] == 64 and configs[16384]["SLC_TOKENS"] == 64
    assert not any(k.endswith("num_warps") for k in configs[1024])
    record = json.loads(config_path(PATTERN, "fake-gpu").read_text())
    assert record["canonical"] == PATTERN.canonical()
    assert load_configs(PATTERN, "fake-gpu") == configs
    assert load_configs(PATTERN, "other-gpu") == {}


def test_tuned_pattern_dispatches_by_bucket_and_computes_the_same(tmp_path):
    tune(PATTERN, [40], lambda plan, o, t: 1.0 / (1 + o.get("SLC_TOKENS", 0)), device=device_kind())
    tuned = nsa_dsl.compile(PATTERN, tuned=True)
    assert isinstance(tuned, TunedPattern)
    assert tuned.overrides_for(40) == {"SLC_TOKENS": 64}
    assert tuned.overrides_for(3000) == {"SLC_TOKENS": 64}  # bucket 4096 borrows 1024's, two doublings away
    assert tuned.overrides_for(5000) == {}  # 8192: three doublings, the defaults
    args = random_inputs(PATTERN, 1, 40, torch.float32, seed=3)
    plain = nsa_dsl.compile(PATTERN)
    assert rel_error(tuned(**args), plain(**args)) < 1e-6
    assert tuned.variant(40).plan.kernel("slc_fwd").const("SLC_TOKENS") == 64


def test_a_packed_call_runs_the_bucket_of_its_longest_sequence(monkeypatch):
    q = torch.zeros(3000, 4, 32)  # flash-attn's layout: dim 1 is the heads
    cu = torch.tensor([0, 1000, 3000], dtype=torch.int32)
    assert call_length(q, {"cu_seqlens": cu}) == 2000
    assert call_length(q[None], {"cu_seqlens": cu}) == 2000  # fla's [1, total, ...]: not the total
    assert call_length(q, {"cu_seqlens": cu, "max_seqlen": 2048}) == 2048
    assert call_length(torch.zeros(2, 700, 4, 32), {}) == 700
    assert call_length(q, {"cu_seqlens": cu, "max_seqlen": -1}) is None  # the call's own check names it
    tuned = nsa_dsl.compile(PATTERN, tuned=True)
    lengths = []
    monkeypatch.setattr(tuned, "variant", lambda length: lengths.append(length) or tuned._variants[()])
    args = {n: t[0] for n, t in random_inputs(PATTERN, 1, 40, torch.float32, seed=3).items()}
    tuned(**args, cu_seqlens=torch.tensor([0, 15, 40], dtype=torch.int32))
    assert lengths == [25]


def test_tuned_and_overrides_are_exclusive():
    with pytest.raises(ValueError, match="either tuned=True or overrides"):
        nsa_dsl.compile(PATTERN, tuned=True, overrides={"SLC_TOKENS": 2})


def test_cli_tune_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    from nsa_dsl.cli import main

    assert main(["tune", "examples/window_only.nsa"]) == 2
    assert "none is available" in capsys.readouterr().err


def test_budget_stops_the_search_and_keeps_finished_lengths():
    ticks = iter(range(10**6))  # a fake clock: one second per reading
    calls = []

    def timer(plan, overrides, length):
        calls.append(length)
        return 1.0

    configs = tune(PATTERN, [1000, 9000], timer, device="fake-gpu", budget_s=5, clock=lambda: next(ticks))
    assert calls and set(calls) == {1000}, "the second length must not start once the budget is spent"
    assert len(calls) < len([o for k in nsa_dsl.check(PATTERN).kernel_names for o in candidates(nsa_dsl.check(PATTERN), k)])
    assert 1024 in configs and 16384 not in configs
    assert load_configs(PATTERN, "fake-gpu") == configs  # saved although cut short


def test_shipped_configs_are_the_fallback(tmp_path, monkeypatch):
    import nsa_dsl.records as records_mod

    shipped = tmp_path / "shipped"
    monkeypatch.setattr(records_mod, "SHIPPED_DIR", shipped)
    assert load_configs(PATTERN, "fake-gpu") == {}
    tune(PATTERN, [1000], lambda plan, o, t: 1.0 / (1 + o.get("SLC_TOKENS", 0)), device="fake-gpu")
    local = config_path(PATTERN, "fake-gpu")
    shipped.mkdir()
    local.rename(shipped / local.name)
    assert load_configs(PATTERN, "fake-gpu") == {1024: {"SLC_TOKENS": 64}}
    # A local record wins over the shipped one.
    tune(PATTERN, [1000], lambda plan, o, t: 1.0, device="fake-gpu")
    assert load_configs(PATTERN, "fake-gpu") == {1024: {}}


def test_a_retune_of_one_length_keeps_the_other_buckets_records(tmp_path, monkeypatch):
    # Re-tuning 64k from the shipped record once dropped 8k's time and the
    # notes of both (they were rewritten as {"ms": null}).
    import nsa_dsl.records as records_mod
    from nsa_dsl.records import load_records

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(records_mod, "SHIPPED_DIR", shipped)
    record = {"pattern": PATTERN.name, "canonical": PATTERN.canonical(), "device": "fake-gpu",
              "buckets": {"1024": {"overrides": {"SLC_TOKENS": 2}, "ms": 3.5, "note": "measured by hand"},
                          "16384": {"overrides": {}, "ms": 9.0, "note": "older"}}}
    (shipped / records_mod.config_name(PATTERN, "fake-gpu")).write_text(json.dumps(record))
    tune(PATTERN, [9000], lambda plan, o, t: 1.0, device="fake-gpu", kernels=["slc_fwd"], from_tuned=True,
         objective="wall, forward")
    records = load_records(PATTERN, "fake-gpu")
    assert records[1024] == {"overrides": {"SLC_TOKENS": 2}, "ms": 3.5, "note": "measured by hand"}
    assert records[16384]["ms"] == 1.0 and records[16384]["objective"] == "wall, forward"
    assert "note" not in records[16384]  # the old note described the old time


def test_stale_tuned_config_falls_back_to_defaults_with_a_warning():
    path = config_path(PATTERN, device_kind())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pattern": "t", "canonical": PATTERN.canonical(), "device": device_kind(),
                                "buckets": {"1024": {"overrides": {"NO_SUCH_CONSTANT": 4}, "ms": 1.0}}}))
    tuned = nsa_dsl.compile(PATTERN, tuned=True)
    with pytest.warns(RuntimeWarning, match="no longer applies"):
        variant = tuned.variant(40)
    assert variant.plan == nsa_dsl.check(PATTERN)


def test_tune_only_the_named_kernels_in_their_order():
    seen = []

    def timer(plan, overrides, length):
        seen.append(tuple(overrides))
        return 1.0

    tune(PATTERN, [1000], timer, device="fake-gpu", kernels=["swa_bwd", "slc_fwd"])
    tried = [keys for keys in seen if keys]
    names = [k for keys in tried for k in keys]
    assert names and all(n.startswith(("SWA_BWD", "swa_bwd", "SLC_TOKENS", "SLC_FWD_", "slc_fwd")) for n in names
                         if n != "SWA_BLOCK_N"), names
    assert all("SLC_FWD_WINDOW" in keys for keys in tried if "SWA_BLOCK_N" in keys)  # the folded window's step
    first_slc = next(i for i, keys in enumerate(tried) if any(k.startswith(("SLC_", "slc_fwd")) for k in keys))
    assert all(any(k.startswith(("SWA_BWD", "swa_bwd")) for k in keys) for keys in tried[:first_slc])
    with pytest.raises(ValueError, match="not in the plan"):
        tune(PATTERN, [1000], timer, device="fake-gpu", kernels=["no_such_kernel"])


def test_candidates_pipeline_backward_and_list_the_union_where_it_fits():
    paper = nsa_dsl.check(nsa_dsl.load("examples/bench_paper128.nsa"))
    small = nsa_dsl.check(nsa_dsl.load("examples/bench_small_group.nsa"))
    for kernel in ("cmp_bwd", "slc_bwd", "swa_bwd"):
        assert paper.kernel(kernel).num_stages == 1
        assert {f"{kernel}.num_stages": 2} in candidates(paper, kernel), kernel
    for kernel, prefix in (("cmp_bwd", "CMP"), ("swa_bwd", "SWA")):
        # the dK/dV key tile and warps move together; fewer rows a step
        # lost (NOTES v28) and are not a knob
        assert not any(any(name.endswith("_BWD_DKDV_BLOCK_M") for name in o) for o in candidates(paper, kernel))
        on_64x8 = apply_overrides(paper, {f"{prefix}_BWD_DKDV_BLOCK_N": 64, f"{prefix}_BWD_DKDV_WARPS": 8})
        for plan in (paper, on_64x8):  # no configuration tried twice (as the kernel would run it)
            k = plan.kernel(kernel)
            current = {**dict(k.constants), f"{kernel}.num_warps": k.num_warps, f"{kernel}.num_stages": k.num_stages}
            runs = [tuple(sorted({**current, **o}.items())) for o in candidates(plan, kernel)]
            assert len(runs) == len(set(runs)), kernel
    for kernel, name in (("cmp_bwd", "CMP_BWD_DQ_STAGES"), ("swa_bwd", "SWA_BWD_DQ_STAGES")):
        assert {name: 1} in candidates(paper, kernel)  # the dq kernel's own stages (2 by default)
        assert {name: 2} in candidates(apply_overrides(paper, {name: 1}), kernel)
    # the union list compares SLC_TOKENS * TOP_PAD entries pairwise: 4 * 16
    # for paper128, 32 * 16 for small_group (over SLC_LIST_MAX)
    # two warpgroups for 128 query rows: the forward flash tiles move with the warps
    for kernel, m_name, n_name in (("cmp_fwd", "CMP_BLOCK_M", "CMP_BLOCK_N"), ("swa_fwd", "SWA_BLOCK_M", "SWA_BLOCK_N")):
        assert {m_name: 128, n_name: 64, f"{kernel}.num_warps": 8} in candidates(paper, kernel)
        assert {m_name: 128, n_name: 64, f"{kernel}.num_warps": 8, f"{kernel}.num_stages": 3} in candidates(paper, kernel)
    assert {"SLC_FWD_LIST": 1} in candidates(paper, "slc_fwd")
    assert {"SLC_FWD_WINDOW": 1} in candidates(paper, "slc_fwd")  # the window inside the selection forward
    assert {"SLC_FWD_WINDOW": 1, "SWA_BLOCK_N": 32} in candidates(paper, "slc_fwd")  # with its own key step
    assert {"SLC_BWD_DQ_LIST": 0} in candidates(paper, "slc_bwd")  # one position a program lists its blocks
    assert {"SLC_BWD_KEYS_MAJOR": 0} in candidates(paper, "slc_bwd")  # keys-major is the default
    walk = apply_overrides(paper, {"SLC_BWD_DQ_LIST": 0, "SLC_BWD_DQ_STAGES": 1})
    assert {"SLC_BWD_DQ_LIST": 1} in candidates(walk, "slc_bwd")
    assert {"SLC_BWD_DQ_LIST": 1, "SLC_BWD_DQ_STAGES": 2} in candidates(walk, "slc_bwd")
    # slc_topk: the scoring's paths are the plan's (16 positions x 16 heads
    # on 3 stages); the tuner moves the positions a tile
    # with the warps, within the tile's 16 to 256 rows
    topk = candidates(paper, "slc_topk")
    k = paper.kernel("slc_topk")
    assert (k.const("TOPK_TOKENS"), k.num_stages) == (16, 3)
    for tokens, warps in ((8, 4), (8, 8)):
        assert {"TOPK_TOKENS": tokens, "slc_topk.num_warps": warps} in topk
    assert {"slc_topk.num_warps": 8} in topk and {"slc_topk.num_stages": 1} in topk
    assert not any("TOPK_BLOCK_M" in o for o in topk)  # the static selection's tile only
    assert not any(o.get("TOPK_TOKENS") == 32 for o in topk)  # 512 rows: the plan refuses them
    assert len(topk) == len({tuple(sorted(o.items())) for o in topk})  # no candidate twice
    for option in topk:
        apply_overrides(paper, option)
    assert not any("SLC_FWD_LIST" in o for o in candidates(small, "slc_fwd"))
    # the dK/dV kernels' own key tile with its warps, half to twice the
    # plan's on 4 or 8 warps, the plan's own left out (swa: 64 keys on 4
    # warps; cmp: 128 on 8, two warpgroups)
    for prefix, own in (("SWA", (64, 4)), ("CMP", (128, 8))):
        kernel = paper.kernel(f"{prefix.lower()}_bwd")
        assert (kernel.const(f"{prefix}_BWD_DKDV_BLOCK_N"), kernel.const(f"{prefix}_BWD_DKDV_WARPS")) == own
        kernel_options = candidates(paper, f"{prefix.lower()}_bwd")
        for tile in (own[0] // 2, own[0], min(128, own[0] * 2)):
            for warps in (4, 8):
                option = {f"{prefix}_BWD_DKDV_BLOCK_N": tile, f"{prefix}_BWD_DKDV_WARPS": warps}
                assert (option in kernel_options) == ((tile, warps) != own), option
    for option in (candidates(paper, "slc_fwd") + candidates(paper, "slc_bwd") + candidates(paper, "cmp_bwd")
                   + candidates(paper, "swa_bwd")):
        apply_overrides(paper, option)  # every candidate is a valid override
    with pytest.raises(ValueError, match="SLC_TOKENS \\* TOP_PAD = 512"):
        apply_overrides(small, {"SLC_FWD_LIST": 1})
    assert apply_overrides(small, {"SLC_FWD_LIST": 1, "SLC_TOKENS": 8}).kernel("slc_fwd").const("SLC_FWD_LIST") == 1
    with pytest.raises(ValueError, match="SLC_BWD_DQ_TOKENS \\* TOP_PAD = 512"):
        apply_overrides(small, {"SLC_BWD_DQ_LIST": 1, "SLC_BWD_DQ_TOKENS": 32})


def test_timer_rejects_a_candidate_that_computes_something_else(monkeypatch):
    # The timer compares every candidate's output and gradients with the
    # plan's defaults: a fast but wrong variant (a miscompile on some GPU)
    # must time as inf, never be recorded. Driven on the CPU (interpreter).
    import math

    import nsa_dsl.pipeline as pipeline
    from nsa_dsl.tune import gpu_timer

    real_compile = pipeline.compile

    def compile_with_a_broken_variant(pattern, **kw):
        compiled = real_compile(pattern, **kw)
        if (kw.get("overrides") or {}).get("SLC_TOKENS") == 8:  # a tuner candidate (32 / 4)
            return lambda *a, **k: compiled(*a, **k) * 1.05  # 5% off: past the fp32 tolerance
        return compiled

    monkeypatch.setattr(pipeline, "compile", compile_with_a_broken_variant)
    timed = []
    run_step = [True]  # the fake bench runs the timed pass (forward and backward) as do_bench would

    def bench(step):
        if run_step[0]:
            step()
        timed.append(1)
        return 1.0

    timer = gpu_timer(backward=True, device="cpu", bench=bench)
    plan = nsa_dsl.check(PATTERN)
    assert timer(plan, {}, 40) == 1.0
    assert timer(plan, {"SLC_TOKENS": 16}, 40) == 1.0  # another tile: same results, timed
    with pytest.warns(RuntimeWarning, match="rejected, out: relative error"):
        assert timer(plan, {"SLC_TOKENS": 8}, 40) == math.inf
    assert len(timed) == 2, "a rejected candidate is not timed"
    # the search then keeps a correct configuration: every candidate's output
    # and gradients are still compared with the defaults', only the timed pass
    # (whose result nothing below reads: the fake time is 1.0 regardless) is
    # not run again for each of them
    run_step[0] = False
    with pytest.warns(RuntimeWarning):
        configs = tune(PATTERN, [40], timer, device="fake-gpu", kernels=["slc_fwd"])
    assert configs[bucket_of(40)].get("SLC_TOKENS") != 8


def test_disagreement_names_what_differs():
    from nsa_dsl.tune import disagreement

    ref = {"out": torch.ones(4, 4), "grad_q": torch.ones(4, 4)}
    assert disagreement(ref, {k: v.clone() for k, v in ref.items()}, 1e-5) is None
    assert "grad_q: relative error" in disagreement(ref, {"out": ref["out"], "grad_q": ref["grad_q"] * 2}, 1e-2)
    assert "out: not finite" in disagreement(ref, {"out": ref["out"] * float("nan"), "grad_q": ref["grad_q"]}, 1e-2)
    assert "grad_q: missing" in disagreement(ref, {"out": ref["out"]}, 1e-2)


def test_from_tuned_starts_at_the_record_and_skips_what_it_holds():
    seen = []

    def timer(plan, overrides, length):
        seen.append(dict(overrides))
        return 1.0 if overrides.get("SLC_TOKENS") == 8 else 2.0

    first = tune(PATTERN, [1000], timer, device="fake-gpu", kernels=["slc_fwd"])
    assert first[bucket_of(1000)] == {"SLC_TOKENS": 8}
    seen.clear()
    again = tune(PATTERN, [1000], timer, device="fake-gpu", kernels=["slc_fwd"], from_tuned=True)
    assert seen[0] == {"SLC_TOKENS": 8}, "the search starts from the record"
    assert seen.count({"SLC_TOKENS": 8}) == 1, "the configuration in hand is not timed again"
    assert again[bucket_of(1000)] == {"SLC_TOKENS": 8}


def test_topk_chunk_override_sets_what_follows_from_it():
    # TOPK_CHUNK_BLOCKS is the plan's, not tunable; tests score at the
    # widths it derives for other shapes (derived_overrides), and there the
    # chunk's padding and token count must follow and a chunk too narrow
    # for the compressed tokens' reach is refused.
    paper = nsa_dsl.check(nsa_dsl.load("examples/bench_paper128.nsa"))
    with pytest.raises(ValueError, match="TOPK_CHUNK_BLOCKS: not a tunable constant"):
        apply_overrides(paper, {"TOPK_CHUNK_BLOCKS": 32})
    with derived_overrides():
        k = apply_overrides(paper, {"TOPK_CHUNK_BLOCKS": 64}).kernel("slc_topk")
        # 64 blocks of 64 positions, a compressed token every 16: 256 tokens
        assert (k.const("TOPK_CHUNK_BLOCKS"), k.const("TOPK_CHUNK_BLOCKS_PAD"), k.const("TOPK_CHUNK_TOKENS")) == (
            64, 64, 256)
        k = apply_overrides(paper, {"TOPK_CHUNK_BLOCKS": 4}).kernel("slc_topk")
        assert (k.const("TOPK_CHUNK_BLOCKS"), k.const("TOPK_CHUNK_BLOCKS_PAD"), k.const("TOPK_CHUNK_TOKENS")) == (
            4, 16, 16)
        # compressed blocks of 64 every 16 positions reach 48 positions past a
        # chunk: one 16-position block per chunk cannot hold that
        far = nsa_dsl.check(nsa_dsl.parse("pattern far { heads q=4 kv=1 dims qk=16 compress block=64 stride=16"
                                          " select block=16 top=4 initial=1 local=1 }"))
        with pytest.raises(ValueError, match="TOPK_CHUNK_BLOCKS"):
            apply_overrides(far, {"TOPK_CHUNK_BLOCKS": 2})
        assert apply_overrides(far, {"TOPK_CHUNK_BLOCKS": 4}).kernel("slc_topk").const("TOPK_CHUNK_TOKENS") == 4
        with pytest.raises(ValueError, match="power of two"):
            apply_overrides(paper, {"TOPK_CHUNK_BLOCKS": 24})


def test_an_untuned_bucket_borrows_the_nearest_tuned_one():
    tuned = {8192: {"A": 1}, 65536: {"B": 1}}
    assert tuned_bucket(tuned, 8192) == 8192 and tuned_bucket(tuned, 60000) == 65536  # their own
    assert tuned_bucket(tuned, 16384) == 8192  # one doubling from 8k, two from 64k
    assert tuned_bucket(tuned, 32768) == 65536
    assert tuned_bucket(tuned, 2048) == 8192  # two doublings
    assert tuned_bucket(tuned, 1024) is None  # three: the plan's defaults
    assert tuned_bucket({4096: {}, 16384: {}}, 8192) == 4096  # a tie takes the shorter
    assert tuned_bucket({}, 8192) is None


def test_every_shipped_configuration_applies_to_its_example():
    # a shipped file that no longer applies would silently fall back to the
    # plan's defaults on every user's machine (TunedPattern warns, once)
    from pathlib import Path

    from nsa_dsl.records import SHIPPED_DIR

    examples = {}
    for path in sorted(Path(__file__).resolve().parents[1].glob("examples/*.nsa")):
        for pattern in nsa_dsl.load_all(str(path)):
            examples[pattern.canonical()] = pattern
    shipped = sorted(SHIPPED_DIR.glob("*.json"))
    assert shipped
    for path in shipped:
        record = json.loads(path.read_text())
        pattern = examples[record["canonical"]]
        plan = nsa_dsl.check(pattern)
        for bucket, entry in record["buckets"].items():
            assert int(bucket) == bucket_of(int(bucket)), (path.name, bucket)
            apply_overrides(plan, entry["overrides"])  # raises if a name or value no longer fits


def test_the_kernel_time_objective_is_checked_and_needs_a_device():
    from nsa_dsl.tune import gpu_timer, kernel_ms

    with pytest.raises(ValueError, match="objective must be one of wall, kernels"):
        gpu_timer(objective="host")
    if torch.cuda.is_available():
        ones = torch.ones(1 << 20, device="cuda")
        assert kernel_ms(lambda: ones.mul_(1.0)) > 0  # one elementwise kernel a call
    else:
        with pytest.raises(RuntimeError, match="need a CUDA device"):
            kernel_ms(lambda: None)


def test_the_tuner_measures_the_other_selection_loop_order_and_then_tunes_its_kernel():
    # A fake device on which the block-centric order is faster at 9000 (the
    # plan's model picks group-centric there) and its reduction likes 16
    # rows: the tuner takes SLC_FWD_ORDER=1 from slc_fwd's candidates, then
    # tunes slc_fwd_bc, now launched; at 1000 group-centric stays.
    plan = nsa_dsl.check(PATTERN)
    assert plan.loop_order_at(9000) == "group-centric"

    def timer(plan, overrides, length):
        block_centric = apply_overrides(plan, overrides).loop_order_at(length) == "block-centric"
        ms = 5.0 if block_centric and length > 4096 else 10.0 if block_centric else 6.0
        return ms - (0.5 if block_centric and overrides.get("BC_REDUCE_ROWS") == 16 else 0.0)

    configs = tune(PATTERN, [1000, 9000], timer, device="fake-gpu", kernels=["slc_fwd", "slc_fwd_bc"])
    assert configs[16384]["SLC_FWD_ORDER"] == 1 and configs[16384]["BC_REDUCE_ROWS"] == 16
    assert configs[1024].get("SLC_FWD_ORDER", -1) != 1 and "BC_REDUCE_ROWS" not in configs[1024]
    tuned = TunedPattern(PATTERN, "fake-gpu", nsa_dsl.compile)
    assert tuned.slc_fwd_at(9000) == "block-centric" and tuned.slc_fwd_at(1000) == "group-centric"


def test_selection_loop_order_override():
    plan = nsa_dsl.check(PATTERN)
    for order, name in ((0, "group-centric"), (1, "block-centric")):
        forced = apply_overrides(plan, {"SLC_FWD_ORDER": order})
        assert {forced.loop_order_at(T) for T in (1, 1000, 1 << 20)} == {name}
        assert f"{name} at every length (SLC_FWD_ORDER={order})" in forced.explain()
    assert apply_overrides(plan, {"SLC_FWD_ORDER": -1}).loop_order_at(1 << 20) == plan.loop_order_at(1 << 20)
    with pytest.raises(ValueError, match="SLC_FWD_ORDER: must be -1"):
        nsa_dsl.compile(PATTERN, overrides={"SLC_FWD_ORDER": 2})
    # compile(slc_fwd=...) still decides over the constant
    assert nsa_dsl.compile(PATTERN, slc_fwd="group-centric",
                           overrides={"SLC_FWD_ORDER": 1}).slc_fwd_at(100) == "group-centric"


def test_the_wall_timer_takes_at_least_five_samples_of_a_long_pass():
    # do_bench times as many calls as fit in rep ms: one for a 40 ms pass.
    from nsa_dsl.tune import wall_ms

    calls = []

    def fake_do_bench(step, warmup, rep, return_mode):
        calls.append((warmup, rep, return_mode))
        return 40.0 if len(calls) == 1 else 39.0

    assert wall_ms(lambda: None, 10, 40, do_bench=fake_do_bench) == 39.0
    assert calls == [(10, 40, "median"), (0, 200.0, "median")]
    calls.clear()
    short = lambda step, warmup, rep, return_mode: calls.append(rep) or 2.0  # noqa: E731
    assert wall_ms(lambda: None, 10, 40, do_bench=short) == 2.0 and calls == [40]  # 20 samples fit already


def test_the_scoring_paths_are_the_plans_and_follow_the_tile():
    # The scoring's paths are decided from legality, not tunable: an
    # override of one is refused like any other plan constant, and a tile of
    # another TOPK_TOKENS takes the paths its shape allows (the heads summed
    # in-thread need whole groups of 4 positions).
    paper = nsa_dsl.check(nsa_dsl.load("examples/bench_paper128.nsa"))
    for name in ("TOPK_HEAD_ROWS", "TOPK_KEYS_MAJOR", "TOPK_HEADS_IN_THREAD", "TOPK_TMA", "TOPK_STRIDED_OVERLAP",
                 "TOPK_SORT_MERGE", "TOPK_KEY32", "CMP_TMA", "SWA_TMA"):
        assert name not in TUNABLE
        with pytest.raises(ValueError, match=f"override {name}: not a tunable constant"):
            apply_overrides(paper, {name: 1})
    k = paper.kernel("slc_topk")
    assert (k.const("TOPK_TOKENS"), k.const("TOPK_HEADS_IN_THREAD")) == (16, 1)
    assert apply_overrides(paper, {"TOPK_TOKENS": 2}).kernel("slc_topk").const("TOPK_HEADS_IN_THREAD") == 0
    assert apply_overrides(paper, {"TOPK_TOKENS": 4}).kernel("slc_topk").const("TOPK_HEADS_IN_THREAD") == 1
    one_head = nsa_dsl.check(nsa_dsl.parse("pattern g1 { heads q=1 kv=1 dims qk=16 compress block=16 stride=8"
                                           " select block=16 top=2 initial=1 local=0 }"))
    assert one_head.kernel("slc_topk").const("TOPK_HEADS_IN_THREAD") == 0  # no pair of heads


def test_a_record_of_what_the_plan_now_decides_still_applies(tmp_path):
    # A record from before a switch became the plan's names it; where its
    # value is the plan's decision (or, for a switch whose other branch is
    # deleted, the one the kernels run) the name is dropped silently and the
    # rest of the record runs. Another value (or a name the plan never had)
    # still makes the record stale: the defaults, with a warning.
    path = config_path(PATTERN, device_kind())
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = nsa_dsl.check(PATTERN)
    k = plan.kernel("slc_topk")
    decided = {"TOPK_SORT_MERGE": 1, "TOPK_KEY32": 1, "TOPK_STRIDED_OVERLAP": k.const("TOPK_STRIDED_OVERLAP"),
               "TOPK_TMA": 1, "CMP_TMA": 1, "SWA_TMA": 1}
    assert all(name not in TUNABLE for name in decided)
    buckets = {"1024": {"overrides": {**decided, "SLC_TOKENS": 8}, "ms": 1.0},
               "65536": {"overrides": {"TOPK_SORT_MERGE": 0, "SLC_TOKENS": 8},
                         "ms": 1.0}}
    path.write_text(json.dumps({"pattern": "t", "canonical": PATTERN.canonical(), "device": device_kind(),
                                "buckets": buckets}))
    tuned = nsa_dsl.compile(PATTERN, tuned=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuned.variant(1000).plan.kernel("slc_fwd").const("SLC_TOKENS") == 8
    assert tuned.overrides_for(1000) == {"SLC_TOKENS": 8}
    with pytest.warns(RuntimeWarning, match="TOPK_SORT_MERGE: not a tunable constant"):
        assert tuned.variant(60000).plan == plan
    assert without_plan_decisions(plan, {"CMP_TMA": 0, "NO_SUCH": 1, "slc_topk.num_warps": 4, "TOPK_TOKENS": 16}) == {
        "CMP_TMA": 0, "NO_SUCH": 1, "slc_topk.num_warps": 4, "TOPK_TOKENS": 16}
