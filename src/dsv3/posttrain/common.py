"""What ``dsv3 sft``, ``dsv3 grpo`` and ``dsv3 sample`` share: the starting model directory (weights,
tokenizer, chat template), the run identity that ``--resume`` compares, the export with tokenizer and
template, the binomial confidence interval."""

from __future__ import annotations

import json
import math
import os
import shutil

from ..checkpoint import file_sha256, write_json_atomic  # noqa: F401 - re-exported for the commands
from ..errors import UserError


def open_model_dir(path: str, flag: str = "--model"):
    """(config, tokenizer, chat template) of an HF-layout model directory, checked without loading the
    weights (UserError naming the flag)."""
    from ..hf import check_model_dir
    from ..infer.chat_template import ChatTemplate
    from ..infer.generate import load_tokenizer

    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: model directory not found")
    try:
        cfg = check_model_dir(path)
        tokenizer = load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{flag} {path}: {e}") from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{flag} {path}: tokenizer.json has {tokenizer.vocab_size} ids but config.json's vocab_size "
                        f"is {cfg.vocab_size}")
    if tokenizer.eos_id is None:
        raise UserError(f"{flag} {path}: the tokenizer has no end-of-sentence token (tokenizer_config.json eos_token)")
    template = ChatTemplate.from_model_dir(path, tokenizer)
    return cfg, tokenizer, template


def load_weights(path: str, device="cpu"):
    """The model of ``path`` (fp32) as a Transformer."""
    from ..hf import load_pretrained

    return load_pretrained(path, device=device, dtype=None)


def model_fingerprint(path: str) -> dict:
    """The model directory by absolute path and the SHA-256 of its config and weight files."""
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".json")) and f != "tokenizer.json")
    return {"path": os.path.abspath(path), "sha256": {f: file_sha256(os.path.join(path, f)) for f in files}}


RUN_FILE = "run.json"


def check_identity(args, identity: dict, describe: dict[str, str]) -> bool:
    """With --resume: refuse a run whose settings differ from those it started with (RUN/run.json),
    unless --allow-changed names them. Returns whether run.json should be (re)written."""
    path = os.path.join(args.out, RUN_FILE)
    if not (args.resume and os.path.exists(path)):
        return True
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: {path} is unreadable ({e}); delete it to skip the check") from None
    allowed = {x.strip() for a in (args.allow_changed or []) for x in a.split(",") if x.strip()}
    bad = sorted(allowed - set(describe))
    if bad:
        raise UserError(f"--allow-changed {','.join(bad)}: unknown setting; choose from {', '.join(describe)}")
    changed = [k for k in describe if k in recorded and recorded.get(k) != identity.get(k)]
    refused = [k for k in changed if k not in allowed]
    if refused:
        raise UserError(f"--resume: the run in {args.out} started with other settings: "
                        + "; ".join(f"{describe[k]} ({_short(recorded[k])} -> {_short(identity[k])})" for k in refused)
                        + ". Use the same settings, or pass --allow-changed " + ",".join(refused))
    return bool(changed)


def check_allow_changed(args, describe: dict[str, str]) -> None:
    """Before any work: --allow-changed names settings of this command, and comes with --resume."""
    allowed = {x.strip() for a in (args.allow_changed or []) for x in a.split(",") if x.strip()}
    bad = sorted(allowed - set(describe))
    if bad:
        raise UserError(f"--allow-changed {','.join(bad)}: unknown setting; choose from {', '.join(describe)}")
    if allowed and not args.resume:
        raise UserError("--allow-changed only applies with --resume")


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 60 else s[:57] + "…"


def copy_template(src_model: str, final: str) -> None:
    """Give an exported model the chat template of the model it started from (when that had one)."""
    from ..infer.chat_template import find_template

    if not os.path.isdir(final):
        return
    src = os.path.join(src_model, "chat_template.jinja")
    if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(final, "chat_template.jinja"))
        return
    template = find_template(src_model)
    if template is not None:
        with open(os.path.join(final, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
