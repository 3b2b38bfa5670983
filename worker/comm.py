"""The worker's communication thread: sends a push, then long-polls GetModel until the
coordinator's updates contain it; resyncs in full when asked (`need_full`).

It decodes (and replays) what arrives (worker/downlink.py) and hands it to the training thread
through `inbox`, which applies it at its next step boundary (worker/rebase.py RoundState.handle).
Messages, as tuples:

- ("pushed", push, PushReply): the coordinator answered the push (ACCEPTED, STALE, ...).
- ("push_failed", push, exc) / ("push_lost", push): the push went nowhere, or was never merged.
- ("updates", [(version, update, params_sha256, push or None, counted contribution or None)]).
- ("full", version, weights, params_sha256, push or None, lost): a full model; `push` when it
  contains our push in flight, `lost` when the push can never be in it.
- ("fatal", FatalError): the coordinator refused us for good.
- ("rejoined", JoinReply): put by the client's on_rejoin callback (worker/client.py).

Only one push is in flight at a time (the training thread seals the next one after this one is
resolved); `comm_version` is the newest version this thread has delivered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import grpc

from geotrain.protos import geotrain_pb2 as pb
from geotrain.worker.client import CoordinatorClient, FatalError, ModelReply, SessionRenewed
from geotrain.worker.downlink import Downlink
from geotrain.worker.rebase import Push, full_contains_push
from geotrain.common.merge import counted_contribution

log = logging.getLogger(__name__)


class CommThread:
    def __init__(self, client: CoordinatorClient, downlink: Downlink, inbox: queue.Queue, need_full: threading.Event,
                 abort: threading.Event, version: int, model_bytes: int, max_staleness: int, long_poll_seconds: float):
        self.client = client
        self.downlink = downlink
        self.inbox = inbox
        self.need_full = need_full
        self.abort = abort
        self.comm_version = version
        self.model_bytes = model_bytes  # fp32 size of the model: the expected size of a full reply
        self.max_staleness = max_staleness
        self.long_poll_seconds = long_poll_seconds
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="comm", daemon=True)
        self._thread.start()

    def submit_push(self, push: Push, encode: Callable[[], bytes]) -> None:
        """Send `push` (sealed on the training thread, `push.header` set): this thread first calls
        `encode()` (worker/rebase.py RoundState.encode_push: compression off the training thread),
        which sets `push.decoded` before anything can be merged, then holds the payload (Downlink)."""
        self._jobs.put(["push", push, encode, None])

    def _loop(self) -> None:
        while not self.abort.is_set():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                if self.need_full.is_set():
                    job = ("resync",)
                else:
                    continue
            try:
                if job[0] == "push":
                    self._push(job)
                elif job[0] == "resync":
                    self.fetch(None, wait=0.0)
            except FatalError as exc:
                self.inbox.put(("fatal", exc))
                return
            except Exception as exc:  # noqa: BLE001 - keep the comm thread alive
                if self.abort.is_set():
                    return
                log.exception("comm thread: %s", exc)
                if job[0] == "push":
                    self.inbox.put(("push_failed", job[1], exc))
                time.sleep(1.0)

    def _push(self, job: list) -> None:
        """job: ["push", push, encode, None]; the payload is let go once sent (the long poll for
        its merge holds no copy of it). A push the training thread dropped before it was encoded
        (resolved: a rejoin) is not sent."""
        push, encode = job[1], job[2]
        job[2] = None
        if push.resolved:
            return
        blob = encode()
        header = push.header
        if push.resolved:
            return
        self.downlink.hold(push.push_id, blob)
        try:
            reply = self.client.push_delta(header, blob, session_epoch=push.session)
        except SessionRenewed as exc:
            log.warning("%s", exc)  # its ranges went with the old session (RoundState.drop_unmerged)
            self.inbox.put(("push_lost", push))
            return
        except grpc.RpcError as exc:
            self.inbox.put(("push_failed", push, exc))
            self.need_full.set()
            self.fetch(None, wait=0.0)
            return
        del header, blob
        if reply.result == pb.PushReply.ACCEPTED:
            push.accepted_version = reply.model_version
        self.inbox.put(("pushed", push, reply))
        if reply.result != pb.PushReply.ACCEPTED:
            self.fetch(None, wait=0.0)  # rebase onto the newest model, subtract nothing
            return
        limit = push.base_version + self.max_staleness + 2
        while not self.abort.is_set() and not push.resolved:
            if self.fetch(push, wait=self.long_poll_seconds):
                return
            if self.comm_version > max(limit, push.accepted_version + self.max_staleness + 2):
                log.warning("push %s: accepted but not merged after %d versions; treating it as lost",
                            push.push_id[:8], self.comm_version - push.base_version)
                self.inbox.put(("push_lost", push))
                return

    def fetch(self, push: Push | None, wait: float) -> bool:
        """One GetModel from comm_version; queue what it brings. True when it contains `push`
        (or `push` is resolved as lost)."""
        dl = self.downlink
        rep: ModelReply = self.client.get_model(
            self.comm_version, self.model_bytes, dl.max_blob_bytes, force_full=self.need_full.is_set(),
            wait_seconds=wait, held_push_ids=dl.held_push_ids(),
        )
        h = rep.header
        if h.kind == pb.ModelHeader.UNCHANGED:
            return False
        if h.kind == pb.ModelHeader.FULL:
            self.need_full.clear()
            full = dl.full_tensors(rep)
            own: bool | None = False
            if push is not None and push.accepted_version >= 0:
                # The coordinator names our pushes the full weights contain; a full model older
                # than the push's base means the push was lost with a coordinator crash.
                own = full_contains_push(h.version, push.base_version, push.push_id, h.merged_push_ids)
            self.comm_version = h.version
            self.inbox.put(("full", h.version, full, h.params_sha256, push if own else None, own is None))
            return push is not None and own is not False
        updates = []
        contains = False
        version = self.comm_version
        for u in h.updates:
            try:
                tensors = dl.update_tensors(u, rep.blob)
            except ValueError as exc:  # apply what came before it, then resync in full
                log.error("update %d unusable (%s): resyncing with the full model", u.version, exc)
                self.need_full.set()
                break
            mine = push is not None and push.push_id in u.merged_push_ids
            contains = contains or mine
            own = counted_contribution(push.decoded, u.counted.scales, list(dl.spec)) if mine and u.HasField("counted") else None
            updates.append((u.version, tensors, u.params_sha256, push if mine else None, own))
            version = u.version
        self.comm_version = version
        if updates:
            self.inbox.put(("updates", updates))
        return contains
