"""A HuggingFace transformers decoder converted to Native Sparse Attention.

    from transformers import AutoModelForCausalLM
    from nsa_dsl.integrations.transformers import convert

    model = convert(AutoModelForCausalLM.from_pretrained(...), "my_pattern.nsa")
    model.generate(input_ids, max_new_tokens=32)       # nsa_dsl's KV cache
    loss = model(input_ids, labels=input_ids).loss     # trains (kernels on CUDA)

`convert` replaces every decoder layer's ``self_attn`` (Llama layout:
``model.model.layers[i].self_attn`` with q_proj, k_proj, v_proj, o_proj,
optional per-head q_norm/k_norm, RoPE applied from the ``position_embeddings``
the model hands the layer) by an :class:`NSAttentionLayer`: an
``NSAttention`` that *is* the old layer's projections (the same modules, so
pretrained weights carry over and keep their state-dict names) plus the new
parameters NSA needs: the gate projection ``gate_proj`` (sigmoid gates that
start near 0.5) and, for ``pool=mlp``, the compression MLPs ``phi_k``,
``phi_v``. The pattern's heads and dims must be the model's. Tested on
Llama, Qwen3 (per-head q/k norms) and Mistral (whose sliding window the
pattern's attention replaces: convert sets config.sliding_window to None);
models with layers of other types (hybrid sliding/full) are refused.

What the layer computes: q, k, v as the model's own attention computes them
(projections, q/k norms, the model's ``apply_rotary_pos_emb``), then NSA
attention over them (NSAttention.forward with ``qkv=``), then ``o_proj``.

Padding. The layer reads which tokens are padding from whatever mask the
model hands it (None; a 2-D [B, columns] 0/1 mask; a 4-D [B, 1, T, columns]
bool or additive float mask) and runs only the tokens, each row as its own
sequence: NSA's compression blocks and selection blocks count positions from
a sequence's first token, so padding must not count. Without a cache the
rows' tokens are packed (cu_seqlens); with one each row is appended to its
own cache slot. Output rows at padding positions are 0. A mask that is not
causal attention over a row's tokens (packed sequences, a sliding window,
a prefix-LM or custom mask) raises a ValueError; so do the flash-attention
packing kwargs (cu_seq_lens_q).

Generation. ``model.generate`` makes a DynamicCache; at its first call each
converted layer puts an :class:`NSACacheLayer` in that cache's ``layers`` in
place of the DynamicLayer (which then never holds keys): one nsa_dsl
NSACache per layer, one slot per batch row, grown (reallocated and copied)
when a sequence outgrows it. It reports the cache's length in the model's
columns (padding included), as HF's mask and position bookkeeping expect.
Beam search, batch reordering/expansion and cropping (assisted generation)
raise NotImplementedError. A forward with gradients enabled (training with
``use_cache`` left on) computes without the cache and leaves it unusable
(continuing from it raises); generate runs without gradients.

Saving and loading. ``convert`` records the pattern in ``model.config.nsa_dsl``,
so ``save_pretrained`` writes the pattern into config.json and the new
parameters into the weights. :func:`from_pretrained` loads such a checkpoint
(the model class's own from_pretrained, then convert, then the NSA
parameters from the checkpoint's safetensors files).

Supported transformers versions: SUPPORTED (the ``hf`` extra of
pyproject.toml; importing this module with another version raises
ImportError).
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import warnings
import weakref
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch import nn

import transformers
from packaging.version import Version

from ..ir import Pattern
from ..kv_cache import NSACache
from ..module import NSAttention, _resolve_pattern
from ..parse import parse

# The versions tested (pyproject.toml's hf extra; tests/test_hf.py checks the two agree).
SUPPORTED = (">=4.54.0", "<5.26")

_MIN, _MAX = Version(SUPPORTED[0][2:]), Version(SUPPORTED[1][1:])
if not _MIN <= Version(transformers.__version__) < _MAX:
    raise ImportError(
        f"nsa_dsl.integrations.transformers supports transformers {','.join(SUPPORTED)} (the versions tested);"
        f" found {transformers.__version__}: pip install 'nsa-dsl[hf]' (or 'transformers{','.join(SUPPORTED)}')")

from transformers.cache_utils import DynamicLayer  # noqa: E402  (after the version check)

__all__ = ["NSAttentionLayer", "NSACacheLayer", "convert", "from_pretrained", "SUPPORTED"]

# The attention submodules convert knows how to compute with.
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_NORMS = ("q_norm", "k_norm")
# Sequences start with room for this many positions (rounded up), then double.
_CACHE_ROUND = 64


# ---------------------------------------------------------------- convert
def convert(model: nn.Module, pattern, *, backend: str = "auto", phi_hidden: Optional[int] = None,
            query_chunk: Optional[int] = None) -> nn.Module:
    """Turn every attention layer of a decoder-only transformers model into
    NSA attention for `pattern` (a Pattern, or the path of a .nsa file
    holding one), in place; returns the model.

    The layers keep their q/k/v/o projections (same modules and
    parameters) and gain ``gate_proj`` and, for pool=mlp, ``phi_k`` and
    ``phi_v``, created on the projections' device and dtype. `backend`,
    `phi_hidden`, `query_chunk`: as NSAttention's ("auto": the kernels on
    CUDA in a dtype the pattern allows, else the dense reference; "gather"
    trains faster on a CPU). ValueError when the pattern's heads or dims are
    not the model's, or the model is not of the Llama layout."""
    p = _resolve_pattern(pattern)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise ValueError(f"model: expected a transformers model with a config, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: {type(model).__name__} is an encoder-decoder; convert takes decoder-only models")
    layers = _decoder_layers(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    _check_heads(p, text)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"model: its layers are of types {', '.join(sorted(set(layer_types)))}; convert takes models"
                         " whose every layer is full attention (the pattern brings its own window)")
    if getattr(text, "attention_dropout", 0.0):
        warnings.warn(f"convert: the model's attention_dropout={text.attention_dropout} is not applied by NSA"
                      " attention", RuntimeWarning, stacklevel=2)
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, NSAttentionLayer):
            raise ValueError(f"model: layer {i} is converted already (pattern {attn.pattern.name!r})")
        _check_layout(attn, i, p)
    for i, layer in enumerate(layers):
        layer.self_attn = NSAttentionLayer(layer.self_attn, p, layer_idx=i, backend=backend,
                                           phi_hidden=phi_hidden, query_chunk=query_chunk)
    if getattr(text, "sliding_window", None) is not None and layer_types is None:
        # (Mistral) NSA's branches replace the model's window: its masks and cache become plain causal ones
        warnings.warn(f"convert: the model's sliding_window={text.sliding_window} is replaced by pattern"
                      f" {p.name!r}'s attention (config.sliding_window set to None)", RuntimeWarning, stacklevel=2)
        text.sliding_window = None
    config.nsa_dsl = {"pattern": pattern_text(p), "phi_hidden": phi_hidden}
    return model


def pattern_text(p: Pattern) -> str:
    """The pattern as .nsa text that parses back to it (its canonical form
    in braces): what convert stores in the model's config."""
    name, *statements = p.canonical().split("\n")
    return name + " {\n" + "".join(f"    {s}\n" for s in statements) + "}\n"


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and all(hasattr(x, "self_attn") for x in layers):
            return layers
    raise ValueError(
        f"model: {type(model).__name__} does not have the layout convert expects (a decoder-only model with"
        " model.model.layers[i].self_attn, or model.layers[i].self_attn for the base model, as Llama has)")


def _check_heads(p: Pattern, config) -> None:
    """ValueError naming every way the pattern's heads and dims differ from the model's."""
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    dim = getattr(config, "head_dim", None) or config.hidden_size // hq
    wrong = [f"{ours} but the model's {theirs} is {value}" for ours, theirs, value in (
        (f"heads q={p.heads.q}", "num_attention_heads", hq), (f"heads kv={p.heads.kv}", "num_key_value_heads", hkv),
        (f"dims qk={p.dims.qk}", "head_dim", dim), (f"dims v={p.dims.v}", "head_dim", dim))
        if int(ours.split("=")[1]) != value]
    if wrong:
        raise ValueError(f"pattern {p.name!r} does not fit the model: {'; '.join(wrong)} (the model needs"
                         f" heads q={hq} kv={hkv} and dims qk={dim} v={dim})")


def _check_layout(attn, i: int, p: Pattern) -> None:
    where = f"model.layers[{i}].self_attn"
    if not isinstance(attn, nn.Module):
        raise ValueError(f"{where}: expected an attention module, got {type(attn).__name__}")
    missing = [n for n in _PROJECTIONS if not isinstance(getattr(attn, n, None), nn.Linear)]
    if missing:
        raise ValueError(f"{where} ({type(attn).__name__}) has no {', '.join(missing)} Linear: convert expects"
                         " the Llama layout (q_proj, k_proj, v_proj, o_proj)")
    other = [n for n, _ in attn.named_children() if n not in _PROJECTIONS + _NORMS]
    other += [n for n, _ in attn.named_parameters(recurse=False)]
    if other:
        raise ValueError(f"{where} ({type(attn).__name__}) has parts convert does not know how to compute with:"
                         f" {', '.join(other)} (supported: {', '.join(_PROJECTIONS + _NORMS)})")
    hq, hkv, dqk, dv = p.heads.q, p.heads.kv, p.dims.qk, p.dims.v
    q, k, v, o = (getattr(attn, n) for n in _PROJECTIONS)
    hidden = q.in_features
    for name, lin, n_in, n_out in (("q_proj", q, hidden, hq * dqk), ("k_proj", k, hidden, hkv * dqk),
                                   ("v_proj", v, hidden, hkv * dv), ("o_proj", o, hq * dv, hidden)):
        if (lin.in_features, lin.out_features) != (n_in, n_out):
            raise ValueError(f"{where}.{name}: maps {lin.in_features} -> {lin.out_features} features, the"
                             f" pattern's heads and dims need {n_in} -> {n_out}")
    for name in _NORMS:
        norm = getattr(attn, name, None)
        if norm is not None and tuple(getattr(norm, "weight", torch.empty(0)).shape) != (dqk,):
            raise ValueError(f"{where}.{name}: only a per-head norm (weight [{dqk}]) is supported")
    if hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
        raise ValueError(f"{where}: has one of q_norm, k_norm but not the other")
    if _rotary_function(attn) is None:
        raise ValueError(f"{where} ({type(attn).__name__}): its module {type(attn).__module__} has no"
                         " apply_rotary_pos_emb(q, k, cos, sin); convert supports RoPE models of the Llama layout")


def _rotary_function(attn):
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    return fn if callable(fn) else None


# ------------------------------------------------------------------ layer
class NSAttentionLayer(NSAttention):
    """A transformers attention layer as NSA (made by convert): the model's
    q/k/v/o projections (and q/k norms), RoPE as the model applies it, the
    NSA gates (and phi for pool=mlp), and the transformers attention
    interface: forward(hidden_states, position_embeddings, attention_mask,
    past_key_values | cache, ...) -> (attn_output, None). See the module
    docstring for padding and the cache."""

    def __init__(self, attn: nn.Module, pattern: Pattern, *, layer_idx: int, backend: str = "auto",
                 phi_hidden: Optional[int] = None, query_chunk: Optional[int] = None):
        ref = attn.q_proj.weight
        scale = getattr(attn, "scaling", None)
        # NSAttention builds everything on the meta device; the projections
        # are then the model's and the new parameters are made for real
        super().__init__(pattern, attn.q_proj.in_features, separate_kv=False, backend=backend,
                         scale=float(scale) if scale is not None else None, phi_hidden=phi_hidden,
                         query_chunk=query_chunk, device="meta", dtype=ref.dtype)
        for name in _PROJECTIONS + _NORMS:
            if hasattr(attn, name):
                setattr(self, name, getattr(attn, name))
        for name in ("gate_proj", "phi_k", "phi_v"):
            if hasattr(self, name):
                getattr(self, name).to_empty(device=ref.device)
        self._reset_gate()
        for phi in (getattr(self, "phi_k", None), getattr(self, "phi_v", None)):
            if phi is not None:
                phi.reset_parameters()
        self.layer_idx = getattr(attn, "layer_idx", None)
        if self.layer_idx is None:
            self.layer_idx = layer_idx
        self.config = getattr(attn, "config", None)
        self.head_dim = pattern.dims.qk
        self.is_causal = True
        # (a plain attribute: some transformers versions wrap the function in a module)
        self.__dict__["_rotary"] = _rotary_function(attn)

    # ------------------------------------------------------------ pieces
    def project(self, x: torch.Tensor, position_embeddings) -> tuple:
        """q [B, T, HQ, Dqk], k [B, T, HKV, Dqk] (after RoPE), v [B, T, HKV,
        Dv] as the model's attention computes them."""
        if not (isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2):
            raise ValueError("position_embeddings: expected the (cos, sin) pair the model computes for RoPE, got"
                             f" {type(position_embeddings).__name__}")
        p = self.pattern
        B, T = x.shape[:2]
        q = self.q_proj(x).view(B, T, p.heads.q, p.dims.qk)
        k = self.k_proj(x).view(B, T, p.heads.kv, p.dims.qk)
        v = self.v_proj(x).view(B, T, p.heads.kv, p.dims.v)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = self._rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # the model's [B, H, T, D] layout
        return q.transpose(1, 2), k.transpose(1, 2), v

    # ----------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache_position=None, **kwargs):
        """The transformers attention interface: (attn_output [B, T, hidden], None)."""
        # the cache's keyword: past_key_values (transformers 5.0), cache (later 5.x), past_key_value (older)
        cache = past_key_values
        for name in ("cache", "past_key_value"):
            given = kwargs.pop(name, None)
            cache = given if cache is None else cache
        for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: packed sequences (flash-attention kwargs) are not supported by the"
                                 " nsa_dsl layer; pass a batch with an attention_mask")
        self._check_input(hidden_states)
        qkv = self.project(hidden_states, position_embeddings)
        B, T = hidden_states.shape[:2]
        layer = None if cache is None else _cache_layer(cache, self.layer_idx)
        past = 0 if layer is None else layer.columns
        valid, from_2d = token_mask(attention_mask, B, T, past)
        if layer is None:
            return self._forward_uncached(hidden_states, qkv, valid), None
        layer.check_usable()
        if torch.is_grad_enabled():
            if past:
                raise RuntimeError("a cached call with gradients enabled: nsa_dsl's cache is for inference (run"
                                   " it under torch.no_grad(), as generate does)")
            out = self._forward_uncached(hidden_states, qkv, valid)
            layer.columns += T
            layer.stale = ("its first forward ran with gradients enabled (training with use_cache on), which"
                           " computes without the cache; generate, or run forward under torch.no_grad()")
            return out, None
        return self._forward_cached_rows(hidden_states, qkv, valid, from_2d, layer), None

    def _forward_uncached(self, x: torch.Tensor, qkv: tuple, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Every row alone: the whole batch where nothing is padding, else
        each row's tokens packed as one sequence (cu_seqlens)."""
        if valid is None:
            return NSAttention.forward(self, x, qkv=qkv)
        B, T, hidden = x.shape
        counts = valid.sum(1)
        if counts.min() == T:
            return NSAttention.forward(self, x, qkv=qkv)
        out = x.new_zeros(B * T, hidden)
        if counts.sum() == 0:
            return out.view(B, T, hidden)
        idx = valid.reshape(-1).nonzero().squeeze(1).to(x.device)
        lengths = counts[counts > 0]
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device=x.device, dtype=torch.int32)

        def packed(t):
            return t.reshape(B * T, *t.shape[2:])[idx].unsqueeze(0)

        y = NSAttention.forward(self, packed(x), cu, int(lengths.max()), qkv=tuple(packed(t) for t in qkv))
        return out.index_put((idx,), y[0].to(out.dtype)).view(B, T, hidden)

    def _forward_cached_rows(self, x: torch.Tensor, qkv: tuple, valid: Optional[torch.Tensor], from_2d: bool,
                             layer: "NSACacheLayer") -> torch.Tensor:
        """Each row's new tokens appended to its own cache slot (rows with
        as many new tokens go together) and attending what the slot holds."""
        B, T, hidden = x.shape
        past = layer.columns
        new = torch.ones(B, T, dtype=torch.bool) if valid is None else valid[:, past:]
        counts = new.sum(1).tolist()
        cache = layer.prepare(self, B, qkv[0], counts)
        held = cache.host_lengths
        # the mask's account of the earlier columns against what each slot holds (a 4-D mask tells
        # nothing of them in a row whose new positions are all padding)
        before = [past] * B if valid is None else valid[:, :past].sum(1).tolist()
        for b in range(B):
            if held[b] != before[b] and (valid is None or from_2d or counts[b]):
                raise ValueError(f"attention_mask: row {b} has {before[b]} tokens among the {past} earlier"
                                 f" positions, its cache slot holds {held[b]}")
        layer.columns += T
        if all(n == T for n in counts):
            return NSAttention.forward(self, x, cache=cache, qkv=qkv)
        out = x.new_zeros(B, T, hidden)
        groups: Dict[int, List[int]] = defaultdict(list)
        for b, n in enumerate(counts):
            if n:
                groups[n].append(b)
        for n, rows in groups.items():
            r = torch.tensor(rows, device=x.device)[:, None]
            pos = torch.stack([new[b].nonzero().squeeze(1) for b in rows]).to(x.device)
            y = NSAttention.forward(self, x[r, pos], cache=cache, slots=rows, qkv=tuple(t[r, pos] for t in qkv))
            out[r, pos] = y.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, " + super().extra_repr()


# ------------------------------------------------------------------- mask
_memo: dict = {}


def token_mask(mask, B: int, T: int, past: int) -> tuple:
    """(valid, from_2d): which of the B x (past + T) columns are tokens (not
    padding), read from the mask a transformers model hands its attention
    layers, as a bool CPU tensor (None when every column is a token), and
    whether the mask was 2-D. ValueError for a mask that is not causal
    attention over each row's tokens."""
    if mask is None:
        return None, False
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask: expected None or a tensor (2-D or 4-D), got {type(mask).__name__}"
                         " (a flex-attention BlockMask or another custom mask is not supported)")
    key = (B, T, past, mask._version)
    hit = _memo.get("last")
    if hit is not None and hit[0]() is mask and hit[1] == key:  # every layer of one forward gets the same mask
        return hit[2]
    valid = _token_mask(mask, B, T, past)
    found = (None if bool(valid.all()) else valid, mask.dim() == 2)
    _memo["last"] = (weakref.ref(mask), key, found)
    return found


def _token_mask(mask: torch.Tensor, B: int, T: int, past: int) -> torch.Tensor:
    K = past + T
    if mask.dim() == 2:
        if tuple(mask.shape) != (B, K):
            raise ValueError(f"attention_mask: a 2-D mask must be [batch={B}, columns={K}] (the {past} cached and"
                             f" {T} new positions), got {list(mask.shape)}")
        return (mask != 0).cpu()
    if mask.dim() != 4:
        raise ValueError(f"attention_mask: expected a 2-D [B, columns] or 4-D [B, 1, T, columns] mask, got"
                         f" shape {list(mask.shape)}")
    if mask.shape[0] not in (1, B) or mask.shape[2] != T or mask.shape[3] != K:
        raise ValueError(f"attention_mask: a 4-D mask must be [batch={B}, heads, queries={T}, columns={K}],"
                         f" got {list(mask.shape)}")
    if mask.dtype.is_floating_point:
        allowed = mask == 0
        masked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool((allowed | masked).all()):
            raise ValueError("attention_mask: a float mask with values other than 0 (attend) and the dtype's"
                             " minimum (masked), e.g. an additive bias, is not supported by nsa_dsl's attention")
    else:
        allowed = mask != 0
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        raise ValueError("attention_mask: a mask that differs between heads is not supported")
    allowed = allowed[:, 0].expand(B, T, K)
    cols = torch.arange(K, device=mask.device)
    rows = past + torch.arange(T, device=mask.device)
    future = cols[None, :] > rows[:, None]  # [T, K]
    sees_future = (allowed & future).any(-1)
    # a query that sees the future must be a padding row left fully unmasked
    if bool((sees_future & ~allowed.all(-1)).any()):
        raise ValueError(_MASK_ERROR.format(what="lets a query see later positions"))
    regular = ~sees_future
    valid = (allowed & regular[..., None]).any(1)  # a column some causal row attends is a token
    is_query = regular & allowed[:, torch.arange(T, device=mask.device), rows]  # a token attends itself
    if not bool((valid[:, past:] == is_query).all()):
        raise ValueError(_MASK_ERROR.format(what="has a token that does not attend itself"))
    expect = valid[:, None, :] & ~future
    if not bool(((allowed == expect).all(-1) | ~is_query).all()):
        raise ValueError(_MASK_ERROR.format(what="hides earlier tokens from a query"))
    return valid.cpu()


_MASK_ERROR = ("attention_mask: the mask {what}; nsa_dsl's attention supports causal attention over each row's"
               " tokens with padding anywhere (packed sequences, sliding windows, prefix-LM or other custom masks"
               " are not supported)")


# ------------------------------------------------------------------ cache
class NSACacheLayer(DynamicLayer):
    """One converted layer's entry in a transformers cache: an nsa_dsl
    NSACache (one slot per batch row, grown as sequences outgrow it) and the
    number of columns (positions, padding included) the model has seen,
    which is what transformers asks for (get_seq_length, get_mask_sizes).
    It holds no keys of its own in HF's layout (``keys``/``values`` stay
    None). Beam search, batch reordering and cropping are not supported."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.cache: Optional[NSACache] = None
        self.columns = 0
        self.stale: Optional[str] = None

    def __repr__(self) -> str:
        return f"NSACacheLayer(columns={self.columns}, cache={self.cache!r})"

    # ---------------------------------------------- what transformers asks
    def get_seq_length(self, *args, **kwargs) -> int:
        return self.columns

    def get_mask_sizes(self, query, *args, **kwargs) -> tuple:
        """(kv_length, kv_offset) of the mask: every column seen and the new
        ones (`query`: their count, or the cache_position tensor of older
        transformers)."""
        n = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
        return self.columns + n, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs):
        raise RuntimeError("NSACacheLayer: this layer's attention is nsa_dsl's, which keeps its own cache;"
                           " cache.update() of HF's attention layers does not apply to it")

    def reset(self) -> None:
        self.cache, self.columns, self.stale = None, 0, None

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("nsa_dsl's cache does not support beam search (reorder_cache); generate with"
                                  " num_beams=1")

    def crop(self, n: int) -> None:
        if (n == 0 and _CROP_REMOVES) or n >= self.columns:  # removes nothing
            return
        raise NotImplementedError("nsa_dsl's cache cannot be cropped (assisted generation, contrastive search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1 and self.columns:
            raise NotImplementedError("nsa_dsl's cache does not support expanding its batch")

    def batch_select_indices(self, indices) -> None:
        if self.columns:
            raise NotImplementedError("nsa_dsl's cache does not support selecting batch rows")

    # ------------------------------------------------------------- ours
    def check_usable(self) -> None:
        if self.stale is not None:
            raise RuntimeError(f"this transformers cache cannot be continued: {self.stale}")

    def prepare(self, layer: NSAttentionLayer, batch: int, like: torch.Tensor, counts: List[int]) -> NSACache:
        """The NSACache for a call appending counts[b] tokens to row b:
        made at the first call, grown when a row would outgrow it."""
        c = self.cache
        need = max(n + (0 if c is None else c.host_lengths[b]) for b, n in enumerate(counts))
        if c is None:
            self.cache = layer.new_cache(batch, _round_up(max(need, 1)), device=like.device, dtype=like.dtype)
            return self.cache
        if c.batch != batch:
            raise NotImplementedError(f"the batch changed from {c.batch} to {batch} rows between calls sharing a"
                                      " cache (beam search, batch expansion): not supported by nsa_dsl's cache")
        if need > c.max_len:
            c.grow(_round_up(max(need, 2 * c.max_len)))
        return c


def _round_up(n: int) -> int:
    return -(-n // _CACHE_ROUND) * _CACHE_ROUND


# later transformers crop by a count of positions to remove (<= 0); 5.0, to a length
_CROP_REMOVES = "tokens_to_remove" in inspect.signature(DynamicLayer.crop).parameters


def _cache_layer(cache, idx: int) -> NSACacheLayer:
    """The NSACacheLayer of layer idx in a transformers cache, put there
    (in place of an empty DynamicLayer) at the first call."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise ValueError(f"past_key_values: expected a transformers Cache with per-layer entries (DynamicCache),"
                         f" got {type(cache).__name__}")
    while len(layers) <= idx:
        make = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
        layers.append(make())
    entry = layers[idx]
    if isinstance(entry, NSACacheLayer):
        return entry
    if type(entry) is not DynamicLayer:
        raise NotImplementedError(f"past_key_values: layer {idx} is a {type(entry).__name__}; nsa_dsl keeps its"
                                  " cache in a DynamicCache (static, sliding, quantized caches are not supported)")
    if entry.get_seq_length():
        raise ValueError(f"past_key_values: layer {idx} holds keys of an attention that was not nsa_dsl's")
    layers[idx] = NSACacheLayer()
    return layers[idx]


# ------------------------------------------------------------ save / load
def from_pretrained(model_class, path, pattern=None, *, backend: str = "auto", query_chunk: Optional[int] = None,
                    **kwargs) -> nn.Module:
    """Load a converted model saved with save_pretrained: the model class's
    (e.g. AutoModelForCausalLM) from_pretrained(path, **kwargs), which
    loads the original weights and reports the NSA parameters it does not
    know as unexpected, then convert with the pattern saved in its config
    (or `pattern`), then the NSA parameters (gate_proj, phi) from the
    checkpoint's safetensors files in the local directory `path`; a
    ValueError if any is missing."""
    model = model_class.from_pretrained(path, **kwargs)
    saved = getattr(model.config, "nsa_dsl", None)
    phi_hidden = saved.get("phi_hidden") if isinstance(saved, dict) else None
    if pattern is None:
        if not isinstance(saved, dict) or "pattern" not in saved:
            raise ValueError(f"{path}: its config has no nsa_dsl pattern (not saved from a converted model?);"
                             " pass pattern=")
        pattern = parse(saved["pattern"])
    before = set(model.state_dict())
    convert(model, pattern, backend=backend, phi_hidden=phi_hidden, query_chunk=query_chunk)
    wanted = sorted(set(model.state_dict()) - before)
    found = _read_tensors(path, wanted)
    missing = [k for k in wanted if k not in found]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks NSA parameters {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} (saved before convert?)")
    model.load_state_dict(found, strict=False)
    return model


def _read_tensors(path, names: List[str]) -> dict:
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: the NSA parameters are read from a local directory written by save_pretrained"
                         " (for a Hub id, download it first: huggingface_hub.snapshot_download)")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({weight_map[n] for n in names if n in weight_map})
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path}: no model.safetensors (or its index) to read the NSA parameters from")
    found = {}
    for name in files:
        tensors = load_file(os.path.join(path, name))
        found.update({n: t for n, t in tensors.items() if n in names})
    return found
