"""The coordinator's files in its run directory: checkpoints, the version mark, run.json.

Contract:
- `save(version, tensors, state)` writes an atomic checkpoint (common/checkpoint.py) of tensors the
  caller does not change meanwhile (it holds the model lock, not the state lock: the tensors are
  written in place, a slice at a time, without copies); returns its directory.
- `load()` returns the newest checkpoint that verifies, or None.
- The version mark records the highest version ever published (tmp + rename: safe against
  SIGKILL), so that after a restart from an older checkpoint the restored weights get a version
  above it and a version number never names two different models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from geotrain.common.checkpoint import load_latest_checkpoint, save_checkpoint


class Persistence:
    def __init__(self, run_dir: Path, keep: int):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def version_mark_path(self) -> Path:
        return self.run_dir / "version.mark"

    def save(self, version: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
        return save_checkpoint(self.ckpt_root, version, tensors, state, keep=self.keep)

    def load(self) -> tuple[dict[str, torch.Tensor], dict, Path] | None:
        return load_latest_checkpoint(self.ckpt_root)

    def write_version_mark(self, version: int) -> None:
        tmp = self.version_mark_path.with_suffix(".tmp")
        tmp.write_text(str(version))
        os.replace(tmp, self.version_mark_path)

    def read_version_mark(self) -> int:
        try:
            return int(self.version_mark_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def write_run_json(self, run: dict, model: dict, run_id: str) -> None:
        (self.run_dir / "run.json").write_text(json.dumps({"run": run, "model": model, "run_id": run_id}, indent=2))

    def append_history(self, row: dict) -> None:
        """One row of history.jsonl (an evaluation: common/plot.py reads them)."""
        with open(self.run_dir / "history.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
