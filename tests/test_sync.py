"""SyncGroupTrainer: identical parameters across 2 and 4 members, initial and mid-run repair from
rank 0, 1-bit vs fp32 sync loss, PeerFailure propagation."""

from __future__ import annotations

import math
import random
from concurrent import futures

import pytest
import torch

from geotrain.common.config import OptimConfig, model_config
from geotrain.common.model import GPT
from geotrain.common.train import lr_at
from groups import run_all, start_group, stop_group
from geotrain.worker.allreduce import CompressedAllReduce, PeerFailure
from geotrain.worker.sync import SyncGroupTrainer, VarianceProbe

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=256)
LN_VOCAB = math.log(256)  # the loss of a uniform model over TINY's vocabulary


def synthetic_text(n_bytes: int, seed: int = 0) -> bytes:
    """Repetitive structured English-like text: a tiny grammar over a small vocabulary."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "our teacher", "this bird"]
    verbs = ["sees", "likes", "follows", "finds", "carries", "watches"]
    objects = ["the ball", "a red hat", "the river", "some bread", "the small house", "a book"]
    out = []
    size = 0
    while size < n_bytes:
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}. "
        out.append(s)
        size += len(s)
    return "".join(out).encode()[:n_bytes]


TRAIN = torch.tensor(list(synthetic_text(40_000, seed=1)), dtype=torch.long)
VAL = torch.tensor(list(synthetic_text(8_000, seed=2)), dtype=torch.long)


def batch(data: torch.Tensor, gen: torch.Generator, b: int = 8, t: int = 32):
    ix = torch.randint(len(data) - t - 1, (b,), generator=gen)
    x = torch.stack([data[i : i + t] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + t] for i in ix])
    return x, y


def make_trainers(members, init_seeds, **kwargs):
    trainers = []
    for member, seed in zip(members, init_seeds):
        torch.manual_seed(seed)
        trainers.append(SyncGroupTrainer(GPT(model_config("nano", **TINY)), member, **kwargs))
    return trainers


def train(trainers, steps: int, data_seed: int = 0):
    gens = [torch.Generator().manual_seed(data_seed * 100 + r) for r in range(len(trainers))]

    def fn(rank, trainer):
        losses = []
        for _ in range(steps):
            losses.append(trainer.step(*batch(TRAIN, gens[rank])).loss)
        return losses

    return run_all(trainers, fn, timeout_s=120 + 0.05 * steps * len(trainers))  # members share 2 cores here


@torch.no_grad()
def val_loss(model) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(123)
    losses = [float(model(*batch(VAL, gen, b=16))[1]) for _ in range(8)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("n", [2, 4])
def test_members_stay_bit_identical_and_initial_state_is_taken_on_entry(n):
    torch.set_num_threads(1)
    members, servers = start_group(n, compression="sign")
    try:
        # different initial weights on purpose: the entry check gives ranks 1..n-1 rank 0's state
        trainers = make_trainers(members, init_seeds=range(n), check_every=5, compression_warmup=4)
        seen = []
        trainers[0].on_metrics = seen.append
        train(trainers, steps=12)
        shas = {t.params_sha256() for t in trainers}
        assert len(shas) == 1, "parameters differ across members"
        assert [t.joins for t in trainers] == [0] + [1] * (n - 1)
        assert [t.repairs for t in trainers] == [0] * n  # the entry is not a repair
        assert all(t.step_count == 12 and t.checks == 3 for t in trainers)  # initial + steps 5, 10
        m = seen[-1]
        assert m.group_size == n and m.allreduce_bytes_sent > 0 and m.allreduce_seconds > 0
        assert m.residual_norm > 0 and [x.checked for x in seen].count(True) == 2
    finally:
        stop_group(members, servers)


def test_diverged_member_is_repaired_mid_run():
    torch.set_num_threads(1)
    members, servers = start_group(2, compression="sign")
    try:
        trainers = make_trainers(members, init_seeds=[7, 7], check_every=4, compression_warmup=2)
        train(trainers, steps=4)
        assert [t.repairs for t in trainers] == [0, 0]
        with torch.no_grad():  # silent corruption on rank 1 (a bit flip, a bad kernel, ...)
            next(trainers[1].model.parameters()).view(-1)[0] += 1.0
        train(trainers, steps=4, data_seed=1)
        assert [t.repairs for t in trainers] == [0, 1]
        assert trainers[0].params_sha256() == trainers[1].params_sha256()
        assert trainers[1].step_count == 8
    finally:
        stop_group(members, servers)


@pytest.mark.parametrize("n,compression", [(2, "none"), (4, "sign")])
def test_rank0_rebase_is_replayed_by_every_member(n, compression):
    """Rank 0 changes its parameters outside the optimizer (a merged update of the async run)
    through `rebase`: every member replays it at the next step, so no checksum round finds a
    difference; the same change made behind the trainer's back is repaired at the next round."""
    torch.set_num_threads(1)
    members, servers = start_group(n, compression=compression)
    try:
        trainers = make_trainers(members, init_seeds=[3] * n, check_every=3, compression_warmup=2)
        train(trainers, steps=3)
        gen = torch.Generator().manual_seed(5)
        update = {name: torch.randn(p.shape, generator=gen) * 1e-3 for name, p in trainers[0].model.named_parameters()}

        def merged_update():
            with torch.no_grad():
                for name, p in trainers[0].model.named_parameters():
                    p.add_(update[name]).sub_(update[name] * 0.5)  # two operations: rebase() makes it one

        for round_ in range(2):  # twice between two steps, then once more later: replayed in order
            assert trainers[0].rebase(merged_update)
        assert not trainers[0].rebase(lambda: None)  # nothing changed: nothing to replay
        train(trainers, steps=3, data_seed=1)
        assert trainers[0].rebase(merged_update)
        train(trainers, steps=3, data_seed=2)
        assert len({t.params_sha256() for t in trainers}) == 1
        assert [t.repairs for t in trainers] == [0] * n
        assert [t.rebases for t in trainers] == [3] * n
        with pytest.raises(ValueError, match="only rank 0"):
            trainers[1].rebase(merged_update)
        merged_update()  # the same change without rebase(): the next checksum round repairs
        train(trainers, steps=3, data_seed=3)
        assert [t.repairs for t in trainers] == [0] + [1] * (n - 1)
        assert len({t.params_sha256() for t in trainers}) == 1
    finally:
        stop_group(members, servers)


def test_a_repair_after_rank0_rebased_does_not_replay_that_rebase_twice():
    """Rank 0 rebases right after a checksum round while a member repairs from it: the state the
    member loads already holds the rebase, which the next step still announces; the member skips it."""
    torch.set_num_threads(1)
    members, servers = start_group(2, compression="none")
    try:
        trainers = make_trainers(members, init_seeds=[3, 3], check_every=2)
        train(trainers, steps=2)  # ends with a checksum round at group step 2
        with torch.no_grad():
            next(trainers[1].model.parameters()).view(-1)[0] += 1.0  # rank 1 diverged

        def merged_update():
            with torch.no_grad():
                for p in trainers[0].model.parameters():
                    p.add_(1e-3)

        assert trainers[0].rebase(merged_update)  # staged for step 3, already in rank 0's weights
        assert trainers[1].check()  # repaired from rank 0's state at step 2, rebase included
        train(trainers, steps=2, data_seed=1)  # step 3 announces the rebase; the check after step 4
        assert [t.repairs for t in trainers] == [0, 1]
        assert trainers[0].params_sha256() == trainers[1].params_sha256()
    finally:
        stop_group(members, servers)


def _run(n: int, compression: str, steps: int, chunk: int = 256, algorithm: str = "auto",
         seed: int = 0, schedule: bool = False, sign_scale: str = "rms", **kwargs) -> tuple[float, float]:
    """(val loss, mean of the last 10 train losses) of n members training `steps` steps from the
    weights and batches of `seed`; kwargs go to SyncGroupTrainer, `algorithm` and `sign_scale` to
    the all-reduce. schedule: the worker's learning-rate schedule (common/train.py lr_at: linear
    warmup over steps / 10, cosine decay to lr / 10 at `steps`) instead of a constant lr.
    benchmarks/bench_sync_quality.py runs this over seeds and member counts."""
    members, servers = start_group(n, compression=compression, chunk=chunk, algorithm=algorithm, sign_scale=sign_scale)
    try:
        if schedule:
            optim = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_iters=steps // 10)
            kwargs["lr_fn"] = lambda step: lr_at(step, optim, steps)
        trainers = make_trainers(members, init_seeds=[seed] * n, check_every=50, lr=3e-3, total_steps=steps, **kwargs)
        losses = train(trainers, steps=steps, data_seed=seed)
        assert len({t.params_sha256() for t in trainers}) == 1
        return val_loss(trainers[0].model), sum(losses[0][-10:]) / 10
    finally:
        stop_group(members, servers)


@pytest.fixture(scope="module")
def sign_vs_fp32() -> tuple[float, float, float]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    initial = val_loss(GPT(model_config("nano", **TINY)))
    # 1-bit: default mode ("update": 1-bit all-reduce of the Adam direction after 25 fp32 warmup steps)
    return _run(2, "sign", 100)[0], _run(2, "none", 100)[0], initial


def test_one_bit_sync_learns(sign_vs_fp32):
    val_sign, val_fp32, initial = sign_vs_fp32
    assert val_fp32 < 0.7 * initial and val_sign < 0.8 * initial, (val_sign, val_fp32, initial)


def test_one_bit_sync_is_close_to_fp32_sync_loss_early(sign_vs_fp32):
    """100 steps at a constant lr 3e-3 end where the loss falls fastest, just after the model
    leaves its unigram plateau: a few steps' delay there is several percent (over 8 seeds, 2
    members: +3.7% mean, one seed +13.8%; a 0.1% change of lr alone moves fp32 by up to 0.6%).
    Seed 0 measured +0.7%; a guard against regressions, with slack. The figure that matters is
    the end of a whole run (below)."""
    val_sign, val_fp32, _ = sign_vs_fp32
    assert (val_sign - val_fp32) / val_fp32 < 0.03, (val_sign, val_fp32)


def test_one_bit_sync_four_members_close_to_fp32_early():
    """The fast guard of the whole-run test below for 4 members: 100 steps at a constant lr 3e-3
    (the early regime of test_one_bit_sync_is_close_to_fp32_sync_loss_early). Seed 0 measured
    +1.7% (1.6829 vs 1.6554); the bound leaves slack for that regime's noise, not for a regression
    of the count all-reduce or the variance probes, which cost tens of percent here."""
    torch.set_num_threads(1)
    val_sign = _run(4, "sign", 100)[0]
    val_fp32 = _run(4, "none", 100)[0]
    assert (val_sign - val_fp32) / val_fp32 < 0.05, (val_sign, val_fp32)
    assert val_fp32 < 0.35 * LN_VOCAB, val_fp32  # left the unigram plateau


@pytest.mark.slow  # 2 x 2 runs of 1000 steps: minutes on 2 cores
@pytest.mark.parametrize("n", [2, 4])
def test_one_bit_sync_matches_fp32_sync_over_a_whole_run(n):
    """Same init, same batches, 1000 steps on the worker's schedule (warmup, cosine decay; the
    first 25% all-reduce int8 gradients, then 1-bit): the 1-bit group's validation loss at most 3%
    above the fp32 group's (the floor). Measured over seeds 0-3 (benchmarks/bench_sync_quality.py):
    2 members -0.4% to +2.0%, 4 members -4.9% to +1.0% (this seed: +0.02% and -4.9%; with an fp32
    warmup -1.1% to +0.7% for both); the figures below -1% are the run's noise, not a gain."""
    torch.set_num_threads(1)
    val_fp32 = _run(n, "none", 1000, schedule=True)[0]
    val_sign = _run(n, "sign", 1000, schedule=True)[0]
    assert (val_sign - val_fp32) / val_fp32 < 0.03, (n, val_sign, val_fp32)
    assert val_fp32 < 0.5, val_fp32  # the run learned the grammar (initial loss: 5.6)


def test_count_schedule_trains_as_well_as_allgather():
    """"count" changes the bytes, not the quantization: its loss matches "allgather"'s (each
    member's own direction quantized once, decoded and summed) over two seeds."""
    torch.set_num_threads(1)
    gaps = []
    for seed in (0, 1):
        val_allgather = _run(4, "sign", 100, chunk=64, algorithm="allgather", seed=seed)[0]
        val_count = _run(4, "sign", 100, chunk=64, algorithm="count", seed=seed)[0]
        gaps.append((val_count - val_allgather) / val_allgather)
    assert abs(sum(gaps) / len(gaps)) < 0.02, gaps


def test_variance_probe_is_deterministic_and_corrects_toward_the_group():
    a = VarianceProbe.probes("h.0.attn.c_attn.weight", 96 * 32)
    assert torch.equal(a, VarianceProbe.probes("h.0.attn.c_attn.weight", 96 * 32))  # same on every member
    assert len(a) == 64 and len(set(a.tolist())) == 64 and 0 <= int(a.min()) and int(a.max()) < 96 * 32
    assert len(VarianceProbe.probes("ln.weight", 32)) == 32  # small tensors: every value
    assert len(VarianceProbe.probes("big", 1 << 20)) == (1 << 20) // 256
    probe = VarianceProbe({"w": 1024}, every=8, beta2=0.99, group_size=4)
    v = {"w": torch.full((1024,), 4.0)}  # local v: the member's noisy gradients squared
    probe.start(v)
    assert probe.due(16) and not probe.due(17)
    for _ in range(50):  # the group's mean gradient is half as large: mean g^2 = 1, not 4
        probe.update({"w": torch.ones(len(probe.index["w"]))}, v)
    assert 0.25 < probe.rho["w"] < 0.35  # v is scaled down toward the group's
    probe.update({"w": torch.full((len(probe.index["w"]),), 100.0)}, v)
    assert probe.rho["w"] <= 1.0  # never scaled up
    for _ in range(200):  # the members' gradients cancel at the probes: the mean is 0
        probe.update({"w": torch.zeros(len(probe.index["w"]))}, v)
    assert probe.rho["w"] == 0.25  # never below 1/N: a mean of 4 keeps 1/4 of a member's g^2
    with pytest.raises(ValueError, match="variance probe interval"):
        VarianceProbe({"w": 4}, every=0, beta2=0.99, group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        VarianceProbe({"w": 4}, every=8, beta2=0.99, group_size=0)
    with CompressedAllReduce(0, 1, ["127.0.0.1:1"], compression="sign") as solo:
        with pytest.raises(ValueError, match="warmup_compression must be one of .* got 'sign'"):
            SyncGroupTrainer(GPT(model_config("nano", **TINY)), solo, warmup_compression="sign")
    model = GPT(model_config("nano", **TINY))
    with CompressedAllReduce(0, 1, ["127.0.0.1:1"], compression="sign") as solo:
        with pytest.raises(ValueError, match="variance_probe_every"):
            SyncGroupTrainer(model, solo, variance_probe_every=-1)


def test_variance_refresh_needs_momentum_mode():
    """A refresh step is plain AdamW on each member's moments; in "update" mode they are local and
    the members would drift apart (measured: a repair at every checksum round)."""
    model = GPT(model_config("nano", **TINY))
    with CompressedAllReduce(0, 1, ["127.0.0.1:1"], compression="sign") as solo:
        with pytest.raises(ValueError, match="variance_refresh_every"):
            SyncGroupTrainer(model, solo, mode="update", variance_refresh_every=50)
        SyncGroupTrainer(model, solo, mode="momentum", variance_refresh_every=50).close()


def test_step_raises_peer_failure_when_partner_leaves():
    torch.set_num_threads(1)
    members, servers = start_group(2, compression="sign", deadline_s=1.5)
    try:
        trainers = make_trainers(members, init_seeds=[3, 3])
        train(trainers, steps=2)
        members[1].close()  # rank 1 leaves the group (its server no longer routes to it)
        gen = torch.Generator().manual_seed(5)
        with pytest.raises(PeerFailure) as info:
            trainers[0].step(*batch(TRAIN, gen))
        assert info.value.rank == 1 and info.value.survivors == [0]
        assert trainers[0].step_count == 2  # no optimizer step on a failed all-reduce
    finally:
        stop_group(members, servers)
