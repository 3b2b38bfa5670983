"""Where the async worker's training thread spends its time per round, besides the steps.

One process on the CPU (or `--device cuda`) builds the worker's parts as worker/runner.py does
(`LocalTrainer` at the preset's shape, `RoundState` with its fp32 basepoint) and times, on the
calling thread, which plays the training thread:

- step: `LocalTrainer.step` on a (batch, block) batch, mean of `--steps` after one warm-up step;
- push: what the training thread does when a round ends (`RoundState.seal_push`: the delta
  params - base snapshot); the encoding (compression, its decoded form, the residual norm) that
  the comm thread does (`RoundState.encode_push`) is timed apart;
- rebase: `RoundState.handle` of a merged update that contains our push (base += U,
  params += U - own), plus the wait for the basepoint checksum at the next handle (the checksum
  itself runs on the verify thread: timed apart as "hash").

"on training thread" sums what the training thread pays per round; "all on training thread" is
the same round with the encoding and the hash done inline (what the worker did before they moved
to the comm and verify threads). Rounds are `--round-steps` steps long.

    python benchmarks/bench_worker_overhead.py --preset gpt2 --block-size 64 --batch-size 1 --out benchmarks/results/worker_overhead.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time


def measure(preset: str, block_size: int, batch_size: int, steps: int, scheme: str, device: str,
            repeats: int) -> dict:
    import torch

    from geotrain.common.config import CompressionConfig, RunConfig, TrainConfig, model_config
    from geotrain.common.tensors import clone_tensors, params_sha256
    from geotrain.worker.metrics import StatsBook
    from geotrain.worker.rebase import PendingRange, RoundState
    from geotrain.worker.trainer import LocalTrainer

    dev = torch.device(device)
    model_cfg = model_config(preset, vocab_size=50304 if preset.startswith("gpt2") else None, block_size=block_size)
    run = RunConfig(compression=CompressionConfig(scheme=scheme, downlink="relay"),
                    train=TrainConfig(batch_size=batch_size))
    trainer = LocalTrainer(run, model_cfg, dev, "bench", batch_size)
    base = clone_tensors(trainer.params, "cpu")
    rounds = RoundState(trainer.params, base, 1, "run", StatsBook(), threading.Event())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model_cfg.vocab_size, (batch_size, block_size), generator=g)
    y = torch.randint(0, model_cfg.vocab_size, (batch_size, block_size), generator=g)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    trainer.step(x, y, 0)
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.step(x, y, 1 + i)
    sync()
    step_s = (time.perf_counter() - t0) / steps

    rows = {"seal": [], "encode": [], "rebase": [], "hash": [], "hash_wait": []}
    for r in range(repeats):
        rounds.pending = [PendingRange(0, "s", 0, block_size, 0, 1, 1.0, 0)]
        sync()
        t0 = time.perf_counter()
        push = rounds.seal_push(0)
        sync()
        rows["seal"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rounds.encode_push(push, run.compression, None)
        rows["encode"].append(time.perf_counter() - t0)
        rounds.seal(push)
        # the merge of our push alone: U = decoded(P), announced with the checksum of base + U
        update = {n: t.clone() for n, t in push.decoded.items()}
        expected = {n: base[n] + update[n] for n in base}
        t0 = time.perf_counter()
        sha = params_sha256(expected)
        rows["hash"].append(time.perf_counter() - t0)
        del expected
        sync()
        t0 = time.perf_counter()
        rounds.handle(("updates", [(2 + r, update, sha, push, None)]))
        sync()
        rows["rebase"].append(time.perf_counter() - t0)
        time.sleep(rows["hash"][-1] + 0.5)  # the steps of the next round, during which the checksum runs
        t0 = time.perf_counter()
        rounds.wait_verified()
        rows["hash_wait"].append(time.perf_counter() - t0)
        if rounds.stats.snapshot().resyncs:
            raise RuntimeError("the basepoint checksum did not verify")
    med = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    on_thread = med["seal"] + med["rebase"] + med["hash_wait"]
    inline = med["seal"] + med["encode"] + med["rebase"] + med["hash"]
    n_params = sum(t.numel() for t in trainer.params.values())
    return {"preset": preset, "block_size": block_size, "batch_size": batch_size, "scheme": scheme,
            "device": str(dev), "params": n_params, "step_s": step_s, "seal_s": med["seal"],
            "encode_s": med["encode"], "rebase_s": med["rebase"], "hash_s": med["hash"],
            "hash_wait_s": med["hash_wait"], "training_thread_s_per_round": on_thread,
            "all_on_training_thread_s_per_round": inline, "repeats": repeats, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--round-steps", type=int, default=50, help="steps per round, for the overhead fraction")
    ap.add_argument("--repeats", type=int, default=3, help="rounds timed (medians reported)")
    ap.add_argument("--scheme", default="sign")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    r = measure(a.preset, a.block_size, a.batch_size, a.steps, a.scheme, a.device, a.repeats)
    r["round_steps"] = a.round_steps
    round_s = a.round_steps * r["step_s"]
    print(f"{r['preset']} ({r['params'] / 1e6:.0f}M params), batch {r['batch_size']} x {r['block_size']}, "
          f"scheme {r['scheme']}, {r['device']}, {r['threads']} threads; round = {a.round_steps} steps")
    print("| part | seconds | thread |")
    print("|---|---|---|")
    print(f"| step | {r['step_s']:.3f} | training |")
    print(f"| push: seal (delta snapshot) | {r['seal_s']:.3f} | training |")
    print(f"| push: encode (compress, decode, residual) | {r['encode_s']:.3f} | comm |")
    print(f"| rebase (base += U, params += U - own) | {r['rebase_s']:.3f} | training |")
    print(f"| basepoint hash (params_sha256) | {r['hash_s']:.3f} | verify |")
    print(f"| wait for the hash at the next rebase | {r['hash_wait_s']:.3f} | training |")
    for label, key in (("on training thread", "training_thread_s_per_round"),
                       ("all on training thread", "all_on_training_thread_s_per_round")):
        s = r[key]
        print(f"| **{label}, per round** | {s:.3f} ({100 * s / (round_s + s):.1f}% of a round, "
              f"{s / r['step_s']:.1f} steps) | |")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(r, fh, indent=1)


if __name__ == "__main__":
    main()
