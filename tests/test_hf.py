"""Checkpoints in the Hugging Face layout (SPEC §1.5): parity with transformers' DeepseekV3ForCausalLM
in both directions, sharding, FP8 block-quantised checkpoints, MTP weights, and error reporting."""

import json
import math
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import dsv3  # noqa: E402
from dsv3 import ModelConfig  # noqa: E402
from dsv3.model.moe import route  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=256,
            num_mtp_layers=1, initializer_range=0.1)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.9, "mscale_all_dim": 0.707}
VARIANTS = {
    "group-limited-qlora-1dense": {},
    "no-qlora-0dense": {"q_lora_rank": None, "first_k_dense_replace": 0},
    "2dense-2groups-2shared": {"first_k_dense_replace": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 2,
                               "num_experts_per_tok": 2},
    "yarn": {"rope_scaling": YARN},
    "no-groups-no-norm-topk": {"n_group": 1, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0},
}
T = 48   # beyond YaRN's original 32 positions


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hf_config(**kw) -> DeepseekV3Config:
    kwargs = {**BASE, **kw}
    if "rope_scaling" in kwargs:
        kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
    return DeepseekV3Config(**kwargs)


def our_config(**kw) -> ModelConfig:
    return ModelConfig.from_hf({**BASE, **kw})


def randomise_(model, seed):
    """Random norms and selection biases, so that their mapping is exercised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def make_hf(seed=0, **kw):
    torch.manual_seed(seed)
    return randomise_(DeepseekV3ForCausalLM(hf_config(**kw)).eval(), seed)


def make_ours(seed=0, **kw):
    torch.manual_seed(seed)
    return randomise_(dsv3.Transformer(our_config(**kw)).eval(), seed)


def tokens(seed=1, B=2, n=T):
    return torch.randint(0, BASE["vocab_size"], (B, n), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def our_logits(model, x):
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------ transformers → dsv3
@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_checkpoint_loads_with_same_logits(variant, tmp_path):
    kw = VARIANTS[variant]
    hf = make_hf(**kw)
    hf.save_pretrained(tmp_path)
    ours = dsv3.load_pretrained(tmp_path).eval()
    assert ours.cfg.n_group == hf.config.n_group and ours.cfg.q_lora_rank == hf.config.q_lora_rank
    assert ours.cfg.num_nextn_predict_layers == 0          # transformers writes no MTP weights
    x = tokens()
    assert rel_err(our_logits(ours, x), hf_logits(hf, x)) < 1e-4
    # the selection biases came through (nonzero, fp32)
    first_moe = hf.config.first_k_dense_replace
    bias = ours.layers[first_moe].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().min() > 0
    torch.testing.assert_close(bias, hf.model.layers[first_moe].mlp.gate.e_score_correction_bias)


def test_group_limited_routing_is_exercised_by_the_parity_check(tmp_path):
    """In the base variant, masking groups changes the choice of some tokens (so parity covers it)."""
    hf = make_hf()
    hf.save_pretrained(tmp_path)
    ours = dsv3.load_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = ours.forward_train(tokens())
    changed = 0
    for r, layer in zip(out.routing, [b for b in ours.layers if b.is_moe]):
        bias = layer.mlp.gate.e_score_correction_bias
        limited = route(r.scores, bias, 3, n_group=4, topk_group=2).sort(-1).values
        free = route(r.scores, bias, 3, n_group=1, topk_group=1).sort(-1).values
        changed += int((limited != free).any(-1).sum())
    assert changed > 0


# ------------------------------------------------------------------------------ dsv3 → transformers
@pytest.mark.parametrize("variant", VARIANTS)
def test_our_checkpoint_loads_in_transformers(variant, tmp_path):
    kw = VARIANTS[variant]
    ours = make_ours(**kw)
    dsv3.save_pretrained(ours, tmp_path)
    hf, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float32)
    hf.eval()
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # transformers has no MTP module: the only keys it does not use are the MTP layer's
    L = ours.cfg.num_hidden_layers
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"])
    x = tokens()
    assert rel_err(hf_logits(hf, x), our_logits(ours, x)) < 1e-4
    if "rope_scaling" in kw:
        assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.config.rope_parameters["factor"] == 4.0



def test_eos_token_id_list_is_saved_as_given_and_read_alike_by_transformers(tmp_path):
    """DeepSeek's and many HF configs give eos_token_id as a list: it survives load → save whole, and
    transformers generates with every id of it, as dsv3 does."""
    import random

    ids = random.sample(range(BASE["vocab_size"]), random.randint(2, 4))
    ours = make_ours(seed=random.randrange(1000), eos_token_id=ids)
    dsv3.save_pretrained(ours, tmp_path / "a")
    back = dsv3.load_pretrained(tmp_path / "a")
    assert back.cfg.eos_token_id == ids and back.cfg.eos_token_ids == tuple(ids)
    dsv3.save_pretrained(back, tmp_path / "b")
    with open(tmp_path / "b" / "config.json") as f:
        assert json.load(f)["eos_token_id"] == ids
    assert dsv3.hf.stop_token_ids(tmp_path / "b") == tuple(ids)
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path / "b")
    assert transformers.GenerationConfig.from_model_config(hf_cfg).eos_token_id == ids


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_export_writes_generation_config_read_back_alike_by_dsv3_and_transformers(tmp_path):
    """save_pretrained writes generation_config.json with the model's bos and eos (nothing else made up);
    load_pretrained, stop_token_ids and transformers read the same ids from it."""
    ours = make_ours(seed=3, bos_token_id=5, eos_token_id=7)
    dsv3.save_pretrained(ours, tmp_path)
    gen = _json(tmp_path / "generation_config.json")
    assert gen == {"bos_token_id": 5, "eos_token_id": 7}        # no invented temperature / top_p
    back = dsv3.load_pretrained(tmp_path)
    assert back.generation_config == gen
    assert back.cfg.eos_token_ids == dsv3.hf.stop_token_ids(tmp_path) == (7,)
    hf_gen = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (hf_gen.bos_token_id, hf_gen.eos_token_id) == (5, 7)
    assert hf_gen.temperature in (None, 1.0) and hf_gen.top_p in (None, 1.0)   # transformers' own defaults
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert (hf.generation_config.bos_token_id, hf.generation_config.eos_token_id) == (5, 7)


def test_export_keeps_eos_list_whole_in_generation_config(tmp_path):
    ids = [9, 4, 250]
    ours = make_ours(seed=4, eos_token_id=ids)
    dsv3.save_pretrained(ours, tmp_path)
    assert _json(tmp_path / "generation_config.json")["eos_token_id"] == ids
    assert dsv3.hf.stop_token_ids(tmp_path) == dsv3.load_pretrained(tmp_path).cfg.eos_token_ids == tuple(ids)
    assert transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id == ids


def test_export_keeps_the_sampling_defaults_of_the_source_generation_config(tmp_path):
    """A checkpoint with its own generation_config.json (DeepSeek's gives temperature 0.6, top_p 0.95):
    load → save keeps its sampling defaults and the ids it stops on; the keys describing the file go."""
    ours = make_ours(seed=5, eos_token_id=1)
    dsv3.save_pretrained(ours, tmp_path / "src")
    source = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": [1, 11], "do_sample": True,
              "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}
    with open(tmp_path / "src" / "generation_config.json", "w") as f:
        json.dump(source, f)
    loaded = dsv3.load_pretrained(tmp_path / "src")
    assert loaded.generation_config == source
    dsv3.save_pretrained(loaded, tmp_path / "out")
    gen = _json(tmp_path / "out" / "generation_config.json")
    assert gen == {"bos_token_id": 0, "eos_token_id": [1, 11], "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    assert dsv3.hf.stop_token_ids(tmp_path / "out") == dsv3.hf.stop_token_ids(tmp_path / "src") == (1, 11)
    hf_gen = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert (hf_gen.temperature, hf_gen.top_p, hf_gen.do_sample, hf_gen.eos_token_id) == (0.6, 0.95, True, [1, 11])
    # an explicit generation_config replaces the loaded one; the model's ids fill in what it leaves out
    dsv3.save_pretrained(loaded, tmp_path / "explicit", generation_config={"temperature": 0.3})
    assert _json(tmp_path / "explicit" / "generation_config.json") == {"bos_token_id": 0, "eos_token_id": 1,
                                                                      "temperature": 0.3}
    # a bad eos in the source's file is refused at load, naming the file and field
    with open(tmp_path / "src" / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [1, 10**6]}, f)
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id"):
        dsv3.load_pretrained(tmp_path / "src")


def test_num_key_value_heads_other_than_num_attention_heads_is_refused_naming_it(tmp_path):
    """MLA has no separate key/value heads: transformers' DeepseekV3 repeats the keys heads / kv_heads times
    and fails on the shapes; dsv3 ignored the key without a word. Now it is refused, naming it; null (which
    transformers reads as num_attention_heads) and the equal value load as before."""
    import random

    heads = BASE["num_attention_heads"]
    fewer = random.choice([d for d in range(1, heads) if heads % d == 0])
    hf = DeepseekV3ForCausalLM(hf_config(num_key_value_heads=fewer, num_hidden_layers=1)).eval()
    hf.config._attn_implementation = "eager"
    with pytest.raises(RuntimeError, match="size of tensor"), torch.no_grad():
        hf(tokens(n=4))
    dsv3.save_pretrained(make_ours(seed=random.randrange(1000)), tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["num_key_value_heads"] == heads
    for value in (fewer, random.randint(heads + 1, 512)):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({**cfg, "num_key_value_heads": value}, f)
        with pytest.raises(ValueError, match=re.escape(f"config.json: num_key_value_heads = {value}: must equal "
                                                       f"num_attention_heads ({heads})")):
            dsv3.load_pretrained(tmp_path)
    for value in (None, heads):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({**cfg, "num_key_value_heads": value}, f)
        assert dsv3.load_pretrained(tmp_path).cfg.num_attention_heads == heads


def test_export_of_a_config_with_auto_map_loads_with_trust_remote_code(tmp_path):
    """DeepSeek's config.json names its remote code in auto_map; the export carried auto_map without the .py
    files, so from_pretrained(..., trust_remote_code=True) (as DeepSeek's model card loads it) failed with
    "does not appear to have a file named configuration_deepseek.py". Now auto_map is left out and transformers
    uses its built-in DeepseekV3, with our logits."""
    import random

    with open(os.path.join(os.path.dirname(__file__), "data", "deepseek-v3-config.json")) as f:
        auto_map = json.load(f)["auto_map"]
    seed = random.randrange(1000)
    ours = make_ours(seed=seed, auto_map=auto_map, ep_size=1)
    assert ours.cfg.to_hf()["auto_map"] == auto_map                  # kept in memory, as every unknown key
    dsv3.save_pretrained(ours, tmp_path)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert "auto_map" not in written and written["ep_size"] == 1   # only auto_map is left out
    for trust in (True, False):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=trust,
                                                               dtype=torch.float32).eval()
        assert type(hf) is DeepseekV3ForCausalLM
        x = tokens(seed=seed)
        assert rel_err(hf_logits(hf, x), our_logits(ours, x)) < 1e-4


# YaRN keys transformers reads that DeepSeek's released configs do not vary: one of mscale / mscale_all_dim
# alone (transformers then scales cos/sin by mscale(factor), not by their ratio), an explicit attention_factor,
# truncate false (the ramp's ends not rounded; original 64 positions put them between whole dimensions)
YARN_KEYS = {
    "mscale-alone": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.9},
    "mscale_all_dim-alone": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                             "mscale_all_dim": 0.707},
    "attention_factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.3},
    "truncate-false": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False},
}


@pytest.mark.parametrize("variant", YARN_KEYS)
def test_yarn_keys_give_transformers_logits_both_ways(variant, tmp_path):
    hf = make_hf(seed=3, rope_scaling=YARN_KEYS[variant])
    hf.save_pretrained(tmp_path / "hf")
    ours = dsv3.load_pretrained(tmp_path / "hf").eval()
    x = tokens()
    assert rel_err(our_logits(ours, x), hf_logits(hf, x)) < 1e-4
    dsv3.save_pretrained(ours, tmp_path / "ours")
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert rel_err(hf_logits(back, x), hf_logits(hf, x)) < 1e-4


# ------------------------------------------------------------------------------ sharding
def test_sharded_checkpoints_both_directions(tmp_path):
    ours = make_ours(seed=3)
    x = tokens()
    ref = our_logits(ours, x)
    # dsv3 writes shards + index
    dsv3.save_pretrained(ours, tmp_path / "ours", max_shard_bytes=60_000)
    files = os.listdir(tmp_path / "ours")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and len(shards) > 3
    with open(tmp_path / "ours" / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(tmp_path / "ours" / s).values())
    back = dsv3.load_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(our_logits(back, x), ref, rtol=0, atol=0)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert rel_err(hf_logits(hf, x), ref) < 1e-4
    # transformers writes shards + index, dsv3 reads them
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 3
    again = dsv3.load_pretrained(tmp_path / "hf").eval()
    assert rel_err(our_logits(again, x), ref) < 1e-4


# ------------------------------------------------------------------------------ FP8
FP8_DIMS = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, num_attention_heads=2,
                num_key_value_heads=2, q_lora_rank=144, kv_lora_rank=136, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, n_group=2,
                topk_group=1, num_experts_per_tok=2, initializer_range=0.05)


def _dequantise_by_hand(q: torch.Tensor, s: torch.Tensor, block=128) -> torch.Tensor:
    """w[i, j] = q[i, j] · s[i // 128, j // 128] (weight_scale_inv is the dequantisation multiplier)."""
    N, K = q.shape
    assert s.shape == (math.ceil(N / block), math.ceil(K / block))
    full = s.float().repeat_interleave(block, 0)[:N].repeat_interleave(block, 1)[:, :K]
    return q.float() * full


def test_fp8_checkpoint_matches_its_dequantised_twin(tmp_path):
    ours = make_ours(seed=5, **FP8_DIMS)
    fp8_dir, twin_dir = tmp_path / "fp8", tmp_path / "twin"
    dsv3.save_pretrained(ours, fp8_dir, fp8=True)
    with open(fp8_dir / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]

    # the twin: the same stored weights, dequantised independently, written as plain fp32
    stored = load_file(fp8_dir / "model.safetensors")
    original = dsv3.hf.hf_state_dict(ours)
    twin, partial_rows, partial_cols = {}, 0, 0
    for name, t in stored.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = name[: -len("weight")] + "weight_scale_inv"
        if t.dtype == torch.float8_e4m3fn:
            N, K = t.shape
            partial_rows += N % 128 != 0 and N > 128
            partial_cols += K % 128 != 0 and K > 128
            twin[name] = _dequantise_by_hand(t, stored[scale])
            assert rel_err(twin[name], original[name]) < 0.05      # E4M3: ≤ 2^-4 relative per element
        else:
            assert scale not in stored
            twin[name] = t
    assert partial_rows and partial_cols                  # edge blocks in both dimensions
    quantised = {n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn}
    assert any("kv_a_proj_with_mqa" in n for n in quantised) and any("experts.3.down_proj" in n for n in quantised)
    assert not any(s in n for n in quantised for s in ("embed_tokens", "lm_head", "shared_head.head", "gate.weight"))
    twin_dir.mkdir()
    save_file(twin, twin_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = ModelConfig.from_hf(fp8_dir)
    cfg.quantization_config = None
    cfg.save(twin_dir / "config.json")

    loaded = dsv3.load_pretrained(fp8_dir).eval()
    reference = dsv3.load_pretrained(twin_dir).eval()
    assert loaded.cfg.quantization_config is None
    x = tokens(n=20)
    with torch.no_grad():
        a, b = loaded.forward_train(x), reference.forward_train(x)
    assert rel_err(a.logits, b.logits) < 1e-6
    assert rel_err(a.mtp_logits[0], b.mtp_logits[0]) < 1e-6
    # and against transformers reading the dequantised twin
    hf = DeepseekV3ForCausalLM.from_pretrained(twin_dir, dtype=torch.float32).eval()
    assert rel_err(our_logits(loaded, x[:, :-1]), hf_logits(hf, x[:, :-1])) < 1e-4
    # into BF16: weights bf16, the selection bias stays fp32
    bf = dsv3.load_pretrained(fp8_dir, dtype=torch.bfloat16)
    assert bf.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    assert bf.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_fp8_with_bf16_rest_like_the_release(tmp_path):
    ours = make_ours(seed=6, **FP8_DIMS)
    dsv3.save_pretrained(ours, tmp_path, fp8=True, dtype=torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["lm_head.weight"] == "BF16"
    assert dtypes["model.layers.1.mlp.gate.weight"] == "BF16"
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.0.self_attn.o_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.0.self_attn.o_proj.weight_scale_inv"] == "F32"
    back = dsv3.load_pretrained(tmp_path)
    torch.testing.assert_close(back.embed_tokens.weight, ours.embed_tokens.weight.bfloat16().float(), rtol=0, atol=0)
    assert rel_err(back.layers[0].self_attn.o_proj.weight, ours.layers[0].self_attn.o_proj.weight) < 0.05
    assert rel_err(back.layers[1].mlp.experts.w13, ours.layers[1].mlp.experts.w13) < 0.05
    assert torch.isfinite(our_logits(back.eval(), tokens(n=16))).all()



def test_fp8_checkpoint_with_other_weight_blocks_dequantises_by_them(tmp_path):
    """weight_block_size [64, 32] in quantization_config: dequant (and auto, which cannot keep such blocks)
    multiply each 64x32 block by its own scale (were read as 128x128 blocks: an error on every tensor)."""
    from dsv3.fp8.quant import _to_e4m3
    from dsv3.hf import _fp8_quantisable, hf_state_dict

    ours = make_ours(seed=7)
    fp8_dir, twin_dir = tmp_path / "fp8", tmp_path / "twin"
    original = hf_state_dict(ours)
    stored, twin = {}, {}
    for name, w in original.items():
        if not _fp8_quantisable(name, w):
            stored[name] = twin[name] = w
            continue
        N, K = w.shape
        s = torch.rand(math.ceil(N / 64), math.ceil(K / 32), generator=torch.Generator().manual_seed(N * K)) + 0.5
        full = s.repeat_interleave(64, 0)[:N].repeat_interleave(32, 1)[:, :K]
        q = _to_e4m3(w.float() / full / w.abs().max() * 100)
        stored[name], stored[name[: -len("weight")] + "weight_scale_inv"] = q, s
        twin[name] = q.float() * full
    for d, tensors in ((fp8_dir, stored), (twin_dir, twin)):
        d.mkdir()
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cfg = ours.cfg.replace(quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                                "weight_block_size": [64, 32]})
    cfg.save(fp8_dir / "config.json")
    ours.cfg.save(twin_dir / "config.json")
    reference = dsv3.load_pretrained(twin_dir).eval()
    x = tokens(n=12)
    for mode in ("dequant", "auto"):
        loaded = dsv3.load_pretrained(fp8_dir, fp8=mode).eval()
        torch.testing.assert_close(loaded.layers[0].self_attn.q_b_proj.weight,
                                   reference.layers[0].self_attn.q_b_proj.weight, rtol=0, atol=0)
        assert rel_err(our_logits(loaded, x), our_logits(reference, x)) < 1e-6


def test_fp8_scale_of_the_wrong_shape_names_the_file_and_tensor(tmp_path):
    dsv3.save_pretrained(make_ours(seed=8, **FP8_DIMS), tmp_path, fp8=True)
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    _rewrite(tmp_path, add={name: torch.ones(3, 1)})
    with pytest.raises(ValueError) as e:
        dsv3.load_pretrained(tmp_path, fp8="dequant")
    msg = str(e.value)
    assert name in msg and str(tmp_path / "model.safetensors") in msg and "(3, 1)" in msg



def test_fp8_embeddings_config_names_the_dtype_of_the_unquantised_tensors(tmp_path):
    """torch_dtype is the dtype of the norms, gate and bias (float32 here), not float8_e4m3fn, which the
    quantised embedding (the first tensor) made it."""
    dsv3.save_pretrained(make_ours(seed=8, **FP8_DIMS), tmp_path, fp8=True, fp8_embeddings=True)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "float32"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.norm.weight").get_dtype() == "F32"


# ------------------------------------------------------------------------------ MTP
@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_weights_round_trip(depth, tmp_path):
    ours = make_ours(seed=7, num_mtp_layers=depth)
    dsv3.save_pretrained(ours, tmp_path)
    L = ours.cfg.num_hidden_layers
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for k in range(depth):
            for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                         "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias",
                         "mlp.experts.7.down_proj.weight", "self_attn.kv_b_proj.weight"):
                assert f"model.layers.{L + k}.{name}" in keys
        assert f.get_tensor(f"model.layers.{L}.eh_proj.weight").shape == (64, 128)
        torch.testing.assert_close(f.get_tensor(f"model.layers.{L}.embed_tokens.weight"), ours.embed_tokens.weight)
    back = dsv3.load_pretrained(tmp_path).eval()
    assert back.cfg.num_nextn_predict_layers == depth
    x = tokens(n=20)
    with torch.no_grad():
        a, b = ours.forward_train(x), back.forward_train(x)
    assert torch.equal(a.logits, b.logits)
    for la, lb in zip(a.mtp_logits, b.mtp_logits, strict=True):
        assert torch.equal(la, lb)
    for n, t in ours.state_dict().items():
        assert torch.equal(t, back.state_dict()[n]), n


def test_bf16_save_keeps_the_bias_fp32(tmp_path):
    ours = make_ours(seed=8)
    dsv3.save_pretrained(ours, tmp_path, dtype=torch.bfloat16)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    back = dsv3.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert back.embed_tokens.weight.dtype == torch.bfloat16
    bias = back.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    torch.testing.assert_close(bias, ours.layers[1].mlp.gate.e_score_correction_bias, rtol=0, atol=0)
    torch.testing.assert_close(back.embed_tokens.weight, ours.embed_tokens.weight.bfloat16())


# ------------------------------------------------------------------------------ errors
def _rewrite(path, drop=(), add=None):
    f = path / "model.safetensors"
    tensors = load_file(f)
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor_is_reported(tmp_path):
    dsv3.save_pretrained(make_ours(seed=9), tmp_path)
    gone = ["model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.0.self_attn.q_a_layernorm.weight"]
    _rewrite(tmp_path, drop=gone)
    with pytest.raises(ValueError) as e:
        dsv3.load_pretrained(tmp_path)
    assert "missing (2)" in str(e.value) and all(g in str(e.value) for g in gone)


def test_unexpected_tensor_is_reported(tmp_path):
    dsv3.save_pretrained(make_ours(seed=9), tmp_path)
    bogus = {"model.layers.0.self_attn.bogus.weight": torch.zeros(2, 2), "model.layers.9.mlp.gate.weight": torch.zeros(8, 64)}
    _rewrite(tmp_path, add=bogus)
    with pytest.raises(ValueError) as e:
        dsv3.load_pretrained(tmp_path)
    assert "unexpected (2)" in str(e.value) and all(b in str(e.value) for b in bogus)


def test_partly_missing_mtp_layer_is_reported(tmp_path):
    """All MTP tensors absent = a checkpoint without MTP (fine); some absent = an error."""
    dsv3.save_pretrained(make_ours(seed=9), tmp_path)
    _rewrite(tmp_path, drop=["model.layers.3.eh_proj.weight"])
    with pytest.raises(ValueError, match=r"model\.layers\.3\.eh_proj\.weight"):
        dsv3.load_pretrained(tmp_path)


def test_missing_and_unexpected_in_a_transformers_checkpoint(tmp_path):
    make_hf(seed=2).save_pretrained(tmp_path)
    _rewrite(tmp_path, drop=["model.layers.2.mlp.gate.e_score_correction_bias"],
             add={"model.layers.2.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)})
    with pytest.raises(ValueError) as e:
        dsv3.load_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing (1)" in msg and "model.layers.2.mlp.gate.e_score_correction_bias" in msg
    assert "unexpected (1)" in msg and "model.layers.2.mlp.experts.8.up_proj.weight" in msg


def test_shape_mismatch_and_missing_directory(tmp_path):
    dsv3.save_pretrained(make_ours(seed=9), tmp_path)
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    hf["intermediate_size"] = 100
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError, match="shape"):
        dsv3.load_pretrained(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError)):
        dsv3.load_pretrained(tmp_path / "nope")


def test_sharded_index_inconsistent_with_its_shards(tmp_path):
    dsv3.save_pretrained(make_ours(seed=9), tmp_path, max_shard_bytes=60_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = tmp_path / weight_map[name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(name)):
        dsv3.load_pretrained(tmp_path)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=re.escape(weight_map[name])):
        dsv3.load_pretrained(tmp_path)


def test_tied_embeddings_round_trip(tmp_path):
    ours = make_ours(seed=10, tie_word_embeddings=True)
    dsv3.save_pretrained(ours, tmp_path, dtype=torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    back = dsv3.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert back.lm_head.weight is back.embed_tokens.weight and back.lm_head.weight.dtype == torch.bfloat16
    x = tokens(n=12)
    with torch.no_grad():
        torch.testing.assert_close(back.float()(x), ours.to(torch.bfloat16).float()(x))
