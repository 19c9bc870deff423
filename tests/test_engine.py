"""The batched engine over the paged latent cache: per-row positions in one forward, continuous
batching, equality with single-request generation (greedy and sampled) through block boundaries,
prefix sharing, preemption and chunked prefill; limits, memory and bad input."""

import math
import os

import pytest
import torch

from dsv3 import Transformer
from dsv3.infer.engine import ContextOverflow, Engine
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.generate import generate
from helpers import small_config, small_model


def _model(seed=0, **kw):
    return small_model(seed, torch.float64, **kw)


def test_rows_at_different_positions_in_one_forward(one_thread):
    m = _model()
    lengths = [3, 9, 6]
    seqs = [torch.randint(0, 97, (n + 2,)) for n in lengths]
    with torch.no_grad():
        cache = m.new_cache(3, 16)
        for b, s in enumerate(seqs):                              # prefill each row on its own
            m(s[None, :lengths[b]], 0, cache.rows(b, b + 1))
        for t in range(2):                                        # then two batched steps
            pos = torch.tensor([n + t for n in lengths])
            tokens = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]
            out = m(tokens, pos, cache)[:, 0]
            for b, s in enumerate(seqs):
                ref = m(s[None, :lengths[b] + t + 1])[0, -1]
                torch.testing.assert_close(out[b], ref, rtol=1e-10, atol=1e-10)


def test_engine_matches_single_request_generation(one_thread):
    m = _model(seed=1)
    g = torch.Generator().manual_seed(0)
    specs = [dict(prompt=torch.randint(3, 97, (n,), generator=g).tolist(), max_new_tokens=k, temperature=t,
                  top_p=tp, seed=i)
             for i, (n, k, t, tp) in enumerate([(5, 12, 0.0, 1.0), (9, 7, 1.0, 0.9), (2, 15, 0.7, 1.0),
                                                (13, 1, 0.0, 1.0), (4, 10, 1.0, 1.0), (7, 9, 0.0, 1.0)])]
    eng = Engine(m, max_batch=3, max_len=40)
    reqs = [eng.submit(s["prompt"], s["max_new_tokens"], SamplingParams(s["temperature"], top_p=s["top_p"]),
                       seed=s["seed"]) for s in specs[:4]]
    for _ in range(3):                                            # the rest arrive while others run
        eng.step()
    assert len(eng.running) <= 3
    reqs += [eng.submit(s["prompt"], s["max_new_tokens"], SamplingParams(s["temperature"], top_p=s["top_p"]),
                        seed=s["seed"]) for s in specs[4:]]
    eng.run()
    for r, s in zip(reqs, specs):
        ref = generate(m, s["prompt"], s["max_new_tokens"], s["temperature"], top_p=s["top_p"], seed=s["seed"])
        assert r.done and r.finish_reason == "length" and r.output == ref, r.id
    assert eng.idle and eng.steps < sum(s["max_new_tokens"] for s in specs)   # rows shared forwards


GREEDY = SamplingParams(0.0)


def test_engine_stop_tokens_position_limit_and_streaming(one_thread):
    m = _model(seed=2, max_position_embeddings=24)
    prompt = [5, 6, 7, 8]
    plain = generate(m, prompt, 100, temperature=0)
    assert len(plain) == 20                                       # capped by max_position_embeddings
    eng = Engine(m, max_batch=2, block_size=4)
    seen = []
    a = eng.submit(prompt, 20, GREEDY, on_token=lambda r: seen.append(r.output[-1]))
    b = eng.submit(prompt, 20, GREEDY, stop_ids={plain[5]})
    eng.run()
    assert a.output == plain == seen and a.finish_reason == "length"
    assert b.output == plain[:plain.index(plain[5]) + 1] and b.finish_reason == "stop"
    with pytest.raises(ContextOverflow, match="context holds 24"):
        eng.submit(prompt, 21)


def test_engine_bad_input():
    m = _model()
    with pytest.raises(ValueError, match="max_batch"):
        Engine(m, max_batch=0)
    with pytest.raises(ValueError, match="max_len"):
        Engine(m, max_len=1000)
    eng = Engine(m, max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="no tokens"):
        eng.submit([])
    with pytest.raises(ContextOverflow, match="16"):
        eng.submit(list(range(16)), 1)
    with pytest.raises(ValueError, match="token ids"):
        eng.submit([3, 97])
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.submit([3], 0)
    with pytest.raises(ValueError, match="logprobs"):
        eng.submit([3], 2, logprobs=-1)
    for bad, field in [(dict(top_p=0.0), "top_p"), (dict(temperature=float("nan")), "temperature"),
                       (dict(presence_penalty=3.0), "presence_penalty"), (dict(logit_bias={5: 1e9}), "logit_bias"),
                       (dict(temperature=float("inf")), "temperature")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="cache_memory"):
        Engine(m, cache_memory=10)
    assert eng.idle


def test_prefix_cache_on_disk(tmp_path, one_thread):
    import glob

    from dsv3.infer.prefix_cache import PrefixCache

    m = _model(seed=3)
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 97, (21,), generator=g).tolist()           # 2 full blocks of 8, then 5
    prompts = [shared + torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, 6)]
    refs = [generate(m, p, 6, temperature=0) for p in prompts]

    store = PrefixCache(tmp_path / "kv", m, block_tokens=8)
    eng = Engine(m, max_batch=2, prefix_cache=store, block_size=8)
    first = eng.submit(prompts[0], 6, GREEDY)
    eng.run()
    assert first.output == refs[0] and eng.cached_prompt_tokens == 0
    files = glob.glob(str(tmp_path / "kv" / "*" / "*" / "*.safetensors"))
    assert len(files) == 3 and not glob.glob(str(tmp_path / "kv" / "**" / "*.tmp-*"), recursive=True)

    eng = Engine(m, max_batch=2, prefix_cache=PrefixCache(tmp_path / "kv", m, block_tokens=8), block_size=8)
    again, other = eng.submit(prompts[0], 6, GREEDY), eng.submit(prompts[1], 6, GREEDY)
    eng.run()
    assert again.output == refs[0] and other.output == refs[1]
    # prompt 0's 2 blocks from disk; prompt 1 shares them in memory (admitted together: after prompt 0's prefill)
    assert again.cached_tokens == 16 and eng.cached_prompt_tokens >= 16

    # a damaged block is a miss with a warning, never wrong output
    newest = sorted(files, key=lambda f: os.path.getmtime(f))[0]
    with open(newest, "r+b") as f:
        f.truncate(20)
    eng = Engine(m, prefix_cache=PrefixCache(tmp_path / "kv", m, block_tokens=8), block_size=8)
    with pytest.warns(UserWarning, match="unreadable block"):
        r = eng.submit(prompts[1], 6, GREEDY)
        eng.run()
    assert r.output == refs[1]
    eng = Engine(m, prefix_cache=PrefixCache(tmp_path / "kv", m, block_tokens=8), block_size=8)  # rewritten
    r = eng.submit(prompts[1], 6, GREEDY)
    eng.run()
    assert r.output == refs[1] and eng.cached_prompt_tokens == 24         # 3 full blocks of prompt 1

    # another model (other weights) never reads these blocks
    other_model = _model(seed=4)
    assert PrefixCache(tmp_path / "kv", other_model, block_tokens=8).fingerprint != store.fingerprint
    with pytest.raises(ValueError, match="block_tokens"):
        PrefixCache(tmp_path / "kv", m, block_tokens=0)


def test_speculative_engine_matches_single_request_speculative(tmp_path, one_thread):
    from dsv3.infer.prefix_cache import PrefixCache
    from dsv3.infer.speculative import generate_speculative

    m = _model(seed=5, vocab_size=12)                    # small vocabulary: drafts often right, sometimes not
    g = torch.Generator().manual_seed(2)
    shared = torch.randint(3, 12, (9,), generator=g).tolist()
    specs = [(shared + torch.randint(3, 12, (n,), generator=g).tolist(), k, t, i)
             for i, (n, k, t) in enumerate([(2, 14, 0.0), (5, 9, 1.0), (1, 1, 0.0), (7, 12, 0.8), (3, 11, 0.0)])]
    refs = [generate_speculative(m, p, k, temperature=t, seed=s) for p, k, t, s in specs]
    for store in (None, PrefixCache(tmp_path / "kv", m, block_tokens=4)):
        for _ in range(2 if store else 1):               # with a store: the second pass hits disk
            eng = Engine(m, max_batch=3, speculative=True, prefix_cache=store, block_size=4)
            reqs = [eng.submit(p, k, SamplingParams(t), seed=s) for p, k, t, s in specs[:3]]
            eng.step()
            reqs += [eng.submit(p, k, SamplingParams(t), seed=s) for p, k, t, s in specs[3:]]
            eng.run()
            for r, (ref, st) in zip(reqs, refs):
                assert r.output == ref
            assert eng.drafted == sum(st.drafted for _, st in refs)
            assert eng.accepted == sum(st.accepted for _, st in refs) and 0 < eng.accepted < eng.drafted
    assert eng.cached_prompt_tokens > 0
    with pytest.raises(ValueError, match="MTP"):
        Engine(_model(num_nextn_predict_layers=0), speculative=True)


def _specs(g, lengths, vocab=97, temps=(0.0, 1.0, 0.7)):
    return [(torch.randint(3, vocab, (n,), generator=g).tolist(), k, SamplingParams(temps[i % len(temps)]), i)
            for i, (n, k) in enumerate(lengths)]


def _check_against_generate(m, eng, specs, reqs):
    for r, (prompt, k, params, seed) in zip(reqs, specs):
        ref = generate(m, prompt, k, params.temperature, seed=seed)
        assert r.done and r.finish_reason == "length" and r.output == ref, (r.id, r.error)


def test_paged_block_boundaries_and_chunked_prefill(one_thread):
    m = _model(seed=6, max_position_embeddings=160)
    g = torch.Generator().manual_seed(3)
    specs = _specs(g, [(63, 6), (64, 6), (65, 6), (1, 9), (130, 5)])
    eng = Engine(m, max_batch=4, block_size=64, prefill_chunk=48)    # the long prompts take several steps
    reqs = [eng.submit(p, k, sp, seed=s) for p, k, sp, s in specs]
    eng.step()
    assert reqs[0]._computed == 48 and not reqs[0].output           # a chunk, not the whole prompt
    eng.run()
    _check_against_generate(m, eng, specs, reqs)
    assert eng.pool.num_used == 0 or all(eng.pool.ref[b] == 0 for b in range(eng.pool.num_blocks))


def test_prefill_chunks_interleave_with_decoding(one_thread):
    m = _model(seed=7, max_position_embeddings=200)
    eng = Engine(m, max_batch=2, block_size=16, prefill_chunk=16)
    a = eng.submit([5, 6, 7], 30, GREEDY)
    eng.step()
    eng.step()
    n = len(a.output)
    b = eng.submit([3 + i % 90 for i in range(96)], 2, GREEDY)                 # 96 prompt tokens: 6 chunks
    for _ in range(5):
        eng.step()
    assert len(a.output) == n + 5 and not b.output and b._computed == 80     # a kept decoding while b prefilled
    eng.step()
    assert len(b.output) == 2                                     # the last chunk, its first token, then a decode
    eng.run()
    assert b.output == generate(m, [3 + i % 90 for i in range(96)], 2, temperature=0)


def test_prefix_sharing_in_memory(one_thread):
    m = _model(seed=8, max_position_embeddings=120)
    g = torch.Generator().manual_seed(4)
    shared = torch.randint(3, 97, (40,), generator=g).tolist()              # 5 full blocks of 8
    prompts = [shared + torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, 9, 0)]
    eng = Engine(m, max_batch=3, block_size=8)
    first = eng.submit(prompts[0], 5, GREEDY)
    eng.run()
    used_one = math.ceil((len(prompts[0]) + 1) / 8)
    later = [eng.submit(p, 5, SamplingParams(0.9), seed=i) for i, p in enumerate(prompts[1:])]
    eng.step()
    assert later[0].cached_tokens == 40 and later[1].cached_tokens == 32    # the last keeps a token to compute
    shared_blocks = set(later[0]._blocks[:4]) & set(later[1]._blocks[:4])
    assert len(shared_blocks) == 4 and all(eng.pool.ref[b] == 2 for b in shared_blocks)
    eng.run()
    assert first.output == generate(m, prompts[0], 5, temperature=0)
    for r, p, s in zip(later, prompts[1:], range(2)):
        assert r.output == generate(m, p, 5, 0.9, seed=s)
    assert used_one > 0 and eng.pool.num_used == 0


def test_padded_prefill_near_the_end_of_the_context(one_thread):
    # one prefill forward holds a row that starts late (its prefix came from the shared blocks) and ends at
    # the last position, and a longer fresh row: the late row's padding runs past max_position_embeddings
    m = _model(seed=9)
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 97, (32,), generator=g).tolist()
    late, fresh = shared + torch.randint(3, 97, (30,), generator=g).tolist(), torch.randint(3, 97, (50,), generator=g).tolist()
    eng = Engine(m, max_batch=2, block_size=16)
    eng.submit(shared + [5], 1, GREEDY)
    eng.run()
    reqs = [eng.submit(late, 2, GREEDY), eng.submit(fresh, 3, SamplingParams(0.9), seed=1)]
    eng.run()
    assert reqs[0].cached_tokens == 32 and not any(r.error for r in reqs)
    assert reqs[0].output == generate(m, late, 2, temperature=0) and reqs[1].output == generate(m, fresh, 3, 0.9, seed=1)


def test_preemption_reproduces_the_same_tokens(one_thread):
    m = _model(seed=9, max_position_embeddings=80)
    g = torch.Generator().manual_seed(5)
    specs = _specs(g, [(10, 30), (7, 28), (12, 25), (5, 30)])
    per_block = (m.cfg.kv_lora_rank + m.cfg.qk_rope_head_dim) * m.cfg.num_hidden_layers * 8 * 8
    eng = Engine(m, max_batch=4, block_size=8, cache_memory=12 * per_block)     # 4 × ~5 blocks needed
    assert eng.pool.num_blocks == 12
    reqs = [eng.submit(p, k, sp, seed=s) for p, k, sp, s in specs]
    eng.run()
    assert eng.preemptions > 0
    _check_against_generate(m, eng, specs, reqs)


def test_preemption_during_prefill_keeps_every_prompt_logprob(one_thread):
    # requests preempted part-way through their prompt compute it again in chunks that do not line up
    # with the first pass (the chunk budget is shared); every prompt log-probability is still there once
    m = _model(seed=12, max_position_embeddings=96)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (40, 33, 45, 29)]
    per_block = (m.cfg.kv_lora_rank + m.cfg.qk_rope_head_dim) * m.cfg.num_hidden_layers * 8 * 8

    def run(**kw):
        eng = Engine(m, max_batch=4, block_size=8, prefill_chunk=11, **kw)
        reqs = [eng.submit(p, 24, GREEDY, prompt_logprobs=1) for p in prompts]
        eng.run()
        return eng, reqs

    tight, got = run(cache_memory=11 * per_block)      # preempts a request mid-prompt
    _, ref = run()
    assert tight.preemptions > 0
    for a, b, p in zip(got, ref, prompts):
        assert a.output == b.output and len(a.prompt_logprobs_out) == len(p) and a.prompt_logprobs_out[0] is None
        for x, y in zip(a.prompt_logprobs_out[1:], b.prompt_logprobs_out[1:]):
            assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-5


def test_speculative_preemption_and_chunks(one_thread):
    from dsv3.infer.speculative import generate_speculative

    m = _model(seed=10, vocab_size=12, max_position_embeddings=80)
    g = torch.Generator().manual_seed(6)
    specs = [(torch.randint(3, 12, (n,), generator=g).tolist(), k, t, i)
             for i, (n, k, t) in enumerate([(9, 25, 0.0), (13, 22, 1.0), (6, 24, 0.0)])]
    refs = [generate_speculative(m, p, k, temperature=t, seed=s)[0] for p, k, t, s in specs]
    per_block = (m.cfg.kv_lora_rank + m.cfg.qk_rope_head_dim) * (m.cfg.num_hidden_layers + 1) * 4 * 8
    eng = Engine(m, max_batch=3, block_size=4, speculative=True, prefill_chunk=5, cache_memory=16 * per_block)
    reqs = [eng.submit(p, k, SamplingParams(t), seed=s) for p, k, t, s in specs]
    eng.run()
    assert eng.preemptions > 0
    for r, ref in zip(reqs, refs):
        assert r.output == ref


def test_abort_logprobs_penalties_and_a_failing_request(one_thread):
    m = _model(seed=11)
    eng = Engine(m, max_batch=3, block_size=8)
    a = eng.submit([5, 6, 7], 20, GREEDY, logprobs=3, prompt_logprobs=2)
    b = eng.submit([5, 6, 7], 20, GREEDY)

    def boom(req):
        raise RuntimeError("consumer went away")
    c = eng.submit([8, 9], 20, GREEDY, on_token=boom)
    eng.step()
    eng.abort(b)
    eng.run()
    assert b.finish_reason == "abort" and c.finish_reason == "error" and "consumer" in c.error
    assert a.finish_reason == "length" and a.output == generate(m, [5, 6, 7], 20, temperature=0)
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([[5, 6, 7] + a.output]))[0].float(), -1)
    for j, e in enumerate(a.output_logprobs):
        assert e.token == a.output[j] and abs(e.logprob - float(lp[2 + j, e.token])) < 1e-5
        assert [t for t, _ in e.top] == lp[2 + j].topk(3).indices.tolist()
    assert a.prompt_logprobs_out[0] is None and len(a.prompt_logprobs_out) == 3
    assert abs(a.prompt_logprobs_out[2].logprob - float(lp[1, 7])) < 1e-5
    # penalties and bias change what is sampled; a tiny temperature is greedy, never NaN
    forced = eng.submit([5, 6, 7], 5, SamplingParams(0.0, logit_bias={42: 100.0}))
    tiny = eng.submit([5, 6, 7], 5, SamplingParams(1e-300), seed=1)
    rep = eng.submit([5, 6, 7], 12, SamplingParams(0.0, frequency_penalty=2.0, presence_penalty=2.0))
    eng.run()
    assert forced.output == [42] * 5 and tiny.output == a.output[:5]
    assert len(set(rep.output)) > len(set(a.output[:12]))
    assert eng.idle and eng.pool.num_used == 0


def test_deepseek_v3_shaped_config_serves_within_its_memory_budget(one_thread):
    """163,840 positions (the real config's context): the cache is sized by the budget, not by
    max_position_embeddings (which would be 11.5 GB per slot at full width)."""
    from dsv3.config import ModelConfig

    cfg = ModelConfig.preset("deepseek-v3").replace(hidden_size=256, num_hidden_layers=2, first_k_dense_replace=1,
                                        intermediate_size=256, moe_intermediate_size=64, n_routed_experts=16,
                                        num_experts_per_tok=4, n_group=4, topk_group=2, num_attention_heads=4,
                                        vocab_size=512, num_nextn_predict_layers=1)
    assert cfg.max_position_embeddings == 163840 and cfg.kv_lora_rank == 512
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    budget = 64 << 20

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = rss()
    eng = Engine(m, max_batch=8, cache_memory=budget)
    assert eng.cache.nbytes() <= budget and eng.max_len == 163840
    reqs = [eng.submit(torch.randint(3, 512, (n,)).tolist(), 8, GREEDY) for n in (5, 70, 140)]
    eng.run()
    assert rss() - before < budget + (48 << 20)        # the pool + activations (one full-length row: 0.75 GB)
    assert all(r.finish_reason == "length" and len(r.output) == 8 for r in reqs)
    assert reqs[1].output == generate(m, reqs[1].prompt, 8, temperature=0)


def test_engine_through_the_paged_kernel_equals_generate(tmp_path):
    """The GPU wiring (MLA → PagedView.attend → the Triton paged kernel) run under TRITON_INTERPRET=1
    on the CPU: the engine's tokens equal single-request generation."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    script = tmp_path / "kernel_engine.py"
    script.write_text('''
import torch
from dsv3 import Transformer
from dsv3.infer.engine import Engine
from dsv3.infer.generate import generate
from dsv3.infer.paged_cache import PagedView
from dsv3.infer.sampling import SamplingParams
import sys; sys.path.insert(0, "tests")
from helpers import small_config
import dsv3.infer.paged_attention as pa
PagedView.uses_kernel = property(lambda self: True)
PagedView.kernel_backend = "triton"
calls = []
real = pa.paged_mla_attention
pa.paged_mla_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
torch.manual_seed(0)
m = Transformer(small_config(max_position_embeddings=64)).eval()
for layer in m.layers:
    layer.self_attn.attn_impl = "absorbed"
eng = Engine(m, max_batch=3, block_size=16)
prompts = [[5, 6, 7], list(range(3, 20)), [9] * 16]
reqs = [eng.submit(p, 6, SamplingParams(0.0)) for p in prompts]
eng.run()
for r, p in zip(reqs, prompts):
    assert r.output == generate(m, p, 6, temperature=0), (r.output, r.error)
assert len(calls) >= 6 * len(m.layers), len(calls)
print("ok")
''')
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script)], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_paged_view_slots_against_the_block_tables():
    """The slots a forward writes and reads, against a position-by-position walk of the block tables:
    rows at different positions, padded columns (never written), reads past a row's end clamped to
    its last position, and the attention mask made once per view."""
    from dsv3.infer.paged_cache import PagedLatentCache
    from dsv3.model.mla import _visible

    cfg = small_config()
    bs = 4
    pool = PagedLatentCache(cfg, num_blocks=12, block_size=bs, num_layers=2)
    tables = [[7, 2, 9], [4], [11, 0]]
    starts, lengths = [6, 1, 3], [3, 2, 5]
    view = pool.view(tables, torch.tensor(starts), lengths)
    slot = lambda t, p: t[p // bs] * bs + p % bs                                      # noqa: E731
    assert view.end == max(s + n for s, n in zip(starts, lengths)) == 9
    assert view.write_idx.tolist() == [slot(t, p) for t, s, n in zip(tables, starts, lengths)
                                       for p in range(s, s + n)]
    last = [s + n - 1 for s, n in zip(starts, lengths)]
    assert view.read_idx.tolist() == [[slot(t, min(p, e)) for p in range(view.end)] for t, e in zip(tables, last)]
    assert view.valid.tolist() == [[j < n for j in range(max(lengths))] for n in lengths]
    torch.manual_seed(0)
    kv = torch.randn(3, 5, cfg.kv_lora_rank)
    pe = torch.randn(3, 5, cfg.qk_rope_head_dim)
    c_kv, k_pe = view.update(1, view.start, kv, pe)
    for b, (t, s, n) in enumerate(zip(tables, starts, lengths)):
        for j in range(n):
            assert torch.equal(pool.kv[1].view(-1, cfg.kv_lora_rank)[slot(t, s + j)], kv[b, j])
            assert torch.equal(c_kv[b, s + j], kv[b, j]) and torch.equal(k_pe[b, s + j], pe[b, j])
    assert pool.kv[0].abs().max() == 0                                                 # other layer untouched
    mask = _visible(view, view.start, 5, view.end, "cpu")
    assert _visible(view, view.start, 5, view.end, "cpu") is mask                      # built once per forward
    decode = pool.view(tables, torch.tensor(last), [1, 1, 1])
    assert decode.valid is None and decode.write_idx.tolist() == [slot(t, e) for t, e in zip(tables, last)]


# ------------------------------------------------------------------------------ host overhead of a decode step
class _DecodeCounter:
    """Counts, while active, the aten ops dispatched, the host syncs they would cost on a GPU (reads of
    device values: item/_local_scalar_dense, tolist, nonzero, bincount, boolean-mask indexing …) and the
    tensors made from Python data (uploads) — what benchmarks/decode_host_overhead.py reports."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        sync_ops = {aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default,
                    aten.masked_select.default, aten.bincount.default, aten._unique2.default}
        counter = self
        self.ops, self.syncs, self.uploads = 0, [], 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                bool_index = func in (aten.index.Tensor, aten.index_put_.default) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
                if func in sync_ops or bool_index:
                    counter.syncs.append(str(func))
                counter.uploads += func is aten.lift_fresh.default
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        real = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: self.syncs.append("tolist") or real(t))

    def __enter__(self):
        self.ops, self.syncs, self.uploads = 0, [], 0
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _fp32_model(seed):
    return small_model(seed, max_position_embeddings=128)


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step_host_syncs_and_ops_are_fixed(batch, one_thread, monkeypatch):
    """A greedy decode step (fp32, the MoE layers on the grouped GEMM as on a GPU; "auto" takes it on CPU
    only for batched rows) reads the device once — its tokens — makes two tensors from Python data (the
    tokens fed, the cache view's indices: one copy each) and dispatches the same number of ops every step,
    whatever the routing and the positions."""
    m = _fp32_model(seed=11)
    for mod in m.moe_layers():
        mod.experts.backend = "grouped_mm"
    eng = Engine(m, max_batch=batch, max_len=128, block_size=16)
    g = torch.Generator().manual_seed(batch)
    reqs = [eng.submit(torch.randint(3, 97, (5 + 3 * i,), generator=g).tolist(), 30, GREEDY) for i in range(batch)]
    while any(not r.output for r in reqs):
        eng.step()
    counter = _DecodeCounter(monkeypatch)
    ops = []
    for _ in range(14):                      # crosses a 16-token block boundary of every row
        with counter:
            eng.step()
        assert len(counter.syncs) <= 1, counter.syncs
        assert counter.uploads <= 2
        ops.append(counter.ops)
    assert len(set(ops)) == 1, ops


@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_engine_decode_matches_full_forward(batch, one_thread):
    """fp32 greedy decoding through the engine (the decode-sized MoE path, unmasked attention at batch 1,
    rows at different positions at batch 3): every token is the argmax of the model's full forward
    over the sequence so far, and its log-probability agrees with that forward's to fp32 rounding; the
    per-segment MoE path (the one taken before for few tokens) gives the same tokens and numbers."""
    m = _fp32_model(seed=12)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (4 + 7 * i,), generator=g).tolist() for i in range(batch)]

    def run(backend):
        for mod in m.moe_layers():
            mod.experts.backend = backend
        eng = Engine(m, max_batch=batch, max_len=128, block_size=16)
        reqs = [eng.submit(p, 12, GREEDY, logprobs=0) for p in prompts]
        eng.run()
        return reqs

    auto, segments = run("auto"), run("segments")
    for a, s, p in zip(auto, segments, prompts):
        assert a.output == s.output
        for j, (ea, es) in enumerate(zip(a.output_logprobs, s.output_logprobs)):
            assert abs(ea.logprob - es.logprob) < 1e-5
            with torch.no_grad():
                ref = torch.log_softmax(m(torch.tensor([p + a.output[:j]]))[0, -1], -1)
            assert a.output[j] == int(ref.argmax()) and abs(ea.logprob - float(ref[a.output[j]])) < 1e-4
