"""Expert parallelism for training a whole :class:`~dsv3.model.Transformer` (SPEC §2.2).

``convert_to_expert_parallel(model, comm)`` swaps every ``MoE`` (main blocks and MTP blocks) for an
:class:`~dsv3.parallel.expert.ExpertParallelMoE` that keeps only this rank's experts, copying the
weights from the full model, so a model built with the same seed gives the single-process numbers.
Attention, dense FFNs, shared experts, gates, embedding and head stay replicated.

Gradients (world W ranks, each with its own B/W sequences; the loss of rank r, L_r, is a mean over its
local micro-batch; the single-process loss over the global batch is L = (1/W) Σ_r L_r):

* a replicated parameter θ only sees rank r's tokens on rank r, so its local gradient is ∂L_r/∂θ and
  ``all_reduce(sum) / W`` over the data-parallel group gives ∂L/∂θ (plain data parallelism);
* an expert's weights W_e on EP rank e of one EP group receive, through combine's backward, the
  gradients of the tokens of *every* rank of that EP group: the local gradient is Σ_{r ∈ group} ∂L_r/∂W_e.
  The W/ep EP groups hold replicas of W_e (the expert-data group), so
  ``all_reduce(sum)`` over the expert-data group gives Σ_{all r} ∂L_r/∂W_e, and dividing by **W**
  (not by the expert-data group's size W/ep) gives ∂L/∂W_e.  (:func:`reduce_expert_gradients`)
* the global gradient norm counts each expert once: ‖g‖² = ‖g_replicated‖² (identical on every rank
  after the all-reduce) + Σ over the EP group of ‖g_local experts‖².  (:func:`clip_grad_norm_`)

Expert loads: ``Routing.counts`` of an EP layer are the loads of *this rank's tokens* over all
experts; the trainer's all-reduce over the world turns them into the global per-expert loads, as
in a one-rank run with the same global batch.

Optimizer (:class:`ExpertParallelOptimizer`): ZeRO-1 over the data-parallel group for the replicated
parameters, a local optimizer for this rank's experts (its state is replicated over the W/ep ranks
holding the same experts — no extra sharding there). Its ``state_dict`` is in the layout of a
single-process optimizer over the full model (expert moments gathered), so checkpoints of EP runs
and one-rank runs are interchangeable, and ``load_state_dict`` slices each rank's experts back out.

Memory: :func:`full_state_dict` and the consolidated optimizer state put the
whole model (and its optimizer moments) on the destination rank, like a one-rank run; every rank of
the EP group transiently holds one layer's gathered expert tensor while gathering.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import MoE
from .expert import ExpertParallelMoE
from .mesh import EPComm

WEIGHTS = ("w13", "w2")


def _is_expert(p: torch.Tensor) -> bool:
    return bool(getattr(p, "expert_parallel", False))


def convert_to_expert_parallel(model: nn.Module, comm: EPComm, *, two_hop: bool = False,
                               fp8_dispatch: bool = False, shared_as_routed: bool = False,
                               placement=None, load_window: int = 16,
                               dispatch_capacity: bool = False) -> list[ExpertParallelMoE]:
    """Replace every ``MoE`` of ``model`` (blocks and MTP blocks, i.e. ``model.moe_layers()``) in place by
    an ``ExpertParallelMoE`` holding this rank's experts, weights copied from the full layer (a layer on
    the ``meta`` device — held by another pipeline rank — becomes a ``meta`` EP layer). Call it before
    the FP8 conversion and before building the optimizer. ``shared_as_routed``: the shared expert becomes
    a routed one (weight 1) with a replica on every rank (serving). ``placement``: phy2log [P] of every
    layer (e.g. ``expert.initial_placement`` with redundant experts; default one slot per expert);
    ``load_window``: forwards of expert loads each layer keeps for a rebalance; ``dispatch_capacity``:
    flat dispatches with learnt capacities instead of count exchanges (``expert.DispatchCapacity``).
    Leaves the global RNG untouched."""
    if model.cfg.n_routed_experts % comm.size:
        raise ValueError(f"--ep {comm.size} must divide the number of routed experts "
                         f"({model.cfg.n_routed_experts})")
    rng = torch.get_rng_state()
    layers = []
    try:
        for block in [*model.layers, *model.mtp]:
            moe = block.mlp
            if not isinstance(moe, MoE):
                continue
            ref = next(moe.parameters())
            ep = ExpertParallelMoE(model.cfg, comm, two_hop=two_hop, fp8_dispatch=fp8_dispatch,
                                   shared_as_routed=shared_as_routed, placement=placement,
                                   load_window=load_window, dispatch_capacity=dispatch_capacity)
            ep.to(device=ref.device)
            if not ref.is_meta:               # a layer another pipeline rank holds stays shapes only
                ep.load_from(moe)             # gate (with its bias), shared expert, this rank's experts
            block.mlp = ep
            layers.append(ep)
    finally:
        torch.set_rng_state(rng)
    return layers


def expert_modules(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def _owner_of(model: nn.Module) -> dict[int, ExpertParallelMoE]:
    """id(expert parameter) → its EP layer."""
    return {id(p): m for _, m in expert_modules(model) for p in m.experts.parameters()}


# ----------------------------------------------------------------------------------------- gather / slice
def gather_experts(moe: ExpertParallelMoE, t: torch.Tensor) -> torch.Tensor:
    """A per-slot tensor of this rank [S, ...] → the full per-logical-expert tensor [E, ...]
    (collective over the EP group; the first replica of each expert)."""
    comm = moe.comm
    t = t.contiguous()
    if comm.size > 1:
        parts = [torch.empty_like(t) for _ in range(comm.size)]
        dist.all_gather(parts, t, group=comm.group)
        phys = torch.cat(parts)
    else:
        phys = t
    full = phys[moe.placement.log2phy[:, 0].to(phys.device)]
    return full[:moe.num_routed]


def slice_experts(moe: ExpertParallelMoE, full: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`gather_experts`: the rows of this rank's slots."""
    if full.shape[0] != moe.num_routed:
        raise ValueError(f"expert tensor with {full.shape[0]} rows, the layer has {moe.num_routed} experts")
    return full[moe.local_logical.to(full.device)].clone()


def full_state_dict(model: nn.Module, keep: bool = True, sd: dict | None = None) -> dict:
    """``model.state_dict()`` (or ``sd``, a dict under the same keys, e.g. an EMA) with every EP layer's
    experts gathered to full [E, ...] tensors, i.e. the state dict of the single-process model
    (collective over each EP group). ``keep=False``: take part in the gathers but return the local
    state dict (a rank that does not save)."""
    sd = model.state_dict() if sd is None else dict(sd)
    for name, moe in expert_modules(model):
        for w in WEIGHTS:
            key = f"{name}.experts.{w}"
            full = gather_experts(moe, sd[key])
            if keep:
                sd[key] = full
    return sd


def local_view(model: nn.Module, key: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the single-process tensor ``key``: its experts' rows for an expert weight,
    ``full`` itself otherwise."""
    for name, moe in expert_modules(model):
        if key.startswith(name + ".experts."):
            return slice_experts(moe, full)
    return full


def load_full_state_dict(model: nn.Module, sd: dict, strict: bool = True):
    """Load a single-process (full) state dict into an EP model: each EP layer takes its experts."""
    sd = dict(sd)
    for name, moe in expert_modules(model):
        for w in WEIGHTS:
            key = f"{name}.experts.{w}"
            if key in sd:
                sd[key] = slice_experts(moe, sd[key])
    return model.load_state_dict(sd, strict=strict)


# ----------------------------------------------------------------------------------------- gradients
def reduce_expert_gradients(model: nn.Module, expert_data_group, expert_data_size: int, world: int) -> None:
    """Expert gradients: sum over the ranks holding the same experts, then divide by the world size
    (see the module docstring for why W and not W/ep)."""
    grads = [p.grad for p in model.parameters() if _is_expert(p) and p.grad is not None]
    sum_and_divide_(grads, expert_data_group if expert_data_size > 1 else None, world)


def sum_and_divide_(grads: list[torch.Tensor], group, divisor: int) -> None:
    """In place: each gradient summed over ``group`` (None: no communication) in one flat all-reduce,
    then divided by ``divisor``."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group is not None:
        dist.all_reduce(flat, group=group)
    flat /= divisor
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm_(parameters, max_norm: float, expert_group, expert_size: int) -> torch.Tensor:
    """Clip to the global 2-norm: replicated gradients counted once (they are equal on every rank after
    the data-parallel reduction), each expert counted once (its squared norm summed over the EP group)."""
    params = [p for p in parameters if p.grad is not None]
    dense = [p.grad for p in params if not _is_expert(p)]
    experts = [p.grad for p in params if _is_expert(p)]
    ref = params[0].grad if params else torch.zeros(())

    def sq_norm(grads):
        if not grads:
            return ref.new_zeros((), dtype=torch.float32)
        return torch.nn.utils.get_total_norm(grads).to(torch.float32) ** 2

    d2, e2 = sq_norm(dense), sq_norm(experts).reshape(1)
    if expert_size > 1:
        dist.all_reduce(e2, group=expert_group)
    total = (d2 + e2[0]).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ----------------------------------------------------------------------------------------- optimizer
class ExpertParallelOptimizer:
    """ZeRO-1 (over ``data_group``) for the replicated parameters + a local optimizer for this rank's
    experts, behind the optimizer interface the trainer uses (``param_groups``, ``step``, ``zero_grad``,
    ``consolidate_state_dict``, ``state_dict``, ``load_state_dict``).

    ``state_dict`` / ``load_state_dict`` use the layout of ``optimizer_class(groups)`` over the full
    single-process model: parameter ids numbered over ``groups`` in order, expert moments [E, ...]."""

    def __init__(self, groups: list[dict], optimizer_class, model: nn.Module, data_group=None, **kwargs):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        self._owner = _owner_of(model)
        self._layout = []                    # per original group: (params, dense group idx, expert group idx)
        dense_groups, expert_groups = [], []
        for g in groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            params = list(g["params"])
            d = [p for p in params if not _is_expert(p)]
            e = [p for p in params if _is_expert(p)]
            for p in e:
                if id(p) not in self._owner:
                    raise ValueError("an expert-parallel parameter outside an ExpertParallelMoE layer")
            di = ei = None
            if d:
                di = len(dense_groups)
                dense_groups.append({**hyper, "params": d})
            if e:
                ei = len(expert_groups)
                expert_groups.append({**hyper, "params": e})
            self._layout.append((params, di, ei))
        if not dense_groups:
            raise ValueError("ExpertParallelOptimizer needs replicated parameters")
        self.dense = ZeroRedundancyOptimizer(dense_groups, optimizer_class=optimizer_class,
                                             process_group=data_group, **kwargs)
        # a pipeline stage without MoE layers has no experts: an optimizer over nothing
        self.experts = _NoParams() if not expert_groups else optimizer_class(expert_groups, **kwargs)
        self._dense_index = {id(p): i for i, p in enumerate(p for g in dense_groups for p in g["params"])}
        self._expert_index = {id(p): i for i, p in enumerate(p for g in expert_groups for p in g["params"])}
        self._consolidated: dict | None = None

    @property
    def param_groups(self) -> list[dict]:
        return self.dense.param_groups + self.experts.param_groups

    def param_lists(self) -> list[list]:
        """The parameters of each group given at construction: the numbering of ``state_dict``."""
        return [list(params) for params, _, _ in self._layout]

    def step(self, closure=None):
        self.dense.step()
        self.experts.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.experts.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ state
    def _per_expert(self, p: torch.Tensor, v) -> bool:
        return torch.is_tensor(v) and v.dim() == p.dim() and v.dim() > 0 and v.shape[1:] == p.shape[1:]

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collective: the full-model state dict on global rank ``to`` (dense shards gathered by ZeRO,
        expert moments all-gathered over each EP group)."""
        self.dense.consolidate_state_dict(to=to)
        keep = self.dense.rank == to            # ``to`` is a rank of the data-parallel group, as for ZeRO
        local = self.experts.state_dict()
        expert_params = [p for g in self.experts.param_groups for p in g["params"]]
        gathered = {}
        for j, p in enumerate(expert_params):
            moe = self._owner[id(p)]
            st = local["state"].get(j)
            if st is None:                   # no step taken yet: keep the collectives in step anyway
                st = {}
            out = {}
            for k in sorted(st):
                v = st[k]
                if self._per_expert(p, v):
                    full = gather_experts(moe, v)
                    if keep:
                        out[k] = full
                elif keep:
                    out[k] = v
            gathered[j] = out
        if not keep:
            self._consolidated = None
            return
        dense_sd = self.dense.state_dict()
        state, groups = {}, []
        idx = 0
        for gi, (params, di, ei) in enumerate(self._layout):
            src = dense_sd["param_groups"][di] if di is not None else local["param_groups"][ei]
            ids = []
            for p in params:
                st = (gathered[self._expert_index[id(p)]] if _is_expert(p)
                      else dense_sd["state"].get(self._dense_index[id(p)]))
                if st:
                    state[idx] = st
                ids.append(idx)
                idx += 1
            groups.append({**{k: v for k, v in src.items() if k != "params"}, "params": ids})
        self._consolidated = {"state": state, "param_groups": groups}

    def state_dict(self) -> dict:
        if self._consolidated is None:
            raise RuntimeError("call consolidate_state_dict(to=this rank) on every rank first")
        return self._consolidated

    def load_state_dict(self, sd: dict) -> None:
        """Load a full-model optimizer state dict (every rank): ZeRO keeps its shard, each rank slices
        its experts' moments."""
        if len(sd["param_groups"]) != len(self._layout):
            raise ValueError(f"optimizer state with {len(sd['param_groups'])} parameter groups, "
                             f"expected {len(self._layout)}")
        d_state, e_state = {}, {}
        d_groups, e_groups = [], []
        for saved, (params, di, ei) in zip(sd["param_groups"], self._layout):
            if len(saved["params"]) != len(params):
                raise ValueError("optimizer state does not match the model's parameters")
            hyper = {k: v for k, v in saved.items() if k != "params"}
            d_ids, e_ids = [], []
            for pid, p in zip(saved["params"], params):
                st = sd["state"].get(pid)
                if _is_expert(p):
                    j = self._expert_index[id(p)]
                    e_ids.append(j)
                    if st:
                        moe = self._owner[id(p)]
                        e_state[j] = {k: (slice_experts(moe, v) if self._per_expert(p, v) else v)
                                      for k, v in st.items()}
                else:
                    j = self._dense_index[id(p)]
                    d_ids.append(j)
                    if st:
                        d_state[j] = st
            if d_ids:
                d_groups.append({**hyper, "params": d_ids})
            if e_ids:
                e_groups.append({**hyper, "params": e_ids})
        self.dense.load_state_dict({"state": d_state, "param_groups": d_groups})
        self.experts.load_state_dict({"state": e_state, "param_groups": e_groups})


class _NoParams:
    """The expert half of :class:`ExpertParallelOptimizer` on a rank without experts."""
    param_groups: list = []

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": []}

    def load_state_dict(self, sd: dict) -> None:
        pass
