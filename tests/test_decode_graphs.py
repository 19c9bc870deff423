"""The decode forward at fixed shapes (dsv3.infer.decode_graphs): run eagerly on the CPU it must decode
exactly what the ordinary engine (and single-request generation) decodes — padding rows, bucket changes,
block boundaries, preemption; captured CUDA graphs are checked against it on a GPU."""

import pytest
import torch

from dsv3.infer.decode_graphs import batch_buckets
from dsv3.infer.engine import Engine
from dsv3.infer.generate import generate
from dsv3.infer.sampling import SamplingParams
from helpers import small_model


def _model(seed, dtype=torch.float64, **kw):
    return small_model(seed, dtype, **kw)


def _specs(seed, lengths, vocab=97):
    g = torch.Generator().manual_seed(seed)
    temps = (0.0, 1.0, 0.7)
    return [(torch.randint(3, vocab, (n,), generator=g).tolist(), k, SamplingParams(temps[i % 3]), i)
            for i, (n, k) in enumerate(lengths)]


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


@pytest.mark.parametrize("max_batch,block,lengths", [
    (5, 16, [(3, 20), (17, 9), (1, 14), (30, 6), (9, 11), (15, 3)]),    # 6 requests through 5 slots: 1…5 rows
    (4, 8, [(7, 12), (8, 10), (9, 13)]),                                 # 3 rows in the 4-bucket; blocks of 8
])
def test_static_decode_equals_generation(max_batch, block, lengths, one_thread):
    m = _model(seed=11, max_position_embeddings=64)
    specs = _specs(max_batch, lengths)
    eng = Engine(m, max_batch=max_batch, block_size=block, prefill_chunk=24)
    eng.use_decode_graphs(capture=False)
    seen = set()
    real = eng.graphs.decode

    def decode(tokens, starts, tables):       # which bucket each step used, and that no row holds the scratch block
        seen.add(next(b for b in eng.graphs.buckets if b >= len(tokens)) - len(tokens))
        assert all(eng.graphs.scratch not in t for t in tables)
        return real(tokens, starts, tables)

    eng.graphs.decode = decode
    reqs = [eng.submit(p, k, sp, seed=s) for p, k, sp, s in specs]
    eng.run()
    for r, (prompt, k, params, seed) in zip(reqs, specs):
        assert r.done and r.finish_reason == "length", r.error
        assert r.output == generate(m, prompt, k, params.temperature, seed=seed), r.id
    assert any(pad > 0 for pad in seen), seen                # some steps ran padding rows
    assert eng.pool.ref[eng.graphs.scratch] == 1             # still held, by the graphs alone


def test_static_decode_through_preemption(one_thread):
    m = _model(seed=9, max_position_embeddings=80)
    specs = _specs(5, [(10, 30), (7, 28), (12, 25), (5, 30)])
    per_block = (m.cfg.kv_lora_rank + m.cfg.qk_rope_head_dim) * m.cfg.num_hidden_layers * 8 * 8
    eng = Engine(m, max_batch=4, block_size=8, cache_memory=13 * per_block)    # one block for the padding rows
    eng.use_decode_graphs(capture=False)
    reqs = [eng.submit(p, k, sp, seed=s) for p, k, sp, s in specs]
    eng.run()
    assert eng.preemptions > 0
    for r, (prompt, k, params, seed) in zip(reqs, specs):
        assert r.output == generate(m, prompt, k, params.temperature, seed=seed)


def test_static_decode_logits_match_the_ordinary_step(one_thread):
    """fp32: the static forward (full-width tables, padding rows) gives the ordinary step's logits."""
    m = _model(seed=3, dtype=torch.float32, max_position_embeddings=96)
    prompts = [[5 + i % 80 for i in range(n)] for n in (9, 33, 2)]
    outs = []
    for static in (False, True):
        eng = Engine(m, max_batch=4, block_size=16)
        if static:
            eng.use_decode_graphs(capture=False)
        reqs = [eng.submit(p, 12, SamplingParams(0.0), logprobs=3) for p in prompts]
        eng.run()
        outs.append([(r.output, [t.logprob for t in r.output_logprobs]) for r in reqs])
    for (tok_a, lp_a), (tok_b, lp_b) in zip(*outs):
        assert tok_a == tok_b
        assert max(abs(a - b) for a, b in zip(lp_a, lp_b)) < 1e-4


def test_refusals():
    m = _model(seed=1, dtype=torch.float32, max_position_embeddings=32)
    with pytest.raises(ValueError, match="CUDA device"):
        Engine(m, max_batch=2, block_size=16, cuda_graphs=True)
    eng = Engine(m, max_batch=2, block_size=16)
    eng.use_decode_graphs(capture=False)
    with pytest.raises(ValueError, match="1 … 2"):
        eng.graphs.decode([1, 2, 3], [0, 0, 0], [[0], [0], [0]])
    with pytest.raises(RuntimeError, match="not speculative"):
        eng.graphs.verify([1], torch.tensor([2]), [0], [[0]])


def test_static_speculative_decode_equals_the_speculative_engine(one_thread):
    """Verify (trunk at two positions) and draft (MTP) at fixed shapes: the same tokens — sampled ones too —
    and the same draft acceptances as the ordinary speculative step; padding rows included."""
    m = _model(seed=13, max_position_embeddings=72)
    specs = _specs(7, [(5, 22), (19, 15), (2, 25), (33, 9), (8, 17)])
    runs = []
    for static in (False, True):
        eng = Engine(m, max_batch=4, block_size=8, speculative=True, prefill_chunk=20)
        if static:
            eng.use_decode_graphs(capture=False)
            assert eng.graphs.parts == ("verify", "draft")
        reqs = [eng.submit(p, k, sp, seed=s) for p, k, sp, s in specs]
        eng.run()
        assert all(r.done and r.finish_reason == "length" for r in reqs), [r.error for r in reqs]
        runs.append(([r.output for r in reqs], eng.drafted, eng.accepted))
    assert runs[0] == runs[1]
    assert runs[1][2] > 0                  # some drafts were accepted (bonus tokens through the static path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_graphs_equal_the_eager_static_forward():
    m = _model(seed=4, dtype=torch.bfloat16, max_position_embeddings=256).cuda()
    prompts = [[5 + (7 * i) % 90 for i in range(n)] for n in (40, 3, 100, 17, 64)]
    for speculative in (False, True):
        outs = []
        for capture in (False, True):
            eng = Engine(m, max_batch=8, block_size=64, speculative=speculative)
            eng.use_decode_graphs(capture=capture)
            assert eng.graphs.captured == capture
            reqs = [eng.submit(p, 24, SamplingParams(0.0)) for p in prompts]
            eng.run()
            outs.append([r.output for r in reqs])
        assert outs[0] == outs[1]
