"""``dsv3 generate``: incremental decoding with the compressed MLA latent cache, streamed to stdout."""

from __future__ import annotations

import argparse
import os
import sys

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] → token ids [B]. temperature 0 = greedy; top-k then nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p          # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, on_token=None) -> list[int]:
    """Prefill the prompt into a latent cache, then decode one token at a time."""
    model.eval()
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    max_pos = model.cfg.max_position_embeddings
    total = min(len(prompt_ids) + max_new_tokens, max_pos)
    if len(prompt_ids) >= max_pos:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model handles {max_pos} positions")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache(1, total)
    tokens = torch.tensor([prompt_ids], device=device)
    logits = model(tokens, 0, cache)[:, -1]
    out, pos = [], len(prompt_ids)
    while pos < total:
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        tid = int(nxt[0])
        out.append(tid)
        if on_token is not None:
            on_token(tid)
        if eos_id is not None and tid == eos_id:
            break
        logits = model(nxt.view(1, 1), pos, cache)[:, -1]
        pos += 1
    return out


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, stream=None) -> str:
    """Generate and (optionally) stream the decoded text as it grows."""
    ids = tokenizer.encode(prompt)
    if stream is not None:
        stream.write(prompt)
        stream.flush()
    produced: list[int] = []
    shown = [0]

    def on_token(tid):
        produced.append(tid)
        if stream is not None:
            text = tokenizer.decode(produced)
            if not text.endswith("\ufffd"):          # wait for complete UTF-8 characters
                stream.write(text[shown[0]:])
                stream.flush()
                shown[0] = len(text)

    generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.eos_id, on_token)
    return prompt + tokenizer.decode(produced)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model directory in the HF layout (with tokenizer.json)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def run(args) -> int:
    from ..data import Tokenizer
    from ..hf import load_pretrained

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"model directory not found: {args.model}")
    tok_path = os.path.join(args.model, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{args.model} has no tokenizer.json")
    if args.max_new_tokens <= 0:
        raise ValueError("--max-new-tokens must be positive")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_pretrained(args.model, device=device)
    tokenizer = Tokenizer.from_file(tok_path)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                  args.top_p, args.seed, stream=sys.stdout)
    sys.stdout.write("\n")
    return 0
