"""A batched decoding engine: many requests share one latent cache and one forward per step.

Continuous batching: a request joins as soon as a slot is free (its prompt is prefilled into its own
cache row; requests admitted together are prefilled in one padded forward), every step decodes one token for all running requests in a single forward, each row at
its own position (absorbed MLA with a per-row mask), and a finished request frees its slot at once.
Running requests always occupy cache rows 0 … n−1: when one finishes, the last row moves into its
place, so the batched forward runs on a contiguous view of exactly n rows.

    engine = Engine(model, max_batch=8)              # speculative=True: MTP drafts, see below
    a = engine.submit(prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1)
    engine.run()                    # or engine.step() in a loop; a.output, a.done, a.finish_reason

Each request samples with its own generator, so its tokens equal ``generate(model, prompt, …)`` with
the same settings, whatever else runs beside it.

With ``speculative=True`` every step verifies each row's MTP draft in the same forward that decodes
it (:mod:`dsv3.infer.speculative`, batched): rows advance by one or two tokens, each at its own
position, and a request's tokens equal ``generate_speculative(model, prompt, …)``'s.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, accept_or_resample, probabilities, sample, sample_next


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
    def __init__(self, model, max_batch: int = 8, max_len: int | None = None, prefix_cache=None,
                 speculative: bool = False):
        """``prefix_cache``: a :class:`dsv3.infer.prefix_cache.PrefixCache` (on-disk latent blocks of
        earlier prompts); a prompt starting with cached blocks skips their prefill. ``speculative``:
        draft with MTP module 1 and verify two tokens per row per step."""
        if max_batch < 1:
            raise ValueError(f"max_batch = {max_batch}: must be >= 1")
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs a model with an MTP module (num_nextn_predict_layers ≥ 1)")
        self.model = model.eval()
        self.max_len = max_len or model.cfg.max_position_embeddings
        if not 1 < self.max_len <= model.cfg.max_position_embeddings:
            raise ValueError(f"max_len = {self.max_len}: must be in 2 … {model.cfg.max_position_embeddings} "
                             "(max_position_embeddings)")
        self.max_batch = max_batch
        self.speculative = speculative
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_batch, self.max_len, mtp=speculative)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []      # running[i] lives in cache row i
        self._next: list[int] = []            # per running row: the last token, not yet fed
        self._draft: list = []                # per running row (speculative): (draft [1], its distribution q [1, V])
        self._ids = itertools.count()
        self.steps = 0                        # batched decode forwards
        self.drafted = self.accepted = 0      # speculative drafts verified / accepted
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

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    # ------------------------------------------------------------------ one engine step
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Admit waiting requests into free slots (prefill), then decode every running request in one
        batched forward. Returns the requests that finished during this step."""
        finished, new = [], []
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
            self._next.append(-1)
            self._draft.append(None)
            new.append(len(self.running) - 1)
        if len(new) > 1 and self.prefix_cache is None:     # with a prefix cache, rows start at different places
            self._admit_together(new, finished)
        else:
            for row in new:
                self._admit(row, finished)
        self._compact()
        if self.running:
            (self._speculative_step if self.speculative else self._plain_step)(finished)
            self.steps += 1
            self._compact()
        return finished

    def run(self) -> None:
        while not self.idle:
            self.step()

    # ------------------------------------------------------------------ internals
    def _positions(self) -> torch.Tensor:
        """Per running row, the position of its last token (the one fed next)."""
        return torch.tensor([len(r.prompt) + len(r.output) - 1 for r in self.running], device=self.device)

    def _admit(self, row: int, finished: list) -> None:
        req = self.running[row]
        logits, h, start = self._prefill(req.prompt, row)
        if not self.speculative:
            self._store_prefix(req.prompt, row)
            self._emit(row, self._sample_plain(req, logits[0, -1]), finished)
            return
        t = int(sample(probabilities(logits[:, -1], req.params), req._gen))
        # MTP over the prompt: position j reads h_j and token j+1 (the last one reads t)
        nxt = torch.tensor([req.prompt[start + 1:] + [t]], device=self.device)
        mtp_logits, _ = self.model.forward_mtp(h, nxt, start, self.cache.rows(row, row + 1))
        self._store_prefix(req.prompt, row)
        self._emit(row, t, finished)
        if not req.done:
            self._set_draft(row, mtp_logits[:, -1])

    def _admit_together(self, rows: list[int], finished: list) -> None:
        """Prefill several new requests (contiguous rows) in one forward, right-padded to the longest
        prompt: causal attention keeps the padding out of every real position, and the cache entries it
        leaves beyond a prompt are overwritten by that row's own tokens before they are ever read."""
        reqs = [self.running[r] for r in rows]
        lens = [len(q.prompt) for q in reqs]
        T, n = max(lens), len(rows)
        view = self.cache.rows(rows[0], rows[0] + n)
        tokens = torch.tensor([q.prompt + [0] * (T - len(q.prompt)) for q in reqs], device=self.device)
        logits, h = self.model.forward_hidden(tokens, 0, view)
        self.prompt_tokens += sum(lens)
        last = logits[torch.arange(n, device=self.device), torch.tensor(lens, device=self.device) - 1]   # [n, V]
        if not self.speculative:
            for i, row in enumerate(rows):
                self._emit(row, self._sample_plain(reqs[i], last[i]), finished)
            return
        ts = [int(sample(probabilities(last[i:i + 1], q.params), q._gen)) for i, q in enumerate(reqs)]
        nxt = torch.tensor([q.prompt[1:] + [t] + [0] * (T - len(q.prompt)) for q, t in zip(reqs, ts)],
                           device=self.device)
        mtp_logits, _ = self.model.forward_mtp(h, nxt, 0, view)
        for i, row in enumerate(rows):
            self._emit(row, ts[i], finished)
            if not reqs[i].done:
                self._set_draft(row, mtp_logits[i:i + 1, lens[i] - 1])

    def _store_prefix(self, prompt: list[int], row: int) -> None:
        """Blocks of a speculative engine hold the MTP layers too, whose entry at a position depends on
        the next token: they are stored only when that token is the prompt's, and keyed with it."""
        if self.prefix_cache is not None:
            self.prefix_cache.store(prompt, self.cache.kv[:, row], self.cache.pe[:, row],
                                    lookahead=int(self.speculative))

    def _prefill(self, prompt: list[int], row: int):
        """Fill cache row ``row`` with the prompt (cached blocks from disk first). Returns the logits
        [1, T, V] and hidden states [1, T, d] of the positions computed, and the first of them."""
        start = 0
        layers = self.cache.kv.shape[0]
        if self.prefix_cache is not None:         # keep ≥ 1 token to compute: its logits start decoding
            kvs, pes = self.prefix_cache.load(prompt, layers, max_tokens=len(prompt) - 1,
                                              lookahead=int(self.speculative))
            for kv, pe in zip(kvs, pes):
                n = kv.shape[1]
                self.cache.kv[:, row, start:start + n] = kv.to(self.cache.kv)
                self.cache.pe[:, row, start:start + n] = pe.to(self.cache.pe)
                start += n
        tokens = torch.tensor([prompt[start:]], device=self.device)
        logits, h = self.model.forward_hidden(tokens, start, self.cache.rows(row, row + 1))
        self.prompt_tokens += len(prompt)
        self.cached_prompt_tokens += start
        return logits, h, start

    def _plain_step(self, finished: list) -> None:
        tokens = torch.tensor(self._next, device=self.device)[:, None]
        logits = self.model(tokens, self._positions(), self.cache.rows(0, len(self.running)))[:, -1]
        for row, req in enumerate(self.running):
            self._emit(row, self._sample_plain(req, logits[row]), finished)

    def _speculative_step(self, finished: list) -> None:
        """Verify every row's draft with its last token in one forward (positions pos, pos+1), accept
        or resample per row, then one batched MTP forward for the next drafts."""
        view, pos = self.cache.rows(0, len(self.running)), self._positions()
        drafts = torch.cat([d for d, _ in self._draft])
        tokens = torch.stack([torch.tensor(self._next, device=self.device), drafts], dim=1)      # [n, 2]
        logits, h = self.model.forward_hidden(tokens, pos, view)
        follow = []                        # per row: the tokens after positions pos, pos+1; where to draft
        for row, req in enumerate(self.running):
            p = probabilities(logits[row:row + 1, 0], req.params)
            token, acc = accept_or_resample(drafts[row:row + 1], p, self._draft[row][1], req._gen)
            token, acc = int(token), bool(acc)
            self.drafted += 1
            self.accepted += acc
            self._emit(row, token, finished)
            if acc and not req.done:
                bonus = int(sample(probabilities(logits[row:row + 1, 1], req.params), req._gen))
                self._emit(row, bonus, finished)
                follow.append((token, bonus, 1))
            else:                          # position pos+1 of the caches is rewritten next step
                follow.append((token, token, 0))
        nxt = torch.tensor([[a, b] for a, b, _ in follow], device=self.device)
        mtp_logits, _ = self.model.forward_mtp(h, nxt, pos, view)
        for row, req in enumerate(self.running):
            if not req.done:
                self._set_draft(row, mtp_logits[row:row + 1, follow[row][2]])

    def _sample_plain(self, req: Request, logits: torch.Tensor) -> int:
        p = req.params
        return int(sample_next(logits[None], p.temperature, p.top_k, p.top_p, req._gen)[0])

    def _set_draft(self, row: int, mtp_logits: torch.Tensor) -> None:
        req = self.running[row]
        q = probabilities(mtp_logits, req.params)
        self._draft[row] = (sample(q, req._gen), q)

    def _emit(self, row: int, tid: int, finished: list) -> None:
        req = self.running[row]
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
                self.running[row], self._next[row], self._draft[row] = (self.running[last], self._next[last],
                                                                        self._draft[last])
            self.running.pop()
            self._next.pop()
            self._draft.pop()
