"""Peak memory of one training step of the tiny model at 4096 tokens: MLA's attention as it runs
(``F.scaled_dot_product_attention(is_causal=True)``, which on the CPU takes the fused flash kernel and
never forms the T×T scores) against the naive T×T form (the same call forced onto SDPA's math backend:
scores, mask and probabilities materialised and kept for backward), with and without --recompute.

Each configuration runs in a fresh process; the figure is the growth of the process's peak resident
memory (ru_maxrss) over one step (forward_train + losses + backward + AdamW), after the model, the
optimizer state and a short warm-up step exist. Also checks that both forms give the same loss and
gradients. Writes benchmarks/results/long_context_memory.{json,md}.

    python benchmarks/long_context_memory.py [--seq 4096] [--batch 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def one_step(seq: int, batch: int, attention: str, recompute: bool) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import dsv3
    from dsv3.train.losses import compute_loss
    from dsv3.train.optim import AdamW, param_groups

    torch.manual_seed(0)
    cfg = dsv3.ModelConfig.preset("tiny").replace(max_position_embeddings=seq + 8)
    model = dsv3.Transformer(cfg).train()
    model.recompute = recompute
    opt = AdamW(param_groups(model, 0.1), lr=1e-3)
    D = cfg.num_nextn_predict_layers
    backend = SDPBackend.FLASH_ATTENTION if attention == "fused" else SDPBackend.MATH

    def step(T):
        w = torch.randint(0, cfg.vocab_size, (batch, T + 1 + D), generator=torch.Generator().manual_seed(T))
        with sdpa_kernel([backend]):
            loss, _ = compute_loss(model, w[:, :-1], w[:, 1:], 0.3, 1e-4)
            loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), grads

    step(64)                                       # optimizer state and allocator warmed up
    torch.manual_seed(0)
    model = dsv3.Transformer(cfg).train()          # the same weights again for the comparison
    model.recompute = recompute
    opt = AdamW(param_groups(model, 0.1), lr=1e-3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss, grads = step(seq)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"attention": attention, "recompute": recompute, "peak_growth_bytes": peak - before,
            "peak_rss_bytes": peak, "seconds": seconds, "loss": loss, "grad_sum": float(grads.double().sum()),
            "grad_norm": float(grads.double().norm())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        attention, recompute = args.child.split(":")
        print(json.dumps(one_step(args.seq, args.batch, attention, recompute == "1")))
        return
    import torch

    rows = []
    for attention in ("fused", "naive"):
        for recompute in (False, True):
            out = subprocess.run([sys.executable, __file__, "--seq", str(args.seq), "--batch", str(args.batch),
                                  "--child", f"{attention}:{int(recompute)}"], capture_output=True, text=True,
                                 check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{attention:6s} recompute={recompute!s:5s}  peak +{r['peak_growth_bytes'] / 2**20:7.0f} MiB  "
                  f"{r['seconds']:.1f} s  loss {r['loss']:.6f}", flush=True)
    by = {(r["attention"], r["recompute"]): r for r in rows}
    same = all(abs(by[("fused", rc)]["loss"] - by[("naive", rc)]["loss"]) < 1e-4
               and abs(by[("fused", rc)]["grad_norm"] / by[("naive", rc)]["grad_norm"] - 1) < 1e-4
               for rc in (False, True))
    cfg_heads = 4
    res = {"benchmark": "long_context_memory", "date": datetime.date.today().isoformat(),
           "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "preset": "tiny", "seq_len": args.seq, "batch": args.batch,
           "one_layer_scores_bytes": args.batch * cfg_heads * args.seq * args.seq * 4,
           "rows": rows, "same_loss_and_grad_norm": same}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "long_context_memory.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# One training step of the tiny model at {args.seq} tokens (batch {args.batch}): peak memory",
             "", f"{res['date']}, {res['device']}, {res['cpus']} CPUs, torch {res['torch']}. Growth of the "
             "process's peak RSS over one step (forward_train + losses + backward + AdamW).", "",
             "| attention | recompute | peak growth | step time | loss |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'fused SDPA (flash, no T×T)' if r['attention'] == 'fused' else 'naive T×T (SDPA math)'} "
                     f"| {'on' if r['recompute'] else 'off'} | {r['peak_growth_bytes'] / 2**20:,.0f} MiB "
                     f"| {r['seconds']:.1f} s | {r['loss']:.6f} |")
    lines += ["", f"One layer's fp32 scores alone: {res['one_layer_scores_bytes'] / 2**20:,.0f} MiB "
              f"(batch × 4 heads × T²); both forms give the same loss and gradient norm: {same}."]
    with open(os.path.join(HERE, "results", "long_context_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
