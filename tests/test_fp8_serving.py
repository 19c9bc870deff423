"""FP8 checkpoints served with their E4M3 weights kept (issue 11, item 6): ``load_pretrained(...,
fp8="keep"|"dequant"|"auto")``, ``FP8InferenceLinear`` / ``FP8InferenceExperts``, ``--fp8``."""

import argparse
import io
import os

import pytest
import torch

if not torch.cuda.is_available():   # the Triton test below runs the kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")               # (set before triton is imported)
from torch import nn

import dsv3
from dsv3 import Transformer
from dsv3.fp8 import (FP8InferenceExperts, FP8InferenceLinear, dequantize_activation, e4m3_error_bound,
                      fp8_weight_bytes, quantize_activation)
from dsv3.fp8.inference import convert_to_fp8_inference
from dsv3.infer.generate import add_arguments, generate, generate_text, load_model_dir
from dsv3.model.moe import GroupedExperts
from helpers import small_config

E4M3 = torch.float8_e4m3fn
# every FP8 Linear's N and K a multiple of 128 (kv_b_proj, kept in high precision, is 192 wide)
ALIGNED = dict(vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
               q_lora_rank=128, kv_lora_rank=96, num_attention_heads=2, qk_nope_head_dim=32,
               qk_rope_head_dim=32, v_head_dim=64, initializer_range=0.05)
# partial blocks in both dims (160 = 128 + 32, 200, 136) and an expert width (48) off the 128 grid
RAGGED = dict(vocab_size=300, hidden_size=160, intermediate_size=200, moe_intermediate_size=48,
              q_lora_rank=136, initializer_range=0.05)
CONFIGS = {"aligned": ALIGNED, "ragged": RAGGED}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: directory} of FP8 checkpoints (save_pretrained(fp8=True)) of random models."""
    out = {}
    for i, (name, kw) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        d = tmp_path_factory.mktemp(f"fp8_{name}")
        dsv3.save_pretrained(Transformer(small_config(**kw)), d, fp8=True)
        out[name] = str(d)
    return out


def fake_quant_reference(model, kept):
    """`model` (dequantised) with the inputs of the modules that `kept` runs in FP8 quantised and
    dequantised 1×128 — the numbers the FP8 GEMMs multiply, computed with ordinary matmuls."""
    fq = lambda x: dequantize_activation(*quantize_activation(x), dtype=x.dtype)  # noqa: E731
    paths = {p for p, m in kept.named_modules() if isinstance(m, (FP8InferenceLinear, FP8InferenceExperts))}
    for path, m in model.named_modules():
        if path not in paths:
            continue
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(lambda mod, args: (fq(args[0]),))
        else:
            assert isinstance(m, GroupedExperts)

            def forward(x, counts, m=m):
                h = torch.cat([seg @ m.w13[e].t() for e, seg in enumerate(fq(x).split(counts.tolist()))])
                a = fq(torch.nn.functional.silu(h[:, :m.inter]) * h[:, m.inter:])
                return torch.cat([seg @ m.w2[e].t() for e, seg in enumerate(a.split(counts.tolist()))])
            m.forward = forward
    return model


def test_kept_weights_are_the_checkpoints_e4m3_and_scales(checkpoints, one_thread):
    from safetensors.torch import load_file

    path = checkpoints["aligned"]
    stored = load_file(os.path.join(path, "model.safetensors"))
    m = dsv3.load_pretrained(path, fp8="keep")
    attn, moe = m.layers[1].self_attn, m.layers[1].mlp
    for lin, hf in [(attn.q_a_proj, "model.layers.1.self_attn.q_a_proj"), (attn.o_proj, "model.layers.1.self_attn.o_proj"),
                    (m.layers[0].mlp.down_proj, "model.layers.0.mlp.down_proj"),
                    (moe.shared_experts.up_proj, "model.layers.1.mlp.shared_experts.up_proj"),
                    (m.mtp[0].eh_proj, "model.layers.3.eh_proj")]:
        assert isinstance(lin, FP8InferenceLinear) and lin.weight.dtype == E4M3
        assert lin.weight_scale_inv.dtype == torch.float32
        assert torch.equal(lin.weight.view(torch.uint8), stored[hf + ".weight"].view(torch.uint8))
        assert torch.equal(lin.weight_scale_inv, stored[hf + ".weight_scale_inv"])
    ex = moe.experts
    assert isinstance(ex, FP8InferenceExperts) and ex.w13.dtype == ex.w2.dtype == E4M3
    assert tuple(ex.w13_scale_inv.shape) == (8, 2, 1) and tuple(ex.w2_scale_inv.shape) == (8, 1, 1)
    e = "model.layers.1.mlp.experts.5"
    assert torch.equal(ex.w13[5, 128:].view(torch.uint8), stored[e + ".up_proj.weight"].view(torch.uint8))
    assert torch.equal(ex.w13_scale_inv[5, 1:], stored[e + ".up_proj.weight_scale_inv"])
    assert torch.equal(ex.w2_scale_inv[5], stored[e + ".down_proj.weight_scale_inv"])
    # in high precision: kv_b_proj (absorbed MLA reads its matrix), head, embedding, gate, norms
    assert type(attn.kv_b_proj) is nn.Linear and attn.kv_b_proj.weight.dtype == torch.float32
    assert type(m.lm_head) is nn.Linear and m.embed_tokens.weight.dtype == torch.float32
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    assert m.cfg.quantization_config["quant_method"] == "fp8"
    # no parameter needs a gradient; .to(dtype) moves nothing out of E4M3
    assert not any(p.requires_grad for n, p in m.named_parameters() if p.dtype == E4M3)
    m.to(torch.bfloat16)
    assert attn.q_a_proj.weight.dtype == E4M3 and attn.q_a_proj.weight_scale_inv.dtype == torch.float32
    assert ex.w13.dtype == E4M3 and m.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kept_logits_equal_dequantised_model_with_quantised_activations(checkpoints, name, one_thread):
    kept = dsv3.load_pretrained(checkpoints[name], fp8="keep").eval()
    deq = dsv3.load_pretrained(checkpoints[name], fp8="dequant").eval()
    if name == "ragged":
        assert kept.layers[1].mlp.experts.w13_row_scales       # I = 48: one scale row per weight row
    x = torch.randint(0, kept.cfg.vocab_size, (6, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, plain = kept(x), deq(x)
        a_mtp = kept.forward_train(x).mtp_logits[0]
        ref = fake_quant_reference(deq, kept)
        b, b_mtp = ref(x), ref.forward_train(x).mtp_logits[0]
    # the FP8 GEMMs = the same E4M3 products in FP32, up to summation order: ~4e-7 per position.
    # Summation order can move an activation across an E4M3 rounding boundary (or flip a near-tie
    # in routing); the change then spreads to the later positions of its row — hence the median.
    for u, v in ((a, b), (a_mtp, b_mtp)):
        per_position = (u - v).norm(dim=-1) / v.norm(dim=-1)
        assert per_position.median() < 1e-5, per_position
    # and activation quantisation alone moves the logits of these random models by ~10% (about as
    # much as quantising the weights did: random networks amplify it; the trained quickstart model
    # agrees on ≥ 95% of greedy tokens, benchmarks/fp8_serving.py)
    assert rel_err(a, plain) < 0.25


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_equals_the_dequantised_model_bitwise_at_fp8_memory(checkpoints, name, dtype, one_thread):
    """fp8="weight-only" (W8A16): the same E4M3 tensors as "keep", dequantised block by block in each
    call — the logits (trunk and MTP) of the model dequantised at load, bit for bit."""
    wo = dsv3.load_pretrained(checkpoints[name], fp8="weight-only", dtype=dtype).eval()
    deq = dsv3.load_pretrained(checkpoints[name], fp8="dequant", dtype=dtype).eval()
    kept = dsv3.load_pretrained(checkpoints[name], fp8="keep", dtype=dtype)
    ex = wo.layers[1].mlp.experts
    assert isinstance(ex, FP8InferenceExperts) and ex.weight_only and ex.w13.dtype == E4M3
    assert isinstance(wo.layers[0].self_attn.q_a_proj, FP8InferenceLinear) and wo.layers[0].self_attn.q_a_proj.weight_only
    assert fp8_weight_bytes(wo) == fp8_weight_bytes(kept)
    x = torch.randint(0, wo.cfg.vocab_size, (5, 19), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        a, b = wo.forward_train(x), deq.forward_train(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[0], b.mtp_logits[0])
    # a decode step through the latent cache too
    with torch.no_grad():
        ca, cb = wo.new_cache(2, 32), deq.new_cache(2, 32)
        assert torch.equal(wo(x[:2, :7], cache=ca), deq(x[:2, :7], cache=cb))
        assert torch.equal(wo(x[:2, 7:8], cache=ca, start_pos=7), deq(x[:2, 7:8], cache=cb, start_pos=7))


def test_fp8_auto_mode_is_weight_only_without_fp8_gemms(checkpoints):
    from dsv3.hf import resolve_fp8_mode

    q = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert resolve_fp8_mode("auto", q, "cpu") == "weight-only"
    assert resolve_fp8_mode("auto", None, "cpu") == "dequant"
    assert [resolve_fp8_mode(m, q, "cpu") for m in ("keep", "weight-only", "dequant")] == ["keep", "weight-only", "dequant"]
    with pytest.raises(ValueError, match="fp8"):
        resolve_fp8_mode("w8a8", q, "cpu")
    m = dsv3.load_pretrained(checkpoints["aligned"], fp8="auto", device="cpu")
    assert m.layers[1].mlp.experts.weight_only


def test_fp8_modules_within_the_activation_quantisation_bound(one_thread):
    g = torch.Generator().manual_seed(3)
    for n, k in [(256, 384), (200, 160), (1, 130)]:
        lin = nn.Linear(k, n, bias=False)
        nn.init.normal_(lin.weight, generator=g)
        f = FP8InferenceLinear.from_linear(lin)
        w = f.dequantized_weight()
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 5, k, generator=g).to(dtype)
            y = f(x)
            assert y.dtype == dtype and y.shape == (3, 5, n)
            xf = x.float()
            _, s = quantize_activation(xf)
            bound = e4m3_error_bound(xf, s.repeat_interleave(128, -1)[..., :k]) @ w.abs().t()
            err = (y.float() - xf @ w.t()).abs()
            slack = 1e-5 * (xf.abs() @ w.abs().t()) + (0 if dtype == torch.float32 else y.float().abs() * 2 ** -8)
            assert bool((err <= bound + slack).all())
    ge = GroupedExperts(4, 160, 48)
    nn.init.normal_(ge.w13, generator=g)
    nn.init.normal_(ge.w2, generator=g)
    fe = FP8InferenceExperts.from_experts(ge)
    w13, w2 = fe.dequantized_weights()
    assert rel_err(w13, ge.w13) < 0.05 and rel_err(w2, ge.w2) < 0.05
    x, counts = torch.randn(13, 160, generator=g), torch.tensor([5, 0, 6, 2])
    ref = GroupedExperts(4, 160, 48)
    ref.w13.data, ref.w2.data = w13, w2
    assert rel_err(fe(x, counts), ref(x, counts)) < 0.06                  # E4M3 activations: ≤ 2^-4 each
    assert fe(x[:0], torch.zeros(4, dtype=torch.long)).shape == (0, 160)


def test_kept_weight_bytes_are_at_most_055_of_the_bf16_load(checkpoints, one_thread):
    kept = dsv3.load_pretrained(checkpoints["aligned"], fp8="keep", dtype=torch.bfloat16)
    bf16 = dsv3.load_pretrained(checkpoints["aligned"], fp8="dequant", dtype=torch.bfloat16)
    kb, bb = fp8_weight_bytes(kept), fp8_weight_bytes(bf16)
    assert bb["fp8"] == 0 and kb["fp8"] > 0 and kb["scales"] > 0
    assert kb["total"] <= 0.55 * bb["total"], (kb, bb)
    # the same count for DeepSeek-V3 itself, on the meta device (no memory)
    with torch.device("meta"):
        m = Transformer(dsv3.ModelConfig.preset("deepseek-v3").replace(num_hidden_layers=4))
    dense = fp8_weight_bytes(m.to(torch.bfloat16))["total"]
    assert fp8_weight_bytes(convert_to_fp8_inference(m))["total"] <= 0.55 * dense


def _tokenizer_dir(path, model_dir):
    from dsv3.data import Tokenizer

    docs = ["def main(argv):\n    return 0\n", "import os\nimport sys\n", "for i in range(10):\n    print(i)\n"] * 20
    Tokenizer.train(docs, vocab_size=300).save(path)
    for f in os.listdir(model_dir):
        os.symlink(os.path.join(model_dir, f), os.path.join(path, f))
    return str(path)


def test_generate_end_to_end_with_kept_weights(checkpoints, tmp_path, one_thread, capsys):
    path = _tokenizer_dir(tmp_path / "m", checkpoints["ragged"])
    model, tok = load_model_dir(path, "cpu")                       # auto: FP8 checkpoint → kept
    assert isinstance(model.layers[0].self_attn.q_a_proj, FP8InferenceLinear)
    prompt = tok.encode("def main(")
    out = generate(model, prompt, 12, temperature=0)
    # cached decoding (absorbed attention) = full forwards over the growing sequence
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]
    text = generate_text(model, tok, "import os", 8, temperature=0.8, stream=io.StringIO())
    assert text.startswith("import os")
    # the CLI: --fp8 keep / weight-only / dequant all generate
    p = argparse.ArgumentParser()
    add_arguments(p)
    from dsv3.infer.generate import run
    for mode in ("keep", "weight-only", "dequant"):
        args = p.parse_args(["--model", path, "--prompt", "def ", "--max-new-tokens", "6", "--temperature", "0",
                             "--device", "cpu", "--fp8", mode])
        assert run(args) == 0
        assert capsys.readouterr().out.startswith("def ")
    assert p.parse_args(["--model", path, "--prompt", "x"]).fp8 == "auto"
    # a prefix-cache fingerprint reads the E4M3 weights too
    from dsv3.infer.prefix_cache import model_fingerprint
    assert model_fingerprint(model) != model_fingerprint(load_model_dir(path, "cpu", fp8="dequant")[0])


def test_load_model_dir_dequant_is_the_old_behaviour(checkpoints, tmp_path, one_thread):
    path = _tokenizer_dir(tmp_path / "m", checkpoints["aligned"])
    model, _ = load_model_dir(path, "cpu", fp8="dequant")
    old = dsv3.load_pretrained(path)                               # the library default: dequantise
    assert not any(isinstance(m, (FP8InferenceLinear, FP8InferenceExperts)) for m in model.modules())
    assert model.cfg.quantization_config is None
    sd, sd_old = model.state_dict(), old.state_dict()
    assert sd.keys() == sd_old.keys() and all(torch.equal(sd[k], sd_old[k]) for k in sd)
    # a plain (BF16/FP32) checkpoint loads the same whatever the mode
    plain = tmp_path / "plain"
    dsv3.save_pretrained(old, plain)
    for mode in ("auto", "keep"):
        m = dsv3.load_pretrained(plain, fp8=mode)
        assert not any(p.dtype == E4M3 for p in m.parameters())


def test_kept_model_saves_back_to_the_same_checkpoint(checkpoints, tmp_path, one_thread):
    from safetensors.torch import load_file

    kept = dsv3.load_pretrained(checkpoints["ragged"], fp8="keep")
    dsv3.save_pretrained(kept, tmp_path, fp8=True)
    a = load_file(os.path.join(checkpoints["ragged"], "model.safetensors"))
    b = load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == E4M3:
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
        else:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-6, atol=0), k
    # sharded: the same kept model again
    dsv3.save_pretrained(kept, tmp_path / "sharded", fp8=True, max_shard_bytes=200_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again = dsv3.load_pretrained(tmp_path / "sharded", fp8="keep")
    sd, sd2 = kept.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k].view(torch.uint8) if sd[k].dtype == E4M3 else sd[k],
                           sd2[k].view(torch.uint8) if sd2[k].dtype == E4M3 else sd2[k]) for k in sd)


def test_bad_fp8_values_are_refused(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="fp8"):
        dsv3.load_pretrained(checkpoints["aligned"], fp8="bf16")
    with pytest.raises(ValueError, match="--fp8"):
        load_model_dir(checkpoints["aligned"], "cpu", fp8=True)
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "x", "--prompt", "y", "--fp8", "fp16"])


def test_kept_modules_on_the_triton_kernels(one_thread):
    """The GPU path of the kept modules (Triton GEMM and grouped GEMM; under the interpreter
    without a GPU) = the torch reference, for aligned and ragged shapes and both w13 scale kinds."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=0 set by the caller: no GPU to run the Triton kernels on")
    if dev == "cpu":
        from dsv3.fp8 import triton_kernels
        from dsv3.infer.paged_attention import _triton_imported_interpreted
        # triton or the kernels imported (by an earlier test module) before the interpreter was set
        if not (triton_kernels.INTERPRET and _triton_imported_interpreted()):
            import subprocess
            import sys
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                  f"{__file__}::test_kept_modules_on_the_triton_kernels"],
                                 env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                                 timeout=600)
            assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
            pytest.skip("passed in a subprocess (the kernels were imported here without the interpreter)")
    g = torch.Generator().manual_seed(5)
    for n, k in [(128, 256), (200, 160)]:
        lin = nn.Linear(k, n, bias=False)
        nn.init.normal_(lin.weight, generator=g)
        f = FP8InferenceLinear.from_linear(lin).to(dev)
        x = torch.randn(4, k, generator=g).to(dev)
        f.backend = "torch"
        ref = f(x)
        f.backend = "triton"
        assert rel_err(f(x), ref) < 1e-5
    for inter in (128, 48):
        ge = GroupedExperts(3, 128, inter)
        nn.init.normal_(ge.w13, generator=g)
        nn.init.normal_(ge.w2, generator=g)
        fe = FP8InferenceExperts.from_experts(ge).to(dev)
        assert fe.w13_row_scales == (inter % 128 != 0)
        x, counts = torch.randn(7, 128, generator=g).to(dev), torch.tensor([3, 0, 4])
        fe.backend = "torch"
        ref = fe(x, counts)
        fe.backend = "triton"
        assert rel_err(fe(x, counts), ref) < 1e-5


# ------------------------------------------------------------------ embedding and head in FP8 too
def test_fp8_embedding_rows_equal_the_dequantised_table_bitwise(one_thread):
    from dsv3.fp8.inference import FP8InferenceEmbedding

    g = torch.Generator().manual_seed(7)
    for vocab, dim in ((300, 160), (128, 128), (5, 40)):           # partial blocks in both dims; one block
        emb = nn.Embedding(vocab, dim)
        nn.init.normal_(emb.weight, std=0.3, generator=g)
        f = FP8InferenceEmbedding.from_embedding(emb)
        assert f.weight.dtype == E4M3 and f.weight_scale_inv.shape == (-(-vocab // 128), -(-dim // 128))
        table = f.dequantized_weight()
        assert rel_err(table, emb.weight) < 0.05
        ids = torch.randint(0, vocab, (3, 17), generator=g)
        assert torch.equal(f(ids), table[ids])
        f16 = f.to(torch.bfloat16)                                 # the table stays E4M3; rows come in BF16
        assert f16.weight.dtype == E4M3 and f16(ids).dtype == torch.bfloat16
        assert torch.equal(f16(ids), f.dequantized_weight(torch.bfloat16)[ids])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp8_embeddings_checkpoint_kept_equals_dequantised_at_half_the_bytes(name, tmp_path, one_thread):
    from safetensors import safe_open

    from dsv3.fp8.inference import FP8InferenceEmbedding

    torch.manual_seed(11)
    model = Transformer(small_config(**CONFIGS[name]))
    dsv3.save_pretrained(model, tmp_path, fp8=True, fp8_embeddings=True)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:     # the MTP layer's copies are E4M3 too
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    L = model.cfg.num_hidden_layers
    for k in ("model.embed_tokens.weight", "lm_head.weight", f"model.layers.{L}.embed_tokens.weight",
              f"model.layers.{L}.shared_head.head.weight"):
        assert stored[k] == "F8_E4M3" and k[:-len("weight")] + "weight_scale_inv" in stored, k
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 21))
    for dtype in (torch.float32, torch.bfloat16):
        wo = dsv3.load_pretrained(tmp_path, fp8="weight-only", dtype=dtype).eval()
        deq = dsv3.load_pretrained(tmp_path, fp8="dequant", dtype=dtype).eval()
        assert isinstance(wo.embed_tokens, FP8InferenceEmbedding) and isinstance(wo.lm_head, FP8InferenceLinear)
        with torch.no_grad():
            assert torch.equal(wo(tokens), deq(tokens))
            out = wo.forward_train(tokens)                        # MTP reads the shared embedding and head
            ref = deq.forward_train(tokens)
            assert all(torch.equal(a, b) for a, b in zip(out.mtp_logits, ref.mtp_logits))
    # the engine decodes with it (its cache takes the activations' dtype, not the table's)
    wo = dsv3.load_pretrained(tmp_path, fp8="weight-only").eval()
    deq = dsv3.load_pretrained(tmp_path, fp8="dequant").eval()
    prompt = torch.randint(3, model.cfg.vocab_size, (9,)).tolist()
    assert generate(wo, prompt, 8, temperature=0) == generate(deq, prompt, 8, temperature=0)
    kb = fp8_weight_bytes(dsv3.load_pretrained(tmp_path, fp8="keep", dtype=torch.bfloat16))
    bb = fp8_weight_bytes(deq.to(torch.bfloat16))
    release = tmp_path / "release"
    dsv3.save_pretrained(model, release, fp8=True)
    rb = fp8_weight_bytes(dsv3.load_pretrained(release, fp8="keep", dtype=torch.bfloat16))
    assert kb["total"] < rb["total"] and kb["total"] <= 0.56 * bb["total"], (kb, rb, bb)


def test_fp8_embeddings_refused_where_they_cannot_apply(tmp_path):
    with pytest.raises(ValueError, match="needs fp8=True"):
        dsv3.save_pretrained(Transformer(small_config()), tmp_path / "a", fp8_embeddings=True)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        dsv3.save_pretrained(Transformer(small_config(tie_word_embeddings=True)), tmp_path / "b", fp8=True,
                             fp8_embeddings=True)


def test_dsv3_quantize_writes_a_checkpoint_that_serves_kept(checkpoints, tmp_path, one_thread, capsys):
    from dsv3.cli import main
    from dsv3.fp8.inference import FP8InferenceEmbedding

    torch.manual_seed(3)
    src = tmp_path / "src"
    dsv3.save_pretrained(Transformer(small_config(**ALIGNED)), src)
    model_dir = _tokenizer_dir(tmp_path / "model", src)
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(model_dir), "--out", str(out), "--fp8-embeddings"]) == 0
    assert "0.5" in capsys.readouterr().out                       # the printed ratio
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    model, _ = load_model_dir(str(out), "cpu")                     # auto on a CPU: W8A16
    assert isinstance(model.embed_tokens, FP8InferenceEmbedding) and model.cfg.quantization_config["quant_method"] == "fp8"
    deq = dsv3.load_pretrained(out, fp8="dequant")
    tokens = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(tokens), deq(tokens))
    # bad input: one line, exit code 2, nothing replaced
    before = sorted(os.listdir(out))
    for argv, what in ((["--model", str(model_dir), "--out", str(out)], "--overwrite"),
                       (["--model", str(model_dir), "--out", str(model_dir)], "--out"),
                       (["--model", str(tmp_path / "none"), "--out", str(tmp_path / "x")], "not found"),
                       (["--model", str(model_dir), "--out", str(tmp_path / "no" / "such")], "parent")):
        assert main(["quantize", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err, err
    assert sorted(os.listdir(out)) == before
    assert main(["quantize", "--model", str(model_dir), "--out", str(out), "--overwrite"]) == 0
    assert not isinstance(load_model_dir(str(out), "cpu")[0].embed_tokens, FP8InferenceEmbedding)
