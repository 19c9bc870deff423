"""Cost of one engine step on CPU: decode at batch 1, 8 and 32, and the prefill of a 512-token prompt.

The engine of ``dsv3 serve`` (:class:`dsv3.infer.engine.Engine`, one torch thread as its engine
process uses on this machine) on the exported quickstart model (default ``runs/tiny/final``; a
freshly initialised ``tiny`` preset model when it is missing), fp32, greedy.

* decode B: B requests with 64-token prompts are prefilled, then ``--steps`` decode steps are timed
  one by one (after 3 warm-up steps); the figure is the median step.
* prefill: a fresh engine takes one 512-token prompt (``max_new_tokens=1``); the step that
  prefills it (and samples its first token) is timed (median of 3).

Cases are interleaved round by round (the machine is shared); the table gives the median over rounds.
A digest of the greedy tokens of every decode case is recorded, so runs on different code can be
checked to produce the same tokens.

``--baseline REV`` also runs the engine and model of git revision REV (its ``src/dsv3`` extracted to
a temporary package, the same weights loaded) in the same process, alternating with the working
tree's step by step: on a busy machine both see the same load, so their ratio holds even when the
absolute figures drift.

    python benchmarks/engine_step.py [--model runs/tiny/final] [--rounds 5] [--steps 32]
                                     [--baseline REV] [--out NAME]

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
from types import SimpleNamespace

import torch

from _baseline import baseline  # noqa: E402 (benchmarks/ is the script's directory)
import dsv3.infer.engine
import dsv3.infer.sampling

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


def current(model) -> SimpleNamespace:
    return SimpleNamespace(Engine=dsv3.infer.engine.Engine, Params=dsv3.infer.sampling.SamplingParams, model=model)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def make_engine(code):
    return code.Engine(code.model, max_batch=32, max_len=1024, cache_memory=64 << 20)


class Decode:
    """B requests decoding on one engine; ``step()`` times one engine step."""

    def __init__(self, code, batch: int, steps: int):
        self.eng = make_engine(code)
        vocab = code.model.cfg.vocab_size
        self.reqs = [self.eng.submit(p, max_new_tokens=steps + WARMUP + 1, params=code.Params(0.0))
                     for p in prompts(batch, PROMPT_LEN, vocab, seed=batch)]
        while any(not r.output for r in self.reqs):
            self.eng.step()
        for _ in range(WARMUP):
            self.eng.step()

    def step(self) -> float:
        t0 = time.perf_counter()
        self.eng.step()
        return time.perf_counter() - t0

    def digest(self) -> str:
        self.eng.run()
        return hashlib.sha256(json.dumps([r.output for r in self.reqs]).encode()).hexdigest()[:16]


def prefill_once(code, length: int, k: int) -> float:
    eng = make_engine(code)
    eng.submit(prompts(1, length, code.model.cfg.vocab_size, seed=1000 + k)[0], max_new_tokens=1,
               params=code.Params(0.0))
    t0 = time.perf_counter()
    eng.step()
    return time.perf_counter() - t0


def measure(codes: dict, case: str, steps: int) -> dict:
    """Median ms of ``case`` for every code version, their steps alternating; greedy digests."""
    kind, n = case.split()
    times = {name: [] for name in codes}
    digests = {}
    if kind == "decode":
        runs = {name: Decode(code, int(n), steps) for name, code in codes.items()}
        for _ in range(steps):
            for name, run in runs.items():
                times[name].append(run.step())
        digests = {name: run.digest() for name, run in runs.items()}
    else:
        for k in range(3):
            for name, code in codes.items():
                times[name].append(prefill_once(code, int(n), k))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}, digests


def git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "runs/tiny/final"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", default=None, help="git revision to run alongside, in the same process")
    ap.add_argument("--out", default="engine_step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, label = load(args.model)
    codes = {"current": current(model)}
    if args.baseline:
        codes["baseline"] = baseline(args.baseline, model)
    cases = [f"decode {b}" for b in args.batches] + [f"prefill {args.prefill}"]
    per_round = {c: {name: [] for name in codes} for c in cases}
    digests: dict[str, dict] = {}
    load_before = os.getloadavg()
    for rnd in range(args.rounds):
        for case in (cases if rnd % 2 == 0 else cases[::-1]):
            ms, digests[case] = measure(codes, case, args.steps)
            for name, v in ms.items():
                per_round[case][name].append(v)
        print(f"round {rnd + 1}: " + ", ".join(
            f"{c} " + "/".join(f"{per_round[c][n][-1]:.2f}" for n in codes) + " ms" for c in cases), flush=True)
    load_after = os.getloadavg()
    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "../src/dsv3/model", "../src/dsv3/infer"))
    med = {c: {n: statistics.median(v) for n, v in per.items()} for c, per in per_round.items()}
    result = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit, "src_dirty": dirty,
        "baseline": args.baseline, "model": label, "threads": args.threads, "rounds": args.rounds,
        "steps": args.steps, "load_average_before": load_before, "load_average_after": load_after,
        "torch": torch.__version__, "ms_median": med, "ms_per_round": per_round, "greedy_digest": digests,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    cmd = f"python benchmarks/engine_step.py --rounds {args.rounds} --steps {args.steps}"
    cmd += f" --baseline {args.baseline}" if args.baseline else ""
    lines = [
        "# Engine step on CPU", "",
        f"{result['when']} · commit {commit}{' + uncommitted src changes' if dirty else ''} · "
        f"`{cmd} --out {args.out}`", "",
        f"Model: {label} (fp32, greedy), {args.threads} torch thread(s), torch {torch.__version__}. "
        f"Decode B: median of {args.steps} timed engine steps with B requests decoding (64-token prompts); "
        f"prefill: the step that prefills one {args.prefill}-token prompt (median of 3). "
        f"Median over {args.rounds} interleaved rounds. Load average before/after: "
        f"{load_before[0]:.2f}/{load_after[0]:.2f} (2 shared cores).", "",
    ]
    if args.baseline:
        lines += [f"Baseline: revision {args.baseline} in the same process, its steps alternating with the "
                  "current code's (same weights, same load).", "",
                  "| case | ms current | ms baseline | current / baseline | per-round ms, current | "
                  "per-round ms, baseline | same greedy tokens |", "|---|---:|---:|---:|---|---|---|"]
        for c in cases:
            same = "" if not digests[c] else ("yes" if len(set(digests[c].values())) == 1 else "**no**")
            lines.append(f"| {c} | {med[c]['current']:.2f} | {med[c]['baseline']:.2f} | "
                         f"{med[c]['current'] / med[c]['baseline']:.2f}× | "
                         + " | ".join(", ".join(f"{v:.2f}" for v in per_round[c][n]) for n in codes)
                         + f" | {same} |")
    else:
        lines += ["| case | ms per step (median) | per-round medians (ms) | greedy tokens digest |",
                  "|---|---:|---|---|"]
        for c in cases:
            rounds = ", ".join(f"{v:.2f}" for v in per_round[c]["current"])
            lines.append(f"| {c} | {med[c]['current']:.2f} | {rounds} | {digests[c].get('current', '')} |")
    (OUT / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
