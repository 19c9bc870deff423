"""Inference: the absorbed MLA path against the naive one, cached MTP, sampling, plain and
speculative (MTP-drafted) generation, and the ``dsv3 generate`` command."""

import subprocess
import sys

import pytest
import torch

from dsv3 import Transformer
from dsv3.infer.generate import generate
from dsv3.infer.sampling import SamplingParams, accept_or_resample, probabilities, sample_next
from dsv3.infer.speculative import generate_speculative
from helpers import cli_env, small_model


def _model(seed=0, dtype=torch.float64, **kw):
    return small_model(seed, dtype, **kw)


def _set_attn(m, impl):
    for mod in m.modules():
        if hasattr(mod, "attn_impl"):
            mod.attn_impl = impl


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None},
                                {"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16,
                                                  "mscale": 1.0, "mscale_all_dim": 1.0}}])
def test_absorbed_attention_equals_naive(kw, one_thread):
    m = _model(**kw)
    B, T = 2, 13
    tokens = torch.randint(0, 97, (B, T))
    with torch.no_grad():
        full = m(tokens)
        for impl in ("absorbed", "naive"):
            _set_attn(m, impl)
            cache = m.new_cache(B, T)
            outs, pos = [], 0
            for n in (4, 1, 3, 1, 1, 2, 1):             # chunked prefill and single decode steps
                outs.append(m(tokens[:, pos:pos + n], start_pos=pos, cache=cache))
                pos += n
            torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_auto_attention_picks_absorbed_for_decode_and_naive_for_long_prefill():
    import dsv3

    attn = Transformer(dsv3.ModelConfig.preset("deepseek-v3").replace(
        num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0, vocab_size=128,
        hidden_size=64, intermediate_size=64, num_attention_heads=2, q_lora_rank=32,
        n_routed_experts=8, n_group=1, topk_group=1, moe_intermediate_size=8)).layers[0].self_attn
    assert attn.use_absorbed(1, 4096) and attn.use_absorbed(2, 100)     # decode, speculative verify
    assert not attn.use_absorbed(4096, 4096)                             # prefill
    attn.attn_impl = "naive"
    assert not attn.use_absorbed(1, 4096)
    attn.attn_impl = "fast"
    with pytest.raises(ValueError, match="attn_impl"):
        attn.use_absorbed(1, 10)


def test_cached_mtp_equals_forward_train(one_thread):
    m = _model(seed=1)
    T = 12
    tokens = torch.randint(0, 97, (2, T + 1))
    with torch.no_grad():
        ref = m.forward_train(tokens).mtp_logits[0]                     # [2, T, V]
        cache = m.new_cache(2, T, mtp=True)
        outs, pos = [], 0
        for n in (5, 2, 1, 3, 1):
            _, h = m.forward_hidden(tokens[:, pos:pos + n], pos, cache)
            outs.append(m.forward_mtp(h, tokens[:, pos + 1:pos + n + 1], pos, cache)[0])
            pos += n
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="depth 2"):
        m.forward_mtp(h, tokens[:, :1], 0, None, depth=2)


def test_probabilities_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    p = probabilities(logits, SamplingParams(1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = probabilities(logits, SamplingParams(1.0, top_p=0.5))      # the top token alone has 63.6%
    assert p[0, 0] == 1
    assert probabilities(logits, SamplingParams(0.0)).tolist() == [[1, 0, 0, 0, 0]]
    assert sample_next(logits, temperature=0).item() == 0
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_batched_sampling_draws_what_each_row_draws_alone():
    # rows of mixed settings (two temperatures, top-k, top-p, greedy, one non-finite row) drawn as batches
    # give each row the token sample() gives it alone with the same generator, and the not-finite row
    # is reported instead of raising for the batch
    from dsv3.infer.sampling import probabilities, sample, sample_rows
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, (1,))))
    logits = torch.randn(9, 50, generator=g) * 3
    logits[4, 7] = float("nan")
    kinds = [SamplingParams(0.7), SamplingParams(1.0, top_k=5), SamplingParams(0.9, top_p=0.8), SamplingParams(0.0)]
    params = [kinds[i % 4] for i in range(9)]
    seeds = torch.randint(0, 1 << 30, (9,), generator=g).tolist()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(3):                                   # the generators advance by one draw per row
        tokens, ok = sample_rows(logits, params, gens)
        assert ok.tolist() == [i != 4 for i in range(9)]
        for i in range(9):
            if i == 4:
                continue
            alone = torch.Generator().manual_seed(seeds[i])
            for _ in range(_ + 1):
                want = (logits[i].argmax() if params[i].greedy
                        else sample(probabilities(logits[i:i + 1], params[i]), alone)[0])
            assert int(tokens[i]) == int(want), (i, params[i])


def test_inverse_cdf_draw_follows_the_distribution():
    from dsv3.infer.sampling import draw
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(3))
    tokens = draw(p.expand(u.numel(), -1), u)
    freq = torch.bincount(tokens, minlength=6).double() / u.numel()
    assert freq[[0, 2, 5]].sum() == 0 and torch.allclose(freq, p.double(), atol=5e-3)
    edge = draw(p[None], torch.tensor([1.0 - 1e-12]))         # the very top of [0, 1): the last id with mass
    assert int(edge[0]) == 4


def test_accept_or_resample_keeps_the_target_distribution():
    """P(out = x) = min(p, q)(x) + (1 − Σ min(p, q)) · (p − q)⁺(x)/Σ(p − q)⁺ = p(x): checked on 400K
    independent rows, with drafts drawn from q."""
    g = torch.Generator().manual_seed(0)
    V, N = 6, 400_000
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q[3] = 0.0                                    # the draft never proposes token 3
    q = q / q.sum()
    P, Q = p.expand(N, V), q.expand(N, V)
    draft = torch.multinomial(Q, 1, replacement=True, generator=g).squeeze(-1)
    token, accepted = accept_or_resample(draft, P, Q, g)
    freq = torch.bincount(token, minlength=V).double() / N
    assert (freq - p.double()).abs().max() < 4e-3                 # ≈ 5 standard errors
    expected_accept = torch.minimum(p, q).sum()
    assert abs(accepted.double().mean() - expected_accept) < 4e-3
    # greedy: one-hot p and q accept iff the draft is the target's argmax
    onehot = torch.eye(V)
    tok, acc = accept_or_resample(torch.tensor([2, 2]), onehot[[2, 4]], onehot[[2, 2]], g)
    assert tok.tolist() == [2, 4] and acc.tolist() == [True, False]


def _reference_greedy(m, prompt, n):
    """Greedy decoding without any cache: the full forward over the whole sequence every step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_generation_matches_uncached_reference(one_thread):
    m = _model(seed=2)
    prompt = torch.randint(3, 97, (7,)).tolist()
    assert generate(m, prompt, 12, temperature=0) == _reference_greedy(m, prompt, 12)


def _mtp_mimics_trunk(m, noise: float, seed: int):
    """Make MTP module 1 compute the one-block trunk on the sequence shifted by one (everything but the
    first token): its block is a copy of the trunk's, ``eh_proj`` passes the embedding through, and the
    embeddings have unit RMS so ``enorm`` leaves them be. RoPE attention only sees relative positions,
    so its drafts are the main model's own next-but-one predictions (without the first token); then
    ``noise`` (relative) on its weights makes some drafts wrong — both branches of verification run."""
    d = m.cfg.hidden_size
    mtp = m.mtp[0]
    with torch.no_grad():
        m.embed_tokens.weight /= m.embed_tokens.weight.pow(2).mean(-1, keepdim=True).sqrt()
        missing, _ = mtp.load_state_dict(m.layers[0].state_dict(), strict=False)
        assert not [k for k in missing if not k.startswith(("enorm", "hnorm", "eh_proj", "shared_head"))]
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :d] = torch.eye(d)
        mtp.enorm.weight.fill_(1.0)
        mtp.shared_head.norm.weight.copy_(m.norm.weight)
        g = torch.Generator().manual_seed(seed)
        for p in mtp.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * noise * p.std())
    return m


def test_speculative_greedy_equals_plain_greedy(one_thread):
    accepted = rejected = 0
    for seed in range(3):
        m = _model(seed=seed, vocab_size=12, num_hidden_layers=1, first_k_dense_replace=0)
        m = _mtp_mimics_trunk(m, noise=1.0, seed=seed)
        prompt = torch.randint(3, 12, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
        plain = generate(m, prompt, 40, temperature=0)
        spec, stats = generate_speculative(m, prompt, 40, temperature=0)
        assert spec == plain
        assert stats.tokens == 40 and stats.main_forwards == 1 + stats.drafted
        accepted += stats.accepted
        rejected += stats.drafted - stats.accepted
    assert accepted > 20 and rejected > 10, (accepted, rejected)


def test_speculative_stops_at_eos_and_the_position_limit(one_thread):
    m = _model(seed=3, vocab_size=12, max_position_embeddings=16)
    prompt = [5, 6, 7]
    plain = generate(m, prompt, 100, temperature=0)
    spec, stats = generate_speculative(m, prompt, 100, temperature=0)
    assert spec == plain and len(spec) == 16 - 3                    # up to max_position_embeddings
    eos = plain[4]
    first = plain.index(eos)
    assert generate_speculative(m, prompt, 100, temperature=0, eos_id=eos)[0] == plain[:first + 1]
    with pytest.raises(ValueError, match="MTP"):
        generate_speculative(_model(num_nextn_predict_layers=0), prompt, 4)
    with pytest.raises(ValueError, match="no tokens"):
        generate_speculative(m, [], 4)


def test_speculative_sampling_is_reproducible_and_streams(one_thread):
    m = _model(seed=4, vocab_size=12)
    seen = []
    a, _ = generate_speculative(m, [3, 4], 20, temperature=1.0, top_k=8, seed=7, on_token=seen.append)
    b, _ = generate_speculative(m, [3, 4], 20, temperature=1.0, top_k=8, seed=7)
    assert a == b == seen and len(a) == 20


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dsv3.cli", "generate", *args], capture_output=True,
                          text=True, env=cli_env(), timeout=120)


def test_generate_cli_plain_and_speculative(model_dir):
    base = ["--model", model_dir, "--prompt", "def main(", "--max-new-tokens", "12", "--temperature", "0"]
    plain, spec = _cli(*base), _cli(*base, "--speculative")
    assert plain.returncode == 0 and spec.returncode == 0, plain.stderr + spec.stderr
    assert plain.stdout.startswith("def main(") and spec.stdout == plain.stdout
    assert "drafts accepted" in spec.stderr and "tokens per forward" in spec.stderr


def test_generate_cli_bad_input(model_dir, tmp_path):
    r = _cli("--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode != 0 and "not found" in r.stderr
    r = _cli("--model", model_dir, "--prompt", "x", "--max-new-tokens", "0")
    assert r.returncode != 0 and "--max-new-tokens" in r.stderr


@pytest.mark.parametrize("T", [1, 3])
def test_latent_attention_against_per_head_formula(T):
    """Absorbed attention with the heads folded into one product per row, against a per-row,
    per-head fp64 loop; rows at different positions (a per-row causal mask), random inputs."""
    from dsv3.model.mla import _chunk_mask, latent_attention

    torch.manual_seed(5)
    B, H, r, rope, S = 3, 4, 16, 8, 11
    q_lat, q_pe = torch.randn(B, T, H, r, dtype=torch.float64), torch.randn(B, T, H, rope, dtype=torch.float64)
    c_kv, k_pe = torch.randn(B, S, r, dtype=torch.float64), torch.randn(B, S, rope, dtype=torch.float64)
    start = torch.tensor([S - T, 2, 5])
    visible = _chunk_mask(start, T, S, "cpu")                                  # [B, 1, T, S]
    out = latent_attention(q_lat, q_pe, c_kv, k_pe, 0.3, visible.transpose(1, 2))
    ref = torch.empty_like(out)
    for b in range(B):
        for t in range(T):
            n = int(start[b]) + t + 1                                          # keys 0 … start+t
            for h in range(H):
                s = (c_kv[b, :n] @ q_lat[b, t, h] + k_pe[b, :n] @ q_pe[b, t, h]) * 0.3
                ref[b, t, h] = s.softmax(0) @ c_kv[b, :n]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    unmasked = latent_attention(q_lat, q_pe, c_kv, k_pe, 0.3)                # every key visible
    full = ((torch.einsum("bthr,bsr->bths", q_lat, c_kv) + torch.einsum("bthe,bse->bths", q_pe, k_pe)) * 0.3)
    torch.testing.assert_close(unmasked, full.softmax(-1) @ c_kv[:, None], rtol=1e-12, atol=1e-12)


def test_generation_stops_on_every_eos_id_of_the_model_dir(tmp_path, one_thread):
    """config.json's eos_token_id list (and generation_config.json's, which transformers reads first): every id
    ends generation, plain and speculative."""
    import json
    import random

    import dsv3
    from dsv3.infer.generate import generate_text, load_tokenizer
    from helpers import save_served_model

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    d = save_served_model(tmp_path / "m", seed)
    model = dsv3.load_pretrained(d).eval()
    prompt = "".join(rng.choices("abcdefgh xyz", k=6))
    plain = generate(model, load_tokenizer(d).encode(prompt), 12, temperature=0)
    second = plain[rng.randrange(2, len(plain))]
    first = next(t for t in range(299, 0, -1) if t not in plain)           # never generated
    with open(f"{d}/config.json") as f:
        cfg = json.load(f)
    with open(f"{d}/config.json", "w") as f:
        json.dump({**cfg, "eos_token_id": [first, second]}, f)
    tok = load_tokenizer(d)
    assert tok.stop_ids == {first, second}, seed
    want = prompt + tok.decode(plain[:plain.index(second) + 1])
    assert generate_text(model, tok, prompt, 12, temperature=0) == want, seed
    assert generate_text(model, tok, prompt, 12, temperature=0, speculative=True) == want, seed
    # generation_config.json's list is the one transformers generates with
    third = plain[rng.randrange(0, len(plain))]
    with open(f"{d}/generation_config.json", "w") as f:
        json.dump({"eos_token_id": [third, first]}, f)
    tok = load_tokenizer(d)
    assert tok.stop_ids == {third, first}, seed
    assert generate_text(model, tok, prompt, 12, temperature=0) == prompt + tok.decode(plain[:plain.index(third) + 1])
    with open(f"{d}/generation_config.json", "w") as f:
        json.dump({"eos_token_id": [third, 10**6]}, f)
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id"):
        load_tokenizer(d)
