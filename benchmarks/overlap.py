"""How much expert all-to-all time hides behind computation with ``--overlap`` (dsv3.parallel.overlap).

Two layouts on gloo ranks of this machine, each step run with overlap off and on (same inputs):

* plain EP: ``--ep 2`` on 2 ranks, two micro-batches per step (lane 0 and lane 1 at once);
* ``--pp 2 --ep 2`` DualPipeV on 4 ranks: F&B pairs run their forward and backward chunks at once.

Per rank, the trace gives the all-to-all time of each lane and the part of it during which the other
lane was computing ("hidden"); with overlap off the lanes never run together, so nothing is hidden.
Gradients with overlap on must equal those with it off bitwise. Writes
``benchmarks/results/overlap.{md,json}``, a timeline PNG per layout and Chrome traces
(``benchmarks/results/overlap_trace_*.json``: open in chrome://tracing or ui.perfetto.dev).

    python benchmarks/overlap.py [--steps 3] [--out benchmarks/results] [--realtime] [--hidden 128]
        [--rows 4] [--microbatches 32] [--layers 10]

``--realtime`` runs the ranks in SCHED_FIFO and writes ``overlap_realtime.*``; with more ranks than
cores it understates the overlap (``_sched.py``). ``--hidden H`` scales every width of the model with H
(more compute per byte of all-to-all; files ``overlap_hH*``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from _sched import scheduling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def _config(hidden: int = 128, layers: int = 10):
    """``layers`` layers (the first dense) and one MTP module, 8 experts top-2; every width proportional
    to ``hidden`` (128: the default)."""
    from dsv3 import ModelConfig

    h = hidden
    return ModelConfig.preset("tiny").replace(
        vocab_size=512, hidden_size=h, num_hidden_layers=layers, first_k_dense_replace=1, intermediate_size=2 * h,
        num_attention_heads=4, q_lora_rank=h // 2, kv_lora_rank=h // 4, qk_nope_head_dim=h // 8,
        qk_rope_head_dim=h // 8, v_head_dim=h // 8, max_position_embeddings=128, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=h, n_group=1, topk_group=1,
        num_nextn_predict_layers=1)


def moe_layers_per_chunk(cfg, pp: int = 2) -> list[int]:
    """MoE layers (an MTP module counts as one) in each of DualPipeV's 2·``pp`` chunks. A rank pairs the
    forward of one of its two chunks with the backward of the other, so the pair's lanes issue the same
    number of all-to-alls only when its two chunks hold the same number of MoE layers."""
    from dsv3.parallel.pipeline.schedule import split_layers

    spans = split_layers(cfg.num_hidden_layers, 2 * pp, cfg.num_nextn_predict_layers)
    counts = [sum(1 for i in r if i >= cfg.first_k_dense_replace) for r in spans]
    counts[-1] += cfg.num_nextn_predict_layers
    return counts


def _suffix(hidden: int, realtime: bool) -> str:
    """Result-file suffix: ``_h{hidden}`` for a non-default width, ``_realtime`` for --realtime."""
    return (f"_h{hidden}" if hidden != 128 else "") + ("_realtime" if realtime else "")


def _batch(rows, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 512, (rows, T + 2), generator=g)
    return toks[:, :-1].contiguous(), toks[:, 1:].contiguous()


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and not p.is_meta}


def _plain_ep(rank, world, overlap, steps, mb_rows, M=2, hidden=128, layers=10):
    """Two micro-batches per step through an EP model; returns (per-step seconds, events, grads)."""
    import torch.distributed as dist

    from dsv3 import Transformer
    from dsv3.parallel import overlap as ov
    from dsv3.parallel.ep_model import convert_to_expert_parallel
    from dsv3.parallel.mesh import MeshSpec, build_mesh
    from dsv3.train.losses import compute_loss

    mesh = build_mesh(MeshSpec(world, world, 1, world), rank)
    torch.manual_seed(0)
    model = Transformer(_config(hidden, layers))
    convert_to_expert_parallel(model, mesh.expert_comm())
    if overlap:
        mesh.add_lane(1)
    inputs, targets = _batch(2 * mb_rows * world, seed=1)
    mine = slice(rank * 2 * mb_rows, (rank + 1) * 2 * mb_rows)
    inputs, targets = inputs[mine], targets[mine]

    def micro(i):
        sl = slice(i * mb_rows, (i + 1) * mb_rows)
        with ov.span("work", f"micro-batch {i}"):
            loss, _ = compute_loss(model, inputs[sl], targets[sl], 0.3, 1e-3)
            (loss / 2).backward()

    times, trace = [], ov.Trace()
    for s in range(steps):
        model.zero_grad(set_to_none=True)
        trace.clear()
        ov.set_trace(trace)
        dist.barrier()
        t0 = time.perf_counter()
        if overlap:
            ov.run_pair(lambda: micro(0), lambda: micro(1))
        else:
            micro(0)
            micro(1)
        times.append(time.perf_counter() - t0)
        ov.set_trace(None)
    return times, list(trace.events), _grads(model)


def _pp_ep(rank, world, overlap, steps, mb_rows, M, hidden=128, layers=10):
    """One DualPipeV step of pp2 × ep2 (M micro-batches per replica)."""
    import functools

    import torch.distributed as dist

    from dsv3 import Transformer
    from dsv3.parallel import overlap as ov
    from dsv3.parallel.mesh import MeshSpec, build_mesh
    from dsv3.parallel.pipeline.stages import PipelineParallel
    from dsv3.train.losses import eval_sums, routing_balance_loss, token_loss

    mesh = build_mesh(MeshSpec(world, world, 2, 2), rank)
    torch.manual_seed(0)
    model = Transformer(_config(hidden, layers))
    pipe = PipelineParallel(model, "dualpipev", 2, M, local_batch=M * mb_rows, mesh=mesh, overlap=overlap,
                            loss_fn=functools.partial(token_loss, mtp_lambda=0.3), eval_fn=eval_sums,
                            balance_fn=functools.partial(routing_balance_loss, balance_alpha=1e-3))
    dp = mesh.spec.dp
    inputs, targets = _batch(M * mb_rows * dp, seed=1)
    d = pipe.dp_rank
    mine = slice(d * M * mb_rows, (d + 1) * M * mb_rows)
    times, trace = [], ov.Trace()
    for s in range(steps):
        for _, p in pipe.named_parameters():
            p.grad = None
        trace.clear()
        ov.set_trace(trace)
        dist.barrier()
        t0 = time.perf_counter()
        pipe.run(inputs[mine], targets[mine])
        times.append(time.perf_counter() - t0)
        ov.set_trace(None)
    return times, list(trace.events), _grads(model)


def _worker(rank, world, store, layout, steps, mb_rows, M, out_dir, q, realtime=False, hidden=128, layers=10):
    try:
        import torch.distributed as dist

        if realtime:
            from _sched import realtime as enter_realtime
            enter_realtime()
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
        from dsv3.parallel import overlap as ov

        fn = _plain_ep if layout == "ep2" else _pp_ep
        res = {}
        grads = {}
        for mode in (False, True):
            times, events, grads[mode] = fn(rank, world, mode, steps, mb_rows, M, hidden, layers)
            summ = ov.overlap_summary(events)
            res["on" if mode else "off"] = {"step_s": sorted(times)[len(times) // 2], **summ}
            if rank == 0:
                rt = _suffix(hidden, realtime)
                tag = f"{layout}_{'on' if mode else 'off'}{rt}"
                ov.write_chrome_trace(events, os.path.join(out_dir, f"overlap_trace_{tag}.json"), rank)
                if mode:
                    ov.plot_timeline(events, os.path.join(out_dir, f"overlap_{layout}{rt}.png"),
                                     f"{layout}, rank 0, overlap on: compute (blue), all-to-all (orange)")
        res["bitwise"] = grads[False].keys() == grads[True].keys() and all(
            torch.equal(grads[False][k], grads[True][k]) for k in grads[False])
        q.put((rank, "ok", res))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def run_layout(layout, world, steps, mb_rows, M, out_dir, realtime=False, hidden=128, layers=10):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(), "store")
    procs = [ctx.Process(target=_worker, args=(r, world, store, layout, steps, mb_rows, M, out_dir, q, realtime, hidden, layers))
             for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    for _ in range(world):
        rank, status, payload = q.get(timeout=900)
        if status != "ok":
            raise RuntimeError(f"rank {rank}:\n{payload}")
        out[rank] = payload
    for p in procs:
        p.join(timeout=30)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--microbatches", type=int, default=32, help="DualPipeV micro-batches per step")
    ap.add_argument("--layers", type=int, default=10,
                    help="trunk layers (the first dense, plus one MTP module); 10 gives each rank's two DualPipeV "
                         "chunks equal MoE layers")
    ap.add_argument("--realtime", action="store_true",
                    help="run the ranks in SCHED_FIFO (root). With more ranks than cores this starves gloo's "
                         "transport threads behind computation and understates the overlap (see _sched.py)")
    ap.add_argument("--hidden", type=int, default=128,
                    help="model width (every other width proportional); a multiple of 64. Wider = more compute "
                         "per byte of all-to-all")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    if args.hidden < 64 or args.hidden % 64:
        ap.error(f"--hidden {args.hidden}: must be a positive multiple of 64")
    if args.layers < 4:
        ap.error(f"--layers {args.layers}: DualPipeV on 2 ranks needs at least 4 layers")
    if args.microbatches < 4 or args.microbatches % 2:
        ap.error(f"--microbatches {args.microbatches}: DualPipeV on 2 ranks needs an even number, at least 4")
    moe = moe_layers_per_chunk(_config(args.hidden, args.layers))
    rt = _suffix(args.hidden, args.realtime)
    os.makedirs(args.out, exist_ok=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"load {os.getloadavg()[0]:.1f}", "torch": torch.__version__, "layouts": {}}
    lines = ["# Expert all-to-all hidden behind computation (`--overlap`)", "",
             f"gloo ranks on one machine ({results['machine']}), torch {torch.__version__}, 1 thread per rank, "
             f"{args.steps} steps (median), micro-batches of {args.rows} × 64 tokens ({args.microbatches} per DualPipeV step; "
             f"config: {args.layers} layers (the first dense) + 1 MTP module, 8 experts top-2, hidden {args.hidden}, "
             f"expert width {args.hidden}; MoE layers per DualPipeV chunk {moe}: pipeline rank 0 (ranks 0 and 1) "
             f"holds chunks 0 and 3, pipeline rank 1 (ranks 2 and 3) chunks 1 and 2). "
             f"`{' '.join(['python benchmarks/overlap.py', *sys.argv[1:]])}`; {scheduling(args.realtime)}.", "",
             "| layout | rank | all-to-all ms (off) | hidden (off) | all-to-all ms (on) | hidden (on) "
             "| on, not hidden: other lane communicating too / waiting for its turn / without paired work "
             "| step ms off → on | grads bitwise equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for layout, world, M in (("ep2", 2, 2), ("pp2_ep2_dualpipev", 4, args.microbatches)):
        out = run_layout(layout, world, args.steps, args.rows, M, args.out, args.realtime, args.hidden, args.layers)
        results["layouts"][layout] = out
        for r in sorted(out):
            o = out[r]
            lines.append(f"| {layout} | {r} | {o['off']['comm_s'] * 1e3:.1f} | {o['off']['hidden_fraction']:.0%} | "
                         f"{o['on']['comm_s'] * 1e3:.1f} | {o['on']['hidden_fraction']:.0%} | "
                         + " / ".join(f"{o['on'][k] / o['on']['comm_s']:.0%}"
                                      for k in ("both_comm_s", "other_waiting_s", "other_idle_s"))
                         + f" | {o['off']['step_s'] * 1e3:.0f} → {o['on']['step_s'] * 1e3:.0f} | {o['bitwise']} |")
        print("\n".join(lines[-len(out):]), flush=True)
    lines += ["", "Hidden: the share of a lane's all-to-all time (including waiting for the peer) during which "
              "the other lane was computing, from the trace of the last step. Timelines: "
              f"`overlap_ep2{rt}.png`, `overlap_pp2_ep2_dualpipev{rt}.png`; Chrome traces `overlap_trace_*{rt}.json`. "
              "DualPipeV pairs a forward with a backward chunk only in its steady phase: the all-to-alls of the "
              "warm-up forwards and cool-down backwards have no paired work on the other lane (fewer, the more "
              "micro-batches); inside a pair, a chunk with more MoE layers than its partner has all-to-alls "
              "left over once the partner is done.", "",
              "Lowest hidden share per layout (target ≥ 60%): " + ", ".join(
                  f"{lay} {min(o['on']['hidden_fraction'] for o in res.values()):.0%}"
                  for lay, res in results["layouts"].items()) + "."]
    with open(os.path.join(args.out, f"overlap{rt}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"overlap{rt}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {os.path.join(args.out, f'overlap{rt}.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
