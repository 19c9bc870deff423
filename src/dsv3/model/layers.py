"""Small building blocks: RMSNorm, the SwiGLU feed-forward network, weight initialisation."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or kept in fp64: the precision of norms, routing and logits (fp64 references stay fp64)."""
    if x.dtype is torch.float32 or x.dtype is torch.float64:
        return x                                  # no dispatch at all on the common path
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in (at least) fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype is self.weight.dtype and dtype in (torch.float32, torch.float64):
            # one fused call, the same arithmetic as below (no casts are needed at this precision)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x = at_least_fp32(x)
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


def init_weights(module: nn.Module, std: float, seed: int | None = None, names=None) -> int:
    """Normal(0, std) for every matrix (Linear, embedding, gate, stacked experts); ones for norms;
    zeros for other 1-D parameters. Returns the base seed used (also stored as ``module.init_seed``).

    Every parameter is drawn from its own generator seeded by (``seed``, its name in ``module``), so
    its value does not depend on which other parameters exist or were materialised: a pipeline rank
    that builds the model on the ``meta`` device and materialises only its stages initialises them
    exactly like the single-process model (:mod:`dsv3.parallel.pipeline.stages`). ``seed`` defaults to
    ``torch.initial_seed()`` (the value given to ``torch.manual_seed``), so ``torch.manual_seed(s);
    Transformer(cfg)`` is reproducible. Parameters on the ``meta`` device are skipped; ``names``
    (optional) restricts the initialisation to those parameter names. Draws are made on the CPU and
    copied, so the values do not depend on the device either.
    """
    if seed is None:
        seed = torch.initial_seed()
    seed = int(seed)
    module.init_seed = seed
    norms = {id(m.weight) for m in module.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.is_meta or (names is not None and name not in names):
                continue
            if id(p) in norms:
                p.fill_(1.0)
            elif p.dim() >= 2:
                g = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
                if p.device.type == "cpu":
                    p.normal_(0.0, std, generator=g)
                else:
                    p.copy_(torch.empty(p.shape, dtype=p.dtype).normal_(0.0, std, generator=g))
            else:
                p.zero_()
    return seed


def param_seed(seed: int, name: str) -> int:
    """The seed of parameter ``name``'s generator under base seed ``seed`` (63-bit, stable)."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
