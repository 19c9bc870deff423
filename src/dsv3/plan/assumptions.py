"""Every efficiency factor and storage choice the planner uses, with its default and why.

Nothing in the planner multiplies by a number that is not either a model dimension, a hardware
datasheet figure (:mod:`dsv3.plan.hardware`), a layout choice, or a field of :class:`Assumptions`.
Override any field from the command line with ``--assume NAME=VALUE``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _a(default, why: str):
    return field(default=default, metadata={"why": why})


@dataclass
class Assumptions:
    # ---------------------------------------------------------------- compute efficiency
    fp8_gemm_efficiency: float = _a(0.55, (
        "fraction of the dense FP8 peak reached by the FP8 Linears (1x128 activation / 128x128 weight "
        "scales, FP32 promotion every 128 K), averaged over Fprop, Dgrad and Wgrad. DeepGEMM on H800 "
        "(SPEC §2.3) reaches 1265-1426 TFLOPS (0.64-0.72 of 1979) on the largest forward shapes, after "
        "its April-2025 optimisations; its first release (Feb 2025, after V3 was trained) peaked at "
        "~1350 (0.68) on its best shape. V3 also runs small-K shapes (wkv_b K=512, wq_b K=1536, expert "
        "down-projections K=2048), a narrow one (wkv_a N=576), and Dgrad/Wgrad GEMMs whose operands are "
        "first transposed and re-quantised (DeepGEMM shipped Wgrad kernels only in May 2025): 0.55 "
        "(~1090 TFLOPS) for the mix"))
    bf16_gemm_efficiency: float = _a(0.70, (
        "fraction of the dense BF16 peak a large BF16 GEMM (output head, MoE gate, and every Linear in a "
        "BF16 run) reaches: cuBLAS on H100/H800 sustains ~650-750 of 989 TFLOPS on big shapes"))
    attention_efficiency: float = _a(0.40, (
        "fraction of the BF16 peak the attention core (FlashAttention-style, causal, 4K) reaches over its "
        "forward + backward hardware FLOPs. FlashAttention-3 (H100, BF16, head dim 128) reaches ~0.6 "
        "forward and ~0.45 backward: ~0.48 over both. MLA's query/key head dim 192 is not a tuned tile "
        "size; padded to 256 it wastes a third of the score FLOPs (60% of the total): 0.48 / 1.2 = 0.40"))
    flash_backward_flops_ratio: float = _a(2.5, (
        "attention-core backward hardware FLOPs / forward FLOPs: FlashAttention recomputes the scores "
        "(5 matmuls backward vs 2 forward). MFU counts the model's 2x, time uses this"))
    hbm_efficiency: float = _a(0.80, (
        "fraction of HBM bandwidth reached by memory-bound kernels (norms, SwiGLU, FP8 casts, "
        "permutations, optimizer): streaming kernels reach 80-90% on Hopper"))
    backward_elementwise_ratio: float = _a(2.0, (
        "memory traffic of the backward element-wise work / forward's: each forward pass over a tensor "
        "has a backward pass that reads the tensor and its gradient and writes a gradient, plus the "
        "transposed re-quantisation of cached FP8 activations for the Wgrad GEMMs"))
    expert_load_imbalance: float = _a(1.10, (
        "routed-expert work of the busiest GPU / the mean, per layer and micro-batch. The all-to-all "
        "waits for the busiest GPU every layer; the loss-free bias keeps the long-run MaxVio near 0.04 "
        "(SPEC §1.3) but a 64-GPU EP group sees only 64 sequences per micro-batch, whose routing skew "
        "leaves the busiest GPU ~10% above the mean"))
    # ---------------------------------------------------------------- communication
    nvlink_efficiency: float = _a(0.80, (
        "achieved / nominal NVLink bandwidth: H800 nominal 200 GB/s per direction, 160 achievable "
        "(SPEC §7); DeepEP intranode kernels measure 153-158 GB/s"))
    ib_efficiency: float = _a(0.90, (
        "achieved / nominal NIC bandwidth: DeepEP normal kernels measure 43-58 GB/s 'RDMA bandwidth' "
        "on 50 GB/s (400 Gb/s) NICs for EP16-EP64 (SPEC §2.2); take 45 of 50"))
    comm_sms: int = _a(20, (
        "SMs given to the all-to-all kernels while they overlap computation (20 of 132 on H800, SPEC "
        "§2.2); computation then runs on the rest. Only for schedules that overlap (dualpipe, dualpipev)"))
    dp_comm_overlap: float = _a(0.0, (
        "fraction of the once-per-step ZeRO-1 gradient reduce-scatter + parameter all-gather hidden "
        "behind computation. The report does not say it is overlapped, so none"))
    goodput: float = _a(0.90, (
        "fraction of wall-clock GPU time spent in training steps (the rest: checkpointing, evaluation, "
        "restarts after hardware faults, data stalls). Meta reports >90% effective training time for "
        "Llama 3 405B on 16K H100 (466 interruptions in 54 days); DeepSeek publishes none. GPU-hours "
        "and days are wall-clock, so they are divided by this"))
    # ---------------------------------------------------------------- storage (bytes per element)
    working_weight_bytes: float = _a(2, "weights used by forward/backward are BF16 (both precisions)")
    fp8_weight_cache: bool = _a(True, (
        "FP8 runs also keep each Linear's FP8 copy (1 byte + one FP32 scale per 128x128 block), "
        "quantised once per step and reused by all micro-batches; a 128x128 block serves Fprop and "
        "Dgrad alike, so one copy suffices"))
    grad_bytes: float = _a(4, "weight gradients are accumulated in FP32 (report §3.3.3)")
    master_weight_bytes: float = _a(4, "FP32 master weights, sharded by ZeRO-1")
    adam_moment_bytes: float = _a(2, "AdamW first and second moments in BF16 (report §3.3.3), sharded by ZeRO-1")
    grad_reduce_bytes: float = _a(4, "bytes per gradient element in the DP reduce-scatter (FP32)")
    param_gather_bytes: float = _a(2, "bytes per parameter in the ZeRO-1 all-gather of updated weights (BF16)")
    runtime_overhead_gb: float = _a(2.5, (
        "per-GPU memory outside the model state: CUDA context and library workspaces (~1 GB), "
        "DeepEP / NCCL communication buffers (~1-1.5 GB)"))
    # ---------------------------------------------------------------- money
    dollars_per_gpu_hour: float = _a(2.0, "H800 rental price used by the report (SPEC §7)")
    # ---------------------------------------------------------------- serving
    kv_bytes_per_value: int = _a(2, "the MLA latent cache is stored in BF16 (70,272 B/token for V3)")
    mtp_acceptance: float = _a(0.85, "MTP speculative decoding: the second token is accepted 85-90% of the time (SPEC §1.4)")
    serve_prompt_tokens: int = _a(4096, "prompt length for the prefill bound (attention cost grows with it)")
    serve_context_tokens: int = _a(4096, "average context (prompt + generated) held and read per decoding sequence")
    prefill_cache_hit_rate: float = _a(0.563, "share of input tokens served from the on-disk KV cache (DeepSeek day 6)")
    serve_workspace_gb: float = _a(4.0, (
        "per-GPU memory for activations, CUDA graphs and DeepEP buffers while serving, besides weights "
        "and KV cache"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                continue
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"Assumptions.{f.name} = {v!r}: must be a non-negative number")
        for name in ("fp8_gemm_efficiency", "bf16_gemm_efficiency", "attention_efficiency",
                     "hbm_efficiency", "nvlink_efficiency", "ib_efficiency", "goodput"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"Assumptions.{name} = {v!r}: an efficiency must be in (0, 1]")
        for name in ("dp_comm_overlap", "mtp_acceptance"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"Assumptions.{name} = {getattr(self, name)!r}: must be a fraction in [0, 1]")
        if not 0 <= self.prefill_cache_hit_rate < 1:
            raise ValueError(f"Assumptions.prefill_cache_hit_rate = {self.prefill_cache_hit_rate!r}: must be in [0, 1)")
        if self.expert_load_imbalance < 1:
            raise ValueError("Assumptions.expert_load_imbalance must be >= 1 (busiest / mean)")

    def replace(self, **changes) -> "Assumptions":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def explain(cls) -> dict[str, tuple]:
        """name -> (default, why) for every field, for docs and ``--json``."""
        return {f.name: (f.default, f.metadata.get("why", "")) for f in dataclasses.fields(cls)}

    def with_overrides(self, items: list[str] | None) -> "Assumptions":
        """Apply ``NAME=VALUE`` strings (from ``--assume``)."""
        if not items:
            return self
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for item in items:
            if "=" not in item:
                raise ValueError(f"--assume expects NAME=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            k = k.strip()
            if k not in fields:
                raise ValueError(f"--assume: unknown assumption {k!r}; known: {', '.join(sorted(fields))}")
            cur = getattr(self, k)
            try:
                if isinstance(cur, bool):
                    if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    changes[k] = v.lower() in ("true", "1", "yes")
                elif isinstance(cur, int):
                    changes[k] = int(v)
                else:
                    changes[k] = float(v)
                    if changes[k] != changes[k] or changes[k] in (float("inf"), float("-inf")):
                        raise ValueError
            except ValueError:
                raise ValueError(f"--assume {k}: cannot read {v!r} as a finite {type(cur).__name__}") from None
        return self.replace(**changes)
