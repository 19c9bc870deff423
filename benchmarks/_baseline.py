"""An earlier revision of dsv3, imported beside the current one (package ``dsv3_baseline``), so a
benchmark can time both in one process, alternating, on the same weights and the same load."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]


def baseline(rev: str, model) -> SimpleNamespace:
    """The engine classes of revision ``rev`` (a git revision, or a directory holding that revision's
    ``dsv3`` package: a machine without the git history) and its model with ``model``'s weights, dtype and
    device: ``Engine``, ``Params`` (SamplingParams) and ``model``."""
    tmp = tempfile.mkdtemp(prefix="dsv3_baseline_")
    if Path(rev, "dsv3").is_dir():
        shutil.copytree(Path(rev, "dsv3"), Path(tmp, "dsv3_baseline"))
    else:
        archive = subprocess.run(["git", "archive", rev, "src/dsv3"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        os.rename(Path(tmp, "src", "dsv3"), Path(tmp, "dsv3_baseline"))
    sys.path.insert(0, tmp)
    cfg_mod = importlib.import_module("dsv3_baseline.config")
    fields = {k: getattr(model.cfg, k) for k, f in cfg_mod.ModelConfig.__dataclass_fields__.items()
              if f.init and hasattr(model.cfg, k)}
    old = importlib.import_module("dsv3_baseline.model.transformer").Transformer(cfg_mod.ModelConfig(**fields))
    old.load_state_dict(model.state_dict())
    old = old.to(device=model.norm.weight.device, dtype=model.norm.weight.dtype)
    return SimpleNamespace(Engine=importlib.import_module("dsv3_baseline.infer.engine").Engine,
                           Params=importlib.import_module("dsv3_baseline.infer.sampling").SamplingParams,
                           model=old.eval())
