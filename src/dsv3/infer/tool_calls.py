"""OpenAI tool calling in DeepSeek-V3's format: the tools described in the prompt, tool calls parsed out of
the model's text (whole or streamed), and the grammar that forces a call for ``tool_choice`` "required"
or a named function.

DeepSeek-V3 writes an assistant turn that calls tools as::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>                       (one per call; further calls follow after "\\n")
    <｜tool▁calls▁end｜><｜end▁of▁sentence｜>

and gets the results back as ``<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>…
<｜tool▁outputs▁end｜>`` (its chat template; the markers are tokens of its tokenizer, written out as text
by tokenizers that lack them). Text before the block is the answer's ``content``.

DeepSeek-V3's published chat template has no place for the ``tools`` list, so a template that never
mentions ``tools`` gets them as a system prompt (:func:`tools_system_prompt`, after the request's own
system messages); a template that does mention ``tools`` renders them itself.
"""

from __future__ import annotations

import json
import re
import secrets

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
MARKERS = frozenset((CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN,
                     OUTPUT_END))

_CALL = re.compile(re.escape(CALL_BEGIN) + r"(?P<type>[^\n<]*?)" + re.escape(SEP) + r"(?P<name>[^\n]*?)\n"
                   r"```(?:json)?\n(?P<args>.*?)\n?```" + re.escape(CALL_END), re.DOTALL)


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def render_call(name: str, arguments: str) -> str:
    """One call as DeepSeek-V3 writes it."""
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{arguments}\n```{CALL_END}"


def tools_system_prompt(tools: list[dict]) -> str:
    """The system prompt that describes ``tools`` (OpenAI's [{"type": "function", "function": {…}}]) and
    DeepSeek-V3's call format to a model whose chat template has no place for them."""
    lines = ["## Tools", "", "You can call the following functions. To call one or more of them, answer with",
             f"{CALLS_BEGIN}{render_call('NAME', 'ARGUMENTS')}{CALLS_END}",
             "with one call per function (calls separated by a new line), NAME the function's name and "
             "ARGUMENTS a JSON object of its parameters.", ""]
    for t in tools:
        f = t["function"]
        lines.append(f"### {f['name']}")
        if f.get("description"):
            lines.append(f"Description: {f['description']}")
        lines.append("Parameters: " + json.dumps(f.get("parameters") or {"type": "object", "properties": {}},
                                                 ensure_ascii=False))
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def parse_tool_calls(text: str) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) of a model's answer: when ``text`` holds a well-formed tool-call block, the
    text before it (None when it is empty or only whitespace) and the calls in OpenAI's shape
    ``{"id": "call_…", "type": "function", "function": {"name", "arguments"}}`` (``arguments`` the JSON
    object's text as the model wrote it). Otherwise (no block, or a malformed one: a call whose arguments
    are not a JSON object, an unknown marker, text after the block) ``(text, None)``: the answer is plain
    content."""
    start = text.find(CALLS_BEGIN)
    if start < 0:
        return text, None
    rest = text[start + len(CALLS_BEGIN):]
    end = rest.find(CALLS_END)
    if end >= 0:
        after, rest = rest[end + len(CALLS_END):], rest[:end]
        if after.strip():
            return text, None
    calls, pos = [], 0
    while True:
        while pos < len(rest) and rest[pos] in " \n":
            pos += 1
        if pos == len(rest):
            break
        m = _CALL.match(rest, pos)
        if m is None or m["type"].strip() != "function":
            return text, None
        name, args = m["name"].strip(), m["args"].strip()
        if not name:
            return text, None
        try:
            value = json.loads(args)
        except (ValueError, RecursionError):
            return text, None
        if not isinstance(value, dict):
            return text, None
        calls.append({"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}})
        pos = m.end()
    if not calls:
        return text, None
    before = text[:start]
    return (before if before.strip() else None), calls


_ARGS_END = "```" + CALL_END          # what ends a call's arguments (after an optional "\n")
_FENCES = ("```json\n", "```\n")


def _tail_hold(text: str, end: str) -> int:
    """Length of the longest tail of ``text`` that may still grow into an end of arguments: whitespace
    (which the arguments lose when they end there) then a proper prefix of ``end`` (maybe empty)."""
    k = next((k for k in range(min(len(end) - 1, len(text)), 0, -1) if end.startswith(text[-k:])), 0)
    rest = text[:len(text) - k]
    return k + len(rest) - len(rest.rstrip())


class ToolCallStream:
    """Splits a streamed answer into content and tool calls, both sent as they are decoded.

    :meth:`feed` returns (content that can go out now, tool-call deltas): content until the block's first
    marker could begin (a tail that may be the start of the marker is held back); then, inside the block,
    each call as OpenAI streams it: a first delta ``{"index", "id", "type": "function", "function": {"name",
    "arguments": ""}}`` once its header (marker, type, name and the opening fence) is complete, then
    ``{"index", "function": {"arguments": FRAGMENT}}`` deltas as its arguments are written (leading and
    trailing whitespace and what may be the closing fence held back), so the fragments of a well-formed call
    join into exactly the ``arguments`` that :func:`parse_tool_calls` gives for the whole answer.

    :meth:`finish` returns (the rest of the content, the last deltas, the calls or None), judged as
    :func:`parse_tool_calls` judges the whole answer. A block that turns out malformed (arguments that are
    no JSON object, a cut-off call, text after the block) with no call sent yet comes back as content, as
    before: nothing the model wrote is lost. Once a call has gone out it cannot be taken back: the calls sent
    stay (a client sees what OpenAI sends for an answer cut off by max_tokens: arguments that may not
    parse), the text not yet sent comes back as content and the calls are None (finish_reason stays the
    engine's)."""

    def __init__(self):
        self.held = ""           # text not yet sent as content: a possible marker start, or the whole block
        self.in_block = False
        self.sent = ""
        self.state = "between"   # in the block: "between" calls, "args" of one, "done" (after the end marker),
        self.pos = 0             # "bad" (no call block after all); pos: where parsing goes on in ``held``
        self.calls: list[dict] = []      # the calls begun: {"id", "name", "args": arguments sent so far,
        #                                  "lead": the whitespace before the arguments (None until they begin)}
        self.args_start = 0      # in state "args": where the current call's arguments begin in ``held``
        self.scanned = 0         # … and how far the search for their end has looked
        self.used = 0            # ``held`` up to here is sent as call headers and arguments

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if self.in_block:
            self.held += text
            return "", self._parse()
        buf = self.held + text
        i = buf.find(CALLS_BEGIN)
        if i >= 0:
            self.in_block, self.held, self.pos = True, buf[i:], len(CALLS_BEGIN)
            out = buf[:i]
            self.sent += out
            return out, self._parse()
        keep = 0
        for k in range(min(len(CALLS_BEGIN) - 1, len(buf)), 0, -1):
            if CALLS_BEGIN.startswith(buf[-k:]):
                keep = k
                break
        out, self.held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.sent += out
        return out, []

    def _parse(self) -> list[dict]:
        """Deltas for what the block's new text completes; stops at what needs more text."""
        out, buf = [], self.held
        while True:
            if self.state == "between":
                while self.pos < len(buf) and buf[self.pos] in " \n":
                    self.pos += 1
                rest = buf[self.pos:]
                if rest.startswith(CALLS_END):
                    self.state, self.pos = "done", self.pos + len(CALLS_END)
                elif rest.startswith(CALL_BEGIN):
                    if not self._header(buf, self.pos + len(CALL_BEGIN), out):
                        return out
                elif not (CALL_BEGIN.startswith(rest) or CALLS_END.startswith(rest)):
                    self.state = "bad"
                else:
                    return out
            elif self.state == "args":
                i = buf.find(_ARGS_END, max(self.args_start, self.scanned - len(_ARGS_END) + 1))
                call = self.calls[-1]
                if i >= 0:
                    args = buf[self.args_start:i].strip()
                else:                                    # what is surely part of them: O(new text) a feed
                    self.scanned = len(buf)
                    if call["lead"] is None:             # the whitespace before them is held until they begin
                        seg = buf[self.args_start:]
                        if not seg.strip():
                            return out
                        call["lead"] = len(seg) - len(seg.lstrip())
                    first = self.args_start + call["lead"]
                    tail = buf[max(first, len(buf) - len(_ARGS_END) - 64):]
                    hold = _tail_hold(tail, _ARGS_END)
                    if hold == len(tail):                # a long run of whitespace: look at all of it
                        hold = _tail_hold(buf[first:], _ARGS_END)
                    end = len(buf) - hold
                    args = call["args"] + buf[first + len(call["args"]):end] if end > first + len(call["args"]) \
                        else call["args"]
                if len(args) > len(call["args"]):
                    out.append({"index": len(self.calls) - 1, "function": {"arguments": args[len(call["args"]):]}})
                    call["args"] = args
                if i < 0:
                    self.used = self.args_start + call["lead"] + len(args)
                    return out
                self.state, self.pos = "between", i + len(_ARGS_END)
                self.used = self.pos
            elif self.state == "done":
                if buf[self.pos:].strip():
                    self.state = "bad"
                return out
            else:                                        # "bad": the rest is content, at the end
                return out

    def _header(self, buf: str, at: int, out: list) -> bool:
        """A call's header from ``at`` (after its begin marker): TYPE, the separator, NAME, a new line and the
        opening fence. Complete and well-formed: its first delta goes out (True). Malformed: state "bad" (True).
        Incomplete: False."""
        sep = buf.find(SEP, at)
        head = buf[at:] if sep < 0 else buf[at:sep]
        lt = head.find("<")                              # TYPE holds neither a new line nor "<"
        if "\n" in head or (lt >= 0 and (sep >= 0 or not SEP.startswith(head[lt:]))):
            self.state = "bad"
            return True
        if sep < 0:
            return False
        nl = buf.find("\n", sep + len(SEP))
        if nl < 0:
            return False
        fence = buf[nl + 1:nl + 1 + len(_FENCES[0])]
        if not any(fence.startswith(f) for f in _FENCES):
            if any(f.startswith(fence) for f in _FENCES) and nl + 1 + len(fence) == len(buf):
                return False                             # the fence may still come
            self.state = "bad"
            return True
        name = buf[sep + len(SEP):nl].strip()
        if head.strip() != "function" or not name:
            self.state = "bad"
            return True
        start = nl + 1 + next(len(f) for f in _FENCES if fence.startswith(f))
        self.calls.append({"id": call_id(), "name": name, "args": "", "lead": None})
        out.append({"index": len(self.calls) - 1, "id": self.calls[-1]["id"], "type": "function",
                    "function": {"name": name, "arguments": ""}})
        self.state, self.args_start, self.scanned, self.used = "args", start, start, start
        return True

    def finish(self) -> tuple[str, list[dict], list[dict] | None]:
        held, self.held = self.held, ""
        if not self.in_block:
            return held, [], None
        _, calls = parse_tool_calls(held)
        out = []
        if calls is not None and len(calls) >= len(self.calls) and all(
                c["function"]["name"] == mine["name"] and c["function"]["arguments"].startswith(mine["args"])
                for c, mine in zip(calls, self.calls)):
            for k, c in enumerate(calls):
                if k < len(self.calls):                  # begun: the rest of its arguments (none, normally)
                    c["id"] = self.calls[k]["id"]
                    more = c["function"]["arguments"][len(self.calls[k]["args"]):]
                    if more:
                        out.append({"index": k, "function": {"arguments": more}})
                else:                                    # never begun (not expected): sent whole
                    out.append(dict(c, index=k))
            return "", out, calls
        if not self.calls:
            return held, [], None
        return held[self.used:], [], None


# --------------------------------------------------------------------------------------- the grammar
MAX_FORCED_CALLS = 4         # calls a "required" answer may hold (parallel_tool_calls not false)


def tool_call_grammar(tools: list[dict], choice, parallel: bool = True) -> "object":
    """The :class:`dsv3.infer.structured.GrammarSpec` for ``tool_choice`` "required" (one call block of 1 …
    MAX_FORCED_CALLS calls of any of ``tools``; one call when ``parallel`` is false) or ``{"type":
    "function", "function": {"name": …}}`` (exactly one call of that one), each call's arguments keeping to
    its function's ``parameters`` schema."""
    from .structured import GrammarSpec

    if isinstance(choice, str):
        chosen, most = tools, (MAX_FORCED_CALLS if parallel else 1)
    else:
        chosen, most = [t for t in tools if t["function"]["name"] == choice["function"]["name"]], 1
    funcs = [[t["function"]["name"], t["function"].get("parameters")] for t in chosen]
    return GrammarSpec("tool_call", json.dumps({"functions": funcs, "max_calls": most}, ensure_ascii=False,
                                               separators=(",", ":")))


def _ebnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def build_grammar(xgr, spec_text: str):
    """xgrammar ``Grammar`` of a "tool_call" spec (``spec_text``: JSON {"functions": [[name, parameters or
    null], …], "max_calls": k}): a call block of 1 … k calls (separated by a new line), each of one of the
    functions, its arguments JSON (compact spacing) that keeps to its parameters (any object when there
    are none)."""
    spec = json.loads(spec_text)

    def lit(text):
        return xgr.Grammar.from_ebnf("root ::= " + _ebnf_literal(text))

    def call():                  # one call of any of the functions (a fresh copy each time it is used)
        alts = []
        for name, params in spec["functions"]:
            if params is None:
                body = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            else:
                body = xgr.Grammar.from_json_schema(json.dumps(params, ensure_ascii=False), any_whitespace=False,
                                                    strict_mode=True)
            alts.append(xgr.Grammar.concat(lit(f"{CALL_BEGIN}function{SEP}{name}\n```json\n"), body,
                                           lit(f"\n```{CALL_END}")))
        return alts[0] if len(alts) == 1 else xgr.Grammar.union(*alts)

    calls = call()               # 1 … k calls, built from the last: call ("" | "\n" calls)
    for _ in range(int(spec["max_calls"]) - 1):
        calls = xgr.Grammar.concat(call(), xgr.Grammar.union(lit(""), xgr.Grammar.concat(lit("\n"), calls)))
    return xgr.Grammar.concat(lit(CALLS_BEGIN), calls, lit(CALLS_END))
