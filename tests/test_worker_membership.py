"""The worker's membership and ports, with a real coordinator process: it heartbeats from the
join on (a slow model setup does not get it dropped), two workers on one host with default ports
both train, and a chosen port that is taken is a one-line error."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest
import torch

from procs import Cluster, Proc, prepare_corpus, tiny_config

from geotrain.common.config import WorkerConfig
from geotrain.worker.runner import RunnerHooks, WorkerRunner


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus"), n_bytes=60_000)


class SlowSetup(RunnerHooks):
    """Model setup that takes `seconds` after the join (as building, downloading and hashing a
    large model does), through the runner's after_join seam."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.worker_id = ""
        self.done = threading.Event()

    def attach(self, runner) -> None:
        self.runner = runner

    def after_join(self, reply) -> None:
        self.worker_id = reply.worker_id
        self.runner.stop_event.wait(self.seconds)
        self.done.set()


@pytest.mark.timeout(120)
def test_a_worker_preparing_longer_than_its_lease_stays_a_member(data_dir, tmp_path):
    lease = 3.0
    cfg = tiny_config(workers__heartbeat_seconds=0.5, workers__lease_seconds=lease, plan__max_tokens=8192)
    torch.set_num_threads(1)
    with Cluster(tmp_path, data_dir, cfg) as c:
        c.start_coordinator()
        hooks = SlowSetup(seconds=3 * lease)
        runner = WorkerRunner(WorkerConfig(coordinator=c.target, name="slow", device="cpu", threads=1, metrics_port=0,
                                           cache_dir=str(tmp_path / "cache"), serve=False, summary_seconds=1.0,
                                           finish_patience=10.0), hooks=hooks)
        result: list = []
        t = threading.Thread(target=lambda: result.append(runner.run()), daemon=True)
        t.start()
        try:
            c.wait_for(lambda: hooks.worker_id, 30, "the join")
            # Past the lease, still preparing: the coordinator still lists the worker as live.
            time.sleep(2 * lease)
            assert not hooks.done.is_set()
            rows = {w["worker_id"]: w for w in c.status()["worker_list"]}
            assert hooks.worker_id in rows, rows
            assert rows[hooks.worker_id]["last_seen_seconds"] < lease
            assert runner.heartbeats.beats >= 2
            hooks.done.wait(30)
            # It trains on the session it joined with: never dropped, never joined again.
            c.wait_for(lambda: runner.stats.snapshot().steps > 0, 60, "a training step")
            assert runner.client.session_epoch == 1
            assert runner.client.worker_id == hooks.worker_id
        finally:
            runner.stop()
            t.join(30)
        assert result == [0]
        assert "worker slow dropped" not in c.coordinator.log()


def _hold(port: int) -> socket.socket | None:
    """Listen on `port` (all addresses) so that nothing else binds it; None when already taken."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        s.bind(("::", port))
    except OSError:
        s.close()
        return None
    s.listen()
    return s


@pytest.mark.timeout(180)
def test_two_workers_on_one_host_with_default_ports_both_train(data_dir, tmp_path):
    """Neither passes --port or --metrics-port: the defaults (10000, 9100) are taken (held here,
    or by anything else on the host), each worker serves on a free port instead, says so, and
    both join and train."""
    from geotrain.worker.cli import main

    from geotrain.common.config import WORKER_METRICS_PORT, WORKER_PORT

    grpc_default, metrics_default = WORKER_PORT, WORKER_METRICS_PORT
    held = [_hold(grpc_default), _hold(metrics_default)]
    cfg = tiny_config(plan__max_tokens=0)  # until stopped: a loaded host may start one worker late
    try:
        with Cluster(tmp_path, data_dir, cfg) as c:
            c.start_coordinator()
            workers = []
            for name in ("a", "b"):
                args = [sys.executable, "-m", "geotrain.worker.cli", "--coordinator", c.target, "--name", name,
                        "--threads", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
                proc = Proc(name, args, c._log_path(name), c.env)
                c.procs.append(proc)
                workers.append(proc)

            def both_trained() -> bool:
                rows = {w["name"]: w for w in c.status()["worker_list"]}
                return all(rows.get(n, {}).get("stats", {}).get("steps", 0) > 0 for n in ("a", "b"))

            c.wait_for(both_trained, 120, "both workers training", fail_if_dead=workers)
            for proc in workers:
                log = proc.log()
                assert "Traceback" not in log and "Address already in use" not in log, proc.tail()
                if held[0] is not None:
                    assert f"gRPC port {grpc_default} is taken" in log, proc.tail()
                if held[1] is not None:
                    assert f"metrics port {metrics_default} is taken" in log, proc.tail()
    finally:
        for s in held:
            if s is not None:
                s.close()


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_chosen_port_that_is_taken_is_a_one_line_error(flag, tmp_path):
    import subprocess

    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 0))
    s.listen()
    port = s.getsockname()[1]
    other = "--metrics-port" if flag == "--port" else "--port"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "geotrain.worker.cli", "--coordinator", "127.0.0.1:1", "--device", "cpu",
             flag, str(port), other, "0"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        s.close()
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [f"error: port {port} ({flag}) is already in use; choose another {flag} or 0 for any free port"], lines
    assert "Traceback" not in proc.stderr


def test_bind_falls_back_only_where_the_config_allows_it(caplog):
    """WorkerRunner.bind: a taken port is PortInUse (a ValueError naming port and flag) unless its
    *_fallback is set, then a free port is bound and logged."""
    from geotrain.worker.ports import PortInUse

    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", 0))
    s.listen()
    taken = s.getsockname()[1]
    try:
        for field in ("port", "metrics_port"):
            other = {"metrics_port": 0} if field == "port" else {"port": 0}
            runner = WorkerRunner(WorkerConfig(coordinator="127.0.0.1:1", **{field: taken}, **other))
            with pytest.raises(PortInUse, match=f"port {taken} \\(--{field.replace('_', '-')}\\)"):
                runner.bind()
            if runner.server is not None:
                runner.server.stop(0)
            runner = WorkerRunner(WorkerConfig(coordinator="127.0.0.1:1", **{field: taken}, **other,
                                               **{f"{field}_fallback": True}))
            caplog.clear()
            with caplog.at_level("WARNING", logger="geotrain.worker.ports"):
                runner.bind()
            try:
                bound = runner.server.port if field == "port" else runner.metrics_port
                assert bound not in (0, taken)
                assert f"port {taken} is taken" in caplog.text and f"port {bound}" in caplog.text
            finally:
                runner.server.stop(0)
    finally:
        s.close()
