"""The worker: joins a run and trains local rounds of AdamW, pushing deltas in the background and
rebasing on the merged updates. `WorkerRunner` composes the parts:

- worker/membership.py `Heartbeats`: the heartbeat thread, from the join on (setup included).
- worker/trainer.py `LocalTrainer`: the model, inner AdamW and one training step.
- worker/shards.py `ShardCache`: leases and shards (the prefetch pool runs its lease_and_fetch).
- worker/comm.py `CommThread`: push, long-poll for its merge, resync; decoding by
  worker/downlink.py `Downlink` (the replayed downlinks use common/merge.py).
- worker/rebase.py `RoundState`: params = base + L, pending ranges, the push in flight, and the
  rebase rules that apply the comm thread's messages (its module docstring states them).

Threads:
- training (the caller of `run()`): inner steps; at each step boundary it applies what the comm
  thread received. It blocks on the network only for the first model, a lease or shard that the
  background prefetch has not delivered yet, and the way out; that time is `wait_seconds`.
- comm, heartbeat, prefetch pool (the next lease and its shard, so a finished range never idles
  the GPU), background shard downloads, `base` (worker/rebase.py: the basepoint's additions and
  checksum after a rebase), batch prefetch on CUDA (worker/shards.py LeaseBatches: the current
  lease's next batches, on the device before the step asks).

`RunnerHooks` is how a mode adds to the loop without replacing it (the sync group,
worker/group_runner.py): its methods are called at fixed points, documented on each.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from geotrain.common.config import ModelConfig, RunConfig, WorkerConfig, WorkersConfig, run_config_from_dict
from geotrain.common.tensors import params_sha256, tensor_spec
from geotrain.protos import geotrain_pb2 as pb
from geotrain.worker.client import CoordinatorClient, FatalError
from geotrain.worker.comm import CommThread
from geotrain.worker.downlink import Downlink
from geotrain.worker.membership import Heartbeats
from geotrain.worker.metrics import Stats, StatsBook
from geotrain.worker.ports import bind_metrics, bind_worker_server
from geotrain.worker.rebase import NewRun, RoundState
from geotrain.worker.shards import Lease, LeaseBatches, ShardCache
from geotrain.worker.trainer import LocalTrainer, initial_weights_from_seed

log = logging.getLogger(__name__)



class RunnerHooks:
    """Extension points of `WorkerRunner`'s loop; this base does nothing (an async worker).

    All run on the training thread unless stated."""

    def attach(self, runner: "WorkerRunner") -> None:
        """Called once by WorkerRunner.__init__."""

    def before_serve(self, server) -> None:
        """The worker's grpc.Server before start(): register more services on it."""

    def after_join(self, reply: pb.JoinReply) -> None:
        """Right after a join, heartbeats already running, before the model is set up."""

    def step_boundary(self, lease: Lease | None) -> bool:
        """At a step boundary: True when it used the boundary for a step of its own that needs
        no lease (the runner then starts the next boundary)."""
        return False

    def may_lease(self) -> bool:
        """Prefetch pool: False holds new leases back."""
        return True

    def apply_updates(self, drain: Callable[[], None]) -> None:
        """At a step boundary: `drain()` applies the comm thread's messages (merged updates,
        full models) to the weights; a hook may defer it (not call it now) or wrap it."""
        drain()

    def train_step(self, lease: Lease) -> bool:
        """True when it trained this step of `lease` itself (bookkeeping included)."""
        return False

    def heartbeat_extras(self) -> dict:
        """Heartbeat thread: extra keyword arguments of CoordinatorClient.heartbeat."""
        return {}

    def on_heartbeat_reply(self, reply: pb.HeartbeatReply) -> None:
        """Heartbeat thread: every reply (STOP is handled by the runner)."""

    def before_finish(self) -> None:
        """The loop ended; the final push and Leave come next."""

    def on_new_run(self) -> None:
        """The coordinator started another run: the runner sets up again after this."""


class WorkerRunner:
    def __init__(self, config: WorkerConfig, hooks: RunnerHooks | None = None):
        self.config = config
        self.name = config.name or f"{os.uname().nodename}-{os.getpid()}"
        self.hooks = hooks or RunnerHooks()
        self.stop_event = threading.Event()  # finish requested (signal)
        self.finish_event = threading.Event()  # finish requested (coordinator STOP)
        self.abort = threading.Event()  # give up all retries now
        self.inbox: queue.Queue = queue.Queue()  # the comm thread's messages (worker/comm.py)
        self.need_full = threading.Event()
        self.stats = StatsBook()
        self.state = "starting"
        self.server = None
        # Multi-device hook (worker/host_group.py HostGroup), started by run() when
        # config.nproc_per_node > 1: called at each step, after every change of the weights
        # outside the optimizer (setup, rebase, resync, dropped progress) and at shutdown.
        self.host = None
        self.metrics = None
        self.metrics_port = 0  # the bound metrics port (0: none)
        self.client: CoordinatorClient | None = None
        self.heartbeats: Heartbeats | None = None
        self.trainer: LocalTrainer | None = None
        self.rounds: RoundState | None = None
        self.comm: CommThread | None = None
        self.shards: ShardCache | None = None
        self.downlink: Downlink | None = None
        self.device: torch.device | None = None
        self.next_lease: Future | None = None  # the prefetched lease after the current one
        # Seconds after which a step-based round ends anyway, from the last heartbeat reply
        # (coordinator/pacing.py round_time_cap; 0 = rounds of steps only). Written by the
        # heartbeat thread, read by the training thread (a float: no lock needed).
        self.round_seconds_cap = 0.0
        self.round_steps = 0  # HeartbeatReply.round_steps (0: the run's round.steps)
        # The current lease's next batches made on a background thread (worker/shards.py
        # LeaseBatches); None: on CUDA without a host group (whose devices take CPU batches).
        self.prefetch_batches: bool | None = None
        self.batches = None
        self.train_start = time.monotonic()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.hooks.attach(self)

    # ------------------------------------------------------------------ public

    def stop(self) -> None:
        """Finish the current step, push what is pending if the coordinator answers soon, leave."""
        self.stop_event.set()
        if self.state in ("starting", "setting up"):
            self.abort.set()  # still joining / preparing the first model: give up retrying

    def finishing(self) -> bool:
        return self.stop_event.is_set() or self.finish_event.is_set()

    def bind(self) -> None:
        """Bind the worker's gRPC server and metrics exporter (before joining: the join request
        advertises the gRPC port). A taken port: a free one where the config allows it, else
        PortInUse (a ValueError naming the port and its flag)."""
        if self.config.serve and self.server is None:
            from geotrain.protos.rpc import TokenAuthInterceptor

            import grpc

            # The run token guards this endpoint; the Peer service of sync groups checks each
            # group's own secret instead (worker/peer.py).
            auth = [TokenAuthInterceptor(self.config.token, exempt=("/geotrain.v1.Peer/",))] if self.config.token else []
            creds = None
            if self.config.tls_cert:
                creds = grpc.ssl_server_credentials([(self.config.tls_key, self.config.tls_cert)])
            self.server = bind_worker_server(self.config.port, self.config.port_fallback, self._describe, auth, creds)
            self.hooks.before_serve(self.server.server)
            self.server.start()
        if self.metrics is None:
            from geotrain.worker.metrics import WorkerMetrics

            self.metrics = WorkerMetrics()
            if self.config.metrics_port:
                self.metrics_port = bind_metrics(self.metrics, self.config.metrics_port, self.config.metrics_port_fallback)

    def run(self) -> int:
        from geotrain.common.model import resolve_device

        self.device = resolve_device(self.config.device)
        if self.config.nproc_per_node > 1 and self.host is None:
            from geotrain.worker.host_group import start_for_runner

            self.host = start_for_runner(self)  # spawns the followers; rank 0 is this process
        self.client = CoordinatorClient(
            self.config.coordinator, self.config.token, self.config.tls_ca, self.abort,
            on_rejoin=lambda reply: self.inbox.put(("rejoined", reply)),
        )
        try:
            self.bind()
            while True:
                try:
                    return self._run_once()
                except grpc.RpcError:
                    if self.stop_event.is_set():
                        log.warning("stopped before the first step")
                        return 0
                    raise
                except NewRun:
                    log.warning("the coordinator started a new run: setting up again")
                    self.hooks.on_new_run()
                    while not self.inbox.empty():
                        self.inbox.get_nowait()
                    self.need_full.clear()
        finally:
            self.abort.set()
            self.state = "stopped"
            if self.host is not None:
                self.host.close()
            if self.server is not None:
                self.server.stop(1.0)
            self.client.close()

    # ------------------------------------------------------------------ setup

    def _describe(self) -> tuple[str, str, str]:
        return self.name, self.client.worker_id if self.client else "", self.state

    def _join_request(self) -> pb.JoinRequest:
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            device, memory = f"cuda:{props.name}", int(props.total_memory)
        else:
            device = self.device.type
            try:
                memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError):
                memory = 0
        from geotrain.common import __version__

        advertise_port = self.config.advertise_port or (self.server.port if self.server else 0)
        if self.config.nproc_per_node > 1:  # one participant on several devices: "cuda:NVIDIA H100 x8"
            device = f"{device} x{self.config.nproc_per_node}"
        return pb.JoinRequest(
            name=self.name, device=device, memory_bytes=memory, software_version=__version__,
            config_fingerprint=f"{device}|{torch.cuda.device_count() if self.device.type == 'cuda' else 1}|{__version__}",
            advertise_host=self.config.advertise_host, advertise_port=advertise_port,
            sync_group=self.config.sync_group,
        )

    def _on_heartbeat_reply(self, reply: pb.HeartbeatReply) -> None:
        """Heartbeat thread: every reply. The round's length and time cap (coordinator/pacing.py), then the hooks."""
        self.round_seconds_cap = reply.round_seconds_cap
        self.round_steps = reply.round_steps
        self.hooks.on_heartbeat_reply(reply)

    def _join(self, run_ended: threading.Event) -> pb.JoinReply:
        """Join and start heartbeating at once: everything after this (model setup) may take
        longer than the coordinator's lease."""
        reply = self.client.join(self._join_request())
        self.heartbeats = Heartbeats(
            self.client, reply.heartbeat_seconds or WorkersConfig.heartbeat_seconds, self.stats, run_ended, self.finish_event, self.inbox,
            metrics=self.metrics, device=lambda: self.device, extras=self.hooks.heartbeat_extras,
            on_reply=self._on_heartbeat_reply,
        )
        self.heartbeats.start()
        return reply

    def _setup(self, run_ended: threading.Event) -> None:
        from geotrain.common.shards import Manifest

        self.state = "setting up"
        reply = self._join(run_ended)
        self.join_reply = reply
        self.run_id = reply.run_id
        self.hooks.after_join(reply)
        spec = json.loads(reply.run_spec_json)
        self.run_cfg: RunConfig = run_config_from_dict(spec["run"])
        self.model_cfg = ModelConfig(**spec["model"])
        self.manifest = Manifest.from_json(json.dumps(spec["manifest"]))
        self.step_offset = int(spec.get("step_offset", 0))
        self.heartbeat_seconds = reply.heartbeat_seconds or WorkersConfig.heartbeat_seconds
        # Sequences per device step; a participant step trains that many on each of its devices.
        device_batch = self.config.batch_size or self.run_cfg.train.batch_size
        self.batch_size = device_batch * max(1, self.config.nproc_per_node)
        self.trainer = LocalTrainer(self.run_cfg, self.model_cfg, self.device, reply.worker_id, device_batch)
        spec_shapes = tensor_spec(self.trainer.params)
        self.model_bytes = sum(t.numel() * 4 for t in self.trainer.params.values())
        max_blob_bytes = 2 * self.model_bytes * (self.run_cfg.merge.max_staleness + 2) + (16 << 20)
        self.downlink = Downlink(self.run_cfg, spec_shapes, max_blob_bytes)
        cache = Path(self.config.cache_dir).expanduser() if self.config.cache_dir else None
        if cache is None:
            from geotrain.common.corpus import cache_root

            cache = cache_root() / "shards"

        def should_stop(seconds: float) -> bool:
            return self.stop_event.wait(seconds) or self.finish_event.is_set() or self.abort.is_set()

        self.shards = ShardCache(self.client, self.manifest, cache / self.run_id, self.model_cfg.block_size,
                                 self.run_cfg.train.seed, should_stop, self.hooks.may_lease)
        log.info("joined run %s as %s: model %s, batch %d, device %s", self.run_id, reply.worker_id,
                 self.model_cfg, self.batch_size, self.device)
        # The first model: the training loop waits for it.
        t0 = time.monotonic()
        version, full = self._first_model(spec.get("initial_sha256", ""))
        self.stats.add(wait_seconds=time.monotonic() - t0)
        self.trainer.load(full)
        host = self.host
        if host is not None:  # the followers build their replicas and take these weights
            host.attach(self.trainer.model, self.trainer.optimizer, self.model_cfg, self.run_cfg.optim)
        self.rounds = RoundState(
            self.trainer.params, full, version, self.run_id, self.stats, self.need_full, metrics=self.metrics,
            release_push=self.downlink.release, on_reset=self.trainer.clear_optimizer,
            on_params_changed=(lambda: host.params_changed(self.trainer.optimizer)) if host is not None else None,
        )
        self.comm = CommThread(self.client, self.downlink, self.inbox, self.need_full, run_ended, version,
                               self.model_bytes, self.run_cfg.merge.max_staleness, self.config.long_poll_seconds)

    def _first_model(self, initial_sha: str) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, fp32 CPU weights, ours to keep as the basepoint) to start from. The run's
        version 1 is rebuilt from the seed when it reproduces the coordinator's checksum (then only
        the updates since version 1 are fetched, if the coordinator holds them and they are smaller
        than the weights); otherwise, or on any checksum mismatch, the full model is downloaded."""
        dl = self.downlink
        initial = initial_weights_from_seed(self.run_cfg, self.model_cfg, initial_sha)
        if initial is not None:
            rep = self.client.get_model(1, self.model_bytes, dl.max_blob_bytes)
            h = rep.header
            if h.kind == pb.ModelHeader.UNCHANGED:
                log.info("initial model rebuilt from the seed (checksum verified): nothing to download")
                return h.version, initial
            if h.kind == pb.ModelHeader.UPDATES:
                if dl.outer is not None:  # version 1 has no momentum yet
                    dl.outer.load_momentum({n: torch.zeros_like(t) for n, t in initial.items()})
                for u in h.updates:
                    update = dl.update_tensors(u, rep.blob)
                    for name, t in initial.items():
                        t.add_(update[name])
                    del update
                if params_sha256(initial) == h.params_sha256:
                    log.info("initial model rebuilt from the seed plus %d update(s) to version %d",
                             len(h.updates), h.version)
                    return h.version, initial
                log.error("seed model plus updates does not match version %d's checksum: downloading it", h.version)
            elif params_sha256(full := dl.full_tensors(rep)) == h.params_sha256:
                return h.version, full
            del initial, rep
        rep = self.client.get_model(0, self.model_bytes, dl.max_blob_bytes, force_full=True)
        full = dl.full_tensors(rep)
        if params_sha256(full) != rep.header.params_sha256:
            log.error("model checksum mismatch on the first download; fetching it again")
            rep = self.client.get_model(0, self.model_bytes, dl.max_blob_bytes, force_full=True)
            full = dl.full_tensors(rep)
        return rep.header.version, full

    # ------------------------------------------------------------------ main loop

    def _run_once(self) -> int:
        run_ended = threading.Event()  # ends this run's heartbeat and comm threads
        self._run_ended = run_ended
        try:
            return self._train_run(run_ended)
        finally:
            run_ended.set()

    def _train_run(self, run_ended: threading.Event) -> int:
        self._setup(run_ended)
        self.state = "training"
        bg = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefetch")
        self.comm.start()
        self.train_start = time.monotonic()
        self.heartbeats.train_start = self.train_start
        rounds, shards = self.rounds, self.shards
        prefetch = self.prefetch_batches
        if prefetch is None:
            prefetch = self.device.type == "cuda" and self.host is None
        self.batches = LeaseBatches(shards, self.device) if prefetch else None
        lease: Lease | None = None
        self.next_lease = bg.submit(shards.lease_and_fetch)  # the lease after the current one
        reason = "stopped"
        bar = self._progress_bar()
        last_summary = time.monotonic()
        try:
            while True:
                if self.stop_event.is_set():
                    reason = "signal"
                    break
                if self.finish_event.is_set():
                    reason = "run finished (coordinator STOP)"
                    break
                if self.hooks.step_boundary(lease):
                    continue  # a sync-group step of a rank > 0 member (worker/group_runner.py)
                self.apply_inbox()
                if lease is not None and lease.session != self.client.session_epoch:
                    lease = None  # leased in a session the coordinator forgot
                if lease is None or shards.range_done(lease):
                    t0 = time.monotonic()
                    while not self.next_lease.done() and not self.finishing():
                        if self.hooks.step_boundary(None):
                            continue
                        self.apply_inbox()
                        if rounds.inflight is None and len(rounds.pending) > rounds.sealed:
                            self._push_while_idle()
                        time.sleep(0.05)
                    self.stats.add(wait_seconds=time.monotonic() - t0)
                    if not self.next_lease.done():
                        continue  # stopping
                    try:
                        got = self.next_lease.result()
                    except (ValueError, OSError, grpc.RpcError) as exc:
                        log.error("could not lease or fetch data: %s; retrying", exc)
                        time.sleep(2.0)
                        self.next_lease = bg.submit(shards.lease_and_fetch)
                        continue
                    self.next_lease = bg.submit(shards.lease_and_fetch)
                    if got is None:
                        reason = "data exhausted"
                        self.next_lease.cancel()
                        break
                    if got.session == self.client.session_epoch:
                        lease = got
                    continue
                if rounds.lag_exhausted(self.run_cfg.round.max_lag_steps):
                    self._wait_for_merge()
                    continue
                if not self.hooks.train_step(lease):
                    self.train_step(lease)
                bar.update(1)
                if time.monotonic() - last_summary >= self.config.summary_seconds:
                    last_summary = time.monotonic()
                    self._summary(bar)
                if rounds.round_over(self.run_cfg.round, self.round_seconds_cap, self.round_steps) and rounds.inflight is None:
                    self.start_push()
        finally:
            if self.batches is not None:
                self.batches.close()
            self._summary(bar)  # the last figures, also when the loop ended between summaries
            bar.close()
        self.state = "finishing"
        self.hooks.before_finish()
        patience = self.config.shutdown_patience if reason == "signal" else self.config.finish_patience
        self._finish_up(reason, patience)
        bg.shutdown(wait=False, cancel_futures=True)
        return 0

    # ------------------------------------------------------------------ steps (training thread)

    def apply_inbox(self) -> None:
        """Apply what the comm thread delivered (when and how the hooks say)."""
        self.hooks.apply_updates(lambda: self.rounds.drain(self.inbox))

    def train_step(self, lease: Lease) -> None:
        """One local step on the lease's next batch, and its bookkeeping."""
        T = self.model_cfg.block_size
        if self.batches is not None and self.host is None:
            x, y, n = self.batches.next(lease, self.batch_size)
        else:
            x, y, n = self.shards.lease_batch(lease, self.batch_size)
        from geotrain.worker.throttle import stretch_step

        rounds = self.rounds
        t0 = time.monotonic()
        if self.host is not None:  # the host's devices train on shares of the batch (worker/host_group.py)
            from geotrain.common.train import lr_at

            lr = lr_at(self.step_offset + rounds.local_step, self.run_cfg.optim, self.run_cfg.train.max_iters)
            loss = self.host.train_step(x, y, lr)
            seconds = time.monotonic() - t0
        else:
            loss, seconds = self.trainer.step(x, y, self.step_offset + rounds.local_step)
        if self.config.speed < 1.0:  # worker/throttle.py: --speed below 1 stretches the step (demo, benchmarks)
            stretch_step(t0, self.config.speed)
            seconds = time.monotonic() - t0
        start = lease.pos
        lease.pos += n * T
        self.count_step(lease, start, loss, seconds, n * T)

    def count_step(self, lease: Lease | None, start: int, loss: float, seconds: float, tokens: int) -> None:
        """Bookkeeping of one trained step: tokens [start, lease.pos) of `lease` go to the pending
        ranges (lease None: a step on no lease of ours), the round and the stats advance."""
        rounds = self.rounds
        rounds.local_step += 1
        if lease is not None:
            rounds.round_steps += 1
            rounds.record_range(lease, start, lease.pos, loss)
        self.stats.add(steps=1, tokens=tokens, loss_sum=loss, step_seconds=seconds)
        if self.metrics is not None:
            self.metrics.step_seconds.observe(seconds)

    def start_push(self, scheme: str | None = None) -> None:
        """Seal the pending ranges into a push (the delta snapshot, on this thread) and hand it to
        the comm thread, which encodes it with `scheme` (default: the run's) and sends it."""
        rounds = self.rounds
        if not rounds.pending:
            return
        push = rounds.snapshot_push(self.client.session_epoch)  # the delta, now; encoded by the comm thread
        rounds.seal(push)
        c = self.run_cfg.compression
        self.comm.submit_push(push, lambda: rounds.encode_push(push, c, scheme))

    def _wait_for_merge(self) -> None:
        """Hold training until the push in flight is resolved (merged, stale, lost) or the worker
        stops, handling what the comm thread delivers as it arrives; the time counts as waiting on
        the network. The comm thread's deadlines and retries bound how long a push stays in flight."""
        t0 = time.monotonic()
        while self.rounds.lag_exhausted(self.run_cfg.round.max_lag_steps) and not self.finishing():
            try:
                msg = self.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            self.rounds.handle(msg)
        self.stats.add(wait_seconds=time.monotonic() - t0)

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(desc=f"worker {self.name}", unit="step", disable=None, dynamic_ncols=True)

    def _summary(self, bar) -> None:
        s = self.stats.snapshot()
        wall = max(1e-9, time.monotonic() - self.train_start)
        loss = s.loss_sum / max(1, s.steps)
        msg = (f"step {s.steps} v{self.rounds.base_version} loss {loss:.4f} {s.tokens / wall:.0f} tok/s "
               f"up {self.client.sent_bytes / 1e6:.1f} MB down {self.client.received_bytes / 1e6:.1f} MB "
               f"wait {100 * s.wait_seconds / wall:.1f}% pushes {s.pushes} merged {s.merged} stale {s.stale} "
               f"merge lag {s.merge_lag_steps / max(1, s.merged):.1f} steps")
        if bar.disable:
            log.info(msg)
        else:
            bar.set_postfix_str(msg, refresh=True)

    # ------------------------------------------------------------------ the way out

    def _push_while_idle(self) -> None:
        """No data to train on until a lease comes: send the pending steps now. This is
        usually the end of the run (the budget is leased out), so the push goes at 8 bits when
        the run's scheme is coarser: it carries the error feedback residual that earlier 1-bit
        or 4-bit pushes left in params - base, which would otherwise never reach the model."""
        scheme = self._last_steps_scheme()
        log.info("waiting for data: sending %d pending step(s) at %s",
                 self.rounds.unsent_steps(), scheme or self.run_cfg.compression.scheme)
        self.start_push(scheme)

    def _last_steps_scheme(self) -> str | None:
        """compression.last_scheme when the run's scheme is coarser than it, else None (the run's)."""
        c = self.run_cfg.compression
        coarse = ("sign", "tsign", "ternary") + (("int4",) if c.last_scheme == "int8" else ())
        return c.last_scheme if c.scheme in coarse else None

    def _finish_up(self, reason: str, patience: float) -> None:
        rounds = self.rounds
        give_up = time.monotonic() + patience
        while rounds.inflight is not None and time.monotonic() < give_up:
            try:
                msg = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg[0] != "rejoined":
                rounds.handle(msg)
        if rounds.inflight is not None:
            log.warning("the last push was not merged within %.0fs: %d local steps are not sent",
                        patience, sum(p.steps for p in rounds.pending))
        elif rounds.pending:
            # The data is used up: this is the worker's last delta. It goes at 8 bits (or the
            # run's scheme if that is finer), so the error feedback residual that 1-bit and 4-bit
            # pushes leave in params - base reaches the global model instead of being dropped.
            scheme = self._last_steps_scheme() if reason == "data exhausted" else None
            push, header, blob = rounds.make_push(self.run_cfg.compression, scheme, self.client.session_epoch)
            try:
                reply = self.client.push_delta(header, blob, patience=max(1.0, give_up - time.monotonic()))
                log.info("final push (%s): %s", scheme or self.run_cfg.compression.scheme,
                         pb.PushReply.Result.Name(reply.result))
            except (grpc.RpcError, FatalError) as exc:
                log.warning("final push failed: %s", exc)
        self.abort.set()
        self._run_ended.set()
        try:  # final cumulative stats (bytes, waiting) so the run's summary counts this worker fully
            final_stats, _ = self.heartbeats.current_stats(Stats(), time.monotonic())
            self.client.heartbeat(final_stats, patience=3.0)
        except (grpc.RpcError, FatalError) as exc:
            log.warning("final heartbeat failed: %s", exc)
        try:
            self.client.leave(reason, patience=max(1.0, min(5.0, give_up - time.monotonic())))
            log.info("left the run (%s)", reason)
        except grpc.RpcError as exc:
            log.warning("leave failed: %s", exc.code().name)
