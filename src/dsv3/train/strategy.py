"""How this rank runs its part of the model: the parallel strategy, chosen once (SPEC §2.1–2.2).

The trainer builds one :class:`~dsv3.parallel.mesh.Mesh` from torchrun's world and ``--pp/--ep``
(data parallelism fills the rest) and asks :func:`build_strategy` for the object that owns every
layout-specific step; the training loop itself has no branches on the layout.

* :class:`Replicated` — no pipeline (``--pp 1``): every rank holds the whole model, except that with
  ``--ep`` the MoE layers keep only this rank's experts (``parallel.ep_model``). Gradients: the
  replicated ones averaged over the world, the experts' summed over the ranks holding the same experts
  and divided by the world; optimizer: ZeRO-1 over the data-parallel group (experts: a local optimizer).
* :class:`Pipelined` — ``--pp > 1``: this rank's pipeline stages (``parallel.pipeline.stages``), cut
  from the model's own modules, run by the chosen schedule; within each stage the data-parallel ranks
  hold replicas and, with ``--ep``, the MoE layers are expert-parallel over the stage's EP group.

Both expose the same operations:

``module``                      the parameters this rank optimises (for ``param_groups``)
``step(inputs, targets)``       forward + backward of the local batch, gradient reduction, clipping →
                                :class:`StepOutput` (loss parts averaged over the global batch,
                                global expert loads, the global gradient norm)
``evaluate(inputs, targets)``   no-grad cross-entropy sum, token count and expert loads of one batch
``gather(optimizer, ema)``      the whole model, optimizer and EMA in the single-process layout, on
                                global rank 0 (collective)
``load(path, meta, optimizer)`` this rank's share of a checkpoint written by any layout
``local_view(key, full)``       this rank's part of a whole-model tensor (its experts' rows)

So checkpoints are the same whatever the layout, and a run saved under one resumes under another.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import unflatten_optimizer_state
from ..parallel.overlap import run_pair, span


@dataclass
class StepOutput:
    parts: dict          # loss part name -> float, averaged over the global batch
    counts: object       # [MoE layers, experts] global expert loads of the step, or None
    grad_norm: float     # before clipping, over the whole model (each copy counted once)


def _is_expert(p) -> bool:
    return bool(getattr(p, "expert_parallel", False))


class Replicated:
    """The whole model on every rank (experts sharded with ``--ep``); see the module doc."""

    def __init__(self, model, tc, mesh, device, autocast, loss_fn):
        self.model, self.tc, self.mesh, self.device = model, tc, mesh, device
        self.autocast, self.loss_fn = autocast, loss_fn
        self.world = mesh.world_size
        if mesh.spec.ep > 1:   # keeps only this rank's experts
            from ..parallel.ep_model import convert_to_expert_parallel

            convert_to_expert_parallel(model, mesh.expert_comm(), two_hop=tc.two_hop, fp8_dispatch=tc.fp8_dispatch,
                                       dispatch_capacity=tc.dispatch_capacity)
        model.to(device)
        self.module = model
        self.data_rank, self.data_size = mesh.coords["dp_rank"], mesh.spec.dp
        self.experts: dict = {}                  # state-dict key of an expert tensor -> its EP layer
        if mesh.spec.ep > 1:
            from ..parallel.ep_model import WEIGHTS, expert_modules

            self.experts = {f"{n}.experts.{w}": m for n, m in expert_modules(model) for w in WEIGHTS}
        self.overlap = tc.overlap
        if self.overlap:
            mesh.add_lane(1)

    @property
    def ep(self) -> int:
        return self.mesh.spec.ep

    def make_optimizer(self, groups, optimizer_class, **kw):
        if self.ep > 1:   # ZeRO-1 for the replicated parameters, a local optimizer for the experts
            from ..parallel.ep_model import ExpertParallelOptimizer

            return ExpertParallelOptimizer(groups, optimizer_class, self.model, data_group=self.mesh.data_group, **kw)
        if self.world > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **kw,
                                           process_group=self.mesh.data_group)
        return optimizer_class(groups, **kw)

    # ------------------------------------------------------------------ a step
    def _micro(self, i: int, inputs, targets, accum: int) -> dict:
        """Forward and backward of micro-batch ``i`` of ``accum``; returns its detached info."""
        size = inputs.shape[0] // accum
        sl = slice(i * size, (i + 1) * size)
        with span("work", f"micro-batch {i}"):
            with self.autocast():
                loss, info = self.loss_fn(self.model, inputs[sl], targets[sl])
            (loss / accum).backward()
        return info

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        accum = self.tc.grad_accum
        if self.overlap:   # the two micro-batches at once, one per lane: each one's all-to-alls behind the other's compute
            infos = list(run_pair(lambda: self._micro(0, inputs, targets, 2), lambda: self._micro(1, inputs, targets, 2)))
        else:
            infos = [self._micro(i, inputs, targets, accum) for i in range(accum)]
        totals, counts = {}, None
        for info in infos:
            for k, v in info["parts"].items():
                totals[k] = totals.get(k, 0.0) + v.float() / accum
            if info["counts"] is not None:
                counts = info["counts"] if counts is None else counts + info["counts"]
        self._reduce_gradients()
        if counts is not None and self.world > 1:
            dist.all_reduce(counts)
        grad_norm = self._clip()
        stats = torch.stack([totals[k] for k in sorted(totals)])
        if self.world > 1:
            dist.all_reduce(stats)
            stats /= self.world
        return StepOutput({k: float(v) for k, v in zip(sorted(totals), stats)}, counts, float(grad_norm))

    def _reduce_gradients(self) -> None:
        if self.world == 1:
            return
        from ..parallel.ep_model import reduce_expert_gradients, sum_and_divide_

        params = list(self.model.parameters())
        if self.ep > 1:   # experts: sum over the ranks holding them, / world (see parallel.ep_model)
            reduce_expert_gradients(self.model, self.mesh.expert_data_group, self.mesh.spec.edp, self.world)
            params = [p for p in params if not _is_expert(p)]
        sum_and_divide_([p.grad for p in params if p.grad is not None], self.mesh.data_group, self.world)

    def _clip(self):
        if self.ep > 1:   # global norm: each expert counted once
            from ..parallel.ep_model import clip_grad_norm_

            return clip_grad_norm_(self.model.parameters(), self.tc.clip, self.mesh.expert_group, self.ep)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.clip)

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor):
        """Every rank runs the whole batch (EP layers need every rank in each forward)."""
        from .losses import eval_sums

        with self.autocast():
            out = self.model.forward_train(inputs.to(self.device))
        ce, n = eval_sums(out.logits, targets.to(self.device))
        counts = torch.stack([r.counts for r in out.routing]) if out.routing else None
        return ce, n, counts

    # ------------------------------------------------------------------ state
    def _full(self, sd: dict) -> dict:
        """Experts gathered to whole tensors (collective over each EP group), on rank 0."""
        if self.ep == 1:
            return sd
        from ..parallel.ep_model import full_state_dict

        return full_state_dict(self.model, keep=self.mesh.rank == 0, sd=sd)

    @torch.no_grad()
    def gather(self, optimizer=None, ema: dict | None = None) -> tuple[dict, dict, dict]:
        model_state = self._full(dict(self.model.state_dict()))
        ema_state = self._full(dict(ema)) if ema is not None else {}
        osd = {"state": {}, "param_groups": []}
        if optimizer is not None:
            if self.world > 1:
                optimizer.consolidate_state_dict(to=0)
                if self.mesh.rank == 0:
                    osd = optimizer.state_dict()
            else:
                osd = optimizer.state_dict()
        if self.mesh.rank != 0:
            return {}, osd, {}
        return model_state, osd, ema_state

    def local_view(self, key: str, full: torch.Tensor) -> torch.Tensor:
        if self.ep > 1:
            from ..parallel.ep_model import local_view

            return local_view(self.model, key, full)
        return full

    def pieces(self, optimizer, ema, names_by_group):
        """This rank's part of a sharded checkpoint (see :func:`shard_pieces`): rank 0 the replicated
        tensors, the first EP group's ranks their experts' rows; every rank its ZeRO shard's states."""
        c = self.mesh.coords
        return shard_pieces(self.model, optimizer, ema, names_by_group, self.experts, c["ep_rank"],
                            lambda k, expert: c["edp_rank"] == 0 if expert else c["rank"] == 0,
                            lambda k, expert: c["edp_rank"] == 0 if expert else True)

    @torch.no_grad()
    def load(self, path: str, meta: dict, optimizer) -> None:
        from ..checkpoint import CheckpointReader

        reader = CheckpointReader(path, meta)
        self.model.load_state_dict({k: self.local_view(k, v.to(self.device))
                                    for k, v in reader.tensors("model").items()})
        osd = unflatten_optimizer_state(reader.tensors("optim"), meta["optimizer"])
        optimizer.load_state_dict(osd)   # ZeRO keeps its shard; the EP optimizer slices its experts


class Pipelined:
    """This rank's pipeline stages (experts sharded over the stage's EP group with ``--ep``)."""

    def __init__(self, model, tc, mesh, device, autocast, loss_fn, names_by_group):
        from ..parallel.pipeline.stages import PipelineParallel
        from .losses import eval_sums, routing_balance_loss, token_loss

        self.model, self.tc, self.mesh, self.device = model, tc, mesh, device
        self.names_by_group = names_by_group
        self.pipe = PipelineParallel(
            model, tc.schedule, tc.pp, tc.microbatches or None, local_batch=tc.batch_size // mesh.spec.dp,
            loss_fn=functools.partial(token_loss, mtp_lambda=tc.mtp_lambda), autocast=autocast,
            balance_fn=functools.partial(routing_balance_loss, balance_alpha=tc.balance_alpha), device=device,
            mesh=mesh, expert_options=dict(two_hop=tc.two_hop, fp8_dispatch=tc.fp8_dispatch,
                                           dispatch_capacity=tc.dispatch_capacity), eval_fn=eval_sums,
            overlap=tc.overlap)
        self.module = self.pipe.module
        self.data_rank, self.data_size = mesh.coords["dp_rank"], mesh.spec.dp

    def make_optimizer(self, groups, optimizer_class, **kw):
        if self.mesh.spec.ep > 1:
            from ..parallel.ep_model import ExpertParallelOptimizer

            return ExpertParallelOptimizer(groups, optimizer_class, self.module, data_group=self.mesh.data_group, **kw)
        if self.mesh.spec.dp > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **kw,
                                           process_group=self.mesh.data_group)
        return optimizer_class(groups, **kw)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        res = self.pipe.train_step(inputs.to(self.device), targets.to(self.device), self.tc.clip)
        return StepOutput(res.parts, res.counts, res.grad_norm)

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor):
        """Forward-only through the pipeline; each data-parallel replica takes its share of the rows."""
        return self.pipe.evaluate(inputs, targets)

    def gather(self, optimizer=None, ema: dict | None = None) -> tuple[dict, dict, dict]:
        return self.pipe.gather_state(optimizer, self.names_by_group if optimizer is not None else None, ema)

    def local_view(self, key: str, full: torch.Tensor) -> torch.Tensor:
        return self.pipe.local_view(key, full)

    def pieces(self, optimizer, ema, names_by_group):
        """This rank's part of a sharded checkpoint: each stage's first holder writes its tensors (the
        replicated ones from data-parallel rank 0, experts' rows from the first EP group) and its ZeRO
        shard's optimizer states — all stages and EP ranks at once."""
        c, pipe = self.mesh.coords, self.pipe
        return shard_pieces(self.model, optimizer, ema, names_by_group, pipe.experts, c["ep_rank"],
                            lambda k, expert: pipe._owns(k) and (c["edp_rank"] == 0 if expert else c["dp_rank"] == 0),
                            lambda k, expert: pipe._owns(k) and (c["edp_rank"] == 0 if expert else True))

    @torch.no_grad()
    def load(self, path: str, meta: dict, optimizer) -> None:
        """Every rank reads only the tensors it holds and its parameters' optimizer state, by key."""
        import warnings

        from ..checkpoint import CheckpointReader

        om = meta["optimizer"]
        groups = unflatten_optimizer_state({}, om)["param_groups"] or None
        if groups is None and self.mesh.rank == 0:
            warnings.warn(f"{path} holds no optimizer state: the optimizer restarts from zero", stacklevel=2)
        reader = CheckpointReader(path, meta)
        by_index: dict = {}
        for key in reader.keys("optim"):
            i, k = key.split(".", 1)
            by_index.setdefault(int(i), []).append(k)

        def optim_state(i: int) -> dict:
            st = dict(om["state"].get(str(i), {}))
            st.update({k: reader.get("optim", f"{i}.{k}") for k in by_index.get(i, ())})
            return st

        self.pipe.load_state(lambda k: reader.get("model", k), optimizer, self.names_by_group, groups, optim_state)


def _optimizer_states(optimizer) -> list:
    """(parameter, state) of every state this rank's optimizer holds: its ZeRO shard, its experts."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from ..parallel.ep_model import ExpertParallelOptimizer

    if isinstance(optimizer, ExpertParallelOptimizer):
        return _optimizer_states(optimizer.dense) + _optimizer_states(optimizer.experts)
    local = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    state = getattr(local, "state", {})
    return [(p, state[p]) for g in local.param_groups for p in g["params"] if p in state]


def shard_pieces(model, optimizer, ema: dict | None, names_by_group, experts: dict, ep_rank: int,
                 writes_model, writes_optim) -> tuple[dict, dict, dict]:
    """This rank's part of a sharded checkpoint (``checkpoint.save_sharded``): kind → {stored name:
    tensor}; expert tensors as this rank's rows ``name@a:b``; optimizer states under the single-process
    numbering ``index.state``. ``writes_model(key, expert)`` / ``writes_optim(key, expert)`` say whether
    this rank writes a tensor (each is written by exactly one rank). Also returns the non-tensor
    optimizer state {index: {...}} and the hyper-parameters {group: {...}} this rank holds."""
    from ..checkpoint import rows_key

    def rows(key: str) -> range:
        ll = experts[key].local_logical.tolist()
        r = range(ll[0], ll[-1] + 1)
        if ll != list(r):
            raise ValueError("a sharded checkpoint needs each rank's experts in one contiguous range "
                             "(no redundant-expert placement while training)")
        return r

    def take(sd: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in sd.items():
            if v.is_meta:
                continue
            if k in experts:
                if writes_model(k, True):
                    out[rows_key(prefix + k, rows(k))] = v
            elif writes_model(k, False):
                out[prefix + k] = v
        return out

    pieces = {"model": take(model.state_dict()), "extra": take(ema, "ema.") if ema is not None else {}, "optim": {}}
    name_of = {id(p): n for n, p in model.named_parameters()}
    flat = [n for g in names_by_group for n in g]
    index = {n: i for i, n in enumerate(flat)}
    group_of = {n: j for j, g in enumerate(names_by_group) for n in g}
    plain: dict = {}
    for p, st in _optimizer_states(optimizer):
        n = name_of[id(p)]
        expert = n in experts
        if not writes_optim(n, expert):
            continue
        i = index[n]
        for k, v in st.items():
            if not torch.is_tensor(v):
                plain.setdefault(i, {})[k] = v
            elif expert and v.dim() == p.dim() and v.dim() > 0 and v.shape[0] == p.shape[0]:
                pieces["optim"][rows_key(f"{i}.{k}", rows(n))] = v
            elif not expert or ep_rank == 0:
                pieces["optim"][f"{i}.{k}"] = v
    hyper = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            n = name_of.get(id(p))
            if n in group_of:
                hyper[group_of[n]] = {k: v for k, v in g.items() if k != "params"}
    return pieces, plain, hyper


def build_strategy(model: nn.Module, tc, mesh, device, autocast, loss_fn, names_by_group):
    """The strategy for ``mesh``: :class:`Pipelined` with more than one pipeline rank, else
    :class:`Replicated`. ``model`` is the whole Transformer (on ``meta`` for the pipeline: each rank
    materialises its own stages)."""
    if mesh.spec.pp > 1:
        return Pipelined(model, tc, mesh, device, autocast, loss_fn, names_by_group)
    return Replicated(model, tc, mesh, device, autocast, loss_fn)

