"""Load-balancing rules (SPEC §1.3) against values worked out by hand."""

import math

import pytest
import torch

from dsv3.balance import MaxVio, max_vio, sequence_balance_loss, update_bias


# ------------------------------------------------------------------------------ update_bias
def test_update_bias_sign_rule():
    # loads 10, 2, 6, 6 → mean 6: expert 0 overloaded (−γ), expert 1 underloaded (+γ), 2 and 3 at mean (0)
    bias = torch.tensor([0.5, -0.25, 0.0, 1.0])
    out = update_bias(bias, torch.tensor([10, 2, 6, 6]), gamma=0.001)
    assert out is bias  # in place
    torch.testing.assert_close(bias, torch.tensor([0.499, -0.249, 0.0, 1.0]), rtol=0, atol=1e-7)


def test_update_bias_per_layer_rows_use_their_own_mean():
    bias = torch.zeros(2, 3)
    counts = torch.tensor([[3, 0, 0], [1, 1, 4]])      # means 1 and 2
    update_bias(bias, counts, gamma=0.5)
    assert bias.tolist() == [[-0.5, 0.5, 0.5], [0.5, 0.5, -0.5]]


def test_update_bias_gamma_zero_and_balanced_loads_do_nothing():
    bias = torch.tensor([0.1, 0.2, 0.3, 0.4])
    update_bias(bias, torch.tensor([5, 5, 5, 5]), gamma=0.001)
    update_bias(bias, torch.tensor([9, 0, 1, 5]), gamma=0.0)
    assert bias.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_update_bias_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        update_bias(torch.zeros(4), torch.tensor([1, 2, 3]))


def test_update_bias_repeated_steps_balance_a_skewed_router():
    """The rule does its job: a router with a fixed preference ends up (nearly) balanced."""
    torch.manual_seed(0)
    E, N, k = 8, 512, 2
    pref = torch.linspace(0, 1.0, E)              # expert 7 is favoured by every token
    bias = torch.zeros(E)
    first = None
    for _ in range(400):
        s = torch.rand(N, E) * 0.5 + pref
        idx = (s + bias).topk(k, dim=-1).indices
        counts = torch.bincount(idx.flatten(), minlength=E)
        first = max_vio(counts) if first is None else first
        update_bias(bias, counts, gamma=0.01)
    assert first > 2.0
    assert max_vio(counts) < 0.3


# ------------------------------------------------------------------------------ sequence loss
def test_sequence_balance_loss_hand_computed():
    # One sequence, T = 2 tokens, E = 4 experts, K = 2.
    # token 0: s = [0.8, 0.6, 0.4, 0.2] (sum 2) → s' = [0.4, 0.3, 0.2, 0.1]; routed to 0, 1
    # token 1: s = [0.1, 0.1, 0.4, 0.4] (sum 1) → s' = s;                      routed to 0, 3
    # f_i = E/(K·T)·hits = 1·[2, 1, 0, 1];  P = mean s' = [0.25, 0.2, 0.3, 0.25]
    # Σ f_i P_i = 0.5 + 0.2 + 0 + 0.25 = 0.95
    scores = torch.tensor([[[0.8, 0.6, 0.4, 0.2], [0.1, 0.1, 0.4, 0.4]]])
    indices = torch.tensor([[[0, 1], [0, 3]]])
    loss = sequence_balance_loss(scores, indices, alpha=1e-4)
    assert loss.item() == pytest.approx(0.95e-4, rel=1e-6)
    assert sequence_balance_loss(scores, indices, alpha=1.0).item() == pytest.approx(0.95, rel=1e-6)


def test_sequence_balance_loss_averages_over_sequences():
    # sequence 2: T = 2, both tokens on expert 2 with K = 1 → f = 4/(1·2)·[0, 0, 2, 0] = [0, 0, 4, 0]
    # s' token 0 = [0.25]*4, token 1 = [0, 0, 1, 0] → P_2 = 0.625 → Σ = 2.5
    s1 = torch.tensor([[0.8, 0.6, 0.4, 0.2], [0.1, 0.1, 0.4, 0.4]])
    i1 = torch.tensor([[0], [3]])  # K = 1: f = 2·[1, 0, 0, 1], P = [0.25, 0.2, 0.3, 0.25] → 0.5 + 0.5 = 1.0
    s2 = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.7, 0.0]])
    i2 = torch.tensor([[2], [2]])
    loss = sequence_balance_loss(torch.stack([s1, s2]), torch.stack([i1, i2]), alpha=1.0)
    assert loss.item() == pytest.approx((1.0 + 2.5) / 2, rel=1e-6)


def test_sequence_balance_loss_is_one_alpha_when_perfectly_balanced_and_differentiable():
    E, K, T = 8, 2, 4                 # every expert hit exactly once, uniform affinities
    scores = torch.full((1, T, E), 0.3, requires_grad=True)
    indices = torch.arange(T * K).view(1, T, K)
    loss = sequence_balance_loss(scores, indices, alpha=0.01)
    assert loss.item() == pytest.approx(0.01, rel=1e-6)
    loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


def test_sequence_balance_loss_rejects_bad_shapes():
    with pytest.raises(ValueError):
        sequence_balance_loss(torch.rand(4, 8), torch.zeros(4, 2, dtype=torch.long))


# ------------------------------------------------------------------------------ MaxVio
def test_max_vio_hand_computed():
    assert max_vio(torch.tensor([10, 2, 6, 6])) == pytest.approx(4 / 6)
    assert max_vio(torch.tensor([5, 5, 5, 5])) == 0.0
    # per layer: [3,0,0] → (3−1)/1 = 2;  [1,1,4] → (4−2)/2 = 1; averaged → 1.5
    assert max_vio(torch.tensor([[3, 0, 0], [1, 1, 4]])) == pytest.approx(1.5)


def test_maxvio_accumulates_over_batches():
    mv = MaxVio()
    with pytest.raises(ValueError):
        mv.value
    mv.add(torch.tensor([4, 0, 2, 2]))   # alone: (4 − 2)/2 = 1
    assert mv.value == pytest.approx(1.0)
    mv.add(torch.tensor([0, 4, 2, 2]))   # together [4, 4, 4, 4] → 0 (global is not the mean of batches)
    assert mv.value == pytest.approx(0.0)
    mv.add(torch.tensor([6, 0, 0, 0]))   # [10, 4, 4, 4], mean 5.5 → 4.5/5.5
    assert mv.value == pytest.approx(4.5 / 5.5)


def test_maxvio_per_layer():
    mv = MaxVio()
    mv.add(torch.tensor([[3, 0, 0], [1, 1, 4]]))
    mv.add(torch.tensor([[0, 3, 0], [1, 1, 0]]))   # → [[3, 3, 0], [2, 2, 4]]
    assert mv.per_layer() == pytest.approx([(3 - 2) / 2, (4 - 8 / 3) / (8 / 3)])
    assert mv.value == pytest.approx((0.5 + 0.5) / 2)
    assert not math.isnan(mv.value)
