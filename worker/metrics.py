"""Prometheus metrics of one worker, on their own registry (served by --metrics-port, 0 = off).

Workers behind NAT are often not scrapeable: the same numbers also go to the coordinator in every
heartbeat (WorkerStats), which exports them per worker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from geotrain.common import metric_names as mn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

LAG_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tokens_per_second = Gauge(mn.WORKER_TOKENS_PER_SECOND, "Training throughput over the last interval.", registry=r)
        self.step_seconds = Histogram(mn.WORKER_STEP_SECONDS, "Wall time of one inner step.", buckets=STEP_BUCKETS, registry=r)
        self.loss = Gauge(mn.WORKER_LOSS, "Mean training loss over the last interval.", registry=r)
        # Counters are declared without _total: prometheus_client appends it.
        self.sent_bytes = Counter(mn.WORKER_SENT_BYTES, "Payload bytes sent to the coordinator.", registry=r)
        self.received_bytes = Counter(mn.WORKER_RECEIVED_BYTES, "Payload bytes received from the coordinator.", registry=r)
        self.wait_seconds = Counter(mn.WORKER_WAIT_SECONDS, "Seconds the training loop was blocked on the network.", registry=r)
        self.model_version = Gauge(mn.WORKER_MODEL_VERSION, "Global model version of the local basepoint.", registry=r)
        self.merge_lag_steps = Histogram(mn.WORKER_MERGE_LAG_STEPS, "Local steps between a push and the arrival of its merge.",
                                         buckets=LAG_BUCKETS, registry=r)
        self.gpu_memory_bytes = Gauge(mn.WORKER_GPU_MEMORY_BYTES, "GPU memory allocated by this process.", registry=r)
        self.gpu_utilization_ratio = Gauge(mn.WORKER_GPU_UTILIZATION_RATIO, "GPU utilization 0..1 (-1 unknown).", registry=r)
        self._last_sent = 0
        self._last_received = 0
        self._last_wait = 0.0

    def enable_sync(self) -> None:
        """Register the sync-group metrics (only workers that trained in a sync group export them)."""
        if getattr(self, "sync_allreduce_seconds", None) is not None:
            return
        r = self.registry
        self.sync_allreduce_seconds = Histogram(mn.SYNC_ALLREDUCE_SECONDS, "Seconds per sync-group all-reduce.",
                                                buckets=STEP_BUCKETS, registry=r)
        self.sync_allreduce_bytes = Counter(mn.SYNC_ALLREDUCE_BYTES, "Bytes this worker sent in sync-group all-reduces.", registry=r)
        self.sync_group_size = Gauge(mn.SYNC_GROUP_SIZE, "Members of this worker's sync group.", registry=r)
        self.sync_residual_norm = Gauge(mn.SYNC_RESIDUAL_NORM, "L2 norm of the 1-bit compression error-feedback residual.", registry=r)
        self.sync_repairs = Counter(mn.SYNC_REPAIRS, "Checksum rounds that found this member's parameters differing from rank 0's.",
                                    registry=r)

    def observe_sync(self, m) -> None:
        """One worker.sync.SyncStepMetrics."""
        self.enable_sync()
        self.sync_allreduce_seconds.observe(m.allreduce_seconds)
        if m.allreduce_bytes_sent > 0:
            self.sync_allreduce_bytes.inc(m.allreduce_bytes_sent)
        self.sync_group_size.set(m.group_size)
        self.sync_residual_norm.set(m.residual_norm)
        if m.repaired:
            self.sync_repairs.inc()

    def set_cumulative(self, sent_bytes: int, received_bytes: int, wait_seconds: float) -> None:
        """Advance the counters to cumulative totals kept elsewhere (never backwards)."""
        if sent_bytes > self._last_sent:
            self.sent_bytes.inc(sent_bytes - self._last_sent)
            self._last_sent = sent_bytes
        if received_bytes > self._last_received:
            self.received_bytes.inc(received_bytes - self._last_received)
            self._last_received = received_bytes
        if wait_seconds > self._last_wait:
            self.wait_seconds.inc(wait_seconds - self._last_wait)
            self._last_wait = wait_seconds

    def serve(self, port: int, addr: str = "0.0.0.0", any_port: bool = False):
        """Start the HTTP exporter on `port` (0 = off, or any free port with any_port; the bound
        port is the server's `server_port`). Returns the server or None. OSError when taken."""
        if not port and not any_port:
            return None
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Stats:
    """The worker's cumulative counters (since it started training this run)."""

    steps: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    step_seconds: float = 0.0
    wait_seconds: float = 0.0  # the training loop blocked on the network (first model, data, lag bound)
    pushes: int = 0
    merged: int = 0
    stale: int = 0
    resyncs: int = 0
    residual_norm: float = 0.0  # ||delta - decoded|| of the last push
    merge_lag_steps: int = 0  # summed over merged pushes: local steps between a push and its merge


class StatsBook:
    """`Stats` shared by the worker's threads: `add` under the lock, `snapshot` a copy."""

    def __init__(self) -> None:
        self._stats = Stats()
        self._lock = threading.Lock()

    def add(self, **increments) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    def set(self, **values) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(self._stats, name, value)

    def snapshot(self) -> Stats:
        with self._lock:
            return Stats(**vars(self._stats))
