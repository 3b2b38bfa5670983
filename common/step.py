"""One training step, shared by the reference trainer (common/train.py), the async worker
(worker/runner.py) and the sync member (worker/sync.py, which all-reduces the gradients between
`forward_backward` and its own optimizer step).

    x, y (B, T) ──split──▶ micro-batches (m, T) ──autocast fwd, bwd (grads accumulate)──▶
        clip ──▶ optimizer step ──▶ StepResult(loss on the device, tokens)

B is the batch per device (sequences per inner step, fixed by the run); m the micro-batch
(`TrainConfig.micro_batch`, 0 = auto: the memory plan's figure, probed on CUDA with out-of-memory
back-off and cached per device + model in CACHE/micro_batch.json). Each micro-batch's mean loss is
weighted by its share of the B sequences, so the gradient is that of the full batch. The step's
loss is summed on the device: no host sync per micro-batch; callers read it when they log.

Optimizer state (`TrainConfig.optimizer_state`): fp32 AdamW (fused), 8-bit AdamW from
bitsandbytes (CUDA only, optional, imported when asked for), or `offload`: AdamW over fp32 copies
in (pinned) host memory, `HostOffloadAdamW`. `auto` follows the memory plan (common/memplan.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from geotrain.common.config import ModelConfig, OptimConfig, TrainConfig
from geotrain.common.memplan import OPTIMIZER_BYTES_PER_PARAM, MemoryPlan, balanced_micro_batch, make_plan
from geotrain.common.model import autocast_context, configure_optimizer

log = logging.getLogger("geotrain.step")

MICRO_BATCH_CACHE = "micro_batch.json"


# --------------------------------------------------------------------------- forward + backward


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batch: int = 0,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Accumulate into .grad the gradient of the mean loss over x, y (B, T), run as micro-batches
    of `micro_batch` sequences (0: all B at once) under the device's autocast.

    Returns the mean loss as a detached float32 () tensor on the device (no host sync)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if x.device != device:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    B = x.size(0)
    m = micro_batch if 0 < micro_batch < B else B
    total = torch.zeros((), dtype=torch.float32, device=device)
    amp = autocast_context(device)
    for xs, ys in zip(x.split(m), y.split(m)):  # (m, T) each; the last may be shorter
        with amp:
            _, loss = model(xs, ys)
        w = xs.size(0) / B  # the micro-batch's share of the batch's sequences
        (loss * w).backward() if w != 1.0 else loss.backward()
        total += loss.detach().float() * w
    return total


@dataclass
class StepResult:
    loss: torch.Tensor   # () float32 on the device: mean loss over the step's sequences
    tokens: int          # B * T trained by this step
    micro_batches: int


# --------------------------------------------------------------------------- optimizers


class HostOffloadAdamW:
    """AdamW whose fp32 master weights and state live in host memory (pinned on CUDA).

    step(): the device gradients go to the host, fused CPU AdamW updates the host copies, the
    weights go back to the device. The host copy is refreshed from the device weights at every
    step, so weights changed outside the optimizer (a merged update, a resume) are never
    overwritten by stale ones. Device memory: no optimizer state at all. state_dict() is a plain
    AdamW state dict (same parameter order and groups as common.model.configure_optimizer), so
    checkpoints move between the offloaded and the on-device optimizer.
    """

    def __init__(self, model: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float]):
        self.device_params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.device_params[0].device
        pin = self.device.type == "cuda"
        self.host_params = [nn.Parameter(torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)) for p in self.device_params]
        self._host_grads = [torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for p in self.device_params]
        host_model = _ParamList(self.host_params)
        self.inner = configure_optimizer(host_model, weight_decay, lr, betas, torch.device("cpu"))

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.device_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for dp, hp, hg in zip(self.device_params, self.host_params, self._host_grads):
            hp.copy_(dp.detach(), non_blocking=True)
            if dp.grad is None:
                hp.grad = None
            else:
                hp.grad = hg.copy_(dp.grad, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.inner.step()
        for dp, hp in zip(self.device_params, self.host_params):
            dp.copy_(hp, non_blocking=True)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class _ParamList(nn.Module):
    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


def have_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a CUDA setup error raised at import
        return False
    return True


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device, state: str = "fp32"):
    """The inner AdamW with the given state: fp32 | 8bit | offload (module doc)."""
    betas = (optim.beta1, optim.beta2)
    if state == "fp32":
        return configure_optimizer(model, optim.weight_decay, optim.lr, betas, device)
    if state == "offload":
        return HostOffloadAdamW(model, optim.weight_decay, optim.lr, betas)
    if state == "8bit":
        if device.type != "cuda":
            raise ValueError(f"optimizer state '8bit' needs a CUDA device (bitsandbytes), got {device}; use 'offload' or 'fp32'")
        try:
            import bitsandbytes as bnb
        except Exception as exc:
            raise ValueError("optimizer state '8bit' needs bitsandbytes: pip install bitsandbytes "
                             f"(or use optimizer state 'offload'); import failed: {exc}") from exc
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return bnb.optim.AdamW8bit(groups, lr=optim.lr, betas=betas)
    raise ValueError(f"optimizer state must be fp32, 8bit or offload, got {state!r}")


# --------------------------------------------------------------------------- the plan on a device


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes; None elsewhere (no limit the plan can use)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def plan_for_device(model_cfg: ModelConfig, train: TrainConfig, device: torch.device, batch_size: int,
                    nproc: int = 1, device_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of this process on `device` (what the trainer and the worker print at start);
    device_bytes overrides the device's own memory (a smaller share of it, or a planned card)."""
    limit = device_bytes if device_bytes is not None else device_memory(device)
    return make_plan(model_cfg, limit, batch_size, nproc=nproc, micro_batch=train.micro_batch,
                     checkpointing=train.activation_checkpointing, optimizer_state=train.optimizer_state,
                     have_8bit=device.type == "cuda" and have_bitsandbytes())


def _cache_key(model_cfg: ModelConfig, device: torch.device, plan: MemoryPlan, compiled: bool) -> str:
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    name = f"{props.name}/{props.total_memory}" if props else device.type
    spec = json.dumps({"model": model_cfg.to_dict(), "batch": plan.batch_size, "ckpt": plan.checkpointing,
                       "state": plan.optimizer_state, "compile": compiled, "torch": torch.__version__}, sort_keys=True)
    return f"{name}|{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


def _read_cache(path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_micro_batch(key: str, cache_dir=None) -> int | None:
    from geotrain.common.corpus import cache_root
    value = _read_cache((cache_dir or cache_root()) / MICRO_BATCH_CACHE).get(key)
    return value if isinstance(value, int) and value > 0 else None


def store_micro_batch(key: str, micro_batch: int, cache_dir=None) -> None:
    from geotrain.common.checkpoint import atomic_write_bytes
    from geotrain.common.corpus import cache_root
    path = (cache_dir or cache_root()) / MICRO_BATCH_CACHE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        values = _read_cache(path)
        values[key] = int(micro_batch)
        atomic_write_bytes(path, (json.dumps(values, indent=1, sort_keys=True) + "\n").encode())
    except OSError as exc:  # a read-only home: probe again next time
        log.warning("could not cache the micro-batch in %s: %s", path, exc)


def probe_micro_batch(try_fn: Callable[[int], None], batch_size: int, start: int | None = None) -> int:
    """The largest micro-batch <= start (default batch_size) for which try_fn(m) runs without
    torch.OutOfMemoryError, stepping down through balanced micro-batches (12 -> 6 -> 4 -> 3 -> 2 -> 1)."""
    m = balanced_micro_batch(batch_size, start or batch_size)
    while True:
        try:
            try_fn(m)
            return m
        except torch.OutOfMemoryError:
            if m == 1:
                raise ValueError(f"out of device memory even at micro-batch 1 (batch {batch_size}); "
                                 "use activation checkpointing 'on' and optimizer state 'offload'") from None
            m = balanced_micro_batch(batch_size, m - 1)


# --------------------------------------------------------------------------- the step


class TrainStep:
    """Owns the per-step work on a model: micro-batches, checkpointing, autocast, compile, clip,
    optimizer step. Call it with a batch (any device) and the step's learning rate."""

    def __init__(self, model: nn.Module, optimizer, device: torch.device | str, *, micro_batch: int = 0,
                 grad_clip: float = 0.0, checkpointing: bool = False, compile: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.micro_batch = micro_batch
        self.grad_clip = grad_clip
        if hasattr(model, "activation_checkpointing"):
            model.activation_checkpointing = checkpointing
        self.forward_model: nn.Module = torch.compile(model) if compile else model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.plan: MemoryPlan | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float | None = None) -> StepResult:
        """One optimizer step on x, y (B, T) int64. Gradients are zero before and after."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.model.train()
        loss = forward_backward(self.forward_model, x, y, self.micro_batch, self.device)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        m = self.micro_batch if 0 < self.micro_batch < x.size(0) else x.size(0)
        return StepResult(loss=loss, tokens=x.numel(), micro_batches=-(-x.size(0) // m))

    @classmethod
    def for_run(cls, model: nn.Module, model_cfg: ModelConfig, optim: OptimConfig, train: TrainConfig,
                device: torch.device, batch_size: int, nproc: int = 1, probe: bool = True,
                device_bytes: int | None = None) -> "TrainStep":
        """The step the plan asks for on this device: optimizer state, checkpointing, micro-batch
        (probed on CUDA when train.micro_batch is 0, cached). Its plan is in `.plan`.

        A plan that does not fit is a ValueError naming what it needs, unless the config fixes all
        three choices (micro_batch > 0, checkpointing and optimizer state not auto): then the
        step runs as asked (the plan's formula is an estimate) after a warning."""
        plan = plan_for_device(model_cfg, train, device, batch_size, nproc, device_bytes)
        if not plan.fits:
            forced = train.micro_batch > 0 and "auto" not in (train.activation_checkpointing, train.optimizer_state)
            if not forced:
                raise ValueError(f"the model does not fit on {device}: {plan.reason}; set train.micro_batch, "
                                 "train.activation_checkpointing and train.optimizer_state to try anyway")
            log.warning("the memory plan says this does not fit (%s); running as configured", plan.reason)
            plan.micro_batch = train.micro_batch
        optimizer = build_optimizer(model, optim, device, plan.optimizer_state)
        step = cls(model, optimizer, device, micro_batch=plan.micro_batch, grad_clip=optim.grad_clip,
                   checkpointing=plan.checkpointing, compile=train.compile)
        if device.type == "cuda" and train.micro_batch == 0 and probe:
            step.micro_batch = step.probe(model_cfg, plan)
            plan.micro_batch = step.micro_batch
        step.plan = plan
        return step

    def probe(self, model_cfg: ModelConfig, plan: MemoryPlan, cache_dir=None) -> int:
        """The largest micro-batch that runs forward + backward on this CUDA device next to the
        optimizer state the plan counts (reserved while probing); cached per device + model."""
        key = _cache_key(model_cfg, self.device, plan, self.forward_model is not self.model)
        found = cached_micro_batch(key, cache_dir)
        if found is not None:
            return found
        n = sum(p.numel() for p in self.params)
        reserve_bytes = 0 if self.optimizer.state else OPTIMIZER_BYTES_PER_PARAM[plan.optimizer_state] * n
        T = plan.seq_len
        gen = torch.Generator(device="cpu").manual_seed(0)

        def try_fn(m: int) -> None:
            torch.cuda.empty_cache()  # what a failed larger try left cached
            reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=self.device) if reserve_bytes else None
            try:
                x = torch.randint(0, model_cfg.vocab_size, (m, T + 1), generator=gen).to(self.device)
                self.model.train()
                forward_backward(self.forward_model, x[:, :-1], x[:, 1:], m, self.device)
                torch.cuda.synchronize(self.device)
            finally:
                del reserve
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()

        m = probe_micro_batch(try_fn, plan.batch_size)
        store_micro_batch(key, m, cache_dir)
        return m


# --------------------------------------------------------------------------- prefetch


class Prefetcher:
    """Prepares batches in a background thread, `depth` ahead (bounded queue).

    make_batch(i) -> (x, y) CPU tensors, for i = start, start+1, ...; on CUDA the thread pins them
    and starts the copy to the device (non_blocking) so the step finds them there. Batches come out
    in order; an exception in make_batch is raised by next(). close() stops the thread."""

    _END = object()

    def __init__(self, make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 start: int = 0, depth: int = 2):
        if depth <= 0:
            raise ValueError(f"prefetch depth must be > 0, got {depth}")
        self.make_batch, self.device = make_batch, torch.device(device)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, args=(start,), name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, i: int) -> None:
        try:
            while not self._stop.is_set():
                x, y = self.make_batch(i)
                event = None
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        x = x.pin_memory().to(self.device, non_blocking=True)
                        y = y.pin_memory().to(self.device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(self._stream)
                elif x.device != self.device:
                    x, y = x.to(self.device), y.to(self.device)
                if not self._put((x, y, event)):
                    return
                i += 1
        except BaseException as exc:  # delivered to the consumer
            self._put((self._END, exc, None))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, event = self.queue.get()
        if x is self._END:
            raise y
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            x.record_stream(torch.cuda.current_stream(self.device))
            y.record_stream(torch.cuda.current_stream(self.device))
        return x, y

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
