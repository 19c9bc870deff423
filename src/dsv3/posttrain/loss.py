"""GRPO (DeepSeekMath §4.1; DeepSeek-R1 §2.2.1): group-relative advantages, the clipped ratio objective
against the sampling policy, and the k3 estimator of KL(π‖π_ref) — no value model.

For a prompt q with G sampled outputs o_1 … o_G and rewards r_1 … r_G:

    A_i = (r_i − mean(r)) / (std(r) + eps)                    (std: the unbiased sample std; A_i = 0 when
                                                              every output of the group has the same reward)
    ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | …)  (π_old: the policy that sampled, its log-probs
                                                              as the inference engine reported them)
    KL_{i,t} = π_ref/π_θ − log(π_ref/π_θ) − 1                 (k3: unbiased, always ≥ 0)
    J = Σ_{i,t} w_{i,t} · [min(ρ A_i, clip(ρ, 1−ε, 1+ε) A_i) − β KL_{i,t}]

with the token weights w of ``--loss-type``: ``grpo`` (each output's tokens averaged, then the outputs:
w = 1/(G·|o_i|) per group, over the batch 1/(N·|o_i|)) or ``dapo`` (every token of the batch alike:
w = 1/Σ|o_i|). The loss is −J.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] (P prompts × G outputs) → advantages [P, G]."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, group >= 2], got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def token_weights(mask: torch.Tensor, loss_type: str = "grpo") -> torch.Tensor:
    """mask [N, T] (1 on completion tokens) → weights [N, T] summing to 1 over the batch (see module doc)."""
    mask = mask.float()
    if loss_type == "grpo":
        per_seq = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        return mask / per_seq / mask.shape[0]
    if loss_type == "dapo":
        return mask / mask.sum().clamp_min(1.0)
    raise ValueError(f"loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")


def grpo_token_terms(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                     advantages: torch.Tensor, clip: float, beta: float) -> dict:
    """Per-token pieces, all [N, T]: ``objective`` (clipped surrogate − β·KL; to maximise), ``kl`` (k3),
    ``clipped`` (1 where the clip bounds the objective: ρ > 1+ε with A > 0, or ρ < 1−ε with A < 0),
    ``ratio``. ``advantages`` [N] or [N, T]; ``ref_logp`` None (or β = 0) drops the KL term."""
    adv = advantages if advantages.dim() == logp.dim() else advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    surrogate = torch.minimum(unclipped, clipped)
    if ref_logp is not None and beta != 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
    else:
        kl = torch.zeros_like(logp)
    return {"objective": surrogate - beta * kl, "kl": kl, "ratio": ratio,
            "clipped": (clipped < unclipped).float()}


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              weights: torch.Tensor, clip: float = 0.2, beta: float = 0.04) -> tuple[torch.Tensor, dict]:
    """−Σ w·objective (see the module doc) and detached statistics: ``kl`` and ``clip_fraction``
    (weighted means over the completion tokens), ``ratio`` (its mean)."""
    t = grpo_token_terms(logp, old_logp, ref_logp, advantages, clip, beta)
    loss = -(weights * t["objective"]).sum()
    mask = (weights > 0).float()
    n = mask.sum().clamp_min(1.0)
    stats = {"kl": (t["kl"].detach() * mask).sum() / n, "clip_fraction": (t["clipped"] * mask).sum() / n,
             "ratio": (t["ratio"].detach() * mask).sum() / n}
    return loss, stats


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [..., V], targets [...] → log π(target) [...] (at least fp32; targets < 0 give 0). One fused
    cross-entropy: no [..., V] log-softmax is kept for the backward."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    lp = -torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten().clamp_min(-1), ignore_index=-1,
                                            reduction="none")
    return lp.view(targets.shape)
