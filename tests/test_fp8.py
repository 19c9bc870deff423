"""FP8 fine-grained quantisation, block-scaled GEMM (torch reference) and FP8 Linear layers.

References are independent of the code under test: per-tile amax computed tile by tile, FP64
products of the dequantised operands, FP64 autograd of the unquantised computation, and error
bounds derived from the E4M3 format (3 mantissa bits: round-to-nearest relative error ≤ 2^-4 for
normals; subnormal spacing 2^-9 of the scale, so absolute error ≤ 2^-10·s).
"""

import math
import subprocess
import sys

import pytest
import torch

from dsv3 import fp8

E4M3_REL = 2.0 ** -4          # half an ulp of a 3-bit mantissa
E4M3_ABS = 2.0 ** -10         # half the subnormal spacing, in units of the tile scale


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _nasty(shape, seed, outliers=True, tiny=True):
    """Gaussian data with a few huge outliers and a band of tiny values."""
    g = _gen(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    flat = x.view(-1)
    if outliers:
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=g)
        flat[idx] *= 1e3
    if tiny:
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 20),), generator=g)
        flat[idx] *= 1e-6
    return x.float()


def _tile_scales_last(x, block=128):
    """Independent 1×128 scales: loop over tiles of the last dim."""
    k = x.shape[-1]
    cols = [x[..., j:j + block].double().abs().amax(dim=-1) for j in range(0, k, block)]
    amax = torch.stack(cols, dim=-1)
    return (torch.clamp(amax, min=fp8.AMAX_FLOOR) / 448.0).float()


def _expand_last(s, k, block=128):
    return s.repeat_interleave(block, dim=-1)[..., :k]


def _quant_bound(x, s_full):
    return x.double().abs() * E4M3_REL + s_full.double() * E4M3_ABS


# ------------------------------------------------------------------------------------------
# Quantisation
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 128), (3, 300), (2, 5, 1000), (4, 1), (1, 129)])
def test_activation_quant_scales_and_error_bound(shape):
    x = _nasty(shape, seed=sum(shape))
    q, s = fp8.quantize_activation(x)
    k = shape[-1]
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], math.ceil(k / 128))
    torch.testing.assert_close(s, _tile_scales_last(x), rtol=2 ** -23, atol=0)
    qf = q.float()
    assert torch.isfinite(qf).all() and qf.abs().max() <= 448
    err = (fp8.dequantize_activation(q, s).double() - x.double()).abs()
    assert (err <= _quant_bound(x, _expand_last(s, k))).all()
    # the element that sets the amax of a tile lands on ±448 (full use of the range)
    tiles = torch.nn.functional.pad(qf.abs(), (0, (-k) % 128)).reshape(*shape[:-1], -1, 128)
    above_floor = s > fp8.AMAX_FLOOR / 448 * 1.0001
    assert (tiles.amax(-1)[above_floor] == 448).all()


def test_partial_last_tile_uses_only_its_elements():
    x = torch.randn(4, 300, generator=_gen(1)) * 100
    x[:, 256:] = torch.randn(4, 44, generator=_gen(2)) * 0.01      # small partial tile
    q, s = fp8.quantize_activation(x)
    expect = x[:, 256:].abs().amax(-1) / 448
    torch.testing.assert_close(s[:, 2], expect, rtol=2 ** -23, atol=0)
    rel = (fp8.dequantize_activation(q, s)[:, 256:] - x[:, 256:]).abs() / x[:, 256:].abs()
    assert rel.max() <= E4M3_REL + 1e-6    # fine resolution kept in the partial tile


def test_zero_and_tiny_tiles_use_the_amax_floor():
    x = torch.zeros(2, 256)
    x[1, 128:] = 1e-9
    q, s = fp8.quantize_activation(x)
    assert torch.all(s == torch.tensor(fp8.AMAX_FLOOR, dtype=torch.float32) / 448)
    assert (q.float()[0] == 0).all()
    deq = fp8.dequantize_activation(q, s)
    assert (deq - x).abs().max() <= fp8.AMAX_FLOOR / 448 * E4M3_ABS


def test_pow2_scales_are_powers_of_two_covering_amax():
    x = _nasty((6, 384), seed=3)
    q, s = fp8.quantize_activation(x, pow2_scale=True)
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all()
    exact = _tile_scales_last(x)
    assert (s >= exact).all() and (s < 2 * exact).all()
    assert q.float().abs().max() <= 448
    err = (fp8.dequantize_activation(q, s).double() - x.double()).abs()
    assert (err <= _quant_bound(x, _expand_last(s, 384))).all()
    wq, ws = fp8.quantize_weight(x, pow2_scale=True)
    assert (torch.frexp(ws)[0] == 0.5).all()


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (1, 5), (3, 130, 129)])
def test_weight_quant_blocks_and_error_bound(shape):
    w = _nasty(shape, seed=shape[-1])
    q, s = fp8.quantize_weight(w)
    n, k = shape[-2:]
    assert q.shape == w.shape and s.shape == (*shape[:-2], math.ceil(n / 128), math.ceil(k / 128))
    for i in range(s.shape[-2]):
        for j in range(s.shape[-1]):
            blk = w[..., i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            amax = torch.clamp(blk.abs().amax(dim=(-2, -1)), min=fp8.AMAX_FLOOR)
            torch.testing.assert_close(s[..., i, j], amax / 448, rtol=2 ** -23, atol=0)
    s_full = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :n, :k]
    err = (fp8.dequantize_weight(q, s).double() - w.double()).abs()
    assert (err <= _quant_bound(w, s_full)).all()


def test_token_direction_quant_is_the_transposed_tiling():
    x = _nasty((200, 130), seed=5)
    q, s = fp8.quantize_activation_t(x)
    assert q.shape == (130, 200) and s.shape == (130, 2) and q.is_contiguous()
    for t0 in (0, 128):                     # tile = one channel over 128 tokens
        amax = torch.clamp(x[t0:t0 + 128].abs().amax(0), min=fp8.AMAX_FLOOR)
        torch.testing.assert_close(s[:, t0 // 128], amax / 448, rtol=2 ** -23, atol=0)
    err = (fp8.dequantize_activation(q, s).T.double() - x.double()).abs()
    assert (err <= _quant_bound(x, _expand_last(s, 200).T)).all()


def test_nonfinite_inputs_poison_only_their_tile_scale():
    x = torch.randn(3, 512, generator=_gen(7))
    clean_q, clean_s = fp8.quantize_activation(x)
    x[0, 5] = float("nan")
    x[1, 300] = float("inf")
    x[2, 130] = -float("inf")
    x[2, 131] = float("nan")
    q, s = fp8.quantize_activation(x)
    assert math.isnan(s[0, 0]) and s[1, 2] == float("inf") and math.isnan(s[2, 1])
    bad = torch.zeros_like(s, dtype=torch.bool)
    bad[0, 0] = bad[1, 2] = bad[2, 1] = True
    assert torch.equal(s[~bad], clean_s[~bad])
    good_cols = ~_expand_last(bad, 512)
    assert torch.equal(q.float()[good_cols], clean_q.float()[good_cols])
    assert fp8.has_nonfinite(s) and not fp8.has_nonfinite(clean_s)
    w = torch.randn(200, 200)
    w[150, 10] = float("inf")
    _, ws = fp8.quantize_weight(w)
    assert fp8.has_nonfinite(ws) and ws[1, 0] == float("inf") and torch.isfinite(ws[0]).all()


def test_bad_shapes_raise():
    q, s = fp8.quantize_activation(torch.randn(4, 256))
    with pytest.raises(ValueError):
        fp8.dequantize_activation(q, s[:, :1])
    wq, ws = fp8.quantize_weight(torch.randn(256, 256))
    with pytest.raises(ValueError):
        fp8.dequantize_weight(wq, ws[:1])
    with pytest.raises(ValueError):
        fp8.quantize_activation(torch.randn(3, 0))
    with pytest.raises(ValueError):
        fp8.quantize_weight(torch.randn(5))


# ------------------------------------------------------------------------------------------
# GEMM (torch reference backend; Triton / cuBLAS are checked against it in test_fp8_triton.py)
# ------------------------------------------------------------------------------------------

def _operands(m, n, k, seed, b_kind="block"):
    a = _nasty((m, k), seed)
    b = _nasty((n, k), seed + 1)
    a_q, a_s = fp8.quantize_activation(a)
    b_q, b_s = fp8.quantize_activation(b) if b_kind == "row" else fp8.quantize_weight(b)
    a_d = fp8.dequantize_activation(a_q, a_s).double()
    b_d = (fp8.dequantize_activation(b_q, b_s) if b_kind == "row"
           else fp8.dequantize_weight(b_q, b_s)).double()
    return a_q, a_s, b_q, b_s, a_d, b_d


@pytest.mark.parametrize("m,n,k,b_kind", [
    (16, 24, 128, "block"), (33, 130, 300, "block"), (40, 64, 1024, "row"),
    (24, 200, 4096, "block"), (16, 16, 8192, "block"), (16, 48, 8192, "row"),
])
def test_gemm_matches_fp64_product_of_dequantised_operands(m, n, k, b_kind):
    a_q, a_s, b_q, b_s, a_d, b_d = _operands(m, n, k, seed=m + n + k, b_kind=b_kind)
    out = fp8.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, backend="torch")
    ref = a_d @ b_d.T
    err = (out.double() - ref).abs()
    assert err.max() / ref.abs().max() < 1e-5
    # element-wise, against the conditioning of each dot product (FP32 summation error)
    assert (err <= 1e-5 * (a_d.abs() @ b_d.abs().T) + 1e-30).all()


def test_gemm_output_dtypes_batch_dims_and_auto():
    a_q, a_s, b_q, b_s, a_d, b_d = _operands(12, 40, 256, seed=11)
    ref = (a_d @ b_d.T).float()
    out16 = fp8.fp8_gemm(a_q, a_s, b_q, b_s)             # default: bf16, auto → torch on CPU
    assert out16.dtype == torch.bfloat16
    assert ((out16.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-30).all()
    batched = fp8.fp8_gemm(a_q.reshape(3, 4, 256), a_s.reshape(3, 4, 2), b_q, b_s,
                           out_dtype=torch.float32)
    assert batched.shape == (3, 4, 40)
    torch.testing.assert_close(batched.reshape(12, 40), ref, rtol=1e-5, atol=0)
    assert fp8.available_backends("cpu") == ["torch"]
    # non-contiguous operands (a transposed weight, as Dgrad uses) are accepted
    w_q, w_s = fp8.quantize_weight(_nasty((256, 384), seed=13))
    d_q, d_s = fp8.quantize_activation(_nasty((12, 256), seed=14))
    ref_t = fp8.fp8_gemm(d_q, d_s, w_q.t().contiguous(), w_s.t().contiguous(), torch.float32)
    assert torch.equal(fp8.fp8_gemm(d_q, d_s, w_q.t(), w_s.t(), torch.float32), ref_t)


def test_gemm_rejects_bad_operands():
    a_q, a_s, b_q, b_s, *_ = _operands(8, 16, 256, seed=12)
    with pytest.raises(TypeError):
        fp8.fp8_gemm(a_q.float(), a_s, b_q, b_s)
    with pytest.raises(ValueError):
        fp8.fp8_gemm(a_q, a_s[:, :1], b_q, b_s)
    with pytest.raises(ValueError):
        fp8.fp8_gemm(a_q, a_s, b_q, torch.ones(3, 2))
    with pytest.raises(ValueError):
        fp8.fp8_gemm(a_q, a_s, b_q, b_s, backend="cutlass")


def test_grouped_gemm_matches_per_expert_fp64():
    counts = [5, 0, 40, 1, 130]
    t, n, k = sum(counts), 72, 384
    x = _nasty((t, k), seed=20)
    w = _nasty((len(counts), n, k), seed=21)
    x_q, x_s = fp8.quantize_activation(x)
    w_q, w_s = fp8.quantize_weight(w)
    x_d = fp8.dequantize_activation(x_q, x_s).double()
    w_d = fp8.dequantize_weight(w_q, w_s).double()
    out = fp8.fp8_grouped_gemm(x_q, x_s, w_q, w_s, counts=torch.tensor(counts),
                               out_dtype=torch.float32)
    offs = [0, 5, 5, 45, 46, 176]
    for e in range(len(counts)):
        ref = x_d[offs[e]:offs[e + 1]] @ w_d[e].T
        got = out[offs[e]:offs[e + 1]].double()
        assert ((got - ref).abs() <= 1e-5 * (x_d[offs[e]:offs[e + 1]].abs() @ w_d[e].abs().T)
                + 1e-30).all()
    again = fp8.fp8_grouped_gemm(x_q, x_s, w_q, w_s, offsets=offs, out_dtype=torch.float32)
    assert torch.equal(out, again)
    with pytest.raises(ValueError):
        fp8.fp8_grouped_gemm(x_q, x_s, w_q, w_s, counts=[5, 0, 40, 1, 129])
    with pytest.raises(ValueError):
        fp8.fp8_grouped_gemm(x_q, x_s, w_q, w_s, counts=counts[:4] + [129, 1])


# ------------------------------------------------------------------------------------------
# FP8 Linear: Fprop / Dgrad / Wgrad against FP64 autograd, with E4M3-derived bounds
# ------------------------------------------------------------------------------------------

def _tile_scale_full(x, dim_last=True):
    """Per-element 1×128 scale along the last dim (dim_last) or along dim 0 (token tiles)."""
    if dim_last:
        return _expand_last(_tile_scales_last(x), x.shape[-1]).double()
    return _expand_last(_tile_scales_last(x.T), x.shape[0]).T.double()


def _block_scale_full(w):
    n, k = w.shape
    s = torch.empty(math.ceil(n / 128), math.ceil(k / 128), dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double().abs().amax()
            s[i, j] = max(blk.item(), fp8.AMAX_FLOOR) / 448
    return s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]


def _prod_bound(a, ea, b, eb):
    """|Q(a)Q(b)ᵀ - abᵀ| ≤ ea|b|ᵀ + |a|ebᵀ + ea ebᵀ, plus FP32 summation slack."""
    a, b = a.double().abs(), b.double().abs()
    return ea @ b.T + a @ eb.T + ea @ eb.T + 1e-5 * (a + ea) @ (b + eb).T


def _linear_bounds(x, w, dy):
    """Worst-case |Δy|, |Δdx|, |ΔdW| of the FP8 Linear vs exact FP64."""
    ex = _quant_bound(x, _tile_scale_full(x))
    ew = _quant_bound(w, _block_scale_full(w))
    edy = _quant_bound(dy, _tile_scale_full(dy))
    b_y = _prod_bound(x, ex, w, ew)
    b_dx = _prod_bound(dy, edy, w.T, ew.T)
    # Wgrad: x goes through its FP8 cache (1×128 along K), then 128×1 tiles along T
    x1 = x.double().abs() + ex
    ex2 = ex + x1 * E4M3_REL + _tile_scale_full(x1.float(), dim_last=False) * E4M3_ABS
    edy_t = _quant_bound(dy, _tile_scale_full(dy, dim_last=False))
    b_dw = _prod_bound(dy.T, edy_t.T, x.T, ex2.T)
    return b_y, b_dx, b_dw


@pytest.mark.parametrize("t,k,n", [(64, 256, 192), (150, 300, 130)])
def test_fp8_linear_grads_match_fp64_autograd(t, k, n):
    x = _nasty((t, k), seed=t + 1)
    lin = fp8.FP8Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(_nasty((n, k), seed=t + 2, outliers=False) * 0.05)
    dy = _nasty((t, n), seed=t + 3)

    xr = x.clone().requires_grad_(True)
    y = lin(xr)
    y.backward(dy)
    x64 = x.double().requires_grad_(True)
    w64 = lin.weight.detach().double().requires_grad_(True)
    y64 = x64 @ w64.T
    y64.backward(dy.double())

    b_y, b_dx, b_dw = _linear_bounds(x, lin.weight.detach(), dy)
    for got, ref, bound in ((y, y64, b_y), (xr.grad, x64.grad, b_dx),
                            (lin.weight.grad, w64.grad, b_dw)):
        err = (got.detach().double() - ref.detach()).abs()
        assert (err <= bound).all(), (err / bound).max()
        rel = err.norm() / ref.norm()
        assert 0 < rel < 0.1          # really quantised, and the bound is not vacuous
    assert lin.weight.grad.dtype == torch.float32 and xr.grad.dtype == torch.float32


def test_fp8_linear_module_surface():
    lin = fp8.FP8Linear(256, 128)
    assert lin.weight.dtype == torch.float32 and lin.weight.shape == (128, 256)
    y = lin(torch.randn(2, 3, 256, dtype=torch.bfloat16))
    assert y.shape == (2, 3, 128) and y.dtype == torch.bfloat16
    ref = torch.nn.Linear(256, 128, bias=False)
    conv = fp8.FP8Linear.from_linear(ref)
    assert torch.equal(conv.weight, ref.weight)
    with pytest.raises(ValueError):
        fp8.FP8Linear(8, 8, bias=True)


def test_fp8_input_cache_halves_saved_activation_bytes():
    t, k, n = 512, 1024, 256
    lin = fp8.FP8Linear(k, n)
    x = torch.randn(t, k, dtype=torch.bfloat16, requires_grad=True)
    fp8_bytes = fp8.saved_activation_bytes(lin, x, exclude=[lin.weight])
    bf16 = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
    bf16_bytes = fp8.saved_activation_bytes(bf16, x, exclude=[bf16.weight])
    assert fp8_bytes == t * k + t * (k // 128) * 4           # e4m3 values + fp32 scales
    assert bf16_bytes == 2 * t * k
    assert fp8_bytes / bf16_bytes == pytest.approx(0.5 + 2 / 128)


def test_grouped_linear_grads_match_fp64_and_per_expert_linear():
    counts = [70, 0, 3, 140]
    k, n = 256, 136
    x = _nasty((sum(counts), k), seed=31)
    w = _nasty((4, n, k), seed=32, outliers=False) * 0.05
    dy = _nasty((sum(counts), n), seed=33)
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    y = fp8.fp8_grouped_linear(xr, wr, counts=counts)
    y.backward(dy)
    offs = [0, 70, 70, 73, 213]
    for e in range(4):
        s0, s1 = offs[e], offs[e + 1]
        if s1 == s0:
            assert (wr.grad[e] == 0).all()
            continue
        xe, dye = x[s0:s1], dy[s0:s1]
        b_y, b_dx, b_dw = _linear_bounds(xe, w[e], dye)
        ref_y = xe.double() @ w[e].double().T
        assert ((y[s0:s1].detach().double() - ref_y).abs() <= b_y).all()
        assert ((xr.grad[s0:s1].double() - dye.double() @ w[e].double()).abs() <= b_dx).all()
        assert ((wr.grad[e].double() - dye.double().T @ xe.double()).abs() <= b_dw).all()
        # and it is the same computation as a dense FP8Linear on the segment
        lin = fp8.FP8Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(w[e])
        xe_r = xe.clone().requires_grad_(True)
        lin(xe_r).backward(dye)
        torch.testing.assert_close(xe_r.grad, xr.grad[s0:s1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lin.weight.grad, wr.grad[e], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Accumulation-precision emulation
# ------------------------------------------------------------------------------------------

def test_round_to_bits():
    x = torch.tensor([1 + 2 ** -20, 1 + 2 ** -13 + 2 ** -14, -3.0, 0.0], dtype=torch.float64)
    t = fp8.round_to_bits(x, 14, "truncate")
    assert t.tolist() == [1.0, 1 + 2 ** -13, -3.0, 0.0]
    r = fp8.round_to_bits(x, 14, "nearest")
    assert r[1] == 1 + 2 ** -12       # ties to even
    with pytest.raises(ValueError):
        fp8.round_to_bits(x, 14, "up")


def test_limited_accumulation_and_promotion():
    a_q, a_s, b_q, b_s, a_d, b_d = _operands(8, 8, 2048, seed=40)
    exact = a_d @ b_d.T
    wide = fp8.fp8_gemm_emulated(a_q, a_s, b_q, b_s, acc_bits=53, chunk=32)
    assert ((wide.double() - exact).abs() / exact.abs().max()).max() < 1e-6
    promoted = fp8.fp8_gemm_emulated(a_q, a_s, b_q, b_s, acc_bits=14, chunk=32)
    ptq, pts = fp8.quantize_per_tensor(a_d.float())
    pbq, pbs = fp8.quantize_per_tensor(b_d.float())
    ref_pt = (ptq.double() * pts) @ (pbq.double() * pbs).T
    flat = fp8.fp8_gemm_emulated(ptq, pts, pbq, pbs, acc_bits=14, chunk=32, promote=False)
    err_promoted = ((promoted.double() - exact).abs() / exact.abs().max()).max()
    err_flat = ((flat.double() - ref_pt).abs() / ref_pt.abs().max()).max()
    assert err_promoted < err_flat / 4


def test_import_does_not_pull_triton():
    code = "import sys, dsv3.fp8; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
