"""FP8 fine-grained mixed precision (SPEC §2.3): quantisation, block-scaled GEMMs, FP8 Linear.

    from dsv3 import fp8
    q, s = fp8.quantize_activation(x)        # 1×128 tiles on the last dim: s [..., ceil(K/128)]
    q, s = fp8.quantize_weight(w)            # 128×128 blocks: s [ceil(N/128), ceil(K/128)]
    w = fp8.dequantize_weight(q, s)
    y = fp8.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16)   # a @ b.T

Inference with an FP8 checkpoint's weights kept in E4M3: ``FP8InferenceLinear`` /
``FP8InferenceExperts`` (``dsv3.load_pretrained(path, fp8="keep")`` builds them).

Triton is imported only when a Triton backend is used (``dsv3.fp8.triton_kernels``).
"""

from .accum import fp8_gemm_emulated, limited_precision_matmul, round_to_bits
from .gemm import (BACKENDS, available_backends, fp8_gemm, fp8_grouped_gemm, segment_bounds,
                   triton_available, triton_usable)
from .inference import FP8InferenceExperts, FP8InferenceLinear, dequantize_fp8, fp8_weight_bytes
from .linear import FP8Linear, fp8_grouped_linear, fp8_linear, saved_activation_bytes
from .quant import (AMAX_FLOOR, BLOCK, FP8_DTYPE, FP8_MAX, dequantize_activation,
                    dequantize_weight, e4m3_error_bound, has_nonfinite, quantize_activation,
                    quantize_activation_t, quantize_per_tensor, quantize_weight)

__all__ = [
    "AMAX_FLOOR", "BLOCK", "FP8_DTYPE", "FP8_MAX", "BACKENDS",
    "quantize_activation", "quantize_activation_t", "quantize_weight", "quantize_per_tensor",
    "dequantize_activation", "dequantize_weight", "has_nonfinite", "e4m3_error_bound",
    "fp8_gemm", "fp8_grouped_gemm", "segment_bounds", "available_backends",
    "triton_available", "triton_usable",
    "FP8Linear", "fp8_linear", "FP8InferenceLinear", "FP8InferenceExperts", "dequantize_fp8",
    "fp8_weight_bytes", "fp8_grouped_linear", "saved_activation_bytes",
    "fp8_gemm_emulated", "limited_precision_matmul", "round_to_bits",
]
