"""Benchmark every compression scheme on a GPT-2-small-shaped parameter delta, on one thread.

    .venv/bin/python benchmarks/bench_codecs.py                    # 124M-parameter delta
    .venv/bin/python benchmarks/bench_codecs.py --params 2000000   # quick run
    .venv/bin/python benchmarks/bench_codecs.py --json out.json

Rows: blob bytes per parameter, compression ratio vs raw fp32, encode and decode throughput
(fp32 input bytes / seconds, best of --repeat; encode = encode_tensors without feedback, decode =
decode_tensors with full validation), and encode seconds with error feedback (steady state: the
first call, which allocates the residuals, is not counted), as wall time and as process CPU time
(the latter is the fairer number when other jobs share the machine; the load average is printed).

The delta is N(0, std^2) per tensor with the shapes of geotrain.common.model.GPT("gpt2", vocab 50304),
tied weights once; --params N keeps the same tensor order and cuts it at N values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geotrain.common.compression import SCHEMES, ErrorFeedback, decode_tensors, encode_tensors, get_codec  # noqa: E402
from geotrain.common.config import model_config  # noqa: E402
from geotrain.common.model import GPT  # noqa: E402


def gpt2_shapes(limit: int | None) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only, nothing allocated
        model = GPT(model_config("gpt2", vocab_size=50304))
    shapes: dict[str, tuple[int, ...]] = {}
    left = limit
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if left is not None:
            per_row = p[0].numel() if p.ndim else 1
            if p.numel() > left:  # cut the leading dim to fit the budget
                if p.ndim == 0 or left < per_row:
                    break
                shape = (left // per_row,) + shape[1:]
            left -= torch.Size(shape).numel()
        shapes[name] = shape
    return shapes


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def best_cpu_time(fn, repeat: int) -> float:
    """Best process CPU seconds: less inflated than wall time when other jobs share the cores."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=None, help="use only this many values (default: all 124M)")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated subset of " + ",".join(SCHEMES))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--std", type=float, default=1e-3, help="delta ~ N(0, std^2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.params is not None and args.params <= 0:
        ap.error(f"--params must be positive, got {args.params}")
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    for s in schemes:
        get_codec(s, args.chunk)  # ValueError names a bad scheme or chunk
    torch.set_num_threads(args.threads)

    shapes = gpt2_shapes(args.params)
    g = torch.Generator().manual_seed(0)
    delta = {name: torch.randn(shape, generator=g).mul_(args.std) for name, shape in shapes.items()}
    n = sum(t.numel() for t in delta.values())
    fp32_bytes = 4 * n
    print(
        f"delta: {n:,} params in {len(delta)} tensors, N(0, {args.std:g}), chunk {args.chunk}, "
        f"zstd level {args.zstd_level}, {torch.get_num_threads()} thread(s), "
        f"load avg {os.getloadavg()[0]:.1f}"
    )

    rows = []
    for scheme in schemes:
        kw = dict(chunk=args.chunk, zstd_level=args.zstd_level)
        enc_s, (blob, decoded) = best_time(lambda: encode_tensors(delta, scheme, **kw), args.repeat)
        del decoded
        dec_s, _ = best_time(lambda: decode_tensors(blob, shapes, max_blob_bytes=len(blob)), args.repeat)
        ef = ErrorFeedback(get_codec(scheme, args.chunk))
        encode_tensors(delta, scheme, feedback=ef, **kw)  # allocates the residuals
        ef_s, _ = best_time(lambda: encode_tensors(delta, scheme, feedback=ef, **kw), args.repeat)
        ef_cpu = best_cpu_time(lambda: encode_tensors(delta, scheme, feedback=ef, **kw), args.repeat)
        rows.append(
            {
                "scheme": scheme,
                "params": n,
                "blob_bytes": len(blob),
                "bytes_per_param": len(blob) / n,
                "ratio_vs_fp32": fp32_bytes / len(blob),
                "encode_gb_s": fp32_bytes / enc_s / 1e9,
                "decode_gb_s": fp32_bytes / dec_s / 1e9,
                "encode_s": enc_s,
                "decode_s": dec_s,
                "encode_ef_s": ef_s,
                "encode_ef_cpu_s": ef_cpu,
                "residual_norm": ef.residual_norm(),
            }
        )
        del ef, blob

    print(f"{'scheme':<7} {'B/param':>8} {'ratio':>7} {'enc GB/s':>9} {'dec GB/s':>9} {'enc+EF s':>9} {'(cpu s)':>8}")
    for r in rows:
        print(
            f"{r['scheme']:<7} {r['bytes_per_param']:8.4f} {r['ratio_vs_fp32']:7.2f} "
            f"{r['encode_gb_s']:9.2f} {r['decode_gb_s']:9.2f} {r['encode_ef_s']:9.3f} {r['encode_ef_cpu_s']:8.3f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
