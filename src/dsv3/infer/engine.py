"""A batched decoding engine over the paged latent cache (:mod:`dsv3.infer.paged_cache`).

    engine = Engine(model, max_batch=8, cache_memory=2 << 30)     # speculative=True: MTP drafts
    a = engine.submit(prompt_ids, max_new_tokens=64, params=SamplingParams(0.8, top_p=0.95), seed=1)
    engine.run()                    # or engine.step() in a loop; a.output, a.done, a.finish_reason

Every step (decided first, then executed):

1. **Admit** waiting requests, oldest first, while fewer than ``max_batch`` run and the pool has the
   blocks their prompts need. Full prompt blocks already in memory with the same content are shared
   (reference counts) and skipped; further blocks may come from the on-disk prefix cache.
2. **Prefill** up to ``prefill_chunk`` prompt tokens (chunked prefill: a long prompt takes several
   steps while the running streams keep decoding), several requests in one padded forward.
3. **Decode** one token for every running request in a single forward, each row at its own position
   (two with ``speculative``: the row's last token and its MTP draft, verified together).
   When the pool has no block for a row, the newest request is *preempted*: its blocks are freed and
   it waits again; on return its prompt and tokens so far are prefilled again and it goes on exactly
   as it would have (its random generator and draft are kept with it).

Each request samples with its own generator, so its tokens equal ``generate(model, prompt, …)`` with
the same settings, whatever else runs beside it.

A request with a ``grammar`` (structured output, :mod:`dsv3.infer.structured`) has every token it
draws limited to what its grammar matcher allows next (the rest get logit -inf after its penalties and
bias), in greedy, sampled and speculative steps alike: a draft is drawn from the masked MTP
distribution and verified against the masked target one (both at the matcher's current state, so the
acceptance rule stays exact), and the bonus token is masked after the accepted one has advanced the
matcher. Once the output is complete the grammar allows only the request's stop tokens.

Under expert-parallel serving with two-micro-batch overlap (``--tbo``, :mod:`dsv3.infer.ep_engine`)
each forward's rows split into two halves of similar token count that run at once, one per overlap
lane (:func:`dsv3.parallel.overlap.run_pair`): one half's attention and expert GEMMs run while the
other's dispatch/combine is in flight. Sampling waits for both and goes in row order, so the tokens
are those of the single forward. The engine is not thread-safe: a server drives it
from one thread (:class:`dsv3.infer.worker.EngineWorker`).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections import deque
from dataclasses import dataclass, field

import torch

from ..devices import upload
from ..model.layers import at_least_fp32
from ..parallel.overlap import run_pair, span
from .paged_cache import BlockPool, PagedLatentCache, block_keys
from .sampling import (NOT_FINITE, SamplingParams, accept_or_resample, adjust_logits, distributions, draw,
                       sample_rows, token_logprobs, uniforms)


class ContextOverflow(ValueError):
    """The prompt and the tokens asked for do not fit in the model's context."""


@dataclass(frozen=True)
class EngineLimits:
    """What a request is checked against (also where the engine runs in another process)."""
    max_len: int              # context: prompt + new tokens
    vocab_size: int
    block_size: int
    num_blocks: int           # cache blocks in the pool
    lookahead: int            # positions beyond the sequence a step writes (speculative: 1)
    prefix_cache: str | None = None   # the on-disk prefix cache's block identity (PrefixCache.identity)

    @property
    def max_request_len(self) -> int:
        """The longest request (prompt + new tokens) the engine can finish: the context, or less where
        the whole cache pool holds fewer positions (a request alone in it still needs a block for every
        position it writes, lookahead included)."""
        return min(self.max_len, self.num_blocks * self.block_size - self.lookahead)


def check_request(limits: EngineLimits, prompt_ids: list[int], max_new_tokens: int,
                  logprobs: int | None = None, prompt_logprobs: int | None = None) -> None:
    """ValueError naming what is wrong; ContextOverflow when the request cannot fit the context or the pool."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    vocab = limits.vocab_size
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt_ids):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: must be an integer >= 1")
    if len(prompt_ids) + max_new_tokens > limits.max_len:
        raise ContextOverflow(f"the prompt has {len(prompt_ids)} tokens and {max_new_tokens} more were asked "
                              f"for; the context holds {limits.max_len}")
    for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
        if k is not None and (not isinstance(k, int) or not 0 <= k <= vocab):
            raise ValueError(f"{name} = {k}: must be an integer in [0, {vocab}]")
    need = math.ceil((len(prompt_ids) + 1 + limits.lookahead) / limits.block_size)
    if need > limits.num_blocks:
        raise ContextOverflow(f"the prompt needs {need} cache blocks; the pool has {limits.num_blocks} "
                              "(give the cache more memory)")
    if len(prompt_ids) + max_new_tokens > limits.max_request_len:
        # it would run until the pool is full and then fail: refuse it before it starts
        raise ContextOverflow(f"the prompt has {len(prompt_ids)} tokens and {max_new_tokens} more were asked "
                              f"for; the cache pool holds {limits.max_request_len} positions of one request "
                              "(give the cache more memory)")


@dataclass
class TokenLogprob:
    token: int
    logprob: float                                   # log-softmax of the raw model logits
    top: list = field(default_factory=list)          # [(token id, logprob)] best first


@dataclass(eq=False)                                 # requests are compared by identity
class Request:
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int = 0
    stop_ids: frozenset = frozenset()        # tokens that end the request ("stop"); kept in output
    logprobs: int | None = None              # None, or the number of alternatives per output token
    prompt_logprobs: int | None = None       # None, or the same for the prompt tokens (echo)
    on_token: object = None                  # callable(request) after each token, or None
    on_done: object = None                   # callable(request) once at the end, or None
    id: int = 0
    grammar: object = None                   # a structured.GrammarSpec the output must follow, or None
    output: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    prompt_logprobs_out: list = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None         # "stop" | "length" | "abort" | "error"
    error: str | None = None
    cached_tokens: int = 0                   # prompt tokens whose cache was reused (memory or disk)
    # engine state
    _gen: torch.Generator | None = None
    _blocks: list = field(default_factory=list)       # the block table
    _target: list = field(default_factory=list)       # tokens whose cache the prefill fills
    _computed: int = 0                                # positions of _target already in the cache
    _sample_at_end: bool = True                       # a fresh request samples after its prefill
    _registered: int = 0                              # leading blocks offered for sharing
    _next: int = -1                                   # the last token, not yet fed
    _draft: tuple | None = None                       # speculative: (draft [1], its distribution [1, V])
    _counts: torch.Tensor | None = None               # generated-token counts (penalties)
    _abort: bool = False
    _counted: bool = False                            # its prompt is in the engine's token counts
    _constraint: object = None                        # grammar: its structured.Constraint (matcher state)

    @property
    def seq(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        """len(seq), without building it."""
        return len(self.prompt) + len(self.output)


class Engine:
    def __init__(self, model, max_batch: int = 8, cache_memory: int | None = None, block_size: int = 64,
                 prefix_cache=None, speculative: bool = False, prefill_chunk: int = 512,
                 max_len: int | None = None, grammars=None, cuda_graphs: bool = False):
        """``cache_memory``: bytes for the latent-cache pool (default: what ``max_batch`` full-length
        sequences need, at most a quarter of the free memory). ``prefix_cache``: a
        :class:`dsv3.infer.prefix_cache.PrefixCache` (on-disk latent blocks, the second tier).
        ``speculative``: draft with MTP module 1 and verify two tokens per row per step.
        ``grammars``: a :class:`dsv3.infer.structured.Grammars` for requests with a ``grammar``
        (structured output; none: such requests are refused). ``cuda_graphs``: decode steps (plain, or
        speculative: verify and draft) replay CUDA graphs captured here, one per batch bucket
        (:mod:`dsv3.infer.decode_graphs`)."""
        if max_batch < 1:
            raise ValueError(f"max_batch = {max_batch}: must be >= 1")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk = {prefill_chunk}: must be >= 1")
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs a model with an MTP module (num_nextn_predict_layers ≥ 1)")
        if prefix_cache is not None and prefix_cache.block != block_size:
            raise ValueError(f"the prefix cache's blocks hold {prefix_cache.block} tokens, the engine's {block_size}")
        self.model = model.eval()
        cfg = model.cfg
        self.max_len = max_len or cfg.max_position_embeddings
        if not 1 < self.max_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_len = {self.max_len}: must be in 2 … {cfg.max_position_embeddings} "
                             "(max_position_embeddings)")
        self.max_batch, self.speculative, self.prefill_chunk = max_batch, speculative, prefill_chunk
        self.grammars = grammars
        self.lookahead = int(speculative)
        p = model.norm.weight
        self.device, dtype = p.device, p.dtype
        self.layers = cfg.num_hidden_layers + (len(model.mtp) if speculative else 0)
        per_block = PagedLatentCache.bytes_per_block(cfg, block_size, self.layers, dtype)
        if cache_memory is None:
            need = max_batch * math.ceil((self.max_len + 1) / block_size) * per_block
            cache_memory = min(need, free_memory(self.device) // 4)
        if cache_memory < per_block:
            raise ValueError(f"cache_memory = {cache_memory} bytes: less than one {block_size}-token block "
                             f"({per_block} bytes)")
        self.block_size = block_size
        self.cache = PagedLatentCache(cfg, int(cache_memory // per_block), block_size, self.layers, self.device, dtype)
        self.pool = BlockPool(self.cache.num_blocks)
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []          # admission order: the last is the newest
        self._ids = itertools.count()
        self.steps = 0                            # engine steps that ran a forward
        self.drafted = self.accepted = 0          # speculative drafts verified / accepted
        self.prompt_tokens = 0                    # prompt tokens admitted
        self.cached_prompt_tokens = 0             # of which reused instead of computed (memory + disk)
        self.disk_prompt_tokens = 0               # of which read from the on-disk prefix cache
        self.preemptions = 0
        # expert-parallel serving (dsv3.infer.ep_engine): an object whose agree(prefill, decode) returns
        # whether any rank runs each forward this step, whose empty_forward(part) takes part in such a
        # forward's MoE dispatch/combine with no rows of this engine's own ("all" its MoE layers, or the
        # "trunk"'s or the "mtp" module's), and whose tbo (if any) says whether forwards run as two micro-batches
        self.lockstep = None
        self.graphs = None                        # decode at fixed shapes (use_decode_graphs)
        if cuda_graphs:
            self.use_decode_graphs(capture=True)

    def use_decode_graphs(self, capture: bool) -> None:
        """Decode steps from now on run at fixed shapes (:class:`dsv3.infer.decode_graphs.DecodeGraphs`),
        replayed from CUDA graphs captured now when ``capture``, else eagerly (what the CPU tests check)."""
        from .decode_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.cache, self.pool, self.max_batch, self.max_len, capture,
                                   speculative=self.speculative)

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt_ids: list[int], max_new_tokens: int = 64, params: SamplingParams | None = None,
                     seed: int = 0, stop_ids=(), logprobs: int | None = None, prompt_logprobs: int | None = None,
                     on_token=None, on_done=None, grammar=None) -> Request:
        """A validated request (not yet queued): ValueError naming what is wrong, ContextOverflow when
        the prompt and ``max_new_tokens`` exceed the context. ``grammar``: a
        :class:`dsv3.infer.structured.GrammarSpec` every output token must keep to (the request ends with
        "stop" once the output is complete); ValueError when it cannot be built here."""
        params = params or SamplingParams()
        check_request(self.limits, prompt_ids, max_new_tokens, logprobs, prompt_logprobs)
        req = Request(list(prompt_ids), max_new_tokens, params, seed, frozenset(stop_ids), logprobs,
                      prompt_logprobs, on_token, on_done, next(self._ids), grammar)
        if grammar is not None:
            if self.grammars is None:
                raise ValueError("this engine has no tokenizer for structured output (Engine(grammars=…))")
            try:
                req._constraint = self.grammars.matcher(grammar, req.stop_ids)
            except Exception as e:  # noqa: BLE001 — GrammarError, GrammarUnavailable: the request is refused
                raise ValueError(f"structured output: {e}") from None
        req._gen = torch.Generator(device=self.device).manual_seed(seed)
        req._target = list(prompt_ids)
        return req

    def submit(self, prompt_ids: list[int], max_new_tokens: int = 64, params: SamplingParams | None = None,
               seed: int = 0, **kwargs) -> Request:
        req = self.make_request(prompt_ids, max_new_tokens, params, seed, **kwargs)
        self.enqueue(req)
        return req

    @property
    def limits(self) -> "EngineLimits":
        pc = self.prefix_cache
        return EngineLimits(self.max_len, self.model.cfg.vocab_size, self.block_size, self.pool.num_blocks,
                            self.lookahead, pc.identity(self.layers, self.lookahead) if pc is not None else None)

    def enqueue(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        """Finish ``req`` with "abort" at the start of the next step (its blocks freed then)."""
        req._abort = True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "steps": self.steps,
                "blocks_used": self.pool.num_used, "blocks_total": self.pool.num_blocks,
                "block_size": self.block_size, "cache_bytes": self.cache.nbytes(),
                "prompt_tokens": self.prompt_tokens, "prefix_hit_tokens": self.cached_prompt_tokens,
                "prefix_hit_tokens_disk": self.disk_prompt_tokens, "preemptions": self.preemptions,
                "drafted": self.drafted, "accepted": self.accepted,
                "speculative_acceptance_rate": self.acceptance_rate if self.speculative else None}

    # ------------------------------------------------------------------ one engine step
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit, prefill one chunk, decode every running request. Returns the requests finished."""
        finished: list[Request] = []
        for req in [r for r in self.waiting if r._abort]:
            self.waiting.remove(req)
            self._finish(req, "abort", finished)
        for req in [r for r in self.running if r._abort]:
            self._finish(req, "abort", finished)
        self._admit(finished)
        ran = False
        chunks = self._plan_prefill()
        prefill = decode = False
        if self.lockstep is not None:            # every rank runs the forwards that any rank runs
            prefill, decode = self.lockstep.agree(bool(chunks), self._may_decode(chunks))
        if chunks:
            self._guard(self._prefill, chunks, [r for r, _ in chunks], finished)
            ran = True
        elif prefill:
            self._join_empty()
        decoding = self._plan_decode(finished)
        if decoding and self.lockstep is not None and not decode:
            raise RuntimeError("lockstep: a decode forward no rank announced")
        if decoding:
            self._guard(self._speculative_step if self.speculative else self._plain_step, decoding, decoding,
                        finished)
            ran = True
        elif decode:
            self._join_empty()
        self.steps += ran
        return finished

    def _may_decode(self, chunks: list[tuple[Request, int]]) -> bool:
        """Before the prefill: whether this step can decode (rows decoding already, or whose prefill
        completes in ``chunks``)."""
        return (any(r._next >= 0 and not r.done for r in self.running)
                or any(r._computed + n == len(r._target) for r, n in chunks))

    def run(self) -> None:
        while not self.idle:
            self.step()

    def fail_all(self, message: str) -> list[Request]:
        """Finish every request with an error (the engine cannot go on with them)."""
        finished: list[Request] = []
        for req in list(self.running) + list(self.waiting):
            if req in self.waiting:
                self.waiting.remove(req)
            self._finish(req, "error", finished, message)
        return finished

    # ------------------------------------------------------------------ decide
    def _admit(self, finished: list) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            if not self._reserve(req):
                if not self.running:     # nothing to wait for: it can never fit
                    self.waiting.popleft()
                    self._finish(req, "error", finished, "the cache pool cannot hold this request")
                    continue
                return
            self.waiting.popleft()
            self.running.append(req)

    def _reserve(self, req: Request) -> bool:
        """Blocks for ``req``'s prefill (+ its first decode): shared ones found by content, the rest
        allocated, then filled from the on-disk cache where it has them. False when they don't fit."""
        bs, target = self.block_size, req._target
        total = math.ceil((len(target) + 1 + self.lookahead) / bs)
        shared: list[int] = []
        # keep ≥ 1 token to compute when its logits are needed (a fresh request samples from them)
        limit = len(target) - 1 if req._sample_at_end else len(target)
        keys = [] if req.prompt_logprobs is not None else block_keys(target, bs, self.lookahead)
        for key in keys[: limit // bs]:
            b = self.pool.lookup(key)
            if b is None:
                break
            shared.append(b)
        fresh = self.pool.allocate(total - len(shared))
        if fresh is None:
            self.pool.release(shared)
            return False
        req._blocks = shared + fresh
        req._registered = len(shared)
        req._computed = len(shared) * bs
        if self.prefix_cache is not None and req.prompt_logprobs is None:
            kvs, pes = self.prefix_cache.load(target, self.layers, max_tokens=limit, lookahead=self.lookahead)
            for k in range(len(shared), len(kvs)):
                self.cache.write_block(req._blocks[k], kvs[k], pes[k])
            self.disk_prompt_tokens += max(len(kvs) - len(shared), 0) * bs
            req._computed = max(req._computed, len(kvs) * bs)
        if not req._counted:
            req._counted = True
            self.prompt_tokens += len(target)
            self.cached_prompt_tokens += req._computed
            req.cached_tokens = req._computed
        return True

    def _plan_prefill(self) -> list[tuple[Request, int]]:
        """(request, tokens to compute this step) for the requests still prefilling, oldest first,
        up to ``prefill_chunk`` tokens in all."""
        budget, chunks = self.prefill_chunk, []
        for req in self.running:
            left = len(req._target) - req._computed
            if left > 0 and budget > 0:
                n = min(left, budget)
                chunks.append((req, n))
                budget -= n
            elif left == 0 and req._next < 0 and not req.done:
                chunks.append((req, 0))          # everything came from the caches: nothing to compute
        for req, n in chunks:
            if n == 0:                           # only a resumed request can be wholly cached
                self._start_decoding(req)
        return [(r, n) for r, n in chunks if n > 0]

    def _plan_decode(self, finished: list) -> list[Request]:
        """The requests that decode this step, each with blocks for the positions it writes;
        the newest are preempted while the pool is short."""
        rows = [r for r in self.running if r._next >= 0 and not r.done]
        width = 1 + self.lookahead
        for req in list(rows):
            if req not in rows:                  # preempted below
                continue
            need = math.ceil((req.length - 1 + width) / self.block_size) - len(req._blocks)
            while need > 0:
                got = self.pool.allocate(need)
                if got is not None:
                    req._blocks += got
                    break
                victim = self.running[-1]
                if victim is req and len(self.running) == 1:
                    self._finish(req, "error", finished, "the cache pool is full: give the cache more memory")
                    rows.remove(req)
                    break
                self._preempt(victim)
                if victim in rows:
                    rows.remove(victim)
                if victim is req:
                    break
        return rows

    def _preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and queue it first: it will prefill its prompt and tokens so far again
        (all but the last token, which it then decodes: its generator and draft are kept)."""
        self.pool.release(req._blocks)
        req._blocks, req._computed, req._registered, req._next = [], 0, 0, -1
        if req.output:
            req._target, req._sample_at_end = req.seq[:-1], False
        else:                                    # nothing sampled yet: it starts over
            req._target, req._sample_at_end = list(req.prompt), True
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.preemptions += 1

    # ------------------------------------------------------------------ execute
    def _guard(self, fn, arg, reqs: list[Request], finished: list) -> None:
        """Run one forward; if it raises, the requests in it finish with the error, nothing else."""
        try:
            fn(arg, finished)
        except Exception as e:  # noqa: BLE001 — one bad batch must not stop the engine
            if self.lockstep is not None:     # the other ranks' collectives are out of step: fatal
                raise
            for req in reqs:
                if not req.done:
                    self._finish(req, "error", finished, f"{type(e).__name__}: {e}")

    def _prefill_inputs(self, chunks: list[tuple[Request, int]]) -> tuple:
        """The forward inputs of some prefill chunks: tokens [n, T] (padded to the longest chunk), the
        start position (an int when every row starts there: the plain causal path; else [n]) and the
        cache view."""
        reqs, lens = [r for r, _ in chunks], [n for _, n in chunks]
        starts = [r._computed for r in reqs]
        T = max(lens)
        tokens = upload([t for r, s, n in zip(reqs, starts, lens) for t in r._target[s:s + n] + [0] * (T - n)],
                        self.device).view(len(reqs), T)
        view = self.cache.view([r._blocks for r in reqs], starts, lens)
        return tokens, starts[0] if len(set(starts)) == 1 else view.start, view

    def _at_last(self, x: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """Row i's entry at position lens[i] - 1: x [n, T, …] → [n, …]."""
        return x[torch.arange(len(lens), device=self.device), torch.tensor(lens, device=self.device) - 1]

    def _prefill(self, chunks: list[tuple[Request, int]], finished: list) -> None:
        """One padded forward over the next chunk of every prefilling request (two with TBO, one per half)."""
        reqs = [r for r, _ in chunks]
        lens = [n for _, n in chunks]
        starts = [r._computed for r in reqs]
        T = max(lens)
        inputs = functools.cache(lambda lo, hi: self._prefill_inputs(chunks[lo:hi]))   # a half's, for both forwards

        def trunk(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Rows lo:hi → (h [m, T, d] (zero past the half's own padded length), last-position logits [m, V])."""
            tokens, pos, view = inputs(lo, hi)
            h = self.model._trunk(tokens, pos, view)[0]
            last = at_least_fp32(self.model.lm_head(self.model.norm(self._at_last(h, lens[lo:hi]))))
            return torch.nn.functional.pad(h, (0, 0, 0, T - h.shape[1])) if h.shape[1] < T else h, last

        h, last = self._forward(trunk, lens, "trunk")                          # [n, T, d], [n, V]
        complete = [s + n == len(r._target) for r, s, n in zip(reqs, starts, lens)]
        for i, req in enumerate(reqs):
            if req.prompt_logprobs is not None:
                self._prompt_logprobs(req, h[i, :lens[i]], starts[i])
        firsts: dict[int, int] = {}
        ending = [i for i, req in enumerate(reqs) if complete[i] and req._sample_at_end]
        if ending:
            tokens, errors = self._sample_rows([reqs[i] for i in ending], last[ending])
            for i, tid, err in zip(ending, tokens, errors):
                if err is not None:
                    self._finish(reqs[i], "error", finished, err)
                else:
                    firsts[i] = tid
        mtp_last = None
        if self.speculative:                      # MTP over the chunk: position j reads h_j and token j+1
            nxt = []
            for i, (req, s, n) in enumerate(zip(reqs, starts, lens)):
                follow = req._target[s + 1:s + n + 1]
                if len(follow) < n:
                    follow = follow + [firsts.get(i, req.seq[-1] if not req._sample_at_end else 0)]
                nxt.append(follow + [0] * (T - n))
            nxt = torch.tensor(nxt, device=self.device)

            def mtp(lo: int, hi: int) -> torch.Tensor:
                """Rows lo:hi → MTP logits at their last positions [m, V]."""
                tokens, pos, view = inputs(lo, hi)
                t = tokens.shape[1]
                return self._at_last(self.model.forward_mtp(h[lo:hi, :t], nxt[lo:hi, :t], pos, view)[0], lens[lo:hi])

            mtp_last = self._forward(mtp, lens, "mtp")
        for i, (req, s, n) in enumerate(zip(reqs, starts, lens)):
            if req.done:
                continue
            req._computed = s + n
            self._register(req)
            if not complete[i]:
                continue
            if req._sample_at_end:
                self._store_prefix(req)
                self._emit(req, firsts[i], last[i], finished)
                if not req.done and self.speculative:
                    self._set_drafts([req], mtp_last[i:i + 1])
            self._start_decoding(req)

    def _start_decoding(self, req: Request) -> None:
        if not req._sample_at_end:                # resumed: the cache holds all but the last token
            req._next = req.seq[-1]
            req._sample_at_end = True
            req._target = req.prompt

    def _plain_step(self, rows: list[Request], finished: list) -> None:
        start = [r.length - 1 for r in rows]
        if self.graphs is not None and self.lockstep is None:
            logits = self.graphs.decode([r._next for r in rows], start, [r._blocks for r in rows])
        else:
            tokens = upload([r._next for r in rows], self.device).view(-1, 1)

            def forward(lo: int, hi: int) -> torch.Tensor:
                """Rows lo:hi → next-token logits [m, V]."""
                view = self.cache.view([r._blocks for r in rows[lo:hi]], start[lo:hi], [1] * (hi - lo))
                return self.model(tokens[lo:hi], view.start, view)[:, -1]

            logits = self._forward(forward, [1] * len(rows), "trunk")
        tokens, errors = self._sample_rows(rows, logits)
        entries = self._logprob_entries(rows, logits, tokens)
        for i, req in enumerate(rows):
            if errors[i] is not None:            # this request alone fails
                self._finish(req, "error", finished, errors[i])
                continue
            self._emit(req, tokens[i], entries[i], finished)

    def _sample_rows(self, rows: list[Request], logits: torch.Tensor) -> tuple[list[int], list[str | None]]:
        """The next token of every row from its raw logits [n, V] (each with its settings and generator;
        rows alike drawn in one batch) and, per row, None or the error that ends that request alone."""
        n = len(rows)
        if all(r.params.greedy and not r.params.adjusts for r in rows):
            return self._adjusted_rows(rows, logits).argmax(-1).tolist(), [None] * n
        tokens, ok = sample_rows(self._adjusted_rows(rows, logits), [r.params for r in rows], [r._gen for r in rows])
        tokens, ok = torch.stack([tokens, ok.long()]).tolist()            # one read to the host
        return tokens, [None if good else f"FloatingPointError: {NOT_FINITE}" for good in ok]

    def _logprob_entries(self, rows: list[Request], logits: torch.Tensor, tokens) -> list:
        """Per row: the :class:`TokenLogprob` of ``tokens[i]`` under the raw logits [n, V] (and its
        ``logprobs`` top alternatives) when the request asked for log-probabilities, else None; one
        batched log-softmax for all the rows that did."""
        want = [i for i, r in enumerate(rows) if r.logprobs is not None]
        out = [None] * len(rows)
        if not want:
            return out
        top = max(rows[i].logprobs for i in want)
        idx = torch.tensor(want, device=logits.device)
        lp, vals, ids = token_logprobs(logits.index_select(0, idx), torch.tensor([tokens[i] for i in want]), top)
        lp, vals, ids = lp.tolist(), vals.tolist(), ids.tolist()
        for j, i in enumerate(want):
            k = rows[i].logprobs
            out[i] = TokenLogprob(tokens[i], lp[j], list(zip(ids[j][:k], vals[j][:k])))
        return out

    def _speculative_step(self, rows: list[Request], finished: list) -> None:
        """Verify every row's draft with its last token in one forward (positions pos, pos+1), accept
        or resample per row, then one batched MTP forward for the next drafts."""
        start = [r.length - 1 for r in rows]
        view = functools.cache(lambda lo, hi: self.cache.view([r._blocks for r in rows[lo:hi]], start[lo:hi],
                                                              [2] * (hi - lo)))
        drafts = torch.cat([r._draft[0] for r in rows])
        sizes = [2] * len(rows)
        graphs = self.graphs if self.lockstep is None else None
        if graphs is not None:
            logits, h = graphs.verify([r._next for r in rows], drafts, start, [r._blocks for r in rows])
        else:
            tokens = torch.stack([upload([r._next for r in rows], self.device), drafts], dim=1)
            logits, h = self._forward(lambda lo, hi: self.model.forward_hidden(tokens[lo:hi], view(lo, hi).start,
                                                                               view(lo, hi)),
                                      sizes, "trunk")                          # [n, 2, V], [n, 2, d]
        # every row's acceptance test in one batch: its target distribution at pos (its own settings) and
        # two uniforms from its generator, as accept_or_resample draws them for the row alone
        p, ok = distributions(self._adjusted_rows(rows, logits[:, 0]), [r.params for r in rows])
        q = torch.cat([r._draft[1] for r in rows])
        tokens, accepted = accept_or_resample(drafts, p, q, u=uniforms([r._gen for r in rows], 2, self.device))
        tokens, accepted, ok = torch.stack([tokens, accepted.long(), ok.long()]).tolist()   # one read to the host
        entries = self._logprob_entries(rows, logits[:, 0], tokens)
        bonus_rows = []
        for i, req in enumerate(rows):
            if not ok[i]:
                self._finish(req, "error", finished, f"FloatingPointError: {NOT_FINITE}")
                continue
            self.drafted += 1
            self.accepted += accepted[i]
            self._emit(req, tokens[i], entries[i], finished)
            if accepted[i] and not req.done:
                bonus_rows.append(i)
        # the accepted rows' bonus tokens (pos+1), drawn after their accepted token counts for penalties
        bonus: dict[int, int] = {}
        if bonus_rows:
            reqs = [rows[i] for i in bonus_rows]
            drawn, errors = self._sample_rows(reqs, logits[bonus_rows, 1])
            more = self._logprob_entries(reqs, logits[bonus_rows, 1], drawn)
            for i, req, tid, err, entry in zip(bonus_rows, reqs, drawn, errors, more):
                if err is not None:
                    self._finish(req, "error", finished, err)
                    continue
                bonus[i] = tid
                self._emit(req, tid, entry, finished)
        # per row: the tokens after positions pos, pos+1, and where to draft (pos+1 of the caches is
        # rewritten next step where the draft was rejected)
        follow = [(tokens[i], bonus[i], 1) if i in bonus else (tokens[i], tokens[i], 0) for i in range(len(rows))]
        nxt = upload([t for a, b, _ in follow for t in (a, b)], self.device).view(-1, 2)
        if graphs is not None:
            mtp_logits = graphs.draft(nxt)
        else:
            mtp_logits = self._forward(lambda lo, hi: self.model.forward_mtp(h[lo:hi], nxt[lo:hi], view(lo, hi).start,
                                                                             view(lo, hi))[0], sizes, "mtp")
        live = [i for i, req in enumerate(rows) if not req.done]
        if live:
            self._set_drafts([rows[i] for i in live], mtp_logits[live, [follow[i][2] for i in live]])

    def _adjusted_rows(self, rows: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """logits [n, V] with each row's penalties and bias applied, then the tokens its grammar (if any)
        does not allow next set to -inf (the same tensor when no row has any of these)."""
        if any(r.params.adjusts for r in rows):
            logits = torch.stack([self._adjusted(r, logits[i]).to(logits.dtype) for i, r in enumerate(rows)])
        constrained = [i for i, r in enumerate(rows) if r._constraint is not None]
        if constrained:
            from .structured import mask_logits
            logits = mask_logits(logits, constrained, [rows[i]._constraint for i in constrained])
        return logits

    # ------------------------------------------------------------------ two micro-batches (--tbo)
    @property
    def tbo(self) -> bool:
        """Forwards run as two micro-batches on two overlap lanes (the lockstep group asks for it)."""
        return self.lockstep is not None and getattr(self.lockstep, "tbo", False)

    def _forward(self, fn, sizes: list[int], part: str):
        """One forward over rows of ``sizes`` tokens: ``fn(lo, hi)`` runs rows lo:hi and returns a tensor
        or a tuple of tensors, each [hi - lo, …]. Alone: ``fn(0, n)``. With TBO the rows split into two
        halves of similar token count (:func:`split_rows`) that run at once, half k on overlap lane k;
        a half without rows joins the forward's ``part`` MoE layers with zero tokens (so each lane
        issues the same collectives on every rank). The halves' outputs are concatenated in row order."""
        if not self.tbo:
            return fn(0, len(sizes))
        cut = split_rows(sizes)
        halves = ((0, cut), (cut, len(sizes)))

        def on_lane(k: int):
            lo, hi = halves[k]

            def run():
                with span("work", f"{part} {k}"):
                    return fn(lo, hi) if hi > lo else self.lockstep.empty_forward(part)
            return run

        outs = [o for o in run_pair(on_lane(0), on_lane(1)) if o is not None]
        if len(outs) < 2:
            return outs[0] if outs else None
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(pair) for pair in zip(*outs))
        return torch.cat(outs)

    def _join_empty(self) -> None:
        """Take part in a forward this engine has no rows for (lockstep): its MoE layers with zero tokens,
        in the order a forward with rows runs them (with TBO on both lanes: the trunk's, then the MTP
        module's when speculative)."""
        if not self.tbo:
            self.lockstep.empty_forward()              # all its MoE layers
            return
        for part in ("trunk", "mtp") if self.speculative else ("trunk",):
            self._forward(None, [], part)

    # ------------------------------------------------------------------ per request
    def _adjusted(self, req: Request, logits: torch.Tensor) -> torch.Tensor:
        return adjust_logits(logits, req.params, req._counts)

    def _set_drafts(self, rows: list[Request], mtp_logits: torch.Tensor) -> None:
        """Each row's next draft from the MTP logits [n, V]: the token and the distribution q [1, V] it was
        drawn from (one uniform from the row's generator)."""
        q, _ = distributions(self._adjusted_rows(rows, mtp_logits), [r.params for r in rows])
        drafts = draw(q, uniforms([r._gen for r in rows], 1, self.device)[:, 0])
        for i, req in enumerate(rows):
            req._draft = (drafts[i:i + 1], q[i:i + 1])

    def _prompt_logprobs(self, req: Request, h: torch.Tensor, start: int) -> None:
        """Log-probabilities of prompt tokens start+1 … from the hidden states h [n, d] of positions start …
        Only the ones not known yet: a request preempted during its prefill computes its prompt again in
        chunks that need not line up with the first pass's."""
        out = req.prompt_logprobs_out
        if start == 0 and not out:
            out.append(None)
        first = max(start + 1, len(out))                   # the first prompt index still unknown
        last = min(start + h.shape[0], len(req.prompt) - 1)
        if first > last:                                   # none left, or all known already
            return
        assert first == len(out), f"prompt log-probabilities from {first}, but only {len(out)} known"
        targets = req.prompt[first:last + 1]
        logits = self.model.lm_head(self.model.norm(h[first - 1 - start:last - start]))
        lp, vals, ids = token_logprobs(logits, torch.tensor(targets, device=self.device), req.prompt_logprobs)
        for j, t in enumerate(targets):
            out.append(TokenLogprob(t, float(lp[j]), list(zip(ids[j].tolist(), vals[j].tolist()))))

    def _emit(self, req: Request, tid: int, logits, finished: list) -> None:
        """Append ``tid`` to the output; ``logits``: the raw logits [V] it was drawn from, or its
        :class:`TokenLogprob` computed already (needed only for ``req.logprobs``)."""
        req.output.append(tid)
        req._next = tid
        if req._constraint is not None and not req._constraint.accept(tid):   # never, as the mask allowed it
            self._finish(req, "error", finished, f"structured output: token {tid} breaks the grammar")
            return
        if req.params.presence_penalty or req.params.frequency_penalty:
            if req._counts is None:
                req._counts = torch.zeros(self.model.cfg.vocab_size, device=self.device)
            req._counts[tid] += 1
        if req.logprobs is not None:
            if not isinstance(logits, TokenLogprob):
                logits = self._logprob_entries([req], logits.view(1, -1), [tid])[0]
            req.output_logprobs.append(logits)
        if tid in req.stop_ids or (req._constraint is not None and req._constraint.terminated):
            self._finish(req, "stop", finished)         # (a grammar without stop tokens: complete)
        elif len(req.output) >= req.max_new_tokens or req.length >= self.max_len:
            self._finish(req, "length", finished)
        if req.on_token is not None:
            try:
                req.on_token(req)
            except Exception as e:  # noqa: BLE001 — a broken consumer ends its own request only
                if not req.done:
                    self._finish(req, "error", finished, f"token callback failed: {e}")

    def _finish(self, req: Request, reason: str, finished: list, error: str | None = None) -> None:
        if req.done:
            return
        req.done, req.finish_reason, req.error = True, reason, error
        if req._blocks:
            self.pool.release(req._blocks)
            req._blocks = []
        if req in self.running:
            self.running.remove(req)
        finished.append(req)
        if req.on_done is not None:
            try:
                req.on_done(req)
            except Exception:  # noqa: BLE001 — the request is over either way
                pass

    # ------------------------------------------------------------------ sharing
    def _register(self, req: Request) -> None:
        """Offer the request's full, computed prompt blocks for sharing by content."""
        bs = self.block_size
        done_blocks = min(req._computed, len(req._target)) // bs
        if req.prompt_logprobs is not None or done_blocks <= req._registered:
            return
        keys = block_keys(req._target[: (done_blocks + 1) * bs + self.lookahead], bs, self.lookahead)
        for k in range(req._registered, min(done_blocks, len(keys))):
            self.pool.register(req._blocks[k], keys[k])
            req._registered = k + 1

    def _store_prefix(self, req: Request) -> None:
        """Write the prompt's full blocks to the on-disk prefix cache (second tier)."""
        if self.prefix_cache is None or req.prompt_logprobs is not None:
            return
        kv, pe = self.cache.read(req._blocks, len(req.prompt))
        self.prefix_cache.store(req.prompt, kv, pe, lookahead=self.lookahead)


def split_rows(sizes: list[int]) -> int:
    """Where to cut rows of ``sizes`` tokens into two halves ``rows[:k]``, ``rows[k:]`` of the most similar
    token counts (the rows stay in order); on a tie the first half is the larger (one row: all in it)."""
    total, before, gaps = sum(sizes), 0, []
    for k in range(len(sizes) + 1):
        gaps.append((abs(total - 2 * before), -k))
        before += sizes[k] if k < len(sizes) else 0
    return -min(gaps)[1]


def free_memory(device) -> int:
    """Bytes free for the cache on ``device``: CUDA's free memory, or the host's available memory (its
    share of it when several ranks run on the host: torchrun's LOCAL_WORLD_SIZE, expert-parallel serving)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    ranks = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // ranks
    except OSError:
        pass
    return (8 << 30) // ranks
