"""Rotary position embedding on interleaved pairs, with YaRN frequency scaling (SPEC §1.1).

DeepSeek rotates pairs of *consecutive* elements (x0, x1), (x2, x3), … of the 64-d RoPE parts.
Frequencies are built once as complex numbers exp(i·pos·θ_j) and applied by complex multiplication.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig, yarn_mscale
from .layers import at_least_fp32


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The dimension index whose wavelength makes `num_rotations` turns over `max_pos` positions."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """θ_j for j = 0 … dim/2−1 (fp32), YaRN-blended when ``cfg.rope_scaling`` is set.

    YaRN keeps high-frequency dimensions (many rotations in the original context) as they are,
    divides low-frequency ones by ``factor``, and ramps linearly between the two in between.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.rope_scaling
    if rs is not None and rs["factor"] > 1:
        orig = rs["original_max_position_embeddings"]
        low, high = _correction_dim(rs["beta_fast"], dim, base, orig), _correction_dim(rs["beta_slow"], dim, base, orig)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (keep θ), 0: interpolate (θ / factor)
        freqs = freqs / rs["factor"] * (1 - keep) + freqs * keep
    return freqs.float()


def rope_cos_sin_scale(cfg: ModelConfig) -> float:
    """Magnitude applied to cos/sin, as transformers computes it: rope_scaling's ``attention_factor``
    when given, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are nonzero,
    else mscale(factor).

    1.0 for every released DeepSeek config (mscale == mscale_all_dim); kept for HF parity.
    """
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.get("attention_factor") is not None:
        return rs["attention_factor"]
    if rs["factor"] <= 1:
        return 1.0
    if rs["mscale"] and rs["mscale_all_dim"]:
        return yarn_mscale(rs["factor"], rs["mscale"]) / yarn_mscale(rs["factor"], rs["mscale_all_dim"])
    return yarn_mscale(rs["factor"])


def precompute_freqs_cis(cfg: ModelConfig, max_len: int, device=None) -> torch.Tensor:
    """Complex [max_len, dim/2]: scale · exp(i · pos · θ_j)."""
    freqs = rope_frequencies(cfg).to(device)
    t = torch.arange(max_len, dtype=torch.float32, device=device)
    angles = torch.outer(t, freqs)
    return torch.polar(torch.full_like(angles, rope_cos_sin_scale(cfg)), angles)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim. x: [B, T, H, D] (or [B, T, D]); freqs_cis: [T, D/2],
    or [B, T, D/2] when the rows of the batch sit at different positions."""
    dtype = x.dtype
    xc = torch.view_as_complex(at_least_fp32(x).reshape(*x.shape[:-1], -1, 2))
    shape = [1] * xc.dim()
    shape[1], shape[-1] = freqs_cis.shape[-2], freqs_cis.shape[-1]
    if freqs_cis.dim() == 3:
        shape[0] = freqs_cis.shape[0]
    out = torch.view_as_real(xc * freqs_cis.view(shape)).flatten(-2)
    return out if out.dtype is dtype else out.to(dtype)
