"""DeepSeekMoE (SPEC §1.2): routing edge cases, route() against brute force, the grouped expert
path against a per-expert, per-token loop."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from dsv3 import ModelConfig
from dsv3.model.moe import Gate, MoE, combine, grouped_linear, route


# ------------------------------------------------------------------------------ brute-force routing
def route_reference(scores, bias, top_k, n_group, topk_group, group_score="top2"):
    """Plain Python: for every token enumerate the sets of kept groups, pick the best set, then the
    top-k experts inside it. Returns a list of sets (order inside a token's choice is irrelevant)."""
    N, E = scores.shape
    gs = E // n_group
    scores = scores.detach()
    bias = None if bias is None else bias.detach()
    out = []
    for t in range(N):
        choice = [float(scores[t, e]) + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        groups = [choice[g * gs:(g + 1) * gs] for g in range(n_group)]
        if group_score == "top2":
            gscore = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        else:
            gscore = [max(g) for g in groups]
        if n_group > 1 and topk_group < n_group:
            best = max(itertools.combinations(range(n_group), topk_group),
                       key=lambda keep: sum(gscore[g] for g in keep))
        else:
            best = tuple(range(n_group))
        allowed = [e for g in best for e in range(g * gs, (g + 1) * gs)]
        out.append(set(sorted(allowed, key=lambda e: -choice[e])[:top_k]))
    return out


def as_sets(idx):
    return [set(row) for row in idx.tolist()]


@pytest.mark.parametrize("E,n_group,topk_group,top_k,group_score", [
    (8, 4, 2, 3, "top2"),
    (16, 4, 1, 4, "top2"),      # k = everything the single kept group holds
    (12, 3, 2, 5, "top2"),
    (8, 1, 1, 2, "top2"),       # no group limit
    (8, 4, 4, 6, "top2"),       # topk_group == n_group: nothing masked
    (12, 4, 2, 3, "max"),       # V2-style group score
    (6, 2, 1, 1, "top2"),
])
def test_route_matches_brute_force(E, n_group, topk_group, top_k, group_score):
    torch.manual_seed(E * 100 + top_k)
    scores = torch.rand(64, E, dtype=torch.float64)
    bias = torch.randn(E, dtype=torch.float64) * 0.2
    for b in (None, bias):
        idx = route(scores, b, top_k, n_group, topk_group, group_score)
        assert idx.shape == (64, top_k)
        assert as_sets(idx) == route_reference(scores, b, top_k, n_group, topk_group, group_score)
        assert all(len(s) == top_k for s in as_sets(idx))   # distinct experts


def test_masked_group_best_expert_is_not_chosen():
    # group 0 holds the single best expert (0.99) but its top-2 sum is the lowest (0.99 + 0.0)
    scores = torch.tensor([[0.99, 0.00, 0.60, 0.60, 0.55, 0.50, 0.10, 0.05]])
    # group sums (top-2): g0 0.99, g1 1.20, g2 1.05, g3 0.15 → keep g1, g2
    idx = route(scores, None, top_k=3, n_group=4, topk_group=2)
    assert set(idx[0].tolist()) == {2, 3, 4}
    assert 0 not in idx[0].tolist()
    # without group limiting the best expert is chosen
    assert 0 in route(scores, None, top_k=3, n_group=1, topk_group=1)[0].tolist()


def test_k_equal_to_what_the_kept_groups_hold():
    torch.manual_seed(0)
    scores = torch.rand(32, 12)
    idx = route(scores, None, top_k=6, n_group=4, topk_group=2)     # 2 groups × 3 experts = 6
    for row, ref in zip(as_sets(idx), route_reference(scores, None, 6, 4, 2)):
        assert row == ref
        groups = {e // 3 for e in row}
        assert len(groups) == 2 and row == {e for g in groups for e in range(3 * g, 3 * g + 3)}
    # the config validation refuses one more expert than the kept groups hold
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.preset("tiny").replace(n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=7)


def test_ties_choose_distinct_experts_within_kept_groups():
    scores = torch.full((5, 8), 0.5)
    idx = route(scores, None, top_k=3, n_group=4, topk_group=2)
    for row in as_sets(idx):
        assert len(row) == 3
        assert len({e // 2 for e in row}) <= 2          # only two groups may be used
    # a tie between two groups for the last kept slot: either is fine, but never both
    scores = torch.tensor([[0.9, 0.9, 0.3, 0.3, 0.3, 0.3, 0.0, 0.0]])
    idx = route(scores, None, top_k=3, n_group=4, topk_group=2)[0].tolist()
    assert {0, 1} <= set(idx)
    assert len({e // 2 for e in idx}) == 2
    # tied experts inside the chosen set: gate values are still the normalised scores
    cfg = _gate_cfg(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.zero_()   # every affinity sigmoid(0) = 0.5: all tied
    r = gate(torch.randn(4, cfg.hidden_size))
    torch.testing.assert_close(r.weights, torch.full((4, 3), cfg.routed_scaling_factor / 3))
    assert int(r.counts.sum()) == 12


# ------------------------------------------------------------------------------ the Gate module
def _gate_cfg(**kw):
    base = dict(hidden_size=16, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                routed_scaling_factor=2.5, first_k_dense_replace=1)
    base.update(kw)
    return ModelConfig.preset("tiny").replace(**base)


def test_bias_changes_selection_but_not_gate_values():
    torch.manual_seed(0)
    cfg = _gate_cfg()
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(40, cfg.hidden_size)
    r0 = gate(x)
    gate.e_score_correction_bias[5] = 10.0         # expert 5 now always selected
    r1 = gate(x)
    assert (r1.indices == 5).any(-1).all()
    assert not (r0.indices == 5).any(-1).all()
    torch.testing.assert_close(r1.scores, r0.scores)  # affinities are unbiased
    s = torch.sigmoid(x @ gate.weight.t())
    chosen = s.gather(1, r1.indices)
    torch.testing.assert_close(r1.weights, chosen / chosen.sum(-1, keepdim=True) * 2.5)
    torch.testing.assert_close(r1.weights.sum(-1), torch.full((40,), 2.5))
    assert r1.counts.tolist() == torch.bincount(r1.indices.flatten(), minlength=8).tolist()
    # selection equals brute force on the biased affinities
    assert as_sets(r1.indices) == route_reference(s.double(), gate.e_score_correction_bias.double(), 3, 4, 2)


def test_norm_topk_prob_off():
    torch.manual_seed(1)
    cfg = _gate_cfg(norm_topk_prob=False, routed_scaling_factor=1.5)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(20, cfg.hidden_size)
    r = gate(x)
    s = torch.sigmoid(x @ gate.weight.t())
    torch.testing.assert_close(r.weights, s.gather(1, r.indices) * 1.5)


def test_softmax_scoring_v2_style():
    """V2 gate: softmax affinities, greedy/group-max selection, no selection bias."""
    torch.manual_seed(2)
    cfg = _gate_cfg(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                    routed_scaling_factor=1.0, n_group=1, topk_group=1)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.e_score_correction_bias.fill_(5.0)          # ignored by a V2 gate
    x = torch.randn(30, cfg.hidden_size)
    r = gate(x)
    s = torch.softmax(x @ gate.weight.t(), dim=-1)
    torch.testing.assert_close(r.scores, s)
    torch.testing.assert_close(r.scores.sum(-1), torch.ones(30))
    assert as_sets(r.indices) == as_sets(s.topk(3, dim=-1).indices)
    torch.testing.assert_close(r.weights, s.gather(1, r.indices))
    # with normalisation the values sum to the scaling factor
    gate.norm = True
    torch.testing.assert_close(gate(x).weights.sum(-1), torch.ones(30))
    # group-limited softmax gate uses the group max (V2 "group_limited_greedy")
    cfg = _gate_cfg(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    r = gate(x)
    s = torch.softmax(x @ gate.weight.t(), dim=-1)
    assert as_sets(r.indices) == route_reference(s.double(), None, 3, 4, 2, "max")


# ------------------------------------------------------------------------------ grouped GEMM
def _loop_linear(x, w, counts):
    """Reference: one matmul per token."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    for t in range(x.shape[0]):
        out[t] = w[expert_of_row[t]].double() @ x[t].double()
    return out


@pytest.mark.parametrize("counts", [[3, 0, 5, 0, 1, 7], [0, 0, 4, 0, 0, 0]])   # idle experts; one expert only
@pytest.mark.parametrize("backend", ["segments", "grouped_mm"])
def test_grouped_linear_against_per_token_loop(backend, counts):
    torch.manual_seed(0)
    counts = torch.tensor(counts)
    dtype = torch.float64 if backend == "segments" else torch.float32  # CPU _grouped_mm: fp32/bf16 only
    x = torch.randn(int(counts.sum()), 8, dtype=dtype, requires_grad=True)
    w = torch.randn(len(counts), 12, 8, dtype=dtype, requires_grad=True)
    y = grouped_linear(x, w, counts, backend=backend)
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    ref = _loop_linear(xr, wr, counts)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ref.detach(), **tol)
    dy = torch.randn_like(ref)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
    torch.testing.assert_close(w.grad.double(), wr.grad, **tol)
    assert all(w.grad[e].abs().max() == 0 for e in range(len(counts)) if counts[e] == 0)


@pytest.mark.parametrize("backend", ["segments", "grouped_mm"])
def test_grouped_linear_no_tokens_at_all(backend):
    w = torch.randn(4, 12, 8)
    y = grouped_linear(torch.randn(0, 8), w, torch.zeros(4, dtype=torch.long), backend=backend)
    assert y.shape == (0, 12)


def test_grouped_linear_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        grouped_linear(torch.randn(2, 4), torch.randn(1, 4, 4), torch.tensor([2]), backend="cuda-magic")


# ------------------------------------------------------------------------------ the MoE layer
def _moe_reference(moe: MoE, x: torch.Tensor, gate_dtype=torch.float64) -> torch.Tensor:
    """Per token, per chosen expert: Σ_k g_k · SwiGLU_e(x) + shared(x), all in fp64 but the gate
    affinities, computed in ``gate_dtype`` (the tested model's: fp32, or fp64 for an fp64 model).

    Routing is recomputed here from scratch (brute-force selection, the formulas of SPEC §1.2).
    """
    gate = moe.gate
    I = moe.experts.inter
    s = torch.sigmoid(F.linear(x.to(gate_dtype), gate.weight.to(gate_dtype)))
    sets = route_reference(s.detach().double(), gate.e_score_correction_bias.double(),
                           gate.top_k, gate.n_group, gate.topk_group)
    w13, w2 = moe.experts.w13.double(), moe.experts.w2.double()
    rows = []
    for t in range(x.shape[0]):
        chosen = sorted(sets[t])
        g = s[t, chosen]
        g = (g / g.sum() * gate.scale).double()
        y = torch.zeros(x.shape[1], dtype=torch.float64)
        for gk, e in zip(g, chosen):
            h = w13[e] @ x[t].double()
            y = y + gk * (w2[e] @ (F.silu(h[:I]) * h[I:]))
        rows.append(y)
    out = torch.stack(rows)
    sh = moe.shared_experts
    xs = x.double()
    out = out + F.linear(F.silu(F.linear(xs, sh.gate_proj.weight.double())) * F.linear(xs, sh.up_proj.weight.double()),
                         sh.down_proj.weight.double())
    return out


@pytest.mark.parametrize("backend", ["segments", "grouped_mm"])
def test_moe_forward_backward_against_loop_reference(backend):
    torch.manual_seed(3)
    cfg = _gate_cfg(hidden_size=16, moe_intermediate_size=12, n_shared_experts=1)
    dtype = torch.float64 if backend == "segments" else torch.float32
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
        moe.gate.e_score_correction_bias[[1, 6]] = -10.0        # experts 1 and 6 never chosen
    moe = moe.to(dtype)
    moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    moe.experts.backend = backend
    x = torch.randn(2, 15, 16, dtype=dtype, requires_grad=True)
    stats = []
    y = moe(x, stats)
    assert y.shape == x.shape and y.dtype == dtype
    counts = stats[0].counts
    assert counts[1] == 0 and counts[6] == 0 and int(counts.sum()) == 30 * 3

    ref_moe = copy.deepcopy(moe).double()          # fp64 twin; its parameters collect the reference grads
    ref_moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.clone()
    ref_params = dict(ref_moe.named_parameters())
    xr = x.detach().double().requires_grad_()
    ref = _moe_reference(ref_moe, xr.view(-1, 16), gate_dtype=dtype).view(2, 15, 16)

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y.double(), ref.detach(), **tol)
    dy = torch.randn_like(ref)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
    for n, p in moe.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad.double(), ref_params[n].grad, **tol, msg=n)
    # an expert with no tokens gets a zero gradient (not garbage)
    assert moe.experts.w13.grad[1].abs().max() == 0 and moe.experts.w2.grad[6].abs().max() == 0


def test_combine_sums_weighted_expert_outputs():
    """combine() with an identity-like expert set: output = Σ_k g_k · (x @ A_eᵀ) per token."""
    torch.manual_seed(4)
    cfg = _gate_cfg(hidden_size=8, moe_intermediate_size=4)
    moe = MoE(cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    flat = torch.randn(10, 8, dtype=torch.float64)
    r = moe.gate(flat)
    y = combine(moe.experts, flat, r)
    I = 4
    for t in range(10):
        want = torch.zeros(8, dtype=torch.float64)
        for k in range(3):
            e = int(r.indices[t, k])
            h = moe.experts.w13[e] @ flat[t]
            want += r.weights[t, k].double() * (moe.experts.w2[e] @ (F.silu(h[:I]) * h[I:]))
        torch.testing.assert_close(y[t], want.detach(), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ decode-sized inputs
def _random_moe(seed: int, dtype=torch.float32) -> MoE:
    """A MoE layer with every parameter and the selection bias drawn afresh (no zeros)."""
    torch.manual_seed(seed)
    moe = MoE(_gate_cfg(hidden_size=16, moe_intermediate_size=8, n_shared_experts=1))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    moe = moe.to(dtype)
    moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    return moe.eval()


@pytest.mark.parametrize("tokens", [1, 2, 8])
def test_decode_sized_moe_equals_the_per_segment_path(tokens, monkeypatch):
    """Few tokens on CPU in fp32 on the grouped GEMM (one op per GEMM, segment offsets on the device, no
    loop over experts and no host read of the counts: the path a GPU takes). It gives what the per-expert
    loop gives, to fp32 rounding, and both match the fp64 per-token reference."""
    import dsv3.model.moe as moe_mod

    moe = _random_moe(10 + tokens)
    x = torch.randn(tokens, 16)
    grouped = []
    real = moe_mod._GroupedMM.apply
    monkeypatch.setattr(moe_mod._GroupedMM, "apply", lambda *a: grouped.append(1) or real(*a))
    with torch.no_grad():
        moe.experts.backend = "grouped_mm"
        y_auto = moe(x)
        assert len(grouped) == 2                             # both expert GEMMs took the grouped op
        moe.experts.backend = "segments"
        y_seg = moe(x)
    assert len(grouped) == 2
    torch.testing.assert_close(y_auto, y_seg, rtol=1e-6, atol=1e-6)
    ref = _moe_reference(moe.double(), x.double(), gate_dtype=torch.float32)   # the routing of the fp32 layer
    torch.testing.assert_close(y_auto.double(), ref, rtol=1e-5, atol=1e-5)


def test_auto_backend_switch_on_cpu(monkeypatch):
    """The grouped GEMM from GROUPED_MM_CPU_MIN_ROWS to GROUPED_MM_CPU_MAX_ROWS expert-sorted rows on CPU
    (FP32), the per-segment loop outside that range and for FP64; CUDA BF16 alone decides by alignment
    (not checked here)."""
    import dsv3.model.moe as moe_mod

    w = torch.randn(4, 8, 16)
    low, limit = moe_mod.GROUPED_MM_CPU_MIN_ROWS, moe_mod.GROUPED_MM_CPU_MAX_ROWS
    assert not moe_mod._grouped_mm_ok(torch.randn(low - 1, 16), w)
    assert moe_mod._grouped_mm_ok(torch.randn(low, 16), w)
    assert moe_mod._grouped_mm_ok(torch.randn(limit, 16), w)
    assert not moe_mod._grouped_mm_ok(torch.randn(limit + 1, 16), w)
    assert not moe_mod._grouped_mm_ok(torch.randn(4, 16, dtype=torch.float64), w.double())
    moe = _random_moe(5)
    calls = []
    monkeypatch.setattr(moe_mod.torch.Tensor, "tolist", lambda t: calls.append(1) or t.numpy().tolist())
    with torch.no_grad():
        moe(torch.randn(low, 16))                            # 3·low rows: no host read of the counts
        assert calls == []
        moe(torch.randn(1, 16))                              # 3 rows: the loop reads them (each GEMM)
        assert len(calls) == 2
        moe(torch.randn(limit // 3 + 1, 16))                 # above the limit: the loop reads them
        assert len(calls) == 4


def test_expert_counts_equal_bincount():
    from dsv3.model.moe import expert_counts

    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 13, (40, 3), generator=g)
    assert torch.equal(expert_counts(idx, 16), torch.bincount(idx.flatten(), minlength=16))
    assert expert_counts(idx[:0], 16).tolist() == [0] * 16
