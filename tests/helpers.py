"""Shared test helpers: spawn gloo ranks with a deadline, the environment for CLI subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, args: tuple, world: int, out_path: str, timeout: float = 80.0) -> dict:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes; kill them all past ``timeout``.

    The workers write their findings to ``out_path`` (JSON), which is returned."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.time())):
        if time.time() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} gloo ranks did not finish in {timeout} s")
    with open(out_path) as f:
        return json.load(f)


def cli_env() -> dict:
    """Environment for running ``python -m dsv3.cli`` in a subprocess: this checkout's src on the path,
    one thread per process (several ranks share the machine)."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def small_config(**kw):
    """A smaller-than-tiny ModelConfig with every feature on (q-LoRA, 4 groups with group-limited
    routing, a dense first layer, MTP); keyword arguments override fields."""
    from dsv3 import ModelConfig

    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, first_k_dense_replace=1,
                intermediate_size=48, num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, moe_intermediate_size=16,
                n_group=4, topk_group=2, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                initializer_range=0.1)
    base.update(kw)
    return ModelConfig.preset("tiny").replace(**base)



def small_model(seed: int = 0, dtype=None, **kw):
    """A Transformer of ``small_config(**kw)`` in eval mode, seeded, with random routing biases (so the
    bias-corrected routing is exercised), in ``dtype`` (default float32)."""
    import torch

    from dsv3 import Transformer

    torch.manual_seed(seed)
    m = Transformer(small_config(**kw))
    if dtype is not None:
        m = m.to(dtype)
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m.eval()

def save_byte_level_tokenizer(out) -> None:
    """A byte-level BPE tokenizer without merges (256 ids) as ``out/tokenizer.json``: a model
    directory's tokenizer that needs no corpus."""
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(str(out), "tokenizer.json"))


def wait_healthy(url: str, proc, log, seconds: float, what: str = "the server") -> None:
    """Poll ``url``/health until it answers 200; fail with the log if ``proc`` exits or time runs out."""
    import httpx

    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.time() < deadline, f"{what} did not start in {seconds:g} s:\n" + log.read_text()
        time.sleep(0.3)


def save_served_model(out, seed: int, **config) -> str:
    """A small random model (random gate biases, so routing is uneven) with a byte-level tokenizer saved
    in ``out``: a model directory for ``dsv3 serve`` that needs no corpus. ``config`` overrides
    :func:`small_config` (default 300 ids, 64 positions, and no eos_token_id: the byte-level tokenizer has no
    end-of-sequence token, so generation runs to its max_tokens, which the tests of long requests need)."""
    import torch

    from dsv3 import Transformer, save_pretrained

    torch.manual_seed(seed)
    m = Transformer(small_config(**{"vocab_size": 300, "max_position_embeddings": 64, "eos_token_id": None,
                                    **config}))
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    save_pretrained(m, out)
    save_byte_level_tokenizer(out)
    return str(out)


def save_corpus_model(out, data_dir, max_positions: int) -> str:
    """A small random model (seed 0, 2048-id vocabulary) saved in the HF layout into ``out`` with the
    corpus tokenizer and DeepSeek's tokenizer config (text prompts start with bos); returns the path."""
    import shutil

    import torch

    from dsv3 import Transformer, save_pretrained

    torch.manual_seed(0)
    save_pretrained(Transformer(small_config(vocab_size=2048, max_position_embeddings=max_positions)), out)
    shutil.copy(os.path.join(data_dir, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                   "add_bos_token": True}, f)
    return str(out)


@contextlib.contextmanager
def serve_plain_or_speculative(mode: str, model_dir: str, log_dir, name: str, key: str, **kw):
    """``serve_openai`` decoding one token a step (``mode`` "plain") or two with MTP drafts ("speculative"),
    for module fixtures parametrised over both; skips without the serve extra or xgrammar."""
    import pytest

    for module in ("fastapi", "openai", "xgrammar"):
        pytest.importorskip(module)
    flags = ["--speculative"] if mode == "speculative" else []
    with serve_openai(model_dir, log_dir, name, key, *flags, **kw) as client:
        yield client

@contextlib.contextmanager
def serve_openai(model_dir: str, log_dir, name: str, key: str, *flags: str, timeout: float = 120):
    """A real ``dsv3 serve`` of ``model_dir`` (one thread, batches of 4, ``flags`` added), yielding an
    official ``openai`` client for it; stopped (SIGTERM, then SIGKILL) afterwards."""
    import openai

    port = free_port()
    log = os.path.join(log_dir, "server.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "serve", "--model", model_dir, "--port", str(port),
                                 "--max-batch", "4", "--served-model-name", name, "--api-key", key, "--threads", "1",
                                 *flags], env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, 120)
        yield openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def start_ep_serve(model_dir: str, world: int, port: int, log, *flags: str):
    """``torchrun --nproc-per-node WORLD -m dsv3.cli serve --model DIR --ep WORLD --port PORT --threads 1
    FLAGS…`` in a session of its own, its output in the file ``log`` (stop it with :func:`stop_ep_serve`)."""
    import subprocess
    import sys

    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                                 "--master-port", str(free_port()), "-m", "dsv3.cli", "serve", "--model", model_dir,
                                 "--ep", str(world), "--port", str(port), "--threads", "1", *flags],
                                env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_ep_serve(proc, log, seconds: float) -> int:
    """SIGTERM to torchrun (as Ctrl-C would) and its exit code; past ``seconds`` torchrun and every process
    under it are killed (its workers run in sessions of their own) and the test fails with the log."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        for pid in [*descendant_pids(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
        raise AssertionError(f"the ranks did not stop within {seconds:g} s of SIGTERM:\n" + log.read_text()) from None


def _proc_file(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:                          # gone meanwhile, or not ours to read
        return b""


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    import os

    out = []
    for child in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        stat = _proc_file(child, "stat")
        if stat and int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
            out.append(child)
    return out


def descendant_pids(pid: int) -> list[int]:
    """Every process under ``pid`` (depth first)."""
    out = []
    for child in child_pids(pid):
        out += [child, *descendant_pids(child)]
    return out


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The process id of torchrun's worker with ``RANK=rank`` (its children's environments, from /proc)."""
    for pid in child_pids(launcher_pid):
        if f"RANK={rank}".encode() in _proc_file(pid, "environ").split(b"\0"):
            return pid
    raise LookupError(f"torchrun {launcher_pid} has no worker of rank {rank}")


def gather_scenario(results: dict, name: str, res, mine: dict, world: int, t0: float) -> None:
    """In a spawned rank: every rank's ``mine`` gathered to rank 0, which records ``results[name]`` as
    ``res`` with the ranks' dicts under "ranks" and the scenario's seconds since ``t0``."""
    import time

    import torch.distributed as dist

    per = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(mine, per, dst=0)
    if dist.get_rank() == 0:
        results[name] = dict(res, ranks=per, seconds=round(time.time() - t0, 2))


def finish_ranks(results: dict, out_path: str) -> None:
    """In a spawned rank: rank 0 writes ``results`` (JSON) for :func:`spawn_ranks`; every rank leaves the group."""
    import json

    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def save_scripted_model(out, scripts: dict[str, list[str]], hidden_size: int = 64,
                        max_position_embeddings: int = 1024) -> dict:
    """A real dsv3 checkpoint (with a byte-level tokenizer and a chat template) that answers by script: a
    deterministic bigram model. Every block's weights are zero, so each block adds nothing to the residual
    stream and the logits of position t are ``lm_head(norm(embed(token_t)))``; the embeddings of the tokens
    that lead somewhere are orthonormal, and the output head maps each to its scripted successor with a
    margin of ~80 logits over every other token (so sampling at temperature 1 follows the script too).

    ``scripts``: a trigger (one ASCII character, the last one of the prompt) → the answer's pieces, each
    made a token of its own (an added, non-special token; pieces must be distinct across scripts); the
    last piece is followed by end of sentence. The chat template writes only the messages' contents, one
    after the other, so a user message ending in the trigger starts its script. Returns {piece: token id}
    (and "<eos>": the end-of-sentence id)."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from dsv3 import Transformer, save_pretrained

    vocab = {tok: i for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tok.add_special_tokens([bos, eos])
    pieces = [p for script in scripts.values() for p in script]
    assert len(set(pieces)) == len(pieces), "script pieces must be distinct: the model is a bigram table"
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in pieces])
    ids = {p: tok.token_to_id(p) for p in pieces}
    ids["<eos>"] = tok.token_to_id(eos)
    successor = {}
    for trigger, script in scripts.items():
        (first,) = tok.encode(trigger).ids
        chain = [first] + [ids[p] for p in script] + [ids["<eos>"]]
        for a, b in zip(chain, chain[1:]):
            assert successor.setdefault(a, b) == b, f"token {a} would have two successors"
    assert len(successor) <= hidden_size, "more scripted tokens than dimensions"
    vocab_size = max(300, tok.get_vocab_size() + 8)

    torch.manual_seed(0)
    m = Transformer(small_config(vocab_size=vocab_size, hidden_size=hidden_size, eos_token_id=None,
                                 max_position_embeddings=max_position_embeddings))
    with torch.no_grad():
        for p in list(m.layers.parameters()) + list(m.mtp.parameters()):
            p.zero_()
        m.lm_head.weight.zero_()
        scale = 80.0 / hidden_size ** 0.5                # the norm makes a unit embedding sqrt(d) long
        for slot, (a, b) in enumerate(sorted(successor.items())):
            m.embed_tokens.weight[a] = 0.0
            m.embed_tokens.weight[a, slot] = 1.0
            m.lm_head.weight[b, slot] = scale
    save_pretrained(m, out)
    tok.save(os.path.join(str(out), "tokenizer.json"))
    with open(os.path.join(str(out), "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": bos, "eos_token": eos, "add_bos_token": False}, f)
    with open(os.path.join(str(out), "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return ids
