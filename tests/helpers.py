"""Shared test helpers: spawn gloo ranks with a deadline, the environment for CLI subprocesses."""

from __future__ import annotations

import json
import socket
import time

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, args: tuple, world: int, out_path: str, timeout: float = 80.0) -> dict:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes; kill them all past ``timeout``.

    The workers write their findings to ``out_path`` (JSON), which is returned."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.time())):
        if time.time() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} gloo ranks did not finish in {timeout} s")
    with open(out_path) as f:
        return json.load(f)


def cli_env() -> dict:
    """Environment for running ``python -m dsv3.cli`` in a subprocess: this checkout's src on the path,
    one thread per process (several ranks share the machine)."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    return env
