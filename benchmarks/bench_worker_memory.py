"""Host memory a worker holds besides its model, in fp32 model copies (one copy = 4 x params bytes).

Each case runs in a fresh process on the CPU: the model's parameters ("params", the device copy on
a GPU host) are allocated first, then the worker's state (`worker/rebase.py` RoundState with its
fp32 basepoint, a `worker/downlink.py` Downlink with its outer-momentum replica), and the peak
resident memory (VmHWM, reset through /proc/self/clear_refs) is measured over one operation:

- push: `RoundState.make_push` (the run's scheme), the push then in flight (its decoded delta held).
- replay: a relayed version of N deltas (N - 1 from the stream, our own held), replayed
  (`Downlink.update_tensors`, common/merge.py replay_relayed).

"before" repeats the same operation as it was computed before the worker kept one decoded delta at
a time: the delta and the residual as whole copies (`sub`, `global_norm(sub(...))`), every relayed
delta decoded before the weighted sum.

    python benchmarks/bench_worker_memory.py --preset gpt2 --scheme sign --deltas 4 --out benchmarks/results/worker_memory.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import threading


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _case(args: tuple) -> dict:
    preset, scheme, n_deltas, op, variant = args
    import torch

    torch.set_num_threads(1)
    from geotrain.common.compression import encode_tensors
    from geotrain.common.config import CompressionConfig, OuterConfig, RunConfig, model_config
    from geotrain.common.merge import OuterOptimizer, weighted_sum
    from geotrain.common.model import GPT
    from geotrain.common.tensors import global_norm, model_tensors, sub, tensor_spec
    from geotrain.protos import geotrain_pb2 as pb
    from geotrain.worker.downlink import Downlink, replayed_version
    from geotrain.worker.metrics import StatsBook
    from geotrain.worker.rebase import PendingRange, RoundState

    model = GPT(model_config(preset, vocab_size=50304))
    params = model_tensors(model)
    spec = tensor_spec(params)
    copy_bytes = sum(t.numel() * 4 for t in params.values())
    run = RunConfig(compression=CompressionConfig(scheme=scheme, downlink="relay"), outer=OuterConfig(kind="nesterov"))
    base = {n: t.detach().clone() for n, t in params.items()}
    downlink = Downlink(run, spec, max_blob_bytes=8 * copy_bytes)
    state = RoundState(params, base, 1, "run", StatsBook(), threading.Event())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in params.values():
            t.add_(torch.randn(t.shape, generator=g) * 1e-3)
    state.pending = [PendingRange(0, "s", 0, 64, 0, 1, 1.0, 0)]
    c = run.compression
    if op == "replay":  # the stream of N - 1 other deltas and our own, held
        blobs = []
        for i in range(n_deltas):
            d = {n: torch.randn(s, generator=g) * 1e-3 for n, s in spec.items()}
            blobs.append(encode_tensors(d, scheme, c.chunk, feedback=None, zstd_level=c.zstd_level)[0])
            del d
        stream = b"".join(blobs[1:])
        info = pb.UpdateInfo(version=2, outer_fraction=1.0)
        info.relayed.add(push_id="own", offset=0, size=0, weight=1.0 / n_deltas, factor=1.0)
        off = 0
        for i, b in enumerate(blobs[1:]):
            info.relayed.add(push_id=f"p{i}", offset=off, size=len(b), weight=1.0 / n_deltas, factor=1.0)
            off += len(b)
        downlink.hold("own", blobs[0])
        del blobs
    import gc

    gc.collect()
    start = _rss("VmRSS")
    _reset_peak()
    if op == "push":
        if variant == "after":
            push, header, blob = state.make_push(c, None, 0)
            held = push
        else:
            delta = sub(params, base)
            blob, decoded = encode_tensors(delta, scheme, c.chunk, feedback=None, zstd_level=c.zstd_level)
            decoded = {n: t.detach().float().cpu() for n, t in decoded.items()}
            global_norm(sub(delta, decoded))
            held = decoded
    else:
        if variant == "after":
            held = downlink.update_tensors(info, stream)
        else:
            v = replayed_version(info)
            deltas = [downlink.decode(downlink._held["own"] if d.size == 0 else stream[d.offset:d.offset + d.size])
                      for d in v.relayed]
            mean = weighted_sum(deltas, [d.factor for d in v.relayed], [d.weight for d in v.relayed])
            held = downlink.outer.update(mean, fraction=1.0)
    peak = _rss("VmHWM") - start
    del held
    return {"preset": preset, "scheme": scheme, "op": op, "deltas": n_deltas if op == "replay" else 1,
            "variant": variant, "params": copy_bytes // 4, "peak_extra_copies": peak / copy_bytes,
            "peak_extra_mb": peak / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--scheme", default="sign")
    ap.add_argument("--deltas", type=int, default=4)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cases = [(a.preset, a.scheme, a.deltas, op, variant) for op in ("push", "replay") for variant in ("before", "after")]
    ctx = mp.get_context("spawn")
    rows = []
    for case in cases:
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(_case, (case,)))
    print("| op | deltas | scheme | variant | peak extra (fp32 model copies) | peak extra MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['deltas']} | {r['scheme']} | {r['variant']} | {r['peak_extra_copies']:.2f} | {r['peak_extra_mb']:.0f} |")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
