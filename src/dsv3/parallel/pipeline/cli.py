"""``dsv3 pipeline``: build a schedule, simulate it, print per-rank numbers next to Table 2, draw it.

    dsv3 pipeline --schedule dualpipe --ranks 8 --microbatches 20 --FB 2.5 --plot dualpipe.png
"""

from __future__ import annotations

import json

from .schedule import SCHEDULES, build_schedule
from .simulate import simulate

DEFAULT_W = 1.0
SPLIT_BACKWARD = ("zb1p", "dualpipe", "dualpipev")   # the schedules that run a backward as I then W
OVERLAPPED_PAIRS = ("dualpipe", "dualpipev")         # the schedules with overlapped F&B pairs


def weight_cost(args) -> float:
    """--W, or its default; 1f1b never runs a separate W, so there it only has to fit inside --B."""
    if args.W is not None:
        return args.W
    return DEFAULT_W if args.schedule in SPLIT_BACKWARD else min(DEFAULT_W, args.B)


def add_arguments(parser) -> None:
    parser.add_argument("--schedule", required=True, choices=SCHEDULES, type=str.lower, help="pipeline schedule")
    parser.add_argument("--ranks", type=int, required=True, help="pipeline ranks (devices)")
    parser.add_argument("--microbatches", type=int, required=True, help="micro-batches per step")
    parser.add_argument("--F", type=float, default=1.0, help="forward chunk time (default 1)")
    parser.add_argument("--B", type=float, default=2.0, help="full backward chunk time (default 2)")
    parser.add_argument("--W", type=float, default=None,
                        help=f"weight-gradient part of B (default {DEFAULT_W:g}); zb1p, dualpipe and dualpipev only "
                             "(1f1b runs the backward whole)")
    parser.add_argument("--FB", type=float, default=None,
                        help="overlapped forward&backward pair time (default F+B); dualpipe and dualpipev only")
    parser.add_argument("--comm", type=float, default=0.0, help="latency of one cross-rank message (default 0)")
    parser.add_argument(
        "--blocking", action="store_true", help="time the blocking batch_isend_irecv model instead of the ideal"
    )
    parser.add_argument("--plot", metavar="FILE", help="save a timeline picture (PNG/SVG/PDF)")
    parser.add_argument("--show-actions", action="store_true", help="also print every rank's action list")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    sched = build_schedule(args.schedule, args.ranks, args.microbatches)
    res = simulate(sched, F=args.F, B=args.B, W=weight_cost(args), FB=args.FB, comm=args.comm, blocking=args.blocking)
    closed = res.closed_form()
    if args.plot:
        from .plot import plot_timeline

        plot_timeline(res, args.plot)
    if args.json:
        out = res.to_dict()
        out["blocking"] = bool(args.blocking)
        if args.plot:
            out["plot"] = args.plot
        if args.show_actions:
            out["actions"] = [[str(a) for a in row] for row in sched.actions]
        print(json.dumps(out, indent=2))
        return 0
    c = res.costs
    print(
        f"{sched.name}: {sched.num_ranks} ranks, {sched.num_microbatches} micro-batches, {sched.num_stages} stages; "
        f"F={c.F:g} B={c.B:g} W={c.W:g} F&B={c.FB:g} comm={c.comm:g}" + (" (blocking)" if args.blocking else "")
    )
    print(f"{'rank':>4}  {'stages':<10} {'busy':>9} {'bubble':>9} {'peak act':>8} {'params':>6}")
    for r in range(sched.num_ranks):
        st = ",".join(map(str, sched.stages_of(r)))
        print(
            f"{r:>4}  {st:<10} {res.busy[r]:>9.4g} {res.bubble[r]:>9.4g} {res.peak_activations[r]:>8} "
            f"{res.param_copies[r]:>5.3g}x"
        )
    print(
        f"makespan {res.makespan:.6g}; max bubble {max(res.bubble):.6g}; "
        f"peak activations {max(res.peak_activations)}"
    )
    print(
        f"Table 2 (PP={closed['pp']}): bubble {closed['bubble']:.6g}, activations {closed['activations']}, "
        f"parameters {closed['param_copies']:g}x"
    )
    if args.show_actions:
        print(sched)
    if args.plot:
        print(f"timeline written to {args.plot}")
    return 0
