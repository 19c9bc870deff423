"""One engine request as the HTTP server sees it: tokens in, text pieces and logprobs out.

:class:`GenerationStream` submits a request to the :class:`dsv3.infer.worker.EngineWorker` with
callbacks that only post a note to the event loop's queue (the engine thread never waits on the
server). On the event loop, :meth:`GenerationStream.advance` turns the tokens that arrived since the
last call into a :class:`Delta`: the text they add (incremental detokenisation, special tokens
hidden, held back while it could be the start of a ``stop`` string), their logprobs, and at the end
the ``finish_reason`` ("stop" for a stop token or string, "length", "abort", "error"). A matched stop
string aborts the engine request at once and finishes the stream; the stop string is not shown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .detokenize import IncrementalText, StopMatcher, TokenBytes


@dataclass
class TokenOut:
    """A shown token: its id, text (``bytes:\\xNN`` for part of a character), its logprob under the
    raw model distribution with the top alternatives, and where its text starts."""
    id: int
    text: str
    logprob: float | None = None
    top: list = field(default_factory=list)          # [(id, logprob, text)] best first
    offset: int = 0


@dataclass
class Delta:
    index: int                                       # the choice it belongs to
    text: str = ""
    tokens: list = field(default_factory=list)       # [TokenOut]
    finish_reason: str | None = None                 # set on the last delta of a choice


class GenerationStream:
    """Bridges one engine request to asyncio. Create, :meth:`start`, then call :meth:`advance`
    whenever the queue names this stream, until :attr:`finished`."""

    def __init__(self, worker, tb: TokenBytes, index: int, prompt: list[int], max_tokens: int, params, seed: int,
                 stops: list[str], stop_ids: set[int], logprobs: int | None = None,
                 prompt_logprobs: int | None = None, hide_output: bool = False, metrics=None,
                 arrival: float | None = None, grammar=None):
        self.worker, self.tb, self.index, self.prompt = worker, tb, index, prompt
        self.max_tokens, self.params, self.seed = max_tokens, params, seed
        self.stop_ids, self.logprobs, self.prompt_logprobs = set(stop_ids), logprobs, prompt_logprobs
        self.hide_output, self.metrics = hide_output, metrics
        self.grammar = grammar                           # a structured.GrammarSpec, or None
        self.arrival = time.monotonic() if arrival is None else arrival
        self.text = IncrementalText(tb)
        self.stopper = StopMatcher(stops)
        self.req = None
        self.seen = 0                        # output tokens consumed
        self.shown_text: list[str] = []      # the completion text so far, in pieces
        self.tokens: list[TokenOut] = []     # the shown tokens so far
        self.cumulative_logprob = 0.0
        self.finished = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._last_token_at: float | None = None

    # ------------------------------------------------------------------ engine side
    def start(self, loop, queue) -> None:
        """Submit; raises what ``worker.submit`` raises (ValueError, ContextOverflow, RuntimeError)."""
        def notify(_req):
            loop.call_soon_threadsafe(queue.put_nowait, self)

        self.req = self.worker.submit(self.prompt, self.max_tokens, self.params, self.seed,
                                      stop_ids=frozenset(self.stop_ids), logprobs=self.logprobs,
                                      prompt_logprobs=self.prompt_logprobs, on_token=notify, on_done=notify,
                                      grammar=self.grammar)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(self.prompt))

    def abort(self) -> None:
        if self.req is not None and not self.req.done:
            self.worker.abort(self.req)

    @property
    def output_tokens(self) -> int:
        """The tokens generated for this answer. A stream ended by a stop string counts those up to the
        one that completed it: the engine goes on generating until the abort reaches it (a step or
        more, two tokens a step when speculative), and those tokens are no part of the answer."""
        if self.req is None:
            return 0
        return self.seen if self.finished else len(self.req.output)

    @property
    def cached_tokens(self) -> int:
        return getattr(self.req, "cached_tokens", 0) if self.req is not None else 0

    # ------------------------------------------------------------------ event-loop side
    def advance(self) -> Delta | None:
        """The text and tokens that arrived since the last call (None if nothing did)."""
        if self.finished or self.req is None:
            return None
        req = self.req
        done = req.done                                  # read first: if done, the lists below are final
        n = len(req.output)
        if self.logprobs is not None and not done:
            n = min(n, len(req.output_logprobs))
        if not done and n > self.seen and req.output[n - 1] in self.stop_ids:
            n -= 1          # maybe the final stop token, appended just before ``done``: shown only if not
        delta = Delta(self.index)
        new = req.output[self.seen:n]
        now = time.monotonic()
        for j, tid in enumerate(new, start=self.seen):
            lp = req.output_logprobs[j] if self.logprobs is not None and j < len(req.output_logprobs) else None
            if lp is not None:
                self.cumulative_logprob += lp.logprob
            if self.hide_output:
                continue
            if j == len(req.output) - 1 and done and req.finish_reason == "stop" and tid in self.stop_ids:
                continue                                 # the stop token itself is not shown
            token = TokenOut(tid, self.tb.token_str(tid), offset=self.text.length)
            if lp is not None:
                token.logprob, token.top = lp.logprob, self._top(lp)
            delta.tokens.append(token)
            piece, matched = self.stopper.feed(self.text.push(tid))
            delta.text += piece
            if matched:                                  # the tokens after this one are not the answer's
                self._count(j + 1, now)
                self.abort()
                return self._finish(delta, "stop")
        self._count(n, now)
        if done:
            tail, _ = self.stopper.feed(self.text.flush())
            delta.text += tail + self.stopper.flush()
            reason = req.finish_reason
            if reason == "error":
                self.error = req.error or "the engine failed on this request"
            return self._finish(delta, {"eos": "stop"}.get(reason, reason or "stop"))
        if not (delta.text or delta.tokens):
            return None
        self._keep(delta)
        return delta

    def _count(self, seen: int, now: float) -> None:
        """The output tokens up to ``seen`` are consumed, arriving at ``now``: counted in the metrics with
        their latency (the first arrival's from the request's; k tokens at once, as from a speculative
        step, are k equal gaps). Tokens past a stop string's match are never consumed, so never timed."""
        k = seen - self.seen
        if self.metrics is not None and k > 0:
            self.metrics.completion_tokens.inc(k)
            if self._last_token_at is None:
                self.metrics.ttft.observe(now - self.arrival)
            else:
                for _ in range(k):
                    self.metrics.itl.observe((now - self._last_token_at) / k)
        if k > 0:
            self._last_token_at = now
        self.seen = seen

    def _finish(self, delta: Delta, reason: str) -> Delta:
        self.finished, self.finish_reason, delta.finish_reason = True, reason, reason
        self._keep(delta)
        return delta

    def _top(self, lp) -> list:
        return [(int(i), float(v), self.tb.token_str(int(i))) for i, v in lp.top]

    def _keep(self, delta: Delta) -> None:
        self.shown_text.append(delta.text)
        self.tokens.extend(delta.tokens)

    @property
    def completion_text(self) -> str:
        return "".join(self.shown_text)

    def prompt_tokens_out(self) -> list[TokenOut]:
        """The prompt's tokens for ``echo`` with logprobs (the first has none), offsets into the
        prompt text."""
        text = IncrementalText(self.tb)
        lps = getattr(self.req, "prompt_logprobs_out", None) or []
        out = []
        for i, tid in enumerate(self.prompt):
            t = TokenOut(tid, self.tb.token_str(tid), offset=text.length)
            lp = lps[i] if i < len(lps) else None
            if lp is not None:
                t.logprob, t.top = lp.logprob, self._top(lp)
            text.push(tid)
            out.append(t)
        return out
