"""Live redundant experts while serving (``dsv3 serve --ep N --redundant-experts R --rebalance-interval``).

4 gloo ranks of this machine in two layouts — one node (flat dispatch; eplb's global policy) and 2
simulated nodes × 2 (two-hop dispatch; eplb's hierarchical policy keeps each expert group on one node,
as node-limited routing needs) — the quickstart model (``runs/tiny/final``; a random tiny model with
skewed gate biases when it is absent), R redundant experts. A skewed workload — every request the
same kind of text — is served twice:

1. on the static placement (each rank its block of experts plus replicas of its neighbour's);
2. after a live rebalance computed from the loads the ranks measured during phase 1.

Per phase the ranks' measured loads ((token, slot) pairs their experts received, every MoE layer) give
the GPU-load balancedness, mean/max over ranks (1 = perfect), as ``eplb.balancedness`` defines it. The
rebalance reports the bytes it moved and the slots it changed. Outputs of both phases must equal the
single-process engine's (greedy). Writes ``benchmarks/results/ep_rebalance.{md,json,png}``.

    python benchmarks/ep_rebalance.py [--model runs/tiny/final] [--redundant 4] [--requests 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
WORLD = 4
LAYOUTS = {"1 node × 4, flat": (4, False), "2 nodes × 2, two-hop": (2, True)}    # ranks per node, two-hop


def _model_dir(arg: str | None, tmp: str) -> tuple[str, str]:
    """(directory, description): the given/quickstart model, else a random tiny one with skewed gates."""
    path = arg or os.path.join(ROOT, "runs", "tiny", "final")
    if os.path.isdir(path):
        return path, f"`{os.path.relpath(path, ROOT)}` (the quickstart model)"
    from dsv3 import ModelConfig, Transformer, save_pretrained

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    with torch.no_grad():
        for moe in model.moe_layers():       # a skew like a trained model's on one kind of text
            moe.gate.e_score_correction_bias.copy_(torch.linspace(0.3, -0.3, moe.gate.e_score_correction_bias.numel()))
    save_pretrained(model, tmp)
    return tmp, "a random `tiny` model (no quickstart run found) with skewed gate biases"


def _workload(model_dir: str, n: int, vocab: int) -> list[list[int]]:
    """n prompts of one kind (Python class definitions), or fixed token runs without a tokenizer."""
    tok_path = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(tok_path):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tok_path)
        names = ["Parser", "Reader", "Writer", "Buffer", "Queue", "Stack", "Table", "Cache"]
        return [tok.encode(f"class {names[i % 8]}{i}(object):\n    def __init__(self").ids for i in range(n)]
    return [[(7 * i + j) % 64 for j in range(12)] for i in range(n)]


def _rank(rank, layout, model_dir, redundant, prompts, new_tokens, port, out_path):
    import torch.distributed as dist

    from dsv3.infer.ep_engine import EPEngine, load_ep_model
    from dsv3.parallel.mesh import MeshSpec, build_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        per_node, two_hop = LAYOUTS[layout]
        comm = build_mesh(MeshSpec(WORLD, per_node), rank).expert_comm()
        model = load_ep_model(model_dir, comm, two_hop=two_hop, redundant_experts=redundant, load_window=4096)
        ep = EPEngine(model, max_batch=16)
        outputs = []
        if rank == 0:
            for _ in range(2):                     # static placement, then the rebalanced one
                reqs = [ep.submit(p, new_tokens) for p in prompts]
                ep.run()
                outputs.append([r.output for r in reqs])
                ep.request_rebalance()
                while ep.placement_version == len(outputs) - 1:
                    ep.step()                      # the order travels, then every rank obeys it
            ep.close()
        else:
            ep.serve()
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(dict(outputs=outputs, rebalances=ep.rebalances,
                               placements=[m.placement.phy2log.tolist() for m in ep._moes]), f)
        bytes_all = [None] * WORLD
        dist.all_gather_object(bytes_all, [r["bytes_received"] for r in ep.rebalances])
        if rank == 0:
            with open(out_path) as f:
                res = json.load(f)
            res["bytes_per_rank"] = bytes_all
            with open(out_path, "w") as f:
                json.dump(res, f)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _single(model_dir: str, prompts, new_tokens) -> list[list[int]]:
    from dsv3.hf import load_pretrained
    from dsv3.infer.engine import Engine

    eng = Engine(load_pretrained(model_dir), max_batch=16)
    reqs = [eng.submit(p, new_tokens) for p in prompts]
    eng.run()
    return [r.output for r in reqs]


def _plot(res: dict, path: str, layout: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [("static placement", res["rebalances"][0]), ("after the live rebalance", res["rebalances"][1])]
    layers = len(phases[0][1]["rank_loads"])
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2), sharey=True, squeeze=False)
    for li, ax in enumerate(axes[0]):
        for k, (label, reb) in enumerate(phases):
            loads = torch.tensor(reb["rank_loads"][li], dtype=torch.float64)
            share = loads / loads.mean()
            ax.bar(torch.arange(WORLD) + (k - 0.5) * 0.4, share, width=0.4, label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"MoE layer {li}")
        ax.set_xlabel("rank")
        ax.set_xticks(range(WORLD))
    axes[0][0].set_ylabel("rank load / mean")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Measured load per rank, same skewed workload ({layout})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--redundant", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from helpers import free_port

    from dsv3.hf import check_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, described = _model_dir(args.model, os.path.join(tmp, "model"))
        cfg = check_model_dir(model_dir)
        prompts = _workload(model_dir, args.requests, cfg.vocab_size)
        ref = _single(model_dir, prompts, args.new_tokens)
        runs = {}
        for layout in LAYOUTS:
            out_path = os.path.join(tmp, "r.json")
            mp.start_processes(_rank, args=(layout, model_dir, args.redundant, prompts, args.new_tokens, free_port(),
                                            out_path), nprocs=WORLD, start_method="spawn")
            with open(out_path) as f:
                runs[layout] = json.load(f)
    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    summary = dict(
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        model=described, ranks=WORLD, redundant_experts=args.redundant, requests=args.requests,
        new_tokens=args.new_tokens, expert_bytes=expert_bytes, layouts={})
    rows = []
    for layout, res in runs.items():
        static, rebal = res["rebalances"]
        r = summary["layouts"][layout] = dict(
            balancedness_static=static["balancedness_before"], balancedness_rebalanced=rebal["balancedness_before"],
            balancedness_expected_by_eplb=static["balancedness_expected"],
            bytes_moved=sum(b[0] for b in res["bytes_per_rank"]), slots_changed=static["slots_changed"],
            slots_total=(cfg.n_routed_experts + args.redundant) * len(static["rank_loads"]),
            outputs_equal_single_engine=all(o == ref for o in res["outputs"]),
            rank_loads_static=static["rank_loads"], rank_loads_rebalanced=rebal["rank_loads"],
            placements=res["placements"])
        rows.append(f"| {layout} | {r['balancedness_static']:.3f} | **{r['balancedness_rebalanced']:.3f}** | "
                    f"{r['balancedness_expected_by_eplb']:.3f} | {r['slots_changed']} / {r['slots_total']} | "
                    f"{r['bytes_moved']:,} ({r['bytes_moved'] / expert_bytes:.0f} experts) | "
                    f"{r['outputs_equal_single_engine']} |")
        _plot(res, os.path.join(args.out, f"ep_rebalance_{'flat' if not LAYOUTS[layout][1] else 'two_hop'}.png"),
              layout)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ep_rebalance.json"), "w") as f:
        json.dump(summary, f, indent=1)
    s = summary
    table = "\n".join(rows)
    md = f"""# Live redundant experts while serving

{WORLD} gloo ranks on {s['machine']}; model: {s['model']}; {s['redundant_experts']} redundant experts per
MoE layer; a skewed workload ({s['requests']} requests of one kind of text — Python class definitions —
× {s['new_tokens']} greedy tokens) served on the static placement, then again after one live rebalance
computed from the loads measured in the first run (`python benchmarks/ep_rebalance.py`). Balancedness
is the measured GPU load, mean/max over ranks (1 = perfect), averaged over the MoE layers.

| layout | static placement | after the live rebalance | eplb's expectation | slots changed | bytes moved point-to-point | outputs = single engine |
|---|---|---|---|---|---|---|
{table}

A changed slot whose rank already held the expert copies it locally; only the others travel (one
expert = {s['expert_bytes']:,} bytes). With two nodes eplb's hierarchical policy keeps each expert group
on one node (node-limited routing sends a token to one group here), so a workload that favours one group
loads one node more and only the balance inside each node can improve.

![per-rank loads, one node](ep_rebalance_flat.png)
![per-rank loads, two nodes](ep_rebalance_two_hop.png)
"""
    with open(os.path.join(args.out, "ep_rebalance.md"), "w") as f:
        f.write(md)
    print(md)
    return 0 if all(r["outputs_equal_single_engine"] for r in s["layouts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
