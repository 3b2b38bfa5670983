import click


@click.command()
def main() -> None:
    """Run a geotrain worker (not yet available)."""
    click.echo("worker: not yet available")
