"""How the coordinator holds a large model: memory and responsiveness under merges, checkpoints and
full-model downloads.

A real coordinator (CoordinatorServer in this process, gRPC on a free loopback port, the server's
own tick thread) and N simulated workers in a second process (gRPC clients: join, heartbeat every
HEARTBEAT_SECONDS, lease, push real-size 1-bit "sign" deltas, fetch the merged updates). Phases:

  merge       ROUNDS semi-sync rounds: every worker pushes, the coordinator merges N deltas
  checkpoint  the coordinator writes a checkpoint (weights, outer momentum, ledger)
  serve       one worker downloads the full model (weights + outer momentum, streamed)

Heartbeat latency is measured by the workers during each phase; RSS is sampled every 20 ms and
the peak is the kernel's high-water mark (VmHWM) of this process, which holds the coordinator
alone (the workers live in their own process). Prints a table and writes JSON (--json):
peak_rss_bytes, steady_rss_bytes, params, merge_seconds, serve_seconds, checkpoint_seconds,
heartbeat_p50_seconds / heartbeat_p99_seconds (over all phases) and per phase.

    python benchmarks/coordinator_scale.py --model gpt2 --workers 8 --json benchmarks/results/coordinator_scale_gpt2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HEARTBEAT_SECONDS = 0.1  # each simulated worker's heartbeat interval
RPC_DEADLINE = 600.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def proc_status(field: str, pid: str = "self") -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- simulated workers


def sign_blob(spec: dict[str, list[int]], seed: int, chunk: int = 256) -> bytes:
    """A valid "sign" delta blob of the model's shapes (random signs, scale 1e-3), built a tensor
    at a time without materializing the fp32 delta (common/compression.py blob layout)."""
    import struct

    import numpy as np
    import zstandard

    from geotrain.common.compression import _HEADER, MAGIC, SCHEMES, VERSION, get_codec

    codec = get_codec("sign", chunk)
    rng = np.random.default_rng(seed)
    header = [_HEADER.pack(MAGIC, VERSION, SCHEMES.index("sign"), 0, chunk, len(spec))]
    sizes = {}
    for name, shape in spec.items():
        raw = name.encode()
        sizes[name] = codec._payload_size(tuple(shape))
        header.append(struct.pack("<H", len(raw)) + raw + struct.pack("<B", len(shape)))
        header.append(struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<Q", sizes[name]))
    cobj = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compressobj(
        size=sum(sizes.values()))
    frame = []
    for name, shape in spec.items():
        n = int(np.prod(shape)) if shape else 1
        if n == 0:
            continue
        groups = -(-n // (shape[1] if len(shape) == 2 else chunk))
        bits = np.frombuffer(rng.bytes((n + 7) // 8), dtype=np.uint8).copy()
        if n % 8:
            bits[-1] &= np.uint8((0xFF << (8 - n % 8)) & 0xFF)
        frame.append(cobj.compress(np.full(groups, 1e-3, dtype=np.float32).tobytes() + bits.tobytes()))
    frame.append(cobj.flush())
    return b"".join(header + frame)


def simulate(target: str, workers: int, rounds: int, spec_path: str) -> None:
    """The worker process: reads commands (MERGE, SERVE, STOP) on stdin, answers on stdout."""
    import grpc

    from geotrain.common import __version__
    from geotrain.protos import geotrain_pb2 as pb
    from geotrain.protos import geotrain_pb2_grpc as pb_grpc
    from geotrain.protos.rpc import CHUNK_BYTES, PROTOCOL_VERSION, channel_options, iter_chunks, sha256_hex

    spec = json.loads(Path(spec_path).read_text())
    pool = [sign_blob(spec, seed) for seed in range(2)]
    pool = [(b, sha256_hex(b)) for b in pool]
    stop = threading.Event()
    samples: list[tuple[float, float]] = []  # (wall time sent, seconds)
    lock = threading.Lock()

    class Sim:
        def __init__(self, i: int):
            self.channel = grpc.insecure_channel(target, channel_options() + [("grpc.use_local_subchannel_pool", 1)])
            self.stub = pb_grpc.CoordinatorStub(self.channel)
            r = self.stub.Join(pb.JoinRequest(name=f"sim-{i}", device="sim", protocol_version=PROTOCOL_VERSION,
                                              software_version=__version__), timeout=RPC_DEADLINE)
            self.id, self.session, self.version, self.i = r.worker_id, r.session_id, r.model_version, i
            lease = self.stub.LeaseWork(pb.LeaseRequest(worker_id=self.id, session_id=self.session), timeout=RPC_DEADLINE)
            self.range = lease.range

        def heartbeats(self):
            while not stop.wait(HEARTBEAT_SECONDS):
                t0, w0 = time.perf_counter(), time.time()
                try:
                    self.stub.Heartbeat(pb.HeartbeatRequest(worker_id=self.id, session_id=self.session,
                                                            stats=pb.WorkerStats(loss=3.0)), timeout=60)
                except grpc.RpcError as exc:
                    print(f"heartbeat error {exc.code()}", file=sys.stderr)
                    continue
                with lock:
                    samples.append((w0, time.perf_counter() - t0))

        def round(self, k: int):
            blob, digest = pool[self.i % len(pool)]
            start = self.range.start + 64 * k
            push_id = f"{self.id}-{k}"
            header = pb.DeltaHeader(worker_id=self.id, session_id=self.session, push_id=push_id,
                                    base_version=self.version, tokens=64, steps=1, mean_loss=3.0,
                                    ranges=[pb.TokenRange(unit_id=self.range.unit_id, start=start, end=start + 64,
                                                          epoch=self.range.epoch)],
                                    total_bytes=len(blob), sha256=digest)
            parts = [pb.DeltaPart(header=header)] + [pb.DeltaPart(chunk=c) for c in iter_chunks(blob, CHUNK_BYTES)]
            reply = self.stub.PushDelta(iter(parts), timeout=RPC_DEADLINE)
            assert reply.result == pb.PushReply.ACCEPTED, reply
            while True:  # the merged update (relayed deltas), as a worker fetches it
                stream = self.stub.GetModel(pb.ModelRequest(worker_id=self.id, session_id=self.session,
                                                            have_version=self.version, wait_seconds=30,
                                                            held_push_ids=[push_id]), timeout=RPC_DEADLINE)
                h = next(stream).header
                for _ in stream:
                    pass
                if h.kind != pb.ModelHeader.UNCHANGED:
                    self.version = h.version
                    return

        def full(self) -> float:
            t0 = time.perf_counter()
            stream = self.stub.GetModel(pb.ModelRequest(worker_id=self.id, session_id=self.session, force_full=True),
                                        timeout=RPC_DEADLINE)
            got = 0
            header = next(stream).header
            for part in stream:
                got += len(part.chunk)
            assert header.kind == pb.ModelHeader.FULL and got == header.total_bytes, (header.kind, got)
            return time.perf_counter() - t0

    sims = [Sim(i) for i in range(workers)]
    threads = [threading.Thread(target=s.heartbeats, daemon=True) for s in sims]
    for t in threads:
        t.start()
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "MERGE":
            for k in range(rounds):
                ts = [threading.Thread(target=s.round, args=(k,)) for s in sims]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
            print("MERGED", flush=True)
        elif cmd == "SERVE":
            print(f"SERVED {sims[0].full():.3f}", flush=True)
        elif cmd == "STOP":
            stop.set()
            for t in threads:
                t.join(5)
            with lock:
                print("SAMPLES " + json.dumps(samples), flush=True)
            os._exit(0)


# --------------------------------------------------------------------------- the coordinator


def run(args) -> dict:
    import torch

    torch.set_num_threads(max(1, args.threads))
    from geotrain.common.config import RunConfig
    from geotrain.common.prepare import prepare
    from geotrain.common.reader import TokenData
    from geotrain.coordinator.memory import count_params
    from geotrain.coordinator.server import CoordinatorServer

    work = Path(tempfile.mkdtemp(prefix="coord-scale-"))
    text = work / "corpus.txt"
    text.write_text("the coordinator holds the global model and merges the deltas. " * 20000)
    vocab = None if args.model == "nano" else 50257  # GPT-2's vocabulary: real-size embeddings
    prepare([text], work / "data", vocab_size=vocab, progress=False)
    data = TokenData(work / "data")

    run = RunConfig()
    run.model.preset = args.model
    run.compression.scheme = "sign"
    run.compression.downlink = "relay"
    run.merge.policy = "semi-sync"
    run.merge.semi_sync_timeout = 3600.0
    run.eval.every_versions = 0
    run.checkpoint.every_versions = 10**9
    run.checkpoint.every_seconds = 1e9
    run.plan.unit_tokens = 4096
    run.workers.lease_seconds = 3600.0
    run.workers.max_workers = max(256, args.workers)
    params = count_params(run.model.build(vocab_size=data.vocab_size))

    rss_series: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample():
        while not sampling.wait(0.02):
            rss_series.append((time.time(), proc_status("VmRSS")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    srv = CoordinatorServer(run, data, work / "run", host="127.0.0.1", port=0, metrics_port=0)
    port = srv.start()
    stop_server = threading.Event()
    ticker = threading.Thread(target=srv.run_until, args=(stop_server,), daemon=True)
    ticker.start()
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps({n: list(s) for n, s in srv.state.spec.items()}))
    rss_after_start = proc_status("VmRSS")

    sim = subprocess.Popen(
        [sys.executable, __file__, "--simulate", f"127.0.0.1:{port}", "--workers", str(args.workers),
         "--rounds", str(args.rounds), "--spec", str(spec_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    def expect(prefix: str) -> str:
        line = sim.stdout.readline()
        if not line.startswith(prefix):
            raise RuntimeError(f"simulated workers said {line!r}, expected {prefix}")
        return line[len(prefix):].strip()

    def send(cmd: str) -> None:
        sim.stdin.write(cmd + "\n")
        sim.stdin.flush()

    phases: dict[str, tuple[float, float]] = {}
    try:
        expect("READY")
        time.sleep(1.0)
        t0 = time.time()
        phases["idle"] = (t0 - 1.0, t0)
        send("MERGE")
        expect("MERGED")
        phases["merge"] = (t0, time.time())
        t0 = time.time()
        srv.state.checkpoint()
        phases["checkpoint"] = (t0, time.time())
        checkpoint_seconds = phases["checkpoint"][1] - t0
        t0 = time.time()
        send("SERVE")
        serve_seconds = float(expect("SERVED"))
        phases["serve"] = (t0, time.time())
        send("STOP")
        samples = json.loads(expect("SAMPLES"))
    finally:
        sim.kill()
        sampling.set()
    steady = proc_status("VmRSS")
    peak = proc_status("VmHWM")
    stop_server.set()
    ticker.join(10)
    srv.server.stop(0)

    reg = srv.metrics.registry
    merges = reg.get_sample_value("geotrain_merge_seconds_count") or 0
    merge_seconds = (reg.get_sample_value("geotrain_merge_seconds_sum") or 0.0) / max(1, merges)
    latencies = [s for _, s in samples]
    out = {
        "model": args.model,
        "params": params,
        "workers": args.workers,
        "rounds": args.rounds,
        "versions": srv.state.version,
        "fp32_model_bytes": 4 * params,
        "peak_rss_bytes": peak,
        "peak_rss_model_copies": peak / (4 * params),
        "steady_rss_bytes": steady,
        "rss_after_start_bytes": rss_after_start,
        "rss_max_sampled_bytes": max((r for _, r in rss_series), default=0),
        "merge_seconds": merge_seconds,
        "merges": int(merges),
        "checkpoint_seconds": checkpoint_seconds,
        "serve_seconds": serve_seconds,
        "heartbeats": len(latencies),
        "heartbeat_p50_seconds": percentile(latencies, 0.5),
        "heartbeat_p99_seconds": percentile(latencies, 0.99),
        "heartbeat_max_seconds": max(latencies, default=float("nan")),
        "phases": {},
        "torch_threads": torch.get_num_threads(),
    }
    for name, (a, b) in phases.items():
        lat = [s for w, s in samples if a <= w <= b]
        rss = [r for w, r in rss_series if a <= w <= b]
        out["phases"][name] = {
            "seconds": b - a, "heartbeats": len(lat),
            "heartbeat_p50_seconds": percentile(lat, 0.5), "heartbeat_p99_seconds": percentile(lat, 0.99),
            "rss_max_bytes": max(rss, default=0),
        }
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return out


def print_table(r: dict) -> None:
    gb = 2**30
    print(f"\ncoordinator_scale: {r['model']} ({r['params'] / 1e6:.0f}M params, fp32 {r['fp32_model_bytes'] / gb:.2f} GiB), "
          f"{r['workers']} workers, {r['merges']} merges")
    print(f"peak RSS {r['peak_rss_bytes'] / gb:.2f} GiB = {r['peak_rss_model_copies']:.2f} x fp32 model; "
          f"steady {r['steady_rss_bytes'] / gb:.2f} GiB; heartbeat p50 {r['heartbeat_p50_seconds'] * 1e3:.1f} ms, "
          f"p99 {r['heartbeat_p99_seconds'] * 1e3:.1f} ms")
    print(f"{'phase':<12}{'seconds':>10}{'work s':>10}{'heartbeats':>12}{'hb p50 ms':>12}{'hb p99 ms':>12}{'RSS max GiB':>13}")
    work = {"merge": r["merge_seconds"], "checkpoint": r["checkpoint_seconds"], "serve": r["serve_seconds"]}
    for name, p in r["phases"].items():
        w = work.get(name)
        print(f"{name:<12}{p['seconds']:>10.2f}{(f'{w:.2f}' if w is not None else '-'):>10}{p['heartbeats']:>12}"
              f"{p['heartbeat_p50_seconds'] * 1e3:>12.1f}{p['heartbeat_p99_seconds'] * 1e3:>12.1f}"
              f"{p['rss_max_bytes'] / gb:>13.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2", help="model preset (nano, gpt2, gpt2-medium, gpt2-large, gpt2-xl)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="semi-sync merge rounds")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the coordinator")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--simulate", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.workers < 1 or args.rounds < 1:
        ap.error("--workers and --rounds must be >= 1")
    if args.simulate:
        simulate(args.simulate, args.workers, args.rounds, args.spec)
        return 0
    result = run(args)
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
