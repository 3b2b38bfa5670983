"""Validation loss of 1-bit sync groups against fp32 sync groups on the same weights and batches.

    python benchmarks/bench_sync_quality.py --members 2 4 --seeds 0 1 2 3 --json out.json
    python benchmarks/bench_sync_quality.py --members 2 --steps 100 --constant-lr      # the early regime
    python benchmarks/bench_sync_quality.py --members 4 --sign-scale mean_abs --chunk 64

Runs the setup of tests/test_sync.py (`_run`): a 1-layer, 32-wide GPT on a synthetic grammar, N
members as threads of this process, each with its own gRPC server on loopback, batches of 8 x 32
tokens per member; by default the worker's lr schedule (linear warmup over steps / 10, cosine decay
from 3e-3 to 3e-4). For every seed and member count: fp32 sync ("none": the mean gradient into
torch AdamW) and 1-bit sync (the default mode, "update", with the options given), then the gap of
the 1-bit group's validation loss. Prints a table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' harness: the table and the tests measure the same thing


def table(rows: list[dict]) -> str:
    lines = [
        "| members | steps | lr | 1-bit options | seed | fp32 sync | 1-bit sync | gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['members']} | {r['steps']} | {r['lr']} | {r['options']} | {r['seed']} | {r['val_fp32']:.4f} "
            f"| {r['val_sign']:.4f} | {100 * r['gap']:+.2f}% |"
        )
    by_n: dict[tuple, list[float]] = {}
    for r in rows:
        by_n.setdefault((r["members"], r["steps"], r["options"]), []).append(r["gap"])
    for (n, steps, options), gaps in by_n.items():
        lines.append(
            f"| {n} | {steps} | | {options} | mean of {len(gaps)} | | | {100 * sum(gaps) / len(gaps):+.2f}% "
            f"(max {100 * max(gaps):+.2f}%) |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--constant-lr", action="store_true", help="lr 3e-3 throughout (no warmup or decay)")
    parser.add_argument("--chunk", type=int, default=256, help="values per scale (the worker's default: 256)")
    parser.add_argument("--sign-scale", default="rms", choices=["rms", "mean_abs"])
    parser.add_argument("--algorithm", default="auto")
    parser.add_argument("--probe-every", type=int, default=8, help="VarianceProbe interval (0: off)")
    parser.add_argument("--compression-warmup", type=float, default=None,
                        help="fp32 steps before 1-bit: a count, or a fraction of --steps (default: worker/sync.py's)")
    parser.add_argument("--warmup-compression", default="int8", choices=["int8", "none"],
                        help="how the warmup steps all-reduce gradients (default int8)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    import torch

    from test_sync import _run

    torch.set_num_threads(1)
    schedule = not args.constant_lr
    options = f"{args.algorithm}, chunk {args.chunk}, {args.sign_scale}, probe {args.probe_every}, warmup {args.warmup_compression}"
    warmup = args.compression_warmup
    if warmup is not None:
        warmup = int(warmup) if warmup >= 1 else warmup
        options += f" ({warmup})"
    rows = []
    for n in args.members:
        for seed in args.seeds:
            t0 = time.perf_counter()
            val_fp32 = _run(n, "none", args.steps, seed=seed, schedule=schedule)[0]
            val_sign = _run(
                n, "sign", args.steps, chunk=args.chunk, algorithm=args.algorithm, seed=seed, schedule=schedule,
                sign_scale=args.sign_scale, variance_probe_every=args.probe_every, compression_warmup=warmup,
                warmup_compression=args.warmup_compression,
            )[0]
            row = dict(
                members=n, steps=args.steps, lr="constant" if args.constant_lr else "schedule", options=options,
                seed=seed, val_fp32=val_fp32, val_sign=val_sign, gap=(val_sign - val_fp32) / val_fp32,
                seconds=time.perf_counter() - t0,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
