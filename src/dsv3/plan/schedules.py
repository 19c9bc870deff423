"""Closed forms for the pipeline schedules (SPEC §2.1, Table 2 of the DualPipe write-up).

The planner needs four things per schedule: how the model is cut into stages and which stages a rank
holds, the idle time (bubble) of a step, the peak number of micro-batch activations a rank keeps, and
how many of its chunks run *without* a partner chunk to hide their communication behind. This module
answers them in closed form so the planner does not run the pipeline simulator; the schedule names,
the size rules (which PP and micro-batch counts a schedule accepts) and the number of model chunks
come from the runtime's :mod:`dsv3.parallel.pipeline.schedule`, so a layout the planner accepts is one
the pipeline builds. ``tests/test_plan.py`` checks every closed form below against the simulator on
the schedules the runtime builds, down to the minimum micro-batch counts. :func:`schedule_model` is
the single place to swap in simulated values later (same fields, per rank).

Sizes (from the runtime): 1F1B/ZB1P any PP and ``M >= 1``; DualPipe an even PP and an even
``M >= max(2, 2·PP − 2)`` (PP − 1 per direction); DualPipeV any PP and ``M >= 2·PP − 1``.

Units: ``F`` forward time of one chunk, ``B`` its full backward (input + weight), ``W`` its
weight-only backward, ``FB`` an overlapped forward+backward pair, all for one micro-batch.

| schedule  | stages | chunks/rank | bubble                    | param copies | peak activations (chunks) |
|-----------|--------|-------------|---------------------------|--------------|---------------------------|
| 1f1b      | PP     | 1           | (PP-1)(F+B)               | 1            | min(PP, M)                |
| zb1p      | PP     | 1           | (PP-1)(F+B-2W) + max(0, PP-M)·W [*] | 1  | min(PP, M)                |
| dualpipe  | PP     | 2 (r, PP-1-r) | (PP/2-1)(FB+B-3W)       | 2            | min(PP+1, M)              |
| dualpipev | 2PP    | 2 (r, 2PP-1-r)| (PP-1)(FB+B-3W) [#]     | 1            | min(2PP+1, 2M) half-size chunks |

[*] With fewer micro-batches than ranks ZB-H1 has fewer W's to defer into the warm-up holes: each
missing micro-batch leaves one W of idle time.

[#] DualPipeV is DualPipe with 2·PP stages folded onto PP ranks, so Table 2's ``PP/2 − 1`` with
``PP → 2·PP`` stages; its chunks are half a DualPipe stage.

Unpaired chunks (DualPipe's ``step()``, deepseek-ai/DualPipe): rank ``r`` with ``h = min(r, PP−1−r)``
runs ``3·PP/2 − h − 1`` forward chunks (warm-up) and as many backward chunks (cool-down) that are not
overlapped with a partner; the rest run as F&B pairs. The worst rank (h = 0) has ``3·PP/2 − 1``.
DualPipeV's steps are the same with ``PP/2 → PP`` (``3·PP − 1`` of its ``2·N`` chunk passes). The
middle ranks run their first pair of the main loop back to back (the turning point), one more
unpaired chunk: that decides the worst rank only when the middle rank is the end rank (DualPipe on
PP = 2, DualPipeV on PP = 1) and the main loop is not empty.
1F1B and ZB1P overlap nothing: all their chunks are unpaired.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..parallel.pipeline.schedule import MIN_MICROBATCHES, SCHEDULES, check_sizes, num_model_chunks

__all__ = ["MIN_MICROBATCHES", "SCHEDULES", "ScheduleModel", "schedule_model"]


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
            return (P - 1) * (F + B - 2 * W) + max(0, P - self.microbatches) * W
        if self.name == "dualpipe":
            return (P // 2 - 1) * (FB + B - 3 * W)
        return (P - 1) * (FB + B - 3 * W)

    @property
    def peak_inflight(self) -> int:
        """Peak micro-batch activations a rank keeps, in chunks (of this schedule's stage size)."""
        M = self.microbatches
        return {"1f1b": min(self.pp, M), "zb1p": min(self.pp, M), "dualpipe": min(self.pp + 1, M),
                "dualpipev": min(2 * self.pp + 1, 2 * M)}[self.name]

    def peak_inflight_rank(self, rank: int) -> int:
        """Peak chunks in flight on ``rank``: 1F1B/ZB1P rank r keeps PP−r (warm-up depth); DualPipe(V)
        ranks are all taken at Table 2's bound."""
        if self.name in ("1f1b", "zb1p"):
            return min(self.pp - rank, self.microbatches)
        return self.peak_inflight

    @property
    def unpaired_chunks(self) -> int:
        """Forward chunks (and as many backward chunks) of the worst rank with no overlap partner."""
        if self.name not in ("dualpipe", "dualpipev"):
            return self.chunk_executions
        # H: ranks per direction's half; n: micro-batches per direction (DualPipeV: all of them)
        H, n = (self.pp // 2, self.microbatches // 2) if self.name == "dualpipe" else (self.pp, self.microbatches)
        turning_point = H == 1 and n - 2 * H + 1 > 0      # the end rank is the middle one
        return 3 * H - 1 + int(turning_point)

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
    """Validate a schedule for ``pp`` ranks and ``microbatches`` per step with the pipeline runtime's
    size rules (:func:`dsv3.parallel.pipeline.schedule.check_sizes`); raise ValueError if impossible."""
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"PP must be a positive integer, got {pp!r}")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"micro-batches per step must be a positive integer, got {microbatches!r}")
    check_sizes(name, pp, microbatches)
    copies = 2 if name == "dualpipe" else 1
    overlaps = name in ("dualpipe", "dualpipev")
    return ScheduleModel(name, pp, microbatches, num_model_chunks(name, pp), copies, overlaps)
