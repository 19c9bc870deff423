"""``dsv3 plot RUN_DIR``: loss curves, MaxVio over time and expert-load heat maps from metrics.jsonl."""

from __future__ import annotations

import argparse
import math
import os


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of RUN/metrics.jsonl, checked: each a JSON object with an integer ``step`` and numbers where
    the plots read numbers (a UserError naming the file and line otherwise). A last line cut short by a
    killed process is skipped. A number that cannot be drawn (NaN, ±Infinity, or beyond float32's range,
    which no logged metric reaches and which broke the axes) becomes NaN, a gap in the picture, and one
    warning names the file, the fields and the lines."""
    import warnings

    from ..errors import UserError, iter_jsonl, json_kind

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a directory" if os.path.exists(run_dir)
                                else f"run directory not found: {run_dir}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = []
    gaps: dict[str, list[int]] = {}      # field -> lines whose value is drawn as a gap
    for lineno, rec in iter_jsonl(path, "metrics file", allow_nonfinite=True):   # a NaN metric is a gap
        where = f"metrics file {path} line {lineno}"
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
            raise UserError(f"{where}: 'step' must be a non-negative integer below 2**63, found {step!r}"[:300])
        for key in _NUMBERS:
            v = rec.get(key)
            if key in rec and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise UserError(f"{where}: {key!r} must be a number, found {v!r}"[:300])
            if key in rec and not _drawable(v):
                rec[key] = math.nan
                gaps.setdefault(key, []).append(lineno)
        load = rec.get("expert_load")
        if load is not None and not (isinstance(load, list) and load and all(
                isinstance(r, list) and r and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in r)
                for r in load)):
            raise UserError(f"{where}: 'expert_load' must be a list of per-layer lists of numbers")
        if load is not None and not all(_drawable(x) for r in load for x in r):
            rec["expert_load"] = [[math.nan] * len(r) for r in load]
            gaps.setdefault("expert_load", []).append(lineno)
        names = rec.get("moe_layers")
        if names is not None and not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
            raise UserError(f"{where}: 'moe_layers' must be a list of layer names, found {json_kind(names)}")
        rows.append(rec)
    if not rows:
        raise UserError(f"metrics file {path} holds no rows to plot")
    shapes = {(len(r["expert_load"]), len(r["expert_load"][0])) for r in rows if "expert_load" in r}
    if len(shapes) > 1 or any(len({len(x) for x in r["expert_load"]}) > 1 for r in rows if "expert_load" in r):
        raise UserError(f"metrics file {path}: 'expert_load' rows differ in shape ({sorted(shapes)})")
    if gaps:
        def lines(ns: list[int]) -> str:
            shown = ", ".join(map(str, ns[:5]))
            return f"line{'s' if len(ns) > 1 else ''} {shown}" + (f" … ({len(ns)} lines)" if len(ns) > 5 else "")

        warnings.warn(f"metrics file {path}: values that are not finite or beyond float32's range (±{_FLOAT32_MAX:.1e}) "
                      f"are left out of the plots (gaps): " + "; ".join(f"{k!r} on {lines(v)}" for k, v in gaps.items()),
                      stacklevel=2)
    return rows


_NUMBERS = ("loss", "mtp", "val_loss", "max_vio", "val_max_vio")
_FLOAT32_MAX = 3.4028234663852886e38


def _drawable(v) -> bool:
    """A number the plots can draw: finite and within float32's range (the trainer logs float32 values; one
    near float64's limit made matplotlib fail computing the axis ticks)."""
    return math.isfinite(v) and abs(v) <= _FLOAT32_MAX


def check_out_dir(out_dir: str, flag: str = "--out") -> None:
    """The plots directory exists or can be made, and is writable (a UserError naming it)."""
    from ..errors import check_writable_dir

    check_writable_dir(flag, out_dir, "write the plots there")


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write loss.png, max_vio.png and expert_load.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_metrics(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    check_out_dir(out_dir)
    written = []

    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (next token)", lw=1)
        mtp = [r for r in train if "mtp" in r]   # a run resumed with another MTP depth logs it on some rows only
        if mtp:
            ax.plot([r["step"] for r in mtp], [r["mtp"] for r in mtp], label="train (MTP depth 1)", lw=1, alpha=0.7)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step"), ax.set_ylabel("cross-entropy (nats/token)"), ax.set_title("loss")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    written.append(_save(fig, out_dir, "loss.png"))

    vio = [r for r in rows if "max_vio" in r]
    if vio:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in vio], [r["max_vio"] for r in vio], lw=1, label="batch MaxVio (mean over layers)")
        vval = [r for r in rows if "val_max_vio" in r]
        if vval:
            ax.plot([r["step"] for r in vval], [r["val_max_vio"] for r in vval], "o-", label="validation MaxVio_global")
        ax.set_xlabel("step"), ax.set_ylabel("MaxVio"), ax.set_title("expert load imbalance")
        ax.grid(alpha=0.3), ax.legend()
        written.append(_save(fig, out_dir, "max_vio.png"))

    loads = [r for r in rows if "expert_load" in r]
    if loads:
        arr = np.array([r["expert_load"] for r in loads], dtype=float)   # [steps, layers, experts]
        total = arr.sum(-1, keepdims=True)                                # 0: a layer that saw no token
        arr = np.divide(arr * arr.shape[-1], total, out=np.full_like(arr, np.nan), where=total > 0)  # 1.0 = balanced
        n_layers = arr.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(8, 2.2 * n_layers + 0.6), squeeze=False)
        steps = [r["step"] for r in loads]
        x0, x1 = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)  # one row: a strip
        peak = float(np.nanmax(arr)) if np.isfinite(arr).any() else 0.0
        names = next((r["moe_layers"] for r in rows if "moe_layers" in r), None)
        if not names or len(names) != n_layers:
            names = [f"MoE layer {i}" for i in range(n_layers)]
        for i in range(n_layers):
            ax = axes[i, 0]
            im = ax.imshow(arr[:, i].T, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, peak),
                           extent=[x0, x1, arr.shape[-1] - 0.5, -0.5], interpolation="nearest")
            ax.set_ylabel(f"{names[i]}\nexpert")
            fig.colorbar(im, ax=ax, label="load / mean")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("tokens per expert relative to the mean")
        written.append(_save(fig, out_dir, "expert_load.png"))
    return written


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")


def run(args) -> int:
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
