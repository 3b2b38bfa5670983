"""The reference single-process trainer (`geotrain train`), nanoGPT style.

AdamW with linear warmup then cosine decay to min_lr, gradient accumulation, gradient clipping,
periodic validation on fixed windows, atomic checkpoints and bit-exact resume. Training batches are
a pure function of (seed, step), so resuming model + optimizer + RNG state reproduces the
uninterrupted run exactly (same device, same thread count).

Outputs under OUT:
    config.json       the resolved RunConfig and ModelConfig
    history.jsonl     one line per evaluation: iter, tokens, seconds, train_loss, val_loss, lr
    summary.json      final figures (val_loss, train_loss, tokens, seconds, tokens_per_second, ...)
    checkpoints/      see common/checkpoint.py
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from geotrain.common.checkpoint import (
    atomic_write_bytes,
    capture_rng_state,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from geotrain.common.config import ModelConfig, OptimConfig, RunConfig
from geotrain.common.corpus import resolve_data_dir
from geotrain.common.reader import TokenData
from geotrain.common.hf import initial_model
from geotrain.common.model import GPT, autocast_context, resolve_device
from geotrain.common.step import Prefetcher, TrainStep

log = logging.getLogger("geotrain.train")

CHECKPOINT_SUBDIR = "checkpoints"
CHECKPOINT_KIND = "geotrain.train"
_EVAL_SEED = 0x5EED_E7A1  # fixed: every evaluation of every run sees the same windows


def eval_seed(train_seed: int) -> int:
    """The seed of evaluation batches: fixed, and never the training seed."""
    return _EVAL_SEED if train_seed != _EVAL_SEED else _EVAL_SEED + 1


def lr_at(step: int, optim: OptimConfig, max_iters: int) -> float:
    """Learning rate at `step`: linear warmup, cosine decay to min_lr at lr_decay_iters (default
    max_iters), min_lr afterwards."""
    warmup = optim.warmup_iters
    decay_iters = optim.lr_decay_iters if optim.lr_decay_iters is not None else max_iters
    if step < warmup:
        return optim.lr * (step + 1) / (warmup + 1)
    if step >= decay_iters or decay_iters <= warmup:
        return optim.min_lr
    ratio = (step - warmup) / (decay_iters - warmup)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    data: TokenData,
    eval_iters: int,
    batch_size: int,
    block_size: int,
    seed: int,
    device: torch.device | str,
    splits: tuple[str, ...] = ("train", "val"),
) -> dict[str, float]:
    """Mean loss over `eval_iters` deterministic batches per split (batch k = get_batch(seed, k))."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for split in splits:
            total = torch.zeros((), dtype=torch.float64, device=device)
            for k in range(eval_iters):
                x, y = data.get_batch(split, batch_size, block_size, seed=seed, step=k, device=device)
                with autocast_context(device):
                    _, loss = model(x, y)
                total += loss.double()
            out[split] = float(total.item() / eval_iters)  # one sync per split
    finally:
        model.train(was_training)
    return out


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _config_diff(a: dict, b: dict) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_model_config(saved: dict, current: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint made for another model shape, naming both configs."""
    if saved != current.to_dict():
        raise ValueError(
            f"checkpoint {where} was made for another model config: checkpoint {saved} vs requested "
            f"{current.to_dict()} (differs in {sorted(_config_diff(saved, current.to_dict()))}); "
            "use the same model flags or a fresh --out"
        )


def _rewrite_history(path: Path, before_iter: int) -> None:
    """Drop history lines at or after `before_iter` (they will be recomputed after a resume)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iter"] < before_iter:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a kill
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def _with_micro_batch(tc, micro_batch: int):
    """tc with micro_batch set (CPU default: one get_batch call's windows per forward)."""
    return dataclasses.replace(tc, micro_batch=micro_batch)


def train(
    run: RunConfig,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Train run.model on run.data with run.optim / run.train; returns the summary dict."""
    run.validate()
    tc, oc = run.train, run.optim
    echo = echo or (lambda msg: tqdm.write(msg, file=sys.stdout))
    out_dir = Path(out_dir)
    ckpt_root = out_dir / CHECKPOINT_SUBDIR

    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    data_dir = resolve_data_dir(run.data.dir or None)
    data = TokenData(data_dir)
    cfg, initial = initial_model(run.model, data.vocab_size, data.manifest.tokenizer.get("name", ""))
    for split in ("train", "val"):
        if data.num_tokens(split) <= cfg.block_size:
            raise ValueError(
                f"the {split} split of {data_dir} has {data.num_tokens(split)} tokens, fewer than "
                f"block_size + 1 = {cfg.block_size + 1}"
            )

    # ------------------------------------------------------------------ model, optimizer, resume
    torch.manual_seed(tc.seed)
    model = GPT(cfg)
    if initial is not None:  # --init-from: Hugging Face GPT-2 weights (common/hf.py)
        model.load_state_dict(initial)
    model = model.to(device)
    # one step = batch_size * grad_accum sequences, run as micro-batches (the memory plan's, or
    # train.micro_batch; default the batch_size windows of one get_batch call)
    B, T, A = tc.batch_size, cfg.block_size, tc.grad_accum
    step_train = tc if tc.micro_batch or device.type == "cuda" else _with_micro_batch(tc, B)
    step = TrainStep.for_run(model, cfg, oc, step_train, device, B * A)
    optimizer = step.optimizer
    start_iter = 0
    resumed_from: str | None = None
    if resume:
        found = load_latest_checkpoint(ckpt_root)
        if found is None:
            echo(f"no checkpoint under {ckpt_root}: starting from scratch")
        else:
            tensors, state, path = found
            check_model_config(state.get("model_config"), cfg, path)
            model.load_state_dict(tensors)
            optimizer.load_state_dict(state["optimizer"])
            restore_rng_state(state["rng"])
            start_iter = int(state["step"])
            resumed_from = str(path)
            diff = _config_diff(state.get("run", {}), run.to_dict())
            if diff:
                echo(f"note: run config changed since the checkpoint: {sorted(diff)}")
            echo(f"resumed from {path} at iter {start_iter}")
    elif list_checkpoints(ckpt_root):
        raise ValueError(
            f"{out_dir} already holds checkpoints from an earlier run; pass --resume to continue it "
            "or choose another --out"
        )

    n_params = model.num_params()
    echo(f"model: {n_params / 1e6:.2f}M parameters ({cfg.to_dict()}), device {device}, "
         f"{torch.get_num_threads()} threads, data {data_dir}")
    echo(step.plan.table(f"memory plan on {device}:"))

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_spec = data.tokenizer().spec()
    _write_json(out_dir / "config.json", {"run": run.to_dict(), "model": cfg.to_dict(),
                                          "data_dir": str(data_dir), "tokenizer": tokenizer_spec})
    history_path = out_dir / "history.jsonl"
    if start_iter > 0:
        _rewrite_history(history_path, start_iter)
    else:
        history_path.unlink(missing_ok=True)

    train_model = step.forward_model

    # ------------------------------------------------------------------ loop
    tokens_per_iter = B * T * A
    e_seed = eval_seed(tc.seed)

    def make_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the batch of iteration i: A windows sets of B, a pure function of (seed, i)
        parts = [data.get_batch("train", B, T, seed=tc.seed, step=i * A + k) for k in range(A)]
        if A == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # (A*B, T)

    def evaluate_now() -> dict[str, float]:
        return estimate_loss(train_model, data, tc.eval_iters, B, T, e_seed, device)

    def checkpoint(step: int) -> Path:
        state = {
            "kind": CHECKPOINT_KIND,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "rng": capture_rng_state(),
            "model_config": cfg.to_dict(),
            "tokenizer": tokenizer_spec,
            "data_dir": str(data_dir),
            "run": run.to_dict(),
        }
        return save_checkpoint(ckpt_root, step, model.state_dict(), state)

    t_start = time.perf_counter()
    train_seconds = 0.0  # optimizer steps only: no evaluation, no checkpointing
    losses: dict[str, float] = {}
    last_loss = float("nan")
    window_t, window_iters = time.perf_counter(), 0
    bar = tqdm(total=tc.max_iters, initial=start_iter, disable=None if progress else True,
               desc="train", unit="it", dynamic_ncols=True)
    it = start_iter
    batches = Prefetcher(make_batch, device, start=start_iter, depth=tc.prefetch) if tc.prefetch else None
    loss = torch.zeros(())
    try:
        while True:
            lr = lr_at(it, oc, tc.max_iters)
            if it % tc.eval_interval == 0 or it == tc.max_iters:
                losses = evaluate_now()
                entry = {"iter": it, "tokens": it * tokens_per_iter,
                         "seconds": round(time.perf_counter() - t_start, 3),
                         "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr}
                with open(history_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                echo(f"eval iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                window_t, window_iters = time.perf_counter(), 0
            if it >= tc.max_iters:
                break

            t0 = time.perf_counter()
            x, y = next(batches) if batches is not None else make_batch(it)
            loss = step(x, y, lr=lr).loss  # on the device: read at log intervals only
            it += 1
            window_iters += 1
            train_seconds += time.perf_counter() - t0
            bar.update(1)

            if it % tc.log_interval == 0 or it == tc.max_iters:
                last_loss = loss.item()  # the only per-step sync, every log_interval iters
                now = time.perf_counter()
                ms = (now - window_t) * 1000 / max(window_iters, 1)
                echo(f"iter {it}/{tc.max_iters}: loss {last_loss:.4f}, lr {lr:.2e}, {ms:.1f} ms/iter, "
                     f"{tokens_per_iter * 1000 / ms:,.0f} tok/s")
                bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                window_t, window_iters = now, 0
            if it % tc.checkpoint_interval == 0 and it < tc.max_iters:
                checkpoint(it)
                window_t, window_iters = time.perf_counter(), 0
    finally:
        bar.close()
        if batches is not None:
            batches.close()

    checkpoint(tc.max_iters)
    seconds = time.perf_counter() - t_start
    iters_done = tc.max_iters - start_iter
    summary = {
        "val_loss": losses["val"],
        "train_loss": losses["train"],
        "last_batch_loss": last_loss,
        "iters": tc.max_iters,
        "iters_this_run": iters_done,
        "tokens": tc.max_iters * tokens_per_iter,
        "seconds": round(seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": round(iters_done * tokens_per_iter / train_seconds, 1) if train_seconds else None,
        "wall_tokens_per_second": round(iters_done * tokens_per_iter / seconds, 1) if seconds else None,
        "ms_per_iter": round(train_seconds * 1000 / iters_done, 3) if iters_done else None,
        "params": n_params,
        "model": cfg.to_dict(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "resumed_from": resumed_from,
        "data_dir": str(data_dir),
        "micro_batch": step.micro_batch,
        "activation_checkpointing": step.plan.checkpointing,
        "optimizer_state": step.plan.optimizer_state,
    }
    _write_json(out_dir / "summary.json", summary)
    echo(f"done: val loss {summary['val_loss']:.4f}, train loss {summary['train_loss']:.4f}, "
         f"{summary['tokens_per_second']} tok/s, {seconds:.1f} s")
    return summary
