"""The user-facing error type and the small checks every command shares.

``UserError`` is what a command raises for anything the user can fix (a bad flag, file or field):
``dsv3`` prints it as one line ``dsv3 COMMAND: error: MESSAGE`` and exits with code 2. It is a
``ValueError``, so library callers that catch ``ValueError`` keep working. Anything else that escapes a
command is an internal error: ``dsv3`` prints a short line and the path of a file with the traceback.

This module imports nothing heavy (no torch) so that every command can use it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


class UserError(ValueError):
    """A user-facing error: printed as one line naming the flag/file/field, exit code 2."""


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a UserError naming the file when it is missing, a directory,
    unreadable or not text."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {p} is a directory, not a file") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {p}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p} is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}); "
                        f"is it a binary file?") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", want: type | None = dict) -> Any:
    """Parse a JSON file; a UserError naming the file (and line) for unreadable or malformed JSON, or
    when the top-level value is not a ``want`` (default: an object). NaN/Infinity are refused."""
    p = os.fspath(path)
    text = read_text(p, what)
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {p} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except _NonFinite as e:
        raise UserError(f"{what} {p} holds {e}, which is not a finite number") from None
    if want is not None and not isinstance(data, want):
        kind = {dict: "object {…}", list: "list […]"}.get(want, want.__name__)
        raise UserError(f"{what} {p} must hold a JSON {kind}, found {json_kind(data)}")
    return data


def iter_jsonl(path: str | os.PathLike, what: str = "file", allow_nonfinite: bool = False):
    """(line number, object) for every line of a ``.jsonl`` file that is a JSON object. A line cut short
    at the very end (a killed writer) is skipped; any other malformed line is a UserError naming the file
    and line. NaN/Infinity are refused unless ``allow_nonfinite``."""
    p = os.fspath(path)
    lines = read_text(p, what).splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line) if allow_nonfinite else json.loads(line, parse_constant=_no_constant)
        except (json.JSONDecodeError, _NonFinite) as e:
            if i == len(lines):
                return  # the last line, cut short by a killed writer
            raise UserError(f"{what} {p} line {i}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{what} {p} line {i}: expected a JSON object {{…}}, found {json_kind(rec)}")
        yield i, rec


class _NonFinite(ValueError):
    pass


def _no_constant(name: str):
    raise _NonFinite(name)


def json_kind(v: Any) -> str:
    """How JSON would call the type of ``v``, with the value when short (for messages)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def check_finite(flag: str, value: float, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """A UserError naming ``flag`` unless ``value`` is a finite number in the given range."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{flag} {value}: must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise UserError(f"{flag} {value}: must be {'>' if lo_open else '>='} {lo:g}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise UserError(f"{flag} {value}: must be {'<' if hi_open else '<='} {hi:g}")


def check_int(flag: str, value: int, *, lo: int | None = None, hi: int | None = None, why: str = "") -> None:
    """A UserError naming ``flag`` unless ``lo <= value <= hi``; ``why`` explains an upper limit."""
    if lo is not None and value < lo:
        raise UserError(f"{flag} {value}: must be >= {lo}")
    if hi is not None and value > hi:
        raise UserError(f"{flag} {value}: must be <= {hi:,}" + (f" ({why})" if why else ""))


def check_output_file(flag: str, path: str | os.PathLike) -> None:
    """Before any work: ``path`` can be created or replaced (its directory exists and is writable)."""
    p = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(p)
    if os.path.isdir(p):
        raise UserError(f"{flag} {path}: is a directory")
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: directory {parent} does not exist")
    if os.path.exists(p) and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {path}: not writable (no permission)")
    import tempfile

    try:   # a real write: os.access does not see read-only file systems, nor limits on root
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".dsv3-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e})") from None


def check_image_file(flag: str, path: str | os.PathLike) -> None:
    """Before any work: ``path`` can be written (check_output_file) and its extension names an image
    format matplotlib saves (no extension: PNG)."""
    check_output_file(flag, path)
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    if ext:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if ext not in formats:
            raise UserError(f"{flag} {path}: .{ext} is not an image format matplotlib writes "
                            f"(use one of {', '.join(sorted(formats))})")


def check_writable_dir(flag: str, path: str | os.PathLike, what: str = "write there") -> None:
    """Before any work: directory ``path`` exists or can be made, and a file can really be written in
    it (os.access does not see read-only file systems); else a UserError naming the flag."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot {what} ({e.strerror or e})") from None


def oserror_message(e: OSError) -> str:
    """One line for an OSError: what failed and on which file."""
    what = e.strerror or str(e)
    name = e.filename if e.filename is not None else None
    if name is not None:
        extra = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
        return f"{name}{extra}: {what}"
    return what


def check_device(flag: str, name: str) -> None:
    """``name`` ("auto", "cpu", "cuda", "cuda:1", "mps") names a device this machine has (UserError)."""
    if name == "auto":
        return
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{flag} {name!r}: not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "" if torch.version.cuda else "; this torch is built without CUDA"
            raise UserError(f"{flag} {name}: no CUDA GPU is available on this machine{built}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{flag} {name}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise UserError(f"{flag} {name}: device type {dev.type!r} is not supported (auto, cpu, cuda, cuda:N, mps)")
