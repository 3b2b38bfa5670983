"""The worker's own gRPC server (`worker --port`): grpc.health.v1 and geotrain.v1.Worker/Ping.

`WorkerServer.server` is the grpc.Server: other services (the sync-group Peer service) register on
it with their add_*_to_server before `start()`.
"""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geotrain.protos.rpc import server_options
from geotrain.protos import geotrain_pb2 as pb
from geotrain.protos import geotrain_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

WORKER_SERVICE = "geotrain.v1.Worker"


class _PingServicer(pb_grpc.WorkerServicer):
    def __init__(self, describe: Callable[[], tuple[str, str, str]]):
        self._describe = describe

    def Ping(self, request, context):  # noqa: N802 - gRPC method name
        name, worker_id, state = self._describe()
        return pb.PingReply(name=name, worker_id=worker_id, state=state)


class WorkerServer:
    """gRPC server on `port` (0 = any free port; `.port` is the bound one)."""

    def __init__(
        self,
        port: int,
        describe: Callable[[], tuple[str, str, str]],
        host: str = "[::]",
        max_workers: int = 8,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
    ):
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="worker-rpc"),
            options=server_options(),
            interceptors=list(interceptors),
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        pb_grpc.add_WorkerServicer_to_server(_PingServicer(describe), self.server)
        address = f"{host}:{port}"
        if credentials is not None:
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind the worker's gRPC port {address}")
        self.services = [WORKER_SERVICE]

    def add_service_name(self, name: str) -> None:
        """Declare another service (registered by its owner on .server) for health checks."""
        self.services.append(name)

    def start(self) -> None:
        self.server.start()
        for name in ["", *self.services]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("worker gRPC server on port %d", self.port)

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1.0)
