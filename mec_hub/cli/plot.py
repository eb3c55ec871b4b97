"""``mec-hub plot``: training curves from a run's ``metrics.jsonl``."""

from __future__ import annotations

import click

from mec_hub.cli.common import UserError, friendly_errors, option


@click.command("plot", short_help="Plot a training run's curves from its metrics.jsonl.")
@click.argument("metrics", type=click.Path(dir_okay=False))
@option(
    "out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Picture to write (.png, .pdf, .svg, ...).",
)
@click.option("--title", default=None, help="Title above the panels [default: the metrics file].")
@click.option(
    "--dpi",
    type=click.IntRange(min=20, max=600),
    default=100,
    show_default=True,
    help="Resolution; the picture is 15 x 8 inches.",
)
@friendly_errors
def plot_cmd(metrics: str, out_path: str, title: str | None, dpi: int) -> None:
    """Plot loss, coding length, kNN top-1, ||C||, the Taylor error, lr, 1/lamda, teacher momentum and images/s.

    METRICS is the metrics.jsonl a training run writes; the steps a run was resumed from are
    marked on every panel. Needs matplotlib: pip install "mec-hub[plot]".
    """
    from mec_hub.apps.plots import plot_training_curves

    try:
        written = plot_training_curves(metrics, out_path, title=title, dpi=dpi)
    except OSError as exc:
        raise UserError(f"--out {out_path}: cannot write ({exc.strerror or exc})") from None
    click.echo(f"wrote {written}")
