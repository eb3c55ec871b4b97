"""``mec-embed``: placeholder until the embedding engine lands (issue 3)."""

from __future__ import annotations

import click


@click.command()
def main() -> None:
    """Embed images with an MEC model (not implemented yet)."""
    raise click.ClickException("mec-embed is not implemented yet")
