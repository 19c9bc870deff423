"""The OpenAI API's response bodies, built from :class:`dsv3.infer.generation_stream.Delta` pieces.

Completions use the legacy logprobs shape (``tokens``, ``token_logprobs``, ``top_logprobs`` as
{token: logprob} maps, ``text_offset``); chat uses ``{"content": [{"token", "logprob", "bytes",
"top_logprobs": [...]}]}``. Streams are server-sent events, ``data: {json}`` per chunk and
``data: [DONE]`` at the end.
"""

from __future__ import annotations

import json

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
