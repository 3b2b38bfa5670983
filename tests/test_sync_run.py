"""Real processes: workers with `--sync-group` form a sync group and train synchronously
(worker/group_runner.py); a member SIGKILLed mid-run leaves a survivor that trains on async.

Config: procs.TINY_CONFIG with the async merge policy (a rank > 0 never pushes while in the group,
so semi-sync would wait its timeout for it every round) and a small budget.
"""

from __future__ import annotations

import re
import signal

import pytest

from procs import Cluster, prepare_corpus, tiny_config

GROUP_RE = re.compile(r"sync group (\S+) \(epoch (\d+)\): rank (\d+) of (\d+)")
LEFT_RE = re.compile(r"sync group \S+: left after (\d+) steps \((\d+) on the leased tokens rank 0 planned, (\d+) on")
FAILURE_RE = re.compile(r"sync group \S+ \(epoch \d+\) rank (\d+): peer failure: .*; survivors (\[[\d, ]*\])")
COUNTS_RE = re.compile(r"; (\d+) rebases, (\d+) checksum rounds, (\d+) repairs\)")
IDENTICAL_RE = re.compile(r"sync group (\S+) rank (\d+): checksum round at step \d+: parameters identical to rank 0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus"), n_bytes=400_000)


def _config(budget: int, **changes):
    # Nesterov outer steps (the default): every merge moves rank 0's weights, which the members replay
    return tiny_config(plan__max_tokens=budget, train__max_iters=1600, merge__policy="async",
                       outer__kind="nesterov", outer__lr=0.8, outer__momentum=0.8, **changes)


def _ranks(c: Cluster, workers) -> dict[str, int]:
    out = {}
    for w in workers:
        m = GROUP_RE.findall(w.log())
        if m:
            out[w.name] = int(m[-1][2])
    return out


def test_two_workers_sync_group_train_and_finish(data_dir, tmp_path):
    _two_workers_train(data_dir, tmp_path, [])


@pytest.mark.slow
def test_two_workers_sync_group_sign_compression(data_dir, tmp_path):
    log = _two_workers_train(data_dir, tmp_path, ["--sync-compression", "sign"])
    assert "compression sign" in log


def _two_workers_train(data_dir, tmp_path, extra: list[str]) -> str:
    """2 workers in sync group g train to the budget; returns rank 1's log."""
    budget = 294_912  # 2304 steps of 4 x 32 tokens: enough that the group forms well before the end
    with Cluster(tmp_path, data_dir, _config(budget)) as c:
        coord = c.start_coordinator()
        workers = [c.start_worker(f"s{i}", extra=["--sync-group", "g", "--advertise-host", "127.0.0.1", *extra])
                   for i in range(2)]
        c.wait_for(lambda: len(_ranks(c, workers)) == 2, 40, "the sync group to form", fail_if_dead=[coord, *workers])
        c.wait_for(lambda: (c.run_dir / "summary.json").exists(), 90, "the run to finish", fail_if_dead=[coord])
        for w in workers:
            assert c.wait_exit(w, 60) == 0, f"{w.name} exited with {w.returncode}"
        assert c.wait_exit(coord, 30) == 0
        summary = c.summary()
        assert summary["state"] == "finished" and summary["tokens"] == budget
        ranks = _ranks(c, workers)
        assert sorted(ranks.values()) == [0, 1], ranks
        member = next(w for w in workers if ranks[w.name] == 1)
        log = member.log()
        # The first checksum round gives it rank 0's state, or finds it already identical (both
        # members entered before rank 0's first step: the seed's model on both).
        assert "took rank 0's state on entry" in log or re.search(r"parameters identical to rank 0 \(1 checks", log), log
        assert IDENTICAL_RE.search(log), "no checksum round with identical parameters on rank 1"
        rebases, checks, repairs = map(int, COUNTS_RE.findall(log)[-1])
        assert repairs == 0 and "parameters differed" not in log, (rebases, checks, repairs)
        assert checks >= 20 and rebases >= 10, (rebases, checks, repairs)  # rank 0's rebases, replayed
        for w in workers:  # the members trained on rank 0's leased ranges, accounted by the ledger
            steps, planned, unplanned = map(int, LEFT_RE.findall(w.log())[-1])
            assert steps > 100 and unplanned <= max(3, steps // 20), (w.name, steps, planned, unplanned)
        return log


@pytest.mark.parametrize("victim_rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_member_sigkill_survivor_finishes(data_dir, tmp_path, victim_rank):
    """SIGKILL one member of a group of 2 mid-run: the survivor reports the failure within one
    all-reduce deadline (never hangs), trains async and the run finishes with its whole budget."""
    budget = 196_608
    with Cluster(tmp_path, data_dir, _config(budget)) as c:
        coord = c.start_coordinator()
        workers = [c.start_worker(f"k{i}", extra=["--sync-group", "g", "--advertise-host", "127.0.0.1"]) for i in range(2)]
        c.wait_for(lambda: len(_ranks(c, workers)) == 2, 40, "the sync group to form", fail_if_dead=[coord, *workers])
        c.wait_for(lambda: any(IDENTICAL_RE.search(w.log()) for w in workers), 40, "a checksum round")
        ranks = _ranks(c, workers)
        victim = next(w for w in workers if ranks[w.name] == victim_rank)
        survivor = next(w for w in workers if w is not victim)
        victim.signal(signal.SIGKILL)
        # never hangs: the survivor's all-reduce fails past its deadline (far below this wait), it
        # names itself the only survivor and reports the failure
        c.wait_for(lambda: "peer failure" in survivor.log(), 40, "the survivor to see the failure",
                   fail_if_dead=[coord, survivor])
        failure = FAILURE_RE.search(survivor.log())
        assert failure, survivor.log()[-2000:]
        assert int(failure.group(1)) == 1 - victim_rank and failure.group(2) == f"[{1 - victim_rank}]", failure.group(0)
        c.wait_for(lambda: (c.run_dir / "summary.json").exists(), 120, "the run to finish", fail_if_dead=[coord])
        assert c.wait_exit(survivor, 60) == 0
        assert "training async" in survivor.log()
        summary = c.summary()
        assert summary["state"] == "finished" and summary["tokens"] == budget


def test_sync_step_metrics_feed_the_worker_metrics():
    from geotrain.common import metric_names as mn
    from geotrain.worker.metrics import WorkerMetrics
    from geotrain.worker.sync import SyncStepMetrics

    m = WorkerMetrics()
    assert b"geotrain_sync_" not in m.scrape()  # only workers in a sync group export them
    step = SyncStepMetrics(step=3, loss=2.0, step_seconds=0.05, allreduce_seconds=0.01, allreduce_bytes_sent=1000,
                           allreduce_bytes_received=1000, group_size=2, residual_norm=0.5, checked=False, repaired=False)
    m.observe_sync(step)
    m.observe_sync(step)
    import dataclasses

    m.observe_sync(dataclasses.replace(step, checked=True, repaired=True, allreduce_bytes_sent=0))
    text = m.scrape().decode()
    assert "geotrain_sync_repairs_total 1.0" in text  # only a repaired checksum round counts
    assert "geotrain_sync_allreduce_seconds_count 3.0" in text
    assert "geotrain_sync_allreduce_bytes_total 2000.0" in text
    assert "geotrain_sync_group_size 2.0" in text
    assert "geotrain_sync_residual_norm 0.5" in text
    families = {(metric.name, metric.type) for metric in m.registry.collect()}
    assert families <= {(s.name, s.kind) for s in mn.WORKER_METRICS}


def test_demo_sync_needs_a_power_of_two_workers():
    from geotrain.common.config import DemoConfig
    from geotrain.demo import run_demo

    for n in (1, 3, 6):
        with pytest.raises(ValueError, match="power of two"):
            run_demo(DemoConfig(workers=n, sync=True))
