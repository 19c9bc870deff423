"""DeepSeekMoE (SPEC §1.2): the gate, routed experts as a grouped GEMM, shared experts.

Routing, per token (DeepSeek-V3):
    s      = sigmoid(x · Wᵍᵀ)                       affinities, [N, E] (softmax for V2 configs)
    biased = s + b                                  b only steers *selection* (aux-loss-free balancing)
    group score = sum of the top-2 biased affinities inside each of n_group groups
    keep the topk_group best groups, mask the rest to −inf, take the top-k experts
    g      = s[chosen] / Σ s[chosen] · routed_scaling_factor     (gate values from unbiased scores)

Routed experts: the (token, expert) pairs are sorted by expert so every expert sees one contiguous
segment; the experts then run as one grouped GEMM over those segments (``torch._grouped_mm``) or,
where that is slower or unsupported, as one matmul per expert segment — never a loop over tokens.
Which one (``grouped_linear``, backend "auto"):

* CUDA, BF16 (16-byte aligned rows): the grouped GEMM, at every size.
* CPU (FP32/BF16), ``GROUPED_MM_CPU_MIN_ROWS`` … ``GROUPED_MM_CPU_MAX_ROWS`` (token, expert) rows —
  batched decoding: the grouped GEMM, faster there than the loop (its segment offsets stay on the
  device: no host read of the counts, the same ops whatever the routing, as on CUDA). Fewer rows (one
  request decoding) and more (training, prefill): the per-segment loop, which reads the counts on the
  host — harmless on a CPU — and is the faster of the two there (at 2 rows: 41 against 57 µs for the
  ``tiny`` preset's experts, 438 against 592 µs for ``small``'s). Forcing ``backend = "grouped_mm"``
  gives a CPU decode step the GPU's sync-free, fixed shape (what ``tests/test_engine.py`` checks).
* anything else (FP64, FP16, FP32 on CUDA): the per-segment loop.

The per-expert token counts are made without a host sync (a scatter-add, not ``bincount``, which
reads the largest index on the host on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP, at_least_fp32


@dataclass
class Routing:
    indices: torch.Tensor   # [N, k] chosen experts
    weights: torch.Tensor   # [N, k] gate values (fp32)
    scores: torch.Tensor    # [N, E] unbiased affinities (fp32), for the sequence-wise balance loss
    counts: torch.Tensor    # [E] tokens routed to each expert (long)


def route(scores: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1,
          topk_group: int = 1, group_score: str = "top2") -> torch.Tensor:
    """Expert indices [N, top_k] chosen from affinities [N, E] (group-limited when n_group > 1).

    ``group_score``: "top2" (V3: sum of the two best biased affinities of a group) or "max" (V2).
    """
    choice = scores if bias is None else scores + bias
    n, e = choice.shape
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(n, n_group, e // n_group)
        if group_score == "top2":
            gscore = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)
        else:
            gscore = grouped.amax(-1)
        keep = gscore.topk(topk_group, dim=-1).indices                       # [N, topk_group]
        gmask = torch.ones(n, n_group, dtype=torch.bool, device=choice.device).scatter_(1, keep, False)
        choice = grouped.masked_fill(gmask.unsqueeze(-1), float("-inf")).view(n, e)
    return choice.topk(top_k, dim=-1).indices


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.scoring, self.scale, self.norm = cfg.scoring_func, cfg.routed_scaling_factor, cfg.norm_topk_prob
        self.group_score = "top2" if cfg.topk_method == "noaux_tc" else "max"
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Selection bias for auxiliary-loss-free balancing; updated by the trainer, not by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(at_least_fp32(x), at_least_fp32(self.weight))
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        bias = self.e_score_correction_bias if self.group_score == "top2" else None
        idx = route(scores.detach() if scores.requires_grad else scores, bias, self.top_k, self.n_group,
                    self.topk_group, self.group_score)
        w = scores.gather(1, idx)
        if self.norm and self.top_k > 1:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scale != 1.0:                     # × 1.0 would change nothing
            w = w * self.scale
        return Routing(idx, w, scores, expert_counts(idx, scores.shape[1]))


def expert_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E] (long) from indices [N, k]: ``bincount`` without its host sync."""
    flat = idx.flatten()
    return torch.zeros(num_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


# From GROUPED_MM_CPU_MIN_ROWS to GROUPED_MM_CPU_MAX_ROWS expert-sorted rows (tokens × top_k), "auto"
# runs the grouped GEMM on CPU too: the range where it beats the per-segment loop (module doc).
GROUPED_MM_CPU_MIN_ROWS = 16
GROUPED_MM_CPU_MAX_ROWS = 256


class _GroupedMM(torch.autograd.Function):
    """y = segment-wise x_e @ w_eᵀ via torch._grouped_mm, with a grouped backward (works on CPU)."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w, offs=offs) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(dy.t(), x, offs=offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, backend: str = "auto",
                   offs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert x_e @ w_eᵀ over contiguous segments. x [M, K], w [E, N, K], counts [E] → [M, N].
    ``offs``: the segments' ends (``segment_ends(counts)``) where the caller has them already."""
    if backend == "auto":
        backend = "grouped_mm" if _grouped_mm_ok(x, w) else "segments"
    if backend == "grouped_mm":
        return _GroupedMM.apply(x, w, segment_ends(counts) if offs is None else offs)
    if backend != "segments":
        raise ValueError(f"unknown grouped GEMM backend {backend!r} (auto, grouped_mm, segments)")
    outs, at = [], 0
    for e, n in enumerate(counts.tolist()):       # only the experts that have rows (few when decoding)
        if n:
            outs.append(F.linear(x[at:at + n], w[e]))
            at += n
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


def segment_ends(counts: torch.Tensor) -> torch.Tensor:
    """The grouped GEMM's ``offs``: cumulative counts as int32 (on the device, no sync)."""
    return torch.cumsum(counts, 0, dtype=torch.int32)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor, k: int | None = None) -> bool:
    """Whether "auto" takes the grouped GEMM for x [M, k] (k = x.shape[1] unless given) and w [E, N, k]
    (module doc): on CUDA it needs BF16 and 16-byte aligned rows; on CPU (FP32/BF16) it is taken for
    batched-decode-sized inputs (GROUPED_MM_CPU_MIN_ROWS … GROUPED_MM_CPU_MAX_ROWS rows)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.is_cuda:
        k = x.shape[1] if k is None else k
        return x.dtype == torch.bfloat16 and k % 8 == 0 and w.shape[1] % 8 == 0
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and GROUPED_MM_CPU_MIN_ROWS <= x.shape[0] <= GROUPED_MM_CPU_MAX_ROWS)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: w13 [E, 2I, d] (gate ‖ up), w2 [E, d, I]."""

    def __init__(self, num_experts: int, dim: int, inter: int):
        super().__init__()
        self.num_experts, self.dim, self.inter = num_experts, dim, inter
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, inter))
        self.backend = "auto"

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: tokens grouped by expert (segment e has counts[e] rows) → [M, d]."""
        dtype = x_sorted.dtype
        w13 = self.w13 if self.w13.dtype is dtype else self.w13.to(dtype)
        w2 = self.w2 if self.w2.dtype is dtype else self.w2.to(dtype)
        backend = self.backend
        if backend == "auto":                     # decided once for both GEMMs: both must suit it
            ok = _grouped_mm_ok(x_sorted, w13) and _grouped_mm_ok(x_sorted, w2, k=self.inter)
            backend = "grouped_mm" if ok else "segments"
        offs = segment_ends(counts) if backend == "grouped_mm" else None
        gate, up = grouped_linear(x_sorted, w13, counts, backend, offs).split(self.inter, dim=-1)
        return grouped_linear(F.silu(gate) * up, w2, counts, backend, offs)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, stats: list | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = self.gate(flat)
        if stats is not None:
            stats.append(r)
        y = combine(self.experts, flat, r)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)


def combine(experts: GroupedExperts, flat: torch.Tensor, r: Routing) -> torch.Tensor:
    """Σ_k g_k · expert_{i_k}(x) for every token, through an expert-sorted grouped GEMM."""
    k = r.indices.shape[1]
    order = r.indices.flatten().argsort(stable=True)        # (token, slot) pairs sorted by expert
    token = order // k
    y = experts(flat.index_select(0, token), r.counts)
    g = r.weights.flatten().index_select(0, order).unsqueeze(1)
    y = y * (g if g.dtype is y.dtype else g.to(y.dtype))
    return torch.zeros_like(flat).index_add_(0, token, y if y.dtype is flat.dtype else y.to(flat.dtype))
