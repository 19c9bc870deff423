"""Turn a model's Linears and grouped experts into their FP8 versions (SPEC §2.3).

``convert_to_fp8(model)`` works in place, before the optimizer is built:

* every ``nn.Linear`` without bias → :class:`FP8Linear` sharing the same weight Parameter
  (attention projections, dense FFNs, shared experts, the MTP ``eh_proj``); the Linears named
  in `skip` (default: the output head ``lm_head``) stay as they are;
* every grouped-experts module (duck-typed: stacked ``w13`` [E, 2I, d] and ``w2`` [E, d, I]
  parameters and an ``inter`` size, called as ``experts(x_sorted, counts)``) computes both
  expert GEMMs with :func:`fp8_grouped_linear`;
* the input of the attention-output projection (``o_proj``) gets power-of-two scales, as in
  the report (which also stores it in E5M6 — not reproduced: E4M3 is used there too).

Untouched, as the report keeps them in BF16/FP32: embedding (not a Linear), output head,
MoE gate (its own module computing in FP32), norms, the attention core.

This module does not import :mod:`dsv3.model` (fp8 sits below it); it recognises modules by
their type (``nn.Linear``) and attributes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gemm import device_offsets
from .linear import FP8Linear, fp8_grouped_linear, grouped_on_device

DEFAULT_SKIP = ("lm_head",)
POW2_INPUT = ("o_proj",)


def _is_grouped_experts(m: nn.Module) -> bool:
    w13, w2 = getattr(m, "w13", None), getattr(m, "w2", None)
    return (isinstance(w13, nn.Parameter) and isinstance(w2, nn.Parameter) and w13.dim() == 3
            and w2.dim() == 3 and hasattr(m, "inter"))


def _fp8_experts_forward(self, x_sorted, counts):
    """SwiGLU experts on expert-sorted tokens with both GEMMs (and their grads) in FP8."""
    backend = getattr(self, "fp8_backend", "auto")
    offsets = None
    if torch.is_tensor(counts):
        if grouped_on_device(x_sorted, backend):     # Triton: tiles scheduled on the device, no sync
            offsets, counts = device_offsets(counts), None
        else:
            counts = counts.tolist()    # the reference loop: read once (one device sync), not per GEMM
    h = fp8_grouped_linear(x_sorted, self.w13, counts=counts, offsets=offsets, backend=backend)
    gate, up = h.split(self.inter, dim=-1)
    return fp8_grouped_linear(F.silu(gate) * up, self.w2, counts=counts, offsets=offsets, backend=backend)


_FP8_CLASSES: dict = {}


def _fp8_experts_class(cls: type) -> type:
    """A subclass of the experts' own class whose forward runs in FP8 (state_dict unchanged)."""
    if getattr(cls, "_dsv3_fp8", False):
        return cls
    if cls not in _FP8_CLASSES:
        _FP8_CLASSES[cls] = type(f"FP8{cls.__name__}", (cls,),
                                 {"forward": _fp8_experts_forward, "_dsv3_fp8": True,
                                  "__module__": __name__})
    return _FP8_CLASSES[cls]


def convert_to_fp8(model: nn.Module, backend: str = "auto", skip=DEFAULT_SKIP,
                   pow2_input=POW2_INPUT) -> nn.Module:
    """Swap Linears/experts to FP8 in place (see module doc); returns `model`.

    `skip` / `pow2_input`: child names (the last component of the module path) to leave in
    high precision / to quantise with power-of-two input scales.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None and name not in skip:
                setattr(parent, name, FP8Linear.from_linear(
                    child, backend=backend, pow2_scale=name in pow2_input))
            elif _is_grouped_experts(child):
                child.__class__ = _fp8_experts_class(type(child))
                child.fp8_backend = backend
    return model


def fp8_summary(model: nn.Module) -> dict:
    """Counts of FP8 Linears, FP8 expert modules and remaining high-precision Linears."""
    fp8_lin = sum(isinstance(m, FP8Linear) for m in model.modules())
    experts = sum(getattr(type(m), "_dsv3_fp8", False) for m in model.modules())
    other = sum(type(m) is nn.Linear for m in model.modules())
    return {"fp8_linear": fp8_lin, "fp8_experts": experts, "high_precision_linear": other}
