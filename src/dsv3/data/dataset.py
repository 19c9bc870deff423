"""Token shards and a random-access loader: the data-loading pattern 3FS serves (SPEC §5).

DeepSeek trains straight from a shared file system that is fast at *random reads*, so there is no
pre-shuffled copy of the data set and no shuffle buffer: the corpus is tokenised once into flat
token files, and every training step reads the windows it needs at random offsets.

``prepare(source, out_dir, tokenizer)`` does the tokenising::

    out_dir/index.json              dtype, vocab size, tokenizer hash, source, per-split shards
    out_dir/tokenizer.json          the tokenizer of the shards (+ tokenizer_config.json)
    out_dir/train/shard_00000.bin   raw little-endian uint16 (vocab <= 65536) or uint32 tokens
    out_dir/val/shard_00000.bin     the held-out documents (every ~1/val_fraction-th document)

Documents are concatenated with an eos token after each one; shards hold ``shard_tokens`` tokens
(the last one fewer), and a document may run on into the next shard.  The punctuation+line-break
tokens of the training documents are randomly split (SPEC §4, :meth:`Tokenizer.random_split`) with
``split_rate``, using a generator seeded by (seed, document index): the output does not depend on
how the work was batched.  Validation documents are left unsplit.

``TokenDataset(out_dir, split, seq_len)`` opens the shards with ``np.memmap`` (or fsspec
``open`` + seek/read for a remote URL such as ``memory://``), and ``batch(step, batch_size,
seed)`` draws the window offsets from a generator seeded by (seed, step) only: the batch of step k
is a pure function of (seed, k), so a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from .tokenizer import Tokenizer

BUILTIN = "builtin"
BUILTIN_MAX_BYTES = 16 * 2**20          # ~16 MB of the stdlib's .py files (~5.5M tokens at 2K vocab)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl")
INDEX = "index.json"
FORMAT = "dsv3-tokens/1"


# ---------------------------------------------------------------------------- documents
def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _builtin_files() -> list[tuple[fsspec.AbstractFileSystem, str]]:
    """The running interpreter's standard library ``.py`` files, sorted (site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "__pycache__"))
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    fs = LocalFileSystem()
    return [(fs, p) for p in sorted(found)]


def resolve_files(source, suffixes: Sequence[str] = TEXT_SUFFIXES):
    """The files of ``source`` as sorted (filesystem, path) pairs.

    ``source``: None or "builtin" (the stdlib), a file, a directory (searched recursively for
    ``suffixes``), a glob, an fsspec URL of any of these, or a list of sources."""
    if source is None or source == BUILTIN:
        return _builtin_files()
    if isinstance(source, (list, tuple)):
        return [f for s in source for f in resolve_files(s, suffixes)]
    source = os.fspath(source)
    fs, root = fsspec.core.url_to_fs(source)
    if _is_glob(root):
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
        if not paths:
            raise FileNotFoundError(f"data source {source!r}: the pattern matches no file")
        return [(fs, p) for p in paths]
    if not fs.exists(root):
        raise FileNotFoundError(f"data source not found: {source}")
    if fs.isdir(root):
        paths = sorted(p for p in fs.find(root) if p.endswith(tuple(suffixes)))
        if not paths:
            raise ValueError(f"empty corpus: no {'/'.join(suffixes)} files in {source}")
        return [(fs, p) for p in paths]
    return [(fs, root)]


def iter_documents(source=None, *, max_bytes: int | None = None, text_field: str = "text",
                   suffixes: Sequence[str] = TEXT_SUFFIXES, doc_bytes: int | None = None) -> Iterator[str]:
    """Yield the documents of ``source`` in a fixed order: one per text file, one per line of a
    ``.jsonl`` file (its ``text_field``).  Stops once ``max_bytes`` of UTF-8 text were yielded
    (default for the builtin corpus: ``BUILTIN_MAX_BYTES``).  Blank documents are skipped.
    ``doc_bytes``: cut longer documents at line boundaries into pieces of about that size, each a
    document of its own (so a validation split samples every file, not a few whole files)."""
    if doc_bytes is not None and doc_bytes <= 0:
        raise ValueError(f"doc_bytes = {doc_bytes}: must be positive")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes = {max_bytes}: must be positive (--max-data-bytes)")
    if max_bytes is None and (source is None or source == BUILTIN):
        max_bytes = BUILTIN_MAX_BYTES
    total = 0
    for fs, path in resolve_files(source, suffixes):
        with fs.open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".jsonl"):
            texts = []
            for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise ValueError(f"{path}:{lineno}: no string field {text_field!r}")
                    texts.append(obj[text_field])
        else:
            texts = [raw.decode("utf-8", errors="replace")]
        for text in (piece for t in texts for piece in split_document(t, doc_bytes)):
            if not text.strip():
                continue
            yield text
            total += len(text.encode("utf-8"))
            if max_bytes is not None and total >= max_bytes:
                return


def split_document(text: str, doc_bytes: int | None) -> list[str]:
    """``text`` cut after a newline once a piece reaches ``doc_bytes`` (UTF-8); pieces join back to it."""
    if doc_bytes is None or len(text.encode("utf-8")) <= doc_bytes:
        return [text]
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line.encode("utf-8"))
        if size >= doc_bytes:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


def is_val(index: int, val_fraction: float) -> bool:
    """Document ``index`` goes to the validation split: exactly ⌊n·val_fraction⌋ of the first n
    documents do, spread evenly (the first is the ⌈1/val_fraction⌉-th document)."""
    return int((index + 1) * val_fraction) > int(index * val_fraction)


# ---------------------------------------------------------------------------- writing
class _ShardWriter:
    """Streams tokens into ``<dir>/shard_%05d.bin`` files of ``shard_tokens`` tokens each."""

    def __init__(self, fs, root: str, split: str, dtype, shard_tokens: int):
        self.fs, self.root, self.split = fs, root, split
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self.file, self.count, self.documents = None, 0, 0
        fs.makedirs(f"{root}/{split}", exist_ok=True)
        for old in fs.glob(f"{root}/{split}/shard_*.bin"):
            fs.rm(old)

    def add(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype.newbyteorder("<"), copy=False)
        self.documents += 1
        while tokens.size:
            if self.file is None:
                name = f"{self.split}/shard_{len(self.shards):05d}.bin"
                self.file = self.fs.open(f"{self.root}/{name}", "wb")
                self.shards.append({"file": name, "tokens": 0})
                self.count = 0
            room = self.shard_tokens - self.count
            self.file.write(tokens[:room].tobytes())
            self.count += min(room, tokens.size)
            self.shards[-1]["tokens"] = self.count
            tokens = tokens[room:]
            if self.count == self.shard_tokens:
                self.file.close()
                self.file = None

    def close(self) -> dict:
        if self.file is not None:
            self.file.close()
            self.file = None
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "shards": self.shards}


def _describe(source) -> str:
    if source is None or source == BUILTIN:
        return f"builtin: python stdlib .py files under {sysconfig.get_paths()['stdlib']}"
    if isinstance(source, (list, tuple)):
        return ", ".join(_describe(s) for s in source)
    return os.fspath(source)


def prepare(source, out_dir: str | os.PathLike, tokenizer: Tokenizer | str | None = None, *,
            vocab_size: int = 2048, val_fraction: float = 0.02, split_rate: float = 0.1,
            seed: int = 0, max_bytes: int | None = None, shard_tokens: int = 2**24,
            text_field: str = "text", suffixes: Sequence[str] = TEXT_SUFFIXES,
            chunk_bytes: int = 2**22, doc_bytes: int | None = None, progress: bool = True) -> dict:
    """Tokenise ``source`` into token shards under ``out_dir`` (local path or fsspec URL) and
    return the index (also written to ``out_dir/index.json``).

    ``tokenizer``: a :class:`Tokenizer`, a path to a tokenizer.json (or its directory), or None
    to train a ``vocab_size`` BPE tokenizer on the training documents first.  Documents are
    encoded ``chunk_bytes`` at a time with the Rust tokenizer's parallel ``encode_batch``.
    ``doc_bytes``: cut documents into pieces of about that size first (:func:`iter_documents`); the
    train/validation split then picks pieces, so every file contributes to both."""
    from tqdm.auto import tqdm

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction = {val_fraction}: must be in [0, 1)")
    if not 0 <= split_rate <= 1:
        raise ValueError(f"split_rate = {split_rate}: must be in [0, 1]")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens = {shard_tokens}: must be positive")
    if max_bytes is None and (source is None or source == BUILTIN):
        max_bytes = BUILTIN_MAX_BYTES
    resolve_files(source, suffixes)                 # missing paths fail before any work
    docs = lambda: iter_documents(source, max_bytes=max_bytes, text_field=text_field,  # noqa: E731
                                  suffixes=suffixes, doc_bytes=doc_bytes)
    if next(iter(docs()), None) is None:
        raise ValueError(f"empty corpus: no text in {_describe(source)}")
    if tokenizer is None:
        train_docs = (t for i, t in enumerate(docs()) if not is_val(i, val_fraction))
        tokenizer = Tokenizer.train(train_docs, vocab_size, show_progress=progress)
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_file(tokenizer)
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos token to separate documents")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    fs, root = fsspec.core.url_to_fs(os.fspath(out_dir))
    root = root.rstrip("/") or "/"
    fs.makedirs(root, exist_ok=True)
    if fs.exists(f"{root}/{INDEX}"):                # an old index must not outlive its shards
        fs.rm(f"{root}/{INDEX}")
    writers = {s: _ShardWriter(fs, root, s, dtype, shard_tokens) for s in ("train", "val")}
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    total = sum(fs_.size(p) for fs_, p in resolve_files(source, suffixes))
    total = total if max_bytes is None else min(total, max_bytes)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenising", disable=not progress)

    def flush(chunk: list[tuple[int, str]]) -> None:
        encoded = tokenizer.encode_batch([t for _, t in chunk])
        for (i, text), ids in zip(chunk, encoded):
            ids = np.asarray(ids, dtype=np.int64)
            val = is_val(i, val_fraction)
            if split_rate > 0 and not val:
                ids = tokenizer.random_split(ids, split_rate, np.random.default_rng((seed, i)))
            writers["val" if val else "train"].add(np.concatenate([ids, eos]))
            bar.update(len(text.encode("utf-8")))

    chunk, size = [], 0
    for i, text in enumerate(docs()):
        chunk.append((i, text))
        size += len(text)
        if size >= chunk_bytes:
            flush(chunk)
            chunk, size = [], 0
    if chunk:
        flush(chunk)
    bar.close()
    splits = {s: w.close() for s, w in writers.items()}

    with fs.open(f"{root}/tokenizer.json", "w", encoding="utf-8") as f:
        f.write(tokenizer.hf.to_str())
    with fs.open(f"{root}/tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
                   "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
                   "add_bos_token": tokenizer.add_bos_token}, f, ensure_ascii=False)
    index = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
             "tokenizer_sha256": tokenizer.fingerprint(), "bos_id": tokenizer.bos_id,
             "eos_id": tokenizer.eos_id, "source": _describe(source), "max_bytes": max_bytes,
             "val_fraction": val_fraction, "doc_bytes": doc_bytes, "split_rate": split_rate, "seed": seed,
             "shard_tokens": shard_tokens, "splits": splits}
    with fs.open(f"{root}/{INDEX}", "w", encoding="utf-8") as f:   # last: marks completion
        json.dump(index, f, indent=2, ensure_ascii=False)
    return index


# ---------------------------------------------------------------------------- reading
def _read_index(fs, index_path: str, shown: str) -> dict:
    """index.json of a prepared directory, checked: a ValueError naming the file and the key for anything
    that is not what ``prepare`` writes."""
    try:
        with fs.open(index_path, "rb") as f:
            raw = f.read()
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{shown} is not UTF-8 text; is it a binary file?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{shown} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None

    def bad(what: str) -> ValueError:
        return ValueError(f"{shown}: {what} (not a directory written by dsv3's data preparation; prepare it again)")

    if not isinstance(meta, dict):
        raise bad("must hold a JSON object")
    for key in ("dtype", "vocab_size", "splits"):
        if key not in meta:
            raise bad(f"no {key!r} key")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise bad(f"'dtype' = {meta['dtype']!r}, expected 'uint16' or 'uint32'")
    if isinstance(meta["vocab_size"], bool) or not isinstance(meta["vocab_size"], int) or meta["vocab_size"] <= 0:
        raise bad(f"'vocab_size' = {meta['vocab_size']!r}, expected a positive integer")
    splits = meta["splits"]
    if not isinstance(splits, dict) or "train" not in splits:
        raise bad("'splits' must be an object with a 'train' split")
    for name, sp in splits.items():
        shards = sp.get("shards") if isinstance(sp, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(x, dict) and isinstance(x.get("file"), str) and isinstance(x.get("tokens"), int)
                and not isinstance(x.get("tokens"), bool) and x["tokens"] >= 0 for x in shards):
            raise bad(f"'splits.{name}.shards' must be a list of {{\"file\": …, \"tokens\": …}}")
        for x in shards:
            if x["file"].startswith("/") or ".." in x["file"].replace("\\", "/").split("/"):
                raise bad(f"'splits.{name}.shards' names the file {x['file']!r}, outside the directory")
    return meta


class TokenDataset:
    """Random access to one split of a prepared token directory (local path or fsspec URL).

    Nothing is loaded up front: local shards are ``np.memmap``-ed, remote ones read with
    seek/read.  A window may cross a shard boundary."""

    def __init__(self, path: str | os.PathLike, split: str = "train", seq_len: int = 256,
                 tokenizer: Tokenizer | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split = {split!r}: must be 'train' or 'val'")
        if seq_len <= 0:
            raise ValueError(f"seq_len = {seq_len}: must be positive")
        self.path, self.split, self.seq_len = os.fspath(path), split, seq_len
        self.fs, self.root = fsspec.core.url_to_fs(self.path)
        self.root = self.root.rstrip("/") or "/"
        index_path = f"{self.root}/{INDEX}"
        if not self.fs.exists(index_path):
            raise FileNotFoundError(f"no token dataset at {self.path} "
                                    f"({INDEX} missing; run prepare)")
        self.meta = _read_index(self.fs, index_path, f"{self.path.rstrip('/')}/{INDEX}")
        if tokenizer is not None and tokenizer.fingerprint() != self.meta.get("tokenizer_sha256"):
            raise ValueError(f"{self.path} was tokenised with a different tokenizer")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.vocab_size = int(self.meta["vocab_size"])
        if split not in self.meta["splits"]:
            raise ValueError(f"{self.path.rstrip('/')}/{INDEX} has no {split!r} split (its splits: "
                             f"{', '.join(self.meta['splits'])})")
        shards = self.meta["splits"][split]["shards"]
        self._files = [f"{self.root}/{s['file']}" for s in shards]
        self._ends = np.cumsum([s["tokens"] for s in shards], dtype=np.int64)
        for f, s in zip(self._files, shards):
            if not self.fs.exists(f):
                raise FileNotFoundError(f"{self.path}: {INDEX} lists the shard {f}, which is missing")
            size, want = self.fs.size(f), s["tokens"] * self.dtype.itemsize
            if size is not None and size != want:
                raise ValueError(f"{self.path}: the shard {f} holds {size:,} bytes but {INDEX} says {s['tokens']:,} "
                                 f"{self.meta['dtype']} tokens ({want:,} bytes): it is truncated or damaged; "
                                 f"prepare the data again")
        self.num_tokens = int(self._ends[-1]) if len(shards) else 0
        self._local = isinstance(self.fs, LocalFileSystem)
        self._open: dict[int, object] = {}
        self._check_length(seq_len + 1)

    def __len__(self) -> int:
        return self.num_tokens

    def _check_length(self, length: int) -> None:
        if length > self.num_tokens:
            raise ValueError(f"a window of {length} tokens (seq_len + 1 + extra) exceeds the "
                             f"{self.num_tokens} tokens of the {self.split!r} split of {self.path}")

    def __getstate__(self):                       # picklable for DataLoader workers
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def _shard(self, k: int):
        if k not in self._open:
            if self._local:
                self._open[k] = np.memmap(self._files[k], dtype=self.dtype, mode="r")
            else:
                self._open[k] = self.fs.open(self._files[k], "rb")
        return self._open[k]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split as int64."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens})")
        out, pos = np.empty(length, dtype=np.int64), 0
        k = int(np.searchsorted(self._ends, start, side="right"))
        while pos < length:
            begin = int(self._ends[k - 1]) if k else 0
            lo = start + pos - begin
            n = min(length - pos, int(self._ends[k]) - begin - lo)
            shard = self._shard(k)
            if self._local:
                out[pos:pos + n] = shard[lo:lo + n]
            else:
                shard.seek(lo * self.dtype.itemsize)
                out[pos:pos + n] = np.frombuffer(shard.read(n * self.dtype.itemsize), self.dtype)
            pos, k = pos + n, k + 1
        return out

    def window_starts(self, step: int, batch_size: int, seed: int = 0, extra: int = 0,
                      rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Offsets of the windows of ``step``: drawn for the global batch (batch_size ×
        world_size) from a generator seeded by (seed, step); this rank takes its slice."""
        length = self.seq_len + 1 + extra
        self._check_length(length)
        if step < 0 or seed < 0:
            raise ValueError(f"step = {step}, seed = {seed}: must be non-negative")
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size = {batch_size}, rank = {rank}, world_size = "
                             f"{world_size}: need batch_size > 0 and 0 <= rank < world_size")
        rng = np.random.default_rng((seed, step))
        starts = rng.integers(0, self.num_tokens - length + 1, size=batch_size * world_size)
        return starts[rank * batch_size:(rank + 1) * batch_size]

    def windows(self, step: int, batch_size: int, seed: int = 0, extra: int = 0,
                rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """LongTensor[B, seq_len + 1 + extra]: the raw windows of ``step``."""
        starts = self.window_starts(step, batch_size, seed, extra, rank, world_size)
        length = self.seq_len + 1 + extra
        return torch.from_numpy(np.stack([self.read(int(s), length) for s in starts]))

    def batch(self, step: int, batch_size: int, seed: int = 0, extra: int = 0,
              rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), LongTensor[B, seq_len + extra] each, targets = inputs shifted by
        one.  ``extra = D`` serves D MTP depths: the main model uses ``inputs[:, :T]`` →
        ``targets[:, :T]`` and depth k uses ``inputs[:, k:k+T]`` → ``targets[:, k:k+T]``
        (T = seq_len).  A pure function of (seed, step, batch_size, extra)."""
        w = self.windows(step, batch_size, seed, extra, rank, world_size)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def val_batches(self, batch_size: int, max_batches: int | None = None,
                    extra: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive windows from the start of the split (stride seq_len, so every token is a
        target once), in batches of ``batch_size`` (the last may be smaller); always the same
        order.  Meant for ``split="val"``."""
        length = self.seq_len + 1 + extra
        self._check_length(length)
        n_windows = (self.num_tokens - length) // self.seq_len + 1
        if max_batches is not None:
            n_windows = min(n_windows, max_batches * batch_size)
        for b in range(0, n_windows, batch_size):
            w = np.stack([self.read(i * self.seq_len, length)
                          for i in range(b, min(b + batch_size, n_windows))])
            w = torch.from_numpy(w)
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def __repr__(self) -> str:
        return (f"TokenDataset({self.path!r}, split={self.split!r}, seq_len={self.seq_len}, "
                f"tokens={self.num_tokens}, vocab_size={self.vocab_size})")
