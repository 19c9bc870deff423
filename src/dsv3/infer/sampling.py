"""Token sampling: temperature, top-k and nucleus (top-p) filtering, and the speculative-sampling
acceptance rule that keeps a drafted token's distribution exactly the target model's."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] → the distribution sampling draws from [..., V] (fp32): temperature, then
    top-k, then the smallest prefix reaching top-p. Greedy gives the one-hot argmax."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p          # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs [B, V] → token ids [B]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] → token ids [B]. temperature 0 = greedy; top-k then nucleus (top-p) filtering."""
    params = SamplingParams(temperature, top_k, top_p)
    if params.greedy:
        return logits.argmax(-1)
    return sample(probabilities(logits, params), generator)


def accept_or_resample(draft: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for one drafted token per row.

    draft [B] was drawn from q [B, V]; p [B, V] is the target distribution at the same position.
    Accept with probability min(1, p(d)/q(d)); otherwise draw from (p − q)⁺ normalised. Either way
    the returned token is distributed exactly as p. Returns (token [B], accepted [B] bool).
    With one-hot p and q (greedy) this accepts iff the draft is the argmax and else returns it.
    """
    rows = torch.arange(draft.shape[0], device=draft.device)
    p_d, q_d = p[rows, draft], q[rows, draft]
    u = torch.rand(draft.shape, device=draft.device, generator=generator)
    accepted = u * q_d < p_d                                    # u < p/q, without dividing by q = 0
    residual = (p - q).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    # total = 0 only when p = q, where acceptance is certain; keep sample() well-defined anyway
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p)
    token = torch.where(accepted, draft, sample(residual, generator))
    return token, accepted
