"""The planner (dsv3.plan): FLOPs, parameter memory and communication bytes against hand-computed
values for the tiny preset, the report's setup against 180K GPU-hours per trillion tokens, the
layout validation, the serving units and the CLI."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import pytest

from dsv3.config import ModelConfig
from dsv3.params import attention_params, layer_params
from dsv3.parallel import pipeline
from dsv3.parallel.pipeline import schedule as pipeline_schedule
from dsv3.parallel.pipeline.schedule import MIN_MICROBATCHES
from dsv3.plan import cli as plan_cli
from dsv3.plan.activations import block_activation_bytes
from dsv3.plan.assumptions import Assumptions
from dsv3.plan.comm import ep_traffic, expected_units_hit
from dsv3.plan.flops import attention_core_fwd_flops, attention_linears, model_blocks, parameter_bytes, token_work
from dsv3.plan.hardware import GPU, Cluster, get_gpu, load_hardware_file
from dsv3.plan import schedules as plan_schedules
from dsv3.plan.schedules import schedule_model
from dsv3.plan.serve import plan_serving
from dsv3.plan.train import Layout, plan_training, stage_blocks

TINY = ModelConfig.preset("tiny")
V3 = ModelConfig.preset("deepseek-v3")
H800 = get_gpu("h800")


# ----------------------------------------------------------------------------------------- FLOPs
def test_tiny_attention_linears_match_params():
    # tiny: d=128, H=4, q_lora 64, kv_lora 32, nope 32, rope 16, v 32
    # wq_a 128*64 + wq_b 64*(4*48) + wkv_a 128*(32+16) + wkv_b 32*(4*(32+32)) + wo (4*32)*128
    lin = sum(l.params for l in attention_linears(TINY))
    assert lin == 8192 + 12288 + 6144 + 8192 + 16384 == 51200
    assert lin + 64 + 32 == attention_params(TINY)        # + q_norm and kv_norm weights


def test_tiny_forward_flops_by_hand():
    seq = 64
    # attention Linears 2*51200; attention core 2*H*(48+32)*ctx with causal ctx = (64+1)/2
    attn_lin, core = 2 * 51200, 2 * 4 * (48 + 32) * 32.5
    assert attention_core_fwd_flops(TINY, seq) == core == 20800
    dense = attn_lin + core + 2 * 3 * 128 * 320                     # SwiGLU 128->320->128
    moe = attn_lin + core + 2 * 128 * 8 + 2 * 2 * 3 * 128 * 64 + 2 * 3 * 128 * 64   # gate, 2 routed, 1 shared
    mtp = 2 * 256 * 128 + moe                                        # eh_proj (2d->d) + a MoE block
    head = 2 * 128 * 2048
    tw = token_work(TINY, seq)
    assert tw.forward == dense + 2 * moe + mtp + 2 * head == 2_301_184   # head runs for main + MTP
    assert tw.model_flops == 3 * 2_301_184
    assert tw.attention == 4 * core                                 # 3 layers + MTP block
    assert tw.routed == 3 * 2 * 2 * 3 * 128 * 64


def test_v3_flops_per_token():
    # V3 at 4K: the attention core of one layer is 2*128*(192+128)*2048.5 FLOPs forward
    assert attention_core_fwd_flops(V3, 4096) == 2 * 128 * 320 * 2048.5
    tw = token_work(V3, 4096, include_mtp=False)
    # 6N rule on activated non-embedding parameters + attention: within 1%
    n = 37_552_282_624 - 129280 * 7168                   # activated minus the embedding table
    six_n = 6 * n + 3 * 61 * attention_core_fwd_flops(V3, 4096)
    assert tw.model_flops == pytest.approx(six_n, rel=0.01)


def test_parameter_bytes():
    pb = parameter_bytes(V3)
    assert pb["main"]["params"] == 671_026_404_352
    assert pb["main"]["bf16_bytes"] == 2 * pb["main"]["params"]
    # FP8 checkpoint: ~1 byte per Linear weight (+ a 4-byte scale per 128x128 block), rest BF16
    fp8 = pb["main"]["fp8_linear_params"]
    assert pb["main"]["fp8_bytes"] == pytest.approx(fp8 * (1 + 4 / 16384) + 2 * (pb["main"]["params"] - fp8))
    assert 650e9 < pb["with_mtp"]["fp8_bytes"] < 700e9
    for b in model_blocks(TINY, 8):                      # shapes + other params == params.py counts
        if b.kind != "mtp":
            assert b.params == layer_params(TINY, b.kind == "moe")[0]


# ----------------------------------------------------------------------------------------- communication
def _enumerate_units(E, K, G, M, u):
    """Exact E[distinct units] by enumerating every (groups, experts) choice (uniform routing)."""
    x, total, n = E // G, 0.0, 0
    for groups in itertools.combinations(range(G), M):
        experts = [g * x + j for g in groups for j in range(x)]
        for chosen in itertools.combinations(experts, K):
            total += len({e // u for e in chosen})
            n += 1
    return total / n


@pytest.mark.parametrize("E,K,G,M,u", [(8, 2, 2, 1, 2), (8, 2, 2, 2, 2), (8, 3, 4, 2, 4), (8, 3, 4, 2, 1),
                                       (16, 4, 4, 2, 8), (16, 4, 4, 3, 2)])
def test_expected_units_hit_matches_enumeration(E, K, G, M, u):
    assert expected_units_hit(E, K, G, M, u) == pytest.approx(_enumerate_units(E, K, G, M, u))


def test_tiny_ep_bytes_by_hand():
    # tiny: 8 experts in 2 groups of 4, top-2 inside 1 kept group. EP8 over 4 nodes of 2 GPUs.
    t = ep_traffic(TINY, ep=8, gpus_per_node=2, fp8_dispatch=True)
    # a node holds 2 experts of one group: P(hit) = 1/2 * (1 - C(2,2)/C(4,2)) = 5/12, 4 nodes
    assert t.nodes_per_token == pytest.approx(4 * 5 / 12)
    assert t.remote_nodes_per_token == pytest.approx(4 * 5 / 12 * 3 / 4)     # own node excluded
    assert t.gpus_per_token == pytest.approx(2.0)                             # 2 experts, 1 per GPU
    assert t.dispatch_bytes_per_copy == 128 + 4 * 128 / 128                   # FP8 + one fp32 scale / 128
    assert t.combine_bytes_per_copy == 2 * 128                                # BF16
    assert t.ib_bytes_per_token == pytest.approx(1.25 * (132 + 256))
    assert t.nvlink_bytes_per_token == pytest.approx(2 * (1 - 1 / 2) * (132 + 256))
    bf16 = ep_traffic(TINY, ep=8, gpus_per_node=2, fp8_dispatch=False)
    assert bf16.dispatch_bytes_per_copy == 256


def test_node_limited_routing_reduces_ib_traffic():
    limited = ep_traffic(V3, 64, 8, fp8_dispatch=True)
    free = ep_traffic(V3, 64, 8, fp8_dispatch=True, topk_group=8)
    assert limited.nodes_per_token <= 4
    # unrestricted: 8 experts uniform over 8 nodes of 32
    assert free.nodes_per_token == pytest.approx(8 * (1 - math.comb(224, 8) / math.comb(256, 8)))
    assert free.ib_bytes_per_token > 1.4 * limited.ib_bytes_per_token
    assert ep_traffic(V3, 64, 8, fp8_dispatch=True, topk_group=1).nodes_per_token == pytest.approx(1.0)
    assert ep_traffic(V3, 8, 8, fp8_dispatch=True).ib_bytes_per_token == 0     # one node: NVLink only


# ----------------------------------------------------------------------------------------- memory
def test_tiny_parameter_memory_by_hand():
    gpu = GPU("toy", bf16_tflops=100, fp8_tflops=200, hbm_gbps=1000, hbm_gb=16, nvlink_gbps=100,
              nic_gbps=10, sms=100, gpus_per_node=8)
    lay = Layout(gpus=8, pp=1, ep=8, seq_len=64, global_batch=8, micro_batch=1, schedule="1f1b")
    r = plan_training(TINY, Cluster.of_gpus(gpu, 8), lay, Assumptions(fp8_weight_cache=False))
    rank = r["ranks"][0]
    expert = 3 * 128 * 64                                   # one routed expert (1 per GPU with EP8)
    dense = 51200 + 96 + 256 + 3 * 128 * 320                # attention + its norms + 2 norms + FFN
    moe_shared = 51200 + 96 + 256 + 128 * 8 + 3 * 128 * 64  # attention, norms, gate, shared expert
    mtp = 2 * 128 * 128 + 3 * 128 + moe_shared             # eh_proj, enorm/hnorm/head norm, block
    embed_head = 2 * 2048 * 128 + 128                      # embedding, head, final norm
    non_expert = dense + 2 * moe_shared + mtp + embed_head
    assert rank["params_non_expert"] == non_expert
    assert rank["params_expert"] == 3 * expert              # 2 MoE layers + the MTP block
    mem = rank["memory_gb"]
    total = non_expert + 3 * expert
    assert mem["weights (bf16 working copy)"] == pytest.approx(2 * total / 1e9)
    assert mem["gradients (fp32)"] == pytest.approx(4 * total / 1e9)
    # ZeRO-1: non-expert state over DP 8, expert state over DP/EP = 1
    shard = non_expert / 8 + 3 * expert
    assert mem["master weights (fp32)"] == pytest.approx(4 * shard / 1e9)
    assert mem["adam moments (bf16)"] == pytest.approx(4 * shard / 1e9)
    assert r["layout"]["microbatches_per_step"] == 1


def test_dualpipe_holds_two_stages():
    cl = Cluster.of_gpus(H800, 2048)
    one = plan_training(V3, cl, Layout(2048, 16, 64, schedule="1f1b"))
    two = plan_training(V3, cl, Layout(2048, 16, 64, schedule="dualpipe"))
    # middle rank 5 holds stages 5 and 10 under DualPipe, 4 MoE layers each
    assert two["ranks"][5]["stages"] == [5, 10]
    assert two["ranks"][5]["params"] == pytest.approx(2 * one["ranks"][5]["params"])
    assert two["schedule"]["peak_inflight_chunks"] == 17


def test_activation_policy_ordering():
    b = model_blocks(V3, 4096)[10]
    kw = dict(fp8=True)
    rep = sum(block_activation_bytes(V3, b, recompute="report", **kw).values())
    none = sum(block_activation_bytes(V3, b, recompute="none", **kw).values())
    full = sum(block_activation_bytes(V3, b, recompute="full", **kw).values())
    assert full < rep < none
    assert full == 2 * 7168
    assert sum(block_activation_bytes(V3, b, recompute="report", fp8=False).values()) > 1.5 * rep


# ----------------------------------------------------------------------------------------- the report's setup
def test_report_setup_within_10_percent_of_180k():
    r = plan_training(V3, Cluster.of_gpus(H800, 2048), Layout(2048, 16, 64), tokens=14.8e12,
                      model_name="deepseek-v3")
    assert 0.9 * 180e3 <= r["gpu_hours_per_trillion_tokens"] <= 1.1 * 180e3
    assert r["memory_per_gpu_gb"] < 80 and not r["over_capacity"]
    assert r["reference"]["planner_gpu_hours_14.8T"] == pytest.approx(r["gpu_hours_total"])
    assert 0.9 * 2.664e6 <= r["gpu_hours_total"] <= 1.1 * 2.664e6
    assert r["layout"]["dp"] == 128 and r["layout"]["microbatches_per_step"] == 120
    assert r["stage_split"]["blocks_per_stage"] == [3] + [4] * 14 + [3]
    assert r["communication"]["ep_all_to_all"]["ep_nodes"] == 8
    assert r["reference"]["implied_mfu_fp8_peak"] == pytest.approx(0.203, abs=0.002)
    b = r["step_time"]["breakdown_s"]
    assert b["total"] == pytest.approx(sum(v for k, v in b.items() if k != "total"))


def test_what_ifs_move_the_right_way():
    cl = Cluster.of_gpus(H800, 2048)
    base = plan_training(V3, cl, Layout(2048, 16, 64))
    onef1b = plan_training(V3, cl, Layout(2048, 16, 64, schedule="1f1b"))
    bf16 = plan_training(V3, cl, Layout(2048, 16, 64, precision="bf16"))
    free = plan_training(V3, cl, Layout(2048, 16, 64, topk_group=8, schedule="1f1b"))
    ep32 = plan_training(V3, cl, Layout(2048, 16, 32))
    assert onef1b["step_time_s"] > 1.2 * base["step_time_s"]          # all-to-all exposed + bubble
    assert onef1b["memory_per_gpu_gb"] < base["memory_per_gpu_gb"]    # one parameter copy
    assert bf16["step_time_s"] > base["step_time_s"] and bf16["over_capacity"]
    assert bf16["warnings"] and "does not fit" in bf16["warnings"][0]
    assert free["step_time_s"] > onef1b["step_time_s"]
    assert ep32["memory_per_gpu_gb"] > base["memory_per_gpu_gb"]      # 8 experts per GPU


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw,msg", [
    (dict(pp=24), "PP must divide"),
    (dict(ep=48), "does not divide the 256 routed experts"),
    (dict(pp=16, ep=256), "EP 256 must divide DP"),
    (dict(pp=15), "PP must divide"),
    (dict(schedule="dualpipe", pp=16, global_batch=2048), r"num_microbatches >= 30 .*2\*PP-2"),
    (dict(global_batch=15361), "not a whole number of micro-batches"),
    (dict(schedule="nope"), "unknown schedule"),
    (dict(tp=2), "TP = 1"),
    (dict(layer_split=(4,) * 16), "summing to 62"),
])
def test_impossible_layouts_raise(kw, msg):
    lay = Layout(**{**dict(gpus=2048, pp=16, ep=64), **kw})
    with pytest.raises(ValueError, match=msg):
        plan_training(V3, Cluster.of_gpus(H800, 2048), lay)


def test_more_validation():
    with pytest.raises(ValueError, match="whole number of h800 nodes"):
        Cluster.of_gpus(H800, 2044)
    with pytest.raises(ValueError, match="more|lower PP|only"):
        plan_training(TINY, Cluster.of_gpus(H800, 16), Layout(16, 8, 1, seq_len=64, global_batch=32,
                                                              schedule="1f1b"))
    with pytest.raises(ValueError, match="no FP8"):
        plan_training(V3, Cluster.of_gpus(get_gpu("a100"), 2048), Layout(2048, 16, 64))
    with pytest.raises(ValueError, match="even number of ranks"):
        schedule_model("dualpipe", 15, 60)
    with pytest.raises(ValueError, match="unknown GPU"):
        get_gpu("tpu")
    with pytest.raises(ValueError, match="unknown assumption"):
        Assumptions().with_overrides(["nope=1"])
    with pytest.raises(ValueError, match="efficiency"):
        Assumptions(fp8_gemm_efficiency=1.5)


def test_uneven_split_rule_is_the_runtimes():
    from dsv3.parallel.pipeline.schedule import split_blocks, split_layers

    assert split_blocks(62, 16) == [3] + [4] * 14 + [3]
    assert split_blocks(10, 4) == [2, 3, 3, 2]
    assert split_blocks(9, 4) == [2, 3, 2, 2]        # deficit 3: last, first, then second-to-last
    assert split_blocks(8, 4) == [2, 2, 2, 2]
    v3 = ModelConfig.preset("deepseek-v3")
    assert stage_blocks(v3, 16) == [3] + [4] * 14 + [3]
    assert stage_blocks(v3, 16, (4,) * 15 + (2,)) == [4] * 15 + [2]
    with pytest.raises(ValueError, match="MTP modules"):
        stage_blocks(v3, 2, (62, 0))
    # the planner's stages are the runtime's chunks: trunk layers, then the MTP modules on the last one
    for L, D, C in [(61, 1, 16), (3, 1, 4), (2, 3, 4), (7, 2, 3), (4, 0, 8)]:
        cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=L, num_nextn_predict_layers=D,
                                                 first_k_dense_replace=min(1, L))
        spans = split_layers(L, C, D)
        assert [len(r) for r in spans[:-1]] + [len(spans[-1]) + D] == stage_blocks(cfg, C)
        assert [i for r in spans for i in r] == list(range(L))


def test_schedule_closed_forms():
    F, B, W = 1.0, 2.0, 1.0
    assert schedule_model("1f1b", 16, 120).bubble(F, B, W) == 15 * 3
    assert schedule_model("zb1p", 16, 120).bubble(F, B, W) == 15 * 1
    dp = schedule_model("dualpipe", 16, 120)
    assert dp.bubble(F, B, W, FB=3.0) == 7 * (3 + 2 - 3)
    assert dp.unpaired_chunks == 23 and dp.param_copies == 2 and dp.peak_inflight == 17
    dv = schedule_model("dualpipev", 8, 32)
    assert dv.num_stages == 16 and dv.rank_stages(0) == (0, 15) and dv.param_copies == 1


def _sizes():
    """(schedule, PP, M) from each schedule's minimum micro-batches up, and the sizes just below."""
    ok, bad = [], []
    for name in pipeline.SCHEDULES:
        for p in (1, 2, 3, 4, 6, 8):
            lo = MIN_MICROBATCHES[name](p)
            for m in sorted({lo, lo + 1, lo + 2, p, 2 * p, 3 * p}):
                (ok if _builds(name, p, m) else bad).append((name, p, m))
            if lo > 1:
                bad.append((name, p, lo - 1))
    return ok, bad


def _builds(name, p, m) -> bool:
    try:
        pipeline.build_schedule(name, p, m, check=False)
        return True
    except ValueError:
        return False


def test_planner_takes_the_pipelines_rules():
    """Schedule names and size rules are the runtime's: the planner accepts exactly what it builds."""
    assert plan_schedules.SCHEDULES is pipeline.SCHEDULES
    assert plan_schedules.MIN_MICROBATCHES is pipeline_schedule.MIN_MICROBATCHES
    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    assert parser._option_string_actions["--schedule"].choices == pipeline.SCHEDULES
    ok, bad = _sizes()
    assert len(ok) > 40 and len(bad) > 10
    for name, p, m in ok:
        assert schedule_model(name, p, m).microbatches == m
    for name, p, m in bad + [("dualpipe", 4, 7), ("dualpipe", 3, 12), ("gpipe", 4, 8)]:
        with pytest.raises(ValueError) as planner:
            schedule_model(name, p, m)
        with pytest.raises(ValueError) as runtime:
            pipeline.build_schedule(name, p, m)
        assert str(planner.value) == str(runtime.value)
    # the minimums the runtime proves (builds and validates), below DeepSeek's reference 2*PP
    assert schedule_model("dualpipe", 16, 30).microbatches == 30
    assert schedule_model("dualpipev", 3, 5).pp == 3
    assert schedule_model("1f1b", 8, 3).peak_inflight == 3


def test_closed_forms_match_the_simulated_schedules():
    """Bubble, peak activations, unpaired chunks, stages per rank and parameter copies of the planner's
    closed forms equal those of the runtime's schedules (simulated; costs in Table 2's regime)."""
    F, B, W, FB = 1.0, 2.0, 1.0, 2.5
    ok, _ = _sizes()
    for name, p, m in ok:
        sm = schedule_model(name, p, m)
        sched = pipeline.build_schedule(name, p, m)
        sim = pipeline.simulate(sched, F=F, B=B, W=W, FB=FB)
        where = f"{name} PP={p} M={m}"
        assert sm.bubble(F, B, W, FB) == pytest.approx(max(sim.bubble)), where
        assert sm.peak_inflight == max(sim.peak_activations), where
        unpaired = [sum(1 for a in row for k, _, _ in a.parts() if k == "F" and not (a.kind == "FB" and a.overlapped))
                    for row in sched.actions]
        assert sm.unpaired_chunks == max(unpaired), where
        assert sm.num_stages == sched.num_chunks, where
        for r in range(p):
            assert sorted(sm.rank_stages(r)) == sorted({sched.stage_chunk[s] for s in sched.stages_of(r)}), where
            assert sm.param_copies == sched.param_copies(r), where
        if name in ("1f1b", "zb1p"):
            assert [sm.peak_inflight_rank(r) for r in range(p)] == sim.peak_activations, where


# ----------------------------------------------------------------------------------------- hardware + serving
def test_hardware_file(tmp_path):
    p = tmp_path / "hw.json"
    p.write_text(json.dumps({"mi300x": {"bf16_tflops": 1307, "fp8_tflops": 2615, "hbm_gbps": 5300,
                                        "hbm_gb": 192, "nvlink_gbps": 448, "nic_gbps": 50, "sms": 304}}))
    g = get_gpu("MI300X", p)
    assert g.hbm_gb == 192 and g.gpus_per_node == 8
    assert set(load_hardware_file(p)) == {"mi300x"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"bf16_tflops": 1, "speed": 3}}))
    with pytest.raises(ValueError, match="unknown fields"):
        load_hardware_file(bad)
    assert {"h800", "h100", "h200", "a100", "b200"} <= set(__import__("dsv3.plan.hardware", fromlist=["x"]).CATALOGUE)


def test_serving_units():
    pre = plan_serving(V3, H800, "prefill", mtp=False)
    dec = plan_serving(V3, H800, "decode", mtp=False)
    assert pre["experts_per_gpu"] == 9 and dec["experts_per_gpu"] == 1
    assert pre["kv_cache_bytes_per_token"] == 70_272 == dec["kv_cache_bytes_per_token"]
    assert pre["memory_per_gpu_gb"] < 80 and dec["memory_per_gpu_gb"] < pre["memory_per_gpu_gb"]
    # the bounds are above what DeepSeek published (73.7k input incl. cache hits, 14.8k output per node)
    assert pre["input_tokens_per_s_per_node_incl_cache_hits"] > 73.7e3
    assert dec["tokens_per_s_per_node"] > 14.8e3
    assert dec["bound"] in ("memory", "compute", "infiniband")


# ----------------------------------------------------------------------------------------- CLI
def _cli(argv):
    p = argparse.ArgumentParser()
    plan_cli.add_arguments(p)
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        rc = plan_cli.run(p.parse_args(argv))
    return rc, out.getvalue()


def test_cli_json_and_table():
    rc, out = _cli(["--json"])
    d = json.loads(out)
    assert rc == 0
    for key in ("gpu_hours_per_trillion_tokens", "memory_per_gpu_gb", "mfu", "flops", "memory",
                "communication", "step_time", "assumptions", "layout"):
        assert key in d
    rc, out = _cli(["--precision", "bf16", "--schedule", "1f1b"])
    assert rc == 0 and "OVER CAPACITY" in out and "GPU-hours per 1T tokens" in out
    rc, out = _cli(["--mode", "serve", "--json"])
    assert set(json.loads(out)["units"]) == {"prefill", "decode"}
    rc, out = _cli(["--microbatches", "60", "--assume", "goodput=1", "--tokens", "1T", "--json"])
    d = json.loads(out)
    assert d["layout"]["micro_batch"] == 2 and d["assumptions"]["goodput"] == 1.0 and d["tokens"] == 1e12


def test_cli_rejects_bad_layout_with_message():
    from dsv3.cli import main
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        rc = main(["plan", "--gpus", "2048", "--pp", "16", "--ep", "48"])
    assert rc == 2 and "EP 48" in err.getvalue()
    assert plan_cli.parse_count("14.8T") == pytest.approx(14.8e12)
    with pytest.raises(ValueError):
        plan_cli.parse_count("lots")


def test_whatif_tables_render():
    from dsv3.plan import whatif
    text = whatif.whatif_tables()
    assert "1F1B" in text and "BF16" in text and "unrestricted" in text and "EP32" in text


def test_closed_forms_agree_with_the_pipeline_simulator():
    # not a dependency of the planner: a cross-check where the simulator is present
    pipeline = pytest.importorskip("dsv3.parallel.pipeline")
    for name, P, N in (("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 4, 8), ("dualpipe", 8, 16)):
        sim = pipeline.simulate(pipeline.build_schedule(name, P, N), F=1.0, B=2.0, W=1.0, FB=3.0)
        m = schedule_model(name, P, N)
        assert max(sim.bubble) == pytest.approx(m.bubble(1.0, 2.0, 1.0, 3.0))
        assert max(sim.peak_activations) == m.peak_inflight


def test_an_expert_parallel_rank_counts_only_its_experts():
    from dsv3.plan.local import inference_bytes

    for fp8 in (False, True):
        full = inference_bytes(V3, fp8_kept=fp8)
        per_rank = inference_bytes(V3, fp8_kept=fp8, experts=9)          # EP32 with 32 redundant experts
        one_expert = (full - inference_bytes(V3, fp8_kept=fp8, experts=255)) / V3.num_moe_layers
        assert per_rank == pytest.approx(full - 247 * V3.num_moe_layers * one_expert)
        assert per_rank < full / 10
