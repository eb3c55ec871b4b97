"""``mec-hub search``: the rows of a feature file nearest to some query images."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mec_hub.cli.common import FEATURE_SET, UserError, device_option, friendly_errors, option

HELP = f"""Find the rows of FEATURES most similar to each QUERY image (or --row).

FEATURES is {FEATURE_SET}. The queries are embedded with the model recorded in its meta
(FEATS.meta.json, or the Parquet file's metadata), after checking that its weights are the very
ones (SHA-256) that made the set; the search is an exact cosine search, read from disk in blocks,
unless an index built by mec-hub index is found (FEATS.index, or --index), refused if FEATURES
changed since (rebuild it then). Rows or query features holding NaN or infinite values are refused,
naming them. With --grid, each query gets a row of 1 + K tiles of --tile pixels, 8 px apart with a
16 px caption: (1 + K) * (T + 8) + 8 pixels wide and Q * (T + 24) + 8 tall.
"""


@click.command("search", help=HELP, short_help="Find the rows of a feature set nearest to query images.")
@click.argument("features", type=click.Path(dir_okay=False))
@click.argument("queries", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--row", "rows", type=click.IntRange(min=0), multiple=True,
              help="Query by row I of FEATURES instead of an image (repeatable).")
@click.option("--index", "index_path", type=click.Path(dir_okay=False), default=None,
              help="Search through this index (mec-hub index); default: FEATS.index when it exists, else exact "
                   "(said on stderr).")
@click.option("--exclude-self", is_flag=True,
              help="Leave out the query's own row (a --row, or a query image that is a row of FEATURES).")
@option("top_k", type=click.IntRange(min=1), default=5, show_default=True, help="Neighbours per query.")
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False),
              help="Also draw the queries beside their neighbours as one picture (PNG).")
@click.option("--tile", type=click.IntRange(min=16, max=1024), default=128, show_default=True,
              help="Size of one image in the --grid picture, in pixels.")
@click.option("--weights", default=None,
              help="Load the model from here instead of the location in FEATURES' meta (same SHA-256 required).")
@device_option("embed the query images")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
def search_cmd(features: str, queries: tuple[str, ...], rows: tuple[int, ...], index_path: str | None,
               exclude_self: bool, top_k: int, grid_path: str | None, tile: int,
               weights: str | None, device: str, as_json: bool) -> None:
    """``mec-hub search``: its help is ``HELP``."""
    from mec_hub.apps.index import index_for
    from mec_hub.apps.search import FeatureFile, search, search_rows

    if not queries and not rows:
        raise click.UsageError("give at least one QUERY image or --row I")
    index = FeatureFile.open(features)
    exact_because: list[str] = []  # said once, after the results, so that an error stays one line
    feature_index = index_for(index, index_path, note=exact_because.append)
    results = []
    if rows:
        results += search_rows(index, list(rows), top_k=top_k, feature_index=feature_index, exclude_self=exclude_self)
    if queries:
        results += search(index, list(queries), top_k=top_k, weights=weights, device=device,
                          feature_index=feature_index, exclude_self=exclude_self)
    queries = tuple(f"row {r}" for r in rows) + queries
    if as_json:
        click.echo(json.dumps([
            {"query": query, "neighbours": [
                {"rank": n.rank, "row": n.row, "score": n.score, "path": n.path,
                 "resolved": None if n.resolved is None else str(n.resolved)}
                for n in hits
            ]}
            for query, hits in zip(queries, results, strict=True)
        ], indent=2))
    else:
        for query, hits in zip(queries, results, strict=True):
            click.echo(f"query {query}")
            for n in hits:
                click.echo(f"  {n.rank:>3}  {n.score:+.4f}  {n.resolved or n.path}")
    for why in exact_because:
        click.echo(f"Note: {why}", err=True)
    if grid_path:
        from mec_hub.apps.grid import Cell, draw_grid, save_picture

        cells = [
            [Cell(Path(query), f"query {_short(query)}", is_query=True)]
            + [Cell(n.resolved, f"#{n.rank} {n.score:.3f} {_short(n.path)}") for n in hits]
            for query, hits in zip(queries, results, strict=True)
        ]
        try:
            written = save_picture(draw_grid(cells, tile=tile), grid_path)
        except OSError as exc:
            raise UserError(f"--grid {grid_path}: cannot write ({exc.strerror or exc})") from None
        click.echo(f"grid: {written}", err=as_json)


def _short(path: str) -> str:
    """``.../cat/0001.png`` -> ``cat/0001.png``: in an ImageFolder the folder is the class."""
    parts = path.replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:])
