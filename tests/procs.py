"""Real-process test helpers: a coordinator and workers as subprocesses on loopback.

`Cluster` owns every process it starts. Use it as a context manager: on the way out it SIGKILLs
whatever is still running (SIGCONT first for stopped ones) and, when the block raised, prints the
tail of every process log so a failing test shows what the processes said.

    with Cluster(tmp_path, data_dir, config=tiny_config(max_tokens=...)) as c:
        coord = c.start_coordinator()
        c.start_worker("w0")
        c.wait_for(lambda: c.status()["tokens"] > 0, 60, "first merge")

Every process runs with ``--threads 1`` and OMP_NUM_THREADS=1 (the test machine has 2 cores), the
coordinator with ``--port 0 --port-file`` (or a fixed port when restarted), metrics off.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

from geotrain.protos import geotrain_pb2 as pb
from geotrain.protos import geotrain_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
LOG_TAIL_LINES = 60

# --------------------------------------------------------------------------- data and config

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their can has more when will would been if no other so what time "
    "who into them some these its only new than then two may first any like our over such very after most "
    "river house garden little people water morning light old great long small king queen city night child "
    "walked found looked said came took made gave went saw knew thought told asked turned stood heard"
).split()


def english_like_text(n_bytes: int, seed: int = 0) -> str:
    """Sentences of common English words, Zipf-ish word frequencies, capitalised and punctuated."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(_WORDS))]
    out: list[str] = []
    size = 0
    while size < n_bytes:
        words = rng.choices(_WORDS, weights, k=rng.randint(5, 14))
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", ".", "!", "?"]) + " "
        if rng.random() < 0.1:
            sentence += "\n"
        out.append(sentence)
        size += len(sentence)
    return "".join(out)


def prepare_corpus(root: Path, n_bytes: int = 200_000, seed: int = 0) -> Path:
    """A byte-tokenized prepared data directory under root/tokens."""
    from geotrain.common.prepare import prepare

    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text(english_like_text(n_bytes, seed))
    prepare([root / "corpus.txt"], root / "tokens", progress=False, workers=1)
    return root / "tokens"


def unigram_entropy(data_dir: Path, split: str = "train") -> float:
    """Entropy (nats) of the token distribution of a split: the loss of the best context-free model."""
    from geotrain.common.reader import TokenData

    data = TokenData(data_dir)
    counts = np.zeros(data.vocab_size, dtype=np.int64)
    for info in data.manifest.shards:
        if info.split == split:
            counts += np.bincount(np.asarray(data.tokens(info.name), dtype=np.int64), minlength=data.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def train_tokens(data_dir: Path) -> int:
    from geotrain.common.reader import TokenData

    return sum(s.tokens for s in TokenData(data_dir).manifest.shards if s.split == "train")


TINY_CONFIG: dict[str, dict[str, Any]] = {
    "model": {"preset": "nano", "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 10},
    "train": {"batch_size": 4, "max_iters": 400, "seed": 1337},
    "round": {"steps": 5},
    # what these tests were written for: uncompressed relayed deltas, 8-bit last deltas (the run
    # defaults are 1-bit with count merges and int4 last deltas; tests name those when they test them)
    "compression": {"scheme": "none", "last_scheme": "int8"},
    "merge": {"policy": "semi-sync", "semi_sync_timeout": 3.0},
    "outer": {"kind": "average", "lr": 1.0},
    "plan": {"unit_tokens": 2048, "max_tokens": 40_960},
    "eval": {"iters": 5, "every_versions": 2, "batch_size": 8},
    "checkpoint": {"every_versions": 1, "every_seconds": 60.0, "keep": 3},
    "workers": {"heartbeat_seconds": 0.5, "lease_seconds": 4.0},
}


def tiny_config(**changes: Any) -> dict[str, dict[str, Any]]:
    """TINY_CONFIG with `section__key=value` changes."""
    cfg = {k: dict(v) for k, v in TINY_CONFIG.items()}
    for key, value in changes.items():
        section, field = key.split("__")
        cfg.setdefault(section, {})[field] = value
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_toml(path: Path, cfg: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------- processes


class Proc:
    """One subprocess with its log file."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.pid = self.popen.pid
        self.stopped = False  # SIGSTOPped

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)
            if sig == signal.SIGSTOP:
                self.stopped = True
            elif sig == signal.SIGCONT:
                self.stopped = False

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        self._log.close()

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-n:])


class Cluster:
    def __init__(self, tmp_path: Path, data_dir: Path, config: dict | None = None, run_dir: Path | None = None):
        self.tmp = Path(tmp_path)
        self.data_dir = Path(data_dir)
        self.run_dir = Path(run_dir) if run_dir else self.tmp / "run"
        self.logs = self.tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.config_path = write_toml(self.tmp / "run.toml", config or tiny_config())
        self.procs: list[Proc] = []
        self.coordinator: Proc | None = None
        self.port = 0
        self.target = ""
        self._channel: grpc.Channel | None = None
        self._stub = None
        self._count: dict[str, int] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("GEOTRAIN_")}  # no stray options
        self.env = dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))

    # ------------------------------------------------------------------ context

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.dump_logs(f"test failed ({exc_type.__name__}): process logs")
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        for p in self.procs:
            if p.stopped and p.alive():
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - best effort; keep killing the others
                pass

    def dump_logs(self, title: str = "process logs") -> None:
        print(f"\n===== {title} =====")
        for p in self.procs:
            state = "running" if p.alive() else f"exit {p.returncode}"
            print(f"----- {p.name} (pid {p.pid}, {state}) {p.log_path} -----")
            print(p.tail())
        print("=====")

    def _log_path(self, name: str) -> Path:
        n = self._count.get(name, 0)
        self._count[name] = n + 1
        return self.logs / (f"{name}.log" if n == 0 else f"{name}.{n}.log")

    # ------------------------------------------------------------------ processes

    def start_coordinator(self, port: int = 0, extra: list[str] | None = None, wait: bool = True,
                          run_dir: Path | None = None) -> Proc:
        port_file = self.tmp / "coordinator.port"
        port_file.unlink(missing_ok=True)
        args = [
            sys.executable, "-m", "geotrain.coordinator.cli", "--config", str(self.config_path),
            "--data", str(self.data_dir), "--run-dir", str(run_dir or self.run_dir),
            "--host", "127.0.0.1", "--port", str(port), "--port-file", str(port_file),
            "--metrics-port", "0", *(extra or []),
        ]
        proc = Proc("coordinator", args, self._log_path("coordinator"), self.env)
        self.procs.append(proc)
        self.coordinator = proc
        if wait:
            self.port = wait_for_port_file(port_file, proc)
            self.target = f"127.0.0.1:{self.port}"
            if self._channel is not None:
                self._channel.close()
            self._channel = grpc.insecure_channel(self.target)
            self._stub = pb_grpc.CoordinatorStub(self._channel)
        return proc

    def restart_coordinator(self, extra: list[str] | None = None) -> Proc:
        """Start a new coordinator on the same port and run dir (the old one must be dead)."""
        assert self.coordinator is not None and not self.coordinator.alive()
        return self.start_coordinator(port=self.port, extra=extra)

    def start_worker(self, name: str, target: str | None = None, extra: list[str] | None = None) -> Proc:
        args = [
            sys.executable, "-m", "geotrain.worker.cli", "--coordinator", target or self.target, "--name", name,
            "--port", "0", "--metrics-port", "0", "--threads", "1", "--device", "cpu",
            "--cache-dir", str(self.tmp / "cache"), *(extra or []),
        ]
        proc = Proc(name, args, self._log_path(name), self.env)
        self.procs.append(proc)
        return proc

    def workers(self) -> list[Proc]:
        return [p for p in self.procs if p.name != "coordinator"]

    # ------------------------------------------------------------------ observing

    def status(self, timeout: float = 3.0) -> dict | None:
        """The coordinator's Status snapshot (status_json), None when it does not answer."""
        if self._stub is None:
            return None
        try:
            reply = self._stub.Status(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError:
            return None
        return json.loads(reply.status_json)

    def wait_for(self, cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.25,
                 fail_if_dead: list[Proc] | None = None) -> Any:
        """Poll cond() until truthy (returns its value); AssertionError naming `what` otherwise.
        Exceptions in cond count as not yet. `fail_if_dead`: processes whose exit fails at once,
        unless cond() already holds (a process may finish right after doing what was awaited:
        polled after its exit, its log still shows it)."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            dead = [p for p in fail_if_dead or [] if not p.alive()]
            try:
                value = cond()
                if value:
                    return value
            except Exception as exc:  # noqa: BLE001
                last_exc = exc
            if dead:
                raise AssertionError(f"waiting for {what}: {dead[0].name} exited with {dead[0].returncode}")
            time.sleep(interval)
        raise AssertionError(
            f"timed out after {timeout:.0f}s waiting for {what}"
            + (f" (last error: {last_exc!r})" if last_exc else "")
            + f"; status: {self.status()}"
        )

    def wait_status(self, pred: Callable[[dict], bool], timeout: float, what: str, **kw) -> dict:
        return self.wait_for(lambda: (s := self.status()) is not None and pred(s) and s, timeout, what, **kw)

    def wait_exit(self, proc: Proc, timeout: float) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{proc.name} did not exit within {timeout:.0f}s") from None

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def history(self) -> list[dict]:
        path = self.run_dir / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def coordinator_log(self) -> str:
        """Every coordinator log (all restarts), in order."""
        return "\n".join(p.log() for p in self.procs if p.name == "coordinator")


def wait_for_port_file(path: Path, proc: Proc, timeout: float = 90.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited with {proc.returncode} before listening:\n{proc.tail()}")
        if path.exists():
            text = path.read_text().strip()
            if text:
                return int(text)
        time.sleep(0.1)
    raise AssertionError(f"{proc.name}: no port file after {timeout:.0f}s:\n{proc.tail()}")


# --------------------------------------------------------------------------- log parsing

MERGE_RE = re.compile(r"version (\d+): merged (\d+) delta\(s\), (\d+) tokens")
JOIN_RE = re.compile(r"worker (\S+) \((\w+), [^)]*\) joined at version (\d+)")
VAL_RE = re.compile(r"version (\d+): validation loss ([0-9.naninf]+)")


def merges(log: str) -> list[tuple[int, int, int]]:
    """(version, deltas, tokens) of every merge line."""
    return [(int(a), int(b), int(c)) for a, b, c in MERGE_RE.findall(log)]


def joins(log: str) -> list[tuple[str, str, int]]:
    """(name, worker_id, version) of every join line."""
    return [(n, w, int(v)) for n, w, v in JOIN_RE.findall(log)]


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def checkpoint_state(run_dir: Path) -> tuple[dict, Path]:
    """The verified newest checkpoint's state dict and path (AssertionError when none)."""
    from geotrain.common.checkpoint import load_latest_checkpoint

    loaded = load_latest_checkpoint(Path(run_dir) / "checkpoints")
    assert loaded is not None, f"no checkpoint under {run_dir}"
    _, state, path = loaded
    return state, path


# --------------------------------------------------------------------------- memory


def proc_memory(pid: int) -> dict[str, int] | None:
    """{"VmHWM": bytes, "VmRSS": bytes} of a live process from /proc/PID/status (Linux); None once
    it has exited or where /proc has no such fields. VmHWM is the peak resident set so far."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024  # reported in kB
    return out if len(out) == 2 else None


class MemoryWatch:
    """Samples VmHWM of every process of a Cluster every `interval` seconds on a background thread,
    keeping each process's last reading (its peak resident set up to that moment). A process's
    final peak is missed only for what it allocates in its last `interval` before it exits; call
    `sample()` right before killing one to read it at the end.

        with Cluster(...) as c, MemoryWatch(c) as mem:
            ...
        mem.peaks()  # {"coordinator": bytes, "coordinator.1": bytes, "w0": bytes, ...}
    """

    def __init__(self, cluster: Cluster, interval: float = 0.2):
        import threading

        self.cluster = cluster
        self.interval = interval
        self._peak: dict[Proc, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def __enter__(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for p in list(self.cluster.procs):
            if p.stopped or not p.alive():
                continue
            mem = proc_memory(p.pid)
            if mem is not None:
                with self._lock:
                    self._peak[p] = max(self._peak.get(p, 0), mem["VmHWM"])

    def peaks(self) -> dict[str, int]:
        """Peak resident bytes per process, named by its log file (coordinator, coordinator.1, w0...)."""
        with self._lock:
            return {p.log_path.stem: v for p, v in self._peak.items()}
