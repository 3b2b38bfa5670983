"""Multi-device workers (worker/host_group.py): a host's devices train as one participant.

On CPU the local ranks are gloo processes (one thread each); the core proof is that 2 ranks
sharing a batch follow the loss curve of one process training on the whole batch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from geotrain.common.config import ModelConfig, OptimConfig
from geotrain.common.model import GPT, configure_optimizer
from geotrain.common.tensors import clone_tensors, model_tensors
from geotrain.worker.host_group import HostGroup, LocalRankDied, check_replica_fits, replica_bytes, resolve_nproc

torch.set_num_threads(1)

MODEL = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
OPTIM = OptimConfig(lr=3e-3, weight_decay=0.1, grad_clip=1.0)
STEPS = 6


def _batches(n_rows: int, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        seq = torch.randint(0, MODEL.vocab_size, (n_rows, MODEL.block_size + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def _fresh():
    torch.manual_seed(0)
    model = GPT(MODEL)
    opt = configure_optimizer(model, OPTIM.weight_decay, OPTIM.lr, (OPTIM.beta1, OPTIM.beta2), torch.device("cpu"))
    return model, opt


def _single_process(batches) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference: one process, the whole batch per step (the runner's own step)."""
    model, opt = _fresh()
    losses = []
    for x, y in batches:
        for g in opt.param_groups:
            g["lr"] = OPTIM.lr
        model.train()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
    return losses, clone_tensors(model_tensors(model))


def _group(**kw) -> HostGroup:
    return HostGroup(2, "cpu", threads=1, timeout_s=60.0, check_every=2, **kw)


@pytest.fixture
def host():
    """A 2-rank group (the default process group is per process: one group at a time)."""
    group = _group()
    try:
        yield group
    finally:
        group.close()


@pytest.mark.parametrize("rows", [8, 3])  # even shares, and 2 + 1 (rows weighted per rank)
def test_two_ranks_match_one_process_with_the_whole_batch(host, rows):
    batches = _batches(rows)
    ref_losses, ref_weights = _single_process(batches)
    model, opt = _fresh()
    host.attach(model, opt, MODEL, OPTIM)
    losses = [host.train_step(x, y, OPTIM.lr) for x, y in batches]
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    for name, t in model_tensors(model).items():
        torch.testing.assert_close(t, ref_weights[name], rtol=1e-4, atol=1e-5, msg=name)
    # The losses must move: a step that trained nothing would also "match" a constant curve.
    assert abs(losses[-1] - losses[0]) > 1e-3
    assert host.check_weights()  # the follower holds the same weights


def test_one_rank_alone_does_not_match_the_whole_batch():
    """The reference is sharp enough: rank 0's half alone gives another curve."""
    batches = _batches(8)
    ref_losses, _ = _single_process(batches)
    half_losses, _ = _single_process([(x[:4], y[:4]) for x, y in batches])
    assert half_losses != pytest.approx(ref_losses, rel=1e-5, abs=1e-6)


def test_params_changed_outside_the_optimizer_reach_the_followers(host):
    batches = _batches(4, steps=2)
    model, opt = _fresh()
    host.attach(model, opt, MODEL, OPTIM)
    host.train_step(*batches[0], OPTIM.lr)
    with torch.no_grad():  # what a rebase does to rank 0
        for p in model.parameters():
            p.add_(0.01)
    assert not host.check_weights()  # the safety net sees the difference and repairs it
    assert host.check_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    host.params_changed(opt)  # the runner's hook: broadcast, nothing left to repair
    assert host.check_weights()
    host.train_step(*batches[1], OPTIM.lr)
    assert host.check_weights()


def test_dead_follower_is_named_and_the_next_step_fails():
    died: list[str] = []
    host = _group(on_rank_died=died.append)
    try:
        _kill_a_follower(host, died)
    finally:
        host.close()


def _kill_a_follower(host: HostGroup, died: list[str]) -> None:
    model, opt = _fresh()
    host.attach(model, opt, MODEL, OPTIM)
    batches = _batches(4, steps=1)
    host.train_step(*batches[0], OPTIM.lr)
    os.kill(host.procs[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not died and time.monotonic() < deadline:
        time.sleep(0.05)
    assert died == ["local rank 1 died (killed by SIGKILL)"]
    with pytest.raises(LocalRankDied, match="local rank 1 died"):
        host.train_step(*batches[0], OPTIM.lr)


def test_nproc_bad_values():
    cores = os.cpu_count() or 1
    assert resolve_nproc(0, "cpu") == 1
    assert resolve_nproc(1, "cpu") == 1
    with pytest.raises(ValueError, match=rf"--nproc-per-node {cores + 1} is more than the {cores} visible CPU cores"):
        resolve_nproc(cores + 1, "cpu")
    with pytest.raises(ValueError, match="single device 'cuda:1'"):
        resolve_nproc(2, "cuda:1")
    with pytest.raises(ValueError, match="-1"):
        resolve_nproc(-1, "cpu")
    with pytest.raises(ValueError, match="at least 2"):
        HostGroup(1, "cpu")


def test_a_replica_larger_than_the_device_is_refused():
    gpt2_xl = 1_557_611_200
    assert replica_bytes(gpt2_xl) > 24 * 2**30  # weights + gradients + buckets + AdamW moments: ~29 GiB
    check_replica_fits(gpt2_xl, 80 * 2**30, "cuda:0")
    with pytest.raises(ValueError, match=r"1558M-parameter model needs 29\.0 GiB .* cuda:0 has 24\.0 GiB"):
        check_replica_fits(gpt2_xl, 24 * 2**30, "cuda:0")


def _worker_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geotrain.worker.cli", "--coordinator", "127.0.0.1:1", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_refuses_more_processes_than_devices():
    cores = os.cpu_count() or 1
    r = _worker_cli("--device", "cpu", "--nproc-per-node", str(cores + 1))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --nproc-per-node {cores + 1} is more than the {cores} visible CPU cores"


def test_cli_refuses_a_multi_device_sync_member():
    r = _worker_cli("--device", "cpu", "--nproc-per-node", "2", "--sync-group", "auto")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: --sync-group needs one device per worker (got --nproc-per-node 2)")


def test_a_dead_follower_ends_the_others_with_its_name(capfd):
    group = HostGroup(3, "cpu", threads=1, timeout_s=60.0)  # 3 gloo ranks on CPU: more than cores is fine here
    try:
        model, opt = _fresh()
        group.attach(model, opt, MODEL, OPTIM)
        group.train_step(*_batches(3, steps=1)[0], OPTIM.lr)
        os.kill(group.procs[0].pid, signal.SIGKILL)
        group.procs[1].join(30)
        assert group.procs[1].exitcode == 1
        assert "error: local rank 1 died (killed by SIGKILL): local rank 2 exits" in capfd.readouterr().err
    finally:
        group.close()


# --------------------------------------------------------------------------- real processes

sys.path.insert(0, os.path.dirname(__file__))
from procs import Cluster, prepare_corpus, tiny_config  # noqa: E402

BATCH = 4  # tiny_config's train.batch_size: sequences per device and step
BLOCK = 32  # tiny_config's model.block_size


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus"), n_bytes=120_000)


def _gone(pid: int) -> bool:
    """The process exited (a zombie that no one reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _follower_pid(log: str, rank: int = 1) -> int:
    import re

    return int(re.search(rf"local rank {rank}: pid (\d+)", log).group(1))


def _row(status: dict | None, name: str) -> dict | None:
    return next((w for w in (status or {}).get("worker_list", []) if w["name"] == name), None)


@pytest.mark.slow
def test_two_local_ranks_join_as_one_participant_train_and_push(data_dir, tmp_path):
    budget = 10 * 2048
    cfg = tiny_config(plan__max_tokens=budget, workers__lease_seconds=30.0)  # a loaded 2-core machine
    with Cluster(tmp_path, data_dir, cfg) as c:
        c.start_coordinator()
        w = c.start_worker("w0", extra=["--nproc-per-node", "2"])
        s = c.wait_status(lambda s: (r := _row(s, "w0")) is not None and r["stats"].get("steps", 0) > 0,
                          120, "w0 training", fail_if_dead=[w])
        assert len(s["worker_list"]) == 1  # one participant, not one per rank
        assert _row(s, "w0")["device"] == "cpu x2"
        stats = _row(s, "w0")["stats"]
        assert stats["tokens"] == stats["steps"] * 2 * BATCH * BLOCK  # the participant's batch: both ranks'
        assert c.wait_exit(w, 240) == 0  # the run ends: final push, leave, the follower stops
        log = w.log()
        assert "host group of 2 cpu processes ready" in log
        assert "Traceback" not in log and "error" not in log
        assert "left the run (" in log
        assert _gone(_follower_pid(log))
        assert c.summary()["tokens"] >= budget  # every token trained by the participant and merged
        assert "worker w0 left: " in c.coordinator_log()


@pytest.mark.slow
def test_sigkilled_follower_ends_the_participant_and_returns_its_leases(data_dir, tmp_path):
    cfg = tiny_config(plan__max_tokens=0, workers__lease_seconds=120.0)  # only a leave frees the leases soon
    with Cluster(tmp_path, data_dir, cfg) as c:
        c.start_coordinator()
        w = c.start_worker("w0", extra=["--nproc-per-node", "2"])
        c.wait_status(lambda s: (r := _row(s, "w0")) is not None and r["stats"].get("steps", 0) > 0
                      and s["shards"]["leased"] > 0, 120, "w0 training", fail_if_dead=[w])
        os.kill(_follower_pid(w.log()), signal.SIGKILL)
        assert c.wait_exit(w, 30) == 4
        log = w.log()
        assert "error: local rank 1 died (killed by SIGKILL): left the run" in log
        assert "Traceback" not in log
        assert "worker w0 left: local rank 1 died (killed by SIGKILL)" in c.coordinator_log()
        s = c.wait_status(lambda s: not s["worker_list"], 10, "w0 gone")
        assert s["shards"]["leased"] == 0  # back in the pool at once, not after the 120 s lease expiry


@pytest.mark.slow
def test_sigkilled_rank0_ends_its_followers(data_dir, tmp_path):
    with Cluster(tmp_path, data_dir, tiny_config(plan__max_tokens=0, workers__lease_seconds=30.0)) as c:
        c.start_coordinator()
        w = c.start_worker("w0", extra=["--nproc-per-node", "2"])
        c.wait_status(lambda s: (r := _row(s, "w0")) is not None and r["stats"].get("steps", 0) > 0,
                      120, "w0 training", fail_if_dead=[w])
        follower = _follower_pid(w.log())
        w.kill()
        c.wait_for(lambda: _gone(follower), 30, "the follower's exit")
        assert "error: local rank 0 is gone: local rank 1 exits" in w.log()  # the follower shares the log
        # the coordinator's lease expiry returns what rank 0 held
        c.wait_status(lambda s: not s["worker_list"] and s["shards"]["leased"] == 0, 60, "w0 dropped")


def test_a_sync_group_runner_refuses_several_devices():
    from geotrain.worker.group_runner import GroupWorkerRunner
    from geotrain.common.config import WorkerConfig

    runner = GroupWorkerRunner(WorkerConfig(coordinator="127.0.0.1:1", device="cpu", sync_group="auto", metrics_port=0,
                                            nproc_per_node=2, serve=False), "")
    with pytest.raises(ValueError, match="sync-group member trains on one device"):
        runner.run()
