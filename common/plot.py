"""`geotrain plot RUN_DIR`: PNG charts from a coordinator run's history.jsonl.

Each history row (written at every evaluation by coordinator/persistence.py
`Persistence.append_history`) holds ``seconds``, ``train_loss``, ``version``, ``tokens``,
``val_loss`` and ``workers``: {name: the worker's last heartbeat stats}. The charts:

- ``loss_vs_tokens.png``: validation and training loss against merged training tokens;
- ``loss_vs_time.png``: the same against wall time since the run started;
- ``worker_throughput.png``: tokens/s of each worker over time;
- ``worker_traffic.png``: cumulative MB each worker sent and received over time.

matplotlib is an optional dependency (``pip install 'geotrain[plot]'``); without it
:func:`plot_run` raises :class:`PlotError` saying so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

HISTORY_NAME = "history.jsonl"
CHART_NAMES = ("loss_vs_tokens.png", "loss_vs_time.png", "worker_throughput.png", "worker_traffic.png")


class PlotError(ValueError):
    """A run directory that cannot be plotted, or matplotlib missing."""


def load_history(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/history.jsonl in order (torn or non-object lines are skipped)."""
    path = Path(run_dir) / HISTORY_NAME
    if not path.is_file():
        raise PlotError(f"{path} not found (is {run_dir} a coordinator run directory? "
                        "history rows are written at each evaluation)")
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if isinstance(row, dict):
                rows.append(row)
    if not rows:
        raise PlotError(f"{path} holds no history rows yet")
    return rows


def _num(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _time_unit(seconds: list[float]) -> tuple[float, str]:
    """(divisor, axis label) that keeps wall-time ticks readable."""
    longest = max((s for s in seconds if not math.isnan(s)), default=0.0)
    if longest >= 3 * 3600:
        return 3600.0, "wall time (hours)"
    if longest >= 180:
        return 60.0, "wall time (minutes)"
    return 1.0, "wall time (seconds)"


def _worker_series(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (seconds, values) for one heartbeat stat, over the rows that list the worker."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        t = _num(row.get("seconds"))
        workers = row.get("workers") or {}
        if not isinstance(workers, dict):
            continue
        for name, stats in workers.items():
            if not isinstance(stats, dict) or key not in stats:
                continue
            xs, ys = out.setdefault(str(name), ([], []))
            xs.append(t)
            ys.append(_num(stats[key]) * scale)
    return out


def _import_matplotlib():
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotError(
            "plotting needs matplotlib, an optional extra: pip install 'geotrain[plot]' "
            "(or pip install matplotlib)"
        ) from exc
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return matplotlib, Figure


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write the charts of RUN_DIR into OUT (default RUN_DIR/plots); returns the files written."""
    run_dir = Path(run_dir)
    _, Figure = _import_matplotlib()  # before reading anything: the missing extra is the first news
    rows = sorted(load_history(run_dir), key=lambda r: _num(r.get("seconds")))
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name

    tokens = [_num(r.get("tokens")) for r in rows]
    seconds = [_num(r.get("seconds")) for r in rows]
    val = [_num(r.get("val_loss")) for r in rows]
    train = [_num(r.get("train_loss")) for r in rows]
    t_div, t_label = _time_unit(seconds)

    def per_time(xs: list[float]) -> list[float]:
        return [x / t_div for x in xs]

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        written.append(path)

    def loss_chart(xs: list[float], xlabel: str, name: str, what: str) -> None:
        fig = Figure(figsize=(8, 4.5))
        ax = fig.add_subplot()
        ax.plot(xs, val, marker="o", markersize=3, label="validation loss")
        if any(not math.isnan(v) for v in train):
            ax.plot(xs, train, marker=".", markersize=3, alpha=0.8, label="training loss (last merge)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{title}: loss vs {what}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, name)

    loss_chart(tokens, "training tokens merged", CHART_NAMES[0], "tokens")
    loss_chart(per_time(seconds), t_label, CHART_NAMES[1], "wall time")

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    throughput = _worker_series(rows, "tokens_per_second")
    for name, (xs, ys) in sorted(throughput.items()):
        ax.plot(per_time(xs), ys, marker="o", markersize=3, label=name)
    ax.set_xlabel(t_label)
    ax.set_ylabel("tokens / second")
    ax.set_title(f"{title}: throughput per worker")
    ax.grid(True, alpha=0.3)
    if throughput:
        ax.legend(fontsize="small", ncol=max(1, len(throughput) // 12))
    else:
        ax.text(0.5, 0.5, "no worker stats in the history", ha="center", va="center", transform=ax.transAxes)
    save(fig, CHART_NAMES[2])

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    sent = _worker_series(rows, "sent_bytes", 1e-6)
    received = _worker_series(rows, "received_bytes", 1e-6)
    for i, name in enumerate(sorted(set(sent) | set(received))):
        color = f"C{i % 10}"
        if name in sent:
            ax.plot(per_time(sent[name][0]), sent[name][1], color=color, label=f"{name} up")
        if name in received:
            ax.plot(per_time(received[name][0]), received[name][1], color=color, linestyle="--",
                    label=f"{name} down")
    ax.set_xlabel(t_label)
    ax.set_ylabel("MB (cumulative, per worker)")
    ax.set_title(f"{title}: traffic per worker (solid: sent, dashed: received)")
    ax.grid(True, alpha=0.3)
    if sent or received:
        ax.legend(fontsize="small", ncol=max(1, (len(sent) + len(received)) // 12))
    else:
        ax.text(0.5, 0.5, "no worker stats in the history", ha="center", va="center", transform=ax.transAxes)
    save(fig, CHART_NAMES[3])
    return written
