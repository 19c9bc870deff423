"""The training job: resume after SIGKILL, corrupted checkpoints, ZeRO-1 data parallel, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from dsv3.checkpoint import list_checkpoints, load_latest, save_checkpoint
from dsv3.cli import main as cli
from helpers import cli_env

SMALL = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--save-every", "2", "--eval-every", "3",
         "--eval-batches", "2", "--no-progress", "--no-plots", "--sample-prompt", "", "--warmup", "2"]


def _train_cmd(out, data, extra=()):
    return [sys.executable, "-m", "dsv3.cli", "train", "--out", str(out), "--data", data, *SMALL, *extra]


def _losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_after_sigkill_repeats_the_uninterrupted_run(tmp_path, data_dir):
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref, data_dir), check=True, env=cli_env(), capture_output=True)
    expected = _losses(ref)
    assert sorted(expected) == list(range(1, 7))

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(run, data_dir), env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:   # kill once step 3 is logged: mid-way
        if metrics.exists() and any('"step": 3,' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(run / "checkpoints"), "the killed run should have left a checkpoint"
    done = subprocess.run(_train_cmd(run, data_dir, ["--resume"]), env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    assert _losses(run) == expected    # exactly equal, CPU fp32


def test_corrupted_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    root = tmp_path / "ck"
    for step in (1, 2):
        save_checkpoint(str(root), step, {"w": torch.full((4,), float(step))}, {}, {}, {"data_step": step})
    newest = root / "step-000000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])                   # truncate it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, meta, tensors = load_latest(str(root))
    assert meta["step"] == 1 and tensors["model.safetensors"]["w"][0] == 1
    assert any("step-000000002" in str(w.message) and "checksum" in str(w.message) for w in caught)


def test_pruning_does_not_count_a_broken_later_checkpoint(tmp_path):
    """A resume skipped a broken step-4 to step 2; with --keep 1 the step-3 save then pruned to the newest
    name, the broken step 4, deleting the checkpoint it had just written (and step 2)."""
    root = tmp_path / "ck"
    for step in (2, 4):
        save_checkpoint(str(root), step, {"w": torch.full((4,), float(step))}, {}, {}, {"data_step": step}, keep=3)
    broken = root / "step-000000004" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:-7])
    path = save_checkpoint(str(root), 3, {"w": torch.full((4,), 3.0)}, {}, {}, {"data_step": 3}, keep=1)
    assert os.path.isdir(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_latest(str(root))[1]["step"] == 3
    assert list_checkpoints(str(root)) == ["step-000000003", "step-000000004"]
    save_checkpoint(str(root), 4, {"w": torch.full((4,), 4.0)}, {}, {}, {"data_step": 4}, keep=1)   # replaced
    assert list_checkpoints(str(root)) == ["step-000000004"] and load_latest(str(root))[1]["step"] == 4


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    save_checkpoint(str(root), 1, {"w": torch.ones(3)}, {}, {}, {})

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        save_checkpoint(str(root), 2, {"w": torch.zeros(3)}, {}, {}, {})
    monkeypatch.undo()
    assert list_checkpoints(str(root)) == ["step-000000001"]       # the half-written one is invisible
    assert load_latest(str(root))[1]["step"] == 1
    for step in range(2, 6):
        save_checkpoint(str(root), step, {"w": torch.ones(3)}, {}, {}, {}, keep=3)
    assert list_checkpoints(str(root)) == ["step-000000003", "step-000000004", "step-000000005"]


@pytest.mark.slow   # run with -m slow (the default suite keeps one representative of each kind)
def test_two_rank_zero1_matches_one_rank(tmp_path, data_dir):
    one = tmp_path / "one"
    subprocess.run(_train_cmd(one, data_dir, ["--save-every", "0"]), check=True, env=cli_env(), capture_output=True)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "dsv3.cli", "train", "--out", str(two), "--data", data_dir, *SMALL, "--save-every", "0"]
    res = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b)
    # the first steps agree to ~1e-7; later ones drift a little: Adam's first updates are about
    # lr * sign(g) per element, so an element whose gradient is at rounding level moves a full step
    # either way (measured: 1.3e-5 at step 4 of 6, where the gradient norm doubles)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6 if step <= 2 else 5e-5), step


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--preset", "huge"], "unknown preset"),
    (["--seq-len", "5000"], "max_position_embeddings"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    code = cli(["train", "--out", str(tmp_path / "run"), *SMALL, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_empty_corpus_and_unwritable_out(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    assert cli(["train", "--out", str(tmp_path / "r"), "--data", str(empty), *SMALL]) == 2
    assert "empty corpus" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli(["train", "--out", str(blocker / "run"), *SMALL]) == 2
    assert "run directory" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(tmp_path, capsys, data_dir):
    run = tmp_path / "run"
    save_checkpoint(str(run / "checkpoints"), 2, {"w": torch.ones(1)}, {}, {}, {})
    assert cli(["train", "--out", str(run), "--data", data_dir, *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err
    assert list_checkpoints(str(run / "checkpoints")) == ["step-000000002"]


# ------------------------------------------------------------------------------ run directory safety (issue 14)
def _steps_logged(run_dir) -> list[int]:
    """Every step a training line (with a loss) was logged for, in file order, repeats included."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def _tree(path) -> dict:
    """{relative file: bytes} of a directory (to show it was left alone)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


QUICK = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--eval-batches", "1",
         "--no-progress", "--no-plots", "--sample-prompt", "", "--warmup", "1"]


def test_save_every_0_saves_at_the_end_and_a_rerun_never_replaces_final(tmp_path, capsys, data_dir):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK, "--save-every", "0"]) == 0
    assert list_checkpoints(run / "checkpoints") == ["step-000000003"]          # "0: only at the end"
    before, metrics = _tree(run / "final"), (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    # the same command again: refused, nothing touched
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK, "--save-every", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert _tree(run / "final") == before and (run / "metrics.jsonl").read_bytes() == metrics
    # --resume of the finished run: no step logged again, final/ kept as it is
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK, "--resume"]) == 0
    assert _steps_logged(run) == [1, 2, 3] and _tree(run / "final") == before
    # training further would replace final/: only with --overwrite (and --allow-changed steps)
    more = [*QUICK[:1], "4", *QUICK[2:]]
    assert cli(["train", "--out", str(run), "--data", data_dir, *more, "--resume"]) == 2
    assert "final/" in capsys.readouterr().err
    assert cli(["train", "--out", str(run), "--data", data_dir, *more, "--resume", "--overwrite"]) == 2
    assert "--allow-changed steps" in capsys.readouterr().err and _tree(run / "final") == before
    assert cli(["train", "--out", str(run), "--data", data_dir, *more, "--resume", "--allow-changed", "steps",
                "--overwrite"]) == 0
    assert _steps_logged(run) == [1, 2, 3, 4] and _tree(run / "final") != before
    # --overwrite without --resume starts over: each step once
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK, "--overwrite"]) == 0
    assert _steps_logged(run) == [1, 2, 3]


@pytest.mark.parametrize("flag, value, setting", [("--batch-size", "4", "batch-size"), ("--seq-len", "8", "seq-len"),
                                                  ("--seed", "1", "seed"), ("--lr", "0.01", "lr"),
                                                  ("--adam-betas", "0.9,0.999", "adam-betas"),
                                                  ("--lr-schedule", "constant", "lr-schedule"),
                                                  ("--min-lr-ratio", "0", "min-lr-ratio"),
                                                  # these change each step's arithmetic too (were not compared)
                                                  ("--ema", "0.9", "ema"), ("--precision", "bf16", "precision"),
                                                  ("--bf16-moments", None, "bf16-moments"),
                                                  ("--mtp-lambda", "0.1", "mtp-lambda")])
def test_resume_with_other_settings_is_refused_unless_allowed(tmp_path, capsys, data_dir, flag, value, setting):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", data_dir, *QUICK, "--save-every", "1"]
    assert cli(args) == 0
    shutil.rmtree(run / "final")     # as if killed before the export: --resume may run again
    capsys.readouterr()
    changed = [*args, flag, *([value] if value is not None else []), "--resume"]
    assert cli(changed) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and f"--allow-changed {setting}" in err and len(err.splitlines()) == 1
    assert cli([*changed, "--allow-changed", setting]) == 0


def test_resume_without_the_ema_keeps_it_refused_and_an_allowed_new_ema_starts_from_the_resumed_weights(
        tmp_path, capsys, data_dir):
    """--ema was not compared: resuming without it dropped the EMA the run had kept (from the next checkpoint
    on); resuming a run without one with --ema averaged in the random initial weights."""
    from dsv3.checkpoint import CheckpointReader

    run = tmp_path / "run"
    two = ["train", "--out", str(run), "--data", data_dir, *QUICK[:1], "2", *QUICK[2:], "--save-every", "1"]
    assert cli(two) == 0
    shutil.rmtree(run / "final")
    capsys.readouterr()
    more = ["train", "--out", str(run), "--data", data_dir, *QUICK, "--save-every", "1", "--resume",
            "--allow-changed", "steps"]
    assert cli([*more, "--ema", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ema (0.0 -> 0.5)" in err and "--allow-changed ema" in err and len(err.splitlines()) == 1
    assert cli([*more, "--ema", "0.5", "--allow-changed", "ema"]) == 0
    w2 = CheckpointReader(str(run / "checkpoints" / "step-000000002")).tensors("model")
    three = CheckpointReader(str(run / "checkpoints" / "step-000000003"))
    w3, ema = three.tensors("model"), three.tensors("extra")
    for k, v in w3.items():
        if v.is_floating_point():
            assert torch.allclose(ema[f"ema.{k}"], 0.5 * w2[k].float() + 0.5 * v.float(), atol=1e-6), k


def test_resume_of_a_from_run_without_from_is_one_line(tmp_path, capsys, data_dir, model_dir):
    """run.json records --from; a --resume without it compared a missing key (an internal KeyError)."""
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK, "--from", model_dir]) == 0
    shutil.rmtree(run / "final")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(json.load(open(run / "run.json"))["config"]))
    capsys.readouterr()
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK, "--config", str(config), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--from (" in err and "-> none)" in err and "--allow-changed from" in err and len(err.splitlines()) == 1


def test_a_run_from_a_model_exports_that_models_generation_defaults(tmp_path, data_dir, model_dir):
    src = tmp_path / "src"
    shutil.copytree(model_dir, src)
    gen = json.load(open(src / "generation_config.json"))
    gen.update(temperature=0.6, top_p=0.95)
    (src / "generation_config.json").write_text(json.dumps(gen))
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK, "--from", str(src)]) == 0
    out = json.load(open(run / "final" / "generation_config.json"))
    assert out["temperature"] == 0.6 and out["top_p"] == 0.95
    assert out["eos_token_id"] == gen["eos_token_id"]


def test_resume_with_another_model_config_is_refused(tmp_path, capsys, data_dir):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK]) == 0
    shutil.rmtree(run / "final")
    cfg = json.load(open(run / "checkpoints" / "step-000000003" / "meta.json"))["model_config"]
    cfg["hidden_size"] = 64
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK, "--config", str(tmp_path / "other.json"),
                "--resume"]) == 2
    err = capsys.readouterr().err
    assert "hidden_size" in err and "--allow-changed config" in err and "Traceback" not in err


@pytest.mark.slow   # run with -m slow (the default suite keeps one representative of each kind)
def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path, data_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dsv3.cli", "train", "--out", str(run), "--data", data_dir,
           *QUICK[:1], "40", *QUICK[2:], "--save-every", "1000"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and _steps_logged(run).count(2):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list_checkpoints(run / "checkpoints") and 2 in _steps_logged(run)
    again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True)          # without --resume
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    short = [*cmd[:cmd.index("40")], "3", *cmd[cmd.index("40") + 1:]]
    done = subprocess.run([*short, "--resume", "--allow-changed", "steps"], env=cli_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert _steps_logged(run) == [1, 2, 3]


def test_edited_meta_json_is_detected(tmp_path):
    root = tmp_path / "ck"
    for step in (1, 2):
        save_checkpoint(str(root), step, {"w": torch.full((2,), float(step))}, {}, {}, {"data_step": step})
    meta_path = root / "step-000000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["data_step"] = 7                                   # still valid JSON, checksums of the tensors intact
    meta_path.write_text(json.dumps(meta))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, meta, _ = load_latest(str(root))
    assert meta["step"] == 1
    assert any("step-000000002" in str(w.message) and "meta.json" in str(w.message) for w in caught)


def test_a_failed_save_removes_its_temporary_directory_and_says_how_much_space(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from dsv3.errors import UserError

    root = tmp_path / "ck"
    save_checkpoint(str(root), 1, {"w": torch.ones(4)}, {}, {}, {})

    def full(tensors, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match="needs about .* MB are free"):
        save_checkpoint(str(root), 2, {"w": torch.zeros(4)}, {}, {}, {})
    monkeypatch.undo()
    assert sorted(os.listdir(root)) == ["step-000000001"]          # no .tmp-step-000000002 left behind
    assert load_latest(str(root))[1]["step"] == 1
    # too little free space is refused before anything is written
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(UserError, match="not enough disk space"):
        save_checkpoint(str(root), 3, {"w": torch.zeros(1000)}, {}, {}, {})
    monkeypatch.undo()
    assert sorted(os.listdir(root)) == ["step-000000001"]



def _two_cli_ranks(run, data_dir, *extra) -> list:
    """Two `dsv3 train` ranks of 500 steps, started as torchrun would (stderr piped)."""
    from helpers import free_port

    env = dict(cli_env(), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "dsv3.cli", "train", "--out", str(run), "--data", data_dir,
           *QUICK[:1], "500", *QUICK[2:], *extra]
    return [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]

def test_a_frozen_rank_makes_the_others_stop_with_an_error_naming_it(tmp_path, data_dir):
    """Two ranks; rank 1 is frozen (SIGSTOP) mid-run: rank 0 exits with code 2 within --dist-timeout (+ start-up
    slack), naming rank 1, instead of waiting 30 minutes."""
    procs = _two_cli_ranks(tmp_path / "run", data_dir, "--save-every", "1000", "--dist-timeout", "4")
    try:
        deadline = time.time() + 120
        metrics = tmp_path / "run" / "metrics.jsonl"
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if metrics.exists() and len(_steps_logged(tmp_path / "run")) >= 2:
                break
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        err = procs[0].communicate(timeout=60)[1]
        assert time.time() - stopped < 4 + 20
        assert procs[0].returncode == 2, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("dsv3 train: error: rank 0") and "rank 1 has not answered" in last, err
        assert "Traceback" not in err
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()


def test_resume_refuses_when_no_checkpoint_verifies(tmp_path, capsys, data_dir):
    """Checkpoints that all fail verification (here: meta.json edited) are not a reason to start over."""
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK]) == 0
    shutil.rmtree(run / "final")
    meta = run / "checkpoints" / "step-000000003" / "meta.json"
    meta.write_text(meta.read_text().replace('"step": 3', '"step": 2'))
    metrics = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert cli(["train", "--out", str(run), "--data", data_dir, *QUICK, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "meta.json does not match its checksum" in err and "no checkpoint" in err and "verifies" in err
    assert (run / "metrics.jsonl").read_bytes() == metrics


def _sharded_save_worker(rank, world, root, store, q):
    import datetime

    import torch.distributed as dist

    from dsv3.checkpoint import rows_key, save_sharded

    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=20))
        for step in (1, 2):
            pieces = {"model": {rows_key("w", range(2 * rank, 2 * rank + 2)): torch.full((2, 3), float(step))},
                      "optim": {}, "extra": {"b": torch.ones(1)} if rank == 0 else {}}
            if step == 2 and rank == 1:                 # killed in the middle of the parallel save: after its
                import safetensors.torch as st          # shard is written, before the directory is complete
                real = st.save_file

                def dying(tensors, path, *a, **k):
                    real(tensors, path, *a, **k)
                    os._exit(9)

                st.save_file = dying
            try:
                save_sharded(root, step, pieces, {"data_step": step} if rank == 0 else None, 3, rank, world)
            except Exception as e:  # noqa: BLE001
                q.put((rank, "raised", str(e)[:200]))
                return
        q.put((rank, "saved", None))
    except BaseException as e:  # noqa: BLE001
        q.put((rank, "error", repr(e)))


def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    import torch.multiprocessing as mp

    from dsv3.checkpoint import CheckpointReader, verify_checkpoint

    root = tmp_path / "ckpt"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_sharded_save_worker, args=(r, 2, str(root), str(tmp_path / "store"), q))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert procs[1].exitcode == 9
    status = q.get(timeout=5)
    assert status[0] == 0 and status[1] == "raised", status          # rank 0 fails the save, does not hang
    assert list_checkpoints(str(root)) == ["step-000000001"]        # the interrupted one never got its name
    meta = verify_checkpoint(str(root / "step-000000001"))
    assert sorted(meta["shards"]["model"]) == ["model-rank00000.safetensors", "model-rank00001.safetensors"]
    w = CheckpointReader(str(root / "step-000000001"), meta).get("model", "w")
    assert w.shape == (4, 3) and bool((w == 1.0).all())           # the two ranks' rows, assembled
    assert load_latest(str(root))[1]["step"] == 1


def test_lr_schedules():
    from dsv3.train.optim import lr_at

    cos = [lr_at(k, 1.0, 10, 2, 0.1) for k in range(11)]
    assert cos[:2] == [0.5, 1.0] and cos[2] == 1.0 and abs(cos[10] - 0.1) < 1e-12
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))                   # decays after the warm-up
    assert abs(lr_at(10, 1.0, 10, 2, 0.0)) < 1e-12                        # --min-lr-ratio 0: to zero
    const = [lr_at(k, 1.0, 10, 2, 0.1, "constant") for k in range(11)]
    assert const == [0.5] + [1.0] * 10
    with pytest.raises(ValueError, match="lr schedule"):
        lr_at(3, 1.0, 10, 2, 0.1, "linear")


def test_optimiser_flags_reach_the_optimiser_and_the_run_record(tmp_path, data_dir):
    from dsv3.train.cli import IDENTITY

    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", data_dir, *QUICK, "--adam-betas", "0.8,0.99",
            "--lr-schedule", "constant", "--lr", "0.002", "--warmup", "0", "--save-every", "1"]
    assert cli(args) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["lr"] for r in rows if "lr" in r] == [0.002] * 3             # constant, no decay
    rec = json.load(open(run / "run.json"))
    assert rec["adam-betas"] == [0.8, 0.99] and rec["lr-schedule"] == "constant" and set(IDENTITY) - {"from"} <= set(rec)
    ckpt = run / "checkpoints" / list_checkpoints(str(run / "checkpoints"))[-1]
    meta = json.load(open(ckpt / "meta.json"))
    assert meta["train_config"]["betas"] == [0.8, 0.99] and meta["train_config"]["lr_schedule"] == "constant"
    assert all(g["betas"] == [0.8, 0.99] for g in meta["optimizer"]["param_groups"])
    # a run.json written before these flags existed: it trained with the old fixed values (cosine, β2 0.95)
    shutil.rmtree(run / "final")
    for key in ("adam-betas", "lr-schedule", "min-lr-ratio"):
        rec.pop(key)
    json.dump(rec, open(run / "run.json", "w"))
    old = ["train", "--out", str(run), "--data", data_dir, *QUICK, "--lr", "0.002", "--warmup", "0", "--resume"]
    assert cli([*old, "--lr-schedule", "constant"]) == 2                  # refused: the run decayed its lr
    assert cli(old) == 0


def test_a_resumed_optimizer_keeps_bf16_moments_and_takes_the_allowed_new_betas(tmp_path, data_dir):
    """load_state_dict cast the saved BF16 moments to FP32 (--bf16-moments lost after a resume: not exact
    any more) and restored the saved β's, so --allow-changed adam-betas trained on with the old ones."""
    from safetensors import safe_open

    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", data_dir, *QUICK, "--save-every", "1", "--bf16-moments"]
    assert cli([*args[:args.index("3")], "2", *args[args.index("3") + 1:]]) == 0
    shutil.rmtree(run / "final")
    assert cli([*args, "--resume", "--allow-changed", "steps,adam-betas", "--adam-betas", "0.5,0.6"]) == 0
    ckpt = run / "checkpoints" / "step-000000003"
    with safe_open(str(ckpt / "optim.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.endswith((".exp_avg", ".exp_avg_sq"))}
    assert dtypes == {torch.bfloat16}
    meta = json.load(open(ckpt / "meta.json"))
    assert all(g["betas"] == [0.5, 0.6] for g in meta["optimizer"]["param_groups"])


def test_a_peer_that_closed_its_connection_is_not_called_alive_and_slow(monkeypatch):
    """A rank killed mid-step (SIGKILL, OOM) resets its connections at once, while its last heartbeat is still
    fresh: the others said 'every rank is alive but one was slower than --dist-timeout (raise it ...)'."""
    from datetime import timedelta

    import torch.distributed as dist

    from dsv3.train.watchdog import Heartbeat, timeout_message
    from helpers import free_port

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    hb = Heartbeat(0, 2, lambda: 6)
    hb._beat()
    store.set("dsv3/hb/1", json.dumps({"t": time.time(), "step": 6}))     # rank 1's last beat, a moment ago
    reset = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:412: Connection reset by peer")
    msg = timeout_message(reset, 0, 6, 20.0, hb)
    assert "closed its connection" in msg and "exited or was killed" in msg and "alive" not in msg, msg
    slow = timeout_message(RuntimeError("Timed out waiting 20000ms for recv operation to complete"), 0, 6, 20.0, hb)
    assert "every rank is alive but one was slower than --dist-timeout" in slow, slow


@pytest.mark.slow   # two CLI ranks for a few steps; run with -m slow
def test_a_killed_rank_makes_the_other_stop_at_once_saying_so_and_its_checkpoints_stay(tmp_path, data_dir):
    procs = _two_cli_ranks(tmp_path / "run", data_dir, "--save-every", "2", "--dist-timeout", "60")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if list_checkpoints(tmp_path / "run" / "checkpoints"):
                break
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        err = procs[0].communicate(timeout=60)[1]
        assert time.time() - killed < 30                      # not --dist-timeout (60 s)
        assert procs[0].returncode == 2, err
        last = err.strip().splitlines()[-1]
        assert "closed its connection" in last and "alive" not in last and "Traceback" not in err, err
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    assert list_checkpoints(tmp_path / "run" / "checkpoints") and load_latest(str(tmp_path / "run" / "checkpoints"))


def test_save_sets_aside_the_broken_checkpoints_a_resume_skipped(tmp_path):
    """A resume skipped broken step-4 and step-6 to step 2; the step-3 save renames them to *.broken (kept,
    not deleted), so --keep counts only valid ones and the next resume has nothing to warn about."""
    import random

    root, steps = tmp_path / "ck", random.sample(range(4, 50), 2)
    for step in (2, *steps):
        save_checkpoint(str(root), step, {"w": torch.randn(4)}, {}, {}, {"data_step": step}, keep=5)
    for step in steps:
        broken = root / f"step-{step:09d}" / "model.safetensors"
        broken.write_bytes(broken.read_bytes()[:-random.randint(1, 9)])
    names = [f"step-{s:09d}" for s in steps]
    with pytest.warns(UserWarning, match="set aside") as caught:
        save_checkpoint(str(root), 3, {"w": torch.randn(4)}, {}, {}, {"data_step": 3}, keep=1, broken=names)
    assert len([w for w in caught if "set aside" in str(w.message)]) == 1       # one line for both
    assert list_checkpoints(str(root)) == ["step-000000003"]
    assert sorted(os.listdir(root)) == sorted(["step-000000003", *(n + ".broken" for n in names)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                          # nothing skipped any more
        assert load_latest(str(root))[1]["step"] == 3


def test_resume_sets_the_skipped_checkpoints_aside_at_its_first_save(tmp_path, capsys, data_dir):
    """Broken step-2 and (left by an earlier, longer run) step-5: the resume skips both to step 1; its step-2
    save writes step 2 anew and sets step 5 aside as step-000000005.broken, saying so in one line."""
    run, two = tmp_path / "run", ["--steps", "2", *QUICK[2:], "--save-every", "1"]
    assert cli(["train", "--out", str(run), "--data", data_dir, *two]) == 0
    shutil.rmtree(run / "final")
    ck = run / "checkpoints"
    shutil.copytree(ck / "step-000000002", ck / "step-000000005")
    for step in (2, 5):
        f = ck / f"step-00000000{step}" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-5])
    truncated = (ck / "step-000000005" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli(["train", "--out", str(run), "--data", data_dir, *two, "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipping checkpoint") == 2
    lines = [line for line in err.splitlines() if "set aside" in line]
    assert len(lines) == 1 and "step-000000005.broken" in lines[0], err
    assert (ck / "step-000000005.broken" / "model.safetensors").read_bytes() == truncated    # kept, untouched
    assert list_checkpoints(ck) == ["step-000000001", "step-000000002"]


def _corrupt_newest_with_other_lr(ck, lr: float) -> str:
    """A copy of the newest checkpoint of ``ck`` as step 5, its meta.json saying --lr ``lr`` (with a matching
    checksum of its own) and its model.safetensors cut short: readable settings, broken weights."""
    from dsv3.checkpoint import meta_digest

    newest = ck / list_checkpoints(ck)[-1]
    shutil.copytree(newest, ck / "step-000000005")
    meta_path = ck / "step-000000005" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["step"] = meta["data_step"] = 5
    meta["train_config"]["lr"] = lr
    meta["meta_sha256"] = meta_digest(meta)
    meta_path.write_text(json.dumps(meta))
    weights = ck / "step-000000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    return "step-000000005"


def test_resume_without_run_json_compares_the_checkpoint_the_resume_loads(tmp_path, capsys, data_dir):
    """A run from before run.json: its settings were read from the newest-named checkpoint, even one that fails
    its checksum and that the resume then skips. The settings come from the checkpoint the resume loads."""
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", data_dir, *QUICK, "--save-every", "1"]
    assert cli(args) == 0
    shutil.rmtree(run / "final")
    os.remove(run / "run.json")
    broken = _corrupt_newest_with_other_lr(run / "checkpoints", 0.5)
    capsys.readouterr()
    # the broken step 5 (--lr 0.5) is not the run's record: another --lr is refused as a change of step 3's
    assert cli([*args, "--lr", "0.5", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lr (" in err and "-> 0.5)" in err and len(err.splitlines()) == 1, err
    assert not (run / "run.json").exists()
    # the same settings resume from step 3, skipping step 5 with a warning
    assert cli([*args, "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "resumed from" in out and "step-000000003" in out and "skipping checkpoint" in err and broken in err
    assert json.load(open(run / "run.json"))["lr"] != 0.5


def test_resume_without_run_json_and_no_valid_checkpoint_says_so(tmp_path, capsys, data_dir):
    """Every checkpoint broken and no run.json: one line naming each and why, before run.json is written."""
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", data_dir, *QUICK, "--save-every", "2"]
    assert cli(args) == 0
    shutil.rmtree(run / "final")
    os.remove(run / "run.json")
    for name in list_checkpoints(run / "checkpoints"):
        f = run / "checkpoints" / name / "optim.safetensors"
        f.write_bytes(f.read_bytes()[:-3])
    capsys.readouterr()
    assert cli([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint" in err and "verifies" in err, err
    assert "step-000000002: optim.safetensors does not match its checksum" in err and "step-000000003" in err
    assert not (run / "run.json").exists()


def test_resume_takes_an_eos_id_and_its_one_element_list_as_the_same_model_config(tmp_path, capsys, data_dir):
    """A run.json written before eos lists were kept whole holds eos_token_id 1 where the config now gives [1]
    (or the other way round): the same model config, not a change to refuse. A real change of the ids still is."""
    from dsv3 import ModelConfig

    def config(eos) -> str:
        path = tmp_path / f"config-{json.dumps(eos)}.json"
        path.write_text(json.dumps(ModelConfig.preset("tiny").replace(eos_token_id=eos).to_hf()))
        return str(path)

    def recorded_eos(eos) -> None:      # run.json as an older dsv3 wrote it
        rec = json.load(open(run / "run.json"))
        rec["config"]["eos_token_id"] = eos
        (run / "run.json").write_text(json.dumps(rec))

    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", data_dir, *QUICK]
    assert cli([*args, "--config", config([1])]) == 0
    assert json.load(open(run / "run.json"))["config"]["eos_token_id"] == [1]
    for then, now in ((1, [1]), ([1], 1)):
        shutil.rmtree(run / "final")
        recorded_eos(then)
        capsys.readouterr()
        assert cli([*args, "--config", config(now), "--resume"]) == 0, capsys.readouterr().err
    for then, now in ((1, [1, 5]), ([1], 2), ([1], [5])):
        recorded_eos(then)
        capsys.readouterr()
        assert cli([*args, "--config", config(now), "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"eos_token_id {then!r} -> {now!r}" in err and "--allow-changed config" in err, err
        assert len(err.splitlines()) == 1
