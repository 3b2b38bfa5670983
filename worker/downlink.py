"""The worker's side of the downlink: decoding what GetModel brings into fp32 tensors.

- FULL replies: the weights, and under a replayed downlink the outer momentum after them, which is
  loaded into this worker's replica of the coordinator's outer optimizer.
- UPDATES replies: per version, a plain update (decoded as is) or a replayed one (downlinks
  "relay", "combine", "count"): the wire message becomes a `geotrain.common.merge.ReplayedVersion` and the
  coordinator's merge is repeated on it bit for bit (common/merge.py `replay_version`).
- Held pushes (downlinks "relay" and "count"): the payloads of this worker's recent pushes, named
  in every GetModel (held_push_ids) so that the coordinator omits them from relayed merges (or
  counts against them). A push's payload is dropped once the push is resolved (`release`): the
  coordinator then sends its bytes if it still merges it.

Threads: the comm thread decodes (and owns the outer replica once it runs; the training thread
owns it before, for the first model); `hold`/`release` come from the training thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Mapping, Sequence

import torch

from geotrain.common.config import REPLAYED_DOWNLINKS, RunConfig
from geotrain.common.merge import CountedDeltas, OuterOptimizer, RelayedDelta, ReplayedVersion, replay_version
from geotrain.protos import geotrain_pb2 as pb
from geotrain.worker.client import ModelReply

HELD_PUSHES = 8  # at most this many push payloads held (one push is in flight at a time)


def replayed_version(u: pb.UpdateInfo) -> ReplayedVersion:
    """The plain form of one UpdateInfo that `common.merge.replay_version` takes."""
    counted = None
    if u.HasField("counted"):
        c = u.counted
        counted = CountedDeltas(
            push_ids=tuple(c.push_ids), reference_push_id=c.reference_push_id, deltas=int(c.deltas),
            weight=float(c.weight), scales=tuple(float(s) for s in c.scales), offset=int(c.offset), size=int(c.size),
            majority=bool(c.majority),
        )
    relayed = tuple(RelayedDelta(d.push_id, int(d.offset), int(d.size), float(d.weight), float(d.factor))
                    for d in u.relayed)
    return ReplayedVersion(int(u.version), float(u.outer_fraction), relayed, counted)


class Downlink:
    """Decoder of one run's model replies (`spec`: name -> shape of the model's tensors)."""

    def __init__(self, run_cfg: RunConfig, spec: Mapping[str, Sequence[int]], max_blob_bytes: int):
        self.spec = spec
        self.max_blob_bytes = max_blob_bytes
        self.kind = run_cfg.compression.downlink
        # A replica of the coordinator's outer optimizer for the replayed downlinks.
        self.outer: OuterOptimizer | None = (
            OuterOptimizer(run_cfg.outer, spec) if self.kind in REPLAYED_DOWNLINKS else None
        )
        self.holds_pushes = self.kind in ("relay", "count")
        self._held: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ held pushes

    def hold(self, push_id: str, blob: bytes) -> None:
        """Keep our push's payload (relayed merges of it omit these bytes; counts refer to them)."""
        if not self.holds_pushes:
            return
        with self._lock:
            self._held[push_id] = blob
            while len(self._held) > HELD_PUSHES:
                self._held.popitem(last=False)

    def release(self, push_id: str) -> None:
        """The push is resolved (merged, stale, lost, refused): its payload is no longer needed."""
        with self._lock:
            self._held.pop(push_id, None)

    def held_push_ids(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._held)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._held.values())

    # ------------------------------------------------------------------ decoding

    def decode(self, blob: bytes) -> dict[str, torch.Tensor]:
        from geotrain.common.compression import decode_tensors

        return decode_tensors(blob, self.spec, max_blob_bytes=self.max_blob_bytes)

    def full_tensors(self, rep: ModelReply) -> dict[str, torch.Tensor]:
        """A FULL reply's weights (fp32, CPU). Under a replayed downlink its tail is the outer
        momentum, loaded into the replica (ValueError when it is missing)."""
        n = rep.header.momentum_bytes
        if self.outer is None or not self.outer.momentum:  # no replay, or an outer step without state
            return self.decode(rep.blob[: len(rep.blob) - n])
        if not 0 < n < len(rep.blob):
            raise ValueError(f"a full model under a replayed downlink must carry the outer momentum "
                             f"(momentum_bytes {n} of {len(rep.blob)})")
        full = self.decode(rep.blob[:-n])
        self.outer.load_momentum(self.decode(rep.blob[-n:]))
        return full

    def update_tensors(self, u: pb.UpdateInfo, blob: bytes) -> dict[str, torch.Tensor]:
        """The update U of one version of an UPDATES reply (plain: decoded; relayed or counted:
        replayed, advancing the outer replica). ValueError when it cannot be used."""
        if u.HasField("counted") and (self.outer is None or not self.holds_pushes):
            raise ValueError(f"update {u.version} is a count merge but this run's downlink is {self.kind!r}")
        if not u.HasField("counted") and not u.relayed:
            return self.decode(blob[u.offset : u.offset + u.size])
        if self.outer is None:
            raise ValueError(f"update {u.version} is relayed but this run's downlink {self.kind!r} is not replayed")
        with self._lock:
            held = dict(self._held)
        return replay_version(replayed_version(u), blob, held, self.decode, self.outer, self.spec)
