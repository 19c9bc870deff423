"""The dsv3 Transformer cut into pipeline stages, and this rank's share of a pipelined model (SPEC §2.1).

Split rule (``schedule.split_blocks`` / ``split_layers``; the planner uses the same functions)
---------------------------------------------------------------------------------------------
A schedule has ``num_chunks`` model chunks (PP for 1F1B/ZB1P/DualPipe, 2·PP for DualPipeV). The
model is the sequence of its L ``num_hidden_layers`` blocks followed by its D MTP modules, which sit
in the last chunk with the final norm and the output head (they use the head). The L + D blocks are
cut into C contiguous runs balanced by count: each chunk gets ``ceil((L + D) / C)`` blocks except
``C·ceil − (L + D)`` of them, which get one fewer — first the last chunk (head + MTP), then the first
(embedding), then alternately inward. V3 on 16 stages: 3, 4 × 14, 3. The last chunk's trunk layers are
its count minus D (when it has fewer than D blocks, it holds only the MTP modules and the trunk is
split over the other chunks by the same rule). A chunk may hold no block (L + D < C): it then passes
its input through.

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

What a rank holds in memory
---------------------------
Only its own stages. The trainer builds the :class:`~dsv3.model.Transformer` on the ``meta`` device
(shapes only, no storage); :class:`PipelineParallel` then gives storage on the rank's device to exactly
the parameters and buffers whose holders include this rank (its chunks, DualPipe's mirrored copy, the
1F1B/ZB1P embedding replica) and initialises them with :func:`dsv3.model.layers.init_weights` — every
parameter from its own generator seeded by (base seed, parameter name) — so they equal those of a
single-process ``torch.manual_seed(s); Transformer(cfg)`` bit for bit. A model passed in fully
materialised (tests, benchmarks) is trimmed the same way: the parameters the rank does not hold go
back to ``meta`` and their memory is released.

Evaluation runs on the pipeline (:meth:`PipelineParallel.evaluate`, the runtime's no-grad path).
Whole-model state exists in one place only, global rank 0, and only when asked for:

* :meth:`PipelineParallel.gather_state` (checkpoints) sends every tensor — parameters, buffers and
  optimizer state, each from its first holder — to rank 0 (one rank after another, in flat buckets of
  at most 256 MiB) into **CPU** memory, and returns there the full ``model.safetensors`` state dict and an optimizer state dict laid out
  exactly like a single-process run's. Cost: rank 0 briefly holds the whole model plus the whole
  optimizer state in host RAM (≈ 3× the fp32 parameter bytes with fp32 moments); no rank holds
  more than its share on the device. :meth:`PipelineParallel.load_state` (``--resume``) reads only
  the held tensors and this rank's optimizer state from the checkpoint files (lazily, by key).
* :meth:`PipelineParallel.gather_to_root` (the final Hugging Face export and sample) materialises the
  whole model on rank 0's device and fills it from the owners; the other ranks keep their share.
  Cost: the full parameter set on rank 0's device at the end of training.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ...model.layers import init_weights
from ..overlap import lane, run_pair, span
from ...model.rope import precompute_freqs_cis
from .runtime import PipelineRuntime, PipelineStage
from .schedule import MIN_MICROBATCHES, Schedule, build_schedule, split_layers


class ModelStage(PipelineStage):
    """One chunk of a dsv3 :class:`~dsv3.model.Transformer` as a pipeline stage.

    ``data`` of a micro-batch is ``(inputs, targets)``, both ``[b, T + D]`` as for ``compute_loss``.
    ``loss_fn(logits, mtp_logits, targets) -> (loss, parts)`` and ``balance_fn(routing, b, T) -> loss
    or None`` are the trainer's pieces of ``compute_loss`` (passed in; this layer does not import the
    trainer). Every stage adds the balance loss of its own MoE layers to the objective; the last
    stage adds the cross-entropy and MTP terms.

    ``overlapped_forward_backward`` (DualPipe's F&B pairs) runs F then B, or with ``overlap`` the two
    at once on two lanes (:mod:`dsv3.parallel.overlap`).
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

    # With ``overlap`` (see dsv3.parallel.overlap): forwards on lane 0, backwards on lane 1, and
    # DualPipe's F&B pairs run the two concurrently, so one's all-to-alls hide behind the other's compute.
    overlap = False

    def _on(self, k: int):
        return lane(k) if self.overlap else nullcontext()

    def forward(self, mb: int, x, data):
        with self._on(0), span("work", f"F s{self.stage} mb{mb}"):
            return super().forward(mb, x, data)

    def backward(self, mb: int, grad):
        with self._on(1), span("work", f"B s{self.stage} mb{mb}"):
            return super().backward(mb, grad)

    def backward_input(self, mb: int, grad):
        with self._on(1), span("work", f"I s{self.stage} mb{mb}"):
            return super().backward_input(mb, grad)

    def backward_weight(self, mb: int) -> None:
        with self._on(1), span("work", f"W s{self.stage} mb{mb}"):
            return super().backward_weight(mb)

    def overlapped_forward_backward(self, f_mb: int, x, data, b_stage, b_mb: int, grad):
        if not self.overlap:
            return super().overlapped_forward_backward(f_mb, x, data, b_stage, b_mb, grad)
        (out, loss, info), dx = run_pair(lambda: self.forward(f_mb, x, data), lambda: b_stage.backward(b_mb, grad))
        return out, loss, info, dx

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
    spans = split_layers(model.cfg.num_hidden_layers, schedule.num_chunks, model.cfg.num_nextn_predict_layers)
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
    spans = split_layers(model.cfg.num_hidden_layers, schedule.num_chunks, model.cfg.num_nextn_predict_layers)
    return {s: ModelStage(model, s, schedule.stage_chunk[s], schedule.num_chunks, spans[schedule.stage_chunk[s]], **kw)
            for s in schedule.stages_of(rank)}


@torch.no_grad()
def materialize(model: nn.Module, keep, device, *, init: bool = True) -> list[str]:
    """Give storage on ``device`` to every parameter/buffer of ``model`` whose state-dict key satisfies
    ``keep`` and is still on ``meta`` (or move it there from another device), and send every other one
    to ``meta`` (releasing its memory).

    ``init``: initialise the new parameters exactly as the single-process model does
    (:func:`~dsv3.model.layers.init_weights` with the model's ``init_seed``); new buffers are zero
    (the only buffer, the gates' correction bias, starts at zero). Kept tensors that have storage keep
    their values. Returns the keys of the newly materialised parameters and buffers.
    """
    device = torch.device(device)
    fresh_params, fresh = [], []
    for mname, mod in model.named_modules():
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                key = f"{mname}.{name}" if mname else name
                want = keep(key)
                if want and t.is_meta:
                    new = torch.empty(t.shape, dtype=t.dtype, device=device)
                    if not is_param or not init:
                        new.zero_()
                    fresh.append(key)
                elif not want and not t.is_meta:
                    new = torch.empty(t.shape, dtype=t.dtype, device="meta")
                elif want and t.device != device:
                    new = t.detach().to(device)
                else:
                    continue
                if is_param:
                    table[name] = nn.Parameter(new, requires_grad=t.requires_grad)
                    if want and t.is_meta:
                        fresh_params.append(key)
                else:
                    table[name] = new
    if init and fresh_params:
        init_weights(model, model.cfg.initializer_range, seed=getattr(model, "init_seed", None),
                     names=set(fresh_params))
    return fresh


def materialized_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the parameters and buffers of ``model`` that have storage (are not on ``meta``)."""
    out = {"parameters": 0, "buffers": 0, "parameters_total": 0}
    for p in model.parameters():
        out["parameters_total"] += p.numel() * p.element_size()
        if not p.is_meta:
            out["parameters"] += p.numel() * p.element_size()
    for b in model.buffers():
        if not b.is_meta:
            out["buffers"] += b.numel() * b.element_size()
    return out


def _buckets(descr: list, cap: int) -> list[list[int]]:
    """Consecutive runs of ``descr`` entries (key, shape, dtype) of one dtype and at most ``cap`` bytes."""
    out, size = [], 0
    for i, (_, shape, dtype) in enumerate(descr):
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not out or dtype != descr[out[-1][0]][2] or size + n > cap:
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


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
    (it creates process groups). ``model``: the whole :class:`~dsv3.model.Transformer`, normally built
    on the ``meta`` device after ``torch.manual_seed(seed)`` (the same on every rank); this rank's
    parameters and buffers are materialised on ``device`` and initialised like the single-process
    model, every other one stays on (or goes back to) ``meta`` — see the module doc. ``train_step``
    runs forward and backward of all micro-batches by the schedule, sums gradients over parameter copies, averages over data-parallel replicas and clips by the global
    norm; the caller then steps its optimizer over :attr:`module`'s parameters.
    """

    def __init__(self, model, schedule: str, pp: int, microbatches: int | None, *, local_batch: int, loss_fn,
                 balance_fn=None, autocast=None, device=None, timeout: float | None = 300.0, mesh=None,
                 expert_options: dict | None = None, eval_fn=None, overlap: bool = False):
        from ..mesh import MeshSpec, build_mesh

        if mesh is None:   # pipeline × data parallelism over the whole world, no expert parallelism
            world = dist.get_world_size()
            if pp < 2 or world % pp:
                raise ValueError(f"--pp {pp} must be at least 2 and divide the number of processes ({world})")
            mesh = build_mesh(MeshSpec(world, world, pp, ep=1), dist.get_rank())
        spec = mesh.spec
        if spec.pp != pp or pp < 2:
            raise ValueError(f"--pp {pp}: the mesh has {spec.pp} pipeline ranks (at least 2 needed)")
        self.model, self.mesh, self.pp, self.dp = model, mesh, pp, spec.dp
        self.eval_fn = eval_fn
        self.pp_rank, self.dp_rank = mesh.coords["pp_rank"], mesh.coords["dp_rank"]
        self.ep_rank, self.edp_rank = mesh.coords["ep_rank"], mesh.coords["edp_rank"]
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
        materialize(model, self._keeps, self.device)   # only this rank's stages get memory
        # expert parallelism inside each stage: the held MoE layers keep this rank's experts
        self.experts: dict = {}                         # state-dict key of an expert tensor -> its EP layer
        if spec.ep > 1:
            from ..ep_model import WEIGHTS, convert_to_expert_parallel, expert_modules

            convert_to_expert_parallel(model, mesh.expert_comm(), **(expert_options or {}))
            self.experts = {f"{n}.experts.{w}": m for n, m in expert_modules(model) for w in WEIGHTS}
        if overlap:   # F on lane 0, B on lane 1, each with its own EP groups; F&B pairs concurrent
            mesh.add_lane(1)
            for st in self.stages.values():
                st.overlap = True
        self.ranks = mesh.ranks["pipeline"]
        self.pp_group, self.dp_group = mesh.pipeline_group, mesh.data_group
        # the groups of each parameter's copies (holders × data parallel; for experts, the expert-data
        # replicas): every rank creates every one, in one order
        sets = sorted(set(self.holders.values()))
        mesh.create_groups([spec.stage_ranks(hs, e) for hs in sets for e in (None, *range(spec.ep))])
        act_dtype = model.embed_tokens.weight.dtype
        D, d = model.cfg.num_nextn_predict_layers, model.cfg.hidden_size

        def recv_meta(kind, mb, data):
            inputs = data[0]
            return (inputs.shape[0], inputs.shape[1] - D, d), act_dtype

        self.runtime = PipelineRuntime(self.schedule, self.pp_rank, self.stages, recv_meta, ranks=self.ranks,
                                       device=self.device, timeout=timeout)

    def _copies(self, key: str, p) -> list[int]:
        """Global ranks holding a copy of parameter ``key`` (for an expert tensor: the same experts)."""
        expert = getattr(p, "expert_parallel", False)
        return self.mesh.spec.stage_ranks(self.holders[key], self.ep_rank if expert else None)

    @property
    def num_microbatches(self) -> int:
        return self.schedule.num_microbatches

    def held(self, key: str) -> bool:
        return self.pp_rank in self.holders[key]

    def _keeps(self, key: str) -> bool:   # state-dict entries unknown to the holders map stay local
        return key not in self.holders or self.held(key)

    def _owns(self, key: str) -> bool:    # the first holder speaks for all copies
        hs = self.holders.get(key)
        return hs[0] == self.pp_rank if hs else self.pp_rank == 0

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
        """Sum gradients over each parameter's copies (DualPipe's mirrored chunks, the MTP embedding
        replica, the data-parallel replicas; for experts the expert-data replicas, whose gradients
        already hold every token of their EP group) and divide by the data-parallel size."""
        by_set: dict[tuple, list] = {}
        for n, p in self.named_parameters():
            by_set.setdefault(tuple(self._copies(n, p)), []).append(p)
        for members in sorted(by_set):
            if len(members) == 1 and self.dp == 1:
                continue
            params = by_set[members]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            if len(members) > 1:
                dist.all_reduce(flat, group=self.mesh.group(members))
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
        holder; each expert once, by the EP rank holding it); scales every held gradient by
        min(1, max_norm / (norm + 1e-6)) like torch's."""
        sq = {False: torch.zeros((), dtype=torch.float32, device=self.device),
              True: torch.zeros((), dtype=torch.float32, device=self.device)}
        for n, p in self.named_parameters():
            if p.grad is not None and self.holders[n][0] == self.pp_rank:
                sq[bool(getattr(p, "expert_parallel", False))] += torch.linalg.vector_norm(p.grad).float() ** 2
        if self.mesh.spec.ep > 1:
            dist.all_reduce(sq[True], group=self.mesh.expert_group)
        total = sq[False] + sq[True]
        dist.all_reduce(total, group=self.pp_group)
        total = total.sqrt()
        if max_norm is not None and max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for _, p in self.named_parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
        return float(total)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor):
        """No-grad pass of one evaluation batch through the pipeline (every rank passes the same rows;
        each data-parallel replica takes its share, in up to M micro-batches).

        Returns (sum of the next-token cross-entropy, number of target tokens, expert loads
        [MoE layers, experts] or None), summed over the whole world, on every rank. A replica with
        fewer rows than micro-batches runs a stand-in row in the empty ones and drops its results.
        """
        if self.eval_fn is None:
            raise ValueError("PipelineParallel.evaluate needs eval_fn(logits, targets) -> (CE sum, tokens)")
        M, dev = self.num_microbatches, self.device
        mine = torch.tensor_split(torch.arange(inputs.shape[0]), self.dp)[self.dp_rank]
        data, real = [], []
        for rows in torch.tensor_split(mine, M):
            real.append(len(rows) > 0)
            rows = rows if len(rows) else torch.zeros(1, dtype=torch.long)
            data.append((inputs[rows].to(dev), targets[rows].to(dev)))
        res = self.runtime.run(data, train=False)
        stats = torch.zeros(2, dtype=torch.float64, device=dev)
        n_moe = len(self.model.moe_layers())
        counts = torch.zeros(n_moe, self.model.cfg.n_routed_experts, dtype=torch.long, device=dev) if n_moe else None
        for (s, mb), info in res.info.items():
            if not real[mb]:
                continue
            if "logits" in info:
                ce, n = self.eval_fn(info["logits"], data[mb][1])
                stats[0] += ce
                stats[1] += n
            if info["counts"] is not None:
                counts[self.stages[s].moe_rows] += info["counts"]
        dist.all_reduce(stats)
        if counts is not None:
            dist.all_reduce(counts)
        return float(stats[0]), int(stats[1]), counts

    # ------------------------------------------------------------------ whole-model state on rank 0
    def _gather_to_root(self, tensors: dict, extra, sink, bucket_bytes: int = 256 << 20) -> list:
        """Pipeline ranks 1…PP−1 of data-parallel replica 0 send ``tensors`` (key -> tensor) to global
        rank 0 one rank after another; there ``sink(key, tensor)`` receives each one (rank 0's own
        ``tensors`` are not passed through it). A small picklable header (keys, shapes, dtypes, and the
        rank's ``extra`` object) travels first, then the tensors in flat buckets of one dtype and at most
        ``bucket_bytes`` (or one tensor), so the extra memory on either side is one bucket. Returns on
        rank 0 the list of the other ranks' ``extra`` objects, elsewhere ``[]``."""
        if self.dp_rank != 0:
            return []
        root, grp = self.ranks[0], self.pp_group
        if self.pp_rank != 0:
            descr = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
            dist.send_object_list([(descr, extra)], dst=root, group=grp, device=self.device)
            values = list(tensors.values())
            for bucket in _buckets(descr, bucket_bytes):
                flat = torch.cat([values[i].detach().reshape(-1).to(self.device) for i in bucket])
                dist.send(flat, dst=root, group=grp)
            return []
        extras = []
        for r in range(1, self.pp):
            header = [None]
            dist.recv_object_list(header, src=self.ranks[r], group=grp, device=self.device)
            descr, ext = header[0]
            extras.append(ext)
            for bucket in _buckets(descr, bucket_bytes):
                sizes = [math.prod(descr[i][1]) for i in bucket]
                flat = torch.empty(sum(sizes), dtype=descr[bucket[0]][2], device=self.device)
                dist.recv(flat, src=self.ranks[r], group=grp)
                for i, part in zip(bucket, flat.split(sizes)):
                    sink(descr[i][0], part.view(descr[i][1]))
        return extras

    def _full_experts(self, sd: dict) -> dict:
        """``sd`` with this rank's expert slices replaced by the whole [E, ...] tensors (collective over
        the EP group: every rank of it calls this with the same keys)."""
        from ..ep_model import gather_experts

        for k in sorted(sd):
            if k in self.experts:
                sd[k] = gather_experts(self.experts[k], sd[k])
        return sd

    def local_view(self, key: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole-model tensor ``key`` (its experts' rows for an expert tensor)."""
        if key in self.experts:
            from ..ep_model import slice_experts

            return slice_experts(self.experts[key], full)
        return full

    def _optimizer_state(self, optimizer):
        """This rank's optimizer state dict (consolidated over data parallel when ``optimizer`` is ZeRO,
        experts' moments gathered over the EP group), or None on the replicas that do not hold the
        consolidated copy."""
        if hasattr(optimizer, "consolidate_state_dict"):
            optimizer.consolidate_state_dict(to=0)   # rank 0 of the data-parallel group
            return optimizer.state_dict() if self.dp_rank == 0 else None
        return optimizer.state_dict()

    @staticmethod
    def _param_lists(optimizer) -> list[list]:
        """The optimizer's parameters per group, in the order of its state dict's numbering."""
        lists = getattr(optimizer, "param_lists", None)
        return lists() if lists is not None else [list(g["params"]) for g in optimizer.param_groups]

    def _names(self, optimizer) -> list[str]:
        """Full-model parameter name of each of ``optimizer``'s parameters, in its state-dict order."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for ps in self._param_lists(optimizer) for p in ps]

    @torch.no_grad()
    def gather_state(self, optimizer=None, groups: list[list[str]] | None = None,
                     ema: dict | None = None) -> tuple[dict, dict, dict]:
        """The whole model's state dict, the optimizer state and the EMA, gathered on global rank 0
        (in CPU memory), experts gathered over each EP group.

        ``groups``: the parameter names of each optimizer parameter group as a single-process run
        orders them (``param_groups(model)``); the returned optimizer state dict uses that run's
        numbering, so a checkpoint looks the same whatever the layout. ``ema``: this rank's EMA
        tensors under the model's state-dict keys (local shapes). Every tensor comes from the first
        holder of its parameter (copies are identical). Elsewhere returns ``({}, empty, {})``.
        Collective: every rank must call it.
        """
        empty = {"state": {}, "param_groups": []}
        local = self._optimizer_state(optimizer) if optimizer is not None else None
        if self.edp_rank != 0:
            return {}, empty, {}
        model_sd = self._full_experts({k: v for k, v in self.model.state_dict().items() if self._owns(k)})
        ema_sd = self._full_experts({k: v for k, v in ema.items() if self._owns(k)}) if ema is not None else {}
        if self.dp_rank != 0:
            return {}, empty, {}
        tensors = {("m", k): v for k, v in model_sd.items()}
        tensors.update({("e", k): v for k, v in ema_sd.items()})
        plain: dict = {}
        if local is not None:
            names = self._names(optimizer)
            for i, st in local["state"].items():
                n = names[i]
                if not self._owns(n):
                    continue
                for sk, v in st.items():
                    if torch.is_tensor(v):
                        tensors[("o", n, sk)] = v
                    else:
                        plain.setdefault(n, {})[sk] = v
        if self.pp_rank != 0:
            self._gather_to_root(tensors, plain, None)
            return {}, empty, {}
        got: dict = {}

        def sink(k, t):   # a copy: t is a view of the receive bucket
            got[k] = t.to("cpu", copy=True)

        extras = self._gather_to_root({}, None, sink)
        got.update({k: v.detach().cpu() for k, v in tensors.items()})
        keys = list(self.model.state_dict())
        model_state = {k: got[("m", k)] for k in keys if ("m", k) in got}
        ema_state = {k: got[("e", k)] for k in keys if ("e", k) in got}
        if local is None:
            return model_state, empty, ema_state
        index = {n: i for i, n in enumerate(n for g in groups for n in g)}
        state: dict = {}
        for key, t in got.items():
            if key[0] == "o":
                state.setdefault(index[key[1]], {})[key[2]] = t
        for ext in [plain, *extras]:
            for n, d in ext.items():
                state.setdefault(index[n], {}).update(d)
        if len(local["param_groups"]) != len(groups):
            raise ValueError(f"the optimizer has {len(local['param_groups'])} parameter groups, expected {len(groups)}")
        param_groups = [dict({k: v for k, v in g.items() if k != "params"}, params=[index[n] for n in names_j])
                        for g, names_j in zip(local["param_groups"], groups)]
        return model_state, {"state": dict(sorted(state.items())), "param_groups": param_groups}, ema_state

    @torch.no_grad()
    def load_state(self, model_tensor, optimizer, groups: list[list[str]], optim_groups: list | None,
                   optim_state) -> None:
        """Restore this rank's share from a checkpoint written by :meth:`gather_state` (or by a
        single-process run: same layout).

        ``model_tensor(key)`` reads one tensor of ``model.safetensors``; ``optim_state(index)`` gives the
        saved state of the parameter numbered ``index`` in ``groups`` order (dict, may be empty);
        ``optim_groups``: the saved parameter groups (hyper-parameters), or None to leave the optimizer
        as it is. Only held tensors are read.
        """
        for k, v in self.model.state_dict().items():
            if not v.is_meta:
                v.copy_(self.local_view(k, model_tensor(k)))
        if optim_groups is None:
            return
        if len(optim_groups) != len(self._param_lists(optimizer)):
            raise ValueError(f"the checkpoint has {len(optim_groups)} optimizer parameter groups, the optimizer "
                             f"{len(self._param_lists(optimizer))}")
        index = {n: i for i, n in enumerate(n for g in groups for n in g)}
        names = self._names(optimizer)
        state, local_groups, i = {}, [], 0
        for params, saved in zip(self._param_lists(optimizer), optim_groups):
            ids = []
            for _ in params:
                st = optim_state(index[names[i]])
                if st:
                    state[i] = st
                ids.append(i)
                i += 1
            local_groups.append(dict({k: v for k, v in saved.items() if k != "params"}, params=ids))
        optimizer.load_state_dict({"state": state, "param_groups": local_groups})
