"""FP8 GEMM and quantise-kernel throughput on a GPU (SPEC §2.3; DeepGEMM's shapes).

One run measures, with the device name: TFLOPS of the Triton block-scaled GEMM, cuBLAS
block-scaled `torch._scaled_mm` (where the probe says it works) and BF16 `torch.matmul` on
DeepGEMM's dense shapes plus the grouped-contiguous MoE shape; and the Triton quantise kernel's
effective bandwidth (bytes read + written) against a device-to-device copy of the input.
Targets (issue 4): ≥ 1.3× BF16 on the large shapes, ≥ 0.9× cuBLAS block-scaled, quantise ≥ 80%
of copy bandwidth.

    python benchmarks/fp8_gemm_speed.py            # CUDA GPU (sm89+ for FP8)
    python benchmarks/fp8_gemm_speed.py --smoke    # tiny shapes, any device (script check only)
Writes benchmarks/results/fp8_gemm_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
from pathlib import Path

import torch

from dsv3 import fp8

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# (M, N, K) dense shapes from DeepGEMM's README with the H800 TFLOPS it reports
DENSE = [(4096, 7168, 16384, 1426), (4096, 4096, 7168, 1265), (128, 7168, 16384, 645),
         (64, 7168, 2048, 295), (4096, 2112, 7168, None), (4096, 24576, 1536, None)]
GROUPED = [(8, 4096, 4096, 7168, 1346)]      # (experts, tokens per expert, N, K, DeepGEMM)


def bench(fn, iters=20, warmup=5):
    """Median seconds per call (CUDA events); plain wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return sorted(times)[len(times) // 2]
    import time
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dense = [(64, 256, 512, None)] if args.smoke else DENSE
    grouped = [(2, 64, 256, 512, None)] if args.smoke else GROUPED
    backends = [b for b in fp8.available_backends(dev) if b != "torch" or args.smoke]
    rows = []
    for m, n, k, ref in dense:
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        a_q, a_s = fp8.quantize_activation(a)
        b_q, b_s = fp8.quantize_weight(b)
        flops = 2 * m * n * k
        row = {"M": m, "N": n, "K": k, "deepgemm_h800_tflops": ref,
               "bf16_matmul": flops / bench(lambda: a @ b.T) / 1e12}
        for be in backends:
            try:
                t = bench(lambda: fp8.fp8_gemm(a_q, a_s, b_q, b_s, torch.bfloat16, backend=be))
                row[be] = flops / t / 1e12
            except RuntimeError as err:
                row[be] = f"unavailable: {err}"[:120]
        rows.append(row)
        print(row, flush=True)
    for e, t_e, n, k, ref in grouped:
        x = torch.randn(e * t_e, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(e, n, k, device=dev, dtype=torch.bfloat16)
        x_q, x_s = fp8.quantize_activation(x)
        w_q, w_s = fp8.quantize_weight(w)
        counts = [t_e] * e
        flops = 2 * e * t_e * n * k
        row = {"grouped": f"{e}x{t_e}", "N": n, "K": k, "deepgemm_h800_tflops": ref,
               "bf16_matmul_loop": flops / bench(
                   lambda: [x[i * t_e:(i + 1) * t_e] @ w[i].T for i in range(e)]) / 1e12}
        for be in [b for b in backends if b != "scaled_mm"]:
            t = bench(lambda: fp8.fp8_grouped_gemm(x_q, x_s, w_q, w_s, counts=counts,
                                                   backend=be))
            row[be] = flops / t / 1e12
        rows.append(row)
        print(row, flush=True)

    quant = []
    shapes = [(256, 1024)] if args.smoke else [(4096, 7168), (16384, 7168), (4096, 18432)]
    for m, k in shapes:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        moved = x.numel() * (2 + 1) + m * (k // 128) * 4          # read bf16, write e4m3 + scales
        row = {"M": m, "K": k,
               "copy_GBps": 2 * x.numel() * 2 / bench(lambda: x.clone()) / 1e9,
               "torch_quant_GBps": moved / bench(lambda: fp8.quantize_activation(x)) / 1e9}
        if fp8.triton_usable(x.device):
            from dsv3.fp8 import triton_kernels as tk
            row["triton_quant_GBps"] = moved / bench(lambda: tk.act_quant(x)) / 1e9
            row["triton_vs_copy"] = row["triton_quant_GBps"] / row["copy_GBps"]
        quant.append(row)
        print(row, flush=True)

    meta = {"benchmark": "fp8_gemm_speed",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if dev == "cuda" else
            f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "smoke": args.smoke, "backends": backends}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    name = "fp8_gemm_speed_smoke" if args.smoke else "fp8_gemm_speed"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(
        json.dumps({"meta": meta, "gemm_tflops": rows, "quantise": quant}, indent=1))
    lines = [f"# FP8 GEMM / quantise throughput — {meta['device']}", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}.", "",
             "| shape | " + " | ".join(["bf16"] + backends + ["DeepGEMM H800"]) + " |",
             "|---|" + "---|" * (len(backends) + 2)]
    for r in rows:
        shape = r.get("grouped", f"{r.get('M')}") + f"×{r['N']}×{r['K']}"
        bf = r.get("bf16_matmul", r.get("bf16_matmul_loop"))
        cells = [f"{bf:.0f}"] + [f"{r[b]:.0f}" if isinstance(r.get(b), float) else "—"
                                 for b in backends] + [str(r["deepgemm_h800_tflops"] or "—")]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    lines += ["", "| M×K | copy GB/s | torch quant GB/s | triton quant GB/s | triton/copy |",
              "|---|---|---|---|---|"]
    for q in quant:
        lines.append(f"| {q['M']}×{q['K']} | {q['copy_GBps']:.0f} | {q['torch_quant_GBps']:.0f} | "
                     f"{q.get('triton_quant_GBps', float('nan')):.0f} | "
                     f"{q.get('triton_vs_copy', float('nan')):.2f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}/{name}.{{json,md}}")


if __name__ == "__main__":
    main()
