"""A host's devices as one participant (worker/host_group.py): N local ranks vs one process.

    .venv/bin/python benchmarks/bench_host_group.py                         # nano model, 2 CPU ranks
    .venv/bin/python benchmarks/bench_host_group.py --device cuda --nproc 8 # a GPU host
    .venv/bin/python benchmarks/bench_host_group.py --json out.json

Both runs start from the same weights and train --steps AdamW steps (lr 1e-3, clip 1.0) on the
same batches of --batch x N random-token sequences: (1) one process on the whole batch (the
runner's own step), (2) N ranks, each on --batch rows (HostGroup.train_step). Rows: seconds per
step (median; the first 3 steps are warmup), tokens per second, and the largest relative loss
difference between the two curves (the proof that N ranks train what one process with N x the
batch trains). On CPU each process uses --threads threads; a CPU host gains nothing from more
processes than cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geotrain.common.config import OptimConfig, model_config  # noqa: E402
from geotrain.common.model import GPT, autocast_context, configure_optimizer  # noqa: E402
from geotrain.worker.host_group import HostGroup  # noqa: E402


def batches(n_rows: int, block: int, vocab: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        seq = torch.randint(0, vocab, (n_rows, block + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def fresh(cfg, optim: OptimConfig, device: torch.device):
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    return model, configure_optimizer(model, optim.weight_decay, optim.lr, (optim.beta1, optim.beta2), device)


def one_process(cfg, optim, device, data) -> tuple[list[float], list[float]]:
    model, opt = fresh(cfg, optim, device)
    losses, times = [], []
    for x, y in data:
        t0 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        model.train()
        with autocast_context(device):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        times.append(time.perf_counter() - t0)
    return losses, times


def host_group(cfg, optim, device, data, nproc: int, threads: int) -> tuple[list[float], list[float]]:
    group = HostGroup(nproc, device.type, threads=threads)
    try:
        model, opt = fresh(cfg, optim, group.device)
        group.attach(model, opt, cfg, optim)
        losses, times = [], []
        for x, y in data:
            t0 = time.perf_counter()
            losses.append(group.train_step(x, y, optim.lr))
            times.append(time.perf_counter() - t0)
        return losses, times
    finally:
        group.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nano")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=12, help="sequences per rank and step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config(args.model)
    optim = OptimConfig()
    device = torch.device(args.device)
    data = batches(args.batch * args.nproc, cfg.block_size, cfg.vocab_size, args.steps)
    tokens = args.batch * args.nproc * cfg.block_size
    ref_losses, ref_times = one_process(cfg, optim, device, data)
    losses, times = host_group(cfg, optim, device, data, args.nproc, args.threads)
    diff = max(abs(a - b) / abs(a) for a, b in zip(ref_losses, losses))
    rows = []
    for name, t in ((f"1 process, batch {args.batch * args.nproc}", ref_times),
                    (f"{args.nproc} ranks, batch {args.batch} each", times)):
        s = statistics.median(t[3:])
        rows.append({"run": name, "seconds_per_step": s, "tokens_per_second": tokens / s})
    print(f"model {args.model}, {args.device}, {args.steps} steps, {tokens} tokens/step, "
          f"{args.threads} thread(s)/process, load average {os.getloadavg()[0]:.1f}")
    print("| run | s/step | tokens/s |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds_per_step']:.4f} | {r['tokens_per_second']:.0f} |")
    print(f"largest relative loss difference over {args.steps} steps: {diff:.2e} "
          f"(final loss {ref_losses[-1]:.5f} vs {losses[-1]:.5f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "max_rel_loss_diff": diff,
                                               "losses_one_process": ref_losses, "losses_ranks": losses},
                                              indent=1))


if __name__ == "__main__":
    main()
