"""Hardware catalogue for the planner: GPUs and clusters (SPEC §7).

Every figure is a *nominal* datasheet number (dense tensor-core peak, no sparsity; per-direction link
bandwidth per GPU). How much of it a real kernel reaches is an efficiency in
:class:`dsv3.plan.assumptions.Assumptions`, never baked in here.

Extend the catalogue with a JSON (or YAML, when PyYAML is installed) file::

    {"my-gpu": {"bf16_tflops": 500, "fp8_tflops": 1000, "hbm_gbps": 2000, "hbm_gb": 96,
                "nvlink_gbps": 300, "nic_gbps": 50, "sms": 100, "gpus_per_node": 8}}

(a mapping of name → fields, or a list of objects with a ``name`` field). A file entry with the name of
a built-in GPU replaces it; unknown fields are rejected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float          # dense BF16 tensor-core peak
    fp8_tflops: float | None    # dense FP8 peak; None = no FP8 tensor cores
    hbm_gbps: float             # HBM bandwidth, GB/s
    hbm_gb: float               # HBM capacity, GB (10^9 bytes)
    nvlink_gbps: float          # NVLink bandwidth per GPU, per direction, GB/s
    nic_gbps: float             # scale-out NIC (InfiniBand/RoCE) per GPU, per direction, GB/s
    sms: int                    # streaming multiprocessors
    gpus_per_node: int = 8
    note: str = ""

    def __post_init__(self) -> None:
        for f in ("bf16_tflops", "hbm_gbps", "hbm_gb", "nvlink_gbps", "nic_gbps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"GPU {self.name!r}: {f} = {v!r} must be a positive number")
        v = self.fp8_tflops
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise ValueError(f"GPU {self.name!r}: fp8_tflops = {v!r} must be a positive number or null (no FP8)")
        if not isinstance(self.note, str):
            raise ValueError(f"GPU {self.name!r}: note = {self.note!r} must be a string")
        for f in ("sms", "gpus_per_node"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"GPU {self.name!r}: {f} = {v!r} must be a positive integer")

    def peak_tflops(self, precision: str) -> float:
        """Dense peak of the tensor cores for ``precision`` ("bf16" | "fp8")."""
        if precision == "bf16":
            return self.bf16_tflops
        if precision == "fp8":
            if self.fp8_tflops is None:
                raise ValueError(f"{self.name} has no FP8 tensor cores; use --precision bf16")
            return self.fp8_tflops
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Datasheet figures (dense, no sparsity). NVLink: per direction (half the bidirectional number).
CATALOGUE: dict[str, GPU] = {g.name: g for g in (
    GPU("h800", bf16_tflops=989.4, fp8_tflops=1978.9, hbm_gbps=3350, hbm_gb=80, nvlink_gbps=200,
        nic_gbps=50, sms=132, gpus_per_node=8,
        note="H100 SXM compute with NVLink cut to 400 GB/s bidirectional (160 GB/s achievable, "
             "SPEC §7); 400 Gb/s InfiniBand per GPU. DeepSeek-V3's training cluster."),
    GPU("h100", bf16_tflops=989.4, fp8_tflops=1978.9, hbm_gbps=3350, hbm_gb=80, nvlink_gbps=450,
        nic_gbps=50, sms=132, gpus_per_node=8, note="H100 SXM5, NVLink 4 (900 GB/s bidirectional), 400 Gb/s NIC"),
    GPU("h200", bf16_tflops=989.4, fp8_tflops=1978.9, hbm_gbps=4800, hbm_gb=141, nvlink_gbps=450,
        nic_gbps=50, sms=132, gpus_per_node=8, note="H200 SXM, HBM3e 141 GB"),
    GPU("a100", bf16_tflops=312.0, fp8_tflops=None, hbm_gbps=2039, hbm_gb=80, nvlink_gbps=300,
        nic_gbps=25, sms=108, gpus_per_node=8, note="A100 SXM4 80GB, NVLink 3, 200 Gb/s HDR NIC, no FP8"),
    GPU("b200", bf16_tflops=2250.0, fp8_tflops=4500.0, hbm_gbps=8000, hbm_gb=180, nvlink_gbps=900,
        nic_gbps=50, sms=148, gpus_per_node=8, note="HGX B200, NVLink 5 (1.8 TB/s bidirectional), 400 Gb/s NIC"),
)}

_FIELDS = {f.name for f in dataclasses.fields(GPU)}


def load_hardware_file(path: str | os.PathLike) -> dict[str, GPU]:
    """GPUs described in a JSON or YAML file (see the module docstring for the format)."""
    from ..errors import read_text

    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"hardware file not found: {p}")
    text = read_text(p, "hardware file")
    if p.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{p}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from None
        try:
            data = yaml.safe_load(text)     # safe_load: tags such as !!python/… are refused, never run
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise ValueError(f"hardware file {p} is not plain YAML{at}: "
                             f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
    if isinstance(data, dict):
        for k, v in data.items():
            if not isinstance(v, dict):
                raise ValueError(f"hardware file {p}: GPU {k!r} must be a mapping of its fields "
                                 f"(bf16_tflops, hbm_gb, …), found {type(v).__name__} {v!r}"[:300])
        entries = [dict(v, name=k) for k, v in data.items()]
    elif isinstance(data, list):
        entries = list(data)
    else:
        raise ValueError(f"{p}: expected a mapping name -> GPU fields, or a list of GPU objects")
    out = {}
    for e in entries:
        if not isinstance(e, dict) or "name" not in e:
            raise ValueError(f"{p}: every GPU entry needs a 'name' and its fields")
        unknown = set(e) - _FIELDS
        if unknown:
            raise ValueError(f"{p}: GPU {e['name']!r} has unknown fields {sorted(unknown)}; "
                             f"known: {sorted(_FIELDS)}")
        name = str(e["name"]).lower()
        try:
            out[name] = GPU(**dict(e, name=name))
        except TypeError as err:
            raise ValueError(f"{p}: GPU {name!r}: {err}") from None
    return out


def catalogue(hardware_file: str | os.PathLike | None = None) -> dict[str, GPU]:
    cat = dict(CATALOGUE)
    if hardware_file:
        cat.update(load_hardware_file(hardware_file))
    return cat


def get_gpu(name: str, hardware_file: str | os.PathLike | None = None) -> GPU:
    cat = catalogue(hardware_file)
    key = name.lower()
    if key not in cat:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(sorted(cat))} "
                         "(add one with --hardware-file)")
    return cat[key]


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    nodes: int

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, int) or self.nodes <= 0:
            raise ValueError(f"a cluster needs a positive whole number of nodes, got {self.nodes!r}")

    @property
    def gpus_per_node(self) -> int:
        return self.gpu.gpus_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpu.gpus_per_node

    @classmethod
    def of_gpus(cls, gpu: GPU, gpus: int) -> "Cluster":
        if not isinstance(gpus, int) or gpus <= 0:
            raise ValueError(f"--gpus must be a positive integer, got {gpus!r}")
        if gpus % gpu.gpus_per_node:
            raise ValueError(f"--gpus {gpus} is not a whole number of {gpu.name} nodes "
                             f"({gpu.gpus_per_node} GPUs per node)")
        return cls(gpu, gpus // gpu.gpus_per_node)

    def to_dict(self) -> dict:
        return {"gpu": self.gpu.name, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "gpus": self.gpus}
