"""Closed forms for the pipeline schedules (SPEC §2.1, Table 2 of the DualPipe write-up).

The planner needs four things per schedule: how the model is cut into stages and which stages a rank
holds, the idle time (bubble) of a step, the peak number of micro-batch activations a rank keeps, and
how many of its chunks run *without* a partner chunk to hide their communication behind. This module
answers them in closed form so the planner does not depend on the pipeline simulator
(:mod:`dsv3.parallel.pipeline`); :func:`schedule_model` is the single place to swap in simulated
values later (same fields, per rank).

Units: ``F`` forward time of one chunk, ``B`` its full backward (input + weight), ``W`` its
weight-only backward, ``FB`` an overlapped forward+backward pair, all for one micro-batch.

| schedule  | stages | chunks/rank | bubble                    | param copies | peak activations (chunks) |
|-----------|--------|-------------|---------------------------|--------------|---------------------------|
| 1f1b      | PP     | 1           | (PP-1)(F+B)               | 1            | PP                        |
| zb1p      | PP     | 1           | (PP-1)(F+B-2W)            | 1            | PP                        |
| dualpipe  | PP     | 2 (r, PP-1-r) | (PP/2-1)(FB+B-3W)       | 2            | PP+1                      |
| dualpipev | 2PP    | 2 (r, 2PP-1-r)| (PP-1)(FB+B-3W) [#]     | 1            | 2PP+1 half-size chunks    |

[#] DualPipeV is DualPipe with 2·PP stages folded onto PP ranks, so Table 2's ``PP/2 − 1`` with
``PP → 2·PP`` stages; its chunks are half a DualPipe stage.

Unpaired chunks (DualPipe's ``step()``, deepseek-ai/DualPipe): rank ``r`` with ``h = min(r, PP−1−r)``
runs ``3·PP/2 − h − 1`` forward chunks (warm-up) and as many backward chunks (cool-down) that are not
overlapped with a partner; the rest run as F&B pairs. The worst rank (h = 0) has ``3·PP/2 − 1``.
DualPipeV's steps are the same with ``PP/2 → PP`` (``3·PP − 1`` of its ``2·N`` chunk passes).
1F1B and ZB1P overlap nothing: all their chunks are unpaired.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class ScheduleModel:
    name: str
    pp: int                    # pipeline ranks
    microbatches: int          # per pipeline per step
    num_stages: int            # model cut into this many stages
    param_copies: int          # copies of the whole model's parameters across the pipeline
    overlaps_comm: bool        # hides all-to-all / p2p behind a partner chunk

    def rank_stages(self, rank: int) -> tuple[int, ...]:
        """Stages held by pipeline rank ``rank``."""
        if self.name in ("1f1b", "zb1p"):
            return (rank,)
        return (rank, self.num_stages - 1 - rank)

    @property
    def chunk_passes_per_microbatch(self) -> float:
        """How many of a rank's chunks one micro-batch passes through, on average per held stage.

        1F1B/ZB1P: each micro-batch passes the rank's one stage. DualPipe: each micro-batch passes a
        rank once, in one of its two stages (half the micro-batches come from each end), so each held
        stage sees N/2. DualPipeV: each micro-batch passes both of the rank's stages.
        """
        return {"1f1b": 1.0, "zb1p": 1.0, "dualpipe": 0.5, "dualpipev": 1.0}[self.name]

    def bubble(self, F: float, B: float, W: float, FB: float | None = None) -> float:
        """Idle time of one step on the worst rank (Table 2), in the units of F, B, W."""
        FB = F + B if FB is None else FB
        P = self.pp
        if self.name == "1f1b":
            return (P - 1) * (F + B)
        if self.name == "zb1p":
            return (P - 1) * (F + B - 2 * W)
        if self.name == "dualpipe":
            return (P // 2 - 1) * (FB + B - 3 * W)
        return (P - 1) * (FB + B - 3 * W)

    @property
    def peak_inflight(self) -> int:
        """Peak micro-batch activations a rank keeps, in chunks (of this schedule's stage size)."""
        return {"1f1b": self.pp, "zb1p": self.pp, "dualpipe": self.pp + 1,
                "dualpipev": 2 * self.pp + 1}[self.name]

    def peak_inflight_rank(self, rank: int) -> int:
        """Peak chunks in flight on ``rank``: 1F1B/ZB1P rank r keeps PP−r (warm-up depth); DualPipe(V)
        ranks are all taken at Table 2's bound."""
        if self.name in ("1f1b", "zb1p"):
            return min(self.pp - rank, self.microbatches)
        return self.peak_inflight

    @property
    def unpaired_chunks(self) -> int:
        """Forward chunks (and as many backward chunks) of the worst rank with no overlap partner."""
        if self.name == "dualpipe":
            return 3 * self.pp // 2 - 1
        if self.name == "dualpipev":
            return 3 * self.pp - 1
        return self.chunk_executions

    @property
    def chunk_executions(self) -> int:
        """Forward chunk executions per rank per step (backward: as many)."""
        return self.microbatches * (2 if self.name == "dualpipev" else 1)

    def to_dict(self) -> dict:
        return {"name": self.name, "pp": self.pp, "microbatches": self.microbatches,
                "num_stages": self.num_stages, "param_copies": self.param_copies,
                "overlaps_comm": self.overlaps_comm, "peak_inflight_chunks": self.peak_inflight,
                "unpaired_chunks_worst_rank": self.unpaired_chunks,
                "chunk_executions_per_rank": self.chunk_executions}


def schedule_model(name: str, pp: int, microbatches: int) -> ScheduleModel:
    """Validate a schedule for ``pp`` ranks and ``microbatches`` per step; raise ValueError if impossible."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"PP must be a positive integer, got {pp!r}")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"micro-batches per step must be a positive integer, got {microbatches!r}")
    if name in ("1f1b", "zb1p"):
        if microbatches < pp:
            raise ValueError(f"{name} with PP {pp} needs at least {pp} micro-batches per step, "
                             f"got {microbatches} (the pipeline would never fill)")
        return ScheduleModel(name, pp, microbatches, pp, 1, False)
    if pp % 2:
        raise ValueError(f"{name} needs an even PP, got {pp}")
    if microbatches % 2:
        raise ValueError(f"{name} needs an even number of micro-batches, got {microbatches}")
    if microbatches < 2 * pp:
        raise ValueError(f"{name} with PP {pp} needs at least 2*PP = {2 * pp} micro-batches per step, "
                         f"got {microbatches}")
    if name == "dualpipe":
        return ScheduleModel(name, pp, microbatches, pp, 2, True)
    return ScheduleModel(name, pp, microbatches, 2 * pp, 1, True)
