"""``dsv3 serve``: an HTTP server over the batched engine, with OpenAI-style completions.

    dsv3 serve --model RUN/final [--host 127.0.0.1] [--port 8000] [--max-batch 8]
               [--prefix-cache DIR_OR_URL [--prefix-block 64]] [--speculative]

    POST /v1/completions  {"prompt": "def ", "max_tokens": 64, "temperature": 0.8, "top_p": 0.95,
                           "top_k": 0, "seed": 0, "stream": false}
    GET  /v1/models, GET /health

One background thread runs the engine (:class:`dsv3.infer.engine.Engine`): every request in flight
shares its batched decode steps; ``"stream": true`` returns server-sent events, one per piece of
text, then ``data: [DONE]``. A bad request gets HTTP 400 (or 422 for a malformed body) naming the
field. fastapi and uvicorn are needed (``pip install 'dsv3[serve]'``); importing this module is not
enough to need them.
"""

import argparse                 # no `from __future__ import annotations`: FastAPI reads the body type
import asyncio
import json
import os
import threading
import time
import uuid

from .engine import Engine


class TextStream:
    """Incremental detokenisation: the text a growing list of ids adds, withheld while it ends in a
    partial UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def push(self, tid: int) -> str:
        self.ids.append(tid)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece


class EngineWorker:
    """Runs ``engine.step()`` on a background thread whenever there is work; thread-safe submit."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="dsv3-engine", daemon=True)
        self._thread.start()

    def submit(self, *args, **kwargs):
        with self._lock:
            req = self.engine.submit(*args, **kwargs)
        self._wake.set()
        return req

    def _loop(self):
        while not self._stop:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            while not self._stop:
                with self._lock:
                    if self.engine.idle:
                        break
                    self.engine.step()

    def close(self):
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)


def create_app(model, tokenizer, model_name: str = "dsv3", max_batch: int = 8, prefix_cache=None,
               speculative: bool = False):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, Field

    worker = EngineWorker(Engine(model, max_batch=max_batch, prefix_cache=prefix_cache, speculative=speculative))

    class CompletionRequest(BaseModel):
        prompt: str
        max_tokens: int = Field(64, ge=1)
        temperature: float = Field(1.0, ge=0)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=0)
        seed: int = 0
        stream: bool = False

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="dsv3", description="DeepSeek-V3-family completions on the dsv3 engine", lifespan=lifespan)
    app.state.worker = worker

    @app.get("/health")
    def health():
        e = worker.engine
        return {"status": "ok", "running": len(e.running), "waiting": len(e.waiting), "steps": e.steps,
                "prompt_tokens": e.prompt_tokens, "prompt_tokens_from_disk_cache": e.cached_prompt_tokens,
                "speculative_acceptance_rate": e.acceptance_rate if e.speculative else None}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stream = TextStream(tokenizer)

        def on_token(tid):                     # engine thread → event loop
            loop.call_soon_threadsafe(queue.put_nowait, stream.push(tid))

        def on_done(_req):                     # the end of the stream
            loop.call_soon_threadsafe(queue.put_nowait, None)

        ids = tokenizer.encode(body.prompt)
        try:
            req = worker.submit(ids, body.max_tokens, body.temperature, body.top_k, body.top_p, body.seed,
                                tokenizer.eos_id, on_token, on_done)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e))
        cid, created = f"cmpl-{uuid.uuid4().hex[:16]}", int(time.time())

        async def pieces():
            while (piece := await queue.get()) is not None:
                yield piece

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": len(req.output),
                    "total_tokens": len(ids) + len(req.output)}

        if not body.stream:
            text = "".join([p async for p in pieces()])
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": req.finish_reason}], "usage": usage()}

        def chunk(text, finish_reason=None):
            return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": created,
                                          "model": model_name, "choices": [{"index": 0, "text": text,
                                                                            "finish_reason": finish_reason}]}) + "\n\n"

        async def events():
            async for piece in pieces():
                if piece:
                    yield chunk(piece)
            yield chunk("", req.finish_reason)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model directory in the HF layout (with tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one forward")
    p.add_argument("--prefix-cache", default=None, metavar="DIR_OR_URL",
                   help="keep prompt-prefix latent caches on disk (any path, mount or fsspec URL) and reuse them")
    p.add_argument("--prefix-block", type=int, default=64, help="tokens per prefix-cache block")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding in the engine (same output distribution, fewer forwards)")
    p.add_argument("--device", default="auto")


def run(args) -> int:
    from .generate import load_model_dir

    try:
        import uvicorn
    except ImportError:
        raise ValueError("dsv3 serve needs fastapi and uvicorn: pip install 'dsv3[serve]'") from None
    model, tokenizer = load_model_dir(args.model, args.device)
    store = None
    if args.prefix_cache:
        from .prefix_cache import PrefixCache
        store = PrefixCache(args.prefix_cache, model, args.prefix_block)
    app = create_app(model, tokenizer, os.path.basename(os.path.normpath(args.model)), args.max_batch, store,
                     args.speculative)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
