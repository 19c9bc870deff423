"""Timeline pictures of simulated schedules, in the style of the DeepSeek-V3 report's Figure 5.

One row per rank, time to the right. Forward orange, full backward green, backward-for-input
teal, backward-for-weights blue; an overlapped forward & backward pair is one box with a thick
black border (forward on top, backward below). The second stage a rank holds — DualPipe's reverse
direction, DualPipeV's way back up the V — is drawn in a darker shade. Numbers are micro-batch ids
(counted per direction for DualPipe, as in the report). matplotlib is imported only when drawing.
"""

from __future__ import annotations

from .simulate import SimResult

_COLORS = {  # (first stage of the rank, second stage of the rank)
    "F": ("#fbd3b4", "#f0a060"),
    "B": ("#b9dca0", "#6fae4f"),
    "I": ("#b3e3d8", "#4fae9b"),
    "W": ("#bcd3f0", "#7ea6db"),
}
_NAMES = {"F": "forward", "B": "backward (full)", "I": "backward for input", "W": "backward for weights"}


def _label(sched, mb: int) -> str:
    if sched.name == "dualpipe" and sched.directions[mb] == 1:
        return str(mb - sched.num_microbatches // 2)
    return str(mb)


def plot_timeline(result: SimResult, path: str | None = None, *, title: str | None = None, ax=None, dpi: int = 150):
    """Draw ``result`` (a :class:`~.simulate.SimResult`); save to ``path`` if given. Returns the figure."""
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    sched = result.schedule
    p = sched.num_ranks
    span = max(result.makespan, 1e-9)
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(4 + span * 0.28, 40), 1.2 + 0.55 * p))
    else:
        fig = ax.figure
    unit = min(result.costs.F or 1.0, result.costs.B or 1.0)
    inches_per_time = fig.get_size_inches()[0] * 0.85 / span
    fs = max(3.5, min(9.0, 0.5 * inches_per_time * 72 * unit))  # two digits fit a 1-unit box

    def box(x, y, w, h, kind, stage, mb, lw=0.4, ec="#555555"):
        second = stage >= p
        ax.add_patch(Rectangle((x, y), w, h, facecolor=_COLORS[kind][second], edgecolor=ec, linewidth=lw))
        if w > 0:
            size = fs * (0.85 if h < 0.6 else 1)
            ax.text(x + w / 2, y + h / 2, _label(sched, mb), ha="center", va="center", fontsize=size)

    for r, row in enumerate(result.timeline):
        y = p - 1 - r  # rank 0 on top
        for start, end, a in row:
            if a.kind != "FB":
                box(start, y + 0.1, end - start, 0.8, a.kind, a.stage, a.microbatch)
            elif a.overlapped:
                w = end - start
                box(start, y + 0.5, w, 0.4, "F", a.stage, a.microbatch)
                box(start, y + 0.1, w, 0.4, "B", a.b_stage, a.b_microbatch)
                ax.add_patch(Rectangle((start, y + 0.1), w, 0.8, fill=False, edgecolor="black", linewidth=1.4))
            else:
                f = result.costs.F
                box(start, y + 0.1, f, 0.8, "F", a.stage, a.microbatch)
                box(start + f, y + 0.1, end - start - f, 0.8, "B", a.b_stage, a.b_microbatch)
    ax.set_xlim(0, span)
    ax.set_ylim(0, p)
    ax.set_yticks([p - 1 - r + 0.5 for r in range(p)])
    ax.set_yticklabels([f"rank {r}" for r in range(p)])
    ax.set_xlabel("time")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    kinds = sorted({k for row in sched.actions for a in row for k, _, _ in a.parts()}, key="FBIW".index)
    handles = [Patch(facecolor=_COLORS[k][0], edgecolor="#555555", label=_NAMES[k]) for k in kinds]
    if any(s >= p for s in range(sched.num_stages)):
        other = "reverse direction" if sched.name == "dualpipe" else "second stage of the rank (V way back)"
        handles.append(Patch(facecolor=_COLORS["F"][1], edgecolor="#555555", label=f"darker: {other}"))
    if any(a.kind == "FB" and a.overlapped for row in sched.actions for a in row):
        label = "overlapped forward & backward"
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.4, label=label))
    anchor = (0.5, -0.12 - 0.5 / (p + 2))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=anchor, ncol=len(handles), fontsize=8, frameon=False)
    c = result.costs
    used = {k for row in sched.actions for a in row for k, _, _ in a.parts()}
    cost_text = f"F={c.F:g} B={c.B:g}" + (f" W={c.W:g}" if "W" in used else "")
    cost_text += f" F&B={c.FB:g}" if any(a.kind == "FB" and a.overlapped for row in sched.actions for a in row) else ""
    cost_text += f" comm={c.comm:g}" if c.comm else ""
    ax.set_title(
        title
        or (
            f"{sched.name}: {p} ranks, {sched.num_microbatches} micro-batches — makespan {result.makespan:g}, "
            f"max bubble {max(result.bubble):g}, peak activations {max(result.peak_activations)} ({cost_text})"
        ),
        fontsize=10,
    )
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
    return fig
