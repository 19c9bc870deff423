"""Absorbed MLA attention over a paged latent cache (dsv3.infer.paged_attention).

The torch backend (gather + torch) is checked against an fp64 dense reference written straight from
the formula; the Triton kernel against the torch backend and the same reference — on a GPU when
there is one, otherwise under the Triton interpreter (TRITON_INTERPRET=1 is set per test: the
module decorates its kernels at first use, for the mode the environment asks for then).

Every cache is built to catch stray reads: the pool starts as NaN, physical blocks are shuffled,
the unused block-table entries point at NaN blocks, the positions of a row's last block past its
last cached position stay NaN, and the output buffer is NaN before the kernel writes it. Any read
of those (or any unwritten output) turns the result NaN.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:     # before triton's first import: its own library is decorated then
    os.environ["TRITON_INTERPRET"] = "1"

from dsv3.infer import paged_attention as pa  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("one_thread")
needs_triton = pytest.mark.skipif(not pa.triton_available(), reason="needs triton")


def make_case(starts, T, H, r, rope, page, dtype=torch.float32, seed=0, extra_blocks=3,
              q_scale=1.0, packed=False, device="cpu"):
    """Random queries and a poisoned paged cache holding positions 0 … start+T−1 of every row.
    Returns (inputs dict, per-row dense latents for the fp64 reference)."""
    g = torch.Generator().manual_seed(seed)
    B = len(starts)
    start = torch.tensor(starts, dtype=torch.long)
    lens = [s + T for s in starts]
    need = [-(-n // page) for n in lens]
    width = max(need) + 1                                       # one spare column per row
    nblocks = sum(need) + extra_blocks
    if packed:   # kv and pe as views of one [blocks, page, r+rope] tensor (non-contiguous pools)
        both = torch.full((nblocks, page, r + rope), float("nan"), dtype=dtype)
        kv_pool, pe_pool = both[..., :r], both[..., r:]
    else:
        kv_pool = torch.full((nblocks, page, r), float("nan"), dtype=dtype)
        pe_pool = torch.full((nblocks, page, rope), float("nan"), dtype=dtype)
    perm = torch.randperm(nblocks, generator=g)
    used = perm[: sum(need)].tolist()
    spare = perm[sum(need):]                                    # never written: all NaN
    table = spare[torch.randint(0, len(spare), (B, width), generator=g)].to(torch.int32)
    dense_kv, dense_pe = [], []
    for b in range(B):
        c = torch.randn(lens[b], r, generator=g).to(dtype)
        p = torch.randn(lens[b], rope, generator=g).to(dtype)
        dense_kv.append(c)
        dense_pe.append(p)
        for j in range(need[b]):
            phys = used.pop()
            table[b, j] = phys
            n = min(page, lens[b] - j * page)
            kv_pool[phys, :n] = c[j * page: j * page + n]
            pe_pool[phys, :n] = p[j * page: j * page + n]
    q_lat = (torch.randn(B, H, T, r, generator=g) * q_scale).to(dtype).transpose(1, 2)  # strided
    q_pe = (torch.randn(B, T, H, rope, generator=g) * q_scale).to(dtype)
    scale = 1 / math.sqrt(r + rope)
    inputs = dict(q_lat=q_lat, q_pe=q_pe, kv_pool=kv_pool, pe_pool=pe_pool, block_table=table,
                  start_pos=start, scale=scale)
    if device != "cpu":
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return inputs, (dense_kv, dense_pe)


def dense_reference(inputs, dense):
    """fp64, straight from the formula, one (row, query) at a time."""
    q_lat, q_pe = inputs["q_lat"].cpu().double(), inputs["q_pe"].cpu().double()
    B, T, H, r = q_lat.shape
    out = torch.empty(B, T, H, r, dtype=torch.float64)
    for b in range(B):
        c, p = dense[0][b].double(), dense[1][b].double()
        for t in range(T):
            n = int(inputs["start_pos"][b]) + t + 1
            s = inputs["scale"] * (q_lat[b, t] @ c[:n].T + q_pe[b, t] @ p[:n].T)       # [H, n]
            out[b, t] = s.softmax(-1) @ c[:n]
    return out


def rel_err(x, ref):
    return ((x.double().cpu() - ref).abs().max() / ref.abs().max()).item()


# rows whose cached lengths (start+T) straddle block boundaries: page−1, page, page+1, one token,
# several blocks
def boundary_starts(T, page):
    return [page - 1 - T, page - T, page + 1 - T, 0, 3 * page + 5 - T]


# ---------------------------------------------------------------------------------------------
# gather and the torch backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("packed", [False, True])
def test_gather_latent_returns_the_rows_positions(packed):
    inputs, (dkv, dpe) = make_case([5, 15, 16, 40], T=1, H=2, r=24, rope=8, page=16, packed=packed)
    length = 17
    kv, pe = pa.gather_latent(inputs["kv_pool"], inputs["pe_pool"], inputs["block_table"], length)
    assert kv.shape == (4, length, 24) and pe.shape == (4, length, 8) and kv.is_contiguous()
    for b, n in enumerate([6, 16, 17, 41]):
        m = min(n, length)
        assert torch.equal(kv[b, :m], dkv[b][:m]) and torch.equal(pe[b, :m], dpe[b][:m])
        assert torch.isnan(kv[b, m:]).all()         # past the row's end: pool poison, as stored
    with pytest.raises(ValueError, match="block table"):
        pa.gather_latent(inputs["kv_pool"], inputs["pe_pool"], inputs["block_table"], 16 * 5)


@pytest.mark.parametrize("T", [1, 2, 7])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_torch_backend_matches_fp64_formula(T, dtype, tol):
    inputs, dense = make_case(boundary_starts(T, 16), T=T, H=3, r=40, rope=16, page=16, dtype=dtype,
                              seed=T)
    out = pa.paged_mla_attention(**inputs, backend="torch")
    assert out.dtype == dtype and out.shape == inputs["q_lat"].shape and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert rel_err(out, dense_reference(inputs, dense)) < tol
    assert torch.equal(pa.paged_mla_attention(**inputs), out)        # auto on the CPU = torch


def test_torch_backend_low_precision_and_out_buffer():
    inputs, dense = make_case([3, 30, 47], T=2, H=4, r=32, rope=16, page=16, dtype=torch.bfloat16)
    out = torch.full(inputs["q_lat"].shape, float("nan"), dtype=torch.bfloat16)
    got = pa.paged_mla_attention(**inputs, backend="torch", out=out)
    assert got is out and out.dtype == torch.bfloat16
    assert rel_err(out, dense_reference(inputs, dense)) < 3e-2


def test_bad_arguments():
    inputs, _ = make_case([4, 9], T=1, H=2, r=16, rope=16, page=16)
    with pytest.raises(ValueError, match="backend"):
        pa.paged_mla_attention(**inputs, backend="cuda")
    short = dict(inputs, start_pos=torch.tensor([4, 16 * 3]))
    with pytest.raises(ValueError, match="block table"):
        pa.paged_mla_attention(**short, backend="torch")
    with pytest.raises(ValueError, match="q_lat"):
        pa.paged_mla_attention(**dict(inputs, q_lat=inputs["q_lat"][..., :8]), backend="torch")


@needs_triton
@pytest.mark.skipif(CUDA, reason="checks the CPU without the interpreter")
def test_explicit_triton_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, _ = make_case([4, 9], T=1, H=2, r=16, rope=16, page=16)
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors .*TRITON_INTERPRET=1"):
        pa.paged_mla_attention(**inputs, backend="triton")
    assert not pa.triton_usable("cpu")


# ---------------------------------------------------------------------------------------------
# the Triton kernel
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def triton_mode(monkeypatch, request):
    """GPU: nothing to do. CPU: the interpreter; if triton was imported in this process before
    TRITON_INTERPRET=1 was set (another test module), run this test in a fresh interpreter."""
    pytest.importorskip("triton")
    if CUDA:
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if pa._triton_imported_interpreted():
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{__file__}::{request.node.name}"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    pytest.skip("passed in a subprocess (triton was imported here without the interpreter)")


# (starts or None for boundary rows, T, H, r, rope, page, block_m, num_splits, q_scale, packed)
KERNEL_CASES = {
    "decode": (None, 1, 4, 32, 16, 16, None, None, 1.0, False),
    "decode-H16-r64": (None, 1, 16, 64, 16, 16, 16, 1, 1.0, False),
    "decode-H5-odd-widths": ([0, 7, 15, 16, 33], 1, 5, 48, 24, 16, 16, 1, 1.0, True),
    "verify-T2": (None, 2, 6, 32, 16, 16, None, None, 1.0, False),
    "chunk-T7-H5": ([0, 9, 16, 25], 7, 5, 32, 16, 16, 16, 1, 1.0, False),
    "splits-empty-and-full": ([0, 15, 16, 80], 1, 4, 32, 16, 16, 16, 4, 1.0, False),
    "splits-T2-page32": ([1, 31, 62, 100], 2, 3, 32, 16, 32, 16, 3, 1.0, False),
    "page128-subtiles": ([0, 63, 64, 129], 1, 4, 32, 16, 128, 16, 1, 1.0, False),
    "large-scores": ([5, 47], 2, 4, 32, 16, 16, 16, 2, 12.0, False),
}


@needs_triton
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_triton_matches_torch_fp32(triton_mode, name):
    starts, T, H, r, rope, page, block_m, splits, q_scale, packed = KERNEL_CASES[name]
    starts = starts or boundary_starts(T, page)
    inputs, dense = make_case(starts, T, H, r, rope, page, seed=len(name), q_scale=q_scale,
                              packed=packed, device=DEV)
    ref = dense_reference(inputs, dense)
    torch_out = pa.paged_mla_attention(**inputs, backend="torch")
    out = torch.full(inputs["q_lat"].shape, float("nan"), device=DEV)
    got = pa.paged_mla_attention(**inputs, backend="triton", out=out, block_m=block_m,
                                 num_splits=splits)
    assert got is out and torch.isfinite(out).all()
    torch.testing.assert_close(out, torch_out, rtol=1e-4, atol=1e-5)
    assert rel_err(out, ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,splits", [(1, 1), (2, 3), (5, 1)])
def test_triton_low_precision(triton_mode, dtype, T, splits):
    inputs, dense = make_case(boundary_starts(T, 16), T=T, H=5, r=32, rope=16, page=16, dtype=dtype,
                              seed=T + 10, device=DEV)
    ref = dense_reference(inputs, dense)
    out = pa.paged_mla_attention(**inputs, backend="triton", num_splits=splits)
    torch_out = pa.paged_mla_attention(**inputs, backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all()
    err, torch_err = rel_err(out, ref), rel_err(torch_out, ref)
    # fp32 scores (torch rounds them to the input dtype), one rounding of p and of the output
    assert err < 2e-2 and err <= 1.5 * torch_err + 4e-3, (err, torch_err)
    assert rel_err(out, torch_out.double().cpu()) < 3e-2
