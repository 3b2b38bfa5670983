"""HellaSwag: multiple-choice sentence completion, scored as GPT From Scratch and llm.c do.

Each example has a context and (usually 4) endings, one correct. Every ending is appended to the
context (with a leading space, as the dataset's text reads) and the model's cross-entropy is
summed over the ending's tokens only:

    acc       the ending with the lowest summed loss is the prediction
    acc_norm  the ending with the lowest mean loss per token (completion-normalised likelihood)

GPT-2 124M scores acc_norm 0.2955 on the 10,042 validation examples this way (llm.c). A row longer
than the model's block_size keeps its last block_size tokens (the ending, the end of the context).

The file is jsonl in the dataset's format: one object per line with "ctx" (str), "endings" (list
of str) and "label" (int, the index of the right ending); other fields are ignored. With no file
the public validation split is downloaded once into the geotrain cache.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from geotrain.common.model import autocast_context
from geotrain.common.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("geotrain.hellaswag")

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DOWNLOAD_TIMEOUT_SECONDS = 60.0  # per socket operation of the one download


@dataclass
class Example:
    ctx: str
    endings: list[str]
    label: int
    line: int  # 1-based line in the file


def read_examples(path: Path | str, limit: int | None = None) -> list[Example]:
    """Parse a HellaSwag jsonl file (blank lines skipped). ValueError naming the line of the first
    malformed row."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read HellaSwag file {path}: {exc}") from exc
    out: list[Example] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
        if not isinstance(ctx, str):
            raise ValueError(f"{where}: 'ctx' must be a string, got {ctx!r}")
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
            raise ValueError(f"{where}: 'endings' must be a list of at least 2 non-empty strings, got {endings!r}")
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
            raise ValueError(f"{where}: 'label' must be an integer in [0, {len(endings) - 1}], got {row.get('label')!r}")
        out.append(Example(ctx, endings, label, n))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"HellaSwag file {path} holds no examples")
    return out


def default_file() -> Path:
    """The validation split in the geotrain cache, downloaded on first use (with a deadline)."""
    from geotrain.common.corpus import cache_root

    path = cache_root() / "hellaswag" / "hellaswag_val.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", VAL_URL)
    try:
        with urllib.request.urlopen(VAL_URL, timeout=DOWNLOAD_TIMEOUT_SECONDS) as reply:
            data = reply.read()
    except OSError as exc:
        raise ValueError(f"cannot download HellaSwag from {VAL_URL} ({exc}); pass the jsonl file: --hellaswag FILE") from exc
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def scoring_tokenizer(spec: Any, data_dir: str | None = None) -> Tokenizer:
    """The tokenizer a checkpoint records. gpt2 goes through tiktoken (its BPE files are fetched
    once by tiktoken, or read from TIKTOKEN_CACHE_DIR) when common/tokenizer.py does not load it."""
    if not isinstance(spec, dict):
        raise ValueError("the checkpoint records no tokenizer; HellaSwag needs one to encode text")
    try:
        return load_tokenizer(spec, data_dir)
    except ValueError:
        if spec.get("name") != "gpt2":
            raise
    return _TiktokenGPT2()


class _TiktokenGPT2(Tokenizer):
    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self):
        try:
            import tiktoken
        except ImportError:
            raise ValueError("the gpt2 tokenizer needs tiktoken: pip install tiktoken") from None
        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as exc:  # tiktoken raises requests' errors when offline
            raise ValueError(f"tiktoken cannot load the gpt2 encoding ({exc}); set TIKTOKEN_CACHE_DIR") from exc

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))

    def spec(self) -> dict[str, Any]:
        return {"name": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id}


def example_rows(example: Example, tokenizer: Tokenizer, block_size: int) -> tuple[list[list[int]], list[int]]:
    """Token rows (context + ending, at most block_size + 1 tokens) and, per row, where its ending
    starts in the row. Rows longer than that keep their end."""
    ctx = tokenizer.encode(example.ctx)
    rows, starts = [], []
    for ending in example.endings:
        end = tokenizer.encode(" " + ending)
        row = ctx + end
        cut = max(0, len(row) - (block_size + 1))
        rows.append(row[cut:])
        starts.append(max(1, len(ctx) - cut))  # the first token is never predicted
    return rows, starts


@torch.no_grad()
def score_batch(model: torch.nn.Module, batch: list[tuple[list[list[int]], list[int]]], device: torch.device) -> list[tuple[Any, Any]]:
    """(summed loss per ending, mean loss per ending) for each example of the batch, as lists."""
    rows = [r for rs, _ in batch for r in rs]
    starts = [s for _, ss in batch for s in ss]
    T = max(len(r) for r in rows) - 1
    R = len(rows)
    x = torch.zeros((R, T), dtype=torch.long)
    y = torch.full((R, T), -1, dtype=torch.long)
    mask = torch.zeros((R, T), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):
        n = len(row) - 1
        x[i, :n] = torch.tensor(row[:-1])
        y[i, :n] = torch.tensor(row[1:])
        mask[i, start - 1 : n] = True  # predictions of the ending's tokens
    x, y, mask = x.to(device), y.to(device), mask.to(device)
    with autocast_context(device):
        logits, _ = model(x, y)  # (R, T, V)
    losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view(R, T)
    losses = losses * mask
    summed = losses.sum(dim=1)  # (R,)
    mean = summed / mask.sum(dim=1).clamp(min=1)
    out, i = [], 0
    for rs, _ in batch:
        k = len(rs)
        out.append((summed[i : i + k].tolist(), mean[i : i + k].tolist()))
        i += k
    return out


def evaluate_hellaswag(
    model: torch.nn.Module, tokenizer: Tokenizer, examples: Iterable[Example], batch_size: int = 4,
    device: torch.device | str = "cpu", progress: bool = True,
) -> dict[str, Any]:
    """acc and acc_norm of `model` (a geotrain GPT) on `examples`, batch_size examples per forward."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    examples = list(examples)
    device = torch.device(device)
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab}")
    block = model.config.block_size
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    bar = tqdm(total=len(examples), disable=None if progress else True, desc="hellaswag", unit="ex", dynamic_ncols=True)
    try:
        for b in range(0, len(examples), batch_size):
            chunk = examples[b : b + batch_size]
            scores = score_batch(model, [example_rows(e, tokenizer, block) for e in chunk], device)
            for ex, (summed, mean) in zip(chunk, scores):
                correct += int(min(range(len(summed)), key=summed.__getitem__) == ex.label)
                correct_norm += int(min(range(len(mean)), key=mean.__getitem__) == ex.label)
            bar.update(len(chunk))
            bar.set_postfix(acc_norm=f"{correct_norm / (b + len(chunk)):.4f}", refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    n = len(examples)
    return {"examples": n, "acc": correct / n, "acc_norm": correct_norm / n, "correct": correct,
            "correct_norm": correct_norm}


def evaluate_checkpoint_hellaswag(
    checkpoint: Path | str, file: Path | str | None = None, limit: int | None = None, batch_size: int = 4,
    device: str = "auto", progress: bool = True,
) -> dict[str, Any]:
    """`geotrain eval --hellaswag [FILE]`: HellaSwag of a checkpoint with its own tokenizer."""
    from geotrain.common.model import resolve_device
    from geotrain.common.sampling import load_checkpoint_model

    dev = resolve_device(device)
    path = Path(file) if file else default_file()
    examples = read_examples(path, limit)
    model, _, state, ckpt = load_checkpoint_model(checkpoint, dev)
    tokenizer = scoring_tokenizer(state.get("tokenizer"), state.get("data_dir"))
    result = evaluate_hellaswag(model, tokenizer, examples, batch_size, dev, progress)
    result.update(checkpoint=str(ckpt), step=state.get("step", state.get("version")), file=str(path),
                  tokenizer=tokenizer.name)
    return result
