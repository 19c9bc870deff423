"""Our pipeline runtime against ``torch.distributed.pipelining`` on the same model, on gloo (CPU).

The same dsv3 model (tiny-like, no MTP and no balance loss, since PyTorch's stages pass one tensor and
score only the last stage's output) is cut into 2·PP chunks placed in a V (rank r holds chunks r and
2PP−1−r) and stepped with

* ours: ``dualpipev`` (and, for context, ``zb1p`` and ``1f1b`` on PP chunks), through :class:`PipelineParallel`;
* PyTorch: ``ScheduleDualPipeV`` and ``ScheduleZBVZeroBubble`` with ``PipelineStage``.

One step = forward + backward of all micro-batches (no optimizer). Steps of the four variants are
interleaved (a barrier before each) so that load on the shared machine hits them alike; we report
the mean and standard deviation of the step time, and the ratios ours / PyTorch of both. The first
step's per-micro-batch losses of our dualpipev and PyTorch's DualPipeV are compared as a sanity check.

    python benchmarks/pipeline_runtime_vs_torch.py [--ranks 2] [--microbatches 8] [--steps 20]

Writes ``benchmarks/results/pipeline_runtime_vs_torch_pp{RANKS}.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dsv3 import ModelConfig, Transformer
from dsv3.model.rope import precompute_freqs_cis

RESULTS = Path(__file__).resolve().parent / "results"


def _config(args) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(
        vocab_size=512, hidden_size=args.hidden, num_hidden_layers=args.layers, first_k_dense_replace=1,
        intermediate_size=2 * args.hidden, num_attention_heads=4, q_lora_rank=args.hidden // 2,
        kv_lora_rank=args.hidden // 4, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=max(256, args.seq), n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=args.hidden // 2, n_group=2, topk_group=1, num_nextn_predict_layers=0)


def _model(cfg) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg).train()


class _TorchChunk(nn.Module):
    """One chunk for PyTorch's PipelineStage: tokens → h (first), h → h, h → logits (last)."""

    def __init__(self, model, span, first, last):
        super().__init__()
        self.cfg = model.cfg
        self.embed = model.embed_tokens if first else None
        self.blocks = nn.ModuleList(model.layers[i] for i in span)
        self.norm = model.norm if last else None
        self.head = model.lm_head if last else None

    def forward(self, x):
        h = self.embed(x) if self.embed is not None else x
        freqs = precompute_freqs_cis(self.cfg, h.shape[1], device=h.device)
        for b in self.blocks:
            h = b(h, freqs)
        return self.head(self.norm(h)).float() if self.head is not None else h


def _ce(logits, target):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _worker(rank, world, store, args, q):
    try:
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
        from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV, ScheduleZBVZeroBubble

        from dsv3.parallel.pipeline.stages import PipelineParallel, split_layers
        from dsv3.train.losses import token_loss

        cfg = _config(args)
        M, b = args.microbatches, args.mb_size
        g = torch.Generator().manual_seed(1)
        toks = torch.randint(0, cfg.vocab_size, (M * b, args.seq + 1), generator=g)
        inputs, targets = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
        loss_fn = functools.partial(token_loss, mtp_lambda=0.0)

        variants = {}
        for name in ("dualpipev", "zb1p", "1f1b"):
            model = _model(cfg)
            pipe = PipelineParallel(model, name, world, M, local_batch=M * b, loss_fn=loss_fn)
            variants[f"ours {name}"] = (model, pipe)
        torch_scheds = {}
        for cls in (ScheduleDualPipeV, ScheduleZBVZeroBubble):
            model = _model(cfg)
            C = 2 * world
            spans = split_layers(cfg.num_hidden_layers, C, cfg.num_nextn_predict_layers)
            stages = [PipelineStage(_TorchChunk(model, spans[s], s == 0, s == C - 1), s, C, torch.device("cpu"))
                      for s in (rank, C - 1 - rank)]
            torch_scheds[f"torch {cls.__name__}"] = (model, cls(stages, n_microbatches=M, loss_fn=_ce))

        def run(name):
            if name in variants:
                model, pipe = variants[name]
                res = pipe.run(inputs, targets)
                return [float(res.losses[m]) for m in sorted(res.losses)]
            model, sched = torch_scheds[name]
            losses: list = []
            if rank == 0:
                sched.step(inputs, target=targets, losses=losses)
            else:
                sched.step()
            return [float(x.detach()) for x in losses]

        names = list(variants) + list(torch_scheds)
        times = {n: [] for n in names}
        first = {}
        for step in range(args.warmup + args.steps):
            for n in names:
                model = (variants.get(n) or torch_scheds[n])[0]
                model.zero_grad(set_to_none=True)
                dist.barrier()
                t0 = time.perf_counter()
                losses = run(n)
                dist.barrier()
                dt = time.perf_counter() - t0
                if step == 0:
                    first[n] = losses
                if step >= args.warmup:
                    times[n].append(dt)
            if step == 0:  # gradients of our dualpipev vs PyTorch's DualPipeV (same placement, same init)
                ours_m, theirs_m = variants["ours dualpipev"][0], torch_scheds["torch ScheduleDualPipeV"][0]
                worst = 0.0
                for (na, pa), (nb, pb) in zip(ours_m.named_parameters(), theirs_m.named_parameters()):
                    assert na == nb
                    if pa.grad is not None and pb.grad is not None:
                        worst = max(worst, float((pa.grad - pb.grad).abs().max() / pb.grad.abs().max().clamp_min(1e-30)))
                    elif (pa.grad is None) != (pb.grad is None):
                        worst = float("inf")
                first["grad_max_rel_diff"] = worst
        q.put((rank, "ok", {"times": times, "first_losses": first}))
    except BaseException:
        import traceback

        q.put((rank, "error", traceback.format_exc()))


def _split_overhead(args) -> dict:
    """In one process: median time of F+B against F+I+W on one middle chunk (our split backward)."""
    from dsv3.parallel.pipeline.stages import ModelStage, split_layers
    from dsv3.train.losses import token_loss

    torch.set_num_threads(args.threads)
    cfg = _config(args)
    model = _model(cfg)
    spans = split_layers(cfg.num_hidden_layers, 2 * args.ranks, cfg.num_nextn_predict_layers)
    st = ModelStage(model, 1, 1, 2 * args.ranks, spans[1], loss_fn=functools.partial(token_loss, mtp_lambda=0.0))
    x = torch.randn(args.mb_size, args.seq, cfg.hidden_size)
    toks = torch.randint(0, cfg.vocab_size, (args.mb_size, args.seq + 1))
    data = (toks[:, :-1], toks[:, 1:])

    def full():
        out, _, _ = st.forward(0, x, data)
        st.backward(0, torch.ones_like(out))

    def split():
        out, _, _ = st.forward(0, x, data)
        st.backward_input(0, torch.ones_like(out))
        st.backward_weight(0)

    def median(f, n=15):
        f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    fb, fiw = median(full), median(split)
    return {"F+B_ms": 1e3 * fb, "F+I+W_ms": 1e3 * fiw, "ratio": fiw / fb}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--mb-size", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(), "store")
    procs = [ctx.Process(target=_worker, args=(r, args.ranks, store, args, q)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    got = {}
    for _ in procs:
        rank, status, payload = q.get(timeout=1800)
        if status != "ok":
            for p in procs:
                p.kill()
            raise SystemExit(f"rank {rank} failed:\n{payload}")
        got[rank] = payload
    for p in procs:
        p.join()
    times = got[0]["times"]
    stats = {n: {"mean_s": statistics.mean(t), "std_s": statistics.stdev(t), "median_s": statistics.median(t)}
             for n, t in times.items()}
    ours, theirs = "ours dualpipev", "torch ScheduleDualPipeV"
    ratios = {}
    for t in ("torch ScheduleDualPipeV", "torch ScheduleZBVZeroBubble"):
        ratios[f"{ours} / {t}"] = {"mean": stats[ours]["mean_s"] / stats[t]["mean_s"],
                                   "median": stats[ours]["median_s"] / stats[t]["median_s"],
                                   "std": stats[ours]["std_s"] / stats[t]["std_s"]}
    overhead = _split_overhead(args)
    fl = got[0]["first_losses"]
    grad_diff = max(got[r]["first_losses"]["grad_max_rel_diff"] for r in got)
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(fl[ours], fl[theirs])) if fl[theirs] else None
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "device": f"CPU ({os.cpu_count()} logical cores visible, shared), gloo, {args.threads} thread(s) per rank",
        "config": vars(args), "step_time": stats, "ratios": ratios,
        "first_step_loss_max_rel_diff_dualpipev_vs_torch": loss_diff,
        "first_step_grad_max_rel_diff_dualpipev_vs_torch": grad_diff,
        "split_backward_one_chunk": overhead,
    }
    OUT = RESULTS / f"pipeline_runtime_vs_torch_pp{args.ranks}"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(res, indent=1))
    lines = [
        "# Pipeline runtime: ours vs torch.distributed.pipelining (gloo, CPU)", "",
        f"{res['date']}, torch {res['torch']}, {res['device']}; {args.ranks} ranks, {args.microbatches} "
        f"micro-batches of {args.mb_size}×{args.seq} tokens, hidden {args.hidden}, {args.layers} layers "
        f"(2·PP chunks in a V), {args.steps} timed steps (forward + backward, no optimizer), interleaved.", "",
        "| variant | mean step (ms) | std (ms) | median (ms) |", "|---|---|---|---|",
    ]
    for n, s in stats.items():
        lines.append(f"| {n} | {1e3 * s['mean_s']:.1f} | {1e3 * s['std_s']:.1f} | {1e3 * s['median_s']:.1f} |")
    lines += ["", "| ratio | mean | median | std (spread) |", "|---|---|---|---|"]
    for n, r in ratios.items():
        lines.append(f"| {n} | {r['mean']:.3f} | {r['median']:.3f} | {r['std']:.3f} |")
    lines += ["", f"First step, ours dualpipev vs PyTorch DualPipeV: per-micro-batch losses differ by at most "
                  f"{loss_diff:.2e} (relative), parameter gradients by at most {grad_diff:.2e} (relative to each "
                  "tensor's largest entry).", "",
              "Notes: all ranks share the machine's cores, so stages cannot run in parallel and the step time "
              "is total compute plus per-action overhead; bubbles barely matter. Our zero-bubble split "
              "backward costs extra here: on one chunk F+I+W takes "
              f"{overhead['F+I+W_ms']:.1f} ms against {overhead['F+B_ms']:.1f} ms for F+B "
              f"(×{overhead['ratio']:.2f}) — graph analysis in Python and one autograd call per parameter "
              "group, a fixed cost per action that shrinks relative to the GEMMs of a real model."]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
