"""Coordinator state and its gRPC adapter: merges, policies, hostile pushes, restart."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
import torch

from geotrain.common.compression import encode_tensors
from geotrain.common.config import OuterConfig, RunConfig
from geotrain.common.prepare import prepare
from geotrain.common.reader import TokenData
from geotrain.protos.rpc import PROTOCOL_VERSION, iter_chunks, make_channel
from geotrain.common.tensors import clone_tensors, params_sha256
from geotrain.coordinator.ledger import TrainedRange
from geotrain.common.merge import OuterOptimizer
from geotrain.coordinator.server import CoordinatorServer
from geotrain.coordinator.state import (
    AlreadyExists,
    CoordinatorState,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from geotrain.protos import geotrain_pb2 as pb
from geotrain.protos import geotrain_pb2_grpc as pb_grpc
from states import delta_like, join, nan_blob, push, small_run


def test_average_merge_moves_global_along_the_delta(data, tmp_path):
    state = CoordinatorState(small_run(), data, tmp_path)
    before = clone_tensors(state.global_params)
    record, r = join(state)
    outcome = push(state, record, r, delta_like(state, 0.01))
    assert outcome.accepted and state.version == 2
    for n, t in state.global_params.items():
        assert torch.allclose(t - before[n], torch.full_like(t, 0.01), atol=1e-7)
    assert state.ledger.committed_total == 64


def test_a_retried_lease_request_gets_the_same_range(data, tmp_path):
    """A LeaseWork retry (same request id: its first reply was lost) gets the range the first
    attempt was granted, not a second one the worker would never know it holds."""
    state = CoordinatorState(small_run(), data, tmp_path)
    record, _ = state.join("w", "cpu", 0, "0", PROTOCOL_VERSION, "fp", "", "")
    first = state.lease(record.worker_id, record.session_id, "req-1")
    again = state.lease(record.worker_id, record.session_id, "req-1")
    assert first == again and first[1] is not None
    assert len(state.ledger.held_by(record.worker_id)) == 1
    other = state.lease(record.worker_id, record.session_id, "req-2")
    assert other[1] is not None and other[1].unit_id != first[1].unit_id
    assert len(state.ledger.held_by(record.worker_id)) == 2


def test_nesterov_outer_step_sign_and_momentum(data, tmp_path):
    run = small_run(outer__kind="nesterov", outer__lr=0.5, outer__momentum=0.9)
    state = CoordinatorState(run, data, tmp_path)
    before = clone_tensors(state.global_params)
    record, r = join(state)
    push(state, record, r, delta_like(state, 0.01))
    # m = 0.01; update = lr * (d + mu * m) = 0.5 * (0.01 + 0.009) = 0.0095, along the delta
    name = next(iter(before))
    moved = state.global_params[name] - before[name]
    assert torch.allclose(moved, torch.full_like(moved, 0.0095), atol=1e-7)


def test_finished_run_drops_the_nesterov_lookahead_but_a_stopped_one_keeps_it(data, tmp_path):
    """The last version of a finished nesterov run is the global model minus lr * mu * m; a run
    stopped mid-way (finish() from the server's stop) keeps its model for the resume."""
    for budget, dropped in ((64, True), (0, False)):
        run = small_run(outer__kind="nesterov", outer__lr=0.5, outer__momentum=0.9, plan__max_tokens=budget)
        state = CoordinatorState(run, data, tmp_path / f"b{budget}")
        before = clone_tensors(state.global_params)
        record, r = join(state)
        push(state, record, r, delta_like(state, 0.01))  # moves 0.5 * (0.01 + 0.9 * 0.01) = 0.0095
        state.tick()  # budget 64: every token merged -> "finished" -> finish()
        summary = state.finish()
        assert (state.state == "finished") == dropped
        want = 0.0095 - (0.5 * 0.9 * 0.01 if dropped else 0.0)
        assert state.version == (3 if dropped else 2) and summary["model_version"] == state.version
        for n, t in state.global_params.items():
            assert torch.allclose(t - before[n], torch.full_like(t, want), atol=1e-7), n


def test_nesterov_partial_merge_moves_by_its_share():
    """A merge carrying a quarter of a typical merge's tokens and no new progress moves the model
    by a quarter of the momentum lookahead (not a full momentum step) and decays m by mu**0.25."""
    opt = OuterOptimizer(OuterConfig(kind="nesterov", lr=0.5, momentum=0.8), {"w": (3,)})
    full = {"w": torch.full((3,), 0.01)}
    first = opt.update(full, tokens=400)["w"]
    assert torch.allclose(first, torch.full((3,), 0.5 * (0.01 + 0.8 * 0.01)))  # DiLoCo step
    same = opt.update(full, tokens=400)["w"]  # m = 0.8 * 0.01 + 0.01 = 0.018
    assert torch.allclose(same, torch.full((3,), 0.5 * (0.01 + 0.8 * 0.018)))
    assert opt.round_fraction(100) == 0.25 and opt.round_fraction(4000) == 1.0
    tail = opt.update({"w": torch.zeros(3)}, tokens=100)["w"]
    m = 0.8**0.25 * 0.018
    assert torch.allclose(opt.momentum["w"], torch.full((3,), m))
    assert torch.allclose(tail, torch.full((3,), 0.5 * 0.25 * 0.8 * m))


def test_semi_sync_waits_for_every_worker_holding_data(data, tmp_path):
    state = CoordinatorState(small_run(merge__policy="semi-sync"), data, tmp_path)
    a, ra = join(state, "a")
    b, rb = join(state, "b")
    state.join("c", "cpu", 0, "0", PROTOCOL_VERSION, "fp", "", "")  # no lease yet: not waited for
    push(state, a, ra, delta_like(state, 0.01), "a1")
    assert state.version == 1 and len(state.pending) == 1  # b trains leased data: wait for it
    push(state, b, rb, delta_like(state, 0.01), "b1")
    assert state.version == 2 and not state.pending
    assert state.history[-1].merged_push_ids == ["a1", "b1"]


def test_semi_sync_timeout_merges_without_a_straggler(data, tmp_path):
    now = [0.0]
    state = CoordinatorState(small_run(merge__policy="semi-sync", merge__semi_sync_timeout=5.0), data, tmp_path,
                             clock=lambda: now[0])
    a, ra = join(state, "a")
    b, rb = join(state, "b")
    push(state, a, ra, delta_like(state, 0.0), "a1")
    push(state, b, rb, delta_like(state, 0.0), "b1")
    assert state.version == 2
    push(state, a, TrainedRange(ra.unit_id, ra.start + 64, ra.start + 128, ra.epoch), delta_like(state, 0.0), "a2")
    assert state.version == 2  # waiting for b
    now[0] += 4.0
    state.tick()
    assert state.version == 2
    now[0] += 2.0
    state.tick()
    assert state.version == 3


def test_hostile_pushes_are_refused_and_change_nothing(data, tmp_path):
    state = CoordinatorState(small_run(), data, tmp_path)
    record, r = join(state)
    sha, version = state.params_sha, state.version

    with pytest.raises(InvalidArgument, match="(?i)finite|nan"):
        state.push(record.worker_id, record.session_id, "nan", version, 64, 1, 1.0,
                   [TrainedRange(r.unit_id, r.start, r.start + 64, r.epoch)], nan_blob(delta_like(state, 0.01)))
    wrong_shape = delta_like(state, 0.01)
    name = next(iter(wrong_shape))
    wrong_shape[name] = torch.zeros(3, 3)
    with pytest.raises(InvalidArgument):
        push(state, record, r, wrong_shape, "shape")
    with pytest.raises(InvalidArgument):
        state.push(record.worker_id, record.session_id, "garbage", version, 64, 1, 1.0,
                   [TrainedRange(r.unit_id, r.start, r.start + 64, r.epoch)], b"\x00" * 100)
    with pytest.raises(FailedPrecondition, match="restarted"):
        push(state, record, r, delta_like(state, 0.01), "future", base=version + 5)
    with pytest.raises(InvalidArgument, match="not leased"):
        state.push(record.worker_id, record.session_id, "foreign", version, 64, 1, 1.0,
                   [TrainedRange((r.unit_id + 1) % len(state.ledger.units), 0, 64, r.epoch)],
                   encode_tensors(delta_like(state, 0.01), "none")[0])
    with pytest.raises(NotFound):
        state.push(record.worker_id, "wrong-session", "x", version, 64, 1, 1.0, [], b"")
    assert (state.params_sha, state.version, state.ledger.committed_total) == (sha, version, 0)

    assert push(state, record, r, delta_like(state, 0.01), "ok").accepted
    with pytest.raises(AlreadyExists):  # replay of a merged push
        push(state, record, TrainedRange(r.unit_id, r.start + 64, r.end, r.epoch), delta_like(state, 0.01), "ok")
    assert state.version == version + 1


def test_too_stale_delta_is_reported_not_merged(data, tmp_path):
    state = CoordinatorState(small_run(merge__max_staleness=1), data, tmp_path)
    a, ra = join(state, "a")
    b, rb = join(state, "b")
    for i in range(3):
        push(state, a, TrainedRange(ra.unit_id, ra.start + 64 * i, ra.start + 64 * (i + 1), ra.epoch),
             delta_like(state, 0.001), f"a{i}")
    outcome = push(state, b, rb, delta_like(state, 0.01), "b-stale", base=1)
    assert not outcome.accepted and outcome.staleness == 3
    assert state.ledger.units[rb.unit_id].committed == rb.start


def test_silent_worker_is_dropped_and_its_tokens_return(data, tmp_path):
    now = [0.0]
    state = CoordinatorState(small_run(), data, tmp_path, clock=lambda: now[0])
    record, r = join(state)
    push(state, record, r, delta_like(state, 0.0), "p")
    now[0] += state.run.workers.lease_seconds + 1
    state.tick()
    assert record.worker_id not in state.workers
    unit = state.ledger.units[r.unit_id]
    assert unit.holder == "" and unit.committed == r.start + 64


def test_restart_resumes_from_checkpoint(data, tmp_path):
    state = CoordinatorState(small_run(), data, tmp_path)
    record, r = join(state)
    push(state, record, r, delta_like(state, 0.01), "p")
    state.checkpoint()
    again = CoordinatorState(small_run(), data, tmp_path)
    assert again.version == state.version
    assert params_sha256(again.global_params) == state.params_sha
    assert again.ledger.committed_total == 64
    assert again.ledger.units[r.unit_id].holder == ""  # leases do not survive a restart
    # merges after the checkpoint are lost with a crash, but the version number never goes back
    record2, r2 = join(again, "w2")
    push(again, record2, r2, delta_like(again, 0.01), "after-checkpoint")
    lost_version = again.version
    third = CoordinatorState(small_run(), data, tmp_path)
    assert third.version == lost_version + 1
    assert params_sha256(third.global_params) == state.params_sha
    other = small_run()
    other.model.n_embd = 64
    with pytest.raises(ValueError, match="checkpoint"):
        CoordinatorState(other, data, tmp_path)


def test_join_refuses_protocol_mismatch_and_junk_names(data, tmp_path):
    state = CoordinatorState(small_run(), data, tmp_path)
    with pytest.raises(FailedPrecondition, match="protocol version mismatch"):
        state.join("w", "cpu", 0, "0", PROTOCOL_VERSION + 1, "", "", "")
    with pytest.raises(InvalidArgument, match="name"):
        state.join("bad name; rm -rf", "cpu", 0, "0", PROTOCOL_VERSION, "", "", "")
    with pytest.raises(InvalidArgument, match="name"):
        state.join("x" * 65, "cpu", 0, "0", PROTOCOL_VERSION, "", "", "")


# --------------------------------------------------------------------------- over real gRPC


@pytest.fixture
def server(data, tmp_path):
    srv = CoordinatorServer(small_run(), data, tmp_path / "run", host="127.0.0.1", port=0, token="secret")
    port = srv.start()
    yield srv, f"127.0.0.1:{port}"
    srv.server.stop(0)


def _join_rpc(stub, token="secret"):
    return stub.Join(
        pb.JoinRequest(name="w", device="cpu", protocol_version=PROTOCOL_VERSION),
        metadata=(("authorization", f"Bearer {token}"),), timeout=10,
    )


def _delta_stream(header, blob):
    yield pb.DeltaPart(header=header)
    for chunk in iter_chunks(blob, 4096):
        yield pb.DeltaPart(chunk=chunk)


def test_grpc_auth_push_and_truncated_stream(server):
    srv, target = server
    stub = pb_grpc.CoordinatorStub(make_channel(target))
    with pytest.raises(grpc.RpcError) as err:
        _join_rpc(stub, token="wrong")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = _join_rpc(stub)
    md = (("authorization", "Bearer secret"),)
    lease = stub.LeaseWork(pb.LeaseRequest(worker_id=reply.worker_id, session_id=reply.session_id), metadata=md, timeout=10)
    parts = list(stub.GetModel(pb.ModelRequest(worker_id=reply.worker_id, session_id=reply.session_id), metadata=md, timeout=10))
    assert parts[0].header.kind == pb.ModelHeader.FULL and parts[0].header.version == 1

    delta = {n: torch.full_like(t, 0.01) for n, t in srv.state.global_params.items()}
    blob, _ = encode_tensors(delta, "int8")
    rng = lease.range
    header = pb.DeltaHeader(
        worker_id=reply.worker_id, session_id=reply.session_id, push_id="p1", base_version=1, tokens=64, steps=1,
        mean_loss=2.0, ranges=[pb.TokenRange(unit_id=rng.unit_id, start=rng.start, end=rng.start + 64, epoch=rng.epoch)],
        total_bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
    )
    with pytest.raises(grpc.RpcError) as err:  # truncated: half the bytes announced
        stub.PushDelta(_delta_stream(header, blob[: len(blob) // 2]), metadata=md, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in err.value.details()
    assert srv.state.version == 1
    ok = stub.PushDelta(_delta_stream(header, blob), metadata=md, timeout=10)
    assert ok.result == pb.PushReply.ACCEPTED and ok.model_version == 2
    parts = list(stub.GetModel(pb.ModelRequest(worker_id=reply.worker_id, session_id=reply.session_id, have_version=1), metadata=md, timeout=10))
    assert parts[0].header.kind == pb.ModelHeader.UPDATES
    assert list(parts[0].header.updates[0].merged_push_ids) == ["p1"]
    assert parts[0].header.params_sha256 == srv.state.params_sha
    # Relayed (the default downlink): the update is our own push, which we hold: nothing to send
    # but the header, whose checksum is that of the empty blob (a client checks it).
    parts = list(stub.GetModel(pb.ModelRequest(worker_id=reply.worker_id, session_id=reply.session_id,
                                               have_version=1, held_push_ids=["p1"]), metadata=md, timeout=10))
    (info,) = parts[0].header.updates
    assert len(parts) == 1 and parts[0].header.total_bytes == 0 and info.relayed[0].size == 0
    assert parts[0].header.sha256 == hashlib.sha256(b"").hexdigest()


def test_worker_rebuilds_the_initial_model_from_the_seed(data, tmp_path):
    """Version 1 is reproducible from the run spec: a worker rebuilds it, checks the announced
    sha256, then needs only the updates since version 1 (or nothing). A different seed or a
    wrong checksum gives None (the worker downloads instead)."""
    import json

    from geotrain.common.config import ModelConfig, run_config_from_dict
    from geotrain.worker.runner import initial_weights_from_seed

    state = CoordinatorState(small_run(), data, tmp_path)
    spec = json.loads(state.run_spec(0))
    run, model = run_config_from_dict(spec["run"]), ModelConfig(**spec["model"])
    rng = torch.get_rng_state()
    weights = initial_weights_from_seed(run, model, spec["initial_sha256"])
    assert torch.equal(torch.get_rng_state(), rng), "the caller's RNG stream must not move"
    assert weights is not None and params_sha256(weights) == state.params_sha
    assert initial_weights_from_seed(run, model, "0" * 64) is None
    assert initial_weights_from_seed(run, model, "") is None
    run.train.seed += 1
    assert initial_weights_from_seed(run, model, spec["initial_sha256"]) is None

    assert state.model_reply(1, False, 0.0).kind == "UNCHANGED"
    record, r = join(state)
    push(state, record, r, delta_like(state, 0.01))
    reply = state.model_reply(1, False, 0.0)
    assert reply.kind == "UPDATES" and reply.version == 2
    # a later restart keeps announcing version 1's checksum (the seed's model), not the current one
    state.checkpoint()
    again = CoordinatorState(small_run(), data, tmp_path)
    assert json.loads(again.run_spec(0))["initial_sha256"] == spec["initial_sha256"] != again.params_sha


def test_updates_larger_than_the_weights_come_as_the_full_model(data, tmp_path):
    """fp32 updates of random values are about as large as the weights: past the size of the
    weights, a worker catching up gets the full model instead."""
    state = CoordinatorState(small_run(), data, tmp_path)
    for i in range(3):
        record, r = join(state, f"w{i}")
        push(state, record, r, {n: torch.randn_like(t) * 0.01 for n, t in state.global_params.items()}, f"p{i}")
    assert state.version == 4
    assert state.model_reply(3, False, 0.0).kind == "UPDATES"
    assert state.model_reply(1, False, 0.0).kind == "FULL"


def test_semi_sync_timeout_follows_the_merge_config(data, tmp_path):
    """Before a round was measured a semi-sync merge waits merge.first_semi_sync_timeout; then
    SEMI_SYNC_TIMEOUT_FACTOR median round times, at least SEMI_SYNC_TIMEOUT_MIN_S; a configured
    merge.semi_sync_timeout replaces both."""
    from geotrain.common.config import SEMI_SYNC_TIMEOUT_FACTOR, SEMI_SYNC_TIMEOUT_MIN_S

    state = CoordinatorState(small_run(merge__policy="semi-sync", merge__first_semi_sync_timeout=12.5), data, tmp_path)
    assert state.semi_sync_timeout() == 12.5
    state.round_times.extend([1.0, 2.0, 90.0])
    assert state.semi_sync_timeout() == SEMI_SYNC_TIMEOUT_MIN_S
    state.round_times.extend([8.0, 9.0])  # median 8
    assert state.semi_sync_timeout() == SEMI_SYNC_TIMEOUT_FACTOR * 8.0
    state.run.merge.semi_sync_timeout = 4.0
    assert state.semi_sync_timeout() == 4.0
