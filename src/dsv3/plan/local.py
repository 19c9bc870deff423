"""Memory of a run on *this* machine, checked before anything is allocated (``dsv3 train``, ``generate``,
``serve``): the planner's formulas (parameter counts, per-token activation bytes of every block) applied to
how dsv3's PyTorch implementation stores things — FP32 master weights and gradients, AdamW's two moments,
activations in the compute dtype without the report's FP8 caching or recomputation (unless ``--recompute``),
and full logits for the cross-entropy of the main head and every MTP depth.

The estimate is a floor, not a promise: a run it passes can still run out of memory, but a run it refuses
would certainly have (``--memory-limit GB`` overrides what counts as available).
"""

from __future__ import annotations

import os

from ..config import ModelConfig
from ..errors import UserError
from ..params import count_parameters
from .activations import block_activation_bytes, block_transient_bytes, head_activation_bytes
from .flops import model_blocks

GB = 1e9


def training_bytes(cfg: ModelConfig, *, batch_size: int, seq_len: int, grad_accum: int = 1, world: int = 1,
                   pp: int = 1, ep: int = 1, bf16: bool = False, bf16_moments: bool = False,
                   recompute: bool = False) -> dict[str, float]:
    """Bytes per rank by part: weights, gradients, optimizer moments, activations, logits."""
    c = count_parameters(cfg)
    params = c["total"] + c["mtp_own"]
    expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size * cfg.n_routed_experts * (
        cfg.num_moe_layers + (cfg.num_nextn_predict_layers if cfg.n_routed_experts else 0))
    local = (params - expert) / pp + expert / (pp * ep)
    dp = max(world // (pp * ep), 1) if ep == 1 else max(world // pp, 1)
    moments = (4 if bf16_moments else 8) * local / (dp if world > 1 else 1)     # ZeRO-1 shards them
    D = cfg.num_nextn_predict_layers
    tokens = max(batch_size // max(world // pp, 1) // grad_accum, 1) * seq_len
    scale = 1.0 if bf16 else 2.0          # the planner counts BF16 values; fp32 activations take twice that
    blocks = model_blocks(cfg, seq_len)
    kept = sum(sum(block_activation_bytes(cfg, b, fp8=False, recompute="report" if recompute else "none").values())
               for b in blocks) / pp
    transient = max(block_transient_bytes(cfg, b) for b in blocks)
    acts = tokens * (scale * (kept + transient) + head_activation_bytes(cfg) * (1 + D))
    logits = tokens * (1 + D) * cfg.vocab_size * 4 * 3 / pp   # fp32 logits, log-softmax and their gradient
    return {"weights": 4 * local, "gradients": 4 * local, "optimizer moments": moments,
            "activations": acts, "logits": logits}


def inference_bytes(cfg: ModelConfig, *, fp8_kept: bool, experts: int | None = None) -> float:
    """Bytes of the weights as ``load_pretrained`` holds them (FP32, or E4M3 + scales for kept FP8);
    ``experts``: routed experts per MoE layer this process holds (an expert-parallel rank's slots)."""
    from ..commands.info import weight_bytes

    return (weight_bytes(cfg, fp8=True, experts=experts) if fp8_kept
            else 2 * weight_bytes(cfg, fp8=False, experts=experts))


def available_bytes(device) -> tuple[float, str]:
    """(bytes free for this process, what was measured) on ``device`` (a torch.device)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"free on {device}"
    avail = _meminfo_available()
    limit = _cgroup_free()
    if limit is not None and (avail is None or limit < avail):
        avail, what = limit, "left under this container's memory limit"
    else:
        what = "available RAM"
    if avail is None:
        return float("inf"), "unknown"
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if ranks > 1:
        return avail / ranks, f"{what} / {ranks} ranks on this machine"
    return avail, what


def _meminfo_available() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_free() -> float | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = float(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else float(limit) - used


def check_fits(parts: dict[str, float], device, memory_limit_gb: float | None, what: str) -> None:
    """A UserError with the estimate when ``parts`` exceed the memory available (or ``--memory-limit``)."""
    need = sum(parts.values())
    if memory_limit_gb is not None:
        have, measured = memory_limit_gb * GB, "--memory-limit"
    else:
        have, measured = available_bytes(device)
    if need <= have:
        return
    detail = " + ".join(f"{k} {v / GB:,.2f}" for k, v in parts.items() if v)
    have_text = (f"--memory-limit is {have / GB:,.2f} GB" if memory_limit_gb is not None
                 else f"{have / GB:,.2f} GB are {measured}")
    raise UserError(f"{what} needs about {need / GB:,.2f} GB ({detail}) but {have_text}; use a smaller model, "
                    f"batch or --seq-len, or pass --memory-limit GB to override the check")
