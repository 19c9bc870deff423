"""Shared helper for multi-process tests: spawn gloo ranks with a deadline, read their JSON result."""

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
