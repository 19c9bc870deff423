"""Expert-parallel dispatch / combine (SPEC §2.2): time on gloo, and inter-node bytes at DeepSeek-V3 size.

Part 1 — time (multi-process, gloo on this machine: 4 ranks as 2 simulated nodes × 2):
dispatch + combine of ``dsv3.parallel.expert`` (layout, count exchange, metadata, permutations,
autograd-free forward) against bare ``all_to_all_single`` calls moving the same bytes per peer
(the same hops, there and back, on preallocated buffers). Overhead ratio = ours / bare.
Gloo on a shared 2-core CPU measures software overhead, not NVLink / InfiniBand.

Part 3 — the flat path's own CPU work (one process, no communication): layout, the packed row gather
and the combine's sum for one rank's rows, timed back-to-back and right after a 2 ms idle sleep. On a
VM the work that follows a blocking wait runs several times slower than back-to-back; the dispatch
has such work after every all-to-all, a bare all-to-all has none.

Part 2 — bytes (no processes, routing decisions only): DeepSeek-V3 routing (256 experts, top-8,
8 groups, top-4 groups) vs unrestricted top-8, on 64 ranks = 8 nodes × 8, hidden 7168, for random
and skewed gate scores. Per token: inter-node copies of the naive per-(token, expert) all-to-all,
of the flat per-(token, rank) dispatch (DeepEP normal kernels without the two-hop forwarding), and
of the two-hop path (one per (token, remote node)); bytes in BF16 and FP8 (E4M3 + 1×128 FP32 scales).

    python benchmarks/ep_dispatch.py [--tokens 512] [--hidden 256] [--iters 30] [--repeats 3] [--no-timing]

Writes benchmarks/results/ep_dispatch.{json,md} (or --out DIR).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv3.model.moe import route
from dsv3.parallel.expert import (CommCounters, DispatchCapacity, combine, dispatch, get_dispatch_layout,
                                  plan_dispatch)
from dsv3.parallel.expert import _gather, _row_spec, _sum_rows
from dsv3.parallel.mesh import MeshSpec, build_mesh

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------ part 1: gloo timing
def _timed(fns: dict, iters: int, warmup: int, group) -> dict:
    """Median seconds of each fn, interleaved: every iteration runs all of them (in a rotating order,
    each after a barrier), so a change in the machine's load hits them alike. Per rank the median,
    then the slowest rank's."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    ts = {name: [] for name in names}
    for i in range(iters):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            dist.barrier(group=group)
            t0 = time.perf_counter()
            fns[name]()
            ts[name].append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(ts[name]) for name in names], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(names, t.tolist()))


def _bare(hops, row_bytes, counts_over=None):
    """Pre-allocated byte buffers with the same per-peer sizes as the plan's hops, there and back;
    with ``counts_over`` (the EP group) a count exchange of the plan's size goes first."""
    bufs = []
    if counts_over is not None:
        width = 1 if len(hops) == 1 else 2
        c_send = torch.zeros(dist.get_world_size(counts_over), width, dtype=torch.int64)
        c_recv = torch.empty_like(c_send)
    for h in hops:
        send = torch.empty(sum(h.send_splits), row_bytes, dtype=torch.uint8)
        recv = torch.empty(sum(h.recv_splits), row_bytes, dtype=torch.uint8)
        bufs.append((h, send, recv))

    def run():
        if counts_over is not None:
            dist.all_to_all_single(c_recv, c_send, group=counts_over)
        for h, send, recv in bufs:
            if h.size > 1:
                dist.all_to_all_single(recv, send, h.recv_splits, h.send_splits, group=h.group)
        for h, send, recv in reversed(bufs):
            if h.size > 1:
                dist.all_to_all_single(send, recv, h.send_splits, h.recv_splits, group=h.group)
    return run


def _timing_worker(rank, world, gpn, port, args, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=120))
    comm = build_mesh(MeshSpec(world, gpn), rank).expert_comm()
    E, k, n_group, topk_group = 16, 4, 4, 2
    torch.manual_seed(rank)
    scores = torch.rand(args.tokens, E)
    idx = route(scores, None, k, n_group, topk_group)
    # other routings of the same tokens (fresh scores), for the row whose routing changes every call
    others = [route(torch.rand(args.tokens, E), None, k, n_group, topk_group) for _ in range(7)]
    w = torch.rand(args.tokens, k)
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(args.tokens, args.hidden).to(dtype)
        for two_hop in (False, True):
            for fp8, learn in ((False, False), (False, True), (False, "redrawn"), (True, False)):
                if (fp8 and dtype == torch.float32) or (learn and two_hop) or (learn == "redrawn" and
                                                                                dtype != torch.float32):
                    continue
                routings = [idx, *others] if learn == "redrawn" else [idx]
                calls = [0]
                # learn: the flat dispatch sends blocks padded to capacities learnt from the previous
                # dispatch (the warm-up below) instead of exchanging counts first
                cap = DispatchCapacity() if learn else None
                plan = plan_dispatch(idx, E, comm, two_hop, CommCounters(), capacity=cap)
                x_r, _ = dispatch(x, w, plan, fp8)         # builds the second hop (two-hop)
                # stand-in for the experts' output (not timed); padded blocks (learnt capacities) hold more rows
                y = torch.randn(2 * x_r.shape[0] + 64 * comm.size, x_r.shape[1]).to(dtype)

                def ours():           # "redrawn": each call routes the tokens anew (capacities lag a call)
                    calls[0] += 1
                    plan = plan_dispatch(routings[calls[0] % len(routings)], E, comm, two_hop, capacity=cap)
                    rows = dispatch(x, w, plan, fp8)[0].shape[0]
                    combine(y[:rows], plan)

                def plan_only():       # with learnt capacities: the layout alone (no count exchange)
                    plan_dispatch(idx, E, comm, two_hop, capacity=cap).wait()

                row = args.hidden + 4 * (-(-args.hidden // 128)) if fp8 else x.element_size() * args.hidden
                t = _timed(dict(ours=ours, plan=plan_only, bare=_bare(plan.hops, row),
                                counted=_bare(plan.hops, row, comm.group)), args.iters, 3, comm.group)
                name = (f"{'two-hop' if two_hop else 'flat'} {str(dtype).split('.')[-1]}{' fp8-dispatch' if fp8 else ''}"
                        f"{' learnt capacity' if learn else ''}{', routing redrawn each call' if learn == 'redrawn' else ''}")
                res[name] = dict(ours_ms=1e3 * t["ours"], plan_ms=1e3 * t["plan"], bare_a2a_ms=1e3 * t["bare"],
                                 bare_with_counts_ms=1e3 * t["counted"], overhead=t["ours"] / t["bare"],
                                 counts_floor=t["counted"] / t["bare"], hops=[h.kind for h in plan.hops],
                                 rows_sent_per_rank=[sum(h.send_splits) for h in plan.hops])
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def timing(args) -> dict:
    """``args.repeats`` runs of 4 fresh ranks; per path the run with the median overhead, and every
    run's overhead."""
    runs = []
    for _ in range(args.repeats):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = RESULTS / ".ep_timing.tmp.json"
        mp.start_processes(_timing_worker, args=(4, 2, port, args, str(out)), nprocs=4, start_method="spawn")
        runs.append(json.loads(out.read_text()))
        out.unlink()
    res = {}
    for name in runs[0]:
        rs = sorted((r[name] for r in runs), key=lambda r: r["overhead"])
        res[name] = dict(rs[len(rs) // 2], overhead_runs=[r[name]["overhead"] for r in runs])
    return res


# ------------------------------------------------------------------------------ part 3: CPU work, hot and after idling
def cpu_work(args, idle_s: float = 0.002, iters: int = 200) -> dict:
    """Median ms of the flat path's CPU steps for one rank of the timing setup (4 ranks, 16 experts
    top-4, 4 groups top-2): back-to-back, and each call after ``idle_s`` of sleep."""
    torch.set_num_threads(1)
    E, k, R = 16, 4, 4
    torch.manual_seed(args.seed)
    idx = route(torch.rand(args.tokens, E), None, k, 4, 2)
    w, x = torch.rand(args.tokens, k), torch.randn(args.tokens, args.hidden)
    y = torch.randn(args.tokens * R, args.hidden)      # stand-in for the experts' outputs (contiguous)

    def work():
        lay = get_dispatch_layout(idx, E, R, 2)
        _, rows = lay.is_token_in_rank.t().nonzero(as_tuple=True)
        lay.num_tokens_per_rank.tolist()
        meta = torch.cat([idx.to(torch.int32).view(torch.float32), w], 1)
        specs, width = _row_spec([meta, x])
        buf = _gather([meta, x], specs, width, rows)             # dispatch: rows into the send buffer
        _sum_rows(y[:rows.numel()], rows, args.tokens)          # combine: a token's copies summed
        return rows.numel()

    out = {}
    for name, idle in (("back_to_back", 0.0), ("after_idle", idle_s)):
        ts = []
        for _ in range(iters):
            if idle:
                time.sleep(idle)
            t0 = time.perf_counter()
            rows = work()
            ts.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = 1e3 * statistics.median(ts[iters // 10:])
    return dict(out, rows=rows, idle_ms=1e3 * idle_s, slowdown=out["after_idle_ms"] / out["back_to_back_ms"])


# ------------------------------------------------------------------------------ part 2: routing bytes
def _scores(n: int, E: int, regime: str, gen: torch.Generator) -> torch.Tensor:
    logits = torch.randn(n, E, generator=gen)
    if regime == "skewed":     # expert popularity: lognormal per expert plus hot groups of 32
        pop = torch.randn(E, generator=gen) * 0.5 + (torch.randn(E // 32, generator=gen) * 0.5).repeat_interleave(32)
        logits = logits + pop
    return logits.sigmoid()


def routing_bytes(tokens: int, seed: int) -> dict:
    E, k, n_group, topk_group = 256, 8, 8, 4
    nodes, gpn, hidden = 8, 8, 7168
    R = nodes * gpn
    bf16_row, fp8_row = 2 * hidden, hidden + 4 * (-(-hidden // 128))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for regime in ("random", "skewed"):
        scores = _scores(tokens, E, regime, gen)
        origin = torch.randint(0, R, (tokens,), generator=gen)        # the rank a token starts on
        for routing, (ng, tg) in (("node-limited (8 groups, top-4)", (n_group, topk_group)),
                                  ("unrestricted top-8", (1, 1))):
            idx = route(scores, None, k, ng, tg)
            lay = get_dispatch_layout(idx, E, R, gpn)
            on = origin // gpn
            remote_node = lay.is_token_in_node.clone()
            remote_node[torch.arange(tokens), on] = False
            node_of_rank = torch.arange(R) // gpn
            remote_rank = lay.is_token_in_rank & (node_of_rank[None, :] != on[:, None])
            per_expert_remote = ((idx // (E // R)) // gpn != on[:, None]).sum(1)
            copies = {
                "naive per (token, expert)": float(per_expert_remote.float().mean()),
                "flat per (token, rank)": float(remote_rank.sum(1).float().mean()),
                "two-hop per (token, node)": float(remote_node.sum(1).float().mean()),
            }
            # NVLink forwarding of the two-hop path: ranks reached on each node minus the receiving one
            two_hop_intra = float((lay.is_token_in_rank.sum(1) - lay.is_token_in_node.sum(1)).float().mean())
            out[f"{regime} / {routing}"] = dict(
                nodes_per_token_mean=float(lay.nodes_per_token.float().mean()),
                nodes_per_token_max=int(lay.nodes_per_token.max()),
                ranks_per_token_mean=float(lay.ranks_per_token.float().mean()),
                inter_node_copies_per_token=copies,
                inter_node_kib_per_token_bf16={n: v * bf16_row / 1024 for n, v in copies.items()},
                inter_node_kib_per_token_fp8={n: v * fp8_row / 1024 for n, v in copies.items()},
                two_hop_intra_node_copies_per_token=two_hop_intra,
            )
    return dict(experts=E, top_k=k, n_group=n_group, topk_group=topk_group, nodes=nodes, gpus_per_node=gpn,
                hidden=hidden, tokens=tokens, bf16_row_bytes=bf16_row, fp8_row_bytes=fp8_row, results=out)


# ------------------------------------------------------------------------------ report
def _markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Expert-parallel dispatch / combine ({m['date']}, {m['device']}, torch {m['torch']})", ""]
    if res.get("timing"):
        t = m["timing"]
        lines += [f"## Gloo timing: {t['ranks']} ranks as {t['nodes']} nodes × {t['gpus_per_node']}, "
                  f"{t['tokens']} tokens/rank, hidden {t['hidden']}, 16 experts top-4 (4 groups, top-2)", "",
                  "| path | dispatch+combine ms | of which plan ms | bare all_to_all ms (same bytes) | overhead "
                  "| overhead, each run | bare + one count exchange ms | its overhead |",
                  "|---|---:|---:|---:|---:|---|---:|---:|"]
        for name, r in res["timing"].items():
            runs = ", ".join(f"{o:.2f}" for o in r.get("overhead_runs", [r["overhead"]]))
            counted = (f"{r['bare_with_counts_ms']:.2f} | {r['counts_floor']:.2f}×" if "counts_floor" in r
                       else "– | –")
            lines.append(f"| {name} | {r['ours_ms']:.2f} | {r['plan_ms']:.2f} | {r['bare_a2a_ms']:.2f} | "
                         f"{r['overhead']:.2f}× | {runs} | {counted} |")
        load = t.get("load_average")
        lines += ["", "plan = layout + the layer's one count exchange (DeepEP's notify step); the top-k ids and "
                  "gate values travel in the payload's rows. FP8 rows include the CPU reference quantiser. "
                  "Bare = the same hops' all_to_all_single calls, there and back, on preallocated buffers of the "
                  "activation rows alone; \"bare + one count exchange\" adds the tiny all_to_all_single of the "
                  "counts that any dispatch with data-dependent sizes needs on gloo first — the floor of this "
                  "design. \"learnt capacity\" rows: the flat dispatch sends each peer a block padded to the "
                  "capacity learnt from the previous dispatch (`DispatchCapacity`: count + max(8, count/8)) "
                  "instead of exchanging counts first, and the blocks stay padded through the combine; their "
                  "bare all-to-all is still the unpadded rows, so the padding counts against them (routing is "
                  "the same every iteration in the other rows, so no block overflows there; the \"routing redrawn\" "
                  "row cycles through 8 routings of the same tokens, so the capacities always come from another "
                  "routing's counts and blocks overflow now and then — its bare all-to-all is the first routing's). "
                  "Each path's four timings are interleaved iteration by iteration; "
                  f"the row shown is the median of {t.get('repeats', 1)} runs.",
                  ""]
        if load:
            lines += [f"Machine load at the start (1/5/15-min load average on {t.get('cpus')} CPUs): "
                      f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} — gloo latency on a loaded machine is noisy.",
                      ""]
        lines += ["Targets (issue #16): dispatch+combine ≤ 1.5× bare for flat float32, ≤ 2× for two-hop. "
                  "`ep_dispatch.before.md` is the previous implementation timed by this benchmark.", ""]
    if res.get("cpu_work"):
        c = res["cpu_work"]
        lines += ["## The flat path's own CPU work (one process, no communication)", "",
                  f"Layout, packed row gather and combine sum for one rank's {c['rows']} rows (float32, hidden "
                  f"{m['timing']['hidden'] if m.get('timing') else ''}): **{c['back_to_back_ms']:.2f} ms** back-to-back, "
                  f"**{c['after_idle_ms']:.2f} ms** right after a {c['idle_ms']:.0f} ms idle sleep "
                  f"({c['slowdown']:.1f}× slower). In the timing above every one of these steps follows a "
                  "blocking wait (a barrier or an all-to-all), and 4 ranks share 2 cores; a bare all-to-all has "
                  "no such work.", ""]
        flat = res.get("timing", {}).get("flat float32")
        if flat:
            per_core = res["meta"]["timing"]["ranks"] / max(1, res["meta"]["timing"].get("cpus") or 1)
            floor = flat["bare_with_counts_ms"] + per_core * c["back_to_back_ms"]
            lines += [f"Floor of the count-exchange design here, flat float32: bare + one count exchange "
                      f"({flat['bare_with_counts_ms']:.2f} ms) "
                      f"+ {per_core:.0f} ranks per core × the CPU work back-to-back = **{floor:.2f} ms, "
                      f"{floor / flat['bare_a2a_ms']:.2f}× bare** (measured: {flat['ours_ms']:.2f} ms, "
                      f"{flat['overhead']:.2f}×). Learnt capacities take the count exchange out of that sum.", ""]
    b = res["bytes"]
    ep = b["nodes"] * b["gpus_per_node"]
    lines += [f"## Inter-node traffic per token: {b['experts']} experts top-{b['top_k']}, EP{ep} "
              f"= {b['nodes']} nodes × {b['gpus_per_node']}, hidden {b['hidden']} ({b['tokens']} tokens)", "",
              "| scores / routing | nodes/token (max) | naive copies | flat copies | two-hop copies | "
              "two-hop KiB BF16 | two-hop KiB FP8 | flat KiB BF16 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in b["results"].items():
        c = r["inter_node_copies_per_token"]
        kb, kf = r["inter_node_kib_per_token_bf16"], r["inter_node_kib_per_token_fp8"]
        lines.append(f"| {name} | {r['nodes_per_token_mean']:.2f} ({r['nodes_per_token_max']}) | "
                     f"{c['naive per (token, expert)']:.2f} | {c['flat per (token, rank)']:.2f} | "
                     f"{c['two-hop per (token, node)']:.2f} | {kb['two-hop per (token, node)']:.1f} | "
                     f"{kf['two-hop per (token, node)']:.1f} | {kb['flat per (token, rank)']:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank (timing)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (timing)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="timing runs (the median is reported)")
    ap.add_argument("--route-tokens", type=int, default=32768, help="tokens for the byte count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for ep_dispatch.{json,md}")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = dict(benchmark="ep_dispatch", date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                device=f"CPU ({platform.machine()}), gloo, 1 torch thread per rank", python=platform.python_version(),
                torch=torch.__version__, seed=args.seed)
    res = {"meta": meta}
    if not args.no_timing:
        meta["timing"] = dict(ranks=4, nodes=2, gpus_per_node=2, tokens=args.tokens, hidden=args.hidden,
                              iters=args.iters, repeats=args.repeats,
                              statistic="interleaved; median per rank, max over ranks; median run of the repeats",
                              load_average=os.getloadavg(), cpus=os.cpu_count())
        res["timing"] = timing(args)
        res["cpu_work"] = cpu_work(args)
    res["bytes"] = routing_bytes(args.route_tokens, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ep_dispatch.json").write_text(json.dumps(res, indent=1))
    md = _markdown(res)
    (args.out / "ep_dispatch.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
