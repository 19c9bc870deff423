"""Activation memory saved by recomputing RMSNorm + the MLA up-projections in backward (SPEC §2.4).

Counts the bytes autograd keeps for backward (unique storages of saved tensors) for one
forward_train of the same model and batch with ``model.recompute`` off and on, and checks that the
loss and gradients are identical. Writes benchmarks/results/train_recompute_memory.json.

    python benchmarks/train_recompute_memory.py [--preset tiny] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch

import dsv3
from dsv3.train.losses import compute_loss


def saved_bytes(model, inputs, targets) -> tuple[int, torch.Tensor, list]:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = compute_loss(model, inputs, targets, 0.3, 1e-4)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return total, loss.detach(), grads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = dsv3.ModelConfig.preset(args.preset)
    model = dsv3.Transformer(cfg).train()
    D = cfg.num_nextn_predict_layers
    window = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1 + D))
    inputs, targets = window[:, :-1], window[:, 1:]
    base, loss0, g0 = saved_bytes(model, inputs, targets)
    model.recompute = True
    reco, loss1, g1 = saved_bytes(model, inputs, targets)
    same = bool(loss0 == loss1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    res = {
        "benchmark": "train_recompute_memory", "date": datetime.date.today().isoformat(),
        "device": platform.processor() or platform.machine(), "torch": torch.__version__,
        "preset": args.preset, "batch": args.batch, "seq_len": args.seq,
        "saved_activation_bytes": {"stored": base, "recompute": reco},
        "saving_ratio": 1 - reco / base, "loss_and_grads_identical": same,
    }
    print(json.dumps(res, indent=1))
    out = os.path.join(os.path.dirname(__file__), "results", "train_recompute_memory.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
