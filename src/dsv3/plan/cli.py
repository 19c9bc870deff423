"""``dsv3 plan``: size a training run (default) or the serving units for a cluster.

    dsv3 plan --model deepseek-v3 --gpu h800 --gpus 2048 --pp 16 --ep 64 --tokens 14.8T \\
              --seq-len 4096 --batch-size 15360 --precision fp8 --schedule dualpipe
    dsv3 plan --mode serve --gpu h800 [--unit prefill|decode|both] [--json]
    dsv3 plan ... --assume fp8_gemm_efficiency=0.5 --assume goodput=1   # any Assumptions field
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

from ..config import ModelConfig
from .assumptions import Assumptions
from .hardware import Cluster, get_gpu
from .schedules import SCHEDULES
from .serve import REPORT_UNITS, ServeUnit, plan_serving
from .train import Layout, plan_training

_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> float:
    """'14.8T' -> 1.48e13; also K, M, B (or G), plain numbers and 1e12."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a token count (e.g. 14.8T, 500B, 1e12)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"--tokens {text}: not a finite number")
    if value <= 0:
        raise ValueError(f"token count must be positive, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("train", "serve"), default="train")
    p.add_argument("--model", default="deepseek-v3", help="preset name or HF config.json / directory")
    p.add_argument("--gpu", default="h800", help="GPU kind from the catalogue (h800, h100, h200, a100, b200, …)")
    p.add_argument("--hardware-file", help="JSON/YAML file adding or replacing GPU kinds")
    p.add_argument("--gpus", type=int, default=2048, help="total GPUs (whole nodes)")
    p.add_argument("--pp", type=int, default=16, help="pipeline-parallel ranks")
    p.add_argument("--ep", type=int, default=64, help="expert-parallel GPUs (inside each stage's DP group)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism (training: 1 only)")
    p.add_argument("--tokens", default="14.8T", help="training tokens, e.g. 14.8T")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=15360, help="global batch in sequences")
    mb = p.add_mutually_exclusive_group()
    mb.add_argument("--micro-batch-size", type=int, default=None, help="sequences per micro-batch (default 1)")
    mb.add_argument("--microbatches", type=int, default=None, help="micro-batches per pipeline per step")
    p.add_argument("--precision", choices=("fp8", "bf16"), default="fp8")
    p.add_argument("--schedule", choices=SCHEDULES, default="dualpipe")
    p.add_argument("--recompute", choices=("report", "none", "full"), default="report",
                   help="report: RMSNorm + MLA up-projections + SwiGLU output recomputed")
    p.add_argument("--zero", type=int, choices=(0, 1), default=1, help="ZeRO stage for the optimizer state")
    p.add_argument("--routing-groups", type=int, default=None,
                   help="groups (nodes) a token may use; default the model's topk_group")
    p.add_argument("--no-node-limit", action="store_true", help="unrestricted routing (M = n_group)")
    p.add_argument("--layer-split", default=None, help="blocks per stage, comma-separated (layers + MTP)")
    p.add_argument("--price", type=float, default=None, help="dollars per GPU-hour (default 2)")
    p.add_argument("--assume", action="append", default=[], metavar="NAME=VALUE",
                   help="override an Assumptions field (repeatable); see docs/planner.md")
    p.add_argument("--unit", choices=("prefill", "decode", "both"), default="both", help="serve: which unit")
    p.add_argument("--no-mtp", action="store_true", help="serve: drop the MTP module")
    p.add_argument("--json", action="store_true", help="machine-readable output")


# flags that only one --mode reads (the rest apply to both)
SERVE_ONLY = ("unit", "no_mtp")
TRAIN_ONLY = ("gpus", "pp", "ep", "tp", "tokens", "seq_len", "batch_size", "micro_batch_size", "microbatches",
              "precision", "schedule", "recompute", "zero", "routing_groups", "no_node_limit", "layer_split",
              "price")    # serving plans report throughput, not dollars


def _mode_mismatch(args) -> str | None:
    """The first flag set away from its default that ``args.mode`` does not read, as ``--flag``."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    defaults = vars(p.parse_args([]))
    for name in TRAIN_ONLY if args.mode == "serve" else SERVE_ONLY:
        if getattr(args, name) != defaults[name]:
            return "--" + name.replace("_", "-")
    return None


def check_args(args) -> None:
    """Flag values no plan can use (a UserError naming the flag)."""
    from ..errors import UserError, check_finite, check_int

    flag = _mode_mismatch(args)
    if flag is not None:
        other = "train" if args.mode == "serve" else "serve"
        what = ("plans the report's prefill and decode units (choose with --unit)" if args.mode == "serve"
                else "plans a training run")
        raise UserError(f"{flag} only applies to --mode {other}; --mode {args.mode} {what}")
    if args.no_node_limit and args.routing_groups is not None:
        raise UserError(f"--routing-groups {args.routing_groups} and --no-node-limit contradict each other: "
                        f"--no-node-limit lets a token use every group")
    if args.price is not None:
        check_finite("--price", args.price, lo=0)
    if args.micro_batch_size is not None:
        check_int("--micro-batch-size", args.micro_batch_size, lo=1)


def _assumptions(args) -> Assumptions:
    a = Assumptions().with_overrides(args.assume)
    if args.price is not None:
        a = a.replace(dollars_per_gpu_hour=args.price)
    return a


def build_layout(args, cfg: ModelConfig) -> Layout:
    if args.pp < 1 or args.gpus < 1:
        raise ValueError("--pp and --gpus must be positive")
    if args.gpus % args.pp:
        raise ValueError(f"{args.gpus} GPUs do not split into PP {args.pp} stages (PP must divide the GPU count)")
    dp = args.gpus // (args.pp * max(args.tp, 1))
    micro = args.micro_batch_size or 1
    if args.microbatches is not None:
        if args.microbatches < 1 or args.batch_size % (dp * args.microbatches):
            raise ValueError(f"batch size {args.batch_size} is not {args.microbatches} micro-batches on each "
                             f"of DP = {dp} pipelines")
        micro = args.batch_size // (dp * args.microbatches)
    topk_group = cfg.n_group if args.no_node_limit else args.routing_groups
    split = None
    if args.layer_split:
        try:
            split = tuple(int(x) for x in args.layer_split.split(","))
        except ValueError:
            raise ValueError(f"--layer-split wants comma-separated integers, got {args.layer_split!r}") from None
    return Layout(gpus=args.gpus, pp=args.pp, ep=args.ep, tp=args.tp, seq_len=args.seq_len,
                  global_batch=args.batch_size, micro_batch=micro, schedule=args.schedule,
                  precision=args.precision, recompute=args.recompute, zero=args.zero,
                  topk_group=topk_group, layer_split=split)


def run(args) -> int:
    check_args(args)
    cfg = ModelConfig.load(args.model)
    gpu = get_gpu(args.gpu, args.hardware_file)
    a = _assumptions(args)
    if args.mode == "serve":
        units = ("prefill", "decode") if args.unit == "both" else (args.unit,)
        res = {"mode": "serve", "model": args.model, "gpu": gpu.to_dict(), "assumptions": a.to_dict(),
               "units": {u: plan_serving(cfg, gpu, REPORT_UNITS[u], a, mtp=not args.no_mtp) for u in units}}
        res["memory_per_gpu_gb"] = max(r["memory_per_gpu_gb"] for r in res["units"].values())
        if args.json:
            print(json.dumps(res, indent=2, default=_json_default))
        else:
            print(format_serve(res))
        return 0
    cluster = Cluster.of_gpus(gpu, args.gpus)
    lay = build_layout(args, cfg)
    res = plan_training(cfg, cluster, lay, a, tokens=parse_count(args.tokens), model_name=args.model)
    res["gpu"] = gpu.to_dict()
    if args.json:
        print(json.dumps(res, indent=2, default=_json_default))
    else:
        print(format_train(res))
    for w in res["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _json_default(o):
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return None
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, ServeUnit):
        return o.__dict__
    return str(o)


# --------------------------------------------------------------------------- human tables
def _si(x: float, unit: str = "") -> str:
    for div, suf in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suf}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join([title, "-" * len(title)] + [f"  {k:<{w}}  {v}" for k, v in rows]) + "\n"


def format_train(r: dict) -> str:
    L, s, f = r["layout"], r["schedule"], r["flops"]
    a = r["assumptions"]
    out = [_table("Inputs", [
        ("model", r["model"]), ("cluster", f"{L['cluster']['gpus']} x {L['cluster']['gpu']} "
                                           f"({L['cluster']['nodes']} nodes x {L['cluster']['gpus_per_node']})"),
        ("parallelism", f"PP {L['pp']} x DP {L['dp']} (EP {L['ep']} over {L['ep_nodes']} node(s), "
                        f"{L['experts_per_gpu']} experts/GPU, TP {L['tp']}), ZeRO-{L['zero']}"),
        ("schedule", f"{s['name']}: {L['microbatches_per_step']} micro-batches of {L['micro_batch']} x "
                     f"{L['seq_len']} tokens per pipeline per step"),
        ("stage split", ",".join(map(str, r["stage_split"]["blocks_per_stage"])) + " blocks (layers + MTP)"),
        ("batch", f"{L['global_batch']} sequences = {_si(L['tokens_per_step'])} tokens per step"),
        ("precision / recompute", f"{L['precision']} / {L['recompute']}"),
        ("routing", r["communication"]["ep_all_to_all"]["routing"] if r["communication"]["ep_all_to_all"] else "dense"),
        ("efficiencies", f"fp8 GEMM {a['fp8_gemm_efficiency']}, bf16 GEMM {a['bf16_gemm_efficiency']}, "
                         f"attention {a['attention_efficiency']}, HBM {a['hbm_efficiency']}, "
                         f"IB {a['ib_efficiency']}, NVLink {a['nvlink_efficiency']}"),
        ("", f"comm SMs {a['comm_sms']}, expert imbalance {a['expert_load_imbalance']}, "
             f"goodput {a['goodput']}, DP overlap {a['dp_comm_overlap']}"),
    ])]
    fb = f["forward_breakdown"]
    out.append(_table("Work per token", [
        ("forward FLOPs", f"{_si(f['forward'], 'FLOP')} (linears {_si(fb['fp8_capable_linears'])}, "
                          f"gate+head {_si(fb['bf16_linears (gate, head)'])}, attention {_si(fb['attention_core'])})"),
        ("model FLOPs (3x fwd)", _si(f["model_flops_per_token"], "FLOP")),
    ]))
    m = r["memory"]
    rows = [(k, f"{v:7.2f} GB") for k, v in m["breakdown_gb"].items()]
    rows.append(("total", f"{r['memory_per_gpu_gb']:7.2f} GB of {r['memory_capacity_gb']:g} GB"
                          + ("  ** OVER CAPACITY **" if r["over_capacity"] else "")))
    out.append(_table(f"Memory per GPU (worst: pipeline rank {m['worst_rank']})", rows))
    c = r["communication"]
    rows = []
    ep = c["ep_all_to_all"]
    if ep:
        rows += [("nodes / GPUs per token", f"{ep['nodes_per_token']:.2f} / {ep['gpus_per_token']:.2f}"
                                            f" (remote nodes {ep['remote_nodes_per_token']:.2f})"),
                 ("EP bytes/token/layer (fwd)", f"IB {_si(ep['ib_bytes_per_token'], 'B')}, "
                                                 f"NVLink {_si(ep['nvlink_bytes_per_token'], 'B')}"),
                 ("EP bytes/GPU/step", f"IB {_si(ep['per_gpu_per_step_slowest_rank']['ib_bytes'], 'B')}, "
                                        f"NVLink {_si(ep['per_gpu_per_step_slowest_rank']['nvlink_bytes'], 'B')}")]
    rows += [("pipeline p2p bytes/GPU/step", _si(c["pipeline_p2p"]["bytes_per_gpu_per_step"], "B")),
             ("DP RS+AG bytes/GPU/step", _si(c["dp"]["bytes_per_gpu_per_step_worst_rank"], "B"))]
    out.append(_table("Communication", rows))
    st = r["step_time"]
    rows = [(k, f"{v:8.3f} s") for k, v in st["breakdown_s"].items()]
    out.append(_table(f"Step time (slowest: pipeline rank {st['slowest_rank']})", rows))
    rows = [("MFU", f"{100 * r['mfu']:.1f}% of {L['precision']} peak ({100 * r['mfu_vs_bf16_peak']:.1f}% of BF16 peak)"),
            ("throughput", f"{_si(r['tokens_per_second'])} tokens/s ({r['tokens_per_second_per_gpu']:.0f} per GPU)"),
            ("GPU-hours per 1T tokens", f"{r['gpu_hours_per_trillion_tokens'] / 1e3:.1f}K"),
            (f"{_si(r['tokens'])} tokens", f"{r['gpu_hours_total'] / 1e6:.3f}M GPU-hours, {r['days']:.1f} days, "
                                           f"${r['dollars'] / 1e6:.2f}M")]
    ref = r.get("reference")
    if ref:
        rows += [("report (DeepSeek-V3)", f"180K GPU-hours per 1T tokens; 2.664M for 14.8T "
                                          f"(planner/report = {ref['ratio_to_report']:.3f})"),
                 ("report implies", f"MFU {100 * ref['implied_mfu_fp8_peak']:.1f}% of FP8 peak "
                                    f"({100 * ref['implied_mfu_bf16_peak']:.1f}% of BF16) over wall-clock")]
    out.append(_table("Result", rows))
    return "\n".join(out)


def format_serve(res: dict) -> str:
    out = []
    for name, r in res["units"].items():
        u = r["unit"]
        rows = [("unit", f"{u['nodes']} nodes / {r['gpus']} GPUs, attention TP{u['tp']}, EP{u['ep']}, "
                         f"{r['experts_per_gpu']} expert(s) per GPU per layer")]
        rows += [(k, f"{v:7.2f} GB") for k, v in r["memory_breakdown_gb"].items()]
        rows.append(("KV cache", f"{r['kv_cache_bytes_per_token']:,.0f} B/token, "
                                 f"{r['kv_capacity_tokens_per_gpu'] / 1e3:.0f}K tokens per GPU"))
        if name == "prefill":
            rows += [("bound", r["bound"]),
                     ("computed tokens/s/node", f"{r['tokens_per_s_per_node'] / 1e3:.1f}K"),
                     ("input tokens/s/node", f"{r['input_tokens_per_s_per_node_incl_cache_hits'] / 1e3:.1f}K incl. "
                                             f"cache hits; published 73.7K = {100 * r['published_fraction_of_bound']:.0f}% of bound")]
        else:
            rows += [("batch per attention group", f"{r['batch_per_attention_group']} sequences of "
                                                   f"{r['context_tokens']} tokens"),
                     ("step", f"{1e3 * r['step_s']['step']:.1f} ms ({r['bound']} bound; memory "
                              f"{1e3 * r['step_s']['memory']:.1f}, compute {1e3 * r['step_s']['compute']:.1f}, "
                              f"IB {1e3 * r['step_s']['infiniband']:.1f} ms)"),
                     ("output tokens/s/node", f"{r['tokens_per_s_per_node'] / 1e3:.1f}K; published 14.8K = "
                                              f"{100 * (r['published_fraction_of_bound'] or 0):.0f}% of bound")]
        out.append(_table(f"Serving: {name}", rows))
    return "\n".join(out)
