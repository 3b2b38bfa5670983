"""`coordinator`: run the global model of an async geotrain run.

With no flags it starts a run of the `nano` model on the embedded corpus, listening on :50051 with
metrics on :9090. Flags override the TOML given with --config (flag > file > defaults in
common/config.py). SIGTERM or Ctrl+C: stop accepting, checkpoint, exit 0 within seconds; a second
signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from geotrain.common.config import DELTA_SCHEMES, apply_overrides, load_run_config
from geotrain.protos.rpc import read_token

log = logging.getLogger("coordinator")

# flag name -> dotted RunConfig key
OVERRIDES = {
    "data": "data.dir",
    "model": "model.preset",
    "compression": "compression.scheme",
    "round_steps": "round.steps",
    "round_seconds": "round.seconds",
    "merge_policy": "merge.policy",
    "outer_kind": "outer.kind",
    "outer_lr": "outer.lr",
    "outer_momentum": "outer.momentum",
    "max_tokens": "plan.max_tokens",
    "batch_size": "train.batch_size",
    "max_iters": "train.max_iters",
    "seed": "train.seed",
    "eval_device": "eval.device",
}


def build_run_config(config: str | None, **flags):
    """RunConfig from the TOML file plus non-None flags; ValueError on any bad value."""
    run = load_run_config(config)
    if flags.get("round_seconds") and flags.get("round_steps") is None:
        flags["round_steps"] = 0  # a time-based round was asked for
    apply_overrides(run, {OVERRIDES[k]: v for k, v in flags.items() if k in OVERRIDES})
    return run.validate()


def install_signal_handlers(stop: threading.Event, what: str) -> None:
    """First SIGTERM/SIGINT sets `stop`; a second one exits at once."""

    def handler(signum, frame):
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(130)
        log.info("%s: stopping (signal %d); again to force", what, signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@click.command(context_settings={"auto_envvar_prefix": "GEOTRAIN", "help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), help="Run config TOML (see common/config.py).")
@click.option("--data", help="Prepared data directory (default: the embedded corpus).")
@click.option("--model", help="Model preset: nano, gpt2, gpt2-medium, gpt2-large, gpt2-xl.")
@click.option("--run-dir", default="runs/coordinator", show_default=True, type=click.Path(file_okay=False),
              help="Checkpoints, history and summary; an existing run here is resumed.")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535))
@click.option("--metrics-port", default=9090, show_default=True, type=click.IntRange(0, 65535), help="0 = off.")
@click.option("--compression", type=click.Choice(DELTA_SCHEMES))
@click.option("--round-steps", type=click.IntRange(1), help="Inner steps per local round.")
@click.option("--round-seconds", type=click.FloatRange(0, min_open=True), help="Seconds per local round.")
@click.option("--merge-policy", type=click.Choice(["async", "semi-sync"]))
@click.option("--outer-kind", type=click.Choice(["nesterov", "average"]))
@click.option("--outer-lr", type=float)
@click.option("--outer-momentum", type=float)
@click.option("--max-tokens", type=click.IntRange(0), help="Training tokens for the run (0 = no limit).")
@click.option("--batch-size", type=click.IntRange(1), help="Default worker batch size.")
@click.option("--max-iters", type=click.IntRange(1), help="Inner steps over which workers' lr decays.")
@click.option("--seed", type=int)
@click.option("--eval-device", help="Where the coordinator evaluates the global model (cpu, cuda, cuda:1).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File with the run token (or GEOTRAIN_TOKEN).")
@click.option("--token", hidden=True, show_envvar=True, help="The run token (prefer --token-file).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True))
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True))
@click.option("--port-file", type=click.Path(dir_okay=False), hidden=True,
              help="Write the bound port here once listening (for --port 0).")
@click.option("--log-level", default="INFO", show_default=True)
def main(config, run_dir, host, port, metrics_port, token_file, token, tls_cert, tls_key, port_file, log_level, **flags) -> None:
    """Run the geotrain coordinator."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run = build_run_config(config, **flags)
        token = read_token(token_file, token)
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        from geotrain.common.data import TokenData, resolve_data_dir
        from geotrain.coordinator.server import CoordinatorServer

        data = TokenData(resolve_data_dir(run.data.dir or None))
        source = click.get_current_context().get_parameter_source
        server = CoordinatorServer(
            run, data, Path(run_dir), host=host, port=port, metrics_port=metrics_port, token=token,
            port_explicit=source("port") != click.core.ParameterSource.DEFAULT,
            metrics_port_explicit=source("metrics_port") != click.core.ParameterSource.DEFAULT,
            tls_cert=Path(tls_cert).read_bytes() if tls_cert else None,
            tls_key=Path(tls_key).read_bytes() if tls_key else None,
        )
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    stop = threading.Event()
    install_signal_handlers(stop, "coordinator")
    try:
        bound = server.start()
    except OSError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if port_file:
        from geotrain.common.checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(port_file), str(bound).encode())
    try:
        server.run_until(stop)
    finally:
        server.stop()
    summary = server.state.final_summary
    if summary is not None:
        click.echo(f"run finished: validation loss {summary['val_loss']:.4f} after {summary['tokens']} tokens")


def entry() -> None:
    """The `coordinator` command (and `python -m geotrain.coordinator.cli`): main(), then exit without the
    interpreter's teardown, which occasionally hung after "run finished" (common/entry.py)."""
    from geotrain.common.entry import run_then_exit

    run_then_exit(main)


if __name__ == "__main__":
    entry()
