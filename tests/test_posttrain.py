"""Post-training (DeepSeek-R1): rewards, the GRPO loss and its gradient against a hand computation, the
engine's log-probabilities against the training forward, the SFT mask, rejection sampling, GRPO resume."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from dsv3.posttrain import rewards as R
from dsv3.posttrain.loss import group_advantages, grpo_loss, token_weights

sys.path.insert(0, os.path.dirname(__file__))
from helpers import cli_env, small_config  # noqa: E402

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"


def save_chat_model(out, seed: int = 0, **config) -> str:
    """A small random model with a byte-level tokenizer that has bos/eos/pad at ids 0-2 (bytes at 3-258)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from dsv3 import Transformer, save_pretrained

    os.makedirs(out, exist_ok=True)
    vocab = {BOS: 0, EOS: 1, PAD: 2}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD)])
    tok.save(os.path.join(str(out), "tokenizer.json"))
    with open(os.path.join(str(out), "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "add_bos_token": True}, f)
    torch.manual_seed(seed)
    m = Transformer(small_config(**{"vocab_size": 300, "max_position_embeddings": 128, **config}))
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    save_pretrained(m, out)
    return str(out)


# ---------------------------------------------------------------------------------------------- rewards
def test_extract_answer_edge_cases():
    assert R.extract_answer("no tags at all") is None
    assert R.extract_answer("<answer>12") is None                       # unclosed
    assert R.extract_answer("\\boxed{12") is None
    assert R.extract_answer("<answer> 12 </answer>") == "12"
    assert R.extract_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"   # nested braces
    # several answers: the last one counts, whichever form it takes
    assert R.extract_answer("<answer>3</answer> then \\boxed{4}") == "4"
    assert R.extract_answer("\\boxed{4} then <answer>5</answer>") == "5"
    assert R.extract_answer("<answer>1</answer><answer>2</answer>") == "2"


@pytest.mark.parametrize("given,ref,ok", [
    ("132", "132", True), ("132.0", "132", True), ("+132", "132", True), ("1,234", "1234", True),
    ("1,234.50", "1234.5", True), ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("$12$", "12", True),
    ("12.", "12", True), ("1e3", "1000", True), ("-7", "-7", True), ("\\text{12}", "12", True),
    ("131", "132", False), ("12,34", "1234", False), ("1/0", "0", False), ("abc", "12", False),
    ("Paris", "paris", True), ("Paris", "Rome", False), ("", "12", False), (None, "12", False),
    # the built-in task writes numbers digit by digit: spaces inside a number are ignored
    ("1 3 2", "132", True), ("1 3 2", "1 3 2", True), ("$1 3 2$", "132", True), ("1 3", "132", False),
    ("1 3 2", "123", False), ("- 7", "-7", True),
])
def test_answers_match_numeric_formats(given, ref, ok):
    assert R.answers_match(given, ref) is ok


def test_math_and_format_rewards():
    good = "<think>7+5=12</think>\n<answer>12</answer>"
    assert R.math_reward(good, "12") == 1.0 and R.format_reward(good) == 1.0
    assert R.math_reward(good, "13") == 0.0 and R.math_reward(good, None) == 0.0
    assert R.math_reward("12", "12") == 0.0                                  # no answer tag
    assert R.format_reward("<answer>12</answer>") == 0.0                      # no think block
    assert R.format_reward("<think>x</think>") == 0.0                          # no answer
    assert R.format_reward("<think>x<answer>1</answer>") == 0.0                # think not closed
    assert R.format_reward("hi <think>x</think><answer>1</answer>") == 0.0     # something before it
    assert R.format_reward("<think>a</think><think>b</think><answer>1</answer>") == 0.0
    assert R.format_reward("<think>a</think> so \\boxed{1}") == 1.0
    # several answers: the last one decides accuracy
    assert R.math_reward("<think></think><answer>12</answer><answer>13</answer>", "12") == 0.0
    assert R.math_reward("<think></think><answer>13</answer><answer>12</answer>", "12") == 1.0


def test_rewards_on_the_tasks_digit_by_digit_format():
    from dsv3.posttrain.task import make_sets, question, spaced, worked_solution

    assert spaced(132) == "1 3 2" and question(47, 85) == "What is 4 7 + 8 5?"
    sol = worked_solution(47, 85)
    assert sol == "<think>7+5=1 2\n4+8+1=1 3\n1 3 2</think>\n<answer>1 3 2</answer>"
    assert worked_solution(12, 34) == "<think>2+4=6\n1+3=4\n4 6</think>\n<answer>4 6</answer>"
    assert R.extract_answer(sol) == "1 3 2"
    assert R.math_reward(sol, "132") == 1.0 and R.math_reward(sol, 132) == 1.0 and R.format_reward(sol) == 1.0
    assert R.math_reward(sol, "133") == 0.0
    assert R.math_reward(sol.replace("<answer>1 3 2</answer>", "\\boxed{1 3 2}"), "132") == 1.0
    assert R.math_reward("<think>x</think><answer>1 3</answer>", "132") == 0.0          # a digit missing
    assert R.math_reward("<think>x</think> 1 3 2", "132") == 0.0                        # no answer tag
    assert R.math_reward("<think>x</think><answer>1 3 2</answer><answer>1 3 1</answer>", "132") == 0.0
    sets = make_sets(50, 100, 30, 2, seed=3)
    rng = random.Random(0)
    for a, b in rng.sample(sets["sft"], 20) + [(99, 99), (10, 10), (50, 50)]:
        w = worked_solution(a, b)
        assert R.math_reward(w, str(a + b)) == 1.0 and R.format_reward(w) == 1.0
    assert not set(sets["heldout"]) & (set(sets["sft"]) | set(sets["train"]))
    assert make_sets(50, 100, 30, 2, seed=3) == sets


def test_reward_resolution(tmp_path):
    assert R.resolve("math") is R.math_reward and R.resolve("accuracy") is R.math_reward
    assert R.resolve("dsv3.posttrain.rewards:format_reward") is R.format_reward
    for bad, msg in [("nosuch", "not a built-in"), ("nosuch_mod_xyz:f", "cannot import"),
                     ("dsv3.posttrain.rewards:nofn", "has no function")]:
        with pytest.raises(ValueError, match=msg):
            R.resolve(bad)
    with pytest.raises(ValueError, match="named twice"):
        R.parse_rewards("math,math")
    with pytest.raises(ValueError, match="finite"):
        R.score([("x", lambda c, a, **k: float("nan"))], "c", {})


# ---------------------------------------------------------------------------------------------- GRPO loss
def test_grpo_loss_and_gradient_by_hand():
    """One group of G = 4 outputs, rewards 1, 0, 0, 1: mean 0.5, sample std sqrt(1/3), so
    A = ±0.5·sqrt(3) (± 0.866…). Two tokens per output with log-prob differences chosen so that one
    token is clipped above (ρ > 1+ε, A > 0), one below (ρ < 1−ε, A < 0), the others inside or clipped
    on the side where the min does not bind."""
    eps, beta, clip = 0.0, 0.1, 0.2
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    A = group_advantages(rewards, eps=eps)[0]
    a = 0.5 * math.sqrt(3)
    assert torch.allclose(A, torch.tensor([a, -a, -a, a]), atol=1e-6)
    # log ratios (logp − old) per token and log(ref) − logp per token
    log_ratio = torch.tensor([[0.5, 0.0], [-0.5, 0.1], [0.1, 0.3], [-0.5, 0.0]], dtype=torch.float64)
    d_ref = torch.tensor([[0.2, -0.1], [0.0, 0.3], [-0.2, 0.1], [0.05, 0.0]], dtype=torch.float64)
    old = torch.full((4, 2), -1.0, dtype=torch.float64)
    logp = (old + log_ratio).clone().requires_grad_(True)
    ref = old + log_ratio + d_ref
    mask = torch.ones(4, 2)
    w = token_weights(mask, "grpo").double()                      # 1/(4·2) each
    loss, st = grpo_loss(logp, old, ref, A.double(), w, clip=clip, beta=beta)
    loss.backward()
    # by hand, token by token
    exp_loss, grads, clipped = 0.0, torch.zeros(4, 2, dtype=torch.float64), 0
    for i in range(4):
        for t in range(2):
            r = math.exp(log_ratio[i, t])
            adv = float(A[i])
            lo, hi = 1 - clip, 1 + clip
            surr_un, surr_cl = r * adv, min(max(r, lo), hi) * adv
            if surr_cl < surr_un:              # the clip binds: constant in logp
                surr, dsurr = surr_cl, 0.0
                clipped += 1
            else:
                surr, dsurr = surr_un, r * adv
            d = float(d_ref[i, t])
            kl = math.exp(d) - d - 1
            dkl = -math.exp(d) + 1                # d/dlogp of k3, d = ref − logp
            exp_loss += -(surr - beta * kl) / 8
            grads[i, t] = -(dsurr - beta * dkl) / 8
    # token (0,0): ρ = e^0.5 > 1.2 with A > 0 → clipped; (1,0): ρ = e^-0.5 < 0.8 with A < 0 → clipped;
    # (3,0): ρ < 0.8 with A > 0 → min takes the unclipped term (not clipped)
    assert clipped == 2
    assert abs(float(loss.detach()) - exp_loss) < 1e-12
    assert torch.allclose(logp.grad, grads, atol=1e-12)
    assert abs(float(st["clip_fraction"]) - 2 / 8) < 1e-12
    kl_mean = sum(math.exp(float(x)) - float(x) - 1 for x in d_ref.flatten()) / 8
    assert abs(float(st["kl"]) - kl_mean) < 1e-12


def test_grpo_loss_random_against_reference_formula():
    """Random inputs, padded completions, both loss types: the loss equals the written-out formula."""
    g = torch.Generator().manual_seed(random.randrange(2**31))
    N, T = 6, 7
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    A = torch.randn(N, generator=g, dtype=torch.float64)
    lens = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).double()
    for lt in ("grpo", "dapo"):
        w = token_weights(mask, lt).double()
        loss, _ = grpo_loss(logp, old, ref, A, w, clip=0.2, beta=0.04)
        ratio = (logp - old).exp()
        obj = torch.minimum(ratio * A[:, None], ratio.clamp(0.8, 1.2) * A[:, None])
        kl = (ref - logp).exp() - (ref - logp) - 1
        per_tok = (obj - 0.04 * kl) * mask
        want = -(per_tok.sum(1) / mask.sum(1)).mean() if lt == "grpo" else -per_tok.sum() / mask.sum()
        assert torch.allclose(loss, want, atol=1e-12)


def test_group_advantages_zero_when_all_equal():
    A = group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]]))
    assert torch.all(A[0] == 0)
    assert torch.allclose(A[1], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-3)


# ---------------------------------------------------------------------------------------------- engine log-probs
def test_engine_logprobs_equal_training_log_softmax(one_thread):
    """Sampled tokens' log-probabilities reported by the batched engine (prefill + decode over the paged
    latent cache, several rows at their own positions) equal log-softmax of the training forward over the
    whole sequence (fp32, 1e-5)."""
    from dsv3 import Transformer
    from dsv3.infer.sampling import SamplingParams
    from dsv3.posttrain.loss import sequence_logprobs
    from dsv3.posttrain.rollout import make_engine

    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    model = Transformer(small_config(vocab_size=300, max_position_embeddings=96))
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    engine = make_engine(model, max_batch=6, max_len=96)
    rng = random.Random(seed)
    prompts = [[rng.randrange(300) for _ in range(rng.randrange(3, 20))] for _ in range(6)]
    reqs = [engine.submit(p, 24, SamplingParams(1.0), seed=i, logprobs=0) for i, p in enumerate(prompts)]
    engine.run()
    model.train()
    for p, r in zip(prompts, reqs):
        seq = torch.tensor([p + r.output])
        tgt = torch.full_like(seq, -1)
        tgt[0, len(p) - 1:seq.shape[1] - 1] = seq[0, len(p):]
        lp = sequence_logprobs(model(seq)[:, :-1], tgt[:, :-1])
        want = lp[0, len(p) - 1:]
        got = torch.tensor([t.logprob for t in r.output_logprobs])
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (seed, (got - want).abs().max())


def test_policy_logprobs_score_only_the_targets_as_the_full_forward_does():
    # the head runs at the target positions alone; values and gradients equal log-softmax of the whole
    # forward's logits at those positions (fp64), 0 elsewhere
    from dsv3 import Transformer
    from dsv3.posttrain.grpo import policy_logprobs

    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    model = Transformer(small_config(vocab_size=300, max_position_embeddings=64)).double()
    inputs = torch.randint(0, 300, (3, 20))
    target = torch.randint(0, 300, (3, 20))
    target[:, :7] = -1
    target[1, 15:] = -1
    got, _ = policy_logprobs(model, inputs, target)
    full = torch.log_softmax(model(inputs), -1).gather(-1, target.clamp_min(0)[..., None])[..., 0] * (target >= 0)
    assert torch.allclose(got, full, atol=1e-12, rtol=0), seed
    g1 = torch.autograd.grad(got.sum(), model.lm_head.weight)[0]
    full = torch.log_softmax(model(inputs), -1).gather(-1, target.clamp_min(0)[..., None])[..., 0] * (target >= 0)
    g2 = torch.autograd.grad(full.sum(), model.lm_head.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-12, rtol=0), seed


# ---------------------------------------------------------------------------------------------- SFT data
def test_sft_mask_is_exactly_the_assistant_tokens(tmp_path):
    from dsv3.infer.chat_template import ChatTemplate
    from dsv3.posttrain.chat import IGNORE, SFTDataset, Encoded, encode_chat
    from dsv3.posttrain.common import open_model_dir

    d = save_chat_model(tmp_path / "m")
    cfg, tok, template = open_model_dir(d)
    assert isinstance(template, ChatTemplate)
    rng = random.Random()
    word = lambda: "".join(rng.choice("abcxyz <>\n0123") for _ in range(rng.randrange(1, 12)))   # noqa: E731
    msgs = [{"role": "system", "content": word()}]
    for _ in range(rng.randrange(1, 4)):
        msgs += [{"role": "user", "content": word()}, {"role": "assistant", "content": word()}]
    ids, mask = encode_chat(template, tok, msgs)
    assert tok.decode(ids) == template.render(msgs, add_generation_prompt=False)
    # the masked tokens, run by run, are each assistant turn's content and the end-of-sentence token
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [a + EOS for a in answers]
    # and the dataset's targets: the next token where the mask is 1, ignored elsewhere
    ds = SFTDataset([Encoded(ids, mask)], seq_len=len(ids) + 5, pad_id=tok.pad_id, vocab_size=300)
    x, y = ds.batch(0, 1)
    assert x.shape == y.shape == (1, len(ids) + 5)
    for j in range(y.shape[1]):
        if j + 1 < len(ids) and mask[j + 1]:
            assert int(y[0, j]) == ids[j + 1]
        else:
            assert int(y[0, j]) == IGNORE


def test_rejection_sampling_keeps_only_passing_samples():
    from dsv3.posttrain.rewards import math_reward, format_reward, score
    from dsv3.posttrain.sample import select

    rng = random.Random()
    pieces = ["<think>a</think><answer>{}</answer>", "<answer>{}</answer>", "<think>b</think>\\boxed{{{}}}", "{}"]
    recs = [{"answer": str(k)} for k in range(5)]
    samples = []
    for _ in range(60):
        i = rng.randrange(5)
        text = rng.choice(pieces).format(rng.choice([i, i + 1]))
        sc = score([("math", math_reward), ("format", format_reward)], text, recs[i])
        samples.append((i, text, sc, all(v >= 1.0 for v in sc.values())))
    kept = select(samples, "correct")
    assert kept == [(i, t) for i, t, _, ok in samples if ok]
    for i, t in kept:
        assert math_reward(t, recs[i]["answer"]) == 1.0 and format_reward(t) == 1.0
    assert len(select(samples, "all")) == 60 and select(samples, "none") == []
    dd = select(samples, "correct", dedup=True)
    assert len(dd) == len(set(dd)) and set(dd) == set(kept)
    assert all(sum(1 for j, _ in select(samples, "all", max_per_prompt=2) if j == i) <= 2 for i in range(5))


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "dsv3.cli", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=kw.get("timeout", 120))


@pytest.mark.slow
def test_sft_and_sample_cli(tmp_path):
    """dsv3 sft trains on chat data (exported with tokenizer and template); dsv3 sample keeps only the
    samples whose rewards pass; bad input is one line naming the flag, exit code 2."""
    d = save_chat_model(tmp_path / "m", seed=1)
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for a in range(20):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+1?"},
                                             {"role": "assistant", "content": f"<think>x</think><answer>{a + 1}</answer>"}]}) + "\n")
    r = _run(["sft", "--model", d, "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "3",
              "--batch-size", "4", "--seq-len", "48", "--no-progress", "--no-plots"])
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "run" / "final" / "tokenizer.json")
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in rows] == [1, 2, 3]
    prompts = tmp_path / "p.jsonl"
    with open(prompts, "w") as f:
        for a in range(6):
            f.write(json.dumps({"prompt": f"{a}+1?", "answer": str(a + 1)}) + "\n")
    # a reward that passes about half the samples: an even number of characters
    (tmp_path / "myreward.py").write_text("def even(c, a, **k):\n    return float(len(c) % 2 == 0)\n")
    env = cli_env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    out = tmp_path / "kept.jsonl"
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "sample", "--model", str(tmp_path / "run" / "final"),
                        "--prompts", str(prompts), "--n", "4", "--reward", "myreward:even", "--keep", "correct",
                        "--out", str(out), "--max-new-tokens", "9", "--json"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    kept = [json.loads(x) for x in open(out)]
    assert rep["total"] == 24 and len(kept) == rep["kept"] == round(rep["pass_rate"] * 24)
    assert 0 < len(kept) < 24
    for k in kept:
        assert k["messages"][-1]["role"] == "assistant" and len(k["messages"][-1]["content"]) % 2 == 0
    # bad input: one line, exit code 2
    for args, needle in [(["sample", "--model", d, "--prompts", str(tmp_path / "none.jsonl"), "--keep", "none"], "--prompts"),
                         (["sample", "--model", d, "--prompts", str(prompts)], "--out"),
                         (["sft", "--model", d, "--data", str(prompts), "--out", str(tmp_path / "r2")], "messages"),
                         (["grpo", "--model", d, "--prompts", str(prompts), "--out", str(tmp_path / "g"),
                           "--reward", "nosuch"], "--reward"),
                         (["grpo", "--model", d, "--prompts", str(prompts), "--out", str(tmp_path / "g"),
                           "--clip", "1.5"], "--clip")]:
        r = _run(args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------- GRPO resume
def _grpo(d, prompts, out, *extra):
    return [sys.executable, "-m", "dsv3.cli", "grpo", "--model", d, "--prompts", str(prompts), "--out", str(out),
            "--group", "4", "--prompts-per-step", "2", "--steps", "6", "--max-new-tokens", "12", "--lr", "3e-3",
            "--reward", "dsv3.posttrain.rewards:format_reward,math", "--save-every", "2", "--no-progress",
            "--no-plots", "--updates", "2", *extra]


def _numbers(path):
    keys = ("reward", "accuracy", "loss", "kl", "clip_fraction", "grad_norm", "response_length")
    return [(r["step"], *(r[k] for k in keys), r["sample"]) for r in map(json.loads, open(path))]


@pytest.mark.slow
def test_grpo_resume_after_sigkill_repeats_the_run(tmp_path):
    """Kill -9 a GRPO run after its step-4 checkpoint is written (while it works on step 5); --resume
    continues with the same rewards, losses and samples as the uninterrupted run, each step logged once."""
    import time

    d = save_chat_model(tmp_path / "m", seed=2)
    prompts = tmp_path / "p.jsonl"
    with open(prompts, "w") as f:
        for a in range(5):
            f.write(json.dumps({"prompt": f"{a}+{a}?", "answer": str(2 * a)}) + "\n")
    r = subprocess.run(_grpo(d, prompts, tmp_path / "full"), capture_output=True, text=True, env=cli_env(), timeout=240)
    assert r.returncode == 0, r.stderr
    full = _numbers(tmp_path / "full" / "metrics.jsonl")
    assert [x[0] for x in full] == [1, 2, 3, 4, 5, 6]
    proc = subprocess.Popen(_grpo(d, prompts, tmp_path / "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=cli_env())
    ck = tmp_path / "cut" / "checkpoints" / "step-000000004"      # renamed into place when complete
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None and not ck.exists():
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.wait()
    r = subprocess.run(_grpo(d, prompts, tmp_path / "cut", "--resume"), capture_output=True, text=True,
                       env=cli_env(), timeout=240)
    assert r.returncode == 0, r.stderr
    assert _numbers(tmp_path / "cut" / "metrics.jsonl") == full
