"""Fine-grained FP8 (E4M3) quantisation — SPEC §2.3, report §3.3.

Activations are scaled per 1×128 tile (one token, 128 consecutive channels of the last dim),
weights per 128×128 block. For every tile or block::

    amax  = max(|x|) over the tile, floored at AMAX_FLOOR (1e-4)
    s     = amax / 448                       (FP32; the *dequantisation* multiplier)
    q     = e4m3(clamp(x / s, -448, 448))    (round to nearest even)
    x    ≈ q * s

`s` has the meaning of the checkpoints' ``weight_scale_inv`` (value ≈ q · s).

With ``pow2_scale=True`` the scale is rounded *up* to the next power of two (a UE8M0 scale: an
8-bit exponent would store it exactly), so |x / s| ≤ 448 still holds and rescaling is exact.

Partial tiles: when the tiled dim is not a multiple of the block, the last tile is shorter and its
scale is computed from the elements it really has (the padding is zeros and never raises amax).
Every function accepts any size ≥ 1 along the tiled dims.

Non-finite input — the defined result: a tile that holds a NaN gets scale NaN; a tile that holds
±inf (and no NaN) gets scale +inf. The values of `q` inside such a tile are unspecified (they may
be NaN or zero). Finite tiles are unaffected. A trainer detects the overflow cheaply on the scales
only — ``has_nonfinite(s)`` — instead of scanning the full tensors (the loss-scaling / skip-step
logic lives in the trainer).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0          # largest finite E4M3 value
AMAX_FLOOR = 1e-4        # amax floor: an all-zero tile gets s = 1e-4 / 448, never 0
BLOCK = 128              # tile width (1×128) and block side (128×128)
E4M3_MANTISSA_BITS = 3   # explicit mantissa bits: relative rounding error ≤ 2^-4 for normals
E4M3_MIN_NORMAL = 2.0 ** -6
E4M3_SUBNORMAL_STEP = 2.0 ** -9


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Round positive FP32 values up to a power of two, exactly (bit arithmetic, no log2).

    Adding 0x7FFFFF to the bit pattern carries into the exponent unless the mantissa is zero;
    masking the exponent bits then gives 2^ceil(log2 s). inf stays inf, NaN stays NaN.
    """
    bits = s.contiguous().view(torch.int32)
    up = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(torch.isnan(s), s, up)


def _scale_from_amax(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    # torch.clamp propagates NaN, so a NaN tile keeps a NaN scale (inf stays inf). The division is
    # done in FP64 and rounded once to FP32: on CUDA, torch divides by a Python scalar as a multiply
    # by its FP32 reciprocal, which is not the correctly rounded amax / 448 (one ulp off for some
    # amax, so GPU and CPU scales differed); FP64 has the bits (53 ≥ 2·24 + 2) for the FP32 cast of
    # the FP64 quotient to equal the correctly rounded FP32 quotient, reciprocal or not.
    s = (torch.clamp(amax.float(), min=AMAX_FLOOR).double() / FP8_MAX).float()
    return _pow2_ceil(s) if pow2_scale else s


def _to_e4m3(x_scaled: torch.Tensor) -> torch.Tensor:
    # clamp: x/s can round to a hair above 448; clamp keeps NaN (non-finite tiles stay visible).
    return torch.clamp(x_scaled, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _pad_last(x: torch.Tensor, block: int) -> torch.Tensor:
    k = x.shape[-1]
    pad = _cdiv(k, block) * block - k
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


# --------------------------------------------------------------------------------------------
# Activations: 1×128 tiles along the last dim.
# --------------------------------------------------------------------------------------------

def quantize_activation(x: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False):
    """x [..., K] → (q e4m3 [..., K], s fp32 [..., ceil(K/block)]), 1×block tiles on the last dim."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize_activation needs a last dim ≥ 1, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    nb = _cdiv(k, block)
    xf = _pad_last(x.float(), block).reshape(*x.shape[:-1], nb, block)
    s = _scale_from_amax(xf.abs().amax(dim=-1), pow2_scale)             # [..., nb]
    q = _to_e4m3(xf / s.unsqueeze(-1)).reshape(*x.shape[:-1], nb * block)
    if nb * block != k:
        q = q[..., :k].contiguous()
    return q, s


def dequantize_activation(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_activation`: q [..., K], s [..., ceil(K/block)] → [..., K]."""
    k = q.shape[-1]
    if s.shape[-1] != _cdiv(k, block) or s.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"scale shape {tuple(s.shape)} does not match q {tuple(q.shape)} "
                         f"with 1×{block} tiles")
    full = s.float().repeat_interleave(block, dim=-1)[..., :k]
    return (q.float() * full).to(dtype)


def quantize_activation_t(x: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False):
    """Token-direction quantisation (what Wgrad needs): x [..., T, K] →
    (q e4m3 [..., K, T] contiguous, s fp32 [..., K, ceil(T/block)]).

    Each tile is one channel over `block` consecutive tokens (a 128×1 tile of x), stored
    transposed so that the reduction dim (tokens) is the last, contiguous one — the operand
    layout :func:`dsv3.fp8.fp8_gemm` expects.
    """
    if x.dim() < 2:
        raise ValueError("quantize_activation_t needs at least 2 dims [..., T, K]")
    return quantize_activation(x.transpose(-1, -2).contiguous(), block, pow2_scale)


# --------------------------------------------------------------------------------------------
# Weights: 128×128 blocks on the last two dims.
# --------------------------------------------------------------------------------------------

def quantize_weight(w: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False):
    """w [..., N, K] → (q e4m3 [..., N, K], s fp32 [..., ceil(N/block), ceil(K/block)])."""
    if w.dim() < 2 or w.shape[-1] == 0 or w.shape[-2] == 0:
        raise ValueError(f"quantize_weight needs [..., N, K] with N, K ≥ 1, got {tuple(w.shape)}")
    n, k = w.shape[-2:]
    nbn, nbk = _cdiv(n, block), _cdiv(k, block)
    wf = w.float()
    if nbn * block != n or nbk * block != k:
        wf = torch.nn.functional.pad(wf, (0, nbk * block - k, 0, nbn * block - n))
    wb = wf.reshape(*w.shape[:-2], nbn, block, nbk, block)
    s = _scale_from_amax(wb.abs().amax(dim=(-3, -1)), pow2_scale)       # [..., nbn, nbk]
    q = _to_e4m3(wb / s[..., :, None, :, None]).reshape(*w.shape[:-2], nbn * block, nbk * block)
    if nbn * block != n or nbk * block != k:
        q = q[..., :n, :k].contiguous()
    return q, s


def dequantize_weight(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_weight`: q [..., N, K], s [..., ceil(N/b), ceil(K/b)] → [..., N, K]."""
    n, k = q.shape[-2:]
    if tuple(s.shape[-2:]) != (_cdiv(n, block), _cdiv(k, block)) or s.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"scale shape {tuple(s.shape)} does not match q {tuple(q.shape)} "
                         f"with {block}×{block} blocks")
    full = s.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return (q.float() * full[..., :n, :k]).to(dtype)


# --------------------------------------------------------------------------------------------
# Per-tensor scaling (the coarse baseline for the quantisation-error study) and helpers.
# --------------------------------------------------------------------------------------------

def quantize_per_tensor(x: torch.Tensor, pow2_scale: bool = False):
    """One scale for the whole tensor (the baseline fine-grained scaling improves on)."""
    s = _scale_from_amax(x.float().abs().amax(), pow2_scale)
    return _to_e4m3(x.float() / s), s


def has_nonfinite(*scales: torch.Tensor) -> bool:
    """True when any scale is NaN/inf, i.e. some quantised tile held a non-finite value."""
    return any(not bool(torch.isfinite(s).all()) for s in scales)


def e4m3_error_bound(x: torch.Tensor, tile_scale: torch.Tensor) -> torch.Tensor:
    """Worst-case |x - dequant(quant(x))| per element from the E4M3 format alone.

    `tile_scale` is the dequantisation scale broadcast to x's shape. Round to nearest gives a
    relative error ≤ 2^-4 in the normal range (|x/s| ≥ 2^-6) and an absolute error ≤ 2^-10·s in
    the subnormal range (spacing 2^-9·s). Used by the tests and the error study.
    """
    return torch.maximum(x.abs() * 2.0 ** -(E4M3_MANTISSA_BITS + 1),
                         tile_scale * (E4M3_SUBNORMAL_STEP / 2))
