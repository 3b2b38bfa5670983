"""common/step.py: micro-batched accumulation, activation checkpointing, the offloaded optimizer,
micro-batch probing and its cache, the prefetcher, the step the plan builds."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from geotrain.common.config import ModelConfig, OptimConfig, TrainConfig
from geotrain.common.model import GPT, configure_optimizer
from geotrain.common.step import (
    HostOffloadAdamW,
    Prefetcher,
    TrainStep,
    build_optimizer,
    cached_micro_batch,
    forward_backward,
    probe_micro_batch,
    store_micro_batch,
)

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)
CPU = torch.device("cpu")


def _model(cfg: ModelConfig = CFG, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def _batch(B: int = 8, seed: int = 1, cfg: ModelConfig = CFG) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, cfg.vocab_size, (B, cfg.block_size + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _sgd_step(x, y, micro_batch: int) -> torch.Tensor:
    model = _model()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.5), CPU, micro_batch=micro_batch)
    step(x, y)
    return _params(model)


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("micro_batch", [4, 3, 1])
def test_micro_batches_give_the_full_batch_update(micro_batch):
    # SGD: the update is proportional to the gradient, so a wrong weighting shows too
    x, y = _batch(8)
    full = _sgd_step(x, y, 0)
    micro = _sgd_step(x, y, micro_batch)
    first_only = _sgd_step(x[:micro_batch], y[:micro_batch], 0)  # what a step without accumulation does
    start = _params(_model())
    assert torch.allclose(micro, full, atol=1e-6, rtol=0)
    assert (first_only - full).abs().max() > 100 * (micro - full).abs().max() + 1e-4
    assert (full - start).abs().max() > 1e-3  # the step moved the weights


def test_forward_backward_loss_is_the_batch_mean_on_the_device():
    x, y = _batch(6)
    model = _model().train()
    loss = forward_backward(model, x, y, micro_batch=4)  # chunks of 4 and 2
    assert loss.shape == () and loss.dtype == torch.float32 and not loss.requires_grad
    with torch.no_grad():
        _, whole = model(x, y)
    assert loss.item() == pytest.approx(whole.item(), rel=1e-5)


def test_train_step_result():
    model = _model()
    step = TrainStep(model, configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), CPU), CPU, micro_batch=3, grad_clip=1.0)
    x, y = _batch(8)
    result = step(x, y, lr=2e-3)
    assert result.tokens == 8 * CFG.block_size and result.micro_batches == 3
    assert all(g["lr"] == 2e-3 for g in step.optimizer.param_groups)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- checkpointing


def _grads(checkpointing: bool) -> tuple[torch.Tensor, int]:
    cfg = dataclasses.replace(CFG, dropout=0.1)
    model = _model(cfg).train()
    model.activation_checkpointing = checkpointing
    calls = []
    model.transformer.h[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    x, y = _batch(4, cfg=cfg)
    torch.manual_seed(7)
    forward_backward(model, x, y)
    return torch.cat([p.grad.flatten() for p in model.parameters()]), len(calls)


def test_activation_checkpointing_gives_the_same_gradients():
    plain, plain_calls = _grads(False)
    ckpt, ckpt_calls = _grads(True)
    assert plain_calls == 1 and ckpt_calls == 2  # the block really ran again for its backward
    assert torch.allclose(plain, ckpt, atol=1e-6, rtol=1e-5)  # same dropout masks on recompute


def test_checkpointing_is_off_in_eval():
    model = _model().eval()
    model.activation_checkpointing = True
    calls = []
    model.transformer.h[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    x, y = _batch(2)
    with torch.no_grad():
        model(x, y)
    assert calls == [1]


# --------------------------------------------------------------------------- optimizers


def test_offloaded_adamw_matches_adamw():
    a, b = _model(), _model()
    opt_a = configure_optimizer(a, 0.1, 1e-2, (0.9, 0.99), CPU)
    opt_b = HostOffloadAdamW(b, 0.1, 1e-2, (0.9, 0.99))
    step_a = TrainStep(a, opt_a, CPU, micro_batch=4, grad_clip=1.0)
    step_b = TrainStep(b, opt_b, CPU, micro_batch=4, grad_clip=1.0)
    start = _params(a)
    for i in range(3):
        x, y = _batch(8, seed=i)
        step_a(x, y, lr=1e-2)
        step_b(x, y, lr=1e-2)
        with torch.no_grad():  # a merged update lands between steps: the offloaded copy follows it
            for pa, pb in zip(a.parameters(), b.parameters()):
                pa.add_(0.01)
                pb.add_(0.01)
    assert (_params(a) - start).abs().max() > 1e-3
    assert torch.allclose(_params(a), _params(b), atol=1e-6, rtol=0)
    # a plain AdamW state dict: it moves to and from the on-device optimizer
    plain = configure_optimizer(_model(), 0.1, 1e-2, (0.9, 0.99), CPU)
    plain.load_state_dict(opt_b.state_dict())
    sa, sp = opt_a.state_dict()["state"], plain.state_dict()["state"]
    assert sa.keys() == sp.keys()
    assert all(torch.allclose(sa[k]["exp_avg_sq"], sp[k]["exp_avg_sq"]) for k in sa)
    # and back: an offloaded optimizer resumed from the on-device one's state steps the same
    c = _model()
    c.load_state_dict(a.state_dict())
    opt_c = HostOffloadAdamW(c, 0.1, 1e-2, (0.9, 0.99))
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a checkpoint: no shared tensors
    x, y = _batch(8, seed=9)
    step_a(x, y, lr=1e-2)
    TrainStep(c, opt_c, CPU, micro_batch=4, grad_clip=1.0)(x, y, lr=1e-2)
    assert torch.allclose(_params(a), _params(c), atol=1e-6, rtol=0)


def test_build_optimizer_states():
    model = _model()
    oc = OptimConfig()
    assert isinstance(build_optimizer(model, oc, CPU, "fp32"), torch.optim.AdamW)
    assert isinstance(build_optimizer(model, oc, CPU, "offload"), HostOffloadAdamW)
    with pytest.raises(ValueError, match="8bit.*CUDA"):
        build_optimizer(model, oc, CPU, "8bit")
    with pytest.raises(ValueError, match="'adafactor'"):
        build_optimizer(model, oc, CPU, "adafactor")


def test_for_run_on_cpu_follows_the_config():
    model = _model()
    tc = TrainConfig(optimizer_state="offload", activation_checkpointing="on", micro_batch=2)
    step = TrainStep.for_run(model, CFG, OptimConfig(), tc, CPU, batch_size=6)
    assert isinstance(step.optimizer, HostOffloadAdamW) and model.activation_checkpointing
    assert step.micro_batch == 2 and step.plan.fits and step.plan.micro_batch == 2
    default = TrainStep.for_run(_model(), CFG, OptimConfig(), TrainConfig(), CPU, batch_size=6)
    assert default.micro_batch == 6 and isinstance(default.optimizer, torch.optim.AdamW)
    assert "micro-batch" in default.plan.table()


def test_for_run_refuses_a_plan_that_does_not_fit(caplog):
    tiny_gpu = 64 << 20  # below the plan's fixed overhead alone
    with pytest.raises(ValueError, match="does not fit on cpu: needs .* has 64 MiB"):
        TrainStep.for_run(_model(), CFG, OptimConfig(), TrainConfig(), CPU, batch_size=6, device_bytes=tiny_gpu)
    forced = TrainConfig(micro_batch=3, activation_checkpointing="on", optimizer_state="offload")
    step = TrainStep.for_run(_model(), CFG, OptimConfig(), forced, CPU, batch_size=6, device_bytes=tiny_gpu)
    assert step.micro_batch == 3 and not step.plan.fits and "running as configured" in caplog.text
    roomy = TrainStep.for_run(_model(), CFG, OptimConfig(), TrainConfig(), CPU, batch_size=6, device_bytes=2 << 30)
    assert roomy.plan.fits and roomy.micro_batch == 6 and roomy.plan.optimizer_state == "fp32"


# --------------------------------------------------------------------------- micro-batch probing


def test_probe_backs_off_on_out_of_memory():
    tried = []

    def try_fn(m: int) -> None:
        tried.append(m)
        if m > 3:
            raise torch.OutOfMemoryError(f"{m} sequences do not fit")

    assert probe_micro_batch(try_fn, 12) == 3
    assert tried == [12, 6, 4, 3]
    with pytest.raises(ValueError, match="micro-batch 1"):
        probe_micro_batch(lambda m: (_ for _ in ()).throw(torch.OutOfMemoryError("no")), 5)


def test_micro_batch_cache(tmp_path):
    assert cached_micro_batch("gpu|abc", tmp_path) is None
    store_micro_batch("gpu|abc", 6, tmp_path)
    store_micro_batch("gpu|def", 2, tmp_path)
    assert cached_micro_batch("gpu|abc", tmp_path) == 6 and cached_micro_batch("gpu|def", tmp_path) == 2
    assert json.loads((tmp_path / "micro_batch.json").read_text()) == {"gpu|abc": 6, "gpu|def": 2}
    (tmp_path / "micro_batch.json").write_text("{torn")
    assert cached_micro_batch("gpu|abc", tmp_path) is None


# --------------------------------------------------------------------------- prefetch


def test_prefetcher_order_and_errors():
    def make(i: int):
        if i == 5:
            raise RuntimeError("shard gone")
        return torch.full((2, 3), i), torch.full((2, 3), -i)

    batches = Prefetcher(make, CPU, start=2, depth=2)
    got = [next(batches) for _ in range(3)]
    assert [int(x[0, 0]) for x, _ in got] == [2, 3, 4] and int(got[0][1][0, 0]) == -2
    with pytest.raises(RuntimeError, match="shard gone"):
        next(batches)
    batches.close()
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(make, CPU, depth=0)
