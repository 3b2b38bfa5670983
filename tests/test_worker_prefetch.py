"""The async worker with its batch prefetch on (worker/shards.py LeaseBatches; the default on
CUDA, forced here on the CPU) trains a whole run against a real coordinator process: every push
is merged (a range that did not continue the coordinator's cursor would be refused) and the
run's token budget is reached."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from procs import Cluster, prepare_corpus, tiny_config

from geotrain.common.config import WorkerConfig
from geotrain.worker.runner import WorkerRunner


@pytest.mark.timeout(180)
def test_a_worker_with_batch_prefetch_trains_every_token_of_its_leases_once(tmp_path, caplog):
    data_dir = prepare_corpus(tmp_path / "corpus", n_bytes=60_000)
    budget = 8192
    cfg = tiny_config(plan__max_tokens=budget, round__steps=4)
    torch.set_num_threads(1)
    with Cluster(tmp_path, data_dir, cfg) as c, caplog.at_level(logging.INFO, logger="geotrain.worker"):
        c.start_coordinator()
        runner = WorkerRunner(WorkerConfig(coordinator=c.target, name="pf", device="cpu", threads=1, metrics_port=0,
                                           cache_dir=str(tmp_path / "cache"), serve=False, summary_seconds=1.0,
                                           finish_patience=20.0))
        runner.prefetch_batches = True
        result: list = []
        t = threading.Thread(target=lambda: result.append(runner.run()), daemon=True)
        t.start()
        t.join(150)
        if t.is_alive():
            runner.stop()
            t.join(30)
        assert result == [0]
        assert runner.batches is not None  # the prefetch was on
        s = runner.stats.snapshot()
        assert s.tokens >= budget and s.merged >= 1 and s.stale == 0
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "refused" not in text, text[-3000:]
        status = c.status()
        assert status is not None and status["tokens"] >= budget  # committed by the ledger, range by range
