"""``dsv3 info --config NAME_OR_PATH [--json]``: what a config costs, computed from the config alone.

- parameters: total / activated per token (main model, the report's 671B / 37B) and the MTP modules
  (as stored in the HF layout, embedding and head copies included: the report's 14B, 685B in all);
- layers: dense FFN, MoE and MTP;
- KV cache per token over all layers in BF16: MLA's latent (c_kv + the shared RoPE key) against what
  full multi-head K/V would cost;
- weight memory at BF16 and at FP8 as DeepSeek ships it: Linear weights of attention, FFNs, experts
  and the MTP projection 1 byte each plus one FP32 scale per 128×128 block; embedding, output head,
  MoE gate and norms BF16; the selection bias FP32.

No weight is allocated: tensor shapes are enumerated from the config.
"""

from __future__ import annotations

import argparse
import json
import math

from ..config import ModelConfig
from ..errors import UserError
from ..params import count_parameters, kv_cache_bytes_per_token

BF16, FP32 = 2, 4
# far beyond any real model: refused rather than reported as numbers nobody can check
MAX_EXPERTS = 1 << 20
MAX_LAYERS = 1 << 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="NAME_OR_PATH",
                        help="a preset (tiny, small, deepseek-v3, deepseek-v2-lite), an HF config.json, "
                             "or a checkpoint directory holding one")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# ------------------------------------------------------------------------------------ tensors
def _tensors(cfg: ModelConfig, with_mtp: bool, experts: int | None = None) -> list[tuple[tuple[int, ...], str, int]]:
    """Every stored tensor as (shape, kind, how many); kind: "linear" (FP8-quantisable), "bf16", "fp32".
    Repeated blocks are counted, not listed, so the cost does not grow with layers × experts.
    ``experts``: routed experts held per MoE layer (an expert-parallel rank's slots; default all)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    out: list[tuple[tuple[int, ...], str, int]] = []

    def block(moe: bool, times: int) -> None:
        lin = lambda n, k, c=1: out.append(((n, k), "linear", c * times))   # noqa: E731
        keep = lambda *shape: out.append((tuple(shape), "bf16", times))      # noqa: E731

        def ffn(inter: int, c: int = 1) -> None:
            lin(inter, d, 2 * c), lin(d, inter, c)

        keep(d), keep(d)                                       # input / post-attention norms
        if cfg.q_lora_rank:
            lin(cfg.q_lora_rank, d), keep(cfg.q_lora_rank), lin(h * cfg.qk_head_dim, cfg.q_lora_rank)
        else:
            lin(h * cfg.qk_head_dim, d)
        lin(cfg.kv_lora_rank + cfg.qk_rope_head_dim, d), keep(cfg.kv_lora_rank)
        lin(h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        lin(d, h * cfg.v_head_dim)
        if not moe:
            ffn(cfg.intermediate_size)
            return
        keep(cfg.n_routed_experts, d)                          # gate
        out.append(((cfg.n_routed_experts,), "fp32", times))  # e_score_correction_bias
        ffn(cfg.moe_intermediate_size, cfg.n_routed_experts if experts is None else experts)
        if cfg.n_shared_experts:
            ffn(cfg.moe_intermediate_size * cfg.n_shared_experts)

    keep = lambda *shape: out.append((tuple(shape), "bf16", 1))  # noqa: E731
    keep(cfg.vocab_size, d)                                    # embedding
    block(False, cfg.num_dense_layers)
    block(True, cfg.num_moe_layers)
    keep(d)                                                    # final norm
    if not cfg.tie_word_embeddings:
        keep(cfg.vocab_size, d)                                # output head
    if with_mtp and cfg.num_nextn_predict_layers:
        k = cfg.num_nextn_predict_layers
        out.extend([((d,), "bf16", 3 * k), ((d, 2 * d), "linear", k),      # enorm, hnorm, shared_head.norm; eh_proj
                    ((cfg.vocab_size, d), "bf16", 2 * k)])                # stored copies of embedding and head
        block(cfg.n_routed_experts > 0, k)
    return [t for t in out if t[2] > 0]


def weight_bytes(cfg: ModelConfig, fp8: bool, with_mtp: bool = False, experts: int | None = None) -> int:
    """Bytes of the weights at BF16, or at FP8 with 128×128 block scales (official layout);
    ``experts``: routed experts held per MoE layer (default all)."""
    bn, bk = (cfg.quantization_config or {}).get("weight_block_size", [128, 128])
    total = 0
    for shape, kind, count in _tensors(cfg, with_mtp, experts):
        n = math.prod(shape)
        if kind == "fp32":
            total += count * FP32 * n
        elif kind == "linear" and fp8:
            total += count * (n + FP32 * math.ceil(shape[0] / bn) * math.ceil(shape[1] / bk))
        else:
            total += count * BF16 * n
    return total


def info(cfg: ModelConfig, name: str = "") -> dict:
    p = count_parameters(cfg)
    kv = kv_cache_bytes_per_token(cfg, BF16)
    return {
        "config": name,
        "total_parameters": p["total"],
        "activated_parameters": p["activated"],
        "mtp_parameters": p["mtp"],
        "mtp_own_parameters": p["mtp_own"],
        "total_with_mtp_parameters": p["total_with_mtp"],
        "num_hidden_layers": cfg.num_hidden_layers,
        "dense_layers": cfg.num_dense_layers,
        "moe_layers": cfg.num_moe_layers,
        "mtp_layers": cfg.num_nextn_predict_layers,
        "routed_experts": cfg.n_routed_experts,
        "shared_experts": cfg.n_shared_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "kv_cache_bytes_per_token_bf16": kv["mla_latent"],
        "kv_cache_full_mha_bytes_per_token_bf16": kv["full_mha"],
        "kv_cache_compression": kv["ratio"],
        "weight_bytes_bf16": weight_bytes(cfg, fp8=False),
        "weight_bytes_fp8": weight_bytes(cfg, fp8=True),
        "checkpoint_bytes_bf16": weight_bytes(cfg, fp8=False, with_mtp=True),
        "checkpoint_bytes_fp8": weight_bytes(cfg, fp8=True, with_mtp=True),
        "defaults": dict(cfg.defaulted),
    }


# ------------------------------------------------------------------------------------ output
def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def render(r: dict) -> str:
    lines = [
        f"config {r['config']}",
        "parameters",
        f"  total (main model)       {_count(r['total_parameters']):>10}  ({r['total_parameters']:,})",
        f"  activated per token      {_count(r['activated_parameters']):>10}  ({r['activated_parameters']:,})",
        f"  MTP modules              {_count(r['mtp_parameters']):>10}  ({r['mtp_parameters']:,}; "
        f"{_count(r['mtp_own_parameters'])} not shared with the main model)",
        f"  total with MTP           {_count(r['total_with_mtp_parameters']):>10}  ({r['total_with_mtp_parameters']:,})",
        f"layers  {r['num_hidden_layers']} = {r['dense_layers']} dense + {r['moe_layers']} MoE "
        f"(+ {r['mtp_layers']} MTP); experts {r['routed_experts']} routed + {r['shared_experts']} shared, "
        f"{r['experts_per_token']} per token",
        "KV cache per token, BF16, all layers",
        f"  MLA latent (c_kv + RoPE key)  {r['kv_cache_bytes_per_token_bf16']:>12,} B",
        f"  full multi-head K/V           {r['kv_cache_full_mha_bytes_per_token_bf16']:>12,} B"
        f"  ({r['kv_cache_compression']:.1f}x more)",
        "weight memory             main model     checkpoint (with MTP)",
        f"  BF16                  {_bytes(r['weight_bytes_bf16']):>12}   {_bytes(r['checkpoint_bytes_bf16']):>12}",
        f"  FP8 (128x128 scales)  {_bytes(r['weight_bytes_fp8']):>12}   {_bytes(r['checkpoint_bytes_fp8']):>12}",
    ]
    if r.get("defaults"):
        lines.append("defaults taken for keys missing from config.json (transformers' DeepseekV3Config):")
        lines.append("  " + ", ".join(f"{k}={v!r}" for k, v in r["defaults"].items()))
    return "\n".join(lines)


def check_size(cfg: ModelConfig, source: str) -> None:
    """Refuse configs too large to enumerate in seconds (a UserError naming the field)."""
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if cfg.n_routed_experts > MAX_EXPERTS:
        raise UserError(f"--config {source}: n_routed_experts = {cfg.n_routed_experts:,} is more than info "
                        f"handles ({MAX_EXPERTS:,})")
    if layers > MAX_LAYERS:
        raise UserError(f"--config {source}: num_hidden_layers + num_nextn_predict_layers = {layers:,} is more "
                        f"than info handles ({MAX_LAYERS:,})")


def run(args: argparse.Namespace) -> int:
    cfg = ModelConfig.load(args.config)
    check_size(cfg, str(args.config))
    r = info(cfg, str(args.config))
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0
