"""MLA attention in the absorbed form against a paged latent cache (issue #11, item 5).

Cache layout (per layer): a block pool ``kv_pool`` [num_blocks, block_size, r] holding the
normalised KV latent (r = kv_lora_rank, 512 for V3) and ``pe_pool`` [num_blocks, block_size, rope]
holding the rotated RoPE key (rope = 64). ``block_table`` [B, max_blocks] (int32) maps row b's
logical block j — positions j·block_size … (j+1)·block_size−1 — to its physical block
``block_table[b, j]``. ``start_pos`` [B]: query t of row b sits at position start_pos[b]+t and sees
the cached positions 0 … start_pos[b]+t; the cache holds positions 0 … start_pos[b]+T−1 of every row
(written before the call). Nothing else of the pool is ever read: neither blocks past a row's last
position, nor positions of its last block past start_pos[b]+T−1.

    score[b,t,h,s] = scale · (q_lat[b,t,h]·c_kv[b,s] + q_pe[b,t,h]·k_pe[b,s])   for s ≤ start_pos[b]+t
    o_lat[b,t,h]   = softmax_s(score[b,t,h]) · c_kv[b]                           (softmax in fp32)

Backends:

* ``"torch"``: :func:`gather_latent` (one gather of the rows' positions into contiguous
  [B, S, r] / [B, S, rope]) and the same torch math as ``MLA._absorbed_attention`` on a contiguous
  cache — the reference, and the CPU path.
* ``"triton"``: a paged kernel (FlashMLA-style decode). The T·H query rows of a batch row are
  folded into one "row" axis (m = t·H + h; for T = 1 the rows are the heads), and one program
  handles BLOCK_M of them: it walks the batch row's blocks up to its causal limit, loads each
  latent tile [BLOCK_N, r] and RoPE tile [BLOCK_N, rope] once for all of its heads (and, for
  T > 1, its query positions — MLA's latent is shared by every head), and runs an online softmax
  (running max and sum in fp32, o accumulated in fp32 [BLOCK_M, r]). Long contexts with few
  programs are split along the sequence (flash-decoding): each split writes an fp32 partial o and
  its log-sum-exp, and a second small kernel combines them. CUDA tensors, or any tensors under
  ``TRITON_INTERPRET=1`` (the tests).
* ``"auto"``: triton for CUDA tensors when triton imports (and the dtypes and block size suit
  it), torch otherwise.

Triton is imported only when the triton backend is first used, and these kernels are decorated
then, so ``TRITON_INTERPRET=1`` may be set after ``import dsv3`` — but it must be set before
triton's own first import (its library functions are decorated at that import); the kernel says so
if it was not.

Checked on an H200 (``benchmarks/gpu_suite.py``: 5.6e-7 from the fp64 formula, NaN-poisoned pools
untouched) but not tuned there: the launch heuristics (rows per program, sequence splits, tile size
within shared memory, warps) are educated guesses, and ``benchmark()`` is there to tune them.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch
from torch import Tensor

from ..fp8.gemm import triton_available  # noqa: F401 — one check that triton imports
from ..model.mla import latent_attention

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

tl = None  # triton.language; bound by _kernels() before the kernels below are decorated


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# --------------------------------------------------------------------------------------------
# Reference path: gather + torch
# --------------------------------------------------------------------------------------------

def gather_latent(kv_pool: Tensor, pe_pool: Tensor, block_table: Tensor, length: int, *,
                  row_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The first ``length`` positions of every row of the paged cache as contiguous
    [B, length, r] and [B, length, rope] (one index gather; nothing past ``length`` is read).

    With ``row_lengths`` [B], row b's positions at or past row_lengths[b] (≥ 1) repeat its last
    cached position instead, so nothing past a row's end is read (its blocks there may hold
    anything, NaN included)."""
    nb, bs = kv_pool.shape[:2]
    B, width = block_table.shape
    if length < 0 or _cdiv(length, bs) > width:
        raise ValueError(f"gather_latent: {length} positions need {_cdiv(length, bs)} blocks of "
                         f"{bs}, the block table has {width} per row")
    dev = kv_pool.device
    pos = torch.arange(length, device=dev).expand(B, length)
    if row_lengths is not None:
        pos = torch.minimum(pos, row_lengths.to(dev)[:, None] - 1)
    flat = block_table.to(device=dev, dtype=torch.long).gather(1, pos // bs) * bs + pos % bs  # [B, length]
    flat = flat.reshape(-1)
    kv = kv_pool.flatten(0, 1).index_select(0, flat).view(B, length, kv_pool.shape[-1])
    pe = pe_pool.flatten(0, 1).index_select(0, flat).view(B, length, pe_pool.shape[-1])
    return kv, pe


def _attention_torch(q_lat, q_pe, kv_pool, pe_pool, block_table, start_pos, scale):
    """Gather, then the math of ``MLA._absorbed_attention`` (:func:`dsv3.model.mla.latent_attention`:
    scores in the input dtype, softmax in ≥ fp32, probabilities cast back), so a paged cache gives
    the same numbers as the contiguous one."""
    B, T = q_lat.shape[:2]
    S = int(start_pos.max()) + T
    c_kv, k_pe = gather_latent(kv_pool, pe_pool, block_table, S, row_lengths=start_pos + T)
    c_kv, k_pe = c_kv.to(q_lat.dtype), k_pe.to(q_pe.dtype)
    qpos = start_pos.to(c_kv.device)[:, None] + torch.arange(T, device=c_kv.device)       # [B, T]
    visible = torch.arange(S, device=c_kv.device) <= qpos[..., None]                      # [B, T, S]
    return latent_attention(q_lat, q_pe, c_kv, k_pe, scale, visible[:, :, None]).to(q_lat.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels (source here; decorated lazily by _kernels())
# --------------------------------------------------------------------------------------------

def _paged_mla_fwd(q_ptr, qpe_ptr, kv_ptr, pe_ptr, bt_ptr, start_ptr, o_ptr, lse_ptr,
                   H, T, M, R, ROPE, qk_scale, tiles_per_split,
                   s_qb, s_qt, s_qh, s_qr, s_pb, s_pt, s_ph, s_pr,
                   s_kvn, s_kvp, s_kvr, s_pen, s_pep, s_per, s_btb, s_btj,
                   s_ob, s_os, s_om, s_lb, s_ls,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_ROPE: tl.constexpr, SPLIT: tl.constexpr,
                   PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    # grid (B, cdiv(M, BLOCK_M), splits); M = T·H query rows of batch row b, row m = t·H + h.
    b = tl.program_id(0)
    pid_m = tl.program_id(1)
    sp = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    m_c = tl.minimum(offs_m, M - 1)          # padding rows repeat the last real row (never stored)
    t = m_c // H
    h = m_c % H
    offs_r = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_ROPE)
    r_ok = offs_r < R
    e_ok = offs_e < ROPE

    start = tl.load(start_ptr + b).to(tl.int32)   # positions < 2³¹; pointer offsets are int64
    qpos = start + t                          # [BLOCK_M]: the last position each row sees
    kv_len = start + T                        # positions 0 … kv_len−1 are in the cache
    t_hi = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // H
    n_tiles = tl.cdiv(start + t_hi + 1, BLOCK_N)   # tiles this program's rows need
    tile_lo = sp * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)

    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * s_qb + t[:, None] * s_qt + h[:, None] * s_qh + offs_r[None, :] * s_qr,
                mask=r_ok[None, :], other=0.0)
    qpe = tl.load(qpe_ptr + b64 * s_pb + t[:, None] * s_pt + h[:, None] * s_ph + offs_e[None, :] * s_pr,
                  mask=e_ok[None, :], other=0.0)
    in_ty = q.dtype
    if DOT_F32:      # the interpreter's bf16 tl.dot is wrong: same values, multiplied in fp32
        q = q.to(tl.float32)
        qpe = qpe.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    TILES_PER_PAGE: tl.constexpr = PAGE // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    for tile in range(tile_lo, tile_hi):
        page = tile // TILES_PER_PAGE
        phys = tl.load(bt_ptr + b64 * s_btb + page * s_btj).to(tl.int64)
        within = (tile % TILES_PER_PAGE) * BLOCK_N + offs_n
        pos = tile * BLOCK_N + offs_n
        cached = pos < kv_len                 # never read past the row's last cached position
        kv = tl.load(kv_ptr + phys * s_kvn + within[:, None] * s_kvp + offs_r[None, :] * s_kvr,
                     mask=cached[:, None] & r_ok[None, :], other=0.0).to(in_ty).to(q.dtype)
        pe = tl.load(pe_ptr + phys * s_pen + within[:, None] * s_pep + offs_e[None, :] * s_per,
                     mask=cached[:, None] & e_ok[None, :], other=0.0).to(in_ty).to(qpe.dtype)
        s = tl.dot(q, tl.trans(kv), input_precision=PRECISION)
        s = tl.dot(qpe, tl.trans(pe), acc=s, input_precision=PRECISION)
        s = tl.where(pos[None, :] <= qpos[:, None], s * qk_scale, float("-inf"))   # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with nothing visible yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(in_ty).to(kv.dtype), kv, acc=acc, input_precision=PRECISION)
        m_i = m_new

    o_ptrs = o_ptr + b64 * s_ob + sp * s_os + offs_m[:, None] * s_om + offs_r[None, :]
    o_mask = row_ok[:, None] & r_ok[None, :]
    if SPLIT:
        seen = l_i > 0.0
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(o_ptrs, o, mask=o_mask)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b64 * s_lb + sp * s_ls + offs_m, lse, mask=row_ok)
    else:
        o = acc / l_i[:, None]                # position 0 is visible to every row: l_i > 0
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=o_mask)


def _paged_mla_combine(part_ptr, lse_ptr, o_ptr, M, R, splits,
                       s_pb, s_ps, s_pm, s_lb, s_ls, s_ob, s_om,
                       BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    # grid (B, M): o = Σ_s 2^(lse_s − max) · o_s / Σ_s 2^(lse_s − max); split 0 always holds
    # position 0, so the max is finite.
    b = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    s_ok = offs_s < splits
    lse = tl.load(lse_ptr + b * s_lb + offs_s * s_ls + m, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    part = tl.load(part_ptr + b * s_pb + offs_s[:, None] * s_ps + m * s_pm + offs_r[None, :],
                   mask=s_ok[:, None] & (offs_r < R)[None, :], other=0.0)
    o = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(o_ptr + b * s_ob + m * s_om + offs_r, o.to(o_ptr.dtype.element_ty), mask=offs_r < R)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _kernels_for(interpret: bool):
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_paged_mla_fwd), triton.jit(_paged_mla_combine)


def _kernels():
    """(fwd, combine), decorated for the interpreter or the compiler as TRITON_INTERPRET says now."""
    return _kernels_for(_interpreting())


def _triton_imported_interpreted() -> bool:
    """Triton's own library functions (tl.cdiv, tl.sum, …) are decorated when triton is imported:
    the interpreter works only if TRITON_INTERPRET=1 was set before that import."""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.cdiv, InterpretedFunction)


def triton_usable(device: torch.device | str) -> bool:
    """The triton backend can run on tensors of ``device``: CUDA with triton, or the interpreter."""
    device = torch.device(device)
    if not triton_available():
        return False
    return device.type == "cuda" or _interpreting()


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_config(B, M, R, rope, page, width, elem_size, device, block_m, num_splits):
    """BLOCK_N, BLOCK_M, splits, warps, stages. Heuristics, not yet tuned on a GPU."""
    block_r, block_e = max(16, _next_pow2(R)), max(16, _next_pow2(rope))
    stages = 2
    block_n = min(page, 64)     # two stages of the latent + RoPE tiles within ~150 KB of shared memory
    while block_n > 16 and stages * block_n * (block_r + block_e) * elem_size > 150 * 1024:
        block_n //= 2
    interp = device.type != "cuda"
    if block_m is None:
        cap = 16 if interp else (64 if block_r <= 128 else 32)
        block_m = min(cap, max(16, _next_pow2(M)))
    programs = B * _cdiv(M, block_m)
    max_tiles = _cdiv(width * page, block_n)
    if num_splits is None:
        if interp:
            num_splits = 1
        else:                                 # fill the SMs twice over, ≥ 4 tiles per split
            want = _cdiv(2 * _num_sms(device.index or 0), programs)
            num_splits = max(1, min(want, max_tiles // 4, 64))
    num_splits = max(1, min(int(num_splits), max_tiles))
    warps = 4 if block_m * block_r <= 8192 else 8
    return block_n, block_m, num_splits, warps, stages


def _attention_triton(q_lat, q_pe, kv_pool, pe_pool, block_table, start_pos, scale, out,
                      block_m=None, num_splits=None):
    dev = q_lat.device
    if not triton_available():
        raise RuntimeError("paged_mla_attention: backend='triton' needs the triton package")
    if not triton_usable(dev):
        raise RuntimeError(f"paged_mla_attention: backend='triton' needs CUDA tensors (got {dev}) "
                           "or the Triton interpreter (TRITON_INTERPRET=1)")
    if dev.type != "cuda" and not _triton_imported_interpreted():
        raise RuntimeError("paged_mla_attention: TRITON_INTERPRET=1 was set after triton was "
                           "imported; set it before the first import of triton")
    for name, x in (("q_lat", q_lat), ("q_pe", q_pe), ("kv_pool", kv_pool), ("pe_pool", pe_pool)):
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"paged_mla_attention (triton): {name} is {x.dtype}, "
                            f"expected one of {TRITON_DTYPES}")
    if q_pe.dtype != q_lat.dtype:
        raise TypeError("paged_mla_attention (triton): q_lat and q_pe must share a dtype")
    B, T, H, R = q_lat.shape
    rope = q_pe.shape[-1]
    page = kv_pool.shape[1]
    if page < 16 or page & (page - 1):
        raise ValueError(f"paged_mla_attention (triton): block size {page} must be a power of two ≥ 16")
    M = T * H
    block_n, bm, splits, warps, stages = _launch_config(
        B, M, R, rope, page, block_table.shape[1], max(q_lat.element_size(), kv_pool.element_size()),
        dev, block_m, num_splits)
    block_r, block_e = max(16, _next_pow2(R)), max(16, _next_pow2(rope))
    fwd, combine = _kernels()
    if out is None:
        out = torch.empty(B, T, H, R, device=dev, dtype=q_lat.dtype)
    out_m = out.view(B, M, R)                 # contiguous: row m = t·H + h
    dot_f32 = dev.type != "cuda" and q_lat.dtype == torch.bfloat16
    precision = "ieee" if q_lat.dtype == torch.float32 or dot_f32 else "tf32"
    qk_scale = float(scale) * math.log2(math.e)
    start_pos = start_pos.to(device=dev, dtype=torch.long)
    if splits == 1:
        part, lse, s_o, s_l = out_m, out_m, (out_m.stride(0), 0, out_m.stride(1)), (0, 0)
    else:
        part = torch.empty(B, splits, M, R, device=dev, dtype=torch.float32)
        lse = torch.empty(B, splits, M, device=dev, dtype=torch.float32)
        s_o, s_l = (part.stride(0), part.stride(1), part.stride(2)), (lse.stride(0), lse.stride(1))
    max_tiles = _cdiv(block_table.shape[1] * page, block_n)
    fwd[(B, _cdiv(M, bm), splits)](
        q_lat, q_pe, kv_pool, pe_pool, block_table, start_pos, part, lse,
        H, T, M, R, rope, qk_scale, _cdiv(max_tiles, splits),
        *q_lat.stride(), *q_pe.stride(), *kv_pool.stride(), *pe_pool.stride(), *block_table.stride(),
        *s_o, *s_l,
        PAGE=page, BLOCK_N=block_n, BLOCK_M=bm, BLOCK_R=block_r, BLOCK_ROPE=block_e,
        SPLIT=splits > 1, PRECISION=precision, DOT_F32=dot_f32, num_warps=warps, num_stages=stages)
    if splits > 1:
        combine[(B, M)](part, lse, out_m, M, R, splits,
                        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
                        out_m.stride(0), out_m.stride(1),
                        BLOCK_S=max(2, _next_pow2(splits)), BLOCK_R=block_r, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def _check(q_lat, q_pe, kv_pool, pe_pool, block_table, start_pos):
    if q_lat.dim() != 4 or q_pe.dim() != 4 or q_lat.shape[:3] != q_pe.shape[:3]:
        raise ValueError(f"q_lat {tuple(q_lat.shape)} / q_pe {tuple(q_pe.shape)}: expected "
                         "[B, T, H, r] and [B, T, H, rope]")
    B, T, H, R = q_lat.shape
    if kv_pool.dim() != 3 or pe_pool.dim() != 3 or kv_pool.shape[:2] != pe_pool.shape[:2]:
        raise ValueError(f"kv_pool {tuple(kv_pool.shape)} / pe_pool {tuple(pe_pool.shape)}: expected "
                         "[num_blocks, block_size, r] and [num_blocks, block_size, rope]")
    if kv_pool.shape[-1] != R or pe_pool.shape[-1] != q_pe.shape[-1]:
        raise ValueError(f"latent widths differ: q_lat {R} vs kv_pool {kv_pool.shape[-1]}, "
                         f"q_pe {q_pe.shape[-1]} vs pe_pool {pe_pool.shape[-1]}")
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype.is_floating_point:
        raise ValueError(f"block_table {tuple(block_table.shape)} {block_table.dtype}: expected "
                         f"an integer [{B}, max_blocks]")
    if start_pos.shape != (B,):
        raise ValueError(f"start_pos {tuple(start_pos.shape)}: expected [{B}]")
    if T == 0 or H == 0:
        raise ValueError("paged_mla_attention: no queries (T or H is 0)")
    if start_pos.device.type == "cpu":       # on a GPU this would cost a sync: the caller's contract
        need = _cdiv(int(start_pos.max()) + T, kv_pool.shape[1])
        if int(start_pos.min()) < 0 or need > block_table.shape[1]:
            raise ValueError(f"paged_mla_attention: rows reach {need} blocks, the block table "
                             f"has {block_table.shape[1]}")


_failed: set = set()


def paged_mla_attention(q_lat: Tensor, q_pe: Tensor, kv_pool: Tensor, pe_pool: Tensor,
                        block_table: Tensor, start_pos: Tensor | int, scale: float,
                        backend: str = "auto", *, out: Tensor | None = None,
                        block_m: int | None = None, num_splits: int | None = None) -> Tensor:
    """Absorbed MLA attention over a paged latent cache.

    q_lat [B, T, H, r] (q_nope already multiplied by W_uk), q_pe [B, T, H, rope] (already rotated),
    kv_pool [num_blocks, block_size, r], pe_pool [num_blocks, block_size, rope], block_table
    [B, max_blocks] (int32), start_pos [B] (or an int for all rows) →
    o_lat [B, T, H, r] = softmax(scale·(q_lat·c_kvᵀ + q_pe·k_peᵀ), causal per row) · c_kv in
    q_lat's dtype, the softmax in fp32.

    backend: "torch" (gather + torch, the reference), "triton" (the paged kernel; raises if it
    cannot run here), "auto" (triton for CUDA tensors when triton imports, torch otherwise; if the
    kernel ever fails there, a warning and torch from then on). ``out`` (triton: a
    contiguous [B, T, H, r] tensor of q_lat's dtype) receives the result; ``block_m`` (query rows
    per program, a power of two ≥ 16) and ``num_splits`` (sequence splits) override the triton
    launch heuristics.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(start_pos, Tensor):
        start_pos = torch.full((q_lat.shape[0],), int(start_pos), dtype=torch.long)
    start_pos = start_pos.to(q_lat.device)
    _check(q_lat, q_pe, kv_pool, pe_pool, block_table, start_pos)
    if out is not None and (out.shape != q_lat.shape or out.dtype != q_lat.dtype
                            or out.device != q_lat.device or not out.is_contiguous()):
        raise ValueError("out must be a contiguous tensor of q_lat's shape, dtype and device")
    if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"block_m = {block_m}: expected a power of two ≥ 16")
    if backend == "triton":
        return _attention_triton(q_lat, q_pe, kv_pool, pe_pool, block_table, start_pos, scale, out,
                                 block_m=block_m, num_splits=num_splits)
    page = kv_pool.shape[1]
    kernel_fits = (all(x.dtype in TRITON_DTYPES for x in (q_lat, kv_pool, pe_pool))
                   and q_pe.dtype == q_lat.dtype and page >= 16 and not page & (page - 1))
    if (backend == "auto" and q_lat.is_cuda and kernel_fits and triton_available()
            and "triton" not in _failed):
        try:
            return _attention_triton(q_lat, q_pe, kv_pool, pe_pool, block_table, start_pos, scale,
                                     out, block_m=block_m, num_splits=num_splits)
        except Exception as err:  # noqa: BLE001 — e.g. a GPU the kernel cannot compile for
            _failed.add("triton")
            warnings.warn(f"paged_mla_attention: triton failed ({err}); using torch from now on",
                          stacklevel=2)
    o = _attention_torch(q_lat, q_pe, kv_pool, pe_pool, block_table, start_pos, scale)
    if out is None:
        return o.contiguous()
    out.copy_(o)
    return out


# --------------------------------------------------------------------------------------------
# A small benchmark (GPU: CUDA-event timings of both backends; CPU: the torch backend)
# --------------------------------------------------------------------------------------------

def benchmark(batch: int = 8, context: int = 4096, heads: int = 128, T: int = 1, r: int = 512,
              rope: int = 64, block_size: int = 64, dtype=torch.bfloat16, device=None,
              iters: int = 20) -> dict:
    """Time both backends on random data; returns ms per call and the cache bytes/s read."""
    import time

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator(device="cpu").manual_seed(0)
    nblk = _cdiv(context + T, block_size)
    kv_pool = torch.randn(batch * nblk, block_size, r, generator=g).to(device, dtype)
    pe_pool = torch.randn(batch * nblk, block_size, rope, generator=g).to(device, dtype)
    table = torch.randperm(batch * nblk, generator=g).view(batch, nblk).to(device, torch.int32)
    q_lat = torch.randn(batch, T, heads, r, generator=g).to(device, dtype)
    q_pe = torch.randn(batch, T, heads, rope, generator=g).to(device, dtype)
    start = torch.full((batch,), context, dtype=torch.long, device=device)
    scale = 1 / math.sqrt(192)
    cache_bytes = batch * (context + T) * (r + rope) * kv_pool.element_size()
    result = {"batch": batch, "context": context, "heads": heads, "T": T, "device": str(device)}
    backends = ["torch"] + (["triton"] if triton_usable(device) and device.type == "cuda" else [])
    for name in backends:
        def call():
            return paged_mla_attention(q_lat, q_pe, kv_pool, pe_pool, table, start, scale, name)
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(iters):
                call()
            t1.record()
            torch.cuda.synchronize(device)
            ms = t0.elapsed_time(t1) / iters
        else:
            t = time.perf_counter()
            for _ in range(iters):
                call()
            ms = (time.perf_counter() - t) * 1e3 / iters
        result[f"{name}_ms"] = ms
        result[f"{name}_GBps"] = cache_bytes / ms / 1e6
    return result


if __name__ == "__main__":  # python -m dsv3.infer.paged_attention
    import json

    print(json.dumps(benchmark(), indent=1))
