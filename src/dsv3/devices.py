"""Host → device transfers that do not stall the host."""

from __future__ import annotations

import torch


def upload(values: list[int], device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A 1-D tensor of ``values`` on ``device``. To a GPU it goes from pinned memory without blocking the
    host: a plain ``torch.tensor(values, device=…)`` (or ``.to(device)`` of a pageable tensor) waits for
    the copy, and so for all the work queued before it. PyTorch's pinned-memory cache reuses a block
    only after the copy that used it has completed."""
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)
