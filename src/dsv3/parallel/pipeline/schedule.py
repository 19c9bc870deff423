"""Pipeline schedules as data (SPEC §2.1): per-rank action lists for 1F1B, ZB1P, DualPipe, DualPipeV.

Vocabulary
----------
* A *stage* is one slice of layers placed on one rank. ``Schedule.stage_to_rank[s]`` is its rank and
  ``Schedule.stage_chunk[s]`` the slice of the model it holds: DualPipe keeps two copies of every
  slice (stage ``s`` and stage ``PP + s`` hold the same layers), so it has ``2·PP`` stages but
  ``PP`` chunks.
* Micro-batch ``m`` visits the stages ``Schedule.paths[m]`` in forward order (backward in reverse).
* An :class:`Action` is one unit of compute on one rank:

  ====  ===================================================================================
  F     forward of ``stage`` for ``microbatch``
  B     full backward (input gradient + weight gradient)
  I     backward for the input only (ZeroBubble's "B"); its weight gradient is a later ``W``
  W     backward for the weights of a stage/micro-batch whose ``I`` ran before, same rank
  FB    forward of (``stage``, ``microbatch``) overlapped with the full backward of
        (``b_stage``, ``b_microbatch``) — DualPipe's F&B pair
  ====  ===================================================================================

* Communication is implied by the placement and carried on each action: ``recvs`` are the messages
  the action needs from other ranks (activations for a forward, output gradients for a backward),
  ``sends`` the ones it produces for other ranks. Hand-offs between two stages on the same rank
  (the tip of DualPipeV's V) are local and carry no message.

Communication model checked by :func:`validate`
-----------------------------------------------
Each rank runs its list in order. Before action ``k`` it posts *one batch* holding the sends produced
by action ``k−1`` and the receives listed in action ``k``'s ``posts``, and waits until every
operation of the batch is matched by the peer (a send is matched once the receiver has posted the
receive, and vice versa: the blocking, rendezvous reading of ``batch_isend_irecv`` + ``wait``).
After its last action a rank posts a final batch of its remaining sends. Between one pair of ranks
messages are matched in the order they are posted (untagged point-to-point channels are FIFO), so
``posts`` lists receives in the sender's order: a message sent early but used late (DualPipe's
two directions share each link) is received early and kept. A runtime that follows this rule
inherits the deadlock-freedom checked here. DualPipe's middle ranks run their first forward and
backward back to back as one unit (an FB action with ``overlapped=False``): as two separate
actions the two middle ranks would both block sending an activation the other only receives later.

Micro-batch minimums (``ValueError`` below them, with the rule)
---------------------------------------------------------------
* ``1f1b``, ``zb1p``: ``num_microbatches >= 1`` (Table 2's bubble needs ``>= PP``).
* ``dualpipe``: ``PP`` even, ``num_microbatches`` even and ``>= 2·PP − 2`` (``PP − 1`` per
  direction; ``>= 2`` for PP = 2). DeepSeek's reference asks for ``>= 2·PP``; with one step fewer
  the rank-0 main loop is empty but the schedule stays valid with the same bubble and memory.
* ``dualpipev``: ``num_microbatches >= 2·PP − 1`` (the cut-in-half form of the same bound; any PP).
Below these, the step counts of the construction go negative.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field, replace

KINDS = ("F", "B", "I", "W", "FB")
SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Message:
    """A tensor that crosses ranks: ``act`` (forward output) or ``grad`` (gradient of that output)."""

    kind: str  # "act" | "grad"
    microbatch: int
    src_stage: int
    dst_stage: int
    src_rank: int
    dst_rank: int

    def __str__(self) -> str:
        route = f"s{self.src_stage}->s{self.dst_stage} r{self.src_rank}->r{self.dst_rank}"
        return f"{self.kind}(mb{self.microbatch} {route})"


@dataclass(frozen=True)
class Action:
    """One compute action of one rank; see the module docstring for the kinds."""

    rank: int
    kind: str
    stage: int
    microbatch: int
    b_stage: int | None = None  # FB only: the backward half
    b_microbatch: int | None = None
    overlapped: bool = True  # FB only: False = run F then B, but as one communication unit
    recvs: tuple[Message, ...] = ()  # messages this action consumes
    sends: tuple[Message, ...] = ()  # messages it produces (posted in the batch after it)
    posts: tuple[Message, ...] = ()  # receives posted in the batch before it (channel order)

    def parts(self) -> tuple[tuple[str, int, int], ...]:
        """The elementary (kind, stage, microbatch) computations: two for FB (F then B), else one."""
        if self.kind == "FB":
            return (("F", self.stage, self.microbatch), ("B", self.b_stage, self.b_microbatch))
        return ((self.kind, self.stage, self.microbatch),)

    def __str__(self) -> str:
        return ("&" if self.overlapped else "+").join(f"{k}{m}.s{s}" for k, s, m in self.parts())


@dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: placement, micro-batch paths and per-rank ordered actions."""

    name: str
    num_ranks: int
    num_microbatches: int
    num_stages: int
    stage_to_rank: tuple[int, ...]
    stage_chunk: tuple[int, ...]  # model slice each stage holds (copies share an index)
    paths: tuple[tuple[int, ...], ...]  # per micro-batch: stages in forward order
    directions: tuple[int, ...]  # per micro-batch: 0, or 1 for DualPipe's reverse direction
    actions: tuple[tuple[Action, ...], ...] = field(repr=False)  # per rank

    @property
    def num_chunks(self) -> int:
        """Number of distinct model slices (PP, or 2·PP for DualPipeV)."""
        return len(set(self.stage_chunk))

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    def param_copies(self, rank: int) -> float:
        """Parameters held by ``rank`` in units of model/num_ranks (1F1B's share)."""
        return len(self.stages_of(rank)) * self.num_ranks / self.num_chunks

    def neighbours(self, microbatch: int, stage: int) -> tuple[int | None, int | None]:
        """(previous stage, next stage) of ``stage`` on the micro-batch's path (None at the ends)."""
        path = self.paths[microbatch]
        i = path.index(stage)
        return (path[i - 1] if i > 0 else None, path[i + 1] if i + 1 < len(path) else None)

    def __str__(self) -> str:
        lines = [
            f"{self.name}: {self.num_ranks} ranks, {self.num_microbatches} micro-batches, "
            f"{self.num_stages} stages ({self.num_chunks} model chunks)"
        ]
        for r in range(self.num_ranks):
            lines.append(f"  rank {r} stages {list(self.stages_of(r))}: " + " ".join(str(a) for a in self.actions[r]))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# builders


def check_ranks(name: str, p: int) -> None:
    """Raise ``ValueError`` unless ``name`` can run on ``p`` ranks at all (dualpipe: an even number)."""
    if name == "dualpipe" and p % 2:
        raise ValueError(f"dualpipe needs an even number of ranks (rank r pairs with PP-1-r); got {p}")


def check_sizes(name: str, p: int, m: int) -> None:
    """Raise ``ValueError`` (stating the rule) unless ``name`` builds for ``p`` ranks and ``m``
    micro-batches per step — the size rules of the module docstring; the planner (:mod:`dsv3.plan`)
    applies the same ones."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if p < 1 or m < 1:
        raise ValueError(f"num_ranks and num_microbatches must be >= 1 (got {p}, {m})")
    check_ranks(name, p)
    if name == "dualpipe":
        if m % 2:
            raise ValueError(f"dualpipe needs an even number of micro-batches (half enter from each end); got {m}")
    need = MIN_MICROBATCHES[name](p)
    if m < need:
        raise ValueError(f"{name} with {p} ranks needs num_microbatches >= {need} ({_RULES[name]}); got {m}")


MIN_MICROBATCHES = {
    "1f1b": lambda p: 1,
    "zb1p": lambda p: 1,
    "dualpipe": lambda p: max(2, 2 * p - 2),
    "dualpipev": lambda p: max(1, 2 * p - 1),
}
_RULES = {
    "1f1b": ">= 1",
    "zb1p": ">= 1",
    "dualpipe": "at least PP-1 per direction, i.e. >= 2*PP-2, and >= 2",
    "dualpipev": ">= 2*PP-1",
}


def num_model_chunks(name: str, p: int) -> int:
    """Model slices of ``name`` on ``p`` ranks (``Schedule.num_chunks``): 2·PP for DualPipeV, else PP
    (DualPipe's 2·PP stages are two copies of PP slices)."""
    return 2 * p if name == "dualpipev" else p


# ----------------------------------------------------------------------------------------- layer split
def split_blocks(n_blocks: int, n_chunks: int) -> list[int]:
    """Blocks per chunk (the rule of ``stages.py``'s docstring): ``ceil(n/C)`` each, one fewer for
    ``C·ceil − n`` chunks taken in the order last, first, second-to-last, second, …"""
    if n_blocks < 0 or n_chunks < 1:
        raise ValueError(f"cannot split {n_blocks} blocks into {n_chunks} chunks")
    hi = -(-n_blocks // n_chunks)
    sizes = [hi] * n_chunks
    order = [c for k in range((n_chunks + 1) // 2) for c in dict.fromkeys((n_chunks - 1 - k, k))]
    for c in order[:hi * n_chunks - n_blocks]:
        sizes[c] -= 1
    return sizes


def split_layers(num_layers: int, num_chunks: int, num_mtp: int = 0) -> list[range]:
    """Contiguous trunk-layer ranges of each chunk: :func:`split_blocks` over the ``num_layers`` layers
    and the ``num_mtp`` MTP modules, which all sit in the last chunk (see ``stages.py``'s docstring)."""
    sizes = split_blocks(num_layers + num_mtp, num_chunks)
    sizes[-1] -= num_mtp
    if sizes[-1] < 0:                   # the last chunk holds the MTP modules only
        sizes = split_blocks(num_layers, num_chunks - 1) + [0] if num_chunks > 1 else [num_layers]
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


def _one_f_one_b(p: int, m: int, zero_bubble: bool) -> list[list[tuple]]:
    """1F1B; with ``zero_bubble`` the ZB-H1 variant: B split into I and W, rank i keeps i W's deferred.

    Rank i runs min(PP−1−i, M) warm-up forwards, then (F, backward) pairs, then the cool-down
    backwards. ZB-H1 (Qi et al. 2023): after each I the rank runs the oldest pending W unless that
    would leave fewer than ``i`` W's pending; the deferred W's fill the cool-down. Rank i then holds
    at most PP micro-batches whose weight gradient is pending, as 1F1B's first rank does.
    """
    progs = []
    for i in range(p):
        prog: list[tuple] = []
        warm = min(p - 1 - i, m)
        pending: deque[int] = deque()

        def backward(k: int) -> None:
            if not zero_bubble:
                prog.append(("B", i, k))
                return
            prog.append(("I", i, k))
            pending.append(k)
            if len(pending) > i:
                prog.append(("W", i, pending.popleft()))

        for k in range(warm):
            prog.append(("F", i, k))
        for k in range(m - warm):
            prog.append(("F", i, warm + k))
            backward(k)
        for k in range(m - warm, m):
            backward(k)
        prog.extend(("W", i, k) for k in pending)
        progs.append(prog)
    return progs


def _dualpipe_rank_program(h: int, half_ranks: int, n: int) -> list[tuple]:
    """Abstract DualPipe program of one rank, in *phases* (0: the direction entering at this rank's
    end of the pipeline, 1: the other one), for ``h`` = min(r, PP−1−r), ``half_ranks`` = PP/2 and
    ``n`` micro-batches per direction. DualPipeV on R ranks is the same program with
    ``half_ranks = R`` and ``h = r`` (the "cut-in-half" DualPipe).

    Ops: ("F", ph), ("B", ph), ("I", ph), ("W",), ("FB", f_ph, b_ph) and ("FBn", ...) for a pair run
    back to back without overlap. The eight steps of the report's
    Figure 5: F0 warm-up; F0 F1 pairs; I1 W F1 (zero-bubble); main F0&B1 F1&B0; B1 F1&B0; B1 B0
    (second half zero-bubble); W I0; W drain.
    """
    H, prog = half_ranks, []
    middle = h == H - 1
    prog += [("F", 0)] * (2 * (H - h - 1))
    prog += [("F", 0), ("F", 1)] * (h + 1)
    prog += [("I", 1), ("W",), ("F", 1)] * (H - h - 1)
    for i in range(n - 2 * H + h + 1):
        if i == 0 and middle:  # the turning point: F0 then B1, not overlapped (as DeepSeek does),
            prog.append(("FBn", 0, 1))  # but one communication unit so the two middle ranks swap

        else:
            prog.append(("FB", 0, 1))
        prog.append(("FB", 1, 0))
    for _ in range(H - h - 1):
        prog += [("B", 1), ("FB", 1, 0)]
    steps6 = h + 1
    zb = False
    for i in range(steps6):
        if i == steps6 // 2 and h % 2 == 1:
            zb = True
        prog.append(("I" if zb else "B", 1))
        if i == steps6 // 2 and h % 2 == 0:
            zb = True
        prog.append(("I" if zb else "B", 0))
    prog += [("W",), ("I", 0)] * (H - h - 1)
    prog += [("W",)] * (h + 1)
    return prog


def _resolve_phases(prog, rank, phase_stage, phase_mbs) -> list[tuple]:
    """Turn a phase program into (kind, stage, mb[, b_stage, b_mb]) tuples: forwards and backwards of
    each phase take its micro-batches in FIFO order, W takes the oldest pending I (FIFO)."""
    nf, nb = [0, 0], [0, 0]
    pending: deque[tuple[int, int]] = deque()
    out = []

    def take(counter, ph):
        mb = phase_mbs[ph][counter[ph]]
        counter[ph] += 1
        return phase_stage[ph], mb

    for op in prog:
        kind = op[0]
        if kind == "F":
            out.append(("F", *take(nf, op[1])))
        elif kind in ("B", "I"):
            s, mb = take(nb, op[1])
            out.append((kind, s, mb))
            if kind == "I":
                pending.append((s, mb))
        elif kind == "W":
            out.append(("W", *pending.popleft()))
        else:  # FB / FBn
            fs, fm = take(nf, op[1])
            bs, bm = take(nb, op[2])
            out.append((kind, fs, fm, bs, bm))
    assert not pending, f"rank {rank}: W's left over"
    return out


def _dualpipe(p: int, m: int) -> list[list[tuple]]:
    H, n = p // 2, m // 2
    dir_mbs = (list(range(n)), list(range(n, m)))
    progs = []
    for r in range(p):
        h = min(r, p - 1 - r)
        second = r >= H
        # stage of direction 0 on rank r is r; of direction 1 is PP + (PP-1-r) (see _placement)
        stage = {0: r, 1: 2 * p - 1 - r}
        phase_dir = (1, 0) if second else (0, 1)
        prog = _dualpipe_rank_program(h, H, n)
        progs.append(_resolve_phases(prog, r, [stage[d] for d in phase_dir], [dir_mbs[d] for d in phase_dir]))
    return progs


def _dualpipev(p: int, m: int) -> list[list[tuple]]:
    mbs = list(range(m))
    return [_resolve_phases(_dualpipe_rank_program(r, p, m), r, [r, 2 * p - 1 - r], [mbs, mbs]) for r in range(p)]


def _placement(name: str, p: int, m: int):
    """(stage_to_rank, stage_chunk, paths, directions)."""
    if name in ("1f1b", "zb1p"):
        return tuple(range(p)), tuple(range(p)), tuple(tuple(range(p)) for _ in range(m)), (0,) * m
    s2r = tuple(list(range(p)) + list(range(p - 1, -1, -1)))  # stage r and 2PP-1-r on rank r
    if name == "dualpipev":
        return s2r, tuple(range(2 * p)), tuple(tuple(range(2 * p)) for _ in range(m)), (0,) * m
    # dualpipe: stages 0..PP-1 run direction 0 on ranks 0..PP-1 (copy A); stage PP+j is copy B of
    # chunk j, on rank PP-1-j, run by direction 1 (micro-batches m//2..m-1) from the last rank back.
    n = m // 2
    chunk = tuple(list(range(p)) + list(range(p)))
    fwd, rev = tuple(range(p)), tuple(range(p, 2 * p))
    return s2r, chunk, tuple(fwd if k < n else rev for k in range(m)), tuple(0 if k < n else 1 for k in range(m))


def _messages(s2r, paths, kind: str, stage: int, mb: int) -> tuple[list[Message], list[Message]]:
    """(received, sent) cross-rank messages of one elementary computation."""
    path = paths[mb]
    i = path.index(stage)
    prev = path[i - 1] if i > 0 else None
    nxt = path[i + 1] if i + 1 < len(path) else None
    recv, send = [], []
    if kind == "F":
        if prev is not None and s2r[prev] != s2r[stage]:
            recv.append(Message("act", mb, prev, stage, s2r[prev], s2r[stage]))
        if nxt is not None and s2r[nxt] != s2r[stage]:
            send.append(Message("act", mb, stage, nxt, s2r[stage], s2r[nxt]))
    elif kind in ("B", "I"):
        if nxt is not None and s2r[nxt] != s2r[stage]:
            recv.append(Message("grad", mb, nxt, stage, s2r[nxt], s2r[stage]))
        if prev is not None and s2r[prev] != s2r[stage]:
            send.append(Message("grad", mb, stage, prev, s2r[stage], s2r[prev]))
    return recv, send


def _attach_comm(progs: list[list[tuple]], s2r, paths) -> tuple[tuple[Action, ...], ...]:
    """Build the Actions with their messages, then plan receive posts: before an action, post the
    receives it needs *and* every earlier message on the same channel not yet posted (channels are
    FIFO, so a message sent earlier but used later is received early and kept)."""
    rows = []
    for r, prog in enumerate(progs):
        row = []
        for t in prog:
            if t[0] in ("FB", "FBn"):
                a = Action(r, "FB", t[1], t[2], t[3], t[4], overlapped=t[0] == "FB")
            else:
                a = Action(r, t[0], t[1], t[2])
            recvs, sends = [], []
            for k, st, mb in a.parts():
                rv, sd = _messages(s2r, paths, k, st, mb)
                recvs += rv
                sends += sd
            row.append(replace(a, recvs=tuple(recvs), sends=tuple(sends)))
        rows.append(row)
    channel: dict[tuple[int, int], list[Message]] = defaultdict(list)
    for row in rows:
        for a in row:
            for msg in a.sends:
                channel[(msg.src_rank, msg.dst_rank)].append(msg)
    index = {msg: i for ch in channel.values() for i, msg in enumerate(ch)}
    out = []
    for r, row in enumerate(rows):
        nposted: dict[int, int] = defaultdict(int)  # src rank -> messages posted so far
        new_row = []
        for a in row:
            posts = []
            for msg in a.recvs:
                ch = channel[(msg.src_rank, r)]
                upto = index[msg] + 1
                while nposted[msg.src_rank] < upto:
                    posts.append(ch[nposted[msg.src_rank]])
                    nposted[msg.src_rank] += 1
            new_row.append(replace(a, posts=tuple(posts)))
        out.append(tuple(new_row))
    return tuple(out)


def build_schedule(name: str, num_ranks: int, num_microbatches: int, *, check: bool = True) -> Schedule:
    """Build ``name`` ("1f1b" | "zb1p" | "dualpipe" | "dualpipev") for ``num_ranks`` pipeline ranks.

    Raises ``ValueError`` (stating the rule) for unsupported sizes, and — with ``check`` — runs
    :func:`validate` on the result.
    """
    name = name.lower()
    p, m = int(num_ranks), int(num_microbatches)
    check_sizes(name, p, m)
    if name in ("1f1b", "zb1p"):
        progs = _one_f_one_b(p, m, zero_bubble=name == "zb1p")
    elif name == "dualpipe":
        progs = _dualpipe(p, m)
    else:
        progs = _dualpipev(p, m)
    s2r, chunk, paths, dirs = _placement(name, p, m)
    sched = Schedule(name, p, m, len(s2r), s2r, chunk, paths, dirs, _attach_comm(progs, s2r, paths))
    if check:
        validate(sched)
    return sched


def custom_schedule(
    name: str, num_ranks: int, num_microbatches: int, programs, *, placement: str, check: bool = True
) -> Schedule:
    """A schedule from hand-written (or foreign) per-rank lists on one of our placements.

    ``programs[r]`` holds tuples ``(kind, stage, microbatch)`` for F/B/I/W and
    ``("FB", f_stage, f_mb, b_stage, b_mb)`` (``"FBn"``: the same pair, not overlapped). ``placement``
    names the stage layout to use ("1f1b" and "zb1p": one stage per rank; "dualpipe"; "dualpipev").
    Messages and receive posts are derived as for the built-in schedules, then :func:`validate` runs.
    """
    placement = placement.lower()
    if placement not in SCHEDULES:
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(SCHEDULES)}")
    p, m = int(num_ranks), int(num_microbatches)
    if len(programs) != p:
        raise ValueError(f"{len(programs)} programs for {p} ranks")
    s2r, chunk, paths, dirs = _placement(placement, p, m)
    for r, prog in enumerate(programs):
        for t in prog:
            if t[0] not in KINDS + ("FBn",) or len(t) != (5 if t[0] in ("FB", "FBn") else 3):
                raise ValueError(f"rank {r}: bad action tuple {t!r}")
            for st in (t[1], t[3]) if len(t) == 5 else (t[1],):
                if not 0 <= st < len(s2r):
                    raise ValueError(f"rank {r}: action {t!r} names stage {st}, the placement has {len(s2r)}")
            for mb in (t[2], t[4]) if len(t) == 5 else (t[2],):
                if not 0 <= mb < m:
                    raise ValueError(f"rank {r}: action {t!r} names micro-batch {mb} of {m}")
    actions = _attach_comm([list(x) for x in programs], s2r, paths)
    sched = Schedule(name, p, m, len(s2r), s2r, chunk, paths, dirs, actions)
    if check:
        validate(sched)
    return sched


# ------------------------------------------------------------------------------------------------
# validation


class ScheduleError(ValueError):
    """A schedule that cannot run: missing/duplicate work, unsatisfiable dependency or deadlock."""


def _local_deps(sched: Schedule, kind: str, stage: int, mb: int) -> list[tuple[str, int, int]]:
    """Same-rank prerequisites of one elementary computation, as (kind, stage, mb) keys; 'BI' means
    the B or I of that stage/micro-batch."""
    prev, nxt = sched.neighbours(mb, stage)
    r = sched.stage_to_rank[stage]
    deps = []
    if kind == "F" and prev is not None and sched.stage_to_rank[prev] == r:
        deps.append(("F", prev, mb))
    if kind in ("B", "I"):
        deps.append(("F", stage, mb))
        if nxt is not None and sched.stage_to_rank[nxt] == r:
            deps.append(("BI", nxt, mb))
    if kind == "W":
        deps.append(("I", stage, mb))
    return deps


def validate(sched: Schedule, *, blocking: bool = True) -> None:
    """Check a schedule thoroughly; raise :class:`ScheduleError` (a ``ValueError``) saying what is wrong.

    1. placement: every action runs on the rank of its stage, on a stage of its micro-batch's path;
    2. completeness: every (stage, micro-batch) on a path has exactly one F and exactly one backward —
       one B (alone or in an FB) or one I followed later by one W on the same rank;
    3. dependencies: same-rank ones (F of the previous stage on this rank, F before its backward,
       backward of the next stage before this one, I before W) come earlier in the rank's list;
    4. no deadlock and FIFO-consistent channels under the blocking batch model of the module doc
       (``blocking=False``: sends are buffered and never wait for their receiver — only the
       cross-rank dependencies must be satisfiable).
    """
    p = sched.num_ranks
    if len(sched.actions) != p:
        raise ScheduleError(f"{sched.name}: {len(sched.actions)} action lists for {p} ranks")
    seen: dict[tuple[str, int, int], tuple[int, int]] = {}  # key -> (rank, position)
    for r, row in enumerate(sched.actions):
        for pos, a in enumerate(row):
            if a.kind not in KINDS:
                raise ScheduleError(f"rank {r} action {pos}: unknown kind {a.kind!r}")
            if a.rank != r:
                raise ScheduleError(f"rank {r} action {pos} ({a}) says rank {a.rank}")
            for k, s, mb in a.parts():
                if not 0 <= mb < sched.num_microbatches or s not in sched.paths[mb]:
                    raise ScheduleError(f"rank {r} action {a}: stage {s} is not on micro-batch {mb}'s path")
                if sched.stage_to_rank[s] != r:
                    raise ScheduleError(f"rank {r} action {a}: stage {s} lives on rank {sched.stage_to_rank[s]}")
                key = ("BI" if k in ("B", "I") else k, s, mb)
                if key in seen:
                    raise ScheduleError(f"rank {r}: {k}{mb} of stage {s} scheduled twice")
                seen[key] = (r, pos)
                if k == "I":
                    seen[("I", s, mb)] = (r, pos)
                for dk, ds, dm in _local_deps(sched, k, s, mb):
                    got = seen.get((dk, ds, dm))
                    if got is None or got[0] != r:
                        what = {"BI": "backward", "F": "forward", "I": "input-grad"}[dk]
                        raise ScheduleError(
                            f"rank {r} action {a} needs the {what} of micro-batch {dm} at stage {ds} "
                            "earlier on the same rank"
                        )
    kinds_b: dict[tuple[int, int], str] = {}
    for r, row in enumerate(sched.actions):
        for a in row:
            for k, s, mb in a.parts():
                if k in ("B", "I"):
                    kinds_b[(s, mb)] = k
    for mb, path in enumerate(sched.paths):
        for s in path:
            if ("F", s, mb) not in seen:
                raise ScheduleError(f"micro-batch {mb} has no forward at stage {s}")
            if ("BI", s, mb) not in seen:
                raise ScheduleError(f"forward of micro-batch {mb} at stage {s} has no backward")
            has_w = ("W", s, mb) in seen
            if kinds_b[(s, mb)] == "I" and not has_w:
                raise ScheduleError(f"I of micro-batch {mb} at stage {s} has no W")
            if kinds_b[(s, mb)] == "B" and has_w:
                raise ScheduleError(f"micro-batch {mb} at stage {s} has both a full B and a W")
    _check_channels(sched)
    run_batches(sched, buffered_sends=not blocking)


def _check_channels(sched: Schedule) -> None:
    """Each action carries exactly the messages its placement implies; every consumed message was
    posted (``posts``) no later than its consumer; per rank pair, receives are posted in send order."""
    sent: dict[tuple[int, int], list[Message]] = defaultdict(list)
    got: dict[tuple[int, int], list[Message]] = defaultdict(list)
    for r, row in enumerate(sched.actions):
        posted: set[Message] = set()
        for a in row:
            want_r, want_s = [], []
            for k, st, mb in a.parts():
                rv, sd = _messages(sched.stage_to_rank, sched.paths, k, st, mb)
                want_r += rv
                want_s += sd
            if set(want_r) != set(a.recvs) or set(want_s) != set(a.sends):
                raise ScheduleError(f"rank {r} action {a}: messages do not match the placement")
            for msg in a.posts:
                if msg.dst_rank != r or msg in posted:
                    raise ScheduleError(f"rank {r} action {a}: bad or repeated receive post {msg}")
                posted.add(msg)
                got[(msg.src_rank, r)].append(msg)
            for msg in a.recvs:
                if msg not in posted:
                    raise ScheduleError(f"rank {r} action {a} consumes {msg} before posting its receive")
            for msg in a.sends:
                sent[(r, msg.dst_rank)].append(msg)
    for ch in set(sent) | set(got):
        s, g = sent.get(ch, []), got.get(ch, [])
        if sorted(map(str, s)) != sorted(map(str, g)):
            raise ScheduleError(f"channel rank {ch[0]}->{ch[1]}: sends and receives differ")
        for i, (x, y) in enumerate(zip(s, g)):
            if x != y:
                raise ScheduleError(
                    f"channel rank {ch[0]}->{ch[1]}: message #{i} is sent as {x} but received as {y} "
                    "(FIFO order differs)"
                )


def run_batches(
    sched: Schedule, cost=None, comm: float = 0.0, *, buffered_sends: bool = False
) -> list[list[tuple[float, float]]]:
    """Execute the blocking batch model of the module docstring; return per-rank (start, end) times.

    Before action k a rank posts one batch (sends of action k−1, receives ``posts`` of action k) at
    the time action k−1 ended, and waits until every operation is matched: a pair matches once both
    sides are posted and completes ``comm`` later. ``cost(action)`` gives compute times (0 by
    default: a pure deadlock check). ``buffered_sends``: a send completes as soon as it is posted.
    Raises :class:`ScheduleError` naming what each stuck rank waits on.
    """
    p = sched.num_ranks
    rows = sched.actions
    cost = cost or (lambda a: 0.0)
    k = [0] * p
    posted: dict[tuple[str, Message], float] = {}
    batch: list[list[tuple[str, Message]]] = [[] for _ in range(p)]
    post_time = [0.0] * p
    done = [False] * p
    times: list[list[tuple[float, float]]] = [[] for _ in range(p)]

    def post(r: int) -> None:
        ops = [("send", msg) for msg in rows[r][k[r] - 1].sends] if k[r] > 0 else []
        if k[r] < len(rows[r]):
            ops += [("recv", msg) for msg in rows[r][k[r]].posts]
        for op in ops:
            posted[op] = post_time[r]
        batch[r] = [op for op in ops if op[0] == "recv"] if buffered_sends else ops

    def partner(op):
        return ("recv" if op[0] == "send" else "send", op[1])

    for r in range(p):
        post(r)
    progress = True
    while progress:
        progress = False
        for r in range(p):
            while not done[r] and all(partner(op) in posted for op in batch[r]):
                progress = True
                t = post_time[r]
                for op in batch[r]:
                    t = max(t, max(post_time[r], posted[partner(op)]) + comm)
                if k[r] == len(rows[r]):
                    done[r] = True
                    break
                end = t + cost(rows[r][k[r]])
                times[r].append((t, end))
                k[r] += 1
                post_time[r] = end
                post(r)
    if not all(done):
        stuck = []
        for r in range(p):
            if not done[r]:
                waits = [f"{op} {msg}" for op, msg in batch[r] if partner((op, msg)) not in posted]
                nxt = str(rows[r][k[r]]) if k[r] < len(rows[r]) else "its final sends"
                stuck.append(f"rank {r} before {nxt} waits on {', '.join(waits)}")
        raise ScheduleError(f"{sched.name}: deadlock under blocking send/recv: " + "; ".join(stuck))
    return times
