"""FP8 vs high-precision training of the same model, same seed and data (SPEC §2.3).

Runs ``dsv3 train`` once per precision (default: fp8, bf16, fp32) on the tiny preset with the
built-in corpus, then compares the per-step training loss of FP8 against the baseline(s):
relative loss error |L_fp8 − L_base| / L_base along the whole curve. The report's claim for
its 16B/230B MoE runs: below 0.25%. On a CPU the BF16 baseline runs under CPU autocast.

    python benchmarks/fp8_training.py [--steps 150] [--precisions fp8,bf16,fp32] [--threads 1]
Writes benchmarks/results/fp8_training.{json,md,png}; run directories go to runs/fp8_training/.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(precision: str, args) -> dict:
    out = ROOT / "runs" / "fp8_training" / precision
    cmd = [sys.executable, "-m", "dsv3.cli", "train", "--precision", precision,
           "--steps", str(args.steps), "--seed", str(args.seed), "--out", str(out),
           "--no-progress", "--no-plots", "--overwrite", "--preset", args.preset,
           "--eval-every", str(args.steps)]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return {"steps": [r["step"] for r in train], "loss": [r["loss"] for r in train],
            "val_loss": val, "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--precisions", default="fp8,bf16,fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--replot", action="store_true",
                    help="recompute tables/plot from the saved fp8_training.json, no training")
    args = ap.parse_args()
    precisions = args.precisions.split(",")
    if "fp8" not in precisions or len(precisions) < 2:
        raise SystemExit("--precisions must include fp8 and at least one baseline")

    if args.replot:
        saved = json.loads((RESULTS / "fp8_training.json").read_text())
        runs, old = saved["runs"], saved["meta"]
        precisions, args.steps, args.seed, args.preset = list(runs), old["steps"], old["seed"], \
            old["preset"]
    else:
        runs = {}
        for p in precisions:
            runs[p] = run(p, args)
            print(f"{p}: final loss {runs[p]['loss'][-1]:.4f}, val {runs[p]['val_loss']}, "
                  f"{runs[p]['wall_s']} s", flush=True)

    def rel_curve(x, base):
        rel = [abs(a - b) / b for a, b in zip(runs[x]["loss"], runs[base]["loss"])]
        return {"rel_err": rel, "max": max(rel), "mean": sum(rel) / len(rel),
                "max_after_10pct": max(rel[len(rel) // 10:]),
                "val_rel_err_end": abs(runs[x]["val_loss"][-1] - runs[base]["val_loss"][-1])
                / runs[base]["val_loss"][-1]}

    f8 = runs["fp8"]
    baselines = [p for p in precisions if p != "fp8"]
    compare = {base: rel_curve("fp8", base) for base in baselines}
    # noise floor: how far two high-precision runs drift apart on the same seed and data
    floor = ({f"{baselines[0]} vs {baselines[1]}": rel_curve(baselines[0], baselines[1])}
             if len(baselines) > 1 else {})

    meta = {"benchmark": "fp8_training",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                       and args.device != "cpu" else
                       f"CPU ({platform.processor() or platform.machine()}), "
                       f"{args.threads} thread(s)"),
            "python": platform.python_version(), "torch": torch.__version__,
            "preset": args.preset, "steps": args.steps, "seed": args.seed,
            "report_claim": "relative loss error vs BF16 < 0.25%"}
    if args.replot:                                  # keep when/where the runs were made
        meta.update({k: old[k] for k in ("date", "device", "torch") if k in old})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fp8_training.json").write_text(
        json.dumps({"meta": meta, "runs": runs, "compare": compare, "noise_floor": floor},
                   indent=1))
    lines = ["# FP8 vs high-precision training (same model, seed, data)", "",
             f"{meta['date']}, {meta['device']}, torch {meta['torch']}; preset {args.preset}, "
             f"{args.steps} steps, seed {args.seed}.", "",
             "| baseline | max rel. loss error | mean | max after first 10% | "
             "final val loss rel. error |", "|---|---|---|---|---|"]
    for base, c in list(compare.items()) + list(floor.items()):
        label = base if base in compare else f"(noise floor: {base})"
        lines.append(f"| {label} | {c['max']:.3%} | {c['mean']:.3%} | "
                     f"{c['max_after_10pct']:.3%} | {c['val_rel_err_end']:.3%} |")
    lines += ["", "Final training loss: " + ", ".join(
        f"{p} {r['loss'][-1]:.4f}" for p, r in runs.items()), "",
        "Per-step training losses are single-batch values, so the per-step relative error is "
        "noisy; the noise-floor row shows the same statistic between two high-precision runs "
        "(which also drift apart after the first steps). Report (16B / 230B MoE, ~1T tokens): "
        "relative error below 0.25%; this tiny-model run checks the mechanism, not the scale.",
        ""]
    (RESULTS / "fp8_training.md").write_text("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for p, r in runs.items():
        ax1.plot(r["steps"], r["loss"], label=p, lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.legend()
    ax1.set_title(f"{args.preset} preset, seed {args.seed}")
    for base, c in list(compare.items()) + list(floor.items()):
        label = f"fp8 vs {base}" if base in compare else f"{base} (noise floor)"
        ax2.plot(f8["steps"], [100 * e for e in c["rel_err"]], label=label, lw=1,
                 ls="-" if base in compare else ":")
    ax2.axhline(0.25, color="grey", ls=":", lw=0.8, label="0.25% (report)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("relative loss error (%)")
    ax2.legend()
    fig.suptitle("FP8 fine-grained mixed precision vs high-precision training")
    fig.tight_layout()
    fig.savefig(RESULTS / "fp8_training.png", dpi=120)
    print(f"wrote {RESULTS}/fp8_training.{{json,md,png}}")


if __name__ == "__main__":
    main()
