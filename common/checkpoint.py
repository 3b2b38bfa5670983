"""Crash-safe checkpoints: a directory per step, verified by sha256, committed by a `latest` pointer.

Layout under a checkpoint root::

    root/
      ckpt-00000250/
        model.safetensors   tensors (shared/tied storage saved once, restored on load)
        state.pt            torch.save of a weights_only-loadable dict (optimizer, step, RNG, ...)
        meta.json           {"step": 250, "files": {"model.safetensors": sha256, "state.pt": sha256}}
      ckpt-00000500/
      latest                {"name": "ckpt-00000500", "sha256": sha256 of meta.json, "step": 500}

A checkpoint is written into a temporary directory (every file fsynced), renamed into place, and
only then is `latest` replaced atomically. A crash at any point leaves the previous checkpoint and
`latest` intact. Loading verifies every file; if `latest` or its target is damaged, the newest
older checkpoint that verifies is used instead, with a warning.

Nothing here knows about models: the trainer and the coordinator both store plain tensor dicts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from geotrain.common.fsutil import fsync_dir

log = logging.getLogger("geotrain.checkpoint")

TENSORS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})$")
_ALIASES_KEY = "geotrain.aliases"  # safetensors metadata: JSON {dropped name: kept name}


# --------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: temp file in the same dir, fsync, rename, fsync dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device) and python `random` state, loadable with weights_only.

    The python state is converted to lists; numpy's legacy global RNG is deliberately not captured
    (its state holds an ndarray that `torch.load(weights_only=True)` refuses) - use a seeded
    `np.random.Generator` and store `gen.bit_generator.state` if you need numpy randomness.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state (missing parts are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


# --------------------------------------------------------------------------- tensors <-> bytes


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_WRITE_BYTES = 64 << 20  # largest slice of a tensor handed to one write() call


def _tensors_to_write(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors a file stores and its metadata. Exact aliases (tied weights) are stored once and
    named in the metadata; any other storage sharing is broken with a contiguous clone."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0:
            seen[key] = name
            if ptr in storages:  # overlaps another tensor without being an exact alias
                t = t.clone()
            storages.add(ptr)
        out[name] = t.contiguous()
    metadata = {_ALIASES_KEY: json.dumps(aliases, sort_keys=True)} if aliases else None
    return out, metadata


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write `tensors` as a safetensors file at `path` (fsynced) one slice at a time, without a copy
    of the set in memory (what safetensors.torch.save would build); returns the file's sha256."""
    out, metadata = _tensors_to_write(tensors)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(out):
        t = out[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"checkpoint tensor {name!r} has dtype {t.dtype}, which safetensors files do not hold")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for part in (len(raw).to_bytes(8, "little"), raw):
            fh.write(part)
            digest.update(part)
        for name in sorted(out):
            flat = out[name].reshape(-1)
            if flat.numel() == 0:
                continue
            data = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
            step = _WRITE_BYTES
            for start in range(0, data.numel(), step):
                part = memoryview(data[start : start + step].numpy())
                fh.write(part)
                digest.update(part)
        fh.flush()
        os.fsync(fh.fileno())
    return digest.hexdigest()


def _tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    tensors = safetensors.torch.load(data)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    aliases = json.loads(header.get("__metadata__", {}).get(_ALIASES_KEY, "{}"))
    for dropped, kept in aliases.items():
        tensors[dropped] = tensors[kept]  # same tensor object: tying is restored
    return tensors


# --------------------------------------------------------------------------- save


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ckpt-* directory under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(
    root: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 3
) -> Path:
    """Write root/ckpt-{step:08d} and point root/latest at it; keep the newest `keep` checkpoints.

    `state` must hold only what `torch.load(weights_only=True)` accepts (tensors, numbers, strings,
    lists, tuples, dicts, None). Any error (disk full, ...) propagates; the previous checkpoint and
    `latest` are then untouched.
    """
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        files = {TENSORS_FILE: _write_safetensors(tmp / TENSORS_FILE, tensors)}
        blobs = {}
        buf = io.BytesIO()
        torch.save(state, buf)
        blobs[STATE_FILE] = buf.getvalue()
        try:  # refuse now what could never be resumed from
            torch.load(io.BytesIO(blobs[STATE_FILE]), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"checkpoint state is not loadable with weights_only=True: {exc}") from exc
        for fname, blob in blobs.items():
            atomic_write_bytes(tmp / fname, blob)
            files[fname] = sha256_bytes(blob)
        meta = json.dumps({"step": step, "files": files, "created": time.time()}, indent=1).encode()
        atomic_write_bytes(tmp / META_FILE, meta)
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): move the old one aside
            trash = root / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = {"name": name, "sha256": sha256_bytes(meta), "step": step}
    atomic_write_bytes(root / LATEST_FILE, json.dumps(pointer).encode())  # the commit point
    _prune(root, keep, current=final)
    return final


def _prune(root: Path, keep: int, current: Path) -> None:
    if keep <= 0:
        return
    ckpts = list_checkpoints(root)
    kept = {p for _, p in ckpts[-keep:]} | {current}
    for _, p in ckpts:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-ckpt-*"):  # leftovers of crashed writers (not ours: ours is renamed)
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- load


def load_checkpoint(path: Path, expect_meta_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load one checkpoint directory after verifying the sha256 of every file.

    Raises ValueError naming the file that is missing or does not match.
    """
    path = Path(path)
    meta_path = path / META_FILE
    try:
        meta_bytes = meta_path.read_bytes()
    except OSError as exc:
        raise ValueError(f"checkpoint file {meta_path} is missing or unreadable: {exc}") from exc
    if expect_meta_sha256 is not None and sha256_bytes(meta_bytes) != expect_meta_sha256:
        raise ValueError(f"checkpoint file {meta_path} does not match the sha256 recorded in latest")
    try:
        meta = json.loads(meta_bytes)
        files = dict(meta["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"checkpoint file {meta_path} is corrupt: {exc}") from exc
    for required in (TENSORS_FILE, STATE_FILE):
        if required not in files:
            raise ValueError(f"checkpoint {path}: {meta_path} lists no {required}")
    blobs = {}
    for fname, digest in files.items():
        fpath = path / fname
        try:
            blob = fpath.read_bytes()
        except OSError as exc:
            raise ValueError(f"checkpoint file {fpath} is missing or unreadable: {exc}") from exc
        if sha256_bytes(blob) != digest:
            raise ValueError(f"checkpoint file {fpath} is corrupt (sha256 mismatch)")
        blobs[fname] = blob
    try:
        tensors = _tensors_from_bytes(blobs[TENSORS_FILE])
    except Exception as exc:
        raise ValueError(f"checkpoint file {path / TENSORS_FILE} cannot be read: {exc}") from exc
    try:
        state = torch.load(io.BytesIO(blobs[STATE_FILE]), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint file {path / STATE_FILE} cannot be loaded: {exc}") from exc
    return tensors, state


def load_latest_checkpoint(root: Path) -> tuple[dict[str, torch.Tensor], dict, Path] | None:
    """Load what root/latest points to; if that fails, the newest older checkpoint that verifies.

    Returns None when root holds no checkpoint at all; raises ValueError when checkpoints exist
    but none of them verifies (resuming from scratch silently would lose the run).
    """
    root = Path(root)
    ckpts = list_checkpoints(root)
    latest_path = root / LATEST_FILE
    limit: int | None = None  # fall back only to checkpoints older than the one latest names
    tried: set[Path] = set()
    if latest_path.exists():
        target: Path | None = None
        try:
            pointer = json.loads(latest_path.read_bytes())
            name, digest = str(pointer["name"]), str(pointer["sha256"])
            m = _CKPT_RE.match(name)
            if not m:
                raise ValueError(f"bad checkpoint name {name!r}")
            limit = int(m.group(1))
            target = root / name
            tried.add(target)
            tensors, state = load_checkpoint(target, expect_meta_sha256=digest)
            return tensors, state, target
        except Exception as exc:  # corrupt pointer or corrupt target: fall back below
            what = target if target is not None else latest_path
            log.warning("checkpoint %s is unusable (%s); falling back to an older one", what, exc)
    elif ckpts:
        log.warning("%s is missing; using the newest checkpoint in %s that verifies", latest_path, root)
    if not ckpts:
        if latest_path.exists():
            raise ValueError(f"{latest_path} exists but {root} holds no checkpoint directory")
        return None
    for step, path in reversed(ckpts):
        if path in tried or (limit is not None and step > limit):
            continue
        try:
            tensors, state = load_checkpoint(path)
        except ValueError as exc:
            log.warning("checkpoint %s is unusable (%s); trying an older one", path, exc)
            continue
        log.warning("resuming from fallback checkpoint %s", path)
        return tensors, state, path
    raise ValueError(f"no checkpoint under {root} verifies: {[p.name for _, p in ckpts]}")


def resolve_checkpoint_dir(path: Path) -> Path:
    """A ckpt-* dir as is; a checkpoint root (holding `latest`/ckpt-*) or a trainer out dir
    (holding checkpoints/) resolves to its latest valid checkpoint directory."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST_FILE).exists() or list_checkpoints(root):
            found = load_latest_checkpoint(root)
            if found is not None:
                return found[2]
    raise ValueError(f"no checkpoint found at {path}")
