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
    eos_token_id: int | list[int] | None = 1   # a list (as DeepSeek's and many HF configs allow): each one stops
    pad_token_id: int | None = None
    # checkpoint storage (SPEC §1.5); None = plain BF16/FP32 weights
    quantization_config: dict | None = None
    # keys of an HF config.json we do not model, kept so to_hf() round-trips them
    extra: dict = field(default_factory=dict, repr=False, compare=False)
    # keys a config.json did not give (or gave as null where that means "default"), with the value taken
    defaulted: dict = field(default_factory=dict, repr=False, compare=False)

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

        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        for name in _STR_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise bad(name, "must be a string")
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if name == "eos_token_id" and isinstance(v, list):
                if not v or any(isinstance(t, bool) or not isinstance(t, int) for t in v):
                    raise bad(name, "must be a token id, a non-empty list of token ids, or null")
                continue
            if isinstance(v, bool) or not (isinstance(v, int) or (v is None and name in _NULLABLE_INTS)):
                raise bad(name, "must be an integer" + (" or null" if name in _NULLABLE_INTS else ""))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if any(t < 0 for t in _ids(v)):
                raise bad(name, "must be a non-negative token id or null")
        for name in ("bos_token_id", "eos_token_id"):   # generation could never start or stop on it
            v = getattr(self, name)
            if isinstance(self.vocab_size, int) and any(t >= self.vocab_size for t in _ids(v)):
                raise bad(name, f"is not a token of the vocabulary (vocab_size {self.vocab_size})")
        for name in ("rope_scaling", "quantization_config"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise bad(name, "must be an object {…} or null")
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
        if self.topk_method not in TOPK_METHODS:   # any other name was taken as a V2-style gate without a word
            raise bad("topk_method", "must be " + ", ".join(repr(m) for m in TOPK_METHODS))
        if self.initializer_range < 0:
            raise bad("initializer_range", "must be >= 0 (the standard deviation of the initial weights)")
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
            qc = self.quantization_config
            # any other scheme (AWQ, GPTQ, bitsandbytes, …) stores weights dsv3 would misread as BF16 ones
            if qc.get("quant_method", "fp8") != "fp8":
                raise ValueError(f"ModelConfig.quantization_config['quant_method'] = {qc['quant_method']!r}: dsv3 "
                                 "loads BF16/FP32 checkpoints and DeepSeek's FP8 ones ('fp8', E4M3 with block scales)")
            if qc.get("fmt", "e4m3") != "e4m3":
                raise ValueError(f"ModelConfig.quantization_config['fmt'] = {qc['fmt']!r}: only 'e4m3' FP8 weights "
                                 "are supported")
            block = qc.get("weight_block_size", [128, 128])
            if (not isinstance(block, (list, tuple)) or len(block) != 2
                    or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in block)):
                raise ValueError(f"ModelConfig.quantization_config['weight_block_size'] = {block!r}: "
                                 f"must be a list of two positive integers, e.g. [128, 128]")

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id (``eos_token_id`` may be one id, a list of them, or null): generation
        stops on each, as transformers' does."""
        return _ids(self.eos_token_id)

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
        """Build from an HF ``config.json`` (path, directory, or already-parsed dict).

        Every key read is type-checked (a ValueError names the file and the key). A key that is absent
        takes transformers' ``DeepseekV3Config`` default (``TRANSFORMERS_DEFAULTS``); null is refused
        where transformers refuses it, and means "none" for the optional keys (``q_lora_rank``, the token
        ids, ``rope_scaling``, ``quantization_config``) and "no group routing" / "dense" for
        ``n_group``/``topk_group`` / ``n_routed_experts``, as DeepSeek-V2's configs use them. The keys that
        took a default are listed in ``cfg.defaulted``."""
        where = "config"
        if isinstance(source, dict):
            hf = dict(source)
        else:
            from .errors import read_json

            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise ValueError(f"config file not found: {path}")
            hf = read_json(path, "config file")
            where = path
        try:
            return cls._from_hf_dict(hf)
        except ValueError as e:
            if where == "config":
                raise
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def _from_hf_dict(cls, hf: dict) -> "ModelConfig":
        if not isinstance(hf, dict):
            raise ValueError(f"a config must be a JSON object, got {type(hf).__name__}")
        mt = hf.get("model_type")
        if mt is not None and mt not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            raise ValueError(f"model_type {mt!r} is not a DeepSeek-V2/V3 model")
        if not any(k in hf for k in _HF_SCALAR_KEYS + ("num_mtp_layers",)) and mt is None:
            raise ValueError("this does not look like a model config: none of its keys is one of "
                             "vocab_size, hidden_size, num_hidden_layers, … and it has no model_type")
        _check_hf_types(hf)
        if "rope_interleave" in hf:   # transformers: false means the half-split RoPE layout, which we do not run
            from .errors import json_kind

            if not isinstance(hf["rope_interleave"], bool):
                raise ValueError(f"rope_interleave = {json.dumps(hf['rope_interleave'])[:60]}: must be true or "
                                 f"false, found {json_kind(hf['rope_interleave'])}")
            if not hf["rope_interleave"]:
                raise ValueError("rope_interleave = false: only DeepSeek's interleaved RoPE layout (true, the "
                                 "default) is supported; these weights expect the half-split one")
        kwargs: dict[str, Any] = {}
        defaulted: dict[str, Any] = {}
        for k in _HF_SCALAR_KEYS:
            if k in hf and hf[k] is not None:
                kwargs[k] = hf[k]
        if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
            kwargs["num_nextn_predict_layers"] = hf["num_mtp_layers"]
        if "q_lora_rank" in hf and hf["q_lora_rank"] is None:
            kwargs["q_lora_rank"] = None
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if k in hf and hf[k] is None:
                kwargs[k] = None
        if isinstance(kwargs.get("eos_token_id"), list):   # kept whole: every id stops, and it is saved as given
            kwargs["eos_token_id"] = list(kwargs["eos_token_id"])
        # V2-Lite style: n_group/topk_group null (no group routing); absent: transformers' default
        for k in ("n_group", "topk_group"):
            if k in hf and hf[k] is None:
                kwargs[k] = 1
        if "n_routed_experts" in hf and hf["n_routed_experts"] is None:   # DeepSeek's configs: dense model
            kwargs["n_routed_experts"] = 0
            kwargs["first_k_dense_replace"] = hf.get("num_hidden_layers") or TRANSFORMERS_DEFAULTS["num_hidden_layers"]
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
        for k, v in TRANSFORMERS_DEFAULTS.items():
            if k not in kwargs:
                kwargs[k] = v
                defaulted[k] = v
        _check_kv_heads(hf.get("num_key_value_heads"), kwargs["num_attention_heads"])
        known = set(_HF_SCALAR_KEYS) | {"rope_scaling", "rope_parameters", "quantization_config",
                                        "model_type", "num_mtp_layers"}
        kwargs["extra"] = {k: v for k, v in hf.items() if k not in known}
        cfg = cls(**kwargs)
        cfg.defaulted = defaulted
        return cfg

    def to_hf(self) -> dict:
        """The HF ``config.json`` dict (DeepSeek's original key names, which transformers reads)."""
        out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        out.update({k: v for k, v in self.extra.items() if k not in ("architectures",)})
        for k in _HF_SCALAR_KEYS:
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, list) else v
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


def _ids(v) -> tuple[int, ...]:
    """The token ids of a ``*_token_id`` value: none for null, one for an id, all of a list."""
    return () if v is None else tuple(v) if isinstance(v, (list, tuple)) else (v,)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature factor: 0.1·mscale·ln(factor) + 1 (1 when factor ≤ 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _normalise_rope_scaling(rs: dict) -> dict:
    if not isinstance(rs, dict):
        raise ValueError(f"ModelConfig.rope_scaling = {rs!r}: must be an object "
                         f"{{\"type\": \"yarn\", \"factor\": …, \"original_max_position_embeddings\": …}} or null")
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ValueError(f"ModelConfig.rope_scaling: only 'yarn' scaling is supported, got {kind!r}")
    if "factor" not in rs or "original_max_position_embeddings" not in rs:
        raise ValueError("ModelConfig.rope_scaling needs 'factor' and 'original_max_position_embeddings'")
    for k in ("factor", "original_max_position_embeddings", *_YARN_DEFAULTS):
        v = rs.get(k)
        if v is None and k in _YARN_DEFAULTS:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"ModelConfig.rope_scaling['{k}'] = {v!r}: must be a finite number")
    if int(rs["original_max_position_embeddings"]) != rs["original_max_position_embeddings"]:
        raise ValueError(f"ModelConfig.rope_scaling['original_max_position_embeddings'] = "
                         f"{rs['original_max_position_embeddings']!r}: must be an integer")
    out = {"type": "yarn", "factor": float(rs["factor"]),
           "original_max_position_embeddings": int(rs["original_max_position_embeddings"])}
    for k, d in _YARN_DEFAULTS.items():
        out[k] = float(rs.get(k, d) if rs.get(k) is not None else d)
    if rs.get("mscale") is None and rs.get("mscale_all_dim"):
        # transformers (the reference) scales cos/sin by mscale/mscale_all_dim only when both are given,
        # else by mscale(factor); 0 says "not given" where the default 1.0 would make it the ratio
        out["mscale"] = 0.0
    # transformers' optional YaRN keys: an explicit cos/sin magnitude, and whether the ramp's ends are
    # rounded to whole dimensions (default true, DeepSeek's)
    if rs.get("attention_factor") is not None:
        v = rs["attention_factor"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"ModelConfig.rope_scaling['attention_factor'] = {v!r}: must be a finite number > 0")
        out["attention_factor"] = float(v)
    if rs.get("truncate") is not None:
        if not isinstance(rs["truncate"], bool):
            raise ValueError(f"ModelConfig.rope_scaling['truncate'] = {rs['truncate']!r}: must be true or false")
        out["truncate"] = rs["truncate"]
    return out


# transformers' DeepseekV3Config defaults: what a config.json key that is absent means
TRANSFORMERS_DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
    norm_topk_prob=True, hidden_act="silu", max_position_embeddings=4096, initializer_range=0.02,
    rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False,
    rope_theta=10000.0, num_nextn_predict_layers=1,
)

_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
               "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
               "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
               "n_group", "topk_group", "num_nextn_predict_layers", "max_position_embeddings", "bos_token_id",
               "eos_token_id", "pad_token_id")
_NULLABLE_INTS = ("q_lora_rank", "bos_token_id", "eos_token_id", "pad_token_id")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")   # DeepSeek-V3's, and V2's two
_FLOAT_FIELDS = ("routed_scaling_factor", "rms_norm_eps", "rope_theta", "initializer_range")
_BOOL_FIELDS = ("norm_topk_prob", "tie_word_embeddings")
_STR_FIELDS = ("scoring_func", "topk_method", "hidden_act")
# keys whose null means something (see from_hf); any other key given as null is refused
_HF_NULLABLE = ("q_lora_rank", "bos_token_id", "eos_token_id", "pad_token_id", "n_group", "topk_group",
                "n_routed_experts", "num_experts_per_tok", "rope_scaling", "rope_parameters", "quantization_config",
                "num_key_value_heads")


def _check_kv_heads(kv_heads, heads) -> None:
    """config.json's ``num_key_value_heads``: null, absent or ``num_attention_heads``. Multi-head latent
    attention has no separate key/value heads (every query head gets its own key and value from the shared
    latent through kv_b_proj), so no other value can be honoured; transformers' DeepseekV3 repeats its keys
    num_attention_heads / num_key_value_heads times and fails on the shapes (ValueError naming the field)."""
    from .errors import json_kind

    if kv_heads is None:
        return
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int):
        raise ValueError(f"num_key_value_heads = {json.dumps(kv_heads)[:60]}: must be an integer or null, found "
                         f"{json_kind(kv_heads)}")
    if kv_heads != heads:
        raise ValueError(f"num_key_value_heads = {kv_heads}: must equal num_attention_heads ({heads}) or be left out; "
                         f"DeepSeek's multi-head latent attention has no separate key/value heads (each head's "
                         f"key and value come from the shared latent), and transformers' DeepseekV3 fails on "
                         f"any other value")


def _check_hf_types(hf: dict) -> None:
    """Each key of a config.json that from_hf reads has the JSON type it needs (ValueError naming it)."""
    from .errors import json_kind

    def bad(k: str, want: str) -> ValueError:
        return ValueError(f"{k} = {json.dumps(hf[k])[:60]}: must be {want}, found {json_kind(hf[k])}")

    for k in (*_HF_SCALAR_KEYS, "num_mtp_layers", "rope_scaling", "rope_parameters", "quantization_config"):
        if k not in hf:
            continue
        v = hf[k]
        if v is None:
            if k not in _HF_NULLABLE:
                raise ValueError(f"{k} is null; give a value or leave the key out (the default is "
                                 f"{TRANSFORMERS_DEFAULTS.get(k)!r})")
            continue
        if k == "eos_token_id" and isinstance(v, list):
            if not v or any(isinstance(t, bool) or not isinstance(t, int) for t in v):
                raise bad(k, "a token id or a non-empty list of token ids")
        elif k in _INT_FIELDS or k == "num_mtp_layers":
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(k, "an integer")
        elif k in _FLOAT_FIELDS:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(k, "a finite number")
        elif k in _BOOL_FIELDS:
            if not isinstance(v, bool):
                raise bad(k, "true or false")
        elif k in _STR_FIELDS:
            if not isinstance(v, str):
                raise bad(k, "a string")
        elif k in ("rope_scaling", "rope_parameters", "quantization_config"):
            if not isinstance(v, dict):
                raise bad(k, "an object {…} or null")
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        t = params["rope_theta"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"rope_parameters.rope_theta = {t!r}: must be a finite number")


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
