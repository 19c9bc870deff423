"""One answer's text as its parts: the reasoning (``--reasoning-parser``, :mod:`dsv3.infer.reasoning`), the
content and the tool calls (with tools, :mod:`dsv3.infer.tool_calls`), whole or as it streams.

Chat completions and the Responses API both split answers here and only dress the parts differently
(``reasoning_content`` / ``content`` / ``tool_calls`` deltas; reasoning, message and function_call items).
"""

from __future__ import annotations

from .reasoning import ReasoningSplitter, reasoning_tokens, split_reasoning
from .tool_calls import ToolCallStream, parse_tool_calls

REASONING, CONTENT, CALL = "reasoning", "content", "call"


def split_answer(text: str, reasoning: bool, tools: bool) -> tuple[str | None, str | None, list | None, int | None]:
    """(reasoning, content, calls, end) of a whole answer: with ``reasoning`` the text up to ``</think>`` is
    the reasoning (else None and the whole text is content); with ``tools`` the content's tool-call block
    becomes ``calls`` (OpenAI's chat shape ``{"id", "type", "function": {"name", "arguments"}}``; None when
    there is none) and the content is what comes before it. ``end``: the position past ``</think>`` (for
    :func:`dsv3.infer.reasoning.reasoning_tokens`)."""
    thought, end = None, None
    if reasoning:
        thought, text, end = split_reasoning(text)
    calls = None
    if tools and text is not None:
        content, calls = parse_tool_calls(text)
        if calls is not None:
            text = content
    return thought, text, calls, end


class AnswerStream:
    """Splits one streamed answer into parts as its text arrives. :meth:`feed` returns the parts that can go
    out now, in order, each ``(REASONING, text)``, ``(CONTENT, text)`` or ``(CALL, delta)`` (a tool-call delta
    of :class:`dsv3.infer.tool_calls.ToolCallStream`: a call's header ``{"index", "id", "type", "function":
    {"name", "arguments": ""}}``, then ``{"index", "function": {"arguments": FRAGMENT}}``); :meth:`finish`
    returns the last parts and the calls (None unless the answer was a well-formed call block, judged as
    :func:`split_answer` judges it). Joined, the parts are what :func:`split_answer` gives for the whole text."""

    def __init__(self, reasoning: bool, tools: bool):
        self.thinker = ReasoningSplitter() if reasoning else None
        self.calls = ToolCallStream() if tools else None

    @property
    def thinking(self) -> bool:
        """Reasoning is on and no ``</think>`` yet: what comes is reasoning."""
        return self.thinker is not None and self.thinker.thinking

    @property
    def end(self) -> int | None:
        """The position past ``</think>`` (None while unseen, or without reasoning)."""
        return None if self.thinker is None else self.thinker.end

    def feed(self, text: str) -> list[tuple[str, object]]:
        thought, text = self.thinker.feed(text) if self.thinker is not None else ("", text)
        return self._parts(thought, text)

    def _parts(self, thought: str, text: str) -> list[tuple[str, object]]:
        out = [(REASONING, thought)] if thought else []
        text, calls = self.calls.feed(text) if self.calls is not None and text else (text, [])
        if text:
            out.append((CONTENT, text))
        return out + [(CALL, c) for c in calls]

    def finish(self) -> tuple[list[tuple[str, object]], list | None]:
        thought, text = self.thinker.finish() if self.thinker is not None else ("", "")
        out = self._parts(thought, text)
        whole = None
        if self.calls is not None:
            rest, last, whole = self.calls.finish()
            if rest:
                out.append((CONTENT, rest))
            out += [(CALL, c) for c in last]
        return out, whole


def reasoning_token_count(gens, ends: dict) -> int:
    """The reasoning tokens of answers ``gens`` (GenerationStreams; ``ends[g.index]``: the position past each
    one's ``</think>``), as OpenAI counts them: the tokens up to the end of the thinking."""
    return sum(reasoning_tokens(g.tokens, ends.get(g.index), g.output_tokens) for g in gens)
