"""Prometheus metric names: the contract between the exporters, the dashboards and the tests.

Every metric the coordinator or a worker exports is declared here once. The exporting code passes
the constants to prometheus_client; deploy/grafana/dashboards/geotrain.json may query only the
series these specs produce (tests/test_deploy.py checks it).

Names are the *declared* names, as given to prometheus_client. A counter is declared without
``_total`` and exported with it (``Counter(TOKENS, ...)`` exports ``geotrain_tokens_total``); a
histogram exports ``_bucket``, ``_sum`` and ``_count``. :func:`exported_names` gives the sample
names a spec produces, and :data:`COORDINATOR_SERIES` / :data:`WORKER_SERIES` collect them.

Some per-worker gauges the coordinator exports (from heartbeats, label ``worker``) share a name
with the worker's own unlabelled metrics. That is deliberate: they are scraped from different jobs
(``geotrain-coordinator`` and ``geotrain-worker``) and dashboards select the job explicitly.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

GAUGE = "gauge"
COUNTER = "counter"
HISTOGRAM = "histogram"

# Prometheus job names used by deploy/prometheus/prometheus.yml and the dashboard queries.
COORDINATOR_JOB = "geotrain-coordinator"
WORKER_JOB = "geotrain-worker"

# Label values (bounded sets).
DELTA_RESULTS = ("accepted", "stale", "invalid", "unauthenticated")
SHARD_STATES = ("pending", "leased", "done")
# The coordinator keeps per-worker series for at most this many worker names; older ones are evicted.
MAX_WORKER_SERIES = 64


class MetricSpec(NamedTuple):
    name: str  # declared name (counters without _total)
    kind: str  # GAUGE | COUNTER | HISTOGRAM
    labels: tuple[str, ...]
    help: str


def exported_names(spec: MetricSpec) -> tuple[str, ...]:
    """Sample names a metric produces in the text exposition format (what PromQL selects)."""
    if spec.kind == COUNTER:
        return (spec.name + "_total",)
    if spec.kind == HISTOGRAM:
        return (spec.name + "_bucket", spec.name + "_sum", spec.name + "_count")
    return (spec.name,)


# --------------------------------------------------------------------------------------------
# Coordinator (/metrics on its --metrics-port, default 9090)
# --------------------------------------------------------------------------------------------
WORKERS = "geotrain_workers"
MODEL_VERSION = "geotrain_model_version"
TOKENS = "geotrain_tokens"  # -> geotrain_tokens_total
DELTAS = "geotrain_deltas"  # -> geotrain_deltas_total{result}
DELTA_STALENESS = "geotrain_delta_staleness"
RECEIVED_BYTES = "geotrain_received_bytes"  # -> geotrain_received_bytes_total
SENT_BYTES = "geotrain_sent_bytes"  # -> geotrain_sent_bytes_total
VAL_LOSS = "geotrain_val_loss"
HELLASWAG_ACC_NORM = "geotrain_hellaswag_acc_norm"
TRAIN_LOSS = "geotrain_train_loss"
SHARDS = "geotrain_shards"
ROUND_SECONDS = "geotrain_round_seconds"
COMPRESSION_RATIO = "geotrain_compression_ratio"
CHECKPOINT_AGE_SECONDS = "geotrain_checkpoint_age_seconds"
CHECKPOINT_FAILURES = "geotrain_checkpoint_failures"  # -> geotrain_checkpoint_failures_total
RPC_ERRORS = "geotrain_rpc_errors"  # -> geotrain_rpc_errors_total{method,code}
BUILD_INFO = "geotrain_build_info"
MERGE_SECONDS = "geotrain_merge_seconds"

# Per-worker series the coordinator exports from heartbeats (label `worker` = worker name).
PER_WORKER_TOKENS_PER_SECOND = "geotrain_worker_tokens_per_second"
PER_WORKER_LOSS = "geotrain_worker_loss"
PER_WORKER_WAIT_FRACTION = "geotrain_worker_wait_fraction"
PER_WORKER_SENT_BYTES = "geotrain_worker_sent_bytes"
PER_WORKER_RECEIVED_BYTES = "geotrain_worker_received_bytes"
PER_WORKER_MERGED_TOKENS = "geotrain_worker_merged_tokens"

COORDINATOR_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(WORKERS, GAUGE, (), "Workers with a live lease (heartbeat within the timeout)."),
    MetricSpec(MODEL_VERSION, GAUGE, (), "Version of the global model (merges so far)."),
    MetricSpec(TOKENS, COUNTER, (), "Training tokens merged into the global model."),
    MetricSpec(DELTAS, COUNTER, ("result",), "Deltas received, by result (accepted|stale|invalid|unauthenticated)."),
    MetricSpec(DELTA_STALENESS, HISTOGRAM, (), "Model versions between a delta's base and the current model."),
    MetricSpec(RECEIVED_BYTES, COUNTER, (), "Wire bytes received from workers."),
    MetricSpec(SENT_BYTES, COUNTER, (), "Wire bytes sent to workers."),
    MetricSpec(VAL_LOSS, GAUGE, (), "Last validation loss of the global model."),
    MetricSpec(HELLASWAG_ACC_NORM, GAUGE, (), "Last HellaSwag acc_norm of the global model (eval.hellaswag_file)."),
    MetricSpec(TRAIN_LOSS, GAUGE, (), "Recent training loss reported by workers."),
    MetricSpec(SHARDS, GAUGE, ("state",), "Data shards by state (pending|leased|done)."),
    MetricSpec(ROUND_SECONDS, HISTOGRAM, (), "Seconds between merges."),
    MetricSpec(COMPRESSION_RATIO, GAUGE, (), "fp32 bytes / wire bytes of the last delta."),
    MetricSpec(CHECKPOINT_AGE_SECONDS, GAUGE, (), "Seconds since the last checkpoint was written."),
    MetricSpec(CHECKPOINT_FAILURES, COUNTER, (), "Checkpoints that failed to write."),
    MetricSpec(RPC_ERRORS, COUNTER, ("method", "code"), "RPCs that ended with a non-OK status."),
    MetricSpec(BUILD_INFO, GAUGE, ("version", "protocol"), "Always 1; labels carry the build."),
    MetricSpec(MERGE_SECONDS, HISTOGRAM, (), "Seconds spent merging one delta."),
    MetricSpec(PER_WORKER_TOKENS_PER_SECOND, GAUGE, ("worker",), "Tokens/s reported by each worker."),
    MetricSpec(PER_WORKER_LOSS, GAUGE, ("worker",), "Training loss reported by each worker."),
    MetricSpec(PER_WORKER_WAIT_FRACTION, GAUGE, ("worker",), "Share of wall time each worker spent waiting (0-1)."),
    MetricSpec(PER_WORKER_SENT_BYTES, GAUGE, ("worker",), "Cumulative bytes each worker reports it sent."),
    MetricSpec(PER_WORKER_RECEIVED_BYTES, GAUGE, ("worker",), "Cumulative bytes each worker reports it received."),
    MetricSpec(PER_WORKER_MERGED_TOKENS, GAUGE, ("worker",), "Tokens from each worker merged into the model."),
)

PER_WORKER_METRICS: tuple[MetricSpec, ...] = tuple(m for m in COORDINATOR_METRICS if m.labels == ("worker",))

# --------------------------------------------------------------------------------------------
# Worker (/metrics on its --metrics-port, default 9100)
# --------------------------------------------------------------------------------------------
WORKER_TOKENS_PER_SECOND = "geotrain_worker_tokens_per_second"
WORKER_STEP_SECONDS = "geotrain_worker_step_seconds"
WORKER_LOSS = "geotrain_worker_loss"
WORKER_SENT_BYTES = "geotrain_worker_sent_bytes"  # -> _total
WORKER_RECEIVED_BYTES = "geotrain_worker_received_bytes"  # -> _total
WORKER_WAIT_SECONDS = "geotrain_worker_wait_seconds"  # -> _total
WORKER_MODEL_VERSION = "geotrain_worker_model_version"
WORKER_MERGE_LAG_STEPS = "geotrain_worker_merge_lag_steps"
WORKER_GPU_MEMORY_BYTES = "geotrain_worker_gpu_memory_bytes"
WORKER_GPU_UTILIZATION_RATIO = "geotrain_worker_gpu_utilization_ratio"
SYNC_ALLREDUCE_SECONDS = "geotrain_sync_allreduce_seconds"
SYNC_ALLREDUCE_BYTES = "geotrain_sync_allreduce_bytes"  # -> _total
SYNC_GROUP_SIZE = "geotrain_sync_group_size"
SYNC_RESIDUAL_NORM = "geotrain_sync_residual_norm"
SYNC_REPAIRS = "geotrain_sync_repairs"  # -> _total

WORKER_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(WORKER_TOKENS_PER_SECOND, GAUGE, (), "Training tokens per second (recent average)."),
    MetricSpec(WORKER_STEP_SECONDS, HISTOGRAM, (), "Seconds per optimizer step."),
    MetricSpec(WORKER_LOSS, GAUGE, (), "Recent training loss."),
    MetricSpec(WORKER_SENT_BYTES, COUNTER, (), "Wire bytes sent to the coordinator."),
    MetricSpec(WORKER_RECEIVED_BYTES, COUNTER, (), "Wire bytes received from the coordinator."),
    MetricSpec(WORKER_WAIT_SECONDS, COUNTER, (), "Seconds spent waiting (network, coordinator) instead of training."),
    MetricSpec(WORKER_MODEL_VERSION, GAUGE, (), "Version of the global model this worker trains from."),
    MetricSpec(WORKER_MERGE_LAG_STEPS, HISTOGRAM, (), "Local steps between a push and the arrival of its merge."),
    MetricSpec(WORKER_GPU_MEMORY_BYTES, GAUGE, (), "GPU memory allocated by this process."),
    MetricSpec(WORKER_GPU_UTILIZATION_RATIO, GAUGE, (), "GPU utilization (0-1)."),
    MetricSpec(SYNC_ALLREDUCE_SECONDS, HISTOGRAM, (), "Seconds per sync-group all-reduce."),
    MetricSpec(SYNC_ALLREDUCE_BYTES, COUNTER, (), "Bytes this worker sent in sync-group all-reduces."),
    MetricSpec(SYNC_GROUP_SIZE, GAUGE, (), "Members of this worker's sync group."),
    MetricSpec(SYNC_RESIDUAL_NORM, GAUGE, (), "L2 norm of the 1-bit compression error-feedback residual."),
    MetricSpec(SYNC_REPAIRS, COUNTER, (), "Checksum rounds that found this member's parameters differing from rank 0's."),
)


def series_names(specs: Iterable[MetricSpec]) -> frozenset[str]:
    return frozenset(name for spec in specs for name in exported_names(spec))


COORDINATOR_SERIES: frozenset[str] = series_names(COORDINATOR_METRICS)
WORKER_SERIES: frozenset[str] = series_names(WORKER_METRICS)
ALL_SERIES: frozenset[str] = COORDINATOR_SERIES | WORKER_SERIES
