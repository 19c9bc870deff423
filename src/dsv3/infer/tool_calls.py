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


class ToolCallStream:
    """Splits a streamed answer into content to send at once and a tool-call block held until the end:
    :meth:`feed` returns the text that can go out now (all of it until the block's first marker could
    begin; a tail that may be the start of the marker is held back), :meth:`finish` returns (the rest of
    the content, the calls or None). When the held text turns out to be no well-formed block, it is
    returned by :meth:`finish` as content: nothing the model wrote is lost."""

    def __init__(self):
        self.held = ""           # text not yet sent: a possible marker start, or the whole block
        self.in_block = False
        self.sent = ""

    def feed(self, text: str) -> str:
        if self.in_block:
            self.held += text
            return ""
        buf = self.held + text
        i = buf.find(CALLS_BEGIN)
        if i >= 0:
            self.in_block, self.held = True, buf[i:]
            out = buf[:i]
        else:
            keep = 0
            for k in range(min(len(CALLS_BEGIN) - 1, len(buf)), 0, -1):
                if CALLS_BEGIN.startswith(buf[-k:]):
                    keep = k
                    break
            out, self.held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.sent += out
        return out

    def finish(self) -> tuple[str, list[dict] | None]:
        held, self.held = self.held, ""
        if self.in_block:
            _, calls = parse_tool_calls(held)
            if calls is not None:
                return "", calls
        return held, None


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
