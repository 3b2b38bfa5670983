"""Binding the worker's ports: its gRPC server (`--port`) and its metrics exporter (`--metrics-port`).

Several workers may run on one host (one per GPU). A port left at its default that is taken is
replaced by a free one, with a log line naming both; a port the user chose that is taken is an
error (`PortInUse`, a ValueError: the CLI prints it as one line and exits non-zero).
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Callable, Sequence

log = logging.getLogger(__name__)


class PortInUse(ValueError):
    """A port chosen by the user is taken."""

    def __init__(self, port: int, flag: str):
        super().__init__(f"port {port} ({flag}) is already in use; choose another {flag} or 0 for any free port")
        self.port = port
        self.flag = flag


def port_taken(port: int, host: str = "") -> bool:
    """Whether a TCP listener could not bind `port` on every address now (SO_REUSEADDR, as gRPC
    and http.server bind). Dual-stack where the host has IPv6."""
    for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host: try IPv4
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((host or addr, port))
            return False
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            continue  # e.g. IPv6 present but not bindable: try IPv4
        finally:
            s.close()
    return False


def _resolve(port: int, fallback: bool, flag: str) -> int:
    """`port`, or 0 (any free port) when it is taken and `fallback` allows it; PortInUse otherwise."""
    if port and port_taken(port):
        if not fallback:
            raise PortInUse(port, flag)
        return 0
    return port


def bind_worker_server(port: int, fallback: bool, describe: Callable[[], tuple[str, str, str]],
                       interceptors: Sequence = (), credentials=None):
    """The worker's gRPC server (worker/service.py WorkerServer), bound, not started; TLS when
    `credentials` (grpc.ServerCredentials) are given."""
    from geotrain.worker.service import WorkerServer

    want = _resolve(port, fallback, "--port")
    try:
        server = WorkerServer(want, describe, interceptors=interceptors, credentials=credentials)
    except (OSError, RuntimeError) as exc:  # taken between the check and the bind
        if want == 0 or not fallback:
            raise PortInUse(port, "--port") from exc
        server = WorkerServer(0, describe, interceptors=interceptors, credentials=credentials)
    if want != port:
        log.warning("the worker's gRPC port %d is taken (another worker on this host?): serving on port %d",
                    port, server.port)
    return server


def bind_metrics(metrics, port: int, fallback: bool) -> int:
    """Start `metrics`' (worker/metrics.py WorkerMetrics) exporter; returns the bound port."""
    want = _resolve(port, fallback, "--metrics-port")
    try:
        server = metrics.serve(want, any_port=want == 0)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise ValueError(f"cannot serve metrics on port {port} (--metrics-port): {exc.strerror or exc}") from exc
        if not fallback:
            raise PortInUse(port, "--metrics-port") from exc
        want = 0
        server = metrics.serve(0, any_port=True)
    bound = server.server_port
    if want != port:
        log.warning("metrics port %d is taken (another worker on this host?): metrics on port %d", port, bound)
    return bound
