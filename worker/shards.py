"""Leases and the worker's shard cache.

A lease is a token range [start, end) of one shard in one epoch. `ShardCache.lease_and_fetch` (the
prefetch pool, one lease ahead of training) asks the coordinator for the next lease and makes its
tokens available: the shard file verified on disk (CACHE_DIR/<run_id>/<shard>, a read-only memmap),
or, for a shard not on disk yet, just the lease's sequences (a few hundred KB, sha256-checked)
while the whole shard downloads in a background thread. Batches are read by `slots_batch` from the
shard's visiting order in the lease's epoch (common/order.py sequence_order): position p of a lease
(tokens) is slot p // T.

Threads: `lease_and_fetch` runs in the prefetch pool, background downloads in their own threads,
`slots_batch` / `lease_batch` in the training thread; `_shard_lock` serializes whole downloads and
`_rows_lock` guards the lease rows and the set of downloads in progress.
"""

from __future__ import annotations

import dataclasses

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import torch

from geotrain.common.order import gather_sequences, sequence_order

log = logging.getLogger(__name__)


@dataclass
class Lease:
    unit_id: int
    shard: str
    start: int
    end: int
    epoch: int
    pos: int = 0  # the next token to train
    session: int = 0  # client.session_epoch it was leased in; a rejoin invalidates it


class ShardCache:
    """One run's leases and shards. `client`: worker/client.py CoordinatorClient; `manifest`:
    common/shards.py Manifest; `block_size` T; `seed`: the run's train.seed (sequence order);
    `should_stop()`: True ends a wait for a free lease; `may_lease()`: False holds new leases back
    (a sync-group member, worker/group_runner.py)."""

    def __init__(self, client, manifest, shard_dir: Path, block_size: int, seed: int,
                 should_stop: Callable[[float], bool], may_lease: Callable[[], bool] = lambda: True):
        self.client = client
        self.manifest = manifest
        self.shard_info = {s.name: s for s in manifest.shards}
        self.shard_dir = shard_dir
        self.block_size = block_size
        self.seed = seed
        self.should_stop = should_stop  # should_stop(seconds): wait up to that long; True = give up
        self.may_lease = may_lease
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._shards: dict[str, np.ndarray] = {}
        self._order_cache: dict = {}
        self._shard_lock = threading.Lock()
        self._rows: dict[str, list] = {}  # shard -> [(epoch, first slot, rows (n, T+1))]: leases fetched before the shard
        self._downloading: set[str] = set()  # shards downloading in the background
        self._rows_lock = threading.Lock()  # guards the two above (_shard_lock is held for whole downloads)

    # ------------------------------------------------------------------ leasing (prefetch pool)

    def lease_and_fetch(self) -> Lease | None:
        """The next lease with its tokens at hand; None when the run's data is spent (or we stop)."""
        while not self.may_lease():
            if self.should_stop(0.2):
                return None
        while True:
            reply = self.client.lease_work()
            if reply.exhausted:
                return None
            if reply.HasField("range"):
                break
            # Nothing free now: the rest is leased to others, who may still give it back (a
            # dropped worker's range). Ask again soon; heartbeat STOP ends the wait.
            if self.should_stop(1.0):
                return None
        r = reply.range
        if r.shard not in self.shard_info:
            raise ValueError(f"leased shard {r.shard!r} is not in the run's manifest")
        lease = Lease(r.unit_id, r.shard, r.start, r.end, r.epoch, pos=r.start, session=self.client.session_epoch)
        if r.shard in self._shards or (self.shard_dir / r.shard).is_file():
            self.ensure_shard(r.shard)
        elif not self._fetch_lease_rows(lease):
            self.ensure_shard(r.shard)  # blocking: the whole shard first
        return lease

    def _fetch_lease_rows(self, lease: Lease) -> bool:
        """A lease of a shard not on disk yet: fetch just its sequences (a few hundred KB) and
        start the whole shard downloading in the background, so training starts at once. False
        when the coordinator does not serve them (the caller downloads the shard first)."""
        T = self.block_size
        first, count = lease.pos // T, (self.usable_end(lease) - lease.pos) // T
        if count <= 0:
            return True
        dtype = np.dtype(f"<u{self.token_itemsize()}")
        try:
            data = self.client.get_sequences(lease.shard, lease.epoch, first, count, (T + 1) * dtype.itemsize)
        except (ValueError, grpc.RpcError) as exc:
            log.warning("shard %s: could not fetch the lease's sequences (%s): downloading the whole shard first",
                        lease.shard, exc)
            return False
        rows = np.frombuffer(data, dtype=dtype).reshape(count, T + 1)
        with self._rows_lock:
            self._rows.setdefault(lease.shard, []).append((lease.epoch, first, rows))
            start = lease.shard not in self._downloading
            self._downloading.add(lease.shard)
        if start:
            log.info("shard %s: training its first lease from %d sequences (%.0f KB) while the shard downloads",
                     lease.shard, count, len(data) / 1024)
            threading.Thread(target=self._download_in_background, args=(lease.shard,), name="shard", daemon=True).start()
        return True

    def _download_in_background(self, name: str) -> None:
        try:
            self.ensure_shard(name)
        except Exception as exc:  # noqa: BLE001 - the training thread downloads it itself if it must
            log.warning("shard %s: background download failed (%s); it is fetched again when needed", name, exc)
        finally:
            with self._rows_lock:
                self._downloading.discard(name)

    # ------------------------------------------------------------------ shards on disk

    def ensure_shard(self, name: str) -> np.ndarray:
        """The shard's tokens (a verified read-only memmap), downloaded first if need be."""
        from geotrain.common.shards import read_shard

        with self._shard_lock:
            if name in self._shards:
                return self._shards[name]
            info = self.shard_info.get(name)
            if info is None:
                raise ValueError(f"leased shard {name!r} is not in the run's manifest")
            path = self.shard_dir / name
            if path.is_file():
                try:
                    arr = read_shard(path, info)
                    self._shards[name] = arr
                    log.info("shard %s: cached copy verified", name)
                    return arr
                except ValueError as exc:
                    log.warning("cached shard %s is bad (%s): downloading again", name, exc)
            self._download_shard(name, info, path)
            arr = read_shard(path, info)
            self._shards[name] = arr
            with self._rows_lock:
                self._rows.pop(name, None)  # the whole shard replaces the lease rows fetched before it
            return arr

    def token_itemsize(self) -> int:
        from geotrain.common.shards import dtype_for_vocab

        m = self.manifest
        return 4 if m.dtype == "uint32" or dtype_for_vocab(m.vocab_size) == "uint32" else 2

    def _download_shard(self, name: str, info, path: Path) -> None:
        from geotrain.common.shards import HEADER_BYTES, shard_sha256

        expected = HEADER_BYTES + info.tokens * self.token_itemsize()
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        fh = [None]

        def write(data: bytes | None) -> None:
            if data is None:  # (re)start of the stream
                if fh[0] is not None:
                    fh[0].close()
                fh[0] = open(tmp, "wb")
                return
            fh[0].write(data)

        t0 = time.monotonic()
        try:
            for attempt in range(3):
                self.client.get_shard(name, expected, write)
                fh[0].flush()
                os.fsync(fh[0].fileno())
                fh[0].close()
                fh[0] = None
                if not info.sha256 or shard_sha256(tmp) == info.sha256:
                    os.replace(tmp, path)
                    log.info("shard %s: downloaded %d bytes in %.1fs", name, expected, time.monotonic() - t0)
                    return
                log.error("shard %s: sha256 differs from the manifest (attempt %d)", name, attempt + 1)
            raise ValueError(f"shard {name}: downloaded bytes never matched the manifest's sha256")
        finally:
            if fh[0] is not None:
                fh[0].close()
            if tmp.exists():
                tmp.unlink()

    # ------------------------------------------------------------------ batches (training thread)

    def usable_end(self, lease: Lease) -> int:
        tokens = self.shard_info[lease.shard].tokens  # what the shard's file holds (read_shard checks it)
        return min(lease.end, tokens - 1)  # the target of the last input token must exist

    def range_done(self, lease: Lease) -> bool:
        return self.usable_end(lease) - lease.pos < self.block_size

    def _sequence_order(self, shard: str, epoch: int) -> np.ndarray:
        """The shard's visiting order in `epoch` (common/order.py::sequence_order), cached."""
        key = (shard, epoch)
        cache = self._order_cache  # read once: the batch prefetch thread may swap it meanwhile
        if cache.get("key") != key:
            cache = {
                "key": key,
                "order": sequence_order(shard, len(self._shards[shard]), self.block_size, self.seed, epoch),
            }
            self._order_cache = cache
        return cache["order"]

    def slots_batch(self, shard: str, epoch: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences lo .. hi-1 of the shard's visiting order in `epoch` as CPU int64 tensors
        x, y of shape (hi-lo, T): from the whole shard when it is loaded, else from lease rows
        fetched before it (else the shard is downloaded now)."""
        if shard not in self._shards:
            with self._rows_lock:
                held = list(self._rows.get(shard, ()))
            for row_epoch, first, rows in held:
                if row_epoch == epoch and first <= lo and hi <= first + len(rows):
                    part = np.asarray(rows[lo - first : hi - first], dtype=np.int64)
                    return torch.from_numpy(np.ascontiguousarray(part[:, :-1])), torch.from_numpy(np.ascontiguousarray(part[:, 1:]))
            self.ensure_shard(shard)
        slots = self._sequence_order(shard, epoch)[lo:hi]
        xs, ys = gather_sequences(self._shards[shard], slots, self.block_size)
        return torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(np.ascontiguousarray(ys))

    def lease_batch(self, lease: Lease, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The next batch of the lease (CPU tensors (n, T)) and its number of sequences n."""
        T = self.block_size
        n = min(batch_size, (self.usable_end(lease) - lease.pos) // T)
        x, y = self.slots_batch(lease.shard, lease.epoch, lease.pos // T, lease.pos // T + n)
        return x, y, n


class _EndOfLease(Exception):
    """The prefetch thread reached the end of the lease's usable range (never consumed: the
    training loop checks `range_done` before it asks for a batch)."""


class LeaseBatches:
    """The async worker's batches of its current lease, prepared ahead on a background thread by
    common/step.py's Prefetcher (on CUDA pinned and copied to the device on a side stream, so the
    step finds its batch on the device).

    `next(lease, batch_size)` (training thread) returns exactly what
    `ShardCache.lease_batch(lease, batch_size)` returns at `lease.pos`: (x, y) of (n, T) and n. The
    caller advances lease.pos by n * T as before, so the range bookkeeping stays on the training
    thread. The prefetch follows one lease from one position; another lease, another position (a
    sync-group step that trained a planned slice of the lease) or another batch size starts it
    again from there."""

    def __init__(self, shards: ShardCache, device, depth: int = 2):
        self.shards, self.device, self.depth = shards, device, depth
        self._prefetch = None
        self._lease: Lease | None = None  # the lease the prefetch serves,
        self._key: tuple | None = None  # from (position, batch size)

    def next(self, lease: Lease, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        from geotrain.common.step import Prefetcher

        T = self.shards.block_size
        if self._prefetch is None or self._lease is not lease or self._key != (lease.pos, batch_size):
            self.close()
            start, shards, probe = lease.pos, self.shards, dataclasses.replace(lease)

            def make(i: int) -> tuple[torch.Tensor, torch.Tensor]:  # batch i after `start`
                probe.pos = start + i * batch_size * T  # only the last batch of a lease is short
                if shards.range_done(probe):
                    raise _EndOfLease()
                x, y, _ = shards.lease_batch(probe, batch_size)
                return x, y

            self._prefetch, self._lease = Prefetcher(make, self.device, depth=self.depth), lease
        x, y = next(self._prefetch)
        n = x.size(0)
        self._key = (lease.pos + n * T, batch_size)
        return x, y, n

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
        self._prefetch, self._lease, self._key = None, None, None
