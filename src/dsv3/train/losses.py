"""The training objective (SPEC §1.3–1.4, §2.5): next-token cross-entropy, the MTP term and the
sequence-wise balance loss — one definition, used by the single-process step, every parallel
strategy, the pipeline's last stage and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import balance


def compute_loss(model, inputs: torch.Tensor, targets: torch.Tensor, mtp_lambda: float,
                 balance_alpha: float) -> tuple[torch.Tensor, dict]:
    """Total loss of one micro-batch and its parts. inputs/targets: [B, T + D] (see TokenDataset.batch)."""
    out = model.forward_train(inputs)
    loss, parts = token_loss(out.logits, out.mtp_logits, targets, mtp_lambda)
    bal = routing_balance_loss(out.routing, inputs.shape[0], out.logits.shape[1], balance_alpha)
    if bal is not None:
        parts["balance"] = bal.detach()
        loss = loss + bal
    counts = torch.stack([r.counts for r in out.routing]) if out.routing else None
    return loss, {"parts": parts, "counts": counts}


def token_loss(logits: torch.Tensor, mtp_logits: list, targets: torch.Tensor,
               mtp_lambda: float) -> tuple[torch.Tensor, dict]:
    """Next-token CE + λ · mean MTP CE (depth k predicts targets[:, k:k+T]); also used by the pipeline's
    last stage."""
    T = logits.shape[1]
    V = logits.shape[-1]
    main = F.cross_entropy(logits.reshape(-1, V), targets[:, :T].reshape(-1))
    parts = {"main": main.detach()}
    loss = main
    if mtp_logits:
        mtp = sum(F.cross_entropy(lg.reshape(-1, V), targets[:, k:k + T].reshape(-1))
                  for k, lg in enumerate(mtp_logits, start=1)) / len(mtp_logits)
        parts["mtp"] = mtp.detach()
        loss = loss + mtp_lambda * mtp
    return loss, parts


def routing_balance_loss(routing: list, B: int, T: int, balance_alpha: float):
    """Σ over MoE layers of the sequence-wise balance loss (None when off or no MoE layer); the pipeline
    adds each stage's layers on that stage."""
    if balance_alpha <= 0 or not routing:
        return None
    return sum(balance.sequence_balance_loss(r.scores.view(B, T, -1), r.indices.view(B, T, -1), balance_alpha)
               for r in routing)


def eval_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(sum of the next-token cross-entropy, number of target tokens) of logits [B, T, V] against
    targets [B, ≥T] (the first T columns): evaluation adds these up over batches and ranks."""
    T = logits.shape[1]
    tgt = targets[:, :T]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="sum")
    return float(ce), int((tgt != -100).sum())     # targets of -100 (SFT: non-assistant tokens) carry no loss
