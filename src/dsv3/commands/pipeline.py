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
    check_int("--ranks", args.ranks, lo=1, hi=MAX_RANKS)
    check_int("--microbatches", args.microbatches, lo=1, hi=MAX_MICROBATCHES)
    if args.ranks * args.microbatches > MAX_ACTIONS:
        check_int("--ranks × --microbatches", args.ranks * args.microbatches, hi=MAX_ACTIONS,
                  why="the simulation grows with both; a few seconds at the limit")
    for flag in ("F", "B", "W", "comm"):
        check_finite(f"--{flag}", getattr(args, flag), lo=0, hi=MAX_COST)
    if args.FB is not None:
        check_finite("--FB", args.FB, lo=0, hi=MAX_COST)
    if args.W > args.B:
        raise UserError(f"--W {args.W:g}: the weight-gradient part must not exceed the full backward --B {args.B:g}")
    if args.plot is not None:
        check_image_file("--plot", args.plot)


def run(args) -> int:
    from ..parallel.pipeline import cli

    check_args(args)
    return cli.run(args)
