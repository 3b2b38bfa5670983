"""A real Prometheus server scraping a live coordinator and worker on loopback.

The `prometheus` binary comes from Debian's `prometheus` package, found or fetched the same way as
promtool (tests/tools.py). Without it the test skips locally and fails in CI. Marked `integration`
(external binary) but not `slow`, so the default `pytest` run includes it.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from geotrain.common import metric_names as mn
from tools import LiveRun, free_port, require_prometheus, require_promtool, tiny_data_dir

pytestmark = pytest.mark.integration

SCRAPE_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: {coordinator_job}
    static_configs:
      - targets: ["127.0.0.1:{coordinator_port}"]
  - job_name: {worker_job}
    static_configs:
      - targets: ["127.0.0.1:{worker_port}"]
"""


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read().decode())


class Prometheus:
    def __init__(self, binary: str, root: Path, config: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = root / "prometheus.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                ],
                stdout=out, stderr=subprocess.STDOUT, cwd=root,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def query(self, promql: str) -> list[dict]:
        reply = _get_json(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def targets(self) -> list[dict]:
        return _get_json(f"{self.base}/api/v1/targets")["data"]["activeTargets"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_prometheus_scrapes_a_live_run(tmp_path):
    prometheus_bin = require_prometheus()
    promtool = require_promtool()
    (tmp_path / "data").mkdir()
    data_dir = tiny_data_dir(tmp_path / "data")
    live = LiveRun(tmp_path, data_dir, workers=1, max_tokens=2_000_000)
    name = live.worker_names[0]
    config = tmp_path / "prometheus.yml"
    config.write_text(SCRAPE_CONFIG.format(
        coordinator_job=mn.COORDINATOR_JOB, coordinator_port=live.coordinator_metrics_port,
        worker_job=mn.WORKER_JOB, worker_port=live.worker_metrics_ports[0],
    ))
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    prom = Prometheus(prometheus_bin, tmp_path, config)
    try:
        prom.wait_ready()
        with live:
            def version_series():
                result = prom.query(mn.MODEL_VERSION)
                coordinator = [r for r in result if r["metric"].get("job") == mn.COORDINATOR_JOB]
                return coordinator if coordinator and float(coordinator[0]["value"][1]) > 1 else None

            def per_worker_series():
                result = prom.query(f'{mn.PER_WORKER_TOKENS_PER_SECOND}{{job="{mn.COORDINATOR_JOB}",worker="{name}"}}')
                return result if result and float(result[0]["value"][1]) > 0 else None

            def worker_own_series():
                result = prom.query(f'{mn.WORKER_MODEL_VERSION}{{job="{mn.WORKER_JOB}"}}')
                return result if result and float(result[0]["value"][1]) >= 1 else None

            version = live.wait_for(version_series, 45, "geotrain_model_version > 1 in Prometheus", every=0.5)
            per_worker = live.wait_for(per_worker_series, 20, f"per-worker throughput of {name} in Prometheus",
                                       every=0.5)
            own = live.wait_for(worker_own_series, 20, "the worker's own model version in Prometheus", every=0.5)

            assert version[0]["metric"]["instance"] == f"127.0.0.1:{live.coordinator_metrics_port}"
            assert per_worker[0]["metric"]["worker"] == name
            assert own[0]["metric"]["instance"] == f"127.0.0.1:{live.worker_metrics_ports[0]}"
            # Counters can be rated (what the dashboard does) once two scrapes are in.
            def token_increase():
                result = prom.query(f'increase({mn.TOKENS}_total{{job="{mn.COORDINATOR_JOB}"}}[1m])')
                return result if result and float(result[0]["value"][1]) > 0 else None

            live.wait_for(token_increase, 20, "an increase of geotrain_tokens_total over two scrapes", every=0.5)
            health = {t["labels"]["job"]: t["health"] for t in prom.targets()}
            assert health == {mn.COORDINATOR_JOB: "up", mn.WORKER_JOB: "up"}, prom.targets()
        assert all(p.returncode == 0 for p in live.procs), live.log_tail()
    finally:
        prom.stop()
