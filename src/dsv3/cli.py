"""The ``dsv3`` command. Each subcommand lives in its own module, imported only when run.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.

One error path for every command: an error the user can fix (a bad flag, file or field) is raised as
:class:`dsv3.errors.UserError` (``CLIError`` here; a ``ValueError``) — or as another ``ValueError`` /
``OSError`` naming what is wrong — and printed as one line ``dsv3 COMMAND: error: …`` with exit code 2,
never as a traceback. Anything else is an internal error: one line saying so and where the full
traceback was written (exit code 1); ``dsv3 --debug COMMAND …`` (or ``DSV3_DEBUG=1``) prints the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from .errors import UserError, oserror_message

CLIError = UserError   # the name the subcommands have always used

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dsv3.commands.info", "parameters, KV-cache bytes and weight memory of a config"),
    "train": ("dsv3.train.cli", "train a model (tiny preset on the built-in corpus by default)"),
    "generate": ("dsv3.infer.generate", "generate text from a trained model directory"),
    "serve": ("dsv3.infer.server", "serve a model over HTTP (OpenAI-style completions, batched engine)"),
    "sft": ("dsv3.posttrain.sft", "supervised fine-tuning on chat data (loss on assistant tokens only)"),
    "grpo": ("dsv3.posttrain.grpo", "reinforcement learning with GRPO and rule-based rewards (DeepSeek-R1)"),
    "sample": ("dsv3.posttrain.sample", "rejection sampling into chat SFT data; accuracy with a confidence interval"),
    "r1-task": ("dsv3.posttrain.task", "write the built-in verifiable task (addition): cold-start SFT data and prompts"),
    "quantize": ("dsv3.commands.quantize", "write a model as an FP8 checkpoint (E4M3, 128x128 scales; DeepSeek's layout)"),
    "eval": ("dsv3.eval.cli", "long-context evaluation: loss by position, passkey and needle retrieval"),
    "plot": ("dsv3.train.plots", "draw loss / MaxVio / expert-load pictures of a run directory"),
    "pipeline": ("dsv3.commands.pipeline", "build and simulate a pipeline schedule (1f1b, zb1p, dualpipe, dualpipev)"),
    "eplb": ("dsv3.eplb_cli", "place experts (with replicas) on GPUs from a load file"),
    "plan": ("dsv3.plan.cli", "size a training run or deployment for a cluster"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``dsv3 train: error: argument --lr: …``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The top-level parser; only the command named in ``argv`` has its module imported, so a
    command whose module fails to import cannot break the others."""
    parser = _Parser(prog="dsv3", description="DeepSeek-V3 training and inference system")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an internal error (also DSV3_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    modules = {}
    parser.subcommand_parsers = {}
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        parser.subcommand_parsers[name] = p
        if name != wanted and argv is not None:
            continue
        mod = importlib.import_module(modname)
        mod.add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the full traceback of an internal error")
        modules[name] = mod
    return parser, modules


# flags whose command gives an empty value a meaning or its own message
EMPTY_ALLOWED = {"--sample-prompt", "--prompt", "--api-key", "--served-model-name"}


def refuse_empty_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An empty (or all-blank) string given to a flag or positional is a usage error naming it (exit 2):
    no path, name or list is empty, and taking '' as "not given" (or as the current directory) would
    silently do something else than asked."""
    for action in parser._actions:
        if not action.option_strings and not action.dest or action.dest in ("help", "command"):
            continue
        flag = action.option_strings[-1] if action.option_strings else (action.metavar or action.dest)
        if flag in EMPTY_ALLOWED or action.default == "":
            continue
        value = getattr(args, action.dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not v.strip():
                parser.error(f"argument {flag}: empty value {v!r}")


def one_line(text: str) -> str:
    """A multi-line message as one line (lines after a colon follow it; others are joined with '; ')."""
    parts = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    out = ""
    for ln in parts:
        out = ln if not out else out + (" " if out.endswith(":") else "; ") + ln
    return out


def _user_message(e: BaseException) -> str | None:
    """The one-line message of an error the user can act on, or None for an internal error."""
    if isinstance(e, (UserError, FloatingPointError)):
        return one_line(str(e))
    if isinstance(e, MemoryError):
        return "out of memory" + (f": {e}" if str(e) else "") + " (a smaller model, batch or --seq-len needs less)"
    try:
        import torch
        if isinstance(e, torch.OutOfMemoryError):
            return one_line(f"out of device memory: {str(e).splitlines()[0] if str(e) else ''} "
                            f"(a smaller model, batch or --seq-len needs less)")
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(e, UnicodeError):
        return None   # a decode error that no reader wrapped: it names no file, so it is our bug
    if isinstance(e, ValueError):
        return one_line(str(e))
    if isinstance(e, OSError):
        return one_line(oserror_message(e))
    return None


def crash_report(command: str, exc: BaseException) -> str:
    """Write the traceback of an internal error to a file; return its path ("" when it cannot be written)."""
    import tempfile
    import traceback

    root = os.environ.get("DSV3_CRASH_DIR") or os.path.join(tempfile.gettempdir(), "dsv3-crashes")
    path = os.path.join(root, f"{command or 'dsv3'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt")
    try:
        os.makedirs(root, exist_ok=True)
        with open(path, "w") as f:
            f.write(f"dsv3 {' '.join(sys.argv[1:])}\n\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    except OSError:
        return ""
    return path


def _one_line_warnings(command: str):
    """Print warnings as one line ``dsv3 COMMAND: warning: …``; returns the previous printer."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"dsv3 {command}: warning: {one_line(str(message))}", file=file or sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, show
    return previous


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, modules = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    refuse_empty_values(parser.subcommand_parsers[args.command], args)
    debug = args.debug or os.environ.get("DSV3_DEBUG", "") not in ("", "0")
    name = f"dsv3 {args.command}"
    previous_showwarning = _one_line_warnings(args.command)
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `dsv3 … | head`: the reader went away; not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:  # noqa: BLE001 - the one place every failure of a command ends
        msg = _user_message(e)
        if msg is not None:
            if debug:
                raise
            print(f"{name}: error: {msg}", file=sys.stderr)
            return 2
        if debug:
            raise
        path = crash_report(args.command, e)
        first = one_line(str(e))[:300]
        where = f"the full traceback is in {path}" if path else "the traceback could not be written to a file"
        print(f"{name}: internal error: {type(e).__name__}: {first} ({where}; rerun with --debug to print it)",
              file=sys.stderr)
        return 1
    finally:
        import warnings
        warnings.showwarning = previous_showwarning


if __name__ == "__main__":
    sys.exit(main())
