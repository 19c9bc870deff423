"""Activation memory and element-wise memory traffic per token of one block (SPEC §2.3, §2.4).

Activations are what the forward pass leaves for the backward pass. The report's policy
(``recompute="report"``):
- every RMSNorm is recomputed, so a norm's *input* is kept but not its output;
- the MLA up-projections (``wq_b``, ``wkv_b``) are recomputed, so q, k, v are not kept, only the
  latents they come from;
- Linear inputs are cached in FP8 (1 byte + one FP32 scale per 128 values), the attention-output
  Linear's input in E5M6 (1 byte), the dispatched expert inputs in FP8 (they arrive in FP8);
- SwiGLU's input is cached (FP8), its output recomputed.
``recompute="none"`` keeps everything, ``"full"`` keeps only each block's input and recomputes the
whole forward. In a BF16 run every cached tensor takes 2 bytes per value.

Not kept: the expert outputs. Folding the gate value into the down-projection's input,
``y = W2 (g · swiglu(h))``, gives ``dL/dg = <dL/d(g·s), s>`` from tensors the down-projection's
backward has anyway. The logits: the cross-entropy is fused and chunked over the vocabulary, so only
the head's input is kept.
"""

from __future__ import annotations

from ..config import ModelConfig
from .flops import Block

RECOMPUTE = ("report", "none", "full")
FP8_TILE = 128  # activations: one FP32 scale per 1x128 tile


def _cached_bytes(fp8: bool) -> float:
    """Bytes per cached Linear-input value."""
    return 1.0 + 4.0 / FP8_TILE if fp8 else 2.0


def block_activation_bytes(cfg: ModelConfig, block: Block, *, fp8: bool, recompute: str = "report",
                           expert_load: float = 1.0) -> dict[str, float]:
    """Bytes kept per token of one block for its backward pass, by tensor.

    ``expert_load`` scales what the routed experts keep (their tokens arrive by all-to-all, so the
    busiest GPU holds ``expert_load`` times the mean).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    d, h = cfg.hidden_size, cfg.num_attention_heads
    a = _cached_bytes(fp8)
    out: dict[str, float] = {"block_input (bf16 residual)": 2.0 * d}
    if block.kind == "mtp":
        out["mtp: embedding of the shifted token (bf16)"] = 2.0 * d
    if recompute == "full":
        return out
    keep_norm_out = recompute == "none"
    keep_up = recompute == "none"
    if block.kind == "mtp":
        out["mtp: eh_proj input"] = a * 2 * d
    # attention
    if keep_norm_out:
        out["attn_norm output"] = a * d
    if cfg.q_lora_rank:
        out["q latent c_q (bf16)"] = 2.0 * cfg.q_lora_rank
        if keep_norm_out:
            out["q_norm output"] = a * cfg.q_lora_rank
    out["kv latent c_kv + rope key (bf16)"] = 2.0 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    if keep_norm_out:
        out["kv_norm output"] = a * cfg.kv_lora_rank
    if keep_up:
        out["q, k, v (bf16)"] = 2.0 * h * (2 * cfg.qk_head_dim + cfg.v_head_dim)
    out["attention output (wo input)"] = (1.0 + 4.0 / FP8_TILE if fp8 else 2.0) * h * cfg.v_head_dim
    out["softmax log-sum-exp (fp32)"] = 4.0 * h
    # feed-forward
    out["ffn input residual (bf16)"] = 2.0 * d
    if keep_norm_out:
        out["ffn_norm output"] = a * d
    if block.has_moe:
        k, ns, i = cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.moe_intermediate_size
        out["gate scores (fp32) + chosen ids"] = 4.0 * cfg.n_routed_experts + 4.0 * k
        out["dispatched expert inputs"] = expert_load * k * a * d
        if ns and not keep_norm_out:
            out["shared expert input"] = a * d
        out["swiglu inputs (routed)"] = expert_load * k * a * 2 * i
        if ns:
            out["swiglu inputs (shared)"] = ns * a * 2 * i
        if recompute == "none":
            out["swiglu outputs"] = (expert_load * k + ns) * a * i
    else:
        inter = cfg.intermediate_size
        if not keep_norm_out:
            out["ffn input"] = a * d
        out["swiglu input"] = a * 2 * inter
        if recompute == "none":
            out["swiglu output"] = a * inter
    return out


def head_activation_bytes(cfg: ModelConfig) -> float:
    """Kept per token by the final norm + output head (+ fused chunked cross-entropy): its input."""
    return 2.0 * cfg.hidden_size


def block_transient_bytes(cfg: ModelConfig, block: Block, expert_load: float = 1.0) -> float:
    """Bytes per token alive while one block runs its backward: everything it would keep without
    recomputation, in BF16 (the recomputed tensors and their gradients)."""
    full = block_activation_bytes(cfg, block, fp8=False, recompute="none", expert_load=expert_load)
    return sum(full.values())


def block_elementwise_bytes(cfg: ModelConfig, block: Block, *, fp8: bool, expert_load: float = 1.0) -> float:
    """HBM bytes per token moved by one block's forward memory-bound kernels.

    Counted passes (read + write): the RMSNorms fused with the FP8 cast of their output, RoPE on the
    query, the cast of the attention output, residual adds, the gate's score/top-k, the permutation of
    dispatched tokens into expert order, SwiGLU (reading the up-projection output, writing the
    down-projection input and the FP8 cache of its input), and the weighted combine.
    """
    d, h = cfg.hidden_size, cfg.num_attention_heads
    q = 1.0 + 4.0 / FP8_TILE if fp8 else 2.0
    by = 2.0 * d + q * d                                   # attn_norm (+ cast)
    if cfg.q_lora_rank:
        by += 2.0 * cfg.q_lora_rank + q * cfg.q_lora_rank  # q_norm (+ cast)
    by += 2.0 * cfg.kv_lora_rank + q * cfg.kv_lora_rank    # kv_norm (+ cast)
    by += 2 * 2.0 * (h + 1) * cfg.qk_rope_head_dim         # RoPE on q_pe (all heads) and k_pe
    by += 2.0 * h * cfg.v_head_dim + q * h * cfg.v_head_dim   # cast of the attention output
    by += 3 * 2.0 * d                                      # residual add
    by += 2.0 * d + q * d                                  # ffn_norm (+ cast)
    if block.has_moe:
        k, ns, i = cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.moe_intermediate_size
        e = expert_load * k
        by += 2 * 4.0 * cfg.n_routed_experts               # sigmoid + top-k over the scores
        by += e * 2 * q * d                                # permute received tokens into expert order
        by += (e + ns) * (2.0 * 2 * i + q * i + (q * 2 * i if fp8 else 0.0))  # SwiGLU (+ casts)
        by += e * 2.0 * d + 2.0 * d + 2.0 * d              # combine: weighted sum + shared output
    else:
        inter = cfg.intermediate_size
        by += 2.0 * 2 * inter + q * inter + (q * 2 * inter if fp8 else 0.0)
    by += 3 * 2.0 * d                                      # residual add
    if block.kind == "mtp":
        by += 2 * (2.0 * d + q * d) + 2.0 * d              # enorm, hnorm (+ casts), embedding lookup
    return by


def block_recompute_bytes(cfg: ModelConfig, block: Block, *, fp8: bool, expert_load: float = 1.0) -> float:
    """HBM bytes per token the report's recomputation adds in backward: the RMSNorms (with their FP8
    casts) and SwiGLU's output (the MLA up-projections are GEMMs, counted as FLOPs)."""
    d = cfg.hidden_size
    q = 1.0 + 4.0 / FP8_TILE if fp8 else 2.0
    by = 2 * (2.0 * d + q * d) + (2.0 + q) * cfg.kv_lora_rank
    if cfg.q_lora_rank:
        by += (2.0 + q) * cfg.q_lora_rank
    if block.has_moe:
        e = expert_load * cfg.num_experts_per_tok + cfg.n_shared_experts
        by += e * (2.0 * 2 * cfg.moe_intermediate_size + q * cfg.moe_intermediate_size)
    else:
        by += 2.0 * 2 * cfg.intermediate_size + q * cfg.intermediate_size
    if block.kind == "mtp":
        by += 2 * (2.0 * d + q * d)
    return by
