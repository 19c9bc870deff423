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

from .. import balance
from ..checkpoint import flatten_optimizer_state, list_checkpoints, newest_valid, save_checkpoint, save_sharded
from ..config import ModelConfig
from ..model import Transformer
from ..parallel.pipeline.schedule import SCHEDULES
from .losses import compute_loss
from .optim import LR_SCHEDULES, AdamW, lr_at, param_groups
from .strategy import build_strategy


@dataclass
class TrainConfig:
    out: str = "runs/tiny"
    data: str = "data/tiny"              # prepared token directory (see dsv3.data.dataset.prepare)
    steps: int = 500
    batch_size: int = 16                 # global batch, in sequences
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1            # cosine decays to min_lr_ratio × lr
    lr_schedule: str = "cosine"          # cosine | constant (after the warm-up)
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
    dispatch_capacity: bool = False      # flat EP dispatch: learnt capacities instead of a count exchange
    overlap: bool = False                # two micro-batches on two lanes: all-to-alls behind compute (parallel.overlap)
    init_from: str = ""                  # an HF-layout model directory whose weights start the run (--from)

    def validate(self, cfg: ModelConfig) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise ValueError(f"--ema must be in [0, 1), got {self.ema_decay}")
        if self.seq_len + cfg.num_nextn_predict_layers > cfg.max_position_embeddings:
            raise ValueError(f"--seq-len {self.seq_len} (+{cfg.num_nextn_predict_layers} MTP) exceeds the "
                             f"model's max_position_embeddings ({cfg.max_position_embeddings})")
        b = tuple(self.betas)
        if len(b) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x < 1 for x in b):
            raise ValueError(f"--adam-betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not (math.isfinite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("auto", "fp32", "bf16", "fp8"):
            raise ValueError(f"--precision must be auto, fp32, bf16 or fp8, got {self.precision!r}")
        if self.pp < 1 or self.microbatches < 0:
            raise ValueError(f"--pp must be >= 1 and --microbatches >= 0, got {self.pp}, {self.microbatches}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.pp == 1 and (self.microbatches or self.schedule != "1f1b"):
            raise ValueError("--schedule and --microbatches need --pp > 1 (they set the pipeline's schedule and "
                             "micro-batches; without a pipeline use --grad-accum)")
        if self.pp > 1:   # the schedule's size rules, named by the flags (were "num_microbatches >= 3 …; got 2")
            from ..parallel.pipeline.schedule import check_ranks, check_sizes

            try:
                check_ranks(self.schedule, self.pp)
            except ValueError:
                raise ValueError(f"--schedule {self.schedule} needs an even --pp (rank r pairs with rank PP-1-r); got "
                                 f"--pp {self.pp}") from None
            if self.microbatches:
                try:
                    check_sizes(self.schedule, self.pp, self.microbatches)
                except ValueError as e:
                    raise ValueError(f"--microbatches {self.microbatches}: {e}") from None
        if self.pp > 1 and self.grad_accum != 1:
            raise ValueError("with --pp > 1 use --microbatches instead of --grad-accum")
        if self.ep < 1 or self.gpus_per_node < 0:
            raise ValueError(f"--ep must be >= 1 and --gpus-per-node >= 0, got {self.ep}, {self.gpus_per_node}")
        if self.ep > 1 and cfg.n_routed_experts % self.ep:
            raise ValueError(f"--ep {self.ep} must divide the model's routed experts ({cfg.n_routed_experts})")
        if self.overlap and (self.ep == 1 or (self.pp == 1 and self.grad_accum != 2)):
            raise ValueError("--overlap needs --ep > 1 and, without --pp, --grad-accum 2 (the two micro-batches "
                             "whose all-to-alls hide behind each other's compute)")
        if self.overlap and self.pp > 1 and self.schedule not in ("dualpipe", "dualpipev"):
            raise ValueError(f"--overlap with --pp needs --schedule dualpipe or dualpipev: it runs their overlapped "
                             f"forward & backward pairs, which --schedule {self.schedule} has none of")
        if self.ep == 1 and (self.two_hop or self.fp8_dispatch or self.gpus_per_node or self.dispatch_capacity):
            raise ValueError("--two-hop, --fp8-dispatch, --dispatch-capacity and --gpus-per-node need --ep > 1")
        if self.dispatch_capacity and self.two_hop:
            raise ValueError("--dispatch-capacity applies to the flat dispatch: --two-hop exchanges counts")


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision as a run on ``device`` uses it: auto is bf16 on a GPU, fp32 on a CPU."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


class Trainer:
    """The training loop over one parallel strategy (``train.strategy``), chosen once from the mesh."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, dataset, val_dataset=None, tokenizer=None):
        tc.validate(cfg)
        self.cfg, self.tc = cfg, tc
        self.device = pick_device(tc.device)
        self.dist = dist_from_env(self.device)
        self.mesh = self._mesh()
        spec = self.mesh.spec
        if tc.batch_size % (spec.dp * tc.grad_accum):
            raise ValueError(f"--batch-size {tc.batch_size} must be divisible by data-parallel world size × "
                             f"grad accum ({spec.dp} × {tc.grad_accum})")
        self.dataset, self.val_dataset, self.tokenizer = dataset, val_dataset, tokenizer
        precision = resolve_precision(tc.precision, self.device)
        self.precision = precision
        torch.manual_seed(tc.seed)
        # --pp: shapes only here; the pipeline gives storage to (and initialises) this rank's stages
        with torch.device("meta") if spec.pp > 1 else contextlib.nullcontext():
            self.model = Transformer(cfg)
        if tc.init_from:   # --from (train.extend): the weights of an earlier run; a checkpoint (--resume) overrides
            from .extend import load_weights
            load_weights(self.model, tc.init_from)
        self.names_by_group = [[n for n, _ in g] for g in _named_groups(self.model, tc.weight_decay)]
        self.par = build_strategy(self.model, tc, self.mesh, self.device, self._autocast,
                                  functools.partial(compute_loss, mtp_lambda=tc.mtp_lambda,
                                                    balance_alpha=tc.balance_alpha), self.names_by_group)
        if precision == "fp8":
            from ..fp8.model import convert_to_fp8   # FP8 Linear layers (dsv3.fp8), after the EP layers exist
            convert_to_fp8(self.model)
        self.model.recompute = tc.recompute
        moment_dtype = torch.bfloat16 if tc.bf16_moments else torch.float32
        self.optimizer = self.par.make_optimizer(param_groups(self.par.module, tc.weight_decay), AdamW, lr=tc.lr,
                                                 betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                                 moment_dtype=moment_dtype)
        # EMA of this rank's tensors (its stages, its experts), on the CPU
        self.ema = ({k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items() if not v.is_meta}
                    if tc.ema_decay > 0 else None)
        self.step = 0
        self.metrics_path = os.path.join(tc.out, "metrics.jsonl")
        self.ckpt_root = os.path.join(tc.out, "checkpoints")
        self.skipped: list[str] = []   # broken checkpoints the resume skipped: the next save sets them aside

    def _mesh(self):
        """The process mesh of this run: --pp pipeline stages, data parallelism within a stage, --ep
        expert groups carved out of it (see ``parallel.mesh``)."""
        from ..parallel.mesh import Mesh

        tc, world = self.tc, self.dist.world
        if world % tc.pp:
            raise ValueError(f"--pp {tc.pp} must divide the number of processes ({world}); "
                             f"run under torchrun --nproc-per-node {tc.pp} (or a multiple)")
        if (world // tc.pp) % tc.ep:
            raise ValueError(f"--ep {tc.ep} must divide the data-parallel ranks of a stage ({world // tc.pp} = "
                             f"{world} processes / --pp {tc.pp}); run under torchrun --nproc-per-node "
                             f"{tc.ep * tc.pp} (or a multiple)")
        return Mesh.from_env(pp=tc.pp, ep=tc.ep, gpus_per_node=tc.gpus_per_node or None)

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        """One checkpoint: a single process writes it whole; several ranks write it sharded, each its own
        part at the same time (``checkpoint.save_sharded``). Either reads back under any layout."""
        meta = {"data_step": self.step, "train_config": _jsonable(asdict(self.tc)), "model_config": self.cfg.to_hf(),
                "world_size": self.dist.world}
        extra = {"rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            extra["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.dist.world == 1:
            model_state, osd, ema = self.par.gather(self.optimizer, self.ema)
            optim_tensors, meta["optimizer"] = flatten_optimizer_state(osd)
            extra.update({f"ema.{k}": v for k, v in ema.items()})
            save_checkpoint(self.ckpt_root, self.step, model_state, optim_tensors, extra, meta, keep=self.tc.keep,
                            broken=self.skipped)
            self.skipped = []
            return
        pieces, plain, hyper = self.par.pieces(self.optimizer, self.ema, self.names_by_group)
        everyone = [None] * self.dist.world
        dist.all_gather_object(everyone, (plain, hyper))
        if self.dist.main:
            pieces["extra"].update(extra)
            state, groups = {}, {}
            for p, h in everyone:
                state.update(p)
                groups.update(h)
            flat = [n for g in self.names_by_group for n in g]
            index = {n: i for i, n in enumerate(flat)}
            osd = {"state": state, "param_groups": [dict(groups[j], params=[index[n] for n in names])
                                                     for j, names in enumerate(self.names_by_group) if j in groups]}
            meta["optimizer"] = flatten_optimizer_state(osd)[1]
        save_sharded(self.ckpt_root, self.step, pieces, meta if self.dist.main else None, self.tc.keep,
                     self.dist.rank, self.dist.world, broken=self.skipped)
        self.skipped = []

    def resume(self) -> bool:
        """Load the newest checkpoint that verifies (rank 0 picks it, skipping broken ones with a warning;
        every rank then reads its own share); returns False when there is none."""
        from ..checkpoint import CheckpointReader

        choice = [None]
        if self.dist.main:
            choice[0], skipped = newest_valid(self.ckpt_root)
            self.skipped = list(skipped)
        if self.dist.world > 1:
            dist.broadcast_object_list(choice, src=0)
        path = choice[0]
        if path is None:
            return False
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        self.par.load(path, meta, self.optimizer)
        self._apply_optimizer_settings()
        extra = CheckpointReader(path, meta).tensors("extra")
        torch.set_rng_state(extra["rng_cpu"])
        if "rng_cuda" in extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["rng_cuda"], self.device)
        if self.ema is not None:   # a checkpoint without an EMA (--allow-changed ema): it starts from its weights
            model_state = self.model.state_dict()
            for k in self.ema:
                held = self.par.local_view(k, extra[f"ema.{k}"]) if f"ema.{k}" in extra else model_state[k]
                self.ema[k] = held.detach().float().cpu().clone()
        self.step = int(meta["step"])
        if self.dist.main:
            _truncate_metrics(self.metrics_path, self.step)
            print(f"resumed from {path} (step {self.step})", flush=True)
        return True

    def _apply_optimizer_settings(self) -> None:
        """After a checkpoint is loaded: the optimizer runs with this run's settings. ``load_state_dict``
        restores the saved parameter groups (the β's from before an ``--allow-changed adam-betas``) and
        casts the moments to the parameters' dtype (FP32: ``--bf16-moments`` was lost, and with it the
        exact resume)."""
        from .strategy import _optimizer_states

        moment_dtype = torch.bfloat16 if self.tc.bf16_moments else torch.float32
        for g in self.optimizer.param_groups:
            g["betas"] = tuple(self.tc.betas)
            g["moment_dtype"] = moment_dtype
        for _, st in _optimizer_states(self.optimizer):
            for k in ("exp_avg", "exp_avg_sq"):
                if torch.is_tensor(st.get(k)) and st[k].dtype != moment_dtype:
                    st[k] = st[k].to(moment_dtype)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        # fp8: the Linears' and experts' GEMMs in FP8 (dsv3.fp8 turns autocast off inside them), everything
        # else in BF16 as in a bf16 run — the report keeps attention, norms, the gate and the head out of FP8
        if self.precision in ("bf16", "fp8"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def train_step(self) -> dict:
        tc = self.tc
        self.model.train()
        lr = lr_at(self.step, tc.lr, tc.steps, tc.warmup, tc.min_lr_ratio, tc.lr_schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        par = self.par
        inputs, targets = self.dataset.batch(self.step, tc.batch_size // par.data_size, tc.seed,
                                             extra=self.cfg.num_nextn_predict_layers, rank=par.data_rank,
                                             world_size=par.data_size)
        res = par.step(inputs.to(self.device), targets.to(self.device))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if res.counts is not None and tc.bias_update_speed > 0:   # global loads: every holder of a gate updates it
            for moe, c in zip(self.model.moe_layers(), res.counts):
                if not moe.gate.e_score_correction_bias.is_meta:
                    balance.update_bias(moe.gate.e_score_correction_bias, c, tc.bias_update_speed)
        if self.ema is not None:
            self._update_ema()
        out = dict(res.parts, lr=lr, grad_norm=res.grad_norm, loss=res.parts["main"])
        if res.counts is not None:
            out["max_vio"] = balance.max_vio(res.counts)
            out["expert_load"] = res.counts.tolist()
        self.step += 1
        return out

    def full_model(self):
        """The whole model for export on rank 0 (``None`` elsewhere; collective): ``self.model`` in a
        single process, otherwise a plain Transformer filled from every rank's share."""
        if self.dist.world == 1 and self.tc.ep == 1:
            return self.model
        model_state, _, _ = self.par.gather()
        if not self.dist.main:
            return None
        rng = torch.get_rng_state()
        try:
            full = Transformer(self.cfg)
        finally:
            torch.set_rng_state(rng)
        full.load_state_dict(model_state)
        return full.to(self.device)

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.tc.ema_decay
        for k, v in self.model.state_dict().items():
            if k in self.ema and v.is_floating_point():
                self.ema[k].mul_(d).add_(v.detach().float().cpu(), alpha=1 - d)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean next-token loss over the validation batches and MaxVio_global over them."""
        if self.val_dataset is None:
            return {}
        self.model.eval()
        D = self.cfg.num_nextn_predict_layers
        total, n, vio = 0.0, 0, balance.MaxVio()
        for inputs, targets in self.val_dataset.val_batches(self.tc.batch_size, self.tc.eval_batches, extra=D):
            ce, tokens, counts = self.par.evaluate(inputs, targets)
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
            if (tc.save_every > 0 and self.step % tc.save_every == 0) or self.step == tc.steps:   # 0: at the end
                self.save()
        bar.close()
        if self.val_dataset is not None:
            summary["val_loss_end"] = self.evaluate()["val_loss"]
        return summary

    def _log(self, rec: dict) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _named_groups(model, weight_decay: float) -> list[list[tuple[str, torch.Tensor]]]:
    """(name, parameter) of each optimizer group as a single-process run orders them: the numbering of
    the optimizer state in checkpoints, whatever the layout."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [[(name[id(p)], p) for p in g["params"]] for g in param_groups(model, weight_decay)]


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
