"""`worker`: join a coordinator and train.

Every option is a field of common/config.py's WorkerConfig and can also come from the environment:
GEOTRAIN_<OPTION> (e.g. GEOTRAIN_COORDINATOR, GEOTRAIN_TOKEN); `worker --help` lists them. Exit status: 0 after a clean leave, 2 for a bad
command line (a chosen --port or --metrics-port that is taken included; a default one that is taken
is replaced by a free one), 3 when the coordinator refuses the worker (bad token, protocol mismatch),
4 when one of its local ranks died (--nproc-per-node > 1: it left the run first), 1 on an
unexpected error; a second SIGTERM/Ctrl+C exits at once with 128 + the signal number.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys

import click

from geotrain.common.config import WorkerConfig
from geotrain.common.entry import run_then_exit
from geotrain.common.options import config_from_params, config_options
from geotrain.worker.client import FatalError, parse_target

EXIT_USAGE = 2
EXIT_REFUSED = 3


# every WorkerConfig field with command-line metadata is a flag
WORKER_OPTIONS = tuple(f.name for f in dataclasses.fields(WorkerConfig) if "cli" in f.metadata)


def worker_config(params: dict, command: click.Command | None = None) -> WorkerConfig:
    """WorkerConfig from the given flags and GEOTRAIN_* variables over the defaults; reads the token
    and the CA file. ValueError (naming the value) for anything bad."""
    config: WorkerConfig = config_from_params(WorkerConfig, params, command=command)
    host, port = parse_target(config.coordinator)
    config.coordinator = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if config.name and not all(c.isalnum() or c in "._-" for c in config.name) or len(config.name) > 64:
        raise ValueError(f"--name must match [A-Za-z0-9._-]{{1,64}}, got {config.name!r}")
    from geotrain.protos.rpc import read_token

    config.token = read_token(config.token_file, config.token)
    if config.tls_ca_file:
        with open(config.tls_ca_file, "rb") as fh:
            config.tls_ca = fh.read()
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.tls_cert_file:
        if not config.tls_ca_file:
            raise ValueError("--tls-cert needs --tls-ca (the CA that signed the sync-group peers' certificates)")
        with open(config.tls_cert_file, "rb") as fh:
            config.tls_cert = fh.read()
        with open(config.tls_key_file, "rb") as fh:
            config.tls_key = fh.read()
    return config


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_options(WorkerConfig, WORKER_OPTIONS)
def main(**params) -> None:
    """Join the coordinator at HOST:PORT and train until the run ends or a signal arrives.

    The first SIGTERM or Ctrl+C finishes the current step, pushes the pending delta if the
    coordinator answers within a short deadline, leaves and exits 0; a second exits at once.
    """
    try:
        config = worker_config(params)
    except (ValueError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from geotrain.worker.host_group import resolve_nproc
    from geotrain.worker.runner import WorkerRunner
    from geotrain.worker.group_runner import GroupWorkerRunner

    try:
        nproc_per_node = resolve_nproc(config.nproc_per_node, config.device)
    except (ValueError, RuntimeError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if config.sync_group and nproc_per_node > 1:
        # A sync group's all-reduce runs one model replica per member; a member spanning several
        # devices is not supported yet: run one worker per GPU (--device cuda:N) in the group.
        click.echo(f"error: --sync-group needs one device per worker (got --nproc-per-node {nproc_per_node}); "
                   "start one worker per GPU with --device cuda:N --nproc-per-node 1", err=True)
        sys.exit(EXIT_USAGE)

    # A port left at its default (no flag, no environment variable) falls back to a free one when
    # taken (several workers on a host); a chosen one that is taken is an error naming it.
    source = click.get_current_context().get_parameter_source
    config = dataclasses.replace(
        config, nproc_per_node=nproc_per_node,
        port_fallback=source("port") == click.core.ParameterSource.DEFAULT,
        metrics_port_fallback=source("metrics_port") == click.core.ParameterSource.DEFAULT,
    )
    try:
        runner = GroupWorkerRunner(config, config.sync_compression) if config.sync_group else WorkerRunner(config)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)

    signals_seen = []

    def on_signal(signum, frame):
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            os.write(2, b"second signal: exiting now\n")
            os._exit(128 + signum)
        logging.getLogger("worker").warning("%s: finishing the step, pushing and leaving (again to force)",
                                            signal.Signals(signum).name)
        runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from geotrain.worker.ports import PortInUse

    try:
        code = runner.run()
    except PortInUse as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except FatalError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


def entry() -> None:
    """The `worker` command (and `python -m geotrain.worker.cli`): main(), then exit without the
    interpreter's teardown (common/entry.py says why)."""
    run_then_exit(main)


if __name__ == "__main__":  # pragma: no cover
    entry()
