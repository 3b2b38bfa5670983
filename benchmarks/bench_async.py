"""Real end-to-end benchmark: `geotrain demo` (coordinator + N worker processes on loopback) against
`geotrain train` baselines, every final model evaluated on the SAME fixed validation batches.

Baselines (nano recipe, 2000 steps of 12 x 64 tokens per worker):
  train_b12        one worker alone                           (floor "b")
  train_b{12N}     DDP-equivalent: one process, batch 12 x N  (floor "a", the quality ceiling)
Demo runs: demo_n{N}_h{H}_{scheme}[_{tag}].

Traffic: the demo's sent_bytes + received_bytes (wire bytes, model traffic only, summed over
workers) divided by N gives bytes per worker. fp32 DDP with a ring all-reduce moves, per worker and
per step, 2 (N-1)/N x 4 x params bytes sent AND the same received; ratio = DDP / ours, same tokens.

Examples (each part can be run separately; results merge into benchmarks/results/async.json):
  .venv/bin/python benchmarks/bench_async.py --baselines 1,2,4 --workers ''          # baselines only
  .venv/bin/python benchmarks/bench_async.py --workers 2 --round-steps 50 --compression none,sign
  .venv/bin/python benchmarks/bench_async.py --table-only                             # print the table
Mixed speeds (`--speeds 1,1,0.5,0.25`, run names ..._sp1-1-0.5-0.25): every run with per-worker
figures also lands in a second table: the run's tokens/s against the sum of its workers' own
(speed_figures), the tokens each worker trained, loss and waiting. Compare with the equal-speed
run of the same H (same token budget: loss at equal tokens) and with --round-seconds.
Finished runs are reused (their run dir holds the model) unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "async.json"
BATCH, BLOCK = 12, 64
EVAL_SEED = 0xBE7C4  # fixed val batches for every model
DATA_DIR = ""  # --data: a prepared data directory (default: the embedded corpus)


def _geotrain() -> list[str]:
    exe = ROOT / ".venv" / "bin" / "geotrain"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from geotrain.cli import main; main()"]


# --------------------------------------------------------------------------- evaluation


_DATA = None


def _data():
    global _DATA
    if _DATA is None:
        from geotrain.common.corpus import resolve_data_dir
        from geotrain.common.reader import TokenData

        _DATA = TokenData(resolve_data_dir(DATA_DIR or None))
    return _DATA


@torch.no_grad()
def fixed_val_loss(model: torch.nn.Module, batches: int, seed: int = EVAL_SEED) -> float:
    """Mean loss over `batches` fixed val batches of 12 x 64 (batch i = get_batch(seed, step=i))."""
    model.eval()
    data = _data()
    total = 0.0
    for i in range(batches):
        x, y = data.get_batch("val", BATCH, BLOCK, seed=seed, step=i)
        _, loss = model(x, y)
        total += float(loss)
    return total / batches


def load_trainer_model(out_dir: Path):
    from geotrain.common.sampling import load_model_from_checkpoint

    model, _, _ = load_model_from_checkpoint(out_dir / "checkpoints")
    return model


def load_coordinator_model(run_dir: Path):
    """The global model from the coordinator's latest checkpoint (as geotrain/demo.py::sample_from_run)."""
    from geotrain.common.checkpoint import load_latest_checkpoint
    from geotrain.common.config import ModelConfig
    from geotrain.common.model import GPT

    loaded = load_latest_checkpoint(run_dir / "checkpoints")
    if loaded is None:
        raise ValueError(f"no checkpoint in {run_dir / 'checkpoints'}")
    tensors, state, _ = loaded
    model = GPT(ModelConfig(**state["model"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[f"model.{name}"])
    return model


# --------------------------------------------------------------------------- runs


def run_train(batch: int, steps: int, runs: Path, force: bool, threads: int) -> dict:
    out = runs / f"train_b{batch}_s{steps}"
    if force or not (out / "summary.json").exists():
        cmd = [
            *_geotrain(), "train", "--model", "nano", "--max-iters", str(steps), "--batch-size", str(batch),
            "--eval-iters", "20", "--eval-interval", str(steps), "--checkpoint-interval", str(steps),
            "--out", str(out), "--device", "cpu", "--no-progress",
        ]
        if DATA_DIR:
            cmd += ["--data", DATA_DIR]
        if threads:
            cmd += ["--threads", str(threads)]
        t0 = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        (out / "bench_seconds.txt").write_text(f"{time.monotonic() - t0:.1f}\n")
    summary = json.loads((out / "summary.json").read_text())
    secs = out / "bench_seconds.txt"
    return {"dir": os.path.relpath(out, ROOT), "own_val_loss": summary.get("val_loss"),
            "seconds": float(secs.read_text()) if secs.exists() else None,
            "command": f"geotrain train --model nano --max-iters {steps} --batch-size {batch} --out {os.path.relpath(out, ROOT)}"}


def write_config(path: Path, outer: dict, chunk: int | None, unit_tokens: int = 0, downlink: str = "",
                 scheme: str = "", merge_weights: str = "", round_seconds: float = 0.0, max_lag: int = 0,
                 last_scheme: str = "", count_rule: str = "") -> None:
    lines = []
    if round_seconds or max_lag:
        lines.append("[round]")
    if round_seconds:
        lines += ["steps = 0", f"seconds = {round_seconds}"]
    if max_lag:
        lines.append(f"max_lag_steps = {max_lag}")
    if merge_weights:
        lines += ["[merge]", f"weights = {json.dumps(merge_weights)}"]
    if unit_tokens:
        lines += ["[plan]", f"unit_tokens = {unit_tokens}"]
    if outer:
        lines.append("[outer]")
        for k, v in outer.items():
            lines.append(f"{k} = {json.dumps(v)}")
    if chunk or downlink or last_scheme or count_rule:
        lines.append("[compression]")
        if count_rule:
            lines.append(f"count_rule = {json.dumps(count_rule)}")
        if last_scheme:
            lines.append(f"last_scheme = {json.dumps(last_scheme)}")
        if chunk:
            lines.append(f"chunk = {chunk}")
        if downlink:  # "combine" or "combine:ternary" (downlink:downlink_scheme)
            mode, _, down_scheme = downlink.partition(":")
            lines.append(f"scheme = {json.dumps(scheme)}")  # the file is validated on its own
            lines.append(f"downlink = {json.dumps(mode)}")
            if down_scheme:
                lines.append(f"downlink_scheme = {json.dumps(down_scheme)}")
    path.write_text("\n".join(lines) + "\n")


def run_demo(n: int, h: int | str, scheme: str, steps: int, runs: Path, force: bool, outer: dict, chunk: int | None,
             tag: str, unit_tokens: int = 0, downlink: str = "", merge_weights: str = "",
             round_seconds: float = 0.0, max_lag: int = 0, last_scheme: str = "", speeds: str = "",
             wait_probe: bool = False, sync: bool = False, count_rule: str = "") -> dict:
    """h: inner steps per round, or the label of a time-based round (round_seconds > 0); speeds:
    the demo's --speeds (each worker's relative speed, "" = all 1); scheme "default": no
    --compression flag (the run config's); sync: the demo's --sync (one sync group)."""
    name = demo_name(n, h, scheme, steps, tag, speeds, sync)
    run_dir = runs / name
    cmd = [*_geotrain(), "demo", "--workers", str(n), "--steps", str(steps), "--run-dir", str(run_dir), "--json"]
    if scheme != "default":
        cmd += ["--compression", scheme]
    if sync:
        cmd += ["--sync"]
    if not round_seconds:
        cmd += ["--round-steps", str(h)]
    if DATA_DIR:
        cmd += ["--data", DATA_DIR]
    if speeds:
        cmd += ["--speeds", speeds]
    if outer or chunk or unit_tokens or downlink or merge_weights or round_seconds or max_lag or last_scheme or count_rule:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = runs / f"{name}.toml"
        write_config(cfg, outer, chunk, unit_tokens, downlink, scheme, merge_weights, round_seconds, max_lag,
                     last_scheme, count_rule)
        cmd += ["--config", str(cfg)]
    if force or not (run_dir / "summary.json").exists():
        if run_dir.exists():  # a coordinator would resume the run found there
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if wait_probe:  # benchmarks/wait_probe/sitecustomize.py times the workers from inside
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "benchmarks" / "wait_probe"),
                                                              env.get("PYTHONPATH", "")]))
            env["GEOTRAIN_WAIT_PROBE"] = str(run_dir / "wait_probe")
        with open(runs / f"{name}.log", "w") as log:
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    probes = [json.loads(f.read_text()) for f in sorted((run_dir / "wait_probe").glob("worker-*.json"))]
    if probes:
        summary["wait_probe"] = probe_breakdown(probes)
        attach_training_seconds(summary.get("worker_list") or [], probes)
    return {"dir": os.path.relpath(run_dir, ROOT), "summary": summary,
            "command": " ".join(c if not c.startswith(str(ROOT)) else os.path.relpath(c, ROOT) for c in cmd)}


def sync_checks(run_dir: Path) -> dict:
    """A sync demo's checksum rounds and repairs, from its worker logs: each member logs
    "(C checks, R repairs)" while identical and "... R repairs); training async" when it leaves
    its group; every repair also logs a line naming it."""
    import re

    checks = repairs = 0
    for log in sorted((run_dir / "logs").glob("worker-*.log")):
        text = log.read_text(errors="replace")
        found = [(int(c), int(r)) for c, r in re.findall(r"\((\d+) checks, (\d+) repairs\)", text)]
        found += [(int(c), int(r)) for c, r in re.findall(r"(\d+) checksum rounds, (\d+) repairs\)", text)]
        if found:
            c, r = max(found)
            checks, repairs = checks + c, repairs + r
    return {"sync_checks": checks, "sync_repairs": repairs}


def demo_name(n: int, h, scheme: str, steps: int, tag: str, speeds: str = "", sync: bool = False) -> str:
    sp = "_sp" + "-".join(f"{float(x):g}" for x in speeds.split(",")) if speeds else ""
    return f"demo_n{n}_h{h}_{scheme}_s{steps}{sp}" + ("_sync" if sync else "") + (f"_{tag}" if tag else "")


def probe_breakdown(probes: list[dict]) -> dict:
    """The workers' probe files summed: {"wall_seconds", "wait": {caller: share of wall},
    "thread": {method: share of wall}} (shares of the summed wall time of all workers)."""
    wall = sum(p["wall_seconds"] for p in probes) or 1.0
    out = {"wall_seconds": wall, "wait": {}, "thread": {}, "calls": {}}
    for p in probes:
        for group, key in (("wait_by_caller", "wait"), ("training_thread", "thread")):
            for name, row in p[group].items():
                out[key][name] = out[key].get(name, 0.0) + row["seconds"] / wall
                out["calls"][name] = out["calls"].get(name, 0) + row["calls"]
    return out


def attach_training_seconds(rows: list[dict], probes: list[dict]) -> None:
    """Each worker row gets the probe's seconds in train_step (training, a --speed sleep included)
    and tokens_per_second = its steps x 12 x 64 / those seconds: its own speed, whatever it waited.
    A probe is matched by worker name, or (probes without one) by the nearest number of steps."""
    free = list(probes)
    for row in rows:
        steps = row["tokens"] // (BATCH * BLOCK)
        named = [p for p in free if p.get("name") == row["name"]]
        pool = named or [p for p in free if "name" not in p and "train_step" in p["training_thread"]]
        if not pool:
            continue
        p = min(pool, key=lambda q: abs(q["training_thread"]["train_step"]["calls"] - steps))
        free.remove(p)
        step = p["training_thread"]["train_step"]
        row["train_seconds"] = step["seconds"]
        row["tokens_per_second"] = step["calls"] * BATCH * BLOCK / step["seconds"]


def speed_figures(summary: dict) -> dict:
    """Throughput of a demo run against its workers' own: the run's tokens per second of training
    (tokens trained by all workers / the longest worker's wall seconds) and the sum over workers of
    tokens / (wall - waiting) seconds, each from the worker's last heartbeat (geotrain/demo.py)."""
    rows = summary.get("worker_list") or []
    if not rows:
        return {}
    wall = max(r["wall_seconds"] for r in rows)
    run_tps = sum(r["tokens"] for r in rows) / wall if wall else 0.0
    own = sum(r["tokens_per_second"] for r in rows)
    return {"worker_list": rows, "run_tokens_per_second": run_tps, "sum_own_tokens_per_second": own,
            "throughput_ratio": run_tps / own if own else None}


def speed_table(res: dict) -> str:
    """The runs with per-worker figures: throughput against the workers' own, loss, waiting."""
    rows = ["| run | speeds | run tokens/s | sum of workers' own tokens/s | ratio | tokens per worker | "
            "fixed-val loss | wait % |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(res["runs"]):
        r = res["runs"][key]
        if not r.get("sum_own_tokens_per_second"):
            continue
        share = " / ".join(f"{w['tokens'] / 1e3:.0f}k" for w in r["worker_list"])
        rows.append(f"| {key} | {r.get('speeds') or 'equal'} | {r['run_tokens_per_second']:.0f} | "
                    f"{r['sum_own_tokens_per_second']:.0f} | {r['throughput_ratio']:.2f} | {share} | "
                    f"{r['val']:.4f} | {100 * r['wait_fraction']:.2f} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------- table


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}


def save_results(res: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")


def actual_outer(r: dict) -> str:
    """The outer optimizer the coordinator really ran (its run.json), not the flags we passed."""
    try:
        o = json.loads((ROOT / r["dir"] / "run.json").read_text())["run"]["outer"]
    except (OSError, KeyError, ValueError):
        return r.get("outer_desc", "?")
    if o["kind"] == "average" and o["lr"] == 1.0:
        return "average lr 1"
    desc = f"{o['kind']} lr {o['lr']:g} mom {o['momentum']:g}"
    return desc + " (count merges: count_step)" if o.get("count_scaling") and o["kind"] == "nesterov" else desc


def table(res: dict) -> str:
    runs = res["runs"]
    for r in runs.values():
        if r.get("kind") == "demo":
            r["outer_actual"] = actual_outer(r)
    rows = ["| run | N | H | scheme | outer | tokens | fixed-val loss | vs (b) one worker | vs (a) DDP batch 12N | "
            "MB/worker (sent+recv) | DDP fp32 MB/worker | DDP/ours | wait % | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(runs, key=lambda k: (runs[k].get("steps", 0), runs[k].get("n", 0), runs[k].get("kind") != "train", k)):
        r = runs[key]
        n = r.get("n", 1)
        b = runs.get(f"train_b12_s{r.get('steps', 2000)}", {}).get("val")
        a = runs.get(f"train_b{12 * n}_s{r.get('steps', 2000)}", {}).get("val")
        rel_b = f"{100 * (r['val'] / b - 1):+.2f}%" if b else ""
        rel_a = f"{100 * (r['val'] / a - 1):+.2f}%" if a else ""
        unit = f", unit_tokens {r['unit_tokens']}" if r.get("unit_tokens") else ""
        if not unit and "unit_tokens=" in r.get("outer_desc", ""):
            unit = ", unit_tokens " + r["outer_desc"].split("unit_tokens=")[1]
        if r["kind"] == "train":
            rows.append(f"| {key} | {n} (batch {r['batch']}) | - | - | - | {r['tokens']:,} | {r['val']:.4f} | {rel_b} | "
                        f"{rel_a} | - | - | - | - | {r.get('seconds') or 0:.0f} |")
        else:
            rows.append(
                f"| {key} | {n} | {r['h']} | {r['scheme']} | {r['outer_actual']}{unit} | {r['tokens']:,} | "
                f"{r['val']:.4f} | {rel_b} | {rel_a} | {r['bytes_per_worker'] / 1e6:.2f} | "
                f"{r['ddp_bytes_per_worker'] / 1e6:.0f} | {r['ddp_ratio']:.0f}x | {100 * r['wait_fraction']:.2f} | "
                f"{r['seconds']:.0f} |" if n > 1 else
                f"| {key} | {n} | {r['h']} | {r['scheme']} | {r['outer_actual']}{unit} | {r['tokens']:,} | "
                f"{r['val']:.4f} | {rel_b} | {rel_a} | {r['bytes_per_worker'] / 1e6:.2f} | 0 | - | "
                f"{100 * r['wait_fraction']:.2f} | {r['seconds']:.0f} |"
            )
    return "\n".join(rows)


# --------------------------------------------------------------------------- main


def _csv(s: str, cast=str) -> list:
    return [cast(x) for x in s.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4", help="demo worker counts, comma separated ('' = none)")
    p.add_argument("--round-steps", default="50", help="H values, comma separated")
    p.add_argument("--last-scheme", default="", help="compression.last_scheme (int8, int4)")
    p.add_argument("--count-rule", default="", help="compression.count_rule override (majority, mean)")
    p.add_argument("--max-lag-steps", type=int, default=0, help="round.max_lag_steps (0: no limit)")
    p.add_argument("--round-seconds", type=float, default=0.0,
                   help="time-based rounds of this many seconds instead of --round-steps (run label tS)")
    p.add_argument("--compression", default="none,sign")
    p.add_argument("--wait-probe", action="store_true",
                   help="time the workers from inside (benchmarks/wait_probe): where they wait, what the training thread does")
    p.add_argument("--sync", action="store_true", help="the demo's --sync: the workers train as one sync group")
    p.add_argument("--speeds", default="", help="the demo's --speeds: relative speed per worker (1,1,0.5,0.25)")
    p.add_argument("--steps", type=int, default=2000, help="inner steps per worker")
    p.add_argument("--baselines", default="", help="N values whose train baselines to run (batch 12 x N)")
    p.add_argument("--outer-kind", default="")
    p.add_argument("--outer-lr", type=float, default=0.0)
    p.add_argument("--outer-momentum", type=float, default=-1.0)
    p.add_argument("--chunk", type=int, default=0, help="compression.chunk override")
    p.add_argument("--unit-tokens", type=int, default=0, help="plan.unit_tokens override (tokens per lease)")
    p.add_argument("--merge-weights", default="", help="merge.weights override (tokens, equal)")
    p.add_argument("--downlink", default="", help="compression.downlink override (relay, combine, recode), optionally :downlink_scheme (combine:ternary)")
    p.add_argument("--tag", default="", help="suffix for the run names (use with outer/chunk overrides)")
    p.add_argument("--eval-batches", type=int, default=200)
    p.add_argument("--runs-dir", default="runs/bench")
    p.add_argument("--threads", type=int, default=0, help="train baselines: torch threads")
    p.add_argument("--force", action="store_true")
    p.add_argument("--data", default="", help="prepared data directory for every run and the evaluation")
    p.add_argument("--results", default="", help="JSON file the results merge into (default: benchmarks/results/async.json)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--merge", default="", help="comma-separated result files to merge into --results, then exit")
    global DATA_DIR, RESULTS
    args = p.parse_args()
    DATA_DIR = args.data
    RESULTS = Path(args.results) if args.results else RESULTS
    res = load_results()
    if args.merge:
        for f in _csv(args.merge):
            res["runs"].update(json.loads(Path(f).read_text())["runs"])
        save_results(res)
        args.table_only = True
    if args.table_only:
        print(table(res))
        print(speed_table(res))
        return
    runs = ROOT / args.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    nparams = None
    for n in _csv(args.baselines, int):
        batch = BATCH * n
        info = run_train(batch, args.steps, runs, args.force, args.threads)
        model = load_trainer_model(ROOT / info["dir"])
        nparams = sum(p.numel() for p in model.parameters())
        key = f"train_b{batch}_s{args.steps}"
        res["runs"][key] = dict(info, kind="train", n=n, batch=batch, steps=args.steps,
                                tokens=batch * BLOCK * args.steps, params=nparams,
                                val=fixed_val_loss(model, args.eval_batches), eval_batches=args.eval_batches)
        save_results(res)
        print(f"{key}: fixed-val {res['runs'][key]['val']:.4f}", flush=True)

    outer = {}
    if args.outer_kind:
        outer["kind"] = args.outer_kind
    if args.outer_lr > 0:
        outer["lr"] = args.outer_lr
    if args.outer_momentum >= 0:
        outer["momentum"] = args.outer_momentum
    rounds = [f"t{args.round_seconds:g}"] if args.round_seconds else _csv(args.round_steps, int)
    for n in _csv(args.workers, int):
        for h in rounds:
            for scheme in _csv(args.compression):
                t0 = time.monotonic()
                info = run_demo(n, h, scheme, args.steps, runs, args.force, outer, args.chunk or None, args.tag,
                                args.unit_tokens, args.downlink, args.merge_weights, args.round_seconds,
                                args.max_lag_steps, args.last_scheme, args.speeds, args.wait_probe, args.sync,
                                args.count_rule)
                s = info["summary"]
                model = load_coordinator_model(ROOT / info["dir"])
                params = sum(p.numel() for p in model.parameters())
                tokens = int(s["tokens"])
                per_worker = (s["sent_bytes"] + s["received_bytes"]) / n
                steps_per_worker = tokens / (n * BATCH * BLOCK)
                ddp = 2 * 2 * (n - 1) / n * 4 * params * steps_per_worker  # sent + received per worker
                key = demo_name(n, h, scheme, args.steps, args.tag, args.speeds, args.sync)
                desc = ",".join(f"{k}={v}" for k, v in outer.items()) or "default"
                overrides = (("chunk", args.chunk), ("unit_tokens", args.unit_tokens), ("downlink", args.downlink),
                             ("weights", args.merge_weights), ("max_lag_steps", args.max_lag_steps),
                             ("last_scheme", args.last_scheme))
                desc += "".join(f",{label}={value}" for label, value in overrides if value)
                res["runs"][key] = dict(
                    kind="demo", n=n, h=h, scheme=scheme, steps=args.steps, tokens=tokens, params=params,
                    outer=outer, outer_desc=desc, unit_tokens=args.unit_tokens or None, chunk=args.chunk or None,
                    downlink=args.downlink or None, dir=info["dir"], command=info["command"],
                    coordinator_val_loss=s.get("val_loss"), val=fixed_val_loss(model, args.eval_batches),
                    eval_batches=args.eval_batches, sent_bytes=s["sent_bytes"], received_bytes=s["received_bytes"],
                    bytes_per_worker=per_worker, bytes_per_worker_per_token=per_worker / max(1, tokens / n),
                    ddp_bytes_per_worker=ddp, ddp_ratio=(ddp / per_worker) if per_worker and n > 1 else None,
                    wait_fraction=s.get("wait_fraction", 0.0), seconds=s.get("seconds", time.monotonic() - t0),
                    model_version=s.get("model_version"), speeds=args.speeds or None, **speed_figures(s),
                    wait_probe=s.get("wait_probe"), sync=args.sync or None,
                    **(sync_checks(ROOT / info["dir"]) if args.sync else {}),
                )
                save_results(res)
                print(f"{key}: fixed-val {res['runs'][key]['val']:.4f} MB/worker {per_worker / 1e6:.2f} "
                      f"wait {100 * s.get('wait_fraction', 0):.2f}%", flush=True)
    print(table(res))
    print(speed_table(res))
    save_results(res)


if __name__ == "__main__":
    main()
