"""Multi-head Latent Attention (SPEC §1.1), training/prefill form with a compressed latent cache.

Shapes (DeepSeek-V3): d=7168, H=128, q_lora 1536, kv_lora 512, qk_nope 128, qk_rope 64, v 128.

    q      = q_b(norm(q_a(x)))                       [B, T, H, 128+64]   (or q_proj(x) without q-LoRA)
    c_kv, k_pe = kv_a(x)                             [B, T, 512], [B, T, 64] (one RoPE key for all heads)
    k_nope, v  = kv_b(norm(c_kv))                    [B, S, H, 128], [B, S, H, 128]
    out    = o(softmax(q·k / sqrt(192) · mscale²) v)  [B, T, d]

Only ``norm(c_kv)`` and the rotated ``k_pe`` are cached for decoding: 576 values per token per layer.

Two ways to attend against that cache (``MLA.attn_impl``):

* naive:    up-project every cached latent through ``kv_b`` to per-head k_nope and v, then attend.
* absorbed: fold ``kv_b`` into the query and the output instead (SPEC §1.1). With W_uk, W_uv the
  k_nope and v halves of ``kv_b`` [H, 128, 512]:
      q_lat = q_nope · W_uk                       [B, H, T, 512]
      score = q_lat · c_kvᵀ + q_pe · k_peᵀ        [B, H, T, S]   (the latent acts as a 1-head key)
      o     = (softmax(score) · c_kv) · W_uvᵀ     [B, T, H, 128]
  Nothing of size S×H is ever formed, so a decode step reads the 576-value cache and no more.
  "auto" (default) picks whichever needs fewer multiply-adds for the given T and S: absorbed for
  decoding and speculative verification, naive for long prefills.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, at_least_fp32
from .rope import apply_rope


class LatentCache:
    """Per-layer cache of the normalised KV latent and the rotated RoPE key (the MLA cache).

    ``kv`` [layers, batch, max_len, kv_lora_rank], ``pe`` [layers, batch, max_len, rope]. A forward
    over B rows uses cache rows 0 … B−1; ``rows(a, b)`` is a view of rows a … b−1 (writes go through),
    so one cache can hold independent sequences (the batched engine, :mod:`dsv3.infer.engine`).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, num_layers: int,
                 device=None, dtype=torch.float32):
        self.max_len = max_len
        self.kv = torch.zeros(num_layers, batch_size, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.pe = torch.zeros(num_layers, batch_size, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)

    def rows(self, start: int, end: int) -> "LatentCache":
        view = object.__new__(LatentCache)
        view.max_len, view.kv, view.pe = self.max_len, self.kv[:, start:end], self.pe[:, start:end]
        return view

    def update(self, layer: int, start, kv: torch.Tensor, pe: torch.Tensor):
        """Write kv/pe [B, T, ·] at positions start … start+T−1 (``start`` an int, or a LongTensor [B]
        of per-row positions); return the cached [B, S, ·] up to the furthest position written."""
        B, T = kv.shape[:2]
        if isinstance(start, torch.Tensor):
            end = int(start.max()) + T
            if end > self.max_len or int(start.min()) < 0:
                raise ValueError(f"cache holds {self.max_len} positions, asked to write up to {end}")
            pos = start.to(self.kv.device)[:, None] + torch.arange(T, device=self.kv.device)
            rows = torch.arange(B, device=self.kv.device)[:, None].expand(B, T)
            self.kv[layer, rows, pos] = kv.to(self.kv.dtype)
            self.pe[layer, rows, pos] = pe.to(self.pe.dtype)
        else:
            end = start + T
            if end > self.max_len:
                raise ValueError(f"cache holds {self.max_len} positions, asked to write up to {end}")
            self.kv[layer, :B, start:end] = kv
            self.pe[layer, :B, start:end] = pe
        return self.kv[layer, :B, :end], self.pe[layer, :B, :end]

    def bytes_per_token(self) -> int:
        return self.kv.shape[0] * (self.kv.shape[-1] + self.pe.shape[-1]) * self.kv.element_size()


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, linear: type[nn.Module] = nn.Linear):
        super().__init__()
        self.layer_idx = layer_idx
        self.h = cfg.num_attention_heads
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        d, qk = cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = linear(cfg.q_lora_rank, self.h * qk, bias=False)
        else:
            self.q_proj = linear(d, self.h * qk, bias=False)
        self.kv_a_proj_with_mqa = linear(d, self.kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.kv_b_proj = linear(self.kv_rank, self.h * (self.nope + self.vdim), bias=False)
        self.o_proj = linear(self.h * self.vdim, d, bias=False)
        self.has_q_lora = bool(cfg.q_lora_rank)
        self.attn_impl = "auto"          # "auto" | "naive" | "absorbed" (used only with a cache)

    def use_absorbed(self, T: int, S: int) -> bool:
        """Whether T queries against S cached positions take the absorbed path (see module doc)."""
        if self.attn_impl not in ("auto", "naive", "absorbed"):
            raise ValueError(f"attn_impl = {self.attn_impl!r}: expected 'auto', 'naive' or 'absorbed'")
        if self.attn_impl != "auto":
            return self.attn_impl == "absorbed"
        r, n, v, pe = self.kv_rank, self.nope, self.vdim, self.rope
        naive = S * r * (n + v) + T * S * (n + pe + v)          # per head: expand the cache, attend
        absorbed = T * r * (n + v) + T * S * (2 * r + pe)       # per head: fold W_uk/W_uv, attend in latent
        return absorbed < naive

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: LatentCache | None = None,
                start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """x: [B, T, d] at positions start_pos … start_pos+T−1; freqs_cis: [T, rope/2]. With a cache,
        ``start_pos`` may be a LongTensor [B] (rows at different positions; freqs_cis [B, T, rope/2])."""
        return self.o_proj(self.core(x, freqs_cis, cache, start_pos))

    def core(self, x, freqs_cis, cache=None, start_pos=0):
        """Everything but the output projection: [B, T, d] → [B, T, H·v]."""
        B, T, _ = x.shape
        if self.has_q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, T, self.h, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, freqs_cis)

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe, freqs_cis)                       # [B, T, rope], shared by all heads
        if cache is not None:
            if getattr(cache, "uses_kernel", False) and self.use_absorbed(T, cache.end):
                cache.write(self.layer_idx, c_kv, k_pe)        # a paged cache on GPU: the kernel reads the blocks
                w_uk, w_uv = self._w_uk_uv(q_nope.dtype)
                o_lat = cache.attend(self.layer_idx, self._absorb_query(q_nope, w_uk), q_pe, self.scale)
                return self._absorbed_output(o_lat, w_uv)
            c_kv, k_pe = cache.update(self.layer_idx, start_pos, c_kv, k_pe)
            if self.use_absorbed(T, c_kv.shape[1]):
                return self._absorbed_attention(q_nope, q_pe, c_kv, k_pe, cache, start_pos)
        S = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, S, self.h, self.nope + self.vdim)
        k_nope, v = kv.split([self.nope, self.vdim], dim=-1)

        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)                         # [B, H, T, 192]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, self.h, self.rope)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)                                                          # [B, H, S, 128]
        pad = q.shape[-1] - self.vdim
        if pad > 0:  # fused (flash) SDPA kernels need one head dim: zero columns leave o unchanged
            v = F.pad(v, (0, pad))
        if isinstance(start_pos, torch.Tensor):         # rows at their own positions (a batched cache)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(cache, start_pos, T, S, x.device),
                                               scale=self.scale)
        elif T == S:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        elif T == 1:
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(cache, start_pos, T, S, x.device),
                                               scale=self.scale)
        if pad > 0:
            o = o[..., : self.vdim]
        return o.transpose(1, 2).reshape(B, T, self.h * self.vdim)

    def _absorbed_attention(self, q_nope, q_pe, c_kv, k_pe, cache, start_pos):
        """Attention directly against the latent cache. q_nope [B, T, H, nope], q_pe [B, T, H, rope],
        c_kv [B, S, r], k_pe [B, S, rope] → [B, T, H·v]."""
        T, S = q_nope.shape[1], c_kv.shape[1]
        visible = None
        if T > 1 or isinstance(start_pos, torch.Tensor):
            visible = _visible(cache, start_pos, T, S, c_kv.device)                # [B, 1, T, S], [T, S] or None
        if visible is not None:
            visible = visible.transpose(1, 2) if visible.dim() == 4 else visible[:, None]   # → [·, T, 1, S]
        w_uk, w_uv = self._w_uk_uv(q_nope.dtype)
        o_lat = latent_attention(self._absorb_query(q_nope, w_uk), q_pe, c_kv, k_pe, self.scale, visible)
        return self._absorbed_output(o_lat, w_uv)

    def _w_uk_uv(self, dtype):
        """The k_nope and v halves of ``kv_b_proj`` as [H, nope, r] and [H, v, r]."""
        w = self.kv_b_proj.weight
        w = (w if w.dtype is dtype else w.to(dtype)).view(self.h, self.nope + self.vdim, self.kv_rank)
        return w[:, : self.nope], w[:, self.nope:]

    def _absorb_query(self, q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
        """q_nope [B, T, H, nope] → q_nope · W_uk [B, T, H, r] (one batched matmul over the heads)."""
        B, T = q_nope.shape[:2]
        q = q_nope.permute(2, 0, 1, 3).reshape(self.h, B * T, self.nope)                # [H, B·T, nope]
        return torch.bmm(q, w_uk).view(self.h, B, T, -1).permute(1, 2, 0, 3)

    def _absorbed_output(self, o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
        """o_lat [B, T, H, r] → [B, T, H·v] through W_uv."""
        B, T = o_lat.shape[:2]
        o = o_lat.permute(2, 0, 1, 3).reshape(self.h, B * T, self.kv_rank)              # [H, B·T, r]
        o = torch.bmm(o, w_uv.transpose(1, 2))                                          # [H, B·T, v]
        return o.view(self.h, B, T, self.vdim).permute(1, 2, 0, 3).reshape(B, T, self.h * self.vdim)


def latent_attention(q_lat, q_pe, c_kv, k_pe, scale: float, visible=None) -> torch.Tensor:
    """Attention with the latent as one key/value head shared by every query head (absorbed MLA):
    softmax(scale · (q_lat·c_kvᵀ + q_pe·k_peᵀ)) · c_kv.

    q_lat [B, T, H, r], q_pe [B, T, H, rope], c_kv [B, S, r], k_pe [B, S, rope]; ``visible``: None
    or bool broadcasting to [B, T, H, S] (key visible to query) → o_lat [B, T, H, r]. A row's T·H
    queries are the rows of one matrix product against its cache (nothing of size H×S is copied);
    scores in the input dtype, the softmax in ≥ fp32, probabilities cast back."""
    B, T, H, r = q_lat.shape
    S = c_kv.shape[1]
    score = torch.bmm(q_pe.reshape(B, T * H, -1), k_pe.transpose(1, 2))              # [B, T·H, S]
    score = torch.baddbmm(score, q_lat.reshape(B, T * H, r), c_kv.transpose(1, 2))    # + q_lat·c_kvᵀ
    score = at_least_fp32(score) * scale
    if visible is not None:
        score = torch.where(visible, score.view(B, T, H, S), float("-inf"))
    p = score.softmax(-1)
    if p.dtype is not c_kv.dtype:
        p = p.to(c_kv.dtype)
    return torch.bmm(p.view(B, T * H, S), c_kv).view(B, T, H, r)


def _visible(cache, start_pos, T: int, S: int, device) -> torch.Tensor:
    """``_chunk_mask(start_pos, T, S)``. A per-forward cache view (one with a ``masks`` dict, e.g.
    :class:`dsv3.infer.paged_cache.PagedView`) keeps it, so the layers of a forward build it once;
    None (no mask) when the view says every key it holds is visible to every query (``unmasked``)."""
    if getattr(cache, "unmasked", False):
        return None
    masks = getattr(cache, "masks", None)
    if masks is None:
        return _chunk_mask(start_pos, T, S, device)
    key = (None if isinstance(start_pos, torch.Tensor) else int(start_pos), T, S)
    if key not in masks:
        masks[key] = _chunk_mask(start_pos, T, S, device)
    return masks[key]


def _chunk_mask(start_pos, T: int, S: int, device) -> torch.Tensor:
    """[T, S] bool: query i (at position start_pos+i) sees cached keys 0 … start_pos+i; with per-row
    positions (``start_pos`` a LongTensor [B]) [B, 1, T, S], broadcasting over the heads."""
    if isinstance(start_pos, torch.Tensor):
        qpos = start_pos.to(device)[:, None] + torch.arange(T, device=device)                # [B, T]
        return (torch.arange(S, device=device) <= qpos[..., None])[:, None]
    qpos = torch.arange(start_pos, start_pos + T, device=device)
    return torch.arange(S, device=device)[None, :] <= qpos[:, None]
