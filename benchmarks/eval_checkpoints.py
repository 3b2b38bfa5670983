"""Evaluate every checkpoint a coordinator kept, as it is and with the end-of-run variants.

For each checkpoint in RUN_DIR/checkpoints, on the fixed validation batches of bench_async.py
(12 x 64 tokens, seed 0xBE7C4):

  as saved          the global model
  - lookahead       the model minus the outer Nesterov lookahead lr * mu * m (what a finished run's
                    final version applies; lr and mu from the run's run.json)
  + residual        the model plus the coordinator's downlink error-feedback residual (1-bit runs)

    python benchmarks/eval_checkpoints.py runs/b4/demo_n2_h50_sign_s2000 --batches 50
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_async import fixed_val_loss  # noqa: E402
from geotrain.common.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from geotrain.common.config import ModelConfig  # noqa: E402
from geotrain.common.model import GPT  # noqa: E402


def model_with(tensors: dict[str, torch.Tensor], model_cfg: dict, prefix: str = "", alpha: float = 0.0) -> GPT:
    """The checkpoint's model, plus alpha x the `prefix` tensors (zero where absent)."""
    model = GPT(ModelConfig(**model_cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[f"model.{name}"])
            extra = tensors.get(f"{prefix}.{name}") if prefix else None
            if extra is not None:
                p.add_(extra, alpha=alpha)
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    outer = json.loads((args.run_dir / "run.json").read_text())["run"]["outer"]
    lookahead = outer["lr"] * outer["momentum"] if outer["kind"] == "nesterov" else 0.0
    rows = []
    for _, path in list_checkpoints(args.run_dir / "checkpoints"):
        tensors, state = load_checkpoint(path)
        row = {"checkpoint": path.name, "as_saved": fixed_val_loss(model_with(tensors, state["model"]), args.batches)}
        if lookahead and any(k.startswith("outer_momentum.") for k in tensors):
            m = model_with(tensors, state["model"], "outer_momentum", -lookahead)
            row["minus_lookahead"] = fixed_val_loss(m, args.batches)
        if any(k.startswith("downlink_residual.") for k in tensors):
            m = model_with(tensors, state["model"], "downlink_residual", 1.0)
            row["plus_residual"] = fixed_val_loss(m, args.batches)
        rows.append(row)
    print("| checkpoint | as saved | - lookahead | + downlink residual |")
    print("|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.4f}" if k in r else "-" for k in ("as_saved", "minus_lookahead", "plus_residual")]
        print(f"| {r['checkpoint']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"run_dir": str(args.run_dir), "batches": args.batches, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
