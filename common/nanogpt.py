"""nanoGPT data: ``train.bin``/``val.bin`` (flat uint16, no header) and ``meta.pkl``.

``import_nanogpt`` converts them into geotrain shards + manifest (``geotrain prepare --from-nanogpt``);
``nanogpt_tokenizer`` gives the tokenizer spec and vocab size that ``TokenData`` uses to read such
a directory in place. ``meta.pkl`` is read as plain data only (no code runs).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from geotrain.common.shards import (
    DEFAULT_SHARD_TOKENS,
    MANIFEST_VERSION,
    SPLITS,
    Manifest,
    ShardInfo,
    clear_out_dir,
    dtype_for_vocab,
    write_shard,
)
from geotrain.common.tokenizer import GPT2_FILE, CharTokenizer, ExternalTokenizer, GPT2Tokenizer


class _PlainUnpickler(pickle.Unpickler):
    """Unpickle plain data only (dict/list/str/int...): a meta.pkl cannot run code."""

    def find_class(self, module: str, name: str):  # noqa: D401
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}; only plain data is allowed")


def read_meta(src: Path) -> dict | None:
    path = src / "meta.pkl"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            meta = _PlainUnpickler(f).load()
    except Exception as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a dict, got {type(meta).__name__}")
    return meta


def nanogpt_tokenizer(src: Path, vocab_size: int | None) -> tuple[dict, int]:
    meta = read_meta(src)
    if meta is not None and "vocab_size" in meta:
        meta_vocab = int(meta["vocab_size"])
        if vocab_size is None:
            vocab_size = meta_vocab
        elif vocab_size < meta_vocab:
            raise ValueError(f"--vocab-size {vocab_size} is below meta.pkl's vocab_size {meta_vocab}")
    if vocab_size is None:
        raise ValueError(
            f"{src} has no meta.pkl with vocab_size: pass --vocab-size, or --tokenizer gpt2 for nanoGPT's GPT-2 data"
        )
    dtype_for_vocab(vocab_size)
    itos = meta.get("itos") if meta else None
    if isinstance(itos, dict) and itos:
        spec = CharTokenizer([itos[i] for i in range(len(itos))]).spec()
    else:
        note = "GPT-2 BPE (tiktoken 'gpt2')" if vocab_size in (50257, 50304) else "nanoGPT bins"
        spec = ExternalTokenizer(vocab_size, note).spec()
    return spec, vocab_size


def import_nanogpt(src: Path | str, out: Path | str, vocab_size: int | None = None,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, tokenizer: GPT2Tokenizer | None = None) -> Manifest:
    """Convert nanoGPT's ``train.bin``/``val.bin`` (flat uint16) into geotrain shards + manifest.

    ``vocab_size`` comes from ``meta.pkl`` when present (read as plain data only), else is required.
    ``tokenizer``: the GPT-2 tokenizer the bins were made with (nanoGPT's openwebtext): it fixes the
    vocabulary, is recorded in the manifest and saved beside the shards; a token id outside it, or
    a ``vocab_size`` / meta.pkl vocabulary that differs from it, is a ValueError.
    """
    src, out = Path(src), Path(out)
    train_bin = src / "train.bin"
    if not train_bin.is_file():
        raise ValueError(f"{train_bin} is missing: not a nanoGPT data directory")
    if tokenizer is None:
        spec, vocab = nanogpt_tokenizer(src, vocab_size)
    else:
        vocab = tokenizer.vocab_size
        meta = read_meta(src) or {}
        for what, other in (("vocab size", vocab_size), (f"{src}/meta.pkl vocab_size", meta.get("vocab_size"))):
            if other is not None and other != vocab:
                raise ValueError(f"{what} {other} does not match the {tokenizer.name} tokenizer's vocabulary ({vocab})")
        spec = tokenizer.spec()
    dtype = dtype_for_vocab(vocab)
    out.mkdir(parents=True, exist_ok=True)
    clear_out_dir(out)
    (out / GPT2_FILE).unlink(missing_ok=True)
    shards: list[ShardInfo] = []
    sources = []
    for split in SPLITS:
        path = src / f"{split}.bin"
        if not path.is_file():
            continue
        if path.stat().st_size % 2:
            raise ValueError(f"{path} has an odd number of bytes: not a uint16 token stream")
        sources.append(str(path))
        arr = np.memmap(path, dtype="<u2", mode="r") if path.stat().st_size else np.zeros(0, "<u2")
        for k, start in enumerate(range(0, len(arr), shard_tokens)):
            chunk = np.asarray(arr[start : start + shard_tokens])
            if chunk.size and int(chunk.max()) >= vocab:
                raise ValueError(f"{path} holds token id {int(chunk.max())} >= vocab size {vocab}"
                                 + (f" of the {tokenizer.name} tokenizer" if tokenizer is not None else ""))
            name = f"{split}_{k:06d}.bin"
            sha = write_shard(out / name, chunk, dtype)
            shards.append(ShardInfo(name, split, int(chunk.size), sha))
    if tokenizer is not None:
        tokenizer.save(out)
    manifest = Manifest(MANIFEST_VERSION, spec, vocab, dtype, shards, sources)
    manifest.save(out)
    return manifest
