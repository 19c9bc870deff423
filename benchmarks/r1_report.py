"""The R1 demo's report (``scripts/r1_demo.sh``): held-out accuracy after each stage with its 95% Wilson
interval, the GRPO curves, and a summary.

Reads OUT/{pretrained,sft,grpo}.json (``dsv3 sample --json`` on the held-out problems) and
RUNS/grpo/metrics.jsonl; writes OUT/grpo.png (reward, accuracy, KL, length over the steps),
OUT/accuracy.png, OUT/grpo_metrics.jsonl (the run's per-step figures, without samples) and
OUT/summary.json / OUT/summary.md.

    python benchmarks/r1_report.py runs/r1 benchmarks/results/r1 [--seconds N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform

import torch

from dsv3.posttrain.plots import plot_grpo

STAGES = (("pretrained", "pre-trained (quickstart)"), ("sft", "cold-start SFT"), ("grpo", "SFT + GRPO"))


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2)) or 1e-12
    return (k2 / n2 - k1 / n1) / se


def mcnemar_exact(a: list[int], b: list[int]) -> dict:
    """The paired comparison of two models on the same problems: b01 (wrong → right), b10 (right → wrong)
    and the two-sided exact McNemar p-value (binomial on the discordant pairs)."""
    b01 = sum(1 for x, y in zip(a, b) if not x and y)
    b10 = sum(1 for x, y in zip(a, b) if x and not y)
    n, k = b01 + b10, min(b01, b10)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"wrong_to_right": b01, "right_to_wrong": b10, "p_value": p}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=None, help="wall time of the whole demo")
    a = ap.parse_args()
    res = {}
    for name, _ in STAGES:
        path = os.path.join(a.out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                res[name] = json.load(f)
    grpo_dir = os.path.join(a.runs, "grpo")
    rows = [json.loads(x) for x in open(os.path.join(grpo_dir, "metrics.jsonl"))]
    with open(os.path.join(a.out, "grpo_metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "sample"}) + "\n")
    plot_grpo(grpo_dir, a.out, title="GRPO on 2-digit addition (tiny dsv3 model, CPU)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [n for n, _ in STAGES if n in res]
    accs = [res[n]["accuracy"] for n in names]
    lo = [max(res[n]["accuracy"] - res[n]["ci95"][0], 0.0) for n in names]      # Wilson bounds can miss by rounding
    hi = [max(res[n]["ci95"][1] - res[n]["accuracy"], 0.0) for n in names]
    ax.bar(range(len(names)), accs, yerr=[lo, hi], capsize=6, color=["#999", "#4c72b0", "#dd8452"][:len(names)])
    ax.set_xticks(range(len(names)), [dict(STAGES)[n] for n in names])
    for i, n in enumerate(names):
        ax.text(i, accs[i] + hi[i] + 0.01, f"{accs[i]:.1%}\n({res[n]['correct']}/{res[n]['total']})", ha="center",
                fontsize=9)
    ax.set_ylim(0, min(1.15, max(accs) + max(hi) + 0.15))
    ax.set_ylabel("held-out accuracy (greedy), 95% Wilson CI")
    ax.set_title("2-digit addition, held-out problems")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "accuracy.png"), dpi=110)
    plt.close(fig)

    tail = rows[-10:]
    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": platform.processor() or "cpu",
        "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "demo_seconds": a.seconds,
        "heldout": {n: {k: res[n][k] for k in ("accuracy", "correct", "total", "ci95", "mean_length", "pass_rate")}
                    for n in names},
        "grpo": {"steps": rows[-1]["step"], "first10_reward": sum(r["reward"] for r in rows[:10]) / len(rows[:10]),
                 "last10_reward": sum(r["reward"] for r in tail) / len(tail),
                 "first10_accuracy": sum(r["accuracy"] for r in rows[:10]) / len(rows[:10]),
                 "last10_accuracy": sum(r["accuracy"] for r in tail) / len(tail),
                 "last10_kl": sum(r["kl"] for r in tail) / len(tail),
                 "gen_tokens_per_s": sum(r["gen_tokens_per_s"] for r in rows) / len(rows),
                 "train_tokens_per_s": sum(r["train_tokens_per_s"] for r in rows) / len(rows),
                 "seconds_per_step": sum(r["gen_seconds"] + r["train_seconds"] for r in rows) / len(rows)},
    }
    if "sft" in res and "grpo" in res:
        s, g = res["sft"], res["grpo"]
        summary["grpo_minus_sft"] = g["accuracy"] - s["accuracy"]
        summary["z_two_proportion"] = two_proportion_z(s["correct"], s["total"], g["correct"], g["total"])
        summary["intervals_disjoint"] = g["ci95"][0] > s["ci95"][1]
        if len(s.get("sample_correct", [])) == len(g.get("sample_correct", [])) == s["total"]:
            summary["paired_mcnemar"] = mcnemar_exact(s["sample_correct"], g["sample_correct"])
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = ["# R1 demo: cold-start SFT then GRPO on 2-digit addition", "",
             f"{summary['date']}, {summary['cpus']} CPUs, torch {summary['torch']}"
             + (f", whole demo {a.seconds / 60:.1f} min" if a.seconds else ""), "",
             "| stage | held-out accuracy (greedy) | 95% CI (Wilson) | mean length |", "|---|---|---|---|"]
    for n in names:
        r = res[n]
        lines.append(f"| {dict(STAGES)[n]} | {r['accuracy']:.1%} ({r['correct']}/{r['total']}) | "
                     f"{r['ci95'][0]:.1%} – {r['ci95'][1]:.1%} | {r['mean_length']:.1f} |")
    gr = summary["grpo"]
    lines += ["", f"GRPO: {gr['steps']} steps, reward {gr['first10_reward']:.2f} → {gr['last10_reward']:.2f} and "
              f"sample accuracy {gr['first10_accuracy']:.1%} → {gr['last10_accuracy']:.1%} (first vs last 10 steps), "
              f"KL {gr['last10_kl']:.4f} at the end, {gr['seconds_per_step']:.1f} s per step "
              f"(generation {gr['gen_tokens_per_s']:.0f} tokens/s, training {gr['train_tokens_per_s']:.0f} tokens/s)."]
    if "z_two_proportion" in summary:
        lines.append(f"GRPO − SFT: {summary['grpo_minus_sft']:+.1%} (two-proportion z = {summary['z_two_proportion']:.1f}; "
                     f"intervals {'disjoint' if summary['intervals_disjoint'] else 'overlapping'}).")
    if "paired_mcnemar" in summary:
        m = summary["paired_mcnemar"]
        lines.append(f"Paired on the same {res['sft']['total']} problems: {m['wrong_to_right']} wrong → right, "
                     f"{m['right_to_wrong']} right → wrong after GRPO (exact McNemar p = {m['p_value']:.2g}).")
    lines += ["", "![accuracy](accuracy.png)", "", "![grpo](grpo.png)", ""]
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(x for x in lines if not x.startswith("![")))


if __name__ == "__main__":
    main()
