"""Tool calling (``tools`` / ``tool_choice`` on /v1/chat/completions) in DeepSeek-V3's format: the parser
of tool-call blocks (whole and streamed), request validation, the chat template with tool history, the
grammar that forces a call, then a real ``dsv3 serve`` driven with the ``openai`` client ("required" and
a named function give calls whose arguments keep to the schema, streamed as tool_call deltas)."""

import json

import pytest

from dsv3.infer.openai_protocol import APIError, ChatCompletionRequest, validate
from dsv3.infer.tool_calls import (CALLS_BEGIN, CALLS_END, ToolCallStream, parse_tool_calls, render_call,
                                   tool_call_grammar)

WEATHER = {"type": "object",
           "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7},
                          "metric": {"type": "boolean"}},
           "required": ["city", "days", "metric"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get-time"}}]


def valid_weather(args: dict) -> bool:
    return (set(args) == {"city", "days", "metric"} and args["city"] in ("Paris", "Rome", "Oslo")
            and isinstance(args["days"], int) and not isinstance(args["days"], bool) and 1 <= args["days"] <= 7
            and isinstance(args["metric"], bool))


def block(*calls) -> str:
    return CALLS_BEGIN + "\n".join(render_call(n, a) for n, a in calls) + CALLS_END


# --------------------------------------------------------------------------------------- the parser
def test_parse_calls_and_content_before():
    text = block(("get_weather", '{"city": "Rome", "days": 2, "metric": true}'), ("get-time", "{}"))
    content, calls = parse_tool_calls(text)
    assert content is None and [c["function"] for c in calls] == [
        {"name": "get_weather", "arguments": '{"city": "Rome", "days": 2, "metric": true}'},
        {"name": "get-time", "arguments": "{}"}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert calls[0]["id"] != calls[1]["id"]
    content, calls = parse_tool_calls("Let me look.\n" + block(("f", '{"a": [1, {"b": "```"}]}')))
    assert content == "Let me look.\n" and json.loads(calls[0]["function"]["arguments"]) == {"a": [1, {"b": "```"}]}
    assert parse_tool_calls("  \n" + block(("f", "{}")) + "\n")[0] is None            # whitespace: no content
    no_end = CALLS_BEGIN + render_call("f", '{"x": 1}')                               # cut before calls_end
    assert parse_tool_calls(no_end)[1][0]["function"]["name"] == "f"


@pytest.mark.parametrize("text", [
    "no block at all",
    block(("f", "{not json")),
    block(("f", "[1, 2]")),                                                # arguments not an object
    block(("f", "{}")) + " and then more",                                 # text after the block
    CALLS_BEGIN + render_call("f", "{}").replace("function", "retrieval", 1) + CALLS_END,
    CALLS_BEGIN + render_call("f", '{"a": 1}')[:-5],                        # cut inside a call
    CALLS_BEGIN + CALLS_END,                                               # no calls
    CALLS_BEGIN + "garbage" + CALLS_END,
    block(("", "{}")),
])
def test_malformed_blocks_are_plain_content(text):
    assert parse_tool_calls(text) == (text, None)


def _stream(sp: ToolCallStream, text: str, step: int):
    """(content, tool-call deltas, calls) of ``text`` fed to ``sp`` ``step`` characters at a time, and the
    deltas that came before finish()."""
    content, deltas = "", []
    for i in range(0, len(text), step):
        c, d = sp.feed(text[i:i + step])
        content, deltas = content + c, deltas + d
    early = list(deltas)
    rest, last, calls = sp.finish()
    return content + rest, deltas + last, calls, early


def test_stream_holds_back_only_what_may_begin_a_block():
    text = "Sure <｜tool no marker here " + block(("get_weather", '{"city": "Oslo", "days": 1, "metric": false}'))
    for step in (1, 3, 7, len(text)):
        sp, sent = ToolCallStream(), ""
        for i in range(0, len(text), step):
            sent += sp.feed(text[i:i + step])[0]
        rest, _, calls = sp.finish()
        assert sent == "Sure <｜tool no marker here " and rest == "" and calls[0]["function"]["name"] == "get_weather"
    sp = ToolCallStream()
    assert sp.feed("a <｜tool▁ca") == ("a ", []) and sp.feed("t") == ("<｜tool▁cat", [])
    assert sp.finish() == ("", [], None)
    for bad in ("x" + CALLS_BEGIN + render_call("f", "{}").replace("function", "retrieval", 1) + CALLS_END,
                "x" + block(("", "{}")), "x" + CALLS_BEGIN + "garbage" + CALLS_END):
        assert _stream(ToolCallStream(), bad, 5)[:3] == (bad, [], None)     # a malformed block comes back as content


@pytest.mark.parametrize("text", [
    block(("get_weather", '{"city": "Rome", "days": 2, "metric": true}'), ("get-time", "{}")),
    "Let me look.\n" + block(("f", '{"a": [1, {"b": "```"}], "s": "x\\n```", "t": "  "}')),
    CALLS_BEGIN + render_call(" f ", '  \n {"x": 1}  \n\n').replace("```json", "```") + "\n" + CALLS_END,
    CALLS_BEGIN + render_call("f", '{"x": 1}'),                        # cut before the block's end: still calls
])
def test_stream_sends_arguments_as_they_come(text):
    """Each call: a first delta with index, id, type and name (arguments ""), then fragments of its arguments
    only (index and arguments) as the text arrives, never whitespace or a fence that the whole answer's
    arguments leave out: joined they are exactly parse_tool_calls' arguments, whatever the pieces."""
    content, want = parse_tool_calls(text)
    for step in (1, 2, 5, 11):
        got, deltas, calls, early = _stream(ToolCallStream(), text, step)
        assert (got if got.strip() else None) == content
        assert [c["function"] for c in calls] == [c["function"] for c in want]
        for k, call in enumerate(calls):
            mine = [d for d in deltas if d["index"] == k]
            assert mine[0] == {"index": k, "id": call["id"], "type": "function",
                               "function": {"name": call["function"]["name"], "arguments": ""}}
            assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in mine[1:])
            assert "".join(d["function"]["arguments"] for d in mine) == call["function"]["arguments"]
            if step == 1:                                # one character a time: they came as they were written
                assert len(mine) > 1 and mine == [d for d in early if d["index"] == k]


def test_stream_of_a_call_cut_off_keeps_what_was_sent():
    """A call whose arguments have gone out cannot be taken back: when the block turns out malformed (cut off
    inside the arguments, as by max_tokens) the fragments sent stay, the rest of the text is content and
    there are no calls."""
    text = CALLS_BEGIN + render_call("f", '{"a": 1, "b": 2}')[:-len("2}\n```<｜tool▁call▁end｜>")] + " \n"
    got, deltas, calls, _ = _stream(ToolCallStream(), text, 3)
    assert calls is None and deltas[0]["function"]["name"] == "f"
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"a": 1, "b":' and got == "  \n"


# --------------------------------------------------------------------------------------- requests
def _req(**kw) -> ChatCompletionRequest:
    return validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **kw})


def _bad(param, words, **kw):
    with pytest.raises(APIError) as e:
        r = _req(**kw)
        r.check_features()
        r.tool_setup()
        r.chat_messages()
    assert e.value.status == 400 and e.value.param == param and words in e.value.message, e.value.message


def test_tool_choice_defaults_and_values():
    tools, choice = _req(tools=TOOLS).tool_setup()
    assert choice == "auto" and [t["function"]["name"] for t in tools] == ["get_weather", "get-time"]
    assert tools[1] == {"type": "function", "function": {"name": "get-time"}}
    assert _req(tools=TOOLS, tool_choice="none").tool_setup() == (None, "none")
    assert _req().tool_setup() == (None, "none") == _req(tool_choice="none", tools=None).tool_setup()
    assert _req(tools=TOOLS, tool_choice="required").tool_setup()[1] == "required"
    named = {"type": "function", "function": {"name": "get-time"}}
    assert _req(tools=TOOLS, tool_choice=named, parallel_tool_calls=False).tool_setup()[1] == named


@pytest.mark.parametrize("kw,param,words", [
    (dict(tools=[TOOLS[1], TOOLS[1]]), "tools[1].function.name", "given twice"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools[0].function.name", "pattern"),
    (dict(tools=[{"type": "function", "function": {"name": "x" * 65}}]), "tools[0].function.name", "pattern"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools[0].function.parameters", "object"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
     "tools[0].function.parameters", "dictionary"),
    (dict(tools=[{"type": "code_interpreter"}]), "tools[0].type", "function"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice", "none"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice.function.name",
     "not one of the tools"),
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(functions=[{"name": "f"}]), "functions", "deprecated"),
    (dict(messages=[{"role": "tool", "content": "r"}]), "messages[0].tool_call_id", "required"),
    (dict(messages=[{"role": "user", "content": "r", "tool_call_id": "c"}]), "messages[0].tool_call_id",
     "only allowed"),
    (dict(messages=[{"role": "user", "content": "r", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), "messages[0].tool_calls",
     "only allowed"),
    (dict(messages=[{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]),
     "messages[0].tool_calls[0].function.arguments", "not valid JSON"),
])
def test_bad_tool_requests_are_400s_naming_the_field(kw, param, words):
    _bad(param, words, **kw)


def test_history_messages_as_template_dicts():
    call = {"id": "call_1", "type": "function", "function": {"name": "get-time", "arguments": "{}"}}
    r = _req(messages=[{"role": "user", "content": "time?"},
                       {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
                       {"role": "tool", "content": [{"type": "text", "text": "12:00"}], "tool_call_id": "call_1"}])
    assert r.chat_messages()[1:] == [{"role": "assistant", "content": None, "tool_calls": [call]},
                                     {"role": "tool", "content": "12:00", "tool_call_id": "call_1"}]


# --------------------------------------------------------------------------------------- the template
def test_default_template_writes_deepseek_tool_turns_and_describes_tools():
    from dsv3.infer.chat_template import DEFAULT_TEMPLATE, ChatTemplate

    t = ChatTemplate(DEFAULT_TEMPLATE, "<B>", "<E>")
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    msgs = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "Let me see.", "tool_calls": calls},
            {"role": "tool", "content": "R1", "tool_call_id": "a"}, {"role": "tool", "content": "R2", "tool_call_id": "b"}]
    outputs = ("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>R1<｜tool▁output▁end｜>\n"
               "<｜tool▁output▁begin｜>R2<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    head = ("<B><｜User｜>U<｜Assistant｜>Let me see." + block(("f", '{"x": 1}'), ("g", "{}")) + "<E>" + outputs)
    assert t.render(msgs) == head                 # after tool outputs the model answers without <｜Assistant｜>
    assert t.render(msgs + [{"role": "assistant", "content": "Done."}, {"role": "user", "content": "V"}]) == \
        head + "Done.<E><｜User｜>V<｜Assistant｜>"
    text = t.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tools=TOOLS)
    assert text.startswith("<B>S\n\n## Tools\n") and text.endswith("<｜User｜>U<｜Assistant｜>")
    assert "### get_weather\nDescription: The forecast for a city.\nParameters: " + json.dumps(WEATHER) in text
    assert "### get-time\nParameters: " in text and CALLS_BEGIN in text


def test_a_template_that_knows_tools_renders_them_itself():
    from dsv3.infer.chat_template import ChatTemplate

    t = ChatTemplate("{% for x in tools or [] %}[{{ x.function.name }}]{% endfor %}"
                     "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}")
    assert t.knows_tools and t.render([{"role": "user", "content": "U"}], tools=TOOLS) == \
        "[get_weather][get-time]user:U;"
    plain = ChatTemplate("{% for m in messages %}{{ m.role }}:{{ m.content[:8] }};{% endfor %}")
    assert plain.render([{"role": "user", "content": "U"}], tools=TOOLS) == "system:## Tools;user:U;"


# --------------------------------------------------------------------------------------- the grammar
def test_grammar_forces_one_call_of_the_chosen_function():
    pytest.importorskip("xgrammar")
    from dsv3.infer.structured import Grammars
    from test_structured_output import _tokenizer

    tok = _tokenizer()
    g = Grammars(tok, 300)
    good = block(("get_weather", '{"city": "Rome", "days": 3, "metric": false}'))
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        c = g.matcher(tool_call_grammar(TOOLS, choice), {tok.eos_id})
        assert all(c.accept(t) for t in tok.encode(good)) and c.accept(tok.eos_id) and c.terminated
    c = g.matcher(tool_call_grammar(TOOLS, "required"), {tok.eos_id})
    assert all(c.accept(t) for t in tok.encode(block(("get-time", '{"any": [1]}'))))     # no parameters: any object
    named = tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "get-time"}})
    c = g.matcher(named, {tok.eos_id})
    assert not all(c.accept(t) for t in tok.encode(CALLS_BEGIN + render_call("get_weather", "{}")))
    c = g.matcher(tool_call_grammar(TOOLS, "required"), {tok.eos_id})
    ids = tok.encode(block(("get_weather", '{"city": "Rome", "days": 9, "metric": false}')))
    assert not all(c.accept(t) for t in ids)                                              # days > 7
    # "required": up to MAX_FORCED_CALLS calls, one with parallel_tool_calls false; named: exactly one
    from dsv3.infer.tool_calls import MAX_FORCED_CALLS

    for choice, parallel, most in (("required", True, MAX_FORCED_CALLS), ("required", False, 1),
                                   ({"type": "function", "function": {"name": "get-time"}}, True, 1)):
        spec = tool_call_grammar(TOOLS, choice, parallel)
        for k in range(1, MAX_FORCED_CALLS + 2):
            c = g.matcher(spec, {tok.eos_id})
            ok = all(c.accept(t) for t in tok.encode(block(*[("get-time", "{}")] * k))) and c.accept(tok.eos_id)
            assert ok == (k <= most), (choice, parallel, k)


# --------------------------------------------------------------------------------------- dsv3 serve
try:
    import openai
except ImportError:
    openai = None
KEY, NAME = "sk-test", "tool-model"


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, data_dir):
    """A random model (the corpus tokenizer, 2048 positions: the tools' description and the call markers are long)."""
    from helpers import save_corpus_model

    return save_corpus_model(tmp_path_factory.mktemp("tool_model"), data_dir, max_positions=2048)


@pytest.fixture(scope="module", params=["plain", "speculative"])
def served(request, tool_model, tmp_path_factory):
    """The model behind dsv3 serve, decoding one token a step or two with MTP drafts (--speculative)."""
    from helpers import serve_plain_or_speculative

    with serve_plain_or_speculative(request.param, tool_model, tmp_path_factory.mktemp("serve_tools"), NAME, KEY,
                                    timeout=300) as client:
        yield client

MESSAGES = [{"role": "user", "content": "What is the weather in Rome?"}]


# tools whose arguments are bounded: a random model fills an unconstrained object ("get-time") until max_tokens
BOUNDED = [TOOLS[0], {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}]


def _chat(client, **kw):
    return client.chat.completions.create(model=NAME, messages=kw.pop("messages", MESSAGES),
                                          tools=kw.pop("tools", TOOLS),
                                          max_tokens=kw.pop("max_tokens", 400), **kw)


def test_serve_named_and_required_tool_choice_give_valid_calls(served):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = _chat(served, tool_choice=named, n=3, temperature=1.0, seed=1)
    r0 = _chat(served, tool_choice=named, temperature=0)
    for ch in r.choices + r0.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
        (call,) = ch.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        assert valid_weather(json.loads(call.function.arguments)), call.function.arguments
    for parallel in (None, False):
        r = _chat(served, tools=BOUNDED, tool_choice="required", n=4, temperature=1.0, seed=2,
                  parallel_tool_calls=parallel, max_tokens=1400)
        for ch in r.choices:
            assert ch.finish_reason == "tool_calls", ch
            assert 1 <= len(ch.message.tool_calls) <= (1 if parallel is False else 4)
            assert len({c.id for c in ch.message.tool_calls}) == len(ch.message.tool_calls)
            for call in ch.message.tool_calls:
                args = json.loads(call.function.arguments)
                assert call.function.name in ("get_weather", "get_time")
                assert valid_weather(args) if call.function.name == "get_weather" else \
                    args in ({"tz": "UTC"}, {"tz": "CET"})


def test_serve_streamed_call_arguments_come_in_fragments(served):
    """Streamed, a call goes out as OpenAI's do: the first tool_calls delta has its index, id and name, then
    its arguments come in fragments, chunk by chunk as the model writes them (not at the end in one piece);
    joined they are the arguments of the same request not streamed."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = _chat(served, tool_choice=named, temperature=0).choices[0]
    chunks = list(_chat(served, tool_choice=named, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].index == 0 and calls[0].id.startswith("call_") and calls[0].type == "function"
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == ""
    assert all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in calls[1:])
    # in fragments (a token or two each, unless the server fell behind the engine), one delta a chunk
    assert len(calls) >= 3 and all(len(d.tool_calls or []) <= 1 for d in deltas), calls
    assert "".join(tc.function.arguments for tc in calls) == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    chunks = list(_chat(served, tools=BOUNDED, tool_choice="required", n=2, temperature=1.0, seed=4, stream=True))
    for i in range(2):                                  # each choice gets its own calls and finish
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        calls = [tc for ch in mine for tc in (ch.delta.tool_calls or [])]
        firsts = [tc for tc in calls if tc.id is not None]
        assert 1 <= len(firsts) <= 4 and [tc.index for tc in firsts] == list(range(len(firsts)))
        for k, first in enumerate(firsts):
            args = "".join(tc.function.arguments for tc in calls if tc.index == k)
            assert first.function.name in ("get_weather", "get_time") and isinstance(json.loads(args), dict)
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == ["tool_calls"]


def test_serve_auto_and_none_stream_text_as_before(served):
    prompt = {}
    for choice in ("auto", "none"):
        r = _chat(served, tool_choice=choice, temperature=0, max_tokens=24)
        whole, prompt[choice] = r.choices[0], r.usage.prompt_tokens
        chunks = list(_chat(served, tool_choice=choice, temperature=0, max_tokens=24, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        if whole.message.tool_calls is None:      # a random model: almost surely no call
            assert text == whole.message.content and whole.finish_reason in ("stop", "length")
            assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert prompt["none"] + 100 < prompt["auto"]        # "none": the tools are not described to the model


def test_serve_tool_history_round_trip(served):
    named = {"type": "function", "function": {"name": "get_time"}}
    first = _chat(served, tools=BOUNDED, tool_choice=named, temperature=0).choices[0]
    assert first.finish_reason == "tool_calls", first
    call = first.message.tool_calls[0]
    history = MESSAGES + [first.message.model_dump(exclude_none=False),
                          {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    r = _chat(served, tools=BOUNDED, messages=history, temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 40


@pytest.mark.parametrize("kw,param,words", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice.function.name",
     "not one of"),
    (dict(tool_choice="required", response_format={"type": "json_object"}), "tool_choice", "response_format"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 5, "maximum": 1}}}}}], tool_choice="required"), "tools",
     "minimum greater than maximum"),
])
def test_serve_bad_tool_requests_are_400s(served, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        served.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, **{"tools": TOOLS, **kw})
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


def test_tool_markers_are_text_even_where_the_tokenizer_calls_them_special():
    """A tokenizer with DeepSeek-V3's markers as special added tokens: they come out as text (the parser
    reads them) and a tool-call grammar may pick each as one token."""
    pytest.importorskip("xgrammar")
    from tokenizers import AddedToken

    from dsv3.infer.detokenize import IncrementalText, TokenBytes
    from dsv3.infer.structured import Grammars, allowed_tokens, new_bitmask
    from dsv3.infer.tool_calls import CALL_BEGIN, MARKERS
    from test_structured_output import _tokenizer

    tok = _tokenizer()
    tok.hf.add_special_tokens([AddedToken(m, special=True) for m in sorted(MARKERS)])
    begin = tok.hf.token_to_id(CALLS_BEGIN)
    assert begin is not None and tok.encode(CALLS_BEGIN) == [begin]
    tb = TokenBytes(tok)
    assert begin not in tb.special and tok.eos_id in tb.special
    inc = IncrementalText(tb)
    assert "".join(inc.push(t) for t in tok.encode(block(("f", "{}"))) + [tok.eos_id]) == block(("f", "{}"))
    c = Grammars(tok, 300).matcher(tool_call_grammar(TOOLS, "required"), {tok.eos_id})
    bm = new_bitmask(1, 300)
    c.fill(bm, 0)
    assert allowed_tokens(bm, 300)[0, begin]
    assert c.accept(begin) and c.accept(tok.hf.token_to_id(CALL_BEGIN))


def _unigram_tokenizer():
    """A real tokenizer that is not byte-level (a Unigram model with SentencePiece's Metaspace pre-tokenizer and
    decoder, which write spaces as "▁"), with bos / eos and DeepSeek-V3's tool-call markers as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from dsv3.data.tokenizer import Tokenizer as DsTokenizer
    from dsv3.infer.tool_calls import MARKERS

    pieces = ["<unk>", "▁", "▁Let", "▁me", "▁look", "```", "json", "function", "get_weather", "city"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzRP{}\":,.`_-0123456789\n") - set(pieces))
    hf = Tokenizer(models.Unigram([(p, -1.0) for p in pieces] + [(c, -3.0) for c in chars], unk_id=0,
                                  byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.add_special_tokens([AddedToken(t, special=True)
                           for t in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")])
    hf.add_special_tokens([AddedToken(m, special=True) for m in sorted(MARKERS)])
    return DsTokenizer(hf)


def test_non_byte_level_detokenizer_keeps_the_tool_call_markers():
    """The detokenizer's fallback (a tokenizer that is not byte-level) writes the tool-call markers out as
    themselves, token by token, so the answer parses as a call; bos and eos still give no text; a marker's
    logprob text is the marker."""
    from dsv3.infer.detokenize import IncrementalText, TokenBytes
    from dsv3.infer.tool_calls import MARKERS

    tok = _unigram_tokenizer()
    args = '{"city": "Paris"}'
    text = "Let me look." + block(("get_weather", args))
    ids = tok.encode(text)
    tb = TokenBytes(tok)
    assert tb.table is None and {tok.bos_id, tok.eos_id} <= tb.special
    begin = tok.hf.token_to_id(CALLS_BEGIN)
    assert begin in ids and tb.token_str(begin) == CALLS_BEGIN
    assert tok.decode(ids) != text                         # the tokenizer's own decoding garbles the markers
    inc = IncrementalText(tb)
    out = "".join(inc.push(t) for t in [tok.bos_id, *ids, tok.eos_id]) + inc.flush()
    assert all(out.count(m) == text.count(m) for m in MARKERS), out
    assert "begin▁of" not in out and "end▁of" not in out and out.startswith("Let me look."), out
    content, calls = parse_tool_calls(out)
    assert content == "Let me look." and len(calls) == 1, out
    assert calls[0]["function"] == {"name": "get_weather", "arguments": args}
