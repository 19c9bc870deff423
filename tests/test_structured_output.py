"""Structured output (``response_format`` json_object / json_schema): the token mask without the server
(bitmask layout, masked rows only), the engine (constrained rows beside free ones, greedy, sampled and
speculative, each output valid JSON that keeps to its schema and ends with "stop"), then a real
``dsv3 serve`` driven with the ``openai`` client."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from dsv3 import Transformer
from dsv3.infer.engine import Engine
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.structured import GrammarSpec, allowed_tokens, mask_logits, new_bitmask
from helpers import small_config

SCHEMA = {"type": "object",
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["color", "ok", "n"], "additionalProperties": False}


def valid(value, schema=SCHEMA) -> bool:
    """``value`` keeps to SCHEMA (checked by hand: no jsonschema dependency)."""
    if not isinstance(value, dict) or set(value) != set(schema["required"]):
        return False
    n = value["n"]
    return (value["color"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
            and isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 99)


# --------------------------------------------------------------------------------------- the mask
class _Fixed:
    """A stand-in constraint allowing a fixed set of tokens."""

    def __init__(self, allowed):
        self.allowed = allowed

    def fill(self, bitmask, row):
        bitmask[row] = 0
        for t in self.allowed:
            word, bit = divmod(t, 32)
            value = int(bitmask[row, word]) & 0xFFFFFFFF | (1 << bit)
            bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value      # int32 two's complement


def test_bitmask_layout_and_masked_rows_only():
    V = 70                                      # not a multiple of 32: the last word is partly past the vocabulary
    bm = new_bitmask(2, V)
    assert bm.shape == (2, 3) and allowed_tokens(bm, V).all()
    logits = torch.randn(3, V, dtype=torch.float64)
    picks = [[0, 31, 32, 63, 69], [5]]
    out = mask_logits(logits, [0, 2], [_Fixed(picks[0]), _Fixed(picks[1])])
    assert torch.equal(out[1], logits[1])                      # an unconstrained row is untouched
    for row, allowed in zip((0, 2), picks):
        keep = torch.zeros(V, dtype=torch.bool)
        keep[allowed] = True
        assert torch.equal(out[row][keep], logits[row][keep])
        assert torch.isneginf(out[row][~keep]).all()
    assert out[2].argmax() == 5 and torch.isfinite(logits).all()   # the input is left as it was


# --------------------------------------------------------------------------------------- a tokenizer
def _tokenizer():
    """A byte-level tokenizer (256 byte tokens, then bos and eos as special tokens: 258 ids) in dsv3's wrapper."""
    pytest.importorskip("xgrammar")
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, pre_tokenizers

    from dsv3.data import Tokenizer

    vocab = {tok: i for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    hf = HF(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    tok = Tokenizer(hf)
    hf.add_special_tokens([AddedToken(tok.bos_token, special=True), AddedToken(tok.eos_token, special=True)])
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258)
    return tok


def _model(seed, **kw):
    torch.manual_seed(seed)
    m = Transformer(small_config(vocab_size=300, max_position_embeddings=160, **kw)).double()   # ids 258… padding
    return m.eval()


def test_grammar_masks_follow_the_bytes_of_byte_level_tokens():
    from dsv3.infer.structured import Grammars, GrammarError

    tok = _tokenizer()
    g = Grammars(tok, 300)
    c = g.matcher(GrammarSpec("json_object"), {tok.eos_id})
    bm = new_bitmask(1, 300)
    c.fill(bm, 0)
    assert allowed_tokens(bm, 300)[0].nonzero().flatten().tolist() == tok.encode("{")
    for t in tok.encode('{"a": [1, 2]}'):
        c.fill(bm, 0)
        assert allowed_tokens(bm, 300)[0, t]
        assert c.accept(t) and not c.terminated
    c.fill(bm, 0)
    assert allowed_tokens(bm, 300)[0].nonzero().flatten().tolist() == [tok.eos_id]     # complete: only eos
    assert c.accept(tok.eos_id) and c.terminated
    c = g.matcher(GrammarSpec("json_object"), {tok.eos_id})
    assert c.accept(tok.encode("{")[0]) and not c.accept(tok.encode(" ")[0])           # no loose whitespace
    assert not c.accept(tok.bos_id)
    assert not c.accept(299)                                                             # padding ids never
    assert g.compile(GrammarSpec.json_schema(SCHEMA)) is g.compile(GrammarSpec.json_schema(dict(SCHEMA)))  # cached
    with pytest.raises(GrammarError, match="Unsupported type"):
        g.compile(GrammarSpec.json_schema({"type": "foo"}))
    c = g.matcher(GrammarSpec.json_schema(SCHEMA), set())          # no stop token: complete = terminated
    for t in tok.encode('{"color": "red", "ok": false, "n": 7}'):
        assert c.accept(t)
    assert c.terminated


def _run(eng, tok, specs):
    reqs = [eng.submit(tok.encode("x", add_bos=True), k, SamplingParams(t), seed=i, stop_ids={tok.eos_id},
                       grammar=g) for i, (g, t, k) in enumerate(specs)]
    eng.run()
    return reqs


def _text(tok, r):
    return tok.decode([t for t in r.output if t != tok.eos_id])


@pytest.mark.parametrize("speculative", [False, True])
def test_engine_constrained_rows_beside_free_ones(speculative, one_thread):
    from dsv3.infer.generate import generate
    from dsv3.infer.structured import Grammars

    tok = _tokenizer()
    m = _model(seed=3)
    schema = GrammarSpec.json_schema(SCHEMA)
    specs = [(schema, 0.0, 60), (None, 0.0, 20), (schema, 1.0, 60), (schema, 0.8, 60), (GrammarSpec("json_object"),
                                                                                     0.0, 40)]
    eng = Engine(m, max_batch=4, block_size=16, speculative=speculative, grammars=Grammars(tok, 300))
    reqs = _run(eng, tok, specs)
    for r, (g, t, k) in zip(reqs, specs):
        assert r.done and r.error is None, r.error
        if g is None:                            # the free row is exactly what it is alone
            assert r.output == generate(m, r.prompt, k, 0.0, eos_id=tok.eos_id)
        elif g.kind == "json_schema":
            assert r.finish_reason == "stop" and r.output[-1] == tok.eos_id
            assert valid(json.loads(_text(tok, r))), _text(tok, r)
        else:
            text = _text(tok, r)
            assert text.startswith("{")
            if r.finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
    if speculative:
        assert eng.drafted > 0
        plain = _run(Engine(m, max_batch=4, block_size=16, grammars=Grammars(tok, 300)), tok, specs)
        for a, b, (_, t, _) in zip(reqs, plain, specs):      # greedy: the same tokens either way
            if t == 0.0:
                assert a.output == b.output


def test_engine_refuses_a_grammar_it_cannot_build(one_thread):
    from dsv3.infer.structured import Grammars

    tok = _tokenizer()
    m = _model(seed=4)
    with pytest.raises(ValueError, match="no tokenizer for structured output"):
        Engine(m).submit([1, 2], 4, grammar=GrammarSpec("json_object"))
    with pytest.raises(ValueError, match="structured output: .*minimum greater than maximum"):
        Engine(m, grammars=Grammars(tok, 300)).submit(
            [1, 2], 4, grammar=GrammarSpec.json_schema({"type": "integer", "minimum": 5, "maximum": 1}))


def test_check_grammar_refusals_without_a_server(monkeypatch):
    """The server's 400s where a grammar cannot be served: xgrammar missing, a schema it cannot compile."""
    from types import SimpleNamespace

    from dsv3.infer.openai_protocol import APIError
    from dsv3.infer.server import ServerState

    tok = _tokenizer()
    state = SimpleNamespace(tokenizer=tok, vocab_size=300, _grammars=None, _grammars_lock=threading.Lock())
    with pytest.raises(APIError) as e:
        ServerState.check_grammar(state, GrammarSpec.json_schema({"enum": []}))
    assert e.value.param == "response_format.json_schema" and "enum array must not be empty" in e.value.message
    ServerState.check_grammar(state, GrammarSpec.json_schema(SCHEMA))
    state._grammars = None
    monkeypatch.setitem(sys.modules, "xgrammar", None)           # import xgrammar now raises ImportError
    with pytest.raises(APIError) as e:
        ServerState.check_grammar(state, GrammarSpec("json_object"))
    assert e.value.param == "response_format" and "pip install" in e.value.message and "xgrammar" in e.value.message


def test_core_imports_do_not_load_xgrammar():
    from helpers import cli_env

    code = ("import sys, dsv3.infer.server, dsv3.infer.engine, dsv3.infer.worker, dsv3.infer.openai_protocol, "
            "dsv3.infer.structured, dsv3.cli; assert 'xgrammar' not in sys.modules, 'xgrammar imported'")
    subprocess.run([sys.executable, "-c", code], env=cli_env(), check=True, timeout=120)


# --------------------------------------------------------------------------------------- dsv3 serve
try:
    import openai
except ImportError:                   # the tests without a server still run
    openai = None
KEY, NAME = "sk-test", "json-model"


@pytest.fixture(scope="module", params=["plain", "speculative"])
def served(request, model_dir, tmp_path_factory):
    """A server decoding one token a step, or two with MTP drafts (--speculative)."""
    from helpers import serve_plain_or_speculative

    with serve_plain_or_speculative(request.param, model_dir, tmp_path_factory.mktemp("serve_json"), NAME,
                                    KEY) as client:
        yield client

def _chat(client, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Give me JSON."}], **kw)


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}


def test_serve_json_object(served):
    r = _chat(served, response_format={"type": "json_object"}, n=4, temperature=1.0, seed=3, max_tokens=80)
    r0 = _chat(served, response_format={"type": "json_object"}, temperature=0, max_tokens=80)
    for ch in r.choices + r0.choices:
        text = ch.message.content
        assert text.startswith("{"), text              # (spaces inside strings are content)
        if ch.finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
    assert any(ch.finish_reason == "stop" for ch in r.choices + r0.choices)


def test_serve_json_schema_sampled_and_greedy(served):
    r = _chat(served, response_format=SCHEMA_FORMAT, n=4, temperature=1.0, seed=5, max_tokens=60)
    r0 = _chat(served, response_format=SCHEMA_FORMAT, temperature=0, max_tokens=60)
    for ch in r.choices + r0.choices:
        assert ch.finish_reason == "stop" and valid(json.loads(ch.message.content)), ch.message.content


def test_serve_stream_equals_whole_and_concurrent_requests(served):
    whole = _chat(served, response_format=SCHEMA_FORMAT, temperature=0, max_tokens=60).choices[0]
    chunks = list(_chat(served, response_format=SCHEMA_FORMAT, temperature=0, max_tokens=60, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == "stop" == whole.finish_reason
    free_alone = _chat(served, temperature=0, max_tokens=20).choices[0].message.content
    out = {}

    def go(key, **kw):
        out[key] = _chat(served, max_tokens=60 if kw else 20, temperature=0, **kw).choices[0]

    threads = [threading.Thread(target=go, args=("json",), kwargs={"response_format": SCHEMA_FORMAT}),
               threading.Thread(target=go, args=("free",))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out["json"].message.content == whole.message.content      # neither changes the other
    assert out["free"].message.content == free_alone


@pytest.mark.parametrize("fmt,param,words", [
    ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
     "response_format.json_schema", "minimum greater than maximum"),
    ({"type": "json_schema", "json_schema": {"name": "bad", "schema": {"$ref": "#/$defs/missing"}}},
     "response_format.json_schema", "$defs"),
    ({"type": "json_schema", "json_schema": {"name": "no_schema"}}, "response_format.json_schema.schema", "missing"),
    ({"type": "json_schema"}, "response_format.json_schema", "required"),
    ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "response_format.json_schema",
     "only allowed"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "response_format.json_schema.name",
     "pattern"),
    ({"type": "yaml"}, "response_format.type", "json_schema"),
])
def test_serve_bad_response_format_is_a_400(served, fmt, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(served, response_format=fmt, max_tokens=5)
    body = e.value.body
    assert body["param"] == param and words in body["message"] and body["type"] == "invalid_request_error", body


def test_serve_json_with_continue_final_message_is_a_400(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"},
                                                             {"role": "assistant", "content": '{"a": '}],
                                       response_format={"type": "json_object"}, max_tokens=5,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert e.value.body["param"] == "response_format" and "continue_final_message" in e.value.body["message"]
    ok = _chat(served, response_format={"type": "text"}, max_tokens=3, temperature=0)      # text: no constraint
    assert ok.choices[0].message.content == _chat(served, max_tokens=3, temperature=0).choices[0].message.content


def _ep_rank(rank, world, port, model_dir, out_path):
    """One rank of a 2-rank expert-parallel group decoding grammar requests placed on both ranks."""
    import datetime

    import torch.distributed as dist

    from dsv3.infer.ep_engine import EPEngine, load_ep_model
    from dsv3.infer.generate import load_tokenizer
    from dsv3.infer.structured import Grammars
    from dsv3.parallel.mesh import MeshSpec, build_mesh
    from helpers import finish_ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    comm = build_mesh(MeshSpec(world, world), rank).expert_comm()
    model = load_ep_model(model_dir, comm, dtype=torch.float64)
    tok = load_tokenizer(model_dir)
    ep = EPEngine(model, max_batch=4, block_size=16, grammars=Grammars(tok, model.cfg.vocab_size))
    results = {}
    if rank == 0:
        reqs = [ep.submit(tok.encode("x", add_bos=True), k, SamplingParams(t), seed=i, stop_ids={tok.eos_id},
                          grammar=g, rank=i % world) for i, (g, t, k) in enumerate(_ep_specs())]
        ep.run()
        results["reqs"] = [dict(output=r.output, reason=r.finish_reason, error=r.error) for r in reqs]
        ep.close()
    else:
        ep.serve()
    finish_ranks(results, out_path)             # a barrier before leaving the group


def _ep_specs():
    return [(GrammarSpec.json_schema(SCHEMA), 0.0, 60), (None, 0.0, 12), (GrammarSpec.json_schema(SCHEMA), 0.9, 60),
            (GrammarSpec("json_object"), 0.0, 30)]


def test_expert_parallel_ranks_decode_grammar_requests_like_the_single_engine(tmp_path, model_dir):
    """Under --ep a request's grammar travels with it to the rank that decodes it: the outputs equal the
    single-process engine's (same seeds), grammar requests placed on both ranks."""
    from dsv3 import load_pretrained
    from dsv3.infer.generate import load_tokenizer
    from dsv3.infer.structured import Grammars
    from helpers import free_port, spawn_ranks

    out = str(tmp_path / "ep.json")
    res = spawn_ranks(_ep_rank, (2, free_port(), model_dir, out), 2, out, timeout=180)["reqs"]
    tok = load_tokenizer(model_dir)
    model = load_pretrained(model_dir, dtype=torch.float64)
    eng = Engine(model, max_batch=4, block_size=16, grammars=Grammars(tok, model.cfg.vocab_size))
    reqs = _run(eng, tok, _ep_specs())
    assert [r["output"] for r in res] == [r.output for r in reqs]
    assert all(r["error"] is None for r in res)
    first = tok.decode([t for t in res[0]["output"] if t != tok.eos_id])
    assert res[0]["reason"] == "stop" and valid(json.loads(first)), first
