"""Quantisation error of per-tensor vs fine-grained (1×128 tiles, 128×128 blocks) E4M3 scaling
on activations with outliers (SPEC §2.3, report §3.3.1).

Synthetic activations [T, K]: standard normal, with `--outlier-frac` of the channels multiplied
by an outlier factor F (channel outliers, as seen in LLM activations) swept over 1 … 10^4, and a
few token outliers. One scale per tensor must cover the largest outlier, so the ordinary values
are pushed into E4M3's subnormal range or flushed to zero; a 1×128 tile only shares its scale
with 127 neighbours of the same token, a 128×128 block with 128 tokens × 128 channels.

Metrics per scheme: relative error ‖x̂ − x‖/‖x‖ over all elements and over the non-outlier
elements only, the fraction of non-zero inputs flushed to zero, and the relative error of a GEMM
output y = x Wᵀ (W [N, K] Gaussian, 128×128-quantised in every case).

    python benchmarks/fp8_quant_error.py [--tokens 2048] [--channels 2048]
Writes benchmarks/results/fp8_quant_error.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import time
from pathlib import Path

import torch

from dsv3 import fp8

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FACTORS = [1, 10, 100, 1000, 10000]


def synthetic(t: int, k: int, factor: float, frac: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    ch = torch.randperm(k, generator=g)[: max(1, int(frac * k))]
    x[:, ch] *= factor
    tok = torch.randperm(t, generator=g)[: max(1, t // 512)]
    x[tok] *= max(1.0, factor ** 0.5)
    mask = torch.zeros(t, k, dtype=torch.bool)
    mask[:, ch] = True
    mask[tok] = True
    return x, mask


def schemes(x):
    q, s = fp8.quantize_per_tensor(x)
    yield "per-tensor", q.float() * s
    q, s = fp8.quantize_activation(x)
    yield "1x128 tiles", fp8.dequantize_activation(q, s)
    q, s = fp8.quantize_weight(x)
    yield "128x128 blocks", fp8.dequantize_weight(q, s)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--out-features", type=int, default=512)
    ap.add_argument("--outlier-frac", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()

    w = torch.randn(args.out_features, args.channels,
                    generator=torch.Generator().manual_seed(args.seed + 1)) / args.channels ** 0.5
    w_q, w_s = fp8.quantize_weight(w)
    w_d = fp8.dequantize_weight(w_q, w_s).double()
    results = []
    for f in FACTORS:
        x, outl = synthetic(args.tokens, args.channels, f, args.outlier_frac, args.seed)
        y_ref = x.double() @ w.double().T
        for name, xd in schemes(x):
            row = {
                "factor": f, "scheme": name,
                "rel_err_all": rel(xd, x),
                "rel_err_normal": rel(xd[~outl], x[~outl]),
                "flushed_to_zero": ((xd == 0) & (x != 0)).float().mean().item(),
                "gemm_rel_err": rel(xd.double() @ w_d.T, y_ref),
            }
            results.append(row)
            print(f"F={f:6g} {name:15s} all {row['rel_err_all']:.3e}  normal "
                  f"{row['rel_err_normal']:.3e}  zero {row['flushed_to_zero']:.3%}  "
                  f"gemm {row['gemm_rel_err']:.3e}", flush=True)

    meta = {
        "benchmark": "fp8_quant_error",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()})",
        "python": platform.python_version(), "torch": torch.__version__,
        "tokens": args.tokens, "channels": args.channels, "out_features": args.out_features,
        "outlier_frac": args.outlier_frac, "seed": args.seed, "factors": FACTORS,
        "data": "synthetic: N(0,1) with outlier channels ×F and token outliers ×sqrt(F)",
        "wall_s": round(time.time() - t0, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fp8_quant_error.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["# E4M3 quantisation error: per-tensor vs 1×128 vs 128×128 scaling", "",
             f"{meta['date']}, {meta['device']}, torch {meta['torch']}; x [{args.tokens}, "
             f"{args.channels}], {args.outlier_frac:.0%} outlier channels ×F, token outliers "
             f"×√F; GEMM with W [{args.out_features}, {args.channels}] (128×128 FP8).", "",
             "| F | scheme | rel. error (all) | rel. error (non-outliers) | flushed to 0 | "
             "GEMM rel. error |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['factor']:g} | {r['scheme']} | {r['rel_err_all']:.2e} | "
                     f"{r['rel_err_normal']:.2e} | {r['flushed_to_zero']:.2%} | "
                     f"{r['gemm_rel_err']:.2e} |")
    lines.append("")
    (RESULTS / "fp8_quant_error.md").write_text("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    names = ["per-tensor", "1x128 tiles", "128x128 blocks"]
    for ax, key, title in zip(axes, ["rel_err_normal", "flushed_to_zero", "gemm_rel_err"],
                              ["relative error, non-outlier values", "fraction flushed to zero",
                               "GEMM output relative error"]):
        for nm in names:
            ys = [r[key] for r in results if r["scheme"] == nm]
            ax.plot(FACTORS, ys, marker="o", label=nm)
        ax.set_xscale("log")
        if key == "flushed_to_zero":
            ax.set_yscale("symlog", linthresh=1e-4)
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("outlier factor F")
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("E4M3 scaling granularity on activations with outliers")
    fig.tight_layout()
    fig.savefig(RESULTS / "fp8_quant_error.png", dpi=120)
    print(f"wrote {RESULTS}/fp8_quant_error.{{json,md,png}} in {meta['wall_s']} s")


if __name__ == "__main__":
    main()
