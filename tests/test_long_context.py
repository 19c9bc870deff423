"""Long context (SPEC §2.5): YaRN extension stages (train.extend, dsv3 train --from --extend-context), the
passkey mix, the evaluation (dsv3 eval: loss by position, passkey, needle in a haystack) and the memory
form of training attention at long lengths."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.cli import main as cli
from dsv3.config import ModelConfig
from dsv3.data.passkey import (MixedDataset, Retrieval, copy_document, ordinary_ids, parse_mix, random_key,
                               score_answer)
from dsv3.eval.longctx import bucket_means, ppl_by_position, token_losses
from dsv3.model.rope import rope_cos_sin_scale, rope_frequencies
from dsv3.train.extend import extended_config
from helpers import small_config

FAST = ["--no-progress", "--no-plots", "--sample-prompt", "", "--eval-batches", "1", "--eval-every", "0"]


# ------------------------------------------------------------------------------ YaRN of an extension stage
def _closed_form(D, base, factor, L, beta_fast=32.0, beta_slow=1.0):
    """θ'_j of YaRN, written out: γ_j = 1 − clamp((j − lo)/(hi − lo), 0, 1) with lo/hi the (floored/ceiled)
    dimension indices at which θ_j turns β_fast / β_slow times over L positions; θ'_j = θ_j·γ_j + θ_j/s·(1−γ_j)."""
    idx = lambda r: D * math.log(L / (2 * math.pi * r)) / (2 * math.log(base))  # noqa: E731
    lo, hi = max(math.floor(idx(beta_fast)), 0), min(math.ceil(idx(beta_slow)), D - 1)
    hi = hi + 0.001 if hi == lo else hi
    out = []
    for j in range(D // 2):
        th = base ** (-2 * j / D)
        g = 1 - min(max((j - lo) / (hi - lo), 0.0), 1.0)
        out.append(th * g + th / factor * (1 - g))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("factor", [2.0, 4.0, 16.0, 40.0])
def test_extension_config_yarn_frequencies_and_mscale_closed_form(factor):
    cfg = small_config(qk_rope_head_dim=16, num_nextn_predict_layers=1)
    ext = extended_config(cfg, factor, original=32, seq_len=32)
    rs = ext.rope_scaling
    assert rs == {"type": "yarn", "factor": factor, "original_max_position_embeddings": 32, "beta_fast": 32.0,
                  "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert ext.max_position_embeddings == max(int(32 * factor), 33)
    torch.testing.assert_close(rope_frequencies(ext).double(), _closed_form(16, cfg.rope_theta, factor, 32),
                               rtol=1e-6, atol=0)
    m = 0.1 * math.log(factor) + 1                     # mscale on the softmax scale, squared (q and k)
    assert ext.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5 * m * m)
    assert rope_cos_sin_scale(ext) == pytest.approx(1.0)
    # a second stage keeps the original positions (train.extend.original_length) and the same rope
    again = extended_config(ext, factor, original=32, seq_len=int(32 * factor))
    assert again.rope_scaling == rs


def test_extension_config_flags_and_round_trip():
    cfg = small_config()
    ext = extended_config(cfg, 8, original=16, seq_len=100, beta_fast=16, beta_slow=2, mscale=0.707)
    assert ext.rope_scaling["mscale"] == ext.rope_scaling["mscale_all_dim"] == 0.707
    hf = ext.to_hf()
    assert hf["rope_scaling"]["factor"] == 8.0 and hf["max_position_embeddings"] == 128
    back = ModelConfig.from_hf(json.loads(json.dumps(hf)))
    assert back.rope_scaling == ext.rope_scaling and back == ext
    with pytest.raises(ValueError, match="--seq-len 200 is beyond the extended context"):
        extended_config(cfg, 8, original=16, seq_len=200)
    with pytest.raises(ValueError, match="--extend-context"):
        extended_config(cfg, 0.5, original=16, seq_len=8)
    with pytest.raises(ValueError, match="beta"):
        extended_config(cfg, 4, original=16, seq_len=8, beta_fast=1, beta_slow=2)


# ------------------------------------------------------------------------------ the stage through the CLI
@pytest.fixture(scope="module")
def source_run(tmp_path_factory, data_dir):
    """A 'pre-trained' run: final/ (a small random model + the corpus tokenizer) and run.json (seq-len 16)."""
    root = tmp_path_factory.mktemp("src_run")
    torch.manual_seed(0)
    dsv3.save_pretrained(dsv3.Transformer(small_config(vocab_size=2048, max_position_embeddings=64)), root / "final")
    shutil.copy(os.path.join(data_dir, "tokenizer.json"), root / "final" / "tokenizer.json")
    (root / "run.json").write_text(json.dumps({"seq-len": 16}))
    return root


@pytest.fixture(scope="module")
def stage(tmp_path_factory, source_run, data_dir):
    out = tmp_path_factory.mktemp("stage") / "run"
    args = ["train", "--from", str(source_run), "--extend-context", "4", "--seq-len", "64", "--data", data_dir,
            "--mix", "passkey:0.5", "--steps", "4", "--batch-size", "2", "--save-every", "2", "--warmup", "1",
            "--out", str(out), *FAST]
    assert cli(args) == 0
    return out, args


def _losses(run) -> dict:
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_stage_sets_yarn_over_the_trained_length_and_keeps_the_weights(stage, source_run):
    out, _ = stage
    cfg = json.load(open(out / "final" / "config.json"))
    assert cfg["rope_scaling"]["factor"] == 4.0
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 16       # the source's run.json seq-len
    assert cfg["max_position_embeddings"] == 65                                # 64 + the MTP depth
    src = dsv3.load_pretrained(source_run / "final").state_dict()
    ckpt = json.load(open(out / "checkpoints" / "step-000000002" / "meta.json"))
    assert ckpt["train_config"]["init_from"] == str(source_run / "final")
    new = dsv3.load_pretrained(out / "final").state_dict()
    assert set(src) == set(new)
    # trained a little from the source's weights (not from a fresh init): close to them, not equal
    w = "layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert 0 < (new[w] - src[w]).norm() < 0.2 * src[w].norm()


def test_exported_stage_matches_transformers_at_the_extended_length(stage):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    out, _ = stage
    ours = dsv3.load_pretrained(out / "final").eval()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.config.rope_parameters["factor"] == 4.0
    x = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(3))   # 4× the original 16
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-4


@pytest.mark.parametrize("factor,original,T", [pytest.param(2.0, 24, 48, marks=pytest.mark.slow), (8.0, 8, 64),
                                               pytest.param(40.0, 4, 96, marks=pytest.mark.slow)])
def test_yarn_logit_parity_with_transformers_at_several_factors(factor, original, T, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = extended_config(small_config(vocab_size=128, max_position_embeddings=original), factor, original, T)
    torch.manual_seed(1)
    ours = dsv3.Transformer(cfg).eval()
    dsv3.save_pretrained(ours, tmp_path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-4


@pytest.mark.slow   # a second CLI run of the stage; run with -m slow
def test_resume_inside_an_extension_stage_repeats_it(stage, tmp_path):
    out, args = stage
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    shutil.rmtree(run / "checkpoints" / "step-000000004")     # as if killed after the step-2 checkpoint
    shutil.rmtree(run / "final")
    os.remove(run / "summary.json")
    argv = [a if a != str(out) else str(run) for a in args] + ["--resume"]
    assert cli(argv) == 0
    assert _losses(run) == _losses(out)                         # exactly, CPU fp32
    # a different --from is another run
    assert cli(argv[:2] + [str(tmp_path)] + argv[3:]) == 2


# ------------------------------------------------------------------------------ the length a run trained at
CORRUPTIONS = ("truncated tensors", "flipped byte", "edited meta", "half-written meta")


def _checkpoint(root, step: int, seq_len: int, rng) -> str:
    """A real checkpoint (``checkpoint.save_checkpoint``) of a few random tensors, trained at ``seq_len``."""
    from dsv3.checkpoint import save_checkpoint

    t = {"w": torch.randn(rng.randrange(8, 64), generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))}
    return save_checkpoint(str(root), step, t, {"m": t["w"] * 2}, {"rng": t["w"] + 1},
                           {"train_config": {"seq_len": seq_len, "seed": rng.randrange(100)}}, keep=10)


def _corrupt(path: str, how: str, rng) -> None:
    """What a killed writer or a bad disk leaves: a checkpoint that fails ``checkpoint.verify_checkpoint``."""
    meta_path = os.path.join(path, "meta.json")
    if how == "truncated tensors":
        f = os.path.join(path, rng.choice(["model.safetensors", "optim.safetensors", "extra.safetensors"]))
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    elif how == "flipped byte":
        f = os.path.join(path, "model.safetensors")
        data = bytearray(open(f, "rb").read())
        data[rng.randrange(len(data))] ^= 0xFF
        open(f, "wb").write(bytes(data))
    elif how == "edited meta":                    # still valid JSON: the checksum no longer matches
        meta = json.load(open(meta_path))
        meta["train_config"]["seq_len"] += 1
        json.dump(meta, open(meta_path, "w"))
    else:
        text = open(meta_path).read()
        open(meta_path, "w").write(text[:len(text) // 2])


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_trained_length_reads_the_newest_checkpoint_that_verifies(how, tmp_path):
    """A run without run.json (from before it, or lost): its length comes from the newest checkpoint that
    verifies, as a resume would load it — not from a newer one partially written or failing its checksum."""
    import random as _random

    from dsv3.checkpoint import newest_valid
    from dsv3.train.extend import original_length, trained_length

    rng = _random.Random()
    good, bad = rng.sample(range(8, 4096), 2)
    root = tmp_path / "run" / "checkpoints"
    _checkpoint(root, 2, good + 7, rng)
    good_path = _checkpoint(root, 4, good, rng)
    for step in range(6, 6 + 2 * rng.randrange(1, 3), 2):     # one or two broken newer ones
        _corrupt(_checkpoint(root, step, bad, rng), how, rng)
    assert newest_valid(str(root), warn=False)[0] == good_path
    assert trained_length(str(tmp_path / "run")) == good
    run = str(tmp_path / "run")
    assert original_length(small_config(), run) == (good, f"the --seq-len {run} trained at")


def test_trained_length_of_an_unusable_run_is_one_error_naming_it(tmp_path):
    """Every checkpoint broken and no run.json, or a broken run.json and no checkpoint: a UserError naming
    the files and the flag that gives the length instead; a directory with neither has no length (None)."""
    import random as _random

    from dsv3.errors import UserError
    from dsv3.train.extend import trained_length

    rng = _random.Random()
    run = tmp_path / "run"
    assert trained_length(str(run)) is None and trained_length(None) is None
    for step in (2, 4):
        _corrupt(_checkpoint(run / "checkpoints", step, rng.randrange(8, 4096), rng), rng.choice(CORRUPTIONS), rng)
    with pytest.raises(UserError) as e:
        trained_length(str(run), "--original-length")
    msg = str(e.value)
    assert f"no checkpoint in {run / 'checkpoints'} verifies" in msg and "step-000000004" in msg, msg
    assert msg.endswith("give it with --original-length") and "\n" not in msg, msg
    shutil.rmtree(run / "checkpoints")
    for text in ('{"seq-len": ', '{"seq-len": "long"}', '[16]', '{"seq-len": 0}'):
        (run / "run.json").write_text(text)
        with pytest.raises(UserError, match=f"{run / 'run.json'}"):
            trained_length(str(run), "--trained-length")
    n = rng.randrange(8, 4096)                    # a broken run.json, but a checkpoint that verifies: its length
    _checkpoint(run / "checkpoints", 2, n, rng)
    assert trained_length(str(run)) == n


def _broken_run(source_run, tmp_path, rng) -> str:
    """A finished run (final/) whose run.json is gone and whose every checkpoint is broken."""
    run = tmp_path / "broken_run"
    shutil.copytree(source_run / "final", run / "final")
    for step in (2, 4):
        _corrupt(_checkpoint(run / "checkpoints", step, rng.randrange(8, 64), rng), rng.choice(CORRUPTIONS), rng)
    return str(run)


def test_extension_from_a_run_whose_checkpoints_are_all_broken_is_one_line(source_run, data_dir, tmp_path, capsys):
    import random as _random

    run = _broken_run(source_run, tmp_path, _random.Random())
    code = cli(["train", "--from", run, "--extend-context", "2", "--seq-len", "16", "--data", data_dir,
                "--out", str(tmp_path / "o"), "--steps", "1", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"run in {run} trained at" in err and "verifies" in err and "--original-length" in err, err


def test_eval_of_a_run_whose_checkpoints_are_all_broken_is_one_line(source_run, tmp_path, capsys):
    import random as _random

    run = _broken_run(source_run, tmp_path, _random.Random())
    code = cli(["eval", "--model", os.path.join(run, "final"), "--task", "passkey", "--lengths", "40",
                "--depths", "0.5", "--samples", "1", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"run in {run} trained at" in err and "--trained-length" in err, err


@pytest.mark.parametrize("extra,needle", [
    (["--extend-context", "4"], "--extend-context needs --from"),
    (["--from", "/nonexistent/run"], "--from /nonexistent/run: no such directory"),
    (["--from", "SRC", "--extend-context", "0.5"], "--extend-context 0.5"),
    (["--from", "SRC", "--extend-context", "2", "--seq-len", "64"], "--seq-len 64 is beyond the extended context"),
    (["--from", "SRC", "--mix", "passkey:2"], "--mix passkey:2"),
    (["--from", "SRC", "--mix", "books:0.1"], "--mix books:0.1"),
    (["--from", "SRC", "--mix", "passkey:0.6,copy:0.6"], "add up to 1.2"),
    (["--from", "SRC", "--mix", "copy:0.1,copy:0.2"], "copy is given twice"),
    (["--from", "SRC", "--preset", "tiny"], "--from gives the model config"),
    (["--from", "SRC", "--extend-context", "nan"], "--extend-context nan"),
])
def test_train_extension_errors_are_one_line(extra, needle, source_run, data_dir, tmp_path, capsys):
    extra = [str(source_run) if a == "SRC" else a for a in extra]
    code = cli(["train", "--out", str(tmp_path / "o"), "--data", data_dir, "--steps", "1", *FAST, *extra])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err and err.count("\n") == 1, err


def test_data_with_another_tokenizer_is_refused(source_run, tmp_path, capsys):
    from dsv3.data import prepare

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("print('hello world')\n" * 3000)
    prepare(str(tmp_path / "c"), str(tmp_path / "tok"), vocab_size=300, progress=False)
    code = cli(["train", "--from", str(source_run), "--data", str(tmp_path / "tok"), "--out", str(tmp_path / "o"),
                "--seq-len", "16", "--steps", "1", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "another tokenizer" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ passkey documents and scoring
@pytest.mark.parametrize("text,key,ok", [
    (" 48213.", "48213", True), ("48213", "48213", True), ("  48213 is", "48213", True), ("\n48213", "48213", True),
    (" 4821", "48213", False), (" 482139", "48213", False), (" 48214.", "48213", False), (" abc 48213", "48213", False),
    ("", "48213", False), (" 4 8213", "48213", False),
])
def test_score_answer_hand_made(text, key, ok):
    assert score_answer(text, key) is ok


@pytest.fixture(scope="module")
def tok(data_dir):
    from dsv3.data import Tokenizer
    return Tokenizer.from_file(os.path.join(data_dir, "tokenizer.json"))


@pytest.mark.parametrize("task", ["passkey", "niah"])
def test_prompt_has_exact_length_and_the_key_at_its_depth(tok, task):
    r = Retrieval(tok, task)
    key = "73015"
    k, q = list(r.key_ids(key)), list(r.question)
    hay = np.arange(3, 503, dtype=np.int64) if task == "niah" else None
    for L in (60, 200, 301):
        for depth in (0.0, 0.5, 1.0):
            p = list(r.prompt(L, depth, key, hay))
            assert len(p) == L and p[-len(q):] == q
            n = L - len(k) - len(q)
            at = int(round(depth * n))
            assert p[at:at + len(k)] == k                          # the key sits after depth·filler tokens
            if hay is not None:
                assert p[:at] == list(hay[:at])
    assert tok.decode(r.prompt(200, 0.3, key)).endswith(r.template["question"].split("?")[-1].rstrip() if task ==
                                                        "passkey" else "magic number is")
    with pytest.raises(ValueError, match="needs at least"):
        r.prompt(10, 0.5, key)


def test_training_document_ends_with_the_answer(tok):
    r = Retrieval(tok)
    for seed in range(5):
        doc = r.document(120, np.random.default_rng(seed))
        text = tok.decode(doc)
        assert len(doc) == 120
        key = text.split("The pass key is ")[1][:5]
        assert key.isdigit() and f"What is the pass key? The pass key is {key}." in text


def test_mixed_batches_are_a_function_of_seed_and_step(data_dir, tok):
    from dsv3.data import TokenDataset

    base = TokenDataset(data_dir, "train", 80)
    mixed = MixedDataset(base, parse_mix("passkey:0.5"), tok)
    a, _ = mixed.batch(7, 8, seed=3, extra=1)
    b, _ = mixed.batch(7, 8, seed=3, extra=1)
    assert torch.equal(a, b) and a.shape == (8, 81)
    plain, _ = base.batch(7, 8, seed=3, extra=1)
    replaced = [i for i in range(8) if not torch.equal(a[i], plain[i])]
    assert 1 <= len(replaced) <= 7
    for i in replaced:
        assert "The pass key is" in tok.decode(a[i].tolist())
    # two data-parallel ranks read the rows of the one-rank batch
    halves = [mixed.batch(7, 4, seed=3, extra=1, rank=k, world_size=2)[0] for k in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), a)
    share = np.mean([not torch.equal(x, y) for s in range(40)
                     for x, y in zip(mixed.batch(s, 8, seed=0)[0], base.batch(s, 8, seed=0)[0])])
    assert 0.35 < share < 0.65
    assert parse_mix("passkey:0.1") == {"passkey": 0.1}
    assert random_key(np.random.default_rng(0)).isdigit()


def test_copy_documents_repeat_one_random_span_of_ordinary_tokens(tok):
    ids = ordinary_ids(tok)
    assert 0 not in ids and 1 not in ids and 2 not in ids and len(ids) == tok.vocab_size - len(
        tok.hf.get_added_tokens_decoder())
    spans = set()
    for seed in range(20):
        doc = copy_document(90, np.random.default_rng(seed), ids)
        assert len(doc) == 90 and np.isin(doc, ids).all()
        # the shortest period k: every token from k on equals the one k back, and k ≤ 45
        k = next(k for k in range(1, 91) if np.array_equal(doc[k:], doc[:-k]))
        assert 4 <= k <= 45
        spans.add(k)
    assert len(spans) > 5                                         # the span length varies


def test_mixed_batches_hold_both_kinds_in_their_shares(data_dir, tok):
    from dsv3.data import TokenDataset

    base = TokenDataset(data_dir, "train", 80)
    mixed = MixedDataset(base, parse_mix("passkey:0.3,copy:0.3"), tok)
    kinds = []
    for s in range(40):
        for x, y in zip(mixed.batch(s, 8, seed=1)[0], base.batch(s, 8, seed=1)[0]):
            if torch.equal(x, y):
                kinds.append("text")
            elif "The pass key is" in tok.decode(x.tolist()):
                kinds.append("passkey")
            else:
                k = next(k for k in range(1, 81) if torch.equal(x[k:], x[:-k]))
                assert k <= 40
                kinds.append("copy")
    shares = {k: kinds.count(k) / len(kinds) for k in ("text", "passkey", "copy")}
    assert all(0.2 < shares[k] < 0.5 for k in shares), shares


# ------------------------------------------------------------------------------ evaluation
def test_bucket_means_hand_made():
    losses = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 4.0, 5.0, 6.0, 7.0]])   # positions 1 … 5
    starts, means = bucket_means(losses, 2)
    assert starts == [0, 2, 4] and means == [2.0, 3.5, 5.5]     # positions {1}, {2, 3}, {4, 5}


def test_engine_losses_equal_a_plain_forward_beyond_one_prefill_chunk():
    torch.manual_seed(0)
    cfg = extended_config(small_config(max_position_embeddings=32), 4, 32, 128)
    model = dsv3.Transformer(cfg).eval()
    g = torch.Generator().manual_seed(5)
    windows = [torch.randint(0, cfg.vocab_size, (80,), generator=g).numpy() for _ in range(2)]
    got = token_losses(model, windows, max_batch=2, prefill_chunk=24)
    with torch.no_grad():
        x = torch.tensor(np.stack(windows))
        ref = F.cross_entropy(model(x)[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    res = ppl_by_position(model, windows, trained_length=32, width=16)
    assert res["positions"][:3] == [0, 16, 32] and res["length"] == 80
    assert res["in_range"] == pytest.approx(ref[:, 15:31].mean(), rel=1e-4)
    assert res["beyond"] == pytest.approx(ref[:, 31:].mean(), rel=1e-4)


def test_eval_cli_passkey_smoke(model_dir, capsys):
    assert cli(["eval", "--model", model_dir, "--task", "passkey", "--lengths", "60", "--depths", "0.5",
                "--samples", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tasks"]["passkey"]["accuracy"] == [[0.0]] or res["tasks"]["passkey"]["accuracy"] == [[1.0]]


@pytest.mark.slow   # every task with figures; run with -m slow
def test_eval_cli_runs_and_writes_json_and_figures(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli(["eval", "--model", model_dir, "--data", data_dir, "--task", "ppl-by-position,passkey,niah",
                "--max-length", "160", "--windows", "1", "--lengths", "60,70", "--depths", "0,1", "--samples", "1",
                "--plot", str(tmp_path / "fig"), "--out", str(out), "--label", "random"])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "length 160 is beyond the model's max_position_embeddings (128)" in text.err
    res = json.load(open(out))
    assert set(res["tasks"]) == {"ppl-by-position", "passkey", "niah"}
    assert len(res["tasks"]["passkey"]["accuracy"]) == 2 and res["tasks"]["ppl-by-position"]["length"] == 160
    assert "passkey accuracy" in text.out and "loss by position" in text.out
    for name in ("loss_by_position.png", "passkey_heatmap.png", "niah_heatmap.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 1000
    from dsv3.eval.plots import main as plots_main
    assert plots_main([str(tmp_path / "both"), str(out), str(out)]) == 0
    assert (tmp_path / "both" / "passkey_heatmap.png").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--model", "/nonexistent"], "--model /nonexistent: no such directory"),
    (["--task", "mmlu"], "--task 'mmlu': unknown task mmlu"),
    (["--depths", "0,1.5"], "--depths '0,1.5': depths must be in [0, 1]"),
    (["--lengths", "64,abc"], "--lengths '64,abc': expected comma-separated integers"),
    (["--lengths", "8", "--task", "passkey,niah"], "a passkey prompt needs at least"),
    (["--samples", "0"], "--samples 0: must be >= 1"),
    (["--max-length", "1"], "--max-length 1: must be >= 2"),
    (["--data", "NOWHERE"], "not a prepared token directory"),
    (["--task", "niah", "--lengths", "100000"], "fewer than the longest haystack"),
])
def test_eval_cli_errors_are_one_line(extra, needle, model_dir, data_dir, tmp_path, capsys):
    argv = ["eval", "--model", model_dir, "--data", data_dir, "--samples", "1", "--lengths", "64"]
    for a in extra:
        argv.append(str(tmp_path / "nowhere") if a == "NOWHERE" else a)
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err and err.count("\n") <= 2, err


def test_eval_data_with_another_tokenizer_is_refused(model_dir, tmp_path, capsys):
    from dsv3.data import prepare

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("x = 1\n" * 5000)
    prepare(str(tmp_path / "c"), str(tmp_path / "tok"), vocab_size=280, progress=False)
    code = cli(["eval", "--model", model_dir, "--data", str(tmp_path / "tok"), "--task", "ppl-by-position"])
    err = capsys.readouterr().err
    assert code == 2 and "another tokenizer" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ attention memory at long lengths
def test_training_attention_takes_the_fused_cpu_kernel_and_equals_the_math_form():
    """MLA's training attention (SDPA, is_causal) runs the fused flash kernel on the CPU (no T×T scores;
    benchmarks/long_context_memory.py measures the memory) and gives the math form's outputs and gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 48, generator=g, requires_grad=True) for _ in range(3))
    assert torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=0.1) == SDPBackend.FLASH_ATTENTION.value
    outs = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1)
        grads = torch.autograd.grad((o * o).sum(), (q, k, v))
        outs.append((o.detach(), grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
