"""``--dist-timeout``: a rank waiting on a frozen or dead peer stops with an error naming the peer.

:func:`init_distributed` joins torchrun's process group with a timeout (gloo and NCCL collectives then
fail after it instead of the default 30 minutes) and makes it the default of every group created later.
:class:`Heartbeat` has each rank write ``(time, step)`` into the rendezvous store every second from a
daemon thread (collectives release the GIL, so a rank blocked in one still beats; a rank stopped with
SIGSTOP or hung in Python does not). When a collective times out, :func:`timeout_message` says which
ranks have not beaten for longest and at what step they were.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time


def init_distributed(device_type: str, timeout_s: float) -> bool:
    """Join the process group torchrun describes with ``timeout_s``; False for a single process."""
    import torch.distributed as dist

    from ..parallel.mesh import set_group_timeout

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    timeout = datetime.timedelta(seconds=timeout_s)
    set_group_timeout(timeout)       # the mesh's groups, made later, take it too
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return True


class Heartbeat:
    """Every ``every`` seconds, this rank's (time, step) into the store under ``dsv3/hb/RANK``."""

    def __init__(self, rank: int, world: int, get_step, every: float = 1.0):
        import torch.distributed as dist

        self.rank, self.world, self.get_step, self.every = rank, world, get_step, every
        self.store = self._client_store() or dist.distributed_c10d._get_default_store()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsv3-heartbeat", daemon=True)

    @staticmethod
    def _client_store():
        """A store client of its own with a short timeout (a read must not wait on the frozen rank)."""
        import torch.distributed as dist

        try:
            return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                 timeout=datetime.timedelta(seconds=5), wait_for_workers=False)
        except (KeyError, ValueError, RuntimeError):
            return None

    def start(self) -> "Heartbeat":
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        try:
            self.store.set(f"dsv3/hb/{self.rank}", json.dumps({"t": time.time(), "step": self.get_step()}))
        except Exception:  # noqa: BLE001 - a lost store must not end the run; the collectives will say so
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._beat()

    def others(self) -> dict[int, dict | None]:
        """The last beat of every other rank (None: never seen, or the store cannot be read)."""
        out = {}
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                out[r] = json.loads(self.store.get(f"dsv3/hb/{r}"))
            except Exception:  # noqa: BLE001
                out[r] = None
        return out


_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe")


def is_timeout(e: BaseException) -> bool:
    """A collective that gave up waiting (timeout) or lost its peer (connection closed)."""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in ("timed out", "timeout", *_LOST))


def is_lost_peer(e: BaseException) -> bool:
    """A collective whose peer closed the connection (it exited or was killed), not one that timed out."""
    return any(s in str(e).lower() for s in _LOST)


def timeout_message(e: BaseException, rank: int, step, timeout_s: float, heartbeat: Heartbeat | None) -> str:
    """One line: this rank, the operation, and the peers that stopped beating."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    first = first.split("] ", 1)[-1][:160]          # gloo prefixes its source location
    where = f"rank {rank}, step {step}" if step is not None else f"rank {rank}"
    msg = f"{where}: a collective operation failed waiting for the other ranks ({first})"
    if heartbeat is not None:
        now = time.time()
        beats = heartbeat.others()
        silent = sorted(((now - b["t"], r, b.get("step")) for r, b in beats.items() if b is not None),
                        reverse=True)
        unknown = [r for r, b in beats.items() if b is None]
        stale = [(age, r, s) for age, r, s in silent if age > min(max(3 * heartbeat.every, 3.0), timeout_s)]
        if stale:
            msg += "; " + ", ".join(f"rank {r} has not answered for {age:.0f} s (last seen "
                                    + (f"at step {s})" if s is not None else "before training started)")
                                    for age, r, s in stale) + " — frozen, stopped or dead"
        elif unknown:
            msg += f"; no heartbeat readable from rank(s) {', '.join(map(str, unknown))}"
        elif is_lost_peer(e):   # a rank killed a moment ago still has a fresh heartbeat: not "alive"
            msg += "; a peer closed its connection: it exited or was killed (its own error, or torchrun's " \
                   "summary, names it)"
        else:
            msg += "; every rank is alive but one was slower than --dist-timeout (raise it for long steps, " \
                   "checkpoint saves or data preparation)"
    return msg + f" [--dist-timeout {timeout_s:g} s]"
