"""The coordinator's resources: memory (bounded history, compressed pending deltas, the start-up
check), its locks (bookkeeping answered while the model lock is held), ports and metrics."""

from __future__ import annotations

import hashlib
import logging
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch

from geotrain.common.compression import decode_tensors, encode_tensors
from geotrain.common.config import EvalConfig
from geotrain.common.prepare import prepare
from geotrain.common.reader import TokenData
from geotrain.common.merge import fold_into, weighted_sum
from geotrain.coordinator.evaluation import Evaluator
from geotrain.coordinator.ledger import TrainedRange
from geotrain.coordinator.memory import check_fits, count_params, required_bytes
from geotrain.coordinator.server import CoordinatorServer
from geotrain.coordinator.state import CoordinatorState
from tests.test_coordinator import join, push, small_run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TokenData:
    root = tmp_path_factory.mktemp("data")
    (root / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 3000)
    prepare([root / "a.txt"], root / "tokens", progress=False)
    return TokenData(root / "tokens")


def rand_delta(state, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) * 1e-3 for n, t in state.global_params.items()}


# --------------------------------------------------------------------------- merge and memory


def test_folding_deltas_one_at_a_time_is_weighted_sum_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    deltas = [{"w": torch.randn(257, generator=g)} for _ in range(3)]
    deltas[0]["w"][:5] = -0.0  # signed zeros: 0 + (-0) is +0, so the fold must start from zeros
    deltas[1]["w"][:3] = -0.0
    deltas[2]["w"][:2] = -0.0
    factors, weights = [1.0, 0.37, 1.0], [0.3, 0.45, 0.25]
    expected = weighted_sum(deltas, factors, weights)["w"]
    acc = torch.zeros(257)
    for d, f, w in zip(deltas, factors, weights):
        fold_into(acc, d["w"], f, w)
    assert torch.equal(acc.view(torch.int32), expected.view(torch.int32))


def test_pending_deltas_are_kept_compressed_and_merged_exactly(data, tmp_path):
    state = CoordinatorState(small_run(merge__policy="semi-sync"), data, tmp_path)
    (a, ra), (b, rb) = join(state, "a"), join(state, "b")
    da, db = rand_delta(state, 1), rand_delta(state, 2)
    before = {n: t.clone() for n, t in state.global_params.items()}
    push(state, a, ra, da, "a1", scheme="sign")
    assert state.version == 1 and len(state.pending) == 1
    pending = state.pending[0]
    assert not any(isinstance(v, torch.Tensor) for v in vars(pending).values())  # no decoded copy held
    assert len(pending.blob) < 4 * state.num_params / 8
    push(state, b, rb, db, "b1", scheme="sign")
    assert state.version == 2
    # average, lr 1: the model moves by the token-weighted mean of the decoded deltas, exactly
    _, dec_a = encode_tensors(da, "sign")
    _, dec_b = encode_tensors(db, "sign")
    mean = weighted_sum([dec_a, dec_b], [1.0, 1.0], [0.5, 0.5])
    for n, t in state.global_params.items():
        assert torch.equal(t, before[n] + mean[n] * torch.tensor(1.0)), n


def test_downlink_history_is_bounded_by_bytes(data, tmp_path):
    state = CoordinatorState(small_run(workers__history_fraction=0.5), data, tmp_path)
    record, r = join(state)
    for i in range(4):  # "none" deltas: each one is the model's fp32 size
        ri = TrainedRange(r.unit_id, r.start + 8 * i, r.end, r.epoch)
        assert push(state, record, ri, rand_delta(state, i), f"p{i}", n_tokens=8).accepted
    assert state.version == 5
    assert state.history.bytes <= max(state.history.max_bytes, state.history[-1].held_bytes())
    assert len(state.history) == 1  # each record alone is over half the model
    assert state.model_reply(state.version - 2, False, 0.0).kind == "FULL"  # beyond the history
    assert state.model_reply(state.version - 1, False, 0.0).kind in ("UPDATES", "FULL")


def test_unbounded_fraction_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="history_fraction.*1.5"):
        CoordinatorState(small_run(workers__history_fraction=1.5), data, tmp_path)


def test_bookkeeping_is_answered_while_the_model_lock_is_held(data, tmp_path):
    """A merge, a full-model file, a checkpoint or an evaluation holds the model lock only:
    heartbeats, leases, status and pushes go on; the push merges once the lock is free."""
    state = CoordinatorState(small_run(), data, tmp_path)
    record, r = join(state)
    held, release, results = threading.Event(), threading.Event(), []

    def holder():
        with state.model_lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)

    def calls():
        results.append(state.heartbeat(record.worker_id, record.session_id, {}))
        results.append(state.lease(record.worker_id, record.session_id, "r2"))
        results.append(state.status()["model_version"])
        results.append(push(state, record, r, rand_delta(state, 0), "p1"))

    caller = threading.Thread(target=calls)
    caller.start()
    caller.join(20)
    alive = caller.is_alive()
    release.set()
    thread.join(10)
    caller.join(20)
    assert not alive, "a bookkeeping call waited for the model lock"
    assert results[0] == ("CONTINUE", 1) and results[2] == 1
    assert results[3].accepted and results[3].version == 1 and len(state.pending) == 1  # queued, not merged
    state.tick()  # the next tick merges it
    assert state.version == 2 and not state.pending


def test_evaluation_is_bounded_in_tokens_and_device_is_checked(data):
    model_config = small_run().model.build(vocab_size=data.vocab_size)  # block 16
    assert Evaluator(EvalConfig(iters=20, batch_size=4, max_tokens=128), model_config, data).batches(20) == 2
    assert Evaluator(EvalConfig(iters=20, batch_size=4, max_tokens=0), model_config, data).batches(20) == 20
    assert Evaluator(EvalConfig(iters=20, batch_size=4, max_tokens=1), model_config, data).batches(20) == 1
    with pytest.raises(ValueError, match="eval.device 'gpu9'"):
        Evaluator(EvalConfig(device="gpu9"), model_config, data)


# --------------------------------------------------------------------------- start-up memory check


def test_a_model_larger_than_the_host_is_refused_naming_both_sizes():
    run = small_run()
    params = count_params(run.model.build(vocab_size=257))
    check_fits(params, "nano", available=required_bytes(params))  # exactly fits
    with pytest.raises(ValueError, match=r"needs .* GiB .* has 0.0 GiB available"):
        check_fits(params, "nano", available=required_bytes(params) - 1)


def test_cli_refuses_a_model_larger_than_the_host(tmp_path):
    config = tmp_path / "huge.toml"
    config.write_text('[model]\npreset = "gpt2-xl"\nn_layer = 2000\n')  # ~60B parameters
    proc = subprocess.run(
        [sys.executable, "-m", "geotrain.coordinator.cli", "--config", str(config), "--run-dir", str(tmp_path / "run"),
         "--port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: model 'gpt2-xl'") and "GiB" in lines[-1] and "available" in lines[-1], proc.stderr


# --------------------------------------------------------------------------- ports and metrics


def taken_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_a_taken_default_port_is_replaced_with_a_log_line(data, tmp_path, caplog):
    grpc_sock, metrics_sock = taken_port(), taken_port()
    grpc_port, metrics_port = grpc_sock.getsockname()[1], metrics_sock.getsockname()[1]
    srv = CoordinatorServer(small_run(), data, tmp_path / "run", host="127.0.0.1", port=grpc_port,
                            metrics_port=metrics_port, port_explicit=False, metrics_port_explicit=False)
    try:
        with caplog.at_level(logging.WARNING):
            bound = srv.start()
        assert bound not in (0, grpc_port) and srv.metrics_port not in (0, metrics_port)
        assert f"default port {grpc_port} is taken: gRPC listens on port {bound}" in caplog.text
        assert f"default metrics port {metrics_port} is taken: metrics on port {srv.metrics_port}" in caplog.text
        urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5).read()
    finally:
        srv.server.stop(0)
        srv.metrics.http_server.shutdown()
        grpc_sock.close()
        metrics_sock.close()


def test_a_taken_explicit_port_is_an_error_naming_port_and_flag(data, tmp_path):
    sock = taken_port()
    port = sock.getsockname()[1]
    try:
        srv = CoordinatorServer(small_run(), data, tmp_path / "run", host="127.0.0.1", port=port)
        with pytest.raises(OSError, match=f"port {port} \\(--port\\) is taken"):
            srv.start()
        srv = CoordinatorServer(small_run(), data, tmp_path / "run2", host="127.0.0.1", port=0, metrics_port=port)
        with pytest.raises(OSError, match=f"port {port} \\(--metrics-port\\) is taken"):
            srv.start()
        proc = subprocess.run(
            [sys.executable, "-m", "geotrain.coordinator.cli", "--run-dir", str(tmp_path / "run3"), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", "0"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: port {port} (--port) is taken"
    finally:
        sock.close()


def test_labelled_metrics_are_exported_at_zero_from_the_start(data, tmp_path):
    sock = taken_port()
    port = sock.getsockname()[1]
    sock.close()  # a free port for the metrics endpoint
    srv = CoordinatorServer(small_run(), data, tmp_path / "run", host="127.0.0.1", port=0, metrics_port=port)
    try:
        srv.start()
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5).read().decode()
    finally:
        srv.server.stop(0)
        srv.metrics.http_server.shutdown()
    for result in ("accepted", "stale", "invalid", "duplicate"):
        assert f'geotrain_deltas_total{{result="{result}"}} 0.0' in text, result
    units = len(srv.state.ledger.units)
    assert f'geotrain_shards{{state="pending"}} {float(units)}' in text
    assert 'geotrain_shards{state="leased"} 0.0' in text and 'geotrain_shards{state="done"} 0.0' in text


def test_cli_eval_device_is_checked_with_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from geotrain.coordinator.cli import main

    result = CliRunner().invoke(main, ["--run-dir", str(tmp_path / "run"), "--port", "0", "--metrics-port", "0",
                                       "--eval-device", "gpu9"])
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.output.strip().splitlines()[-1].startswith("error: eval.device 'gpu9' is not a torch device")


@pytest.mark.slow  # ~30 s on 2 cores: two processes, each importing torch
def test_coordinator_scale_benchmark_smoke(tmp_path):
    import json
    from pathlib import Path

    out = tmp_path / "scale.json"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/coordinator_scale.py", "--model", "nano", "--workers", "2",
                           "--rounds", "2", "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["merges"] == 2 and r["versions"] == 3 and r["params"] > 0
    assert r["peak_rss_bytes"] >= r["steady_rss_bytes"] > 0 and r["heartbeats"] > 0
    for key in ("heartbeat_p50_seconds", "heartbeat_p99_seconds", "merge_seconds", "serve_seconds", "checkpoint_seconds"):
        assert r[key] > 0, key
    assert set(r["phases"]) == {"idle", "merge", "checkpoint", "serve"}
    assert "peak RSS" in proc.stdout


def test_full_model_replies_stream_their_version_from_a_file(data, tmp_path):
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "model-00000007.bin").write_bytes(b"left by a previous process")
    state = CoordinatorState(small_run(), data, tmp_path)
    assert not (tmp_path / "serve" / "model-00000007.bin").exists()
    record, r = join(state)
    first = state.model_reply(0, True, 0.0)
    assert first.kind == "FULL" and first.version == 1 and first.file is not None
    push(state, record, r, rand_delta(state, 0), "p1")
    second = state.model_reply(0, True, 0.0)  # version 2 replaces the file of version 1 on disk
    assert second.version == 2 and sorted(p.name for p in (tmp_path / "serve").iterdir()) == ["model-00000002.bin"]
    one = decode_tensors(first.blob, state.spec)  # the open reply still streams version 1
    two = decode_tensors(second.blob, state.spec)
    assert first.total_bytes == len(first.blob) and first.sha256 == hashlib.sha256(first.blob).hexdigest()
    assert any(not torch.equal(one[n], two[n]) for n in state.spec)
    assert all(torch.equal(two[n], t) for n, t in state.global_params.items())
    first.close()
    second.close()
