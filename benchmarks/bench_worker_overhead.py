"""Where the async worker's training thread spends its time per round, besides the steps.

One process on the CPU (or `--device cuda`) builds the worker's parts as worker/runner.py does
(`LocalTrainer` at the preset's shape, `RoundState` with its fp32 basepoint) and times, on the
calling thread, which plays the training thread:

- step: `LocalTrainer.step` on a (batch, block) batch, mean of `--steps` after one warm-up step;
- push: what the training thread does when a round ends (`RoundState.snapshot_push`: the delta
  params - base snapshot); the encoding (compression, its decoded form, the residual norm) that
  the comm thread does (`RoundState.encode_push`) is timed apart;
- rebase: `RoundState.handle` of a merged update that contains our push (params += U - own and
  the finiteness check); the base thread's job it starts (base += U, the basepoint's sha256) is
  timed apart, by waiting for it right after (in a run it overlaps the next steps; the training
  thread waits only if the next rebase or push comes before it ends).
- before: the same round the way the worker did it before the encoding and the basepoint moved
  off the training thread: `RoundState.make_push` inline, then `apply_update` + `params_sha256`
  + `all_finite` (isfinite per value) inline.

"per round" sums what the training thread pays per round (`--round-steps` steps long).

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
    from geotrain.common.tensors import all_finite, clone_tensors, params_sha256
    from geotrain.worker.metrics import StatsBook
    from geotrain.worker.rebase import PendingRange, RoundState, apply_update
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

    rows = {k: [] for k in ("snap", "encode", "rebase", "base_job", "inline_push", "inline_rebase")}
    for r in range(repeats):
        rounds.pending = [PendingRange(0, "s", 0, block_size, 0, 1, 1.0, 0)]
        sync()
        t0 = time.perf_counter()
        push = rounds.snapshot_push(0)
        sync()
        rows["snap"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rounds.encode_push(push, run.compression, None)
        rows["encode"].append(time.perf_counter() - t0)
        rounds.seal(push)
        # the merge of our push alone: U = decoded(P), announced with the checksum of base + U
        update = {n: t.clone() for n, t in push.decoded.items()}
        sha = params_sha256({n: base[n] + update[n] for n in base})
        sync()
        t0 = time.perf_counter()
        rounds.handle(("updates", [(2 + r, update, sha, push, None)]))
        sync()
        rows["rebase"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rounds.wait_base()  # the rest of the base thread's job (it overlaps the step that follows)
        rows["base_job"].append(time.perf_counter() - t0)
        if rounds.stats.snapshot().resyncs:
            raise RuntimeError("the basepoint checksum did not verify")
        # the same round as the worker did it before: everything inline, on this thread
        rounds.pending = [PendingRange(0, "s", 0, block_size, 0, 1, 1.0, 0)]
        t0 = time.perf_counter()
        old, _, _ = rounds.make_push(run.compression, None, 0)
        sync()
        rows["inline_push"].append(time.perf_counter() - t0)
        rounds.pending = []
        update = {n: t.clone() for n, t in old.decoded.items()}
        sha = params_sha256({n: base[n] + update[n] for n in base})
        t0 = time.perf_counter()
        with torch.no_grad():
            apply_update(trainer.params, base, update, old.decoded)
        ok = params_sha256(base) == sha and all_finite(trainer.params)
        sync()
        rows["inline_rebase"].append(time.perf_counter() - t0)
        if not ok:
            raise RuntimeError("the inline basepoint checksum did not verify")
    med = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    n_params = sum(t.numel() for t in trainer.params.values())
    return {"preset": preset, "block_size": block_size, "batch_size": batch_size, "scheme": scheme,
            "device": str(dev), "params": n_params, "step_s": step_s, "snapshot_s": med["snap"],
            "encode_s": med["encode"], "rebase_s": med["rebase"], "base_job_s": med["base_job"],
            "training_thread_s_per_round": med["snap"] + med["rebase"],
            "before_push_s": med["inline_push"], "before_rebase_s": med["inline_rebase"],
            "before_training_thread_s_per_round": med["inline_push"] + med["inline_rebase"],
            "repeats": repeats, "torch": torch.__version__, "threads": torch.get_num_threads()}


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
    print(f"| push: delta snapshot (RoundState.snapshot_push) | {r['snapshot_s']:.3f} | training |")
    print(f"| push: encode, decoded form, residual (encode_push) | {r['encode_s']:.3f} | comm |")
    print(f"| rebase: params += U - own, finiteness (handle) | {r['rebase_s']:.3f} | training |")
    print(f"| rebase: base += U, basepoint sha256 (after handle) | {r['base_job_s']:.3f} | base |")
    print(f"| before: make_push inline | {r['before_push_s']:.3f} | training |")
    print(f"| before: apply_update + params_sha256 + all_finite inline | {r['before_rebase_s']:.3f} | training |")
    for label, key in (("training thread per round, now", "training_thread_s_per_round"),
                       ("training thread per round, before", "before_training_thread_s_per_round")):
        s = r[key]
        print(f"| **{label}** | {s:.3f} = {s / r['step_s']:.2f} steps ({100 * s / (round_s + s):.1f}% of a "
              f"{a.round_steps}-step round) | |")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(r, fh, indent=1)


if __name__ == "__main__":
    main()
