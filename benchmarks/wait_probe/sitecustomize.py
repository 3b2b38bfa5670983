"""Where a worker's time goes, measured inside real `worker` processes without changing them.

Put this directory first on PYTHONPATH and set GEOTRAIN_WAIT_PROBE=DIR: every Python process
started so (the demo's workers inherit both) imports this module at start-up; in a worker it
wraps methods of geotrain.worker.runner.WorkerRunner with timers and writes DIR/worker-<pid>.json
when WorkerRunner.run returns:

  wait_by_caller  seconds the worker books as waiting (StatsBook.add(wait_seconds=...)), by the
                  calling function: `_setup` (the first model), `_train_run` (the next lease and
                  its data not prefetched yet), `_wait_for_merge` (round.max_lag_steps)
  training_thread seconds and calls of train_step (incl. a --speed sleep), start_push (the delta
                  snapshot; the comm thread encodes it), apply_inbox (decoding updates, rebasing)
  wall_seconds    from the first training step to the end of WorkerRunner.run
  name            the worker's --name

Used by `benchmarks/bench_async.py --wait-probe`; has no effect without GEOTRAIN_WAIT_PROBE.
"""

from __future__ import annotations

import json
import os
import sys
import time

_OUT = os.environ.get("GEOTRAIN_WAIT_PROBE")


def _install(out_dir: str) -> None:
    from geotrain.worker import metrics as metrics_mod
    from geotrain.worker import runner as runner_mod

    cls = runner_mod.WorkerRunner
    figures = {"wait_by_caller": {}, "training_thread": {}, "pid": os.getpid()}
    started = [None]

    def timed(name: str):
        inner = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            if started[0] is None and name == "train_step":
                started[0] = time.monotonic()
                figures["name"] = self.config.name
            t0 = time.monotonic()
            try:
                return inner(self, *args, **kwargs)
            finally:
                row = figures["training_thread"].setdefault(name, {"seconds": 0.0, "calls": 0})
                row["seconds"] += time.monotonic() - t0
                row["calls"] += 1

        setattr(cls, name, wrapper)

    for name in ("train_step", "start_push", "apply_inbox"):
        timed(name)

    book = metrics_mod.StatsBook
    add = book.add

    def add_and_record(self, **values) -> None:
        seconds = values.get("wait_seconds")
        if seconds:
            caller = sys._getframe(1).f_code.co_name
            row = figures["wait_by_caller"].setdefault(caller, {"seconds": 0.0, "calls": 0})
            row["seconds"] += seconds
            row["calls"] += 1
        add(self, **values)

    book.add = add_and_record

    def dump() -> None:
        figures["wall_seconds"] = time.monotonic() - started[0] if started[0] else 0.0
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"worker-{os.getpid()}.json"), "w") as fh:
            json.dump(figures, fh, indent=1)

    run = cls.run

    def run_then_dump(self, *args, **kwargs):  # the worker leaves by os._exit: no atexit
        try:
            return run(self, *args, **kwargs)
        finally:
            dump()

    cls.run = run_then_dump


class _Finder:
    """Installs the timers when geotrain.worker.cli is first imported (`python -m
    geotrain.worker.cli`: the worker processes only), then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "geotrain.worker.cli":
            sys.meta_path.remove(self)
            _install(_OUT)
        return None


if _OUT:
    sys.meta_path.insert(0, _Finder())
