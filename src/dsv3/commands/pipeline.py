"""``dsv3 pipeline``: the schedule simulator of :mod:`dsv3.parallel.pipeline.cli`, with the checks a
command line needs before any work: sizes within what simulates in seconds, finite costs, and a
``--plot`` file that can be written."""

from __future__ import annotations

import argparse

from ..errors import UserError, check_finite, check_image_file, check_int

MAX_RANKS = 1024
MAX_MICROBATCHES = 16384
MAX_ACTIONS = 65536     # ranks × micro-batches: about 7 s and 170 MB of simulation
MAX_COST = 1e12         # a chunk time; sums over a whole schedule stay finite (1e308 made the makespan inf)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..parallel.pipeline import cli

    cli.add_arguments(parser)


def check_args(args) -> None:
    from ..parallel.pipeline.cli import OVERLAPPED_PAIRS, SPLIT_BACKWARD, weight_cost

    check_int("--ranks", args.ranks, lo=1, hi=MAX_RANKS)
    check_int("--microbatches", args.microbatches, lo=1, hi=MAX_MICROBATCHES)
    if args.ranks * args.microbatches > MAX_ACTIONS:
        check_int("--ranks × --microbatches", args.ranks * args.microbatches, hi=MAX_ACTIONS,
                  why="the simulation grows with both; a few seconds at the limit")
    for flag in ("F", "B", "W", "FB", "comm"):
        if getattr(args, flag) is not None:
            check_finite(f"--{flag}", getattr(args, flag), lo=0, hi=MAX_COST)
    if args.W is not None and args.schedule not in SPLIT_BACKWARD:
        raise UserError(f"--W only applies to schedules that split the backward into input and weight gradients "
                        f"({', '.join(SPLIT_BACKWARD)}); {args.schedule} runs each backward whole (its cost is --B)")
    if args.FB is not None and args.schedule not in OVERLAPPED_PAIRS:
        raise UserError(f"--FB only applies to schedules with overlapped forward&backward pairs "
                        f"({', '.join(OVERLAPPED_PAIRS)}); {args.schedule} has none")
    W = weight_cost(args)
    if W > args.B:
        given = "" if args.W is not None else " (its default)"
        raise UserError(f"--W {W:g}{given}: the weight-gradient part must not exceed the full backward --B {args.B:g}")
    if args.plot is not None:
        check_image_file("--plot", args.plot)


def run(args) -> int:
    from ..parallel.pipeline import cli

    check_args(args)
    return cli.run(args)
