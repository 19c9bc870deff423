"""Expert parallelism over gloo ranks (SPEC §2.2, §3): the EP MoE layer against the single-process
MoE — outputs, input and weight gradients (fp32, < 1e-6 relative) — for the flat and the two-hop
path, skewed routing, ranks receiving nothing, empty batches, redundant experts, the shared expert
as a routed one, FP8 dispatch; node-limited routing and the once-per-(token, node) inter-node
hop asserted from the byte/token counters; all-reduced loads give every rank the same bias update.

Every rank builds the same reference MoE and the same global batch from a seed, runs its slice
through the EP layer, and the errors are summed over ranks (‖a−b‖/‖b‖ over the whole batch).
One process spawn per world size runs all scenarios; the tests read their results.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from dsv3 import ModelConfig
from dsv3.balance import update_bias
from dsv3.model.layers import init_weights
from dsv3.model.moe import MoE
from dsv3.parallel.expert import (CommCounters, ExpertParallelMoE, Placement, get_dispatch_layout,
                                  expert_moves, initial_placement)
from dsv3.parallel.mesh import EPComm, MeshSpec, build_mesh
from helpers import free_port, spawn_ranks

TOL = 1e-6
PHASES = ("dispatch", "combine", "dispatch_meta", "combine_meta", "bwd_dispatch", "bwd_combine")
KEYS = [f"{p}.{s}.{w}" for p in PHASES for s in ("inter", "intra", "self") for w in ("tokens", "bytes")]


def _cfg(E, k, n_group, topk_group, d=16, inter=8):
    return dataclasses.replace(ModelConfig.preset("tiny"), hidden_size=d, moe_intermediate_size=inter,
                               n_routed_experts=E, num_experts_per_tok=k, n_group=n_group,
                               topk_group=topk_group, n_shared_experts=1)


A = dict(E=8, k=3, n_group=2, topk_group=1)     # 2 groups = 2 nodes (4 ranks); a token visits 1 node
B = dict(E=16, k=4, n_group=4, topk_group=2)    # 4 groups, 2 per node (4 ranks) / 1 per node (8 ranks)


# ------------------------------------------------------------------------------ helpers run in the ranks
def _sum(comm, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if comm.size > 1:
        dist.all_reduce(t, group=comm.group)
    return t.tolist()


def _global_rel(comm, pairs) -> list[float]:
    """‖a−b‖/‖b‖ over all ranks for each (a, b); the absolute error where ‖b‖ = 0."""
    vals = []
    for a, b in pairs:
        vals += [float((a.double() - b.double()).pow(2).sum()), float(b.double().pow(2).sum())]
    s = _sum(comm, vals)
    return [(s[i] ** 0.5) / (s[i + 1] ** 0.5 if s[i + 1] > 0 else 1.0) for i in range(0, len(s), 2)]


def _counters(comm, c: CommCounters, num_nodes: int) -> dict:
    vals = _sum(comm, [float(c.get(k)) for k in KEYS] + (c.node_visits + [0] * (num_nodes + 1))[:num_nodes + 1])
    out = dict(zip(KEYS, (int(v) for v in vals)))
    out["node_visits"] = [int(v) for v in vals[len(KEYS):]]
    return out


def _setup(comm, cfg_kw, tokens, seed, bias_on=(), bias=5.0, **ep_kw):
    cfg = _cfg(**cfg_kw)
    torch.manual_seed(seed)
    ref = MoE(cfg)
    init_weights(ref, 0.3)
    with torch.no_grad():
        ref.gate.e_score_correction_bias[list(bias_on)] = bias
    n = sum(tokens)
    x = torch.randn(n, cfg.hidden_size)
    gout = torch.randn(n, cfg.hidden_size)
    ep = ExpertParallelMoE(cfg, comm, **ep_kw)
    ep.load_from(ref)
    off = sum(tokens[:comm.rank])
    return cfg, ref, ep, x, gout, slice(off, off + tokens[comm.rank])


def scenario_compare(comm, cfg_kw, tokens, seed=0, bias_on=(), placement=None, eplb=None, **ep_kw) -> dict:
    if eplb is not None:                     # placement from dsv3.eplb for the given loads
        from dsv3.eplb import rebalance_experts
        loads, num_replicas, groups = eplb
        placement = rebalance_experts(torch.tensor([loads], dtype=torch.float64), num_replicas, groups,
                                      comm.num_nodes, comm.size)[0][0]
    cfg, ref, ep, x, gout, sl = _setup(comm, cfg_kw, tokens, seed, bias_on, placement=placement, **ep_kw)
    xr = x.clone().requires_grad_()
    stats = []
    y = ref(xr, stats)
    (y * gout).sum().backward()
    xs = x[sl].clone().requires_grad_()
    ys = ep(xs)
    (ys * gout[sl]).sum().backward()
    ep.sync_replica_grads()

    # reference weights of this rank's slots (the shared expert as a stacked one when routed)
    w13, w2 = ref.experts.w13.grad, ref.experts.w2.grad
    if ep.shared_as_routed:
        s = ref.shared_experts
        w13 = torch.cat([w13, torch.cat([s.gate_proj.weight.grad, s.up_proj.weight.grad])[None]])
        w2 = torch.cat([w2, s.down_proj.weight.grad[None]])
    ll = ep.local_logical
    gate_g = ep.gate.weight.grad.clone()
    dist.all_reduce(gate_g, group=comm.group)
    pairs = [(ys.detach(), y.detach()[sl]), (xs.grad, xr.grad[sl]), (ep.experts.w13.grad, w13[ll]),
             (ep.experts.w2.grad, w2[ll])]
    names = ["out", "dx", "w13", "w2"]
    errs = _global_rel(comm, pairs)
    errs.append(float((gate_g - ref.gate.weight.grad).norm() / ref.gate.weight.grad.norm()))
    names.append("gate")
    if ep.shared_experts is not None:
        for pe, pr in zip(ep.shared_experts.parameters(), ref.shared_experts.parameters()):
            g = pe.grad.clone()
            dist.all_reduce(g, group=comm.group)
            errs.append(float((g - pr.grad).norm() / pr.grad.norm()))
            names.append("shared")

    # replicas hold identical gradients: same logical expert → same gradient on every holder
    rep_err = 0.0
    if (ep.placement.logcnt > 1).any():
        table = torch.zeros(ep.num_logical, *ep.experts.w13.shape[1:], dtype=torch.float64)
        cnt = torch.zeros(ep.num_logical, dtype=torch.float64)
        table.index_add_(0, ll, ep.experts.w13.grad.double())
        cnt.index_add_(0, ll, torch.ones(len(ll), dtype=torch.float64))
        dist.all_reduce(table, group=comm.group)
        dist.all_reduce(cnt, group=comm.group)
        mean = table / cnt.view(-1, *[1] * (table.dim() - 1))
        rep = torch.tensor(float((ep.experts.w13.grad.double() - mean[ll]).abs().max()))
        dist.all_reduce(rep, op=dist.ReduceOp.MAX, group=comm.group)
        rep_err = float(rep)

    # expected inter-node (token, node) pairs, from the reference routing (rank-major placement)
    # and from each rank's own layout (any placement)
    G, R = comm.ranks_per_node, comm.size
    lay = ep.last_plan.layout
    my_node = comm.node
    layout_pairs = int(lay.is_token_in_node.sum() - lay.is_token_in_node[:, my_node].sum())
    layout_rank_pairs = int(sum(int(lay.is_token_in_rank[:, j].sum()) for j in range(R) if j // G != my_node))
    ref_pairs = 0
    if placement is None and not ep.shared_as_routed:
        idx = stats[0].indices[sl]
        lay_ref = get_dispatch_layout(idx, cfg.n_routed_experts, R, G)
        ref_pairs = int(lay_ref.is_token_in_node.sum() - lay_ref.is_token_in_node[:, my_node].sum())
    exp = _sum(comm, [layout_pairs, layout_rank_pairs, ref_pairs, xs.shape[0],
                      int((lay.is_token_in_rank.sum(0) > 0).sum())])
    recv = _sum(comm, [float(ep.last_plan.recv_topk.shape[0] == 0)])[0]
    return dict(errors=dict(zip(names, errs)), replica_grad_err=rep_err,
                counters=_counters(comm, ep.counters, comm.num_nodes),
                layout_inter_pairs=int(exp[0]), layout_inter_rank_pairs=int(exp[1]),
                ref_inter_pairs=int(exp[2]), tokens=int(exp[3]), ranks_receiving_nothing=int(recv),
                placement=ep.placement.phy2log.tolist(), d=cfg.hidden_size)


def scenario_fp8(comm, cfg_kw, tokens, seed=0, two_hop=True) -> dict:
    cfg, ref, ep, x, gout, sl = _setup(comm, cfg_kw, tokens, seed, two_hop=two_hop, fp8_dispatch=True)
    y = ref(x)
    ys = ep(x[sl])
    (err,) = _global_rel(comm, [(ys.detach(), y.detach()[sl])])
    return dict(error=err, counters=_counters(comm, ep.counters, comm.num_nodes), d=cfg.hidden_size)


def scenario_bias(comm, cfg_kw, tokens, seed=0) -> dict:
    cfg, ref, ep, x, gout, sl = _setup(comm, cfg_kw, tokens, seed, bias_on=(0, 1), bias=0.05, two_hop=True)
    stats_ref, stats = [], []
    with torch.no_grad():
        ref(x, stats_ref)
        ep(x[sl], stats)
    counts = stats[0].counts.clone()
    dist.all_reduce(counts, group=comm.group)
    bias = ep.gate.e_score_correction_bias
    update_bias(bias, counts, 1e-3)
    gathered = [torch.empty_like(bias) for _ in range(comm.size)]
    dist.all_gather(gathered, bias, group=comm.group)
    expected = update_bias(ref.gate.e_score_correction_bias.clone(), stats_ref[0].counts, 1e-3)
    return dict(identical=all(torch.equal(g, gathered[0]) for g in gathered),
                matches_single=bool(torch.equal(gathered[0], expected)),
                counts_equal=bool(torch.equal(counts, stats_ref[0].counts)),
                moved=bool((bias != 0).any()))


def scenario_rebalance(comm, cfg_kw, tokens, seed=0) -> dict:
    """Serve, collect loads over a window, re-place with eplb at run time, serve again: same outputs."""
    cfg, ref, ep, x, gout, sl = _setup(comm, cfg_kw, tokens, seed, bias_on=(0,), bias=0.5)
    # a placement with room for redundant experts: start from every expert twice (round-robin)
    E, R = cfg_kw["E"], comm.size
    start = torch.arange(2 * E) % E
    ep = ExpertParallelMoE(cfg, comm, two_hop=True, placement=start, load_window=4)
    ep.load_from(ref)
    with torch.no_grad():
        for _ in range(3):
            ep(x[sl])
        load = ep.logical_load()
        y0 = ref(x)
        new = ep.rebalance()
        ys = ep(x[sl])
        # and back, point-to-point: the bytes received are exactly the experts fetched from other ranks
        src = expert_moves(new, start, R, comm.ranks_per_node)
        received = ep.set_placement(start)
        yb = ep(x[sl])
    (err,) = _global_rel(comm, [(ys, y0[sl])])
    (err_back,) = _global_rel(comm, [(yb, y0[sl])])
    S = ep.slots
    fetched = [p for p in range(comm.rank * S, (comm.rank + 1) * S) if src[p] // S != comm.rank]
    w = ep.experts
    pl = Placement.from_phy2log(new, E, R)
    return dict(error=err, error_back=err_back, load=load.tolist(), logcnt=pl.logcnt.tolist(), placement=new.tolist(),
                received=received, expected=len(fetched) * (w.w13[0].nbytes + w.w2[0].nbytes))


def scenario_shapes(comm) -> dict:
    """3-D input, all-empty batch, no-grad inference path."""
    cfg, ref, ep, x, gout, sl = _setup(comm, B, [0] * comm.size, 0, two_hop=True)
    y = ep(torch.zeros(0, 0, cfg.hidden_size, requires_grad=True))
    y.sum().backward()
    cfg, ref, ep, x, gout, sl = _setup(comm, B, [4] * comm.size, 1)
    y3 = ep(x[sl].view(2, 2, -1))
    (err,) = _global_rel(comm, [(y3.detach().view(4, -1), ref(x).detach()[sl])])
    return dict(empty_shape=list(y.shape), err3d=err)


def scenario_collectives(comm, cfg_kw, tokens, seed=0, **ep_kw) -> dict:
    """all_to_all_single calls of one EP forward + backward: one count exchange (asynchronous) per
    layer and step, then one payload call per hop and direction; none in the backward beyond those."""
    cfg, ref, ep, x, gout, sl = _setup(comm, cfg_kw, tokens, seed, **ep_kw)
    calls = []
    orig = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        calls.append(dict(async_op=bool(async_op), dtype=str(input.dtype), rows=int(input.shape[0]),
                          group=("ep" if group is comm.group else "inter" if group is comm.inter
                                 else "intra" if group is comm.intra else "other")))
        return orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    try:
        xs = x[sl].clone().requires_grad_()
        ys = ep(xs)
        n_fwd = len(calls)
        (ys * gout[sl]).sum().backward()
    finally:
        dist.all_to_all_single = orig
    y = ref(x)
    (err,) = _global_rel(comm, [(ys.detach(), y.detach()[sl])])
    return dict(forward=calls[:n_fwd], backward=calls[n_fwd:], error=err)


def _grad(p: torch.Tensor) -> torch.Tensor:
    """p's gradient, zeros when no rows reached it (an empty batch)."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def scenario_capacity(comm, cfg_kw, steps, seed=0, fp8_dispatch=False) -> dict:
    """One flat EP layer over several steps of changing token counts: the first dispatch exchanges
    counts, the later ones send blocks padded to learnt capacities (none exchanged), with overflow
    point to point. Each step against the single-process MoE (output, dx, expert grads), and against
    the same layer exchanging counts (bitwise)."""
    cfg = _cfg(**cfg_kw)
    torch.manual_seed(seed)
    ref = MoE(cfg)
    init_weights(ref, 0.3)
    eps = {learn: ExpertParallelMoE(cfg, comm, fp8_dispatch=fp8_dispatch, dispatch_capacity=learn)
           for learn in (True, False)}
    for ep in eps.values():
        ep.load_from(ref)
    calls, orig_a2a, orig_p2p = [], dist.all_to_all_single, dist.batch_isend_irecv

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        calls.append("count" if async_op else "rows")
        return orig_a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def p2p(ops):
        calls.extend("overflow" for op in ops if op.op is dist.isend)
        return orig_p2p(ops)

    errors, bitwise, per_step = [], [], []
    for step, tokens in enumerate(steps):
        g = torch.Generator().manual_seed(seed * 100 + step)
        n = sum(tokens)
        x, gout = torch.randn(n, cfg.hidden_size, generator=g), torch.randn(n, cfg.hidden_size, generator=g)
        off = sum(tokens[:comm.rank])
        sl = slice(off, off + tokens[comm.rank])
        ref.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        y = ref(xr)
        (y * gout).sum().backward()
        got = {}
        for learn, ep in eps.items():
            ep.zero_grad(set_to_none=True)
            xs = x[sl].clone().requires_grad_()
            del calls[:]
            dist.all_to_all_single, dist.batch_isend_irecv = counting, p2p
            try:
                ys = ep(xs)
                (ys * gout[sl]).sum().backward()
            finally:
                dist.all_to_all_single, dist.batch_isend_irecv = orig_a2a, orig_p2p
            got[learn] = (ys.detach(), _grad(xs), _grad(ep.experts.w13), _grad(ep.experts.w2))
            if learn:
                per_step.append(dict(count=calls.count("count"), overflow=calls.count("overflow")))
        ll = eps[True].local_logical
        errors.append(max(_global_rel(comm, zip(got[True], (y.detach()[sl], _grad(xr)[sl],
                                                            _grad(ref.experts.w13)[ll], _grad(ref.experts.w2)[ll])))))
        bitwise.append(all(torch.equal(a, b) for a, b in zip(got[True], got[False])))
    overflow = _sum(comm, [float(s["overflow"]) for s in per_step])
    return dict(errors=errors, bitwise=bitwise, count_exchanges=[s["count"] for s in per_step],
                overflow_sends=[int(v) for v in overflow])


SUITES = {
    4: [  # 2 nodes × 2 ranks
        ("capacity", scenario_capacity, dict(cfg_kw=B, steps=[[6, 6, 6, 6], [6, 5, 6, 6], [30, 2, 0, 12],
                                                              [0, 0, 0, 0], [4, 0, 3, 9], [6, 6, 6, 6]])),
        ("capacity_fp8", scenario_capacity, dict(cfg_kw=dict(B, d=256), steps=[[6, 6, 6, 6], [40, 1, 7, 0]],
                                                 fp8_dispatch=True)),
        ("flat_A", scenario_compare, dict(cfg_kw=A, tokens=[6, 6, 6, 6], seed=1)),
        ("twohop_A", scenario_compare, dict(cfg_kw=A, tokens=[6, 6, 6, 6], seed=1, two_hop=True)),
        ("flat_B", scenario_compare, dict(cfg_kw=B, tokens=[7, 5, 6, 4], seed=2)),
        ("twohop_B", scenario_compare, dict(cfg_kw=B, tokens=[7, 5, 6, 4], seed=2, two_hop=True)),
        ("skewed_flat", scenario_compare, dict(cfg_kw=B, tokens=[5, 5, 5, 5], seed=3, bias_on=range(4))),
        ("skewed_twohop", scenario_compare, dict(cfg_kw=B, tokens=[5, 5, 5, 5], seed=3, bias_on=range(4),
                                                 two_hop=True)),
        ("empty_flat", scenario_compare, dict(cfg_kw=B, tokens=[5, 0, 3, 0], seed=4)),
        ("empty_twohop", scenario_compare, dict(cfg_kw=B, tokens=[5, 0, 3, 0], seed=4, two_hop=True)),
        ("empty_node_twohop", scenario_compare, dict(cfg_kw=A, tokens=[0, 0, 4, 3], seed=5, two_hop=True)),
        ("redundant_flat", scenario_compare, dict(cfg_kw=A, tokens=[6, 6, 6, 6], seed=6, bias_on=(0,), bias=0.3,
                                                  eplb=([50, 10, 5, 5, 30, 5, 3, 2], 12, 2))),
        ("redundant_twohop", scenario_compare, dict(cfg_kw=A, tokens=[6, 6, 6, 6], seed=6, bias_on=(0,), bias=0.3,
                                                    eplb=([50, 10, 5, 5, 30, 5, 3, 2], 12, 2), two_hop=True)),
        ("redundant_local", scenario_compare, dict(cfg_kw=A, tokens=[6, 0, 6, 6], seed=7, bias_on=(0,), bias=0.3,
                                                   eplb=([50, 10, 5, 5, 30, 5, 3, 2], 12, 2), two_hop=True,
                                                   replica_choice="local")),
        ("shared_routed_flat", scenario_compare, dict(cfg_kw=A, tokens=[5, 3, 0, 4], seed=8, shared_as_routed=True)),
        ("shared_routed_twohop", scenario_compare, dict(cfg_kw=A, tokens=[5, 3, 0, 4], seed=8, shared_as_routed=True,
                                                        two_hop=True, replica_choice="local")),
        ("fp8_twohop", scenario_fp8, dict(cfg_kw=dict(B, d=32), tokens=[6, 6, 6, 6])),
        ("bias", scenario_bias, dict(cfg_kw=B, tokens=[6, 2, 0, 5])),
        ("rebalance", scenario_rebalance, dict(cfg_kw=A, tokens=[6, 6, 6, 6], seed=9)),
        ("shapes", scenario_shapes, dict()),
        ("calls_flat", scenario_collectives, dict(cfg_kw=B, tokens=[6, 6, 6, 6], seed=15)),
        ("calls_twohop", scenario_collectives, dict(cfg_kw=B, tokens=[6, 6, 6, 6], seed=15, two_hop=True)),
        ("calls_fp8", scenario_collectives, dict(cfg_kw=dict(B, d=32), tokens=[6, 6, 6, 6], seed=15,
                                                 two_hop=True, fp8_dispatch=True)),
    ],
    8: [  # 4 nodes × 2 ranks
        ("flat_B", scenario_compare, dict(cfg_kw=B, tokens=[4, 3, 5, 2, 4, 3, 5, 2], seed=11)),
        ("twohop_B", scenario_compare, dict(cfg_kw=B, tokens=[4, 3, 5, 2, 4, 3, 5, 2], seed=11, two_hop=True)),
        ("skewed_empty_twohop", scenario_compare, dict(cfg_kw=B, tokens=[3, 0, 4, 2, 0, 0, 5, 1], seed=12,
                                                       bias_on=range(8), two_hop=True)),
        ("redundant_twohop", scenario_compare, dict(cfg_kw=B, tokens=[4, 4, 0, 4, 4, 4, 4, 4], seed=13,
                                                    bias_on=(0, 5), bias=0.3, two_hop=True,
                                                    eplb=([40, 9, 8, 7, 6, 30, 5, 4, 4, 3, 3, 3, 2, 2, 2, 1],
                                                          24, 4))),
        ("shared_routed_twohop", scenario_compare, dict(cfg_kw=B, tokens=[3, 3, 3, 3, 3, 3, 3, 0], seed=14,
                                                        shared_as_routed=True, two_hop=True)),
        ("bias", scenario_bias, dict(cfg_kw=B, tokens=[3, 0, 4, 2, 3, 3, 0, 1])),
    ],
}


def _worker(rank, world, gpus_per_node, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=45))
    mesh = build_mesh(MeshSpec(world, gpus_per_node), rank)
    comm = mesh.expert_comm()
    results = {}
    for name, fn, kw in SUITES[world]:
        t0 = time.time()
        try:
            results[name] = fn(comm, **kw)
        except Exception as e:   # fail fast: the spawn context kills the other ranks and re-raises
            raise RuntimeError(f"rank {rank}, scenario {name}:\n{traceback.format_exc()}") from e
        results[name]["seconds"] = round(time.time() - t0, 3)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world: int, gpus_per_node: int, out_path: str, timeout: float = 240.0) -> dict:
    return spawn_ranks(_worker, (world, gpus_per_node, free_port(), out_path), world, out_path, timeout)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return run_ranks(4, 2, str(tmp_path_factory.mktemp("ep4") / "r.json"))


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    return run_ranks(8, 2, str(tmp_path_factory.mktemp("ep8") / "r.json"))


def _ok(res: dict, name: str) -> dict:
    r = res[name]
    assert "error_trace" not in r, r.get("error_trace")
    return r


def _check_equal(r: dict):
    for what, err in r["errors"].items():
        assert err < TOL, f"{what}: relative error {err:.2e}"
    assert r["replica_grad_err"] == 0.0


def _check_counters(r: dict, two_hop: bool, topk_group: int | None = None):
    c = r["counters"]
    if two_hop:
        # each (token, remote node) pair crosses nodes exactly once per direction, from the counters
        assert c["dispatch.inter.tokens"] == r["layout_inter_pairs"]
        assert c["combine.inter.tokens"] == r["layout_inter_pairs"]
        assert c["bwd_dispatch.inter.tokens"] == r["layout_inter_pairs"]
        assert c["dispatch.inter.bytes"] == r["layout_inter_pairs"] * r["d"] * 4
        if r["ref_inter_pairs"]:
            assert c["dispatch.inter.tokens"] == r["ref_inter_pairs"]
    else:
        assert c["dispatch.inter.tokens"] == r["layout_inter_rank_pairs"]
    assert sum(c["node_visits"]) == r["tokens"]
    if topk_group is not None:
        assert all(v == 0 for v in c["node_visits"][topk_group + 1:]), c["node_visits"]


# ------------------------------------------------------------------------------ 4 ranks = 2 nodes × 2
@pytest.mark.parametrize("name,two_hop", [("flat_A", False), ("twohop_A", True), ("flat_B", False),
                                          ("twohop_B", True)])
def test_ep_matches_single_process(four, name, two_hop):
    r = _ok(four, name)
    _check_equal(r)
    _check_counters(r, two_hop, topk_group=1 if name.endswith("A") else 2)


def test_node_limited_routing_visits_at_most_topk_group_nodes(four):
    assert _ok(four, "twohop_A")["counters"]["node_visits"][2:] == [0]             # 1 of 2 nodes


def _fewer_inter_node_copies(res) -> None:
    f, t = _ok(res, "flat_B")["counters"], _ok(res, "twohop_B")["counters"]
    assert t["dispatch.inter.tokens"] <= f["dispatch.inter.tokens"]
    assert t["dispatch.intra.tokens"] >= 0 and f["dispatch.intra.tokens"] >= 0


def test_two_hop_sends_fewer_inter_node_copies_than_flat(four):
    _fewer_inter_node_copies(four)


@pytest.mark.parametrize("name", ["skewed_flat", "skewed_twohop"])
def test_skewed_routing_ranks_receive_nothing(four, name):
    r = _ok(four, name)
    _check_equal(r)
    _check_counters(r, name.endswith("twohop"), topk_group=2)
    assert r["ranks_receiving_nothing"] == 3          # every token picks experts 0..3 on rank 0


@pytest.mark.parametrize("name", ["empty_flat", "empty_twohop", "empty_node_twohop"])
def test_empty_batches(four, name):
    r = _ok(four, name)
    _check_equal(r)
    _check_counters(r, "twohop" in name)


@pytest.mark.parametrize("name", ["redundant_flat", "redundant_twohop", "redundant_local"])
def test_redundant_experts(four, name):
    r = _ok(four, name)
    _check_equal(r)
    _check_counters(r, "flat" not in name, topk_group=1)    # hierarchical EPLB keeps a group on its node
    assert len(r["placement"]) == 12 and sorted(set(r["placement"])) == list(range(8))


@pytest.mark.parametrize("name", ["shared_routed_flat", "shared_routed_twohop"])
def test_shared_expert_as_routed(four, name):
    r = _ok(four, name)
    _check_equal(r)
    _check_counters(r, "twohop" in name)


def test_fp8_dispatch(four):
    r = _ok(four, "fp8_twohop")
    assert r["error"] < 0.1, r["error"]
    c, d = r["counters"], r["d"]
    rows = c["dispatch.inter.tokens"]
    assert rows > 0 and c["dispatch.inter.bytes"] == rows * (d + 4)   # e4m3 + one fp32 scale per 1×128 tile
    assert c["combine.inter.bytes"] == rows * d * 4                    # combine in the activation dtype


@pytest.mark.parametrize("name,hops", [("calls_flat", ["ep"]), ("calls_twohop", ["inter", "intra"]),
                                       ("calls_fp8", ["inter", "intra"])])
def test_one_count_exchange_per_layer_and_step(four, name, hops):
    r = _ok(four, name)
    assert r["error"] < (0.1 if "fp8" in name else TOL)
    fwd, bwd = r["forward"], r["backward"]
    counts = [c for c in fwd if c["async_op"]]
    assert len(counts) == 1 and counts[0]["group"] == "ep" and counts[0]["dtype"] == "torch.int64"
    assert fwd[0]["async_op"]                                             # the counts go first
    payload = [c["group"] for c in fwd if not c["async_op"]]
    assert payload == hops + hops[::-1]                                   # dispatch, then combine
    assert all(c["dtype"] == "torch.uint8" for c in fwd if not c["async_op"])   # packed rows
    assert [c["group"] for c in bwd] == hops + hops[::-1] and not any(c["async_op"] for c in bwd)


@pytest.mark.parametrize("name", ["capacity", "capacity_fp8"])
def test_flat_dispatch_learns_capacities_instead_of_exchanging_counts(four, name):
    r = _ok(four, name)
    tol = 0.1 if "fp8" in name else TOL
    assert all(e < tol for e in r["errors"]), r["errors"]
    assert all(r["bitwise"])                                 # = the same layer exchanging counts
    assert r["count_exchanges"][0] == 1 and not any(r["count_exchanges"][1:])
    assert r["overflow_sends"][0] == 0 and sum(r["overflow_sends"]) > 0    # a step outgrew its capacities


def _bias_identical(res) -> None:
    r = _ok(res, "bias")
    assert r["identical"] and r["matches_single"] and r["counts_equal"] and r["moved"]


def test_bias_update_identical_on_every_rank(four):
    _bias_identical(four)


def test_rebalance_at_run_time(four):
    r = _ok(four, "rebalance")
    assert r["error"] < TOL and r["error_back"] < TOL
    assert r["received"] == r["expected"]
    assert sum(r["logcnt"]) == 16 and min(r["logcnt"]) >= 1
    assert r["logcnt"][0] == max(r["logcnt"])        # expert 0 (biased up) is the most replicated
    assert r["load"][0] == max(r["load"])


def test_shapes_and_empty_world(four):
    r = _ok(four, "shapes")
    assert r["empty_shape"] == [0, 0, 16] and r["err3d"] < TOL


# ------------------------------------------------------------------------------ 8 ranks = 4 nodes × 2
# (-m slow: 8 processes on 2 cores; the 4-rank world above covers each path in the default suite)
@pytest.mark.slow
def test_eight_ranks_node_limits_two_hop_savings_and_bias(eight):
    visits = _ok(eight, "twohop_B")["counters"]["node_visits"]                       # ≤ 2 of 4 nodes
    assert visits[3:] == [0, 0] and visits[2] > 0
    _fewer_inter_node_copies(eight)
    t8 = _ok(eight, "twohop_B")
    assert t8["counters"]["dispatch.inter.tokens"] < t8["layout_inter_rank_pairs"]   # strictly fewer here
    _bias_identical(eight)


@pytest.mark.slow
@pytest.mark.parametrize("name,two_hop", [("flat_B", False), ("twohop_B", True), ("skewed_empty_twohop", True),
                                          ("redundant_twohop", True), ("shared_routed_twohop", True)])
def test_ep_eight_ranks(eight, name, two_hop):
    r = _ok(eight, name)
    _check_equal(r)
    _check_counters(r, two_hop, topk_group=None if "shared" in name else 2)
    if name == "skewed_empty_twohop":
        assert r["ranks_receiving_nothing"] == 4      # experts 0..7 live on ranks 0..3


# ------------------------------------------------------------------------------ single process
def test_packed_rows_round_trip():
    """Rows of several tensors travel as one byte row each; each comes back bit for bit (as a view)."""
    from dsv3.parallel.expert import _gather, _pack, _row_spec, _unpack
    torch.manual_seed(0)
    n = 7
    ids = torch.randint(-1, 50, (n, 3), dtype=torch.int32)
    w = torch.rand(n, 3)
    x = torch.randn(n, 5).to(torch.bfloat16)
    q = torch.randint(0, 255, (n, 9), dtype=torch.uint8)
    s = torch.rand(n, 1)
    g = torch.randn(1, 4).expand(n, 4)                     # stride-0 rows, like a sum's gradient
    for tensors in ([ids, w, x], [ids, w, s, q], [x, ids], [g], [w, g], [x]):
        specs, width = _row_spec(tensors)
        assert width % max(t.element_size() for t in tensors) == 0
        for off, nb, dtype, _ in specs:
            assert off % torch.empty((), dtype=dtype).element_size() == 0
        packed = _pack(tensors, specs, width)
        assert packed.shape == (n, width) and packed.dtype == torch.uint8
        for got, want in zip(_unpack(packed, specs), tensors):
            assert got.dtype == want.dtype and torch.equal(got, want)
        index = torch.tensor([3, 0, 6, 3], dtype=torch.int64)
        for got, want in zip(_unpack(_gather(tensors, specs, width, index), specs), tensors):
            assert torch.equal(got, want[index])
        empty = _gather(tensors, specs, width, index[:0])
        assert [tuple(t.shape) for t in _unpack(empty, specs)] == [(0, *t.shape[1:]) for t in tensors]


def test_plan_on_one_rank_needs_no_collective():
    from dsv3.parallel.expert import combine, dispatch, plan_dispatch
    idx = torch.tensor([[0, 3], [2, -1], [-1, -1], [1, 1]])
    x, w = torch.randn(4, 6), torch.rand(4, 2)
    plan = plan_dispatch(idx, 4, EPComm.single())
    plan.wait()                                               # the count exchange (none on one rank)
    assert plan.hops[0].send_splits == [3] and plan.hops[0].recv_splits == [3]   # token 2 goes nowhere
    x_r, w_r = dispatch(x, w, plan)
    assert torch.equal(plan.recv_topk, idx[[0, 1, 3]]) and torch.equal(x_r, x[[0, 1, 3]])
    y = combine(x_r, plan)
    assert torch.equal(y[[0, 1, 3]], x[[0, 1, 3]]) and torch.equal(y[2], torch.zeros(6))
    with pytest.raises(RuntimeError, match="dispatch along this plan first"):
        combine(x_r, plan_dispatch(idx, 4, EPComm.single()))


def test_layout_matches_brute_force():
    torch.manual_seed(0)
    idx = torch.randint(0, 16, (20, 4))
    idx[3] = -1
    lay = get_dispatch_layout(idx, 16, 8, 2)
    for t in range(20):
        ranks = {int(e) // 2 for e in idx[t] if e >= 0}
        assert set(lay.is_token_in_rank[t].nonzero().flatten().tolist()) == ranks
        assert set(lay.is_token_in_node[t].nonzero().flatten().tolist()) == {r // 2 for r in ranks}
    assert lay.num_tokens_per_rank.tolist() == lay.is_token_in_rank.sum(0).tolist()
    assert int(lay.num_tokens_per_expert.sum()) == int((idx >= 0).sum())
    with pytest.raises(ValueError, match="divisible"):
        get_dispatch_layout(idx, 15, 8, 2)


def test_single_rank_equals_moe():
    cfg = _cfg(**A)
    torch.manual_seed(0)
    ref = MoE(cfg)
    init_weights(ref, 0.3)
    ep = ExpertParallelMoE(cfg, EPComm.single())
    ep.load_from(ref)
    x = torch.randn(2, 5, cfg.hidden_size)
    assert torch.allclose(ep(x), ref(x), rtol=0, atol=1e-6)


def test_placement_validation_and_maps():
    pl = Placement.from_phy2log([0, 1, 2, 0, 3, 0], 4, 3)
    assert pl.logcnt.tolist() == [3, 1, 1, 1]
    assert pl.log2phy.tolist() == [[0, 3, 5], [1, -1, -1], [2, -1, -1], [4, -1, -1]]
    with pytest.raises(ValueError, match="no replica"):
        Placement.from_phy2log([0, 1, 1, 0], 3, 2)
    with pytest.raises(ValueError, match="divide"):
        Placement.from_phy2log([0, 1, 2], 3, 2)
    assert initial_placement(4, 2, shared_as_routed=True).tolist() == [0, 1, 4, 2, 3, 4]
    assert initial_placement(8, 4, redundant=4).tolist() == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 0]
    assert initial_placement(4, 2, redundant=2, shared_as_routed=True).tolist() == [0, 1, 4, 2, 2, 3, 4, 0]
    with pytest.raises(ValueError, match="multiple"):
        initial_placement(8, 4, redundant=2)
    with pytest.raises(ValueError, match="distinct"):
        initial_placement(4, 2, redundant=6)


def test_expert_moves_fetch_only_what_a_rank_lacks():
    # 2 ranks × 2 slots: slot 1 needs expert 2 (held by rank 1 only), slot 3 needs expert 1 (rank 0)
    assert expert_moves([0, 1, 2, 3], [0, 2, 2, 1], 2).tolist() == [0, 2, 2, 1]
    # a permutation within each rank: local copies only
    assert expert_moves([0, 1, 2, 3], [1, 0, 3, 2], 2).tolist() == [1, 0, 3, 2]
    # 4 ranks, 2 nodes: expert 0 on rank 0 (node 0) and rank 3 (node 1); rank 2 (node 1) takes it from rank 3
    assert expert_moves([0, 1, 2, 0], [0, 1, 0, 2], 4, ranks_per_node=2).tolist() == [0, 1, 3, 2]
    # a rank holding the expert copies it locally, whatever other replicas exist
    assert expert_moves([0, 1, 0, 2, 0, 3], [1, 2, 3, 0, 2, 0], 3).tolist() == [1, 3, 5, 2, 3, 4]
    # several remote holders: the receiving slots rotate over them
    assert expert_moves([0, 0, 1, 2], [1, 2, 0, 0], 4).tolist() == [2, 3, 0, 1]
    with pytest.raises(ValueError, match="no replica"):
        expert_moves([0, 1], [2, 1], 2)
    cfg = _cfg(**A)
    with pytest.raises(ValueError, match="replica_choice"):
        ExpertParallelMoE(cfg, EPComm.single(), replica_choice="random")
    with pytest.raises(ValueError, match="shared_as_routed"):
        ExpertParallelMoE(dataclasses.replace(cfg, n_shared_experts=2), EPComm.single(), shared_as_routed=True)
