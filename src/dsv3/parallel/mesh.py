"""The process mesh: ranks grouped into nodes, and the groups of each kind of parallelism.

Layout (pipeline outermost, so a pipeline stage is a block of consecutive ranks)::

    rank = pp_rank · dp + dp_rank                 dp = world / pp      (data-parallel ranks per stage)
    dp_rank = edp_rank · ep + ep_rank             ep | dp              (expert-parallel block inside a stage)
    node = rank // gpus_per_node,  local = rank % gpus_per_node

Groups (lists of global ranks; every list partitions the world):

    pipeline      same dp_rank, all stages                       (pp ranks)
    data          same stage                                     (dp ranks: ZeRO-1 / non-expert gradients)
    expert        one ep block of a stage                        (ep ranks: dispatch / combine)
    expert_data   same stage, same ep_rank                       (dp/ep ranks: expert gradients)
    intra_node    ranks of one node                              (gpus_per_node ranks)
    inter_node    ranks with the same local index                (nodes ranks)
    ep_intra      the expert group's ranks on one node           (NVLink hop of the two-hop dispatch)
    ep_inter      the expert group's ranks with one local index  (InfiniBand hop)

Nodes are real (``gpus_per_node`` = torchrun's LOCAL_WORLD_SIZE, see :meth:`Mesh.from_env`) or
simulated: 4 processes on one machine become 2 nodes × 2 GPUs with ``gpus_per_node=2``.

:class:`MeshSpec` is pure data (no torch.distributed), printable and testable; :func:`build_mesh`
creates the process groups (every rank must call it, in the same order) and returns a :class:`Mesh`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.distributed as dist

KINDS = ("pipeline", "data", "expert", "expert_data", "intra_node", "inter_node", "ep_intra", "ep_inter")

_timeout = None        # datetime.timedelta for every group made here (set_group_timeout); None: torch's default


def set_group_timeout(timeout) -> None:
    """The timeout (a ``datetime.timedelta``) of every process group the mesh creates from now on —
    the run's ``--dist-timeout``, so that a collective on a frozen peer fails after it."""
    global _timeout
    _timeout = timeout


def _new_group(members, **kw):
    return dist.new_group(list(members), timeout=_timeout, **kw)


@dataclass(frozen=True)
class MeshSpec:
    world_size: int
    gpus_per_node: int
    pp: int = 1
    ep: int | None = None          # None: the whole data-parallel group of a stage

    def __post_init__(self):
        for name in ("world_size", "gpus_per_node", "pp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MeshSpec.{name} = {v!r}: must be a positive int")
        if self.world_size % self.gpus_per_node:
            raise ValueError(f"MeshSpec.gpus_per_node = {self.gpus_per_node}: must divide world_size "
                             f"({self.world_size})")
        if self.world_size % self.pp:
            raise ValueError(f"MeshSpec.pp = {self.pp}: must divide world_size ({self.world_size})")
        ep = self.ep if self.ep is not None else self.dp
        if not isinstance(ep, int) or ep < 1 or self.dp % ep:
            raise ValueError(f"MeshSpec.ep = {self.ep!r}: must be a positive divisor of dp ({self.dp})")
        if ep % self.gpus_per_node and self.gpus_per_node % ep:
            raise ValueError(f"MeshSpec.ep = {ep}: must be a multiple or a divisor of gpus_per_node "
                             f"({self.gpus_per_node}) so that expert groups align with nodes")
        object.__setattr__(self, "ep", ep)

    # ------------------------------------------------------------------ sizes
    @property
    def dp(self) -> int:
        return self.world_size // self.pp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.gpus_per_node

    @property
    def ep_ranks_per_node(self) -> int:
        return min(self.ep, self.gpus_per_node)

    @property
    def ep_nodes(self) -> int:
        """Nodes one expert group spans."""
        return self.ep // self.ep_ranks_per_node

    # ------------------------------------------------------------------ coordinates
    def coords(self, rank: int) -> dict:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
        pp_rank, dp_rank = divmod(rank, self.dp)
        edp_rank, ep_rank = divmod(dp_rank, self.ep)
        node, local = divmod(rank, self.gpus_per_node)
        return dict(rank=rank, node=node, local_rank=local, pp_rank=pp_rank, dp_rank=dp_rank,
                    ep_rank=ep_rank, edp_rank=edp_rank,
                    ep_node=ep_rank // self.ep_ranks_per_node, ep_local=ep_rank % self.ep_ranks_per_node)

    # ------------------------------------------------------------------ groups
    def groups(self, kind: str) -> list[list[int]]:
        """All groups of one kind, each a sorted list of global ranks; together they partition the world."""
        W, G = self.world_size, self.gpus_per_node
        c = [self.coords(r) for r in range(W)]

        def by(*keys):
            out: dict[tuple, list[int]] = {}
            for r in range(W):
                out.setdefault(tuple(c[r][k] for k in keys), []).append(r)
            return [out[k] for k in sorted(out)]

        if kind == "pipeline":
            return by("dp_rank")
        if kind == "data":
            return by("pp_rank")
        if kind == "expert":
            return by("pp_rank", "edp_rank")
        if kind == "expert_data":
            return by("pp_rank", "ep_rank")
        if kind == "intra_node":
            return [list(range(n * G, (n + 1) * G)) for n in range(self.num_nodes)]
        if kind == "inter_node":
            return [list(range(l, W, G)) for l in range(G)]
        if kind == "ep_intra":
            return by("pp_rank", "edp_rank", "ep_node")
        if kind == "ep_inter":
            return by("pp_rank", "edp_rank", "ep_local")
        raise ValueError(f"unknown group kind {kind!r}; one of {', '.join(KINDS)}")

    def group_of(self, kind: str, rank: int) -> list[int]:
        return next(g for g in self.groups(kind) if rank in g)

    def stage_ranks(self, pp_ranks, ep_rank: int | None = None) -> list[int]:
        """Global ranks of the pipeline ranks ``pp_ranks`` (all their data-parallel ranks, or only those
        with expert-parallel rank ``ep_rank``): the ranks holding copies of one parameter — a pipeline
        stage's tensor replicated over data parallelism, DualPipe's mirrored chunks, and for an expert
        tensor the expert-data replicas."""
        return sorted(pp * self.dp + e * self.ep + ep
                      for pp in pp_ranks for e in range(self.edp)
                      for ep in (range(self.ep) if ep_rank is None else (ep_rank,)))

    def describe(self) -> str:
        lines = [f"MeshSpec(world={self.world_size}, nodes={self.num_nodes}×{self.gpus_per_node}, "
                 f"pp={self.pp}, dp={self.dp}, ep={self.ep}, edp={self.edp})"]
        for kind in KINDS:
            lines.append(f"  {kind:<12} {self.groups(kind)}")
        return "\n".join(lines)


@dataclass
class EPComm:
    """What the expert-parallel MoE layer needs: its group and the two hops' subgroups.

    Ranks are indices inside ``group`` (0..size-1); EP rank r sits on EP node r // ranks_per_node
    with in-node index r % ranks_per_node. ``intra`` holds this rank's node (indexed by in-node
    index), ``inter`` the ranks with this rank's in-node index (indexed by node).
    """
    rank: int
    size: int
    ranks_per_node: int
    group: object = field(default=None, repr=False)
    intra: object = field(default=None, repr=False)
    inter: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"EPComm.rank = {self.rank}: must lie in [0, size={self.size})")
        if self.ranks_per_node < 1 or self.size % self.ranks_per_node:
            raise ValueError(f"EPComm.ranks_per_node = {self.ranks_per_node}: must divide size ({self.size})")

    @property
    def num_nodes(self) -> int:
        return self.size // self.ranks_per_node

    @property
    def node(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def local(self) -> int:
        return self.rank % self.ranks_per_node

    @classmethod
    def single(cls) -> "EPComm":
        """A one-rank 'group' (no communication): the EP layer then equals the plain MoE."""
        return cls(rank=0, size=1, ranks_per_node=1)


@dataclass
class Mesh:
    spec: MeshSpec
    rank: int
    coords: dict
    ranks: dict                                            # kind -> this rank's group (global ranks)
    handles: dict = field(default_factory=dict, repr=False)  # kind -> ProcessGroup
    made: dict = field(default_factory=dict, repr=False)     # tuple(global ranks) -> ProcessGroup (or None)
    lanes: set = field(default_factory=lambda: {0}, repr=False)   # overlap lanes with their own EP groups

    def __getattr__(self, name):
        # mesh.expert_group, mesh.data_group, … → the ProcessGroup handles
        handles = self.__dict__.get("handles")
        if handles is not None and name.endswith("_group") and name[:-6] in KINDS:
            return handles[name[:-6]]
        raise AttributeError(name)

    def expert_comm(self) -> EPComm:
        return EPComm(rank=self.coords["ep_rank"], size=self.spec.ep, ranks_per_node=self.spec.ep_ranks_per_node,
                      group=self.handles["expert"], intra=self.handles["ep_intra"], inter=self.handles["ep_inter"])

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    def create_groups(self, rank_lists) -> None:
        """Collective: a process group for every list of global ranks not made yet (every rank calls it
        with the same lists in the same order). Lists of one rank get no group (``group`` gives None)."""
        for members in rank_lists:
            key = tuple(sorted(members))
            if key in self.made:
                continue
            self.made[key] = _new_group(key) if len(key) > 1 and self.spec.world_size > 1 else None

    def group(self, ranks):
        """The process group of exactly these global ranks (made by :func:`build_mesh` or
        :meth:`create_groups`); None for a single rank."""
        key = tuple(sorted(ranks))
        if len(key) == 1:
            return None
        if key not in self.made:
            raise KeyError(f"no process group for ranks {list(key)}: create it with Mesh.create_groups "
                           f"on every rank first")
        return self.made[key]

    def add_lane(self, lane: int = 1) -> None:
        """Collective: a second copy of the expert-parallel groups (expert, ep_intra, ep_inter) for
        ``lane``, so that two micro-batches can run their all-to-alls concurrently without their
        collectives crossing (see :mod:`dsv3.parallel.overlap`). Every rank calls it once per lane."""
        from .overlap import register_lane_group

        if lane in self.lanes or self.spec.world_size == 1:
            return
        copies: dict[tuple, object] = {}
        for kind in ("expert", "ep_intra", "ep_inter"):
            for members in self.spec.groups(kind):
                key = tuple(members)
                if key not in copies:
                    copies[key] = _new_group(members) if len(members) > 1 else None
                if self.rank in members and copies[key] is not None:
                    register_lane_group(lane, self.handles[kind], copies[key])
        self.lanes.add(lane)

    @classmethod
    def from_env(cls, pp: int = 1, ep: int | None = None, gpus_per_node: int | None = None,
                 env: dict | None = None) -> "Mesh":
        """Build from torchrun's RANK / WORLD_SIZE / LOCAL_WORLD_SIZE (the default process group must
        already be initialised). ``gpus_per_node`` overrides LOCAL_WORLD_SIZE (simulated nodes)."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        g = gpus_per_node if gpus_per_node is not None else int(env.get("LOCAL_WORLD_SIZE", str(world)))
        return build_mesh(MeshSpec(world, g, pp, ep), rank)


def build_mesh(spec: MeshSpec, rank: int) -> Mesh:
    """Create every process group of ``spec`` (collective: all ranks call it in the same order) and
    keep this rank's. Needs an initialised default group of ``spec.world_size`` ranks, except for a
    world of one."""
    coords = spec.coords(rank)
    ranks = {kind: spec.group_of(kind, rank) for kind in KINDS}
    handles: dict = {}
    if spec.world_size > 1:
        if not dist.is_initialized() or dist.get_world_size() != spec.world_size:
            raise ValueError(f"build_mesh: the default process group must hold world_size = "
                             f"{spec.world_size} ranks")
        made: dict[tuple, object] = {}
        for kind in KINDS:                       # same order on every rank; equal memberships share a group
            for members in spec.groups(kind):
                key = tuple(members)
                if key not in made:
                    if len(members) > 1:
                        made[key] = _new_group(members)
                    elif rank in members:        # a one-rank group: only its member creates it
                        made[key] = _new_group(members, use_local_synchronization=True)
                if rank in members:
                    handles[kind] = made[key]
    else:
        handles = {kind: None for kind in KINDS}   # a world of one: no process group at all
        made = {}
    return Mesh(spec, rank, coords, ranks, handles, {k: v for k, v in made.items() if len(k) > 1})
