"""Expert-parallel serving: N ranks in lockstep, attention data-parallel, every MoE expert-parallel.

    comm = Mesh.from_env(ep=world, gpus_per_node=G).expert_comm()
    model = load_ep_model("runs/tiny/final", comm, two_hop=True)    # this rank's experts only
    ep = EPEngine(model, max_batch=32)                               # on every rank
    if rank == 0:
        req = ep.submit(prompt_ids, 64, SamplingParams(0.8), seed=1) # placed on the least loaded rank
        ep.run()                                                     # req.output, req.finish_reason
        ep.close()                                                   # the other ranks' serve() returns
    else:
        ep.serve()

Each rank is an attention data-parallel replica: its own :class:`~dsv3.infer.engine.Engine` with its
own requests and paged latent cache. Every MoE layer is an
:class:`~dsv3.parallel.expert.ExpertParallelMoE` over all ranks (the DeepSeek-V3 deployment of
report §3.4): a rank holds only its experts, and a token's rows travel to the ranks holding its
experts and back.

One step (:meth:`EPEngine.step`, collective over every rank):

1. Every rank applies the commands rank 0 sent in the previous step's exchange: the requests it
   placed (each on the rank with the fewest unfinished requests, then the least cache use), the
   aborts, the end of serving.
2. **Engine step** on every rank. After planning its prefill, each rank says whether it has a
   prefill chunk and whether it may decode this step; the step's one exchange (an all-gather of
   small objects) gives every rank every rank's flags, so every rank runs the same forwards — a
   rank without rows for a forward takes part in each of its MoE layers with zero tokens
   (:meth:`EPEngine.empty_forward`): it sends nothing but computes its experts for the other
   ranks' rows. With ``speculative`` the MTP forward follows the trunk in both forwards, on every
   rank alike. The same exchange carries rank 0's new commands and every rank's report of its
   previous step (new tokens, counters), which rank 0 applies to its mirror requests (callbacks
   ``on_token`` / ``on_done`` run there): two collectives of control per step in all.

**Live redundant experts** (report §3.4): with ``--redundant-experts R`` every MoE layer has E + R
slots (``expert.initial_placement``: a rank's own block plus replicas of its neighbour's experts).
Every layer keeps the logical and per-slot loads of its last forwards (``ExpertParallelMoE.load`` /
``phys_load``). Every ``rebalance_interval`` (steps that ran a forward — the heartbeat steps of an idle
group do not count — or seconds, counted on rank 0) rank 0 puts a ``rebalance`` order with the next
placement version in the step's exchange, provided the group ran a forward after the last rebalance
took its loads (:func:`rebalance_due`: an idle group orders none); at the start of the following step
every rank sums the windows over the group, computes the same
placements with ``eplb.rebalance_experts``, and fetches point-to-point only the experts it newly holds
(``ExpertParallelMoE.set_placement``) — serving pauses for that one step. Every rank reports its
placement version in each exchange, so ranks on different placements fail loudly. A token's replica
of an expert is chosen from its index, so the same batch routes the same way on every run.

**Two-micro-batch overlap** (``tbo=True``, ``--tbo``): every forward's rows split into two halves of
similar token count that run at once on two overlap lanes (:mod:`dsv3.parallel.overlap`; lane 1 has
its own copies of the EP groups, ``Mesh.add_lane(1)``), so one half's attention and expert GEMMs run
while the other's dispatch/combine is in flight (:meth:`Engine._forward <dsv3.infer.engine.Engine._forward>`).
Every rank runs both lanes for every forward — a half without rows joins its MoE layers with zero
tokens — so each lane issues the same collectives everywhere; sampling waits for both halves, so
outputs equal those without TBO. ``trace_dir``: each rank records its lanes' compute and
dispatch/combine intervals (the newest ``trace_limit``) and writes ``rank{r}.json`` (Chrome trace, the
:func:`~dsv3.parallel.overlap.overlap_summary` in its "otherData") and ``rank{r}.png`` when serving ends.

A forward that raises on one rank leaves the others' collectives unanswered, so in lockstep it is
fatal (raised from :meth:`step`), not isolated per request as on one device.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time

import torch
import torch.distributed as dist

from ..parallel.overlap import Trace, has_lane, set_trace
from .engine import Engine, EngineLimits, Request, check_request
from .sampling import SamplingParams
from .worker import apply_delta, take_deltas

ALL = -1          # the rank of a command every rank obeys (a rebalance)


def rebalance_due(interval: tuple[float, str] | None, steps_since_order: int, seconds_since_order: float,
                  forwards_since_loads: int) -> bool:
    """Whether rank 0 orders a live rebalance now: ``interval`` ((n, "steps"), (seconds, "s"); None: never)
    has passed since the last order, and the group ran a forward (routed tokens) after the last rebalance
    took its loads (``forwards_since_loads`` > 0). With nothing routed since, every rank would find no
    new load and skip the rebalance: an idle group ordered one every interval for nothing.

    ``steps_since_order`` counts only steps that ran a forward (on any rank) since the last order (or
    the start): the heartbeat steps an idle group takes to stay in lockstep are no work, and counting
    them let an idle server's counter race past n, so its first busy step ordered a rebalance from the
    load of a single forward."""
    if interval is None or forwards_since_loads <= 0:
        return False
    n, unit = interval
    return steps_since_order >= n if unit == "steps" else seconds_since_order >= n


def load_ep_model(path: str, comm, device="cpu", dtype: torch.dtype | None = None, fp8: str = "dequant", *,
                  two_hop: bool = False, fp8_dispatch: bool = False, shared_as_routed: bool = False,
                  redundant_experts: int = 0, load_window: int = 128, dispatch_capacity: bool = False):
    """A model directory loaded for expert-parallel rank ``comm.rank``: every MoE layer becomes an
    ``ExpertParallelMoE`` before any weight is read, so this rank reads (and holds) only its own
    experts' tensors — with ``redundant_experts`` R, its share of R extra replicas too
    (``expert.initial_placement``) — ; the rest of the model is read in full (attention is
    replicated). ``load_window``: forwards of expert loads kept for live rebalancing."""
    from ..hf import load_pretrained
    from ..parallel.ep_model import convert_to_expert_parallel
    from ..parallel.expert import initial_placement

    def prepare(model):
        placement = initial_placement(model.cfg.n_routed_experts, comm.size, redundant_experts, shared_as_routed)
        convert_to_expert_parallel(model, comm, two_hop=two_hop, fp8_dispatch=fp8_dispatch,
                                   shared_as_routed=shared_as_routed, placement=placement,
                                   load_window=load_window, dispatch_capacity=dispatch_capacity)

    return load_pretrained(path, device=device, dtype=dtype, fp8=fp8, prepare=prepare)


class EPEngine:
    """One rank of a lockstep expert-parallel serving group (see the module docstring).

    ``model``: this rank's expert-parallel model (:func:`load_ep_model`, or
    ``convert_to_expert_parallel``), the same configuration on every rank. ``group``: the process
    group of all serving ranks for the small control messages (gloo: objects travel through it;
    default the world). ``engine_kwargs`` go to every rank's :class:`Engine` and must be the same
    on every rank. Requests are submitted on rank 0 only.

    ``rebalance_interval``: (n, "steps") or (seconds, "s") — that often rank 0 orders a live rebalance
    of the experts (:meth:`request_rebalance`); None keeps the placement static.

    ``tbo``: two-micro-batch overlap (the same on every rank; needs ``Mesh.add_lane(1)`` on every rank
    first). ``trace_dir``: record the lanes' timeline and write it there when serving ends."""

    REBALANCE_HISTORY = 100          # rebalances kept in ``rebalances``: a server runs for weeks

    def __init__(self, model, group=None, rebalance_interval: tuple[float, str] | None = None, tbo: bool = False,
                 trace_dir: str | None = None, trace_limit: int = 100_000, **engine_kwargs):
        from ..parallel.expert import ExpertParallelMoE

        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if self.world != dist.get_world_size():
            raise ValueError(f"EPEngine: the control group has {self.world} ranks, the world {dist.get_world_size()}")
        self.engine = Engine(model, **engine_kwargs)
        self.engine.lockstep = self
        blocks = [b for b in model.layers if b.is_moe]
        if self.engine.speculative:               # the engine's MTP forwards use module 1
            blocks += [model.mtp[0]] if model.mtp[0].is_moe else []
        self._moes = [b.mlp for b in blocks]
        if not all(isinstance(m, ExpertParallelMoE) for m in self._moes):
            raise ValueError("EPEngine: the model's MoE layers must be expert-parallel (load_ep_model or "
                             "convert_to_expert_parallel)")
        trunk = sum(b.is_moe for b in model.layers)      # empty_forward's parts: the trunk's MoEs, the MTP's
        self._parts = {"all": self._moes, "trunk": self._moes[:trunk], "mtp": self._moes[trunk:]}
        self.tbo = tbo
        if tbo and not all(has_lane(1, m.comm.group) for m in self._moes):
            raise ValueError("EPEngine(tbo=True): the expert-parallel groups have no lane-1 copies: call "
                             "Mesh.add_lane(1) on every rank before building the engine")
        self.trace_dir = trace_dir
        self.trace = Trace(limit=trace_limit) if trace_dir else None
        if self.trace is not None:
            set_trace(self.trace)
        p = model.norm.weight
        self._empty = torch.empty(0, model.cfg.hidden_size, device=p.device, dtype=p.dtype)
        # every rank's limits: requests are checked against the smallest pool
        limits: list = [None] * self.world
        dist.all_gather_object(limits, (self.engine.limits, tbo), group=group)
        if len({(dataclasses.replace(lim, num_blocks=0), t) for lim, t in limits}) != 1:
            raise ValueError(f"EPEngine: the ranks' engines (limits, tbo) differ: {limits}")
        limits = [lim for lim, _ in limits]
        self.limits: EngineLimits = dataclasses.replace(limits[0], num_blocks=min(x.num_blocks for x in limits))
        self.max_len, self.vocab_size = self.limits.max_len, self.limits.vocab_size
        self.stopped = False
        # every rank: its engine's requests by rank 0's id
        self._local: dict[int, Request] = {}
        self._sent: dict[int, tuple[int, int, int]] = {}
        self._failed: list[tuple] = []             # deltas of requests refused on arrival
        self._report = None                        # (deltas, counters) of the last step, sent with the next
        self._inbox: list[tuple] = []              # rank 0's commands, applied at the start of the next step
        self._stop = False                         # rank 0 closed the group: the next step ends it
        # rank 0: mirrors of every request, where each runs, what each rank holds
        self._lock = threading.RLock()             # submit / abort may come from another thread
        self._reqs: dict[int, Request] = {}
        self._rank_of: dict[int, int] = {}
        self._active = [0] * self.world            # unfinished requests placed on each rank
        self.placed = [0] * self.world             # requests placed on each rank so far
        self.empty_forwards = 0                    # every rank: forwards it joined without rows
        self.steps = 0                             # every rank: the group's steps that ran a forward (any rank's)
        self._stats = [self.engine.stats()] * self.world
        self._outbox: list[tuple] = []
        self._closing = False
        self._ids = itertools.count()
        # live rebalancing: every rank applies the same placement version at the same step
        if rebalance_interval is not None and (rebalance_interval[1] not in ("steps", "s")
                                               or not rebalance_interval[0] > 0):
            raise ValueError(f"EPEngine.rebalance_interval = {rebalance_interval}: (n > 0, 'steps' or 's')")
        self.rebalance_interval = rebalance_interval
        self.placement_version = 0
        self.rebalances: list[dict] = []           # every rank: what the last REBALANCE_HISTORY rebalances measured
        self.rebalance_bytes = 0                   # every rank: expert bytes it received in all rebalances
        self._since = (0, time.monotonic())        # rank 0: ``steps`` (forwards) and time at the last order
        self._loads_taken = 0                      # every rank: ``steps`` whose loads the last rebalance order takes
        self.rebalance_orders = 0                  # rank 0: rebalances ordered (each rank skips one without load)

    # ------------------------------------------------------------------ rank 0: requests
    def submit(self, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None, seed: int = 0,
               stop_ids=frozenset(), logprobs: int | None = None, prompt_logprobs: int | None = None,
               on_token=None, on_done=None, rank: int | None = None, grammar=None) -> Request:
        """A request (validated here: ValueError / ContextOverflow) placed on ``rank``, or on the least
        loaded rank; it is sent with the next step. The returned request mirrors the engine's: its
        ``output`` grows after each step, ``done`` is set last. ``grammar``: a structured.GrammarSpec the
        output keeps to (the rank that decodes the request builds its matcher: every rank's engine needs
        ``grammars``)."""
        req = self.make_request(prompt, max_new_tokens, params, seed, stop_ids, logprobs, prompt_logprobs,
                                on_token, on_done, grammar)
        self.enqueue(req, rank)
        return req

    def make_request(self, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                     seed: int = 0, stop_ids=frozenset(), logprobs: int | None = None,
                     prompt_logprobs: int | None = None, on_token=None, on_done=None, grammar=None) -> Request:
        """Rank 0: a validated mirror request, not yet placed (:meth:`enqueue`); its ``grammar`` travels to
        the rank that decodes it."""
        if self.rank != 0:
            raise RuntimeError("EPEngine: requests enter on rank 0")
        if self._closing or self.stopped:
            raise RuntimeError("EPEngine: closed")
        check_request(self.limits, prompt, max_new_tokens, logprobs, prompt_logprobs)
        with self._lock:
            rid = next(self._ids)
        return Request(list(prompt), max_new_tokens, params or SamplingParams(), seed, frozenset(stop_ids), logprobs,
                       prompt_logprobs, on_token, on_done, rid, grammar)

    def enqueue(self, req: Request, rank: int | None = None) -> None:
        """Rank 0: place ``req`` on ``rank`` (default: the least loaded); it is sent with the next step."""
        if rank is not None and not 0 <= rank < self.world:
            raise ValueError(f"rank = {rank}: must lie in [0, {self.world})")
        with self._lock:
            r = self._least_loaded() if rank is None else rank
            self._reqs[req.id], self._rank_of[req.id] = req, r
            self._active[r] += 1
            self.placed[r] += 1
            self._outbox.append(("submit", r, req.id, req.prompt, req.max_new_tokens, req.params, req.seed,
                                 req.stop_ids, req.logprobs, req.prompt_logprobs, req.grammar))

    def abort(self, req: Request) -> None:
        """Finish ``req`` with "abort" (its rank drops it in the next step)."""
        with self._lock:
            if not req.done and req.id in self._rank_of:
                self._outbox.append(("abort", self._rank_of[req.id], req.id))

    def _least_loaded(self) -> int:
        """The rank with the fewest unfinished requests, then the smallest share of its cache used."""
        def load(r):
            st = self._stats[r]
            return self._active[r], st["blocks_used"] / max(st["blocks_total"], 1), r
        return min(range(self.world), key=load)

    @property
    def pending(self) -> int:
        """Requests submitted on rank 0 and not finished."""
        return len(self._reqs)

    def stats(self) -> dict:
        """Rank 0: the engines' counters as of the last step, summed over ranks (``ranks``: each one's);
        ``steps``: the group's steps that ran a forward on any rank (each rank's engine counts only those
        with rows of its own). ``waiting`` also counts the requests placed since, which travel to their
        ranks with the next step."""
        per = list(self._stats)
        out = {k: sum(s[k] for s in per) for k in ("running", "waiting", "blocks_used", "blocks_total",
                                                     "cache_bytes", "prompt_tokens", "prefix_hit_tokens",
                                                     "prefix_hit_tokens_disk", "preemptions", "drafted",
                                                     "accepted")}
        with self._lock:
            out["waiting"] += sum(1 for cmd in self._outbox if cmd[0] == "submit")
        rate = None                              # the group's: every rank's drafts, not rank 0's alone
        if per[0]["speculative_acceptance_rate"] is not None:
            rate = out["accepted"] / out["drafted"] if out["drafted"] else 0.0
        out.update(steps=self.steps, block_size=per[0]["block_size"], ranks=per,
                   speculative_acceptance_rate=rate,
                   placement_version=self.placement_version,
                   rebalance_bytes=sum(s.get("rebalance_bytes", 0) for s in per))
        return out

    def request_rebalance(self) -> None:
        """Rank 0: every rank re-places its experts from the live loads at the start of the next step
        but one (the order travels with the next exchange)."""
        with self._lock:
            self._outbox.append(("rebalance", ALL, self.placement_version + 1))
            self._since = (self.steps, time.monotonic())
            self.rebalance_orders += 1

    def _rebalance_due(self) -> bool:
        steps, t0 = self._since                    # idle (heartbeat) steps leave ``steps`` as it is
        return rebalance_due(self.rebalance_interval, self.steps - steps, time.monotonic() - t0,
                             self.steps - self._loads_taken)

    # ------------------------------------------------------------------ every rank: the step
    def step(self) -> bool:
        """One lockstep step (collective: every rank calls it). False once rank 0 has closed the group
        (nothing runs then)."""
        if self.stopped:
            return False
        cmds, self._inbox = self._inbox, []
        for cmd in cmds:
            if cmd[1] in (self.rank, ALL):
                self._command(cmd)
        if self._stop:
            self.engine.fail_all("the serving group closed")
            self.stopped = True
            if self.trace is not None:
                self.write_trace()
                set_trace(None)
            return False
        if self.rank == 0:
            if self._rebalance_due():
                self.request_rebalance()
        self.engine.step()                         # its agree() is the step's one exchange
        stats = dict(self.engine.stats(), rebalance_bytes=self.rebalance_bytes)
        self._report = (self._failed + take_deltas(self._local, self._sent), stats)
        self._failed = []
        return True

    def _exchange(self, flags: tuple) -> list:
        """The step's one exchange (all-gather over the group): every rank's forward flags; rank 0's
        commands (placed requests, aborts, closing) for the next step; every other rank's report
        (new tokens, counters) of its last step, which rank 0 applies to its mirrors."""
        if self.rank == 0:
            with self._lock:
                payload = (self._outbox, self._closing)
                self._outbox = []
        else:
            payload, self._report = self._report, None
        got: list = [None] * self.world
        dist.all_gather_object(got, (flags, payload), group=self.group)
        self._inbox, self._stop = got[0][1]
        if self.rank == 0:
            reports = [self._report] + [p for _, p in got[1:]]
            self._report = None
            with self._lock:
                for r, report in enumerate(reports):
                    if report is not None:
                        self._apply_report(r, *report)
        return [f for f, _ in got]

    def _apply_report(self, rank: int, deltas: list, stats: dict) -> None:
        self._stats[rank] = stats
        for d in deltas:
            if d[4] and d[0] in self._rank_of:       # done
                self._active[self._rank_of.pop(d[0])] -= 1
            apply_delta(self._reqs, *d)

    def _command(self, cmd: tuple) -> None:
        if cmd[0] == "submit":
            rid, prompt, max_new, params, seed, stop_ids, logprobs, prompt_logprobs, grammar = cmd[2:]
            try:
                req = self.engine.make_request(prompt, max_new, params, seed, stop_ids, logprobs, prompt_logprobs,
                                               grammar=grammar)
            except ValueError as e:
                self._failed.append((rid, [], [], [], True, "error", str(e), 0))
                return
            self._local[rid], self._sent[rid] = req, (0, 0, 0)
            self.engine.enqueue(req)
        elif cmd[0] == "abort":
            req = self._local.get(cmd[2])
            if req is not None:
                self.engine.abort(req)
        elif cmd[0] == "rebalance":
            self._rebalance(cmd[2])

    def _rebalance(self, version: int) -> None:
        """Every rank, between two steps: new placements of every MoE layer from the loads of the last
        window (``eplb.rebalance_experts`` on the loads summed over the ranks — the same everywhere),
        then each rank fetches only the experts it newly holds (``ExpertParallelMoE.set_placement``).
        Skipped (on every rank alike) while the window holds no load."""
        from ..eplb import balancedness, gpu_loads
        from ..parallel.expert import rank_loads, rebalance_layers, window_loads

        measured = rank_loads(self._moes)                            # [layers, R] under the old placement
        if int(measured.sum()) == 0:
            return
        logical = window_loads(self._moes)                           # [layers, L] over every rank
        new = rebalance_layers(self._moes, logical)
        old = torch.stack([m.placement.phy2log for m in self._moes])
        moved = sum(m.set_placement(p) for m, p in zip(self._moes, new))
        self.placement_version = version
        self.rebalances.append(dict(
            version=version, bytes_received=moved, slots_changed=int((new != old).sum()),
            rank_loads=measured.tolist(), balancedness_before=balancedness(measured),
            balancedness_expected=balancedness(gpu_loads(logical, new, num_gpus=self.world))))
        del self.rebalances[:-self.REBALANCE_HISTORY]
        self.rebalance_bytes += moved

    # ------------------------------------------------------------------ lockstep hooks (Engine.step)
    def agree(self, prefill: bool, decode: bool) -> tuple[bool, bool]:
        """Whether any rank runs a prefill forward / a decode forward this step (the step's exchange)."""
        flags = self._exchange((int(prefill), int(decode), self.placement_version))
        if len({f[2] for f in flags}) != 1:
            raise RuntimeError(f"EPEngine: the ranks serve different expert placements {[f[2] for f in flags]}")
        prefill, decode = any(f[0] for f in flags), any(f[1] for f in flags)
        self.steps += prefill or decode
        if any(cmd[0] == "rebalance" for cmd in self._inbox):     # applied next step: its loads end with this one
            self._loads_taken = self.steps
        return prefill, decode

    def empty_forward(self, part: str = "all") -> None:
        """Take part in one forward with no rows: every MoE layer it passes, in order, with zero tokens
        (this rank's experts still serve the other ranks' rows). ``part``: "all" of them, the "trunk"'s
        or the "mtp" module's (TBO runs a speculative forward's trunk and MTP module apart)."""
        self.empty_forwards += part != "mtp"
        for moe in self._parts[part]:
            moe(self._empty)

    def write_trace(self, out_dir: str | None = None) -> dict:
        """This rank's recorded timeline as ``rank{r}.json`` (Chrome trace) and ``rank{r}.png`` (its last
        8 forwards) in ``out_dir`` (default ``trace_dir``); returns its
        :func:`~dsv3.parallel.overlap.overlap_summary`."""
        import os

        from ..parallel.overlap import overlap_summary, plot_timeline, recent, write_chrome_trace

        out_dir = out_dir or self.trace_dir
        events = list(self.trace.events)
        summary = overlap_summary(events)
        os.makedirs(out_dir, exist_ok=True)
        write_chrome_trace(events, os.path.join(out_dir, f"rank{self.rank}.json"), self.rank, summary)
        plot_timeline(recent(events, 16), os.path.join(out_dir, f"rank{self.rank}.png"),
                      f"rank {self.rank}, --tbo, the last 8 forwards: compute (blue), dispatch/combine (orange); "
                      f"{summary['hidden_fraction']:.0%} of dispatch/combine overlapped in all")
        return summary

    # ------------------------------------------------------------------ driving
    def run(self) -> None:
        """Rank 0: step until every submitted request has finished (the other ranks are in :meth:`serve`)."""
        while self._reqs and self.step():
            pass

    def serve(self) -> None:
        """Ranks 1 …: step until rank 0 closes the group."""
        while self.step():
            pass

    def close(self) -> None:
        """Rank 0: abort what is left and release the other ranks from :meth:`serve` (one last step)."""
        if self.rank != 0 or self.stopped:
            return
        with self._lock:
            for req in list(self._reqs.values()):
                self.abort(req)
        while self._reqs and self.step():          # the aborts come back as finished requests
            pass
        with self._lock:
            self._closing = True
        while self.step():                         # sent with this step, obeyed by every rank at the next
            pass


# ---------------------------------------------------------------------------------------- dsv3 serve --ep N
# torchrun --nproc-per-node N -m dsv3.cli serve --model DIR --ep N: rank 0's process runs the HTTP server and
# its engine process (dsv3.infer.worker.EngineWorker, spawned, inheriting torchrun's environment) joins the
# process group as rank 0 and drives the EPEngine through the worker's engine loop (Rank0Engine); ranks
# 1 … N-1 only step (serve_follower).

def add_ep_arguments(p) -> None:
    p.add_argument("--ep", type=int, default=None, metavar="N",
                   help="expert-parallel serving over the N ranks of torchrun (N = --nproc-per-node × nodes): each "
                        "rank an attention replica with its own requests and cache, the experts spread over all")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                   help="with --ep: ranks per node (default torchrun's LOCAL_WORLD_SIZE; fewer simulates nodes)")
    p.add_argument("--two-hop", action="store_true",
                   help="with --ep: dispatch across nodes first, then within the node (report §3.2.2)")
    p.add_argument("--fp8-dispatch", action="store_true", help="with --ep: dispatch activations in FP8 (E4M3)")
    p.add_argument("--dispatch-capacity", action="store_true",
                   help="with --ep (flat): send each rank a block padded to the capacity learnt from the previous "
                        "dispatch instead of exchanging counts first (one collective fewer per MoE layer, about "
                        "1/8 more bytes)")
    p.add_argument("--shared-as-routed", action="store_true",
                   help="with --ep: the shared expert placed like a routed one (weight 1, a replica per rank)")
    p.add_argument("--redundant-experts", type=int, default=0, metavar="R",
                   help="with --ep: R extra expert replicas per MoE layer (a multiple of --ep), placed by the live "
                        "loads at each rebalance")
    p.add_argument("--rebalance-interval", default=None, metavar="N|Ns",
                   help="with --ep: re-place the experts from the live loads every N steps that ran a forward (idle "
                        "heartbeat steps do not count), or every N seconds "
                        "('30s'), when tokens were routed since the last time; default: the placement stays static")
    p.add_argument("--rebalance-window", type=int, default=128, metavar="F",
                   help="with --ep: forwards of expert loads a rebalance looks at (default 128)")
    p.add_argument("--tbo", action="store_true",
                   help="with --ep: two-micro-batch overlap: each step's batch in two halves, one's attention and "
                        "expert GEMMs running while the other's dispatch/combine is in flight")
    p.add_argument("--trace-dir", default=None, metavar="DIR",
                   help="with --tbo: each rank writes its lanes' timeline there when serving ends (rank{r}.json: "
                        "Chrome trace with the overlapped share; rank{r}.png)")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="S",
                   help="with --ep: seconds a collective may wait for the other ranks before the group fails "
                        "(default 600)")


def check_ep_args(args, cfg, env=None) -> dict | None:
    """The expert-parallel settings of ``dsv3 serve`` (None without --ep); ValueError naming the flag."""
    import math
    import os

    from ..parallel.mesh import MeshSpec

    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if args.ep is None:
        for flag, given in (("--gpus-per-node", args.gpus_per_node is not None), ("--two-hop", args.two_hop),
                            ("--fp8-dispatch", args.fp8_dispatch), ("--shared-as-routed", args.shared_as_routed),
                            ("--dispatch-capacity", args.dispatch_capacity),
                            ("--redundant-experts", args.redundant_experts != 0),
                            ("--rebalance-interval", args.rebalance_interval is not None),
                            ("--rebalance-window", args.rebalance_window != 128), ("--tbo", args.tbo),
                            ("--trace-dir", args.trace_dir is not None),
                            ("--dist-timeout", args.dist_timeout is not None)):
            if given:
                raise ValueError(f"{flag} needs --ep N (expert-parallel serving under torchrun)")
        if world > 1:
            raise ValueError(f"dsv3 serve runs on {world} ranks (torchrun): give --ep {world}")
        return None
    if args.ep < 1:
        raise ValueError(f"--ep {args.ep}: must be >= 1")
    if args.ep != world:
        raise ValueError(f"--ep {args.ep}: must equal the number of ranks, {world} (run it as torchrun "
                         f"--nproc-per-node {args.ep} -m dsv3.cli serve … --ep {args.ep})")
    if not cfg.n_routed_experts or cfg.n_routed_experts % args.ep:
        raise ValueError(f"--ep {args.ep}: must divide the model's routed experts ({cfg.n_routed_experts})")
    g = args.gpus_per_node if args.gpus_per_node is not None else int(env.get("LOCAL_WORLD_SIZE", str(world)))
    if g < 1 or world % g:
        raise ValueError(f"--gpus-per-node {g}: must divide the number of ranks ({world})")
    try:
        MeshSpec(world, g, 1, args.ep)
    except ValueError as e:
        raise ValueError(f"--ep {args.ep} --gpus-per-node {g}: {e}") from None
    if args.two_hop and (g == 1 or g >= world):
        raise ValueError(f"--two-hop: needs more than one node of more than one rank (--gpus-per-node {g}, "
                         f"{world} ranks)")
    if args.shared_as_routed and cfg.n_shared_experts != 1:
        raise ValueError(f"--shared-as-routed: the model has {cfg.n_shared_experts} shared experts (needs 1)")
    if args.dist_timeout is None:
        args.dist_timeout = 600.0
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise ValueError(f"--dist-timeout {args.dist_timeout}: must be a positive number of seconds")
    R = args.redundant_experts
    if R < 0 or R % world:
        raise ValueError(f"--redundant-experts {R}: must be a non-negative multiple of --ep {args.ep}")
    if R and (cfg.n_routed_experts + R) // world > cfg.n_routed_experts:
        raise ValueError(f"--redundant-experts {R}: more than {cfg.n_routed_experts} routed experts per rank "
                         f"would put two replicas of one expert on a rank")
    if args.rebalance_window < 1:
        raise ValueError(f"--rebalance-window {args.rebalance_window}: must be >= 1")
    interval = parse_interval(args.rebalance_interval) if args.rebalance_interval is not None else None
    if args.trace_dir is not None:
        if not args.tbo:
            raise ValueError("--trace-dir records the two micro-batches' lanes: it needs --tbo")
        from ..errors import check_writable_dir
        check_writable_dir("--trace-dir", args.trace_dir)
    if args.dispatch_capacity and args.two_hop:
        raise ValueError("--dispatch-capacity applies to the flat dispatch: --two-hop exchanges counts")
    return dict(size=args.ep, gpus_per_node=g, two_hop=args.two_hop, fp8_dispatch=args.fp8_dispatch,
                dispatch_capacity=args.dispatch_capacity,
                shared_as_routed=args.shared_as_routed, timeout=args.dist_timeout, redundant_experts=R,
                rebalance_interval=interval, rebalance_window=args.rebalance_window, tbo=args.tbo,
                trace_dir=args.trace_dir)


def parse_interval(text: str) -> tuple[float, str]:
    """'100' → (100, "steps"); '30s' → (30.0, "s"). ValueError naming --rebalance-interval."""
    import math

    t = str(text).strip()
    try:
        value, unit = (float(t[:-1]), "s") if t.endswith("s") else (int(t), "steps")
    except ValueError:
        value, unit = None, None
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"--rebalance-interval {text}: a positive number of steps (100) or seconds (30s)")
    return value, unit


def build_ep_engine(spec: dict) -> EPEngine:
    """Join torchrun's process group (its environment: RANK, WORLD_SIZE, MASTER_ADDR …) and build this
    rank's EPEngine from a worker spec (:class:`dsv3.infer.worker.EngineWorker`) with an ``ep`` entry
    (:func:`check_ep_args`)."""
    import datetime
    import os

    from ..parallel.mesh import MeshSpec, build_mesh

    ep = spec["ep"]
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local}"
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=ep["timeout"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    threads = spec["threads"]
    if threads is None and not cuda:     # the node's cores shared by its ranks (and rank 0's HTTP side)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        threads = max(1, (len(os.sched_getaffinity(0)) - 1) // per_node)
    if threads:
        torch.set_num_threads(threads)
    mesh = build_mesh(MeshSpec(world, ep["gpus_per_node"], 1, ep["size"]), rank)
    if ep["tbo"]:
        mesh.add_lane(1)                                   # the second micro-batch's copies of the EP groups
    comm = mesh.expert_comm()
    control = dist.new_group(backend="gloo") if cuda else None     # objects and flags travel on gloo
    model = load_ep_model(spec["model_dir"], comm, device, fp8=spec["fp8"], two_hop=ep["two_hop"],
                          fp8_dispatch=ep["fp8_dispatch"], shared_as_routed=ep["shared_as_routed"],
                          dispatch_capacity=ep["dispatch_capacity"],
                          redundant_experts=ep["redundant_experts"], load_window=ep["rebalance_window"])
    store = None
    if spec["prefix_cache"]:
        from .prefix_cache import PrefixCache
        store = PrefixCache(spec["prefix_cache"], model, spec["engine"].get("block_size", 64))
    from .generate import load_tokenizer
    from .structured import Grammars

    # structured output on the rank that decodes a request: the tokenizer is read (and xgrammar imported)
    # when the first such request reaches this rank
    grammars = Grammars(lambda: load_tokenizer(spec["model_dir"]), model.cfg.vocab_size)
    return EPEngine(model, group=control, rebalance_interval=ep["rebalance_interval"], tbo=ep["tbo"],
                    trace_dir=ep["trace_dir"], prefix_cache=store, grammars=grammars, **spec["engine"])


def serve_follower(spec: dict) -> int:
    """Ranks 1 …: build the engine and step with rank 0 until it closes the group (once the group has
    formed, signals are left to rank 0, which drains and then releases this rank; before that nothing
    runs, and SIGINT / SIGTERM end this rank at once, even inside a collective waiting for the others).
    When the group fails (a rank died): one line naming it (:mod:`dsv3.infer.ep_failure`), exit code 1."""
    import signal
    import sys

    from .ep_failure import group_failures, peer_processes
    from .worker import EngineFailed

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    ep = build_ep_engine(spec)
    peers = peer_processes(ep.group)        # every rank's EPEngine exists: rank 0 may now take requests
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        with group_failures(peers):
            ep.serve()
    except EngineFailed as e:
        sys.stderr.write(f"dsv3 serve: error: rank {ep.rank}: {e}\n")      # one write: never split by other logs
        sys.stderr.flush()
        return 1
    dist.destroy_process_group()
    return 0


class Rank0Engine:
    """Rank 0's EPEngine behind the interface the worker's engine loop drives (``Engine``'s: make_request,
    enqueue, abort, step, idle, running, waiting, stats, fail_all, limits) — so ``dsv3 serve`` talks
    to the group exactly as to one engine. While nothing runs it still steps every ``heartbeat``
    seconds, so the other ranks' collectives never wait past the group's timeout. A failed step or
    close raises :class:`~dsv3.infer.worker.EngineFailed` naming the rank that died."""

    def __init__(self, ep: EPEngine, heartbeat: float = 1.0):
        import time

        from .ep_failure import peer_processes

        self.ep, self.heartbeat, self._clock = ep, heartbeat, time.monotonic
        self._last = self._clock()
        self.limits = ep.limits
        self.peers = peer_processes(ep.group)       # with serve_follower's, after every rank's EPEngine

    def make_request(self, *args, **kwargs) -> Request:
        return self.ep.make_request(*args, **kwargs)

    def enqueue(self, req: Request) -> None:
        self.ep.enqueue(req)

    def abort(self, req: Request) -> None:
        self.ep.abort(req)

    @property
    def idle(self) -> bool:
        return not self.ep.pending and self._clock() - self._last < self.heartbeat

    @property
    def running(self) -> list[Request]:
        return list(self.ep._reqs.values())

    @property
    def waiting(self) -> list[Request]:
        return []

    def step(self) -> None:
        from .ep_failure import group_failures

        self._last = self._clock()
        with group_failures(self.peers):
            self.ep.step()

    def stats(self) -> dict:
        return self.ep.stats()

    def fail_all(self, message: str):
        """A step failed: the ranks' collectives are out of step, so the group cannot go on. The engine
        process exits; the server then answers 503 and fails what was in flight."""
        from .worker import EngineFailed

        raise EngineFailed(f"the expert-parallel group failed: {message}")

    def close(self) -> None:
        from .ep_failure import group_failures

        with group_failures(self.peers):
            self.ep.close()
        dist.destroy_process_group()
