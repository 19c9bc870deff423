"""The OpenAI API's request bodies, their validation, and its error shape, for ``dsv3 serve``.

A request body goes through :func:`parse_body` (strict UTF-8, JSON, no lone surrogates, a JSON
object) and then :func:`validate` against one of the pydantic models below. The models are strict
(``"3"`` is not an integer, ``true`` is not a number), finite (``NaN``, ``Infinity`` and ``1e400``,
which Python's JSON parser turns into ``inf``, are refused) and closed (an argument the server does not
implement is an error, never silently ignored). Every failure is an :class:`APIError`, which the server
answers with OpenAI's error body::

    {"error": {"message": "temperature: Input should be less than or equal to 2",
               "type": "invalid_request_error", "param": "temperature", "code": null}}

Ranges follow OpenAI's documentation (temperature [0, 2], penalties [-2, 2], logit bias [-100, 100],
``logprobs`` / ``top_logprobs`` up to 20 as vLLM allows); ``top_k`` is an extension (0 or -1 = off).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

INT64_MIN, UINT64_MAX = -(2 ** 63), 2 ** 64 - 1
MAX_N = 16                  # choices per prompt (n, best_of)
MAX_STOP = 16               # stop strings per request
MAX_STOP_CHARS = 1024       # characters per stop string
MAX_LOGIT_BIAS = 1024       # logit_bias entries
MAX_LOGPROBS = 20


# --------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error for the client: HTTP ``status`` and OpenAI's ``{"error": {…}}`` body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or error_type(status)
        self.headers = headers               # extra HTTP headers of the answer (e.g. Retry-After)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_type(status: int) -> str:
    """OpenAI's ``type`` for an HTTP status (its API answers an unknown model or URL, a 404, with
    ``invalid_request_error``)."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --------------------------------------------------------------------------------------- bodies
def parse_body(raw: bytes) -> dict:
    """The JSON object in a request body; 400 for invalid UTF-8, invalid JSON, lone surrogates
    (``"\\ud800"`` is valid JSON but no text) or a body that is not an object. One leading UTF-8 byte
    order mark (which some clients and editors write) is skipped (RFC 8259 §8.1 lets parsers ignore it)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    if not text.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(text)
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    except ValueError as e:       # JSONDecodeError, and integers of more than 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {_json_type(body)}", code="invalid_json")
    try:
        bad = _surrogate_path(body, "")
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    if bad is not None:
        raise APIError(400, f"{bad or 'body'}: the string holds a lone UTF-16 surrogate (invalid Unicode)",
                       param=bad or None, code="invalid_unicode")
    return body


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _surrogate_path(v: Any, path: str) -> str | None:
    """The path of the first string (value or key) that cannot be encoded as UTF-8, or None."""
    if isinstance(v, str):
        return None if _is_text(v) else path
    if isinstance(v, dict):
        for k, x in v.items():
            sub = f"{path}.{k}" if path else k
            if not _is_text(k):
                return path or "body"
            if (bad := _surrogate_path(x, sub)) is not None:
                return bad
    elif isinstance(v, list):
        for i, x in enumerate(v):
            if (bad := _surrogate_path(x, f"{path}[{i}]")) is not None:
                return bad
    return None


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _body_loc(body: Any, err: dict) -> tuple:
    """``err``'s location with what is not in the request left out: pydantic names the member of a
    union it tried (``("messages", 0, "content", "list[TextPart]", 0, "type")``), which is no field
    of the body. A missing field's own name (the last part) is kept."""
    loc, out, value = err["loc"], [], body
    for i, part in enumerate(loc):
        if isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif isinstance(value, dict) and isinstance(part, str) and part in value:
            value = value[part]
        elif i == len(loc) - 1 and err["type"] == "missing" and isinstance(value, dict):
            value = None
        else:
            continue                         # a union member's tag (or the like): not in the body
        out.append(part)
    return tuple(out)


def validate(model: type[BaseModel], body: dict) -> BaseModel:
    """``model`` validated from ``body``; the first problem becomes a 400 naming its field. Of the
    errors a union gives (one per member), the one that reaches deepest into the body is reported:
    for a list of content parts, the part that is wrong rather than "should be a string"."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = [dict(x, loc=_body_loc(body, x)) for x in e.errors(include_url=False)]
        err = max(errors, key=lambda x: len(x["loc"]))          # the first of the deepest
        same = list(dict.fromkeys(x["msg"] for x in errors if x["loc"] == err["loc"] and x["type"] != "missing"))
        if err["type"] != "missing" and len(same) > 1:           # e.g. neither a string nor a list
            err = dict(err, msg=" or ".join([same[0]] + [m.replace("Input should be ", "", 1) for m in same[1:]]))
        param = _path(err["loc"]) or None
        if err["type"] == "extra_forbidden":
            msg = f"unrecognized request argument supplied: {param} (not supported by this server)"
        elif err["type"] == "missing":
            msg = f"{param}: a required argument is missing"
        else:
            msg = f"{param}: {err['msg']}" if param else err["msg"]
        raise APIError(400, msg, param=param) from None


def check(cond: bool, message: str, param: str | None) -> None:
    if not cond:
        raise APIError(400, message, param=param)


# --------------------------------------------------------------------------------------- models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None      # OpenAI's padding of stream chunks: never added here


class _Sampling(_Strict):
    """The fields completions and chat share."""
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, le=2 ** 31 - 1)         # extension: 0 or -1 = off
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Any = None                                                  # str | list[str]: stop_strings()
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None                     # token id (as a string) → [-100, 100]
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    max_tokens: Optional[int] = Field(None, ge=0, le=2 ** 31 - 1)
    user: Optional[str] = None

    def stop_strings(self) -> list[str]:
        """``stop`` as a list: a string or a list of up to 16 non-empty strings."""
        stop = self.stop
        if stop is None:
            return []
        if isinstance(stop, str):
            check(stop != "", "stop: must not be empty", "stop")
            stop = [stop]
        check(isinstance(stop, list), "stop: must be a string or a list of strings", "stop")
        check(len(stop) <= MAX_STOP, f"stop: at most {MAX_STOP} strings", "stop")
        for i, s in enumerate(stop):
            check(isinstance(s, str), f"stop[{i}]: must be a string", "stop")
            check(s != "", f"stop[{i}]: must not be empty", "stop")
            check(len(s) <= MAX_STOP_CHARS, f"stop[{i}]: at most {MAX_STOP_CHARS} characters", "stop")
        return list(dict.fromkeys(stop))

    def bias(self, vocab_size: int) -> dict[int, float]:
        """``logit_bias`` with integer keys, each a token id of the model (once: "5" and "05" are one id)
        and each bias in [-100, 100]."""
        out, keys = {}, {}
        check(len(self.logit_bias or {}) <= MAX_LOGIT_BIAS, f"logit_bias: at most {MAX_LOGIT_BIAS} tokens",
              "logit_bias")
        for key, value in (self.logit_bias or {}).items():
            check(key.strip().lstrip("-").isdigit() and key.strip().isascii(),
                  f"logit_bias: key {key[:40]!r} is not a token id", "logit_bias")
            tid = int(key)
            check(0 <= tid < vocab_size, f"logit_bias: token id {tid} is outside the vocabulary [0, {vocab_size})",
                  "logit_bias")
            check(tid not in keys, f"logit_bias: token id {tid} is given twice (keys {keys.get(tid)!r} and "
                                   f"{key[:40]!r})", "logit_bias")
            keys[tid] = key[:40]
            check(-100 <= value <= 100, f"logit_bias[{tid}]: bias {value} must be in [-100, 100]", "logit_bias")
            out[tid] = float(value)
        return out

    def include_usage(self) -> bool:
        check(self.stream_options is None or bool(self.stream), "stream_options: only allowed with stream: true",
              "stream_options")
        check(self.stream_options is None or not self.stream_options.include_obfuscation,
              "stream_options.include_obfuscation: true is not supported (this server adds no obfuscation padding "
              "to stream chunks; send false or leave it out)", "stream_options")
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""
    prompt: Any                                                       # prompts(): str | [str] | [int] | [[int]]
    suffix: Optional[str] = None
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)

    def prompts(self) -> list[Union[str, list[int]]]:
        """``prompt`` as a list of prompts, each a string or a list of token ids."""
        p = self.prompt
        msg = "prompt: must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(p, str):
            return [p]
        check(isinstance(p, list) and len(p) > 0, msg if not isinstance(p, list) else "prompt: must not be empty",
              "prompt")
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(_is_id(x) for x in p):
            return [list(p)]
        if all(isinstance(x, list) and x and all(_is_id(t) for t in x) for x in p):
            return [list(x) for x in p]
        raise APIError(400, msg, param="prompt")


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


# fields of an answer's message that a client sends back in its history (``message.model_dump()`` writes
# them all, as null), and the values that carry nothing
_MESSAGE_FIELDS_OFF = {"refusal": (None,), "function_call": (None,), "audio": (None,), "annotations": (None, [])}

TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_TOOLS = 128


class CalledFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Strict):
    """A call in an assistant message of the history (as an answer's ``message.tool_calls`` gave it)."""
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None                       # assistant
    tool_call_id: Optional[str] = None                                # tool
    refusal: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None

    def text(self) -> str | None:
        """The content as one string: a list of text parts joined by newlines (as vLLM joins them; joined
        with nothing, "Hello" and "world" became "Helloworld")."""
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content)
        return self.content


class JSONSchemaFormat(_Strict):
    """``response_format.json_schema``: OpenAI's name (letters, digits, ``_`` and ``-``, at most 64), an
    optional description, the JSON Schema itself and ``strict`` (the output keeps to the schema either way:
    decoding is constrained to it)."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=False)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    """``response_format``: "text" (no constraint), "json_object" (any JSON object) or "json_schema" (the
    output keeps to ``json_schema.schema``)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    def grammar(self):
        """The :class:`dsv3.infer.structured.GrammarSpec` asked for (None for "text"); 400 naming the field
        for a json_schema without its schema, or one where it does not belong."""
        from .structured import GrammarSpec

        if self.type != "json_schema":
            check(self.json_schema is None, f"response_format.json_schema: only allowed with type "
                                            f"'json_schema' (type is {self.type!r})", "response_format.json_schema")
            return None if self.type == "text" else GrammarSpec("json_object")
        check(self.json_schema is not None, "response_format.json_schema: required with type 'json_schema'",
              "response_format.json_schema")
        check(self.json_schema.schema_ is not None, "response_format.json_schema.schema: a required argument is "
                                                    "missing", "response_format.json_schema.schema")
        return GrammarSpec.json_schema(self.json_schema.schema_)


class FunctionDef(_Strict):
    """``tools[i].function``: a name of letters, digits, ``_`` and ``-`` (at most 64), an optional
    description and the parameters as a JSON Schema object."""
    name: str = Field(pattern=TOOL_NAME)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice`` {"type": "function", "function": {"name": …}}: that function must be called."""
    type: Literal["function"]
    function: ChosenFunction


def setup_tools(functions: list[FunctionDef], choice: str | None, named: str | None, where, named_param: str
                ) -> tuple[list[dict] | None, Any]:
    """(tools, choice) of a request's function tools (``functions``) and its tool choice (``choice`` "none",
    "auto", "required" or None; ``named``: the name a named choice gives): the tools as plain chat dicts
    ``{"type": "function", "function": {…}}`` for the chat template (None when there are none or the choice
    is "none": then the model is not told of them and nothing is parsed) and the choice: "auto" (the default
    with tools), "required" or {"type": "function", "function": {"name"}}. 400 naming the field
    (``where(i)``: the path of tool i's function, ``named_param``: of the named choice) for duplicate names,
    parameters that are no object schema, or a choice that names no tool or needs tools where there are
    none. Chat completions and the Responses API share it."""
    names = set()
    for i, f in enumerate(functions):
        check(f.name not in names, f"{where(i)}.name: {f.name!r} is given twice (names must be unique)",
              f"{where(i)}.name")
        names.add(f.name)
        params = f.parameters
        if params is not None:
            check(params.get("type", "object") == "object", f"{where(i)}.parameters: must be a JSON Schema of an "
                  f"object (its \"type\" is {json.dumps(params.get('type'))})", f"{where(i)}.parameters")
    if named is not None:
        check(named in names, f"{named_param}: {named!r} is not one of the tools "
              f"({', '.join(sorted(names)) or 'none were given'})", named_param)
        choice = {"type": "function", "function": {"name": named}}
    elif choice == "required":
        check(bool(functions), "tool_choice: 'required' needs tools", "tool_choice")
    elif choice is None:
        choice = "auto" if functions else "none"
    if choice == "none" or not functions:
        return None, "none"
    return [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in functions], choice


# the chat fields of features this server does not have (the deprecated functions API, stored
# completions), and the values that ask for none of them
_FEATURES_OFF = {"functions": (None,), "function_call": (None, "none"), "store": (None, False),
                 "metadata": (None, {})}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31 - 1)
    response_format: Optional[ResponseFormat] = None
    add_generation_prompt: Optional[bool] = None                      # extension, as vLLM
    continue_final_message: Optional[bool] = None                     # extension, as vLLM
    tools: Optional[list[Tool]] = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    # Features this server does not have (the deprecated functions API, stored completions): clients that
    # always send these fields get through with their "off" value; any other value is refused by name.
    functions: Any = None
    function_call: Any = None
    store: Any = None
    metadata: Any = None

    def check_features(self) -> None:
        """400 naming the first field that asks for the functions API or stored completions."""
        for name, off in _FEATURES_OFF.items():
            value = getattr(self, name)
            what = "stored completions" if name in ("store", "metadata") else \
                "the deprecated functions API (use tools and tool_choice)"
            check(any(type(value) is type(o) and value == o for o in off),
                  f"{name}: {what} is not supported by this server (allowed: "
                  f"{', '.join(json.dumps(o) for o in off)})", name)

    def tool_setup(self) -> tuple[list[dict] | None, Any]:
        """(tools, choice) for the chat template and the grammar: :func:`setup_tools` of ``tools`` and
        ``tool_choice``."""
        choice = self.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        return setup_tools([t.function for t in self.tools or []], None if named else choice, named,
                           lambda i: f"tools[{i}].function", "tool_choice.function.name")

    def prompt_end(self) -> tuple[bool, bool]:
        """(add_generation_prompt, continue_final_message) for the chat template. Continuing the last
        message needs it to be the assistant's and no new generation prompt (``add_generation_prompt``
        left out means false then): otherwise a 400 naming continue_final_message."""
        if not self.continue_final_message:
            return self.add_generation_prompt is not False, False
        if self.add_generation_prompt:
            raise APIError(400, "continue_final_message: cannot be true with add_generation_prompt true (one continues "
                                "the last message, the other starts a new one); set add_generation_prompt to false",
                           param="continue_final_message", code="invalid_parameter_combination")
        role = self.messages[-1].role
        check(role == "assistant", f"continue_final_message: the last message must be the assistant's to be continued "
                                   f"(messages[{len(self.messages) - 1}] is {role!r})", "continue_final_message")
        return False, True

    def chat_messages(self) -> list[dict]:
        """The messages as plain dicts for the chat template (text parts joined by newlines)."""
        out = []
        for i, m in enumerate(self.messages):
            for name, off in _MESSAGE_FIELDS_OFF.items():
                value = getattr(m, name)
                check(any(type(value) is type(o) and value == o for o in off),
                      f"messages[{i}].{name}: not supported by this server (allowed: "
                      f"{', '.join(json.dumps(o) for o in off)})", f"messages[{i}].{name}")
            check(m.content != [], f"messages[{i}].content: an array of content parts must not be empty",
                  f"messages[{i}].content")
            text = m.text()
            check(text is not None or m.role == "assistant", f"messages[{i}].content: required for role {m.role!r}",
                  f"messages[{i}].content")
            check(not m.tool_calls or m.role == "assistant", f"messages[{i}].tool_calls: only allowed in an "
                  f"assistant message (this one's role is {m.role!r})", f"messages[{i}].tool_calls")
            check((m.tool_call_id is not None) == (m.role == "tool"), f"messages[{i}].tool_call_id: "
                  + ("required for role 'tool'" if m.role == "tool" else f"only allowed for role 'tool' (this "
                                                                           f"one's role is {m.role!r})"),
                  f"messages[{i}].tool_call_id")
            d = {"role": m.role, "content": text or ""}
            if m.tool_calls:
                for j, c in enumerate(m.tool_calls):
                    try:
                        json.loads(c.function.arguments)
                    except (ValueError, RecursionError):
                        raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments: not valid JSON",
                                       param=f"messages[{i}].tool_calls[{j}].function.arguments") from None
                d["content"] = text
                d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
            out.append(d)
        return out


# --------------------------------------------------------------------------------------- the Responses API
MAX_METADATA = 16            # metadata pairs (OpenAI: 16, keys of at most 64 characters, values of 512)


class InputTextPart(_Strict):
    """A text part of an input message: ``input_text``, or ``output_text`` (an earlier answer sent back;
    its annotations and logprobs are accepted and dropped)."""
    type: Literal["input_text", "output_text"]
    text: str
    annotations: Optional[list] = None
    logprobs: Optional[list] = None


_ITEM_STATUS = Optional[Literal["in_progress", "completed", "incomplete"]]


class InputMessage(_Strict):
    """A message of ``input`` (``type`` "message", or left out as clients write short messages)."""
    type: Optional[Literal["message"]] = None
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[InputTextPart]]
    id: Optional[str] = None
    status: _ITEM_STATUS = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class FunctionCallInput(_Strict):
    """A call the model made earlier (an answer's ``function_call`` item sent back)."""
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: Optional[str] = None
    status: _ITEM_STATUS = None


class FunctionCallOutputInput(_Strict):
    """The result of a call (``call_id`` names it), as text or a list of text parts."""
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Union[str, list[InputTextPart]]
    id: Optional[str] = None
    status: _ITEM_STATUS = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "\n".join(p.text for p in self.output)


class ReasoningInput(_Strict):
    """An earlier answer's reasoning item sent back: dropped (DeepSeek's chat templates keep no thinking in
    the history)."""
    type: Literal["reasoning"]
    id: Optional[str] = None
    summary: list = Field(default_factory=list)
    content: Optional[list] = None
    encrypted_content: Optional[str] = None
    status: _ITEM_STATUS = None


def _item_kind(v: Any) -> str | None:
    return v.get("type", "message") if isinstance(v, dict) else None


InputItem = Annotated[Union[Annotated[InputMessage, Tag("message")], Annotated[FunctionCallInput, Tag("function_call")],
                            Annotated[FunctionCallOutputInput, Tag("function_call_output")],
                            Annotated[ReasoningInput, Tag("reasoning")]],
                      Discriminator(_item_kind, custom_error_type="invalid_input_item",
                                    custom_error_message="must be an object whose type is 'message' (the default), "
                                                         "'function_call', 'function_call_output' or 'reasoning'")]


class FunctionTool(_Strict):
    """A function of ``tools``, in the Responses API's flat shape (no ``function`` wrapper)."""
    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None

    def function(self) -> FunctionDef:
        return FunctionDef(name=self.name, description=self.description, parameters=self.parameters,
                           strict=self.strict)


class FunctionChoice(_Strict):
    """``tool_choice`` {"type": "function", "name": …}: that function must be called."""
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    """``text.format``: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "name", "schema",
    "description", "strict"} (the output keeps to the schema either way: decoding is constrained to it)."""
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None

    def grammar(self):
        """The :class:`dsv3.infer.structured.GrammarSpec` asked for (None for "text"); 400 naming the field for
        a json_schema without its name or schema, or a name or schema where they do not belong."""
        from .structured import GrammarSpec

        if self.type != "json_schema":
            for field, value in (("name", self.name), ("schema", self.schema_), ("strict", self.strict),
                                 ("description", self.description)):
                check(value is None, f"text.format.{field}: only allowed with type 'json_schema' (type is "
                                     f"{self.type!r})", f"text.format.{field}")
            return None if self.type == "text" else GrammarSpec("json_object")
        for field, value in (("name", self.name), ("schema", self.schema_)):
            check(value is not None, f"text.format.{field}: a required argument is missing (type 'json_schema')",
                  f"text.format.{field}")
        return GrammarSpec.json_schema(self.schema_)


class TextConfig(_Strict):
    format: Optional[TextFormat] = None


class ResponsesStreamOptions(_Strict):
    include_obfuscation: Optional[bool] = None      # OpenAI's padding of stream events: never added here


class ResponsesRequest(_Strict):
    """``POST /v1/responses``, stateless: the whole conversation comes as ``input`` (a string: one user
    message, or a list of items), ``instructions`` first as a system message. ``top_k`` and ``seed`` are
    extensions (as on chat completions)."""
    model: Optional[str] = None
    input: Union[str, list[InputItem]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31 - 1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, le=2 ** 31 - 1)         # extension: 0 or -1 = off
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=UINT64_MAX)    # extension
    stream: Optional[bool] = None
    stream_options: Optional[ResponsesStreamOptions] = None
    tools: Optional[list[FunctionTool]] = Field(None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], FunctionChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    store: Optional[bool] = None                 # accepted either way: nothing is stored (the answer says store false)
    previous_response_id: Optional[str] = None   # refused: check_features()
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None

    def check_features(self) -> None:
        """400 naming the field for what a stateless server cannot do (``previous_response_id``), bad
        ``metadata`` and ``stream_options`` that ask for obfuscation or come without ``stream``."""
        if self.previous_response_id is not None:
            raise APIError(400, "previous_response_id: this server stores no responses (it is stateless, as with "
                                "store false), so it cannot continue one; send the whole conversation as input",
                           param="previous_response_id", code="previous_response_not_found")
        check(self.stream_options is None or bool(self.stream), "stream_options: only allowed with stream: true",
              "stream_options")
        check(self.stream_options is None or not self.stream_options.include_obfuscation,
              "stream_options.include_obfuscation: true is not supported (this server adds no obfuscation padding "
              "to stream events; send false or leave it out)", "stream_options")
        meta = self.metadata or {}
        check(len(meta) <= MAX_METADATA, f"metadata: at most {MAX_METADATA} pairs", "metadata")
        for k, v in meta.items():
            check(len(k) <= 64, f"metadata: key {k[:40]!r}… is longer than 64 characters", "metadata")
            check(len(v) <= 512, f"metadata[{k!r}]: the value is longer than 512 characters", "metadata")

    def tool_setup(self) -> tuple[list[dict] | None, Any]:
        """(tools, choice) in the chat shape: :func:`setup_tools`."""
        choice = self.tool_choice
        named = choice.name if isinstance(choice, FunctionChoice) else None
        return setup_tools([t.function() for t in self.tools or []], None if named else choice, named,
                           lambda i: f"tools[{i}]", "tool_choice.name")

    def grammar(self):
        fmt = self.text.format if self.text is not None else None
        return fmt.grammar() if fmt is not None else None

    def chat_messages(self) -> list[dict]:
        """``instructions`` and ``input`` as chat messages for the chat template: a system message first, then
        the items in order (consecutive function calls, and the assistant message right before them, make one
        assistant turn with ``tool_calls``; each function_call_output a ``tool`` message; reasoning items
        are dropped)."""
        out = [] if self.instructions is None else [{"role": "system", "content": self.instructions}]
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        check(len(items) > 0, "input: must not be empty", "input")
        for i, item in enumerate(items):
            if isinstance(item, InputMessage):
                check(item.content != [], f"input[{i}].content: an array of content parts must not be empty",
                      f"input[{i}].content")
                out.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallInput):
                try:
                    json.loads(item.arguments)
                except (ValueError, RecursionError):
                    raise APIError(400, f"input[{i}].arguments: not valid JSON",
                                   param=f"input[{i}].arguments") from None
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = out[-1] if out else None
                if last is not None and last["role"] == "assistant" and (last.get("tool_calls") or
                                                                         isinstance(items[i - 1], InputMessage)):
                    last.setdefault("tool_calls", []).append(call)
                    last["content"] = last["content"] or None
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputInput):
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        check(bool(out), "input: holds no message (only reasoning items)", "input")
        return out
