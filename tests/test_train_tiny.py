"""examples/train_tiny.py: the --tiny preset trains (CPU, NSAttention with the
dense reference backend) and its answer loss goes down."""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def train_tiny():
    path = ROOT / "examples" / "train_tiny.py"
    spec = importlib.util.spec_from_file_location("train_tiny_example", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_task_layout(train_tiny):
    cfg = train_tiny.tiny_config()
    task = train_tiny.task_of(cfg, train_tiny.load_pattern(cfg))
    assert task.gap == 32  # the CPU pattern's window
    gen = torch.Generator().manual_seed(0)
    tokens, targets = train_tiny.make_batch(task, 8, gen, "cpu")
    assert tokens.shape == targets.shape == (8, cfg.seq_len)
    assert (tokens[:, 0] == task.BOS).all() and (tokens[:, task.query_start - 1] == task.SEP).all()
    for b in range(8):
        asked = (targets[b] != train_tiny.IGNORE).nonzero().flatten()
        assert len(asked) == cfg.queries
        keys = tokens[b, :task.query_start]
        for pos in asked.tolist():
            key, value = int(tokens[b, pos]), int(targets[b, pos])
            assert int(tokens[b, pos + 1]) == value
            where = (keys == key).nonzero().flatten()
            assert len(where) == 1, "each key occurs once in the context"
            assert int(tokens[b, where[0] + 1]) == value
            # the answer lies outside the window of every query position
            assert task.query_start - int(where[0]) > task.gap


def test_tiny_training_loss_goes_down(train_tiny, tmp_path):
    cfg = train_tiny.tiny_config(steps=40, attn="nsa", out=str(tmp_path / "run"))
    results = train_tiny.run(cfg, verbose=False)
    rec = results["nsa"]
    loss = rec["loss"]
    assert len(loss) == 40 and all(map(lambda v: v == v, loss))
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < first - 0.5, f"loss did not go down: first 5 {first:.3f}, last 5 {last:.3f}"
    assert rec["backend"] == "reference"
    assert 0.0 <= rec["accuracy"] <= 1.0
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["config"]["pattern_name"] == "train_tiny_cpu" and saved["nsa"]["loss"] == loss
    assert "dense" not in saved


def test_cli_dense_tiny(train_tiny, tmp_path):
    out = tmp_path / "cli"
    assert train_tiny.main(["--tiny", "--attn", "dense", "--steps", "3", "--eval-seqs", "8",
                            "--out", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["dense"]["loss"]) == 3 and saved["config"]["seq_len"] == 128


def test_curriculum_schedule(train_tiny):
    cfg = train_tiny.tiny_config(seq_len=256, steps=30, curriculum="128:10, 192:5")
    pattern = train_tiny.load_pattern(cfg)
    plan = train_tiny.schedule(cfg, pattern)
    assert [(first, task.seq_len) for first, task in plan] == [(0, 128), (10, 192), (15, 256)]
    lengths = [train_tiny.task_at(plan, s).seq_len for s in range(30)]
    assert lengths == [128] * 10 + [192] * 5 + [256] * 15
    gaps = {task.gap for _, task in plan}
    assert gaps == {32}, "every stage keeps the pattern's window as the gap"
    # no curriculum: every step at seq_len
    assert [(f, t.seq_len) for f, t in train_tiny.schedule(train_tiny.tiny_config(), pattern)] == [(0, 128)]


@pytest.mark.parametrize("spec, message", [
    ("128", "T:steps"), ("128:0", "positive"), ("256:5", "shorter than seq_len"),
    ("128:30", "leaving none"), ("40:5", "leaves room"),
])
def test_curriculum_errors(train_tiny, spec, message):
    cfg = train_tiny.tiny_config(seq_len=256, steps=30, curriculum=spec)
    with pytest.raises(ValueError, match=message):
        train_tiny.schedule(cfg, train_tiny.load_pattern(cfg))


def test_curriculum_run_trains_at_each_length(train_tiny, tmp_path, capsys):
    out = tmp_path / "cur"
    assert train_tiny.main(["--tiny", "--attn", "dense", "--seq-len", "160", "--steps", "4", "--log-every", "1",
                            "--curriculum", "128:2", "--eval-seqs", "8", "--out", str(out)]) == 0
    logged = [line.split("T")[1].split()[0] for line in capsys.readouterr().out.splitlines() if "] step" in line]
    assert logged == ["128", "128", "160", "160"]


def test_auto_curriculum_is_the_measured_recipe(train_tiny):
    # The defaults are the run that learned on the H200 (31.9% at T=4096):
    # 7000 steps, 1500 each at 512, 1024, 2048, then 2500 at 4096.
    cfg = train_tiny.Config(device="cpu")
    pattern = train_tiny.load_pattern(cfg)
    assert (cfg.seq_len, cfg.steps, cfg.curriculum) == (4096, 7000, "auto")
    assert train_tiny.curriculum_spec(cfg, pattern) == "512:1500,1024:1500,2048:1500"
    plan = train_tiny.schedule(cfg, pattern)
    assert [(first, task.seq_len) for first, task in plan] == [(0, 512), (1500, 1024), (3000, 2048), (4500, 4096)]
    # auto keeps only stages whose task fits: at T=256 the T/8 = 32 stage
    # cannot hold 8 pairs, a gap of 32 and the queries
    small = train_tiny.tiny_config(seq_len=256, steps=28, curriculum="auto")
    assert train_tiny.curriculum_spec(small, train_tiny.load_pattern(small)) == "64:6,128:6"
    # an explicit spec and "" pass through unchanged
    assert train_tiny.curriculum_spec(replace(cfg, curriculum="1024:10"), pattern) == "1024:10"
    assert train_tiny.curriculum_spec(train_tiny.tiny_config(), pattern) == ""
