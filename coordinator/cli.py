"""`coordinator`: run the global model of an async geotrain run.

With no flags it starts a run of the `nano` model on the embedded corpus, listening on :50051 with
metrics on :9090. Precedence: flag > GEOTRAIN_<FLAG> variable > the TOML given with --config >
the defaults in common/config.py (which also declares every flag: common/options.py). SIGTERM or Ctrl+C: stop accepting, checkpoint, exit 0 within seconds; a second
signal exits at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from geotrain.common.config import CoordinatorConfig, RunConfig, apply_overrides, load_run_config
from geotrain.common.options import config_from_params, config_options, config_values
from geotrain.protos.rpc import read_token

log = logging.getLogger("coordinator")

# RunConfig fields with a flag here (the file given with --config sets any field)
RUN_OPTIONS = (
    "data.dir", "model.preset", "compression.scheme", "compression.downlink", "compression.last_scheme", "compression.count_rule",
    "round.steps", "round.seconds", "round.max_lag_steps", "round.many_scale", "merge.policy", "outer.kind", "outer.lr",
    "outer.momentum", "plan.max_tokens", "train.batch_size", "train.max_iters", "train.seed",
    "sync.compression_warmup", "sync.warmup_compression", "model.init_from", "eval.device",
)
SERVER_OPTIONS = tuple(f.name for f in dataclasses.fields(CoordinatorConfig))


def build_run_config(config: str | None, params: dict, command: click.Command | None = None) -> RunConfig:
    """RunConfig from the TOML file (or defaults) with the given flags and GEOTRAIN_* variables on
    top; ValueError on any bad value or on config the workers would not honour."""
    run = load_run_config(config)
    values = config_values(RunConfig, params, command)
    if values.get("round.seconds") and "round.steps" not in values:
        values["round.steps"] = 0  # a time-based round was asked for
    apply_overrides(run, values)
    return run.validate_for_workers()


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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), envvar="GEOTRAIN_CONFIG", show_envvar=True,
              help="Run config TOML (see common/config.py); flags and GEOTRAIN_* variables override it.")
@config_options(RunConfig, RUN_OPTIONS)
@config_options(CoordinatorConfig, SERVER_OPTIONS)
def main(config, **params) -> None:
    """Run the geotrain coordinator."""
    opts: CoordinatorConfig = config_from_params(CoordinatorConfig, params)
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run = build_run_config(config, params)
        token = read_token(opts.token_file, opts.token)
        if bool(opts.tls_cert) != bool(opts.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        for path in (opts.tls_cert, opts.tls_key):
            if path and not Path(path).is_file():
                raise ValueError(f"no such file: {path}")
        from geotrain.common.corpus import resolve_data_dir
        from geotrain.common.reader import TokenData
        from geotrain.coordinator.server import CoordinatorServer

        data = TokenData(resolve_data_dir(run.data.dir or None))
        source = click.get_current_context().get_parameter_source
        server = CoordinatorServer(
            run, data, Path(opts.run_dir), host=opts.host, port=opts.port, metrics_port=opts.metrics_port,
            port_explicit=source("port") != click.core.ParameterSource.DEFAULT,
            metrics_port_explicit=source("metrics_port") != click.core.ParameterSource.DEFAULT,
            token=token, tls_cert=Path(opts.tls_cert).read_bytes() if opts.tls_cert else None,
            tls_key=Path(opts.tls_key).read_bytes() if opts.tls_key else None,
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
    if opts.port_file:
        from geotrain.common.checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(opts.port_file), str(bound).encode())
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
