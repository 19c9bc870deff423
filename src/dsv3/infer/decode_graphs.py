"""The decode forward at fixed shapes, replayed from CUDA graphs (``dsv3 serve --cuda-graphs``).

A decode step launches some 700 kernels (``benchmarks/results/decode_host_overhead.md``); at small
batches the host takes longer to launch them than the GPU takes to run them (on an H200 the ``small``
preset decoded 32 tokens/s at batch 1, host-bound). vLLM and SGLang capture the decode forward once per
batch size in a CUDA graph and replay it: one launch per step. A graph fixes every shape and every
pointer, so the decode forward is made to have them fixed:

* **batch buckets**: 1, 2, 4, then multiples of 8 up to the engine's ``max_batch``
  (:func:`batch_buckets`); a step's n rows run in the smallest bucket ≥ n, the others are padding;
* **static inputs**: each row's token, position, the cache slot it writes and its block table (the
  full width of the longest request) live in buffers made once; a step copies its values into them
  (one non-blocking upload of the blocks in use, not the full width) and replays;
* **padding rows** decode token 0 at position 0 (and 1) into a scratch block that no request ever
  holds, so they never touch a real cache; their logits are dropped;
* the model sees a :class:`StaticView`, a :class:`~dsv3.infer.paged_cache.PagedView` over those buffers
  whose host-side facts are fixed (one token per row, the full table width, RoPE's table up to the
  model's last position), so its forward takes the same path with the same shapes at every step.

The same static forward runs eagerly where there is nothing to capture (``capture=False``: the CPU
tests check it against the engine's ordinary decode step). With ``capture=True`` a forward that cannot
be captured — one with a host sync inside, e.g. an FP32 model whose experts run one matmul per expert —
fails when the engine starts, with the reason, never later and never by quietly running eagerly.
"""

from __future__ import annotations

import math

import torch

from ..devices import upload
from .paged_cache import PagedLatentCache, PagedView


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, then multiples of 8, and ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch = {max_batch}: must be >= 1")
    return sorted({b for b in (1, 2, 4) if b < max_batch} | set(range(8, max_batch, 8)) | {max_batch})


class StaticView(PagedView):
    """A :class:`PagedView` of B rows, T new tokens each, over fixed buffers: ``table`` [B, W] block ids,
    ``start`` [B] first new positions, ``last`` [B] last ones, ``write_idx`` [B·T] the slots written (row
    by row). Its host-side facts never change (it reads up to W blocks; RoPE's table covers positions up
    to ``start_max``)."""

    def __init__(self, cache: PagedLatentCache, table: torch.Tensor, start: torch.Tensor, last: torch.Tensor,
                 write_idx: torch.Tensor, T: int, start_max: int):
        self.cache = cache
        self.table, self.start, self.last, self.write_idx = table, start, last, write_idx
        self.start_max = start_max
        self.end = table.shape[1] * cache.block_size
        self.all_valid, self.valid, self.T = True, None, T
        self.unmasked = False
        self.masks: dict = {}
        self._read_idx = None

    def reset(self) -> None:
        """Forget what an eager forward derived from the buffers (attention masks, read slots): the next
        one derives them from the buffers' new values. (A captured graph recomputes them at each replay.)"""
        self.masks.clear()
        self._read_idx = None


class DecodeGraphs:
    """Decode forwards of up to ``max_batch`` rows over ``cache`` at fixed shapes, captured per batch
    bucket when ``capture`` (CUDA), else run eagerly on the same buffers.

    Plain (``speculative`` False): :meth:`decode`, one token per row. Speculative: two forwards per step,
    both at two positions per row — :meth:`verify` (the trunk over each row's last token and its draft:
    logits and the last hidden states) and :meth:`draft` (MTP module 1 over those hidden states and the
    tokens that follow them), each captured per bucket, the second reading the first's output buffer."""

    def __init__(self, model, cache: PagedLatentCache, pool, max_batch: int, max_len: int, capture: bool,
                 speculative: bool = False):
        dev = cache.kv.device
        if capture and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {dev}")
        if speculative and not len(model.mtp):
            raise ValueError("speculative decode graphs need a model with an MTP module")
        self.model, self.cache, self.device = model, cache, dev
        bs = cache.block_size
        self.T = 2 if speculative else 1
        self.width = math.ceil((max_len + self.T) / bs)      # blocks of the longest request
        got = pool.allocate(1)
        if got is None:
            raise ValueError("no cache block is free for the padding rows of the decode graphs")
        self.scratch = got[0]                                # held for good: padding rows write here
        self.buckets = batch_buckets(max_batch)
        B, T = self.buckets[-1], self.T
        self.tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
        self.next_tokens = torch.zeros(B, T, dtype=torch.long, device=dev)     # speculative: MTP's inputs
        self.start = torch.zeros(B, dtype=torch.long, device=dev)
        self.last = torch.zeros(B, dtype=torch.long, device=dev)
        self.write = torch.full((B * T,), self.scratch * bs, dtype=torch.long, device=dev)
        self.table = torch.full((B, self.width), self.scratch, dtype=torch.long, device=dev)
        start_max = model.cfg.max_position_embeddings - 1
        self.views = {b: StaticView(cache, self.table[:b], self.start[:b], self.last[:b], self.write[:b * T], T,
                                    start_max) for b in self.buckets}
        self.parts = ("verify", "draft") if speculative else ("decode",)
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int], object] = {}
        self._hidden: dict[int, torch.Tensor] = {}          # eager speculative: verify's h for draft
        if capture:
            self._capture()

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def _forward(self, part: str, b: int):
        view = self.views[b]
        view.reset()
        if part == "decode":
            return self.model(self.tokens[:b], view.start, view)[:, -1]
        if part == "verify":
            out = self.model.forward_hidden(self.tokens[:b], view.start, view)       # [b, 2, V], [b, 2, d]
            self._hidden[b] = out[1]
            return out
        return self.model.forward_mtp(self._hidden[b], self.next_tokens[:b], view.start, view)[0]

    @torch.inference_mode()
    def _capture(self) -> None:
        """Warm every bucket up on a side stream (autotuners, RoPE's table, the allocator), then capture
        each, largest first, into one memory pool (a speculative bucket's draft graph reads the verify
        graph's output, which stays alive)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for b in reversed(self.buckets):
                for _ in range(2):
                    for part in self.parts:
                        self._forward(part, b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            for part in self.parts:
                graph = torch.cuda.CUDAGraph()
                try:   # thread-local: the HTTP side's threads of the server process may use CUDA meanwhile
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        out = self._forward(part, b)
                except Exception as err:  # noqa: BLE001 — re-raised with what to do about it
                    first = str(err).splitlines()[0] if str(err) else ""
                    raise RuntimeError(
                        f"--cuda-graphs: the {part} forward at batch {b} cannot be captured in a CUDA graph "
                        f"({type(err).__name__}: {first}); serve in bfloat16 (the FP32 experts' per-expert "
                        "loop reads counts on the host) or without --cuda-graphs") from err
                self.graphs[part, b], self.outputs[part, b] = graph, out

    def _bucket(self, n: int) -> int:
        if not 0 < n <= self.buckets[-1]:
            raise ValueError(f"{n} rows: the decode graphs take 1 … {self.buckets[-1]}")
        return next(x for x in self.buckets if x >= n)

    def _run(self, part: str, b: int):
        if (part, b) in self.graphs:
            self.graphs[part, b].replay()
            return self.outputs[part, b]
        return self._forward(part, b)

    def _load(self, tokens: list[int], starts: list[int], tables: list[list[int]]) -> int:
        """Copy a step's rows into the buffers (one upload): the bucket they run in."""
        n, T = len(tokens), self.T
        b = self._bucket(n)
        if max(len(t) for t in tables) > self.width:
            raise ValueError(f"a block table of {max(len(t) for t in tables)} blocks: the decode graphs "
                             f"hold {self.width}")
        bs, pad, s = self.cache.block_size, b - n, self.scratch
        # only the first m columns of the tables are sent: the columns past a row's last block are never
        # read (the kernel stops at the row's last position; the eager path clamps to it), so whatever an
        # earlier step left there stays — always some block id, never out of range
        m = max(len(t) for t in tables)
        write = [t[q // bs] * bs + q % bs for t, p in zip(tables, starts) for q in range(p, p + T)]
        flat = (tokens + [0] * pad + starts + [0] * pad + [p + T - 1 for p in starts] + [T - 1] * pad
                + write + [s * bs + q for _ in range(pad) for q in range(T)]
                + [x for t in tables for x in t + [s] * (m - len(t))] + [s] * (m * pad))
        meta = upload(flat, self.device)
        self.tokens[:b, 0].copy_(meta[:b])
        self.start[:b].copy_(meta[b:2 * b])
        self.last[:b].copy_(meta[2 * b:3 * b])
        self.write[:b * T].copy_(meta[3 * b:(3 + T) * b])
        self.table[:b, :m].copy_(meta[(3 + T) * b:].view(b, m))
        return b

    def decode(self, tokens: list[int], starts: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Next-token logits [n, V] of n rows, row i decoding ``tokens[i]`` at position ``starts[i]``
        with block table ``tables[i]``. With graphs the result is a view of the graph's output buffer:
        use it before the next call."""
        if self.T != 1:
            raise RuntimeError("these decode graphs are speculative: verify() and draft()")
        b = self._load(tokens, starts, tables)
        return self._run("decode", b)[:len(tokens)]

    def verify(self, tokens: list[int], drafts: torch.Tensor, starts: list[int],
               tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The speculative step's trunk forward: row i's ``tokens[i]`` at ``starts[i]`` and its draft
        ``drafts[i]`` (a device tensor [n]) at the next position → (logits [n, 2, V], hidden [n, 2, d])."""
        if self.T != 2:
            raise RuntimeError("these decode graphs are not speculative: decode()")
        n = len(tokens)
        b = self._load(tokens, starts, tables)
        self.tokens[:n, 1].copy_(drafts)
        self.tokens[n:b, 1].zero_()
        logits, h = self._run("verify", b)
        return logits[:n], h[:n]

    def draft(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """MTP module 1 over the rows of the last :meth:`verify` (its hidden states, the tokens that follow
        them ``next_tokens`` [n, 2]; same positions and tables) → logits [n, 2, V]."""
        n = next_tokens.shape[0]
        b = self._bucket(n)
        self.next_tokens[:n].copy_(next_tokens)
        self.next_tokens[n:b].zero_()
        return self._run("draft", b)[:n]
