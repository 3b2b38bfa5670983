"""In-process all-reduce groups for the tests: n CompressedAllReduce members, each on its own
gRPC server on a free loopback port, and a way to run one function on every member at once."""

from __future__ import annotations

from concurrent import futures

import grpc

from geotrain.protos import rpc
from geotrain.worker.allreduce import CompressedAllReduce


def start_group(n: int, **kwargs):
    """n members in this process, each with its own gRPC server on a free loopback port."""
    servers, peers = [], []
    for _ in range(n):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=rpc.server_options())
        port = server.add_insecure_port("127.0.0.1:0")
        servers.append(server)
        peers.append(f"127.0.0.1:{port}")
    members = [CompressedAllReduce(r, n, peers, **kwargs) for r in range(n)]
    for member, server in zip(members, servers):
        member.add_to_server(server)
        server.start()
    return members, servers


def stop_group(members, servers) -> None:
    for member in members:
        member.close()
    for server in servers:
        server.stop(0)


def run_all(members, fn, timeout_s: float = 120.0):
    """fn(rank, member) on one thread per member; returns the results in rank order (TimeoutError
    after timeout_s seconds per member)."""
    with futures.ThreadPoolExecutor(max_workers=len(members)) as pool:
        return [f.result(timeout=timeout_s) for f in [pool.submit(fn, r, m) for r, m in enumerate(members)]]
