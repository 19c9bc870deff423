"""Synthetic retrieval documents: a number hidden at a depth of a long filler (passkey), or of held-out
text (needle in a haystack). Used to teach retrieval during a context-extension stage (``dsv3 train
--mix passkey:0.1``) and to measure it (``dsv3 eval --task passkey|niah``). ``copy`` documents (a
random token span, then the same span again) teach the copying that retrieval rests on to a model that
cannot copy yet (``--mix copy:0.2``).

A document is built from token pieces, so its length in tokens is exact::

    filler[:a]  KEY  filler[a:]  QUESTION  | ANSWER
    └────────────── prompt: `length` tokens ─┘

``KEY`` says the number once ("The pass key is 48213. Remember it. 48213 is the pass key."), the
question ends with "The pass key is" and the answer is " 48213.". ``depth`` d ∈ [0, 1] puts the key
after the fraction d of the filler. The model sees the same pieces in training and in evaluation.
"""

from __future__ import annotations

import re

import numpy as np

FILLER = ("The river runs down to the sea. The hills are quiet in the evening. A cart rolls along the old "
          "road. Birds sing here and there, and the wind moves the grass. ")
TEMPLATES = {
    "passkey": {"key": " The pass key is {key}. Remember it. {key} is the pass key. ",
                "question": " What is the pass key? The pass key is"},
    "niah": {"key": "\nThe magic number is {key}. Remember it. {key} is the magic number.\n",
             "question": "\nWhat is the magic number? The magic number is"},
}
ANSWER = " {key}."
KEY_DIGITS = 5
TAIL = 2         # filler tokens after the answer of a training document


def random_key(rng: np.random.Generator, digits: int = KEY_DIGITS) -> str:
    """A number of ``digits`` digits (no leading zero)."""
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def score_answer(generated: str, key: str) -> bool:
    """Whether ``generated`` (the text after the question) starts with exactly ``key``: optional
    spaces, then the key's digits, then no further digit."""
    m = re.match(r"\s*(\d+)", generated)
    return m is not None and m.group(1) == key


class Retrieval:
    """Token pieces of one task (``passkey`` or ``niah``) for one tokenizer."""

    def __init__(self, tokenizer, task: str = "passkey"):
        if task not in TEMPLATES:
            raise ValueError(f"task {task!r}: expected one of {', '.join(TEMPLATES)}")
        self.tok, self.task = tokenizer, task
        self.template = TEMPLATES[task]
        self.question = self._ids(self.template["question"])
        filler = self._ids(FILLER)
        self._filler = filler

    def _ids(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text), dtype=np.int64)

    def key_ids(self, key: str) -> np.ndarray:
        return self._ids(self.template["key"].format(key=key))

    def answer_ids(self, key: str) -> np.ndarray:
        return self._ids(ANSWER.format(key=key))

    def filler(self, n: int, offset: int = 0) -> np.ndarray:
        """``n`` tokens of the repeated filler, starting ``offset`` tokens into it."""
        reps = (offset + n) // len(self._filler) + 1
        return np.tile(self._filler, reps)[offset:offset + n]

    def fixed_tokens(self, key: str) -> int:
        """Prompt tokens that are not filler."""
        return len(self.key_ids(key)) + len(self.question)

    def prompt(self, length: int, depth: float, key: str, haystack: np.ndarray | None = None) -> np.ndarray:
        """The prompt of exactly ``length`` tokens with ``key`` at ``depth`` of the filler (the repeated
        filler sentences, or ``haystack``: at least ``length`` tokens of text, e.g. held-out data)."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth = {depth}: must be in [0, 1]")
        key_ids = self.key_ids(key)
        n = length - len(key_ids) - len(self.question)
        if n < 0:
            raise ValueError(f"length = {length}: a {self.task} prompt needs at least "
                             f"{len(key_ids) + len(self.question)} tokens")
        if haystack is None:
            fill = self.filler(n)
        else:
            if len(haystack) < n:
                raise ValueError(f"the haystack has {len(haystack)} tokens; {n} are needed")
            fill = np.asarray(haystack[:n], dtype=np.int64)
        a = int(round(depth * n))
        return np.concatenate([fill[:a], key_ids, fill[a:], self.question])

    def document(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """A training document of exactly ``length`` tokens: a prompt at a random depth with a random
        key, then the answer (the key's digits) and ``TAIL`` filler tokens, so that the retrieval is
        among the last tokens (still a next-token target of the main model, not only of MTP)."""
        key = random_key(rng)
        answer = self.answer_ids(key)
        depth = float(rng.random())
        offset = int(rng.integers(len(self._filler)))
        key_ids = self.key_ids(key)
        n = length - len(answer) - len(key_ids) - len(self.question) - TAIL
        if n < 0:
            raise ValueError(f"a {self.task} document needs more than {length} tokens")
        fill = self.filler(n + TAIL, offset)
        a = int(round(depth * n))
        return np.concatenate([fill[:a], key_ids, fill[a:n], self.question, answer, fill[n:]])


def copy_document(length: int, rng: np.random.Generator, ids: np.ndarray) -> np.ndarray:
    """A document of exactly ``length`` tokens that can only be predicted by copying: a span of
    ``k`` token ids drawn uniformly from ``ids``, then the same span over and over (truncated at
    ``length``). ``k`` is uniform in [4, length // 2], so the distance to copy from ranges up to half
    the window: the first ``k`` tokens cost log(len(ids)) nats each whatever the model, every later
    one is predictable exactly by looking ``k`` tokens back."""
    if length < 8:
        raise ValueError(f"a copy document needs at least 8 tokens, got {length}")
    k = int(rng.integers(4, length // 2 + 1))
    span = ids[rng.integers(0, len(ids), size=k)]
    return np.tile(span, length // k + 1)[:length].astype(np.int64)


def ordinary_ids(tokenizer) -> np.ndarray:
    """The ids of a tokenizer's ordinary (learned) tokens: every id but the added special and
    reserved ones."""
    added = set(tokenizer.hf.get_added_tokens_decoder())
    return np.asarray([i for i in range(tokenizer.vocab_size) if i not in added], dtype=np.int64)


MIX_KINDS = ("passkey", "copy")


def parse_mix(spec: str | None) -> dict[str, float]:
    """``passkey:0.1,copy:0.2`` (comma-separated ``name:share``) → {"passkey": 0.1, "copy": 0.2};
    ValueError naming --mix."""
    if not spec:
        return {}
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, share = part.strip().partition(":")
        if name not in MIX_KINDS or not sep:
            raise ValueError(f"--mix {spec}: expected NAME:SHARE with NAME one of {', '.join(MIX_KINDS)} "
                             f"(e.g. passkey:0.1), got {part.strip()!r}")
        if name in out:
            raise ValueError(f"--mix {spec}: {name} is given twice")
        try:
            value = float(share)
        except ValueError:
            raise ValueError(f"--mix {spec}: the share {share!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise ValueError(f"--mix {spec}: the share of {name} must be in (0, 1], got {share}")
        out[name] = value
    if sum(out.values()) > 1.0 + 1e-9:
        raise ValueError(f"--mix {spec}: the shares add up to {sum(out.values()):g}, more than 1")
    return out


class MixedDataset:
    """A token dataset whose training batches have a share of rows replaced by synthetic documents.

    Which rows, and what they hold, is a function of (seed, step, global row) only, like the
    underlying batches, so a resumed run reads exactly the batches it would have read. Everything
    else (validation, ``path``, ``seq_len`` …) is the wrapped dataset's."""

    def __init__(self, base, mix: dict[str, float], tokenizer):
        self.base, self.mix = base, dict(mix)
        self.retrieval = {name: Retrieval(tokenizer, name) for name in self.mix if name != "copy"}
        self.copy_ids = ordinary_ids(tokenizer) if "copy" in self.mix else None

    def _document(self, name: str, length: int, rng: np.random.Generator) -> np.ndarray:
        if name == "copy":
            return copy_document(length, rng, self.copy_ids)
        return self.retrieval[name].document(length, rng)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def windows(self, step: int, batch_size: int, seed: int = 0, extra: int = 0,
                rank: int = 0, world_size: int = 1):
        import torch

        w = self.base.windows(step, batch_size, seed, extra, rank, world_size)
        length = w.shape[1]
        rng = np.random.default_rng((seed, step, 0x5EC))
        draws = rng.random(batch_size * world_size)
        for r in range(batch_size):
            g = rank * batch_size + r                    # the row's place in the global batch
            lo = 0.0
            for name, share in self.mix.items():
                if lo <= draws[g] < lo + share:
                    doc = self._document(name, length, np.random.default_rng((seed, step, g, 0xD0C)))
                    w[r] = torch.from_numpy(doc)
                    break
                lo += share
        return w

    def batch(self, step: int, batch_size: int, seed: int = 0, extra: int = 0, rank: int = 0, world_size: int = 1):
        w = self.windows(step, batch_size, seed, extra, rank, world_size)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()
