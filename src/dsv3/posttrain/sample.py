"""``dsv3 sample --model DIR --prompts FILE --n 8 --keep correct --out sft.jsonl``: rejection sampling
(DeepSeek-R1 §2.3.3) and accuracy.

``--n`` completions of every prompt from the batched inference engine are scored with the rule-based
rewards (``--reward``, default ``math,format``). ``--keep correct`` writes the samples that pass — every
named reward at least ``--threshold`` (default 1.0: the right answer in the right format) — to ``--out``
as chat SFT data (``{"messages": [..., {"role": "assistant", "content": completion}]}``, ready for
``dsv3 sft``); ``--keep all`` writes every sample, ``--keep none`` only reports. ``--dedup`` drops a
prompt's repeated completions; ``--max-per-prompt`` caps what one prompt contributes.

It reports the accuracy (the first reward that is ``math``/``accuracy``, else the pass rate) over all
samples with the number of samples and a 95% Wilson confidence interval, and pass@n over prompts
(``--json`` for machine-readable output, with ``sample_correct``: each sample's 0/1 in prompt order, for
paired comparisons of two models on the same prompts). ``--temperature 0`` with ``--n 1`` is greedy evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import UserError, check_device, check_finite, check_int, check_output_file
from ..infer.generate import check_greedy_filters


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="an HF-layout model directory with tokenizer.json")
    p.add_argument("--prompts", required=True, help="JSON lines: {\"prompt\": …, \"answer\": …} or {\"messages\": …}")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--reward", default="math,format", help="reward functions: names or module:function, comma-separated")
    p.add_argument("--keep", default="correct", choices=("correct", "all", "none"),
                   help="which samples --out receives: those passing every reward (correct), all, none")
    p.add_argument("--threshold", type=float, default=1.0, help="a sample passes when every reward is >= this")
    p.add_argument("--dedup", action="store_true", help="keep each distinct completion of a prompt once")
    p.add_argument("--max-per-prompt", type=int, default=0, help="at most this many kept samples per prompt (0: all)")
    p.add_argument("--out", default=None, help="chat SFT data to write (.jsonl); needed unless --keep none")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=64, help="rows the engine decodes at once")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def check_args(args) -> None:
    check_int("--n", args.n, lo=1, hi=4096)
    check_int("--max-new-tokens", args.max_new_tokens, lo=1)
    check_int("--max-batch", args.max_batch, lo=1)
    check_int("--max-per-prompt", args.max_per_prompt, lo=0)
    check_int("--limit", args.limit, lo=0)
    check_int("--top-k", args.top_k, lo=0)
    check_int("--seed", args.seed, lo=0, hi=2**63 - 1)
    check_finite("--temperature", args.temperature, lo=0)
    check_finite("--top-p", args.top_p, lo=0, hi=1, lo_open=True)
    check_greedy_filters(args, off=(0, 1.0))
    check_finite("--threshold", args.threshold)
    check_device("--device", args.device)
    if args.keep == "none":
        for flag, given in (("--out", args.out is not None), ("--dedup", args.dedup),
                            ("--max-per-prompt", bool(args.max_per_prompt))):
            if given:
                raise UserError(f"{flag} only applies when samples are written (--keep correct or --keep all); "
                                f"--keep none only reports the accuracy")
    else:
        if not args.out:
            raise UserError(f"--keep {args.keep}: name the file to write with --out (or use --keep none)")
        check_output_file("--out", args.out)
        if os.path.exists(args.prompts) and os.path.exists(args.out) and os.path.samefile(args.prompts, args.out):
            raise UserError(f"--out {args.out}: is the --prompts file; writing the samples there would replace "
                            f"the prompts they are drawn from")


def evaluate(model, tokenizer, template, records: list[dict], rewards, n: int, max_new_tokens: int, params,
             seed: int, max_batch: int, threshold: float = 1.0, engine=None, step: int = 0) -> dict:
    """Sample ``n`` completions per record and score them: {"samples": [(record index, text, scores,
    passed)], "accuracy", "correct", "total", "ci95", "pass_rate", "pass_at_n", "mean_length"}."""
    from .chat import prompt_ids
    from .common import wilson_interval
    from .rewards import score
    from .rollout import make_engine, rollout

    prompts = [prompt_ids(template, tokenizer, r["messages"]) for r in records]
    max_len = min(max(len(p) for p in prompts) + max_new_tokens + 1, model.cfg.max_position_embeddings)
    if max(len(p) for p in prompts) + 1 >= model.cfg.max_position_embeddings:
        raise UserError(f"a prompt is longer than the model's context ({model.cfg.max_position_embeddings} positions)")
    max_new_tokens = min(max_new_tokens, max_len - 1 - min(len(p) for p in prompts))
    engine = engine or make_engine(model, max_batch, max_len)
    samples, lengths = [], []
    chunk = max(1, max_batch // n) if n <= max_batch else 1
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        room = [min(max_new_tokens, max_len - 1 - len(p)) for p in part]
        comps, _ = rollout(engine, tokenizer, part, n, min(room), params, seed, step * 1_000_000 + start)
        for c in comps:
            i = start + c.prompt_index
            sc = score(rewards, c.text, records[i])
            samples.append((i, c.text, sc, all(v >= threshold for v in sc.values())))
            lengths.append(len(c.tokens))
    acc_name = next((nm for nm, _ in rewards if nm in ("math", "accuracy")), None)
    correct = sum(1 for s in samples if (s[2][acc_name] >= 1.0 if acc_name else s[3]))
    passed = sum(1 for s in samples if s[3])
    by_prompt: dict = {}
    for i, _, _, ok in samples:
        by_prompt[i] = by_prompt.get(i, False) or ok
    total = len(samples)
    lo, hi = wilson_interval(correct, total)
    return {"samples": samples, "accuracy": correct / total, "correct": correct, "total": total,
            "ci95": [lo, hi], "pass_rate": passed / total, "pass_at_n": sum(by_prompt.values()) / len(records),
            "mean_length": sum(lengths) / max(len(lengths), 1), "prompts": len(records), "n": n}


def select(samples: list, keep: str, dedup: bool = False, max_per_prompt: int = 0) -> list[tuple[int, str]]:
    """(record index, completion) of the samples ``(index, text, scores, passed)`` that ``keep`` accepts:
    "correct" those that passed, "all" every one; ``dedup`` drops a prompt's repeats, ``max_per_prompt``
    (> 0) caps each prompt's share. Sample order is kept."""
    seen: dict = {}
    out = []
    for i, text, _, ok in samples:
        if keep == "none" or (keep == "correct" and not ok):
            continue
        have = seen.setdefault(i, [])
        if (dedup and text in have) or (max_per_prompt and len(have) >= max_per_prompt):
            continue
        have.append(text)
        out.append((i, text))
    return out


def run(args) -> int:
    import torch

    from ..infer.sampling import SamplingParams
    from .chat import read_prompt_file
    from .common import load_weights, open_model_dir
    from .rewards import parse_rewards

    check_args(args)
    rewards = parse_rewards(args.reward)
    cfg, tokenizer, template = open_model_dir(args.model)
    records = read_prompt_file(args.prompts)
    if args.limit:
        records = records[:args.limit]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_weights(args.model, device)
    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    rep = evaluate(model, tokenizer, template, records, rewards, args.n, args.max_new_tokens, params, args.seed,
                   args.max_batch, args.threshold)
    kept = 0
    if args.keep != "none":
        chosen = select(rep["samples"], args.keep, args.dedup, args.max_per_prompt)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            for i, text in chosen:
                f.write(json.dumps({"messages": records[i]["messages"] + [{"role": "assistant", "content": text}]},
                                   ensure_ascii=False) + "\n")
        os.replace(tmp, args.out)
        kept = len(chosen)
    report = {k: v for k, v in rep.items() if k != "samples"}
    acc_name = next((nm for nm, _ in rewards if nm in ("math", "accuracy")), None)
    # per sample, in prompt order: 1 when correct (paired comparisons of two models on the same prompts)
    report["sample_correct"] = [int(sc[acc_name] >= 1.0 if acc_name else ok) for _, _, sc, ok in rep["samples"]]
    report.update({"kept": kept, "out": args.out if args.keep != "none" else None, "model": args.model,
                   "temperature": args.temperature, "reward": args.reward})
    if args.json:
        print(json.dumps(report))
    else:
        lo, hi = report["ci95"]
        print(f"accuracy: {report['accuracy']:.3f} ({report['correct']}/{report['total']} samples, 95% CI "
              f"{lo:.3f}-{hi:.3f}); pass@{args.n}: {report['pass_at_n']:.3f} over {report['prompts']} prompts; "
              f"passing all rewards: {report['pass_rate']:.3f}; mean length {report['mean_length']:.1f} tokens")
        if args.keep != "none":
            print(f"kept {kept} samples -> {args.out}")
    sys.stdout.flush()
    return 0
