"""``mec-hub index``: build a FAISS index over a feature file, for ``mec-hub search``."""

from __future__ import annotations

import click

from mec_hub.cli.common import FEATURE_SET, friendly_errors, option

HELP = f"""Build an index of FEATURES for fast cosine search (mec-hub search, mec-hub serve).

FEATURES is {FEATURE_SET}. Rows are L2-normalised once and searched by inner product; rows holding NaN
or infinite values are refused. The index records its kind, parameters, the recall@10 measured on
held-out rows, the row count, the dimension and the SHA-256 of FEATURES; mec-hub search refuses it
once FEATURES has changed. Needs FAISS: pip install 'mec-hub[index]'.

Kinds: flat (exact), ivf and hnsw hold every row in memory, 4 x D bytes each (512 B at 128-d);
ivfpq holds a product-quantization code of D/4 bytes and an 8-byte row number per row (40 B at 128-d,
4 GB for 10^8 rows), and re-ranks its k_factor x k best candidates exactly from FEATURES, so its
scores are exact cosines: FEATURES must stay in place (a .npy is read through its memory map,
candidate rows only; a Parquet set is read whole into memory, so convert a large one to .npy first).
"""


@click.command("index", help=HELP, short_help="Build a FAISS index of a feature set, for search and serve.")
@click.argument("features", type=click.Path(dir_okay=False))
@option(
    "out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the index (default: FEATS.index beside FEATS.npy or FEATS.parquet, for a shard set "
    "too); its record goes to OUT.json.",
)
@click.option(
    "--kind",
    type=click.Choice(["auto", "flat", "ivf", "hnsw", "ivfpq"]),
    default="auto",
    show_default=True,
    help="auto: exact (flat) below --exact-below rows, ivfpq above --compress-above rows, else IVF; the IVF "
    "kinds are tuned to reach --recall.",
)
@click.option(
    "--recall",
    type=click.FloatRange(min=0.0, max=1.0, min_open=True),
    default=0.95,
    show_default=True,
    help="Recall@10 against exact search to reach, tuned on a sample of the file's own rows.",
)
@click.option(
    "--exact-below",
    type=click.IntRange(min=0),
    default=50_000,
    show_default=True,
    help="With --kind auto, files with fewer rows get an exact index.",
)
@click.option(
    "--compress-above",
    type=click.IntRange(min=0),
    default=None,
    metavar="ROWS",
    help="With --kind auto, files with more rows get the compressed ivfpq index (default: the rows whose "
    "float32 copy passes 2 GiB, 4 x D bytes a row: 4,194,304 at 128-d, 262,144 at 2048-d).",
)
@friendly_errors
def index_cmd(
    features: str, out: str | None, kind: str, recall: float, exact_below: int, compress_above: int | None
) -> None:
    """``mec-hub index``: its help is ``HELP``."""
    from mec_hub.apps.index import FeatureIndex, default_index_path, import_faiss, shard_set

    whole = shard_set(features)
    if whole is not None and out is None:
        raise click.UsageError(
            f"{features} is one shard of {whole.name}: index the whole set (mec-hub index {whole}), "
            "or give --out to index this shard alone"
        )
    import_faiss()
    index = FeatureIndex.build(
        features, kind=kind, recall=recall, exact_below=exact_below, compress_above=compress_above
    )
    written = index.save(out or default_index_path(features))
    click.echo(f"{written}: {index.describe()}, built in {index.build_seconds:.1f} s")
