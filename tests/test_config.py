"""ModelConfig (presets, HF mapping, validation), parameter counts, and ``dsv3 info``."""

import copy
import json
import os
import re

import pytest
import torch

import dsv3
from dsv3 import ModelConfig, count_parameters
from dsv3.cli import main
from dsv3.config import PRESETS
from dsv3.params import kv_cache_bytes_per_token

DATA = os.path.join(os.path.dirname(__file__), "data")
V3_JSON = os.path.join(DATA, "deepseek-v3-config.json")   # the released config.json of DeepSeek-V3


# ------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    cfg = ModelConfig.preset(name)
    cfg.validate()
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg   # through real JSON
    assert ModelConfig.load(name) == cfg
    assert ModelConfig.preset(name) is not cfg and ModelConfig.preset(name) == cfg


def test_preset_copies_are_independent():
    a = ModelConfig.preset("deepseek-v3")
    a.rope_scaling["factor"] = 2.0
    assert ModelConfig.preset("deepseek-v3").rope_scaling["factor"] == 40


def test_tiny_preset_has_every_feature_on():
    t = ModelConfig.preset("tiny")
    assert t.q_lora_rank and t.n_routed_experts >= 8 and t.n_group >= 2 and t.topk_group < t.n_group
    assert t.first_k_dense_replace >= 1 and t.num_moe_layers >= 1 and t.num_nextn_predict_layers == 1


def test_deepseek_v3_preset_equals_the_released_config():
    ref = ModelConfig.from_hf(V3_JSON)
    v3 = ModelConfig.preset("deepseek-v3")
    # The one difference is deliberate: the preset initialises with the report's std 0.006
    # (§4.2); the released config.json carries transformers' default 0.02.
    assert v3.initializer_range == 0.006 and ref.initializer_range == 0.02
    assert v3.replace(initializer_range=0.02) == ref
    # spot-check the SPEC §1.5 numbers
    assert (v3.vocab_size, v3.hidden_size, v3.num_hidden_layers, v3.first_k_dense_replace) == (129280, 7168, 61, 3)
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.n_group, v3.topk_group) == (256, 8, 8, 4)
    assert v3.rope_scaling["factor"] == 40 and v3.quantization_config["weight_block_size"] == [128, 128]


def test_v2_lite_preset():
    c = ModelConfig.preset("deepseek-v2-lite")
    assert c.q_lora_rank is None and c.scoring_func == "softmax" and c.num_nextn_predict_layers == 0


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("deepseek-v9")
    with pytest.raises(ValueError, match="neither a preset"):
        ModelConfig.load("deepseek-v9")


# ------------------------------------------------------------------------------ HF mapping
def test_to_hf_reproduces_the_released_config():
    with open(V3_JSON) as f:
        ref = json.load(f)
    out = ModelConfig.from_hf(V3_JSON).to_hf()
    for k, v in ref.items():
        assert out[k] == v, k
    assert out["model_type"] == "deepseek_v3" and out["rope_interleave"] is True
    assert out["quantization_config"] == ref["quantization_config"]
    assert out["rope_scaling"] == ref["rope_scaling"]


def test_from_hf_accepts_path_directory_and_dict(tmp_path):
    with open(V3_JSON) as f:
        ref = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(ref))
    a = ModelConfig.from_hf(V3_JSON)
    assert ModelConfig.from_hf(str(tmp_path)) == a == ModelConfig.from_hf(ref) == ModelConfig.load(tmp_path)
    cfg = ModelConfig.preset("small")
    cfg.save(tmp_path / "small.json")
    assert ModelConfig.load(tmp_path / "small.json") == cfg


def test_from_hf_rope_parameters_transformers5():
    """transformers ≥ 5 writes ``rope_parameters`` (with rope_theta inside) instead of rope_scaling."""
    hf = ModelConfig.preset("tiny").to_hf()
    hf.pop("rope_scaling", None)
    hf.pop("rope_theta")
    hf["rope_parameters"] = {"rope_type": "yarn", "type": "yarn", "rope_theta": 50000.0, "factor": 8.0,
                             "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2,
                             "mscale": 0.9, "mscale_all_dim": 0.8}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling == {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128,
                                "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.9, "mscale_all_dim": 0.8}
    back = cfg.to_hf()
    assert back["rope_theta"] == 50000.0 and back["rope_scaling"]["factor"] == 8.0
    assert ModelConfig.from_hf(back) == cfg
    # plain RoPE in the new format
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_scaling is None and cfg.rope_theta == 1234.0
    assert "rope_scaling" not in cfg.to_hf()


def test_from_hf_legacy_rope_scaling_defaults():
    hf = ModelConfig.preset("tiny").to_hf()
    hf["rope_scaling"] = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 256}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_quantization_config_round_trip():
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    cfg = ModelConfig.preset("tiny").replace(quantization_config=copy.deepcopy(qc))
    hf = cfg.to_hf()
    assert hf["quantization_config"] == qc
    assert ModelConfig.from_hf(hf).quantization_config == qc
    assert "quantization_config" not in ModelConfig.preset("tiny").to_hf()


def test_from_hf_aliases_and_nulls():
    hf = ModelConfig.preset("tiny").to_hf()
    hf.pop("num_nextn_predict_layers")
    hf["num_mtp_layers"] = 2                       # transformers' name
    hf["q_lora_rank"] = 0
    hf["eos_token_id"] = [1, 5]
    assert ModelConfig.from_hf(hf).num_nextn_predict_layers == 2
    assert ModelConfig.from_hf(hf).q_lora_rank is None
    assert ModelConfig.from_hf(hf).eos_token_id == [1, 5]          # every id kept (each one stops generation)
    assert ModelConfig.from_hf(hf).eos_token_ids == (1, 5)
    assert ModelConfig.from_hf(hf).to_hf()["eos_token_id"] == [1, 5]
    # V2-Lite style: no group routing given → one group
    hf = ModelConfig.preset("deepseek-v2-lite").to_hf()
    hf["n_group"] = hf["topk_group"] = None
    cfg = ModelConfig.from_hf(hf)
    assert cfg.n_group == 1 and cfg.topk_group == 1
    # unknown keys survive a round trip
    hf = ModelConfig.preset("tiny").to_hf()
    hf["ep_size"] = 1
    hf["some_future_key"] = {"a": 1}
    assert ModelConfig.from_hf(hf).to_hf()["some_future_key"] == {"a": 1}


def test_from_hf_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        ModelConfig.from_hf(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(bad)
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({**ModelConfig.preset("tiny").to_hf(), "model_type": "llama"})


# ------------------------------------------------------------------------------ validation
VALIDATION = [
    # (changes to the tiny preset, field the message must name)
    ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": 1.5}, "vocab_size"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"intermediate_size": 0}, "intermediate_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"qk_nope_head_dim": 0}, "qk_nope_head_dim"),
    ({"qk_rope_head_dim": 0}, "qk_rope_head_dim"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),            # odd RoPE dim
    ({"v_head_dim": -4}, "v_head_dim"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"n_group": 0}, "n_group"),
    ({"topk_group": 0}, "topk_group"),
    ({"q_lora_rank": -3}, "q_lora_rank"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ({"first_k_dense_replace": 4}, "first_k_dense_replace"),    # more dense layers than layers
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
    ({"n_routed_experts": 0}, "n_routed_experts"),              # MoE layers need experts
    ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts"),   # not divisible by groups
    ({"topk_group": 3}, "topk_group"),                              # > n_group (2)
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),            # 1 kept group of 4 experts
    ({"n_group": 8, "topk_group": 4, "num_experts_per_tok": 2}, "n_group"),   # groups of 1 expert
    ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}}, "rope_scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling"),   # no original length
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}}, "rope_scaling"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "quantization_config"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method"),   # not read as BF16 weights
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "fmt"),
    ({"eos_token_id": 2048}, "eos_token_id"),                   # the tiny vocabulary has 2048 tokens
    ({"eos_token_id": [1, 2048]}, "eos_token_id"),              # every id of a list is checked
    ({"eos_token_id": [1, -3]}, "eos_token_id"),
    ({"bos_token_id": 10**6}, "bos_token_id"),
]


@pytest.mark.parametrize("changes,field", VALIDATION, ids=[f for _, f in VALIDATION])
def test_validation_names_the_field(changes, field):
    base = dict(PRESETS["tiny"])
    with pytest.raises(ValueError, match=re.escape(field)):
        ModelConfig(**{**base, **changes})
    with pytest.raises(ValueError, match=re.escape(field)):   # the same through from_hf
        hf = ModelConfig.preset("tiny").to_hf()
        hf.update(changes)
        ModelConfig.from_hf(hf)


def test_validation_allows_dense_only_and_no_group_limit():
    ModelConfig.preset("tiny").replace(first_k_dense_replace=3, n_routed_experts=0, num_experts_per_tok=0)
    ModelConfig.preset("tiny").replace(n_group=1, topk_group=1, num_experts_per_tok=8)
    ModelConfig.preset("tiny").replace(n_group=8, topk_group=8, num_experts_per_tok=8)  # nothing masked
    assert ModelConfig.preset("tiny").replace(q_lora_rank=0).q_lora_rank is None


# ------------------------------------------------------------------------------ parameter counts
def test_count_parameters_deepseek_v3():
    p = count_parameters(ModelConfig.preset("deepseek-v3"))
    assert abs(p["total"] - 671e9) / 671e9 < 0.005
    assert 36e9 <= p["activated"] <= 38e9
    assert 13e9 <= p["mtp"] <= 15e9                          # "a 14B MTP module"
    assert abs(p["total_with_mtp"] - 685e9) / 685e9 < 0.005   # the 685B of the released checkpoint
    assert p["total_with_mtp"] == p["total"] + p["mtp"]


def test_kv_cache_bytes_deepseek_v3():
    kv = kv_cache_bytes_per_token(ModelConfig.preset("deepseek-v3"), 2)
    assert kv["mla_latent"] == 70272 == 61 * 576 * 2
    assert kv["full_mha"] == 61 * 128 * (192 + 128) * 2
    assert kv_cache_bytes_per_token(ModelConfig.preset("deepseek-v3"), 1)["mla_latent"] == 35136


COUNT_CONFIGS = {
    "tiny": {},
    "no-qlora-2shared-all-moe": {"q_lora_rank": None, "n_shared_experts": 2, "first_k_dense_replace": 0},
    "no-shared-mtp2": {"n_shared_experts": 0, "num_nextn_predict_layers": 2},
    "tied-no-mtp": {"tie_word_embeddings": True, "num_nextn_predict_layers": 0},
    "dense-only": {"first_k_dense_replace": 3, "n_routed_experts": 0, "num_experts_per_tok": 0},
}


@pytest.mark.parametrize("name", COUNT_CONFIGS)
def test_count_parameters_equals_a_built_model(name):
    small = dict(vocab_size=101, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                 q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    cfg = ModelConfig.preset("tiny").replace(**{**small, **COUNT_CONFIGS[name]})
    model = dsv3.Transformer(cfg)
    main_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp_own = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    p = count_parameters(cfg)
    assert p["total"] == main_params
    assert p["mtp_own"] == mtp_own
    # the HF layout stores a copy of embedding and head in every MTP layer
    D, v, d = cfg.num_nextn_predict_layers, cfg.vocab_size, cfg.hidden_size
    assert p["mtp"] == mtp_own + D * 2 * v * d
    unused = cfg.num_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * d * cfg.moe_intermediate_size
    assert p["activated"] == main_params - unused
    if not cfg.tie_word_embeddings:
        from dsv3.hf import hf_state_dict
        stored = sum(t.numel() for k, t in hf_state_dict(model).items() if not k.endswith("e_score_correction_bias"))
        assert p["total_with_mtp"] == stored


# ------------------------------------------------------------------------------ dsv3 info
def test_info_json_deepseek_v3(capsys):
    assert main(["info", "--config", "deepseek-v3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    p = count_parameters(ModelConfig.preset("deepseek-v3"))
    assert r["kv_cache_bytes_per_token_bf16"] == 70272
    assert r["kv_cache_full_mha_bytes_per_token_bf16"] == 4997120
    assert r["total_parameters"] == p["total"] and r["activated_parameters"] == p["activated"]
    assert r["mtp_parameters"] == p["mtp"] and r["total_with_mtp_parameters"] == p["total_with_mtp"]
    assert (r["num_hidden_layers"], r["dense_layers"], r["moe_layers"], r["mtp_layers"]) == (61, 3, 58, 1)
    # BF16: 2 bytes per parameter (+ the fp32 selection biases, which are buffers, not parameters)
    assert r["weight_bytes_bf16"] == 2 * p["total"] + 4 * 58 * 256
    # FP8: ~1 byte per Linear parameter; the released FP8 checkpoint (685B parameters) is ~688.6 GB
    assert 0.99 * p["total"] < r["weight_bytes_fp8"] < 1.01 * p["total"]
    assert abs(r["checkpoint_bytes_fp8"] - 688.6e9) / 688.6e9 < 0.005


def test_info_text_and_path(capsys):
    assert main(["info", "--config", "deepseek-v3"]) == 0
    text = capsys.readouterr().out
    assert "70,272" in text and "671.03B" in text and "MTP" in text and "FP8" in text
    assert main(["info", "--config", V3_JSON, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kv_cache_bytes_per_token_bf16"] == 70272 and r["config"] == V3_JSON


def test_info_unknown_preset(capsys):
    assert main(["info", "--config", "deepseek-v9"]) == 2
    err = capsys.readouterr().err
    assert "deepseek-v9" in err and "preset" in err and "Traceback" not in err


def test_info_invalid_config_file(tmp_path, capsys):
    hf = ModelConfig.preset("tiny").to_hf()
    hf["topk_group"] = 5
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert main(["info", "--config", str(tmp_path)]) == 2
    assert "topk_group" in capsys.readouterr().err


def test_info_weight_bytes_match_a_saved_checkpoint(tmp_path, capsys):
    """The FP8/BF16 byte counts equal what save_pretrained really writes (tiny preset, edge blocks)."""
    from safetensors import safe_open

    from dsv3.commands.info import info

    cfg = ModelConfig.preset("tiny")
    model = dsv3.Transformer(cfg)
    r = info(cfg)

    def stored_bytes(path):
        total = 0
        for fn in os.listdir(path):
            if fn.endswith(".safetensors"):
                with safe_open(os.path.join(path, fn), "pt") as f:
                    for k in f.keys():
                        t = f.get_tensor(k)
                        total += t.numel() * t.element_size()
        return total

    dsv3.save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert stored_bytes(tmp_path / "bf16") == r["checkpoint_bytes_bf16"]
    dsv3.save_pretrained(model, tmp_path / "fp8", dtype=torch.bfloat16, fp8=True)
    assert stored_bytes(tmp_path / "fp8") == r["checkpoint_bytes_fp8"]
    no_mtp = info(cfg.replace(num_nextn_predict_layers=0))
    assert no_mtp["checkpoint_bytes_fp8"] == r["weight_bytes_fp8"]


def test_missing_keys_take_transformers_defaults():
    """A key absent from config.json means what it means to transformers' DeepseekV3Config; from_hf says
    which it took, and refuses null where transformers does."""
    transformers = pytest.importorskip("transformers")
    from dsv3.config import TRANSFORMERS_DEFAULTS

    ref = transformers.DeepseekV3Config()
    for key, value in TRANSFORMERS_DEFAULTS.items():
        theirs = {"num_nextn_predict_layers": "num_mtp_layers"}.get(key, key)
        if key == "rope_theta":
            assert ref.rope_parameters["rope_theta"] == value
        else:
            assert getattr(ref, theirs) == value, key
    hf = ModelConfig.preset("tiny").to_hf()
    del hf["hidden_size"], hf["max_position_embeddings"]
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.hidden_size, cfg.max_position_embeddings) == (7168, 4096)
    assert cfg.defaulted == {"hidden_size": 7168, "max_position_embeddings": 4096}
    with pytest.raises(ValueError, match="hidden_size is null"):
        ModelConfig.from_hf({**ModelConfig.preset("tiny").to_hf(), "hidden_size": None})


@pytest.mark.parametrize("key, value", [("rms_norm_eps", "tiny"), ("num_hidden_layers", 2.5), ("norm_topk_prob", 1),
                                        ("rope_scaling", "yarn"), ("quantization_config", "fp8"),
                                        ("eos_token_id", []), ("eos_token_id", ["a"]), ("hidden_act", 3),
                                        ("vocab_size", True), ("rope_theta", float("inf"))])
def test_from_hf_checks_the_type_of_every_key(key, value):
    with pytest.raises(ValueError, match=re.escape(key)):
        ModelConfig.from_hf({**ModelConfig.preset("tiny").to_hf(), key: value})
