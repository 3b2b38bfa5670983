"""CompressedAllReduce: exact mean (fp32), bit-identical results (1-bit), error feedback, validation,
and a member killed mid-all-reduce (real processes)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from geotrain.protos import rpc
from geotrain.worker.allreduce import CompressedAllReduce, PeerFailure
from groups import run_all, start_group, stop_group


def grads(rank: int, step: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {
        "w": torch.randn(33, 17, generator=g) * scale,
        "b": torch.randn(5, generator=g) * scale,
        "emb": torch.randn(300, 8, generator=g) * scale,
    }


def exact_mean(n: int, step: int = 0) -> dict[str, torch.Tensor]:
    per_rank = [grads(r, step) for r in range(n)]
    return {k: torch.stack([g[k] for g in per_rank]).mean(0) for k in per_rank[0]}


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("algorithm", ["halving", "doubling", "allgather", "scatter"])
def test_fp32_allreduce_is_exact_mean(n, algorithm):
    members, servers = start_group(n, compression="none", algorithm=algorithm, min_deadline_s=10)
    try:
        results = run_all(members, lambda r, m: m.allreduce(grads(r), step=1))
        want = exact_mean(n)
        for out in results:
            assert set(out) == set(want)
            for k in want:
                assert out[k].shape == want[k].shape and out[k].dtype == torch.float32
                torch.testing.assert_close(out[k], want[k], rtol=1e-6, atol=1e-6)
        for k in want:  # bit-identical across members even in fp32
            assert all(torch.equal(results[0][k], o[k]) for o in results[1:])
        for m in members:
            assert m.last.bytes_sent > 0 and m.last.bytes_received > 0 and m.last.seconds > 0
    finally:
        stop_group(members, servers)


@pytest.mark.parametrize("n", [2, 4])
def test_int8_allreduce_is_close_to_the_mean_and_bit_identical(n):
    """int8 (the warmup steps of 1-bit sync): within half a quantization step per level of the
    exact mean, the same bytes decoded on every member, error feedback kept, 4x fewer bytes than
    fp32 (+ one scale per chunk and headers)."""
    members, servers = start_group(n, compression="int8", chunk=64)
    fp32, fp32_servers = start_group(n, compression="none")
    try:
        results = run_all(members, lambda r, m: m.allreduce(grads(r), step=1))
        run_all(fp32, lambda r, m: m.allreduce(grads(r), step=1))
        want = exact_mean(n)
        for k in want:
            assert all(torch.equal(results[0][k], o[k]) for o in results[1:]), k
            err = float((results[0][k] - want[k]).abs().max())
            assert 0 < err < 0.05 * float(want[k].abs().max()) * n, (k, err)
        assert members[0].residual_norm() > 0
        assert members[0].last.bytes_sent < 0.35 * fp32[0].last.bytes_sent
    finally:
        stop_group(members, servers)
        stop_group(fp32, fp32_servers)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("algorithm", ["halving", "doubling", "allgather", "scatter", "count"])
def test_sign_allreduce_bit_identical_and_close(n, algorithm):
    members, servers = start_group(n, compression="sign", algorithm=algorithm)
    try:
        for step in (1, 2, 3):
            results = run_all(members, lambda r, m: m.allreduce(grads(r, step), step=step))
            for k in results[0]:
                for other in results[1:]:
                    assert torch.equal(results[0][k], other[k]), f"{k} differs across members"
            want = exact_mean(n, step)
            got = torch.cat([results[0][k].flatten() for k in sorted(want)])
            ref = torch.cat([want[k].flatten() for k in sorted(want)])
            cos = torch.nn.functional.cosine_similarity(got, ref, dim=0)  # 1-bit: same direction
            # step 1 is plain 1-bit; later steps also carry earlier residuals (error feedback)
            assert cos > (0.5 if step == 1 else 0.2), (step, float(cos))
        fp32_bytes = 4 * sum(t.numel() for t in grads(0).values())
        assert members[0].last.bytes_sent < fp32_bytes / 2  # tiny tensors: scales + headers dominate
        assert members[0].residual_norm() > 0
    finally:
        stop_group(members, servers)


@pytest.mark.parametrize("n", [4, 8])
def test_allgather_quantizes_each_members_own_buffer_once(n):
    """allgather = the mean of every member's own 1-bit encoding, decoded (no sum is ever
    re-quantized), in rank order; each member sends (N - 1) encoded buffers."""
    from geotrain.common.compression import get_codec

    members, servers = start_group(n, compression="sign", algorithm="allgather", chunk=64)
    try:
        results = run_all(members, lambda r, m: m.allreduce(grads(r, 1), step=1))
        codec = get_codec("sign", chunk=64, sign_scale=members[0].sign_scale)
        layout = members[0]._layout
        decoded = [codec.decode(codec.encode(layout.flatten(grads(r, 1), n))[0], (n * layout.block,)) for r in range(n)]
        acc = decoded[0].clone()
        for d in decoded[1:]:
            acc.add_(d)
        want = layout.unflatten(acc.div_(n), grads(0, 1))
        for k in want:
            assert all(torch.equal(out[k], want[k]) for out in results), k
        payload = len(codec.encode(layout.flatten(grads(0, 1), n))[0])
        sent = members[0].last.bytes_sent
        assert (n - 1) * payload <= sent < (n - 1) * payload + 2048 * n  # + headers
    finally:
        stop_group(members, servers)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_scatter_sums_members_own_blocks_exactly_then_quantizes_the_mean_once(n):
    """scatter: the owner of block b sums every member's own 1-bit encoding of b exactly (rank
    order), encodes the mean once, ternary; everyone decodes those bytes. Bytes sent per member:
    log2(N)/2 1-bit buffers + (N-1)/N ternary ones."""
    from geotrain.common.compression import get_codec

    members, servers = start_group(n, compression="sign", algorithm="scatter", chunk=64)
    try:
        results = run_all(members, lambda r, m: m.allreduce(grads(r, 1), step=1))
        codec, ternary = get_codec("sign", chunk=64, sign_scale="rms"), get_codec("ternary", chunk=64)
        layout = members[0]._layout
        B = layout.block

        def enc(x):
            return codec.encode(x.contiguous())[0]

        blocks = []
        for b in range(n):
            acc = None
            for r in range(n):
                own = codec.decode(enc(layout.flatten(grads(r, 1), n)[b * B : (b + 1) * B]), (B,))
                acc = own.clone() if acc is None else acc.add_(own)
            blocks.append(ternary.decode(ternary.encode(acc.div_(n))[0], (B,)))
        want = layout.unflatten(torch.cat(blocks), grads(0, 1))
        for k in want:
            assert all(torch.equal(out[k], want[k]) for out in results), k
        assert any(bool((b == 0).any()) for b in blocks)  # means that cancel stay 0
        block_payload, mean_payload = len(enc(torch.zeros(B))), len(ternary.encode(torch.zeros(B))[0])
        levels = n.bit_length() - 1
        expected = levels * n // 2 * block_payload + (n - 1) * mean_payload
        sent = members[0].last.bytes_sent
        assert expected <= sent < expected + 2048 * n, (sent, expected)
    finally:
        stop_group(members, servers)


@pytest.mark.parametrize("n,sign_scale", [(2, "rms"), (4, "rms"), (8, "rms"), (4, "mean_abs")])
def test_count_sums_own_signs_on_shared_scales_exactly(n, sign_scale):
    """count: every member quantizes its own buffer to sign x the group's shared chunk scale (the
    scale code of the mean of the members' scale codes: sqrt(mean value^2) by default, or mean
    |value|); the mean is the exact sum of those
    over members / N, identical on every member; the residual is y - shared scale x sign. Bytes:
    (N-1) x (sign bits + one code per chunk) up, (N-1) x (codes + zstd agree counts) back."""
    from geotrain.common.counts import packed_size, scale_codes, scales_from_codes

    C = 64
    members, servers = start_group(n, compression="sign", algorithm="count", chunk=C, sign_scale=sign_scale)
    try:
        results = run_all(members, lambda r, m: m.allreduce(grads(r, 1), step=1))
        layout = members[0]._layout
        flats = [layout.flatten(grads(r, 1), n) for r in range(n)]
        rule = (lambda f: f.pow(2).mean(dim=1).sqrt()) if sign_scale == "rms" else (lambda f: f.abs().mean(dim=1))
        own = [scales_from_codes(scale_codes(rule(f.view(-1, C)).numpy())) for f in flats]
        shared = torch.from_numpy(scales_from_codes(scale_codes(np.mean(own, axis=0, dtype=np.float64))))
        shared = shared.repeat_interleave(C)
        contributions = [torch.where(torch.signbit(f), -shared, shared) for f in flats]
        want = layout.unflatten(torch.stack(contributions).sum(0).div_(n), grads(0, 1))
        for k in want:
            assert all(torch.equal(out[k], results[0][k]) for out in results), k  # bit-identical
            torch.testing.assert_close(results[0][k], want[k], rtol=1e-6, atol=1e-7)
        for r, m in enumerate(members):  # error feedback: what the sign and shared scale dropped
            torch.testing.assert_close(m._feedback.residual("own", flats[r]), flats[r] - contributions[r])
        B = layout.block
        up = (n - 1) * (-(-B // 8) + B // C)
        sent = members[0].last.bytes_sent
        assert up + (n - 1) * B // C < sent < up + (n - 1) * (B // C + packed_size(B, n - 1) + 64) + 512 * n, sent
    finally:
        stop_group(members, servers)


def test_count_refuses_a_garbled_count_payload(monkeypatch):
    """A member whose all-gather message does not decode raises PeerFailure naming it, and its
    error feedback is not committed (the call failed)."""
    import geotrain.worker.allreduce as allreduce_module

    members, servers = start_group(2, compression="sign", algorithm="count", chunk=64, deadline_s=3.0)
    real = allreduce_module.encode_counts

    def garbled(counts, maxval):
        payload = real(counts, maxval)
        return payload[:-4] + b"\0\0\0\0" if threading.current_thread().name.startswith("garble") else payload

    monkeypatch.setattr(allreduce_module, "encode_counts", garbled)
    try:
        def fn(r, m):
            threading.current_thread().name = "garble" if r == 1 else "clean"
            try:
                return m.allreduce(grads(r, 1), step=1)
            except PeerFailure as exc:
                return exc

        out = run_all(members, fn)
        assert isinstance(out[0], PeerFailure) and "count all-gather message unusable" in str(out[0]), out[0]
        assert out[0].rank == 1
        flat = members[0]._layout.flatten(grads(0, 1), 2)
        assert float(members[0]._feedback.residual("own", flat).abs().sum()) == 0.0
    finally:
        stop_group(members, servers)


def test_count_needs_sign_compression():
    with pytest.raises(ValueError, match="count"):
        CompressedAllReduce(0, 2, ["a:1", "b:1"], compression="none", algorithm="count")
    for n, compression, auto in ((4, "sign", "count"), (8, "sign", "count"), (4, "none", "halving"), (2, "sign", "doubling")):
        with CompressedAllReduce(0, n, ["a:1"] * n, compression=compression) as ar:
            assert ar.algorithm == auto, (n, compression, ar.algorithm)


@pytest.mark.parametrize("n", [2, 4])
def test_error_feedback_tracks_true_sum(n):
    """Summed over steps, 1-bit all-reduced values follow the summed true means: the gap stays
    bounded by the residuals instead of growing with the number of steps."""
    members, servers = start_group(n, compression="sign")
    try:
        steps = 40
        got_sum = {k: torch.zeros_like(v) for k, v in grads(0).items()}
        true_sum = {k: torch.zeros_like(v) for k, v in grads(0).items()}
        one_step_err = None
        for step in range(1, steps + 1):
            # a persistent signal plus noise, like gradients
            def fn(r, m):
                g = grads(r, step)
                return m.allreduce({k: v + 0.5 * (k == "w") for k, v in g.items()}, step=step)

            out = run_all(members, fn)[0]
            mean = {k: v + 0.5 * (k == "w") for k, v in exact_mean(n, step).items()}
            for k in got_sum:
                got_sum[k] += out[k]
                true_sum[k] += mean[k]
            if step == 1:
                one_step_err = sum(float((out[k] - mean[k]).norm()) for k in out)
        gap = sum(float((got_sum[k] - true_sum[k]).norm()) for k in got_sum)
        total = sum(float(true_sum[k].norm()) for k in got_sum)
        # without feedback the gap grows ~ sqrt(steps) x one-step error; with it, it stays O(1)
        assert gap < 2.5 * one_step_err, (gap, one_step_err)
        assert gap / total < 0.25, gap / total
    finally:
        stop_group(members, servers)


@pytest.mark.parametrize("n,algorithm", [(2, "doubling"), (4, "halving"), (8, "halving"), (4, "doubling"), (4, "allgather"),
                                                 (4, "scatter"), (8, "scatter"), (4, "count"), (8, "count")])
def test_rank0_batch_plan_reaches_every_member(n, algorithm):
    """Rank 0's BatchPlan rides the all-reduce headers: every member holds it after the call, and
    a call without one leaves every member's last_plan None."""
    from geotrain.protos import peer_pb2

    members, servers = start_group(n, compression="sign", algorithm=algorithm)
    try:
        plan = peer_pb2.BatchPlan(shard="train-000", epoch=2, first_slot=96, sequences=8 * n)
        got = run_all(members, lambda r, m: (m.allreduce(grads(r), step=1, plan=plan if r == 0 else None), m.last_plan)[1])
        assert all(p == plan for p in got), got
        got = run_all(members, lambda r, m: (m.allreduce(grads(r, 1), step=2), m.last_plan)[1])
        assert got == [None] * n
        with pytest.raises(ValueError, match="only rank 0"):
            members[1].allreduce(grads(1), step=3, plan=plan)
    finally:
        stop_group(members, servers)


def test_world_size_must_be_power_of_two():
    for bad in (3, 6, 0):
        with pytest.raises(ValueError, match="world_size"):
            CompressedAllReduce(0, bad, ["127.0.0.1:1"] * max(bad, 1))
    with pytest.raises(ValueError, match="rank"):
        CompressedAllReduce(2, 2, ["a:1", "b:1"])
    with pytest.raises(ValueError, match="compression"):
        CompressedAllReduce(0, 2, ["a:1", "b:1"], compression="int3")
    with pytest.raises(ValueError, match="sign_scale must be one of .* got 'max'"):
        CompressedAllReduce(0, 2, ["a:1", "b:1"], sign_scale="max")
    with pytest.raises(ValueError, match="peers"):
        CompressedAllReduce(0, 2, ["a:1"])


def test_step_must_increase_and_single_member():
    with CompressedAllReduce(0, 1, ["127.0.0.1:1"], compression="none") as solo:
        out = solo.allreduce(grads(0), step=5)
        torch.testing.assert_close(out["w"], grads(0)["w"])
        with pytest.raises(ValueError, match="step"):
            solo.allreduce(grads(0), step=5)


def test_missing_partner_raises_within_deadline():
    """A partner that never answers: PeerFailure after about one deadline, not a hang."""
    with socket.socket() as s:  # a port nobody serves
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    members, servers = start_group(1)
    server = servers[0]
    member = CompressedAllReduce(0, 2, [members[0].peers[0], dead], group_id="g2", deadline_s=1.5)
    member.add_to_server(server)
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerFailure) as info:
            member.allreduce(grads(0), step=1)
        assert time.monotonic() - t0 < 1.5 + 2 * 2.0 + 1.0  # deadline + status probe + slack
        assert info.value.rank == 1 and info.value.survivors == [0]
    finally:
        member.close()
        stop_group(members, servers)


# --------------------------------------------------------------------------- a member killed


def _member_main(rank: int, n: int, ports: list[int], queue, deadline_s: float) -> None:
    """One member process: serve, then all-reduce forever; report PeerFailure on the queue."""
    torch.set_num_threads(1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=rpc.server_options())
    server.add_insecure_port(f"127.0.0.1:{ports[rank]}")
    member = CompressedAllReduce(rank, n, [f"127.0.0.1:{p}" for p in ports], deadline_s=deadline_s)
    member.add_to_server(server)
    server.start()
    step = 0
    try:
        while True:
            step += 1
            member.allreduce(grads(rank, step), step=step)
            queue.put(("step", rank, step, time.monotonic()))
    except PeerFailure as exc:
        queue.put(("failure", rank, exc.rank, exc.survivors, time.monotonic()))
    finally:
        member.close()
        server.stop(0)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _next_message(queues, until: float):
    """The next message from any of `queues`, or None once `until` (monotonic) has passed."""
    import queue as queue_mod

    while time.monotonic() < until:
        for q in queues:
            try:
                return q.get(timeout=0.05)
            except queue_mod.Empty:
                continue
    return None


@pytest.mark.parametrize("n", [2, 4])
def test_member_killed_mid_allreduce(n):
    ctx = mp.get_context("spawn")
    # One queue per member: a process killed while it writes to a shared queue would leave the
    # queue's write lock held, and the survivors' reports would never arrive.
    queues = [ctx.Queue() for _ in range(n)]
    ports = _free_ports(n)
    deadline_s = 3.0
    procs = [ctx.Process(target=_member_main, args=(r, n, ports, queues[r], deadline_s), daemon=True) for r in range(n)]
    for p in procs:
        p.start()
    victim = n - 1
    try:
        steps_seen = 0
        t_end = time.monotonic() + 60
        while steps_seen < 3 * n and time.monotonic() < t_end:  # the group is running
            msg = _next_message(queues, t_end)
            steps_seen += msg is not None and msg[0] == "step"
        assert steps_seen >= 3 * n
        os.kill(procs[victim].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        failures = {}
        give_up = killed_at + deadline_s * 4 + 10
        while len(failures) < n - 1 and time.monotonic() < give_up:
            msg = _next_message([q for r, q in enumerate(queues) if r != victim], give_up)
            if msg is not None and msg[0] == "failure":
                failures[msg[1]] = msg
        assert len(failures) == n - 1, f"survivors that reported a failure: {sorted(failures)}"
        for rank, (_, _, blamed, survivors, at) in failures.items():
            # worst case: the last step's wait began just before the kill, one deadline per level
            # chain (a survivor may wait on a member that waits on the victim) + status probes
            assert at - killed_at < 2 * deadline_s + 2 * 2.0 + 2.0, (rank, at - killed_at)
            assert victim not in survivors and rank in survivors, (rank, survivors)
        for r, p in enumerate(procs):
            if r != victim:
                p.join(timeout=10)
                assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


@pytest.mark.parametrize("n", [2, 4, 8])
def test_count_sums_agree_from_owner_and_member_view(n):
    """The owner turns its count of + signs into sum / n; every other member turns its own sign and
    its agree count into the same value, bit for bit (exact fp32), for every possible combination."""
    from geotrain.worker.allreduce import _agree_table, _k_from_agree, _k_from_plus

    table = _agree_table(n)
    for plus in range(n + 1):
        owner = torch.empty(1)
        _k_from_plus(np.array([plus], np.uint8), n, owner)
        assert float(owner) == (2 * plus - n) / n
        for negative in (0, 1):
            if plus == (0 if negative == 0 else n):
                continue  # no member holds that sign
            agree = table[negative * (n + 1) + plus]
            member = torch.empty(1)
            _k_from_agree(np.array([negative], np.uint8), np.array([agree], np.uint8), n, member)
            assert torch.equal(member, owner), (n, plus, negative)


def test_reference_schedules_stay_off_the_default_path():
    """allgather and scatter (measured worse than count and doubling) load only when chosen."""
    import subprocess
    import sys

    code = (
        "import sys; import geotrain.worker.group_runner, geotrain.worker.sync; "
        "from geotrain.worker.allreduce import CompressedAllReduce as C; "
        "C(0, 1, ['x'], algorithm='auto').allreduce({'w': __import__('torch').ones(3)}, step=1); "
        "print('geotrain.worker.allreduce_reference' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
    from geotrain.worker.allreduce_reference import SCHEDULES
    from geotrain.worker.allreduce import REFERENCE_ALGORITHMS

    assert sorted(SCHEDULES) == sorted(REFERENCE_ALGORITHMS)
