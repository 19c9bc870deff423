"""DeepSeek-V3's tokenizer (SPEC §4): byte-level BPE behind a three-step regex pre-tokenizer.

The text is first cut into *pre-tokens* by three ordered regex splits (each keeps its matches as
pieces of their own, "isolated"), then every piece is mapped to bytes (GPT-2's byte-to-unicode
alphabet, so any UTF-8 text is representable) and BPE merges run inside each piece:

1. ``\\p{N}{1,3}``: numbers are cut into groups of at most three digits ("12345" → "123", "45");
2. ``[一-龥぀-ゟ゠-ヿ]+``: runs of CJK ideographs and kana become pieces of their own;
3. the long pattern: words with an optional leading punctuation or space, punctuation runs
   *with their trailing line breaks* (".\\n" stays one piece), whitespace runs.

Because step 3 keeps punctuation and the following newlines together, BPE learns tokens such as
".\\n" or ")\\n\\n".  A prompt that ends in "." without the newline then sees a token boundary the
model rarely saw in training.  DeepSeek-V3 removes that bias by splitting a random share of those
tokens into their parts during training; :meth:`Tokenizer.random_split` (or ``encode(...,
split_rate=...)``) does that: a token whose text holds a punctuation/symbol character and a
``\\r``/``\\n`` is, with probability ``split_rate``, replaced by the BPE tokens of its pieces (the
run before the line breaks, the line breaks) — the bytes, hence the decoded text, are unchanged.

Special tokens follow DeepSeek-V3: ``<｜begin▁of▁sentence｜>`` (bos, id 0), ``<｜end▁of▁sentence｜>``
(eos, id 1), ``<｜▁pad▁｜>`` (pad, id 2); trained vocabularies end with ``<|reserved_k|>`` tokens
so that the vocabulary size is exactly the model's.  The files written by :meth:`Tokenizer.save`
are a standard ``tokenizer.json`` and a ``tokenizer_config.json`` that ``transformers`` loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Union

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)   # ids 0, 1, 2 (the tiny preset's bos/eos/pad)
RESERVED_FORMAT = "<|reserved_{}|>"

# The three ordered splits of SPEC §4 (kept verbatim; the CJK class is written with escapes:
# 一-龥 = U+4E00-U+9FA5, ぀-ゟ = U+3040-U+309F, ゠-ヿ = U+30A0-U+30FF).
DIGITS_PATTERN = r"\p{N}{1,3}"
CJK_PATTERN = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
MAIN_PATTERN = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
    r"""|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"""| ?[\p{P}\p{S}]+[\r\n]*"""
    r"""|\s*[\r\n]+"""
    r"""|\s+(?!\S)"""
    r"""|\s+"""
)
PRE_TOKENIZER_PATTERNS = (DIGITS_PATTERN, CJK_PATTERN, MAIN_PATTERN)

RngLike = Union[None, int, random.Random, np.random.Generator]


def build_pre_tokenizer(byte_level: bool = True) -> pre_tokenizers.PreTokenizer:
    """The DeepSeek-V3 pre-tokenizer: three isolated regex splits, then the byte-level mapping.

    ``byte_level=False`` leaves out the byte mapping, so that ``pre_tokenize_str`` shows the
    pieces as plain text (handy for tests and for reading)."""
    steps = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False)
             for p in PRE_TOKENIZER_PATTERNS]
    if byte_level:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table used by the ByteLevel pre-tokenizer: printable
    Latin-1 bytes map to themselves, the other 68 bytes to U+0100 onwards, in byte order."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _token_bytes(token: str) -> bytes | None:
    """The raw bytes behind a byte-level token string, or None if it is not a byte-level token."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return None


def _is_punct_or_symbol(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def _punct_newline_parts(raw: bytes) -> list[bytes] | None:
    """Split a token's bytes into runs of line breaks and runs of other bytes, if the token
    merges punctuation/symbols with line breaks (".\\n" → [".", "\\n"]); otherwise None."""
    if b"\n" not in raw and b"\r" not in raw:
        return None
    try:
        text = raw.decode("utf-8")
        has_punct = any(_is_punct_or_symbol(c) for c in text)
    except UnicodeDecodeError:
        # a piece of a multi-byte punctuation character (BPE can merge e.g. the tail of "。"
        # with "\n"); in the DeepSeek pre-tokenizer a line break only joins punctuation, so any
        # non-whitespace byte qualifies
        has_punct = any(b not in b" \t\r\n\x0b\x0c" for b in raw)
    if not has_punct:
        return None
    parts, start = [], 0
    for i in range(1, len(raw) + 1):
        if i == len(raw) or (raw[i] in b"\r\n") != (raw[i - 1] in b"\r\n"):
            parts.append(raw[start:i])
            start = i
    return parts if len(parts) > 1 else None


def _uniform(rng: RngLike, n: int) -> np.ndarray:
    if isinstance(rng, random.Random):
        return np.array([rng.random() for _ in range(n)])
    if rng is None or isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(rng)
    return rng.random(n)


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with DeepSeek-V3's conventions.

    Build one with :meth:`train` or :meth:`from_file`; ``.hf`` is the wrapped object."""

    def __init__(self, tokenizer: _HFTokenizer, bos_token: str | None = BOS_TOKEN,
                 eos_token: str | None = EOS_TOKEN, pad_token: str | None = PAD_TOKEN, add_bos_token: bool = False):
        self.hf = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        # whether a text prompt starts with bos when served (tokenizer_config.json's add_bos_token,
        # as transformers and vLLM read it); encode() itself adds bos only when asked
        self.add_bos_token = add_bos_token
        # the model's other end-of-sequence ids (an eos_token_id list in config.json / generation_config.json),
        # set by dsv3.infer.generate.load_tokenizer: generation stops on these too
        self.extra_stop_ids: frozenset[int] = frozenset()
        self._split_table: tuple[np.ndarray, dict[int, np.ndarray]] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, data: str | os.PathLike | Iterable[str], vocab_size: int = 2048, *,
              num_reserved: int = 8, min_frequency: int = 2, show_progress: bool = False,
              length: int | None = None) -> "Tokenizer":
        """Train a byte-level BPE tokenizer with exactly ``vocab_size`` ids.

        ``data`` is a text file path, a list of paths (read line by line by the Rust trainer),
        or an iterable of strings (documents).  Ids 0-2 are bos/eos/pad, then the 256 byte
        tokens and the merges; the last ``num_reserved`` ids (more if BPE ran out of merges on
        a small corpus) are ``<|reserved_k|>`` special tokens."""
        floor = len(SPECIAL_TOKENS) + 256 + num_reserved
        if vocab_size < floor:
            raise ValueError(f"vocab_size = {vocab_size}: must be >= {floor} "
                             f"(3 special + 256 byte tokens + {num_reserved} reserved)")
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = build_pre_tokenizer()
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - num_reserved, min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        if isinstance(data, (str, os.PathLike)):          # one file
            data = [data]
            if not os.path.isfile(data[0]):
                raise FileNotFoundError(f"tokenizer training file not found: {data[0]}")
        if isinstance(data, (list, tuple)) and data and all(
                isinstance(p, os.PathLike) or (isinstance(p, str) and os.path.isfile(p))
                for p in data):                              # a list of files
            tok.train([os.fspath(p) for p in data], trainer)
        else:                                                # an iterable of documents
            tok.train_from_iterator(data, trainer, length=length)
        n = tok.get_vocab_size(with_added_tokens=True)
        tok.add_special_tokens([RESERVED_FORMAT.format(k) for k in range(vocab_size - n)])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
            special_tokens=[(BOS_TOKEN, 0)])
        out = cls(tok, add_bos_token=True)
        assert out.vocab_size == vocab_size, (out.vocab_size, vocab_size)
        assert (out.bos_id, out.eos_id, out.pad_id) == (0, 1, 2)
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a ``tokenizer.json`` (a file, or a directory holding one, local or an fsspec URL);
        special token names come from a ``tokenizer_config.json`` beside it when there is one
        (DeepSeek's own files included), else DeepSeek-V3's defaults. ``add_bos_token`` (served text
        prompts start with bos) is what the tokenizer.json's post-processor does, as transformers encodes
        the directory; without a post-processor, the config's ``add_bos_token``."""
        import fsspec

        path = os.fspath(path)
        fs, root = fsspec.core.url_to_fs(path)
        if not fs.exists(root):
            raise FileNotFoundError(f"tokenizer not found: {path}")
        file = root if not fs.isdir(root) else root.rstrip("/") + "/tokenizer.json"
        if not fs.exists(file):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        try:
            with fs.open(file, "rb") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"tokenizer {file} is not UTF-8 text; is it a binary file?") from None
        if not text.strip():
            raise ValueError(f"tokenizer {file} is empty")
        try:
            tok = _HFTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own Exception type
            raise ValueError(f"tokenizer {file} cannot be read as a tokenizer.json ({str(e)[:200]})") from None
        defaults = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
        names = dict(defaults)
        config = (file.rsplit("/", 1)[0] + "/" if "/" in file else "") + "tokenizer_config.json"
        add_bos = None
        if fs.exists(config):
            try:
                with fs.open(config, "rb") as f:
                    cfg = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{config} is not a valid JSON text file ({e})") from None
            if not isinstance(cfg, dict):
                raise ValueError(f"{config} must hold a JSON object")
            if isinstance(cfg.get("add_bos_token"), bool):
                add_bos = cfg["add_bos_token"]
            for key in names:
                value = cfg.get(key, names[key])
                names[key] = value.get("content") if isinstance(value, dict) else value
        vocab = tok.get_vocab(with_added_tokens=True)
        for key, value in names.items():     # named by tokenizer_config.json, not our default: it must exist
            if isinstance(value, str) and value not in vocab and value != defaults[key]:
                raise ValueError(f"{config}: {key} {value!r} is not in {file}'s vocabulary")
        names = {k: (v if isinstance(v, str) and v in vocab else None) for k, v in names.items()}
        if tok.post_processor is not None:
            # transformers (5.x, as vLLM runs it) encodes a byte-level tokenizer.json by its post-processor,
            # whatever tokenizer_config.json's add_bos_token says: so does a served text prompt here
            bos = vocab.get(names["bos_token"]) if names["bos_token"] else None
            add_bos = bos is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos]
        return cls(tok, **names, add_bos_token=bool(add_bos))

    def save(self, path: str | os.PathLike, model_max_length: int | None = None) -> str:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into the directory ``path``
        (created if needed), or only the tokenizer to ``path`` if it ends in ``.json``.
        ``transformers.AutoTokenizer.from_pretrained(dir)`` loads the directory."""
        path = os.fspath(path)
        if path.endswith(".json"):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.hf.save(path)
            return path
        os.makedirs(path, exist_ok=True)
        self.hf.save(os.path.join(path, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "add_bos_token": self.add_bos_token, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False}
        if model_max_length is not None:
            config["model_max_length"] = int(model_max_length)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        return path

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the largest id + 1)."""
        added = self.hf.get_added_tokens_decoder()
        return max(self.hf.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end generation: ``eos_id`` and the model's other end-of-sequence ids."""
        return frozenset(() if self.eos_id is None else (self.eos_id,)) | self.extra_stop_ids

    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer (stored with token shards to catch mismatches)."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_bos: bool = False, split_rate: float = 0.0,
               rng: RngLike = None) -> list[int]:
        """Token ids of ``text`` (no bos unless ``add_bos``; special-token strings written in the
        text map to their ids).  With ``split_rate > 0`` each punctuation+line-break token is
        split into its parts with that probability, drawn from ``rng`` (a ``random.Random``, a
        numpy ``Generator``, an int seed, or None for fresh entropy)."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if split_rate > 0:
            ids = self.random_split(ids, split_rate, rng)
        return [self.bos_id] + ids if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, split_rate: float = 0.0,
                     rng: RngLike = None) -> list[list[int]]:
        """:meth:`encode` for many texts at once (the Rust side encodes them in parallel)."""
        texts = list(texts)
        fast = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        out = [e.ids for e in fast(texts, add_special_tokens=False)]
        if split_rate > 0:
            if rng is None or isinstance(rng, (int, np.integer)):
                rng = np.random.default_rng(rng)
            out = [self.random_split(ids, split_rate, rng) for ids in out]
        return [[self.bos_id] + ids for ids in out] if add_bos else out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are kept unless ``skip_special_tokens``."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ random split (SPEC §4)
    def split_table(self) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """(is_candidate bool[vocab], {token id: ids of its parts}) for the tokens that merge
        punctuation/symbols with line breaks; computed once per tokenizer."""
        if self._split_table is None:
            added = set(self.hf.get_added_tokens_decoder())
            is_cand = np.zeros(self.vocab_size, dtype=bool)
            parts: dict[int, np.ndarray] = {}
            for token, idx in self.hf.get_vocab(with_added_tokens=False).items():
                raw = None if idx in added else _token_bytes(token)
                pieces = _punct_newline_parts(raw) if raw else None
                if pieces is None:
                    continue
                sub = [t.id for p in pieces
                       for t in self.hf.model.tokenize("".join(BYTE_TO_CHAR[b] for b in p))]
                is_cand[idx] = True
                parts[idx] = np.asarray(sub, dtype=np.int64)
            self._split_table = (is_cand, parts)
        return self._split_table

    def random_split(self, ids: Sequence[int] | np.ndarray, rate: float, rng: RngLike = None):
        """Replace each punctuation+line-break token of ``ids`` by the tokens of its parts with
        probability ``rate``.  One uniform draw per candidate token, in order, so the result is a
        pure function of (ids, rate, rng state).  Returns a list for a list input, else an
        int64 array; decoding gives exactly the same text."""
        as_list = not isinstance(ids, np.ndarray)
        arr = np.asarray(ids, dtype=np.int64)
        if rate > 0 and arr.size:
            is_cand, parts = self.split_table()
            inside = arr < is_cand.size
            pos = np.flatnonzero(is_cand[np.where(inside, arr, 0)] & inside)
            if pos.size:
                pos = pos[_uniform(rng, pos.size) < rate]
            if pos.size:
                pieces, prev = [], 0
                for p in pos.tolist():
                    pieces += [arr[prev:p], parts[int(arr[p])]]
                    prev = p + 1
                pieces.append(arr[prev:])
                arr = np.concatenate(pieces)
        return arr.tolist() if as_list else arr

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")
