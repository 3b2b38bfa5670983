"""`geotrain`: the umbrella command (prepare, train, sample, eval, demo, status).

Each subcommand maps flags (and `--config FILE.toml` where it applies) onto the typed dataclasses
of common/config.py and calls a plain function; ValueError from those becomes a clear message and
exit status 2.
"""

from __future__ import annotations

import sys

import click

from common import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geotrain")
def cli() -> None:
    """Train GPT models on GPUs scattered over the internet."""


def fail(message: str) -> None:
    """Print a one-line error and exit 2 (callers' mistakes: bad flags, bad files)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def main() -> None:
    cli()
