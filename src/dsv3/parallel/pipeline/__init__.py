"""Pipeline parallelism (SPEC §2.1): schedules as data, a simulator, timeline pictures.

    from dsv3.parallel import pipeline
    sched = pipeline.build_schedule("dualpipe", num_ranks=8, num_microbatches=20)
    result = pipeline.simulate(sched, F=1.0, B=2.0, W=1.0, FB=2.5)
    result.bubble, result.makespan, result.peak_activations   # per rank, scalar, per rank
"""

from .schedule import SCHEDULES, Action, Message, Schedule, ScheduleError, build_schedule, custom_schedule, validate
from .simulate import Costs, SimResult, simulate, table2

__all__ = [
    "SCHEDULES",
    "Action",
    "Message",
    "Schedule",
    "ScheduleError",
    "build_schedule",
    "custom_schedule",
    "validate",
    "Costs",
    "SimResult",
    "simulate",
    "table2",
    "plot_timeline",
]


def plot_timeline(*args, **kwargs):
    """Draw a timeline picture (see :mod:`dsv3.parallel.pipeline.plot`); imports matplotlib lazily."""
    from .plot import plot_timeline as _plot

    return _plot(*args, **kwargs)
