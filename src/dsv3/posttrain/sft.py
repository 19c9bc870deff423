"""``dsv3 sft --model DIR --data chat.jsonl --out RUN``: supervised fine-tuning on chat data (DeepSeek-R1's
cold start and its rejection-sampling SFT round).

The records are rendered with the model's chat template (:mod:`.chat`); the loss is the next-token
cross-entropy on the assistant tokens only (targets elsewhere are ignored), one record per row, so no
token attends across records. Everything else is ``dsv3 train``'s machinery, reused as it is: the
:class:`~dsv3.train.trainer.Trainer` (ZeRO-1 under torchrun, ``--ep``, AdamW, warm-up + cosine, MTP loss
on the same masked targets, aux-loss-free bias updates), atomic checkpoints with exact ``--resume``,
progress bar, ``metrics.jsonl``, plots, and the export to ``RUN/final`` with tokenizer and chat template.
"""

from __future__ import annotations

import argparse
import os

from ..errors import UserError
from .common import RUN_FILE, check_allow_changed, check_identity, copy_template, file_sha256, model_fingerprint, \
    open_model_dir, write_json_atomic

IDENTITY = {"model": "--model", "data": "--data", "seed": "--seed", "batch-size": "--batch-size",
            "seq-len": "--seq-len", "lr": "--lr", "warmup": "--warmup", "steps": "--steps"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the model to start from: an HF-layout directory with tokenizer.json "
                                                   "(a dsv3 train export or any DeepSeek-V3-family directory)")
    p.add_argument("--data", required=True, help="chat data: JSON lines of {\"messages\": [{role, content}, …]}")
    p.add_argument("--val-data", default=None, help="chat data for the validation loss (optional)")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, final/)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="global batch in records")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per record (longer records are cut)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp8"])
    p.add_argument("--bf16-moments", action="store_true")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY")
    p.add_argument("--bias-update-speed", type=float, default=1e-3, help="γ of the aux-loss-free balancing (0 disables)")
    p.add_argument("--balance-alpha", type=float, default=1e-4)
    p.add_argument("--mtp-lambda", type=float, default=0.3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-changed", action="append", default=[], metavar="SETTING",
                   help="with --resume: accept a different SETTING: " + ", ".join(IDENTITY))
    p.add_argument("--device", default="auto")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (under torchrun)")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--two-hop", action="store_true")
    p.add_argument("--fp8-dispatch", action="store_true")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GB")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")


def _train_args(args) -> None:
    """Every attribute dsv3 train's checks and export read: its defaults, then this command's flags."""
    from ..train import cli as train_cli

    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    for k, v in vars(p.parse_args([])).items():
        if not hasattr(args, k):
            setattr(args, k, v)
    args.preset, args.config, args.tokenizer, args.sample_prompt = None, None, None, ""


def run(args) -> int:
    from ..train import cli as train_cli
    from ..train.trainer import dist_from_env, pick_device
    from ..train.watchdog import init_distributed

    _train_args(args)
    allowed = list(args.allow_changed)
    args.allow_changed = []          # this command's settings are checked below, not dsv3 train's
    train_cli.check_args(args)
    args.allow_changed = allowed
    check_allow_changed(args, IDENTITY)
    cfg, tokenizer, template = open_model_dir(args.model)
    from .chat import SFTDataset, check_targets, encode_file

    train_records = encode_file(args.data, template, tokenizer, "--data")
    check_targets(train_records, args.seq_len, args.data, "--data")
    val_records = encode_file(args.val_data, template, tokenizer, "--val-data") if args.val_data else None
    if val_records:
        check_targets(val_records, args.seq_len, args.val_data, "--val-data")
    tc = train_cli.train_config(args)
    try:
        tc.validate(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    train_cli.check_run_dir(args)
    device = pick_device(args.device)
    train_cli.check_memory(args, cfg, device)
    init_distributed(device.type, args.dist_timeout)
    info = dist_from_env(device)
    if info.main:
        train_cli._prepare_run_dir(args)
    import torch

    if info.world > 1:
        torch.distributed.barrier()
    identity = {"model": model_fingerprint(args.model), "seed": args.seed, "batch-size": args.batch_size,
                "seq-len": args.seq_len, "lr": args.lr, "warmup": args.warmup, "steps": args.steps,
                "data": {"path": os.path.abspath(args.data), "sha256": file_sha256(args.data)},
                "config": cfg.to_hf()}
    if check_identity(args, identity, IDENTITY) and info.main:
        write_json_atomic(os.path.join(args.out, RUN_FILE), identity)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    train = SFTDataset(train_records, args.seq_len, pad, tokenizer.vocab_size)
    val = SFTDataset(val_records, args.seq_len, pad, tokenizer.vocab_size) if val_records else None
    if train.truncated and info.main:
        print(f"dsv3 sft: warning: {train.truncated} of {len(train)} records are longer than --seq-len "
              f"{args.seq_len} + 1 tokens and are cut", flush=True)
    trainer = run_sft(cfg, tc, train, val, tokenizer, args.model, args.resume, info)
    summary = trainer.fit()
    model = trainer.full_model()
    if info.main:
        train_cli._finish(args, trainer, tokenizer, summary, model)
        copy_template(args.model, os.path.join(args.out, "final"))
    if info.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def run_sft(cfg, tc, train, val, tokenizer, model_dir: str, resume: bool, info):
    """A Trainer on the SFT data, its model filled with the weights of ``model_dir`` — or, with
    ``resume``, with the newest checkpoint of the run."""
    import torch

    from ..train.trainer import Trainer, has_checkpoints
    from .common import load_weights

    start = load_weights(model_dir)
    cfg = start.cfg            # a checkpoint without MTP layers loads without them
    trainer = Trainer(cfg, tc, train, val, tokenizer)
    resumed = False
    if resume:
        resumed = trainer.resume()
        if not resumed and has_checkpoints(tc.out):
            raise UserError(f"--resume: no checkpoint in {os.path.join(tc.out, 'checkpoints')} verifies (the "
                            f"warnings say why); move them away to start over")
        if not resumed and info.main:
            print(f"no checkpoint in {tc.out}; starting from {model_dir}", flush=True)
            path = os.path.join(tc.out, "metrics.jsonl")
            if os.path.exists(path):
                os.remove(path)
    if not resumed:
        with torch.no_grad():
            sd = {k: trainer.par.local_view(k, v.to(trainer.device)) for k, v in start.state_dict().items()}
            trainer.model.load_state_dict(sd)
    del start
    return trainer
