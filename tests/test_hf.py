"""A HuggingFace transformers model converted to NSA (issue 23,
nsa_dsl.integrations.transformers): a tiny randomly initialised Llama (no
download) trains, generates with nsa_dsl's cache exactly as without a
cache and as each row alone (left padding), saves and loads, refuses what
it cannot do, and computes what nsa_dsl computes on the model's rotated
queries and keys. CPU, float32; the dense reference or gather backend,
and the kernels through Triton's interpreter once."""
from __future__ import annotations

import copy
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import nsa_dsl
from nsa_dsl import incremental
from nsa_dsl.launch_decode import decode_step
from strategies import TOLERANCE, rel_error

# the hf extra (CI installs it): no skip, a missing transformers fails here
import transformers
from packaging.version import Version
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from transformers.cache_utils import DynamicCache
from transformers.models.llama import modeling_llama
from transformers.models.qwen3 import modeling_qwen3

from nsa_dsl.integrations import transformers as hf

pytestmark = pytest.mark.hf

ROOT = Path(__file__).resolve().parent.parent
TEXT = """
pattern tiny_{pool} {{
    heads    q=4 kv=2
    dims     qk=16
    compress block=8 stride=4 pool={pool}
    select   block=16 top=2 initial=1 local=1
    window   size=16
}}
"""
MEAN = nsa_dsl.parse(TEXT.format(pool="mean"))
MLP = nsa_dsl.parse(TEXT.format(pool="mlp"))
# the cache's keyword and output field: past_key_values in 5.0, cache later
CACHE = "cache" if "cache" in inspect.signature(modeling_llama.LlamaModel.forward).parameters else "past_key_values"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from more threads, and beside other test
    processes (-n auto) two spinning threads per process made the training
    test 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(pattern=MEAN, backend="reference", layers=2, seed=0, family=(LlamaConfig, LlamaForCausalLM)):
    torch.manual_seed(seed)
    config_class, model_class = family
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=64, pad_token_id=0, bos_token_id=1,
                          eos_token_id=None, max_position_embeddings=256)
    model = model_class(config).eval()
    return hf.convert(model, pattern, backend=backend)


def left_padded(prompts):
    """input_ids, attention_mask [B, longest] with each prompt at the right end."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = p
        mask[row, longest - len(p):] = 1
    return ids, mask


def prompts(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (n,), generator=g) for n in lengths]


# ------------------------------------------------------------------ training
def test_a_training_step_runs_and_the_loss_falls_on_a_copy_task():
    """Sequences that repeat their first half: the second half is
    predictable only by attending back (through NSA). Right-padded rows
    (labels -100 there) run packed. Every parameter, old and new, learns."""
    model = tiny_model(MLP, backend="gather").train()
    g = torch.Generator().manual_seed(2)
    halves = torch.randint(3, 64, (8, 24), generator=g)
    ids = torch.cat([halves, halves], 1)
    mask = torch.ones_like(ids)
    mask[::2, 40:] = 0  # padding at the end of every other row
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    attn = model.model.layers[0].self_attn  # (phi's first Linear gets gradients once its zero-started second has moved)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "phi_k", "phi_v"):
        for p in getattr(attn, name).parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_a_padded_batch_gives_each_row_what_it_gets_alone():
    """Right and left padding, without a cache: logits at a row's tokens and
    the gradients they send equal that row run alone (padding never counts
    as positions of NSA's blocks: pads of 17 and 26 are no multiple of the
    stride or block)."""
    model = tiny_model(MLP)
    rows = prompts(43, 26, 9)
    alone = [model(p[None]).logits[0] for p in rows]
    want = torch.autograd.grad(sum(a.square().sum() for a in alone), model.model.layers[1].self_attn.gate_proj.weight)
    ids, mask = left_padded(rows)
    right_ids = torch.stack([ids[r].roll(-int((mask[r] == 0).sum())) for r in range(3)])
    right_mask = torch.stack([mask[r].roll(-int((mask[r] == 0).sum())) for r in range(3)])
    for ids_, mask_, side in ((ids, mask, "left"), (right_ids, right_mask, "right")):
        position_ids = (mask_.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids_, attention_mask=mask_, position_ids=position_ids, use_cache=False).logits
        got = [logits[r][mask_[r] == 1] for r in range(3)]
        for r in range(3):
            assert rel_error(got[r], alone[r]) < TOLERANCE[torch.float32], (side, r)
        grad = torch.autograd.grad(sum(x.square().sum() for x in got), model.model.layers[1].self_attn.gate_proj.weight)
        assert rel_error(grad[0], want[0]) < 1e-4, side


def test_a_forward_with_gradients_leaves_its_cache_unusable():
    """Training with use_cache left on computes without the cache; going on
    from that cache raises instead of attending nothing."""
    model = tiny_model()
    ids = prompts(20)[0][None]
    out = model(ids)  # use_cache from the config, gradients on
    cache = getattr(out, CACHE)
    assert cache.get_seq_length() == 20
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot be continued"):
        model(prompts(1)[0][None], **{CACHE: cache})


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("pattern", [MEAN, MLP], ids=["mean", "mlp"])
def test_generate_with_the_cache_equals_without_it_and_each_row_alone(pattern):
    """Greedy tokens of a left-padded batch with nsa_dsl's cache = without a
    cache (use_cache=False: every step a full forward) = each row generated
    alone with no extra arguments. The cache is the NSACache layers (HF's
    DynamicLayers hold nothing), each slot as long as its row's tokens, and
    it grew past its first allocation (64 positions) on the way."""
    model = tiny_model(pattern)
    rows = prompts(58, 41, 9)
    ids, mask = left_padded(rows)
    new = 12
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True)
    cache = getattr(out, CACHE)
    assert len(cache.layers) == 2
    for layer in cache.layers:
        assert isinstance(layer, hf.NSACacheLayer) and layer.keys is None and layer.values is None
        # the last token is generated, not fed back
        assert layer.cache.host_lengths == [len(p) + new - 1 for p in rows]
        assert layer.cache.max_len > 64 and layer.get_seq_length() == ids.shape[1] + new - 1
    without = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, without)
    for r, p in enumerate(rows):
        alone = model.generate(p[None], max_new_tokens=new)
        assert torch.equal(alone[0, len(p):], out.sequences[r, ids.shape[1]:]), r


def test_beam_search_and_other_caches_raise():
    model = tiny_model()
    ids = prompts(10)[0][None]
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    with pytest.raises(NotImplementedError, match="StaticLayer|StaticCache|static"):
        model.generate(ids, max_new_tokens=3, cache_implementation="static")


# ------------------------------------------------------------ save and load
def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    """save_pretrained writes the NSA parameters and the pattern (config);
    from_pretrained(model class, directory) converts and loads them: the same
    parameters, logits and generated tokens. (By hand: the class's
    from_pretrained, convert with the saved pattern, load_state_dict of the
    checkpoint's gate_proj and phi tensors.)"""
    model = tiny_model(MLP)
    with torch.no_grad():  # new parameters unlike a fresh convert's
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(AutoModelForCausalLM, tmp_path, backend="reference").eval()
    assert loaded.model.layers[0].self_attn.pattern.canonical() == MLP.canonical()
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got) and any(".phi_k." in k for k in got) and any(".gate_proj." in k for k in got)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    ids, mask = left_padded(prompts(30, 17))
    assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5),
                       loaded.generate(ids, attention_mask=mask, max_new_tokens=5))
    # a checkpoint of an unconverted model: no pattern to convert with
    plain = tmp_path / "plain"
    LlamaForCausalLM(model.config.__class__(**{k: v for k, v in model.config.to_dict().items()
                                               if k != "nsa_dsl"})).save_pretrained(plain)
    with pytest.raises(ValueError, match="no nsa_dsl pattern"):
        hf.from_pretrained(LlamaForCausalLM, plain)
    with pytest.raises(ValueError, match="lacks NSA parameters"):
        hf.from_pretrained(LlamaForCausalLM, plain, pattern=MEAN)


# --------------------------------------------------------------- bad input
def test_a_pattern_that_does_not_fit_the_model_names_the_mismatch():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=64)
    for text, words in (("heads q=8 kv=2\n dims qk=16", "heads q=8 but the model's num_attention_heads is 4"),
                        ("heads q=4 kv=1\n dims qk=16", "heads kv=1 but the model's num_key_value_heads is 2"),
                        ("heads q=4 kv=2\n dims qk=32 v=16", "dims qk=32 but the model's head_dim is 16"),
                        ("heads q=4 kv=2\n dims qk=16 v=32", "dims v=32 but the model's head_dim is 16")):
        pattern = nsa_dsl.parse(f"pattern p {{ {text}\n window size=16 }}")
        model = LlamaForCausalLM(config)
        with pytest.raises(ValueError, match=re.escape(words)):
            hf.convert(model, pattern)
        assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"  # untouched


def test_a_model_of_another_layout_is_refused(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=64, n_positions=64, bos_token_id=1,
                                          eos_token_id=1))
    with pytest.raises(ValueError, match="layout"):
        hf.convert(gpt2, MEAN)
    model = tiny_model()
    with pytest.raises(ValueError, match="converted already"):
        hf.convert(model, MEAN)
    with pytest.raises(ValueError, match="model: expected a transformers model"):
        hf.convert(torch.nn.Linear(2, 2), MEAN)
    two = tmp_path / "two.nsa"
    two.write_text(TEXT.format(pool="mean") + TEXT.format(pool="mlp"))
    with pytest.raises(ValueError, match="holds 2 patterns"):
        hf.convert(LlamaForCausalLM(model.config), two)


def test_masks_other_than_causal_with_padding_are_refused():
    model = tiny_model()
    attn = model.model.layers[0].self_attn
    B, T = 2, 12
    x = torch.randn(B, T, 64)
    pos = model.model.rotary_emb(x, torch.arange(T)[None].expand(B, -1))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    window = causal & ~torch.ones(T, T, dtype=torch.bool).tril(-4)
    bias = torch.where(causal, -0.5 * (torch.arange(T)[:, None] - torch.arange(T)), float("-inf"))
    prefix = causal.clone()
    prefix[:4, :4] = True
    for mask, words in ((window[None, None].expand(B, 1, T, T), "hides earlier tokens"),
                        (bias[None, None].expand(B, 1, T, T), "additive bias"),
                        (prefix[None, None].expand(B, 1, T, T), "later positions"),
                        (torch.ones(B, T + 1), "2-D mask must be")):
        with pytest.raises(ValueError, match=words):
            attn(hidden_states=x, position_embeddings=pos, attention_mask=mask)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        attn(hidden_states=x, position_embeddings=pos, cu_seq_lens_q=torch.tensor([0, T], dtype=torch.int32))


# ------------------------------------------------- the math, independently
def _by_hand(attn, pattern, x, cos, sin, modeling=modeling_llama):
    """The converted layer's output recomputed from its parameters: the
    model's projections (and per-head norms) and RoPE (transformers' own
    apply_rotary_pos_emb), sigmoid gates, phi, nsa_dsl.reference, o_proj."""
    B, T = x.shape[:2]
    q, k = attn.q_proj(x).view(B, T, 4, 16), attn.k_proj(x).view(B, T, 2, 16)
    if modeling is modeling_qwen3:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = modeling.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = attn.v_proj(x).view(B, T, 2, 16)
    g_cmp, g_slc, g_swa = torch.sigmoid(attn.gate_proj(x)).view(B, T, 3, 4).unbind(2)
    extra = {"k_cmp": attn.phi_k(k), "v_cmp": attn.phi_v(v)} if pattern.compress.pool.value == "mlp" else {}
    o = nsa_dsl.reference(pattern, q, k, v, g_cmp, g_slc, g_swa, **extra)
    return attn.o_proj(o.reshape(B, T, 64))


@pytest.mark.parametrize("pattern", [MEAN, MLP], ids=["mean", "mlp"])
def test_a_converted_layer_is_nsa_over_the_models_rotated_queries_and_keys(pattern):
    """The layer's output equals nsa_dsl.reference on the post-RoPE q, k,
    the gates and phi computed here by hand; with padding in any mask
    format (2-D, 4-D bool, 4-D additive float), without a cache and with
    one (then a decode step), each row equals its tokens alone (at their
    own positions) and padding rows are 0."""
    model = tiny_model(pattern)
    attn = model.model.layers[1].self_attn
    B, T = 3, 40
    x = torch.randn(B, T, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(T)[None].expand(B, -1))
    with torch.no_grad():
        got, weights = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)
        assert weights is None
        assert rel_error(got, _by_hand(attn, pattern, x, cos, sin)) < TOLERANCE[torch.float32]

        pads = [0, 13, 31]
        valid = torch.arange(T)[None] >= torch.tensor(pads)[:, None]
        position_ids = (valid.cumsum(-1) - 1).clamp(min=0)
        cos, sin = model.model.rotary_emb(x, position_ids)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        four = causal[None, None] & valid[:, None, None, :]
        additive = torch.zeros(four.shape).masked_fill(~four, torch.finfo(torch.float32).min)
        wants = [_by_hand(attn, pattern, x[r:r + 1, n:], cos[r:r + 1, n:], sin[r:r + 1, n:])[0]
                 for r, n in enumerate(pads)]
        step = torch.randn(B, 1, 64)
        step_pos = model.model.rotary_emb(step, position_ids[:, -1:] + 1)
        whole = torch.cat([x, step], 1)
        whole_cos, whole_sin = (torch.cat([a, b], 1) for a, b in zip((cos, sin), step_pos))
        step_wants = [_by_hand(attn, pattern, whole[r:r + 1, n:], whole_cos[r:r + 1, n:], whole_sin[r:r + 1, n:])[0, -1]
                      for r, n in enumerate(pads)]
        step_valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], 1)
        step_masks = {"2-D": step_valid.long(), "4-D bool": step_valid[:, None, None, :],
                      "4-D float": torch.zeros(B, 1, 1, T + 1).masked_fill(~step_valid[:, None, None, :], -torch.inf)}
        for (fmt, mask), step_mask in zip({"2-D": valid.long(), "4-D bool": four, "4-D float": additive}.items(),
                                          step_masks.values()):
            for cache in (None, DynamicCache()):
                got = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask, **{CACHE: cache})[0]
                for r, n in enumerate(pads):
                    assert rel_error(got[r, n:], wants[r]) < TOLERANCE[torch.float32], (fmt, cache, r)
                    assert torch.equal(got[r, :n], torch.zeros_like(got[r, :n]))
            assert cache.layers[1].cache.host_lengths == [T - n for n in pads]  # (the layer's own index)
            got = attn(hidden_states=step, position_embeddings=step_pos, attention_mask=step_mask, **{CACHE: cache})[0]
            for r in range(B):
                assert rel_error(got[r, 0], step_wants[r]) < TOLERANCE[torch.float32], (fmt, "step", r)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_other_models_of_the_llama_layout(family):
    """Qwen3 (per-head q/k norms before RoPE): the layer is NSA over its
    normed, rotated queries and keys. Mistral: its sliding window is
    replaced by the pattern's attention (config.sliding_window None, so
    plain causal masks and a DynamicCache). Both generate with the cache
    as without it and as each row alone."""
    if family == "qwen3":
        model = tiny_model(MLP, family=(Qwen3Config, Qwen3ForCausalLM))
        attn = model.model.layers[0].self_attn
        assert hasattr(attn, "q_norm")
        x = torch.randn(2, 30, 64)
        cos, sin = model.model.rotary_emb(x, torch.arange(30)[None].expand(2, -1))
        with torch.no_grad():
            got = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
            want = _by_hand(attn, MLP, x, cos, sin, modeling_qwen3)
        assert rel_error(got, want) < TOLERANCE[torch.float32]
    else:
        with pytest.warns(RuntimeWarning, match="sliding_window=4096 is replaced"):
            model = tiny_model(MLP, family=(MistralConfig, MistralForCausalLM))
        assert model.config.sliding_window is None
    rows = prompts(35, 12)
    ids, mask = left_padded(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False))
    for r, p in enumerate(rows):
        assert torch.equal(model.generate(p[None], max_new_tokens=6)[0, len(p):], out[r, ids.shape[1]:])


def test_the_kernels_backend_through_the_interpreter(monkeypatch):
    """backend='kernels' (Triton's interpreter on the CPU): a left-padded
    batch without a cache (packed sequences) gives the reference backend's
    logits, and generating with the cache (the full forward's prefill,
    then the decode kernels) the reference backend's tokens."""
    model = tiny_model(MLP, backend="kernels", layers=1)
    ref = copy.deepcopy(model)
    for layer in ref.model.layers:
        layer.self_attn.backend = "reference"
    ids, mask = left_padded(prompts(62, 37))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        want = ref(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    assert rel_error(got[mask == 1], want[mask == 1]) < 1e-4
    # the third decode step outgrows the first allocation (64 positions): the decode kernels' scratch
    # buffers, sized by the cache, are made anew
    steps = []
    monkeypatch.setattr(incremental, "decode_step", lambda *a, **k: steps.append(1) or decode_step(*a, **k))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True)
    assert getattr(out, CACHE).layers[0].cache.max_len > 64 and len(steps) == 3
    assert torch.equal(out.sequences, ref.generate(ids, attention_mask=mask, max_new_tokens=4))


def test_a_compiled_converted_model_trains_and_generates_like_eager():
    """torch.compile (aot_eager, not fullgraph: the mask analysis reads the
    mask on the host, a graph break per layer) on a converted model: a
    padded training step gives eager's loss and gradients, and generating
    through the compiled forward (the cached steps: nsa_dsl::cache_step)
    eager's tokens. The gradients are compared as one vector: phi_k's
    last bias gets none in exact arithmetic (the compressed softmax does
    not see a shift shared by every key), only rounding noise."""
    torch._dynamo.reset()
    model = tiny_model(MLP, backend="kernels", layers=1).train()
    ids, mask = left_padded(prompts(20, 13))
    model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    loss = torch.compile(model, backend="aot_eager")(input_ids=ids, attention_mask=mask, labels=ids,
                                                     use_cache=False).loss
    loss.backward()
    assert rel_error(torch.cat([p.grad.flatten() for p in model.parameters()]), want) < 1e-5
    model.eval()
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    model.forward = torch.compile(model.forward, backend="aot_eager")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), eager)
    torch._dynamo.reset()


# ---------------------------------------------------------------- packaging
def test_the_supported_versions_are_the_hf_extra():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hf"]
    (spec,) = extra
    assert spec.replace(" ", "") == "transformers" + ",".join(hf.SUPPORTED)
    low, high = hf.SUPPORTED
    assert Version(low[2:]) <= Version(transformers.__version__) < Version(high[1:])


def test_importing_nsa_dsl_does_not_import_transformers():
    code = ("import sys, nsa_dsl, nsa_dsl.integrations, nsa_dsl.module;"
            " assert 'transformers' not in sys.modules, 'transformers imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_readme_section_runs_as_written():
    """README "Use it in your model": its code block runs (and asserts
    that generating with the cache gives the tokens of recomputing)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it in your model", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict = {}
    exec(compile(block, "README.md (Use it in your model)", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["cached"].shape == (2, 32)
    assert all(p.grad is not None for n, p in namespace["model"].named_parameters() if "gate_proj" in n)
