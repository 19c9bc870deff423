"""``dsv3 train``: prepare data if needed, train, evaluate, export, plot.

Defaults train the tiny preset on the built-in corpus (the Python standard library's sources).
Under ``torchrun --nproc-per-node N`` the same command runs data-parallel with ZeRO-1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from ..checkpoint import write_json_atomic
from ..errors import UserError as CLIError
from ..errors import check_device, check_finite, check_int

# what --resume compares with the run's start (RUN/run.json); --allow-changed names the ones to accept
IDENTITY = {"config": "the model config", "seed": "--seed", "data": "--data", "batch-size": "--batch-size",
            "seq-len": "--seq-len", "lr": "--lr", "warmup": "--warmup", "steps": "--steps", "from": "--from",
            "adam-betas": "--adam-betas", "lr-schedule": "--lr-schedule", "min-lr-ratio": "--min-lr-ratio",
            "precision": "--precision", "ema": "--ema", "bf16-moments": "--bf16-moments", "mtp-lambda": "--mtp-lambda",
            "balance-alpha": "--balance-alpha", "bias-update-speed": "--bias-update-speed",
            "fp8-dispatch": "--fp8-dispatch"}
# the settings above that change the arithmetic of a step, as TrainConfig calls them (a run.json written before
# they were compared lacks them: the newest checkpoint's train_config says what the run used)
STEP_SETTINGS = {"ema": "ema_decay", "bf16-moments": "bf16_moments", "mtp-lambda": "mtp_lambda",
                 "balance-alpha": "balance_alpha", "bias-update-speed": "bias_update_speed",
                 "fp8-dispatch": "fp8_dispatch", "precision": "precision"}
# what a run recorded before these settings were flags trained with (the values then hard-coded)
OLD_DEFAULTS = {"adam-betas": [0.9, 0.95], "lr-schedule": "cosine", "min-lr-ratio": 0.1}
RUN_FILE = "run.json"
# far above any learning rate that trains (AdamW moves each weight by about lr per step); a larger one,
# such as 1e300, does not even fit the float32 update and failed inside the optimizer
MAX_LR = 1e3
YARN_DEFAULTS = {"yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_mscale": 1.0}   # DeepSeek-V3 report


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..parallel.pipeline.schedule import SCHEDULES
    from .optim import LR_SCHEDULES
    from .trainer import TrainConfig

    d = TrainConfig()
    p.add_argument("--preset", default=None, help="model preset (tiny, small, deepseek-v3, …); default tiny")
    p.add_argument("--config", default=None, help="an HF config.json (or its directory) instead of a preset")
    p.add_argument("--data", default="builtin",
                   help="a prepared token directory, or a corpus to prepare: a directory or glob of text "
                        "files, .jsonl with a 'text' field, an fsspec URL, or 'builtin' (default)")
    p.add_argument("--tokenizer", default=None, help="an existing tokenizer.json (default: train one)")
    p.add_argument("--max-data-bytes", type=int, default=None, help="cap on corpus bytes to prepare")
    p.add_argument("--out", default=d.out, help="run directory (metrics, checkpoints, exported model)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch in sequences")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=list(LR_SCHEDULES),
                   help="after the linear warm-up: cosine decay to --min-lr-ratio × --lr, or constant --lr "
                        f"(default {d.lr_schedule})")
    p.add_argument("--min-lr-ratio", type=float, default=None, metavar="R",
                   help=f"with --lr-schedule cosine: the lr it decays to, as a fraction of --lr (default {d.min_lr_ratio:g})")
    p.add_argument("--adam-betas", default=",".join(f"{b:g}" for b in d.betas), metavar="B1,B2",
                   help="AdamW's β1,β2 (default %(default)s, DeepSeek-V3's; β2 0.999 lets a small model "
                        "form an induction circuit sooner, README Long context)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp8"],
                   help="fp32 master weights always; bf16: BF16 autocast; fp8: the Linears' and experts' GEMMs in "
                        "FP8 (1x128 / 128x128 scales), the rest under BF16 autocast; auto: bf16 on a GPU, fp32 on "
                        "a CPU")
    p.add_argument("--bf16-moments", action="store_true", help="keep AdamW moments in BF16")
    p.add_argument("--recompute", action="store_true", help="recompute RMSNorm + MLA up-projections in backward")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY", help="keep a CPU EMA of the parameters")
    p.add_argument("--bias-update-speed", type=float, default=d.bias_update_speed, help="γ (0 disables)")
    p.add_argument("--balance-alpha", type=float, default=d.balance_alpha, help="α of the sequence-wise loss")
    p.add_argument("--mtp-lambda", type=float, default=d.mtp_lambda)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest valid checkpoint in --out, with the settings the run started with")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing run in --out (checkpoints, metrics, final/) and start again; with "
                        "--resume: allow replacing final/ when the resumed run trains further")
    p.add_argument("--allow-changed", action="append", default=[], metavar="SETTING",
                   help="with --resume: accept a different SETTING than the run started with (repeatable or "
                        "comma-separated): " + ", ".join(IDENTITY))
    p.add_argument("--device", default="auto")
    p.add_argument("--pp", type=int, default=d.pp, help="pipeline-parallel ranks (under torchrun: world = pp × dp)")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help=f"pipeline schedule with --pp > 1 (default {d.schedule})")
    p.add_argument("--microbatches", type=int, default=d.microbatches,
                   help="pipeline micro-batches per step (default: the fewest the schedule allows)")
    p.add_argument("--ep", type=int, default=d.ep,
                   help="expert-parallel ranks: each MoE layer's experts spread over groups of EP ranks "
                        "(under torchrun; EP must divide the world, world = dp × ep)")
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node,
                   help="ranks per node for --ep (simulated nodes on one machine; default: torchrun's local world)")
    p.add_argument("--two-hop", action="store_true",
                   help="--ep dispatch: one inter-node send per (token, node), then intra-node forwarding")
    p.add_argument("--fp8-dispatch", action="store_true", help="--ep dispatch in FP8 (E4M3, 1×128 scales)")
    p.add_argument("--dispatch-capacity", action="store_true",
                   help="flat --ep dispatch: send each rank a block padded to the capacity learnt from the "
                        "previous dispatch instead of exchanging counts first (one collective fewer per MoE "
                        "layer, about 1/8 more bytes: for latency-bound all-to-alls)")
    p.add_argument("--overlap", action="store_true",
                   help="hide the --ep all-to-alls behind compute: two micro-batches run at once on two lanes "
                        "(DualPipe's F&B pairs with --pp; --grad-accum 2 without)")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="under torchrun: a rank waiting longer than this on the others (a frozen or dead peer) "
                        "stops with an error naming the silent rank (default 600)")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                   help="memory the pre-check may count on per rank (default: what the device has free); the "
                        "run is refused when its estimate (weights + gradients + AdamW + activations) exceeds it")
    g = p.add_argument_group("continued training and context extension (SPEC §2.5)")
    g.add_argument("--from", dest="from_", default=None, metavar="RUN_OR_MODEL_DIR",
                   help="start from the weights (and config) of a run directory or an HF-layout model directory")
    g.add_argument("--extend-context", type=float, default=None, metavar="FACTOR",
                   help="with --from: a YaRN extension stage: rope_scaling factor FACTOR over the source's "
                        "pre-trained length, max_position_embeddings = that length × FACTOR")
    g.add_argument("--original-length", type=int, default=None, metavar="N",
                   help="the pre-trained length YaRN scales from (default: the source's rope_scaling, else the "
                        "--seq-len its run trained at, else its max_position_embeddings)")
    g.add_argument("--yarn-beta-fast", type=float, default=None,
                   help=f"with --extend-context: YaRN β_fast (default {YARN_DEFAULTS['yarn_beta_fast']:g}, the report's)")
    g.add_argument("--yarn-beta-slow", type=float, default=None,
                   help=f"with --extend-context: YaRN β_slow (default {YARN_DEFAULTS['yarn_beta_slow']:g}, the report's)")
    g.add_argument("--yarn-mscale", type=float, default=None,
                   help="with --extend-context: YaRN mscale (= mscale_all_dim): softmax scale × "
                        f"(0.1·mscale·ln FACTOR + 1)² (default {YARN_DEFAULTS['yarn_mscale']:g}, the report's)")
    g.add_argument("--mix", default=None, metavar="passkey:SHARE[,copy:SHARE]",
                   help="replace a share of the training sequences with synthetic documents: passkey "
                        "(e.g. passkey:0.1), to teach retrieval over the whole window; copy (a random "
                        "token span repeated), to teach a model that cannot copy yet")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--sample-prompt", default="def ", help="prompt for the sample printed at the end ('' to skip)")


def check_args(args) -> None:
    """Flag values no run can use (a UserError naming the flag), before anything is loaded or written."""
    check_finite("--lr", args.lr, lo=0, lo_open=True, hi=MAX_LR)
    adam_betas(args)
    if args.min_lr_ratio is not None:
        check_finite("--min-lr-ratio", args.min_lr_ratio, lo=0, hi=1)
        if args.lr_schedule != "cosine":
            raise CLIError(f"--min-lr-ratio only applies with --lr-schedule cosine (got --lr-schedule "
                           f"{args.lr_schedule})")
    check_finite("--ema", args.ema, lo=0, hi=1, hi_open=True)
    for flag in ("bias_update_speed", "balance_alpha", "mtp_lambda"):
        check_finite("--" + flag.replace("_", "-"), getattr(args, flag), lo=0)
    for flag in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep", "pp", "ep"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), lo=1)
    for flag in ("warmup", "eval_every", "save_every", "microbatches", "gpus_per_node", "seed"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), lo=0)
    check_int("--seed", args.seed, hi=2**63 - 1)
    if args.max_data_bytes is not None:
        check_int("--max-data-bytes", args.max_data_bytes, lo=1)
    if args.pp == 1 and (args.schedule is not None or args.microbatches):
        flag = "--schedule" if args.schedule is not None else "--microbatches"
        raise CLIError(f"{flag} needs --pp > 1 (it sets up the pipeline); without one use --grad-accum")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world % args.pp:   # before any data is prepared (the trainer says the same)
        raise CLIError(f"--pp {args.pp} must divide the number of processes ({world}); run under torchrun "
                       f"--nproc-per-node {args.pp} (or a multiple)")
    check_device("--device", args.device)
    check_finite("--dist-timeout", args.dist_timeout, lo=0, lo_open=True)
    if args.memory_limit is not None:
        check_finite("--memory-limit", args.memory_limit, lo=0, lo_open=True)
    bad = sorted(set(allowed_changes(args)) - set(IDENTITY))
    if bad:
        raise CLIError(f"--allow-changed {','.join(bad)}: unknown setting; choose from {', '.join(IDENTITY)}")
    if allowed_changes(args) and not args.resume:
        raise CLIError("--allow-changed only applies with --resume")
    if args.extend_context is not None and not args.from_:
        raise CLIError("--extend-context needs --from (the model whose context is extended)")
    for name in ("original_length", *YARN_DEFAULTS):
        if getattr(args, name) is not None and args.extend_context is None:
            raise CLIError(f"--{name.replace('_', '-')} only applies with --extend-context")
    if args.original_length is not None:
        check_int("--original-length", args.original_length, lo=1)
    if args.from_ and (args.preset or args.config):
        raise CLIError("--from gives the model config: drop --preset/--config")
    if args.from_ and args.pp > 1:
        raise CLIError("--from with --pp > 1 is not supported: start the stage with --pp 1")
    if args.from_ and os.path.abspath(args.from_).startswith(os.path.abspath(args.out).rstrip(os.sep) + os.sep) \
            or args.from_ and os.path.abspath(args.from_) == os.path.abspath(args.out):
        raise CLIError(f"--from {args.from_} lies inside --out {args.out}: write the new stage to another directory")
    if args.mix:
        from ..data.passkey import parse_mix
        parse_mix(args.mix)


def adam_betas(args) -> tuple[float, float]:
    """(β1, β2) of --adam-betas "B1,B2"; a UserError naming the flag unless both are numbers in [0, 1)."""
    text = args.adam_betas
    parts = [x.strip() for x in str(text).split(",")]
    try:
        betas = tuple(float(x) for x in parts)
    except ValueError:
        raise CLIError(f"--adam-betas {text}: expected two numbers B1,B2, e.g. 0.9,0.95") from None
    if len(betas) != 2:
        raise CLIError(f"--adam-betas {text}: expected two numbers B1,B2, e.g. 0.9,0.95")
    for name, b in zip(("B1", "B2"), betas):
        if not (b == b and 0 <= b < 1):   # b == b: not NaN
            raise CLIError(f"--adam-betas {text}: {name} must be in [0, 1), got {b:g}")
    return betas


def min_lr_ratio(args) -> float:
    from .trainer import TrainConfig

    return TrainConfig().min_lr_ratio if args.min_lr_ratio is None else args.min_lr_ratio


def allowed_changes(args) -> list[str]:
    return [x.strip() for a in (args.allow_changed or []) for x in a.split(",") if x.strip()]


def _model_config(args):
    from ..config import ModelConfig

    if getattr(args, "from_", None):
        return _source_config(args)
    if args.config and args.preset:
        raise CLIError("give --preset or --config, not both")
    cfg = ModelConfig.load(args.config) if args.config else ModelConfig.preset(args.preset or "tiny")
    if cfg.defaulted:
        print(f"dsv3 train: warning: --config {args.config}: keys missing from config.json take transformers' "
              f"defaults: " + ", ".join(f"{k}={v!r}" for k, v in cfg.defaulted.items()), file=sys.stderr)
    return cfg


def _source_config(args):
    """The config of --from, extended by --extend-context (``train.extend``)."""
    from ..config import ModelConfig
    from .extend import extended_config, original_length, resolve_source

    model_dir, run_dir = resolve_source(args.from_)
    try:
        cfg = ModelConfig.from_hf(model_dir)
    except ValueError as e:
        raise CLIError(f"--from {args.from_}: {e}") from None
    if args.extend_context is None:
        return cfg
    original, where = original_length(cfg, run_dir, args.original_length)
    yarn = {k: YARN_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k) for k in YARN_DEFAULTS}
    cfg = extended_config(cfg, args.extend_context, original, args.seq_len, beta_fast=yarn["yarn_beta_fast"],
                          beta_slow=yarn["yarn_beta_slow"], mscale=yarn["yarn_mscale"])
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"extending the context of {model_dir}: YaRN factor {args.extend_context:g} over {original} original "
              f"positions ({where}), max_position_embeddings {cfg.max_position_embeddings}", flush=True)
    return cfg


# ------------------------------------------------------------------------------------ the run directory
def _run_contents(out: str) -> list[str]:
    """What of a previous run ``out`` holds (names for messages)."""
    from .trainer import has_checkpoints

    found = []
    if has_checkpoints(out):
        found.append("checkpoints/")
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
        found.append("metrics.jsonl")
    for name in ("final", "summary.json"):
        if os.path.exists(os.path.join(out, name)):
            found.append(name + ("/" if name == "final" else ""))
    return found


def _exported_step(out: str) -> int | None:
    """The step final/ was exported at (summary.json), None when unknown."""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def check_layout(args) -> None:
    """What the trainer checks too, but only after the data is prepared and --out (--overwrite: emptied);
    after ``TrainConfig.validate``, so that a layout the model cannot take (--ep not dividing its experts)
    is named before one this launch cannot (too few processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dp = world // args.pp
    if dp % args.ep:
        raise CLIError(f"--ep {args.ep} must divide the data-parallel ranks of a stage ({dp} = {world} processes / "
                       f"--pp {args.pp}); run under torchrun --nproc-per-node {args.ep * args.pp} (or a multiple)")
    if args.ep > 1:   # as the mesh needs them (parallel.mesh.MeshSpec), named by their flags
        nodes = args.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
        what = f"--gpus-per-node {nodes}" if args.gpus_per_node else \
            f"torchrun's ranks per node ({nodes}; --gpus-per-node sets another)"
        if world % nodes:
            raise CLIError(f"{what} must divide the number of processes ({world})")
        if args.ep % nodes and nodes % args.ep:
            raise CLIError(f"--ep {args.ep} must be a multiple or a divisor of {what}, so that each expert group "
                           f"spans whole nodes or lies within one")
        if args.two_hop and args.ep <= nodes:
            raise CLIError(f"--two-hop needs an expert group over more than one node: --ep {args.ep} ranks fit in "
                           f"one node of {what}")
    if args.batch_size % (dp * args.grad_accum):
        raise CLIError(f"--batch-size {args.batch_size} must be divisible by data-parallel world size × "
                       f"--grad-accum ({dp} × {args.grad_accum})")
    if args.pp > 1:   # the pipeline's micro-batches split each replica's batch (was found after the data was prepared)
        from ..parallel.pipeline.stages import default_microbatches
        from .trainer import TrainConfig

        local = args.batch_size // dp
        if args.microbatches and local % args.microbatches:
            raise CLIError(f"--microbatches {args.microbatches} must divide the per-replica batch ({local} sequences = "
                           f"--batch-size {args.batch_size} / {dp} data-parallel ranks)")
        if not args.microbatches:
            try:
                default_microbatches(args.schedule or TrainConfig.schedule, args.pp, local)
            except ValueError as e:
                raise CLIError(str(e)) from None


def check_run_dir(args) -> None:
    """Read-only checks of --out (every rank runs them, so all refuse alike): a run already there is
    continued only with --resume and replaced only with --overwrite; --resume does not replace final/
    unless --overwrite says so."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out} exists and is not a directory")
    found = _run_contents(out) if os.path.isdir(out) else []
    if found and not args.resume and not args.overwrite:
        raise CLIError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue it "
                       f"or --overwrite to delete it and start over")
    if args.resume and os.path.isdir(os.path.join(out, "final")) and not args.overwrite:
        step = _exported_step(out)
        if step is None or step < args.steps:
            at = f"step {step}" if step is not None else "an unknown step (no summary.json)"
            raise CLIError(f"--resume: {out}/final/ holds the model exported at {at}; training on to --steps "
                           f"{args.steps} would replace it: pass --overwrite to allow that (or move final/ away)")


def _is_prepared(data: str) -> bool:
    """--data names a prepared token directory (its index.json exists), not a corpus to prepare."""
    import fsspec

    if data == "builtin":
        return False
    fs, root = fsspec.core.url_to_fs(data)
    return fs.exists(root.rstrip("/") + "/index.json")


def check_run_data(args) -> None:
    """Read-only, before --out changes: the flags that say what to prepare are not ignored. A prepared --data
    takes no --max-data-bytes; a corpus whose tokens RUN/data already holds (an earlier run, or one stopped
    after preparing them, which --overwrite keeps) is reused only when it is the same corpus, and the same
    --max-data-bytes and --tokenizer when those are given."""
    from ..data.dataset import _describe

    if _is_prepared(args.data):
        if args.max_data_bytes is not None:
            raise CLIError(f"--max-data-bytes only applies to a corpus to prepare; --data {args.data} is already "
                           f"tokenised")
        return
    out_data = os.path.join(args.out, "data")
    try:
        with open(os.path.join(out_data, "index.json")) as f:
            meta = json.load(f)
        source = meta["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return     # nothing prepared there (or not readable: the dataset reports it)
    same = source == _describe(None if args.data == "builtin" else args.data)
    if not same and args.data != "builtin" and "://" not in args.data:   # another spelling of the same path
        try:
            with open(os.path.join(args.out, RUN_FILE)) as f:
                same = json.load(f)["data"]["source"] == os.path.abspath(args.data)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    how = "delete it to prepare the data again, or give the settings it was prepared with"
    if not same:
        raise CLIError(f"--data {args.data}: {out_data} already holds the tokens of another corpus ({source[:120]}); "
                       f"{how}")
    if args.max_data_bytes is not None and meta.get("max_bytes") != args.max_data_bytes:
        raise CLIError(f"--max-data-bytes {args.max_data_bytes}: {out_data} was prepared with "
                       f"{meta.get('max_bytes') or 'no'} --max-data-bytes; {how}")
    if args.tokenizer:
        from ..data import Tokenizer

        if Tokenizer.from_file(args.tokenizer).fingerprint() != meta.get("tokenizer_sha256"):
            raise CLIError(f"--tokenizer {args.tokenizer}: {out_data} was prepared with another tokenizer; {how}")


def _prepare_run_dir(args) -> None:
    """Rank 0: with --overwrite (and no --resume) delete the previous run; check --out is writable."""
    out = args.out
    if args.overwrite and not args.resume:
        for name in ("checkpoints", "final", ".final.tmp", "plots"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json", RUN_FILE):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write to the run directory ({e.strerror or e})") from None


def run_identity(args, cfg, data_dir: str) -> dict:
    """What makes a run the same run (compared by --resume)."""
    from ..data.dataset import INDEX

    try:
        with open(os.path.join(data_dir, INDEX)) as f:
            index = json.load(f)
        fingerprint = {"tokenizer_sha256": index.get("tokenizer_sha256"),
                       "train_tokens": sum(s["tokens"] for s in index["splits"]["train"]["shards"])}
    except (OSError, ValueError, KeyError, TypeError):
        fingerprint = None     # a remote prepared directory: the --data string alone
    data = args.data if args.data == "builtin" or "://" in args.data else os.path.abspath(args.data)
    data = {"source": data, "prepared": fingerprint}
    if getattr(args, "mix", None):
        data["mix"] = args.mix
    identity = {"config": cfg.to_hf(), "seed": args.seed, "data": data,
            "batch-size": args.batch_size, "seq-len": args.seq_len, "lr": args.lr, "warmup": args.warmup,
            "steps": args.steps, "adam-betas": list(adam_betas(args)), "lr-schedule": args.lr_schedule,
            "min-lr-ratio": min_lr_ratio(args), "precision": resolved_precision(args.precision, args.device),
            "ema": args.ema, "bf16-moments": args.bf16_moments, "mtp-lambda": args.mtp_lambda,
            "balance-alpha": args.balance_alpha, "bias-update-speed": args.bias_update_speed,
            "fp8-dispatch": args.fp8_dispatch}
    if getattr(args, "from_", None):
        identity["from"] = os.path.abspath(args.from_)
    return identity


def resolved_precision(precision: str, device: str) -> str:
    """--precision as the trainer resolves it on ``--device`` (auto: bf16 on a GPU, fp32 on a CPU)."""
    from .trainer import pick_device, resolve_precision

    return resolve_precision(precision, pick_device(device))


def no_valid_checkpoint(out: str, why: str = "the warnings say why") -> CLIError:
    """The --resume error for a run directory whose checkpoints all fail verification: not a reason to
    start over."""
    return CLIError(f"--resume: no checkpoint in {os.path.join(out, 'checkpoints')} verifies ({why}); move them "
                    f"away to start over, or use --overwrite without --resume")


def _checkpoint_identity(out: str) -> dict | None:
    """What the meta.json of the checkpoint a resume loads (the newest that verifies,
    ``checkpoint.newest_valid``; broken newer ones are skipped, as the resume skips them) says of the run's
    identity; None without a checkpoint. Checkpoints none of which verifies: a CLIError saying so."""
    from ..checkpoint import list_checkpoints, newest_valid

    root = os.path.join(out, "checkpoints")
    if not list_checkpoints(root):
        return None
    path, broken = newest_valid(root, warn=False)   # the resume that follows warns about the skipped ones
    if path is None:
        raise no_valid_checkpoint(out, "; ".join(f"{name}: {why}" for name, why in broken.items()))
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        tc = meta["train_config"]
        rec = {"config": meta["model_config"], "seed": tc["seed"], "batch-size": tc["batch_size"],
               "seq-len": tc["seq_len"], "lr": tc["lr"], "warmup": tc["warmup"], "steps": tc["steps"],
               "adam-betas": list(tc.get("betas", OLD_DEFAULTS["adam-betas"])),
               "lr-schedule": tc.get("lr_schedule", OLD_DEFAULTS["lr-schedule"]),
               "min-lr-ratio": tc.get("min_lr_ratio", OLD_DEFAULTS["min-lr-ratio"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for key, name in STEP_SETTINGS.items():
        if name in tc and not (key == "precision" and tc[name] == "auto"):   # auto: resolved where it ran
            rec[key] = tc[name]
    return rec


def _recorded_identity(out: str) -> dict | None:
    """The identity in RUN/run.json, or (a run from before run.json) what the newest checkpoint's meta.json
    says; None for a fresh directory."""
    path = os.path.join(out, RUN_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError) as e:
            raise CLIError(f"--resume: {path} is unreadable ({e}); delete it to skip the check") from None
        if not isinstance(rec, dict):
            raise CLIError(f"--resume: {path} does not hold a JSON object; delete it to skip the check")
        rec = {**OLD_DEFAULTS, **rec}
        if not set(STEP_SETTINGS) <= set(rec):   # recorded before these were compared
            rec = {**{k: v for k, v in (_checkpoint_identity(out) or {}).items() if k in STEP_SETTINGS}, **rec}
        return rec
    return _checkpoint_identity(out)


def _same_config_value(key: str, old, new) -> bool:
    """Whether a config.json key holds the same value in a run's record and now. An ``eos_token_id`` of one id
    and a one-element list of that id are the same (a run recorded before eos lists were kept whole holds the
    id, its config.json now gives the list, or the other way round); any other difference is a change."""
    if key == "eos_token_id":
        old, new = ([v] if isinstance(v, int) and not isinstance(v, bool) else v for v in (old, new))
    return old == new


def _config_changes(old, new) -> list[str]:
    """The keys of two model configs (config.json dicts) that differ (:func:`_same_config_value`)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [] if old == new else ["config"]
    return sorted(k for k in set(old) | set(new) if not _same_config_value(k, old.get(k), new.get(k)))


def _describe_change(key: str, old, new) -> str:
    if key == "config":
        old, new = (c if isinstance(c, dict) else {} for c in (old, new))
        diff = _config_changes(old, new)
        return "the model config (" + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4]) + \
            (" …" if len(diff) > 4 else "") + ")"
    if key == "data":
        old = old if isinstance(old, dict) else {}
        if old.get("source") != new.get("source"):
            return f"--data ({old.get('source')} -> {new.get('source')})"
        return "--data (the prepared tokens differ)"
    if key == "from":
        return f"--from ({old or 'none'} -> {new or 'none'})"
    return f"--{key} ({old!r} -> {new!r})"


def check_identity(args, identity: dict) -> bool:
    """With --resume: refuse settings that differ from the run's start unless --allow-changed names them.
    Returns whether RUN/run.json should be (re)written."""
    recorded = _recorded_identity(args.out) if args.resume else None
    if recorded is None:
        return True
    allowed = set(allowed_changes(args))
    # "from" absent from run.json: the run did not start with --from; any other setting absent: recorded
    # before it was compared
    has_file = os.path.exists(os.path.join(args.out, RUN_FILE))
    changed = [k for k in IDENTITY if (k in recorded or (k == "from" and has_file))
               and (_config_changes(recorded[k], identity[k]) if k == "config" else recorded.get(k) != identity.get(k))]
    if ("data" in changed and isinstance(recorded["data"], dict)
            and None in (recorded["data"].get("prepared"), identity["data"]["prepared"])
            and recorded["data"].get("source") == identity["data"]["source"]):
        changed.remove("data")    # one side has no fingerprint: the same --data is the same data
    refused = [k for k in changed if k not in allowed]
    if refused:
        raise CLIError(f"--resume: the run in {args.out} started with other settings: "
                       + "; ".join(_describe_change(k, recorded.get(k), identity.get(k)) for k in refused)
                       + ". Use the same settings, or pass --allow-changed " + ",".join(refused)
                       + " to continue with the new ones")
    return bool(changed) or not has_file or not set(identity) <= set(recorded)


def clear_metrics(out: str) -> None:
    """A --resume that found no checkpoint starts from step 0: the steps a killed run logged go."""
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        os.remove(path)


def _dataset(args, cfg, rank: int, world: int):
    """Open the token dataset, preparing it (once, on rank 0) into RUN/data if --data is a corpus."""
    import fsspec

    from ..data import TokenDataset, Tokenizer, prepare

    data = args.data
    fs, root = fsspec.core.url_to_fs(data) if data != "builtin" else (None, None)
    prepared = fs is not None and fs.exists(root.rstrip("/") + "/index.json")
    if not prepared:
        target = os.path.join(args.out, "data")
        if not os.path.exists(os.path.join(target, "index.json")):
            if rank == 0:
                tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else _source_tokenizer(args)
                prepare(None if data == "builtin" else data, target, tok, vocab_size=cfg.vocab_size,
                        max_bytes=args.max_data_bytes, progress=not args.no_progress, seed=args.seed)
            if world > 1:
                import torch.distributed as dist
                dist.barrier()
        data = target
    train = TokenDataset(data, "train", args.seq_len)
    if prepared and args.tokenizer and \
            Tokenizer.from_file(args.tokenizer).fingerprint() != train.meta.get("tokenizer_sha256"):
        raise CLIError(f"--tokenizer {args.tokenizer}: --data {args.data} is already tokenised, with another "
                       f"tokenizer (its tokenizer.json); drop --tokenizer, or give the corpus to prepare again")
    if train.vocab_size > cfg.vocab_size:
        raise CLIError(f"the tokenizer of {data} has {train.vocab_size} tokens but the model's vocab_size is "
                       f"{cfg.vocab_size}")
    try:
        val = TokenDataset(data, "val", args.seq_len)
    except ValueError:
        val = None  # validation split too small for one window
    tokenizer = Tokenizer.from_file(os.path.join(data, "tokenizer.json"))
    source_tok = _source_tokenizer(args)
    if source_tok is not None and source_tok.fingerprint() != tokenizer.fingerprint():
        raise CLIError(f"--data {args.data}: its tokens were made with another tokenizer than the --from model's "
                       f"({args.from_}); give the data the model was trained on, or a corpus to prepare with it")
    if getattr(args, "mix", None):
        from ..data.passkey import MixedDataset, parse_mix
        train = MixedDataset(train, parse_mix(args.mix), tokenizer)
    return train, val, tokenizer


def _source_tokenizer(args):
    """The tokenizer.json of the --from model, or None."""
    from ..data import Tokenizer
    from .extend import resolve_source

    if not getattr(args, "from_", None):
        return None
    path = os.path.join(resolve_source(args.from_)[0], "tokenizer.json")
    return Tokenizer.from_file(path) if os.path.exists(path) else None


def train_config(args, **extra):
    """The TrainConfig of parsed ``dsv3 train`` flags (also what ``dsv3 sft`` runs with)."""
    from .trainer import TrainConfig

    return TrainConfig(out=args.out, data=args.data, steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
                       betas=adam_betas(args), lr_schedule=args.lr_schedule, min_lr_ratio=min_lr_ratio(args),
                       seed=args.seed, precision=args.precision, bf16_moments=args.bf16_moments,
                       recompute=args.recompute, ema_decay=args.ema, bias_update_speed=args.bias_update_speed,
                       balance_alpha=args.balance_alpha, mtp_lambda=args.mtp_lambda, eval_every=args.eval_every,
                       eval_batches=args.eval_batches, save_every=args.save_every, keep=args.keep,
                       progress=not args.no_progress, device=args.device, pp=args.pp,
                       schedule=args.schedule or TrainConfig.schedule, microbatches=args.microbatches, ep=args.ep,
                       gpus_per_node=args.gpus_per_node,
                       two_hop=args.two_hop, fp8_dispatch=args.fp8_dispatch, overlap=args.overlap,
                       dispatch_capacity=args.dispatch_capacity, **extra)


def run(args) -> int:
    from .extend import resolve_source
    from .trainer import dist_from_env, pick_device

    check_args(args)
    cfg = _model_config(args)
    tc = train_config(args, init_from=resolve_source(args.from_)[0] if args.from_ else "")
    tc.validate(cfg)
    check_layout(args)
    check_run_dir(args)
    check_run_data(args)
    from .watchdog import Heartbeat, init_distributed, is_timeout, timeout_message

    device = pick_device(args.device)
    check_memory(args, cfg, device)
    init_distributed(device.type, args.dist_timeout)
    info = dist_from_env(device)
    held: dict = {}
    heartbeat = Heartbeat(info.rank, info.world, lambda: getattr(held.get("trainer"), "step", None)).start() \
        if info.world > 1 else None
    try:
        return _run(args, cfg, tc, info, held)
    except Exception as e:
        if heartbeat is not None and is_timeout(e):
            step = getattr(held.get("trainer"), "step", None)
            raise CLIError(timeout_message(e, info.rank, step, args.dist_timeout, heartbeat)) from None
        raise
    finally:
        if heartbeat is not None:
            heartbeat.stop()


def check_memory(args, cfg, device) -> None:
    """Refuse a run whose estimated memory exceeds what this rank has (before any allocation)."""
    from ..plan.local import check_fits, training_bytes

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    from .trainer import resolve_precision

    bf16 = resolve_precision(args.precision, device) in ("bf16", "fp8")
    parts = training_bytes(cfg, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
                           world=world, pp=args.pp, ep=args.ep, bf16=bf16, bf16_moments=args.bf16_moments,
                           recompute=args.recompute)
    check_fits(parts, device, args.memory_limit,
               f"training {args.config or args.preset or 'tiny'} at --batch-size {args.batch_size} --seq-len "
               f"{args.seq_len}" + (f" on {world} ranks" if world > 1 else ""))


def _run(args, cfg, tc, info, held: dict) -> int:
    import torch

    from .trainer import Trainer

    if info.main:
        _prepare_run_dir(args)
    if info.world > 1:
        torch.distributed.barrier()
    train, val, tokenizer = _dataset(args, cfg, info.rank, info.world)
    identity = run_identity(args, cfg, train.path)
    if check_identity(args, identity) and info.main:
        write_json_atomic(os.path.join(args.out, RUN_FILE), identity)
    trainer = held["trainer"] = Trainer(cfg, tc, train, val, tokenizer)
    if args.resume:
        try:
            resumed = trainer.resume()
        except RuntimeError as e:   # load_state_dict: the checkpoint's tensors do not fit this model
            if "size mismatch" not in str(e) and "Missing key" not in str(e) and "Unexpected key" not in str(e):
                raise
            raise CLIError(f"--resume: the checkpoint in {args.out} does not fit the model being trained "
                           f"({str(e).strip().splitlines()[-1][:200]})") from None
        if not resumed:
            from .trainer import has_checkpoints

            if has_checkpoints(args.out):   # there are some, but none verifies: do not silently start over
                raise no_valid_checkpoint(args.out)
            if info.main:
                print(f"no checkpoint in {args.out}; starting from scratch", flush=True)
                clear_metrics(args.out)
    if trainer.step >= tc.steps and info.main:
        print(f"the run in {args.out} is already at step {trainer.step} of {tc.steps}")
    summary = trainer.fit()
    model = trainer.full_model()   # with --ep: the experts gathered to rank 0 (collective)
    if info.main:
        _finish(args, trainer, tokenizer, summary, model)
    if info.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _finish(args, trainer, tokenizer, summary: dict, model=None) -> None:
    from ..hf import read_generation_config, save_pretrained

    model = trainer.model if model is None else model
    final = os.path.join(args.out, "final")
    if "val_loss_start" in summary:
        print(f"validation loss: {summary['val_loss_start']:.4f} before training")
    if "val_loss_end" in summary:
        print(f"validation loss: {summary['val_loss_end']:.4f} after {trainer.step} steps")
    if os.path.isdir(final) and _exported_step(args.out) == trainer.step and not args.overwrite:
        print(f"{final} already holds the model of step {trainer.step}; kept as it is")
    else:
        # written beside final/ and renamed into place: a killed export leaves the old final/ (or none)
        tmp, old = os.path.join(args.out, ".final.tmp"), os.path.join(args.out, ".final.old")
        shutil.rmtree(tmp, ignore_errors=True)
        # a run started --from a model keeps that model's generation defaults (sampling, stop ids)
        source = getattr(trainer.tc, "init_from", "")
        generation = read_generation_config(source, model.cfg) if source else None
        save_pretrained(model, tmp, generation_config=generation)
        tokenizer.save(tmp)
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        print(f"model exported to {final} (Hugging Face layout + tokenizer.json)")
    # after final/: a kill in between leaves a summary older than final/, which --resume refuses to replace
    write_json_atomic(os.path.join(args.out, "summary.json"), {"step": trainer.step, **summary})
    if not args.no_plots:
        from .plots import plot_run
        for path in plot_run(args.out):
            print(f"plot: {path}")
    if args.sample_prompt:
        from ..infer.generate import generate_text
        print(f"sample ({args.sample_prompt!r}):")
        generate_text(model, tokenizer, args.sample_prompt, max_new_tokens=80, temperature=0.8,
                      top_k=50, seed=args.seed, stream=sys.stdout)
        print()
