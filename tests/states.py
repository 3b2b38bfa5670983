"""Building blocks of the tests that drive a CoordinatorState directly (no gRPC): a small run
config, a joined worker with a lease, deltas and pushes. The `data` fixture they train on is in
conftest.py."""

from __future__ import annotations

import math
import struct

import torch
import zstandard

from geotrain.common.compression import encode_tensors
from geotrain.common.config import RunConfig
from geotrain.coordinator.ledger import TrainedRange
from geotrain.coordinator.state import CoordinatorState
from geotrain.protos.rpc import PROTOCOL_VERSION


def small_run(**changes) -> RunConfig:
    """A 1-layer, 32-wide model, 1024-token units, async merges with plain averaging;
    `section__field=value` changes any field (merge__policy="semi-sync")."""
    run = RunConfig()
    run.model.n_layer, run.model.n_embd, run.model.n_head, run.model.block_size = 1, 32, 2, 16
    run.plan.unit_tokens = 1024
    run.eval.iters = 2
    run.merge.policy = "async"
    run.outer.kind = "average"
    run.outer.lr = 1.0
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(getattr(run, section), field, value)
    return run


def join(state: CoordinatorState, name: str = "w1"):
    """Join a worker and lease it a range: (its WorkerRecord, the range)."""
    record, _ = state.join(name, "cpu", 0, "0", PROTOCOL_VERSION, "fp", "", "")
    exhausted, r = state.lease(record.worker_id, record.session_id)
    assert not exhausted and r is not None
    return record, r


def delta_like(state: CoordinatorState, value: float) -> dict[str, torch.Tensor]:
    """A delta of the global model's shapes, every value `value`."""
    return {n: torch.full_like(t, value) for n, t in state.global_params.items()}


def nan_blob(delta: dict[str, torch.Tensor]) -> bytes:
    """A well-formed `none` blob whose first value is NaN (encoders refuse to make one)."""
    blob, _ = encode_tensors(delta, "none")
    at = blob.index(b"\x28\xb5\x2f\xfd", 16)
    raw = bytearray(zstandard.ZstdDecompressor().decompress(blob[at:]))
    raw[0:4] = struct.pack("<f", math.nan)
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(bytes(raw))
    return blob[:at] + frame


def push(state, record, r, delta, push_id="p1", base=None, n_tokens=64, scheme="none"):
    """Push `delta` (encoded with `scheme`) as having trained the first n_tokens of range r, from
    version `base` (default: the current one); returns the state's PushOutcome."""
    blob, _ = encode_tensors(delta, scheme)
    ranges = [TrainedRange(r.unit_id, r.start, r.start + n_tokens, r.epoch)]
    return state.push(
        record.worker_id, record.session_id, push_id, state.version if base is None else base,
        n_tokens, 1, 2.5, ranges, blob,
    )
