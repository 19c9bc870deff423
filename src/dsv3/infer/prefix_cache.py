"""An on-disk cache of MLA latent-cache blocks for repeated prompt prefixes (SPEC §3, §5: DeepSeek's
"context caching on disk", which 3FS serves; here any local path, mount or fsspec URL).

A prompt is cut into blocks of ``block_tokens``. Block k is stored under a chained hash of the model's
fingerprint and every token up to the end of block k, so a hit on block k means the whole prefix
matched. A file holds that block's cached latent and RoPE key for every layer: with MLA that is
(kv_lora_rank + qk_rope_head_dim) values per token per layer — 70,272 bytes per token for DeepSeek-V3
in BF16, which is what makes keeping attention state on disk pay.

Files are written to a temporary name and renamed, so a crash never leaves half a block under a real
name; a file that is unreadable or does not match is skipped with a warning (a miss), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings

import fsspec
import torch


def model_fingerprint(model) -> str:
    """A hash of the config and of a sample of every tensor but the experts': caches of different models
    never mix, and every rank of an expert-parallel group (each holding other experts, the shared one
    perhaps among them) and a single process with the whole model agree."""
    h = hashlib.sha256(json.dumps(model.cfg.to_hf(), sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        if ".mlp.experts." in f".{name}" or ".mlp.shared_experts." in f".{name}":
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(flat.numel() // 64, 1)][:64].to(torch.float64).cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def chain_keys(fingerprint: str, block: int, ids: list[int], layers: int, lookahead: int = 0,
               max_tokens: int | None = None) -> list[str]:
    """Chained hashes of the full blocks of ``ids`` (ending at most at ``max_tokens``) followed by
    ``lookahead`` more tokens, which the key also covers: the MTP layers' cache at a position
    depends on the next token too. ``layers``: the layers a block holds, so caches of different
    shapes never mix."""
    B, n = block, len(ids) if max_tokens is None else min(max_tokens, len(ids))
    keys, h = [], hashlib.sha256(f"{fingerprint}/{layers}/{lookahead}".encode())
    k = 0
    while (k + 1) * B <= n and (k + 1) * B + lookahead <= len(ids):
        h.update(json.dumps(ids[k * B:(k + 1) * B]).encode())
        key = h.copy()
        key.update(json.dumps(ids[(k + 1) * B:(k + 1) * B + lookahead]).encode())
        keys.append(key.hexdigest())
        k += 1
    return keys


def block_path(model_dir: str, key: str) -> str:
    """Where block ``key`` lies under a model's directory of the cache (``root/fingerprint``)."""
    return f"{model_dir}/{key[:2]}/{key}.safetensors"


def first_block_path(root: str | os.PathLike, identity: str, ids: list[int]):
    """(filesystem, path) of the first block of ``ids`` as a cache at ``root`` with the block identity
    ``identity`` (:meth:`PrefixCache.identity`) stores it; None when ``ids`` has no full block."""
    fingerprint, layers, lookahead, block = identity.rsplit("/", 3)
    keys = chain_keys(fingerprint, int(block), ids, int(layers), int(lookahead))
    if not keys:
        return None
    fs, path = fsspec.core.url_to_fs(os.fspath(root))
    return fs, block_path(f"{path.rstrip('/')}/{fingerprint}", keys[0])


class PrefixCache:
    def __init__(self, root: str | os.PathLike, model, block_tokens: int = 64):
        if block_tokens < 1:
            raise ValueError(f"block_tokens = {block_tokens}: must be >= 1")
        self.fs, self.root = fsspec.core.url_to_fs(os.fspath(root))
        self.block = block_tokens
        self.fingerprint = model_fingerprint(model)
        self.dir = f"{self.root.rstrip('/')}/{self.fingerprint}"
        self.fs.makedirs(self.dir, exist_ok=True)
        self.hit_tokens = 0           # prompt tokens whose cache came from disk
        self.lookup_tokens = 0        # prompt tokens looked up
        self._damaged: set[str] = set()   # unreadable files seen by load(): store() rewrites them

    def _keys(self, ids: list[int], layers: int, lookahead: int = 0, max_tokens: int | None = None) -> list[str]:
        return chain_keys(self.fingerprint, self.block, ids, layers, lookahead, max_tokens)

    def identity(self, layers: int, lookahead: int) -> str:
        """What a block written with these settings is keyed by: servers sharing the cache must agree."""
        return f"{self.fingerprint}/{layers}/{lookahead}/{self.block}"

    def _path(self, key: str) -> str:
        return block_path(self.dir, key)

    def load(self, ids: list[int], layers: int, max_tokens: int | None = None,
             lookahead: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The blocks of the longest cached prefix of ``ids`` (at most ``max_tokens`` tokens): lists of
        kv [layers, block, r] and pe [layers, block, rope], block k covering positions k·block … (k+1)·block − 1."""
        from safetensors.torch import load

        kvs, pes = [], []
        for key in self._keys(ids, layers, lookahead, max_tokens):
            path = self._path(key)
            try:
                with self.fs.open(path, "rb") as f:
                    t = load(f.read())
                kv, pe = t["kv"], t["pe"]
                if kv.shape[:2] != (layers, self.block) or pe.shape[:2] != (layers, self.block) or (
                        kvs and kv.shape != kvs[0].shape):
                    raise ValueError(f"block shapes {tuple(kv.shape)}, {tuple(pe.shape)}")
            except FileNotFoundError:
                break
            except Exception as e:   # unreadable or foreign: a miss, and a warning naming the file
                warnings.warn(f"prefix cache: skipping unreadable block {path}: {e}")
                self._damaged.add(path)
                break
            kvs.append(kv)
            pes.append(pe)
        self.lookup_tokens += len(ids)
        self.hit_tokens += len(kvs) * self.block
        return kvs, pes

    def store(self, ids: list[int], kv: torch.Tensor, pe: torch.Tensor, lookahead: int = 0) -> int:
        """Save the full blocks of ``ids`` not yet on disk from one sequence's cache, kv
        [layers, ≥len(ids), r] and pe [layers, ≥len(ids), rope]. Returns the number of blocks written."""
        from safetensors.torch import save

        written = 0
        for k, key in enumerate(self._keys(ids, kv.shape[0], lookahead)):
            path = self._path(key)
            if path not in self._damaged and self.fs.exists(path):
                continue
            sl = slice(k * self.block, (k + 1) * self.block)
            data = save({"kv": kv[:, sl].contiguous().cpu(), "pe": pe[:, sl].contiguous().cpu()})
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
            self._damaged.discard(path)
            written += 1
        return written

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0
