"""The gpt2 tokenizer (tiktoken), `prepare --tokenizer gpt2`, its bad inputs, and vocabulary padding.

Everything runs offline on a small BPE built from local merges (tests/tiny_bpe.py); the rank table
is loaded through the same code paths as GPT-2's real files.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from geotrain.cli import cli
from geotrain.common.config import ModelSection, model_config, padded_vocab_size
from geotrain.common.model import GPT
from geotrain.common.nanogpt import import_nanogpt
from geotrain.common.prepare import prepare
from geotrain.common.reader import TokenData
from geotrain.common.shards import Manifest, read_shard
from geotrain.common.tokenizer import (
    EOT_TEXT,
    GPT2_BASE_URL,
    GPT2_FILE,
    GPT2Tokenizer,
    gpt2_encoding,
    load_gpt2_tokenizer,
    load_tokenizer,
)
from tiny_bpe import OTHER_MERGES, tiny_encoding, write_data_gym

TEXTS = ["the cat sat on the mat", "in the sun the cats purr\n\nthe end", "héllo ✓ " + EOT_TEXT + " the"]


@pytest.fixture(autouse=True)
def empty_tiktoken_cache(tmp_path, monkeypatch):
    """No test may find (or fetch) real GPT-2 files: tiktoken's cache is an empty directory."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    return cache


@pytest.fixture
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer(tiny_encoding())


# --------------------------------------------------------------------------- the tokenizer


def test_gpt2_tokenizer_round_trip_and_eot(tok):
    assert tok.name == "gpt2" and tok.vocab_size == 256 + 10 + 1 and tok.eot_id == 266
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode_array(text).tolist() == ids
        assert tok.eot_id not in ids  # the literal marker in a document is ordinary text
    # merges are used: " the" is one token, " cat" is one token
    assert len(tok.encode(" the cat")) == 2
    assert tok.decode([tok.eot_id]) == EOT_TEXT
    assert tok.decode(tok.encode("a\xff".encode("latin-1").decode("latin-1"))) == "a\xff"
    with pytest.raises(ValueError, match="outside the gpt2 vocabulary"):
        tok.decode([tok.vocab_size])


def test_gpt2_tokenizer_needs_endoftext():
    import tiktoken

    from geotrain.common.tokenizer import GPT2_PAT_STR

    enc = tiktoken.Encoding("noeot", pat_str=GPT2_PAT_STR, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={})
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> special token"):
        GPT2Tokenizer(enc)
    with pytest.raises(ValueError, match="needs a tiktoken.Encoding"):
        GPT2Tokenizer("gpt2")


def test_rank_files_load_to_the_same_tokenizer(tok, tmp_path):
    gym = write_data_gym(tmp_path / "gym")
    (tmp_path / "saved").mkdir()
    saved = tok.save(tmp_path / "saved")
    for source in (gym, gym / "vocab.bpe", saved, tmp_path / "saved"):
        other = load_gpt2_tokenizer(source)
        assert other.spec() == tok.spec(), source
        assert other.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_data_gym_files_that_disagree_are_refused(tmp_path):
    gym = write_data_gym(tmp_path / "gym")
    (gym / "encoder.json").write_text((gym / "encoder.json").read_text().replace('"th": 256', '"th": 999'))
    with pytest.raises(ValueError, match="encoder.json does not match vocab.bpe"):
        gpt2_encoding(gym)
    (gym / "encoder.json").unlink()
    with pytest.raises(ValueError, match="encoder.json is missing"):
        gpt2_encoding(gym / "vocab.bpe")


def test_missing_files_offline_say_how_to_get_them(tmp_path, empty_tiktoken_cache):
    for source in (None, tmp_path / "nowhere", tmp_path):
        with pytest.raises(ValueError) as err:
            gpt2_encoding(source)
        msg = str(err.value)
        assert msg.startswith("GPT-2 BPE files not found") and "\n" not in msg
        assert "tiktoken.get_encoding('gpt2')" in msg and "--tokenizer-file" in msg and GPT2_BASE_URL in msg
    assert str(empty_tiktoken_cache) in str(pytest.raises(ValueError, gpt2_encoding).value)


def test_corrupt_cached_file_is_named(empty_tiktoken_cache):
    for name in ("vocab.bpe", "encoder.json"):
        (empty_tiktoken_cache / hashlib.sha1((GPT2_BASE_URL + name).encode()).hexdigest()).write_bytes(b"junk")
    with pytest.raises(ValueError, match="cached GPT-2 vocab.bpe is corrupt"):
        gpt2_encoding()


# --------------------------------------------------------------------------- prepare


def _docs(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    for i, text in enumerate(TEXTS * 3):
        (src / f"d{i:02d}.txt").write_text(text, encoding="utf-8")
    return src


def _all_tokens(m: Manifest, out) -> list[int]:
    return [int(t) for s in m.shards for t in np.asarray(read_shard(out / s.name, s))]


def test_prepare_with_a_given_encoding(tok, tmp_path):
    out = tmp_path / "out"
    m = prepare([_docs(tmp_path)], out, tokenizer=tok, val_fraction=0.2, progress=False)
    assert m.tokenizer == tok.spec() and m.tokenizer["name"] == "gpt2"
    assert m.vocab_size == tok.vocab_size and m.dtype == "uint16"
    assert (out / GPT2_FILE).is_file()
    ids = _all_tokens(m, out)
    assert ids.count(tok.eot_id) == len(TEXTS) * 3  # one end-of-text per document
    docs = sorted(tok.decode(ids).split(EOT_TEXT)[:-1])  # the literal marker inside TEXTS[2] splits too
    assert "".join(docs).count("the cat sat on the mat") == 3
    # sampling/eval rebuild it from the data directory alone (tiktoken's cache is empty here)
    again = TokenData(out).tokenizer()
    assert isinstance(again, GPT2Tokenizer) and again.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_prepare_gpt2_in_spawned_encoders_matches_in_process(tmp_path):
    gym, docs = write_data_gym(tmp_path / "gym"), _docs(tmp_path)
    one = prepare([docs], tmp_path / "one", tokenizer="gpt2", tokenizer_file=gym, workers=1, progress=False)
    two = prepare([docs], tmp_path / "two", tokenizer="gpt2", tokenizer_file=gym, workers=2, progress=False)
    assert one == two
    assert _all_tokens(one, tmp_path / "one") == _all_tokens(two, tmp_path / "two")


def test_prepare_gpt2_bad_arguments(tok, tmp_path):
    docs = _docs(tmp_path)
    with pytest.raises(ValueError, match="fixes the vocabulary; give no vocab size"):
        prepare([docs], tmp_path / "o", tokenizer=tok, vocab_size=50304, progress=False)
    with pytest.raises(ValueError, match="only applies to the gpt2 tokenizer"):
        prepare([docs], tmp_path / "o", tokenizer="byte", tokenizer_file=tmp_path, progress=False)
    with pytest.raises(ValueError, match="GPT-2 BPE files not found"):
        prepare([docs], tmp_path / "o", tokenizer="gpt2", progress=False)
    assert not (tmp_path / "o").exists()  # refused before any output is written


def test_cli_prepare_gpt2(tmp_path):
    gym = write_data_gym(tmp_path / "gym")
    res = CliRunner().invoke(cli, ["prepare", str(_docs(tmp_path)), "--out", str(tmp_path / "o"), "--tokenizer",
                                   "gpt2", "--tokenizer-file", str(gym), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "tokenizer gpt2, vocab_size 267, dtype uint16" in res.output


def test_cli_prepare_gpt2_offline_without_files_is_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["prepare", str(_docs(tmp_path)), "--out", str(tmp_path / "o"),
                                   "--tokenizer", "gpt2", "--no-progress"])
    assert res.exit_code == 2
    assert res.output.startswith("error: GPT-2 BPE files not found") and res.output.count("\n") == 1
    assert "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["prepare", str(tmp_path / "docs"), "--out", str(tmp_path / "o"),
                                   "--tokenizer-file", str(tmp_path)])
    assert res.exit_code == 2 and "--tokenizer-file applies to --tokenizer gpt2 only" in res.output


# --------------------------------------------------------------------------- vocabulary mismatches


def test_data_of_another_vocabulary_is_refused(tok, tmp_path):
    out = tmp_path / "out"
    m = prepare([_docs(tmp_path)], out, tokenizer=tok, progress=False)
    other = write_data_gym(tmp_path / "other", OTHER_MERGES)
    with pytest.raises(ValueError, match="is not the one this data/checkpoint was tokenized with"):
        load_tokenizer(m.tokenizer, out, tokenizer_file=other)
    # a swapped rank file beside the shards is caught the same way
    GPT2Tokenizer(tiny_encoding(OTHER_MERGES)).save(out)
    with pytest.raises(ValueError, match="vocab 259.*vocab 267"):
        TokenData(out).tokenizer()


def test_import_nanogpt_as_gpt2(tok, tmp_path):
    src = tmp_path / "owt"
    src.mkdir()
    ids = np.asarray(tok.encode(TEXTS[0]) + [tok.eot_id] + tok.encode(TEXTS[1]), dtype="<u2")
    ids.tofile(src / "train.bin")
    ids[:5].tofile(src / "val.bin")
    m = import_nanogpt(src, tmp_path / "o", tokenizer=tok)
    assert m.tokenizer == tok.spec() and m.vocab_size == tok.vocab_size
    n = len(tok.encode(TEXTS[0]))
    assert TokenData(tmp_path / "o").tokenizer().decode(_all_tokens(m, tmp_path / "o")[:n]) == TEXTS[0]
    with pytest.raises(ValueError, match="vocab size 50304 does not match the gpt2 tokenizer's vocabulary"):
        import_nanogpt(src, tmp_path / "o2", vocab_size=50304, tokenizer=tok)
    np.asarray([1, tok.vocab_size], dtype="<u2").tofile(src / "train.bin")
    with pytest.raises(ValueError, match="holds token id 267 >= vocab size 267 of the gpt2 tokenizer"):
        import_nanogpt(src, tmp_path / "o3", tokenizer=tok)


def test_cli_from_nanogpt_refuses_text_tokenizers(tmp_path):
    res = CliRunner().invoke(cli, ["prepare", "--from-nanogpt", str(tmp_path), "--out", str(tmp_path / "o"),
                                   "--tokenizer", "byte"])
    assert res.exit_code == 2 and "--tokenizer byte cannot apply" in res.output


# --------------------------------------------------------------------------- vocabulary padding


def test_model_vocab_padded_from_the_manifest():
    assert [padded_vocab_size(n) for n in (1, 64, 65, 257, 50257)] == [64, 64, 128, 320, 50304]
    cfg = ModelSection(preset="gpt2").build(50257)
    assert (cfg.vocab_size, cfg.token_vocab_size, cfg.n_token_ids) == (50304, 50257, 50257)
    with pytest.raises(ValueError, match="token_vocab_size must be in 1..vocab_size"):
        model_config("nano", vocab_size=64, token_vocab_size=65)


def _padded_and_plain(n: int = 70):
    padded = GPT(ModelSection(preset="nano", n_layer=1, n_head=2, n_embd=16, block_size=8).build(n))
    plain = GPT(model_config("nano", vocab_size=n, n_layer=1, n_head=2, n_embd=16, block_size=8))
    assert padded.config.vocab_size == 128 and plain.config.vocab_size == n
    state = {k: (v[:n] if v.shape[:1] == (128,) else v) for k, v in padded.state_dict().items()}
    plain.load_state_dict(state)  # the same weights on the n real ids
    return padded, plain


def test_padded_ids_take_no_share_of_the_loss_and_get_no_gradient():
    torch.manual_seed(0)
    padded, plain = _padded_and_plain()
    x = torch.randint(0, 70, (3, 8))
    y = torch.randint(0, 70, (3, 8))
    _, loss_p = padded(x, y)
    _, loss_q = plain(x, y)
    assert loss_p.item() == pytest.approx(loss_q.item(), rel=1e-5)
    assert loss_p.item() == pytest.approx(math.log(70), abs=0.5)
    loss_p.backward()
    assert torch.count_nonzero(padded.lm_head.weight.grad[70:]) == 0


def test_sampling_never_emits_padded_ids():
    torch.manual_seed(0)
    padded, _ = _padded_and_plain()
    # a hot temperature spreads the samples over every id that has a finite logit
    out = padded.generate(torch.zeros((4, 1), dtype=torch.long), 30, temperature=5.0,
                          generator=torch.Generator().manual_seed(0))
    assert int(out.max()) < 70
    logits, _ = padded(torch.zeros((1, 1), dtype=torch.long))
    assert torch.isinf(logits[0, 0, 70:]).all() and torch.isfinite(logits[0, 0, :70]).all()


# --------------------------------------------------------------------------- checkpoints


def test_train_sample_and_eval_on_gpt2_data(tok, tmp_path):
    from geotrain.common.config import RunConfig, apply_overrides
    from geotrain.common.train import train

    data = tmp_path / "data"
    (tmp_path / "text.txt").write_text(" ".join(TEXTS[:2]) * 40, encoding="utf-8")
    prepare([tmp_path / "text.txt"], data, tokenizer=tok, progress=False)
    run = apply_overrides(RunConfig(), {
        "data.dir": str(data), "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 8,
        "train.batch_size": 2, "train.max_iters": 2, "train.eval_interval": 2, "train.eval_iters": 1,
        "train.checkpoint_interval": 2, "optim.warmup_iters": 1, "train.threads": 1}).validate()
    train(run, tmp_path / "run", progress=False)
    res = CliRunner().invoke(cli, ["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", " the",
                                   "--max-new-tokens", "12", "--temperature", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(" the")
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "run"), "--iters", "1", "--batch-size", "1",
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    prepare([tmp_path / "text.txt"], tmp_path / "bytes", progress=False)
    res = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "bytes"),
                                   "--iters", "1", "--device", "cpu"])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "tokenizer gpt2 (vocab 267)" in res.output and "tokenized with byte (vocab 257)" in res.output


def test_check_same_tokenizer():
    from geotrain.common.sampling import check_same_tokenizer

    gpt2 = {"name": "gpt2", "vocab_size": 50257, "sha256": "a"}
    check_same_tokenizer(gpt2, dict(gpt2), "checkpoint", "data")
    check_same_tokenizer(None, gpt2, "checkpoint", "data")  # an old checkpoint records none
    for other in ({**gpt2, "sha256": "b"}, {**gpt2, "vocab_size": 50304}, {"name": "byte", "vocab_size": 257}):
        with pytest.raises(ValueError, match="the token ids mean different things"):
            check_same_tokenizer(gpt2, other, "checkpoint", "data")


def test_sample_refuses_a_tokenizer_larger_than_the_model(tok, tmp_path):
    from geotrain.common.checkpoint import save_checkpoint
    from geotrain.common.sampling import sample_checkpoint

    cfg = ModelSection(preset="nano", n_layer=1, n_head=2, n_embd=16, block_size=8).build(200)
    assert (cfg.vocab_size, cfg.n_token_ids) == (256, 200)
    data = tmp_path / "data"
    prepare([_docs(tmp_path)], data, tokenizer=tok, progress=False)  # 267 ids: more than the model has
    save_checkpoint(tmp_path / "ck", 0, GPT(cfg).state_dict(),
                    {"step": 0, "model_config": cfg.to_dict(), "tokenizer": tok.spec(), "data_dir": str(data)})
    with pytest.raises(ValueError, match="its tokenizer gpt2 has 267 ids but the model only 200"):
        sample_checkpoint(tmp_path / "ck", "the", max_new_tokens=2, device="cpu")
