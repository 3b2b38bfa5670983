"""The worker's membership of a run: heartbeats from the moment it joins until it leaves.

The coordinator drops a worker whose lease (renewed by heartbeats, JoinReply.heartbeat_seconds
apart) expires. Model setup after the join (building the model, rebuilding or downloading the
initial weights and hashing them) can take longer than a lease on a large model, so the heartbeat
thread starts right after the join reply, before any of it (`Heartbeats.start` is called by the
runner as soon as `client.join` returns), and sends zero-step stats while the worker prepares.

Heartbeat thread: every `interval` seconds it builds WorkerStats from `stats()` and sends them,
with the sync-group fields `extras()` returns (worker/group_runner.py); a reply STOP sets
`finish`; `on_reply(reply)` sees every reply. A FatalError goes to `inbox` as ("fatal", exc) and
ends the thread; other failures are logged and retried at the next beat. `abort` ends it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import torch

from geotrain.protos import geotrain_pb2 as pb
from geotrain.worker.client import CoordinatorClient, FatalError
from geotrain.worker.metrics import Stats, StatsBook

log = logging.getLogger(__name__)


def worker_stats(s: Stats, prev: Stats, dt: float, client: CoordinatorClient, device: torch.device | None,
                 wall_seconds: float) -> pb.WorkerStats:
    """WorkerStats over the interval from `prev` to `s` (dt seconds), cumulative totals of `s`."""
    dt = max(1e-9, dt)
    steps = s.steps - prev.steps
    gpu_mem, gpu_util = 0, -1.0
    if device is not None and device.type == "cuda":
        gpu_mem = int(torch.cuda.memory_allocated(device))
        try:
            gpu_util = torch.cuda.utilization(device) / 100.0
        except Exception:  # noqa: BLE001 - needs pynvml
            gpu_util = -1.0
    return pb.WorkerStats(
        tokens_per_second=(s.tokens - prev.tokens) / dt,
        step_seconds=(s.step_seconds - prev.step_seconds) / steps if steps else 0.0,
        loss=(s.loss_sum - prev.loss_sum) / steps if steps else 0.0,
        sent_bytes=client.sent_bytes, received_bytes=client.received_bytes, data_bytes=client.data_bytes,
        wait_seconds=s.wait_seconds, wall_seconds=wall_seconds,
        steps=s.steps, tokens=s.tokens, gpu_memory_bytes=gpu_mem, gpu_utilization=gpu_util,
        residual_norm=s.residual_norm,
    )


class Heartbeats:
    """The heartbeat thread of one joined session (see the module docstring)."""

    def __init__(self, client: CoordinatorClient, interval: float, stats: StatsBook, abort: threading.Event,
                 finish: threading.Event, inbox: queue.Queue, metrics=None,
                 device: Callable[[], torch.device | None] = lambda: None,
                 extras: Callable[[], dict] = dict, on_reply: Callable[[pb.HeartbeatReply], None] = lambda r: None):
        self.client = client
        self.interval = interval
        self.stats = stats
        self.abort = abort
        self.finish = finish
        self.inbox = inbox
        self.metrics = metrics
        self.device = device
        self.extras = extras
        self.on_reply = on_reply
        self.started_at = time.monotonic()
        self.train_start: float | None = None  # set by the runner when training starts (wall_seconds)
        self.beats = 0  # heartbeats answered
        self.last_stats = pb.WorkerStats()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def current_stats(self, prev: Stats, prev_t: float) -> tuple[pb.WorkerStats, Stats]:
        s = self.stats.snapshot()
        wall = time.monotonic() - self.train_start if self.train_start is not None else 0.0
        return worker_stats(s, prev, time.monotonic() - prev_t, self.client, self.device(), wall), s

    def send(self, stats: pb.WorkerStats, patience: float | None = None) -> pb.HeartbeatReply:
        """One heartbeat now (any thread) with the extras of this moment."""
        self.last_stats = stats
        reply = self.client.heartbeat(stats, patience=patience, **self.extras())
        self.beats += 1
        return reply

    def _loop(self) -> None:
        prev, prev_t = Stats(), time.monotonic()
        while not self.abort.wait(self.interval):
            stats, prev = self.current_stats(prev, prev_t)
            prev_t = time.monotonic()
            if self.metrics is not None:
                self.metrics.tokens_per_second.set(stats.tokens_per_second)
                if stats.loss:
                    self.metrics.loss.set(stats.loss)
                self.metrics.set_cumulative(stats.sent_bytes, stats.received_bytes, stats.wait_seconds)
                self.metrics.gpu_memory_bytes.set(stats.gpu_memory_bytes)
                self.metrics.gpu_utilization_ratio.set(stats.gpu_utilization)
            try:
                reply = self.send(stats)
            except FatalError as exc:
                self.inbox.put(("fatal", exc))
                return
            except Exception as exc:  # noqa: BLE001
                if not self.abort.is_set():
                    log.warning("heartbeat failed: %s", exc)
                continue
            if reply.action == pb.HeartbeatReply.STOP:
                log.info("coordinator says the run is finished")
                self.finish.set()
            self.on_reply(reply)
