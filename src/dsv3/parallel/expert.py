"""Expert parallelism: dispatch / combine over an expert-parallel group (SPEC §2.2, §3).

The routed experts are spread over the R ranks of an expert-parallel (EP) group, S = P/R physical
experts per rank (P = logical experts + redundant replicas). One MoE step, per rank:

    gate → logical top-k [N, k]  →  physical top-k (a replica per (token, expert))
    layout          tokens per rank / node / expert, which ranks and nodes each token visits
    plan            the hops: row indices to send and split sizes; one count exchange over the EP
                    group per layer and step (asynchronous: it overlaps packing / quantising the rows
                    and the shared expert), reused by combine and both backward passes
    dispatch        rows → ranks holding their experts (one copy per (token, rank)); top-k ids, gate
                    values and payload travel packed in one byte row, one all-to-all per hop
    local experts   (row, slot) pairs sorted by local expert, one grouped GEMM, × gate value,
                    summed per received row
    combine         the reverse path, summing partial outputs back into token order

Paths:
- flat: one ``all_to_all_single`` over the EP group, one copy per (token, target rank).
- two-hop (report §3.2.2): hop 1 over the inter-node group sends one copy per (token, target node)
  to the rank with the same in-node index there; hop 2 over the intra-node group forwards it to
  the ranks of that node holding its experts (read from per-node visit bits the origin packs into
  the row, so the forwarder only gathers rows between the two hops). Combine runs hop 2 back (the forwarding rank sums
  its node's partial outputs) and then hop 1 back, so every (token, node) pair crosses nodes once
  each way.

Node-limited routing: with experts placed rank-major, gate group g lives on node
g // (n_group / nodes) when ``n_group`` is a multiple of the number of nodes, so a token visits at
most ``topk_group`` nodes.

Autograd: ``_Dispatch`` and ``_Combine`` are custom Functions whose backward passes are each other
(dispatch's backward combines the gradients of the copies, combine's backward dispatches the
output gradient along the same plan). Optional FP8 dispatch quantises each token once at its
origin (E4M3, 1×128 scales) and forwards bytes; gradients travel in the activation dtype.

Counters (:class:`CommCounters`) record rows and bytes each rank sends, split into ``inter``
(another node), ``intra`` (same node, another rank) and ``self``, for the payload and the metadata
(top-k ids, gate values), forward and backward.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..model.layers import MLP
from ..model.moe import Gate, GroupedExperts, MoE, Routing
from .mesh import EPComm
from .overlap import communicating, current_lane, lane_group

try:  # the FP8 quantiser (dsv3.fp8); FP8 dispatch is unavailable without it
    from ..fp8.quant import BLOCK as FP8_BLOCK
    from ..fp8.quant import FP8_DTYPE, dequantize_activation, quantize_activation
except ImportError:  # pragma: no cover
    quantize_activation = dequantize_activation = FP8_DTYPE = FP8_BLOCK = None


# ----------------------------------------------------------------------------------------- layout
class DispatchLayout:
    """Where the tokens of one rank go (the analogue of DeepEP's ``get_dispatch_layout``).

    Built from one [N, R] mask; the other views are computed on first use (the flat path needs
    only the mask and the per-rank counts)."""

    def __init__(self, is_token_in_rank: torch.Tensor, ranks_per_node: int, topk_idx: torch.Tensor,
                 num_experts: int):
        self.is_token_in_rank = is_token_in_rank          # [N, R] bool
        self.ranks_per_node = ranks_per_node
        self._topk_idx, self._num_experts = topk_idx, num_experts

    @cached_property
    def num_tokens_per_rank(self) -> torch.Tensor:         # [R] tokens with at least one expert on rank r
        return self.is_token_in_rank.sum(0)

    @cached_property
    def is_token_in_node(self) -> torch.Tensor:            # [N, nodes] bool
        n, r = self.is_token_in_rank.shape
        return self.is_token_in_rank.reshape(n, r // self.ranks_per_node, self.ranks_per_node).any(-1)

    @cached_property
    def num_tokens_per_node(self) -> torch.Tensor:         # [nodes] tokens with at least one expert on node n
        return self.is_token_in_node.sum(0)

    @cached_property
    def num_tokens_per_expert(self) -> torch.Tensor:       # [P] (token, slot) pairs per physical expert
        ids = (self._topk_idx.long() + 1).flatten()        # -1 (no expert) → bin 0, dropped
        return torch.bincount(ids, minlength=self._num_experts + 1)[1:]

    @property
    def nodes_per_token(self) -> torch.Tensor:
        return self.is_token_in_node.sum(1)

    @property
    def ranks_per_token(self) -> torch.Tensor:
        return self.is_token_in_rank.sum(1)


def _visit_mask(ids: torch.Tensor, width: int) -> torch.Tensor:
    """ids [N, k] in [0, width], ``width`` meaning none → bool [N, width], True where row n holds
    id j. One scatter; the "none" ids land in a spare column that is dropped."""
    mask = torch.zeros(ids.shape[0], width + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids.long(), True)[:, :width]


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
                        ranks_per_node: int = 1) -> DispatchLayout:
    """Layout of physical top-k ids [N, k] (-1 = no expert) for experts placed rank-major,
    ``num_experts / num_ranks`` per rank, ``ranks_per_node`` ranks per node."""
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be [N, k], got shape {tuple(topk_idx.shape)}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_ranks ({num_ranks})")
    if num_ranks % ranks_per_node:
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must divide num_ranks ({num_ranks})")
    rank_of = torch.where(topk_idx >= 0, topk_idx // (num_experts // num_ranks), num_ranks)
    return DispatchLayout(_visit_mask(rank_of, num_ranks), ranks_per_node, topk_idx, num_experts)


# ----------------------------------------------------------------------------------------- counters
class CommCounters:
    """Rows and bytes this rank sends, keyed ``"{phase}.{scope}.{tokens|bytes}"``.

    phase: dispatch, combine (payload, forward), dispatch_meta (top-k ids + gate values),
    combine_meta (gate-value gradients), bwd_dispatch / bwd_combine (gradients, backward);
    scope: inter (to another node), intra (another rank of this node), self.
    ``node_visits[j]``: tokens that visited j nodes (forward).
    """

    def __init__(self):
        self.data: dict[str, int] = defaultdict(int)
        self.node_visits: list[int] = []

    def record(self, phase: str, hop: "Hop", splits: list[int], row_bytes: int) -> None:
        for peer, (rows, remote) in enumerate(zip(splits, hop.remote)):
            if rows:
                scope = "self" if peer == hop.me else ("inter" if remote else "intra")
                self.data[f"{phase}.{scope}.tokens"] += rows
                self.data[f"{phase}.{scope}.bytes"] += rows * row_bytes

    def add_visits(self, nodes_per_token: torch.Tensor, num_nodes: int) -> None:
        h = torch.bincount(nodes_per_token, minlength=num_nodes + 1).tolist()
        self.node_visits = [a + b for a, b in zip(h, self.node_visits + [0] * (len(h) - len(self.node_visits)))]

    def get(self, key: str) -> int:
        return self.data.get(key, 0)

    def as_dict(self) -> dict:
        return {**dict(sorted(self.data.items())), "node_visits": list(self.node_visits)}

    def reset(self) -> None:
        self.data.clear()
        self.node_visits = []


# ----------------------------------------------------------------------------------------- hops
@dataclass
class Hop:
    """One all-to-all: rows ``index`` of the hop's input, grouped by destination peer."""
    kind: str                   # "flat" (EP group), "inter" (same in-node index), "intra" (one node)
    index: torch.Tensor         # [n_send] rows of the input, destination-major
    send_splits: list[int]      # rows to each peer of the group
    recv_splits: list[int] | None   # rows from each peer (None until the plan's count exchange is in)
    n_in: int                   # rows of the hop's input
    me: int                     # this rank's index in the group
    ranks_per_node: int         # of the EP group: which peers of a flat hop are on another node
    group: object = field(default=None, repr=False)
    # padded blocks (a dispatch with learnt capacities): ``index`` with padding rows read from row 0,
    # and this with them summed into row n_in, which combine drops
    sum_index: torch.Tensor | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.send_splits)

    @property
    def n_out(self) -> int:
        return sum(self.recv_splits)

    @property
    def remote(self) -> list[bool]:
        """Peer j on another node."""
        if self.kind == "flat":
            g = self.ranks_per_node
            return [j // g != self.me // g for j in range(self.size)]
        return [self.kind == "inter" and j != self.me for j in range(self.size)]


class DispatchPlan:
    """The hops of one MoE layer's dispatch, shared by dispatch, combine and both backward passes.

    :func:`plan_dispatch` computes the layout and the first hop and starts the layer's only count
    exchange (asynchronous, over the EP group; it completes while the payload is being packed).
    On the two-hop path the second hop's rows depend on the rows that arrive with hop 1 (their
    per-node visit bits, ``node_bits``), so the forward dispatch builds it; its receive counts come
    from the same count exchange. After the forward dispatch, ``recv_topk`` holds the physical top-k
    ids (int32) of the rows this rank received.
    """

    def __init__(self, layout: DispatchLayout, hops: list[Hop], topk_idx: torch.Tensor, comm: EPComm,
                 experts_per_rank: int, two_hop: bool, counts: torch.Tensor, work):
        self.layout, self.hops, self.num_tokens = layout, hops, topk_idx.shape[0]
        self.topk_idx = topk_idx            # int32 [N, k]: travels with the payload
        self.comm, self.experts_per_rank, self.two_hop = comm, experts_per_rank, two_hop
        self.recv_topk: torch.Tensor | None = None
        self._counts, self._work = counts, work
        self._hop2_recv: list[int] | None = None
        self.node_bits: torch.Tensor | None = None   # two-hop: int32 [N, nodes], bit l = visits in-node rank l
        self.capacity: DispatchCapacity | None = None  # flat: learns from this plan's forward dispatch

    def wait(self) -> None:
        """Finish the count exchange: receive splits of hop 1 (and hop 2's, for later)."""
        if self._counts is None:
            return
        if self._work is not None:
            self._work.wait()
        c, comm = self._counts, self.comm
        self._counts = self._work = None
        if not self.two_hop:
            self.hops[0].recv_splits = c.tolist()
        else:
            g = comm.ranks_per_node
            self.hops[0].recv_splits = c[comm.local::g, 1].tolist()     # from (node n, my in-node index)
            self._hop2_recv = c[:, 0].view(comm.num_nodes, g).sum(0).tolist()   # forwarded by in-node rank l

    @property
    def complete(self) -> bool:
        return len(self.hops) == (2 if self.two_hop else 1)

    def _build_hop2(self, fwd_node_bits: torch.Tensor) -> None:
        """On the forwarding rank: which ranks of this node each row received in hop 1 visits, read
        from the bits its origin computed (``node_bits``): no routing arithmetic between the hops."""
        comm, g = self.comm, self.comm.ranks_per_node
        bits = fwd_node_bits[:, comm.node].unsqueeze(1)                     # [m, 1]
        in_local = (bits >> torch.arange(g, dtype=bits.dtype, device=bits.device)) & 1   # [m, G] 0/1
        _, rows = in_local.t().nonzero(as_tuple=True)                      # rank-major, row order
        self.hops.append(Hop("intra", rows, in_local.sum(0).tolist(), self._hop2_recv, fwd_node_bits.shape[0],
                             comm.local, g, comm.intra))


class DispatchCapacity:
    """Rows per peer a flat dispatch sends without asking first, learnt from the previous dispatch of
    the same layer on the same lane.

    Both ends of a pair know what the last dispatch moved between them (the sender counted its rows,
    the receiver read the count that travels in every row), so both derive the same capacity for the
    next one, ``count + max(extra, ⌈slack · count⌉)``, and that dispatch needs no count exchange
    (the layer's one small all-to-all, as costly as a large one on a high-latency fabric): each peer's
    block is padded up to its capacity, and rows beyond it follow point to point (the receiver knows
    how many from the count). The first dispatch of a layer, which has no history, exchanges counts.
    Every rank runs the same sequence of dispatches per layer and lane, so the two ends always agree.
    """

    def __init__(self, slack: float = 0.125, extra: int = 8):
        self.slack, self.extra = slack, extra
        self.send: list[int] | None = None      # capacity towards each peer
        self.recv: list[int] | None = None      # capacity from each peer

    def _grow(self, counts: list[int]) -> list[int]:
        return [c + max(self.extra, math.ceil(self.slack * c)) for c in counts]

    def update(self, sent: list[int], received: list[int]) -> None:
        self.send, self.recv = self._grow(sent), self._grow(received)

    @property
    def known(self) -> bool:
        return self.send is not None


def _start_count_exchange(send: torch.Tensor, comm: EPComm):
    if comm.size == 1:
        return send, None
    recv = torch.empty_like(send)
    return recv, dist.all_to_all_single(recv, send, group=lane_group(comm.group), async_op=True)


def plan_dispatch(topk_idx: torch.Tensor, num_experts: int, comm: EPComm, two_hop: bool = False,
                  counters: CommCounters | None = None,
                  capacity: DispatchCapacity | None = None) -> DispatchPlan:
    """Layout, first hop and the start of the layer's one count exchange (collective over the EP
    group; each rank sends every rank t the number of its tokens that visit t and, for the two-hop
    path, the number it sends to t's node when t is its hop-1 peer). A flat plan given a
    ``capacity`` that knows the layer's last dispatch starts no count exchange: its dispatch sends
    padded blocks instead (see :class:`DispatchCapacity`)."""
    R, G = comm.size, comm.ranks_per_node
    layout = get_dispatch_layout(topk_idx, num_experts, R, G)
    two_hop = two_hop and comm.num_nodes > 1 and G > 1
    to_rank = layout.num_tokens_per_rank
    capped = capacity is not None and not two_hop and R > 1
    if not two_hop:
        counts = to_rank
    else:
        to_node = layout.num_tokens_per_node
        counts = torch.zeros(R, 2, dtype=torch.int64, device=topk_idx.device)
        counts[:, 0] = to_rank
        counts[comm.local::G, 1] = to_node            # hop-1 peers: the ranks with my in-node index
    recv, work = (None, None) if capped and capacity.known else _start_count_exchange(counts, comm)
    # while the counts travel: the first hop's rows and send counts
    n = topk_idx.shape[0]
    if not two_hop:
        _, rows = layout.is_token_in_rank.t().nonzero(as_tuple=True)     # rank-major, token order
        hop = Hop("flat", rows, to_rank.tolist(), None, n, comm.rank, G, comm.group)
    else:
        _, rows = layout.is_token_in_node.t().nonzero(as_tuple=True)     # node-major, token order
        hop = Hop("inter", rows, to_node.tolist(), None, n, comm.node, G, comm.inter)
    if counters is not None:
        counters.add_visits(layout.nodes_per_token, comm.num_nodes)
    plan = DispatchPlan(layout, [hop], topk_idx.to(torch.int32), comm, num_experts // R, two_hop, recv, work)
    plan.capacity = capacity if capped else None
    if two_hop:   # which in-node ranks each token visits, per node: the forwarders' hop-2 routing
        if G > 62:
            raise ValueError(f"two-hop dispatch supports up to 62 ranks per node, got {G}")
        weights = 1 << torch.arange(G, device=topk_idx.device)
        in_rank = layout.is_token_in_rank.reshape(n, comm.num_nodes, G)
        plan.node_bits = (in_rank * weights).sum(-1).to(torch.int32 if G <= 31 else torch.int64)
    return plan


# ----------------------------------------------------------------------------------------- dispatch / combine
# Rows travel packed: one byte row per token holding every tensor's row (top-k ids, gate values,
# payload), each at an offset aligned to its element size, so that one all-to-all per hop moves
# them all and the receiver reads them back as views.
def _row_spec(tensors):
    """[(byte offset, bytes, dtype, row shape)] of each tensor in a packed row, and the row's width."""
    return _row_spec_of(tuple((t.dtype, tuple(t.shape[1:])) for t in tensors))


@lru_cache(maxsize=256)
def _row_spec_of(key):
    specs, off, align = [], 0, 1
    for dtype, tail in key:
        es = torch.empty((), dtype=dtype).element_size()
        off = -(-off // es) * es
        nb = es * math.prod(tail)
        specs.append((off, nb, dtype, tail))
        off += nb
        align = max(align, es)
    return tuple(specs), -(-off // align) * align


def _pack(tensors, specs, width: int) -> torch.Tensor:
    """The tensors' rows side by side in one byte row each ([N, width] uint8)."""
    n, t0 = tensors[0].shape[0], tensors[0]
    if len(tensors) == 1 and t0.is_contiguous() and specs[0][1] == width:
        return t0.reshape(n, width // t0.element_size()).view(torch.uint8)          # no copy
    buf = torch.empty(n, width, dtype=torch.uint8, device=t0.device)
    for t, (off, nb, dtype, _) in zip(tensors, specs):
        buf[:, off:off + nb].view(dtype).copy_(t.reshape(n, nb // t.element_size()))
    return buf


def _gather(tensors, specs, width: int, index: torch.Tensor) -> torch.Tensor:
    """``_pack(tensors)[index]`` in one copy: each tensor's rows gathered straight into its columns.
    No rows to gather from (an empty batch sending only padding): zero rows."""
    if tensors[0].shape[0] == 0:
        return torch.zeros(index.numel(), width, dtype=torch.uint8, device=index.device)
    if len(tensors) == 1:
        return _pack(tensors, specs, width).index_select(0, index)
    buf = torch.empty(index.numel(), width, dtype=torch.uint8, device=index.device)
    for t, (off, nb, dtype, tail) in zip(tensors, specs):
        src = t if len(tail) == 1 else t.reshape(t.shape[0], nb // t.element_size())
        torch.index_select(src, 0, index, out=buf[:, off:off + nb].view(dtype))
    return buf


def _unpack(buf: torch.Tensor, specs) -> list[torch.Tensor]:
    out = [buf[:, off:off + nb].view(dtype) for off, nb, dtype, _ in specs]
    return [t if len(tail) == 1 else t.unflatten(1, tail) for t, (_, _, _, tail) in zip(out, specs)]


def _a2a(buf: torch.Tensor, send: list[int], recv, group, during=None) -> torch.Tensor:
    """One all-to-all of packed rows. ``recv``: the receive splits, or a function that waits for
    them (the end of a count exchange, inside the same communication interval: the lane hands its
    turn over once for both). ``during()``, when given, runs while the all-to-all is in flight (this
    lane keeps computing; it hands its turn over only for what is left of the wait)."""
    if len(send) == 1:                      # a group of one: nothing to exchange or wait for
        if callable(recv):
            recv()
        if during is not None:
            during()
        return buf
    buf = buf.contiguous()
    if during is not None:
        if callable(recv):
            raise ValueError("_a2a: overlapping work needs the receive splits up front")
        out = buf.new_empty(sum(recv), buf.shape[1])
        work = dist.all_to_all_single(out, buf, recv, send, group=lane_group(group), async_op=True)
        during()
        with communicating("all_to_all"):
            work.wait()
        return out
    with communicating("all_to_all"):
        if callable(recv):
            recv = recv()
        out = buf.new_empty(sum(recv), buf.shape[1])
        dist.all_to_all_single(out, buf, recv, send, group=lane_group(group))
    return out


def _dispatch_capped(tensors, plan: DispatchPlan, counters, phases):
    """The flat forward dispatch without a count exchange (``tensors[0]`` begins with the top-k ids).

    To each peer a block of its capacity: the rows, then padding rows whose top-k ids are -1 (no
    expert takes them), every row carrying the block's true row count; a peer over capacity gets the
    rest point to point. The blocks stay padded through the experts, the combine and both backward
    passes (the sender sums the padding's returns into a dropped row), so no received row is copied:
    a pair's block is its capacity, or its count where that overflowed (then the receiver appends the
    overflow to the block, the one case that copies)."""
    hop, cap = plan.hops[0], plan.capacity
    k_ids = plan.topk_idx.shape[1]
    count_col = torch.zeros(hop.n_in, 1, dtype=torch.int32, device=hop.index.device)
    tensors = tensors + [count_col]
    specs, width = _row_spec(tensors)
    sent, cap_send, cap_recv = hop.send_splits, cap.send, cap.recv
    starts = [0]
    for c in sent:
        starts.append(starts[-1] + c)
    # sender: block j = my rows to j (the first cap_j of them when over), then padding (row 0's copies)
    index, pad_at = _padded_blocks(hop.index, starts, sent, cap_send)
    over = [(j, hop.index[starts[j] + k:starts[j + 1]]) for j, (c, k) in enumerate(zip(sent, cap_send)) if c > k]
    buf = _gather(tensors, specs, width, index)
    ids_at = specs[0][0]
    buf[pad_at, ids_at:ids_at + 4 * k_ids] = 255                     # int32 -1: no expert
    off = specs[-1][0]
    buf[:, off:off + 4].view(torch.int32)[:, 0] = torch.tensor(sent, dtype=torch.int32).repeat_interleave(
        torch.tensor(cap_send)).to(buf.device)
    if counters is not None:
        _record(counters, tensors, phases + ["dispatch_meta"], hop, cap_send)
    out = _a2a(buf, cap_send, cap_recv, hop.group)
    # receiver: the true counts from the first row of each block (every capacity is ≥ 1)
    firsts = torch.tensor([0] + cap_recv[:-1]).cumsum(0).to(out.device)
    received = out[firsts, off:off + 4].contiguous().view(torch.int32)[:, 0].tolist()
    group = lane_group(hop.group)
    ops, extra = [], {}
    for j, rows in over:                    # rows beyond a peer's capacity, point to point
        if counters is not None:
            _record(counters, tensors, phases + ["dispatch_meta"], hop,
                    [rows.numel() if i == j else 0 for i in range(hop.size)])
        rows_buf = _gather(tensors, specs, width, rows)
        if j == hop.me:                     # my own rows: no message
            extra[j] = rows_buf
        else:
            ops.append(dist.P2POp(dist.isend, rows_buf, _global_rank(group, j), group))
    for j, (c, k) in enumerate(zip(received, cap_recv)):
        if c > k and j != hop.me:
            extra[j] = out.new_empty(c - k, width)
            ops.append(dist.P2POp(dist.irecv, extra[j], _global_rank(group, j), group))
    if ops:                                 # one batch: no ordering of the sends against the receives
        with communicating("all_to_all"):
            for w in dist.batch_isend_irecv(ops):
                w.wait()
    if extra:                               # a block that overflowed continues with its extra rows
        parts, at = [], 0
        for j, k in enumerate(cap_recv):
            parts.append(out[at:at + k])
            if j in extra:
                parts.append(extra[j])
            at += k
        out = torch.cat(parts)
    # from here on the hop is its padded blocks: sizes, the gather index, and where returns are summed
    full = [max(c, k) for c, k in zip(sent, cap_send)]
    if over:
        index, pad_at = _padded_blocks(hop.index, starts, sent, full)
    hop.index, hop.send_splits = index, full
    hop.recv_splits = [max(c, k) for c, k in zip(received, cap_recv)]
    hop.sum_index = index.clone()
    hop.sum_index[pad_at] = hop.n_in
    cap.update(sent, received)
    return _unpack(out, specs)[:-1]


def _padded_blocks(index: torch.Tensor, starts: list[int], counts: list[int], sizes: list[int]):
    """Blocks of ``sizes`` rows, block j holding the first min(counts[j], sizes[j]) rows of
    ``index[starts[j]:]`` then padding (row 0): (the padded index, the padding positions)."""
    pieces, pads, at = [], [], 0
    for j, (c, k) in enumerate(zip(counts, sizes)):
        pieces.append(index[starts[j]:starts[j] + min(c, k)])
        if c < k:
            pieces.append(index.new_zeros(k - c))
            pads.append(torch.arange(at + c, at + k, device=index.device))
        at += k
    return (torch.cat(pieces) if pieces else index[:0]), (torch.cat(pads) if pads else index[:0])


def _global_rank(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def _dispatch_rows(tensors, plan: DispatchPlan, counters, phases):
    """Forward every tensor's rows along the plan's hops: per hop one row gather into a packed
    send buffer and one all-to-all (a forwarding rank re-gathers the packed rows it received).
    When the plan's second hop is not built yet (forward dispatch, two-hop), ``tensors[-1]`` are the
    plan's ``node_bits`` it is built from."""
    learn = plan.capacity if plan.hops[0].recv_splits is None else None    # a forward dispatch
    if learn is not None and learn.known:
        return _dispatch_capped(tensors, plan, counters, phases)
    specs, width = _row_spec(tensors)
    buf = None
    i = 0
    while i < len(plan.hops) or not plan.complete:
        if i == len(plan.hops):
            plan._build_hop2(_unpack(buf, specs[-1:])[0])
        hop = plan.hops[i]
        buf = _gather(tensors, specs, width, hop.index) if buf is None else buf.index_select(0, hop.index)
        if counters is not None:
            _record(counters, tensors, phases, hop, hop.send_splits)
        recv = hop.recv_splits if hop.recv_splits is not None else (lambda h=hop: (plan.wait(), h.recv_splits)[1])
        buf = _a2a(buf, hop.send_splits, recv, hop.group)
        i += 1
    if learn is not None:                   # the layer's first dispatch on this lane: counts exchanged
        learn.update(plan.hops[0].send_splits, plan.hops[0].recv_splits)
    return _unpack(buf, specs)


def _combine_rows(tensors, plan: DispatchPlan, counters, phases, during=None):
    """The reverse path: send rows back hop by hop (packed), summing the copies of a row (in fp32).
    ``during()`` runs while the first hop is in flight."""
    for hop in reversed(plan.hops):
        specs, width = _row_spec(tensors)
        if counters is not None:
            _record(counters, tensors, phases, hop, hop.recv_splits)
        back = _a2a(_pack(tensors, specs, width), hop.recv_splits, hop.send_splits, hop.group, during)
        during = None
        if hop.sum_index is None:
            tensors = [_sum_rows(b, hop.index, hop.n_in) for b in _unpack(back, specs)]
        else:                               # padded blocks: the padding's returns land in row n_in
            tensors = [_sum_rows(b, hop.sum_index, hop.n_in + 1)[:hop.n_in] for b in _unpack(back, specs)]
    return tensors


def _sum_rows(b: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """out[i] = Σ_{j: index[j] = i} b[j], accumulated in fp32, returned in b's dtype."""
    acc = torch.zeros(n, *b.shape[1:], dtype=torch.float32, device=b.device)
    if b.dtype == torch.float32:
        return acc.index_add_(0, index, b)
    return acc.index_add_(0, index, b.float()).to(b.dtype)


def _row_bytes(t: torch.Tensor) -> int:
    return t.element_size() * math.prod(t.shape[1:])


def _record(counters: CommCounters, tensors, phases, hop: Hop, splits) -> None:
    """One record per phase: a row of a phase may span several tensors (FP8 values + scales)."""
    per_phase: dict[str, int] = {}
    for t, ph in zip(tensors, phases):
        per_phase[ph] = per_phase.get(ph, 0) + _row_bytes(t)
    for ph, nbytes in per_phase.items():
        counters.record(ph, hop, splits, nbytes)


def _dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_activation`` (same products, bit for bit) with the scales broadcast per tile
    rather than repeated, for rows read straight out of the receive buffer."""
    m, d = q.shape
    q = q.view(FP8_DTYPE)
    if d != s.shape[1] * FP8_BLOCK:
        return dequantize_activation(q.contiguous(), s.contiguous(), dtype=dtype)
    return (q.float().view(m, s.shape[1], FP8_BLOCK) * s.unsqueeze(-1)).view(m, d).to(dtype)


def _dispatch_forward(x, w, plan: DispatchPlan, fp8: bool, counters):
    ids, k = plan.topk_idx, plan.topk_idx.shape[1]
    fused = w.dim() == 2 and w.element_size() == 4 and w.shape[1] == k
    meta = [torch.cat([ids.view(w.dtype), w], 1)] if fused else [ids, w]    # one gather for both
    route = [plan.node_bits] if plan.node_bits is not None and not plan.complete else []
    phases = ["dispatch_meta"] * len(meta)
    if fp8:
        q, s = quantize_activation(x)
        out = _dispatch_rows(meta + [s, q.view(torch.uint8)] + route, plan, counters,
                             phases + ["dispatch", "dispatch"] + ["dispatch_meta"] * len(route))
        x_r = _dequantize(out[len(meta) + 1], out[len(meta)], x.dtype)
    else:
        out = _dispatch_rows(meta + [x] + route, plan, counters, phases + ["dispatch"] + ["dispatch_meta"] * len(route))
        x_r = out[len(meta)]
    if fused:
        ids_r, w_r = out[0][:, :k].view(torch.int32), out[0][:, k:]
    else:
        ids_r, w_r = out[0], out[1]
    plan.recv_topk = ids_r
    return x_r, w_r


class _Dispatch(torch.autograd.Function):
    """(x [N, d], w [N, k]) → (x_recv [M, d], w_recv [M, k]); backward = combine of the gradients.
    The plan's top-k ids travel in the same rows; the received ones land in ``plan.recv_topk``."""

    @staticmethod
    def forward(ctx, x, w, plan, fp8, counters):
        ctx.plan, ctx.counters = plan, counters
        return _dispatch_forward(x, w, plan, fp8, counters)

    @staticmethod
    def backward(ctx, gx, gw):
        gx, gw = _combine_rows([gx, gw], ctx.plan, ctx.counters, ["bwd_combine", "combine_meta"])
        return gx, gw, None, None, None


class _Combine(torch.autograd.Function):
    """y_rows [M, d] → y [N, d] (sum of a token's partial outputs); backward = dispatch of the gradient."""

    @staticmethod
    def forward(ctx, y, plan, counters):
        ctx.plan, ctx.counters = plan, counters
        return _combine_rows([y], plan, counters, ["combine"])[0]

    @staticmethod
    def backward(ctx, g):
        return _dispatch_rows([g], ctx.plan, ctx.counters, ["bwd_dispatch"])[0], None, None


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def dispatch(x, w, plan: DispatchPlan, fp8: bool = False, counters: CommCounters | None = None):
    """Differentiable dispatch of tokens x [N, d] and gate values w [N, k] along ``plan`` (the
    plan's top-k ids travel with them: afterwards ``plan.recv_topk``). Without autograd (no input
    needs a gradient) the same forward runs without building a graph node."""
    if fp8 and quantize_activation is None:
        raise RuntimeError("FP8 dispatch needs dsv3.fp8.quant, which could not be imported")
    if _needs_grad(x, w):
        return _Dispatch.apply(x, w, plan, fp8, counters)
    return _dispatch_forward(x, w, plan, fp8, counters)


def combine(y, plan: DispatchPlan, counters: CommCounters | None = None, during=None):
    """Differentiable combine of received rows' outputs y [M, d] back to token order [N, d].
    ``during()``, when given, runs while the rows travel (without autograd; with it, just before)."""
    if not plan.complete or plan.recv_topk is None:
        raise RuntimeError("combine: dispatch along this plan first")
    if _needs_grad(y):
        if during is not None:
            during()
        return _Combine.apply(y, plan, counters)
    return _combine_rows([y], plan, counters, ["combine"], during)[0]


# ----------------------------------------------------------------------------------------- placement
@dataclass
class Placement:
    """Physical experts (slots) → logical experts, rank-major: rank r holds slots [r·S, (r+1)·S).

    Same conventions as ``eplb.rebalance_experts`` for one layer: phy2log [P], log2phy [L, width]
    padded with -1, logcnt [L]."""
    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor

    @classmethod
    def from_phy2log(cls, phy2log, num_logical: int, num_ranks: int) -> "Placement":
        p = torch.as_tensor(phy2log, dtype=torch.int64).flatten()
        if p.numel() % num_ranks:
            raise ValueError(f"placement: {p.numel()} physical experts do not divide over {num_ranks} ranks")
        if p.numel() and (p.min() < 0 or p.max() >= num_logical):
            raise ValueError(f"placement: phy2log values must lie in [0, {num_logical})")
        logcnt = torch.bincount(p, minlength=num_logical)
        if (logcnt == 0).any():
            missing = (logcnt == 0).nonzero().flatten().tolist()
            raise ValueError(f"placement: logical experts {missing} have no replica")
        width = int(logcnt.max())
        log2phy = torch.full((num_logical, width), -1, dtype=torch.int64)
        order = p.argsort(stable=True)
        starts = torch.cumsum(logcnt, 0) - logcnt
        log2phy[p[order], torch.arange(p.numel()) - starts[p[order]]] = order
        return cls(p, log2phy, logcnt)

    @property
    def num_physical(self) -> int:
        return self.phy2log.numel()


def initial_placement(num_routed: int, num_ranks: int, redundant: int = 0,
                      shared_as_routed: bool = False) -> torch.Tensor:
    """phy2log [P] of the static layout: rank r holds routed experts [r·E/R, (r+1)·E/R), then (with
    ``shared_as_routed``) a replica of the shared expert (logical id E), then ``redundant / R``
    extra replicas of the routed experts that follow its block (the next ranks' first experts), so
    no rank holds one expert twice. P = E + R·shared_as_routed + redundant."""
    if num_routed % num_ranks:
        raise ValueError(f"num_routed ({num_routed}) must be divisible by num_ranks ({num_ranks})")
    if redundant < 0 or redundant % num_ranks:
        raise ValueError(f"redundant experts ({redundant}) must be a multiple of the ranks ({num_ranks})")
    per, extra = num_routed // num_ranks, redundant // num_ranks
    if per + extra > num_routed:
        raise ValueError(f"{redundant} redundant experts over {num_ranks} ranks put {per + extra} routed "
                         f"experts on a rank, more than the {num_routed} distinct ones")
    out = []
    for r in range(num_ranks):
        out += range(r * per, (r + 1) * per)
        out += [num_routed] if shared_as_routed else []
        out += [((r + 1) * per + k) % num_routed for k in range(extra)]
    return torch.tensor(out, dtype=torch.int64)


def expert_moves(old, new, num_ranks: int, ranks_per_node: int = 1) -> torch.Tensor:
    """Where each slot of placement ``new`` takes its weights from, given the slots of ``old``.

    old, new: phy2log [P] (rank-major, P/num_ranks slots per rank). Returns src [P]: the ``old`` slot
    whose expert weights slot p receives — p itself when its expert stays, a slot of the same rank
    when the rank already holds that expert, else a replica on another rank (on the same node if one
    exists; among several candidates the choice rotates with the receiving slot, so one popular
    expert is not sent by one rank alone). Only the last kind travels between ranks."""
    old, new = torch.as_tensor(old).flatten(), torch.as_tensor(new).flatten()
    if old.numel() != new.numel() or old.numel() % num_ranks:
        raise ValueError(f"expert_moves: placements of {old.numel()} and {new.numel()} slots over {num_ranks} ranks")
    S = old.numel() // num_ranks
    src = torch.empty_like(new)
    for p, e in enumerate(new.tolist()):
        r = p // S
        if old[p] == e:
            src[p] = p
            continue
        holders = (old == e).nonzero().flatten()
        if holders.numel() == 0:
            raise ValueError(f"expert_moves: expert {e} has no replica in the old placement")
        rank = holders // S
        for keep in (rank == r, rank // ranks_per_node == r // ranks_per_node, torch.ones_like(rank, dtype=torch.bool)):
            if keep.any():
                cand = holders[keep]
                break
        src[p] = cand[p % cand.numel()]
    return src


class LoadWindow:
    """Logical-expert loads of the last ``window`` steps (for the next rebalance)."""

    def __init__(self, num_logical: int, window: int = 16):
        if window < 1:
            raise ValueError(f"LoadWindow.window = {window}: must be >= 1")
        self.buf = torch.zeros(window, num_logical, dtype=torch.int64)
        self.steps = 0

    def add(self, counts: torch.Tensor) -> None:
        if self.buf.device != counts.device:      # kept where the counts are: no device sync per layer
            self.buf = self.buf.to(counts.device)
        self.buf[self.steps % self.buf.shape[0]] = counts.detach().to(torch.int64)
        self.steps += 1

    def total(self) -> torch.Tensor:
        return self.buf.sum(0)


# ----------------------------------------------------------------------------------------- the layer
class ExpertParallelMoE(nn.Module):
    """DeepSeekMoE with its routed experts spread over an EP group (same parameters as ``MoE``;
    the gate and shared expert are replicated, each rank holds S = P/R physical experts).

    Options: ``two_hop`` (inter-node then intra-node forwarding), ``fp8_dispatch``, ``dispatch_capacity``
    (the flat dispatch sends padded blocks sized from its last dispatch instead of exchanging counts
    first, :class:`DispatchCapacity`: one collective fewer per layer for about an eighth more bytes —
    worth it where latency, not bandwidth, bounds the all-to-all), ``placement``
    (phy2log of redundant experts, e.g. from ``eplb.rebalance_experts``), ``shared_as_routed``
    (the shared expert becomes logical expert E, selected by every token with gate value 1),
    ``replica_choice`` ("spread": replica (t + rank) mod count of the token's local index t;
    "local": prefer a replica on this rank, then on this node, spread among those).
    """

    def __init__(self, cfg: ModelConfig, comm: EPComm, *, two_hop: bool = False, fp8_dispatch: bool = False,
                 placement=None, shared_as_routed: bool = False, replica_choice: str = "spread",
                 load_window: int = 16, dispatch_capacity: bool = False):
        super().__init__()
        if fp8_dispatch and quantize_activation is None:
            raise ValueError("ExpertParallelMoE.fp8_dispatch: dsv3.fp8.quant is not available")
        if replica_choice not in ("spread", "local"):
            raise ValueError(f"ExpertParallelMoE.replica_choice = {replica_choice!r}: 'spread' or 'local'")
        if shared_as_routed and cfg.n_shared_experts != 1:
            raise ValueError(f"ExpertParallelMoE.shared_as_routed needs n_shared_experts == 1 "
                             f"(got {cfg.n_shared_experts}): the shared expert must match a routed one")
        self.comm, self.two_hop, self.fp8_dispatch = comm, two_hop, fp8_dispatch
        self.shared_as_routed, self.replica_choice = shared_as_routed, replica_choice
        self.num_routed = cfg.n_routed_experts
        self.num_logical = cfg.n_routed_experts + int(shared_as_routed)
        self.top_k = cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        if placement is None:
            placement = initial_placement(self.num_routed, comm.size, shared_as_routed=shared_as_routed)
        self.placement = Placement.from_phy2log(placement, self.num_logical, comm.size)
        self.slots = self.placement.num_physical // comm.size
        self.experts = GroupedExperts(self.slots, cfg.hidden_size, cfg.moe_intermediate_size)
        for p in self.experts.parameters():
            p.expert_parallel = True       # differs per rank: keep out of data-parallel all-reduces
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts and not shared_as_routed else None)
        self.load = LoadWindow(self.num_logical, load_window)
        self.phys_load = LoadWindow(self.placement.num_physical, load_window)   # (token, slot) pairs per slot
        self.counters = CommCounters()
        self.last_plan: DispatchPlan | None = None
        # per lane: the flat dispatch's capacities, learnt from its last dispatch (no count exchange)
        self.dispatch_capacity = dispatch_capacity
        self.capacities: dict[int, DispatchCapacity] = {}
        self._build_choice()

    # ------------------------------------------------------------------ placement
    @property
    def local_logical(self) -> torch.Tensor:
        """Logical expert of each of this rank's slots."""
        r = self.comm.rank
        return self.placement.phy2log[r * self.slots:(r + 1) * self.slots]

    def _build_choice(self) -> None:
        """Per logical expert, the replicas this rank may route to (all, or the nearest ones)."""
        pl, S, G = self.placement, self.slots, self.comm.ranks_per_node
        table, cnt = pl.log2phy.clone(), pl.logcnt.clone()
        if self.replica_choice == "local":
            for e in range(self.num_logical):
                reps = pl.log2phy[e, :pl.logcnt[e]]
                ranks = reps // S
                for keep in (ranks == self.comm.rank, ranks // G == self.comm.node):
                    if keep.any():
                        reps = reps[keep]
                        break
                table[e] = -1
                table[e, :reps.numel()] = reps
                cnt[e] = reps.numel()
        self._table, self._cnt = table, cnt

    def to_physical(self, logical: torch.Tensor) -> torch.Tensor:
        """Logical top-k [N, k] → physical: replica (t + rank) mod (replicas) of each chosen expert."""
        dev = logical.device
        table, cnt = self._table.to(dev), self._cnt.to(dev)
        t = torch.arange(logical.shape[0], device=dev).unsqueeze(1) + self.comm.rank
        return table[logical, t % cnt[logical]]

    def set_placement(self, phy2log, move_weights: bool = True) -> int:
        """Serve a new placement (phy2log [P], same number of slots). ``move_weights``: every slot whose
        expert changed takes its weights from a slot of this rank that holds it, or else receives them
        point-to-point from a rank that does (:func:`expert_moves`; collective over the EP group, only
        the changed experts travel). Returns the bytes this rank received. No rank may hold two
        replicas of one expert."""
        new = Placement.from_phy2log(phy2log, self.num_logical, self.comm.size)
        if new.num_physical != self.placement.num_physical:
            raise ValueError(f"set_placement: {new.num_physical} physical experts, the layer has "
                             f"{self.placement.num_physical}")
        per_rank = new.phy2log.view(self.comm.size, self.slots).sort(-1).values
        if (per_rank[:, 1:] == per_rank[:, :-1]).any():
            raise ValueError("set_placement: a rank would hold two replicas of one expert")
        received = self._move_weights(new.phy2log) if move_weights else 0
        self.placement = new
        self.phys_load = LoadWindow(self.placement.num_physical, self.load.buf.shape[0])
        self._build_choice()
        return received

    @torch.no_grad()
    def _move_weights(self, new_phy2log: torch.Tensor) -> int:
        """Refill this rank's slots for ``new_phy2log`` (see :meth:`set_placement`): local copies, then
        one batch of point-to-point sends/receives of whole experts (every per-slot tensor of
        ``self.experts``, FP8 scales included, as raw bytes)."""
        S, me, comm = self.slots, self.comm.rank, self.comm
        src = expert_moves(self.placement.phy2log, new_phy2log, comm.size, comm.ranks_per_node)
        tensors = [t.data for t in self.experts.state_dict(keep_vars=True).values() if t.shape[:1] == (S,)]
        mine = range(me * S, (me + 1) * S)
        needed = {int(src[p]) for p in range(comm.size * S) if int(src[p]) in mine and int(src[p]) != p}
        old = {s: [t[s - me * S].clone() for t in tensors] for s in needed}     # rows read after overwrites
        peer = (lambda r: r) if comm.group is None else (lambda r: dist.get_global_rank(comm.group, r))
        ops, inbox, received = [], [], 0
        for p in range(comm.size * S):
            s, dst_rank, src_rank = int(src[p]), p // S, int(src[p]) // S
            if s == p:
                continue
            if dst_rank == me == src_rank:
                for t, o in zip(tensors, old[s]):
                    t[p - me * S] = o
            elif dst_rank == me:
                for t in tensors:
                    buf = torch.empty_like(t[0]).view(torch.uint8)
                    ops.append(dist.P2POp(dist.irecv, buf, peer(src_rank), comm.group))
                    inbox.append((t, p - me * S, buf))
                    received += buf.numel()
            elif src_rank == me:
                ops += [dist.P2POp(dist.isend, o.view(torch.uint8), peer(dst_rank), comm.group) for o in old[s]]
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        for t, row, buf in inbox:
            t[row] = buf.view(t.dtype).view_as(t[row])
        return received

    def rebalance(self, num_groups: int | None = None, num_nodes: int | None = None) -> torch.Tensor:
        """Re-place the experts from the windowed logical loads with ``eplb.rebalance_experts``
        (collective: loads are summed over the EP group, so every rank computes the same placement)."""
        (phy2log,) = rebalance_layers([self], window_loads([self]), num_groups, num_nodes)
        self.set_placement(phy2log)
        return phy2log

    def logical_load(self) -> torch.Tensor:
        """Tokens per logical expert over the window, summed over the EP group (collective)."""
        return window_loads([self])[0]

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_from(self, moe: MoE) -> None:
        """Copy a single-process ``MoE``'s parameters (this rank's experts, the gate, the shared expert)."""
        self.gate.load_state_dict(moe.gate.state_dict())
        w13, w2 = moe.experts.w13, moe.experts.w2
        if self.shared_as_routed:
            s = moe.shared_experts
            w13 = torch.cat([w13, torch.cat([s.gate_proj.weight, s.up_proj.weight])[None]])
            w2 = torch.cat([w2, s.down_proj.weight[None]])
        self.experts.w13.copy_(w13[self.local_logical.to(w13.device)])
        self.experts.w2.copy_(w2[self.local_logical.to(w2.device)])
        if self.shared_experts is not None:
            self.shared_experts.load_state_dict(moe.shared_experts.state_dict())

    def sync_replica_grads(self) -> None:
        """Sum the gradients of all replicas of each redundant expert (collective over the EP group)
        so that replicas stay identical after the optimizer step."""
        red = (self.placement.logcnt > 1).nonzero().flatten()
        if red.numel() == 0:
            return
        pos = torch.full((self.num_logical,), -1, dtype=torch.int64)
        pos[red] = torch.arange(red.numel())
        slot_pos = pos[self.local_logical]
        mine = slot_pos >= 0
        slot_pos, mine = slot_pos.to(self.experts.w13.device), mine.to(self.experts.w13.device)
        for p in (self.experts.w13, self.experts.w2):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buf = p.grad.new_zeros(red.numel(), *p.shape[1:]).index_add_(0, slot_pos[mine], p.grad[mine])
            if self.comm.size > 1:
                dist.all_reduce(buf, group=self.comm.group)
            p.grad[mine] = buf[slot_pos[mine]]

    # ------------------------------------------------------------------ forward
    def _local_experts(self, x: torch.Tensor, w: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
        """Received rows x [M, d] with their top-k [M, k] → Σ over this rank's slots g·expert(x), [M, d]."""
        base = self.comm.rank * self.slots
        local = topk - base
        row, slot = ((local >= 0) & (local < self.slots)).nonzero(as_tuple=True)
        e = local[row, slot]
        order = e.argsort(stable=True)
        row, slot, e = row[order], slot[order], e[order]
        y = self.experts(x[row], torch.bincount(e, minlength=self.slots))
        y = y * w[row, slot].unsqueeze(1).to(y.dtype)
        out = torch.zeros_like(x).index_add_(0, row, y.to(x.dtype))
        if row.numel() == 0 and torch.is_grad_enabled():
            # nothing to compute here, but keep the graph connected so that every rank runs the
            # backward collectives, and expert gradients are zeros rather than None
            out = out + 0.0 * (x.sum() + w.sum() + self.experts.w13.sum() + self.experts.w2.sum()).to(x.dtype)
        return out

    def forward(self, x: torch.Tensor, stats: list | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r: Routing = self.gate(flat)
        if stats is not None:
            stats.append(r)
        logical, w = r.indices, r.weights
        if self.shared_as_routed:
            n = logical.shape[0]
            logical = torch.cat([logical, logical.new_full((n, 1), self.num_routed)], 1)
            w = torch.cat([w, w.new_ones(n, 1)], 1)
        self.load.add(torch.bincount(logical.flatten(), minlength=self.num_logical))
        phys = self.to_physical(logical)
        self.phys_load.add(torch.bincount(phys.flatten(), minlength=self.placement.num_physical))
        plan = plan_dispatch(phys, self.placement.num_physical, self.comm, self.two_hop, self.counters,
                             capacity=(self.capacities.setdefault(current_lane(), DispatchCapacity())
                                       if self.dispatch_capacity else None))
        self.last_plan = plan
        # the shared expert runs while communication is in flight: the combine's rows without
        # autograd (inference: the larger wait), the count exchange with it (training)
        box: dict = {}
        run_shared = (lambda: box.update(s=self.shared_experts(flat))) if self.shared_experts is not None else None
        later = run_shared is not None and not _needs_grad(flat, w)
        if run_shared is not None and not later:
            run_shared()
        x_r, w_r = dispatch(flat, w, plan, self.fp8_dispatch, self.counters)
        y = combine(self._local_experts(x_r, w_r, plan.recv_topk), plan, self.counters,
                    during=run_shared if later else None)
        if "s" in box:
            y = y + box["s"]
        return y.view(shape)


# ----------------------------------------------------------------------------------------- live rebalancing
def window_loads(layers: list[ExpertParallelMoE]) -> torch.Tensor:
    """Tokens per logical expert over each layer's window, summed over the EP group: [layers, L]
    (collective: one all-reduce for all the layers, which share one EP group)."""
    load = torch.stack([m.load.total() for m in layers])
    if layers[0].comm.size > 1:
        dist.all_reduce(load, group=layers[0].comm.group)
    return load


def rebalance_layers(layers: list[ExpertParallelMoE], load: torch.Tensor, num_groups: int | None = None,
                     num_nodes: int | None = None) -> torch.Tensor:
    """New placements [layers, P] from the logical loads [layers, L] (:func:`window_loads`) by
    ``eplb.rebalance_experts``, keeping the layers' number of physical experts; with the same loads
    every rank computes the same placements. Moves nothing."""
    from ..eplb import rebalance_experts

    first = layers[0]
    groups = num_groups or (first.gate.n_group if not first.shared_as_routed else 1)
    phy2log, _, _ = rebalance_experts(load.cpu().double(), first.placement.num_physical, groups,
                                      num_nodes or first.comm.num_nodes, first.comm.size)
    return phy2log


def rank_loads(layers: list[ExpertParallelMoE]) -> torch.Tensor:
    """Measured load of every rank [layers, R]: (token, slot) pairs its slots received over the
    window, summed over the EP group (collective)."""
    first = layers[0]
    load = torch.stack([m.phys_load.total() for m in layers])
    if first.comm.size > 1:
        dist.all_reduce(load, group=first.comm.group)
    return load.view(len(layers), first.comm.size, -1).sum(-1)
