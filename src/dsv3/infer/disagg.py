"""Disaggregated prefill (SPEC §3: DeepSeek serves the prefilling and the decoding stages on separate
instances, so long prompts never stall the running streams).

    dsv3 serve --model M --role prefill --prefix-cache /shared/kv --port 8001
    dsv3 serve --model M --role decode  --prefix-cache /shared/kv --prefill-url http://host:8001 --port 8000

Clients talk to the **decode** server only. For every request whose prompt holds at least one full
cache block, the decode server first posts the prompt's token ids to the prefill server
(``POST /internal/prefill``); the prefill server runs the prompt through its engine, which writes
the prompt's full latent-cache blocks to the shared on-disk prefix cache
(:mod:`dsv3.infer.prefix_cache`, DeepSeek's KV cache on 3FS: any shared path or fsspec URL) before
it answers. The decode server then enqueues the request in its own engine, whose prefix-cache lookup
reads those blocks and computes only the prompt's last partial block — so a long prompt costs the
decoding streams at most one block of prefill instead of the whole prompt. Both servers may be
expert-parallel groups (``torchrun … --ep N``); every rank reads the shared path.

The two servers must build identical cache blocks: the same model (the prefix cache's fingerprint),
block size and cache layers (``--speculative`` on both or neither), in the same storage. The decode
server checks this when it starts (``GET /internal/prefill``; a mismatch is one line and exit code 2),
on each answer, and by looking for each prompt's first block in its own ``--prefix-cache``; it fails
the request loudly (503 naming the mismatch) rather than silently computing the prompt itself. A
prefill server that cannot be reached is a 503 too; a prompt it cannot hold (its cache pool or context
is smaller) is a 400 ``context_length_exceeded`` naming the client's field, which the decode server
answers itself once it knows the prefill server's limit (``GET /internal/prefill``); its ``/v1/models``
reports the deployment's ``max_model_len``: the smaller of its own and the prefill server's longest
prompt + 1. A client that goes away while its prompts are on the prefill server has that call
cancelled: its connection closes, and the prefill server aborts the prompts as it would for any
client gone.
"""

from __future__ import annotations

ROLES = ("prefill", "decode")
PREFILL_PATH = "/internal/prefill"


def add_role_arguments(p) -> None:
    p.add_argument("--role", choices=ROLES, default=None,
                   help="disaggregated prefill: 'prefill' computes prompts into the shared --prefix-cache for a "
                        "decode server; 'decode' (with --prefill-url) has them prefilled there first")
    p.add_argument("--prefill-url", default=None, metavar="URL",
                   help="with --role decode: the prefill server's base URL (http://host:port)")
    p.add_argument("--prefill-timeout", type=float, default=None, metavar="S",
                   help="with --role decode: seconds a prompt may take on the prefill server (default 600)")


def check_role_args(args) -> None:
    """ValueError naming the flag for an inconsistent --role / --prefill-url / --prefix-cache."""
    import math
    from urllib.parse import urlparse

    if args.role is None:
        for flag, given in (("--prefill-url", args.prefill_url is not None),
                            ("--prefill-timeout", args.prefill_timeout is not None)):
            if given:
                raise ValueError(f"{flag} needs --role decode")
        return
    if not args.prefix_cache:
        raise ValueError(f"--role {args.role}: needs --prefix-cache PATH, the cache both servers share")
    if args.role == "prefill":
        for flag, given in (("--prefill-url", args.prefill_url is not None),
                            ("--prefill-timeout", args.prefill_timeout is not None)):
            if given:
                raise ValueError(f"{flag}: only for --role decode (this server is the prefill server)")
        return
    if args.prefill_url is None:
        raise ValueError("--role decode: needs --prefill-url URL of the prefill server")
    u = urlparse(args.prefill_url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"--prefill-url {args.prefill_url}: expected http://host:port")
    if args.prefill_timeout is None:
        args.prefill_timeout = 600.0
    if not (math.isfinite(args.prefill_timeout) and args.prefill_timeout > 0):
        raise ValueError(f"--prefill-timeout {args.prefill_timeout}: must be a positive number of seconds")


def cacheable(prompt: list[int], limits) -> bool:
    """Whether the prompt has a full block worth computing elsewhere (the engine computes at least the
    last token itself, and with ``lookahead`` the block's key covers one token more)."""
    return len(prompt) - 1 >= limits.block_size + limits.lookahead


class RemotePrefill:
    """The decode server's side: ``await remote(prompts)`` has the prefill server compute every
    cacheable prompt into the shared prefix cache (one HTTP call for all of them)."""

    def __init__(self, url: str, timeout: float, limits, api_key: str | None = None,
                 prefix_cache: str | None = None):
        """``prefix_cache``: this server's --prefix-cache, where every prompt the prefill server computed
        must then be found (checked by its first block)."""
        import httpx

        self.url = url.rstrip("/") + PREFILL_PATH
        self.limits = limits
        self.prefix_cache = prefix_cache
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(timeout=timeout, headers=headers)
        self.requests = self.prompt_tokens = 0
        self.max_prompt_len: int | None = None     # the prefill server's, once known (GET /internal/prefill)

    async def __call__(self, prompts: list[list[int]], param: str = "prompt") -> None:
        """``param``: the client's field the prompts came from, named in a 400 when the prefill server
        cannot take a prompt this server could (its context or cache pool is smaller)."""
        import httpx

        from .openai_protocol import APIError

        todo = [p for p in prompts if cacheable(p, self.limits)]
        if not todo:
            return
        theirs = await self.prompt_limit()
        longest = max(map(len, todo))
        if theirs is not None and longest > theirs:          # refused here: the prefill server would
            raise APIError(400, f"{param}: the prompt has {longest} tokens; this deployment's prefill server takes "
                                f"prompts of at most {theirs} (its context or cache pool holds {theirs + 1} "
                                "positions)", param=param, code="context_length_exceeded")
        try:
            r = await self.client.post(self.url, json={"prompts": todo})
        except httpx.HTTPError as e:
            raise APIError(503, f"the prefill server {self.url} cannot be reached: {type(e).__name__}: {e}",
                           code="prefill_unavailable") from None
        if r.status_code != 200:
            theirs = _error_of(r)
            if r.status_code == 400 and theirs.get("code") == "context_length_exceeded":
                # the request fits this server but not the prefill server: the deployment's limit is
                # the smaller one, and the client's prompt is what exceeds it
                raise APIError(400, f"{param}: too long for this deployment's prefill server, whose context or "
                                    f"cache pool is smaller than this server's: {theirs.get('message')}",
                               param=param, code="context_length_exceeded")
            raise APIError(503, f"the prefill server {self.url} answered {r.status_code}: {r.text[:300]}",
                           code="prefill_unavailable")
        theirs = r.json().get("prefix_cache")
        if theirs != self.limits.prefix_cache:
            raise APIError(503, f"the prefill server {self.url} builds cache blocks {theirs!r}, this server reads "
                                f"{self.limits.prefix_cache!r} (fingerprint/layers/lookahead): serve the same model "
                                f"with the same --speculative on both", code="prefill_mismatch")
        if self.prefix_cache is not None:
            import asyncio

            missing = await asyncio.get_running_loop().run_in_executor(None, self._missing, todo)
            if missing:
                raise APIError(503, f"the prefill server {self.url} computed the prompt, but its cache blocks are not "
                                    f"in this server's --prefix-cache {self.prefix_cache} ({missing} is missing): "
                                    "both servers must use the same shared --prefix-cache storage",
                               code="prefill_mismatch")
        self.requests += 1
        self.prompt_tokens += sum(map(len, todo))

    async def prompt_limit(self) -> int | None:
        """The longest prompt the prefill server takes (None while it cannot be asked): read when this
        server started, or asked now if it could not be then."""
        if self.max_prompt_len is None:
            import httpx

            try:
                r = await self.client.get(self.url, timeout=5)
                self._record(r.json() if r.status_code == 200 else None)
            except (httpx.HTTPError, ValueError):
                pass
        return self.max_prompt_len

    def _record(self, info) -> None:
        theirs = info.get("max_prompt_len") if isinstance(info, dict) else None
        if isinstance(theirs, int) and not isinstance(theirs, bool):
            self.max_prompt_len = theirs

    def _missing(self, prompts: list[list[int]]) -> str | None:
        """The first block file of a prompt that is not in this server's prefix cache (None: all there)."""
        from .prefix_cache import first_block_path

        for p in prompts:
            where = first_block_path(self.prefix_cache, self.limits.prefix_cache, p)
            if where is not None and not where[0].exists(where[1]):
                return where[1]
        return None

    def check_at_start(self, warn) -> None:
        """At the decode server's start: ask the prefill server what it builds (``GET /internal/prefill``).
        ValueError naming the flag when it cannot serve this server (another model or --speculative,
        another --api-key, not a prefill server at all); ``warn(line)`` when it cannot be reached yet
        (it may start later: until then long prompts get 503) or takes shorter prompts than this server
        (recorded: this server refuses longer ones itself and reports the smaller limit in /v1/models)."""
        import httpx

        auth = self.client.headers.get("Authorization")
        try:
            r = httpx.get(self.url, timeout=10, headers={"Authorization": auth} if auth else {})
        except httpx.HTTPError as e:
            warn(f"the prefill server {self.url} cannot be reached yet ({type(e).__name__}: {e}): prompts of a "
                 "full cache block or more get 503 until it can")
            return
        if r.status_code == 401:
            raise ValueError(f"--api-key: the prefill server {self.url} refuses this server's key (give both "
                             "servers the same --api-key)")
        if r.status_code == 503:
            warn(f"the prefill server {self.url} is not serving yet ({_error_of(r).get('message')})")
            return
        body = None
        if r.status_code == 200:
            try:
                body = r.json()
            except ValueError:
                pass
        if not isinstance(body, dict) or "prefix_cache" not in body:
            raise ValueError(f"--prefill-url {self.url.removesuffix(PREFILL_PATH)}: answers {r.status_code} on "
                             f"GET {PREFILL_PATH}: not a dsv3 serve --role prefill server")
        if body["prefix_cache"] != self.limits.prefix_cache:
            raise ValueError(f"--prefill-url {self.url.removesuffix(PREFILL_PATH)}: the prefill server builds cache "
                             f"blocks {body['prefix_cache']!r}, this server reads {self.limits.prefix_cache!r} "
                             "(fingerprint/layers/lookahead/block): serve the same model with the same --speculative "
                             "on both")
        self._record(body)
        theirs = self.max_prompt_len
        if theirs is not None and theirs < self.limits.max_request_len - 1:
            warn(f"the prefill server takes prompts of at most {theirs} tokens, fewer than this server's "
                 f"{self.limits.max_request_len - 1}: longer prompts get 400")

    async def close(self) -> None:
        await self.client.aclose()


def _error_of(response) -> dict:
    """The ``error`` object of an answer in OpenAI's error shape ({} for anything else)."""
    try:
        err = response.json().get("error")
    except (ValueError, AttributeError):
        return {}
    return err if isinstance(err, dict) else {}


MAX_PROMPTS = 64         # prompts in one POST /internal/prefill (a request's prompts × best_of, deduplicated)


def prefill_body_limit(max_prompt_len: int, vocab_size: int, client_limit: int) -> int:
    """The body size ``POST /internal/prefill`` accepts: the largest a decode server can legitimately send
    (64 prompts of ``max_prompt_len`` ids, each as wide as the widest id, ``vocab_size - 1``, with a
    separator of up to two bytes, ", "; each list's brackets and separator; the object's key), or
    ``client_limit`` (--max-body-bytes) if larger. The client's limit alone is too small: its text
    became token ids, which take more bytes as JSON than the text did (about 7 against 4 a token)."""
    per_prompt = max_prompt_len * (len(str(max(vocab_size - 1, 0))) + 2) + 4
    return max(client_limit, MAX_PROMPTS * per_prompt + 64)


def prefill_info(st) -> dict:
    """``GET /internal/prefill`` (the prefill server): the cache blocks it builds and the longest prompt it
    takes, which a decode server checks when it starts."""
    st.check_serving()
    return {"prefix_cache": st.worker.limits.prefix_cache, "max_prompt_len": st.max_len - 1}


async def prefill_route(st, request) -> dict:
    """``POST /internal/prefill`` ``{"prompts": [[token ids], …]}`` (the prefill server): run each prompt
    through the engine (one greedy token, which is discarded) so its full blocks are written to the
    prefix cache, and answer once they are: ``{"prefix_cache": layout, "prompt_tokens": n}``."""
    from .generation_stream import GenerationStream
    from .openai_protocol import APIError, check
    from .sampling import SamplingParams
    from .server import read_json, run_whole, start_all

    st.check_serving()
    body = await read_json(request, prefill_body_limit(st.max_len - 1, st.vocab_size, st.max_body_bytes),
                           limit_source="64 prompts of this server's longest as token ids, or --max-body-bytes",
                           timeout=st.body_timeout)
    prompts = body.get("prompts") if isinstance(body, dict) else None
    check(isinstance(prompts, list) and prompts and len(prompts) <= MAX_PROMPTS
          and all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                  for p in prompts), "prompts: a list of 1 … 64 non-empty token-id lists", "prompts")
    for i, p in enumerate(prompts):                  # one token is computed after each prompt
        if len(p) >= st.max_len:
            raise APIError(400, f"prompts[{i}] has {len(p)} tokens; this prefill server takes prompts of at most "
                                f"{st.max_len - 1} (its context or cache pool holds {st.max_len} positions)",
                           param="prompts", code="context_length_exceeded")
    gens = [GenerationStream(st.worker, st.tb, k, p, 1, SamplingParams(0.0), 0, [], set(), hide_output=True)
            for k, p in enumerate(prompts)]
    queue = start_all(st, gens, "prompts")
    await run_whole(st, gens, queue, request)
    return {"prefix_cache": st.worker.limits.prefix_cache, "prompt_tokens": sum(map(len, prompts))}
