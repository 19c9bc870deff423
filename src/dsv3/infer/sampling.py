"""Token sampling: logit adjustments (OpenAI's presence/frequency penalties and logit bias),
temperature, top-k and nucleus (top-p) filtering, log-probabilities, and the speculative-sampling
acceptance rule that keeps a drafted token's distribution exactly the target model's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5       # any temperature below this samples greedily (dividing by ~0 would overflow)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0      # < GREEDY_BELOW = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    presence_penalty: float = 0.0     # subtracted once from every token already generated
    frequency_penalty: float = 0.0    # subtracted per occurrence in the generated tokens
    logit_bias: tuple = ()            # {token id: bias} or ((id, bias), …) or None: added to the logits

    def __post_init__(self):
        def finite(name, v):
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} = {v!r}: must be a finite number")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            finite(name, getattr(self, name))
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}: must be >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}: must be an integer >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} = {getattr(self, name)}: must be in [-2, 2]")
        bias = self.logit_bias or ()
        bias = bias.items() if isinstance(bias, dict) else bias
        bias = tuple((int(t), float(b)) for t, b in bias)
        for t, b in bias:
            finite(f"logit_bias[{t}]", b)
            if t < 0 or not -100 <= b <= 100:
                raise ValueError(f"logit_bias[{t}] = {b}: token ids must be >= 0 and biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts(self) -> bool:
        """Whether the logits are changed before sampling (penalties or bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def adjust_logits(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits [..., V] with the penalties and bias applied (OpenAI's definitions): ``counts`` [V] are
    the occurrences of each token among those generated so far (None: none yet)."""
    if not params.adjusts:
        return logits
    logits = logits.float().clone()
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        c = counts.to(logits.device, logits.dtype)
        logits -= c * params.frequency_penalty + (c > 0).to(logits.dtype) * params.presence_penalty
    if params.logit_bias:
        vocab = logits.shape[-1]
        ids = torch.tensor([t for t, _ in params.logit_bias if t < vocab], dtype=torch.long, device=logits.device)
        vals = torch.tensor([b for t, b in params.logit_bias if t < vocab], dtype=logits.dtype, device=logits.device)
        logits[..., ids] += vals
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] (already adjusted) → the distribution sampling draws from [..., V] (fp32):
    temperature, then top-k, then the smallest prefix reaching top-p. Greedy gives the one-hot argmax."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = _filtered(logits / params.temperature, params).softmax(-1)
    if not torch.isfinite(probs).all():
        raise FloatingPointError(NOT_FINITE)
    return probs


NOT_FINITE = "the sampling distribution is not finite (the model's logits hold NaN or inf)"


def _filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Tempered logits [..., V] with top-k, then the smallest prefix reaching top-p, kept (the rest -inf)."""
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p          # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [B, V] (rows need not be normalised) and uniforms u [B] in [0, 1) →
    token ids [B], row b the first id whose cumulative probability exceeds u_b times the row's total
    (an id of probability 0 is never drawn)."""
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    # below the total even where u·total rounds up to it: the first cdf above the target then exists
    # and steps up there, so its id has probability > 0
    target = torch.minimum(u.to(cdf.device, cdf.dtype).unsqueeze(-1) * total, torch.nextafter(total, total.new_zeros(())))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs [B, V] → token ids [B], one uniform per row from ``generator``."""
    return draw(probs, torch.rand(probs.shape[0], generator=generator, device=probs.device))


def uniforms(generators: list[torch.Generator], k: int = 1, device=None) -> torch.Tensor:
    """[n, k]: the next ``k`` uniforms of each generator (row i from generators[i], in its order)."""
    if not generators:
        return torch.empty(0, k, device=device)
    return torch.stack([torch.rand(k, generator=g, device=device) for g in generators])


def distributions(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of logits [n, V] (already adjusted) → :func:`probabilities` with ``params[i]``, the rows that
    share their settings filtered as one batch. Returns (probs [n, V] fp32, ok [n] bool): ok False where
    the row's distribution is not finite (its row of probs is then a placeholder, never a NaN)."""
    n, V = logits.shape
    groups: dict[SamplingParams, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p, []).append(i)
    probs = ok = None
    for p, rows in groups.items():
        part = logits if len(rows) == n else logits[rows]
        if p.greedy:
            pr = part.new_zeros(len(rows), V, dtype=torch.float32).scatter_(1, part.argmax(-1, keepdim=True), 1.0)
            fine = torch.ones(len(rows), dtype=torch.bool, device=logits.device)
        else:
            pr = _filtered(part.float() / p.temperature, p).softmax(-1)
            fine = pr.sum(-1).isfinite()          # a NaN anywhere in a row (softmax gives no inf)
            pr = torch.where(fine[:, None], pr, 1.0 / V)
        if len(rows) == n:
            return pr, fine
        if probs is None:
            probs = logits.new_empty(n, V, dtype=torch.float32)
            ok = torch.ones(n, dtype=torch.bool, device=logits.device)
        probs[rows], ok[rows] = pr, fine
    return probs, ok


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of logits [n, V] (already adjusted) drawn with ``params[i]`` and one uniform from
    ``generators[i]`` — the token :func:`sample` draws for that row alone — in one batch. Returns
    (token ids [n], ok [n] bool: False where the row's distribution is not finite; its token is then
    meaningless)."""
    probs, ok = distributions(logits, params)
    return draw(probs, uniforms(generators, 1, logits.device)[:, 0]), ok


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] → token ids [B]. temperature 0 = greedy; top-k then nucleus (top-p) filtering."""
    params = SamplingParams(temperature, top_k, top_p)
    if params.greedy:
        return logits.argmax(-1)
    return sample(probabilities(logits, params), generator)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0):
    """Log-probabilities of the raw model distribution: logits [N, V], tokens [N] → (logprob of each
    token [N], top-``top`` alternatives (values [N, top], ids [N, top]))."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens.view(-1, 1).to(lp.device)).squeeze(-1)
    vals, ids = lp.topk(top, dim=-1) if top else (lp[:, :0], lp[:, :0].long())
    return chosen, vals, ids


def accept_or_resample(draft: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                       generator: torch.Generator | None = None,
                       u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for one drafted token per row.

    draft [B] was drawn from q [B, V]; p [B, V] is the target distribution at the same position.
    Accept with probability min(1, p(d)/q(d)); otherwise draw from (p − q)⁺ normalised. Either way
    the returned token is distributed exactly as p. Returns (token [B], accepted [B] bool).
    With one-hot p and q (greedy) this accepts iff the draft is the argmax and else returns it.
    Randomness: two uniforms per row, the acceptance test's then the resample's — from ``generator``,
    or given as ``u`` [B, 2] (rows with generators of their own: :func:`uniforms`).
    """
    rows = torch.arange(draft.shape[0], device=draft.device)
    p_d, q_d = p[rows, draft], q[rows, draft]
    if u is None:
        u = torch.stack([torch.rand(draft.shape, device=draft.device, generator=generator),
                         torch.rand(draft.shape, device=draft.device, generator=generator)], 1)
    accepted = u[:, 0] * q_d < p_d                              # u < p/q, without dividing by q = 0
    residual = (p - q).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    # total = 0 only when p = q, where acceptance is certain; keep sample() well-defined anyway
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p)
    token = torch.where(accepted, draft, draw(residual, u[:, 1]))
    return token, accepted
