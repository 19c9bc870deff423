"""``dsv3 eval``: the context a model really uses (loss by position, passkey, needle in a haystack).

    dsv3 eval --model runs/tiny/final --task ppl-by-position --max-length 4096 --data runs/tiny/data
    dsv3 eval --model runs/ext/final --task passkey,niah --lengths 256,1024,4096 --plot out/ --json

Works on any HF-layout DeepSeek-V3-family directory with a tokenizer.json. ``--data`` is a prepared
token directory (``dsv3 train`` writes one to RUN/data) whose held-out split gives the windows of
``ppl-by-position`` and the haystacks of ``niah``; by default the ``data/`` beside the model's run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import UserError, check_device, check_int

TASKS = ("ppl-by-position", "passkey", "niah")
# flags only some tasks read (refused when none of the chosen tasks does), and their defaults
PPL_ONLY = ("max_length", "windows", "bucket")
RETRIEVAL_ONLY = ("lengths", "depths", "samples")
DEFAULTS = {"windows": 8, "lengths": "256,512,1024,2048,4096", "depths": "0,0.25,0.5,0.75,1", "samples": 4}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF layout + tokenizer.json), e.g. RUN/final")
    p.add_argument("--task", default="ppl-by-position,passkey",
                   help=f"comma-separated: {', '.join(TASKS)} (default ppl-by-position,passkey)")
    p.add_argument("--data", default=None,
                   help="prepared token directory for the held-out split (default: the data/ of the model's run)")
    p.add_argument("--max-length", type=int, default=None,
                   help="ppl-by-position: window length in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--windows", type=int, default=None,
                   help=f"ppl-by-position: held-out windows to score (default {DEFAULTS['windows']})")
    p.add_argument("--bucket", type=int, default=None, help="ppl-by-position: positions per bucket (default L/32)")
    p.add_argument("--lengths", default=None,
                   help=f"passkey/niah: prompt lengths in tokens, comma-separated (default {DEFAULTS['lengths']})")
    p.add_argument("--depths", default=None,
                   help=f"passkey/niah: depths of the key in [0, 1] (default {DEFAULTS['depths']})")
    p.add_argument("--samples", type=int, default=None,
                   help=f"passkey/niah: keys per (length, depth) cell (default {DEFAULTS['samples']})")
    p.add_argument("--trained-length", type=int, default=None,
                   help="the length the model was pre-trained at (default: its rope_scaling's original "
                        "positions, else its run's --seq-len, else max_position_embeddings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=8, help="engine rows at once")
    p.add_argument("--prefill-chunk", type=int, default=512, help="engine prefill chunk (tokens)")
    p.add_argument("--device", default="auto")
    p.add_argument("--label", default=None, help="name of the model in the figures (default: --model)")
    p.add_argument("--plot", default=None, metavar="DIR", help="write loss_by_position.png / *_heatmap.png here")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _int_list(flag: str, text: str, lo: int) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not vals:
        raise UserError(f"{flag} {text!r}: give at least one value")
    for v in vals:
        if v < lo:
            raise UserError(f"{flag} {text!r}: every value must be >= {lo}, got {v}")
    return sorted(set(vals))


def _float_list(flag: str, text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise UserError(f"{flag} {text!r}: give at least one value")
    for v in vals:
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{flag} {text!r}: depths must be in [0, 1], got {v:g}")
    return sorted(set(vals))


def check_args(args) -> dict:
    """Flag values no evaluation can use (a UserError naming the flag), before anything is loaded."""
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise UserError(f"--task {args.task!r}: unknown task {', '.join(bad) or '(none)'}; choose from {', '.join(TASKS)}")
    ppl, retrieval = "ppl-by-position" in tasks, bool({"passkey", "niah"} & set(tasks))
    for names, used, which in ((PPL_ONLY, ppl, "ppl-by-position"), (RETRIEVAL_ONLY, retrieval, "passkey and niah")):
        for name in names:
            if getattr(args, name) is not None and not used:
                raise UserError(f"--{name.replace('_', '-')} only applies to --task {which}; "
                                f"--task {','.join(tasks)} does not read it")
    if args.data is not None and not (ppl or "niah" in tasks):
        raise UserError(f"--data only applies to --task ppl-by-position and niah (passkey builds its prompts "
                        f"from the tokenizer); --task {','.join(tasks)} does not read it")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for flag in ("windows", "samples", "max_batch", "prefill_chunk"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), lo=1)
    check_int("--seed", args.seed, lo=0, hi=2**63 - 1)
    if args.max_length is not None:
        check_int("--max-length", args.max_length, lo=2, hi=1 << 20, why="a CPU would run for hours")
    if args.bucket is not None:
        check_int("--bucket", args.bucket, lo=1)
    if args.trained_length is not None:
        check_int("--trained-length", args.trained_length, lo=1)
    check_device("--device", args.device)
    lengths = _int_list("--lengths", args.lengths, lo=2)
    if max(lengths) > 1 << 20:
        raise UserError(f"--lengths {args.lengths!r}: at most {1 << 20} tokens")
    depths = _float_list("--depths", args.depths)
    if not os.path.isdir(args.model):
        raise UserError(f"--model {args.model}: no such directory")
    for name in ("config.json", "tokenizer.json"):
        if not os.path.exists(os.path.join(args.model, name)):
            raise UserError(f"--model {args.model}: no {name} (a model directory in the HF layout with its tokenizer)")
    if args.data is not None and not os.path.exists(os.path.join(args.data, "index.json")):
        raise UserError(f"--data {args.data}: not a prepared token directory (no index.json); "
                        f"dsv3 train writes one to RUN/data")
    if args.out is not None:   # before the evaluation, not after it
        from ..errors import check_output_file
        check_output_file("--out", args.out)
    if args.plot is not None:
        from ..errors import check_writable_dir
        check_writable_dir("--plot", args.plot)
    return {"tasks": tasks, "lengths": lengths, "depths": depths}


def _data_dir(args) -> str:
    if args.data is not None:
        return args.data
    guess = os.path.join(os.path.dirname(os.path.abspath(args.model)), "data")
    if os.path.exists(os.path.join(guess, "index.json")):
        return guess
    raise UserError(f"--data is needed for ppl-by-position and niah: no prepared token directory beside "
                    f"--model {args.model} ({guess})")


def _trained_length(args, cfg) -> tuple[int, str]:
    from ..train.extend import trained_length

    if args.trained_length is not None:
        return args.trained_length, "--trained-length"
    if cfg.rope_scaling is not None:
        return cfg.rope_scaling["original_max_position_embeddings"], "rope_scaling"
    run_dir = os.path.dirname(os.path.abspath(args.model))
    n = trained_length(run_dir, "--trained-length")
    if n is not None:
        return n, f"the run in {run_dir}"
    return cfg.max_position_embeddings, "max_position_embeddings"


def run(args) -> int:
    import torch

    from ..data import TokenDataset
    from ..data.passkey import KEY_DIGITS, Retrieval
    from ..infer.generate import load_model_dir
    from . import longctx

    opts = check_args(args)
    tasks, lengths, depths = opts["tasks"], opts["lengths"], opts["depths"]
    data = _data_dir(args) if ("ppl-by-position" in tasks or "niah" in tasks) else None
    model, tok = load_model_dir(args.model, args.device, "auto")
    cfg = model.cfg
    trained, where = _trained_length(args, cfg)
    original_context = cfg.max_position_embeddings
    max_length = args.max_length or original_context
    for n in ((lengths if set(tasks) & {"passkey", "niah"} else []) + ([max_length] if "ppl-by-position" in tasks else [])):
        if n > original_context:
            print(f"dsv3 eval: note: length {n} is beyond the model's max_position_embeddings ({original_context}); "
                  f"its rotary embedding is extrapolated there", file=sys.stderr)
            break
    val = None
    if data is not None:
        try:
            val = TokenDataset(data, "val", 1, tokenizer=tok)
        except ValueError as e:
            msg = str(e)
            if "different tokenizer" in msg:
                msg = f"its tokens were made with another tokenizer than {args.model}/tokenizer.json"
            raise UserError(f"--data {data}: {msg}") from None
    torch.manual_seed(args.seed)
    res = {"model": args.model, "label": args.label or args.model, "trained_length": trained,
           "trained_length_from": where, "max_position_embeddings": original_context,
           "rope_scaling": cfg.rope_scaling, "tasks": {}}
    kw = {"max_batch": args.max_batch, "prefill_chunk": args.prefill_chunk}
    if "ppl-by-position" in tasks:
        windows = longctx.windows_from(val, max_length, args.windows)
        r = longctx.ppl_by_position(model, windows, trained, args.bucket, **kw)
        res["tasks"]["ppl-by-position"] = r
    for task in ("passkey", "niah"):
        if task not in tasks:
            continue
        hay = None
        if task == "niah":
            if val.num_tokens < max(lengths):
                raise UserError(f"--data {data}: the held-out split has {val.num_tokens} tokens, fewer than the "
                                f"longest haystack (--lengths {max(lengths)})")
            hay = val.read(0, val.num_tokens)
        need = Retrieval(tok, task).fixed_tokens("9" * KEY_DIGITS) + 1
        if min(lengths) < need:
            raise UserError(f"--lengths {args.lengths!r}: a {task} prompt needs at least {need} tokens")
        res["tasks"][task] = longctx.retrieval(model, tok, task, lengths, depths, args.samples, args.seed, hay, **kw)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if args.plot:
        from .plots import draw
        for path in draw([res], args.plot):
            print(f"plot: {path}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        _print(res)
    return 0


def _print(res: dict) -> None:
    print(f"{res['label']}: trained at {res['trained_length']} positions ({res['trained_length_from']}), "
          f"max_position_embeddings {res['max_position_embeddings']}, rope_scaling "
          f"{'yarn x%g' % res['rope_scaling']['factor'] if res['rope_scaling'] else 'none'}")
    p = res["tasks"].get("ppl-by-position")
    if p:
        print(f"loss by position ({p['windows']} held-out windows of {p['length']} tokens, buckets of {p['bucket']}):")
        print("  " + "  ".join(f"{s}:{v:.3f}" for s, v in zip(p["positions"], p["loss"])))
        if "beyond" in p:
            print(f"  in range [{p['trained_length'] // 2}, {p['trained_length']}): {p['in_range']:.3f}   beyond "
                  f"[{p['trained_length']}, {p['length']}): {p['beyond']:.3f} ({100 * (p['beyond_ratio'] - 1):+.1f}%), "
                  f"worst bucket {p['worst_bucket_beyond']:.3f} ({100 * (p['worst_bucket_ratio'] - 1):+.1f}%)")
    for task in ("passkey", "niah"):
        g = res["tasks"].get(task)
        if not g:
            continue
        print(f"{task} accuracy (%), {g['samples']} keys per cell; rows: length, columns: depth")
        print("  length " + " ".join(f"{d:>6g}" for d in g["depths"]) + "    mean")
        for L, row in zip(g["lengths"], g["accuracy"]):
            print(f"  {L:>6} " + " ".join(f"{100 * a:6.0f}" for a in row) + f"  {100 * sum(row) / len(row):6.1f}")
