"""The paged MLA latent cache: fixed-size blocks from one pool, a block table per request.

    pool = PagedLatentCache(cfg, num_blocks=512, block_size=64, num_layers=L)
    view = pool.view(tables=[[3, 7], [5]], start=torch.tensor([70, 10]), lengths=[1, 1])
    model(tokens, start_pos, view)          # every MLA layer writes and reads through the view

Per layer the pool holds the normalised latent ``kv`` [num_blocks, block, kv_lora_rank] and the
rotated RoPE key ``pe`` [num_blocks, block, rope] (FlashMLA's layout: 64-token blocks). Position p
of a request lives in physical block ``table[p // block]`` at offset ``p % block``; memory is taken
block by block as a sequence grows, never for ``max_position_embeddings`` up front.

:class:`BlockPool` does the bookkeeping (which blocks are free, reference counts, and reuse of full
prompt blocks by content: identical prefixes share blocks in memory). A released block whose
content is known stays findable until it is handed out again, oldest first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from ..config import ModelConfig
from ..devices import upload


def block_keys(tokens: list[int], block: int, lookahead: int = 0, salt: bytes = b"") -> list[bytes]:
    """Chained content keys of the full blocks of ``tokens``: key k covers every token up to the end
    of block k, plus the ``lookahead`` tokens after it (the MTP layers' cache at a position depends on
    the next token). Only blocks whose lookahead tokens exist get a key."""
    keys, parent = [], salt
    k = 0
    while (k + 1) * block + lookahead <= len(tokens):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", tokens[k * block:(k + 1) * block]).tobytes())
        parent = h.digest()
        if lookahead:
            h = h.copy()
            h.update(array("q", tokens[(k + 1) * block:(k + 1) * block + lookahead]).tobytes())
        keys.append(h.digest())
        k += 1
    return keys


class BlockPool:
    """Allocation and reference counting of ``num_blocks`` blocks, with content-keyed reuse."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks = {num_blocks}: must be >= 1")
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))   # oldest first
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.by_key: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks with reference count 1, or None (nothing taken) when fewer are free."""
        if n > len(self.free):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            key = self.key_of[b]
            if key is not None:               # its old content is overwritten: forget it
                del self.by_key[key]
                self.key_of[b] = None
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref[b] <= 0:
                raise RuntimeError(f"block {b} released more often than taken")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None

    def lookup(self, key: bytes) -> int | None:
        """The block holding content ``key`` (its reference count raised), or None."""
        b = self.by_key.get(key)
        if b is None:
            return None
        if self.ref[b] == 0:
            del self.free[b]
        self.ref[b] += 1
        return b

    def register(self, block: int, key: bytes) -> None:
        """Declare that ``block`` (in use) holds the content ``key``: later lookups may share it."""
        if key in self.by_key or self.key_of[block] is not None:
            return
        self.by_key[key] = block
        self.key_of[block] = key


class PagedLatentCache:
    """The block pool's tensors: kv [layers, blocks, block, r], pe [layers, blocks, block, rope]."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, num_layers: int,
                 device=None, dtype=torch.float32):
        if block_size < 1:
            raise ValueError(f"block_size = {block_size}: must be >= 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv = torch.zeros(num_layers, num_blocks, block_size, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.pe = torch.zeros(num_layers, num_blocks, block_size, cfg.qk_rope_head_dim, device=device, dtype=dtype)
        # per layer, every slot as a row: [num_blocks·block_size, ·] views, made once (slot = block·size + offset)
        self.kv_slots = [t.view(-1, t.shape[-1]) for t in self.kv]
        self.pe_slots = [t.view(-1, t.shape[-1]) for t in self.pe]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, num_layers: int, dtype=torch.float32) -> int:
        return num_layers * block_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize

    def nbytes(self) -> int:
        return self.kv.nbytes + self.pe.nbytes

    def view(self, tables: list[list[int]], start: torch.Tensor, lengths: list[int]) -> "PagedView":
        return PagedView(self, tables, start, lengths)

    def read(self, blocks: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first ``length`` positions, contiguous: kv [layers, length, r], pe [layers, length, rope]."""
        idx = torch.tensor(blocks, device=self.kv.device)
        kv = self.kv[:, idx].flatten(1, 2)[:, :length]
        pe = self.pe[:, idx].flatten(1, 2)[:, :length]
        return kv, pe

    def write_block(self, block: int, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Fill one block from kv [layers, block, r], pe [layers, block, rope] (e.g. read from disk)."""
        self.kv[:, block] = kv.to(self.kv)
        self.pe[:, block] = pe.to(self.pe)


class PagedView:
    """What one forward over B sequences sees: row b's new tokens sit at positions
    start[b] … start[b]+lengths[b]−1 (columns beyond lengths[b] are padding: never written).
    ``update`` has :class:`dsv3.model.mla.LatentCache`'s contract, so MLA runs on it unchanged."""

    def __init__(self, cache: PagedLatentCache, tables: list[list[int]], start, lengths: list[int]):
        """``start``: the rows' first new positions, a list of ints (nothing is read back from the
        device) or a LongTensor [B] (read on the host once: a sync when it lives on a GPU)."""
        dev = cache.kv.device
        bs = cache.block_size
        self.cache = cache
        starts = start.tolist() if isinstance(start, torch.Tensor) else [int(s) for s in start]
        B = len(starts)
        T = max(lengths)
        last = [s + n - 1 for s, n in zip(starts, lengths)]                           # each row's last position
        self.end = max(last) + 1                                                       # positions to read
        width = max(len(t) for t in tables)
        if self.end > width * bs:
            raise ValueError(f"the block tables cover {width * bs} positions, the forward needs {self.end}")
        # the slots written: row by row, the valid positions (few: made in Python)
        write = [t[p // bs] * bs + p % bs for t, s, n in zip(tables, starts, lengths) for p in range(s, s + n)]
        # every index this forward needs, made on the host and sent to the device in one copy
        meta = upload(starts + last + write + [b for t in tables for b in t + [0] * (width - len(t))], dev)
        self.start = meta[:B]
        self.start_max = max(starts)                   # on the host: the model's RoPE table needs no sync
        self.last = meta[B:2 * B]
        self.write_idx = meta[2 * B:2 * B + len(write)]
        self.table = meta[2 * B + len(write):].view(B, width)
        self.all_valid = min(lengths) == T                                             # decode: no padding
        self.valid = None if self.all_valid else (torch.arange(T, device=dev)
                                                  < torch.tensor(lengths, device=dev)[:, None])   # [B, T]
        self.T = T
        # one query per row and every row at the same position: every cached key is visible to every
        # query, so attention needs no mask (decoding a single request)
        self.unmasked = T == 1 and len(set(last)) == 1
        self.masks: dict = {}          # attention masks of this forward, made once by the first layer (MLA)
        self._read_idx = None

    @property
    def read_idx(self) -> torch.Tensor:
        """[B, end] flat slots of every row's positions 0 … end−1 (made once, on the device). A row's
        positions past its own end read its last position (masked anyway, but never another request's
        or an unwritten slot, so nothing non-finite can leak in through 0 · NaN)."""
        if self._read_idx is None:
            bs = self.cache.block_size
            s = torch.minimum(torch.arange(self.end, device=self.last.device), self.last[:, None])
            self._read_idx = self.table.gather(1, s // bs) * bs + s % bs
        return self._read_idx

    kernel_backend = "auto"        # of :func:`dsv3.infer.paged_attention.paged_mla_attention`

    @property
    def uses_kernel(self) -> bool:
        """On CUDA, absorbed attention runs the paged kernel over the blocks (:meth:`attend`) instead
        of reading them into contiguous tensors."""
        return self.cache.kv.device.type == "cuda"

    def write(self, layer: int, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Write kv/pe [B, T, ·] of the valid positions into their blocks."""
        if kv.shape[1] != self.T:
            raise ValueError(f"the view was made for {self.T} new positions per row, got {kv.shape[1]}")
        kv_slots, pe_slots = self.cache.kv_slots[layer], self.cache.pe_slots[layer]
        if self.all_valid:
            kv, pe = kv.reshape(-1, kv.shape[-1]), pe.reshape(-1, pe.shape[-1])
        else:
            kv, pe = kv[self.valid], pe[self.valid]
        kv_slots.index_copy_(0, self.write_idx, kv if kv.dtype is kv_slots.dtype else kv.to(kv_slots.dtype))
        pe_slots.index_copy_(0, self.write_idx, pe if pe.dtype is pe_slots.dtype else pe.to(pe_slots.dtype))

    def update(self, layer: int, start_pos, kv: torch.Tensor, pe: torch.Tensor):
        """Write kv/pe [B, T, ·] of the valid positions; return every row's cached [B, end, ·]."""
        self.write(layer, kv, pe)
        B = self.read_idx.shape[0]
        flat = self.read_idx.view(-1)
        kv_slots, pe_slots = self.cache.kv_slots[layer], self.cache.pe_slots[layer]
        return (kv_slots.index_select(0, flat).view(B, self.end, kv_slots.shape[1]),
                pe_slots.index_select(0, flat).view(B, self.end, pe_slots.shape[1]))

    def attend(self, layer: int, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float) -> torch.Tensor:
        """Absorbed attention of q_lat [B, T, H, r], q_pe [B, T, H, rope] over the blocks → o_lat [B, T, H, r]."""
        from .paged_attention import paged_mla_attention

        return paged_mla_attention(q_lat, q_pe, self.cache.kv[layer], self.cache.pe[layer], self.table,
                                   self.start, scale, backend=self.kernel_backend)
