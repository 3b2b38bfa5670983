"""External tools for tests (promtool, prometheus, shellcheck, systemd-analyze, check-jsonschema).

A missing tool skips the test locally but fails it in CI (``CI`` set in the environment), so a CI
machine that lacks a tool can never pass by silently skipping.

promtool and the prometheus server are taken from, in order: ``PATH``;
``$GEOTRAIN_TOOLS/prometheus/usr/bin/NAME``; the cache
``${XDG_CACHE_HOME:-~/.cache}/geotrain-tools/prometheus/usr/bin/NAME``, which is filled once from
Debian's ``prometheus`` package, which ships both (``apt-get download`` + ``dpkg -x``; no root,
nothing installed system-wide).

:class:`LiveRun` starts a real coordinator and workers as subprocesses on loopback (tiny model,
Prometheus exporters on free ports) for the observability tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

IN_CI = bool(os.environ.get("CI"))


def missing_tool(reason: str) -> None:
    """Skip the calling test, or fail it in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: missing tools fail instead of skipping)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, hint: str = "") -> str:
    """Path of executable `name` on PATH, else skip (fail in CI)."""
    path = shutil.which(name)
    if path is None:
        missing_tool(f"{name} not found on PATH" + (f"; {hint}" if hint else ""))
    return path  # type: ignore[return-value]


def venv_tool(name: str) -> str:
    """An executable installed next to the running interpreter (the venv's bin/), else PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return require_tool(name, hint="install the dev extra: pip install -e '.[dev]'")


def tools_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "geotrain-tools"


def _extract_deb(package: str, binary: str, dest: Path) -> None:
    """Download Debian's `package` .deb and unpack it into `dest` (atomically); it must hold
    usr/bin/`binary`."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not available to fetch the {package} package")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{package}-") as tmp:
        work = Path(tmp)
        attempt = subprocess.run(
            ["apt-get", "download", package], cwd=work, capture_output=True, text=True, timeout=600
        )
        if attempt.returncode != 0:
            # No package lists on this machine (fresh container, not root): keep a private set of
            # lists in the cache instead of touching /var/lib/apt.
            state, cache = work / "apt-state", work / "apt-cache"
            (state / "lists" / "partial").mkdir(parents=True)
            (cache / "archives" / "partial").mkdir(parents=True)
            opts = [
                "-o", f"Dir::State={state}",
                "-o", "Dir::State::status=/var/lib/dpkg/status",
                "-o", f"Dir::Cache={cache}",
                "-o", "Debug::NoLocking=1",
            ]
            update = subprocess.run(["apt-get", *opts, "update"], capture_output=True, text=True, timeout=600)
            attempt = subprocess.run(
                ["apt-get", *opts, "download", package], cwd=work, capture_output=True, text=True, timeout=600
            )
            if attempt.returncode != 0:
                raise RuntimeError(
                    f"apt-get download {package} failed:\n" + update.stderr[-2000:] + attempt.stderr[-2000:]
                )
        debs = sorted(work.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download produced no {package}_*.deb")
        unpacked = work / package
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(unpacked)], check=True, capture_output=True, timeout=300)
        if not (unpacked / "usr" / "bin" / binary).is_file():
            raise RuntimeError(f"the {package} package holds no usr/bin/{binary}")
        if dest.exists():  # another process won the race
            return
        os.replace(unpacked, dest)


def find_debian_binary(package: str, name: str, download: bool = True) -> str | None:
    """Path to executable `name` from Debian's `package`: PATH, then $GEOTRAIN_TOOLS/`package`,
    then the cache, fetching the package into the cache once if needed; None if it can't be had."""
    on_path = shutil.which(name)
    if on_path:
        return on_path
    candidates = []
    if os.environ.get("GEOTRAIN_TOOLS"):
        candidates.append(Path(os.environ["GEOTRAIN_TOOLS"]) / package / "usr" / "bin" / name)
    cached = tools_cache_dir() / package
    candidates.append(cached / "usr" / "bin" / name)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    if not download or cached.exists():  # an unpacked package without `name`: downloading won't help
        return None
    try:
        _extract_deb(package, name, cached)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        sys.stderr.write(f"find_debian_binary({package}, {name}): {exc}\n")
        return None
    binary = cached / "usr" / "bin" / name
    return str(binary) if binary.is_file() else None


def find_prometheus_binary(name: str, download: bool = True) -> str | None:
    """promtool or prometheus, both shipped by Debian's prometheus package."""
    return find_debian_binary("prometheus", name, download)


def find_shellcheck(download: bool = True) -> str | None:
    return find_debian_binary("shellcheck", "shellcheck", download)


def find_promtool(download: bool = True) -> str | None:
    """Path to promtool, fetching it into the cache once if needed; None if it can't be had."""
    return find_prometheus_binary("promtool", download)


def find_prometheus(download: bool = True) -> str | None:
    """Path to the Prometheus server binary, found and fetched the same way as promtool."""
    return find_prometheus_binary("prometheus", download)


def require_promtool() -> str:
    path = find_promtool()
    if path is None:
        missing_tool("promtool unavailable (not on PATH, not in $GEOTRAIN_TOOLS or the cache, download failed)")
    return path  # type: ignore[return-value]


def require_prometheus() -> str:
    path = find_prometheus()
    if path is None:
        missing_tool("prometheus unavailable (not on PATH, not in $GEOTRAIN_TOOLS or the cache, download failed)")
    return path  # type: ignore[return-value]


# --------------------------------------------------------------------------- live runs

REPO_ROOT = Path(__file__).resolve().parent.parent

# A tiny model that trains many rounds per second on one CPU core.
TINY_RUN_TOML = """\
[model]
preset = "nano"
n_layer = 1
n_embd = 32
n_head = 2
block_size = 32

[train]
batch_size = 4

[round]
steps = 5

[merge]
policy = "async"

[plan]
max_tokens = {max_tokens}
unit_tokens = 2048

[eval]
every_versions = 5
iters = 2
batch_size = 4

[workers]
heartbeat_seconds = 0.5
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for exporters that cannot bind port 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_data_dir(root: Path) -> Path:
    """A small prepared data directory (byte tokenizer) under `root`."""
    from geotrain.common.prepare import prepare

    text = root / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3000)
    prepare([text], root / "tokens", progress=False)
    return root / "tokens"


def scrape(url: str, timeout: float = 5.0) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class LiveRun:
    """A coordinator and `workers` worker processes on loopback, each with a /metrics exporter.

    Use as a context manager; `stop()` sends SIGTERM to everything (workers first) and waits.
    """

    def __init__(self, root: Path, data_dir: Path, workers: int = 1, max_tokens: int = 20_000):
        self.root = Path(root)
        self.run_dir = self.root / "run"
        self.data_dir = data_dir
        self.n_workers = workers
        self.config = self.root / "run.toml"
        self.config.write_text(TINY_RUN_TOML.format(max_tokens=max_tokens))
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.target = ""
        self.coordinator_metrics_port = free_port()
        self.worker_metrics_ports = [free_port() for _ in range(workers)]
        self.worker_names = [f"live-{i}" for i in range(workers)]

    @property
    def coordinator_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.coordinator_metrics_port}/metrics"

    def worker_metrics_url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.worker_metrics_ports[i]}/metrics"

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        log = self.root / log_name
        self.logs.append(log)
        with open(log, "w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        self.procs.append(proc)
        return proc

    def start(self) -> "LiveRun":
        import time

        port_file = self.root / "coordinator.port"
        coordinator = self._spawn(
            [
                sys.executable, "-m", "geotrain.coordinator.cli", "--config", str(self.config), "--run-dir", str(self.run_dir),
                "--data", str(self.data_dir), "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
                "--metrics-port", str(self.coordinator_metrics_port),
            ],
            "coordinator.log",
        )
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not start:\n" + self.log_tail())
            time.sleep(0.1)
        self.target = f"127.0.0.1:{int(port_file.read_text())}"
        for i, name in enumerate(self.worker_names):
            self._spawn(
                [
                    sys.executable, "-m", "geotrain.worker.cli", "--coordinator", self.target, "--port", "0", "--name", name,
                    "--device", "cpu", "--threads", "1", "--metrics-port", str(self.worker_metrics_ports[i]),
                    "--cache-dir", str(self.root / "cache"),
                ],
                f"{name}.log",
            )
        return self

    def wait_for(self, predicate, timeout: float, what: str, every: float = 0.2):
        """Call predicate() until it returns something truthy (returned); RuntimeError with the logs
        after `timeout` seconds. Exceptions from predicate() count as not yet."""
        import time

        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                result = predicate()
            except Exception as exc:  # noqa: BLE001 - not up yet, connection refused, ...
                last_error = exc
            else:
                if result:
                    return result
            if self.procs and self.procs[0].poll() is not None:
                raise RuntimeError(f"the coordinator exited ({self.procs[0].returncode}) before {what}:\n"
                                   + self.log_tail())
            time.sleep(every)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error!r}):\n"
                           + self.log_tail())

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for log in self.logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"--- {log.name}\n{text[-chars:]}")
        return "\n".join(parts)

    def stop(self, grace: float = 20.0) -> None:
        import signal as _signal

        # Workers first (they push and leave), then the coordinator (final evaluation, checkpoint).
        for group in (self.procs[1:], self.procs[:1]):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(_signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> "LiveRun":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
