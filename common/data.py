"""Token data: shard files, manifest, `prepare`, the embedded default corpus, and batch readers.

On-disk layout of a data directory::

    DIR/manifest.json        format version, tokenizer spec, vocab_size, dtype, shards, sources
    DIR/train_000000.bin     shard: 32-byte header + flat little-endian token stream
    DIR/val_000000.bin
    DIR/tokenizer.json       only for --tokenizer bpe

Shard header (little endian, 32 bytes): magic ``SHARD_MAGIC`` (8 bytes), format version (uint32),
dtype code (uint32: 1 = uint16, 2 = uint32), token count (uint64), 8 reserved zero bytes. Token ids
are uint16 when the vocabulary has at most 65,536 ids, else uint32. ``manifest.json`` records each
shard's token count and the sha256 of the whole file; readers verify both once when they open it.

Splits: with a single document (one plain text file) the validation split is its last
``val_fraction`` of tokens, as nanoGPT does. With several documents (files, or lines of a
``.jsonl``), whole documents go to validation: documents are ranked by a hash of their text and
taken in that order until at least ``val_fraction`` of all tokens are in validation (at least one
document, never all of them). The choice depends only on the texts, so it is deterministic.
Every document is followed by the tokenizer's end-of-text id.

Embedded default corpus: with no inputs, the text of the running Python's standard library
``.py`` files (no site-packages, test/, tests/, idlelib, lib2to3), sorted by path and capped at
``DEFAULT_CORPUS_BYTES`` (8 MiB) of text. ``default_data_dir()`` prepares it once into
``$GEOTRAIN_CACHE`` (default ``~/.cache/geotrain``) and reuses it; nothing is downloaded.

Readers memory-map shards. ``TokenData.get_batch`` draws windows from a numpy generator seeded by
(seed, split, step), so the same arguments give the same batch in any process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import shutil
import struct
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from geotrain.common.fsutil import fsync_dir
from geotrain.common.tokenizer import (
    BPE_FILE,
    MIN_BPE_VOCAB,
    ByteTokenizer,
    CharTokenizer,
    ExternalTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

if TYPE_CHECKING:  # torch is imported lazily: spawned encoders do not need it
    import torch

SHARD_MAGIC = b"GEOTOKS\x00"
SHARD_VERSION = 1
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_CORPUS_BYTES = 8 * 1024 * 1024  # 8 MiB of standard-library source text
# 8M tokens = 16 MB per shard at 2 bytes/token: a worker downloads a whole shard before it trains
# from it, which takes 6.4 s at 20 Mbit/s (bigger shards make a slow link's first wait longer).
DEFAULT_SHARD_TOKENS = 8_000_000
MAX_VAL_FRACTION = 0.5
SPAWN_MIN_BYTES = 32 << 20  # with workers=None, inputs below this are encoded in-process

_HEADER = struct.Struct("<8sIIQ8x")  # magic, version, dtype code, token count, reserved
HEADER_BYTES = _HEADER.size  # 32
_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "uint16": (1, np.dtype("<u2")),
    "uint32": (2, np.dtype("<u4")),
}
_CODE_TO_DTYPE = {code: name for name, (code, _) in _DTYPES.items()}
_SPLITS = ("train", "val")
_CORPUS_EXCLUDE_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def dtype_for_vocab(vocab_size: int) -> str:
    """``uint16`` for vocabularies of at most 65,536 ids, ``uint32`` up to 2**32, else ValueError."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise ValueError(f"vocab size must be a positive integer, got {vocab_size!r}")
    if vocab_size <= 2**16:
        return "uint16"
    if vocab_size <= 2**32:
        return "uint32"
    raise ValueError(f"vocab size {vocab_size} is too large: token ids must fit uint32 (at most 2**32 ids)")


def _np_dtype(dtype: str) -> np.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported token dtype {dtype!r}; use uint16 or uint32")
    return _DTYPES[dtype][1]


# --------------------------------------------------------------------------- shards


def write_shard(path: Path, tokens: np.ndarray, dtype: str) -> str:
    """Write ``tokens`` (1-D) as a shard file atomically; return the sha256 of the whole file."""
    path = Path(path)
    code, npdt = _DTYPES.get(dtype, (None, None))
    if code is None:
        raise ValueError(f"unsupported token dtype {dtype!r}; use uint16 or uint32")
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"shard {path}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size:
        if arr.dtype.kind not in "iu":
            raise ValueError(f"shard {path}: tokens must be integers, got {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > np.iinfo(npdt).max:
            raise ValueError(f"shard {path}: token ids {lo}..{hi} do not fit {dtype}")
    data = arr.astype(npdt, copy=False)
    header = _HEADER.pack(SHARD_MAGIC, SHARD_VERSION, code, int(arr.size))
    h = hashlib.sha256(header)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header)
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        step = 16 << 20
        for i in range(0, len(buf), step):
            f.write(buf[i : i + step])
            h.update(buf[i : i + step])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return h.hexdigest()


def shard_sha256(path: Path) -> str:
    """sha256 of the whole shard file (header included)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_shard(path: Path, expected: "ShardInfo | None" = None, verify_sha: bool = True) -> np.ndarray:
    """Open a shard as a read-only 1-D memmap after checking header, length and (optionally) sha256.

    Raises ValueError naming the file for a missing file, bad magic, unknown version or dtype, a
    length that disagrees with the header (truncated or padded), a token count that disagrees with
    ``expected``, or an sha256 mismatch (only when ``expected`` has one and ``verify_sha``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"shard {path} is missing")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        magic, version, code, count = _HEADER.unpack(f.read(HEADER_BYTES))
    if magic != SHARD_MAGIC:
        raise ValueError(f"shard {path} has bad magic {magic!r} (expected {SHARD_MAGIC!r}): not a geotrain shard")
    if version != SHARD_VERSION:
        raise ValueError(f"shard {path} has format version {version}; this geotrain reads version {SHARD_VERSION}")
    if code not in _CODE_TO_DTYPE:
        raise ValueError(f"shard {path} has unknown dtype code {code}")
    dtype = _CODE_TO_DTYPE[code]
    npdt = _DTYPES[dtype][1]
    want = HEADER_BYTES + count * npdt.itemsize
    if size != want:
        raise ValueError(
            f"shard {path} has wrong length: header says {count} {dtype} tokens ({want} bytes) "
            f"but the file has {size} bytes (truncated or corrupt)"
        )
    if expected is not None:
        if count != expected.tokens:
            raise ValueError(f"shard {path} holds {count} tokens but the manifest says {expected.tokens}")
        if verify_sha and expected.sha256:
            got = shard_sha256(path)
            if got != expected.sha256:
                raise ValueError(f"shard {path} sha256 mismatch: file {got}, manifest {expected.sha256} (corrupt)")
    if count == 0:
        return np.zeros(0, dtype=npdt)
    return np.memmap(path, dtype=npdt, mode="r", offset=HEADER_BYTES, shape=(count,))


# --------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    name: str
    split: str  # "train" | "val"
    tokens: int
    sha256: str


@dataclass
class Manifest:
    format_version: int
    tokenizer: dict
    vocab_size: int
    dtype: str
    shards: list[ShardInfo] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def split(self, split: str) -> list[ShardInfo]:
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("manifest must be a JSON object")
        need = ("format_version", "tokenizer", "vocab_size", "dtype", "shards", "sources")
        missing = [k for k in need if k not in raw]
        if missing:
            raise ValueError(f"manifest lacks {missing}")
        unknown = sorted(set(raw) - set(need))
        if unknown:
            raise ValueError(f"manifest has unknown keys {unknown}")
        if raw["format_version"] != MANIFEST_VERSION:
            raise ValueError(
                f"manifest format version {raw['format_version']!r}; this geotrain reads version {MANIFEST_VERSION}"
            )
        if not isinstance(raw["tokenizer"], dict) or "name" not in raw["tokenizer"]:
            raise ValueError("manifest tokenizer must be an object with a 'name'")
        vocab = raw["vocab_size"]
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
            raise ValueError(f"manifest vocab_size must be a positive integer, got {vocab!r}")
        _np_dtype(raw["dtype"])
        if dtype_for_vocab(vocab) == "uint32" and raw["dtype"] == "uint16":
            raise ValueError(f"manifest vocab_size {vocab} does not fit dtype uint16")
        if not isinstance(raw["shards"], list) or not isinstance(raw["sources"], list):
            raise ValueError("manifest shards and sources must be lists")
        shards = []
        seen = set()
        for i, s in enumerate(raw["shards"]):
            if not isinstance(s, dict) or set(s) != {"name", "split", "tokens", "sha256"}:
                raise ValueError(f"manifest shard #{i} must have exactly name, split, tokens, sha256: {s!r}")
            name = s["name"]
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"manifest shard #{i} has a bad file name {name!r}")
            if name in seen:
                raise ValueError(f"manifest lists shard {name!r} twice")
            seen.add(name)
            if s["split"] not in _SPLITS:
                raise ValueError(f"manifest shard {name!r} has unknown split {s['split']!r}")
            if not isinstance(s["tokens"], int) or s["tokens"] < 0:
                raise ValueError(f"manifest shard {name!r} has a bad token count {s['tokens']!r}")
            if not isinstance(s["sha256"], str):
                raise ValueError(f"manifest shard {name!r} has a bad sha256 {s['sha256']!r}")
            shards.append(ShardInfo(name=name, split=s["split"], tokens=s["tokens"], sha256=s["sha256"]))
        return cls(
            format_version=raw["format_version"],
            tokenizer=raw["tokenizer"],
            vocab_size=vocab,
            dtype=raw["dtype"],
            shards=shards,
            sources=[str(x) for x in raw["sources"]],
        )

    @classmethod
    def load(cls, data_dir: Path) -> "Manifest":
        path = Path(data_dir) / MANIFEST_NAME
        if not path.is_file():
            raise ValueError(
                f"{path} is missing: {data_dir} is not a prepared data directory "
                f"(run `geotrain prepare --out {data_dir} ...`)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from None
        try:
            return cls.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def save(self, data_dir: Path) -> None:
        data_dir = Path(data_dir)
        path = data_dir / MANIFEST_NAME
        tmp = data_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(data_dir)


# --------------------------------------------------------------------------- sources


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
    npdt = _np_dtype(state["dtype"])
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


def _clear_out_dir(out: Path) -> None:
    """Invalidate a previous preparation in ``out``: manifest first, then the shards it listed."""
    old = None
    if (out / MANIFEST_NAME).is_file():
        try:
            old = Manifest.load(out)
        except ValueError:
            old = None
        (out / MANIFEST_NAME).unlink()
    if old is not None:
        for s in old.shards:
            (out / s.name).unlink(missing_ok=True)


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
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    progress: bool = True,
    hf_dataset: str | None = None,
) -> Manifest:
    """Tokenize text files / directories / .jsonl (field ``text``) into shards + manifest in ``out``.

    No inputs (and no ``hf_dataset``): the embedded default corpus (``default_corpus_files()``).
    ``vocab_size``: for ``bpe`` the target vocabulary (>= 257); for ``byte`` an optional padded
    vocabulary size (>= 257, e.g. a multiple of 64). ``workers``: encoding processes, started with
    the ``spawn`` method (never fork); None means in-process below ``SPAWN_MIN_BYTES`` of input, else
    min(CPU count, 8). Returns the saved manifest.
    """
    t0 = time.monotonic()
    _check_prepare_args(val_fraction, shard_tokens, workers)
    if tokenizer not in ("byte", "bpe"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; use 'byte' or 'bpe'")
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
    _clear_out_dir(out)
    spool = Path(tempfile.mkdtemp(prefix=".spool-", dir=out))
    try:
        if hf_dataset:
            files = files + [_hf_dataset_to_jsonl(hf_dataset, spool / "hf_dataset.jsonl")]
        sources = [str(p) for p in files]
        if hf_dataset:
            sources[-1] = f"hf:{hf_dataset}"

        tok: Tokenizer
        if tokenizer == "bpe":
            target = vocab_size if vocab_size is not None else 4096
            texts = (t for p in files for t in _iter_documents(p, warn=False) if t)
            tok = train_bpe(texts, target, out / BPE_FILE)
            vocab = tok.vocab_size
        else:
            (out / BPE_FILE).unlink(missing_ok=True)
            tok = ByteTokenizer()
            vocab = max(tok.vocab_size, vocab_size or 0)
        dtype = dtype_for_vocab(vocab)
        npdt = _np_dtype(dtype)

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
                state = _encoder_state(*init_args)
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
        for split in _SPLITS:
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


# --------------------------------------------------------------------------- nanoGPT import


class _PlainUnpickler(pickle.Unpickler):
    """Unpickle plain data only (dict/list/str/int...): a meta.pkl cannot run code."""

    def find_class(self, module: str, name: str):  # noqa: D401
        raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}; only plain data is allowed")


def _read_meta(src: Path) -> dict | None:
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


def _nanogpt_tokenizer(src: Path, vocab_size: int | None) -> tuple[dict, int]:
    meta = _read_meta(src)
    if meta is not None and "vocab_size" in meta:
        meta_vocab = int(meta["vocab_size"])
        if vocab_size is None:
            vocab_size = meta_vocab
        elif vocab_size < meta_vocab:
            raise ValueError(f"--vocab-size {vocab_size} is below meta.pkl's vocab_size {meta_vocab}")
    if vocab_size is None:
        raise ValueError(f"{src} has no meta.pkl with vocab_size: pass --vocab-size (50304 for nanoGPT's GPT-2 data)")
    dtype_for_vocab(vocab_size)
    itos = meta.get("itos") if meta else None
    if isinstance(itos, dict) and itos:
        spec = CharTokenizer([itos[i] for i in range(len(itos))]).spec()
    else:
        note = "GPT-2 BPE (tiktoken 'gpt2')" if vocab_size in (50257, 50304) else "nanoGPT bins"
        spec = ExternalTokenizer(vocab_size, note).spec()
    return spec, vocab_size


def import_nanogpt(src: Path | str, out: Path | str, vocab_size: int | None = None,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Manifest:
    """Convert nanoGPT's ``train.bin``/``val.bin`` (flat uint16) into geotrain shards + manifest.

    ``vocab_size`` comes from ``meta.pkl`` when present (read as plain data only), else is required.
    """
    src, out = Path(src), Path(out)
    train_bin = src / "train.bin"
    if not train_bin.is_file():
        raise ValueError(f"{train_bin} is missing: not a nanoGPT data directory")
    spec, vocab = _nanogpt_tokenizer(src, vocab_size)
    dtype = dtype_for_vocab(vocab)
    out.mkdir(parents=True, exist_ok=True)
    _clear_out_dir(out)
    shards: list[ShardInfo] = []
    sources = []
    for split in _SPLITS:
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
                raise ValueError(f"{path} holds token id {int(chunk.max())} >= vocab size {vocab}")
            name = f"{split}_{k:06d}.bin"
            sha = write_shard(out / name, chunk, dtype)
            shards.append(ShardInfo(name, split, int(chunk.size), sha))
    manifest = Manifest(MANIFEST_VERSION, spec, vocab, dtype, shards, sources)
    manifest.save(out)
    return manifest


# --------------------------------------------------------------------------- default corpus


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(max_bytes: int | None = None) -> list[Path]:
    """The embedded default corpus: the standard library's ``.py`` files, sorted, capped at max_bytes.

    Skips site-packages, dist-packages, test/, tests/, idlelib, lib2to3 and __pycache__. Files are
    taken in sorted path order; a file that would push the total past ``max_bytes`` (default
    ``DEFAULT_CORPUS_BYTES``, 8 MiB) is skipped and later, smaller files may still fit.
    """
    cap = DEFAULT_CORPUS_BYTES if max_bytes is None else int(max_bytes)
    root = _stdlib_root()
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _CORPUS_EXCLUDE_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                try:
                    size = p.stat().st_size
                except OSError:
                    continue
                found.append((p.relative_to(root).as_posix(), p, size))
    found.sort()
    picked: list[Path] = []
    total = 0
    for _, p, size in found:
        if size == 0 or total + size > cap:
            continue
        picked.append(p)
        total += size
    return picked


def cache_root() -> Path:
    env = os.environ.get("GEOTRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "geotrain"


def _verified(data_dir: Path) -> bool:
    try:
        manifest = Manifest.load(data_dir)
        for s in manifest.shards:
            read_shard(data_dir / s.name, s, verify_sha=True)
    except (ValueError, OSError):
        return False
    return True


def default_data_dir(max_bytes: int | None = None) -> Path:
    """Prepare the embedded default corpus once (byte tokenizer) into the cache and return its path.

    The directory is named by Python version and a hash of the corpus file list. Preparation goes
    into a temporary directory that is renamed into place, so concurrent callers are safe: the loser
    of the race uses the winner's verified directory.
    """
    files = default_corpus_files(max_bytes)
    if not files:
        raise ValueError(f"the default corpus is empty (no .py files under {_stdlib_root()})")
    root = _stdlib_root()
    h = hashlib.sha256(f"geotrain-corpus v{SHARD_VERSION}/{MANIFEST_VERSION} byte\n".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{h.hexdigest()[:12]}"
    base = cache_root()
    target = base / name
    if _verified(target):
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=base))
    try:
        # in-process (workers=1): as fast for 8 MiB, and safe in scripts without a __main__ guard
        prepare(files, tmp, tokenizer="byte", val_fraction=0.1, workers=1, progress=True)
        for _ in range(3):
            try:
                os.rename(tmp, target)
                fsync_dir(base)
                return target
            except OSError:
                if _verified(target):  # another process finished first
                    return target
                if target.exists():  # a broken leftover: move it aside and retry
                    aside = Path(tempfile.mkdtemp(prefix=f".{name}.bad-", dir=base))
                    try:
                        os.rename(target, aside / "old")
                    except OSError:
                        pass
                    shutil.rmtree(aside, ignore_errors=True)
        raise ValueError(f"could not install the default corpus into {target}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """None or "" -> ``default_data_dir()``; else the path if it holds a manifest or nanoGPT bins."""
    if data_dir is None or str(data_dir) == "":
        return default_data_dir()
    p = Path(data_dir)
    if (p / MANIFEST_NAME).is_file() or (p / "train.bin").is_file():
        return p
    if not p.exists():
        raise ValueError(f"data directory {p} does not exist")
    raise ValueError(f"{p / MANIFEST_NAME} is missing: run `geotrain prepare --out {p} INPUT...` first")


# --------------------------------------------------------------------------- reader


class TokenData:
    """Memory-mapped token shards of one data directory, with deterministic batch sampling.

    A directory with nanoGPT's ``train.bin``/``val.bin`` and no manifest is read directly (uint16,
    no header, no checksum); its vocab size comes from ``meta.pkl``, else use
    ``geotrain prepare --from-nanogpt DIR --vocab-size N --out NEW``.
    """

    def __init__(self, data_dir: Path | str, verify: bool = True):
        self.data_dir = Path(data_dir)
        self._arrays: dict[str, np.ndarray] = {}
        if (self.data_dir / MANIFEST_NAME).is_file() or not (self.data_dir / "train.bin").is_file():
            self.manifest = Manifest.load(self.data_dir)
            for s in self.manifest.shards:
                self._arrays[s.name] = read_shard(self.data_dir / s.name, s, verify_sha=verify)
        else:
            spec, vocab = _nanogpt_tokenizer(self.data_dir, None)
            if vocab > 2**16:
                raise ValueError(f"{self.data_dir}: nanoGPT bins are uint16 but vocab_size is {vocab}")
            shards = []
            for split in _SPLITS:
                path = self.data_dir / f"{split}.bin"
                if path.is_file() and path.stat().st_size >= 2:
                    if path.stat().st_size % 2:
                        raise ValueError(f"{path} has an odd number of bytes: not a uint16 token stream")
                    arr = np.memmap(path, dtype="<u2", mode="r")
                    self._arrays[path.name] = arr
                    shards.append(ShardInfo(path.name, split, int(arr.size), ""))
            self.manifest = Manifest(MANIFEST_VERSION, spec, vocab, "uint16", shards, [str(self.data_dir)])
        self.vocab_size = self.manifest.vocab_size
        self._tokenizer: Tokenizer | None = None
        self._index: dict[str, tuple[list[str], np.ndarray]] = {}
        for split in _SPLITS:
            names = [s.name for s in self.manifest.split(split)]
            lens = np.asarray([len(self._arrays[n]) for n in names], dtype=np.int64)
            self._index[split] = (names, lens)

    def __repr__(self) -> str:
        return (f"TokenData({str(self.data_dir)!r}, vocab_size={self.vocab_size}, "
                f"train={self.num_tokens('train')}, val={self.num_tokens('val')})")

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.manifest.tokenizer, self.data_dir)
        return self._tokenizer

    def num_tokens(self, split: str) -> int:
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        return int(self._index[split][1].sum())

    def tokens(self, shard_name: str) -> np.ndarray:
        try:
            return self._arrays[shard_name]
        except KeyError:
            raise ValueError(f"{self.data_dir} has no shard {shard_name!r}") from None

    @staticmethod
    def _to_torch(x: np.ndarray, y: np.ndarray, device: "str | torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        dev = torch.device(device)
        if dev.type == "cuda":
            return xt.pin_memory().to(dev, non_blocking=True), yt.pin_memory().to(dev, non_blocking=True)
        if dev.type != "cpu":
            return xt.to(dev), yt.to(dev)
        return xt, yt

    def get_batch(self, split: str, batch_size: int, block_size: int, seed: int, step: int,
                  device: "str | torch.device" = "cpu") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Random windows (x, y int64, shape (B, T), y = x shifted by one), deterministic per
        (seed, split, step). Start positions are uniform over all windows of the split that fit
        inside one shard (so shards are weighted by length)."""
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        if batch_size <= 0 or block_size <= 0:
            raise ValueError(f"batch_size and block_size must be positive, got {batch_size}, {block_size}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        names, lens = self._index[split]
        counts = np.maximum(lens - block_size, 0)
        total = int(counts.sum())
        if total == 0:
            longest = int(lens.max()) if len(lens) else 0
            raise ValueError(
                f"{self.data_dir}: the {split} split has no window of {block_size + 1} tokens "
                f"(longest shard: {longest} tokens); use a smaller block_size or more data"
            )
        rng = np.random.default_rng([int(seed) % 2**64, _SPLITS.index(split), int(step)])
        idx = rng.integers(0, total, size=batch_size)
        ends = np.cumsum(counts)
        which = np.searchsorted(ends, idx, side="right")
        local = idx - (ends[which] - counts[which])
        buf = np.empty((batch_size, block_size + 1), dtype=np.int64)
        for b in range(batch_size):
            arr = self._arrays[names[which[b]]]
            s = int(local[b])
            buf[b] = arr[s : s + block_size + 1]
        return self._to_torch(np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:]), device)

    def get_range_batch(self, shard_name: str, start: int, batch_size: int, block_size: int,
                        device: "str | torch.device" = "cpu") -> tuple["torch.Tensor", "torch.Tensor"]:
        """x = tokens[start : start+B*T] as B rows of T, y = the same shifted by one token."""
        if batch_size <= 0 or block_size <= 0:
            raise ValueError(f"batch_size and block_size must be positive, got {batch_size}, {block_size}")
        arr = self.tokens(shard_name)
        need = batch_size * block_size + 1
        if start < 0 or start + need > len(arr):
            raise ValueError(
                f"range [{start}, {start + need}) leaves shard {shard_name} of {len(arr)} tokens "
                f"(needs B*T+1 = {need} tokens from start)"
            )
        buf = np.asarray(arr[start : start + need], dtype=np.int64)
        x = buf[:-1].reshape(batch_size, block_size)
        y = buf[1:].reshape(batch_size, block_size)
        return self._to_torch(np.ascontiguousarray(x), np.ascontiguousarray(y), device)


# --------------------------------------------------------------------------- leased ranges


def sequence_order(shard: str, shard_tokens: int, block_size: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an async run visits one shard's sequences in one epoch.

    A shard of n tokens holds S = (n - 1) // block_size sequence slots (slot s: inputs
    tokens[s*T : s*T + T], targets shifted by one). The ledger leases *positions* p (token offsets,
    multiples of T, in [0, S*T)); position p trains slot order[p // T]. The permutation is a pure
    function of (shard name, size, block size, seed, epoch), so coordinator and workers agree on it
    without sending it, and every slot is visited exactly once per epoch while each batch mixes
    sequences from all over the shard. Returns int64 (S,).
    """
    slots = (shard_tokens - 1) // block_size
    mix = (seed * 1_000_003 + epoch * 7919 + zlib.crc32(shard.encode())) % (2**63)
    return np.random.default_rng(mix).permutation(slots).astype(np.int64)


MAX_SEQUENCES_PER_REQUEST = 1 << 20


def order_rows(tokens: np.ndarray, order: np.ndarray, first: int, count: int, block_size: int) -> np.ndarray:
    """Entries first .. first+count-1 of a shard's visiting order as rows of block_size + 1 tokens
    (inputs plus the last target), in the shard's dtype: (count, T + 1). What a worker trains from
    before it has the whole shard (ShardRequest.sequences). ValueError for a range outside the order."""
    if count <= 0 or count > MAX_SEQUENCES_PER_REQUEST:
        raise ValueError(f"sequences must be in 1..{MAX_SEQUENCES_PER_REQUEST}, got {count}")
    if first < 0 or first + count > len(order):
        raise ValueError(f"slots {first}..{first + count} are outside the shard's {len(order)} sequences")
    slots = order[first : first + count]
    return np.asarray(tokens[slots[:, None] * block_size + np.arange(block_size + 1)[None, :]])


def gather_sequences(tokens: np.ndarray, slots: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of the given slots: two int64 arrays (len(slots), block_size)."""
    index = slots[:, None] * block_size + np.arange(block_size + 1)[None, :]  # (n, T + 1)
    rows = np.asarray(tokens[index], dtype=np.int64)
    return rows[:, :-1], rows[:, 1:]
