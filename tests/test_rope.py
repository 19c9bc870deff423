"""Interleaved RoPE and YaRN (SPEC §1.1) against direct formulas."""

import math

import pytest
import torch

from dsv3 import ModelConfig
from dsv3.config import yarn_mscale
from dsv3.model.rope import apply_rope, precompute_freqs_cis, rope_cos_sin_scale, rope_frequencies

YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def _cfg(rope_dim=16, theta=10000.0, rope_scaling=None, **kw):
    base = ModelConfig.preset("tiny")
    return base.replace(qk_rope_head_dim=rope_dim, rope_theta=theta, rope_scaling=rope_scaling, **kw)


def _rope_reference(x: torch.Tensor, positions, thetas) -> torch.Tensor:
    """x [B, T, ..., D] (fp64): rotate pair (x[2j], x[2j+1]) of position t by angle pos_t·θ_j."""
    out = torch.empty_like(x)
    for t, pos in enumerate(positions):
        for j, th in enumerate(thetas):
            c, s = math.cos(pos * th), math.sin(pos * th)
            a, b = x[:, t, ..., 2 * j], x[:, t, ..., 2 * j + 1]
            out[:, t, ..., 2 * j] = a * c - b * s
            out[:, t, ..., 2 * j + 1] = a * s + b * c
    return out


@pytest.mark.parametrize("shape", [(2, 7, 3, 16), (2, 7, 16)])
def test_apply_rope_matches_explicit_rotation(shape):
    torch.manual_seed(0)
    D, theta = shape[-1], 10000.0
    cfg = _cfg(rope_dim=D, theta=theta)
    x = torch.randn(*shape, dtype=torch.float64)
    start = 5
    freqs = precompute_freqs_cis(cfg, start + shape[1])[start:]
    thetas = [theta ** (-2 * j / D) for j in range(D // 2)]           # θ_j = base^(−2j/D)
    ref = _rope_reference(x, range(start, start + shape[1]), thetas)
    got = apply_rope(x.float(), freqs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)


def test_apply_rope_keeps_dtype_and_norm_of_each_pair():
    cfg = _cfg()
    x = torch.randn(1, 9, 2, 16).bfloat16()
    y = apply_rope(x, precompute_freqs_cis(cfg, 9))
    assert y.dtype == torch.bfloat16
    pair_norm = lambda t: t.float().view(1, 9, 2, 8, 2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-2, atol=1e-2)
    # position 0 is the identity
    torch.testing.assert_close(y[:, 0], x[:, 0])


@pytest.mark.parametrize("rope_scaling", [None, YARN])
def test_relative_position_property(rope_scaling):
    """q·k after RoPE depends only on the distance between the two positions."""
    torch.manual_seed(1)
    cfg = _cfg(rope_dim=64, rope_scaling=rope_scaling, max_position_embeddings=163840)
    freqs = precompute_freqs_cis(cfg, 4000)
    q = torch.randn(64, dtype=torch.float64)
    k = torch.randn(64, dtype=torch.float64)

    def dot(m, n):
        qr = apply_rope(q.view(1, 1, 64).float(), freqs[m:m + 1])
        kr = apply_rope(k.view(1, 1, 64).float(), freqs[n:n + 1])
        return (qr.double() * kr.double()).sum().item()

    for m, n in [(7, 3), (20, 0), (100, 100), (5, 9)]:
        for shift in (1, 13, 1000):
            assert dot(m + shift, n + shift) == pytest.approx(dot(m, n), rel=1e-3, abs=1e-3)
    # and it does depend on the distance
    assert abs(dot(7, 3) - dot(7, 4)) > 1e-3


# ------------------------------------------------------------------------------ YaRN
def _yarn_reference(D, base, factor, L, beta_fast, beta_slow):
    """YaRN "NTK-by-parts" (Peng et al. 2023, §3.2), written from the paper.

    θ_j = base^(−2j/D); its wavelength λ_j = 2π/θ_j; r_j = L/λ_j rotations within the original
    context L. Dimensions with r_j ≥ β (beta_fast) keep θ_j (extrapolate), those with r_j ≤ α
    (beta_slow) use θ_j/s (interpolate); in between h(θ_j) = (1−γ_j)·θ_j/s + γ_j·θ_j with a linear
    ramp γ. The paper's reference code (which DeepSeek and transformers follow) runs the ramp
    linearly over the dimension index between the integer boundaries floor(d(β)) and ceil(d(α)),
    where d(r) is the (fractional) index whose wavelength gives r rotations.
    """
    thetas = [base ** (-2 * j / D) for j in range(D // 2)]
    r = [L * th / (2 * math.pi) for th in thetas]
    # d(r): solve L·base^(−2d/D)/(2π) = r for d
    d_of = lambda rot: D * math.log(L / (2 * math.pi * rot)) / (2 * math.log(base))  # noqa: E731
    lo, hi = max(math.floor(d_of(beta_fast)), 0), min(math.ceil(d_of(beta_slow)), D - 1)
    out, gammas = [], []
    for j, th in enumerate(thetas):
        if r[j] >= beta_fast:
            g = 1.0
        elif r[j] <= beta_slow:
            g = 0.0
        else:
            g = 1.0 - min(max((j - lo) / (hi - lo), 0.0), 1.0)
        gammas.append(g)
        out.append((1 - g) * th / factor + g * th)
    return out, r, gammas


@pytest.mark.parametrize("D,base,factor,L,bf,bs", [
    (64, 10000.0, 40.0, 4096, 32.0, 1.0),     # DeepSeek-V3
    (16, 10000.0, 4.0, 64, 32.0, 1.0),        # a tiny config: ramp clipped at index 0
    (32, 500000.0, 8.0, 8192, 16.0, 2.0),
])
def test_yarn_frequencies_match_the_paper(D, base, factor, L, bf, bs):
    rs = {"type": "yarn", "factor": factor, "original_max_position_embeddings": L,
          "beta_fast": bf, "beta_slow": bs, "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = _cfg(rope_dim=D, theta=base, rope_scaling=rs)
    got = rope_frequencies(cfg).double()
    ref, r, gammas = _yarn_reference(D, base, factor, L, bf, bs)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=0)
    # the regions the paper defines are really there
    for j, th in enumerate(ref):
        theta = base ** (-2 * j / D)
        if r[j] >= bf:
            assert got[j].item() == pytest.approx(theta, rel=1e-6)
        if r[j] <= bs:
            assert got[j].item() == pytest.approx(theta / factor, rel=1e-6)
    assert all(a >= b for a, b in zip(gammas, gammas[1:]))   # the blend moves monotonically


def test_yarn_v3_regions():
    """V3: pairs 0…10 keep θ, 23…31 are divided by 40, the 12 in between are blended."""
    cfg = _cfg(rope_dim=64, rope_scaling=YARN, max_position_embeddings=163840)
    got = rope_frequencies(cfg).double()
    plain = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ratio = (plain / got).tolist()
    assert all(x == pytest.approx(1.0, rel=1e-6) for x in ratio[:11])
    assert all(x == pytest.approx(40.0, rel=1e-6) for x in ratio[23:])
    assert all(1.0 < x < 40.0 for x in ratio[11:23])


def test_no_scaling_and_factor_one_give_plain_rope():
    plain = _cfg(rope_dim=16)
    one = _cfg(rope_dim=16, rope_scaling={**YARN, "factor": 1.0})
    ref = torch.tensor([10000.0 ** (-2 * j / 16) for j in range(8)])
    torch.testing.assert_close(rope_frequencies(plain), ref)
    torch.testing.assert_close(rope_frequencies(one), ref)
    assert rope_cos_sin_scale(plain) == 1.0 and rope_cos_sin_scale(one) == 1.0


def test_yarn_softmax_scale_and_cos_sin_magnitude():
    v3 = ModelConfig.preset("deepseek-v3")
    m = 0.1 * math.log(40) + 1                          # mscale(40, 1.0) ≈ 1.3689
    assert v3.softmax_scale == pytest.approx(192 ** -0.5 * m * m)
    assert rope_cos_sin_scale(v3) == pytest.approx(1.0)
    rs = {**YARN, "mscale": 0.9, "mscale_all_dim": 0.707}
    cfg = _cfg(rope_dim=16, rope_scaling=rs)
    want = (0.1 * 0.9 * math.log(40) + 1) / (0.1 * 0.707 * math.log(40) + 1)
    assert rope_cos_sin_scale(cfg) == pytest.approx(want)
    assert yarn_mscale(40, 0.707) == pytest.approx(0.1 * 0.707 * math.log(40) + 1)
    freqs = precompute_freqs_cis(cfg, 10)
    torch.testing.assert_close(freqs.abs(), torch.full((10, 8), want, dtype=torch.float32))
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5 * yarn_mscale(40, 0.707) ** 2)


def test_yarn_matches_transformers_rope_init():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rs in (YARN, {**YARN, "mscale": 0.9, "mscale_all_dim": 0.707, "beta_fast": 16, "factor": 8}):
        hc = transformers.DeepseekV3Config(qk_rope_head_dim=64, rope_scaling=dict(rs), max_position_embeddings=163840)
        inv_freq, attn = ROPE_INIT_FUNCTIONS["yarn"](hc)
        cfg = _cfg(rope_dim=64, rope_scaling=rs, max_position_embeddings=163840)
        torch.testing.assert_close(rope_frequencies(cfg), inv_freq.float(), rtol=1e-6, atol=0)
        assert rope_cos_sin_scale(cfg) == pytest.approx(attn)
