"""Count payloads of the downlink "count" (coordinator/history.py, worker/downlink.py via common/merge.py).

When every delta of a merge is 1-bit with one scale per tensor (scheme "tsign") and the deltas have
the same merge weight, the coordinator takes each at the mean of their scales: the merged mean is
`scale x weight x k` per value, with k the sum of the N signs, and each merged worker subtracts its
delta as scale x its own signs. The coordinator then sends each
worker, instead of the other deltas' sign bits (N - 1 bits per value), one count per value:

- "agree" payload, for a worker whose own delta is in the merge (it still holds it): how many of
  the N - 1 others have the same sign as its own, a in [0, N - 1]; k = s_own x (2a - N + 2).
- "plus" payload, for any other worker: how many of the N deltas are positive, c in [0, N];
  k = 2c - N.
- "vote" payloads, for a majority merge (compression.count_rule "majority", N >= 3, where the merge
  takes k = N x sign(sum of signs)): 1 + sign(sum), relative to the requester's own sign when its
  delta is in the merge (2: the majority shares it, 1: a tie, 0: against it), maxval 2
  (common/merge.py vote_of / majority_k_from_vote). About 1.3 bits per value after zstd for 4
  workers, where the agree count takes about 1.85 (a 4-worker simulation, benchmarks/README.md).

Layout: the counts of every value of every tensor, in the model's tensor order, packed
little-endian into bytes at `bits_per_count(maxval)` bits each (1 for maxval 1, the agree bits of
2 workers; 2 for maxval <= 3, 4 for <= 15, else 8; padding counts are 0), in ONE zstd frame with its content size and a checksum. With 4
workers an agree count is 2 bits before zstd (about 1.85 after) where relaying the others' sign bits
costs 3. Decoding checks the frame's declared size before decompressing, every count against
maxval and the padding, and raises ValueError on anything else.

Scale codes (the sync all-reduce's "count" schedule, worker/allreduce.py): a positive scale as one
byte, 4 codes per octave: code = clamp(round(4 log2 s) + 128, 1, 255), 0 for a zero scale. Decoding
is the same everywhere (a fixed float32 quarter-octave times a power of two), so members that hold the same codes hold the same
scales bit for bit.

Plain module: numpy and zstandard only.
"""

from __future__ import annotations

import numpy as np
import zstandard

MAX_COUNT = 255


def bits_per_count(maxval: int) -> int:
    if not isinstance(maxval, int) or not 1 <= maxval <= MAX_COUNT:
        raise ValueError(f"maxval must be an int in [1, {MAX_COUNT}], got {maxval!r}")
    return 1 if maxval == 1 else 2 if maxval <= 3 else 4 if maxval <= 15 else 8


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
    if per == 1:
        packed = padded
    elif bits == 1:  # count j of each byte at bit j
        packed = np.packbits(padded, bitorder="little")
    else:  # lanes of `per` counts read as one little-endian word; count j moves to bits j*bits
        word = padded.view("<u4" if per == 4 else "<u2")
        acc = word.copy()
        for j in range(1, per):
            acc |= word >> np.uint8(j * (8 - bits))
        packed = acc.astype(np.uint8)  # keeps the low byte
    cctx = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True, write_content_size=True, threads=0)
    return cctx.compress(packed.tobytes())


_UNPACK_TABLES: dict[int, np.ndarray] = {}


def _unpack_table(bits: int) -> np.ndarray:
    """byte -> its 8 // bits counts, lowest bits first, as one little-endian word per byte."""
    table = _UNPACK_TABLES.get(bits)
    if table is None:
        per = 8 // bits
        b = np.arange(256, dtype=np.uint8)[:, None]
        lanes = (b >> (np.arange(per, dtype=np.uint8) * bits)[None, :]) & np.uint8((1 << bits) - 1)
        table = _UNPACK_TABLES[bits] = np.ascontiguousarray(lanes).view("<u4" if per == 4 else "<u2").reshape(-1)
    return table


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
    raw = np.frombuffer(packed, dtype=np.uint8)
    if bits == 1:
        counts = np.unpackbits(raw, bitorder="little")
    else:
        counts = np.take(_unpack_table(bits), raw).view(np.uint8) if bits < 8 else raw.copy()
    if counts[n:].any():
        raise ValueError("count payload has nonzero padding")
    counts = counts[:n]
    if counts.size and int(counts.max()) > maxval:
        raise ValueError(f"count payload holds {int(counts.max())}, above {maxval}")
    return counts


SCALE_CODES_PER_OCTAVE = 4
SCALE_CODE_ZERO = 128  # the code of scale 1.0


def scale_codes(scales: np.ndarray) -> np.ndarray:
    """Non-negative finite scales -> uint8 codes (see the module docstring); ValueError otherwise."""
    s = np.asarray(scales, dtype=np.float64).reshape(-1)
    if s.size and (not np.isfinite(s).all() or (s < 0).any()):
        raise ValueError("scales must be finite and >= 0")
    codes = np.zeros(s.size, dtype=np.uint8)
    pos = s > 0
    if pos.any():
        c = np.rint(np.log2(s[pos]) * SCALE_CODES_PER_OCTAVE) + SCALE_CODE_ZERO
        codes[pos] = np.clip(c, 1, 255).astype(np.uint8)
    return codes


# 2^(j/4), j = 0..3, as fixed float32 values: a code's scale is one of them times a power of two
# (np.ldexp, exact), so no libm call decides a scale's last bit.
_QUARTER_OCTAVES = np.array([1.0, 1.1892071, 1.4142135, 1.6817929], dtype=np.float32)


def scales_from_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes -> float32 scales (0 for code 0), bit-identical on every machine."""
    c = np.asarray(codes, dtype=np.uint8).reshape(-1).astype(np.int32) - SCALE_CODE_ZERO
    out = np.ldexp(_QUARTER_OCTAVES[c % SCALE_CODES_PER_OCTAVE], c // SCALE_CODES_PER_OCTAVE).astype(np.float32)
    out[c == -SCALE_CODE_ZERO] = 0.0
    return out
