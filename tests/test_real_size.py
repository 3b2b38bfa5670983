"""An async run at the GPT-2 small shape (124M parameters) on CPU, with real processes.

The model is the `gpt2` preset (12 layers, 12 heads, 768 wide) over a byte-tokenized corpus whose
vocabulary is padded to GPT-2's 50257 ids, so the tied embedding has GPT-2's size: 123.7M
parameters with a 64-token context (GPT-2's 1024 positions would add 0.74M); a second case keeps
only its first 2 blocks (52.8M) for machines with less memory. Workers train batches
of 1 x 64 tokens, 2 steps a round, and push 1-bit (sign) deltas; merges are async, the outer
optimizer is the default Nesterov (the coordinator and every worker hold its momentum), and the
coordinator checkpoints every 3 versions.

The run: a first worker rebuilds version 1 from the seed; a late one joins at version >= 4, when
the coordinator keeps too few updates to catch it up, so it downloads the global model (the
fp32 weights, zstd-compressed, and the outer momentum); once its delta has merged, the coordinator is SIGKILLed,
restarted from its newest checkpoint (the merges after it are lost with the crash), the same
worker processes rejoin, download the restored model and train to the token budget: the ranges
of the lost merges are trained again, every token of the budget is merged exactly once.

While it runs, every process's peak resident set (VmHWM) is sampled and printed as a table,
relative to the fp32 weights (4 bytes x parameters), and written to memory.json beside the logs.
"""

from __future__ import annotations

import json
import re

import pytest

from geotrain.common.prepare import prepare
from procs import Cluster, MemoryWatch, checkpoint_state, english_like_text, joins, merges

GPT2_VOCAB = 50257
BLOCK = 64
ROUND_STEPS = 2
ROUND_TOKENS = ROUND_STEPS * BLOCK  # batch 1
UNIT = 4 * ROUND_TOKENS  # 512 tokens per lease
# A worker trains on while its push merges, so under load a delta carries up to ~8 steps (512
# tokens) and ~3000 tokens are merged before the late worker's first delta: the budget leaves
# room for that and for several merges after the restart.
BUDGET = 14 * UNIT  # 7168 tokens
MB = 1e6
# (n_layer, parameters with vocab 50257 padded to 50304 and block 64, the tied embedding counted once): GPT-2
# small, and its first 2 blocks (the same embedding, width and per-block shapes) for machines with
# less memory.
SHAPES = {"124M": (12, 123_738_624), "53M-2-layers": (2, 52_859_904)}
# Peak resident sets measured on CPU (README, Real sizes): each worker 12-14x the fp32 weights, the
# restarted coordinator ~8x, at the same time: a run needs 30x free (14.8 GB at 124M, 6.3 GB for
# 2 blocks) and skips on a machine with less.
NEEDED_X_FP32 = 30

REAL_SIZE_CONFIG = {
    "model": {"preset": "gpt2", "block_size": BLOCK},
    "optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_iters": 5},
    "train": {"batch_size": 1, "max_iters": 1000, "seed": 1337},
    "round": {"steps": ROUND_STEPS},
    "merge": {"policy": "async"},
    "outer": {"kind": "nesterov", "lr": 0.8, "momentum": 0.8},
    "compression": {"scheme": "sign"},
    "plan": {"unit_tokens": UNIT, "max_tokens": BUDGET},
    "eval": {"iters": 1, "every_versions": 1000, "batch_size": 1},
    "checkpoint": {"every_versions": 3, "every_seconds": 3600.0, "keep": 2},
    # A step takes seconds on a shared core: leases long enough that load never drops a worker.
    # One update kept for catching up (at least two per live worker are): a worker that joins at
    # version >= 4 cannot rebuild it from the seed plus updates and downloads the model.
    "workers": {"heartbeat_seconds": 1.0, "lease_seconds": 120.0, "history_versions": 1},
}


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "corpus.txt").write_text(english_like_text(120_000, seed=3))
    prepare([root / "corpus.txt"], root / "tokens", vocab_size=GPT2_VOCAB, progress=False, workers=1)
    return root / "tokens"


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where there is no /proc)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker_row(status: dict, name: str) -> dict | None:
    return next((w for w in status["worker_list"] if w["name"] == name), None)


def newest_checkpoint_version(run_dir) -> int:
    """Version of the newest checkpoint directory that has been committed (`latest` names it)."""
    try:
        return int(json.loads((run_dir / "checkpoints" / "latest").read_text())["step"])
    except (OSError, ValueError, KeyError):  # none yet, or being replaced
        return 0


@pytest.mark.slow  # 10-15 minutes on 2 cores shared with other work (load average ~16)
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gpt2_size_async_run_survives_a_coordinator_kill(gpt2_data, tmp_path, shape):
    n_layer, params = SHAPES[shape]
    fp32_bytes = 4 * params
    if available_memory() < NEEDED_X_FP32 * fp32_bytes:
        pytest.skip(f"a {shape} run needs {NEEDED_X_FP32 * fp32_bytes / 1e9:.1f} GB of available memory "
                    f"(3 processes of 12-18x the fp32 weights), this machine has {available_memory() / 1e9:.1f} GB")
    config = {**REAL_SIZE_CONFIG, "model": {**REAL_SIZE_CONFIG["model"], "n_layer": n_layer}}
    with Cluster(tmp_path, gpt2_data, config) as c, MemoryWatch(c) as mem:
        coord = c.start_coordinator()
        early = c.start_worker("early")

        # 1. the first worker rebuilds version 1 from the seed and merges alone for 3 versions
        s = c.wait_status(lambda s: s["model_version"] >= 4, 600, "version 4 from the first worker",
                          fail_if_dead=[coord, early])
        assert s["params"] == params, s["params"]
        assert "initial model rebuilt from the seed (checksum verified)" in early.log(), early.tail()

        # 2. a late joiner: the updates since version 1 are no longer kept, so it downloads the model
        late = c.start_worker("late")
        s = c.wait_status(lambda s: (r := worker_row(s, "late")) is not None and r["merged_tokens"] > 0,
                          900, "a merged delta from the late worker", fail_if_dead=[coord, early, late])
        late_join = [v for name, _, v in joins(coord.log()) if name == "late"]
        assert late_join and late_join[0] >= 4, late_join
        assert "initial model rebuilt" not in late.log(), late.tail()
        row = worker_row(s, "late")
        # the whole model arrived: zstd-compressed fp32 weights take ~3.7 bytes a parameter (with the
        # outer momentum after them), where the 1-bit updates since version 1 would be ~0.13 each
        assert row["stats"]["received_bytes"] >= 0.8 * fp32_bytes, row["stats"]

        # 3. SIGKILL once a checkpoint exists: merges after it (the late worker's among them, when
        # it came after the newest checkpoint) are lost with the crash, their ranges trained again
        c.wait_for(lambda: newest_checkpoint_version(c.run_dir) >= 4, 600, "a checkpoint",
                   fail_if_dead=[coord, early, late])
        mem.sample()
        coord.kill()
        ckpt, path = checkpoint_state(c.run_dir)
        assert 0 < ckpt["ledger"]["committed_total"] < BUDGET, "the budget was spent before the kill"
        merged_before = merges(coord.log())
        assert [v for v, _, _ in merged_before] == list(range(2, 2 + len(merged_before)))
        assert ckpt["version"] <= merged_before[-1][0]

        # 4. restart from that checkpoint; the same worker processes rejoin and train to the budget
        coord2 = c.restart_coordinator()
        c.wait_for(lambda: "resumed from" in coord2.log(), 300, "the restarted coordinator to resume",
                   fail_if_dead=[coord2])
        m = re.search(r"resumed from (ckpt-\d+) at version (\d+) \((\d+) tokens merged\)", coord2.log())
        assert m and m.group(1) == path.name, coord2.tail()
        resumed_version, resumed_tokens = int(m.group(2)), int(m.group(3))
        assert resumed_tokens == ckpt["ledger"]["committed_total"]
        # versions never go back nor repeat: the restored model is numbered after the last one published
        last = merged_before[-1][0]
        assert resumed_version == (ckpt["version"] if last == ckpt["version"] else last + 1), (resumed_version, ckpt["version"], last)
        c.wait_for(lambda: (c.run_dir / "summary.json").exists(), 1500, "the run to reach its token budget",
                   fail_if_dead=[coord2])
        for w in (early, late):
            assert c.wait_exit(w, 120) == 0, f"{w.name} exited with {w.returncode}"
        assert c.wait_exit(coord2, 120) == 0

        # versions went on from the checkpoint, one per merge, and the merges after the restart
        # add exactly the tokens the checkpoint lacked
        after = merges(coord2.log())
        assert after and [v for v, _, _ in after] == list(range(resumed_version + 1, resumed_version + 1 + len(after)))
        assert resumed_tokens + sum(t for _, _, t in after) == BUDGET
        summary = c.summary()
        assert summary["run_id"] == ckpt["run_id"] and summary["tokens"] == BUDGET
        # the finished run's last version drops the outer Nesterov lookahead
        assert summary["model_version"] == after[-1][0] + 1
        assert f"version {after[-1][0] + 1}: final model without the outer Nesterov lookahead" in coord2.log()
        assert {name for name, _, _ in joins(coord2.log())} == {"early", "late"}
        for w in (early, late):
            log = w.log()
            assert "rejoined as" in log, f"{w.name} never rejoined"
            assert "checksum" not in log.split("rejoined as", 1)[1], log[-3000:]  # every version verified
        # the final checkpoint's ledger: the budget committed once, one prefix per unit, nothing held
        final, _ = checkpoint_state(c.run_dir)
        assert final["version"] == summary["model_version"]
        ledger = final["ledger"]
        assert ledger["committed_total"] == BUDGET and ledger["epoch"] == 0
        assert sum(u["committed"] - u["start"] for u in ledger["units"]) == BUDGET
        assert not any(u["holder"] for u in ledger["units"])

    peaks = mem.peaks()
    report = {name: {"peak_rss_bytes": v, "x_fp32_weights": v / fp32_bytes} for name, v in sorted(peaks.items())}
    (tmp_path / "memory.json").write_text(json.dumps({"shape": shape, "params": params, "fp32_bytes": fp32_bytes,
                                                      "processes": report}, indent=2))
    print(f"\npeak resident set (VmHWM), {params / 1e6:.1f}M parameters, fp32 weights {fp32_bytes / MB:.0f} MB")
    print(f"{'process':<16}{'peak MB':>10}{'x fp32':>9}")
    for name, r in report.items():
        print(f"{name:<16}{r['peak_rss_bytes'] / MB:>10.0f}{r['x_fp32_weights']:>9.2f}")
    print(f"written to {tmp_path / 'memory.json'}")
    assert {"coordinator", "coordinator.1", "early", "late"} <= set(peaks), peaks
