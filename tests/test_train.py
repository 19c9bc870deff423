"""The training job: resume after SIGKILL, corrupted checkpoints, ZeRO-1 data parallel, CLI errors."""

from __future__ import annotations

import json
import os
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
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


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
