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
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dsv3.fp8 import triton_kernels as tk  # noqa: E402

P8, P32, PF, I32 = "*fp8e4nv", "*i32", "*fp32", "i32"


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn                        # through the autotuner
    return kernel


def compile_sm90(kernel, pointers: dict, consts: dict, warps: int = 4):
    fn = _jit(kernel)
    sig = {n: "constexpr" if n in consts else pointers.get(n, I32) for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs=consts)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})
    return len(out.asm["cubin"])


def _desc(shape, dtype="fp8e4nv"):
    return f"tensordesc<{dtype}[{shape[0]}, {shape[1]}]>"


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
    ("dense TMA GEMM, 8 warps", tk._fp8_gemm_tma_kernel,
     dict(a_desc=_desc((128, 128)), b_desc=_desc((128, 128)), c_desc=_desc((128, 128), "bf16"), as_ptr=PF, bs_ptr=PF),
     dict(B_SCALE_DIV=128, B_KN=False, OUT=tl.bfloat16, GROUP_M=8, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128), 8),
    ("dense TMA GEMM, Wᵀ, FP32 out", tk._fp8_gemm_tma_kernel,
     dict(a_desc=_desc((64, 128)), b_desc=_desc((128, 128)), c_desc=_desc((64, 128), "fp32"), as_ptr=PF, bs_ptr=PF),
     dict(B_SCALE_DIV=128, B_KN=True, OUT=tl.float32, GROUP_M=8, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128)),
    ("dense TMA GEMM, row scales, 64x256", tk._fp8_gemm_tma_kernel,
     dict(a_desc=_desc((64, 128)), b_desc=_desc((256, 128)), c_desc=_desc((64, 256), "bf16"), as_ptr=PF, bs_ptr=PF),
     dict(B_SCALE_DIV=1, B_KN=False, OUT=tl.bfloat16, GROUP_M=8, BLOCK_M=64, BLOCK_N=256, BLOCK_K=128), 8),
    ("1x128 activation quantiser", tk._act_quant_kernel, dict(x_ptr="*bf16", q_ptr=P8, s_ptr=PF),
     dict(POW2=False, BLOCK_M=32, BLOCK_K=128)),
    ("SwiGLU + quantiser", tk._swiglu_quant_kernel, dict(g_ptr="*bf16", u_ptr="*bf16", q_ptr=P8, s_ptr=PF),
     dict(POW2=True, BLOCK_M=32, BLOCK_K=128)),
    ("128x128 weight quantiser", tk._weight_quant_kernel, dict(w_ptr="*bf16", q_ptr=P8, s_ptr=PF),
     dict(POW2=False, BLOCK=128), 8),
    ("K-grouped GEMM", tk._fp8_kgrouped_gemm_kernel,
     dict(a_ptr=P8, b_ptr=P8, c_ptr=PF, as_ptr=PF, bs_ptr=PF, col0_ptr=P32, ncols_ptr=P32),
     dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128)),
]


# ------------------------------------------------------------------ every autotune config: no spills
# Compiled as a launch specialises them (unit strides are constants, pointers and other strides
# 16-divisible), the registers and the local-memory stack each config uses, read from the cubin with the
# cuobjdump bundled with Triton: a config that spills registers is slow, whatever the autotuner finds.
UNIT = dict(stride_ak=1, stride_bk=1, stride_cn=1, stride_asm=1, stride_bsg=1)     # act scales: M-major
UNIT_KGROUPED = dict(stride_ak=1, stride_bk=1, stride_cn=1, stride_asg=1, stride_bsg=1)   # act_quant_t's scales


def resources_sm90(kernel, pointers: dict, consts: dict, warps: int, stages: int) -> tuple[int, int, int]:
    """(registers per thread, spill stack bytes, shared memory bytes) of one config."""
    import re
    import subprocess
    import tempfile

    fn = _jit(kernel)
    unit = UNIT_KGROUPED if kernel is tk._fp8_kgrouped_gemm_kernel else UNIT
    consts = {**{k: v for k, v in unit.items() if k in fn.arg_names}, **consts}
    sig = {n: "constexpr" if n in consts else pointers.get(n, I32) for n in fn.arg_names}
    div16 = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (n in pointers and pointers[n].startswith("*") or n.startswith("stride"))}
    out = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=div16), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": warps, "num_stages": stages})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(out.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return int(regs.group(1)), int(stack.group(1)), out.metadata.shared


def config_cases():
    """(name, kernel, pointers, constexprs, warps, stages) for every config the autotuners may pick."""
    GEMM = dict(a_ptr=P8, b_ptr=P8, c_ptr="*bf16", as_ptr=PF, bs_ptr=PF)
    for bm, bn, st, w in tk._GEMM_TILES:
        yield (f"dense pointer {bm}x{bn} s{st} w{w}", tk._fp8_gemm_kernel, GEMM,
               dict(B_SCALE_DIV=128, EVEN_K=True, GROUP_M=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128), w, st)
    for bm, bn, st, w in tk._TMA_TILES:
        yield (f"dense TMA {bm}x{bn} s{st} w{w}", tk._fp8_gemm_tma_kernel,
               dict(a_desc=_desc((bm, 128)), b_desc=_desc((bn, 128)), c_desc=_desc((bm, bn), "bf16"), as_ptr=PF,
                    bs_ptr=PF),
               dict(B_SCALE_DIV=128, B_KN=False, OUT=tl.bfloat16, GROUP_M=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128), w, st)
    for cfg in tk._grouped_configs():
        for bm in (64, 128):
            bn = cfg.kwargs["BLOCK_N"]
            yield (f"grouped pointer {bm}x{bn} s{cfg.num_stages} w{cfg.num_warps}", tk._fp8_grouped_gemm_kernel,
                   dict(GEMM, off_ptr=P32),
                   dict(B_SCALE_DIV=128, EVEN_K=True, E_POW2=16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128),
                   cfg.num_warps, cfg.num_stages)
    for cfg in tk._fp8_grouped_gemm_tma_kernel.configs:
        for bm in (64, 128):
            bn = cfg.kwargs["BLOCK_N"]
            yield (f"grouped TMA {bm}x{bn} s{cfg.num_stages} w{cfg.num_warps}", tk._fp8_grouped_gemm_tma_kernel,
                   dict(a_desc=_desc((bm, 128)), b_desc=_desc((bn, 128)), c_ptr="*bf16", as_ptr=PF, bs_ptr=PF,
                        off_ptr=P32),
                   dict(B_SCALE_DIV=128, B_KN=False, E_POW2=16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128),
                   cfg.num_warps, cfg.num_stages)
    for cfg in tk._kgrouped_configs():
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        yield (f"K-grouped {bm}x{bn} s{cfg.num_stages} w{cfg.num_warps}", tk._fp8_kgrouped_gemm_kernel,
               dict(GEMM, c_ptr=PF, col0_ptr=P32, ncols_ptr=P32), dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128),
               cfg.num_warps, cfg.num_stages)


def main() -> int:
    bad = 0
    for name, kernel, pointers, consts, *warps in CASES:
        try:
            print(f"ok   {name}: {compile_sm90(kernel, pointers, consts, *warps)} bytes of cubin")
        except Exception as err:  # noqa: BLE001
            bad += 1
            print(f"FAIL {name}: {type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}")
    for name, kernel, pointers, consts, warps, stages in config_cases():
        try:
            regs, stack, smem = resources_sm90(kernel, pointers, consts, warps, stages)
        except Exception as err:  # noqa: BLE001
            bad += 1
            print(f"FAIL config {name}: {type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}")
            continue
        fits = stack == 0 and smem <= 227 * 1024
        bad += not fits
        print(f"{'ok  ' if fits else 'FAIL'} config {name}: {regs} registers, {stack} B spilled, "
              f"{smem // 1024} KiB shared")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
