"""Sync-group peers trust only their group: every Peer call must carry the secret the coordinator
issued to the group at formation; the run token (which every worker of the run holds) is refused.
With a certificate the worker's endpoint speaks TLS, and the members dial each other over TLS.
Real gRPC servers on loopback ports."""

from __future__ import annotations

import subprocess
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from geotrain.coordinator.groups import GroupFormation
from geotrain.protos import peer_pb2, peer_pb2_grpc, rpc
from geotrain.protos.rpc import TokenAuthInterceptor, auth_metadata, make_channel
from geotrain.worker.allreduce import CompressedAllReduce, PeerFailure, router_for
from geotrain.worker.service import WorkerServer

RUN_TOKEN = "run-token-every-worker-holds"
SECRET = "a" * 64
PEER_PREFIX = "/geotrain.v1.Peer/"


def _worker_server(credentials=None) -> WorkerServer:
    """A worker endpoint as worker/runner.py builds it: run-token interceptor, Peer exempt from it."""
    server = WorkerServer(0, lambda: ("w", "id", "training"), host="127.0.0.1",
                          interceptors=[TokenAuthInterceptor(RUN_TOKEN, exempt=(PEER_PREFIX,))], credentials=credentials)
    router_for(server.server)
    return server


def _members(n: int, secrets: list[str | None], credentials=None, tls_ca: bytes | None = None, host="127.0.0.1"):
    servers = [_worker_server(credentials) for _ in range(n)]
    peers = [f"{host}:{s.port}" for s in servers]
    members = [CompressedAllReduce(r, n, peers, "g#1", epoch=1, compression="none", token=secrets[r], tls_ca=tls_ca,
                                   deadline_s=5.0) for r in range(n)]
    for m, s in zip(members, servers):
        m.add_to_server(s.server)
        s.start()
    return members, servers


def _stop(members, servers) -> None:
    for m in members:
        m.close()
    for s in servers:
        s.server.stop(0)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _allreduce_all(members) -> list:
    def one(rank, m):
        try:
            return m.allreduce({"w": torch.full((300,), float(rank + 1))}, step=1)["w"]
        except PeerFailure as exc:
            return exc

    with futures.ThreadPoolExecutor(len(members)) as pool:
        return [f.result(timeout=60) for f in [pool.submit(one, r, m) for r, m in enumerate(members)]]


def test_a_non_member_holding_the_run_token_is_refused():
    members, servers = _members(2, [SECRET, SECRET])
    try:
        stub = peer_pb2_grpc.PeerStub(make_channel(members[0].peers[0]))
        status = peer_pb2.PeerStatusRequest(group_id="g#1", sender=1)
        state = peer_pb2.StateRequest(group_id="g#1", epoch=1, step=0, sender=1)
        header = peer_pb2.ExchangeHeader(group_id="g#1", epoch=1, step=1, sender=1, scheme="none", total_bytes=0,
                                         sha256=rpc.sha256_hex(b""))
        for metadata in (auth_metadata(RUN_TOKEN), auth_metadata("b" * 64), ()):
            assert _code(lambda: stub.Status(status, timeout=5, metadata=metadata)) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: next(stub.FetchState(state, timeout=5, metadata=metadata))) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: stub.Exchange(iter([peer_pb2.PeerPart(header=header)]), timeout=5,
                                               metadata=metadata)) == grpc.StatusCode.UNAUTHENTICATED
        # The group's secret opens it; the worker's own service still wants the run token.
        assert stub.Status(status, timeout=5, metadata=auth_metadata(SECRET)).epoch == 1
        from geotrain.protos import geotrain_pb2 as pb, geotrain_pb2_grpc as pb_grpc

        worker = pb_grpc.WorkerStub(make_channel(members[0].peers[0]))
        assert _code(lambda: worker.Ping(pb.PingRequest(), timeout=5, metadata=auth_metadata(SECRET))) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert worker.Ping(pb.PingRequest(), timeout=5, metadata=auth_metadata(RUN_TOKEN)).name == "w"
    finally:
        _stop(members, servers)


def test_members_with_the_secret_all_reduce_and_a_wrong_secret_fails():
    members, servers = _members(2, [SECRET, SECRET])
    try:
        out = _allreduce_all(members)
        assert all(torch.equal(o, torch.full((300,), 1.5)) for o in out), out
    finally:
        _stop(members, servers)
    members, servers = _members(2, [SECRET, RUN_TOKEN])  # rank 1 presents the run token
    try:
        out = _allreduce_all(members)
        assert all(isinstance(o, PeerFailure) for o in out), out
        assert any("UNAUTHENTICATED" in str(o) for o in out), out
    finally:
        _stop(members, servers)


def test_formation_issues_one_secret_per_group_incarnation():
    now = [0.0]
    groups = GroupFormation(settle_s=1.0, clock=lambda: now[0])
    for i in range(2):
        groups.add(f"w{i}", "g", "fp", f"127.0.0.1:{1000 + i}")
    now[0] = 5.0
    a, b = groups.assignment("w0"), groups.assignment("w1")
    assert a.secret == b.secret and len(a.secret) == 64 and a.secret not in (RUN_TOKEN, "")
    groups.report_failure("w0", a.group_id, a.epoch, [0, 1])  # dissolve: the members re-form
    now[0] = 20.0
    c = groups.assignment("w0")
    assert c is not None and c.epoch != a.epoch
    assert c.secret != a.secret and c.secret == groups.assignment("w1").secret


def _self_signed(tmp: Path) -> tuple[bytes, bytes]:
    key, cert = tmp / "peer.key", tmp / "peer.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert.read_bytes(), key.read_bytes()


def test_members_with_certificates_talk_tls(tmp_path):
    cert, key = _self_signed(tmp_path)
    creds = grpc.ssl_server_credentials([(key, cert)])
    members, servers = _members(2, [SECRET, SECRET], credentials=creds, tls_ca=cert)
    try:
        out = _allreduce_all(members)
        assert all(torch.equal(o, torch.full((300,), 1.5)) for o in out), out
        plain = peer_pb2_grpc.PeerStub(make_channel(members[0].peers[0]))  # no TLS: no answer
        status = peer_pb2.PeerStatusRequest(group_id="g#1", sender=1)
        assert _code(lambda: plain.Status(status, timeout=3, metadata=auth_metadata(SECRET))) == grpc.StatusCode.UNAVAILABLE
    finally:
        _stop(members, servers)


def test_worker_cli_needs_a_ca_with_a_certificate(tmp_path):
    import sys

    cert = tmp_path / "c.pem"
    cert.write_text("x")
    out = subprocess.run([sys.executable, "-m", "geotrain.worker.cli", "--coordinator", "127.0.0.1:1",
                          "--tls-cert", str(cert), "--tls-key", str(cert)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--tls-cert needs --tls-ca" in out.stderr and "Traceback" not in out.stderr
