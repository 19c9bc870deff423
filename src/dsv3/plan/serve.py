"""Serving model: memory per GPU and throughput bounds of the report's deployment units (SPEC §3).

Units (DeepSeek-V3 report §3.4):
- prefill: 4 nodes / 32 GPUs, attention TP4 (+SP, DP8), MoE EP32; 32 redundant experts, so every GPU
  holds 9 experts per MoE layer; the shared expert runs with the attention part on every GPU.
- decode: 40 nodes / 320 GPUs, attention TP4 (+SP, DP80), MoE EP320, one expert per GPU; 64 GPUs hold
  redundant copies and the shared expert, which is treated as a routed one (9 experts per token).

Weights are served in the released FP8 layout (Linears FP8 + 128x128 scales, the rest BF16).
Attention weights, dense FFNs, embedding and head are split over the attention TP group. With MLA the
cached latent is shared by all heads, so heads split over TP do *not* split the cache: every GPU of
a TP group holds and reads the whole latent of the group's sequences. The MTP module is kept (it drafts
one token for speculative decoding and has its own attention cache).

Bounds (per GPU, then per node):
- prefill: compute (Linears at the FP8 GEMM efficiency, attention core at the attention efficiency,
  causal over the prompt) and InfiniBand (EP all-to-all; two micro-batches overlap computation with
  communication, so the slower one bounds). Reported for computed tokens and, with the on-disk cache hit
  rate, for input tokens including cache hits (the published 73.7k/s per node counts those).
- decode: one step reads every weight on the GPU once, and the latent cache of the group's sequences
  (memory bound); the absorbed-MLA attention over the context (compute bound); and dispatch/combine of
  the step's tokens point-to-point over IB. The batch is the largest the KV memory holds. With MTP each
  step verifies 2 tokens per sequence and emits ``1 + mtp_acceptance``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..params import kv_cache_bytes_per_token
from .assumptions import Assumptions
from .comm import ep_traffic
from .flops import fp8_weight_bytes, head_linear, model_blocks
from .hardware import GPU

GB = 1e9
PUBLISHED = {"prefill_input_tokens_per_s_per_node": 73.7e3, "decode_output_tokens_per_s_per_node": 14.8e3}


@dataclass(frozen=True)
class ServeUnit:
    name: str                    # "prefill" | "decode"
    nodes: int
    tp: int                      # attention tensor parallelism
    ep: int                      # expert parallelism (GPUs)
    redundant_slots: int         # expert slots beyond the routed experts (redundant + shared copies)
    shared_as_routed: bool       # the shared expert is placed like a routed one (decode)


REPORT_UNITS = {
    "prefill": ServeUnit("prefill", nodes=4, tp=4, ep=32, redundant_slots=32, shared_as_routed=False),
    "decode": ServeUnit("decode", nodes=40, tp=4, ep=320, redundant_slots=64, shared_as_routed=True),
}


def _validate(cfg: ModelConfig, gpu: GPU, u: ServeUnit) -> int:
    gpus = u.nodes * gpu.gpus_per_node
    if u.ep != gpus:
        raise ValueError(f"{u.name} unit: EP {u.ep} must equal its {gpus} GPUs ({u.nodes} nodes)")
    if gpus % u.tp or gpu.gpus_per_node % u.tp:
        raise ValueError(f"{u.name} unit: attention TP {u.tp} must divide the {gpu.gpus_per_node} GPUs of a node")
    slots = cfg.n_routed_experts + u.redundant_slots
    if slots % u.ep:
        raise ValueError(f"{u.name} unit: {cfg.n_routed_experts} experts + {u.redundant_slots} redundant slots "
                         f"do not split evenly over EP {u.ep}")
    return slots // u.ep


def plan_serving(cfg: ModelConfig, gpu: GPU, unit: ServeUnit | str, a: Assumptions | None = None,
                 mtp: bool = True) -> dict:
    a = a or Assumptions()
    u = REPORT_UNITS[unit] if isinstance(unit, str) else unit
    experts_per_gpu = _validate(cfg, gpu, u)
    gpn = gpu.gpus_per_node
    blocks = model_blocks(cfg, a.serve_prompt_tokens, include_mtp=mtp)
    moe_blocks = [b for b in blocks if b.has_moe]
    hl = head_linear(cfg)

    # ---- weights per GPU
    dense_fp8 = dense_bf16 = 0.0
    for b in blocks:
        for lin in b.linears:
            if lin.routed:
                continue
            if u.shared_as_routed and lin.name.startswith("shared."):
                continue
            if lin.fp8:
                dense_fp8 += lin.params
            else:
                dense_bf16 += lin.params
        dense_bf16 += b.other_params
    dense_bf16 += 2 * hl.params + cfg.hidden_size         # embedding + head + final norm
    per_expert = (sum(l.params for l in moe_blocks[0].linears if l.routed) / cfg.n_routed_experts
                  if moe_blocks else 0)
    w_dense = (fp8_weight_bytes(dense_fp8) + 2 * dense_bf16) / u.tp
    w_experts = experts_per_gpu * len(moe_blocks) * fp8_weight_bytes(per_expert)
    weights = w_dense + w_experts
    kv = kv_cache_bytes_per_token(cfg, a.kv_bytes_per_value)["mla_latent"]
    kv *= (cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)) / cfg.num_hidden_layers
    free = gpu.hbm_gb * GB - weights - a.serve_workspace_gb * GB
    kv_tokens = max(0.0, free) / kv
    mem = {"weights_non_expert (1/TP)": w_dense / GB, "weights_experts": w_experts / GB,
           "workspace": a.serve_workspace_gb, "kv_cache (rest)": max(0.0, free) / GB}
    out = {"mode": "serve", "unit": asdict(u), "gpus": u.ep, "experts_per_gpu": experts_per_gpu,
           "memory_per_gpu_gb": (weights / GB + a.serve_workspace_gb), "memory_breakdown_gb": mem,
           "memory_capacity_gb": gpu.hbm_gb, "over_capacity": free < 0,
           "kv_cache_bytes_per_token": kv, "kv_capacity_tokens_per_gpu": kv_tokens, "warnings": []}
    if free < 0:
        out["warnings"].append(f"{u.name}: weights + workspace need {(weights / GB + a.serve_workspace_gb):.1f} GB "
                               f"of the {gpu.hbm_gb:g} GB per {gpu.name}; nothing left for the KV cache")

    fp8_rate = gpu.peak_tflops("fp8" if gpu.fp8_tflops else "bf16") * 1e12 * (
        a.fp8_gemm_efficiency if gpu.fp8_tflops else a.bf16_gemm_efficiency)
    bf16_rate = gpu.bf16_tflops * 1e12 * a.bf16_gemm_efficiency
    attn_rate = gpu.bf16_tflops * 1e12 * a.attention_efficiency
    hbm = gpu.hbm_gbps * 1e9 * a.hbm_efficiency
    ib = gpu.nic_gbps * 1e9 * a.ib_efficiency
    d = cfg.hidden_size

    if u.name == "prefill":
        lin = sum(b.gemm_fwd_flops(fp8=True) for b in blocks)
        gate = sum(b.gemm_fwd_flops(fp8=False) for b in blocks)
        attn = sum(b.attn_fwd_flops for b in blocks)
        t_compute = lin / fp8_rate + gate / bf16_rate + attn / attn_rate
        traffic = ep_traffic(cfg, u.ep, gpn, fp8_dispatch=True)
        t_ib = len(moe_blocks) * traffic.ib_bytes_per_token / ib
        per_gpu = 1.0 / max(t_compute, t_ib)
        computed = per_gpu * gpn
        with_hits = computed / (1 - a.prefill_cache_hit_rate)
        out.update({
            "flops_per_token": {"linears": lin, "gate": gate, "attention": attn},
            "bound": "compute" if t_compute >= t_ib else "infiniband",
            "per_gpu_tokens_per_s": {"compute_bound": 1 / t_compute, "ib_bound": 1 / t_ib if t_ib else None},
            "ep_traffic": traffic.to_dict(),
            "tokens_per_s_per_node": computed,
            "input_tokens_per_s_per_node_incl_cache_hits": with_hits,
            "published_input_tokens_per_s_per_node": PUBLISHED["prefill_input_tokens_per_s_per_node"],
            "published_fraction_of_bound": PUBLISHED["prefill_input_tokens_per_s_per_node"] / with_hits,
        })
        return out

    # ---- decode
    ctx = a.serve_context_tokens
    q_per_seq = 1 + (cfg.num_nextn_predict_layers if mtp else 0)     # tokens verified per step
    emitted = 1 + (a.mtp_acceptance if mtp and cfg.num_nextn_predict_layers else 0.0)
    batch = int(kv_tokens // ctx)                                    # sequences per attention group
    layers = len(blocks)
    h = cfg.num_attention_heads
    # absorbed MLA: scores over kv_lora + rope, values over kv_lora, heads split over TP
    attn_flops_tok = 2.0 * (h / u.tp) * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * ctx * layers
    lin_tok = sum(b.gemm_fwd_flops(routed=False) for b in blocks) / u.tp
    tokens_step_gpu = batch * q_per_seq / u.tp          # tokens each GPU dispatches (SP splits them)
    t_mem = (weights + batch * ctx * kv) / hbm
    t_compute = batch * q_per_seq * (attn_flops_tok / attn_rate + lin_tok / fp8_rate)
    k_targets = cfg.num_experts_per_tok + (cfg.n_shared_experts if u.shared_as_routed else 0)
    remote = (u.nodes - 1) / u.nodes
    per_tok_ib = k_targets * remote * (d * (1 + 4 / 128) + 2.0 * d) * len(moe_blocks)
    t_ib = tokens_step_gpu * per_tok_ib / ib
    t_step = max(t_mem, t_compute, t_ib) if batch else float("inf")
    per_node = gpn / u.tp * batch * emitted / t_step if batch else 0.0
    bound = max((("memory", t_mem), ("compute", t_compute), ("infiniband", t_ib)), key=lambda x: x[1])[0]
    out.update({
        "context_tokens": ctx, "batch_per_attention_group": batch,
        "tokens_per_expert_per_step": batch * q_per_seq * (u.ep // u.tp) * k_targets / (u.ep * experts_per_gpu),
        "step_s": {"memory": t_mem, "compute": t_compute, "infiniband": t_ib,
                   "step": t_step if batch else None},
        "bound": bound,
        "tokens_per_user_per_s": emitted / t_step if batch else 0.0,
        "tokens_per_s_per_node": per_node,
        "published_output_tokens_per_s_per_node": PUBLISHED["decode_output_tokens_per_s_per_node"],
        "published_fraction_of_bound": PUBLISHED["decode_output_tokens_per_s_per_node"] / per_node if per_node else None,
    })
    if batch == 0:
        out["warnings"].append(f"decode: no room for one {ctx}-token context per attention group")
    return out
