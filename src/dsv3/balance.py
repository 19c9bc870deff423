"""Load-balancing rules of DeepSeekMoE (SPEC §1.3; Wang et al. 2024, arXiv 2408.15664).

- ``update_bias``: the auxiliary-loss-free rule. After each step, every expert's selection bias
  moves by γ towards balance: b_i += γ·sign(mean load − load_i).
- ``sequence_balance_loss``: the complementary sequence-wise loss α·Σ_i f_i·P_i over one sequence,
  f_i = E/(K·T)·#{t: i ∈ topK(t)}, P_i = mean_t s'_{i,t}, s' = s / Σ_j s_j; averaged over sequences.
- ``max_vio``: (max_i load_i − mean load) / mean load, per batch; ``MaxVio`` accumulates loads over
  a set (e.g. the validation set) for MaxVio_global.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def update_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float = 1e-3) -> torch.Tensor:
    """In place: b_i -= γ where expert i is overloaded, += γ where underloaded (0 at exactly mean)."""
    counts = counts.to(device=bias.device, dtype=torch.float32)
    if counts.shape != bias.shape:
        raise ValueError(f"counts shape {tuple(counts.shape)} does not match bias shape {tuple(bias.shape)}")
    bias.add_(gamma * torch.sign(counts.mean(dim=-1, keepdim=True) - counts))
    return bias


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float = 1e-4) -> torch.Tensor:
    """α · mean over sequences of Σ_i f_i P_i.

    scores: [B, T, E] unbiased affinities (sigmoid or softmax outputs, with grad);
    indices: [B, T, K] the experts each token was routed to.
    """
    if scores.dim() != 3 or indices.dim() != 3 or scores.shape[:2] != indices.shape[:2]:
        raise ValueError(f"scores [B, T, E] and indices [B, T, K] expected, got {tuple(scores.shape)}, "
                         f"{tuple(indices.shape)}")
    B, T, E = scores.shape
    K = indices.shape[-1]
    hits = torch.zeros(B, E, device=scores.device, dtype=scores.dtype)
    hits.scatter_add_(1, indices.reshape(B, T * K), torch.ones(B, T * K, device=scores.device, dtype=scores.dtype))
    f = hits * (E / (K * T))                                   # [B, E], 1 for every expert when balanced
    p = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)    # [B, E]
    return alpha * (f * p).sum(-1).mean()


def max_vio(counts: torch.Tensor) -> float:
    """(max load − mean load) / mean load over the last dim (averaged over leading dims, e.g. layers)."""
    c = counts.double()
    mean = c.mean(-1)
    vio = (c.amax(-1) - mean) / mean.clamp_min(1e-12)
    return float(vio.mean())


class MaxVio:
    """Accumulate per-expert loads over many batches; ``value`` is MaxVio over the whole set."""

    def __init__(self):
        self.counts: torch.Tensor | None = None

    def add(self, counts: torch.Tensor) -> None:
        c = counts.detach().double().cpu()
        self.counts = c if self.counts is None else self.counts + c

    @property
    def value(self) -> float:
        if self.counts is None:
            raise ValueError("MaxVio: no loads were added")
        return max_vio(self.counts)

    def per_layer(self) -> list[float]:
        if self.counts is None:
            raise ValueError("MaxVio: no loads were added")
        c = self.counts if self.counts.dim() > 1 else self.counts[None]
        return [max_vio(row) for row in c]
