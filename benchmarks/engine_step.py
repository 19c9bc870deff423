"""Cost of one engine step on CPU: decode at batch 1, 8 and 32, and the prefill of a 512-token prompt.

The engine of ``dsv3 serve`` (:class:`dsv3.infer.engine.Engine`, one torch thread as its engine
process uses on this machine) on the exported quickstart model (default ``runs/tiny/final``; a
freshly initialised ``tiny`` preset model when it is missing), fp32, greedy.

* decode B: B requests with 64-token prompts are prefilled, then ``--steps`` decode steps are timed
  one by one (after 3 warm-up steps); the figure is the median step.
* prefill: a fresh engine takes one 512-token prompt (``max_new_tokens=1``); the step that
  prefills it (and samples its first token) is timed.

Cases are interleaved round by round (the machine is shared); the table gives the median over rounds.
A digest of the greedy tokens of every decode case is recorded, so runs on different code can be
checked to produce the same tokens.

    python benchmarks/engine_step.py [--model runs/tiny/final] [--rounds 5] [--steps 32] [--out NAME]

Writes benchmarks/results/NAME.{md,json} (default engine_step).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from dsv3.infer.engine import Engine
from dsv3.infer.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"
PROMPT_LEN = 64
WARMUP = 3


def load(model_dir: str):
    if Path(model_dir, "config.json").exists():
        from dsv3.infer.generate import load_model_dir
        return load_model_dir(model_dir, "cpu")[0].eval(), model_dir
    from dsv3.config import ModelConfig
    from dsv3.model.transformer import Transformer
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny")).eval(), "tiny preset, random init (seed 0)"


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def engine(model) -> Engine:
    return Engine(model, max_batch=32, max_len=1024, cache_memory=64 << 20)


def decode_case(model, batch: int, steps: int) -> tuple[list[float], str]:
    eng = engine(model)
    reqs = [eng.submit(p, max_new_tokens=steps + WARMUP + 1, params=SamplingParams(0.0))
            for p in prompts(batch, PROMPT_LEN, model.cfg.vocab_size, seed=batch)]
    while any(not r.output for r in reqs):
        eng.step()
    for _ in range(WARMUP):
        eng.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    eng.run()
    digest = hashlib.sha256(json.dumps([r.output for r in reqs]).encode()).hexdigest()[:16]
    return times, digest


def prefill_case(model, length: int, repeats: int = 3) -> list[float]:
    times = []
    for k in range(repeats):
        eng = engine(model)
        eng.submit(prompts(1, length, model.cfg.vocab_size, seed=1000 + k)[0], max_new_tokens=1,
                   params=SamplingParams(0.0))
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "runs/tiny/final"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="engine_step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, label = load(args.model)
    cases = [f"decode {b}" for b in args.batches] + [f"prefill {args.prefill}"]
    per_round: dict[str, list[float]] = {c: [] for c in cases}
    digests: dict[str, str] = {}
    load_before = os.getloadavg()
    for rnd in range(args.rounds):
        order = cases if rnd % 2 == 0 else cases[::-1]
        for case in order:
            kind, n = case.split()
            if kind == "decode":
                times, digests[case] = decode_case(model, int(n), args.steps)
            else:
                times = prefill_case(model, int(n))
            per_round[case].append(statistics.median(times) * 1e3)
        print(f"round {rnd + 1}: " + ", ".join(f"{c} {per_round[c][-1]:.2f} ms" for c in cases), flush=True)
    load_after = os.getloadavg()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "src/dsv3/model", "src/dsv3/infer"],
                                    cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "?", False
    result = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit, "src_dirty": dirty,
        "model": label, "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
        "load_average_before": load_before, "load_average_after": load_after, "torch": torch.__version__,
        "ms_median": {c: statistics.median(v) for c, v in per_round.items()},
        "ms_per_round": per_round, "greedy_digest": digests,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Engine step on CPU", "",
        f"{result['when']} · commit {commit}{' + uncommitted src changes' if dirty else ''} · "
        f"`python benchmarks/engine_step.py --rounds {args.rounds} --steps {args.steps} --out {args.out}`", "",
        f"Model: {label} (fp32, greedy), {args.threads} torch thread(s), torch {torch.__version__}. "
        f"Decode B: median of {args.steps} timed engine steps with B requests decoding (64-token prompts); "
        f"prefill: the step that prefills one {args.prefill}-token prompt (median of 3). "
        f"Median over {args.rounds} interleaved rounds. Load average before/after: "
        f"{load_before[0]:.2f}/{load_after[0]:.2f} (2 shared cores).", "",
        "| case | ms per step (median) | per-round medians (ms) | greedy tokens digest |",
        "|---|---:|---|---|",
    ]
    for c in cases:
        rounds = ", ".join(f"{v:.2f}" for v in per_round[c])
        lines.append(f"| {c} | {result['ms_median'][c]:.2f} | {rounds} | {digests.get(c, '')} |")
    (OUT / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
