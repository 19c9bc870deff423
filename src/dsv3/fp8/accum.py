"""Accumulation-precision emulation — the report's case for promotion every N_C = 128 (§3.3.2).

Hopper's FP8 tensor-core MMA keeps only ~14 significant bits in its accumulator; summing a long
K there loses accuracy (the report measures ≈2% max relative error at K = 4096). The fix: after
each 128-element group, add the partial sum into an FP32 accumulator (on CUDA cores), applying
the group's scales at the same time.

This module emulates both on any device, in float64 arithmetic with explicit rounding:

* the tensor-core accumulator is rounded to `acc_bits` significant bits after every `chunk`
  elements of K (one MMA instruction's worth: 4 for an emulated scalar pipeline, 32 for a
  Hopper FP8 wgmma k-step); `rounding="truncate"` (round toward zero, what the hardware is
  reported to do) or "nearest";
* with `promote_every=128`, the limited accumulator is flushed into an FP32 accumulator every
  128 elements; with `promote_every=None` it runs over the whole K.
"""

from __future__ import annotations

import torch

from .quant import BLOCK, _cdiv


def round_to_bits(x: torch.Tensor, bits: int, rounding: str = "truncate") -> torch.Tensor:
    """Round to `bits` significant bits (leading bit included), exponent unbounded."""
    if rounding not in ("truncate", "nearest"):
        raise ValueError("rounding must be 'truncate' or 'nearest'")
    mant, exp = torch.frexp(x)                       # x = mant · 2^exp, |mant| ∈ [0.5, 1)
    scaled = torch.ldexp(mant, torch.full_like(exp, bits))
    r = torch.trunc(scaled) if rounding == "truncate" else torch.round(scaled)
    return torch.ldexp(r, exp - bits)


def limited_precision_matmul(a: torch.Tensor, b: torch.Tensor, acc_bits: int = 14,
                             chunk: int = 32, promote_every: int | None = None,
                             rounding: str = "truncate", scale_fn=None) -> torch.Tensor:
    """a [M, K] @ b [N, K]ᵀ with a limited-precision accumulator (see module doc).

    Products and each chunk's sum are exact in float64 for E4M3 inputs (≤ 8 significant bits
    each). `scale_fn(k0, k1)` (optional) returns the [M, N] multiplier applied at promotion of
    the window k0:k1 — the per-group scales of a block-scaled GEMM. Returns float32 [M, N] when
    promoting (the FP32 accumulator), float64 otherwise (the limited accumulator itself).
    """
    if promote_every is not None and promote_every % chunk:
        raise ValueError("promote_every must be a multiple of chunk")
    a64, b64 = a.double(), b.double()
    m, k = a64.shape
    n = b64.shape[0]
    limited = torch.zeros(m, n, dtype=torch.float64, device=a.device)
    fp32_acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    w0 = 0
    for k0 in range(0, k, chunk):
        k1 = min(k, k0 + chunk)
        limited = round_to_bits(limited + a64[:, k0:k1] @ b64[:, k0:k1].T, acc_bits, rounding)
        if promote_every is not None and (k1 % promote_every == 0 or k1 == k):
            flushed = limited if scale_fn is None else limited * scale_fn(w0, k1)
            fp32_acc += flushed.float()
            limited = torch.zeros_like(limited)
            w0 = k1
    return limited if promote_every is None else fp32_acc


def fp8_gemm_emulated(a_q, a_s, b_q, b_s, acc_bits: int = 14, chunk: int = 32,
                      promote: bool = True, rounding: str = "truncate") -> torch.Tensor:
    """:func:`dsv3.fp8.fp8_gemm` with an emulated ~14-bit tensor-core accumulator.

    promote=True: the report's scheme (FP32 promotion + scales every 128 elements).
    promote=False: one limited accumulator over all of K; the scales must then be constant
    along K (per-tensor or per-row: a_s [M, 1] or scalar, b_s [N, 1] or scalar) and are
    applied at the end. Returns float32 [M, N].
    """
    n = b_q.shape[0]
    a_f, b_f = a_q.float(), b_q.float()
    if not promote:
        sa, sb = a_s.float().reshape(-1, 1), b_s.float().reshape(1, -1)
        if sa.numel() not in (1, a_q.shape[0]) or sb.numel() not in (1, n):
            raise ValueError("promote=False needs per-tensor or per-row scales")
        acc = limited_precision_matmul(a_f, b_f, acc_bits, chunk, None, rounding)
        return (acc * sa.double() * sb.double()).float()
    sa = a_s.double()
    sb = b_s.double()
    if sb.shape[0] != n:                             # 128×128 block scales → one row per column
        sb = sb.repeat_interleave(BLOCK, dim=0)[:n]

    def scale_fn(k0, k1):
        g = k0 // BLOCK
        return sa[:, g, None] * sb[None, :, g]

    if _cdiv(a_q.shape[1], BLOCK) != sa.shape[1]:
        raise ValueError("a_s must have ceil(K/128) columns")
    return limited_precision_matmul(a_f, b_f, acc_bits, chunk, BLOCK, rounding, scale_fn)
