"""Execute a pipeline :class:`~.schedule.Schedule` on ``torch.distributed`` (SPEC §2.1).

The executor is model-agnostic: it runs a rank's action list over the :class:`PipelineStage` objects
of that rank (see :mod:`.stages` for the dsv3 ones) and moves activations and gradients between
ranks with point-to-point ``batch_isend_irecv`` (gloo on CPU, NCCL on GPU).

Communication — exactly the model :func:`.schedule.validate` proved deadlock-free: before action
``k`` a rank posts *one batch* holding the sends produced by action ``k−1`` and the receives listed in
action ``k``'s ``posts`` (in that order, so each link stays FIFO), and waits for all of it; after the
last action it posts a final batch of its remaining sends. Every message also carries a tag derived
from (micro-batch, source stage, kind), so gloo matches it unambiguously. A hand-off between two stages
of the same rank (the tip of DualPipeV's V) stays local. DualPipe's F&B pairs are one unit: one batch
before, one after; ``overlapped=False`` pairs (the middle ranks' first F and B) run back to back.

Backward work:

* ``B`` — a full backward: ``torch.autograd.backward`` from the stage's roots (its output with the
  received gradient, plus its own loss term scaled by ``loss_scale``), filling the input's gradient
  (sent upstream) and accumulating the parameters' ``.grad``.
* ``I`` then ``W`` — ZeroBubble's split (:class:`_SplitBackward`). ``I`` differentiates only towards
  the stage input; it records the gradient reaching every *boundary node* (a graph node on a path to
  the input that also feeds a parameter through nodes off that path). ``W`` later restarts autograd at
  those nodes towards the parameters only, so each weight GEMM runs once, in ``W``, and nothing of
  ``I`` is recomputed. The gradients are those of a full backward: the same nodes run on the same
  incoming gradients (boundary nodes whose parameters overlap are grouped into one call, and a node
  reached from another of its group gets its recorded gradient back through a pre-hook, so nothing
  is counted twice). A stage without an input gradient (the first one) does all its work in ``W``.
* ``FB`` — ``fwd_stage.overlapped_forward_backward(...)``, a hook a stage type may override (on GPU:
  overlap one micro-batch's MoE dispatch/combine with the other's compute on separate CUDA streams,
  SPEC §2.1); the default runs the forward, then the backward.

Failures: a peer that dies or stalls makes the waiting rank raise :class:`PipelineError` naming the
action and the messages it waited on — with gloo as soon as the peer's connections close, otherwise
after ``timeout`` (or the process group's timeout). No rank hangs forever. (With NCCL, ``wait`` does
not block the host; a dead peer surfaces through NCCL's watchdog after the process group's timeout.)

``PipelineRuntime.run(data, train=False)`` runs forwards only under ``torch.no_grad`` (evaluation),
in micro-batch order along each path, with the same batching rule (checked deadlock-free).
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch.autograd.graph import GradientEdge

from .schedule import Action, Message, Schedule, ScheduleError, _attach_comm, run_batches


class PipelineError(RuntimeError):
    """A pipeline rank could not complete a step (a peer died, stalled, or a stage failed)."""


# ------------------------------------------------------------------------------------------------
# stages


class PipelineStage:
    """One stage of the pipeline living on this rank; subclasses implement :meth:`compute`.

    ``compute(mb, x, data)`` runs the stage's layers on the received activation ``x`` (``None`` for
    the first stage of a path, which reads its input from ``data``) and returns
    ``(output, loss, info)``: the activation for the next stage (``None`` on the last stage), the
    stage's own term of the micro-batch objective (``None`` if it has none; e.g. the last stage's
    cross-entropy, or an auxiliary balance loss of any stage) and a dict of detached metrics.
    The base class keeps what the backward needs per micro-batch and implements B, I, W and F&B.
    """

    def __init__(self):
        self.loss_scale = 1.0  # gradient of the objective w.r.t. each stage loss (1/M); set by the runtime
        self._pending: dict = {}  # micro-batch -> what its backward (or W) still needs

    def compute(self, mb: int, x, data):
        raise NotImplementedError

    def forward(self, mb: int, x, data):
        """Run the stage; returns (detached output or None, loss or None, info)."""
        if x is not None and torch.is_grad_enabled() and x.is_floating_point():
            x = x.detach().requires_grad_()
        out, loss, info = self.compute(mb, x, data)
        if torch.is_grad_enabled():
            roots, grads = [], []
            if loss is not None and loss.requires_grad:
                roots.append(loss)
                grads.append(torch.full_like(loss, self.loss_scale))
            self._pending[mb] = _Saved(x, out, roots, grads)
        return (out.detach() if out is not None else None), loss, info

    def _roots(self, mb: int, grad):
        st = self._pending[mb]
        roots, grads = list(st.roots), list(st.grads)
        if st.out is not None:
            if grad is None:
                raise PipelineError(f"stage {self}: backward of micro-batch {mb} got no output gradient")
            roots.insert(0, st.out)
            grads.insert(0, grad)
        return st, roots, grads

    def backward(self, mb: int, grad):
        """Full backward (B); returns the input gradient (None for a stage without one)."""
        st, roots, grads = self._roots(mb, grad)
        want_dx = st.x is not None and st.x.requires_grad
        if roots:
            torch.autograd.backward(roots, grads)
        del self._pending[mb]
        if not want_dx:
            return None
        return st.x.grad if st.x.grad is not None else torch.zeros_like(st.x)

    def backward_input(self, mb: int, grad):
        """Input-gradient half (I); the weight half waits for :meth:`backward_weight`."""
        st, roots, grads = self._roots(mb, grad)
        x = st.x if st.x is not None and st.x.requires_grad else None
        split = _SplitBackward(roots, grads, x)
        self._pending[mb] = _Saved(None, None, [], [], split)
        return split.dx

    def backward_weight(self, mb: int) -> None:
        """Weight-gradient half (W) of an earlier :meth:`backward_input`."""
        st = self._pending.pop(mb)
        if st.split is None:
            raise PipelineError(f"stage {self}: W of micro-batch {mb} without its I")
        st.split.weights()

    def overlapped_forward_backward(self, f_mb: int, x, data, b_stage: "PipelineStage", b_mb: int, grad):
        """Forward of (self, ``f_mb``) together with the full backward of (``b_stage``, ``b_mb``).

        Hook for DualPipe's F&B pairs. The default runs one after the other (exactly the same
        numbers as separate F and B). A stage type whose layers communicate (MoE all-to-all) may
        override it to interleave the two chunks' pieces on separate CUDA streams.
        Returns (forward output, forward loss, forward info, backward input gradient).
        """
        out, loss, info = self.forward(f_mb, x, data)
        dx = b_stage.backward(b_mb, grad)
        return out, loss, info, dx

    def drop_pending(self) -> None:
        self._pending.clear()


@dataclass
class _Saved:
    x: object
    out: object
    roots: list
    grads: list
    split: object = None


def _node_of(t: torch.Tensor):
    """The autograd node producing ``t`` (its AccumulateGrad node for a leaf)."""
    if t.grad_fn is not None:
        return t.grad_fn
    return t.view_as(t).grad_fn.next_functions[0][0]


class _SplitBackward:
    """Backward of one stage/micro-batch in two halves: ``dx`` now (I), :meth:`weights` later (W)."""

    def __init__(self, roots, grads, x):
        self.dx = torch.zeros_like(x) if x is not None else None
        self.groups = []
        if not roots:
            return
        x_node = _node_of(x) if x is not None else None
        root_nodes = [_node_of(r) for r in roots]
        children, order = _graph(root_nodes)
        reach_x: dict = {}
        reach_p: dict = {}
        for n in order:  # children before parents
            kids = children[n]
            reach_x[n] = n is x_node or any(reach_x[c] for c in kids)
            is_param = n is not x_node and not kids and hasattr(n, "variable")
            reach_p[n] = is_param or any(reach_p[c] for c in kids)
        # starts of the weight pass: boundary nodes (on the input path, feeding parameters off it)
        # and roots off the input path; each with the parameters it reaches off the path
        starts: list = []  # (node, edges: list[(output_nr, grad)] or None until I records them)
        for r, g, n in zip(roots, grads, root_nodes):
            if not reach_x[n] and reach_p[n]:
                starts.append([n, [(_output_nr(r), g)], False])
        boundary = [n for n in order if reach_x[n] and any(not reach_x[c] and reach_p[c] for c in children[n])]
        starts += [[n, None, True] for n in boundary]
        # group starts that reach a common parameter (union-find over starts and parameter nodes)
        parent: dict = {}

        def find(a):
            parent.setdefault(a, a)
            while parent[a] is not a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        params_of = []
        for n, _, on_path in starts:
            ps = _params_below(n, children, reach_x, reach_p, x_node, skip_path=on_path)
            params_of.append(ps)
            root = find(n)
            for p in ps:
                rp = find(p)
                if rp is not root:
                    parent[rp] = root
        # I: gradient towards the input, recording what reaches each boundary node
        handles = []
        for s in starts:
            if s[2]:
                handles.append(s[0].register_prehook(_recorder(s)))
        try:
            path_roots = [(r, g) for r, g, n in zip(roots, grads, root_nodes) if reach_x[n]]
            if x is not None and path_roots:
                (dx,) = torch.autograd.grad([r for r, _ in path_roots], [x], [g for _, g in path_roots],
                                            retain_graph=True, allow_unused=True)
                self.dx = dx if dx is not None else self.dx
        finally:
            for h in handles:
                h.remove()
        by_group: dict = defaultdict(lambda: ([], set()))
        for (n, edges, on_path), ps in zip(starts, params_of):
            if not edges:
                continue
            members, params = by_group[find(n)]
            members.append((n, edges, on_path))
            params.update(ps)
        self.groups = [(members, sorted(params, key=id)) for members, params in by_group.values() if params]

    def weights(self) -> None:
        for members, params in self.groups:
            outs = [GradientEdge(n, i) for n, edges, _ in members for i, _ in edges]
            gos = [g for _, edges, _ in members for _, g in edges]
            handles = []
            if len(members) > 1:  # a start reached from another start keeps its recorded gradient
                for n, edges, on_path in members:
                    if on_path:
                        handles.append(n.register_prehook(_clamp(n, edges)))
            try:
                dws = torch.autograd.grad(outs, [GradientEdge(p, 0) for p in params], gos,
                                          retain_graph=True, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
            for p, g in zip(params, dws):
                if g is None:
                    continue
                var = p.variable
                if var.grad is None:
                    var.grad = g
                else:
                    var.grad += g
        self.groups = []


def _output_nr(t: torch.Tensor) -> int:
    return t.output_nr if t.grad_fn is not None else 0


def _recorder(start):
    def hook(grad_outputs):
        start[1] = [(i, g) for i, g in enumerate(grad_outputs) if g is not None]
        return None

    return hook


def _clamp(node, edges):
    def hook(grad_outputs):
        saved = [None] * len(grad_outputs)
        for i, g in edges:
            saved[i] = g
        return tuple(saved)

    return hook


def _graph(root_nodes):
    """Children lists and a children-first order of every node reachable from ``root_nodes``."""
    children: dict = {}
    order: list = []
    for root in root_nodes:
        if root is None or root in children:
            continue
        stack = [(root, False)]
        while stack:
            n, done = stack.pop()
            if done:
                order.append(n)
                continue
            if n in children:
                continue
            kids = [c for c, _ in n.next_functions if c is not None]
            children[n] = kids
            stack.append((n, True))
            stack.extend((c, False) for c in kids if c not in children)
    return children, order


def _params_below(start, children, reach_x, reach_p, x_node, skip_path: bool):
    """Parameter (AccumulateGrad) nodes reachable from ``start`` without entering the input path."""
    found, seen = [], set()
    stack = [c for c in children[start] if not reach_x[c] and reach_p[c]] if skip_path else [start]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if not children[n] and n is not x_node and hasattr(n, "variable"):
            found.append(n)
        stack.extend(c for c in children[n] if not reach_x[c] and reach_p[c])
    return found


# ------------------------------------------------------------------------------------------------
# the executor


@dataclass
class RunResult:
    """What one :meth:`PipelineRuntime.run` produced on this rank."""

    losses: dict = field(default_factory=dict)  # mb -> sum of this rank's stage losses (detached, unscaled)
    info: dict = field(default_factory=dict)  # (stage, mb) -> the info dict of that forward


class PipelineRuntime:
    """Run ``schedule``'s actions for pipeline rank ``rank`` over this rank's ``stages``.

    ``stages``: {stage index: PipelineStage} for ``schedule.stages_of(rank)``. ``ranks``: the global
    rank of every pipeline rank (default ``range(num_ranks)``); ``group``: the process group they
    share (default WORLD). ``recv_meta(kind, mb, data)`` gives (shape, dtype) of an incoming tensor.
    """

    def __init__(self, schedule: Schedule, rank: int, stages: dict, recv_meta, *, ranks=None, group=None,
                 device=None, timeout: float | None = None):
        missing = set(schedule.stages_of(rank)) ^ set(stages)
        if missing:
            raise ValueError(f"rank {rank} of {schedule.name} holds stages {schedule.stages_of(rank)}, "
                             f"got {sorted(stages)}")
        self.schedule, self.rank, self.stages, self.recv_meta = schedule, rank, stages, recv_meta
        self.ranks = list(ranks) if ranks is not None else list(range(schedule.num_ranks))
        self.group = group
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.timeout = datetime.timedelta(seconds=timeout) if timeout else None
        self._eval_actions = None

    # -- public
    def run(self, data: list, *, train: bool = True, loss_scale: float | None = None) -> RunResult:
        """One pass over all micro-batches: ``data[mb]`` is handed to the stages' ``compute``.

        ``train``: the schedule's forwards and backwards (gradients accumulate into ``.grad``, each
        stage loss weighted by ``loss_scale``, default 1/M); otherwise forwards only, no grad.
        """
        if len(data) != self.schedule.num_microbatches:
            raise ValueError(f"{len(data)} micro-batches given, the schedule has {self.schedule.num_microbatches}")
        scale = 1.0 / len(data) if loss_scale is None else loss_scale
        for st in self.stages.values():
            st.loss_scale = scale
        self._recv, self._local, self._outbox = {}, {}, {}
        self._result = RunResult()
        self._data = data
        try:
            if train:
                self._loop(self.schedule.actions[self.rank])
            else:
                with torch.no_grad():
                    self._loop(self._forward_only())
        except BaseException:
            for st in self.stages.values():
                st.drop_pending()
            raise
        leftover = [k for k in (*self._recv, *self._local, *self._outbox)]
        if leftover:
            raise PipelineError(f"pipeline rank {self.rank}: messages left unused after the step: {leftover}")
        return self._result

    # -- the loop
    def _loop(self, actions) -> None:
        sends: list = []
        for a in actions:
            self._exchange(sends, a.posts, a)
            try:
                sends = self._execute(a)
            except PipelineError:
                raise
            except Exception as e:
                raise PipelineError(f"pipeline rank {self.rank} (global {self.ranks[self.rank]}): "
                                    f"{self.schedule.name} action {a} failed: {e}") from e
        self._exchange(sends, (), None)

    def _exchange(self, sends, posts, before: Action | None) -> None:
        ops = []
        for msg, t in sends:
            ops.append(dist.P2POp(dist.isend, t.contiguous(), self.ranks[msg.dst_rank], self.group, _tag(self.schedule, msg)))
        for msg in posts:
            shape, dtype = self.recv_meta(msg.kind, msg.microbatch, self._data[msg.microbatch])
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self._recv[(msg.kind, msg.microbatch, msg.dst_stage)] = buf
            ops.append(dist.P2POp(dist.irecv, buf, self.ranks[msg.src_rank], self.group, _tag(self.schedule, msg)))
        if not ops:
            return
        try:
            works = dist.batch_isend_irecv(ops)
            for w in works:
                if self.timeout is not None:
                    w.wait(self.timeout)
                else:
                    w.wait()
        except Exception as e:
            where = f"before {before}" if before is not None else "posting its final sends"
            msgs = ", ".join([f"send {m}" for m, _ in sends] + [f"recv {m}" for m in posts])
            raise PipelineError(
                f"pipeline rank {self.rank} (global rank {self.ranks[self.rank]}) of {self.schedule.name}: "
                f"communication {where} failed or timed out ({msgs}); a peer rank probably died or "
                f"stalled: {type(e).__name__}: {e}") from e

    def _execute(self, a: Action) -> list:
        if a.kind == "F":
            self._forward(a.stage, a.microbatch)
        elif a.kind in ("B", "I"):
            st = self.stages[a.stage]
            g = self._take("grad", a.stage, a.microbatch)
            dx = st.backward(a.microbatch, g) if a.kind == "B" else st.backward_input(a.microbatch, g)
            self._emit("grad", a.stage, a.microbatch, dx)
        elif a.kind == "W":
            self.stages[a.stage].backward_weight(a.microbatch)
        else:  # FB
            fs, fm, bs, bm = a.stage, a.microbatch, a.b_stage, a.b_microbatch
            x = self._take("act", fs, fm)
            g = self._take("grad", bs, bm)
            if a.overlapped:
                out, loss, info, dx = self.stages[fs].overlapped_forward_backward(
                    fm, x, self._data[fm], self.stages[bs], bm, g)
            else:
                out, loss, info = self.stages[fs].forward(fm, x, self._data[fm])
                dx = self.stages[bs].backward(bm, g)
            self._record(fs, fm, out, loss, info)
            self._emit("grad", bs, bm, dx)
        out = []
        for msg in a.sends:
            out.append((msg, self._outbox.pop((msg.kind, msg.microbatch, msg.src_stage))))
        return out

    def _forward(self, s: int, mb: int) -> None:
        x = self._take("act", s, mb)
        out, loss, info = self.stages[s].forward(mb, x, self._data[mb])
        self._record(s, mb, out, loss, info)

    def _record(self, s, mb, out, loss, info) -> None:
        res = self._result
        if loss is not None:
            loss = loss.detach()
            res.losses[mb] = loss if mb not in res.losses else res.losses[mb] + loss
        res.info[(s, mb)] = info
        _, nxt = self.schedule.neighbours(mb, s)
        if nxt is None:
            return
        if out is None:
            raise PipelineError(f"stage {s} returned no output for micro-batch {mb}, but stage {nxt} follows")
        self._emit("act", s, mb, out)

    def _take(self, kind: str, s: int, mb: int):
        """The activation entering (``act``) or the gradient leaving (``grad``) stage ``s``."""
        prev, nxt = self.schedule.neighbours(mb, s)
        src = prev if kind == "act" else nxt
        if src is None:
            return None
        key = (kind, mb, s)
        if self.schedule.stage_to_rank[src] == self.rank:
            return self._local.pop(key)
        if key not in self._recv:
            raise PipelineError(f"pipeline rank {self.rank}: {kind} of micro-batch {mb} for stage {s} never received")
        return self._recv.pop(key)

    def _emit(self, kind: str, s: int, mb: int, t) -> None:
        prev, nxt = self.schedule.neighbours(mb, s)
        dst = nxt if kind == "act" else prev
        if dst is None:
            return
        if t is None:
            raise PipelineError(f"stage {s} produced no {kind} for micro-batch {mb}, stage {dst} needs it")
        if self.schedule.stage_to_rank[dst] == self.rank:
            self._local[(kind, mb, dst)] = t
        else:
            self._outbox[(kind, mb, s)] = t

    def _forward_only(self):
        if self._eval_actions is None:
            self._eval_actions = forward_only_schedule(self.schedule).actions[self.rank]
        return self._eval_actions


def _tag(sched: Schedule, msg: Message) -> int:
    return (msg.microbatch * sched.num_stages + msg.src_stage) * 2 + (msg.kind == "grad")


def forward_only_schedule(sched: Schedule) -> Schedule:
    """Forwards only, each rank in (micro-batch, position on the path) order; checked deadlock-free
    under the same blocking batch model as the training schedules."""
    progs = [[] for _ in range(sched.num_ranks)]
    for mb, path in enumerate(sched.paths):
        for s in path:
            progs[sched.stage_to_rank[s]].append(("F", s, mb))
    out = replace(sched, name=sched.name + "-forward", actions=_attach_comm(progs, sched.stage_to_rank, sched.paths))
    try:
        run_batches(out)
    except ScheduleError as e:  # pragma: no cover - a placement this order cannot serve
        raise PipelineError(f"no deadlock-free forward-only order for {sched.name}: {e}") from e
    return out
