"""The run status table: `geotrain status HOST:PORT` and the coordinator's periodic log block.

Both render the same dict, ``CoordinatorState.status()`` (what the Status RPC returns as
``status_json``), with :func:`render_status`. The gRPC client that fetches
it is ``geotrain.protos.rpc.fetch_status``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

WORKER_COLUMNS = ("worker", "device", "tok/s", "loss", "merged tok", "pushes", "wait %", "MB up", "MB down", "seen")
_RIGHT = frozenset(WORKER_COLUMNS[2:])  # numbers are right-aligned


def strict_json(value: Any) -> Any:
    """`value` with NaN/inf floats replaced by None, so json.dumps gives strict JSON (jq rejects the
    NaN that status_json carries for a run not evaluated yet)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _loss(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) or math.isinf(v) else f"{v:.4f}"


def format_duration(seconds: float) -> str:
    """3725.2 -> '1h02m05s'; 65 -> '1m05s'; 4.2 -> '4.2s'."""
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(s) or s < 0:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    whole = int(s)
    h, rest = divmod(whole, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _mb(n: Any) -> str:
    try:
        return f"{float(n) / 1e6:.2f}"
    except (TypeError, ValueError):
        return "-"


def worker_row(worker: dict[str, Any]) -> tuple[str, ...]:
    stats = worker.get("stats") or {}
    wall = float(stats.get("wall_seconds", 0.0) or 0.0)
    wait = 100.0 * float(stats.get("wait_seconds", 0.0) or 0.0) / wall if wall > 0 else 0.0
    return (
        str(worker.get("name") or worker.get("worker_id", "?")),
        str(worker.get("device") or "-"),
        f"{float(stats.get('tokens_per_second', 0.0) or 0.0):,.0f}",
        _loss(stats.get("loss")) if stats else "-",
        f"{_int(worker.get('merged_tokens')):,d}",
        f"{_int(worker.get('pushes')):,d}",
        f"{wait:.1f}",
        _mb(stats.get("sent_bytes", 0)),
        _mb(stats.get("received_bytes", 0)),
        format_duration(worker.get("last_seen_seconds", float("nan"))) + " ago",
    )


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]], indent: str = "  ") -> list[str]:
    rows = list(rows)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        out = []
        for name, cell, w in zip(header, cells, widths):
            out.append(cell.rjust(w) if name in _RIGHT else cell.ljust(w))
        return (indent + "  ".join(out)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def render_status(status: dict[str, Any]) -> str:
    """A compact multi-line table: one header line about the run, then one row per live worker."""
    shards = status.get("shards") or {}
    shard_text = ""
    if shards:
        shard_text = "  units " + "/".join(f"{_int(shards.get(k))} {k}" for k in ("done", "leased", "pending") if k in shards)
    head = (
        f"run {status.get('run_id', '?')}  state {status.get('state', '?')}  "
        f"version {_int(status.get('model_version'))}  tokens {_int(status.get('tokens')):,d}  "
        f"val loss {_loss(status.get('val_loss'))}  train loss {_loss(status.get('train_loss'))}  "
        f"elapsed {format_duration(status.get('seconds', float('nan')))}"
    )
    traffic = (
        f"coordinator sent {_mb(status.get('coordinator_sent_bytes', 0))} MB, "
        f"received {_mb(status.get('coordinator_received_bytes', 0))} MB{shard_text}"
    )
    workers = list(status.get("worker_list") or [])
    lines = [head, traffic]
    if workers:
        lines += _table(WORKER_COLUMNS, (worker_row(w) for w in sorted(workers, key=lambda w: str(w.get("name")))))
    else:
        lines.append("  (no live workers)")
    return "\n".join(lines)
