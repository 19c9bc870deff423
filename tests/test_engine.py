"""The batched engine: per-row positions in one forward, continuous batching, equality with
single-request generation (greedy and sampled), limits and bad input."""

import os

import pytest
import torch

from dsv3 import Transformer
from dsv3.infer.engine import Engine
from dsv3.infer.generate import generate
from helpers import small_config


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = Transformer(small_config(**kw)).double()
    with torch.no_grad():
        for mod in m.moe_layers():
            mod.gate.e_score_correction_bias.normal_(0, 0.05)
    return m.eval()


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
    reqs = [eng.submit(s["prompt"], s["max_new_tokens"], s["temperature"], top_p=s["top_p"], seed=s["seed"])
            for s in specs[:4]]
    for _ in range(3):                                            # the rest arrive while others run
        eng.step()
    assert len(eng.running) <= 3
    reqs += [eng.submit(s["prompt"], s["max_new_tokens"], s["temperature"], top_p=s["top_p"], seed=s["seed"])
             for s in specs[4:]]
    eng.run()
    for r, s in zip(reqs, specs):
        ref = generate(m, s["prompt"], s["max_new_tokens"], s["temperature"], top_p=s["top_p"], seed=s["seed"])
        assert r.done and r.finish_reason == "length" and r.output == ref, r.id
    assert eng.idle and eng.steps < sum(s["max_new_tokens"] for s in specs)   # rows shared forwards


def test_engine_eos_position_limit_and_streaming(one_thread):
    m = _model(seed=2, max_position_embeddings=24)
    prompt = [5, 6, 7, 8]
    plain = generate(m, prompt, 100, temperature=0)
    assert len(plain) == 20                                       # capped by max_position_embeddings
    eng = Engine(m, max_batch=2)
    seen = []
    a = eng.submit(prompt, 100, temperature=0, on_token=seen.append)
    b = eng.submit(prompt, 100, temperature=0, eos_id=plain[5])
    eng.run()
    assert a.output == plain == seen and a.finish_reason == "length"
    assert b.output == plain[:plain.index(plain[5]) + 1] and b.finish_reason == "eos"


def test_engine_bad_input():
    m = _model()
    with pytest.raises(ValueError, match="max_batch"):
        Engine(m, max_batch=0)
    with pytest.raises(ValueError, match="max_len"):
        Engine(m, max_len=1000)
    eng = Engine(m, max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="no tokens"):
        eng.submit([])
    with pytest.raises(ValueError, match="16 positions"):
        eng.submit(list(range(16)))
    with pytest.raises(ValueError, match="token ids"):
        eng.submit([3, 97])
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.submit([3], 0)
    with pytest.raises(ValueError, match="top_p"):
        eng.submit([3], 4, top_p=0.0)
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
    eng = Engine(m, max_batch=2, prefix_cache=store)
    first = eng.submit(prompts[0], 6, temperature=0)
    eng.run()
    assert first.output == refs[0] and eng.cached_prompt_tokens == 0
    files = glob.glob(str(tmp_path / "kv" / "*" / "*" / "*.safetensors"))
    assert len(files) == 3 and not glob.glob(str(tmp_path / "kv" / "**" / "*.tmp-*"), recursive=True)

    eng = Engine(m, max_batch=2, prefix_cache=PrefixCache(tmp_path / "kv", m, block_tokens=8))
    again, other = eng.submit(prompts[0], 6, temperature=0), eng.submit(prompts[1], 6, temperature=0)
    eng.run()
    assert again.output == refs[0] and other.output == refs[1]
    assert eng.cached_prompt_tokens == 16 + 16                # prompt 0 keeps its last token to compute

    # a damaged block is a miss with a warning, never wrong output
    newest = sorted(files, key=lambda f: os.path.getmtime(f))[0]
    with open(newest, "r+b") as f:
        f.truncate(20)
    eng = Engine(m, prefix_cache=PrefixCache(tmp_path / "kv", m, block_tokens=8))
    with pytest.warns(UserWarning, match="unreadable block"):
        r = eng.submit(prompts[1], 6, temperature=0)
        eng.run()
    assert r.output == refs[1]
    eng = Engine(m, prefix_cache=PrefixCache(tmp_path / "kv", m, block_tokens=8))   # it was rewritten
    r = eng.submit(prompts[1], 6, temperature=0)
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
            eng = Engine(m, max_batch=3, speculative=True, prefix_cache=store)
            reqs = [eng.submit(p, k, temperature=t, seed=s) for p, k, t, s in specs[:3]]
            eng.step()
            reqs += [eng.submit(p, k, temperature=t, seed=s) for p, k, t, s in specs[3:]]
            eng.run()
            for r, (ref, st) in zip(reqs, refs):
                assert r.output == ref
            assert eng.drafted == sum(st.drafted for _, st in refs)
            assert eng.accepted == sum(st.accepted for _, st in refs) and 0 < eng.accepted < eng.drafted
    assert eng.cached_prompt_tokens > 0
    with pytest.raises(ValueError, match="MTP"):
        Engine(_model(num_nextn_predict_layers=0), speculative=True)
