"""Bytes and seconds per all-reduce of a GPT-2-small gradient: geotrain 1-bit vs gloo fp32.

    python benchmarks/bench_allreduce.py --members 2 4 --iters 3 --json out.json
    python benchmarks/bench_allreduce.py --params 10000000 --members 2      # quick
    python benchmarks/bench_allreduce.py --shaped 1gbit                      # + tc tbf netns (root)

Every member is a separate process (one torch thread each) on the same tensors: GPT-2 small shapes
(124M parameters) or, with --params, rows of 768 values adding up to that many. geotrain runs
`CompressedAllReduce` (sign, auto schedule) between gRPC servers; gloo runs
`torch.distributed.all_reduce` on one flat fp32 buffer (TCP store on the first member's address).

Bytes per member: geotrain counts the payload + headers it sent; gloo's is its ring algorithm's
2 (N-1)/N x 4 bytes x params. On the shaped link both are also measured on the wire: tx_bytes of the
member's own veth (its namespace holds nothing else), which includes TCP/IP/HTTP2 overhead.

Shaped link (--shaped RATE): a bridge in namespace gt-br and one namespace per member, joined by a
veth pair; `tc qdisc ... root tbf rate RATE` on both ends of every veth, so each member's uplink and
downlink are RATE. Needs root and `ip netns`; the namespaces are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GLOO_PORT_OFFSET = 1000  # gloo's store port = member port + this


def gpt2_shapes(params: int | None) -> list[tuple[int, ...]]:
    """GPT-2 small's trainable shapes (tied embedding once), or ~params values in rows of 768."""
    if params:
        rows = max(1, params // 768)
        return [(min(rows - i, 4096), 768) for i in range(0, rows, 4096)]
    c, v, t = 768, 50257, 1024
    shapes: list[tuple[int, ...]] = [(v, c), (t, c)]
    for _ in range(12):
        shapes += [(c,), (c,), (3 * c, c), (3 * c,), (c, c), (c,), (c,), (c,), (4 * c, c), (4 * c,), (c, 4 * c), (c,)]
    return shapes + [(c,), (c,)]


def tensors_for(shapes, rank: int):
    import torch

    g = torch.Generator().manual_seed(rank)
    return {f"t{i:03d}": torch.randn(s, generator=g) * 1e-3 for i, s in enumerate(shapes)}


def tx_bytes(ifname: str | None) -> int:
    if not ifname:
        return 0
    return int(Path(f"/sys/class/net/{ifname}/statistics/tx_bytes").read_text())


# --------------------------------------------------------------------------- one member process


def member(args) -> None:
    import torch

    torch.set_num_threads(1)
    shapes = gpt2_shapes(args.params)
    tensors = tensors_for(shapes, args.rank)
    addrs = args.addrs.split(",")
    n = len(addrs)
    numel = sum(t.numel() for t in tensors.values())
    if args.impl == "gloo":
        result = _member_gloo(args, tensors, addrs, numel)
    else:
        result = _member_geotrain(args, tensors, addrs)
    result.update(rank=args.rank, members=n, params=numel, impl=args.impl)
    print("RESULT " + json.dumps(result), flush=True)


def _timed(fn, iters: int, ifname: str | None, barrier) -> tuple[list[float], int]:
    fn(0)  # warm-up: connections, allocations
    seconds, before = [], tx_bytes(ifname)
    for i in range(1, iters + 1):
        barrier()
        t0 = time.perf_counter()
        fn(i)
        seconds.append(time.perf_counter() - t0)
    return seconds, (tx_bytes(ifname) - before) // iters


def _member_gloo(args, tensors, addrs, numel) -> dict:
    import torch
    import torch.distributed as dist

    host0, port0 = addrs[0].rsplit(":", 1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", args.ifname or "lo")
    dist.init_process_group("gloo", init_method=f"tcp://{host0}:{int(port0) + GLOO_PORT_OFFSET}", rank=args.rank, world_size=len(addrs))
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    seconds, wire = _timed(lambda i: dist.all_reduce(flat), args.iters, args.ifname, dist.barrier)
    n = len(addrs)
    dist.destroy_process_group()
    return dict(seconds=seconds, bytes_sent=int(2 * (n - 1) / n * 4 * numel), wire_bytes=wire)


def _member_geotrain(args, tensors, addrs) -> dict:
    from concurrent import futures

    import grpc

    from geotrain.protos import rpc
    from geotrain.worker.allreduce import CompressedAllReduce

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=rpc.server_options())
    server.add_insecure_port(addrs[args.rank])
    ar = CompressedAllReduce(args.rank, len(addrs), addrs, compression=args.compression, min_deadline_s=120,
                             algorithm=args.algorithm)
    ar.add_to_server(server)
    server.start()
    step = [0]

    def once(i):
        step[0] += 1
        ar.allreduce(tensors, step=step[0])

    sent = []

    def run(i):
        once(i)
        sent.append(ar.last.bytes_sent)

    seconds, wire = _timed(run, args.iters, args.ifname, lambda: None)
    result = dict(seconds=seconds, bytes_sent=sent[-1], wire_bytes=wire, algorithm=ar.algorithm,
                  encode_seconds=ar.last.encode_seconds)
    time.sleep(1.0)  # let partners finish their last round before the server goes
    ar.close()
    server.stop(0)
    return result


# --------------------------------------------------------------------------- orchestration


def run_group(impl: str, n: int, args, netns: list[str] | None) -> dict:
    base = 29500 + (os.getpid() % 1000) * 10
    if netns:
        addrs = [f"10.77.0.{i + 1}:{base}" for i in range(n)]
    else:
        addrs = [f"127.0.0.1:{base + i}" for i in range(n)]
    procs = []
    for r in range(n):
        cmd = [sys.executable, __file__, "member", "--impl", impl, "--rank", str(r), "--addrs", ",".join(addrs),
               "--iters", str(args.iters), "--compression", args.compression, "--algorithm", args.algorithm]
        if args.params:
            cmd += ["--params", str(args.params)]
        if netns:
            cmd = ["ip", "netns", "exec", netns[r]] + cmd + ["--ifname", f"gtv{r}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=args.timeout)
        line = [l for l in out.splitlines() if l.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            raise RuntimeError(f"{impl} member failed ({p.returncode}):\n{err[-2000:]}")
        results.append(json.loads(line[0][7:]))
    # an all-reduce takes as long as its slowest member; report the mean over iterations of that
    per_iter = [max(r["seconds"][i] for r in results) for i in range(args.iters)]
    return dict(
        impl=impl, members=n, params=results[0]["params"], link=args.link,
        seconds=sum(per_iter) / len(per_iter),
        bytes_per_member=max(r["bytes_sent"] for r in results),
        wire_bytes_per_member=max(r["wire_bytes"] for r in results) if netns else None,
        algorithm=results[0].get("algorithm", "ring (gloo)"),
        encode_seconds=results[0].get("encode_seconds"),
    )


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True)


def netns_up(n: int, rate: str) -> list[str]:
    netns_down(n)
    sh("ip netns add gt-br && ip -n gt-br link add br0 type bridge && ip -n gt-br link set br0 up")
    names = []
    for i in range(n):
        ns = f"gt-m{i}"
        sh(f"ip netns add {ns}")
        sh(f"ip link add gtv{i} netns {ns} type veth peer name gtb{i} netns gt-br")
        sh(f"ip -n {ns} addr add 10.77.0.{i + 1}/24 dev gtv{i} && ip -n {ns} link set gtv{i} up && ip -n {ns} link set lo up")
        sh(f"ip -n gt-br link set gtb{i} master br0 && ip -n gt-br link set gtb{i} up")
        for side, dev in ((ns, f"gtv{i}"), ("gt-br", f"gtb{i}")):
            sh(f"ip netns exec {side} tc qdisc add dev {dev} root tbf rate {rate} burst 512kb latency 50ms")
        names.append(ns)
    return names


def netns_down(n: int) -> None:
    for ns in [f"gt-m{i}" for i in range(max(n, 8))] + ["gt-br"]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def human(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def table(rows: list[dict]) -> str:
    head = f"{'link':<14}{'N':>3} {'impl':<16}{'algorithm':<12}{'bytes/member':>14}{'wire/member':>14}{'s/allreduce':>13}{'bytes x':>9}{'speed x':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ref = next((g for g in rows if g["impl"] == "gloo-fp32" and g["members"] == r["members"] and g["link"] == r["link"]), None)
        bx = f"{ref['bytes_per_member'] / r['bytes_per_member']:.1f}" if ref else ""
        sx = f"{ref['seconds'] / r['seconds']:.2f}" if ref else ""
        wire = human(r["wire_bytes_per_member"]) if r.get("wire_bytes_per_member") else "-"
        lines.append(f"{r['link']:<14}{r['members']:>3} {r['impl']:<16}{r['algorithm']:<12}{human(r['bytes_per_member']):>14}{wire:>14}{r['seconds']:>13.3f}{bx:>9}{sx:>9}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    m = sub.add_parser("member")
    m.add_argument("--impl", choices=["geotrain", "gloo"], required=True)
    m.add_argument("--rank", type=int, required=True)
    m.add_argument("--addrs", required=True)
    m.add_argument("--iters", type=int, default=3)
    m.add_argument("--params", type=int, default=None)
    m.add_argument("--compression", default="sign")
    m.add_argument("--algorithm", default="auto")
    m.add_argument("--ifname", default=None)
    parser.add_argument("--members", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--params", type=int, default=None, help="scale down from GPT-2 small (124M)")
    parser.add_argument("--compression", default="sign")
    parser.add_argument("--algorithm", default="auto", help="geotrain's schedule: auto | halving | doubling | allgather")
    parser.add_argument("--shaped", default=None, help="also run over tc tbf links of this rate, e.g. 1gbit")
    parser.add_argument("--no-loopback", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.cmd == "member":
        member(args)
        return 0
    rows = []
    links = ([] if args.no_loopback else [("loopback", None)]) + ([(f"tbf {args.shaped}", args.shaped)] if args.shaped else [])
    for link, rate in links:
        for n in args.members:
            netns = None
            try:
                if rate:
                    netns = netns_up(n, rate)
                args.link = link
                for impl in ("gloo", "geotrain"):
                    row = run_group(impl, n, args, netns)
                    row["impl"] = "gloo-fp32" if impl == "gloo" else f"geotrain-{args.compression}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            except (subprocess.CalledProcessError, RuntimeError) as exc:
                detail = getattr(exc, "stderr", "") or str(exc)
                print(f"{link} N={n}: failed: {detail.strip()[-1500:]}", flush=True)
            finally:
                if netns:
                    netns_down(n)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
