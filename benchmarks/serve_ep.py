"""Expert-parallel serving (``dsv3 serve --ep N``'s engine): 1 rank vs 2 and 4 at the same total load,
and the dispatch/combine bytes per token against the planner's ``--mode serve`` figures.

For each model, the same requests (``--requests`` prompts of 8…64 random token ids, ``--new-tokens``
greedy tokens each, all submitted at once) run on

* 1 rank: the single-process :class:`dsv3.infer.engine.Engine` (this process);
* 2 ranks (one node of 2, flat dispatch), 4 ranks (one node of 4, flat) and 4 ranks as 2 simulated
  nodes × 2 (two-hop dispatch): :class:`dsv3.infer.ep_engine.EPEngine` on gloo ranks spawned here
  with ``torch.multiprocessing`` (each loads only its experts with ``load_ep_model``; rank 0 places
  the requests on the least loaded rank, as ``dsv3 serve`` does, without the HTTP side).

Every rank runs one torch thread (a second thread per process only stalls on a shared 2-core machine)
and the same engine settings (``max_batch`` = the request count). Every layout's ranks are started
and warmed up (a few short requests) first and stay up; then ``--repeats`` rounds, each with fresh
prompts (the in-memory prefix cache cannot help), run every layout once in turn (rotating the order),
so that a change in the machine's load hits all layouts alike. Measured on rank 0, where the
tokens arrive (a follower's tokens reach rank 0 with the next step's exchange, as in serving):
tokens/s (generated tokens over the run's wall time; the median run), time to first token and
inter-token latency p50/p95 over every request of every run. Outputs are compared token by token with
the single engine's.

Bytes: every expert-parallel layer's ``CommCounters`` (rows and bytes each rank sends, by scope:
inter-node, intra-node, self) summed over layers and ranks, per token and MoE layer (tokens through
the layers counted by the counters' node visits). The planner's figures for the same model and
layout: ``plan_serving`` (``dsv3 plan --mode serve``) for a unit of the same shape — 1 or 2 nodes of
2 or 4 GPUs, EP = the ranks, no redundant experts — whose ``ep_traffic`` gives the expected copies per
token (to the other GPUs of the node, and across nodes) under uniform routing, and bytes in the GPU
format (FP8 dispatch + BF16 combine). Ratios are measured / planned for copies, and for bytes at this
run's wire format (fp32 rows: planned copies × the row bytes measured).

    python benchmarks/serve_ep.py [--model runs/tiny/final] [--wide] [--requests 32] [--new-tokens 32]
                                  [--repeats 5] [--out DIR]

Writes DIR/serve_ep.{json,md} (default benchmarks/results). On a CPU the ranks share the machine's
cores: more ranks means less compute per rank and more gloo messages per step, so they are slower
here — the layout is for GPUs, where each rank has its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv3 import ModelConfig, Transformer, save_pretrained
from dsv3.hf import load_pretrained
from dsv3.infer.engine import Engine
from dsv3.infer.ep_engine import EPEngine, load_ep_model
from dsv3.infer.sampling import SamplingParams
from dsv3.parallel.mesh import MeshSpec, build_mesh
from dsv3.plan.hardware import get_gpu
from dsv3.plan.serve import ServeUnit, plan_serving

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAYOUTS = [  # name, ranks, ranks per node, two-hop
    ("2 ranks (1 node × 2, flat)", 2, 2, False),
    ("4 ranks (1 node × 4, flat)", 4, 4, False),
    ("4 ranks (2 nodes × 2, two-hop)", 4, 2, True),
]
WIDE = dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=512,
            num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32, max_position_embeddings=256, n_routed_experts=32, n_shared_experts=1,
            num_experts_per_tok=4, moe_intermediate_size=128, n_group=4, topk_group=2, num_nextn_predict_layers=1)


# ------------------------------------------------------------------------------------------ requests
def request_sets(seed: int, vocab: int, n: int, repeats: int) -> list[list[list[int]]]:
    """``repeats`` sets of ``n`` prompts (8…64 ids), fresh per set; the same for every layout."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, vocab, (int(torch.randint(8, 65, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)] for _ in range(repeats)]


def timed_run(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Submit every prompt at once to ``engine`` (Engine or rank 0's EPEngine), run to the end; the
    outputs, wall time and each request's token arrival times."""
    arrivals: list[list[tuple[float, int]]] = [[] for _ in prompts]

    def on_token(i):
        return lambda req: arrivals[i].append((time.perf_counter(), len(req.output)))

    t0 = time.perf_counter()
    reqs = [engine.submit(p, new_tokens, SamplingParams(temperature=0.0), seed=i, on_token=on_token(i))
            for i, p in enumerate(prompts)]
    engine.run()
    wall = time.perf_counter() - t0
    ttft = [a[0][0] - t0 for a in arrivals if a]
    itl = []                       # k tokens in one arrival: k equal gaps (as the server's metrics)
    for a in arrivals:
        for (t_prev, n_prev), (t, n) in zip(a, a[1:]):
            itl += [(t - t_prev) / (n - n_prev)] * (n - n_prev)
    return dict(outputs=[r.output for r in reqs], wall_s=wall, tokens=sum(len(r.output) for r in reqs),
                ttft=ttft, itl=itl)


def summarize(runs: list[dict], reference: list[list[list[int]]] | None) -> dict:
    tps = [r["tokens"] / r["wall_s"] for r in runs]
    ttft = np.array([x for r in runs for x in r["ttft"]]) * 1e3
    itl = np.array([x for r in runs for x in r["itl"]]) * 1e3
    out = dict(tokens_per_s=statistics.median(tps), tokens_per_s_runs=tps,
               ttft_ms_p50=float(np.percentile(ttft, 50)), ttft_ms_p95=float(np.percentile(ttft, 95)),
               itl_ms_p50=float(np.percentile(itl, 50)), itl_ms_p95=float(np.percentile(itl, 95)),
               tokens=sum(r["tokens"] for r in runs))
    if reference is not None:
        pairs = [(a, b) for r, ref in zip(runs, reference) for a, b in zip(r["outputs"], ref)]
        out["identical_outputs"] = sum(a == b for a, b in pairs)
        out["compared_outputs"] = len(pairs)
    return out


# ------------------------------------------------------------------------------------------ N ranks
def _rank(rank, world, gpn, two_hop, port, model_dir, warmup, new_tokens, engine_kw, conn):
    """One gloo rank. Rank 0 runs each prompt set it receives on ``conn`` and sends back the run
    (None ends), then every layer's counters of every rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=1800))
    comm = build_mesh(MeshSpec(world, gpn, 1, world), rank).expert_comm()
    model = load_ep_model(model_dir, comm, two_hop=two_hop).eval()

    def session(work):
        """One EPEngine session: rank 0 does ``work(ep)``, then releases the others."""
        ep = EPEngine(model, **engine_kw)
        if rank == 0:
            work(ep)
            ep.close()
        else:
            ep.serve()

    def serve_commands(ep):
        conn.send("ready")
        while (prompts := conn.recv()) is not None:
            conn.send(timed_run(ep, prompts, new_tokens))

    session(lambda ep: timed_run(ep, warmup, 4))
    moes = list(model.moe_layers())
    for m in moes:                                   # count the timed runs only
        m.counters.reset()
    session(serve_commands)
    counters: list = [None] * world
    dist.all_gather_object(counters, [m.counters.as_dict() for m in moes])
    if rank == 0:
        conn.send(counters)
    dist.destroy_process_group()


class Group:
    """One layout's ranks, spawned with ``torch.multiprocessing``, warmed up, waiting for prompt sets."""

    def __init__(self, name, world, gpn, two_hop, model_dir, warmup, new_tokens, engine_kw):
        self.name = name
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.conn, child = mp.get_context("spawn").Pipe()
        self.ctx = mp.start_processes(_rank, args=(world, gpn, two_hop, port, model_dir, warmup, new_tokens,
                                                   engine_kw, child), nprocs=world, join=False, start_method="spawn")

    def ready(self) -> None:
        assert self.conn.recv() == "ready"

    def run(self, prompts) -> dict:
        self.conn.send(prompts)
        return self.conn.recv()

    def close(self) -> list:
        self.conn.send(None)
        counters = self.conn.recv()
        self.ctx.join()
        return counters


class Single:
    """The single-process engine, one torch thread, a fresh engine per run (this process)."""

    def __init__(self, model_dir, warmup, new_tokens, engine_kw):
        torch.set_num_threads(1)
        self.model, self.new_tokens, self.engine_kw = load_pretrained(model_dir).eval(), new_tokens, engine_kw
        self.run(warmup, 4)

    def run(self, prompts, new_tokens=None) -> dict:
        return timed_run(Engine(self.model, **self.engine_kw), prompts, new_tokens or self.new_tokens)


# ------------------------------------------------------------------------------------------ bytes
def measured_traffic(counters: list[list[dict]]) -> dict:
    """Copies and bytes each token sends per MoE layer (dispatch + combine, to other ranks), from every
    rank's every layer's counters."""
    tot: dict = {}
    tokens = 0
    for rank in counters:
        for layer in rank:
            tokens += sum(layer["node_visits"])
            for k, v in layer.items():
                if k != "node_visits":
                    tot[k] = tot.get(k, 0) + v

    def per(key):
        return tot.get(key, 0) / tokens if tokens else 0.0

    remote = ("inter", "intra")
    return dict(tokens_through_moe_layers=tokens,
                inter_copies=per("dispatch.inter.tokens"), intra_copies=per("dispatch.intra.tokens"),
                dispatch_bytes=sum(per(f"dispatch.{s}.bytes") for s in remote),
                combine_bytes=sum(per(f"combine.{s}.bytes") for s in remote),
                meta_bytes=sum(per(f"dispatch_meta.{s}.bytes") for s in remote),
                dispatch_row_bytes=tot.get("dispatch.intra.bytes", 0) / max(tot.get("dispatch.intra.tokens", 0), 1),
                combine_row_bytes=tot.get("combine.intra.bytes", 0) / max(tot.get("combine.intra.tokens", 0), 1))


def planned_traffic(cfg: ModelConfig, world: int, gpn: int) -> dict:
    """The planner's serve-mode all-to-all figures for a unit of ``world // gpn`` nodes × ``gpn`` GPUs,
    EP = ``world``, attention TP 1, no redundant experts (``dsv3 plan --mode serve``'s model)."""
    gpu = dataclasses.replace(get_gpu("h800"), gpus_per_node=gpn)
    unit = ServeUnit("prefill", nodes=world // gpn, tp=1, ep=world, redundant_slots=0, shared_as_routed=False)
    t = plan_serving(cfg, gpu, unit)["ep_traffic"]
    return dict(inter_copies=t["remote_nodes_per_token"], intra_copies=t["nvlink_copies_per_token"],
                gpus_per_token=t["gpus_per_token"], ib_bytes=t["ib_bytes_per_token"],
                nvlink_bytes=t["nvlink_bytes_per_token"], dispatch_bytes_per_copy=t["dispatch_bytes_per_copy"],
                combine_bytes_per_copy=t["combine_bytes_per_copy"])


def compare(measured: dict, planned: dict) -> dict:
    copies_m = measured["inter_copies"] + measured["intra_copies"]
    copies_p = planned["inter_copies"] + planned["intra_copies"]
    wire_p = copies_p * (measured["dispatch_row_bytes"] + measured["combine_row_bytes"])
    wire_m = measured["dispatch_bytes"] + measured["combine_bytes"]
    return dict(copies_ratio=copies_m / copies_p if copies_p else None,
                inter_copies_ratio=(measured["inter_copies"] / planned["inter_copies"]
                                    if planned["inter_copies"] else None),
                bytes_ratio_same_format=wire_m / wire_p if wire_p else None,
                planned_bytes_same_format=wire_p,
                bytes_ratio_vs_gpu_format=wire_m / (planned["ib_bytes"] + planned["nvlink_bytes"])
                if planned["ib_bytes"] + planned["nvlink_bytes"] else None)


# ------------------------------------------------------------------------------------------ driver
def prepare_model(args, tmp: Path) -> list[tuple[str, str]]:
    """(label, directory) of the models to run: the quickstart model (or a random tiny one), and with
    ``--wide`` a random wider configuration."""
    models = []
    if Path(args.model).is_dir():
        models.append((f"{args.model} (trained quickstart model)", args.model))
    else:
        torch.manual_seed(0)
        save_pretrained(Transformer(ModelConfig.preset("tiny")), tmp / "tiny")
        models.append(("tiny preset, random init (seed 0)", str(tmp / "tiny")))
    if args.wide:
        torch.manual_seed(0)
        save_pretrained(Transformer(ModelConfig.preset("tiny").replace(**WIDE)), tmp / "wide")
        models.append(("wide random config (hidden 256, 32 experts top-4, 4 groups top-2)", str(tmp / "wide")))
    return models


def bench_model(label: str, model_dir: str, args) -> dict:
    cfg = ModelConfig.load(model_dir)
    sets = request_sets(args.seed, cfg.vocab_size, args.requests, args.repeats)
    warmup = [p[:8] for p in sets[0][:4]]
    engine_kw = dict(max_batch=args.requests, max_len=64 + args.new_tokens + 8)
    layouts = [x for x in LAYOUTS if cfg.n_routed_experts % x[1] == 0]
    print(f"[{label}] starting {', '.join(x[0] for x in layouts)} …", flush=True)
    groups = [Group(name, world, gpn, two_hop, model_dir, warmup, args.new_tokens, engine_kw)
              for name, world, gpn, two_hop in layouts]
    single = Single(model_dir, warmup, args.new_tokens, engine_kw)
    for g in groups:
        g.ready()
    runners = [("1 rank (single-process engine)", single.run)] + [(g.name, g.run) for g in groups]
    runs: dict = {name: [] for name, _ in runners}
    for r, prompts in enumerate(sets):               # every layout once per round, in a rotating order
        for name, run in runners[r % len(runners):] + runners[:r % len(runners)]:
            print(f"[{label}] round {r + 1}/{len(sets)}: {name}", flush=True)
            runs[name].append(run(prompts))
    reference = [x["outputs"] for x in runs[runners[0][0]]]
    rows = [dict(layout=runners[0][0], ranks=1, **summarize(runs[runners[0][0]], None))]
    for g, (name, world, gpn, two_hop) in zip(groups, layouts):
        measured = measured_traffic(g.close())
        planned = planned_traffic(cfg, world, gpn)
        rows.append(dict(layout=name, ranks=world, gpus_per_node=gpn, two_hop=two_hop,
                         **summarize(runs[name], reference), measured=measured, planned=planned,
                         ratios=compare(measured, planned)))
    config = {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "first_k_dense_replace",
                                           "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                                           "moe_intermediate_size", "vocab_size")}
    return dict(model=label, config=config, rows=rows)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=len(os.sched_getaffinity(0)), python=platform.python_version(), torch=torch.__version__,
                threads_per_rank=1, backend="gloo (TCP on 127.0.0.1)", load_average_start=os.getloadavg())


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Expert-parallel serving: 1 rank vs 2 and 4 ({res['date']})", "",
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['backend']}, {m['threads_per_rank']} torch "
             f"thread per rank. Load average at the start {m['load_average_start'][0]:.1f}, at the end "
             f"{res['load_average_end'][0]:.1f} (the machine is shared).", "",
             f"{res['requests']} requests (prompts of 8…64 random ids) × {res['new_tokens']} greedy tokens, all "
             f"submitted at once; {res['repeats']} rounds with fresh prompts, each running every layout once "
             f"(rotating order); tokens/s of the median run, latencies over every request of every run, "
             f"measured where the tokens arrive (rank 0).", ""]
    for mod in res["models"]:
        c = mod["config"]
        lines += [f"## {mod['model']}", "",
                  f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers ({c['first_k_dense_replace']} dense), "
                  f"{c['n_routed_experts']} routed experts top-{c['num_experts_per_tok']} "
                  f"({c['n_group']} groups, top-{c['topk_group']}), fp32.", "",
                  "| layout | tokens/s | vs 1 rank | TTFT p50 / p95 ms | ITL p50 / p95 ms | outputs equal to 1 rank |",
                  "|---|---:|---:|---:|---:|---:|"]
        base = mod["rows"][0]["tokens_per_s"]
        for r in mod["rows"]:
            same = f"{r['identical_outputs']}/{r['compared_outputs']}" if "identical_outputs" in r else "(reference)"
            lines.append(f"| {r['layout']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}× | "
                         f"{r['ttft_ms_p50']:.0f} / {r['ttft_ms_p95']:.0f} | {r['itl_ms_p50']:.1f} / "
                         f"{r['itl_ms_p95']:.1f} | {same} |")
        lines += ["", "Dispatch + combine per token and MoE layer (to other ranks; measured = every layer's "
                  "`CommCounters`, planned = `plan_serving`'s `ep_traffic` for the same layout):", "",
                  "| layout | copies across nodes measured / planned | copies within a node measured / planned | "
                  "copies ratio | bytes measured (fp32 rows) | planned at fp32 rows | ratio | planned, GPU format "
                  "(FP8 dispatch + BF16 combine) | top-k ids + weights bytes |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mod["rows"][1:]:
            me, pl, ra = r["measured"], r["planned"], r["ratios"]
            lines.append(
                f"| {r['layout']} | {me['inter_copies']:.3f} / {pl['inter_copies']:.3f} | "
                f"{me['intra_copies']:.3f} / {pl['intra_copies']:.3f} | {ra['copies_ratio']:.3f} | "
                f"{me['dispatch_bytes'] + me['combine_bytes']:.0f} | {ra['planned_bytes_same_format']:.0f} | "
                f"{ra['bytes_ratio_same_format']:.3f} | {pl['ib_bytes'] + pl['nvlink_bytes']:.0f} | "
                f"{me['meta_bytes']:.0f} |")
        lines.append("")
    lines += [
        "Copies: a token's row goes once to each other rank (flat) or once to each other node and then to "
        "the ranks there (two-hop) holding one of its experts; the planner expects the same under uniform "
        "routing (`plan/comm.py`: every kept group and expert equally likely). A ratio above 1 means the "
        "model's routing sent tokens to more other ranks than uniform routing would, below 1 to fewer (more "
        "of them chose experts on their own rank). Bytes at the same format "
        "differ from copies only through the row size; the GPU-format column is what the planner prices "
        "(FP8 dispatch, BF16 combine), which this CPU run does not use (fp32 rows both ways). The top-k ids "
        "and gate weights travel with the rows (the last column), which the planner leaves out.", "",
        "Speed on this machine: every rank (and the single engine) runs one thread and the ranks share "
        "the 2 cores. 2 ranks use both cores but add gloo round trips to every step (each MoE layer's "
        "dispatch and combine, the step's control exchange) and split each batch into smaller matrix "
        "products; 4 ranks put two processes on each core: more ranks are slower here. The machine is "
        "shared with other jobs (load averages above), so the figures move by tens of percent from run to "
        "run (each run's tokens/s is in the JSON); the rounds interleave the layouts so the ratios hold "
        "better than the absolute numbers. Expert parallelism is for GPUs, where each rank has a device "
        "of its own and the experts no longer fit, or no longer stream fast enough, on one.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs/tiny/final"))
    ap.add_argument("--wide", action="store_true", help="also a random wider config (32 experts, 4 groups)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="rounds (every layout once each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    res = dict(benchmark="serve_ep", date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               machine=machine(), requests=args.requests, new_tokens=args.new_tokens, repeats=args.repeats,
               seed=args.seed, method="EPEngine on gloo ranks spawned with torch.multiprocessing (no HTTP), "
                                      "layouts interleaved by round")
    with tempfile.TemporaryDirectory() as tmp:
        res["models"] = [bench_model(label, d, args) for label, d in prepare_model(args, Path(tmp))]
    res["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_ep.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / "serve_ep.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
