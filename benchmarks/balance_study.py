"""Load-balancing study on the tiny model (SPEC §1.3; Wang et al. 2024, arXiv 2408.15664).

Runs with the same seed, data and steps (``--runs``; the first, third and fourth by default):
  loss-free       aux-loss-free bias, γ = 1e-3 (plus the report's tiny sequence-wise loss, α = 1e-4)
  loss-free-fast  the same with γ = 1e-2 (a faster bias for short runs)
  aux-loss        no bias update; an auxiliary balance loss with α = 1e-2 (the conventional approach)
  neither         no bias update, no balance loss
Reports validation loss and validation MaxVio_global (loads summed over the whole validation split,
mean over the MoE layers; per layer too) side by side, writes benchmarks/results/balance_study.{json,png}.

The builtin corpus is prepared with a 10% validation split (about 100 stdlib files, ~0.5M tokens)
so that the validation loads measure the router on a sample like the training data, not on a
handful of files. The runs go to ``--workers`` processes of one torch thread each.

    python benchmarks/balance_study.py [--steps 3000] [--workers 3] [--runs loss-free,aux-loss,neither] [--data DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import tempfile

import torch

import dsv3
from dsv3.data import TokenDataset, prepare
from dsv3.train.trainer import TrainConfig, Trainer

RUNS = {   # key: (label, TrainConfig overrides)
    "loss-free": ("loss-free (γ=1e-3)", dict(bias_update_speed=1e-3, balance_alpha=1e-4)),
    "loss-free-fast": ("loss-free (γ=1e-2)", dict(bias_update_speed=1e-2, balance_alpha=1e-4)),
    "aux-loss": ("aux loss (α=1e-2)", dict(bias_update_speed=0.0, balance_alpha=1e-2)),
    "neither": ("neither", dict(bias_update_speed=0.0, balance_alpha=0.0)),
}
DEFAULT_RUNS = "loss-free,aux-loss,neither"


def run_one(job: tuple) -> tuple:
    """One training run (in a worker process): returns (name, result, MaxVio curve, val curve)."""
    name, kw, data, steps, batch_size, seq_len = job
    torch.set_num_threads(1)
    cfg = dsv3.ModelConfig.preset("tiny")
    train = TokenDataset(data, "train", seq_len)
    val = TokenDataset(data, "val", seq_len)
    out = tempfile.mkdtemp(prefix="dsv3-balance-")
    tc = TrainConfig(out=out, steps=steps, batch_size=batch_size, seq_len=seq_len,
                     eval_every=max(steps // 10, 1), eval_batches=16, save_every=0, progress=False, **kw)
    trainer = Trainer(cfg, tc, train, val)
    trainer.fit()
    trainer.tc.eval_batches = 10**9                           # the final evaluation: the whole split
    final = trainer.evaluate()
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    curve = [(r["step"], r["max_vio"]) for r in rows if "max_vio" in r]
    val_curve = [(r["step"], r["val_max_vio"], r["val_loss"]) for r in rows if "val_max_vio" in r]
    tail = curve[-100:]
    result = {"val_loss": final["val_loss"], "val_max_vio_global": final["val_max_vio"],
              "val_max_vio_per_layer": final["val_max_vio_per_layer"],
              "train_max_vio_last100": sum(v for _, v in tail) / len(tail), **kw}
    print(name, result, flush=True)
    return name, result, curve, val_curve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--doc-bytes", type=int, default=4096,
                    help="cut files into ~this many bytes before the train/val split (0: whole files)")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--workers", type=int, default=3, help="runs trained at once, one torch thread each")
    ap.add_argument("--data", default=None, help="a prepared token directory (default: prepare the builtin corpus)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--replot", action="store_true", help="only rewrite the .md and .png from OUT/balance_study.json")
    args = ap.parse_args()
    if args.replot:
        with open(os.path.join(args.out, "balance_study.json")) as f:
            write(json.load(f), args.out)
        return
    keys = [k.strip() for k in args.runs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in RUNS]
    if unknown or not keys:
        ap.error(f"--runs: unknown run(s) {unknown or args.runs!r}; choose from {', '.join(RUNS)}")
    data = args.data
    if data is None:
        data = os.path.join(tempfile.gettempdir(),
                            f"dsv3-balance-study-data-val{args.val_fraction:g}-doc{args.doc_bytes}")
        if not os.path.exists(os.path.join(data, "index.json")):
            prepare(None, data, vocab_size=2048, val_fraction=args.val_fraction, doc_bytes=args.doc_bytes or None)
    jobs = [(*RUNS[k], data, args.steps, args.batch_size, args.seq_len) for k in keys]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        finished = pool.map(run_one, jobs, chunksize=1)
    results = {name: r for name, r, _, _ in finished}
    curves = {name: c for name, _, c, _ in finished}
    val_curves = {name: v for name, _, _, v in finished}
    val = TokenDataset(data, "val", args.seq_len)
    res = {"benchmark": "balance_study", "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "preset": "tiny", "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "val_tokens": val.num_tokens, "val_fraction": args.val_fraction,
           "doc_bytes": json.load(open(os.path.join(data, "index.json"))).get("doc_bytes"),
           "val_documents": json.load(open(os.path.join(data, "index.json")))["splits"]["val"]["documents"],
           "runs": results,
           "val_curves": val_curves, "batch_curves": curves,
           "reference": "Wang et al.: MaxVio_global 0.04 loss-free vs 0.72 (1B) / 0.52 (3B) with an aux loss"}
    os.makedirs(args.out, exist_ok=True)
    write(res, args.out)


def write(res: dict, out: str) -> None:
    """balance_study.json (the curves compact, four decimals), .md (the table) and .png."""
    res = dict(res, batch_curves={k: [(s, round(v, 4)) for s, v in c] for k, c in res["batch_curves"].items()})
    text = json.dumps({k: v for k, v in res.items() if k != "batch_curves"}, indent=1)
    with open(os.path.join(out, "balance_study.json"), "w") as f:      # one line per curve
        f.write(text[:-2] + ',\n "batch_curves": {\n' + ",\n".join(
            f"  {json.dumps(k)}: {json.dumps(c)}" for k, c in res["batch_curves"].items()) + "\n }\n}\n")
    rows = "\n".join(f"| {name} | {r['val_max_vio_global']:.3f} | "
                      + " / ".join(f"{x:.3f}" for x in r["val_max_vio_per_layer"])
                      + f" | {r['val_loss']:.4f} | {r['train_max_vio_last100']:.3f} |" for name, r in res["runs"].items())
    with open(os.path.join(out, "balance_study.md"), "w") as f:
        f.write(f"""# Load-balancing study (benchmarks/balance_study.py)

{res['date']}, torch {res['torch']}; preset `{res['preset']}`, {res['steps']} steps of {res['batch_size']} × {res['seq_len']}
tokens, same seed and data. Validation split: {res['val_tokens']:,} tokens in {res['val_documents']} pieces
(val_fraction {res['val_fraction']}, files cut into {res['doc_bytes']}-byte pieces first). MaxVio_global: loads
summed over the whole split, then the mean over the MoE layers (MTP included).

| run | validation MaxVio_global | per layer | validation loss | batch MaxVio, last 100 steps |
|---|---|---|---|---|
{rows}

Reference: {res['reference']}.

![balance study](balance_study.png)
""")
    plot(res, os.path.join(out, "balance_study.png"))


def plot(res: dict, path: str) -> None:
    """Batch MaxVio over training, validation MaxVio at the evaluations (a 16-batch sample of the
    split), and the final MaxVio_global over the whole split with the validation losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = res["runs"]
    fig, (a, v, b) = plt.subplots(1, 3, figsize=(18, 4.5))
    for name, pts in res["batch_curves"].items():
        a.plot([s for s, _ in pts], [x for _, x in pts], lw=0.6, alpha=0.8, label=name)
    a.set_xlabel("step"), a.set_ylabel("batch MaxVio (mean over MoE layers)"), a.set_yscale("log"), a.legend()
    for name, pts in res["val_curves"].items():
        v.plot([s for s, _, _ in pts], [x for _, x, _ in pts], marker="o", ms=3, label=name)
    v.set_xlabel("step"), v.set_ylabel("validation MaxVio, 16-batch sample (65K tokens)"), v.set_yscale("log")
    v.legend()
    names = list(results)
    b.bar(names, [results[n]["val_max_vio_global"] for n in names], color=[f"C{i}" for i in range(len(names))])
    for i, n in enumerate(names):
        b.text(i, results[n]["val_max_vio_global"], f"{results[n]['val_max_vio_global']:.3f}\nval loss {results[n]['val_loss']:.3f}",
               ha="center", va="bottom", fontsize=8)
    b.axhline(0.1, color="k", ls=":", lw=1, label="target for loss-free: 0.1")
    b.legend(fontsize=8)
    b.tick_params(axis="x", labelsize=8)
    b.set_ylabel(f"validation MaxVio_global, whole split ({res['val_tokens'] / 1e3:.0f}K tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)

if __name__ == "__main__":
    main()
