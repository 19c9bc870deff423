"""Triton FP8 kernels against the torch reference (and cuBLAS block-scaled GEMM on a GPU).

Without CUDA the kernels run under the Triton interpreter: TRITON_INTERPRET=1 is set here,
before triton is imported, so keep the shapes small. Operands are quantised with torch so the
GEMM inputs are bit-exact; the interpreter's own fp32→e4m3 cast is inexact (it can land one
E4M3 step away), so the quantise kernels are held to "scales exact, values within one step".
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from dsv3 import fp8  # noqa: E402
from dsv3.fp8 import triton_kernels as tk  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
needs_fp8_gpu = pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability() < (8, 9), reason="needs a CUDA GPU, sm89+")
if CUDA and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("Triton FP8 kernels need sm89+", allow_module_level=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 300),), generator=g)] *= 500
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 30),), generator=g)] *= 1e-6
    return x.to(DEV)


BF16_TOL = 2 ** -8 if CUDA else 2 ** -7    # the interpreter truncates fp32→bf16


def _check_quant_kernel(fn, x_ref, *args, pow2=False):
    """Scales bit-exact; the kernel's pre-cast values, cast by torch, give torch's q exactly;
    its own E4M3 output equals torch's on a GPU (mostly, under the interpreter)."""
    q_ref, s_ref = fp8.quantize_activation(x_ref, pow2_scale=pow2)
    q, s = fn(*args, pow2_scale=pow2)
    assert q.shape == q_ref.shape and s.shape == s_ref.shape and q.dtype == torch.float8_e4m3fn
    assert torch.equal(s, s_ref)
    y, s32 = fn(*args, pow2_scale=pow2, q_dtype=torch.float32)
    assert torch.equal(s32, s) and y.abs().max() <= 448
    assert torch.equal(y.to(torch.float8_e4m3fn).float(), q_ref.float())
    same = (q.float() == q_ref.float()).float().mean()
    assert same == 1.0 if CUDA else same > 0.9


@pytest.mark.parametrize("shape,pow2", [((40, 300), False), ((3, 7, 256), True), ((1, 64), False)])
def test_act_quant_kernel_matches_torch(shape, pow2):
    x = _data(shape, seed=shape[-1])
    _check_quant_kernel(tk.act_quant, x, x, pow2=pow2)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_act_quant_kernel_nonfinite_and_zero_tiles():
    x = _data((4, 384), seed=9)
    x[0, 3] = float("nan")
    x[1, 200] = float("inf")
    x[2, 256:] = 0
    q_ref, s_ref = fp8.quantize_activation(x)
    q, s = tk.act_quant(x)
    assert torch.isnan(s[0, 0]) and s[1, 1] == float("inf")
    fin = torch.isfinite(s_ref)
    assert torch.equal(torch.isfinite(s), fin) and torch.equal(s[fin], s_ref[fin])
    assert fp8.has_nonfinite(s)
    assert (q[2, 256:].float() == 0).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_swiglu_quant_kernel_matches_torch():
    g, u = _data((24, 200), 1), _data((24, 200), 2)
    h = torch.nn.functional.silu(g.float()) * u.float()
    # the kernel's silu (its own exp) may differ from torch's by an ulp: scales to 1e-6,
    # values equal except for the rare element that sits on an E4M3 rounding boundary
    q_ref, s_ref = fp8.quantize_activation(h)
    q, s = tk.swiglu_quant(g, u)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    y, _ = tk.swiglu_quant(g, u, q_dtype=torch.float32)
    assert ((y.to(torch.float8_e4m3fn).float() != q_ref.float()).float().mean()) < 0.01


def _operands(m, n, k, seed, row=False, e=None):
    a_q, a_s = fp8.quantize_activation(_data((m, k), seed))
    shape = (n, k) if e is None else (e, n, k)
    b = _data(shape, seed + 1)
    b_q, b_s = fp8.quantize_activation(b) if row else fp8.quantize_weight(b)
    return a_q, a_s, b_q, b_s


def _assert_gemm_close(out, ref):
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < 1e-5, err


@pytest.mark.parametrize("m,n,k,row", [(40, 70, 300, False), (64, 96, 256, True),
                                       (33, 130, 384, False), (1, 48, 128, False)])
def test_triton_gemm_matches_torch_reference(m, n, k, row):
    a_q, a_s, b_q, b_s = _operands(m, n, k, seed=m + n + k, row=row)
    ref = fp8.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="torch")
    out = fp8.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="triton")
    _assert_gemm_close(out, ref)
    bf = tk.fp8_gemm(a_q, a_s, b_q, b_s, torch.bfloat16, b_row_scales=row)
    assert bf.dtype == torch.bfloat16
    assert ((bf.float() - ref).abs() <= ref.abs() * BF16_TOL + 1e-30).all()


def test_triton_gemm_transposed_weight_operand():
    # Dgrad feeds Wᵀ with the transposed block scales; non-contiguous operands use strides.
    a_q, a_s, b_q, b_s = _operands(32, 160, 256, seed=5)
    bt_q, bt_s = b_q.t(), b_s.t()                          # [K, N] as a [N', K'] = [256, 160]
    d_q, d_s = fp8.quantize_activation(_data((32, 160), 6))
    ref = fp8.fp8_gemm(d_q, d_s, bt_q.contiguous(), bt_s.contiguous(), torch.float32, "torch")
    out = tk.fp8_gemm(d_q, d_s, bt_q, bt_s, torch.float32)
    _assert_gemm_close(out, ref)


@pytest.mark.parametrize("counts,row", [([10, 0, 37], False), ([33, 1, 0, 64], True)])
def test_triton_grouped_gemm_matches_torch_reference(counts, row):
    e, n, k = len(counts), 48, 256
    a_q, a_s, b_q, b_s = _operands(sum(counts), n, k, seed=sum(counts), row=row, e=e)
    ref = fp8.fp8_grouped_gemm(a_q, a_s, b_q, b_s, counts=counts, out_dtype=torch.float32,
                               backend="torch")
    out = fp8.fp8_grouped_gemm(a_q, a_s, b_q, b_s, counts=counts, out_dtype=torch.float32,
                               backend="triton")
    _assert_gemm_close(out, ref)


def test_fp8_linear_on_triton_backend_matches_torch_backend():
    x = _data((48, 256), 11).requires_grad_(True)
    lin_t = fp8.FP8Linear(256, 160, backend="triton").to(DEV)
    lin_r = fp8.FP8Linear(256, 160, backend="torch").to(DEV)
    with torch.no_grad():
        lin_r.weight.copy_(lin_t.weight)
    dy = _data((48, 160), 12)
    x2 = x.detach().clone().requires_grad_(True)
    y_t, y_r = lin_t(x), lin_r(x2)
    y_t.backward(dy)
    y_r.backward(dy)
    _assert_gemm_close(y_t, y_r)
    _assert_gemm_close(x.grad, x2.grad)
    _assert_gemm_close(lin_t.weight.grad, lin_r.weight.grad)


@needs_fp8_gpu
def test_auto_backend_on_gpu_matches_reference():
    for row in (False, True):
        a_q, a_s, b_q, b_s = _operands(256, 512, 1024, seed=21, row=row)
        ref = fp8.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="torch")
        for backend in fp8.available_backends(DEV):
            try:
                out = fp8.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend=backend)
            except RuntimeError:
                assert backend == "scaled_mm"      # probe said cuBLAS cannot do it here
                continue
            _assert_gemm_close(out, ref)
        _assert_gemm_close(fp8.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32), ref)
