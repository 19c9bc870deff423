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
* **padding rows** decode token 0 at position 0 into a scratch block that no request ever holds, so
  they never touch a real cache; their logits are dropped;
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
    """A :class:`PagedView` of B rows, one new token each, over fixed buffers: ``table`` [B, W] block
    ids, ``start`` [B] positions, ``write_idx`` [B] the slots written. Its host-side facts never change
    (it reads up to W blocks; RoPE's table covers positions up to ``start_max``)."""

    def __init__(self, cache: PagedLatentCache, table: torch.Tensor, start: torch.Tensor,
                 write_idx: torch.Tensor, start_max: int):
        self.cache = cache
        self.table, self.start, self.last, self.write_idx = table, start, start, write_idx
        self.start_max = start_max
        self.end = table.shape[1] * cache.block_size
        self.all_valid, self.valid, self.T = True, None, 1
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
    bucket when ``capture`` (CUDA), else run eagerly on the same buffers."""

    def __init__(self, model, cache: PagedLatentCache, pool, max_batch: int, max_len: int, capture: bool):
        dev = cache.kv.device
        if capture and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {dev}")
        self.model, self.cache, self.device = model, cache, dev
        bs = cache.block_size
        self.width = math.ceil((max_len + 1) / bs)           # blocks of the longest request
        got = pool.allocate(1)
        if got is None:
            raise ValueError("no cache block is free for the padding rows of the decode graphs")
        self.scratch = got[0]                                # held for good: padding rows write here
        self.buckets = batch_buckets(max_batch)
        B = self.buckets[-1]
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.start = torch.zeros(B, dtype=torch.long, device=dev)
        self.write = torch.full((B,), self.scratch * bs, dtype=torch.long, device=dev)
        self.table = torch.full((B, self.width), self.scratch, dtype=torch.long, device=dev)
        start_max = model.cfg.max_position_embeddings - 1
        self.views = {b: StaticView(cache, self.table[:b], self.start[:b], self.write[:b], start_max)
                      for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def _forward(self, b: int) -> torch.Tensor:
        view = self.views[b]
        return self.model(self.tokens[:b], view.start, view)[:, -1]

    @torch.inference_mode()
    def _capture(self) -> None:
        """Warm every bucket up on a side stream (autotuners, RoPE's table, the allocator), then capture
        each, largest first, into one memory pool."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for b in reversed(self.buckets):
                for _ in range(2):
                    self.views[b].reset()
                    self._forward(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            self.views[b].reset()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):   # the HTTP side's threads may run
                    out = self._forward(b)
            except Exception as err:  # noqa: BLE001 — re-raised with what to do about it
                raise RuntimeError(
                    f"--cuda-graphs: the decode forward at batch {b} cannot be captured in a CUDA graph "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); serve in "
                    "bfloat16 (the FP32 experts' per-expert loop reads counts on the host) or without "
                    "--cuda-graphs") from err
            self.graphs[b], self.outputs[b] = graph, out

    def decode(self, tokens: list[int], starts: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Next-token logits [n, V] of n rows, row i decoding ``tokens[i]`` at position ``starts[i]``
        with block table ``tables[i]``. With graphs the result is a view of the graph's output buffer:
        use it before the next call."""
        n = len(tokens)
        if not 0 < n <= self.buckets[-1]:
            raise ValueError(f"{n} rows: the decode graphs take 1 … {self.buckets[-1]}")
        if max(len(t) for t in tables) > self.width:
            raise ValueError(f"a block table of {max(len(t) for t in tables)} blocks: the decode graphs "
                             f"hold {self.width}")
        b = next(x for x in self.buckets if x >= n)
        bs, pad, s = self.cache.block_size, b - n, self.scratch
        # only the first m columns of the tables are sent: the columns past a row's last block are never
        # read (the kernel stops at the row's position; the eager path clamps to it), so whatever an
        # earlier step left there stays — always some block id, never out of range
        m = max(len(t) for t in tables)
        write = [t[p // bs] * bs + p % bs for t, p in zip(tables, starts)]
        flat = (tokens + [0] * pad + starts + [0] * pad + write + [s * bs] * pad
                + [x for t in tables for x in t + [s] * (m - len(t))] + [s] * (m * pad))
        meta = upload(flat, self.device)
        self.tokens[:b, 0].copy_(meta[:b])
        self.start[:b].copy_(meta[b:2 * b])
        self.write[:b].copy_(meta[2 * b:3 * b])
        self.table[:b, :m].copy_(meta[3 * b:].view(b, m))
        if b in self.graphs:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        self.views[b].reset()
        return self._forward(b)[:n]
