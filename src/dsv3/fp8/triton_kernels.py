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

from ..devices import upload
from .quant import AMAX_FLOOR, BLOCK, FP8_MAX

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_FP8_MAX = tl.constexpr(FP8_MAX)
_GROUP = tl.constexpr(BLOCK)          # the quantisation tile width (128)


def _cdiv(a, b):
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())



def _upload(rows, device) -> torch.Tensor:
    """A host-built schedule (a list of equal-length int tuples) as an int32 [fields, len] device tensor,
    copied without blocking the host (a blocking copy would make every grouped GEMM wait for all
    queued GPU work)."""
    fields = len(rows[0])
    return upload([r[f] for f in range(fields) for r in rows], device, torch.int32).view(fields, len(rows))


# --------------------------------------------------------------------------------------------
# Expert schedules on the device. The grouped kernels take the experts' row offsets as an int32
# tensor [E+1] (cumulative token counts, offsets[0] = 0 … offsets[E] = T), launch a grid sized by a
# bound the host knows without reading them, and each program finds its own (expert, row range):
# expert e owns row tiles ends[e-1] … ends[e]-1 of the global tile order, ends being the cumulative
# sum of ⌈count_e / BLOCK⌉; programs past the last real tile exit at once.
# --------------------------------------------------------------------------------------------

def tile_bound(t: int, e: int, bm: int) -> int:
    """An upper bound of Σ_e ⌈count_e / bm⌉ over any E counts summing to T, known on the host:
    each expert adds at most bm-1 rows of padding, so Σ ⌈c/bm⌉ ≤ ⌊(T + (bm-1)·E) / bm⌋."""
    return (t + (bm - 1) * e) // bm


def expert_pow2(e: int) -> int:
    """The vector width a kernel uses to scan E experts' offsets (≥ 16: tiny aranges are awkward)."""
    return max(16, _next_pow2(e))


def expert_offsets(segments, device) -> torch.Tensor:
    """Offsets int32 [E+1] on `device` from contiguous host segments [(start, end)] (uploaded without
    blocking), or from an offsets tensor (cast on the device, never read on the host)."""
    if torch.is_tensor(segments):
        if segments.dim() != 1 or segments.shape[0] < 1:
            raise ValueError(f"offsets must be a 1-D tensor [E+1], got {tuple(segments.shape)}")
        return segments.to(device=device, dtype=torch.int32)
    segments = [(int(a), int(b)) for a, b in segments]
    if any(b < a for a, b in segments) or any(n[0] != p[1] for p, n in zip(segments, segments[1:])):
        raise ValueError("segments must be contiguous, non-decreasing (start, end) pairs")
    return upload([segments[0][0] if segments else 0] + [b for _, b in segments], device, torch.int32)


def _n_segments(segments) -> int:
    return segments.shape[0] - 1 if torch.is_tensor(segments) else len(segments)


def _row_tiles(segments, t: int, bm: int) -> int:
    """Programs along the row-tile axis: exact for host segments, the bound for device offsets."""
    if torch.is_tensor(segments):
        return tile_bound(t, segments.shape[0] - 1, bm)
    return sum(_cdiv(b - a, bm) for a, b in segments)


def expert_columns(offsets: torch.Tensor, block: int = BLOCK):
    """(col0, ncols) int32 [E] on the device: each expert's first column and its column count in the
    token-tiled layout of :func:`act_quant_t` (⌈count/128⌉·128 each, in expert order), no sync."""
    counts = offsets[1:] - offsets[:-1]
    ncols = (counts + block - 1) // block * block
    col0 = torch.cumsum(ncols, 0) - ncols
    return col0.to(torch.int32), ncols.to(torch.int32)


@triton.jit
def _find_tile(off_ptr, pid, E, BM: tl.constexpr, E_POW2: tl.constexpr):
    """Row tile `pid` of the experts' schedule → (e, r0, r1): expert e, its rows r0:r1 (≤ BM of them).
    e ≥ E when pid is past the last real tile (the caller exits)."""
    idx = tl.arange(0, E_POW2)
    live = idx < E
    lo = tl.load(off_ptr + idx, mask=live, other=0)
    hi = tl.load(off_ptr + idx + 1, mask=live, other=0)
    ntiles = (hi - lo + BM - 1) // BM
    ends = tl.cumsum(ntiles, axis=0)
    e = tl.sum((ends <= pid).to(tl.int32), axis=0)            # experts whose tiles all come before pid
    first = tl.sum(tl.where(idx < e, ntiles, 0), axis=0)      # expert e's first tile
    ec = tl.minimum(e, E - 1)                                 # in-bounds loads for the exiting programs
    r0 = tl.load(off_ptr + ec) + (pid - first) * BM
    r1 = tl.minimum(r0 + BM, tl.load(off_ptr + ec + 1))
    return e, r0, r1


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
    (128, 128, 4, 8), (128, 128, 3, 8), (64, 256, 3, 8),       # M ≥ 256 (128×256, 256×128 spill registers)
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
    # with 128-row tiles a 256-wide tile (8 warps) or a 128-wide one with 4 warps spills registers
    # (tests/triton_compile_sm90.py checks every config compiled for sm90)
    return [triton.Config({"BLOCK_N": bn}, num_stages=st, num_warps=w)
            for bn, st, w in [(128, 4, 8), (128, 3, 8), (64, 5, 4)]]


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
    bs_ptrs = _b_scale_ptrs(bs_ptr, offs_n, stride_bsn, B_SCALE_DIV, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - g * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _promote(acc, tl.dot(a, b), as_ptrs + g * stride_asg, bs_ptrs + g * stride_bsg,
                       ONE_B_SCALE=(B_SCALE_DIV >= BLOCK_N))
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _promote(acc, part, as_ptrs, bs_ptrs, ONE_B_SCALE: tl.constexpr):
    """acc + part · sa ⊗ sb: one 128-group's MMA result scaled into the FP32 accumulator.

    ONE_B_SCALE: the tile's columns share one weight block (BLOCK_N divides 128 and tiles start on
    multiples of BLOCK_N), so sb is one number, folded into the row scales: one FMA per element."""
    sa = tl.load(as_ptrs)
    sb = tl.load(bs_ptrs)
    # one return per function: Triton 3.9's code generator records both returns of a constexpr
    # `if … return` followed by a `return` and rejects their differing types
    if ONE_B_SCALE:
        out = acc + part * (sa * sb)[:, None]
    else:
        out = acc + part * sa[:, None] * sb[None, :]
    return out


@triton.jit
def _b_scale_ptrs(bs_ptr, offs_n, stride_bsn, B_SCALE_DIV: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's weight-scale pointers along N for group 0: one pointer when its columns share a
    128-row weight block (see _promote), else one per column."""
    if B_SCALE_DIV >= BLOCK_N:     # one return (see _promote)
        ptrs = bs_ptr + (tl.min(offs_n, axis=0) // B_SCALE_DIV) * stride_bsn
    else:
        ptrs = bs_ptr + (offs_n // B_SCALE_DIV) * stride_bsn
    return ptrs


@triton.jit
def _tile_order(pid, M, N, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(row tile, column tile) of program pid in grouped launch order: GROUP_M row tiles share each
    column tile while it is hot in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K_BUCKET", "B_SCALE_DIV"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
                     stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                     stride_asm, stride_asg, stride_bsn, stride_bsg, M_BUCKET, K_BUCKET,
                     B_SCALE_DIV: tl.constexpr, EVEN_K: tl.constexpr, GROUP_M: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grouped launch order: GROUP_M row-tiles share each column tile while it is hot in L2.
    pid_m, pid_n = _tile_order(tl.program_id(0), M, N, GROUP_M, BLOCK_M, BLOCK_N)
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
                             off_ptr, E, N, K,
                             stride_am, stride_ak, stride_be, stride_bn, stride_bk,
                             stride_cm, stride_cn, stride_asm, stride_asg,
                             stride_bse, stride_bsn, stride_bsg,
                             B_SCALE_DIV: tl.constexpr, EVEN_K: tl.constexpr, E_POW2: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    # Program (t, n): row tile t of the experts' schedule (found from the device offsets) — rows
    # r0:r1 of one expert e's contiguous segment — times column tile n of that expert's weight.
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, r0, r1 = _find_tile(off_ptr, pid_t, E, BLOCK_M, E_POW2)
    if e >= E:
        return
    e = e.to(tl.int64)
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


# --------------------------------------------------------------------------------------------
# TMA variants (Hopper): operand tiles arrive by tensor-memory-accelerator copies from host-built
# descriptors instead of per-thread pointer loads (no address arithmetic in the loop, zero fill
# past the edges, so no K masks), and the dense kernel stores C the same way. Used where every
# operand meets TMA's rules (16-byte aligned base and row strides, unit inner stride); the
# pointer kernels above serve the rest and the CPU interpreter's tests cover both.
# --------------------------------------------------------------------------------------------

def _tma_configs(tiles, grouped=False):
    """Configs from (BLOCK_M, BLOCK_N, stages, warps); the grouped kernel's BLOCK_M is the caller's."""
    if INTERPRET:
        tiles = [(32, 32, 1, 4)]

    def meta(bm, bn):
        return {"BLOCK_N": bn} if grouped else {"BLOCK_M": bm, "BLOCK_N": bn}
    return [triton.Config(meta(bm, bn), num_stages=st, num_warps=w, pre_hook=_tma_blocks)
            for bm, bn, st, w in tiles]


def _tma_blocks(nargs):
    """Autotuner pre-hook: each config's tile shapes onto the descriptors."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bk, bn] if nargs["B_KN"] else [bn, bk]
    if "c_desc" in nargs:
        nargs["c_desc"].block_shape = [bm, bn]


# 128×128 tiles with 8 warps keep the MMA result and the FP32 accumulator of one 128-group in
# registers (64 + 64 per thread); 128×256 would spill. The promotion waits for each group's MMA, so
# the tensor cores idle during it unless another CTA's MMA fills the gap: 64×128 tiles with 4 warps
# (fewer registers and 24 KiB a stage) let two CTAs share an SM. 64-row tiles also give decode-sized
# M more CTAs.
_TMA_TILES = [
    (128, 128, 4, 8), (64, 128, 4, 4), (64, 256, 3, 8),        # M ≥ 256
    (64, 128, 4, 4), (64, 64, 6, 4), (128, 64, 5, 4),          # 64 ≤ M < 256
    (64, 64, 4, 4), (64, 128, 4, 4), (64, 32, 6, 4),           # M < 64
]


@triton.jit
def _scaled_tile_tma(a_desc, b_desc, as_ptr, bs_ptr, row0, brow0, bk0, offs_m, offs_n, K,
                     stride_asm, stride_asg, stride_bsn, stride_bsg,
                     B_SCALE_DIV: tl.constexpr, B_KN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_scaled_tile with TMA operand loads: A rows row0…, B rows brow0… (or, B_KN, B stored [K, N]:
    rows bk0… and columns brow0…). offs_m / offs_n (clamped) only address the scales."""
    as_ptrs = as_ptr + offs_m * stride_asm
    bs_ptrs = _b_scale_ptrs(bs_ptr, offs_n, stride_bsn, B_SCALE_DIV, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([row0, g * BLOCK_K])
        if B_KN:
            b = b_desc.load([bk0 + g * BLOCK_K, brow0])
        else:
            b = b_desc.load([brow0, g * BLOCK_K]).T
        acc = _promote(acc, tl.dot(a, b), as_ptrs + g * stride_asg, bs_ptrs + g * stride_bsg,
                       ONE_B_SCALE=(B_SCALE_DIV >= BLOCK_N))
    return acc


def _prune_tma(configs, named_args, **kwargs):
    m = named_args["M_BUCKET"]
    first = 0 if m >= 256 else 3 if m >= 64 else 6
    return configs[first:first + 3] if len(configs) >= first + 3 else configs[:1]


@triton.autotune(configs=_tma_configs(_TMA_TILES), key=["M_BUCKET", "N", "K_BUCKET", "B_SCALE_DIV", "B_KN"],
                 prune_configs_by={"early_config_prune": _prune_tma})
@triton.jit
def _fp8_gemm_tma_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K,
                         stride_asm, stride_asg, stride_bsn, stride_bsg, M_BUCKET, K_BUCKET,
                         B_SCALE_DIV: tl.constexpr, B_KN: tl.constexpr, OUT: tl.constexpr,
                         GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    pid_m, pid_n = _tile_order(tl.program_id(0), M, N, GROUP_M, BLOCK_M, BLOCK_N)
    row0, col0 = pid_m * BLOCK_M, pid_n * BLOCK_N
    rows = tl.minimum(row0 + tl.arange(0, BLOCK_M), M - 1)
    cols = tl.minimum(col0 + tl.arange(0, BLOCK_N), N - 1)
    acc = _scaled_tile_tma(a_desc, b_desc, as_ptr, bs_ptr, row0, col0, 0, rows, cols, K,
                           stride_asm, stride_asg, stride_bsn, stride_bsg,
                           B_SCALE_DIV, B_KN, BLOCK_M, BLOCK_N, BLOCK_K)
    c_desc.store([row0, col0], acc.to(OUT))


@triton.autotune(configs=_tma_configs([(None, 128, 4, 8), (None, 128, 5, 8), (None, 64, 5, 4)], grouped=True),
                 key=["N", "K", "B_SCALE_DIV", "B_KN", "BLOCK_M"])
@triton.jit
def _fp8_grouped_gemm_tma_kernel(a_desc, b_desc, c_ptr, as_ptr, bs_ptr,
                                 off_ptr, E, N, K,
                                 stride_cm, stride_cn, stride_asm, stride_asg,
                                 stride_bse, stride_bsn, stride_bsg,
                                 B_SCALE_DIV: tl.constexpr, B_KN: tl.constexpr, E_POW2: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # b_desc covers the experts' weights as one [E·N, K] matrix: expert e's rows start at e·N (B_KN:
    # the storage of a transposed view, one [E·K, N] matrix, expert e's rows from e·K).
    # A rows past r1 (the next expert's, or zero fill past T) are computed and not stored.
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, r0, r1 = _find_tile(off_ptr, pid_t, E, BLOCK_M, E_POW2)
    if e >= E:
        return
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if B_KN:
        brow0, bk0 = pid_n * BLOCK_N, e * K
    else:
        brow0, bk0 = e * N + pid_n * BLOCK_N, 0
    acc = _scaled_tile_tma(a_desc, b_desc, as_ptr, bs_ptr + e.to(tl.int64) * stride_bse, r0,
                           brow0, bk0, tl.minimum(rows, r1 - 1), tl.minimum(cols, N - 1), K,
                           stride_asm, stride_asg, stride_bsn, stride_bsg,
                           B_SCALE_DIV, B_KN, BLOCK_M, BLOCK_N, BLOCK_K)
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < r1) & (cols[None, :] < N))


def tma_supported(device: torch.device) -> bool:
    """TMA descriptors work here: Hopper or newer, or the interpreter (tests)."""
    if INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _tma_rows(t: torch.Tensor) -> bool:
    """t (2-D) can back a TMA descriptor as stored: unit inner stride, 16-byte aligned base and rows."""
    es = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * es) % 16 == 0 and t.shape[1] * es >= 16)


def _descriptor(t: torch.Tensor):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t, [16, 64])       # a placeholder: each config sets its own (_tma_blocks)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16, b_row_scales=False, tma: bool | None = None):
    """a [M, K] e4m3 (1×128 scales) @ b [N, K]ᵀ e4m3 (128×128, or 1×128 if b_row_scales).

    b may be a transposed view (Dgrad's Wᵀ). ``tma``: None takes the TMA kernel wherever the
    operands allow it (:func:`gemm_uses_tma`), True demands it (ValueError where they do not),
    False takes the pointer kernel."""
    m, k = a_q.shape
    n = b_q.shape[0]
    a_s, b_s = a_s.float(), b_s.float()
    c = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return c
    use_tma = out_dtype in _TL_DTYPES and gemm_uses_tma(a_q, b_q, c)
    if tma and not use_tma:
        raise ValueError("fp8_gemm(tma=True): the operands do not meet TMA's alignment rules here")
    keys = dict(B_SCALE_DIV=1 if b_row_scales else BLOCK, GROUP_M=8, BLOCK_K=BLOCK)

    def grid(meta):
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

    if use_tma and tma is not False:
        b_kn = b_q.stride(1) != 1                      # a transposed view: describe its [K, N] storage
        _fp8_gemm_tma_kernel[grid](
            _descriptor(a_q), _descriptor(b_q.t() if b_kn else b_q), _descriptor(c), a_s, b_s, m, n, k,
            a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), _next_pow2(m), _next_pow2(k),
            B_KN=b_kn, OUT=_TL_DTYPES[out_dtype], **keys)
        return c
    _fp8_gemm_kernel[grid](
        a_q, b_q, c, a_s, b_s, m, n, k,
        a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), c.stride(0), c.stride(1),
        a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), _next_pow2(m), _next_pow2(k),
        EVEN_K=(k % BLOCK == 0), **keys)
    return c


def gemm_uses_tma(a_q, b_q, c) -> bool:
    """The dense GEMM takes its TMA kernel: the device has TMA and A, C and B (as stored, [N, K] or
    a transposed view of [K, N]) meet its alignment rules."""
    return (tma_supported(a_q.device) and _tma_rows(a_q) and _tma_rows(c)
            and (_tma_rows(b_q) or _tma_rows(b_q.t())))


def grouped_block_m(segments, t: int | None = None) -> int:
    """Row-tile height for the grouped GEMM: 64 on the GPU (32 under the interpreter), 128 when
    the experts' segments are long enough to fill it. With device offsets (a tensor) the counts are
    not read: the average over all E experts, T / E, decides."""
    if INTERPRET:
        return 32
    if torch.is_tensor(segments):
        avg = (t or 0) / max(1, segments.shape[0] - 1)
    else:
        counts = [e - s for s, e in segments if e > s]
        avg = sum(counts) / max(1, len(counts))
    return 128 if avg >= 512 else 64


def fp8_grouped_gemm(a_q, a_s, b_q, b_s, segments, out_dtype=torch.bfloat16,
                     b_row_scales=False, block_m: int | None = None, tma: bool | None = None):
    """Per-expert a[r0:r1] @ b[e]ᵀ over contiguous segments [(r0, r1)] (one per expert).

    ``segments``: host pairs [(start, end)], or the experts' offsets as an int tensor [E+1] on the
    device (cumulative counts from 0; rows past offsets[E] are not written). Either way one launch
    whose programs find their expert and rows from the offsets on the device (:func:`_find_tile`):
    host segments are uploaded and launch exactly Σ ⌈count/BLOCK_M⌉ row tiles; device offsets are
    never read on the host and launch :func:`tile_bound` row tiles, the surplus exiting at once.

    ``tma`` as in :func:`fp8_gemm`. TMA describes the experts as one matrix: b contiguous ([E·N, K]),
    or b a transposed view of contiguous [E, K, N] storage with K a multiple of 128 (Dgrad's Wᵀ; a
    K tile then never reaches into the next expert's rows)."""
    t, k = a_q.shape
    e_count, n, _ = b_q.shape
    a_s, b_s = a_s.float(), b_s.float()
    c = torch.empty(t, n, dtype=out_dtype, device=a_q.device)
    bm = block_m or grouped_block_m(segments, t)
    if _n_segments(segments) != e_count:
        raise ValueError(f"{_n_segments(segments)} segments for {e_count} experts")
    n_tiles = _row_tiles(segments, t, bm)
    if not n_tiles or n == 0 or t == 0:
        return c
    offs = expert_offsets(segments, a_q.device)
    sched = dict(E_POW2=expert_pow2(e_count), BLOCK_M=bm, BLOCK_K=BLOCK,
                 B_SCALE_DIV=1 if b_row_scales else BLOCK)

    def grid(meta):
        return (n_tiles, _cdiv(n, meta["BLOCK_N"]))

    b_kn = not b_q.is_contiguous()
    b_mat = (b_q.transpose(1, 2).reshape(e_count * k, n) if b_kn and b_q.transpose(1, 2).is_contiguous()
             and k % BLOCK == 0 else b_q.view(e_count * n, k) if not b_kn else None)
    use_tma = tma_supported(a_q.device) and _tma_rows(a_q) and b_mat is not None and _tma_rows(b_mat)
    if tma and not use_tma:
        raise ValueError("fp8_grouped_gemm(tma=True): the operands do not meet TMA's alignment rules here")
    if use_tma and tma is not False:
        _fp8_grouped_gemm_tma_kernel[grid](
            _descriptor(a_q), _descriptor(b_mat), c, a_s, b_s,
            offs, e_count, n, k, c.stride(0), c.stride(1), a_s.stride(0), a_s.stride(1),
            b_s.stride(0), b_s.stride(1), b_s.stride(2), B_KN=b_kn, **sched)
        return c
    _fp8_grouped_gemm_kernel[grid](
        a_q, b_q, c, a_s, b_s, offs, e_count, n, k,
        a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), b_q.stride(2),
        c.stride(0), c.stride(1), a_s.stride(0), a_s.stride(1),
        b_s.stride(0), b_s.stride(1), b_s.stride(2), EVEN_K=(k % BLOCK == 0), **sched)
    return c


# --------------------------------------------------------------------------------------------
# Fused quantisation (act_quant): one pass over x, writes q and the 1×128 scales.
# --------------------------------------------------------------------------------------------

@triton.jit
def _scale(amax, n_nan, POW2: tl.constexpr):
    """The torch quantiser's scale rule: max(amax, floor) / 448 correctly rounded, optionally rounded
    up to a power of two; NaN where the tile held a NaN."""
    s = tl.math.div_rn(tl.maximum(amax, _AMAX_FLOOR), _FP8_MAX)
    if POW2:  # round up to a power of two, bit-exactly (inf stays inf)
        bits = s.to(tl.int32, bitcast=True)
        s = ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(n_nan > 0, float("nan"), s)


@triton.jit
def _scaled_clamped(x, s):
    """x / s clamped to ±448 (s broadcast to x)."""
    y = tl.math.div_rn(x, s)
    return tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)


@triton.jit
def _quant_tile(x, POW2: tl.constexpr):
    """x [BM, 128] fp32 → (x / s clamped to ±448, s [BM]) with the torch quantiser's rules."""
    s = _scale(tl.max(tl.abs(x), axis=1), tl.sum((x != x).to(tl.int32), axis=1), POW2)
    return _scaled_clamped(x, s[:, None]), s


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sg,
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
    tl.store(s_ptr + rows * stride_sm + pid_k * stride_sg, s, mask=rows < M)


@triton.jit
def _swiglu_quant_kernel(g_ptr, u_ptr, q_ptr, s_ptr, M, K, stride_gm, stride_um, stride_qm,
                         stride_sm, stride_sg, POW2: tl.constexpr, BLOCK_M: tl.constexpr,
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
    tl.store(s_ptr + rows * stride_sm + pid_k * stride_sg, s, mask=rows < M)


def _rows(x):
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _scales_m_major(m: int, groups: int, device) -> torch.Tensor:
    """An [m, groups] FP32 scale tensor stored group-major (stride (1, m)): a GEMM tile reads each
    group's BLOCK_M row scales as one contiguous run instead of BLOCK_M strided words."""
    return torch.empty(groups, m, dtype=torch.float32, device=device).t()


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
    s = _scales_m_major(m, kg, x.device)
    if m:
        _act_quant_kernel[(_cdiv(m, block_m), kg)](
            x2, q, s, m, k, x2.stride(0), q.stride(0), s.stride(0), s.stride(1),
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
    s = _scales_m_major(m, kg, gate.device)
    if m:
        _swiglu_quant_kernel[(_cdiv(m, block_m), kg)](
            g2, u2, q, s, m, k, g2.stride(0), u2.stride(0), q.stride(0), s.stride(0), s.stride(1),
            POW2=pow2_scale, BLOCK_M=block_m, BLOCK_K=BLOCK, num_warps=4)
    return q.reshape(*gate.shape[:-1], k), s.reshape(*gate.shape[:-1], kg)


# --------------------------------------------------------------------------------------------
# Weights: one 128×128 block per program (weight_quant), for [N, K] or stacked experts [E, N, K].
# --------------------------------------------------------------------------------------------

@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_we, stride_wn, stride_qe, stride_qn,
                         stride_se, stride_sn, POW2: tl.constexpr, BLOCK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    x = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wn + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    n_nan = tl.sum(tl.sum((x != x).to(tl.int32), axis=1), axis=0)
    s = _scale(amax, n_nan, POW2)
    y = _scaled_clamped(x, s)
    tl.store(q_ptr + e * stride_qe + rows[:, None] * stride_qn + cols[None, :],
             y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + e * stride_se + pid_n * stride_sn + pid_k, s)


def weight_quant(w: torch.Tensor, pow2_scale: bool = False, q_dtype: torch.dtype = torch.float8_e4m3fn):
    """Triton twin of :func:`dsv3.fp8.quantize_weight`: w [N, K] or [E, N, K] → (q, s [.., ⌈N/128⌉,
    ⌈K/128⌉]) in one launch."""
    if w.dim() not in (2, 3):
        raise ValueError(f"weight_quant needs [N, K] or [E, N, K], got {tuple(w.shape)}")
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    if w3.stride(-1) != 1:
        w3 = w3.contiguous()
    e, n, k = w3.shape
    nb, kb = _cdiv(n, BLOCK), _cdiv(k, BLOCK)
    q = torch.empty(e, n, k, dtype=q_dtype, device=w.device)
    s = torch.empty(e, nb, kb, dtype=torch.float32, device=w.device)
    if e and n and k:
        _weight_quant_kernel[(nb, kb, e)](
            w3, q, s, n, k, w3.stride(0), w3.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
            POW2=pow2_scale, BLOCK=BLOCK, num_warps=8)
    return (q, s) if w.dim() == 3 else (q[0], s[0])


# --------------------------------------------------------------------------------------------
# Token-direction quantisation for Wgrad (act_quant_t): 128×1 tiles (one channel over 128
# tokens), written transposed. With expert segments every segment starts a new tile at a
# 128-aligned column, its last tile zero-padded, so a K-grouped GEMM walks whole tiles.
# --------------------------------------------------------------------------------------------

def token_tiles(segments, t: int):
    """Tile schedule for :func:`act_quant_t`: per 128-token tile (first row, end row, first output
    column), the output width, and per segment its first column and its padded column count.

    segments None: one segment, no padding (output width = t)."""
    if segments is None:
        segments, pad = [(0, t)], False
    else:
        pad = True
    tiles, col0, ncols, col = [], [], [], 0
    for s0, s1 in segments:
        col0.append(col)
        for r0 in range(s0, s1, BLOCK):
            tiles.append((r0, min(r0 + BLOCK, s1), col))
            col += BLOCK
        ncols.append(col - col0[-1])
    width = col if pad else t
    return tiles, width, col0, ncols


@triton.jit
def _act_quant_t_kernel(x_ptr, xs_ptr, q_ptr, s_ptr, off_ptr, E, T, K, width,
                        stride_xm, stride_xsm, stride_xsg, stride_qk, stride_sk,
                        DEQUANT: tl.constexpr, POW2: tl.constexpr, SEGMENTED: tl.constexpr,
                        E_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program (t, c): token tile t — 128 rows of one expert (SEGMENTED: found from the device
    # offsets, tiles laid out in expert order so tile t starts column t·128), or rows t·128… of the
    # whole input — times channel block c.
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    if SEGMENTED:
        e, r0, r1 = _find_tile(off_ptr, pid_t, E, BLOCK_T, E_POW2)
        if e >= E:
            return
    else:
        r0 = pid_t * BLOCK_T
        r1 = tl.minimum(r0 + BLOCK_T, T)
    c0 = pid_t * BLOCK_T
    rows = r0 + tl.arange(0, BLOCK_T)
    chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < r1) & (chans[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + chans[None, :], mask=mask,
                other=0.0).to(tl.float32)                                          # [BT, BC]
    if DEQUANT:   # an FP8 input with 1×128 scales along K: dequantise on load
        sx = tl.load(xs_ptr + rows[:, None].to(tl.int64) * stride_xsm + (chans[None, :] // _GROUP) * stride_xsg,
                     mask=mask, other=0.0)
        x = x * sx
    s = _scale(tl.max(tl.abs(x), axis=0), tl.sum((x != x).to(tl.int32), axis=0), POW2)   # [BC]
    y = _scaled_clamped(x, s[None, :])
    cols = c0 + tl.arange(0, BLOCK_T)
    tl.store(q_ptr + chans[None, :].to(tl.int64) * stride_qk + cols[:, None],
             y.to(q_ptr.dtype.element_ty), mask=(chans[None, :] < K) & (cols[:, None] < width))
    tl.store(s_ptr + chans.to(tl.int64) * stride_sk + c0 // _GROUP, s, mask=chans < K)


def act_quant_t(x: torch.Tensor, x_scale: torch.Tensor | None = None, segments=None,
                pow2_scale: bool = False, q_dtype: torch.dtype = torch.float8_e4m3fn):
    """Triton twin of :func:`dsv3.fp8.quantize_activation_t` for x [T, K] → (q [K, W], s [K, W/128]),
    from a float x or an E4M3 x with its 1×128 scales ``x_scale`` [T, ⌈K/128⌉] (dequantised on load:
    the FP8 activation cache's round trip in one pass).

    ``segments`` (experts' tokens): host pairs [(start, end)] of rows, or the experts' offsets as an
    int tensor [E+1] on the device. Each expert starts a new tile at a 128-aligned column (its
    columns from :func:`expert_columns`), padding columns zero. Host segments give W = Σ ⌈len/128⌉·128;
    device offsets are never read on the host, so W is the bound :func:`tile_bound` (T, E, 128)·128 and
    the columns past the experts' last tile stay zero (their scales unset: no expert reads them).
    Without segments W = T."""
    if x.dim() != 2:
        raise ValueError(f"act_quant_t needs [T, K], got {tuple(x.shape)}")
    t, k = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    dequant = x_scale is not None
    if dequant:
        x_scale = x_scale.float()
        if tuple(x_scale.shape) != (t, _cdiv(k, BLOCK)):
            raise ValueError(f"x_scale must be [{t}, {_cdiv(k, BLOCK)}], got {tuple(x_scale.shape)}")
    segmented = segments is not None
    n_tiles = _row_tiles(segments, t, BLOCK) if segmented else _cdiv(t, BLOCK)
    width = n_tiles * BLOCK if segmented else t
    q = (torch.zeros if segmented else torch.empty)(k, width, dtype=q_dtype, device=x.device)
    s = torch.empty(k, _cdiv(width, BLOCK), dtype=torch.float32, device=x.device)
    if n_tiles and k and t:
        e_count = _n_segments(segments) if segmented else 1
        offs = expert_offsets(segments, x.device) if segmented else s
        block_c = 32 if INTERPRET else 64
        xs = x_scale if dequant else s
        _act_quant_t_kernel[(n_tiles, _cdiv(k, block_c))](
            x, xs, q, s, offs, e_count, t, k, width, x.stride(0), xs.stride(0), xs.stride(1),
            q.stride(0), s.stride(0), DEQUANT=dequant, POW2=pow2_scale, SEGMENTED=segmented,
            E_POW2=expert_pow2(e_count), BLOCK_T=BLOCK, BLOCK_C=block_c, num_warps=4)
    return q, s


# --------------------------------------------------------------------------------------------
# K-grouped GEMM (expert Wgrad): dW_e = dy_eᵀ x_e for every expert in one launch, K being the
# expert's own tokens — 128-aligned column ranges of the act_quant_t outputs.
# --------------------------------------------------------------------------------------------

def _kgrouped_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=st, num_warps=w)
            for bm, bn, st, w in [(128, 128, 4, 8), (64, 128, 4, 4), (128, 64, 4, 4)]]


@triton.autotune(configs=_kgrouped_configs(), key=["M", "N"])
@triton.jit
def _fp8_kgrouped_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, col0_ptr, ncols_ptr, M, N,
                              stride_am, stride_ak, stride_bn, stride_bk, stride_ce, stride_cm,
                              stride_cn, stride_asm, stride_asg, stride_bsn, stride_bsg,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    # every expert's columns start and end on a 128-column tile: saying so lets the compiler keep the
    # operand loads vectorised and pipelined (without it they were scalar loads, spilling registers)
    c0 = tl.multiple_of(tl.load(col0_ptr + e).to(tl.int64), BLOCK_K)
    nk = tl.multiple_of(tl.load(ncols_ptr + e), BLOCK_K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    g0 = c0 // BLOCK_K
    acc = _scaled_tile(a_ptr + c0 * stride_ak, b_ptr + c0 * stride_bk, as_ptr + g0 * stride_asg,
                       bs_ptr + g0 * stride_bsg, tl.minimum(rows, M - 1), tl.minimum(cols, N - 1), nk,
                       stride_am, stride_ak, stride_bn, stride_bk,
                       stride_asm, stride_asg, stride_bsn, stride_bsg,
                       1, True, BLOCK_M, BLOCK_N, BLOCK_K)
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def kgrouped_gemm(a_q, a_s, b_q, b_s, col0, ncols) -> torch.Tensor:
    """Per group e: a[:, c0:c0+n] @ b[:, c0:c0+n]ᵀ → [E, M, N] FP32, for a [M, W], b [N, W] E4M3 with
    1×128 scales along W ([M, W/128], [N, W/128]) and 128-aligned column ranges (col0[e], ncols[e]):
    host lists (checked, uploaded) or int tensors on the device (never read on the host: one program
    per (output tile, expert) reads its expert's range there; see :func:`expert_columns`)."""
    m, n = a_q.shape[0], b_q.shape[0]
    e_count = col0.shape[0] if torch.is_tensor(col0) else len(col0)
    out = torch.empty(e_count, m, n, dtype=torch.float32, device=a_q.device)
    if not e_count or m == 0 or n == 0:
        return out.zero_()
    if torch.is_tensor(col0):
        c0_t, nc_t = (v.to(device=a_q.device, dtype=torch.int32) for v in (col0, ncols))
    else:
        if any(c % BLOCK for c in list(col0) + list(ncols)):
            raise ValueError("kgrouped_gemm: column ranges must start and end on 128-column tiles")
        c0_t, nc_t = _upload(list(zip(col0, ncols)), a_q.device)

    def grid(cfg):
        return (_cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"]), e_count)

    _fp8_kgrouped_gemm_kernel[grid](
        a_q, b_q, out, a_s.float(), b_s.float(), c0_t, nc_t, m, n,
        a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1),
        out.stride(0), out.stride(1), out.stride(2), a_s.stride(0), a_s.stride(1),
        b_s.stride(0), b_s.stride(1), BLOCK_K=BLOCK)
    return out


def grouped_wgrad(dy: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, segments) -> torch.Tensor:
    """Expert weight gradients dW [E, N, K] (FP32) = dy[s0:s1]ᵀ · x[s0:s1] per expert segment, from
    dy [T, N] (float) and the FP8 activation cache x_q [T, K] with 1×128 scales x_s: both operands
    quantised 128×1 along the tokens per segment (two launches), then one K-grouped GEMM launch.
    Per expert it equals the dense Wgrad of that expert's rows.

    ``segments``: host pairs [(start, end)], or the experts' offsets as an int tensor [E+1] on the
    device — then nothing is read on the host: the operands' width is the bound of
    :func:`act_quant_t` and each expert's columns come from :func:`expert_columns` (torch ops on the
    device)."""
    dyt_q, dyt_s = act_quant_t(dy, segments=segments)            # [N, W], [N, W/128]
    xt_q, xt_s = act_quant_t(x_q, x_s, segments=segments)        # [K, W], [K, W/128]
    if torch.is_tensor(segments):
        col0, ncols = expert_columns(expert_offsets(segments, dy.device))
    else:
        _, _, col0, ncols = token_tiles(segments, dy.shape[0])
    return kgrouped_gemm(dyt_q, dyt_s, xt_q, xt_s, col0, ncols)
