"""GPU check: the figures that need CUDA, in one go (about 5-8 minutes on one H100).

    python benchmarks/gpu_check.py                      # all checks, table on stdout
    python benchmarks/gpu_check.py --json gpu_check.json --gpu-memory 24GiB
    python benchmarks/gpu_check.py --cpu-smoke          # the code paths on CPU with tiny models

Without CUDA it prints why it skips and exits 0 (unless --cpu-smoke).

1. trainer: tokens/s and MFU of gpt2 (124M) in the reference trainer (common/train.py) in bf16
   autocast, flash attention (`scaled_dot_product_attention` restricted to the flash kernel) and
   torch.compile, on random tokens (vocab 50304). tokens/s is the median of the trainer's logged
   windows after the first two (compilation and warm-up excluded). MFU = 6N + 12*L*T*C flops per
   token (nanoGPT's estimate: weights' matmuls forward + backward, plus attention) / the card's
   dense bf16 peak (--peak-tflops, else looked up from the device name).
2. memory: each preset gpt2 .. gpt2-xl at the micro-batch, checkpointing and optimizer state that
   common/memplan.py plans for --gpu-memory (default 24 GiB, a 3090/4090), with this process capped
   to that much device memory (torch.cuda.set_per_process_memory_fraction): two optimizer steps,
   then the peak allocated bytes next to the plan's total. The micro-batch the out-of-memory probe
   finds under the same cap is shown next to the planned one.
3. dropout: two async workers seed torch as worker/trainer.py does at join (run seed + crc32 of the
   worker id) and must draw different dropout masks on the same batch; the same id must draw the
   same masks again.

The live async worker is measured by another script; `measure_trainer`, `measure_memory` and
`check_dropout_masks` are the boundaries such a script can reuse.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from geotrain.common.config import OptimConfig, RunConfig, TrainConfig, apply_overrides, model_config  # noqa: E402
from geotrain.common.memplan import count_params, fmt_bytes, make_plan, parse_size  # noqa: E402
from geotrain.common.model import GPT  # noqa: E402
from geotrain.common.step import TrainStep, build_optimizer, have_bitsandbytes  # noqa: E402

VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT
PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# dense bf16 tensor-core peaks (TFLOPS) by a substring of the device name; the first match wins
PEAK_TFLOPS = [("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A6000", 155.0),
               ("4090", 165.0), ("3090", 71.0), ("4060 Ti", 44.0), ("L4", 121.0), ("A10", 125.0)]


def peak_flops(device: torch.device, override: float) -> float | None:
    if override > 0:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def flops_per_token(cfg) -> float:
    """6N + 12*L*T*C: forward + backward matmul flops per token (nanoGPT's estimate_mfu)."""
    return 6 * count_params(cfg) + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def random_data(root: Path, vocab: int, tokens: int) -> Path:
    """A prepared data directory of uniformly random tokens (through the nanoGPT importer)."""
    from geotrain.common.nanogpt import import_nanogpt

    src = root / "bins"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, size=tokens, dtype=np.uint16).tofile(src / "train.bin")
    rng.integers(0, vocab, size=tokens // 10, dtype=np.uint16).tofile(src / "val.bin")
    import_nanogpt(src, root / "data", vocab_size=vocab)
    return root / "data"


def flash_only(device: torch.device):
    """Restrict scaled_dot_product_attention to the flash kernel on CUDA (fails loudly if absent)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


# --------------------------------------------------------------------------- 1. the trainer


def measure_trainer(device: torch.device, preset: str, iters: int, batch_size: int, compile: bool,
                    work: Path, peak: float | None, block_size: int | None = None, vocab: int = VOCAB) -> dict:
    """Run the reference trainer on random tokens; tokens/s from its logged windows, MFU."""
    from geotrain.common.train import train

    data = random_data(work / f"data-{preset}", vocab, max(2_000_000, 4 * batch_size * 1024))
    log_every = max(1, iters // 8)
    run = apply_overrides(RunConfig(), {
        "model.preset": preset, "model.block_size": block_size, "data.dir": str(data), "train.max_iters": iters,
        "train.batch_size": batch_size, "train.eval_iters": 1, "train.eval_interval": iters,
        "train.log_interval": log_every, "train.checkpoint_interval": iters, "train.device": str(device),
        "train.compile": compile, "optim.warmup_iters": 10,
    }).validate()
    lines: list[str] = []
    t0 = time.perf_counter()
    with flash_only(device):
        summary = train(run, work / f"run-{preset}", progress=False, echo=lines.append)
    wall = time.perf_counter() - t0
    windows = [float(m.group(1).replace(",", "")) for line in lines
               if (m := re.search(r"([\d,]+) tok/s", line)) and line.startswith("iter ")]
    steady = windows[2:] or windows
    tok_s = statistics.median(steady) if steady else summary["tokens_per_second"]
    cfg = model_config(preset, vocab_size=vocab, block_size=block_size)
    mfu = tok_s * flops_per_token(cfg) / peak if peak else None
    return {"check": "trainer", "model": preset, "device": str(device), "batch_size": batch_size,
            "block_size": cfg.block_size, "compile": compile, "iters": iters, "tokens_per_second": round(tok_s, 1),
            "mfu": round(mfu, 4) if mfu is not None else None, "micro_batch": summary["micro_batch"],
            "val_loss": summary["val_loss"], "windows_tok_s": windows, "wall_seconds": round(wall, 1)}


# --------------------------------------------------------------------------- 2. memory per preset


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_memory(device: torch.device, preset: str, gpu_bytes: int, batch_size: int, steps: int = 2,
                   probe: bool = True, block_size: int | None = None, vocab: int = VOCAB) -> dict:
    """Peak device memory of `steps` optimizer steps at the plan for gpu_bytes, under that cap."""
    cfg = model_config(preset, vocab_size=vocab, block_size=block_size)
    plan = make_plan(cfg, gpu_bytes, batch_size, have_8bit=device.type == "cuda" and have_bitsandbytes())
    row = {"check": "memory", "model": preset, "params": count_params(cfg), "gpu_memory": gpu_bytes,
           "batch_size": batch_size, "fits": plan.fits, "micro_batch": plan.micro_batch,
           "checkpointing": plan.checkpointing, "optimizer_state": plan.optimizer_state,
           "planned_bytes": plan.total_bytes, "planned_activation_bytes": plan.parts["activations"]}
    if not plan.fits:
        return {**row, "error": plan.reason}
    _free(device)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_bytes / torch.cuda.get_device_properties(device).total_memory), device)
    model = optimizer = step = None
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = GPT(cfg)
        optimizer = build_optimizer(model, OptimConfig(), device, plan.optimizer_state)
        step = TrainStep(model, optimizer, device, micro_batch=plan.micro_batch, grad_clip=1.0,
                         checkpointing=plan.checkpointing)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        g = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        for _ in range(steps):
            x = torch.randint(0, vocab, (batch_size, cfg.block_size + 1), generator=g)
            loss = step(x[:, :-1], x[:, 1:], lr=1e-4).loss
        loss_value = float(loss)
        seconds = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
        row.update(peak_allocated=peak, peak_reserved=reserved, weights_allocated=base, loss=round(loss_value, 4),
                   seconds_per_step=round(seconds, 3),
                   peak_over_plan=round(peak / (plan.total_bytes - plan.parts["overhead"]), 3) if peak else None)
        if probe and device.type == "cuda":
            with tempfile.TemporaryDirectory() as cache:
                plan_probe = make_plan(cfg, gpu_bytes, batch_size, micro_batch=0,
                                       checkpointing="on" if plan.checkpointing else "off",
                                       optimizer_state=plan.optimizer_state)
                row["probed_micro_batch"] = step.probe(cfg, plan_probe, cache_dir=Path(cache))
    except torch.OutOfMemoryError as exc:
        row["error"] = f"out of memory at the planned micro-batch: {str(exc).splitlines()[0]}"
    finally:
        del model, optimizer, step
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        _free(device)
    return row


# --------------------------------------------------------------------------- 3. dropout masks


def worker_seed(run_seed: int, worker_id: str) -> int:
    """The torch seed of an async worker (worker/trainer.py `worker_seed`, used when the runner builds
    its LocalTrainer at join)."""
    return run_seed + (zlib.crc32(worker_id.encode()) % 10_000)


def check_dropout_masks(device: torch.device, dropout: float = 0.1) -> dict:
    """Two worker ids -> different dropout masks on the same batch; one id twice -> the same."""
    cfg = model_config("nano", vocab_size=257, dropout=dropout)

    def masks(worker_id: str) -> torch.Tensor:
        torch.manual_seed(worker_seed(TrainConfig().seed, worker_id))
        model = GPT(cfg).to(device).train()
        drop = model.transformer.drop
        seen = []
        drop.register_forward_hook(lambda mod, inp, out: seen.append((out == 0) & (inp[0] != 0)))
        x = torch.arange(2 * cfg.block_size, device=device).reshape(2, -1) % cfg.vocab_size
        model(x, x)
        return seen[0]

    a, b, a2 = masks("worker-a"), masks("worker-b"), masks("worker-a")
    differ = float((a != b).float().mean())
    return {"check": "dropout", "device": str(device), "dropout": dropout, "fraction_dropped": round(float(a.float().mean()), 4),
            "masks_differ_fraction": round(differ, 4), "different_workers_differ": bool(differ > 0),
            "same_worker_repeats": bool(torch.equal(a, a2))}


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-memory", default="24GiB", help="the consumer GPU to plan and cap for")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step for the memory check")
    p.add_argument("--train-batch-size", type=int, default=16, help="sequences per step for the trainer check")
    p.add_argument("--iters", type=int, default=80, help="trainer iterations")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak (default: by device name)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="run every check on CPU with tiny shapes")
    args = p.parse_args()

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_check: skipped, CUDA is not available on this host (use --cpu-smoke to exercise the code on CPU)")
        return 0
    try:
        gpu_bytes = parse_size(args.gpu_memory)
    except ValueError as exc:
        p.error(str(exc))
    device = torch.device("cuda") if not args.cpu_smoke else torch.device("cpu")
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    if args.cpu_smoke and args.presets == p.get_default("presets"):
        presets = ["nano"]
    smoke = dict(block_size=32, vocab=512) if args.cpu_smoke else {}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device, args.peak_tflops)
    results: list[dict] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        trainer = measure_trainer(device, "gpt2" if not args.cpu_smoke else "nano",
                                  args.iters if not args.cpu_smoke else 6, args.train_batch_size if not args.cpu_smoke else 2,
                                  not args.no_compile and not args.cpu_smoke, Path(tmp), peak,
                                  block_size=None, vocab=VOCAB if not args.cpu_smoke else 512)
        results.append(trainer)
        print(f"trainer {trainer['model']}: {trainer['tokens_per_second']:,.0f} tok/s, MFU {trainer['mfu']}", flush=True)
    for preset in presets:
        row = measure_memory(device, preset, gpu_bytes, args.batch_size if not args.cpu_smoke else 2,
                             steps=2, probe=not args.cpu_smoke, **smoke)
        results.append(row)
        print(f"memory {preset}: peak {row.get('peak_allocated')} plan {row['planned_bytes']} {row.get('error', '')}", flush=True)
    results.append(check_dropout_masks(device))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print()
    print(f"device: {device_name}, torch {torch.__version__}, {time.perf_counter() - t_start:.0f} s")
    mfu = "n/a" if trainer["mfu"] is None else f"{trainer['mfu'] * 100:.1f}%"
    print(f"trainer  {trainer['model']}  batch {trainer['batch_size']}x{trainer['block_size']}  compile {trainer['compile']}  "
          f"micro-batch {trainer['micro_batch']}: {trainer['tokens_per_second']:,.0f} tok/s, MFU {mfu}")
    header = (f"{'preset':12s} {'params':>8s} {'micro':>5s} {'ckpt':>4s} {'opt state':>9s} {'planned':>9s} "
              f"{'peak alloc':>10s} {'peak/plan':>9s} {'probed':>6s} {'s/step':>7s}  note")
    print(f"memory at the plan for {fmt_bytes(gpu_bytes)} (capped), batch {args.batch_size}:")
    print(header)
    print("-" * len(header))
    for r in results:
        if r["check"] != "memory":
            continue
        peak_s = fmt_bytes(r["peak_allocated"]) if r.get("peak_allocated") else "-"
        print(f"{r['model']:12s} {r['params'] / 1e6:7.0f}M {r['micro_batch']:5d} {'on' if r['checkpointing'] else 'off':>4s} "
              f"{r['optimizer_state']:>9s} {fmt_bytes(r['planned_bytes']):>9s} {peak_s:>10s} "
              f"{r.get('peak_over_plan') or '-':>9} {r.get('probed_micro_batch', '-'):>6} {r.get('seconds_per_step', '-'):>7}  {r.get('error', '')}")
    d = results[-1]
    print(f"dropout {d['dropout']}: two workers' masks differ in {d['masks_differ_fraction'] * 100:.1f}% of values "
          f"({'ok' if d['different_workers_differ'] else 'FAIL'}); same worker repeats: {'ok' if d['same_worker_repeats'] else 'FAIL'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    ok = d["different_workers_differ"] and d["same_worker_repeats"] and all(
        "error" not in r for r in results if r["check"] == "memory" and r["fits"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
