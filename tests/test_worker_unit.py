"""Worker unit tests: rebase arithmetic, client retries/rejoin/fatal refusals, the CLI."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
import torch
from click.testing import CliRunner

from geotrain.protos.rpc import CHUNK_BYTES, PROTOCOL_VERSION, Backoff, server_options, sha256_hex
from geotrain.protos import geotrain_pb2 as pb
from geotrain.protos import geotrain_pb2_grpc as pb_grpc
from geotrain.worker.client import CoordinatorClient, FatalError, parse_target
from geotrain.worker.rebase import apply_update, full_contains_push, rebase_full


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}


def _clone(t):
    return {k: v.clone() for k, v in t.items()}


# --------------------------------------------------------------------------- rebase arithmetic


def test_own_delta_merged_alone_keeps_params():
    base = _tensors(0)
    progress = _tensors(1)
    params = {k: base[k] + progress[k] for k in base}
    decoded = _clone(progress)  # our push, what the coordinator merged
    before = _clone(params)
    apply_update(params, base, decoded, own_decoded=decoded)  # outer update == own delta
    for k in params:
        assert torch.equal(params[k], before[k])  # nothing counted twice, nothing lost
        assert torch.allclose(base[k], before[k])


def test_own_delta_with_outer_optimizer_keeps_local_progress():
    base, params = _tensors(0), None
    d = _tensors(1)
    params = {k: base[k] + d[k] for k in base}
    more = _tensors(2)  # trained after the push
    for k in params:
        params[k] += more[k]
    update = {k: 0.7 * d[k] for k in d}  # an outer step that is not the plain delta
    apply_update(params, base, update, own_decoded=d)
    for k in params:
        assert torch.allclose(params[k] - base[k], more[k], atol=1e-6)


def test_foreign_update_moves_params_by_exactly_the_update():
    base, params, update = _tensors(0), _tensors(3), _tensors(4)
    p0, b0 = _clone(params), _clone(base)
    apply_update(params, base, update, own_decoded=None)
    for k in params:
        assert torch.equal(params[k], p0[k] + update[k])
        assert torch.equal(base[k], b0[k] + update[k])


def test_stale_push_keeps_everything():
    base = _tensors(0)
    params = {k: base[k] + v for k, v in _tensors(1).items()}
    local = {k: params[k] - base[k] for k in base}
    newest = _tensors(5)
    rebase_full(params, base, newest, own_decoded=None)  # STALE: rebase, subtract nothing
    for k in params:
        assert torch.equal(base[k], newest[k])
        assert torch.allclose(params[k] - base[k], local[k], atol=1e-6)


def test_full_with_own_push_subtracts_it():
    base = _tensors(0)
    d = _tensors(1)
    params = {k: base[k] + d[k] for k in base}
    full = {k: base[k] + 0.5 * d[k] for k in base}
    rebase_full(params, base, full, own_decoded=d)
    for k in params:
        assert torch.allclose(params[k], full[k], atol=1e-6)


def test_full_contains_push_rule():
    assert full_contains_push(5, 4, "p1", ["p0", "p1"]) is True
    assert full_contains_push(5, 4, "p1", []) is False  # queued, not merged yet
    assert full_contains_push(2, 4, "p1", []) is None  # coordinator lost history


# --------------------------------------------------------------------------- fake coordinator


class FakeCoordinator(pb_grpc.CoordinatorServicer):
    def __init__(self):
        self.join_failures = 0
        self.join_refusal: tuple[grpc.StatusCode, str] | None = None
        self.joins: list[pb.JoinRequest] = []
        self.lease_not_found = 0
        self.leases: list[pb.LeaseRequest] = []
        self.pushed: list[tuple[pb.DeltaHeader, bytes]] = []
        self.push_chunks: list[int] = []  # sizes of the last push's chunks
        self.model_blob = b"x" * (3 << 20)
        self.model_sha = ""  # "" = the blob's own; anything else announces a wrong checksum

    def Join(self, request, context):
        self.joins.append(request)
        if self.join_failures > 0:
            self.join_failures -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        if self.join_refusal:
            context.abort(*self.join_refusal)
        n = len(self.joins)
        return pb.JoinReply(worker_id=f"w{n}", session_id=f"s{n}", run_id="r", run_spec_json="{}",
                            protocol_version=PROTOCOL_VERSION, heartbeat_seconds=1.0)

    def LeaseWork(self, request, context):
        self.leases.append(request)
        if self.lease_not_found > 0:
            self.lease_not_found -= 1
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown session")
        return pb.LeaseReply(range=pb.TokenRange(unit_id=1, shard="train_000000.bin", start=0, end=640))

    def GetModel(self, request, context):
        blob = self.model_blob
        yield pb.ModelPart(header=pb.ModelHeader(kind=pb.ModelHeader.FULL, version=3, total_bytes=len(blob),
                                                 sha256=self.model_sha or sha256_hex(blob)))
        for i in range(0, len(blob), 1 << 20):
            yield pb.ModelPart(chunk=blob[i : i + (1 << 20)])

    def PushDelta(self, request_iterator, context):
        header, chunks = None, []
        for part in request_iterator:
            if part.WhichOneof("part") == "header":
                header = part.header
            else:
                chunks.append(part.chunk)
        blob = b"".join(chunks)
        self.push_chunks = [len(c) for c in chunks]
        self.pushed.append((header, blob))
        return pb.PushReply(result=pb.PushReply.ACCEPTED, model_version=4)


@pytest.fixture
def fake():
    servicer = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=server_options())
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def _client(target, **kw):
    return CoordinatorClient(target, token="t", stop_event=threading.Event(),
                             backoff=Backoff(base=0.01, cap=0.05, attempts=0), **kw)


def test_join_retries_unavailable_then_succeeds(fake):
    servicer, target = fake
    servicer.join_failures = 2
    client = _client(target)
    reply = client.join(pb.JoinRequest(name="w"))
    assert reply.worker_id == "w3" and len(servicer.joins) == 3
    assert servicer.joins[-1].protocol_version == PROTOCOL_VERSION
    assert client.sent_bytes > 0 and client.received_bytes > 0
    client.close()


def test_join_protocol_mismatch_is_fatal_with_message(fake):
    servicer, target = fake
    servicer.join_refusal = (grpc.StatusCode.FAILED_PRECONDITION, "protocol 1 required, got 9")
    client = _client(target)
    with pytest.raises(FatalError, match="protocol 1 required, got 9"):
        client.join(pb.JoinRequest(name="w"))
    client.close()


def test_not_found_rejoins_with_previous_worker_id(fake):
    servicer, target = fake
    rejoined = []
    client = _client(target, on_rejoin=rejoined.append)
    client.join(pb.JoinRequest(name="w"))
    servicer.lease_not_found = 1
    client.lease_work()
    assert servicer.joins[-1].previous_worker_id == "w1"
    assert client.worker_id == "w2" and len(rejoined) == 1
    # the refused lease was asked again under the new session, with the same request id (a retry
    # whose reply was lost must get the same range, not a second one)
    first, retry = servicer.leases
    assert (first.worker_id, first.session_id) == ("w1", "s1")
    assert (retry.worker_id, retry.session_id) == ("w2", "s2")
    assert retry.request_id == first.request_id != ""
    client.close()


def test_model_stream_and_push_chunks(fake):
    servicer, target = fake
    client = _client(target)
    client.join(pb.JoinRequest(name="w"))
    rep = client.get_model(0, expected_bytes=len(servicer.model_blob), max_bytes=8 << 20)
    assert rep.blob == servicer.model_blob  # reassembled from 3 streamed chunks
    with pytest.raises(ValueError):
        client.get_model(0, expected_bytes=1, max_bytes=1 << 20)  # announced size over the limit
    servicer.model_sha = "0" * 64
    with pytest.raises(ValueError, match="sha256"):
        client.get_model(0, expected_bytes=len(servicer.model_blob), max_bytes=8 << 20)  # corrupted in transit
    blob = bytes(range(256)) * 9000  # 2.2 MiB
    client.push_delta(pb.DeltaHeader(push_id="p1", base_version=3), blob)
    header, got = servicer.pushed[-1]
    # the client fills in who sends and what: ids of its session, size and checksum of the blob,
    # which it streams in chunks under the gRPC message limit
    assert got == blob and header.worker_id == "w1" and header.session_id == "s1"
    assert header.total_bytes == len(blob) and header.sha256 == sha256_hex(blob)
    assert servicer.push_chunks == [CHUNK_BYTES, CHUNK_BYTES, len(blob) - 2 * CHUNK_BYTES]
    assert client.sent_bytes > len(blob) and client.received_bytes > len(servicer.model_blob)
    client.close()


def test_a_push_of_an_old_session_is_not_sent_after_a_rejoin(fake):
    """A delta trained in session 1 must not go out under session 2 (its ranges were dropped with
    the old session and are trained again): SessionRenewed, and the coordinator receives nothing."""
    from geotrain.worker.client import SessionRenewed

    servicer, target = fake
    client = _client(target)
    client.join(pb.JoinRequest(name="w"))
    made_in = client.session_epoch
    servicer.lease_not_found = 1
    client.lease_work()  # NOT_FOUND: the client joins again
    assert client.session_epoch != made_in
    with pytest.raises(SessionRenewed, match="not sent"):
        client.push_delta(pb.DeltaHeader(push_id="old", base_version=3), b"x" * 100, session_epoch=made_in)
    assert servicer.pushed == []
    reply = client.push_delta(pb.DeltaHeader(push_id="new", base_version=3), b"x" * 100,
                              session_epoch=client.session_epoch)
    assert reply.result == pb.PushReply.ACCEPTED and servicer.pushed[-1][0].session_id == "s2"
    client.close()


# --------------------------------------------------------------------------- CLI


def test_batch_plan_shares_cover_the_plan_once():
    """A group's members split a plan's slots into contiguous shares: every slot exactly once."""
    from geotrain.worker.group_runner import plan_for, plan_slots

    for n, batch, remaining in [(2, 12, 1000), (4, 12, 30), (4, 3, 4), (8, 5, 1 << 20)]:
        plan = plan_for("s", 1, 100, remaining, n, batch)
        assert plan.sequences == min(n * batch, remaining)
        shares = [plan_slots(plan, r, n) for r in range(n)]
        assert shares[0][0] == 100 and shares[-1][1] == 100 + plan.sequences
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        assert all(hi > lo for lo, hi in shares)  # every member gets at least one sequence
    assert plan_for("s", 1, 100, 3, 4, 12) is None  # fewer sequences than members


def test_parse_target():
    assert parse_target("10.0.0.5:7000") == ("10.0.0.5", 7000)
    assert parse_target("[::1]:7000") == ("::1", 7000)
    for bad in ("localhost", "host:", ":7000", "host:99999", "::1:7000"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_help_lists_env_vars():
    from geotrain.worker.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for env in ("GEOTRAIN_COORDINATOR", "GEOTRAIN_TOKEN", "GEOTRAIN_PORT", "GEOTRAIN_METRICS_PORT"):
        assert env in result.output


def test_bad_coordinator_is_a_clear_error():
    from geotrain.worker.cli import main

    result = CliRunner().invoke(main, ["--coordinator", "localhost", "--port", "0"])
    assert result.exit_code == 2
    assert "HOST:PORT" in result.output


def test_cli_exits_nonzero_with_server_message_on_refusal(fake):
    from geotrain.worker.cli import main

    servicer, target = fake
    servicer.join_refusal = (grpc.StatusCode.FAILED_PRECONDITION, "protocol version mismatch: coordinator 1")
    result = CliRunner().invoke(main, ["--coordinator", target, "--port", "0", "--metrics-port", "0",
                                       "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert "protocol version mismatch: coordinator 1" in result.output


def _round_state():
    import torch

    from geotrain.worker.metrics import StatsBook
    from geotrain.worker.rebase import RoundState

    w = {"w": torch.zeros(3)}
    return RoundState(w, {"w": torch.zeros(3)}, 1, "run", StatsBook(), threading.Event())


def test_next_round_counts_from_the_merge_not_the_push():
    """A merged push restarts the round counter (the workers of a semi-sync merge push together
    again) and records its merge lag in local steps; an unmerged one changes neither."""
    from geotrain.worker.rebase import PendingRange, Push

    for merged in (False, True):
        state = _round_state()
        released = []
        state.release_push = released.append
        push = Push("p", 1, {}, n_ranges=1, steps=10, tokens=100, loss_sum=1.0, pushed_at_step=10)
        state.inflight, state.pending, state.sealed = push, [PendingRange(0, "s", 0, 100, 0, 10, 1.0, 0)], 1
        state.local_step, state.round_steps = 13, 3  # 3 steps trained since the push
        state.resolve(push, merged=merged)
        assert state.inflight is None and push.resolved
        assert released == ["p"]  # its held payload is let go either way
        s = state.stats.snapshot()
        if merged:
            assert state.round_steps == 0 and state.pending == []
            assert s.merged == 1 and s.merge_lag_steps == 3
        else:
            assert state.round_steps == 3 and len(state.pending) == 1
            assert s.merged == 0 and s.merge_lag_steps == 0


def test_a_push_takes_the_session_its_oldest_range_was_leased_in():
    """A rejoin can land between a step and its handling: ranges of the old session must not be
    pushed under the new one, and a range of the old session never grows into the new one."""
    from geotrain.worker.shards import Lease

    state = _round_state()
    old = Lease(7, "s", 0, 1000, 0, session=1)
    state.record_range(old, 0, 100, 1.0)
    # rejoined (the coordinator restarted), not handled yet: the same unit leased again, same place
    again = Lease(7, "s", 0, 1000, 0, session=2)
    state.record_range(again, 100, 200, 1.0)
    assert [p.session for p in state.pending] == [1, 2]  # not merged into one range
    assert state.push_session(2) == 1  # push_delta refuses it: SessionRenewed
    state.pending = state.pending[1:]
    assert state.push_session(2) == 2


# --------------------------------------------------------------------------- RNG


def _tiny_run():
    from geotrain.common.config import ModelConfig, RunConfig

    model = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, dropout=0.1)
    return RunConfig(), model


def _initial_sha(run, model) -> str:
    """The coordinator's version 1 checksum: GPT built right after torch.manual_seed(run seed)."""
    from geotrain.common.model import GPT
    from geotrain.common.tensors import model_tensors, params_sha256

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.train.seed)
        return params_sha256(model_tensors(GPT(model)))


def _generator_states() -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states += torch.cuda.get_rng_state_all()
    return states


def test_rebuilding_the_initial_weights_leaves_every_global_generator_as_it_was():
    from geotrain.worker.trainer import initial_weights_from_seed

    run, model = _tiny_run()
    sha = _initial_sha(run, model)
    torch.manual_seed(4242)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(4242)
    before = _generator_states()
    assert initial_weights_from_seed(run, model, sha) is not None
    after = _generator_states()
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def _dropout_mask(worker_id: str, device: str) -> torch.Tensor:
    """The first dropout mask a worker draws after its setup (trainer built, initial weights
    rebuilt from the run's seed, as WorkerRunner._setup does)."""
    from geotrain.worker.trainer import LocalTrainer, initial_weights_from_seed

    run, model = _tiny_run()
    trainer = LocalTrainer(run, model, torch.device(device), worker_id)
    assert initial_weights_from_seed(run, model, _initial_sha(run, model)) is not None
    trainer.model.train()
    return torch.nn.functional.dropout(torch.ones(4096, device=device), 0.5, training=True) == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_each_worker_draws_its_own_dropout_masks(device):
    a, b = _dropout_mask("worker-a", device), _dropout_mask("worker-b", device)
    assert not torch.equal(a, b)
    assert torch.equal(a, _dropout_mask("worker-a", device))  # a worker's own stream is reproducible


# --------------------------------------------------------------------------- off the training thread


def _round_state_of(params, base):
    from geotrain.worker.metrics import StatsBook
    from geotrain.worker.rebase import PendingRange, RoundState

    state = RoundState(params, base, 1, "run", StatsBook(), threading.Event())
    state.pending = [PendingRange(0, "s", 0, 64, 0, 2, 3.0, 0)]
    return state


def test_a_push_encodes_the_delta_of_its_snapshot_not_the_later_weights():
    """snapshot_push takes params - base on the training thread; encode_push (the comm thread)
    encodes that snapshot even though training moved the weights on meanwhile."""
    from geotrain.common.compression import encode_tensors
    from geotrain.common.config import CompressionConfig

    base = _tensors(0)
    params = {n: t + 0.01 * _tensors(1)[n] for n, t in base.items()}
    state = _round_state_of(params, _clone(base))
    push = state.snapshot_push(0)
    assert push.decoded is None and push.header.steps == 2 and push.header.push_id == push.push_id
    expected_delta = {n: params[n] - base[n] for n in base}
    for t in params.values():  # the next step, before the comm thread encodes
        t.add_(1.0)
    c = CompressionConfig(scheme="sign")
    blob = state.encode_push(push, c, None)
    want_blob, want = encode_tensors(expected_delta, "sign", c.chunk, feedback=None, zstd_level=c.zstd_level)
    assert blob == want_blob
    assert push.delta is None
    for n in base:
        assert torch.equal(push.decoded[n], want[n].float())
    with pytest.raises(ValueError, match="no delta"):
        state.encode_push(push, c, None)


def test_the_comm_thread_never_encodes_or_sends_a_push_dropped_before_it_went_out():
    """A rejoin (drop_unmerged) can resolve a sealed push before the comm thread reaches it: it is
    not encoded, not held, not sent (the client is never called)."""
    import queue as queue_

    from geotrain.worker.comm import CommThread
    from geotrain.worker.rebase import Push

    class _NoDownlink:
        def hold(self, push_id, blob):
            raise AssertionError("a dropped push was held")

    comm = CommThread(None, _NoDownlink(), queue_.Queue(), threading.Event(), threading.Event(), 1, 0, 2, 1.0)
    push = Push("p", 1, None, n_ranges=1, steps=1, tokens=64, loss_sum=1.0)
    push.resolved = True
    called = []
    comm._push(["push", push, lambda: called.append(1) or b"", None])
    assert called == [] and comm.inbox.empty()


def test_the_rebase_updates_params_now_and_the_basepoint_on_the_base_thread():
    """handle("updates"): params += U - own on return; base += U and its checksum follow on the
    base thread, and whatever reads base next (a push's snapshot) sees base + U. A checksum that
    does not match asks for the full model and counts a resync."""
    from geotrain.common.tensors import params_sha256

    for good in (True, False):
        base = _tensors(0)
        params = {n: t + 0.5 for n, t in base.items()}
        update = _tensors(2)
        state = _round_state_of(params, _clone(base))
        want_params = {n: params[n] + update[n] for n in base}
        want_base = {n: base[n] + update[n] for n in base}
        sha = params_sha256(want_base) if good else "0" * 64
        state.handle(("updates", [(2, update, sha, None, None)]))
        assert state.base_version == 2
        for n in base:
            assert torch.equal(params[n], want_params[n])
        push = state.snapshot_push(0)  # waits for the base thread: the delta is against base + U
        for n in base:
            assert torch.equal(push.delta[n], want_params[n] - want_base[n])
            assert torch.equal(state.base[n], want_base[n])
        assert state.need_full.is_set() is (not good)
        assert state.stats.snapshot().resyncs == (0 if good else 1)


def test_all_finite_exact_finds_every_non_finite_value_and_no_other():
    from geotrain.worker.rebase import all_finite_exact

    assert all_finite_exact({})
    big = torch.full((64,), 3e38)  # finite; its float32 sum would overflow
    assert all_finite_exact({"a": big, "b": torch.zeros(3)})
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(5)
        t[2] = bad
        assert not all_finite_exact({"a": torch.zeros(3), "b": t})
    pair = torch.zeros(4)
    pair[0], pair[1] = float("inf"), -float("inf")
    assert not all_finite_exact({"a": pair})


# --------------------------------------------------------------------------- batch prefetch


def _shard_cache(tmp_path, tokens: int = 1000, block: int = 8):
    import numpy as np

    from geotrain.common.shards import Manifest, ShardInfo, write_shard
    from geotrain.worker.shards import ShardCache

    data = np.arange(tokens, dtype=np.uint16) % 251
    sha = write_shard(tmp_path / "s0.bin", data, "uint16")
    manifest = Manifest(1, {"kind": "byte"}, 256, "uint16", [ShardInfo("s0.bin", "train", tokens, sha)])
    # the shard is in the cache directory already: no client is needed to read it
    return ShardCache(None, manifest, tmp_path, block, 7, lambda s: True)


def test_prefetched_lease_batches_are_the_batches_of_the_lease_in_order(tmp_path):
    """LeaseBatches gives what lease_batch gives at every position, the short last batch
    included, and starts again when the lease's position moves another way (a sync step)."""
    from geotrain.worker.shards import Lease, LeaseBatches

    shards, T, bs = _shard_cache(tmp_path), 8, 3
    batches = LeaseBatches(shards, torch.device("cpu"))
    try:
        for skip_at in (None, 2):
            lease, ref = Lease(1, "s0.bin", 16, 16 + 10 * T + 5, 0, pos=16), Lease(1, "s0.bin", 16, 16 + 10 * T + 5, 0, pos=16)
            seen, i = [], 0
            while not shards.range_done(lease):
                if i == skip_at:  # two sequences trained elsewhere
                    lease.pos += 2 * T
                    ref.pos += 2 * T
                x, y, n = batches.next(lease, bs)
                rx, ry, rn = shards.lease_batch(ref, bs)
                assert n == rn and torch.equal(x, rx) and torch.equal(y, ry)
                lease.pos += n * T
                ref.pos += rn * T
                seen.append(n)
                i += 1
            assert sum(seen) == (10 if skip_at is None else 8) and seen[-1] < bs
    finally:
        batches.close()
