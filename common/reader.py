"""``TokenData``: the memory-mapped shards of one data directory, and batches drawn from them.

Readers memory-map shards. ``TokenData.get_batch`` draws windows from a numpy generator seeded by
(seed, split, step), so the same arguments give the same batch in any process;
``get_range_batch`` cuts a leased range into (B, T) rows. A nanoGPT directory (``train.bin`` and no
manifest) is read in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geotrain.common.nanogpt import nanogpt_tokenizer
from geotrain.common.shards import MANIFEST_NAME, MANIFEST_VERSION, SPLITS, Manifest, ShardInfo, read_shard
from geotrain.common.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:  # torch is imported lazily: spawned encoders do not need it
    import torch


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
            spec, vocab = nanogpt_tokenizer(self.data_dir, None)
            if vocab > 2**16:
                raise ValueError(f"{self.data_dir}: nanoGPT bins are uint16 but vocab_size is {vocab}")
            shards = []
            for split in SPLITS:
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
        for split in SPLITS:
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
        if split not in SPLITS:
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
        if split not in SPLITS:
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
        rng = np.random.default_rng([int(seed) % 2**64, SPLITS.index(split), int(step)])
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
