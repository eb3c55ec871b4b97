"""``mec-hub serve``: browse a feature file's images and their nearest neighbours in a web page."""

from __future__ import annotations

import click

from mec_hub.cli.common import FEATURE_SET, device_option, friendly_errors

HELP = f"""Serve a web page over FEATURES: a paged grid of its images; click one to see its nearest rows
with their cosine scores, or drop an image to search with the model recorded in the set's meta (its
weights checked by SHA-256, as mec-hub search does).

FEATURES is {FEATURE_SET}. The JSON API (GET /api/rows, GET /api/neighbours, POST /api/search,
GET /thumb/ROW) is described in the README, with what the server refuses (foreign Host names,
requests from other sites, files outside the set's folders, oversized or slow uploads). It is a local
tool: no accounts, no TLS. Needs the `serve` extra: pip install 'mec-hub[serve]'.
"""


@click.command("serve", help=HELP, short_help="Browse a feature set's images and neighbours in a web page.")
@click.argument("features", type=click.Path(dir_okay=False))
@click.option(
    "--index",
    "index_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Search through this index (mec-hub index); default: FEATS.index when it exists, else exact.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 makes the page reachable from other machines).",
)
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True, help="Port.")
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="NAME",
    help="Also answer requests made to this host name or address (repeatable); by default only the --host "
    "address and localhost names are answered, so that no other site's name can reach the page.",
)
@click.option(
    "--weights",
    default=None,
    help="Load the query model from here instead of the location in FEATURES' meta (same SHA-256 required).",
)
@device_option("embed uploaded images")
@friendly_errors
def serve_cmd(
    features: str,
    index_path: str | None,
    host: str,
    port: int,
    allow_hosts: tuple[str, ...],
    weights: str | None,
    device: str,
) -> None:
    """``mec-hub serve``: its help is ``HELP``."""
    from mec_hub.apps.serve import serve

    serve(
        features, index_path=index_path, host=host, port=port, weights=weights, device=device, allow_hosts=allow_hosts
    )
