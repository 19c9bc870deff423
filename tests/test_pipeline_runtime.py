"""The pipeline runtime (SPEC §2.1): every schedule on gloo ranks against a single-process run.

Each check spawns its ranks once and runs several schedules inside them: the per-micro-batch losses and
every parameter gradient must match the unsplit model run micro-batch by micro-batch (fp32, < 1e-6
relative), a no-grad pass must return the same losses and logits, a killed rank must make its peer
raise a clear error quickly, and ``dsv3 train --pp 2 --schedule dualpipev`` under torchrun must follow
the single-process loss curve.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import queue
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from dsv3 import ModelConfig, Transformer
from dsv3.parallel.pipeline import build_schedule
from dsv3.parallel.pipeline.stages import split_layers

LAM, ALPHA = 0.3, 1e-2


def _cfg(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, first_k_dense_replace=1,
                intermediate_size=48, num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, moe_intermediate_size=16,
                n_group=4, topk_group=2, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                initializer_range=0.1)
    base.update(kw)
    return ModelConfig.preset("tiny").replace(**base)


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


def _pipe(model, name, pp, M, b, timeout=60):
    from dsv3.parallel.pipeline.stages import PipelineParallel
    from dsv3.train.trainer import routing_balance_loss, token_loss

    return PipelineParallel(model, name, pp, M, local_batch=M * b, timeout=timeout,
                            loss_fn=functools.partial(token_loss, mtp_lambda=LAM),
                            balance_fn=functools.partial(routing_balance_loss, balance_alpha=ALPHA))


def _reference(inputs, targets, M):
    """Unsplit model, micro-batch by micro-batch: (losses [M], grads by name, eval logits per mb)."""
    from dsv3.train.trainer import compute_loss

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
    return torch.stack(losses), grads, torch.stack(eval_losses), logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _check_schedule(name, pp, M, b=2, dp=1):
    """Run one train step and one eval pass of ``name`` (× ``dp`` data-parallel replicas, each with M
    micro-batches of the global batch); return a dict of the worst differences."""
    import torch.distributed as dist

    inputs, targets = _batch(M * dp, b)
    ref_losses, ref_grads, ref_eval, ref_logits = _reference(inputs, targets, M * dp)
    model = _model()
    pipe = _pipe(model, name, pp, M, b)
    assert pipe.dp == dp
    d = pipe.dp_rank
    mine = slice(d * M * b, (d + 1) * M * b)
    inputs, targets = inputs[mine], targets[mine]
    ref_losses, ref_eval, ref_logits = ref_losses[d * M:(d + 1) * M], ref_eval[d * M:(d + 1) * M], ref_logits[d * M:]
    res = pipe.train_step(inputs, targets, clip=None)
    out = {"loss": _rel(res.losses, ref_losses), "grad": 0.0, "bitwise_grads": True, "params": 0}
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
    return out


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
    assert [len(r) for r in split_layers(4, 8)] == [1, 1, 1, 1, 0, 0, 0, 0]
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
            assert r["loss"] < 1e-6 and r["grad"] < 1e-6, (rank, name, r)
            assert r["eval_loss"] < 1e-6 and r["eval_logits"] < 1e-6, (rank, name, r)


def test_every_schedule_matches_single_process_pp2(tmp_path):
    cases = [("1f1b", 4, 1), ("zb1p", 4, 1), ("dualpipe", 4, 1), ("dualpipev", 4, 1)]
    out, exits = _spawn(_worker_schedules, 2, tmp_path, cases)
    _assert_matches(out, exits, 2)


def test_every_schedule_matches_single_process_pp4_and_dp2(tmp_path):
    cases = [("1f1b", 4, 1), ("zb1p", 5, 1), ("dualpipe", 6, 1), ("dualpipev", 7, 1), ("dualpipe", 2, 2),
             ("zb1p", 3, 2)]
    out, exits = _spawn(_worker_schedules, 4, tmp_path, cases)
    _assert_matches(out, exits, 4)


@pytest.mark.parametrize("mode", ["kill", "stall"])
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


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_train_cli_pp2_dualpipev_follows_the_single_process_curve(tmp_path):
    from dsv3.data import prepare

    data = tmp_path / "tokens"
    prepare("builtin", str(data), vocab_size=512, max_bytes=60_000, progress=False, val_fraction=0.1)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(_cfg(vocab_size=512, hidden_size=64, max_position_embeddings=64).to_hf()))
    args = ["train", "--config", str(cfg), "--data", str(data), "--steps", "3", "--batch-size", "4",
            "--seq-len", "32", "--warmup", "1", "--save-every", "0", "--eval-every", "3", "--eval-batches", "1",
            "--no-progress", "--no-plots", "--sample-prompt", "", "--balance-alpha", "1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    ref = subprocess.Popen([sys.executable, "-m", "dsv3.cli", *args, "--out", str(one)], env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "dsv3.cli", *args, "--out", str(two), "--pp", "2", "--schedule", "dualpipev",
                         "--microbatches", "4"], env=_env(), capture_output=True, text=True, timeout=240)
    _, err = ref.communicate(timeout=240)
    assert ref.returncode == 0, err[-3000:]
    assert pp.returncode == 0, pp.stderr[-3000:]
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "mtp", "balance", "grad_norm", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra["step"], key, ra[key], rb[key])
        if "expert_load" in ra:
            assert rb["expert_load"] == ra["expert_load"]
    assert (two / "final" / "model.safetensors").exists() or any((two / "final").iterdir())
