"""``mec-embed``: images in, ``FEATS.npy`` + ``FEATS.paths.txt`` + ``FEATS.meta.json`` out.

Only click is imported at module level; the engine (torch, timm) is imported inside the command,
after the options are checked, so that ``--help`` and usage errors answer at once: measured on the
2-core CI machine under load, 0.3 s for ``mec-embed --help`` against 14-17 s to import the engine.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import click

from mec_hub import __version__
from mec_hub.cli.common import UserError, cli_message, device_option, friendly_errors, option, show_warnings_briefly
from mec_hub.embedding import DEFAULT_BATCH_SIZE
from mec_hub.embedding.runtimes import RUNTIMES, auto_runtime_help
from mec_hub.export.int8_targets import CALIBRATION_IMAGES, MIN_CALIBRATION_IMAGES, Agreement, targets_text

if TYPE_CHECKING:
    from pathlib import Path

    from mec_hub.embedding.engine import Embedder
    from mec_hub.embedding.job import EmbedResult

EXIT_STRICT = 3  # --strict and some images failed (the outputs are still written)
EXIT_INTERRUPTED = 130  # Ctrl-C; --resume continues
SHOWN_FAILURES = 10

EPILOG = """\b
Outputs, for --out feats.npy:
  feats.npy         N x D features (np.load(..., mmap_mode="r") works)
  feats.paths.txt   line i = the image of row i
  feats.meta.json   model, options, counts, and every failed file with its reason
They appear only when the run is complete. A killed run continues with --resume.
With --out feats.parquet: one Parquet file (columns path, embedding; the meta in
its key-value metadata), or feats-00000.parquet ... with --shard-rows N.

\b
Exit status: 0 done (files that cannot be read are skipped and listed in the meta
file); 1 error, or no image could be embedded; 2 bad usage; 3 --strict and some
images failed; 130 interrupted.

\b
Examples:
  mec-embed photos/ --out feats.npy
  mec-embed 'data/**/*.jpg' extra.png --out feats.npy --precision bf16 --normalize
  mec-embed --files-from list.txt --out feats.npy --weights hf-hub:org/model
  mec-embed 'shards/{000000..000099}.tar' --out feats.npy
  mec-embed photos/ --out feats.parquet --shard-rows 1000000
  torchrun --nproc_per_node 4 -m mec_hub.cli.embed images/ --out feats.npy
"""


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EPILOG,
    short_help="Embed images (folders, files, globs, .tar shards) into a feature file.",
)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@option("out", required=True, metavar="FEATS.npy|FEATS.parquet",
        help="The feature file to write: FEATS.npy (N x D, with FEATS.paths.txt and FEATS.meta.json) or "
             "FEATS.parquet; a name without a suffix is FEATS.npy, any other suffix is refused. Not a folder.")
@option("model", default=None, metavar="NAME",
        help="Registry model (see `mec-hub list`).  [default: the package's default model]")
@click.option("--weights", default=None, metavar="SRC",
              help="Weights: a .safetensors file, a converted folder, hf-hub:org/name[@rev] or a URL.")
@click.option("--sha256", default=None, metavar="HEX",
              help="The SHA-256 you trust for the weights' model.safetensors (refused if it differs).")
@click.option("--head", type=click.Choice(["backbone", "projector"]), default="backbone", show_default=True,
              help="Pooled backbone features, or the MEC projector's output.")
@click.option("--pool", type=click.Choice(["avg", "gem", "none"]), default=None,
              help="Embed backbone stage --layer pooled this way instead (none: its C x H x W map, flattened).")
@click.option("--layer", type=click.IntRange(min=0), default=None, metavar="N",
              help="The stage --pool reads, timm's feature index (ResNet: 1-4 its stages).  [default: the last]")
@click.option("--gem-p", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
              help="The GeM exponent of --pool gem (1: average; large: max).")
@click.option("--allow-large", is_flag=True, help="Let --pool none write its maps as float32.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
              help="What runs the model. auto: the fastest here. " + auto_runtime_help() + " An .onnx file "
                   "from `mec-hub export` (--weights FILE.onnx) runs with onnxruntime as exported.")
@option("batch_size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
        help="Images per batch.")
@option("num_workers", type=click.IntRange(min=0), default=None,
        help="Image-decoding worker processes (0: decode in the main process).  [default: chosen for the device]")
@device_option("run the model")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "int8"]), default="fp32", show_default=True,
              help="Autocast precision of the model (fp16 needs CUDA); int8: ONNX Runtime's static quantization "
                   "on a CPU, calibrated on a sample of the inputs (--calibration-images), refused unless it "
                   f"agrees with fp32 there ({targets_text()}).")
@click.option("--calibration-images", type=click.IntRange(min=MIN_CALIBRATION_IMAGES), default=CALIBRATION_IMAGES,
              show_default=True, metavar="N",
              help="With --precision int8: how many of the inputs, spread evenly, it is calibrated and checked on.")
@click.option("--out-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--normalize/--no-normalize", default=False, show_default=True, help="L2-normalise each feature.")
@click.option("--files-from", default=None, metavar="LIST",
              help="Also embed the paths listed in LIST, one per line ('-': standard input).")
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Walk sub-folders of folders.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (same inputs and options).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (once the new ones are complete).")
@click.option("--strict", is_flag=True, help=f"Exit with status {EXIT_STRICT} if any image failed.")
@click.option("--max-pixels", type=click.IntRange(min=0), default=None, metavar="N",
              help="Images over N pixels fail as decompression bombs (0: no limit).  [default: Pillow's]")
@click.option("--shard-rows", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --out X.parquet: files X-00000.parquet ... of at most N rows each.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary; errors only.")
@click.version_option(__version__, prog_name="mec-embed")
@friendly_errors
def main(
    inputs: tuple[str, ...],
    out: str,
    model: str | None,
    weights: str | None,
    sha256: str | None,
    head: str,
    pool: str | None,
    layer: int | None,
    gem_p: float,
    allow_large: bool,
    runtime: str,
    batch_size: int,
    num_workers: int | None,
    device: str,
    precision: str,
    calibration_images: int,
    out_dtype: str,
    normalize: bool,
    files_from: str | None,
    recursive: bool,
    resume: bool,
    overwrite: bool,
    strict: bool,
    max_pixels: int | None,
    shard_rows: int | None,
    quiet: bool,
) -> None:
    """Embed the images in INPUT (folders, files, glob patterns or WebDataset .tar shards) with an MEC model.

    Rows follow a sorted walk of each folder, inputs in the order given. Each image member of a
    .tar shard is a row, named SHARD.tar/MEMBER, in the shard's order (other members are skipped);
    brace ranges such as 'shards/{000000..000099}.tar' name many shards. Files that cannot be
    read (truncated, empty, not images, decompression bombs) are skipped and listed with the
    reason in FEATS.meta.json; the run goes on.
    """
    show_warnings_briefly()
    if not inputs and files_from is None:
        raise click.UsageError("give at least one INPUT (folder, file or glob pattern) or --files-from LIST")
    _check_model_options(head, pool, layer, out_dtype, allow_large, runtime, model, weights, precision)

    from mec_hub.embedding.inputs import check_inputs_exist, collect_inputs
    from mec_hub.embedding.job import preflight
    from mec_hub.embedding.outputs import OutputTarget

    # Everything that can be checked without the model, before loading it (the job checks again).
    if shard_rows is not None and not out.endswith(".parquet"):
        raise click.UsageError("--shard-rows applies to Parquet output: --out FEATS.parquet")
    target = OutputTarget.for_out(out, shard_rows)  # --out n.csv: a usage error (friendly_errors)
    preflight(target, resume=resume, overwrite=overwrite)
    check_inputs_exist(inputs, files_from)
    if max_pixels is not None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = max_pixels or None
    collected = collect_inputs(inputs, files_from=files_from, recursive=recursive)

    from mec_hub.embedding.engine import Embedder
    from mec_hub.embedding.job import EmbeddingInterrupted
    from mec_hub.runtime.distributed import dist_env

    embedder = Embedder(
        model, weights=weights, head=head, device=device, precision=precision, batch_size=batch_size,
        num_workers=num_workers, normalize=normalize, out_dtype=out_dtype, sha256=sha256,
        pool=pool, layer=layer, gem_p=gem_p, runtime=runtime, calibration_images=calibration_images,
    )
    if pool == "none":
        _announce_maps(embedder, len(collected), target.files.npy.parent, quiet=quiet)
    try:
        result = embedder.embed_folder(
            collected, out, recursive=recursive, resume=resume, overwrite=overwrite,
            progress=False if quiet else None, shard_rows=shard_rows,
        )
    except EmbeddingInterrupted as exc:
        click.echo(f"mec-embed: {cli_message(exc)}", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None

    talk = not quiet and dist_env().is_main
    if talk:
        _report(result)
    if result.num_embedded == 0:
        raise UserError(f"no image could be embedded ({result.num_failed} failed; reasons in {result.meta_path})")
    if strict and result.num_failed:
        if not quiet:
            click.echo(f"Error: {result.num_failed} image(s) failed (--strict)", err=True)
        raise click.exceptions.Exit(EXIT_STRICT)


def _check_model_options(
    head: str, pool: str | None, layer: int | None, out_dtype: str, allow_large: bool, runtime: str,
    model: str | None, weights: str | None, precision: str,
) -> None:
    if (pool or layer is not None) and head != "backbone":
        raise click.UsageError("--pool and --layer read a backbone stage; they do not combine with --head projector")
    if pool == "none" and out_dtype != "float16" and not allow_large:
        raise click.UsageError(
            "--pool none writes a C x H x W map per image: pass --out-dtype float16 (half the size) or --allow-large"
        )
    if runtime == "onnxruntime" and (pool or layer is not None or precision in ("bf16", "fp16")):
        raise click.UsageError("--runtime onnxruntime runs the whole model, in fp32 or int8 only: no --pool or --layer")
    if precision == "int8" and (runtime == "torch" or pool or layer is not None):
        raise click.UsageError(
            "--precision int8 runs the whole model with onnxruntime: no --runtime torch, --pool or --layer"
        )


def _announce_maps(embedder: Embedder, count: int, folder: Path, *, quiet: bool) -> None:
    """Say how large the --pool none output will be, and refuse it where it cannot fit."""
    import numpy as np  # here, like the engine: --help answers without numpy or torch

    nbytes = count * embedder.embed_dim * np.dtype(embedder.out_dtype).itemsize
    c, h, w = embedder.model.map_shape
    if not quiet:
        click.echo(
            f"mec-embed: --pool none: {count} maps of {c} x {h} x {w} {embedder.out_dtype} "
            f"= {_size(nbytes)} (less any image that fails)",
            err=True,
        )
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise UserError(f"the maps need {_size(nbytes)} and {folder} has {_size(free)} free")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _report(result: EmbedResult) -> None:
    meta = result.meta
    rows, dim = meta["shape"]
    if result.already_complete:
        click.echo(f"mec-embed: {result.features} is already complete; nothing to do", err=True)
    click.echo(
        f"mec-embed: embedded {rows} of {meta['num_inputs']} images -> {result.features} "
        f"({rows} x {dim} {meta['out_dtype']}; {meta.get('runtime') or 'torch'}, {meta.get('precision')})",
        err=True,
    )
    figures = (meta.get("int8") or {}).get("agreement_with_fp32")
    if isinstance(figures, dict):
        click.echo(f"  {Agreement(**figures).summary()}", err=True)
    failed = meta["failed"]
    if failed:
        click.echo(f"  {len(failed)} failed (all listed in {result.meta_path.name}):", err=True)
        for entry in failed[:SHOWN_FAILURES]:
            click.echo(f"    {entry['path']}: {entry['reason']}", err=True)
        if len(failed) > SHOWN_FAILURES:
            click.echo(f"    ... and {len(failed) - SHOWN_FAILURES} more", err=True)
    if meta.get("num_skipped_non_images"):
        click.echo(f"  {meta['num_skipped_non_images']} file(s) or tar member(s) not images, left out", err=True)
    for entry in meta.get("skipped", [])[:SHOWN_FAILURES]:
        click.echo(f"    {entry['path']}: {entry['reason']}", err=True)


if __name__ == "__main__":
    main()
