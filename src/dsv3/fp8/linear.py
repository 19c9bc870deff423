"""FP8 Linear layers with fine-grained scaling in all three GEMMs — SPEC §2.3, report Fig. 6.

For y = x Wᵀ (x [T, K] tokens × channels, W [N, K] FP32 master weight):

    Fprop  y  = x · Wᵀ     x 1×128 tiles along K   · W 128×128 blocks
    Dgrad  dx = dy · W     dy 1×128 tiles along N  · Wᵀ 128×128 blocks (the same quantised W,
                                                      transposed: square blocks make that free)
    Wgrad  dW = dyᵀ · x    both 1×128 tiles along T (the token dimension): dyᵀ [N, T], xᵀ [K, T]

Saved for backward: x in FP8 (q + 1×128 scales, ≈1.03 bytes/element instead of 2 for BF16)
and a reference to the master weight (a parameter, no activation memory). Wgrad re-quantises
x along the token dim from that FP8 copy (dequantise → transpose → quantise 128×1), the
round trip the report describes for its FP8 activation cache. The weight is re-quantised in
backward rather than saved, so no per-micro-batch FP8 weight copy is held.

On CUDA each quantisation is one Triton launch (the token-direction one dequantises the FP8 cache
on load), Dgrad reads Wᵀ through strides, and the experts' Wgrads are one K-grouped GEMM over
128-aligned token tiles (DeepGEMM's "k-grouped" layout) instead of a GEMM per expert; elsewhere
the torch quantisers and a per-expert loop compute the same numbers.

Gradients: dx in x's dtype, dW in FP32 (master-gradient precision).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .gemm import device_offsets, fp8_gemm, fp8_grouped_gemm, segment_bounds, triton_usable
from .quant import (dequantize_activation, quantize_activation, quantize_activation_t,
                    quantize_weight)


def _triton(t: torch.Tensor, backend: str):
    """The Triton kernels module when this backend runs its quantisers and Wgrad there (CUDA with
    Triton usable; their results are bit-identical to the torch quantisers'), else None."""
    if backend in ("auto", "triton") and t.is_cuda and triton_usable(t.device):
        from . import triton_kernels
        return triton_kernels
    return None


def _quant_act(x: torch.Tensor, backend: str, pow2_scale: bool = False):
    """1×128 quantisation; the fused Triton kernel on CUDA."""
    tk = _triton(x, backend)
    return tk.act_quant(x, pow2_scale=pow2_scale) if tk else quantize_activation(x, pow2_scale=pow2_scale)


def _quant_weight(w: torch.Tensor, backend: str):
    """128×128 quantisation of a master weight [N, K] or [E, N, K]; one Triton launch on CUDA."""
    tk = _triton(w, backend)
    return tk.weight_quant(w) if tk else quantize_weight(w)


def _transposed(w_q: torch.Tensor, w_s: torch.Tensor, backend: str):
    """Wᵀ and its block scales for Dgrad: a strided view for the Triton GEMMs (they take strides),
    a contiguous copy for the others."""
    wt_q, wt_s = w_q.transpose(-1, -2), w_s.transpose(-1, -2)
    if _triton(w_q, backend):
        return wt_q, wt_s
    return wt_q.contiguous(), wt_s.contiguous()


def _autocast_off(step):
    """Run an FP8 forward or backward with autocast off. Its GEMMs are FP8 by construction, and under
    a BF16 autocast (``--precision fp8`` runs everything else in BF16, as the report does) the torch
    backend's per-group FP32 products and the quantisers' FP32 maths would otherwise drop to BF16."""
    @functools.wraps(step)
    def run(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return step(ctx, *args)
    return run


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as an ``nn.Linear`` under autocast would take it: in the autocast dtype when autocast is on
    (so the output, and dx, come in that dtype too), unchanged otherwise."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(dev))
    return x


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, x, weight, backend, pow2_scale=False):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        x_q, x_s = _quant_act(x2, backend, pow2_scale)
        w_q, w_s = _quant_weight(weight, backend)
        y = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=_out_dtype(x), backend=backend)
        ctx.save_for_backward(x_q, x_s, weight)
        ctx.backend, ctx.x_shape, ctx.x_dtype = backend, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @_autocast_off
    def backward(ctx, dy):
        x_q, x_s, weight = ctx.saved_tensors
        n = weight.shape[0]
        dy2 = dy.reshape(-1, n)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = _quant_act(dy2, ctx.backend)                 # 1×128 along N
            w_q, w_s = _quant_weight(weight, ctx.backend)
            dx = fp8_gemm(dy_q, dy_s, *_transposed(w_q, w_s, ctx.backend),
                          out_dtype=_out_dtype(dy), backend=ctx.backend)
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = _wgrad(dy2, x_q, x_s, ctx.backend)
        return dx, dw, None, None


def _wgrad(dy2, x_q, x_s, backend):
    """dW [N, K] = dyᵀ x, both operands quantised 1×128 along the token dim (on CUDA one Triton pass
    each: x dequantised from its FP8 cache, transposed and requantised on load)."""
    tk = _triton(dy2, backend)
    if tk:
        dyt_q, dyt_s = tk.act_quant_t(dy2)
        xt_q, xt_s = tk.act_quant_t(x_q, x_s)
    else:
        dyt_q, dyt_s = quantize_activation_t(dy2)                       # [N, T], [N, T/128]
        xt_q, xt_s = quantize_activation_t(dequantize_activation(x_q, x_s))   # [K, T], [K, T/128]
    return fp8_gemm(dyt_q, dyt_s, xt_q, xt_s, out_dtype=torch.float32, backend=backend)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto",
               pow2_scale: bool = False) -> torch.Tensor:
    """Functional FP8 linear without bias: x [..., K] @ weight [N, K]ᵀ, differentiable.
    `pow2_scale` rounds the input's tile scales up to powers of two (the report does this for
    the attention-output Linear's input and the FP8 MoE dispatch)."""
    return _FP8LinearFn.apply(_autocast_input(x), weight, backend, pow2_scale)


class FP8Linear(nn.Module):
    """Drop-in for ``nn.Linear(in_features, out_features, bias=False)`` computing Fprop, Dgrad
    and Wgrad in FP8 with fine-grained scales; the weight stays an FP32 master parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device=None, dtype=None, backend: str = "auto", pow2_scale: bool = False):
        super().__init__()
        if bias:
            raise ValueError("FP8Linear has no bias (DeepSeek-V3's Linears have none)")
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.pow2_scale = backend, pow2_scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=dtype or torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))      # as nn.Linear

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto",
                    pow2_scale: bool = False) -> "FP8Linear":
        """An FP8Linear that *shares* `linear`'s weight Parameter (no copy, same init)."""
        if linear.bias is not None:
            raise ValueError("FP8Linear.from_linear needs a Linear without bias")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.backend, new.pow2_scale = backend, pow2_scale
        new.weight = linear.weight
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.backend, self.pow2_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8"
                + (", pow2 input scales" if self.pow2_scale else ""))


# --------------------------------------------------------------------------------------------
# Grouped experts (MoE): tokens sorted by expert, contiguous segments.
# --------------------------------------------------------------------------------------------

class _FP8GroupedLinearFn(torch.autograd.Function):
    """``segs``: host segments [(start, end)], or the experts' offsets as an int32 tensor [E+1] on the
    device (the Triton route: every kernel schedules itself from them, nothing is read on the host)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, x, weights, segs, backend):
        x_q, x_s = _quant_act(x, backend)
        w_q, w_s = _quant_weight(weights, backend)                   # [E, N, K], [E, N/128, K/128]
        y = fp8_grouped_gemm(x_q, x_s, w_q, w_s, offsets=_offsets_arg(segs),
                             out_dtype=_out_dtype(x), backend=backend)
        on_device = torch.is_tensor(segs)
        ctx.save_for_backward(x_q, x_s, weights, *([segs] if on_device else []))
        ctx.segs = None if on_device else segs
        ctx.backend, ctx.x_dtype = backend, x.dtype
        return y

    @staticmethod
    @_autocast_off
    def backward(ctx, dy):
        x_q, x_s, weights, *offs = ctx.saved_tensors
        segs, backend = (offs[0] if offs else ctx.segs), ctx.backend
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = _quant_act(dy, backend)
            w_q, w_s = _quant_weight(weights, backend)
            dx = fp8_grouped_gemm(dy_q, dy_s, *_transposed(w_q, w_s, backend), offsets=_offsets_arg(segs),
                                  out_dtype=_out_dtype(dy), backend=backend).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            tk = _triton(dy, backend)
            if tk:    # every expert in three launches (two token-direction quantisers, one GEMM)
                dw = tk.grouped_wgrad(dy, x_q, x_s, segs)
            else:     # the reference: a loop over the experts, read on the host
                if torch.is_tensor(segs):
                    segs = segment_bounds(offsets=segs, total=dy.shape[0])
                dw = torch.zeros_like(weights, dtype=torch.float32)
                for e, (s0, s1) in enumerate(segs):
                    if s1 > s0:   # token tiles never straddle two experts
                        dw[e] = _wgrad(dy[s0:s1], x_q[s0:s1], x_s[s0:s1], backend)
        return dx, dw, None, None


def _offsets_arg(segs):
    return segs if torch.is_tensor(segs) else [0] + [e for _, e in segs]


def fp8_grouped_linear(x_sorted: torch.Tensor, weights: torch.Tensor, counts=None,
                       offsets=None, backend: str = "auto") -> torch.Tensor:
    """Per-expert FP8 linear: rows of `x_sorted` [T, K] belonging to expert e (contiguous,
    `counts` [E] or `offsets` [E+1]) are multiplied by `weights[e]` [N, K]ᵀ → [T, N].
    Differentiable in x and weights (FP32 master weights [E, N, K]).

    Counts or offsets given as tensors on the Triton route (:func:`grouped_on_device`) stay on the
    device: forward, Dgrad and Wgrad schedule their tiles from them there, no host sync (they must
    cover the T rows; that is not checked). Elsewhere they are read once on the host."""
    x = _autocast_input(x_sorted)
    if weights.dim() != 3:
        raise ValueError(f"weights must be [E, N, K], got {tuple(weights.shape)}")
    if (torch.is_tensor(counts) or torch.is_tensor(offsets)) and grouped_on_device(x, backend):
        segs = device_offsets(counts, offsets).to(x.device)
        n_segs = segs.shape[0] - 1
    else:
        segs = segment_bounds(counts, offsets, total=x_sorted.shape[0])
        n_segs = len(segs)
    if n_segs != weights.shape[0]:
        raise ValueError(f"weights must be [E, N, K] with E = {n_segs} segments")
    return _FP8GroupedLinearFn.apply(x, weights, segs, backend)


def grouped_on_device(x: torch.Tensor, backend: str) -> bool:
    """The FP8 grouped linear runs on its Triton route here (quantisers, grouped GEMMs and the
    K-grouped Wgrad all Triton kernels): expert counts can stay on the device."""
    return _triton(x, backend) is not None


# --------------------------------------------------------------------------------------------
# Measuring the activation memory a forward pass keeps for backward.
# --------------------------------------------------------------------------------------------

def saved_activation_bytes(fn, *args, exclude=(), **kwargs) -> int:
    """Bytes of tensors autograd saves while running ``fn(*args, **kwargs)``, not counting
    tensors that share storage with `exclude` (pass the parameters: they live anyway). A saved
    input counts: keeping it alive for backward is the cost being measured. Each storage counts
    once. FP8Linear keeps ≈ T·K·(1 + 4/128) bytes, a BF16 nn.Linear 2·T·K."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if torch.is_tensor(t)}
    seen: set = set()
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    del out
    return total
