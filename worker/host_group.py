"""All of a host's devices as one participant (`worker --nproc-per-node N`).

Processes: local rank 0 is the worker process itself (the normal `WorkerRunner`: join, leases,
pushes, rebases); ranks 1 .. N-1 are followers started with the `spawn` method (a forked child of
a process that used gRPC cannot use gRPC) that never talk to the coordinator. All N form a
`torch.distributed` group over a file store in a private temporary directory: NCCL on CUDA
(rank r trains on cuda:r), gloo on CPU.

Who calls what, and when (rank 0's runner calls the hooks; worker/runner.py marks the seams):

- `attach(model, optimizer, model_cfg, optim_cfg)`: after the first model is loaded (and again
  after a new run's setup). The followers build the same GPT and AdamW on their device; every
  rank wraps its model in DistributedDataParallel, whose construction copies rank 0's weights.
- `train_step(x, y, lr) -> loss`: one inner step of the participant. x, y: (n, T) CPU token ids,
  the participant's whole batch (N x the per-device batch). Rank r trains on rows
  [r*n//N, (r+1)*n//N); rank 0 sends each follower its rows through the follower's command pipe.
  Every rank scales its mean loss by (its rows / n) x N before backward, so DDP's gradient mean
  is the gradient of the mean loss over all n rows, exactly what one process computes on the
  whole batch (up to floating-point summation order); then the same clip and AdamW step on every
  rank. Returns the mean loss over the n rows (all-reduced).
- `params_changed(optimizer)`: after rank 0's parameters were changed outside the optimizer
  (rebase on a merged update, resync, dropped progress): every rank receives rank 0's weights
  (a broadcast per tensor); an optimizer whose state rank 0 cleared is cleared everywhere.
- Every `check_every` steps the ranks compare a checksum of their weights (per tensor: the fp64
  sum and sum of squares; all-reduced MIN and MAX); a difference is logged and repaired from
  rank 0 (`check_weights`).
- `close()`: followers stop and exit 0; the process group is destroyed.

Memory: DDP keeps a whole replica per device: fp32 weights, gradients, DDP's gradient buckets
and AdamW's two moments, REPLICA_BYTES_PER_PARAM bytes per parameter (`replica_bytes`). `attach`
refuses, with both sizes named, a model whose replica exceeds a CUDA device's memory. Such models
need the weights sharded across the local ranks (FSDP2 `fully_shard` per transformer block in
`_Replica`); that is not supported yet. The seams are where it would go: `_Replica` is the one
place that wraps the model, rank 0 would gather full tensors for its push (`params - base`) and
`params_changed` would scatter rank 0's full weights instead of broadcasting them.

Failures (no hang): each follower's death is seen at once by rank 0's watchdog thread (it waits
on the processes' sentinels). It tells the surviving followers, which exit 1 with a line naming
the dead rank, and calls `on_rank_died(message)`; the worker's callback (`start_for_runner`)
leaves the run (its leases return to the pool at once) and exits the process with
EXIT_LOCAL_RANK. When rank 0 dies its control pipes close, and every follower exits 1 with a line
saying so (the coordinator's lease expiry returns the leases). Collectives carry the process
group's timeout (`timeout_s`) as a last bound. Followers ignore SIGINT: Ctrl+C on a terminal
reaches every process of the foreground group, and rank 0 alone decides how the participant
stops (finish the step, push, leave, then `close()`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_LOCAL_RANK = 4  # the worker's exit status when one of its local ranks died
TIMEOUT_S = 300.0  # process-group timeout: the bound on any one collective (NCCL init included)
CHECK_EVERY = 100  # steps between checksum compares of the ranks' weights
FAILURE_GRACE_S = 10.0  # a failed collective waits this long for the watchdog to name the dead rank
REPLICA_BYTES_PER_PARAM = 20  # fp32 weights 4 + gradients 4 + DDP buckets 4 + AdamW moments 8


class LocalRankDied(RuntimeError):
    """A local rank of the participant died; the message names it."""


def visible_devices(device_type: str) -> int:
    """How many processes a host can give one device each: CUDA GPUs, or CPU cores."""
    if device_type == "cuda":
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def resolve_nproc(nproc: int, device: str) -> int:
    """`--nproc-per-node` for `--device`: 0 (auto) = every visible CUDA GPU with device auto or
    cuda, else 1. ValueError, naming both numbers, when nproc exceeds the visible devices or a
    single device (cuda:N) is named with nproc > 1."""
    if nproc < 0:
        raise ValueError(f"--nproc-per-node must be >= 0 (0 = auto), got {nproc}")
    if device == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_type = torch.device(device).type
    if nproc == 0:
        return max(1, visible_devices("cuda")) if device_type == "cuda" and ":" not in device else 1
    if nproc > 1 and ":" in device:
        raise ValueError(f"--nproc-per-node {nproc} needs --device cuda, cpu or auto (one process per device), "
                         f"not the single device {device!r}")
    if device_type not in ("cuda", "cpu") and nproc > 1:
        raise ValueError(f"--nproc-per-node {nproc} needs CUDA or CPU devices, not {device_type!r}")
    visible = visible_devices(device_type)
    if nproc > visible:
        what = "CUDA devices" if device_type == "cuda" else "CPU cores"
        raise ValueError(f"--nproc-per-node {nproc} is more than the {visible} visible {what}")
    return nproc


def replica_bytes(n_params: int) -> int:
    """Bytes one DDP replica of an n_params model holds for training, activations not counted."""
    return n_params * REPLICA_BYTES_PER_PARAM


def check_replica_fits(n_params: int, device_bytes: int, device: str) -> None:
    """ValueError naming both sizes when a whole replica does not fit the device's memory."""
    need = replica_bytes(n_params)
    if need > device_bytes:
        raise ValueError(f"a replica of the {n_params / 1e6:.0f}M-parameter model needs {need / 2**30:.1f} GiB "
                         f"(weights, gradients, AdamW state) but {device} has {device_bytes / 2**30:.1f} GiB; "
                         "sharding a model across local ranks is not supported")


def _rank_device(device_type: str, rank: int) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


# --------------------------------------------------------------------------- one rank's replica


class _Replica:
    """One rank's model, DDP wrapper and optimizer; rank 0 and the followers run the same code,
    so every rank applies the same arithmetic to the same all-reduced gradients."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 grad_clip: float):
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.grad_clip = grad_clip
        self.world = dist.get_world_size()
        # Construction is a collective: it copies rank 0's parameters to every rank.
        self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                       forward_sync_buffers=False)
        self.params = [p for _, p in sorted(model.named_parameters())]

    def step(self, x: torch.Tensor, y: torch.Tensor, n_total: int, lr: float) -> float:
        """x, y: this rank's rows (n_r, T), n_r may be 0; n_total: the participant's rows. Returns
        the participant's mean loss."""
        from geotrain.common.model import autocast_context

        n_r = x.shape[0]
        weight = n_r / n_total
        if n_r == 0:  # DDP needs every rank's backward: one row of zeros, weighted 0
            x = torch.zeros((1, x.shape[1]), dtype=torch.long)
            y = torch.zeros((1, y.shape[1]), dtype=torch.long)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with autocast_context(self.device):
            _, loss = self.ddp(x, y)
        # DDP averages gradients over the ranks: scaled by n_r/n x world, the average is the
        # gradient of the mean loss over the participant's n_total rows.
        scale = weight * self.world
        (loss * scale if scale != 1.0 else loss).backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = (loss.detach().float() * weight).reshape(1)
        dist.all_reduce(total)
        return float(total.item())

    def receive_weights(self, clear_optimizer: bool) -> None:
        """Collective: every rank's parameters become rank 0's."""
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=0)
        if clear_optimizer:
            self.optimizer.state.clear()

    def weights_match(self) -> bool:
        """Collective: whether every rank's weights have rank 0's checksum; repaired from rank 0
        when not (every rank sees the same MIN/MAX, so all take the same branch)."""
        with torch.no_grad():
            sums = torch.stack([p.data.double().sum() for p in self.params]
                               + [p.data.double().square().sum() for p in self.params])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if torch.equal(lo, hi):
            return True
        self.receive_weights(clear_optimizer=False)
        return False


def _build_replica(spec: dict, device: torch.device) -> _Replica:
    """A follower's replica from rank 0's `attach` message."""
    from geotrain.common.config import ModelConfig
    from geotrain.common.model import GPT, configure_optimizer

    model = GPT(ModelConfig(**spec["model"])).to(device)  # its weights come from rank 0 (DDP)
    optimizer = configure_optimizer(model, spec["weight_decay"], spec["lr"], tuple(spec["betas"]), device)
    return _Replica(model, optimizer, device, spec["grad_clip"])


# --------------------------------------------------------------------------- followers


def _follower_watchdog(rank: int, ctrl) -> None:
    """A follower's thread: exit at once when rank 0 reports a dead rank or rank 0 itself is gone
    (its end of the control pipe closed). Rank 0 closes the pipe only after this follower exited."""
    try:
        msg = ctrl.recv()
        line = f"local rank {msg[0]} died ({msg[1]}): local rank {rank} exits"
    except (EOFError, OSError):
        line = f"local rank 0 is gone: local rank {rank} exits"
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    os._exit(1)


def follower_main(rank: int, world: int, device_type: str, store: str, timeout_s: float, threads: int,
                  cmd, ctrl, log_level: int) -> None:
    """Entry point of local rank `rank` >= 1 (a spawned process). Serves rank 0's commands from
    `cmd` until "stop"; `ctrl` is the watchdog's pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 handles Ctrl+C and stops us
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    threading.Thread(target=_follower_watchdog, args=(rank, ctrl), name="watchdog", daemon=True).start()
    device = _rank_device(device_type, rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    replica: _Replica | None = None
    try:
        while True:
            msg = cmd.recv()
            kind = msg[0]
            if kind == "step":
                _, x, y, n_total, lr, check = msg
                replica.step(torch.from_numpy(x).long(), torch.from_numpy(y).long(), n_total, lr)
                if check:
                    replica.weights_match()
            elif kind == "sync":
                replica.receive_weights(clear_optimizer=msg[1])
            elif kind == "check":
                replica.weights_match()
            elif kind == "attach":
                replica = _build_replica(msg[1], device)
            elif kind == "stop":
                break
            else:
                raise ValueError(f"unknown command {kind!r}")
    except EOFError:
        time.sleep(FAILURE_GRACE_S)  # rank 0 is gone: the watchdog exits with its line
    except Exception as exc:  # noqa: BLE001 - a failed collective: a peer died; the watchdog names it
        time.sleep(FAILURE_GRACE_S)
        sys.stderr.write(f"error: local rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n")
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


# --------------------------------------------------------------------------- rank 0


class HostGroup:
    """Rank 0's side: starts the followers, runs the collective steps, watches the followers.

    device_type: "cuda" or "cpu". on_rank_died(message) runs on the watchdog thread when a
    follower dies while the group is open (default: nothing besides the log line; the next
    collective then raises LocalRankDied)."""

    def __init__(self, nproc: int, device_type: str, *, threads: int = 0, timeout_s: float = TIMEOUT_S,
                 check_every: int = CHECK_EVERY, on_rank_died: Callable[[str], None] | None = None):
        if nproc < 2:
            raise ValueError(f"a host group needs at least 2 processes, got {nproc}")
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.world_size = nproc
        self.device_type = device_type
        self.check_every = check_every
        self.on_rank_died = on_rank_died
        self.dead: str | None = None  # the message naming a dead rank, once one died
        self._closing = threading.Event()
        self._steps = 0
        self._replica: _Replica | None = None
        self._tmp = tempfile.mkdtemp(prefix="geotrain-host-")
        store = os.path.join(self._tmp, "store")
        ctx = mp.get_context("spawn")
        self._cmd, self._ctrl, self.procs = [], [], []
        for rank in range(1, nproc):
            cmd_here, cmd_there = ctx.Pipe()
            ctrl_here, ctrl_there = ctx.Pipe()
            p = ctx.Process(target=follower_main, name=f"local-rank-{rank}", daemon=True,
                            args=(rank, nproc, device_type, store, timeout_s, threads, cmd_there, ctrl_there,
                                  logging.getLogger().getEffectiveLevel()))
            p.start()
            cmd_there.close()
            ctrl_there.close()
            self._cmd.append(cmd_here)
            self._ctrl.append(ctrl_here)
            self.procs.append(p)
            log.info("local rank %d: pid %d", rank, p.pid)
        self._watchdog = threading.Thread(target=self._watch, name="host-watchdog", daemon=True)
        self._watchdog.start()
        self.device = _rank_device(device_type, 0)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{store}",
                                rank=0, world_size=nproc, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("host group of %d %s processes ready", nproc, device_type)

    # ------------------------------------------------------------------ watchdog

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, start=1)}
        ready = mp.connection.wait(list(sentinels))
        if self._closing.is_set():
            return
        rank = sentinels[ready[0]]
        proc = self.procs[rank - 1]
        proc.join(1.0)
        why = _describe_exit(proc.exitcode)
        self.dead = f"local rank {rank} died ({why})"
        log.error("%s: the participant ends", self.dead)
        for r, conn in enumerate(self._ctrl, start=1):
            if r != rank:
                try:
                    conn.send((rank, why))
                except OSError:
                    pass
        if self.on_rank_died is not None:
            self.on_rank_died(self.dead)

    def _failed(self, exc: BaseException) -> LocalRankDied:
        """A collective of rank 0 failed: wait for the watchdog to name the dead rank."""
        deadline = time.monotonic() + FAILURE_GRACE_S
        while self.dead is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return LocalRankDied(self.dead or f"a collective of the host group failed: {exc}")

    def _send(self, msg_for_rank: Callable[[int], tuple]) -> None:
        if self.dead is not None:
            raise LocalRankDied(self.dead)
        for rank, conn in enumerate(self._cmd, start=1):
            try:
                conn.send(msg_for_rank(rank))
            except OSError as exc:
                raise self._failed(exc) from exc

    # ------------------------------------------------------------------ the runner's hooks

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_cfg, optim_cfg) -> None:
        """After rank 0 built its model and optimizer and loaded the first weights: the followers
        build theirs and every rank starts from rank 0's weights."""
        if self.device_type == "cuda":
            check_replica_fits(sum(p.numel() for p in model.parameters()),
                               torch.cuda.get_device_properties(self.device).total_memory, str(self.device))
        spec = {"model": dataclasses.asdict(model_cfg), "weight_decay": optim_cfg.weight_decay, "lr": optim_cfg.lr,
                "betas": [optim_cfg.beta1, optim_cfg.beta2], "grad_clip": optim_cfg.grad_clip}
        self._send(lambda rank: ("attach", spec))
        try:
            self._replica = _Replica(model, optimizer, self.device, optim_cfg.grad_clip)
        except Exception as exc:  # noqa: BLE001 - a collective failed
            raise self._failed(exc) from exc

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        """One step of the participant on x, y (n, T) CPU token ids; the mean loss over the n rows."""
        if self._replica is None:
            raise RuntimeError("train_step before attach")
        n, W = x.shape[0], self.world_size
        if n < 1:
            raise ValueError(f"a step needs at least one sequence, got x of shape {tuple(x.shape)}")
        self._steps += 1
        check = self._steps % self.check_every == 0
        bounds = [r * n // W for r in range(W + 1)]

        def share(rank: int) -> tuple:
            lo, hi = bounds[rank], bounds[rank + 1]
            return ("step", x[lo:hi].to(torch.int32).numpy(), y[lo:hi].to(torch.int32).numpy(), n, lr, check)

        self._send(share)
        try:
            loss = self._replica.step(x[: bounds[1]], y[: bounds[1]], n, lr)
            if check and not self._replica.weights_match():
                log.error("local ranks' weights differed from rank 0's at step %d: repaired", self._steps)
        except Exception as exc:  # noqa: BLE001 - a collective failed
            raise self._failed(exc) from exc
        return loss

    def params_changed(self, optimizer: torch.optim.Optimizer) -> None:
        """Rank 0's parameters changed outside the optimizer: every rank takes them (and clears
        its optimizer state when rank 0's is empty)."""
        if self._replica is None:
            return
        clear = len(optimizer.state) == 0
        self._send(lambda rank: ("sync", clear))
        try:
            self._replica.receive_weights(clear)
        except Exception as exc:  # noqa: BLE001
            raise self._failed(exc) from exc

    def check_weights(self) -> bool:
        """Compare every rank's weights with rank 0's now; False when they differed (repaired)."""
        if self._replica is None:
            return True
        self._send(lambda rank: ("check",))
        try:
            return self._replica.weights_match()
        except Exception as exc:  # noqa: BLE001
            raise self._failed(exc) from exc

    def close(self, timeout: float = 10.0) -> None:
        """Stop the followers (they exit 0), destroy the process group. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        for conn in self._cmd:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(2.0)
        for conn in self._cmd + self._ctrl:
            conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self._tmp, ignore_errors=True)


def start_for_runner(runner) -> HostGroup:
    """The host group of a worker (worker/runner.py `WorkerRunner.run`, config.nproc_per_node > 1).
    When a follower dies the worker leaves the run (its leases return to the pool at once), prints
    one line naming the dead rank and exits with EXIT_LOCAL_RANK; its training thread may be
    blocked in a collective, so this does not wait for it."""

    def on_rank_died(message: str) -> None:
        client = runner.client
        if client is not None and client.worker_id:
            try:
                client.leave(message, patience=5.0)
            except Exception as exc:  # noqa: BLE001 - best effort: lease expiry returns them otherwise
                log.warning("leave failed: %s", exc)
        sys.stderr.write(f"error: {message}: left the run\n")
        sys.stderr.flush()
        os._exit(EXIT_LOCAL_RANK)

    config = runner.config
    if config.sync_group:
        raise ValueError(f"a sync-group member trains on one device (nproc_per_node {config.nproc_per_node} "
                         f"with sync_group {config.sync_group!r})")
    threads = config.threads
    if runner.device.type == "cpu" and not threads:  # N processes share the cores instead of each taking all
        threads = max(1, (os.cpu_count() or 1) // config.nproc_per_node)
        torch.set_num_threads(threads)
    return HostGroup(config.nproc_per_node, runner.device.type, threads=threads, on_rank_died=on_rank_died)
