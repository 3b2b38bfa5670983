"""Shard files and ``manifest.json``: the on-disk format of a prepared data directory.

Layout::

    DIR/manifest.json        format version, tokenizer spec, vocab_size, dtype, shards, sources
    DIR/train_000000.bin     shard: 32-byte header + flat little-endian token stream
    DIR/val_000000.bin
    DIR/tokenizer.json       only for --tokenizer bpe

Shard header (little endian, 32 bytes): magic ``SHARD_MAGIC`` (8 bytes), format version (uint32),
dtype code (uint32: 1 = uint16, 2 = uint32), token count (uint64), 8 reserved zero bytes. Token ids
are uint16 when the vocabulary has at most 65,536 ids, else uint32. ``manifest.json`` records each
shard's token count and the sha256 of the whole file; readers verify both once when they open it.

Writers (common/prepare.py, common/nanogpt.py) call ``write_shard`` and ``Manifest.save``; readers
(common/reader.py, the worker's shard cache) call ``read_shard`` and ``Manifest.load``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geotrain.common.fsutil import file_sha256, fsync_dir

SHARD_MAGIC = b"GEOTOKS\x00"
SHARD_VERSION = 1
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
# 8M tokens = 16 MB per shard at 2 bytes/token: a worker downloads a whole shard before it trains
# from it, which takes 6.4 s at 20 Mbit/s (bigger shards make a slow link's first wait longer).
DEFAULT_SHARD_TOKENS = 8_000_000
_HEADER = struct.Struct("<8sIIQ8x")  # magic, version, dtype code, token count, reserved
HEADER_BYTES = _HEADER.size  # 32
_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "uint16": (1, np.dtype("<u2")),
    "uint32": (2, np.dtype("<u4")),
}
_CODE_TO_DTYPE = {code: name for name, (code, _) in _DTYPES.items()}
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> str:
    """``uint16`` for vocabularies of at most 65,536 ids, ``uint32`` up to 2**32, else ValueError."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise ValueError(f"vocab size must be a positive integer, got {vocab_size!r}")
    if vocab_size <= 2**16:
        return "uint16"
    if vocab_size <= 2**32:
        return "uint32"
    raise ValueError(f"vocab size {vocab_size} is too large: token ids must fit uint32 (at most 2**32 ids)")


def np_dtype(dtype: str) -> np.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported token dtype {dtype!r}; use uint16 or uint32")
    return _DTYPES[dtype][1]




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
    return file_sha256(path)


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
        if split not in SPLITS:
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
        np_dtype(raw["dtype"])
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
            if s["split"] not in SPLITS:
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




def clear_out_dir(out: Path) -> None:
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
