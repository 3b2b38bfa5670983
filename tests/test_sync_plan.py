"""The sync member steps by the worker's memory plan: `train.micro_batch` of the run config reaches
the member's SyncGroupTrainer (worker/group_runner.py member_trainer), which then runs each step
as micro-batches with the gradient of the whole batch; the worker's AdamW state moves to the
member (one optimizer state on the device)."""

from __future__ import annotations

import logging

import torch

from geotrain.common.config import RunConfig, SyncConfig, TrainConfig, model_config
from geotrain.worker.group_runner import member_trainer
from geotrain.worker.trainer import LocalTrainer
from groups import run_all, start_group, stop_group

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
B, T = 4, 16


def _run(micro_batch: int, optimizer_state: str = "auto") -> RunConfig:
    return RunConfig(train=TrainConfig(batch_size=B, micro_batch=micro_batch, optimizer_state=optimizer_state),
                     sync=SyncConfig(check_every=1))


def _batches(rank: int):
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randint(0, TINY["vocab_size"], (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _group_step(run: RunConfig, caplog=None):
    """Two members (fp32 all-reduce) built as the worker builds them, one step each: (micro_batch
    set, micro-batches of the step, the parameters after it, optimizer states left on the workers)."""
    members, servers = start_group(2, compression="none")
    try:
        locals_ = [LocalTrainer(run, model_config("nano", **TINY), torch.device("cpu"), "w") for _ in members]
        for local in locals_:  # an async step first: the worker's AdamW has state to carry over
            local.step(*_batches(9), 0)
        trainers = [member_trainer(local, run, m, "g") for local, m in zip(locals_, members)]
        metrics = run_all(trainers, lambda r, t: t.step(*_batches(r)))
        left = [len(local.optimizer.state) for local in locals_]
        params = {n: p.detach().clone() for n, p in trainers[0].model.named_parameters()}
        for t in trainers:
            t.close()
        return trainers[0].micro_batch, [m.micro_batches for m in metrics], params, left
    finally:
        stop_group(members, servers)


def test_a_sync_member_trains_in_the_micro_batches_of_the_run_config(caplog):
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO, logger="geotrain.worker.group_runner"):
        micro, counts, p_micro, left = _group_step(_run(micro_batch=2))
    assert micro == 2 and counts == [2, 2]
    assert left == [0, 0]  # the workers' AdamW state went to the members
    assert any("sync group g: memory plan on cpu" in r.getMessage() and "micro-batch 2 of 4" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    whole, counts, p_whole, _ = _group_step(_run(micro_batch=0))
    assert whole == B and counts == [1, 1]  # on CPU the plan takes the whole batch
    for n in p_whole:  # the same step: the gradient of the whole batch either way
        torch.testing.assert_close(p_micro[n], p_whole[n], rtol=1e-4, atol=1e-5)


def test_the_member_plan_is_for_fp32_state_on_the_device_whatever_the_worker_keeps():
    """A worker whose AdamW state is offloaded still gets a member plan for fp32 state on the
    device (the member's AdamW), with the run's micro-batch; the worker's own plan is reused
    when its state is fp32."""
    torch.set_num_threads(1)
    cfg = model_config("nano", **TINY)
    offload = LocalTrainer(_run(2, "offload"), cfg, torch.device("cpu"), "w")
    assert offload.train_step.plan.optimizer_state == "offload"
    plan = offload.plan_with_state("fp32")
    assert plan.optimizer_state == "fp32" and plan.micro_batch == 2 and plan.fits
    fp32 = LocalTrainer(_run(2, "fp32"), cfg, torch.device("cpu"), "w")
    assert fp32.plan_with_state("fp32") is fp32.train_step.plan
