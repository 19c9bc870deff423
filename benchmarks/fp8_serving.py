"""FP8 weights kept FP8 at inference (issue 11, item 6): weight memory and agreement with the
dequantised model.

1. The trained quickstart model (default ``runs/tiny/final``, written by ``scripts/quickstart.sh``)
   is written as an FP8 checkpoint two ways — as DeepSeek's release is
   (``dsv3.save_pretrained(model, dir, fp8=True)``: E4M3 Linears with 128×128 ``weight_scale_inv``,
   embedding / head / gate / norms as they were), and with the embedding and head in E4M3 too
   (``fp8_embeddings=True``, ``dsv3 quantize --fp8-embeddings``) — and each is loaded three ways:
   ``fp8="keep"`` (W8A8: E4M3 weights executed by the block-scaled FP8 GEMM, activations quantised
   1×128 on the fly), ``fp8="weight-only"`` (W8A16: the same E4M3 tensors, dequantised block by
   block in each call; what ``--fp8 auto`` does on a CPU) and ``fp8="dequant"`` (weights multiplied
   out to float at load). All compute in float32 on the CPU.
2. Greedy agreement on N held-out windows of the run's validation split (a P-token prompt, then
   the next T tokens):
     teacher-forced, real text   both models read the same window; top-1 next-token predictions
                                 compared at the T continuation positions
     teacher-forced, own text    the same over the prompt + the dequantised model's greedy output
     free-running                each model decodes T greedy tokens by itself (latent cache,
                                 absorbed MLA); tokens compared position by position (after a
                                 first difference the two texts usually part, so this is the
                                 strictest figure), plus the common prefix length
   and the relative logit error per position (teacher-forced, real text).
3. Weight bytes (parameters + buffers, each storage once) of the kept-FP8 load against the same
   checkpoint dequantised to BF16 (``dtype=torch.bfloat16``): the quickstart model in both layouts,
   measured; the DeepSeek-V3 config (671B; 61 layers, MTP), counted on the meta device from the
   exact module structure ``load_pretrained(fp8="keep")`` builds (the count is checked against the
   measured load of the quickstart model first); and a random checkpoint with DeepSeek-V3's
   proportions at 0.4B parameters (8 layers, 64 experts top-8, hidden 1024), written in FP8 and
   measured loaded.
4. Greedy decoding speed of each (CPU; W8A8 runs the torch reference GEMM, which emulates the FP8
   products in FP32; W8A16 dequantises the blocks it needs per call).

    python benchmarks/fp8_serving.py [--model runs/tiny/final] [--prompts 32] [--prompt-len 32]
        [--new-tokens 64] [--threads 2]

Writes benchmarks/results/fp8_serving.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import dsv3
from dsv3.fp8.inference import (FP8InferenceEmbedding, FP8InferenceExperts, FP8InferenceLinear, convert_to_fp8_inference,
                                fp8_weight_bytes)
from dsv3.infer.generate import generate

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"
WORK = ROOT / "work" / "fp8_serving"


def _windows(model_dir: Path, n: int, length: int) -> torch.Tensor:
    from dsv3.data import TokenDataset

    data = model_dir.parent / "data"
    if not (data / "index.json").exists():
        sys.exit(f"no token data next to the model ({data}): train with `dsv3 train` (scripts/quickstart.sh)")
    val = TokenDataset(str(data), "val", length)
    stride = max((val.num_tokens - length) // n, 1)
    return torch.tensor([val.read(i * stride, length).astype("int64").tolist() for i in range(n)])


def _meta_bytes(cfg) -> dict:
    """Weight bytes of the BF16 load and of the kept-FP8 load of `cfg`, from the module structure
    alone (meta device): parameters in BF16 as load_pretrained makes them, FP8 modules as
    load_pretrained(fp8="keep") builds them (convert_to_fp8_inference on meta)."""
    with torch.device("meta"):
        m = dsv3.Transformer(cfg)
    for p in m.parameters():
        p.data = p.data.to(torch.bfloat16)
    bf16 = fp8_weight_bytes(m)
    convert_to_fp8_inference(m)
    return {"bf16": bf16, "fp8_kept": fp8_weight_bytes(m)}


def cont_slice(P: int, T: int) -> slice:
    """Positions whose predictions are the T continuation tokens of a P-token prompt."""
    return slice(P - 1, P + T - 1)


# DeepSeek-V3's shape at 0.4B parameters: what embedding and head weigh against the experts
MID_SIZE = dict(hidden_size=1024, vocab_size=16384, num_hidden_layers=8, first_k_dense_replace=1, n_routed_experts=64,
                moe_intermediate_size=256, intermediate_size=2816, num_attention_heads=8, q_lora_rank=384,
                kv_lora_rank=128, n_group=8, topk_group=4, num_experts_per_tok=8, num_nextn_predict_layers=1)


def _measured_mid_size() -> dict:
    """A random V3-proportioned model written as an FP8 checkpoint, loaded kept and as BF16: bytes."""
    d = WORK / "mid-fp8"
    if d.exists():
        shutil.rmtree(d)
    torch.manual_seed(0)
    with torch.device("meta"):
        m = dsv3.Transformer(dsv3.ModelConfig.preset("deepseek-v3").replace(**MID_SIZE))
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    dsv3.save_pretrained(m, d, fp8=True)
    del m
    out = {"bf16": fp8_weight_bytes(dsv3.load_pretrained(d, fp8="dequant", dtype=torch.bfloat16)),
           "fp8_kept": fp8_weight_bytes(dsv3.load_pretrained(d, fp8="keep", dtype=torch.bfloat16))}
    shutil.rmtree(d)
    return out


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def _rel_err_per_position(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((u - v).norm(dim=-1) / v.norm(dim=-1)).flatten()


def _measure_layout(original, model_dir: Path, fp8_dir: Path, embeddings: bool, windows: torch.Tensor,
                    P: int, T: int, free_original: list) -> dict:
    """Write `original` as an FP8 checkpoint (``fp8_embeddings=embeddings``), load it kept (W8A8),
    weight-only (W8A16) and dequantised; agreement, logit error, decode times and weight bytes."""
    if fp8_dir.exists():
        shutil.rmtree(fp8_dir)
    dsv3.save_pretrained(original, fp8_dir, fp8=True, fp8_embeddings=embeddings)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / f).exists():
            shutil.copy(model_dir / f, fp8_dir / f)
    kept = dsv3.load_pretrained(fp8_dir, fp8="keep").eval()
    wo = dsv3.load_pretrained(fp8_dir, fp8="weight-only").eval()
    deq = dsv3.load_pretrained(fp8_dir, fp8="dequant").eval()
    modules = {"linear": sum(isinstance(m, FP8InferenceLinear) for m in kept.modules()),
               "embedding": sum(isinstance(m, FP8InferenceEmbedding) for m in kept.modules()),
               "expert_groups": sum(isinstance(m, FP8InferenceExperts) for m in kept.modules())}
    name = "embedding and head in FP8 too" if embeddings else "release layout"
    print(f"--- {name}: kept model has {modules}", flush=True)

    with torch.no_grad():
        lk, ld = kept(windows[:, :-1]), deq(windows[:, :-1])
        lw = wo(windows[:, :-1])
        lo = original.eval()(windows[:, :-1])
    cont = cont_slice(P, T)
    tf_wo = _agreement(lw[:, cont].argmax(-1), ld[:, cont].argmax(-1))
    tf_real = _agreement(lk[:, cont].argmax(-1), ld[:, cont].argmax(-1))
    err = _rel_err_per_position(lk[:, cont], ld[:, cont])
    err_deq_vs_orig = _rel_err_per_position(ld[:, cont], lo[:, cont])
    print(f"teacher-forced (held-out text): W8A8 {tf_real:.2%}, W8A16 {tf_wo:.2%} top-1 agreement", flush=True)

    free = {"kept": [], "weight_only": [], "dequant": []}
    times = {k: [] for k in free}
    for i, w in enumerate(windows):
        runs = [("kept", kept), ("weight_only", wo), ("dequant", deq)]
        if i % 2:
            runs.reverse()                              # alternate: a busy neighbour hits both alike
        for key, m in runs:
            t0 = time.perf_counter()
            free[key].append(generate(m, w[:P].tolist(), T, temperature=0))
            times[key].append(time.perf_counter() - t0)
    fk, fd, fw = (torch.tensor(free[k]) for k in ("kept", "dequant", "weight_only"))
    prefix = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), T) for x, y in zip(free["kept"], free["dequant"])]
    own = torch.cat([windows[:, :P], fd], dim=1)
    with torch.no_grad():
        tf_own = _agreement(kept(own[:, :-1])[:, cont].argmax(-1), deq(own[:, :-1])[:, cont].argmax(-1))
    print(f"free-running: W8A8 {_agreement(fk, fd):.2%}, W8A16 {_agreement(fw, fd):.2%}; "
          f"teacher-forced (own greedy text) {tf_own:.2%}", flush=True)

    kept16 = dsv3.load_pretrained(fp8_dir, fp8="keep", dtype=torch.bfloat16)
    deq16 = dsv3.load_pretrained(fp8_dir, fp8="dequant", dtype=torch.bfloat16)
    nbytes = {"bf16": fp8_weight_bytes(deq16), "fp8_kept": fp8_weight_bytes(kept16)}
    print(f"weight bytes kept/bf16: {nbytes['fp8_kept']['total'] / nbytes['bf16']['total']:.3f}", flush=True)
    return {
        "checkpoint": str(fp8_dir), "fp8_embeddings": embeddings, "fp8_modules": modules,
        "weight_only": {"logits_bitwise_equal_dequant": torch.equal(lw, ld),
                        "teacher_forced_heldout_text": tf_wo, "free_running_positions": _agreement(fw, fd)},
        "agreement": {
            "teacher_forced_heldout_text": tf_real,
            "teacher_forced_own_greedy_text": tf_own,
            "free_running_positions": _agreement(fk, fd),
            "free_running_identical_sequences": sum(p == T for p in prefix),
            "free_running_common_prefix": prefix,
            "free_running_common_prefix_mean": statistics.mean(prefix),
            "reference_dequantised_vs_unquantised_teacher_forced": _agreement(ld[:, cont].argmax(-1),
                                                                              lo[:, cont].argmax(-1)),
            "reference_dequantised_vs_unquantised_free_running": _agreement(fd, torch.tensor(free_original)),
        },
        "logit_rel_err_kept_vs_dequant": {"median": err.median().item(), "p95": err.quantile(0.95).item(),
                                          "max": err.max().item()},
        "logit_rel_err_dequant_vs_unquantised": {"median": err_deq_vs_orig.median().item(),
                                                 "p95": err_deq_vs_orig.quantile(0.95).item()},
        "weight_bytes": {**nbytes, "ratio": nbytes["fp8_kept"]["total"] / nbytes["bf16"]["total"]},
        "decode_tokens_per_s": {k: T / statistics.median(v) for k, v in times.items()},
        "_kept16": kept16,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/tiny/final")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT / "fp8_serving"))
    ap.add_argument("--render", metavar="JSON", help="only rewrite the markdown from a results JSON")
    args = ap.parse_args()
    if args.render:
        Path(args.render).with_suffix(".md").write_text(_markdown(json.loads(Path(args.render).read_text())))
        return 0
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        sys.exit(f"{model_dir} is not a model directory: run scripts/quickstart.sh first (or pass --model)")

    original = dsv3.load_pretrained(model_dir, dtype=torch.float32).eval()
    P, T = args.prompt_len, args.new_tokens
    windows = _windows(model_dir, args.prompts, P + T)
    free_original = [generate(original, w[:P].tolist(), T, temperature=0) for w in windows]
    layouts = {"release": _measure_layout(original, model_dir, WORK / "model-fp8", False, windows, P, T, free_original),
               "fp8_embeddings": _measure_layout(original, model_dir, WORK / "model-fp8-embeddings", True, windows,
                                                 P, T, free_original)}

    # weight bytes of the release layout for DeepSeek-V3 and a V3-proportioned 0.4B model
    kept16 = layouts["release"].pop("_kept16")
    layouts["fp8_embeddings"].pop("_kept16")
    tiny_meta = _meta_bytes(kept16.cfg.replace(quantization_config=None))
    meta_matches = all(tiny_meta[k]["total"] == layouts["release"]["weight_bytes"][k]["total"] for k in tiny_meta)
    v3 = _meta_bytes(dsv3.ModelConfig.preset("deepseek-v3"))
    mid = _measured_mid_size()
    ratio = lambda b: b["fp8_kept"]["total"] / b["bf16"]["total"]  # noqa: E731
    print(f"weight bytes kept/bf16: deepseek-v3 {ratio(v3):.4f} (structure count = measured load: {meta_matches}), "
          f"V3-proportioned 0.4B measured {ratio(mid):.3f}", flush=True)
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"CPU ({platform.machine()}), {args.threads} torch threads, torch {torch.__version__}",
        "model": str(model_dir), "prompts": args.prompts, "prompt_tokens": P, "new_tokens": T,
        "layouts": layouts,
        "embedding_and_head_bf16_bytes": 2 * kept16.cfg.vocab_size * kept16.cfg.hidden_size * 2,
        "weight_bytes": {
            "deepseek_v3": {**v3, "ratio": ratio(v3)},
            "v3_proportioned_0.4b": {**mid, "ratio": ratio(mid), "config": MID_SIZE},
            "structure_count_equals_measured_load": meta_matches,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(res))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def _mb(b: int) -> str:
    return f"{b / 2**20:,.2f} MiB" if b < 2**30 else f"{b / 2**30:,.1f} GiB"


def _bytes_row(label: str, b: dict, bold: bool = True) -> str:
    k = b["fp8_kept"]
    r = f"**{b['ratio']:.3f}**" if bold else f"{b['ratio']:.3f}"
    return (f"| {label} | {_mb(b['bf16']['total'])} | {_mb(k['total'])} ({_mb(k['fp8'])} + {_mb(k['scales'])} + "
            f"{_mb(k['other'])}) | {r} |")


def _markdown(r: dict) -> str:
    rel, emb = r["layouts"]["release"], r["layouts"]["fp8_embeddings"]
    w, n = r["weight_bytes"], r["prompts"] * r["new_tokens"]
    v = w["deepseek_v3"]

    def col(key, sub=None, fmt="{:.2%}", bold=False):
        get = (lambda x: x[key][sub]) if sub else (lambda x: x[key])
        b = "**" if bold else ""
        return f"{b}{fmt.format(get(rel))}{b} | {b}{fmt.format(get(emb))}{b}"

    a = "agreement"
    return f"""# FP8 weights kept FP8 at inference (benchmarks/fp8_serving.py)

{r['date']}, {r['machine']}.

The quickstart model `{r['model']}` written as an FP8 checkpoint two ways, then each loaded with
`fp8="keep"` (W8A8: the E4M3 weights executed by the block-scaled FP8 GEMM, activations quantised
1×128 on the fly), `fp8="weight-only"` (W8A16: the same E4M3 tensors dequantised block by block in
each call; what `--fp8 auto` does on a CPU) and `fp8="dequant"`; all compute in FP32:

- **release layout** (`save_pretrained(fp8=True)`, as DeepSeek's release): E4M3 Linears with 128×128
  `weight_scale_inv`; embedding, head, gate and norms as they were ({rel['fp8_modules']['linear']} FP8 Linears,
  {rel['fp8_modules']['expert_groups']} FP8 expert groups);
- **embedding and head in FP8 too** (`save_pretrained(fp8=True, fp8_embeddings=True)`, `dsv3 quantize
  --fp8-embeddings`): the same plus the embedding table and the output head (and the MTP layer's stored
  copies of them) in E4M3 with 128×128 scales ({emb['fp8_modules']['linear']} FP8 Linears, {emb['fp8_modules']['embedding']} FP8 embedding,
  {emb['fp8_modules']['expert_groups']} FP8 expert groups).

## Weight bytes (parameters + buffers), kept FP8 vs the same checkpoint dequantised to BF16

| model | BF16 load | kept FP8 (E4M3 + scales + rest) | ratio |
|---|---|---|---|
{_bytes_row("DeepSeek-V3 (671B, 61 layers + MTP; release layout; module structure, meta device)", v)}
{_bytes_row("DeepSeek-V3's proportions at 0.4B (8 layers, 64 experts top-8, hidden 1024, vocab 16K; release layout; random FP8 checkpoint, measured load)", w["v3_proportioned_0.4b"])}
{_bytes_row("quickstart `tiny`, release layout (measured load)", rel["weight_bytes"], bold=False)}
{_bytes_row("quickstart `tiny`, embedding and head in FP8 too (measured load)", emb["weight_bytes"])}

The structure count equals the measured load for the quickstart model: {w['structure_count_equals_measured_load']}.
What the release layout keeps in BF16 — embedding, output head, gate, norms, `kv_b_proj` (absorbed MLA
reads it as a matrix) — is {v['fp8_kept']['other'] / v['bf16']['total']:.1%} of DeepSeek-V3's weight bytes but
{rel['weight_bytes']['fp8_kept']['other'] / rel['weight_bytes']['bf16']['total']:.0%} of the tiny model's (embedding + head alone:
{_mb(r['embedding_and_head_bf16_bytes'])} of {_mb(rel['weight_bytes']['bf16']['total'])}); with them in FP8 too the tiny model loads in
{emb['weight_bytes']['ratio']:.3f}× the BF16 bytes.

## Greedy agreement with the dequantised model ({r['prompts']} held-out prompts of {r['prompt_tokens']} tokens, {r['new_tokens']} tokens each = {n} positions)

| comparison | release layout | embedding + head FP8 too |
|---|---|---|
| **W8A16** (`--fp8 weight-only`; `auto` on a CPU): logits bitwise equal to the dequantised model's | {rel['weight_only']['logits_bitwise_equal_dequant']} | {emb['weight_only']['logits_bitwise_equal_dequant']} |
| W8A16: teacher-forced on the held-out text (top-1 next token) | {col('weight_only', 'teacher_forced_heldout_text', bold=True)} |
| W8A16: free-running greedy, position by position | {col('weight_only', 'free_running_positions', bold=True)} |
| **W8A8** (`--fp8 keep`; `auto` on a GPU with FP8 GEMMs): teacher-forced on the held-out text | {col(a, 'teacher_forced_heldout_text', bold=True)} |
| W8A8: teacher-forced on the dequantised model's greedy text | {col(a, 'teacher_forced_own_greedy_text')} |
| W8A8: free-running greedy, position by position | {col(a, 'free_running_positions')} |
| W8A8: free-running, identical {r['new_tokens']}-token outputs of {r['prompts']} | {col(a, 'free_running_identical_sequences', '{}')} |
| W8A8: free-running, mean common prefix (tokens) | {col(a, 'free_running_common_prefix_mean', '{:.1f}')} |
| for scale — the weight quantisation alone (dequantised vs the unquantised model): teacher-forced | {col(a, 'reference_dequantised_vs_unquantised_teacher_forced')} |
| the same, free-running | {col(a, 'reference_dequantised_vs_unquantised_free_running')} |
| W8A8 logits vs dequantised, relative error per position: median / p95 | {rel['logit_rel_err_kept_vs_dequant']['median']:.2e} / {rel['logit_rel_err_kept_vs_dequant']['p95']:.2e} | {emb['logit_rel_err_kept_vs_dequant']['median']:.2e} / {emb['logit_rel_err_kept_vs_dequant']['p95']:.2e} |

Teacher-forced agreement counts, at every position, whether both models predict the same next
token from the same text; free-running agreement compares two independent greedy decodes position
by position, so one early difference (a near-tie between two tokens) makes the rest of that text
differ — it measures how long two nearly equal models stay in lockstep, and a perturbation as
small as the weight quantisation itself gives a similar figure. W8A16 computes exactly what the
dequantised model computes, so it agrees everywhere; W8A8 also rounds the activations to E4M3.

## Decoding speed (CPU, greedy, batch 1, tokens/s)

| | release layout | embedding + head FP8 too |
|---|---|---|
| W8A8 | {col('decode_tokens_per_s', 'kept', '{:.0f}')} |
| W8A16 | {col('decode_tokens_per_s', 'weight_only', '{:.0f}')} |
| dequantised | {col('decode_tokens_per_s', 'dequant', '{:.0f}')} |

Medians over the prompts, the decoders interleaved; on a shared, busy machine these are indicative
only. On a CPU the W8A8 GEMM is the torch reference path (FP8 products emulated in FP32, plus the
activation quantisation); W8A16 only dequantises the blocks each call needs. On a GPU with FP8
GEMMs (sm89+) `--fp8 auto` runs W8A8 through `torch._scaled_mm` or the Triton kernels (not timed
here: no GPU on this machine).
"""


if __name__ == "__main__":
    sys.exit(main())
