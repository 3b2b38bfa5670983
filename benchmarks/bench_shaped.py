"""One worker behind a shaped link: how much of its time does it wait on the network?

The coordinator runs in network namespace gt-sc (10.78.0.1), the worker in gt-sw (10.78.0.2); one
veth pair joins them and `tc qdisc ... root tbf rate RATE` shapes BOTH ends, so the worker's uplink
and downlink are RATE each. The worker starts with an empty shard cache, so its data also comes
over the link. Every run is the nano recipe for --steps inner steps (batch 12 x 64) on the
embedded corpus; the same run on loopback is the reference.

Reported per run: the worker's wait_fraction (seconds its training loop waited on the network /
its wall seconds, as in summary.json), how long the whole shard took to download (in the
background: the first lease's sequences come first and training starts on them), model bytes
both ways, and run seconds.

Needs root and `ip netns` (the namespaces are removed at the end):
  .venv/bin/python benchmarks/bench_shaped.py --rate 20mbit --steps 600 --compression none,sign
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NS_COORD, NS_WORKER = "gt-sc", "gt-sw"
IP_COORD, IP_WORKER = "10.78.0.1", "10.78.0.2"
BATCH, BLOCK = 12, 64


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True)


def netns_up(rate: str) -> None:
    netns_down()
    sh(f"ip netns add {NS_COORD} && ip netns add {NS_WORKER}")
    sh(f"ip link add gts-c netns {NS_COORD} type veth peer name gts-w netns {NS_WORKER}")
    for ns, dev, ip in ((NS_COORD, "gts-c", IP_COORD), (NS_WORKER, "gts-w", IP_WORKER)):
        sh(f"ip -n {ns} addr add {ip}/24 dev {dev} && ip -n {ns} link set {dev} up && ip -n {ns} link set lo up")
        if rate:
            sh(f"ip netns exec {ns} tc qdisc add dev {dev} root tbf rate {rate} burst 64kb latency 100ms")


def netns_down() -> None:
    for ns in (NS_COORD, NS_WORKER):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in(ns: str | None, cmd: list[str]) -> list[str]:
    return (["ip", "netns", "exec", ns] if ns else []) + cmd


def run_one(rate: str, scheme: str, steps: int, round_steps: int, runs: Path, threads: int) -> dict:
    name = f"shaped_{rate or 'loopback'}_{scheme}_h{round_steps}_s{steps}"
    run_dir = runs / name
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    (run_dir / "logs").mkdir(parents=True)
    shaped = bool(rate)
    if shaped:
        netns_up(rate)
    host_c = IP_COORD if shaped else "127.0.0.1"
    budget = steps * BATCH * BLOCK
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    py = sys.executable
    coord_cmd = [
        py, "-m", "geotrain.coordinator.cli", "--host", host_c, "--port", "0", "--metrics-port", "0",
        "--run-dir", str(run_dir), "--model", "nano", "--max-tokens", str(budget), "--max-iters", str(steps),
        "--batch-size", str(BATCH), "--round-steps", str(round_steps), "--compression", scheme,
        "--port-file", str(run_dir / "coordinator.port"),
    ]
    worker_cmd = [
        py, "-m", "geotrain.worker.cli", "--port", "0", "--name", "shaped", "--threads", str(threads),
        "--metrics-port", "0", "--cache-dir", str(run_dir / "cache"), "--device", "cpu",
    ]
    procs = []
    t0 = time.monotonic()
    try:
        with open(run_dir / "logs" / "coordinator.log", "w") as out:
            procs.append(subprocess.Popen(_in(NS_COORD if shaped else None, coord_cmd), stdout=out,
                                          stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        port_file = run_dir / "coordinator.port"
        while not port_file.exists() or not port_file.read_text().strip():
            if procs[0].poll() is not None:
                raise RuntimeError(f"coordinator exited; see {run_dir}/logs/coordinator.log")
            time.sleep(0.2)
        target = f"{host_c}:{port_file.read_text().strip()}"
        extra = ["--advertise-host", IP_WORKER] if shaped else []
        with open(run_dir / "logs" / "worker.log", "w") as out:
            procs.append(subprocess.Popen(_in(NS_WORKER if shaped else None, worker_cmd + ["--coordinator", target] + extra),
                                          stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        summary_path = run_dir / "summary.json"
        while not summary_path.exists():
            for p in procs:
                if p.poll() not in (None, 0):
                    raise RuntimeError(f"a process exited with {p.returncode}; see {run_dir}/logs")
            if time.monotonic() - t0 > 3600:
                raise RuntimeError("no summary after an hour")
            time.sleep(1.0)
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if shaped:
            netns_down()
    summary = json.loads((run_dir / "summary.json").read_text())
    wlog = (run_dir / "logs" / "worker.log").read_text()
    m = re.search(r"downloaded (\d+) bytes in ([\d.]+)s", wlog)
    return {
        "name": name, "rate": rate or "loopback", "compression": scheme, "round_steps": round_steps,
        "steps": steps, "wait_fraction": summary["wait_fraction"], "val_loss": summary["val_loss"],
        "model_bytes_per_worker": summary["sent_bytes"] + summary["received_bytes"],
        "data_bytes": summary.get("data_bytes", 0),
        "first_shard_seconds": float(m.group(2)) if m else None,
        "model_version": summary["model_version"], "seconds": time.monotonic() - t0,
    }


def table(rows: list[dict]) -> str:
    out = ["| link | scheme | H | steps | wait % | shard download s | model MB (both ways) | data MB | val | s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = f"{r['first_shard_seconds']:.1f}" if r["first_shard_seconds"] is not None else "-"
        out.append(f"| {r['rate']} | {r['compression']} | {r['round_steps']} | {r['steps']} | "
                   f"{100 * r['wait_fraction']:.2f} | {first} | {r['model_bytes_per_worker'] / 1e6:.1f} | "
                   f"{r['data_bytes'] / 1e6:.1f} | {r['val_loss']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="20mbit", help="tc tbf rate of the worker's link ('' = loopback only)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--round-steps", type=int, default=50)
    p.add_argument("--compression", default="none,sign")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-loopback", action="store_true", help="skip the loopback reference runs")
    p.add_argument("--runs-dir", default="runs/shaped")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "shaped.json"))
    args = p.parse_args()
    if args.rate and os.geteuid() != 0:
        raise SystemExit("a shaped link needs root (ip netns, tc); use --rate '' for loopback only")
    rows = []
    rates = ([] if args.no_loopback else [""]) + ([args.rate] if args.rate else [])
    for scheme in args.compression.split(","):
        for rate in rates:
            row = run_one(rate, scheme, args.steps, args.round_steps, ROOT / args.runs_dir, args.threads)
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
