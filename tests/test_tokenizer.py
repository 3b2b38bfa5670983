"""Tokenizers: byte and bpe round trips, end-of-text handling, specs, bad input."""

from __future__ import annotations

import pytest

from geotrain.common.tokenizer import (
    EOT_TEXT,
    ByteTokenizer,
    CharTokenizer,
    ExternalTokenizer,
    load_tokenizer,
    train_bpe,
)

SAMPLES = ["", "hello world", "héllo wörld ✓ 日本語 🚀", "tabs\tand\nnewlines\r\n", EOT_TEXT + " literal"]


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids


def test_byte_tokenizer_constants_and_eot():
    tok = ByteTokenizer()
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)
    # text never produces the end-of-text id, even the literal marker
    assert 256 not in tok.encode(EOT_TEXT)
    assert tok.decode([104, 105, 256, 33]) == "hi" + EOT_TEXT + "!"


def test_byte_decode_invalid_utf8_gives_replacement_char():
    tok = ByteTokenizer()
    assert tok.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # truncated multibyte sequence


def test_byte_decode_rejects_out_of_range():
    with pytest.raises(ValueError, match="257"):
        ByteTokenizer().decode([257])


def test_load_tokenizer_byte_and_unknown():
    tok = load_tokenizer(ByteTokenizer().spec())
    assert isinstance(tok, ByteTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'"):
        load_tokenizer({"name": "wordpiece"})
    with pytest.raises(ValueError, match="name"):
        load_tokenizer({})


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    corpus = ["the quick brown fox jumps over the lazy dog. " * 20, "def foo(x):\n    return x + 1\n" * 20]
    return train_bpe(iter(corpus * 5), 320, path)


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_merges_and_eot(bpe):
    assert 257 <= bpe.vocab_size <= 320
    text = "the quick brown fox"
    assert len(bpe.encode(text)) < len(text.encode())  # merges learned
    assert bpe.decode(bpe.encode("dog") + [bpe.eot_id]) == "dog" + EOT_TEXT
    assert bpe.eot_id not in bpe.encode("a " + EOT_TEXT + " b")  # literal marker stays text


def test_bpe_spec_reload(bpe):
    spec = bpe.spec()
    assert spec["name"] == "bpe" and spec["file"] == "tokenizer.json" and len(spec["sha256"]) == 64
    again = load_tokenizer(spec, bpe.path.parent)
    assert again.encode("lazy dog") == bpe.encode("lazy dog")
    with pytest.raises(ValueError, match="data directory"):
        load_tokenizer(spec, None)


def test_bpe_reload_detects_changed_file(bpe, tmp_path):
    spec = bpe.spec()
    (tmp_path / "tokenizer.json").write_bytes(bpe.path.read_bytes().replace(b'"dog"', b'"dgo"', 1) + b" ")
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(spec, tmp_path)


def test_bpe_vocab_too_small(tmp_path):
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(["abc"], 256, tmp_path / "tokenizer.json")


def test_char_and_external():
    tok = CharTokenizer(["\n", " ", "a", "b"])
    assert tok.encode("ab a\n") == [2, 3, 1, 2, 0]
    assert tok.decode([3, 2]) == "ba"
    assert load_tokenizer(tok.spec()).encode("ba") == [3, 2]
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("z")
    ext = load_tokenizer(ExternalTokenizer(50304, "gpt2").spec())
    assert ext.vocab_size == 50304
    with pytest.raises(ValueError, match="no known tokenizer"):
        ext.decode([1])
