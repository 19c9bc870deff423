"""The network end to end: shapes, incremental decoding, recomputation, MTP, errors, light import."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3 import ModelConfig, Transformer
from dsv3.model import TrainOutput
from helpers import small_config as _cfg


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = Transformer(_cfg(**kw))
    with torch.no_grad():
        for mod in m.moe_layers():
            mod.gate.e_score_correction_bias.normal_(0, 0.05)
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    return m.eval()


def test_forward_shapes_and_dtype():
    m = _model()
    tokens = torch.randint(0, 97, (3, 11))
    logits = m(tokens)
    assert logits.shape == (3, 11, 97) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_every_parameter_is_initialised():
    """With deterministic algorithms on, torch fills uninitialised memory with NaN: a weight that
    init_weights forgot (e.g. the gate) shows up as non-finite."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        m = Transformer(_cfg(num_nextn_predict_layers=2, tie_word_embeddings=False))
    finally:
        torch.use_deterministic_algorithms(old)
    for n, t in [*m.named_parameters(), *m.named_buffers()]:
        assert torch.isfinite(t).all(), n
    std = _cfg().initializer_range
    for n, p in m.named_parameters():
        if p.dim() >= 2:
            assert 0.5 * std < p.std().item() < 1.5 * std, n
        else:
            assert torch.all(p == 1), n      # norms


def test_preset_tiny_builds_and_runs():
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    m = Transformer(cfg)
    out = m.forward_train(torch.randint(0, cfg.vocab_size, (1, 9)))
    assert out.logits.shape == (1, 8, cfg.vocab_size)


def test_forward_train_outputs():
    m = _model()
    B, T, D = 2, 10, 1
    out = m.forward_train(torch.randint(0, 97, (B, T + D)))
    assert isinstance(out, TrainOutput)
    assert out.logits.shape == (B, T, 97)
    assert len(out.mtp_logits) == D and out.mtp_logits[0].shape == (B, T, 97)
    # one Routing per MoE layer: 2 main MoE layers + the MTP block
    assert len(out.routing) == 3
    for r in out.routing:
        assert r.indices.shape == (B * T, 3) and r.weights.shape == (B * T, 3)
        assert r.scores.shape == (B * T, 8)
        assert r.counts.shape == (8,) and int(r.counts.sum()) == B * T * 3
    # main logits of forward_train equal those of forward on the first T tokens
    tokens = torch.randint(0, 97, (B, T + D))
    torch.testing.assert_close(m.forward_train(tokens).logits, m(tokens[:, :T]))


def test_forward_train_needs_more_than_d_tokens():
    m = _model()
    with pytest.raises(ValueError):
        m.forward_train(torch.randint(0, 97, (2, 1)))


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None, "first_k_dense_replace": 0},
                                {"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16,
                                                  "mscale": 1.0, "mscale_all_dim": 1.0}}])
def test_incremental_decoding_matches_full_forward(kw):
    m = _model(**kw)
    B, T = 2, 14
    tokens = torch.randint(0, 97, (B, T))
    with torch.no_grad():
        full = m(tokens)
        # token by token
        cache = m.new_cache(B, T)
        steps = torch.cat([m(tokens[:, i:i + 1], start_pos=i, cache=cache) for i in range(T)], dim=1)
        torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
        # chunked prefill, then single steps
        cache = m.new_cache(B, 32)
        outs, pos = [], 0
        for n in (5, 3, 1, 4, 1):
            outs.append(m(tokens[:, pos:pos + n], start_pos=pos, cache=cache))
            pos += n
        torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_holds_only_the_latent():
    m = _model()
    cache = m.new_cache(1, 8)
    # (kv_lora_rank + qk_rope_head_dim) values per token per layer, fp32 here
    assert cache.bytes_per_token() == 3 * (16 + 8) * 4
    with pytest.raises(ValueError):
        m(torch.randint(0, 97, (1, 9)), start_pos=0, cache=cache)


def _loss(m, tokens):
    out = m.forward_train(tokens[:, :-1])
    T = out.logits.shape[1]
    loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:T + 1].flatten())
    for k, lg in enumerate(out.mtp_logits, start=1):
        loss = loss + 0.3 * F.cross_entropy(lg.flatten(0, 1), tokens[:, k + 1:k + 1 + T].flatten())
    return loss


def test_recompute_gives_identical_loss_and_gradients():
    m = _model().train()
    tokens = torch.randint(0, 97, (2, 13))
    grads = []
    losses = []
    for recompute in (False, True):
        m.zero_grad(set_to_none=True)
        m.recompute = recompute
        loss = _loss(m, tokens)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert losses[0].item() == losses[1].item()
    assert grads[0].keys() == grads[1].keys()
    # every parameter gets a gradient (MTP included); stacked experts as one tensor
    assert set(grads[0]) == {n for n, _ in m.named_parameters()}
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-8, msg=n)


def test_mtp_depth1_logits_depend_on_the_next_token():
    m = _model()
    T = 9
    tokens = torch.randint(0, 97, (1, T + 1))
    with torch.no_grad():
        base = m.forward_train(tokens)
        # token T is seen only by the MTP module, at its position T−1 (it reads Emb(t_{i+1}))
        changed = tokens.clone()
        changed[0, T] = (tokens[0, T] + 1) % 97
        alt = m.forward_train(changed)
        torch.testing.assert_close(alt.logits, base.logits, rtol=0, atol=0)
        # (not bit-equal: the changed token reroutes, so expert segment sizes and GEMM shapes change)
        torch.testing.assert_close(alt.mtp_logits[0][:, :T - 1], base.mtp_logits[0][:, :T - 1], rtol=1e-5, atol=1e-6)
        assert (alt.mtp_logits[0][:, T - 1] - base.mtp_logits[0][:, T - 1]).abs().max() > 1e-4
        # token 4 changes main logits from position 4 and MTP logits from position 3 (causal)
        changed = tokens.clone()
        changed[0, 4] = (tokens[0, 4] + 1) % 97
        alt = m.forward_train(changed)
        torch.testing.assert_close(alt.logits[:, :4], base.logits[:, :4])
        torch.testing.assert_close(alt.mtp_logits[0][:, :3], base.mtp_logits[0][:, :3])
        assert (alt.mtp_logits[0][:, 3] - base.mtp_logits[0][:, 3]).abs().max() > 1e-4


def test_mtp_depth2():
    m = _model(num_nextn_predict_layers=2)
    out = m.forward_train(torch.randint(0, 97, (2, 12)))
    assert len(out.mtp_logits) == 2 and all(lg.shape == (2, 10, 97) for lg in out.mtp_logits)
    assert len(out.routing) == 2 + 2


def test_positions_beyond_max_position_embeddings():
    m = _model()                                       # max_position_embeddings = 64
    m(torch.randint(0, 97, (1, 64)))                   # exactly the maximum is fine
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.randint(0, 97, (1, 65)))
    cache = m.new_cache(1, 80)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.randint(0, 97, (1, 2)), start_pos=63, cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.forward_train(torch.randint(0, 97, (1, 66)))


def test_bad_token_tensors():
    m = _model()
    with pytest.raises(ValueError):
        m(torch.rand(2, 5))
    with pytest.raises(ValueError):
        m(torch.randint(0, 97, (5,)))


def test_tied_embeddings_and_v2_lite_style_config():
    m = _model(tie_word_embeddings=True)
    assert m.lm_head.weight is m.embed_tokens.weight
    v2 = _cfg(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
              norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    out = Transformer(v2).forward_train(torch.randint(0, 97, (2, 7)))
    assert out.logits.shape == (2, 7, 97) and out.mtp_logits == []


def test_bf16_forward_runs():
    m = _model().to(torch.bfloat16)
    logits = m(torch.randint(0, 97, (2, 6)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # the selection bias stays fp32 only if kept so; the gate computes in fp32 regardless
    assert m.layers[1].mlp.gate(torch.randn(3, 32).bfloat16()).weights.dtype == torch.float32


def test_import_dsv3_does_not_import_transformers():
    code = ("import sys, dsv3, torch\n"
            "cfg = dsv3.ModelConfig.preset('tiny')\n"
            "dsv3.count_parameters(cfg)\n"
            "m = dsv3.Transformer(cfg.replace(num_hidden_layers=2))\n"
            "m(torch.zeros(1, 3, dtype=torch.long))\n"
            "dsv3.load_pretrained, dsv3.save_pretrained\n"
            "bad = [k for k in ('transformers', 'triton') if k in sys.modules]\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert dsv3.__version__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rmsnorm_fused_path_equals_the_formula(dtype):
    """fp32/fp64 run through F.rms_norm: the same values and gradients as x·rsqrt(mean(x²)+eps)·w
    (bf16 keeps the upcast path); random weights and inputs, none of them ones or zeros."""
    from dsv3.model.layers import RMSNorm

    torch.manual_seed(3)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 5, 48) * 3 + 0.5).to(dtype).requires_grad_()
    y = norm(x)
    xf = x.detach().double().requires_grad_()
    w = norm.weight.detach().double().requires_grad_()
    ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))
    if dtype == torch.bfloat16:
        torch.testing.assert_close(y.double(), ref.detach(), rtol=2e-2, atol=2e-2)
        return
    exact = x.detach().to(dtype)
    formula = norm.weight.detach() * (exact * torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(y.detach(), formula)
    dy = torch.randn_like(ref)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xf.grad, **tol)
    torch.testing.assert_close(norm.weight.grad.double(), w.grad, **tol)
