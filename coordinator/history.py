"""The downlink history: the published versions a worker catching up downloads instead of the model.

Contract: `append` keeps a record per version, trimmed from the oldest so that at most
`max_versions` records and at most `max_bytes` bytes of blobs (and computed count payloads) stay
in memory; `max_bytes` is workers.history_fraction of the model's fp32 size (at most one model).
A worker whose versions are no longer all held, or whose updates would cost more than the full
weights, gets the full model (coordinator/serving.py).

Locking: the record list is read and changed under the state lock (coordinator/state.py);
`build_reply` runs outside it on a snapshot of the records, because a count merge's payload is
computed on first request (decoding the merged deltas a tensor at a time): `payload_lock`
serializes that computation and guards each record's payload cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from typing import Container, Mapping, Sequence

import numpy as np
import torch

from geotrain.common.compression import iter_decode_tensors
from geotrain.common.counts import encode_counts
from geotrain.common.merge import vote_of
from geotrain.coordinator.records import CountedRecord, ModelReply, UpdateRecord, UpdateSlice


class DownlinkHistory:
    def __init__(self, spec: Mapping[str, Sequence[int]], num_params: int, fraction: float, zstd_level: int):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"workers.history_fraction must be in (0, 1], got {fraction!r}")
        self.spec = dict(spec)
        self.num_params = num_params
        self.max_bytes = int(fraction * 4 * num_params)
        self.zstd_level = zstd_level
        self.records: deque[UpdateRecord] = deque()
        self.bytes = 0  # held_bytes() of the records, as of their append
        self.payload_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i: int) -> UpdateRecord:
        return self.records[i]

    def __bool__(self) -> bool:
        return bool(self.records)

    def append(self, record: UpdateRecord, max_versions: int) -> None:
        """Keep `record`; drop the oldest beyond max_versions records or max_bytes bytes (the
        newest is always kept). Caller holds the state lock."""
        self.records.append(record)
        self.bytes += record.held_bytes()
        while len(self.records) > 1 and (len(self.records) > max_versions or self.bytes > self.max_bytes):
            self.bytes -= self.records.popleft().held_bytes()

    def oldest_version(self, current: int) -> int:
        return self.records[0].version if self.records else current + 1

    def updates_since(self, have_version: int, current: int, held: Container[str]) -> list[UpdateRecord] | None:
        """The records after `have_version` when they are all held and cost less than the full
        fp32 weights on the wire; None: send the full model. Caller holds the state lock."""
        if not 0 < have_version < current or have_version + 1 < self.oldest_version(current):
            return None
        records = [u for u in self.records if u.version > have_version]
        if sum(u.wire_size(held) for u in records) >= 4 * self.num_params:
            return None
        return records

    # ------------------------------------------------------------------ replies (no state lock)

    def build_reply(self, records: list[UpdateRecord], held: Container[str], version: int, params_sha: str) -> ModelReply:
        """The UPDATES reply for `records`: their blobs back to back (as segments, hashed here), a
        relayed delta the caller holds omitted (size 0), a count merge as the count payload for
        the caller's own push."""
        slices, segments, offset = [], [], 0
        digest = hashlib.sha256()

        def add(data: bytes) -> None:
            nonlocal offset
            segments.append(data)
            digest.update(data)
            offset += len(data)

        for u in records:
            start, parts = offset, []
            if u.counted is not None:
                reference = next((p for p in u.counted.push_ids if p in held), "")
                add(self.count_payload(u.counted, reference))
                slices.append(UpdateSlice(u, start, offset - start, [], reference))
                continue
            if not u.relayed:
                add(u.blob)
            for r in u.relayed:
                if r.push_id in held:
                    parts.append((offset, 0))
                else:
                    parts.append((offset, len(r.blob)))
                    add(r.blob)
            slices.append(UpdateSlice(u, start, offset - start, parts))
        return ModelReply("UPDATES", version, segments, params_sha, slices, sha256=digest.hexdigest())

    def count_payload(self, counted: CountedRecord, reference: str) -> bytes:
        """The count payload of a count merge for a requester holding `reference` ("" = plus
        counts): per value, how many of the other deltas share the reference's sign (or how many
        are positive), or for a majority merge the vote (common/merge.py vote_of); computed once
        per (record, reference), one tensor of every delta at a time, into one uint8 per value."""
        with self.payload_lock:
            payload = counted.payloads.get(reference)
            if payload is not None:
                return payload
            n = len(counted.blobs)
            i = counted.push_ids.index(reference) if reference else -1
            streams = [iter_decode_tensors(b, self.spec) for b in counted.blobs]
            out = np.empty(self.num_params, dtype=np.uint8)
            pos = 0
            for name in self.spec:
                negative = []
                for s in streams:
                    got, t = next(s)
                    assert got == name, (got, name)  # blobs were checked for the model's order at push
                    negative.append(torch.signbit(t.reshape(-1)))
                if counted.majority:
                    k = sum(1 - 2 * neg.to(torch.int16) for neg in negative)
                    count = vote_of(k, negative[i] if i >= 0 else None)
                elif i >= 0:
                    count = sum((negative[j] == negative[i]).to(torch.uint8) for j in range(n) if j != i)
                else:
                    count = sum((~neg).to(torch.uint8) for neg in negative)
                size = negative[0].numel()
                if size:
                    out[pos : pos + size] = count.numpy() if isinstance(count, torch.Tensor) else count
                pos += size
            for s in streams:  # completes each frame (its checksum)
                next(s, None)
            payload = encode_counts(out, 2 if counted.majority else n - 1 if i >= 0 else n, self.zstd_level)
            counted.payloads[reference] = payload
            self.bytes += len(payload)
            return payload
