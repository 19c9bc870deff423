"""The pipeline simulator reproduces the DualPipe README / report Table 2 (SPEC §2.1)."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from dsv3.parallel import pipeline
from dsv3.parallel.pipeline import cli

PPS = [2, 4, 8, 16]
COSTS = dict(F=1.0, B=2.0, W=1.0, FB=2.5)  # the README's example ratios: B = 2F, W = B/2, F&B < F+B


def sim(name, p, m, **kw):
    return pipeline.simulate(pipeline.build_schedule(name, p, m), **{**COSTS, **kw})


def close(a, b):
    return abs(a - b) < 1e-9


@pytest.mark.parametrize("p", PPS)
def test_1f1b_table2(p):
    F, B = COSTS["F"], COSTS["B"]
    for m in (p, 2 * p, 4 * p):
        r = sim("1f1b", p, m)
        assert all(close(b, (p - 1) * (F + B)) for b in r.bubble), r.bubble  # every rank
        assert close(r.makespan, (m + p - 1) * (F + B))
        assert r.peak_activations == [p - i for i in range(p)]  # max PP, on the first rank
        assert r.param_copies == [1.0] * p


@pytest.mark.parametrize("p", PPS)
def test_zb1p_table2(p):
    F, B, W = COSTS["F"], COSTS["B"], COSTS["W"]
    for m in (p, 2 * p, 4 * p):
        r = sim("zb1p", p, m)
        assert all(close(b, (p - 1) * (F + B - 2 * W)) for b in r.bubble), r.bubble
        assert max(r.peak_activations) == p and r.peak_activations[0] == p
        assert r.param_copies == [1.0] * p


def _dualpipe_rank_bubbles(table, halves, F, B, FB):
    """Per-rank bubble: the table value on the middle ranks, one (F+B−F&B) less per step outwards
    beyond the two middle pairs (the outer ranks overlap fewer forward/backward pairs)."""
    return [table - max(0, halves - 2 - h) * (F + B - FB) for h in range(halves)]


@pytest.mark.parametrize("p", PPS)
def test_dualpipe_table2(p):
    F, B, W, FB = COSTS["F"], COSTS["B"], COSTS["W"], COSTS["FB"]
    table = (p / 2 - 1) * (FB + B - 3 * W)
    for m in (2 * p, 4 * p):
        r = sim("dualpipe", p, m)
        assert all(b <= table + 1e-9 for b in r.bubble), (r.bubble, table)  # at or below Table 2 ...
        assert close(max(r.bubble), table)  # ... and equal on the middle ranks
        want = _dualpipe_rank_bubbles(table, p // 2, F, B, FB)
        got = [r.bubble[min(k, p - 1 - k)] for k in range(p // 2)]
        assert all(close(x, y) for x, y in zip(got, want)), (got, want)
        assert r.bubble == r.bubble[::-1]  # symmetric pipeline
        assert r.peak_activations == [p + 1] * p  # PP+1 on every rank
        assert r.param_copies == [2.0] * p


@pytest.mark.parametrize("r_", [2, 4, 8, 16])
def test_dualpipev_table2(r_):
    # Table 2's PP for DualPipeV is the number of stages, 2R: PP+1 activations "on PP/2 devices"
    F, B, W, FB = COSTS["F"], COSTS["B"], COSTS["W"], COSTS["FB"]
    pp = 2 * r_
    table = (pp / 2 - 1) * (FB + B - 3 * W)
    for m in (2 * r_, 4 * r_):
        res = sim("dualpipev", r_, m)
        assert all(b <= table + 1e-9 for b in res.bubble)
        assert close(max(res.bubble), table)
        want = _dualpipe_rank_bubbles(table, r_, F, B, FB)
        assert all(close(x, y) for x, y in zip(res.bubble, want)), (res.bubble, want)
        assert res.peak_activations == [pp + 1] * r_
        assert res.param_copies == [1.0] * r_
        assert close(table, res.closed_form()["bubble"]) and res.closed_form()["pp"] == pp


@pytest.mark.parametrize("name", pipeline.SCHEDULES)
@pytest.mark.parametrize("p", [2, 4, 8])
def test_bubble_and_memory_do_not_grow_with_microbatches(name, p):
    base = {"1f1b": p, "zb1p": p, "dualpipe": 2 * p, "dualpipev": 2 * p}[name]
    a, b = sim(name, p, base), sim(name, p, 2 * base)
    assert all(close(x, y) for x, y in zip(a.bubble, b.bubble)), (a.bubble, b.bubble)
    assert a.peak_activations == b.peak_activations
    assert b.makespan > a.makespan


def test_table2_exact_in_regime_and_a_lower_bound_outside():
    """Random costs: inside the documented regime the closed form is exact; outside, the simulated
    worst-rank bubble is never below it. ZB1P outside: (PP−1)·max(F, B−W, F+B−2W)."""
    rng = random.Random(0)
    scheds = {
        (n, p): pipeline.build_schedule(n, p, 3 * p if n != "dualpipe" else 4 * p)
        for n in pipeline.SCHEDULES
        for p in (4, 8)
    }
    inside = 0
    for _ in range(60):
        F, B = rng.uniform(0.3, 2.0), rng.uniform(0.3, 5.0)
        W = rng.uniform(0.0, B)
        FB = rng.uniform(max(F, B), F + B)
        for (n, p), s in scheds.items():
            r = pipeline.simulate(s, F=F, B=B, W=W, FB=FB)
            t = pipeline.table2(n, p, F=F, B=B, W=W, FB=FB)
            assert max(r.bubble) >= t["bubble"] - 1e-9
            if t["regime"]:
                inside += 1
                assert close(max(r.bubble), t["bubble"]), (n, p, F, B, W, FB)
            if n == "zb1p":
                assert close(max(r.bubble), (p - 1) * max(F, B - W, F + B - 2 * W))
            if n == "1f1b":
                assert close(max(r.bubble), t["bubble"])
    assert inside > 50


def test_timeline_is_consistent():
    s = pipeline.build_schedule("dualpipev", 4, 10)
    r = pipeline.simulate(s, comm=0.3, **COSTS)
    end = {}
    for row in r.timeline:
        for (s0, e0, _), (s1, _, _) in zip(row, row[1:]):
            assert s1 >= e0 - 1e-12  # one action at a time per rank, in list order
        for st, e, a in row:
            for k, stg, mb in a.parts():
                end[(k if k not in ("B", "I") else "BI", stg, mb)] = (st, e, a.rank)
    for (k, stg, mb), (st, e, rank) in end.items():
        prev, nxt = s.neighbours(mb, stg)
        if k == "F" and prev is not None:
            _, pe, pr = end[("F", prev, mb)]
            assert st >= pe + (0.3 if pr != rank else 0) - 1e-9
        if k == "BI" and nxt is not None:
            _, ne, nr = end[("BI", nxt, mb)]
            assert st >= ne + (0.3 if nr != rank else 0) - 1e-9
    assert [len(row) for row in r.timeline] == [len(row) for row in s.actions]
    assert all(close(r.makespan - busy, b) for busy, b in zip(r.busy, r.bubble))


def test_comm_latency_and_blocking_only_slow_down():
    for name in pipeline.SCHEDULES:
        s = pipeline.build_schedule(name, 4, 8)
        ideal = pipeline.simulate(s, **COSTS)
        assert pipeline.simulate(s, comm=0.2, **COSTS).makespan > ideal.makespan
        assert pipeline.simulate(s, blocking=True, **COSTS).makespan >= ideal.makespan - 1e-9
    s = pipeline.build_schedule("1f1b", 4, 8)  # 1F1B loses nothing to rendezvous sends
    assert close(pipeline.simulate(s, blocking=True, **COSTS).makespan, pipeline.simulate(s, **COSTS).makespan)


def test_costs_are_checked():
    s = pipeline.build_schedule("zb1p", 2, 2)
    with pytest.raises(ValueError, match="W"):
        pipeline.simulate(s, B=1.0, W=2.0)
    with pytest.raises(ValueError, match="F"):
        pipeline.simulate(s, F=-1.0)
    assert pipeline.simulate(s, F=1, B=2, W=1).costs.FB == 3.0  # default F&B = F + B


def test_public_api_shape():
    sched = pipeline.build_schedule("dualpipe", 8, 20)
    result = pipeline.simulate(sched, F=1.0, B=2.0, W=1.0, FB=2.5)
    assert len(result.bubble) == 8 and len(result.peak_activations) == 8
    assert isinstance(result.makespan, float)
    d = result.to_dict()
    json.dumps(d)
    assert d["table2"]["bubble"] == 4.5 and d["table2"]["regime"] is True


def _args(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_table_and_json(capsys):
    assert cli.run(_args("--schedule", "dualpipe", "--ranks", "4", "--microbatches", "8", "--FB", "2.5")) == 0
    out = capsys.readouterr().out
    assert "Table 2 (PP=4): bubble 1.5" in out and "makespan" in out and "rank" in out
    assert cli.run(_args("--schedule", "ZB1P", "--ranks", "4", "--microbatches", "8", "--json")) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["schedule"] == "zb1p" and d["bubble"] == [3.0] * 4 and d["table2"]["bubble"] == 3.0
    with pytest.raises(ValueError, match="even"):
        cli.run(_args("--schedule", "dualpipe", "--ranks", "3", "--microbatches", "8"))


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "t.png"
    args = _args("--schedule", "dualpipev", "--ranks", "2", "--microbatches", "4", "--FB", "2.5", "--plot", str(out))
    assert cli.run(args) == 0
    assert out.exists() and out.stat().st_size > 5000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
