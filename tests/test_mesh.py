"""The process mesh (parallel/mesh.py): group layouts as data, and the real gloo groups they build
(4 ranks as 2 simulated nodes × 2; 8 ranks as 4 × 2 with 2 pipeline stages)."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
import torch.distributed as dist

from dsv3.parallel.mesh import KINDS, EPComm, Mesh, MeshSpec, build_mesh
from helpers import free_port, spawn_ranks


def _is_partition(groups, world):
    flat = sorted(r for g in groups for r in g)
    return flat == list(range(world))


@pytest.mark.parametrize("world,gpn,pp,ep", [(4, 2, 1, None), (8, 2, 2, 2), (8, 2, 1, 8), (16, 4, 2, 4),
                                             (8, 4, 2, 2), (16, 8, 1, 16), (4, 4, 1, 2)])
def test_groups_partition_and_coordinates(world, gpn, pp, ep):
    spec = MeshSpec(world, gpn, pp, ep)
    for kind in KINDS:
        gs = spec.groups(kind)
        assert _is_partition(gs, world), kind
        assert len({len(g) for g in gs}) == 1, kind              # equal sizes
    for r in range(world):
        c = spec.coords(r)
        assert r == c["pp_rank"] * spec.dp + c["edp_rank"] * spec.ep + c["ep_rank"]
        assert r == c["node"] * gpn + c["local_rank"]
        ep_group = spec.group_of("expert", r)
        assert len(ep_group) == spec.ep and ep_group.index(r) == c["ep_rank"]
        assert all(spec.coords(q)["pp_rank"] == c["pp_rank"] for q in spec.group_of("data", r))
        inter_node = spec.group_of("inter_node", r)
        assert [spec.coords(q)["local_rank"] for q in inter_node] == [c["local_rank"]] * spec.num_nodes
        assert {q // gpn for q in spec.group_of("intra_node", r)} == {c["node"]}
        # the EP hops: ep_intra = the expert group's ranks on this node, ep_inter = same in-node index
        intra, inter = spec.group_of("ep_intra", r), spec.group_of("ep_inter", r)
        assert set(intra) <= set(ep_group) and {q // gpn for q in intra} == {c["node"]}
        assert len(intra) == spec.ep_ranks_per_node and intra.index(r) == c["ep_local"]
        assert set(inter) <= set(ep_group) and len(inter) == spec.ep_nodes and inter.index(r) == c["ep_node"]
        assert len({q // gpn for q in inter}) == len(inter)      # one rank per node


def test_expected_layout_8_ranks():
    spec = MeshSpec(8, gpus_per_node=2, pp=2, ep=2)
    assert (spec.dp, spec.edp, spec.num_nodes) == (4, 2, 4)
    assert spec.groups("pipeline") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert spec.groups("data") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert spec.groups("expert") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert spec.groups("expert_data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert spec.groups("inter_node") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    text = spec.describe()
    assert "ep=2" in text and "inter_node" in text and repr(spec).startswith("MeshSpec(")


@pytest.mark.parametrize("kwargs,field", [
    (dict(world_size=6, gpus_per_node=4), "gpus_per_node"),
    (dict(world_size=8, gpus_per_node=2, pp=3), "pp"),
    (dict(world_size=8, gpus_per_node=2, ep=3), "ep"),
    (dict(world_size=12, gpus_per_node=4, ep=6), "ep"),      # 6 neither divides nor is a multiple of 4
    (dict(world_size=0, gpus_per_node=1), "world_size"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"MeshSpec.{field}"):
        MeshSpec(**kwargs)


def test_single_process_mesh_and_epcomm():
    m = build_mesh(MeshSpec(1, 1), 0)
    assert m.expert_group is None and m.expert_comm().size == 1
    assert "MeshSpec" in repr(m)
    with pytest.raises(ValueError, match="EPComm.rank"):
        EPComm(rank=2, size=2, ranks_per_node=1)
    with pytest.raises(ValueError, match="ranks_per_node"):
        EPComm(rank=0, size=4, ranks_per_node=3)


# ------------------------------------------------------------------------------ real gloo groups
def _worker(rank, world, gpn, pp, ep, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=45))
    env = {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_WORLD_SIZE": str(gpn)}
    mesh = Mesh.from_env(pp=pp, ep=ep, env=env)
    res = {}
    for kind in KINDS:               # all-reduce the ranks over each group: the sum of its members
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=getattr(mesh, f"{kind}_group"))
        res[kind] = [float(t), sum(mesh.ranks[kind])]
    comm = mesh.expert_comm()
    res["comm"] = [comm.rank, comm.size, comm.node, comm.local, comm.num_nodes]
    res["coords"] = mesh.coords
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def _run(world, gpn, pp, ep, out, timeout=60.0):
    return spawn_ranks(_worker, (world, gpn, pp, ep, free_port(), out), world, out, timeout)


@pytest.mark.slow   # every multi-rank test builds its groups through the Mesh; this checks them one by one
@pytest.mark.parametrize("world,gpn,pp,ep", [(4, 2, 1, None), (8, 2, 2, 2)])
def test_gloo_groups(tmp_path, world, gpn, pp, ep):
    res = _run(world, gpn, pp, ep, str(tmp_path / "mesh.json"))
    spec = MeshSpec(world, gpn, pp, ep)
    for rank, r in enumerate(res):
        for kind in KINDS:
            got, expected = r[kind]
            assert got == expected, (rank, kind)
        c = spec.coords(rank)
        assert r["comm"] == [c["ep_rank"], spec.ep, c["ep_node"], c["ep_local"], spec.ep_nodes]
        assert r["coords"] == c
