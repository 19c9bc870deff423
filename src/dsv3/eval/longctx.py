"""How much of its context a model really uses (SPEC §2.5): loss by position, passkey and needle retrieval.

* ``ppl_by_position``: windows of held-out tokens, each scored in full (teacher forcing); the next-token
  loss averaged in position buckets. A model that uses its context has a curve that falls with the
  position and stays down beyond the length it was pre-trained at; one that does not rises there.
* ``retrieval`` (``passkey`` / ``niah``): a 5-digit number hidden at depth d of a prompt of L tokens
  (repeated filler sentences, or held-out text for the needle in a haystack), and the question at the
  end; greedy decoding must give the number (``data.passkey.score_answer``). Accuracy per (L, d).

Both run batched through the inference engine (:class:`dsv3.infer.engine.Engine`, chunked prefill over
the paged latent cache): ``prompt_logprobs`` gives the per-token losses of a window.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.passkey import Retrieval, random_key, score_answer
from ..infer.sampling import SamplingParams


def ensure_context(model, length: int) -> str | None:
    """Let ``model`` run ``length`` positions: raise ``max_position_embeddings`` when it is below (the
    rotary angles simply continue, i.e. plain extrapolation). Returns a note saying so, or None."""
    cfg = model.cfg
    if length <= cfg.max_position_embeddings:
        return None
    note = (f"positions up to {length} exceed the model's max_position_embeddings ({cfg.max_position_embeddings}); "
            f"evaluated by extrapolating its rotary embedding")
    cfg.max_position_embeddings = length
    model._freqs = torch.empty(0, dtype=torch.complex64)
    return note


def _engine(model, max_len: int, max_batch: int, prefill_chunk: int):
    from ..infer.engine import Engine

    ensure_context(model, max_len)
    return Engine(model, max_batch=max_batch, max_len=max_len, prefill_chunk=prefill_chunk)


@torch.no_grad()
def token_losses(model, windows: list[np.ndarray], max_batch: int = 8, prefill_chunk: int = 512) -> np.ndarray:
    """Next-token losses [N, L−1] of N windows of L tokens (loss at index p predicts token p+1)."""
    L = len(windows[0])
    engine = _engine(model, L + 2, max_batch, prefill_chunk)
    reqs = [engine.submit([int(t) for t in w], max_new_tokens=1, prompt_logprobs=0) for w in windows]
    engine.run()
    out = np.empty((len(windows), L - 1))
    for i, r in enumerate(reqs):
        if r.finish_reason == "error":
            raise RuntimeError(f"the engine failed on window {i}: {r.error}")
        out[i] = [-lp.logprob for lp in r.prompt_logprobs_out[1:L]]
    return out


def bucket_means(losses: np.ndarray, width: int) -> tuple[list[int], list[float]]:
    """Mean loss per bucket of ``width`` target positions: bucket k covers positions [k·width, (k+1)·width)
    of the predicted token (the token at position p is predicted from the p tokens before it)."""
    L = losses.shape[1] + 1
    pos = np.arange(1, L)
    starts, means = [], []
    for lo in range(0, L, width):
        sel = (pos >= lo) & (pos < lo + width)
        if sel.any():
            starts.append(lo)
            means.append(float(losses[:, sel].mean()))
    return starts, means


def ppl_by_position(model, windows: list[np.ndarray], trained_length: int, width: int | None = None,
                    max_batch: int = 8, prefill_chunk: int = 512) -> dict:
    """Loss by position over ``windows`` (held-out tokens), and the figures the acceptance reads:
    ``in_range`` = mean loss at positions [trained/2, trained), ``beyond`` = at [trained, L) and the
    worst bucket beyond, each also as a ratio to ``in_range``."""
    losses = token_losses(model, windows, max_batch, prefill_chunk)
    L = losses.shape[1] + 1
    width = width or max(L // 32, 1)
    starts, means = bucket_means(losses, width)
    pos = np.arange(1, L)
    res = {"length": L, "windows": len(windows), "bucket": width, "positions": starts, "loss": means,
           "trained_length": trained_length, "mean_loss": float(losses.mean())}
    lo = max(trained_length // 2, 1)
    in_range = losses[:, (pos >= lo) & (pos < trained_length)]
    if in_range.size:
        res["in_range"] = float(in_range.mean())
        beyond = losses[:, pos >= trained_length]
        if beyond.size:
            res["beyond"] = float(beyond.mean())
            res["beyond_ratio"] = res["beyond"] / res["in_range"]
            worst = max(m for s, m in zip(starts, means) if s >= trained_length) if any(
                s >= trained_length for s in starts) else res["beyond"]
            res["worst_bucket_beyond"] = worst
            res["worst_bucket_ratio"] = worst / res["in_range"]
    return res


@torch.no_grad()
def retrieval(model, tokenizer, task: str, lengths: list[int], depths: list[float], samples: int, seed: int = 0,
              haystack: np.ndarray | None = None, max_batch: int = 8, prefill_chunk: int = 512) -> dict:
    """Accuracy of greedy retrieval over the grid ``lengths`` × ``depths`` (``samples`` keys per cell).
    ``task``: "passkey" (filler sentences) or "niah" (``haystack``: held-out tokens; each sample reads it
    from another offset)."""
    r = Retrieval(tokenizer, task)
    rng = np.random.default_rng(seed)
    engine = _engine(model, max(lengths) + 16, max_batch, prefill_chunk)
    cells = []
    for L in lengths:
        for d in depths:
            for _ in range(samples):
                key = random_key(rng)
                hay = None
                if haystack is not None:
                    if len(haystack) < L:
                        raise ValueError(f"the held-out split has {len(haystack)} tokens; a {L}-token haystack "
                                         f"needs more")
                    start = int(rng.integers(0, len(haystack) - L + 1))
                    hay = haystack[start:start + L]
                prompt = r.prompt(L, d, key, hay)
                n_new = len(r.answer_ids(key)) + 1
                req = engine.submit([int(t) for t in prompt], max_new_tokens=n_new, params=SamplingParams(0.0))
                cells.append((L, d, key, req))
    engine.run()
    acc = np.zeros((len(lengths), len(depths)))
    examples = []
    for L, d, key, req in cells:
        text = tokenizer.decode(req.output)
        ok = score_answer(text, key)
        acc[lengths.index(L), depths.index(d)] += ok / samples
        if len(examples) < 4 or (not ok and len(examples) < 8):
            examples.append({"length": L, "depth": d, "key": key, "output": text, "correct": ok})
    return {"task": task, "lengths": lengths, "depths": depths, "samples": samples,
            "accuracy": acc.tolist(), "mean": float(acc.mean()),
            "by_length": {str(L): float(acc[i].mean()) for i, L in enumerate(lengths)},
            "chance": 10.0 ** -5, "examples": examples}


def windows_from(dataset, length: int, count: int) -> list[np.ndarray]:
    """``count`` consecutive windows of ``length`` tokens from the start of a split (fewer when it is short)."""
    n = min(count, dataset.num_tokens // length)
    if n < 1:
        raise ValueError(f"the {dataset.split!r} split of {dataset.path} has {dataset.num_tokens} tokens, "
                         f"fewer than one {length}-token window")
    return [dataset.read(i * length, length) for i in range(n)]

