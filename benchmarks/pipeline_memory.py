"""Parameter memory per pipeline rank: ``--pp 1`` against ``--pp 2`` / ``--pp 4`` (SPEC §2.1).

Every rank builds the model the way ``dsv3 train --pp N`` does — ``torch.manual_seed(seed)``, the
:class:`~dsv3.model.Transformer` on the ``meta`` device, then :class:`PipelineParallel`, which gives
storage only to the parameters and buffers of the rank's stages (DualPipe's mirrored copy and the
1F1B/ZB1P embedding replica included) — and reports the bytes that actually have storage. The
``--pp 1`` row is the whole model (what every rank held before pipeline ranks materialised only their
stages). Ranks are gloo processes on the CPU; nothing is trained.

    python benchmarks/pipeline_memory.py [--configs tiny,tiny-8L,small] [--pp 2,4]

Writes ``benchmarks/results/pipeline_memory.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import queue
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv3 import ModelConfig, Transformer
from dsv3.parallel.pipeline.schedule import SCHEDULES

RESULTS = Path(__file__).resolve().parent / "results"


def _config(name: str) -> ModelConfig:
    if name == "tiny-8L":   # the tiny preset with 8 blocks (1 dense + 7 MoE)
        return ModelConfig.preset("tiny").replace(num_hidden_layers=8)
    return ModelConfig.preset(name)


def _sizes(cfg: ModelConfig) -> dict:
    with torch.device("meta"):
        m = Transformer(cfg)
    p = sum(t.numel() * t.element_size() for t in m.parameters())
    b = sum(t.numel() * t.element_size() for t in m.buffers())
    return {"parameters": sum(t.numel() for t in m.parameters()), "parameter_bytes": p, "buffer_bytes": b,
            "layers": cfg.num_hidden_layers, "mtp": cfg.num_nextn_predict_layers, "vocab": cfg.vocab_size,
            "hidden": cfg.hidden_size}


def _worker(rank, world, store, configs, q):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        from dsv3.parallel.pipeline.stages import PipelineParallel, materialized_bytes
        from dsv3.train.losses import token_loss

        out = []
        for cname in configs:
            cfg = _config(cname)
            for sched in SCHEDULES:
                torch.manual_seed(0)
                t0 = time.perf_counter()
                with torch.device("meta"):
                    model = Transformer(cfg)
                pipe = PipelineParallel(model, sched, world, None, local_batch=720, loss_fn=token_loss)
                seconds = time.perf_counter() - t0
                mb = materialized_bytes(model)
                out.append({"config": cname, "schedule": sched, "pp": world, "rank": rank,
                            "stages": sorted(pipe.stages), "chunks": [pipe.schedule.stage_chunk[s] for s in sorted(pipe.stages)],
                            "parameter_bytes": mb["parameters"], "buffer_bytes": mb["buffers"],
                            "build_seconds": round(seconds, 3)})
                del pipe, model
                dist.barrier()
        q.put((rank, "ok", out))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def _spawn(world: int, configs: list[str]) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = tempfile.mktemp(prefix="pp-memory-store-")
    procs = [ctx.Process(target=_worker, args=(r, world, store, configs, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    rows, got = [], 0
    try:
        while got < world:
            try:
                rank, status, payload = q.get(timeout=5.0)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    raise RuntimeError("a rank died without reporting")
                continue
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            rows += payload
            got += 1
    finally:
        for p in procs:
            p.join(timeout=30)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="tiny,tiny-8L,small")
    ap.add_argument("--pp", default="2,4")
    args = ap.parse_args(argv)
    configs = args.configs.split(",")
    sizes = {c: _sizes(_config(c)) for c in configs}
    rows = []
    for pp in (int(x) for x in args.pp.split(",")):
        rows += _spawn(pp, configs)
    summary = []
    for c in configs:
        full = sizes[c]["parameter_bytes"]
        summary.append({"config": c, "schedule": "-", "pp": 1, "per_rank_parameter_bytes": [full],
                        "max_fraction_of_model": 1.0})
        for pp in sorted({r["pp"] for r in rows}):
            for s in SCHEDULES:
                rs = sorted((r for r in rows if r["config"] == c and r["pp"] == pp and r["schedule"] == s),
                            key=lambda r: r["rank"])
                per = [r["parameter_bytes"] for r in rs]
                summary.append({"config": c, "schedule": s, "pp": pp, "per_rank_parameter_bytes": per,
                                "per_rank_fraction_of_model": [round(b / full, 4) for b in per],
                                "max_fraction_of_model": round(max(per) / full, 4),
                                "sum_over_ranks_fraction": round(sum(per) / full, 4)})
    res = {"what": "bytes of parameters with storage on each pipeline rank after PipelineParallel "
                   "(model built on the meta device, only the rank's stages materialised); pp=1: the whole model",
           "notes": [
               "before pipeline ranks materialised only their stages, every rank held the pp=1 bytes",
               "1f1b/zb1p: the last rank also holds the embedding replica used by the MTP modules (SPEC 2.1)",
               "dualpipe: rank r holds chunks r and PP-1-r (2x parameters by design); with pp=2 that is the whole model",
               "dualpipev: 2*PP chunks in a V, one copy of the model over the ranks; chunks may hold no block "
               "when layers < 2*PP (tiny, pp=4: rank 3's chunks 3 and 4 are empty)",
               "checkpoints gather to rank 0 into host RAM (model + optimizer state, ~3x parameter bytes with "
               "fp32 moments); the final export materialises the whole model on rank 0's device",
           ],
           "platform": platform.platform(), "torch": torch.__version__, "configs": sizes, "summary": summary,
           "ranks": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_memory.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"{'config':8} {'sched':10} {'pp':>2}  per-rank parameter MiB (fraction of the model)")
    for s in summary:
        per = ", ".join(f"{b / 2**20:.2f} ({b / sizes[s['config']]['parameter_bytes']:.2f})"
                        for b in s["per_rank_parameter_bytes"])
        print(f"{s['config']:8} {s['schedule']:10} {s['pp']:>2}  {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
