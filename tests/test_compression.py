"""Codec round trips, error feedback properties, and a hostile-input suite for the GTD1 blob."""

from __future__ import annotations

import hashlib
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geotrain.common.compression import (
    MAX_CHUNK,
    SCHEMES,
    ErrorFeedback,
    TernaryCodec,
    blob_info,
    decode_tensors,
    encode_tensors,
    get_codec,
)

SHAPES = [(1,), (7,), (256,), (257,), (1000,), (3, 5), (37, 13), (8, 256), (2, 3, 5), (4, 1, 9), (), (0,), (5, 0)]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def groups(x: torch.Tensor, scheme: str, chunk: int) -> list[torch.Tensor]:
    """The value groups sharing one scale: rows for 2-D sign, the tensor for tsign, else flat
    chunks (last one shorter)."""
    if scheme == "tsign":
        return [x.reshape(-1)] if x.numel() else []
    if scheme == "sign" and x.ndim == 2:
        return [row for row in x if row.numel()]
    return [g for g in x.reshape(-1).split(chunk) if g.numel()]


# --------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_error_bound_and_bit_identity(scheme, shape):
    chunk = 64
    codec = get_codec(scheme, chunk)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    payload, dec = codec.encode(x)
    assert isinstance(payload, bytes) and len(payload) == codec.payload_size(shape)
    assert dec.dtype == torch.float32 and dec.shape == x.shape
    assert same_bits(codec.decode(payload, shape), dec)
    err = (x - dec).abs()
    if scheme == "none":
        assert same_bits(dec, x)
    elif scheme == "bf16":
        assert bool((err <= x.abs() * 2.0**-8).all())
    elif scheme in ("int8", "int4"):
        qmax = 127 if scheme == "int8" else 7
        for xg, eg in zip(groups(x, scheme, chunk), groups(err, scheme, chunk)):
            s = float(xg.abs().max()) / qmax
            assert float(eg.max()) <= s / 2 * (1 + 1e-5) + 1e-30
    elif scheme == "ternary":  # 0 where |x| <= half the chunk's mean |x|, else +-(mean |x| of the rest)
        for xg, dg in zip(groups(x, scheme, chunk), groups(dec, scheme, chunk)):
            mean_abs = float(xg.double().abs().sum()) / chunk  # a short last chunk counts its padding as 0
            keep = xg.abs() > mean_abs * TernaryCodec.THRESHOLD
            assert torch.equal(dg == 0, ~keep)
            if keep.any():
                assert bool((dg[keep].abs() == dg[keep].abs()[0]).all())
                assert math.isclose(float(dg[keep].abs()[0]), float(xg[keep].double().abs().mean()), rel_tol=1e-5)
                assert torch.equal(torch.signbit(dg[keep]), torch.signbit(xg[keep]))
    else:  # sign: decoded == mean|x| of the group with x's sign, exactly
        for xg, dg in zip(groups(x, scheme, chunk), groups(dec, scheme, chunk)):
            scale = dg.abs()
            assert bool((scale == scale[0]).all())
            assert math.isclose(float(scale[0]), float(xg.double().abs().mean()), rel_tol=1e-5)
            assert torch.equal(torch.signbit(dg), torch.signbit(xg))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_and_empty_tensors(scheme):
    codec = get_codec(scheme)
    for shape in [(0,), (3, 0), (1000,), (4, 300)]:
        x = torch.zeros(shape)
        payload, dec = codec.encode(x)
        assert len(payload) == codec.payload_size(shape)
        assert bool((dec == 0).all()) and dec.shape == x.shape
        assert same_bits(codec.decode(payload, shape), dec)
    assert codec.payload_size((0,)) == 0 and codec.payload_size((5, 0)) == 0


def test_payload_sizes_documented():
    n = 1001  # odd, not divisible by the chunk or by 8
    assert get_codec("none").payload_size((n,)) == 4 * n
    assert get_codec("bf16").payload_size((n,)) == 2 * n
    assert get_codec("int8", 100).payload_size((n,)) == 4 * 11 + n
    assert get_codec("int4", 100).payload_size((n,)) == 4 * 11 + 501
    assert get_codec("sign", 100).payload_size((n,)) == 4 * 11 + 126
    assert get_codec("sign", 100).payload_size((7, 143)) == 4 * 7 + 126  # one scale per row
    assert get_codec("sign", 100).payload_size((7, 11, 13)) == 4 * 11 + 126
    assert get_codec("ternary", 100).payload_size((n,)) == 4 * 11 + 201  # 5 digits per byte
    assert get_codec("ternary", 100).payload_size((7, 143)) == 4 * 11 + 201  # flat chunks
    assert get_codec("tsign", 100).payload_size((7, 143)) == 4 + 126  # one scale per tensor


def test_tsign_encodes_with_imposed_scales_and_refuses_bad_ones():
    x = {"a": torch.tensor([[0.5, -2.0], [0.0, 3.0]]), "b": torch.tensor([-1.0, 1.0, -0.0])}
    blob, dec = encode_tensors(x, "tsign", scales={"a": 0.25, "b": 2.0})
    assert dec["a"].tolist() == [[0.25, -0.25], [0.25, 0.25]] and dec["b"].tolist() == [-2.0, 2.0, -2.0]
    back = decode_tensors(blob, {"a": (2, 2), "b": (3,)})
    assert all(same_bits(back[n], dec[n]) for n in x)
    _, own = encode_tensors(x, "tsign")
    assert float(own["a"].abs()[0, 0]) == 1.375  # mean |x| without imposed scales
    with pytest.raises(ValueError, match="no entry"):
        encode_tensors(x, "tsign", scales={"a": 1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        encode_tensors(x, "tsign", scales={"a": 1.0, "b": float("nan")})
    with pytest.raises(ValueError, match="'tsign' without feedback"):
        encode_tensors(x, "sign", scales={"a": 1.0, "b": 1.0})


def test_ternary_refuses_bytes_that_are_not_five_digits_and_nonzero_padding():
    codec = get_codec("ternary", chunk=4)
    payload, dec = codec.encode(torch.tensor([1.0, -1.0, 0.0, 2.0, 0.1, -3.0]))
    assert dec.tolist()[2] == 0.0 and codec.decode(payload, (6,)).tolist() == dec.tolist()
    bad = bytearray(payload)
    bad[-1] = 243
    with pytest.raises(ValueError, match="above 242"):
        codec.decode(bytes(bad), (6,))
    bad[-1] = 2 * 81  # the 5th digit of the last byte is padding (6 values = 2 bytes, 4 used of the 2nd)
    with pytest.raises(ValueError, match="padding"):
        codec.decode(bytes(bad), (6,))


def test_sign_rms_scale_and_int4_nibbles():
    x = torch.tensor([[3.0, -4.0], [0.0, -0.0]])
    _, dec = get_codec("sign", sign_scale="rms").encode(x)
    rms = float(torch.tensor(12.5).sqrt())
    assert dec[0].tolist() == [rms, -rms]
    assert bits(dec[1]).tolist() == [0, -(2**31)]  # -0.0 keeps its sign bit, scale 0
    payload, dec = get_codec("int4", chunk=4).encode(torch.tensor([7.0, -7.0, 1.0]))
    assert payload[4:] == bytes([(8 - 7) << 4 | (8 + 7), 8 + 1])
    assert dec.tolist() == [7.0, -7.0, 1.0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_decode_rejects_wrong_length_and_bad_content(scheme):
    codec = get_codec(scheme, 8)
    payload, _ = codec.encode(torch.randn(21))
    for bad in (payload[:-1], payload + b"\0", b""):
        with pytest.raises(ValueError, match="bytes"):
            codec.decode(bad, (21,))
    with pytest.raises(ValueError):
        codec.decode(payload, (-1,))
    # a NaN where a value or scale lives
    nan = bytearray(payload)
    nan[0:4] = struct.pack("<f", float("nan"))
    with pytest.raises(ValueError):
        codec.decode(bytes(nan), (21,))


def test_decode_rejects_padding_and_negative_scales():
    codec = get_codec("sign", 8)
    payload = bytearray(codec.encode(torch.randn(21))[0])
    payload[-1] |= 1  # a padding bit
    with pytest.raises(ValueError, match="padding"):
        codec.decode(bytes(payload), (21,))
    payload = bytearray(get_codec("int4", 8).encode(torch.randn(21))[0])
    payload[-1] |= 0x10
    with pytest.raises(ValueError, match="padding"):
        get_codec("int4", 8).decode(bytes(payload), (21,))
    payload = bytearray(get_codec("int8", 8).encode(torch.randn(21))[0])
    payload[0:4] = struct.pack("<f", -1.0)
    with pytest.raises(ValueError, match="scale"):
        get_codec("int8", 8).decode(bytes(payload), (21,))


def test_caller_mistakes_raise_value_error():
    with pytest.raises(ValueError, match="'zip'"):
        get_codec("zip")
    for chunk in (0, -1, MAX_CHUNK + 1, 2.5, True):
        with pytest.raises(ValueError, match="chunk"):
            get_codec("int8", chunk)
    with pytest.raises(ValueError, match="sign_scale"):
        get_codec("sign", sign_scale="max")
    codec = get_codec("int8")
    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(4, 4).t(), [1.0]):
        with pytest.raises(ValueError):
            codec.encode(bad)
    for scheme in SCHEMES:
        for value in (float("nan"), float("inf")):
            with pytest.raises(ValueError):
                get_codec(scheme).encode(torch.tensor([1.0, value]))
    with pytest.raises(ValueError, match="bfloat16"):
        get_codec("bf16").encode(torch.tensor([3.4e38]))


# --------------------------------------------------------------------------- error feedback


@FAST
@given(
    scheme=st.sampled_from(SCHEMES),
    shape=st.sampled_from([(5,), (33,), (4, 9), (2, 3, 7)]),
    steps=st.integers(1, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_feedback_tracks_the_true_sum(scheme, shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    ef = ErrorFeedback(get_codec(scheme, 8))
    true_sum = torch.zeros(shape, dtype=torch.float64)
    sent_sum = torch.zeros(shape, dtype=torch.float64)
    biggest = 0.0
    for _ in range(steps):
        x = torch.randn(shape, generator=g) * float(torch.rand((), generator=g) * 2 + 0.01)
        payload, dec = ef.compress("w", x)
        assert same_bits(get_codec(scheme, 8).decode(payload, shape), dec)
        true_sum += x.double()
        sent_sum += dec.double()
        biggest = max(biggest, float(x.norm()))
    # sum(true) - sum(sent) == residual, exactly up to float32 rounding of the running residual
    gap = float((true_sum - sent_sum).norm())
    assert math.isclose(gap, ef.residual_norm(), rel_tol=1e-4, abs_tol=1e-5 * steps * (biggest + 1))
    assert ef.residual_norm() <= 10 * biggest  # bounded: it does not accumulate with the step count


def test_sign_without_feedback_drifts_more():
    g = torch.Generator().manual_seed(0)
    shape = (16, 64)
    bias = torch.randn(shape, generator=g) * 0.3  # a persistent direction plus noise, like real deltas
    ef, codec = ErrorFeedback(get_codec("sign")), get_codec("sign")
    true_sum = torch.zeros(shape)
    with_ef = torch.zeros(shape)
    without = torch.zeros(shape)
    for _ in range(200):
        x = bias + torch.randn(shape, generator=g)
        true_sum += x
        with_ef += ef.compress("w", x)[1]
        without += codec.encode(x)[1]
    drift_ef = float((true_sum - with_ef).norm())
    drift_plain = float((true_sum - without).norm())
    assert drift_ef < drift_plain / 5, (drift_ef, drift_plain)


def test_error_feedback_state_reset_and_mistakes():
    ef = ErrorFeedback(get_codec("int4"))
    ef.compress("a", torch.randn(10))
    ef.compress("b", torch.randn(3, 4))
    state = ef.state_dict()
    assert set(state) == {"a", "b"} and ef.residual_norm() > 0
    other = ErrorFeedback(get_codec("int4"))
    other.load_state_dict(state)
    assert math.isclose(other.residual_norm(), ef.residual_norm())
    x = torch.randn(10)
    assert same_bits(other.compress("a", x)[1], ef.compress("a", x)[1])
    with pytest.raises(ValueError, match="reset"):
        ef.compress("a", torch.randn(11))
    ef.reset("a")
    ef.compress("a", torch.randn(11))
    ef.reset("never-seen")
    ef.reset()
    assert ef.residual_norm() == 0.0 and ef.state_dict() == {}
    with pytest.raises(ValueError):
        other.load_state_dict({"a": torch.tensor([float("nan")])})
    # a NaN input drops the poisoned residual instead of keeping it
    sign = ErrorFeedback(get_codec("sign"))
    sign.compress("w", torch.randn(8, 8))
    with pytest.raises(ValueError):
        sign.compress("w", torch.full((8, 8), float("nan")))
    assert sign.state_dict() == {}


def test_error_feedback_does_not_touch_input():
    for scheme in SCHEMES:
        ef = ErrorFeedback(get_codec(scheme))
        x = torch.randn(300, 7)
        keep = x.clone()
        ef.compress("w", x)
        ef.compress("w", x)
        assert same_bits(x, keep)


# --------------------------------------------------------------------------- blobs


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "wte.weight": torch.randn(50, 24, generator=g) * 1e-3,
        "h.0.ln.bias": torch.randn(24, generator=g),
        "odd": torch.randn(3, 7, 11, generator=g),
        "zero": torch.zeros(19),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "ünïcode": torch.randn(9, generator=g),
    }


def shapes_of(ts):
    return {k: tuple(v.shape) for k, v in ts.items()}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("feedback", [False, True])
def test_blob_round_trip_bit_identical(scheme, feedback):
    ts = sample_tensors()
    ef = ErrorFeedback(get_codec(scheme, 16)) if feedback else None
    for _ in range(2):
        blob, dec = encode_tensors(ts, scheme, chunk=16, feedback=ef, zstd_level=1)
        out = decode_tensors(blob, shapes_of(ts), max_blob_bytes=len(blob))
        assert list(out) == list(ts)
        for name in ts:
            assert same_bits(out[name], dec[name]), name
            assert same_bits(get_codec(scheme, 16).decode(get_codec(scheme, 16).encode(ts[name])[0], ts[name].shape),
                             get_codec(scheme, 16).encode(ts[name])[1])
    info = blob_info(blob)
    assert info["scheme"] == scheme and info["count"] == len(ts) and info["chunk"] == 16
    assert info["raw_size"] == sum(get_codec(scheme, 16).payload_size(t.shape) for t in ts.values())
    assert info["names"] == list(ts)


def test_blob_of_no_tensors():
    blob, dec = encode_tensors({}, "sign")
    assert dec == {} and decode_tensors(blob, {}) == {}


def test_decode_is_bit_identical_in_another_process():
    ts = sample_tensors(3)
    blob, dec = encode_tensors(ts, "sign", chunk=8)
    digest = hashlib.sha256(b"".join(dec[k].numpy().tobytes() for k in ts)).hexdigest()
    code = (
        "import sys, hashlib\n"
        "from geotrain.common.compression import decode_tensors\n"
        "blob = sys.stdin.buffer.read()\n"
        f"out = decode_tensors(blob, {shapes_of(ts)!r})\n"
        "print(hashlib.sha256(b''.join(t.numpy().tobytes() for t in out.values())).hexdigest())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True)
    assert res.stdout.decode().strip() == digest


def test_encode_tensors_mistakes():
    ts = sample_tensors()
    with pytest.raises(ValueError, match="'int3'"):
        encode_tensors(ts, "int3")
    with pytest.raises(ValueError, match="does not match"):
        encode_tensors(ts, "sign", feedback=ErrorFeedback(get_codec("int8")))
    with pytest.raises(ValueError, match="does not match"):
        encode_tensors(ts, "sign", chunk=64, feedback=ErrorFeedback(get_codec("sign", 128)))
    with pytest.raises(ValueError, match="zstd_level"):
        encode_tensors(ts, "sign", zstd_level=0)
    with pytest.raises(ValueError, match="name"):
        encode_tensors({"": torch.zeros(1)}, "sign")
    with pytest.raises(ValueError, match="'bad'"):
        encode_tensors({"bad": torch.tensor([float("nan")])}, "int8")


# ---- hostile input


def craft(entries, frame: bytes, *, scheme_id=4, chunk=256, version=1, flags=0, magic=b"GTD1", count=None):
    """A blob from explicit header fields: entries = [(name, shape, payload_len)]."""
    out = [struct.pack("<4sBBHII", magic, version, scheme_id, flags, chunk, len(entries) if count is None else count)]
    for name, shape, plen in entries:
        raw = name.encode() if isinstance(name, str) else name
        out.append(struct.pack("<H", len(raw)) + raw + struct.pack("<B", len(shape)))
        out.append(struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<Q", plen))
    return b"".join(out) + frame


def zframe(data: bytes, **kw) -> bytes:
    kw.setdefault("write_checksum", True)
    kw.setdefault("write_content_size", True)
    return zstandard.ZstdCompressor(level=1, **kw).compress(data)


def good_sign_blob():
    x = torch.randn(4, 16)
    payload, dec = get_codec("sign").encode(x)
    return payload, dec


def test_crafted_blob_is_accepted():
    payload, dec = good_sign_blob()
    out = decode_tensors(craft([("w", (4, 16), len(payload))], zframe(payload)), {"w": (4, 16)})
    assert same_bits(out["w"], dec)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p), magic=b"GTD2"), "magic"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p), version=2), "version"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p), scheme_id=9), "scheme"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p), flags=1), "flags"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p), chunk=0), "chunk"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p), count=2**32 - 1), "declares"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p), count=0), "declares"),
        (lambda p: craft([("v", (4, 16), len(p))], zframe(p)), "unexpected tensor 'v'"),
        (lambda p: craft([("w", (4, 16), len(p)), ("w", (4, 16), len(p))], zframe(p + p)), "declares"),
        (lambda p: craft([("w", (16, 4), len(p))], zframe(p)), "shape"),
        (lambda p: craft([("w", (4, 16, 1), len(p))], zframe(p)), "shape"),
        (lambda p: craft([("w", (4, 16), len(p) + 1)], zframe(p + b"\0")), "payload length"),
        (lambda p: craft([(b"\xff\xfe", (4, 16), len(p))], zframe(p)), "utf-8"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p, write_checksum=False)), "checksum"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p, write_content_size=False)), "content"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p) + b"\0"), "trailing"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p) + zframe(p)), "trailing"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p)[:-1]), "truncated|frame"),
        (lambda p: craft([("w", (4, 16), len(p))], b""), "zstd"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(p[:-1])), "content"),
        (lambda p: craft([("w", (4, 16), len(p))], zframe(b"\0\0\xc0\x7f" + p[4:])), "scale"),  # NaN scale
    ],
)
def test_malformed_blobs(make, match):
    payload, _ = good_sign_blob()
    with pytest.raises(ValueError, match=match):
        decode_tensors(make(payload), {"w": (4, 16)})


def test_duplicate_names_and_missing_names():
    payload, _ = good_sign_blob()
    blob = craft([("w", (4, 16), len(payload)), ("w", (4, 16), len(payload))], zframe(payload + payload))
    with pytest.raises(ValueError, match="duplicate tensor name 'w'"):
        decode_tensors(blob, {"w": (4, 16), "v": (4, 16)})
    blob = craft([("w", (4, 16), len(payload))], zframe(payload))
    with pytest.raises(ValueError, match="declares 1 tensors, expected 2"):
        decode_tensors(blob, {"w": (4, 16), "v": (1,)})


def test_zstd_bomb_is_refused_without_allocating():
    # a tiny frame that expands to 1 GiB of zeros: declared size is 1 GiB
    bomb = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(bytes(1 << 24))  # 16 MiB real
    frame = bytearray(bomb)
    blob = craft([("w", (4, 16), 4 * 4 + 8)], bytes(frame))
    with pytest.raises(ValueError, match="declares"):
        decode_tensors(blob, {"w": (4, 16)})
    # the same stream without a content size: refused before decompressing
    cobj = zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=False).compressobj()
    streamed = cobj.compress(bytes(1 << 24)) + cobj.flush()
    with pytest.raises(ValueError, match="content size"):
        decode_tensors(craft([("w", (4, 16), 24)], streamed), {"w": (4, 16)})
    # a hand-made frame whose header honestly-looks (24 bytes, checksum flag) but whose one raw
    # block carries 1000 bytes: decompression must stop at 24 bytes and fail, not grow a buffer
    block = (1 | 0 << 1 | 1000 << 3).to_bytes(3, "little") + bytes(1000)
    lying = b"\x28\xb5\x2f\xfd" + bytes([0x24, 24]) + block + bytes(4)
    params = zstandard.get_frame_parameters(lying)
    assert params.content_size == 24 and params.has_checksum
    with pytest.raises(ValueError, match="zstd"):
        decode_tensors(craft([("w", (4, 16), 24)], lying), {"w": (4, 16)})


def test_nan_payload_rejected_by_name():
    values = np.array([1.0, np.nan, 2.0], dtype=np.float32).tobytes()
    blob = craft([("layer.w", (3,), 12)], zframe(values), scheme_id=0)
    with pytest.raises(ValueError, match="'layer.w'.*NaN"):
        decode_tensors(blob, {"layer.w": (3,)})
    inf_scale = struct.pack("<f", float("inf")) + bytes(1)
    blob = craft([("b", (5,), 5)], zframe(inf_scale), scheme_id=2)
    with pytest.raises(ValueError, match="'b'"):
        decode_tensors(blob, {"b": (5,)})
    # int8 code -128 (never emitted, but a payload can carry it) times 3e38 overflows float32
    blob = craft([("b", (1,), 5)], zframe(struct.pack("<f", 3e38) + bytes([0x80])), scheme_id=2)
    with pytest.raises(ValueError, match="'b'"):
        decode_tensors(blob, {"b": (1,)})


def test_max_blob_bytes_and_expected_validation():
    ts = sample_tensors()
    blob, _ = encode_tensors(ts, "int8")
    with pytest.raises(ValueError, match="limit"):
        decode_tensors(blob, shapes_of(ts), max_blob_bytes=len(blob) - 1)
    with pytest.raises(ValueError, match="expected shape"):
        decode_tensors(blob, {**shapes_of(ts), "odd": (-1,)})
    with pytest.raises(ValueError):
        decode_tensors("not bytes", shapes_of(ts))


def test_every_truncation_is_a_value_error():
    ts = {"a": torch.randn(3, 5), "b": torch.randn(17)}
    for scheme in SCHEMES:
        blob, _ = encode_tensors(ts, scheme, chunk=4)
        for cut in range(len(blob)):
            with pytest.raises(ValueError):
                decode_tensors(blob[:cut], shapes_of(ts))
            try:
                blob_info(blob[:cut])  # header-only parse: fine once the table is complete
            except ValueError:
                pass


BLOBS = {s: encode_tensors({"a": torch.randn(3, 5), "b": torch.randn(17)}, s, chunk=4)[0] for s in SCHEMES}
EXPECTED = {"a": (3, 5), "b": (17,)}


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(SCHEMES), data=st.data())
def test_fuzz_bit_flips_only_value_error(scheme, data):
    blob = bytearray(BLOBS[scheme])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
    try:
        out = decode_tensors(bytes(blob), EXPECTED)
    except ValueError:
        return
    # a flip the checksum cannot see (header bits that keep it valid) must still decode cleanly
    assert set(out) == set(EXPECTED) and all(bool(torch.isfinite(t).all()) for t in out.values())


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from([b"", b"GTD1", b"GTD1\x01"]), junk=st.binary(max_size=300), scheme_id=st.integers(0, 6))
def test_fuzz_random_bytes_only_value_error(prefix, junk, scheme_id):
    blob = prefix + (bytes([scheme_id]) if prefix == b"GTD1\x01" else b"") + junk
    with pytest.raises(ValueError):
        decode_tensors(blob, EXPECTED)
    try:
        blob_info(blob)
    except ValueError:
        pass


@settings(max_examples=100, deadline=None)
@given(scheme=st.sampled_from(SCHEMES), junk=st.binary(min_size=1, max_size=200), count=st.integers(0, 3))
def test_fuzz_valid_header_random_frame(scheme, junk, count):
    entries = [("a", (3, 5), get_codec(scheme, 4).payload_size((3, 5))), ("b", (17,), get_codec(scheme, 4).payload_size((17,)))]
    for frame in (junk, b"\x28\xb5\x2f\xfd" + junk, zframe(junk)):
        blob = craft(entries[:count] if count < 3 else entries, frame, scheme_id=SCHEMES.index(scheme), chunk=4)
        with pytest.raises(ValueError):
            decode_tensors(blob, EXPECTED)


@pytest.mark.parametrize("sign_scale", ["mean_abs", "rms"])
@pytest.mark.parametrize("shape", [(37, 13), (1000,), (3, 5, 7), (1, 300), (300, 1)])
def test_fused_sign_feedback_matches_the_generic_definition(monkeypatch, sign_scale, shape):
    """The cache-blocked sign + feedback path == y = x + r; encode(y); r = y - decoded."""
    from geotrain.common.compression import SignCodec

    monkeypatch.setattr(SignCodec, "block", 40)  # many blocks, ragged last block, chunk tails
    codec = get_codec("sign", 16, sign_scale)
    ef = ErrorFeedback(codec)
    g = torch.Generator().manual_seed(5)
    r = torch.zeros(shape)
    for _ in range(3):
        x = torch.randn(shape, generator=g)
        y = x + r
        monkeypatch.setattr(SignCodec, "block", 1 << 30)
        want_payload, want = codec.encode(y)
        monkeypatch.setattr(SignCodec, "block", 40)
        payload, dec = ef.compress("w", x)
        assert payload == want_payload and same_bits(dec, want)
        r = y - want
        assert same_bits(ef.state_dict()["w"], r)
