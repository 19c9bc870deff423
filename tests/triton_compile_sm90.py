"""Compile the FP8 Triton GEMM kernels for Hopper (sm90) without a GPU: Triton's front end, its MLIR
passes and the ptxas bundled with it, as a launch on an H100/H200 would — only nothing runs.

Run in a process without TRITON_INTERPRET (the interpreter is chosen when the kernels are decorated):
``PYTHONPATH=src python tests/triton_compile_sm90.py``. The interpreter runs kernels as Python, so it
accepts code Triton's compiler rejects (e.g. a constexpr ``if … return`` followed by another ``return``);
this catches that on a machine with no GPU. Prints one line per kernel, exits non-zero on a failure.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dsv3.fp8 import triton_kernels as tk  # noqa: E402

P8, P32, PF, I32 = "*fp8e4nv", "*i32", "*fp32", "i32"


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn                        # through the autotuner
    return kernel


def compile_sm90(kernel, pointers: dict, consts: dict):
    fn = _jit(kernel)
    sig = {n: "constexpr" if n in consts else pointers.get(n, I32) for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs=consts)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    return len(out.asm["cubin"])


def _desc(shape):
    return f"tensordesc<fp8e4nv[{shape[0]}, {shape[1]}]>"


CASES = [
    ("dense pointer GEMM", tk._fp8_gemm_kernel,
     dict(a_ptr=P8, b_ptr=P8, c_ptr="*bf16", as_ptr=PF, bs_ptr=PF),
     dict(B_SCALE_DIV=128, EVEN_K=True, GROUP_M=8, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)),
    ("grouped pointer GEMM (device offsets)", tk._fp8_grouped_gemm_kernel,
     dict(a_ptr=P8, b_ptr=P8, c_ptr="*bf16", as_ptr=PF, bs_ptr=PF, off_ptr=P32),
     dict(B_SCALE_DIV=128, EVEN_K=True, E_POW2=16, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)),
    ("grouped pointer GEMM, row scales", tk._fp8_grouped_gemm_kernel,
     dict(a_ptr=P8, b_ptr=P8, c_ptr=PF, as_ptr=PF, bs_ptr=PF, off_ptr=P32),
     dict(B_SCALE_DIV=1, EVEN_K=False, E_POW2=256, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128)),
    ("grouped TMA GEMM (device offsets)", tk._fp8_grouped_gemm_tma_kernel,
     dict(a_desc=_desc((64, 128)), b_desc=_desc((128, 128)), c_ptr="*bf16", as_ptr=PF, bs_ptr=PF, off_ptr=P32),
     dict(B_SCALE_DIV=128, B_KN=False, E_POW2=16, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)),
    ("grouped TMA GEMM, Wᵀ", tk._fp8_grouped_gemm_tma_kernel,
     dict(a_desc=_desc((64, 128)), b_desc=_desc((128, 128)), c_ptr="*bf16", as_ptr=PF, bs_ptr=PF, off_ptr=P32),
     dict(B_SCALE_DIV=128, B_KN=True, E_POW2=16, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)),
    ("act_quant_t, segmented (device offsets)", tk._act_quant_t_kernel,
     dict(x_ptr="*bf16", xs_ptr=PF, q_ptr=P8, s_ptr=PF, off_ptr=P32),
     dict(DEQUANT=False, POW2=False, SEGMENTED=True, E_POW2=16, BLOCK_T=128, BLOCK_C=64)),
    ("act_quant_t, dense, from the FP8 cache", tk._act_quant_t_kernel,
     dict(x_ptr=P8, xs_ptr=PF, q_ptr=P8, s_ptr=PF, off_ptr=PF),
     dict(DEQUANT=True, POW2=False, SEGMENTED=False, E_POW2=16, BLOCK_T=128, BLOCK_C=64)),
    ("K-grouped GEMM", tk._fp8_kgrouped_gemm_kernel,
     dict(a_ptr=P8, b_ptr=P8, c_ptr=PF, as_ptr=PF, bs_ptr=PF, col0_ptr=P32, ncols_ptr=P32),
     dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128)),
]


def main() -> int:
    bad = 0
    for name, kernel, pointers, consts in CASES:
        try:
            print(f"ok   {name}: {compile_sm90(kernel, pointers, consts)} bytes of cubin")
        except Exception as err:  # noqa: BLE001
            bad += 1
            print(f"FAIL {name}: {type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
