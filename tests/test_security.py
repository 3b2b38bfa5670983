"""Trust: run token, TLS, and hostile requests over real gRPC (servers in-process on port 0)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from geotrain.common.compression import encode_tensors
from geotrain.common.config import RunConfig
from geotrain.common.prepare import prepare
from geotrain.common.reader import TokenData
from geotrain.protos.rpc import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, auth_metadata, make_channel
from geotrain.coordinator.server import CoordinatorServer
from geotrain.protos import geotrain_pb2 as pb
from geotrain.protos import geotrain_pb2_grpc as pb_grpc

TOKEN = "s3cret-run-token"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TokenData:
    root = tmp_path_factory.mktemp("data")
    (root / "a.txt").write_text("pack my box with five dozen liquor jugs. " * 2000)
    prepare([root / "a.txt"], root / "tokens", progress=False)
    return TokenData(root / "tokens")


def tiny_run() -> RunConfig:
    run = RunConfig()
    run.model.n_layer, run.model.n_embd, run.model.n_head, run.model.block_size = 1, 32, 2, 16
    run.plan.unit_tokens = 1024
    run.merge.policy = "async"
    run.merge.max_delta_norm_ratio = 10.0
    return run


def self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    key, cert = tmp / f"{name}.key", tmp / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def server(data, tmp_path):
    srv = CoordinatorServer(tiny_run(), data, tmp_path / "run", host="127.0.0.1", port=0, token=TOKEN)
    port = srv.start()
    yield srv, f"127.0.0.1:{port}"
    srv.server.stop(0)


def join(stub, token=TOKEN, **fields):
    request = pb.JoinRequest(name="w", device="cpu", protocol_version=PROTOCOL_VERSION)
    for key, value in fields.items():
        setattr(request, key, value)
    return stub.Join(request, metadata=auth_metadata(token), timeout=10)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_missing_or_wrong_token_is_refused_and_counted(server):
    srv, target = server
    stub = pb_grpc.CoordinatorStub(make_channel(target))
    assert code_of(lambda: join(stub, token=None)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: join(stub, token="nope")) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: stub.Status(pb.StatusRequest(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    count = srv.metrics.registry.get_sample_value(
        "geotrain_rpc_errors_total", {"method": "Join", "code": "UNAUTHENTICATED"}
    )
    assert count == 2
    assert join(stub).worker_id


def test_worker_process_with_wrong_token_exits_with_a_message(server, tmp_path):
    _, target = server
    result = subprocess.run(
        [sys.executable, "-m", "geotrain.worker.cli", "--port", "0", "--coordinator", target, "--metrics-port", "0",
         "--cache-dir", str(tmp_path), "--device", "cpu", "--threads", "1"],
        capture_output=True, text=True, timeout=120, env={"GEOTRAIN_TOKEN": "wrong", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "token" in (result.stderr + result.stdout).lower()


def test_tls_trusted_certificate_works_untrusted_is_refused(data, tmp_path):
    cert, key = self_signed(tmp_path, "server")
    other, _ = self_signed(tmp_path, "other")
    srv = CoordinatorServer(tiny_run(), data, tmp_path / "run", host="127.0.0.1", port=0, token=TOKEN,
                            tls_cert=cert.read_bytes(), tls_key=key.read_bytes())
    port = srv.start()
    try:
        good = pb_grpc.CoordinatorStub(make_channel(f"localhost:{port}", tls_ca=cert.read_bytes()))
        assert join(good).worker_id
        bad = pb_grpc.CoordinatorStub(make_channel(f"localhost:{port}", tls_ca=other.read_bytes()))
        assert code_of(lambda: join(bad)) == grpc.StatusCode.UNAVAILABLE
        plain = pb_grpc.CoordinatorStub(make_channel(f"localhost:{port}"))
        assert code_of(lambda: join(plain)) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.server.stop(0)


def _session(stub):
    reply = join(stub)
    lease = stub.LeaseWork(pb.LeaseRequest(worker_id=reply.worker_id, session_id=reply.session_id),
                           metadata=auth_metadata(TOKEN), timeout=5)
    return reply, lease.range


def _push(stub, reply, rng, blob, push_id="p", total=None, sha=None, chunk=None, n_tokens=16):
    header = pb.DeltaHeader(
        worker_id=reply.worker_id, session_id=reply.session_id, push_id=push_id, base_version=1,
        tokens=n_tokens, steps=1, mean_loss=1.0,
        ranges=[pb.TokenRange(unit_id=rng.unit_id, start=rng.start, end=rng.start + n_tokens, epoch=rng.epoch)],
        total_bytes=len(blob) if total is None else total,
        sha256=hashlib.sha256(blob).hexdigest() if sha is None else sha,
    )

    def parts():
        yield pb.DeltaPart(header=header)
        step = chunk or 65536
        for i in range(0, len(blob), step):
            yield pb.DeltaPart(chunk=blob[i : i + step])

    return stub.PushDelta(parts(), metadata=auth_metadata(TOKEN), timeout=10)


def test_hostile_streams_are_refused_and_change_nothing(server):
    srv, target = server
    stub = pb_grpc.CoordinatorStub(make_channel(target))
    reply, rng = _session(stub)
    delta = {n: torch.full_like(t, 1e-3) for n, t in srv.state.global_params.items()}
    blob, _ = encode_tensors(delta, "sign")
    sha, version = srv.state.params_sha, srv.state.version

    # announced size beyond what any delta of this model can be (a bomb or an oversized push)
    assert code_of(lambda: _push(stub, reply, rng, blob, total=10**12)) == grpc.StatusCode.INVALID_ARGUMENT
    # wrong checksum
    assert code_of(lambda: _push(stub, reply, rng, blob, sha="0" * 64)) == grpc.StatusCode.INVALID_ARGUMENT
    # one message larger than the per-message cap
    assert code_of(lambda: join(stub, name="x" * (MAX_MESSAGE_BYTES + 1))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # a shard outside the manifest, an unknown session
    assert code_of(lambda: list(stub.GetShard(
        pb.ShardRequest(worker_id=reply.worker_id, session_id=reply.session_id, shard="../../etc/passwd"),
        metadata=auth_metadata(TOKEN), timeout=5))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.Heartbeat(
        pb.HeartbeatRequest(worker_id=reply.worker_id, session_id="forged"),
        metadata=auth_metadata(TOKEN), timeout=5)) == grpc.StatusCode.NOT_FOUND
    # junk and over-long names, a protocol mismatch
    assert code_of(lambda: join(stub, name="\x00" * 10)) == grpc.StatusCode.INVALID_ARGUMENT
    status = code_of(lambda: join(stub, protocol_version=PROTOCOL_VERSION + 7))
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert (srv.state.params_sha, srv.state.version) == (sha, version)

    # a normal push goes through, then a replay of it is refused
    assert _push(stub, reply, rng, blob, push_id="ok").result == pb.PushReply.ACCEPTED
    assert code_of(lambda: _push(stub, reply, rng, blob, push_id="ok")) == grpc.StatusCode.ALREADY_EXISTS
    assert srv.state.version == version + 1


def test_outlier_delta_norm_is_refused_or_clipped(server):
    srv, target = server
    stub = pb_grpc.CoordinatorStub(make_channel(target))
    reply, rng = _session(stub)
    small = {n: torch.full_like(t, 1e-3) for n, t in srv.state.global_params.items()}
    cursor = rng.start
    for i in range(5):  # build a history of normal norms
        blob, _ = encode_tensors(small, "none")
        sub = pb.TokenRange(unit_id=rng.unit_id, start=cursor, end=cursor + 16, epoch=rng.epoch)
        header_rng = type("R", (), {"unit_id": sub.unit_id, "start": sub.start, "epoch": sub.epoch})
        _push(stub, reply, header_rng, blob, push_id=f"n{i}")
        cursor += 16
    huge = {n: torch.full_like(t, 1.0) for n, t in srv.state.global_params.items()}
    blob, _ = encode_tensors(huge, "none")
    header_rng = type("R", (), {"unit_id": rng.unit_id, "start": cursor, "epoch": rng.epoch})
    version = srv.state.version
    with pytest.raises(grpc.RpcError) as err:
        _push(stub, reply, header_rng, blob, push_id="huge")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "norm" in err.value.details()
    assert srv.state.version == version
    srv.state.gate.clip = True
    assert _push(stub, reply, header_rng, blob, push_id="huge-clipped").result == pb.PushReply.ACCEPTED
    assert srv.state.version == version + 1


def test_worker_endpoint_requires_the_run_token():
    from geotrain.worker.service import WorkerServer
    from geotrain.protos.rpc import TokenAuthInterceptor

    server = WorkerServer(0, lambda: ("w", "id", "training"), interceptors=[TokenAuthInterceptor(TOKEN)])
    server.start()
    try:
        stub = pb_grpc.WorkerStub(make_channel(f"127.0.0.1:{server.port}"))
        assert code_of(lambda: stub.Ping(pb.PingRequest(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Ping(pb.PingRequest(), metadata=auth_metadata(TOKEN), timeout=5).name == "w"
    finally:
        server.stop()


def test_lease_sequences_match_the_shard_and_bad_ranges_are_refused(server, data):
    """ShardRequest.sequences: a lease's rows of the visiting order, exactly what the worker would
    gather from the whole shard; a range past the shard's end is INVALID_ARGUMENT."""
    import numpy as np

    from geotrain.common.order import gather_sequences, sequence_order

    from geotrain.common.shards import read_shard
    from geotrain.worker.client import CoordinatorClient

    srv, target = server
    T = srv.state.model_config.block_size
    client = CoordinatorClient(target, token=TOKEN)
    try:
        client.join(pb.JoinRequest(name="w", device="cpu", protocol_version=PROTOCOL_VERSION))
        rng = client.lease_work().range
        info = next(s for s in data.manifest.shards if s.name == rng.shard)
        tokens = read_shard(data.data_dir / info.name, info)
        order = sequence_order(rng.shard, len(tokens), T, srv.state.run.train.seed, rng.epoch)
        first, count = rng.start // T, (rng.end - rng.start) // T
        raw = client.get_sequences(rng.shard, rng.epoch, first, count, (T + 1) * tokens.dtype.itemsize)
        rows = np.frombuffer(raw, dtype=tokens.dtype.newbyteorder("<")).reshape(count, T + 1)
        xs, ys = gather_sequences(tokens, order[first : first + count], T)
        assert np.array_equal(rows[:, :-1], xs) and np.array_equal(rows[:, 1:], ys)
        with pytest.raises(grpc.RpcError) as err:
            client.get_sequences(rng.shard, rng.epoch, len(order) - 1, 2, (T + 1) * tokens.dtype.itemsize, patience=1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside" in err.value.details()
    finally:
        client.close()
