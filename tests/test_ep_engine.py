"""Expert-parallel serving (``infer/ep_engine.py``) on real gloo ranks: 2 ranks (one node) and 4 ranks
(2 simulated nodes × 2), each an attention-DP replica with its own engine, every MoE layer expert-
parallel over all ranks, each rank holding only its experts (read alone from the checkpoint). For 32
requests of mixed lengths (greedy and sampled, stop tokens, shared prefixes) every output equals the
single-process engine's on the same requests: flat and two-hop dispatch, the shared expert as a routed
one, speculative (MTP) decoding, a pool small enough to preempt, and a rank given no requests at all
(it only serves its experts to the others' rows). The model is fp64 so that equality is exact.

One spawn per world size runs every scenario; the tests read their results."""

from __future__ import annotations

import datetime
import json
import random
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from dsv3 import Transformer, save_pretrained
from dsv3.hf import load_pretrained
from dsv3.infer.engine import Engine
from dsv3.infer.sampling import SamplingParams
from helpers import (finish_ranks, free_port, gather_scenario, save_served_model, small_config, spawn_ranks,
                     start_ep_serve, stop_ep_serve, wait_healthy)

SEED = random.SystemRandom().randrange(1 << 30)      # fresh inputs every run (named in failures)
N_REQ = 32
ENGINE = dict(max_batch=6, block_size=16, prefill_chunk=48, max_len=128)


def _requests(seed: int, vocab: int) -> list[dict]:
    """32 requests: prompts of 1…90 tokens (some sharing a 32-token prefix), 1…16 new tokens, half
    greedy, half sampled (some with top-p), a few with a stop token, penalties, log-probabilities of
    the output or of the prompt."""
    g = torch.Generator().manual_seed(seed)

    def rint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    prefix = torch.randint(1, vocab, (32,), generator=g).tolist()
    out = []
    for i in range(N_REQ):
        n = rint(1, 90)
        prompt = torch.randint(1, vocab, (n,), generator=g).tolist()
        if i % 5 == 4:
            prompt = prefix + prompt[:60]
        out.append(dict(prompt=prompt, max_new_tokens=rint(1, 17),
                        temperature=0.0 if i % 2 == 0 else 0.8, top_p=0.9 if i % 4 == 1 else 1.0,
                        seed=rint(0, 1 << 30), stop_ids=[rint(1, vocab)] if i % 7 == 3 else [],
                        penalties=(0.5, 0.3) if i % 8 == 6 else (0.0, 0.0),
                        logprobs=2 if i % 6 == 5 else None, prompt_logprobs=1 if i % 9 == 8 else None))
    return out


def _submit(eng, spec: dict, **kw):
    presence, frequency = spec["penalties"]
    params = SamplingParams(spec["temperature"], top_p=spec["top_p"], presence_penalty=presence,
                            frequency_penalty=frequency)
    return eng.submit(spec["prompt"], spec["max_new_tokens"], params, seed=spec["seed"], stop_ids=spec["stop_ids"],
                      logprobs=spec["logprobs"], prompt_logprobs=spec["prompt_logprobs"], **kw)


def _logprobs(req) -> list:
    """Output then prompt log-probabilities as [token, logprob, [[id, logprob], …]] (JSON-able)."""
    return [[t.token, t.logprob, [list(x) for x in t.top]] if t is not None else None
            for t in req.output_logprobs + req.prompt_logprobs_out]


def _cache_memory(cfg, speculative: bool, blocks: int) -> int:
    from dsv3.infer.paged_cache import PagedLatentCache

    layers = cfg.num_hidden_layers + int(speculative)
    return blocks * PagedLatentCache.bytes_per_block(cfg, ENGINE["block_size"], layers, torch.float64)


# --------------------------------------------------------------------------------- scenarios per world
# (name, EP options, engine options, ranks that take requests (None: the engine spreads them))
CONFIGS = {"small": dict(max_position_embeddings=128),          # small_config: 8 experts, top-3, 4 groups
           "wide": dict(max_position_embeddings=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=24)}
SCENARIOS = {
    2: [("flat", {}, {}, None),
        ("speculative", {}, dict(speculative=True), None),
        ("idle_rank", {}, {}, [1]),                  # rank 0 (which drives the group) has no requests
        ("preempt", {}, dict(blocks=9), None),
        ("fp8_dispatch", dict(fp8_dispatch=True), {}, None),
        ("dispatch_capacity", dict(dispatch_capacity=True), {}, None),
        ("shared_rebalance", dict(shared_as_routed=True, redundant_experts=2, load_window=6),
         dict(rebalance=(4, "steps")), None)],
    4: [("flat", {}, {}, None),
        ("two_hop", dict(two_hop=True), {}, None),
        ("two_hop_shared_as_routed", dict(two_hop=True, shared_as_routed=True), {}, None),
        ("idle_rank_shared", dict(shared_as_routed=True), {}, [0, 1, 3]),
        ("two_hop_rebalance", dict(two_hop=True, redundant_experts=4, load_window=6), dict(rebalance=(4, "steps")),
         None),
        ("wide_two_hop_shared_speculative_rebalance",
         dict(two_hop=True, shared_as_routed=True, redundant_experts=4, load_window=4),
         dict(model="wide", speculative=True, rebalance=(3, "steps")), None)],
}


def _engine_kwargs(cfg, opts: dict) -> dict:
    kw = dict(ENGINE, speculative=opts.get("speculative", False))
    if "blocks" in opts:
        kw["cache_memory"] = _cache_memory(cfg, kw["speculative"], opts["blocks"])
    return kw


def _rank(rank, world, gpus_per_node, port, model_dirs, seed, out_path):
    from dsv3.infer.ep_engine import EPEngine, load_ep_model
    from dsv3.parallel.mesh import MeshSpec, build_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    comm = build_mesh(MeshSpec(world, gpus_per_node), rank).expert_comm()
    results = {}
    for name, ep_opts, opts, ranks in SCENARIOS[world]:
        t0 = time.time()
        try:
            model = load_ep_model(model_dirs[opts.get("model", "small")], comm, dtype=torch.float64, **ep_opts)
            ep = EPEngine(model, rebalance_interval=opts.get("rebalance"), **_engine_kwargs(model.cfg, opts))
            specs = _requests(seed + len(results), model.cfg.vocab_size)
            if rank == 0:
                reqs = [_submit(ep, s, rank=None if ranks is None else ranks[i % len(ranks)])
                        for i, s in enumerate(specs)]
                ep.run()
                res = dict(outputs=[r.output for r in reqs], reasons=[r.finish_reason for r in reqs],
                           errors=[r.error for r in reqs], placed=ep.placed, logprobs=[_logprobs(r) for r in reqs],
                           stats=ep.stats())
                ep.close()
            else:
                ep.serve()
            mine = dict(slots=[m.experts.w13.shape[0] for m in model.moe_layers()],
                        placement=[m.placement.phy2log.tolist() for m in model.moe_layers()],
                        local=[m.local_logical.tolist() for m in model.moe_layers()],
                        rebalances=ep.rebalances, placement_version=ep.placement_version,
                        expert_params=sum(m.experts.w13.numel() + m.experts.w2.numel() for m in model.moe_layers()),
                        steps=ep.engine.steps, empty_forwards=ep.empty_forwards,
                        preemptions=ep.engine.preemptions, drafted=ep.engine.drafted, accepted=ep.engine.accepted)
            gather_scenario(results, name, res if rank == 0 else None, mine, world, t0)
        except Exception as e:   # fail fast: the spawn context kills the other ranks and re-raises
            raise RuntimeError(f"rank {rank}, scenario {name}:\n{traceback.format_exc()}") from e
    finish_ranks(results, out_path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Random models (every feature of small_config, 128 positions; "wide": 16 experts, top-4, d = 64)
    with random gate biases."""
    out = {}
    for k, (name, kw) in enumerate(CONFIGS.items()):
        torch.manual_seed(SEED + k)
        m = Transformer(small_config(**kw))
        with torch.no_grad():
            for moe in m.moe_layers():
                moe.gate.e_score_correction_bias.normal_(0, 0.05)
        out[name] = str(tmp_path_factory.mktemp(f"ep_model_{name}"))
        save_pretrained(m, out[name])
    return out


@pytest.fixture(scope="module")
def model_dir(model_dirs):
    return model_dirs["small"]


@pytest.fixture(scope="module")
def reference(model_dirs):
    """Outputs of the single-process engine, per scenario (same requests, same engine settings)."""
    models = {name: load_pretrained(d, dtype=torch.float64) for name, d in model_dirs.items()}
    cache: dict = {}

    def get(world: int, name: str) -> list:
        i, (_, _, opts, _) = next((i, s) for i, s in enumerate(SCENARIOS[world]) if s[0] == name)
        model = models[opts.get("model", "small")]
        key = (opts.get("model", "small"), SEED + i, opts.get("speculative", False))
        if key not in cache:
            kw = _engine_kwargs(model.cfg, {k: v for k, v in opts.items() if k != "blocks"})
            eng = Engine(model, **kw)
            reqs = [_submit(eng, s) for s in _requests(SEED + i, model.cfg.vocab_size)]
            eng.run()
            cache[key] = [(r.output, r.finish_reason, _logprobs(r)) for r in reqs]
        return cache[key]
    return get


def _spawn(world, gpus_per_node, model_dirs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"ep{world}") / "r.json")
    return spawn_ranks(_rank, (world, gpus_per_node, free_port(), model_dirs, SEED, out), world, out, timeout=240)


@pytest.fixture(scope="module")
def two(model_dirs, tmp_path_factory):
    return _spawn(2, 2, model_dirs, tmp_path_factory)


@pytest.fixture(scope="module")
def four(model_dirs, tmp_path_factory):
    return _spawn(4, 2, model_dirs, tmp_path_factory)


def _check(res: dict, ref: list, name: str, world: int) -> None:
    r = res[name]
    assert not any(r["errors"]), (SEED, name, r["errors"])
    for i, (out, reason, lps) in enumerate(ref):
        assert r["outputs"][i] == out and r["reasons"][i] == reason, (f"seed {SEED}, {name}, request {i}",
                                                                      r["outputs"][i], out)
        got = r["logprobs"][i]              # the same tokens; values (fp32) as close as the summation order allows
        assert len(got) == len(lps) and all((a is None) == (b is None) for a, b in zip(got, lps))
        for a, b in ((a, b) for a, b in zip(got, lps) if a is not None):
            assert a[0] == b[0] and [t for t, _ in a[2]] == [t for t, _ in b[2]]
            assert abs(a[1] - b[1]) < 1e-5 and all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a[2], b[2]))
    assert sum(bool(lps) for _, _, lps in ref) >= 6
    ep_opts, opts = next(s[1:3] for s in SCENARIOS[world] if s[0] == name)
    cfg = small_config(**CONFIGS[opts.get("model", "small")])
    shared = int("shared" in name)
    extra = ep_opts.get("redundant_experts", 0) // world
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
    for info in r["ranks"]:           # each rank holds only its experts (+ one replica of the shared one)
        assert info["slots"] == [cfg.n_routed_experts // world + shared + extra] * moe_layers


@pytest.mark.parametrize("name", [s[0] for s in SCENARIOS[2] if s[0] != "fp8_dispatch"])
def test_two_ranks_match_the_single_engine(two, reference, name):
    _check(two, reference(2, name), name, 2)


@pytest.mark.slow        # 4 ranks on 2 cores: run with -m slow; 2 ranks cover each feature in the default suite
@pytest.mark.parametrize("name", [s[0] for s in SCENARIOS[4]])
def test_four_ranks_two_nodes_match_the_single_engine(four, reference, name):
    _check(four, reference(4, name), name, 4)


WORLDS = ["two", pytest.param("four", marks=pytest.mark.slow)]


@pytest.mark.parametrize("world", WORLDS)
def test_requests_spread_over_ranks(request, world):
    res, n = request.getfixturevalue(world), {"two": 2, "four": 4}[world]
    placed = res["flat"]["placed"]
    assert sum(placed) == N_REQ and max(placed) - min(placed) <= N_REQ // n // 2, placed
    assert all(info["steps"] > 0 for info in res["flat"]["ranks"])
    assert res["flat"]["stats"]["steps"] >= max(info["steps"] for info in res["flat"]["ranks"])   # the group's


@pytest.mark.parametrize("world, name, idle", [("two", "idle_rank", 0),
                                                pytest.param("four", "idle_rank_shared", 2, marks=pytest.mark.slow)])
def test_a_rank_without_requests_serves_the_others(request, world, name, idle):
    r = request.getfixturevalue(world)[name]
    assert r["placed"][idle] == 0
    info = r["ranks"][idle]
    assert info["steps"] == 0 and info["empty_forwards"] > 0        # it joined every forward with no rows
    busy = r["ranks"][1 if idle == 0 else 0]
    assert info["empty_forwards"] >= busy["steps"]
    # /health's and /metrics' steps under --ep: the group's, not rank 0's (0 here: it has no requests)
    assert r["stats"]["steps"] >= max(i["steps"] for i in r["ranks"]) > 0, (r["stats"]["steps"], r["ranks"])


@pytest.mark.parametrize("world, name", [
    ("two", "shared_rebalance"), pytest.param("four", "two_hop_rebalance", marks=pytest.mark.slow),
    pytest.param("four", "wide_two_hop_shared_speculative_rebalance", marks=pytest.mark.slow)])
def test_live_rebalance_moves_only_changed_experts(request, world, name):
    """Outputs equal the single engine across the rebalances (checked above); here: every rank switched
    to the same placements, no rank holds one expert twice, and exactly the changed slots' bytes moved."""
    r = request.getfixturevalue(world)[name]
    ranks = r["ranks"]
    assert len({info["placement_version"] for info in ranks}) == 1 and ranks[0]["placement_version"] >= 2
    assert all(info["placement"] == ranks[0]["placement"] for info in ranks)
    for info in ranks:
        for layer in info["local"]:
            assert len(set(layer)) == len(layer), layer           # never two replicas on one rank
        assert [x["version"] for x in info["rebalances"]] == list(range(1, len(info["rebalances"]) + 1))
    cfg = small_config(**CONFIGS["wide" if "wide" in name else "small"])
    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 8          # fp64 w13 + w2
    for k in range(len(ranks[0]["rebalances"])):
        moved = sum(info["rebalances"][k]["bytes_received"] for info in ranks)
        changed = ranks[0]["rebalances"][k]["slots_changed"]
        # a changed slot either copies locally (the rank held the expert) or receives one expert
        assert moved % expert_bytes == 0 and moved <= changed * expert_bytes
    assert sum(x["bytes_received"] for info in ranks for x in info["rebalances"]) > 0


def test_a_long_running_group_keeps_a_bounded_rebalance_history(model_dir):
    """Every rebalance appends what it measured (per layer and rank) to ``rebalances`` on every rank: a
    server rebalancing every few steps for weeks kept them all (and summed the bytes over all of them each
    step). Only the last REBALANCE_HISTORY are kept; the bytes received are a running total."""
    from dsv3.infer.ep_engine import EPEngine, load_ep_model
    from dsv3.parallel.mesh import EPComm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        comm = EPComm(0, 1, 1, group=dist.new_group([0]))
        ep = EPEngine(load_ep_model(model_dir, comm, dtype=torch.float64), rebalance_interval=(1, "steps"), **ENGINE)
        ep.REBALANCE_HISTORY = 5
        req = ep.submit(list(range(1, 9)), 40, SamplingParams(0.0))
        ep.run()
        # every other step: an order takes the loads up to its own step's forward, the next waits for one after it
        assert req.finish_reason == "length" and ep.placement_version > 15, (req.finish_reason, ep.placement_version)
        assert [r["version"] for r in ep.rebalances] == list(range(ep.placement_version - 4, ep.placement_version + 1))
        assert ep.stats()["rebalance_bytes"] == 0                 # one rank holds every expert: nothing moves
        ep.close()
    finally:
        dist.destroy_process_group()


def test_rebalance_is_due_after_the_interval_and_new_load_only():
    """Rank 0's decision, in data: the interval has passed since the last order (steps or seconds) and
    the group ran a forward after the last rebalance took its loads; an idle group orders none."""
    from dsv3.infer.ep_engine import rebalance_due

    for interval, steps, seconds, forwards, due in [
            ((4, "steps"), 4, 0.0, 1, True), ((4, "steps"), 3, 99.0, 1, False), ((4, "steps"), 400, 0.0, 0, False),
            ((30.0, "s"), 0, 30.0, 2, True), ((30.0, "s"), 99, 29.9, 2, False), ((30.0, "s"), 0, 3600.0, 0, False),
            (None, 99, 3600.0, 5, False)]:
        assert rebalance_due(interval, steps, seconds, forwards) == due, (interval, steps, seconds, forwards)


def test_idle_heartbeat_steps_do_not_count_toward_a_steps_rebalance_interval(model_dir):
    """A server idles (heartbeat steps only, no forward) before its first request and between two: with
    ``--rebalance-interval N`` in steps, an order needs N steps that ran a forward since the last order
    (or since the start) — idle steps never count, so the first busy steps after a long idle do not order
    a rebalance from the load of one forward."""
    from dsv3.infer.ep_engine import EPEngine, load_ep_model
    from dsv3.parallel.mesh import EPComm

    n = 5
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        comm = EPComm(0, 1, 1, group=dist.new_group([0]))
        ep = EPEngine(load_ep_model(model_dir, comm, dtype=torch.float64), rebalance_interval=(n, "steps"), **ENGINE)
        orders_at = []                            # ep.steps (forwards run) when each order was made

        def step():
            before, orders = ep.steps, ep.rebalance_orders
            assert ep.step()
            if ep.rebalance_orders > orders:
                orders_at.append(before)

        rng = random.Random(SEED)
        for _ in range(3):
            forwards = ep.steps
            for _ in range(rng.randrange(3 * n, 8 * n)):      # idle: heartbeats only
                step()
            assert ep.steps == forwards                       # no forward while idle
            req = ep.submit([rng.randrange(1, 60) for _ in range(rng.randrange(2, 20))], 3 * n,
                            SamplingParams(0.0))
            while ep._reqs:
                step()
            assert req.finish_reason == "length"
        assert orders_at, orders_at
        gaps = [b - a for a, b in zip([0] + orders_at, orders_at)]
        assert all(g >= n for g in gaps), (orders_at, gaps)
        ep.close()
    finally:
        dist.destroy_process_group()


def test_an_idle_group_orders_no_rebalance(model_dir):
    """Rebalancing every step while requests run; once none runs (the server idles, stepping only to keep
    the group alive), no more orders: each would find no new load on any rank. A request then brings
    them back."""
    from dsv3.infer.ep_engine import EPEngine, load_ep_model
    from dsv3.parallel.mesh import EPComm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        comm = EPComm(0, 1, 1, group=dist.new_group([0]))
        ep = EPEngine(load_ep_model(model_dir, comm, dtype=torch.float64), rebalance_interval=(1, "steps"), **ENGINE)
        ep.submit(list(range(1, 9)), 6, SamplingParams(0.0))
        assert ep.stats()["waiting"] == 1          # placed, not yet sent to its rank: waiting all the same
        ep.run()
        assert ep.stats()["waiting"] == ep.stats()["running"] == 0
        busy = ep.rebalance_orders
        assert busy >= 2, busy
        for _ in range(20):                       # idle steps (Rank0Engine's heartbeat under dsv3 serve)
            assert ep.step()
        assert ep.rebalance_orders == busy and ep.placement_version == busy      # the last order applied, no more
        ep.submit(list(range(1, 9)), 6, SamplingParams(0.0))
        ep.run()
        ep.step()
        assert ep.rebalance_orders > busy and ep.placement_version == ep.rebalance_orders   # each one found load
        ep.close()
    finally:
        dist.destroy_process_group()


def test_speculative_acceptance_rate_is_the_groups(two):
    """/health under --ep: the acceptance rate over every rank's drafts (it was rank 0's alone)."""
    r = two["speculative"]
    drafted, accepted = (sum(info[k] for info in r["ranks"]) for k in ("drafted", "accepted"))
    assert all(info["drafted"] > 0 for info in r["ranks"]), r["ranks"]
    stats = r["stats"]
    assert (stats["drafted"], stats["accepted"]) == (drafted, accepted)
    assert stats["speculative_acceptance_rate"] == pytest.approx(accepted / drafted)
    # the ranks' own rates differ here, so rank 0's (what /health said before) is not the group's
    assert stats["ranks"][0]["speculative_acceptance_rate"] != pytest.approx(accepted / drafted, abs=0.01)
    assert two["flat"]["stats"]["speculative_acceptance_rate"] is None


def test_preemption_under_expert_parallelism(two):
    assert sum(info["preemptions"] for info in two["preempt"]["ranks"]) > 0


# --------------------------------------------------------------------------------- dsv3 serve --ep N
@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    """A small random model with random gate biases and a byte-level tokenizer (no corpus needed)."""
    return save_served_model(tmp_path_factory.mktemp("ep_served"), SEED + 7)


@pytest.mark.slow        # the default suite serves through torchrun in tests/test_ep_failures.py
@pytest.mark.parametrize("world, flags", [
    (2, []),
    (4, ["--gpus-per-node", "2", "--two-hop", "--shared-as-routed"]),
])
def test_serve_under_torchrun(served_dir, tmp_path, world, flags):
    """torchrun --nproc-per-node N -m dsv3.cli serve --ep N: rank 0 serves HTTP, every rank takes requests,
    every completion (whole and streamed) is single-process greedy decoding's; SIGTERM stops every rank."""
    import concurrent.futures

    import httpx

    from dsv3.infer.generate import generate, load_model_dir

    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_ep_serve(served_dir, world, port, log, *flags, "--max-batch", "3")
    try:
        model, tok = load_model_dir(served_dir, "cpu")               # the reference, while the ranks start
        g = torch.Generator().manual_seed(SEED)
        prompts = [torch.randint(3, 300, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(8)]
        ref = [tok.decode(generate(model, p, 10, temperature=0), skip_special_tokens=True) for p in prompts]
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log, 90, "the ranks")

        def complete(i):
            body = dict(model=served_dir, prompt=prompts[i], max_tokens=10, temperature=0, stream=i == 0)
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            if i:
                return r.json()["choices"][0]["text"]
            chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(complete, range(8)))
        assert texts == ref, (SEED, texts, ref)
        health = httpx.get(url + "/health", timeout=5).json()
        assert health["status"] == "ok" and len(health["ranks"]) == world
        assert all(r["prompt_tokens"] > 0 for r in health["ranks"]), health     # both ranks served requests
    finally:
        stop_ep_serve(proc, log, 40)


@pytest.mark.parametrize("env, argv, line", [
    ({}, ["--ep", "2"], "--ep 2: must equal the number of ranks, 1"),
    ({}, ["--two-hop"], "--two-hop needs --ep N"),
    ({}, ["--shared-as-routed"], "--shared-as-routed needs --ep N"),
    ({}, ["--dispatch-capacity"], "--dispatch-capacity needs --ep N"),
    ({"WORLD_SIZE": "4"}, ["--ep", "4", "--gpus-per-node", "2", "--two-hop", "--dispatch-capacity"],
     "--dispatch-capacity applies to the flat dispatch"),
    ({"WORLD_SIZE": "2"}, [], "give --ep 2"),
    ({"WORLD_SIZE": "3"}, ["--ep", "3"], "--ep 3: must divide the model's routed experts (8)"),
    ({"WORLD_SIZE": "4"}, ["--ep", "4", "--gpus-per-node", "3"], "--gpus-per-node 3: must divide the number of ranks (4)"),
    ({"WORLD_SIZE": "2"}, ["--ep", "2", "--two-hop"], "--two-hop: needs more than one node"),
    ({"WORLD_SIZE": "2"}, ["--ep", "2", "--dist-timeout", "0"], "--dist-timeout 0.0: must be a positive"),
    ({}, ["--redundant-experts", "2"], "--redundant-experts needs --ep N"),
    ({}, ["--rebalance-interval", "10"], "--rebalance-interval needs --ep N"),
    ({}, ["--dist-timeout", "30"], "--dist-timeout needs --ep N"),
    ({}, ["--dist-timeout", "600"], "--dist-timeout needs --ep N"),
    ({"WORLD_SIZE": "2"}, ["--ep", "2", "--redundant-experts", "3"], "--redundant-experts 3: must be a non-negative multiple"),
    ({"WORLD_SIZE": "2"}, ["--ep", "2", "--redundant-experts", "10"], "would put two replicas of one expert"),
    ({"WORLD_SIZE": "2"}, ["--ep", "2", "--rebalance-interval", "soon"], "--rebalance-interval soon: a positive number"),
    ({"WORLD_SIZE": "2"}, ["--ep", "2", "--rebalance-interval", "0s"], "--rebalance-interval 0s: a positive number"),
    ({"WORLD_SIZE": "2"}, ["--ep", "2", "--rebalance-window", "0"], "--rebalance-window 0: must be >= 1"),
])
def test_serve_ep_bad_flags_are_one_line_exit_2(served_dir, monkeypatch, capsys, env, argv, line):
    from dsv3.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", "--model", served_dir, "--port", str(free_port()), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and line in err, err


# --------------------------------------------------------------------------------- loading and failures
def test_a_rank_reads_only_its_experts(model_dir, monkeypatch):
    """load_ep_model reads every tensor but the other ranks' experts (and, with the shared expert as a
    routed one, the shared expert into its slot): no collective is needed to load."""
    from dsv3 import hf
    from dsv3.infer.ep_engine import load_ep_model
    from dsv3.parallel.mesh import EPComm

    read: list[str] = []
    get = hf._TensorSource.get
    monkeypatch.setattr(hf._TensorSource, "get", lambda self, name: read.append(name) or get(self, name))
    full = load_pretrained(model_dir)
    all_names = set(read)
    for shared in (False, True):
        for rank in range(4):
            read.clear()
            m = load_ep_model(model_dir, EPComm(rank, 4, 2), shared_as_routed=shared)
            experts = {n.split(".mlp.experts.")[1].split(".")[0] for n in read if ".mlp.experts." in n}
            assert experts == {str(e) for e in (2 * rank, 2 * rank + 1)}, (rank, experts)
            assert set(read) - all_names == set()
            others = {n for n in all_names if ".mlp.experts." not in n} - set(read)
            assert others == set()                      # attention, gates, shared expert, MTP: all read
            for ep, moe in zip(m.moe_layers(), full.moe_layers()):
                assert ep.experts.w13.shape[0] == 2 + shared
                torch.testing.assert_close(ep.experts.w13[:2], moe.experts.w13[2 * rank:2 * rank + 2], rtol=0, atol=0)
                torch.testing.assert_close(ep.experts.w2[:2], moe.experts.w2[2 * rank:2 * rank + 2], rtol=0, atol=0)
                if shared:
                    s = moe.shared_experts
                    torch.testing.assert_close(ep.experts.w13[2], torch.cat([s.gate_proj.weight, s.up_proj.weight]),
                                               rtol=0, atol=0)
                    torch.testing.assert_close(ep.experts.w2[2], s.down_proj.weight, rtol=0, atol=0)
                    assert ep.shared_experts is None


def _dying_rank(rank, port, model_dir, out_path):
    from dsv3.infer.ep_engine import EPEngine, load_ep_model
    from dsv3.parallel.mesh import MeshSpec, build_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    comm = build_mesh(MeshSpec(2, 2), rank).expert_comm()
    ep = EPEngine(load_ep_model(model_dir, comm, dtype=torch.float64), **ENGINE)
    if rank == 1:
        for _ in range(4):
            ep.step()
        import os
        os._exit(3)                                     # dies mid-serving, without a word
    reqs = [_submit(ep, s) for s in _requests(SEED, ep.vocab_size)]
    t0 = time.time()
    try:
        ep.run()
        result = dict(raised=None)
    except Exception as e:  # noqa: BLE001
        result = dict(raised=f"{type(e).__name__}: {e}")
    result.update(seconds=time.time() - t0, done=sum(r.done for r in reqs))
    with open(out_path, "w") as f:
        json.dump(result, f)


@pytest.mark.slow        # the same through torchrun and the server: tests/test_ep_failures.py
def test_a_dead_rank_stops_the_others_with_an_error(model_dir, tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "r.json")
    ctx = mp.start_processes(_dying_rank, args=(free_port(), model_dir, out), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 90
    for p in ctx.processes:
        p.join(max(1.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in ctx.processes] == [0, 3]
    with open(out) as f:
        r = json.load(f)
    assert r["raised"] is not None and r["seconds"] < 25 and r["done"] < N_REQ, r


def test_fp8_dispatch_serves_close_to_the_single_engine(two, reference):
    """FP8 (E4M3, 1x128 scales) dispatch rounds the rows the experts see: not bitwise the single engine's
    outputs, but no request fails and most first tokens agree."""
    r, ref = two["fp8_dispatch"], reference(2, "fp8_dispatch")
    assert not any(r["errors"]), r["errors"]
    same = sum(out[:1] == o[:1] for out, (o, _, _) in zip(r["outputs"], ref))
    print(f"fp8 dispatch: {same}/{N_REQ} first tokens and "
          f"{sum(out == o for out, (o, _, _) in zip(r['outputs'], ref))}/{N_REQ} whole outputs equal")
    assert same >= N_REQ * 3 // 4, (SEED, same)


def test_a_rank_keeps_its_fp8_experts_in_e4m3(tmp_path):
    """An FP8 checkpoint served with --fp8 keep: each rank's expert slots hold the E4M3 bytes and block
    scales of its experts (and of the shared expert in its slot, with --shared-as-routed)."""
    from dsv3.infer.ep_engine import load_ep_model
    from dsv3.parallel.mesh import EPComm

    torch.manual_seed(SEED)
    d = 128
    save_pretrained(Transformer(small_config(hidden_size=d, moe_intermediate_size=d, intermediate_size=d,
                                             q_lora_rank=d, kv_lora_rank=d)), tmp_path, fp8=True)
    full = load_pretrained(tmp_path, fp8="keep")

    def raw(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    for shared in (False, True):
        for rank in range(2):
            ep = load_ep_model(str(tmp_path), EPComm(rank, 2, 2), fp8="keep", shared_as_routed=shared)
            for a, b in zip(ep.moe_layers(), full.moe_layers()):
                mine, ref = a.experts.state_dict(), b.experts.state_dict()
                assert set(mine) == {"w13", "w2", "w13_scale_inv", "w2_scale_inv"}
                assert mine["w13"].dtype == torch.float8_e4m3fn and mine["w13"].shape[0] == 4 + shared
                for k in mine:
                    assert torch.equal(raw(mine[k][:4]), raw(ref[k][4 * rank:4 * rank + 4])), k
                if shared:
                    s = b.shared_experts
                    assert torch.equal(raw(mine["w13"][4]), raw(torch.cat([s.gate_proj.weight, s.up_proj.weight])))
                    assert torch.equal(raw(mine["w2"][4]), raw(s.down_proj.weight))
                    assert torch.equal(mine["w13_scale_inv"][4], torch.cat([s.gate_proj.weight_scale_inv,
                                                                            s.up_proj.weight_scale_inv]))
