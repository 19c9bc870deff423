"""Reasoning output of DeepSeek-R1-family models: ``dsv3 serve --reasoning-parser deepseek_r1``.

An R1-style model thinks first and answers after: ``<think>…</think>\\n\\nthe answer``. With the parser on,
a chat answer's text up to ``</think>`` is its ``message.reasoning_content`` and the rest its
``message.content`` (as vLLM's ``deepseek_r1`` parser splits it):

* a leading ``<think>`` is dropped; an answer that does not start with it is still thinking until
  ``</think>`` (DeepSeek-R1-0528's template writes ``<think>\\n`` into the prompt itself);
* the newlines right after ``</think>`` are dropped (the answer begins at its first other character);
* no ``</think>`` at all (``max_tokens`` ran out while thinking, or a stop string came first): the whole
  text is reasoning and ``content`` is null. An empty part is null.

:class:`ReasoningSplitter` does the split as the text streams in, holding back only what may still be
the start of a marker (``</thi`` …) or newlines that may be the last before the answer, so the pieces of
a stream join into exactly what :func:`split_reasoning` gives for the whole text, wherever the tokens
cut the markers. Tool calls and ``response_format`` apply to the content only (the server parses calls
from it; a grammar starts once ``</think>`` has been generated: :class:`dsv3.infer.structured.GrammarSpec`
``after``).
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"
PARSERS = ("deepseek_r1",)         # the names --reasoning-parser takes


def _partial_tail(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker`` (0 if none)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Splits a streamed answer into reasoning and content. :meth:`feed` takes the next piece of text
    and returns (reasoning, content) that can go out now; :meth:`finish` returns what was held back at
    the end. :attr:`end` is the position in the whole text just past ``</think>`` (None while unseen):
    the tokens that start before it are the reasoning tokens."""

    def __init__(self):
        self.state = "start"       # "start" (a leading <think> may be coming), "think", "lead" (newlines after
        self.buf = ""              # </think>), "content"; buf: text held back, starting at position ``at``
        self.at = 0
        self.end: int | None = None

    @property
    def thinking(self) -> bool:
        """No ``</think>`` yet: what comes is reasoning."""
        return self.state in ("start", "think")

    def feed(self, text: str) -> tuple[str, str]:
        buf = self.buf + text
        at = self.at
        reasoning = content = ""
        if self.state == "start" and buf:
            if buf.startswith(THINK_START):
                buf, at, self.state = buf[len(THINK_START):], at + len(THINK_START), "think"
            elif not THINK_START.startswith(buf):
                self.state = "think"
        if self.state == "think":
            i = buf.find(THINK_END)
            if i >= 0:
                reasoning = buf[:i]
                cut = i + len(THINK_END)
                self.end = at + cut
                buf, at, self.state = buf[cut:], at + cut, "lead"
            else:
                keep = _partial_tail(buf, THINK_END)
                reasoning = buf[:len(buf) - keep]
                buf, at = buf[len(buf) - keep:], at + len(buf) - keep
        if self.state == "lead":
            rest = buf.lstrip("\n")
            at += len(buf) - len(rest)
            buf = rest
            if buf:
                self.state = "content"
        if self.state == "content":
            content, at, buf = buf, at + len(buf), ""
        self.buf, self.at = buf, at
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """(reasoning, content) still held: an unfinished marker at the end of a thinking answer is reasoning
        text (``<thi``, ``</thin``)."""
        held, self.buf = self.buf, ""
        self.at += len(held)
        if self.state in ("start", "think"):
            return held, ""
        return "", ""


def split_reasoning(text: str) -> tuple[str | None, str | None, int | None]:
    """(reasoning_content, content, end) of a whole answer: the parts (None when empty) and the position
    just past ``</think>`` (None when there is none)."""
    sp = ReasoningSplitter()
    r1, c1 = sp.feed(text)
    r2, c2 = sp.finish()
    return (r1 + r2) or None, (c1 + c2) or None, sp.end


def reasoning_tokens(tokens, end: int | None, generated: int) -> int:
    """The reasoning tokens of an answer: those whose text starts before ``end`` (the position past
    ``</think>``; ``tokens``: its shown [TokenOut], with text offsets), all ``generated`` ones when it has
    no ``</think>``."""
    if end is None:
        return generated
    return sum(1 for t in tokens if t.offset < end)
