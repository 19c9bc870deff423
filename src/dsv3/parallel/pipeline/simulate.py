"""Time a pipeline :class:`~dsv3.parallel.pipeline.schedule.Schedule` (SPEC §2.1, Table 2).

Cost model: every stage costs the same. ``F`` is a forward chunk, ``B`` a full backward chunk, ``W``
its weight-gradient part (so an ``I`` costs ``B − W``), ``FB`` an overlapped forward+backward pair
(default ``F + B``: no overlap gain) and ``comm`` the latency of one cross-rank message (hand-offs
between two stages on the same rank are free).

Event-driven and exact: each rank runs its actions in order; an action starts when the rank is free
and every input is there — the previous stage's forward (``+ comm`` when it ran on another rank), the
same stage's forward and the next stage's backward for a backward, the ``I`` for a ``W``. Sends are
asynchronous (they never stall the sender): this is the ideal Table 2 describes.
:func:`~dsv3.parallel.pipeline.schedule.validate` checks separately that the order is also
deadlock-free under blocking send/receive, and ``simulate(..., blocking=True)`` times that
rendezvous model instead (an upper bound for a ``batch_isend_irecv`` runtime).

Definitions (per rank ``r``):

* ``busy[r]``: sum of the costs of r's actions (an FB pair counts ``FB``, not ``F + B``);
* ``bubble[r] = makespan − busy[r]``: idle time of ``r`` inside the whole step (start and end
  included). This is the sense of the DualPipe README / report Table 2: for 1F1B, ``makespan =
  (M + PP − 1)(F + B)`` and ``busy = M(F + B)`` on every rank, so ``bubble = (PP − 1)(F + B)``.
  For DualPipe the ranks differ (the middle ones overlap more pairs) and the table gives the worst
  rank; see :func:`table2` for the exact correspondence and the cost regime where it holds.
* ``peak_activations[r]``: most micro-batch activations held at once, in *stage* units (DualPipeV's
  stages are half as big as the others'): +1 when a forward starts, −1 when the B or I consuming it
  ends — an FB holds its new forward and its backward's input together, hence DualPipe's ``PP + 1``.
  (Weight-gradient inputs kept alive until a deferred ``W`` are not counted, as in Table 2.)
* ``param_copies[r]``: parameters on ``r`` in units of model/num_ranks (1 for 1F1B/ZB1P/DualPipeV,
  2 for DualPipe's mirrored copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .schedule import Action, Schedule, ScheduleError, run_batches


@dataclass(frozen=True)
class Costs:
    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None
    comm: float = 0.0

    def __post_init__(self):
        fb = self.F + self.B if self.FB is None else self.FB
        object.__setattr__(self, "FB", fb)
        for k in ("F", "B", "W", "FB", "comm"):
            if getattr(self, k) < 0:
                raise ValueError(f"cost {k} must be >= 0, got {getattr(self, k)}")
        if self.W > self.B:
            raise ValueError(f"W ({self.W}) must not exceed the full backward B ({self.B})")

    @property
    def I(self) -> float:  # noqa: E743 - the paper's name
        return self.B - self.W

    def of(self, action: Action) -> float:
        """Compute time of one action (a non-overlapped FB pair costs F + B)."""
        if action.kind == "FB" and not action.overlapped:
            return self.F + self.B
        return {"F": self.F, "B": self.B, "I": self.I, "W": self.W, "FB": self.FB}[action.kind]


@dataclass
class SimResult:
    schedule: Schedule
    costs: Costs
    timeline: list[list[tuple[float, float, Action]]]  # per rank: (start, end, action) in order
    makespan: float
    busy: list[float]
    bubble: list[float]
    peak_activations: list[int]
    param_copies: list[float]
    extra: dict = field(default_factory=dict)

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    def closed_form(self) -> dict:
        """Table 2's bubble / parameters / activations for this schedule and these costs."""
        return table2(self.schedule.name, self.schedule.num_ranks, **_cost_kwargs(self.costs))

    def to_dict(self) -> dict:
        s = self.schedule
        return {
            "schedule": s.name,
            "num_ranks": s.num_ranks,
            "num_microbatches": s.num_microbatches,
            "num_stages": s.num_stages,
            "costs": {k: getattr(self.costs, k) for k in ("F", "B", "W", "FB", "comm")},
            "makespan": self.makespan,
            "busy": self.busy,
            "bubble": self.bubble,
            "peak_activations": self.peak_activations,
            "param_copies": self.param_copies,
            "table2": self.closed_form(),
        }


def _cost_kwargs(c: Costs) -> dict:
    return {"F": c.F, "B": c.B, "W": c.W, "FB": c.FB}


def table2(name: str, num_ranks: int, F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: float | None = None) -> dict:
    """The closed forms of the DualPipe README / report Table 2, for ``num_ranks`` devices.

    Returns ``bubble``, ``param_copies``, ``activations``, ``pp`` (the table's PP) and ``regime``
    (True when the costs lie where our simulation reproduces the closed form exactly).

    What the table's numbers mean, as reproduced by :func:`simulate` with equal-cost stages:

    * ``bubble`` is ``makespan − busy`` of the *worst* rank (F&B pairs counted at F&B). For 1F1B and
      ZB1P every rank does the same work, so every rank has that bubble. DualPipe's ranks do not:
      rank r with h = min(r, PP−1−r) overlaps more pairs the closer it is to the middle, and its
      bubble is ``table − max(0, PP/2 − 2 − h)·(F + B − F&B)``; the middle ranks carry the table value.
    * The table's ``PP`` is the number of pipeline *stages in one direction*: the number of ranks for
      1F1B, ZB1P and DualPipe, but ``2 × num_ranks`` for DualPipeV (the table's "PP+1 on PP/2
      devices": DualPipeV is DualPipe on PP = 2R ranks folded onto R). So on R ranks DualPipeV's
      bubble is ``(R − 1)(F&B + B − 3W)`` in its own (half-size) chunk costs and its activations
      ``2R + 1`` half-size chunks. Parameters are per rank in units of model/num_ranks (DualPipeV: 1;
      the table's "2×" is relative to model/(2R)).
    * The closed forms assume the deferred W's exactly fill the holes they are moved into, so they
      hold in a regime of costs (``regime`` in the result). 1F1B: always. ZB1P: when ``W <= F`` and
      ``W <= B − W``; in general the bubble is ``(PP−1)·max(F, B−W, F+B−2W)`` (the last rank waits
      ``(PP−1)F`` for its first input whatever is deferred). DualPipe/DualPipeV: when ``B >= 2F``,
      ``W <= B − W`` and ``max(F, B) <= F&B <= F + B`` (the report's setting, B ≈ 2F); there the
      worst-rank bubble equals the table. Outside it (e.g. B close to F) the simulated worst-rank
      bubble is larger; on random costs it was never below the closed form.
    """
    fb = F + B if FB is None else FB
    p = num_ranks
    eps = 1e-12
    if name == "1f1b":
        return {"bubble": (p - 1) * (F + B), "param_copies": 1.0, "activations": p, "pp": p, "regime": True}
    if name == "zb1p":
        ok = W <= F + eps and W <= B - W + eps
        return {"bubble": (p - 1) * (F + B - 2 * W), "param_copies": 1.0, "activations": p, "pp": p, "regime": ok}
    ok = B >= 2 * F - eps and W <= B - W + eps and max(F, B) - eps <= fb <= F + B + eps
    if name == "dualpipe":
        bubble = (p / 2 - 1) * (fb + B - 3 * W)
        return {"bubble": bubble, "param_copies": 2.0, "activations": p + 1, "pp": p, "regime": ok}
    if name == "dualpipev":
        pp = 2 * p
        bubble = (pp / 2 - 1) * (fb + B - 3 * W)
        return {"bubble": bubble, "param_copies": 1.0, "activations": pp + 1, "pp": pp, "regime": ok}
    raise ValueError(f"unknown schedule {name!r}")


def simulate(
    schedule: Schedule,
    F: float = 1.0,
    B: float = 2.0,
    W: float = 1.0,
    FB: float | None = None,
    comm: float = 0.0,
    blocking: bool = False,
) -> SimResult:
    """Run ``schedule`` on the cost model above and return a :class:`SimResult`.

    ``blocking=True`` times the blocking batch model of :mod:`.schedule` instead (each rank posts
    its sends and receives in one batch before every action and waits for all of them), i.e. what a
    ``batch_isend_irecv`` runtime would see; the default is the dependency-only ideal of Table 2.
    """
    costs = Costs(F=F, B=B, W=W, FB=FB, comm=comm)
    s = schedule
    p = s.num_ranks
    if blocking:
        times = run_batches(s, cost=costs.of, comm=comm)
        timeline = [[(st, e, a) for (st, e), a in zip(times[r], s.actions[r])] for r in range(p)]
        return _result(s, costs, timeline)
    end: dict[tuple[str, int, int], float] = {}  # ("F"|"BI"|"I", stage, mb) -> end time
    free = [0.0] * p
    pc = [0] * p
    timeline: list[list[tuple[float, float, Action]]] = [[] for _ in range(p)]

    def ready_time(a: Action) -> float | None:
        t = free[a.rank]
        for kind, stage, mb in a.parts():
            prev, nxt = s.neighbours(mb, stage)
            deps = []
            if kind == "F" and prev is not None:
                deps.append((("F", prev, mb), prev))
            elif kind in ("B", "I"):
                deps.append((("F", stage, mb), stage))
                if nxt is not None:
                    deps.append((("BI", nxt, mb), nxt))
            elif kind == "W":
                deps.append((("I", stage, mb), stage))
            for key, src in deps:
                if key not in end:
                    return None
                lat = costs.comm if s.stage_to_rank[src] != a.rank else 0.0
                t = max(t, end[key] + lat)
        return t

    remaining = sum(len(r) for r in s.actions)
    while remaining:
        progress = False
        for r in range(p):
            row = s.actions[r]
            while pc[r] < len(row):
                a = row[pc[r]]
                t = ready_time(a)
                if t is None:
                    break
                e = t + costs.of(a)
                timeline[r].append((t, e, a))
                for kind, stage, mb in a.parts():
                    end[("BI" if kind in ("B", "I") else kind, stage, mb)] = e
                    if kind == "I":
                        end[("I", stage, mb)] = e
                free[r] = e
                pc[r] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = [f"rank {r} at {s.actions[r][pc[r]]}" for r in range(p) if pc[r] < len(s.actions[r])]
            raise ScheduleError(f"{s.name}: dependencies cannot be satisfied: " + "; ".join(stuck))
    return _result(s, costs, timeline)


def _result(s: Schedule, costs: Costs, timeline) -> SimResult:
    makespan = max((row[-1][1] for row in timeline if row), default=0.0)
    busy = [sum(e - st for st, e, _ in row) for row in timeline]
    bubble = [makespan - b for b in busy]
    peaks = []
    for row in timeline:
        held = peak = 0
        for _, _, a in row:
            parts = a.parts()
            held += sum(1 for k, _, _ in parts if k == "F")
            peak = max(peak, held)
            held -= sum(1 for k, _, _ in parts if k in ("B", "I"))
        peaks.append(peak)
    copies = [s.param_copies(r) for r in range(s.num_ranks)]
    return SimResult(s, costs, timeline, makespan, busy, bubble, peaks, copies)
