"""The pipeline runtime (SPEC §2.1): every schedule on gloo ranks against a single-process run.

Each check spawns its ranks once and runs several schedules inside them: the per-micro-batch losses and
every parameter gradient must match the unsplit model run micro-batch by micro-batch (fp32, < 1e-6
relative), a no-grad pass must return the same losses and logits, a killed rank must make its peer
raise a clear error quickly, and ``dsv3 train --pp 2 --schedule dualpipev`` under torchrun must follow
the single-process loss curve and, killed with SIGKILL and resumed, repeat its uninterrupted run exactly.

Memory: every rank gives storage only to the parameters and buffers of its own stages (the rest stays
on ``meta``), initialised bit for bit like the single-process model; the whole model and optimizer
state gathered to rank 0 for a checkpoint equal the single-process ones in the single-process layout,
and loading such a checkpoint restores each rank's share.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from dsv3 import Transformer
from dsv3.checkpoint import list_checkpoints
from dsv3.parallel.pipeline import build_schedule
from dsv3.parallel.pipeline.stages import split_layers
from helpers import cli_env, small_config


def _cfg(**kw):
    return small_config(**{"num_hidden_layers": 4, **kw})


LAM, ALPHA = 0.3, 1e-2


def _model():
    torch.manual_seed(0)
    m = Transformer(_cfg())
    with torch.no_grad():
        for mod in m.moe_layers():
            mod.gate.e_score_correction_bias.normal_(0, 0.05)
    return m.train()


def _batch(M, b=2, T=10, D=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 97, (M * b, T + D + 1), generator=g)
    return toks[:, :-1].contiguous(), toks[:, 1:].contiguous()


# ------------------------------------------------------------------------------------------------
# helpers run inside the spawned ranks


def _init(rank, world, store, timeout=60):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def _pipe(model, name, pp, M, b, timeout=60, mesh=None, expert_options=None):
    from dsv3.parallel.pipeline.stages import PipelineParallel
    from dsv3.train.losses import eval_sums, routing_balance_loss, token_loss

    return PipelineParallel(model, name, pp, M, local_batch=M * b, timeout=timeout, eval_fn=eval_sums,
                            mesh=mesh, expert_options=expert_options,
                            loss_fn=functools.partial(token_loss, mtp_lambda=LAM),
                            balance_fn=functools.partial(routing_balance_loss, balance_alpha=ALPHA))


def _on_rank0(fn, *args):
    """``fn(*args)`` computed once, on rank 0, and sent to every rank (the reference is the same for all:
    8 ranks on 2 cores need not each compute it)."""
    import torch.distributed as dist

    box = [fn(*args) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reference(inputs, targets, M):
    """Unsplit model, micro-batch by micro-batch: (losses [M], grads by name, eval losses, eval logits per
    mb, (model and optimizer state dicts after one AdamW step on those gradients), (cross-entropy sum,
    tokens, expert loads) of an evaluation of the first 3 rows)."""
    from dsv3.train.optim import AdamW, param_groups
    from dsv3.train.losses import compute_loss

    model = _model()
    b = inputs.shape[0] // M
    losses = []
    for i in range(M):
        loss, _ = compute_loss(model, inputs[i * b:(i + 1) * b], targets[i * b:(i + 1) * b], LAM, ALPHA)
        (loss / M).backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        eval_losses, logits = [], []
        for i in range(M):
            sl = slice(i * b, (i + 1) * b)
            loss, _ = compute_loss(model, inputs[sl], targets[sl], LAM, ALPHA)
            eval_losses.append(loss)
            logits.append(model.forward_train(inputs[sl]).logits)
        few = model.forward_train(inputs[:3])   # an evaluation batch smaller than the micro-batch count
        T = few.logits.shape[1]
        ce = torch.nn.functional.cross_entropy(few.logits.reshape(-1, few.logits.shape[-1]),
                                               targets[:3, :T].reshape(-1), reduction="sum")
        few = (float(ce), targets[:3, :T].numel(), torch.stack([r.counts for r in few.routing]))
    opt = AdamW(param_groups(model, 0.1), lr=1e-2)
    opt.step()
    state = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
    return torch.stack(losses), grads, torch.stack(eval_losses), logits, state, few


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _check_schedule(name, pp, M, b=2, dp=1):
    """Run one train step and one eval pass of ``name`` (× ``dp`` data-parallel replicas, each with M
    micro-batches of the global batch); return a dict of the worst differences."""
    import torch.distributed as dist

    inputs, targets = _batch(M * dp, b)
    ref_losses, ref_grads, ref_eval, ref_logits, ref_state, ref_few = _reference(inputs, targets, M * dp)
    model = _model()
    pipe = _pipe(model, name, pp, M, b)
    assert pipe.dp == dp
    out0 = _check_storage(pipe, model)
    ce, n, counts = pipe.evaluate(inputs[:3], targets[:3])   # the trainer's evaluation: whole batch, all ranks
    out0["eval_few"] = abs(ce - ref_few[0]) / ref_few[0] if n == ref_few[1] and torch.equal(counts, ref_few[2]) else 1.0
    d = pipe.dp_rank
    mine = slice(d * M * b, (d + 1) * M * b)
    inputs, targets = inputs[mine], targets[mine]
    ref_losses, ref_eval, ref_logits = ref_losses[d * M:(d + 1) * M], ref_eval[d * M:(d + 1) * M], ref_logits[d * M:]
    res = pipe.train_step(inputs, targets, clip=None)
    out = {"loss": _rel(res.losses, ref_losses), "grad": 0.0, "bitwise_grads": True, "params": 0, **out0}
    me = dist.get_rank()
    out["groups"] = (dist.get_process_group_ranks(pipe.pp_group) == pipe.ranks and me in pipe.ranks
                     and (dp == 1 or dist.get_process_group_ranks(pipe.dp_group)
                          == [me - d + i for i in range(dp)]))
    for n, p in pipe.named_parameters():
        assert (p.grad is None) == (n not in ref_grads), n
        if p.grad is not None:
            out["grad"] = max(out["grad"], _rel(p.grad, ref_grads[n]))
            out["bitwise_grads"] &= bool(torch.equal(p.grad, ref_grads[n]))
            out["params"] += 1
    ev = pipe.run(inputs, targets, train=False)

    ev_losses = torch.zeros(M)
    for mb, v in ev.losses.items():
        ev_losses[mb] += v
    dist.all_reduce(ev_losses, group=pipe.pp_group)
    out["eval_loss"] = _rel(ev_losses, ref_eval)
    out["eval_logits"] = 0.0
    for (s, mb), info in ev.info.items():
        if "logits" in info:
            out["eval_logits"] = max(out["eval_logits"], _rel(info["logits"], ref_logits[mb]))
    # the pipeline's parameter set covers the whole model exactly once over the ranks
    names = [n for n, _ in pipe.named_parameters()]
    gathered = [None] * pp
    dist.all_gather_object(gathered, names, group=pipe.pp_group)
    out["covered"] = set().union(*map(set, gathered)) == {n for n, _ in model.named_parameters()}
    out.update(_check_state(pipe, model, ref_grads, ref_state))
    return out


def _check_storage(pipe, model):
    """Only held tensors have storage, and a meta-built model materialised for this rank equals the
    single-process initialisation bit for bit."""
    from dsv3.parallel.pipeline.stages import materialize

    sd = model.state_dict()
    storage = all(v.is_meta != pipe.held(k) for k, v in sd.items())
    torch.manual_seed(0)
    with torch.device("meta"):
        lazy = Transformer(_cfg())
    materialize(lazy, pipe.held, "cpu")
    torch.manual_seed(0)
    plain = Transformer(_cfg()).state_dict()
    lazy_sd = lazy.state_dict()
    init = {k for k, v in lazy_sd.items() if not v.is_meta} == {k for k in sd if pipe.held(k)}
    init &= all(torch.equal(v, plain[k]) for k, v in lazy_sd.items() if not v.is_meta)
    return {"storage": storage, "init": init}


def _check_state(pipe, model, ref_grads, ref_state):
    """One optimizer step on the reference gradients, gathered to rank 0 (must equal the single-process
    model and optimizer state dicts exactly, same layout); then the reference state loaded into a fresh
    optimizer and this rank's zeroed share, and gathered again."""
    import torch.distributed as dist

    from dsv3.train.optim import AdamW, param_groups

    def optimizer():
        groups = param_groups(pipe.module, 0.1)
        if pipe.dp == 1:
            return AdamW(groups, lr=1e-2)
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(groups, optimizer_class=AdamW, lr=1e-2, process_group=pipe.dp_group)

    name = {id(p): n for n, p in model.named_parameters()}
    groups = [[name[id(p)] for p in g["params"]] for g in param_groups(model, 0.1)]
    for n, p in pipe.named_parameters():
        p.grad = ref_grads[n].clone() if n in ref_grads else None
    opt = optimizer()
    opt.step()
    ref_sd, ref_osd = ref_state

    def same(ms, osd, ema):
        if dist.get_rank() != 0:
            return ms == {} and osd["state"] == {}
        ok = ms.keys() == ref_sd.keys() and all(torch.equal(ms[k], ref_sd[k]) for k in ms)
        ok &= [g["params"] for g in osd["param_groups"]] == [g["params"] for g in ref_osd["param_groups"]]
        ok &= osd["state"].keys() == ref_osd["state"].keys()
        for i, st in ref_osd["state"].items():
            ok &= st.keys() == osd["state"][i].keys() and all(torch.equal(osd["state"][i][k], v) for k, v in st.items())
        return bool(ok)

    out = {"gathered": same(*pipe.gather_state(opt, groups))}
    with torch.no_grad():
        for _, p in pipe.named_parameters():
            p.zero_()
    opt = optimizer()
    pipe.load_state(ref_sd.__getitem__, opt, groups, ref_osd["param_groups"], lambda i: ref_osd["state"].get(i, {}))
    out["loaded"] = same(*pipe.gather_state(opt, groups))
    return out


def _reference_counts(inputs, targets, n, b):
    """The global expert loads of the unsplit model over ``n`` micro-batches of ``b`` rows."""
    from dsv3.train.losses import compute_loss

    model = _model()
    with torch.no_grad():
        return sum(compute_loss(model, inputs[i * b:(i + 1) * b], targets[i * b:(i + 1) * b], LAM, ALPHA)[1]["counts"]
                   for i in range(n))


def _check_expert_parallel(name, mesh, M, b=1, two_hop=False):
    """One train step of ``name`` with every stage's MoE layers expert-parallel over ``mesh``'s EP
    groups: per-micro-batch losses, every gradient (an expert's against its rows of the single-process
    gradient), the clipping norm, the global expert loads and the evaluation against the unsplit model
    over the same global batch; then the whole model and optimizer state gathered to rank 0."""
    import torch.distributed as dist

    dp = mesh.spec.dp
    inputs, targets = _batch(M * dp, b)
    ref_losses, ref_grads, _, _, ref_state, ref_few = _on_rank0(_reference, inputs, targets, M * dp)
    ref_counts = _on_rank0(_reference_counts, inputs, targets, M * dp, b)
    ref_norm = float(torch.nn.utils.get_total_norm(list(ref_grads.values())))
    model = _model()
    pipe = _pipe(model, name, mesh.spec.pp, M, b, mesh=mesh, expert_options=dict(two_hop=two_hop))
    ce, n, counts = pipe.evaluate(inputs[:3], targets[:3])
    out = {"eval_few": abs(ce - ref_few[0]) / ref_few[0] if n == ref_few[1] and torch.equal(counts, ref_few[2])
           else 1.0}
    d = pipe.dp_rank
    mine = slice(d * M * b, (d + 1) * M * b)
    res = pipe.train_step(inputs[mine], targets[mine], clip=1e9)
    out["loss"] = _rel(res.losses, ref_losses[d * M:(d + 1) * M])
    out["norm"] = abs(res.grad_norm - ref_norm) / ref_norm
    out["counts"] = bool(torch.equal(res.counts, ref_counts))
    out["grad"], out["experts"], out["params"] = 0.0, 0, 0
    for n, p in pipe.named_parameters():
        ref = ref_grads[n]
        if n in pipe.experts:
            ref = pipe.local_view(n, ref)
            out["experts"] += 1
        err = float((p.grad.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
        if err > out["grad"]:                  # relative to the tensor's norm (sums run in another order)
            out["grad"], out["worst"] = err, n
        out["params"] += 1
    names = [n for n, _ in pipe.named_parameters()]
    gathered = [None] * mesh.spec.pp
    dist.all_gather_object(gathered, names, group=pipe.pp_group)
    out["covered"] = set().union(*map(set, gathered)) == {n for n, _ in model.named_parameters()}
    # the state gathered to rank 0 is the whole single-process model (experts gathered over EP)
    ms, _, _ = pipe.gather_state()
    if dist.get_rank() == 0:
        full = _model().state_dict()
        out["gathered"] = ms.keys() == full.keys() and all(torch.equal(ms[k], full[k]) for k in full)
    else:
        out["gathered"] = ms == {}
    return out


def _worker_expert_parallel(rank, world, store, pp, ep, gpus_per_node, cases, q):
    try:
        _init(rank, world, store)
        from dsv3.parallel.mesh import MeshSpec, build_mesh

        mesh = build_mesh(MeshSpec(world, gpus_per_node, pp, ep), rank)
        results = {f"{name} pp={pp} ep={ep} dp={world // pp} M={M} two_hop={th}":
                   _check_expert_parallel(name, mesh, M, two_hop=th) for name, M, th in cases}
        q.put((rank, "ok", results))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def _worker_schedules(rank, world, store, cases, q):
    try:
        _init(rank, world, store)
        results = {f"{name} pp={world // dp} dp={dp} M={M}": _check_schedule(name, world // dp, M, dp=dp)
                   for name, M, dp in cases}
        q.put((rank, "ok", results))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def _worker_fail(rank, world, store, mode, q):
    try:
        _init(rank, world, store, timeout=30)
        from dsv3.parallel.pipeline.runtime import PipelineError

        inputs, targets = _batch(4)
        pipe = _pipe(_model(), "dualpipev", world, 4, 2, timeout=20 if mode == "kill" else 3)
        pipe.train_step(inputs, targets, clip=None)  # one good step first
        if rank == 1 and mode == "stall":
            time.sleep(6)  # alive but silent: the peer's wait must time out
            q.put((rank, "slept", None))
            return
        if rank == 1:
            calls = [0]
            stage = pipe.stages[min(pipe.stages)]
            compute = stage.compute

            def dying(*a, **k):
                calls[0] += 1
                if calls[0] == 3:
                    os._exit(17)  # dies mid-step, between two communications
                return compute(*a, **k)

            stage.compute = dying
        t0 = time.time()
        try:
            pipe.train_step(inputs, targets, clip=None)
        except PipelineError as e:
            q.put((rank, "raised", (str(e), time.time() - t0)))
            return
        q.put((rank, "no error", time.time() - t0))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def _spawn(target, world, tmp_path, *args, timeout=150):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = str(tmp_path / f"store-{target.__name__}-{world}")
    procs = [ctx.Process(target=target, args=(r, world, store, *args, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out, deadline = {}, time.time() + timeout
    try:
        while len(out) < world and time.time() < deadline:
            try:
                rank, status, payload = q.get(timeout=1.0)
                out[rank] = (status, payload)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and q.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return out, [p.exitcode for p in procs]


# ------------------------------------------------------------------------------------------------
# tests


def test_split_rule_and_placement():
    assert [list(r) for r in split_layers(5, 3)] == [[0, 1], [2, 3], [4]]
    assert [len(r) for r in split_layers(4, 8)] == [0, 0, 1, 1, 1, 1, 0, 0]
    assert [len(r) for r in split_layers(61, 16, 1)] == [3] + [4] * 14 + [2]     # MTP counted on the last chunk
    assert [len(r) for r in split_layers(2, 4, 3)] == [1, 1, 0, 0]              # the last chunk: MTP only
    from dsv3.parallel.pipeline.stages import holders

    m = _model()
    h = holders(m, build_schedule("1f1b", 4, 4))
    assert h["embed_tokens.weight"] == (0, 3) and h["lm_head.weight"] == (3,) and h["norm.weight"] == (3,)
    assert set(holders(m, build_schedule("dualpipev", 2, 3)).values()) <= {(0,), (1,)}
    dp = holders(m, build_schedule("dualpipe", 4, 6))
    assert dp["embed_tokens.weight"] == (0, 3) and dp["layers.1.self_attn.kv_a_layernorm.weight"] == (1, 2)


def _assert_matches(out, exits, world):
    assert set(out) == set(range(world)), f"missing ranks; exit codes {exits}: {out}"
    for rank, (status, payload) in out.items():
        assert status == "ok", f"rank {rank}:\n{payload}"
        for name, r in payload.items():
            assert r["covered"] and r["groups"], name
            assert r["storage"] and r["init"] and r["eval_few"] < 1e-6, (rank, name, r)
            assert r["gathered"] and r["loaded"], (rank, name, r)
            assert r["loss"] < 1e-6 and r["grad"] < 1e-6, (rank, name, r)
            assert r["eval_loss"] < 1e-6 and r["eval_logits"] < 1e-6, (rank, name, r)


def test_every_schedule_matches_single_process_pp2(tmp_path):
    cases = [("1f1b", 4, 1), ("zb1p", 4, 1), ("dualpipe", 4, 1), ("dualpipev", 4, 1)]
    out, exits = _spawn(_worker_schedules, 2, tmp_path, cases)
    _assert_matches(out, exits, 2)


@pytest.mark.slow   # run with -m slow (the default suite keeps one representative of each kind)
def test_every_schedule_matches_single_process_pp4_and_dp2(tmp_path):
    cases = [("1f1b", 4, 1), ("zb1p", 5, 1), ("dualpipe", 6, 1), ("dualpipev", 7, 1), ("dualpipe", 2, 2),
             ("zb1p", 3, 2)]
    out, exits = _spawn(_worker_schedules, 4, tmp_path, cases)
    _assert_matches(out, exits, 4)


def _assert_expert_parallel(out, exits, world):
    assert set(out) == set(range(world)), f"missing ranks; exit codes {exits}: {out}"
    for rank, (status, payload) in out.items():
        assert status == "ok", f"rank {rank}:\n{payload}"
        for name, r in payload.items():
            assert r["covered"] and r["gathered"] and r["counts"] and r["experts"] > 0, (rank, name, r)
            # the two-hop dispatch adds expert outputs per node first: fp32 sums in another order
            tol = 5e-6 if "two_hop=True" in name else 1e-6
            assert r["loss"] < tol and r["grad"] < tol and r["norm"] < tol and r["eval_few"] < tol, (rank, name, r)


@pytest.mark.parametrize("cases", [
    [("dualpipev", 3, False)],
    pytest.param([("1f1b", 2, False), ("zb1p", 3, False), ("dualpipe", 4, False)], marks=pytest.mark.slow),
], ids=["dualpipev", "1f1b-zb1p-dualpipe"])
def test_every_schedule_pp2_ep2_dp2_matches_single_process(tmp_path, cases):
    # 8 ranks: 2 pipeline stages × 4 data-parallel ranks each, experts sharded over EP groups of 2
    out, exits = _spawn(_worker_expert_parallel, 8, tmp_path, 2, 2, 8, cases, timeout=240)
    _assert_expert_parallel(out, exits, 8)


@pytest.mark.slow   # run with -m slow (the default suite keeps one representative of each kind)
def test_pp2_ep2_two_hop_over_simulated_nodes_matches_single_process(tmp_path):
    # 4 ranks, one per simulated node: each EP group spans two nodes, dispatched in two hops
    cases = [("dualpipev", 3, True), ("zb1p", 2, True)]
    out, exits = _spawn(_worker_expert_parallel, 4, tmp_path, 2, 2, 1, cases, timeout=180)
    _assert_expert_parallel(out, exits, 4)


@pytest.mark.parametrize("mode", ["kill", pytest.param("stall", marks=pytest.mark.slow)])
def test_dead_or_stalled_rank_makes_the_other_raise(tmp_path, mode):
    t0 = time.time()
    out, exits = _spawn(_worker_fail, 2, tmp_path, mode, timeout=90)
    if mode == "kill":
        assert exits[1] == 17
    status, payload = out.get(0, ("missing", exits))
    assert status == "raised", payload
    msg, waited = payload
    assert "pipeline rank 0" in msg and "died or stalled" in msg and "dualpipev" in msg, msg
    assert waited < (25 if mode == "kill" else 8), waited
    assert time.time() - t0 < 90


# ------------------------------------------------------------------------------------------------
# dsv3 train --pp 2 --schedule dualpipev under torchrun


def _metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


_PP = ["--pp", "2", "--schedule", "dualpipev", "--microbatches", "4"]


def _torchrun(args, out, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsv3.cli",
            *args, "--out", str(out), *_PP, *extra]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """One single-process and one uninterrupted ``--pp 2 --schedule dualpipev`` run of ``dsv3 train``
    (4 steps, a checkpoint after every step), run side by side; returns (args, single dir, pp dir)."""
    from dsv3.data import prepare

    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "tokens"
    prepare("builtin", str(data), vocab_size=512, max_bytes=60_000, progress=False, val_fraction=0.1)
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps(_cfg(vocab_size=512, hidden_size=64, max_position_embeddings=64).to_hf()))
    args = ["train", "--config", str(cfg), "--data", str(data), "--steps", "4", "--batch-size", "4",
            "--seq-len", "32", "--warmup", "1", "--save-every", "1", "--eval-every", "2", "--eval-batches", "1",
            "--no-progress", "--no-plots", "--sample-prompt", "", "--balance-alpha", "1e-3"]
    one, two = tmp / "one", tmp / "two"
    ref = subprocess.Popen([sys.executable, "-m", "dsv3.cli", *args, "--out", str(one)], env=cli_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pp = subprocess.run(_torchrun(args, two), env=cli_env(), capture_output=True, text=True, timeout=240)
    _, err = ref.communicate(timeout=240)
    assert ref.returncode == 0, err[-3000:]
    assert pp.returncode == 0, pp.stderr[-3000:]
    return args, one, two


def test_train_cli_pp2_dualpipev_follows_the_single_process_curve(cli_runs):
    _, one, two = cli_runs
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "mtp", "balance", "grad_norm", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key, ra[key], rb[key])
        if "expert_load" in ra:
            assert rb["expert_load"] == ra["expert_load"]
    assert (two / "final" / "model.safetensors").exists() or any((two / "final").iterdir())
    # the checkpoint (sharded: each pipeline rank wrote its stages) reads back as the whole model and the
    # optimizer state, laid out as the single-process one's
    from dsv3.checkpoint import CheckpointReader

    fa, fb = (CheckpointReader(str(r / "checkpoints" / "step-000000004")) for r in (one, two))
    for kind in ("model", "optim"):
        assert set(fa.keys(kind)) == set(fb.keys(kind)) and len(fa.keys(kind)) > 10, kind
        for k in fa.keys(kind):
            assert torch.allclose(fb.get(kind, k), fa.get(kind, k), rtol=1e-3, atol=1e-5), (kind, k)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(d))
    return out


@pytest.mark.slow   # run with -m slow (the default suite keeps one representative of each kind)
def test_train_cli_pp2_resume_after_sigkill_repeats_the_uninterrupted_run(cli_runs, tmp_path):
    args, _, uninterrupted = cli_runs
    run = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(args, run), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:   # kill both ranks once step 2 is logged
        if metrics.exists() and any('"step": 2,' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    for pid in _children(proc.pid):     # torchrun's workers run in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert list_checkpoints(str(run / "checkpoints")), "the killed run should have left a checkpoint"
    done = subprocess.run(_torchrun(args, run, ["--resume"]), env=cli_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", done.stdout)
    assert resumed and 1 <= int(resumed.group(1)) < 4, done.stdout[-2000:]   # killed mid-way
    a, b = _metrics(uninterrupted), _metrics(run)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):            # exactly equal: CPU fp32, the same arithmetic after the resume
        for key in ("loss", "mtp", "balance", "grad_norm", "val_loss", "expert_load"):
            assert rb.get(key) == ra.get(key), (ra["step"], key, ra.get(key), rb.get(key))
