"""Small building blocks: RMSNorm, the SwiGLU feed-forward network, weight initialisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) · up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter: int, linear: type[nn.Module] = nn.Linear):
        super().__init__()
        self.gate_proj = linear(dim, inter, bias=False)
        self.up_proj = linear(dim, inter, bias=False)
        self.down_proj = linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) for every matrix (Linear, embedding, gate, stacked experts); ones for norms."""
    norms = {id(m.weight) for m in module.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for p in module.parameters():
            if id(p) in norms:
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.zero_()
