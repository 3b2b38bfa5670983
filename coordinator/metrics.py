"""Prometheus metrics of the coordinator, on a registry of its own (one per server object).

Per-worker series come from heartbeats (workers behind NAT cannot be scraped), labelled by worker
name and bounded to MAX_WORKER_LABELS names: the least recently seen name is evicted first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from geotrain.common import __version__
from geotrain.protos.rpc import PROTOCOL_VERSION

MAX_WORKER_LABELS = 64

# Label values known at start-up: every series below is exported at 0 from the first scrape, so a
# rate() or an alert sees the series before its first event.
DELTA_RESULTS = ("accepted", "stale", "invalid", "duplicate")  # geotrain_deltas_total{result}
SHARD_STATES = ("pending", "leased", "done")  # geotrain_shards{state}: coordinator/ledger.py Ledger.counts

# Heartbeat stat -> per-worker gauge name suffix.
WORKER_SERIES = {
    "tokens_per_second": "geotrain_worker_tokens_per_second",
    "loss": "geotrain_worker_loss",
    "sent_bytes": "geotrain_worker_sent_bytes",
    "received_bytes": "geotrain_worker_received_bytes",
}


class CoordinatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.workers = Gauge("geotrain_workers", "Live workers", registry=r)
        self.model_version = Gauge("geotrain_model_version", "Version of the global model", registry=r)
        self.tokens = Counter("geotrain_tokens", "Training tokens merged into the global model", registry=r)
        self.deltas = Counter("geotrain_deltas", "Pushed deltas by result", ["result"], registry=r)
        self.delta_staleness = Histogram(
            "geotrain_delta_staleness", "Versions between a delta's base and the current model",
            buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r,
        )
        self.received_bytes = Counter("geotrain_received_bytes", "Payload bytes received from workers", registry=r)
        self.sent_bytes = Counter("geotrain_sent_bytes", "Payload bytes sent to workers", registry=r)
        self.val_loss = Gauge("geotrain_val_loss", "Validation loss of the global model", registry=r)
        self.hellaswag_acc_norm = Gauge("geotrain_hellaswag_acc_norm", "HellaSwag acc_norm of the global model", registry=r)
        self.train_loss = Gauge("geotrain_train_loss", "Token-weighted training loss of the last merge", registry=r)
        self.shards = Gauge("geotrain_shards", "Data units by state", ["state"], registry=r)
        self.round_seconds = Histogram(
            "geotrain_round_seconds", "Seconds between merges",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=r,
        )
        self.merge_seconds = Histogram(
            "geotrain_merge_seconds", "Seconds spent merging (combine, outer step, encode, checksum)",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10), registry=r,
        )
        self.compression_ratio = Gauge("geotrain_compression_ratio", "fp32 bytes / wire bytes of the last delta", registry=r)
        self.checkpoint_age = Gauge("geotrain_checkpoint_age_seconds", "Seconds since the last checkpoint", registry=r)
        self.checkpoint_failures = Counter("geotrain_checkpoint_failures", "Checkpoints that failed to write", registry=r)
        self.rpc_errors = Counter("geotrain_rpc_errors", "RPCs that ended in an error", ["method", "code"], registry=r)
        self.build_info = Gauge("geotrain_build_info", "geotrain build", ["version", "protocol"], registry=r)
        self.build_info.labels(__version__, str(PROTOCOL_VERSION)).set(1)
        self.worker_gauges = {
            key: Gauge(name, f"Per-worker {key.replace('_', ' ')} from heartbeats", ["worker"], registry=r)
            for key, name in WORKER_SERIES.items()
        }
        self.worker_wait_fraction = Gauge(
            "geotrain_worker_wait_fraction", "Share of a worker's wall time spent waiting on the network", ["worker"], registry=r
        )
        self.worker_merged_tokens = Gauge(
            "geotrain_worker_merged_tokens", "Tokens of a worker's deltas merged", ["worker"], registry=r
        )
        self._worker_names: OrderedDict[str, None] = OrderedDict()
        self.http_server: Any = None  # the /metrics HTTP server once serve() ran
        for result in DELTA_RESULTS:
            self.deltas.labels(result)
        for shard_state in SHARD_STATES:
            self.shards.labels(shard_state).set(0)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0: a free one); returns the bound port. OSError when taken."""
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        self.http_server = httpd
        return int(httpd.server_address[1])

    def observe_worker(self, name: str, stats: dict[str, float], merged_tokens: int) -> None:
        self._worker_names[name] = None
        self._worker_names.move_to_end(name)
        while len(self._worker_names) > MAX_WORKER_LABELS:
            old, _ = self._worker_names.popitem(last=False)
            for gauge in (*self.worker_gauges.values(), self.worker_wait_fraction, self.worker_merged_tokens):
                try:
                    gauge.remove(old)
                except KeyError:
                    pass
        for key, gauge in self.worker_gauges.items():
            gauge.labels(name).set(float(stats.get(key, 0.0)))
        wall = stats.get("wall_seconds", 0.0)
        self.worker_wait_fraction.labels(name).set(stats.get("wait_seconds", 0.0) / wall if wall else 0.0)
        self.worker_merged_tokens.labels(name).set(merged_tokens)

    def record_merge(self, state: Any, tokens: int, round_seconds: float, merge_seconds: float) -> None:
        self.tokens.inc(tokens)
        self.model_version.set(state.version)
        self.train_loss.set(state.train_loss)
        self.round_seconds.observe(round_seconds)
        self.merge_seconds.observe(merge_seconds)

    def refresh(self, state: Any) -> None:
        """Values derived on scrape cadence (called by the server's tick)."""
        self.checkpoint_age.set(time.time() - state.checkpoint_wall_time)
        self.model_version.set(state.version)
