"""``POST /v1/responses`` (OpenAI's Responses API, stateless) of a real ``dsv3 serve``, driven with the official
``openai`` client: text and message-list input, ``max_output_tokens`` (incomplete), streamed events against
the whole answer, forced function calls (whole, streamed, sent back as history), ``text.format``, the reasoning
item with ``--reasoning-parser``, and bad requests answered 4xx in OpenAI's shape while the server keeps
serving. Three servers: a random model without end of sentence (runs to max_output_tokens), and a scripted
model (a bigram model that writes known answers) without and with the reasoning parser."""

import json
import time

import pytest

from dsv3.infer.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

KEY, NAME = "sk-resp", "resp-model"
ARGS = '{"city": "Rome", "days": 2}'
SCRIPTS = {
    "T": ["Hello", " from", " the", " script."],                         # plain text
    "W": [CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_weather\n```json\n", '{"city": ', '"Rome", ',
          '"days": 2}', "\n```" + CALL_END + CALLS_END],                 # a call, its arguments in three tokens
    "J": ['{"a": ', "1}"],                                              # JSON
    "A": ["<think>", "\nThe user says hi.", "</thi", "nk>", "\n\n", "Hi", " there!"],   # R1-style thinking
    "C": ["<think>\n", "Call it.", "</think>\n\n", CALLS_BEGIN + CALL_BEGIN + "function" + SEP
          + "get_time\n```json\n", '{"tz": "UTC"}', "\n```", CALL_END + CALLS_END],
}
TEXT_T = "Hello from the script."
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The forecast.", "parameters": WEATHER,
          "strict": True},
         {"type": "function", "name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"enum": ["UTC"]}}, "required": ["tz"],
             "additionalProperties": False}}]


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    """A random model with no end of sentence: every answer runs to its max_output_tokens."""
    from helpers import save_served_model, serve_openai

    model = save_served_model(tmp_path_factory.mktemp("resp_random"), 3, max_position_embeddings=1024)
    with serve_openai(model, tmp_path_factory.mktemp("serve_resp_random"), NAME, KEY) as client:
        yield client


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory):
    from helpers import save_scripted_model

    out = tmp_path_factory.mktemp("resp_script")
    save_scripted_model(out, SCRIPTS)
    return str(out)


@pytest.fixture(scope="module")
def scripted(scripted_dir, tmp_path_factory):
    from helpers import serve_openai

    with serve_openai(scripted_dir, tmp_path_factory.mktemp("serve_resp_script"), NAME, KEY) as client:
        yield client


@pytest.fixture(scope="module")
def thinking(scripted_dir, tmp_path_factory):
    from helpers import serve_openai

    with serve_openai(scripted_dir, tmp_path_factory.mktemp("serve_resp_r1"), NAME, KEY,
                      "--reasoning-parser", "deepseek_r1") as client:
        yield client


def _events(client, **kw) -> list:
    return list(client.responses.create(model=NAME, stream=True, **kw))


def _check_sequence(events) -> None:
    """Numbered 0, 1, …; created and in_progress first; one response id; every item added before its
    deltas and done after them."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    open_items = {}
    for e in events:
        if e.type == "response.output_item.added":
            assert e.output_index not in open_items
            open_items[e.output_index] = e.item.id
        elif e.type == "response.output_item.done":
            assert open_items.pop(e.output_index) == e.item.id
        elif hasattr(e, "item_id"):
            assert open_items.get(e.output_index) == e.item_id, e
    assert not open_items


def _final(events):
    assert events[-1].type in ("response.completed", "response.incomplete")
    return events[-1].response


# --------------------------------------------------------------------------------------- without a server
def _build(text: str, finish: str, reasoning: bool = False, tools: bool = True, step: int = 3):
    """(events, response) of ``text`` fed ``step`` characters at a time through AnswerStream and
    ResponseBuilder, as the server streams an answer."""
    from dsv3.infer.answer_parts import AnswerStream
    from dsv3.infer.openai_responses import ResponseBuilder

    a, b = AnswerStream(reasoning, tools), ResponseBuilder({"id": "resp_x", "object": "response"})
    events = b.start()
    for i in range(0, len(text), step):
        events += b.feed(a.feed(text[i:i + step]))
    parts, calls = a.finish()
    more, response = b.finish(parts, calls, finish, {"input_tokens": 1})
    return events + more, response


def test_builder_items_and_statuses():
    call = CALL_BEGIN + "function" + SEP + "f\n```json\n" + '{"x": [1, 2]}' + "\n```" + CALL_END
    events, r = _build("Let me look. " + CALLS_BEGIN + call + "\n" + call.replace("f\n", "g\n") + CALLS_END, "stop")
    assert [(o["type"], o["status"]) for o in r["output"]] == [("message", "completed"), ("function_call", "completed"),
                                                              ("function_call", "completed")]
    assert r["status"] == "completed" and r["output"][0]["content"][0]["text"] == "Let me look. "
    assert [o.get("name") for o in r["output"]] == [None, "f", "g"] and r["output"][2]["arguments"] == '{"x": [1, 2]}'
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2]
    events, r = _build(CALLS_BEGIN + call[:-30], "length")              # cut inside the arguments
    assert r["status"] == "incomplete" and r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [(o["type"], o["status"]) for o in r["output"]] == [("function_call", "incomplete")]
    assert events[-1]["type"] == "response.incomplete"
    _, r = _build("", "stop")                                          # nothing written: an empty message
    assert [(o["type"], o["content"][0]["text"]) for o in r["output"]] == [("message", "")]
    _, r = _build("<think>hm</think>", "stop", reasoning=True)        # only thinking, finished: and ""
    assert [o["type"] for o in r["output"]] == ["reasoning", "message"] and r["status"] == "completed"


# --------------------------------------------------------------------------------------- a random model
def test_text_input_streamed_equals_whole_and_max_output_tokens_is_incomplete(random_server):
    r = random_server.responses.create(model=NAME, input="Tell me a story", max_output_tokens=12, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == NAME
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (msg,) = r.output
    assert (msg.type, msg.role, msg.status) == ("message", "assistant", "incomplete") and msg.id.startswith("msg_")
    (part,) = msg.content
    assert part.type == "output_text" and part.annotations == [] and r.output_text == part.text != ""
    u = r.usage
    assert u.output_tokens == 12 and u.input_tokens > 3 and u.total_tokens == u.input_tokens + 12
    assert u.input_tokens_details.cached_tokens >= 0 and u.output_tokens_details.reasoning_tokens == 0
    assert (r.model_extra or {}).get("store") is False             # nothing is stored

    events = _events(random_server, input="Tell me a story", max_output_tokens=12, temperature=0)
    _check_sequence(events)
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"] and len(deltas) >= 1
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert "".join(e.delta for e in deltas) == events[-4].text == r.output_text
    final = _final(events)
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == r.output_text and final.usage.output_tokens == 12
    assert final.output[0].id == events[2].item.id == deltas[0].item_id


def test_message_list_and_instructions_render_as_chat(random_server):
    """instructions are a system message first; the items are the chat messages: the answer and the token
    counts equal chat completions' for the same messages (greedy)."""
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                                             {"type": "input_text", "text": "there"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
             {"role": "user", "content": "A story?"}]
    r = random_server.responses.create(model=NAME, input=items, instructions="You are a bard.", max_output_tokens=6,
                                       temperature=0)
    chat = random_server.chat.completions.create(
        model=NAME, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "You are a bard."}, {"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": "Hi\nthere"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "A story?"}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.instructions == "You are a bard."
    bare = random_server.responses.create(model=NAME, input=items, max_output_tokens=1)
    assert bare.usage.input_tokens < r.usage.input_tokens


def test_a_client_that_goes_away_aborts_its_stream(random_server):
    import httpx

    url = str(random_server.base_url).rstrip("/").removesuffix("/v1")
    stream = random_server.responses.create(model=NAME, input="long", max_output_tokens=900, stream=True)
    it = iter(stream)
    for _ in range(4):
        next(it)
    assert httpx.get(url + "/health").json()["running"] >= 1
    stream.close()
    t0 = time.time()
    while httpx.get(url + "/health").json()["running"]:
        assert time.time() - t0 < 5, "the request went on after its client left"
        time.sleep(0.05)


@pytest.mark.parametrize("kw,param,words", [
    (dict(extra_body={"frobnicate": 1}), "frobnicate", "unrecognized"),
    (dict(previous_response_id="resp_abc"), "previous_response_id", "stores no responses"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "name": "nope"}), "tool_choice.name", "not one of"),
    (dict(tools=TOOLS, tool_choice={"type": "mcp", "server_label": "x"}), "tool_choice.type", "function"),
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(tools=[{"type": "web_search"}]), "tools[0].type", "function"),
    (dict(tools=TOOLS + [TOOLS[0]]), "tools[2].name", "twice"),
    (dict(tools=TOOLS, tool_choice="required", text={"format": {"type": "json_object"}}), "tool_choice",
     "text.format"),
    (dict(text={"format": {"type": "json_schema", "name": "x"}}), "text.format.schema", "missing"),
    (dict(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "integer", "minimum": 5,
                                                                            "maximum": 1}}}),
     "text.format.schema", "minimum"),
    (dict(input=[]), "input", "empty"),
    (dict(input=[{"type": "image_generation_call", "id": "x"}]), "input[0]", "function_call_output"),
    (dict(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]),
     "input[0].arguments", "JSON"),
    (dict(max_output_tokens=0), "max_output_tokens", "greater than"),
    (dict(max_output_tokens=5000), "max_output_tokens", "context length"),
    (dict(stream_options={"include_obfuscation": True}, stream=True), "stream_options", "obfuscation"),
    (dict(metadata={f"k{i}": "v" for i in range(17)}), "metadata", "16"),
])
def test_bad_requests_are_openai_shaped_400s(random_server, kw, param, words):
    kw = {"input": "x", **kw}
    with pytest.raises(openai.BadRequestError) as e:
        random_server.responses.create(model=NAME, max_output_tokens=kw.pop("max_output_tokens", 2), **kw)
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert body["param"] == param and words in body["message"], body


def test_the_server_keeps_serving_after_refusals(random_server):
    with pytest.raises(openai.NotFoundError):                       # nothing is stored to retrieve
        random_server.responses.retrieve("resp_abc")
    with pytest.raises(openai.NotFoundError) as e:
        random_server.responses.create(model="other", input="x")
    assert e.value.body["param"] == "model"
    r = random_server.responses.create(model=NAME, input="x", max_output_tokens=2, store=True, metadata={"a": "b"},
                                       user="u1", top_p=0.9, temperature=0.5, extra_body={"seed": 7, "top_k": 5})
    again = random_server.responses.create(model=NAME, input="x", max_output_tokens=2, temperature=0.5, top_p=0.9,
                                           extra_body={"seed": 7, "top_k": 5})
    assert r.status == "incomplete" and r.metadata == {"a": "b"} and r.user == "u1"
    assert (r.model_extra or {}).get("store") is False and r.output_text == again.output_text   # seeded


# --------------------------------------------------------------------------------------- a scripted model
def test_a_finished_answer_is_completed(scripted):
    r = scripted.responses.create(model=NAME, input="Say T", temperature=0)
    assert r.status == "completed" and r.incomplete_details is None and r.output_text == TEXT_T
    assert [(o.type, o.status) for o in r.output] == [("message", "completed")]
    assert r.usage.output_tokens == 5                               # four pieces and the end of sentence
    with scripted.responses.stream(model=NAME, input="Say T", temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == TEXT_T and final.status == "completed" and final.output_text == TEXT_T


def test_forced_function_calls(scripted):
    for choice in ("required", {"type": "function", "name": "get_weather"}, "auto"):
        r = scripted.responses.create(model=NAME, input="Weather W", tools=TOOLS, tool_choice=choice, temperature=0)
        assert r.status == "completed" and r.output_text == "", (choice, r.output)
        (call,) = r.output
        assert call.type == "function_call" and call.name == "get_weather" and call.arguments == ARGS
        assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
        assert r.tool_choice == choice or r.tool_choice.name == "get_weather"
        assert [t.name for t in r.tools] == ["get_weather", "get_time"]
    r = scripted.responses.create(model=NAME, input="Weather W", tools=TOOLS, tool_choice="required",
                                  parallel_tool_calls=False, temperature=1.0)
    assert [o.type for o in r.output] == ["function_call"] and json.loads(r.output[0].arguments) == json.loads(ARGS)
    assert r.parallel_tool_calls is False


def test_streamed_function_call_arguments(scripted):
    whole = scripted.responses.create(model=NAME, input="Weather W", tools=TOOLS, tool_choice="required",
                                      temperature=0)
    events = _events(scripted, input="Weather W", tools=TOOLS, tool_choice="required", temperature=0)
    _check_sequence(events)
    added = events[2]
    assert added.type == "response.output_item.added" and added.item.type == "function_call"
    assert added.item.name == "get_weather" and added.item.arguments == "" and added.item.status == "in_progress"
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) >= 2 and "".join(e.delta for e in deltas) == ARGS      # in pieces, as the model writes them
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == ARGS and done.item_id == added.item.id
    assert not any("output_text" in e.type for e in events)
    final = _final(events)
    assert final.status == "completed" and [(o.type, o.arguments, o.call_id) for o in final.output] == \
        [("function_call", ARGS, added.item.call_id)]
    assert final.usage.output_tokens == whole.usage.output_tokens
    with scripted.responses.stream(model=NAME, input="Weather W", tools=TOOLS, tool_choice="required") as stream:
        for _ in stream:
            pass
        assert stream.get_final_response().output[0].arguments == ARGS


def test_function_call_history_round_trip(scripted):
    """The answer's items sent back as input with the call's output (its last character the trigger T): the
    model answers after the tool result."""
    asked = [{"role": "user", "content": "Weather W"}]
    first = scripted.responses.create(model=NAME, input=asked, tools=TOOLS, tool_choice="required", temperature=0)
    call = first.output[0]
    then = asked + first.output + [{"type": "function_call_output", "call_id": call.call_id,
                                    "output": "sunny, 21 C, say T"}]
    r = scripted.responses.create(model=NAME, input=then, tools=TOOLS, temperature=0)
    assert r.output_text == TEXT_T and r.usage.input_tokens > first.usage.input_tokens


def test_text_format_json_schema(scripted):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "a_number", "schema": schema, "strict": True}
    r = scripted.responses.create(model=NAME, input="JSON J", text={"format": fmt}, temperature=0)
    assert r.output_text == '{"a": 1}' and r.status == "completed" and r.text.format.type == "json_schema"
    r = scripted.responses.create(model=NAME, input="JSON J", text={"format": {"type": "json_object"}})
    assert r.output_text == '{"a": 1}'
    # the script wants plain text: the grammar makes it JSON that keeps to the schema, whole and streamed
    bounded = {"type": "object", "properties": {"w": {"enum": ["yes", "no"]}}, "required": ["w"],
               "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "yn", "schema": bounded}
    r = scripted.responses.create(model=NAME, input="Say T", text={"format": fmt}, temperature=0, max_output_tokens=40)
    assert r.status == "completed" and json.loads(r.output_text)["w"] in ("yes", "no")
    events = _events(scripted, input="Say T", text={"format": fmt}, temperature=0, max_output_tokens=40)
    assert _final(events).output_text == r.output_text


# --------------------------------------------------------------------------------------- --reasoning-parser
def test_reasoning_item_whole_and_streamed(thinking):
    r = thinking.responses.create(model=NAME, input="Hi A", temperature=0)
    assert r.status == "completed" and [o.type for o in r.output] == ["reasoning", "message"]
    rs = r.output[0]
    assert rs.id.startswith("rs_") and rs.summary == [] and [(c.type, c.text) for c in rs.content] == \
        [("reasoning_text", "\nThe user says hi.")]
    assert r.output_text == "Hi there!"
    assert r.usage.output_tokens == 8 and r.usage.output_tokens_details.reasoning_tokens == 4   # and eos
    events = _events(thinking, input="Hi A", temperature=0)
    _check_sequence(events)
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (thought, text) == ("\nThe user says hi.", "Hi there!")
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["reasoning", "message"]
    final = _final(events)
    assert final.output[0].content[0].text == thought and final.output_text == text
    assert final.usage.output_tokens_details.reasoning_tokens == 4
    # the answer with its reasoning sent back: the reasoning item is dropped from the prompt
    r2 = thinking.responses.create(model=NAME, input=[{"role": "user", "content": "Hi"}] + r.output
                                   + [{"role": "user", "content": "again A"}], temperature=0)
    assert r2.output_text == "Hi there!"


def test_reasoning_then_a_call(thinking):
    r = thinking.responses.create(model=NAME, input="Go C", tools=TOOLS, temperature=0, max_output_tokens=60)
    assert [o.type for o in r.output] == ["reasoning", "function_call"], r.output
    assert r.output[0].content[0].text == "\nCall it." and r.output[1].arguments == '{"tz": "UTC"}'
    events = _events(thinking, input="Go C", tools=TOOLS, tool_choice="required", temperature=0,
                     max_output_tokens=60)
    _check_sequence(events)
    final = _final(events)
    assert [o.type for o in final.output] == ["reasoning", "function_call"] and final.status == "completed"
    assert final.output[1].arguments == r.output[1].arguments
    cut = thinking.responses.create(model=NAME, input="Go C", max_output_tokens=2, temperature=0)
    assert cut.status == "incomplete" and [(o.type, o.status) for o in cut.output] == [("reasoning", "incomplete")]
    assert cut.output_text == "" and cut.output[0].content[0].text == "\nCall it."
