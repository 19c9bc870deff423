"""Training-step throughput of dsv3's model vs transformers' DeepseekV3ForCausalLM.

Same config, same weights (the transformers model is loaded from a checkpoint dsv3 writes), same
process, same device and dtype. One step = forward + next-token cross-entropy + backward
(gradients zeroed between steps, no optimizer). The two models alternate step by step, so a
neighbour's load on a shared machine hits both alike; the median step time of each gives tokens/s.

    python benchmarks/model_vs_transformers.py [--config tiny] [--batch 8] [--seq 256]
        [--warmup 3] [--iters 10] [--threads 1] [--device cpu] [--profile]

Writes ``benchmarks/results/model_vs_transformers.json`` (device, versions, date, tokens/s, ratio)
and a profile of one step of each, split into GEMMs, attention, cross-entropy and everything else:
the first three run the same kernels in both implementations, so their sum bounds the ratio.
transformers is run with its defaults (SDPA attention, ``grouped_mm`` experts), plus its ``eager``
experts loop for reference. dsv3 runs without MTP in this comparison (transformers has none).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dsv3

OUT = Path(__file__).resolve().parent / "results" / "model_vs_transformers.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _markdown(r: dict) -> str:
    rows = "\n".join(f"| {k} | {r['tokens_per_s'][k]:,.0f} | {r['median_step_s'][k] * 1e3:.1f} | "
                      f"{r['loss'][k]:.5f} |" for k in r["tokens_per_s"])
    prof = "\n".join(f"| {k} | " + " | ".join(f"{v * 1e3:.1f}" for v in b.values()) + " |"
                      for k, b in r["profile_self_cpu_s"].items())
    cats = " | ".join(next(iter(r["profile_self_cpu_s"].values())))
    return f"""# dsv3 vs transformers DeepseekV3ForCausalLM (benchmarks/model_vs_transformers.py)

{r['date']}, {r['device']}, torch {r['torch']}, transformers {r['transformers']}; config `{r['config']}`
(no MTP), {r['dtype']}, batch {r['batch']} × {r['seq']} tokens; {r['step']}; same weights;
median of {r['iters']} alternating steps after {r['warmup']} warm-up steps.

| model | tokens/s | median step (ms) | loss |
|---|---|---|---|
{rows}

**dsv3 / transformers (defaults: {r['transformers_defaults']['attn_implementation']} attention, grouped_mm
experts): {r['ratio']:.2f}×** (vs its eager experts loop: {r['ratio_vs_transformers_eager_experts']:.2f}×).

Self CPU time of one profiled step (ms):

| model | {cats} |
|---|---|---|---|---|
{prof}

Both spend most of the step in the same BLAS GEMMs (projections, experts, the LM head) and in
attention (dsv3: SDPA's causal flash kernel; transformers passes an explicit mask, so SDPA runs its
math path as bmm + softmax, counted under gemm/attention above) and cross-entropy. transformers 5
already runs the experts as torch._grouped_mm and attention through SDPA, so on this config there is
no structural overhead left to remove: even if dsv3 spent no time at all outside GEMMs, attention
and cross-entropy, the ratio could reach only {r['ratio_bound_if_other_were_free']:.2f}×. The 2× target
is out of reach on CPU without kernels that do less work than these (e.g. a fused LM head +
cross-entropy, or fused MLA attention).
"""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(fn, params, tokens):
    for p in params:
        p.grad = None
    logits = fn(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach()


_CATEGORIES = {
    "gemm": ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::_softmax", "aten::_softmax_backward_data",
                  "aten::_flash_attention", "aten::_efficient_attention"),
    "cross_entropy": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss"),
}


def _categorise(events) -> dict:
    """Self CPU seconds per category (GEMMs and attention / CE kernels are the same in both models)."""
    out = {c: 0.0 for c in (*_CATEGORIES, "other")}
    for e in events:
        cat = next((c for c, prefixes in _CATEGORIES.items() if e.key.startswith(prefixes)), "other")
        out[cat] += e.self_cpu_time_total / 1e6
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a small shared VM more threads add barrier waits and noise)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables of one step each")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    import transformers
    from transformers import DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    cfg = dsv3.ModelConfig.load(args.config).replace(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ours = dsv3.Transformer(cfg)
    with torch.no_grad():   # nonzero selection biases, as after some training
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.01)
    with tempfile.TemporaryDirectory() as d:
        dsv3.save_pretrained(ours, d)
        theirs = {impl: DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, experts_implementation=impl)
                  for impl in ("grouped_mm", "eager")}
    models = {"dsv3": ours, **{f"transformers[{k}]": m for k, m in theirs.items()}}
    for m in models.values():
        m.to(device=device, dtype=dtype).train()
    for moe in ours.moe_layers():                       # keep the selection bias fp32 (as saved)
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    fns = {"dsv3": ours}
    fns.update({k: (lambda m: lambda t: m(t).logits)(m) for k, m in models.items() if k != "dsv3"})
    params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    ntok = args.batch * args.seq

    # same weights → same loss (a check that we time the same computation)
    losses = {k: _step(fns[k], params[k], tokens).item() for k in models}
    for k in models:
        if abs(losses[k] - losses["dsv3"]) > 1e-3 * abs(losses["dsv3"]) and dtype == torch.float32:
            raise SystemExit(f"losses differ: {losses}")

    for _ in range(args.warmup):
        for k in models:
            _step(fns[k], params[k], tokens)
    times = {k: [] for k in models}
    for _ in range(args.iters):
        for k in models:
            _sync(device)
            t0 = time.perf_counter()
            _step(fns[k], params[k], tokens)
            _sync(device)
            times[k].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: ntok / v for k, v in med.items()}
    base = "transformers[grouped_mm]"
    result = {
        "benchmark": "model_vs_transformers",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({_cpu_name()}, {torch.get_num_threads()} torch threads)"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "config": args.config,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_step": ntok,
        "warmup": args.warmup,
        "iters": args.iters,
        "step": "forward + cross-entropy + backward (no optimizer)",
        "transformers_defaults": {"attn_implementation": theirs["grouped_mm"].config._attn_implementation,
                                  "experts_implementation": "grouped_mm"},
        "loss": losses,
        "median_step_s": med,
        "all_step_s": times,
        "tokens_per_s": tps,
        "dsv3_tokens_per_s": tps["dsv3"],
        "transformers_tokens_per_s": tps[base],
        "ratio": tps["dsv3"] / tps[base],
        "ratio_vs_transformers_eager_experts": tps["dsv3"] / tps["transformers[eager]"],
    }
    print(f"{args.config} B={args.batch} T={args.seq} {args.dtype} on {result['device']}")
    for k in models:
        print(f"  {k:26s} {tps[k]:10.0f} tokens/s   median step {med[k] * 1e3:8.1f} ms")
    print(f"  ratio dsv3 / transformers (defaults): {result['ratio']:.2f}x")

    # where the time goes: one profiled step of each
    from torch.profiler import ProfilerActivity, profile

    breakdown = {}
    for k in ("dsv3", base):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _step(fns[k], params[k], tokens)
        breakdown[k] = _categorise(prof.key_averages())
        if args.profile:
            print(f"--- {k}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    shared = sum(v for c, v in breakdown["dsv3"].items() if c != "other")
    result["profile_self_cpu_s"] = breakdown
    result["ratio_bound_if_other_were_free"] = (
        sum(breakdown[base].values()) / shared if shared else None)
    for k, b in breakdown.items():
        tot = sum(b.values())
        print(f"  {k:26s} " + "  ".join(f"{c} {v / tot:5.1%}" for c, v in b.items()))
    print(f"  bound on the ratio if dsv3 spent nothing outside GEMM/attention/cross-entropy: "
          f"{result['ratio_bound_if_other_were_free']:.2f}x")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    return result


if __name__ == "__main__":
    main()
