"""Two-micro-batch overlap in expert-parallel serving (``dsv3 serve --ep N --tbo``), measured.

N gloo ranks on this machine (spawned) serve the same requests with TBO off and on: mixed prompt
lengths, half greedy, half sampled with seeds, spread over the ranks. Per rank, the trace gives the
dispatch/combine time of each lane and the share of it during which the other lane computed
("overlapped"); rank 0 times every lockstep step. Outputs with TBO on must equal those with it off.
Writes ``benchmarks/results/serve_tbo.{md,json}`` and ``serve_tbo.png`` (rank 0's lanes over a few
decode steps with TBO on); with ``--realtime`` (ranks in SCHED_FIFO, shielded from the machine's
other processes; see ``_sched.py``) ``serve_tbo_realtime.*``.

    python benchmarks/serve_tbo.py [--ranks 2] [--requests 32] [--new-tokens 24] [--realtime]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

from _sched import scheduling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def _config(d: int, heads: int):
    """8 layers (7 MoE), hidden ``d``, ``heads`` MLA heads of 32 + 16 dims, 8 routed experts top-2 of
    width d and a shared one."""
    from dsv3 import ModelConfig

    return ModelConfig.preset("tiny").replace(
        vocab_size=2048, hidden_size=d, num_hidden_layers=8, first_k_dense_replace=1, intermediate_size=2 * d,
        num_attention_heads=heads, q_lora_rank=d // 2, kv_lora_rank=d // 4, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=256, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=d, n_group=1, topk_group=1, num_nextn_predict_layers=1)


def _requests(n: int, new_tokens: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = int(torch.randint(8, 128, (1,), generator=g))
        out.append(dict(prompt=torch.randint(0, vocab, (length,), generator=g).tolist(), new=new_tokens,
                        temperature=0.0 if i % 2 == 0 else 0.8, seed=i))
    return out


def _serve(rank, comm, model_dir, tbo, args, trace_dir):
    """One serving run; returns (rank 0's outputs and step seconds, this rank's trace events)."""
    from dsv3.infer.ep_engine import EPEngine, load_ep_model
    from dsv3.infer.sampling import SamplingParams

    model = load_ep_model(model_dir, comm)
    ep = EPEngine(model, tbo=tbo, trace_dir=trace_dir, max_batch=args.requests, block_size=32,
                  prefill_chunk=args.prefill_chunk, max_len=256)
    steps: list[tuple[float, float]] = []
    outputs = None
    if rank == 0:
        reqs = [ep.submit(r["prompt"], r["new"], SamplingParams(r["temperature"]), seed=r["seed"])
                for r in _requests(args.requests, args.new_tokens, model.cfg.vocab_size)]
        while ep.pending:
            t0 = time.perf_counter()
            ep.step()
            steps.append((t0, time.perf_counter()))
        outputs = [r.output for r in reqs]
        ep.close()
    else:
        ep.serve()
    return outputs, steps, list(ep.trace.events)


def _worker(rank, world, store, model_dir, args, out_dir, tmp):
    """One rank: serve with TBO off, then on; writes its summaries to ``tmp/rank{r}.json``."""
    import torch.distributed as dist

    from dsv3.parallel import overlap as ov
    from dsv3.parallel.mesh import MeshSpec, build_mesh

    if args.realtime:
        from _sched import realtime
        realtime()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    mesh = build_mesh(MeshSpec(world, world), rank)
    mesh.add_lane(1)
    comm = mesh.expert_comm()
    res, outputs = {}, {}
    for tbo in (False, True):
        key = "on" if tbo else "off"
        outputs[key], steps, events = _serve(rank, comm, model_dir, tbo, args, os.path.join(tmp, f"trace_{key}"))
        res[key] = ov.overlap_summary(events)
        if rank == 0:
            res[key].update(_step_times(steps))
            if tbo:
                _plot_steps(events, steps, os.path.join(out_dir, f"{_name(args)}.png"))
    if rank == 0:
        res["identical"] = outputs["on"] == outputs["off"]
        res["tokens"] = sum(len(o) for o in outputs["on"])
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def _name(args) -> str:
    return "serve_tbo_realtime" if args.realtime else "serve_tbo"


def _step_times(steps: list[tuple[float, float]]) -> dict:
    secs = [b - a for a, b in steps]
    return dict(steps=len(secs), step_ms_median=statistics.median(secs) * 1e3, step_ms_mean=statistics.mean(secs) * 1e3,
                serve_s=steps[-1][1] - steps[0][0])


def _plot_steps(events, steps, path: str) -> None:
    """The lanes over 4 steps from the middle of the run (decode)."""
    from dsv3.parallel.overlap import plot_timeline

    mid = len(steps) // 2
    lo, hi = steps[mid][0], steps[min(mid + 3, len(steps) - 1)][1]
    plot_timeline([e for e in events if lo <= e[3] and e[4] <= hi], path,
                  "serving, --tbo, rank 0 over 4 steps: compute (blue), dispatch/combine (orange)")


def run(world: int, args, out_dir: str) -> dict:
    """Spawn the ranks (an error on any is raised here, with its traceback); their summaries by rank."""
    from dsv3 import Transformer, save_pretrained

    tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    save_pretrained(Transformer(_config(args.hidden, args.heads)), tmp)
    mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), tmp, args, out_dir, tmp), nprocs=world,
                       start_method="spawn")
    out = {}
    for r in range(world):
        with open(os.path.join(tmp, f"rank{r}.json")) as f:
            out[r] = json.load(f)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256, help="the model's hidden size")
    ap.add_argument("--heads", type=int, default=4, help="the model's attention heads")
    ap.add_argument("--realtime", action="store_true",
                    help="run the ranks in SCHED_FIFO, shielded from the machine's other processes (root)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    out = run(args.ranks, args, args.out)
    r0 = out[0]
    lines = ["# Two-micro-batch overlap in expert-parallel serving (`--tbo`)", "",
             f"{args.ranks} gloo ranks on one machine ({machine}), torch {torch.__version__}, 1 thread per rank; "
             f"{args.requests} requests (prompts 8-127 tokens, {args.new_tokens} new tokens, half greedy, half sampled "
             f"with seeds) spread over the ranks; config: 8 layers (7 MoE), hidden {args.hidden}, {args.heads} MLA "
             f"heads, 8 experts top-2 + 1 shared. "
             f"`python benchmarks/serve_tbo.py --ranks {args.ranks} --hidden {args.hidden} --heads {args.heads}"
             f"{' --realtime' if args.realtime else ''}`; {scheduling(args.realtime)}.", "",
             "| rank | dispatch/combine ms (off) | overlapped (off) | dispatch/combine ms (on) | overlapped (on) "
             "| on, not overlapped: other lane communicating too / waiting for its turn / done |",
             "|---|---|---|---|---|---|"]
    for r in sorted(out):
        o = out[r]
        on = o["on"]
        rest = " / ".join(f"{on[k] / on['comm_s']:.0%}" for k in ("both_comm_s", "other_waiting_s", "other_idle_s"))
        lines.append(f"| {r} | {o['off']['comm_s'] * 1e3:.0f} | {o['off']['hidden_fraction']:.0%} | "
                     f"{on['comm_s'] * 1e3:.0f} | {on['hidden_fraction']:.0%} | {rest} |")
    lines += ["", "| TBO | steps | step ms (median) | step ms (mean) | serving s | outputs identical on/off |",
              "|---|---|---|---|---|---|"]
    for key in ("off", "on"):
        o = r0[key]
        lines.append(f"| {key} | {o['steps']} | {o['step_ms_median']:.1f} | {o['step_ms_mean']:.1f} | "
                     f"{o['serve_s']:.2f} | {r0['identical']} |")
    lines += ["", "Overlapped: the share of a lane's dispatch/combine time (count exchange and all-to-alls, "
              "including waiting for the peer) during which the other lane of the same rank was computing, "
              "over the whole run (`overlap_summary`). With TBO off the lanes never run together, so nothing "
              "overlaps. The lanes hand the rank's core to each other at every collective in strict alternation "
              "(`parallel/overlap.py`), so both ranks run the lanes' pieces in the same order. Timeline of rank 0 "
              f"over 4 steps: `{_name(args)}.png`."]
    with open(os.path.join(args.out, f"{_name(args)}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"{_name(args)}.json"), "w") as f:
        json.dump({"machine": machine, "torch": torch.__version__, "args": vars(args), "ranks": out}, f, indent=1)
    print("\n".join(lines))
    return 0 if r0["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
