"""Two-micro-batch overlap (``EPEngine(tbo=True)``, ``dsv3 serve --ep N --tbo``) on real gloo ranks.

Every forward's rows split into two halves that run at once on two overlap lanes, one half's compute
while the other's dispatch/combine is in flight. For 32 requests of mixed lengths (greedy and sampled
with seeds, the requests and helpers of ``test_ep_engine``) the outputs with TBO equal those without
it and the single-process engine's: plain and speculative decoding, a rank with no requests (both its
halves empty), and on 4 ranks (2 simulated nodes × 2) two-hop dispatch. The recorded trace shows
dispatch/combine overlapped with the other lane's compute. The model is fp64 so equality is exact.

One spawn per world size runs every scenario; the tests read their results."""

from __future__ import annotations

import datetime
import json
import os
import random
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from dsv3.hf import load_pretrained
from dsv3.infer.engine import Engine, split_rows
from helpers import finish_ranks, free_port, gather_scenario, spawn_ranks
from test_ep_engine import ENGINE, _logprobs, _requests, _submit
from test_ep_engine import model_dir, model_dirs, served_dir  # noqa: F401 (fixtures: random models, gate biases)
from test_ep_engine import test_serve_ep_bad_flags_are_one_line_exit_2 as _bad_flags
from test_ep_engine import test_serve_under_torchrun as _serve_under_torchrun

SEED = random.SystemRandom().randrange(1 << 30)      # fresh inputs every run (named in failures)

# (name, EP options, tbo, engine options, ranks that take requests (None: the engine spreads them), the
# first how many of the 32 requests)
SCENARIOS = {
    2: [("off", {}, False, {}, None, 32),
        ("tbo", {}, True, {}, None, 32),
        ("tbo_speculative", {}, True, dict(speculative=True), None, 16),
        ("tbo_idle_rank", {}, True, {}, [0], 12)],
    4: [("two_hop_off", dict(two_hop=True), False, {}, None, 32),
        ("two_hop_tbo", dict(two_hop=True), True, {}, None, 32)],
}
SPECULATIVE = {s[0] for w in SCENARIOS.values() for s in w if s[3].get("speculative")}


def _rank(rank, world, gpus_per_node, port, model_dir, seed, trace_root, out_path):
    from dsv3.infer.ep_engine import EPEngine, load_ep_model
    from dsv3.parallel.mesh import MeshSpec, build_mesh
    from dsv3.parallel.overlap import overlap_summary

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    mesh = build_mesh(MeshSpec(world, gpus_per_node), rank)
    mesh.add_lane(1)                                  # lane 1's copies of the EP groups (TBO's second half)
    comm = mesh.expert_comm()
    results = {}
    for name, ep_opts, tbo, opts, ranks, n in SCENARIOS[world]:
        t0 = time.time()
        try:
            model = load_ep_model(model_dir, comm, dtype=torch.float64, **ep_opts)
            trace_dir = os.path.join(trace_root, name) if tbo else None
            ep = EPEngine(model, tbo=tbo, trace_dir=trace_dir, **ENGINE, **opts)
            if rank == 0:
                reqs = [_submit(ep, s, rank=None if ranks is None else ranks[i % len(ranks)])
                        for i, s in enumerate(_requests(seed, model.cfg.vocab_size)[:n])]
                ep.run()
                res = dict(outputs=[r.output for r in reqs], reasons=[r.finish_reason for r in reqs],
                           errors=[r.error for r in reqs], placed=ep.placed, logprobs=[_logprobs(r) for r in reqs])
                ep.close()
            else:
                ep.serve()
            mine = dict(steps=ep.engine.steps, empty_forwards=ep.empty_forwards,
                        overlap=overlap_summary(list(ep.trace.events)) if tbo else None)
            gather_scenario(results, name, res if rank == 0 else None, mine, world, t0)
        except Exception as e:   # fail fast: the spawn context kills the other ranks and re-raises
            raise RuntimeError(f"rank {rank}, scenario {name}:\n{traceback.format_exc()}") from e
    finish_ranks(results, out_path)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The single-process engine's (output, reason, log-probabilities) per request, plain and speculative."""
    model = load_pretrained(model_dir, dtype=torch.float64)
    out = {}
    for speculative in (False, True):
        eng = Engine(model, **ENGINE, speculative=speculative)
        reqs = [_submit(eng, s) for s in _requests(SEED, model.cfg.vocab_size)]
        eng.run()
        out[speculative] = [(r.output, r.finish_reason, _logprobs(r)) for r in reqs]
    return out


def _spawn(world, model_dir, tmp_path_factory, timeout):
    root = tmp_path_factory.mktemp(f"tbo{world}")
    args = (world, 2, free_port(), model_dir, SEED, str(root / "traces"), str(root / "r.json"))
    res = spawn_ranks(_rank, args, world, str(root / "r.json"), timeout=timeout)
    res["trace_root"] = str(root / "traces")
    return res


@pytest.fixture(scope="module")
def two(model_dir, tmp_path_factory):
    return _spawn(2, model_dir, tmp_path_factory, 150)


def _same_outputs(got: dict, ref: list, what: str) -> None:
    """Tokens and finish reasons exactly ``ref``'s (its first as many requests as ``got`` has: each request
    samples alone); log-probabilities the same tokens, values (fp32) as close as the summation order allows."""
    assert not any(got["errors"]), (SEED, what, got["errors"])
    ref = ref[:len(got["outputs"])]
    for i, (out, reason, lps) in enumerate(ref):
        assert got["outputs"][i] == out and got["reasons"][i] == reason, (f"seed {SEED}, {what}, request {i}",
                                                                          got["outputs"][i], out)
        for a, b in zip(got["logprobs"][i], lps):
            assert (a is None) == (b is None)
            if a is not None:
                assert a[0] == b[0] and [t for t, _ in a[2]] == [t for t, _ in b[2]] and abs(a[1] - b[1]) < 1e-5


def test_split_rows_balances_token_counts():
    assert split_rows([]) == 0
    assert split_rows([5]) == 1                       # one row: the first half takes it, the second is empty
    assert split_rows([1, 1]) == 1 and split_rows([1, 1, 1]) == 2 and split_rows([2, 2, 2, 2]) == 2
    assert split_rows([48, 1, 1, 1]) == 1 and split_rows([3, 3, 40]) == 2 and split_rows([40, 3, 3]) == 1


@pytest.mark.parametrize("name", [s[0] for s in SCENARIOS[2]])
def test_two_ranks_tbo_matches_the_single_engine(two, reference, name):
    _same_outputs(two[name], reference[name in SPECULATIVE], name)


def test_tbo_on_and_off_give_the_same_outputs(two):
    off = two["off"]
    _same_outputs(two["tbo"], list(zip(off["outputs"], off["reasons"], off["logprobs"])), "tbo vs off")


def test_a_rank_without_requests_joins_both_halves(two):
    r = two["tbo_idle_rank"]
    assert r["placed"][1] == 0
    idle, busy = r["ranks"][1], r["ranks"][0]
    assert idle["steps"] == 0 and idle["empty_forwards"] >= 2 * busy["steps"]     # two halves per forward


def test_the_trace_shows_dispatch_combine_behind_compute(two):
    """Every rank's trace: dispatch/combine on both lanes, a nonzero share of it while the other lane
    computed; each rank wrote its Chrome trace (with that summary) and its timeline PNG at the end."""
    for name in ("tbo", "tbo_speculative"):
        for rank, info in enumerate(two[name]["ranks"]):
            o = info["overlap"]
            assert o["comm_s"] > 0 and o["hidden_fraction"] > 0, (name, rank, o)
            path = os.path.join(two["trace_root"], name, f"rank{rank}")
            with open(path + ".json") as f:
                trace = json.load(f)
            lanes = {e["tid"] for e in trace["traceEvents"]}
            assert {"lane 0 work", "lane 1 work", "lane 0 comm", "lane 1 comm"} <= lanes, lanes
            assert trace["otherData"]["hidden_fraction"] > 0
            assert os.path.getsize(path + ".png") > 1000
    print("seconds per scenario:", {n: two[n]["seconds"] for n, *_ in SCENARIOS[2]})
    print("overlapped share per rank:", {n: [round(i["overlap"]["hidden_fraction"], 3) for i in two[n]["ranks"]]
                                         for n in ("tbo", "tbo_speculative", "tbo_idle_rank")})


@pytest.mark.slow
def test_four_ranks_two_nodes_two_hop_tbo(model_dir, reference, tmp_path_factory):
    four = _spawn(4, model_dir, tmp_path_factory, 300)
    for name in ("two_hop_off", "two_hop_tbo"):
        _same_outputs(four[name], reference[False], name)
    assert all(info["overlap"]["hidden_fraction"] > 0 for info in four["two_hop_tbo"]["ranks"])


def test_tbo_without_lanes_is_refused(model_dir):
    """EPEngine(tbo=True) on groups without lane-1 copies: a ValueError naming Mesh.add_lane, at once."""
    from dsv3.infer.ep_engine import EPEngine, load_ep_model
    from dsv3.parallel.mesh import EPComm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        comm = EPComm(0, 1, 1, group=dist.new_group([0]))
        with pytest.raises(ValueError, match="Mesh.add_lane"):
            EPEngine(load_ep_model(model_dir, comm, dtype=torch.float64), tbo=True, **ENGINE)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------- dsv3 serve --ep N --tbo
@pytest.mark.parametrize("env, argv, line", [
    ({}, ["--tbo"], "--tbo needs --ep N"),
    ({}, ["--trace-dir", "t"], "--trace-dir needs --ep N"),
    ({"WORLD_SIZE": "2"}, ["--ep", "2", "--trace-dir", "t"], "--trace-dir records the two micro-batches' lanes: "
                                                             "it needs --tbo"),
])
def test_tbo_flags_are_one_line_exit_2(served_dir, monkeypatch, capsys, env, argv, line):
    _bad_flags(served_dir, monkeypatch, capsys, env, argv, line)


@pytest.mark.slow
def test_serve_under_torchrun_with_tbo(served_dir, tmp_path):
    """torchrun … serve --ep 2 --tbo --trace-dir DIR: completions equal single-process greedy decoding, and
    after SIGTERM every rank has written its Chrome trace and timeline."""
    traces = tmp_path / "traces"
    _serve_under_torchrun(served_dir, tmp_path, 2, ["--tbo", "--trace-dir", str(traces)])
    for rank in range(2):
        with open(traces / f"rank{rank}.json") as f:
            assert json.load(f)["otherData"]["hidden_fraction"] > 0
        assert (traces / f"rank{rank}.png").stat().st_size > 1000
