"""Load test: one real coordinator subprocess and many lightweight simulated workers over real gRPC.

    .venv/bin/python benchmarks/load.py [--workers 64] [--seconds 180] [--processes 4]
                                        [--policy async|semi-sync] [--round-seconds 2.0]

The coordinator runs a small model (2 layers, 64 wide, block 32, byte vocab) with checkpoints on.
The simulated workers are threads spread over `--processes` spawned processes (spawn, never fork
after gRPC), each worker with its own channel (local subchannel pool: one TCP connection each) and
raw stubs, so every non-OK status is seen and counted (geotrain.worker.client would retry some silently).
Each worker does what worker/runner.py does on the wire, without training:

    Join; GetModel(0) (full); LeaseWork; then every round (round-seconds x U(0.5, 1.5)):
      PushDelta(a random sign-compressed delta from encode_tensors, the next `--push-tokens`
                tokens of its lease as the trained range, base = the last version it saw)
      ACCEPTED -> long-poll GetModel(have_version, wait 20 s) until an update names its push
                  (that time is the client-side "push -> visible" merge latency)
      STALE    -> GetModel(have_version, wait 0) to rebase (STALE is normal, counted apart)
    and a heartbeat thread per worker every heartbeat_seconds (like the real worker).

Deltas: each process encodes a pool of 8 random deltas once (encoding 100k+ params per push would
measure the client, not the coordinator); every push has a fresh push id.

Measured: non-OK RPCs by method and code (must be zero), STALE pushes, coordinator VmRSS every 5 s
(start, max, end, least-squares slope over the second half in MB/min with its standard error:
fails when it is above --max-rss-slope and more than 2 standard errors above 0; judged from 60 s), client latency p50/p99 of PushDelta / push->visible / Heartbeat / GetModel, the
coordinator's geotrain_merge_seconds histogram (p50/p99 interpolated from buckets) and pushes/s.
Results merge into benchmarks/results/load.json under the policy name. Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "load.json"

from geotrain.common.config import LONG_POLL_SECONDS  # a simulated worker long-polls like a real one
RPC_DEADLINE = 30.0


# --------------------------------------------------------------------------- helpers


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def slope_per_minute(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of (seconds, value) in value per minute, and its standard error
    (nan with too few points)."""
    n = len(points)
    if n < 3:
        return float("nan"), float("nan")
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    if den == 0:
        return float("nan"), float("nan")
    b = sum((t - mx) * (v - my) for t, v in points) / den
    resid = sum((v - my - b * (t - mx)) ** 2 for t, v in points)
    se = math.sqrt(resid / (n - 2) / den)
    return 60.0 * b, 60.0 * se


def vm_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def histogram_quantiles(text: str, name: str, qs=(0.5, 0.99)) -> dict:
    """Quantiles of a Prometheus histogram from its cumulative buckets (linear within a bucket,
    as histogram_quantile does)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: list[tuple[float, float]] = []
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{name}_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name == f"{name}_sum":
                total = s.value
            elif s.name == f"{name}_count":
                count = s.value
    buckets.sort()
    out = {"count": int(count), "mean": total / count if count else float("nan")}
    for q in qs:
        if not count:
            out[f"p{int(q * 100)}"] = float("nan")
            continue
        rank = q * count
        prev_le, prev_c = 0.0, 0.0
        value = float("nan")
        for le, c in buckets:
            if c >= rank:
                if math.isinf(le):
                    value = prev_le  # above the largest finite bucket
                else:
                    value = prev_le + (le - prev_le) * ((rank - prev_c) / max(1e-12, c - prev_c))
                break
            prev_le, prev_c = le, c
        out[f"p{int(q * 100)}"] = value
    return out


def counter_samples(text: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))] = s.value
    return out


def write_toml(path: Path, cfg: dict) -> Path:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, str):
                v = json.dumps(v)
            lines.append(f"{k} = {v}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def start_coordinator(cfg_path: Path, run_dir: Path, work: Path, metrics_port: int, data: str | None,
                      log_name: str = "coordinator.log") -> tuple[subprocess.Popen, str]:
    port_file = work / "coordinator.port"
    port_file.unlink(missing_ok=True)
    args = [sys.executable, "-m", "geotrain.coordinator.cli", "--config", str(cfg_path), "--run-dir", str(run_dir),
            "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file), "--metrics-port", str(metrics_port)]
    if data:
        args += ["--data", data]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(work / log_name, "a") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the coordinator did not start:\n" + (work / log_name).read_text()[-3000:])
        time.sleep(0.1)
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- simulated worker


class Stats:
    """Per-process counters and latency samples (seconds), shared by its worker threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.errors: Counter = Counter()  # "Method:CODE"
        self.results: Counter = Counter()  # accepted, stale, full/updates/unchanged replies, rejoins
        self.lat: dict[str, list[float]] = {"push": [], "visible": [], "heartbeat": [], "get_model": [], "lease": []}
        self.first_error: dict[str, str] = {}

    def error(self, method: str, exc) -> None:
        key = f"{method}:{exc.code().name}"
        with self.lock:
            self.errors[key] += 1
            self.first_error.setdefault(key, (exc.details() or "")[:300])

    def add(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.lat[kind].append(seconds)

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.results[key] += n


class SimWorker:
    def __init__(self, index: int, target: str, deltas: list[tuple[bytes, str]], stats: Stats,
                 stop: threading.Event, push_tokens: int, round_seconds: float, seed: int):
        import grpc

        from geotrain.protos.rpc import channel_options
        from geotrain.protos import geotrain_pb2 as pb
        from geotrain.protos import geotrain_pb2_grpc as pb_grpc

        self.grpc, self.pb = grpc, pb
        self.name = f"sim-{index:03d}"
        self.channel = grpc.insecure_channel(target, channel_options() + [("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.deltas, self.stats, self.stop = deltas, stats, stop
        self.push_tokens, self.round_seconds = push_tokens, round_seconds
        self.rng = random.Random(seed)
        self.worker_id = self.session_id = ""
        self.heartbeat_seconds = 2.0
        self.version = 0
        self.range = None  # (unit_id, cursor, end, epoch)
        self.session_lock = threading.Lock()
        self.hb_stop = threading.Event()  # ends this worker's heartbeat thread before Leave

    # ----- calls (each counts its own failure)

    def call(self, method: str, fn):
        try:
            return fn()
        except self.grpc.RpcError as exc:
            self.stats.error(method, exc)
            code = exc.code()
            if code == self.grpc.StatusCode.NOT_FOUND and not self.stop.is_set():
                self.call("Join", self.join)
            elif code in (self.grpc.StatusCode.UNAVAILABLE, self.grpc.StatusCode.DEADLINE_EXCEEDED,
                          self.grpc.StatusCode.RESOURCE_EXHAUSTED):
                self.stop.wait(self.rng.uniform(0.2, 1.0))
            return None

    def join(self) -> None:
        from geotrain.protos.rpc import PROTOCOL_VERSION

        pb = self.pb
        with self.session_lock:
            req = pb.JoinRequest(name=self.name, device="sim", memory_bytes=0, protocol_version=PROTOCOL_VERSION,
                                 software_version="", previous_worker_id=self.worker_id)
            from geotrain.common import __version__
            req.software_version = __version__
            reply = self.stub.Join(req, timeout=RPC_DEADLINE)
            self.worker_id, self.session_id = reply.worker_id, reply.session_id
            self.heartbeat_seconds = reply.heartbeat_seconds or 2.0
            self.range = None
            self.version = 0  # resync
            self.stats.count("joins")

    def get_model(self, wait: float, pending_push: str | None = None) -> bool:
        """GetModel from self.version; True when the reply names `pending_push` as merged."""
        from geotrain.protos.rpc import collect_blob

        pb = self.pb

        def fn():
            t0 = time.perf_counter()
            req = pb.ModelRequest(worker_id=self.worker_id, session_id=self.session_id,
                                  have_version=self.version, wait_seconds=wait)
            stream = self.stub.GetModel(req, timeout=RPC_DEADLINE + wait)
            first = next(stream)
            h = first.header
            if h.kind == pb.ModelHeader.UNCHANGED:
                for _ in stream:
                    pass
                blob = b""
            else:
                blob = collect_blob((p.chunk for p in stream), h.total_bytes, h.sha256, 1 << 30)
            if wait == 0:  # plain fetches; long polls are measured as push -> visible
                self.stats.add("get_model", time.perf_counter() - t0)
            return h, blob

        got = self.call("GetModel", fn)
        if got is None:
            return False
        h, _ = got
        kind = pb.ModelHeader.Kind.Name(h.kind).lower()
        self.stats.count(f"model_{kind}")
        if h.kind == pb.ModelHeader.UNCHANGED:
            return False
        self.version = h.version
        if pending_push is None:
            return False
        if h.kind == pb.ModelHeader.FULL:
            return pending_push in h.merged_push_ids
        return any(pending_push in u.merged_push_ids for u in h.updates)

    def lease(self) -> None:
        pb = self.pb

        def fn():
            t0 = time.perf_counter()
            r = self.stub.LeaseWork(pb.LeaseRequest(worker_id=self.worker_id, session_id=self.session_id),
                                    timeout=RPC_DEADLINE)
            self.stats.add("lease", time.perf_counter() - t0)
            return r

        reply = self.call("LeaseWork", fn)
        if reply is not None and reply.HasField("range"):
            r = reply.range
            self.range = (r.unit_id, r.start, r.end, r.epoch)

    def push(self) -> tuple[str, str | None]:
        """One PushDelta; returns (result, push_id) with result accepted|stale|error."""
        from geotrain.protos.rpc import CHUNK_BYTES, iter_chunks

        pb = self.pb
        unit, cursor, end, epoch = self.range
        stop_at = min(end, cursor + self.push_tokens)
        blob, digest = self.deltas[self.rng.randrange(len(self.deltas))]
        push_id = uuid.uuid4().hex
        header = pb.DeltaHeader(
            worker_id=self.worker_id, session_id=self.session_id, push_id=push_id, base_version=self.version,
            tokens=stop_at - cursor, steps=1, mean_loss=3.0,
            ranges=[pb.TokenRange(unit_id=unit, start=cursor, end=stop_at, epoch=epoch)],
            total_bytes=len(blob), sha256=digest,
        )

        def parts():
            yield pb.DeltaPart(header=header)
            for chunk in iter_chunks(blob, CHUNK_BYTES):
                yield pb.DeltaPart(chunk=chunk)

        def fn():
            t0 = time.perf_counter()
            r = self.stub.PushDelta(parts(), timeout=RPC_DEADLINE)
            self.stats.add("push", time.perf_counter() - t0)
            return r

        reply = self.call("PushDelta", fn)
        if reply is None:
            self.range = None  # lease again (an INVALID_ARGUMENT would repeat otherwise)
            return "error", None
        if reply.result == pb.PushReply.STALE:
            self.stats.count("stale")
            return "stale", None
        self.stats.count("accepted")
        return "accepted", push_id

    def advance(self) -> None:
        unit, cursor, end, epoch = self.range
        cursor = min(end, cursor + self.push_tokens)
        self.range = None if cursor >= end else (unit, cursor, end, epoch)

    # ----- threads

    def heartbeat_loop(self) -> None:
        pb = self.pb
        started = time.monotonic()
        while not self.hb_stop.wait(self.heartbeat_seconds * self.rng.uniform(0.9, 1.0)):
            stats = pb.WorkerStats(tokens_per_second=100.0, step_seconds=0.01, loss=3.0,
                                   wall_seconds=time.monotonic() - started)

            def fn():
                t0 = time.perf_counter()
                r = self.stub.Heartbeat(pb.HeartbeatRequest(worker_id=self.worker_id, session_id=self.session_id,
                                                            stats=stats), timeout=10.0)
                self.stats.add("heartbeat", time.perf_counter() - t0)
                return r

            self.call("Heartbeat", fn)

    def run(self, deadline: float) -> None:
        hb = None
        try:
            self.call("Join", self.join)
            while not self.worker_id and not self.stop.is_set():
                self.call("Join", self.join)
            hb = threading.Thread(target=self.heartbeat_loop, daemon=True)
            hb.start()
            self.get_model(0.0)
            while time.monotonic() < deadline and not self.stop.is_set():
                if self.version == 0:
                    self.get_model(0.0)
                    continue
                if self.range is None:
                    self.lease()
                    if self.range is None:
                        self.stop.wait(0.5)
                        continue
                # "train" one round
                self.stop.wait(self.round_seconds * self.rng.uniform(0.5, 1.5))
                if self.stop.is_set() or time.monotonic() >= deadline:
                    break
                t_push = time.perf_counter()
                result, push_id = self.push()
                if result == "accepted":
                    give_up = time.monotonic() + 120
                    while not self.stop.is_set() and time.monotonic() < give_up:
                        if self.get_model(LONG_POLL_SECONDS, push_id):
                            self.stats.add("visible", time.perf_counter() - t_push)
                            self.advance()
                            break
                        if self.version == 0:  # rejoined: the push is lost with the session
                            break
                    else:
                        if not self.stop.is_set():  # gave up after 120 s (not: stopped meanwhile)
                            self.stats.count("never_visible")
                        self.range = None
                elif result == "stale":
                    self.get_model(0.0)
        finally:
            self.hb_stop.set()
            if hb is not None:
                hb.join(timeout=15)
            try:
                if self.worker_id:
                    self.stub.Leave(self.pb.LeaveRequest(worker_id=self.worker_id, session_id=self.session_id,
                                                         reason="load test done"), timeout=10)
            except self.grpc.RpcError as exc:
                self.stats.error("Leave", exc)
            self.channel.close()


def make_delta_pool(spec: dict, n: int, seed: int) -> list[tuple[bytes, str]]:
    import torch

    from geotrain.common.compression import encode_tensors
    from geotrain.protos.rpc import sha256_hex

    g = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(n):
        tensors = {name: torch.randn(shape, generator=g) * 1e-3 for name, shape in spec.items()}
        blob, _ = encode_tensors(tensors, "sign")
        pool.append((blob, sha256_hex(blob)))
    return pool


def sim_process(proc_index: int, indices: list[int], target: str, spec: dict, ready, go, deadline_wall,
                push_tokens: int, round_seconds: float, out_path: str) -> None:
    """One spawned process: len(indices) simulated workers as threads; writes its stats as JSON.
    Imports and the delta pool first, then `ready`; the workers start on `go` (deadline_wall set)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    deltas = make_delta_pool(spec, 8, 1000 + proc_index)
    import grpc  # noqa: F401 - loaded before the clock starts

    stats = Stats()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    ready.release()
    go.wait()
    deadline = time.monotonic() + (deadline_wall.value - time.time())
    workers = [SimWorker(i, target, deltas, stats, stop, push_tokens, round_seconds, seed=i) for i in indices]
    threads = [threading.Thread(target=w.run, args=(deadline,), name=w.name) for w in workers]
    for t in threads:
        t.start()
        time.sleep(0.02)  # stagger joins a little
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.5)
    stop.set()  # wakes long polls' owners after their current call; heartbeats end
    for t in threads:
        t.join(timeout=LONG_POLL_SECONDS + RPC_DEADLINE + 10)
    Path(out_path).write_text(json.dumps({
        "errors": dict(stats.errors), "results": dict(stats.results), "lat": stats.lat,
        "first_error": stats.first_error, "stuck_threads": sum(t.is_alive() for t in threads),
    }))
    os._exit(0)  # do not wait on lingering gRPC threads


# --------------------------------------------------------------------------- main


def model_spec(cfg: dict, data_dir: str | None) -> dict:
    import torch

    from geotrain.common.config import run_config_from_dict
    from geotrain.common.corpus import resolve_data_dir
    from geotrain.common.reader import TokenData
    from geotrain.common.model import GPT
    from geotrain.common.tensors import model_tensors, tensor_spec

    run = run_config_from_dict(cfg)
    data = TokenData(resolve_data_dir(data_dir or None), verify=False)
    torch.manual_seed(0)
    return {k: list(v) for k, v in tensor_spec(model_tensors(GPT(run.model.build(data.vocab_size)))).items()}


def load_config(args) -> dict:
    return {
        "model": {"preset": "nano", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
        "train": {"batch_size": 4, "seed": 1337},
        "round": {"steps": 5},
        "merge": {"policy": args.policy, "max_staleness": args.max_staleness,
                  **({"semi_sync_timeout": args.semi_sync_timeout} if args.semi_sync_timeout else {})},
        "compression": {"scheme": "sign"},
        "plan": {"unit_tokens": 4096, "max_tokens": 0},
        "eval": {"every_versions": 200, "iters": 2, "batch_size": 4},
        "checkpoint": {"every_versions": 100, "every_seconds": 15.0, "keep": 2},
        "workers": {"heartbeat_seconds": 2.0, "lease_seconds": 20.0, "max_workers": max(256, args.workers)},
    }


def run(args) -> dict:
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="geotrain-load-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args)
    cfg_path = write_toml(work / "run.toml", cfg)
    spec = model_spec(cfg, args.data)
    metrics_port = free_port()
    coord, target = start_coordinator(cfg_path, work / "run", work, metrics_port, args.data)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    print(f"coordinator pid {coord.pid} at {target}; work dir {work}", flush=True)
    ctx = mp.get_context("spawn")
    groups = [g for g in (list(range(args.workers))[i:: args.processes] for i in range(args.processes)) if g]
    ready, go, deadline_value = ctx.Semaphore(0), ctx.Event(), ctx.Value("d", 0.0)
    procs = []
    for i, group in enumerate(groups):
        out = work / f"sim-{i}.json"
        out.unlink(missing_ok=True)
        p = ctx.Process(target=sim_process, args=(i, group, target, spec, ready, go, deadline_value,
                                                  args.push_tokens, args.round_seconds, str(out)))
        p.start()
        procs.append((p, out))
    for _ in procs:
        if not ready.acquire(timeout=300):
            raise RuntimeError("simulated worker processes did not get ready")
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()
    rss.append((0.0, vm_rss_mb(coord.pid) or float("nan")))
    deadline_wall = time.time() + args.seconds
    deadline_value.value = deadline_wall
    go.set()

    next_sample = t0 + args.rss_every
    coordinator_died = False
    while time.time() < deadline_wall:
        time.sleep(min(1.0, max(0.05, next_sample - time.monotonic())))
        if coord.poll() is not None:
            coordinator_died = True
            break
        if time.monotonic() >= next_sample:
            value = vm_rss_mb(coord.pid)
            if value is not None:
                rss.append((time.monotonic() - t0, value))
            next_sample += args.rss_every
    measured_seconds = time.monotonic() - t0
    value = vm_rss_mb(coord.pid)
    if value is not None:
        rss.append((time.monotonic() - t0, value))
    for p, _ in procs:
        p.join(timeout=LONG_POLL_SECONDS + RPC_DEADLINE + 30)
        if p.is_alive():
            p.kill()
            p.join()
    try:  # after the workers' last pushes
        metrics_text = scrape(metrics_url)
    except OSError as exc:
        metrics_text = ""
        print(f"metrics scrape failed: {exc}", flush=True)
    # coordinator: clean stop
    exit_code = coord.poll()
    if exit_code is None:
        coord.send_signal(signal.SIGTERM)
        try:
            exit_code = coord.wait(timeout=90)
        except subprocess.TimeoutExpired:
            coord.kill()
            exit_code = "hung (killed)"

    errors: Counter = Counter()
    results: Counter = Counter()
    lat: dict[str, list[float]] = {}
    first_error: dict[str, str] = {}
    stuck = 0
    missing = []
    for p, out in procs:
        if not out.exists():
            missing.append(out.name)
            continue
        d = json.loads(out.read_text())
        errors.update(d["errors"])
        results.update(d["results"])
        for k, v in d["lat"].items():
            lat.setdefault(k, []).extend(v)
        for k, v in d["first_error"].items():
            first_error.setdefault(k, v)
        stuck += d["stuck_threads"]

    half = measured_seconds / 2
    second_half = [(t, v) for t, v in rss if t >= half]
    rss_values = [v for _, v in rss if not math.isnan(v)]
    pushes = results["accepted"] + results["stale"]
    slope, slope_se = slope_per_minute(second_half)
    merge_hist = histogram_quantiles(metrics_text, "geotrain_merge_seconds") if metrics_text else {}
    ms = lambda xs, q: round(1000 * percentile(xs, q), 2)  # noqa: E731
    report = {
        "policy": args.policy,
        "workers": args.workers,
        "processes": args.processes,
        "seconds": round(measured_seconds, 1),
        "round_seconds": args.round_seconds,
        "push_tokens": args.push_tokens,
        "model": cfg["model"],
        "errors": dict(errors),
        "errors_total": sum(errors.values()),
        "first_error": first_error,
        "pushes": pushes,
        "accepted": results["accepted"],
        "stale": results["stale"],
        "never_visible": results["never_visible"],
        "joins": results["joins"],
        "model_replies": {k[6:]: v for k, v in results.items() if k.startswith("model_")},
        "pushes_per_second": round(pushes / measured_seconds, 2),
        "accepted_per_second": round(results["accepted"] / measured_seconds, 2),
        "latency_ms": {
            kind: {"n": len(v), "p50": ms(v, 0.5), "p99": ms(v, 0.99), "max": ms(v, 1.0)}
            for kind, v in sorted(lat.items())
        },
        "merge_seconds_histogram": {k: (round(v * 1000, 3) if k != "count" else v) for k, v in merge_hist.items()},
        "server_rpc_errors": counter_samples(metrics_text, "geotrain_rpc_errors_total") if metrics_text else {},
        "server_deltas": counter_samples(metrics_text, "geotrain_deltas_total") if metrics_text else {},
        "rss_mb": {
            "start": round(rss_values[0], 1) if rss_values else None,
            "max": round(max(rss_values), 1) if rss_values else None,
            "end": round(rss_values[-1], 1) if rss_values else None,
            "slope_second_half_mb_per_min": round(slope, 3),
            "slope_stderr_mb_per_min": round(slope_se, 3),
            "samples": [(round(t, 1), round(v, 1)) for t, v in rss],
        },
        "coordinator_exit": exit_code,
        "coordinator_died_during_run": coordinator_died,
        "stuck_threads": stuck,
        "missing_process_results": missing,
        "work_dir": str(work),
        "host": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
    }
    checks = {
        "no_rpc_errors": report["errors_total"] == 0,
        # a slope over less than a minute of samples says nothing: only judged from 60 s up
        # fails when the slope is both above the limit and significantly positive (> 2 std errors)
        "rss_flat": measured_seconds < 60 or not (slope > args.max_rss_slope and slope > 2 * slope_se),
        "pushes_happened": report["accepted"] > 0,
        "all_pushes_visible": report["never_visible"] == 0,
        "coordinator_clean_exit": exit_code == 0 and not coordinator_died,
        "no_stuck_threads": stuck == 0 and not missing,
    }
    report["checks"] = checks
    report["ok"] = all(checks.values())
    return report


def print_table(r: dict) -> None:
    rows = [
        ("policy", r["policy"]),
        ("workers / processes", f'{r["workers"]} / {r["processes"]}'),
        ("seconds", r["seconds"]),
        ("pushes (accepted / stale)", f'{r["pushes"]} ({r["accepted"]} / {r["stale"]})'),
        ("pushes/s (accepted/s)", f'{r["pushes_per_second"]} ({r["accepted_per_second"]})'),
        ("RPC errors", f'{r["errors_total"]} {r["errors"] or ""}'),
        ("model replies", r["model_replies"]),
        ("coordinator RSS MB start/max/end", f'{r["rss_mb"]["start"]} / {r["rss_mb"]["max"]} / {r["rss_mb"]["end"]}'),
        ("RSS slope 2nd half MB/min (+- std err)",
         f'{r["rss_mb"]["slope_second_half_mb_per_min"]} +- {r["rss_mb"]["slope_stderr_mb_per_min"]}'),
    ]
    for kind, v in r["latency_ms"].items():
        rows.append((f"{kind} latency ms p50/p99/max (n)", f'{v["p50"]} / {v["p99"]} / {v["max"]} ({v["n"]})'))
    mh = r["merge_seconds_histogram"]
    if mh:
        rows.append(("merge (server histogram) ms p50/p99/mean",
                     f'{mh.get("p50")} / {mh.get("p99")} / {mh.get("mean")} (n={mh.get("count")})'))
    rows.append(("coordinator exit", r["coordinator_exit"]))
    for name, ok in r["checks"].items():
        rows.append((f"check {name}", "PASS" if ok else "FAIL"))
    width = max(len(k) for k, _ in rows)
    print("-" * (width + 40))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 40), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--policy", choices=["async", "semi-sync"], default="async")
    ap.add_argument("--round-seconds", type=float, default=2.0, help="mean simulated training time per round")
    ap.add_argument("--push-tokens", type=int, default=128, help="tokens each push reports as trained")
    ap.add_argument("--max-staleness", type=int, default=256,
                    help="merge.max_staleness (with many async workers the default 8 makes nearly every push STALE)")
    ap.add_argument("--semi-sync-timeout", type=float, default=0.0)
    ap.add_argument("--data", default=None, help="prepared data dir (default: the embedded corpus)")
    ap.add_argument("--rss-every", type=float, default=5.0)
    ap.add_argument("--max-rss-slope", type=float, default=2.0, help="MB/min allowed over the second half")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS), help="results JSON (merged by policy); '' = none")
    args = ap.parse_args(argv)
    report = run(args)
    print_table(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            existing = json.loads(out.read_text()) if out.exists() else {}
        except ValueError:
            existing = {}
        existing[args.policy] = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                                 **report}
        out.write_text(json.dumps(existing, indent=2) + "\n")
    if not report["ok"]:
        print("FAILED: " + ", ".join(k for k, v in report["checks"].items() if not v), flush=True)
        for k, v in report["first_error"].items():
            print(f"  {k}: {v}")
        return 1
    print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
