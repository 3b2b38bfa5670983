"""`worker`: join a coordinator and train.

Every option can also come from the environment: GEOTRAIN_<OPTION> (e.g. GEOTRAIN_COORDINATOR,
GEOTRAIN_TOKEN); `worker --help` lists them. Exit status: 0 after a clean leave, 2 for a bad
command line, 3 when the coordinator refuses the worker (bad token, protocol mismatch), 1 on an
unexpected error; a second SIGTERM/Ctrl+C exits at once with 128 + the signal number.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from geotrain.common.entry import run_then_exit
from geotrain.worker.client import FatalError, parse_target

EXIT_USAGE = 2
EXIT_REFUSED = 3


def _coordinator(ctx, param, value):
    try:
        host, port = parse_target(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _batch_size(ctx, param, value):
    if value is None or str(value).lower() == "auto":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or a positive integer, got {value!r}") from None
    if n <= 0:
        raise click.BadParameter(f"expected 'auto' or a positive integer, got {value!r}")
    return n


@click.command(context_settings={"auto_envvar_prefix": "GEOTRAIN", "help_option_names": ["-h", "--help"]})
@click.option("--port", type=click.IntRange(0, 65535), default=10000, show_default=True, show_envvar=True,
              help="Port of this worker's gRPC server (health, Ping, sync-group peers); 0 = any free port.")
@click.option("--coordinator", required=True, callback=_coordinator, metavar="HOST:PORT", show_envvar=True,
              help="The coordinator's address.")
@click.option("--name", default="", show_envvar=True, help="Worker name shown in status (default: hostname-pid).")
@click.option("--device", default="auto", show_default=True, show_envvar=True,
              help="auto | cuda | cuda:N | cpu.")
@click.option("--batch-size", default="auto", callback=_batch_size, show_default=True, show_envvar=True,
              help="Sequences per inner step; auto = the run's train.batch_size.")
@click.option("--advertise-host", default="", show_envvar=True, help="Host peers use to reach --port (behind NAT).")
@click.option("--advertise-port", type=click.IntRange(0, 65535), default=0, show_envvar=True,
              help="Port peers use to reach --port (default: the bound port).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9100, show_default=True, show_envvar=True,
              help="Prometheus metrics HTTP port; 0 = off.")
@click.option("--cache-dir", default=None, show_envvar=True,
              help="Shard cache; shards go to CACHE_DIR/<run_id>. Default ~/.cache/geotrain/shards.")
@click.option("--token", default=None, show_envvar=True,
              help="Run token (prefer the environment variable or --token-file over the command line).")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False), show_envvar=True,
              help="File whose first line is the run token.")
@click.option("--tls-ca", default=None, type=click.Path(dir_okay=False), show_envvar=True,
              help="PEM CA certificate: talk TLS to the coordinator (and, with --tls-cert, to sync-group peers).")
@click.option("--tls-cert", default=None, type=click.Path(dir_okay=False), show_envvar=True,
              help="PEM certificate of this worker: serve --port over TLS (sync-group peers need --tls-ca).")
@click.option("--tls-key", default=None, type=click.Path(dir_okay=False), show_envvar=True,
              help="PEM private key of --tls-cert.")
@click.option("--threads", type=click.IntRange(0), default=0, show_envvar=True,
              help="torch intra-op threads (0 = torch's default).")
@click.option("--sync-group", default="", show_envvar=True, help="Sync group name or 'auto' ('' = async worker).")
@click.option("--sync-compression", type=click.Choice(["", "none", "sign"]), default="", show_envvar=True,
              help="Sync-group all-reduce compression ('' = sign: 1 bit + error feedback after an int8 warmup; none = fp32).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              default="info", show_default=True, show_envvar=True)
def main(port, coordinator, name, device, batch_size, advertise_host, advertise_port, metrics_port, cache_dir,
         token, token_file, tls_ca, tls_cert, tls_key, threads, sync_group, sync_compression, log_level) -> None:
    """Join the coordinator at HOST:PORT and train until the run ends or a signal arrives.

    The first SIGTERM or Ctrl+C finishes the current step, pushes the pending delta if the
    coordinator answers within a short deadline, leaves and exits 0; a second exits at once.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from geotrain.protos.rpc import read_token

    try:
        token = read_token(token_file, token)
        ca = cert = key = None
        if tls_ca:
            with open(tls_ca, "rb") as fh:
                ca = fh.read()
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if tls_cert:
            if not tls_ca:
                raise ValueError("--tls-cert needs --tls-ca (the CA that signed the sync-group peers' certificates)")
            with open(tls_cert, "rb") as fh:
                cert = fh.read()
            with open(tls_key, "rb") as fh:
                key = fh.read()
    except (ValueError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if name and not all(c.isalnum() or c in "._-" for c in name) or len(name) > 64:
        click.echo(f"error: --name must match [A-Za-z0-9._-]{{1,64}}, got {name!r}", err=True)
        sys.exit(EXIT_USAGE)

    from geotrain.worker.runner import WorkerConfig, WorkerRunner
    from geotrain.worker.group_runner import GroupWorkerRunner

    config = WorkerConfig(
        coordinator=coordinator, port=port, name=name, device=device, batch_size=batch_size, threads=threads,
        cache_dir=cache_dir, token=token, tls_ca=ca, tls_cert=cert, tls_key=key, metrics_port=metrics_port,
        advertise_host=advertise_host, advertise_port=advertise_port, sync_group=sync_group,
    )
    try:
        runner = GroupWorkerRunner(config, sync_compression) if sync_group else WorkerRunner(config)
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
    try:
        code = runner.run()
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
