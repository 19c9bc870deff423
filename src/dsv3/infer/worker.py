"""The engine on its own thread: callers submit and abort without ever waiting for a step.

    worker = EngineWorker(Engine(model, max_batch=32))
    req = worker.submit(prompt_ids, 64, SamplingParams(0.8), seed=1, on_token=f, on_done=g)
    worker.abort(req)               # e.g. the client went away; finished with "abort" within one step
    worker.close(grace=30)          # stop taking requests, let running ones finish, then abort the rest

``submit`` validates at once (ValueError / :class:`dsv3.infer.engine.ContextOverflow`) and hands the
request to the engine thread through a queue; the engine thread takes queued requests and aborts
between steps. Callbacks run on the engine thread. A step that fails finishes the requests in it
with an error and the engine goes on; only a failure outside any request stops the worker, which
then says so (``alive``, ``error``) and fails everything it holds.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback

from .engine import Engine, Request
from .sampling import SamplingParams


class EngineWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.alive = True
        self.error: str | None = None
        self.accepting = True
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()     # ("submit"|"abort", request)
        self._stats = engine.stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dsv3-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None, seed: int = 0,
               stop_ids=frozenset(), logprobs: int | None = None, prompt_logprobs: int | None = None,
               on_token=None, on_done=None) -> Request:
        if not self.alive:
            raise RuntimeError(f"the engine has stopped: {self.error}")
        if not self.accepting:
            raise RuntimeError("the server is shutting down")
        req = self.engine.make_request(prompt, max_new_tokens, params, seed, stop_ids, logprobs, prompt_logprobs,
                                       on_token, on_done)
        self._inbox.put(("submit", req))
        return req

    def abort(self, req: Request) -> None:
        if not req.done:
            self._inbox.put(("abort", req))

    def stats(self) -> dict:
        """The engine's counters as of its last step (read without stopping it)."""
        return dict(self._stats, alive=self.alive)

    # ------------------------------------------------------------------ the engine thread
    def _take(self, block: bool) -> None:
        try:
            kind, req = self._inbox.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            if kind == "submit":
                self.engine.enqueue(req)
            else:
                self.engine.abort(req)
            try:
                kind, req = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._take(block=self.engine.idle)
                if not self.engine.idle:
                    try:
                        self.engine.step()
                    except Exception as e:  # noqa: BLE001 — outside any one forward: fail what it held
                        traceback.print_exc()
                        self.engine.fail_all(f"{type(e).__name__}: {e}")
                self._stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 — report, fail what is held, stop
            self.error = f"{type(e).__name__}: {e}"
            self.alive = False
            traceback.print_exc()
            try:
                self._take(block=False)
                self.engine.fail_all(f"the engine stopped: {self.error}")
            except BaseException:  # noqa: BLE001
                pass
        finally:
            self._stats = self.engine.stats()

    # ------------------------------------------------------------------ shutdown
    def close(self, grace: float = 30.0) -> None:
        """Stop taking requests; wait up to ``grace`` seconds for the ones in flight, abort the rest."""
        self.accepting = False
        deadline = time.monotonic() + max(grace, 0.0)
        while self.alive and time.monotonic() < deadline and not (self.engine.idle and self._inbox.empty()):
            time.sleep(0.02)
        if self.alive:
            for req in list(self.engine.running) + list(self.engine.waiting):
                self.abort(req)
            t_end = time.monotonic() + 5
            while self.alive and time.monotonic() < t_end and not (self.engine.idle and self._inbox.empty()):
                time.sleep(0.02)
        self._stop.set()
        self._thread.join(timeout=5)
