"""Greedy generation with the NSA cache: the tiny model of
examples/train_tiny.py (random weights, or a state dict saved from it)
prefills a prompt of the recall task, then decodes token by token, each
layer's NSAttention appending to its own cache. The same tokens come out of
recomputing the whole sequence at every step, which is checked.

    python examples/generate.py                   # CPU: the --tiny model, 16 new tokens
    python examples/generate.py --weights model.pt --pattern train_tiny_mean --hidden 256 --layers 4 --seq-len 4096

Exit status 1 if the cached and the recomputed tokens differ.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_tiny as tt  # noqa: E402


def forward_cached(model, tokens: torch.Tensor, caches: list, prev: torch.Tensor) -> torch.Tensor:
    """Logits [B, m, vocab] of the next m tokens of each sequence, every
    layer attending its cache (which they are appended to); prev [B] is the
    token before them (the model embeds the previous token too)."""
    x = model.embed(tokens)
    if model.prev_embed is not None:
        x = x + model.prev_embed(torch.cat([prev[:, None], tokens[:, :-1]], 1))
    for block, cache in zip(model.blocks, caches):
        x = x + block.attn(block.norm1(x), cache=cache)
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x))


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int, *, chunk: int = 0) -> tuple:
    """(tokens with the cache [B, P + new], tokens recomputed [B, P + new],
    seconds of each): greedy, prompt prefilled in pieces of `chunk` (0: at
    once)."""
    B, P = prompt.shape
    t0 = time.perf_counter()
    caches = [block.attn.new_cache(B, P + new_tokens) for block in model.blocks]
    pieces = range(0, P, chunk or P)
    prev = torch.full((B,), tt.Task.BOS, dtype=prompt.dtype, device=prompt.device)
    for a in pieces:
        b = min(P, a + (chunk or P))
        logits = forward_cached(model, prompt[:, a:b], caches, prev)
        prev = prompt[:, b - 1]
    cached = [prompt]
    for _ in range(new_tokens):
        nxt = logits[:, -1].argmax(-1)
        cached.append(nxt[:, None])
        logits = forward_cached(model, nxt[:, None], caches, prev)
        prev = nxt
    t1 = time.perf_counter()
    seq = prompt
    for _ in range(new_tokens):
        nxt = model(seq)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    t2 = time.perf_counter()
    return torch.cat(cached, 1), seq, t1 - t0, t2 - t1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", default="train_tiny_cpu")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128, help="the task's sequence length (the prompt is its context)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=48, help="prefill the prompt in pieces of this many tokens (0: at once)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--weights", help="a state dict of the TinyLM (torch.save(model.state_dict()))")
    ap.add_argument("--backend", default="auto", help="NSAttention's backend")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cfg = tt.tiny_config(pattern_name=args.pattern, hidden=args.hidden, layers=args.layers, seq_len=args.seq_len,
                         nsa_backend=args.backend, device=args.device)
    pattern = tt.load_pattern(cfg)
    task = tt.task_of(cfg, pattern)
    model = tt.TinyLM(cfg, task.vocab, pattern, "nsa").to(device).eval()
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location=device))
    tokens, _ = tt.make_batch(task, args.batch, torch.Generator(device=device).manual_seed(args.seed), device)
    prompt = tokens[:, :task.query_start + 1]  # the context, SEP and the first query key
    cached, recomputed, s_cached, s_full = generate(model, prompt, args.new_tokens, chunk=args.chunk)
    same = torch.equal(cached, recomputed)
    print(f"pattern {pattern.name}, prompt {prompt.shape[1]} tokens x {args.batch}, {args.new_tokens} new tokens"
          f" ({'random' if not args.weights else 'loaded'} weights, {model.blocks[0].attn.resolve_backend(torch.float32, device)})")
    print(f"with the cache: {cached[0, prompt.shape[1]:].tolist()}  ({s_cached:.2f} s)")
    print(f"recomputed:     {recomputed[0, prompt.shape[1]:].tolist()}  ({s_full:.2f} s)")
    print("same tokens" if same else "DIFFERENT tokens")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
