"""The worker's training loop: local rounds of AdamW, deltas pushed in the background, rebasing.

Threads:
- training (the caller of `run()`): inner steps; at each step boundary it applies what the comm
  thread received. It blocks on the network only for the first model, a lease or shard that the
  background prefetch has not delivered yet, and the way out; that time is `wait_seconds`.
- comm: sends a push, then long-polls GetModel until the coordinator's updates contain it.
- heartbeat: WorkerStats every `heartbeat_seconds`; HeartbeatReply STOP -> finish.
- prefetch pool: the next lease and its shard, so a finished range never idles the GPU.

The local weights always satisfy ``params = base + L`` where ``base`` is the global model at
``base_version`` (verified with params_sha256) and ``L`` is everything this worker trained that the
global model does not contain yet. Rebase rules (`apply_update`, `rebase_full`):

- update U (global(v) = global(v-1) + U):  base += U; params += U.
- if U merged our in-flight push P:          params -= decoded(P)   (exactly what was merged)
- FULL reply G:  params += G - base; base = G; and params -= decoded(P) when G contains P.
- STALE / lost / refused push: subtract nothing; its ranges stay pending and its progress stays in
  ``params - base``, so the next delta carries it again.

Error feedback is *implicit*: the compression error ``d - decoded(P)`` stays in ``params - base``
and therefore goes out with the next delta. A separate ErrorFeedback buffer on top of this would
send the residual twice (once from params, once from the buffer), so encode_tensors is called with
feedback=None; `residual_norm` reports ||d - decoded|| of the last push.

When does a FULL reply contain our push P? The header lists our pushes merged after the version
we asked from (ModelHeader.merged_push_ids): P is in it, or not yet merged. A FULL whose version
is below P's base_version means the coordinator lost history (restored an older checkpoint): P is
treated as lost (kept in params); an accepted P still unmerged after max_staleness + 2 versions
is treated the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import grpc
import numpy as np
import torch

from geotrain.common.config import (
    REPLAYED_DOWNLINKS, ModelConfig, RunConfig, WorkerConfig, WorkersConfig, run_config_from_dict,
)
from geotrain.common.counts import decode_counts
from geotrain.common.data import gather_sequences, sequence_order
from geotrain.common.tensors import (
    add_,
    all_finite,
    clone_tensors,
    global_norm,
    model_tensors,
    params_sha256,
    sub,
    tensor_spec,
)
from geotrain.common.merge import (  # the merge arithmetic a replaying worker repeats
    OuterOptimizer,
    counted_mean,
    negative_signs,
    sign_sum_from_agree,
    sign_sum_from_plus,
    weighted_sum,
)
from geotrain.protos import geotrain_pb2 as pb
from geotrain.worker.client import CoordinatorClient, FatalError, ModelReply, SessionRenewed

log = logging.getLogger(__name__)

HELD_PUSHES = 8  # our last pushes' payloads kept for relayed updates (one is in flight at a time)


# --------------------------------------------------------------------------- rebase arithmetic


def apply_update(
    params: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    own_decoded: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """One merged update U, in place: base += U; params += U; params -= own_decoded (when U
    contains our push). Keeps params - base = local progress not yet in the global model."""
    add_(base, update)
    if own_decoded is None:
        add_(params, update)
    else:  # one addition of (U - own): exact when the update is our own delta alone
        add_(params, {n: u.to(torch.float32) - own_decoded[n].to(u.device, torch.float32) for n, u in update.items()})


def rebase_full(
    params: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    full: Mapping[str, torch.Tensor],
    own_decoded: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """A full global model G, in place: params += G - base; base = G; params -= own_decoded."""
    if set(full) != set(base):
        raise ValueError("full model names differ from the local model")
    for name, b in base.items():
        g = full[name].to(b.device, torch.float32)
        params[name].add_((g - b).to(params[name].device, params[name].dtype))
        b.copy_(g)
    if own_decoded is not None:
        add_(params, own_decoded, alpha=-1.0)


def replay_relayed(
    info: pb.UpdateInfo,
    stream: bytes,
    held: Mapping[str, bytes],
    decode: Callable[[bytes], dict[str, torch.Tensor]],
    outer: OuterOptimizer,
) -> dict[str, torch.Tensor]:
    """The update U of a relayed version (downlinks "relay", "combine"): decode every merged delta
    (from the stream, or our own copy in `held` when the coordinator omitted it), then replay the
    coordinator's merge: U = outer.update(weighted_sum(deltas, factors, weights), fraction).
    Bit-identical to the coordinator's U when `outer` holds its momentum at version - 1. Advances
    outer's momentum; on ValueError (a missing or bad delta) nothing has changed."""
    if not info.relayed:
        raise ValueError(f"update {info.version} relays no deltas")
    deltas = []
    for d in info.relayed:
        if d.size == 0:
            payload = held.get(d.push_id)
            if payload is None:
                raise ValueError(f"update {info.version} omits push {d.push_id}, which this worker does not hold")
        elif d.offset + d.size > len(stream):
            raise ValueError(f"update {info.version}: delta {d.push_id} lies outside the stream "
                             f"({d.offset}+{d.size} > {len(stream)} bytes)")
        else:
            payload = stream[d.offset : d.offset + d.size]
        deltas.append(decode(payload))
    mean = weighted_sum(deltas, [d.factor for d in info.relayed], [d.weight for d in info.relayed])
    return outer.update(mean, fraction=info.outer_fraction)


def replay_counted(
    info: pb.UpdateInfo,
    stream: bytes,
    held: Mapping[str, bytes],
    decode: Callable[[bytes], dict[str, torch.Tensor]],
    outer: OuterOptimizer,
    shapes: Mapping[str, Sequence[int]],
) -> dict[str, torch.Tensor]:
    """The update U of a count merge (downlink "count", geotrain.proto CountedMerge): rebuild k,
    the sum of the N deltas' signs per value, from the count payload (and our own delta's signs
    when the counts refer to it), then U = outer.update(counted_mean(k, scales, weight), fraction).
    Bit-identical to the coordinator's U when `outer` holds its momentum at version - 1. On
    ValueError (a bad payload, a missing delta) nothing has changed."""
    c = info.counted
    names = list(shapes)
    if c.deltas < 2 or len(c.push_ids) != c.deltas or len(c.scales) != len(names):
        raise ValueError(f"update {info.version}: malformed count merge ({c.deltas} deltas, "
                         f"{len(c.push_ids)} push ids, {len(c.scales)} scales for {len(names)} tensors)")
    if c.offset + c.size > len(stream):
        raise ValueError(f"update {info.version}: count payload outside the stream ({c.offset}+{c.size} > {len(stream)})")
    payload = stream[c.offset : c.offset + c.size]
    total = sum(math.prod(shape) for shape in shapes.values())
    if c.reference_push_id:
        if c.reference_push_id not in c.push_ids:
            raise ValueError(f"update {info.version}: reference {c.reference_push_id} is not one of the merged deltas")
        own = held.get(c.reference_push_id)
        if own is None:
            raise ValueError(f"update {info.version} counts against push {c.reference_push_id}, which this worker does not hold")
        agree = torch.from_numpy(decode_counts(payload, total, c.deltas - 1))
        k = sign_sum_from_agree(negative_signs(decode(own), names), agree, c.deltas, shapes)
    else:
        plus = torch.from_numpy(decode_counts(payload, total, c.deltas))
        k = sign_sum_from_plus(plus, c.deltas, shapes)
    mean = counted_mean(k, dict(zip(names, c.scales)), c.weight)
    return outer.update(mean, fraction=info.outer_fraction)


def counted_contribution(
    own_decoded: Mapping[str, torch.Tensor], scales: Sequence[float], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Our delta as a count merge took it: per tensor, the merge's scale x the signs of what we
    pushed (signbit, as the coordinator counts them)."""
    if len(scales) != len(names):
        raise ValueError(f"count merge carries {len(scales)} scales for {len(names)} tensors")
    out = {}
    for name, scale in zip(names, scales):
        t = own_decoded[name]
        s = torch.tensor(scale, dtype=torch.float32)
        out[name] = torch.where(torch.signbit(t), -s, s)
    return out


def initial_weights_from_seed(run: RunConfig, model: ModelConfig, initial_sha: str) -> dict[str, torch.Tensor] | None:
    """The run's version 1, built exactly as the coordinator builds it (fp32 on CPU after
    torch.manual_seed(run.train.seed)), or None when `initial_sha` is empty or the checksum
    differs (another torch version may initialise differently). The global RNG state is kept."""
    from geotrain.common.model import GPT

    if not initial_sha:
        return None
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(run.train.seed)
        weights = clone_tensors(model_tensors(GPT(model)), "cpu")
    finally:
        torch.set_rng_state(rng)
    if params_sha256(weights) != initial_sha:
        log.info("the seed does not reproduce the initial model here: downloading it")
        return None
    return weights


def full_contains_push(version: int, base_version: int, push_id: str, merged_push_ids) -> bool | None:
    """Whether a FULL model at `version` contains our push: True, False (not yet), or None (lost:
    the model is older than the push's base, so the coordinator restarted without it)."""
    if version < base_version:
        return None
    return push_id in merged_push_ids


# --------------------------------------------------------------------------- config and state


@dataclass
class _Push:
    push_id: str
    base_version: int
    decoded: dict[str, torch.Tensor]
    n_ranges: int
    steps: int
    tokens: int
    loss_sum: float
    accepted_version: int = -1
    resolved: bool = False  # merge seen, STALE, lost or refused
    pushed_at_step: int = 0  # the worker's local_step when the push was made
    session: int = 0  # client.session_epoch it was trained in; never sent under a later one


@dataclass
class _Lease:
    unit_id: int
    shard: str
    start: int
    end: int
    epoch: int
    pos: int = 0
    session: int = 0  # client.session_epoch it was leased in; a rejoin invalidates it


@dataclass
class _Stats:
    steps: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    step_seconds: float = 0.0
    wait_seconds: float = 0.0
    pushes: int = 0
    merged: int = 0
    stale: int = 0
    resyncs: int = 0
    residual_norm: float = 0.0
    merge_lag_steps: int = 0  # summed over merged pushes: local steps between a push and its merge


class _NewRun(Exception):
    """The coordinator started another run: set everything up again."""


class WorkerRunner:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.name = config.name or f"{os.uname().nodename}-{os.getpid()}"
        self._stop = threading.Event()  # finish requested (signal)
        self._finish = threading.Event()  # finish requested (coordinator STOP)
        self._abort = threading.Event()  # give up all retries now
        self._inbox: queue.Queue = queue.Queue()
        self._jobs: queue.Queue = queue.Queue()
        self._need_full = threading.Event()
        self._stats = _Stats()
        self._stats_lock = threading.Lock()
        self.state = "starting"
        self.server = None
        self.metrics = None
        self.client: CoordinatorClient | None = None
        self.base_version = 0
        self._inflight: _Push | None = None
        # [unit_id, shard, start, end, epoch, steps, loss_sum, session]: session = the client's
        # session epoch the range was leased in (a push is never sent under a later one)
        self._pending: list[list] = []
        self._sealed = 0
        self._next_lease: Future | None = None  # the prefetched lease after the current one
        if config.threads:
            torch.set_num_threads(config.threads)

    # ------------------------------------------------------------------ public

    def stop(self) -> None:
        """Finish the current step, push what is pending if the coordinator answers soon, leave."""
        self._stop.set()
        if self.state == "starting":
            self._abort.set()  # still joining / downloading the first model: give up retrying

    def run(self) -> int:
        from geotrain.common.model import resolve_device

        self.device = resolve_device(self.config.device)
        self.client = CoordinatorClient(
            self.config.coordinator, self.config.token, self.config.tls_ca, self._abort,
            on_rejoin=lambda reply: self._inbox.put(("rejoined", reply)),
        )
        if self.config.serve and self.server is None:
            from geotrain.worker.service import WorkerServer

            from geotrain.protos.rpc import TokenAuthInterceptor

            # Peer traffic of sync groups needs the same run token as the coordinator's RPCs.
            auth = [TokenAuthInterceptor(self.config.token)] if self.config.token else []
            self.server = WorkerServer(self.config.port, self._describe, interceptors=auth)
            if self.config.sync_group:  # the Peer service must be registered before start()
                from geotrain.worker.allreduce import router_for

                router_for(self.server.server)
            self.server.start()
        if self.metrics is None:
            from geotrain.worker.metrics import WorkerMetrics

            self.metrics = WorkerMetrics()
            if self.config.metrics_port:
                self.metrics.serve(self.config.metrics_port)
        try:
            while True:
                try:
                    return self._run_once()
                except grpc.RpcError:
                    if self._stop.is_set():
                        log.warning("stopped before the first step")
                        return 0
                    raise
                except _NewRun:
                    log.warning("the coordinator started a new run: setting up again")
                    self._reset_for_new_run()
        finally:
            self._abort.set()
            self.state = "stopped"
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
        return pb.JoinRequest(
            name=self.name, device=device, memory_bytes=memory, software_version=__version__,
            config_fingerprint=f"{device}|{torch.cuda.device_count() if self.device.type == 'cuda' else 1}|{__version__}",
            advertise_host=self.config.advertise_host, advertise_port=advertise_port,
            sync_group=self.config.sync_group,
        )

    def _setup(self) -> None:
        from geotrain.common.data import Manifest
        from geotrain.common.model import GPT, configure_optimizer

        reply = self.client.join(self._join_request())
        self.join_reply = reply
        self.run_id = reply.run_id
        spec = json.loads(reply.run_spec_json)
        self.run_cfg: RunConfig = run_config_from_dict(spec["run"])
        self.model_cfg = ModelConfig(**spec["model"])
        self.manifest = Manifest.from_json(json.dumps(spec["manifest"]))
        self.shard_info = {s.name: s for s in self.manifest.shards}
        self.step_offset = int(spec.get("step_offset", 0))
        self.heartbeat_seconds = reply.heartbeat_seconds or WorkersConfig.heartbeat_seconds
        self.batch_size = self.config.batch_size or self.run_cfg.train.batch_size
        torch.manual_seed(self.run_cfg.train.seed + (zlib.crc32(reply.worker_id.encode()) % 10_000))
        self.model = GPT(self.model_cfg).to(self.device)
        o = self.run_cfg.optim
        self.optimizer = configure_optimizer(self.model, o.weight_decay, o.lr, (o.beta1, o.beta2), self.device)
        self.params = model_tensors(self.model)
        self.spec = tensor_spec(self.params)
        self.model_bytes = sum(t.numel() * 4 for t in self.params.values())
        self.max_blob_bytes = 2 * self.model_bytes * (self.run_cfg.merge.max_staleness + 2) + (16 << 20)
        # Replayed downlinks ("relay", "combine", "count"): a replica of the coordinator's outer
        # optimizer, owned by the comm thread (and by _first_model before it starts). "relay" and
        # "count": our recent push payloads (relayed updates omit them; counts refer to them).
        self._outer: OuterOptimizer | None = None
        self._holds_pushes = self.run_cfg.compression.downlink in ("relay", "count")
        if self.run_cfg.compression.downlink in REPLAYED_DOWNLINKS:
            self._outer = OuterOptimizer(self.run_cfg.outer, self.spec)
        self._push_blobs: OrderedDict[str, bytes] = OrderedDict()
        self._push_blobs_lock = threading.Lock()
        cache = Path(self.config.cache_dir).expanduser() if self.config.cache_dir else None
        if cache is None:
            from geotrain.common.data import cache_root

            cache = cache_root() / "shards"
        self.shard_dir = cache / self.run_id
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._shards: dict[str, np.ndarray] = {}
        self._order_cache: dict = {}
        self._shard_lock = threading.Lock()
        self._rows: dict[str, list] = {}  # shard -> [(epoch, first slot, rows (n, T+1))]: leases fetched before the shard
        self._downloading: set[str] = set()  # shards downloading in the background
        self._rows_lock = threading.Lock()  # guards the two above (_shard_lock is held for whole downloads)
        log.info("joined run %s as %s: model %s, batch %d, device %s", self.run_id, reply.worker_id,
                 self.model_cfg, self.batch_size, self.device)
        # The first model: the training loop waits for it.
        t0 = time.monotonic()
        version, full = self._first_model(spec.get("initial_sha256", ""))
        self._add_wait(time.monotonic() - t0)
        self.base = clone_tensors(full, "cpu")
        with torch.no_grad():
            for name, t in self.params.items():
                t.copy_(full[name].to(t.device, t.dtype))
        self.base_version = version
        self.comm_version = self.base_version
        self.local_step = 0
        self.round_steps = 0
        self.round_start = time.monotonic()

    def _first_model(self, initial_sha: str) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, fp32 CPU weights) to start from. The run's version 1 is rebuilt from the seed
        when it reproduces the coordinator's checksum (then only the updates since version 1 are
        fetched, if the coordinator holds them and they are smaller than the weights); otherwise,
        or on any checksum mismatch, the full model is downloaded."""
        initial = initial_weights_from_seed(self.run_cfg, self.model_cfg, initial_sha)
        if initial is not None:
            rep = self.client.get_model(1, self.model_bytes, self.max_blob_bytes)
            h = rep.header
            if h.kind == pb.ModelHeader.UNCHANGED:
                log.info("initial model rebuilt from the seed (checksum verified): nothing to download")
                return h.version, initial
            if h.kind == pb.ModelHeader.UPDATES:
                if self._outer is not None:  # version 1 has no momentum yet
                    self._outer.load_momentum({n: torch.zeros_like(t) for n, t in initial.items()})
                for u in h.updates:
                    update = self._update_tensors(u, rep.blob)
                    for name, t in initial.items():
                        t.add_(update[name])
                if params_sha256(initial) == h.params_sha256:
                    log.info("initial model rebuilt from the seed plus %d update(s) to version %d",
                             len(h.updates), h.version)
                    return h.version, initial
                log.error("seed model plus updates does not match version %d's checksum: downloading it", h.version)
            elif params_sha256(full := self._full_tensors(rep)) == h.params_sha256:
                return h.version, full
        rep = self.client.get_model(0, self.model_bytes, self.max_blob_bytes, force_full=True)
        full = self._full_tensors(rep)
        if params_sha256(full) != rep.header.params_sha256:
            log.error("model checksum mismatch on the first download; fetching it again")
            rep = self.client.get_model(0, self.model_bytes, self.max_blob_bytes, force_full=True)
            full = self._full_tensors(rep)
        return rep.header.version, full

    def _reset_for_new_run(self) -> None:
        self._inflight = None
        self._pending, self._sealed = [], 0
        self._need_full.clear()
        while not self._inbox.empty():
            self._inbox.get_nowait()

    def _decode(self, blob: bytes) -> dict[str, torch.Tensor]:
        from geotrain.common.compression import decode_tensors

        return decode_tensors(blob, self.spec, max_blob_bytes=self.max_blob_bytes)

    def _full_tensors(self, rep: ModelReply) -> dict[str, torch.Tensor]:
        """A FULL reply's weights. Under a replayed downlink its tail is the outer momentum, loaded
        into the replica (ValueError when it is missing)."""
        n = rep.header.momentum_bytes
        if self._outer is None or not self._outer.momentum:  # no relay, or an outer step without state
            return self._decode(rep.blob[: len(rep.blob) - n])
        if not 0 < n < len(rep.blob):
            raise ValueError(f"a full model under a replayed downlink must carry the outer momentum "
                             f"(momentum_bytes {n} of {len(rep.blob)})")
        full = self._decode(rep.blob[:-n])
        self._outer.load_momentum(self._decode(rep.blob[-n:]))
        return full

    def _update_tensors(self, u: pb.UpdateInfo, blob: bytes) -> dict[str, torch.Tensor]:
        """The update of one version of an UPDATES reply (plain, or relayed: replayed)."""
        if u.HasField("counted"):
            if self._outer is None or not self._holds_pushes:
                raise ValueError(f"update {u.version} is a count merge but this run's downlink is "
                                 f"{self.run_cfg.compression.downlink!r}")
            with self._push_blobs_lock:
                held = dict(self._push_blobs)
            return replay_counted(u, blob, held, self._decode, self._outer, self.spec)
        if not u.relayed:
            return self._decode(blob[u.offset : u.offset + u.size])
        if self._outer is None:
            raise ValueError(f"update {u.version} is relayed but this run's downlink "
                             f"{self.run_cfg.compression.downlink!r} is not replayed")
        with self._push_blobs_lock:
            held = dict(self._push_blobs)
        return replay_relayed(u, blob, held, self._decode, self._outer)

    def _held_push_ids(self) -> tuple[str, ...]:
        if not self._holds_pushes:
            return ()
        with self._push_blobs_lock:
            return tuple(self._push_blobs)

    def _lag_exhausted(self) -> bool:
        """round.max_lag_steps > 0 and the push in flight is that many steps old."""
        limit = self.run_cfg.round.max_lag_steps
        push = self._inflight
        return limit > 0 and push is not None and self.local_step - push.pushed_at_step >= limit

    def _wait_for_merge(self) -> None:
        """Hold training until the push in flight is resolved (merged, stale, lost) or the worker
        stops, handling what the comm thread delivers as it arrives; the time counts as waiting on
        the network. The comm thread's deadlines and retries bound how long a push stays in flight."""
        t0 = time.monotonic()
        while self._lag_exhausted() and not (self._stop.is_set() or self._finish.is_set()):
            try:
                msg = self._inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            self._handle(msg)
        self._add_wait(time.monotonic() - t0)

    def _add_wait(self, seconds: float) -> None:
        with self._stats_lock:
            self._stats.wait_seconds += seconds

    # ------------------------------------------------------------------ main loop

    def _run_once(self) -> int:
        self._setup()
        self.state = "training"
        self._bg = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefetch")
        comm = threading.Thread(target=self._comm_loop, name="comm", daemon=True)
        comm.start()
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        hb.start()
        self.train_start = time.monotonic()
        lease: _Lease | None = None
        self._next_lease = self._bg.submit(self._lease_and_fetch)  # the lease after the current one
        reason = "stopped"
        bar = self._progress_bar()
        last_summary = time.monotonic()
        try:
            while True:
                if self._stop.is_set():
                    reason = "signal"
                    break
                if self._finish.is_set():
                    reason = "run finished (coordinator STOP)"
                    break
                if self._group_turn(lease):
                    continue  # a sync-group step of a rank > 0 member (worker/group_runner.py)
                self._drain_inbox()
                if lease is not None and lease.session != self.client.session_epoch:
                    lease = None  # leased in a session the coordinator forgot
                if lease is None or self._range_done(lease):
                    t0 = time.monotonic()
                    while not self._next_lease.done() and not (self._stop.is_set() or self._finish.is_set()):
                        if self._group_turn(None):
                            continue
                        self._drain_inbox()
                        if self._inflight is None and len(self._pending) > self._sealed:
                            self._push_while_idle()
                        time.sleep(0.05)
                    self._add_wait(time.monotonic() - t0)
                    if not self._next_lease.done():
                        continue  # stopping
                    try:
                        got = self._next_lease.result()
                    except (ValueError, OSError, grpc.RpcError) as exc:
                        log.error("could not lease or fetch data: %s; retrying", exc)
                        time.sleep(2.0)
                        self._next_lease = self._bg.submit(self._lease_and_fetch)
                        continue
                    self._next_lease = self._bg.submit(self._lease_and_fetch)
                    if got is None:
                        reason = "data exhausted"
                        self._next_lease.cancel()
                        break
                    if got.session == self.client.session_epoch:
                        lease = got
                    continue
                if self._lag_exhausted():
                    self._wait_for_merge()
                    continue
                self._train_step(lease)
                bar.update(1)
                if time.monotonic() - last_summary >= self.config.summary_seconds:
                    last_summary = time.monotonic()
                    self._summary(bar)
                if self._round_over() and self._inflight is None:
                    self._start_push()
        finally:
            self._summary(bar)  # the last figures, also when the loop ended between summaries
            bar.close()
        self.state = "finishing"
        patience = self.config.shutdown_patience if reason == "signal" else self.config.finish_patience
        self._finish_up(reason, patience)
        self._bg.shutdown(wait=False, cancel_futures=True)
        return 0

    # ------------------------------------------------------------------ sync-group hooks (worker/group_runner.py)

    def _group_turn(self, lease: _Lease | None) -> bool:
        """At a step boundary: True when the hook used this boundary for a sync-group step that
        needs no lease (ranks > 0). Async workers: never."""
        return False

    def _send_heartbeat(self, stats: pb.WorkerStats) -> pb.HeartbeatReply:
        return self.client.heartbeat(stats)

    def _on_heartbeat_reply(self, reply: pb.HeartbeatReply) -> None:
        """Heartbeat thread: what the reply says besides STOP (the sync-group assignment)."""

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(desc=f"worker {self.name}", unit="step", disable=None, dynamic_ncols=True)

    def _summary(self, bar) -> None:
        with self._stats_lock:
            s = _Stats(**vars(self._stats))
        wall = max(1e-9, time.monotonic() - self.train_start)
        loss = s.loss_sum / max(1, s.steps)
        msg = (f"step {s.steps} v{self.base_version} loss {loss:.4f} {s.tokens / wall:.0f} tok/s "
               f"up {self.client.sent_bytes / 1e6:.1f} MB down {self.client.received_bytes / 1e6:.1f} MB "
               f"wait {100 * s.wait_seconds / wall:.1f}% pushes {s.pushes} merged {s.merged} stale {s.stale} "
               f"merge lag {s.merge_lag_steps / max(1, s.merged):.1f} steps")
        if bar.disable:
            log.info(msg)
        else:
            bar.set_postfix_str(msg, refresh=True)

    # ------------------------------------------------------------------ data

    def _lease_and_fetch(self) -> _Lease | None:
        """Background: the next lease with its shard on disk; None when the run's data is spent."""
        while True:
            reply = self.client.lease_work()
            if reply.exhausted:
                return None
            if reply.HasField("range"):
                break
            # Nothing free now: the rest is leased to others, who may still give it back (a
            # dropped worker's range). Ask again soon; heartbeat STOP ends the wait.
            if self._stop.wait(1.0) or self._finish.is_set() or self._abort.is_set():
                return None
        r = reply.range
        if r.shard not in self.shard_info:
            raise ValueError(f"leased shard {r.shard!r} is not in the run's manifest")
        lease = _Lease(r.unit_id, r.shard, r.start, r.end, r.epoch, pos=r.start, session=self.client.session_epoch)
        if r.shard in self._shards or (self.shard_dir / r.shard).is_file():
            self._ensure_shard(r.shard)
        elif not self._fetch_lease_rows(lease):
            self._ensure_shard(r.shard)  # blocking: the whole shard first
        return lease

    def _fetch_lease_rows(self, lease: _Lease) -> bool:
        """A lease of a shard not on disk yet: fetch just its sequences (a few hundred KB) and
        start the whole shard downloading in the background, so training starts at once. False
        when the coordinator does not serve them (the caller downloads the shard first)."""
        T = self.model_cfg.block_size
        first, count = lease.pos // T, (self._usable_end(lease) - lease.pos) // T
        if count <= 0:
            return True
        dtype = np.dtype(f"<u{self._token_itemsize()}")
        try:
            data = self.client.get_sequences(lease.shard, lease.epoch, first, count, (T + 1) * dtype.itemsize)
        except (ValueError, grpc.RpcError) as exc:
            log.warning("shard %s: could not fetch the lease's sequences (%s): downloading the whole shard first",
                        lease.shard, exc)
            return False
        rows = np.frombuffer(data, dtype=dtype).reshape(count, T + 1)
        with self._rows_lock:
            self._rows.setdefault(lease.shard, []).append((lease.epoch, first, rows))
            start = lease.shard not in self._downloading
            self._downloading.add(lease.shard)
        if start:
            log.info("shard %s: training its first lease from %d sequences (%.0f KB) while the shard downloads",
                     lease.shard, count, len(data) / 1024)
            threading.Thread(target=self._download_in_background, args=(lease.shard,), name="shard", daemon=True).start()
        return True

    def _download_in_background(self, name: str) -> None:
        try:
            self._ensure_shard(name)
        except Exception as exc:  # noqa: BLE001 - the training thread downloads it itself if it must
            log.warning("shard %s: background download failed (%s); it is fetched again when needed", name, exc)
        finally:
            with self._rows_lock:
                self._downloading.discard(name)

    def _ensure_shard(self, name: str) -> np.ndarray:
        from geotrain.common.data import read_shard

        with self._shard_lock:
            if name in self._shards:
                return self._shards[name]
            info = self.shard_info.get(name)
            if info is None:
                raise ValueError(f"leased shard {name!r} is not in the run's manifest")
            path = self.shard_dir / name
            if path.is_file():
                try:
                    arr = read_shard(path, info)
                    self._shards[name] = arr
                    log.info("shard %s: cached copy verified", name)
                    return arr
                except ValueError as exc:
                    log.warning("cached shard %s is bad (%s): downloading again", name, exc)
            self._download_shard(name, info, path)
            arr = read_shard(path, info)
            self._shards[name] = arr
            with self._rows_lock:
                self._rows.pop(name, None)  # the whole shard replaces the lease rows fetched before it
            return arr

    def _token_itemsize(self) -> int:
        from geotrain.common.data import dtype_for_vocab

        return 4 if self.manifest.dtype == "uint32" or dtype_for_vocab(self.manifest.vocab_size) == "uint32" else 2

    def _download_shard(self, name: str, info, path: Path) -> None:
        from geotrain.common.data import HEADER_BYTES

        expected = HEADER_BYTES + info.tokens * self._token_itemsize()
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        fh = [None]

        def write(data: bytes | None) -> None:
            if data is None:
                if fh[0] is not None:
                    fh[0].close()
                fh[0] = open(tmp, "wb")
                return
            fh[0].write(data)

        t0 = time.monotonic()
        try:
            for attempt in range(3):
                self.client.get_shard(name, expected, write)
                fh[0].flush()
                os.fsync(fh[0].fileno())
                fh[0].close()
                fh[0] = None
                from geotrain.common.data import shard_sha256

                if not info.sha256 or shard_sha256(tmp) == info.sha256:
                    os.replace(tmp, path)
                    log.info("shard %s: downloaded %d bytes in %.1fs", name, expected, time.monotonic() - t0)
                    return
                log.error("shard %s: sha256 differs from the manifest (attempt %d)", name, attempt + 1)
            raise ValueError(f"shard {name}: downloaded bytes never matched the manifest's sha256")
        finally:
            if fh[0] is not None:
                fh[0].close()
            if tmp.exists():
                tmp.unlink()

    def _usable_end(self, lease: _Lease) -> int:
        tokens = self.shard_info[lease.shard].tokens  # what the shard's file holds (read_shard checks it)
        return min(lease.end, tokens - 1)  # the target of the last input token must exist

    def _range_done(self, lease: _Lease) -> bool:
        return self._usable_end(lease) - lease.pos < self.model_cfg.block_size

    # ------------------------------------------------------------------ training

    def _sequence_order(self, shard: str, epoch: int) -> np.ndarray:
        """The shard's visiting order in `epoch` (common/data.py::sequence_order), cached."""
        key = (shard, epoch)
        if self._order_cache.get("key") != key:
            self._order_cache = {
                "key": key,
                "order": sequence_order(shard, len(self._shards[shard]), self.model_cfg.block_size,
                                        self.run_cfg.train.seed, epoch),
            }
        return self._order_cache["order"]

    def _slots_batch(self, shard: str, epoch: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences lo .. hi-1 of the shard's visiting order in `epoch` as CPU tensors (hi-lo, T):
        from the whole shard when it is loaded, else from lease rows fetched before it (else the
        shard is downloaded now). Position p of a lease (tokens) is slot p // T."""
        if shard not in self._shards:
            with self._rows_lock:
                held = list(self._rows.get(shard, ()))
            for row_epoch, first, rows in held:
                if row_epoch == epoch and first <= lo and hi <= first + len(rows):
                    part = np.asarray(rows[lo - first : hi - first], dtype=np.int64)
                    return torch.from_numpy(np.ascontiguousarray(part[:, :-1])), torch.from_numpy(np.ascontiguousarray(part[:, 1:]))
            self._ensure_shard(shard)
        slots = self._sequence_order(shard, epoch)[lo:hi]
        xs, ys = gather_sequences(self._shards[shard], slots, self.model_cfg.block_size)
        return torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(np.ascontiguousarray(ys))

    def _lease_batch(self, lease: _Lease) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The next batch of the lease (CPU tensors) and its number of sequences n (n x T tokens)."""
        T = self.model_cfg.block_size
        n = min(self.batch_size, (self._usable_end(lease) - lease.pos) // T)
        x, y = self._slots_batch(lease.shard, lease.epoch, lease.pos // T, lease.pos // T + n)
        return x, y, n

    def _train_step(self, lease: _Lease) -> None:
        from geotrain.common.model import autocast_context
        from geotrain.common.train import lr_at
        from geotrain.worker.throttle import stretch_step

        T = self.model_cfg.block_size
        x, y, n = self._lease_batch(lease)
        if self.device.type == "cuda":
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        t0 = time.monotonic()
        lr = lr_at(self.step_offset + self.local_step, self.run_cfg.optim, self.run_cfg.train.max_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with autocast_context(self.device):
            _, loss = self.model(x, y)
        loss.backward()
        if self.run_cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.run_cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.item())
        stretch_step(t0, self.config.speed)  # worker/throttle.py: --speed below 1 sleeps here
        dt = time.monotonic() - t0
        start = lease.pos
        lease.pos += n * T
        self.local_step += 1
        self.round_steps += 1
        self._record_range(lease, start, lease.pos, loss_value)
        with self._stats_lock:
            self._stats.steps += 1
            self._stats.tokens += n * T
            self._stats.loss_sum += loss_value
            self._stats.step_seconds += dt
        if self.metrics is not None:
            self.metrics.step_seconds.observe(dt)

    def _record_range(self, lease: _Lease, start: int, end: int, loss: float) -> None:
        last = self._pending[-1] if len(self._pending) > self._sealed else None
        if (last is not None and last[0] == lease.unit_id and last[4] == lease.epoch and last[3] == start
                and last[7] == lease.session):
            last[3] = end
            last[5] += 1
            last[6] += loss
        else:
            self._pending.append([lease.unit_id, lease.shard, start, end, lease.epoch, 1, loss, lease.session])

    def _push_session(self) -> int:
        """The session a push of the pending ranges belongs to: the oldest one they were leased in.
        A rejoin may land between the last step and its handling (`_drop_unmerged`); a push sealed
        then carries old-session ranges and must not go out under the new session."""
        return min((p[7] for p in self._pending), default=self.client.session_epoch)

    def _round_over(self) -> bool:
        r = self.run_cfg.round
        if r.steps > 0:
            return self.round_steps >= r.steps
        return time.monotonic() - self.round_start >= r.seconds

    # ------------------------------------------------------------------ pushes

    def _make_push(self, scheme: str | None = None) -> tuple[_Push, pb.DeltaHeader, bytes]:
        """The delta since the basepoint, encoded with `scheme` (default: the run's). The
        compression error stays in params - base, so the next push carries it (implicit error
        feedback)."""
        from geotrain.common.compression import encode_tensors

        c = self.run_cfg.compression
        delta = sub(self.params, self.base)
        scheme = scheme or c.scheme
        blob, decoded = encode_tensors(delta, scheme, c.chunk, feedback=None, zstd_level=c.zstd_level)
        decoded = {n: t.detach().float().cpu() for n, t in decoded.items()}
        residual = global_norm(sub(delta, decoded))
        ranges = [pb.TokenRange(unit_id=p[0], shard=p[1], start=p[2], end=p[3], epoch=p[4]) for p in self._pending]
        steps = sum(p[5] for p in self._pending)
        loss_sum = sum(p[6] for p in self._pending)
        tokens = sum(p[3] - p[2] for p in self._pending)
        push = _Push(uuid.uuid4().hex, self.base_version, decoded, len(self._pending), steps, tokens, loss_sum,
                     pushed_at_step=self.local_step, session=self._push_session())
        header = pb.DeltaHeader(push_id=push.push_id, base_version=push.base_version, tokens=tokens, steps=steps,
                                mean_loss=loss_sum / max(1, steps), ranges=ranges)
        if self._holds_pushes:
            with self._push_blobs_lock:  # a relayed merge of it omits these bytes: we decode our own
                self._push_blobs[push.push_id] = blob
                while len(self._push_blobs) > HELD_PUSHES:
                    self._push_blobs.popitem(last=False)
        with self._stats_lock:
            self._stats.residual_norm = residual
            self._stats.pushes += 1
        return push, header, blob

    def _start_push(self, scheme: str | None = None) -> None:
        if not self._pending:
            return
        push, header, blob = self._make_push(scheme)
        self._sealed = len(self._pending)
        self._inflight = push
        self.round_steps = 0
        self.round_start = time.monotonic()
        self._jobs.put(("push", push, header, blob))

    def _comm_loop(self) -> None:
        while not self._abort.is_set():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                if self._need_full.is_set():
                    job = ("resync",)
                else:
                    continue
            try:
                if job[0] == "push":
                    self._comm_push(*job[1:])
                elif job[0] == "resync":
                    self._comm_fetch(None, wait=0.0)
            except FatalError as exc:
                self._inbox.put(("fatal", exc))
                return
            except Exception as exc:  # noqa: BLE001 - keep the comm thread alive
                if self._abort.is_set():
                    return
                log.exception("comm thread: %s", exc)
                if job[0] == "push":
                    self._inbox.put(("push_failed", job[1], exc))
                time.sleep(1.0)

    def _comm_push(self, push: _Push, header: pb.DeltaHeader, blob: bytes) -> None:
        try:
            reply = self.client.push_delta(header, blob, session_epoch=push.session)
        except SessionRenewed as exc:
            log.warning("%s", exc)  # its ranges went with the old session (_drop_unmerged)
            self._inbox.put(("push_lost", push))
            return
        except grpc.RpcError as exc:
            self._inbox.put(("push_failed", push, exc))
            self._need_full.set()
            self._comm_fetch(None, wait=0.0)
            return
        if reply.result == pb.PushReply.ACCEPTED:
            push.accepted_version = reply.model_version
        self._inbox.put(("pushed", push, reply))
        if reply.result != pb.PushReply.ACCEPTED:
            self._comm_fetch(None, wait=0.0)  # rebase onto the newest model, subtract nothing
            return
        limit = push.base_version + self.run_cfg.merge.max_staleness + 2
        while not self._abort.is_set() and not push.resolved:
            merged = self._comm_fetch(push, wait=self.config.long_poll_seconds)
            if merged:
                return
            if self.comm_version > max(limit, push.accepted_version + self.run_cfg.merge.max_staleness + 2):
                log.warning("push %s: accepted but not merged after %d versions; treating it as lost",
                            push.push_id[:8], self.comm_version - push.base_version)
                self._inbox.put(("push_lost", push))
                return

    def _comm_fetch(self, push: _Push | None, wait: float) -> bool:
        """One GetModel from comm_version; queue what it brings. True when it contains `push`
        (or `push` is resolved as lost)."""
        force = self._need_full.is_set()
        rep: ModelReply = self.client.get_model(
            self.comm_version, self.model_bytes, self.max_blob_bytes, force_full=force, wait_seconds=wait,
            held_push_ids=self._held_push_ids(),
        )
        h = rep.header
        if h.kind == pb.ModelHeader.UNCHANGED:
            return False
        if h.kind == pb.ModelHeader.FULL:
            self._need_full.clear()
            full = self._full_tensors(rep)
            own: bool | None = False
            if push is not None and push.accepted_version >= 0:
                # The coordinator names our pushes the full weights contain; a full model older
                # than the push's base means the push was lost with a coordinator crash.
                own = full_contains_push(h.version, push.base_version, push.push_id, h.merged_push_ids)
            self.comm_version = h.version
            self._inbox.put(("full", h.version, full, h.params_sha256, push if own else None, own is None))
            return push is not None and own is not False
        updates = []
        contains = False
        version = self.comm_version
        for u in h.updates:
            try:
                tensors = self._update_tensors(u, rep.blob)
            except ValueError as exc:  # apply what came before it, then resync in full
                log.error("update %d unusable (%s): resyncing with the full model", u.version, exc)
                self._need_full.set()
                break
            mine = push is not None and push.push_id in u.merged_push_ids
            contains = contains or mine
            own = counted_contribution(push.decoded, u.counted.scales, self.spec) if mine and u.HasField("counted") else None
            updates.append((u.version, tensors, u.params_sha256, push if mine else None, own))
            version = u.version
        self.comm_version = version
        if updates:
            self._inbox.put(("updates", updates))
        return contains

    # ------------------------------------------------------------------ applying (training thread)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(msg)

    def _resolve(self, push: _Push, merged: bool) -> None:
        if self._inflight is not push:
            return
        push.resolved = True
        self._inflight = None
        self._sealed = 0
        if merged:
            # The next round counts from the merge, not from the push: every worker of a semi-sync
            # merge gets it at about the same moment, so their next pushes arrive together and the
            # merge waits less for the last one (the lag until the merge is what makes updates late).
            self.round_steps = 0
            self.round_start = time.monotonic()
            del self._pending[: push.n_ranges]
            lag = self.local_step - push.pushed_at_step
            with self._stats_lock:
                self._stats.merged += 1
                self._stats.merge_lag_steps += lag
            if self.metrics is not None:
                self.metrics.merge_lag_steps.observe(lag)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "fatal":
            raise msg[1]
        if kind == "pushed":
            push, reply = msg[1], msg[2]
            if reply.result == pb.PushReply.STALE:
                log.info("push %s stale (staleness %d): its progress goes out again", push.push_id[:8], reply.staleness)
                with self._stats_lock:
                    self._stats.stale += 1
                self._resolve(push, merged=False)
        elif kind in ("push_failed", "push_lost"):
            push = msg[1]
            if kind == "push_failed":
                exc = msg[2]
                code = exc.code().name if isinstance(exc, grpc.RpcError) else type(exc).__name__
                details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                if code == "INVALID_ARGUMENT" and self._inflight is push:
                    # Refused for good: resending the same ranges is refused again, forever (e.g.
                    # after a coordinator restart lost the merges before them, the ranges no longer
                    # continue the committed cursor). Drop the ranges (the tokens are leased and
                    # trained again); the weight progress stays and goes out with the next delta.
                    log.error("push %s refused (%s: %s): dropping its %d range(s), resyncing",
                              push.push_id[:8], code, details, push.n_ranges)
                    del self._pending[: push.n_ranges]
                    self._sealed = 0
                else:
                    log.error("push %s refused (%s: %s): keeping its progress, resyncing", push.push_id[:8], code, details)
                self._need_full.set()
            self._resolve(push, merged=False)
        elif kind == "updates":
            with torch.no_grad():
                for version, tensors, sha, own, counted_own in msg[1]:
                    decoded = None
                    if own is not None and own is self._inflight:  # a count merge took our signs at its scale
                        decoded = counted_own if counted_own is not None else own.decoded
                    apply_update(self.params, self.base, tensors, decoded)
                    if decoded is not None:
                        self._resolve(own, merged=True)
                    self.base_version = version
                    if sha and params_sha256(self.base) != sha:
                        log.error("basepoint checksum mismatch at version %d: resyncing with the full model", version)
                        with self._stats_lock:
                            self._stats.resyncs += 1
                        self._need_full.set()
                        break
            self._after_rebase()
        elif kind == "full":
            _, version, full, sha, own, lost = msg
            decoded = own.decoded if own is not None and own is self._inflight else None
            with torch.no_grad():
                rebase_full(self.params, self.base, full, decoded)
            if decoded is not None:
                self._resolve(own, merged=True)
            elif lost and self._inflight is not None:
                self._resolve(self._inflight, merged=False)
            self.base_version = version
            if sha and params_sha256(self.base) != sha:
                log.error("full model at version %d does not match its announced checksum", version)
            self._after_rebase()
        elif kind == "rejoined":
            reply = msg[1]
            if reply.run_id != self.run_id:
                raise _NewRun()
            log.warning("session renewed: dropping the current lease")
            self._drop_unmerged()
            if reply.model_version < self.base_version:
                self._need_full.set()

    def _drop_unmerged(self) -> None:
        """After a rejoin: the coordinator released every range leased in the old session (or
        restarted from a checkpoint), so pending ranges can never be committed and pushing them
        is refused forever. Drop them and the progress they carry (params back to base); those
        tokens are retrained by whoever leases them. An in-flight push is no longer ours to
        subtract: if it still merges, its update arrives like any other."""
        steps = sum(p[5] for p in self._pending)
        if steps:
            log.warning("dropping %d unmerged local steps of the old session; their tokens are retrained", steps)
        if self._inflight is not None:
            self._inflight.resolved = True  # the comm thread stops waiting for its merge
        self._pending, self._sealed, self._inflight = [], 0, None
        with torch.no_grad():
            for n, t in self.params.items():
                t.copy_(self.base[n].to(t.device, t.dtype))

    def _after_rebase(self) -> None:
        if not all_finite(self.params):
            log.error("local weights are not finite: dropping local progress, restarting from the global model")
            with torch.no_grad():
                for n, t in self.params.items():
                    t.copy_(self.base[n].to(t.device, t.dtype))
            self.optimizer.state.clear()
        if self.metrics is not None:
            self.metrics.model_version.set(self.base_version)

    # ------------------------------------------------------------------ heartbeats and stats

    def _worker_stats(self, prev: _Stats, prev_t: float) -> tuple[pb.WorkerStats, _Stats]:
        with self._stats_lock:
            s = _Stats(**vars(self._stats))
        dt = max(1e-9, time.monotonic() - prev_t)
        steps = s.steps - prev.steps
        gpu_mem, gpu_util = 0, -1.0
        if self.device.type == "cuda":
            gpu_mem = int(torch.cuda.memory_allocated(self.device))
            try:
                gpu_util = torch.cuda.utilization(self.device) / 100.0
            except Exception:  # noqa: BLE001 - needs pynvml
                gpu_util = -1.0
        stats = pb.WorkerStats(
            tokens_per_second=(s.tokens - prev.tokens) / dt,
            step_seconds=(s.step_seconds - prev.step_seconds) / steps if steps else 0.0,
            loss=(s.loss_sum - prev.loss_sum) / steps if steps else 0.0,
            sent_bytes=self.client.sent_bytes, received_bytes=self.client.received_bytes,
            data_bytes=self.client.data_bytes,
            wait_seconds=s.wait_seconds, wall_seconds=time.monotonic() - self.train_start,
            steps=s.steps, tokens=s.tokens, gpu_memory_bytes=gpu_mem, gpu_utilization=gpu_util,
            residual_norm=s.residual_norm,
        )
        return stats, s

    def _heartbeat_loop(self) -> None:
        prev, prev_t = _Stats(), time.monotonic()
        while not self._abort.wait(self.heartbeat_seconds):
            stats, prev = self._worker_stats(prev, prev_t)
            prev_t = time.monotonic()
            if self.metrics is not None:
                self.metrics.tokens_per_second.set(stats.tokens_per_second)
                if stats.loss:
                    self.metrics.loss.set(stats.loss)
                self.metrics.set_cumulative(stats.sent_bytes, stats.received_bytes, stats.wait_seconds)
                self.metrics.gpu_memory_bytes.set(stats.gpu_memory_bytes)
                self.metrics.gpu_utilization_ratio.set(stats.gpu_utilization)
            try:
                reply = self._send_heartbeat(stats)
            except FatalError as exc:
                self._inbox.put(("fatal", exc))
                return
            except Exception as exc:  # noqa: BLE001
                if not self._abort.is_set():
                    log.warning("heartbeat failed: %s", exc)
                continue
            if reply.action == pb.HeartbeatReply.STOP:
                log.info("coordinator says the run is finished")
                self._finish.set()
            self._on_heartbeat_reply(reply)

    # ------------------------------------------------------------------ the way out

    def _push_while_idle(self) -> None:
        """No data to train on until a lease comes: send the pending steps now. This is
        usually the end of the run (the budget is leased out), so the push goes at 8 bits when
        the run's scheme is coarser: it carries the error feedback residual that earlier 1-bit
        or 4-bit pushes left in params - base, which would otherwise never reach the model."""
        scheme = self._last_steps_scheme()
        log.info("waiting for data: sending %d pending step(s) at %s",
                 sum(p[5] for p in self._pending[self._sealed:]), scheme or self.run_cfg.compression.scheme)
        self._start_push(scheme)

    def _last_steps_scheme(self) -> str | None:
        """compression.last_scheme when the run's scheme is coarser than it, else None (the run's)."""
        c = self.run_cfg.compression
        coarse = ("sign", "tsign", "ternary") + (("int4",) if c.last_scheme == "int8" else ())
        return c.last_scheme if c.scheme in coarse else None

    def _finish_up(self, reason: str, patience: float) -> None:
        give_up = time.monotonic() + patience
        while self._inflight is not None and time.monotonic() < give_up:
            try:
                msg = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg[0] != "rejoined":
                self._handle(msg)
        if self._inflight is not None:
            log.warning("the last push was not merged within %.0fs: %d local steps are not sent",
                        patience, sum(p[5] for p in self._pending))
        elif self._pending:
            # The data is used up: this is the worker's last delta. It goes at 8 bits (or the
            # run's scheme if that is finer), so the error feedback residual that 1-bit and 4-bit
            # pushes leave in params - base reaches the global model instead of being dropped.
            scheme = self._last_steps_scheme() if reason == "data exhausted" else None
            push, header, blob = self._make_push(scheme)
            try:
                reply = self.client.push_delta(header, blob, patience=max(1.0, give_up - time.monotonic()))
                log.info("final push (%s): %s", scheme or self.run_cfg.compression.scheme,
                         pb.PushReply.Result.Name(reply.result))
            except (grpc.RpcError, FatalError) as exc:
                log.warning("final push failed: %s", exc)
        self._abort.set()
        try:  # final cumulative stats (bytes, waiting) so the run's summary counts this worker fully
            final_stats, _ = self._worker_stats(_Stats(), time.monotonic())
            self.client.heartbeat(final_stats, patience=3.0)
        except (grpc.RpcError, FatalError) as exc:
            log.warning("final heartbeat failed: %s", exc)
        try:
            self.client.leave(reason, patience=max(1.0, min(5.0, give_up - time.monotonic())))
            log.info("left the run (%s)", reason)
        except grpc.RpcError as exc:
            log.warning("leave failed: %s", exc.code().name)
