"""Sampling and evaluation of a trained checkpoint (`geotrain sample`, `geotrain eval`).

Works on any checkpoint written through common/checkpoint.py whose state holds a `model_config`
dict (the reference trainer's and the coordinator's); the tensors are a GPT state_dict.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from geotrain.common.checkpoint import load_checkpoint, resolve_checkpoint_dir
from geotrain.common.config import ModelConfig
from geotrain.common.corpus import resolve_data_dir
from geotrain.common.reader import TokenData
from geotrain.common.model import GPT, resolve_device
from geotrain.common.tokenizer import Tokenizer, load_tokenizer
from geotrain.common.train import estimate_loss, eval_seed


def _load(path: Path | str, device: torch.device | str = "cpu") -> tuple[GPT, ModelConfig, dict | None, dict, Path]:
    ckpt = resolve_checkpoint_dir(Path(path))
    tensors, state = load_checkpoint(ckpt)
    saved = state.get("model_config")
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {ckpt} holds no model_config in its state; cannot rebuild the model")
    try:
        cfg = ModelConfig(**saved).validate()
    except TypeError as exc:
        raise ValueError(f"checkpoint {ckpt}: model_config {saved} does not fit ModelConfig: {exc}") from exc
    model = GPT(cfg)
    try:
        if any(name.startswith("model.") for name in tensors):
            _load_global_weights(model, tensors)  # a coordinator checkpoint
        else:
            model.load_state_dict(tensors)
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"checkpoint {ckpt}: tensors do not match model_config {saved}: {exc}") from exc
    model.to(device).eval()
    return model, cfg, state.get("tokenizer"), state, ckpt


def _load_global_weights(model: GPT, tensors: dict[str, torch.Tensor]) -> None:
    """A coordinator checkpoint holds the global weights as `model.<parameter name>` (tied weights
    once) beside its outer-optimizer state; copy them into `model`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[f"model.{name}"])


def load_model_from_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[GPT, ModelConfig, dict | None]:
    """(model in eval mode, its ModelConfig, the tokenizer spec stored with it or None).

    `path`: a ckpt-* directory, a checkpoint root (with `latest`) or a trainer out dir.
    """
    model, cfg, spec, _, _ = _load(path, device)
    return model, cfg, spec


def load_checkpoint_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[GPT, ModelConfig, dict, Path]:
    """(model in eval mode, its ModelConfig, the checkpoint's state dict, the resolved ckpt-* dir)."""
    model, cfg, _, state, ckpt = _load(path, device)
    return model, cfg, state, ckpt


def load_model_and_tokenizer(path: Path | str, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer]:
    """The model (eval mode) and the tokenizer it was trained with, from any geotrain checkpoint."""
    model, _, _, state, _ = _load(path, device)
    return model, checkpoint_tokenizer(state)


def check_same_tokenizer(a: dict | None, b: dict | None, a_name: str, b_name: str) -> None:
    """ValueError when two tokenizer specs (manifest["tokenizer"], a checkpoint's) name different
    tokenizers or vocabularies; a side that records none is not checked."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return
    keys = ("name", "vocab_size", "sha256")
    if any(a.get(k) != b.get(k) for k in keys if k in a and k in b):
        raise ValueError(
            f"{a_name} was trained with tokenizer {a.get('name')} (vocab {a.get('vocab_size')}) but {b_name} "
            f"is tokenized with {b.get('name')} (vocab {b.get('vocab_size')}): the token ids mean different things"
        )


def checkpoint_tokenizer(state: dict, data_dir: Path | str | None = None) -> Tokenizer:
    """The tokenizer a checkpoint was trained with (bpe needs its data dir: given or recorded)."""
    spec = state.get("tokenizer")
    if not isinstance(spec, dict):
        raise ValueError("the checkpoint records no tokenizer; cannot encode a prompt or decode samples")
    return load_tokenizer(spec, data_dir if data_dir is not None else state.get("data_dir"))


@torch.no_grad()
def sample_tokens(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
    num_samples: int = 1,
) -> torch.Tensor:
    """(num_samples, len(prompt_ids) + max_new_tokens) ids; deterministic per seed."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    device = next(model.parameters()).device
    vocab = model.config.n_token_ids  # padded ids (common/config.py) are neither read nor emitted
    bad = [i for i in prompt_ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the model's vocabulary (0..{vocab - 1})")
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        return model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    finally:
        model.train(was_training)


def sample(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
    num_samples: int = 1,
) -> list[str]:
    """Decoded continuations (without the prompt) of `prompt`; an empty prompt starts from the
    end-of-text token where the tokenizer has one."""
    if prompt:
        ids = tokenizer.encode(prompt)
    elif tokenizer.eot_id >= 0:
        ids = [tokenizer.eot_id]
    else:
        ids = tokenizer.encode("\n")
    out = sample_tokens(model, ids, max_new_tokens, temperature, top_k, seed, num_samples)
    return [tokenizer.decode(row[len(ids):].tolist()) for row in out]


def evaluate(
    model: GPT,
    data: TokenData,
    iters: int,
    batch_size: int,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Validation loss and perplexity over `iters` fixed batches of the val split."""
    if iters <= 0 or batch_size <= 0:
        raise ValueError(f"iters and batch_size must be positive, got {iters}, {batch_size}")
    cfg = model.config
    if data.vocab_size > cfg.n_token_ids:
        raise ValueError(
            f"data {data.data_dir} has vocab_size {data.vocab_size} but the model only {cfg.n_token_ids}"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seed = eval_seed(0) if seed is None else seed
    losses = estimate_loss(model, data, iters, batch_size, cfg.block_size, seed, device, splits=("val",))
    val = losses["val"]
    return {
        "val_loss": val,
        "perplexity": math.exp(val) if val < 700 else float("inf"),
        "iters": iters,
        "batch_size": batch_size,
        "block_size": cfg.block_size,
        "tokens": iters * batch_size * cfg.block_size,
        "seed": seed,
    }


def evaluate_checkpoint(
    path: Path | str, data_dir: Path | str | None = None, iters: int = 200, batch_size: int = 12,
    seed: int | None = None, device: str = "auto",
) -> dict[str, Any]:
    """evaluate() on a checkpoint; the data defaults to the directory recorded in the checkpoint."""
    dev = resolve_device(device)
    model, _, _, state, ckpt = _load(path, dev)
    if data_dir is None:
        data_dir = state.get("data_dir") or None
        if data_dir is not None and not Path(data_dir).exists():
            raise ValueError(f"the checkpoint's data directory {data_dir} is gone; pass --data")
    data = TokenData(resolve_data_dir(data_dir))
    check_same_tokenizer(state.get("tokenizer"), data.manifest.tokenizer, f"checkpoint {ckpt}", f"data {data.data_dir}")
    result = evaluate(model, data, iters, batch_size, seed, dev)
    result.update(checkpoint=str(ckpt), step=state.get("step"), data_dir=str(data.data_dir))
    return result


def sample_checkpoint(
    path: Path | str, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
    top_k: int | None = 200, seed: int = 1337, num_samples: int = 1, device: str = "auto",
) -> list[str]:
    dev = resolve_device(device)
    model, cfg, _, state, ckpt = _load(path, dev)
    tokenizer = checkpoint_tokenizer(state)
    if tokenizer.vocab_size > cfg.n_token_ids:
        raise ValueError(f"checkpoint {ckpt}: its tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but "
                         f"the model only {cfg.n_token_ids}")
    return sample(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed, num_samples)
