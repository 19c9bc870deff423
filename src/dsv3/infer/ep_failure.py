"""A rank of an expert-parallel serving group that dies: one line on every survivor, naming it.

    peers = peer_processes(group)          # collective, once: every rank's (host, process id)
    with group_failures(peers):            # any error in here becomes EngineFailed("… rank 1 (pid 812) exited …")
        ep.serve()

In lockstep every step's collectives need every rank, so when one rank dies (killed, out of memory,
a bug) the others' next collective fails: at once with gloo, whose sockets to a dead process close
("Connection reset by peer"), or after the group's timeout for a rank that hangs. No survivor can go
on. Each turns the error into :class:`~dsv3.infer.worker.EngineFailed` with one line: the ranks whose
processes have exited (checked by process id for the ranks on this host) and the transport's own
words, without its boilerplate; when no rank is seen gone, the full traceback is written to a file
(``dsv3.cli.crash_report``) and the line says where.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time

from .worker import EngineFailed


def peer_processes(group=None) -> list[tuple[str, int]]:
    """Every rank's (host name, process id), by rank (collective over ``group``)."""
    import torch.distributed as dist

    peers: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=group)
    return [tuple(p) for p in peers]


def process_exited(pid: int) -> bool:
    """Whether process ``pid`` of this host has exited (a zombie not yet reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):               # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False


def exited_ranks(peers: list[tuple[str, int]], wait: float = 0.5) -> list[int]:
    """The ranks on this host whose process has exited; waits up to ``wait`` seconds for one to show
    (a killed process's sockets close a moment before it is gone)."""
    host, deadline = socket.gethostname(), time.monotonic() + wait
    while True:
        gone = [r for r, (h, pid) in enumerate(peers) if h == host and pid != os.getpid() and process_exited(pid)]
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.05)


def transport_words(exc: BaseException) -> str:
    """The first sentence of an error's first line, without a source location (gloo's
    ``[…/pair.cc:537] Read error […]: Connection reset by peer. This is typically …``)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = re.sub(r"^\[[^\]]*:\d+\]\s*", "", first)
    return first.split(". ")[0].rstrip(".") or type(exc).__name__


def describe(exc: BaseException, peers: list[tuple[str, int]]) -> str:
    """One line for a failed collective step: which ranks exited, and the error as the transport put it."""
    gone = exited_ranks(peers)
    words = transport_words(exc)
    if gone:
        who = ", ".join(f"{r} (pid {peers[r][1]})" for r in gone)
        return f"the expert-parallel group failed: rank{'s' if len(gone) > 1 else ''} {who} exited ({words})"
    from ..cli import crash_report

    path = crash_report("serve", exc)
    where = f"; traceback in {path}" if path else ""
    return f"the expert-parallel group failed: {type(exc).__name__}: {words}{where}"


@contextlib.contextmanager
def group_failures(peers: list[tuple[str, int]]):
    """Turn any error raised inside into :class:`EngineFailed` with :func:`describe`'s line."""
    try:
        yield
    except EngineFailed:
        raise
    except Exception as e:  # noqa: BLE001 — in lockstep any error ends the group
        raise EngineFailed(describe(e, peers)) from e
