"""Compare our pipeline schedules with the action lists ``torch.distributed.pipelining`` generates.

No processes are launched: PyTorch builds ``pipeline_order`` (every rank's compute actions) inside
its schedule constructors, which need real stages and a process group; we call the generating
methods on bare instances instead (``Schedule1F1B._get_pipeline_order``,
``ScheduleZBVZeroBubble/ScheduleDualPipeV._calculate_single_rank_operations``) — private APIs, so
a PyTorch version without them is reported, not crashed on. Their lists are imported as
:func:`dsv3.parallel.pipeline.custom_schedule` on the same stage placement, validated by our checker
(dependencies, FIFO channels, blocking-send deadlock) and timed by our simulator with the same costs
as ours. Writes ``benchmarks/results/pipeline_vs_torch.json``.

    python benchmarks/pipeline_vs_torch.py [--ranks 2 4 8] [--F 1 --B 2 --W 1 --FB 2.5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from dsv3.parallel import pipeline

OUT = Path(__file__).resolve().parent / "results" / "pipeline_vs_torch.json"


def _torch_lists(cls_name: str, ranks: int, microbatches: int):
    from torch.distributed.pipelining import schedules as ts

    cls = getattr(ts, cls_name)
    obj = cls.__new__(cls)
    obj._n_microbatches = microbatches
    if cls_name == "Schedule1F1B":
        obj._num_stages = ranks
        order = obj._get_pipeline_order()
    else:
        obj.pp_group_size = ranks
        obj.num_stages = obj._num_stages = 2 * ranks
        order = {r: obj._calculate_single_rank_operations(r) for r in range(ranks)}
    compute = {"F": "F", "B": "B", "I": "I", "W": "W"}
    progs = []
    for r in range(ranks):
        prog = []
        for a in order[r]:
            if a is None:
                continue
            kind = a.computation_type.value
            if kind == "OVERLAP_F_B":
                f, b = a.sub_actions
                assert f.computation_type.value == "F" and b.computation_type.value == "B"
                prog.append(("FB", f.stage_index, f.microbatch_index, b.stage_index, b.microbatch_index))
            elif kind in compute:
                prog.append((compute[kind], a.stage_index, a.microbatch_index))
        progs.append(prog)
    return progs


def _group_middle_pair(progs, ranks):
    out = [list(p) for p in progs]
    last = out[ranks - 1]
    for i in range(len(last) - 1):
        a, b = last[i], last[i + 1]
        if a[0] == "F" and b[0] == "B" and a[1] == ranks - 1 and b[1] == ranks:
            last[i : i + 2] = [("FBn", a[1], a[2], b[1], b[2])]
            break
    return out


def _parts(t):
    return [("F", t[1], t[2]), ("B", t[3], t[4])] if t[0] == "FB" else [tuple(t)]


CASES = [  # (torch class, our placement, our schedule to compare with)
    ("Schedule1F1B", "1f1b", "1f1b"),
    ("ScheduleDualPipeV", "dualpipev", "dualpipev"),
    ("ScheduleZBVZeroBubble", "dualpipev", "dualpipev"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--F", type=float, default=1.0)
    ap.add_argument("--B", type=float, default=2.0)
    ap.add_argument("--W", type=float, default=1.0)
    ap.add_argument("--FB", type=float, default=2.5)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    costs = dict(F=args.F, B=args.B, W=args.W, FB=args.FB)
    rows = []
    print(
        f"{'torch schedule':<22} {'R':>2} {'M':>3} {'valid blk/buf':<13} {'bubble torch':>12} {'ours':>6} "
        f"{'makespan torch':>14} {'ours':>6} {'ours name':<10} {'same lists':<10} peak act torch/ours"
    )
    for ranks in args.ranks:
        for cls_name, placement, ours_name in CASES:
            m = 2 * ranks if placement == "1f1b" else 4 * ranks
            row = {"torch_class": cls_name, "ranks": ranks, "microbatches": m, "placement": placement}
            row["ours"] = ours_name
            try:
                progs = _torch_lists(cls_name, ranks, m)
            except Exception as e:  # private API moved
                row["error"] = f"could not generate: {type(e).__name__}: {e}"
                rows.append(row)
                print(f"{cls_name:<22} {ranks:>2} {m:>3} {row['error']}")
                continue
            ours = pipeline.build_schedule(ours_name, ranks, m)
            ours_res = pipeline.simulate(ours, **costs)
            theirs = res = None
            try:
                theirs = pipeline.custom_schedule(
                    f"torch:{cls_name}", ranks, m, progs, placement=placement, check=False
                )
            except ValueError as e:
                row["valid"] = row["valid_buffered_sends"] = False
                row["validation_error"] = str(e)
            if theirs is not None:
                for key, blocking in (("valid", True), ("valid_buffered_sends", False)):
                    try:
                        pipeline.validate(theirs, blocking=blocking)
                        row[key] = True
                    except ValueError as e:
                        row[key] = False
                        row.setdefault("validation_error", str(e))
            if cls_name == "ScheduleDualPipeV" and theirs is not None and not row.get("valid"):
                # PyTorch lists the middle rank's first (F, B) pair as two actions; DeepSeek's code and
                # ours post their communication as one unit. Grouping them makes the lists ours.
                grouped = _group_middle_pair(progs, ranks)
                try:
                    g = pipeline.custom_schedule("torch-grouped", ranks, m, grouped, placement=placement)
                    row["valid_with_middle_pair_grouped"] = True
                    row["identical_to_ours_after_grouping"] = [[str(a) for a in r] for r in g.actions] == [
                        [str(a) for a in r] for r in ours.actions
                    ]
                except ValueError as e:
                    row["valid_with_middle_pair_grouped"] = False
                    row["grouped_error"] = str(e)
            if theirs is not None:
                try:
                    res = pipeline.simulate(theirs, **costs)
                    row.update(
                        torch_makespan=res.makespan,
                        torch_bubble=res.bubble,
                        torch_peak_activations=res.peak_activations,
                    )
                except ValueError as e:
                    row["simulate_error"] = str(e)
                    res = None
            ours_lists = [[(k, s, mb) for a in r for k, s, mb in a.parts()] for r in ours.actions]
            their_lists = [[part for t in r for part in _parts(t)] for r in progs]
            row.update(
                ours_makespan=ours_res.makespan,
                ours_bubble=ours_res.bubble,
                ours_peak_activations=ours_res.peak_activations,
                table2=ours_res.closed_form(),
                same_action_lists=ours_lists == their_lists,
            )
            rows.append(row)
            tb = f"{max(res.bubble):.4g}" if res else "n/a"
            tm = f"{res.makespan:.4g}" if res else "n/a"
            tp = max(res.peak_activations) if res else "n/a"
            valid = f"{row['valid']!s:.1}/{row['valid_buffered_sends']!s:.1}"
            print(
                f"{cls_name:<22} {ranks:>2} {m:>3} {valid:<13} {tb:>12} {max(ours_res.bubble):>6.4g} {tm:>14} "
                f"{ours_res.makespan:>6.4g} {ours_name:<10} {str(row['same_action_lists']):<10} "
                f"{tp}/{max(ours_res.peak_activations)}"
            )
            if "validation_error" in row:
                print(f"    our validator: {row['validation_error'][:160]}")
            if "valid_with_middle_pair_grouped" in row:
                print(
                    f"    middle rank's first F,B grouped as one unit: valid={row['valid_with_middle_pair_grouped']}, "
                    f"identical to ours={row.get('identical_to_ours_after_grouping')}"
                )
    result = {
        "benchmark": "pipeline_vs_torch",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu (no processes: schedule generation and simulation only)",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "costs": costs,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Our schedules vs torch.distributed.pipelining's action lists",
        "",
        f"torch {torch.__version__}; costs {costs}; simulated by dsv3 (no processes). valid: our checker with",
        "blocking (rendezvous) sends / with buffered sends. Bubble = worst rank's makespan − busy.",
        "",
        "| torch class | ranks | M | valid blocking | valid buffered | bubble torch | bubble ours | makespan torch |"
        " makespan ours | same compute lists as ours | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        tb = max(row["torch_bubble"]) if "torch_bubble" in row else "n/a"
        note = row.get("validation_error", "")[:90].replace("|", "/")
        if row.get("valid_with_middle_pair_grouped"):
            note = "deadlocks only because the middle rank's first F,B are two units; grouped: valid, = ours"
        elif row["torch_class"] == "Schedule1F1B" and not row.get("valid"):
            note = f"last rank's forwards are numbered 1..M, not 0..M-1 ({note})"
        elif row["torch_class"] == "ScheduleZBVZeroBubble":
            note = "compared with our DualPipeV (same V placement; ZB-V has no F&B overlap). " + note[:60]
        md.append(
            f"| {row['torch_class']} | {row['ranks']} | {row['microbatches']} | {row.get('valid')} | "
            f"{row.get('valid_buffered_sends')} | {tb} | {max(row['ours_bubble'])} | "
            f"{row.get('torch_makespan', 'n/a')} | {row['ours_makespan']} | {row['same_action_lists']} | {note} |"
        )
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
