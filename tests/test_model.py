"""common/model.py: shapes, causality, weight tying, parameter count, optimizer groups."""

from __future__ import annotations

import pytest
import torch

from geotrain.common.config import ModelConfig, model_config
from geotrain.common.model import GPT, configure_optimizer

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)


def _model(cfg: ModelConfig = TINY) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg).eval()


def test_shapes_and_loss():
    model = _model()
    x = torch.randint(0, 50, (3, 16))
    logits, loss = model(x, x)
    assert logits.shape == (3, 16, 50) and loss.shape == ()
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.6  # near-uniform at init
    logits, loss = model(x[:, :5])
    assert logits.shape == (3, 1, 50) and loss is None


def test_too_long_sequence_rejected():
    with pytest.raises(ValueError, match="block_size"):
        _model()(torch.zeros(1, 17, dtype=torch.long))


def test_causality():
    """Changing a future token never changes the logits of earlier positions."""
    model = _model()
    x = torch.randint(0, 50, (2, 16))
    base, _ = model(x, x)
    for t in (3, 9, 15):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 50
        out, _ = model(x2, x2)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])


def test_weight_tying():
    model = _model()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names or "transformer.wte.weight" not in names  # counted once


def test_param_count():
    cfg = TINY
    C, V, L, T = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.block_size
    per_block = 2 * C + C * 3 * C + C * C + C * 4 * C + 4 * C * C  # 2 LN + attn + mlp (no bias)
    expected = V * C + T * C + L * per_block + C
    model = _model()
    assert model.num_params(non_embedding=False) == expected
    assert model.num_params() == expected - T * C
    nano = GPT(model_config("nano", vocab_size=65))
    assert abs(nano.num_params() - 0.80e6) < 0.01e6  # nanoGPT prints "0.80M" for this shape


def test_optimizer_groups_decay_matrices_only():
    model = _model()
    opt = configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params(non_embedding=False)


def test_generate_length_and_determinism():
    model = _model()
    idx = torch.zeros(2, 3, dtype=torch.long)
    a = model.generate(idx, 20, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 20, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 23) and torch.equal(a, b)
