"""Shielding a timed multi-rank run from the rest of a shared machine.

On a 2-core machine shared with other jobs, the ranks of a gloo run wait for the scheduler more
than for each other: a rank woken by its all-to-all sits behind another process's time slice, and
that wait is counted as communication. ``realtime()`` puts the calling process (and the threads it
starts afterwards: gloo's, the overlap lanes) in the SCHED_FIFO class, ahead of every ordinary
process, as an isolated core would. It needs root or CAP_SYS_NICE; results say which class ran.

It suits runs with at most one rank per core. With more ranks than cores it misleads: threads of one
SCHED_FIFO priority never preempt each other, so gloo's transport threads, woken when an all-to-all's
bytes arrive, wait until some computing thread blocks, and the all-to-all looks as long as the
computation beside it. ``overlap.py`` at pp2 × ep2 (4 ranks on 2 cores) hid 26–31% of its all-to-all
time in SCHED_FIFO against 47–63% at normal priority (same config, same day). Giving the transport
threads a higher FIFO priority instead made them spin and starve the computation outright.
"""

from __future__ import annotations

import os

PRIORITY = 10


def realtime(priority: int = PRIORITY) -> None:
    """SCHED_FIFO for this process; a clear error where the system does not allow it."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (PermissionError, AttributeError, OSError) as e:
        raise SystemExit(f"--realtime: cannot switch to SCHED_FIFO here ({e}); run as root or with "
                         f"CAP_SYS_NICE, or without --realtime") from None


def scheduling(is_realtime: bool) -> str:
    return (f"ranks in SCHED_FIFO (priority {PRIORITY}), ahead of the machine's other processes"
            if is_realtime else "ranks at normal priority, sharing the machine with its other processes")
