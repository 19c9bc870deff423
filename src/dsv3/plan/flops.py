"""Per-token work of a DeepSeek-V3-family model: every Linear, the attention core, MTP (SPEC §1).

FLOP conventions (per token):
- a Linear ``k → n`` costs ``2·k·n`` forward, ``2·k·n`` for the input gradient (Dgrad) and ``2·k·n``
  for the weight gradient (Wgrad). Only *activated* weights count: a MoE layer runs its
  ``num_experts_per_tok`` routed experts and its shared experts for a token, not all 256.
- the attention core of MLA (training / prefill form, keys and values materialised per head) costs
  ``2·H·(qk_head_dim + v_head_dim)·ctx`` forward: scores use ``qk_head_dim`` (nope + rope = 192),
  the weighted sum of values ``v_head_dim`` (128). With a causal mask a token at position ``i`` sees
  ``i`` keys, so over a sequence of ``s`` tokens ``ctx`` averages ``(s + 1) / 2`` (the causal halving).
  Its backward is counted as 2x forward for MFU (the model's FLOPs); the planner's timing uses the
  FlashAttention recomputation ratio instead (``Assumptions.flash_backward_flops_ratio``).
- MTP (D modules): the projection ``eh_proj`` (2d → d), one MoE block, and another pass through the
  shared output head. The embedding lookup is not a matmul and costs no FLOPs.
- Model FLOPs per token = 3 x forward (forward + backward), the convention of MFU.

Parameter *counts* come from :mod:`dsv3.params`; this module only lists the Linear shapes (which the
FLOPs need) and derives the rest (norms) from those counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from ..params import count_parameters, layer_params

FP8_BLOCK = 128  # weights: one FP32 scale per 128x128 block (SPEC §2.3)


@dataclass(frozen=True)
class Linear:
    name: str
    k: int                    # input features
    n: int                    # output features
    per_token: float = 1.0    # passes per token (routed experts: num_experts_per_tok)
    instances: int = 1        # weight matrices of this shape in the block (routed experts: n_routed)
    fp8: bool = True          # FP8 in an FP8 run (all Linears but the gate and the output head)
    routed: bool = False      # a routed-expert weight, sharded over expert parallelism
    up_projection: bool = False  # an MLA up-projection (recomputed in backward by the report)

    @property
    def params(self) -> int:
        return self.k * self.n * self.instances

    @property
    def fwd_flops(self) -> float:
        """Forward FLOPs per token."""
        return 2.0 * self.k * self.n * self.per_token


def attention_linears(cfg: ModelConfig) -> list[Linear]:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    out = []
    if cfg.q_lora_rank:
        out += [Linear("wq_a", d, cfg.q_lora_rank),
                Linear("wq_b", cfg.q_lora_rank, h * cfg.qk_head_dim, up_projection=True)]
    else:
        out += [Linear("wq", d, h * cfg.qk_head_dim)]
    out += [Linear("wkv_a", d, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
            Linear("wkv_b", cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), up_projection=True),
            Linear("wo", h * cfg.v_head_dim, d)]
    return out


def ffn_linears(cfg: ModelConfig, moe: bool) -> list[Linear]:
    d = cfg.hidden_size
    if not moe:
        inter = cfg.intermediate_size
        return [Linear("ffn.w13", d, 2 * inter), Linear("ffn.w2", inter, d)]
    i, k, e, ns = cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.n_shared_experts
    out = [Linear("gate", d, e, fp8=False),
           Linear("experts.w13", d, 2 * i, per_token=k, instances=e, routed=True),
           Linear("experts.w2", i, d, per_token=k, instances=e, routed=True)]
    if ns:
        out += [Linear("shared.w13", d, 2 * i * ns), Linear("shared.w2", i * ns, d)]
    return out


def attention_core_fwd_flops(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of one layer's attention core (scores + weighted values)."""
    ctx = (seq_len + 1) / 2 if causal else seq_len
    return 2.0 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * ctx


@dataclass
class Block:
    """One pipeline-placeable unit: a transformer layer, an MTP module, or embedding/head pieces."""

    kind: str                       # "dense" | "moe" | "mtp"
    index: int                      # layer index (MTP: num_hidden_layers + k)
    linears: list[Linear]
    other_params: int               # norms etc. (everything that is not a Linear weight)
    attn_fwd_flops: float           # attention core, per token
    has_moe: bool = False
    head_passes: int = 0            # MTP modules run the shared output head once more

    @property
    def params(self) -> int:
        return sum(l.params for l in self.linears) + self.other_params

    def gemm_fwd_flops(self, *, fp8: bool | None = None, routed: bool | None = None,
                       up_projection: bool | None = None) -> float:
        return sum(l.fwd_flops for l in self.linears
                   if (fp8 is None or l.fp8 == fp8) and (routed is None or l.routed == routed)
                   and (up_projection is None or l.up_projection == up_projection))


def make_block(cfg: ModelConfig, kind: str, index: int, seq_len: int) -> Block:
    # an MTP module's block is a MoE block unless the model has no routed experts (as params.py counts)
    moe = kind == "moe" or (kind == "mtp" and cfg.n_routed_experts > 0)
    lins = attention_linears(cfg) + ffn_linears(cfg, moe)
    total_params = layer_params(cfg, moe)[0]
    if kind == "mtp":
        d = cfg.hidden_size
        lins = [Linear("eh_proj", 2 * d, d)] + lins
        total_params = count_parameters(cfg)["mtp_own"] // cfg.num_nextn_predict_layers
    other = total_params - sum(l.params for l in lins)
    if other < 0:  # pragma: no cover - the shapes above and params.py disagree
        raise AssertionError(f"Linear shapes exceed params.py's count for a {kind} block")
    return Block(kind, index, lins, other, attention_core_fwd_flops(cfg, seq_len), has_moe=moe,
                 head_passes=1 if kind == "mtp" else 0)


def model_blocks(cfg: ModelConfig, seq_len: int, include_mtp: bool = True) -> list[Block]:
    """The layers in pipeline order, then the MTP modules (which need the output head: last stage)."""
    blocks = [make_block(cfg, "moe" if cfg.is_moe_layer(i) else "dense", i, seq_len)
              for i in range(cfg.num_hidden_layers)]
    if include_mtp:
        blocks += [make_block(cfg, "mtp", cfg.num_hidden_layers + k, seq_len)
                   for k in range(cfg.num_nextn_predict_layers)]
    return blocks


def head_linear(cfg: ModelConfig) -> Linear:
    return Linear("head", cfg.hidden_size, cfg.vocab_size, fp8=False)


@dataclass
class TokenWork:
    """Forward FLOPs per token by kind of work, and the model FLOPs (3x forward) per token."""

    seq_len: int
    gemm_fp8_capable: float      # Linears that run in FP8 in an FP8 run
    gemm_bf16_only: float        # gate and output head(s): BF16 in every run
    attention: float             # attention cores
    up_projection: float         # part of gemm_fp8_capable: MLA up-projections (recomputed)
    routed: float                # part of gemm_fp8_capable: routed experts
    per_linear: dict = field(default_factory=dict)   # name -> forward FLOPs per token (all layers)

    @property
    def forward(self) -> float:
        return self.gemm_fp8_capable + self.gemm_bf16_only + self.attention

    @property
    def model_flops(self) -> float:
        """Forward + backward (2x forward) per token: the numerator of MFU."""
        return 3.0 * self.forward

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "forward": self.forward, "model_flops_per_token": self.model_flops,
                "forward_breakdown": {"fp8_capable_linears": self.gemm_fp8_capable,
                                      "bf16_linears (gate, head)": self.gemm_bf16_only,
                                      "attention_core": self.attention,
                                      "of which routed experts": self.routed,
                                      "of which MLA up-projections": self.up_projection},
                "forward_per_linear": dict(self.per_linear)}


def token_work(cfg: ModelConfig, seq_len: int, include_mtp: bool = True) -> TokenWork:
    """Forward FLOPs of one token through the whole model (all layers, head, and MTP if included)."""
    tw = TokenWork(seq_len, 0.0, 0.0, 0.0, 0.0, 0.0)
    head = head_linear(cfg)
    blocks = model_blocks(cfg, seq_len, include_mtp)
    for b in blocks:
        for lin in b.linears:
            key = f"{b.kind}.{lin.name}"
            tw.per_linear[key] = tw.per_linear.get(key, 0.0) + lin.fwd_flops
        tw.gemm_fp8_capable += b.gemm_fwd_flops(fp8=True)
        tw.gemm_bf16_only += b.gemm_fwd_flops(fp8=False) + b.head_passes * head.fwd_flops
        tw.routed += b.gemm_fwd_flops(routed=True)
        tw.up_projection += b.gemm_fwd_flops(up_projection=True)
        tw.attention += b.attn_fwd_flops
    tw.gemm_bf16_only += head.fwd_flops
    tw.per_linear["head"] = head.fwd_flops * (1 + sum(b.head_passes for b in blocks))
    return tw


def fp8_weight_bytes(n_params: float) -> float:
    """Bytes of FP8 weights with one FP32 scale per 128x128 block."""
    return n_params * (1.0 + 4.0 / (FP8_BLOCK * FP8_BLOCK))


def parameter_bytes(cfg: ModelConfig) -> dict:
    """Parameter counts (from :func:`dsv3.count_parameters`) and their bytes per storage precision.

    ``fp8`` is the released-checkpoint layout (SPEC §1.5): every Linear but the gate and the head in
    FP8 with 128x128 block scales, embedding / head / gate / norms in BF16.
    """
    counts = count_parameters(cfg)
    blocks = model_blocks(cfg, seq_len=1, include_mtp=False)
    fp8_main = sum(l.params for b in blocks for l in b.linears if l.fp8)
    mtp_blocks = model_blocks(cfg, 1)[len(blocks):]
    fp8_mtp = sum(l.params for b in mtp_blocks for l in b.linears if l.fp8)

    def by_precision(total: int, fp8_part: int) -> dict:
        return {"params": total, "bf16_bytes": 2 * total, "fp32_bytes": 4 * total,
                "fp8_bytes": fp8_weight_bytes(fp8_part) + 2 * (total - fp8_part),
                "fp8_linear_params": fp8_part}

    return {"counts": counts,
            "main": by_precision(counts["total"], fp8_main),
            "with_mtp": by_precision(counts["total_with_mtp"], fp8_main + fp8_mtp)}
