"""A worker that trains in a synchronous sync group when the coordinator forms one (`--sync-group`).

`GroupWorkerRunner` is an async `WorkerRunner` (worker/runner.py) that it drives through the
runner's `RunnerHooks` (it is the hooks object), plus the sync-group mode:

- Assignment: the heartbeat thread keeps the newest `HeartbeatReply.group`. At its next step
  boundary the training loop switches when (group_id, epoch) is new and world_size >= 2: it builds a
  `CompressedAllReduce` on the worker's own gRPC server (the PeerRouter is registered before the
  server starts) and a `SyncGroupTrainer` around the worker's model, and from then on every
  heartbeat carries `active_group_id` (the coordinator then refuses pushes from ranks > 0).
  All-reduce compression: `sign` (1 bit + error feedback, after an int8 warmup; worker/sync.py)
  by default; `--sync-compression none` / GEOTRAIN_SYNC_COMPRESSION=none moves fp32. The trainer's step counter is the
  worker's absolute step (step_offset + local steps; lr schedule and 1-bit warmup follow it) and it
  starts from the worker's AdamW state; the first checksum round gives every member rank 0's
  parameters, optimizer state and step.
- Rank 0 runs the normal async round protocol with the group's synchronized steps: it leases,
  trains each step on B sequences of its lease (the all-reduced step), pushes `params - base`
  every round and rebases on merged updates.
- Data: the group trains on rank 0's leases, so the coordinator's ledger accounts every member's
  tokens. With each step rank 0 sends a BatchPlan for the NEXT step (peer.proto; it rides in the
  all-reduce headers): shard, epoch, first slot of the shard's sequence order and the group's
  sequence count, up to world_size x B, from its current lease (or, when that is used up, from
  its prefetched next one). Member r trains on its even share of those slots (`plan_slots`), rank 0
  on share 0, and rank 0 records the whole range with its pending ranges, so its pushes commit
  all of them. A step without a plan (a group's first step, or rank 0 with no lease ready or a
  lease tail shorter than the group) has rank 0 train B sequences of its lease alone and the
  members B random windows of one train shard, seeded by (group_id, epoch, rank, step): gradient
  samples that the ledger does not account (counted, and logged when the worker leaves the
  group). Members fetch a planned shard on first use (cached on disk).
- Ranks > 0 neither lease nor push while in the group. A worker assigned rank > 0 first trains
  out the leases it holds (it leases nothing new meanwhile), pushes its ranges (5 s at most
  waiting for the merge) and only then enters the group, so no lease of a rank > 0 blocks the
  ledger; ranges still unpushed then go out when it is async again (refused meanwhile).
- Entry barrier (an exchange that reaches a member before it attached fails with NOT_FOUND): each
  member attaches its all-reduce to its server as soon as it enters; the synchronous steps start
  once every member's Peer Status answers for the group. Rank 0 keeps training async meanwhile
  (a rank > 0 may still be training out its leases) and asks every PEER_POLL_S; a rank > 0 waits
  idle, bounded (rank 0 must answer within one all-reduce deadline + 10 s, the others within
  PEER_WAIT_MAX_S; else a PeerFailure), and stops waiting when its assignment changes.
- Rebases: a merged update changes rank 0's parameters outside the optimizer. Rank 0 applies what
  the comm thread received right before a step that ends with the group's checksum round
  (`check_every` = round.steps, or 10 for time-based rounds; at once while it waits for a lease,
  and before the group's entry check), through `SyncGroupTrainer.rebase`: every member replays the
  same parameter change before that step's optimizer update (4 bytes per parameter fetched from
  rank 0), so every checksum round finds the members bit-identical (logged: "parameters identical
  to rank 0"; a mismatch is repaired from rank 0 and counted in geotrain_sync_repairs_total).
- Failure: a `PeerFailure` (all-reduce, checksum or state fetch; every wait has a deadline) is
  sent with the next heartbeat as `group_failure` (group_id, epoch, survivors, reason); the group
  is dropped (never re-entered under the same group_id/epoch) and the worker trains async until a
  new assignment arrives. A member > 0 that leaves its group resets its weights to its basepoint
  and resyncs the full model: its weights were rank 0's, whose progress rank 0 pushes itself.
  The optimizer state goes back to the worker's AdamW.
- Metrics: every SyncStepMetrics feeds the worker's geotrain_sync_* metrics.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from geotrain.protos import geotrain_pb2 as pb
from geotrain.common.config import RunConfig, WorkerConfig
from geotrain.worker.runner import RunnerHooks, WorkerRunner
from geotrain.worker.shards import Lease

log = logging.getLogger(__name__)

SYNC_COMPRESSIONS = ("none", "sign")
DEFAULT_SYNC_COMPRESSION = "sign"
FLUSH_BEFORE_MEMBER_S = 5.0  # a rank > 0: how long to try pushing its async progress before switching
DEFAULT_CHECK_EVERY = 10
MIN_DEADLINE_S = 5.0  # all-reduce deadline floor (it grows to 5 x p99 of the exchanges)
PEER_WAIT_EXTRA_S = 10.0  # entry barrier: one all-reduce deadline plus this
PEER_WAIT_MAX_S = 300.0  # a rank > 0: how long it waits for the other members to serve the group
PEER_POLL_S = 0.5  # rank 0: how often it asks whether every member serves a new group
REBASE_EVERY_CHECKS = 1  # rank 0 rebases before every checksum round (the members replay it)


@dataclass
class _Group:
    group_id: str
    epoch: int
    rank: int
    world_size: int
    ar: object       # CompressedAllReduce
    trainer: object = None  # SyncGroupTrainer, once every member serves the group
    steps: int = 0
    next_poll: float = 0.0  # rank 0: when to ask the peers' Status again
    next_batch: object = None  # the BatchPlan of the next step (from the last step's all-reduce)
    planned_from: tuple | None = None  # rank 0: (unit_id, epoch, position) the plan starts at
    unplanned_steps: int = 0  # steps whose members trained on unaccounted random windows


def plan_slots(plan, rank: int, world_size: int) -> tuple[int, int]:
    """Member `rank`'s share [lo, hi) of a BatchPlan's slots: contiguous, in rank order, sizes
    differing by at most one."""
    first, n = int(plan.first_slot), int(plan.sequences)
    return first + rank * n // world_size, first + (rank + 1) * n // world_size


def plan_for(shard: str, epoch: int, first_slot: int, remaining: int, world_size: int, batch_size: int):
    """The group's next BatchPlan from a lease whose next sequence is `first_slot` with `remaining`
    whole sequences left, or None when fewer than one per member remain."""
    from geotrain.protos import peer_pb2

    if remaining < world_size:
        return None
    return peer_pb2.BatchPlan(shard=shard, epoch=epoch, first_slot=first_slot,
                              sequences=min(world_size * batch_size, remaining))


def sync_trainer_settings(run: RunConfig) -> dict:
    """SyncGroupTrainer keyword arguments from the run config: the inner optimizer and schedule
    ([optim], train.max_iters) and the [sync] section; the same on every member."""
    from geotrain.common.train import lr_at

    o, max_iters, sc = run.optim, run.train.max_iters, run.sync
    return dict(
        lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), grad_clip=o.grad_clip,
        check_every=sc.check_every or (run.round.steps if run.round.steps > 0 else DEFAULT_CHECK_EVERY),
        lr_fn=lambda s: lr_at(s, o, max_iters), total_steps=max_iters, mode="update",
        compression_warmup=sc.warmup(), warmup_compression=sc.warmup_compression,
        variance_probe_every=sc.variance_probe_every, variance_refresh_every=sc.variance_refresh_every,
    )


class GroupWorkerRunner(RunnerHooks):
    """A WorkerRunner that joins the sync group the coordinator assigns (see the module docstring).
    It owns the runner (`self.runner`) and is its RunnerHooks; `run()` and `stop()` are the
    runner's."""

    def __init__(self, config: WorkerConfig, sync_compression: str = ""):
        sync_compression = sync_compression or os.environ.get("GEOTRAIN_SYNC_COMPRESSION", "")
        if sync_compression and sync_compression not in SYNC_COMPRESSIONS:
            raise ValueError(f"sync compression must be one of {SYNC_COMPRESSIONS}, got {sync_compression!r}")
        self.sync_compression = sync_compression
        self._group_lock = threading.Lock()
        self._assigned: pb.GroupAssignment | None = None  # newest assignment (heartbeat thread)
        self._active_group_id = ""                        # sent with every heartbeat
        self._failure: pb.GroupFailure | None = None      # sent with the heartbeats until one is answered
        self._sent_failure: pb.GroupFailure | None = None
        self._failed: set[tuple[str, int]] = set()        # groups dropped after a failure
        self._group: _Group | None = None                 # training thread only
        self._idle = False
        self.group_checks = 0
        self.group_repairs = 0
        self.runner = WorkerRunner(config, hooks=self)

    def run(self) -> int:
        return self.runner.run()

    def stop(self) -> None:
        self.runner.stop()

    # ------------------------------------------------------------------ hooks: serving, heartbeats

    def before_serve(self, server) -> None:
        from geotrain.worker.allreduce import router_for

        router_for(server)  # the Peer service must be registered before start()

    def heartbeat_extras(self) -> dict:
        """Heartbeat thread (and _leave_group): the active group, and a failure to report once."""
        with self._group_lock:
            failure, active = self._failure, self._active_group_id
            self._sent_failure = failure  # cleared by the reply (on_heartbeat_reply): sent until answered
        return {"active_group_id": active, "group_failure": failure}

    def _send_heartbeat(self, patience: float | None = None) -> pb.HeartbeatReply:
        hb = self.runner.heartbeats
        return hb.send(hb.last_stats, patience=patience)

    def on_heartbeat_reply(self, reply: pb.HeartbeatReply) -> None:
        group = reply.group if reply.HasField("group") and reply.group.world_size >= 2 else None
        with self._group_lock:
            self._assigned = group
            if self._failure is not None and self._failure is self._sent_failure:
                self._failure = None  # reported

    # ------------------------------------------------------------------ hooks: the loop

    def step_boundary(self, lease: Lease | None) -> bool:
        self._maybe_switch(holding_lease=lease is not None)
        self._idle = lease is None  # rank 0 waiting for a lease: rebase now (the run may be finishing)
        g = self._group
        if g is not None and g.rank == 0 and g.trainer is None:
            self._poll_peers(g)
        if g is None or g.rank == 0:
            return False
        self._member_step(g)
        return True

    def may_lease(self) -> bool:
        """A rank > 0 assignment is pending or active: lease nothing new."""
        g = self._group
        if g is not None:
            return g.rank == 0
        with self._group_lock:
            want = self._assigned
            return not (want is not None and want.rank > 0 and (want.group_id, int(want.epoch)) not in self._failed)

    def apply_updates(self, drain) -> None:
        g = self._group
        if g is None or g.trainer is None or g.rank != 0 or g.trainer._needs_check:
            drain()  # async, or the entry check gives the members this state
            return
        t = g.trainer
        # Rebase once per checksum period, before the step that ends with the checksum round (or
        # at once while waiting for a lease); the members replay it (SyncGroupTrainer.rebase).
        period = t.check_every * REBASE_EVERY_CHECKS
        if not self._idle and period and (t._group_calls + 1) % period:
            return
        if not self.runner.inbox.empty():
            t.rebase(drain)

    def before_finish(self) -> None:
        if self._group is not None:  # close it so the peers' next exchange fails at once
            self._leave_group()

    def on_new_run(self) -> None:
        self._leave_group()
        with self._group_lock:
            self._assigned, self._failure = None, None
            self._failed.clear()

    # ------------------------------------------------------------------ switching (training thread)

    def _maybe_switch(self, holding_lease: bool) -> None:
        with self._group_lock:
            want = self._assigned
        key = (want.group_id, int(want.epoch)) if want is not None else None
        g = self._group
        if g is not None and key == (g.group_id, g.epoch):
            return
        if key is not None and key in self._failed:
            key = None
        if key is not None and g is None and want.rank > 0 and holding_lease:
            return  # a rank > 0 first trains out the leases it holds (no new ones: may_lease)
        if g is not None:
            log.info("sync group %s: the coordinator %s; leaving it", g.group_id,
                     "assigned another group" if key else "dissolved it")
            self._leave_group()
        if key is not None:
            self._enter_group(want)

    def _enter_group(self, a: pb.GroupAssignment) -> None:
        from geotrain.worker.allreduce import CompressedAllReduce

        r = self.runner
        scheme = self.sync_compression or DEFAULT_SYNC_COMPRESSION
        if a.rank > 0:
            self._flush_before_member()
        ar = CompressedAllReduce(
            int(a.rank), int(a.world_size), list(a.peers), a.group_id, epoch=int(a.epoch), compression=scheme,
            algorithm=r.run_cfg.compression.sync_schedule, token=a.peer_secret or None,
            tls_ca=r.config.tls_ca if r.config.tls_cert else None,  # peers serve TLS as this member does
            min_deadline_s=max(MIN_DEADLINE_S, 3.0 * r.heartbeat_seconds), chunk=r.run_cfg.compression.chunk,
        )
        ar.add_to_server(r.server.server)
        g = self._group = _Group(a.group_id, int(a.epoch), int(a.rank), int(a.world_size), ar)
        with self._group_lock:
            self._active_group_id = a.group_id
        if r.metrics is not None:
            r.metrics.enable_sync()
            r.metrics.sync_group_size.set(a.world_size)
        log.info("sync group %s (epoch %d): rank %d of %d, peers %s, compression %s, schedule %s", a.group_id,
                 a.epoch, a.rank, a.world_size, ",".join(a.peers), scheme, ar.algorithm)
        if g.rank > 0:
            self._wait_for_peers(g)
            if self._group is g:
                self._start_training(g)

    def _start_training(self, g: _Group) -> None:
        """Every member serves the group: build the SyncGroupTrainer around the worker's model."""
        from geotrain.worker.sync import SyncGroupTrainer

        r = self.runner
        check_every = sync_trainer_settings(r.run_cfg)["check_every"]
        trainer = member_trainer(r.trainer, r.run_cfg, g.ar, g.group_id)
        trainer.step_count = r.step_offset + r.rounds.local_step
        g.trainer = trainer
        log.info("sync group %s: all %d members serve it: training synchronously (rank %d, checksum round every %d steps)",
                 g.group_id, g.world_size, g.rank, check_every)

    def _waiting_peers(self, g: _Group, ranks) -> set[int]:
        """The ranks among `ranks` whose Peer Status does not answer for this group yet."""
        from geotrain.protos import peer_pb2

        request = peer_pb2.PeerStatusRequest(group_id=g.group_id, sender=g.rank)
        waiting = set()
        for rank in sorted(ranks):
            try:
                reply = g.ar._stub(rank).Status(request, timeout=2.0, metadata=g.ar._metadata)
            except Exception:  # noqa: BLE001 - not there yet
                waiting.add(rank)
                continue
            if reply.epoch != g.epoch:
                waiting.add(rank)
        return waiting

    def _poll_peers(self, g: _Group) -> None:
        """Rank 0, at a step boundary (at most every PEER_POLL_S): start the synchronous steps once
        every member serves the group. Meanwhile rank 0 trains async (a member may still be
        training out its leases), so this needs no deadline."""
        now = time.monotonic()
        if now < g.next_poll:
            return
        g.next_poll = now + PEER_POLL_S
        if not self._waiting_peers(g, set(range(g.world_size)) - {g.rank}):
            self._start_training(g)

    def _wait_for_peers(self, g: _Group) -> None:
        """A rank > 0 at entry: wait until every member serves the group (Status answers) before
        sending, else the first exchange would find NOT_FOUND. Bounded: rank 0 must serve within one
        deadline + PEER_WAIT_EXTRA_S (a member still stuck in the old group's all-reduce needs up to
        one deadline to give up on it); the others (which may be training out their leases) within
        PEER_WAIT_MAX_S; an assignment change or a stop ends the wait at once."""
        from geotrain.worker.allreduce import PeerFailure

        start = time.monotonic()
        give_up = start + PEER_WAIT_MAX_S
        rank0_deadline = start + g.ar.deadline_s + PEER_WAIT_EXTRA_S
        waiting = set(range(g.world_size)) - {g.rank}
        while waiting:
            waiting = self._waiting_peers(g, waiting)
            if not waiting:
                return
            if 0 not in waiting:
                rank0_deadline = float("inf")
            with self._group_lock:
                want = self._assigned
            if want is None or (want.group_id, int(want.epoch)) != (g.group_id, g.epoch) or self.runner.finishing():
                log.info("sync group %s: assignment changed while waiting for the peers", g.group_id)
                self._leave_group()
                return
            if time.monotonic() > min(give_up, rank0_deadline):
                self._group_failed(g, PeerFailure(min(waiting), f"peers {sorted(waiting)} never served the group",
                                                  sorted(set(range(g.world_size)) - waiting)))
                return
            time.sleep(0.1)

    def _flush_before_member(self) -> None:
        """A rank > 0 may no longer push once it confirmed the group: send what it trained async."""
        r = self.runner
        rounds = r.rounds
        give_up = time.monotonic() + FLUSH_BEFORE_MEMBER_S
        while time.monotonic() < give_up and not r.stop_event.is_set():
            if rounds.inflight is None:
                if len(rounds.pending) <= rounds.sealed:
                    return
                r.start_push()
            try:
                msg = r.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            rounds.handle(msg)
        if rounds.pending:
            log.warning("joining the sync group with %d unpushed range(s): they go out when this worker is async again",
                        len(rounds.pending))

    def _leave_group(self) -> None:
        g, self._group = self._group, None
        if g is None:
            return
        r = self.runner
        with self._group_lock:
            self._active_group_id = ""
        try:
            if g.trainer is not None:
                g.trainer.close()
        finally:
            g.ar.close()
        if g.trainer is not None:
            try:
                r.trainer.optimizer.load_state_dict(g.trainer.optimizer.state_dict())
            except (ValueError, KeyError) as exc:
                log.warning("could not carry the sync group's AdamW state back (%s)", exc)
            _set_checkpointing(r.trainer.model, r.trainer.train_step.plan.checkpointing)  # the worker's own plan
        if g.rank > 0 and not (r.finishing() or r.abort.is_set()):
            try:  # tell the coordinator now, before async pushes that it would refuse from a rank > 0
                self.on_heartbeat_reply(self._send_heartbeat(patience=3.0))
            except Exception as exc:  # noqa: BLE001 - the heartbeat thread tells it soon anyway
                log.warning("heartbeat after leaving the group failed: %s", exc)
        if g.rank > 0 and g.trainer is not None:
            # The weights were rank 0's: their progress is rank 0's to push. Back to the basepoint,
            # then the newest full model.
            rounds = r.rounds
            rounds.local_step = max(rounds.local_step, g.trainer.step_count - r.step_offset)
            if rounds.inflight is not None:
                rounds.resolve(rounds.inflight, merged=False)
            rounds.reset_to_base()
            r.need_full.set()
        if r.metrics is not None and getattr(r.metrics, "sync_group_size", None) is not None:
            r.metrics.sync_group_size.set(0)
        t = g.trainer
        log.info("sync group %s: left after %d steps (%d on the leased tokens rank 0 planned, %d on unaccounted "
                 "random windows; %d rebases, %d checksum rounds, %d repairs); training async", g.group_id, g.steps,
                 g.steps - g.unplanned_steps, g.unplanned_steps, t.rebases if t else 0, t.checks if t else 0,
                 t.repairs if t else 0)

    def _group_failed(self, g: _Group, exc) -> None:
        survivors = [int(s) for s in (getattr(exc, "survivors", None) or [])]
        log.warning("sync group %s (epoch %d) rank %d: peer failure: %s; survivors %s; reporting it and training async",
                    g.group_id, g.epoch, g.rank, exc, survivors)
        with self._group_lock:
            self._failure = pb.GroupFailure(group_id=g.group_id, epoch=g.epoch, survivor_ranks=survivors,
                                            reason=str(exc)[:500])
            self._failed.add((g.group_id, g.epoch))
        self._leave_group()

    # ------------------------------------------------------------------ stepping

    def train_step(self, lease: Lease) -> bool:
        """Rank 0 of a training group: the group's step on the plan's share of the lease."""
        g = self._group
        if g is None or g.rank != 0 or g.trainer is None:
            return False
        r = self.runner
        T = r.model_cfg.block_size
        plan = g.next_batch
        if plan is not None and g.planned_from != (lease.unit_id, lease.epoch, lease.pos):
            log.warning("sync group %s: the lease changed under the announced batch; the members' tokens of "
                        "this step are not accounted", g.group_id)
            plan = None
        if plan is not None:
            lo, hi = plan_slots(plan, 0, g.world_size)
            x, y = r.shards.slots_batch(lease.shard, lease.epoch, lo, hi)
            n = int(plan.sequences)
        else:
            x, y, n = r.shards.lease_batch(lease, r.batch_size)  # alone: the members train on random windows
        end = lease.pos + n * T
        nxt = self._plan_after(g, lease, end)
        loss = self._sync_step(g, x, y, nxt)
        if loss is None:
            return True  # no step taken: the tokens stay in the lease, trained again async
        g.unplanned_steps += plan is None
        start, lease.pos = lease.pos, end
        r.rounds.local_step += 1
        r.rounds.round_steps += 1
        r.rounds.record_range(lease, start, end, loss)
        return True

    def _plan_after(self, g: _Group, lease: Lease, position: int):
        """Rank 0: the BatchPlan of the step after the one that ends at `position` of `lease`:
        from that lease, or from the prefetched next lease once it is used up; None if neither has
        a sequence for every member. Remembers where the plan starts, to check it next step."""
        r = self.runner
        T = r.model_cfg.block_size
        remaining = (r.shards.usable_end(lease) - position) // T
        source = lease
        if remaining == 0:  # the main loop takes the prefetched lease next (worker/runner.py)
            nxt = r.next_lease
            if nxt is None or not nxt.done() or nxt.cancelled() or nxt.exception() is not None:
                return None
            source = nxt.result()
            if source is None or source.session != r.client.session_epoch:
                return None
            position = source.pos
            remaining = (r.shards.usable_end(source) - position) // T
        plan = plan_for(source.shard, source.epoch, position // T, remaining, g.world_size, r.batch_size)
        g.planned_from = (source.unit_id, source.epoch, position) if plan is not None else None
        return plan

    def _member_step(self, g: _Group) -> None:
        r = self.runner
        plan = g.next_batch
        if plan is not None:
            lo, hi = plan_slots(plan, g.rank, g.world_size)
            r.shards.ensure_shard(plan.shard)
            x, y = r.shards.slots_batch(plan.shard, int(plan.epoch), lo, hi)
        else:
            x, y = self._random_windows(g)
        if self._sync_step(g, x, y) is not None:
            r.rounds.local_step += 1
            g.unplanned_steps += plan is None

    def _random_windows(self, g: _Group) -> tuple[torch.Tensor, torch.Tensor]:
        """B random windows of one train shard: a member's batch for a step without a plan."""
        r = self.runner
        shards = [s for s in r.manifest.shards if getattr(s, "split", "train") == "train"] or list(r.manifest.shards)
        shards.sort(key=lambda s: s.name)
        info = shards[(zlib.crc32(g.group_id.encode()) + g.rank) % len(shards)]
        arr = r.shards.ensure_shard(info.name)
        T, B = r.model_cfg.block_size, r.batch_size
        high = max(1, len(arr) - T - 1)
        rng = np.random.default_rng([zlib.crc32(g.group_id.encode()), g.epoch, g.rank, g.steps])
        starts = rng.integers(0, high, size=B)
        buf = np.stack([np.asarray(arr[s : s + T + 1], dtype=np.int64) for s in starts])
        return torch.from_numpy(np.ascontiguousarray(buf[:, :-1])), torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))

    def _sync_step(self, g: _Group, x: torch.Tensor, y: torch.Tensor, next_batch=None) -> float | None:
        """One step of the group (rank 0 sends `next_batch`); its loss, or None after a PeerFailure
        (the group is dropped)."""
        from geotrain.worker.allreduce import PeerFailure

        r = self.runner
        if r.device.type != "cpu":
            x, y = x.to(r.device), y.to(r.device)
        try:
            m = g.trainer.step(x, y, next_batch=next_batch)
        except PeerFailure as exc:
            self._group_failed(g, exc)
            return None
        g.steps += 1
        g.next_batch = m.next_batch
        r.stats.add(steps=1, tokens=x.numel(), loss_sum=m.loss, step_seconds=m.step_seconds)
        if r.metrics is not None:
            r.metrics.step_seconds.observe(m.step_seconds)
            r.metrics.observe_sync(m)
        if m.checked:
            self.group_checks += 1
            if m.repaired:
                self.group_repairs += 1
            elif g.rank > 0 and (self.group_checks - self.group_repairs) % 20 == 1:
                log.info("sync group %s rank %d: checksum round at step %d: parameters identical to rank 0 "
                         "(%d checks, %d repairs)", g.group_id, g.rank, m.step, self.group_checks, self.group_repairs)
        return m.loss


def member_trainer(local, run: RunConfig, ar, group_id: str = ""):
    """The SyncGroupTrainer of this member around the worker's model (worker/trainer.py
    LocalTrainer `local`, on its device), on the all-reduce `ar`; called when every member serves
    the group.

    Device memory: the member's AdamW keeps fp32 state on the device, so it steps by the memory
    plan for that state (`LocalTrainer.plan_with_state("fp32")`: the worker's own plan when it
    is the same, else the plan with train.micro_batch and train.activation_checkpointing of the
    run), logged here. The worker's AdamW state moves over to it and is let go on the worker's
    optimizer meanwhile (the group's goes back when the member leaves), so the device holds one
    optimizer state, not two."""
    from geotrain.worker.sync import SyncGroupTrainer

    plan = local.plan_with_state("fp32")
    micro, ckpt = plan.micro_batch, plan.checkpointing
    if not plan.fits:
        micro, ckpt = run.train.micro_batch or 1, True
        log.warning("sync group %s: the memory plan says fp32 AdamW state does not fit on %s (%s); stepping "
                    "micro-batch %d with activation checkpointing", group_id, local.device, plan.reason, micro)
    log.info("%s", plan.table(f"sync group {group_id}: memory plan on {local.device} (fp32 AdamW state), "
                              f"micro-batch {micro or local.batch_size} of {local.batch_size}:"))
    trainer = SyncGroupTrainer(local.model, ar, device=local.device, **sync_trainer_settings(run))
    trainer.micro_batch = micro
    _set_checkpointing(local.model, ckpt)
    if local.optimizer.state:
        try:
            trainer.optimizer.load_state_dict(local.optimizer.state_dict())
        except (ValueError, KeyError) as exc:
            log.warning("sync group %s: could not carry the AdamW state over (%s)", group_id, exc)
        local.optimizer.state.clear()
    _ensure_adam_state(trainer.optimizer)
    return trainer


def _set_checkpointing(model, on: bool) -> None:
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = on


def _ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero AdamW moments for parameters without state (the 1-bit "update" step reads them)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
