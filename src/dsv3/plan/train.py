"""Training step model: memory per GPU, communication, step time, MFU and cost of a layout (SPEC §2).

Layout: ``gpus = PP × DP`` with TP = 1; expert parallelism (EP) runs inside each stage's DP group
(EP divides DP; ``DP/EP`` copies of every expert). ZeRO-1 shards the optimizer state (FP32 master,
BF16 moments) over every copy of a parameter: non-expert weights over ``DP × copies``, experts over
``DP/EP × copies``, where ``copies`` is 2 for DualPipe (a stage lives on ranks r and PP−1−r).

Stages: the model is the sequence of its ``num_hidden_layers`` layers followed by its MTP modules
(they use the output head, so they sit with it); the embedding is on the first stage, final norm and
head on the last. The blocks are split by the pipeline runtime's own rule
(``parallel.pipeline.schedule.split_layers``): when they do not divide evenly (V3: 61 + 1 MTP = 62
blocks on 16 stages) each stage gets ``ceil(blocks / stages)`` except ``stages·ceil − blocks`` of them
which get one fewer: first the last stage (head + MTP), then the first (embedding), then alternately
inward. V3 on PP16: stage 0 and stage 15 take 3 blocks, stages 1–14 take 4. ``layer_split`` overrides
this (a what-if: the runtime always uses the rule).

Step time of the slowest pipeline rank::

    step = compute (its chunks, all micro-batches, at the Assumptions' efficiencies)
         + bubble (Table 2 closed form with that rank's F, B, W)
         + exposed all-to-all and p2p (everything for 1F1B/ZB1P; for DualPipe(V) the unpaired
           warm-up/cool-down chunks, plus whatever a pair's communication exceeds its computation)
         + exposed DP reduce-scatter/all-gather + optimizer step
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..parallel.pipeline.schedule import split_layers
from .activations import (RECOMPUTE, block_activation_bytes, block_elementwise_bytes, block_recompute_bytes,
                          block_transient_bytes, head_activation_bytes)
from .assumptions import Assumptions
from .comm import EPTraffic, ep_traffic
from .flops import Block, fp8_weight_bytes, head_linear, model_blocks, token_work
from .hardware import CATALOGUE, GPU, Cluster
from .schedules import ScheduleModel, schedule_model

GB = 1e9
REPORT_GPU_HOURS_PER_T = 180e3      # SPEC §7
REPORT_PRETRAIN_GPU_HOURS = 2.664e6  # 14.8T tokens
REPORT_TOKENS = 14.8e12


@dataclass
class Layout:
    gpus: int
    pp: int
    ep: int
    tp: int = 1
    seq_len: int = 4096
    global_batch: int = 15360        # sequences per optimizer step
    micro_batch: int = 1             # sequences per micro-batch
    schedule: str = "dualpipe"
    precision: str = "fp8"
    recompute: str = "report"
    zero: int = 1                    # 0: replicated optimizer state, 1: ZeRO-1
    topk_group: int | None = None    # routing groups per token; None = the config's (node-limited)
    layer_split: tuple[int, ...] | None = None

    @property
    def dp(self) -> int:
        return self.gpus // (self.pp * self.tp)

    @property
    def microbatches(self) -> int:
        """Micro-batches per pipeline per step."""
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def tokens_per_microbatch(self) -> int:
        return self.micro_batch * self.seq_len


def validate_layout(cfg: ModelConfig, cluster: Cluster, lay: Layout) -> ScheduleModel:
    """Raise ValueError with the reason if the layout is impossible; return its schedule model."""
    def pos(name, v):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    for name in ("gpus", "pp", "ep", "tp", "seq_len", "global_batch", "micro_batch"):
        pos(name, getattr(lay, name))
    if lay.gpus != cluster.gpus:
        raise ValueError(f"layout has {lay.gpus} GPUs but the cluster has {cluster.gpus}")
    if lay.tp != 1:
        raise ValueError("the training planner models TP = 1 (DeepSeek-V3 trains without tensor parallelism)")
    if lay.precision not in ("fp8", "bf16"):
        raise ValueError(f"precision must be 'fp8' or 'bf16', got {lay.precision!r}")
    cluster.gpu.peak_tflops(lay.precision)  # raises if the GPU has no FP8
    if lay.recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {lay.recompute!r}")
    if lay.zero not in (0, 1):
        raise ValueError(f"zero must be 0 or 1 (ZeRO-1), got {lay.zero!r}")
    if lay.gpus % lay.pp:
        raise ValueError(f"{lay.gpus} GPUs do not split into PP {lay.pp} stages (PP must divide the GPU count)")
    dp = lay.dp
    if cfg.n_routed_experts and cfg.n_routed_experts % lay.ep:
        raise ValueError(f"EP {lay.ep} does not divide the {cfg.n_routed_experts} routed experts")
    if dp % lay.ep:
        raise ValueError(f"EP {lay.ep} must divide DP = gpus / PP = {dp} (experts are sharded inside a stage)")
    gpn = cluster.gpus_per_node
    if lay.ep > gpn and lay.ep % gpn:
        raise ValueError(f"EP {lay.ep} spans nodes, so it must be a multiple of {gpn} GPUs per node")
    if lay.ep < gpn and gpn % lay.ep:
        raise ValueError(f"EP {lay.ep} must divide the {gpn} GPUs of a node")
    if lay.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {lay.seq_len} exceeds the model's {cfg.max_position_embeddings} positions")
    if lay.global_batch % (dp * lay.micro_batch):
        raise ValueError(f"batch size {lay.global_batch} sequences is not a whole number of micro-batches "
                         f"of {lay.micro_batch} on each of DP = {dp} pipelines")
    if lay.topk_group is not None and not 1 <= lay.topk_group <= cfg.n_group:
        raise ValueError(f"routing groups per token must be in 1..{cfg.n_group}, got {lay.topk_group}")
    sched = schedule_model(lay.schedule, lay.pp, lay.microbatches)
    n_blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if lay.layer_split is None and n_blocks < sched.num_stages:
        raise ValueError(f"{sched.num_stages} pipeline stages but only {n_blocks} layers "
                         f"(+MTP) to place: lower PP")
    return sched


def stage_blocks(cfg: ModelConfig, n_stages: int, explicit: tuple[int, ...] | None = None) -> list[int]:
    """Blocks (layers, and MTP modules on the last stage) per stage: the runtime's split
    (``parallel.pipeline.schedule.split_layers``), or ``explicit`` (``layer_split``) as given."""
    n_blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if explicit is not None:
        explicit = list(explicit)
        if len(explicit) != n_stages:
            raise ValueError(f"layer split has {len(explicit)} entries for {n_stages} stages")
        if any((not isinstance(x, int)) or x < 0 for x in explicit) or sum(explicit) != n_blocks:
            raise ValueError(f"layer split {explicit} must be non-negative integers summing to {n_blocks} "
                             "(layers + MTP modules)")
        if explicit[-1] < cfg.num_nextn_predict_layers:
            raise ValueError(f"layer split {explicit}: the last stage holds the head and the "
                             f"{cfg.num_nextn_predict_layers} MTP modules, so it needs at least that many blocks")
        return explicit
    sizes = [len(r) for r in split_layers(cfg.num_hidden_layers, n_stages, cfg.num_nextn_predict_layers)]
    sizes[-1] += cfg.num_nextn_predict_layers
    return sizes


@dataclass
class StageCost:
    """Per-token quantities of one pipeline stage on one of its GPUs."""

    index: int
    layers: list[str]
    embedding: bool
    head: bool
    params_non_expert: float = 0.0
    params_expert: float = 0.0          # routed experts held by this GPU
    params_fp8_linear: float = 0.0      # FP8-capable Linear weights held by this GPU
    activation_bytes: float = 0.0       # kept per token
    transient_bytes: float = 0.0        # largest one-block working set per token
    model_flops: float = 0.0            # per token, forward + 2x backward
    t_fwd: float = 0.0                  # seconds per token
    t_bwd_input: float = 0.0
    t_bwd_weight: float = 0.0
    t_recompute: float = 0.0
    moe_layers: int = 0
    t_a2a: float = 0.0                  # all-to-all, forward (backward the same), per token
    ib_bytes: float = 0.0               # per token, forward
    nvlink_bytes: float = 0.0

    @property
    def params(self) -> float:
        return self.params_non_expert + self.params_expert

    @property
    def t_compute(self) -> float:
        return self.t_fwd + self.t_bwd_input + self.t_bwd_weight + self.t_recompute


class _Rates:
    def __init__(self, gpu: GPU, lay: Layout, a: Assumptions, sm_frac: float):
        bf16 = gpu.bf16_tflops * 1e12
        self.linear = (gpu.peak_tflops("fp8") * 1e12 * a.fp8_gemm_efficiency if lay.precision == "fp8"
                       else bf16 * a.bf16_gemm_efficiency) * sm_frac
        self.bf16 = bf16 * a.bf16_gemm_efficiency * sm_frac
        self.attn = bf16 * a.attention_efficiency * sm_frac
        self.hbm = gpu.hbm_gbps * 1e9 * a.hbm_efficiency


def _stage_cost(cfg: ModelConfig, idx: int, blocks: list[Block], *, embedding: bool, head: bool,
                lay: Layout, a: Assumptions, rates: _Rates, traffic: EPTraffic | None,
                ib_bw: float, nvl_bw: float) -> StageCost:
    fp8 = lay.precision == "fp8"
    imb = a.expert_load_imbalance
    st = StageCost(idx, [f"{b.kind}{b.index}" for b in blocks], embedding, head)
    hl = head_linear(cfg)
    head_passes = (1 if head else 0) + sum(b.head_passes for b in blocks)
    for b in blocks:
        for lin in b.linears:
            if lin.routed:
                st.params_expert += lin.params / lay.ep
            else:
                st.params_non_expert += lin.params
            if lin.fp8:
                st.params_fp8_linear += lin.params / (lay.ep if lin.routed else 1)
        st.params_non_expert += b.other_params
        acts = block_activation_bytes(cfg, b, fp8=fp8, recompute=lay.recompute, expert_load=imb)
        st.activation_bytes += sum(acts.values())
        st.transient_bytes = max(st.transient_bytes, block_transient_bytes(cfg, b, expert_load=imb))
        lin_f = b.gemm_fwd_flops(fp8=True, routed=False) + imb * b.gemm_fwd_flops(fp8=True, routed=True)
        bf_f = b.gemm_fwd_flops(fp8=False)
        t_lin = lin_f / rates.linear + bf_f / rates.bf16
        ew = block_elementwise_bytes(cfg, b, fp8=fp8, expert_load=imb) / rates.hbm
        st.t_fwd += t_lin + b.attn_fwd_flops / rates.attn + ew
        st.t_bwd_input += (t_lin + a.flash_backward_flops_ratio * b.attn_fwd_flops / rates.attn
                           + a.backward_elementwise_ratio * ew)
        st.t_bwd_weight += t_lin
        if lay.recompute == "report":
            st.t_recompute += (b.gemm_fwd_flops(up_projection=True) / rates.linear
                               + block_recompute_bytes(cfg, b, fp8=fp8, expert_load=imb) / rates.hbm)
        elif lay.recompute == "full":
            st.t_recompute += t_lin + b.attn_fwd_flops / rates.attn + ew
        st.model_flops += 3.0 * (b.gemm_fwd_flops() + b.attn_fwd_flops)
        if b.has_moe and traffic is not None:
            st.moe_layers += 1
            st.ib_bytes += imb * traffic.ib_bytes_per_token
            st.nvlink_bytes += imb * traffic.nvlink_bytes_per_token
    if embedding:
        st.params_non_expert += cfg.vocab_size * cfg.hidden_size
    if head:
        st.params_non_expert += hl.params + cfg.hidden_size          # head + final norm
        st.activation_bytes += head_activation_bytes(cfg) * head_passes
    if head_passes:
        t_head = head_passes * hl.fwd_flops / rates.bf16
        # chunked cross-entropy: write the logits (BF16) and read them back, forward and backward
        t_loss = head_passes * 4 * 2.0 * cfg.vocab_size / rates.hbm
        st.t_fwd += t_head + t_loss / 2
        st.t_bwd_input += t_head + t_loss / 2
        st.t_bwd_weight += t_head
        st.model_flops += 3.0 * head_passes * hl.fwd_flops
    st.t_a2a = max(st.ib_bytes / ib_bw if ib_bw else 0.0, st.nvlink_bytes / nvl_bw)
    return st


def plan_training(cfg: ModelConfig, cluster: Cluster, lay: Layout, a: Assumptions | None = None,
                  tokens: float = REPORT_TOKENS, model_name: str | None = None) -> dict:
    """The whole training estimate as a JSON-ready dict (see docs/planner.md for every key)."""
    a = a or Assumptions()
    sched = validate_layout(cfg, cluster, lay)
    gpu, gpn = cluster.gpu, cluster.gpus_per_node
    P, N, dp, T_mb = lay.pp, lay.microbatches, lay.dp, lay.tokens_per_microbatch
    fp8 = lay.precision == "fp8"
    sm_frac = (gpu.sms - a.comm_sms) / gpu.sms if sched.overlaps_comm else 1.0
    if sm_frac <= 0:
        raise ValueError(f"comm_sms {a.comm_sms} leaves no SMs of {gpu.sms} for computation")
    rates = _Rates(gpu, lay, a, sm_frac)
    ib_bw = gpu.nic_gbps * 1e9 * a.ib_efficiency
    nvl_bw = gpu.nvlink_gbps * 1e9 * a.nvlink_efficiency
    blocks = model_blocks(cfg, lay.seq_len)
    traffic = (ep_traffic(cfg, lay.ep, gpn, fp8_dispatch=fp8, topk_group=lay.topk_group)
               if any(b.has_moe for b in blocks) else None)

    # ---- stages
    sizes = stage_blocks(cfg, sched.num_stages, lay.layer_split)
    stages, start = [], 0
    for s, n in enumerate(sizes):
        stages.append(_stage_cost(cfg, s, blocks[start:start + n], embedding=(s == 0),
                                  head=(s == sched.num_stages - 1), lay=lay, a=a, rates=rates,
                                  traffic=traffic, ib_bw=ib_bw, nvl_bw=nvl_bw))
        start += n
    # MTP needs the embedding of the shifted tokens: with 1F1B/ZB1P the last stage keeps a copy
    mtp_embed_copy = cfg.num_nextn_predict_layers > 0 and sched.name in ("1f1b", "zb1p") and P > 1
    # pipeline neighbours are on other nodes when a stage fills whole nodes
    p2p_bw = ib_bw if dp >= gpn else nvl_bw
    t_p2p = 2.0 * cfg.hidden_size / p2p_bw if P > 1 else 0.0   # per token, one direction (BF16)

    # ---- per rank
    copies = 2 if sched.name == "dualpipe" else 1
    passes = sched.chunk_passes_per_microbatch
    ranks = []
    for r in range(P):
        held = [stages[s] for s in sched.rank_stages(r)]
        n_held = len(held)
        mean = lambda f: sum(f(s) for s in held) / n_held  # noqa: E731  per-chunk average
        compute = sum(passes * N * T_mb * s.t_compute for s in held)
        F = T_mb * mean(lambda s: s.t_fwd)
        W = T_mb * mean(lambda s: s.t_bwd_weight)
        B = T_mb * mean(lambda s: s.t_bwd_input + s.t_recompute) + W
        bubble = sched.bubble(F, B, W)
        # communication of one chunk pass (forward; backward the same): all-to-all + p2p send
        c_chunk = T_mb * mean(lambda s: s.t_a2a + t_p2p)
        execs = sched.chunk_executions
        if sched.overlaps_comm:
            unpaired = sched.unpaired_chunks
            pairs = execs - unpaired
            exposed = 2 * unpaired * c_chunk + pairs * max(0.0, 2 * c_chunk - (F + B))
        else:
            exposed = 2 * execs * c_chunk
        p_ne = sum(s.params_non_expert for s in held) + (
            cfg.vocab_size * cfg.hidden_size if mtp_embed_copy and r == P - 1 else 0)
        p_e = sum(s.params_expert for s in held)
        p_fp8 = sum(s.params_fp8_linear for s in held)
        # ZeRO-1 groups: every copy of a parameter
        g_ne, g_e = dp * copies, (dp // lay.ep) * copies
        shard = (p_ne / g_ne + p_e / g_e) if lay.zero == 1 else (p_ne + p_e)
        mem = {
            "weights (bf16 working copy)": a.working_weight_bytes * (p_ne + p_e),
            "weights (fp8 copy of Linears)": fp8_weight_bytes(p_fp8) if fp8 and a.fp8_weight_cache else 0.0,
            "gradients (fp32)": a.grad_bytes * (p_ne + p_e),
            "master weights (fp32)": a.master_weight_bytes * shard,
            "adam moments (bf16)": 2 * a.adam_moment_bytes * shard,
            "activations": sched.peak_inflight_rank(r) * T_mb * mean(lambda s: s.activation_bytes),
            "transient (one block's backward)": T_mb * max(s.transient_bytes for s in held),
            "runtime overhead": a.runtime_overhead_gb * GB,
        }
        # DP: reduce-scatter gradients, all-gather updated weights, once per step
        def ring(n, count):
            return (n - 1) / n * count * (a.grad_reduce_bytes + a.param_gather_bytes) if n > 1 else 0.0
        dp_bytes = ring(g_ne, p_ne) + ring(g_e, p_e)
        dp_bw = nvl_bw if (dp <= gpn and copies == 1) else ib_bw
        t_dp = dp_bytes / dp_bw
        # optimizer: read master, grad, m, v; write master, m, v, bf16 weight; re-quantise FP8 copies
        opt_bytes = shard * (2 * a.master_weight_bytes + a.grad_bytes + 4 * a.adam_moment_bytes
                             + a.working_weight_bytes)
        if fp8 and a.fp8_weight_cache:
            opt_bytes += p_fp8 * (a.working_weight_bytes + 1)
        t_opt = opt_bytes / rates.hbm
        total = compute + bubble + exposed + (1 - a.dp_comm_overlap) * t_dp + t_opt
        ranks.append({
            "rank": r, "stages": [s.index for s in held], "layers": sum((s.layers for s in held), []),
            "params": p_ne + p_e, "params_non_expert": p_ne, "params_expert": p_e,
            "memory_gb": {k: v / GB for k, v in mem.items()}, "memory_total_gb": sum(mem.values()) / GB,
            "time_s": {"compute": compute, "bubble": bubble, "exposed_ep_and_p2p": exposed,
                       "dp_comm_exposed": (1 - a.dp_comm_overlap) * t_dp, "optimizer": t_opt, "total": total},
            "chunk_s": {"F": F, "B": B, "W": W, "comm_per_chunk_pass": c_chunk},
            "dp_comm_bytes": dp_bytes,
            # forward + backward, every micro-batch through this rank's MoE layers (busiest GPU)
            "ep_ib_bytes": sum(2 * passes * N * T_mb * s.ib_bytes for s in held),
            "ep_nvlink_bytes": sum(2 * passes * N * T_mb * s.nvlink_bytes for s in held),
        })
    worst = max(ranks, key=lambda x: x["time_s"]["total"])
    mem_worst = max(ranks, key=lambda x: x["memory_total_gb"])
    step = worst["time_s"]["total"]
    tokens_per_step = lay.global_batch * lay.seq_len
    tps = tokens_per_step / step
    tw = token_work(cfg, lay.seq_len)
    peak = gpu.peak_tflops(lay.precision) * 1e12
    mfu = tw.model_flops * tps / (lay.gpus * peak)
    gph_T = 1e12 / tps * lay.gpus / 3600 / a.goodput
    total_gph = gph_T * tokens / 1e12

    ep_block = None
    if traffic is not None:
        ep_block = {
            **traffic.to_dict(),
            "routing": ("node-limited" if traffic.max_groups < cfg.n_group else "unrestricted")
                       + f" (M = {traffic.max_groups} of {cfg.n_group} groups)",
            "ib_gbps_effective": ib_bw / 1e9, "nvlink_gbps_effective": nvl_bw / 1e9,
            "per_gpu_per_step_slowest_rank": {"ib_bytes": worst["ep_ib_bytes"],
                                              "nvlink_bytes": worst["ep_nvlink_bytes"]},
        }
    pp_bytes = sched.chunk_executions * 2 * T_mb * 2 * cfg.hidden_size if P > 1 else 0.0

    out = {
        "model": model_name or "custom",
        "mode": "train",
        "gpu_hours_per_trillion_tokens": gph_T,
        "memory_per_gpu_gb": mem_worst["memory_total_gb"],
        "memory_capacity_gb": gpu.hbm_gb,
        "over_capacity": mem_worst["memory_total_gb"] > gpu.hbm_gb,
        "mfu": mfu,
        "mfu_vs_bf16_peak": tw.model_flops * tps / (lay.gpus * gpu.bf16_tflops * 1e12),
        "mfu_vs_fp8_peak": (tw.model_flops * tps / (lay.gpus * gpu.fp8_tflops * 1e12)) if gpu.fp8_tflops else None,
        "tokens_per_second": tps,
        "tokens_per_second_per_gpu": tps / lay.gpus,
        "step_time_s": step,
        "tokens": tokens,
        "gpu_hours_total": total_gph,
        "days": total_gph / lay.gpus / 24,
        "dollars": total_gph * a.dollars_per_gpu_hour,
        "layout": {**asdict(lay), "dp": dp, "microbatches_per_step": N, "tokens_per_microbatch": T_mb,
                   "tokens_per_step": tokens_per_step, "ep_nodes": (traffic.ep_nodes if traffic else 0),
                   "experts_per_gpu": cfg.n_routed_experts // lay.ep,
                   "expert_copies": dp // lay.ep, "cluster": cluster.to_dict()},
        "schedule": {**sched.to_dict(), "sm_fraction_for_compute": sm_frac},
        "stage_split": {"blocks_per_stage": sizes, "rule": "ceil; the head/MTP stage, then the embedding "
                        "stage, then alternately inward take one fewer" if lay.layer_split is None
                        else "explicit", "mtp_embedding_copy_on_last_stage": mtp_embed_copy},
        "flops": {**tw.to_dict(), "model_flops_per_step": tw.model_flops * tokens_per_step,
                  "peak_tflops": peak / 1e12},
        "memory": {"worst_rank": mem_worst["rank"], "breakdown_gb": mem_worst["memory_gb"],
                   "per_rank_gb": [round(x["memory_total_gb"], 2) for x in ranks]},
        "communication": {"ep_all_to_all": ep_block,
                          "pipeline_p2p": {"bytes_per_token_per_boundary": 2 * 2 * cfg.hidden_size,
                                           "bytes_per_gpu_per_step": pp_bytes,
                                           "link": "ib" if p2p_bw == ib_bw else "nvlink"},
                          "dp": {"bytes_per_gpu_per_step_worst_rank": worst["dp_comm_bytes"],
                                 "zero1_groups": {"non_expert": dp * copies, "expert": (dp // lay.ep) * copies}}},
        "step_time": {"slowest_rank": worst["rank"], "breakdown_s": worst["time_s"],
                      "chunk_s": worst["chunk_s"],
                      "per_rank_total_s": [round(x["time_s"]["total"], 4) for x in ranks]},
        "stages": [{"stage": s.index, "layers": s.layers, "embedding": s.embedding, "head": s.head,
                    "params_per_gpu": s.params, "activation_bytes_per_token": s.activation_bytes,
                    "compute_us_per_token": 1e6 * s.t_compute, "a2a_us_per_token": 1e6 * s.t_a2a}
                   for s in stages],
        "ranks": ranks,
        "assumptions": a.to_dict(),
        "warnings": [],
    }
    if out["over_capacity"]:
        out["warnings"].append(
            f"rank {mem_worst['rank']} needs {mem_worst['memory_total_gb']:.1f} GB, more than the "
            f"{gpu.hbm_gb:g} GB of a {gpu.name}: this layout does not fit")
    if cfg == ModelConfig.preset("deepseek-v3"):
        # the report's figures were measured on H800: its implied MFU uses H800 peaks, whatever GPU is planned
        h800 = CATALOGUE["h800"]
        wall = REPORT_GPU_HOURS_PER_T * 3600                       # GPU-seconds per 1e12 tokens
        out["reference"] = {
            "report_gpu_hours_per_trillion_tokens": REPORT_GPU_HOURS_PER_T,
            "ratio_to_report": gph_T / REPORT_GPU_HOURS_PER_T,
            "report_pretraining_gpu_hours_14.8T": REPORT_PRETRAIN_GPU_HOURS,
            "planner_gpu_hours_14.8T": gph_T * REPORT_TOKENS / 1e12,
            "implied_mfu_fp8_peak": tw.model_flops * 1e12 / (wall * h800.fp8_tflops * 1e12),
            "implied_mfu_bf16_peak": tw.model_flops * 1e12 / (wall * h800.bf16_tflops * 1e12),
            "implied_step_mfu_fp8_peak_at_goodput": tw.model_flops * 1e12 / (wall * a.goodput * h800.fp8_tflops * 1e12),
        }
    return out
