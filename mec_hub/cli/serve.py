"""``mec-hub serve``: browse a feature file's images and their nearest neighbours in a web page."""

from __future__ import annotations

import click

from mec_hub.cli.common import friendly_errors


@click.command("serve")
@click.argument("features", type=click.Path(dir_okay=False))
@click.option(
    "--index",
    "index_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="A FAISS index of FEATURES (mec-hub index); default FEATURES' .index beside it if any, else exact.",
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
    help="Load the query model from here instead of the location in FEATS.meta.json (same SHA-256 required).",
)
@click.option("--device", default="auto", show_default=True, help="Where to embed uploaded images.")
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
    """Serve a web page over FEATURES (a .npy written by mec-embed): a paged grid of its images;
    click one to see its nearest rows with their cosine scores, or drop an image to search with
    the model recorded in the meta (its weights checked by SHA-256, as mec-hub search does).

    The JSON API (GET /api/rows, GET /api/neighbours, POST /api/search, GET /thumb/ROW) is
    described in the README, with what the server refuses (foreign Host names, requests from other
    sites, files outside the set's folders, oversized or slow uploads). It is a local tool: no
    accounts, no TLS. Needs the `serve` extra: pip install 'mec-hub[serve]'.
    """
    from mec_hub.apps.serve import serve

    serve(
        features, index_path=index_path, host=host, port=port, weights=weights, device=device, allow_hosts=allow_hosts
    )
