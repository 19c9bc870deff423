"""The training loop (SPEC §1.3–1.4, §2.4–2.5).

One step = ``grad_accum`` micro-batches of forward_train → loss (next-token CE + λ·MTP CE +
α·sequence balance loss) → backward → gradient all-reduce over data-parallel ranks → clip 1.0 →
AdamW (ZeRO-1: optimizer state sharded over ranks) → aux-loss-free bias update from the step's
expert loads (all-reduced, so every rank applies the same update) → metrics → maybe checkpoint.

With ``--ep`` the MoE layers keep only this rank's experts (``parallel.ep_model``): expert gradients are
summed over the ranks holding the same experts and divided by the world size, the clipping norm counts
each expert once, and checkpoints / the export hold the gathered single-process model and optimizer state.

The batch at step k is a pure function of (seed, k) (see ``data.dataset``) and every piece of
state (model, optimizer, step, RNG, EMA) is in the checkpoint, so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import balance
from ..checkpoint import flatten_optimizer_state, list_checkpoints, load_latest, save_checkpoint, \
    unflatten_optimizer_state
from ..config import ModelConfig
from ..model import Transformer
from .optim import AdamW, lr_at, param_groups


@dataclass
class TrainConfig:
    out: str = "runs/tiny"
    data: str = "data/tiny"              # prepared token directory (see dsv3.data.dataset.prepare)
    steps: int = 500
    batch_size: int = 16                 # global batch, in sequences
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0
    seed: int = 0
    bias_update_speed: float = 1e-3      # γ of the aux-loss-free rule; 0 disables it
    balance_alpha: float = 1e-4          # α of the sequence-wise balance loss; 0 disables it
    mtp_lambda: float = 0.3              # λ of the MTP loss
    precision: str = "auto"              # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp8
    bf16_moments: bool = False
    recompute: bool = False
    ema_decay: float = 0.0               # > 0: keep an EMA of the parameters on the CPU
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep: int = 3
    log_every: int = 1
    progress: bool = True
    device: str = "auto"
    pp: int = 1                          # pipeline-parallel ranks (SPEC §2.1); world = pp × data-parallel
    schedule: str = "1f1b"               # pipeline schedule with pp > 1: 1f1b | zb1p | dualpipe | dualpipev
    microbatches: int = 0                # pipeline micro-batches per step (0: the fewest the schedule allows)
    ep: int = 1                          # expert-parallel ranks (SPEC §2.2); must divide the world (pp = 1)
    gpus_per_node: int = 0               # ranks per (simulated) node for EP; 0: torchrun's LOCAL_WORLD_SIZE
    two_hop: bool = False                # EP dispatch: inter-node hop, then intra-node forwarding
    fp8_dispatch: bool = False           # EP dispatch in FP8 (E4M3, 1×128 scales)

    def validate(self, cfg: ModelConfig) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.seq_len + cfg.num_nextn_predict_layers > cfg.max_position_embeddings:
            raise ValueError(f"--seq-len {self.seq_len} (+{cfg.num_nextn_predict_layers} MTP) exceeds the "
                             f"model's max_position_embeddings ({cfg.max_position_embeddings})")
        if self.precision not in ("auto", "fp32", "bf16", "fp8"):
            raise ValueError(f"--precision must be auto, fp32, bf16 or fp8, got {self.precision!r}")
        if self.pp < 1 or self.microbatches < 0:
            raise ValueError(f"--pp must be >= 1 and --microbatches >= 0, got {self.pp}, {self.microbatches}")
        if self.schedule not in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
            raise ValueError(f"--schedule must be 1f1b, zb1p, dualpipe or dualpipev, got {self.schedule!r}")
        if self.pp > 1 and (self.grad_accum != 1 or self.ema_decay > 0):
            raise ValueError("with --pp > 1 use --microbatches instead of --grad-accum; --ema is not supported")
        if self.ep < 1 or self.gpus_per_node < 0:
            raise ValueError(f"--ep must be >= 1 and --gpus-per-node >= 0, got {self.ep}, {self.gpus_per_node}")
        if self.ep > 1 and self.pp > 1:
            raise ValueError("--ep > 1 together with --pp > 1 is not supported yet")
        if self.ep > 1 and self.ema_decay > 0:
            raise ValueError("--ema is not supported with --ep > 1 yet")
        if self.ep > 1 and cfg.n_routed_experts % self.ep:
            raise ValueError(f"--ep {self.ep} must divide the model's routed experts ({cfg.n_routed_experts})")
        if self.ep == 1 and (self.two_hop or self.fp8_dispatch or self.gpus_per_node):
            raise ValueError("--two-hop, --fp8-dispatch and --gpus-per-node need --ep > 1")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    group: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU); single process otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def compute_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, mtp_lambda: float,
                 balance_alpha: float) -> tuple[torch.Tensor, dict]:
    """Total loss of one micro-batch and its parts. inputs/targets: [B, T + D] (see TokenDataset.batch)."""
    out = model.forward_train(inputs)
    loss, parts = token_loss(out.logits, out.mtp_logits, targets, mtp_lambda)
    bal = routing_balance_loss(out.routing, inputs.shape[0], out.logits.shape[1], balance_alpha)
    if bal is not None:
        parts["balance"] = bal.detach()
        loss = loss + bal
    counts = torch.stack([r.counts for r in out.routing]) if out.routing else None
    return loss, {"parts": parts, "counts": counts}


def token_loss(logits: torch.Tensor, mtp_logits: list, targets: torch.Tensor,
               mtp_lambda: float) -> tuple[torch.Tensor, dict]:
    """Next-token CE + λ · mean MTP CE (depth k predicts targets[:, k:k+T]); also used by the pipeline's
    last stage."""
    T = logits.shape[1]
    V = logits.shape[-1]
    main = F.cross_entropy(logits.reshape(-1, V), targets[:, :T].reshape(-1))
    parts = {"main": main.detach()}
    loss = main
    if mtp_logits:
        mtp = sum(F.cross_entropy(lg.reshape(-1, V), targets[:, k:k + T].reshape(-1))
                  for k, lg in enumerate(mtp_logits, start=1)) / len(mtp_logits)
        parts["mtp"] = mtp.detach()
        loss = loss + mtp_lambda * mtp
    return loss, parts


def routing_balance_loss(routing: list, B: int, T: int, balance_alpha: float):
    """Σ over MoE layers of the sequence-wise balance loss (None when off or no MoE layer); the pipeline
    adds each stage's layers on that stage."""
    if balance_alpha <= 0 or not routing:
        return None
    return sum(balance.sequence_balance_loss(r.scores.view(B, T, -1), r.indices.view(B, T, -1), balance_alpha)
               for r in routing)


class Trainer:
    def __init__(self, cfg: ModelConfig, tc: TrainConfig, dataset, val_dataset=None, tokenizer=None):
        tc.validate(cfg)
        self.cfg, self.tc = cfg, tc
        self.device = pick_device(tc.device)
        self.dist = dist_from_env(self.device)
        if self.dist.world % tc.pp:
            raise ValueError(f"--pp {tc.pp} must divide the number of processes ({self.dist.world}); "
                             f"run under torchrun --nproc-per-node {tc.pp} (or a multiple)")
        dp = self.dist.world // tc.pp
        if tc.batch_size % (dp * tc.grad_accum):
            raise ValueError(f"--batch-size {tc.batch_size} must be divisible by data-parallel world size × "
                             f"grad accum ({dp} × {tc.grad_accum})")
        self.dataset, self.val_dataset, self.tokenizer = dataset, val_dataset, tokenizer
        precision = tc.precision if tc.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.precision = precision
        torch.manual_seed(tc.seed)
        # --pp: shapes only here; PipelineParallel gives storage to (and initialises) this rank's stages
        with torch.device("meta") if tc.pp > 1 else contextlib.nullcontext():
            self.model = Transformer(cfg)
        self.ep_mesh = self._expert_parallel() if tc.ep > 1 else None   # keeps only this rank's experts
        if precision == "fp8":
            from ..fp8.model import convert_to_fp8   # FP8 Linear layers (dsv3.fp8)
            convert_to_fp8(self.model)
        if tc.pp == 1:
            self.model.to(self.device)
        self.model.recompute = tc.recompute
        self.pipe = None
        if tc.pp > 1:   # this rank's pipeline stages; the optimizer only sees their parameters
            from ..parallel.pipeline.stages import PipelineParallel
            self.pipe = PipelineParallel(
                self.model, tc.schedule, tc.pp, tc.microbatches or None, local_batch=tc.batch_size // dp,
                loss_fn=functools.partial(token_loss, mtp_lambda=tc.mtp_lambda), autocast=self._autocast,
                balance_fn=functools.partial(routing_balance_loss, balance_alpha=tc.balance_alpha), device=self.device)
        groups = param_groups(self.pipe.module if self.pipe else self.model, tc.weight_decay)
        moment_dtype = torch.bfloat16 if tc.bf16_moments else torch.float32
        opt_kwargs = dict(lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay, moment_dtype=moment_dtype)
        if self.ep_mesh is not None:   # ZeRO-1 for the replicated parameters, a local optimizer for the experts
            from ..parallel.ep_model import ExpertParallelOptimizer
            self.optimizer = ExpertParallelOptimizer(groups, AdamW, self.model, **opt_kwargs)
        elif self.dist.world > 1 and (self.pipe is None or self.pipe.dp > 1):
            from torch.distributed.optim import ZeroRedundancyOptimizer
            self.optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=AdamW, **opt_kwargs,
                                                     process_group=self.pipe.dp_group if self.pipe else None)
        else:
            self.optimizer = AdamW(groups, **opt_kwargs)
        self.ema = ({k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}
                    if tc.ema_decay > 0 else None)
        self.step = 0
        self.metrics_path = os.path.join(tc.out, "metrics.jsonl")
        self.ckpt_root = os.path.join(tc.out, "checkpoints")

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict, dict, dict, dict]:
        if self.pipe is not None:   # every rank's share sent to rank 0, into CPU memory (PipelineParallel.gather_state)
            model_state, pipe_osd = self.pipe.gather_state(self.optimizer, self._param_names_by_group())
        elif self.ep_mesh is not None:   # the experts gathered: rank 0 writes the single-process model
            from ..parallel.ep_model import full_state_dict
            model_state = full_state_dict(self.model, keep=self.dist.main)
        else:
            model_state = {k: v for k, v in self.model.state_dict().items()}
        if self.pipe is not None:   # on rank 0: every rank's share, in the single-process layout
            osd = pipe_osd
        elif self.dist.world > 1:
            self.optimizer.consolidate_state_dict(to=0)
            osd = self.optimizer.state_dict() if self.dist.main else {"state": {}, "param_groups": []}
        else:
            osd = self.optimizer.state_dict()
        optim_tensors, optim_meta = flatten_optimizer_state(osd)
        extra = {"rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            extra["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.ema is not None:
            extra.update({f"ema.{k}": v for k, v in self.ema.items()})
        meta = {"optimizer": optim_meta, "data_step": self.step, "train_config": _jsonable(asdict(self.tc)),
                "model_config": self.cfg.to_hf(), "world_size": self.dist.world}
        return model_state, optim_tensors, extra, meta

    def save(self) -> None:
        model_state, optim_tensors, extra, meta = self.state()
        if self.dist.main:
            save_checkpoint(self.ckpt_root, self.step, model_state, optim_tensors, extra, meta, keep=self.tc.keep)
        if self.dist.world > 1:
            dist.barrier()

    def resume(self) -> bool:
        """Load the newest valid checkpoint; returns False when there is none."""
        if self.pipe is not None:
            return self._resume_pipeline()
        found = load_latest(self.ckpt_root)
        if found is None:
            return False
        path, meta, tensors = found
        model_sd = {k: v.to(self.device) for k, v in tensors["model.safetensors"].items()}
        if self.ep_mesh is not None:   # a single-process checkpoint: take this rank's experts
            from ..parallel.ep_model import load_full_state_dict
            load_full_state_dict(self.model, model_sd)
        else:
            self.model.load_state_dict(model_sd)
        osd = unflatten_optimizer_state(tensors["optim.safetensors"], meta["optimizer"])
        self.optimizer.load_state_dict(osd)
        extra = tensors["extra.safetensors"]
        torch.set_rng_state(extra["rng_cpu"])
        if "rng_cuda" in extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["rng_cuda"], self.device)
        if self.ema is not None:
            self.ema = {k[4:]: v for k, v in extra.items() if k.startswith("ema.")} or self.ema
        self.step = int(meta["step"])
        if self.dist.main:
            _truncate_metrics(self.metrics_path, self.step)
            print(f"resumed from {path} (step {self.step})", flush=True)
        return True

    def _param_names_by_group(self) -> list[list[str]]:
        """Parameter names of each optimizer group as a single-process run orders them: the numbering
        of the optimizer state in checkpoints, whatever --pp."""
        name = {id(p): n for n, p in self.model.named_parameters()}
        return [[name[id(p)] for p in g["params"]] for g in param_groups(self.model, self.tc.weight_decay)]

    def _resume_pipeline(self) -> bool:
        """resume() with --pp > 1: rank 0 picks the newest checkpoint that verifies (skipping broken ones
        with a warning, like ``load_latest``); every rank then reads only the tensors it holds and the
        optimizer state of its parameters, by key, from the checkpoint's safetensors files."""
        import warnings

        from safetensors import safe_open
        from safetensors.torch import load_file

        from ..checkpoint import verify_checkpoint

        choice = [None]
        if self.dist.main:
            for name in reversed(list_checkpoints(self.ckpt_root)):
                path = os.path.join(self.ckpt_root, name)
                try:
                    verify_checkpoint(path)
                except Exception as e:  # noqa: BLE001 - any failure means: skip this one
                    warnings.warn(f"skipping checkpoint {path}: {e}", stacklevel=2)
                    continue
                choice[0] = path
                break
        dist.broadcast_object_list(choice, src=0)
        path = choice[0]
        if path is None:
            return False
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        om = meta["optimizer"]
        groups = unflatten_optimizer_state({}, om)["param_groups"] or None
        if groups is None and self.dist.main:
            warnings.warn(f"{path} holds no optimizer state (an older --pp checkpoint): the optimizer restarts "
                          f"from zero", stacklevel=2)
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as fm, \
                safe_open(os.path.join(path, "optim.safetensors"), "pt") as fo:
            by_index: dict = {}
            for key in fo.keys():
                i, k = key.split(".", 1)
                by_index.setdefault(int(i), []).append(k)

            def optim_state(i: int) -> dict:
                st = dict(om["state"].get(str(i), {}))
                st.update({k: fo.get_tensor(f"{i}.{k}") for k in by_index.get(i, ())})
                return st

            self.pipe.load_state(fm.get_tensor, self.optimizer, self._param_names_by_group(), groups, optim_state)
        extra = load_file(os.path.join(path, "extra.safetensors"))
        torch.set_rng_state(extra["rng_cpu"])
        if "rng_cuda" in extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["rng_cuda"], self.device)
        self.step = int(meta["step"])
        if self.dist.main:
            _truncate_metrics(self.metrics_path, self.step)
            print(f"resumed from {path} (step {self.step})", flush=True)
        return True

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def train_step(self) -> dict:
        tc, model = self.tc, self.model
        model.train()
        lr = lr_at(self.step, tc.lr, tc.steps, tc.warmup, tc.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.pipe is not None:
            return self._pipeline_step(lr)
        D = self.cfg.num_nextn_predict_layers
        local_bs = tc.batch_size // self.dist.world
        inputs, targets = self.dataset.batch(self.step, local_bs, tc.seed, extra=D,
                                             rank=self.dist.rank, world_size=self.dist.world)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        totals, counts = {}, None
        for mi, sl in enumerate(_micro_slices(local_bs, tc.grad_accum)):
            with self._autocast():
                loss, info = compute_loss(model, inputs[sl], targets[sl], tc.mtp_lambda, tc.balance_alpha)
            (loss / tc.grad_accum).backward()
            for k, v in info["parts"].items():
                totals[k] = totals.get(k, 0.0) + v.float() / tc.grad_accum
            if info["counts"] is not None:
                counts = info["counts"] if counts is None else counts + info["counts"]
        self._reduce_gradients()
        if counts is not None and self.dist.world > 1:
            dist.all_reduce(counts)
        if self.ep_mesh is not None:   # global norm: each expert counted once
            from ..parallel.ep_model import clip_grad_norm_
            grad_norm = clip_grad_norm_(model.parameters(), tc.clip, self.ep_mesh.expert_group, self.ep_mesh.spec.ep)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if counts is not None and tc.bias_update_speed > 0:
            for moe, c in zip(model.moe_layers(), counts):
                balance.update_bias(moe.gate.e_score_correction_bias, c, tc.bias_update_speed)
        if self.ema is not None:
            self._update_ema()
        stats = torch.stack([totals[k] for k in sorted(totals)])
        if self.dist.world > 1:
            dist.all_reduce(stats)
            stats /= self.dist.world
        out = {k: float(v) for k, v in zip(sorted(totals), stats)}
        out.update(lr=lr, grad_norm=float(grad_norm))
        out["loss"] = out["main"]
        if counts is not None:
            out["max_vio"] = balance.max_vio(counts)
            out["expert_load"] = counts.tolist()
        self.step += 1
        return out

    def _pipeline_step(self, lr: float) -> dict:
        """train_step with --pp > 1: every micro-batch runs through the pipeline schedule; gradients are
        summed over parameter copies, averaged over data-parallel replicas and clipped globally."""
        tc, pipe = self.tc, self.pipe
        inputs, targets = self.dataset.batch(self.step, tc.batch_size // pipe.dp, tc.seed,
                                             extra=self.cfg.num_nextn_predict_layers, rank=pipe.dp_rank,
                                             world_size=pipe.dp)
        res = pipe.train_step(inputs.to(self.device), targets.to(self.device), tc.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if res.counts is not None and tc.bias_update_speed > 0:   # global counts: every holder of a gate updates it
            for moe, c in zip(self.model.moe_layers(), res.counts):
                if not moe.gate.e_score_correction_bias.is_meta:
                    balance.update_bias(moe.gate.e_score_correction_bias, c, tc.bias_update_speed)
        out = dict(res.parts, lr=lr, grad_norm=res.grad_norm, loss=res.parts["main"])
        if res.counts is not None:
            out["max_vio"] = balance.max_vio(res.counts)
            out["expert_load"] = res.counts.tolist()
        self.step += 1
        return out

    def _reduce_gradients(self) -> None:
        if self.dist.world == 1:
            return
        params = list(self.model.parameters())
        if self.ep_mesh is not None:   # experts: sum over the ranks holding them, / world (see parallel.ep_model)
            from ..parallel.ep_model import reduce_expert_gradients
            reduce_expert_gradients(self.model, self.ep_mesh.expert_data_group, self.ep_mesh.spec.edp, self.dist.world)
            params = [p for p in params if not getattr(p, "expert_parallel", False)]
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.dist.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _expert_parallel(self):
        """The process mesh for --ep (world = dp × ep, pp = 1) and the model's MoE layers converted to
        expert-parallel ones holding this rank's experts."""
        from ..parallel.ep_model import convert_to_expert_parallel
        from ..parallel.mesh import Mesh

        tc = self.tc
        if self.dist.world % tc.ep:
            raise ValueError(f"--ep {tc.ep} must divide the number of processes ({self.dist.world}); "
                             f"run under torchrun --nproc-per-node {tc.ep} (or a multiple)")
        mesh = Mesh.from_env(pp=1, ep=tc.ep, gpus_per_node=tc.gpus_per_node or None)
        convert_to_expert_parallel(self.model, mesh.expert_comm(), two_hop=tc.two_hop, fp8_dispatch=tc.fp8_dispatch)
        return mesh

    def full_model(self):
        """The whole model for export: ``self.model``, or with --ep a plain Transformer with the experts
        gathered, on rank 0 (``None`` on the other ranks; collective)."""
        if self.ep_mesh is None:
            return self.model
        from ..parallel.ep_model import full_model
        return full_model(self.model, keep=self.dist.main)

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.tc.ema_decay
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                self.ema[k].mul_(d).add_(v.detach().float().cpu(), alpha=1 - d)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean next-token loss over the validation batches and MaxVio_global over them."""
        if self.val_dataset is None:
            return {}
        if self.pipe is not None:
            return self._pipeline_evaluate()
        self.model.eval()
        D = self.cfg.num_nextn_predict_layers
        total, n, vio = 0.0, 0, balance.MaxVio()
        for inputs, targets in self.val_dataset.val_batches(self.tc.batch_size, self.tc.eval_batches, extra=D):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._autocast():
                out = self.model.forward_train(inputs)
            T = out.logits.shape[1]
            total += float(F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                           targets[:, :T].reshape(-1), reduction="sum"))
            n += targets[:, :T].numel()
            if out.routing:
                vio.add(torch.stack([r.counts for r in out.routing]))
        res = {"val_loss": total / max(n, 1)}
        if vio.counts is not None:
            res["val_max_vio"] = vio.value
            res["val_max_vio_per_layer"] = vio.per_layer()
        return res

    @torch.no_grad()
    def _pipeline_evaluate(self) -> dict:
        """evaluate() with --pp > 1: each validation batch runs forward-only through the pipeline (the
        runtime's no-grad path; each data-parallel replica takes its share of the rows); the sums are
        all-reduced, so every rank returns the same numbers. No rank gathers the model."""
        self.model.eval()
        D = self.cfg.num_nextn_predict_layers
        total, n, vio = 0.0, 0, balance.MaxVio()
        for inputs, targets in self.val_dataset.val_batches(self.tc.batch_size, self.tc.eval_batches, extra=D):
            ce, tokens, counts = self.pipe.evaluate(inputs, targets)
            total, n = total + ce, n + tokens
            if counts is not None:
                vio.add(counts)
        res = {"val_loss": total / max(n, 1)}
        if vio.counts is not None:
            res["val_max_vio"] = vio.value
            res["val_max_vio_per_layer"] = vio.per_layer()
        return res

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        tc = self.tc
        from tqdm.auto import tqdm

        summary = {}
        if self.step == 0 and self.val_dataset is not None:
            first = self.evaluate()
            summary["val_loss_start"] = first["val_loss"]
            self._log({"step": 0, **first, "moe_layers": self.model.moe_layer_names()})
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (tc.progress and self.dist.main),
                   dynamic_ncols=True, desc="train", mininterval=1.0)
        tokens_per_step = tc.batch_size * tc.seq_len
        t_last = time.perf_counter()
        while self.step < tc.steps:
            rec = self.train_step()
            now = time.perf_counter()
            rec["tokens_per_s"] = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"loss became {rec['loss']} at step {self.step}; stopping "
                                         f"(the last checkpoint is kept in {self.ckpt_root})")
            line = {"step": self.step, **rec}
            if self.val_dataset is not None and ((tc.eval_every > 0 and self.step % tc.eval_every == 0)
                                                 or self.step == tc.steps):
                line.update(self.evaluate())
            if self.step % tc.log_every == 0 or "val_loss" in line:
                self._log(line)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            lr=f"{rec['lr']:.1e}", maxvio=f"{rec.get('max_vio', 0):.2f}", refresh=False)
            bar.update(1)
            if tc.save_every > 0 and (self.step % tc.save_every == 0 or self.step == tc.steps):
                self.save()
        bar.close()
        if self.pipe is not None:   # the whole model on rank 0 only (its device), for the export and sample
            self.pipe.gather_to_root()
        if self.val_dataset is not None:
            summary["val_loss_end"] = self.evaluate()["val_loss"]
        return summary

    def _log(self, rec: dict) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _micro_slices(batch: int, accum: int) -> list[slice]:
    size = batch // accum
    return [slice(i * size, (i + 1) * size) for i in range(accum)]


def _truncate_metrics(path: str, step: int) -> None:
    """Keep only well-formed lines for steps ≤ ``step`` (a killed run may have logged further)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                keep.append(json.dumps(rec) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def has_checkpoints(out: str) -> bool:
    return bool(list_checkpoints(os.path.join(out, "checkpoints")))
