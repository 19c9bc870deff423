"""A batched decoding engine: many requests share one latent cache and one forward per step.

Continuous batching: a request joins as soon as a slot is free (its prompt is prefilled into its own
cache row), every step decodes one token for all running requests in a single forward, each row at
its own position (absorbed MLA with a per-row mask), and a finished request frees its slot at once.
Running requests always occupy cache rows 0 … n−1: when one finishes, the last row moves into its
place, so the batched forward runs on a contiguous view of exactly n rows.

    engine = Engine(model, max_batch=8)
    a = engine.submit(prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1)
    engine.run()                    # or engine.step() in a loop; a.output, a.done, a.finish_reason

Each request samples with its own generator, so its tokens equal ``generate(model, prompt, …)`` with
the same settings, whatever else runs beside it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, sample_next


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int = 0
    eos_id: int | None = None
    on_token: object = None                  # callable(token_id) or None, called for each token
    on_done: object = None                   # callable(request) or None, called once when finished
    id: int = 0
    output: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None         # "eos" | "length"
    _gen: torch.Generator | None = None
    _limit: int = 0                          # prompt + output may not exceed this many positions


class Engine:
    def __init__(self, model, max_batch: int = 8, max_len: int | None = None, prefix_cache=None):
        """``prefix_cache``: a :class:`dsv3.infer.prefix_cache.PrefixCache` (on-disk latent blocks of
        earlier prompts); a prompt starting with cached blocks skips their prefill."""
        if max_batch < 1:
            raise ValueError(f"max_batch = {max_batch}: must be >= 1")
        self.model = model.eval()
        self.max_len = max_len or model.cfg.max_position_embeddings
        if not 1 < self.max_len <= model.cfg.max_position_embeddings:
            raise ValueError(f"max_len = {self.max_len}: must be in 2 … {model.cfg.max_position_embeddings} "
                             "(max_position_embeddings)")
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_batch, self.max_len)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []      # running[i] lives in cache row i
        self._next: list[int] = []            # per running row: the sampled token not yet fed
        self._ids = itertools.count()
        self.steps = 0                        # batched decode forwards
        self.prefix_cache = prefix_cache
        self.prompt_tokens = 0                # prompt tokens admitted
        self.cached_prompt_tokens = 0         # of which read from the prefix cache instead of computed

    def submit(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
               on_token=None, on_done=None) -> Request:
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the engine holds {self.max_len} positions")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens}: must be >= 1")
        vocab = self.model.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        req = Request(list(prompt_ids), max_new_tokens, SamplingParams(temperature, top_k, top_p), seed, eos_id,
                      on_token, on_done, next(self._ids))
        req._gen = torch.Generator(device=self.device).manual_seed(seed)
        req._limit = min(len(prompt_ids) + max_new_tokens, self.max_len)
        self.waiting.append(req)
        return req

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ------------------------------------------------------------------ one engine step
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Admit waiting requests into free slots (prefill), then decode one token for every running
        request in one batched forward. Returns the requests that finished during this step."""
        finished = []
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting.popleft()
            row = len(self.running)
            logits = self._prefill(req.prompt, row)
            self.running.append(req)
            self._next.append(-1)
            self._emit(row, logits[0, -1], finished)
        if self.running:
            n = len(self.running)
            tokens = torch.tensor([[t] for t in self._next], device=self.device)
            pos = torch.tensor([len(r.prompt) + len(r.output) - 1 for r in self.running], device=self.device)
            logits = self.model(tokens, pos, self.cache.rows(0, n))[:, -1]
            self.steps += 1
            for row in range(n):
                self._emit(row, logits[row], finished)
        self._compact()
        return finished

    def run(self) -> None:
        while not self.idle:
            self.step()

    # ------------------------------------------------------------------ internals
    def _prefill(self, prompt: list[int], row: int) -> torch.Tensor:
        """Fill cache row ``row`` with the prompt (cached blocks from disk first); last logits [1, T, V]."""
        start = 0
        if self.prefix_cache is not None:         # keep ≥ 1 token to compute: its logits start decoding
            kvs, pes = self.prefix_cache.load(prompt, max_tokens=len(prompt) - 1)
            for kv, pe in zip(kvs, pes):
                n = kv.shape[1]
                self.cache.kv[:, row, start:start + n] = kv.to(self.cache.kv)
                self.cache.pe[:, row, start:start + n] = pe.to(self.cache.pe)
                start += n
        tokens = torch.tensor([prompt[start:]], device=self.device)
        logits = self.model(tokens, start, self.cache.rows(row, row + 1))
        if self.prefix_cache is not None:
            self.prefix_cache.store(prompt, self.cache.kv[:, row], self.cache.pe[:, row])
        self.prompt_tokens += len(prompt)
        self.cached_prompt_tokens += start
        return logits

    def _emit(self, row: int, logits: torch.Tensor, finished: list) -> None:
        req = self.running[row]
        if req.done:
            return
        p = req.params
        tid = int(sample_next(logits[None], p.temperature, p.top_k, p.top_p, req._gen)[0])
        req.output.append(tid)
        self._next[row] = tid
        if req.on_token is not None:
            req.on_token(tid)
        if req.eos_id is not None and tid == req.eos_id:
            req.done, req.finish_reason = True, "eos"
        elif len(req.prompt) + len(req.output) >= req._limit:
            req.done, req.finish_reason = True, "length"
        if req.done:
            finished.append(req)
            if req.on_done is not None:
                req.on_done(req)

    def _compact(self) -> None:
        """Drop finished rows; the last running row moves into each hole (its cache row is copied)."""
        row = 0
        while row < len(self.running):
            if not self.running[row].done:
                row += 1
                continue
            last = len(self.running) - 1
            if row != last:
                length = len(self.running[last].prompt) + len(self.running[last].output)
                self.cache.kv[:, row, :length] = self.cache.kv[:, last, :length]
                self.cache.pe[:, row, :length] = self.cache.pe[:, last, :length]
                self.running[row], self._next[row] = self.running[last], self._next[last]
            self.running.pop()
            self._next.pop()
