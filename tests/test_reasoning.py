"""Reasoning output (``dsv3 serve --reasoning-parser deepseek_r1``): the splitter of ``<think>…</think>``
answers at every split point, the grammar that starts after ``</think>``, the flag's validation, then a real
``dsv3 serve`` of a scripted checkpoint (a bigram model that writes known R1-style answers) driven with the
``openai`` client, whole and streamed."""

import json

import pytest

from dsv3.infer.reasoning import ReasoningSplitter, split_reasoning
from dsv3.infer.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP


# --------------------------------------------------------------------------------------- the splitter
@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>\nLet me see.\n</think>\n\nThe answer is 4.", "\nLet me see.\n", "The answer is 4."),
    ("Let me see.</think>\n\nFour.", "Let me see.", "Four."),                # R1-0528: <think> in the prompt
    ("<think>still thinking when max_tokens hit", "still thinking when max_tokens hit", None),
    ("no markers at all", "no markers at all", None),
    ("<think>x</think>", "x", None),
    ("<think>x</think>\n\n\n", "x", None),
    ("<think></think>\n\nhi", None, "hi"),
    ("</think>hi\n\nthere\n", None, "hi\n\nthere\n"),                       # only leading newlines go
    ("<think>a</think> \nb", "a", " \nb"),
    ("<think>a</think>b</think>c", "a", "b</think>c"),                   # the first </think> ends thinking
    ("<think>a<think>b</think>c", "a<think>b", "c"),                     # only a leading <think> is dropped
    ("x<think>a</think>c", "x<think>a", "c"),
    ("<thin", "<thin", None),                                             # unfinished markers are text
    ("<think>ab</thi", "ab</thi", None),
    ("<think>ab</think", "ab</think", None),
    ("", None, None),
    ("<think>", None, None),
    ("<think>é…日本</think>\n答え", "é…日本", "答え"),
])
def test_split_and_stream_at_every_split_point(text, reasoning, content):
    assert split_reasoning(text)[:2] == (reasoning, content)
    cuts = [[i, j] for i in range(len(text) + 1) for j in range(i, len(text) + 1)]
    cuts.append(list(range(len(text) + 1)))                # one character at a time
    for cut in cuts:
        pieces = [text[a:b] for a, b in zip([0] + cut, cut + [len(text)])]
        sp, r, c = ReasoningSplitter(), "", ""
        for p in pieces:
            dr, dc = sp.feed(p)
            assert "</think>" not in dr or "</think>" in (reasoning or ""), (pieces, dr)
            assert not c or not dr, "reasoning after content"
            r, c = r + dr, c + dc
        dr, dc = sp.finish()
        r, c = r + dr, c + dc
        assert (r or None, c or None) == (reasoning, content), pieces
        assert sp.end == split_reasoning(text)[2]


def test_end_marks_the_reasoning_tokens():
    from dsv3.infer.generation_stream import TokenOut
    from dsv3.infer.reasoning import reasoning_tokens

    pieces = ["<think>", "ab", "</", "think", ">\n", "\nc", "d"]
    tokens, at = [], 0
    for i, p in enumerate(pieces):
        tokens.append(TokenOut(i, p, offset=at))
        at += len(p)
    _, content, end = split_reasoning("".join(pieces))
    assert content == "cd" and end == len("<think>ab</think>")
    assert reasoning_tokens(tokens, end, 8) == 5                      # up to the token that ends "</think>"
    assert reasoning_tokens(tokens[:3], None, 3) == 3                 # no </think>: all of them


def test_the_marker_split_across_every_token_boundary_never_leaks():
    marker = "</think>"
    for i in range(1, len(marker)):
        for j in range(i, len(marker)):
            pieces = ["<think>", "why", marker[:i], marker[i:j], marker[j:], "\n", "\nok"]
            sp, out = ReasoningSplitter(), []
            for p in pieces:
                out.append(sp.feed(p))
            out.append(sp.finish())
            r, c = "".join(x for x, _ in out), "".join(y for _, y in out)
            assert (r, c) == ("why", "ok"), pieces


# --------------------------------------------------------------------------------------- the scripted model
SCRIPTS = {
    # <think> first, </think> cut over three tokens, newlines in a token of their own
    "A": ["<think>", "\nThe user says hi", ". I greet back.", "</", "thi", "nk>", "\n\n", "Hello", " there!"],
    # no <think> (R1-0528 writes it in the prompt), </think> and the newlines in one token, then JSON
    "B": ["Need JSON", " now.", "</think>\n\n", '{"a": 1}'],
    # a tool call after the thinking
    "C": ["<think>\n", "Call the tool.", "</think>", "\n",
          CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_weather\n```json\n", '{"city": "Rome"}',
          "\n```" + CALL_END + CALLS_END],
    # a token that ends the marker and goes on (the grammar test bans it while "</thi" is the tail)
    "D": ["nk>oops"],
}
REASONING_A, CONTENT_A = "\nThe user says hi. I greet back.", "Hello there!"
KEY, NAME = "sk-think", "r1-script"


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    from helpers import save_scripted_model

    out = tmp_path_factory.mktemp("r1_script")
    ids = save_scripted_model(out, SCRIPTS)
    return str(out), ids


def test_grammar_starts_after_think_end(scripted):
    """A response_format grammar with ``after="</think>"``: every token is allowed while thinking but one that
    would end the thinking and go on with what the grammar may refuse; from the marker on (cut over tokens,
    or in one token with its newlines) only what the JSON grammar allows."""
    pytest.importorskip("xgrammar")
    from dsv3.infer.generate import load_tokenizer
    from dsv3.infer.structured import GrammarSpec, Grammars, allowed_tokens, new_bitmask

    model_dir, ids = scripted
    tok = load_tokenizer(model_dir)
    vocab = json.load(open(f"{model_dir}/config.json"))["vocab_size"]
    grammars = Grammars(tok, vocab)
    spec = GrammarSpec("json_object", after="</think>")

    def allowed(c):
        mask = new_bitmask(1, vocab)
        c.fill(mask, 0)
        return allowed_tokens(mask, vocab)[0]

    byte = {ch: tok.encode(ch)[0] for ch in "{H\n!"}
    c = grammars.matcher(spec, tok.stop_ids)
    for piece in ["<think>", "\nThe user says hi", "</", "thi"]:
        ok = allowed(c)
        assert ok[ids["Hello"]] and ok[ids["<eos>"]] and ok[byte["H"]], piece        # thinking: free text
        assert c.accept(ids[piece]) and not c.terminated
    ok = allowed(c)
    assert not ok[ids["nk>oops"]] and ok[ids["nk>"]] and ok[ids["Hello"]]        # "</thi" + "nk>oops": banned
    assert not c.accept(ids["nk>oops"])
    assert c.accept(ids["nk>"])                                                    # the grammar starts
    ok = allowed(c)
    assert ok[byte["{"]] and ok[byte["\n"]] and not ok[byte["H"]] and not ok[ids["Hello"]] and not ok[ids["<eos>"]]
    assert c.accept(ids["\n\n"]) and c.accept(ids['{"a": 1}'])
    ok = allowed(c)
    assert ok[ids["<eos>"]] and not ok[byte["!"]]
    assert c.accept(ids["<eos>"]) and c.terminated

    c = grammars.matcher(spec, tok.stop_ids)                 # the marker and two newlines in one token
    assert all(c.accept(ids[p]) for p in ["Need JSON", "</think>\n\n"])
    ok = allowed(c)
    assert ok[byte["{"]] and not ok[byte["\n"]]              # at most two newlines before the JSON
    assert c.accept(ids['{"a": 1}']) and c.accept(ids["<eos>"]) and c.terminated


def test_unknown_reasoning_parser_is_one_line_exit_2(capsys):
    from dsv3.cli import main

    try:
        code = main(["serve", "--model", "nowhere", "--reasoning-parser", "qwen3"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("dsv3 serve: error: ") and "--reasoning-parser" in lines[0] \
        and "deepseek_r1" in lines[0] and "qwen3" in lines[0], err


# --------------------------------------------------------------------------------------- served
@pytest.fixture(scope="module", params=["plain", "speculative"])
def served(request, scripted, tmp_path_factory):
    """The scripted model behind ``dsv3 serve --reasoning-parser deepseek_r1``, decoding one token a step or
    verifying MTP drafts (--speculative: the grammar's matcher state must hold under drafts too)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from helpers import serve_openai

    flags = ["--speculative"] if request.param == "speculative" else []
    with serve_openai(scripted[0], tmp_path_factory.mktemp("serve_r1"), NAME, KEY, "--reasoning-parser",
                      "deepseek_r1", *flags, timeout=300) as client:
        yield client


def _ask(client, trigger, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi " + trigger}],
                                          max_tokens=kw.pop("max_tokens", 40), **kw)


def _extra(obj, name):
    return getattr(obj, name, None) if name in type(obj).model_fields else (obj.model_extra or {}).get(name)


def _streamed(client, trigger, **kw):
    """(per choice index: [(field, text)] in order, finish reasons, logprob tokens), the usage, the chunks."""
    chunks = list(_ask(client, trigger, stream=True, stream_options={"include_usage": True}, **kw))
    parts, finish, lps = {}, {}, {}
    for ch in chunks:
        for c in ch.choices:
            d = c.delta
            for field in ("reasoning_content", "content"):
                v = _extra(d, field)
                if v:
                    parts.setdefault(c.index, []).append((field, v))
            if d.tool_calls:
                parts.setdefault(c.index, []).append(("tool_calls", d.tool_calls))
            if c.finish_reason:
                finish[c.index] = c.finish_reason
            if c.logprobs is not None:
                lps.setdefault(c.index, []).extend(t.token for t in c.logprobs.content)
    return parts, finish, lps, chunks[-1].usage, chunks


def _joined(parts, field):
    return "".join(v for f, v in parts if f == field) or None


def test_serve_splits_reasoning_whole_and_streamed(served):
    r = _ask(served, "A", temperature=0)
    ch = r.choices[0]
    assert _extra(ch.message, "reasoning_content") == REASONING_A and ch.message.content == CONTENT_A
    assert ch.finish_reason == "stop"
    assert r.usage.completion_tokens == 10                 # nine pieces and the end of sentence
    assert r.usage.completion_tokens_details.reasoning_tokens == 6     # up to the token that ends </think>
    parts, finish, _, use, chunks = _streamed(served, "A", temperature=0)
    fields = [f for f, _ in parts[0]]
    assert fields == sorted(fields, key=lambda f: f != "reasoning_content")     # reasoning first, then content
    assert fields.count("reasoning_content") >= 1 and fields.count("content") >= 1
    assert _joined(parts[0], "reasoning_content") == REASONING_A and _joined(parts[0], "content") == CONTENT_A
    assert not any("think>" in v or "</" in v for _, v in parts[0])
    assert finish == {0: "stop"} and use.completion_tokens_details.reasoning_tokens == 6
    assert use.completion_tokens == 10


def test_serve_without_think_start_and_json(served):
    """R1-0528 style (no <think> in the output) and response_format: the thinking is free text, the content
    keeps to the grammar, whole and streamed."""
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    formats = [None, {"type": "json_object"},
               {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}]
    for fmt in formats:
        kw = {} if fmt is None else {"response_format": fmt}
        ch = _ask(served, "B", temperature=0, **kw).choices[0]
        assert (_extra(ch.message, "reasoning_content"), ch.message.content) == ("Need JSON now.", '{"a": 1}'), fmt
        assert ch.finish_reason == "stop"
        parts, finish, _, use, _ = _streamed(served, "B", temperature=0, **kw)
        assert _joined(parts[0], "reasoning_content") == "Need JSON now."
        assert json.loads(_joined(parts[0], "content")) == {"a": 1} and finish == {0: "stop"}
        assert use.completion_tokens_details.reasoning_tokens == 3
    # script A answers "Hello there!" after its thinking: the grammar turns that part (only) into JSON
    ch = _ask(served, "A", temperature=0, max_tokens=16, response_format={"type": "json_object"}).choices[0]
    assert _extra(ch.message, "reasoning_content") == REASONING_A and ch.message.content.startswith("{"), ch
    parts, _, _, _, _ = _streamed(served, "A", temperature=0, max_tokens=16, response_format={"type": "json_object"})
    assert (_joined(parts[0], "reasoning_content"), _joined(parts[0], "content")) == \
        (REASONING_A, ch.message.content)


def test_serve_max_tokens_and_stop_while_thinking(served):
    r = _ask(served, "A", max_tokens=3)
    ch = r.choices[0]
    assert (_extra(ch.message, "reasoning_content"), ch.message.content, ch.finish_reason) == \
        (REASONING_A, None, "length")
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    parts, finish, _, _, _ = _streamed(served, "A", max_tokens=3)
    assert [f for f, _ in parts[0]] == ["reasoning_content"] * len(parts[0]) and finish == {0: "length"}
    assert _joined(parts[0], "reasoning_content") == REASONING_A
    for stream in (False, True):
        if stream:
            parts, finish, _, _, _ = _streamed(served, "A", stop=["greet"])
            got = (_joined(parts[0], "reasoning_content"), _joined(parts[0], "content"), finish[0])
        else:
            ch = _ask(served, "A", stop=["greet"]).choices[0]
            got = (_extra(ch.message, "reasoning_content"), ch.message.content, ch.finish_reason)
        assert got == ("\nThe user says hi. I ", None, "stop")
    ch = _ask(served, "A", stop=[" there"]).choices[0]           # a stop string in the answer
    assert (_extra(ch.message, "reasoning_content"), ch.message.content) == (REASONING_A, "Hello")


def test_serve_n_and_logprobs(served):
    r = _ask(served, "A", n=2, temperature=1.0, seed=3, logprobs=True, top_logprobs=2)
    raw = "<think>" + REASONING_A + "</think>\n\n" + CONTENT_A
    assert r.usage.completion_tokens == 20 and r.usage.completion_tokens_details.reasoning_tokens == 12
    for ch in r.choices:
        assert (_extra(ch.message, "reasoning_content"), ch.message.content) == (REASONING_A, CONTENT_A)
        assert "".join(t.token for t in ch.logprobs.content) == raw    # every shown token, thinking too
    parts, finish, lps, use, _ = _streamed(served, "A", n=2, temperature=1.0, seed=3, logprobs=True, top_logprobs=2)
    for i in range(2):
        assert (_joined(parts[i], "reasoning_content"), _joined(parts[i], "content")) == (REASONING_A, CONTENT_A)
        assert "".join(lps[i]) == raw and finish[i] == "stop"
    assert use.completion_tokens_details.reasoning_tokens == 12


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    "additionalProperties": False}}}]


def test_serve_tool_calls_after_thinking(served):
    for choice in ("auto", "required"):
        if choice == "required":
            pytest.importorskip("xgrammar")
        ch = _ask(served, "C", tools=TOOLS, tool_choice=choice, temperature=0).choices[0]
        assert _extra(ch.message, "reasoning_content") == "\nCall the tool." and ch.message.content is None
        assert ch.finish_reason == "tool_calls", ch
        (call,) = ch.message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Rome"}')
        parts, finish, _, _, _ = _streamed(served, "C", tools=TOOLS, tool_choice=choice, temperature=0)
        assert _joined(parts[0], "reasoning_content") == "\nCall the tool." and _joined(parts[0], "content") is None
        calls = [tc for f, v in parts[0] if f == "tool_calls" for tc in v]
        assert calls[0].function.name == "get_weather"
        assert "".join(tc.function.arguments or "" for tc in calls) == '{"city": "Rome"}'
        assert finish == {0: "tool_calls"}


def test_serve_completions_stay_raw_text(served):
    r = served.completions.create(model=NAME, prompt="Hi A", max_tokens=40, temperature=0)
    assert r.choices[0].text == "<think>" + REASONING_A + "</think>\n\n" + CONTENT_A
    assert r.usage.completion_tokens_details is None
