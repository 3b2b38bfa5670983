"""Chaos run: a coordinator and N real worker processes, SIGKILLed and restarted at random (seeded).

    .venv/bin/python benchmarks/chaos.py [--seconds 300] [--workers 4] [--seed S]

Set-up: a tiny model (1 layer, 32 wide, block 32, byte vocab), rounds of 5 inner steps, async
merges with plain averaging, `[checkpoint] every_versions = 1`, `[workers] heartbeat_seconds = 0.5,
lease_seconds = 5`, a token budget (`--max-tokens`, default 50M) far beyond what the chaos lasts.
Every process gets one torch thread.

During `--seconds`: at exponential intervals (mean `--mean-interval`), a random victim is chosen:
the coordinator with probability `--coordinator-share`, otherwise a random worker; it gets SIGKILL
and is restarted after a random 0.5-4 s (the coordinator on the same port, from its run dir, so it
resumes from its newest checkpoint and version.mark). A worker that exits without being killed is
restarted too and counted as an unexpected exit. A poller calls the Status RPC every 0.5 s and
records (time, model_version, run_id, tokens).

Then: everything down is restarted, the run settles `--settle` seconds, the workers get SIGTERM
(final push, Leave), then the coordinator (final evaluation and checkpoint). Checks:

- version_monotonic: the polled model version never decreased (across coordinator restarts too);
- run_id_stable: one run id throughout (except a new run when the coordinator died before anything
  was merged and checkpointed: version 1 before the change);
- ledger (final checkpoint, `geotrain.common.checkpoint.load_latest_checkpoint(RUN/checkpoints)`):
  every unit has start <= committed <= end and holds no lease (holder "", lease_end 0);
  committed_total == epoch * epoch_tokens + sum(committed - start); leased_total ==
  committed_total (nothing outstanding after the clean stop); committed_total <= max_tokens;
- loss: the final validation loss (summary.json) is finite, below ln(vocab) and below the unigram
  entropy of the training data;
- clean_exits: the final SIGTERMs end every process with status 0; no unexpected exits.

Prints the figures and kill/restart counts, writes benchmarks/results/chaos.json, exits 1 if a check
fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "chaos.json"


def write_toml(path: Path, cfg: dict) -> Path:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            v = ("true" if v else "false") if isinstance(v, bool) else json.dumps(v) if isinstance(v, str) else v
            lines.append(f"{k} = {v}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def chaos_config(args) -> dict:
    return {
        "model": {"preset": "nano", "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 10},
        "train": {"batch_size": 4, "max_iters": 2000, "seed": 1337},
        "round": {"steps": 5},
        "merge": {"policy": args.policy, "semi_sync_timeout": 3.0},
        # plain averaging: with rounds this short Nesterov 0.9 overshoots (see tests/test_integration.py)
        "outer": {"kind": "average", "lr": 1.0},
        "compression": {"scheme": "sign"},
        "plan": {"unit_tokens": 2048, "max_tokens": args.max_tokens},
        "eval": {"iters": 10, "every_versions": 20, "batch_size": 8},
        "checkpoint": {"every_versions": 1, "every_seconds": 60.0, "keep": 3},
        "workers": {"heartbeat_seconds": 0.5, "lease_seconds": 5.0},
    }


def unigram_entropy(data_dir: Path, split: str = "train") -> float:
    import numpy as np

    from geotrain.common.reader import TokenData

    data = TokenData(data_dir)
    counts = np.zeros(data.vocab_size, dtype=np.int64)
    for info in data.manifest.shards:
        if info.split == split:
            counts += np.bincount(np.asarray(data.tokens(info.name), dtype=np.int64), minlength=data.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class Cluster:
    def __init__(self, work: Path, cfg_path: Path, data_dir: Path, n_workers: int):
        self.work, self.cfg_path, self.data_dir = work, cfg_path, data_dir
        self.run_dir = work / "run"
        self.port = 0
        self.coordinator: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen | None] = [None] * n_workers
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.coordinator_starts = 0
        self.worker_starts = [0] * n_workers

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        with open(self.work / log_name, "a") as out:
            out.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n")
            out.flush()
            return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)

    def start_coordinator(self, timeout: float = 120.0) -> None:
        port_file = self.work / "coordinator.port"
        port_file.unlink(missing_ok=True)
        args = [sys.executable, "-m", "geotrain.coordinator.cli", "--config", str(self.cfg_path), "--run-dir",
                str(self.run_dir), "--data", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port),
                "--port-file", str(port_file), "--metrics-port", "0"]
        self.coordinator = self._spawn(args, "coordinator.log")
        self.coordinator_starts += 1
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("coordinator did not start:\n" + self.tail("coordinator.log"))
            time.sleep(0.1)
        self.port = int(port_file.read_text())

    def start_worker(self, i: int) -> None:
        args = [sys.executable, "-m", "geotrain.worker.cli", "--coordinator", self.target, "--port", "0",
                "--name", f"chaos-{i}", "--device", "cpu", "--threads", "1", "--metrics-port", "0",
                "--cache-dir", str(self.work / "cache")]
        self.workers[i] = self._spawn(args, f"worker-{i}.log")
        self.worker_starts[i] += 1

    def tail(self, name: str, chars: int = 3000) -> str:
        p = self.work / name
        return p.read_text(errors="replace")[-chars:] if p.exists() else ""

    def kill_all(self) -> None:
        for p in [*self.workers, self.coordinator]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def poll_status(target_fn, stop: threading.Event, out: list, every: float = 0.5) -> None:
    """Status RPC every `every` s: (elapsed, version, run_id, tokens, state); errors are skipped."""
    import grpc

    from geotrain.protos import geotrain_pb2 as pb
    from geotrain.protos import geotrain_pb2_grpc as pb_grpc

    t0 = time.monotonic()
    channel, stub, current = None, None, ""
    while not stop.wait(every):
        target = target_fn()
        if target != current:
            if channel is not None:
                channel.close()
            channel = grpc.insecure_channel(target)
            stub, current = pb_grpc.CoordinatorStub(channel), target
        try:
            r = stub.Status(pb.StatusRequest(), timeout=2.0)
        except grpc.RpcError:
            continue
        out.append((round(time.monotonic() - t0, 2), int(r.model_version), r.run_id, int(r.tokens), r.state))
    if channel is not None:
        channel.close()


def check_ledger(ledger: dict, max_tokens: int) -> tuple[dict, list[str]]:
    units = ledger["units"]
    problems = []
    for u in units:
        if not u["start"] <= u["committed"] <= u["end"]:
            problems.append(f"unit {u['unit_id']}: committed {u['committed']} outside [{u['start']}, {u['end']}]")
        if u["holder"] or u["lease_end"]:
            problems.append(f"unit {u['unit_id']}: still held by {u['holder']!r} (lease_end {u['lease_end']})")
    epoch_tokens = sum(u["end"] - u["start"] for u in units)
    this_epoch = sum(u["committed"] - u["start"] for u in units)
    expected = ledger["epoch"] * epoch_tokens + this_epoch
    if ledger["committed_total"] != expected:
        problems.append(f"committed_total {ledger['committed_total']} != epoch {ledger['epoch']} x {epoch_tokens} "
                        f"+ {this_epoch} = {expected}")
    if ledger["leased_total"] != ledger["committed_total"]:
        problems.append(f"leased_total {ledger['leased_total']} != committed_total {ledger['committed_total']} "
                        "with nothing leased")
    if max_tokens and ledger["committed_total"] > max_tokens:
        problems.append(f"committed_total {ledger['committed_total']} exceeds the budget {max_tokens}")
    figures = {
        "units": len(units), "epoch": ledger["epoch"], "epoch_tokens": epoch_tokens,
        "committed_this_epoch": this_epoch, "committed_total": ledger["committed_total"],
        "leased_total": ledger["leased_total"], "units_done": sum(u["committed"] >= u["end"] for u in units),
        "units_partial": sum(u["start"] < u["committed"] < u["end"] for u in units),
    }
    return figures, problems


def run(args) -> dict:
    import torch  # noqa: F401 - checkpoint loading below

    from geotrain.common.checkpoint import load_latest_checkpoint
    from geotrain.common.corpus import resolve_data_dir
    from geotrain.common.reader import TokenData

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="geotrain-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(args.data or None)
    vocab = TokenData(data_dir, verify=False).vocab_size
    h_unigram = unigram_entropy(data_dir)
    cfg_path = write_toml(work / "run.toml", chaos_config(args))
    rng = random.Random(args.seed)
    cluster = Cluster(work, cfg_path, data_dir, args.workers)
    events: list[tuple[float, str, str]] = []
    versions: list = []
    stop_poll = threading.Event()
    kills = {"coordinator": 0, "worker": 0}
    restarts = {"coordinator": 0, "worker": 0}
    unexpected: list[str] = []
    t0 = time.monotonic()
    now = lambda: round(time.monotonic() - t0, 2)  # noqa: E731
    print(f"chaos: work dir {work}, data {data_dir} (vocab {vocab}, unigram entropy {h_unigram:.4f})", flush=True)
    try:
        cluster.start_coordinator()
        for i in range(args.workers):
            cluster.start_worker(i)
        poller = threading.Thread(target=poll_status, args=(lambda: cluster.target, stop_poll, versions), daemon=True)
        poller.start()
        chaos_end = time.monotonic() + args.seconds
        next_kill = time.monotonic() + rng.expovariate(1.0 / args.mean_interval)
        pending_restarts: list[tuple[float, str, int]] = []  # (when, kind, index)
        while time.monotonic() < chaos_end:
            time.sleep(0.1)
            t = time.monotonic()
            # unexpected exits (not ours)
            if cluster.coordinator is not None and cluster.coordinator.poll() is not None:
                code = cluster.coordinator.returncode
                unexpected.append(f"{now()}s coordinator exited {code}")
                events.append((now(), "unexpected-exit", f"coordinator {code}"))
                cluster.coordinator = None
                pending_restarts.append((t + 1.0, "coordinator", 0))
            for i, p in enumerate(cluster.workers):
                if p is not None and p.poll() is not None:
                    unexpected.append(f"{now()}s worker {i} exited {p.returncode}")
                    events.append((now(), "unexpected-exit", f"worker-{i} {p.returncode}"))
                    cluster.workers[i] = None
                    pending_restarts.append((t + 1.0, "worker", i))
            # restarts due
            for item in [r for r in pending_restarts if r[0] <= t]:
                pending_restarts.remove(item)
                _, kind, i = item
                if kind == "coordinator":
                    cluster.start_coordinator()
                else:
                    cluster.start_worker(i)
                restarts[kind] += 1
                events.append((now(), "restart", kind if kind == "coordinator" else f"worker-{i}"))
            # kills due
            if t >= next_kill:
                next_kill = t + rng.expovariate(1.0 / args.mean_interval)
                if rng.random() < args.coordinator_share:
                    victim, kind, i = cluster.coordinator, "coordinator", 0
                else:
                    i = rng.randrange(args.workers)
                    victim, kind = cluster.workers[i], "worker"
                if victim is None or victim.poll() is not None:
                    continue  # already down
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                kills[kind] += 1
                if kind == "coordinator":
                    cluster.coordinator = None
                else:
                    cluster.workers[i] = None
                events.append((now(), "kill", kind if kind == "coordinator" else f"worker-{i}"))
                pending_restarts.append((t + rng.uniform(0.5, 4.0), kind, i))
        # chaos over: bring everything back and let it settle
        print(f"chaos over at {now()}s: kills {kills}, restarts {restarts}; settling {args.settle}s", flush=True)
        if cluster.coordinator is None:
            cluster.start_coordinator()
            restarts["coordinator"] += 1
            events.append((now(), "restart", "coordinator"))
        for i, p in enumerate(cluster.workers):
            if p is None:
                cluster.start_worker(i)
                restarts["worker"] += 1
                events.append((now(), "restart", f"worker-{i}"))
        time.sleep(args.settle)
        for i, p in enumerate(cluster.workers):
            if p is not None and p.poll() is not None:
                unexpected.append(f"{now()}s worker {i} exited {p.returncode} while settling")
        # clean stop: workers first (final push, Leave), then the coordinator
        for p in cluster.workers:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        worker_exits = []
        for p in cluster.workers:
            try:
                worker_exits.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.kill()
                worker_exits.append("hung (killed)")
        time.sleep(1.0)  # a last Status sample
        stop_poll.set()
        poller.join(timeout=5)
        cluster.coordinator.send_signal(signal.SIGTERM)
        try:
            coordinator_exit = cluster.coordinator.wait(timeout=120)
        except subprocess.TimeoutExpired:
            cluster.coordinator.kill()
            coordinator_exit = "hung (killed)"
    finally:
        stop_poll.set()
        cluster.kill_all()
    total_seconds = now()

    loaded = load_latest_checkpoint(cluster.run_dir / "checkpoints")
    if loaded is None:
        raise RuntimeError("no checkpoint was written")
    _, state, ckpt_path = loaded
    ledger_figures, ledger_problems = check_ledger(state["ledger"], args.max_tokens)
    summary_path = cluster.run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    val_loss = float(summary.get("val_loss", state.get("val_loss", float("nan"))))

    backwards = [(a, b) for a, b in zip(versions, versions[1:]) if b[1] < a[1]]
    run_ids = sorted({v[2] for v in versions})
    restart_versions = []  # (time, version before the coordinator went down, first version after)
    kill_times = [e[0] for e in events if e[2] == "coordinator" and e[1] == "kill"]
    for kt in kill_times:
        before = [v for v in versions if v[0] <= kt]
        after = [v for v in versions if v[0] > kt]
        if before and after:
            restart_versions.append((kt, before[-1][1], after[0][1]))
    ln_vocab = math.log(vocab)
    checks = {
        "version_monotonic": not backwards and len(versions) > 0,
        # a coordinator killed before its first checkpoint starts a new run (new id, version 1):
        # accepted only while nothing had been merged (version 1); any other change fails
        "run_id_stable": all(b[2] == a[2] or a[1] <= 1 for a, b in zip(versions, versions[1:])),
        "ledger_consistent": not ledger_problems,
        "val_loss_finite": math.isfinite(val_loss),
        "val_loss_below_ln_vocab": math.isfinite(val_loss) and val_loss < ln_vocab,
        "val_loss_below_unigram_entropy": math.isfinite(val_loss) and val_loss < h_unigram,
        "clean_exits": coordinator_exit == 0 and all(c == 0 for c in worker_exits),
        "no_unexpected_exits": not unexpected,
    }
    report = {
        "seconds": args.seconds, "workers": args.workers, "seed": args.seed, "policy": args.policy,
        "mean_interval": args.mean_interval, "coordinator_share": args.coordinator_share,
        "total_seconds": total_seconds,
        "kills": kills, "restarts": restarts, "unexpected_exits": unexpected,
        "version_samples": len(versions),
        "version_first": versions[0][1] if versions else None,
        "version_last": versions[-1][1] if versions else None,
        "checkpoint_version": state["version"], "checkpoint": ckpt_path.name,
        "versions_backwards": backwards[:20],
        "coordinator_restart_versions": restart_versions,
        "run_ids": run_ids,
        "ledger": ledger_figures, "ledger_problems": ledger_problems[:20],
        "val_loss": val_loss, "ln_vocab": ln_vocab, "unigram_entropy": h_unigram,
        "tokens_merged": summary.get("tokens"),
        "coordinator_exit": coordinator_exit, "worker_exits": worker_exits,
        "events": events,
        "work_dir": str(work), "data_dir": str(data_dir),
        "checks": checks, "ok": all(checks.values()),
        "host": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
    }
    return report


def print_table(r: dict) -> None:
    rows = [
        ("seconds of chaos / total", f'{r["seconds"]} / {r["total_seconds"]}'),
        ("workers, policy, seed", f'{r["workers"]}, {r["policy"]}, {r["seed"]}'),
        ("kills coordinator / workers", f'{r["kills"]["coordinator"]} / {r["kills"]["worker"]}'),
        ("restarts coordinator / workers", f'{r["restarts"]["coordinator"]} / {r["restarts"]["worker"]}'),
        ("unexpected exits", len(r["unexpected_exits"])),
        ("version first -> last (samples)", f'{r["version_first"]} -> {r["version_last"]} ({r["version_samples"]})'),
        ("version went backwards", len(r["versions_backwards"])),
        ("coordinator restarts: version before -> after",
         ", ".join(f"{b}->{a}" for _, b, a in r["coordinator_restart_versions"]) or "-"),
        ("final checkpoint", f'{r["checkpoint"]} (version {r["checkpoint_version"]})'),
        ("ledger epoch / units done / partial", f'{r["ledger"]["epoch"]} / {r["ledger"]["units_done"]} / '
                                                f'{r["ledger"]["units_partial"]} of {r["ledger"]["units"]}'),
        ("ledger committed_total / leased_total", f'{r["ledger"]["committed_total"]} / {r["ledger"]["leased_total"]}'),
        ("val loss / unigram H / ln V", f'{r["val_loss"]:.4f} / {r["unigram_entropy"]:.4f} / {r["ln_vocab"]:.4f}'),
        ("exits coordinator / workers", f'{r["coordinator_exit"]} / {r["worker_exits"]}'),
    ]
    for name, ok in r["checks"].items():
        rows.append((f"check {name}", "PASS" if ok else "FAIL"))
    width = max(len(k) for k, _ in rows)
    print("-" * (width + 40))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 40), flush=True)
    for p in r["ledger_problems"]:
        print(f"  ledger: {p}")
    for u in r["unexpected_exits"]:
        print(f"  unexpected: {u}")
    for a, b in r["versions_backwards"]:
        print(f"  version backwards: {a} -> {b}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--policy", choices=["async", "semi-sync"], default="async")
    ap.add_argument("--mean-interval", type=float, default=8.0, help="mean seconds between kills")
    ap.add_argument("--coordinator-share", type=float, default=0.3, help="probability a kill hits the coordinator")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds of calm before the clean stop")
    ap.add_argument("--max-tokens", type=int, default=50_000_000)
    ap.add_argument("--data", default=None, help="prepared data dir (default: the embedded corpus)")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS), help="results JSON; '' = none")
    args = ap.parse_args(argv)
    report = run(args)
    print_table(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        report["command"] = " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
        out.write_text(json.dumps(report, indent=2) + "\n")
    if not report["ok"]:
        print("FAILED: " + ", ".join(k for k, v in report["checks"].items() if not v), flush=True)
        return 1
    print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
