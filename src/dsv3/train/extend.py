"""Context-extension stages (SPEC §2.5): continue training a model at a longer length under YaRN.

DeepSeek-V3 pre-trains at 4K positions, then runs two short stages at 32K and 128K with the same YaRN
setting (factor 40 over the 4,096 original positions, β_fast 32, β_slow 1, mscale 0.1·ln s + 1 on the
softmax scale). ``dsv3 train --from SOURCE --extend-context FACTOR --seq-len L`` is one such stage:

* the weights and config come from SOURCE (a run directory or an HF-layout model directory);
* ``rope_scaling`` becomes {type yarn, factor FACTOR, original positions = the length SOURCE was
  pre-trained at, β_fast, β_slow, mscale = mscale_all_dim}; a SOURCE that already carries YaRN keeps
  its original positions (a second stage extends the same pre-trained length, as the report does);
* ``max_position_embeddings`` becomes original × FACTOR (at least L + the MTP depth).

The exported ``config.json`` carries the new ``rope_scaling``, so transformers computes the same logits.
"""

from __future__ import annotations

import json
import math
import os

from ..config import ModelConfig
from ..errors import UserError

YARN_REPORT = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0}   # DeepSeek-V3's config.json


def resolve_source(path: str) -> tuple[str, str | None]:
    """(the model directory, the run directory or None) of ``--from PATH``: a run directory (its
    ``final/``) or a model directory (config.json + model weights), possibly a run's ``final/``."""
    if not os.path.exists(path):
        raise UserError(f"--from {path}: no such directory")
    if not os.path.isdir(path):
        raise UserError(f"--from {path}: not a directory (give a run directory or a model directory)")
    if os.path.exists(os.path.join(path, "config.json")):
        parent = os.path.dirname(os.path.abspath(path))
        return path, parent if _is_run(parent) else None
    final = os.path.join(path, "final")
    if os.path.exists(os.path.join(final, "config.json")):
        return final, path
    raise UserError(f"--from {path}: holds neither config.json (a model directory) nor final/config.json "
                    f"(a finished run)")


def _is_run(path: str) -> bool:
    return os.path.exists(os.path.join(path, "run.json")) or os.path.isdir(os.path.join(path, "checkpoints"))


def trained_length(run_dir: str | None, flag: str | None = None) -> int | None:
    """The --seq-len the run in ``run_dir`` trained at: its run.json, else the meta.json of its newest
    checkpoint that verifies (:func:`~dsv3.checkpoint.newest_valid`: newer ones partially written or failing
    their checksums are skipped, as a resume skips them); None for a directory with neither. A run whose
    run.json is unusable and none of whose checkpoints verifies: a UserError naming them, and ``flag``
    (the flag that gives the length instead)."""
    if run_dir is None:
        return None
    from ..checkpoint import list_checkpoints, newest_valid

    problems = []
    path = os.path.join(run_dir, "run.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                n = _length(json.load(f)["seq-len"])
            if n is not None:
                return n
            problems.append(f"{path} holds no positive seq-len")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{path} is unusable ({type(e).__name__}: {e})")
    root = os.path.join(run_dir, "checkpoints")
    if list_checkpoints(root):
        ckpt, broken = newest_valid(root, warn=False)
        if ckpt is None:
            problems.append(f"no checkpoint in {root} verifies ("
                            + "; ".join(f"{name}: {why}" for name, why in broken.items()) + ")")
        else:
            try:
                with open(os.path.join(ckpt, "meta.json")) as f:
                    n = _length(json.load(f)["train_config"]["seq_len"])
            except (OSError, ValueError, KeyError, TypeError):
                n = None
            if n is not None:
                return n
            problems.append(f"{os.path.join(ckpt, 'meta.json')} holds no positive train_config.seq_len")
    if problems:
        raise UserError(f"cannot tell the --seq-len the run in {run_dir} trained at: " + "; ".join(problems)
                        + (f"; give it with {flag}" if flag else ""))
    return None


def _length(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def original_length(cfg: ModelConfig, run_dir: str | None, given: int | None = None) -> tuple[int, str]:
    """The pre-training length YaRN scales from, and where it came from (for the log line)."""
    if given is not None:
        return given, "--original-length"
    if cfg.rope_scaling is not None:
        return cfg.rope_scaling["original_max_position_embeddings"], "the source's rope_scaling"
    n = trained_length(run_dir, "--original-length")
    if n is not None:
        return n, f"the --seq-len {run_dir} trained at"
    return cfg.max_position_embeddings, "the source's max_position_embeddings"


MAX_POSITIONS = 1 << 24   # 16.8M; DeepSeek-V3 extends 4K to 128K (163,840 positions)


def extended_config(cfg: ModelConfig, factor: float, original: int, seq_len: int, *, beta_fast: float = 32.0,
                    beta_slow: float = 1.0, mscale: float = 1.0) -> ModelConfig:
    """``cfg`` with YaRN over ``original`` positions scaled by ``factor`` and the context raised to
    original × factor (at least ``seq_len`` + the MTP depth)."""
    for flag, v in (("--extend-context", factor), ("--yarn-beta-fast", beta_fast), ("--yarn-beta-slow", beta_slow),
                    ("--yarn-mscale", mscale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{flag} {v!r}: must be a finite number")
    if factor < 1:
        raise UserError(f"--extend-context {factor}: the factor must be >= 1")
    if beta_fast <= beta_slow or beta_slow <= 0:
        raise UserError(f"--yarn-beta-fast {beta_fast} / --yarn-beta-slow {beta_slow}: need beta_fast > beta_slow > 0")
    if mscale < 0:
        raise UserError(f"--yarn-mscale {mscale}: must be >= 0")
    if original < 1:
        raise UserError(f"the original length {original}: must be >= 1")
    if original * factor > MAX_POSITIONS:
        raise UserError(f"--extend-context {factor:g}: {original} original positions × {factor:g} is more than "
                        f"{MAX_POSITIONS:,} positions, far beyond any context a model is trained at")
    reach = int(round(original * factor))
    if seq_len > reach:
        raise UserError(f"--seq-len {seq_len} is beyond the extended context ({original} original positions × "
                        f"--extend-context {factor:g} = {reach}); raise --extend-context to at least "
                        f"{math.ceil(seq_len / original)}")
    rs = {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original),
          "beta_fast": float(beta_fast), "beta_slow": float(beta_slow), "mscale": float(mscale),
          "mscale_all_dim": float(mscale)}
    return cfg.replace(rope_scaling=rs,
                       max_position_embeddings=max(reach, seq_len + cfg.num_nextn_predict_layers))


def load_weights(model, model_dir: str) -> None:
    """Copy the weights (and selection biases) of the HF-layout model in ``model_dir`` into ``model``;
    a UserError naming the directory when they do not fit."""
    from ..hf import load_pretrained

    try:
        src = load_pretrained(model_dir)
    except (ValueError, OSError) as e:
        raise UserError(f"--from {model_dir}: {e}") from None
    want, have = model.state_dict(), src.state_dict()
    missing = sorted(set(want) - set(have))
    if missing and all(k.startswith("mtp.") for k in missing):
        raise UserError(f"--from {model_dir}: the checkpoint has no MTP weights but its config asks for "
                        f"{model.cfg.num_nextn_predict_layers} MTP module(s)")
    bad = [k for k in want if k in have and have[k].shape != want[k].shape]
    if missing or bad or set(have) - set(want):
        what = missing[:3] or bad[:3] or sorted(set(have) - set(want))[:3]
        raise UserError(f"--from {model_dir}: its tensors do not fit the model being trained ({', '.join(what)} …)")
    model.load_state_dict(have)
