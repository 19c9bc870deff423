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

from ..cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp8"])
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
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out and start again")
    p.add_argument("--device", default="auto")
    p.add_argument("--pp", type=int, default=d.pp, help="pipeline-parallel ranks (under torchrun: world = pp × dp)")
    p.add_argument("--schedule", default=d.schedule, choices=["1f1b", "zb1p", "dualpipe", "dualpipev"],
                   help="pipeline schedule with --pp > 1")
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
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--sample-prompt", default="def ", help="prompt for the sample printed at the end ('' to skip)")


def _model_config(args):
    from ..config import ModelConfig

    if args.config and args.preset:
        raise CLIError("give --preset or --config, not both")
    return ModelConfig.load(args.config) if args.config else ModelConfig.preset(args.preset or "tiny")


def _prepare_run_dir(args) -> None:
    from .trainer import has_checkpoints

    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out} exists and is not a directory")
    if has_checkpoints(out) and not args.resume:
        if not args.overwrite:
            raise CLIError(f"{out} already holds a run with checkpoints; pass --resume to continue it "
                           f"or --overwrite to start over (this deletes them)")
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    if args.overwrite and not args.resume and os.path.exists(os.path.join(out, "metrics.jsonl")):
        os.remove(os.path.join(out, "metrics.jsonl"))
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CLIError(f"cannot write to the run directory {out}: {e.strerror or e}") from None


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
                tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else None
                prepare(None if data == "builtin" else data, target, tok, vocab_size=cfg.vocab_size,
                        max_bytes=args.max_data_bytes, progress=not args.no_progress, seed=args.seed)
            if world > 1:
                import torch.distributed as dist
                dist.barrier()
        data = target
    train = TokenDataset(data, "train", args.seq_len)
    if train.vocab_size > cfg.vocab_size:
        raise CLIError(f"the tokenizer of {data} has {train.vocab_size} tokens but the model's vocab_size is "
                       f"{cfg.vocab_size}")
    try:
        val = TokenDataset(data, "val", args.seq_len)
    except ValueError:
        val = None  # validation split too small for one window
    tokenizer = Tokenizer.from_file(os.path.join(data, "tokenizer.json"))
    return train, val, tokenizer


def run(args) -> int:
    import torch

    from .trainer import TrainConfig, Trainer, dist_from_env, pick_device

    cfg = _model_config(args)
    tc = TrainConfig(out=args.out, data=args.data, steps=args.steps, batch_size=args.batch_size,
                     seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
                     seed=args.seed, precision=args.precision, bf16_moments=args.bf16_moments,
                     recompute=args.recompute, ema_decay=args.ema, bias_update_speed=args.bias_update_speed,
                     balance_alpha=args.balance_alpha, mtp_lambda=args.mtp_lambda, eval_every=args.eval_every,
                     eval_batches=args.eval_batches, save_every=args.save_every, keep=args.keep,
                     progress=not args.no_progress, device=args.device, pp=args.pp, schedule=args.schedule,
                     microbatches=args.microbatches, ep=args.ep, gpus_per_node=args.gpus_per_node,
                     two_hop=args.two_hop, fp8_dispatch=args.fp8_dispatch)
    tc.validate(cfg)
    info = dist_from_env(pick_device(args.device))
    if info.main:
        _prepare_run_dir(args)
    if info.world > 1:
        torch.distributed.barrier()
    train, val, tokenizer = _dataset(args, cfg, info.rank, info.world)
    trainer = Trainer(cfg, tc, train, val, tokenizer)
    if args.resume and not trainer.resume() and info.main:
        print(f"no checkpoint in {args.out}; starting from scratch", flush=True)
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
    from ..hf import save_pretrained

    model = trainer.model if model is None else model
    final = os.path.join(args.out, "final")
    save_pretrained(model, final)
    tokenizer.save(final)
    if "val_loss_start" in summary:
        print(f"validation loss: {summary['val_loss_start']:.4f} before training")
    if "val_loss_end" in summary:
        print(f"validation loss: {summary['val_loss_end']:.4f} after {trainer.step} steps")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"step": trainer.step, **summary}, f, indent=1)
    print(f"model exported to {final} (Hugging Face layout + tokenizer.json)")
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
