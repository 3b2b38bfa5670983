"""Downlink "count": 1-bit deltas with published per-tensor scales merge as counts of signs; each
worker gets per-value counts and replays the merge bit-identically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geotrain.common.compression import decode_tensors, encode_tensors
from geotrain.common.counts import decode_counts, encode_counts, packed_size
from geotrain.common.tensors import clone_tensors, params_sha256
from geotrain.coordinator.ledger import TrainedRange
from geotrain.common.merge import OuterOptimizer
from geotrain.coordinator.service import _update_info
from geotrain.coordinator.state import CoordinatorState
from geotrain.protos import geotrain_pb2 as pb
from states import join, small_run
from geotrain.common import merge
from geotrain.worker.downlink import replayed_version


def replay_relayed(info, *args):
    """common.merge.replay_relayed on the worker's plain form of the wire message."""
    return merge.replay_relayed(replayed_version(info), *args)


def replay_counted(info, *args):
    return merge.replay_counted(replayed_version(info), *args)


def count_run(**changes):
    settings = dict(merge__policy="semi-sync", outer__kind="nesterov", outer__lr=0.7, outer__momentum=0.9,
                    compression__scheme="tsign", compression__downlink="count")
    return small_run(**{**settings, **changes})


class Workers:
    """n joined workers pushing tsign deltas (each with its own scale per tensor, as
    worker/runner.py does); one semi-sync merge per round."""

    def __init__(self, state: CoordinatorState, n: int):
        self.state = state
        self.workers = [join(state, f"w{i}") for i in range(n)]
        self.used = [0] * n
        self.round = 0

    def rounds(self, count: int, tokens=lambda i, k: 64) -> dict[str, bytes]:
        state, blobs = self.state, {}
        for _ in range(count):
            k = self.round
            gen = torch.Generator().manual_seed(k)
            for i, (record, r) in enumerate(self.workers):
                delta = {name: torch.randn(t.shape, generator=gen) * 0.01 * (1 + i) for name, t in state.global_params.items()}
                blob, _ = encode_tensors(delta, "tsign")
                start = r.start + self.used[i]
                n_tok = tokens(i, k)
                outcome = state.push(record.worker_id, record.session_id, f"p{k}-{i}", state.version, n_tok, 1,
                                     2.5, [TrainedRange(r.unit_id, start, start + n_tok, r.epoch)], blob)
                assert outcome.accepted, outcome.message
                self.used[i] += n_tok
                blobs[f"p{k}-{i}"] = blob
            self.round += 1
        return blobs


def replica(state) -> OuterOptimizer:
    out = OuterOptimizer(state.run.outer, state.spec)
    out.load_momentum({n: torch.zeros_like(t) for n, t in state.global_params.items()})
    return out


def replay_all(state, initial, infos, stream, held):
    """A worker's replay of `infos` from the `initial` weights: every version's checksum matches."""
    weights = clone_tensors(initial)
    outer = replica(state)
    decode = lambda b: decode_tensors(b, state.spec)  # noqa: E731
    for info in infos:
        if info.HasField("counted"):
            update = replay_counted(info, stream, held, decode, outer, state.spec)
        else:
            update = replay_relayed(info, stream, held, decode, outer)
        for n, t in weights.items():
            t.add_(update[n])
        assert params_sha256(weights) == info.params_sha256, f"version {info.version} differs"
    return weights, outer


@pytest.mark.parametrize("rule", ["majority", "mean"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_count_merges_replay_bit_identically_for_members_and_others(data, tmp_path, n, rule):  # noqa: F811
    state = CoordinatorState(count_run(compression__count_rule=rule), data, tmp_path)
    initial = clone_tensors(state.global_params)
    blobs = Workers(state, n).rounds(4)
    assert state.version == 5
    kinds = [("counted" if u.counted else "relayed") for u in state.history]
    assert kinds == ["counted"] * 4
    # the merge's scale per tensor: the mean of the deltas' own (each worker's differs here)
    for name, scale in zip(state.spec, state.history[-1].counted.scales):
        own = [float(decode_tensors(blobs[f"p3-{i}"], state.spec)[name].abs().reshape(-1)[0]) for i in range(n)]
        assert scale == pytest.approx(sum(own) / n, rel=1e-6) and len(set(own)) == n
    # worker 0 holds its own pushes: agree counts against them; a worker holding none: plus counts
    held = {pid: b for pid, b in blobs.items() if pid.endswith("-0")}
    for hold in (held, {}):
        reply = state.model_reply(1, False, 0.0, held_push_ids=set(hold))
        infos = [_update_info(u) for u in reply.updates]
        refs = [i.counted.reference_push_id for i in infos if i.HasField("counted")]
        assert refs == ([f"p{k}-0" for k in (0, 1, 2, 3)] if hold else ["", "", "", ""])
        assert {i.counted.majority for i in infos} == {rule == "majority" and n >= 3}
        weights, outer = replay_all(state, initial, infos, reply.blob, hold)
        assert params_sha256(weights) == state.params_sha
        for name, m in outer.momentum.items():
            assert torch.equal(m, state.outer.momentum[name])
    # the counts are smaller than the N - 1 relayed sign payloads they replace
    reply = state.model_reply(4, False, 0.0, held_push_ids={"p3-0"})
    (info,) = [_update_info(u) for u in reply.updates]
    relayed_bytes = sum(len(blobs[f"p3-{i}"]) for i in range(1, n))
    assert info.counted.size < relayed_bytes * (0.75 if n >= 3 else 1.25), (info.counted.size, relayed_bytes)


def test_merges_that_are_not_counts_are_relayed(data, tmp_path):  # noqa: F811
    state = CoordinatorState(count_run(), data, tmp_path)
    workers = Workers(state, 2)
    workers.rounds(2)
    assert state.history[-1].counted is not None
    workers.rounds(1, tokens=lambda i, k: 64 if i == 0 else 48)  # a few steps apart: equal weights, counted
    assert state.history[-1].counted is not None
    workers.rounds(1, tokens=lambda i, k: 64 if i == 0 else 16)  # a partial delta: token weights, relayed
    assert state.history[-1].counted is None and len(state.history[-1].relayed) == 2
    assert [d.weight for d in state.history[-1].relayed] == [0.8, 0.2]
    # deltas based on an older version (stale) are relayed
    base = state.version - 1
    for i, (rec, rr) in enumerate(workers.workers):
        delta = {name: torch.randn(t.shape) * 0.01 for name, t in state.global_params.items()}
        blob, _ = encode_tensors(delta, "tsign")
        start = rr.start + workers.used[i]
        state.push(rec.worker_id, rec.session_id, f"s-{i}", base, 64, 1, 2.5,
                   [TrainedRange(rr.unit_id, start, start + 64, rr.epoch)], blob)
        workers.used[i] += 64
    assert state.history[-1].counted is None and len(state.history[-1].relayed) == 2
    # a delta that is not one scale x signs per tensor (a worker's last steps at 8 bits)
    for i, (rec, rr) in enumerate(workers.workers):
        delta = {name: torch.randn(t.shape) * 0.01 for name, t in state.global_params.items()}
        blob, _ = encode_tensors(delta, "int8" if i == 0 else "tsign")
        start = rr.start + workers.used[i]
        state.push(rec.worker_id, rec.session_id, f"x-{i}", state.version, 64, 1, 2.5,
                   [TrainedRange(rr.unit_id, start, start + 64, rr.epoch)], blob)
        workers.used[i] += 64
    assert state.history[-1].counted is None and state.history[-1].version == state.version


def test_count_runs_weigh_the_deltas_of_a_merge_equally():
    from geotrain.common.merge import Contribution, merge_weights

    cs = [Contribution(f"p{i}", f"w{i}", 5, tokens, 1, 0.0, {}) for i, tokens in enumerate((64, 70, 58))]
    assert merge_weights(cs, 5, 0.5, by_tokens=False) == [1 / 3] * 3
    assert merge_weights(cs, 5, 0.5) == [64 / 192, 70 / 192, 58 / 192]
    from geotrain.common.config import MergeConfig

    with pytest.raises(ValueError, match="merge.weights"):
        MergeConfig(weights="tokens2").validate()


def test_equal_merge_weights_for_a_relay_run(data, tmp_path):  # noqa: F811
    state = CoordinatorState(count_run(compression__downlink="relay", merge__weights="equal"), data, tmp_path)
    Workers(state, 2).rounds(1, tokens=lambda i, k: 64 if i == 0 else 16)
    assert [d.weight for d in state.history[-1].relayed] == [0.5, 0.5]


def test_bad_count_updates_are_refused_and_change_nothing(data, tmp_path):  # noqa: F811
    state = CoordinatorState(count_run(), data, tmp_path)
    blobs = Workers(state, 3).rounds(2)
    reply = state.model_reply(2, False, 0.0, held_push_ids={"p1-0"})
    (info,) = [_update_info(u) for u in reply.updates]
    outer = replica(state)
    before = clone_tensors(outer.momentum)
    decode = lambda b: decode_tensors(b, state.spec)  # noqa: E731
    held = {"p1-0": blobs["p1-0"]}
    with pytest.raises(ValueError, match="does not hold"):
        replay_counted(info, reply.blob, {}, decode, outer, state.spec)
    with pytest.raises(ValueError, match="outside the stream"):
        replay_counted(info, reply.blob[:-1], held, decode, outer, state.spec)
    bad = pb.UpdateInfo()
    bad.CopyFrom(info)
    bad.counted.deltas = 1
    with pytest.raises(ValueError, match="malformed"):
        replay_counted(bad, reply.blob, held, decode, outer, state.spec)
    bad.CopyFrom(info)
    del bad.counted.scales[-1]
    with pytest.raises(ValueError, match="malformed"):
        replay_counted(bad, reply.blob, held, decode, outer, state.spec)
    bad.CopyFrom(info)
    bad.counted.reference_push_id = "p1-9"
    with pytest.raises(ValueError, match="not one of the merged"):
        replay_counted(bad, reply.blob, held, decode, outer, state.spec)
    corrupt = bytearray(reply.blob)
    corrupt[info.counted.offset + info.counted.size - 5] ^= 0xFF  # inside the frame: checksum or content
    with pytest.raises(ValueError, match="count payload"):
        replay_counted(info, bytes(corrupt), held, decode, outer, state.spec)
    for n, m in outer.momentum.items():
        assert torch.equal(m, before[n])


def test_count_payloads_round_trip_and_refuse_garbage():
    rng = np.random.default_rng(0)
    for maxval, n in ((1, 9), (3, 1001), (4, 1001), (15, 17), (200, 5)):
        counts = rng.integers(0, maxval + 1, n).astype(np.uint8)
        payload = encode_counts(counts, maxval)
        assert np.array_equal(decode_counts(payload, n, maxval), counts)
    assert packed_size(1001, 3) == 251 and packed_size(1001, 4) == 501 and packed_size(5, 200) == 5
    # 2 workers: each agree count is one bit, so random agreement costs about a bit per value
    assert packed_size(1001, 1) == 126
    bits = rng.integers(0, 2, 100_000).astype(np.uint8)
    assert len(encode_counts(bits, 1)) < 100_000 / 8 * 1.01
    with pytest.raises(ValueError, match="padding"):
        decode_counts(encode_counts(np.ones(16, np.uint8), 1), 9, 1)  # bits 9-15 are padding
    payload = encode_counts(np.array([3, 1, 2], np.uint8), 3)
    with pytest.raises(ValueError, match="declares"):
        decode_counts(payload, 9, 3)  # another length
    with pytest.raises(ValueError, match="above 2"):
        decode_counts(payload, 3, 2)  # the 2-bit lane holds a 3
    with pytest.raises(ValueError, match="not a zstd frame"):
        decode_counts(b"garbage!" * 4, 3, 3)
    with pytest.raises(ValueError, match="above maxval"):
        encode_counts(np.array([5], np.uint8), 4)
    import zstandard

    padded = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(bytes([0b11000000]))
    with pytest.raises(ValueError, match="padding"):
        decode_counts(padded, 3, 3)
    with pytest.raises(ValueError, match="maxval"):
        encode_counts(np.array([0], np.uint8), 0)


def test_count_needs_tsign():
    from geotrain.common.config import CompressionConfig

    with pytest.raises(ValueError, match="'count' needs compression.scheme 'tsign'"):
        CompressionConfig(scheme="sign", downlink="count").validate()


def test_a_counted_worker_subtracts_the_merge_scale_times_its_signs(data, tmp_path):  # noqa: F811
    """The worker's side of a count merge: U replays bit-identically, and rebasing with
    counted_contribution leaves params - base = its delta - merge scale x its signs (what its own
    scale differed by, plus its own 1-bit error, stays in its weights for the next delta)."""
    from geotrain.common.merge import counted_contribution
    from geotrain.worker.rebase import apply_update

    state = CoordinatorState(count_run(), data, tmp_path)
    initial = clone_tensors(state.global_params)
    blobs = Workers(state, 3).rounds(1)
    reply = state.model_reply(1, False, 0.0, held_push_ids={"p0-1"})
    (info,) = [_update_info(u) for u in reply.updates]
    decode = lambda b: decode_tensors(b, state.spec)  # noqa: E731
    update = replay_counted(info, reply.blob, {"p0-1": blobs["p0-1"]}, decode, replica(state), state.spec)
    own = decode(blobs["p0-1"])
    contribution = counted_contribution(own, info.counted.scales, list(state.spec))
    delta = {n: own[n] * 1.5 for n in own}  # what the worker trained (its tsign payload lost the rest)
    base, params = clone_tensors(initial), {n: initial[n] + delta[n] for n in initial}
    apply_update(params, base, update, contribution)
    assert params_sha256(base) == state.params_sha
    for (name, scale) in zip(state.spec, info.counted.scales):
        expect = delta[name] - torch.where(torch.signbit(own[name]), -scale, scale)
        torch.testing.assert_close(params[name] - base[name], expect, rtol=0, atol=1e-6)
        assert float(contribution[name].abs().max()) == pytest.approx(scale)
    with pytest.raises(ValueError, match="scales"):
        counted_contribution(own, info.counted.scales[:-1], list(state.spec))


def test_scale_codes_round_trip_within_a_quarter_octave():
    from geotrain.common.counts import scale_codes, scales_from_codes

    s = np.array([0.0, 1.0, 0.5, 3.3e-3, 7.77, 1e-12, 1e30, 1e-40])
    codes = scale_codes(s)
    back = scales_from_codes(codes)
    assert codes.dtype == np.uint8 and back.dtype == np.float32
    assert codes[0] == 0 and back[0] == 0.0 and codes[1] == 128 and back[1] == 1.0 and back[2] == 0.5
    ratio = back[1:5] / s[1:5]
    assert np.all((ratio > 2 ** -0.125 - 1e-6) & (ratio < 2 ** 0.125 + 1e-6)), ratio  # nearest code
    assert codes[5] == 1 and codes[6] == 255 and codes[7] == 1  # clamped, never 0 for a positive scale
    assert back[129 - 128 + 1] != back[1]  # distinct codes, distinct scales
    every = scales_from_codes(np.arange(256, dtype=np.uint8))
    assert np.all(np.diff(every[1:]) > 0)  # monotone
    assert every[132] == np.float32(2.0) and every[124] == np.float32(0.5)  # powers of two exact
    assert np.array_equal(scale_codes(every[1:]), np.arange(1, 256, dtype=np.uint8))  # codes are fixed points
    for bad in ([-1.0], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="scales"):
            scale_codes(np.array(bad))


def test_count_step_grows_the_immediate_step_with_the_merge_and_keeps_the_total():
    from geotrain.common.config import OuterConfig
    from geotrain.common.merge import count_step

    cfg = OuterConfig()  # 0.8 / 0.8: total lr / (1 - mu) = 4, immediate lr x (1 + mu) = 1.44
    assert count_step(cfg, 0) == count_step(cfg, 1) == count_step(cfg, 2) == (0.8, 0.8)
    lr4, mu4 = count_step(cfg, 4)
    assert lr4 == pytest.approx(1.2, abs=0.01) and mu4 == pytest.approx(0.7, abs=0.01)
    for n in (3, 4):
        lr, mu = count_step(cfg, n)
        assert lr / (1 - mu) == pytest.approx(4.0)
        assert lr * (1 + mu) == pytest.approx(1.44 * (n / 2) ** 0.5)
    assert count_step(cfg, 8) == count_step(cfg, 64) == (lr4, mu4)  # 8 deltas: larger steps were worse
    assert count_step(OuterConfig(count_scaling=False), 4) == (0.8, 0.8)
    assert count_step(cfg, 3, majority=True) == count_step(cfg, 4, majority=True) == (0.8, 0.8)  # no scaling
    assert count_step(OuterConfig(kind="average", lr=1.0), 4) == (1.0, 0.8)


@pytest.mark.parametrize("scaling,rule", [(True, "majority"), (True, "mean"), (False, "mean")])
def test_a_count_merge_of_four_moves_the_model_by_its_count_step(data, tmp_path, scaling, rule):  # noqa: F811
    from geotrain.common.merge import count_step

    state = CoordinatorState(count_run(outer__lr=0.8, outer__momentum=0.8, outer__count_scaling=scaling,
                                       compression__count_rule=rule), data, tmp_path)
    before = clone_tensors(state.global_params)
    blobs = Workers(state, 4).rounds(1)
    scales = state.history[-1].counted.scales
    assert state.history[-1].counted.majority == (rule == "majority")
    lr, mu = count_step(state.run.outer, 4, majority=rule == "majority")
    scaled = scaling and rule == "mean"  # a majority merge takes the configured step
    assert (lr, mu) == ((pytest.approx(1.2, abs=0.01), pytest.approx(0.7, abs=0.01)) if scaled else (0.8, 0.8))
    for (name, t), scale in zip(state.global_params.items(), scales):
        k = sum(1 - 2 * torch.signbit(decode_tensors(blobs[f"p0-{i}"], state.spec)[name]).float() for i in range(4))
        if rule == "majority":  # the whole scale in the direction most signs take, 0 on a tie
            assert (k == 0).any() and (k.abs() == 2).any()
            k = 4 * torch.sign(k)
        mean = k * scale / 4  # first merge: m = D, update = lr x (1 + mu) x D
        torch.testing.assert_close(t - before[name], mean * lr * (1 + mu), rtol=1e-4, atol=1e-7)


def test_a_restarted_coordinator_keeps_the_last_merges_step_and_token_history(data, tmp_path):  # noqa: F811
    run = count_run(compression__count_rule="mean")  # an exact-count merge of 4 takes its own step
    state = CoordinatorState(run, data, tmp_path)
    Workers(state, 4).rounds(1)
    step, tokens = state.outer.last_step, list(state.outer.recent_tokens)
    assert step != (state.run.outer.lr, state.run.outer.momentum) and tokens  # a count merge's own step
    look = state.outer.lookahead()
    state.checkpoint()
    again = CoordinatorState(run, data, tmp_path)
    assert again.outer.last_step == pytest.approx(step) and list(again.outer.recent_tokens) == tokens
    for name, t in again.outer.lookahead().items():
        torch.testing.assert_close(t, look[name])


def test_majority_votes_cost_fewer_bytes_than_counts_and_refuse_garbage(data, tmp_path):  # noqa: F811
    sizes = {}
    for rule in ("majority", "mean"):
        state = CoordinatorState(count_run(compression__count_rule=rule), data, tmp_path / rule)
        Workers(state, 4).rounds(1)
        for held in ({"p0-0"}, set()):
            (info,) = [_update_info(u) for u in state.model_reply(1, False, 0.0, held_push_ids=held).updates]
            assert info.counted.majority == (rule == "majority")
            sizes[rule, bool(held)] = info.counted.size
    # independent signs: a vote is ~1.4 bits of entropy, the count of 3 others that agree ~1.8
    assert sizes["majority", True] < 0.85 * sizes["mean", True], sizes
    assert sizes["majority", False] < 0.85 * sizes["mean", False], sizes
    # a vote payload is 0..2 per value: a 3 (what an agree count may hold) is refused
    from geotrain.common.merge import majority_k_from_vote, vote_of

    k = torch.tensor([4, 2, 0, -2, -4, 2], dtype=torch.int16)
    own_negative = torch.tensor([False, True, False, False, True, False])
    assert vote_of(k).tolist() == [2, 2, 1, 0, 0, 2]
    assert vote_of(k, own_negative).tolist() == [2, 0, 1, 0, 2, 2]
    shapes = {"a": (2, 3)}
    for neg in (None, own_negative):
        back = majority_k_from_vote(vote_of(k, neg), 4, shapes, neg)["a"].reshape(-1)
        assert back.tolist() == [4, 4, 0, -4, -4, 4]
    with pytest.raises(ValueError, match="above"):
        decode_counts(encode_counts(np.array([3, 0, 1], np.uint8), 3), 3, 2)
