"""Static checks of deploy/: compose, Dockerfiles, systemd units, Prometheus, Grafana, onstart.sh.

No Docker engine, systemd or Grafana runs here, so everything is checked offline: schemas
(check-jsonschema), `systemd-analyze verify`, `promtool check config|rules|metrics`, shellcheck,
and cross-file consistency (metric names, datasource uid, mount paths, job names). External tools
skip the test when missing, except in CI (`CI` set) where that is a failure (see tests/tools.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from geotrain.common import metric_names as mn
from tools import find_promtool, find_shellcheck, missing_tool, require_promtool, require_tool, venv_tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "geotrain.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "geotrain.json"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
DOCKERFILES = {"coordinator": DEPLOY / "Dockerfile.coordinator", "worker": DEPLOY / "Dockerfile.worker"}
ONSTART = DEPLOY / "onstart.sh"


def load_yaml(path: Path):
    """PyYAML when installed, else ruamel.yaml (a dependency of check-jsonschema, the dev extra)."""
    try:
        import yaml
    except ImportError:
        try:
            from ruamel.yaml import YAML
        except ImportError:
            missing_tool("no YAML parser (PyYAML or ruamel.yaml) installed")
        return YAML(typ="safe").load(path.read_text())
    return yaml.safe_load(path.read_text())


# ================================================================================================
# Metric names
# ================================================================================================


def _exposition(specs) -> str:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    registry = CollectorRegistry()
    kinds = {mn.GAUGE: Gauge, mn.COUNTER: Counter, mn.HISTOGRAM: Histogram}
    for spec in specs:
        metric = kinds[spec.kind](spec.name, spec.help, spec.labels, registry=registry)
        if spec.labels:  # a labelled metric exports nothing until a child exists
            metric = metric.labels(*[f"x{i}" for i in range(len(spec.labels))])
        if spec.kind == mn.HISTOGRAM:
            metric.observe(1.0)
        elif spec.kind == mn.COUNTER:
            metric.inc()
        else:
            metric.set(1.0)
    return generate_latest(registry).decode()


@pytest.mark.parametrize("side", ["coordinator", "worker"])
def test_metric_names_are_what_prometheus_client_exports(side):
    specs = mn.COORDINATOR_METRICS if side == "coordinator" else mn.WORKER_METRICS
    expected = mn.COORDINATOR_SERIES if side == "coordinator" else mn.WORKER_SERIES
    names = {spec.name for spec in specs}
    assert len(names) == len(specs), "a metric is declared twice"
    assert all(not name.endswith("_total") for name in names), "declare counters without _total"
    samples = set()
    for line in _exposition(specs).splitlines():
        if line and not line.startswith("#"):
            samples.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    samples = {s for s in samples if not s.endswith("_created")}
    assert samples == expected


def _families(registry) -> set[tuple[str, str]]:
    return {(family.name, family.type) for family in registry.collect()}


def test_coordinator_exports_exactly_the_contract():
    from geotrain.coordinator.metrics import CoordinatorMetrics

    exported = _families(CoordinatorMetrics().registry)
    assert exported == {(m.name, m.kind) for m in mn.COORDINATOR_METRICS}


def test_worker_exports_only_contract_metrics():
    from geotrain.worker.metrics import WorkerMetrics

    exported = _families(WorkerMetrics().registry)
    contract = {(m.name, m.kind) for m in mn.WORKER_METRICS}
    assert exported <= contract, f"not in common/metric_names.py: {sorted(exported - contract)}"
    # The process metrics every worker has (sync-group ones appear only in sync groups).
    assert {(m.name, m.kind) for m in mn.WORKER_METRICS if not m.name.startswith("geotrain_sync_")} <= exported


def test_metric_names_contract():
    assert {m.name for m in mn.PER_WORKER_METRICS} == {
        "geotrain_worker_tokens_per_second",
        "geotrain_worker_loss",
        "geotrain_worker_wait_fraction",
        "geotrain_worker_sent_bytes",
        "geotrain_worker_received_bytes",
        "geotrain_worker_merged_tokens",
    }
    for series in (
        "geotrain_tokens_total",
        "geotrain_deltas_total",
        "geotrain_received_bytes_total",
        "geotrain_sent_bytes_total",
        "geotrain_rpc_errors_total",
        "geotrain_delta_staleness_bucket",
        "geotrain_round_seconds_bucket",
        "geotrain_merge_seconds_bucket",
        "geotrain_build_info",
    ):
        assert series in mn.COORDINATOR_SERIES
    for series in (
        "geotrain_worker_sent_bytes_total",
        "geotrain_worker_received_bytes_total",
        "geotrain_worker_wait_seconds_total",
        "geotrain_worker_step_seconds_bucket",
        "geotrain_sync_allreduce_seconds_bucket",
        "geotrain_sync_allreduce_bytes_total",
    ):
        assert series in mn.WORKER_SERIES
    labels = {m.name: m.labels for m in mn.COORDINATOR_METRICS}
    assert labels[mn.DELTAS] == ("result",)
    assert labels[mn.SHARDS] == ("state",)
    assert labels[mn.RPC_ERRORS] == ("method", "code")
    assert labels[mn.BUILD_INFO] == ("version", "protocol")


@pytest.mark.integration
@pytest.mark.parametrize("side", ["coordinator", "worker"])
def test_metric_names_pass_promtool_lint(side, tmp_path):
    promtool = require_promtool()
    specs = mn.COORDINATOR_METRICS if side == "coordinator" else mn.WORKER_METRICS
    result = subprocess.run(
        [promtool, "check", "metrics"], input=_exposition(specs), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ================================================================================================
# docker-compose
# ================================================================================================


def test_compose_validates_against_compose_spec():
    checker = venv_tool("check-jsonschema")
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of a service's relative bind mounts (short syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def test_compose_services_and_files():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"coordinator", "prometheus", "grafana", "worker"} <= set(services)
    for name in ("coordinator", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start by default"
    assert services["worker"]["profiles"] == ["cpu-workers"]

    for name in ("coordinator", "worker"):
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        assert Path(str(dockerfile) + ".dockerignore").is_file(), "BuildKit's per-Dockerfile ignore file"
        assert services[name].get("stop_signal", "SIGTERM") == "SIGTERM"

    # Every bind-mounted host path exists.
    for name, service in services.items():
        for target, source in _bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"

    prometheus = _bind_mounts(services["prometheus"])
    assert prometheus["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML
    command = " ".join(services["prometheus"]["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in command

    grafana = _bind_mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == DATASOURCES.parent.parent
    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    dashboards_in_container = providers[0]["options"]["path"]
    assert grafana[dashboards_in_container] == DASHBOARD.parent
    assert "GF_SECURITY_ADMIN_PASSWORD" in services["grafana"]["environment"]

    # The coordinator's health gates the CPU workers; its image must define a HEALTHCHECK.
    assert services["worker"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert _instructions(DOCKERFILES["coordinator"]).get("HEALTHCHECK")

    # The Grafana datasource URL points at the compose Prometheus service.
    datasource = load_yaml(DATASOURCES)["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    targets = [t for job in load_yaml(PROMETHEUS_YML)["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "coordinator:9090" in targets and "coordinator" in services


# ================================================================================================
# Dockerfiles
# ================================================================================================


def _instructions(path: Path) -> dict[str, list[str]]:
    """Instruction -> list of arguments, with continuations joined and comments dropped."""
    result: dict[str, list[str]] = {}
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        result.setdefault(keyword.upper(), []).append(args.strip())
        logical = ""
    assert not logical, f"{path}: dangling line continuation"
    return result


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_dockerfile_conventions(which):
    instructions = _instructions(DOCKERFILES[which])
    assert instructions["FROM"] == ["python:3.11-slim"]
    assert any(arg.startswith("TORCH_SPEC=torch==2.13.0") for arg in instructions["ARG"])

    # Exec form, so the process is PID 1 and gets SIGTERM.
    (entrypoint,) = instructions["ENTRYPOINT"]
    assert entrypoint.startswith("["), f"ENTRYPOINT must be exec form (a JSON array), got {entrypoint!r}"
    argv = json.loads(entrypoint)
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)
    assert argv[0] == which
    for cmd in instructions.get("CMD", []):
        assert isinstance(json.loads(cmd), list)

    user = instructions["USER"][-1].split(":")[0]
    assert user not in ("root", "0", ""), "the image must run as a non-root user"

    (healthcheck,) = instructions["HEALTHCHECK"]
    probe = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    grpc_port = "50051" if which == "coordinator" else "10000"
    assert probe[:2] == ["geotrain", "health"] and probe[2].endswith(":" + grpc_port)
    exposed = " ".join(instructions["EXPOSE"]).split()
    assert grpc_port in exposed

    for copy in instructions.get("COPY", []):
        source = [a for a in copy.split() if not a.startswith("--")][0]
        assert (ROOT / source).exists(), f"COPY source {source} is missing"


def test_deploy_files_name_no_other_package_index():
    """Project policy: no hard-coded package index other than PyPI in deploy files."""
    pattern = re.compile(r"--(extra-)?index-url[ =]+['\"]?https?://", re.I)
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert not pattern.search(path.read_text(errors="replace")), path


# ================================================================================================
# systemd units
# ================================================================================================


def _unit_sections(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def _unit_value(entries, key):
    values = [v for k, v in entries if k == key]
    return values[-1] if values else None


def test_units_exist():
    assert [u.name for u in UNITS] == ["geotrain-coordinator.service", "geotrain-worker.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_settings(unit):
    service = _unit_sections(unit)["Service"]
    assert _unit_value(service, "Restart") == "on-failure"
    assert "2" in (_unit_value(service, "RestartPreventExitStatus") or "").split(), "exit 2 = bad flags: no restart"
    assert _unit_value(service, "KillSignal") == "SIGTERM"
    assert _unit_value(service, "TimeoutStopSec")
    user = _unit_value(service, "User")
    assert user and user not in ("root", "0")
    env_files = [v.lstrip("-") for k, v in service if k == "EnvironmentFile"]
    assert env_files and all(re.fullmatch(r"/etc/geotrain/[\w.-]+\.env", f) for f in env_files)
    assert _unit_value(service, "NoNewPrivileges") == "yes"
    assert _unit_value(service, "ProtectSystem") == "strict"
    if "worker" in unit.name:
        # Settings that would hide or break the GPU.
        for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "MemoryDenyWriteExecute", "PrivateUsers"):
            assert _unit_value(service, key) in (None, "no", "false"), f"{key} breaks GPU access"
        start = _unit_value(service, "ExecStart")
        assert "--coordinator" in start and "--token-file" in start


def _verifiable_copy(unit: Path, dest: Path) -> Path:
    """The unit with Exec* commands that don't exist on this machine pointed at /bin/true."""
    text = re.sub(
        r"^(Exec\w+=[-+@!:]*)(\S+)",
        lambda m: m.group(1) + (m.group(2) if os.path.exists(m.group(2)) else "/bin/true"),
        unit.read_text(),
        flags=re.M,
    )
    copy = dest / unit.name
    copy.write_text(text)
    return copy


def _systemd_analyze_usable(exe: str, tmp_path: Path) -> None:
    probe = tmp_path / "geotrain-probe.service"
    probe.write_text("[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n")
    result = subprocess.run([exe, "verify", str(probe)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or result.stderr.strip():
        missing_tool(f"systemd-analyze verify does not work in this environment: {result.stderr.strip()[:300]}")


@pytest.mark.integration
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(unit, tmp_path):
    exe = require_tool("systemd-analyze", hint="apt-get install systemd")
    _systemd_analyze_usable(exe, tmp_path)
    copy = _verifiable_copy(unit, tmp_path)
    result = subprocess.run([exe, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # verify only warns (exit 0) on bad values: any stderr output is a failure.
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.integration
def test_systemd_analyze_catches_bad_values(tmp_path):
    """Guards the check above: a bad value must show up on stderr."""
    exe = require_tool("systemd-analyze", hint="apt-get install systemd")
    _systemd_analyze_usable(exe, tmp_path)
    bad = tmp_path / "geotrain-bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nKillSignal=SIGNOPE\n")
    result = subprocess.run([exe, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "SIGNOPE" in result.stderr


# ================================================================================================
# Prometheus
# ================================================================================================


def test_prometheus_config_structure():
    config = load_yaml(PROMETHEUS_YML)
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {mn.COORDINATOR_JOB, mn.WORKER_JOB}
    coordinator_targets = [t for sc in jobs[mn.COORDINATOR_JOB]["static_configs"] for t in sc["targets"]]
    assert coordinator_targets == ["coordinator:9090"]
    # Workers are optional: discovered, never a static target that is down without the profile.
    assert "static_configs" not in jobs[mn.WORKER_JOB]
    dns = jobs[mn.WORKER_JOB]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["port"] == 9100


@pytest.mark.integration
def test_prometheus_config_passes_promtool(tmp_path):
    promtool = require_promtool()
    # Point the container paths at the repository so promtool also checks the file_sd target files.
    local = tmp_path / "prometheus.yml"
    local.write_text(PROMETHEUS_YML.read_text().replace("/etc/prometheus/", str(PROMETHEUS_YML.parent) + "/"))
    result = subprocess.run([promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert list((PROMETHEUS_YML.parent / "targets").glob("*.yml")), "ship at least the example targets file"


# ================================================================================================
# Grafana
# ================================================================================================


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _walk(node, key):
    """Every value stored under `key` anywhere in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def _queries(dashboard) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, plus templating queries."""
    queries = [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            queries.append((f"variable {variable['name']}", query))
    return queries


def test_dashboard_is_in_provisioning_form():
    dashboard = _dashboard()
    assert "id" in dashboard and dashboard["id"] is None
    assert dashboard["uid"] == "geotrain"
    assert "__inputs" not in dashboard and "${DS_" not in DASHBOARD.read_text()
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]


def test_dashboard_uses_the_provisioned_datasource_uid():
    datasources = load_yaml(DATASOURCES)["datasources"]
    (provisioned,) = [d for d in datasources if d["type"] == "prometheus"]
    assert provisioned["uid"] == "geotrain-prom"
    dashboard = _dashboard()
    refs = list(_walk(dashboard, "datasource"))
    assert refs, "no datasource references at all"
    for ref in refs:
        assert isinstance(ref, dict), f"datasource by name ({ref!r}) breaks when renamed: use {{type, uid}}"
        assert ref == {"type": "prometheus", "uid": provisioned["uid"]}
    for panel in _panels(dashboard):
        if panel.get("targets"):
            assert panel.get("datasource", {}).get("uid") == provisioned["uid"], panel["title"]
            for target in panel["targets"]:
                assert target.get("datasource", {}).get("uid") == provisioned["uid"], panel["title"]


# PromQL words that are not metric names.
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}
_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")


def metric_selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers) of each vector selector in a PromQL expression."""
    text = re.sub(r"\$\{?\w+\}?", "1m", expr)  # Grafana variables ($__rate_interval ...)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery brackets
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    selectors = []
    for match in _SELECTOR.finditer(text):
        name, matchers = match.group(1), match.group(2) or ""
        rest = text[match.end() :]
        if re.match(r"\s*(\(|by\b|without\b)", rest) or name.lower() in _PROMQL_KEYWORDS:
            continue  # function call, aggregation (`sum by (le) (...)` too), or a keyword
        selectors.append((name, matchers))
    # Selectors by __name__ only ({__name__="x"}) would escape the check: forbid them.
    assert "__name__" not in expr, expr
    return selectors


def test_metric_selector_parser():
    assert metric_selectors(
        'histogram_quantile(0.9, sum by (le) (rate(geotrain_delta_staleness_bucket{job="a"}[$__rate_interval])))'
    ) == [("geotrain_delta_staleness_bucket", '{job="a"}')]
    assert metric_selectors("sum without (worker) (x) / on(job) group_left(a) y offset 5m") == [("x", ""), ("y", "")]
    assert metric_selectors('max (a{b="c"}) > bool 0 and count (d)') == [("a", '{b="c"}'), ("d", "")]


def test_dashboard_queries_use_only_contract_metrics():
    dashboard = _dashboard()
    queried = set()
    for title, expr in _queries(dashboard):
        selectors = metric_selectors(expr)
        assert selectors, f"{title}: no metric in {expr!r}"
        for name, matchers in selectors:
            assert name in mn.ALL_SERIES, f"{title}: {name} is not in common/metric_names.py"
            # Names clash between jobs (coordinator per-worker gauges vs the worker's own metrics),
            # so every selector names its job, and the job must export that series.
            job = re.search(r'\bjob\s*=\s*"([^"]+)"', matchers)
            assert job, f"{title}: {name} without a job matcher"
            allowed = {mn.COORDINATOR_JOB: mn.COORDINATOR_SERIES, mn.WORKER_JOB: mn.WORKER_SERIES}
            assert job.group(1) in allowed, f"{title}: unknown job {job.group(1)}"
            assert name in allowed[job.group(1)], f"{title}: job {job.group(1)} does not export {name}"
            if name in {m.name for m in mn.PER_WORKER_METRICS}:
                assert job.group(1) == mn.COORDINATOR_JOB, f"{title}: per-worker panels use the coordinator's series"
            queried.add(name)
    required = {
        "geotrain_val_loss",
        "geotrain_train_loss",
        "geotrain_tokens_total",
        "geotrain_worker_tokens_per_second",
        "geotrain_workers",
        "geotrain_delta_staleness_bucket",
        "geotrain_received_bytes_total",
        "geotrain_sent_bytes_total",
        "geotrain_worker_wait_fraction",
        "geotrain_checkpoint_age_seconds",
        "geotrain_model_version",
        "geotrain_rpc_errors_total",
        "geotrain_compression_ratio",
        "geotrain_sync_allreduce_seconds_bucket",
    }
    assert required <= queried, f"panels missing for {sorted(required - queried)}"


@pytest.mark.integration
def test_dashboard_queries_parse_as_promql(tmp_path):
    promtool = require_promtool()
    rules = []
    for i, (_title, expr) in enumerate(_queries(_dashboard())):
        concrete = re.sub(r"\$\{?__(rate_)?interval\}?", "1m", expr)
        rules.append({"record": f"geotrain:dashboard_query:{i}", "expr": concrete})
    rules_file = tmp_path / "rules.json"  # JSON is YAML
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ================================================================================================
# onstart.sh
# ================================================================================================


def test_onstart_syntax():
    result = subprocess.run(["bash", "-n", str(ONSTART)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert ONSTART.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in ONSTART.read_text()
    assert os.access(ONSTART, os.X_OK), "onstart.sh should be executable"


@pytest.mark.integration
def test_onstart_shellcheck():
    shellcheck = find_shellcheck()
    if shellcheck is None:
        missing_tool("shellcheck unavailable (not on PATH, not in $GEOTRAIN_TOOLS or the cache, download failed)")
    result = subprocess.run([shellcheck, "--severity=style", str(ONSTART)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


FAKE_WORKER = textwrap.dedent(
    """\
    #!/usr/bin/env bash
    # Records its argv and token, then behaves as $FAKE_PLAN says (one exit code per run).
    n=$(( $(cat "$FAKE_DIR/runs" 2>/dev/null || echo 0) + 1 ))
    echo "$n" > "$FAKE_DIR/runs"
    printf '%s\\n' "$@" > "$FAKE_DIR/argv.$n"
    env > "$FAKE_DIR/env.$n"
    prev=""
    for a in "$@"; do
        if [[ $prev == --token-file ]]; then cat "$a" > "$FAKE_DIR/token.$n"; fi
        prev=$a
    done
    read -r -a plan <<< "$FAKE_PLAN"
    code=${plan[$((n - 1))]:-0}
    if [[ $code == wait ]]; then
        trap 'echo TERM > "$FAKE_DIR/signal"; exit 0' TERM
        touch "$FAKE_DIR/running"
        while :; do sleep 0.05; done
    fi
    exit "$code"
    """
)


@pytest.fixture
def fake_worker(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    worker = bindir / "worker"
    worker.write_text(FAKE_WORKER)
    worker.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "FAKE_DIR": str(state),
        "GEOTRAIN_VENV": str(tmp_path / "no-venv"),
        "GEOTRAIN_PIP_SPEC": "/nonexistent",  # must not be used: worker is on PATH
        "GEOTRAIN_BACKOFF_MIN": "1",
        "GEOTRAIN_BACKOFF_MAX": "1",
    }
    return env, state


def _run_onstart(env, **extra):
    return subprocess.run(
        ["bash", str(ONSTART)], env={**env, **extra}, capture_output=True, text=True, timeout=30
    )


def _argv(state: Path, run: int) -> list[str]:
    return (state / f"argv.{run}").read_text().splitlines()


def test_onstart_maps_provider_ports_and_token(fake_worker):
    env, state = fake_worker
    result = _run_onstart(
        env,
        FAKE_PLAN="0",
        GEOTRAIN_COORDINATOR="coord.example:50051",
        GEOTRAIN_TOKEN="s3cret",
        PUBLIC_IPADDR="203.0.113.9",
        VAST_TCP_PORT_10000="41234",
        VAST_CONTAINERLABEL="C.123",
        GEOTRAIN_WORKER_ARGS="--foo 1  --bar",
    )
    assert result.returncode == 0, result.stderr
    argv = _argv(state, 1)
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert pairs["--coordinator"] == "coord.example:50051"
    assert pairs["--port"] == "10000"
    assert pairs["--advertise-host"] == "203.0.113.9"
    assert pairs["--advertise-port"] == "41234"
    assert pairs["--name"] == "C.123"
    assert argv[-3:] == ["--foo", "1", "--bar"]
    assert (state / "token.1").read_text() == "s3cret"
    assert not Path(pairs["--token-file"]).exists(), "the temporary token file is removed on exit"
    assert "s3cret" not in (state / "env.1").read_text(), "the token must not reach the worker's environment"


def test_onstart_explicit_settings_win_and_runpod(fake_worker):
    env, state = fake_worker
    result = _run_onstart(
        env,
        FAKE_PLAN="0",
        GEOTRAIN_COORDINATOR="c:1",
        GEOTRAIN_PORT="12000",
        RUNPOD_PUBLIC_IP="198.51.100.4",
        RUNPOD_TCP_PORT_12000="22001",
        GEOTRAIN_ADVERTISE_PORT="23000",
    )
    assert result.returncode == 0, result.stderr
    pairs = dict(zip(_argv(state, 1)[::2], _argv(state, 1)[1::2]))
    assert pairs["--port"] == "12000"
    assert pairs["--advertise-host"] == "198.51.100.4"
    assert pairs["--advertise-port"] == "23000"
    assert "--token-file" not in pairs


def test_onstart_restarts_after_failure_then_stops_on_success(fake_worker):
    env, state = fake_worker
    result = _run_onstart(env, FAKE_PLAN="1 0", GEOTRAIN_COORDINATOR="c:1")
    assert result.returncode == 0, result.stderr
    assert (state / "runs").read_text().strip() == "2"
    assert "restarting in 1s" in result.stderr


@pytest.mark.parametrize("code", [2, 3], ids=["bad-flags", "refused"])
def test_onstart_does_not_restart_on_permanent_errors(fake_worker, code):
    env, state = fake_worker
    result = _run_onstart(env, FAKE_PLAN=f"{code} 0", GEOTRAIN_COORDINATOR="c:1")
    assert result.returncode == code
    assert (state / "runs").read_text().strip() == "1"


def test_onstart_requires_coordinator(fake_worker):
    env, state = fake_worker
    result = _run_onstart(env, FAKE_PLAN="0")
    assert result.returncode == 2 and "GEOTRAIN_COORDINATOR" in result.stderr
    assert not (state / "runs").exists()


def test_onstart_forwards_sigterm(fake_worker):
    env, state = fake_worker
    proc = subprocess.Popen(
        ["bash", str(ONSTART)],
        env={**env, "FAKE_PLAN": "wait", "GEOTRAIN_COORDINATOR": "c:1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not (state / "running").exists():
            assert time.monotonic() < deadline, "worker did not start"
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert (state / "signal").read_text().strip() == "TERM"
    assert (state / "runs").read_text().strip() == "1", "no restart after SIGTERM"


def test_promtool_helper_prefers_path_and_env(tmp_path, monkeypatch):
    """find_promtool: PATH first, then $GEOTRAIN_TOOLS, without downloading."""
    fake = tmp_path / "tools" / "prometheus" / "usr" / "bin" / "promtool"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("GEOTRAIN_TOOLS", str(tmp_path / "tools"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert find_promtool(download=False) == str(fake)
    monkeypatch.setenv("GEOTRAIN_TOOLS", str(tmp_path / "none"))
    assert find_promtool(download=False) is None
    monkeypatch.setenv("PATH", str(fake.parent))
    assert find_promtool(download=False) == shutil.which("promtool")
