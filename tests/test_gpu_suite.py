"""benchmarks/gpu_suite.py stays runnable without a GPU: its dry run (tiny sizes, Triton interpreted)
goes through every section and check, and bad arguments get one line and exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"


def _run(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_dry_run_runs_every_section(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    run = _run("--dry-run", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert res["dry_run"] and res["complete"] and res["environment"]["device"] == "cpu"
    assert not (tmp_path / "gpu_suite.json.tmp").exists()
    checks = {c["name"]: c for c in res["checks"]}
    assert {c["section"] for c in res["checks"]} == {"correctness", "gemm", "train", "decode"}
    assert not [c for c in res["checks"] if c["status"] == "FAIL"]
    # every kernel was checked for real (not skipped) under the interpreter
    for name in ("Triton quantisers (1x128, SwiGLU+quant)", "Triton block-scaled GEMM", "Triton grouped GEMM",
                 "Triton paged MLA attention", "model logits and 5 training steps vs CPU fp32"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["Triton block-scaled GEMM"]["rel_err_vs_torch"] < 1e-5
    model = checks["model logits and 5 training steps vs CPU fp32"]
    assert len(model["bf16"]) == len(model["fp8"]) == 5 and model["fp8_max_rel"] < 0.05
    assert checks["torch._scaled_mm block-scaled GEMM"]["status"] == "skipped"
    assert checks["NCCL two-process run"]["status"] == "skipped"
    train = res["data"]["train"]["rows"]
    assert {(r["precision"], r["recompute"]) for r in train} == {("bf16", False), ("bf16", True), ("fp8", False),
                                                                ("fp8", True)}
    assert all(r["tokens_per_s"] > 0 for r in train)
    assert res["data"]["decode"]["rows"] and res["data"]["mla"]["rows"]
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "## FP8 GEMM" in md and "## Training step" in md and "## Decoding" in md
    assert run.stdout.strip().splitlines()[-1].startswith(f"{len(res['checks'])} checks, 0 failed")


@pytest.mark.parametrize("args,message", [
    (["--out", "{tmp}", "--dry-run", "--sections", "gemm,bogus"], "--sections: unknown bogus"),
    (["--out", "{tmp}"], "no CUDA device here; use --dry-run"),
    (["--dry-run", "--out", "/proc/no/such/dir"], "--out /proc/no/such/dir"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, args, message):
    import torch
    if torch.cuda.is_available() and "--dry-run" not in args:
        pytest.skip("a GPU is present: the run would start")
    run = _run(*[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr


def test_shell_runner_unpacks_wheels_the_python_lacks(tmp_path):
    """scripts/gpu_suite.sh (the one command a GPU machine runs) unpacks the wheels it is given into a
    directory searched after Python's own packages, then runs the suite with them importable."""
    pytest.importorskip("triton")
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "dsv3_probe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("dsv3_probe/__init__.py", "VERSION = '1.0'\n")
    probe = tmp_path / "probe.py"           # a stand-in for the suite's own imports of such a package
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(DSV3_GPU_WHEELS=str(wheels), TMPDIR=str(tmp_path), PYTHON=sys.executable)
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_suite.sh"), str(out), "--dry-run", "--sections",
                          "gemm"], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    site = tmp_path / "dsv3_gpu_site"
    assert (site / "dsv3_probe" / "__init__.py").exists()
    assert (out / "gpu_suite.json").exists() and (out / "gpu_suite.log").exists()
    probe.write_text("import os, sys\nsys.path.append(os.environ['DSV3_EXTRA_SITE'])\nimport dsv3_probe\n"
                     "print(dsv3_probe.VERSION)\n")
    seen = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True,
                          env=dict(env, DSV3_EXTRA_SITE=str(site)))
    assert seen.stdout.strip() == "1.0", seen.stderr
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_suite.sh")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_a_killed_run_leaves_its_finished_checks(tmp_path):
    """The device call has a hard time limit: results are saved after every check, atomically."""
    pytest.importorskip("triton")
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    path = tmp_path / "gpu_suite.json"
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = json.loads(path.read_text())
    assert not res["complete"] and res["checks"], res
    assert res["checks"][0]["name"] == "Triton quantisers (1x128, SwiGLU+quant)"


def test_gpu_sized_training_configs_pass_the_trainers_checks(monkeypatch):
    """The dry run trains only the tiny config: the GPU run's own configs are checked here against the
    Trainer's argument rules (a 4096-token sequence once exceeded the wide model's positions on the H200)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_suite
    from dsv3.train.trainer import TrainConfig
    for name, (cfg, batch, seq) in gpu_suite._train_configs(dry=False).items():
        TrainConfig(out="unused", steps=6, batch_size=batch, seq_len=seq).validate(cfg)
