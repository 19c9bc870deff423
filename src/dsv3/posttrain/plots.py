"""Pictures of a GRPO run: reward (mean and per function), accuracy, KL to the reference and response
length over the steps, from RUN/metrics.jsonl (``dsv3 grpo`` draws them at the end)."""

from __future__ import annotations

import os


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_grpo(run_dir: str, out_dir: str | None = None, title: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..errors import check_writable_dir, iter_jsonl

    rows = [r for _, r in iter_jsonl(os.path.join(run_dir, "metrics.jsonl"), "metrics file", allow_nonfinite=True)
            if "reward" in r]
    if not rows:
        return []
    out_dir = out_dir or os.path.join(run_dir, "plots")
    check_writable_dir("--out", out_dir, "write the plots there")
    steps = [r["step"] for r in rows]
    k = max(1, len(rows) // 20)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("reward", [("reward", "total")] + [(key, key[len("reward_"):]) for key in rows[0]
                                                   if key.startswith("reward_") and key != "reward_std"]),
              ("accuracy", [("accuracy", "accuracy (samples)")]),
              ("KL(π‖π_ref), k3", [("kl", "KL")]),
              ("response length (tokens)", [("response_length", "mean")])]
    for ax, (name, series) in zip(axes.flat, panels):
        for key, label in series:
            ys = [r.get(key, float("nan")) for r in rows]
            ax.plot(steps, ys, lw=0.8, alpha=0.35)
            ax.plot(steps, _smooth(ys, k), lw=1.6, label=f"{label} (mean of {k})" if k > 1 else label)
        ax.set_title(name), ax.set_xlabel("step"), ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out_dir, "grpo.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
