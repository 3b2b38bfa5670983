"""common/checkpoint.py: round trip, tied weights, atomicity under a failing write, fallback."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from geotrain.common import checkpoint as ck
from geotrain.common.config import ModelConfig
from geotrain.common.model import GPT


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, generator=g)
    return {"a": w, "tied": w, "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(3, 4, generator=g).t()}


def test_atomic_write_bytes_replaces(tmp_path):
    p = tmp_path / "f.bin"
    ck.atomic_write_bytes(p, b"one")
    ck.atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_round_trip_and_tied_weights(tmp_path):
    t = _tensors()
    state = {"step": 3, "opt": {"lr": 0.1, "buf": torch.ones(2)}, "rng": ck.capture_rng_state()}
    path = ck.save_checkpoint(tmp_path, 3, t, state)
    assert path.name == "ckpt-00000003"
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "state.pt"}
    latest = json.loads((tmp_path / "latest").read_text())
    assert latest["name"] == "ckpt-00000003"
    tensors, st, p2 = ck.load_latest_checkpoint(tmp_path)
    assert p2 == path and st["step"] == 3 and torch.equal(st["opt"]["buf"], torch.ones(2))
    for k in t:
        assert torch.equal(tensors[k], t[k]), k
    assert tensors["tied"] is tensors["a"]  # stored once, restored as the same tensor


def test_gpt_state_dict_round_trip(tmp_path):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    sd = model.state_dict()
    ck.save_checkpoint(tmp_path, 0, sd, {"step": 0})
    tensors, _, _ = ck.load_latest_checkpoint(tmp_path)
    model2 = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    model2.load_state_dict(tensors)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, sd[k])
    assert model2.lm_head.weight is model2.transformer.wte.weight


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    ck.save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, {"rng": ck.capture_rng_state()})
    expected = (torch.rand(3), random.random())
    _, state, _ = ck.load_latest_checkpoint(tmp_path)
    ck.restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_keep_prunes_old(tmp_path):
    for step in range(0, 60, 10):
        ck.save_checkpoint(tmp_path, step, {"x": torch.full((2,), float(step))}, {"step": step}, keep=2)
    assert [p.name for _, p in ck.list_checkpoints(tmp_path)] == ["ckpt-00000040", "ckpt-00000050"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_same_step_saved_twice(tmp_path):
    ck.save_checkpoint(tmp_path, 5, {"x": torch.zeros(1)}, {"v": 1})
    ck.save_checkpoint(tmp_path, 5, {"x": torch.ones(1)}, {"v": 2})
    tensors, state, _ = ck.load_latest_checkpoint(tmp_path)
    assert state["v"] == 2 and tensors["x"].item() == 1.0


def test_failed_write_leaves_previous(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 10, {"x": torch.zeros(3)}, {"step": 10})
    latest_before = (tmp_path / "latest").read_bytes()
    real = ck.atomic_write_bytes
    calls = {"n": 0}

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == 2:  # the second file of the new checkpoint: the disk fills up
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", flaky)
    with pytest.raises(OSError, match="No space"):
        ck.save_checkpoint(tmp_path, 20, {"x": torch.ones(3)}, {"step": 20})
    monkeypatch.setattr(ck, "atomic_write_bytes", real)
    assert (tmp_path / "latest").read_bytes() == latest_before
    assert [p.name for _, p in ck.list_checkpoints(tmp_path)] == ["ckpt-00000010"]
    assert not list(tmp_path.glob(".tmp-*"))
    _, state, path = ck.load_latest_checkpoint(tmp_path)
    assert state["step"] == 10 and path.name == "ckpt-00000010"


def test_failed_latest_write_keeps_old_pointer(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, {"step": 1})
    real = ck.atomic_write_bytes

    def fail_latest(path, data):
        if path.name == "latest":
            raise OSError(5, "I/O error")
        return real(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", fail_latest)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, 2, {"x": torch.ones(1)}, {"step": 2})
    monkeypatch.setattr(ck, "atomic_write_bytes", real)
    _, state, _ = ck.load_latest_checkpoint(tmp_path)
    assert state["step"] == 1  # latest is the commit point


@pytest.mark.parametrize("victim", ["model.safetensors", "state.pt", "meta.json"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, victim):
    ck.save_checkpoint(tmp_path, 1, {"x": torch.zeros(4)}, {"step": 1})
    newest = ck.save_checkpoint(tmp_path, 2, {"x": torch.ones(4)}, {"step": 2})
    f = newest / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=victim if victim != "meta.json" else "ckpt-00000002"):
        ck.load_checkpoint(newest, expect_meta_sha256=json.loads((tmp_path / "latest").read_text())["sha256"])
    with caplog.at_level(logging.WARNING, logger="geotrain.checkpoint"):
        tensors, state, path = ck.load_latest_checkpoint(tmp_path)
    assert state["step"] == 1 and path.name == "ckpt-00000001"
    assert "ckpt-00000002" in caplog.text


def test_missing_file_and_missing_latest(tmp_path, caplog):
    ck.save_checkpoint(tmp_path, 1, {"x": torch.zeros(4)}, {"step": 1})
    newest = ck.save_checkpoint(tmp_path, 2, {"x": torch.ones(4)}, {"step": 2})
    (newest / "state.pt").unlink()
    with pytest.raises(ValueError, match="state.pt"):
        ck.load_checkpoint(newest)
    (tmp_path / "latest").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="geotrain.checkpoint"):
        _, state, _ = ck.load_latest_checkpoint(tmp_path)
    assert state["step"] == 1 and "latest" in caplog.text


def test_no_checkpoint_is_none_and_all_corrupt_raises(tmp_path):
    assert ck.load_latest_checkpoint(tmp_path / "nothing") is None
    assert ck.load_latest_checkpoint(tmp_path) is None
    path = ck.save_checkpoint(tmp_path, 1, {"x": torch.zeros(4)}, {"step": 1})
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no checkpoint"):
        ck.load_latest_checkpoint(tmp_path)


class _Custom:
    pass


def test_state_must_be_weights_only_loadable(tmp_path):
    ck.save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, {"step": 1})
    with pytest.raises(ValueError, match="weights_only"):
        ck.save_checkpoint(tmp_path, 2, {"x": torch.zeros(1)}, {"obj": _Custom()})
    assert ck.load_latest_checkpoint(tmp_path)[1] == {"step": 1}
    assert not list(tmp_path.glob(".tmp-*"))
