"""What-if tables for docs/planner.md, regenerated from the planner itself.

    python -m dsv3.plan.whatif                      # print the markdown
    python -m dsv3.plan.whatif --update docs/planner.md   # rewrite the generated blocks in place

Every row changes one thing of the report's setup (DeepSeek-V3, 2048 H800, PP16, EP64 over 8 nodes,
ZeRO-1, FP8, DualPipe, 4K sequences, 15360 sequences per step) and keeps the default Assumptions.
"""

from __future__ import annotations

import argparse
import re
import sys

from ..config import ModelConfig
from .assumptions import Assumptions
from .hardware import Cluster, get_gpu
from .serve import plan_serving
from .train import Layout, plan_training

BASE = dict(gpus=2048, pp=16, ep=64, seq_len=4096, global_batch=15360, micro_batch=1,
            schedule="dualpipe", precision="fp8", recompute="report")

SECTIONS = [
    ("Pipeline schedule", [
        ("DualPipe (report)", {}),
        ("1F1B", {"schedule": "1f1b"}),
        ("ZB1P", {"schedule": "zb1p"}),
        ("DualPipeV", {"schedule": "dualpipev"}),
    ]),
    ("Precision", [
        ("FP8 (report)", {}),
        ("BF16", {"precision": "bf16"}),
        ("BF16, 1F1B", {"precision": "bf16", "schedule": "1f1b"}),
    ]),
    ("Routing", [
        ("node-limited M=4 (report)", {}),
        ("unrestricted (M=8)", {"topk_group": 8}),
        ("node-limited M=4, 1F1B", {"schedule": "1f1b"}),
        ("unrestricted (M=8), 1F1B", {"topk_group": 8, "schedule": "1f1b"}),
    ]),
    ("Expert parallelism", [
        ("EP64 over 8 nodes (report)", {}),
        ("EP32 over 4 nodes", {"ep": 32}),
        ("EP128 over 16 nodes", {"ep": 128}),
        ("EP32, 1F1B", {"ep": 32, "schedule": "1f1b"}),
    ]),
]

SENSITIVITY = [
    ("defaults", {}),
    ("fp8_gemm_efficiency 0.45", {"fp8_gemm_efficiency": 0.45}),
    ("fp8_gemm_efficiency 0.65", {"fp8_gemm_efficiency": 0.65}),
    ("attention_efficiency 0.50", {"attention_efficiency": 0.50}),
    ("expert_load_imbalance 1.0", {"expert_load_imbalance": 1.0}),
    ("expert_load_imbalance 1.2", {"expert_load_imbalance": 1.2}),
    ("dp_comm_overlap 1.0", {"dp_comm_overlap": 1.0}),
    ("goodput 1.0", {"goodput": 1.0}),
]


def _run(layout_changes: dict, assumption_changes: dict | None = None) -> dict:
    cfg = ModelConfig.preset("deepseek-v3")
    cluster = Cluster.of_gpus(get_gpu("h800"), BASE["gpus"])
    return plan_training(cfg, cluster, Layout(**{**BASE, **layout_changes}),
                         Assumptions(**(assumption_changes or {})))


def _pct(x: float, base: float) -> str:
    return "—" if abs(x - base) < 1e-9 * max(1.0, abs(base)) else f"{100 * (x / base - 1):+.1f}%"


def whatif_tables() -> str:
    base = _run({})
    bt, bm = base["step_time_s"], base["memory_per_gpu_gb"]
    lines = []
    for title, rows in SECTIONS:
        lines += [f"#### {title}", "",
                  "| variant | step time (s) | Δ step | bubble (s) | exposed comm (s) | memory/GPU (GB) | Δ memory "
                  "| fits 80 GB | GPU-h per 1T | MFU (fp8 peak) |",
                  "|---|---:|---:|---:|---:|---:|---:|:---:|---:|---:|"]
        for name, ch in rows:
            r = _run(ch)
            b = r["step_time"]["breakdown_s"]
            lines.append(
                f"| {name} | {r['step_time_s']:.2f} | {_pct(r['step_time_s'], bt)} | {b['bubble']:.2f} | "
                f"{b['exposed_ep_and_p2p']:.2f} | {r['memory_per_gpu_gb']:.1f} | {_pct(r['memory_per_gpu_gb'], bm)} | "
                f"{'no' if r['over_capacity'] else 'yes'} | {r['gpu_hours_per_trillion_tokens'] / 1e3:.0f}K | "
                f"{100 * r['mfu_vs_fp8_peak']:.1f}% |")
        lines.append("")
    # all-to-all traffic, node-limited vs unrestricted
    lines += ["#### All-to-all traffic per token and MoE layer (forward; backward the same)", "",
              "| routing | EP | nodes/token | remote nodes (IB copies) | GPUs/token | IB bytes | NVLink bytes |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, ch in (("node-limited M=4", {}), ("unrestricted", {"topk_group": 8}),
                     ("node-limited M=4", {"ep": 32}), ("unrestricted", {"ep": 32, "topk_group": 8})):
        ep = _run(ch)["communication"]["ep_all_to_all"]
        lines.append(f"| {name} | {ep['ep']} | {ep['nodes_per_token']:.2f} | {ep['remote_nodes_per_token']:.2f} | "
                     f"{ep['gpus_per_token']:.2f} | {ep['ib_bytes_per_token'] / 1e3:.1f} KB | "
                     f"{ep['nvlink_bytes_per_token'] / 1e3:.1f} KB |")
    lines.append("")
    return "\n".join(lines)


def sensitivity_table() -> str:
    lines = ["| assumption changed | GPU-h per 1T | vs 180K | MFU (fp8 peak) |", "|---|---:|---:|---:|"]
    for name, ch in SENSITIVITY:
        r = _run({}, ch)
        g = r["gpu_hours_per_trillion_tokens"]
        lines.append(f"| {name} | {g / 1e3:.1f}K | {100 * (g / 180e3 - 1):+.1f}% | {100 * r['mfu_vs_fp8_peak']:.1f}% |")
    return "\n".join(lines) + "\n"


def headline_table() -> str:
    r = _run({})
    ref = r["reference"]
    b = r["step_time"]["breakdown_s"]
    m = r["memory"]["breakdown_gb"]
    rows = [
        ("GPU-hours per 1T tokens", f"{r['gpu_hours_per_trillion_tokens'] / 1e3:.1f}K (report 180K, "
                                    f"{100 * (ref['ratio_to_report'] - 1):+.1f}%)"),
        ("14.8T tokens", f"{ref['planner_gpu_hours_14.8T'] / 1e6:.3f}M GPU-hours (report 2.664M), "
                         f"{r['days']:.1f} days, ${r['dollars'] / 1e6:.2f}M"),
        ("step time", f"{r['step_time_s']:.2f} s = compute {b['compute']:.2f} + bubble {b['bubble']:.2f} + "
                      f"exposed EP/p2p {b['exposed_ep_and_p2p']:.2f} + DP {b['dp_comm_exposed']:.2f} + "
                      f"optimizer {b['optimizer']:.3f}"),
        ("throughput", f"{r['tokens_per_second'] / 1e6:.2f}M tokens/s, {r['tokens_per_second_per_gpu']:.0f} per GPU"),
        ("MFU", f"{100 * r['mfu']:.1f}% of FP8 peak, {100 * r['mfu_vs_bf16_peak']:.1f}% of BF16 peak (in steps)"),
        ("180K implies", f"{100 * ref['implied_mfu_fp8_peak']:.1f}% of FP8 peak ({100 * ref['implied_mfu_bf16_peak']:.1f}% "
                         f"of BF16) over wall-clock; {100 * ref['implied_step_mfu_fp8_peak_at_goodput']:.1f}% of FP8 "
                         f"peak inside steps at goodput {r['assumptions']['goodput']}"),
        ("memory per GPU", f"{r['memory_per_gpu_gb']:.1f} GB of 80 (rank {r['memory']['worst_rank']}): "
                           + ", ".join(f"{k} {v:.1f}" for k, v in m.items())),
        ("model FLOPs per token", f"{r['flops']['model_flops_per_token'] / 1e9:.1f} GFLOP "
                                  f"(forward {r['flops']['forward'] / 1e9:.1f})"),
    ]
    cfg = ModelConfig.preset("deepseek-v3")
    gpu = get_gpu("h800")
    pre, dec = plan_serving(cfg, gpu, "prefill"), plan_serving(cfg, gpu, "decode")
    rows += [
        ("prefill unit (EP32, 9 experts/GPU)", f"{pre['memory_per_gpu_gb']:.1f} GB weights+workspace per GPU; bound "
                                               f"{pre['input_tokens_per_s_per_node_incl_cache_hits'] / 1e3:.0f}K input "
                                               f"tokens/s/node incl. cache hits ({pre['bound']}); published 73.7K = "
                                               f"{100 * pre['published_fraction_of_bound']:.0f}%"),
        ("decode unit (EP320, 1 expert/GPU)", f"{dec['memory_per_gpu_gb']:.1f} GB weights+workspace per GPU; bound "
                                              f"{dec['tokens_per_s_per_node'] / 1e3:.1f}K output tokens/s/node "
                                              f"({dec['bound']}); published 14.8K = "
                                              f"{100 * dec['published_fraction_of_bound']:.0f}%"),
    ]
    return "\n".join(["| quantity | planner |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]) + "\n"


def assumptions_table() -> str:
    lines = ["| name | default | why |", "|---|---:|---|"]
    for name, (default, why) in Assumptions.explain().items():
        lines.append(f"| `{name}` | {default} | {why} |")
    return "\n".join(lines) + "\n"


BLOCKS = {"headline": headline_table, "whatif": whatif_tables, "sensitivity": sensitivity_table,
          "assumptions": assumptions_table}


def update(path: str) -> None:
    with open(path) as f:
        text = f.read()
    for name, fn in BLOCKS.items():
        pat = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pat.search(text):
            raise ValueError(f"{path} has no <!-- {name}:begin --> ... <!-- {name}:end --> block")
        body = fn()
        text = pat.sub(lambda m: m.group(1) + body + m.group(2), text)
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3.plan.whatif", description=__doc__.splitlines()[0])
    p.add_argument("--update", metavar="MARKDOWN", help="rewrite the generated blocks of this file")
    args = p.parse_args(argv)
    if args.update:
        update(args.update)
        return 0
    for name, fn in BLOCKS.items():
        print(f"<!-- {name} -->\n{fn()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
