"""Pictures of the long-context evaluation: loss-by-position curves and retrieval heat maps.

``python -m dsv3.eval.plots OUT_DIR A.json B.json …`` draws the results of several ``dsv3 eval --json``
runs side by side (the before/after figures of ``scripts/long_context_demo.sh``).
"""

from __future__ import annotations

import json
import os
import sys


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_curves(results: list[dict], path: str) -> str:
    """One curve per result that has ``ppl-by-position``; dotted verticals at each trained length."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    marks = set()
    for res in results:
        p = res["tasks"].get("ppl-by-position")
        if not p:
            continue
        x = [s + p["bucket"] / 2 for s in p["positions"]]
        ax.plot(x, p["loss"], marker=".", label=res.get("label") or res["model"])
        marks.add(p["trained_length"])
    for m in sorted(marks):
        ax.axvline(m, color="grey", linestyle=":", linewidth=1)
        ax.text(m, ax.get_ylim()[1], f" trained {m}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("position in the window (tokens)")
    ax.set_ylabel("next-token loss (held-out)")
    ax.set_title("Loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heat_maps(results: list[dict], task: str, path: str) -> str | None:
    """Accuracy grids (length × depth) of ``task``, one panel per result."""
    grids = [(res.get("label") or res["model"], res["tasks"][task]) for res in results if task in res["tasks"]]
    if not grids:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids) + 0.8, 3.6), squeeze=False)
    im = None
    for ax, (label, g) in zip(axes[0], grids):
        acc = [[100 * a for a in row] for row in g["accuracy"]]
        im = ax.imshow(acc, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]])
        ax.set_yticks(range(len(g["lengths"])), [str(n) for n in g["lengths"]])
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("depth of the key")
        ax.set_title(f"{label}\nmean {100 * g['mean']:.0f}%", fontsize=9)
    axes[0][0].set_ylabel("prompt length (tokens)")
    fig.colorbar(im, ax=axes[0].tolist(), label=f"{task} accuracy (%)", shrink=0.9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def draw(results: list[dict], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    made = []
    if any("ppl-by-position" in r["tasks"] for r in results):
        made.append(loss_curves(results, os.path.join(out_dir, "loss_by_position.png")))
    for task in ("passkey", "niah"):
        p = heat_maps(results, task, os.path.join(out_dir, f"{task}_heatmap.png"))
        if p:
            made.append(p)
    return made


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m dsv3.eval.plots OUT_DIR RESULT.json [RESULT.json …]", file=sys.stderr)
        return 2
    from ..errors import UserError, read_json

    try:
        results = [read_json(p, "result file") for p in argv[1:]]
        for p, r in zip(argv[1:], results):
            if not isinstance(r.get("tasks"), dict):
                raise UserError(f"result file {p}: no 'tasks' object (not written by dsv3 eval --json)")
    except UserError as e:
        print(f"dsv3.eval.plots: error: {e}", file=sys.stderr)
        return 2
    for path in draw(results, argv[0]):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
