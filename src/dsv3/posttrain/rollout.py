"""Sampling for post-training: G completions per prompt from the batched inference engine
(:class:`dsv3.infer.engine.Engine`: continuous batching over the paged latent cache, prompts of a group
sharing their cached prefix blocks), with the per-token log-probabilities of the sampled tokens.

The engine holds the policy module itself, not a copy: after an optimizer step the next rollout reads
the updated weights. What the engine remembers across rollouts — latent-cache blocks registered by
content for prefix sharing — was computed with the old weights, so :func:`rollout` starts each one
with an empty block registry (:func:`forget_cached_prefixes`). Nothing else is derived from the weights
and kept (MLA's absorbed W_uk/W_uv are read from ``kv_b_proj`` in every forward).

Each completion samples with its own generator seeded from (seed, step, row), so a rollout is a pure
function of the weights and those numbers — what makes a resumed GRPO run repeat the uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..infer.engine import Engine
from ..infer.paged_cache import BlockPool
from ..infer.sampling import SamplingParams


@dataclass
class Completion:
    prompt_index: int            # into the prompts of this rollout
    prompt_ids: list[int]
    tokens: list[int]            # the sampled tokens, the end-of-sentence token included when it stopped there
    logprobs: list[float]        # log-softmax of the raw logits of the sampling policy, per sampled token
    text: str                    # the decoded completion, without the end-of-sentence token
    finish_reason: str


def make_engine(model, max_batch: int, max_len: int) -> Engine:
    """An engine over ``model`` (the module itself) for rows of at most ``max_len`` tokens. The RoPE table
    is built first outside inference mode, so the training forward can use the same tensor."""
    model.freqs_cis(0, model.cfg.max_position_embeddings, model.norm.weight.device)
    return Engine(model, max_batch=max_batch, max_len=max_len, block_size=16, prefill_chunk=4096)


def forget_cached_prefixes(engine: Engine) -> None:
    """Drop the content keys of every cached block (they were computed with earlier weights)."""
    if not engine.idle:
        raise RuntimeError("the engine still has requests")
    engine.pool = BlockPool(engine.pool.num_blocks)


def row_seed(seed: int, step: int, row: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + row) % (2**63 - 1)


@torch.no_grad()
def rollout(engine: Engine, tokenizer, prompts: list[list[int]], group: int, max_new_tokens: int,
            params: SamplingParams, seed: int, step: int, stop_at_eos: bool = True) -> tuple[list[Completion], dict]:
    """``group`` completions of every prompt (prompt-major order) and timing: ``gen_tokens``,
    ``gen_seconds``, ``gen_tokens_per_s``. ``stop_at_eos=False``: every completion is exactly
    ``max_new_tokens`` long (an end-of-sentence token sampled on the way is kept as a token; for timing at a
    fixed length)."""
    was_training = engine.model.training
    forget_cached_prefixes(engine)
    reqs = []
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        for g in range(group):
            row = i * group + g
            reqs.append((i, engine.submit(ids, max_new_tokens, params, seed=row_seed(seed, step, row),
                                          stop_ids=tokenizer.stop_ids if stop_at_eos else (), logprobs=0)))
    engine.run()
    dt = time.perf_counter() - t0
    engine.model.train(was_training)
    out = []
    for i, r in reqs:
        if r.finish_reason == "error":
            raise RuntimeError(f"sampling failed: {r.error}")
        body = r.output[:-1] if r.finish_reason == "stop" else r.output
        out.append(Completion(i, prompts[i], list(r.output), [t.logprob for t in r.output_logprobs],
                              tokenizer.decode(body), r.finish_reason))
    n = sum(len(c.tokens) for c in out)
    return out, {"gen_tokens": n, "gen_seconds": dt, "gen_tokens_per_s": n / max(dt, 1e-9)}
