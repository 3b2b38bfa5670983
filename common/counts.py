"""Count payloads of the downlink "count" (coordinator/state.py, worker/runner.py).

When every delta of a merge is 1-bit with the same per-tensor scales and the same merge weight (the
workers encoded with the scales the coordinator published, scheme "tsign"), the merged mean is
`scale x weight x k` per value, with k the sum of the N signs. The coordinator then sends each
worker, instead of the other deltas' sign bits (N - 1 bits per value), one count per value:

- "agree" payload, for a worker whose own delta is in the merge (it still holds it): how many of
  the N - 1 others have the same sign as its own, a in [0, N - 1]; k = s_own x (2a - N + 2).
- "plus" payload, for any other worker: how many of the N deltas are positive, c in [0, N];
  k = 2c - N.

Layout: the counts of every value of every tensor, in the model's tensor order, packed
little-endian into bytes at `bits_per_count(maxval)` bits each (2 for maxval <= 3, 4 for <= 15,
else 8; padding counts are 0), in ONE zstd frame with its content size and a checksum. With 4
workers an agree count is 2 bits before zstd (about 1.85 after) where relaying the others' sign bits
costs 3. Decoding checks the frame's declared size before decompressing, every count against
maxval and the padding, and raises ValueError on anything else.

Plain module: numpy and zstandard only.
"""

from __future__ import annotations

import numpy as np
import zstandard

MAX_COUNT = 255


def bits_per_count(maxval: int) -> int:
    if not isinstance(maxval, int) or not 1 <= maxval <= MAX_COUNT:
        raise ValueError(f"maxval must be an int in [1, {MAX_COUNT}], got {maxval!r}")
    return 2 if maxval <= 3 else 4 if maxval <= 15 else 8


def packed_size(n: int, maxval: int) -> int:
    """Bytes of n packed counts before zstd."""
    return -(-n * bits_per_count(maxval) // 8)


def encode_counts(counts: np.ndarray, maxval: int, zstd_level: int = 3) -> bytes:
    """counts: 1-D uint8 in [0, maxval] -> one zstd frame of the packed counts."""
    counts = np.ascontiguousarray(counts, dtype=np.uint8).reshape(-1)
    bits = bits_per_count(maxval)
    if counts.size and int(counts.max()) > maxval:
        raise ValueError(f"a count is {int(counts.max())}, above maxval {maxval}")
    per = 8 // bits
    padded = np.zeros(-(-counts.size // per) * per, dtype=np.uint8)
    padded[: counts.size] = counts
    lanes = padded.reshape(-1, per)
    packed = np.zeros(lanes.shape[0], dtype=np.uint8)
    for j in range(per):
        packed |= lanes[:, j] << np.uint8(j * bits)
    cctx = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True, write_content_size=True, threads=0)
    return cctx.compress(packed.tobytes())


def decode_counts(payload: bytes, n: int, maxval: int) -> np.ndarray:
    """Inverse of encode_counts for n counts; ValueError for a payload that is not exactly that."""
    bits = bits_per_count(maxval)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    expected = packed_size(n, maxval)
    try:
        params = zstandard.get_frame_parameters(bytes(payload[:18]))
    except zstandard.ZstdError as exc:
        raise ValueError(f"count payload is not a zstd frame: {exc}") from None
    if params.content_size != expected or not params.has_checksum:
        raise ValueError(f"count payload declares {params.content_size} bytes (checksum {params.has_checksum}), "
                         f"expected {expected} with a checksum")
    try:
        dctx = zstandard.ZstdDecompressor()
        packed = dctx.decompress(bytes(payload), max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise ValueError(f"count payload does not decompress: {exc}") from None
    if len(packed) != expected:
        raise ValueError(f"count payload holds {len(packed)} bytes, expected {expected}")
    per = 8 // bits
    raw = np.frombuffer(packed, dtype=np.uint8)
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    counts = ((raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)
    if counts[n:].any():
        raise ValueError("count payload has nonzero padding")
    counts = counts[:n]
    if counts.size and int(counts.max()) > maxval:
        raise ValueError(f"count payload holds {int(counts.max())}, above {maxval}")
    return counts
