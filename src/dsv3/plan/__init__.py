"""The planner (SPEC §2, §3, §7): size a DeepSeek-V3-style training run or deployment for a cluster.

    from dsv3 import ModelConfig
    from dsv3.plan import Assumptions, Cluster, Layout, get_gpu, plan_serving, plan_training
    cfg = ModelConfig.preset("deepseek-v3")
    r = plan_training(cfg, Cluster.of_gpus(get_gpu("h800"), 2048), Layout(gpus=2048, pp=16, ep=64))
    r["gpu_hours_per_trillion_tokens"], r["memory_per_gpu_gb"], r["mfu"]
    plan_serving(cfg, get_gpu("h800"), "decode")["tokens_per_s_per_node"]

Command line: ``dsv3 plan --help``. Every efficiency factor is a field of :class:`Assumptions`.
"""

from .assumptions import Assumptions
from .comm import EPTraffic, ep_traffic, expected_units_hit
from .flops import TokenWork, parameter_bytes, token_work
from .hardware import CATALOGUE, GPU, Cluster, get_gpu, load_hardware_file
from .schedules import SCHEDULES, ScheduleModel, schedule_model
from .serve import REPORT_UNITS, ServeUnit, plan_serving
from .train import Layout, plan_training, stage_blocks, validate_layout

__all__ = ["Assumptions", "EPTraffic", "ep_traffic", "expected_units_hit", "TokenWork", "parameter_bytes",
           "token_work", "CATALOGUE", "GPU", "Cluster", "get_gpu", "load_hardware_file", "SCHEDULES",
           "ScheduleModel", "schedule_model", "REPORT_UNITS", "ServeUnit", "plan_serving", "Layout",
           "plan_training", "stage_blocks", "validate_layout"]
