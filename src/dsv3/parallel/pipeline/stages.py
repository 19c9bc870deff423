"""The dsv3 Transformer cut into pipeline stages, and this rank's share of a pipelined model (SPEC §2.1).

Split rule (:func:`split_layers`)
---------------------------------
A schedule has ``num_chunks`` model chunks (PP for 1F1B/ZB1P/DualPipe, 2·PP for DualPipeV). The
``num_hidden_layers`` blocks are cut into that many contiguous runs balanced by count: every chunk
gets ``L // C`` blocks and the first ``L mod C`` chunks one more, so the last chunk — which also runs
the final norm, the output head and the MTP modules — never carries an extra block. Chunk 0 also
holds the embedding. A chunk may hold no block (L < C): it then passes its input through.

Where the embedding and the head live
-------------------------------------
MTP depth k embeds ``tokens[:, k : k+T]`` with the *shared* embedding (SPEC §1.4), so the last chunk
needs the embedding too. With DualPipeV's V (rank 0 holds stages 0 and 2PP−1) and DualPipe
(rank r holds stage r and the mirrored copy of chunk PP−1−r, so ranks 0 and PP−1 each hold chunk 0
and the last chunk) the head's rank has an embedding of its own, as SPEC §2.1 wants. 1F1B/ZB1P put
chunk 0 on rank 0 and the last chunk on rank PP−1: there the last rank keeps a **replica** of the
embedding for MTP. Replicas are handled exactly like DualPipe's mirrored parameter copies: every
parameter has a set of *holder* ranks, and before the optimizer step the gradients are summed over
the holders (an all-reduce over them, also averaging over data-parallel replicas), so all copies
receive the gradient of the whole model and stay bitwise identical. Tied input/output embeddings
are not supported with pipelining (``ValueError``).

Process layout (the same as :mod:`dsv3.parallel.mesh`): ``rank = pp_rank · dp + dp_rank``;
pipeline ranks of one data-parallel replica share ``dp_rank``.

Every rank builds the whole model from the same seed (so initialisation equals the single-process
run) and trains only the modules its stages use. Parameters it does not hold go stale until
:meth:`PipelineParallel.gather_full_model` (for evaluation, checkpoints, export) broadcasts them
from their owners; the memory saving of PP is therefore not realised by this version.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ...model.rope import precompute_freqs_cis
from .runtime import PipelineRuntime, PipelineStage
from .schedule import MIN_MICROBATCHES, Schedule, build_schedule


def split_layers(num_layers: int, num_chunks: int) -> list[range]:
    """Contiguous block ranges of each chunk: ``L // C`` each, the first ``L mod C`` chunks one more."""
    if num_layers < 0 or num_chunks < 1:
        raise ValueError(f"cannot split {num_layers} layers into {num_chunks} chunks")
    q, r = divmod(num_layers, num_chunks)
    out, start = [], 0
    for c in range(num_chunks):
        n = q + (1 if c < r else 0)
        out.append(range(start, start + n))
        start += n
    return out


class ModelStage(PipelineStage):
    """One chunk of a dsv3 :class:`~dsv3.model.Transformer` as a pipeline stage.

    ``data`` of a micro-batch is ``(inputs, targets)``, both ``[b, T + D]`` as for ``compute_loss``.
    ``loss_fn(logits, mtp_logits, targets) -> (loss, parts)`` and ``balance_fn(routing, b, T) -> loss
    or None`` are the trainer's pieces of ``compute_loss`` (passed in; this layer does not import the
    trainer). Every stage adds the balance loss of its own MoE layers to the objective; the last
    stage adds the cross-entropy and MTP terms.

    It keeps the default ``overlapped_forward_backward`` (F, then B). The place for DualPipe's GPU
    overlap is an override here: run the two chunks block by block, issuing one micro-batch's MoE
    dispatch/combine on a side CUDA stream while the other's attention/MLP computes.
    """

    def __init__(self, model, stage: int, chunk: int, num_chunks: int, layers: range, *, loss_fn=None,
                 balance_fn=None, autocast=None):
        super().__init__()
        self.stage, self.chunk = stage, chunk
        self.cfg = model.cfg
        self.first, self.last = chunk == 0, chunk == num_chunks - 1
        self.embed = model.embed_tokens if self.first else None
        self.layers = [model.layers[i] for i in layers]
        self.norm = model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        self.mtp = list(model.mtp) if self.last else []
        self.mtp_embed = model.embed_tokens if self.last and self.mtp else None
        self.model = model
        self.loss_fn, self.balance_fn = loss_fn, balance_fn
        self.autocast = autocast or nullcontext
        # rows of the model's moe_layers() order (main MoE blocks, then MTP) this stage reports
        moe_main = [i for i, b in enumerate(model.layers) if b.is_moe]
        self.moe_rows = [moe_main.index(i) for i in layers if model.layers[i].is_moe]
        self.moe_rows += [len(moe_main) + k for k, m in enumerate(self.mtp) if m.is_moe]
        self._freqs: dict = {}

    def __repr__(self) -> str:
        return f"ModelStage(stage={self.stage}, chunk={self.chunk}, blocks={len(self.layers)})"

    def modules(self) -> list[nn.Module]:
        mods = [self.embed, *self.layers, self.norm, self.lm_head, *self.mtp, self.mtp_embed]
        return [m for m in mods if m is not None]

    def freqs(self, T: int, device) -> torch.Tensor:
        key = (T, str(device))
        if key not in self._freqs:
            self._freqs[key] = precompute_freqs_cis(self.cfg, T, device=device)
        return self._freqs[key]

    def compute(self, mb: int, x, data):
        inputs, targets = data
        D = len(self.model.mtp)
        B, T = inputs.shape[0], inputs.shape[1] - D
        with self.autocast():
            freqs = self.freqs(T, inputs.device)
            h = self.embed(inputs[:, :T]) if self.first else x
            routing: list = []
            rec = self.model.recompute
            for block in self.layers:
                h = block(h, freqs, None, 0, routing, rec)
            info: dict = {"parts": {}}
            loss = None
            if self.last:
                logits = self.lm_head(self.norm(h)).float()
                mtp_logits = []
                for k, module in enumerate(self.mtp, start=1):
                    emb = self.mtp_embed(inputs[:, k:k + T])
                    h = module.forward_mtp(h, emb, freqs, stats=routing, recompute=rec)
                    mtp_logits.append(self.lm_head(module.shared_head.norm(h)).float())
                loss, info["parts"] = self.loss_fn(logits, mtp_logits, targets)
                if not torch.is_grad_enabled():
                    info["logits"], info["mtp_logits"] = logits, mtp_logits
                h = None
            bal = self.balance_fn(routing, B, T) if self.balance_fn is not None else None
            if bal is not None:
                info["parts"]["balance"] = bal.detach()
                loss = bal if loss is None else loss + bal
        info["counts"] = torch.stack([r.counts for r in routing]) if routing else None
        return h, loss, info


def _chunks_using(key: str, cfg, spans: list[range]) -> set[int]:
    """Chunks whose stages use the state-dict entry ``key`` of the full model."""
    last = len(spans) - 1
    if key.startswith("embed_tokens."):
        return {0, last} if cfg.num_nextn_predict_layers > 0 else {0}
    if key.startswith("layers."):
        i = int(key.split(".")[1])
        return {c for c, sp in enumerate(spans) if i in sp}
    return {last}  # norm, lm_head, mtp


def holders(model, schedule: Schedule) -> dict[str, tuple[int, ...]]:
    """State-dict key -> the pipeline ranks whose stages use it (DualPipe copies, 1F1B's MTP embedding)."""
    spans = split_layers(model.cfg.num_hidden_layers, schedule.num_chunks)
    out = {}
    for key in model.state_dict():
        chunks = _chunks_using(key, model.cfg, spans)
        out[key] = tuple(sorted({schedule.stage_to_rank[s] for s in range(schedule.num_stages)
                                 if schedule.stage_chunk[s] in chunks}))
    return out


def build_stages(model, schedule: Schedule, rank: int, **kw) -> dict[int, ModelStage]:
    """The :class:`ModelStage` of every stage ``schedule`` places on pipeline rank ``rank``."""
    if model.cfg.tie_word_embeddings:
        raise ValueError("pipeline parallelism does not support tie_word_embeddings=True (the embedding and "
                         "the head would be one parameter on two chunks)")
    spans = split_layers(model.cfg.num_hidden_layers, schedule.num_chunks)
    return {s: ModelStage(model, s, schedule.stage_chunk[s], schedule.num_chunks, spans[schedule.stage_chunk[s]], **kw)
            for s in schedule.stages_of(rank)}


def default_microbatches(name: str, pp: int, local_batch: int) -> int:
    """The fewest micro-batches ``name`` accepts on ``pp`` ranks that divide the local batch."""
    need = MIN_MICROBATCHES[name](pp)
    for m in range(need, local_batch + 1):
        if local_batch % m == 0 and (name != "dualpipe" or m % 2 == 0):
            return m
    raise ValueError(f"{name} on {pp} pipeline ranks needs at least {need} micro-batches, and the local batch of "
                     f"{local_batch} sequences cannot be split into that many equal ones; raise --batch-size")


@dataclass
class StepResult:
    parts: dict          # loss parts averaged over the step's micro-batches and data-parallel replicas
    counts: object       # [MoE layers, experts] tokens per expert over the whole global batch, or None
    grad_norm: float     # before clipping, over the whole model
    losses: torch.Tensor  # [M] objective of each local micro-batch (summed over the pipeline's stages)


class PipelineParallel:
    """This rank's share of a pipeline-parallel (× data-parallel) dsv3 model.

    Needs an initialised default process group of ``pp · dp`` ranks; every rank must construct it
    (it creates process groups). ``model`` is this rank's full model, built from the same seed on
    every rank. ``train_step`` runs forward and backward of all micro-batches by the schedule, sums
    gradients over parameter copies, averages over data-parallel replicas and clips by the global
    norm; the caller then steps its optimizer over :attr:`module`'s parameters.
    """

    def __init__(self, model, schedule: str, pp: int, microbatches: int | None, *, local_batch: int, loss_fn,
                 balance_fn=None, autocast=None, device=None, timeout: float | None = 300.0):
        world, rank = dist.get_world_size(), dist.get_rank()
        if pp < 2 or world % pp:
            raise ValueError(f"--pp {pp} must be at least 2 and divide the number of processes ({world})")
        self.model, self.pp, self.dp = model, pp, world // pp
        self.pp_rank, self.dp_rank = rank // self.dp, rank % self.dp
        name = schedule.lower()
        M = microbatches or default_microbatches(name, pp, local_batch)
        if local_batch % M:
            raise ValueError(f"--microbatches {M} must divide the per-replica batch ({local_batch} sequences)")
        self.schedule = build_schedule(name, pp, M)
        self.stages = build_stages(model, self.schedule, self.pp_rank, loss_fn=loss_fn, balance_fn=balance_fn,
                                   autocast=autocast)
        self.module = nn.ModuleList(m for st in self.stages.values() for m in st.modules())
        self.holders = holders(model, self.schedule)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda":  # NCCL point-to-point runs on the current device
            torch.cuda.set_device(self.device)
        self.ranks = [r * self.dp + self.dp_rank for r in range(pp)]
        # process groups: every rank creates every group, in one order
        groups: dict[tuple, object] = {}
        wanted = [tuple(r * self.dp + d for r in range(pp)) for d in range(self.dp)]      # pipelines
        wanted += [tuple(r * self.dp + d for d in range(self.dp)) for r in range(pp)]     # data parallel
        for hs in sorted(set(self.holders.values())):
            wanted.append(tuple(sorted(h * self.dp + d for h in hs for d in range(self.dp))))
        for members in wanted:
            if members not in groups:
                groups[members] = dist.new_group(list(members)) if len(members) > 1 else None
        self.pp_group = groups[tuple(self.ranks)]
        self.dp_group = groups[tuple(self.pp_rank * self.dp + d for d in range(self.dp))]
        self._groups = groups
        act_dtype = model.embed_tokens.weight.dtype
        D, d = model.cfg.num_nextn_predict_layers, model.cfg.hidden_size

        def recv_meta(kind, mb, data):
            inputs = data[0]
            return (inputs.shape[0], inputs.shape[1] - D, d), act_dtype

        self.runtime = PipelineRuntime(self.schedule, self.pp_rank, self.stages, recv_meta, ranks=self.ranks,
                                       device=self.device, timeout=timeout)

    @property
    def num_microbatches(self) -> int:
        return self.schedule.num_microbatches

    def held(self, key: str) -> bool:
        return self.pp_rank in self.holders[key]

    def named_parameters(self):
        """(name in the full model, parameter) of every parameter this rank holds."""
        return [(n, p) for n, p in self.model.named_parameters() if self.held(n)]

    # ------------------------------------------------------------------ a step
    def run(self, inputs: torch.Tensor, targets: torch.Tensor, *, train: bool = True):
        """Forward (and backward) of all micro-batches; returns the runtime's per-rank result."""
        M = self.num_microbatches
        b = inputs.shape[0] // M
        data = [(inputs[i * b:(i + 1) * b], targets[i * b:(i + 1) * b]) for i in range(M)]
        return self.runtime.run(data, train=train)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, clip: float | None) -> StepResult:
        """Forward and backward of the step's micro-batches, then gradient reduction and clipping."""
        M, dev = self.num_microbatches, self.device
        res = self.run(inputs, targets)
        keys = ("main", "mtp", "balance")
        losses = torch.zeros(M, dtype=torch.float32, device=dev)
        for mb, v in res.losses.items():
            losses[mb] += v.float()
        stats = torch.zeros(2 * len(keys), dtype=torch.float32, device=dev)  # part sums / M, part present
        n_moe = len(self.model.moe_layers())
        counts = torch.zeros(n_moe, self.model.cfg.n_routed_experts, dtype=torch.long, device=dev) if n_moe else None
        for (s, mb), info in res.info.items():
            for k, v in info["parts"].items():
                i = keys.index(k)
                stats[i] += v.float() / M
                stats[len(keys) + i] = 1.0
            if info["counts"] is not None:
                counts[self.stages[s].moe_rows] += info["counts"]
        dist.all_reduce(losses, group=self.pp_group)
        dist.all_reduce(stats)
        if counts is not None:
            dist.all_reduce(counts)
        self.reduce_gradients()
        norm = self.clip_grad_norm_(clip)
        parts = {k: float(stats[i]) / self.dp for i, k in enumerate(keys) if stats[len(keys) + i] > 0}
        return StepResult(parts, counts, norm, losses)

    def reduce_gradients(self) -> None:
        """Sum gradients over each parameter's holders (copies) and average over data parallel."""
        by_set: dict[tuple, list] = {}
        for n, p in self.named_parameters():
            by_set.setdefault(self.holders[n], []).append(p)
        for hs in sorted(by_set):
            members = tuple(sorted(h * self.dp + d for h in hs for d in range(self.dp)))
            if len(members) == 1:
                continue
            params = by_set[hs]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self._groups[members])
            if self.dp > 1:
                flat /= self.dp
            off = 0
            for p, g in zip(params, grads):
                v = flat[off:off + g.numel()].view_as(g)
                off += g.numel()
                if p.grad is None:
                    p.grad = v.clone()
                else:
                    p.grad.copy_(v)

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """Global L2 norm of the whole model's gradient (each parameter counted once, by its first
        holder); scales every held gradient by min(1, max_norm / (norm + 1e-6)) like torch's."""
        owned = [p.grad for n, p in self.named_parameters() if p.grad is not None and self.holders[n][0] == self.pp_rank]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        if owned:
            sq = torch.stack([torch.linalg.vector_norm(g).float() for g in owned]).pow(2).sum()
        dist.all_reduce(sq, group=self.pp_group)
        total = sq.sqrt()
        if max_norm is not None and max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for _, p in self.named_parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
        return float(total)

    @torch.no_grad()
    def gather_full_model(self) -> None:
        """Broadcast every parameter and buffer from its first holder, so the full model on every rank
        is current (evaluation, checkpoints, export)."""
        sd = self.model.state_dict()
        for owner in range(self.pp):
            keys = sorted(k for k in sd if self.holders[k] and self.holders[k][0] == owner)
            by_dtype: dict = {}
            for k in keys:
                by_dtype.setdefault(sd[k].dtype, []).append(k)
            for dtype in sorted(by_dtype, key=str):
                ks = by_dtype[dtype]
                flat = torch.cat([sd[k].reshape(-1) for k in ks])
                dist.broadcast(flat, src=self.ranks[owner], group=self.pp_group)
                if owner != self.pp_rank:
                    off = 0
                    for k in ks:
                        n = sd[k].numel()
                        sd[k].copy_(flat[off:off + n].view_as(sd[k]))
                        off += n
