"""Block-scaled FP8 GEMMs — SPEC §2.3 "increased-precision accumulation".

``fp8_gemm(a_q, a_s, b_q, b_s)`` computes ``a @ b.T`` for

    a_q  e4m3 [M, K]   with 1×128 scales   a_s fp32 [M, ceil(K/128)]
    b_q  e4m3 [N, K]   with 128×128 scales b_s fp32 [ceil(N/128), ceil(K/128)]
                       or 1×128 scales     b_s fp32 [N, ceil(K/128)]      (Wgrad: both operands
                                                                           are activations)

The K dim is walked in groups of 128; each group's partial product is formed from the raw E4M3
values (exact products, the tensor-core MMA), then *promoted*: multiplied by its two scales and
added into an FP32 accumulator. That is the report's scheme (promotion every N_C = 128 elements,
scales applied during the promotion) and every backend implements exactly that.

Backends (each callable on its own with ``backend=``):
  "torch"      plain torch, any device: a loop over K groups, one FP32 matmul per group.
  "triton"     Triton kernel (``tl.dot`` on E4M3 tiles per group, FP32 accumulator), CUDA sm89+.
  "scaled_mm"  ``torch._scaled_mm`` block-scaled cuBLAS (Hopper, torch ≥ 2.9, CUDA ≥ 12.9);
               probed once per device and operand kind, never trusted blindly.
  "auto"       scaled_mm → triton → torch on CUDA (first that works), torch elsewhere.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .quant import BLOCK, FP8_DTYPE, _cdiv

BACKENDS = ("auto", "torch", "triton", "scaled_mm")


class _ShapeUnsupported(RuntimeError):
    """A backend that works on this device but not for this shape ("auto" moves on quietly)."""


# --------------------------------------------------------------------------------------------
# Operand checks
# --------------------------------------------------------------------------------------------

def _b_scale_kind(b_s: torch.Tensor, n: int, kg: int, block: int) -> str:
    """'block' for 128×128 scales [ceil(N/128), G], 'row' for 1×128 scales [N, G].

    When N == 1 both readings are the same numbers, so the ambiguity is harmless.
    """
    if b_s.dim() != 2 or b_s.shape[1] != kg:
        raise ValueError(f"b_s must be [ceil(N/{block}) or N, {kg}], got {tuple(b_s.shape)}")
    if b_s.shape[0] == _cdiv(n, block):
        return "block"
    if b_s.shape[0] == n:
        return "row"
    raise ValueError(f"b_s rows {b_s.shape[0]} match neither ceil(N/{block})={_cdiv(n, block)} "
                     f"nor N={n}")


def _check(a_q, a_s, b_q, b_s, block):
    if a_q.dtype != FP8_DTYPE or b_q.dtype != FP8_DTYPE:
        raise TypeError(f"fp8_gemm operands must be {FP8_DTYPE}, got {a_q.dtype} and {b_q.dtype}")
    if a_q.dim() != 2 or b_q.dim() != 2:
        raise ValueError("fp8_gemm operands must be 2-D (a [M, K], b [N, K])")
    m, k = a_q.shape
    n, kb = b_q.shape
    if k != kb:
        raise ValueError(f"K mismatch: a has {k}, b has {kb}")
    kg = _cdiv(k, block)
    if tuple(a_s.shape) != (m, kg):
        raise ValueError(f"a_s must be [{m}, {kg}], got {tuple(a_s.shape)}")
    return m, n, k, _b_scale_kind(b_s, n, kg, block)


def _b_row_scales(b_s: torch.Tensor, n: int, kind: str, block: int) -> torch.Tensor:
    """Scales of b expanded to one row per output column: [N, G] fp32."""
    b_s = b_s.float()
    return b_s if kind == "row" else b_s.repeat_interleave(block, dim=0)[:n]


# --------------------------------------------------------------------------------------------
# Reference backend: plain torch
# --------------------------------------------------------------------------------------------

_TORCH_CHUNK_BYTES = 64 << 20    # cap on the [groups, M, N] FP32 partials held at once


def _gemm_torch(a_q, a_s, b_q, b_s, out_dtype, block, kind):
    m, k = a_q.shape
    n = b_q.shape[0]
    g_all = _cdiv(k, block)
    with torch.autocast(a_q.device.type, enabled=False):   # FP32 matmuls, whatever the caller
        af, bf = a_q.float(), b_q.float()
        if g_all * block != k:                               # zero-pad the partial last group
            af = torch.nn.functional.pad(af, (0, g_all * block - k))
            bf = torch.nn.functional.pad(bf, (0, g_all * block - k))
        a3 = af.reshape(m, g_all, block).transpose(0, 1)     # [G, M, 128]
        b3 = bf.reshape(n, g_all, block).transpose(0, 1)     # [G, N, 128]
        sa = a_s.float().t()                                 # [G, M]
        sb = _b_row_scales(b_s, n, kind, block).t()          # [G, N]
        acc = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
        step = max(1, _TORCH_CHUNK_BYTES // max(1, 4 * m * n))
        for g0 in range(0, g_all, step):
            g1 = min(g_all, g0 + step)
            # per group: exact E4M3 products summed in FP32 over ≤ 128 elements ...
            part = torch.bmm(a3[g0:g1], b3[g0:g1].transpose(1, 2))      # [g, M, N]
            # ... then promoted: times the group's two scales, added into the FP32 accumulator
            part *= sa[g0:g1, :, None]
            part *= sb[g0:g1, None, :]
            acc += part.sum(0)
    return acc.to(out_dtype)


# --------------------------------------------------------------------------------------------
# cuBLAS block-scaled backend: torch._scaled_mm
# --------------------------------------------------------------------------------------------

def _pad4(bs: torch.Tensor) -> torch.Tensor:
    g = bs.shape[1]
    return torch.nn.functional.pad(bs, (0, (-g) % 4), value=1.0) if g % 4 else bs


# name -> (b-scale kind, builder of scale_b from our b_s). cuBLAS wants A row-major, B
# column-major (the [K, N] view of our [N, K]), 1×128 scales "outer-dim-major" (stride (1, M)),
# and 128×128 scales K-block-major, the K-block count possibly padded to a multiple of 4. The
# exact conventions moved between torch releases, so a probe tries each candidate on the device
# and keeps the first that reproduces the torch reference.
_SCALED_MM_LAYOUTS = {
    "row_gn": ("row", lambda bs: bs.t().contiguous()),                  # [G, N] contiguous
    "row_ng": ("row", lambda bs: bs.t().contiguous().t()),              # [N, G], stride (1, N)
    "blk_t_pad4": ("block", lambda bs: _pad4(bs.contiguous()).t()),     # [L4, NB], stride (1, L4)
    "blk_t": ("block", lambda bs: bs.contiguous().t()),                 # [G, NB], stride (1, G)
    "blk": ("block", lambda bs: bs.contiguous()),                       # [NB, G]
    # the same through torch.nn.functional.scaled_mm (torch ≥ 2.10), which names the recipes
    "f_row_gn": ("row", lambda bs: bs.t().contiguous()),
    "f_row_ng": ("row", lambda bs: bs.t().contiguous().t()),
    "f_blk_t_pad4": ("block", lambda bs: _pad4(bs.contiguous()).t()),
    "f_blk_t": ("block", lambda bs: bs.contiguous().t()),
    "f_blk": ("block", lambda bs: bs.contiguous()),
}


def _call_scaled_mm(a_q, a_s, b_q, b_s, layout, out_dtype):
    sa = a_s.float().t().contiguous().t()                               # [M, G], stride (1, M)
    kind, build = _SCALED_MM_LAYOUTS[layout]
    sb = build(b_s.float())
    if layout.startswith("f_"):
        F = torch.nn.functional
        if not hasattr(F, "scaled_mm"):
            raise RuntimeError("torch.nn.functional.scaled_mm needs torch ≥ 2.10")
        def recipe(tile):             # spelled Blockwise_1x128 in some releases, BlockWise1x128 in others
            rt = F.ScalingType
            return getattr(rt, f"BlockWise{tile}", None) or getattr(rt, f"Blockwise_{tile}")
        return F.scaled_mm(a_q, b_q.t(), sa, recipe("1x128"), sb,
                           recipe("1x128" if kind == "row" else "128x128"), output_dtype=out_dtype)
    return torch._scaled_mm(a_q, b_q.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


# Why the probe found no layout, per (device, kind, dtype): what each candidate raised or how far it was.
SCALED_MM_PROBE_NOTES: dict = {}

# Hopper's FP8 MMA keeps fewer accumulator bits than FP32 inside one 128-wide group (the report's
# "about 14 bits"): errors of ~1e-4 of the output's scale are the hardware's, not a layout's.
FP8_MMA_REL_TOL = 5e-4


@functools.lru_cache(maxsize=None)
def _scaled_mm_layout(device_index: int, kind: str, out_dtype: torch.dtype):
    """Which layout in `_SCALED_MM_LAYOUTS` works on this device for this b-scale kind and
    output dtype, or None (not supported: "auto" then uses Triton; the reasons are kept in
    `SCALED_MM_PROBE_NOTES`)."""
    key = (device_index, kind, str(out_dtype))
    if not hasattr(torch, "_scaled_mm"):
        SCALED_MM_PROBE_NOTES[key] = "torch has no _scaled_mm"
        return None
    dev = torch.device("cuda", device_index)
    if torch.cuda.get_device_capability(dev) < (9, 0):
        SCALED_MM_PROBE_NOTES[key] = "needs sm90 or newer"
        return None
    from .quant import quantize_activation, quantize_weight
    gen = torch.Generator(device=dev).manual_seed(0)
    m, n, k = 256, 384, 640                   # K/128 = 5: exercises the L4 padding question
    a = torch.randn(m, k, device=dev, generator=gen)
    b = torch.randn(n, k, device=dev, generator=gen)
    a_q, a_s = quantize_activation(a)
    b_q, b_s = quantize_activation(b) if kind == "row" else quantize_weight(b)
    ref = _gemm_torch(a_q, a_s, b_q, b_s, torch.float32, BLOCK, kind)
    tol = FP8_MMA_REL_TOL if out_dtype == torch.float32 else 1e-2
    notes = []
    for name, (k_name, _) in _SCALED_MM_LAYOUTS.items():
        if k_name != kind:
            continue
        try:
            out = _call_scaled_mm(a_q, a_s, b_q, b_s, name, out_dtype)
            torch.cuda.synchronize(dev)
        except Exception as err:  # noqa: BLE001 — an unsupported layout raises; try the next one
            notes.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''}")
            continue
        if out.shape != ref.shape:
            notes.append(f"{name}: shape {tuple(out.shape)}")
            continue
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        if err < tol:
            return name
        notes.append(f"{name}: rel err {err:.1e}")
    SCALED_MM_PROBE_NOTES[key] = "; ".join(notes)
    return None


def _gemm_scaled_mm(a_q, a_s, b_q, b_s, out_dtype, block, kind):
    if a_q.device.type != "cuda" or block != BLOCK:
        raise RuntimeError("scaled_mm backend needs CUDA tensors and 128-wide blocks")
    k, n = a_q.shape[1], b_q.shape[0]
    if k % BLOCK or n % 16:
        raise _ShapeUnsupported("scaled_mm backend needs K a multiple of 128 and N of 16")
    layout = _scaled_mm_layout(a_q.device.index or 0, kind, out_dtype)
    if layout is None:
        why = SCALED_MM_PROBE_NOTES.get((a_q.device.index or 0, kind, str(out_dtype)), "")
        raise _ShapeUnsupported("torch._scaled_mm block-scaled GEMM is not available here"
                                + (f" ({why})" if why else ""))
    return _call_scaled_mm(a_q.contiguous(), a_s, b_q.contiguous(), b_s, layout, out_dtype)


# --------------------------------------------------------------------------------------------
# Triton backend (lazy import: `import dsv3.fp8` never imports triton)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton importable (the kernels themselves are imported only when first used)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Triton can run FP8 kernels on `device`: CUDA sm89+, or the CPU interpreter
    (TRITON_INTERPRET=1, for tests)."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gemm_triton(a_q, a_s, b_q, b_s, out_dtype, block, kind):
    if block != BLOCK or not triton_usable(a_q.device):
        raise RuntimeError("triton backend unavailable on this device")
    from . import triton_kernels
    return triton_kernels.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype, b_row_scales=(kind == "row"))


_IMPLS = {"torch": _gemm_torch, "triton": _gemm_triton, "scaled_mm": _gemm_scaled_mm}


def available_backends(device) -> list[str]:
    """Backends worth trying on `device`, fastest first (what "auto" walks)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["torch"]
    order = []
    if hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (9, 0):
        order.append("scaled_mm")
    if triton_usable(device):
        order.append("triton")
    return order + ["torch"]


_warned: set = set()


def fp8_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
             block: int = BLOCK) -> torch.Tensor:
    """a @ b.T with 1×128 scales on a and 128×128 (or 1×128) scales on b; FP32 accumulation
    with promotion every 128 elements of K. a_q may carry leading batch dims ([..., K])."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    lead = a_q.shape[:-1]
    if a_q.dim() != 2:
        a_q, a_s = a_q.reshape(-1, a_q.shape[-1]), a_s.reshape(-1, a_s.shape[-1])
    m, n, k, kind = _check(a_q, a_s, b_q, b_s, block)
    if m == 0:
        return torch.zeros(*lead, n, dtype=out_dtype, device=a_q.device)
    if backend != "auto":
        out = _IMPLS[backend](a_q, a_s, b_q, b_s, out_dtype, block, kind)
    else:
        out = None
        for name in available_backends(a_q.device)[:-1]:
            try:
                out = _IMPLS[name](a_q, a_s, b_q, b_s, out_dtype, block, kind)
                break
            except _ShapeUnsupported:
                continue
            except Exception as err:  # noqa: BLE001 — e.g. a Triton compile error: fall back
                if name not in _warned:
                    _warned.add(name)
                    warnings.warn(f"fp8_gemm: backend {name!r} failed ({err}); falling back",
                                  stacklevel=2)
        if out is None:
            out = _gemm_torch(a_q, a_s, b_q, b_s, out_dtype, block, kind)
    return out.reshape(*lead, n)


# --------------------------------------------------------------------------------------------
# Grouped GEMM for MoE experts over contiguous, expert-sorted token segments
# --------------------------------------------------------------------------------------------

def segment_bounds(counts=None, offsets=None, total: int | None = None) -> list[tuple[int, int]]:
    """[(start, end)] per expert from `counts` [E] or `offsets` [E+1] (starts, then the end)."""
    if (counts is None) == (offsets is None):
        raise ValueError("pass exactly one of counts= or offsets=")
    if counts is not None:
        c = [int(v) for v in (counts.tolist() if torch.is_tensor(counts) else counts)]
        if any(v < 0 for v in c):
            raise ValueError("counts must be ≥ 0")
        o = [0]
        for v in c:
            o.append(o[-1] + v)
    else:
        o = [int(v) for v in (offsets.tolist() if torch.is_tensor(offsets) else offsets)]
        if o[0] != 0 or any(b < a for a, b in zip(o, o[1:])):
            raise ValueError("offsets must start at 0 and be non-decreasing")
    if total is not None and o[-1] != total:
        raise ValueError(f"segments cover {o[-1]} rows, the input has {total}")
    return list(zip(o[:-1], o[1:]))


def device_offsets(counts=None, offsets=None) -> torch.Tensor:
    """The experts' offsets as int32 [E+1] on their device, from a `counts` [E] or `offsets` [E+1]
    tensor, by device ops only (no host read): what the Triton grouped kernels schedule from."""
    if (counts is None) == (offsets is None):
        raise ValueError("pass exactly one of counts= or offsets=")
    if offsets is not None:
        return offsets.to(torch.int32)
    return torch.nn.functional.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))


def grouped_uses_triton(device, backend: str = "auto") -> bool:
    """:func:`fp8_grouped_gemm` takes its Triton kernel for this device and backend (then device
    offsets are scheduled on the device, never read on the host)."""
    device = torch.device(device)
    if backend == "triton":
        return True
    return backend == "auto" and "triton" in available_backends(device)


def fp8_grouped_gemm(a_q, a_s, b_q, b_s, counts=None, offsets=None,
                     out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
                     block: int = BLOCK) -> torch.Tensor:
    """Per-expert a_e @ b_e.T over contiguous segments of a.

    a_q e4m3 [T, K], a_s [T, ceil(K/128)] — tokens sorted by expert, expert e owning rows
    offsets[e]:offsets[e+1] (or given as counts [E]); b_q e4m3 [E, N, K] with b_s
    [E, ceil(N/128), ceil(K/128)] (or [E, N, ceil(K/128)]). Returns [T, N].

    Backends: "triton" (one launch; its programs find their expert's rows from the offsets on the
    device), "torch" (a loop of reference GEMMs); "auto" takes Triton where usable. There is no
    grouped cuBLAS path, so "scaled_mm" means the torch loop here.

    Counts or offsets given as tensors are never read on the host on the Triton path (they must then
    cover the T rows: that is not checked, it would need a read); host lists are checked and uploaded.
    The torch loop reads them (one sync).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if b_q.dim() != 3 or b_s.dim() != 3 or b_s.shape[0] != b_q.shape[0]:
        raise ValueError("grouped b_q must be [E, N, K] and b_s [E, *, ceil(K/128)]")
    t, k = a_q.shape
    e, n, _ = b_q.shape
    on_device = torch.is_tensor(counts) or torch.is_tensor(offsets)
    if on_device:
        bounds = counts if counts is not None else offsets
        if bounds.dim() != 1 or bounds.shape[0] != e + (offsets is not None):
            raise ValueError(f"{'offsets' if offsets is not None else 'counts'} of shape "
                             f"{tuple(bounds.shape)} for {e} experts")
        segs = None                     # read on the host only by the torch loop
    else:
        segs = segment_bounds(counts, offsets, total=t)
        if len(segs) != e:
            raise ValueError(f"{len(segs)} segments for {e} experts")
    _check(a_q[:0], a_s[:0], b_q[0], b_s[0], block)
    names = available_backends(a_q.device) if backend == "auto" else [backend]
    names = [nm for nm in names if nm != "scaled_mm"] or ["torch"]   # no grouped cuBLAS path
    if names[0] == "triton":
        try:
            from . import triton_kernels
            if not triton_usable(a_q.device) or block != BLOCK:
                raise RuntimeError("triton backend unavailable on this device")
            kind = _b_scale_kind(b_s[0], n, _cdiv(k, block), block)
            sched = device_offsets(counts, offsets).to(a_q.device) if on_device else segs
            return triton_kernels.fp8_grouped_gemm(a_q, a_s, b_q, b_s, sched, out_dtype,
                                                   b_row_scales=(kind == "row"))
        except Exception as err:  # noqa: BLE001 — compile/launch failure: use the reference
            if backend == "triton":
                raise
            if "grouped-triton" not in _warned:
                _warned.add("grouped-triton")
                warnings.warn(f"fp8_grouped_gemm: triton failed ({err}); falling back", stacklevel=2)
    if segs is None:
        segs = segment_bounds(counts, offsets, total=t)
    out = torch.zeros(t, n, dtype=out_dtype, device=a_q.device)
    for i, (s0, s1) in enumerate(segs):
        if s1 > s0:
            out[s0:s1] = fp8_gemm(a_q[s0:s1], a_s[s0:s1], b_q[i], b_s[i], out_dtype,
                                  backend="torch", block=block)
    return out
