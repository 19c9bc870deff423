"""Inference with FP8 weights kept FP8 (the official DeepSeek-V3 checkpoint layout).

An FP8 checkpoint stores each quantised Linear as an E4M3 ``weight`` [N, K] and a float32
``weight_scale_inv`` [ceil(N/128), ceil(K/128)] (value ≈ q · s per 128×128 block). The modules
here hold exactly those tensors and run the block-scaled FP8 GEMM of :mod:`dsv3.fp8.gemm` on
them, quantising the activations 1×128 on the fly (:mod:`dsv3.fp8.quant`, or the fused Triton
kernel on CUDA) — the same pieces the training-time :class:`~dsv3.fp8.linear.FP8Linear` uses,
without its master weight or its backward. Weight memory is one byte per element (+ 4 bytes per
128×128 block) instead of two for BF16.

* :class:`FP8InferenceLinear` — a bias-free Linear: ``weight`` e4m3 [N, K] (a frozen Parameter)
  and ``weight_scale_inv`` fp32 [ceil(N/128), ceil(K/128)] (a buffer). State-dict names are the
  checkpoint's own.
* :class:`FP8InferenceEmbedding` — a token embedding [V, d] in E4M3 with 128×128 scales (not in
  DeepSeek's release, whose embedding and head stay BF16; ``save_pretrained(fp8=True,
  fp8_embeddings=True)`` writes one for small models, where embedding and head are a large share of
  the bytes). A lookup dequantises only the rows it gathers: the dequantised table's rows, bit for bit.
* :class:`FP8InferenceExperts` — the routed experts stacked as in
  :class:`dsv3.model.moe.GroupedExperts` (``w13`` = gate ‖ up [E, 2I, d], ``w2`` [E, d, I]), both in
  e4m3 with ``w13_scale_inv`` / ``w2_scale_inv``; computed with :func:`fp8_grouped_gemm`. When
  I is not a multiple of 128 the gate and up blocks of one expert do not tile 2I rows on a
  128 grid, so ``w13_scale_inv`` then holds the block scales expanded to one row each
  ([E, 2I, ceil(d/128)], the "row" scale kind the GEMMs accept) — exact, no requantisation.

Both are inference-only (no autograd through the FP8 weights) and keep their dtypes under
``module.to(dtype)``/``.half()``/``.float()``: only the device moves.

Two ways to compute with the same stored tensors (``weight_only``):

* W8A8 (``weight_only=False``, ``load_pretrained(fp8="keep")``): DeepSeek's inference recipe — the
  activations are quantised 1×128 and the product runs as a block-scaled FP8 GEMM. Native on GPUs
  with FP8 tensor cores (sm89+); elsewhere the GEMM is emulated (slow) and the activation rounding
  changes the numbers slightly.
* W8A16 (``weight_only=True``, ``fp8="weight-only"``): each call dequantises the 128×128 blocks it
  needs into the activations' dtype and runs the plain matmul (experts: only those with rows, one at
  a time, so the transient is one expert's weights) — what serving stacks do for FP8 checkpoints on
  hardware without FP8 GEMMs. The weights stay one byte per element in memory and the outputs equal
  the model dequantised at load, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gemm import device_offsets, fp8_gemm, fp8_grouped_gemm, grouped_uses_triton
from .linear import _out_dtype, _quant_act
from .quant import BLOCK, FP8_DTYPE, _cdiv, quantize_weight

__all__ = ["FP8InferenceLinear", "FP8InferenceEmbedding", "FP8InferenceExperts", "dequantize_fp8", "expand_block_scales",
           "fp8_weight_bytes", "fp8_inference_candidates", "convert_to_fp8_inference", "HIGH_PRECISION",
           "RELEASE_HIGH_PRECISION"]

# Never run in FP8 here: kv_b_proj (absorbed MLA reads its weight as a matrix; small). Norms and the
# MoE gate are not candidates at all.
HIGH_PRECISION = ("kv_b_proj",)
# What DeepSeek's FP8 release also keeps in high precision: the embedding and the output head. The
# default when a high-precision model is converted here; a checkpoint that stores them in E4M3
# (``save_pretrained(fp8_embeddings=True)``) is loaded with them kept in E4M3.
RELEASE_HIGH_PRECISION = HIGH_PRECISION + ("embed_tokens", "lm_head")


def expand_block_scales(s: torch.Tensor, n: int, block: int = BLOCK) -> torch.Tensor:
    """Block scales [..., ceil(N/b), G] → one row per output row [..., N, G] (exact)."""
    return s.repeat_interleave(block, dim=-2)[..., :n, :]


_E4M3_VALUES: dict = {}


def _e4m3_to_float(q: torch.Tensor) -> torch.Tensor:
    """``q.float()`` through a 256-entry table (the same values; a table lookup is several times
    faster than the element-wise E4M3 conversion on a CPU)."""
    if q.dtype != FP8_DTYPE:
        return q.float()
    lut = _E4M3_VALUES.get(q.device)
    if lut is None:
        lut = _E4M3_VALUES[q.device] = torch.arange(256, dtype=torch.uint8, device=q.device).view(FP8_DTYPE).float()
    return lut.index_select(0, q.reshape(-1).view(torch.uint8).int()).view(q.shape)


def dequantize_fp8(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q e4m3 [..., N, K] with block scales [..., ceil(N/b), ceil(K/b)] or row scales
    [..., N, ceil(K/b)] → [..., N, K] in `dtype`."""
    n, k = q.shape[-2:]
    if s.shape[-1] != _cdiv(k, block) or s.shape[-2] not in (_cdiv(n, block), n):
        raise ValueError(f"scale shape {tuple(s.shape)} does not fit q {tuple(q.shape)}")
    kb = _cdiv(k, block)
    x = _e4m3_to_float(q)
    if k != kb * block:
        x = F.pad(x, (0, kb * block - k))
    if s.shape[-2] == n and n != _cdiv(n, block):           # one scale row per weight row
        x = x.unflatten(-1, (kb, block)) * s.float().unsqueeze(-1)
        return x.flatten(-2)[..., :k].to(dtype)
    nb = _cdiv(n, block)                                     # 128×128 blocks: scale each block in place
    if n != nb * block:
        x = F.pad(x, (0, 0, 0, nb * block - n))
    x = x.unflatten(-1, (kb, block)).unflatten(-3, (nb, block)) * s.float()[..., :, None, :, None]
    return x.flatten(-4, -3).flatten(-2)[..., :n, :k].to(dtype)


def _keep_dtypes_apply(module: nn.Module, fn, names: tuple[str, ...], recurse: bool):
    """Module._apply that lets `fn` move the FP8 tensors and their scales but never recast them
    (other buffers, e.g. the embedding's output-dtype marker, are moved and cast as usual)."""
    for name, t in list(module._buffers.items()):
        if name not in names and t is not None:
            module._buffers[name] = fn(t)
    for name in names:
        t = getattr(module, name)
        moved = fn(t)
        if moved.dtype != t.dtype:
            moved = t.to(device=moved.device)
        if isinstance(t, nn.Parameter):
            module._parameters[name] = nn.Parameter(moved, requires_grad=False)
        else:
            module._buffers[name] = moved
    return module


class FP8InferenceLinear(nn.Module):
    """``y = x Wᵀ`` with W kept in E4M3 + 128×128 scales; x quantised 1×128 per call."""

    _fp8_names = ("weight", "weight_scale_inv")

    def __init__(self, in_features: int, out_features: int, device=None, backend: str = "auto",
                 weight_only: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.weight_only = weight_only
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale_inv", torch.ones(
            _cdiv(out_features, BLOCK), _cdiv(in_features, BLOCK), dtype=torch.float32, device=device))

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, scale_inv: torch.Tensor,
                       backend: str = "auto") -> "FP8InferenceLinear":
        if weight.dtype != FP8_DTYPE:
            raise TypeError(f"FP8InferenceLinear needs a {FP8_DTYPE} weight, got {weight.dtype}")
        n, k = weight.shape
        if tuple(scale_inv.shape) != (_cdiv(n, BLOCK), _cdiv(k, BLOCK)):
            raise ValueError(f"weight_scale_inv must be [{_cdiv(n, BLOCK)}, {_cdiv(k, BLOCK)}] "
                             f"for a [{n}, {k}] weight, got {tuple(scale_inv.shape)}")
        m = cls(k, n, device="meta", backend=backend)
        m.weight = nn.Parameter(weight, requires_grad=False)
        m.weight_scale_inv = scale_inv.float()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> "FP8InferenceLinear":
        """Quantise a bias-free nn.Linear's weight 128×128 (as ``save_pretrained(fp8=True)``)."""
        if linear.bias is not None:
            raise ValueError("FP8InferenceLinear has no bias")
        q, s = quantize_weight(linear.weight.detach())
        return cls.from_quantized(q, s, backend)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale_inv, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_only:
            return F.linear(x, self.dequantized_weight(x.dtype))
        lead, k = x.shape[:-1], x.shape[-1]
        x_q, x_s = _quant_act(x.reshape(-1, k), self.backend)
        y = fp8_gemm(x_q, x_s, self.weight, self.weight_scale_inv, out_dtype=_out_dtype(x),
                     backend=self.backend)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        return _keep_dtypes_apply(self, fn, self._fp8_names, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 weight 128x128 scales, "
                + ("weight-only (W8A16)" if self.weight_only else "W8A8"))


class FP8InferenceEmbedding(nn.Module):
    """Token embedding with the table [V, d] kept in E4M3 + 128×128 scales; a lookup returns the
    gathered rows dequantised into the model's dtype (that of the empty ``act_dtype`` buffer, which
    ``module.to(dtype)`` casts while the table stays E4M3)."""

    _fp8_names = ("weight", "weight_scale_inv")

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale_inv", torch.ones(
            _cdiv(num_embeddings, BLOCK), _cdiv(embedding_dim, BLOCK), dtype=torch.float32, device=device))
        self.register_buffer("act_dtype", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "FP8InferenceEmbedding":
        """Quantise an nn.Embedding's table 128×128 (as ``save_pretrained(fp8_embeddings=True)``)."""
        w = emb.weight.detach()
        q, s = quantize_weight(w)
        m = cls(*w.shape, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(q)
            m.weight_scale_inv.copy_(s)
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale_inv, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] (int) → [..., d]: each row q[t] · s[t // 128, column block], as dequantize_fp8."""
        flat = tokens.reshape(-1)
        rows = _e4m3_to_float(self.weight.index_select(0, flat))                  # [n, d]
        scales = self.weight_scale_inv.index_select(0, torch.div(flat, BLOCK, rounding_mode="floor"))
        scales = scales.repeat_interleave(BLOCK, dim=1)[:, :self.embedding_dim]   # [n, d]
        return (rows * scales).to(self.act_dtype.dtype).reshape(*tokens.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        return _keep_dtypes_apply(self, fn, self._fp8_names, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fp8 e4m3 table 128x128 scales"


class FP8InferenceExperts(nn.Module):
    """E SwiGLU experts, stacked as GroupedExperts, with E4M3 weights and block scales."""

    _fp8_names = ("w13", "w13_scale_inv", "w2", "w2_scale_inv")

    def __init__(self, num_experts: int, dim: int, inter: int, device=None, backend: str = "auto",
                 weight_only: bool = False):
        super().__init__()
        self.num_experts, self.dim, self.inter, self.backend = num_experts, dim, inter, backend
        self.weight_only = weight_only
        e, g_d, g_i = num_experts, _cdiv(dim, BLOCK), _cdiv(inter, BLOCK)
        self.w13_row_scales = inter % BLOCK != 0          # see the module doc
        rows13 = 2 * inter if self.w13_row_scales else 2 * inter // BLOCK
        kw = dict(dtype=FP8_DTYPE, device=device)
        self.w13 = nn.Parameter(torch.empty(e, 2 * inter, dim, **kw), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, dim, inter, **kw), requires_grad=False)
        self.register_buffer("w13_scale_inv", torch.ones(e, rows13, g_d, dtype=torch.float32, device=device))
        self.register_buffer("w2_scale_inv", torch.ones(e, _cdiv(dim, BLOCK), g_i, dtype=torch.float32,
                                                        device=device))

    def w13_scales_from_parts(self, gate_s: torch.Tensor, up_s: torch.Tensor) -> torch.Tensor:
        """The ``w13_scale_inv`` slice of one expert from its gate and up block scales."""
        if self.w13_row_scales:
            gate_s, up_s = (expand_block_scales(s, self.inter) for s in (gate_s, up_s))
        return torch.cat([gate_s, up_s], dim=0)

    @classmethod
    def from_experts(cls, experts: nn.Module, backend: str = "auto") -> "FP8InferenceExperts":
        """Quantise a GroupedExperts' gate/up/down weights 128×128, each on its own (as a checkpoint
        written by ``save_pretrained(fp8=True)`` holds them)."""
        e, i, d = experts.num_experts, experts.inter, experts.dim
        w13, w2 = experts.w13.detach(), experts.w2.detach()
        m = cls(e, d, i, device=w13.device, backend=backend)
        gq, gs = quantize_weight(w13[:, :i])
        uq, us = quantize_weight(w13[:, i:])
        dq, ds = quantize_weight(w2)
        with torch.no_grad():
            m.w13.copy_(torch.cat([gq, uq], dim=1))
            m.w13_scale_inv.copy_(torch.stack([m.w13_scales_from_parts(gs[x], us[x]) for x in range(e)]))
            m.w2.copy_(dq)
            m.w2_scale_inv.copy_(ds)
        return m

    def dequantized_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) in `dtype`, as GroupedExperts stores them."""
        return (dequantize_fp8(self.w13, self.w13_scale_inv, dtype=dtype),
                dequantize_fp8(self.w2, self.w2_scale_inv, dtype=dtype))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: tokens grouped by expert (segment e has counts[e] rows) → [M, d]."""
        if self.weight_only:
            return self._forward_weight_only(x_sorted, counts)
        out_dtype = _out_dtype(x_sorted)
        offsets = None
        if torch.is_tensor(counts):
            if grouped_uses_triton(x_sorted.device, self.backend):   # scheduled on the device: no sync
                offsets, counts = device_offsets(counts), None
            else:
                counts = counts.tolist()      # the reference loop: one read for both GEMMs
        x_q, x_s = _quant_act(x_sorted, self.backend)
        h = fp8_grouped_gemm(x_q, x_s, self.w13, self.w13_scale_inv, counts=counts, offsets=offsets,
                             out_dtype=out_dtype, backend=self.backend)
        gate, up = h.split(self.inter, dim=-1)
        a_q, a_s = _quant_act(F.silu(gate) * up, self.backend)
        y = fp8_grouped_gemm(a_q, a_s, self.w2, self.w2_scale_inv, counts=counts, offsets=offsets,
                             out_dtype=out_dtype, backend=self.backend)
        return y.to(x_sorted.dtype)

    def _forward_weight_only(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """W8A16: per expert with rows, its weights dequantised into x's dtype and the SwiGLU of
        :class:`dsv3.model.moe.GroupedExperts` (the same matmuls, segment by segment)."""
        dtype, outs, at = x_sorted.dtype, [], 0
        for e, n in enumerate(counts.tolist()):
            if not n:
                continue
            x = x_sorted[at:at + n]
            at += n
            gate, up = F.linear(x, dequantize_fp8(self.w13[e], self.w13_scale_inv[e], dtype=dtype)).split(
                self.inter, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, dequantize_fp8(self.w2[e], self.w2_scale_inv[e], dtype=dtype)))
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, self.dim)

    def _apply(self, fn, recurse=True):
        return _keep_dtypes_apply(self, fn, self._fp8_names, recurse)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, inter={self.inter}, fp8 e4m3 weights "
                + ("(w13 row scales)" if self.w13_row_scales else "128x128 scales")
                + (", weight-only (W8A16)" if self.weight_only else ", W8A8"))


def _is_grouped_experts(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "w13", None), nn.Parameter) and isinstance(getattr(m, "w2", None), nn.Parameter)
            and all(hasattr(m, a) for a in ("num_experts", "dim", "inter"))
            and not isinstance(m, FP8InferenceExperts))


def fp8_inference_candidates(model: nn.Module, skip=RELEASE_HIGH_PRECISION) -> dict[str, nn.Module]:
    """{module path: module} of what can run in FP8: bias-free ``nn.Linear`` children, ``nn.Embedding``
    children and grouped-experts modules (stacked ``w13``/``w2``, duck-typed as in fp8/model.py),
    except those whose last name is in `skip` (default: as DeepSeek's release)."""
    out = {}
    for path, m in model.named_modules():
        if not path or path.rsplit(".", 1)[-1] in skip:
            continue
        if (type(m) is nn.Linear and m.bias is None) or type(m) is nn.Embedding or _is_grouped_experts(m):
            out[path] = m
    return out


def convert_to_fp8_inference(model: nn.Module, select=None, skip=RELEASE_HIGH_PRECISION,
                             backend: str = "auto", weight_only: bool = False) -> nn.Module:
    """Replace the candidates (:func:`fp8_inference_candidates`; only those whose path `select`
    accepts, when given) by FP8 inference modules, in place; returns `model`. Weights are
    quantised 128×128 as ``save_pretrained(fp8=True)`` does; on the ``meta`` device empty FP8
    modules are made (what ``load_pretrained(fp8="keep"|"weight-only")`` then fills from the
    checkpoint). ``weight_only``: the modules compute W8A16 (see the module doc)."""
    for path, m in fp8_inference_candidates(model, skip).items():
        if select is not None and not select(path):
            continue
        meta = (m.w13 if _is_grouped_experts(m) else m.weight).is_meta
        if isinstance(m, nn.Embedding):
            new = (FP8InferenceEmbedding(m.num_embeddings, m.embedding_dim, device="meta", dtype=m.weight.dtype)
                   if meta else FP8InferenceEmbedding.from_embedding(m))
        elif isinstance(m, nn.Linear):
            new = (FP8InferenceLinear(m.in_features, m.out_features, device="meta", backend=backend) if meta
                   else FP8InferenceLinear.from_linear(m, backend))
            new.weight_only = weight_only
        else:
            new = (FP8InferenceExperts(m.num_experts, m.dim, m.inter, device="meta", backend=backend) if meta
                   else FP8InferenceExperts.from_experts(m, backend))
            new.weight_only = weight_only
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, new)
    return model


def fp8_weight_bytes(model: nn.Module) -> dict:
    """Bytes of the model's parameters and buffers (each storage once), split into FP8 weights,
    their scales and everything else."""
    seen: set = set()
    out = {"fp8": 0, "scales": 0, "other": 0}
    fp8_scale_ids = {id(getattr(m, n)) for m in model.modules()
                     if isinstance(m, (FP8InferenceLinear, FP8InferenceEmbedding, FP8InferenceExperts))
                     for n in m._fp8_names if n.endswith("scale_inv")}
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        out["fp8" if t.dtype == FP8_DTYPE else "scales" if id(t) in fp8_scale_ids else "other"] += nbytes
    out["total"] = out["fp8"] + out["scales"] + out["other"]
    return out
