"""Members of a sync group inside an async run stay bit-identical: real coordinator and worker
processes (as `geotrain demo --sync` runs them), with rank 0 rebasing on merged updates before
every checksum round. Every checksum round after the group's entry must find every member equal
to rank 0: no "parameters differed" line, no repair, and the members did replay rank 0's rebases
(without the replay, every rebase makes the next checksum round repair every member).

Config: procs.TINY_CONFIG (round.steps 5, so a checksum round and a rebase every 5 steps), the
async merge policy (only rank 0 pushes) and the default Nesterov outer optimizer, as the demo: its
update differs from rank 0's own delta, so every merge moves rank 0's parameters (plain averaging
of one participant's delta would give rank 0 nothing to rebase); a budget that leaves the group a
few hundred steps.
"""

from __future__ import annotations

import re

import pytest

from procs import Cluster, prepare_corpus, tiny_config

GROUP_RE = re.compile(r"sync group (\S+) \(epoch (\d+)\): rank (\d+) of (\d+)")
LEFT_RE = re.compile(r"left after (\d+) steps .*?; (\d+) rebases, (\d+) checksum rounds, (\d+) repairs\)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus"), n_bytes=400_000)


def _ranks(workers) -> dict[str, int]:
    out = {}
    for w in workers:
        m = GROUP_RE.findall(w.log())
        if m:
            out[w.name] = int(m[-1][2])
    return out


def _run_group(data_dir, tmp_path, members: int, budget: int, extra: list[str]) -> list[tuple[int, str]]:
    """`members` workers in one sync group train to the budget; returns (rank, log) per worker."""
    cfg = tiny_config(plan__max_tokens=budget, train__max_iters=1600, merge__policy="async",
                      outer__kind="nesterov", outer__lr=0.8, outer__momentum=0.8)
    with Cluster(tmp_path, data_dir, cfg) as c:
        coord = c.start_coordinator()
        workers = [c.start_worker(f"m{i}", extra=["--sync-group", "g", "--advertise-host", "127.0.0.1", *extra])
                   for i in range(members)]
        c.wait_for(lambda: len(_ranks(workers)) == members, 60, "the sync group to form", fail_if_dead=[coord, *workers])
        c.wait_for(lambda: (c.run_dir / "summary.json").exists(), 240, "the run to finish", fail_if_dead=[coord])
        for w in workers:
            assert c.wait_exit(w, 60) == 0, f"{w.name} exited with {w.returncode}"
        assert c.wait_exit(coord, 30) == 0
        ranks = _ranks(workers)
        assert sorted(ranks.values()) == list(range(members)), ranks
        return [(ranks[w.name], w.log()) for w in workers]


def _assert_identical(results: list[tuple[int, str]], min_checks: int) -> None:
    counts = {rank: tuple(map(int, LEFT_RE.findall(log)[0])) for rank, log in results}  # steps, rebases, checks, repairs
    for rank, log in results:
        assert "parameters differed from rank 0" not in log, f"rank {rank} was repaired: {counts}"
    assert all(c[3] == 0 for c in counts.values()), counts
    assert all(c[2] >= min_checks for c in counts.values()), counts
    assert all(c[1] >= min_checks // 2 for c in counts.values()), counts  # rank 0 rebased, the members replayed it


@pytest.mark.slow
def test_two_members_fp32_stay_identical(data_dir, tmp_path):
    # The group forms a few heartbeats after the joins; an idle machine trains ~75k tokens async by
    # then, so the budget leaves the group a few hundred steps whatever the load.
    results = _run_group(data_dir, tmp_path, 2, 196_608, ["--sync-compression", "none"])
    _assert_identical(results, min_checks=12)
    assert all("compression none" in log for _, log in results)


@pytest.mark.slow
def test_four_members_one_bit_stay_identical(data_dir, tmp_path):
    """4 members, the default compression (1 bit, count schedule, int8 warmup): identical during
    and after the warmup."""
    results = _run_group(data_dir, tmp_path, 4, 393_216, [])
    _assert_identical(results, min_checks=20)
    assert all("compression sign, schedule count" in log for _, log in results)
