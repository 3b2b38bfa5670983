"""Sync-group formation (coordinator/groups.py): power-of-two groups, extras stay async with a log
line, re-form after a loss or a reported PeerFailure, only an active rank 0 pushes."""

from __future__ import annotations

import logging

from geotrain.coordinator.groups import GroupFormation, group_key


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def formation(n: int, key: str = "g", settle: float = 2.0):
    clock = Clock()
    g = GroupFormation(settle_s=settle, clock=clock)
    for i in range(n):
        g.add(f"w{i}", key, "fp", f"127.0.0.1:{10000 + i}")
        clock.t += 0.1
    return g, clock


def test_waits_for_settle_then_forms_largest_power_of_two(caplog):
    caplog.set_level(logging.INFO, logger="geotrain.coordinator.groups")
    g, clock = formation(3)
    assert g.assignment("w0") is None  # still settling: everyone trains async meanwhile
    clock.t += 2.0
    a = [g.assignment(f"w{i}") for i in range(3)]
    assert a[2] is None, "the third member is beyond the largest power of two"
    assert [x.rank for x in a[:2]] == [0, 1] and {x.world_size for x in a[:2]} == {2}
    assert a[0].peers == a[1].peers == ("127.0.0.1:10000", "127.0.0.1:10001")
    assert a[0].group_id == a[1].group_id and a[0].epoch == a[1].epoch
    assert "w2 keeps training as an async worker: beyond the largest power of two (2)" in caplog.text
    assert g.rank_of("w1") is None  # not active yet: its async pushes are still accepted
    g.set_active("w1", a[1].group_id)
    assert g.rank_of("w1") == 1


def test_four_form_one_group_and_a_fifth_stays_async():
    g, clock = formation(5)
    clock.t += 3
    a = [g.assignment(f"w{i}") for i in range(5)]
    assert [x.rank for x in a[:4]] == [0, 1, 2, 3] and a[4] is None
    g.add("w5", "g", "fp", "127.0.0.1:10005")  # a sixth arrives: with the fifth, a second group of 2
    clock.t += 3
    b = g.assignment("w5")
    assert b is not None and b.world_size == 2 and b.group_id != a[0].group_id
    assert g.assignment("w4").rank == 0


def test_auto_groups_by_fingerprint():
    clock = Clock()
    g = GroupFormation(settle_s=1, clock=clock)
    for i, fp in enumerate(["a100", "h100", "a100", "h100"]):
        g.add(f"w{i}", "auto", fp, f"h:{i}")
    clock.t += 2
    a = [g.assignment(f"w{i}") for i in range(4)]
    assert a[0].group_id == a[2].group_id != a[1].group_id == a[3].group_id
    assert group_key("auto", "a100") == "auto:a100" and group_key("name", "x") == "name"


def test_member_loss_reforms_with_survivors_keeping_rank_order():
    g, clock = formation(4)
    clock.t += 3
    first = g.assignment("w0")
    assert first.world_size == 4
    g.remove("w1", "lease expired")
    assert all(g.assignment(f"w{i}") is None for i in (0, 2, 3))  # dissolved: async until re-formed
    clock.t += 3
    a = {i: g.assignment(f"w{i}") for i in (0, 2, 3)}
    assert a[0].world_size == 2 and a[0].rank == 0 and a[2].rank == 1 and a[3] is None
    assert a[0].epoch > first.epoch and a[0].peers == ("127.0.0.1:10000", "127.0.0.1:10002")


def test_reported_failure_suspends_non_survivors_until_they_report():
    g, clock = formation(2)
    clock.t += 3
    a0 = g.assignment("w0")
    g.report_failure("w0", a0.group_id, a0.epoch, survivor_ranks=[0])  # w1 stalled
    clock.t += 3
    assert g.assignment("w0") is None and g.assignment("w1") is None  # w1 suspended, w0 alone
    g.report_failure("w1", a0.group_id, a0.epoch, survivor_ranks=[1])  # w1 is alive after all
    clock.t += 3
    b = g.assignment("w1")
    assert b is not None and b.world_size == 2 and b.epoch > a0.epoch
    # an old report changes nothing
    g.report_failure("w0", a0.group_id, a0.epoch, [0])
    assert g.assignment("w0").epoch == b.epoch


def test_no_advertised_address_stays_async():
    clock = Clock()
    g = GroupFormation(settle_s=0, clock=clock)
    g.add("w0", "g", "fp", "")
    g.add("w1", "g", "fp", "h:1")
    assert g.assignment("w0") is None and g.assignment("w1") is None


# --------------------------------------------------------------------------- coordinator hooks


def test_coordinator_assigns_groups_refuses_rank1_pushes_and_reforms_on_drop(tmp_path):
    import pytest
    import torch

    from geotrain.protos.rpc import PROTOCOL_VERSION
    from geotrain.coordinator.state import CoordinatorState, FailedPrecondition
    from states import delta_like, push, small_run
    from geotrain.common.prepare import prepare
    from geotrain.common.reader import TokenData

    root = tmp_path / "data"
    root.mkdir()
    (root / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 3000)
    prepare([root / "a.txt"], root / "tokens", progress=False)
    now = [0.0]
    state = CoordinatorState(small_run(), TokenData(root / "tokens"), tmp_path / "run", clock=lambda: now[0])
    recs = []
    for i in range(3):  # rank order = join order
        recs.append(state.join(f"w{i}", "cpu", 0, "0", PROTOCOL_VERSION, "fp", f"127.0.0.1:{9000 + i}", "demo")[0])
        now[0] += 0.1
    leases = [state.lease(r.worker_id, r.session_id)[1] for r in recs]
    now[0] += 5
    a = [state.group_assignment(r.worker_id) for r in recs]
    assert [x.rank for x in a[:2]] == [0, 1] and a[2] is None
    # rank 1 has not confirmed the group yet: its async push is still merged
    assert push(state, recs[1], leases[1], delta_like(state, 0.0), "early").accepted
    state.group_assignment(recs[1].worker_id, a[1].group_id)  # now it trains in the group
    with pytest.raises(FailedPrecondition):
        push(state, recs[1], leases[1], delta_like(state, 0.0), "late")
    state.group_assignment(recs[0].worker_id, a[0].group_id)
    assert push(state, recs[0], leases[0], delta_like(state, 0.0), "rank0").accepted
    # rank 0 goes silent and is dropped: the group dissolves; w1 and w2 re-form after the settle time
    for r in recs[1:]:
        state.heartbeat(r.worker_id, r.session_id, {})
    now[0] += state.run.workers.lease_seconds + 1
    for r in recs[1:]:
        state.heartbeat(r.worker_id, r.session_id, {})
    state.tick()
    assert recs[0].worker_id not in state.workers
    assert state.group_assignment(recs[1].worker_id) is None
    now[0] += 5
    b = [state.group_assignment(r.worker_id) for r in recs[1:]]
    assert [x.rank for x in b] == [0, 1] and b[0].epoch > a[0].epoch
    assert b[0].peers == ("127.0.0.1:9001", "127.0.0.1:9002")
