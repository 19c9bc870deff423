"""AdamW with optional BF16 moments (report §3.3: moments in BF16, master weights FP32) and the
learning-rate schedules (linear warm-up, then cosine decay to a floor, or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose moments are stored in ``moment_dtype`` (fp32 or bf16).

    The update itself is computed in fp32: m, v are upcast, updated, written back, so BF16 storage
    halves optimizer memory without changing the arithmetic of one step.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                 moment_dtype: torch.dtype = torch.float32):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      moment_dtype=moment_dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=group["moment_dtype"])
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=group["moment_dtype"])
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-group["lr"] / (1 - b1 ** t))
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear, experts, embedding); none on norms and 1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


LR_SCHEDULES = ("cosine", "constant")


def lr_at(step: int, peak: float, total: int, warmup: int, final_ratio: float = 0.1,
          schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to ``final_ratio·peak``
    (``schedule="cosine"``) or ``peak`` to the end (``"constant"``)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup or schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
