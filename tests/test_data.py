"""Token data layer: shards, manifest, prepare, embedded corpus, nanoGPT import, readers, CLI."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from geotrain.common import corpus
from geotrain.cli import cli
from geotrain.common.corpus import default_corpus_files, default_data_dir, resolve_data_dir
from geotrain.common.nanogpt import import_nanogpt
from geotrain.common.prepare import prepare
from geotrain.common.reader import TokenData
from geotrain.common.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    SHARD_VERSION,
    Manifest,
    ShardInfo,
    read_shard,
    shard_sha256,
    write_shard,
)

EOT = 256


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def split_tokens(m: Manifest, out: Path, split: str) -> np.ndarray:
    parts = [np.asarray(read_shard(out / s.name, s)) for s in m.split(split)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def docs_of(tokens: np.ndarray) -> list[bytes]:
    """Split a byte-tokenizer stream at end-of-text ids (every document ends with one)."""
    assert len(tokens) == 0 or tokens[-1] == EOT
    out, cur = [], []
    for t in tokens.tolist():
        if t == EOT:
            out.append(bytes(cur))
            cur = []
        else:
            cur.append(t)
    return out


# --------------------------------------------------------------------------- shards


def test_shard_header_and_round_trip(tmp_path):
    tokens = np.array([0, 1, 256, 65535, 7], dtype=np.int64)
    path = tmp_path / "s.bin"
    sha = write_shard(path, tokens, "uint16")
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * len(tokens) == 42
    magic, version, code, count = struct.unpack("<8sIIQ", raw[:24])
    assert (magic, version, code, count) == (SHARD_MAGIC, SHARD_VERSION, 1, 5)
    assert raw[24:32] == b"\0" * 8
    assert np.frombuffer(raw[32:], "<u2").tolist() == tokens.tolist()
    assert sha == shard_sha256(path)
    arr = read_shard(path, ShardInfo("s.bin", "train", 5, sha))
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and arr.tolist() == tokens.tolist()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp file left


def test_shard_uint32_and_range_checks(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.array([70000, 2**32 - 1]), "uint32")
    assert path.stat().st_size == HEADER_BYTES + 8
    assert read_shard(path).tolist() == [70000, 2**32 - 1]
    with pytest.raises(ValueError, match="do not fit uint16"):
        write_shard(tmp_path / "t.bin", np.array([65536]), "uint16")
    with pytest.raises(ValueError, match="uint8"):
        write_shard(tmp_path / "t.bin", np.array([1]), "uint8")


def test_read_shard_rejects_corruption(tmp_path):
    path = tmp_path / "s.bin"
    sha = write_shard(path, np.arange(100), "uint16")
    info = ShardInfo("s.bin", "train", 100, sha)
    good = path.read_bytes()

    path.write_bytes(b"NOTASHRD" + good[8:])
    with pytest.raises(ValueError, match=r"s\.bin has bad magic"):
        read_shard(path, info)

    path.write_bytes(good[:-10])
    with pytest.raises(ValueError, match=r"s\.bin has wrong length"):
        read_shard(path, info)

    path.write_bytes(good[:10])
    with pytest.raises(ValueError, match=r"s\.bin is truncated"):
        read_shard(path, info)

    flipped = bytearray(good)
    flipped[-1] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"s\.bin sha256 mismatch"):
        read_shard(path, info)
    assert read_shard(path, info, verify_sha=False)[-1] != 99  # opt-out reads it anyway

    path.write_bytes(good)
    with pytest.raises(ValueError, match="manifest says 99"):
        read_shard(path, ShardInfo("s.bin", "train", 99, sha))
    with pytest.raises(ValueError, match="missing"):
        read_shard(tmp_path / "nope.bin")


# --------------------------------------------------------------------------- manifest


def test_manifest_round_trip_and_errors(tmp_path):
    m = Manifest(1, {"name": "byte"}, 257, "uint16", [ShardInfo("train_000000.bin", "train", 3, "ab")], ["x"])
    assert Manifest.from_json(m.to_json()) == m
    m.save(tmp_path)
    assert Manifest.load(tmp_path) == m
    assert m.split("train") == m.shards and m.split("val") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]

    with pytest.raises(ValueError, match=r"manifest\.json is missing"):
        Manifest.load(tmp_path / "empty")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json: manifest is not valid JSON"):
        Manifest.load(tmp_path)
    bad = json.loads(m.to_json())
    bad["shards"][0]["name"] = "../etc/passwd"
    with pytest.raises(ValueError, match="bad file name"):
        Manifest.from_json(json.dumps(bad))
    bad = json.loads(m.to_json())
    bad["vocab_size"], bad["dtype"] = 70000, "uint16"
    with pytest.raises(ValueError, match="does not fit dtype uint16"):
        Manifest.from_json(json.dumps(bad))
    bad = json.loads(m.to_json())
    bad["format_version"] = 9
    with pytest.raises(ValueError, match="format version 9"):
        Manifest.from_json(json.dumps(bad))


# --------------------------------------------------------------------------- prepare


def test_single_file_val_is_last_fraction(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(200))
    src = write(tmp_path / "in.txt", text)
    out = tmp_path / "out"
    m = prepare([src], out, val_fraction=0.2, progress=False)
    stream = list(text.encode()) + [EOT]
    cut = int(len(stream) * 0.8)
    assert split_tokens(m, out, "train").tolist() == stream[:cut]
    assert split_tokens(m, out, "val").tolist() == stream[cut:]
    assert (m.vocab_size, m.dtype, m.tokenizer["name"]) == (257, "uint16", "byte")
    assert m.sources == [str(src)]
    assert Manifest.load(out) == m


def test_val_fraction_zero_has_no_val(tmp_path):
    src = write(tmp_path / "in.txt", "abc" * 100)
    m = prepare([src], tmp_path / "out", val_fraction=0.0, progress=False)
    assert m.split("val") == [] and sum(s.tokens for s in m.split("train")) == 301


def test_multi_document_split_is_whole_documents_and_deterministic(tmp_path):
    texts = {f"d{i:02d}.txt": f"document {i} " + "word " * (20 + 7 * i) for i in range(20)}
    for name, t in texts.items():
        write(tmp_path / "corpus" / "sub" / name if int(name[1:3]) % 2 else tmp_path / "corpus" / name, t)
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    m1 = prepare([tmp_path / "corpus"], out1, val_fraction=0.25, workers=1, progress=False)
    m2 = prepare([tmp_path / "corpus"], out2, val_fraction=0.25, workers=2, progress=False)  # spawned
    assert [(s.name, s.split, s.tokens, s.sha256) for s in m1.shards] == [
        (s.name, s.split, s.tokens, s.sha256) for s in m2.shards
    ]
    train, val = docs_of(split_tokens(m1, out1, "train")), docs_of(split_tokens(m1, out1, "val"))
    all_docs = {t.encode() for t in texts.values()}
    assert set(train) | set(val) == all_docs and not set(train) & set(val)
    assert len(train) + len(val) == 20 and 1 <= len(val) < 20
    n_val = sum(len(d) + 1 for d in val)
    n_all = sum(len(d) + 1 for d in all_docs)
    assert 0.25 * n_all <= n_val < 0.25 * n_all + max(len(d) + 1 for d in val)
    # directory order: sorted relative paths (odd documents are in sub/, after the top-level files)
    assert [Path(s).name for s in m1.sources] == [f"d{i:02d}.txt" for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]


def test_jsonl_and_multiple_shards(tmp_path):
    rows = [{"text": f"row {i} " + "x" * i} for i in range(30)] + [{"text": ""}]
    src = write(tmp_path / "in.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out"
    m = prepare([src], out, val_fraction=0.1, shard_tokens=100, progress=False)
    assert all(s.tokens <= 100 for s in m.shards) and len(m.split("train")) > 3
    got = docs_of(split_tokens(m, out, "train")) + docs_of(split_tokens(m, out, "val"))
    assert sorted(got) == sorted(r["text"].encode() for r in rows if r["text"])
    assert all(s.tokens == 100 for s in m.split("train")[:-1])


def test_uint32_path(tmp_path):
    src = write(tmp_path / "in.txt", "héllo " * 50)
    out = tmp_path / "out"
    m = prepare([src], out, vocab_size=70_000, progress=False)
    assert (m.dtype, m.vocab_size) == ("uint32", 70_000)
    info = m.split("train")[0]
    assert (out / info.name).stat().st_size == HEADER_BYTES + 4 * info.tokens
    assert struct.unpack("<I", (out / info.name).read_bytes()[12:16])[0] == 2
    td = TokenData(out)
    assert td.vocab_size == 70_000 and td.tokens(info.name).dtype == np.uint32
    assert td.tokenizer().decode(td.tokens(info.name)).startswith("héllo héllo")


def test_prepare_bpe_end_to_end(tmp_path):
    pytest.importorskip("tokenizers")
    text = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(300))
    src = write(tmp_path / "code.py", text)
    out = tmp_path / "out"
    m = prepare([src], out, tokenizer="bpe", vocab_size=400, val_fraction=0.1, progress=False)
    assert (out / "tokenizer.json").is_file() and m.tokenizer["name"] == "bpe"
    assert 257 <= m.vocab_size <= 400 and m.vocab_size == m.tokenizer["vocab_size"]
    td = TokenData(out)
    tok = td.tokenizer()
    stream = split_tokens(m, out, "train").tolist() + split_tokens(m, out, "val").tolist()
    assert stream[-1] == tok.eot_id and stream.count(tok.eot_id) == 1
    assert tok.decode(stream[:-1]) == text
    assert len(stream) < len(text.encode()) / 2  # BPE actually compresses


def test_undecodable_bytes_warn_once_per_file(tmp_path, capsys):
    bad = write(tmp_path / "bad.txt", b"caf\xe9 \xff\xfe ok")
    good = write(tmp_path / "good.txt", "fine")
    out = tmp_path / "out"
    m = prepare([bad, good], out, val_fraction=0.0, workers=1, progress=False)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "bad.txt" in err and "U+FFFD" in err
    assert docs_of(split_tokens(m, out, "train")) == ["caf\ufffd \ufffd\ufffd ok".encode(), b"fine"]


def test_bad_inputs(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"input .*missing\.txt does not exist"):
        prepare([tmp_path / "missing.txt"], out, progress=False)
    assert not out.exists()
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match=r"no text in the inputs \(zero tokens\): .*empty\.txt"):
        prepare([empty], out, progress=False)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="emptydir contains no files"):
        prepare([tmp_path / "emptydir"], out, progress=False)
    src = write(tmp_path / "in.txt", "text")
    for f in (0.6, -0.1):
        with pytest.raises(ValueError, match=r"val fraction must be in \[0, 0.5\]"):
            prepare([src], out, val_fraction=f, progress=False)
    with pytest.raises(ValueError, match="too large"):
        prepare([src], out, vocab_size=2**32 + 1, progress=False)
    with pytest.raises(ValueError, match="at least 257"):
        prepare([src], out, tokenizer="bpe", vocab_size=200, progress=False)
    bad_jsonl = write(tmp_path / "x.jsonl", '{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: expected a JSON object with a string field 'text'"):
        prepare([bad_jsonl], out, progress=False)


def test_reprepare_replaces_old_shards(tmp_path):
    out = tmp_path / "out"
    prepare([write(tmp_path / "a.txt", "a" * 500)], out, shard_tokens=100, progress=False)
    m = prepare([write(tmp_path / "b.txt", "b" * 50)], out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([s.name for s in m.shards] + ["manifest.json"])


# --------------------------------------------------------------------------- readers


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    text = "".join(f"{i:05d} " for i in range(3000))  # 18,000 distinct-ish bytes
    src = write(root / "in.txt", text)
    out = root / "out"
    prepare([src], out, val_fraction=0.1, shard_tokens=4000, progress=False)
    return out


def test_get_batch_deterministic_across_instances(prepared):
    a, b = TokenData(prepared), TokenData(prepared, verify=False)
    x1, y1 = a.get_batch("train", 8, 32, seed=7, step=3)
    x2, y2 = b.get_batch("train", 8, 32, seed=7, step=3)
    assert x1.dtype == torch.int64 and x1.shape == (8, 32) and y1.shape == (8, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    x3, _ = a.get_batch("train", 8, 32, seed=7, step=4)
    x4, _ = a.get_batch("train", 8, 32, seed=8, step=3)
    xv, _ = a.get_batch("val", 8, 32, seed=7, step=3)
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4) and not torch.equal(x1, xv)
    # every row is a real window of one train shard
    shards = [np.asarray(a.tokens(s.name)).astype(np.int64) for s in a.manifest.split("train")]
    for row in torch.cat([x1, y1[:, -1:]], 1).numpy():
        assert any(
            (np.lib.stride_tricks.sliding_window_view(s, 33) == row).all(1).any() for s in shards if len(s) >= 33
        )


def test_get_batch_same_in_another_process(prepared):
    x, y = TokenData(prepared).get_batch("train", 4, 16, seed=123, step=99)
    code = (
        "import sys; from geotrain.common.reader import TokenData;"
        "x, y = TokenData(sys.argv[1]).get_batch('train', 4, 16, seed=123, step=99);"
        "print(x.tolist(), y.tolist())"
    )
    res = subprocess.run([sys.executable, "-c", code, str(prepared)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{x.tolist()} {y.tolist()}"


def test_get_batch_covers_all_shards_by_length(prepared):
    td = TokenData(prepared)
    names = [s.name for s in td.manifest.split("train")]
    assert len(names) == 5 and td.num_tokens("train") == sum(len(td.tokens(n)) for n in names)
    x, _ = td.get_batch("train", 2000, 8, seed=0, step=0)
    firsts = {}
    for n in names:
        arr = np.asarray(td.tokens(n)).astype(np.int64)
        firsts[n] = set(map(tuple, np.lib.stride_tricks.sliding_window_view(arr, 8)))
    hits = {n: sum(tuple(r) in firsts[n] for r in x.numpy().tolist()) for n in names}
    assert all(v > 0 for v in hits.values())
    assert hits[names[-1]] < hits[names[0]]  # the short last shard is drawn less


def test_get_batch_errors(prepared):
    td = TokenData(prepared)
    with pytest.raises(ValueError, match="no window of 4001 tokens"):
        td.get_batch("train", 1, 4000, seed=0, step=0)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        td.get_batch("test", 1, 8, seed=0, step=0)


def test_get_range_batch(prepared):
    td = TokenData(prepared)
    name = td.manifest.split("train")[0].name
    arr = np.asarray(td.tokens(name)).astype(np.int64)
    x, y = td.get_range_batch(name, 10, 3, 5)
    assert x.tolist() == arr[10:25].reshape(3, 5).tolist()
    assert y.tolist() == arr[11:26].reshape(3, 5).tolist()
    x, _ = td.get_range_batch(name, len(arr) - 11, 2, 5)  # exactly fits
    assert x.shape == (2, 5)
    with pytest.raises(ValueError, match=f"leaves shard {name}"):
        td.get_range_batch(name, len(arr) - 10, 2, 5)
    with pytest.raises(ValueError, match="no shard 'nope.bin'"):
        td.get_range_batch("nope.bin", 0, 1, 1)


def test_tokendata_detects_corrupt_and_missing(tmp_path, prepared):
    import shutil

    with pytest.raises(ValueError, match=r"manifest\.json is missing"):
        TokenData(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "train_000002.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train_000002\.bin sha256 mismatch"):
        TokenData(copy)
    TokenData(copy, verify=False)  # header and length still fine
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(ValueError, match=r"train_000002\.bin has wrong length"):
        TokenData(copy, verify=False)
    with pytest.raises(ValueError, match="manifest.json is missing"):
        resolve_data_dir(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    assert resolve_data_dir(prepared) == prepared


# --------------------------------------------------------------------------- nanoGPT


def test_nanogpt_bins(tmp_path):
    src = tmp_path / "shakespeare_char"
    src.mkdir()
    chars = sorted(set("hello world\n"))
    stoi = {c: i for i, c in enumerate(chars)}
    text = "hello world\n" * 50
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    ids[:500].tofile(src / "train.bin")
    ids[500:].tofile(src / "val.bin")
    with open(src / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)

    td = TokenData(src)  # auto-detected raw bins
    assert td.vocab_size == len(chars) and td.num_tokens("train") == 500 and td.num_tokens("val") == 100
    assert td.tokenizer().decode(td.tokens("train.bin")[:12]) == "hello world\n"
    assert resolve_data_dir(src) == src

    out = tmp_path / "converted"
    m = import_nanogpt(src, out, shard_tokens=300)
    assert m.tokenizer["name"] == "char" and [s.tokens for s in m.shards] == [300, 200, 100]
    conv = TokenData(out)
    assert np.concatenate([conv.tokens(s.name) for s in m.split("train")]).tolist() == ids[:500].tolist()
    x1, _ = conv.get_batch("train", 2, 8, seed=1, step=1)
    assert x1.shape == (2, 8)

    (src / "meta.pkl").unlink()
    with pytest.raises(ValueError, match="--vocab-size"):
        import_nanogpt(src, tmp_path / "c2")
    with pytest.raises(ValueError, match="--vocab-size"):
        TokenData(src)
    m = import_nanogpt(src, tmp_path / "c3", vocab_size=50304)
    assert m.tokenizer["name"] == "external" and m.vocab_size == 50304
    with pytest.raises(ValueError, match=r"id 8 >= vocab size 5"):
        import_nanogpt(src, tmp_path / "c4", vocab_size=5)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(src / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": Evil()}, f)
    with pytest.raises(ValueError, match=r"meta\.pkl.*only plain data"):
        import_nanogpt(src, tmp_path / "c5")


# --------------------------------------------------------------------------- embedded corpus


def test_default_corpus_files_small_cap():
    files = default_corpus_files(300_000)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert files and sum(p.stat().st_size for p in files) <= 300_000
    rels = [p.relative_to(stdlib).as_posix() for p in files]
    assert rels == sorted(rels) and all(r.endswith(".py") for r in rels)
    banned = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    assert not any(banned & set(r.split("/")[:-1]) for r in rels)
    full = default_corpus_files()
    assert 4 << 20 < sum(p.stat().st_size for p in full) <= corpus.DEFAULT_CORPUS_BYTES == 8 << 20


def test_default_data_dir_cached_and_concurrent(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "DEFAULT_CORPUS_BYTES", 150_000)
    with ThreadPoolExecutor(2) as ex:
        dirs = list(ex.map(lambda _: default_data_dir(), range(2)))
    assert dirs[0] == dirs[1] and dirs[0].parent == tmp_path / "cache"
    assert dirs[0].name.startswith(f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [dirs[0].name]  # no temp dirs left
    td = TokenData(dirs[0])
    n = td.num_tokens("train") + td.num_tokens("val")
    files = default_corpus_files(150_000)
    assert n == sum(p.stat().st_size for p in files) + len(files)  # pure-ASCII-ish stdlib + one eot each
    mtime = (dirs[0] / "manifest.json").stat().st_mtime_ns
    assert resolve_data_dir(None) == dirs[0] and resolve_data_dir("") == dirs[0]
    assert (dirs[0] / "manifest.json").stat().st_mtime_ns == mtime  # reused, not rebuilt
    # a corrupted cache entry is rebuilt
    shard = dirs[0] / td.manifest.shards[0].name
    shard.write_bytes(shard.read_bytes()[:-4])
    assert default_data_dir() == dirs[0] and TokenData(dirs[0]).num_tokens("train") == td.num_tokens("train")


# --------------------------------------------------------------------------- HF datasets (optional)


def test_hf_dataset_local_json(tmp_path):
    pytest.importorskip("datasets")
    src = write(tmp_path / "rows.jsonl", "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    out = tmp_path / "out"
    m = prepare([], out, hf_dataset=str(src), val_fraction=0.2, progress=False)
    got = docs_of(split_tokens(m, out, "train")) + docs_of(split_tokens(m, out, "val"))
    assert sorted(got) == sorted(f"row {i}".encode() for i in range(10))


# --------------------------------------------------------------------------- CLI


def test_cli_prepare_happy_path(tmp_path):
    write(tmp_path / "docs" / "a.txt", "alpha " * 100)
    write(tmp_path / "docs" / "b.txt", "beta " * 100)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["prepare", str(tmp_path / "docs"), "--out", str(out), "--workers", "1",
                                   "--val-fraction", "0.3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "tokenizer byte, vocab_size 257, dtype uint16" in res.output
    m = Manifest.load(out)
    assert sum(s.tokens for s in m.shards) == 600 + 500 + 2
    assert len(docs_of(split_tokens(m, out, "val"))) == 1


def test_cli_prepare_missing_input(tmp_path):
    res = CliRunner().invoke(cli, ["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "error: input" in res.output and "nope.txt does not exist" in res.output


def test_cli_prepare_bad_val_fraction_and_help(tmp_path):
    src = write(tmp_path / "a.txt", "abc")
    res = CliRunner().invoke(cli, ["prepare", str(src), "--out", str(tmp_path / "o"), "--val-fraction", "0.7"])
    assert res.exit_code == 2 and "val fraction must be in [0, 0.5], got 0.7" in res.output
    help_text = CliRunner().invoke(cli, ["prepare", "--help"]).output
    assert "U+FFFD" in help_text and "--from-nanogpt" in help_text


def test_default_data_dir_two_processes(tmp_path):
    env = dict(os.environ, GEOTRAIN_CACHE=str(tmp_path / "cache"))
    code = (
        "from geotrain.common import corpus; corpus.DEFAULT_CORPUS_BYTES = 100_000;"
        "print(corpus.default_data_dir())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    (only,) = paths
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(only).name]
    assert TokenData(only).num_tokens("train") > 50_000


def test_output_inside_input_dir_is_not_read_back(tmp_path):
    write(tmp_path / "data" / "a.txt", "some text " * 20)
    out = tmp_path / "data" / "tokens"
    m1 = prepare([tmp_path / "data"], out, progress=False)
    m2 = prepare([tmp_path / "data"], out, progress=False)
    assert [s.sha256 for s in m1.shards] == [s.sha256 for s in m2.shards]
    assert m2.sources == [str(tmp_path / "data" / "a.txt")]


def test_sequence_order_is_a_deterministic_permutation_per_epoch():
    from geotrain.common.order import gather_sequences, sequence_order

    a = sequence_order("train_000000.bin", 6401, 64, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, sequence_order("train_000000.bin", 6401, 64, seed=3, epoch=0))
    assert not np.array_equal(a, sequence_order("train_000000.bin", 6401, 64, seed=3, epoch=1))
    tokens = np.arange(6401, dtype=np.uint16)
    x, y = gather_sequences(tokens, a[:2], 64)
    assert x.shape == (2, 64) and x[0, 0] == a[0] * 64 and np.array_equal(y, x + 1)
