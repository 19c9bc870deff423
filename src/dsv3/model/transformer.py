"""The DeepSeek-V3 network: embedding → blocks (dense FFN first, then MoE) → norm → head,
plus D multi-token-prediction modules sharing the embedding and head (SPEC §1.4).

``model(tokens)`` gives next-token logits; ``model.forward_train(tokens)`` also gives the MTP logits
and every MoE layer's routing (per-expert token counts, affinities) for load balancing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .layers import MLP, RMSNorm, at_least_fp32, init_weights
from .mla import MLA, LatentCache
from .moe import MoE, Routing
from .rope import precompute_freqs_cis


class Block(nn.Module):
    """Pre-norm transformer block: x + MLA(norm(x)), then h + FFN(norm(h)) (dense or MoE)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.is_moe = moe

    def forward(self, x, freqs_cis, cache=None, start_pos=0, stats=None, recompute=False):
        if recompute and self.training and cache is None:
            # Keep neither the RMSNorm output nor the up-projected q/k/v: both are recomputed
            # from the block input in backward, together with the attention core they feed.
            o = checkpoint(self._normed_attention_core, x, freqs_cis, use_reentrant=False)
            h = x + self.self_attn.o_proj(o)
        else:
            h = x + self.self_attn(self.input_layernorm(x), freqs_cis, cache, start_pos)
        y = self.post_attention_layernorm(h)
        y = self.mlp(y, stats) if self.is_moe else self.mlp(y)
        return h + y

    def _normed_attention_core(self, x, freqs_cis):
        return self.self_attn.core(self.input_layernorm(x), freqs_cis)


class MTPModule(Block):
    """Multi-token prediction depth k: h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]) → block.

    The released weights concatenate [embedding; hidden] (the paper's text has the reverse).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, moe=cfg.n_routed_experts > 0)
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward_mtp(self, h_prev, emb_next, freqs_cis, stats=None, recompute=False, cache=None, start_pos=0):
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return super().forward(h, freqs_cis, cache, start_pos, stats, recompute)


@dataclass
class TrainOutput:
    logits: torch.Tensor                                   # [B, T, V] next-token logits
    mtp_logits: list = field(default_factory=list)         # D × [B, T, V]; depth k predicts t_{i+k+1}
    routing: list = field(default_factory=list)            # one Routing per MoE layer (main, then MTP)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        L = cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, cfg.is_moe_layer(i)) for i in range(L))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        self.recompute = False   # recompute RMSNorm + MLA up-projections in backward (SPEC §2.4)
        self._freqs = torch.empty(0, dtype=torch.complex64)
        init_weights(self, cfg.initializer_range)

    # ------------------------------------------------------------------ helpers
    def freqs_cis(self, start, length: int, device, start_max: int | None = None) -> torch.Tensor:
        """[length, rope/2] for positions start …; [B, length, rope/2] for per-row starts (LongTensor [B]).
        With per-row starts, positions past ``max_position_embeddings`` (the padding of a row shorter than
        ``length`` near the end of the context) take the last position's entry. ``start_max``: the largest
        per-row start when the caller knows it on the host (else it is read from ``start``: a sync on a GPU)."""
        if isinstance(start, torch.Tensor):
            start = start.to(device)
            top = int(start.max()) if start_max is None else start_max
            if length == 1:
                return self.freqs_cis(0, top + 1, device)[start[:, None]]
            end = min(top + length, self.cfg.max_position_embeddings)
            pos = start[:, None] + torch.arange(length, device=device)
            return self.freqs_cis(0, end, device)[pos.clamp(max=end - 1)]
        end = start + length
        if end > self.cfg.max_position_embeddings:
            raise ValueError(f"positions up to {end} exceed max_position_embeddings "
                             f"({self.cfg.max_position_embeddings})")
        if self._freqs.shape[0] < end or self._freqs.device != torch.device(device):
            n = min(max(end, 2 * self._freqs.shape[0], 256), self.cfg.max_position_embeddings)
            self._freqs = precompute_freqs_cis(self.cfg, n, device=device)
        return self._freqs[start:end]

    def moe_layers(self) -> list[nn.Module]:
        """The MoE modules in the order ``forward_train`` reports their routing."""
        blocks = [b for b in self.layers if b.is_moe] + [m for m in self.mtp if m.is_moe]
        return [b.mlp for b in blocks]

    def moe_layer_names(self) -> list[str]:
        """Names of ``moe_layers()``: "layer i" for the trunk, "MTP k" for the MTP blocks."""
        return ([f"layer {i}" for i, b in enumerate(self.layers) if b.is_moe]
                + [f"MTP {k}" for k, m in enumerate(self.mtp, start=1) if m.is_moe])

    def new_cache(self, batch_size: int, max_len: int, dtype=None, mtp: bool = False) -> LatentCache:
        """A latent cache for the trunk's layers, and for the MTP modules too with ``mtp=True``
        (speculative decoding: the MTP blocks attend over their own past positions)."""
        p = self.norm.weight
        layers = self.cfg.num_hidden_layers + (len(self.mtp) if mtp else 0)
        return LatentCache(self.cfg, batch_size, max_len, layers, p.device, dtype or p.dtype)

    def _trunk(self, tokens, start_pos=0, cache=None, stats=None):
        T = tokens.shape[1]
        freqs = self.freqs_cis(start_pos, T, tokens.device, getattr(cache, "start_max", None))
        h = self.embed_tokens(tokens)
        for block in self.layers:
            h = block(h, freqs, cache, start_pos, stats, self.recompute)
        return h, freqs

    # ------------------------------------------------------------------ entry points
    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0,
                cache: LatentCache | None = None) -> torch.Tensor:
        """tokens [B, T] → logits [B, T, V] (fp32; fp64 for an fp64 model). With a cache, positions start
        at ``start_pos``: an int, or a LongTensor [B] when the rows are at different positions."""
        _check_tokens(tokens, self.cfg.vocab_size)
        h, _ = self._trunk(tokens, start_pos, cache)
        return at_least_fp32(self.lm_head(self.norm(h)))

    def forward_hidden(self, tokens: torch.Tensor, start_pos: int = 0,
                       cache: LatentCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``forward`` but also returns the last block's output h [B, T, d] (before the final
        norm): the input of the first MTP module."""
        _check_tokens(tokens, self.cfg.vocab_size)
        h, _ = self._trunk(tokens, start_pos, cache)
        return at_least_fp32(self.lm_head(self.norm(h))), h

    def forward_mtp(self, hidden: torch.Tensor, next_tokens: torch.Tensor, start_pos: int = 0,
                    cache: LatentCache | None = None, depth: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module ``depth`` at positions start_pos … start_pos+T−1: ``hidden`` [B, T, d] are the
        previous depth's outputs there (the trunk's for depth 1) and ``next_tokens`` [B, T] the tokens
        that follow each position (t_{i+depth}). Returns (logits for t_{i+depth+1} [B, T, V], the
        module's output h [B, T, d]). With a cache made by ``new_cache(..., mtp=True)``."""
        if not 1 <= depth <= len(self.mtp):
            raise ValueError(f"MTP depth {depth}: the model has {len(self.mtp)} MTP module(s)")
        _check_tokens(next_tokens, self.cfg.vocab_size)
        if next_tokens.shape != hidden.shape[:2]:
            raise ValueError(f"next_tokens {tuple(next_tokens.shape)} must match hidden {tuple(hidden.shape[:2])}")
        module = self.mtp[depth - 1]
        freqs = self.freqs_cis(start_pos, hidden.shape[1], hidden.device, getattr(cache, "start_max", None))
        h = module.forward_mtp(hidden, self.embed_tokens(next_tokens), freqs, cache=cache, start_pos=start_pos)
        return at_least_fp32(self.lm_head(module.shared_head.norm(h))), h

    def forward_train(self, tokens: torch.Tensor) -> TrainOutput:
        """tokens [B, T + D] (D = MTP depth): main logits over the first T positions, MTP depth k
        reading Emb(tokens[:, k : k+T]). Targets: main tokens[1:T+1] of the window, depth k
        tokens[k+1 : k+1+T] (so the data window holds T + 1 + D tokens)."""
        _check_tokens(tokens, self.cfg.vocab_size)
        D = len(self.mtp)
        T = tokens.shape[1] - D
        if T < 1:
            raise ValueError(f"forward_train needs more than D={D} tokens per row, got {tokens.shape[1]}")
        routing: list[Routing] = []
        h, freqs = self._trunk(tokens[:, :T], stats=routing)
        out = TrainOutput(at_least_fp32(self.lm_head(self.norm(h))), [], routing)
        for k, module in enumerate(self.mtp, start=1):
            emb = self.embed_tokens(tokens[:, k:k + T])
            h = module.forward_mtp(h, emb, freqs, stats=routing, recompute=self.recompute)
            out.mtp_logits.append(at_least_fp32(self.lm_head(module.shared_head.norm(h))))
        return out


def _check_tokens(tokens: torch.Tensor, vocab: int) -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"tokens must be an integer tensor [batch, seq], got {tuple(tokens.shape)} {tokens.dtype}")
