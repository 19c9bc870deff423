"""Expert-parallel all-to-all traffic with node-limited routing (SPEC §1.2, §2.2).

Routing model: experts are spread evenly over the EP group in index order (GPU g holds experts
``g·E/EP … (g+1)·E/EP − 1``), so the ``n_group`` routing groups map to contiguous GPUs — with V3's
training layout (EP64 over 8 nodes, 8 groups) one group is one node. Each token keeps its
``topk_group`` best groups (M) and takes its ``num_experts_per_tok`` (K) experts among them. Under the
planner's balanced-load assumption (the bias keeps every expert equally loaded on average) the kept
groups and the experts inside them are uniform, which gives closed forms for the expected number of
distinct GPUs and nodes a token reaches (:func:`expected_units_hit`).

Two-hop dispatch (DeepEP normal kernels): a token crosses InfiniBand once per *remote* target node, to
the GPU with its own in-node index, which forwards it over NVLink to each target GPU on that node
other than itself. Combine runs the reverse path (summing on the way). The two hops are pipelined, so
a layer's all-to-all takes ``max(IB time, NVLink time)``. Backward moves the same bytes (the gradient
before the down-projection is dispatched in FP8, the combine stays BF16: report §3.3.3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb

from ..config import ModelConfig

FP8_TILE = 128


def _p_hit_given_groups(kept_experts: int, top_k: int, unit_experts_kept: int) -> float:
    """P(at least one of ``top_k`` uniform picks among ``kept_experts`` lands in a unit owning
    ``unit_experts_kept`` of them)."""
    if unit_experts_kept <= 0:
        return 0.0
    k = min(top_k, kept_experts)
    return 1.0 - comb(kept_experts - unit_experts_kept, k) / comb(kept_experts, k)


def expected_units_hit(n_experts: int, top_k: int, n_group: int, topk_group: int,
                       experts_per_unit: int) -> float:
    """Expected number of distinct units (GPUs or nodes) holding a token's ``top_k`` experts.

    ``topk_group == n_group`` is unrestricted routing. Units must tile the groups: a unit holds a whole
    number of groups, or a group spans a whole number of units.
    """
    E, G, M, u = n_experts, n_group, topk_group, experts_per_unit
    if E % G or E % u:
        raise ValueError(f"{E} experts do not split into {G} groups and units of {u}")
    x = E // G                       # experts per group
    kept = M * x
    if u >= x:
        if u % x:
            raise ValueError(f"a unit of {u} experts does not hold a whole number of {x}-expert groups")
        gu = u // x                  # groups per unit
        p = 0.0
        for j in range(0, min(gu, M) + 1):   # j of the unit's groups are among the M kept
            pj = comb(gu, j) * comb(G - gu, M - j) / comb(G, M)
            p += pj * _p_hit_given_groups(kept, top_k, j * x)
    else:
        if x % u:
            raise ValueError(f"a {x}-expert group does not split into units of {u} experts")
        p = (M / G) * _p_hit_given_groups(kept, top_k, u)
    return (E // u) * p


@dataclass
class EPTraffic:
    """All-to-all traffic per token and MoE layer, forward (backward moves the same)."""

    ep: int
    ep_nodes: int
    max_groups: int                   # M: routing groups kept per token
    nodes_per_token: float            # expected distinct nodes holding the token's experts
    remote_nodes_per_token: float     # ... other than the token's own node: IB copies
    gpus_per_token: float             # expected distinct GPUs holding the token's experts
    nvlink_copies_per_token: float    # NVLink forwards (dispatch) per token
    dispatch_bytes_per_copy: float    # FP8 + scales, or BF16
    combine_bytes_per_copy: float     # BF16
    ib_bytes_per_token: float         # dispatch + combine, forward
    nvlink_bytes_per_token: float     # dispatch + combine, forward

    def to_dict(self) -> dict:
        return asdict(self)


def ep_traffic(cfg: ModelConfig, ep: int, gpus_per_node: int, *, fp8_dispatch: bool,
               topk_group: int | None = None) -> EPTraffic:
    """Expected all-to-all copies and bytes per token per MoE layer for an EP group of ``ep`` GPUs."""
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    M = cfg.topk_group if topk_group is None else topk_group
    if not 1 <= M <= G:
        raise ValueError(f"routing groups per token must be in 1..n_group ({G}), got {M}")
    if E % ep:
        raise ValueError(f"EP {ep} does not divide the {E} routed experts")
    d = cfg.hidden_size
    dispatch = d * (1.0 + 4.0 / FP8_TILE) if fp8_dispatch else 2.0 * d
    combine = 2.0 * d
    per_gpu = E // ep
    gpus = expected_units_hit(E, K, G, M, per_gpu)
    if ep <= gpus_per_node:
        nodes, remote, ep_nodes = 1.0, 0.0, 1
        nvl = gpus * (1.0 - 1.0 / ep) if ep > 1 else 0.0
    else:
        if ep % gpus_per_node:
            raise ValueError(f"EP {ep} spanning nodes must be a whole number of nodes "
                             f"({gpus_per_node} GPUs each)")
        ep_nodes = ep // gpus_per_node
        nodes = expected_units_hit(E, K, G, M, per_gpu * gpus_per_node)
        remote = nodes * (ep_nodes - 1) / ep_nodes   # the token's own node is one of them, uniformly
        nvl = gpus * (1.0 - 1.0 / gpus_per_node)     # the relay GPU on a node needs no NVLink copy
    return EPTraffic(ep=ep, ep_nodes=ep_nodes, max_groups=M, nodes_per_token=nodes,
                     remote_nodes_per_token=remote, gpus_per_token=gpus, nvlink_copies_per_token=nvl,
                     dispatch_bytes_per_copy=dispatch, combine_bytes_per_copy=combine,
                     ib_bytes_per_token=remote * (dispatch + combine),
                     nvlink_bytes_per_token=nvl * (dispatch + combine))
