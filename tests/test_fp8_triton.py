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


# the interpreter sums in FP32; a GPU's FP8 MMA keeps fewer accumulator bits within a 128-group
GEMM_TOL = fp8.gemm.FP8_MMA_REL_TOL if CUDA else 1e-5


def _assert_gemm_close(out, ref):
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < GEMM_TOL, err


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



@pytest.mark.parametrize("m,n,k,row", [(40, 64, 256, False), (33, 160, 272, False), (64, 96, 256, True)])
def test_tma_and_pointer_gemm_kernels_agree_with_reference(m, n, k, row):
    """Both dense kernels on TMA-legal operands (K and N rows 16-byte aligned; K not a multiple of
    128 where TMA's zero fill stands in for the masks), and the activation scales as the Triton
    quantiser stores them (group-major)."""
    a_q, a_s, b_q, b_s = _operands(m, n, k, seed=3 * m + n, row=row)
    a_s = a_s.t().contiguous().t()                      # [M, G] stored group-major, like act_quant's
    ref = fp8.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="torch")
    assert tk.gemm_uses_tma(a_q, b_q, ref)
    for tma in (True, False):
        _assert_gemm_close(tk.fp8_gemm(a_q, a_s, b_q, b_s, torch.float32, b_row_scales=row, tma=tma), ref)


def test_tma_gemm_refuses_unaligned_operands_and_auto_takes_pointer_kernel():
    a_q, a_s, b_q, b_s = _operands(8, 48, 300, seed=9)         # 300-byte rows: not TMA-legal
    assert not tk.gemm_uses_tma(a_q, b_q, torch.empty(8, 48))
    with pytest.raises(ValueError, match="TMA"):
        tk.fp8_gemm(a_q, a_s, b_q, b_s, torch.float32, tma=True)
    ref = fp8.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="torch")
    _assert_gemm_close(tk.fp8_gemm(a_q, a_s, b_q, b_s, torch.float32), ref)


def test_tma_gemm_transposed_weight_operand():
    """Dgrad's Wᵀ as a strided view: the TMA kernel describes its [K, N] storage (B_KN)."""
    a_q, a_s, b_q, b_s = _operands(32, 160, 256, seed=15)
    d_q, d_s = fp8.quantize_activation(_data((48, 160), 16))
    ref = fp8.fp8_gemm(d_q, d_s, b_q.t().contiguous(), b_s.t().contiguous(), torch.float32, "torch")
    _assert_gemm_close(tk.fp8_gemm(d_q, d_s, b_q.t(), b_s.t(), torch.float32, tma=True), ref)


@pytest.mark.parametrize("counts,row", [([10, 0, 37, 64], False), ([1, 70], True)])
def test_tma_grouped_gemm_matches_reference(counts, row):
    """A tiles that run past their expert read the next expert's rows (or TMA's zero fill): not stored."""
    e, n, k = len(counts), 64, 384
    a_q, a_s, b_q, b_s = _operands(sum(counts), n, k, seed=sum(counts) + 1, row=row, e=e)
    ref = fp8.fp8_grouped_gemm(a_q, a_s, b_q, b_s, counts=counts, out_dtype=torch.float32, backend="torch")
    segs = fp8.segment_bounds(counts)
    for tma in (True, False):
        _assert_gemm_close(tk.fp8_grouped_gemm(a_q, a_s, b_q, b_s, segs, torch.float32, b_row_scales=row,
                                               tma=tma), ref)


def test_tma_grouped_gemm_transposed_weights():
    """Grouped Dgrad: dy [T, N] @ (Wᵀ_e)ᵀ per expert, Wᵀ a strided view of W [E, N, K]."""
    counts, n, k = [70, 0, 33], 128, 192
    w = _data((3, n, k), 31)
    w_q, w_s = fp8.quantize_weight(w)
    d_q, d_s = fp8.quantize_activation(_data((sum(counts), n), 32))
    wt_q, wt_s = w_q.transpose(1, 2), w_s.transpose(1, 2)
    ref = fp8.fp8_grouped_gemm(d_q, d_s, wt_q.contiguous(), wt_s.contiguous(), counts=counts,
                               out_dtype=torch.float32, backend="torch")
    for tma in (True, False):
        _assert_gemm_close(tk.fp8_grouped_gemm(d_q, d_s, wt_q, wt_s, fp8.segment_bounds(counts), torch.float32,
                                               tma=tma), ref)

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


@pytest.mark.parametrize("shape,pow2", [((200, 300), False), ((3, 130, 256), True), ((1, 5), False)])
def test_weight_quant_kernel_matches_torch(shape, pow2):
    w = _data(shape, 31)
    q_ref, s_ref = fp8.quantize_weight(w, pow2_scale=pow2)
    q, s = tk.weight_quant(w, pow2_scale=pow2)
    assert q.shape == q_ref.shape and q.dtype == torch.float8_e4m3fn and torch.equal(s, s_ref)
    y, _ = tk.weight_quant(w, pow2_scale=pow2, q_dtype=torch.float32)
    assert torch.equal(y.to(torch.float8_e4m3fn).float(), q_ref.float())


def test_weight_quant_kernel_nonfinite_blocks():
    w = _data((256, 256), 32)
    w[3, 4], w[200, 200] = float("nan"), float("inf")
    _, s_ref = fp8.quantize_weight(w)
    _, s = tk.weight_quant(w)
    assert torch.equal(s.isnan(), s_ref.isnan()) and torch.equal(s.isinf(), s_ref.isinf())
    assert torch.equal(s[s.isfinite()], s_ref[s_ref.isfinite()])


@pytest.mark.parametrize("t,k,pow2", [(300, 256, False), (77, 200, True), (128, 128, False)])
def test_act_quant_t_kernel_matches_torch(t, k, pow2):
    x = _data((t, k), 33)
    q_ref, s_ref = fp8.quantize_activation_t(x, pow2_scale=pow2)
    q, s = tk.act_quant_t(x, pow2_scale=pow2)
    assert q.shape == q_ref.shape == (k, t) and torch.equal(s, s_ref)
    y, _ = tk.act_quant_t(x, pow2_scale=pow2, q_dtype=torch.float32)
    assert torch.equal(y.to(torch.float8_e4m3fn).float(), q_ref.float())
    # from the FP8 activation cache: dequantised on load = torch's dequantise → transpose → quantise
    x_q, x_s = fp8.quantize_activation(x)
    q_ref, s_ref = fp8.quantize_activation_t(fp8.dequantize_activation(x_q, x_s))
    y, s = tk.act_quant_t(x_q, x_s, q_dtype=torch.float32)
    assert torch.equal(s, s_ref) and torch.equal(y.to(torch.float8_e4m3fn).float(), q_ref.float())


def test_act_quant_t_segments_start_aligned_tiles_with_zero_padding():
    counts = [130, 0, 5, 128]
    segs = fp8.segment_bounds(counts)
    x = _data((sum(counts), 160), 34)
    y, s = tk.act_quant_t(x, segments=segs, q_dtype=torch.float32)
    _, width, col0, ncols = tk.token_tiles(segs, x.shape[0])
    assert ncols == [256, 0, 128, 128] and width == 512 and y.shape == (160, 512)
    for (s0, s1), c0, nc in zip(segs, col0, ncols):
        if s1 == s0:
            continue
        q_ref, s_ref = fp8.quantize_activation_t(x[s0:s1])
        assert torch.equal(s[:, c0 // 128:(c0 + nc) // 128], s_ref)
        assert torch.equal(y[:, c0:c0 + s1 - s0].to(torch.float8_e4m3fn).float(), q_ref.float())
        assert (y[:, c0 + s1 - s0:c0 + nc] == 0).all()


def test_kgrouped_gemm_matches_per_group_reference():
    # operands quantised by torch (bit-exact inputs), laid out as act_quant_t lays out segments
    counts = [130, 0, 37, 256]
    segs = fp8.segment_bounds(counts)
    _, width, col0, ncols = tk.token_tiles(segs, sum(counts))
    m, n = 96, 160
    parts = {"a": (m, 37), "b": (n, 38)}
    ops = {}
    for name, (rows, seed) in parts.items():
        q = torch.zeros(rows, width, dtype=torch.float8_e4m3fn, device=DEV)
        s = torch.ones(rows, width // 128, device=DEV)
        for (s0, s1), c0 in zip(segs, col0):
            if s1 > s0:
                q_e, s_e = fp8.quantize_activation(_data((rows, s1 - s0), seed + s0))
                q[:, c0:c0 + s1 - s0], s[:, c0 // 128:c0 // 128 + s_e.shape[1]] = q_e, s_e
        ops[name] = (q, s)
    out = tk.kgrouped_gemm(*ops["a"], *ops["b"], col0, ncols)
    assert out.shape == (4, m, n) and (out[1] == 0).all()
    for e, ((s0, s1), c0, nc) in enumerate(zip(segs, col0, ncols)):
        if s1 > s0:
            ref = fp8.fp8_gemm(ops["a"][0][:, c0:c0 + nc], ops["a"][1][:, c0 // 128:(c0 + nc) // 128],
                               ops["b"][0][:, c0:c0 + nc], ops["b"][1][:, c0 // 128:(c0 + nc) // 128],
                               torch.float32, "torch")
            _assert_gemm_close(out[e], ref)


def test_grouped_wgrad_equals_each_experts_dense_wgrad():
    from dsv3.fp8.linear import _wgrad
    counts = [130, 0, 37, 256]
    segs = fp8.segment_bounds(counts)
    n, k = 96, 256
    dy = _data((sum(counts), n), 35)
    x_q, x_s = fp8.quantize_activation(_data((sum(counts), k), 36))
    dw = tk.grouped_wgrad(dy, x_q, x_s, segs)
    assert dw.shape == (4, n, k) and dw.dtype == torch.float32 and (dw[1] == 0).all()
    # the interpreter's own E4M3 cast of the transposed operands can land one step away
    tol = GEMM_TOL if CUDA else 1e-2
    for e, (s0, s1) in enumerate(segs):
        if s1 > s0:
            ref = _wgrad(dy[s0:s1], x_q[s0:s1], x_s[s0:s1], "torch")
            err = (dw[e] - ref).abs().max() / ref.abs().max()
            assert err < tol, (e, err)


def test_fp8_linears_triton_wiring_matches_torch_backend(monkeypatch):
    """The CUDA-only Triton route of the FP8 linears (weight quantiser, transposed Dgrad operand as a
    strided view, token-direction quantiser, one K-grouped Wgrad launch for all experts), forced on
    here, against the torch backend: same outputs and gradients within the interpreter's E4M3 cast."""
    from types import SimpleNamespace

    from dsv3.fp8 import linear
    route = tk
    if not CUDA:     # the kernels' pre-cast values cast by torch: the interpreter's E4M3 cast is inexact
        def cast(fn):
            def run(*args, **kw):
                q, s = fn(*args, q_dtype=torch.float32, **kw)
                return q.to(torch.float8_e4m3fn), s
            return run

        def grouped_wgrad(dy, x_q, x_s, segs):
            _, _, col0, ncols = tk.token_tiles(segs, dy.shape[0])
            return tk.kgrouped_gemm(*route.act_quant_t(dy, segments=segs),
                                    *route.act_quant_t(x_q, x_s, segments=segs), col0, ncols)
        route = SimpleNamespace(act_quant=cast(tk.act_quant), weight_quant=cast(tk.weight_quant),
                                act_quant_t=cast(tk.act_quant_t), grouped_wgrad=grouped_wgrad)
        monkeypatch.setattr(linear, "_triton", lambda t, backend: route if backend == "triton" else None)
    tol = GEMM_TOL

    def close(a, b):
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err < tol, err

    counts = [70, 0, 129, 33]
    x = _data((sum(counts), 256), 41)
    w = _data((4, 192, 256), 42) * 0.05
    dy = _data((sum(counts), 192), 43)
    grads = {}
    for backend in ("triton", "torch"):
        xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fp8.fp8_grouped_linear(xb, wb, counts=counts, backend=backend)
        y.backward(dy)
        grads[backend] = (y.detach(), xb.grad, wb.grad)
    for a, b in zip(grads["triton"], grads["torch"]):
        close(a, b)
    assert (grads["triton"][2][1] == 0).all()

    lin = {b: fp8.FP8Linear(256, 160, backend=b).to(DEV) for b in ("triton", "torch")}
    with torch.no_grad():
        lin["torch"].weight.copy_(lin["triton"].weight)
    xs = {b: x[:100].clone().requires_grad_(True) for b in lin}
    for b in lin:
        lin[b](xs[b]).backward(dy[:100, :160])
    close(xs["triton"].grad, xs["torch"].grad)
    close(lin["triton"].weight.grad, lin["torch"].weight.grad)


# ------------------------------------------------------------------------------------------
# Device-side expert schedules: the experts' offsets as a device tensor, never read on the host
# ------------------------------------------------------------------------------------------

def _offsets(counts, dtype=torch.int32):
    return torch.tensor([0] + counts, dtype=dtype, device=DEV).cumsum(0).to(dtype)


# empty experts (first, middle, last), counts not multiples of the tile (32 here, 64/128 on a GPU),
# and more slack in the launch bound than real tiles (many empty experts)
SCHED_COUNTS = [[0, 45, 0, 0, 33, 1], [70, 0, 129, 33], [5, 0, 0, 0, 0, 0, 0, 64]]


@pytest.mark.parametrize("counts", SCHED_COUNTS)
@pytest.mark.parametrize("row", [False, True])
def test_grouped_gemm_device_offsets_match_host_schedule_and_reference(counts, row):
    """Both grouped kernels (pointer, TMA) scheduled from device offsets: the reference's numbers, and
    bit for bit the host-segment launch's (the same tiles, found on the device)."""
    e, n, k = len(counts), 64, 256
    a_q, a_s, b_q, b_s = _operands(sum(counts), n, k, seed=sum(counts) + 7, row=row, e=e)
    ref = fp8.fp8_grouped_gemm(a_q, a_s, b_q, b_s, counts=counts, out_dtype=torch.float32, backend="torch")
    segs = fp8.segment_bounds(counts)
    bound = tk.tile_bound(sum(counts), e, 32)
    assert bound >= sum(-(-c // 32) for c in counts)
    for tma in (True, False):
        host = tk.fp8_grouped_gemm(a_q, a_s, b_q, b_s, segs, torch.float32, b_row_scales=row, tma=tma)
        for offs in (_offsets(counts), _offsets(counts, torch.int64)):
            dev = tk.fp8_grouped_gemm(a_q, a_s, b_q, b_s, offs, torch.float32, b_row_scales=row, tma=tma)
            assert torch.equal(dev, host)
            _assert_gemm_close(dev, ref)
    # the dispatcher with tensor counts / offsets takes the device schedule on the Triton backend
    for kw in ({"counts": torch.tensor(counts, device=DEV)}, {"offsets": _offsets(counts, torch.int64)}):
        out = fp8.fp8_grouped_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="triton", **kw)
        assert torch.equal(out, host)
        # and the torch reference reads them on the host
        assert torch.equal(fp8.fp8_grouped_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32,
                                                backend="torch", **kw), ref)


def test_grouped_gemm_device_offsets_transposed_weights():
    """Grouped Dgrad from device offsets: Wᵀ a strided view, both kernels."""
    counts, n, k = [70, 0, 33, 1], 128, 192
    w_q, w_s = fp8.quantize_weight(_data((4, n, k), 51))
    d_q, d_s = fp8.quantize_activation(_data((sum(counts), n), 52))
    wt_q, wt_s = w_q.transpose(1, 2), w_s.transpose(1, 2)
    ref = fp8.fp8_grouped_gemm(d_q, d_s, wt_q.contiguous(), wt_s.contiguous(), counts=counts,
                               out_dtype=torch.float32, backend="torch")
    for tma in (True, False):
        out = tk.fp8_grouped_gemm(d_q, d_s, wt_q, wt_s, _offsets(counts), torch.float32, tma=tma)
        assert torch.equal(out, tk.fp8_grouped_gemm(d_q, d_s, wt_q, wt_s, fp8.segment_bounds(counts),
                                                    torch.float32, tma=tma))
        _assert_gemm_close(out, ref)


def test_act_quant_t_device_offsets_bound_width_same_columns():
    """Device offsets: width = the host-known bound, each expert's tiles at the same columns as with
    host segments (expert_columns = token_tiles' col0/ncols), the columns past them zero."""
    counts = [130, 0, 5, 128, 0, 77]
    segs = fp8.segment_bounds(counts)
    x = _data((sum(counts), 160), 53)
    x_q, x_s = fp8.quantize_activation(x)
    _, width, col0, ncols = tk.token_tiles(segs, x.shape[0])
    offs = _offsets(counts)
    c0_t, nc_t = tk.expert_columns(offs)
    assert c0_t.tolist() == col0 and nc_t.tolist() == ncols
    bound = tk.tile_bound(sum(counts), len(counts), 128) * 128
    assert bound >= width
    for args in ((x,), (x_q, x_s)):
        y_h, s_h = tk.act_quant_t(*args, segments=segs, q_dtype=torch.float32)
        y_d, s_d = tk.act_quant_t(*args, segments=offs, q_dtype=torch.float32)
        assert y_d.shape == (160, bound) and s_d.shape == (160, bound // 128)
        assert torch.equal(y_d[:, :width], y_h) and (y_d[:, width:] == 0).all()
        assert torch.equal(s_d[:, :width // 128], s_h)
        q_d, _ = tk.act_quant_t(*args, segments=offs)
        assert q_d.dtype == torch.float8_e4m3fn and q_d.shape == y_d.shape


def test_kgrouped_gemm_and_grouped_wgrad_from_device_offsets():
    """The K-grouped GEMM reading each expert's columns from device tensors, and the whole Wgrad from
    device offsets: bit for bit the host-scheduled result (itself held to the reference above)."""
    counts = [130, 0, 37, 256, 1, 0]
    segs = fp8.segment_bounds(counts)
    n, k = 96, 256
    dy = _data((sum(counts), n), 54)
    x_q, x_s = fp8.quantize_activation(_data((sum(counts), k), 55))
    offs = _offsets(counts)
    host = tk.grouped_wgrad(dy, x_q, x_s, segs)
    dev = tk.grouped_wgrad(dy, x_q, x_s, offs)
    assert dev.shape == (6, n, k) and (dev[1] == 0).all() and (dev[5] == 0).all()
    assert torch.equal(dev, host)
    # kgrouped_gemm on its own: operands of the bound width, ranges as device tensors
    a = tk.act_quant_t(dy, segments=offs)
    b = tk.act_quant_t(x_q, x_s, segments=offs)
    _, _, col0, ncols = tk.token_tiles(segs, sum(counts))
    assert torch.equal(tk.kgrouped_gemm(*a, *b, *tk.expert_columns(offs)),
                       tk.kgrouped_gemm(*a, *b, col0, ncols))


class _HostReads:
    """Counts, while active, reads of tensor data by the host (what would be a device→host sync on a
    GPU): the aten ops that need one (item/_local_scalar_dense, nonzero, masked_select, bincount, unique,
    boolean-mask indexing) and Tensor.tolist / item / __int__ / __float__ / __bool__ / __index__ / numpy.
    Under the interpreter the kernels themselves run on the CPU through numpy: their launches are not
    counted (on a GPU they are launches), so the count is the Python side's."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode
        import triton.runtime.interpreter as interp

        aten = torch.ops.aten
        sync_ops = {aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default,
                    aten.masked_select.default, aten.bincount.default, aten._unique2.default}
        reads, state = [], {"on": False, "kernel": 0}
        self.reads, self.state, self.launches = reads, state, 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if state["on"] and not state["kernel"]:
                    bool_index = func in (aten.index.Tensor, aten.index_put_.default) and any(
                        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
                    if func in sync_ops or bool_index:
                        reads.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy"):
            real = getattr(torch.Tensor, name)

            def spy(t, *a, _real=real, _name=name, **kw):
                if state["on"] and not state["kernel"]:
                    reads.append(_name)
                return _real(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, spy)
        real_call = interp.GridExecutor.__call__
        counter = self

        def launch(ex, *a, **kw):
            state["kernel"] += 1
            counter.launches += state["on"]
            try:
                return real_call(ex, *a, **kw)
            finally:
                state["kernel"] -= 1
        monkeypatch.setattr(interp.GridExecutor, "__call__", launch)

    def __enter__(self):
        self.reads.clear()
        self.launches = 0
        self.mode.__enter__()
        self.state["on"] = True
        return self

    def __exit__(self, *exc):
        self.state["on"] = False
        return self.mode.__exit__(*exc)


def _triton_route(monkeypatch):
    """Force the CUDA-only Triton route of the FP8 linears onto the interpreter (as the wiring test
    above does), the quantisers' pre-cast values cast by torch (the interpreter's E4M3 cast is inexact)."""
    from types import SimpleNamespace

    from dsv3.fp8 import linear
    if CUDA:
        return

    def cast(fn):
        def run(*args, **kw):
            q, s = fn(*args, q_dtype=torch.float32, **kw)
            return q.to(torch.float8_e4m3fn), s
        return run
    qt = cast(tk.act_quant_t)

    def grouped_wgrad(dy, x_q, x_s, segs):
        cols = (tk.expert_columns(tk.expert_offsets(segs, dy.device)) if torch.is_tensor(segs)
                else tk.token_tiles(segs, dy.shape[0])[2:])
        return tk.kgrouped_gemm(*qt(dy, segments=segs), *qt(x_q, x_s, segments=segs), *cols)
    route = SimpleNamespace(act_quant=cast(tk.act_quant), weight_quant=cast(tk.weight_quant),
                            act_quant_t=qt, grouped_wgrad=grouped_wgrad)
    monkeypatch.setattr(linear, "_triton", lambda t, backend: route if backend == "triton" else None)


def test_triton_fp8_grouped_forward_backward_reads_nothing_on_the_host(monkeypatch):
    """fp8_grouped_linear with device counts on the Triton route: forward (quantisers, grouped GEMM),
    Dgrad (grouped GEMM over Wᵀ) and Wgrad (token-direction quantisers, K-grouped GEMM) schedule every
    kernel on the device — no host read of device data — and give bit for bit what host counts give."""
    from dsv3.fp8 import linear
    _triton_route(monkeypatch)
    hr = _HostReads(monkeypatch)
    counts = [70, 0, 129, 33, 0]
    x = _data((sum(counts), 256), 56)
    w = _data((5, 192, 256), 57) * 0.05
    dy = _data((sum(counts), 192), 58)
    res = {}
    for name, c in (("device", torch.tensor(counts, device=DEV)), ("host", counts)):
        for _ in range(2 if CUDA else 1):      # on a GPU the first call autotunes (timings read back)
            xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            with hr:
                y = fp8.fp8_grouped_linear(xb, wb, counts=c, backend="triton")
                y.backward(dy)
        res[name] = (y.detach(), xb.grad, wb.grad, list(hr.reads), hr.launches)
    *dev, reads, launches = res["device"]
    assert reads == [] and (CUDA or launches >= 7), (reads, launches)
    assert linear.grouped_on_device(x, "triton")
    for a, b in zip(dev, res["host"][:3]):
        assert torch.equal(a, b)
    assert (dev[2][1] == 0).all() and (dev[2][4] == 0).all()


def test_fp8_experts_on_triton_route_read_nothing_on_the_host(monkeypatch):
    """The FP8 experts as models use them — convert_to_fp8's experts (training: forward and backward)
    and the FP8 inference experts — called with device counts: no host read on the Triton route; the
    torch reference route reads the counts once (and gives the same numbers within the interpreter's
    rounding)."""
    from dsv3.fp8.inference import FP8InferenceExperts
    from dsv3.fp8.model import convert_to_fp8
    from dsv3.model.moe import GroupedExperts
    _triton_route(monkeypatch)
    hr = _HostReads(monkeypatch)
    torch.manual_seed(59)
    experts = GroupedExperts(6, 256, 128).to(DEV)
    with torch.no_grad():
        experts.w13.normal_(0, 0.05)
        experts.w2.normal_(0, 0.05)
    counts = torch.tensor([40, 0, 33, 1, 0, 70], device=DEV)
    x = _data((int(counts.sum()), 256), 60)
    out = {}
    for backend in ("triton", "torch"):
        m = convert_to_fp8(torch.nn.ModuleDict({"experts": GroupedExperts(6, 256, 128)}).to(DEV),
                           backend=backend)["experts"]
        assert type(m).__name__ == "FP8GroupedExperts"
        m.load_state_dict(experts.state_dict())
        for _ in range(2 if CUDA else 1):      # on a GPU the first call autotunes
            xb = x.clone().requires_grad_(True)
            m.zero_grad()
            with hr:
                y = m(xb, counts)
                y.backward(torch.ones_like(y))
        out[backend] = (y.detach(), xb.grad, m.w13.grad, m.w2.grad, list(hr.reads))
    assert out["triton"][-1] == [] and out["torch"][-1] == ["tolist"]
    for a, b in zip(out["triton"][:-1], out["torch"][:-1]):
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err < GEMM_TOL, err
    for backend, expect in (("triton", []), ("torch", ["tolist"])):
        inf = FP8InferenceExperts.from_experts(experts, backend=backend)
        for _ in range(2 if CUDA else 1):
            with hr, torch.no_grad():
                inf(x, counts)
        assert hr.reads == expect, (backend, hr.reads)


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs kernels as Python and accepts code Triton's compiler rejects: compile the
    FP8 kernels (device schedules included) for sm90 in a process without the interpreter, and every
    autotune config of the GEMMs as a launch specialises it, none spilling registers."""
    import subprocess
    import sys
    from pathlib import Path

    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("no ptxas bundled with triton")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root / "src")
    run = subprocess.run([sys.executable, "-W", "ignore", str(root / "tests" / "triton_compile_sm90.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FAIL" not in run.stdout and "config dense TMA" in run.stdout and "config K-grouped" in run.stdout, run.stdout
