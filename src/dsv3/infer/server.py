"""``dsv3 serve``: the OpenAI API over the batched engine.

    dsv3 serve --model RUN/final [--host 127.0.0.1] [--port 8000] [--max-batch 32] [--max-requests N]
               [--cache-memory GB]
               [--prefix-cache DIR_OR_URL] [--speculative] [--api-key KEY] [--served-model-name NAME]
               [--max-body-bytes N] [--body-timeout S] [--header-timeout S] [--shutdown-grace S]
               [--fp8 auto|keep|dequant] [--reasoning-parser deepseek_r1] [--cuda-graphs]
               [--device DEV]

    dsv3 serve … --role prefill|decode [--prefill-url URL]   disaggregated prefill (dsv3.infer.disagg)

    POST /v1/completions, POST /v1/chat/completions      whole or streamed (server-sent events)
    POST /v1/responses                                   the Responses API, stateless (nothing is stored)
    GET  /v1/models, GET /v1/models/{id}
    GET  /health (200 with the engine's counters; 503 while draining or once the engine has stopped)
    GET  /metrics (Prometheus)
    POST /internal/prefill (--role prefill only: prompts computed into the shared prefix cache)
    GET  /internal/prefill (--role prefill only: the cache blocks it builds, the longest prompt it takes)

The engine runs in a process of its own (:class:`dsv3.infer.worker.EngineWorker`); handlers only
post requests to it and read the tokens it hands back through the event loop, so no handler waits
on a step and the HTTP side never competes with the model for the interpreter. Request bodies are read with a
size limit and a time limit (``--body-timeout``: a client that stops sending its body gets 408), after headers
that must come within ``--header-timeout`` seconds of the connection's start or its previous answer (else
the connection is closed, with a 408 when part of a request came: :func:`header_timeout_protocol`), validated
strictly (:mod:`dsv3.infer.openai_protocol`), tokenised and templated on a worker thread. Every error is
answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. A client that goes
away has its requests aborted at once. SIGTERM (or Ctrl-C) stops taking requests (503), lets those
in flight finish for up to ``--shutdown-grace`` seconds, aborts the rest and exits 0.

If the engine stops on its own (its process dies; under ``--ep`` a rank of the group dies), one line
says why, the requests in flight end with 503 (``engine_dead``; a stream with an error event), new
ones get 503 and ``/health`` says "dead" while the server runs; it exits 1 when stopped (under
torchrun, which stops it when a rank fails).

fastapi, uvicorn, prometheus_client and jinja2 are needed (``pip install 'dsv3[serve]'``);
importing this module is not enough to need them.
"""

import argparse                 # no `from __future__ import annotations`: FastAPI reads handler types
import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor

from .openai_protocol import (APIError, ChatCompletionRequest, CompletionRequest, check, error_body,
                              error_type, parse_body, validate)

DEFAULT_MAX_BODY = 8 << 20
DEFAULT_BODY_TIMEOUT = 30.0      # seconds a client may take to send its whole request body
DEFAULT_HEADER_TIMEOUT = 30.0    # seconds a connection may take to send a request's headers


def choice_seed(seed: int, k: int) -> int:
    """The generator seed of sample ``k`` of a request (prompt i, choice j: k = i·best_of + j) with the
    request's ``seed`` (any int64 or uint64): 63 bits of a hash of both, so distinct requests' seeds
    collide only by chance, never by arithmetic (``seed`` and ``seed + 2^63`` used to sample alike)."""
    digest = hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


class ServerState:
    """What the handlers share."""

    def __init__(self, worker, tokenizer, model_name: str, template, api_key: str | None, max_body_bytes: int,
                 shutdown_grace: float, remote_prefill=None, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 reasoning_parser: str | None = None, max_requests: int | None = None):
        from .detokenize import TokenBytes
        from .metrics import ServerMetrics

        self.worker, self.tokenizer, self.model_name, self.template = worker, tokenizer, model_name, template
        self.api_key, self.max_body_bytes, self.shutdown_grace = api_key, max_body_bytes, shutdown_grace
        self.body_timeout = body_timeout
        self.remote_prefill = remote_prefill       # --role decode: a disagg.RemotePrefill
        self.reasoning_parser = reasoning_parser   # --reasoning-parser: chat answers split at </think>
        self.max_requests = max_requests           # --max-requests: generations in flight at most (None: no limit)
        self.tb = TokenBytes(tokenizer)
        self.metrics = ServerMetrics(worker)
        self.created = int(time.time())
        self.draining_since: float | None = None
        self.loop = None                   # the event loop, once the app has started
        self.in_flight = weakref.WeakSet()  # the GenerationStreams submitted and not yet answered
        self.cut_off = False               # the drain's grace ran out: what was left has been aborted
        self.cut_off_event = None          # set then (an asyncio.Event, made on the loop when first waited on)
        self.max_len, self.vocab_size = worker.max_len, worker.vocab_size
        limits = getattr(worker, "limits", None)
        if limits is not None:           # a cache pool smaller than the context bounds every request
            self.max_len = min(self.max_len, limits.max_request_len)
        self.stop_ids = set(tokenizer.stop_ids)   # eos and the model's other end-of-sequence ids
        # no token covers more bytes than this, so a text longer than max_len × this cannot fit the
        # context: refused before tokenising (which costs seconds for megabytes)
        self.max_text_bytes = self.max_len * max(map(len, self.tb.table)) if self.tb.table is not None else None
        # tokenising and templating get threads of their own, so a flood of huge prompts cannot starve
        # the default executor
        self.executor = ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2) // 2),
                                           thread_name_prefix="dsv3-tokenize")
        self._grammars = None              # structured output: a structured.Grammars, made on first use
        self._grammars_lock = threading.Lock()

    def check_grammar(self, spec, format_param: str = "response_format") -> None:
        """400 unless ``spec`` (a structured.GrammarSpec) can be served: xgrammar is installed and compiles
        it (compiled here, on a tokenising thread, and cached; the engine process — under --ep, the rank
        decoding the request — compiles it again, once). Runs on a worker thread. A tool-call grammar's
        errors name ``tool_choice`` / ``tools``, the others' the request's output format (``format_param``:
        chat's ``response_format``, the Responses API's ``text.format``)."""
        from .structured import GrammarError, GrammarUnavailable, Grammars

        schema_param = "response_format.json_schema" if format_param == "response_format" \
            else f"{format_param}.schema"
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.vocab_size)
        try:
            self._grammars.compile(spec)
        except GrammarUnavailable as e:
            if spec.kind == "tool_call":
                raise APIError(400, f"tool_choice: 'required' and a named function are not available on this "
                                    f"server: {e}", param="tool_choice", code="unsupported_tool_choice") from None
            raise APIError(400, f"{format_param}: {spec.kind} is not available on this server: {e}",
                           param=format_param, code="unsupported_response_format") from None
        except GrammarError as e:
            if spec.kind == "tool_call":
                raise APIError(400, f"tools: a function's parameters schema cannot be used: {e}", param="tools",
                               code="invalid_json_schema") from None
            raise APIError(400, f"{schema_param}: the schema cannot be used: {e}",
                           param=schema_param, code="invalid_json_schema") from None

    def check_text_fits(self, text: str, param: str) -> None:
        if self.max_text_bytes is not None and len(text) > self.max_text_bytes \
                and len(text.encode("utf-8")) > self.max_text_bytes:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens; the {param} text "
                                f"has {len(text)} characters, more than {self.max_len} tokens can hold.",
                           param=param, code="context_length_exceeded")

    async def off_loop(self, fn, *args):
        """``fn(*args)`` on the tokenising threads (never on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def begin_drain(self) -> None:
        """Answer 503 from now on; once ``shutdown_grace`` has passed, abort what is still in flight (its
        clients get a 503, or an error event ending their stream, before uvicorn's own deadline cancels
        the handlers). Safe to call from a signal handler."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.loop.call_later, self.shutdown_grace, self.cut_off_in_flight)

    def cut_off_in_flight(self) -> None:
        self.cut_off = True
        if self.cut_off_event is not None:
            self.cut_off_event.set()
        for g in list(self.in_flight):
            g.abort()

    def check_serving(self) -> None:
        if self.draining_since is not None:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        self.check_engine()

    def check_engine(self) -> None:
        """503 once the engine has stopped (its process died, or its expert-parallel group failed)."""
        if not self.worker.alive:
            raise APIError(503, f"the engine has stopped: {self.worker.error}", code="engine_dead")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")


# --------------------------------------------------------------------------------------- request plumbing
async def read_json(request, limit: int, model=None, limit_source: str = "--max-body-bytes",
                    timeout: float = DEFAULT_BODY_TIMEOUT):
    """The request's JSON object, read with a size limit (413, naming ``limit_source``) and a time limit
    (:func:`read_body`), parsed strictly (400) and validated as ``model`` when one is given. A body over
    256 KiB is parsed and validated on a worker thread: a few MB of JSON take up to a second, which would
    hold every other stream."""
    length = request.headers.get("content-length")
    if length is not None:
        check(length.isdigit(), "invalid Content-Length header", None)
        if int(length) > limit:
            raise APIError(413, f"the request body has {int(length)} bytes; the limit is {limit} ({limit_source})",
                           code="request_too_large")
    buf = await read_body(request, limit, limit_source, timeout)

    def parse(raw: bytes):
        body = parse_body(raw)
        return body if model is None else validate(model, body)

    if len(buf) > (256 << 10):
        return await asyncio.get_running_loop().run_in_executor(None, parse, buf)
    return parse(buf)


async def read_request(st: "ServerState", request, model_cls):
    """The validated body of an inference request (``model_cls``, an openai_protocol request model) once the
    server takes requests and the body names the served model (an APIError otherwise)."""
    st.check_serving()
    body = await read_json(request, st.max_body_bytes, model_cls, timeout=st.body_timeout)
    st.check_model(body.model)
    return body


async def read_body(request, limit: int, limit_source: str, timeout: float) -> bytes:
    """The request's body, at most ``limit`` bytes (413, naming ``limit_source``), all of it within
    ``timeout`` seconds: a client that sends its headers and then too little of its body, or nothing, or a
    trickle, gets 408 and its connection is closed (it held a request open for ever). A client that
    disconnects before its body is in raises :class:`ClientGone` (answered 499, nothing logged)."""
    from starlette.requests import ClientDisconnect

    buf = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            buf.extend(chunk)
            if len(buf) > limit:
                raise APIError(413, f"the request body exceeds {limit} bytes ({limit_source})",
                               code="request_too_large")

    try:
        await asyncio.wait_for(read(), timeout)
    except ClientDisconnect:                 # the client went away before sending all of it: no answer is due
        raise ClientGone() from None
    except asyncio.TimeoutError:
        length = request.headers.get("content-length")
        raise APIError(408, f"the request body did not arrive within {timeout:g} s ({len(buf)} of "
                            f"{length or 'an unknown number of'} bytes came; --body-timeout)",
                       code="request_timeout") from None
    return bytes(buf)


async def until_disconnected(receive) -> None:
    """Returns when the client has gone (``http.disconnect``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def tokenize_prompts(st: ServerState, prompts: list) -> list[list[int]]:
    """Token ids of each prompt (strings encoded, id lists checked); an empty string becomes the
    beginning-of-sentence token. Runs on a worker thread."""
    texts = [p for p in prompts if isinstance(p, str)]
    for t in texts:
        st.check_text_fits(t, "prompt")
    tok = st.tokenizer                       # text prompts start with bos when the tokenizer says so (as vLLM)
    encoded = iter(tok.encode_batch(texts, add_bos=tok.add_bos_token and tok.bos_id is not None) if texts else [])
    out = []
    for i, p in enumerate(prompts):
        ids = next(encoded) if isinstance(p, str) else p
        if not ids:
            check(st.tokenizer.bos_id is not None, f"prompt[{i}] is empty", "prompt")
            ids = [st.tokenizer.bos_id]
        bad = next((t for t in ids if not 0 <= t < st.vocab_size), None)
        check(bad is None, f"prompt: token id {bad} is outside the vocabulary [0, {st.vocab_size})", "prompt")
        out.append(list(ids))
    return out


def sampling_params(st: ServerState, body):
    from .sampling import SamplingParams

    try:
        return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                              top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p,
                              presence_penalty=getattr(body, "presence_penalty", None) or 0.0,   # not in Responses
                              frequency_penalty=getattr(body, "frequency_penalty", None) or 0.0,
                              logit_bias=body.bias(st.vocab_size) if hasattr(body, "bias") else {})
    except ValueError as e:
        raise APIError(400, str(e)) from None


def max_new_tokens(st: ServerState, prompt_len: int, asked: int | None, default: int | None, prompt_param: str,
                   tokens_param: str) -> int:
    """The tokens to generate: ``asked`` if it fits the context (else 400), otherwise ``default``
    (None: the rest of the context) cut to fit."""
    room = st.max_len - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {st.max_len} tokens; the prompt has "
                            f"{prompt_len}, which leaves no room for a completion.", param=prompt_param,
                       code="context_length_exceeded")
    if asked is None:
        return room if default is None else min(default, room)
    if prompt_len + asked > st.max_len:
        raise APIError(400, f"This model's maximum context length is {st.max_len} tokens. However, you requested "
                            f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
                            f"Reduce the prompt or {tokens_param}.", param=tokens_param,
                       code="context_length_exceeded")
    return asked


async def prefill_and_start(st: ServerState, gens: list, prompt_param: str, request) -> asyncio.Queue:
    """With ``--role decode``, have the prefill server put the prompts' blocks in the shared cache first
    (503 if it cannot); then :func:`start_all`. A client that goes away meanwhile raises
    :class:`ClientGone`, and the call to the prefill server is cancelled (its connection closed, so the
    prefill server aborts the prompts too)."""
    if st.remote_prefill is not None:
        # a drain's grace that runs out while the prefill server still works ends the wait with a 503
        # (uvicorn's own deadline would cut the connection without an answer)
        if st.cut_off_event is None:
            st.cut_off_event = asyncio.Event()
            if st.cut_off:
                st.cut_off_event.set()
        remote = asyncio.ensure_future(st.remote_prefill(list({tuple(g.prompt): g.prompt for g in gens}.values()),
                                                         prompt_param))
        cut = asyncio.ensure_future(st.cut_off_event.wait())
        watch = asyncio.ensure_future(until_disconnected(request.receive))
        try:
            await asyncio.wait({remote, cut, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            gone = watch.done() and not watch.cancelled()
            watch.cancel()
            unfinished = not remote.done()
            if unfinished:
                remote.cancel()
                await asyncio.wait({remote})     # httpx closes the connection as it unwinds
        if gone:                             # no answer is due (the prefill server's, if any, is dropped)
            if not remote.cancelled():
                remote.exception()
            raise ClientGone()
        if unfinished:
            raise APIError(503, "the server shut down before this request finished (--shutdown-grace ran out while "
                                "the prefill server computed its prompt)", code="shutting_down")
        remote.result()
        st.check_serving()
    return start_all(st, gens, prompt_param)


def start_all(st: ServerState, gens: list, prompt_param: str) -> asyncio.Queue:
    """Submit every stream; on any refusal abort those already submitted and raise the API error."""
    from .engine import ContextOverflow

    if st.cut_off:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if st.max_requests is not None and len(st.in_flight) + len(gens) > st.max_requests:
        # shed load before it queues: a client (the openai one does by itself) retries after a moment
        raise APIError(503, f"the server is at its limit of {st.max_requests} generations in flight "
                            f"(--max-requests; {len(st.in_flight)} now, this request asks for {len(gens)}): "
                            "retry shortly", code="server_overloaded", headers={"Retry-After": "1"})
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    try:
        for g in gens:
            g.start(loop, queue)
    except BaseException as e:
        for g in gens:
            g.abort()
        if isinstance(e, ContextOverflow):
            raise APIError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
        if isinstance(e, ValueError):
            raise APIError(400, str(e)) from None
        if isinstance(e, RuntimeError):
            raise APIError(503, str(e), code="engine_unavailable") from None
        raise
    st.in_flight.update(gens)
    return queue


async def deltas(st: ServerState, gens: list, queue: asyncio.Queue):
    """Every delta of ``gens`` as it arrives, until all are finished. Once a second without news,
    every stream is polled (nothing can be left waiting on a lost note) and a stopped engine is
    reported."""
    left = sum(not g.finished for g in gens)
    get = None
    try:
        while left:
            if get is None:
                get = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({get}, timeout=1.0)
            if done:
                ready, get = [get.result()], None
            else:
                st.check_engine()
                ready = [g for g in gens if not g.finished]
            for g in ready:
                was_finished = g.finished
                d = g.advance()
                if g.finished and not was_finished:
                    left -= 1
                    if g.error is not None:
                        st.check_engine()           # failed because the engine stopped: 503, else 500
                        raise APIError(500, f"the request failed in the engine: {g.error}", code="engine_error")
                    if g.finish_reason == "abort":  # no answer: the drain's grace ran out (or the engine aborted it)
                        if st.draining_since is not None:
                            raise APIError(503, "the server shut down before this request finished "
                                                "(--shutdown-grace ran out)", code="shutting_down")
                        raise APIError(503, "the engine aborted this request", code="aborted")
                if d is not None:
                    yield d
    finally:
        if get is not None:
            get.cancel()
        st.in_flight.difference_update(gens)


async def run_whole(st: ServerState, gens: list, queue: asyncio.Queue, request) -> None:
    """Wait for all of ``gens`` to finish, aborting them if the client goes away."""
    async def consume():
        async for _ in deltas(st, gens, queue):
            pass

    task = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(until_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
            return
        raise ClientGone()
    finally:
        watch.cancel()
        task.cancel()
        for g in gens:
            if not g.finished:
                g.abort()


def stream_response(st: ServerState, gens: list, queue: asyncio.Queue, request, head, chunks, tail, encode=None,
                    error_event=None, done: bool = True):
    """Server-sent events: ``head()`` (chunks before any token), ``chunks(delta)`` per delta,
    ``tail()`` (the usage chunk), then ``[DONE]`` (unless ``done`` is false); an error mid-stream is sent as
    an error event (``error_event(body)`` of OpenAI's error body; default: the body itself). ``encode``: a
    chunk as the text of its event (default :func:`dsv3.infer.openai_responses.sse`). A client that
    disconnects has its requests aborted at once."""
    from fastapi.responses import StreamingResponse

    from .openai_responses import sse

    encode = encode or sse
    error_event = error_event or (lambda body: body)

    def abort_all(_=None):
        for g in gens:
            if not g.finished:
                g.abort()

    async def events():
        watch = asyncio.ensure_future(until_disconnected(request.receive))
        watch.add_done_callback(lambda t: None if t.cancelled() else abort_all())
        try:
            for c in head():
                yield encode(c)
            async for d in deltas(st, gens, queue):
                for c in chunks(d):
                    yield encode(c)
            for c in tail():
                yield encode(c)
        except APIError as e:
            yield encode(error_event(e.body()))
        except Exception as e:  # noqa: BLE001 — a bug here must not cut the stream without a word
            logging.getLogger("dsv3.serve").exception("stream failed")
            yield encode(error_event(error_body(f"internal server error: {type(e).__name__}", "server_error")))
        finally:
            watch.cancel()
            abort_all()
        if done:
            yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------------------- endpoints
def usage_chunk(include: bool, cid: str, obj: str, created: int, model: str, usage) -> list:
    """The last streamed chunk with ``stream_options.include_usage``: no choices, the usage."""
    return [{"id": cid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage()}] \
        if include else []


async def completions(st: ServerState, request):
    """``POST /v1/completions``."""
    from .generation_stream import GenerationStream
    from .openai_responses import completion_logprobs, merge_logprobs, usage

    arrival = time.monotonic()
    body = await read_request(st, request, CompletionRequest)
    check(not body.suffix, "suffix: not supported by this server", "suffix")
    prompts = body.prompts()
    stops = body.stop_strings()
    include_usage = body.include_usage()
    n = body.n or 1
    best_of = body.best_of or n
    check(best_of >= n, f"best_of ({best_of}) must be >= n ({n})", "best_of")
    check(not (body.stream and best_of > n), "best_of > n cannot be streamed", "best_of")
    check(len(prompts) * best_of <= 64, f"{len(prompts)} prompts × {best_of} choices: at most 64 per request",
          "prompt" if best_of == 1 else "best_of" if body.best_of else "n")
    echo = bool(body.echo)
    check(body.max_tokens != 0 or echo, "max_tokens: must be >= 1 (0 is allowed with echo only)", "max_tokens")
    params = sampling_params(st, body)
    ids_list = await st.off_loop(tokenize_prompts, st, prompts)
    seed = secrets.randbits(63) if body.seed is None else body.seed
    engine_logprobs = body.logprobs if body.logprobs is not None else (0 if best_of > n else None)
    gens, echo_texts = [], []
    for i, ids in enumerate(ids_list):
        hide = body.max_tokens == 0
        mt = max_new_tokens(st, len(ids), 1 if hide else body.max_tokens, 16, "prompt", "max_tokens")
        p = prompts[i]
        echo_texts.append(p if isinstance(p, str) else st.tokenizer.decode(ids, skip_special_tokens=True))
        for j in range(best_of):
            k = i * best_of + j
            gens.append(GenerationStream(
                st.worker, st.tb, k, ids, mt, params, choice_seed(seed, k), stops, st.stop_ids,
                logprobs=engine_logprobs,
                prompt_logprobs=body.logprobs if echo and body.logprobs is not None else None,
                hide_output=hide, metrics=st.metrics, arrival=arrival))
    queue = await prefill_and_start(st, gens, "prompt", request)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    want_lp = body.logprobs is not None

    def prompt_part(g):
        text = echo_texts[g.index // n] if echo else ""
        lp = completion_logprobs(g.prompt_tokens_out()) if echo and want_lp else None
        return text, lp

    def the_usage():
        return usage(sum(len(x) for x in ids_list), sum(g.output_tokens for g in gens if not g.hide_output),
                     sum(g.cached_tokens for g in gens[::best_of]))

    if body.stream:
        def chunk(index, text, lp=None, finish=None):
            c = {"id": cid, "object": "text_completion", "created": created, "model": st.model_name,
                 "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return c

        echoed, by_index = set(), {g.index: g for g in gens}

        def head():
            return []

        def chunks(d):
            out = []
            if echo and d.index not in echoed:       # the prompt's logprobs exist once its prefill ran
                echoed.add(d.index)
                out.append(chunk(d.index, *prompt_part(by_index[d.index])))
            shift = len(echo_texts[d.index // n]) if echo else 0
            out.append(chunk(d.index, d.text, completion_logprobs(d.tokens, shift) if want_lp else None,
                             d.finish_reason))
            return out

        def tail():
            return usage_chunk(include_usage, cid, "text_completion", created, st.model_name, the_usage)

        return stream_response(st, gens, queue, request, head, chunks, tail)

    await run_whole(st, gens, queue, request)
    chosen = []
    for i in range(len(ids_list)):
        group = gens[i * best_of:(i + 1) * best_of]
        if best_of > n:
            group = sorted(group, key=lambda g: g.cumulative_logprob, reverse=True)[:n]
        for j, g in enumerate(group):
            g.index = i * n + j
            chosen.append(g)
    choices = []
    for g in chosen:
        text, lp = prompt_part(g)
        if want_lp:
            lp = merge_logprobs(lp, completion_logprobs(g.tokens, len(text)))
        choices.append({"index": g.index, "text": text + g.completion_text, "logprobs": lp,
                        "finish_reason": g.finish_reason})
    return {"id": cid, "object": "text_completion", "created": created, "model": st.model_name,
            "choices": choices, "usage": the_usage()}


@dataclasses.dataclass
class ChatPlan:
    """What a chat-style request (chat completions, the Responses API) generates from: the prompt's token
    ids, the tokens to generate, the grammar (a structured.GrammarSpec or None) and whether the answer is
    split into reasoning (--reasoning-parser) and into tool calls (tools given)."""
    ids: list
    max_tokens: int
    grammar: object
    reasoning: bool
    tools: bool


async def plan_chat(st: ServerState, messages: list[dict], tools, tool_choice, parallel: bool, grammar,
                    add_generation_prompt: bool, continue_final_message: bool, asked: int | None, tokens_param: str,
                    messages_param: str = "messages", format_param: str = "response_format") -> ChatPlan:
    """The shared preparation of chat completions and the Responses API: the checks of tool choice, grammar
    and continuation against each other, the tool-call grammar a forced choice needs, the grammar deferred
    past ``</think>`` with --reasoning-parser, the template rendered and tokenised and the grammar compiled
    (on the tokenising threads), and the tokens to generate (``asked``, the request's ``tokens_param``, or
    the rest of the context). Errors name the request's own fields (``messages_param``: the messages,
    ``format_param``: the output format)."""
    from .chat_template import ChatTemplateError
    from .reasoning import THINK_END
    from .tool_calls import tool_call_grammar

    if grammar is not None and continue_final_message:    # the grammar would start mid-message
        raise APIError(400, f"{format_param}: {grammar.kind} cannot be combined with continue_final_message (the "
                            "JSON would have to start in the middle of the continued message)",
                       param=format_param, code="invalid_parameter_combination")
    if tools is not None and tool_choice != "auto":       # "required" or a named function: the output is a call
        if grammar is not None:
            raise APIError(400, f"tool_choice: {json.dumps(tool_choice)} cannot be combined with {format_param} "
                                f"{grammar.kind} (the answer is a tool call)", param="tool_choice",
                           code="invalid_parameter_combination")
        if continue_final_message:
            raise APIError(400, "tool_choice: a forced tool call cannot be combined with continue_final_message (the "
                                "call would have to start in the middle of the continued message)",
                           param="tool_choice", code="invalid_parameter_combination")
        grammar = tool_call_grammar(tools, tool_choice, parallel)
    reasoning = st.reasoning_parser is not None
    if grammar is not None and reasoning:        # the thinking is free text: the grammar starts after </think>
        grammar = dataclasses.replace(grammar, after=THINK_END)

    def render():
        try:
            text = st.template.render(messages, add_generation_prompt, continue_final_message, tools)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param=messages_param) from None
        st.check_text_fits(text, messages_param)
        ids = st.tokenizer.encode_batch([text])[0]
        check(len(ids) > 0, f"{messages_param}: the chat template rendered no tokens", messages_param)
        return ids

    ids = await st.off_loop(render)
    if grammar is not None:
        await st.off_loop(st.check_grammar, grammar, format_param)
    mt = max_new_tokens(st, len(ids), asked, None, messages_param, tokens_param)
    return ChatPlan(ids, mt, grammar, reasoning, tools is not None)


async def chat_completions(st: ServerState, request):
    """``POST /v1/chat/completions``."""
    from .answer_parts import CALL, CONTENT, REASONING, AnswerStream, reasoning_token_count, split_answer
    from .generation_stream import GenerationStream
    from .openai_responses import chat_logprobs, usage

    arrival = time.monotonic()
    body = await read_request(st, request, ChatCompletionRequest)
    body.check_features()
    tools, tool_choice = body.tool_setup()          # tools None: none given, or tool_choice "none"
    messages = body.chat_messages()
    stops = body.stop_strings()
    include_usage = body.include_usage()
    n = body.n or 1
    check(body.top_logprobs is None or body.logprobs, "top_logprobs: requires logprobs: true", "top_logprobs")
    check(body.max_tokens != 0, "max_tokens: must be >= 1", "max_tokens")
    want_lp = bool(body.logprobs)
    params = sampling_params(st, body)
    grammar = body.response_format.grammar() if body.response_format is not None else None
    add_generation_prompt, continue_final_message = body.prompt_end()
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:     # one of them would be ignored (OpenAI: a 400)
        raise APIError(400, f"max_tokens ({body.max_tokens}) and max_completion_tokens ({body.max_completion_tokens}) "
                            "disagree: set one of them", param="max_tokens", code="invalid_parameter_combination")
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    plan = await plan_chat(st, messages, tools, tool_choice, body.parallel_tool_calls is not False, grammar,
                           add_generation_prompt, continue_final_message, asked,
                           "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
    ids, reasoning = plan.ids, plan.reasoning
    seed = secrets.randbits(63) if body.seed is None else body.seed
    gens = [GenerationStream(st.worker, st.tb, j, ids, plan.max_tokens, params, choice_seed(seed, j), stops,
                             st.stop_ids, logprobs=(body.top_logprobs or 0) if want_lp else None, metrics=st.metrics,
                             arrival=arrival, grammar=plan.grammar) for j in range(n)]
    queue = await prefill_and_start(st, gens, "messages", request)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    ends = {}                    # --reasoning-parser: each answer's position past </think>, for the usage

    def the_usage():
        out = usage(len(ids), sum(g.output_tokens for g in gens), gens[0].cached_tokens)
        if reasoning:                # as OpenAI reports them: the tokens up to the end of the thinking
            out["completion_tokens_details"] = {"reasoning_tokens": reasoning_token_count(gens, ends)}
        return out

    if body.stream:
        def chunk(index, delta, lp=None, finish=None):
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": st.model_name,
                 "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return c

        def head():
            return [chunk(g.index, {"role": "assistant", "content": ""}) for g in gens]

        # each answer split as it streams (answer_parts.AnswerStream): with --reasoning-parser its thinking
        # as reasoning_content; with tools, text that may begin a tool-call block is held back, and a block's
        # calls stream as OpenAI's do (id, type and name in a call's first tool_calls delta, then its
        # arguments in fragments as they are decoded), finish_reason "tool_calls"
        streams = {g.index: AnswerStream(reasoning, tools is not None) for g in gens}
        field = {REASONING: "reasoning_content", CONTENT: "content"}

        def part_chunks(index, parts, lp=None):
            out = []
            for kind, value in parts:            # the delta's logprobs go with its first chunk
                out.append(chunk(index, {"tool_calls": [value]} if kind == CALL else {field[kind]: value}, lp))
                lp = None
            return out

        def chunks(d):
            a = streams[d.index]
            lp = chat_logprobs(d.tokens, st.tb) if want_lp else None
            parts = a.feed(d.text)
            out = part_chunks(d.index, parts, lp)
            if not parts and d.tokens:           # tokens that show nothing yet: an empty chunk (their logprobs)
                out.append(chunk(d.index, {"reasoning_content": ""} if a.thinking else {"content": ""}, lp))
            if d.finish_reason is not None:
                parts, whole = a.finish()
                ends[d.index] = a.end
                out += part_chunks(d.index, parts)
                out.append(chunk(d.index, {}, None, "tool_calls" if whole else d.finish_reason))
            return out

        def tail():
            return usage_chunk(include_usage, cid, "chat.completion.chunk", created, st.model_name, the_usage)

        return stream_response(st, gens, queue, request, head, chunks, tail)

    await run_whole(st, gens, queue, request)

    def answer(g) -> tuple[dict, str]:
        thought, text, calls, ends[g.index] = split_answer(g.completion_text, reasoning, tools is not None)
        message = {"role": "assistant", "content": text}
        if reasoning:
            message["reasoning_content"] = thought
        if calls is not None:
            return dict(message, tool_calls=calls), "tool_calls"
        return message, g.finish_reason

    choices = []
    for g in gens:
        message, finish = answer(g)
        choices.append({"index": g.index, "message": message,
                        "logprobs": chat_logprobs(g.tokens, st.tb) if want_lp else None, "finish_reason": finish})
    return {"id": cid, "object": "chat.completion", "created": created, "model": st.model_name,
            "choices": choices, "usage": the_usage()}


async def responses(st: ServerState, request):
    """``POST /v1/responses``: OpenAI's Responses API, stateless (nothing is stored: ``previous_response_id``
    is refused, ``store`` true is answered as false). The input becomes chat messages and goes the chat path
    (:func:`plan_chat`: template, tools, grammars; answers split by :mod:`dsv3.infer.answer_parts`); the answer
    is a response object of output items (:class:`dsv3.infer.openai_responses.ResponseBuilder`), whole or as
    its stream of events."""
    from .answer_parts import AnswerStream, reasoning_token_count
    from .generation_stream import GenerationStream
    from .openai_protocol import ResponsesRequest
    from .openai_responses import ResponseBuilder, response_usage, sse_event

    arrival = time.monotonic()
    body = await read_request(st, request, ResponsesRequest)
    body.check_features()
    tools, tool_choice = body.tool_setup()          # tools None: none given, or tool_choice "none"
    messages = body.chat_messages()
    params = sampling_params(st, body)
    parallel = body.parallel_tool_calls is not False
    plan = await plan_chat(st, messages, tools, tool_choice, parallel, body.grammar(), True, False,
                           body.max_output_tokens, "max_output_tokens", messages_param="input",
                           format_param="text.format")
    seed = secrets.randbits(63) if body.seed is None else body.seed
    g = GenerationStream(st.worker, st.tb, 0, plan.ids, plan.max_tokens, params, choice_seed(seed, 0), [],
                         st.stop_ids, metrics=st.metrics, arrival=arrival, grammar=plan.grammar)
    queue = await prefill_and_start(st, [g], "input", request)
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    builder = ResponseBuilder({
        "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()), "error": None,
        "incomplete_details": None, "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "model": st.model_name, "parallel_tool_calls": parallel, "previous_response_id": None, "reasoning": None,
        "store": False, "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump")
        else body.tool_choice or "auto",
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled", "user": body.user,
        "metadata": body.metadata or {}})
    answer = AnswerStream(plan.reasoning, plan.tools)

    def finish(finish_reason: str) -> tuple[list, dict]:
        parts, calls = answer.finish()
        reasoning = reasoning_token_count([g], {0: answer.end}) if plan.reasoning else 0
        return builder.finish(parts, calls, finish_reason,
                              response_usage(len(plan.ids), g.output_tokens, g.cached_tokens, reasoning))

    if body.stream:
        def chunks(d):
            events = builder.feed(answer.feed(d.text))
            if d.finish_reason is not None:
                events += finish(d.finish_reason)[0]
            return events

        def error_event(err: dict) -> dict:
            e = err["error"]
            return builder.event("error", code=e["code"], message=e["message"], param=e["param"])

        return stream_response(st, [g], queue, request, builder.start, chunks, list, encode=sse_event,
                               error_event=error_event, done=False)

    await run_whole(st, [g], queue, request)
    builder.feed(answer.feed(g.completion_text))
    return finish(g.finish_reason)[1]


# --------------------------------------------------------------------------------------- the connections
def header_timeout_protocol(base: type, seconds: float, on_timeout=None) -> type:
    """``base`` (a uvicorn HTTP/1.1 protocol class: h11's, httptools' …) with a time limit on request headers.

    uvicorn reads a request's headers for as long as the client takes: a client that connects and sends part
    of them (or nothing) and then waits held its connection for ever (``--body-timeout`` starts only once
    the headers are in; uvicorn's keep-alive timer runs only between requests, and stops at the first byte
    of the next). Here a request's headers must be complete within ``seconds`` of the first of its bytes
    (of the connection's start, for its first request); else the connection is closed, after an answer 408
    in OpenAI's shape when part of a request came (none to a connection that sent nothing: its client may
    be about to use it, and would read a 408 as the answer to its request), and ``on_timeout(partial)`` is
    called. Between requests uvicorn's keep-alive timer rules, as before (also over the start of a pipelined
    request that came while the previous one was answered: closed after the keep-alive timeout, 5 s, unless
    more bytes come, which start this limit). Each waiting connection costs a timer and its buffer, never a
    task: others are answered meanwhile.

    What the subclass relies on, common to uvicorn's protocols (h11's is the one tested; httptools' has the
    same): ``cycle`` (the request being answered, made once its headers are complete; ``response_complete``
    once answered), ``transport`` and ``loop``."""
    body = json.dumps(error_body(f"the request headers did not arrive within {seconds:g} s (--header-timeout)",
                                 error_type(408), None, "request_timeout")).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class HeaderTimeoutProtocol(base):
        def connection_made(self, transport) -> None:
            self._header_timer, self._header_bytes, self._known_cycle = None, 0, None
            super().connection_made(transport)
            self._known_cycle = self.cycle
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._idle() and not self.transport.is_closing():
                self._arm_header_timer()             # the first bytes of a request on a kept-alive connection
            if self._header_timer is not None:
                self._header_bytes += len(data)
            super().data_received(data)
            self._note_new_request()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._note_new_request()             # a pipelined request may have begun

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _idle(self) -> bool:
            """No request is being read or answered: the next one's headers are awaited."""
            return self.cycle is None or self.cycle.response_complete

        def _note_new_request(self) -> None:
            if self.cycle is not self._known_cycle:      # a request's headers are complete: no limit meanwhile
                self._known_cycle = self.cycle
                self._cancel_header_timer()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(seconds, self._headers_timed_out)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.cycle is not self._known_cycle or not self._idle():
                return
            if self._header_bytes:
                self.transport.write(answer)
            self.transport.close()
            if on_timeout is not None:
                on_timeout(bool(self._header_bytes))

    HeaderTimeoutProtocol.__name__ = HeaderTimeoutProtocol.__qualname__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


# --------------------------------------------------------------------------------------- the app
class Gate:
    """ASGI middleware: the API key on ``/v1/*`` and ``/internal/*`` and the count of answers by status code."""

    def __init__(self, app, st: ServerState):
        self.app, self.st = app, st

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":          # the scheme is case-insensitive (RFC 9110 §11.1)
                scheme, _, key = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and \
                    hmac.compare_digest(key.strip(), self.st.api_key.encode("utf-8"))
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            if self.st.api_key and scope["path"].startswith(("/v1", "/internal")) and not self._authorized(scope):
                from fastapi.responses import JSONResponse

                e = APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                             code="invalid_api_key")
                await JSONResponse(e.body(), status_code=401)(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        except asyncio.CancelledError:
            status.append(499)
            raise
        except Exception:
            status.append(500)
            raise
        finally:
            self.st.metrics.http_requests.labels(code=str(status[0] if status else 499)).inc()


def create_app(worker, tokenizer, model_name: str = "dsv3", template=None, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, shutdown_grace: float = 30.0, role: str | None = None,
               remote_prefill=None, body_timeout: float = DEFAULT_BODY_TIMEOUT, reasoning_parser: str | None = None,
               max_requests: int | None = None):
    """The FastAPI app over a running :class:`dsv3.infer.worker.EngineWorker`. ``template``: a
    :class:`dsv3.infer.chat_template.ChatTemplate` (default: the DeepSeek-V3-style one). ``role``
    "prefill" adds ``POST /internal/prefill``; ``remote_prefill`` (a :class:`dsv3.infer.disagg.RemotePrefill`,
    role "decode") has every prompt prefilled there first. ``reasoning_parser`` ("deepseek_r1"): chat answers
    come as ``reasoning_content`` and ``content`` (:mod:`dsv3.infer.reasoning`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .chat_template import DEFAULT_TEMPLATE, ChatTemplate

    if template is None:
        template = ChatTemplate(DEFAULT_TEMPLATE, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                                is_default=True)
    st = ServerState(worker, tokenizer, model_name, template, api_key, max_body_bytes, shutdown_grace,
                     remote_prefill, body_timeout, reasoning_parser, max_requests)

    @asynccontextmanager
    async def lifespan(app):
        st.loop = asyncio.get_running_loop()
        yield
        st.begin_drain()
        left = st.shutdown_grace - (time.monotonic() - st.draining_since)
        await asyncio.to_thread(worker.close, max(left, 0.0))
        st.executor.shutdown(wait=False, cancel_futures=True)
        if remote_prefill is not None:
            await remote_prefill.close()

    app = FastAPI(title="dsv3", description="DeepSeek-V3-family models behind the OpenAI API", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)    # "/v1/completions/": a 404 in OpenAI's shape, not a bare 307
    app.state.st = st

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        # a 408 leaves the rest of the body unread: the connection cannot carry another request
        headers = {**({"Connection": "close"} if e.status == 408 else {}), **(e.headers or {})} or None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ClientGone)
    async def client_gone(_request, _e):
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        message = f"{e.detail}: {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(message, error_type(e.status_code)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, e):
        err = (e.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None
        return JSONResponse(error_body(f"{loc}: {err.get('msg', 'invalid request')}", "invalid_request_error", loc),
                            status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, e):
        logging.getLogger("dsv3.serve").error("%s %s failed", request.method, request.url.path,
                                              exc_info=(type(e), e, e.__traceback__))
        return JSONResponse(error_body(f"internal server error: {type(e).__name__}", "server_error"), status_code=500)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        stats = worker.stats()
        if not worker.alive:
            return JSONResponse({"status": "dead", "error": worker.error, **stats}, status_code=503)
        if st.draining_since is not None:
            return JSONResponse({"status": "draining", **stats}, status_code=503)
        return {"status": "ok", **stats}

    @app.get("/metrics")
    async def metrics():
        body, content_type = st.metrics.render()
        return Response(body, media_type=content_type)

    async def model_card():
        max_len = st.max_len
        if remote_prefill is not None:          # --role decode: the prefill server may take shorter prompts
            theirs = await remote_prefill.prompt_limit()
            if theirs is not None:
                max_len = min(max_len, theirs + 1)
        return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "dsv3",
                "max_model_len": max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [await model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        st.check_model(model_id)
        return await model_card()

    @app.post("/v1/completions")
    async def completions_route(request: Request):
        return await completions(st, request)

    @app.post("/v1/chat/completions")
    async def chat_route(request: Request):
        return await chat_completions(st, request)

    @app.post("/v1/responses")
    async def responses_route(request: Request):
        return await responses(st, request)

    if role == "prefill":
        from .disagg import PREFILL_PATH, prefill_info, prefill_route

        @app.post(PREFILL_PATH)
        async def prefill(request: Request):
            return await prefill_route(st, request)

        @app.get(PREFILL_PATH)
        async def prefill_layout():
            return prefill_info(st)

    return Gate(app, st)


# --------------------------------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("serve a model over the OpenAI API: /v1/completions, /v1/chat/completions and /v1/responses "
                     "(whole or streamed), /v1/models, /health, /metrics; all requests share one batched engine")
    p.epilog = ("example: dsv3 serve --model runs/tiny/final --served-model-name tiny --api-key sk-local, then "
                "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='sk-local')")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a model directory in the HF layout with its tokenizer.json (e.g. runs/tiny/final)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the --model argument as given)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* and /internal/* (default: $DSV3_API_KEY; "
                        "none: open; with --role decode also sent to the prefill server)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="requests decoded together in one forward (default 32; the cache pool bounds memory)")
    p.add_argument("--max-requests", type=int, default=None, metavar="N",
                   help="generations in flight (running and queued; n > 1 counts n) at most: a request beyond "
                        "gets 503 server_overloaded with Retry-After (default: no limit, everything queues)")
    p.add_argument("--cache-memory", type=float, default=None, metavar="GB",
                   help="GB for the paged latent cache (default: what --max-batch full-context requests need, "
                        "at most a quarter of free memory)")
    p.add_argument("--prefix-cache", default=None, metavar="DIR_OR_URL",
                   help="keep prompt-prefix latent blocks on disk (a path, mount or fsspec URL) and reuse them")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding (same output distribution, fewer forwards)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode steps replay CUDA graphs captured at startup, one per batch bucket (one launch "
                        "a step instead of hundreds; CUDA, BF16 models; with --speculative too; not with --ep)")
    from .generate import add_fp8_argument, add_memory_limit_argument
    add_fp8_argument(p)
    add_memory_limit_argument(p)
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="cpu, cuda, cuda:1 … (default: cuda when there is one)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads of the engine process (default on a CPU: all cores but one, which the "
                        "HTTP side keeps)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, metavar="N",
                   help=f"largest request body accepted; larger ones get 413 (default {DEFAULT_MAX_BODY}; "
                        "--role prefill's POST /internal/prefill takes at least what 64 of its longest prompts "
                        "as token ids need)")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT, metavar="S",
                   help=f"seconds a client may take to send its whole request body; then it gets 408 and its "
                        f"connection is closed (default {DEFAULT_BODY_TIMEOUT:g})")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT, metavar="S",
                   help=f"seconds a connection may take to send a request's headers (from its start, or the end of "
                        f"its previous answer); then it is closed, with a 408 when part of a request came "
                        f"(default {DEFAULT_HEADER_TIMEOUT:g})")
    p.add_argument("--shutdown-grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds requests in flight may take to finish before they are aborted "
                        "(default 30)")
    from .reasoning import PARSERS
    p.add_argument("--reasoning-parser", default=None, choices=PARSERS,
                   help="split a reasoning model's chat answers (DeepSeek-R1: '<think>…</think>' then the answer) "
                        "into message.reasoning_content and message.content (/v1/responses: a reasoning item, then "
                        "the message), streamed alike; tool calls and "
                        "response_format apply to the answer after </think> (default: none, the text is content)")
    from .disagg import add_role_arguments
    add_role_arguments(p)
    from .ep_engine import add_ep_arguments
    add_ep_arguments(p)


def check_args(args) -> None:
    """Flag values a server cannot start with: ValueError naming the flag (exit code 2)."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in 1 … 65535")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be >= 1")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch {args.max_batch}: must be >= 1")
    if args.max_requests is not None and args.max_requests < 1:
        raise ValueError(f"--max-requests {args.max_requests}: must be >= 1")
    if args.cache_memory is not None and not (math.isfinite(args.cache_memory) and args.cache_memory > 0):
        raise ValueError(f"--cache-memory {args.cache_memory}: must be a positive number of GB")
    if args.max_body_bytes < 1024:
        raise ValueError(f"--max-body-bytes {args.max_body_bytes}: must be >= 1024")
    if not (math.isfinite(args.body_timeout) and args.body_timeout > 0):
        raise ValueError(f"--body-timeout {args.body_timeout}: must be a positive number of seconds")
    if not (math.isfinite(args.header_timeout) and args.header_timeout > 0):
        raise ValueError(f"--header-timeout {args.header_timeout}: must be a positive number of seconds")
    if not (math.isfinite(args.shutdown_grace) and args.shutdown_grace >= 0):
        raise ValueError(f"--shutdown-grace {args.shutdown_grace}: must be a number of seconds >= 0")
    if args.api_key is not None and not args.api_key.strip():       # e.g. --api-key "$KEY" with KEY unset
        raise ValueError("--api-key: must not be empty (leave the flag out to serve without a key)")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name: must not be empty")
    from ..errors import check_device
    check_device("--device", args.device)
    if args.cuda_graphs:
        check_cuda_graphs_args(args)
    if args.prefix_cache and "://" not in args.prefix_cache:
        check_prefix_cache_dir(args.prefix_cache)
    from .disagg import check_role_args
    check_role_args(args)


def check_cuda_graphs_args(args) -> None:
    """--cuda-graphs needs a CUDA device and the plain single-process decode step."""
    import torch

    if getattr(args, "ep", None):
        raise ValueError("--cuda-graphs: not with --ep (the expert-parallel step's collectives are not captured)")
    if args.device == "cpu" or args.device.startswith("mps") or (args.device == "auto"
                                                                 and not torch.cuda.is_available()):
        raise ValueError(f"--cuda-graphs: needs a CUDA device (--device {args.device}"
                         + ("" if args.device != "auto" else ": no CUDA GPU here") + ")")


def check_prefix_cache_dir(path: str) -> None:
    """A local --prefix-cache directory exists or can be made, and can be written (a UserError otherwise)."""
    from ..errors import check_writable_dir

    check_writable_dir("--prefix-cache", path)


def check_listen(host: str, port: int) -> None:
    """Fail early, before a model is loaded, when ``host:port`` cannot be listened on."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)       # as uvicorn does
        try:
            sock.bind(addr)
        except OSError as e:
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def run(args) -> int:
    check_args(args)
    check_listen(args.host, args.port)
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"dsv3 serve needs the 'serve' extra ({e.name} is missing): pip install 'dsv3[serve]'") \
            from None
    from .chat_template import ChatTemplate
    from .generate import load_tokenizer
    from .worker import EngineWorker

    from ..hf import check_model_dir

    api_key = args.api_key if args.api_key is not None else os.environ.get("DSV3_API_KEY") or None
    from .generate import check_weights_fit

    cfg = check_model_dir(args.model)                     # config and weight headers, before the engine starts
    from .generate import check_fp8_flag

    check_fp8_flag(args.fp8, cfg, args.model)
    from .ep_engine import check_ep_args, serve_follower
    ep = check_ep_args(args, cfg)              # torchrun --nproc-per-node N … --ep N: ranks 1 … only step
    held = None if ep is None else (cfg.n_routed_experts + ep["redundant_experts"]) // ep["size"]
    check_weights_fit(args.model, cfg, args.device, args.fp8, args.memory_limit, "serving", experts=held,
                      extra=None if args.cache_memory is None else {"--cache-memory": args.cache_memory * (1 << 30)})
    tokenizer = load_tokenizer(args.model)                # the model itself loads in the engine process
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{args.model}: tokenizer.json has {tokenizer.vocab_size} ids but config.json's vocab_size "
                         f"is {cfg.vocab_size} (they belong to different models)")
    template = ChatTemplate.from_model_dir(args.model, tokenizer)
    cache_memory = None if args.cache_memory is None else int(args.cache_memory * (1 << 30))
    engine_kwargs = dict(max_batch=args.max_batch, cache_memory=cache_memory, speculative=args.speculative)
    if args.cuda_graphs:
        engine_kwargs["cuda_graphs"] = True
    if ep is not None and int(os.environ.get("RANK", "0")) > 0:
        return serve_follower(dict(model_dir=args.model, device=args.device, fp8=args.fp8, threads=args.threads,
                                   prefix_cache=args.prefix_cache, engine=engine_kwargs, ep=ep))
    where = "rank 0: " if ep is not None else ""

    def report_dead(error: str) -> None:
        # one write of the whole line: print() writes the text and the newline apart, and the HTTP log
        # (another thread) could land between them
        sys.stderr.write(f"dsv3 serve: error: {where}{error} (answering 503 until stopped)\n")
        sys.stderr.flush()

    worker = EngineWorker(args.model, device=args.device, fp8=args.fp8, threads=args.threads,
                          prefix_cache=args.prefix_cache, ep=ep, on_dead=report_dead, **engine_kwargs)
    name = args.served_model_name or os.path.normpath(args.model)      # as vLLM: the --model argument
    remote = None
    if args.role == "decode":
        from .disagg import RemotePrefill
        remote = RemotePrefill(args.prefill_url, args.prefill_timeout, worker.limits, api_key, args.prefix_cache)
        try:
            remote.check_at_start(lambda line: sys.stderr.write(f"dsv3 serve: warning: {line}\n"))
        except ValueError:
            worker.close(grace=0)
            raise
    app = create_app(worker, tokenizer, name, template, api_key, args.max_body_bytes, args.shutdown_grace,
                     args.role, remote, args.body_timeout, args.reasoning_parser, args.max_requests)
    st = app.st
    if st.max_len < worker.max_len:
        sys.stderr.write(f"dsv3 serve: the cache pool holds {st.max_len} positions of one request, fewer than the "
                         f"context ({worker.max_len}): requests are limited to {st.max_len} tokens (more "
                         "--cache-memory lifts this)\n")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):          # SIGTERM / SIGINT: answer 503 from now on, then drain
            st.begin_drain()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:                # a drained SIGTERM is a clean exit (0): uvicorn would
                captured = getattr(self, "_captured_signals", [])   # re-raise it after shutdown
                while signal.SIGTERM in captured:
                    captured.remove(signal.SIGTERM)

    # past the grace the server aborts what is left and answers it (503, or an error event): uvicorn's
    # own deadline, which cancels handlers (a bare 500, a stream cut without [DONE]), comes later
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    def header_timeout(partial: bool) -> None:      # a connection closed for its headers: counted as a 408
        if partial:
            st.metrics.http_requests.labels(code="408").inc()

    http = header_timeout_protocol(import_from_string(HTTP_PROTOCOLS["auto"]), args.header_timeout, header_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", http=http,
                            timeout_graceful_shutdown=args.shutdown_grace + 10, lifespan="on")
    try:
        Server(config).run()
    finally:
        worker.close(grace=0)
    return 1 if worker.failed else 0              # the engine stopped on its own: said when it happened
