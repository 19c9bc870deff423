"""Text from a growing list of token ids, in O(new tokens) per token, and stop strings.

DeepSeek-V3's tokenizer is byte-level: every ordinary token stands for a fixed byte string, so the
text of a completion is the UTF-8 decoding of the concatenated bytes. :class:`TokenBytes` builds that
table once per tokenizer; :class:`IncrementalText` feeds each new token's bytes to an incremental
UTF-8 decoder, which holds back a character split across tokens until its last byte arrives. Special
tokens (end of sentence, reserved tokens …) give no text, but for DeepSeek-V3's tool-call markers
(``<｜tool▁calls▁begin｜>`` …, :mod:`dsv3.infer.tool_calls`), which are read from the text. For a
tokenizer that is not byte-level the fallback decodes a short window of recent ids (special tokens
skipped); a tool-call marker that the tokenizer holds as a token of its own is written out as the
marker itself (a decoder such as Metaspace would turn its "▁" into spaces), so tool calls are parsed
from such a tokenizer's text too.

:class:`StopMatcher` finds OpenAI ``stop`` strings in the text as it grows, also across token
boundaries: it holds back only the longest tail that could still begin a stop string, releases the
rest, and on a match cuts the text just before it (the stop string itself is not returned).
"""

from __future__ import annotations

import codecs


class TokenBytes:
    """id → bytes for every token of a byte-level tokenizer (``table`` None when it is not one),
    and which ids are special."""

    def __init__(self, tokenizer):
        from ..data.tokenizer import CHAR_TO_BYTE

        hf = tokenizer.hf
        added = hf.get_added_tokens_decoder()            # id → AddedToken
        # DeepSeek-V3's tool-call markers are text to the server even where a tokenizer calls them
        # special: tool calls are parsed out of the text, and a grammar may force them
        from .tool_calls import MARKERS

        self.special = {i for i, t in added.items() if t.special and t.content not in MARKERS}
        self.markers = {i: t.content for i, t in added.items() if t.content in MARKERS}     # id → marker text
        size = max(hf.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        table: list[bytes] | None = [b""] * size
        for token, i in hf.get_vocab(with_added_tokens=True).items():
            if i in added:
                table[i] = added[i].content.encode("utf-8")
                continue
            try:
                table[i] = bytes(CHAR_TO_BYTE[c] for c in token)
            except KeyError:                              # not a byte-level vocabulary
                table = None
                break
        self.table, self.tokenizer, self.size = table, tokenizer, size

    def bytes(self, tid: int) -> bytes:
        if self.table is not None and 0 <= tid < self.size:
            return self.table[tid]
        if tid in self.markers:
            return self.markers[tid].encode("utf-8")
        return self.tokenizer.decode([tid]).encode("utf-8", "surrogatepass")

    def token_str(self, tid: int) -> str:
        """A token's text for logprobs: its UTF-8 text, or ``bytes:\\xNN…`` for a piece of a
        character (OpenAI's convention)."""
        b = self.bytes(tid)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class IncrementalText:
    """The text that each new token adds (special tokens add none)."""

    def __init__(self, tb: TokenBytes):
        self.tb = tb
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.ids: list[int] = []        # fallback only: ids, and the window [start, shown) decoded last
        self.start = self.shown = 0
        self.length = 0                 # characters produced so far

    def push(self, tid: int) -> str:
        if tid in self.tb.special:
            return ""
        if self.tb.table is not None:
            text = self.decoder.decode(self.tb.table[tid] if 0 <= tid < self.tb.size else b"")
        else:
            text = self._window(tid)
        self.length += len(text)
        return text

    def _window(self, tid: int) -> str:
        """Decode the ids since the last shown one plus one before it (for tokenizers whose
        decoding of a token depends on its neighbour); wait while the text ends in a partial character.
        A tool-call marker is shown as itself, after whatever was still held back (decoded as it is);
        as the neighbour of the next token it is decoded by the tokenizer, alike on both sides of the
        difference. Special tokens never get here (:meth:`push`), so nothing is skipped."""
        marker = self.tb.markers.get(tid)
        if marker is not None:
            text = self._held()
            self.ids.append(tid)
            self.start, self.shown = len(self.ids) - 1, len(self.ids)
            return text + marker
        self.ids.append(tid)
        dec = self.tb.tokenizer.decode
        before = dec(self.ids[self.start:self.shown])
        after = dec(self.ids[self.start:])
        if after.endswith("\ufffd"):
            return ""
        self.start, self.shown = self.shown, len(self.ids)
        return after[len(before):]

    def _held(self) -> str:
        """The text of the ids not yet shown (fallback), an unfinished character as U+FFFD."""
        dec = self.tb.tokenizer.decode
        return dec(self.ids[self.start:])[len(dec(self.ids[self.start:self.shown])):]

    def flush(self) -> str:
        """Whatever an unfinished character leaves at the end (U+FFFD)."""
        if self.tb.table is not None:
            text = self.decoder.decode(b"", final=True)
        else:
            text = self._held()
            self.start = self.shown = len(self.ids)
        self.length += len(text)
        return text


class StopMatcher:
    """Releases text as it grows, holding back what could begin a stop string; ``feed`` returns
    (text safe to show, matched)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched = False
        # per stop string: character → the prefix lengths k (longest first, k < len) whose last
        # character it is, so that only prefixes ending in the text's last character are tried
        self._ends = []
        for s in self.stops:
            ends: dict[str, list[int]] = {}
            for k in range(len(s) - 1, 0, -1):
                ends.setdefault(s[k - 1], []).append(k)
            self._ends.append(ends)

    def feed(self, text: str) -> tuple[str, bool]:
        if self.matched:
            return "", True
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.matched = self.pending[:cut], "", True
            return out, True
        hold = self._hold()
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def _hold(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        best = 0
        if not self.pending:
            return 0
        last = self.pending[-1]
        for s, ends in zip(self.stops, self._ends):
            for k in ends.get(last, ()):
                if k <= best:
                    break
                if k <= len(self.pending) and self.pending.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """The held-back text at the end of a completion that matched no stop string."""
        out, self.pending = self.pending, ""
        return "" if self.matched else out
