"""The ``dsv3`` command. Each subcommand lives in its own module, imported only when run.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Errors that are the
user's (bad paths, impossible configs) are raised as ``ValueError``/``FileNotFoundError``/
``CLIError`` and printed as one line with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dsv3.commands.info", "parameters, KV-cache bytes and weight memory of a config"),
    "train": ("dsv3.train.cli", "train a model (tiny preset on the built-in corpus by default)"),
    "generate": ("dsv3.infer.generate", "generate text from a trained model directory"),
    "serve": ("dsv3.infer.server", "serve a model over HTTP (OpenAI-style completions, batched engine)"),
    "plot": ("dsv3.train.plots", "draw loss / MaxVio / expert-load pictures of a run directory"),
    "pipeline": ("dsv3.parallel.pipeline.cli", "build and simulate a pipeline schedule (1f1b, zb1p, dualpipe, dualpipev)"),
    "eplb": ("dsv3.eplb_cli", "place experts (with replicas) on GPUs from a load file"),
    "plan": ("dsv3.plan.cli", "size a training run or deployment for a cluster"),
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The top-level parser; only the command named in ``argv`` has its module imported, so a
    command whose module fails to import cannot break the others."""
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 training and inference system")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    modules = {}
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name != wanted and argv is not None:
            continue
        mod = importlib.import_module(modname)
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, modules = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(modules[args.command].run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
