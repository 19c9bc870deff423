"""Reproduce SPEC §2.1 Table 2 (DualPipe README) with our schedules and simulator.

For each schedule and PP in 2, 4, 8, 16, simulate with equal-cost stages at two micro-batch counts
(M and 2M) and write the per-rank bubble, peak activations and parameter copies next to the closed
form, plus the makespan under the blocking ``batch_isend_irecv`` model, to
``benchmarks/results/pipeline_table2.{json,md}``.

    python benchmarks/pipeline_table2.py [--F 1 --B 2 --W 1 --FB 2.5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

from dsv3.parallel import pipeline

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--F", type=float, default=1.0)
    ap.add_argument("--B", type=float, default=2.0)
    ap.add_argument("--W", type=float, default=1.0)
    ap.add_argument("--FB", type=float, default=2.5)
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4, 8, 16])
    args = ap.parse_args(argv)
    costs = dict(F=args.F, B=args.B, W=args.W, FB=args.FB)
    rows = []
    md = [
        f"# Table 2 reproduced (F={args.F:g}, B={args.B:g}, W={args.W:g}, F&B={args.FB:g})",
        "",
        "Bubble = makespan − the rank's busy time (F&B pairs at F&B); the table's value is the worst rank.",
        "DualPipeV's PP is its number of stages, 2 × ranks. Activations in stage units.",
        "",
        "| schedule | ranks | M | bubble per rank (sim) | max | Table 2 | peak act (max) | Table 2 | params | "
        "same at 2M | blocking makespan / ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in pipeline.SCHEDULES:
        for p in args.pp:
            m = {"1f1b": 2 * p, "zb1p": 2 * p, "dualpipe": 2 * p, "dualpipev": 2 * p}[name]
            s1, s2 = pipeline.build_schedule(name, p, m), pipeline.build_schedule(name, p, 2 * m)
            r1, r2 = pipeline.simulate(s1, **costs), pipeline.simulate(s2, **costs)
            rb = pipeline.simulate(s1, blocking=True, **costs)
            t = r1.closed_form()
            same = r1.bubble == r2.bubble and r1.peak_activations == r2.peak_activations
            rows.append(
                {
                    "schedule": name,
                    "ranks": p,
                    "microbatches": m,
                    "bubble": r1.bubble,
                    "max_bubble": max(r1.bubble),
                    "peak_activations": r1.peak_activations,
                    "param_copies": r1.param_copies,
                    "makespan": r1.makespan,
                    "blocking_makespan": rb.makespan,
                    "table2": t,
                    "unchanged_at_2M": same,
                }
            )
            uniq = sorted(set(r1.bubble))
            per_rank = f"{uniq[0]:g}" if len(uniq) == 1 else f"{min(uniq):g} … {max(uniq):g}"
            md.append(
                f"| {name} | {p} | {m} | {per_rank} | {max(r1.bubble):g} | {t['bubble']:g} | "
                f"{max(r1.peak_activations)} | {t['activations']} | {r1.param_copies[0]:g}× | {same} | "
                f"{rb.makespan:g} / {r1.makespan:g} |"
            )
    out = {
        "benchmark": "pipeline_table2",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu (simulation only)",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "costs": costs,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline_table2.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "pipeline_table2.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
