"""One codec interface for compressed parameter deltas, plus a self-describing blob format.

Every scheme sits behind :class:`Codec` (style: hivemind's ``compression/base.py``)::

    codec = get_codec("sign")                  # or "none", "bf16", "int8", "int4"
    payload, decoded = codec.encode(x)         # decoded: exactly what the receiver reconstructs
    assert torch.equal(codec.decode(payload, x.shape), decoded)

A whole named set of tensors (a model delta) travels as one blob::

    blob, decoded = encode_tensors(delta, "sign", feedback=ef)     # ef: ErrorFeedback (sender side)
    same = decode_tensors(blob, {name: t.shape for name, t in delta.items()})

Decoding is deterministic: no stochastic rounding, and a blob decodes to the bit-identical tensors
that ``encode_tensors`` returned (on any little-endian host in the default IEEE float mode, i.e.
without flush-to-zero / denormals-are-zero).

Schemes and their raw payload (per tensor, x flattened in C order, n = numel, all little-endian)
-----------------------------------------------------------------------------------------------
Chunked schemes cut the flattened tensor into G = ceil(n / chunk) chunks of ``chunk`` values (the
last one may be shorter) and store one float32 scale per chunk; a tensor with n == 0 has G = 0 and
an empty payload in every scheme.

``none``  n * 4 bytes: the float32 values.
``bf16``  n * 2 bytes: bfloat16, round-to-nearest-even.  |err| <= 2^-8 * |x| (relative).
``int8``  G * 4 bytes float32 scales s = absmax(chunk) / 127, then n bytes int8 q = round(x / s)
          in [-127, 127]; decoded = float(q) * s.  |err| <= s / 2 per chunk.
``int4``  G * 4 bytes float32 scales s = absmax(chunk) / 7, then ceil(n / 2) bytes: value 2i in
          the low nibble, value 2i+1 in the high nibble of byte i; nibble = q + 8 with
          q = round(x / s) in [-7, 7]; the unused high nibble of an odd-length tensor is 0.
          decoded = float(nibble - 8) * s.  |err| <= s / 2 per chunk.
``sign``  G * 4 bytes float32 scales, then ceil(n / 8) bytes of sign bits packed MSB first
          (``np.packbits`` order; bit = 1 means the sign bit of x is set, padding bits are 0).
          Groups are the ROWS of a 2-D tensor (G = shape[0]) and chunks of ``chunk`` values for
          any other rank.  Scale = mean |x| of the group (default, the L2-optimal scale for
          sign) or sqrt(mean x^2) (``sign_scale="rms"``, TScale's variance-based scale; the
          decoder does not need to know which).  decoded = +s or -s (bit-exact: s with its sign
          bit set from the payload bit).

Scales are always finite and >= 0; decoders reject anything else, and every decoded value must be
finite (NaN/Inf anywhere is rejected on both ends).

Blob layout (version 1; the protobuf ``bytes`` field carrying a delta holds exactly this)
------------------------------------------------------------------------------------------
All integers little-endian.::

    offset  size  field
    0       4     magic b"GTD1"
    4       1     version (u8) = 1
    5       1     scheme id (u8): index in SCHEMES = ("none", "bf16", "int8", "int4", "sign", "ternary",
                  "tsign")
    6       2     flags (u16) = 0 (reserved; decoders reject nonzero)
    8       4     chunk (u32): values per chunk, 1 <= chunk <= MAX_CHUNK
    12      4     count (u32): number of tensors
    16      ...   count tensor entries, in payload order:
                    name_len (u16, 1..MAX_NAME_BYTES), name (utf-8, unique within the blob),
                    ndim (u8, <= MAX_NDIM), dims (ndim x u64), payload_len (u64, must equal the
                    scheme's payload size for that shape)
    ...     rest  ONE zstd frame holding the concatenation of all raw payloads in entry order,
                  with its content size in the frame header (== sum of payload_len) and a
                  content checksum; nothing may follow the frame.

Validation (``decode_tensors``) happens before anything large is allocated: header, names (exactly
the expected set), shapes, payload sizes, the frame's declared content size (== expected total),
checksum flag and exact frame length; decompression then writes into a buffer of exactly the
expected size and fails on any extra byte, so a zstd bomb cannot allocate past it.
"""

from __future__ import annotations

import math
import struct
import sys
from abc import ABC, abstractmethod
from itertools import repeat
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import zstandard

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("common.compression assumes a little-endian host (payloads are raw LE arrays)")

SCHEMES = ("none", "bf16", "int8", "int4", "sign", "ternary", "tsign")
SIGN_SCALES = ("mean_abs", "rms")

MAGIC = b"GTD1"
VERSION = 1
MAX_CHUNK = 1 << 20  # values
MAX_NDIM = 16
MAX_NAME_BYTES = 1024
DEFAULT_ZSTD_LEVEL = 3

_HEADER = struct.Struct("<4sBBHII")  # magic, version, scheme id, flags, chunk, count
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_WRITE_SLICE = 4 << 20  # bytes handed to the compressor at once by write_tensors

# Sign-bit patterns for one packed byte: row b holds 8 int32 words, 0 or INT32_MIN (sign bit set),
# in np.packbits' MSB-first order. Decoding a sign payload is one table lookup per byte.
_SIGN_WORDS = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1) == 1,
    np.int32(-(2**31)),
    np.int32(0),
).astype(np.int32)


# --------------------------------------------------------------------------- helpers


def _empty_f32(n: int) -> torch.Tensor:
    """Uninitialized float32 tensor of n values, allocated through numpy.

    numpy marks large allocations MADV_HUGEPAGE, so first touch costs ~4x less page-fault time
    than torch.empty here (0.06 s vs 0.27 s for 124M values): that alone was half the encode
    budget for a GPT-2 delta.
    """
    return torch.from_numpy(np.empty(n, dtype=np.float32))


def _normalize_shape(shape: Iterable[int], what: str = "shape") -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"{what} must hold non-negative ints, got {shape!r}")
    if len(dims) > MAX_NDIM:
        raise ValueError(f"{what} has {len(dims)} dims, more than MAX_NDIM={MAX_NDIM}")
    return tuple(int(d) for d in dims)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _pieces(n: int, cols: int) -> list[tuple[int, int, int]]:
    """Split a flat range of n values into at most two (start, rows, cols) blocks.

    Full groups of ``cols`` values first, then the shorter tail group; one scale per row. Lets
    every chunked op run vectorized on a (rows, cols) view without padding (no full-size copy).
    """
    full = n // cols
    out = []
    if full:
        out.append((0, full, cols))
    if n - full * cols:
        out.append((full * cols, 1, n - full * cols))
    return out


def _check_tensor(x: object, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise ValueError(f"{what} must be float32, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"{what} must be on the CPU, got device {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"{what} must be contiguous (call .contiguous() first)")
    if x.ndim > MAX_NDIM:
        raise ValueError(f"{what} has {x.ndim} dims, more than MAX_NDIM={MAX_NDIM}")
    return x.detach()


def _all_finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)  # one pass, no temporary; NaN propagates
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _check_scales(s: torch.Tensor, bound: float) -> None:
    """Scales must be >= 0 and s * bound finite (bound = largest |code| the decoder may see)."""
    if s.numel() and (not bool(torch.isfinite(s * bound).all()) or bool((s < 0).any())):
        raise ValueError("non-finite, negative or overflowing scale (input holds NaN/Inf or huge values)")


def _scales_from(buf: np.ndarray, groups: int) -> torch.Tensor:
    # Copy: the G scales may sit at any byte offset of the decompressed buffer (unaligned).
    return torch.from_numpy(buf[: 4 * groups].view(np.uint8).copy().view(np.float32))


def _decode_target(shape: tuple[int, ...], out: torch.Tensor | None) -> tuple[int, torch.Tensor]:
    """(numel, the tensor a decoder fills: `out`, or a new float32 one of `shape`)."""
    n = _numel(shape)
    return n, (_empty_f32(n).view(shape) if out is None else out)


def _as_u8(payload: object) -> np.ndarray:
    """A writable uint8 numpy copy of a bytes-like payload (copy: callers' bytes are read-only)."""
    try:
        return np.frombuffer(payload, dtype=np.uint8).copy()  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"payload must be bytes-like, got {type(payload).__name__}") from None


# --------------------------------------------------------------------------- codecs


class Codec(ABC):
    """Lossy or lossless encoding of one float32 tensor into a raw payload (before zstd).

    Contract: ``decode(encode(x)[0], x.shape)`` is bit-identical to ``encode(x)[1]``; payload
    sizes depend only on the shape (``payload_size``) so receivers validate before allocating.
    """

    name: str = ""

    def __init__(self, chunk: int = 256):
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or not 1 <= chunk <= MAX_CHUNK:
            raise ValueError(f"chunk must be an int in [1, {MAX_CHUNK}], got {chunk!r}")
        self.chunk = int(chunk)  # values per chunk (one scale each) for chunked schemes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(chunk={self.chunk})"

    def same_as(self, other: "Codec") -> bool:
        """True when both produce identical payloads for identical input."""
        return type(self) is type(other) and self.chunk == other.chunk

    # ---- public API

    def payload_size(self, shape: Iterable[int]) -> int:
        """Exact raw payload size in bytes for a tensor of this shape."""
        return self._payload_size(_normalize_shape(shape))

    def encode(self, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """x: float32, contiguous, CPU, any shape. Returns (raw payload, decoded float32 of x.shape)."""
        x = _check_tensor(x)
        out = _empty_f32(x.numel()).view(x.shape)
        parts = self._encode_into(x, out)
        return b"".join(parts), out

    def decode(self, payload: bytes, shape: Iterable[int]) -> torch.Tensor:
        """Inverse of encode. ValueError if the payload does not fit the shape or decodes to non-finite."""
        shape = _normalize_shape(shape)
        expected = self._payload_size(shape)
        buf = _as_u8(payload)
        if buf.size != expected:
            raise ValueError(
                f"{self.name} payload for shape {shape} must be {expected} bytes, got {buf.size}"
            )
        return self._decode(buf, shape, None)

    # ---- implementation hooks (shapes already validated, sizes already checked)

    @abstractmethod
    def _payload_size(self, shape: tuple[int, ...]) -> int: ...

    @abstractmethod
    def _encode_into(self, x: torch.Tensor, out: torch.Tensor) -> list:
        """Write the decoded reconstruction of x into out (same shape, float32, no aliasing);
        return the payload as a list of C-contiguous buffers to be concatenated."""

    @abstractmethod
    def _decode(self, buf: np.ndarray, shape: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
        """buf: writable uint8 array of exactly payload_size(shape) bytes. Fills out (or a new
        tensor, or a view of buf) and returns it; ValueError on invalid content."""


class NoneCodec(Codec):
    """Lossless float32."""

    name = "none"

    def _payload_size(self, shape):
        return 4 * _numel(shape)

    def _encode_into(self, x, out):
        if not _all_finite(x):
            raise ValueError("tensor holds NaN or Inf")
        out.copy_(x)
        # The payload views out (the exact copy), not x: with error feedback x is the residual
        # buffer, which is updated in place before the payload is compressed.
        return [memoryview(out.view(-1).numpy()).cast("B")] if x.numel() else []

    def _decode(self, buf, shape, out):
        t = torch.from_numpy(buf.view(np.float32)).view(shape)  # buf offsets are 4-aligned here
        if not _all_finite(t):
            raise ValueError("payload holds NaN or Inf")
        if out is None:
            return t  # a view of the (private, writable) buffer: no copy
        out.copy_(t)
        return out


class BF16Codec(Codec):
    """bfloat16, round-to-nearest-even (deterministic)."""

    name = "bf16"

    def _payload_size(self, shape):
        return 2 * _numel(shape)

    def _encode_into(self, x, out):
        b = x.to(torch.bfloat16)
        out.copy_(b)
        if not _all_finite(out):
            raise ValueError("tensor holds NaN/Inf or values beyond the bfloat16 range")
        return [memoryview(b.view(torch.int16).numpy()).cast("B")] if x.numel() else []

    def _decode(self, buf, shape, out):
        b = torch.from_numpy(buf.view(np.int16)).view(torch.bfloat16).view(shape)
        if out is None:
            out = _empty_f32(b.numel()).view(shape)
        out.copy_(b)
        if not _all_finite(out):
            raise ValueError("payload holds NaN or Inf")
        return out


class _ChunkedIntCodec(Codec):
    """Symmetric integer codes per chunk: s = absmax / qmax, q = round(x / s), decoded = q * s."""

    qmax: int = 0  # largest code the encoder emits
    qbound: int = 0  # largest |code| a payload can carry (decoder-side finiteness bound)

    def _groups(self, n: int) -> int:
        return -(-n // self.chunk)

    def _code_bytes(self, n: int) -> int:
        raise NotImplementedError

    def _payload_size(self, shape):
        n = _numel(shape)
        return 4 * self._groups(n) + self._code_bytes(n)

    def _pack(self, q: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def _unpack(self, codes: np.ndarray, n: int) -> torch.Tensor:
        raise NotImplementedError

    def _dequant(self, q: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> None:
        """out (flat, n) = float(q) * s per chunk. Shared by encode and decode (bit identity)."""
        out.copy_(q)
        g = 0
        for start, rows, cols in _pieces(q.numel(), self.chunk):
            out[start : start + rows * cols].view(rows, cols).mul_(s[g : g + rows, None])
            g += rows

    def _encode_into(self, x, out):
        n = x.numel()
        if n == 0:
            return []
        flat, dec = x.view(-1), out.view(-1)
        pieces = _pieces(n, self.chunk)
        s = torch.empty(self._groups(n), dtype=torch.float32)
        g = 0
        for start, rows, cols in pieces:
            lo, hi = torch.aminmax(flat[start : start + rows * cols].view(rows, cols), dim=1)
            torch.maximum(hi, lo.neg_(), out=s[g : g + rows])
            g += rows
        s.div_(self.qmax)
        _check_scales(s, self.qbound)
        safe = torch.where(s > 0, s, torch.ones_like(s))  # all-zero chunk: s = 0, codes 0
        g = 0
        for start, rows, cols in pieces:  # dec doubles as scratch for x / s
            dv = dec[start : start + rows * cols].view(rows, cols)
            torch.div(flat[start : start + rows * cols].view(rows, cols), safe[g : g + rows, None], out=dv)
            g += rows
        dec.round_().clamp_(-self.qmax, self.qmax)
        q = dec.to(torch.int8)
        self._dequant(q, s, dec)
        codes = self._pack(q)  # may reuse q's memory
        return [memoryview(s.numpy()).cast("B"), memoryview(codes).cast("B")]

    def _decode(self, buf, shape, out):
        n, out = _decode_target(shape, out)
        if n == 0:
            return out
        groups = self._groups(n)
        s = _scales_from(buf, groups)
        _check_scales(s, self.qbound)
        q = self._unpack(buf[4 * groups :], n)
        self._dequant(q, s, out.view(-1))
        return out


class Int8Codec(_ChunkedIntCodec):
    name = "int8"
    qmax = 127
    qbound = 128

    def _code_bytes(self, n):
        return n

    def _pack(self, q):
        return q.numpy()

    def _unpack(self, codes, n):
        return torch.from_numpy(codes[:n].view(np.int8))


class Int4Codec(_ChunkedIntCodec):
    name = "int4"
    qmax = 7
    qbound = 8

    def _code_bytes(self, n):
        return (n + 1) // 2

    def _pack(self, q):
        u = q.view(torch.uint8).add_(8)  # nibble = q + 8 in [1, 15]; q is a private temporary
        n = u.numel()
        packed = torch.zeros((n + 1) // 2, dtype=torch.uint8)
        packed.copy_(u[0::2])
        packed[: n // 2].bitwise_or_(u[1::2].bitwise_left_shift(4))
        return packed.numpy()

    def _unpack(self, codes, n):
        packed = torch.from_numpy(codes)
        if n % 2 and int(packed[-1]) >> 4:
            raise ValueError("int4 payload has a nonzero padding nibble")
        q = torch.empty(2 * packed.numel(), dtype=torch.int8)
        torch.bitwise_and(packed, 15, out=q.view(torch.uint8)[0::2])
        torch.bitwise_right_shift(packed, 4, out=q.view(torch.uint8)[1::2])
        q = q[:n]
        q.sub_(8)
        return q


class SignCodec(Codec):
    """1 bit per value plus one scale per row (2-D) or per chunk (other ranks)."""

    name = "sign"

    def __init__(self, chunk: int = 256, sign_scale: str = "mean_abs"):
        super().__init__(chunk)
        if sign_scale not in SIGN_SCALES:
            raise ValueError(f"sign_scale must be one of {SIGN_SCALES}, got {sign_scale!r}")
        self.sign_scale = sign_scale

    def __repr__(self) -> str:
        return f"SignCodec(chunk={self.chunk}, sign_scale={self.sign_scale!r})"

    def same_as(self, other):
        return super().same_as(other) and self.sign_scale == other.sign_scale  # type: ignore[attr-defined]

    def _cols(self, shape: tuple[int, ...]) -> int:
        return shape[1] if len(shape) == 2 else self.chunk

    def _payload_size(self, shape):
        n = _numel(shape)
        if n == 0:
            return 0
        return 4 * -(-n // self._cols(shape)) + (n + 7) // 8

    # Values per block of the fused encode loop: the block's x, residual, output and mask stay in
    # cache across all the passes, so main memory sees each value about once (3x faster here).
    block = 1 << 17

    def _encode_into(self, x, out, add=None):
        """As Codec._encode_into. With ``add`` (same shape), x is a residual buffer r and this
        fuses error feedback: y = r + add (in place), encode y, then r = y - decoded (in place)."""
        n = x.numel()
        if n == 0:
            return []
        flat, dec = x.view(-1), out.view(-1)
        words = flat.numpy().view(np.int32)
        addf = None if add is None else add.view(-1)
        pieces = _pieces(n, self._cols(tuple(x.shape)))
        s = torch.empty(sum(rows for _, rows, _ in pieces), dtype=torch.float32)
        mask = np.empty(n, dtype=np.bool_)  # 1 byte per value; packed once at the end
        g = 0
        for start, rows, cols in pieces:
            step = max(1, self.block // cols)  # rows per block
            stop = start + rows * cols
            adds = repeat(None) if addf is None else addf[start:stop].view(rows, cols).split(step)
            blocks = zip(
                flat[start:stop].view(rows, cols).split(step),
                dec[start:stop].view(rows, cols).split(step),  # scratch for |y| or y^2, then the result
                s[g : g + rows].split(step),
                range(start, stop, step * cols),  # flat offset of each block
                adds,
            )
            for xv, dv, sg, a, av in blocks:
                b = a + xv.numel()
                if av is not None:
                    xv.add_(av)  # y = r + x
                if self.sign_scale == "mean_abs":
                    torch.sum(torch.abs(xv, out=dv), dim=1, out=sg)
                    sg.div_(cols)
                else:
                    torch.sum(torch.mul(xv, xv, out=dv), dim=1, out=sg)
                    sg.div_(cols).sqrt_()
                torch.copysign(sg[:, None], xv, out=dv)  # +-s with y's sign bit
                # int32 view < 0 is exactly the float sign bit (what copysign used), -0.0 included
                np.less(words[a:b], 0, out=mask[a:b])
                if av is not None:
                    xv.sub_(dv)  # residual = y - decoded
            g += rows
        _check_scales(s, 1.0)
        bits = np.packbits(mask)
        return [memoryview(s.numpy()).cast("B"), memoryview(bits).cast("B")]

    def _decode(self, buf, shape, out):
        n, out = _decode_target(shape, out)
        if n == 0:
            return out
        pieces = _pieces(n, self._cols(shape))
        groups = sum(rows for _, rows, _ in pieces)
        s = _scales_from(buf, groups)
        _check_scales(s, 1.0)
        packed = buf[4 * groups :]
        if n % 8 and int(packed[-1]) & (0xFF >> (n % 8)):
            raise ValueError("sign payload has nonzero padding bits")
        words = out.view(-1).view(torch.int32).numpy()
        full = n // 8
        # Sign words (0 or INT32_MIN) for each value via one lookup per packed byte ...
        np.take(_SIGN_WORDS, packed[:full], axis=0, out=words[: 8 * full].reshape(full, 8), mode="clip")
        if n % 8:
            words[8 * full :] = _SIGN_WORDS[packed[full], : n % 8]
        # ... then OR in the scale's bits: value = s with the payload's sign bit (pure bit ops).
        flat_words = out.view(-1).view(torch.int32)
        s_words = s.view(torch.int32)
        g = 0
        for start, rows, cols in pieces:
            flat_words[start : start + rows * cols].view(rows, cols).bitwise_or_(s_words[g : g + rows, None])
            g += rows
        return out


# Ternary digits of the 243 valid bytes, least significant first: byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4,
# digit 0 -> 0.0, 1 -> +1.0, 2 -> -1.0 (the value's multiplier of its chunk's scale).
_TRIT_VALUES = np.array([0.0, 1.0, -1.0], dtype=np.float32)[
    (np.arange(243)[:, None] // 3 ** np.arange(5)[None, :]) % 3
]
_TRIT_WEIGHTS = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


class TernaryCodec(Codec):
    """Values in {-s, 0, +s}: one fp32 scale per chunk of the flattened tensor plus 5 ternary digits
    per byte (1.6 bits per value). Within a chunk of y, values with |y| <= THRESHOLD x mean|y| become
    0 and the rest +-s, s = mean |y| over them (the least-squares scale for that support). Unlike
    sign it has a zero, so a mean of members' directions that cancel stays near 0 instead of
    becoming +-s (worker/allreduce.py, schedule "scatter")."""

    name = "ternary"
    THRESHOLD = 0.5

    def _payload_size(self, shape):
        n = _numel(shape)
        return 4 * -(-n // self.chunk) + -(-n // 5) if n else 0

    def _encode_into(self, x, out):
        n = x.numel()
        if n == 0:
            return []
        groups, c = -(-n // self.chunk), self.chunk
        y = torch.zeros(groups * c, dtype=torch.float32)
        y[:n] = x.reshape(-1)
        y = y.view(groups, c)
        mag = y.abs()
        if not _all_finite(mag):
            raise ValueError("tensor holds NaN or Inf")
        keep = mag > (mag.sum(1, keepdim=True) / c) * self.THRESHOLD
        kept = keep.sum(1, keepdim=True).clamp_(min=1).to(torch.float32)
        s = (mag * keep).sum(1, keepdim=True) / kept  # (groups, 1)
        _check_scales(s, 1.0)
        digits = torch.where(keep, torch.where(y < 0, 2, 1), 0).to(torch.uint8).reshape(-1)[:n]
        dec = torch.where(keep, torch.where(y < 0, -s, s), torch.zeros((), dtype=torch.float32))
        out.view(-1).copy_(dec.reshape(-1)[:n])
        padded = np.zeros(-(-n // 5) * 5, dtype=np.uint8)
        padded[:n] = digits.numpy()
        packed = (padded.reshape(-1, 5) * _TRIT_WEIGHTS).sum(1, dtype=np.uint8)
        return [memoryview(s.reshape(-1).numpy()).cast("B"), memoryview(packed).cast("B")]

    def _decode(self, buf, shape, out):
        n, out = _decode_target(shape, out)
        if n == 0:
            return out
        groups = -(-n // self.chunk)
        s = _scales_from(buf, groups)
        _check_scales(s, 1.0)
        packed = buf[4 * groups :]
        if int(packed.max()) > 242:
            raise ValueError("ternary payload holds a byte above 242 (not 5 ternary digits)")
        trits = _TRIT_VALUES[packed].reshape(-1)
        if np.any(trits[n:]):
            raise ValueError("ternary payload has nonzero padding digits")
        flat = torch.zeros(groups * self.chunk, dtype=torch.float32)
        flat[:n] = torch.from_numpy(trits[:n])
        flat.view(groups, self.chunk).mul_(s[:, None])
        out.view(-1).copy_(flat[:n])
        return out


class TensorSignCodec(Codec):
    """1 bit per value plus ONE fp32 scale for the whole tensor: mean |x|, or a scale the caller
    imposes (encode_tensors(..., scales=)). A downlink "count" merge of such deltas takes them at
    the mean of their scales, so it is a count of signs per value (common/merge.py::counted_mean)."""

    name = "tsign"

    def _payload_size(self, shape):
        n = _numel(shape)
        return 4 + (n + 7) // 8 if n else 0

    def _encode_into(self, x, out, scale: float | None = None):
        n = x.numel()
        if n == 0:
            return []
        flat = x.reshape(-1)
        if scale is None:
            s = torch.sum(torch.abs(flat)) / n
        else:
            s = torch.tensor(scale, dtype=torch.float32)
        s = s.reshape(1).to(torch.float32)
        if not _all_finite(flat):
            raise ValueError("tensor holds NaN or Inf")
        _check_scales(s, 1.0)
        torch.copysign(s.expand(n), flat, out=out.view(-1))
        bits = np.packbits(torch.signbit(flat).numpy())
        return [memoryview(s.numpy()).cast("B"), memoryview(bits).cast("B")]

    def _decode(self, buf, shape, out):
        n, out = _decode_target(shape, out)
        if n == 0:
            return out
        s = _scales_from(buf, 1)
        _check_scales(s, 1.0)
        packed = buf[4:]
        if n % 8 and int(packed[-1]) & (0xFF >> (n % 8)):
            raise ValueError("tsign payload has nonzero padding bits")
        negative = torch.from_numpy(np.unpackbits(packed)[:n].astype(np.bool_))
        flat = out.view(-1)
        flat.copy_(s.expand(n))
        flat.copy_(torch.where(negative, -flat, flat))
        return out


_CODECS: dict[str, type[Codec]] = {
    "none": NoneCodec,
    "bf16": BF16Codec,
    "int8": Int8Codec,
    "int4": Int4Codec,
    "sign": SignCodec,
    "ternary": TernaryCodec,
    "tsign": TensorSignCodec,
}
assert tuple(_CODECS) == SCHEMES


def get_codec(scheme: str, chunk: int = 256, sign_scale: str = "mean_abs") -> Codec:
    """The codec for a scheme name. ValueError for an unknown scheme, bad chunk or sign_scale."""
    if scheme not in _CODECS:
        raise ValueError(f"unknown compression scheme {scheme!r}; choose one of {SCHEMES}")
    if scheme == "sign":
        return SignCodec(chunk, sign_scale)
    if sign_scale not in SIGN_SCALES:
        raise ValueError(f"sign_scale must be one of {SIGN_SCALES}, got {sign_scale!r}")
    return _CODECS[scheme](chunk)


# --------------------------------------------------------------------------- error feedback


class ErrorFeedback:
    """Sender-side residuals, one per tensor name: what quantization dropped is added to the next send.

    Invariant after every ``compress``: residual = (x + old residual) - decoded, so over a run
    sum(x) - sum(decoded) == residual (up to float rounding). Reset a name (or all) when its
    basepoint changes abruptly, e.g. after a resync. Residuals are float32 CPU tensors.
    """

    def __init__(self, codec: Codec):
        if not isinstance(codec, Codec):
            raise ValueError(f"codec must be a Codec, got {type(codec).__name__}")
        self.codec = codec
        self._residuals: dict[str, torch.Tensor] = {}

    def compress(self, name: str, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """y = x + residual[name]; (payload, decoded) = codec.encode(y); residual = y - decoded."""
        x = _check_tensor(x)
        out = _empty_f32(x.numel()).view(x.shape)
        return b"".join(self._compress_into(name, x, out)), out

    def _compress_into(self, name: str, x: torch.Tensor, out: torch.Tensor) -> list:
        if not isinstance(name, str):
            raise ValueError(f"tensor name must be a str, got {type(name).__name__}")
        r = self._residuals.get(name)
        if r is None:
            r = _empty_f32(x.numel()).view(x.shape)
            r.copy_(x)  # residual starts at zero: y = x
            self._residuals[name] = r
        elif r.shape != x.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(x.shape)} but its residual has {tuple(r.shape)}; "
                "reset(name) first if the shape really changed"
            )
        elif isinstance(self.codec, SignCodec):
            try:  # fused, cache-blocked: same arithmetic as the generic path below
                return self.codec._encode_into(r, out, add=x)
            except ValueError:
                del self._residuals[name]  # y held NaN/Inf: the residual is poisoned, drop it
                raise
        else:
            r.add_(x)  # r now holds y
        try:
            parts = self.codec._encode_into(r, out)
        except ValueError:
            del self._residuals[name]
            raise
        r.sub_(out)  # residual = y - decoded, in place
        return parts

    def residual(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The residual of `name`, for a sender that quantizes outside a codec (the sync
        all-reduce's "count" schedule): the stored fp32 CPU tensor itself (update it in place),
        created as zeros shaped like `like` when absent or shaped differently."""
        r = self._residuals.get(name)
        if r is None or r.shape != like.shape:
            r = self._residuals[name] = torch.zeros(like.shape, dtype=torch.float32)
        return r

    def reset(self, name: str | None = None) -> None:
        """Forget one residual (no-op if absent) or, with None, all of them."""
        if name is None:
            self._residuals.clear()
        else:
            self._residuals.pop(name, None)

    def residual_norm(self) -> float:
        """L2 norm over all residuals together."""
        total = 0.0
        for r in self._residuals.values():
            total += float(torch.linalg.vector_norm(r, dtype=torch.float64)) ** 2
        return math.sqrt(total)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: r.clone() for name, r in self._residuals.items()}

    def load_state_dict(self, d: Mapping[str, torch.Tensor]) -> None:
        loaded = {}
        for name, r in d.items():
            if not isinstance(name, str):
                raise ValueError(f"residual name must be a str, got {name!r}")
            r = _check_tensor(r, f"residual {name!r}")
            if not _all_finite(r):
                raise ValueError(f"residual {name!r} holds NaN or Inf")
            loaded[name] = r.clone()
        self._residuals = loaded


# --------------------------------------------------------------------------- blobs


def _encode_name(name: object) -> bytes:
    if not isinstance(name, str):
        raise ValueError(f"tensor name must be a str, got {name!r}")
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NAME_BYTES:
        raise ValueError(f"tensor name {name!r} must be 1..{MAX_NAME_BYTES} utf-8 bytes")
    return raw


def encode_tensors(
    tensors: Mapping[str, torch.Tensor],
    scheme: str,
    chunk: int = 256,
    feedback: ErrorFeedback | None = None,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    *,
    sign_scale: str = "mean_abs",
    scales: Mapping[str, float] | None = None,
) -> tuple[bytes, dict[str, torch.Tensor]]:
    """Encode a named set of float32 tensors into one blob (layout in the module docstring).

    scales ("tsign" only, without feedback): name -> the scale to encode that tensor with instead
    of its mean |x|; every name needs one.
    Returns (blob, decoded): decoded[name] is bit-identical to what decode_tensors(blob) yields.
    With feedback, error feedback is applied per name (feedback.codec must match scheme/chunk).
    The decoded tensors are views into one shared fresh buffer (one allocation, not per tensor).
    zstd runs single-threaded (deterministic output) at ``zstd_level``.
    """
    codec = get_codec(scheme, chunk, sign_scale)
    if feedback is not None:
        if not isinstance(feedback, ErrorFeedback):
            raise ValueError(f"feedback must be an ErrorFeedback, got {type(feedback).__name__}")
        if not feedback.codec.same_as(codec):
            raise ValueError(f"feedback codec {feedback.codec!r} does not match {codec!r}")
    if isinstance(zstd_level, bool) or not isinstance(zstd_level, int) or not 1 <= zstd_level <= 22:
        raise ValueError(f"zstd_level must be an int in [1, 22], got {zstd_level!r}")
    if scales is not None:
        if scheme != "tsign" or feedback is not None:
            raise ValueError(f"scales are for scheme 'tsign' without feedback (got scheme {scheme!r})")
        missing = [n for n in tensors if n not in scales]
        if missing:
            raise ValueError(f"scales has no entry for {missing[:3]}")
        bad = [n for n in tensors if not (math.isfinite(scales[n]) and scales[n] >= 0)]
        if bad:
            raise ValueError(f"scales must be finite and >= 0: {bad[0]!r} has {scales[bad[0]]!r}")
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
    if len(tensors) >= 2**32:
        raise ValueError(f"too many tensors: {len(tensors)}")

    items = []
    for name, t in tensors.items():
        raw_name = _encode_name(name)
        items.append((name, raw_name, _check_tensor(t, f"tensor {name!r}")))
    flat = _empty_f32(sum(t.numel() for _, _, t in items))

    header = [_HEADER.pack(MAGIC, VERSION, SCHEMES.index(scheme), 0, codec.chunk, len(items))]
    decoded: dict[str, torch.Tensor] = {}
    payloads: list = []
    total = 0
    offset = 0
    for name, raw_name, t in items:
        out = flat[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()
        try:
            if feedback is not None:
                parts = feedback._compress_into(name, t, out)
            elif scales is not None:
                parts = codec._encode_into(t, out, scale=float(scales[name]))
            else:
                parts = codec._encode_into(t, out)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from e
        size = sum(memoryview(p).nbytes for p in parts)
        assert size == codec._payload_size(tuple(t.shape)), (name, size)
        total += size
        payloads.extend(parts)
        decoded[name] = out
        header.append(_U16.pack(len(raw_name)) + raw_name + _U8.pack(t.ndim))
        header.append(struct.pack(f"<{t.ndim}Q", *t.shape) + _U64.pack(size))

    cctx = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True, write_content_size=True, threads=0)
    cobj = cctx.compressobj(size=total)
    frame = [cobj.compress(p) for p in payloads]
    frame.append(cobj.flush())
    return b"".join(header + frame), decoded


def _parse(blob: object, expected_count: int | None = None):
    """Parse and check the header. Returns (codec, [(name, shape, payload_len)], frame memoryview)."""
    try:
        mv = memoryview(blob).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"blob must be bytes-like, got {type(blob).__name__}") from None
    if len(mv) < _HEADER.size:
        raise ValueError(f"blob is {len(mv)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, scheme_id, flags, chunk, count = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ValueError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(f"unsupported blob version {version}, expected {VERSION}")
    if scheme_id >= len(SCHEMES):
        raise ValueError(f"unknown scheme id {scheme_id} (known: 0..{len(SCHEMES) - 1} = {SCHEMES})")
    if flags != 0:
        raise ValueError(f"unknown header flags {flags:#x}")
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"header chunk {chunk} outside [1, {MAX_CHUNK}]")
    if expected_count is not None and count != expected_count:
        raise ValueError(f"header declares {count} tensors, expected {expected_count}")
    codec = get_codec(SCHEMES[scheme_id], chunk)

    entries = []
    seen: set[str] = set()
    pos = _HEADER.size

    def need(k: int, what: str) -> None:
        if pos + k > len(mv):
            raise ValueError(f"blob truncated in {what} (entry {len(entries)})")

    for _ in range(count):
        need(2, "name length")
        (name_len,) = _U16.unpack_from(mv, pos)
        pos += 2
        if not 1 <= name_len <= MAX_NAME_BYTES:
            raise ValueError(f"entry {len(entries)}: name length {name_len} outside [1, {MAX_NAME_BYTES}]")
        need(name_len + 1, "name")
        try:
            name = bytes(mv[pos : pos + name_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"entry {len(entries)}: name is not valid utf-8") from None
        pos += name_len
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        (ndim,) = _U8.unpack_from(mv, pos)
        pos += 1
        if ndim > MAX_NDIM:
            raise ValueError(f"tensor {name!r}: ndim {ndim} exceeds {MAX_NDIM}")
        need(8 * ndim + 8, "dims")
        shape = struct.unpack_from(f"<{ndim}Q", mv, pos)
        pos += 8 * ndim
        (payload_len,) = _U64.unpack_from(mv, pos)
        pos += 8
        entries.append((name, shape, payload_len))
    return codec, entries, mv[pos:]


def _frame_length(frame: memoryview) -> int:
    """Exact byte length of the zstd frame at the start of ``frame`` (walks the block headers)."""
    pos = zstandard.frame_header_size(bytes(frame[:18]))  # includes the 4-byte magic
    while True:
        if pos + 3 > len(frame):
            raise ValueError("zstd frame truncated in a block header")
        header = frame[pos] | (frame[pos + 1] << 8) | (frame[pos + 2] << 16)
        last, block_type, size = header & 1, (header >> 1) & 3, header >> 3
        if block_type == 3:
            raise ValueError("zstd frame has a reserved block type")
        pos += 3 + (1 if block_type == 1 else size)  # RLE blocks carry one byte
        if pos > len(frame):
            raise ValueError("zstd frame truncated in a block")
        if last:
            return pos + 4  # + content checksum (its presence is checked by the caller)


def blob_info(blob: bytes) -> dict:
    """Cheap header parse: scheme, chunk, tensor count, raw (decompressed) size, frame size, names."""
    codec, entries, frame = _parse(blob)
    return {
        "version": VERSION,
        "scheme": codec.name,
        "chunk": codec.chunk,
        "count": len(entries),
        "raw_size": sum(e[2] for e in entries),
        "compressed_size": len(frame),
        "names": [e[0] for e in entries],
    }


def _validated(blob: bytes, want: Mapping[str, tuple[int, ...]]):
    """Header and frame checks shared by decode_tensors and iter_decode_tensors.
    Returns (codec, entries, payload offsets, total raw bytes, frame memoryview)."""
    codec, entries, frame = _parse(blob, expected_count=len(want))
    offsets = []
    total = 0
    for name, shape, payload_len in entries:
        if name not in want:
            raise ValueError(f"unexpected tensor {name!r} (expected: {sorted(want)})")
        if shape != want[name]:
            raise ValueError(f"tensor {name!r}: shape {shape} != expected {want[name]}")
        size = codec._payload_size(shape)
        if payload_len != size:
            raise ValueError(f"tensor {name!r}: payload length {payload_len} != {size} for {codec.name} {shape}")
        offsets.append(total)
        total += size
    # Count matched and names are unique and all expected, so every expected name is present.

    if bytes(frame[:4]) != _ZSTD_MAGIC:
        raise ValueError("payload is not a zstd frame (bad frame magic)")
    try:
        params = zstandard.get_frame_parameters(bytes(frame[:18]))
    except zstandard.ZstdError as e:
        raise ValueError(f"bad zstd frame header: {e}") from None
    if params.content_size != total:
        raise ValueError(
            f"zstd frame declares {params.content_size} content bytes, expected exactly {total} "
            "(missing or wrong content size)"
        )
    if not params.has_checksum:
        raise ValueError("zstd frame has no content checksum")
    if params.dict_id != 0:
        raise ValueError(f"zstd frame needs dictionary {params.dict_id}; none is used")
    try:
        length = _frame_length(frame)
    except zstandard.ZstdError as e:
        raise ValueError(f"bad zstd frame header: {e}") from None
    if length != len(frame):
        raise ValueError(f"zstd frame is {length} bytes but {len(frame)} follow the header (trailing data?)")

    return codec, entries, offsets, total, frame


def _want(expected: Mapping[str, Sequence[int]], blob: object, max_blob_bytes: int | None) -> dict[str, tuple[int, ...]]:
    if not isinstance(expected, Mapping):
        raise ValueError(f"expected must be a mapping of name -> shape, got {type(expected).__name__}")
    want = {name: _normalize_shape(shape, f"expected shape of {name!r}") for name, shape in expected.items()}
    if max_blob_bytes is not None:
        if not isinstance(max_blob_bytes, int) or max_blob_bytes < 0:
            raise ValueError(f"max_blob_bytes must be a non-negative int or None, got {max_blob_bytes!r}")
        size = memoryview(blob).nbytes if isinstance(blob, (bytes, bytearray, memoryview)) else None
        if size is not None and size > max_blob_bytes:
            raise ValueError(f"blob is {size} bytes, over the {max_blob_bytes}-byte limit")
    return want


def iter_decode_tensors(
    blob: bytes,
    expected: Mapping[str, Sequence[int]],
    max_blob_bytes: int | None = None,
):
    """Decode a blob tensor by tensor, in blob order: yields (name, float32 tensor) with the same
    validation and the bit-identical values of decode_tensors, but holds one decoded tensor at a
    time (plus zstd's window) instead of the whole set. Each yielded tensor is fresh (the caller
    may keep it). A problem found late (a bad payload, the frame's checksum, which zstd verifies
    at its end) raises ValueError when reached, after earlier tensors were yielded."""
    want = _want(expected, blob, max_blob_bytes)
    codec, entries, _, total, frame = _validated(blob, want)
    try:
        with zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False) as reader:
            for name, shape, payload_len in entries:
                raw = np.empty(payload_len, dtype=np.uint8)
                view, got = memoryview(raw), 0
                while got < payload_len:
                    k = reader.readinto(view[got:])
                    if not k:
                        break
                    got += k
                if got != payload_len:
                    raise ValueError(f"zstd frame decompressed to fewer bytes than the {total} expected")
                try:
                    held = [codec._decode(raw, shape, None if codec.name == "none" else _empty_f32(_numel(shape)).view(shape))]
                except ValueError as e:
                    raise ValueError(f"tensor {name!r}: {e}") from None
                del raw, view  # ("none" tensors view raw: the yielded tensor alone keeps it)
                yield name, held.pop()  # the suspended frame keeps no reference to the tensor
            if reader.read(1):  # also completes the frame: checksum verified here
                raise ValueError(f"zstd frame decompressed to more than {total} bytes")
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd decompression failed: {e}") from None


def write_tensors(fh, tensors: Mapping[str, torch.Tensor], zstd_level: int = DEFAULT_ZSTD_LEVEL) -> int:
    """Write the blob of encode_tensors(tensors, "none") to the binary file `fh` one tensor at a
    time (no copy of the set in memory); returns the bytes written. decode_tensors reads it back
    bit-identically (the compressed frame may differ from encode_tensors' own bytes)."""
    if isinstance(zstd_level, bool) or not isinstance(zstd_level, int) or not 1 <= zstd_level <= 22:
        raise ValueError(f"zstd_level must be an int in [1, 22], got {zstd_level!r}")
    codec = get_codec("none")
    header = [_HEADER.pack(MAGIC, VERSION, SCHEMES.index("none"), 0, codec.chunk, len(tensors))]
    total = 0
    for name, t in tensors.items():
        t = _check_tensor(t, f"tensor {name!r}")
        raw_name = _encode_name(name)
        size = codec._payload_size(tuple(t.shape))
        total += size
        header.append(_U16.pack(len(raw_name)) + raw_name + _U8.pack(t.ndim))
        header.append(struct.pack(f"<{t.ndim}Q", *t.shape) + _U64.pack(size))
    written = 0
    for part in header:
        written += fh.write(part)
    cctx = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True, write_content_size=True, threads=0)
    cobj = cctx.compressobj(size=total)
    for name, t in tensors.items():
        t = t.detach().contiguous()
        if not _all_finite(t):
            raise ValueError(f"tensor {name!r}: tensor holds NaN or Inf")
        data = memoryview(t.view(-1).numpy()).cast("B")
        for start in range(0, len(data), _WRITE_SLICE):  # bounded input, bounded output per call
            written += fh.write(cobj.compress(data[start : start + _WRITE_SLICE]))
    written += fh.write(cobj.flush())
    return written


def decode_tensors(
    blob: bytes,
    expected: Mapping[str, Sequence[int]],
    max_blob_bytes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a blob from encode_tensors, validating everything before allocating.

    expected: name -> shape of every tensor the blob must hold (no more, no fewer).
    max_blob_bytes: optional cap on len(blob). Any problem with the blob raises ValueError naming
    the field or tensor. Returned tensors are views into one shared fresh buffer.
    """
    want = _want(expected, blob, max_blob_bytes)
    codec, entries, offsets, total, frame = _validated(blob, want)
    raw = np.empty(total, dtype=np.uint8)  # exactly the validated size: nothing decompresses past it
    try:
        with zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False) as reader:
            got = 0
            view = memoryview(raw)
            while got < total:
                k = reader.readinto(view[got:])
                if not k:
                    break
                got += k
            extra = reader.read(1)  # also completes the frame: checksum verified here at the latest
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd decompression failed: {e}") from None
    if got != total or extra:
        raise ValueError(f"zstd frame decompressed to {'more' if extra else got} bytes, expected {total}")

    flat = None
    if codec.name != "none":  # "none" returns views of the decompressed buffer itself
        flat = _empty_f32(sum(_numel(shape) for _, shape, _ in entries))
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for (name, shape, payload_len), start in zip(entries, offsets):
        n = _numel(shape)
        dst = None if flat is None else flat[offset : offset + n].view(shape)
        offset += n
        try:
            out[name] = codec._decode(raw[start : start + payload_len], shape, dst)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from None
    return out
