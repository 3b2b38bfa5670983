import click


@click.command()
def main() -> None:
    """Run the geotrain coordinator (not yet available)."""
    click.echo("coordinator: not yet available")
