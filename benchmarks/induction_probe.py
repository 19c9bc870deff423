"""Can the tiny model learn to copy, and how fast? The question behind passkey retrieval (README, Long context).

Passkey retrieval is copying: after "The pass key is" the model must repeat the digits it saw earlier.
A transformer does that with an induction circuit (one head marks each token with its predecessor, a
later head finds the earlier occurrence of the current token and reads what followed it). This probe
trains on documents that can only be predicted by copying — a random span of ordinary token ids, then
the same span again — and measures the accuracy of the argmax on the repeated tokens:

* ``fixed``: every span has the same length (half the window), so "look exactly half a window back"
  solves it — a head can learn that from the rotary position alone, no induction needed;
* ``varying``: each document's span length is drawn from [4, window/2], so only content-based copying
  (an induction circuit) solves it, as passkey retrieval needs.

Each case is a plain AdamW loop (lr constant after no warmup, weight decay 0.1, clip 1.0, batch 32) from a
fresh model or the quickstart model, with Adam's β2 = 0.95 (DeepSeek-V3's, dsv3 train's) or 0.999::

    python benchmarks/induction_probe.py [--model runs/tiny/final] [--steps 500] [--out benchmarks/results]
    python benchmarks/induction_probe.py --case quickstart:varying:0.999:1e-3 --steps 3000 --out DIR   # one case, longer
    python benchmarks/induction_probe.py --measure RUN/final --measure RUN/checkpoints/step-00001000 --window 64
        # no training: the copy accuracy of models (HF-layout or checkpoint directories) on held-out
        # varying-span documents (--batch × 4 of them, the same for every model), as JSON lines
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import dsv3
from dsv3.hf import load_pretrained

CASES = [  # (start, spans, beta2, lr)
    ("fresh", "fixed", 0.999, 1e-3),
    ("fresh", "fixed", 0.95, 1e-3),
    ("fresh", "fixed", 0.95, 3e-3),
    ("quickstart", "fixed", 0.999, 1e-3),
    ("quickstart", "varying", 0.999, 1e-3),
    ("quickstart", "varying", 0.999, 3e-3),
]


def copy_batch(rng: np.random.Generator, rows: int, window: int, spans: str, vocab: tuple[int, int]):
    """[rows, window] documents (span, span, … truncated) and the mask of positions whose next token is a
    repeat, i.e. predictable only by copying."""
    docs, mask = [], []
    for _ in range(rows):
        k = window // 2 if spans == "fixed" else int(rng.integers(4, window // 2 + 1))
        span = rng.integers(vocab[0], vocab[1], size=k)
        docs.append(np.tile(span, window // k + 2)[:window + 1])
        m = np.zeros(window, dtype=bool)
        m[k - 1:] = True                                 # predicting token k onwards: a copy
        mask.append(m)
    return torch.from_numpy(np.stack(docs)), torch.from_numpy(np.stack(mask))


def run_case(start, spans, beta2, lr, args, cfg_source):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if start == "quickstart":
        model = load_pretrained(args.model)
    else:
        model = dsv3.Transformer(dsv3.ModelConfig.from_hf(cfg_source))
    model.train()
    vocab = (3, model.cfg.vocab_size - 16)               # past bos/eos/pad, before the reserved ids
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.1)
    curve, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        docs, mask = copy_batch(rng, args.batch, args.window, spans, vocab)
        logits = model(docs[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), docs[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % args.every == 0 or step == args.steps:
            acc = (logits.argmax(-1) == docs[:, 1:])[mask].float().mean().item()
            curve.append((step, round(acc, 4)))
            print(f"  {start:10s} {spans:7s} β2 {beta2} lr {lr:g} step {step}: copy accuracy {acc:.2f}", flush=True)
    onset = next((s for s, a in curve if a >= 0.5), None)
    return {"start": start, "spans": spans, "beta2": beta2, "lr": lr, "curve": curve,
            "final_accuracy": curve[-1][1], "steps_to_50pct": onset, "seconds": round(time.time() - t0, 1)}


def load_model(path: str):
    """An HF-layout model directory (``load_pretrained``) or a ``dsv3 train`` checkpoint directory
    (meta.json + model tensors)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_pretrained(path)
    from dsv3.checkpoint import CheckpointReader

    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    model = dsv3.Transformer(dsv3.ModelConfig.from_hf(meta["model_config"]))
    reader = CheckpointReader(path, meta)
    model.load_state_dict(reader.tensors("model"))
    return model


@torch.no_grad()
def measure(path: str, args) -> dict:
    """Copy accuracy (argmax on the repeated tokens) of the model at ``path`` on ``4 × --batch`` held-out
    varying-span documents of ``--window`` tokens (seed 1234: the same documents for every model)."""
    model = load_model(path).eval()
    rng = np.random.default_rng(1234)
    vocab = (3, model.cfg.vocab_size - 16)
    hits = total = 0
    for _ in range(4):
        docs, mask = copy_batch(rng, args.batch, args.window, "varying", vocab)
        logits = model(docs[:, :-1])
        hits += int((logits.argmax(-1) == docs[:, 1:])[mask].sum())
        total += int(mask.sum())
    return {"model": path, "window": args.window, "documents": 4 * args.batch, "copy_accuracy": round(hits / total, 4)}


def _fail(message: str):
    """One line on stderr naming what is wrong, exit code 2."""
    print(f"induction_probe.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/tiny/final", help="the quickstart model (its config also sizes the fresh one)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", action="append", default=None, metavar="START:SPANS:BETA2:LR",
                   help="run only this case (repeatable), e.g. quickstart:varying:0.999:1e-3")
    p.add_argument("--measure", action="append", default=None, metavar="MODEL_DIR",
                   help="no training: print the copy accuracy of this model (HF-layout or checkpoint directory; "
                        "repeatable) on held-out varying-span documents, one JSON line each")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    for flag, value, low in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--window", args.window, 8),
                             ("--every", args.every, 1), ("--threads", args.threads, 1)):
        if value < low:
            _fail(f"{flag} {value}: must be at least {low}")
    if args.measure:
        torch.set_num_threads(args.threads)
        for path in args.measure:
            if not (os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, "meta.json"))):
                _fail(f"--measure {path}: neither a model directory (config.json) nor a checkpoint (meta.json)")
        for path in args.measure:
            print(json.dumps(measure(path, args)), flush=True)
        return
    cases = CASES
    if args.case:
        cases = []
        for c in args.case:
            parts = c.split(":")
            try:
                start, spans, beta2, lr = parts[0], parts[1], float(parts[2]), float(parts[3])
            except (IndexError, ValueError):
                _fail(f"--case {c}: expected START:SPANS:BETA2:LR, e.g. quickstart:varying:0.999:1e-3")
            if start not in ("fresh", "quickstart") or spans not in ("fixed", "varying") or len(parts) != 4:
                _fail(f"--case {c}: START is fresh or quickstart, SPANS fixed or varying")
            cases.append((start, spans, beta2, lr))
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        _fail(f"--model {args.model}: no config.json (run scripts/quickstart.sh first)")
    torch.set_num_threads(args.threads)
    results = [run_case(*case, args, os.path.join(args.model, "config.json")) for case in cases]
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "torch": torch.__version__,
            "threads": args.threads, "steps": args.steps, "batch": args.batch, "window": args.window,
            "model": args.model}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "induction_probe.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = ["# Can the tiny model learn to copy? (benchmarks/induction_probe.py)", "",
             f"{meta['date']}, {meta['machine']}, {args.threads} threads, torch {meta['torch']}; "
             f"{args.steps} steps of {args.batch} documents of {args.window} tokens, plain AdamW (weight decay 0.1, "
             "clip 1.0, constant lr). Copy accuracy = argmax accuracy on the repeated tokens.", "",
             "| start | span lengths | Adam β2 | lr | copy accuracy at the end | steps to 50% |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['start']} | {r['spans']} | {r['beta2']} | {r['lr']:g} | {100 * r['final_accuracy']:.0f}% "
                     f"| {r['steps_to_50pct'] or 'not reached'} |")
    lines += ["", "`fixed`: every span is half the window (a fixed look-back distance, learnable from rotary "
              "positions alone); `varying`: span lengths 4 … window/2 per document (only content-based "
              "copying — an induction circuit, which passkey retrieval needs — solves it)."]
    with open(os.path.join(args.out, "induction_probe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
