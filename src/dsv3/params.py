"""Parameter counts from a ModelConfig alone (no weights are allocated)."""

from __future__ import annotations

from .config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    h, d = cfg.num_attention_heads, cfg.hidden_size
    if cfg.q_lora_rank:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    else:
        q = d * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + h * cfg.v_head_dim * d


def ffn_params(dim: int, inter: int) -> int:
    """SwiGLU: gate, up (dim→inter) and down (inter→dim)."""
    return 3 * dim * inter


def moe_params(cfg: ModelConfig) -> dict:
    """Per MoE layer: gate, one routed expert, shared experts."""
    d = cfg.hidden_size
    return {
        "gate": cfg.n_routed_experts * d,
        "expert": ffn_params(d, cfg.moe_intermediate_size),
        "shared": ffn_params(d, cfg.moe_intermediate_size * cfg.n_shared_experts),
    }


def layer_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    """(total, activated) parameters of one transformer block."""
    base = attention_params(cfg) + 2 * cfg.hidden_size  # + the two RMSNorms
    if not moe:
        n = base + ffn_params(cfg.hidden_size, cfg.intermediate_size)
        return n, n
    m = moe_params(cfg)
    common = base + m["gate"] + m["shared"]
    return (common + cfg.n_routed_experts * m["expert"],
            common + cfg.num_experts_per_tok * m["expert"])


def count_parameters(cfg: ModelConfig) -> dict:
    """Total and activated parameters of the main model, and of the MTP modules.

    ``total``/``activated`` exclude MTP (the report's 671B/37B). ``mtp`` is what the MTP layers
    add to a checkpoint (their norms, projection and block plus the copies of embedding and head the
    HF layout stores at index ``num_hidden_layers``: the report's 14B, 685B in all);
    ``mtp_own`` counts only the weights that are not shared with the main model.
    """
    d, v = cfg.hidden_size, cfg.vocab_size
    embed_head = v * d * (1 if cfg.tie_word_embeddings else 2)
    dense_t, _ = layer_params(cfg, moe=False)
    moe_t, moe_a = layer_params(cfg, moe=True)
    nd, nm = cfg.num_dense_layers, cfg.num_moe_layers
    total = embed_head + nd * dense_t + nm * moe_t + d
    activated = embed_head + nd * dense_t + nm * moe_a + d
    # MTP module: enorm, hnorm, eh_proj (2d→d), one block (MoE unless the model has no experts),
    # shared_head.norm
    mtp_t, mtp_a = (moe_t, moe_a) if cfg.n_routed_experts > 0 else (dense_t, dense_t)
    per_mtp_t = 3 * d + 2 * d * d + mtp_t
    per_mtp_a = 3 * d + 2 * d * d + mtp_a
    D = cfg.num_nextn_predict_layers
    mtp = D * (per_mtp_t + 2 * v * d)
    return {
        "total": total,
        "activated": activated,
        "mtp": mtp,
        "mtp_own": D * per_mtp_t,
        "mtp_activated": D * per_mtp_a,
        "total_with_mtp": total + mtp,
        "embedding": v * d,
    }


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> dict:
    """Inference cache per token over all layers: MLA latent (c_kv + RoPE key) vs full multi-head K/V."""
    L = cfg.num_hidden_layers
    latent = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value
    full = L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * bytes_per_value
    return {"mla_latent": latent, "full_mha": full, "ratio": full / latent}
