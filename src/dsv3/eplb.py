"""Expert-parallel load balancer (EPLB): place logical experts, with redundant replicas, on GPUs.

SPEC §3 (report §3.4, deepseek-ai/EPLB). Given the observed load of every logical expert of every
MoE layer, choose how many physical replicas each expert gets and which GPU holds each replica,
so that the load per GPU is as even as possible. A replica takes an equal share of its expert's
load (the runtime spreads an expert's tokens evenly over its replicas).

Output conventions are DeepSeek's (``rebalance_experts``):

* ``phy2log[l, p]``: the logical expert served by physical slot ``p``; GPU ``p // (R / K)`` holds
  slots ``[g * R/K, (g + 1) * R/K)`` and GPU ``g`` lies in node ``g // (K / N)``.
* ``log2phy[l, e, r]``: the physical slot of replica ``r`` of expert ``e`` (ascending), padded
  with −1 up to the largest replica count over all layers.
* ``logcnt[l, e]``: the number of replicas of expert ``e``; it sums to ``R`` in every layer.

Two policies, chosen as in the reference:

* hierarchical (``num_groups % num_nodes == 0``, prefill): expert groups are packed onto nodes
  (``G / N`` groups per node, node loads balanced), each node replicates its own experts into its
  ``R / N`` slots and packs the replicas onto its ``K / N`` GPUs. A group never leaves its node,
  so group-limited routing keeps its node bound.
* global (otherwise, decode): replicate over all experts, pack onto all GPUs.

Against the reference this implementation

1. never puts two replicas of one expert on the same GPU while a placement without that exists
   (EPLB issue #22): replica counts are capped at the number of GPUs of the packing domain (then
   a duplicate-free layout always exists), the packing sends each replica to the lightest GPU with
   room *that lacks its expert*, and a repair pass swaps away whatever is left (a round-robin
   layout is the last resort). No step afterwards may bring a second copy onto a GPU. When a
   domain has more slots per GPU than experts, duplicates are forced; they are kept to the
   fewest the counts allow.
2. balances at least as well. It starts from the reference's greedy (replicate the expert with
   the largest load per replica; sort the replicas and give each to the lightest GPU with room)
   and improves it: a swap search (a replica of the heaviest GPU against a lighter one elsewhere
   while the larger new load stays below the maximum), a search over replica counts (moving one
   replica from an expert to another; extra starts that give a hot expert fewer replicas, which
   untangles two hot experts colliding on a GPU), and, in the hierarchical policy, an exact
   search over the group-to-node partitions (pruned by the node mean as a lower bound; when
   there are more than ``_MAX_PARTITIONS`` of them, the reference's packing and its swap
   refinement). Where the reference's own placement is duplicate-free, ours is at least as
   balanced layer by layer: that placement is one of the starts and every step only lowers the
   maximum.

``rebalance_experts_greedy`` is a reimplementation of the reference for comparison (it matches
deepseek-ai/EPLB's balancedness; tie-breaking may differ).
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Tuple

import numpy as np
import torch

__all__ = [
    "rebalance_experts",
    "rebalance_experts_greedy",
    "gpu_loads",
    "static_gpu_loads",
    "balancedness",
    "same_gpu_duplicates",
    "is_hierarchical",
]

_EPS = 1e-12
_HOT_STARTS = 4  # _solve_domain: how many of the hottest experts get extra starts with fewer replicas
_GOOD_ENOUGH = 1e-3
_MAX_RECEIVERS = 32  # _count_moves: experts considered for an extra replica  # ... tried only while the max GPU load is above the mean by more than this


# ---------------------------------------------------------------------------------------------
# input checks


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        else:
            raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _as_loads(weight) -> np.ndarray:
    """``weight`` (tensor, array or nested list) -> float64 array [layers, experts], checked."""
    if isinstance(weight, torch.Tensor):
        if weight.is_complex():
            raise ValueError("weight must hold real loads, got a complex tensor")
        arr = weight.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(weight, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"weight must be a numeric [layers, num_logical_experts] array: {e}") from None
    if arr.ndim != 2:
        raise ValueError(f"weight must be 2-D [layers, num_logical_experts], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"weight must have at least one layer and one expert, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError("weight must be finite (found NaN or inf loads)")
    if (arr < 0).any():
        raise ValueError(f"weight must be non-negative (min load {arr.min():g})")
    return arr


def _check_args(weight, num_replicas, num_groups, num_nodes, num_gpus):
    w = _as_loads(weight)
    num_replicas = _check_int("num_replicas", num_replicas)
    num_groups = _check_int("num_groups", num_groups)
    num_nodes = _check_int("num_nodes", num_nodes)
    num_gpus = _check_int("num_gpus", num_gpus)
    num_logical = w.shape[1]
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be divisible by num_gpus ({num_gpus})")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be divisible by num_nodes ({num_nodes})")
    if num_logical % num_groups:
        raise ValueError(
            f"num_groups ({num_groups}) must divide the number of logical experts ({num_logical})")
    if num_replicas < num_logical:
        raise ValueError(
            f"num_replicas ({num_replicas}) must be >= the number of logical experts ({num_logical})")
    return w, num_replicas, num_groups, num_nodes, num_gpus


def is_hierarchical(num_groups: int, num_nodes: int) -> bool:
    """The policy ``rebalance_experts`` uses: hierarchical when groups divide evenly over nodes."""
    return num_groups % num_nodes == 0


# ---------------------------------------------------------------------------------------------
# building blocks (one layer, numpy)


def _greedy_counts(w: np.ndarray, num_slots: int, cap=None, pin: tuple[int, int] | None = None) -> np.ndarray:
    """Replica counts: one each, then each extra slot to the expert with the largest load per
    replica (ties: lowest index), never above ``cap`` replicas (an int or one per expert). This
    minimises the largest per-replica load for the given number of slots. ``pin=(e, v)`` fixes
    expert e at v replicas. None when the caps leave too few slots."""
    n = len(w)
    cnt = np.ones(n, dtype=np.int64)
    if pin is not None:
        cnt[pin[0]] = pin[1]
    caps = np.full(n, num_slots) if cap is None else np.broadcast_to(np.asarray(cap), (n,))
    heap = [(-float(w[e]) / cnt[e], e) for e in range(n) if cnt[e] < caps[e] and (pin is None or e != pin[0])]
    heapq.heapify(heap)
    for _ in range(num_slots - int(cnt.sum())):
        if not heap:
            return None  # the caps leave no room
        _, e = heapq.heappop(heap)
        cnt[e] += 1
        if cnt[e] < caps[e]:
            heapq.heappush(heap, (-float(w[e]) / cnt[e], e))
    return cnt


def _balanced_packing(values: np.ndarray, num_packs: int) -> np.ndarray:
    """The reference's packing: items sorted by value (descending) each go to the lightest pack
    that still has room; every pack takes ``len(values) / num_packs`` items. Returns pack ids."""
    n = len(values)
    per_pack = n // num_packs
    order = np.lexsort((np.arange(n), -values))
    pack = np.empty(n, dtype=np.int64)
    load = np.zeros(num_packs)
    room = np.full(num_packs, per_pack)
    for i in order:
        open_ = np.flatnonzero(room > 0)
        p = open_[np.argmin(load[open_])]
        pack[i] = p
        load[p] += values[i]
        room[p] -= 1
    return pack


def _replicas(w: np.ndarray, cnt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Item list of a replication: (expert id, load) of every replica."""
    expert = np.repeat(np.arange(len(w)), cnt)
    return expert, (w / cnt)[expert]


def _pack_distinct(expert: np.ndarray, load: np.ndarray, num_packs: int, num_experts: int) -> np.ndarray:
    """Like ``_balanced_packing`` but each replica goes to the lightest GPU with room among those
    holding the fewest replicas of its expert (so: one without it, whenever there is one)."""
    n = len(expert)
    per_pack = n // num_packs
    order = np.lexsort((expert, -load))
    gpu = np.empty(n, dtype=np.int64)
    gload = np.zeros(num_packs)
    room = np.full(num_packs, per_pack)
    has = np.zeros((num_packs, num_experts), dtype=np.int64)
    for i in order:
        e = expert[i]
        open_ = np.flatnonzero(room > 0)
        c = has[open_, e]
        open_ = open_[c == c.min()]
        g = open_[np.argmin(gload[open_])]
        gpu[i] = g
        gload[g] += load[i]
        room[g] -= 1
        has[g, e] += 1
    return gpu


def _repair_duplicates(gpu, expert, load, num_packs, num_experts) -> bool:
    """Swap replicas until no GPU holds two replicas of an expert that has at most ``num_packs``
    replicas. Each swap is the one with the smallest resulting pair maximum. In place; returns
    False when stuck (the caller falls back to a round-robin layout)."""
    has = np.zeros((num_packs, num_experts), dtype=np.int64)
    np.add.at(has, (gpu, expert), 1)
    nrep = np.bincount(expert, minlength=num_experts)
    gload = np.bincount(gpu, weights=load, minlength=num_packs)
    for _ in range(4 * len(gpu)):
        dup = np.argwhere((has > 1) & (nrep[None, :] <= num_packs))
        if len(dup) == 0:
            return True
        h, e = dup[0]
        a = np.flatnonzero((gpu == h) & (expert == e))[0]
        # partner b on a GPU g without e, whose expert is not on h
        ok = (has[gpu, e] == 0) & (has[h, expert] == 0)
        cand = np.flatnonzero(ok)
        if len(cand) == 0:
            return False
        d = load[a] - load[cand]
        score = np.maximum(gload[h] - d, gload[gpu[cand]] + d)
        b = cand[np.argmin(score)]
        _swap(a, b, gpu, expert, load, has, gload)
    return False


def _swap(a, b, gpu, expert, load, has, gload):
    ga, gb = gpu[a], gpu[b]
    ea, eb = expert[a], expert[b]
    has[ga, ea] -= 1
    has[gb, eb] -= 1
    has[gb, ea] += 1
    has[ga, eb] += 1
    d = load[a] - load[b]
    gload[ga] -= d
    gload[gb] += d
    gpu[a], gpu[b] = gb, ga


def _refine_swaps(gpu, expert, load, num_packs, num_experts, max_iters: int | None = None) -> None:
    """Local search: swap a replica of the heaviest GPU with a lighter replica elsewhere while the
    larger of the two new loads is below the current maximum; never brings a second replica of an
    expert onto a GPU. Each step lowers the sorted load vector, so it ends. In place."""
    if num_packs < 2 or len(gpu) == num_packs:  # one replica per GPU: swaps only move the max
        return
    has = np.zeros((num_packs, num_experts), dtype=np.int64)
    np.add.at(has, (gpu, expert), 1)
    gload = np.bincount(gpu, weights=load, minlength=num_packs)
    tol = _EPS * max(float(gload.sum()), 1.0)
    max_iters = max_iters or 20 * len(gpu)
    for _ in range(max_iters):
        h = int(np.argmax(gload))
        on_h = np.flatnonzero(gpu == h)
        off = np.flatnonzero(gpu != h)
        d = load[on_h][:, None] - load[off][None, :]  # [S, n - S]
        g_off = gpu[off]
        new_g = gload[g_off][None, :] + d
        new_h = gload[h] - d
        ok = (d > tol) & (new_g < gload[h] - tol)
        ok &= has[g_off[None, :], expert[on_h][:, None]] == 0
        ok &= (has[h, expert[off]] == 0)[None, :]
        if not ok.any():
            return
        score = np.where(ok, np.maximum(new_h, new_g), np.inf)
        i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        _swap(on_h[i], off[j], gpu, expert, load, has, gload)


def _round_robin(expert: np.ndarray, num_packs: int) -> np.ndarray:
    """A layout with no avoidable duplicate: replicas listed expert by expert, the j-th on GPU
    j mod K (an expert with c <= K replicas lands on c distinct GPUs)."""
    order = np.argsort(expert, kind="stable")
    gpu = np.empty(len(expert), dtype=np.int64)
    gpu[order] = np.arange(len(expert)) % num_packs
    return gpu


def _count_moves(w, cnt, expert, gpu, num_packs, cap):
    """Every move "replica r of expert a (c_a >= 2) becomes a replica of expert b, on the same
    GPU" scored by the resulting maximum GPU load: (replicas r, receivers b, score [r, b]), inf
    where not allowed (b == a, b at the cap, b already on that GPU). Receivers: the
    ``_MAX_RECEIVERS`` experts with the largest load per replica and those on the heaviest GPU."""
    n = len(w)
    has = np.zeros((num_packs, n))
    np.add.at(has, (gpu, expert), 1.0)
    gl = np.bincount(gpu, weights=(w / cnt)[expert], minlength=num_packs)
    rs = np.flatnonzero(cnt[expert] >= 2)
    a, x = expert[rs], gpu[rs]
    # receivers: the experts with the largest load per replica and those on the heaviest GPU
    h = int(np.argmax(gl))
    recv = np.union1d(np.argsort(-(w / cnt), kind="stable")[:_MAX_RECEIVERS], expert[gpu == h])
    share_a = w[a] / cnt[a]
    grow_a = w[a] / (cnt[a] - 1) - share_a  # on every GPU that keeps a replica of a
    base = gl[None, :] + has[:, a].T * grow_a[:, None]  # [nr, K]
    base[np.arange(len(rs)), x] -= grow_a + share_a
    wb, cb = w[recv], cnt[recv]
    shrink_b = wb / cb - wb / (cb + 1)  # on every GPU holding b
    new = base[:, None, :] - (has[:, recv].T * shrink_b[:, None])[None]  # [nr, nb, K]
    new[np.arange(len(rs)), :, x] += (wb / (cb + 1))[None, :]
    score = new.max(-1)
    bad = (has[x][:, recv] > 0) | (cb >= cap)[None, :] | (a[:, None] == recv[None, :])
    score[bad] = np.inf
    return rs, recv, score


def _refine_counts(w, cnt, expert, gpu, num_packs, cap, tries: int = 4) -> None:
    """Local search over replica counts: move a replica from one expert to another (in place,
    then swap-refine) while that lowers the maximum GPU load. The greedy counts minimise the
    largest replica, not the largest GPU; with several replicas per GPU another split can pack
    better (the reference gets such splits only through same-GPU duplicates). In place."""
    n = len(w)
    cur = float(np.bincount(gpu, weights=(w / cnt)[expert], minlength=num_packs).max())
    tol = _EPS * max(float(w.sum()), 1.0)
    for _ in range(2 * (len(expert) - n) + 8):
        rs, recv, score = _count_moves(w, cnt, expert, gpu, num_packs, cap)
        if score.size == 0:
            return
        flat = np.argsort(score, axis=None, kind="stable")[:tries]
        done = False
        for f in flat:
            i, j = np.unravel_index(int(f), score.shape)
            if not np.isfinite(score[i, j]):
                break
            b = recv[j]
            r = rs[i]
            c2, e2, g2 = cnt.copy(), expert.copy(), gpu.copy()
            c2[e2[r]] -= 1
            c2[b] += 1
            e2[r] = b
            _refine_swaps(g2, e2, (w / c2)[e2], num_packs, n)
            new = float(np.bincount(g2, weights=(w / c2)[e2], minlength=num_packs).max())
            if new < cur - tol:
                cnt[:], expert[:], gpu[:], cur, done = c2, e2, g2, new, True
                break
        if not done:
            return


def _pack_counts(w: np.ndarray, cnt: np.ndarray, num_packs: int):
    """Replicas of ``cnt`` packed onto GPUs: distinct packing, repair, swap refinement."""
    n = len(w)
    expert, load = _replicas(w, cnt)
    gpu = _pack_distinct(expert, load, num_packs, n)
    if not _repair_duplicates(gpu, expert, load, num_packs, n):
        gpu = _round_robin(expert, num_packs)
    _refine_swaps(gpu, expert, load, num_packs, n)
    return expert, gpu, float(np.bincount(gpu, weights=load, minlength=num_packs).max())


def _solve_domain(w: np.ndarray, num_slots: int, num_packs: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Replicate the experts of one domain (a node, or everything) into ``num_slots`` replicas
    and pack them onto ``num_packs`` GPUs. Returns (replica expert ids, replica GPU, max load).

    Start: the greedy counts (capped at one replica per GPU), packed. With several replicas per
    GPU and a maximum above the mean, more starts: one of the hottest replicated experts gets
    fewer replicas than the greedy gave it, the freed slots going greedily either to all others
    or only to experts the greedy left with one replica. Two hot experts whose replicas cannot all
    sit on distinct GPUs collide on some GPU (their shares add up); fewer replicas of one of them
    can avoid that — a change the one-replica-at-a-time count search cannot reach, since each of
    its steps alone makes the collision worse. Each start is packed; the best two get the count
    local search."""
    n = len(w)
    per_gpu = num_slots // num_packs
    cap = max(num_packs, -(-num_slots // n))  # above K replicas a duplicate is forced anyway
    cnt = _greedy_counts(w, num_slots, cap)
    expert, gpu, gmax = _pack_counts(w, cnt, num_packs)
    if per_gpu == 1 or n < per_gpu or num_slots == n:  # one replica per GPU: greedy is optimal
        return expert, gpu, gmax
    mean = float(w.sum()) / num_packs
    starts = [(gmax, cnt, expert, gpu)]
    hot = [int(e) for e in np.argsort(-w, kind="stable")[:_HOT_STARTS] if cnt[e] >= 2]
    for e in hot if gmax > mean * (1 + _GOOD_ENOUGH) else []:
        frozen = np.where(cnt >= 2, cnt, cap)  # variant 2: the other replicated experts keep their counts
        c = int(cnt[e])
        for v in sorted({c - 1, c - 2, c - 3, -(-3 * c // 4), -(-c // 2), -(-c // 3), 1} - {0, -1, -2, c}, reverse=True):
            if w[e] / v >= gmax:  # this start cannot win (and fewer replicas cannot either)
                break
            for c_cap in (cap, frozen):
                c2 = _greedy_counts(w, num_slots, c_cap, pin=(e, v))
                if c2 is None or float((w / c2).max()) >= gmax or any(np.array_equal(c2, t[1]) for t in starts):
                    continue
                e2, g2, m2 = _pack_counts(w, c2, num_packs)
                starts.append((m2, c2, e2, g2))
    starts.sort(key=lambda t: t[0])
    best = None
    for m0, c0, e0, g0 in starts[:2]:
        c0, e0, g0 = c0.copy(), e0.copy(), g0.copy()
        if m0 > mean * (1 + 1e-9):
            _refine_counts(w, c0, e0, g0, num_packs, cap)
        m1 = float(np.bincount(g0, weights=(w / c0)[e0], minlength=num_packs).max())
        if best is None or m1 < best[2]:
            best = (e0, g0, m1)
    return best


def _refine_partition(values: np.ndarray, pack: np.ndarray, num_packs: int) -> np.ndarray:
    """Swap items between the heaviest pack and another while the pair maximum drops."""
    pack = pack.copy()
    ploads = np.bincount(pack, weights=values, minlength=num_packs)
    tol = _EPS * max(float(values.sum()), 1.0)
    for _ in range(20 * len(values)):
        h = int(np.argmax(ploads))
        a_idx = np.flatnonzero(pack == h)
        b_idx = np.flatnonzero(pack != h)
        if len(a_idx) == 0 or len(b_idx) == 0:
            break
        d = values[a_idx][:, None] - values[b_idx][None, :]
        new_b = ploads[pack[b_idx]][None, :] + d
        ok = (d > tol) & (new_b < ploads[h] - tol)
        if not ok.any():
            break
        score = np.where(ok, np.maximum(ploads[h] - d, new_b), np.inf)
        i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        a, b = a_idx[i], b_idx[j]
        ploads[h] -= d[i, j]
        ploads[pack[b]] += d[i, j]
        pack[a], pack[b] = pack[b], h
    return pack


def _layout(num_slots_per_gpu: int, gpu_experts: list[list[int]]) -> np.ndarray:
    """phy2log row from per-GPU expert lists (each sorted, exactly ``num_slots_per_gpu`` long)."""
    return np.array([e for lst in gpu_experts for e in sorted(lst)], dtype=np.int64)


_MAX_PARTITIONS = 5000  # group-to-node partitions searched exhaustively up to this many


def _num_partitions(num_items: int, num_packs: int) -> int:
    per = num_items // num_packs
    return math.factorial(num_items) // (math.factorial(per) ** num_packs * math.factorial(num_packs))


def _partitions(items: list[int], per: int):
    """All ways to split ``items`` into unordered blocks of ``per`` (blocks as sorted tuples)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for comb in itertools.combinations(rest, per - 1):
        left = [i for i in rest if i not in comb]
        for tail in _partitions(left, per):
            yield [(first, *comb)] + tail


def _domains(num_logical, num_replicas, num_groups, num_nodes, num_gpus):
    """(groups, nodes, experts per group, GPUs per node, slots per node) of the placement domains;
    the global policy is one domain holding every expert and GPU."""
    if not is_hierarchical(num_groups, num_nodes):
        num_groups = num_nodes = 1
    return (num_groups, num_nodes, num_logical // num_groups, num_gpus // num_nodes,
            num_replicas // num_nodes)


def _place_layer(w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    num_groups, num_nodes, group_size, gpus_per_node, slots_per_node = _domains(
        len(w), num_replicas, num_groups, num_nodes, num_gpus)
    group_load = w.reshape(num_groups, group_size).sum(1)

    # candidate group-to-node partitions, each with a lower bound on its max GPU load
    if _num_partitions(num_groups, num_nodes) <= _MAX_PARTITIONS:
        parts = list(_partitions(list(range(num_groups)), num_groups // num_nodes))
    else:  # the reference's greedy packing and its swap refinement
        parts = []
        greedy = _balanced_packing(group_load, num_nodes)
        for pack in (_refine_partition(group_load, greedy, num_nodes), greedy):
            parts.append([tuple(np.flatnonzero(pack == n).tolist()) for n in range(num_nodes)])
    bounds = [max(group_load[list(b)].sum() for b in p) / gpus_per_node for p in parts]

    # exact search over the candidates (by our domain solver), cheapest bound first, pruned
    cache: dict[tuple, tuple] = {}
    best, best_max = None, math.inf
    for i in np.argsort(bounds, kind="stable"):
        if bounds[i] >= best_max * (1 - 1e-12):
            break
        layer_max = 0.0
        for block in parts[i]:
            if block not in cache:
                experts = (np.array(block)[:, None] * group_size + np.arange(group_size)).ravel()
                rexp, rgpu, gmax = _solve_domain(w[experts], slots_per_node, gpus_per_node)
                cache[block] = ([experts[rexp[rgpu == g]].tolist() for g in range(gpus_per_node)], gmax)
            layer_max = max(layer_max, cache[block][1])
            if layer_max >= best_max:
                break
        if layer_max < best_max * (1 - 1e-12):
            best, best_max = parts[i], layer_max
    gpu_experts = [lst for block in best for lst in cache[block][0]]
    return _layout(num_replicas // num_gpus, gpu_experts)


def _place_layer_greedy(w, num_replicas, num_groups, num_nodes, num_gpus) -> np.ndarray:
    """The reference algorithm: greedy group packing, uncapped greedy replication, plain packing."""
    num_groups, num_nodes, group_size, gpus_per_node, slots_per_node = _domains(
        len(w), num_replicas, num_groups, num_nodes, num_gpus)
    node_of_group = _balanced_packing(w.reshape(num_groups, group_size).sum(1), num_nodes)
    row = []
    for node in range(num_nodes):
        groups = np.flatnonzero(node_of_group == node)
        experts = (groups[:, None] * group_size + np.arange(group_size)).ravel()
        cnt = _greedy_counts(w[experts], slots_per_node)
        rexp, rload = _replicas(w[experts], cnt)
        rgpu = _balanced_packing(rload, gpus_per_node)
        for g in range(gpus_per_node):
            row.extend(experts[rexp[rgpu == g]].tolist())
    return np.array(row, dtype=np.int64)


def _maps(phy2log: np.ndarray, num_logical: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_layers, num_replicas = phy2log.shape
    logcnt = np.stack([np.bincount(r, minlength=num_logical) for r in phy2log])
    width = int(logcnt.max())
    log2phy = np.full((num_layers, num_logical, width), -1, dtype=np.int64)
    for l in range(num_layers):
        order = np.argsort(phy2log[l], kind="stable")  # by expert, then by slot
        starts = np.concatenate([[0], np.cumsum(logcnt[l])[:-1]])
        rank = np.arange(num_replicas) - np.repeat(starts, logcnt[l])
        log2phy[l, phy2log[l, order], rank] = order
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# public API


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_replicas`` physical experts on ``num_gpus`` GPUs from the loads ``weight``.

    weight: [layers, num_logical_experts] non-negative loads (float or int tensor, array, list).
    num_replicas: physical experts (logical + redundant), a multiple of ``num_gpus``.
    num_groups: expert groups (dividing the logical experts); the hierarchical policy keeps a
        group on one node when ``num_groups % num_nodes == 0``, the global policy is used otherwise.
    num_nodes: server nodes; ``num_gpus`` must be a multiple of it.

    Returns ``(phy2log [layers, R], log2phy [layers, E, max replicas] padded with -1,
    logcnt [layers, E])``, int64 CPU tensors. Raises ``ValueError`` naming the bad parameter.
    """
    w, num_replicas, num_groups, num_nodes, num_gpus = _check_args(
        weight, num_replicas, num_groups, num_nodes, num_gpus)
    phy2log = np.stack([_place_layer(row, num_replicas, num_groups, num_nodes, num_gpus) for row in w])
    return _maps(phy2log, w.shape[1])


def rebalance_experts_greedy(weight, num_replicas: int, num_groups: int, num_nodes: int,
                             num_gpus: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference EPLB greedy (same policies, same outputs), for comparison: it may put two
    replicas of one expert on the same GPU and does no refinement."""
    w, num_replicas, num_groups, num_nodes, num_gpus = _check_args(
        weight, num_replicas, num_groups, num_nodes, num_gpus)
    phy2log = np.stack([_place_layer_greedy(row, num_replicas, num_groups, num_nodes, num_gpus) for row in w])
    return _maps(phy2log, w.shape[1])


def _phy2log_np(phy2log, num_gpus: int) -> np.ndarray:
    p = phy2log.detach().cpu().numpy() if isinstance(phy2log, torch.Tensor) else np.asarray(phy2log)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2:
        raise ValueError(f"phy2log must be [layers, num_replicas], got shape {tuple(p.shape)}")
    num_gpus = _check_int("num_gpus", num_gpus)
    if p.shape[1] % num_gpus:
        raise ValueError(f"num_replicas ({p.shape[1]}) must be divisible by num_gpus ({num_gpus})")
    return p.astype(np.int64)


def gpu_loads(weight, phy2log, logcnt=None, num_gpus: int = 1) -> torch.Tensor:
    """Load of every GPU, [layers, num_gpus] float64: each replica carries its expert's load
    divided by the expert's replica count (``logcnt``, recomputed from ``phy2log`` if None).
    1-D ``weight``/``phy2log`` are taken as one layer."""
    w = np.asarray(weight.detach().cpu().double().numpy() if isinstance(weight, torch.Tensor) else weight,
                   dtype=np.float64)
    if w.ndim == 1:
        w = w[None]
    p = _phy2log_np(phy2log, num_gpus)
    if w.ndim != 2 or w.shape[0] != p.shape[0]:
        raise ValueError(f"weight {tuple(w.shape)} and phy2log {tuple(p.shape)} disagree on layers")
    if p.min() < 0 or p.max() >= w.shape[1]:
        raise ValueError("phy2log holds an expert id outside [0, num_logical_experts)")
    if logcnt is None:
        cnt = np.stack([np.bincount(r, minlength=w.shape[1]) for r in p])
    else:
        cnt = logcnt.detach().cpu().numpy() if isinstance(logcnt, torch.Tensor) else np.asarray(logcnt)
        cnt = cnt.reshape(w.shape)
    share = np.take_along_axis(w / np.maximum(cnt, 1), p, axis=1)  # [L, R]
    return torch.from_numpy(share.reshape(p.shape[0], num_gpus, -1).sum(-1))


def static_gpu_loads(weight, num_gpus: int) -> torch.Tensor:
    """GPU loads with no redundancy and no rebalancing: experts in order, split into ``num_gpus``
    contiguous blocks (expert e on GPU e * K // E) — the plain expert-parallel layout."""
    w = _as_loads(weight if not (hasattr(weight, "ndim") and weight.ndim == 1) else weight[None])
    num_gpus = _check_int("num_gpus", num_gpus)
    e = w.shape[1]
    gpu = np.arange(e) * num_gpus // e
    out = np.zeros((w.shape[0], num_gpus))
    for g in range(num_gpus):
        out[:, g] = w[:, gpu == g].sum(1)
    return torch.from_numpy(out)


def balancedness(loads, phy2log=None, logcnt=None, num_gpus: int | None = None, per_layer: bool = False):
    """Mean over GPUs / max over GPUs of the load, averaged over layers (1 = perfect).

    ``balancedness(gpu_loads_tensor)`` or ``balancedness(weight, phy2log, logcnt, num_gpus)``.
    A layer with no load counts as 1. ``per_layer=True`` returns the [layers] tensor instead.
    """
    if phy2log is not None:
        if num_gpus is None:
            raise ValueError("num_gpus is required with phy2log")
        loads = gpu_loads(loads, phy2log, logcnt, num_gpus)
    g = torch.as_tensor(loads, dtype=torch.float64)
    if g.dim() == 1:
        g = g[None]
    mx = g.max(-1).values
    b = torch.where(mx > 0, g.mean(-1) / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.ones_like(mx))
    return b if per_layer else float(b.mean())


def same_gpu_duplicates(phy2log, num_gpus: int) -> int:
    """How many replicas share a GPU with another replica of the same expert (summed over
    layers and GPUs: a GPU holding an expert k times counts k - 1)."""
    p = _phy2log_np(phy2log, num_gpus)
    per_gpu = p.reshape(p.shape[0], num_gpus, -1)
    s = np.sort(per_gpu, axis=-1)
    return int((s[..., 1:] == s[..., :-1]).sum())
