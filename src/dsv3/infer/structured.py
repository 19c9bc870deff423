"""Structured output: ``response_format`` ``json_object`` / ``json_schema`` as constrained decoding.

A request that asks for JSON carries a :class:`GrammarSpec` (what it asks for, plain data that travels
to the engine process). The engine makes a grammar matcher for it (:meth:`Grammars.matcher`, xgrammar's
``GrammarMatcher`` over a grammar compiled once per spec and cached); before each of the request's
tokens is drawn, every token the grammar does not allow next gets logit -inf (:func:`mask_logits`),
so greedy, sampled and speculative decoding all keep to it; the chosen token then advances the
matcher. Once the JSON is complete, the grammar allows only the request's stop tokens (end of
sentence), so it ends with finish_reason "stop".

Whitespace is bounded: the grammar is built with xgrammar's ``any_whitespace=False`` (one space after
``:`` and ``,``, none elsewhere), so a model cannot loop on spaces or newlines.

The vocabulary xgrammar needs is each id's raw bytes (:class:`dsv3.infer.detokenize.TokenBytes`: the
byte-level BPE strings mapped back to bytes, ``VocabType.RAW``); special tokens are given as empty
strings, which xgrammar never allows inside the grammar.

xgrammar is imported only when a request asks for JSON: importing this module does not need it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

INSTALL_HINT = "pip install 'xgrammar>=0.2.9,<0.3' (or pip install 'dsv3[serve]')"


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must be: ``kind`` "json_object" (any JSON object), "json_schema"
    (``schema``: the JSON Schema as compact JSON text, its keys in their given order: properties are
    written in the order the schema declares them) or "tool_call" (``schema``: JSON {"functions": [[name,
    parameters or null], …], "max_calls": k}: one DeepSeek-V3 tool-call block of 1 … k calls of these
    functions, :mod:`dsv3.infer.tool_calls`).

    ``after``: the text that starts the constrained part (a reasoning model's ``"</think>"``,
    :mod:`dsv3.infer.reasoning`), or None (the whole output). With it, the output is free up to the first
    ``after``, then at most two newlines (R1's ``</think>\\n\\n``), then what ``kind`` asks for
    (:class:`DeferredConstraint`)."""
    kind: str
    schema: str | None = None
    after: str | None = None

    def __post_init__(self):
        if self.kind not in ("json_object", "json_schema", "tool_call"):
            raise ValueError(f"grammar kind {self.kind!r}: must be 'json_object', 'json_schema' or 'tool_call'")
        if (self.kind != "json_object") != (self.schema is not None):
            raise ValueError("json_schema and tool_call grammars need a schema (and only they)")
        if self.after is not None and not self.after:
            raise ValueError("after: the text that starts the grammar must not be empty")

    @classmethod
    def json_schema(cls, schema: dict) -> "GrammarSpec":
        return cls("json_schema", json.dumps(schema, ensure_ascii=False, separators=(",", ":")))


class GrammarError(ValueError):
    """The grammar cannot be built: the schema is not one xgrammar can compile (its message says why)."""


class GrammarUnavailable(RuntimeError):
    """xgrammar is not installed."""


def import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise GrammarUnavailable(f"structured output needs the xgrammar package, which is not installed ({e}): "
                                 f"{INSTALL_HINT}") from None
    return xgrammar


_CPP_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")


def _clean(message: str) -> str:
    """xgrammar's C++ error text without its "[hh:mm:ss] file.cc:line: " prefix."""
    lines = [_CPP_PREFIX.sub("", line).strip() for line in str(message).strip().splitlines()]
    return " ".join(line for line in lines if line) or "the grammar could not be compiled"


def vocabulary(tb, vocab_size: int) -> list[bytes]:
    """Each id's bytes for xgrammar (``tb``: a :class:`~dsv3.infer.detokenize.TokenBytes`): special tokens
    and ids past the tokenizer (a model's padded vocabulary) as b"" (never allowed by a grammar)."""
    out = []
    for i in range(min(tb.size, vocab_size)):
        out.append(b"" if i in tb.special else tb.bytes(i))
    return out


class Grammars:
    """Compiles :class:`GrammarSpec` s for one tokenizer and model vocabulary (cached by spec) and makes
    matchers. ``tokenizer``: a :class:`dsv3.data.Tokenizer`, or a callable returning one (loaded on first
    use). Thread-safe."""

    CACHE = 256                      # compiled grammars kept (least recently used dropped first)

    def __init__(self, tokenizer, vocab_size: int, threads: int = 1):
        self._tokenizer, self.vocab_size, self.threads = tokenizer, vocab_size, threads
        self._compiler = None
        self._info = None
        self._cache: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._vocab: list[bytes] | None = None   # each id's bytes (xgrammar's vocabulary)
        self._ban_cache: dict[bytes, list[list[int]]] = {}
        self._lock = threading.Lock()

    def _ensure(self):
        if self._compiler is None:
            xgr = import_xgrammar()
            from .detokenize import TokenBytes

            tok = self._tokenizer() if callable(self._tokenizer) else self._tokenizer
            tb = TokenBytes(tok)
            self._vocab = vocabulary(tb, self.vocab_size)
            self._info = xgr.TokenizerInfo(self._vocab, xgr.VocabType.RAW,
                                           vocab_size=self.vocab_size, stop_token_ids=sorted(tok.stop_ids) or None)
            # no cache of xgrammar's own (unbounded): this class keeps the last CACHE grammars
            self._compiler = xgr.GrammarCompiler(self._info, max_threads=self.threads, cache_enabled=False)
        return self._compiler

    def compile(self, spec: GrammarSpec):
        """The compiled grammar of ``spec``: GrammarError when its schema cannot be compiled,
        GrammarUnavailable without xgrammar."""
        with self._lock:
            compiler = self._ensure()
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        try:
            if spec.after is not None:           # up to two newlines, then the grammar (DeferredConstraint)
                xgr = import_xgrammar()
                lead = xgr.Grammar.from_ebnf('root ::= "" | "\\n" | "\\n\\n"')
                grammar = compiler.compile_grammar(xgr.Grammar.concat(lead, _grammar(xgr, spec)))
            elif spec.kind == "json_object":     # any object; properties not named are allowed
                grammar = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            elif spec.kind == "tool_call":
                from .tool_calls import build_grammar

                grammar = compiler.compile_grammar(build_grammar(import_xgrammar(), spec.schema))
            else:
                grammar = compiler.compile_json_schema(spec.schema, any_whitespace=False, strict_mode=True)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(_clean(str(e))) from None
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: GrammarSpec, stop_ids) -> "Constraint":
        """A fresh :class:`Constraint` for one request whose generation ends on ``stop_ids``."""
        xgr = import_xgrammar()
        grammar = self.compile(spec)
        stop = sorted(stop_ids)
        if stop:       # the grammar, once complete, allows exactly the request's stop tokens
            m = xgr.GrammarMatcher(grammar, override_stop_tokens=stop)
        else:          # no stop token: the request ends as soon as the grammar is complete
            m = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
        if spec.after is not None:
            return DeferredConstraint(Constraint(m, self.vocab_size), spec.after.encode("utf-8"), self._vocab,
                                      self._bans(spec.after.encode("utf-8")))
        return Constraint(m, self.vocab_size)

    def _bans(self, after: bytes) -> list[list[int]]:
        """Per k (the text ends in ``after[:k]``, k < len(after)): the tokens that would complete ``after``
        and go on with more than at most two newlines in the same token, which the grammar that follows
        might refuse (computed once per marker)."""
        with self._lock:
            cached = self._ban_cache.get(after)
        if cached is not None:
            return cached
        bans: list[list[int]] = [[] for _ in range(len(after))]
        last = after[-1:]
        for tid, b in enumerate(self._vocab):
            if last not in b:                    # no token without the marker's last byte completes it
                continue
            for k in range(len(after)):
                s = after[:k] + b
                i = s.find(after)
                if i >= 0 and s[i + len(after):] not in _LEAD:
                    bans[k].append(tid)
        with self._lock:
            self._ban_cache[after] = bans
        return bans


class Constraint:
    """One request's grammar state: which tokens may come next, and advancing by the chosen one."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row ``row`` of ``bitmask`` (int32 [n, ceil(V / 32)], on the CPU): bit t set iff token t is allowed."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False if the grammar does not allow it (the matcher is then unchanged)."""
        return bool(self.matcher.accept_token(int(token)))

    @property
    def terminated(self) -> bool:
        """The output is complete (its stop token accepted, or with no stop tokens the grammar complete)."""
        return bool(self.matcher.is_terminated())


_LEAD = (b"", b"\n", b"\n\n")        # what a deferred grammar takes before its own part


def _grammar(xgr, spec: GrammarSpec):
    """The (uncompiled) xgrammar ``Grammar`` of ``spec``'s kind and schema."""
    if spec.kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if spec.kind == "tool_call":
        from .tool_calls import build_grammar

        return build_grammar(xgr, spec.schema)
    return xgr.Grammar.from_json_schema(spec.schema, any_whitespace=False, strict_mode=True)


class DeferredConstraint:
    """A grammar that starts after a marker (a reasoning model's ``</think>``): until the output holds
    ``after`` every token is allowed but those that would complete it and go on, in the same token, with
    more than the two newlines the grammar takes first; from then on the grammar's matcher decides (the
    bytes after the marker in the token that completed it are fed to it first)."""

    def __init__(self, inner: Constraint, after: bytes, vocab: list, bans: list[list[int]]):
        self.inner, self.after, self.vocab, self.bans = inner, after, vocab, bans
        self.tail = b""            # while inactive: the output's longest tail that is a proper prefix of ``after``
        self.active = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        if self.active:
            self.inner.fill(bitmask, row)
            return
        for tid in self.bans[len(self.tail)]:            # the row is all-allowed: clear these bits
            w, bit = tid >> 5, tid & 31
            word = (int(bitmask[row, w]) & 0xFFFFFFFF) & ~(1 << bit)
            bitmask[row, w] = word - (1 << 32) if word >= (1 << 31) else word

    def accept(self, token: int) -> bool:
        if self.active:
            return self.inner.accept(token)
        b = self.vocab[token] if 0 <= token < len(self.vocab) else b""
        if token in self.bans[len(self.tail)]:
            return False
        s = self.tail + b
        i = s.find(self.after)
        if i < 0:
            k = next((k for k in range(min(len(self.after) - 1, len(s)), 0, -1) if s.endswith(self.after[:k])), 0)
            self.tail = s[len(s) - k:] if k else b""
            return True
        self.active, self.tail = True, b""
        rest = s[i + len(self.after):]
        return not rest or bool(self.inner.matcher.accept_string(rest))

    @property
    def terminated(self) -> bool:
        return self.active and self.inner.terminated


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed bitmask int32 [rows, ceil(vocab_size / 32)] (xgrammar's layout)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [n, vocab_size] from a bitmask int32 [n, ceil(V / 32)] (bit j of word w is token 32·w + j)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1                      # [n, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def mask_logits(logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> torch.Tensor:
    """logits [n, V] with row ``rows[k]`` limited to what ``constraints[k]`` allows next (-inf elsewhere);
    a new tensor (the input is left as it is). Rows not named are unchanged."""
    V = logits.shape[-1]
    bitmask = new_bitmask(len(rows), V)
    for k, c in enumerate(constraints):
        c.fill(bitmask, k)
    allowed = allowed_tokens(bitmask.to(logits.device), V)
    out = logits.clone()
    idx = torch.tensor(rows, device=logits.device)
    out[idx] = out[idx].masked_fill(~allowed, float("-inf"))
    return out
