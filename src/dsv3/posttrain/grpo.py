"""``dsv3 grpo --model DIR --prompts FILE --reward math,format --group 8 --out RUN``: reinforcement learning
with GRPO and rule-based rewards (DeepSeek-R1 §2.2; the objective in :mod:`.loss`).

One step:

1. ``--prompts-per-step`` prompts (a pure function of ``--seed`` and the step: a fresh permutation of the
   prompt file per epoch) are rendered with the model's chat template;
2. the batched inference engine samples ``--group`` completions of each from the *current* policy (the
   engine holds the training module itself; :mod:`.rollout`), with the log-probability of every sampled
   token under that sampling policy;
3. the rule-based rewards score them (``--reward``: names or ``module:function``; their sum is the
   reward) and the advantages are (r − mean)/std within each group;
4. the frozen reference model (``--model`` as loaded at the start) gives log π_ref of the same tokens;
5. ``--updates`` optimizer steps on the batch, each the clipped ratio objective against the sampling
   policy's log-probabilities (``--clip``) minus β·KL(π‖π_ref) by the k3 estimator (``--kl``), through the
   trainer's strategy (gradient accumulation, clipping, AdamW) with the aux-loss-free bias update after
   each (the MTP modules are kept as they are).

Logged per step to RUN/metrics.jsonl: reward (mean, per function), accuracy, KL, clip fraction, ratio,
response length, generation and training tokens/s, loss, lr, gradient norm, MaxVio. Checkpoints (model,
optimizer, RNG, step) make ``--resume`` repeat the uninterrupted run exactly after a kill; the end
exports RUN/final (HF layout, tokenizer, chat template) and draws RUN/plots/grpo.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from ..errors import UserError, check_device, check_finite, check_int
from .common import RUN_FILE, check_allow_changed, check_identity, copy_template, file_sha256, model_fingerprint, \
    open_model_dir, write_json_atomic

IDENTITY = {"model": "--model", "prompts": "--prompts", "reward": "--reward", "group": "--group",
            "prompts-per-step": "--prompts-per-step", "max-new-tokens": "--max-new-tokens", "lr": "--lr",
            "clip": "--clip", "kl": "--kl", "updates": "--updates", "loss-type": "--loss-type",
            "temperature": "--temperature", "ignore-eos": "--ignore-eos", "seed": "--seed", "steps": "--steps",
            "warmup": "--warmup"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .loss import LOSS_TYPES

    p.add_argument("--model", required=True, help="the policy to start from (and the frozen reference): an HF-layout "
                                                   "directory with tokenizer.json")
    p.add_argument("--prompts", required=True, help="JSON lines: {\"prompt\": …, \"answer\": …} or {\"messages\": …}")
    p.add_argument("--reward", default="math,format", help="reward functions: names (math, format) or "
                                                           "module:function, comma-separated; the reward is their sum")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, final/, plots/)")
    p.add_argument("--group", type=int, default=8, help="G: completions sampled per prompt")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true", help="sample exactly --max-new-tokens tokens per completion "
                                                            "(no stop at end-of-sentence): for timing at a fixed length")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the ratio is taken against "
                                                                  "the raw policy's log-probabilities)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=0.2, help="ε of the clipped ratio")
    p.add_argument("--kl", type=float, default=0.04, help="β of the KL penalty to the reference (0: no reference)")
    p.add_argument("--updates", type=int, default=1, help="optimizer steps per batch of samples (μ)")
    p.add_argument("--loss-type", default="grpo", choices=LOSS_TYPES,
                   help="grpo: average each completion's tokens, then the completions; dapo: all tokens alike")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--bias-update-speed", type=float, default=1e-3, help="γ of the aux-loss-free balancing (0 disables)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="delete a run already in --out and start again")
    p.add_argument("--allow-changed", action="append", default=[], metavar="SETTING",
                   help="with --resume: accept a different SETTING: " + ", ".join(IDENTITY))
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")


def check_args(args) -> None:
    for flag in ("group", "prompts_per_step", "steps", "max_new_tokens", "updates", "grad_accum", "keep"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), lo=1)
    check_int("--group", args.group, lo=2, hi=1024)
    check_int("--warmup", args.warmup, lo=0)
    check_int("--save-every", args.save_every, lo=0)
    check_int("--seed", args.seed, lo=0, hi=2**63 - 1)
    from ..train.cli import MAX_LR

    check_finite("--lr", args.lr, lo=0, lo_open=True, hi=MAX_LR)
    check_finite("--weight-decay", args.weight_decay, lo=0)
    check_finite("--clip", args.clip, lo=0, hi=1, lo_open=True, hi_open=True)
    check_finite("--kl", args.kl, lo=0)
    check_finite("--temperature", args.temperature, lo=0, lo_open=True)
    check_finite("--bias-update-speed", args.bias_update_speed, lo=0)
    check_device("--device", args.device)
    if (args.group * args.prompts_per_step) % args.grad_accum:
        raise UserError(f"--grad-accum {args.grad_accum} must divide the samples per step (--group × "
                        f"--prompts-per-step = {args.group * args.prompts_per_step})")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError("dsv3 grpo runs in one process (its sampling engine is the single-process one); "
                        "run it without torchrun")
    check_allow_changed(args, IDENTITY)


def prompt_order(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """The prompt indices of ``step``: consecutive entries of a permutation of the prompts, a fresh one
    per epoch (a pure function of the arguments)."""
    import torch

    out, orders = [], {}
    for i in range(step * per_step, (step + 1) * per_step):
        e = i // n
        if e not in orders:
            g = torch.Generator().manual_seed((seed * 1_000_003 + e + 17) % (2**63))
            orders[e] = torch.randperm(n, generator=g).tolist()
        out.append(orders[e][i % n])
    return out


def pack_batch(comps, advantages, ref_fn, pad_id: int, accum: int, loss_type: str):
    """The training batch of a rollout: inputs [N, L] (prompt + completion, right-padded) and per-position
    fields [N, L, 5]: target token (−1 off the completion), advantage, sampling log-prob, reference log-prob,
    loss weight (× ``accum``: the strategy divides each micro-batch's loss by it)."""
    import torch

    from .loss import token_weights

    N = len(comps)
    L = max(len(c.prompt_ids) + len(c.tokens) for c in comps) - 1
    inputs = torch.full((N, L), pad_id, dtype=torch.long)
    target = torch.full((N, L), -1, dtype=torch.long)
    old = torch.zeros((N, L))
    for r, c in enumerate(comps):
        seq = c.prompt_ids + c.tokens
        inputs[r, :len(seq) - 1] = torch.tensor(seq[:-1])
        p = len(c.prompt_ids) - 1                      # position whose next token is the first sampled one
        target[r, p:p + len(c.tokens)] = torch.tensor(c.tokens)
        old[r, p:p + len(c.tokens)] = torch.tensor(c.logprobs)
    mask = target >= 0
    ref = ref_fn(inputs, target) if ref_fn is not None else old.clone()
    w = token_weights(mask, loss_type) * accum
    adv = advantages.view(N, 1).expand(N, L).float()
    fields = torch.stack([target.float(), adv, old, ref.float(), w], dim=-1)
    return inputs, fields


def policy_logprobs(model, inputs, target):
    """log π(target) [N, L] of ``model`` (0 where target < 0) and its routing (the trunk only: no MTP
    forward). The output head runs only at the positions with a target: the completions' (the prompts'
    positions would cost as much and are never scored)."""
    import torch

    from ..model.layers import at_least_fp32
    from .loss import sequence_logprobs

    routing: list = []
    h, _ = model._trunk(inputs, stats=routing)
    at = (target >= 0).flatten().nonzero().squeeze(-1)
    logits = at_least_fp32(model.lm_head(model.norm(h.flatten(0, 1).index_select(0, at))))
    lp = sequence_logprobs(logits, target.flatten().index_select(0, at))
    return torch.zeros(target.numel(), dtype=lp.dtype, device=lp.device).index_put((at,), lp).view_as(target), routing


def make_loss_fn(clip: float, beta: float):
    """The strategy's loss hook: (model, inputs [n, L], fields [n, L, 5]) → (loss, info)."""
    import torch

    from .loss import grpo_loss

    def loss_fn(model, inputs, fields):
        target = fields[..., 0].long()
        logp, routing = policy_logprobs(model, inputs, target)
        mask = target >= 0
        loss, st = grpo_loss(logp, fields[..., 2], fields[..., 3] if beta > 0 else None, fields[..., 1],
                             fields[..., 4] * mask, clip, beta)
        counts = torch.stack([r.counts for r in routing]) if routing else None
        if counts is not None and len(counts) < len(model.moe_layers()):     # the MTP layers did not run
            counts = torch.cat([counts, torch.zeros(len(model.moe_layers()) - len(counts), counts.shape[1],
                                                    dtype=counts.dtype, device=counts.device)])
        return loss, {"parts": {"main": loss.detach(), **st}, "counts": counts}

    return loss_fn


def check_prompt_lengths(prompts: list[list[int]], cfg) -> int:
    """The longest prompt's tokens; a UserError when one leaves no room for a completion."""
    longest = max(len(p) for p in prompts)
    ctx = cfg.max_position_embeddings
    if longest + 2 > ctx:
        raise UserError(f"--prompts: a prompt takes {longest} tokens; the model has {ctx} positions")
    return longest


class GRPO:
    """The GRPO loop over a :class:`dsv3.train.trainer.Trainer` (model, strategy, optimizer, checkpoints)."""

    def __init__(self, args, cfg, tokenizer, template, records, rewards):
        import torch

        from ..infer.sampling import SamplingParams
        from ..train.trainer import TrainConfig, Trainer
        from .chat import prompt_ids
        from .common import load_weights
        from .rollout import make_engine

        self.args, self.tokenizer, self.records, self.rewards = args, tokenizer, records, rewards
        self.prompts = [prompt_ids(template, tokenizer, r["messages"]) for r in records]
        longest = check_prompt_lengths(self.prompts, cfg)
        ctx = cfg.max_position_embeddings
        self.max_new = min(args.max_new_tokens, ctx - longest - 1)
        if self.max_new < args.max_new_tokens:
            print(f"dsv3 grpo: warning: --max-new-tokens {args.max_new_tokens}: the model has {ctx} positions and the "
                  f"longest prompt takes {longest}, so completions stop after {self.max_new} tokens", file=sys.stderr)
        n = args.group * args.prompts_per_step
        start = load_weights(args.model)
        cfg = start.cfg
        tc = TrainConfig(out=args.out, data=args.prompts, steps=args.steps, batch_size=n, seq_len=longest + self.max_new,
                         grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=1.0, warmup=args.warmup,
                         weight_decay=args.weight_decay, seed=args.seed, precision="fp32",
                         bias_update_speed=args.bias_update_speed, balance_alpha=0.0, mtp_lambda=0.0,
                         eval_every=0, save_every=args.save_every, keep=args.keep, progress=not args.no_progress,
                         device=args.device)
        self.trainer = Trainer(cfg, tc, None, None, tokenizer)
        self.trainer.par.loss_fn = make_loss_fn(args.clip, args.kl)
        self.model = self.trainer.model
        with torch.no_grad():
            self.model.load_state_dict({k: v.to(self.trainer.device) for k, v in start.state_dict().items()})
        self.ref = None
        if args.kl > 0:                     # the frozen reference: the starting model
            self.ref = start.to(self.trainer.device).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
        else:
            del start
        self.params = SamplingParams(args.temperature)
        self.engine = make_engine(self.model, n, min(longest + self.max_new + 1, ctx))

    def ref_logprobs(self, inputs, target):
        import torch

        with torch.no_grad():
            return policy_logprobs(self.ref, inputs.to(self.trainer.device), target.to(self.trainer.device))[0].cpu()

    def step(self) -> dict:
        import torch

        from .. import balance
        from ..train.optim import lr_at
        from .loss import group_advantages
        from .rewards import score
        from .rollout import rollout

        args, tr = self.args, self.trainer
        k = tr.step
        idx = prompt_order(len(self.prompts), k, args.prompts_per_step, args.seed)
        comps, gen = rollout(self.engine, self.tokenizer, [self.prompts[i] for i in idx], args.group, self.max_new,
                             self.params, args.seed, k, stop_at_eos=not args.ignore_eos)
        scores = [score(self.rewards, c.text, self.records[idx[c.prompt_index]]) for c in comps]
        total = torch.tensor([sum(s.values()) for s in scores], dtype=torch.float64)
        adv = group_advantages(total.view(len(idx), args.group)).view(-1).float()
        t0 = time.perf_counter()
        inputs, fields = pack_batch(comps, adv, self.ref_logprobs if self.ref is not None else None,
                                    self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id,
                                    args.grad_accum, args.loss_type)
        tr.model.train()
        lr = lr_at(k, args.lr, args.steps, args.warmup, 1.0)
        parts: dict = {}
        counts_all = None
        for _ in range(args.updates):
            for g in tr.optimizer.param_groups:
                g["lr"] = lr
            res = tr.par.step(inputs.to(tr.device), fields.to(tr.device))
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            if res.counts is not None and tr.tc.bias_update_speed > 0:
                for moe, c in zip(tr.model.moe_layers(), res.counts):
                    if c.sum() > 0:
                        balance.update_bias(moe.gate.e_score_correction_bias, c, tr.tc.bias_update_speed)
            for key, v in res.parts.items():
                parts[key] = parts.get(key, 0.0) + v / args.updates
            counts_all = res.counts if counts_all is None else counts_all + res.counts
            grad_norm = res.grad_norm
        train_s = time.perf_counter() - t0
        tr.step += 1
        names = [n for n, _ in self.rewards]
        acc_name = next((n for n in names if n in ("math", "accuracy")), names[0])
        lengths = [len(c.tokens) for c in comps]
        rec = {"step": tr.step, "reward": float(total.mean()), "reward_std": float(total.std()),
               **{f"reward_{n}": sum(s[n] for s in scores) / len(scores) for n in names},
               "accuracy": sum(s[acc_name] >= 1.0 for s in scores) / len(scores),
               "kl": parts.get("kl", 0.0), "clip_fraction": parts.get("clip_fraction", 0.0),
               "ratio": parts.get("ratio", 1.0), "loss": parts.get("main", 0.0), "lr": lr, "grad_norm": grad_norm,
               "response_length": sum(lengths) / len(lengths), "response_length_max": max(lengths),
               "truncated": sum(c.finish_reason == "length" for c in comps) / len(comps),
               "zero_std_groups": int((total.view(len(idx), args.group).std(dim=1) == 0).sum()),
               "gen_tokens_per_s": gen["gen_tokens_per_s"], "gen_seconds": gen["gen_seconds"],
               "train_tokens_per_s": int(inputs.numel()) * args.updates / max(train_s, 1e-9),
               "train_seconds": train_s}
        if counts_all is not None and counts_all[: len(tr.model.moe_layers())].sum() > 0:
            live = counts_all[counts_all.sum(dim=1) > 0]
            rec["max_vio"] = balance.max_vio(live)
        rec["sample"] = comps[0].text[:300]
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"the GRPO loss became {rec['loss']} at step {k + 1}; stopping (the last "
                                     f"checkpoint is kept in {tr.ckpt_root})")
        return rec

    def fit(self) -> None:
        from tqdm.auto import tqdm

        tr, args = self.trainer, self.args
        bar = tqdm(total=args.steps, initial=tr.step, disable=args.no_progress, dynamic_ncols=True, desc="grpo",
                   mininterval=1.0)
        while tr.step < args.steps:
            t0 = time.perf_counter()
            rec = self.step()
            rec["step_seconds"] = time.perf_counter() - t0       # the whole step: sampling, rewards, reference, updates
            tr._log(rec)
            bar.set_postfix(reward=f"{rec['reward']:.2f}", acc=f"{rec['accuracy']:.2f}", kl=f"{rec['kl']:.3f}",
                            len=f"{rec['response_length']:.0f}", refresh=False)
            bar.update(1)
            if (args.save_every > 0 and tr.step % args.save_every == 0) or tr.step == args.steps:
                tr.save()
        bar.close()


def run(args) -> int:
    import torch

    from ..train import cli as train_cli
    from .chat import read_prompt_file
    from .rewards import parse_rewards

    check_args(args)
    rewards = parse_rewards(args.reward)
    cfg, tokenizer, template = open_model_dir(args.model)
    records = read_prompt_file(args.prompts)
    from .chat import prompt_ids

    check_prompt_lengths([prompt_ids(template, tokenizer, r["messages"]) for r in records], cfg)  # before --out changes
    ns = argparse.Namespace(out=args.out, resume=args.resume, overwrite=args.overwrite, steps=args.steps)
    train_cli.check_run_dir(ns)
    identity = {"model": model_fingerprint(args.model), "seed": args.seed, "steps": args.steps,
                "prompts": {"path": os.path.abspath(args.prompts), "sha256": file_sha256(args.prompts)},
                "reward": args.reward, "group": args.group, "prompts-per-step": args.prompts_per_step,
                "max-new-tokens": args.max_new_tokens, "lr": args.lr, "clip": args.clip, "kl": args.kl,
                "updates": args.updates, "loss-type": args.loss_type, "temperature": args.temperature,
                "ignore-eos": args.ignore_eos, "warmup": args.warmup}
    rewrite = check_identity(args, identity, IDENTITY)
    train_cli._prepare_run_dir(argparse.Namespace(out=args.out, resume=args.resume, overwrite=args.overwrite))
    if rewrite:
        write_json_atomic(os.path.join(args.out, RUN_FILE), identity)
    torch.set_grad_enabled(True)
    loop = GRPO(args, cfg, tokenizer, template, records, rewards)
    tr = loop.trainer
    if args.resume:
        from ..train.trainer import has_checkpoints

        if not tr.resume():
            if has_checkpoints(args.out):
                raise UserError(f"--resume: no checkpoint in {tr.ckpt_root} verifies (the warnings say why); move "
                                f"them away to start over")
            print(f"no checkpoint in {args.out}; starting from {args.model}", flush=True)
            path = os.path.join(args.out, "metrics.jsonl")
            if os.path.exists(path):
                os.remove(path)
    if tr.step >= args.steps:
        print(f"the run in {args.out} is already at step {tr.step} of {args.steps}")
    loop.fit()
    fin = argparse.Namespace(out=args.out, overwrite=args.overwrite, no_plots=True, sample_prompt="")
    train_cli._finish(fin, tr, tokenizer, {}, tr.model)
    copy_template(args.model, os.path.join(args.out, "final"))
    if not args.no_plots:
        from .plots import plot_grpo

        for path in plot_grpo(args.out):
            print(f"plot: {path}")
    sys.stdout.flush()
    return 0
