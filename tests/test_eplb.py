"""EPLB (SPEC §3): validity of placements, no same-GPU duplicates, balance against baselines,
input validation, and the ``dsv3 eplb`` command."""

import json
import re

import numpy as np
import pytest
import torch

from dsv3 import eplb
from dsv3.cli import main as cli_main

# (layers, logical experts, replicas, groups, nodes, gpus)
SHAPES = [
    (3, 16, 24, 4, 2, 8),     # hierarchical, 3 replicas per GPU
    (2, 12, 16, 4, 2, 8),     # the EPLB README example
    (2, 16, 32, 4, 4, 8),     # hierarchical, one group per node
    (2, 32, 40, 8, 1, 8),     # hierarchical on a single node
    (2, 64, 72, 8, 4, 8),     # prefill-like: 8 groups on 4 nodes, 9 replicas per GPU
    (3, 18, 24, 3, 2, 4),     # global (3 groups over 2 nodes), 6 replicas per GPU
    (2, 16, 20, 4, 5, 20),    # decode-like global: one replica per GPU
    (2, 16, 16, 4, 2, 4),     # no redundant experts
    (2, 32, 40, 16, 2, 8),    # hierarchical with too many group partitions to search them all
]


def zipf_loads(layers, experts, s=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rank = torch.arange(1, experts + 1, dtype=torch.float64)
    rows = []
    for _ in range(layers):
        p = rank.pow(-s)[torch.randperm(experts, generator=g)]
        noise = torch.exp(0.3 * torch.randn(experts, generator=g, dtype=torch.float64))
        rows.append((p * noise / (p * noise).sum() * 10_000).round())
    return torch.stack(rows)


def check_placement(weight, out, num_replicas, num_groups, num_nodes, num_gpus):
    phy2log, log2phy, logcnt = out
    num_layers, num_logical = weight.shape
    assert phy2log.shape == (num_layers, num_replicas) and phy2log.dtype == torch.int64
    assert logcnt.shape == (num_layers, num_logical) and logcnt.dtype == torch.int64
    assert log2phy.shape == (num_layers, num_logical, int(logcnt.max())) and log2phy.dtype == torch.int64
    assert phy2log.min() >= 0 and phy2log.max() < num_logical
    assert (logcnt >= 1).all()
    assert (logcnt.sum(-1) == num_replicas).all()
    for l in range(num_layers):
        assert torch.equal(torch.bincount(phy2log[l], minlength=num_logical), logcnt[l])
        for e in range(num_logical):
            c = int(logcnt[l, e])
            slots = log2phy[l, e, :c]
            assert (log2phy[l, e, c:] == -1).all()
            assert len(set(slots.tolist())) == c and (slots >= 0).all()
            assert (phy2log[l, slots] == e).all()
    if eplb.is_hierarchical(num_groups, num_nodes):
        slots_per_node = num_replicas // num_nodes
        group = phy2log // (num_logical // num_groups)  # [layers, replicas]
        node = torch.arange(num_replicas) // slots_per_node
        for l in range(num_layers):
            for gr in range(num_groups):
                nodes = node[group[l] == gr].unique()
                assert len(nodes) == 1, f"layer {l} group {gr} spans nodes {nodes.tolist()}"


def round_robin_loads(weight, num_gpus):
    """No redundancy, expert e on GPU e % K."""
    gpu = torch.arange(weight.shape[1]) % num_gpus
    return torch.zeros(weight.shape[0], num_gpus, dtype=torch.float64).index_add_(1, gpu, weight.double())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["uniform", "zipf", "ints", "zeros", "hot"])
def test_valid_placements(shape, kind):
    layers, experts, replicas, groups, nodes, gpus = shape
    g = torch.Generator().manual_seed(sum(shape) * 10 + len(kind))
    if kind == "uniform":
        w = torch.rand(layers, experts, generator=g)
    elif kind == "zipf":
        w = zipf_loads(layers, experts, s=1.2, seed=experts)
    elif kind == "ints":
        w = torch.randint(0, 1000, (layers, experts), generator=g)
    elif kind == "zeros":
        w = torch.zeros(layers, experts)
    else:  # one expert carries nearly everything
        w = torch.ones(layers, experts)
        w[:, 3] = 1e6
    out = eplb.rebalance_experts(w, replicas, groups, nodes, gpus)
    check_placement(w, out, replicas, groups, nodes, gpus)
    assert eplb.same_gpu_duplicates(out[0], gpus) == 0
    # deterministic
    again = eplb.rebalance_experts(w, replicas, groups, nodes, gpus)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    # the reference reimplementation gives valid outputs too
    check_placement(w, eplb.rebalance_experts_greedy(w, replicas, groups, nodes, gpus), replicas, groups, nodes, gpus)


@pytest.mark.parametrize("shape", [
    (2, 16, 48, 4, 1, 8),    # global-like single node: greedy wants ~33 replicas of the hot expert
    (2, 18, 48, 3, 2, 8),    # global (groups do not divide over nodes)
    (2, 32, 64, 4, 2, 8),    # hierarchical: the hot expert's node has 4 GPUs
    (1, 64, 72, 8, 4, 8),    # prefill-like hierarchical, 2 GPUs per node
])
def test_no_same_gpu_duplicates_adversarial(shape):
    layers, experts, replicas, groups, nodes, gpus = shape
    w = torch.ones(layers, experts)
    w[0, 5] = 1e5  # nearly all the load
    w[-1, 0] = w[-1, 1] = 1e4  # two hot experts in the same group
    ref = eplb.rebalance_experts_greedy(w, replicas, groups, nodes, gpus)
    assert eplb.same_gpu_duplicates(ref[0], gpus) > 0  # the reference's flaw (EPLB issue #22)
    out = eplb.rebalance_experts(w, replicas, groups, nodes, gpus)
    check_placement(w, out, replicas, groups, nodes, gpus)
    assert eplb.same_gpu_duplicates(out[0], gpus) == 0
    # the hot expert gets a replica on every GPU of its packing domain
    domain = gpus // nodes if eplb.is_hierarchical(groups, nodes) else gpus
    assert out[2][0, 5] == domain
    assert eplb.balancedness(w, out[0], out[2], gpus) >= eplb.balancedness(w, ref[0], ref[2], gpus)


def test_duplicates_only_when_forced():
    # 4 experts, 8 slots per GPU on 2 GPUs: every GPU must hold each expert twice
    w = torch.tensor([[1.0, 4.0, 2.0, 9.0]])
    phy2log, _, logcnt = eplb.rebalance_experts(w, 16, 1, 1, 2)
    assert (logcnt == 4).all()
    assert eplb.same_gpu_duplicates(phy2log, 2) == 8  # the minimum: 4 experts x (2 - 1) x 2 GPUs
    assert eplb.balancedness(w, phy2log, logcnt, 2) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [
    (16, 64, 72, 8, 4, 8),    # prefill-like hierarchical
    (16, 12, 16, 4, 2, 8),    # README example
    (16, 48, 64, 3, 2, 8),    # global, 8 replicas per GPU
    (16, 64, 80, 8, 2, 16),   # hierarchical, 5 per GPU
])
@pytest.mark.parametrize("s", [0.8, 1.2])
def test_balance_beats_baselines(shape, s):
    layers, experts, replicas, groups, nodes, gpus = shape
    w = zipf_loads(layers, experts, s=s, seed=replicas + int(10 * s))
    p, _, c = eplb.rebalance_experts(w, replicas, groups, nodes, gpus)
    ref_p, _, ref_c = eplb.rebalance_experts_greedy(w, replicas, groups, nodes, gpus)
    ours = eplb.balancedness(w, p, c, gpus, per_layer=True)
    ref = eplb.balancedness(w, ref_p, ref_c, gpus, per_layer=True)
    rr = eplb.balancedness(round_robin_loads(w, gpus), per_layer=True)
    static = eplb.balancedness(eplb.static_gpu_loads(w, gpus), per_layer=True)
    assert (ours >= rr - 1e-9).all() and (ours >= static - 1e-9).all()
    assert ours.mean() >= ref.mean()
    # where the reference is duplicate-free, ours starts from its placement and only improves it
    dup_free = torch.tensor([eplb.same_gpu_duplicates(ref_p[l:l + 1], gpus) == 0 for l in range(layers)])
    assert (ours[dup_free] >= ref[dup_free] * (1 - 1e-9)).all()
    assert eplb.same_gpu_duplicates(p, gpus) == 0


def test_helpers():
    w = torch.tensor([[6.0, 2.0, 1.0, 3.0]])
    phy2log = torch.tensor([[0, 1, 0, 2, 3, 3]])  # GPU0: e0 e1 | GPU1: e0 e2 | GPU2: e3 e3
    loads = eplb.gpu_loads(w, phy2log, None, 3)
    assert loads.tolist() == [[5.0, 4.0, 3.0]]
    assert eplb.gpu_loads(w, phy2log, torch.tensor([[2, 1, 1, 2]]), 3).tolist() == [[5.0, 4.0, 3.0]]
    assert eplb.balancedness(loads) == pytest.approx(4.0 / 5.0)
    assert eplb.balancedness(w, phy2log, None, 3) == pytest.approx(0.8)
    assert eplb.same_gpu_duplicates(phy2log, 3) == 1
    assert eplb.static_gpu_loads(w, 2).tolist() == [[8.0, 4.0]]
    assert eplb.balancedness(torch.zeros(2, 4)) == 1.0  # no load: nothing to balance


@pytest.mark.parametrize("args, match", [
    ((torch.ones(2, 16), 20, 4, 2, 8), "num_replicas .* divisible by num_gpus"),
    ((torch.ones(2, 16), 24, 4, 4, 6), "num_gpus .* divisible by num_nodes"),
    ((torch.ones(2, 16), 24, 5, 1, 8), "num_groups"),
    ((torch.ones(2, 16), 8, 4, 2, 8), "num_replicas .* >= the number of logical experts"),
    ((torch.ones(16), 24, 4, 2, 8), "weight must be 2-D"),
    ((torch.ones(2, 3, 4), 24, 4, 2, 8), "weight must be 2-D"),
    ((torch.ones(0, 16), 24, 4, 2, 8), "at least one layer"),
    ((-torch.ones(2, 16), 24, 4, 2, 8), "non-negative"),
    ((torch.full((2, 16), float("nan")), 24, 4, 2, 8), "finite"),
    ((torch.full((2, 16), float("inf")), 24, 4, 2, 8), "finite"),
    ((torch.ones(2, 16), 0, 4, 2, 8), "num_replicas must be >= 1"),
    ((torch.ones(2, 16), 24.0, 4, 2, 8), "num_replicas must be an integer"),
    ((torch.ones(2, 16), 24, 4, True, 8), "num_nodes must be an integer"),
    ((torch.ones(2, 16), 24, 4, 2, -8), "num_gpus must be >= 1"),
    (([["a"] * 16], 24, 4, 2, 8), "weight must be a numeric"),
])
def test_validation(args, match):
    with pytest.raises(ValueError, match=match):
        eplb.rebalance_experts(*args)


def test_accepts_lists_and_arrays():
    w = [[3, 1, 4, 1, 5, 9, 2, 6]]
    a = eplb.rebalance_experts(w, 12, 2, 2, 4)
    b = eplb.rebalance_experts(np.array(w, dtype=np.float32), 12, 2, 2, 4)
    c = eplb.rebalance_experts(torch.tensor(w), 12, 2, 2, 4)
    assert all(torch.equal(x, y) and torch.equal(y, z) for x, y, z in zip(a, b, c))


# ---------------------------------------------------------------------------------------------
# the command


def _write(path, w):
    if path.suffix == ".json":
        path.write_text(json.dumps(w.tolist()))
    elif path.suffix == ".csv":
        rows = [",".join(f"e{i}" for i in range(w.shape[-1]))] + [",".join(map(str, r)) for r in np.atleast_2d(w)]
        path.write_text("\n".join(rows) + "\n")
    elif path.suffix == ".npy":
        np.save(path, w)
    else:
        torch.save(torch.from_numpy(w), path)


@pytest.mark.parametrize("suffix", [".json", ".csv", ".npy", ".pt"])
def test_cli_json(tmp_path, capsys, suffix):
    w = zipf_loads(3, 16, seed=1).numpy()
    f = tmp_path / f"loads{suffix}"
    _write(f, w)
    rc = cli_main(["eplb", "--loads", str(f), "--replicas", "24", "--groups", "4", "--nodes", "2",
                   "--gpus", "8", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "hierarchical" and out["num_layers"] == 3
    phy2log, log2phy, logcnt = (torch.tensor(out[k]) for k in ("phy2log", "log2phy", "logcnt"))
    check_placement(torch.from_numpy(w), (phy2log, log2phy, logcnt), 24, 4, 2, 8)
    assert out["same_gpu_duplicates"]["eplb"] == 0
    b = out["balancedness"]
    assert b["eplb"] >= b["no_redundancy"] and b["eplb"] >= b["reference_greedy"]
    assert b["eplb"] == pytest.approx(eplb.balancedness(torch.tensor(out["gpu_loads_after"])))


def test_cli_text_and_plot(tmp_path, capsys):
    f = tmp_path / "one_layer.json"
    f.write_text(json.dumps([5, 1, 1, 1, 9, 2, 2, 3, 1, 1, 1, 1]))  # 1-D: one layer
    png = tmp_path / "gpu.png"
    rc = cli_main(["eplb", "--loads", str(f), "--replicas", "16", "--groups", "3", "--nodes", "2",
                   "--gpus", "8", "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "policy: global" in text and "GPU    7" in text and "balancedness" in text
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, match", [
    (["--loads", "{missing}"], "not found"),
    (["--loads", "{bad_ext}"], "unsupported loads file type"),
    (["--loads", "{ragged}"], "cannot read loads"),
    (["--loads", "{good}", "--replicas", "20"], "--replicas .* divisible by --gpus"),
    (["--loads", "{good}", "--layer", "5"], "--layer"),
    (["--loads", "{negative}"], "non-negative"),
])
def test_cli_errors(tmp_path, capsys, argv, match):
    files = {"missing": tmp_path / "nope.json", "bad_ext": tmp_path / "loads.txt",
             "ragged": tmp_path / "ragged.json", "good": tmp_path / "good.json",
             "negative": tmp_path / "neg.json"}
    files["bad_ext"].write_text("1 2 3")
    files["ragged"].write_text("[[1, 2], [3]]")
    files["good"].write_text(json.dumps([[1] * 16]))
    files["negative"].write_text(json.dumps([[-1] * 16]))
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    base = {"--replicas": "24", "--groups": "4", "--nodes": "2", "--gpus": "8"}
    for k, v in base.items():
        if k not in argv:
            argv += [k, v]
    assert cli_main(["eplb", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3 eplb: error:")
    assert re.search(match, err), err
