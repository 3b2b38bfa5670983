"""Watching a run: the status table (`geotrain status`, the coordinator's periodic log block), the
plots (`geotrain plot`), and the live /metrics of a real coordinator and worker linted by promtool.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from geotrain.common import __version__
from geotrain.common import metric_names as mn
from geotrain.cli import cli
from geotrain.common.config import RunConfig
from geotrain.common.reader import TokenData
from geotrain.common.plot import CHART_NAMES, PlotError, plot_run
from geotrain.protos.rpc import PROTOCOL_VERSION
from geotrain.common.status import WORKER_COLUMNS, format_duration, render_status
from geotrain.coordinator import server as server_mod
from geotrain.coordinator.server import CoordinatorServer
from tools import LiveRun, require_promtool, require_tool, samples, scrape, tiny_data_dir, venv_tool

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_data_dir(tmp_path_factory.mktemp("obs-data"))


def small_run() -> RunConfig:
    run = RunConfig()
    run.model.n_layer, run.model.n_embd, run.model.n_head, run.model.block_size = 1, 32, 2, 16
    run.plan.unit_tokens = 1024
    run.eval.iters = 2
    return run


def status_fixture() -> dict:
    return {
        "run_id": "r-1234", "state": "training", "model_version": 12, "tokens": 123456, "val_loss": math.nan,
        "train_loss": 3.25, "seconds": 3725.0, "coordinator_sent_bytes": 12_000_000,
        "coordinator_received_bytes": 3_000_000, "shards": {"pending": 3, "leased": 1, "done": 5},
        "worker_list": [
            {"worker_id": "w2", "name": "gpu-a", "device": "cuda:0", "merged_tokens": 99999, "pushes": 7,
             "last_seen_seconds": 1.25,
             "stats": {"tokens_per_second": 23456.7, "loss": 3.1, "sent_bytes": 5e6, "received_bytes": 7.5e6,
                       "wait_seconds": 2.0, "wall_seconds": 100.0}},
            {"worker_id": "w1", "name": "cpu-b", "device": "cpu", "merged_tokens": 0, "pushes": 0,
             "last_seen_seconds": 0.5, "stats": {}},
        ],
    }


# --------------------------------------------------------------------------- status table


def test_render_status_header_and_worker_rows():
    text = render_status(status_fixture())
    lines = text.splitlines()
    head = lines[0]
    for part in ("run r-1234", "state training", "version 12", "tokens 123,456", "val loss -", "train loss 3.2500",
                 "elapsed 1h02m05s"):
        assert part in head, (part, head)
    assert "sent 12.00 MB" in lines[1] and "received 3.00 MB" in lines[1] and "5 done" in lines[1]
    header = lines[2].split()
    assert header[0] == "worker" and "tok/s" in header and "pushes" in header
    rows = {line.split()[0]: line for line in lines[3:]}
    assert set(rows) == {"gpu-a", "cpu-b"} and len(lines) == 5
    a = rows["gpu-a"].split()
    assert a[1:9] == ["cuda:0", "23,457", "3.1000", "99,999", "7", "2.0", "5.00", "7.50"]
    assert rows["gpu-a"].endswith("1.2s ago")
    # Every row has one cell per column (a worker without stats yet included).
    assert len(rows["cpu-b"].split()) == len(WORKER_COLUMNS) + 1  # "0.5s ago" is two words
    assert lines[2].index("tok/s") + len("tok/s") == rows["gpu-a"].index("23,457") + len("23,457")  # right-aligned


def test_render_status_without_workers_and_with_missing_fields():
    text = render_status({"run_id": "x", "state": "finished", "worker_list": []})
    assert "no live workers" in text and "version 0" in text and "val loss -" in text


def test_format_duration():
    assert format_duration(4.24) == "4.2s"
    assert format_duration(65) == "1m05s"
    assert format_duration(3725.9) == "1h02m05s"
    assert format_duration(float("nan")) == "-"


@pytest.fixture
def coordinator(data_dir, tmp_path):
    srv = CoordinatorServer(small_run(), TokenData(data_dir), tmp_path / "run", host="127.0.0.1", port=0,
                            token="secret")
    port = srv.start()
    record, _ = srv.state.join("obs-w", "cpu", 0, "0", PROTOCOL_VERSION, "fp", "", "")
    srv.state.heartbeat(record.worker_id, record.session_id, {
        "tokens_per_second": 1234.0, "loss": 4.5, "sent_bytes": 2e6, "received_bytes": 3e6,
        "wait_seconds": 1.0, "wall_seconds": 10.0,
    })
    yield srv, f"127.0.0.1:{port}"
    srv.server.stop(0)


def test_status_command_table_json_and_token(coordinator, tmp_path):
    srv, target = coordinator
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    runner = CliRunner()

    result = runner.invoke(cli, ["status", target, "--token-file", str(token_file)])
    assert result.exit_code == 0, result.output
    assert f"run {srv.state.run_id}" in result.output and "version 1" in result.output
    row = next(line for line in result.output.splitlines() if line.split()[:1] == ["obs-w"])
    assert row.split()[1:8] == ["cpu", "1,234", "4.5000", "0", "0", "10.0", "2.00"]

    result = runner.invoke(cli, ["status", target, "--json", "--token-file", str(token_file)])
    assert result.exit_code == 0, result.output
    snapshot = json.loads(result.output, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert snapshot["val_loss"] is None  # not evaluated yet: NaN in status_json, null here
    assert snapshot["run_id"] == srv.state.run_id
    assert [w["name"] for w in snapshot["worker_list"]] == ["obs-w"]
    assert snapshot["worker_list"][0]["stats"]["tokens_per_second"] == 1234.0

    result = runner.invoke(cli, ["status", target, "--json"], env={"GEOTRAIN_TOKEN": "secret"})
    assert result.exit_code == 0 and json.loads(result.output)["run_id"] == srv.state.run_id

    result = runner.invoke(cli, ["status", target], env={"GEOTRAIN_TOKEN": ""})
    assert result.exit_code == 2 and "UNAUTHENTICATED" in result.output


def test_status_command_over_tls(data_dir, tmp_path):
    openssl = require_tool("openssl")
    key, cert = tmp_path / "c.key", tmp_path / "c.crt"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    srv = CoordinatorServer(small_run(), TokenData(data_dir), tmp_path / "run", host="127.0.0.1", port=0,
                            token="secret", tls_cert=cert.read_bytes(), tls_key=key.read_bytes())
    port = srv.start()
    try:
        env = {"GEOTRAIN_TOKEN": "secret"}
        result = CliRunner().invoke(cli, ["status", f"localhost:{port}", "--tls-ca", str(cert), "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["run_id"] == srv.state.run_id
        result = CliRunner().invoke(cli, ["status", f"localhost:{port}", "--timeout", "2"], env=env)  # plaintext
        assert result.exit_code == 2 and "error:" in result.output
        result = CliRunner().invoke(cli, ["status", f"localhost:{port}", "--tls-ca", str(tmp_path / "none.pem")])
        assert result.exit_code == 2 and "none.pem" in result.output
    finally:
        srv.server.stop(0)


def test_status_command_unreachable_coordinator_fails_cleanly():
    from tools import free_port

    result = CliRunner().invoke(cli, ["status", f"127.0.0.1:{free_port()}", "--timeout", "1"])
    assert result.exit_code == 2
    assert "error:" in result.output and ("UNAVAILABLE" in result.output or "DEADLINE_EXCEEDED" in result.output)


def test_coordinator_logs_the_status_table_periodically(coordinator, monkeypatch, caplog):
    srv, _ = coordinator
    monkeypatch.setattr(server_mod, "STATUS_EVERY_SECONDS", 0.3)
    caplog.set_level(logging.INFO, logger="geotrain.coordinator.server")
    stop = threading.Event()
    thread = threading.Thread(target=srv.run_until, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(r.getMessage().startswith("status\n") for r in caplog.records):
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(5)
    blocks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("status\n")]
    assert blocks, [r.getMessage() for r in caplog.records]
    # The same table as `geotrain status` (modulo timings), in one log record.
    assert f"run {srv.state.run_id}" in blocks[0] and "obs-w" in blocks[0] and "tok/s" in blocks[0]


# --------------------------------------------------------------------------- plots


def write_history(run_dir: Path, rows: int = 6) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "history.jsonl", "w") as fh:
        for i in range(rows):
            workers = {
                name: {"tokens_per_second": 1000.0 * (k + 1) + 10 * i, "sent_bytes": 1e6 * i * (k + 1),
                       "received_bytes": 2e6 * i, "loss": 4.0 - 0.3 * i}
                for k, name in enumerate(("a", "b"))
            }
            row = {"seconds": 30.0 * i, "train_loss": math.nan if i == 0 else 4.0 - 0.3 * i, "version": 5 * i,
                   "tokens": 10_000 * i, "val_loss": 4.1 - 0.3 * i, "workers": workers if i < rows - 1 else {}}
            fh.write(json.dumps(row) + "\n")
        fh.write('{"seconds": 999, "torn')  # a line cut by a crash is skipped


def test_plot_writes_the_charts(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    write_history(run_dir)
    result = CliRunner().invoke(cli, ["plot", str(run_dir)])
    assert result.exit_code == 0, result.output
    written = [Path(line) for line in result.output.split()]
    assert [p.name for p in written] == list(CHART_NAMES)
    for path in written:
        assert path.parent == run_dir / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000

    out = tmp_path / "elsewhere"
    assert [p.name for p in plot_run(run_dir, out)] == list(CHART_NAMES)
    assert all((out / name).is_file() for name in CHART_NAMES)


def test_plot_without_history_is_a_clear_error(tmp_path):
    pytest.importorskip("matplotlib")
    result = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "history.jsonl" in result.output
    (tmp_path / "history.jsonl").write_text("\n")
    with pytest.raises(PlotError, match="no history rows"):
        plot_run(tmp_path)


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    write_history(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert result.exit_code == 2
    assert "geotrain[plot]" in result.output and "matplotlib" in result.output
    assert not (tmp_path / "plots").exists()


# --------------------------------------------------------------------------- live /metrics


def _lint(promtool: str, text: str) -> None:
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        f"promtool check metrics (exit {result.returncode}):\n{result.stdout}{result.stderr}"
    )


def _names(parsed) -> set[str]:
    return {name for name, _ in parsed}


def test_live_metrics_lint_clean_and_carry_the_run(data_dir, tmp_path):
    """A real coordinator + worker on loopback: both /metrics pass `promtool check metrics`, carry
    the key series with sane values; `geotrain status` and `geotrain plot` work on the same run."""
    promtool = require_promtool()
    live = LiveRun(tmp_path, data_dir, workers=1, max_tokens=2_000_000)
    name = live.worker_names[0]
    with live:
        def coordinator_ready():
            text = scrape(live.coordinator_metrics_url)
            s = samples(text)
            ok = (
                s.get(("geotrain_model_version", ()), 0) > 1
                and s.get(("geotrain_tokens_total", ()), 0) > 0
                and s.get(("geotrain_worker_tokens_per_second", (("worker", name),)), 0) > 0
                and ("geotrain_worker_merged_tokens", (("worker", name),)) in s
            )
            return (text, s) if ok else None

        def worker_ready():
            text = scrape(live.worker_metrics_url(0))
            s = samples(text)
            ok = s.get(("geotrain_worker_model_version", ()), 0) >= 1 and s.get(
                ("geotrain_worker_tokens_per_second", ()), 0) > 0 and s.get(("geotrain_worker_merge_lag_steps_count", ()), 0) > 0
            return (text, s) if ok else None

        coord_text, coord = live.wait_for(coordinator_ready, 45, "the coordinator's key series")
        worker_text, worker = live.wait_for(worker_ready, 20, "the worker's key series")

        _lint(promtool, coord_text)
        _lint(promtool, worker_text)

        # Coordinator: the run's progress and the per-worker series, labelled by worker name.
        assert coord[("geotrain_model_version", ())] > 1
        assert coord[("geotrain_tokens_total", ())] > 0
        assert coord[("geotrain_workers", ())] == 1
        assert coord[("geotrain_received_bytes_total", ())] > 0 and coord[("geotrain_sent_bytes_total", ())] > 0
        assert coord[("geotrain_build_info", (("protocol", str(PROTOCOL_VERSION)), ("version", __version__)))] == 1
        per_worker = {n for n, labels in coord if dict(labels).get("worker") == name}
        assert {f"{m.name}" for m in mn.PER_WORKER_METRICS} <= per_worker
        assert 0 <= coord[("geotrain_worker_wait_fraction", (("worker", name),))] <= 1
        assert coord[("geotrain_worker_sent_bytes", (("worker", name),))] > 0
        assert _names(coord) - {n for n in _names(coord) if n.endswith("_created")} <= mn.COORDINATOR_SERIES

        # Worker: its own view, unlabelled (sync-group series only appear in a sync group).
        assert worker[("geotrain_worker_model_version", ())] >= 1
        assert worker[("geotrain_worker_tokens_per_second", ())] > 0
        assert worker[("geotrain_worker_sent_bytes_total", ())] > 0
        assert worker[("geotrain_worker_step_seconds_count", ())] > 0
        assert worker[("geotrain_worker_merge_lag_steps_count", ())] > 0  # a merged push was observed
        assert _names(worker) - {n for n in _names(worker) if n.endswith("_created")} <= mn.WORKER_SERIES

        # The terminal view of the same run, from another process.
        cmd = [venv_tool("geotrain"), "status", live.target]
        shown = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "state training" in shown.stdout and any(
            line.split()[:2] == [name, "cpu"] for line in shown.stdout.splitlines()
        ), shown.stdout
        raw = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=60)
        assert raw.returncode == 0 and json.loads(raw.stdout)["worker_list"][0]["name"] == name

    # After a clean stop the run directory has a history to plot.
    assert all(p.returncode == 0 for p in live.procs), live.log_tail()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # the plot extra is not installed; test_plot_writes_the_charts skips for it
    else:
        written = plot_run(live.run_dir)
        assert [p.name for p in written] == list(CHART_NAMES)
        assert all(p.read_bytes().startswith(PNG_MAGIC) for p in written)
