"""Fault injection with real processes (issue 7): kills mid-upload and mid-checkpoint, cut
connections, a frozen straggler, a full disk, a corrupted checkpoint.

Same tiny setup as test_integration.py (tests/procs.py); tests/proxy.py sits between a worker and
the coordinator where the network has to misbehave.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from geotrain.common.checkpoint import list_checkpoints, load_latest_checkpoint
from procs import Cluster, checkpoint_state, merges, prepare_corpus, tiny_config
from proxy import Proxy


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus"), n_bytes=200_000)


def worker_row(status: dict, name: str) -> dict | None:
    return next((w for w in status["worker_list"] if w["name"] == name), None)


def assert_budget_committed(run_dir: Path, budget: int) -> None:
    state, _ = checkpoint_state(run_dir)
    ledger = state["ledger"]
    assert ledger["committed_total"] == budget
    assert sum(u["committed"] - u["start"] for u in ledger["units"]) == budget
    assert not any(u["holder"] for u in ledger["units"])


# --------------------------------------------------------------------------- worker killed mid-upload


@pytest.mark.slow  # 25-50 s on 2 cores; run with -m slow
@pytest.mark.timeout(200)
def test_worker_sigkill_mid_upload(data_dir, tmp_path):
    """The victim talks through a proxy that lets 20 KB/s upstream, so its ~87 KB delta is in
    flight for seconds; it is SIGKILLed then. The coordinator refuses the truncated stream (the
    victim's accepted pushes and merged tokens stay as they were; the cut ends the stream short or
    cancels it, depending on timing), drops it when its lease
    expires (its leased tokens go back to the pool), and the other worker goes on."""
    cfg = tiny_config(plan__max_tokens=0, workers__lease_seconds=8.0)
    with Cluster(tmp_path, data_dir, cfg) as c, Proxy(0) as proxy:
        coord = c.start_coordinator()
        proxy.target = ("127.0.0.1", c.port)
        other = c.start_worker("other")
        victim = c.start_worker("victim", target=proxy.address)
        c.wait_status(lambda s: (r := worker_row(s, "victim")) is not None and r["pushes"] >= 1, 90,
                      "a first push from the victim", fail_if_dead=[coord, victim])
        proxy.upload_seen.clear()
        proxy.throttle_up_bps = 20_000
        assert proxy.upload_seen.wait(60), "no upload from the victim"
        before = worker_row(c.status(), "victim")
        assert before is not None
        mark = len(coord.log())
        victim.kill()
        proxy.cut_all()  # the victim's host is gone, with the upload bytes its kernel still held
        # the stream ends short (truncated) or the connection's end cancels it (cut), by timing
        c.wait_for(lambda: re.search(r"delta stream refused: (stream truncated|the client cut it)", coord.log()[mark:]),
                   20, "the coordinator to refuse the cut upload", fail_if_dead=[coord])
        row = worker_row(c.status(), "victim")
        if row is not None:  # not dropped yet: the refused stream changed nothing
            assert row["pushes"] == before["pushes"], "a truncated upload counted as a push"
            assert row["merged_tokens"] == before["merged_tokens"]
        c.wait_for(lambda: re.search(r"worker victim dropped \(no heartbeat", coord.log()[mark:]), 30,
                   "the victim's lease to expire", fail_if_dead=[coord])
        v = c.status()["model_version"]
        c.wait_status(lambda s: s["model_version"] >= v + 3, 60, "the run to go on", fail_if_dead=[coord, other])
        after = coord.log()[mark:]
        refused = re.findall(r"PushDelta -> (\w+): (.*)", after)
        print("refusals after the kill:", refused)
        assert refused and all(code in ("INVALID_ARGUMENT", "CANCELLED") for code, _ in refused), refused
        m = re.search(r"worker victim dropped \(no heartbeat for \d+s\); (\d+) leased tokens return", after)
        assert m and int(m.group(1)) > 0, "the victim held no lease"


# --------------------------------------------------------------------------- coordinator killed mid-checkpoint


@pytest.mark.slow  # 25-50 s on 2 cores; run with -m slow
@pytest.mark.timeout(280)
def test_coordinator_sigkill_during_checkpoints(data_dir, tmp_path):
    """A checkpoint every version of a ~1.6 M-parameter model, the coordinator SIGKILLed 5 times,
    at random moments and as soon as a checkpoint directory is being written: after each kill the newest checkpoint loads and verifies, is not older than
    the one before, and the restarted coordinator resumes from it; the same workers go on."""
    cfg = tiny_config(plan__max_tokens=0, model__n_layer=2, model__n_embd=256, model__n_head=4,
                      checkpoint__keep=2, eval__every_versions=1000)
    rng = random.Random(7)
    with Cluster(tmp_path, data_dir, cfg) as c:
        c.start_coordinator()
        workers = [c.start_worker(f"w{i}") for i in range(2)]
        last_version = 0
        mid_write = 0
        since = c.wait_status(lambda s: True, 30, "status")["model_version"]
        for kill in range(5):
            c.wait_status(lambda s: s["model_version"] >= since + 3, 90,
                          f"progress before kill {kill}", fail_if_dead=[c.coordinator, *workers])
            root = c.run_dir / "checkpoints"
            if kill % 2:  # aim: kill as soon as a checkpoint is being written
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not any(n.startswith(".tmp-ckpt-") for n in os.listdir(root)):
                    time.sleep(0.001)
            else:  # a random moment
                time.sleep(rng.uniform(0.0, 1.0))
            c.coordinator.kill()
            mid_write += any(p.name.startswith(".tmp-ckpt-") for p in root.iterdir())
            loaded = load_latest_checkpoint(root)  # raises if nothing verifies
            assert loaded is not None
            _, state, path = loaded
            assert state["version"] >= last_version, f"kill {kill}: checkpoint went back in time"
            last_version = state["version"]
            coord = c.restart_coordinator()
            c.wait_for(lambda: "resumed from" in coord.log(), 30, "the restarted coordinator to resume")
            m = re.search(r"resumed from (ckpt-\d+) at version (\d+)", coord.log())
            assert m and m.group(1) == path.name and int(m.group(2)) >= last_version, m and m.group(0)
            since = int(m.group(2))  # merges by the new coordinator count from here
        print(f"5 kills, {mid_write} with a checkpoint being written; last version {last_version}")
        c.wait_status(lambda s: s["model_version"] >= since + 3 and len(s["worker_list"]) == 2, 90,
                      "the same workers to go on", fail_if_dead=[c.coordinator, *workers])
        for w in workers:
            assert w.alive()
        c.coordinator.signal(signal.SIGTERM)
        assert c.wait_exit(c.coordinator, 20) == 0


# --------------------------------------------------------------------------- connection cut mid-stream


@pytest.mark.timeout(200)
def test_connection_cut_mid_stream_no_duplicate_merge(data_dir, tmp_path):
    """Two faults on the worker's connection through the proxy: (1) an upload cut half-way (the
    coordinator sees a truncated stream and changes nothing; the worker retries and the push goes
    through), (2) the reply to a complete upload dropped (the coordinator merged it; the worker's
    retry of the same push id gets ALREADY_EXISTS and treats it as accepted). Afterwards: the
    versions step by one per merge, merged tokens add up to exactly the budget, and the ledger
    refused nothing (a duplicate merge would re-commit tokens)."""
    budget = 40_960
    with Cluster(tmp_path, data_dir, tiny_config(plan__max_tokens=budget)) as c, Proxy(0) as proxy:
        coord = c.start_coordinator()
        proxy.target = ("127.0.0.1", c.port)
        w = c.start_worker("w0", target=proxy.address)
        c.wait_status(lambda s: (r := worker_row(s, "w0")) is not None and r["pushes"] >= 1, 90,
                      "a first push", fail_if_dead=[coord, w])
        proxy.cut_upload_after(40_000)
        assert proxy.cut_done.wait(30), "no upload to cut"
        c.wait_for(lambda: "retry" in w.log(), 30, "the worker to retry")
        proxy.cut_reply_to_upload()
        assert proxy.cut_done.wait(30), "no reply to drop"
        c.wait_for(lambda: "ALREADY_EXISTS" in coord.log(), 30, "the replayed push to be recognised")
        c.wait_for(lambda: (c.run_dir / "summary.json").exists(), 120, "the run to finish", fail_if_dead=[coord])
        assert c.wait_exit(w, 30) == 0
        assert c.wait_exit(coord, 30) == 0
        print("proxy cuts:", proxy.cuts, "connections:", proxy.connections)
        log = coord.log()
        assert len(proxy.cuts) == 2 and proxy.connections >= 3
        assert len(re.findall(r"PushDelta -> ALREADY_EXISTS", log)) == 1
        assert re.search(r"PushDelta failed \(UNAVAILABLE.*retry 1 in", w.log())
        merged = merges(log)
        assert [v for v, _, _ in merged] == list(range(2, 2 + len(merged)))
        assert sum(t for _, _, t in merged) == budget
        assert "dropping delta" not in log
        summary = c.summary()
        assert summary["model_version"] == 1 + len(merged) and summary["tokens"] == budget
        assert_budget_committed(c.run_dir, budget)


# --------------------------------------------------------------------------- straggler


@pytest.mark.slow  # 25-50 s on 2 cores; run with -m slow
@pytest.mark.timeout(200)
def test_sigstopped_straggler_never_blocks_others(data_dir, tmp_path):
    """Semi-sync with a 3 s timeout: one of three workers is SIGSTOPped. The others keep merging
    (semi-sync timeout, then the lease expiry drops it); after SIGCONT it rejoins and its pushes
    are merged again."""
    cfg = tiny_config(plan__max_tokens=0)
    with Cluster(tmp_path, data_dir, cfg) as c:
        coord = c.start_coordinator()
        ws = [c.start_worker(f"w{i}") for i in range(3)]
        c.wait_status(lambda s: len([w for w in s["worker_list"] if w["pushes"] >= 1]) == 3, 90,
                      "three pushing workers", fail_if_dead=[coord, *ws])
        straggler = ws[0]
        straggler.signal(signal.SIGSTOP)
        v0 = c.status()["model_version"]
        t0 = time.monotonic()
        c.wait_status(lambda s: s["model_version"] >= v0 + 5, 30, "progress without the straggler",
                      fail_if_dead=[coord])
        print(f"5 versions without the straggler in {time.monotonic() - t0:.1f}s")
        c.wait_for(lambda: "worker w0 dropped (no heartbeat" in coord.log(), 15, "the straggler's lease to expire")
        assert "semi-sync timeout: merging without" in coord.log()
        straggler.signal(signal.SIGCONT)
        c.wait_for(lambda: "rejoined as" in straggler.log(), 30, "the straggler to rejoin", fail_if_dead=[straggler])
        c.wait_status(lambda s: (r := worker_row(s, "w0")) is not None and r["merged_tokens"] > 0, 60,
                      "a merge from the straggler after it rejoined", fail_if_dead=[coord, straggler])
        assert all(w.alive() for w in ws)


# --------------------------------------------------------------------------- full disk


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _fill(path: Path) -> Path:
    """Fill the file system of `path` to the last byte."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.timeout(200)
def test_full_disk_at_checkpoint_time(data_dir, tmp_path):
    """The checkpoints directory is a 4 MB tmpfs; once a checkpoint exists it is filled to the
    last byte. Checkpoints then fail loudly, the old one stays the newest valid one, training goes
    on; once space is back, checkpoints resume."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    if not _mount_tmpfs(ckpts, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN) to simulate a full disk")
    try:
        with Cluster(tmp_path, data_dir, tiny_config(plan__max_tokens=0)) as c:
            coord = c.start_coordinator()
            ws = [c.start_worker(f"w{i}") for i in range(2)]
            c.wait_for(lambda: len(list_checkpoints(ckpts)) >= 1 and (ckpts / "latest").exists(), 90,
                       "a first checkpoint", fail_if_dead=[coord, *ws])
            time.sleep(0.5)
            filler = _fill(ckpts)
            mark = len(coord.log())
            kept, kept_path = checkpoint_state(run_dir)
            v0 = c.status()["model_version"]
            c.wait_for(lambda: "checkpoint failed, training goes on" in coord.log()[mark:], 30,
                       "a loud checkpoint failure", fail_if_dead=[coord])
            c.wait_status(lambda s: s["model_version"] >= v0 + 5, 60, "training to go on", fail_if_dead=[coord])
            state, path = checkpoint_state(run_dir)
            assert state["version"] <= v0 + 1 and state["version"] >= kept["version"], (state["version"], v0)
            assert "ERROR" in [line.split()[2] for line in coord.log()[mark:].splitlines()
                               if "checkpoint failed" in line][0]
            filler.unlink()
            c.wait_for(lambda: checkpoint_state(run_dir)[0]["version"] > v0 + 4, 30, "checkpoints to resume")
            coord.signal(signal.SIGTERM)
            assert c.wait_exit(coord, 20) == 0
            assert checkpoint_state(run_dir)[0]["version"] == c.summary()["model_version"]
    finally:
        subprocess.run(["umount", "-l", str(ckpts)], capture_output=True, timeout=10)


# --------------------------------------------------------------------------- corrupted checkpoint


@pytest.mark.timeout(150)
def test_corrupted_checkpoint_falls_back_to_previous(data_dir, tmp_path):
    cfg = tiny_config(plan__max_tokens=0, checkpoint__keep=3)
    with Cluster(tmp_path, data_dir, cfg) as c:
        coord = c.start_coordinator()
        w = c.start_worker("w0")
        c.wait_for(lambda: len(list_checkpoints(c.run_dir / "checkpoints")) >= 3, 90, "three checkpoints",
                   fail_if_dead=[coord, w])
        coord.kill()
        w.kill()
        newest_state, newest = checkpoint_state(c.run_dir)
        # A kill between a checkpoint's rename and the `latest` pointer's update leaves a newer,
        # uncommitted directory: the fallback goes to the newest one older than what latest names.
        older = [(step, p) for step, p in list_checkpoints(c.run_dir / "checkpoints") if p.name < newest.name]
        assert older, "no checkpoint older than the committed one"
        previous_step, previous = older[-1]
        model = newest / "model.safetensors"
        blob = bytearray(model.read_bytes())
        for i in range(len(blob) // 2, len(blob) // 2 + 16):
            blob[i] ^= 0xFF
        model.write_bytes(bytes(blob))
        coord2 = c.restart_coordinator()
        s = c.wait_status(lambda s: True, 30, "the restarted coordinator")
        log = coord2.log()
        assert f"checkpoint {newest} is unusable" in log and "sha256 mismatch" in log
        assert f"resuming from fallback checkpoint {previous}" in log
        m = re.search(rf"resumed from {previous.name} at version (\d+)", log)
        assert m and int(m.group(1)) >= previous_step, m and m.group(0)  # versions never go backwards
        assert s["model_version"] == int(m.group(1))
        coord2.signal(signal.SIGTERM)
        assert c.wait_exit(coord2, 20) == 0
