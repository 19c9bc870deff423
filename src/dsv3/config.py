"""ModelConfig: every hyper-parameter of a DeepSeek-V3-family model (SPEC §1), its presets,
validation, and the mapping to and from a Hugging Face ``config.json``.

Field names follow the Hugging Face config so that ``from_hf``/``to_hf`` are near-identity maps.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

# HF keys we read/write verbatim (besides the rope and quantization dictionaries).
_HF_SCALAR_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
    "scoring_func", "topk_method", "num_nextn_predict_layers", "rms_norm_eps", "rope_theta",
    "max_position_embeddings", "tie_word_embeddings", "initializer_range", "bos_token_id",
    "eos_token_id", "pad_token_id", "hidden_act",
)

_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


@dataclass
class ModelConfig:
    # vocabulary and trunk
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3          # the first k layers use a dense FFN, the rest MoE
    intermediate_size: int = 18432          # dense FFN (SwiGLU) width
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006        # report §4.2: init std 0.006
    # Multi-head latent attention (SPEC §1.1)
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536          # 0 / None: a single wq projection (no query LoRA)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    max_position_embeddings: int = 163840
    # {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    #  "mscale", "mscale_all_dim"} or None for plain RoPE
    rope_scaling: dict | None = None
    # DeepSeekMoE (SPEC §1.2)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"           # "sigmoid" (V3) | "softmax" (V2)
    topk_method: str = "noaux_tc"
    # Multi-token prediction (SPEC §1.4)
    num_nextn_predict_layers: int = 1
    # special ids
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # checkpoint storage (SPEC §1.5); None = plain BF16/FP32 weights
    quantization_config: dict | None = None
    # keys of an HF config.json we do not model, kept so to_hf() round-trips them
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.q_lora_rank == 0:
            self.q_lora_rank = None
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{name} = {getattr(self, name)!r}: {why}")

        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "max_position_embeddings", "n_group", "topk_group")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers",
                     "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0):
            raise bad("q_lora_rank", "must be a positive integer, or 0/None for a single wq")
        if self.rms_norm_eps <= 0:
            raise bad("rms_norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            raise bad("rope_theta", "must be > 0")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "RoPE rotates pairs of elements, so it must be even")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise bad("scoring_func", "must be 'sigmoid' or 'softmax'")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"exceeds num_hidden_layers ({self.num_hidden_layers})")
        if self.num_moe_layers > 0:
            if self.n_routed_experts <= 0:
                raise bad("n_routed_experts", "must be > 0 when the model has MoE layers")
            if self.moe_intermediate_size <= 0:
                raise bad("moe_intermediate_size", "must be > 0 when the model has MoE layers")
            if self.num_experts_per_tok <= 0:
                raise bad("num_experts_per_tok", "must be > 0 when the model has MoE layers")
            if self.n_routed_experts % self.n_group:
                raise bad("n_routed_experts", f"must be divisible by n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                raise bad("topk_group", f"cannot exceed n_group ({self.n_group})")
            kept = self.topk_group * (self.n_routed_experts // self.n_group)
            if self.num_experts_per_tok > kept:
                raise bad("num_experts_per_tok",
                          f"the {self.topk_group} kept groups hold only {kept} experts")
            if self.n_group > 1 and self.n_routed_experts // self.n_group < 2 and self.topk_group < self.n_group:
                raise bad("n_group", "group scores sum the top-2 experts of a group; groups need >= 2 experts")
        if self.routed_scaling_factor <= 0:
            raise bad("routed_scaling_factor", "must be > 0")
        rs = self.rope_scaling
        if rs is not None:
            if rs["factor"] < 1:
                raise ValueError(f"ModelConfig.rope_scaling['factor'] = {rs['factor']}: must be >= 1")
            if rs["original_max_position_embeddings"] <= 0:
                raise ValueError("ModelConfig.rope_scaling['original_max_position_embeddings'] must be > 0")
        if self.quantization_config is not None:
            block = self.quantization_config.get("weight_block_size", [128, 128])
            if len(block) != 2 or any(int(b) <= 0 for b in block):
                raise ValueError(f"ModelConfig.quantization_config['weight_block_size'] = {block!r}: two positive ints")

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers ``first_k_dense_replace .. num_hidden_layers-1`` are MoE; MTP blocks are MoE too."""
        return layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times mscale² under YaRN (SPEC §1.1)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs["factor"] > 1 and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return cls(**copy.deepcopy(PRESETS[name]))

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> "ModelConfig":
        """A preset name, an HF ``config.json``, or a directory holding one."""
        s = str(name_or_path)
        if s in PRESETS:
            return cls.preset(s)
        if os.path.isdir(s) or s.endswith(".json") or os.path.exists(s):
            return cls.from_hf(s)
        raise ValueError(f"{s!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing config.json")

    # ------------------------------------------------------------------ HF mapping
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> "ModelConfig":
        """Build from an HF ``config.json`` (path, directory, or already-parsed dict)."""
        if isinstance(source, dict):
            hf = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise ValueError(f"config file not found: {path}")
            try:
                with open(path) as f:
                    hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        mt = hf.get("model_type")
        if mt is not None and mt not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            raise ValueError(f"model_type {mt!r} is not a DeepSeek-V2/V3 model")
        kwargs: dict[str, Any] = {}
        for k in _HF_SCALAR_KEYS:
            if k in hf and hf[k] is not None:
                kwargs[k] = hf[k]
        if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
            kwargs["num_nextn_predict_layers"] = hf["num_mtp_layers"]
        if "q_lora_rank" in hf and hf["q_lora_rank"] is None:
            kwargs["q_lora_rank"] = None
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        # V2-Lite style: n_group/topk_group may be absent or null (no group routing)
        for k, dflt in (("n_group", 1), ("topk_group", 1)):
            if hf.get(k) is None:
                kwargs[k] = dflt
        if hf.get("n_routed_experts") is None:
            kwargs["n_routed_experts"] = 0
            kwargs["first_k_dense_replace"] = hf.get("num_hidden_layers", cls.num_hidden_layers)
        if hf.get("num_experts_per_tok") is None and kwargs.get("n_routed_experts", 1) == 0:
            kwargs["num_experts_per_tok"] = 0
        # RoPE: legacy rope_scaling + rope_theta, or transformers>=5 rope_parameters
        rope = hf.get("rope_scaling")
        params = hf.get("rope_parameters")
        if isinstance(params, dict):
            if "rope_theta" in params:
                kwargs["rope_theta"] = params["rope_theta"]
            if rope is None and params.get("rope_type", params.get("type", "default")) != "default":
                rope = params
        if rope is not None and rope.get("rope_type", rope.get("type")) not in (None, "default"):
            kwargs["rope_scaling"] = rope
        if "quantization_config" in hf:
            kwargs["quantization_config"] = hf["quantization_config"]
        known = set(_HF_SCALAR_KEYS) | {"rope_scaling", "rope_parameters", "quantization_config",
                                        "model_type", "num_mtp_layers"}
        kwargs["extra"] = {k: v for k, v in hf.items() if k not in known}
        return cls(**kwargs)

    def to_hf(self) -> dict:
        """The HF ``config.json`` dict (DeepSeek's original key names, which transformers reads)."""
        out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        out.update({k: v for k, v in self.extra.items() if k not in ("architectures",)})
        for k in _HF_SCALAR_KEYS:
            out[k] = getattr(self, k)
        out["num_key_value_heads"] = self.num_attention_heads
        out["rope_interleave"] = True
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(self.rope_scaling)
        else:
            out.pop("rope_scaling", None)
        if self.quantization_config is not None:
            out["quantization_config"] = copy.deepcopy(self.quantization_config)
        return out

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf(), f, indent=2, sort_keys=True)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature factor: 0.1·mscale·ln(factor) + 1 (1 when factor ≤ 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _normalise_rope_scaling(rs: dict) -> dict:
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ValueError(f"ModelConfig.rope_scaling: only 'yarn' scaling is supported, got {kind!r}")
    if "factor" not in rs or "original_max_position_embeddings" not in rs:
        raise ValueError("ModelConfig.rope_scaling needs 'factor' and 'original_max_position_embeddings'")
    out = {"type": "yarn", "factor": float(rs["factor"]),
           "original_max_position_embeddings": int(rs["original_max_position_embeddings"])}
    for k, d in _YARN_DEFAULTS.items():
        out[k] = float(rs.get(k, d) if rs.get(k) is not None else d)
    return out


_V3 = dict(
    vocab_size=129280, hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3,
    intermediate_size=18432, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
    max_position_embeddings=163840,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
    num_nextn_predict_layers=1, rms_norm_eps=1e-6,
    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                         "weight_block_size": [128, 128]},
)

PRESETS: dict[str, dict] = {
    # Every feature on, small enough to train in minutes on 2 CPU cores.
    "tiny": dict(
        vocab_size=2048, hidden_size=128, num_hidden_layers=3, first_k_dense_replace=1, initializer_range=0.02,
        intermediate_size=320, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=64,
        n_group=2, topk_group=1, routed_scaling_factor=1.0, num_nextn_predict_layers=1,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    ),
    # A ~0.5B-total research model (single GPU).
    "small": dict(
        vocab_size=32768, hidden_size=1024, num_hidden_layers=12, first_k_dense_replace=1,
        intermediate_size=2816, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, moe_intermediate_size=352,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
    ),
    "deepseek-v3": _V3,
    # DeepSeek-V2-Lite (16B): no query LoRA, softmax gate, no group routing, no MTP.
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=27, first_k_dense_replace=1,
        intermediate_size=10944, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        scoring_func="softmax", topk_method="greedy", num_nextn_predict_layers=0,
        bos_token_id=100000, eos_token_id=100001,
    ),
}
