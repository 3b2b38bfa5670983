"""The coordinator process: gRPC server, metrics endpoint and the periodic tick, with clean stops.

`CoordinatorServer(...).start()` binds (port 0 picks a free port, for tests) and returns the port;
`run_until(stop_event)` ticks the state every TICK_SECONDS until the event is set or the run
finishes; `stop()` checkpoints, marks health NOT_SERVING and stops the server with a grace period.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from geotrain.common.config import RunConfig
from geotrain.common.reader import TokenData
from geotrain.protos.rpc import TokenAuthInterceptor, server_options
from geotrain.common.status import render_status
from geotrain.coordinator.memory import tune_malloc
from geotrain.coordinator.metrics import CoordinatorMetrics
from geotrain.coordinator.service import CoordinatorServicer
from geotrain.coordinator.state import CoordinatorState
from geotrain.protos import geotrain_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
TICK_SECONDS = 0.5
STATUS_EVERY_SECONDS = 30.0  # the status table (common/status.py) goes to the log this often; 0 = never
STOP_GRACE_SECONDS = 3.0


class CoordinatorServer:
    def __init__(
        self,
        run: RunConfig,
        data: TokenData,
        run_dir: Path,
        host: str = "0.0.0.0",
        port: int = 50051,
        metrics_port: int = 0,
        token: str | None = None,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        max_threads: int = 64,
        port_explicit: bool = True,
        metrics_port_explicit: bool = True,
    ):
        """port_explicit / metrics_port_explicit: whether the user chose that port (a flag, the
        environment or the config file). A chosen port that is taken is an error naming it and its
        flag; a default one that is taken is replaced by a free port, with a log line."""
        tune_malloc()  # before the model is allocated: freed blobs go back to the system
        self.metrics = CoordinatorMetrics()
        self.state = CoordinatorState(run, data, run_dir, metrics=self.metrics)
        self.host, self.port, self.metrics_port = host, port, metrics_port
        interceptors = []
        if token:
            interceptors.append(
                TokenAuthInterceptor(token, on_reject=lambda m: self.metrics.rpc_errors.labels(m.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc())
            )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="rpc"),
            options=server_options(),
            interceptors=interceptors,
            maximum_concurrent_rpcs=max_threads * 4,
        )
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(self.state), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self.bound_port = 0
        self.port_explicit, self.metrics_port_explicit = port_explicit, metrics_port_explicit

    def _add_port(self, port: int) -> int:
        """Bind the gRPC server to `port` (0: any free one); returns the bound port, 0 if taken."""
        address = f"{self.host}:{port}"
        try:
            if self.tls:
                creds = grpc.ssl_server_credentials([(self.tls[1], self.tls[0])])
                return self.server.add_secure_port(address, creds)
            return self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio raises where older versions returned 0
            return 0

    def start(self) -> int:
        """Bind, serve, and return the gRPC port. OSError (one line, naming the port and its flag)
        when a port the user chose is taken."""
        self.bound_port = self._add_port(self.port)
        if self.bound_port == 0:
            if self.port_explicit or self.port == 0:
                raise OSError(f"cannot listen on {self.host}:{self.port}: port {self.port} (--port) is taken")
            self.bound_port = self._add_port(0)
            if self.bound_port == 0:
                raise OSError(f"cannot listen on {self.host}: no free port")
            log.warning("default port %d is taken: gRPC listens on port %d instead", self.port, self.bound_port)
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("geotrain.v1.Coordinator", health_pb2.HealthCheckResponse.SERVING)
        if self.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(self.metrics_port, host=self.host)
            except OSError as exc:
                if self.metrics_port_explicit:
                    self.server.stop(0)
                    raise OSError(f"cannot serve metrics on {self.host}:{self.metrics_port}: port "
                                  f"{self.metrics_port} (--metrics-port) is taken ({exc.strerror or exc})") from None
                taken, self.metrics_port = self.metrics_port, self.metrics.serve(0, host=self.host)
                log.warning("default metrics port %d is taken: metrics on port %d instead", taken, self.metrics_port)
        log.info(
            "coordinator listening on %s:%d (model %s, %d parameters, version %d)%s",
            self.host, self.bound_port, self.state.run.model.preset, self.state.num_params, self.state.version,
            f", metrics on :{self.metrics_port}" if self.metrics_port else "",
        )
        return self.bound_port

    def run_until(self, stop: threading.Event) -> None:
        """Tick until `stop` is set or the run has finished (then linger so workers see STOP)."""
        linger = None
        last_status = time.monotonic()
        while not stop.wait(TICK_SECONDS):
            self.state.tick()
            self.metrics.refresh(self.state)
            if STATUS_EVERY_SECONDS and time.monotonic() - last_status >= STATUS_EVERY_SECONDS:
                last_status = time.monotonic()
                self.log_status()
            if self.state.final_summary is not None:
                linger = (linger or 0) + TICK_SECONDS
                if self._done_lingering(linger):
                    break

    def _done_lingering(self, seconds: float) -> bool:
        """After the run finished, keep answering STOP until every worker has left (a worker that
        was reconnecting must learn the run is over rather than retry forever), at least two
        heartbeat intervals and at most one lease period more."""
        cfg = self.state.run.workers
        minimum = 2 * cfg.heartbeat_seconds + 1
        if seconds < minimum:
            return False
        with self.state.lock:
            live = [w for w in self.state.workers.values() if not w.left]
        return not live or seconds >= minimum + cfg.lease_seconds

    def log_status(self) -> None:
        """One compact block: the same table `geotrain status` prints."""
        try:
            log.info("status\n%s", render_status(self.state.status()))
        except Exception:  # noqa: BLE001 - a display problem never stops the run
            log.exception("status table failed")

    def stop(self) -> None:
        self.health.enter_graceful_shutdown()
        # Stop accepting before the final checkpoint: a push merged after it would be counted in
        # summary.json but missing from the checkpoint a restart resumes from.
        self.server.stop(STOP_GRACE_SECONDS).wait(STOP_GRACE_SECONDS + 1)
        try:
            if self.state.final_summary is None:
                self.state.finish(eval_iters=self.state.run.eval.iters)  # evaluates, checkpoints, summary.json
        except OSError as exc:
            log.error("final checkpoint failed: %s", exc)
        if self.metrics.http_server is not None:
            self.metrics.http_server.shutdown()
            self.metrics.http_server.server_close()
