"""Pipeline schedules as data: construction, placement, messages, and loud validation (SPEC §2.1)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dsv3.parallel import pipeline
from dsv3.parallel.pipeline import schedule as S

SIZES = {
    "1f1b": [(1, 1), (2, 1), (2, 5), (4, 3), (4, 8), (8, 20), (16, 32)],
    "zb1p": [(1, 3), (2, 1), (2, 5), (4, 3), (4, 8), (8, 20), (16, 32)],
    "dualpipe": [(2, 2), (2, 4), (4, 6), (4, 8), (6, 10), (8, 14), (8, 20), (16, 32)],
    "dualpipev": [(1, 1), (2, 3), (2, 4), (4, 7), (4, 9), (8, 20), (16, 31)],
}


@pytest.mark.parametrize("name,p,m", [(n, p, m) for n, sizes in SIZES.items() for p, m in sizes])
def test_builds_and_validates(name, p, m):
    sched = pipeline.build_schedule(name, p, m)  # validate() runs inside
    assert (sched.name, sched.num_ranks, sched.num_microbatches) == (name, p, m)
    assert len(sched.actions) == p
    # every rank runs 2 compute parts (F + backward) per (stage, micro-batch) it holds, + one W per I
    for r, row in enumerate(sched.actions):
        parts = [k for a in row for k, _, _ in a.parts()]
        held = sum(1 for path in sched.paths for s in path if sched.stage_to_rank[s] == r)
        assert parts.count("F") == held
        assert parts.count("B") + parts.count("I") == held
        assert parts.count("W") == parts.count("I")
        assert all(a.rank == r for a in row)
    pipeline.validate(sched)


def test_kinds_used():
    kinds = lambda name: {a.kind for row in pipeline.build_schedule(name, 4, 8).actions for a in row}  # noqa: E731
    assert kinds("1f1b") == {"F", "B"}
    assert kinds("zb1p") == {"F", "I", "W"}
    assert kinds("dualpipe") == {"F", "B", "I", "W", "FB"}
    assert kinds("dualpipev") == {"F", "B", "I", "W", "FB"}


def test_placement():
    p = 8
    one = pipeline.build_schedule("1f1b", p, 8)
    assert one.stage_to_rank == tuple(range(p)) and one.num_stages == p
    assert all(path == tuple(range(p)) for path in one.paths)

    dp = pipeline.build_schedule("dualpipe", p, 20)
    assert dp.num_stages == 2 * p and dp.num_chunks == p
    for r in range(p):
        assert dp.stages_of(r) == (r, 2 * p - 1 - r)
        # rank r holds model chunks r and PP-1-r: two parameter copies
        assert sorted(dp.stage_chunk[s] for s in dp.stages_of(r)) == sorted({r, p - 1 - r})
        assert dp.param_copies(r) == 2
    assert dp.directions == (0,) * 10 + (1,) * 10
    assert dp.paths[0] == tuple(range(p)) and [dp.stage_to_rank[s] for s in dp.paths[0]] == list(range(p))
    assert [dp.stage_to_rank[s] for s in dp.paths[10]] == list(range(p - 1, -1, -1))  # enters at the last rank

    v = pipeline.build_schedule("dualpipev", p, 20)
    assert v.num_stages == 2 * p and v.num_chunks == 2 * p
    assert [v.stage_to_rank[s] for s in v.paths[0]] == list(range(p)) + list(range(p - 1, -1, -1))
    for r in range(p):
        assert v.stages_of(r) == (r, 2 * p - 1 - r)
        assert v.param_copies(r) == 1


def test_messages_follow_placement():
    one = pipeline.build_schedule("1f1b", 4, 8)
    f = next(a for a in one.actions[1] if a.kind == "F" and a.microbatch == 3)
    assert [(m.kind, m.src_rank, m.dst_rank, m.microbatch) for m in f.recvs] == [("act", 0, 1, 3)]
    assert [(m.kind, m.src_rank, m.dst_rank) for m in f.sends] == [("act", 1, 2)]
    b = next(a for a in one.actions[3] if a.kind == "B" and a.microbatch == 0)
    assert b.recvs == () and [(m.kind, m.dst_rank) for m in b.sends] == [("grad", 2)]  # loss stage
    first = next(a for a in one.actions[0] if a.kind == "F")
    assert first.recvs == ()

    # the tip of the V is local: rank R-1 hands stage R-1 to stage R without a message
    v = pipeline.build_schedule("dualpipev", 4, 8)
    tip = [a for a in v.actions[3] for k, s, _ in a.parts() if k == "F" and s == 4]
    assert tip and all(not any(m.src_stage == 3 and m.dst_stage == 4 for m in a.recvs) for a in tip)

    fb = next(a for row in v.actions for a in row if a.kind == "FB")
    assert len(fb.parts()) == 2 and "&" in str(fb)


def test_str_is_readable():
    text = str(pipeline.build_schedule("zb1p", 2, 3))
    lines = text.splitlines()
    assert lines[0].startswith("zb1p: 2 ranks, 3 micro-batches")
    assert lines[1].startswith("  rank 0 stages [0]: F0.s0 F1.s0")
    assert "I0.s1 W0.s1" not in lines[2]  # the last rank defers its W (ZB-H1)
    assert "&" in str(pipeline.build_schedule("dualpipe", 4, 8))


@pytest.mark.parametrize(
    "name,p,m,rule",
    [
        ("dualpipe", 3, 12, "even number of ranks"),
        ("dualpipe", 4, 9, "even number of micro-batches"),
        ("dualpipe", 8, 12, ">= 14"),
        ("dualpipe", 4, 4, ">= 6"),
        ("dualpipev", 4, 6, ">= 7"),
        ("dualpipev", 8, 14, ">= 15"),
        ("1f1b", 4, 0, ">= 1"),
        ("gpipe", 4, 8, "unknown schedule"),
    ],
)
def test_unsupported_sizes_raise_with_the_rule(name, p, m, rule):
    with pytest.raises(ValueError, match=rule.replace("(", r"\(")):
        pipeline.build_schedule(name, p, m)


def test_minimum_microbatches_are_tight():
    # the stated minimum builds and validates; DeepSeek's reference asks for 2*PP
    assert pipeline.build_schedule("dualpipe", 8, 14).num_microbatches == 14
    assert pipeline.build_schedule("dualpipev", 8, 15).num_microbatches == 15
    assert pipeline.build_schedule("dualpipev", 3, 5).num_ranks == 3  # odd R is fine for the V


def _rebuild(sched, rows):
    return replace(sched, actions=tuple(tuple(r) for r in rows))


def test_validation_catches_missing_backward():
    sched = pipeline.build_schedule("1f1b", 4, 6, check=False)
    rows = [list(r) for r in sched.actions]
    rows[2] = [a for a in rows[2] if not (a.kind == "B" and a.microbatch == 5)]
    with pytest.raises(S.ScheduleError, match="no backward"):
        pipeline.validate(_rebuild(sched, rows))


def test_validation_catches_duplicate_forward():
    sched = pipeline.build_schedule("1f1b", 2, 3, check=False)
    rows = [list(r) for r in sched.actions]
    rows[0].insert(1, rows[0][0])
    with pytest.raises(S.ScheduleError, match="twice"):
        pipeline.validate(_rebuild(sched, rows))


def test_validation_catches_local_order_and_w_before_i():
    sched = pipeline.build_schedule("zb1p", 2, 3, check=False)
    rows = [list(r) for r in sched.actions]
    i = next(k for k, a in enumerate(rows[1]) if a.kind == "I")
    w = next(k for k, a in enumerate(rows[1]) if a.kind == "W" and a.microbatch == rows[1][i].microbatch)
    rows[1][i], rows[1][w] = rows[1][w], rows[1][i]
    with pytest.raises(S.ScheduleError, match="input-grad"):
        pipeline.validate(_rebuild(sched, rows))
    sched = pipeline.build_schedule("1f1b", 2, 3, check=False)
    rows = [list(r) for r in sched.actions]
    rows[1].reverse()  # backward before its forward on the loss stage
    with pytest.raises(S.ScheduleError, match="needs the forward"):
        pipeline.validate(_rebuild(sched, rows))


def test_validation_catches_wrong_rank():
    sched = pipeline.build_schedule("1f1b", 2, 2, check=False)
    rows = [list(r) for r in sched.actions]
    rows[0][0] = replace(rows[0][0], stage=1)
    with pytest.raises(S.ScheduleError, match="lives on rank 1|not on"):
        pipeline.validate(_rebuild(sched, rows))


def _from_programs(name, p, m, progs):
    s2r, chunk, paths, dirs = S._placement(name, p, m)
    return S.Schedule(name, p, m, len(s2r), s2r, chunk, paths, dirs, S._attach_comm(progs, s2r, paths))


def test_validation_catches_cross_rank_cycle():
    # rank 0 waits for B0's gradient before sending F1; rank 1 needs F1 before it runs B0
    progs = [[("F", 0, 0), ("B", 0, 0), ("F", 0, 1), ("B", 0, 1)], [("F", 1, 0), ("F", 1, 1), ("B", 1, 0), ("B", 1, 1)]]
    sched = _from_programs("1f1b", 2, 2, progs)
    with pytest.raises(S.ScheduleError, match="deadlock"):
        pipeline.validate(sched)
    with pytest.raises(S.ScheduleError, match="cannot be satisfied"):
        pipeline.simulate(sched)


def test_validation_catches_rendezvous_deadlock():
    # DualPipe's middle ranks must treat their first (F0, B1) as one communication unit; run as two
    # separate actions, both middle ranks block sending an activation the other receives only later.
    p, m = 2, 4
    progs = []
    for prog in S._dualpipe(p, m):
        out = []
        for t in prog:
            out += [("F", t[1], t[2]), ("B", t[3], t[4])] if t[0] == "FBn" else [t]
        progs.append(out)
    sched = _from_programs("dualpipe", p, m, progs)
    with pytest.raises(S.ScheduleError, match="deadlock under blocking send/recv"):
        pipeline.validate(sched)
    pipeline.validate(sched, blocking=False)  # fine with buffered sends: dependencies are satisfiable
    pipeline.simulate(sched)


def test_validation_catches_fifo_mismatch():
    sched = pipeline.build_schedule("1f1b", 2, 3, check=False)
    rows = [list(r) for r in sched.actions]
    # rank 1 posts the receives of micro-batches 1 and 2 in the wrong order
    k1 = next(k for k, a in enumerate(rows[1]) if a.kind == "F" and a.microbatch == 1)
    k2 = next(k for k, a in enumerate(rows[1]) if a.kind == "F" and a.microbatch == 2)
    a1, a2 = rows[1][k1], rows[1][k2]
    rows[1][k1] = replace(a1, posts=a2.posts + a1.posts, recvs=a1.recvs)
    rows[1][k2] = replace(a2, posts=())
    with pytest.raises(S.ScheduleError, match="FIFO"):
        pipeline.validate(_rebuild(sched, rows))


def test_dualpipe_prefetches_receives_in_channel_order():
    # rank 1 of DualPipeV(4, 8) gets activation mb6 from rank 0 before it needs grad mb0 from rank 0
    v = pipeline.build_schedule("dualpipev", 4, 8)
    posts = [m for a in v.actions[1] for m in a.posts if m.src_rank == 0]
    sends = [m for a in v.actions[0] for m in a.sends if m.dst_rank == 1]
    assert posts == sends
    early = [a for a in v.actions[1] if any(m not in a.recvs for m in a.posts)]
    assert early, "some receive is posted ahead of its use"


def test_custom_schedule_round_trip_and_errors():
    ref = pipeline.build_schedule("zb1p", 3, 5)
    progs = [[(k, st, mb) for a in row for k, st, mb in a.parts()] for row in ref.actions]
    again = pipeline.custom_schedule("mine", 3, 5, progs, placement="zb1p")
    assert [[str(a) for a in r] for r in again.actions] == [[str(a) for a in r] for r in ref.actions]
    assert pipeline.simulate(again).bubble == pipeline.simulate(ref).bubble
    with pytest.raises(ValueError, match="micro-batch 5 of 5"):
        pipeline.custom_schedule("bad", 3, 5, [progs[0] + [("F", 0, 5)]] + progs[1:], placement="zb1p")
    with pytest.raises(ValueError, match="bad action tuple"):
        pipeline.custom_schedule("bad", 3, 5, [[("X", 0, 0)]] + progs[1:], placement="zb1p")
    with pytest.raises(ValueError, match="unknown placement"):
        pipeline.custom_schedule("bad", 3, 5, progs, placement="gpipe")
    with pytest.raises(S.ScheduleError, match="no backward"):
        pipeline.custom_schedule("bad", 3, 5, [progs[0][:-2]] + progs[1:], placement="zb1p")


def test_size_rules_are_exposed_for_the_planner():
    # check_sizes is what build_schedule applies; num_model_chunks is the placement's chunk count
    for name in S.SCHEDULES:
        for p in (1, 2, 3, 4, 8):
            for m in range(1, 3 * p + 2):
                try:
                    sched = pipeline.build_schedule(name, p, m)
                except ValueError as e:
                    with pytest.raises(ValueError, match=str(e).replace("(", r"\(").replace(")", r"\)")
                                       .replace("*", r"\*")):
                        S.check_sizes(name, p, m)
                    continue
                S.check_sizes(name, p, m)
                assert m >= S.MIN_MICROBATCHES[name](p)
                assert sched.num_chunks == S.num_model_chunks(name, p)
