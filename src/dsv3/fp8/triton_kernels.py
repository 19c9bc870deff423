"""Triton kernels for the FP8 path: block-scaled GEMM, grouped (MoE) GEMM, fused quantisation.

Imported lazily by :mod:`dsv3.fp8.gemm` (``import dsv3.fp8`` never imports triton). Each kernel
has a plain-torch twin in :mod:`dsv3.fp8.quant` / :mod:`dsv3.fp8.gemm` and is tested against it,
on the CPU under ``TRITON_INTERPRET=1`` (set before this module is imported: the interpreter is
chosen when the kernels are decorated).

GEMM scheme (per output tile, BLOCK_M × BLOCK_N):
    for each 128-wide group g of K:
        part = tl.dot(a_tile[:, g], b_tile[:, g]ᵀ)       E4M3 × E4M3 on tensor cores, FP32 out
        acc += part * sa[:, g] * sb[g]                    promotion + fine-grained scales
The MMA of one group may use the tensor cores' limited internal accumulation; promoting into
the FP32 `acc` every 128 elements bounds that error as the report prescribes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .quant import AMAX_FLOOR, BLOCK, FP8_MAX

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_FP8_MAX = tl.constexpr(FP8_MAX)


def _cdiv(a, b):
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# --------------------------------------------------------------------------------------------
# Configs. BLOCK_K is fixed to the quantisation group (128). On Hopper an E4M3 128×128 operand
# tile is 16 KiB, so 3–4 stages of a 128×256 tile pair fit in shared memory. The interpreter
# gets one small config (no autotuning benchmark runs on the CPU).
# --------------------------------------------------------------------------------------------

def _gemm_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=st, num_warps=w)
            for bm, bn, st, w in _GEMM_TILES]


# (BLOCK_M, BLOCK_N, stages, warps), from tall tiles for long M to short ones for decode-sized M.
# The pruner keeps three per call (below): every kept config is compiled once and benchmarked once
# per autotuning key, so a short list keeps the first steps of an FP8 run from compiling for minutes.
_GEMM_TILES = [
    (128, 256, 3, 8), (128, 128, 4, 8), (256, 128, 3, 8),      # M ≥ 256
    (64, 128, 4, 4), (64, 256, 3, 8), (64, 64, 5, 4),          # 64 ≤ M < 256
    (16, 64, 5, 4), (32, 128, 4, 4), (16, 128, 4, 4),          # M < 64
]


def _prune_gemm(configs, named_args, **kwargs):
    """The three tiles of M's class (decode-sized GEMMs get short tiles, long ones tall tiles)."""
    m = named_args["M_BUCKET"]
    first = 0 if m >= 256 else 3 if m >= 64 else 6
    return configs[first:first + 3] if len(configs) >= first + 3 else configs[:1]


def _grouped_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn}, num_stages=st, num_warps=w)
            for bn, st, w in [(128, 4, 8), (256, 3, 8), (128, 4, 4), (64, 5, 4)]]


# --------------------------------------------------------------------------------------------
# The shared inner loop: one output tile, K walked in 128-wide groups.
# --------------------------------------------------------------------------------------------

@triton.jit
def _scaled_tile(a_ptr, b_ptr, as_ptr, bs_ptr, offs_m, offs_n, K,
                 stride_am, stride_ak, stride_bn, stride_bk,
                 stride_asm, stride_asg, stride_bsn, stride_bsg,
                 B_SCALE_DIV: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # offs_m / offs_n are clamped to valid rows by the caller, so loads need no row masks.
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk   # [BK, BN]
    as_ptrs = as_ptr + offs_m * stride_asm
    bs_ptrs = bs_ptr + (offs_n // B_SCALE_DIV) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - g * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        sa = tl.load(as_ptrs + g * stride_asg)
        sb = tl.load(bs_ptrs + g * stride_bsg)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K_BUCKET", "B_SCALE_DIV"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
                     stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                     stride_asm, stride_asg, stride_bsn, stride_bsg, M_BUCKET, K_BUCKET,
                     B_SCALE_DIV: tl.constexpr, EVEN_K: tl.constexpr, GROUP_M: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grouped launch order: GROUP_M row-tiles share each column tile while it is hot in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _scaled_tile(a_ptr, b_ptr, as_ptr, bs_ptr,
                       tl.minimum(rows, M - 1), tl.minimum(cols, N - 1), K,
                       stride_am, stride_ak, stride_bn, stride_bk,
                       stride_asm, stride_asg, stride_bsn, stride_bsg,
                       B_SCALE_DIV, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.autotune(configs=_grouped_configs(), key=["N", "K", "B_SCALE_DIV", "BLOCK_M"])
@triton.jit
def _fp8_grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr,
                             tile_e_ptr, tile_r0_ptr, tile_r1_ptr, N, K,
                             stride_am, stride_ak, stride_be, stride_bn, stride_bk,
                             stride_cm, stride_cn, stride_asm, stride_asg,
                             stride_bse, stride_bsn, stride_bsg,
                             B_SCALE_DIV: tl.constexpr, EVEN_K: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    # Program (t, n): row tile t of the host-built schedule — rows r0:r1 of one expert e's
    # contiguous segment — times column tile n of that expert's weight.
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_t).to(tl.int64)
    r0 = tl.load(tile_r0_ptr + pid_t)
    r1 = tl.load(tile_r1_ptr + pid_t)
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _scaled_tile(a_ptr, b_ptr + e * stride_be, as_ptr, bs_ptr + e * stride_bse,
                       tl.minimum(rows, r1 - 1), tl.minimum(cols, N - 1), K,
                       stride_am, stride_ak, stride_bn, stride_bk,
                       stride_asm, stride_asg, stride_bsn, stride_bsg,
                       B_SCALE_DIV, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < r1) & (cols[None, :] < N))


def fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16, b_row_scales=False):
    """a [M, K] e4m3 (1×128 scales) @ b [N, K]ᵀ e4m3 (128×128, or 1×128 if b_row_scales)."""
    m, k = a_q.shape
    n = b_q.shape[0]
    a_s, b_s = a_s.float(), b_s.float()
    c = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return c

    def grid(meta):
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

    _fp8_gemm_kernel[grid](
        a_q, b_q, c, a_s, b_s, m, n, k,
        a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), c.stride(0), c.stride(1),
        a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), _next_pow2(m), _next_pow2(k),
        B_SCALE_DIV=1 if b_row_scales else BLOCK, EVEN_K=(k % BLOCK == 0), GROUP_M=8,
        BLOCK_K=BLOCK)
    return c


def grouped_block_m(segments) -> int:
    """Row-tile height for the grouped GEMM: 64 on the GPU (32 under the interpreter), 128 when
    the experts' segments are long enough to fill it."""
    if INTERPRET:
        return 32
    counts = [e - s for s, e in segments if e > s]
    avg = sum(counts) / max(1, len(counts))
    return 128 if avg >= 512 else 64


def fp8_grouped_gemm(a_q, a_s, b_q, b_s, segments, out_dtype=torch.bfloat16,
                     b_row_scales=False, block_m: int | None = None):
    """Per-expert a[r0:r1] @ b[e]ᵀ over contiguous segments [(r0, r1)] (one per expert)."""
    t, k = a_q.shape
    _, n, _ = b_q.shape
    a_s, b_s = a_s.float(), b_s.float()
    c = torch.empty(t, n, dtype=out_dtype, device=a_q.device)
    bm = block_m or grouped_block_m(segments)
    tiles = [(e, r0, min(r0 + bm, s1)) for e, (s0, s1) in enumerate(segments)
             for r0 in range(s0, s1, bm)]
    if not tiles or n == 0:
        return c
    sched = torch.tensor(tiles, dtype=torch.int32).t().contiguous().to(a_q.device)

    def grid(meta):
        return (len(tiles), _cdiv(n, meta["BLOCK_N"]))

    _fp8_grouped_gemm_kernel[grid](
        a_q, b_q, c, a_s, b_s, sched[0], sched[1], sched[2], n, k,
        a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), b_q.stride(2),
        c.stride(0), c.stride(1), a_s.stride(0), a_s.stride(1),
        b_s.stride(0), b_s.stride(1), b_s.stride(2),
        B_SCALE_DIV=1 if b_row_scales else BLOCK, EVEN_K=(k % BLOCK == 0),
        BLOCK_M=bm, BLOCK_K=BLOCK)
    return c


# --------------------------------------------------------------------------------------------
# Fused quantisation (act_quant): one pass over x, writes q and the 1×128 scales.
# --------------------------------------------------------------------------------------------

@triton.jit
def _quant_tile(x, POW2: tl.constexpr):
    """x [BM, 128] fp32 → (x / s clamped to ±448, s [BM]) with the torch quantiser's rules."""
    amax = tl.max(tl.abs(x), axis=1)
    n_nan = tl.sum((x != x).to(tl.int32), axis=1)
    s = tl.math.div_rn(tl.maximum(amax, _AMAX_FLOOR), _FP8_MAX)
    if POW2:  # round up to a power of two, bit-exactly (inf stays inf)
        bits = s.to(tl.int32, bitcast=True)
        s = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    s = tl.where(n_nan > 0, float("nan"), s)
    y = tl.math.div_rn(x, s[:, None])
    y = tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)
    return y, s


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                      POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    y, s = _quant_tile(x.to(tl.float32), POW2)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :],
             y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * stride_sm + pid_k, s, mask=rows < M)


@triton.jit
def _swiglu_quant_kernel(g_ptr, u_ptr, q_ptr, s_ptr, M, K, stride_gm, stride_um, stride_qm,
                         stride_sm, POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    # silu(g) * u computed in FP32 and quantised without writing the BF16 product to memory.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    h = g * tl.sigmoid(g) * u.to(tl.float32)
    y, s = _quant_tile(h, POW2)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :],
             y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * stride_sm + pid_k, s, mask=rows < M)


def _rows(x):
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def act_quant(x: torch.Tensor, pow2_scale: bool = False, block_m: int = 32,
              q_dtype: torch.dtype = torch.float8_e4m3fn):
    """Triton twin of :func:`dsv3.fp8.quantize_activation` (1×128 tiles, last dim).

    ``q_dtype=torch.float32`` stores the scaled, clamped values before the E4M3 cast (for
    tests: the interpreter's own fp32→e4m3 cast is inexact, torch's is the reference)."""
    k = x.shape[-1]
    x2 = _rows(x)
    m = x2.shape[0]
    kg = _cdiv(k, BLOCK)
    q = torch.empty(m, k, dtype=q_dtype, device=x.device)
    s = torch.empty(m, kg, dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(_cdiv(m, block_m), kg)](
            x2, q, s, m, k, x2.stride(0), q.stride(0), s.stride(0),
            POW2=pow2_scale, BLOCK_M=block_m, BLOCK_K=BLOCK, num_warps=4)
    return q.reshape(*x.shape[:-1], k), s.reshape(*x.shape[:-1], kg)


def swiglu_quant(gate: torch.Tensor, up: torch.Tensor, pow2_scale: bool = False,
                 block_m: int = 32, q_dtype: torch.dtype = torch.float8_e4m3fn):
    """quantize_activation(silu(gate) * up) in one pass (the expert down-projection input)."""
    if gate.shape != up.shape:
        raise ValueError("gate and up must have the same shape")
    k = gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    m = g2.shape[0]
    kg = _cdiv(k, BLOCK)
    q = torch.empty(m, k, dtype=q_dtype, device=gate.device)
    s = torch.empty(m, kg, dtype=torch.float32, device=gate.device)
    if m:
        _swiglu_quant_kernel[(_cdiv(m, block_m), kg)](
            g2, u2, q, s, m, k, g2.stride(0), u2.stride(0), q.stride(0), s.stride(0),
            POW2=pow2_scale, BLOCK_M=block_m, BLOCK_K=BLOCK, num_warps=4)
    return q.reshape(*gate.shape[:-1], k), s.reshape(*gate.shape[:-1], kg)
