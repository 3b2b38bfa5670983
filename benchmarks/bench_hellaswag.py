"""Benchmark HellaSwag scoring (common/hellaswag.py): examples/s of a model of a preset.

    python benchmarks/bench_hellaswag.py --model gpt2 --examples 24 --batch-sizes 1,4 --threads 2
    python benchmarks/bench_hellaswag.py --model gpt2 --examples 1000 --device cuda --batch-sizes 8,32

The model is randomly initialised with the gpt2 vocabulary (50257): its accuracy means nothing,
its speed is the trained model's. The examples are synthetic with HellaSwag's shape (4 endings;
contexts of ~40 and endings of ~25 tokens, about the validation split's means for the gpt2
tokenizer), encoded by a byte tokenizer on ASCII text so that a byte is a token and no tokenizer
file is needed. Prints a table and writes JSON (default benchmarks/results/hellaswag.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from geotrain.common.config import model_config  # noqa: E402
from geotrain.common.hellaswag import Example, evaluate_hellaswag  # noqa: E402
from geotrain.common.model import GPT, resolve_device  # noqa: E402
from geotrain.common.tokenizer import ByteTokenizer  # noqa: E402


def synthetic_examples(n: int, ctx_tokens: int, ending_tokens: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def text(k: int) -> str:
        return "".join(rng.choice(letters) for _ in range(k))

    return [Example(text(ctx_tokens), [text(ending_tokens - 1) for _ in range(4)], rng.randrange(4), i + 1)
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--batch-sizes", default="1,4", help="Examples per forward, comma-separated.")
    ap.add_argument("--ctx-tokens", type=int, default=40)
    ap.add_argument("--ending-tokens", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default).")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "hellaswag.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = GPT(model_config(args.model, vocab_size=50257)).to(device).eval()
    examples = synthetic_examples(args.examples, args.ctx_tokens, args.ending_tokens)
    tok = ByteTokenizer()
    evaluate_hellaswag(model, tok, examples[:2], 2, device, progress=False)  # warm-up
    rows = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        load = os.getloadavg()[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = evaluate_hellaswag(model, tok, examples, b, device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows.append({"batch": b, "examples": len(examples), "seconds": round(seconds, 3),
                     "examples_per_second": round(len(examples) / seconds, 2), "acc_norm": result["acc_norm"],
                     "load_before": round(load, 2)})
    print(f"HellaSwag scoring, model {args.model} ({model.num_params() / 1e6:.0f}M), device {device}, "
          f"{torch.get_num_threads()} threads, ctx {args.ctx_tokens} + ending {args.ending_tokens} tokens")
    print(f"{'batch':>6} {'examples':>9} {'seconds':>9} {'examples/s':>11} {'load':>6}")
    for r in rows:
        print(f"{r['batch']:>6} {r['examples']:>9} {r['seconds']:>9.2f} {r['examples_per_second']:>11.2f} {r['load_before']:>6.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": str(device),
                                     "threads": torch.get_num_threads(), "results": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
