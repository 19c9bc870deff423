"""Training with expert parallelism (``dsv3 train --ep``): the same losses, gradient norms, exported
weights and checkpoint (model + optimizer moments) as the one-process run with the same global batch —
for EP 2 on 2 ranks, EP 2 × 2 data-parallel groups on 4 ranks (expert gradients averaged over the
expert-data group), and EP 4 over 2 simulated nodes with the two-hop dispatch; FP8 dispatch stays close;
a one-process checkpoint resumes under --ep; impossible flag combinations are one clear error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dsv3 import ModelConfig
from dsv3.checkpoint import load_latest
from dsv3.cli import main as cli
from helpers import cli_env, free_port

ARGS = ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--save-every", "2", "--eval-every", "3",
        "--eval-batches", "2", "--no-progress", "--no-plots", "--sample-prompt", "", "--warmup", "2"]


def _train(out, data, nproc=1, extra=()):
    cmd = [sys.executable, "-m", "dsv3.cli", "train", "--out", str(out), "--data", data, *ARGS, *extra]
    if nproc > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
                    "-m", "dsv3.cli"]
    res = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _metrics(run) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if "loss" in r}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    one = tmp_path_factory.mktemp("one")
    _train(one, data_dir)
    return one


def _check_same_run(run, ref, tol=1e-5):
    a, b = _metrics(run), _metrics(ref)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in b:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=tol), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=tol), step   # experts counted once
        assert a[step]["expert_load"] == b[step]["expert_load"], step                          # global loads
    # the exported model and the checkpoint hold the full model (experts gathered) and the optimizer
    # state in the one-process layout; Adam amplifies float rounding a little (plain ZeRO-1 DP: ~1e-5;
    # the embedding most, ~1e-4 after 3 steps: Adam divides each element's gradient by its own RMS, so
    # the rounding of the tiny gradient of a token seen once becomes a sizeable part of its step)
    ea, eb = load_file(os.path.join(run, "final", "model.safetensors")), \
        load_file(os.path.join(ref, "final", "model.safetensors"))
    assert ea.keys() == eb.keys()
    assert max(_rel(ea[k], eb[k]) for k in eb if "embed_tokens" not in k) < 1e-4
    assert max(_rel(ea[k], eb[k]) for k in eb if "embed_tokens" in k) < 3e-4
    (_, ma, ca), (_, mb, cb) = (load_latest(os.path.join(r, "checkpoints")) for r in (run, ref))
    assert ma["step"] == mb["step"] == 3
    for f in ("model.safetensors", "optim.safetensors"):
        assert ca[f].keys() == cb[f].keys(), f
        for k in cb[f]:
            assert ca[f][k].shape == cb[f][k].shape, k
            assert _rel(ca[f][k], cb[f][k]) < (3e-4 if "embed_tokens" in k else 1e-4), (f, k)


@pytest.mark.slow   # run with -m slow (the default suite keeps one representative of each kind)
def test_ep2_on_two_ranks_matches_one_process(tmp_path, data_dir, reference):
    _train(tmp_path / "ep2", data_dir, 2, ["--ep", "2"])
    _check_same_run(tmp_path / "ep2", reference)


def test_ep2_with_learnt_dispatch_capacities_matches_one_process(tmp_path, data_dir, reference):
    # after each layer's first dispatch no counts are exchanged: padded blocks through experts and backward
    _train(tmp_path / "ep2cap", data_dir, 2, ["--ep", "2", "--dispatch-capacity"])
    _check_same_run(tmp_path / "ep2cap", reference)


@pytest.mark.slow   # run with -m slow (the default suite keeps one representative of each kind)
def test_ep2_times_two_data_parallel_groups_matches_one_process(tmp_path, data_dir, reference):
    # 4 ranks = 2 EP groups of 2: expert gradients summed over the expert-data group, / world
    _train(tmp_path / "ep2x2", data_dir, 4, ["--ep", "2"])
    _check_same_run(tmp_path / "ep2x2", reference)


@pytest.mark.slow   # run with -m slow (the default suite keeps one representative of each kind)
def test_ep4_two_simulated_nodes_two_hop_matches_one_process(tmp_path, data_dir, reference):
    _train(tmp_path / "ep4", data_dir, 4, ["--ep", "4", "--gpus-per-node", "2", "--two-hop"])
    _check_same_run(tmp_path / "ep4", reference)


@pytest.mark.slow   # run with -m slow (the default suite keeps one representative of each kind)
def test_fp8_dispatch_stays_close(tmp_path, data_dir, reference):
    _train(tmp_path / "fp8", data_dir, 2, ["--ep", "2", "--fp8-dispatch"])
    a, b = _metrics(tmp_path / "fp8"), _metrics(reference)
    for step in b:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=2e-3), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=5e-2), step


def test_one_process_checkpoint_resumes_under_ep(tmp_path, data_dir, reference):
    """Checkpoints hold the single-process layout: step 2 of the one-process run, resumed with --ep 2,
    continues exactly like the one-process run (each rank slices its experts and their moments)."""
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step-000000002", run / "checkpoints" / "step-000000002")
    shutil.copy(reference / "metrics.jsonl", run / "metrics.jsonl")
    res = _train(run, data_dir, 2, ["--ep", "2", "--resume"])
    assert "resumed from" in res.stdout
    a, b = _metrics(run), _metrics(reference)
    assert sorted(a) == [1, 2, 3]
    assert a[3]["loss"] == pytest.approx(b[3]["loss"], rel=1e-5)
    assert a[3]["grad_norm"] == pytest.approx(b[3]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--ep", "2"], "--ep 2 must divide the data-parallel ranks of a stage (1 = 1 processes / --pp 1)"),
    (["--ep", "2", "--pp", "2"], "--pp 2 must divide the number of processes (1)"),
    (["--two-hop"], "need --ep > 1"),
    (["--dispatch-capacity"], "need --ep > 1"),
    (["--ep", "3"], "must divide the model's routed experts"),
])
def test_bad_ep_flags_are_one_clear_line(tmp_path, capsys, data_dir, args, message):
    code = cli(["train", "--out", str(tmp_path / "run"), "--data", data_dir, *ARGS, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("world, args, message", [
    # named by the mesh's field (MeshSpec.gpus_per_node = 3), after the data was prepared
    ("4", ["--ep", "2", "--gpus-per-node", "3"], "--gpus-per-node 3 must divide the number of processes (4)"),
    ("6", ["--ep", "2", "--gpus-per-node", "3"], "--ep 2 must be a multiple or a divisor of --gpus-per-node 3"),
    # ran as the flat dispatch without a word
    ("2", ["--ep", "2", "--two-hop"], "--two-hop needs an expert group over more than one node"),
    ("4", ["--ep", "4", "--gpus-per-node", "2", "--two-hop", "--dispatch-capacity"],
     "--dispatch-capacity applies to the flat dispatch"),
    # with 1f1b / zb1p (no forward & backward pairs) it did nothing
    ("4", ["--ep", "2", "--pp", "2", "--overlap"], "--overlap with --pp needs --schedule dualpipe or dualpipev"),
    ("4", ["--ep", "2", "--pp", "2", "--schedule", "zb1p", "--overlap"], "--schedule zb1p has none"),
    # the pipeline's sizes: were the schedule's own words ("num_microbatches >= 3"), after the data was prepared
    ("4", ["--pp", "2", "--schedule", "dualpipev", "--microbatches", "2"], "--microbatches 2: dualpipev with 2 ranks"),
    ("3", ["--pp", "3", "--schedule", "dualpipe"], "--schedule dualpipe needs an even --pp"),
    ("4", ["--pp", "2", "--microbatches", "4"], "--microbatches 4 must divide the per-replica batch (2 sequences"),
    ("4", ["--pp", "4", "--schedule", "dualpipev"], "raise --batch-size"),
])
def test_layouts_the_launch_cannot_take_are_one_line_before_anything_starts(tmp_path, capsys, monkeypatch, data_dir,
                                                                             world, args, message):
    monkeypatch.setenv("WORLD_SIZE", world)     # as torchrun --nproc-per-node N on one node sets it
    monkeypatch.setenv("LOCAL_WORLD_SIZE", world)
    code = cli(["train", "--out", str(tmp_path / "run"), "--data", data_dir, *ARGS, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_convert_and_gather_round_trip_in_one_process():
    """With a one-rank EP group the converted model is the model, and the full state dict round-trips."""
    from dsv3.model import Transformer
    from dsv3.parallel.ep_model import convert_to_expert_parallel, full_state_dict, load_full_state_dict
    from dsv3.parallel.expert import ExpertParallelMoE
    from dsv3.parallel.mesh import EPComm

    cfg = dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    ref = model.forward_train(tokens)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    layers = convert_to_expert_parallel(model, EPComm.single())
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(layers) == 2 and [m for m in model.moe_layers()] == layers      # main block + MTP block
    assert all(isinstance(m, ExpertParallelMoE) for m in model.moe_layers())
    out = model.forward_train(tokens)
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    assert torch.allclose(out.mtp_logits[0], ref.mtp_logits[0], atol=1e-6)
    assert all(torch.equal(a.counts, b.counts) for a, b in zip(out.routing, ref.routing))
    full = full_state_dict(model)
    assert full.keys() == sd.keys() and all(torch.equal(full[k], sd[k]) for k in sd)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_full_state_dict(model, sd)
    assert all(torch.equal(v, sd[k]) for k, v in full_state_dict(model).items())
