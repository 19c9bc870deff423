"""``dsv3 eplb``: place experts with replicas on GPUs from a file of expert loads (SPEC §3).

    dsv3 eplb --loads loads.json --replicas 288 --groups 8 --nodes 4 --gpus 32 [--json] [--plot gpu.png]

The loads file holds [layers, logical experts] loads (a 1-D list is one layer): ``.json`` (a list
of lists), ``.csv`` (one layer per row; a non-numeric header row is skipped), ``.npy`` or ``.pt``
(a tensor). It prints the policy, the balancedness (mean/max GPU load, averaged over layers) with
no redundancy, with the reference greedy and with this placement, the same-GPU duplicates, and
one layer's experts per GPU; ``--json`` prints all of it (and the full maps) as JSON instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from . import eplb
from .errors import UserError, check_image_file, check_int, read_text

# far beyond any deployment (DeepSeek-V3 prefill: 288 replicas on 32 GPUs); 4096 replicas take seconds
MAX_REPLICAS = 4096
MAX_GPUS = 1024
MAX_LOADS = 1 << 22          # layers × logical experts

SUFFIXES = (".json", ".csv", ".npy", ".pt", ".pth")
_FLAGS = {"num_replicas": "--replicas", "num_groups": "--groups", "num_nodes": "--nodes",
          "num_gpus": "--gpus", "weight": "loads"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", required=True, metavar="FILE",
                        help="expert loads [layers, experts]: .json (list of lists), .csv, .npy or .pt")
    parser.add_argument("--replicas", type=int, required=True, metavar="N",
                        help="physical experts (logical + redundant), a multiple of --gpus")
    parser.add_argument("--groups", type=int, required=True, metavar="G",
                        help="expert groups; hierarchical policy when G is a multiple of --nodes")
    parser.add_argument("--nodes", type=int, required=True, metavar="M", help="server nodes")
    parser.add_argument("--gpus", type=int, required=True, metavar="K", help="GPUs (a multiple of --nodes)")
    parser.add_argument("--layer", type=int, default=None, metavar="I",
                        help="layer whose per-GPU experts are listed and drawn as bars (default 0); not with "
                             "--json alone, which prints every layer")
    parser.add_argument("--json", action="store_true", help="print the placement and numbers as JSON")
    parser.add_argument("--plot", metavar="FILE", help="draw GPU loads before/after to this image (.png, .svg, .pdf)")


def load_loads(path: str | Path) -> torch.Tensor:
    """Read a loads file into a float64 tensor [layers, experts]."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"loads file {path} is a directory, not a file")
    if not p.is_file():
        raise FileNotFoundError(f"loads file not found: {path}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(read_text(p, "loads file"))
            _check_numbers(data, path)
        elif suffix == ".csv":
            rows = [r for r in csv.reader(read_text(p, "loads file").splitlines()) if any(c.strip() for c in r)]
            skip = 1 if rows and _header(rows[0]) else 0
            data = []
            for i, r in enumerate(rows[skip:], start=1 + skip):
                try:
                    data.append([float(c) for c in r if c.strip()])
                except ValueError as e:
                    raise ValueError(f"row {i}: {e}") from None
        elif suffix == ".npy":
            data = np.load(p, allow_pickle=False)
        elif suffix in (".pt", ".pth"):
            try:   # weights_only: a pickle that would run code is refused, never executed
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, …
                raise ValueError(f"{path}: not a file of plain tensors torch can load safely (weights_only=True "
                                 f"refused it: {type(e).__name__}); nothing in it was run") from None
            if isinstance(data, torch.Tensor):
                data = data.detach().double().numpy()
        else:
            raise ValueError(f"unsupported loads file type {suffix or '(none)'!r}: use one of {', '.join(SUFFIXES)}")
        arr = np.asarray(data, dtype=np.float64)
    except ValueError as e:
        if isinstance(e, UserError) or "unsupported loads file" in str(e) or "weights_only" in str(e):
            raise
        raise ValueError(f"{path}: cannot read loads as a numeric [layers, experts] array ({e})") from None
    except (TypeError, OSError, RuntimeError, EOFError) as e:  # torch/numpy/json on a broken file
        raise ValueError(f"{path}: cannot read loads ({type(e).__name__}: {e})") from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{path}: loads must be [layers, experts] or one layer [experts], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{path}: holds no loads (need at least one layer and one expert, got shape {arr.shape})")
    return torch.from_numpy(arr)


def _check_numbers(data, path) -> None:
    """Every leaf of a JSON loads file is a number (numpy would read "4" as 4 and true as 1)."""
    from .errors import json_kind

    stack = [data]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{path}: loads must be numbers, found {json_kind(v)}")


def _header(row) -> bool:
    """A CSV row of names only (no cell is a number): a header, skipped."""
    for c in row:
        try:
            float(c)
            return False
        except ValueError:
            pass
    return True


def summarize(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> dict:
    """Place experts and collect everything the command reports."""
    phy2log, log2phy, logcnt = eplb.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    ref_p, _, ref_c = eplb.rebalance_experts_greedy(weight, num_replicas, num_groups, num_nodes, num_gpus)
    before = eplb.static_gpu_loads(weight, num_gpus)
    after = eplb.gpu_loads(weight, phy2log, logcnt, num_gpus)
    greedy = eplb.gpu_loads(weight, ref_p, ref_c, num_gpus)
    per_gpu = num_replicas // num_gpus
    hier = eplb.is_hierarchical(num_groups, num_nodes)
    return {
        "num_layers": int(weight.shape[0]),
        "num_logical_experts": int(weight.shape[1]),
        "num_replicas": num_replicas,
        "num_groups": num_groups,
        "num_nodes": num_nodes,
        "num_gpus": num_gpus,
        "replicas_per_gpu": per_gpu,
        "policy": "hierarchical" if hier else "global",
        "balancedness": {
            "no_redundancy": eplb.balancedness(before),
            "reference_greedy": eplb.balancedness(greedy),
            "eplb": eplb.balancedness(after),
        },
        "balancedness_per_layer": {
            "no_redundancy": eplb.balancedness(before, per_layer=True).tolist(),
            "reference_greedy": eplb.balancedness(greedy, per_layer=True).tolist(),
            "eplb": eplb.balancedness(after, per_layer=True).tolist(),
        },
        "same_gpu_duplicates": {
            "reference_greedy": eplb.same_gpu_duplicates(ref_p, num_gpus),
            "eplb": eplb.same_gpu_duplicates(phy2log, num_gpus),
        },
        "max_replicas": int(logcnt.max()),
        "phy2log": phy2log.tolist(),
        "log2phy": log2phy.tolist(),
        "logcnt": logcnt.tolist(),
        "gpu_loads_before": before.tolist(),
        "gpu_loads_after": after.tolist(),
        "_tensors": (before, after, greedy, phy2log),
    }


def _format(s: dict, layer: int) -> str:
    k, per = s["num_gpus"], s["replicas_per_gpu"]
    lines = [
        f"EPLB: {s['num_layers']} layer(s) x {s['num_logical_experts']} logical experts -> "
        f"{s['num_replicas']} replicas on {k} GPUs ({per} per GPU), {s['num_nodes']} node(s), {s['num_groups']} group(s)",
        f"policy: {s['policy']}" + (
            f" ({s['num_groups'] // s['num_nodes']} group(s) per node, replicated within the node)"
            if s["policy"] == "hierarchical" else " (groups do not divide over nodes: replicated over all GPUs)"),
        f"max replicas of one expert: {s['max_replicas']}",
        "balancedness (mean/max GPU load, averaged over layers; 1 = perfect):",
        f"  before (no redundancy, experts in order): {s['balancedness']['no_redundancy']:.4f}",
        f"  reference greedy:                         {s['balancedness']['reference_greedy']:.4f}"
        f"  ({s['same_gpu_duplicates']['reference_greedy']} same-GPU duplicate(s))",
        f"  after (this placement):                   {s['balancedness']['eplb']:.4f}"
        f"  ({s['same_gpu_duplicates']['eplb']} same-GPU duplicate(s))",
        "",
        f"layer {layer}: experts per GPU (load before -> after)",
    ]
    before, after, _, phy2log = s["_tensors"]
    gpn = k // s["num_nodes"]
    for g in range(k):
        experts = phy2log[layer, g * per:(g + 1) * per].tolist()
        lines.append(f"  GPU {g:>4} (node {g // gpn:>3}): {float(before[layer, g]):>12.6g} -> "
                     f"{float(after[layer, g]):<12.6g} experts {' '.join(map(str, experts))}")
    return "\n".join(lines)


def plot_gpu_loads(before: torch.Tensor, after: torch.Tensor, path: str | Path, *, layer: int = 0,
                   greedy: torch.Tensor | None = None, title: str = "GPU loads") -> None:
    """Draw GPU loads before/after: heat maps over layers (load / layer mean, when there are
    several layers), one layer's loads as bars, and the balancedness per layer."""
    from matplotlib.figure import Figure  # lazy: matplotlib only when drawing
    from matplotlib.ticker import MaxNLocator

    before, after = before.double(), after.double()
    num_layers, k = after.shape
    multi = num_layers > 1
    fig = Figure(figsize=(13, 8.5 if multi else 4.5), layout="constrained")
    axes = fig.subplots(2 if multi else 1, 2, squeeze=False)
    mean = after.mean(-1, keepdim=True).clamp_min(1e-300)
    if multi:
        top = float((before / mean).max())
        vmax = min(max(top, 1.5), 3.0)  # a few hot GPUs must not wash out the rest
        for ax, data, name in ((axes[0, 0], before, "before (no redundancy)"), (axes[0, 1], after, "after (EPLB)")):
            im = ax.imshow((data / mean).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                           interpolation="nearest")
            ax.set_title(f"{name}: load / layer mean, balancedness {_bal(data):.3f}")
            ax.set_xlabel("GPU")
            ax.set_ylabel("layer")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=axes[0, :], shrink=0.9, label="GPU load / layer mean",
                     extend="max" if top > vmax else "neither")
    ax = axes[-1, 0]
    x = np.arange(k)
    width = 0.4
    ax.bar(x - width / 2, before[layer].numpy(), width, label=f"before ({_bal(before[layer]):.3f})", color="tab:gray")
    ax.bar(x + width / 2, after[layer].numpy(), width, label=f"after ({_bal(after[layer]):.3f})", color="tab:blue")
    ax.axhline(float(mean[layer]), color="k", lw=0.8, ls="--", label="mean")
    ax.set_title(f"layer {layer}: load per GPU (balancedness in brackets)")
    ax.set_xlabel("GPU")
    ax.set_ylabel("load")
    ax.legend(fontsize=8)
    ax = axes[-1, 1]
    layers = np.arange(num_layers)
    curves = [("before (no redundancy)", before, "tab:gray")]
    if greedy is not None:
        curves.append(("reference greedy", greedy, "tab:orange"))
    curves.append(("after (EPLB)", after, "tab:blue"))
    for name, data, color in curves:
        b = _bal(data, per_layer=True)
        ax.plot(layers, b, marker="o" if num_layers < 30 else None, ms=3, color=color,
                label=f"{name}: mean {b.mean():.3f}")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("balancedness (mean/max GPU load) per layer")
    ax.set_xlabel("layer")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def _bal(loads: torch.Tensor, per_layer: bool = False):
    b = eplb.balancedness(loads, per_layer=True)
    return b.numpy() if per_layer else float(b.mean())


def run(args: argparse.Namespace) -> int:
    check_int("--replicas", args.replicas, lo=1, hi=MAX_REPLICAS)
    check_int("--gpus", args.gpus, lo=1, hi=MAX_GPUS)
    check_int("--nodes", args.nodes, lo=1, hi=MAX_GPUS)
    check_int("--groups", args.groups, lo=1, hi=MAX_REPLICAS)
    if args.plot is not None:
        check_image_file("--plot", args.plot)
    if args.layer is not None and args.json and args.plot is None:
        raise UserError(f"--layer {args.layer} only applies to the text listing and --plot; --json prints every layer")
    weight = load_loads(args.loads)
    if weight.numel() > MAX_LOADS:
        raise UserError(f"--loads {args.loads}: {weight.shape[0]} layers x {weight.shape[1]} experts is more "
                        f"than eplb handles ({MAX_LOADS:,} loads)")
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise UserError(f"--loads {args.loads}: loads must be finite and non-negative")
    if not torch.isfinite(weight.sum(-1)).all():
        raise UserError(f"--loads {args.loads}: loads so large that a layer's total overflows; scale them down")
    if args.layer is None:
        args.layer = 0
    if not 0 <= args.layer < weight.shape[0]:
        raise ValueError(f"--layer must be in [0, {weight.shape[0]}), got {args.layer}")
    try:
        s = summarize(weight, args.replicas, args.groups, args.nodes, args.gpus)
    except ValueError as e:  # name the command's flags rather than the library's parameters
        msg = str(e)
        for name, flag in _FLAGS.items():
            msg = msg.replace(name, flag)
        raise ValueError(msg) from None
    if args.plot:
        out = Path(args.plot)
        if out.parent and not out.parent.exists():
            raise FileNotFoundError(f"--plot: directory {out.parent} does not exist")
        before, after, greedy, _ = s["_tensors"]
        plot_gpu_loads(before, after, out, layer=args.layer, greedy=greedy,
                       title=f"EPLB ({s['policy']}): {s['num_logical_experts']} experts -> "
                             f"{s['num_replicas']} replicas on {s['num_gpus']} GPUs / {s['num_nodes']} nodes")
    tensors = s.pop("_tensors")
    if args.json:
        json.dump(s, sys.stdout)
        sys.stdout.write("\n")
    else:
        s["_tensors"] = tensors
        print(_format(s, args.layer))
        if args.plot:
            print(f"\nwrote {args.plot}")
    return 0
