"""Communication hidden behind computation: two micro-batches on two lanes (SPEC §2.1–2.2).

DualPipe's point is that one micro-batch's MoE all-to-all runs while another micro-batch computes.
dsv3 does this with **lanes**: lane 0 and lane 1 each own a copy of the expert-parallel process
groups (:meth:`dsv3.parallel.mesh.Mesh.add_lane`), and two pieces of work run concurrently, one per
lane — a Python thread each (PyTorch ops and gloo/NCCL waits release the GIL, so while one lane waits
on its all-to-all the other computes). Collectives of one lane are issued in the same order on every
rank (each lane's work is the same sequence everywhere), so the two lanes never cross; on a GPU each
lane would also take its own CUDA stream.

* a plain expert-parallel step with two micro-batches: micro-batch 0 forward+backward on lane 0,
  micro-batch 1 on lane 1 (``train.strategy.Replicated``);
* DualPipe / DualPipeV F&B pairs: the forward chunk on lane 0 while the backward chunk runs on lane 1
  (``ModelStage.overlapped_forward_backward``); every other F runs on lane 0 and every B/I/W on lane 1;
* expert-parallel serving with two-micro-batch overlap (``--tbo``): each forward's rows in two halves,
  half k on lane k (``infer.engine.Engine._forward``).

The numbers are those of the sequential run, bitwise: the same kernels on the same inputs; the only
shared writes are the two micro-batches' gradient accumulations, a sum of two terms (commutative).

:class:`Trace` records, per rank and lane, when each piece of work ran and when each collective was
in flight; :func:`overlap_summary` turns that into the share of all-to-all time during which the other
lane was computing, :func:`write_chrome_trace` into a Chrome-trace JSON (chrome://tracing, Perfetto)
and :func:`plot_timeline` into a PNG.
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import time

import torch

_local = threading.local()
_aliases: dict[tuple[int, int], object] = {}     # (lane, id(lane-0 group)) -> that lane's copy


def current_lane() -> int:
    return getattr(_local, "lane", 0)


@contextlib.contextmanager
def lane(k: int):
    """Run the enclosed work on lane ``k`` (this thread's expert collectives use lane k's groups)."""
    prev = current_lane()
    _local.lane = k
    try:
        yield
    finally:
        _local.lane = prev


def register_lane_group(k: int, group0, group_k) -> None:
    """Lane ``k``'s copy of the process group ``group0`` (made by ``Mesh.add_lane``)."""
    _aliases[(k, id(group0))] = group_k


def has_lane(k: int, group0) -> bool:
    """Whether lane ``k`` can issue collectives of ``group0`` (lane 0 always; another lane once
    ``Mesh.add_lane(k)`` made its copy; no group, a world of one, needs none)."""
    return k == 0 or group0 is None or (k, id(group0)) in _aliases


def lane_group(group0):
    """The group to use for ``group0`` on this thread's lane; lane 0 uses it as it is. A lane without a
    copy of the group is an error, never a silent fall back onto the shared group (that would let two
    lanes issue collectives on one group in a racy order)."""
    k = current_lane()
    if k == 0 or group0 is None:
        return group0
    try:
        return _aliases[(k, id(group0))]
    except KeyError:
        raise RuntimeError(f"lane {k} has no copy of this process group: call Mesh.add_lane({k}) on every "
                           f"rank first") from None


class _Baton:
    """Which lane of this rank computes now. The lanes alternate: a lane hands the baton to the other
    whenever it starts a collective (and when it finishes its work), and takes it back once its
    collective is done *and* the other lane has handed it back. The order of turns is therefore a
    property of the program, not of timing: every rank runs the two lanes' pieces in the same
    interleaving, so the ranks reach each collective together (SGLang's two-batch overlap runs its
    micro-batches' stages in a fixed interleaving for the same reason) and none waits on a peer whose
    other lane happened to take the turn first."""

    def __init__(self, first: int):
        self.cv = threading.Condition()
        self.owner: int | None = first
        self.finished: set[int] = set()

    def take(self, k: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.owner in (None, k))
            self.owner = k

    def give(self, k: int) -> None:
        """Lane ``k`` starts waiting (a collective): the other lane's turn, unless it has finished."""
        with self.cv:
            self.owner = None if (1 - k) in self.finished else 1 - k
            self.cv.notify_all()

    def finish(self, k: int) -> None:
        with self.cv:
            self.finished.add(k)
        self.give(k)


def run_pair(first, second):
    """``first()`` on lane 0 in a helper thread while ``second()`` runs on lane 1 in this one; returns
    both results and re-raises the first error either raised (after both finished).

    The two take turns computing: one lane holds a *baton* while it computes and hands it to the other
    whenever it starts waiting on a collective (:func:`communicating`), so one lane's all-to-all is in
    flight while the other computes — as DualPipe pairs one chunk's compute with the other's
    communication — and the two never fight over the rank's cores. Lane 0 starts and the turns
    alternate strictly, so every rank interleaves the lanes' pieces in the same order. Deadlock-free
    as a single thread issuing the same collectives in that order would be: a lane holding the baton
    is never blocked on a peer, and a peer's lane reaches each collective at the same place in the
    same interleaving."""
    box: dict = {}
    baton = _Baton(first=0)

    def turns(fn, k):
        def run():
            _local.baton = baton
            baton.take(k)
            try:
                with lane(k):
                    return fn()
            finally:
                baton.finish(k)
                _local.baton = None
        return run

    # per-thread settings the helper must share with the caller: OpenMP threads, grad and inference mode
    threads, grad, inference = torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def target():
        try:
            torch.set_num_threads(threads)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                box["first"] = turns(first, 0)()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="dsv3-lane0", daemon=True)
    t.start()
    try:
        second_result = turns(second, 1)()
    finally:
        t.join()
    if "error" in box:
        raise box["error"]
    return box["first"], second_result


@contextlib.contextmanager
def communicating(name: str):
    """Around a blocking collective: hand the baton to the other lane for its duration (inside
    :func:`run_pair`) and record it as a "comm" interval when a trace is on."""
    baton = getattr(_local, "baton", None)
    k = current_lane()
    if baton is not None:
        baton.give(k)
    try:
        with span("comm", name):
            yield
    finally:
        if baton is not None:
            with span("wait", "turn"):          # the other lane computes: this one waits for its turn
                baton.take(k)


# ----------------------------------------------------------------------------------------- the trace
class Trace:
    """Intervals of work and communication per lane: (lane, category, name, start, end) in seconds of
    ``time.perf_counter``. Category "work" spans a lane's whole piece of work (a micro-batch's forward,
    a backward); "comm" is a collective in flight inside it; "wait" the lane waiting for its turn to
    compute (after a collective); the lane computes in work minus comm and wait."""

    def __init__(self, limit: int | None = None):
        """``limit``: keep only the newest ``limit`` intervals (a server records while it runs)."""
        self.events: collections.deque[tuple[int, str, str, float, float]] = collections.deque(maxlen=limit)
        self._lock = threading.Lock()

    def add(self, cat: str, name: str, t0: float, t1: float) -> None:
        with self._lock:
            self.events.append((current_lane(), cat, name, t0, t1))

    def clear(self) -> None:
        with self._lock:
            self.events.clear()


_trace: Trace | None = None


def set_trace(trace: Trace | None) -> None:
    """Record into ``trace`` from now on (None: stop recording)."""
    global _trace
    _trace = trace


@contextlib.contextmanager
def span(cat: str, name: str):
    """Record the enclosed code as a ``cat`` ("work" or "comm") interval when a trace is on."""
    tr = _trace
    if tr is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        tr.add(cat, name, t0, time.perf_counter())


def _merge(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _subtract(iv, cut):
    """Intervals ``iv`` minus the union of ``cut`` (both merged, sorted)."""
    out = []
    for a, b in iv:
        pos = a
        for c, d in cut:
            if d <= pos or c >= b:
                continue
            if c > pos:
                out.append((pos, c))
            pos = max(pos, d)
        if pos < b:
            out.append((pos, b))
    return out


def _overlap(x, y) -> float:
    total = 0.0
    for a, b in x:
        for c, d in y:
            lo, hi = max(a, c), min(b, d)
            if hi > lo:
                total += hi - lo
    return total


def _computing(work, idle) -> list[tuple[float, float]]:
    """When a lane computed: its work intervals minus those it spent communicating or waiting."""
    return _subtract(_merge(work), _merge(idle))


def overlap_summary(events) -> dict:
    """Seconds of communication of both lanes (``comm_s``) and of it: during which the other lane
    computed (``hidden_s``, ``hidden_fraction``), was communicating too (``both_comm_s``), was waiting
    for its turn (``other_waiting_s``) or had no work (``other_idle_s``)."""
    by = {(ln, cat): [] for ln in (0, 1) for cat in ("work", "comm", "wait")}
    for ln, cat, _, a, b in events:
        by.setdefault((ln, cat), []).append((a, b))
    comm = {ln: _merge(by[(ln, "comm")]) for ln in (0, 1)}
    compute = {ln: _computing(by[(ln, "work")], by[(ln, "comm")] + by[(ln, "wait")]) for ln in (0, 1)}
    total = sum(b - a for ln in (0, 1) for a, b in comm[ln])
    hidden = _overlap(comm[0], compute[1]) + _overlap(comm[1], compute[0])
    # what the other lane did during the rest: also communicating, waiting for its turn, or no work
    wait = {ln: _subtract(_merge(by[(ln, "wait")]), comm[ln]) for ln in (0, 1)}
    both = _overlap(comm[0], comm[1]) * 2
    other_wait = _overlap(comm[0], wait[1]) + _overlap(comm[1], wait[0])
    span_t = [t for _, _, _, a, b in events for t in (a, b)]
    return {"comm_s": total, "hidden_s": hidden, "hidden_fraction": hidden / total if total else 0.0,
            "both_comm_s": both, "other_waiting_s": other_wait,
            "other_idle_s": max(total - hidden - both - other_wait, 0.0),
            "compute_s": {ln: sum(b - a for a, b in compute[ln]) for ln in (0, 1)},
            "wall_s": (max(span_t) - min(span_t)) if span_t else 0.0}


def recent(events, works: int) -> list:
    """The events from the start of the ``works``-th newest "work" interval on (all when fewer): the
    tail of a long recording, e.g. a server's last forwards, for :func:`plot_timeline`."""
    starts = sorted(a for _, cat, _, a, _ in events if cat == "work")
    t0 = starts[-works] if len(starts) >= works else float("-inf")
    return [e for e in events if e[3] >= t0]


def write_chrome_trace(events, path: str, rank: int = 0, metadata: dict | None = None) -> None:
    """Chrome-trace JSON (``chrome://tracing``, https://ui.perfetto.dev): one process per rank, one
    thread row per lane and category; ``metadata`` (e.g. :func:`overlap_summary`) as its "otherData"."""
    t0 = min((a for *_, a, _ in events), default=0.0)
    rows = []
    for ln, cat, name, a, b in events:
        rows.append({"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": f"lane {ln} {cat}",
                     "ts": (a - t0) * 1e6, "dur": (b - a) * 1e6})
    with open(path, "w") as f:
        json.dump({"traceEvents": rows, "displayTimeUnit": "ms", "otherData": metadata or {}}, f)


def plot_timeline(events, path: str, title: str = "") -> None:
    """A PNG of the two lanes: compute in blue, all-to-all in orange, per lane."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min((a for *_, a, _ in events), default=0.0)
    fig, ax = plt.subplots(figsize=(12, 2.4))
    for ln in (0, 1):
        comm = _merge([(a, b) for l_, c, _, a, b in events if l_ == ln and c == "comm"])
        comp = _computing([(a, b) for l_, c, _, a, b in events if l_ == ln and c == "work"],
                          [(a, b) for l_, c, _, a, b in events if l_ == ln and c in ("comm", "wait")])
        y = 1 - ln
        ax.broken_barh([((a - t0) * 1e3, (b - a) * 1e3) for a, b in comp], (y + 0.05, 0.4), color="tab:blue")
        ax.broken_barh([((a - t0) * 1e3, (b - a) * 1e3) for a, b in comm], (y + 0.5, 0.4), color="tab:orange")
    ax.set_yticks([0.5, 1.5], ["lane 1", "lane 0"])
    ax.set_xlabel("ms")
    ax.set_title(title or "compute (blue) and all-to-all (orange) per lane")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
