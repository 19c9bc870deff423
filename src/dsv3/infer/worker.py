"""The engine in a process of its own: the server's event loop never waits for a step.

    worker = EngineWorker("runs/tiny/final", max_batch=32)     # loads the model in the engine process
    req = worker.submit(prompt_ids, 64, SamplingParams(0.8), seed=1, on_token=f, on_done=g)
    worker.abort(req)               # e.g. the client went away; finished with "abort" within one step
    worker.close(grace=30)          # stop taking requests, let running ones finish, then abort the rest

As in vLLM's split of API server and engine core, the HTTP side (parsing, tokenising, detokenising,
streaming) and the model's steps run in two processes, so neither waits for the other's Python
(the GIL) and each gets a core of its own. They talk over a pipe: requests and aborts go in; after
every step one message comes back with each changed request's new tokens (and log-probabilities),
its end, and the engine's counters.

``submit`` validates at once in the caller (ValueError / :class:`dsv3.infer.engine.ContextOverflow`,
checked against the engine's :class:`~dsv3.infer.engine.EngineLimits`) and returns a
:class:`~dsv3.infer.engine.Request` that mirrors the engine's: its ``output``, ``output_logprobs``,
``prompt_logprobs_out`` grow, then ``finish_reason``/``error`` are set and ``done`` last. Callbacks
run on the worker's receiving thread: ``on_token(req)`` when new tokens arrived, ``on_done(req)``
once. A step that fails finishes the requests in it with an error and the engine goes on; if the
engine process itself dies, ``alive`` turns False, ``error`` says why and every request in flight
finishes with an error. An engine that cannot go on after a failed step (a lockstep group that lost
a rank) raises :class:`EngineFailed`: its process sends the one-line reason and exits, so ``error``
says it; ``on_dead(error)`` (if given) runs once when the engine has stopped without being closed.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback

from .engine import Request, check_request
from .sampling import SamplingParams


class EngineFailed(RuntimeError):
    """The engine cannot go on (raised by its ``step``, ``fail_all`` or ``close``); the message is one line."""


class EngineWorker:
    def __init__(self, model_dir: str, *, device: str = "auto", fp8: str = "auto", threads: int | None = None,
                 prefix_cache: str | None = None, ep: dict | None = None, on_dead=None, **engine_kwargs):
        """Start the engine process: it loads ``model_dir`` (see :func:`dsv3.infer.generate.load_model_dir`)
        and builds :class:`dsv3.infer.engine.Engine` with ``engine_kwargs``. ``threads``: torch threads
        for the engine (default on a CPU: all cores but one, which the HTTP side keeps). ``prefix_cache``:
        a directory or URL for the on-disk prefix cache. ``ep``: serve as rank 0 of an expert-parallel group
        under torchrun (:func:`dsv3.infer.ep_engine.check_ep_args`; the engine process joins the group).
        Raises ValueError with the engine's own message
        when it cannot start (a bad directory, an impossible setting)."""
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        spec = dict(model_dir=model_dir, device=device, fp8=fp8, threads=threads, prefix_cache=prefix_cache,
                    engine=engine_kwargs, ep=ep)
        self._proc = ctx.Process(target=_engine_process, args=(child, spec), name="dsv3-engine", daemon=True)
        self._proc.start()
        child.close()
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            raise ValueError(f"the engine process exited while starting (code {self._proc.exitcode})") from None
        if msg[0] == "error":
            self._proc.join(5)
            raise ValueError(msg[1])
        _, self.limits, self._stats = msg
        self.max_len, self.vocab_size = self.limits.max_len, self.limits.vocab_size
        self.accepting = True
        self.error: str | None = None
        self.failed = False                # the engine stopped without being closed
        self._on_dead = on_dead
        self._alive = True
        self._reqs: dict[int, Request] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._rx = threading.Thread(target=self._receive, name="dsv3-engine-rx", daemon=True)
        self._rx.start()

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def pid(self) -> int | None:
        """The engine process's id."""
        return self._proc.pid

    def submit(self, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None, seed: int = 0,
               stop_ids=frozenset(), logprobs: int | None = None, prompt_logprobs: int | None = None,
               on_token=None, on_done=None, grammar=None) -> Request:
        """``grammar``: a :class:`dsv3.infer.structured.GrammarSpec` (the engine builds its matcher; a
        grammar it cannot build finishes the request with an error)."""
        if not self._alive:
            raise RuntimeError(f"the engine has stopped: {self.error}")
        if not self.accepting:
            raise RuntimeError("the server is shutting down")
        params = params or SamplingParams()
        check_request(self.limits, prompt, max_new_tokens, logprobs, prompt_logprobs)
        req = Request(list(prompt), max_new_tokens, params, seed, frozenset(stop_ids), logprobs, prompt_logprobs,
                      on_token, on_done, next(self._ids), grammar)
        self._reqs[req.id] = req
        self._send(("submit", req.id, req.prompt, max_new_tokens, params, seed, req.stop_ids, logprobs,
                    prompt_logprobs, grammar))
        return req

    def abort(self, req: Request) -> None:
        if req.done or not self._alive:      # a dead engine's requests are failed by the receiving thread
            return
        try:
            self._send(("abort", req.id))
        except RuntimeError:
            pass

    def stats(self) -> dict:
        """The engine's counters as of its last step."""
        return dict(self._stats, alive=self._alive)

    def _send(self, msg) -> None:
        with self._send_lock:
            try:
                self._conn.send(msg)
            except (OSError, EOFError, BrokenPipeError) as e:
                raise RuntimeError(f"the engine has stopped: {self.error or e}") from None

    # ------------------------------------------------------------------ results
    def _receive(self) -> None:
        closed = False
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "closed":
                    closed = True
                    break
                if msg[0] == "failed":
                    self.error = msg[1]
                    break
                _, deltas, stats = msg
                if stats is not None:
                    self._stats = stats
                for d in deltas:
                    self._apply(*d)
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 — a bug here must not hang every client: fail them below
            traceback.print_exc()
        self._stopped(closed)

    def _stopped(self, closed: bool) -> None:
        """The engine is gone: say why (before ``alive`` turns False), fail what was in flight."""
        if not closed and self.error is None:
            self._proc.join(1)
            self.error = f"the engine process exited ({exit_status(self._proc.exitcode)})"
        self.failed = not closed
        self._alive = False
        for req in list(self._reqs.values()):
            self._apply(req.id, [], [], [], True, "error", self.error or "the engine was closed", req.cached_tokens)
        if self.failed and self._on_dead is not None:
            self._on_dead(self.error)

    def _apply(self, *delta) -> None:
        apply_delta(self._reqs, *delta)

    # ------------------------------------------------------------------ shutdown
    def close(self, grace: float = 30.0) -> None:
        """Stop taking requests; the engine lets the ones in flight finish for up to ``grace``
        seconds, aborts the rest, and exits."""
        self.accepting = False
        if self._alive:
            try:
                self._send(("close", max(float(grace), 0.0)))
            except RuntimeError:
                pass
            self._rx.join(max(grace, 0.0) + 15)
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._alive = False


def exit_status(code: int | None) -> str:
    """A process exit code in words: "code 1", "killed by SIGKILL"."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"code {code}"


# ---------------------------------------------------------------------- the engine process
def _engine_process(conn, spec: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the server drains on Ctrl-C / SIGTERM, then closes us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = _build_engine(spec)
    except Exception as e:  # noqa: BLE001 — the caller raises it as one clear line
        message = str(e) if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):              # unless the server has gone meanwhile (stopped)
            conn.send(("error", message))
        return
    try:
        conn.send(("ready", engine.limits, engine.stats()))
    except OSError:                                     # the server was stopped while the model loaded
        if hasattr(engine, "close"):                    # expert-parallel: release the other ranks
            with contextlib.suppress(EngineFailed):
                engine.close()
        return
    try:
        _EngineLoop(engine, conn).run()
    except EngineFailed as e:                           # the server reports it; nothing is left to close
        with contextlib.suppress(OSError):
            conn.send(("failed", str(e)))
        sys.stderr.flush()
        os._exit(1)                                     # not through a broken process group's teardown


def _build_engine(spec: dict):
    import torch

    from .engine import Engine
    from .generate import load_model_dir

    if spec.get("ep"):
        from .ep_engine import Rank0Engine, build_ep_engine
        return Rank0Engine(build_ep_engine(spec))
    threads = spec["threads"]
    model, _ = load_model_dir(spec["model_dir"], spec["device"], fp8=spec["fp8"])
    if threads is None and next(model.parameters()).device.type == "cpu":
        threads = max(1, len(os.sched_getaffinity(0)) - 1)
    if threads:
        torch.set_num_threads(threads)
    store = None
    if spec["prefix_cache"]:
        from .prefix_cache import PrefixCache
        store = PrefixCache(spec["prefix_cache"], model, spec["engine"].get("block_size", 64))
    from .generate import load_tokenizer
    from .structured import Grammars

    # structured output: the tokenizer is read (and xgrammar imported) when the first request asks for it
    grammars = Grammars(lambda: load_tokenizer(spec["model_dir"]), model.cfg.vocab_size)
    return Engine(model, prefix_cache=store, grammars=grammars, **spec["engine"])


class _EngineLoop:
    """Take requests and aborts from the pipe between steps; after each step send what changed."""

    def __init__(self, engine, conn):
        self.engine, self.conn = engine, conn
        self.reqs: dict[int, Request] = {}               # by the caller's id
        self.sent: dict[int, tuple[int, int, int]] = {}  # tokens, logprobs, prompt logprobs sent
        self.deadline: float | None = None               # closing: abort what is left at this time
        self.stats_sent = 0.0                            # when the engine's counters were last sent
        self.shape_sent = (0, 0)                         # (running, waiting) they said

    def run(self) -> None:
        """Serve until closed (or until the server has gone), then close the engine if it has a ``close``
        (expert-parallel: release the other ranks). EngineFailed passes through."""
        served = self._serve()
        if hasattr(self.engine, "close"):
            self.engine.close()
        if served:
            self.conn.send(("closed",))

    def _serve(self) -> bool:
        """Step until closed and drained (True) or until the server has gone (False)."""
        engine = self.engine
        while True:
            try:
                if not self._take(block=engine.idle and self.deadline is None):
                    return False                         # the server went away
            except (EOFError, OSError):
                return False
            if self.deadline is not None:
                if engine.idle:
                    break
                if time.monotonic() > self.deadline:
                    for req in list(engine.running) + list(engine.waiting):
                        engine.abort(req)
            if not engine.idle:
                try:
                    engine.step()
                except EngineFailed:
                    raise
                except Exception as e:  # noqa: BLE001 — outside any one forward: fail what it held
                    traceback.print_exc()
                    engine.fail_all(f"{type(e).__name__}: {e}")
            self._report()
        self._report()
        return True

    def _take(self, block: bool) -> bool:
        """Handle every message waiting (after up to 0.2 s of waiting when ``block``). False on 'exit'."""
        timeout = 0.2 if block else 0.0
        while self.conn.poll(timeout):
            timeout = 0.0
            msg = self.conn.recv()
            if msg[0] == "submit":
                rid, prompt, max_new, params, seed, stop_ids, logprobs, prompt_logprobs, grammar = msg[1:]
                try:
                    req = self.engine.make_request(prompt, max_new, params, seed, stop_ids, logprobs, prompt_logprobs,
                                                   grammar=grammar)
                except ValueError as e:
                    self.conn.send(("step", [(rid, [], [], [], True, "error", str(e), 0)], self.engine.stats()))
                    continue
                self.reqs[rid] = req
                self.sent[rid] = (0, 0, 0)
                self.engine.enqueue(req)
            elif msg[0] == "abort":
                req = self.reqs.get(msg[1])
                if req is not None:
                    self.engine.abort(req)
            elif msg[0] == "close":
                self.deadline = time.monotonic() + msg[1]
        return True

    def _report(self) -> None:
        deltas = take_deltas(self.reqs, self.sent)
        now, engine = time.monotonic(), self.engine
        shape = (len(engine.running), len(engine.waiting))
        stats = None              # the counters: when who runs changes, else at most 20 times a second
        if shape != self.shape_sent or now - self.stats_sent >= 0.05 or engine.idle:
            stats, self.stats_sent, self.shape_sent = engine.stats(), now, shape
        if deltas or stats is not None:
            self.conn.send(("step", deltas, stats))


# ---------------------------------------------------------------------- deltas (also dsv3.infer.ep_engine)
def take_deltas(reqs: dict, sent: dict) -> list[tuple]:
    """What changed in the engine's requests ``reqs`` (caller's id → Request) since ``sent`` (id →
    counts sent): one tuple per changed request for :func:`apply_delta`; finished ones are dropped."""
    deltas = []
    for rid, req in list(reqs.items()):
        n_tok, n_lp, n_plp = sent[rid]
        tokens, lps, plps = req.output[n_tok:], req.output_logprobs[n_lp:], req.prompt_logprobs_out[n_plp:]
        if tokens or lps or plps or req.done:
            deltas.append((rid, tokens, lps, plps, req.done, req.finish_reason, req.error, req.cached_tokens))
            sent[rid] = (len(req.output), len(req.output_logprobs), len(req.prompt_logprobs_out))
        if req.done:
            del reqs[rid], sent[rid]
    return deltas


def apply_delta(reqs: dict, rid, tokens, logprobs, prompt_logprobs, done, reason, error, cached) -> None:
    """Grow the mirror request ``reqs[rid]`` by one delta of :func:`take_deltas` and run its callbacks;
    a finished request leaves ``reqs``."""
    req = reqs.get(rid)
    if req is None or req.done:
        return
    req.prompt_logprobs_out.extend(prompt_logprobs)
    req.output_logprobs.extend(logprobs)
    req.output.extend(tokens)
    req.cached_tokens = cached
    if done:
        req.finish_reason, req.error = reason, error
        req.done = True                          # last: a reader that sees done sees final lists
        del reqs[rid]
    for cb in ((req.on_token,) if tokens else ()) + ((req.on_done,) if done else ()):
        if cb is not None:
            try:
                cb(req)
            except Exception:  # noqa: BLE001 — a consumer's bug stays its own
                traceback.print_exc()
