"""Downlink "relay": workers replay the coordinator's merges on the pushed deltas, bit-exactly."""

from __future__ import annotations

import pytest
import torch

from geotrain.common.compression import decode_tensors, encode_tensors
from geotrain.common.config import CompressionConfig, RunConfig, RoundConfig
from geotrain.common.tensors import clone_tensors, params_sha256
from geotrain.common.merge import OuterOptimizer, weighted_sum
from geotrain.coordinator.service import _update_info
from geotrain.coordinator.state import CoordinatorState
from geotrain.protos import geotrain_pb2 as pb
from states import join, small_run
from geotrain.coordinator.ledger import TrainedRange
from geotrain.common import merge
from geotrain.worker.downlink import replayed_version


def replay_relayed(info, *args):
    """common.merge.replay_relayed on the worker's plain form of the wire message."""
    return merge.replay_relayed(replayed_version(info), *args)


def relay_run(**changes) -> RunConfig:
    return small_run(merge__policy="semi-sync", outer__kind="nesterov", outer__lr=0.7, outer__momentum=0.9,
                     compression__scheme="sign", **changes)


class TwoWorkers:
    """Two joined workers pushing sign-coded random deltas (unequal token counts, so some merges
    are partial) into a semi-sync state: one merge per round."""

    def __init__(self, state: CoordinatorState):
        self.state = state
        self.workers = [join(state, f"w{i}") for i in range(2)]
        self.used = [0, 0]
        self.round = 0

    def rounds(self, n: int) -> dict[str, bytes]:
        """Runs n merges; returns every push's payload by push id ("p{round}-{worker}")."""
        state, blobs = self.state, {}
        for _ in range(n):
            k = self.round
            gen = torch.Generator().manual_seed(k)
            for i, (record, r) in enumerate(self.workers):
                delta = {name: torch.randn(t.shape, generator=gen) * 0.01 for name, t in state.global_params.items()}
                blob, _ = encode_tensors(delta, "sign")
                tokens = 64 if (i + k) % 3 else 32
                start = r.start + self.used[i]
                outcome = state.push(record.worker_id, record.session_id, f"p{k}-{i}", state.version, tokens, 1,
                                     2.5, [TrainedRange(r.unit_id, start, start + tokens, r.epoch)], blob)
                assert outcome.accepted, outcome.message
                self.used[i] += tokens
                blobs[f"p{k}-{i}"] = blob
            self.round += 1
        return blobs


def replica_for(state) -> OuterOptimizer:
    replica = OuterOptimizer(state.run.outer, state.spec)
    replica.load_momentum({n: torch.zeros_like(t) for n, t in state.global_params.items()})
    return replica


def test_a_worker_replays_relayed_merges_bit_identically(data, tmp_path):  # noqa: F811
    state = CoordinatorState(relay_run(), data, tmp_path)
    assert state.run.compression.downlink == "relay"  # the default
    initial = clone_tensors(state.global_params)
    blobs = TwoWorkers(state).rounds(4)
    assert state.version == 5
    held = {"p1-0": blobs["p1-0"], "p3-1": blobs["p3-1"]}  # what "worker 0/1" still holds
    reply = state.model_reply(1, False, 0.0, held_push_ids=set(held))
    assert reply.kind == "UPDATES" and len(reply.updates) == 4
    infos = [_update_info(u) for u in reply.updates]
    omitted = [d.push_id for info in infos for d in info.relayed if d.size == 0]
    assert sorted(omitted) == sorted(held)
    assert len(reply.blob) == sum(len(b) for pid, b in blobs.items() if pid not in held)
    assert any(info.outer_fraction < 1.0 for info in infos)  # the partial merges are replayed too

    replica = replica_for(state)
    weights = clone_tensors(initial)
    decode = lambda b: decode_tensors(b, state.spec)  # noqa: E731
    for info in infos:
        update = replay_relayed(info, reply.blob, held, decode, replica)
        for n, t in weights.items():
            t.add_(update[n])
        assert params_sha256(weights) == info.params_sha256, f"version {info.version} differs"
    assert params_sha256(weights) == state.params_sha
    for n, m in replica.momentum.items():
        assert torch.equal(m, state.outer.momentum[n])


def test_a_full_reply_carries_the_outer_momentum(data, tmp_path):  # noqa: F811
    state = CoordinatorState(relay_run(), data, tmp_path)
    workers = TwoWorkers(state)
    workers.rounds(2)
    reply = state.model_reply(0, True, 0.0)
    assert reply.kind == "FULL" and reply.momentum_bytes > 0
    weights = decode_tensors(reply.blob[: -reply.momentum_bytes], state.spec)
    momentum = decode_tensors(reply.blob[-reply.momentum_bytes :], state.spec)
    assert params_sha256(weights) == state.params_sha
    assert any(m.abs().sum() > 0 for m in momentum.values())
    for n, m in momentum.items():
        assert torch.equal(m, state.outer.momentum[n])
    # A worker starting from it replays the next merge exactly.
    replica = replica_for(state)
    replica.load_momentum(momentum)
    blobs = workers.rounds(1)
    reply = state.model_reply(3, False, 0.0)
    (info,) = [_update_info(u) for u in reply.updates]
    update = replay_relayed(info, reply.blob, {}, lambda b: decode_tensors(b, state.spec), replica)
    for n, t in weights.items():
        t.add_(update[n])
    assert params_sha256(weights) == state.params_sha and len(blobs) == 2


def test_combine_downlink_sends_one_payload_that_workers_replay_bit_identically(data, tmp_path):  # noqa: F811
    state = CoordinatorState(relay_run(compression__downlink="combine"), data, tmp_path)
    initial = clone_tensors(state.global_params)
    blobs = TwoWorkers(state).rounds(4)
    reply = state.model_reply(1, False, 0.0, held_push_ids={"p1-0"})  # held pushes change nothing here
    infos = [_update_info(u) for u in reply.updates]
    assert [len(info.relayed) for info in infos] == [1, 1, 1, 1]
    assert all(d.size > 0 and d.weight == 1.0 and d.factor == 1.0 for info in infos for d in info.relayed)
    assert len({d.push_id for info in infos for d in info.relayed} & set(blobs)) == 0
    # one sign payload per version, about the size of one pushed delta
    push_size = max(len(b) for b in blobs.values())
    assert all(d.size <= push_size + 64 for info in infos for d in info.relayed)
    assert len(reply.blob) < 4 * (push_size + 64)
    # the feedback residual holds what the 1-bit downlink dropped (so it is lossy, and kept)
    residual = state.down_feedback.state_dict()
    assert residual and any(r.abs().sum() > 0 for r in residual.values())

    replica = replica_for(state)
    weights = clone_tensors(initial)
    decode = lambda b: decode_tensors(b, state.spec)  # noqa: E731
    for info in infos:
        update = replay_relayed(info, reply.blob, {}, decode, replica)
        for n, t in weights.items():
            t.add_(update[n])
        assert params_sha256(weights) == info.params_sha256, f"version {info.version} differs"
    for n, m in replica.momentum.items():
        assert torch.equal(m, state.outer.momentum[n])
    assert state.model_reply(0, True, 0.0).momentum_bytes > 0  # a FULL reply carries the momentum


def test_recode_downlink_sends_one_compressed_update(data, tmp_path):  # noqa: F811
    state = CoordinatorState(relay_run(compression__downlink="recode"), data, tmp_path)
    TwoWorkers(state).rounds(2)
    reply = state.model_reply(1, False, 0.0)
    assert reply.kind == "UPDATES" and all(not u.record.relayed for u in reply.updates)
    assert state.model_reply(0, True, 0.0).momentum_bytes == 0


def test_bad_relayed_updates_are_refused_and_change_nothing(data, tmp_path):  # noqa: F811
    state = CoordinatorState(relay_run(), data, tmp_path)
    blobs = TwoWorkers(state).rounds(1)
    reply = state.model_reply(1, False, 0.0, held_push_ids={"p0-0"})
    (info,) = [_update_info(u) for u in reply.updates]
    replica = replica_for(state)
    before = clone_tensors(replica.momentum)
    decode = lambda b: decode_tensors(b, state.spec)  # noqa: E731
    with pytest.raises(ValueError, match="omits push p0-0"):
        replay_relayed(info, reply.blob, {}, decode, replica)
    with pytest.raises(ValueError, match="outside the stream"):
        replay_relayed(info, reply.blob[:-1], {"p0-0": blobs["p0-0"]}, decode, replica)
    with pytest.raises(ValueError):  # a payload that is not the model's (truncated)
        replay_relayed(info, reply.blob, {"p0-0": blobs["p0-0"][:-5]}, decode, replica)
    empty = pb.UpdateInfo(version=info.version, params_sha256=info.params_sha256)
    with pytest.raises(ValueError, match="relays no deltas"):
        replay_relayed(empty, reply.blob, {}, decode, replica)
    bad_fraction = pb.UpdateInfo()
    bad_fraction.CopyFrom(info)
    bad_fraction.outer_fraction = 0.0
    with pytest.raises(ValueError, match="fraction"):
        replay_relayed(bad_fraction, reply.blob, {"p0-0": blobs["p0-0"]}, decode, replica)
    for n, m in replica.momentum.items():
        assert torch.equal(m, before[n])


def test_weighted_sum_applies_factor_then_weight_in_order():
    a = {"w": torch.tensor([1.0, -2.0, 3.0])}
    b = {"w": torch.tensor([0.5, 0.5, -0.5])}
    out = weighted_sum([a, b], [0.5, 1.0], [0.25, 0.75])
    expected = (a["w"] * 0.5) * 0.25 + b["w"] * 0.75
    assert torch.equal(out["w"], expected)
    with pytest.raises(ValueError, match="as many factors"):
        weighted_sum([a, b], [1.0], [0.5, 0.5])


def test_bad_scheme_chunk_or_zstd_level_is_refused_and_schemes_match_the_codecs():
    from geotrain.common.compression import SCHEMES
    from geotrain.common.config import DELTA_SCHEMES

    assert DELTA_SCHEMES == SCHEMES
    with pytest.raises(ValueError, match="compression.scheme .*'int3'"):
        CompressionConfig(scheme="int3").validate()
    with pytest.raises(ValueError, match="compression.chunk"):
        CompressionConfig(chunk=0).validate()
    with pytest.raises(ValueError, match="compression.zstd_level"):
        CompressionConfig(zstd_level=99).validate()
    with pytest.raises(ValueError, match="compression.downlink_scheme"):
        CompressionConfig(downlink_scheme="int2").validate()
    assert CompressionConfig(scheme="sign").down_scheme == "sign"
    assert CompressionConfig(scheme="sign", downlink_scheme="ternary").down_scheme == "ternary"


def test_unknown_downlink_or_sync_schedule_is_refused():
    with pytest.raises(ValueError, match="compression.downlink"):
        CompressionConfig(downlink="broadcast").validate()
    run = RunConfig()
    run.compression.downlink = "nope"
    with pytest.raises(ValueError, match="'nope'"):
        run.validate()
    with pytest.raises(ValueError, match="compression.sync_schedule"):
        CompressionConfig(sync_schedule="ring").validate()
    with pytest.raises(ValueError, match="compression.last_scheme"):
        CompressionConfig(last_scheme="sign").validate()
    with pytest.raises(ValueError, match="round.max_lag_steps"):
        RoundConfig(max_lag_steps=-1).validate()
    from geotrain.worker.allreduce import ALGORITHMS
    from geotrain.common.config import SYNC_SCHEDULES

    assert set(SYNC_SCHEDULES) == set(ALGORITHMS)  # every schedule the config admits exists
