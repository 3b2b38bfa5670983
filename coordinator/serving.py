"""The full model as a worker downloads it, encoded once per version into a file.

Contract: `reply(version, ...)` returns a FULL ModelReply whose bytes are the file of that version:
the global weights as an encode_tensors "none" blob, followed under a replayed downlink by the
outer momentum as a second blob (`momentum_bytes`). The file is written a tensor at a time
(common/compression.py write_tensors) and hashed as it is written, so serving holds no copy of
the model in memory; the caller holds the model lock (weights unchanging) and not the state lock.
The previous version's file is unlinked when a newer one is written: replies already opened keep
reading it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Mapping

import torch

from geotrain.common.compression import write_tensors
from geotrain.coordinator.records import ModelReply

log = logging.getLogger(__name__)


class _HashingWriter:
    """A binary file that hashes what goes through it."""

    def __init__(self, fh):
        self.fh, self.digest, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        n = self.fh.write(data)
        self.size += n
        return n


class FullModelFile:
    def __init__(self, directory: Path, zstd_level: int):
        self.directory = Path(directory)
        self.zstd_level = zstd_level
        self.lock = threading.Lock()  # one writer; held while the current file is replaced
        self.current: tuple[int, Path, int, str, int] | None = None  # (version, path, size, sha256, momentum bytes)
        for stale in self.directory.glob("model-*"):  # a previous process's files: never served again
            stale.unlink(missing_ok=True)

    def _encode(self, version: int, weights: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"model-{version:08d}.bin"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            out = _HashingWriter(fh)
            write_tensors(out, weights, self.zstd_level)
            weights_bytes = out.size
            if momentum:
                write_tensors(out, momentum, self.zstd_level)
        os.replace(tmp, path)
        old = self.current
        self.current = (version, path, out.size, out.digest.hexdigest(), out.size - weights_bytes)
        if old is not None and old[1] != path:
            old[1].unlink(missing_ok=True)

    def reply(self, version: int, params_sha: str, weights: Mapping[str, torch.Tensor],
              momentum: Mapping[str, torch.Tensor], merged_push_ids: list[str]) -> ModelReply:
        """The FULL reply of `version` (encoded now unless cached). Caller holds the model lock."""
        with self.lock:
            if self.current is None or self.current[0] != version or not self.current[1].exists():
                self._encode(version, weights, momentum)
            _, path, size, sha, momentum_bytes = self.current
            fh = open(path, "rb")
        return ModelReply("FULL", version, [], params_sha, [], merged_push_ids, momentum_bytes,
                          file=fh, size=size, sha256=sha)

    def cached(self, version: int, params_sha: str, merged_push_ids: list[str]) -> ModelReply | None:
        """The FULL reply of `version` if its file is already written (no model lock needed)."""
        with self.lock:
            if self.current is None or self.current[0] != version:
                return None
            _, path, size, sha, momentum_bytes = self.current
            try:
                fh = open(path, "rb")
            except FileNotFoundError:
                return None
        return ModelReply("FULL", version, [], params_sha, [], merged_push_ids, momentum_bytes,
                          file=fh, size=size, sha256=sha)
