"""The OpenAI API's response bodies, built from :class:`dsv3.infer.generation_stream.Delta` pieces.

Completions use the legacy logprobs shape (``tokens``, ``token_logprobs``, ``top_logprobs`` as
{token: logprob} maps, ``text_offset``); chat uses ``{"content": [{"token", "logprob", "bytes",
"top_logprobs": [...]}]}``. Streams are server-sent events, ``data: {json}`` per chunk and
``data: [DONE]`` at the end.
"""

from __future__ import annotations

import json
import time
import uuid

from .detokenize import TokenBytes


def sse(obj) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return "data: " + text + "\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(tokens, offset_shift: int = 0) -> dict:
    """The legacy completions logprobs of ``tokens`` ([TokenOut]); a token without a logprob (the
    first prompt token) gets None. As OpenAI documents ("the API will always return the logprob of
    the sampled token, so there may be up to logprobs+1 elements"), each ``top_logprobs`` map holds
    the token itself besides the most likely ones."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        out["tokens"].append(t.text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(None if t.logprob is None else _top_map(t))
        out["text_offset"].append(t.offset + offset_shift)
    return out


def _top_map(t) -> dict:
    top = {}
    for tid, lp, text in t.top:
        top.setdefault(text, lp)
    top.setdefault(t.text, t.logprob)
    return top


def chat_logprobs(tokens, tb: TokenBytes) -> dict:
    """The chat logprobs of ``tokens`` ([TokenOut])."""
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(tb.bytes(t.id)),
                         "top_logprobs": [{"token": text, "logprob": lp, "bytes": list(tb.bytes(tid))}
                                          for tid, lp, text in t.top]}
                        for t in tokens]}


def merge_logprobs(a: dict | None, b: dict | None) -> dict | None:
    """Two legacy logprobs blocks one after the other."""
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


# --------------------------------------------------------------------------------------- the Responses API
def sse_event(obj: dict) -> str:
    """One Responses API stream event: its ``type`` as the SSE event name, the event as the data."""
    return f"event: {obj['type']}\n" + sse(obj)


def response_usage(input_tokens: int, output_tokens: int, cached_tokens: int, reasoning_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """The output items of one Responses API answer, built from its parts (:class:`dsv3.infer.answer_parts.
    AnswerStream`) as they come, with the stream events that tell a client about them.

    Items come in the order the model writes them: a ``reasoning`` item (``summary`` [] and the thinking as
    ``content`` [{"type": "reasoning_text"}]), a ``message`` item (one ``output_text`` part), ``function_call``
    items (``call_id``, ``name``, ``arguments``). A part of another kind than the open item's closes it and
    opens the next. A finished answer without calls always has a message (maybe empty); one cut off ends
    with the item the length cut, "incomplete". Each item goes out as
    ``response.output_item.added`` (with ``response.content_part.added`` for text), its text or arguments in
    ``….delta`` events, then ``….done`` events and ``response.output_item.done`` with the item whole; every
    event has its ``sequence_number``. :meth:`finish` closes the last item and gives the response whole
    (status "completed", or "incomplete" with ``incomplete_details.reason`` "max_output_tokens" when the
    length ran out and the answer is no complete call block) with its final event (``response.completed`` /
    ``response.incomplete``). Whole answers are built the same way, their events dropped."""

    def __init__(self, response: dict):
        self.response = response           # the response object without output, status, usage
        self.seq = 0
        self.output: list[dict] = []
        self.open: dict | None = None      # the item being written
        self.calls: dict[int, dict] = {}   # a call's index in the answer → its item
        self.has_message = False

    def event(self, type: str, **fields) -> dict:
        e = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return e

    def snapshot(self, status: str, usage=None) -> dict:
        return dict(self.response, status=status, output=self.output, usage=usage)

    def start(self) -> list[dict]:
        snap = self.snapshot("in_progress")
        return [self.event("response.created", response=snap), self.event("response.in_progress", response=snap)]

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _open(self, item: dict, events: list) -> dict:
        events += self._close()
        self.output.append(item)
        self.open = item
        events.append(self.event("response.output_item.added", output_index=len(self.output) - 1,
                                 item=json.loads(json.dumps(item))))     # as it is now: later changes not shown
        if item["type"] != "function_call":
            part = {"type": "output_text", "text": "", "annotations": []} if item["type"] == "message" \
                else {"type": "reasoning_text", "text": ""}
            events.append(self.event("response.content_part.added", **self._where(item), content_index=0, part=part))
            item["content"].append(dict(part))
        return item

    def _close(self, status: str = "completed") -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        where = self._where(item)
        out = []
        if item["type"] == "function_call":
            out.append(self.event("response.function_call_arguments.done", **where, name=item["name"],
                                  arguments=item["arguments"]))
        else:
            part = item["content"][0]
            kind = "output_text" if item["type"] == "message" else "reasoning_text"
            done = {"logprobs": []} if kind == "output_text" else {}
            out.append(self.event(f"response.{kind}.done", **where, content_index=0, text=part["text"], **done))
            out.append(self.event("response.content_part.done", **where, content_index=0, part=dict(part)))
        out.append(self.event("response.output_item.done", output_index=where["output_index"],
                              item=json.loads(json.dumps(item))))
        return out

    def feed(self, parts) -> list[dict]:
        from .answer_parts import CALL, CONTENT, REASONING

        events = []
        for kind, value in parts:
            if kind == CALL:
                if "id" in value:                # a call's header: its item
                    f = value["function"]
                    self.calls[value["index"]] = self._open(
                        {"id": _item_id("fc"), "type": "function_call", "status": "in_progress",
                         "call_id": value["id"], "name": f["name"], "arguments": f["arguments"]}, events)
                    continue
                item, delta = self.calls[value["index"]], value["function"]["arguments"]
                item["arguments"] += delta
                events.append(self.event("response.function_call_arguments.delta", **self._where(item), delta=delta))
                continue
            want = "reasoning" if kind == REASONING else "message"
            item = self.open
            if item is None or item["type"] != want:
                if want == "message":
                    self.has_message = True
                    item = self._open({"id": _item_id("msg"), "type": "message", "status": "in_progress",
                                       "role": "assistant", "content": []}, events)
                else:
                    item = self._open({"id": _item_id("rs"), "type": "reasoning", "status": "in_progress",
                                       "summary": [], "content": []}, events)
            item["content"][0]["text"] += value
            name = "response.output_text.delta" if want == "message" else "response.reasoning_text.delta"
            extra = {"logprobs": []} if want == "message" else {}
            events.append(self.event(name, **self._where(item), content_index=0, delta=value, **extra))
        return events

    def finish(self, parts, calls, finish_reason: str, usage: dict) -> tuple[list[dict], dict]:
        """(the last events, the response whole) once the answer is done: ``parts`` and ``calls`` from
        AnswerStream.finish, ``finish_reason`` the engine's."""
        events = self.feed(parts)
        incomplete = finish_reason == "length" and calls is None
        if not self.has_message and calls is None and not (incomplete and self.output):
            self.has_message = True      # an answer of no text, or a finished one of only thinking: "" (a
            #                              reasoning cut off by the length stays the last item, incomplete)
            self._open({"id": _item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}, events)
        events += self._close("incomplete" if incomplete else "completed")
        if calls is None:
            for item in self.calls.values():                # calls begun but no well-formed block
                item["status"] = "incomplete"
        response = self.snapshot("incomplete" if incomplete else "completed", usage)
        if incomplete:
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            response["completed_at"] = int(time.time())
        events.append(self.event("response.incomplete" if incomplete else "response.completed", response=response))
        return events, response
