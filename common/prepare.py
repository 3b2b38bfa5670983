"""``prepare``: text files, directories and ``.jsonl`` -> token shards + manifest (common/shards.py).

Splits: with a single document (one plain text file) the validation split is its last
``val_fraction`` of tokens, as nanoGPT does. With several documents (files, or lines of a
``.jsonl``), whole documents go to validation: documents are ranked by a hash of their text and
taken in that order until at least ``val_fraction`` of all tokens are in validation (at least one
document, never all of them). The choice depends only on the texts, so it is deterministic.
Every document is followed by the tokenizer's end-of-text id.

Encoding runs one source file per job, in-process or in a pool of spawned processes (never fork),
each writing a spool file in the output directory; the spools are then cut into shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from geotrain.common.corpus import default_corpus_files
from geotrain.common.shards import (
    DEFAULT_SHARD_TOKENS,
    MANIFEST_VERSION,
    SPLITS,
    Manifest,
    ShardInfo,
    clear_out_dir,
    dtype_for_vocab,
    np_dtype,
    write_shard,
)
from geotrain.common.tokenizer import (
    BPE_FILE,
    GPT2_FILE,
    MIN_BPE_VOCAB,
    ByteTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    load_gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)

TOKENIZERS = ("byte", "bpe", "gpt2")

MAX_VAL_FRACTION = 0.5
SPAWN_MIN_BYTES = 32 << 20  # with workers=None, inputs below this are encoded in-process


def _expand_inputs(inputs: Sequence[Path | str], exclude: Path | None = None) -> list[Path]:
    """Files from INPUTs: files as given, directories recursively (sorted, hidden entries skipped).

    ``exclude`` (the output directory) is never descended into, so re-running
    ``prepare data/ --out data/tokens`` does not read its own shards back as text.
    """
    skip = exclude.resolve() if exclude is not None else None
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise ValueError(f"input {p} does not exist")
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(
                    d for d in dirnames
                    if not d.startswith(".") and d != "__pycache__" and (Path(dirpath) / d).resolve() != skip
                )
                for name in filenames:
                    if not name.startswith("."):
                        found.append(Path(dirpath) / name)
            found.sort(key=lambda q: q.relative_to(p).as_posix())
            if not found:
                raise ValueError(f"input directory {p} contains no files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"input {p} is not a regular file or directory")
    return files


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _iter_documents(path: Path, warn: bool = True) -> Iterator[str]:
    """Documents of one source: a .jsonl gives one per line (field ``text``), other files one each.

    Undecodable bytes become U+FFFD with one warning per file; a file that looks binary (a NUL byte
    in its first 8 KiB) is skipped with a warning.
    """
    data = path.read_bytes()
    if path.suffix.lower() != ".jsonl" and b"\x00" in data[:8192]:
        if warn:
            _warn(f"{path}: looks binary (NUL bytes), skipped")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if warn:
            _warn(f"{path}: invalid UTF-8 at byte {exc.start}; undecodable bytes replaced with U+FFFD")
        text = data.decode("utf-8", errors="replace")
    del data
    if path.suffix.lower() != ".jsonl":
        yield text
        return
    for lineno, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a string field 'text'")
        yield obj["text"]


_STATE: dict[str, Any] = {}


def _encoder_state(spec: dict, tok_dir: str | None, dtype: str, spool_dir: str, vocab_size: int) -> dict:
    return dict(
        tok=load_tokenizer(spec, Path(tok_dir) if tok_dir else None),
        dtype=dtype,
        spool=Path(spool_dir),
        vocab=vocab_size,
    )


def _init_encoder(*args) -> None:
    """Pool initializer (in a spawned process): build the encoder state once."""
    _STATE.clear()
    _STATE.update(_encoder_state(*args))


def _encode_job(job: tuple[int, str]) -> tuple[int, list[int], list[str]]:
    return _encode_with(_STATE, job)


def _encode_with(state: dict, job: tuple[int, str]) -> tuple[int, list[int], list[str]]:
    """Encode one source into spool file NNNNNN.bin; return (index, doc lengths, doc hashes)."""
    index, src = job
    tok: Tokenizer = state["tok"]
    npdt = np_dtype(state["dtype"])
    lens: list[int] = []
    hashes: list[str] = []
    eot = np.asarray([tok.eot_id], dtype=np.int64) if tok.eot_id >= 0 else None
    with open(state["spool"] / f"{index:06d}.bin", "wb") as f:
        for text in _iter_documents(Path(src)):
            if not text:
                continue
            ids = tok.encode_array(text)
            if ids.size == 0:
                continue
            if eot is not None:
                ids = np.concatenate([ids, eot])
            if int(ids.max()) >= state["vocab"] or int(ids.min()) < 0:
                raise ValueError(f"{src}: tokenizer produced ids outside the vocabulary")
            f.write(ids.astype(npdt).tobytes())
            lens.append(int(ids.size))
            hashes.append(hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=16).hexdigest())
    return index, lens, hashes


def _check_prepare_args(val_fraction: float, shard_tokens: int, workers: int | None) -> None:
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction <= MAX_VAL_FRACTION:
        raise ValueError(f"val fraction must be in [0, {MAX_VAL_FRACTION}], got {val_fraction!r}")
    if not isinstance(shard_tokens, int) or shard_tokens <= 0:
        raise ValueError(f"shard tokens must be a positive integer, got {shard_tokens!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")


def _hf_dataset_to_jsonl(spec: str, dest: Path) -> Path:
    """Write a Hugging Face dataset's ``text`` column to ``dest`` (jsonl). ``spec`` is NAME[:SPLIT]."""
    try:
        import datasets  # type: ignore
    except ImportError:
        raise ValueError("--hf-dataset needs the 'datasets' package: pip install 'geotrain[hf]'") from None
    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        if Path(name).is_file() and Path(name).suffix.lower() in (".json", ".jsonl"):
            ds = datasets.load_dataset("json", data_files=name, split=split)
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types
        raise ValueError(f"cannot load Hugging Face dataset {spec!r}: {exc}") from None
    if "text" not in ds.column_names:
        raise ValueError(f"Hugging Face dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    with open(dest, "w", encoding="utf-8") as f:
        for row in ds:
            f.write(json.dumps({"text": row["text"] or ""}) + "\n")
    return dest


def prepare(
    inputs: Sequence[Path | str],
    out: Path | str,
    tokenizer: str | Tokenizer = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    progress: bool = True,
    hf_dataset: str | None = None,
    tokenizer_file: Path | str | None = None,
) -> Manifest:
    """Tokenize text files / directories / .jsonl (field ``text``) into shards + manifest in ``out``.

    No inputs (and no ``hf_dataset``): the embedded default corpus (``default_corpus_files()``).
    ``vocab_size``: for ``bpe`` the target vocabulary (>= 257); for ``byte`` an optional padded
    vocabulary size (>= 257, e.g. a multiple of 64); for ``gpt2`` None (the BPE fixes it).
    ``tokenizer``: a name in ``TOKENIZERS`` or a ``GPT2Tokenizer`` (any tiktoken Encoding, e.g. one
    built from local merges); ``gpt2`` reads its rank table from ``tokenizer_file`` (a .tiktoken
    file, GPT-2's vocab.bpe + encoder.json, or a directory of them) or tiktoken's cache, and saves
    it as ``out/gpt2.tiktoken``. ``workers``: encoding processes, started with
    the ``spawn`` method (never fork); None means in-process below ``SPAWN_MIN_BYTES`` of input, else
    min(CPU count, 8). Returns the saved manifest.
    """
    t0 = time.monotonic()
    _check_prepare_args(val_fraction, shard_tokens, workers)
    given: GPT2Tokenizer | None = None
    if isinstance(tokenizer, GPT2Tokenizer):
        given = tokenizer
    elif isinstance(tokenizer, Tokenizer) or tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; use one of {', '.join(TOKENIZERS)} or a GPT2Tokenizer")
    if tokenizer_file is not None and tokenizer != "gpt2":
        raise ValueError(f"a tokenizer file ({tokenizer_file}) only applies to the gpt2 tokenizer")
    if given is not None or tokenizer == "gpt2":
        if vocab_size is not None:
            raise ValueError(f"the gpt2 tokenizer fixes the vocabulary; give no vocab size (got {vocab_size})")
        if given is None:  # before any output is touched: a missing rank table fails here
            given = load_gpt2_tokenizer(tokenizer_file)
    if vocab_size is not None:
        if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
            raise ValueError(
                f"vocab size must be at least {MIN_BPE_VOCAB} (256 bytes + end-of-text), got {vocab_size!r}"
            )
        dtype_for_vocab(vocab_size)  # > 2**32 raises
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")

    files = _expand_inputs(inputs, exclude=out) if inputs else ([] if hf_dataset else default_corpus_files())
    if not files and not hf_dataset:
        raise ValueError("no input files (and the default corpus is empty)")
    out.mkdir(parents=True, exist_ok=True)
    clear_out_dir(out)
    spool = Path(tempfile.mkdtemp(prefix=".spool-", dir=out))
    try:
        if hf_dataset:
            files = files + [_hf_dataset_to_jsonl(hf_dataset, spool / "hf_dataset.jsonl")]
        sources = [str(p) for p in files]
        if hf_dataset:
            sources[-1] = f"hf:{hf_dataset}"

        tok: Tokenizer
        for stale in (BPE_FILE, GPT2_FILE):
            (out / stale).unlink(missing_ok=True)
        if given is not None:
            tok = given
            tok.save(out)  # the encoders (and later sampling) load it from here
            vocab = tok.vocab_size
        elif tokenizer == "bpe":
            target = vocab_size if vocab_size is not None else 4096
            texts = (t for p in files for t in _iter_documents(p, warn=False) if t)
            tok = train_bpe(texts, target, out / BPE_FILE)
            vocab = tok.vocab_size
        else:
            tok = ByteTokenizer()
            vocab = max(tok.vocab_size, vocab_size or 0)
        dtype = dtype_for_vocab(vocab)
        npdt = np_dtype(dtype)

        jobs = [(i, str(p)) for i, p in enumerate(files)]
        if workers is None:  # spawning costs ~0.5 s a process: only worth it for larger inputs
            small = sum(p.stat().st_size for p in files) < SPAWN_MIN_BYTES
            n_workers = 1 if small else min(os.cpu_count() or 1, 8)
        else:
            n_workers = workers
        n_workers = max(1, min(n_workers, len(jobs)))
        init_args = (tok.spec(), str(out), dtype, str(spool), vocab)
        results: list[tuple[int, list[int], list[str]]] = []
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="file", desc="tokenizing", disable=None if progress else True)
        try:
            if n_workers == 1:
                state = dict(tok=tok, dtype=dtype, spool=spool, vocab=vocab)  # as _encoder_state builds it
                for job in jobs:
                    results.append(_encode_with(state, job))
                    bar.update(1)
            else:
                ctx = multiprocessing.get_context("spawn")
                with ctx.Pool(n_workers, initializer=_init_encoder, initargs=init_args) as pool:
                    for res in pool.imap(_encode_job, jobs, chunksize=4):
                        results.append(res)
                        bar.update(1)
        finally:
            bar.close()

        # documents: (spool index, offset, length, hash)
        docs: list[tuple[int, int, int, str]] = []
        for index, lens, hashes in results:
            off = 0
            for n, h in zip(lens, hashes):
                docs.append((index, off, n, h))
                off += n
        total = sum(d[2] for d in docs)
        if total == 0:
            raise ValueError(f"no text in the inputs (zero tokens): {', '.join(sources[:5])}"
                             + (" ..." if len(sources) > 5 else ""))

        segments: dict[str, list[tuple[int, int, int]]] = {"train": [], "val": []}
        if len(docs) == 1:
            index, off, n, _ = docs[0]
            cut = int(n * (1.0 - val_fraction))
            segments["train"].append((index, off, cut))
            if n - cut > 0:
                segments["val"].append((index, off + cut, n - cut))
        else:
            val_ids: set[int] = set()
            if val_fraction > 0:
                target = val_fraction * total
                got = 0
                for i in sorted(range(len(docs)), key=lambda i: (docs[i][3], i)):
                    if got >= target or len(val_ids) >= len(docs) - 1:
                        break
                    val_ids.add(i)
                    got += docs[i][2]
            for i, (index, off, n, _) in enumerate(docs):
                segments["val" if i in val_ids else "train"].append((index, off, n))
        if not segments["train"] or sum(s[2] for s in segments["train"]) == 0:
            raise ValueError("the training split would be empty; lower --val-fraction or add text")

        spools: dict[int, np.ndarray] = {}

        def spool_array(index: int) -> np.ndarray:
            if index not in spools:
                spools[index] = np.memmap(spool / f"{index:06d}.bin", dtype=npdt, mode="r")
            return spools[index]

        shards: list[ShardInfo] = []
        for split in SPLITS:
            remaining = sum(s[2] for s in segments[split])
            k = 0
            buf = np.empty(min(shard_tokens, remaining), dtype=npdt) if remaining else None
            fill = 0

            def flush() -> None:
                nonlocal k, fill
                name = f"{split}_{k:06d}.bin"
                sha = write_shard(out / name, buf[:fill], dtype)
                shards.append(ShardInfo(name=name, split=split, tokens=fill, sha256=sha))
                k += 1
                fill = 0

            for index, off, n in segments[split]:
                src = spool_array(index)
                pos = off
                end = off + n
                while pos < end:
                    take = min(end - pos, len(buf) - fill)
                    buf[fill : fill + take] = src[pos : pos + take]
                    fill += take
                    pos += take
                    if fill == len(buf):
                        flush()
            if fill:
                flush()
        spools.clear()

        manifest = Manifest(
            format_version=MANIFEST_VERSION,
            tokenizer=tok.spec(),
            vocab_size=vocab,
            dtype=dtype,
            shards=shards,
            sources=sources,
        )
        manifest.save(out)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    if progress:
        n_tr = sum(s.tokens for s in manifest.split("train"))
        n_va = sum(s.tokens for s in manifest.split("val"))
        print(
            f"prepared {out}: {len(files)} sources, {n_tr:,} train + {n_va:,} val tokens, "
            f"{len(shards)} shards, vocab {vocab} ({dtype}), {time.monotonic() - t0:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    return manifest
