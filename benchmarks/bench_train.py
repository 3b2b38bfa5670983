"""Benchmark the reference trainer: tokens/s, ms/iter and validation loss for N iterations.

    python benchmarks/bench_train.py --iters 200                       # nano, batch 12x64
    python benchmarks/bench_train.py --iters 2000 --eval-iters 20      # the nanoGPT acceptance recipe
    python benchmarks/bench_train.py --iters 100 --variants eager,compile --json out.json
    python benchmarks/bench_train.py --iters 100 --variants eager,micro1,ckpt,offload,noprefetch

Variants: eager (the defaults), compile (torch.compile), micro1 (micro-batches of one sequence),
ckpt (activation checkpointing on), offload (AdamW state in host memory), noprefetch (batches made
in the training loop instead of a background thread). All but compile train the same model
(common/step.py), so their val loss must agree; they differ in speed and device memory.

Each variant runs `geotrain.common.train.train` in a fresh output directory (the real loop: data, AdamW,
clipping, evaluation, checkpoints). tokens/s counts optimizer steps only (no eval, no checkpoint
writes), like nanoGPT's per-iteration timing; wall s is everything. The 1-minute load average
before and after is printed because a shared CPU makes every figure noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geotrain.common.config import RunConfig, apply_overrides  # noqa: E402
from geotrain.common.train import train  # noqa: E402


VARIANTS = {  # name -> RunConfig overrides on top of the common ones
    "eager": {}, "compile": {}, "micro1": {"train.micro_batch": 1},
    "ckpt": {"train.activation_checkpointing": "on"}, "offload": {"train.optimizer_state": "offload"},
    "noprefetch": {"train.prefetch": 0},
}


def run_variant(name: str, args: argparse.Namespace, out: Path) -> dict:
    run = apply_overrides(RunConfig(), {
        "model.preset": args.model, "data.dir": args.data, "train.max_iters": args.iters,
        "train.batch_size": args.batch_size, "train.eval_iters": args.eval_iters,
        "train.eval_interval": args.eval_interval or args.iters, "train.log_interval": args.log_interval,
        "train.checkpoint_interval": args.iters, "train.threads": args.threads,
        "train.device": args.device, "train.compile": name == "compile", "train.seed": args.seed,
        **VARIANTS[name],
    }).validate()
    load_before = os.getloadavg()[0]
    summary = train(run, out / name, progress=False, echo=(print if args.verbose else (lambda _m: None)))
    summary["variant"] = name
    summary["load_before"] = round(load_before, 2)
    summary["load_after"] = round(os.getloadavg()[0], 2)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--model", default="nano")
    p.add_argument("--data", default="", help="prepared data dir (default: the embedded corpus)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--eval-interval", type=int, default=250, help="0: only at the start and end")
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--variants", default="eager", help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=None, help="keep run directories here (default: temp)")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--verbose", action="store_true", help="print the trainer's log lines")
    args = p.parse_args()

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        root = args.out or Path(tmp)
        for v in variants:
            results.append(run_variant(v, args, root))

    header = f"{'variant':10s} {'iters':>6s} {'tokens/s':>9s} {'ms/iter':>8s} {'val loss':>9s} {'train loss':>10s} {'wall s':>7s} {'load':>9s}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['variant']:10s} {r['iters']:6d} {r['tokens_per_second']:9,.0f} {r['ms_per_iter']:8.2f} "
              f"{r['val_loss']:9.4f} {r['train_loss']:10.4f} {r['seconds']:7.1f} "
              f"{r['load_before']:4.1f}/{r['load_after']:<4.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
