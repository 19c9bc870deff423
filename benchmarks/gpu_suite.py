"""Every GPU code path of dsv3, checked and timed in one short run (issue #17).

One Hopper GPU (H100/H200; torch 2.11, Triton 3.6, Python 3.12 there, no downloads), under 8 minutes:

1. correctness on the device, fresh random inputs with outliers (never zeros), poisoned buffers:
   the Triton quantisers, block-scaled GEMM (128×128 and 1×128 weight scales), grouped GEMM and paged
   MLA attention kernels, and the ``torch._scaled_mm`` path, against the torch / fp64 references the
   tests use; the tiny model's logits on the device against the CPU in fp32, and five training steps
   in BF16 and FP8 on the device against fp32 on the CPU (the tests' 5% bound). NCCL needs two GPUs:
   skipped, and the table says so.
2. FP8 GEMM throughput (``triton.testing.do_bench``, median, L2 flushed between runs) on DeepGEMM's
   published shapes: dsv3's Triton kernel, cuBLAS block-scaled ``torch._scaled_mm`` and BF16
   ``torch.matmul``; TFLOPS and the ratios. The 1×128 quantiser's bandwidth against a device copy.
3. training step (``dsv3.train.Trainer``: forward, backward, clip, AdamW): tokens/s, MFU and peak
   memory of the ``small`` preset and a wider config in BF16 and FP8, with and without recomputation;
   ``transformers``' DeepseekV3ForCausalLM in BF16 on the same config and weights as the peer
   (forward + cross-entropy + backward for both, same process).
4. decoding: the engine's tokens/s at batch 1 / 32 / 128 against ``transformers`` ``generate`` with the
   same weights; absorbed vs naive MLA at 4K / 16K / 64K cached positions.

    bash scripts/gpu_wheels.sh                              # here, with network: transformers + deps
    bash scripts/gpu_suite.sh OUT_DIR                       # on the GPU machine (benchmarks/work/gpu_wheels
                                                            # carried along: unpacked where Python lacks them)
    python benchmarks/gpu_suite.py --out DIR [--sections correctness,gemm,train,decode]
    python benchmarks/gpu_suite.py --dry-run --out DIR     # CPU, tiny sizes, Triton interpreted

A failing check is recorded and the run goes on, so one call reports everything; the exit code is 1
when any check failed. Writes DIR/gpu_suite.json and DIR/gpu_suite.md and prints the short table last.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SECTIONS = ("correctness", "gemm", "train", "decode")
# packages scripts/gpu_suite.sh unpacked from wheels the machine's Python lacked: searched after its own
if os.environ.get("DSV3_EXTRA_SITE"):
    sys.path.append(os.environ["DSV3_EXTRA_SITE"])


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, checked before the slow imports: a bad one is one line and exit code 2."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for gpu_suite.json and gpu_suite.md")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU with tiny sizes, Triton interpreted")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="checks that would start after this many seconds are skipped (default 450: the run "
                         "ends inside 8 minutes)")
    args = ap.parse_args(argv)

    def fail(msg):
        print(f"gpu_suite: {msg}", file=sys.stderr)
        sys.exit(2)

    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad or not args.sections:
        fail(f"--sections: unknown {', '.join(bad) or '(none given)'} (choose from {', '.join(SECTIONS)})")
    if not args.budget_s > 0:
        fail(f"--budget-s {args.budget_s}: must be a positive number of seconds")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"--out {args.out}: {err.strerror}")
    return args


# Triton picks the interpreter when it is first imported: decide before anything imports it.
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"

import datetime as _dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from argparse import Namespace  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dsv3  # noqa: E402
from dsv3 import fp8  # noqa: E402
from dsv3.fp8.gemm import FP8_MMA_REL_TOL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (M, N, K, DeepGEMM's H800 TFLOPS) — SPEC §2.3
DENSE = [(4096, 7168, 16384, 1426), (4096, 4096, 7168, 1265), (128, 7168, 16384, 645), (64, 7168, 2048, 295)]
GROUPED = [(8, 4096, 4096, 7168, 1346)]          # experts, rows per expert, N, K, DeepGEMM
LARGE = {(4096, 7168, 16384), (4096, 4096, 7168)}   # where the targets apply


# ----------------------------------------------------------------------------------- the run
class Suite:
    """Runs named checks, each on its own: a failure is recorded (with its last frame) and the run
    goes on."""

    def __init__(self, device: torch.device, dry: bool, budget_s: float = float("inf"), after=None):
        """``after()``, when given, runs after every check (the run saves what it has so far: a run
        killed from outside still leaves its finished checks on disk)."""
        self.device, self.dry, self.after = device, dry, after
        self.deadline = time.perf_counter() + budget_s
        self.checks: list[dict] = []
        self.data: dict[str, dict] = {}

    def check(self, section: str, name: str, fn) -> dict | None:
        t0 = time.perf_counter()
        row = {"section": section, "name": name}
        if t0 > self.deadline:             # the checks come most important first: keep the run's time limit
            row.update(status="skipped", summary="out of time (--budget-s)", seconds=0.0)
            self.checks.append(row)
            print(f"[{section}] {name}: skipped, out of time", flush=True)
            return None
        try:
            res = fn() or {}
            status = res.pop("status", "pass")
            row.update(status=status, **res)
        except Exception as err:          # recorded, not raised: one run reports every check
            tb = traceback.extract_tb(err.__traceback__)[-1]
            row.update(status="FAIL", error=f"{type(err).__name__}: {err}"[:400],
                       where=f"{Path(tb.filename).name}:{tb.lineno}")
            res = None
        row["seconds"] = round(time.perf_counter() - t0, 2)
        self.checks.append(row)
        detail = row.get("summary") or row.get("error") or ""
        print(f"[{section}] {name}: {row['status']} ({row['seconds']} s) {detail}", flush=True)
        if self.after is not None:
            self.after()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return res

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.checks if c["status"] == "FAIL"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_ms(fn, device: torch.device, dry: bool) -> float:
    """Median ms per call: ``triton.testing.do_bench`` on a GPU (it flushes L2 before every run); one
    call's wall clock on a CPU (dry run only)."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10 if dry else 25, rep=20 if dry else 100,
                                             return_mode="median"))
    t0 = time.perf_counter()             # the dry run only checks that the timing path works
    fn()
    return 1e3 * (time.perf_counter() - t0)


def _data(shape, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian values with rare large outliers and rare tiny ones (scales must handle both)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 300),), generator=g)] *= 500
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 30),), generator=g)] *= 1e-6
    return x.to(device=device, dtype=dtype)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


# ----------------------------------------------------------------------------------- 1. correctness
def correctness(s: Suite) -> None:
    dev, dry = s.device, s.dry
    triton_ok = fp8.triton_usable(dev) or (dry and fp8.triton_available())
    exact = dev.type == "cuda"          # the interpreter's own fp32→e4m3 cast can land one step away
    # the interpreter sums in FP32; Hopper's FP8 MMA keeps fewer accumulator bits within a 128-group
    mma_tol = FP8_MMA_REL_TOL if dev.type == "cuda" else 1e-5

    def quantisers():
        from dsv3.fp8 import triton_kernels as tk
        shapes = [(40, 300), (3, 7, 256)] if dry else [(4096, 7168), (33, 1000), (3, 7, 2048)]
        worst = 1.0
        for i, shape in enumerate(shapes):
            x = _data(shape, 10 + i, dev, torch.float32 if dry else torch.bfloat16)
            for pow2 in (False, True):
                q_ref, s_ref = fp8.quantize_activation(x.float(), pow2_scale=pow2)
                q, sc = tk.act_quant(x, pow2_scale=pow2)
                _need(torch.equal(sc, s_ref), f"act_quant scales differ for {shape}, pow2={pow2}")
                same = float((q.float() == q_ref.float()).float().mean())
                worst = min(worst, same)
                _need(same == 1.0 if exact else same > 0.9, f"act_quant values: {same:.4%} equal for {shape}")
        g, u = _data((24, 200) if dry else (4096, 2048), 3, dev), _data((24, 200) if dry else (4096, 2048), 4, dev)
        q_ref, s_ref = fp8.quantize_activation(F.silu(g) * u)
        q, sc = tk.swiglu_quant(g, u)
        torch.testing.assert_close(sc, s_ref, rtol=1e-6, atol=0)
        # the kernel's silu may differ from torch's by an ulp: values equal but for the rare one on an
        # E4M3 rounding boundary (its pre-cast values, cast by torch, on the CPU's interpreter)
        y = q if exact else tk.swiglu_quant(g, u, q_dtype=torch.float32)[0].to(fp8.FP8_DTYPE)
        off = float((y.float() != q_ref.float()).float().mean())
        _need(off < 0.01, f"swiglu_quant: {off:.3%} of values differ")
        # the weight (128×128) and token-direction (128×1, transposed; from the FP8 cache) quantisers
        w = _data((3, 300, 500) if not dry else (2, 130, 200), 8, dev)
        q_ref, s_ref = fp8.quantize_weight(w)
        q, sc = tk.weight_quant(w)
        _need(torch.equal(sc, s_ref), "weight_quant scales differ")
        y = q if exact else tk.weight_quant(w, q_dtype=torch.float32)[0].to(fp8.FP8_DTYPE)
        _need(torch.equal(y.float(), q_ref.float()), "weight_quant values differ")
        x_q, x_s = fp8.quantize_activation(_data((1000, 384) if not dry else (150, 256), 9, dev))
        q_ref, s_ref = fp8.quantize_activation_t(fp8.dequantize_activation(x_q, x_s))
        q, sc = tk.act_quant_t(x_q, x_s)
        _need(torch.equal(sc, s_ref), "act_quant_t scales differ")
        y = q if exact else tk.act_quant_t(x_q, x_s, q_dtype=torch.float32)[0].to(fp8.FP8_DTYPE)
        _need(torch.equal(y.float(), q_ref.float()), "act_quant_t values differ")
        return {"summary": f"scales bit-exact; values equal {worst:.2%} (act), {1 - off:.2%} (swiglu), "
                           "100% (weight, transposed)", "act_values_equal": worst, "swiglu_values_equal": 1 - off}

    def operands(m, n, k, seed, row=False, e=None):
        a_q, a_s = fp8.quantize_activation(_data((m, k), seed, dev))
        b = _data((n, k) if e is None else (e, n, k), seed + 1, dev)
        b_q, b_s = fp8.quantize_activation(b) if row else fp8.quantize_weight(b)
        return a_q, a_s, b_q, b_s

    def fp64_reference(a_q, a_s, b_q, b_s, row):
        a = fp8.dequantize_activation(a_q.cpu(), a_s.cpu(), dtype=torch.float64)
        b = (fp8.dequantize_activation(b_q.cpu(), b_s.cpu(), dtype=torch.float64) if row
             else fp8.dequantize_weight(b_q.cpu(), b_s.cpu(), dtype=torch.float64))
        return a @ b.T

    def gemm(backend):
        def run():
            cases = ([(40, 70, 300, False), (64, 96, 256, True), (1, 48, 128, False)] if dry else
                     [(256, 512, 1024, False), (256, 512, 1024, True), (33, 130, 384, False),
                      (1, 7168, 2048, False), (4096, 7168, 2048, False)])
            worst_ref = worst_64 = 0.0
            for m, n, k, row in cases:
                ops = operands(m, n, k, m + n + k, row)
                ref = fp8.fp8_gemm(*ops, out_dtype=torch.float32, backend="torch")
                try:
                    out = fp8.fp8_gemm(*ops, out_dtype=torch.float32, backend=backend)
                except RuntimeError as err:
                    if backend == "scaled_mm":
                        return {"status": "unavailable", "summary": str(err)[:200]}
                    raise
                _need(bool(torch.isfinite(out).all()), f"{backend} GEMM {m}x{n}x{k}: non-finite output")
                worst_ref = max(worst_ref, _rel(out, ref))
                if m * n * k <= 2 ** 31:           # fp64 on the host: the large case only against torch
                    worst_64 = max(worst_64, _rel(out, fp64_reference(*ops, row)))
                bf = fp8.fp8_gemm(*ops, out_dtype=torch.bfloat16, backend=backend)
                _need(bf.dtype == torch.bfloat16 and _rel(bf, ref) < 2 ** -7, f"{backend} BF16 output off")
                if backend == "triton":      # the pointer kernel too, where the TMA one served the call
                    from dsv3.fp8 import triton_kernels as tk
                    out = tk.fp8_gemm(*ops, torch.float32, b_row_scales=row, tma=False)
                    worst_ref = max(worst_ref, _rel(out, ref))
            if backend == "triton":          # Dgrad's operand: Wᵀ as a strided view of W (TMA: B_KN)
                from dsv3.fp8 import triton_kernels as tk
                a_q, a_s, b_q, b_s = operands(256, 384, 1024 if not dry else 256, 77)
                d_q, d_s = fp8.quantize_activation(_data((256, b_q.shape[0]), 78, dev))
                ref = fp8.fp8_gemm(d_q, d_s, b_q.t().contiguous(), b_s.t().contiguous(), torch.float32, "torch")
                for tma in (None, False):
                    worst_ref = max(worst_ref, _rel(tk.fp8_gemm(d_q, d_s, b_q.t(), b_s.t(), torch.float32,
                                                                tma=tma), ref))
            _need(worst_ref < mma_tol, f"{backend} vs torch reference: {worst_ref:.2e} (bound {mma_tol:.0e})")
            _need(worst_64 < max(mma_tol, 1e-4), f"{backend} vs fp64: {worst_64:.2e}")
            return {"summary": f"max rel err {worst_ref:.1e} vs torch reference, {worst_64:.1e} vs fp64",
                    "rel_err_vs_torch": worst_ref, "rel_err_vs_fp64": worst_64}
        return run

    def grouped():
        cases = [([10, 0, 37], False), ([33, 1, 0, 64], True)] if dry else \
                [([100, 0, 371, 1, 512, 7, 0, 256], False), ([1024] * 8, False), ([3, 0, 900, 129], True)]
        worst = 0.0
        for counts, row in cases:
            ops = operands(sum(counts), 48 if dry else 1024, 256 if dry else 2048, sum(counts), row, e=len(counts))
            ref = fp8.fp8_grouped_gemm(*ops, counts=counts, out_dtype=torch.float32, backend="torch")
            out = fp8.fp8_grouped_gemm(*ops, counts=counts, out_dtype=torch.float32, backend="triton")
            _need(bool(torch.isfinite(out).all()), f"grouped GEMM {counts}: non-finite output")
            worst = max(worst, _rel(out, ref))
            from dsv3.fp8 import triton_kernels as tk      # the pointer kernel too
            out = tk.fp8_grouped_gemm(*ops, fp8.segment_bounds(counts), torch.float32, b_row_scales=row, tma=False)
            worst = max(worst, _rel(out, ref))
            # device offsets (never read on the host, a bound of row tiles launched): the same tiles
            offs = torch.tensor([0] + counts, device=dev).cumsum(0)
            for tma in (None, False):
                host = tk.fp8_grouped_gemm(*ops, fp8.segment_bounds(counts), torch.float32, b_row_scales=row, tma=tma)
                _need(torch.equal(tk.fp8_grouped_gemm(*ops, offs, torch.float32, b_row_scales=row, tma=tma), host),
                      f"grouped GEMM {counts} (tma={tma}): device offsets differ from host segments")
        _need(worst < mma_tol, f"grouped GEMM vs torch reference: {worst:.2e} (bound {mma_tol:.0e})")
        return {"summary": f"max rel err {worst:.1e} vs torch reference (TMA and pointer kernels, empty groups "
                           "included; device-offset schedules equal the host ones)", "rel_err": worst}

    def grouped_wgrad():
        from dsv3.fp8 import triton_kernels as tk
        from dsv3.fp8.linear import _wgrad
        counts = [10, 0, 37] if dry else [700, 0, 129, 1, 2048, 64]
        segs = fp8.segment_bounds(counts)
        n, k = (48, 256) if dry else (1024, 2048)
        dy = _data((sum(counts), n), 11, dev)
        x_q, x_s = fp8.quantize_activation(_data((sum(counts), k), 12, dev))
        dw = tk.grouped_wgrad(dy, x_q, x_s, segs)
        _need(bool((dw[1] == 0).all()), "grouped Wgrad: an expert without tokens got a gradient")
        offs = torch.tensor([0] + counts, device=dev).cumsum(0)
        _need(torch.equal(tk.grouped_wgrad(dy, x_q, x_s, offs), dw),
              "grouped Wgrad: device offsets differ from host segments")
        # on the CPU the interpreter's own E4M3 cast of the transposed operands can land one step away
        tol, worst = (mma_tol if exact else 1e-2), 0.0
        for e, (s0, s1) in enumerate(segs):
            if s1 > s0:
                worst = max(worst, _rel(dw[e], _wgrad(dy[s0:s1], x_q[s0:s1], x_s[s0:s1], "torch")))
        _need(worst < tol, f"grouped Wgrad vs per-expert torch Wgrad: {worst:.2e}")
        return {"summary": f"max rel err {worst:.1e} vs per-expert torch Wgrad (one launch, empty experts zero)",
                "rel_err": worst}

    def paged_attention():
        from dsv3.infer import paged_attention as pa
        worst = 0.0
        cases = ([(1, 4, 32, 16, 16), (2, 5, 32, 16, 16)] if dry else
                 [(1, 16, 512, 64, 64), (2, 128, 512, 64, 64), (1, 128, 512, 64, 128)])
        for i, (T, H, r, rope, page) in enumerate(cases):
            starts = [page - 1 - T, page - T, 0, 3 * page + 5 - T] + ([] if dry else [4000, 16000])
            inputs, dense = _paged_case(starts, T, H, r, rope, page, seed=i, device=dev)
            out = torch.full(inputs["q_lat"].shape, float("nan"), device=dev)      # poisoned output
            got = pa.paged_mla_attention(**inputs, backend="triton", out=out)
            _need(got is out and bool(torch.isfinite(out).all()), "paged attention: NaN read or unwritten output")
            torch_out = pa.paged_mla_attention(**inputs, backend="torch")
            torch.testing.assert_close(out, torch_out, rtol=1e-4, atol=1e-5)
            worst = max(worst, _rel(out, _paged_reference(inputs, dense)))
        _need(worst < 1e-5, f"paged attention vs fp64: {worst:.2e}")
        return {"summary": f"max rel err {worst:.1e} vs fp64 formula; NaN-poisoned pools untouched", "rel_err": worst}

    if triton_ok:
        s.check("correctness", "Triton quantisers (1x128, SwiGLU+quant)", quantisers)
        s.check("correctness", "Triton block-scaled GEMM", gemm("triton"))
        s.check("correctness", "Triton grouped GEMM", grouped)
        s.check("correctness", "Triton K-grouped expert Wgrad", grouped_wgrad)
        s.check("correctness", "Triton paged MLA attention", paged_attention)
    else:
        for name in ("Triton kernels",):
            s.check("correctness", name, lambda: {"status": "skipped", "summary": "Triton not usable here"})
    if dev.type == "cuda":
        s.check("correctness", "torch._scaled_mm block-scaled GEMM", gemm("scaled_mm"))
    else:
        s.check("correctness", "torch._scaled_mm block-scaled GEMM",
                lambda: {"status": "skipped", "summary": "needs a CUDA GPU"})
    s.check("correctness", "model logits and 5 training steps vs CPU fp32", lambda: _model_vs_cpu(s))
    s.check("correctness", "CUDA-graph decode (plain, speculative) vs the eager engine", lambda: _graphs_vs_eager(s))
    s.check("correctness", "NCCL two-process run",
            lambda: {"status": "skipped", "summary": "one GPU: a two-process NCCL run needs two"})


def _paged_case(starts, T, H, r, rope, page, seed, device):
    """Queries and a paged latent cache for rows with ``starts`` cached positions before their T new
    ones. Pools start as NaN, blocks are shuffled, unused table entries point at NaN blocks: a stray
    read makes the output NaN."""
    g = torch.Generator().manual_seed(seed)
    lens = [st + T for st in starts]
    need = [-(-n // page) for n in lens]
    nblocks = sum(need) + 3
    kv_pool = torch.full((nblocks, page, r), float("nan"))
    pe_pool = torch.full((nblocks, page, rope), float("nan"))
    perm = torch.randperm(nblocks, generator=g)
    used, spare = perm[:sum(need)].tolist(), perm[sum(need):]
    table = spare[torch.randint(0, len(spare), (len(starts), max(need) + 1), generator=g)].to(torch.int32)
    dense = []
    for b, n in enumerate(lens):
        c, p = torch.randn(n, r, generator=g), torch.randn(n, rope, generator=g)
        dense.append((c, p))
        for j in range(need[b]):
            phys = used.pop()
            table[b, j] = phys
            w = min(page, n - j * page)
            kv_pool[phys, :w], pe_pool[phys, :w] = c[j * page: j * page + w], p[j * page: j * page + w]
    q_lat = torch.randn(len(starts), H, T, r, generator=g).transpose(1, 2)      # strided, as the engine's
    q_pe = torch.randn(len(starts), T, H, rope, generator=g)
    inputs = dict(q_lat=q_lat, q_pe=q_pe, kv_pool=kv_pool, pe_pool=pe_pool, block_table=table,
                  start_pos=torch.tensor(starts), scale=1 / math.sqrt(r + rope))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}, dense


def _paged_reference(inputs, dense) -> torch.Tensor:
    """fp64 straight from the formula, one row at a time (causal within the T new positions)."""
    q_lat, q_pe = inputs["q_lat"].cpu().double(), inputs["q_pe"].cpu().double()
    B, T, H, r = q_lat.shape
    out = torch.empty(B, T, H, r, dtype=torch.float64)
    for b in range(B):
        c, p = dense[b][0].double(), dense[b][1].double()
        for t in range(T):
            n = int(inputs["start_pos"][b]) + t + 1
            sc = inputs["scale"] * (q_lat[b, t] @ c[:n].T + q_pe[b, t] @ p[:n].T)
            out[b, t] = sc.softmax(-1) @ c[:n]
    return out


def _graphs_vs_eager(s: Suite) -> dict:
    """The engine's decode steps replayed from CUDA graphs (``--cuda-graphs``; on the CPU the same fixed-shape
    forward run eagerly) against the ordinary engine: greedy outputs of a BF16 tiny model, plain and
    speculative, five requests of different lengths in buckets with padding rows."""
    from dsv3.infer.engine import Engine
    from dsv3.infer.sampling import SamplingParams
    torch.manual_seed(0)
    dtype = torch.float32 if s.dry else torch.bfloat16
    cfg = dsv3.ModelConfig.preset("tiny").replace(max_position_embeddings=256)
    model = dsv3.Transformer(cfg).to(device=s.device, dtype=dtype).eval()
    prompts = [[3 + (7 * i) % (cfg.vocab_size - 3) for i in range(n)] for n in (40, 3, 100, 17, 64)]
    same, t_capture = {}, 0.0
    for speculative in (False, True):
        outs = []
        for graphs in (False, True):
            eng = Engine(model, max_batch=8, block_size=64, speculative=speculative)
            if graphs:
                t0 = time.perf_counter()
                eng.use_decode_graphs(capture=s.device.type == "cuda")
                t_capture += time.perf_counter() - t0
            reqs = [eng.submit(p, 16, SamplingParams(0.0)) for p in prompts]
            eng.run()
            outs.append([r.output for r in reqs])
        # BF16: a row may part where two logits tie within rounding (the graphs' forward reads the full
        # table width): the share of identical outputs is reported, most must agree
        same["speculative" if speculative else "plain"] = sum(a == b for a, b in zip(*outs)) / len(prompts)
    _need(min(same.values()) >= 0.6, f"graph outputs differ from the eager engine's: {same}")
    return {"summary": f"identical greedy outputs: plain {same['plain']:.0%}, speculative {same['speculative']:.0%}; "
                       f"capture {t_capture:.1f} s", "same": same, "capture_s": t_capture}


def _model_vs_cpu(s: Suite) -> dict:
    """The tiny model: logits on the device (fp32) against the CPU; then 5 AdamW steps in fp32 on the
    CPU, and on the device in BF16 autocast and in FP8 (FP8 GEMMs, the rest BF16), same start and
    batches (the tests bound FP8 to 5%)."""
    from dsv3.fp8.model import convert_to_fp8
    from dsv3.train.losses import compute_loss
    dev = s.device
    cfg = dsv3.ModelConfig.preset("tiny")
    torch.manual_seed(0)
    base = dsv3.Transformer(cfg)
    g = torch.Generator().manual_seed(1)
    T, D = 64, cfg.num_nextn_predict_layers
    batches = [torch.randint(0, cfg.vocab_size, (4, T + 1 + D), generator=g) for _ in range(5)]
    with torch.no_grad():
        tok = batches[0][:, :T]
        cpu_logits = base(tok)
        dev_logits = _clone(base, dev)(tok.to(dev))
    logit_err = _rel(dev_logits, cpu_logits)
    _need(logit_err < 1e-4, f"fp32 logits on {dev.type} vs CPU: {logit_err:.2e}")

    def curve(model, device, autocast_bf16: bool) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        out = []
        for w in batches:
            w = w.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                loss, _ = compute_loss(model, w[:, :-1], w[:, 1:], mtp_lambda=0.3, balance_alpha=1e-4)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            out.append(float(loss.detach()))
        return out

    ref = curve(_clone(base, torch.device("cpu")), torch.device("cpu"), False)
    res = {"logits_rel_err_fp32": logit_err, "cpu_fp32": ref}
    for name, autocast in (("bf16", True), ("fp8", True)):        # fp8: FP8 GEMMs, the rest in BF16 (as --precision fp8)
        model = _clone(base, dev)
        if name == "fp8":
            convert_to_fp8(model)
        res[name] = curve(model, dev, autocast)
        res[f"{name}_max_rel"] = max(abs(a - b) / a for a, b in zip(ref, res[name]))
    _need(all(math.isfinite(v) for v in res["bf16"] + res["fp8"]), "non-finite loss")
    _need(res["bf16_max_rel"] < 0.05 and res["fp8_max_rel"] < 0.05,
          f"loss off the CPU fp32 curve: bf16 {res['bf16_max_rel']:.2%}, fp8 {res['fp8_max_rel']:.2%}")
    res["summary"] = (f"fp32 logits rel err {logit_err:.1e}; 5-step loss vs CPU fp32: BF16 within "
                      f"{res['bf16_max_rel']:.2%}, FP8 within {res['fp8_max_rel']:.2%} (bound 5%)")
    return res


def _clone(model, device):
    import copy
    return copy.deepcopy(model).to(device)


# ----------------------------------------------------------------------------------- 2. GEMM speed
def gemm_speed(s: Suite) -> None:
    dev, dry = s.device, s.dry
    dense = [(64, 256, 512, None)] if dry else DENSE
    grouped = [(2, 64, 256, 512, None)] if dry else GROUPED
    gemm_dtype = torch.float32 if dry else torch.bfloat16       # the CPU has no fast BF16 matmul
    rows = []

    def dense_row(m, n, k, ref):
        def run():
            a, b = _data((m, k), 1, dev, gemm_dtype), _data((n, k), 2, dev, gemm_dtype)
            ops = (*fp8.quantize_activation(a), *fp8.quantize_weight(b))
            flops = 2 * m * n * k
            row = {"M": m, "N": n, "K": k, "deepgemm_h800_tflops": ref,
                   "bf16_tflops": flops / _bench_ms(lambda: a @ b.T, dev, dry) / 1e9}
            for be in ("triton", "scaled_mm"):
                if be == "scaled_mm" and dev.type != "cuda":
                    continue
                try:
                    row[f"{be}_tflops"] = flops / _bench_ms(
                        lambda: fp8.fp8_gemm(*ops, out_dtype=torch.bfloat16, backend=be), dev, dry) / 1e9
                except RuntimeError as err:
                    row[f"{be}_error"] = str(err)[:160]
            from dsv3.fp8 import triton_kernels as tk
            c = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
            row["triton_kernel"] = "tma" if tk.gemm_uses_tma(ops[0], ops[2], c) else "pointer"
            if row["triton_kernel"] == "tma":          # the pointer kernel alongside
                row["triton_ptr_tflops"] = flops / _bench_ms(lambda: tk.fp8_gemm(*ops, tma=False), dev, dry) / 1e9
            tri = row.get("triton_tflops")
            if tri and dev.type == "cuda":                                        # the autotuner's picks
                row["triton_config"] = str((tk._fp8_gemm_tma_kernel if row["triton_kernel"] == "tma"
                                            else tk._fp8_gemm_kernel).best_config)
                if "triton_ptr_tflops" in row:
                    row["triton_ptr_config"] = str(tk._fp8_gemm_kernel.best_config)
            if tri:
                row["triton_vs_bf16"] = tri / row["bf16_tflops"]
                if row.get("scaled_mm_tflops"):
                    row["triton_vs_cublas"] = tri / row["scaled_mm_tflops"]
            rows.append(row)
            summary = ", ".join(f"{k[:-7]} {v:.4g}" for k, v in row.items() if k.endswith("_tflops") and v
                                and not k.startswith("deepgemm"))
            return {"summary": f"TFLOPS: {summary}", **row}
        return run

    def grouped_row(e, t, n, k, ref):
        def run():
            a = _data((e * t, k), 3, dev, gemm_dtype)
            b = _data((e, n, k), 4, dev, gemm_dtype)
            a_q, a_s = fp8.quantize_activation(a)
            b_q, b_s = fp8.quantize_weight(b)
            counts = [t] * e
            flops = 2 * e * t * n * k
            a3 = a.view(e, t, k)
            row = {"experts": e, "rows_per_expert": t, "N": n, "K": k, "deepgemm_h800_tflops": ref,
                   "bf16_tflops": flops / _bench_ms(lambda: torch.bmm(a3, b.transpose(1, 2)), dev, dry) / 1e9,
                   "triton_tflops": flops / _bench_ms(lambda: fp8.fp8_grouped_gemm(
                       a_q, a_s, b_q, b_s, counts=counts, out_dtype=torch.bfloat16, backend="triton"), dev, dry) / 1e9}
            from dsv3.fp8 import triton_kernels as tk
            segs = fp8.segment_bounds(counts)
            row["triton_ptr_tflops"] = flops / _bench_ms(lambda: tk.fp8_grouped_gemm(
                a_q, a_s, b_q, b_s, segs, tma=False), dev, dry) / 1e9
            counts_t = torch.tensor(counts, device=dev)      # device counts: scheduled on the GPU, no sync
            row["triton_device_counts_tflops"] = flops / _bench_ms(lambda: fp8.fp8_grouped_gemm(
                a_q, a_s, b_q, b_s, counts=counts_t, out_dtype=torch.bfloat16, backend="triton"), dev, dry) / 1e9
            row["triton_vs_bf16"] = row["triton_tflops"] / row["bf16_tflops"]
            rows.append(row)
            return {"summary": f"TFLOPS: triton {row['triton_tflops']:.4g} (pointer kernel {row['triton_ptr_tflops']:.4g},"
                               f" device counts {row['triton_device_counts_tflops']:.4g}),"
                               f" bf16 bmm {row['bf16_tflops']:.4g}", **row}
        return run

    def quantiser():
        from dsv3.fp8 import triton_kernels as tk
        m, k = (64, 512) if dry else (8192, 7168)
        x = _data((m, k), 5, dev, gemm_dtype)
        moved = x.numel() * x.element_size() + x.numel() + 4 * m * (k // 128)
        t_q = _bench_ms(lambda: tk.act_quant(x), dev, dry)
        t_c = _bench_ms(lambda: x.clone(), dev, dry)
        q_gbs, c_gbs = moved / t_q / 1e6, 2 * x.numel() * x.element_size() / t_c / 1e6
        return {"summary": f"act_quant {q_gbs:.4g} GB/s, copy {c_gbs:.4g} GB/s ({q_gbs / c_gbs:.0%})",
                "quant_gb_s": q_gbs, "copy_gb_s": c_gbs, "ratio": q_gbs / c_gbs, "shape": [m, k]}

    def host_overhead():
        """Host time per call, no synchronisation, on a tiny shape (the GPU work is negligible): what
        bounds the small-M rows and every decode-sized GEMM."""
        m, n, k = 16, 256, 256
        a, b = _data((m, k), 6, dev, gemm_dtype), _data((n, k), 7, dev, gemm_dtype)
        ops = (*fp8.quantize_activation(a), *fp8.quantize_weight(b))
        from dsv3.fp8 import triton_kernels as tk
        calls = {"torch.matmul (BF16)": lambda: a @ b.T,
                 "fp8_gemm triton": lambda: fp8.fp8_gemm(*ops, out_dtype=torch.bfloat16, backend="triton"),
                 "triton_kernels.fp8_gemm": lambda: tk.fp8_gemm(*ops, out_dtype=torch.bfloat16),
                 "act_quant": lambda: tk.act_quant(a)}
        us = {}
        for name, fn in calls.items():
            fn()
            _sync(dev)
            reps = 5 if dry else 200
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            us[name] = 1e6 * (time.perf_counter() - t0) / reps
            _sync(dev)
        return {"summary": ", ".join(f"{k} {v:.0f} µs" for k, v in us.items()), "host_us_per_call": us}

    if not (fp8.triton_usable(dev) or (dry and fp8.triton_available())):
        s.check("gemm", "FP8 GEMM throughput", lambda: {"status": "skipped", "summary": "Triton not usable here"})
        return
    for m, n, k, ref in dense:
        s.check("gemm", f"dense M={m} N={n} K={k}", dense_row(m, n, k, ref))
    for e, t, n, k, ref in grouped:
        s.check("gemm", f"grouped {e}x{t} N={n} K={k}", grouped_row(e, t, n, k, ref))
    s.check("gemm", "1x128 quantiser bandwidth", quantiser)
    s.check("gemm", "host time per call (no sync)", host_overhead)
    s.data["gemm"] = {"rows": rows}


# ----------------------------------------------------------------------------------- 3. training step
class RandomTokens:
    """The Trainer's dataset interface over uniform random tokens (a pure function of seed and step)."""

    def __init__(self, vocab_size: int, seq_len: int):
        self.vocab_size, self.seq_len = vocab_size, seq_len

    def batch(self, step, batch_size, seed=0, extra=0, rank=0, world_size=1):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 97 + rank)
        w = torch.randint(0, self.vocab_size, (batch_size, self.seq_len + 1 + extra), generator=g)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _peak_tflops(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    from dsv3.plan.hardware import CATALOGUE
    name = torch.cuda.get_device_name(device).lower()
    gpu = next((g for key, g in CATALOGUE.items() if key in name), None)
    return None if gpu is None else {"gpu": gpu.name, "bf16": gpu.bf16_tflops, "fp8": gpu.fp8_tflops}


def _train_configs(dry: bool) -> dict:
    if dry:
        return {"tiny": (dsv3.ModelConfig.preset("tiny"), 2, 32)}
    small = dsv3.ModelConfig.preset("small")
    # DeepSeek-V3's attention shapes at a quarter of its width (1.6B parameters with MTP)
    wide = small.replace(hidden_size=2048, num_hidden_layers=12, intermediate_size=5632, q_lora_rank=768,
                         kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                         moe_intermediate_size=512, n_routed_experts=32, num_experts_per_tok=6,
                         max_position_embeddings=8192)       # 4096 tokens + the MTP's extra one
    return {"small": (small, 16, 2048), "wide": (wide, 8, 4096)}


def train_speed(s: Suite) -> None:
    from dsv3.plan.flops import token_work
    from dsv3.train.trainer import Trainer, TrainConfig
    dev, dry = s.device, s.dry
    peak = _peak_tflops(dev)
    steps, warm = (2, 1) if dry else (6, 2)
    rows = []

    def one(name, cfg, batch, seq, precision, recompute):
        def run():
            with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:     # the Trainer's --out (nothing is saved)
                return timed_steps(tmp)

        def timed_steps(tmp):
            tc = TrainConfig(out=str(tmp), steps=steps, batch_size=batch, seq_len=seq, precision=precision,
                             recompute=recompute, device=str(dev), progress=False, warmup=1, eval_every=0,
                             save_every=10 ** 9)
            trainer = Trainer(cfg, tc, RandomTokens(cfg.vocab_size, seq))
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            ts, losses = [], []
            for i in range(steps):
                _sync(dev)
                t0 = time.perf_counter()
                out = trainer.train_step()
                losses.append(float(out["loss"]))
                _sync(dev)
                ts.append(time.perf_counter() - t0)
            step_s = statistics.median(ts[warm:])
            tps = batch * seq / step_s
            flops = token_work(cfg, seq).model_flops
            row = {"config": name, "precision": precision, "recompute": recompute, "batch": batch, "seq": seq,
                   "tokens_per_s": tps, "step_ms": 1e3 * step_s, "loss_first_last": [losses[0], losses[-1]],
                   "model_tflops_per_s": flops * tps / 1e12}
            if peak:
                row["mfu_bf16_peak"] = row["model_tflops_per_s"] / peak["bf16"]
            if dev.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
            _need(all(math.isfinite(x) for x in losses), f"non-finite loss {losses}")
            rows.append(row)
            del trainer
            mfu = f", MFU {row['mfu_bf16_peak']:.1%} of BF16 peak" if "mfu_bf16_peak" in row else ""
            mem = f", {row['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in row else ""
            return {"summary": f"{tps:,.0f} tokens/s{mfu}{mem}", **row}
        return run

    configs = _train_configs(dry)
    first, *others = configs

    def variants(name, recomputes):
        cfg, batch, seq = configs[name]
        for recompute in recomputes:
            for precision in ("bf16", "fp8"):
                s.check("train", f"{name} {precision}{' recompute' if recompute else ''} (batch {batch}x{seq})",
                        one(name, cfg, batch, seq, precision, recompute))

    variants(first, (False, True))
    for name in others:
        variants(name, (False,))
    s.check("train", f"{first}: dsv3 vs transformers, BF16 forward+backward", lambda: _vs_transformers(s, *configs[first]))
    for name in others:                     # last: the run's time limit may cut them
        variants(name, (True,))
    s.data["train"] = {"rows": rows, "peak_tflops": peak}


_PAIRS: dict = {}


def _hf_pair(cfg, dtype, device):
    """dsv3's model and transformers' DeepseekV3ForCausalLM with the same weights (without MTP), built
    once per config and dtype (the training peer and the decoding section share them)."""
    import transformers
    from transformers import DeepseekV3ForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = cfg.replace(num_nextn_predict_layers=0)
    key = (repr(cfg), dtype, str(device))
    if key not in _PAIRS:
        torch.manual_seed(0)
        ours = dsv3.Transformer(cfg)
        with torch.no_grad():
            for moe in ours.moe_layers():
                moe.gate.e_score_correction_bias.normal_(0, 0.01)
        with tempfile.TemporaryDirectory() as d:
            dsv3.save_pretrained(ours, d, dtype=dtype)
            del ours
            ours = dsv3.load_pretrained(d, device=device, dtype=dtype)
            theirs = DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).to(device)
        _PAIRS[key] = (cfg, ours, theirs, transformers.__version__)
    cfg, ours, theirs, version = _PAIRS[key]
    for m in (ours, theirs):
        for p in m.parameters():
            p.grad = None
    return cfg, ours, theirs, version


def _vs_transformers(s: Suite, cfg, batch, seq) -> dict:
    dev, dry = s.device, s.dry
    try:
        cfg, ours, theirs, version = _hf_pair(cfg, torch.float32 if dry else torch.bfloat16, dev)
    except ImportError as err:
        return {"status": "skipped", "summary": f"transformers not importable: {err}"}
    batch = max(1, batch // 2)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(2)).to(dev)
    fns = {"dsv3": lambda t: ours(t), "transformers": lambda t: theirs(t).logits}
    models = {"dsv3": ours, "transformers": theirs}

    def step(k):
        for p in models[k].parameters():
            p.grad = None
        logits = fns[k](tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        return float(loss)

    for m in models.values():
        m.train()
    losses = {k: step(k) for k in models}
    _need(abs(losses["dsv3"] - losses["transformers"]) < 0.02 * losses["dsv3"], f"losses differ: {losses}")
    times = {k: [] for k in models}
    for i in range(2 if dry else 6):
        for k in (models if i % 2 == 0 else list(models)[::-1]):
            _sync(dev)
            t0 = time.perf_counter()
            step(k)
            _sync(dev)
            times[k].append(time.perf_counter() - t0)
    tps = {k: batch * seq / statistics.median(v[1:] if len(v) > 2 else v) for k, v in times.items()}
    ratio = tps["dsv3"] / tps["transformers"]
    return {"summary": f"dsv3 {tps['dsv3']:,.0f} vs transformers {tps['transformers']:,.0f} tokens/s ({ratio:.2f}x)",
            "tokens_per_s": tps, "ratio": ratio, "losses": losses, "transformers": version, "batch": batch, "seq": seq}


# ----------------------------------------------------------------------------------- 4. decoding
def decode_speed(s: Suite) -> None:
    dev, dry = s.device, s.dry
    cfg = dsv3.ModelConfig.preset("tiny" if dry else "small")
    batches = (1, 4) if dry else (1, 32, 128)
    prompt_len, new = (16, 8) if dry else (64, 128)

    def engine_vs_hf():
        from dsv3.infer.engine import Engine
        from dsv3.infer.sampling import SamplingParams
        try:
            c, ours, theirs, version = _hf_pair(cfg.replace(num_nextn_predict_layers=0),
                                                torch.float32 if dry else torch.bfloat16, dev)
        except ImportError as err:
            return {"status": "skipped", "summary": f"transformers not importable: {err}"}
        ours.eval()
        theirs.eval()
        g = torch.Generator().manual_seed(3)
        rows, agree, graphs_equal = [], None, True
        # the engine eagerly, the engine replaying CUDA graphs (on the CPU: the same static forward, eagerly)
        names = ("dsv3 engine", "dsv3 engine, CUDA graphs", "transformers")
        for b in batches:
            prompts = torch.randint(3, c.vocab_size, (b, prompt_len), generator=g)
            t, outs = {}, {}
            for name in names:
                with torch.no_grad():
                    if name.startswith("dsv3"):
                        eng = Engine(ours, max_batch=b)
                        if name.endswith("graphs"):
                            eng.use_decode_graphs(capture=dev.type == "cuda")   # captured before the clock starts
                        _sync(dev)
                        t0 = time.perf_counter()
                        reqs = [eng.submit(p.tolist(), new, SamplingParams(0.0)) for p in prompts]
                        eng.run()
                        outs[name] = [r.output for r in reqs]
                    else:
                        _sync(dev)
                        t0 = time.perf_counter()
                        outs[name] = theirs.generate(prompts.to(dev), max_new_tokens=new, min_new_tokens=new,
                                                     do_sample=False, use_cache=True,
                                                     pad_token_id=0)[:, prompt_len:].tolist()
                _sync(dev)
                t[name] = b * new / (time.perf_counter() - t0)
            mine, out = outs["dsv3 engine"], outs["transformers"]
            if b == 1:
                agree = next((j for j, (x, y) in enumerate(zip(mine[0], out[0])) if x != y), new)
            same = sum(x == y for x, y in zip(mine, outs["dsv3 engine, CUDA graphs"])) / b
            graphs_equal = graphs_equal and same == 1.0
            rows.append({"batch": b, "engine_tokens_per_s": t["dsv3 engine"],
                         "engine_graphs_tokens_per_s": t["dsv3 engine, CUDA graphs"],
                         "graphs_same_output": same,
                         "transformers_tokens_per_s": t["transformers"],
                         "ratio": t["dsv3 engine"] / t["transformers"],
                         "graphs_ratio": t["dsv3 engine, CUDA graphs"] / t["transformers"]})
        s.data["decode"] = {"rows": rows, "greedy_tokens_agreeing_batch1": agree, "new_tokens": new,
                            "prompt_len": prompt_len, "transformers": version}
        # BF16 greedy rows may part where two logits tie within rounding; the share is reported
        return {"summary": "; ".join(f"batch {r['batch']}: {r['engine_tokens_per_s']:,.0f} (graphs "
                                     f"{r['engine_graphs_tokens_per_s']:,.0f}, same output {r['graphs_same_output']:.0%})"
                                     f" vs {r['transformers_tokens_per_s']:,.0f} tokens/s ({r['ratio']:.2f}x, "
                                     f"graphs {r['graphs_ratio']:.2f}x)" for r in rows),
                "rows": rows, "greedy_tokens_agreeing_batch1": agree, "graphs_output_identical": graphs_equal}

    def mla():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import decode_speed as ds
        res = ds.part3(Namespace(contexts=[64, 128] if dry else [4096, 16384, 65536], iters=2 if dry else 10,
                                 device=str(dev)))
        s.data["mla"] = res
        return {"summary": "; ".join(f"{r['context']}: {r['naive_ms']:.2f} → {r['absorbed_ms']:.2f} ms "
                                     f"({r['speedup']:.1f}x)" for r in res["rows"]), **res}

    s.check("decode", f"engine vs transformers generate ({'tiny' if dry else 'small'}, batch "
                      f"{'/'.join(map(str, batches))})", engine_vs_hf)
    s.check("decode", "absorbed vs naive MLA decode step", mla)


# ----------------------------------------------------------------------------------- report
def _environment(device: torch.device) -> dict:
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"sm{p.major}{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                   sms=p.multi_processor_count)
    else:
        env["gpu"] = "none (dry run on the CPU, Triton interpreted)"
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    import importlib.metadata as md
    import importlib.util

    extra = os.environ.get("DSV3_EXTRA_SITE")
    for name in ("numpy", "transformers"):           # and whether it came from scripts/gpu_wheels.sh's wheels
        spec = importlib.util.find_spec(name)
        if spec is None:
            env[name] = None
            continue
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            version = "?"
        from_wheels = bool(extra) and str(spec.origin or "").startswith(extra)
        env[name] = version + (" (from benchmarks/work/gpu_wheels)" if from_wheels else "")
    return env


def _table(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown section: title, then a table whose first column is left-aligned, the rest right."""
    return ["", f"## {title}", "", "| " + " | ".join(head) + " |",
            "|---|" + "---:|" * (len(head) - 1), *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def _num(r: dict, key: str, fmt: str = "{:.0f}") -> str:
    return fmt.format(r[key]) if isinstance(r.get(key), (int, float)) else "–"


def _markdown(res: dict) -> str:
    e, data = res["environment"], res["data"]
    lines = [f"# GPU suite ({'dry run, ' if res['dry_run'] else ''}{e['gpu']}; {e['date']})", "",
             f"torch {e['torch']}, CUDA {e['cuda']}, Triton {e['triton']}, Python {e['python']}. "
             f"`{res['command']}`, {res['seconds']:.0f} s.", "",
             "| section | check | status | result | s |", "|---|---|---|---|---:|"]
    for c in res["checks"]:
        detail = (c.get("summary") or c.get("error") or "").replace("|", "/")
        lines.append(f"| {c['section']} | {c['name']} | {c['status']} | {detail} | {c['seconds']} |")
    if res["targets"]:
        lines += _table("Targets (issue #17)", ["target", "measured", ""],
                        [[t["target"], f"{t['value']:.2f}×", "met" if t["met"] else "**missed**"] for t in res["targets"]])
    if (data.get("gemm") or {}).get("rows"):
        lines += _table("FP8 GEMM, TFLOPS (median of `do_bench`, L2 flushed)",
                        ["shape", "dsv3 Triton", "cuBLAS `_scaled_mm`", "BF16", "Triton / BF16", "Triton / cuBLAS",
                         "DeepGEMM (H800, published)"],
                        [[f"{r['experts']}×{r['rows_per_expert']} N={r['N']} K={r['K']}" if "experts" in r
                          else f"M={r['M']} N={r['N']} K={r['K']}", _num(r, "triton_tflops"),
                          _num(r, "scaled_mm_tflops"), _num(r, "bf16_tflops"), _num(r, "triton_vs_bf16", "{:.2f}×"),
                          _num(r, "triton_vs_cublas", "{:.2f}×"), _num(r, "deepgemm_h800_tflops")]
                         for r in data["gemm"]["rows"]])
    if (data.get("train") or {}).get("rows"):
        lines += _table("Training step (Trainer: forward, backward, clip, AdamW)",
                        ["config", "precision", "recompute", "batch × seq", "tokens/s", "MFU (BF16 peak)", "peak GiB"],
                        [[r["config"], r["precision"], r["recompute"], f"{r['batch']}×{r['seq']}",
                          f"{r['tokens_per_s']:,.0f}", _num(r, "mfu_bf16_peak", "{:.1%}"),
                          _num(r, "peak_memory_gib", "{:.1f}")] for r in data["train"]["rows"]])
    d = data.get("decode")
    if d:
        lines += _table(f"Decoding ({d['prompt_len']}-token prompts, {d['new_tokens']} greedy tokens)",
                        ["batch", "dsv3 engine tokens/s", "with CUDA graphs", "same output", "transformers generate",
                         "ratio", "ratio with graphs"],
                        [[r["batch"], f"{r['engine_tokens_per_s']:,.0f}", _num(r, "engine_graphs_tokens_per_s", "{:,.0f}"),
                          _num(r, "graphs_same_output", "{:.0%}"), f"{r['transformers_tokens_per_s']:,.0f}",
                          f"{r['ratio']:.2f}×", _num(r, "graphs_ratio", "{:.2f}×")] for r in d["rows"]])
    m = data.get("mla")
    if m:
        lines += _table(m["layer"], ["cached positions", "naive ms", "absorbed ms", "speed-up"],
                        [[r["context"], f"{r['naive_ms']:.2f}", f"{r['absorbed_ms']:.2f}", f"{r['speedup']:.1f}×"]
                         for r in m["rows"]])
    return "\n".join(lines) + "\n"


def _targets(data: dict, dry: bool) -> list[dict]:
    """Issue #17's targets from the measured rows: FP8 GEMM ≥ 1.3× BF16 and ≥ 0.9× cuBLAS block-scaled
    at the large shapes; the FP8 training step faster than BF16 (per config and recomputation)."""
    out = []
    for r in (data.get("gemm") or {}).get("rows", []):
        if "M" in r and ((r["M"], r["N"], r["K"]) in LARGE or dry):
            shape = f"M={r['M']} N={r['N']} K={r['K']}"
            for key, bound, what in (("triton_vs_bf16", 1.3, "FP8 GEMM / BF16"), ("triton_vs_cublas", 0.9,
                                                                                 "FP8 GEMM / cuBLAS block-scaled")):
                if key in r:
                    out.append({"target": f"{what} ≥ {bound} at {shape}", "value": r[key], "met": r[key] >= bound})
    rows = (data.get("train") or {}).get("rows", [])
    for r in rows:
        if r["precision"] != "fp8":
            continue
        b = next((x for x in rows if x["config"] == r["config"] and x["recompute"] == r["recompute"]
                  and x["precision"] == "bf16"), None)
        if b:
            ratio = r["tokens_per_s"] / b["tokens_per_s"]
            out.append({"target": f"FP8 step faster than BF16 ({r['config']}{', recompute' if r['recompute'] else ''})",
                        "value": ratio, "met": ratio > 1.0})
    return out


def _short_table(res: dict) -> str:
    w = max(len(c["name"]) for c in res["checks"])
    out = [f"{'check':<{w}}  status       result"]
    for c in res["checks"]:
        out.append(f"{c['name']:<{w}}  {c['status']:<11}  {(c.get('summary') or c.get('error') or '')[:110]}")
    for t in res["targets"]:
        out.append(f"target: {t['target']}: {t['value']:.2f}x {'met' if t['met'] else 'MISSED'}")
    fails = sum(c["status"] == "FAIL" for c in res["checks"])
    out.append(f"{len(res['checks'])} checks, {fails} failed, {res['seconds']:.0f} s")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_suite: --dry-run needs TRITON_INTERPRET=1 before triton is imported (run the script itself)",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    env = _environment(device)

    def results(complete: bool) -> dict:
        return {"benchmark": "gpu_suite", "dry_run": args.dry_run, "complete": complete, "environment": env,
                "command": " ".join(["python benchmarks/gpu_suite.py", *sys.argv[1:]]),
                "seconds": time.perf_counter() - t0, "checks": s.checks, "data": s.data,
                "targets": _targets(s.data, args.dry_run)}

    def save(complete: bool = False) -> dict:
        res = results(complete)
        tmp = args.out / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, args.out / "gpu_suite.json")
        return res

    s = Suite(device, args.dry_run, args.budget_s, after=save)
    runners = {"correctness": correctness, "gemm": gemm_speed, "train": train_speed, "decode": decode_speed}
    for name in args.sections:
        runners[name](s)
    res = save(complete=True)
    (args.out / "gpu_suite.md").write_text(_markdown(res))
    print(_short_table(res), flush=True)
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
