"""Bad input to every command ends in one line naming the command and the file/flag/field, exit code 2,
no traceback; an internal error ends in one line pointing at a traceback file (issue 14).

Each case runs ``dsv3.cli.main`` in this process (the code path of the ``dsv3`` command; a few run as
real subprocesses too); none allocates more than a few MB or takes more than a second or two.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from dsv3 import ModelConfig
from dsv3.cli import main
from helpers import cli_env, free_port, save_byte_level_tokenizer, small_config

TINY_HF = ModelConfig.preset("tiny").to_hf()


def _write(path, content) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(content, bytes):
        open(path, "wb").write(content)
    elif isinstance(content, str):
        open(path, "w").write(content)
    else:
        open(path, "w").write(json.dumps(content))
    return path


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


class _Evil:   # a pickle that would run code on load: torch.load(weights_only=True) must refuse it
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A very small model in the HF layout with a byte-level tokenizer (no corpus needed)."""
    from dsv3 import Transformer, save_pretrained

    out = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_pretrained(Transformer(small_config(vocab_size=300, max_position_embeddings=64)), out)
    save_byte_level_tokenizer(out)
    return str(out)


def _broken_model(tmp_path, model_dir, **files) -> str:
    """A copy of ``model_dir`` with some files replaced (bytes/str/JSON) or removed (None)."""
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(model_dir, d)
    for name, content in files.items():
        name = name.replace("__", ".")
        if content is None:
            os.remove(d / name)
        else:
            _write(d / name, content)
    return str(d)


def _token_dir(t, file: str = "train/s.bin", tokens: int = 100, nbytes: int | None = None,
               sha: str = "0" * 64) -> str:
    """A prepared token directory by hand: one train shard of ``tokens`` uint16 zeros (``nbytes`` bytes
    written, default the right size) named ``file`` in index.json."""
    d = t / "data"
    _write(d / "train" / "s.bin", bytes(2 * tokens if nbytes is None else nbytes))
    _write(d / "index.json", {"format": "dsv3-tokens/1", "dtype": "uint16", "vocab_size": 256,
                              "tokenizer_sha256": sha,
                              "splits": {"train": {"tokens": tokens, "shards": [{"file": file, "tokens": tokens}]}}})
    return str(d)


def _truncated(model_dir) -> bytes:
    return open(os.path.join(model_dir, "model.safetensors"), "rb").read()[:-100]


def _sft(t, m) -> list[str]:
    """A valid, one-step ``dsv3 sft`` command line (a model with an end-of-sentence token, one record)."""
    model = _broken_model(t, m, tokenizer_config__json={"eos_token": "!"})
    data = _write(t / "c.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                                 '"content": "yo"}]}\n')
    return ["sft", "--model", model, "--data", data, "--out", str(t / "r"), "--steps", "1", "--batch-size", "1",
            "--seq-len", "48", "--no-progress", "--no-plots", "--device", "cpu"]


def _sample(t, m) -> list[str]:
    """A valid, quick ``dsv3 sample`` command line (one prompt, one sample of two tokens)."""
    model = _broken_model(t, m, tokenizer_config__json={"eos_token": "!"})
    return ["sample", "--model", model, "--prompts", _write(t / "p.jsonl", '{"prompt": "1+1=", "answer": "2"}\n'),
            "--n", "1", "--max-new-tokens", "2", "--device", "cpu"]


def _passkey(m) -> list[str]:
    """A valid, quick ``dsv3 eval`` command line: one passkey prompt of 100 tokens."""
    return ["eval", "--model", m, "--task", "passkey", "--lengths", "100", "--depths", "0.5", "--samples", "1",
            "--device", "cpu"]


def _tokenizer_sha(m) -> str:
    from dsv3.data import Tokenizer

    return Tokenizer.from_file(os.path.join(m, "tokenizer.json")).fingerprint()


# (id, args builder(tmp_path, model_dir) -> argv, text the one line must contain)
CASES = [
    # ---- info: config.json that is not what it should be
    ("config-json-list", lambda t, m: ["info", "--config", _write(t / "c.json", [1, 2])], "must hold a JSON object"),
    ("config-string-eps", lambda t, m: ["info", "--config", _write(t / "c.json", {**TINY_HF, "rms_norm_eps": "tiny"})],
     "rms_norm_eps"),
    ("config-rope-string", lambda t, m: ["info", "--config", _write(t / "c.json", {**TINY_HF, "rope_scaling": "yarn"})],
     "rope_scaling"),
    ("config-quant-string", lambda t, m: ["info", "--config",
                                          _write(t / "c.json", {**TINY_HF, "quantization_config": "fp8"})],
     "quantization_config"),
    ("config-block-int", lambda t, m: ["info", "--config", _write(t / "c.json", {
        **TINY_HF, "quantization_config": {"quant_method": "fp8", "weight_block_size": 128}})], "weight_block_size"),
    ("config-eos-empty", lambda t, m: ["info", "--config", _write(t / "c.json", {**TINY_HF, "eos_token_id": []})],
     "eos_token_id"),
    ("config-kv-heads-differ", lambda t, m: ["info", "--config", _write(t / "c.json", {   # MLA: no separate KV heads
        **TINY_HF, "num_key_value_heads": TINY_HF["num_attention_heads"] // 2})], "num_key_value_heads = 2"),
    ("config-kv-heads-string", lambda t, m: ["info", "--config", _write(t / "c.json", {
        **TINY_HF, "num_key_value_heads": "4"})], "num_key_value_heads"),
    ("config-hidden-null", lambda t, m: ["info", "--config", _write(t / "c.json", {**TINY_HF, "hidden_size": None})],
     "hidden_size"),
    ("config-layers-string", lambda t, m: ["info", "--config",
                                           _write(t / "c.json", {**TINY_HF, "num_hidden_layers": "3"})],
     "num_hidden_layers"),
    ("config-nan", lambda t, m: ["info", "--config", _write(t / "c.json", json.dumps(TINY_HF)[:-1] +
                                                            ', "rope_theta": NaN}')], "NaN"),
    ("config-init-negative", lambda t, m: ["info", "--config", _write(t / "c.json", {
        **TINY_HF, "initializer_range": -0.02})], "initializer_range"),
    ("train-config-init-negative", lambda t, m: ["train", "--out", str(t / "r"), "--config", _write(t / "c.json", {
        **TINY_HF, "initializer_range": -0.02}), "--data", _write(t / "c.jsonl", '{"text": "def f(): pass"}\n' * 50),
        "--steps", "1", "--seq-len", "8", "--batch-size", "1", "--no-progress", "--no-plots", "--device", "cpu"],
     "initializer_range"),
    ("config-topk-method-typo", lambda t, m: ["info", "--config", _write(t / "c.json", {
        **TINY_HF, "topk_method": "noaux-tc"})], "topk_method"),
    ("config-rope-not-interleaved", lambda t, m: ["info", "--config", _write(t / "c.json", {
        **TINY_HF, "rope_interleave": False})], "rope_interleave = false"),
    ("config-rope-interleave-string", lambda t, m: ["info", "--config", _write(t / "c.json", {
        **TINY_HF, "rope_interleave": "no"})], "rope_interleave"),
    ("generate-rope-not-interleaved", lambda t, m: ["generate", "--prompt", "x", "--model", _broken_model(
        t, m, config__json={**json.load(open(os.path.join(m, "config.json"))), "rope_interleave": False})],
     "rope_interleave"),
    ("config-binary", lambda t, m: ["info", "--config", _write(t / "c.json", b"\x00\xff\xfe" * 50)], "c.json"),
    ("config-not-a-config", lambda t, m: ["info", "--config", _write(t / "c.json", {"foo": 1})], "model config"),
    ("config-missing", lambda t, m: ["info", "--config", str(t / "nope.json")], "nope.json"),
    ("info-2^30-experts", lambda t, m: ["info", "--config", _write(t / "c.json", {
        **TINY_HF, "n_routed_experts": 2**30, "n_group": 1, "topk_group": 1})], "n_routed_experts"),
    # ---- train: flags, data, run directory
    ("train-lr-nan", lambda t, m: ["train", "--out", str(t / "r"), "--lr", "nan"], "--lr"),
    ("train-lr-inf", lambda t, m: ["train", "--out", str(t / "r"), "--lr", "inf"], "--lr"),
    ("train-lr-text", lambda t, m: ["train", "--out", str(t / "r"), "--lr", "abc"], "--lr"),
    ("train-ema", lambda t, m: ["train", "--out", str(t / "r"), "--ema", "1.5"], "--ema"),
    ("train-schedule-without-pp", lambda t, m: ["train", "--out", str(t / "r"), "--schedule", "zb1p"],
     "--schedule needs --pp > 1"),
    ("train-microbatches-without-pp", lambda t, m: ["train", "--out", str(t / "r"), "--microbatches", "4"],
     "--microbatches needs --pp > 1"),
    ("train-adam-betas-one", lambda t, m: ["train", "--out", str(t / "r"), "--adam-betas", "0.9"], "--adam-betas"),
    ("train-adam-betas-1", lambda t, m: ["train", "--out", str(t / "r"), "--adam-betas", "0.9,1"], "B2 must be"),
    ("train-adam-betas-text", lambda t, m: ["train", "--out", str(t / "r"), "--adam-betas", "a,b"], "--adam-betas"),
    ("train-adam-betas-nan", lambda t, m: ["train", "--out", str(t / "r"), "--adam-betas", "nan,0.9"], "B1 must be"),
    ("train-lr-schedule", lambda t, m: ["train", "--out", str(t / "r"), "--lr-schedule", "linear"], "--lr-schedule"),
    ("train-min-lr-ratio", lambda t, m: ["train", "--out", str(t / "r"), "--min-lr-ratio", "2"], "--min-lr-ratio"),
    ("train-min-lr-ratio-constant", lambda t, m: ["train", "--out", str(t / "r"), "--min-lr-ratio", "0.5",
                                                  "--lr-schedule", "constant"], "--min-lr-ratio only applies"),
    ("train-max-data-bytes", lambda t, m: ["train", "--out", str(t / "r"), "--max-data-bytes", "-1"],
     "--max-data-bytes"),
    ("train-device-tpu", lambda t, m: ["train", "--out", str(t / "r"), "--device", "tpu9"], "--device"),
    ("train-allow-changed-unknown", lambda t, m: ["train", "--out", str(t / "r"), "--resume",
                                                  "--allow-changed", "colour"], "--allow-changed"),
    ("train-index-without-splits", lambda t, m: ["train", "--out", str(t / "r"), "--data", os.path.dirname(
        _write(t / "data" / "index.json", {"dtype": "uint16", "vocab_size": 2048}))], "splits"),
    ("train-jsonl-bad-line", lambda t, m: ["train", "--out", str(t / "r"), "--data", _write(
        t / "corpus.jsonl", '{"text": "def f(): pass"}\n{"text": oops}\n{"text": "x"}\n')], "corpus.jsonl:2"),
    ("train-binary-index", lambda t, m: ["train", "--out", str(t / "r"), "--data", os.path.dirname(
        _write(t / "data" / "index.json", b"\xff\xd8\xff" * 20))], "index.json"),
    ("train-config-binary", lambda t, m: ["train", "--out", str(t / "r"), "--config",
                                          _write(t / "c.json", os.urandom(64) + b"\xff")], "c.json"),
    ("train-model-too-big", lambda t, m: ["train", "--out", str(t / "r"), "--preset", "deepseek-v3"], "needs about"),
    ("train-memory-limit", lambda t, m: ["train", "--out", str(t / "r"), "--memory-limit", "0.001"],
     "--memory-limit"),
    # ---- generate
    ("generate-truncated-weights", lambda t, m: ["generate", "--prompt", "x", "--model", _broken_model(
        t, m, model__safetensors=_truncated(m))], "model.safetensors"),
    ("generate-empty-weights", lambda t, m: ["generate", "--prompt", "x", "--model", _broken_model(
        t, m, model__safetensors=b"")], "model.safetensors"),
    ("generate-random-weights", lambda t, m: ["generate", "--prompt", "x", "--model", _broken_model(
        t, m, model__safetensors=os.urandom(4096))], "model.safetensors"),
    ("generate-empty-tokenizer", lambda t, m: ["generate", "--prompt", "x", "--model", _broken_model(
        t, m, tokenizer__json="")], "tokenizer"),
    ("generate-binary-tokenizer", lambda t, m: ["generate", "--prompt", "x", "--model", _broken_model(
        t, m, tokenizer__json=b"\xff\xfe\x00" * 30)], "tokenizer.json"),
    ("generate-binary-index", lambda t, m: ["generate", "--prompt", "x", "--model", _broken_model(
        t, m, model__safetensors__index__json=b"\x89PNG\xff" * 9)], "model.safetensors.index.json"),
    ("generate-index-without-weight-map", lambda t, m: ["generate", "--prompt", "x", "--model", _broken_model(
        t, m, model__safetensors__index__json={"metadata": {}})], "weight_map"),
    ("generate-config-list", lambda t, m: ["generate", "--prompt", "x", "--model", _broken_model(
        t, m, config__json=[])], "config.json"),
    ("generate-tokenizer-of-another-model", lambda t, m: ["generate", "--prompt", "x", "--model", _broken_model(
        t, m, config__json={**json.load(open(os.path.join(m, "config.json"))), "vocab_size": 100})], "vocab_size"),
    ("generate-top-p", lambda t, m: ["generate", "--prompt", "x", "--model", m, "--top-p", "0"], "--top-p"),
    ("generate-greedy-top-k", lambda t, m: ["generate", "--prompt", "x", "--model", m, "--temperature", "0", "--top-k",
                                            "5"], "--top-k 5: it only applies when sampling"),
    ("generate-temperature-nan", lambda t, m: ["generate", "--prompt", "x", "--model", m, "--temperature", "nan"],
     "--temperature"),
    ("generate-fp8-keep-bf16-model", lambda t, m: ["generate", "--prompt", "x", "--model", m, "--fp8", "keep",
                                                   "--max-new-tokens", "2"], "--fp8 keep"),
    ("generate-fp8-weight-only-bf16-model", lambda t, m: ["generate", "--prompt", "x", "--model", m, "--fp8",
                                                          "weight-only", "--max-new-tokens", "2"], "not an FP8"),
    ("generate-memory", lambda t, m: ["generate", "--prompt", "x", "--model", m, "--memory-limit", "1e-6"],
     "needs about"),
    # ---- serve (everything is checked before a socket or an engine starts)
    ("serve-memory", lambda t, m: ["serve", "--port", str(free_port()), "--model", m, "--memory-limit", "1e-6"],
     "needs about"),
    ("serve-port", lambda t, m: ["serve", "--model", m, "--port", "70000"], "--port"),
    ("serve-truncated-weights", lambda t, m: ["serve", "--port", str(free_port()), "--model", _broken_model(
        t, m, model__safetensors=_truncated(m))], "model.safetensors"),
    ("serve-prefix-cache-unwritable", lambda t, m: ["serve", "--port", str(free_port()), "--model", m, "--prefix-cache",
                                                    os.path.join(_write(t / "afile", "x"), "cache")],
     "--prefix-cache"),
    ("serve-device", lambda t, m: ["serve", "--port", str(free_port()), "--model", m, "--device", "tpu9"], "--device"),
    ("serve-fp8-keep-bf16-model", lambda t, m: ["serve", "--port", str(free_port()), "--model", m, "--fp8", "keep"],
     "--fp8 keep"),
    # ---- plot
    ("plot-rows-without-step", lambda t, m: ["plot", os.path.dirname(_write(t / "run" / "metrics.jsonl",
                                                                            '{"loss": 1.0}\n'))], "'step'"),
    ("plot-step-beyond-int64", lambda t, m: ["plot", os.path.dirname(_write(  # an OverflowError in matplotlib
        t / "run" / "metrics.jsonl", '{"step": 1, "loss": 2}\n{"step": %d, "loss": 1}\n' % 10**30))], "line 2: 'step'"),
    ("plot-line-is-a-number", lambda t, m: ["plot", os.path.dirname(_write(t / "run" / "metrics.jsonl", "5\n"))],
     "line 1"),
    ("plot-empty", lambda t, m: ["plot", os.path.dirname(_write(t / "run" / "metrics.jsonl", ""))], "no rows"),
    ("plot-strings", lambda t, m: ["plot", os.path.dirname(_write(t / "run" / "metrics.jsonl", '"a"\n"b"\n'))],
     "line 1"),
    ("plot-string-loss", lambda t, m: ["plot", os.path.dirname(_write(t / "run" / "metrics.jsonl",
                                                                      '{"step": 1, "loss": "low"}\n'))], "'loss'"),
    ("plot-bad-middle-line", lambda t, m: ["plot", os.path.dirname(_write(
        t / "run" / "metrics.jsonl", '{"step": 1, "loss": 2}\n{"step": 2, "lo\n{"step": 3, "loss": 1}\n'))],
     "line 2"),
    ("plot-binary", lambda t, m: ["plot", os.path.dirname(_write(t / "run" / "metrics.jsonl", b"\xff\xfe\x00" * 9))],
     "metrics.jsonl"),
    ("plot-moe-layers-number", lambda t, m: ["plot", os.path.dirname(_write(
        t / "run" / "metrics.jsonl", '{"step": 1, "moe_layers": 5, "expert_load": [[1, 2]]}\n'))], "'moe_layers'"),
    ("plot-unwritable-out", lambda t, m: ["plot", os.path.dirname(_write(t / "run" / "metrics.jsonl",
                                                                         '{"step": 1, "loss": 2}\n')),
                                          "--out", os.path.join(_write(t / "afile", "x"), "plots")], "--out"),
    # ---- an empty value is never taken as "not given" (quantize --out '' deleted the working directory)
    ("quantize-out-empty", lambda t, m: ["quantize", "--model", m, "--out", ""], "--out"),
    ("train-preset-empty", lambda t, m: ["train", "--out", str(t / "r"), "--preset", ""], "--preset"),
    ("train-mix-empty", lambda t, m: ["train", "--out", str(t / "r"), "--mix", ""], "--mix"),
    ("plan-hardware-file-empty", lambda t, m: ["plan", "--hardware-file", ""], "--hardware-file"),
    ("plan-serve-with-train-flag", lambda t, m: ["plan", "--mode", "serve", "--pp", "8"],
     "--pp only applies to --mode train"),
    ("plan-train-with-serve-flag", lambda t, m: ["plan", "--no-mtp"], "--no-mtp only applies to --mode serve"),
    ("plot-run-dir-blank", lambda t, m: ["plot", " "], "run_dir"),
    ("eplb-plot-empty", lambda t, m: ["eplb", "--loads", _write(t / "l.json", [[1, 2, 3, 4]]), "--replicas", "4",
                                      "--groups", "1", "--nodes", "1", "--gpus", "1", "--plot", ""], "--plot"),
    ("serve-prefix-cache-empty", lambda t, m: ["serve", "--model", m, "--prefix-cache", ""], "--prefix-cache"),
    # ---- quantize --overwrite deletes --out: only a model directory, never one holding --model
    ("quantize-overwrite-not-a-model", lambda t, m: ["quantize", "--model", m, "--overwrite", "--out", os.path.dirname(
        _write(t / "docs" / "notes.txt", "keep me"))], "no config.json"),
    ("quantize-overwrite-parent-of-model", lambda t, m: ["quantize", "--model", _broken_model(t, m), "--overwrite",
                                                         "--out", str(t)], "holds --model"),
    # ---- eplb / pipeline
    ("eplb-loads-overflow", lambda t, m: ["eplb", "--loads", _write(t / "l.json", [[1e308] * 4]), "--replicas", "4",
                                          "--groups", "1", "--nodes", "1", "--gpus", "1"], "overflows"),
    ("eplb-json-string-load", lambda t, m: ["eplb", "--loads", _write(t / "l.json", [[1, 2, 3, "4"]]), "--replicas",
                                            "4", "--groups", "1", "--nodes", "1", "--gpus", "1"], "the string '4'"),
    ("eplb-json-boolean-load", lambda t, m: ["eplb", "--loads", _write(t / "l.json", [[1, True, 3, 4]]), "--replicas",
                                             "4", "--groups", "1", "--nodes", "1", "--gpus", "1"], "boolean"),
    ("eplb-loads-directory", lambda t, m: ["eplb", "--loads", str(t), "--replicas", "4", "--groups", "1", "--nodes",
                                           "1", "--gpus", "1"], "is a directory"),
    ("eplb-layer-with-json", lambda t, m: ["eplb", "--loads", _write(t / "l.json", [[1, 2, 3, 4], [4, 3, 2, 1]]),
                                           "--replicas", "4", "--groups", "1", "--nodes", "1", "--gpus", "1", "--json",
                                           "--layer", "1"], "--layer 1 only applies"),
    ("eplb-csv-bad-cell", lambda t, m: ["eplb", "--loads", _write(t / "l.csv", "1,2,x,4\n"), "--replicas", "4",
                                        "--groups", "1", "--nodes", "1", "--gpus", "1"], "l.csv"),
    ("eplb-csv-empty", lambda t, m: ["eplb", "--loads", _write(t / "l.csv", ""), "--replicas", "4",
                                     "--groups", "1", "--nodes", "1", "--gpus", "1"], "l.csv"),
    ("eplb-plot-format", lambda t, m: ["eplb", "--loads", _write(t / "l.json", [[1, 2, 3, 4]]), "--replicas", "4",
                                       "--groups", "1", "--nodes", "1", "--gpus", "1", "--plot", str(t / "p.txt")],
     "--plot"),
    ("pipeline-plot-format", lambda t, m: ["pipeline", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4",
                                           "--plot", str(t / "p.txt")], "--plot"),
    ("pipeline-cost-huge", lambda t, m: ["pipeline", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4",
                                         "--F", "1e308", "--B", "1e308"], "--F"),
    ("pipeline-W-over-B", lambda t, m: ["pipeline", "--schedule", "zb1p", "--ranks", "2", "--microbatches", "4",
                                        "--W", "3"], "--W 3: the weight-gradient part must not exceed"),
    # ---- a cost the schedule never runs is refused, not ignored
    ("pipeline-FB-1f1b", lambda t, m: ["pipeline", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4",
                                       "--FB", "2"], "--FB only applies"),
    ("pipeline-FB-zb1p", lambda t, m: ["pipeline", "--schedule", "zb1p", "--ranks", "2", "--microbatches", "4",
                                       "--FB", "2"], "--FB only applies"),
    ("pipeline-W-1f1b", lambda t, m: ["pipeline", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4",
                                      "--W", "0.5"], "--W only applies"),
    ("pipeline-default-W-over-B", lambda t, m: ["pipeline", "--schedule", "zb1p", "--ranks", "2", "--microbatches",
                                                "4", "--B", "0.5"], "--W 1 (its default)"),
    # ---- train / grpo flags and data
    ("train-lr-huge", lambda t, m: ["train", "--out", str(t / "r"), "--lr", "1e300"], "--lr"),
    ("grpo-lr-huge", lambda t, m: ["grpo", "--model", m, "--prompts", _write(t / "p.jsonl", '{"prompt": "x"}\n'),
                                   "--out", str(t / "r"), "--lr", "1e300"], "--lr"),
    ("train-yarn-without-extend", lambda t, m: ["train", "--out", str(t / "r"), "--yarn-beta-fast", "16"],
     "--yarn-beta-fast"),
    ("train-extend-context-huge", lambda t, m: ["train", "--out", str(t / "r"), "--from", m, "--seq-len", "8",
                                                "--extend-context", "1e30"], "--extend-context"),
    ("train-shard-truncated", lambda t, m: ["train", "--out", str(t / "r"), "--seq-len", "8", "--data",
                                            _token_dir(t, nbytes=10)], "s.bin"),
    ("train-shard-outside", lambda t, m: ["train", "--out", str(t / "r"), "--seq-len", "8", "--data",
                                          _token_dir(t, file="../../s.bin")], "outside"),
    ("train-tokenizer-of-other-data", lambda t, m: ["train", "--out", str(t / "r"), "--seq-len", "8", "--data",
                                                    _token_dir(t), "--tokenizer", os.path.join(m, "tokenizer.json")],
     "--tokenizer"),
    ("serve-cache-memory-huge", lambda t, m: ["serve", "--port", str(free_port()), "--model", m, "--cache-memory",
                                              "1e9"], "--cache-memory"),
    # ---- pipeline / eplb / plan
    ("pipeline-huge", lambda t, m: ["pipeline", "--schedule", "1f1b", "--ranks", "1000000", "--microbatches",
                                    "1000000"], "--ranks"),
    ("pipeline-product", lambda t, m: ["pipeline", "--schedule", "1f1b", "--ranks", "1000", "--microbatches",
                                       "10000"], "--microbatches"),
    ("pipeline-plot-unwritable", lambda t, m: ["pipeline", "--schedule", "1f1b", "--ranks", "2", "--microbatches",
                                               "4", "--plot", os.path.join(_write(t / "afile", "x"), "p.png")],
     "--plot"),
    ("eplb-random-pt", lambda t, m: ["eplb", "--loads", _write(t / "l.pt", os.urandom(300)), "--replicas", "8",
                                     "--groups", "1", "--nodes", "1", "--gpus", "1"], "l.pt"),
    ("eplb-replicas-huge", lambda t, m: ["eplb", "--loads", _write(t / "l.json", [[1, 2, 3, 4]]), "--replicas",
                                         "400000000", "--groups", "1", "--nodes", "1", "--gpus", "1"], "--replicas"),
    ("eplb-plot-unwritable", lambda t, m: ["eplb", "--loads", _write(t / "l.json", [[1, 2, 3, 4]]), "--replicas",
                                           "4", "--groups", "1", "--nodes", "1", "--gpus", "1", "--plot",
                                           os.path.join(_write(t / "afile", "x"), "p.png")], "--plot"),
    # ---- --allow-changed is checked before any work, with or without a run.json to compare
    ("sft-allow-changed-without-resume", lambda t, m: _sft(t, m) + ["--allow-changed", "lr"],
     "--allow-changed only applies with --resume"),
    ("sft-allow-changed-unknown", lambda t, m: _sft(t, m) + ["--resume", "--allow-changed", "colour"],
     "--allow-changed colour"),
    ("grpo-allow-changed-unknown", lambda t, m: ["grpo", "--model", _broken_model(
        t, m, tokenizer_config__json={"eos_token": "!"}), "--prompts", _write(t / "p.jsonl", '{"prompt": "x"}\n'),
        "--out", str(t / "r"), "--resume", "--allow-changed", "colour", "--steps", "1", "--group", "2",
        "--prompts-per-step", "1", "--max-new-tokens", "2", "--no-progress", "--no-plots"], "--allow-changed colour"),
    # ---- sample --keep none writes nothing: the flags that shape what is written are refused
    ("sample-keep-none-out", lambda t, m: _sample(t, m) + ["--keep", "none", "--out", str(t / "kept.jsonl")],
     "--out only applies"),
    ("sample-keep-none-dedup", lambda t, m: _sample(t, m) + ["--keep", "none", "--dedup"], "--dedup only applies"),
    ("sample-greedy-top-p", lambda t, m: _sample(t, m) + ["--temperature", "0", "--top-p", "0.9"],
     "--top-p 0.9: it only applies when sampling"),
    ("sample-keep-none-max-per-prompt", lambda t, m: _sample(t, m) + ["--keep", "none", "--max-per-prompt", "2"],
     "--max-per-prompt only applies"),
    # ---- eval: a flag none of the chosen tasks reads is refused; --out is checked before the evaluation
    ("eval-max-length-passkey", lambda t, m: _passkey(m) + ["--max-length", "50"],
     "--max-length only applies to --task ppl-by-position"),
    ("eval-bucket-passkey", lambda t, m: _passkey(m) + ["--bucket", "8"], "--bucket only applies"),
    ("eval-data-passkey", lambda t, m: _passkey(m) + ["--data", _token_dir(t)], "--data only applies"),
    ("eval-samples-ppl", lambda t, m: ["eval", "--model", m, "--task", "ppl-by-position", "--max-length", "8",
                                       "--windows", "1", "--data", _token_dir(t, sha=_tokenizer_sha(m)), "--samples",
                                       "2"], "--samples only applies to --task passkey and niah"),
    ("eval-out-missing-dir", lambda t, m: _passkey(m) + ["--out", str(t / "nowhere" / "r.json")], "--out"),
    ("eval-data-without-val-split", lambda t, m: ["eval", "--model", m, "--task", "ppl-by-position", "--max-length",
                                                  "8", "--windows", "1", "--data", _token_dir(t, sha=_tokenizer_sha(m))],
     "no 'val' split"),
    ("plan-serve-price", lambda t, m: ["plan", "--mode", "serve", "--price", "5"],
     "--price only applies to --mode train"),
    ("plan-routing-groups-no-limit", lambda t, m: ["plan", "--routing-groups", "2", "--no-node-limit"],
     "--routing-groups 2 and --no-node-limit"),
    ("plan-yaml-python-tag", lambda t, m: ["plan", "--gpu", "g", "--hardware-file", _write(
        t / "hw.yaml", "g: !!python/object/apply:os.system ['echo pwned']\n")], "hw.yaml"),
    ("plan-hardware-entry-string", lambda t, m: ["plan", "--gpu", "g", "--hardware-file",
                                                 _write(t / "hw.json", {"g": "fast"})], "'g'"),
    ("plan-hardware-binary", lambda t, m: ["plan", "--hardware-file", _write(t / "hw.json", b"\x00\xff" * 20)],
     "hw.json"),
]


def _one_line_error(err: str, command: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dsv3 {command}: error: "), err
    assert needle in lines[0], err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case, tmp_path, model_dir, capsys):
    _, build, needle = case
    argv = build(tmp_path, model_dir)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:   # argparse's own errors (a value that is not a number)
        code = e.code
    _one_line_error(capsys.readouterr().err, argv[0], needle)
    assert code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["train", "generate"])
def test_cuda_without_a_gpu(command, tmp_path, model_dir, capsys):
    argv = (["train", "--out", str(tmp_path / "r")] if command == "train"
            else ["generate", "--model", model_dir, "--prompt", "x"]) + ["--device", "cuda"]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, command, "--device cuda")


def test_malicious_pickle_is_refused_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "loads.pt"
    path.write_bytes(pickle.dumps(_Evil(str(marker))))
    assert main(["eplb", "--loads", str(path), "--replicas", "8", "--groups", "1", "--nodes", "1",
                 "--gpus", "1"]) == 2
    _one_line_error(capsys.readouterr().err, "eplb", "weights_only")
    assert not marker.exists()


def test_missing_hidden_size_takes_transformers_default_and_info_says_so(tmp_path, capsys):
    path = _write(tmp_path / "c.json", _without(TINY_HF, "hidden_size"))
    assert main(["info", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "defaults taken" in out and "hidden_size=7168" in out
    assert main(["info", "--config", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["defaults"] == {"hidden_size": 7168}


def test_internal_error_points_at_a_traceback_file(tmp_path, capsys, monkeypatch):
    import dsv3.commands.info as info

    def broken(args):
        raise TypeError("an internal bug")

    monkeypatch.setattr(info, "run", broken)
    monkeypatch.setenv("DSV3_CRASH_DIR", str(tmp_path / "crashes"))
    assert main(["info", "--config", "tiny"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "internal error: TypeError: an internal bug" in lines[0] and "Traceback" not in err
    (report,) = os.listdir(tmp_path / "crashes")
    assert report in lines[0] and "Traceback" in (tmp_path / "crashes" / report).read_text()
    with pytest.raises(TypeError):
        main(["--debug", "info", "--config", "tiny"])
    with pytest.raises(TypeError):
        main(["info", "--config", "tiny", "--debug"])


@pytest.mark.parametrize("argv, needle", [
    (["info", "--config", "{dir}/list.json"], "list.json"),
    (["train", "--out", "{dir}/r", "--lr", "nan"], "--lr"),
    (["plot", "{dir}"], "line 1"),
])
def test_as_a_subprocess(tmp_path, argv, needle):
    """``python -m dsv3.cli``: the same one line (the module runs as __main__, its error type must still be
    the one the commands raise)."""
    _write(tmp_path / "list.json", [1])
    _write(tmp_path / "metrics.jsonl", "5\n")
    argv = [a.format(dir=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", *argv], capture_output=True, text=True, env=cli_env(),
                       timeout=120)
    assert r.returncode == 2, r.stderr
    _one_line_error(r.stderr, argv[0], needle)


def test_plot_draws_nan_metrics(tmp_path):
    """A NaN a run logged is a gap in the picture, not an error."""
    run = tmp_path / "run"
    _write(run / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": NaN}\n')
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "loss.png").exists()


def test_plot_draws_the_drawable_rows_and_names_the_extreme_ones(tmp_path, capsys):
    """Losses of ±1e308 made matplotlib fail on the axes ("arange: cannot compute length", no file named);
    now such values, ±Infinity and NaN are gaps, and one warning names the file, the fields and the lines."""
    import random

    rng = random.Random()
    n = rng.randint(8, 30)
    rows = [{"step": i + 1, "loss": rng.uniform(0.5, 9), "max_vio": rng.uniform(0, 2),
             "expert_load": [[rng.randint(0, 50) for _ in range(4)] for _ in range(2)]} for i in range(n)]
    bad_loss = rng.sample(range(n), 4)
    for i, v in zip(bad_loss, (1e308, -1e308, rng.choice([float("inf"), float("-inf")]), float("nan"))):
        rows[i]["loss"] = v
    bad_vio, bad_load = rng.randrange(n), rng.randrange(n)
    rows[bad_vio]["max_vio"] = 10.0 ** rng.randint(39, 308)
    rows[bad_load]["expert_load"][1][rng.randrange(4)] = float("inf")
    run = tmp_path / "run"
    _write(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))      # Infinity / NaN as JSON writes
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv3 plot: warning: "), err
    assert str(run / "metrics.jsonl") in lines[0]
    want = {"'loss'": sorted(bad_loss), "'max_vio'": [bad_vio], "'expert_load'": [bad_load]}
    for field, idx in want.items():
        part = lines[0].split(field + " on ")[1].split(";")[0]
        assert [int(x) for x in part.replace("lines", "").replace("line", "").split(",")] == [i + 1 for i in idx], err
    assert {os.path.basename(p) for p in out.split()} == {"loss.png", "max_vio.png", "expert_load.png"}


def test_plot_of_one_load_row_and_an_idle_layer_warns_nothing(tmp_path, capsys):
    """A run with a single expert_load row (matplotlib: "identical low and high xlims") whose second layer
    saw no token (numpy: "invalid value encountered in divide") drew with stray warning lines."""
    import random
    import warnings

    rng = random.Random()
    row = {"step": rng.randint(1, 500), "loss": rng.uniform(1, 9), "max_vio": rng.uniform(0, 2),
           "expert_load": [[rng.randint(1, 50) for _ in range(4)], [0, 0, 0, 0]]}
    run = tmp_path / "run"
    _write(run / "metrics.jsonl", json.dumps(row) + "\n")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["plot", str(run)]) == 0
    out, err = capsys.readouterr()
    assert not caught and not err.strip(), [str(w.message) for w in caught] + [err]
    assert {os.path.basename(p) for p in out.split()} == {"loss.png", "max_vio.png", "expert_load.png"}


def test_generate_says_when_the_context_is_too_short(tmp_path, model_dir, capsys):
    assert main(["generate", "--model", model_dir, "--prompt", "a" * 58, "--max-new-tokens", "100000",
                 "--temperature", "0"]) == 0       # 64 positions, 58 taken by the prompt (one byte per token)
    err = capsys.readouterr().err
    assert "--max-new-tokens 100000" in err and "at most 6 tokens" in err


@pytest.mark.parametrize("argv, needle", [
    (["plan", "--price", "nan"], "--price"),
    (["plan", "--tokens", "1e400"], "--tokens"),
    (["plan", "--assume", "goodput=nan"], "goodput"),
    (["plan", "--micro-batch-size", "0"], "--micro-batch-size"),
    (["pipeline", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--FB", "inf"], "--FB"),
    (["train", "--pp", "3", "--out", "{dir}/r"], "--pp 3"),
    (["plot", "{dir}/afile"], "not a directory"),
])
def test_more_flags(tmp_path, capsys, argv, needle):
    _write(tmp_path / "afile", "x")
    argv = [a.format(dir=tmp_path) for a in argv]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, argv[0], needle)
    assert not os.path.exists(tmp_path / "r" / "data")     # refused before any data is prepared


def test_quantize_empty_out_leaves_the_working_directory(tmp_path, model_dir, monkeypatch, capsys):
    """``--out ''`` was taken as the current directory, which --out's replacement then deleted."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "work.txt", "precious")
    with pytest.raises(SystemExit) as e:      # a usage error, as argparse's own
        main(["quantize", "--model", model_dir, "--out", ""])
    assert e.value.code == 2
    _one_line_error(capsys.readouterr().err, "quantize", "--out")
    assert os.listdir(tmp_path) == ["work.txt"] and (tmp_path / "work.txt").read_text() == "precious"


def test_sample_refuses_to_write_over_its_prompts(tmp_path, model_dir, capsys):
    prompts = _write(tmp_path / "p.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')
    assert main(["sample", "--model", model_dir, "--prompts", prompts, "--out", prompts, "--n", "1"]) == 2
    _one_line_error(capsys.readouterr().err, "sample", "--prompts")
    assert open(prompts).read() == '{"prompt": "1+1=", "answer": "2"}\n'


@pytest.mark.parametrize("flag", ["--sft", "--train", "--heldout"])
def test_r1_task_refuses_a_count_below_one(flag, tmp_path, capsys):
    """--sft/--train/--heldout 0 wrote an empty file (later refused by sft/grpo/eval); below 0 too."""
    import random

    out = tmp_path / "t"
    for bad in (0, -random.randint(1, 10**6)):
        args = ["r1-task", "--out", str(out), "--sft", "2", "--train", "3", "--heldout", "2", flag, str(bad)]
        assert main(args) == 2
        _one_line_error(capsys.readouterr().err, "r1-task", f"{flag} {bad}")
    assert not out.exists()                                  # nothing written


def test_r1_task_keeps_other_task_files_without_overwrite(tmp_path, capsys):
    args = ["r1-task", "--out", str(tmp_path / "t"), "--sft", "2", "--train", "3", "--heldout", "2"]
    assert main(args) == 0
    before = (tmp_path / "t" / "train.jsonl").read_text()
    assert main(args) == 0                                   # the same files again: nothing to refuse
    capsys.readouterr()
    assert main(args + ["--seed", "1"]) == 2
    _one_line_error(capsys.readouterr().err, "r1-task", "--overwrite")
    assert (tmp_path / "t" / "train.jsonl").read_text() == before
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert (tmp_path / "t" / "train.jsonl").read_text() != before


def test_a_reward_function_that_raises_is_named(tmp_path, model_dir, capsys):
    prompts = _write(tmp_path / "p.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')
    model = _broken_model(tmp_path, model_dir, tokenizer_config__json={"eos_token": "!"})
    assert main(["grpo", "--model", model, "--prompts", prompts, "--out", str(tmp_path / "r"), "--steps", "1",
                 "--group", "2", "--prompts-per-step", "1", "--max-new-tokens", "2", "--no-progress", "--no-plots",
                 "--reward", "os:getcwd"]) == 2
    _one_line_error(capsys.readouterr().err, "grpo", "--reward os:getcwd")


def test_pipeline_1f1b_with_a_short_backward(capsys):
    """1f1b runs no separate weight-gradient pass: a --B below --W's default is no reason to refuse."""
    assert main(["pipeline", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--B", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["makespan"] == 7.5      # (4 + 2 - 1) × (F + B)


def test_train_batch_not_divisible_is_refused_before_the_run_is_touched(tmp_path, capsys):
    """--batch-size that --grad-accum does not divide was refused only by the trainer: after the data was
    prepared and --overwrite had already deleted the run it was to replace."""
    run = tmp_path / "r"
    _write(run / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n')
    corpus = _write(tmp_path / "c.jsonl", '{"text": "def f(x):\\n    return x\\n"}\n' * 50)
    assert main(["train", "--out", str(run), "--data", corpus, "--overwrite", "--steps", "1", "--batch-size", "3",
                 "--grad-accum", "2", "--seq-len", "8", "--no-progress", "--no-plots"]) == 2
    _one_line_error(capsys.readouterr().err, "train", "--batch-size 3")
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    assert sorted(os.listdir(run)) == ["metrics.jsonl"]


def test_grpo_prompt_too_long_is_refused_before_overwrite_deletes_the_run(tmp_path, model_dir, capsys):
    """A prompt longer than the model's context was refused only after --overwrite had deleted the run in
    --out (and a new run.json was written there)."""
    model = _broken_model(tmp_path, model_dir, tokenizer_config__json={"eos_token": "!"})
    prompts = _write(tmp_path / "p.jsonl", json.dumps({"prompt": "1+" * 60 + "1=", "answer": "61"}) + "\n")
    run = tmp_path / "r"
    _write(run / "metrics.jsonl", '{"step": 1, "reward": 0.5}\n')
    assert main(["grpo", "--model", model, "--prompts", prompts, "--out", str(run), "--overwrite", "--steps", "1",
                 "--group", "2", "--prompts-per-step", "1", "--no-progress", "--no-plots"]) == 2
    _one_line_error(capsys.readouterr().err, "grpo", "positions")
    assert sorted(os.listdir(run)) == ["metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "reward": 0.5}\n'


def test_sft_records_cut_before_their_answer_are_refused(tmp_path, model_dir, capsys):
    """A record whose assistant turn starts after --seq-len has no target: the run stopped at step 1 with
    "loss became nan … the last checkpoint is kept in …" (there was none), not naming --seq-len."""
    argv = _sft(tmp_path, model_dir)
    argv[argv.index("--seq-len") + 1] = "16"
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, "sft", "--seq-len 16")
    assert not (tmp_path / "r").exists()


def test_train_data_without_a_val_split_trains_without_validation(tmp_path, capsys):
    """A prepared directory whose index.json has only a train split stopped with an internal KeyError."""
    from dsv3.data import Tokenizer

    data = _token_dir(tmp_path, tokens=400)
    save_byte_level_tokenizer(data)
    meta = json.load(open(os.path.join(data, "index.json")))
    meta["tokenizer_sha256"] = Tokenizer.from_file(os.path.join(data, "tokenizer.json")).fingerprint()
    _write(os.path.join(data, "index.json"), meta)
    code = main(["train", "--out", str(tmp_path / "r"), "--data", data, "--config", _write(
        tmp_path / "c.json", small_config(vocab_size=256, max_position_embeddings=64).to_hf()), "--steps", "1",
        "--batch-size", "1", "--seq-len", "8", "--no-progress", "--no-plots", "--sample-prompt", "", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err


def test_plot_draws_mtp_loss_logged_on_some_rows_only(tmp_path, capsys):
    """A run resumed with another MTP depth logs 'mtp' on some rows: the plot stopped with an internal
    KeyError when the first row had it and a later one did not."""
    run = tmp_path / "run"
    _write(run / "metrics.jsonl", '{"step": 1, "loss": 2.0, "mtp": 2.5}\n{"step": 2, "loss": 1.5}\n')
    assert main(["plot", str(run)]) == 0, capsys.readouterr().err
    assert (run / "plots" / "loss.png").exists()


@pytest.fixture
def run_with_data(tmp_path):
    """A run directory holding only data/, prepared from a.jsonl (a run stopped after preparing it), and the
    config of a model that fits it."""
    from dsv3.data import prepare

    corpus = _write(tmp_path / "a.jsonl", "".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n"
                                                  for i in range(60)))
    prepare(corpus, str(tmp_path / "r" / "data"), vocab_size=280, progress=False)
    config = _write(tmp_path / "c.json", small_config(vocab_size=280, max_position_embeddings=64).to_hf())
    return tmp_path / "r", config


@pytest.mark.parametrize("extra, needle", [
    (["--data", "{dir}/b.jsonl"], "already holds the tokens of another corpus"),
    (["--data", "{dir}/a.jsonl", "--max-data-bytes", "100"], "--max-data-bytes 100"),
    (["--data", "{dir}/a.jsonl", "--tokenizer", "{dir}/tok.json"], "--tokenizer"),
    (["--data", "{dir}/r/data", "--max-data-bytes", "100"], "--max-data-bytes only applies to a corpus"),
])
def test_train_does_not_ignore_what_to_prepare(run_with_data, extra, needle, capsys):
    """RUN/data was reused whatever --data, --max-data-bytes or --tokenizer said (--overwrite keeps it too):
    a run on b.jsonl silently trained on a.jsonl's tokens."""
    run, config = run_with_data
    d = os.path.dirname(str(run))
    _write(os.path.join(d, "b.jsonl"), '{"text": "something else entirely"}\n' * 40)
    save_byte_level_tokenizer(d)
    os.replace(os.path.join(d, "tokenizer.json"), os.path.join(d, "tok.json"))
    before = sorted(os.listdir(run))
    argv = ["train", "--out", str(run), "--config", config, "--steps", "1", "--batch-size", "1", "--seq-len", "8",
            "--no-progress", "--no-plots", "--sample-prompt", "", "--device", "cpu", "--eval-batches", "1",
            *[a.format(dir=d) for a in extra]]
    assert main(argv) == 2
    _one_line_error(capsys.readouterr().err, "train", needle)
    assert sorted(os.listdir(run)) == before


def test_grpo_says_when_the_context_cuts_max_new_tokens(tmp_path, model_dir, capsys):
    """--max-new-tokens beyond the room the context leaves after the longest prompt was cut without a word."""
    model = _broken_model(tmp_path, model_dir, tokenizer_config__json={"eos_token": "!"})
    prompts = _write(tmp_path / "p.jsonl", json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    assert main(["grpo", "--model", model, "--prompts", prompts, "--out", str(tmp_path / "r"), "--steps", "1",
                 "--group", "2", "--prompts-per-step", "1", "--max-new-tokens", "100000", "--no-progress",
                 "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "warning: --max-new-tokens 100000" in err and "completions stop after" in err, err
